#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS each (default 60), one after the other, at the
# lowest CPU priority. Seeds are read from fuzz/corpus/<target>/ and never modified: new inputs
# go to $FUZZ_WORK/corpus/<target>/. Crashes land in fuzz/artifacts/<target>/ (see
# docs/fuzzing.md for how to minimize and file them). Exits 1 if any target crashed or failed
# to build.
#
# Env: FUZZ_WORK (default /tmp/anyvisor-fuzz), CARGO_TARGET_DIR (default fuzz/target),
#      FUZZ_TARGETS (space-separated subset), FUZZ_JOBS (targets run at once, default 1).
set -u
seconds="${1:-60}"
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
work="${FUZZ_WORK:-/tmp/anyvisor-fuzz}"
jobs="${FUZZ_JOBS:-1}"
# cargo-fuzz builds with -Zsanitizer=address; on a stable toolchain that needs this switch.
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "run-all.sh: cargo-fuzz is missing (cargo install cargo-fuzz --locked)" >&2
    exit 1
fi
targets="${FUZZ_TARGETS:-$(cargo fuzz list)}"
if [ -z "$targets" ]; then
    echo "run-all.sh: no fuzz targets found" >&2
    exit 1
fi
if ! nice -n 19 cargo fuzz build -O -a >"$work.build.log" 2>&1; then
    tail -30 "$work.build.log" >&2
    echo "run-all.sh: build failed (log: $work.build.log)" >&2
    exit 1
fi

run_one() {
    local t="$1" log="$work/$1.log"
    mkdir -p "$work/corpus/$t" "corpus/$t"
    nice -n 19 cargo fuzz run -O -a "$t" "$work/corpus/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1
    local rc=$?
    local runs
    runs="$(grep -o 'Done [0-9]* runs' "$log" | tail -1 | grep -o '[0-9]*')"
    if [ "$rc" -eq 0 ]; then
        echo "$t: ok, ${runs:-?} executions in ${seconds}s"
    else
        echo "$t: FAILED (exit $rc), log $log; artifacts in fuzz/artifacts/$t/"
        grep -m3 -E 'panicked at|ERROR: libFuzzer|SUMMARY' "$log" | sed 's/^/    /'
    fi
    return "$rc"
}

mkdir -p "$work"
failed=0
running=0
for t in $targets; do
    run_one "$t" &
    running=$((running + 1))
    if [ "$running" -ge "$jobs" ]; then
        wait -n || failed=1
        running=$((running - 1))
    fi
done
while [ "$running" -gt 0 ]; do
    wait -n || failed=1
    running=$((running - 1))
done
if [ "$failed" -ne 0 ]; then
    echo "run-all.sh: at least one target failed" >&2
fi
exit "$failed"
