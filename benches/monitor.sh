#!/usr/bin/env bash
# make bench-monitor: scrape time of `vessel monitor` with N (20) running sandboxes
# (busybox `sleep`, one microVM each), median of SCRAPES (20) scrapes, and the
# accelerator that produced it (docs/monitoring.md). Not part of `make test`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
vessel=${VESSEL:-$root/target/release/vessel}
work=$(mktemp -d /tmp/vessel-bench-monitor.XXXXXX)
trap 'rm -rf "$work"' EXIT

"$root/tests/support/busybox-bundle.sh" "$work/bundle" "$vessel" -- sleep 3600 >/dev/null
if ! report=$("$vessel" check); then
    echo "$report"; echo "bench-monitor: vessel check failed (is VESSEL_CONFIG set? run via make bench-monitor)" >&2; exit 1
fi
accel=$(sed -n "s/^accelerator: *\([a-z]*\).*/\1/p" <<<"$report")
python3 "$root/benches/monitor_bench.py" "$vessel" "$work" "${SANDBOXES:-20}" "${SCRAPES:-20}" "$accel"
