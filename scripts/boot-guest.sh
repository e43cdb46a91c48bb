#!/usr/bin/env bash
# Sets up everything (packages, guest kit, release build) and boots the test guest with an
# interactive shell on this terminal. Extra arguments go to `anyvisor run`
# (e.g. --backend emu, --cpus 2, --memory 1G).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release -q -p cli
exec ./target/release/anyvisor run \
  --kernel guest/out/bzImage --initrd guest/out/initramfs.cpio.gz \
  --cmdline "console=ttyS0 quiet reboot=k panic=-1" "$@"
