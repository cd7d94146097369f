#!/usr/bin/env bash
# `make test`: runs `MAKE STEP` for each STEP in turn, stopping at the first failure, and
# prints how long each took (and the total), so a CI run's time budget can be read off its
# log.   Usage: scripts/timed-steps.sh MAKE -- STEP...
set -uo pipefail
make=$1
shift
[[ ${1:-} == -- ]] && shift
rows=()
start=$SECONDS
rc=0
report() {
    echo
    echo "make test: step times ($(nproc) CPUs)"
    printf '  %-16s %7s  %s\n' step seconds result
    printf '%s\n' "${rows[@]}"
    printf '  %-16s %7s\n' total "$((SECONDS - start))"
}
for step in "$@"; do
    t0=$SECONDS
    echo "make test: [$step] started $(date -u +%H:%M:%S)"
    "$make" --no-print-directory "$step" || rc=$?
    rows+=("$(printf '  %-16s %7s  %s' "$step" "$((SECONDS - t0))" "$( ((rc == 0)) && echo ok || echo "FAILED (exit $rc)")")")
    if ((rc != 0)); then
        report
        exit "$rc"
    fi
done
report
