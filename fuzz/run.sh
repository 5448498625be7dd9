#!/usr/bin/env bash
# Runs each cargo-fuzz target (all, or those named) for a while on nightly
# and fails on the first crash, whose input is left in fuzz/artifacts/.
#
#   fuzz/run.sh [target...]
#
#   FUZZ_SECONDS=60       time per target
#   FUZZ_SANITIZER=none   or address: the fuzzed code is safe Rust and the C
#                         under it (zstd) is not instrumented by rustc, so
#                         ASan would mostly cost speed
#   FUZZ_MERGE=1          afterwards, merge the inputs that reach new
#                         edges into the checked-in corpus (edges only, not
#                         hit counts or comparisons: that keeps it small)
#
# New inputs go to a scratch directory, so a run leaves fuzz/corpus alone
# unless FUZZ_MERGE=1. Debug assertions and overflow checks are on: an
# overflow on hostile input is a bug here, as in `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-60}
sanitizer=${FUZZ_SANITIZER:-none}
toolchain=${FUZZ_TOOLCHAIN:-nightly}

if ! cargo "+$toolchain" --version >/dev/null 2>&1; then
    echo "fuzzing needs a nightly toolchain: rustup toolchain install nightly" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install --locked cargo-fuzz
fi

fuzz() { cargo "+$toolchain" fuzz "$@"; }

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(fuzz list)
fi

echo "== building ${targets[*]}"
fuzz build --sanitizer "$sanitizer" --debug-assertions

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
summary=()
for t in "${targets[@]}"; do
    echo "== $t: ${seconds}s"
    mkdir -p "$work/$t"
    if ! fuzz run --sanitizer "$sanitizer" --debug-assertions "$t" \
        "$work/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 \
        >"$work/$t.log" 2>&1; then
        grep -m1 -A1 'panicked at' "$work/$t.log" || tail -n 30 "$work/$t.log"
        sed -n '/^Failing input:/,/^Minimize/p' "$work/$t.log"
        echo "== $t: CRASH; the input is in fuzz/artifacts/$t/" >&2
        exit 1
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t.log")
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$work/$t.log")
    cov=$(grep -o 'cov: [0-9]*' "$work/$t.log" | tail -n 1)
    new=$(find "$work/$t" -type f | wc -l)
    summary+=("$(printf '%-16s %10s runs %8s exec/s  %-10s %5s new inputs' \
        "$t" "$runs" "$rate" "$cov" "$new")")
    if [ "${FUZZ_MERGE:-0}" = 1 ]; then
        fuzz run --sanitizer "$sanitizer" --debug-assertions "$t" \
            "fuzz/corpus/$t" "$work/$t" -- \
            -merge=1 -use_counters=0 -use_cmp=0 >>"$work/$t.log" 2>&1
    fi
done
echo "== no crashes"
printf '%s\n' "${summary[@]}"
