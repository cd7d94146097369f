#!/usr/bin/env bash
# make bench-run: median wall time of `vessel run` (busybox `true`, its own
# microVM) next to `runc run`, `crun run` and a raw QEMU boot of the same
# kernel, interleaved in the same run; then host PSS of one idle sandbox
# (supervisor + QEMU + vhost-device-vsock + virtiofsd).
# crun needs the hybrid-cgroup workaround (MACHINE.md): the whole bench runs in
# a private mount namespace with an empty file over cgroup.controllers.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
runs=${RUNS:-10}
work=$(mktemp -d /tmp/vessel-bench-run.XXXXXX)
trap 'rm -rf "$work"' EXIT
vessel=$root/target/release/vessel

gcc -static -Os -o "$work/raw-init" "$root/benches/raw-init.c"
printf 'dir /dev 0755\nnod /dev/console 0600 c 5 1\nfile /init 0755 %s\n' "$work/raw-init" > "$work/spec"
python3 "$root/guest/initramfs/mkcpio.py" "$work/spec" "$work/raw.cpio.gz"
"$root/tests/support/busybox-bundle.sh" "$work/bundle" "$vessel" -- true >/dev/null

if ! report=$("$vessel" check); then
    echo "$report"; echo "bench-run: vessel check failed (is VESSEL_CONFIG set? run via make bench-run)" >&2; exit 1
fi
accel=$(sed -n "s/^accelerator: *\([a-z]*\).*/\1/p" <<<"$report")
: > "$work/empty"
exec unshare -m --propagation private sh -c '
  mount --bind "$1/empty" /sys/fs/cgroup/unified/cgroup.controllers 2>/dev/null || true
  exec python3 "$2/benches/run_bench.py" "$3" "$4" "$1" "$5" "$6"
' sh "$work" "$root" "$vessel" "$root/build/guest/vmlinux" "$runs" "$accel"
