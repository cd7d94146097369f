#!/usr/bin/env bash
# `make test`: runs `MAKE STEP` for each STEP in turn, stopping at the first failure, and
# prints how long each took (and the total), so a CI run's time budget can be read off its
# log.   Usage: scripts/timed-steps.sh MAKE -- STEP...
#
# A STEP written `name&` runs in the background at nice 19 beside the steps after it (its
# output goes to a file, printed when it ends): for a step that fills CPU time the others
# leave idle, e.g. the single-threaded fuzzers beside the end-to-end tests, which wait on
# their guests. Background steps are waited for at the end, and a failed one fails the run.
set -uo pipefail
make=$1
shift
[[ ${1:-} == -- ]] && shift
rows=()
start=$SECONDS
logs=$(mktemp -d)
bg_names=()
bg_pids=()
bg_starts=()
cleanup() {
    local p
    for p in "${bg_pids[@]}"; do kill -- "-$p" 2>/dev/null || kill "$p" 2>/dev/null; done
    rm -rf "$logs"
}
trap cleanup EXIT
report() {
    echo
    echo "make test: step times ($(nproc) CPUs; & = in the background, beside the next steps)"
    printf '  %-16s %7s  %s\n' step seconds result
    printf '%s\n' "${rows[@]}"
    printf '  %-16s %7s\n' total "$((SECONDS - start))"
}
row() { rows+=("$(printf '  %-16s %7s  %s' "$1" "$2" "$( (($3 == 0)) && echo ok || echo "FAILED (exit $3)")")"); }
# Waits for every background step; prints its output; returns the first failure's code.
join_background() {
    local i rc first=0
    for i in "${!bg_pids[@]}"; do
        rc=0
        wait "${bg_pids[$i]}" || rc=$?
        echo "make test: [${bg_names[$i]}&] ended, its output:"
        cat "$logs/${bg_names[$i]}.log"
        row "${bg_names[$i]}&" "$((SECONDS - bg_starts[i]))" "$rc"
        ((rc == 0 || first != 0)) || first=$rc
    done
    bg_pids=()
    return "$first"
}
rc=0
for step in "$@"; do
    t0=$SECONDS
    if [[ $step == *'&' ]]; then
        name=${step%&}
        echo "make test: [$name&] started $(date -u +%H:%M:%S) in the background (nice 19), output at its end"
        # Its own process group (job control), so that a failure elsewhere can stop all of
        # it; the same session, so that its nice value counts against the other steps
        # (a new session would get its own scheduler autogroup and an equal CPU share).
        set -m
        nice -n 19 "$make" --no-print-directory "$name" >"$logs/$name.log" 2>&1 &
        set +m
        bg_names+=("$name")
        bg_pids+=("$!")
        bg_starts+=("$t0")
        continue
    fi
    echo "make test: [$step] started $(date -u +%H:%M:%S)"
    "$make" --no-print-directory "$step" || rc=$?
    row "$step" "$((SECONDS - t0))" "$rc"
    if ((rc != 0)); then
        for i in "${!bg_pids[@]}"; do
            rows+=("$(printf '  %-16s %7s  %s' "${bg_names[$i]}&" "$((SECONDS - bg_starts[i]))" "stopped: $step failed")")
        done
        report
        exit "$rc"
    fi
done
join_background || rc=$?
report
exit "$rc"
