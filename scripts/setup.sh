#!/usr/bin/env bash
# Installs what anyvisor's build, tests and benchmarks need on a fresh Debian 12 machine,
# then builds the test guest kit and the Debian distro disk image (guest/out/). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/apt-wait.sh
. scripts/apt-wait.sh

need=()
command -v lz4 >/dev/null || need+=(lz4)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v cpio >/dev/null || need+=(cpio)
command -v readelf >/dev/null || need+=(binutils)
command -v gcc >/dev/null || need+=(gcc)
# libfuzzer-sys compiles libFuzzer (C++) for scripts/fuzz-smoke.sh.
command -v g++ >/dev/null || need+=(g++)
command -v ip >/dev/null || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt_get update -qq >/dev/null
  apt_get install -y -qq "${need[@]}" >/dev/null
fi
./guest/build-kit.sh
# The Debian 12 disk image of the distro tests (crates/cli/tests/e2e/distro.rs); cached, ~3-4 min
# the first time.
./guest/build-distro.sh
