#!/usr/bin/env bash
# The whole test suite: sets up what it needs (packages, guest kit), then runs every test of the
# workspace. Tests this host cannot run (no usable /dev/kvm, not root, no qemu-img) are reported
# as ignored with the reason (crates/cli/build.rs); emu tests always run.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
# How long the whole suite took, printed last whatever the outcome (the suite should stay
# under 30 minutes on a 2-core machine).
trap 'echo "test: the suite took $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s"' EXIT
./scripts/setup.sh
if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then echo "test: /dev/kvm is usable"; else echo "test: /dev/kvm is NOT usable (KVM tests will be ignored)"; fi
# Lints, among them the workspace's deny of unwrap/expect/panic outside tests (Cargo.toml); a
# lint failure fails the run, after the tests have run. Release profile, as the tests: the build
# scripts and proc-macros are built once for both.
lints=0
cargo clippy --workspace --all-targets --release --quiet -- -D warnings || lints=$?
tests=0
cargo test --workspace --release --no-fail-fast -- --test-threads=2 || tests=$?
# emu runs guest code translated by default; the interpreter stays the reference, so the CPU
# suites run on it too.
ANYVISOR_EMU_ENGINE=interp cargo test --release --no-fail-fast -p hv-emu -p conformance -- --test-threads=2 || tests=$?
# Every fuzz target replays its seeds and regression inputs, then mutates them for 10 s.
fuzz=0
./scripts/fuzz-smoke.sh 10 || fuzz=$?
# The production binary (`cargo build --release -p cli`) carries none of the tests' hooks.
hooks=0
./scripts/check-release-hooks.sh || hooks=$?
# A 2-minute smoke of the soak (docs/benchmarks.md, "Soak"): one VM with its memory and disk
# workloads moved kvm <-> emu while the API is polled; corruption or any failure fails the run.
soak=0
if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
    cargo xtask soak --duration 100 || soak=$?
else
    echo "test: soak smoke SKIPPED: /dev/kvm is not usable (the soak moves a VM between kvm and emu)"
fi
if [ "$tests" -ne 0 ]; then echo "test: cargo test failed (see above)"; exit "$tests"; fi
if [ "$fuzz" -ne 0 ]; then echo "test: fuzz-smoke failed (see above)"; exit "$fuzz"; fi
if [ "$hooks" -ne 0 ]; then echo "test: check-release-hooks failed (see above)"; exit "$hooks"; fi
if [ "$soak" -ne 0 ]; then echo "test: soak smoke failed (see above)"; exit "$soak"; fi
if [ "$lints" -ne 0 ]; then echo "test: cargo clippy failed (see above)"; exit "$lints"; fi
