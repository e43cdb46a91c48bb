//! Conformance harness: tiny 64-bit guest programs run through the neutral `hv` contract only, so
//! one test body and one set of expectations run on every backend (emu always, KVM when
//! `/dev/kvm` can be opened), plus a KVM-vs-emu differential tester ([`diff`]). The guest is
//! built by the shared tiny-guest kit (`testkit`) with this crate's [`layout`].
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

use std::sync::Arc;

use hv::{CpuModel, CpuState, Hypervisor};
use iced_x86::code_asm::{CodeAssembler, al};
use testkit::{LongMode, StubEnd, Stubs, VmSpec};

pub use testkit::{
    Access, AsmResult, CODE, DATA, DEFAULT_TIMEOUT, Exception, GDT, IDT, IN_VALUE, MMIO, PML4,
    Recorder, STACK, Stop, spin,
};

pub const PT: u64 = 0x4000;
pub const TSS: u64 = 0x7000;
pub const STUBS: u64 = 0x30000;
const STUB_SIZE: u64 = 128;
/// Where the IDT stubs record the last exception or interrupt (see [`Exception`]).
pub const EXC: u64 = 0xc000;
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
/// A write here ends the run.
pub const STOP_PORT: u16 = 0xe9;
/// The value the IDT stubs write to [`STOP_PORT`].
pub const EXC_STOP: u8 = 0xee;
/// Default guest memory.
pub const DEFAULT_MIB: usize = 8;

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
    #[error("test guest")]
    Guest(#[source] testkit::Error),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("assembling")]
    Asm(#[from] iced_x86::IcedError),
}

impl From<testkit::Error> for Error {
    /// Backend and assembler errors keep their own variants (the differential reports name them).
    fn from(e: testkit::Error) -> Error {
        match e {
            testkit::Error::Hv(h) => Error::Hv(h),
            testkit::Error::Asm(a) => Error::Asm(a),
            other => Error::Guest(other),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

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
pub fn asm(f: impl FnOnce(&mut CodeAssembler) -> AsmResult) -> Vec<u8> {
    testkit::asm(64, CODE, f)
}

pub fn asm_at(ip: u64, f: impl FnOnce(&mut CodeAssembler) -> AsmResult) -> Result<Vec<u8>> {
    Ok(testkit::try_asm(64, ip, f)?)
}

/// `mov al, 0; out STOP_PORT, al; jmp $`: the end of every program. The vCPU stops on an
/// instruction boundary soon after the `out`, so the spin keeps it from running on; the final
/// RIP is the `jmp`.
pub fn stop(a: &mut CodeAssembler) -> AsmResult {
    a.mov(al, 0)?;
    a.out(u32::from(STOP_PORT), al)?;
    spin(a)
}

/// 64-bit mode at [`CODE`], the stack at [`STACK`], the TSS at [`TSS`].
const MODE: LongMode = LongMode::new(7, (0x18, TSS), STACK);

const GDT_ENTRIES: [u64; 7] = [
    0,
    testkit::CODE64,
    testkit::DATA32,
    testkit::tss_entry(TSS as u32),
    0,
    testkit::USER_CODE64,
    testkit::USER_DATA,
];

/// The guest of every conformance test with `mib` MiB of RAM (see the crate docs).
pub fn layout(mib: usize) -> testkit::Layout {
    testkit::Layout {
        mem_bytes: mib << 20,
        mode: MODE,
        user_pages: true,
        pd_4g: Some(testkit::PD_4G),
        gdt: &GDT_ENTRIES,
        rsp0: Some(STACK),
        stubs: Some(Stubs {
            at: STUBS,
            stride: STUB_SIZE,
            vectors: 256,
            record: EXC,
            end: StubEnd::Port {
                port: STOP_PORT,
                value: EXC_STOP,
            },
        }),
    }
}

testkit::guest_type!(
    /// A VM with one vCPU, its memory, recorder and run timeout: the kit's guest, reached
    /// through `Deref`.
    Guest
);

impl Guest {
    /// A VM with `mib` MiB of RAM on `hv` (portable CPU model, one vCPU), page tables, GDT, TSS
    /// and IDT in place and the vCPU in 64-bit mode at [`CODE`] (CPL 0, IF=0).
    pub fn new(hv: &dyn Hypervisor, mib: usize) -> Result<Guest> {
        Guest::with_model(hv, mib, CpuModel::portable())
    }

    /// [`Guest::new`] with another CPU model.
    pub fn with_model(hv: &dyn Hypervisor, mib: usize, cpu_model: CpuModel) -> Result<Guest> {
        let spec = VmSpec {
            cpu_model,
            ..VmSpec::default()
        };
        let io = Recorder::stopping_at(STOP_PORT);
        Ok(Guest(testkit::Guest::create(hv, layout(mib), spec, io)?))
    }

    /// [`Guest::new`] with [`DEFAULT_MIB`] and `code` loaded at [`CODE`]; panics on failure.
    pub fn with_code(hv: &dyn Hypervisor, code: &[u8]) -> Guest {
        let mut g = Guest::new(hv, DEFAULT_MIB).expect("creating the guest");
        g.load(code).expect("loading the program");
        g
    }

    /// Writes `code` at [`CODE`] and resets the vCPU to 64-bit CPL 0 at its start.
    pub fn load(&mut self, code: &[u8]) -> Result<()> {
        Ok(self.0.load(code)?)
    }

    /// Like [`Guest::load`], but the program runs at CPL 3 with IOPL 3 (so `out` works).
    pub fn load_user(&mut self, code: &[u8]) -> Result<()> {
        Ok(self.0.load_user(code, 0x2b, 0x33)?)
    }

    /// Runs until the program stops (see [`Stop`]) and returns the final state and the
    /// exception record. The record is cleared first.
    pub fn run(&mut self) -> Result<Outcome> {
        let stop = self.0.run_until_stop()?;
        Ok(Outcome {
            stop,
            state: self.vcpu.state()?,
            exception: self.0.exception()?,
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

    /// Maps [`SMALL`]..+2 MiB with 4 KiB pages (identity, writable, present, user).
    pub fn map_small(&self) -> Result<()> {
        Ok(self.0.map_4k(SMALL, PT, &[])?)
    }

    /// Maps the first 2 MiB with 4 KiB pages (identity, writable, user) through [`LOW_PT`],
    /// leaving the pages at `absent` not present. Call it before the first run: no TLB is
    /// flushed.
    pub fn map_low_4k(&self, absent: &[u64]) -> Result<()> {
        Ok(self.0.map_4k(0, LOW_PT, absent)?)
    }

    /// The address of the PTE mapping `addr` (inside [`SMALL`]).
    pub fn pte(addr: u64) -> u64 {
        testkit::pte_of(PT, SMALL, addr)
    }
}

/// 64-bit mode, CPL 0, IF=0, at [`CODE`] with the stack at [`STACK`], all GPRs zero.
pub fn kernel_mode(st: &mut CpuState) {
    MODE.kernel(st);
}

/// [`kernel_mode`], then CPL 3 (selectors 0x2b/0x33) with IOPL 3.
pub fn user_mode(st: &mut CpuState) {
    MODE.user(st, 0x2b, 0x33);
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
