#!/usr/bin/env bash
# make bench-boot: time to agent-ready vs a raw boot of the same kernel.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
guest=$root/build/guest
runs=${RUNS:-10}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

gcc -static -Os -o "$work/raw-init" "$root/benches/raw-init.c"
printf 'dir /dev 0755\nnod /dev/console 0600 c 5 1\nfile /init 0755 %s\n' "$work/raw-init" > "$work/spec"
python3 "$root/guest/initramfs/mkcpio.py" "$work/spec" "$work/raw.cpio.gz"

if ! report=$("$root/target/release/vessel" check); then
    echo "$report"; echo "bench-boot: vessel check failed (is VESSEL_CONFIG set? run via make bench-boot)" >&2; exit 1
fi
accel=$(sed -n "s/^accelerator: *\([a-z]*\).*/\1/p" <<<"$report")
python3 "$root/benches/boot_bench.py" "$root/target/release/vessel" "$guest/vmlinux" "$work/raw.cpio.gz" "$runs" "$accel"
