#!/usr/bin/env bash
# CI's bounded fuzz step: builds every cargo-fuzz target as a plain release binary (libFuzzer's
# driver, no sanitizer or coverage instrumentation, so no nightly switches and no cargo-fuzz),
# replays its seed corpus (fuzz/corpus/<target>/) and its regression inputs
# (fuzz/regressions/<target>/, crashes found earlier), then mutates the seeds for SECONDS each
# (default 10). Uninstrumented mutation is blind, so this is a smoke test that every input
# format still parses without a panic; the real runs are fuzz/run-all.sh (docs/fuzzing.md).
set -euo pipefail
seconds="${1:-10}"
cd "$(dirname "$0")/../fuzz"
export CARGO_TARGET_DIR="${FUZZ_SMOKE_TARGET:-$PWD/../target/fuzz-smoke}"
cargo build --release --bins --quiet
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# Scratch files a target makes go with the rest of this run's work.
export TMPDIR="$work"
failed=0
for src in fuzz_targets/*.rs; do
    t="$(basename "$src" .rs)"
    bin="$CARGO_TARGET_DIR/release/$t"
    inputs=()
    for d in "corpus/$t" "regressions/$t"; do
        [ -d "$d" ] && inputs+=("$d")
    done
    if ! "$bin" -runs=0 "${inputs[@]}" >"$work/$t.replay" 2>&1; then
        echo "fuzz-smoke: $t: a corpus or regression input fails:"; tail -20 "$work/$t.replay"
        failed=1
        continue
    fi
    mkdir -p "$work/corpus-$t"
    if ! "$bin" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$work/" "$work/corpus-$t" "${inputs[@]}" >"$work/$t.run" 2>&1; then
        echo "fuzz-smoke: $t: crashed while mutating:"; tail -20 "$work/$t.run"
        failed=1
        continue
    fi
    echo "fuzz-smoke: $t: ok ($(grep -o 'Done [0-9]* runs' "$work/$t.run" | tail -1 | grep -o '[0-9]*') executions)"
done
exit "$failed"
