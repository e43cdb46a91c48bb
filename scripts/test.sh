#!/usr/bin/env bash
# The whole test suite: sets up what it needs (packages, guest kit), then runs every test of the
# workspace. KVM tests print `SKIP: no /dev/kvm` where KVM is unusable; emu tests always run.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then echo "test: /dev/kvm is usable"; else echo "test: /dev/kvm is NOT usable (KVM tests will SKIP)"; fi
# Lints, among them the workspace's deny of unwrap/expect/panic outside tests (Cargo.toml); a
# lint failure fails the run, after the tests have run.
lints=0
cargo clippy --workspace --all-targets --quiet -- -D warnings || lints=$?
cargo test --workspace --release --no-fail-fast -- --test-threads=2
if [ "$lints" -ne 0 ]; then echo "test: cargo clippy failed (see above)"; exit "$lints"; fi
