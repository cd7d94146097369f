#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ (docs/threat-model.md, "Fuzzing") for
# FUZZ_SECONDS each and prints a table: target, executions, exec/s, corpus size,
# crashes. Exits non-zero if any target crashed (a panic, a sanitizer report, a hang
# past FUZZ_TIMEOUT s or memory past FUZZ_RSS_MB), naming the reproducer under
# fuzz/artifacts/<target>/ (replay: fuzz/target/x86_64-unknown-linux-gnu/release/<target> <file>).
#
#   scripts/fuzz.sh          make fuzz:    600 s a target, AddressSanitizer
#   scripts/fuzz.sh --ci     make fuzz-ci: 30 s a target, no sanitizer (debug assertions
#                            and overflow checks stay on): the build fits the CI budget
#   --build-only             builds the targets and runs none (make fuzz-ci-build)
# Env: FUZZ_SECONDS, FUZZ_SANITIZER (address|none), FUZZ_TARGETS (space-separated subset),
#      FUZZ_JOBS (targets run at once: one per CPU),
#      FUZZ_TIMEOUT (s per input, 10), FUZZ_RSS_MB (2048).
# The committed seeds are fuzz/corpus/<target>/ (read only); what a run finds goes to
# fuzz/corpus-work/<target>/ (not committed), which later runs start from.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

ci=0
build_only=0
for arg in "$@"; do
    case $arg in
    --ci) ci=1 ;;
    --build-only) build_only=1 ;;
    *) echo "fuzz: unknown argument $arg (--ci, --build-only)" >&2; exit 2 ;;
    esac
done
if ((ci)); then
    seconds=${FUZZ_SECONDS:-30}
    sanitizer=${FUZZ_SANITIZER:-none}
    # 16 codegen units (cargo-fuzz's default is 1) and opt-level 1: a much shorter
    # build for slightly slower targets; the whole of make fuzz-ci must fit the CI budget.
    build_opts=(--codegen-units 16)
    export CARGO_PROFILE_RELEASE_OPT_LEVEL=${CARGO_PROFILE_RELEASE_OPT_LEVEL:-1}
else
    seconds=${FUZZ_SECONDS:-600}
    sanitizer=${FUZZ_SANITIZER:-address}
    build_opts=()
fi
timeout_s=${FUZZ_TIMEOUT:-10}
rss_mb=${FUZZ_RSS_MB:-2048}

# cargo-fuzz comes from scripts/install-deps.sh (make deps), into
# $VESSEL_TOOLS_PREFIX/bin or /usr/local/bin.
export PATH=${VESSEL_TOOLS_PREFIX:-/usr/local}/bin:/usr/local/bin:$HOME/.cargo/bin:$PATH
say() { echo "fuzz: $*" >&2; }
if ! cargo fuzz --version >/dev/null 2>&1; then
    say "cargo-fuzz not found: run make deps (scripts/install-deps.sh)"
    exit 1
fi
if ! cargo +nightly --version >/dev/null 2>&1; then
    say "cargo-fuzz needs a nightly toolchain (rustup toolchain install nightly)"
    exit 1
fi

cd fuzz
targets=${FUZZ_TARGETS:-$(cargo fuzz list)}
start=$SECONDS
say "building $(wc -w <<<"$targets") targets (sanitizer: $sanitizer)"
if [[ -n ${FUZZ_TARGETS:-} ]]; then
    for t in $targets; do
        CARGO_INCREMENTAL=0 cargo +nightly fuzz build "${build_opts[@]}" -s "$sanitizer" "$t" >&2
    done
else
    CARGO_INCREMENTAL=0 cargo +nightly fuzz build "${build_opts[@]}" -s "$sanitizer" >&2
fi
say "built in $((SECONDS - start)) s"
((build_only)) && exit 0
bin=$root/fuzz/target/x86_64-unknown-linux-gnu/release

# One target's run: its row (or its failure) goes to $results/<target>.{row,failed}.
run_target() {
    local t=$1 work art seeds log before rc=0 execs rate corpus new crashes
    work=$root/fuzz/corpus-work/$t
    art=$root/fuzz/artifacts/$t
    seeds=$root/fuzz/corpus/$t
    mkdir -p "$work" "$art" "$seeds"
    log=$root/fuzz/artifacts/$t.log
    before=$(ls -1 "$art")
    say "$t: $seconds s"
    "$bin/$t" "$work" "$seeds" -max_total_time="$seconds" -timeout="$timeout_s" \
        -rss_limit_mb="$rss_mb" -artifact_prefix="$art/" -print_final_stats=1 \
        >"$log" 2>&1 || rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    corpus=$(grep -oE 'corp: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+' || true)
    new=$(comm -13 <(echo "$before") <(ls -1 "$art") | sed "s|^|$art/|")
    crashes=$(grep -c . <<<"$new" || true)
    if ((rc != 0)); then
        ((crashes > 0)) || crashes=1
        echo "$t: exit $rc, log $log${new:+, reproducer(s): $(echo $new)}" >"$results/$t.failed"
    fi
    printf '%-16s %12s %10s %8s %8s\n' "$t" "${execs:-?}" "${rate:-?}" "${corpus:-?}" "$crashes" >"$results/$t.row"
}

# A libFuzzer run is one thread: FUZZ_JOBS targets (one per CPU by default) run at once,
# each for its full FUZZ_SECONDS.
jobs=${FUZZ_JOBS:-$(nproc)}
results=$(mktemp -d)
trap 'rm -rf "$results"' EXIT
running=0
for t in $targets; do
    if ((running >= jobs)); then
        wait -n || true
        running=$((running - 1))
    fi
    run_target "$t" &
    running=$((running + 1))
done
wait
failed=()
rows=()
for t in $targets; do
    [[ -s $results/$t.row ]] || echo "$t: no result (its run did not finish)" >"$results/$t.failed"
    [[ -s $results/$t.failed ]] && failed+=("$(cat "$results/$t.failed")")
    rows+=("$(cat "$results/$t.row" 2>/dev/null || printf '%-16s %12s' "$t" '?')")
done

printf '%-16s %12s %10s %8s %8s\n' target executions exec/s corpus crashes
printf '%s\n' "${rows[@]}"
echo "fuzz: $(wc -w <<<"$targets") targets, $seconds s each ($jobs at once), sanitizer $sanitizer, $((SECONDS - start)) s in all"
if ((${#failed[@]})); then
    for f in "${failed[@]}"; do say "CRASH $f"; done
    exit 1
fi
