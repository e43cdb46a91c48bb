//! virtio-net's receive and transmit queues under guest operations (chains, raw ring writes,
//! notifications, resets) with frames arriving from a fake tap: the device must complete or
//! fail each chain, never panic, hang or allocate without bound. Format: `virtio::fuzz::op`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    virtio::fuzz::net_queues(data);
});
