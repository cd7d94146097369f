#!/usr/bin/env bash
# A private containerd 1.6 for end-to-end tests of containerd-shim-vessel-v2.
#
#   tests/support/containerd-harness.sh start DIR   # prints the socket path
#   tests/support/containerd-harness.sh stop DIR
#
# Everything lives in DIR: config.toml, root/, state/, containerd.sock, the log,
# the pid file. CRI is on with runtime `vessel` (runtime_type io.containerd.vessel.v2)
# and `runc`; `restrict_oom_score_adj = true` (no CAP_SYS_RESOURCE on these hosts).
# The busybox image (localhost/vessel-busybox:latest) and the pause image
# (localhost/vessel-pause:latest, the CRI sandbox image) are imported.
#
# Env: VESSEL_SHIM_DIR  directory holding containerd-shim-vessel-v2 (put first on
#                       containerd's PATH; default: target/debug of this checkout)
#      VESSEL_CONFIG    passed on to the shim through containerd's environment
#      VESSEL_IMAGE_DIR where the images are built and cached (default DIR/../images)
# Shim sockets land in /run/containerd/s/ whatever the state dir (MACHINE.md);
# `stop` removes the ones whose shims it killed.
set -euo pipefail

ACTION=${1:?usage: containerd-harness.sh start|stop DIR}
DIR=${2:?usage: containerd-harness.sh start|stop DIR}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
say() { echo "containerd-harness: $*" >&2; }

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
SOCK=$DIR/containerd.sock
PIDFILE=$DIR/containerd.pid

ctr_() { ctr -a "$SOCK" "$@"; }

start() {
    command -v containerd >/dev/null || { say "containerd missing (scripts/install-deps.sh)"; exit 1; }
    if [[ -f $PIDFILE ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        say "already running (pid $(cat "$PIDFILE"))"
        echo "$SOCK"
        return
    fi
    local shim_dir=${VESSEL_SHIM_DIR:-$REPO/target/debug}
    mkdir -p "$DIR/root" "$DIR/state" "$DIR/cni/conf" "$DIR/cni/bin"
    cat >"$DIR/config.toml" <<TOML
version = 2
root = "$DIR/root"
state = "$DIR/state"
oom_score = 0

[grpc]
  address = "$SOCK"

[ttrpc]
  address = "$SOCK.ttrpc"

[debug]
  level = "${CONTAINERD_LOG_LEVEL:-info}"

[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  sandbox_image = "localhost/vessel-pause:latest"
  enable_selinux = false
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    conf_dir = "$DIR/cni/conf"
    bin_dir = "$DIR/cni/bin"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.vessel]
      runtime_type = "io.containerd.vessel.v2"
      pod_annotations = ["io.katacontainers.*", "io.vessel.*"]
TOML
    say "starting containerd (shim from $shim_dir)"
    PATH="$shim_dir:$PATH" setsid containerd --config "$DIR/config.toml" \
        >"$DIR/containerd.log" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
    local deadline=$((SECONDS + 30))
    until ctr_ version >/dev/null 2>&1; do
        if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
            say "containerd exited; log:"; tail -20 "$DIR/containerd.log" >&2; exit 1
        fi
        ((SECONDS < deadline)) || {
            say "no socket after 30 s; log:"; tail -20 "$DIR/containerd.log" >&2
            kill -9 "$(cat "$PIDFILE")" 2>/dev/null || true
            exit 1
        }
        sleep 0.05
    done
    local images=${VESSEL_IMAGE_DIR:-$(dirname "$DIR")/images}
    "$HERE/busybox-image.sh" "$images" >/dev/null
    for ns in default k8s.io; do
        ctr_ -n "$ns" images import --no-unpack=false "$images/busybox-docker.tar" >/dev/null
        ctr_ -n "$ns" images import "$images/pause-docker.tar" >/dev/null
    done
    say "ready: $SOCK"
    echo "$SOCK"
}

# Shim processes started by this containerd (their -address names our socket).
our_shims() {
    local p
    for p in /proc/[0-9]*; do
        tr '\0' ' ' 2>/dev/null <"$p/cmdline" | grep -q -- "-address $SOCK " && basename "$p"
    done
    return 0
}

stop() {
    # CRI pods' network namespaces (containerd makes them under /var/run/netns
    # and removes them on StopPodSandbox, which a failed test never sent).
    local pod_netns=() ns id
    if [[ -S $SOCK ]] && [[ -f $PIDFILE ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        for id in $(ctr_ -n k8s.io containers ls -q 2>/dev/null); do
            pod_netns+=($(ctr_ -n k8s.io containers info "$id" 2>/dev/null \
                | grep -o '"/var/run/netns/cni-[0-9a-f-]*"' | tr -d '"' || true))
        done
        for ns in $(ctr_ namespaces ls -q 2>/dev/null); do
            for id in $(ctr_ -n "$ns" tasks ls -q 2>/dev/null); do
                ctr_ -n "$ns" tasks kill -a -s KILL "$id" >/dev/null 2>&1 || true
                timeout 10 ctr_ -n "$ns" tasks rm -f "$id" >/dev/null 2>&1 || true
            done
            for id in $(ctr_ -n "$ns" containers ls -q 2>/dev/null); do
                ctr_ -n "$ns" containers rm "$id" >/dev/null 2>&1 || true
            done
        done
    fi
    local shims
    shims=$(our_shims)
    if [[ -f $PIDFILE ]]; then
        local pid
        pid=$(cat "$PIDFILE")
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            local deadline=$((SECONDS + 10))
            while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.05; done
            kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    # A containerd of this DIR the pid file does not name (start interrupted).
    local p
    for p in /proc/[0-9]*; do
        if tr '\0' ' ' 2>/dev/null <"$p/cmdline" | grep -q -- "^containerd --config $DIR/config.toml "; then
            kill -9 "${p#/proc/}" 2>/dev/null || true
        fi
    done
    # Shims left behind (containerd did not get to delete them) and their sockets.
    local s
    for s in $shims; do
        local sock
        sock=$(tr '\0' '\n' 2>/dev/null <"/proc/$s/cmdline" | grep -A1 -x -- -socket | tail -1 || true)
        kill -9 "$s" 2>/dev/null || true
        [[ $sock == unix://* ]] && rm -f "${sock#unix://}"
    done
    # Deleting the namespace deletes the pod's end of CNI's veth, and so the
    # pair. Already gone after a clean StopPodSandbox.
    for ns in "${pod_netns[@]}"; do
        ip netns del "$(basename "$ns")" 2>/dev/null || true
    done
    # Mounts under DIR, deepest first.
    awk -v d="$DIR/" 'index($2, d) == 1 { print $2 }' /proc/self/mounts | sort -r | while read -r m; do
        umount -l "$m" 2>/dev/null || true
    done
    rm -rf "$DIR"
    say "stopped"
}

case $ACTION in
    start) start ;;
    stop) stop ;;
    *) say "unknown action $ACTION (start|stop)"; exit 2 ;;
esac
