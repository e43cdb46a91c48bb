//! Conformance harness: tiny 64-bit guest programs run through the neutral `hv` contract only, so
//! one test body and one set of expectations run on every backend (emu always, KVM when
//! `/dev/kvm` can be opened), plus a KVM-vs-emu differential tester ([`diff`]).
//!
//! Guest layout (identity-mapped with 2 MiB pages over the first GiB, U/S=1 everywhere; CPL 0
//! unless [`Guest::load_user`]):
//! * GDT at [`GDT`]: 0x08 kernel code64, 0x10 kernel data, 0x18 TSS (two slots), 0x28 user
//!   code64, 0x30 user data. TSS at [`TSS`] with RSP0 = [`STACK`].
//! * `PML4` 0x1000, `PDPT` 0x2000, `PD` 0x3000; [`PT`] maps [`SMALL`] with 4 KiB pages after
//!   [`Guest::map_small`]; PD 0x5000 maps the 4th GiB (local APIC), uncached.
//! * IDT at [`IDT`], stubs at [`STUBS`]: every vector v has a stub that records an [`Exception`] at [`EXC`] (vector,
//!   error code, CR2, the interrupt frame, RAX at entry) and writes [`EXC_STOP`] to [`STOP_PORT`].
//! * Code at [`CODE`], data at [`DATA`], stack below [`STACK`]. [`MMIO`] is mapped but not RAM:
//!   accesses there reach the [`Recorder`].
//!
//! A program ends with `out STOP_PORT, al` ([`stop`]); the recorder kicks the vCPU and
//! [`Guest::run`] returns the final state. A watchdog kicks a run that does not stop in time.

// A test harness, used only by this crate's tests: a failed step panics to fail the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod diff;
pub mod diff_avx;
pub mod diff_ext;
pub mod diff_sse;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::Duration;

use hv::{CpuModel, CpuState, DeviceIo, Hypervisor, Segment, Vcpu, VcpuExit, VcpuKicker, Vm};
use iced_x86::code_asm::{CodeAssembler, al, qword_ptr, rax, rsp};
use vm_memory::{Bytes, GuestAddress};

pub const GDT: u64 = 0x500;
pub const PML4: u64 = 0x1000;
pub const PT: u64 = 0x4000;
pub const IDT: u64 = 0x6000;
pub const TSS: u64 = 0x7000;
pub const STUBS: u64 = 0x30000;
const STUB_SIZE: u64 = 128;
/// Where the IDT stubs record the last exception or interrupt (see [`Exception`]).
pub const EXC: u64 = 0xc000;
pub const CODE: u64 = 0x10000;
pub const DATA: u64 = 0x20000;
pub const STACK: u64 = 0x80000;
/// A 2 MiB region mapped with 4 KiB pages by [`Guest::map_small`].
pub const SMALL: u64 = 0x40_0000;
/// The page table [`Guest::map_low_4k`] maps the first 2 MiB with.
pub const LOW_PT: u64 = 0x8000;
/// The page after [`DATA`]: the differential testers' second scratch page, so that memory
/// operands can cross a 4 KiB page boundary.
pub const DATA2: u64 = DATA + 0x1000;
/// The page after [`DATA2`], left unmapped by the differential testers
/// ([`Guest::map_low_4k`]): an operand crossing into it must fault with nothing written.
pub const GUARD: u64 = DATA + 0x2000;
/// Identity-mapped, not RAM: MMIO.
pub const MMIO: u64 = 0x1000_0000;
/// A write here ends the run.
pub const STOP_PORT: u16 = 0xe9;
/// The value the IDT stubs write to [`STOP_PORT`].
pub const EXC_STOP: u8 = 0xee;
/// What the recorder returns for port reads.
pub const IN_VALUE: u8 = 0x5a;
/// Default guest memory.
pub const DEFAULT_MIB: usize = 8;
/// A run that has not stopped after this long is kicked and reported as [`Stop::Timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

pub const CF: u64 = 1;
pub const PF: u64 = 1 << 2;
pub const AF: u64 = 1 << 4;
pub const ZF: u64 = 1 << 6;
pub const SF: u64 = 1 << 7;
pub const IF: u64 = 1 << 9;
pub const DF: u64 = 1 << 10;
pub const OF: u64 = 1 << 11;
/// The six arithmetic status flags.
pub const STATUS: u64 = CF | PF | AF | ZF | SF | OF;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("backend")]
    Hv(#[from] hv::Error),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("assembling")]
    Asm(#[from] iced_x86::IcedError),
}

pub type Result<T> = std::result::Result<T, Error>;

/// What `code_asm` emitters return.
pub type AsmResult = std::result::Result<(), iced_x86::IcedError>;

fn mem_err(e: impl std::fmt::Display) -> Error {
    Error::Memory(e.to_string())
}

/// The emu backend.
pub fn emu() -> hv_emu::EmuHypervisor {
    hv_emu::EmuHypervisor::new()
}

/// The KVM backend with emu's instruction emulator behind it (completing what KVM's emulator
/// refuses), or `None` after printing `SKIP: no /dev/kvm` when KVM cannot be used here.
pub fn kvm() -> Option<hv_kvm::KvmHypervisor> {
    let emulator = Arc::new(hv_emu::Emulator::new(CpuModel::portable()));
    match hv_kvm::KvmHypervisor::open(Some(emulator)) {
        Ok(h) => Some(h),
        Err(hv::Error::Unavailable { reason, .. }) => {
            println!("SKIP: no /dev/kvm ({reason})");
            None
        }
        Err(e) => panic!("opening KVM: {}", hv::Chain(&e)),
    }
}

/// Runs `body` on emu, and on KVM when usable: `conformance!(name)` makes tests `emu_name` and
/// `kvm_name` for `fn name(hv: &dyn hv::Hypervisor)`.
#[macro_export]
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod emu {
            $(#[test] fn $name() { super::$name(&$crate::emu()); })*
        }
        mod kvm {
            $(#[test] fn $name() { if let Some(k) = $crate::kvm() { super::$name(&k); } })*
        }
    };
}

/// One port or MMIO access the guest made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    PioOut(u16, Vec<u8>),
    PioIn(u16, usize),
    MmioWrite(u64, Vec<u8>),
    MmioRead(u64, usize),
}

type Hook = Box<dyn Fn() + Send + Sync>;

/// A [`DeviceIo`] that records every access. Port reads return [`IN_VALUE`], MMIO reads return
/// `0x10 + i` for byte `i`. A write to [`STOP_PORT`] stops the vCPU; a write to a port with a
/// hook ([`Recorder::on_out`]) runs the hook (e.g. to send an MSI at a precise point).
#[derive(Default)]
pub struct Recorder {
    log: Mutex<Vec<Access>>,
    stop: Mutex<Option<u8>>,
    kicker: OnceLock<Arc<dyn VcpuKicker>>,
    hooks: Mutex<Vec<(u16, Hook)>>,
}

impl Recorder {
    pub fn accesses(&self) -> Vec<Access> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Bytes written to `port`, concatenated.
    pub fn port_bytes(&self, port: u16) -> Vec<u8> {
        self.accesses()
            .into_iter()
            .filter_map(|a| match a {
                Access::PioOut(p, d) if p == port => Some(d),
                _ => None,
            })
            .flatten()
            .collect()
    }

    /// MMIO writes as (address, bytes).
    pub fn mmio_writes(&self) -> Vec<(u64, Vec<u8>)> {
        self.accesses()
            .into_iter()
            .filter_map(|a| match a {
                Access::MmioWrite(addr, d) => Some((addr, d)),
                _ => None,
            })
            .collect()
    }

    pub fn on_out(&self, port: u16, hook: impl Fn() + Send + Sync + 'static) {
        if let Ok(mut h) = self.hooks.lock() {
            h.push((port, Box::new(hook)));
        }
    }

    fn push(&self, a: Access) {
        if let Ok(mut l) = self.log.lock() {
            l.push(a);
        }
    }

    fn take_stop(&self) -> Option<u8> {
        self.stop.lock().ok().and_then(|mut s| s.take())
    }
}

impl DeviceIo for Recorder {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        self.push(Access::PioIn(port, data.len()));
        data.fill(IN_VALUE);
    }

    fn pio_write(&self, port: u16, data: &[u8]) {
        if port == STOP_PORT {
            if let Ok(mut s) = self.stop.lock() {
                *s = Some(data.first().copied().unwrap_or(0));
            }
            if let Some(k) = self.kicker.get() {
                k.kick();
            }
            return;
        }
        self.push(Access::PioOut(port, data.to_vec()));
        if let Ok(h) = self.hooks.lock() {
            for (_, f) in h.iter().filter(|(p, _)| *p == port) {
                f();
            }
        }
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.push(Access::MmioRead(addr, data.len()));
        for (i, b) in data.iter_mut().enumerate() {
            *b = 0x10 + i as u8;
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.push(Access::MmioWrite(addr, data.to_vec()));
    }
}

/// An exception or interrupt recorded by the IDT stubs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exception {
    pub vector: u8,
    /// The pushed error code, 0 for vectors without one.
    pub error_code: u64,
    pub cr2: u64,
    /// The interrupt frame: return RIP, CS, RFLAGS, RSP, SS.
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
    /// RAX when the handler was entered.
    pub rax: u64,
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The guest wrote this byte to [`STOP_PORT`] ([`EXC_STOP`]: an IDT stub did).
    Port(u8),
    Halted,
    Shutdown,
    /// The watchdog kicked the vCPU.
    Timeout,
}

#[derive(Clone, Debug)]
pub struct Outcome {
    pub stop: Stop,
    pub state: CpuState,
    pub exception: Option<Exception>,
}

impl Outcome {
    /// Panics unless the program stopped itself through [`stop`] without an exception.
    #[track_caller]
    pub fn assert_clean(&self) -> &Self {
        assert_eq!(
            (self.stop, self.exception),
            (Stop::Port(0), None),
            "program did not run to its end (rip {:#x})",
            self.state.regs.rip
        );
        self
    }

    /// Panics unless the run ended in an IDT stub for `vector` with `error_code`.
    #[track_caller]
    pub fn assert_exception(&self, vector: u8, error_code: u64) -> Exception {
        assert_eq!(
            (self.stop, self.exception),
            (
                Stop::Port(EXC_STOP),
                self.exception.filter(|_| self.stop == Stop::Port(EXC_STOP))
            ),
            "expected exception {vector}: stopped at rip {:#x}",
            self.state.regs.rip
        );
        assert!(self.exception.is_some(), "stub stopped without a record");
        let e = self.exception.expect("stub stopped without a record");
        assert_eq!(
            (e.vector, e.error_code),
            (vector, error_code),
            "vector/error code"
        );
        e
    }

    pub fn regs(&self) -> &hv::Registers {
        &self.state.regs
    }
}

/// Assembles a 64-bit program at [`CODE`].
pub fn asm(
    f: impl FnOnce(&mut CodeAssembler) -> std::result::Result<(), iced_x86::IcedError>,
) -> Vec<u8> {
    asm_at(CODE, f).expect("assembling")
}

pub fn asm_at(
    ip: u64,
    f: impl FnOnce(&mut CodeAssembler) -> std::result::Result<(), iced_x86::IcedError>,
) -> Result<Vec<u8>> {
    let mut a = CodeAssembler::new(64)?;
    f(&mut a)?;
    Ok(a.assemble(ip)?)
}

/// `mov al, 0; out STOP_PORT, al; jmp $`: the end of every program. The vCPU stops on an
/// instruction boundary soon after the `out`, so the spin keeps it from running on; the final
/// RIP is the `jmp`.
pub fn stop(a: &mut CodeAssembler) -> std::result::Result<(), iced_x86::IcedError> {
    a.mov(al, 0)?;
    a.out(STOP_PORT as u32, al)?;
    spin(a)
}

/// `jmp $`.
pub fn spin(a: &mut CodeAssembler) -> std::result::Result<(), iced_x86::IcedError> {
    let mut l = a.create_label();
    a.set_label(&mut l)?;
    a.jmp(l)
}

fn gdt_entry(base: u32, limit: u32, access: u8, flags: u8) -> u64 {
    let mut d = u64::from(limit & 0xffff);
    d |= u64::from(base & 0xff_ffff) << 16;
    d |= u64::from(access) << 40;
    d |= u64::from((limit >> 16) & 0xf) << 48;
    d |= u64::from(flags & 0xf) << 52;
    d |= u64::from(base >> 24) << 56;
    d
}

fn has_error_code(v: u64) -> bool {
    matches!(v, 8 | 10..=14 | 17 | 21)
}

/// A stub for vector `v` at `at`: records the [`Exception`] at [`EXC`] and stops.
fn stub(v: u64, at: u64) -> Result<Vec<u8>> {
    asm_at(at, |a| {
        a.mov(qword_ptr(EXC + 72), rax)?;
        if has_error_code(v) {
            a.pop(rax)?;
        } else {
            a.xor(rax, rax)?;
        }
        a.mov(qword_ptr(EXC + 8), rax)?;
        // Frame (rip, cs, rflags, rsp, ss) to EXC+24.., CR2, then the vector last.
        for k in 0..5u64 {
            a.mov(rax, qword_ptr(rsp + 8 * k as i32))?;
            a.mov(qword_ptr(EXC + 24 + 8 * k), rax)?;
        }
        a.mov(rax, iced_x86::code_asm::cr2)?;
        a.mov(qword_ptr(EXC + 16), rax)?;
        a.mov(qword_ptr(EXC), 0x100 + v as i32)?;
        a.mov(al, EXC_STOP as u32)?;
        a.out(STOP_PORT as u32, al)?;
        spin(a)
    })
}

/// A VM with one vCPU, its memory and recorder.
pub struct Guest {
    pub mem: Arc<hv::GuestMemory>,
    pub vm: Arc<dyn Vm>,
    pub vcpu: Box<dyn Vcpu>,
    pub io: Arc<Recorder>,
    pub timeout: Duration,
}

fn seg(selector: u16, type_: u8, dpl: u8, l: bool, db: bool) -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: true,
        dpl,
        db,
        s: true,
        l,
        g: true,
        avl: false,
        unusable: false,
    }
}

impl Guest {
    /// A VM with `mib` MiB of RAM on `hv` (portable CPU model, one vCPU), page tables, GDT, TSS
    /// and IDT in place and the vCPU in 64-bit mode at [`CODE`] (CPL 0, IF=0).
    pub fn new(hv: &dyn Hypervisor, mib: usize) -> Result<Guest> {
        Guest::with_model(hv, mib, CpuModel::portable())
    }

    /// [`Guest::new`] with another CPU model.
    pub fn with_model(hv: &dyn Hypervisor, mib: usize, cpu_model: CpuModel) -> Result<Guest> {
        let mem = Arc::new(
            hv::GuestMemory::from_ranges(&[(GuestAddress(0), mib << 20)]).map_err(mem_err)?,
        );
        let w = |a: u64, v: u64| mem.write_obj(v, GuestAddress(a)).map_err(mem_err);
        w(PML4, 0x2000 | 7)?;
        w(0x2000, 0x3000 | 7)?;
        for k in 0..512u64 {
            w(0x3000 + k * 8, (k << 21) | 0x87)?;
        }
        w(0x2000 + 3 * 8, 0x5000 | 7)?;
        for k in 0..512u64 {
            w(0x5000 + k * 8, (3 << 30) | (k << 21) | 0x93)?;
        }
        let gdt = [
            0,
            gdt_entry(0, 0xfffff, 0x9b, 0xa),
            gdt_entry(0, 0xfffff, 0x93, 0xc),
            gdt_entry(TSS as u32, 0x67, 0x8b, 0),
            0,
            gdt_entry(0, 0xfffff, 0xfb, 0xa),
            gdt_entry(0, 0xfffff, 0xf3, 0xc),
        ];
        for (k, d) in gdt.iter().enumerate() {
            w(GDT + k as u64 * 8, *d)?;
        }
        // TSS: RSP0 at offset 4, I/O map base beyond the limit (no bitmap).
        w(TSS + 4, STACK)?;
        mem.write_obj(0x68u16, GuestAddress(TSS + 0x66))
            .map_err(mem_err)?;
        for v in 0..256u64 {
            let at = STUBS + v * STUB_SIZE;
            let code = stub(v, at)?;
            if code.len() as u64 > STUB_SIZE {
                return Err(Error::Memory(format!("IDT stub is {} bytes", code.len())));
            }
            mem.write_slice(&code, GuestAddress(at)).map_err(mem_err)?;
        }
        let vm = hv.create_vm(hv::VmConfig {
            memory: mem.clone(),
            cpu_model,
            vcpus: 1,
            tsc_khz: None,
        })?;
        let vcpu = vm.create_vcpu(0)?;
        let io = Arc::new(Recorder::default());
        let _ = io.kicker.set(vcpu.kicker());
        let mut g = Guest {
            mem,
            vm,
            vcpu,
            io,
            timeout: DEFAULT_TIMEOUT,
        };
        for v in 0..=255u8 {
            g.set_gate(v, STUBS + u64::from(v) * STUB_SIZE)?;
        }
        let mut st = g.vcpu.state()?;
        kernel_mode(&mut st);
        g.vcpu.set_state(&st)?;
        Ok(g)
    }

    /// [`Guest::new`] with [`DEFAULT_MIB`] and `code` loaded at [`CODE`]; panics on failure.
    pub fn with_code(hv: &dyn Hypervisor, code: &[u8]) -> Guest {
        let mut g = Guest::new(hv, DEFAULT_MIB).expect("creating the guest");
        g.load(code).expect("loading the program");
        g
    }

    /// Writes `code` at [`CODE`] and resets the vCPU to 64-bit CPL 0 at its start.
    pub fn load(&mut self, code: &[u8]) -> Result<()> {
        self.write(CODE, code)?;
        let mut st = self.vcpu.state()?;
        kernel_mode(&mut st);
        self.vcpu.set_state(&st)?;
        Ok(())
    }

    /// Like [`Guest::load`], but the program runs at CPL 3 with IOPL 3 (so `out` works).
    pub fn load_user(&mut self, code: &[u8]) -> Result<()> {
        self.write(CODE, code)?;
        let mut st = self.vcpu.state()?;
        user_mode(&mut st);
        self.vcpu.set_state(&st)?;
        Ok(())
    }

    /// Runs until the program stops (see [`Stop`]) and returns the final state and the
    /// exception record. The record is cleared first.
    pub fn run(&mut self) -> Result<Outcome> {
        self.write(EXC, &[0u8; 80])?;
        let _ = self.io.take_stop();
        let kicker = self.vcpu.kicker();
        let fired = Arc::new(AtomicBool::new(false));
        let (done, wait) = mpsc::channel::<()>();
        let timeout = self.timeout;
        let watchdog = {
            let fired = fired.clone();
            std::thread::spawn(move || {
                if let Err(mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(timeout) {
                    fired.store(true, Ordering::SeqCst);
                    kicker.kick();
                }
            })
        };
        let exit = self.vcpu.run(&*self.io);
        let _ = done.send(());
        let _ = watchdog.join();
        let exit = exit?;
        let stop = match (exit, self.io.take_stop()) {
            (_, Some(v)) => Stop::Port(v),
            (VcpuExit::Halted, None) => Stop::Halted,
            (VcpuExit::Shutdown, None) => Stop::Shutdown,
            (VcpuExit::Interrupted, None) => {
                if !fired.load(Ordering::SeqCst) {
                    return Err(Error::Hv(hv::Error::Unhandled(
                        "run interrupted by nobody".into(),
                    )));
                }
                Stop::Timeout
            }
        };
        let state = self.vcpu.state()?;
        Ok(Outcome {
            stop,
            state,
            exception: self.exception()?,
        })
    }

    /// [`Guest::run`], panicking on a harness/backend error.
    #[track_caller]
    pub fn go(&mut self) -> Outcome {
        match self.run() {
            Ok(o) => o,
            Err(e) => panic!("run failed: {}", hv::Chain(&e)),
        }
    }

    fn exception(&self) -> Result<Option<Exception>> {
        let r = |k: u64| self.read_u64(EXC + 8 * k);
        let v = r(0)?;
        if v & 0x100 == 0 {
            return Ok(None);
        }
        Ok(Some(Exception {
            vector: (v & 0xff) as u8,
            error_code: r(1)?,
            cr2: r(2)?,
            rip: r(3)?,
            cs: r(4)?,
            rflags: r(5)?,
            rsp: r(6)?,
            ss: r(7)?,
            rax: r(9)?,
        }))
    }

    pub fn write(&self, addr: u64, bytes: &[u8]) -> Result<()> {
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .map_err(mem_err)
    }

    pub fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>> {
        let mut b = vec![0u8; len];
        self.mem
            .read_slice(&mut b, GuestAddress(addr))
            .map_err(mem_err)?;
        Ok(b)
    }

    pub fn read_u64(&self, addr: u64) -> Result<u64> {
        self.mem.read_obj(GuestAddress(addr)).map_err(mem_err)
    }

    pub fn write_u64(&self, addr: u64, v: u64) -> Result<()> {
        self.mem.write_obj(v, GuestAddress(addr)).map_err(mem_err)
    }

    /// Points IDT vector `v` at `handler` (64-bit interrupt gate, DPL 0).
    pub fn set_gate(&self, v: u8, handler: u64) -> Result<()> {
        let lo = (handler & 0xffff)
            | (0x08 << 16)
            | (0x8e00u64 << 32)
            | (((handler >> 16) & 0xffff) << 48);
        let at = IDT + u64::from(v) * 16;
        self.write_u64(at, lo)?;
        self.write_u64(at + 8, handler >> 32)
    }

    /// Maps [`SMALL`]..+2 MiB with 4 KiB pages (identity, writable, present, user).
    pub fn map_small(&self) -> Result<()> {
        for k in 0..512u64 {
            self.write_u64(PT + k * 8, (SMALL + (k << 12)) | 7)?;
        }
        self.write_u64(0x3000 + (SMALL >> 21) * 8, PT | 7)
    }

    /// Maps the first 2 MiB with 4 KiB pages (identity, writable, user) through [`LOW_PT`],
    /// leaving the pages at `absent` not present. Call it before the first run: no TLB is
    /// flushed.
    pub fn map_low_4k(&self, absent: &[u64]) -> Result<()> {
        for k in 0..512u64 {
            let a = k << 12;
            let pte = if absent.contains(&a) { 0 } else { a | 7 };
            self.write_u64(LOW_PT + k * 8, pte)?;
        }
        self.write_u64(0x3000, LOW_PT | 7)
    }

    /// The address of the PTE mapping `addr` (inside [`SMALL`]).
    pub fn pte(addr: u64) -> u64 {
        PT + ((addr - SMALL) >> 12) * 8
    }
}

/// 64-bit mode, CPL 0, IF=0, at [`CODE`] with the stack at [`STACK`], all GPRs zero.
pub fn kernel_mode(st: &mut CpuState) {
    st.regs = hv::Registers {
        rip: CODE,
        rsp: STACK,
        rflags: 2,
        ..Default::default()
    };
    let data = seg(0x10, 3, 0, false, true);
    let sr = &mut st.sregs;
    sr.cs = seg(0x08, 0xb, 0, true, false);
    sr.ds = data;
    sr.es = data;
    sr.ss = data;
    sr.fs = data;
    sr.gs = data;
    sr.tr = Segment {
        base: TSS,
        limit: 0x67,
        s: false,
        g: false,
        ..seg(0x18, 0xb, 0, false, false)
    };
    sr.ldt = Segment {
        selector: 0,
        type_: 2,
        present: false,
        unusable: true,
        s: false,
        limit: 0xffff,
        g: false,
        ..data
    };
    sr.gdt = hv::DescriptorTable {
        base: GDT,
        limit: 7 * 8 - 1,
    };
    sr.idt = hv::DescriptorTable {
        base: IDT,
        limit: 256 * 16 - 1,
    };
    sr.cr0 = 0x8005_0033; // PG, WP, NE, ET, MP, PE
    sr.cr2 = 0;
    sr.cr3 = PML4;
    sr.cr4 = 0x620; // OSXMMEXCPT, OSFXSR, PAE
    sr.efer = 0xd01; // NXE, LMA, LME, SCE
    st.events = hv::PendingEvents::default();
    st.mp_state = hv::MpState::Runnable;
}

/// [`kernel_mode`], then CPL 3 (selectors 0x2b/0x33) with IOPL 3.
pub fn user_mode(st: &mut CpuState) {
    kernel_mode(st);
    let sr = &mut st.sregs;
    sr.cs = seg(0x2b, 0xb, 3, true, false);
    let data = seg(0x33, 3, 3, false, true);
    sr.ds = data;
    sr.es = data;
    sr.ss = data;
    sr.fs = data;
    sr.gs = data;
    st.regs.rflags = 0x3002;
}

/// `name` from the environment as a number (decimal or `0x` hex), or `None` when unset. A value
/// that is not a number fails the test that asked.
pub fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => v.replace('_', "").parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={v} is not a number")))
}

/// How many blocks a differential test runs: `family_var` when set (e.g.
/// `ANYVISOR_X87_BLOCKS`), else `ANYVISOR_DIFF_BLOCKS` (every family at once, for long runs),
/// else `default` (the short CI run).
pub fn diff_blocks(family_var: &str, default: u64) -> u64 {
    env_u64(family_var)
        .or_else(|| env_u64("ANYVISOR_DIFF_BLOCKS"))
        .unwrap_or(default)
}

/// The seed of a differential test: `family_var`, else `ANYVISOR_DIFF_SEED`, else `default`.
pub fn diff_seed(family_var: &str, default: u64) -> u64 {
    env_u64(family_var)
        .or_else(|| env_u64("ANYVISOR_DIFF_SEED"))
        .unwrap_or(default)
}
