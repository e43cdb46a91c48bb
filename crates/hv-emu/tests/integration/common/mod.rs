//! Conformance harness: tiny guest programs assembled with iced-x86 `code_asm`, run on any
//! `hv::Hypervisor` through the neutral contract only (so the same bodies can run on KVM).
//!
//! Guest layout (identity-mapped, 64-bit mode, CPL 0, IF=0 unless a test sets it):
//! * `PML4` 0x1000, `PDPT` 0x2000, `PD` 0x3000 (2 MiB pages over the first 1 GiB) — tests that
//!   need 4 KiB pages install a page table at `PT` 0x4000 for the 2 MiB region at `SMALL`;
//!   PD 0x5000 maps the 4th GiB (local APIC).
//! * GDT at 0x500: 0x08 = 64-bit code, 0x10 = data, 0x18 = 32-bit code, 0x20 = 16-bit code.
//! * IDT at 0x6000: vector v jumps to a stub that stores `0x100 | v` at `EXC` and the error
//!   code (or 0) at `EXC + 8`, then executes `hlt` with IF=0 (the run ends as `Halted`).
//! * Code at `CODE`, data at `DATA`, stack below `STACK`.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use hv::{CpuState, DeviceIo, Hypervisor, Segment, Vcpu, VcpuExit, Vm, VmConfig};
use iced_x86::code_asm::CodeAssembler;
use vm_memory::{Bytes, GuestAddress};

pub const MEM: usize = 8 << 20;
pub const PML4: u64 = 0x1000;
pub const PT: u64 = 0x4000;
pub const GDT: u64 = 0x500;
pub const IDT: u64 = 0x6000;
pub const STUBS: u64 = 0x8000;
pub const EXC: u64 = 0x9000;
pub const CODE: u64 = 0x10000;
pub const DATA: u64 = 0x20000;
pub const STACK: u64 = 0x80000;
/// A 2 MiB region mapped with 4 KiB pages (see [`Guest::map_small`]).
pub const SMALL: u64 = 0x40_0000;

/// Port and MMIO accesses seen by the guest; reads return all-ones (like the platform).
#[derive(Default)]
pub struct TestIo {
    pub pio_writes: Mutex<Vec<(u16, Vec<u8>)>>,
    pub mmio_writes: Mutex<Vec<(u64, Vec<u8>)>>,
}

impl DeviceIo for TestIo {
    fn pio_read(&self, _port: u16, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        self.pio_writes.lock().unwrap().push((port, data.to_vec()));
    }
    fn mmio_read(&self, _addr: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.mmio_writes.lock().unwrap().push((addr, data.to_vec()));
    }
}

pub struct Guest {
    pub mem: Arc<hv::GuestMemory>,
    pub vm: Arc<dyn Vm>,
    pub vcpu: Box<dyn Vcpu>,
    pub io: TestIo,
}

pub fn asm(f: impl FnOnce(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>) -> Vec<u8> {
    asm_at(64, CODE, f)
}

pub fn asm_at(
    bitness: u32,
    ip: u64,
    f: impl FnOnce(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>,
) -> Vec<u8> {
    let mut a = CodeAssembler::new(bitness).expect("assembler");
    f(&mut a).expect("assembling");
    a.assemble(ip).expect("assembling")
}

fn seg(selector: u16, type_: u8, l: bool, db: bool) -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: true,
        dpl: 0,
        db,
        s: true,
        l,
        g: true,
        avl: false,
        unusable: false,
    }
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
    let mem =
        Arc::new(hv::GuestMemory::from_ranges(&[(GuestAddress(0), MEM)]).expect("guest memory"));
    let w = |a: u64, v: u64| mem.write_obj(v, GuestAddress(a)).unwrap();
    w(PML4, 0x2000 | 3);
    w(0x2000, 0x3000 | 3);
    for k in 0..512u64 {
        w(0x3000 + k * 8, (k << 21) | 0x83);
    }
    // The 4th GiB (local APIC page), uncached 2 MiB pages.
    w(0x2000 + 3 * 8, 0x5000 | 3);
    for k in 0..512u64 {
        w(0x5000 + k * 8, (3 << 30) | (k << 21) | 0x93);
    }
    let gdt = [
        0u64,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00cf_9b00_0000_ffff,
        0x008f_9b00_0000_ffff,
    ];
    for (k, d) in gdt.iter().enumerate() {
        w(GDT + k as u64 * 8, *d);
    }
    for v in 0..32u64 {
        let stub = STUBS + v * 64;
        let has_code = matches!(v, 8 | 10..=14 | 17);
        let bytes = asm_at(64, stub, |a| {
            use iced_x86::code_asm::*;
            a.mov(rsi, EXC)?;
            a.mov(qword_ptr(rsi), 0x100 + v as i32)?;
            if has_code {
                a.pop(rax)?;
                a.mov(qword_ptr(rsi + 8), rax)?;
            } else {
                a.mov(qword_ptr(rsi + 8), 0)?;
            }
            a.cli()?;
            a.hlt()?;
            Ok(())
        });
        mem.write_slice(&bytes, GuestAddress(stub)).unwrap();
        let lo = (stub & 0xffff) | (0x08 << 16) | (0x8e00u64 << 32) | ((stub >> 16) & 0xffff) << 48;
        w(IDT + v * 16, lo);
        w(IDT + v * 16 + 8, stub >> 32);
    }
    mem.write_slice(code, GuestAddress(CODE)).unwrap();
    let vm = hv
        .create_vm(VmConfig {
            memory: mem.clone(),
            cpu_model,
            vcpus,
            tsc_khz,
        })
        .expect("create_vm");
    let mut vcpu = vm.create_vcpu(0).expect("create_vcpu");
    let mut st = vcpu.state().expect("state");
    set_long_mode(&mut st);
    vcpu.set_state(&st).expect("set_state");
    Guest {
        mem,
        vm,
        vcpu,
        io: TestIo::default(),
    }
}

pub fn set_long_mode(st: &mut CpuState) {
    st.regs = hv::Registers {
        rip: CODE,
        rsp: STACK,
        rflags: 2,
        ..Default::default()
    };
    let data = seg(0x10, 3, false, true);
    st.sregs.cs = seg(0x08, 0xb, true, false);
    st.sregs.ds = data;
    st.sregs.es = data;
    st.sregs.ss = data;
    st.sregs.fs = data;
    st.sregs.gs = data;
    st.sregs.tr = Segment {
        type_: 0xb,
        s: false,
        limit: 0x67,
        ..seg(0, 0xb, false, false)
    };
    st.sregs.gdt = hv::DescriptorTable {
        base: GDT,
        limit: 39,
    };
    st.sregs.idt = hv::DescriptorTable {
        base: IDT,
        limit: 256 * 16 - 1,
    };
    st.sregs.cr0 = 0x8001_0033;
    st.sregs.cr3 = PML4;
    st.sregs.cr4 = 0x620;
    st.sregs.efer = 0xd01;
}

impl Guest {
    /// Runs until the vCPU halts (or shuts down); panics after too many kicks/errors.
    pub fn run(&mut self) -> VcpuExit {
        self.vcpu.run(&self.io).expect("run")
    }

    pub fn try_run(&mut self) -> hv::Result<VcpuExit> {
        self.vcpu.run(&self.io)
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
        self.mem.read_obj(GuestAddress(a)).unwrap()
    }

    pub fn write_u64(&self, a: u64, v: u64) {
        self.mem.write_obj(v, GuestAddress(a)).unwrap()
    }

    /// Points IDT vector `v` at `handler` (64-bit interrupt gate).
    pub fn set_gate(&self, v: u8, handler: u64) {
        let v = u64::from(v);
        let lo = (handler & 0xffff)
            | (0x08 << 16)
            | (0x8e00u64 << 32)
            | (((handler >> 16) & 0xffff) << 48);
        self.write_u64(IDT + v * 16, lo);
        self.write_u64(IDT + v * 16 + 8, handler >> 32);
    }

    pub fn write_code(&self, addr: u64, code: &[u8]) {
        self.mem.write_slice(code, GuestAddress(addr)).unwrap();
    }

    /// The exception the IDT stubs recorded: (vector, error code).
    pub fn exception(&self) -> Option<(u8, u64)> {
        let v = self.read_u64(EXC);
        (v & 0x100 != 0).then(|| ((v & 0xff) as u8, self.read_u64(EXC + 8)))
    }

    /// Maps `SMALL`..`SMALL`+2MiB with 4 KiB pages (identity, writable, present) and returns
    /// the address of the PTE for `addr`.
    pub fn map_small(&self) {
        for k in 0..512u64 {
            self.write_u64(PT + k * 8, (SMALL + (k << 12)) | 3);
        }
        self.write_u64(0x3000 + (SMALL >> 21) * 8, PT | 3);
    }

    pub fn pte(&self, addr: u64) -> u64 {
        PT + ((addr - SMALL) >> 12) * 8
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
