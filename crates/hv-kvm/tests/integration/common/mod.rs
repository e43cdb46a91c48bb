//! A tiny 64-bit guest for tests: identity-mapped long mode set up through `set_state`, a GDT
//! (null, code 0x08, data 0x10, TSS 0x18), an IDT, and a `DeviceIo` that records accesses and
//! stops the vCPU when the guest writes to [`DONE_PORT`].

#![allow(dead_code)]

use std::sync::{Arc, Mutex, OnceLock};

use hv::{CpuModel, CpuState, DeviceIo, GuestMemory, Hypervisor, Vcpu, VcpuKicker, Vm, VmConfig};
use hv_kvm::KvmHypervisor;
use iced_x86::code_asm::{CodeAssembler, IcedError, al};
use vm_memory::{Bytes, GuestAddress};

pub const RAM_SIZE: u64 = 2 << 20;
pub const CODE: u64 = 0x10000;
pub const DATA: u64 = 0x20000;
pub const STACK_TOP: u64 = 0x9000;
pub const GDT: u64 = 0x500;
pub const IDT: u64 = 0x600;
pub const PML4: u64 = 0x1000;
/// Outside RAM but identity-mapped: accesses exit to the test's `DeviceIo` as MMIO.
pub const MMIO: u64 = 0x1000_0000;
pub const DONE_PORT: u16 = 0xf4;
/// What an unclaimed port read returns in tests that check reads.
pub const IN_VALUE: u8 = 0x5a;

/// Assembles 64-bit code placed at `ip`.
pub fn asm(ip: u64, f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    a.assemble(ip).unwrap()
}

/// `out DONE_PORT, al` then spin: the test's DeviceIo kicks the vCPU on the write.
pub fn done(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.out(DONE_PORT as u32, al)?;
    let mut spin = a.create_label();
    a.set_label(&mut spin)?;
    a.jmp(spin)
}

/// The backend, or `None` (after printing the SKIP line) when /dev/kvm cannot be opened.
pub fn kvm() -> Option<KvmHypervisor> {
    match KvmHypervisor::open(None) {
        Ok(h) => Some(h),
        Err(hv::Error::Unavailable { .. }) => {
            println!("SKIP: no /dev/kvm");
            None
        }
        Err(e) => panic!("opening KVM: {e}"),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    PioOut(u16, Vec<u8>),
    PioIn(u16, usize),
    MmioWrite(u64, Vec<u8>),
    MmioRead(u64, usize),
}

#[derive(Default)]
pub struct Recorder {
    pub log: Mutex<Vec<Access>>,
    pub kicker: OnceLock<Arc<dyn VcpuKicker>>,
}

impl Recorder {
    pub fn take(&self) -> Vec<Access> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    /// Bytes written to `port`, concatenated.
    pub fn port_bytes(&self, port: u16) -> Vec<u8> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter_map(|a| match a {
                Access::PioOut(p, d) if *p == port => Some(d.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }
}

impl DeviceIo for Recorder {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        self.log
            .lock()
            .unwrap()
            .push(Access::PioIn(port, data.len()));
        data.fill(IN_VALUE);
    }

    fn pio_write(&self, port: u16, data: &[u8]) {
        if port == DONE_PORT {
            if let Some(k) = self.kicker.get() {
                k.kick();
            }
            return;
        }
        self.log
            .lock()
            .unwrap()
            .push(Access::PioOut(port, data.to_vec()));
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.log
            .lock()
            .unwrap()
            .push(Access::MmioRead(addr, data.len()));
        for (i, b) in data.iter_mut().enumerate() {
            *b = 0x10 + i as u8;
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.log
            .lock()
            .unwrap()
            .push(Access::MmioWrite(addr, data.to_vec()));
    }
}

pub struct Guest {
    pub vm: Arc<dyn Vm>,
    pub vcpu: Box<dyn Vcpu>,
    pub mem: Arc<GuestMemory>,
    pub io: Arc<Recorder>,
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

/// A 64-bit interrupt gate to `handler` through code selector 0x08.
pub fn idt_gate(handler: u64) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    g[2..4].copy_from_slice(&0x08u16.to_le_bytes());
    g[5] = 0x8e; // present, DPL 0, 64-bit interrupt gate
    g[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    g[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    g
}

impl Guest {
    /// Maps 3..4 GiB with 2 MiB pages (uncached) so the local APIC page at 0xfee0_0000 is
    /// reachable.
    pub fn map_apic_window(&self) {
        self.mem
            .write_obj(0x4000u64 | 3, GuestAddress(0x2000 + 3 * 8))
            .unwrap();
        for i in 0..512u64 {
            let pa = 0xc000_0000 + (i << 21);
            self.mem
                .write_obj(pa | 0x83 | 0x10, GuestAddress(0x4000 + i * 8))
                .unwrap();
        }
    }

    pub fn new(h: &KvmHypervisor, model: CpuModel) -> Guest {
        let mem =
            Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), RAM_SIZE as usize)]).unwrap());
        let vm = h
            .create_vm(VmConfig {
                memory: mem.clone(),
                cpu_model: model,
                vcpus: 1,
                tsc_khz: None,
            })
            .unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let io = Arc::new(Recorder::default());
        let _ = io.kicker.set(vcpu.kicker());
        // Identity map of the first GiB with 2 MiB pages.
        mem.write_obj(0x2000u64 | 3, GuestAddress(PML4)).unwrap();
        mem.write_obj(0x3000u64 | 3, GuestAddress(0x2000)).unwrap();
        for i in 0..512u64 {
            mem.write_obj((i << 21) | 0x83, GuestAddress(0x3000 + i * 8))
                .unwrap();
        }
        let gdt = [
            0,
            gdt_entry(0, 0xfffff, 0x9b, 0xa), // 64-bit code
            gdt_entry(0, 0xfffff, 0x93, 0xc), // data
            gdt_entry(0, 0x67, 0x8b, 0),      // busy TSS (low half)
            0,                                // TSS high half
            gdt_entry(0, 0xfffff, 0xfb, 0xa), // 0x28: user 64-bit code
            gdt_entry(0, 0xfffff, 0xf3, 0xc), // 0x30: user data
        ];
        for (i, d) in gdt.iter().enumerate() {
            mem.write_obj(*d, GuestAddress(GDT + i as u64 * 8)).unwrap();
        }
        Guest { vm, vcpu, mem, io }
    }

    /// Loads `code` at [`CODE`] and puts the vCPU in 64-bit mode at its start.
    pub fn load(&mut self, code: &[u8]) {
        self.mem.write_slice(code, GuestAddress(CODE)).unwrap();
        let mut s = self.vcpu.state().unwrap();
        long_mode(&mut s);
        self.vcpu.set_state(&s).unwrap();
    }

    /// Runs until the guest writes to [`DONE_PORT`] (or another exit).
    pub fn run(&mut self) -> hv::Result<hv::VcpuExit> {
        self.vcpu.run(&*self.io)
    }

    /// Like [`Guest::load`], but the program runs at CPL 3 (user pages, IOPL 3 for port I/O).
    pub fn load_user(&mut self, code: &[u8]) {
        self.mem
            .write_obj(0x2000u64 | 7, GuestAddress(PML4))
            .unwrap();
        self.mem
            .write_obj(0x3000u64 | 7, GuestAddress(0x2000))
            .unwrap();
        for i in 0..512u64 {
            self.mem
                .write_obj((i << 21) | 0x87, GuestAddress(0x3000 + i * 8))
                .unwrap();
        }
        self.mem.write_slice(code, GuestAddress(CODE)).unwrap();
        let mut s = self.vcpu.state().unwrap();
        long_mode(&mut s);
        let sr = &mut s.sregs;
        sr.cs.selector = 0x2b;
        sr.cs.dpl = 3;
        for seg in [&mut sr.ds, &mut sr.es, &mut sr.fs, &mut sr.gs, &mut sr.ss] {
            seg.selector = 0x33;
            seg.dpl = 3;
        }
        s.regs.rflags = 0x3002;
        self.vcpu.set_state(&s).unwrap();
    }

    pub fn set_idt_gate(&self, vector: u64, handler: u64) {
        self.mem
            .write_slice(&idt_gate(handler), GuestAddress(IDT + vector * 16))
            .unwrap();
    }
}

pub fn long_mode(s: &mut CpuState) {
    let code = hv::Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x08,
        type_: 0xb,
        present: true,
        dpl: 0,
        db: false,
        s: true,
        l: true,
        g: true,
        avl: false,
        unusable: false,
    };
    let data = hv::Segment {
        selector: 0x10,
        type_: 0x3,
        db: true,
        l: false,
        ..code
    };
    let sr = &mut s.sregs;
    sr.cs = code;
    sr.ds = data;
    sr.es = data;
    sr.fs = data;
    sr.gs = data;
    sr.ss = data;
    sr.tr = hv::Segment {
        base: 0,
        limit: 0x67,
        selector: 0x18,
        type_: 0xb,
        present: true,
        s: false,
        g: false,
        db: false,
        l: false,
        ..code
    };
    sr.ldt = hv::Segment {
        selector: 0,
        type_: 0x2,
        present: false,
        unusable: true,
        s: false,
        l: false,
        g: false,
        limit: 0xffff,
        ..code
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
    sr.cr3 = PML4;
    sr.cr4 = 0x620; // OSXMMEXCPT, OSFXSR, PAE
    sr.efer = 0xd01; // NXE, LMA, LME, SCE
    s.regs = hv::Registers {
        rip: CODE,
        rsp: STACK_TOP,
        rflags: 2,
        ..Default::default()
    };
}
