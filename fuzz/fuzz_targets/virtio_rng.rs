//! virtio-rng's queue under guest operations (chains, raw ring writes, notifications, resets).
//! Format: `virtio::fuzz::op`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    virtio::fuzz::rng_queues(data);
});
