//! Opens arbitrary bytes as a qcow2 image (read-only and writable) and reads and writes a little
//! of it. Must never panic, allocate without bound, or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    disk::fuzz::open_image(data, Some(disk::Format::Qcow2));
});
