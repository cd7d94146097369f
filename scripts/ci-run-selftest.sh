#!/usr/bin/env bash
# Self-test of .ci/run's own logic (part of `make lint`, about a second): runs a copy of
# .ci/run in a scratch tree where `make` and scripts/install-deps.sh are stubs, and checks
# that it exits with make test's status (0 on a green run, 2 when make test exits 2)
# and removes its fresh /var/tmp/vessel-ci.* directory either way. The CI of 2026-12-06
# passed every step and still exited 1: the EXIT trap's `kill` of the reaped helpers job
# failed under `set -e`, and the trap never reached its `rm -rf`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/repo/.ci" "$scratch/repo/scripts" "$scratch/bin"
cp "$root/.ci/run" "$scratch/repo/.ci/run"
cat >"$scratch/repo/scripts/install-deps.sh" <<'STUB'
#!/usr/bin/env bash
mkdir -p "$VESSEL_TOOLS_PREFIX/bin"
for t in virtiofsd vhost-device-vsock cargo-fuzz; do
    printf '#!/bin/sh\nexit 0\n' >"$VESSEL_TOOLS_PREFIX/bin/$t"
    chmod +x "$VESSEL_TOOLS_PREFIX/bin/$t"
done
STUB
cat >"$scratch/bin/make" <<'STUB'
#!/bin/sh
# Records where the run's fresh directory is, and fails `make test` on request.
[ "$1" = test ] && { dirname "$VESSEL_CACHE_DIR" >"$SELFTEST_FRESH"; exit "${SELFTEST_RC:-0}"; }
exit 0
STUB
chmod +x "$scratch/repo/scripts/install-deps.sh" "$scratch/bin/make"

fail=0
for want in 0 2; do
    rc=0
    (cd "$scratch/repo" && PATH=$scratch/bin:$PATH SELFTEST_RC=$want \
        SELFTEST_FRESH=$scratch/fresh bash .ci/run >"$scratch/log" 2>&1) || rc=$?
    fresh=$(cat "$scratch/fresh")
    if ((rc != want)); then
        echo "ci-run-selftest: make test exited $want, .ci/run exited $rc" >&2
        cat "$scratch/log" >&2
        fail=1
    fi
    if [[ -e $fresh ]]; then
        echo "ci-run-selftest: .ci/run left $fresh behind (make test exited $want)" >&2
        rm -rf "$fresh"
        fail=1
    fi
done
((fail == 0)) && echo "ci-run-selftest: .ci/run exits with make test's status (0, 2) and removes its fresh directory"
exit "$fail"
