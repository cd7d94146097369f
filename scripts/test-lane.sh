#!/usr/bin/env bash
# `make test-lane`: the suites that need hardware KVM, run in the KVM lane
# (scripts/kvm-lane.sh, docs/kvm-lane.md). The test executables are built here, on the
# host (building inside the emulated L1 would be far too slow), then run in one L1 boot:
#
#   vessel check --boot --snapshot --hypervisor builtin
#   vessel-vmm      hardware_kvm       PVH vmlinux and bzImage to the agent, 10 restores
#   vessel-runtime  sandbox_snapshot   builtin (jailed) and QEMU-KVM: 10 clones each
#   vessel          lifecycle          with hypervisor = "builtin" (jailed), then QEMU-KVM
#   vessel          network            the same two backends (host<->container HTTP, loopback)
#   shim            ctr, cri           the same two backends
#
# Nothing skips there (VESSEL_REQUIRE_HARDWARE_KVM); a lane that cannot start fails.
# Settings: VESSEL_GUEST_DIR (build/guest), LANE_TEST_THREADS (2), LANE_SUITES (default:
# all but the shim's ctr-*/cri-*, see below; `all`, or space-separated names from the
# summary, e.g. "check lifecycle-builtin"),
# and kvm-lane.sh's (LANE_MEM_MIB, LANE_TIMEOUT, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
GUEST=${VESSEL_GUEST_DIR:-$ROOT/build/guest}

say() { echo "test-lane: $*" >&2; }

if [[ ${1:-} != --in-lane ]]; then
    for f in vmlinux bzImage initramfs.cpio.gz; do
        [[ -s $GUEST/$f ]] || { say "$GUEST/$f missing: run \`make guest\`"; exit 1; }
    done
    scripts/kvm-lane.sh --check
    start=$SECONDS
    # The binaries the suites start (the backends' and the CLI's), and the test executables.
    cargo build -q -p vessel -p vessel-vmm -p vessel-jailer -p containerd-shim-vessel-v2
    # L1 does not see the host's /tmp: the list goes to /var/tmp.
    list=$(mktemp /var/tmp/vessel-lane-tests.XXXXXX)
    trap 'rm -f "$list"' EXIT
    cargo test -q --no-run --message-format=json \
        -p vessel-vmm --test hardware_kvm -p vessel-runtime --test sandbox_snapshot \
        -p vessel --test lifecycle --test network -p containerd-shim-vessel-v2 --test ctr --test cri |
        python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])
' >"$list"
    [[ $(wc -l <"$list") == 6 ]] || { say "expected 6 test executables, got:"; cat "$list" >&2; exit 1; }
    say "test executables built in $((SECONDS - start)) s; starting the lane"
    export VESSEL_GUEST_DIR=$GUEST
    LANE_ENV="${LANE_ENV:-} LANE_SUITES LANE_TEST_THREADS LANE_LIFECYCLE_TESTS" LANE_VERBOSE=1 LANE_TIMEOUT=${LANE_TIMEOUT:-2700} \
        scripts/kvm-lane.sh "$0" --in-lane "$list"
    exit
fi

# --- in L1 -----------------------------------------------------------------------------
list=$2
exe() { awk -v n="$1" '$1 == n { print $2 }' "$list"; }
export VESSEL_GUEST_DIR=$GUEST VESSEL_GUEST_KERNEL=$GUEST/vmlinux VESSEL_REQUIRE_HARDWARE_KVM=1
export RUST_BACKTRACE=${RUST_BACKTRACE:-1}
threads=${LANE_TEST_THREADS:-2}
# network-qemu-kvm runs only with LANE_SUITES=all (QEMU's networking is tested on the host
# with TCG). The shim's ctr and CRI suites have not passed in the lane yet (first runs: slow, and
# the builtin jail-id collision fixed since): they run with LANE_SUITES=all.
suites=${LANE_SUITES:-check hardware_kvm sandbox_snapshot lifecycle-builtin lifecycle-qemu-kvm network-builtin}
logs=$(mktemp -d /tmp/lane-logs.XXXXXX)
summary=()
failed=0

# suite NAME BACKEND CMD...: runs CMD with VESSEL_TEST_HYPERVISOR=BACKEND, its output
# streamed and kept; records tests passed/failed (from libtest's result lines) and time.
suite() {
    local name=$1 backend=$2 rc=0 t0=$SECONDS passed failed_n
    shift 2
    if [[ $suites != all && " $suites " != *" $name "* ]]; then
        return
    fi
    echo "===== lane suite $name ($backend): $*"
    VESSEL_TEST_HYPERVISOR=$backend "$@" 2>&1 | tee "$logs/$name.log" || rc=$?
    passed=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) if ($(i + 1) ~ /^passed/) s += $i } END { print s + 0 }' "$logs/$name.log")
    failed_n=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) if ($(i + 1) ~ /^failed/) s += $i } END { print s + 0 }' "$logs/$name.log")
    if ((rc != 0)) || ((passed == 0)); then
        failed=1
        summary+=("$(printf '%-22s %-9s %6s %6s %7s  %s' "$name" "$backend" "$passed" "$failed_n" "$((SECONDS - t0)) s" "FAILED (exit $rc)")")
    else
        summary+=("$(printf '%-22s %-9s %6s %6s %7s  %s' "$name" "$backend" "$passed" "$failed_n" "$((SECONDS - t0)) s" ok)")
    fi
}

# `vessel check --boot --snapshot --hypervisor builtin`, jailed, as one "test".
check_builtin() {
    local cfg=/run/lane-check.toml out
    printf 'state_root = "/run/vessel-lane-check"\nguest_kernel = "%s"\nguest_initramfs = "%s"\n[builtin]\nvmm_path = "%s"\njailer = true\njailer_path = "%s"\n' \
        "$GUEST/vmlinux" "$GUEST/initramfs.cpio.gz" "$ROOT/target/debug/vessel-vmm" \
        "$ROOT/target/debug/vessel-jailer" >"$cfg"
    out=$("$ROOT/target/debug/vessel" --config "$cfg" check --boot --snapshot --hypervisor builtin 2>&1) || {
        echo "$out"
        echo "test result: FAILED. 0 passed; 1 failed"
        return 1
    }
    echo "$out"
    for want in "accelerator:     kvm" "guest kernel:    [0-9]" "clone checks:    same boot id"; do
        grep -q "^$want" <<<"$out" || {
            echo "check output lacks \"$want\""
            echo "test result: FAILED. 0 passed; 1 failed"
            return 1
        }
    done
    echo "test result: ok. 1 passed; 0 failed"
}

echo "lane: $(uname -r), $(nproc) vCPUs, $(awk '/MemTotal/ { print int($2 / 1024) }' /proc/meminfo) MiB, $(cat /sys/module/kvm_amd/parameters/nested 2>/dev/null | sed 's/^/kvm_amd nested=/')"
suite check builtin check_builtin
suite hardware_kvm builtin "$(exe hardware_kvm)" --test-threads=1
# Its QEMU tests take QEMU-KVM; its builtin test is always builtin (jailed).
suite sandbox_snapshot qemu-kvm "$(exe sandbox_snapshot)" --test-threads=1
# The CLI suite takes about 2 min per test in the lane: by default its core cases run
# (LANE_LIFECYCLE_TESTS=all runs all 11).
lifecycle_tests=${LANE_LIFECYCLE_TESTS:-run_echo_and_exit_code create_start_state_delete}
[[ $lifecycle_tests == all ]] && lifecycle_tests=
for backend in builtin qemu-kvm; do
    # shellcheck disable=SC2086
    suite "lifecycle-$backend" "$backend" "$(exe lifecycle)" --test-threads="$threads" $lifecycle_tests
    suite "network-$backend" "$backend" "$(exe network)" --test-threads=1
    suite "ctr-$backend" "$backend" "$(exe ctr)" --test-threads=1
    suite "cri-$backend" "$backend" "$(exe cri)" --test-threads=1
done

echo
echo "lane: summary (accelerator: kvm_amd, nested SVM under QEMU TCG)"
printf 'lane: %-22s %-9s %6s %6s %7s  %s\n' suite backend passed failed time result
for s in "${summary[@]}"; do echo "lane: $s"; done
exit "$failed"
