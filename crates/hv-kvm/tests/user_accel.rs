//! `KvmUserAccelerator`: user-mode stretches of a tiny 64-bit guest run on KVM and come back as
//! `UserExit`s with the user-mode state rebuilt. The guest: identity-mapped first GiB with 2 MiB
//! user pages, a GDT with kernel and user segments, a TSS whose RSP0 is [`KSTACK_TOP`], and an
//! IDT of DPL-0 interrupt gates (DPL 3 for vectors 3 and 0x80). No kernel code exists: every exit
//! from user mode must be caught by the accelerator.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hv::state::msr;
use hv::{CpuState, DeviceIo, GuestMemory, UserExit, UserModeAccelerator, UserModeRunner};
use hv_kvm::KvmUserAccelerator;
use iced_x86::code_asm::*;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion};

const RAM_SIZE: usize = 4 << 20;
const GDT: u64 = 0x500;
const TSS: u64 = 0x600;
const IDT: u64 = 0x1000;
const PML4: u64 = 0x2000;
const KSTACK_TOP: u64 = 0x9000;
const CODE: u64 = 0x10000;
const DATA: u64 = 0x20_0000;
const USER_STACK: u64 = 0x8_0000;
/// Not mapped: PDPT[1] is empty.
const UNMAPPED: u64 = 0x4000_0000;
const STAR: u64 = (0x23 << 48) | (0x08 << 32);

fn accel() -> Option<KvmUserAccelerator> {
    match KvmUserAccelerator::open() {
        Ok(a) => Some(a),
        Err(hv::Error::Unavailable { .. }) => {
            println!("SKIP: no /dev/kvm");
            None
        }
        Err(e) => panic!("opening KVM: {e}"),
    }
}

#[derive(Default)]
struct Io {
    out: std::sync::Mutex<Vec<(u16, Vec<u8>)>>,
}

impl DeviceIo for Io {
    fn pio_read(&self, _port: u16, data: &mut [u8]) {
        data.fill(0x5a);
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        self.out.lock().unwrap().push((port, data.to_vec()));
    }
    fn mmio_read(&self, _addr: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&self, _addr: u64, _data: &[u8]) {}
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

/// Guest memory with page tables, GDT, TSS and IDT; and a user-mode state at [`CODE`].
fn guest() -> (Arc<GuestMemory>, CpuState) {
    let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), RAM_SIZE)]).unwrap());
    let w = |a: u64, v: u64| mem.write_obj(v, GuestAddress(a)).unwrap();
    w(PML4, 0x3000 | 7);
    w(0x3000, 0x4000 | 7);
    for i in 0..512u64 {
        w(0x4000 + i * 8, (i << 21) | 0x87);
    }
    let gdt = [
        0,
        gdt_entry(0, 0xfffff, 0x9b, 0xa), // 0x08 kernel code
        gdt_entry(0, 0xfffff, 0x93, 0xc), // 0x10 kernel data
        gdt_entry(TSS as u32, 0x67, 0x8b, 0), // 0x18 busy TSS
        0,
        gdt_entry(0, 0xfffff, 0xfb, 0xc), // 0x28 user code 32 (unused)
        gdt_entry(0, 0xfffff, 0xf3, 0xc), // 0x30 user data
        gdt_entry(0, 0xfffff, 0xfb, 0xa), // 0x38 user code 64
    ];
    for (i, d) in gdt.iter().enumerate() {
        w(GDT + i as u64 * 8, *d);
    }
    w(TSS + 4, KSTACK_TOP); // RSP0
    for v in 0..256u64 {
        let handler = 0xdead_0000u64 + v; // never executed
        let mut g = [0u8; 16];
        g[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
        g[2..4].copy_from_slice(&0x08u16.to_le_bytes());
        let dpl = if v == 3 || v == 0x80 { 3 } else { 0 };
        g[5] = 0x8e | (dpl << 5);
        g[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
        mem.write_slice(&g, GuestAddress(IDT + v * 16)).unwrap();
    }

    let mut s = CpuState::default();
    let ucode = hv::Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x3b,
        type_: 0xb,
        present: true,
        dpl: 3,
        db: false,
        s: true,
        l: true,
        g: true,
        avl: false,
        unusable: false,
    };
    let udata = hv::Segment {
        selector: 0x33,
        type_: 0x3,
        db: true,
        l: false,
        ..ucode
    };
    let sr = &mut s.sregs;
    sr.cs = ucode;
    sr.ds = udata;
    sr.es = udata;
    sr.fs = udata;
    sr.gs = udata;
    sr.ss = udata;
    sr.tr = hv::Segment {
        base: TSS,
        limit: 0x67,
        selector: 0x18,
        type_: 0xb,
        present: true,
        dpl: 0,
        s: false,
        g: false,
        db: false,
        l: false,
        ..ucode
    };
    sr.ldt = hv::Segment {
        selector: 0,
        type_: 0x2,
        present: false,
        unusable: true,
        dpl: 0,
        s: false,
        l: false,
        g: false,
        limit: 0xffff,
        ..ucode
    };
    sr.gdt = hv::DescriptorTable {
        base: GDT,
        limit: 8 * 8 - 1,
    };
    sr.idt = hv::DescriptorTable {
        base: IDT,
        limit: 256 * 16 - 1,
    };
    sr.cr0 = 0x8005_0033;
    sr.cr3 = PML4;
    sr.cr4 = 0x620;
    sr.efer = 0xd01;
    s.regs.rip = CODE;
    s.regs.rsp = USER_STACK;
    s.regs.rflags = 0x202;
    s.set_msr(msr::IA32_STAR, STAR);
    s.set_msr(msr::IA32_FMASK, 0x4_0700);
    s.set_msr(msr::IA32_PAT, 0x0007_0406_0007_0406);
    s.set_msr(msr::IA32_TSC, 1_000_000);
    (mem, s)
}

struct Setup {
    mem: Arc<GuestMemory>,
    state: CpuState,
    runner: Box<dyn UserModeRunner>,
    io: Io,
    _accel: KvmUserAccelerator,
}

fn setup(code: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Option<Setup> {
    let accel = accel()?;
    let (mem, state) = guest();
    let mut a = CodeAssembler::new(64).unwrap();
    code(&mut a).unwrap();
    mem.write_slice(&a.assemble(CODE).unwrap(), GuestAddress(CODE))
        .unwrap();
    let runner = accel.create_runner(0, mem.clone()).unwrap();
    Some(Setup {
        mem,
        state,
        runner,
        io: Io::default(),
        _accel: accel,
    })
}

impl Setup {
    fn run(&mut self, deadline: Option<Instant>) -> (UserExit, Vec<u64>) {
        let mut written = Vec::new();
        let exit = self
            .runner
            .run(&mut self.state, deadline, &self.io, &mut written)
            .unwrap();
        (exit, written)
    }
}

fn spin(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut top = a.create_label();
    a.set_label(&mut top)?;
    a.inc(rax)?;
    a.jmp(top)
}

#[test]
fn syscall_returns_with_rip_after_it() {
    let Some(mut t) = setup(|a| {
        a.mov(rax, 60u64)?;
        a.mov(rbx, 0x1234u64)?;
        a.syscall()?;
        a.nop()
    }) else {
        return;
    };
    let (exit, _) = t.run(None);
    println!("exit {exit:?} rip {:#x} cr2 {:#x} cs {:#x} rcx {:#x}", t.state.regs.rip, t.state.sregs.cr2, t.state.sregs.cs.selector, t.state.regs.rcx);
    assert_eq!(exit, UserExit::Syscall);
    assert_eq!(t.state.regs.rip, CODE + 10 + 10 + 2);
    assert_eq!(t.state.regs.rcx, CODE + 22);
    assert_eq!(t.state.regs.rflags, 0x202);
    assert_eq!(t.state.regs.rax, 60);
    assert_eq!(t.state.regs.rbx, 0x1234);
    assert_eq!(t.state.regs.rsp, USER_STACK);
    assert_eq!(t.state.regs.rflags & 0x200, 0x200);
    assert_eq!(t.state.sregs.cs.selector, 0x3b);
}

#[test]
fn ud2_is_invalid_opcode_at_the_instruction() {
    let Some(mut t) = setup(|a| {
        a.nop()?;
        a.ud2()
    }) else {
        return;
    };
    let (exit, _) = t.run(None);
    assert_eq!(
        exit,
        UserExit::Event {
            vector: 6,
            error_code: None
        }
    );
    assert_eq!(t.state.regs.rip, CODE + 1);
    assert_eq!(t.state.regs.rsp, USER_STACK);
    assert_eq!(t.state.sregs.cs.selector, 0x3b);
}
