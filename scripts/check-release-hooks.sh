#!/usr/bin/env bash
# Proves that a production build carries no test hooks (vmm::test_hooks, enabled only by the
# `test-hooks` feature that the cli crate's tests turn on through a dev-dependency):
# `cargo build --release -p cli` builds no dev-dependencies, so the binary it makes must hold
# none of the hook variables' names and must ignore them when they are set.
# (The fuzz entry points are `#[cfg(any(test, feature = "fuzzing"))]`; only fuzz/ enables that.)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p cli --quiet
bin="${CARGO_TARGET_DIR:-target}/release/anyvisor"
hooks='ANYVISOR_TEST_PANIC|ANYVISOR_TEST_FORBIDDEN_SYSCALL|ANYVISOR_TEST_SLOW_START|ANYVISOR_KVM_DEVICE'
if found="$(grep -a -o -E "$hooks" "$bin" | sort -u | tr '\n' ' ')" && [ -n "$found" ]; then
    echo "check-release-hooks: $bin carries test hooks: $found"
    exit 1
fi
# With the hook compiled in, ANYVISOR_TEST_PANIC=1 ends any command with status 1 and
# "error: internal error: test panic".
if ! out="$(ANYVISOR_TEST_PANIC=1 "$bin" --version 2>&1)" || [[ "$out" == *"internal error"* ]]; then
    echo "check-release-hooks: $bin obeyed ANYVISOR_TEST_PANIC: $out"
    exit 1
fi
echo "check-release-hooks: ok ($bin has no test hooks)"
