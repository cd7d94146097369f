#!/usr/bin/env bash
# make bench-shim: `ctr run --rm <busybox> echo hello` through containerd 1.6 with
# the Vessel shim next to the runc shim (interleaved, same containerd, same run),
# medians; then the PSS of every host process of one idle Vessel pod.
#
# Env: RUNS (default 10), VESSEL_GUEST_DIR (default build/guest).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNS=${RUNS:-10}
GUEST=${VESSEL_GUEST_DIR:-$REPO/build/guest}
IMAGE=localhost/vessel-busybox:latest
DIR=$(mktemp -d /tmp/vbench.XXXXXX)
HARNESS=$REPO/tests/support/containerd-harness.sh
cleanup() { "$HARNESS" stop "$DIR/c" >/dev/null 2>&1 || true; rm -rf "$DIR"; }
trap cleanup EXIT

cat >"$DIR/vessel.toml" <<TOML
state_root = "$DIR/s"
guest_kernel = "$GUEST/vmlinux"
guest_initramfs = "$GUEST/initramfs.cpio.gz"
TOML
SOCK=$(VESSEL_SHIM_DIR=$REPO/target/release VESSEL_CONFIG=$DIR/vessel.toml \
    VESSEL_IMAGE_DIR=/tmp/vessel-test-images "$HARNESS" start "$DIR/c")
ctr_() { ctr -a "$SOCK" "$@"; }

ms_now() { date +%s%N; }
median() { sort -n | awk '{a[NR]=$1} END {if (NR % 2) print a[(NR+1)/2]; else printf "%.1f\n", (a[NR/2]+a[NR/2+1])/2}'; }

run_one() { # runtime id -> elapsed ms on stdout
    local t0 t1 out
    t0=$(ms_now)
    out=$(ctr_ run --rm --runtime "$1" "$IMAGE" "$2" echo hello)
    t1=$(ms_now)
    [[ $out == hello ]] || { echo "bench-shim: $1 printed '$out'" >&2; exit 1; }
    echo $(((t1 - t0) / 1000000))
}

echo "bench-shim: warm-up" >&2
run_one io.containerd.runc.v2 warm-runc >/dev/null
run_one io.containerd.vessel.v2 warm-vessel >/dev/null
: >"$DIR/runc.ms"; : >"$DIR/vessel.ms"
for i in $(seq "$RUNS"); do
    run_one io.containerd.runc.v2 "r$i" >>"$DIR/runc.ms"
    run_one io.containerd.vessel.v2 "v$i" >>"$DIR/vessel.ms"
done
accel=$(grep -o 'accelerator [a-z]*' "$DIR/c/containerd.log" | tail -1 | cut -d' ' -f2)
echo "ctr run --rm $IMAGE echo hello, $RUNS runs each, interleaved (Vessel accelerator: ${accel:-unknown}):"
printf '  runc shim:   median %s ms  (all: %s)\n' "$(median <"$DIR/runc.ms")" "$(tr '\n' ' ' <"$DIR/runc.ms")"
printf '  vessel shim: median %s ms  (all: %s)\n' "$(median <"$DIR/vessel.ms")" "$(tr '\n' ' ' <"$DIR/vessel.ms")"

# One idle pod: the shim plus every process of its VM (QEMU, vhost-device-vsock, virtiofsd).
ctr_ run -d --runtime io.containerd.vessel.v2 "$IMAGE" idle sleep 100000 >/dev/null
sleep 5 # let the guest settle to idle before measuring (not synchronisation)
total=0
echo "PSS of one idle Vessel pod (busybox sleep):"
for p in /proc/[0-9]*; do
    cmd=$(tr '\0' ' ' 2>/dev/null <"$p/cmdline" || true)
    if [[ $cmd == *"-address $SOCK "* || $cmd == *"$DIR/s/"* ]]; then
        pss=$(awk '/^Pss:/ {print $2}' "$p/smaps_rollup" 2>/dev/null || echo 0)
        total=$((total + pss))
        printf '  %8d KiB  %s\n' "$pss" "$(basename "$(readlink "$p/exe")") (pid ${p#/proc/})"
    fi
done
printf '  total %d KiB (%.1f MiB)\n' "$total" "$(echo "$total / 1024" | bc -l)"
ctr_ task rm -f idle >/dev/null 2>&1 || true
ctr_ container rm idle >/dev/null 2>&1 || true
