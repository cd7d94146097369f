#!/usr/bin/env bash
# `make test-lane`: the suites that need hardware KVM, run in the KVM lane
# (scripts/kvm-lane.sh, docs/kvm-lane.md). The test executables are built here, on the
# host (building inside the emulated L1 would be far too slow), then run in one L1 boot.
# The suites are the SUITES table below; to add one, add its line (and, for a new test
# executable, its package:target to TEST_TARGETS).
#
# Nothing skips there (VESSEL_REQUIRE_HARDWARE_KVM); a lane that cannot start fails.
# Settings: VESSEL_GUEST_DIR (build/guest), LANE_TEST_THREADS (2), LANE_SUITES (default:
# DEFAULT_SUITES; `all`, or space-separated names from the table, e.g. "check
# lifecycle-builtin"), LANE_QEMU_LIFECYCLE_TESTS (the CLI tests lifecycle-qemu-kvm runs;
# default: four that boot QEMU/KVM through each lifecycle path, see below; `all`),
# LANE_ALL_TESTS (1: every test of each suite, not the backend-dependent subsets below),
# LANE_PARALLEL (2: L1 VMs running the suites at once, one vCPU each),
# LANE_TEST_FILTER (libtest arguments appended to every test suite, e.g. one test's
# name), LANE_SUITE_TIMEOUT (900 s: one suite's bound), and kvm-lane.sh's (LANE_MEM_MIB, LANE_TIMEOUT, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
GUEST=${VESSEL_GUEST_DIR:-$ROOT/build/guest}

# The test executables the suites run, as package:test-target.
TEST_TARGETS=(
    vessel-vmm:hardware_kvm
    vessel-vmm:linux_boot
    vessel-runtime:sandbox_snapshot
    vessel:lifecycle
    vessel:network
    containerd-shim-vessel-v2:ctr
    containerd-shim-vessel-v2:cri
    containerd-shim-vessel-v2:network
    containerd-shim-vessel-v2:cri_network
    vessel:hostile
    vessel:publish
    vessel:templates
    containerd-shim-vessel-v2:start_bench
    containerd-shim-vessel-v2:faults
)

# The suites, in order: name, backend (VESSEL_TEST_HYPERVISOR), the seconds it took in the
# lane (2026-12-06, with the default test lists below: what the split over parallel lanes
# balances), then the
# command: a test
# target from TEST_TARGETS (its executable runs; `package:target` where two packages have
# a target of that name) or a function of this script, and its arguments ($threads:
# LANE_TEST_THREADS).
# shellcheck disable=SC2016
SUITES='
check               builtin      21  check_builtin
hardware_kvm        builtin      55  hardware_kvm      --test-threads=1
linux_boot          builtin      25  linux_boot        --test-threads=1 linux_boots_to_init_with_virtio_devices_probed
sandbox_snapshot    qemu-kvm    116  sandbox_snapshot  --test-threads=1
lifecycle-builtin   builtin     239  lifecycle         --test-threads=$threads $builtin_lifecycle_tests
lifecycle-qemu-kvm  qemu-kvm    135  lifecycle         --test-threads=$threads $qemu_lifecycle_tests
network-builtin     builtin      98  vessel:network    --test-threads=1 $builtin_network_tests
network-qemu-kvm    qemu-kvm    110  vessel:network    --test-threads=1
ctr-builtin         builtin     233  ctr               --test-threads=$threads
ctr-qemu-kvm        qemu-kvm     88  ctr               --test-threads=$threads $qemu_ctr_tests
cri-builtin         builtin     154  cri               --test-threads=$threads $cri_tests
cri-qemu-kvm        qemu-kvm    137  cri               --test-threads=$threads $cri_tests
ctr-cni-builtin     builtin     110  containerd-shim-vessel-v2:network --test-threads=1
cri-cni-builtin     builtin     189  cri_network       --test-threads=1
hostile-builtin     builtin     229  hostile           --test-threads=1 $no_flood
publish-builtin     builtin      67  publish           --test-threads=1 $publish_tests
templates-builtin   builtin      83  vessel:templates  --test-threads=1
faults-builtin      builtin     271  faults            --test-threads=1 --nocapture faults_ci
start-bench         builtin     900  containerd-shim-vessel-v2:start_bench --ignored --nocapture --test-threads=1
'
# What `make test` runs: every suite but network-qemu-kvm and ctr-cni-builtin. QEMU's
# networking is tested on the host with TCG, and the lane proves the built-in VMM's
# (network-builtin: its virtio-net and tap; cri-cni-builtin: a CNI pod network through the
# shim). The shim's ctr + CNI path is the same for both backends and runs on the host.
# Within suites, the lane runs the tests whose outcome depends on the backend or its
# accelerator; see the test lists below (LANE_ALL_TESTS=1 runs every test of each suite).
DEFAULT_SUITES="check hardware_kvm linux_boot sandbox_snapshot lifecycle-builtin lifecycle-qemu-kvm
    network-builtin ctr-builtin ctr-qemu-kvm cri-builtin cri-qemu-kvm cri-cni-builtin hostile-builtin
    publish-builtin templates-builtin faults-builtin"

say() { echo "test-lane: $*" >&2; }

if [[ ${1:-} != --in-lane ]]; then
    for f in vmlinux bzImage initramfs.cpio.gz; do
        [[ -s $GUEST/$f ]] || { say "$GUEST/$f missing: run \`make guest\`"; exit 1; }
    done
    scripts/kvm-lane.sh --check
    start=$SECONDS
    # The binaries the suites start (the backends' and the CLI's) and the test executables,
    # built as `make workspace-test` builds them (`cargo test --workspace`: every binary
    # package has integration tests, so its binary is built too). Per-package builds
    # (`-p ...`) would unify other features and rebuild most of the workspace (~4 min).
    # L1 does not see the host's /tmp: the list goes to /var/tmp.
    list=$(mktemp /var/tmp/vessel-lane-tests.XXXXXX)
    trap 'rm -f "$list"' EXIT
    # Keep only the package:target pairs listed (two packages have a `network` suite).
    cargo test -q --workspace --no-run --message-format=json |
        python3 -c '
import json, sys
wanted = set(sys.argv[1:])
bins = {"vessel", "vessel-vmm", "vessel-jailer", "containerd-shim-vessel-v2"}
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["bin"]:
        bins.discard(m["target"]["name"])
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        # package_id: "path+file:///dir/x#name@1.0", "path+file:///dir/name#1.0"
        # (cargo >= 1.77) or "name 1.0 (path+...)" (older).
        pid = m["package_id"]
        if "#" in pid:
            url, frag = pid.split("#", 1)
            name = frag.split("@")[0] if "@" in frag else url.rstrip("/").rsplit("/", 1)[-1]
        else:
            name = pid.split(" ")[0]
        key = name + ":" + m["target"]["name"]
        if key in wanted:
            print(key, m["executable"])
if bins:
    sys.exit("binaries not built by cargo test --workspace: " + ", ".join(sorted(bins)))
' "${TEST_TARGETS[@]}" >"$list"
    [[ $(wc -l <"$list") == "${#TEST_TARGETS[@]}" ]] ||
        { say "expected ${#TEST_TARGETS[@]} test executables, got:"; cat "$list" >&2; exit 1; }
    # The shim suites' images, built here (in L1 the script's ~800 execs take minutes);
    # L1 sees /var/tmp through its overlay.
    export VESSEL_IMAGE_DIR=${VESSEL_IMAGE_DIR:-/var/tmp/vessel-test-images}
    tests/support/busybox-image.sh "$VESSEL_IMAGE_DIR" >/dev/null
    tests/support/nginx-image.sh "$VESSEL_IMAGE_DIR" >/dev/null
    say "test executables and images built in $((SECONDS - start)) s; starting the lane (host: $(uptime))"
    export VESSEL_GUEST_DIR=$GUEST
    # The selected suites, split over LANE_PARALLEL L1 VMs (one vCPU each) that run at
    # once: the largest suites first, each to the lane with the least work so far.
    selected=${LANE_SUITES:-$DEFAULT_SUITES}
    nlanes=${LANE_PARALLEL:-2}
    mapfile -t groups < <(python3 -c '
import sys
n, sel, table = int(sys.argv[1]), sys.argv[2].split(), sys.argv[3]
rows = [l.split()[:3] for l in table.splitlines() if l.strip()]
est = {r[0]: int(r[2]) for r in rows}
order = [r[0] for r in rows if sel == ["all"] or r[0] in sel]
order += [s for s in sel if s != "all" and s not in est]  # unknown: the lane reports it
n = max(1, min(n, len(order)))
load, groups = [0] * n, [[] for _ in range(n)]
for name in sorted(order, key=lambda x: -est.get(x, 0)):
    i = load.index(min(load))
    groups[i].append(name)
    load[i] += est.get(name, 0)
for g in groups:
    print(" ".join(sorted(g, key=order.index)))
' "$nlanes" "$selected" "$SUITES")
    rcs=$(mktemp -d /var/tmp/vessel-lane-rc.XXXXXX)
    trap 'rm -rf "$list" "$rcs"' EXIT
    i=0
    for group in "${groups[@]}"; do
        i=$((i + 1))
        say "lane $i of ${#groups[@]}: $group"
        (
            rc=0
            LANE_SUITES=$group LANE_ENV="${LANE_ENV:-} LANE_SUITES LANE_SUITE_TIMEOUT LANE_TEST_THREADS LANE_TEST_FILTER LANE_QEMU_LIFECYCLE_TESTS LANE_ALL_TESTS" \
                LANE_VERBOSE=1 LANE_TIMEOUT=${LANE_TIMEOUT:-2700} \
                scripts/kvm-lane.sh "$0" --in-lane "$list" </dev/null 2>&1 || rc=$?
            echo "$rc" >"$rcs/$i"
        ) | if ((${#groups[@]} > 1)); then sed -u "s/^/[lane $i] /"; else cat; fi &
    done
    wait
    rc=0
    for j in $(seq 1 "${#groups[@]}"); do
        r=$(cat "$rcs/$j" 2>/dev/null || echo 1)
        say "lane $j: exit $r"
        ((r == 0)) || rc=$r
    done
    say "lanes finished in $((SECONDS - start)) s (exit $rc; host: $(uptime))"
    exit "$rc"
fi

# --- in L1 -----------------------------------------------------------------------------
list=$2
# The executable of test target $1: `package:target` as in TEST_TARGETS, or a target
# name that only one package has.
exe() {
    local t key=
    for t in "${TEST_TARGETS[@]}"; do [[ $t == "$1" || ${t#*:} == "$1" ]] && key=$t; done
    awk -v n="$key" '$1 == n { print $2 }' "$list"
}
export VESSEL_GUEST_DIR=$GUEST VESSEL_GUEST_KERNEL=$GUEST/vmlinux VESSEL_REQUIRE_HARDWARE_KVM=1
export RUST_BACKTRACE=${RUST_BACKTRACE:-1}
# L1's KVM runs on an emulated CPU: a guest that boots in 5-8 s here took over 30 s (the
# KVM default boot timeout) when the host was loaded. The tests' configurations use this.
export VESSEL_TEST_BOOT_TIMEOUT_SECS=${VESSEL_TEST_BOOT_TIMEOUT_SECS:-120}
# Wall-clock bounds of the tests that promise one (e.g. a container reported exited
# within 5 s of its VMM's SIGKILL) are checked as such on the host (tcg: 0.2-0.8 s);
# here the shim learned of a SIGKILLed QEMU/KVM's exit only 5-6 s after the kill
# (2026-12-06, three runs: the host side runs on L1's emulated CPU), so they are scaled
# (vessel_testutil::scaled).
export VESSEL_TEST_TIME_SCALE=${VESSEL_TEST_TIME_SCALE:-4}
threads=${LANE_TEST_THREADS:-2}
suite_timeout=${LANE_SUITE_TIMEOUT:-900}
# One line: DEFAULT_SUITES spans lines, and the match below is on " name ".
# shellcheck disable=SC2116,SC2086
selected=$(echo ${LANE_SUITES:-$DEFAULT_SUITES})
# The tests a suite runs when it does not run them all (LANE_ALL_TESTS=1 runs all). The
# lane proves what depends on the backend or on hardware KVM; what the agent does in any
# VM (namespaces, cgroups, stdio, mounts, hooks, process settings) is the same on every
# backend and runs on the host with QEMU (TCG), every test of every suite.
# - The built-in VMM through the CLI: run, create/start/state/delete, stdin and 10 MiB of
#   stdout (its vsock), bind mounts (its virtio-fs), two VMs at once and a forced delete,
#   exec and pause/resume. Process settings, signals, hooks and the CLI's signal
#   forwarding are the agent's and the CLI's.
builtin_lifecycle_tests="run_echo_and_exit_code create_start_state_delete stdin_is_piped
    ten_mib_of_stdout_arrives_intact_before_exit tmpfs_and_host_bind_mounts
    two_containers_at_once_and_delete_force exec_plain_and_pause_resume"
# - QEMU/KVM through the CLI: run, exec with pause/resume (QMP stop/cont), and signals
#   (`all`: the 11, about 370 s in the lane; create/start/state/delete is the CLI's state
#   machine, the same on every backend). LANE_QEMU_LIFECYCLE_TESTS overrides.
qemu_lifecycle_tests=${LANE_QEMU_LIFECYCLE_TESTS:-run_echo_and_exit_code exec_plain_and_pause_resume kill_sigterm_trap_and_sigkill}
# - QEMU/KVM through the shim and ctr: a task's run, output and exit codes (the exec,
#   metrics and terminal paths run on the built-in VMM here and on QEMU on the host).
qemu_ctr_tests=run_echo_hi_and_exit_codes
# - CRI, both backends: a pod of two containers in one VM (the rootfs shares of a running
#   VM) and the hypervisor's death; namespace sharing, resource updates and a forking init
#   are the agent's and run on the host.
cri_tests="pod_with_two_containers_is_one_vm killing_the_hypervisor_exits_the_containers"
# - The built-in VMM's network: HTTP both ways over a veth namespace (its virtio-net and
#   tap), the VMM in a new namespace, IPv6. The errors, loopback-only and tc clean-up
#   after a killed supervisor are the runtime's and the agent's.
builtin_network_tests="http_both_ways_over_a_veth_namespace
    a_new_namespace_holds_the_container_pid_and_its_vmm_and_goes_with_delete
    ipv6_addresses_and_default_route_reach_the_guest"
# - A published port of a built-in VMM container, through podman; docker's `-p` takes
#   the same path into the VM and runs on the host.
publish_tests=podman_publishes_a_port_of_a_vessel_container
if [[ ${LANE_ALL_TESTS:-0} == 1 ]]; then
    qemu_lifecycle_tests=all qemu_ctr_tests= cri_tests=
    builtin_lifecycle_tests= builtin_network_tests= publish_tests=
fi
# hostile's console flood is not run in L1: every console byte is a VM exit through the
# emulated L1 (4 MiB did not finish in 12 min); the built-in VMM's serial cap is proven on
# the host (crates/vmm/tests/tiny_guest.rs serial_flood_stays_under_the_log_cap).
# Nor the host-limits test (a guest that dirties its 256 MiB and writes 1 GiB through
# virtio-fs, proven on the host under TCG, cgroup v1): in L1 that is minutes of emulated
# page faults and copies. ctr-builtin and ctr-qemu-kvm check the pod's processes are in
# its host cgroup (cgroup v2 in L1) and that it is removed.
no_flood="--skip console_flood_stays_under_the_log_cap_and_the_vm_keeps_running
    --skip a_guest_that_dirties_its_memory_and_floods_virtio_fs_stays_inside_its_host_limits"
[[ $qemu_lifecycle_tests == all ]] && qemu_lifecycle_tests=
logs=$(mktemp -d /tmp/lane-logs.XXXXXX)
summary=()
failed=0

# `vessel check --boot --snapshot --hypervisor builtin`, jailed, and `vessel check --audit`
# of the same configuration, as two "tests".
check_builtin() {
    local cfg=/run/lane-check.toml out
    printf 'state_root = "/run/vessel-lane-check"\nboot_timeout_secs = 120\nguest_kernel = "%s"\nguest_initramfs = "%s"\n[builtin]\nvmm_path = "%s"\njailer = true\njailer_path = "%s"\n' \
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
    # The configuration audit of this default-like configuration (built-in VMM on
    # hardware KVM, jailer on): nothing may be flagged. It boots nothing.
    out=$(timeout 60 "$ROOT/target/debug/vessel" --config "$cfg" check --audit 2>&1) || {
        echo "$out"
        echo "check --audit flagged the default configuration (or failed)"
        echo "test result: FAILED. 1 passed; 1 failed"
        return 1
    }
    echo "$out"
    grep -q "^result:          ok: no setting weakens isolation" <<<"$out" || {
        echo "check --audit output lacks its ok result"
        echo "test result: FAILED. 1 passed; 1 failed"
        return 1
    }
    echo "test result: ok. 2 passed; 0 failed"
}

# Pids of Vessel's and its helpers' processes (by process name).
lane_leftovers() {
    ps -eo pid=,comm= | awk '$2 ~ /^(vessel|vessel-vmm|vessel-jailer|containerd|containerd-shim|qemu-system-x86|virtiofsd|vhost-device-vs)$/ { print $1 }'
}

# suite NAME BACKEND CMD ARGS...: runs CMD (a test target's executable, or a function)
# with VESSEL_TEST_HYPERVISOR=BACKEND, its output streamed and kept; records the tests
# passed/failed (from libtest's result lines) and the time.
suite() {
    local name=$1 backend=$2 cmd=$3 rc=0 t0=$SECONDS passed failed_n result=ok
    shift 3
    if [[ $(type -t "$cmd") != function ]]; then
        cmd=$(exe "$cmd")
        [[ -n $cmd ]] || { echo "lane: suite $name: no test executable for it in $list"; failed=1; return; }
        # shellcheck disable=SC2086
        set -- "$@" ${LANE_TEST_FILTER:-}
    fi
    echo "===== lane suite $name ($backend): $cmd $*"
    if [[ $(type -t "$cmd") == function ]]; then
        VESSEL_TEST_HYPERVISOR=$backend "$cmd" "$@" 2>&1 | tee "$logs/$name.log" || rc=$?
    else
        # A hung suite fails alone instead of holding the lane until LANE_TIMEOUT. The
        # output goes to a file, followed until the suite's process ends: a process it
        # left behind (a daemonized supervisor, a VMM) that still holds its stdout cannot
        # keep the lane waiting for an end of file, as a pipe to tee did.
        local pid tailer
        VESSEL_TEST_HYPERVISOR=$backend timeout -k 10 "$suite_timeout" "$cmd" "$@" >"$logs/$name.log" 2>&1 &
        pid=$!
        tail -n +1 -s 0.2 -f --pid="$pid" "$logs/$name.log" &
        tailer=$!
        wait "$pid" || rc=$?
        wait "$tailer" || true
        if ((rc == 124 || rc == 137)); then
            {
                echo "lane: suite $name timed out after $suite_timeout s (LANE_SUITE_TIMEOUT); its processes:"
                ps -eo pid,stat,wchan:24,etime,args | grep -E '[v]essel|[q]emu|[v]irtiofsd|[c]ontainerd' | cut -c1-200 || true
                # What the guests of the hung sandboxes said last (a guest kernel oops shows
                # up here): the console logs of run directories of the last 30 minutes.
                find /tmp /run/vessel -maxdepth 6 -name console.log -mmin -30 2>/dev/null | head -5 |
                    while read -r f; do echo "--- $f (last 25 lines)"; tail -n 25 "$f" | cut -c1-200; done || true
                echo "test result: FAILED. 0 passed; 1 failed"
            } | tee -a "$logs/$name.log"
        fi
        # Suites run one after another in this L1: whatever a suite left running is its
        # own and must not slow or confuse the next suite.
        # By process name (comm, 15 characters at most: containerd-shim-vessel-v2 is
        # "containerd-shim"); the lane's own processes do not match. A process that is
        # exiting as the suite ends gets 5 s. Leftovers are reported and killed so that
        # the next suite starts clean; the suites' own assertions (assert_clean, the
        # leak checks) are what fail a test for them.
        local i left
        for i in $(seq 25); do [[ -z $(lane_leftovers) ]] && break; sleep 0.2; done
        left=$(lane_leftovers)
        if [[ -n $left ]]; then
            {
                echo "lane: suite $name left processes behind; killing them:"
                # shellcheck disable=SC2086
                ps -o pid,stat,etime,args -p "$(echo $left | tr ' ' ,)" | cut -c1-200 || true
            } | tee -a "$logs/$name.log"
            # shellcheck disable=SC2086
            kill -KILL $left 2>/dev/null || true
        fi
    fi
    passed=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) if ($(i + 1) ~ /^passed/) s += $i } END { print s + 0 }' "$logs/$name.log")
    failed_n=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) if ($(i + 1) ~ /^failed/) s += $i } END { print s + 0 }' "$logs/$name.log")
    if ((rc != 0)) || ((passed == 0)); then
        failed=1
        result="FAILED (exit $rc)"
    fi
    summary+=("$(printf '%-20s %-9s %6s %6s %7s  %s' "$name" "$backend" "$passed" "$failed_n" "$((SECONDS - t0)) s" "$result")")
}

echo "lane: $(uname -r), $(nproc) vCPUs, $(awk '/MemTotal/ { print int($2 / 1024) }' /proc/meminfo) MiB, $(cat /sys/module/kvm_amd/parameters/nested 2>/dev/null | sed 's/^/kvm_amd nested=/')"
known=" "
while read -r name backend _est cmd args; do
    [[ -n $name ]] || continue
    known+="$name "
    [[ $selected == all || " $selected " == *" $name "* ]] || continue
    # shellcheck disable=SC2086
    suite "$name" "$backend" "$cmd" $(eval "echo $args")
done <<<"$SUITES"
for name in $selected; do
    [[ $name == all || $known == *" $name "* ]] || { echo "lane: no suite $name (known:$known)"; failed=1; }
done

echo
echo "lane: summary (accelerator: kvm_amd, nested SVM under QEMU TCG)"
printf 'lane: %-20s %-9s %6s %6s %7s  %s\n' suite backend passed failed time result
for s in "${summary[@]}"; do echo "lane: $s"; done
exit "$failed"
