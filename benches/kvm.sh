#!/usr/bin/env bash
# make bench-kvm: the built-in VMM and QEMU-KVM on real KVM, in the KVM lane
# (scripts/kvm-lane.sh: nested SVM under QEMU TCG), all in one L1 boot: boot to agent
# and `vessel run <bundle> true` against a raw QEMU-KVM boot of the same kernel, restore
# vs cold boot, host PSS of an idle sandbox, and density (idle built-in sandboxes until
# L1 has 1 GiB left). benches/kvm_bench.py says what each figure is.
#
# Release binaries, the raw /init and the bundles are built here on the host; L1 sees
# them through its overlay (/var/tmp). Env: RUNS (10), VESSEL_GUEST_DIR (build/guest),
# LANE_MEM_MIB (3072 here: the density run fills it), LANE_TIMEOUT (7200).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
runs=${RUNS:-10}
export VESSEL_GUEST_DIR=${VESSEL_GUEST_DIR:-$root/build/guest}

if [[ ${1:-} == --in-lane ]]; then
    # pyenv's python3 shim execs a dozen programs: about 10 s in L1.
    py=python3
    [[ -x /usr/bin/python3 ]] && py=/usr/bin/python3
    exec "$py" "$root/benches/kvm_bench.py" "$root" "$2" "$runs"
fi

cd "$root"
for f in vmlinux initramfs.cpio.gz; do
    [[ -s $VESSEL_GUEST_DIR/$f ]] || { echo "bench-kvm: $VESSEL_GUEST_DIR/$f missing: run \`make guest\`" >&2; exit 1; }
done
scripts/kvm-lane.sh --check
cargo build --release -q -p vessel -p vessel-vmm -p vessel-jailer
cargo build --release -q -p vessel-runtime --example restore_bench
work=$(mktemp -d /var/tmp/vessel-bench-kvm.XXXXXX)
trap 'rm -rf "$work"' EXIT
cp target/release/examples/restore_bench "$work/"
gcc -static -Os -o "$work/raw-init" benches/raw-init.c
printf 'dir /dev 0755\nnod /dev/console 0600 c 5 1\nfile /init 0755 %s\n' "$work/raw-init" >"$work/spec"
python3 guest/initramfs/mkcpio.py "$work/spec" "$work/raw.cpio.gz"
tests/support/busybox-bundle.sh "$work/bundle" target/release/vessel -- true >/dev/null
mkdir "$work/idle"
ln -s ../bundle/rootfs "$work/idle/rootfs"
sed 's/^\( *\)"true"$/\1"sleep", "100000"/' "$work/bundle/config.json" >"$work/idle/config.json"
grep -q '"sleep"' "$work/idle/config.json" || { echo "bench-kvm: could not make the idle bundle" >&2; exit 1; }
echo "bench-kvm: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo ' (with local changes)'); host: $(uptime)"
LANE_MEM_MIB=${LANE_MEM_MIB:-3072} LANE_TIMEOUT=${LANE_TIMEOUT:-7200} LANE_VERBOSE=1 LANE_ENV="RUNS" \
    scripts/kvm-lane.sh "$0" --in-lane "$work"
