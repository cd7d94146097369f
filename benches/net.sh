#!/usr/bin/env bash
# make bench-net: network throughput and latency of a Vessel container next to
# a runc container, in one run. Each container gets a network namespace made
# here (`ip netns` + a veth pair, as crates/cli/tests/network.rs does) and runs
# busybox httpd and Debian's iperf3 (copied into the rootfs with its
# libraries). From the host: iperf3 TCP both ways (median of RUNS runs of
# IPERF_SECONDS each, interleaved) and 1,000 sequential HTTP requests (median,
# p99). Everything it makes (namespaces, veths, taps, containers) goes at exit.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
runs=${RUNS:-5}
seconds=${IPERF_SECONDS:-5}
requests=${REQUESTS:-1000}
vessel=${VESSEL:-$root/target/release/vessel}
work=$(mktemp -d /tmp/vessel-bench-net.XXXXXX)
tag=$(( $$ % 100000 ))
ns_v=vessel-bench-v$tag ns_r=vessel-bench-r$tag
veth_v=vbv$tag veth_r=vbr$tag
net_v=10.251.$(( $$ % 100 + 1 )) net_r=10.252.$(( $$ % 100 + 1 ))

cleanup() {
    local rc=$?
    if [[ $rc != 0 ]]; then
        for f in "$work"/*.out "$work"/*.err; do
            [[ -s $f ]] && { echo "--- $f (last lines)"; tail -n 20 "$f"; }
        done >&2
    fi
    "$vessel" --root "$work/vroot" delete --force vnet 2>/dev/null || true
    runc --root "$work/rroot" delete --force rnet 2>/dev/null || true
    ip link del "$veth_v" 2>/dev/null || true
    ip link del "$veth_r" 2>/dev/null || true
    ip netns del "$ns_v" 2>/dev/null || true
    ip netns del "$ns_r" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

for t in iperf3 runc ip; do
    command -v $t >/dev/null || { echo "bench-net: $t missing (make deps)" >&2; exit 1; }
done
if ! report=$("$vessel" check); then
    echo "$report"; echo "bench-net: vessel check failed (is VESSEL_CONFIG set? run via make bench-net)" >&2; exit 1
fi
accel=$(sed -n "s/^accelerator: *\([a-z]*\).*/\1/p" <<<"$report")

# One rootfs for both: busybox, iperf3 and the libraries it links.
"$root/tests/support/busybox-bundle.sh" "$work/base" "$vessel" >/dev/null
rootfs=$work/base/rootfs
for f in /usr/bin/iperf3 $(ldd /usr/bin/iperf3 | grep -o '/[^ ]*'); do
    mkdir -p "$rootfs$(dirname "$f")"
    cp -L "$f" "$rootfs$f"
done
mkdir -p "$rootfs/www"
head -c 612 /dev/zero | tr '\0' x > "$rootfs/www/index.html"

# A namespace with eth0 = <net>.2/24 (default route via <net>.1, the host end).
mknet() {
    local ns=$1 veth=$2 net=$3
    ip netns add "$ns"
    ip link add "$veth" type veth peer name eth0 netns "$ns"
    ip addr add "$net.1/24" dev "$veth"
    ip link set "$veth" up
    ip -n "$ns" addr add "$net.2/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    ip -n "$ns" route add default via "$net.1"
}
mknet "$ns_v" "$veth_v" "$net_v"
mknet "$ns_r" "$veth_r" "$net_r"

commit=$(git -C "$root" rev-parse --short HEAD)$(git -C "$root" diff --quiet HEAD -- crates benches || echo -dirty)
python3 "$root/benches/net_bench.py" --vessel "$vessel" --work "$work" --rootfs "$rootfs" \
    --vessel-netns "/var/run/netns/$ns_v" --vessel-ip "$net_v.2" \
    --runc-netns "/var/run/netns/$ns_r" --runc-ip "$net_r.2" \
    --runs "$runs" --seconds "$seconds" --requests "$requests" --accel "$accel" --commit "$commit"
