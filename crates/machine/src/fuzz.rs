//! Entry point of the `platform_io` fuzz target (`fuzz/fuzz_targets/platform_io.rs`), also run
//! by the unit tests below: a sequence of guest port and MMIO accesses, serial input, interrupt
//! edges and save/restore round trips against a [`Platform`] (16550 serial, i8042, ACPI sleep
//! and reset registers, IOAPIC, one registered MMIO device). It must never panic, hang, or
//! allocate without bound, and the platform must always accept its own saved state.
//!
//! Input: byte 0 = flags (bit 0: the serial output fails; bit 1: no VM attached, so MSIs have
//! nowhere to go; bit 2: the VM refuses MSIs), then operations (one byte, modulo
//! [`op::COUNT`]) with their arguments; reading past the end yields zeros. [`IoWriter`] writes
//! this format.
//!
//! The `assert!`s here are the fuzzer's oracle: nothing outside the fuzz target and the tests
//! calls this module.

use std::io::Write;

use hv::Interrupt as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hv::DeviceIo;

use crate::devices::{MmioHandler, PlatformEvent, PlatformEvents};
use crate::layout;
use crate::platform::{Platform, PlatformCounters};

/// Operation codes.
pub mod op {
    /// `port, size: u8, size bytes`.
    pub const PIO_WRITE: u8 = 0;
    /// `port, size: u8`.
    pub const PIO_READ: u8 = 1;
    /// `addr, size: u8, size bytes`.
    pub const MMIO_WRITE: u8 = 2;
    /// `addr, size: u8`.
    pub const MMIO_READ: u8 = 3;
    /// `len: u8, bytes`: host input for the serial port.
    pub const SERIAL_INPUT: u8 = 4;
    /// `pin: u8`: an edge on IOAPIC pin `pin % 32` (pins past 23 do not exist).
    pub const IRQ: u8 = 5;
    /// The platform's state is saved and restored; both must succeed and agree.
    pub const SAVE_RESTORE: u8 = 6;
    pub const COUNT: u8 = 7;
}

/// Ports a `port` selector byte below 0x80 picks from (modulo the length); 0x80 and above: a
/// little-endian `u16` port follows.
pub const PORTS: [u16; 16] = [
    layout::I8042_DATA_PORT,
    layout::I8042_CMD_PORT,
    0x3f8,
    0x3f9,
    0x3fa,
    0x3fb,
    0x3fc,
    0x3fd,
    0x3fe,
    0x3ff,
    layout::ACPI_SLEEP_CONTROL_PORT,
    layout::ACPI_SLEEP_STATUS_PORT,
    layout::ACPI_RESET_PORT,
    0x3f7,
    0x605,
    0x80,
];

/// Where the fuzzer's own MMIO device sits (virtio slot 0) and how long it is.
pub const DEVICE_BASE: u64 = layout::VIRTIO_MMIO_BASE;
pub const DEVICE_LEN: u64 = 0x200;

/// An `addr` is a selector byte (modulo 3): 0 = IOAPIC + `u8` offset, 1 = the test device +
/// `u16` offset, 2 = a little-endian `u64` address.
const ADDR_IOAPIC: u8 = 0;
const ADDR_DEVICE: u8 = 1;
const ADDR_RAW: u8 = 2;

const SIZES: [usize; 4] = [1, 2, 4, 8];

/// Writes `platform_io` inputs (seeds and tests).
#[derive(Default)]
pub struct IoWriter(pub Vec<u8>);

fn size_code(len: usize) -> u8 {
    SIZES.iter().position(|&s| s == len).unwrap_or(0) as u8
}

impl IoWriter {
    pub fn new(flags: u8) -> IoWriter {
        IoWriter(vec![flags])
    }
    fn port(&mut self, port: u16) {
        match PORTS.iter().position(|&p| p == port) {
            Some(i) => self.0.push(i as u8),
            None => {
                self.0.push(0x80);
                self.0.extend_from_slice(&port.to_le_bytes());
            }
        }
    }
    fn addr(&mut self, addr: u64) {
        if let Some(off) = addr.checked_sub(layout::IOAPIC_BASE)
            && off < 0x100
        {
            self.0.extend_from_slice(&[ADDR_IOAPIC, off as u8]);
        } else if let Some(off) = addr.checked_sub(DEVICE_BASE)
            && off < 0x1_0000
        {
            self.0.push(ADDR_DEVICE);
            self.0.extend_from_slice(&(off as u16).to_le_bytes());
        } else {
            self.0.push(ADDR_RAW);
            self.0.extend_from_slice(&addr.to_le_bytes());
        }
    }
    /// `data` is 1, 2, 4 or 8 bytes (other lengths are written as one byte).
    pub fn pio_write(&mut self, port: u16, data: &[u8]) {
        self.0.push(op::PIO_WRITE);
        self.port(port);
        let c = size_code(data.len());
        self.0.push(c);
        self.0
            .extend_from_slice(&data[..SIZES[usize::from(c)].min(data.len())]);
    }
    pub fn pio_read(&mut self, port: u16, len: usize) {
        self.0.push(op::PIO_READ);
        self.port(port);
        self.0.push(size_code(len));
    }
    pub fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        self.0.push(op::MMIO_WRITE);
        self.addr(addr);
        let c = size_code(data.len());
        self.0.push(c);
        self.0
            .extend_from_slice(&data[..SIZES[usize::from(c)].min(data.len())]);
    }
    pub fn mmio_read(&mut self, addr: u64, len: usize) {
        self.0.push(op::MMIO_READ);
        self.addr(addr);
        self.0.push(size_code(len));
    }
    /// In pieces of at most 255 bytes.
    pub fn serial_input(&mut self, bytes: &[u8]) {
        for piece in bytes.chunks(255) {
            self.0
                .extend_from_slice(&[op::SERIAL_INPUT, piece.len() as u8]);
            self.0.extend_from_slice(piece);
        }
    }
    pub fn irq(&mut self, pin: u8) {
        self.0.extend_from_slice(&[op::IRQ, pin]);
    }
    pub fn save_restore(&mut self) {
        self.0.push(op::SAVE_RESTORE);
    }
}

/// Reads an input front to back; past its end every number is zero and every slice empty.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn u8(&mut self) -> u8 {
        let (&b, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        b
    }
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }
    fn port(&mut self) -> u16 {
        let sel = self.u8();
        if sel < 0x80 {
            PORTS[usize::from(sel) % PORTS.len()]
        } else {
            u16::from_le_bytes(self.array())
        }
    }
    fn addr(&mut self) -> u64 {
        match self.u8() % 3 {
            ADDR_IOAPIC => layout::IOAPIC_BASE + u64::from(self.u8()),
            ADDR_DEVICE => DEVICE_BASE + u64::from(u16::from_le_bytes(self.array())),
            _ => u64::from_le_bytes(self.array()),
        }
    }
    fn size(&mut self) -> usize {
        SIZES[usize::from(self.u8() % 4)]
    }
    /// `n` (at most 8) bytes of data.
    fn data(&mut self, n: usize) -> [u8; 8] {
        let mut a = [0u8; 8];
        let b = self.bytes(n.min(8));
        a[..b.len()].copy_from_slice(b);
        a
    }
}

/// Serial output that is discarded, or refused.
struct Sink {
    fail: bool,
}

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.fail {
            return Err(std::io::Error::other("serial sink fails"));
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Default)]
struct Events {
    power_off: AtomicU64,
    reset: AtomicU64,
}

impl PlatformEvents for Events {
    fn request(&self, ev: PlatformEvent) {
        match ev {
            PlatformEvent::PowerOff => self.power_off.fetch_add(1, Ordering::Relaxed),
            PlatformEvent::Reset => self.reset.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// A VM that only takes (or refuses) MSIs.
struct MsiVm {
    refuse: bool,
    msis: AtomicU64,
}

impl hv::Vm for MsiVm {
    fn kind(&self) -> hv::BackendKind {
        hv::BackendKind::Emu
    }
    fn create_vcpu(&self, _id: u32) -> hv::Result<Box<dyn hv::Vcpu>> {
        Err(hv::Error::Incompatible("fuzz VM has no vCPUs".into()))
    }
    fn signal_msi(&self, _addr: u64, _data: u32) -> hv::Result<()> {
        if self.refuse {
            return Err(hv::Error::Incompatible("fuzz VM refuses MSIs".into()));
        }
        self.msis.fetch_add(1, Ordering::Relaxed);
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
}

/// The fuzzer's MMIO device: checks the platform hands it offsets inside its range and keeps
/// what was written.
struct Device {
    regs: Mutex<[u8; DEVICE_LEN as usize]>,
}

impl Device {
    fn at(&self, offset: u64) -> usize {
        assert!(
            offset < DEVICE_LEN,
            "the platform sent offset {offset:#x} to a device of {DEVICE_LEN:#x} bytes"
        );
        offset as usize
    }
}

impl MmioHandler for Device {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let at = self.at(offset);
        let regs = self.regs.lock().unwrap_or_else(|e| e.into_inner());
        for (i, d) in data.iter_mut().enumerate() {
            *d = regs.get(at + i).copied().unwrap_or(0);
        }
    }
    fn write(&self, offset: u64, data: &[u8]) {
        let at = self.at(offset);
        let mut regs = self.regs.lock().unwrap_or_else(|e| e.into_inner());
        for (i, &d) in data.iter().enumerate() {
            if let Some(r) = regs.get_mut(at + i) {
                *r = d;
            }
        }
    }
}

/// What a `platform_io` run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub counters: PlatformCounters,
    pub power_off: u64,
    pub reset: u64,
    /// MSIs the VM accepted.
    pub msis: u64,
}

/// Runs the accesses in `data` (see the module documentation).
pub fn platform_io(data: &[u8]) -> Outcome {
    let mut inp = Input(data);
    let flags = inp.u8();
    let events = Arc::new(Events::default());
    let p = Platform::new(
        Box::new(Sink {
            fail: flags & 1 != 0,
        }),
        events.clone(),
    );
    let vm = Arc::new(MsiVm {
        refuse: flags & 4 != 0,
        msis: AtomicU64::new(0),
    });
    if flags & 2 == 0 {
        p.attach_vm(vm.clone());
    }
    let device = Arc::new(Device {
        regs: Mutex::new([0; DEVICE_LEN as usize]),
    });
    if p.register_mmio(DEVICE_BASE, DEVICE_LEN, device).is_err() {
        return Outcome::default();
    }
    let mut buf = [0u8; 8];
    while !inp.0.is_empty() {
        match inp.u8() % op::COUNT {
            op::PIO_WRITE => {
                let port = inp.port();
                let n = inp.size();
                p.pio_write(port, &inp.data(n)[..n]);
            }
            op::PIO_READ => {
                let port = inp.port();
                let n = inp.size();
                p.pio_read(port, &mut buf[..n]);
            }
            op::MMIO_WRITE => {
                let addr = inp.addr();
                let n = inp.size();
                p.mmio_write(addr, &inp.data(n)[..n]);
            }
            op::MMIO_READ => {
                let addr = inp.addr();
                let n = inp.size();
                p.mmio_read(addr, &mut buf[..n]);
            }
            op::SERIAL_INPUT => {
                let n = usize::from(inp.u8());
                p.serial_input(inp.bytes(n));
            }
            op::IRQ => p.irq_line(u32::from(inp.u8() % 32)).trigger(),
            _ => {
                let saved = p.state();
                let restored = p.restore(&saved);
                assert!(
                    restored.is_ok(),
                    "own state refused: {restored:?}\n{saved:?}"
                );
                assert_eq!(p.state(), saved, "restoring changed the state");
            }
        }
    }
    Outcome {
        counters: p.counter_values(),
        power_off: events.power_off.load(Ordering::Relaxed),
        reset: events.reset.load(Ordering::Relaxed),
        msis: vm.msis.load(Ordering::Relaxed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Linux does with the platform, shortened: probes and programs the serial port,
    /// routes its interrupt through the IOAPIC, types a line, resets through the i8042 and
    /// powers off through the ACPI sleep register.
    fn linux_like() -> IoWriter {
        let mut w = IoWriter::new(0);
        // IOAPIC: version, then pin 4 unmasked to vector 0x24, edge, fixed, to APIC 0.
        w.mmio_write(layout::IOAPIC_BASE, &1u32.to_le_bytes());
        w.mmio_read(layout::IOAPIC_BASE + 0x10, 4);
        w.mmio_write(layout::IOAPIC_BASE, &0x19u32.to_le_bytes());
        w.mmio_write(layout::IOAPIC_BASE + 0x10, &0u32.to_le_bytes());
        w.mmio_write(layout::IOAPIC_BASE, &0x18u32.to_le_bytes());
        w.mmio_write(layout::IOAPIC_BASE + 0x10, &0x24u32.to_le_bytes());
        // 16550: scratch test, 115200 8N1, FIFO, DTR|RTS|OUT2, receive interrupt on.
        w.pio_write(0x3ff, &[0x55]);
        w.pio_read(0x3ff, 1);
        w.pio_write(0x3fb, &[0x80]);
        w.pio_write(0x3f8, &[1]);
        w.pio_write(0x3f9, &[0]);
        w.pio_write(0x3fb, &[3]);
        w.pio_write(0x3fa, &[0xc7]);
        w.pio_write(0x3fc, &[0x0b]);
        w.pio_write(0x3f9, &[1]);
        w.serial_input(b"ls\n");
        w.pio_read(0x3fa, 1);
        w.pio_read(0x3fd, 1);
        w.pio_read(0x3f8, 1);
        w.pio_write(0x3f8, b"h");
        w.save_restore();
        w.mmio_write(DEVICE_BASE + 0x1fc, &[1, 2, 3, 4, 5, 6, 7, 8]);
        w.mmio_read(0xfee0_0000, 4);
        w.irq(30);
        w.pio_read(layout::I8042_CMD_PORT, 1);
        w.pio_write(layout::I8042_CMD_PORT, &[0xfe]);
        w.pio_write(layout::ACPI_SLEEP_CONTROL_PORT, &[(5 << 2) | (1 << 5)]);
        w
    }

    #[test]
    fn linux_like_sequence_reaches_every_device() {
        let o = platform_io(&linux_like().0);
        assert_eq!((o.power_off, o.reset), (1, 1), "{o:?}");
        // The serial receive interrupt went out as an MSI.
        assert!(o.msis >= 1, "{o:?}");
        assert_eq!(o.counters.irq_bad_pin, 1, "{o:?}");
        assert_eq!(o.counters.unclaimed_mmio_reads, 1, "{o:?}");
        // Without a VM, the same MSIs are counted as dropped.
        let mut input = linux_like().0;
        input[0] = 2;
        let o = platform_io(&input);
        assert_eq!(o.msis, 0);
        assert!(o.counters.msi_no_vm >= 1, "{o:?}");
    }

    /// Found by the fuzzer: the serial port raised its THR interrupt while pin 4 was unmasked
    /// (no VM: the MSI was dropped), the guest masked pin 4, and restoring the saved state made
    /// vm-superio raise the interrupt again, which latched a pending edge the saved state did
    /// not have (a spurious interrupt at the next unmask).
    #[test]
    fn restore_raises_no_interrupt_again() {
        let minimized = [
            0x0a, 0x80, 0x00, 0x00, 0x02, 0x18, 0x00, 0x00, 0x00, 0x02, 0x00, 0x10, 0x00, 0x03,
            0x00, 0x02, 0x01, 0x00, 0xff, 0x02, 0x00, 0x10, 0x02, 0x29, 0x00, 0x01, 0x08, 0x29,
        ];
        platform_io(&minimized);
        // The same with a VM, in steps: the interrupt is delivered, then the pin is masked.
        let mut w = IoWriter::new(0);
        w.mmio_write(layout::IOAPIC_BASE, &0x18u32.to_le_bytes());
        w.mmio_write(layout::IOAPIC_BASE + 0x10, &0x24u32.to_le_bytes());
        w.pio_write(0x3f9, &[0x02]);
        w.mmio_write(layout::IOAPIC_BASE + 0x10, &0x1_0024u32.to_le_bytes());
        w.save_restore();
        // Unmasking delivers nothing more.
        w.mmio_write(layout::IOAPIC_BASE + 0x10, &0x24u32.to_le_bytes());
        let o = platform_io(&w.0);
        assert_eq!(o.msis, 1, "{o:?}");
    }

    /// Every byte of the sequence set to 0, 0xff and flipped, and every prefix.
    #[test]
    fn survives_mutations() {
        let input = linux_like().0;
        for i in 0..input.len() {
            for f in [|_: u8| 0u8, |_: u8| 0xffu8, |b: u8| b ^ 0x80] {
                let mut m = input.clone();
                m[i] = f(m[i]);
                platform_io(&m);
            }
            platform_io(&input[..i]);
        }
    }
}
