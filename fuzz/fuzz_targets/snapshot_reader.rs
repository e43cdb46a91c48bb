//! Parses arbitrary bytes as a snapshot file (metadata and RAM image). Must never panic,
//! allocate without bound, or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = snapshot::fuzz_open(data);
});
