//! Arbitrary guest memory under a virtio-blk queue (descriptor table, rings, buffers): the device
//! must answer with a status or fail the device, never panic or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    virtio::fuzz::blk_queue(data);
});
