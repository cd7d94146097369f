#!/bin/sh
# make bench-vmm: start latency, RSS overhead, restore latency and PSS of vessel-vmm with
# the tiny test guest. Needs /dev/kvm, gcc and binutils. Prints which accelerator it ran on.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$here/../../target}
if ! [ -r /dev/kvm ] || ! [ -w /dev/kvm ]; then
    echo "bench-vmm: SKIPPED: /dev/kvm is not usable on this host" >&2
    exit 0
fi
(cd "$here" && CARGO_TARGET_DIR="$target" cargo build --release --quiet --bin vessel-vmm --example bench_vmm)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sh "$here/tests/guest/build.sh" "$work/tiny-guest.elf"
"$target/release/examples/bench_vmm" "$target/release/vessel-vmm" "$work/tiny-guest.elf" "$work"
