//! virtio-net (virtio 1.x section 5.1) on a host tap interface.
//!
//! Two queues: receive (0) and transmit (1), 256 entries each. Offered: `VERSION_1`, `STATUS`
//! (link always up) and `MAC` when a MAC address is configured; no offloads, no mergeable
//! receive buffers, no control queue. Every frame carries the 12-byte virtio 1.x header on the
//! guest side and none on the tap side (`IFF_NO_PI`, no `IFF_VNET_HDR`): transmit strips it,
//! receive prepends a zeroed one with `num_buffers = 1`.
//!
//! Transmit runs in the notifying (vCPU) thread. Receive: a host thread, started at activation
//! and stopped at reset, polls the tap and queues each frame (at most [`MAX_PENDING`] frames;
//! beyond that frames are dropped and counted as errors), then asks the transport, through the
//! [`QueueKick`] it was given, to process the receive queue; processing also happens when the
//! driver adds receive buffers. A frame larger than the receive buffer it meets is dropped and
//! the buffer returned empty.
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
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestMemory as _, Permissions};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

pub use self::tap::{TapIo, open_tap};
use crate::chain::{self, Seg};
use crate::{
    COMMON_FEATURES, Counters, DeviceError, DeviceState, GuestMemory, QueueKick, VirtioDevice,
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
/// Frames read from the tap before the receive queue is kicked.
const RX_BATCH: usize = 64;
const TOKEN_STOP: u64 = 0;
const TOKEN_TAP: u64 = 1;

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

/// What the receive thread and the queue processing share.
#[derive(Default)]
struct RxShared {
    inner: Mutex<RxInner>,
    kick: Mutex<Option<QueueKick>>,
}

#[derive(Default)]
struct RxInner {
    frames: VecDeque<Vec<u8>>,
    /// Bumped at each reset: a receive thread of an older generation queues nothing more.
    generation: u64,
    dropped: u64,
}

impl RxInner {
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub struct Net {
    mac: Option<[u8; 6]>,
    tap: Arc<dyn TapIo>,
    features: u64,
    counters: Counters,
    shared: Arc<RxShared>,
    /// Stop signal of the running receive thread.
    worker: Option<EventFd>,
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
            shared: Arc::new(RxShared::default()),
            worker: None,
            queue_sizes: [QUEUE_SIZE; 2],
        }
    }

    /// Frames received from the tap and not yet given to the guest.
    pub fn pending_frames(&self) -> usize {
        lock(&self.shared.inner).frames.len()
    }

    /// Queues `frame` as if the receive thread had read it from the tap (the fuzz target has no
    /// thread: see `crate::fuzz::net_queues`).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn offer_frame(&self, frame: &[u8]) {
        lock(&self.shared.inner).offer(frame);
    }

    fn config_bytes(&self) -> [u8; 8] {
        let mut c = [0u8; 8];
        if let Some(mac) = self.mac {
            c[..6].copy_from_slice(&mac);
        }
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c
    }

    fn start_worker(&mut self) -> Result<(), DeviceError> {
        if self.worker.is_some() {
            return Ok(());
        }
        let epoll = Epoll::new().map_err(DeviceError::Backend)?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::Backend)?;
        epoll
            .ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_STOP),
            )
            .map_err(DeviceError::Backend)?;
        epoll
            .ctl(
                ControlOperation::Add,
                self.tap.poll_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_TAP),
            )
            .map_err(DeviceError::Backend)?;
        let generation = lock(&self.shared.inner).generation;
        let tap = self.tap.clone();
        let shared = self.shared.clone();
        let thread_stop = stop.try_clone().map_err(DeviceError::Backend)?;
        thread::Builder::new()
            .name("virtio-net-rx".into())
            .spawn(move || rx_loop(tap.as_ref(), &shared, &epoll, &thread_stop, generation))
            .map_err(DeviceError::Backend)?;
        self.worker = Some(stop);
        Ok(())
    }

    /// Tells the receive thread to end. It is not joined: it may be waiting for the transport
    /// lock our caller holds; its generation no longer matches, so it queues nothing more.
    fn stop_worker(&mut self) {
        {
            let mut inner = lock(&self.shared.inner);
            inner.generation = inner.generation.wrapping_add(1);
            inner.frames.clear();
        }
        if let Some(stop) = self.worker.take() {
            let _ = stop.write(1);
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
        let shared = self.shared.clone();
        let mut inner = lock(&shared.inner);
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

impl Drop for Net {
    fn drop(&mut self) {
        self.stop_worker();
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

fn rx_loop(tap: &dyn TapIo, shared: &RxShared, epoll: &Epoll, stop: &EventFd, generation: u64) {
    let mut events = [EpollEvent::default(); 2];
    let mut buf = vec![0u8; MAX_FRAME + 1];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!("virtio-net: receive thread stops: {e}");
                return;
            }
        };
        if events[..n].iter().any(|e| e.data() == TOKEN_STOP) {
            let _ = stop.read();
            return;
        }
        let mut queued = 0;
        while queued < RX_BATCH {
            match tap.recv(&mut buf) {
                Ok(0) => {
                    tracing::warn!("virtio-net: tap closed, receive thread stops");
                    return;
                }
                Ok(len) => {
                    let mut inner = lock(&shared.inner);
                    if inner.generation != generation {
                        return;
                    }
                    // A backend claiming more than the buffer holds: as good as too large.
                    let frame = buf.get(..len).unwrap_or(&buf);
                    if inner.offer(frame) {
                        queued += 1;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    hv::rate_limited!(tracing::debug!("virtio-net: tap read failed: {e}"));
                    // A persistent error (interface gone) must not spin.
                    thread::sleep(std::time::Duration::from_millis(10));
                    break;
                }
            }
        }
        if queued > 0 {
            let kick = lock(&shared.kick).clone();
            if let Some(kick) = kick {
                kick(RX_QUEUE);
            }
        }
    }
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

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, _acked_features: u64) -> Result<(), DeviceError> {
        self.start_worker()
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
        self.stop_worker();
    }

    fn counters(&self) -> Counters {
        let mut c = self.counters;
        c.errors += lock(&self.shared.inner).dropped;
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
        lock(&self.shared.inner).dropped = 0;
        Ok(())
    }

    fn set_queue_kick(&mut self, kick: QueueKick) {
        *lock(&self.shared.kick) = Some(kick);
    }
}

#[cfg(test)]
mod tests;
