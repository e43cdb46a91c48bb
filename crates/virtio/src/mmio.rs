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
//! Status follows ACKNOWLEDGE → DRIVER → FEATURES_OK → DRIVER_OK; any other transition is
//! ignored (the driver reads back the old value), FAILED may be set at any time, writing 0 resets.
//! Driver features are accepted only in the DRIVER state; FEATURES_OK is refused unless the acked
//! features are a subset of the offered ones and include VERSION_1. Queue registers are writable
//! only between FEATURES_OK and DRIVER_OK. A device failure sets DEVICE_NEEDS_RESET and raises a
//! config-change interrupt; the device then does nothing until the driver resets it.
//!
//! Two locks, so that a register access never waits for device I/O:
//! * the *registers* (status, features, queue configuration, interrupt status, a copy of the
//!   config space) are what the vCPU reads and writes; their lock is only ever held for a few
//!   field updates (and an interrupt edge);
//! * the *device side* (the device model, its live queues) is held while a queue is processed
//!   or the device activated or reset, which may wait for a disk or a socket.
//!
//! A register write never takes the device side once a worker serves the transport
//! ([`MmioTransport::queue_events`], [`crate::Worker`]): QueueNotify signals the queue's eventfd
//! (on plain KVM the vCPU signals it itself through an ioeventfd and the write never reaches the
//! transport), and the status changes the device must act on (DRIVER_OK: activation; 0: reset)
//! only wake the worker, which catches the device side up with the registers before it
//! processes anything ([`MmioTransport::serve`]). Each reset starts a new *epoch*: work the
//! worker finishes for an older epoch raises no interrupt and sets no status. Without a worker
//! (unit tests, fuzzing) the same work runs inline in the writing thread.
//!
//! While the transport is paused ([`MmioTransport::pause`]) nothing touches guest memory or
//! device state: notifications are recorded and served on [`MmioTransport::resume`].
//!
//! Config space writes are dropped: no device here has a writable config field.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

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
    Counters, DeviceError, DeviceState, GuestMemory, Interrupt, MmioHandler, QueueSaved,
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
/// Queues a device may have (notifications are kept as a bit mask).
pub const MAX_QUEUES: usize = 64;
/// Bytes of config space the transport presents.
const CONFIG_SPACE: usize = (WINDOW_SIZE - reg::CONFIG) as usize;
/// Rounds of device-requested queue processing per wake-up (a vsock transmit asks for the
/// receive queue, whose processing asks for nothing); what is left waits for the next wake-up.
const MAX_ROUNDS: u32 = 8;

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
    #[error("device has {0} queues, more than {MAX_QUEUES}")]
    TooManyQueues(usize),
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

/// One virtio device behind a virtio-mmio register window. A handle: clones share the device
/// (the MMIO bus holds one, the worker another).
#[derive(Clone)]
pub struct MmioTransport {
    shared: Arc<SharedTransport>,
}

/// What [`MmioTransport`] handles share (a worker holds it weakly).
pub(crate) struct SharedTransport {
    device_type: u32,
    features: u64,
    /// The device's config space, read once: no device here changes it after creation.
    config: [u8; CONFIG_SPACE],
    max_sizes: Vec<u16>,
    mem: Arc<GuestMemory>,
    interrupt: Arc<dyn Interrupt>,
    regs: Mutex<Regs>,
    /// Lock order: `core` before `regs`.
    core: Mutex<Core>,
    events: OnceLock<Events>,
}

/// The eventfds of a worker-served transport.
pub(crate) struct Events {
    /// One per queue: the queue was notified.
    pub queues: Vec<Arc<EventFd>>,
    /// The registers changed in a way the device side must follow (activation, reset, resume).
    pub wake: EventFd,
}

/// What the driver sees.
struct Regs {
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    shm_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    /// The queues as the driver configured them (size, ready, ring addresses, event index).
    queues: Vec<Queue>,
    /// Bumped by each reset.
    epoch: u64,
    /// The VM is paused: process nothing.
    paused: bool,
    /// Queues notified while paused (bit i = queue i), processed on resume.
    pending: u64,
    /// The device's counters as of its last processing.
    counters: Counters,
}

/// What the worker works on.
struct Core {
    device: Box<dyn VirtioDevice>,
    /// The register epoch the device side follows.
    epoch: u64,
    /// The live queues since the device was activated in `epoch`.
    queues: Option<Vec<Queue>>,
}

/// What a register write leaves for the device side.
enum Action {
    None,
    Notify(u32),
    Wake,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn copy_queue(q: &Queue) -> Queue {
    // A state the queue itself produced is valid.
    Queue::try_from(q.state()).unwrap_or_else(|_| Queue::new(q.max_size()).unwrap_or_default())
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
        let counters = device.counters();
        Self::build(device, mem, interrupt, queues, None, counters, |_| {})
    }

    fn build(
        device: Box<dyn VirtioDevice>,
        mem: Arc<GuestMemory>,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<Queue>,
        live: Option<Vec<Queue>>,
        counters: Counters,
        set: impl FnOnce(&mut Regs),
    ) -> Result<Self, Error> {
        if queues.len() > MAX_QUEUES {
            return Err(Error::TooManyQueues(queues.len()));
        }
        let mut config = [0u8; CONFIG_SPACE];
        device.read_config(0, &mut config);
        let mut regs = Regs {
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            shm_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
            queues,
            epoch: 0,
            paused: false,
            pending: 0,
            counters,
        };
        set(&mut regs);
        Ok(MmioTransport {
            shared: Arc::new(SharedTransport {
                device_type: device.device_type(),
                features: device.features(),
                config,
                max_sizes: device.queue_max_sizes().to_vec(),
                mem,
                interrupt,
                regs: Mutex::new(regs),
                core: Mutex::new(Core {
                    device,
                    epoch: 0,
                    queues: live,
                }),
                events: OnceLock::new(),
            }),
        })
    }

    pub(crate) fn downgrade(&self) -> std::sync::Weak<SharedTransport> {
        Arc::downgrade(&self.shared)
    }

    pub(crate) fn upgrade(weak: &std::sync::Weak<SharedTransport>) -> Option<MmioTransport> {
        weak.upgrade().map(|shared| MmioTransport { shared })
    }

    fn regs(&self) -> MutexGuard<'_, Regs> {
        lock(&self.shared.regs)
    }

    /// The device's counters as of its last processing (never waits for device I/O).
    pub fn counters(&self) -> Counters {
        self.regs().counters
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.regs().status
    }

    pub fn acked_features(&self) -> u64 {
        self.regs().acked_features
    }

    pub fn device_type(&self) -> u32 {
        self.shared.device_type
    }

    /// From now on a QueueNotify write only signals the queue's eventfd (returned here, one
    /// per queue, created on the first call), and status changes only wake the device side,
    /// for a [`crate::Worker`] to do the work.
    pub fn queue_events(&self) -> std::io::Result<Vec<Arc<EventFd>>> {
        Ok(self.events()?.queues.clone())
    }

    pub(crate) fn events(&self) -> std::io::Result<&Events> {
        if let Some(e) = self.shared.events.get() {
            return Ok(e);
        }
        let queues = (0..self.shared.max_sizes.len())
            .map(|_| EventFd::new(EFD_NONBLOCK).map(Arc::new))
            .collect::<std::io::Result<Vec<_>>>()?;
        let wake = EventFd::new(EFD_NONBLOCK)?;
        // Another thread may have won the race: use whichever is in place.
        let _ = self.shared.events.set(Events { queues, wake });
        self.shared
            .events
            .get()
            .ok_or_else(|| std::io::Error::other("virtio-mmio: queue events not set"))
    }

    /// A descriptor the device's worker polls for host-side work (see
    /// [`VirtioDevice::host_fd`]).
    pub(crate) fn host_fd(&self) -> Option<RawFd> {
        lock(&self.shared.core).device.host_fd()
    }

    /// A QueueNotify write.
    fn queue_notify(&self, index: u32) {
        let Some(events) = self.shared.events.get() else {
            self.notify(index);
            return;
        };
        let Some(event) = usize::try_from(index)
            .ok()
            .and_then(|i| events.queues.get(i))
        else {
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

    /// The device side must catch up with the registers: wake the worker, or without one do it
    /// here.
    fn wake(&self) {
        match self.shared.events.get() {
            Some(events) => {
                if let Err(e) = events.wake.write(1) {
                    hv::rate_limited!(tracing::warn!("virtio-mmio: wake eventfd: {e}"));
                }
            }
            None => {
                self.serve(0, false);
            }
        }
    }

    /// Stops all processing until [`Self::resume`]: when this returns, no request is in
    /// progress and none will start, so device state and guest memory stay as they are. Waits
    /// for the request in progress, if any (callers are the API and migration threads).
    /// Idempotent.
    pub fn pause(&self) {
        self.regs().paused = true;
        drop(lock(&self.shared.core));
    }

    /// Lets notifications through again and has what was notified while paused processed by
    /// the worker (without a worker, here). The caller's thread (API, migration) thus never
    /// does device I/O.
    pub fn resume(&self) {
        self.regs().paused = false;
        self.wake();
    }

    pub fn is_paused(&self) -> bool {
        self.regs().paused
    }

    /// Queue `index` has work: process it now in the calling thread, or once resumed if the
    /// transport is paused.
    pub fn notify(&self, index: u32) {
        if let Some(bit) = 1u64.checked_shl(index) {
            self.serve(bit, false);
        }
    }

    /// The device's config space changed: bumps the generation and tells the driver.
    pub fn config_changed(&self) {
        let mut r = self.regs();
        r.config_generation = r.config_generation.wrapping_add(1);
        self.shared.signal(&mut r, VIRTIO_MMIO_INT_CONFIG);
    }

    /// The device side's work, on the worker (or inline without one): follow a reset or an
    /// activation of the registers, handle the device's host-side events if `host` (its
    /// [`VirtioDevice::host_fd`] is readable), then process the queues in `notified` (bit i =
    /// queue i), those notified while paused, and those the device asks for. Returns whether
    /// the device's host descriptor should be polled now (active, not paused).
    pub(crate) fn serve(&self, mut notified: u64, host: bool) -> bool {
        let sh = &*self.shared;
        let mut guard = lock(&sh.core);
        let core = &mut *guard;
        let (epoch, status) = {
            let mut r = self.regs();
            if r.paused {
                r.pending |= notified;
                return false;
            }
            notified |= std::mem::take(&mut r.pending);
            (r.epoch, r.status)
        };
        if core.epoch != epoch {
            core.device.reset();
            core.queues = None;
            core.epoch = epoch;
        }
        if status & (DRIVER_OK | NEEDS_RESET | FAILED) != DRIVER_OK {
            sh.publish(core);
            return false;
        }
        if core.queues.is_none() && !sh.activate(core, epoch) {
            sh.publish(core);
            return false;
        }
        if host {
            core.device.host_event();
        }
        let mut rounds = 0;
        loop {
            notified |= core.device.take_kicks();
            if notified == 0 {
                break;
            }
            if rounds == MAX_ROUNDS {
                // Left for the next wake-up, which this asks for.
                self.regs().pending |= notified;
                if let Some(events) = sh.events.get() {
                    let _ = events.wake.write(1);
                }
                break;
            }
            rounds += 1;
            for i in 0..sh.max_sizes.len() {
                if notified & (1 << i) != 0 && !sh.process(core, i, epoch) {
                    sh.publish(core);
                    return false;
                }
            }
            notified = 0;
        }
        sh.publish(core);
        true
    }

    pub fn save(&self) -> MmioState {
        let core = lock(&self.shared.core);
        let r = self.regs();
        let queues = match &core.queues {
            Some(live) if core.epoch == r.epoch => live,
            _ => &r.queues,
        };
        MmioState {
            device_type: self.shared.device_type,
            status: r.status,
            device_features_sel: r.device_features_sel,
            driver_features_sel: r.driver_features_sel,
            acked_features: r.acked_features,
            queue_sel: r.queue_sel,
            shm_sel: r.shm_sel,
            interrupt_status: r.interrupt_status,
            config_generation: r.config_generation,
            queues: queues.iter().map(QueueSaved::from).collect(),
            device: core.device.save(),
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
        mut device: Box<dyn VirtioDevice>,
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
        device.restore(&state.device).map_err(Error::Device)?;
        if state.status & (DRIVER_OK | NEEDS_RESET | FAILED) == DRIVER_OK {
            device
                .activate(state.acked_features)
                .map_err(Error::Device)?;
        }
        let live = (base & DRIVER_OK != 0).then(|| queues.iter().map(copy_queue).collect());
        let all = u64::MAX.checked_shr(64 - queues.len() as u32).unwrap_or(0);
        let counters = device.counters();
        Self::build(device, mem, interrupt, queues, live, counters, |r| {
            r.status = state.status;
            r.device_features_sel = state.device_features_sel;
            r.driver_features_sel = state.driver_features_sel;
            r.acked_features = state.acked_features;
            r.queue_sel = state.queue_sel;
            r.shm_sel = state.shm_sel;
            r.interrupt_status = state.interrupt_status;
            r.config_generation = state.config_generation;
            r.paused = true;
            r.pending = all;
        })
    }
}

/// The transport's register window, mapped on the platform's MMIO bus.
impl MmioHandler for MmioTransport {
    /// MMIO read of `data.len()` bytes at `offset` inside the window.
    fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            crate::read_config_bytes(&self.shared.config, offset - reg::CONFIG, data);
            return;
        }
        let value = if data.len() == 4 && offset.is_multiple_of(4) {
            self.shared.read_reg(&self.regs(), offset)
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
    fn write(&self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            hv::rate_limited!(tracing::debug!(
                offset,
                "virtio-mmio: config space write dropped"
            ));
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
        let action = self
            .shared
            .write_reg(&mut self.regs(), offset, u32::from_le_bytes(bytes));
        match action {
            Action::None => {}
            Action::Notify(index) => self.queue_notify(index),
            Action::Wake => self.wake(),
        }
    }
}

impl SharedTransport {
    /// Activates the device with the queues the driver configured in `epoch` (unless the
    /// driver has reset it since). Returns whether the queues may be processed.
    fn activate(&self, core: &mut Core, epoch: u64) -> bool {
        let (acked, queues) = {
            let r = lock(&self.regs);
            if r.epoch != epoch {
                return false;
            }
            (
                r.acked_features,
                r.queues.iter().map(copy_queue).collect::<Vec<_>>(),
            )
        };
        for q in &queues {
            if q.ready() && !q.is_valid(self.mem.as_ref()) {
                self.needs_reset(epoch, &DeviceError::Memory(q.desc_table()));
                return false;
            }
        }
        if let Err(e) = core.device.activate(acked) {
            self.needs_reset(epoch, &e);
            return false;
        }
        core.queues = Some(queues);
        true
    }

    /// Processes queue `i`; false when the device failed (it then needs a reset).
    fn process(&self, core: &mut Core, i: usize, epoch: u64) -> bool {
        let Core { device, queues, .. } = core;
        let Some(queue) = queues.as_mut().and_then(|q| q.get_mut(i)) else {
            return true;
        };
        if !queue.ready() {
            return true;
        }
        match device.process_queue(i, queue, &self.mem) {
            Ok(true) => {
                let mut r = lock(&self.regs);
                if r.epoch == epoch {
                    self.signal(&mut r, VIRTIO_MMIO_INT_VRING);
                }
                true
            }
            Ok(false) => true,
            Err(e) => {
                self.needs_reset(epoch, &e);
                false
            }
        }
    }

    fn publish(&self, core: &Core) {
        lock(&self.regs).counters = core.device.counters();
    }

    fn signal(&self, r: &mut Regs, bit: u32) {
        let gained = r.interrupt_status & bit == 0;
        r.interrupt_status |= bit;
        if gained {
            self.interrupt.trigger();
        }
    }

    /// The device failed in `epoch`: DEVICE_NEEDS_RESET and a config interrupt, unless the
    /// driver reset it meanwhile.
    fn needs_reset(&self, epoch: u64, err: &DeviceError) {
        hv::rate_limited!(tracing::warn!(
            device = self.device_type,
            "virtio device needs reset: {err}"
        ));
        let mut r = lock(&self.regs);
        if r.epoch != epoch {
            return;
        }
        r.status |= NEEDS_RESET;
        self.signal(&mut r, VIRTIO_MMIO_INT_CONFIG);
    }

    fn selected_queue<'r>(&self, r: &'r Regs) -> Option<&'r Queue> {
        usize::try_from(r.queue_sel)
            .ok()
            .and_then(|i| r.queues.get(i))
    }

    /// The selected queue, if its registers may be written now.
    fn writable_queue<'r>(&self, r: &'r mut Regs) -> Option<&'r mut Queue> {
        if r.status & (FEATURES_OK | DRIVER_OK | FAILED | NEEDS_RESET) != FEATURES_OK {
            hv::rate_limited!(tracing::debug!(
                status = r.status,
                "virtio-mmio: queue register write refused"
            ));
            return None;
        }
        let i = usize::try_from(r.queue_sel).ok()?;
        r.queues.get_mut(i)
    }

    fn read_reg(&self, r: &Regs, offset: u64) -> u32 {
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device_type,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match r.device_features_sel {
                0 => low32(self.features),
                1 => low32(self.features >> 32),
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue(r).map_or(0, |q| q.max_size().into()),
            reg::QUEUE_NUM => self.selected_queue(r).map_or(0, |q| q.size().into()),
            reg::QUEUE_READY => self.selected_queue(r).map_or(0, |q| q.ready().into()),
            reg::INTERRUPT_STATUS => r.interrupt_status,
            reg::STATUS => r.status,
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::CONFIG_GENERATION => r.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&self, r: &mut Regs, offset: u64, v: u32) -> Action {
        match offset {
            reg::DEVICE_FEATURES_SEL => r.device_features_sel = v,
            reg::DRIVER_FEATURES => {
                if r.status != ACK | DRIVER {
                    return Action::None;
                }
                match r.driver_features_sel {
                    0 => r.acked_features = (r.acked_features & !0xffff_ffff) | u64::from(v),
                    1 => r.acked_features = (r.acked_features & 0xffff_ffff) | (u64::from(v) << 32),
                    _ => {}
                }
            }
            reg::DRIVER_FEATURES_SEL => r.driver_features_sel = v,
            reg::QUEUE_SEL => r.queue_sel = v,
            reg::QUEUE_NUM => {
                if let Some(q) = self.writable_queue(r) {
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
                if let Some(q) = self.writable_queue(r) {
                    q.set_ready(v == 1);
                }
            }
            reg::QUEUE_DESC_LOW => self.with_queue(r, |q| q.set_desc_table_address(Some(v), None)),
            reg::QUEUE_DESC_HIGH => self.with_queue(r, |q| q.set_desc_table_address(None, Some(v))),
            reg::QUEUE_AVAIL_LOW => self.with_queue(r, |q| q.set_avail_ring_address(Some(v), None)),
            reg::QUEUE_AVAIL_HIGH => {
                self.with_queue(r, |q| q.set_avail_ring_address(None, Some(v)))
            }
            reg::QUEUE_USED_LOW => self.with_queue(r, |q| q.set_used_ring_address(Some(v), None)),
            reg::QUEUE_USED_HIGH => self.with_queue(r, |q| q.set_used_ring_address(None, Some(v))),
            reg::QUEUE_NOTIFY => return Action::Notify(v),
            reg::INTERRUPT_ACK => r.interrupt_status &= !v,
            reg::STATUS => return self.set_status(r, v),
            reg::SHM_SEL => r.shm_sel = v,
            _ => hv::rate_limited!(tracing::debug!(
                offset,
                "virtio-mmio: write to read-only or unknown register"
            )),
        }
        Action::None
    }

    fn with_queue(&self, r: &mut Regs, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.writable_queue(r) {
            f(q);
        }
    }

    fn set_status(&self, r: &mut Regs, v: u32) -> Action {
        // DEVICE_NEEDS_RESET belongs to the device; a driver echoing it back changes nothing.
        let v = v & !NEEDS_RESET;
        if v == 0 {
            reset(r);
            return Action::Wake;
        }
        let cur = r.status & !NEEDS_RESET;
        if v & cur != cur {
            hv::rate_limited!(tracing::debug!(
                cur,
                v,
                "virtio-mmio: status bits can only be cleared by reset"
            ));
            return Action::None;
        }
        let mut new = v & !cur;
        if new & FAILED != 0 {
            r.status |= FAILED;
            new &= !FAILED;
        }
        if new == 0 || r.status & FAILED != 0 {
            return Action::None;
        }
        match (cur, new) {
            (0, ACK) => r.status |= ACK,
            (c, DRIVER) if c == ACK => r.status |= DRIVER,
            (c, FEATURES_OK) if c == ACK | DRIVER => {
                if r.acked_features & !self.features == 0 && r.acked_features & VERSION_1 != 0 {
                    let acked = r.acked_features;
                    r.queues.iter_mut().for_each(|q| apply_features(q, acked));
                    r.status |= FEATURES_OK;
                } else {
                    hv::rate_limited!(tracing::debug!(
                        acked = r.acked_features,
                        "virtio-mmio: FEATURES_OK refused"
                    ));
                }
            }
            (c, DRIVER_OK) if c == ACK | DRIVER | FEATURES_OK => {
                r.status |= DRIVER_OK;
                return Action::Wake;
            }
            _ => hv::rate_limited!(tracing::debug!(
                cur,
                v,
                "virtio-mmio: illegal status transition ignored"
            )),
        }
        Action::None
    }
}

/// The driver wrote 0 to the status register: the registers are reset at once (the driver
/// reads 0 back), the device side follows when it next runs (a new epoch).
fn reset(r: &mut Regs) {
    r.queues.iter_mut().for_each(|q| q.reset());
    r.status = 0;
    r.device_features_sel = 0;
    r.driver_features_sel = 0;
    r.acked_features = 0;
    r.queue_sel = 0;
    r.shm_sel = 0;
    r.interrupt_status = 0;
    r.pending = 0;
    r.epoch = r.epoch.wrapping_add(1);
}

fn low32(v: u64) -> u32 {
    (v & 0xffff_ffff) as u32
}

#[cfg(test)]
mod tests;
