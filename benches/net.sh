#!/usr/bin/env bash
# make bench-net: network throughput and request latency container<->host for
# Vessel (its own microVM, tap + tc redirect) next to runc (the namespace
# directly), in one run: iperf3 TCP host->container and container->host, and
# 1,000 sequential HTTP requests (busybox httpd in the container, one TCP
# connection each) from the host. Medians, Vessel/runc ratios, the accelerator.
# The namespace and veth are the bench's own (ip netns, 10.251.<n>.0/24).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
vessel=${VESSEL:-$root/target/release/vessel}
work=$(mktemp -d /tmp/vessel-bench-net.XXXXXX)
trap 'rm -rf "$work"' EXIT
for tool in iperf3 curl runc apt-get dpkg; do
    command -v "$tool" >/dev/null || { echo "bench-net: $tool missing (make deps)" >&2; exit 1; }
done

# The container: busybox plus Debian's iperf3 and the libraries it links.
"$root/tests/support/busybox-bundle.sh" "$work/bundle" "$vessel" -- true >/dev/null
mkdir -p "$work/debs"
chmod 755 "$work"
chown _apt "$work/debs" 2>/dev/null || true
(cd "$work/debs" && apt-get download -q iperf3 libiperf0 libsctp1 libssl3 libc6 libgcc-s1 >/dev/null)
for deb in "$work"/debs/*.deb; do dpkg -x "$deb" "$work/bundle/rootfs"; done

if ! report=$("$vessel" check); then
    echo "$report"; echo "bench-net: vessel check failed (is VESSEL_CONFIG set? run via make bench-net)" >&2; exit 1
fi
accel=$(sed -n "s/^accelerator: *\([a-z]*\).*/\1/p" <<<"$report")
python3 "$root/benches/net_bench.py" "$vessel" "$work" "$accel"
