//! The virtio-mmio transport, version 2 (virtio 1.x section 4.2.2), modern devices only.
//!
//! Register window (all registers 32 bits wide, little endian, naturally aligned; the device
//! config space from 0x100 takes any width):
//!
//! | offset | name | dir |
//! |---|---|---|
//! | 0x000 | MagicValue `"virt"` | R |
//! | 0x004 | Version (2) | R |
//! | 0x008 | DeviceID | R |
//! | 0x00c | VendorID | R |
//! | 0x010 / 0x014 | DeviceFeatures / DeviceFeaturesSel | R / W |
//! | 0x020 / 0x024 | DriverFeatures / DriverFeaturesSel | W / W |
//! | 0x030 | QueueSel | W |
//! | 0x034 / 0x038 | QueueNumMax / QueueNum | R / W |
//! | 0x044 | QueueReady | RW |
//! | 0x050 | QueueNotify | W |
//! | 0x060 / 0x064 | InterruptStatus / InterruptACK | R / W |
//! | 0x070 | Status | RW |
//! | 0x080..0x0a4 | QueueDesc, QueueDriver (avail), QueueDevice (used), low/high | W |
//! | 0x0ac..0x0bc | SHMSel, SHMLen, SHMBase (no regions: length reads as all ones) | W / R |
//! | 0x0fc | ConfigGeneration | R |
//! | 0x100.. | device config space | RW |
//!
//! Status follows ACKNOWLEDGE → DRIVER → FEATURES_OK → DRIVER_OK; any other transition is
//! ignored (the driver reads back the old value), FAILED may be set at any time, writing 0 resets.
//! Driver features are accepted only in the DRIVER state; FEATURES_OK is refused unless the acked
//! features are a subset of the offered ones and include VERSION_1. Queue registers are writable
//! only between FEATURES_OK and DRIVER_OK. A device failure sets DEVICE_NEEDS_RESET and raises a
//! config-change interrupt; the device then does nothing until the driver resets it.
//!
//! Notifications: a transport starts out processing a notified queue inside the QueueNotify
//! write (unit tests, fuzzing). [`MmioTransport::queue_events`] switches it to one eventfd per
//! queue: a QueueNotify write then only signals the queue's eventfd (or, on plain KVM, the vCPU
//! signals it itself through an ioeventfd and the write never reaches the transport), and a
//! [`crate::Worker`] thread processes the queue. While the transport is paused
//! ([`MmioTransport::pause`]) nothing touches guest memory or device state: notifications and
//! kicks are recorded and handed to the worker on [`MmioTransport::resume`].

use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::{
    Counters, DeviceError, DeviceState, GuestMemory, Interrupt, QueueKick, QueueSaved,
    VirtioDevice, apply_features,
};

/// "virt" in little endian.
pub const MAGIC: u32 = 0x7472_6976;
/// Modern virtio-mmio.
pub const VERSION: u32 = 2;
/// "ANYV" in little endian.
pub const VENDOR_ID: u32 = 0x5659_4e41;
/// Size of the register window including a config space of up to 0x100 bytes.
pub const WINDOW_SIZE: u64 = 0x200;
/// Offset of the QueueNotify register (a 32-bit write of the queue index), where a backend's
/// ioeventfd goes.
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::QUEUE_NOTIFY;

const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
const NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;

mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("device queue {index} has invalid maximum size {size}")]
    QueueMaxSize { index: usize, size: u16 },
    #[error("invalid saved transport state: {0}")]
    State(String),
    #[error("invalid saved state of queue {index}")]
    Queue {
        index: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("device refused saved state")]
    Device(#[source] DeviceError),
}

/// Saved state of a transport and its device. Untrusted: see [`MmioTransport::restore`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    pub device_type: u32,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub shm_sel: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queues: Vec<QueueSaved>,
    pub device: DeviceState,
}

/// One virtio device behind a virtio-mmio register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: Arc<GuestMemory>,
    interrupt: Arc<dyn Interrupt>,
    queues: Vec<Queue>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    shm_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    /// One eventfd per queue once a worker processes the queues; `None`: notifications are
    /// processed inline.
    queue_events: Option<Vec<Arc<EventFd>>>,
    /// The VM is paused: process nothing.
    paused: bool,
    /// Queues notified or kicked while paused, processed on resume.
    pending: Vec<bool>,
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: Arc<GuestMemory>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<Self, Error> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .enumerate()
            .map(|(index, &size)| Queue::new(size).map_err(|_| Error::QueueMaxSize { index, size }))
            .collect::<Result<Vec<_>, _>>()?;
        let queues_len = queues.len();
        Ok(MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            shm_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
            queue_events: None,
            paused: false,
            pending: vec![false; queues_len],
        })
    }

    /// Puts the transport behind the lock the MMIO bus and the device's own threads share, and
    /// gives the device a [`QueueKick`] that processes a queue under that lock (a no-op once the
    /// transport is dropped). Devices with host-side threads (net, vsock) need this; for the
    /// others it is equivalent to `Arc::new(Mutex::new(t))`.
    pub fn into_shared(self) -> Arc<Mutex<MmioTransport>> {
        let shared = Arc::new(Mutex::new(self));
        let weak = Arc::downgrade(&shared);
        let kick: QueueKick = Arc::new(move |index| {
            let Some(t) = weak.upgrade() else { return };
            let Ok(index) = u32::try_from(index) else {
                return;
            };
            t.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .notify(index);
        });
        shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .device
            .set_queue_kick(kick);
        shared
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn counters(&self) -> Counters {
        self.device.counters()
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// MMIO read of `data.len()` bytes at `offset` inside the window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        let value = if data.len() == 4 && offset.is_multiple_of(4) {
            self.read_reg(offset)
        } else {
            hv::rate_limited!(tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio: unaligned register read"
            ));
            0
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
        data[n..].fill(0);
    }

    /// MMIO write of `data` at `offset` inside the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            hv::rate_limited!(tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio: register write not 32-bit"
            ));
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }

    /// From now on a QueueNotify write only signals the queue's eventfd (returned here, one
    /// per queue, created on the first call), for a [`crate::Worker`] to process the queue.
    pub fn queue_events(&mut self) -> std::io::Result<Vec<Arc<EventFd>>> {
        if let Some(events) = &self.queue_events {
            return Ok(events.clone());
        }
        let events = (0..self.queues.len())
            .map(|_| EventFd::new(EFD_NONBLOCK).map(Arc::new))
            .collect::<std::io::Result<Vec<_>>>()?;
        self.queue_events = Some(events.clone());
        Ok(events)
    }

    /// A QueueNotify write.
    fn queue_notify(&mut self, index: u32) {
        let Some(events) = &self.queue_events else {
            self.notify(index);
            return;
        };
        let Some(event) = usize::try_from(index).ok().and_then(|i| events.get(i)) else {
            hv::rate_limited!(tracing::debug!(
                index,
                "virtio-mmio: notify of a queue that does not exist"
            ));
            return;
        };
        if let Err(e) = event.write(1) {
            hv::rate_limited!(tracing::warn!("virtio-mmio: queue eventfd: {e}"));
        }
    }

    /// Stops all processing until [`Self::resume`]: when this returns (the caller holds the
    /// transport's lock), no request is in progress and none will start, so device state and
    /// guest memory stay as they are. Idempotent.
    pub fn pause(&mut self) {
        self.paused = true;
    }

    /// Lets notifications through again and hands what was notified while paused to the worker
    /// (through the queue's eventfd; without a worker it is processed here). The caller's
    /// thread (API, migration) thus never does device I/O.
    pub fn resume(&mut self) {
        self.paused = false;
        for i in 0..self.pending.len() {
            if !std::mem::take(&mut self.pending[i]) {
                continue;
            }
            match self.queue_events.as_ref().and_then(|e| e.get(i)) {
                Some(event) => {
                    if let Err(e) = event.write(1) {
                        hv::rate_limited!(tracing::warn!("virtio-mmio: queue eventfd: {e}"));
                    }
                }
                None => self.process(i),
            }
        }
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Queue `index` has work (driver notification, a device thread's kick): process it now in
    /// the calling thread, or once resumed if the transport is paused.
    pub fn notify(&mut self, index: u32) {
        if let Ok(i) = usize::try_from(index) {
            self.process(i);
        }
    }

    fn process(&mut self, i: usize) {
        if self.paused {
            if let Some(p) = self.pending.get_mut(i) {
                *p = true;
            }
            return;
        }
        if self.status & (DRIVER_OK | NEEDS_RESET | FAILED) != DRIVER_OK {
            return;
        }
        let Some(queue) = self.queues.get_mut(i) else {
            return;
        };
        if !queue.ready() {
            return;
        }
        match self.device.process_queue(i, queue, &self.mem) {
            Ok(true) => self.signal(VIRTIO_MMIO_INT_VRING),
            Ok(false) => {}
            Err(e) => self.needs_reset(&e),
        }
    }

    /// The device's config space changed: bumps the generation and tells the driver.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.signal(VIRTIO_MMIO_INT_CONFIG);
    }

    fn signal(&mut self, bit: u32) {
        let gained = self.interrupt_status & bit == 0;
        self.interrupt_status |= bit;
        if gained {
            self.interrupt.trigger();
        }
    }

    fn needs_reset(&mut self, err: &DeviceError) {
        hv::rate_limited!(tracing::warn!(
            device = self.device.device_type(),
            "virtio device needs reset: {err}"
        ));
        self.status |= NEEDS_RESET;
        self.signal(VIRTIO_MMIO_INT_CONFIG);
    }

    fn selected_queue(&self) -> Option<&Queue> {
        usize::try_from(self.queue_sel)
            .ok()
            .and_then(|i| self.queues.get(i))
    }

    /// The selected queue, if its registers may be written now.
    fn writable_queue(&mut self) -> Option<&mut Queue> {
        if self.status & (FEATURES_OK | DRIVER_OK | FAILED | NEEDS_RESET) != FEATURES_OK {
            hv::rate_limited!(tracing::debug!(
                status = self.status,
                "virtio-mmio: queue register write refused"
            ));
            return None;
        }
        let i = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(i)
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => low32(self.device.features()),
                1 => low32(self.device.features() >> 32),
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            reg::QUEUE_NUM => self.selected_queue().map_or(0, |q| q.size().into()),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.status != ACK | DRIVER {
                    return;
                }
                match self.driver_features_sel {
                    0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
                    1 => {
                        self.acked_features =
                            (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
            }
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if let Some(q) = self.writable_queue() {
                    let ok = u16::try_from(v).is_ok_and(|size| q.try_set_size(size).is_ok());
                    if !ok {
                        hv::rate_limited!(tracing::debug!(
                            size = v,
                            "virtio-mmio: invalid queue size ignored"
                        ));
                    }
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.writable_queue() {
                    q.set_ready(v == 1);
                }
            }
            reg::QUEUE_DESC_LOW => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            reg::QUEUE_DESC_HIGH => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            reg::QUEUE_AVAIL_LOW => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            reg::QUEUE_AVAIL_HIGH => self.with_queue(|q| q.set_avail_ring_address(None, Some(v))),
            reg::QUEUE_USED_LOW => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            reg::QUEUE_USED_HIGH => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            reg::QUEUE_NOTIFY => self.queue_notify(v),
            reg::INTERRUPT_ACK => self.interrupt_status &= !v,
            reg::STATUS => self.set_status(v),
            reg::SHM_SEL => self.shm_sel = v,
            _ => hv::rate_limited!(tracing::debug!(
                offset,
                "virtio-mmio: write to read-only or unknown register"
            )),
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.writable_queue() {
            f(q);
        }
    }

    fn set_status(&mut self, v: u32) {
        // DEVICE_NEEDS_RESET belongs to the device; a driver echoing it back changes nothing.
        let v = v & !NEEDS_RESET;
        if v == 0 {
            self.reset();
            return;
        }
        let cur = self.status & !NEEDS_RESET;
        if v & cur != cur {
            hv::rate_limited!(tracing::debug!(
                cur,
                v,
                "virtio-mmio: status bits can only be cleared by reset"
            ));
            return;
        }
        let mut new = v & !cur;
        if new & FAILED != 0 {
            self.status |= FAILED;
            new &= !FAILED;
        }
        if new == 0 || self.status & FAILED != 0 {
            return;
        }
        match (cur, new) {
            (0, ACK) => self.status |= ACK,
            (c, DRIVER) if c == ACK => self.status |= DRIVER,
            (c, FEATURES_OK) if c == ACK | DRIVER => {
                if self.features_acceptable() {
                    let acked = self.acked_features;
                    self.queues
                        .iter_mut()
                        .for_each(|q| apply_features(q, acked));
                    self.status |= FEATURES_OK;
                } else {
                    hv::rate_limited!(tracing::debug!(
                        acked = self.acked_features,
                        "virtio-mmio: FEATURES_OK refused"
                    ));
                }
            }
            (c, DRIVER_OK) if c == ACK | DRIVER | FEATURES_OK => {
                self.status |= DRIVER_OK;
                if let Err(e) = self.activate() {
                    self.needs_reset(&e);
                }
            }
            _ => hv::rate_limited!(tracing::debug!(
                cur,
                v,
                "virtio-mmio: illegal status transition ignored"
            )),
        }
    }

    fn features_acceptable(&self) -> bool {
        self.acked_features & !self.device.features() == 0 && self.acked_features & VERSION_1 != 0
    }

    fn activate(&mut self) -> Result<(), DeviceError> {
        for q in &self.queues {
            if q.ready() && !q.is_valid(self.mem.as_ref()) {
                return Err(DeviceError::Memory(q.desc_table()));
            }
        }
        self.device.activate(self.acked_features)
    }

    fn reset(&mut self) {
        self.device.reset();
        self.queues.iter_mut().for_each(|q| q.reset());
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.shm_sel = 0;
        self.interrupt_status = 0;
        self.pending.fill(false);
    }

    pub fn save(&self) -> MmioState {
        MmioState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            shm_sel: self.shm_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self.queues.iter().map(QueueSaved::from).collect(),
            device: self.device.save(),
        }
    }

    /// Rebuilds a transport from saved state around `device` (freshly built from the same
    /// configuration). Every invariant the register interface maintains is checked again; an
    /// active device is re-activated. A pending interrupt is not raised again: the interrupt
    /// controller's own saved state holds it.
    ///
    /// The transport comes back paused, with every queue marked notified: a notification may
    /// have been in flight (in an eventfd) when the state was saved, so [`Self::resume`]
    /// processes each ready queue once.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        mem: Arc<GuestMemory>,
        interrupt: Arc<dyn Interrupt>,
        state: &MmioState,
    ) -> Result<Self, Error> {
        let bad = |m: &str| Err(Error::State(m.to_string()));
        if state.device_type != device.device_type() {
            return bad("device type differs");
        }
        let base = state.status & !(FAILED | NEEDS_RESET);
        let reachable = [
            0,
            ACK,
            ACK | DRIVER,
            ACK | DRIVER | FEATURES_OK,
            ACK | DRIVER | FEATURES_OK | DRIVER_OK,
        ];
        if !reachable.contains(&base) {
            return bad("unreachable status value");
        }
        if state.status & NEEDS_RESET != 0 && base == 0 {
            return bad("needs-reset set on a reset device");
        }
        if state.acked_features & !device.features() != 0 {
            return bad("acked features not offered");
        }
        if base & DRIVER == 0 && state.acked_features != 0 {
            return bad("features acked before DRIVER");
        }
        if base & FEATURES_OK != 0 && state.acked_features & VERSION_1 == 0 {
            return bad("FEATURES_OK without VERSION_1");
        }
        if state.interrupt_status & !(VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG) != 0 {
            return bad("unknown interrupt status bits");
        }
        let max_sizes = device.queue_max_sizes();
        if state.queues.len() != max_sizes.len() {
            return bad("queue count differs");
        }
        let mut queues = Vec::with_capacity(max_sizes.len());
        for (index, (saved, &max)) in state.queues.iter().zip(max_sizes).enumerate() {
            if saved.max_size != max {
                return bad("queue maximum size differs");
            }
            let q = Queue::try_from(QueueState::from(*saved))
                .map_err(|source| Error::Queue { index, source })?;
            if q.ready() && base & FEATURES_OK == 0 {
                return bad("queue ready before FEATURES_OK");
            }
            if base & FEATURES_OK != 0
                && q.event_idx_enabled() != (state.acked_features & EVENT_IDX != 0)
            {
                return bad("queue event index disagrees with features");
            }
            if q.ready() && !q.is_valid(mem.as_ref()) {
                return bad("queue rings outside guest memory");
            }
            queues.push(q);
        }
        let mut t = MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            status: state.status,
            device_features_sel: state.device_features_sel,
            driver_features_sel: state.driver_features_sel,
            acked_features: state.acked_features,
            queue_sel: state.queue_sel,
            shm_sel: state.shm_sel,
            interrupt_status: state.interrupt_status,
            config_generation: state.config_generation,
            queue_events: None,
            paused: true,
            pending: vec![true; state.queues.len()],
        };
        t.device.restore(&state.device).map_err(Error::Device)?;
        if t.status & (DRIVER_OK | NEEDS_RESET | FAILED) == DRIVER_OK {
            t.device.activate(t.acked_features).map_err(Error::Device)?;
        }
        Ok(t)
    }
}

fn low32(v: u64) -> u32 {
    (v & 0xffff_ffff) as u32
}

#[cfg(test)]
mod tests;
