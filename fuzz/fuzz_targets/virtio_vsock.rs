//! virtio-vsock's receive, transmit and event queues under guest operations (packets with
//! fuzzer headers, buffers, resets) and host socket events (clients connecting with
//! `CONNECT <port>` lines, sending, reading, shutting down): never panic, hang or allocate
//! without bound. Format: `virtio::fuzz::op`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    virtio::fuzz::vsock_queues(data);
});
