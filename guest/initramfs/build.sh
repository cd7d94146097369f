#!/usr/bin/env bash
# Build the guest initramfs: vessel-agent as /init (statically linked).
#
# usage: guest/initramfs/build.sh AGENT_BINARY OUT.cpio.gz [--busybox]
#   --busybox adds /bin/busybox (busybox-static) and /bin/sh for a debug shell.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
agent=${1:?usage: build.sh AGENT_BINARY OUT.cpio.gz [--busybox]}
out=${2:?usage: build.sh AGENT_BINARY OUT.cpio.gz [--busybox]}
busybox=${3:-}

[[ -x $agent ]] || { echo "initramfs: agent binary $agent not found or not executable" >&2; exit 1; }
if file -L "$agent" | grep -q "dynamically linked"; then
    echo "initramfs: $agent is dynamically linked; the guest has no libc: build it with crt-static" >&2
    exit 1
fi
spec=$(mktemp)
stripped=$(mktemp)
trap 'rm -f "$spec" "$stripped"' EXIT
# Symbols are of no use in the guest and cost guest RAM (the initramfs lives in it).
if command -v strip >/dev/null; then
    strip -o "$stripped" "$agent"
    agent=$stripped
fi
cat > "$spec" <<SPEC
dir /dev 0755
nod /dev/console 0600 c 5 1
nod /dev/null 0666 c 1 3
dir /proc 0555
dir /sys 0555
dir /tmp 1777
dir /run 0755
dir /bin 0755
file /init 0755 $agent
SPEC
if [[ $busybox == --busybox ]]; then
    bb=$(command -v busybox || true)
    [[ -n $bb ]] && file -L "$bb" | grep -q "statically linked" ||
        { echo "initramfs: --busybox needs busybox-static (apt-get install busybox-static)" >&2; exit 1; }
    printf 'file /bin/busybox 0755 %s\nslink /bin/sh busybox\n' "$bb" >> "$spec"
fi
mkdir -p "$(dirname "$out")"
python3 "$here/mkcpio.py" "$spec" "$out"
echo "initramfs: $out ($(du -k "$out" | cut -f1) KiB)" >&2
