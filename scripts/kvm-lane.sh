#!/usr/bin/env bash
# The KVM test lane: runs a command as root inside an "L1" VM whose /dev/kvm is real
# (kvm_amd over the AMD SVM that QEMU's TCG emulates with `-cpu max`), so that everything
# needing hardware KVM (the built-in VMM, QEMU -accel kvm, snapshots of Linux guests)
# runs on hosts that only have software KVM. See docs/kvm-lane.md.
#
#   scripts/kvm-lane.sh --prepare        fetch and cache the L1 kernel (make deps runs it)
#   scripts/kvm-lane.sh --check          verify the cache (what a run checks first)
#   scripts/kvm-lane.sh CMD [ARGS...]    run CMD in L1; exit with CMD's status
#
# Inside L1 the host root is mounted read-only (9p) under a tmpfs overlay, so the same
# binaries, checkout and tools run there; writes stay in L1 and vanish with it. CMD runs in
# the caller's working directory with PATH, HOME, CI, LANG, TZ, every VESSEL_*, RUST_*,
# CARGO_* variable and those named in LANE_ENV (space-separated). Its stdout and stderr
# come back separately (two virtio-serial ports), each in order.
#
# Exit status: CMD's, or 124 if CMD outlived LANE_TIMEOUT, or 125 if the lane itself
# failed (the message names the step and shows the tail of the L1 console). L1 writes a
# heartbeat every 10 s while CMD runs; if none arrives for LANE_STALL_TIMEOUT, L1 itself
# is wedged (its kernel no longer runs: seen under nested SVM in TCG), and the lane fails
# at once with the L1 vCPUs' state from QEMU's monitor instead of waiting for LANE_TIMEOUT.
#
# Settings (environment): LANE_MEM_MIB (6144), LANE_CPUS (1), LANE_BOOT_TIMEOUT (300 s,
# QEMU start to CMD start), LANE_TIMEOUT (3600 s, CMD), LANE_STALL_TIMEOUT (180 s without
# an L1 heartbeat), LANE_SHUTDOWN_TIMEOUT (60 s), LANE_L1_CMDLINE (extra L1 kernel
# parameters, e.g. module options such as kvm_amd.vgif=0),
# LANE_VERBOSE=1 (report boot and run times on stderr), VESSEL_CACHE_DIR
# (/var/cache/vessel; the L1 kernel is cached in its lane/<kernel version>/).
set -euo pipefail

CACHE=${VESSEL_CACHE_DIR:-/var/cache/vessel}/lane
MEM_MIB=${LANE_MEM_MIB:-6144}
# One L1 vCPU. With two, QEMU 7.2's TCG loses inter-processor interrupts while an L1 vCPU
# runs a KVM guest, and L1 locks up (soft lockups, RCU stalls, both vCPUs spinning or
# panicking with the guest's registers in an exception frame): 6 of 6 loops of
# hardware_kvm's restore test wedged L1 within 1-9 runs. With one L1 vCPU there are no
# IPIs to lose (docs/kvm-lane.md); on this 2-core host it is also faster.
CPUS=${LANE_CPUS:-1}
# A periodic tick in L1 (LANE_L1_TICK to change): with one vCPU, L1 was once found halted
# with interrupts on and no heartbeat (a one-shot timer interrupt lost by TCG leaves a
# tickless idle CPU asleep for good); QEMU re-arms a periodic APIC timer by itself.
L1_TICK=${LANE_L1_TICK-nohz=off highres=off}
BOOT_TIMEOUT=${LANE_BOOT_TIMEOUT:-300}
RUN_TIMEOUT=${LANE_TIMEOUT:-3600}
SHUTDOWN_TIMEOUT=${LANE_SHUTDOWN_TIMEOUT:-60}
STALL_TIMEOUT=${LANE_STALL_TIMEOUT:-180}
ACCEL=${LANE_ACCEL:-tcg}
QEMU=${LANE_QEMU:-qemu-system-x86_64}
# Debian's generic flavour: the cloud flavour has kvm_amd but no 9p.
META_PACKAGE=linux-image-amd64
# Loaded in L1 with their dependencies, in dependency order. Beyond the lane's own needs
# (virtio PCI, 9p, overlay, the virtio-serial ports, kvm_amd): what the suites and
# networking use (tun/tap, veth, bridge, tc ingress redirect, vhost), fuse, and the
# netfilter that Debian's iptables (nft) needs for CNI's bridge/portmap/firewall plugins.
MODULES=(virtio_pci virtio_console 9pnet_virtio 9p overlay kvm-amd
    tun veth bridge vhost_net vhost_vsock fuse sch_ingress act_mirred cls_u32 cls_matchall
    nf_tables nft_compat nft_chain_nat nft_masq nft_fib_inet nft_fib_ipv4 nft_ct
    xt_nat xt_MASQUERADE xt_conntrack xt_comment xt_multiport xt_mark xt_addrtype xt_tcpudp
    br_netfilter)

say() { echo "kvm-lane: $*" >&2; }
die() { say "$*"; exit 125; }

# --- the cache -------------------------------------------------------------------------

# Prints the module files (dependencies first) the L1 initramfs loads for kernel $1.
module_files() {
    local root=$1 kv=$2 m
    for m in "${MODULES[@]}"; do
        modprobe -d "$root" -S "$kv" --show-depends "$m" || return 1
    done | awk '$1 == "insmod" { print $2 }' | awk '!seen[$0]++'
}

# Checks the cached kernel $1: image, module index and every module file the lane loads.
# Prints what is wrong and fails; prints nothing and succeeds if all is there.
verify_kernel() {
    local kv=$1 root=$CACHE/$1 f n=0
    [[ -s $root/boot/vmlinuz-$kv ]] || { echo "$root/boot/vmlinuz-$kv missing"; return 1; }
    [[ -s $root/lib/modules/$kv/modules.dep ]] ||
        { echo "$root/lib/modules/$kv/modules.dep missing"; return 1; }
    command -v modprobe >/dev/null || { echo "modprobe missing (apt package kmod)"; return 1; }
    local files
    files=$(module_files "$root" "$kv" 2>&1) || { echo "module lookup: $files"; return 1; }
    for f in $files; do
        [[ -s $f ]] || { echo "module $f missing"; return 1; }
        n=$((n + 1))
    done
    ((n >= ${#MODULES[@]})) || { echo "only $n module files for ${#MODULES[@]} modules"; return 1; }
}

# The L1 /init (busybox sh): modules, the host root as overlay lower, the control files,
# then switch_root to the overlay where the run's stage2.sh becomes PID 1.
L1_INIT='#!/bin/sh
PATH=/bin
fail() {
    echo "LANE-INIT-FAILED: $*"
    echo o > /proc/sysrq-trigger
    sleep 60
}
mount -t proc proc /proc && mount -t sysfs sysfs /sys && mount -t devtmpfs dev /dev ||
    fail "mount proc, sys, dev"
# Module options from the kernel command line (name.option=value), as modprobe would
# apply them (LANE_L1_CMDLINE): insmod does not read them itself.
for m in /mods/*.ko; do
    name=$(basename "$m" .ko | sed "s/^[0-9]*-//; s/-/_/g")
    opts=$(tr " " "\n" </proc/cmdline | sed -n "s/^$name\.//p")
    # shellcheck disable=SC2086
    insmod "$m" $opts || echo "lane-init: insmod $m $opts failed"
done
[ -e /dev/kvm ] || fail "no /dev/kvm after loading kvm_amd (svm: $(grep -c -w svm /proc/cpuinfo) cpus)"
ctl=$(sed -n "s/.*lane_ctl=\([^ ]*\).*/\1/p" /proc/cmdline)
[ -n "$ctl" ] || fail "no lane_ctl= on the kernel command line"
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /host ||
    fail "mount the host root (9p hostroot)"
mount -t tmpfs -o size=80%,mode=0755 rw /rw && mkdir -p /rw/u /rw/w || fail "tmpfs for the overlay"
mount -t overlay overlay -o lowerdir=/host,upperdir=/rw/u,workdir=/rw/w /newroot ||
    fail "overlay of the host root"
mount -t tmpfs -o mode=0755 run /newroot/run && mkdir -p /newroot/run/lane || fail "tmpfs on /run"
cp "/host$ctl/stage2.sh" "/host$ctl/run.sh" /newroot/run/lane/ || fail "copy $ctl/stage2.sh, run.sh"
for p in /sys/class/virtio-ports/*; do
    [ -e "$p/name" ] && ln -s "/dev/${p##*/}" "/newroot/run/lane/$(cat "$p/name")"
done
for p in lane.stdout lane.stderr lane.status; do
    [ -e "/newroot/run/lane/$p" ] || fail "virtio-serial port $p missing"
done
for d in proc sys dev; do
    mount --move "/$d" "/newroot/$d" || fail "move /$d"
done
exec switch_root /newroot /bin/bash /run/lane/stage2.sh
fail "switch_root to the overlay"
'

# Builds (if needed) the L1 initramfs for kernel $1 and prints its path. Its name carries a
# hash of /init, the module list and busybox, so a change to any of them builds a new one.
initramfs() {
    local kv=$1 root=$CACHE/$1 files key out tmp n=0 m
    files=$(module_files "$root" "$kv") || die "prepare: module lookup for $kv failed"
    key=$( { echo "$L1_INIT"; echo "$files"; sha256sum </bin/busybox; } | sha256sum | cut -c1-16)
    out=$root/l1-initramfs-$key.cpio.gz
    if [[ -s $out ]] && gzip -t "$out" 2>/dev/null; then
        echo "$out"
        return
    fi
    [[ -x /bin/busybox ]] || die "prepare: /bin/busybox missing (apt package busybox-static)"
    tmp=$(mktemp -d "$root/.initramfs.XXXXXX")
    mkdir -p "$tmp"/{bin,proc,sys,dev,mods,host,newroot,rw}
    cp /bin/busybox "$tmp/bin/"
    for a in sh mount insmod mkdir switch_root sed grep cat cp ln sleep echo; do
        ln -s busybox "$tmp/bin/$a"
    done
    for m in $files; do
        n=$((n + 1))
        cp "$m" "$tmp/mods/$(printf %02d "$n")-$(basename "$m")"
    done
    printf '%s' "$L1_INIT" >"$tmp/init"
    chmod +x "$tmp/init"
    (cd "$tmp" && find . | cpio -o -H newc 2>/dev/null | gzip -1 >"$tmp.cpio.gz")
    rm -rf "$tmp"
    mv "$tmp.cpio.gz" "$out"
    echo "$out"
}

prepare() {
    [[ $(id -u) == 0 ]] || die "prepare: must run as root"
    command -v depmod >/dev/null || die "prepare: depmod missing (apt package kmod)"
    mkdir -p "$CACHE"
    local pkg kv root tmp why
    pkg=$(apt-cache depends "$META_PACKAGE" 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
    [[ -n $pkg ]] || die "prepare: apt-cache depends $META_PACKAGE names no kernel (apt-get update?)"
    kv=${pkg#linux-image-}
    root=$CACHE/$kv
    if why=$(verify_kernel "$kv"); then
        say "L1 kernel $kv cached in $root"
    else
        say "fetching the L1 kernel $pkg (cache: $root; ${why:-empty})"
        rm -rf "$root"
        tmp=$(mktemp -d "$CACHE/.fetch.XXXXXX")
        (cd "$tmp" && apt-get download -q "$pkg" >/dev/null 2>&1) ||
            (apt-get update -qq && cd "$tmp" && apt-get download -q "$pkg" >/dev/null) ||
            { rm -rf "$tmp"; die "prepare: apt-get download $pkg failed"; }
        dpkg -x "$tmp"/"$pkg"_*.deb "$tmp/root" || { rm -rf "$tmp"; die "prepare: dpkg -x $pkg failed"; }
        rm -rf "$tmp/root/usr/share/doc"
        depmod -b "$tmp/root" "$kv" || { rm -rf "$tmp"; die "prepare: depmod $kv failed"; }
        mv "$tmp/root" "$root"
        rm -rf "$tmp"
        why=$(verify_kernel "$kv") || die "prepare: the fetched kernel fails its check: $why"
    fi
    echo "$kv" >"$CACHE/current.tmp" && mv "$CACHE/current.tmp" "$CACHE/current"
    say "L1 initramfs $(initramfs "$kv")"
}

# The prepared kernel version, verified (what every run does first).
current_kernel() {
    local kv why
    [[ -s $CACHE/current ]] ||
        die "check: the lane is not prepared ($CACHE/current missing): run \`make deps\` or \`$0 --prepare\`"
    kv=$(cat "$CACHE/current")
    why=$(verify_kernel "$kv") ||
        die "check: the cached L1 kernel $kv is broken ($why): run \`make deps\` or \`$0 --prepare\`"
    echo "$kv"
}

# --- a run -------------------------------------------------------------------------------

# Becomes PID 1 in L1 (host bash, on the overlay): the mounts the suites expect, then CMD
# with its output on the two ports, then its status on the third, then power off.
STAGE2='#!/bin/bash
exec 9>/run/lane/lane.status
step() { echo "LANE-STEP $*" >&9; }
fail() { echo "LANE-FAILED $*" >&9; echo "LANE-FAILED: $*" >/dev/console; echo o >/proc/sysrq-trigger; sleep 60; }
step mounts
mkdir -p /dev/shm /dev/mqueue && mount -t tmpfs -o mode=1777 shm /dev/shm || fail "tmpfs on /dev/shm"
mkdir -p /dev/pts && mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts /dev/pts &&
    ln -sf pts/ptmx /dev/ptmx || fail "devpts"
mount -t cgroup2 cgroup2 /sys/fs/cgroup || fail "cgroup2 on /sys/fs/cgroup"
mount -t mqueue mqueue /dev/mqueue 2>/dev/null || true
if ! grep -q "^# lane: host /tmp" /run/lane/run.sh; then
    mount -t tmpfs -o mode=1777 tmp /tmp || fail "tmpfs on /tmp"
fi
mkdir -p /srv/vessel/jail /run/vessel /var/tmp || fail "mkdir /srv/vessel/jail /run/vessel"
hostname vessel-lane
ip link set lo up || fail "loopback up"
step start "$(cut -d" " -f1 /proc/uptime)"
# The heartbeat: the host tells a slow L1 from a wedged one by it.
(while sleep 10; do echo "LANE-BEAT $(cut -d" " -f1 /proc/uptime)" >&9; done) &
/bin/bash /run/lane/run.sh </dev/null >/run/lane/lane.stdout 2>/run/lane/lane.stderr &
wait $!
echo "LANE-EXIT $?" >&9
exec 9>&-
echo o >/proc/sysrq-trigger
sleep 60
'

# The environment CMD gets: fixed names, prefixes, and LANE_ENV.
carried_env() {
    local name
    {
        for name in PATH HOME CI LANG LC_ALL TZ TERM USER LOGNAME ${LANE_ENV:-}; do echo "$name"; done
        compgen -e | grep -E '^(VESSEL|RUST|CARGO)_' || true
    } | sort -u | while read -r name; do
        if [[ -n $name && ${!name+set} == set ]]; then printf 'export %s=%q\n' "$name" "${!name}"; fi
    done
}

run() {
    local kv initrd ctl qpid rc=125 started finished start_at line
    kv=$(current_kernel)
    initrd=$(initramfs "$kv")
    command -v "$QEMU" >/dev/null || die "check: $QEMU missing (apt package qemu-system-x86)"
    ctl=$(mktemp -d "${TMPDIR:-/tmp}/vessel-lane.XXXXXX")
    qpid=
    # shellcheck disable=SC2064
    trap "lane_cleanup '$ctl'" EXIT
    trap 'say "interrupted"; exit 130' INT TERM
    printf '%s' "$STAGE2" >"$ctl/stage2.sh"
    {
        echo "#!/bin/bash"
        carried_env
        case $PWD in
            /tmp | /tmp/*) echo "# lane: host /tmp (the working directory is under /tmp)" ;;
        esac
        printf 'cd %q || exit 125\n' "$PWD"
        printf 'exec'
        printf ' %q' "$@"
        echo
    } >"$ctl/run.sh"
    : >"$ctl/stdout"; : >"$ctl/stderr"; : >"$ctl/status"; : >"$ctl/console"

    start_at=$SECONDS
    "$QEMU" -accel "$ACCEL" -cpu max -m "$MEM_MIB" -smp "$CPUS" -nodefaults -no-user-config \
        -display none -monitor "unix:$ctl/monitor.sock,server=on,wait=off" -no-reboot \
        -serial "file:$ctl/console" \
        -kernel "$CACHE/$kv/boot/vmlinuz-$kv" -initrd "$initrd" \
        -append "console=ttyS0 quiet panic=-1 $L1_TICK lane_ctl=$ctl ${LANE_L1_CMDLINE:-}" \
        -virtfs local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,multidevs=remap \
        -device virtio-serial-pci,id=ports \
        -chardev "file,id=out,path=$ctl/stdout" -device virtserialport,bus=ports.0,chardev=out,name=lane.stdout \
        -chardev "file,id=err,path=$ctl/stderr" -device virtserialport,bus=ports.0,chardev=err,name=lane.stderr \
        -chardev "file,id=st,path=$ctl/status" -device virtserialport,bus=ports.0,chardev=st,name=lane.status \
        </dev/null >"$ctl/qemu.log" 2>&1 &
    qpid=$!
    tail -q -c +1 -s 0.2 -f --pid="$qpid" "$ctl/stdout" &
    tail -q -c +1 -s 0.2 -f --pid="$qpid" "$ctl/stderr" >&2 &

    # Boot: QEMU start to CMD start.
    started=
    while ((SECONDS - start_at < BOOT_TIMEOUT)); do
        if grep -q '^LANE-STEP start' "$ctl/status"; then started=1; break; fi
        lane_dead "$ctl" && break
        sleep 0.2
    done
    if [[ -z $started ]]; then
        lane_dead "$ctl" && lane_fail "$ctl" "boot" "L1 stopped before it started the command"
        lane_fail "$ctl" "boot" "L1 did not start the command within ${BOOT_TIMEOUT} s (LANE_BOOT_TIMEOUT)"
    fi
    [[ ${LANE_VERBOSE:-0} == 1 ]] &&
        say "L1 ($kv, ${MEM_MIB} MiB, $CPUS vCPUs) started the command $((SECONDS - start_at)) s after QEMU ($(awk '/^LANE-STEP start/ { print $3 }' "$ctl/status") s L1 uptime)"

    # The command.
    local cmd_at=$SECONDS
    finished=
    local size seen=-1 alive_at=$SECONDS
    while ((SECONDS - cmd_at < RUN_TIMEOUT)); do
        if grep -q '^LANE-EXIT' "$ctl/status"; then finished=1; break; fi
        lane_dead "$ctl" && break
        size=$(stat -c %s "$ctl/status")
        if ((size != seen)); then
            seen=$size alive_at=$SECONDS
        elif ((SECONDS - alive_at > STALL_TIMEOUT)); then
            say "L1 vCPUs (QEMU monitor):"
            vcpu_state "$ctl" >&2 || say "(the monitor did not answer)"
            lane_fail "$ctl" "command" "L1 is wedged: no heartbeat for ${STALL_TIMEOUT} s (LANE_STALL_TIMEOUT), $((SECONDS - cmd_at)) s into the command" 125
        fi
        sleep 0.2
    done
    if [[ -z $finished ]]; then
        if lane_dead "$ctl"; then
            grep -q '^LANE-EXIT' "$ctl/status" && finished=1
        else
            lane_fail "$ctl" "command" "the command did not finish within ${RUN_TIMEOUT} s (LANE_TIMEOUT)" 124
        fi
    fi
    [[ -n $finished ]] || lane_fail "$ctl" "command" "L1 stopped before the command finished"
    line=$(grep '^LANE-EXIT' "$ctl/status" | head -1)
    rc=${line#LANE-EXIT }
    [[ $rc =~ ^[0-9]+$ ]] || lane_fail "$ctl" "command" "bad status line: $line"
    [[ ${LANE_VERBOSE:-0} == 1 ]] && say "command exited $rc after $((SECONDS - cmd_at)) s"

    # Shutdown: L1 powers itself off after the status.
    local down_at=$SECONDS
    while ! lane_dead "$ctl" && ((SECONDS - down_at < SHUTDOWN_TIMEOUT)); do sleep 0.2; done
    if ! lane_dead "$ctl"; then
        say "L1 did not power off within ${SHUTDOWN_TIMEOUT} s; stopping QEMU"
        kill "$qpid" 2>/dev/null || true
    fi
    wait "$qpid" 2>/dev/null || true
    qpid=
    wait  # the two tails, which end with QEMU
    exit "$rc"
}

lane_dead() { [[ -z $qpid ]] || ! kill -0 "$qpid" 2>/dev/null; }

# Prints where each L1 vCPU is (QEMU's `info cpus` and the main registers), read from the
# monitor socket with a bounded wait.
vcpu_state() {
    timeout 20 python3 - "$1/monitor.sock" <<'PY'
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
out = b""
for cmd in (b"info cpus\n", b"info registers -a\n"):
    s.sendall(cmd)
    end = time.time() + 5
    while time.time() < end:
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            break
        if not chunk:
            break
        out += chunk
keep = ("CPU", "RIP", "RAX", "RSP", "CS ", "CR0", "EFER", "HLT")
for line in out.decode(errors="replace").splitlines():
    line = line.strip("\r")
    if line.lstrip("* ").startswith(keep) or "thread_id" in line:
        print("  " + line)
PY
}

# Reports a failed step with the L1 console's tail, stops QEMU, exits $4 (125).
lane_fail() {
    local ctl=$1 step=$2 msg=$3 code=${4:-125}
    if [[ -n $qpid ]]; then
        kill "$qpid" 2>/dev/null || true
        wait "$qpid" 2>/dev/null || true
    fi
    qpid=
    wait 2>/dev/null || true
    say "step '$step' failed: $msg"
    local last
    last=$(grep '^LANE-STEP\|^LANE-FAILED' "$ctl/status" | tail -1)
    [[ -n $last ]] && say "last L1 step: $last"
    [[ -s $ctl/qemu.log ]] && { say "QEMU said:"; tail -n 20 "$ctl/qemu.log" >&2; }
    # A kernel oops or panic is shown whole (from its first line, at most 150 lines);
    # otherwise the console's last 40 lines.
    local first
    first=$(grep -n -m1 -E 'BUG:|Oops|general protection|Kernel panic|WARNING:|watchdog:|rcu: INFO' "$ctl/console" | cut -d: -f1)
    if [[ -n $first ]]; then
        say "L1 console (from line $first, the first kernel error):"
        tail -n "+$first" "$ctl/console" | head -n 150 | tr -d '\r' >&2
        say "L1 console (last 10 lines):"
        tail -n 10 "$ctl/console" | tr -d '\r' >&2
    else
        say "L1 console (last 40 lines):"
        tail -n 40 "$ctl/console" | tr -d '\r' >&2
    fi
    exit "$code"
}

lane_cleanup() {
    if [[ -n ${qpid:-} ]]; then
        kill "$qpid" 2>/dev/null || true
        wait "$qpid" 2>/dev/null || true
    fi
    rm -rf "$1"
}

case ${1:-} in
    --prepare) prepare ;;
    --check) kv=$(current_kernel) && say "L1 kernel $kv OK, initramfs $(initramfs "$kv")" ;;
    "" | -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
    *) run "$@" ;;
esac
