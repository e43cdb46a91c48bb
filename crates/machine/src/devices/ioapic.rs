//! An 82093AA-style IOAPIC with 24 pins that turns pin edges into MSIs.
//!
//! Registers (32-bit, indirect through IOREGSEL at offset 0x00 and IOWIN at 0x10):
//! 0x00 ID (bits 27:24), 0x01 version 0x0017_0011, 0x02 arbitration (reads as ID),
//! 0x10 + 2n / 0x11 + 2n redirection entry n low / high.
//!
//! An edge on an unmasked pin sends one MSI to the backend (`hv::Vm::signal_msi`): address
//! `0xfee0_0000 | dest << 12 | dest_mode << 2`, data `vector | delivery_mode << 8`. An edge on a
//! masked pin is remembered and delivered when the pin is unmasked. Level-triggered entries are
//! treated as edge-triggered: the trigger-mode bit is stored but every `trigger()` is one edge, the
//! MSI is always edge, and Remote IRR stays 0 (no device on this platform holds a line asserted).
//!
//! Fast path (backends with irqfds, i.e. plain KVM): a pin whose line asked for it
//! ([`IrqLine::enable_irqfd`]) gets an eventfd registered as the irqfd of GSI = pin, with an
//! MSI route kept equal to the pin's redirection entry on every entry write, as QEMU's split
//! irqchip does. The irqfd is registered only while the pin is unmasked and edge-triggered; an
//! edge then writes the eventfd and the backend injects the MSI by itself. A masked or
//! level-triggered pin deregisters it, and edges take the path above (pending edge while
//! masked), so both paths deliver the same interrupts. Every decision is taken under the register
//! lock, so an edge never races a mask change.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use hv::EventFd;
use serde::{Deserialize, Serialize};

use super::MmioHandler;

/// Number of pins (and redirection entries).
pub const NUM_PINS: usize = 24;
/// Version register: 24 entries (max index 0x17), version 0x11.
pub const VERSION: u32 = 0x0017_0011;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;

const RTE_MASKED: u64 = 1 << 16;
const RTE_LEVEL: u64 = 1 << 15;
/// Bits the guest can write in the low dword: vector, delivery mode, destination mode,
/// polarity, trigger mode, mask. Delivery status (12) and Remote IRR (14) are read-only 0.
const RTE_LOW_WRITABLE: u64 = 0xff | (7 << 8) | (1 << 11) | (1 << 13) | (1 << 15) | RTE_MASKED;
/// Writable bits of the high dword: the 8-bit destination (63:56).
const RTE_HIGH_WRITABLE: u64 = 0xff << 56;
const RTE_VALID: u64 = RTE_LOW_WRITABLE | RTE_HIGH_WRITABLE;
const ID_MASK: u32 = 0x0f00_0000;
const PIN_MASK: u32 = (1 << NUM_PINS) - 1;

/// The MSI an IOAPIC redirection entry sends: `(address, data)`.
pub fn msi_for_entry(rte: u64) -> (u64, u32) {
    let vector = (rte & 0xff) as u32;
    let delivery_mode = ((rte >> 8) & 7) as u32;
    let dest_mode = (rte >> 11) & 1;
    let dest = (rte >> 56) & 0xff;
    let addr = crate::layout::LAPIC_BASE | (dest << 12) | (dest_mode << 2);
    (addr, vector | (delivery_mode << 8))
}

/// Saved IOAPIC state. Restored only through [`IoapicState::validate`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoapicState {
    /// ID register (bits 27:24).
    pub id: u32,
    /// Last value written to IOREGSEL (8 bits).
    pub ioregsel: u32,
    /// The 24 redirection entries.
    pub redirection: Vec<u64>,
    /// Bit n: an edge arrived on pin n while it was masked.
    pub pending_edges: u32,
}

impl Default for IoapicState {
    fn default() -> Self {
        IoapicState {
            id: 0,
            ioregsel: 0,
            redirection: vec![RTE_MASKED; NUM_PINS],
            pending_edges: 0,
        }
    }
}

impl IoapicState {
    pub fn validate(&self) -> Result<(), String> {
        if self.id & !ID_MASK != 0 {
            return Err(format!(
                "IOAPIC ID register {:#x} has reserved bits",
                self.id
            ));
        }
        if self.ioregsel > 0xff {
            return Err(format!(
                "IOAPIC IOREGSEL {:#x} is out of range",
                self.ioregsel
            ));
        }
        if self.redirection.len() != NUM_PINS {
            return Err(format!(
                "IOAPIC has {} redirection entries, expected {NUM_PINS}",
                self.redirection.len()
            ));
        }
        if let Some((pin, rte)) = self
            .redirection
            .iter()
            .enumerate()
            .find(|(_, r)| **r & !RTE_VALID != 0)
        {
            return Err(format!(
                "IOAPIC redirection entry {pin} ({rte:#x}) has reserved bits"
            ));
        }
        if self.pending_edges & !PIN_MASK != 0 {
            return Err(format!(
                "IOAPIC pending edges {:#x} name pins beyond {NUM_PINS}",
                self.pending_edges
            ));
        }
        Ok(())
    }
}

/// Interrupt delivery counters.
#[derive(Default)]
pub struct IoapicCounters {
    /// MSIs sent, through `signal_msi` or a pin's irqfd.
    pub msi_sent: AtomicU64,
    pub msi_failed: AtomicU64,
    /// MSIs that could not be sent because no VM was attached yet.
    pub msi_no_vm: AtomicU64,
    /// Triggers of pins that do not exist.
    pub bad_pin: AtomicU64,
}

/// The irqfd of one pin.
struct PinIrqfd {
    fd: EventFd,
    /// Registered with the VM: the pin is unmasked and edge-triggered and its route is current.
    assigned: bool,
}

pub struct Ioapic {
    regs: Mutex<IoapicState>,
    /// One slot per pin; locked only with `regs` held (order: `regs`, then `irqfds`).
    irqfds: Mutex<Vec<Option<PinIrqfd>>>,
    vm: RwLock<Option<Arc<dyn hv::Vm>>>,
    pub counters: IoapicCounters,
}

impl Default for Ioapic {
    fn default() -> Self {
        Self::new()
    }
}

impl Ioapic {
    pub fn new() -> Ioapic {
        Ioapic {
            regs: Mutex::new(IoapicState::default()),
            irqfds: Mutex::new((0..NUM_PINS).map(|_| None).collect()),
            vm: RwLock::new(None),
            counters: IoapicCounters::default(),
        }
    }

    pub fn attach_vm(&self, vm: Arc<dyn hv::Vm>) {
        *self.vm.write().unwrap_or_else(|e| e.into_inner()) = Some(vm);
    }

    fn regs(&self) -> MutexGuard<'_, IoapicState> {
        // A panic while holding the lock cannot leave the registers inconsistent (every update
        // is a single assignment), so a poisoned lock is still usable.
        self.regs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn irqfds(&self) -> MutexGuard<'_, Vec<Option<PinIrqfd>>> {
        self.irqfds.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn vm(&self) -> Option<Arc<dyn hv::Vm>> {
        self.vm.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Gives `pin` an irqfd if the attached VM supports MSI routes and irqfds. Returns whether
    /// it did; without, the pin keeps the `signal_msi` path. Idempotent.
    pub fn enable_irqfd(&self, pin: u32) -> bool {
        let Some(vm) = self.vm() else { return false };
        let regs = self.regs();
        let Some(&rte) = regs.redirection.get(pin as usize) else {
            return false;
        };
        let mut irqfds = self.irqfds();
        let Some(slot) = irqfds.get_mut(pin as usize) else {
            return false;
        };
        if slot.is_some() {
            return true;
        }
        // Setting the route is also the probe for support.
        let (addr, data) = msi_for_entry(rte);
        match vm.set_msi_route(pin, addr, data) {
            Ok(()) => {}
            Err(hv::Error::Unsupported(_)) => return false,
            Err(e) => {
                tracing::warn!("IOAPIC: no irqfd for pin {pin}: {}", hv::Chain(&e));
                return false;
            }
        }
        let fd = match EventFd::new(hv::EFD_NONBLOCK) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!("IOAPIC: no irqfd for pin {pin}: {}", hv::Chain(&e));
                return false;
            }
        };
        let mut irqfd = PinIrqfd {
            fd,
            assigned: false,
        };
        sync_irqfd(vm.as_ref(), pin, rte, &mut irqfd);
        *slot = Some(irqfd);
        true
    }

    /// Whether `pin` currently delivers through its irqfd.
    pub fn irqfd_active(&self, pin: u32) -> bool {
        let _regs = self.regs();
        self.irqfds()
            .get(pin as usize)
            .and_then(Option::as_ref)
            .is_some_and(|i| i.assigned)
    }

    /// Brings `pin`'s irqfd (if any) in line with `rte`. Called with the register lock held.
    fn sync_pin(&self, pin: usize, rte: u64) {
        let mut irqfds = self.irqfds();
        let Some(Some(irqfd)) = irqfds.get_mut(pin) else {
            return;
        };
        let Some(vm) = self.vm() else { return };
        sync_irqfd(vm.as_ref(), pin as u32, rte, irqfd);
    }

    /// One edge on `pin`.
    pub fn trigger(&self, pin: u32) {
        let msi = {
            let mut regs = self.regs();
            let Some(&rte) = regs.redirection.get(pin as usize) else {
                self.counters.bad_pin.fetch_add(1, Ordering::Relaxed);
                return;
            };
            if rte & RTE_MASKED != 0 {
                regs.pending_edges |= 1 << pin;
                return;
            }
            if let Some(Some(irqfd)) = self.irqfds().get(pin as usize)
                && irqfd.assigned
            {
                match irqfd.fd.write(1) {
                    Ok(()) => {
                        self.counters.msi_sent.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Err(e) => {
                        hv::rate_limited!(tracing::warn!(
                            "IOAPIC: irqfd of pin {pin} failed: {}",
                            hv::Chain(&e)
                        ))
                    }
                }
            }
            msi_for_entry(rte)
        };
        self.send(msi);
    }

    /// Sends an MSI outside the register lock, so a backend that takes its own locks in
    /// `signal_msi` never nests them inside ours.
    fn send(&self, (addr, data): (u64, u32)) {
        let Some(vm) = self.vm() else {
            self.counters.msi_no_vm.fetch_add(1, Ordering::Relaxed);
            return;
        };
        match vm.signal_msi(addr, data) {
            Ok(()) => {
                self.counters.msi_sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                let n = self.counters.msi_failed.fetch_add(1, Ordering::Relaxed);
                if n < 10 {
                    tracing::warn!("IOAPIC: MSI {addr:#x}/{data:#x} failed: {}", hv::Chain(&e));
                }
            }
        }
    }

    fn read_register(regs: &IoapicState) -> u32 {
        match regs.ioregsel {
            0x00 | 0x02 => regs.id,
            0x01 => VERSION,
            i @ 0x10..=0x3f => {
                let rte = regs.redirection[((i - 0x10) / 2) as usize];
                if i % 2 == 0 {
                    rte as u32
                } else {
                    (rte >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    /// Writes the selected register; returns the MSI to send when unmasking a pin with a
    /// pending edge.
    fn write_register(regs: &mut IoapicState, value: u32) -> Option<(u64, u32)> {
        match regs.ioregsel {
            0x00 => regs.id = value & ID_MASK,
            i @ 0x10..=0x3f => {
                let pin = ((i - 0x10) / 2) as usize;
                let old = regs.redirection[pin];
                let new = if i % 2 == 0 {
                    (old & !RTE_LOW_WRITABLE) | (u64::from(value) & RTE_LOW_WRITABLE)
                } else {
                    (old & !RTE_HIGH_WRITABLE) | ((u64::from(value) << 32) & RTE_HIGH_WRITABLE)
                };
                regs.redirection[pin] = new;
                if new & RTE_MASKED == 0 && regs.pending_edges & (1 << pin) != 0 {
                    regs.pending_edges &= !(1 << pin);
                    return Some(msi_for_entry(new));
                }
            }
            _ => {}
        }
        None
    }

    pub fn state(&self) -> IoapicState {
        self.regs().clone()
    }

    /// Replaces the registers; `state` must have passed [`IoapicState::validate`].
    pub fn restore(&self, state: &IoapicState) -> Result<(), String> {
        state.validate()?;
        let mut regs = self.regs();
        *regs = state.clone();
        for (pin, &rte) in regs.redirection.iter().enumerate() {
            self.sync_pin(pin, rte);
        }
        Ok(())
    }
}

/// The pin whose redirection entry register `ioregsel` selects.
fn rte_pin(ioregsel: u32) -> Option<usize> {
    match ioregsel {
        i @ 0x10..=0x3f => Some(((i - 0x10) / 2) as usize),
        _ => None,
    }
}

/// Registers `irqfd` while `rte` is unmasked and edge-triggered (after making GSI `pin` route to
/// its MSI), deregisters it otherwise. A failure leaves it deregistered: edges then take the
/// `signal_msi` path.
fn sync_irqfd(vm: &dyn hv::Vm, pin: u32, rte: u64, irqfd: &mut PinIrqfd) {
    let wanted = rte & (RTE_MASKED | RTE_LEVEL) == 0;
    if wanted {
        let (addr, data) = msi_for_entry(rte);
        let routed = vm.set_msi_route(pin, addr, data);
        let registered = routed.and_then(|()| {
            if irqfd.assigned {
                Ok(())
            } else {
                vm.register_irqfd(pin, &irqfd.fd)
            }
        });
        match registered {
            Ok(()) => irqfd.assigned = true,
            Err(e) => {
                hv::rate_limited!(tracing::warn!(
                    "IOAPIC: irqfd of pin {pin} not usable: {}",
                    hv::Chain(&e)
                ));
                if irqfd.assigned {
                    let _ = vm.unregister_irqfd(pin, &irqfd.fd);
                    irqfd.assigned = false;
                }
            }
        }
    } else if irqfd.assigned {
        if let Err(e) = vm.unregister_irqfd(pin, &irqfd.fd) {
            hv::rate_limited!(tracing::warn!(
                "IOAPIC: cannot deregister the irqfd of pin {pin}: {}",
                hv::Chain(&e)
            ));
        }
        irqfd.assigned = false;
    }
}

fn le_value(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

impl MmioHandler for Ioapic {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let regs = self.regs();
        let value = match offset & !3 {
            IOREGSEL => regs.ioregsel,
            IOWIN => Self::read_register(&regs),
            _ => 0,
        };
        let bytes = u64::from(value).to_le_bytes();
        let shift = (offset & 3) as usize;
        for (i, d) in data.iter_mut().enumerate() {
            *d = bytes.get(shift + i).copied().unwrap_or(0);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let value = le_value(data);
        let msi = {
            let mut regs = self.regs();
            match offset {
                IOREGSEL => {
                    regs.ioregsel = value & 0xff;
                    None
                }
                IOWIN => {
                    let msi = Self::write_register(&mut regs, value);
                    if let Some(pin) = rte_pin(regs.ioregsel) {
                        self.sync_pin(pin, regs.redirection[pin]);
                    }
                    msi
                }
                _ => None,
            }
        };
        if let Some(msi) = msi {
            self.send(msi);
        }
    }
}

/// An interrupt line into one IOAPIC pin. Cheap to clone; usable from any thread.
#[derive(Clone)]
pub struct IrqLine {
    ioapic: Arc<Ioapic>,
    pin: u32,
}

/// A device's interrupt is an edge on its pin: a virtio transport takes the line itself.
impl hv::Interrupt for IrqLine {
    /// Signals one edge on the pin.
    fn trigger(&self) {
        self.ioapic.trigger(self.pin);
    }
}

impl IrqLine {
    pub fn new(ioapic: Arc<Ioapic>, pin: u32) -> IrqLine {
        IrqLine { ioapic, pin }
    }

    pub fn pin(&self) -> u32 {
        self.pin
    }

    /// Lets the pin deliver through an irqfd when the backend has them (see the module docs).
    /// Returns whether it will.
    pub fn enable_irqfd(&self) -> bool {
        self.ioapic.enable_irqfd(self.pin)
    }
}

impl std::fmt::Debug for IrqLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IrqLine({})", self.pin)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use hv::Interrupt as _;

    use super::*;

    /// A VM that records MSIs, and with `irqfd` set, MSI routes and registered irqfds.
    #[derive(Default)]
    pub(crate) struct FakeVm {
        pub msis: Mutex<Vec<(u64, u32)>>,
        pub irqfd: bool,
        pub routes: Mutex<std::collections::BTreeMap<u32, (u64, u32)>>,
        pub irqfds: Mutex<std::collections::BTreeSet<u32>>,
    }

    impl FakeVm {
        pub fn take(&self) -> Vec<(u64, u32)> {
            std::mem::take(&mut *self.msis.lock().unwrap())
        }
    }

    impl hv::Vm for FakeVm {
        fn kind(&self) -> hv::BackendKind {
            hv::BackendKind::Emu
        }
        fn create_vcpu(&self, _id: u32) -> hv::Result<Box<dyn hv::Vcpu>> {
            Err(hv::Error::Incompatible("fake".into()))
        }
        fn signal_msi(&self, addr: u64, data: u32) -> hv::Result<()> {
            self.msis.lock().unwrap().push((addr, data));
            Ok(())
        }
        fn tsc_khz(&self) -> u32 {
            1_000_000
        }
        fn set_dirty_tracking(&self, _enabled: bool) -> hv::Result<()> {
            Ok(())
        }
        fn take_dirty_log(&self) -> hv::Result<Vec<u64>> {
            Ok(Vec::new())
        }
        fn state(&self) -> hv::Result<hv::VmState> {
            Ok(hv::VmState::default())
        }
        fn set_state(&self, _state: &hv::VmState) -> hv::Result<()> {
            Ok(())
        }
        fn set_msi_route(&self, gsi: u32, addr: u64, data: u32) -> hv::Result<()> {
            if !self.irqfd {
                return Err(hv::Error::Unsupported("interrupt routing"));
            }
            self.routes.lock().unwrap().insert(gsi, (addr, data));
            Ok(())
        }
        fn register_irqfd(&self, gsi: u32, _fd: &EventFd) -> hv::Result<()> {
            assert!(self.irqfds.lock().unwrap().insert(gsi), "registered twice");
            Ok(())
        }
        fn unregister_irqfd(&self, gsi: u32, _fd: &EventFd) -> hv::Result<()> {
            assert!(self.irqfds.lock().unwrap().remove(&gsi), "not registered");
            Ok(())
        }
    }

    fn write_reg(io: &Ioapic, reg: u32, value: u32) {
        io.write(IOREGSEL, &reg.to_le_bytes());
        io.write(IOWIN, &value.to_le_bytes());
    }

    fn read_reg(io: &Ioapic, reg: u32) -> u32 {
        io.write(IOREGSEL, &reg.to_le_bytes());
        let mut b = [0u8; 4];
        io.read(IOWIN, &mut b);
        u32::from_le_bytes(b)
    }

    fn setup() -> (Arc<Ioapic>, Arc<FakeVm>) {
        let io = Arc::new(Ioapic::new());
        let vm = Arc::new(FakeVm::default());
        io.attach_vm(vm.clone());
        (io, vm)
    }

    #[test]
    fn identification_registers() {
        let (io, _) = setup();
        assert_eq!(read_reg(&io, 1), 0x0017_0011);
        write_reg(&io, 0, 0xffff_ffff);
        assert_eq!(read_reg(&io, 0), 0x0f00_0000);
        assert_eq!(read_reg(&io, 2), 0x0f00_0000);
        // Reset: every entry masked.
        assert_eq!(read_reg(&io, 0x10 + 2 * 23), 0x1_0000);
    }

    #[test]
    fn msi_encoding() {
        // Physical destination 3, fixed, vector 0x31.
        assert_eq!(msi_for_entry((3 << 56) | 0x31), (0xfee0_3000, 0x31));
        // Logical destination 0x0f, lowest priority, vector 0x40.
        let rte = (0x0f << 56) | (1 << 11) | (1 << 8) | 0x40;
        assert_eq!(msi_for_entry(rte), (0xfee0_f004, 0x140));
    }

    #[test]
    fn redirection_and_delivery() {
        let (io, vm) = setup();
        let line = IrqLine::new(io.clone(), 4);
        // Masked at reset: the edge is remembered, nothing sent.
        line.trigger();
        assert!(vm.take().is_empty());
        assert_eq!(io.state().pending_edges, 1 << 4);
        // Program destination 2, then unmask with vector 0x24: the pending edge goes out.
        write_reg(&io, 0x11 + 8, 2 << 24);
        write_reg(&io, 0x10 + 8, 0x24);
        assert_eq!(vm.take(), vec![(0xfee0_2000, 0x24)]);
        assert_eq!(io.state().pending_edges, 0);
        line.trigger();
        line.trigger();
        assert_eq!(vm.take().len(), 2);
        // Read-only bits stay clear; reserved high bits are dropped.
        write_reg(&io, 0x10 + 8, 0x24 | (1 << 12) | (1 << 14));
        assert_eq!(read_reg(&io, 0x10 + 8), 0x24);
        write_reg(&io, 0x11 + 8, 0x00ff_ffff | (5 << 24));
        assert_eq!(read_reg(&io, 0x11 + 8), 5 << 24);
        // Level-triggered entries behave as edge: one MSI per trigger, no Remote IRR.
        write_reg(&io, 0x10 + 8, 0x24 | (1 << 15));
        line.trigger();
        assert_eq!(vm.take(), vec![(0xfee0_5000, 0x24)]);
        assert_eq!(read_reg(&io, 0x10 + 8) & (1 << 14), 0);
        // Pins beyond 23 are counted, not delivered.
        IrqLine::new(io.clone(), 24).trigger();
        assert_eq!(io.counters.bad_pin.load(Ordering::Relaxed), 1);
        assert_eq!(io.counters.msi_sent.load(Ordering::Relaxed), 4);
    }

    /// Count written to pin `pin`'s irqfd since the last call.
    fn irqfd_count(io: &Ioapic, pin: usize) -> u64 {
        let irqfds = io.irqfds();
        irqfds[pin].as_ref().unwrap().fd.read().unwrap_or(0)
    }

    #[test]
    fn irqfd_follows_the_redirection_entry() {
        let io = Arc::new(Ioapic::new());
        let vm = Arc::new(FakeVm {
            irqfd: true,
            ..FakeVm::default()
        });
        io.attach_vm(vm.clone());
        let line = IrqLine::new(io.clone(), 4);
        assert!(line.enable_irqfd());
        assert!(line.enable_irqfd(), "idempotent");
        // Masked: not registered, edges are remembered by the IOAPIC as before.
        assert!(!io.irqfd_active(4));
        line.trigger();
        assert_eq!(io.state().pending_edges, 1 << 4);
        // Unmasking routes GSI 4 to the entry's MSI and registers the irqfd; the pending edge
        // goes out through signal_msi.
        write_reg(&io, 0x11 + 8, 2 << 24);
        write_reg(&io, 0x10 + 8, 0x24);
        assert!(io.irqfd_active(4));
        assert_eq!(vm.routes.lock().unwrap()[&4], (0xfee0_2000, 0x24));
        assert_eq!(vm.take(), vec![(0xfee0_2000, 0x24)]);
        // Edges now write the irqfd, not signal_msi.
        line.trigger();
        line.trigger();
        assert!(vm.take().is_empty());
        assert_eq!(irqfd_count(&io, 4), 2);
        // A new vector or destination updates the route.
        write_reg(&io, 0x10 + 8, 0x25);
        write_reg(&io, 0x11 + 8, 3 << 24);
        assert_eq!(vm.routes.lock().unwrap()[&4], (0xfee0_3000, 0x25));
        assert!(io.irqfd_active(4));
        // Level-triggered: deregistered, signal_msi as before.
        write_reg(&io, 0x10 + 8, 0x25 | (1 << 15));
        assert!(!io.irqfd_active(4));
        assert!(vm.irqfds.lock().unwrap().is_empty());
        line.trigger();
        assert_eq!(vm.take(), vec![(0xfee0_3000, 0x25)]);
        // Masked: deregistered, the edge is pending, nothing is written to the fd.
        write_reg(&io, 0x10 + 8, 0x25 | (1 << 16));
        line.trigger();
        assert!(vm.take().is_empty());
        assert_eq!(irqfd_count(&io, 4), 0);
        assert_eq!(io.state().pending_edges, 1 << 4);
        // Restoring a state with the pin unmasked registers it again.
        let mut st = io.state();
        st.redirection[4] = 0x26;
        st.pending_edges = 0;
        io.restore(&st).unwrap();
        assert!(io.irqfd_active(4));
        assert_eq!(vm.routes.lock().unwrap()[&4], (0xfee0_0000, 0x26));
        // Other pins are untouched.
        IrqLine::new(io.clone(), 5).trigger();
        assert!(!io.irqfd_active(5));
    }

    #[test]
    fn no_irqfd_without_backend_support() {
        let (io, vm) = setup();
        let line = IrqLine::new(io.clone(), 4);
        assert!(!line.enable_irqfd());
        write_reg(&io, 0x10 + 8, 0x24);
        line.trigger();
        assert_eq!(vm.take(), vec![(0xfee0_0000, 0x24)]);
        assert!(
            !IrqLine::new(Arc::new(Ioapic::new()), 4).enable_irqfd(),
            "no VM"
        );
    }

    #[test]
    fn no_vm_is_counted() {
        let io = Arc::new(Ioapic::new());
        write_reg(&io, 0x10, 0x30);
        io.trigger(0);
        assert_eq!(io.counters.msi_no_vm.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn state_validation() {
        let good = IoapicState::default();
        assert!(good.validate().is_ok());
        let mut s = good.clone();
        s.id = 1;
        assert!(s.validate().is_err());
        let mut s = good.clone();
        s.ioregsel = 0x100;
        assert!(s.validate().is_err());
        let mut s = good.clone();
        s.redirection.pop();
        assert!(s.validate().is_err());
        let mut s = good.clone();
        s.redirection[3] |= 1 << 14;
        assert!(s.validate().is_err());
        let mut s = good.clone();
        s.pending_edges = 1 << 24;
        assert!(s.validate().is_err());
    }
}
