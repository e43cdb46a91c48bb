//! virtio-net (virtio 1.x section 5.1) on a host tap interface.
//!
//! Two queues: receive (0) and transmit (1), 256 entries each. Offered: `VERSION_1`, `STATUS`
//! (link always up) and `MAC` when a MAC address is configured; no offloads, no mergeable
//! receive buffers, no control queue. Every frame carries the 12-byte virtio 1.x header on the
//! guest side and none on the tap side (`IFF_NO_PI`, no `IFF_VNET_HDR`): transmit strips it,
//! receive prepends a zeroed one with `num_buffers = 1`.
//!
//! Everything runs on the device's worker thread. Transmit: when the driver notifies the transmit
//! queue. Receive: the tap is the device's host descriptor ([`VirtioDevice::host_fd`]), which
//! the worker polls while the device is active; when it is readable the device reads the waiting
//! frames (at most [`RX_BATCH`] per wake-up) into its backlog (at most [`MAX_PENDING`] frames;
//! beyond that frames are dropped and counted as errors) and asks for the receive queue to be
//! processed; processing also happens when the driver adds receive buffers. A frame larger than
//! the receive buffer it meets is dropped and the buffer returned empty.
//!
//! Counters: `requests` = chains used (both queues), `bytes_written` = frame bytes sent to the
//! tap, `bytes_read` = frame bytes delivered to the guest, `errors` = frames dropped (tap
//! refused, too large, queue full, buffers outside guest RAM), `invalid_descriptors` = chains
//! the queue could not walk (the device then needs a reset).

pub mod tap;
#[cfg(test)]
pub(crate) mod testq;

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestMemory as _, Permissions};

pub use self::tap::{TapIo, open_tap};
use crate::chain::{self, Seg};
use crate::{
    COMMON_FEATURES, Counters, DeviceError, DeviceState, GuestMemory, VirtioDevice,
    read_config_bytes,
};

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const QUEUE_SIZE: u16 = 256;
/// The virtio 1.x `virtio_net_hdr` (with `num_buffers`).
pub const HEADER_LEN: usize = 12;
/// Largest frame moved either way (Linux's largest non-GSO packet with a 64 KiB MTU).
pub const MAX_FRAME: usize = 65550;
/// Received frames waiting for guest buffers.
pub const MAX_PENDING: usize = 256;
/// Longest chain accepted.
const MAX_DESCRIPTORS: usize = QUEUE_SIZE as usize;
/// Frames read from the tap per wake-up of the worker (the tap stays readable for the rest).
pub const RX_BATCH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open tap device {name}")]
    Tap {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// What a network device is built from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// Host tap interface name; attached if it exists, created (non-persistent) otherwise.
    pub tap: String,
    /// Guest MAC address; `None` leaves the choice to the guest driver (random).
    pub mac: Option<[u8; 6]>,
}

/// Saved state of a network device. Frames queued on the host side are not saved (a network
/// may drop frames).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub mac: Option<[u8; 6]>,
    pub features: u64,
    pub counters: Counters,
}

/// Frames read from the tap, waiting for guest buffers.
#[derive(Default)]
struct RxBacklog {
    frames: VecDeque<Vec<u8>>,
    dropped: u64,
}

impl RxBacklog {
    /// Queues a frame read from the tap; drops (and counts) it when too large or too many wait.
    /// Returns whether it was queued.
    fn offer(&mut self, frame: &[u8]) -> bool {
        if frame.len() > MAX_FRAME || self.frames.len() >= MAX_PENDING {
            self.dropped += 1;
            return false;
        }
        self.frames.push_back(frame.to_vec());
        true
    }
}

pub struct Net {
    mac: Option<[u8; 6]>,
    tap: Arc<dyn TapIo>,
    features: u64,
    counters: Counters,
    rx: RxBacklog,
    /// Activated and not reset since: the tap is read.
    active: bool,
    /// The receive queue has frames to take.
    want_rx: bool,
    /// Reused for each frame read from the tap.
    buf: Vec<u8>,
    queue_sizes: [u16; 2],
}

impl Net {
    /// Opens the tap named in `config`. The error names the tap.
    pub fn new(config: NetConfig) -> Result<Net, Error> {
        let dev = open_tap(&config.tap).map_err(|source| Error::Tap {
            name: config.tap.clone(),
            source,
        })?;
        Ok(Net::with_backend(config.mac, Arc::new(dev)))
    }

    /// A device on any frame backend (must be non-blocking; see [`TapIo`]).
    pub fn with_backend(mac: Option<[u8; 6]>, tap: Arc<dyn TapIo>) -> Net {
        let mut features = COMMON_FEATURES | (1 << VIRTIO_NET_F_STATUS);
        if mac.is_some() {
            features |= 1 << VIRTIO_NET_F_MAC;
        }
        Net {
            mac,
            tap,
            features,
            counters: Counters::default(),
            rx: RxBacklog::default(),
            active: false,
            want_rx: false,
            buf: Vec::new(),
            queue_sizes: [QUEUE_SIZE; 2],
        }
    }

    /// Frames received from the tap and not yet given to the guest.
    pub fn pending_frames(&self) -> usize {
        self.rx.frames.len()
    }

    /// Queues `frame` as if it had been read from the tap (the fuzz target has no tap: see
    /// `crate::fuzz::net_queues`).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn offer_frame(&mut self, frame: &[u8]) {
        self.rx.offer(frame);
    }

    fn config_bytes(&self) -> [u8; 8] {
        let mut c = [0u8; 8];
        if let Some(mac) = self.mac {
            c[..6].copy_from_slice(&mac);
        }
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c
    }

    /// Reads up to [`RX_BATCH`] waiting frames from the tap into the backlog.
    fn read_tap(&mut self) {
        if self.buf.len() < MAX_FRAME + 1 {
            self.buf.resize(MAX_FRAME + 1, 0);
        }
        let mut queued = 0;
        for _ in 0..RX_BATCH {
            match self.tap.recv(&mut self.buf) {
                Ok(0) => {
                    hv::rate_limited!(tracing::warn!("virtio-net: tap closed"));
                    break;
                }
                Ok(len) => {
                    // A backend claiming more than the buffer holds: as good as too large.
                    let frame = self.buf.get(..len).unwrap_or(&self.buf);
                    if self.rx.offer(frame) {
                        queued += 1;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    hv::rate_limited!(tracing::debug!("virtio-net: tap read failed: {e}"));
                    break;
                }
            }
        }
        if queued > 0 {
            self.want_rx = true;
        }
    }

    fn transmit(
        &mut self,
        chain: DescriptorChain<&GuestMemory>,
        mem: &GuestMemory,
    ) -> Result<u32, DeviceError> {
        self.counters.requests += 1;
        let segs = chain::collect(chain, MAX_DESCRIPTORS).inspect_err(|_| {
            self.counters.invalid_descriptors += 1;
        })?;
        let Some(packet) = read_segments(mem, &segs, HEADER_LEN + MAX_FRAME) else {
            self.counters.errors += 1;
            return Ok(0);
        };
        let Some(frame) = packet.get(HEADER_LEN..) else {
            self.counters.errors += 1;
            return Ok(0);
        };
        match self.tap.send(frame) {
            Ok(_) => self.counters.bytes_written += frame.len() as u64,
            Err(e) => {
                hv::rate_limited!(tracing::debug!("virtio-net: tap refused a frame: {e}"));
                self.counters.errors += 1;
            }
        }
        Ok(0)
    }

    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemory) -> Result<bool, DeviceError> {
        let inner = &mut self.rx;
        let mut used_any = false;
        loop {
            queue
                .disable_notification(mem)
                .map_err(DeviceError::Queue)?;
            while let Some(frame) = inner.frames.pop_front() {
                let chain = queue.iter(mem).map_err(DeviceError::Queue)?.next();
                let Some(chain) = chain else {
                    inner.frames.push_front(frame);
                    break;
                };
                let head = chain.head_index();
                self.counters.requests += 1;
                let segs = chain::collect(chain, MAX_DESCRIPTORS).inspect_err(|_| {
                    self.counters.invalid_descriptors += 1;
                })?;
                let mut header = [0u8; HEADER_LEN];
                header[10] = 1; // num_buffers
                let len = match write_segments(mem, &segs, &[&header, &frame]) {
                    Some(n) => {
                        self.counters.bytes_read += frame.len() as u64;
                        n
                    }
                    None => {
                        self.counters.errors += 1;
                        0
                    }
                };
                queue.add_used(mem, head, len).map_err(DeviceError::Queue)?;
                used_any = true;
            }
            let more_buffers = queue.enable_notification(mem).map_err(DeviceError::Queue)?;
            if !more_buffers || inner.frames.is_empty() {
                break;
            }
        }
        if !used_any {
            return Ok(false);
        }
        queue.needs_notification(mem).map_err(DeviceError::Queue)
    }
}

/// Concatenates the device-readable buffers of a chain, at most `max` bytes. `None` when a
/// buffer is device-writable, lies outside guest RAM, or the total exceeds `max`.
pub(crate) fn read_segments(mem: &GuestMemory, segs: &[Seg], max: usize) -> Option<Vec<u8>> {
    let mut total = 0usize;
    for s in segs {
        if s.writable || !mem.check_range(s.addr, s.len as usize, Permissions::Read) {
            return None;
        }
        total = total.checked_add(s.len as usize)?;
    }
    if total > max {
        return None;
    }
    let mut out = vec![0u8; total];
    let mut at = 0;
    for s in segs {
        let end = at + s.len as usize;
        mem.read_slice(&mut out[at..end], s.addr).ok()?;
        at = end;
    }
    Some(out)
}

/// Writes `parts` back to back across the device-writable buffers of a chain. `None` (nothing
/// counted as written) when a buffer is device-readable, lies outside guest RAM, or the parts
/// do not fit. Returns the bytes written.
pub(crate) fn write_segments(mem: &GuestMemory, segs: &[Seg], parts: &[&[u8]]) -> Option<u32> {
    let need: usize = parts.iter().map(|p| p.len()).sum();
    let mut room = 0usize;
    for s in segs {
        if !s.writable || !mem.check_range(s.addr, s.len as usize, Permissions::Write) {
            return None;
        }
        room = room.saturating_add(s.len as usize);
    }
    if need > room {
        return None;
    }
    let mut seg_iter = segs.iter();
    let mut seg = seg_iter.next()?;
    let mut seg_off = 0usize;
    for part in parts {
        let mut part = *part;
        while !part.is_empty() {
            let space = seg.len as usize - seg_off;
            if space == 0 {
                seg = seg_iter.next()?;
                seg_off = 0;
                continue;
            }
            let n = space.min(part.len());
            let addr = seg.addr.checked_add(seg_off as u64)?;
            mem.write_slice(&part[..n], addr).ok()?;
            part = &part[n..];
            seg_off += n;
        }
    }
    u32::try_from(need).ok()
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn activate(&mut self, _acked_features: u64) -> Result<(), DeviceError> {
        self.active = true;
        Ok(())
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError> {
        match index {
            RX_QUEUE => self.receive(queue, mem),
            TX_QUEUE => chain::drain(queue, mem, |c| self.transmit(c, mem)),
            _ => Ok(false),
        }
    }

    fn reset(&mut self) {
        self.active = false;
        self.want_rx = false;
        self.rx.frames.clear();
    }

    fn counters(&self) -> Counters {
        let mut c = self.counters;
        c.errors += self.rx.dropped;
        c
    }

    fn save(&self) -> DeviceState {
        DeviceState::Net(NetState {
            mac: self.mac,
            features: self.features,
            counters: self.counters(),
        })
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        let DeviceState::Net(s) = state else {
            return Err(DeviceError::State("not a network device".into()));
        };
        if s.mac != self.mac || s.features != self.features {
            return Err(DeviceError::State("network configuration differs".into()));
        }
        self.counters = s.counters;
        self.rx.dropped = 0;
        Ok(())
    }

    fn host_fd(&self) -> Option<RawFd> {
        Some(self.tap.poll_fd())
    }

    fn host_event(&mut self) {
        if self.active {
            self.read_tap();
        }
    }

    fn take_kicks(&mut self) -> u64 {
        if std::mem::take(&mut self.want_rx) {
            1 << RX_QUEUE
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests;
