//! The platform bus: every port and MMIO access of the guest lands here (through
//! [`hv::DeviceIo`]) and is dispatched by address range.
//!
//! | ports          | device                                             |
//! |----------------|----------------------------------------------------|
//! | 0x60, 0x64     | i8042 (reset via command 0xfe)                     |
//! | 0x3f8..=0x3ff  | 16550A serial port COM1, IOAPIC pin 4              |
//! | 0x600          | ACPI sleep control (SLP_TYP=5 + SLP_EN: power off)  |
//! | 0x601          | ACPI sleep status (reads 0)                        |
//! | 0x604          | ACPI reset register (value 1: reset)               |
//! | 0xcf8 (dword), 0xcfc..=0xcff | PCI configuration mechanism #1: a host bridge at 00:00.0, nothing else |
//!
//! MMIO: the IOAPIC at [`layout::IOAPIC_BASE`] and whatever the VMM registers with
//! [`Platform::register_mmio`]. Accesses nobody claims read as all-ones; writes are dropped;
//! both are counted.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use serde::{Deserialize, Serialize};

use crate::devices::i8042::{I8042, I8042State};
use crate::devices::ioapic::{Ioapic, IoapicState};
use crate::devices::pci::{PciHost, PciHostState};
use crate::devices::serial::{SerialDevice, SerialOut, SerialState};
pub use crate::devices::{IrqLine, MmioHandler, PlatformEvent, PlatformEvents};
use crate::layout;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("MMIO range {base:#x}+{len:#x} overlaps a registered device")]
    MmioOverlap { base: u64, len: u64 },
    #[error("MMIO range {base:#x}+{len:#x} is empty or wraps")]
    MmioInvalid { base: u64, len: u64 },
    #[error("invalid platform state: {0}")]
    InvalidState(String),
    #[error("invalid platform state")]
    SerialState(#[source] crate::devices::serial::RestoreError),
}

/// ACPI S5 sleep type, as in the DSDT's `_S5_` package.
pub const SLP_TYP_S5: u8 = 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_EN: u8 = 1 << 5;

/// Saved state of every platform device. Plain data: [`Platform::restore`] validates each field.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformState {
    pub serial: SerialState,
    pub ioapic: IoapicState,
    pub i8042: I8042State,
    /// Absent from snapshots taken before the PCI host bridge existed: the power-on latch.
    #[serde(default)]
    pub pci: PciHostState,
}

impl PlatformState {
    pub fn validate(&self) -> Result<(), Error> {
        self.serial.validate().map_err(Error::InvalidState)?;
        self.ioapic.validate().map_err(Error::InvalidState)?;
        self.i8042.validate().map_err(Error::InvalidState)?;
        self.pci.validate().map_err(Error::InvalidState)?;
        Ok(())
    }
}

/// What the platform has counted since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformCounters {
    pub unclaimed_pio_reads: u64,
    pub unclaimed_pio_writes: u64,
    pub unclaimed_mmio_reads: u64,
    pub unclaimed_mmio_writes: u64,
    pub serial_tx_errors: u64,
    pub serial_input_dropped: u64,
    pub msi_sent: u64,
    pub msi_failed: u64,
    pub msi_no_vm: u64,
    pub irq_bad_pin: u64,
    /// Guest accesses to the PCI configuration ports (0xcf8 dword, 0xcfc..=0xcff).
    pub pci_config_reads: u64,
    pub pci_config_writes: u64,
}

#[derive(Default)]
struct Counters {
    pio_reads: AtomicU64,
    pio_writes: AtomicU64,
    mmio_reads: AtomicU64,
    mmio_writes: AtomicU64,
    pci_reads: AtomicU64,
    pci_writes: AtomicU64,
}

struct MmioRange {
    len: u64,
    handler: Arc<dyn MmioHandler>,
}

/// The guest-visible platform. Implements [`hv::DeviceIo`].
pub struct Platform {
    serial: Mutex<SerialDevice>,
    i8042: Mutex<I8042>,
    pci: Mutex<PciHost>,
    ioapic: Arc<Ioapic>,
    mmio: RwLock<BTreeMap<u64, MmioRange>>,
    events: Arc<dyn PlatformEvents>,
    counters: Counters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Device updates are single assignments; a panic elsewhere cannot leave them half-done.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Platform {
    /// A platform whose serial port writes to `serial_out` and whose power-off and reset
    /// requests go to `events`.
    pub fn new(serial_out: Box<dyn Write + Send>, events: Arc<dyn PlatformEvents>) -> Platform {
        let ioapic = Arc::new(Ioapic::new());
        let out = SerialOut(Arc::new(Mutex::new(serial_out)));
        let serial = SerialDevice::new(IrqLine::new(ioapic.clone(), layout::SERIAL_IRQ), out);
        let mut mmio = BTreeMap::new();
        mmio.insert(
            layout::IOAPIC_BASE,
            MmioRange {
                len: layout::IOAPIC_SIZE,
                handler: ioapic.clone() as Arc<dyn MmioHandler>,
            },
        );
        Platform {
            serial: Mutex::new(serial),
            i8042: Mutex::new(I8042::default()),
            pci: Mutex::new(PciHost::default()),
            ioapic,
            mmio: RwLock::new(mmio),
            events,
            counters: Counters::default(),
        }
    }

    /// Connects the IOAPIC to the VM it interrupts (through [`hv::Vm::signal_msi`]). Call it
    /// before the vCPUs run and before [`Platform::restore`]; MSIs raised while no VM is
    /// attached are dropped and counted.
    pub fn attach_vm(&self, vm: Arc<dyn hv::Vm>) {
        self.ioapic.attach_vm(vm);
    }

    /// Adds an MMIO device at `base..base+len`. Fails if the range overlaps a registered one
    /// (the IOAPIC included).
    pub fn register_mmio(
        &self,
        base: u64,
        len: u64,
        handler: Arc<dyn MmioHandler>,
    ) -> Result<(), Error> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(Error::MmioInvalid { base, len })?;
        let mut map = self.mmio.write().unwrap_or_else(|e| e.into_inner());
        let below = map.range(..end).next_back();
        if let Some((&b, r)) = below
            && b + r.len > base
        {
            return Err(Error::MmioOverlap { base, len });
        }
        map.insert(base, MmioRange { len, handler });
        Ok(())
    }

    /// An edge-triggered line into IOAPIC pin `pin` (0..24; other pins count every trigger as
    /// `irq_bad_pin` and deliver nothing).
    pub fn irq_line(&self, pin: u32) -> IrqLine {
        IrqLine::new(self.ioapic.clone(), pin)
    }

    /// Presses the ACPI power button: one edge on [`layout::POWER_BUTTON_IRQ`], the Generic
    /// Event Device's interrupt (`docs/platform.md` §5). A guest that handles the button powers
    /// off (or does whatever its policy says); nothing else happens on the host side.
    pub fn press_power_button(&self) {
        self.ioapic.trigger(layout::POWER_BUTTON_IRQ);
    }

    /// Host input for the guest's ttyS0; raises IRQ 4 when the guest enabled it.
    pub fn serial_input(&self, bytes: &[u8]) {
        lock(&self.serial).input(bytes);
    }

    pub fn state(&self) -> PlatformState {
        PlatformState {
            serial: lock(&self.serial).state(),
            ioapic: self.ioapic.state(),
            i8042: lock(&self.i8042).state(),
            pci: lock(&self.pci).state(),
        }
    }

    /// Replaces every device's state. Nothing changes unless all of `s` is valid. No interrupt
    /// is raised: an edge that was pending is in the IOAPIC's state or in a vCPU's local APIC.
    pub fn restore(&self, s: &PlatformState) -> Result<(), Error> {
        s.validate()?;
        self.ioapic
            .restore(&s.ioapic)
            .map_err(Error::InvalidState)?;
        lock(&self.i8042)
            .restore(&s.i8042)
            .map_err(Error::InvalidState)?;
        lock(&self.pci)
            .restore(&s.pci)
            .map_err(Error::InvalidState)?;
        lock(&self.serial)
            .restore(&s.serial)
            .map_err(Error::SerialState)?;
        Ok(())
    }

    pub fn counter_values(&self) -> PlatformCounters {
        let (serial_tx_errors, serial_input_dropped) = {
            let s = lock(&self.serial);
            (s.tx_errors, s.input_dropped)
        };
        let c = &self.counters;
        let io = &self.ioapic.counters;
        PlatformCounters {
            unclaimed_pio_reads: c.pio_reads.load(Ordering::Relaxed),
            unclaimed_pio_writes: c.pio_writes.load(Ordering::Relaxed),
            unclaimed_mmio_reads: c.mmio_reads.load(Ordering::Relaxed),
            unclaimed_mmio_writes: c.mmio_writes.load(Ordering::Relaxed),
            serial_tx_errors,
            serial_input_dropped,
            msi_sent: io.msi_sent.load(Ordering::Relaxed),
            msi_failed: io.msi_failed.load(Ordering::Relaxed),
            msi_no_vm: io.msi_no_vm.load(Ordering::Relaxed),
            irq_bad_pin: io.bad_pin.load(Ordering::Relaxed),
            pci_config_reads: c.pci_reads.load(Ordering::Relaxed),
            pci_config_writes: c.pci_writes.load(Ordering::Relaxed),
        }
    }

    /// The counters as a JSON object (field names as in [`PlatformCounters`]).
    pub fn counters(&self) -> serde_json::Value {
        serde_json::to_value(self.counter_values()).unwrap_or(serde_json::Value::Null)
    }

    fn request(&self, ev: Option<PlatformEvent>) {
        if let Some(ev) = ev {
            tracing::debug!("platform event {ev:?}");
            self.events.request(ev);
        }
    }

    fn sleep_control_write(&self, value: u8) {
        if value & SLP_EN != 0 && (value >> SLP_TYP_SHIFT) & 7 == SLP_TYP_S5 {
            self.request(Some(PlatformEvent::PowerOff));
        }
    }

    fn find_mmio(&self, addr: u64) -> Option<(u64, Arc<dyn MmioHandler>)> {
        let map = self.mmio.read().unwrap_or_else(|e| e.into_inner());
        let (&base, r) = map.range(..=addr).next_back()?;
        (addr - base < r.len).then(|| (base, r.handler.clone()))
    }
}

impl hv::DeviceIo for Platform {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        if PciHost::claims(port, data.len()) {
            self.counters.pci_reads.fetch_add(1, Ordering::Relaxed);
            lock(&self.pci).read(port, data);
            return;
        }
        let serial = layout::SERIAL_PORT..layout::SERIAL_PORT + 8;
        if serial.contains(&port) {
            let mut s = lock(&self.serial);
            for (i, d) in data.iter_mut().enumerate() {
                let off = usize::from(port - layout::SERIAL_PORT) + i;
                *d = if off < 8 { s.read(off as u8) } else { 0xff };
            }
            return;
        }
        let first = match port {
            layout::I8042_CMD_PORT => Some(lock(&self.i8042).read_status()),
            layout::I8042_DATA_PORT => Some(lock(&self.i8042).read_data()),
            layout::ACPI_SLEEP_CONTROL_PORT | layout::ACPI_SLEEP_STATUS_PORT => Some(0),
            layout::ACPI_RESET_PORT => Some(0),
            _ => None,
        };
        data.fill(0xff);
        match first {
            Some(v) => {
                if let Some(d) = data.first_mut() {
                    *d = v;
                }
            }
            None => {
                self.counters.pio_reads.fetch_add(1, Ordering::Relaxed);
                hv::rate_limited!(tracing::trace!(
                    "unclaimed port read {port:#x}/{}",
                    data.len()
                ));
            }
        }
    }

    fn pio_write(&self, port: u16, data: &[u8]) {
        if PciHost::claims(port, data.len()) {
            self.counters.pci_writes.fetch_add(1, Ordering::Relaxed);
            lock(&self.pci).write(port, data);
            return;
        }
        let serial = layout::SERIAL_PORT..layout::SERIAL_PORT + 8;
        if serial.contains(&port) {
            let mut s = lock(&self.serial);
            for (i, &d) in data.iter().enumerate() {
                let off = usize::from(port - layout::SERIAL_PORT) + i;
                if off < 8 {
                    s.write(off as u8, d);
                }
            }
            return;
        }
        let Some(&value) = data.first() else {
            return;
        };
        match port {
            layout::I8042_CMD_PORT => {
                let ev = lock(&self.i8042).write_command(value);
                self.request(ev);
            }
            layout::I8042_DATA_PORT => {
                let ev = lock(&self.i8042).write_data(value);
                self.request(ev);
            }
            layout::ACPI_SLEEP_CONTROL_PORT => self.sleep_control_write(value),
            layout::ACPI_SLEEP_STATUS_PORT => {}
            layout::ACPI_RESET_PORT => {
                if value == layout::ACPI_RESET_VALUE {
                    self.request(Some(PlatformEvent::Reset));
                }
            }
            _ => {
                self.counters.pio_writes.fetch_add(1, Ordering::Relaxed);
                hv::rate_limited!(tracing::trace!(
                    "unclaimed port write {port:#x}/{}",
                    data.len()
                ));
            }
        }
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.find_mmio(addr) {
            Some((base, h)) => h.read(addr - base, data),
            None => {
                data.fill(0xff);
                self.counters.mmio_reads.fetch_add(1, Ordering::Relaxed);
                hv::rate_limited!(tracing::trace!(
                    "unclaimed MMIO read {addr:#x}/{}",
                    data.len()
                ));
            }
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        match self.find_mmio(addr) {
            Some((base, h)) => h.write(addr - base, data),
            None => {
                self.counters.mmio_writes.fetch_add(1, Ordering::Relaxed);
                hv::rate_limited!(tracing::trace!(
                    "unclaimed MMIO write {addr:#x}/{}",
                    data.len()
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use hv::DeviceIo;
    use hv::Interrupt as _;

    use super::*;
    use crate::devices::ioapic::tests::FakeVm;

    #[derive(Default)]
    struct Events(Mutex<Vec<PlatformEvent>>);

    impl PlatformEvents for Events {
        fn request(&self, ev: PlatformEvent) {
            self.0.lock().unwrap().push(ev);
        }
    }

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct Setup {
        p: Platform,
        out: Sink,
        events: Arc<Events>,
        vm: Arc<FakeVm>,
    }

    fn setup() -> Setup {
        let out = Sink::default();
        let events = Arc::new(Events::default());
        let p = Platform::new(Box::new(out.clone()), events.clone());
        let vm = Arc::new(FakeVm::default());
        p.attach_vm(vm.clone());
        Setup { p, out, events, vm }
    }

    fn outb(p: &Platform, port: u16, v: u8) {
        p.pio_write(port, &[v]);
    }

    fn inb(p: &Platform, port: u16) -> u8 {
        let mut b = [0];
        p.pio_read(port, &mut b);
        b[0]
    }

    fn ioapic_write(p: &Platform, reg: u32, v: u32) {
        p.mmio_write(layout::IOAPIC_BASE, &reg.to_le_bytes());
        p.mmio_write(layout::IOAPIC_BASE + 0x10, &v.to_le_bytes());
    }

    #[test]
    fn unclaimed_accesses_read_ones_and_are_counted() {
        let s = setup();
        let mut b = [0u8; 4];
        s.p.pio_read(0x80, &mut b);
        assert_eq!(b, [0xff; 4]);
        s.p.pio_write(0x80, &[1]);
        let mut q = [0u8; 8];
        s.p.mmio_read(0xd000_0000, &mut q);
        assert_eq!(q, [0xff; 8]);
        s.p.mmio_write(0xd000_0000, &[1, 2]);
        s.p.mmio_write(0xfee0_0000, &[1, 2, 3, 4]);
        let c = s.p.counter_values();
        assert_eq!((c.unclaimed_pio_reads, c.unclaimed_pio_writes), (1, 1));
        assert_eq!((c.unclaimed_mmio_reads, c.unclaimed_mmio_writes), (1, 2));
        assert_eq!(s.p.counters()["unclaimed_mmio_writes"], 2);
        // Claimed ports are not counted.
        inb(&s.p, 0x64);
        inb(&s.p, 0x3fd);
        assert_eq!(s.p.counter_values().unclaimed_pio_reads, 1);
    }

    struct Recorder(Mutex<Vec<(u64, Vec<u8>)>>);

    impl MmioHandler for Recorder {
        fn read(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    #[test]
    fn mmio_registration_and_dispatch() {
        let s = setup();
        let r = Arc::new(Recorder(Mutex::new(Vec::new())));
        let base = layout::VIRTIO_MMIO_BASE;
        s.p.register_mmio(base, 0x1000, r.clone()).unwrap();
        s.p.register_mmio(base + 0x1000, 0x1000, r.clone()).unwrap();
        assert!(matches!(
            s.p.register_mmio(base + 0xfff, 2, r.clone()),
            Err(Error::MmioOverlap { .. })
        ));
        assert!(s.p.register_mmio(base - 0x10, 0x11, r.clone()).is_err());
        assert!(
            s.p.register_mmio(layout::IOAPIC_BASE + 0x800, 4, r.clone())
                .is_err()
        );
        assert!(s.p.register_mmio(base + 0x3000, 0, r.clone()).is_err());
        assert!(s.p.register_mmio(u64::MAX, 2, r.clone()).is_err());
        let mut b = [0u8; 4];
        s.p.mmio_read(base + 0x1070, &mut b);
        assert_eq!(b, [0x70; 4]);
        s.p.mmio_write(base + 0x50, &[9]);
        assert_eq!(r.0.lock().unwrap().as_slice(), &[(0x50, vec![9])]);
        assert_eq!(s.p.counter_values().unclaimed_mmio_reads, 0);
    }

    #[test]
    fn serial_output_and_input() {
        let s = setup();
        for &c in b"hi\n" {
            outb(&s.p, 0x3f8, c);
        }
        assert_eq!(s.out.0.lock().unwrap().as_slice(), b"hi\n");

        // Route pin 4 to vector 0x34, enable the received-data interrupt.
        ioapic_write(&s.p, 0x10 + 8, 0x34);
        outb(&s.p, 0x3f9, 0x01);
        s.vm.take();
        s.p.serial_input(b"ab");
        assert_eq!(s.vm.take(), vec![(0xfee0_0000, 0x34)]);
        assert_eq!(inb(&s.p, 0x3fd) & 1, 1);
        assert_eq!(inb(&s.p, 0x3f8), b'a');
        assert_eq!(inb(&s.p, 0x3f8), b'b');
        assert_eq!(inb(&s.p, 0x3fd) & 1, 0);

        // More than the FIFO holds: the rest waits and arrives as the guest reads.
        let input: Vec<u8> = (0..200u32).map(|i| i as u8).collect();
        s.p.serial_input(&input);
        let st = s.p.state().serial;
        assert_eq!(st.rx_fifo.len(), 64);
        assert_eq!(st.pending_input.len(), 136);
        let got: Vec<u8> = (0..200).map(|_| inb(&s.p, 0x3f8)).collect();
        assert_eq!(got, input);
        assert_eq!(inb(&s.p, 0x3fd) & 1, 0);
        assert!(s.p.state().serial.pending_input.is_empty());
        assert_eq!(s.p.counter_values().serial_input_dropped, 0);
    }

    #[test]
    fn serial_irq_is_pin_4_edge() {
        let s = setup();
        ioapic_write(&s.p, 0x11 + 8, 1 << 24);
        ioapic_write(&s.p, 0x10 + 8, 0x41);
        // Enabling the THR-empty interrupt raises it at once.
        outb(&s.p, 0x3f9, 0x02);
        assert_eq!(s.vm.take(), vec![(0xfee0_1000, 0x41)]);
    }

    #[test]
    fn i8042_reset_and_acpi_events() {
        let s = setup();
        assert_eq!(inb(&s.p, 0x64), 0);
        outb(&s.p, 0x64, 0xfe);
        // SLP_EN without S5, and S5 without SLP_EN: nothing.
        outb(&s.p, 0x600, 0x20);
        outb(&s.p, 0x600, 5 << 2);
        outb(&s.p, 0x601, 0x80);
        outb(&s.p, 0x600, (5 << 2) | 0x20);
        outb(&s.p, 0x604, 0);
        outb(&s.p, 0x604, 1);
        assert_eq!(inb(&s.p, 0x601), 0);
        assert_eq!(
            s.events.0.lock().unwrap().as_slice(),
            &[
                PlatformEvent::Reset,
                PlatformEvent::PowerOff,
                PlatformEvent::Reset
            ]
        );
    }

    fn outl(p: &Platform, port: u16, v: u32) {
        p.pio_write(port, &v.to_le_bytes());
    }

    fn inl(p: &Platform, port: u16) -> u32 {
        let mut b = [0; 4];
        p.pio_read(port, &mut b);
        u32::from_le_bytes(b)
    }

    /// Linux's conf1 probe through the bus: the latch reads back, the host bridge answers at
    /// 00:00.0 with its class, and no port access of it counts as unclaimed.
    #[test]
    fn pci_conf1_host_bridge() {
        let s = setup();
        outb(&s.p, 0xcfb, 1);
        outl(&s.p, 0xcf8, 0x8000_0000);
        assert_eq!(inl(&s.p, 0xcf8), 0x8000_0000);
        outl(&s.p, 0xcf8, 0x8000_0008);
        let mut w = [0; 2];
        s.p.pio_read(0xcfe, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0600);
        outl(&s.p, 0xcf8, 0x8000_0000);
        assert_eq!(inl(&s.p, 0xcfc), 0x0008_1b36);
        // Slot 1 is empty.
        outl(&s.p, 0xcf8, 0x8000_0800);
        assert_eq!(inl(&s.p, 0xcfc), 0xffff_ffff);
        let c = s.p.counter_values();
        // Only the byte write to 0xcfb went nowhere.
        assert_eq!((c.unclaimed_pio_reads, c.unclaimed_pio_writes), (0, 1));
        assert_eq!((c.pci_config_reads, c.pci_config_writes), (4, 4));
        assert_eq!(s.p.state().pci.config_address, 0x8000_0800);
    }

    /// A snapshot from before the PCI host bridge has no `pci` field: it restores, with the
    /// latch at its power-on value.
    #[test]
    fn state_without_pci_restores_with_power_on_latch() {
        let a = setup();
        let st = busy_state(&a);
        let mut json = serde_json::to_value(&st).unwrap();
        json.as_object_mut().unwrap().remove("pci").unwrap();
        let back: PlatformState = serde_json::from_value(json).unwrap();
        assert_eq!(back.pci, PciHostState::default());
        let b = setup();
        b.p.restore(&back).unwrap();
        assert_eq!(b.p.state(), back);
        assert_eq!(inl(&b.p, 0xcf8), 0);
    }

    fn busy_state(s: &Setup) -> PlatformState {
        ioapic_write(&s.p, 0x10 + 8, 0x34);
        ioapic_write(&s.p, 0x11 + 2, 3 << 24);
        s.p.irq_line(7).trigger();
        outb(&s.p, 0x3fb, 0x83);
        outb(&s.p, 0x3f8, 0x0c);
        outb(&s.p, 0x3fb, 0x03);
        outb(&s.p, 0x3f9, 0x01);
        outb(&s.p, 0x3ff, 0x5a);
        s.p.serial_input(&[7u8; 100]);
        outb(&s.p, 0x64, 0x60);
        outl(&s.p, 0xcf8, 0x8000_0808);
        s.p.state()
    }

    #[test]
    fn state_round_trip() {
        let a = setup();
        let st = busy_state(&a);
        assert_eq!(st.ioapic.pending_edges, 1 << 7);
        assert_eq!(st.serial.pending_input.len(), 36);
        assert_eq!(st.pci.config_address, 0x8000_0808);
        let json = serde_json::to_string(&st).unwrap();
        let back: PlatformState = serde_json::from_str(&json).unwrap();
        let b = setup();
        b.p.restore(&back).unwrap();
        assert_eq!(b.p.state(), st);
        // The restored devices behave like the originals.
        assert_eq!(inb(&b.p, 0x3ff), 0x5a);
        outb(&b.p, 0x60, 0x11);
        outb(&b.p, 0x64, 0x20);
        assert_eq!(inb(&b.p, 0x60), 0x11);
    }

    #[test]
    fn invalid_states_are_rejected_and_change_nothing() {
        let a = setup();
        let good = busy_state(&a);
        type Mutation = fn(&mut PlatformState);
        let mutations: &[Mutation] = &[
            |s| s.serial.interrupt_enable = 0x10,
            |s| s.serial.interrupt_identification = 0x03,
            |s| s.serial.interrupt_identification = 0,
            |s| s.serial.line_status = 0x00,
            |s| s.serial.line_status = 0x60,
            |s| s.serial.modem_status = 0,
            |s| s.serial.rx_fifo = vec![0; 65],
            |s| s.serial.pending_input = vec![0; 64 * 1024 + 1],
            |s| s.ioapic.id = 0x1000_0000,
            |s| s.ioapic.ioregsel = 0x1ff,
            |s| s.ioapic.redirection = vec![0; 23],
            |s| s.ioapic.redirection[0] = 1 << 17,
            |s| s.ioapic.pending_edges = 1 << 31,
            |s| s.i8042.expecting = Some(0xaa),
            |s| s.pci.config_address = 0x8000_0001,
        ];
        let b = setup();
        let before = b.p.state();
        for (i, m) in mutations.iter().enumerate() {
            let mut bad = good.clone();
            m(&mut bad);
            assert!(
                matches!(b.p.restore(&bad), Err(Error::InvalidState(_))),
                "mutation {i} accepted"
            );
            assert_eq!(b.p.state(), before, "mutation {i} changed state");
        }
        assert!(b.p.restore(&good).is_ok());
    }
}
