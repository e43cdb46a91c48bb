//! Opens arbitrary bytes as a VMDK image (read-only, then writable where the format allows)
//! and reads and writes a little of it. Must never panic, allocate without bound, or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    disk::fuzz::open_image(data, Some(disk::Format::Vmdk));
});
