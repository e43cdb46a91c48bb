//! `anyvisor run`'s settings: a `--config` JSON file and flag values (sizes, disk, net and
//! vsock specs, serial, backend, seccomp, migration address), parsed, merged and checked as the
//! command does: refuse with a usage error or accept something valid, never panic. Format:
//! `vmm::fuzz`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vmm::fuzz::cli_args(data);
});
