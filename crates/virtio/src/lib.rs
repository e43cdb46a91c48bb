//! Virtio devices of anyvisor and their virtio-mmio transport.
//!
//! Shape:
//! * [`VirtioDevice`] is what a device model implements: its type, offered features, config
//!   space, and how to process one of its queues.
//! * [`MmioTransport`] presents one device as a virtio-mmio (version 2, modern only) register
//!   window. The platform maps it on its MMIO bus and hands it an [`Interrupt`] line.
//! * [`Worker`] is the device's thread: it activates and resets the device, processes notified
//!   queues and serves the device's host descriptors (tap, vsock sockets); see `docs/virtio.md`,
//!   "Threads and the fast path".
//! * Devices: [`Block`] (raw and qcow2 images, see `docs/qcow2.md`), [`Rng`], [`Net`] (tap) and
//!   [`Vsock`] (Unix-socket host side, see `docs/virtio-net-vsock.md`).
//!
//! Everything a guest writes into queues is untrusted: a malformed request ends with an error
//! status in the request, or, when the device cannot even report that, with the device entering
//! `DEVICE_NEEDS_RESET`. Nothing a guest or an image file feeds panics or stops the VMM.
//!
//! Saved state ([`MmioState`], [`DeviceState`], [`QueueSaved`]) is plain serde data; the only way
//! back to a live device is [`MmioTransport::restore`], which re-runs every runtime check.

pub mod block;
pub(crate) mod chain;
/// Fuzz entry points: only in fuzzing builds (`--features fuzzing`, as `fuzz/Cargo.toml` sets)
/// and this crate's own tests; production builds do not carry them.
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzz;
pub mod mmio;
pub mod net;
pub mod rng;
#[cfg(test)]
pub(crate) mod testutil;
pub mod vsock;
pub mod worker;

pub use block::{Block, BlockConfig, BlockState, Format};
pub use mmio::{MmioState, MmioTransport};
pub use net::{Net, NetConfig, NetState};
pub use rng::{Rng, RngState};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
pub use vsock::{Vsock, VsockConfig, VsockState};
pub use worker::Worker;

/// Guest memory as devices see it.
pub use hv::GuestMemory;

/// An interrupt line from a device to the platform's interrupt controller; the transport
/// triggers it each time its interrupt status register gains a bit. The transport itself is an
/// [`MmioHandler`] the platform's bus maps as it is (both contracts are `hv`'s).
pub use hv::{Interrupt, MmioHandler};

/// Per-device statistics, for the VMM's status API.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Descriptor chains taken from the queues.
    pub requests: u64,
    /// Requests completed with an error status (I/O error, unsupported, out of range).
    pub errors: u64,
    /// Descriptor chains too malformed to complete (the device then needs a reset).
    pub invalid_descriptors: u64,
    /// Bytes copied from the backend into guest memory.
    pub bytes_read: u64,
    /// Bytes copied from guest memory into the backend.
    pub bytes_written: u64,
}

/// A device failure that the guest must see as `DEVICE_NEEDS_RESET`.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("malformed descriptor chain")]
    InvalidChain,
    #[error("descriptor chain has no writable status byte")]
    NoStatus,
    #[error("guest memory access at {0:#x} failed")]
    Memory(u64),
    #[error("virtqueue")]
    Queue(#[source] virtio_queue::Error),
    #[error("invalid saved state: {0}")]
    State(String),
    #[error("device backend failed")]
    Backend(#[source] std::io::Error),
}

/// Saved state of one device model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DeviceState {
    Block(BlockState),
    Rng(RngState),
    Net(NetState),
    Vsock(VsockState),
}

/// A virtio device model, driven by a transport.
///
/// The transport owns the queues and calls [`VirtioDevice::process_queue`] when the driver
/// notifies one; the call does all available work and returns. In a VM every method that does
/// work (activation, reset, queue processing, host events) runs on the device's [`Worker`]
/// thread, under the transport's device-side lock and never while the transport is paused;
/// the vCPUs only read the identity, features and config space captured at creation.
pub trait VirtioDevice: Send {
    /// Virtio device ID (2 = block, 4 = entropy).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Offered feature bits, including transport bits such as `VIRTIO_F_VERSION_1`.
    fn features(&self) -> u64;
    /// Reads device config space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver set DRIVER_OK having acked `acked_features` (a subset of [`Self::features`]).
    fn activate(&mut self, acked_features: u64) -> Result<(), DeviceError>;
    /// Processes every available chain of queue `index`. Returns whether the driver must be
    /// interrupted (used buffers were added and the driver did not suppress notifications).
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError>;
    /// Back to the state before activation (the driver wrote 0 to the status register).
    fn reset(&mut self);
    fn counters(&self) -> Counters;
    fn save(&self) -> DeviceState;
    /// Checks `state` against this device (built from the same configuration) and adopts it.
    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError>;
    /// A descriptor that polls readable when the device has host-side work (a frame on its
    /// tap, a vsock host socket event). The worker polls it, while the device is active and
    /// not paused, together with the queue eventfds, and then calls [`Self::host_event`].
    /// It must stay the same descriptor for the device's life.
    fn host_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// Does the host-side work [`Self::host_fd`] signalled, without blocking; queues that now
    /// have work are asked for through [`Self::take_kicks`].
    fn host_event(&mut self) {}
    /// Queues the device wants processed without a driver notification (bit i = queue i): host
    /// data arrived, a transmit produced replies, a restored device owes an event. Taking them
    /// clears them.
    fn take_kicks(&mut self) -> u64 {
        0
    }
}

/// Serializable mirror of virtio-queue's [`QueueState`]. Untrusted: it becomes a [`Queue`] only
/// through `Queue::try_from(QueueState::from(saved))`, which re-checks sizes and alignment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSaved {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueueSaved {
    fn from(s: QueueState) -> Self {
        QueueSaved {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<QueueSaved> for QueueState {
    fn from(s: QueueSaved) -> Self {
        QueueState {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<&Queue> for QueueSaved {
    fn from(q: &Queue) -> Self {
        QueueSaved::from(q.state())
    }
}

/// Feature bits every device here offers.
pub(crate) const COMMON_FEATURES: u64 = (1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1)
    | (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX);

/// Copies `src` (a device's config space) into `data` from `offset`; the rest reads as zero.
pub(crate) fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= src.len() {
        return;
    }
    let n = data.len().min(src.len() - start);
    data[..n].copy_from_slice(&src[start..start + n]);
}

/// Sets the event-index mode of `queue` from the acked features.
pub(crate) fn apply_features(queue: &mut Queue, acked: u64) {
    let event_idx = acked & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) != 0;
    queue.set_event_idx(event_idx);
}
