//! The emu tests' guest: the shared tiny-guest kit (`testkit`) with this layout, on the emu
//! backend (the KVM backend runs the same kinds of guests in `crates/conformance`).
//!
//! Guest layout (identity-mapped, 64-bit mode, CPL 0, IF=0 unless a test sets it):
//! * `PML4` 0x1000, `PDPT` 0x2000, `PD` 0x3000 (2 MiB supervisor pages over the first 1 GiB) —
//!   tests that need 4 KiB pages install a page table at `PT` 0x4000 for the 2 MiB region at
//!   `SMALL`; PD 0x5000 maps the 4th GiB (local APIC).
//! * GDT at 0x500: 0x08 = 64-bit code, 0x10 = data, 0x18 = 32-bit code, 0x20 = 16-bit code; TR
//!   selector 0 with its TSS at address 0.
//! * IDT at 0x6000: vectors 0..32 go to kit stubs at `STUBS` that record `0x100 | v` at `EXC`
//!   and the error code (or 0) at `EXC + 8` (and the frame after), then restore RAX and
//!   `cli; hlt` (the run ends as `Halted`).
//! * Code at `CODE`, data at `DATA`, stack below `STACK`.
#![allow(dead_code)]

use hv::{CpuState, Hypervisor, VcpuExit};
use iced_x86::IcedError;
use iced_x86::code_asm::{CodeAssembler, eax, ecx, edx};
use testkit::{LongMode, Recorder, StubEnd, Stubs, VmSpec};

pub use testkit::{CODE, DATA, GDT, PML4, STACK};

pub const MEM: usize = 8 << 20;
pub const PT: u64 = 0x4000;
pub const STUBS: u64 = 0x8000;
pub const EXC: u64 = 0xa000;
/// A 2 MiB region mapped with 4 KiB pages (see [`Guest::map_small`]).
pub const SMALL: u64 = 0x40_0000;

const MODE: LongMode = LongMode {
    cr0: 0x8001_0033, // PG, WP, NE, ET, MP, PE
    ..LongMode::new(5, (0, 0), STACK)
};

const GDT_ENTRIES: [u64; 5] = [
    0,
    testkit::CODE64,
    testkit::DATA32,
    testkit::CODE32,
    testkit::CODE16,
];

const LAYOUT: testkit::Layout = testkit::Layout {
    mem_bytes: MEM,
    mode: MODE,
    user_pages: false,
    pd_4g: Some(testkit::PD_4G),
    gdt: &GDT_ENTRIES,
    rsp0: None,
    stubs: Some(Stubs {
        at: STUBS,
        stride: 256,
        vectors: 32,
        record: EXC,
        end: StubEnd::Halt,
    }),
};

testkit::guest_type!(
    /// The kit's guest (memory, VM, vCPU, a recorder reading all-ones) with the emu tests'
    /// panicking helpers.
    Guest
);

pub fn asm(f: impl FnOnce(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>) -> Vec<u8> {
    asm_at(64, CODE, f)
}

pub fn asm_at(
    bitness: u32,
    ip: u64,
    f: impl FnOnce(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>,
) -> Vec<u8> {
    testkit::asm(bitness, ip, f)
}

/// Programs SYSCALL/SYSRET with `wrmsr`: user CS 0x2b and SS 0x23 (STAR bits 63:48 = 0x18),
/// kernel CS 0x08 (bits 47:32), 64-bit entry at `entry` (LSTAR, below 4 GiB). Clobbers rax, rcx
/// and rdx.
pub fn syscall_msrs(a: &mut CodeAssembler, entry: u64) -> Result<(), IcedError> {
    a.mov(ecx, hv::msr::IA32_STAR)?;
    a.xor(eax, eax)?;
    a.mov(edx, 0x0018_0008)?;
    a.wrmsr()?;
    a.mov(ecx, hv::msr::IA32_LSTAR)?;
    a.mov(eax, entry as u32)?;
    a.xor(edx, edx)?;
    a.wrmsr()
}

/// Creates a VM with one (or `vcpus`) vCPU in 64-bit mode at `CODE` running `code`.
pub fn long_mode_guest(hv: &dyn Hypervisor, code: &[u8]) -> Guest {
    guest_with(hv, code, 1)
}

pub fn guest_with(hv: &dyn Hypervisor, code: &[u8], vcpus: u32) -> Guest {
    guest_with_tsc(hv, code, vcpus, Some(2_000_000))
}

/// Like [`guest_with`], with the VM's TSC frequency (`None`: the backend's choice).
pub fn guest_with_tsc(hv: &dyn Hypervisor, code: &[u8], vcpus: u32, tsc_khz: Option<u32>) -> Guest {
    guest_with_model(hv, code, vcpus, tsc_khz, hv::CpuModel::portable())
}

/// Like [`guest_with_tsc`], with the VM's CPU model.
pub fn guest_with_model(
    hv: &dyn Hypervisor,
    code: &[u8],
    vcpus: u32,
    tsc_khz: Option<u32>,
    cpu_model: hv::CpuModel,
) -> Guest {
    let spec = VmSpec {
        cpu_model,
        vcpus,
        tsc_khz,
    };
    let mut g = testkit::Guest::create(hv, LAYOUT, spec, Recorder::default().reading_ones())
        .expect("creating the guest");
    g.load(code).expect("loading the program");
    Guest(g)
}

pub fn set_long_mode(st: &mut CpuState) {
    MODE.kernel(st);
}

impl Guest {
    /// Runs until the vCPU halts (or shuts down); panics after too many kicks/errors.
    pub fn run(&mut self) -> VcpuExit {
        self.0.run_once().expect("run")
    }

    pub fn try_run(&mut self) -> hv::Result<VcpuExit> {
        self.0.run_once()
    }

    pub fn state(&mut self) -> CpuState {
        self.vcpu.state().expect("state")
    }

    pub fn set_state(&mut self, st: &CpuState) {
        self.vcpu.set_state(st).expect("set_state")
    }

    pub fn regs(&mut self) -> hv::Registers {
        self.state().regs
    }

    pub fn read_u64(&self, a: u64) -> u64 {
        self.0.read_u64(a).expect("guest memory")
    }

    pub fn write_u64(&self, a: u64, v: u64) {
        self.0.write_u64(a, v).expect("guest memory")
    }

    /// Points IDT vector `v` at `handler` (64-bit interrupt gate).
    pub fn set_gate(&self, v: u8, handler: u64) {
        self.0.set_gate(v, handler).expect("guest memory")
    }

    pub fn write_code(&self, addr: u64, code: &[u8]) {
        self.0.write(addr, code).expect("guest memory")
    }

    /// The exception the IDT stubs recorded: (vector, error code).
    pub fn exception(&self) -> Option<(u8, u64)> {
        let e = self.0.exception().expect("guest memory")?;
        Some((e.vector, e.error_code))
    }

    /// Maps `SMALL`..`SMALL`+2MiB with 4 KiB pages (identity, writable, present).
    pub fn map_small(&self) {
        self.0.map_4k(SMALL, PT, &[]).expect("guest memory")
    }

    /// The address of the PTE for `addr` (inside `SMALL`).
    pub fn pte(&self, addr: u64) -> u64 {
        testkit::pte_of(PT, SMALL, addr)
    }
}

/// Runs a test body on the emu backend.
pub fn emu() -> hv_emu::EmuHypervisor {
    hv_emu::EmuHypervisor::new()
}

/// Asserts a harness helper can fail: a wrong expectation must be detected.
pub fn expect_panics(f: impl FnOnce() + std::panic::UnwindSafe) {
    assert!(std::panic::catch_unwind(f).is_err(), "expected a failure");
}
