//! Tiny test guests: short 64-bit programs assembled with iced-x86's `code_asm`, loaded into guest
//! memory with hand-built page tables, GDT, TSS and IDT, and run on any backend through the
//! neutral `hv` traits only. One kit for the emu and KVM backends' integration tests and for
//! `conformance` (which runs the same bodies on both); each of them keeps a thin adapter that
//! picks a [`Layout`], creates its hypervisor and offers the helpers its tests are written with.
//!
//! The kit depends on `hv` alone, so using it never makes one backend depend on the other.
//!
//! Written by hand rather than taken from a crate: the descriptor tables, page tables and the
//! exception stubs are a few dozen lines of architectural data; the crates that build them
//! (e.g. `x86_64`) target a running kernel, not a guest image written from the host.
//!
//! What a [`Guest`] holds, given a [`Layout`] (every address is guest-physical = linear):
//! * an identity map of the first GiB with 2 MiB pages, `PML4` at [`LongMode::pml4`], the PDPT
//!   and PD in the two pages after it ([`identity_map`]); optionally the 4th GiB (local APIC)
//!   uncached ([`map_4th_gib`]) and 2 MiB regions split into 4 KiB pages ([`map_4k`]);
//! * a GDT at [`GDT`] with the layout's descriptors, the TR pointing at the layout's TSS;
//! * an IDT at [`LongMode::idt`] whose first vectors go to stubs ([`Stubs`]) that record an
//!   [`Exception`] at [`Stubs::record`] and then halt or write to a stop port;
//! * a [`Recorder`] as the guest's `DeviceIo`: it logs port and MMIO accesses and kicks the
//!   vCPU when the guest writes to its stop port ([`Recorder::stopping_at`]).

// A test kit: an assembler that cannot assemble a test's program is a broken test (see [`asm`]).
#![allow(clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::Duration;

use hv::{
    CpuModel, CpuState, DescriptorTable, DeviceIo, GuestMemory, Hypervisor, Segment, Vcpu,
    VcpuExit, VcpuKicker, Vm, VmConfig,
};
use iced_x86::IcedError;
use iced_x86::code_asm::{CodeAssembler, al, qword_ptr, rax, rsp};
use vm_memory::{Bytes, GuestAddress};

/// The GDT of every layout.
pub const GDT: u64 = 0x500;
/// The PML4 of the standard layouts (PDPT at 0x2000, PD at 0x3000).
pub const PML4: u64 = 0x1000;
/// The IDT of the standard layouts.
pub const IDT: u64 = 0x6000;
/// Where programs are loaded and start.
pub const CODE: u64 = 0x10000;
/// Scratch data.
pub const DATA: u64 = 0x20000;
/// The initial stack pointer (the stack grows down from here).
pub const STACK: u64 = 0x80000;
/// The page directory [`map_4th_gib`] maps the 4th GiB with in the standard layouts.
pub const PD_4G: u64 = 0x5000;
/// Identity-mapped, not RAM: accesses there are MMIO and reach the [`Recorder`].
pub const MMIO: u64 = 0x1000_0000;
/// What the [`Recorder`] returns for port reads unless told otherwise.
pub const IN_VALUE: u8 = 0x5a;

/// Kernel 64-bit code, selector 0x08 in the standard GDTs.
pub const CODE64: u64 = gdt_entry(0, 0xfffff, 0x9b, 0xa);
/// Kernel data, selector 0x10.
pub const DATA32: u64 = gdt_entry(0, 0xfffff, 0x93, 0xc);
/// Kernel 32-bit code.
pub const CODE32: u64 = gdt_entry(0, 0xfffff, 0x9b, 0xc);
/// Kernel 16-bit code (4 GiB limit).
pub const CODE16: u64 = gdt_entry(0, 0xfffff, 0x9b, 0x8);
/// User (DPL 3) 64-bit code.
pub const USER_CODE64: u64 = gdt_entry(0, 0xfffff, 0xfb, 0xa);
/// User (DPL 3) 32-bit code.
pub const USER_CODE32: u64 = gdt_entry(0, 0xfffff, 0xfb, 0xc);
/// User (DPL 3) data.
pub const USER_DATA: u64 = gdt_entry(0, 0xfffff, 0xf3, 0xc);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("backend")]
    Hv(#[from] hv::Error),
    #[error("guest memory")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("guest memory")]
    Region(#[from] vm_memory::mmap::FromRangesError),
    #[error("assembling")]
    Asm(#[from] IcedError),
    #[error("the stub for vector {vector} is {len} bytes, more than its {stride}-byte slot")]
    StubTooLong { vector: u8, len: usize, stride: u64 },
    #[error("run interrupted by nobody")]
    Interrupted,
}

pub type Result<T> = std::result::Result<T, Error>;

/// What `code_asm` emitters return.
pub type AsmResult = std::result::Result<(), IcedError>;

/// Assembles `bitness`-bit code placed at `ip`.
pub fn try_asm(
    bitness: u32,
    ip: u64,
    f: impl FnOnce(&mut CodeAssembler) -> AsmResult,
) -> Result<Vec<u8>> {
    let mut a = CodeAssembler::new(bitness)?;
    f(&mut a)?;
    Ok(a.assemble(ip)?)
}

/// [`try_asm`] for a test's own program: one that does not assemble fails the test.
#[track_caller]
pub fn asm(bitness: u32, ip: u64, f: impl FnOnce(&mut CodeAssembler) -> AsmResult) -> Vec<u8> {
    try_asm(bitness, ip, f).expect("assembling")
}

/// `jmp $`.
pub fn spin(a: &mut CodeAssembler) -> AsmResult {
    let mut l = a.create_label();
    a.set_label(&mut l)?;
    a.jmp(l)
}

/// Guest RAM of `bytes` at address 0.
pub fn memory(bytes: usize) -> Result<Arc<GuestMemory>> {
    Ok(Arc::new(GuestMemory::from_ranges(&[(
        GuestAddress(0),
        bytes,
    )])?))
}

pub fn write_u64(mem: &GuestMemory, addr: u64, v: u64) -> Result<()> {
    Ok(mem.write_obj(v, GuestAddress(addr))?)
}

pub fn read_u64(mem: &GuestMemory, addr: u64) -> Result<u64> {
    Ok(mem.read_obj(GuestAddress(addr))?)
}

/// Writes `words` as consecutive little-endian u64s from `addr` (a descriptor table).
pub fn write_u64s(mem: &GuestMemory, addr: u64, words: &[u64]) -> Result<()> {
    for (k, w) in (0u64..).zip(words) {
        write_u64(mem, addr + k * 8, *w)?;
    }
    Ok(())
}

/// Present + writable, and U/S when `user`.
fn table_flags(user: bool) -> u64 {
    if user { 7 } else { 3 }
}

/// Identity-maps the first GiB with 2 MiB pages: PML4 at `pml4`, PDPT at `pml4 + 0x1000`, PD at
/// `pml4 + 0x2000`; every level user-accessible when `user`.
pub fn identity_map(mem: &GuestMemory, pml4: u64, user: bool) -> Result<()> {
    let f = table_flags(user);
    let (pdpt, pd) = (pml4 + 0x1000, pml4 + 0x2000);
    write_u64(mem, pml4, pdpt | f)?;
    write_u64(mem, pdpt, pd | f)?;
    for k in 0..512u64 {
        write_u64(mem, pd + k * 8, (k << 21) | 0x80 | f)?;
    }
    Ok(())
}

/// Maps the 4th GiB (where the local APIC page is) with uncached (PCD) 2 MiB supervisor pages
/// through the page directory at `pd`; the PDPT entry is user-accessible when `user`.
pub fn map_4th_gib(mem: &GuestMemory, pml4: u64, pd: u64, user: bool) -> Result<()> {
    write_u64(mem, pml4 + 0x1000 + 3 * 8, pd | table_flags(user))?;
    for k in 0..512u64 {
        write_u64(mem, pd + k * 8, (3 << 30) | (k << 21) | 0x93)?;
    }
    Ok(())
}

/// Splits the 2 MiB region at `region` (in the first GiB of [`identity_map`]) into 4 KiB
/// identity pages through the page table at `pt`; the pages at the addresses in `absent` are
/// left not present. No TLB is flushed.
pub fn map_4k(
    mem: &GuestMemory,
    pml4: u64,
    region: u64,
    pt: u64,
    user: bool,
    absent: &[u64],
) -> Result<()> {
    let f = table_flags(user);
    for k in 0..512u64 {
        let a = region + (k << 12);
        let pte = if absent.contains(&a) { 0 } else { a | f };
        write_u64(mem, pt + k * 8, pte)?;
    }
    write_u64(mem, pml4 + 0x2000 + (region >> 21) * 8, pt | f)
}

/// The address of the PTE mapping `addr` in a region mapped by [`map_4k`].
pub fn pte_of(pt: u64, region: u64, addr: u64) -> u64 {
    pt + ((addr - region) >> 12) * 8
}

/// A segment descriptor.
pub const fn gdt_entry(base: u32, limit: u32, access: u8, flags: u8) -> u64 {
    (limit & 0xffff) as u64
        | ((base & 0xff_ffff) as u64) << 16
        | (access as u64) << 40
        | (((limit >> 16) & 0xf) as u64) << 48
        | ((flags & 0xf) as u64) << 52
        | ((base >> 24) as u64) << 56
}

/// The low half of a busy 64-bit TSS descriptor at `base` (the high half is 0 below 4 GiB).
pub const fn tss_entry(base: u32) -> u64 {
    gdt_entry(base, 0x67, 0x8b, 0)
}

/// A 64-bit interrupt gate to `handler` through code selector 0x08, callable from `dpl`.
pub const fn idt_gate(handler: u64, dpl: u8) -> [u64; 2] {
    let access = 0x8e | ((dpl as u64 & 3) << 5);
    [
        (handler & 0xffff) | (0x08 << 16) | (access << 40) | (((handler >> 16) & 0xffff) << 48),
        handler >> 32,
    ]
}

/// Points vector `v` of the IDT at `idt` to `handler` (DPL 0).
pub fn set_gate(mem: &GuestMemory, idt: u64, v: u8, handler: u64) -> Result<()> {
    write_u64s(mem, idt + u64::from(v) * 16, &idt_gate(handler, 0))
}

/// A flat (base 0, 4 GiB) code or data segment.
pub fn flat(selector: u16, type_: u8, dpl: u8, l: bool, db: bool) -> Segment {
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

/// How [`LongMode::kernel`] and [`LongMode::user`] set up the vCPU: 64-bit mode with the
/// identity map, flat segments (0x08 code, 0x10 data), TR, GDTR and IDTR.
#[derive(Clone, Copy, Debug)]
pub struct LongMode {
    pub pml4: u64,
    pub gdt: DescriptorTable,
    pub idt: u64,
    /// The TR selector and the TSS base it points at.
    pub tr: (u16, u64),
    pub cr0: u64,
    pub rip: u64,
    pub rsp: u64,
}

impl LongMode {
    /// The usual entry: page tables at [`PML4`], a GDT of `gdt_entries` descriptors at [`GDT`],
    /// the IDT at [`IDT`], CR0 = PG|AM|WP|NE|ET|MP|PE, RIP at [`CODE`]; TR and the stack pointer as given.
    pub const fn new(gdt_entries: u16, tr: (u16, u64), stack: u64) -> LongMode {
        LongMode {
            pml4: PML4,
            gdt: DescriptorTable {
                base: GDT,
                limit: gdt_entries * 8 - 1,
            },
            idt: IDT,
            tr,
            cr0: 0x8005_0033,
            rip: CODE,
            rsp: stack,
        }
    }

    /// 64-bit mode, CPL 0, IF=0, at `rip` with the stack at `rsp`, every GPR zero, no pending
    /// event.
    pub fn kernel(&self, st: &mut CpuState) {
        st.regs = hv::Registers {
            rip: self.rip,
            rsp: self.rsp,
            rflags: 2,
            ..Default::default()
        };
        let data = flat(0x10, 3, 0, false, true);
        let sr = &mut st.sregs;
        sr.cs = flat(0x08, 0xb, 0, true, false);
        sr.ds = data;
        sr.es = data;
        sr.ss = data;
        sr.fs = data;
        sr.gs = data;
        sr.tr = Segment {
            base: self.tr.1,
            limit: 0x67,
            s: false,
            g: false,
            ..flat(self.tr.0, 0xb, 0, false, false)
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
        sr.gdt = self.gdt;
        sr.idt = DescriptorTable {
            base: self.idt,
            limit: 256 * 16 - 1,
        };
        sr.cr0 = self.cr0;
        sr.cr2 = 0;
        sr.cr3 = self.pml4;
        sr.cr4 = 0x620; // OSXMMEXCPT, OSFXSR, PAE
        sr.efer = 0xd01; // NXE, LMA, LME, SCE
        st.events = hv::PendingEvents::default();
        st.mp_state = hv::MpState::Runnable;
    }

    /// [`LongMode::kernel`], then CPL 3 with the code and data selectors given (RPL 3) and
    /// IOPL 3 (so `in`/`out` work).
    pub fn user(&self, st: &mut CpuState, code: u16, data: u16) {
        self.kernel(st);
        let sr = &mut st.sregs;
        sr.cs = flat(code, 0xb, 3, true, false);
        let d = flat(data, 3, 3, false, true);
        sr.ds = d;
        sr.es = d;
        sr.ss = d;
        sr.fs = d;
        sr.gs = d;
        st.regs.rflags = 0x3002;
    }
}

/// What an exception stub does after recording.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StubEnd {
    /// Restores RAX, then `cli; hlt`: the run ends as [`VcpuExit::Halted`] with the registers
    /// as the exception left them. Such a stub needs a 256-byte slot.
    Halt,
    /// `mov al, value; out port, al; jmp $` (for a [`Recorder::stopping_at`] `port`).
    Port { port: u16, value: u8 },
}

/// The IDT stubs: vector `v` < `vectors` runs the stub at `at + v * stride`, which writes an
/// [`Exception`] record at `record` (80 bytes) and then ends as `end` says. It pops the error
/// code, so RSP points at the interrupt frame. A [`StubEnd::Port`] stub fits in 128 bytes and
/// leaves RAX changed (its value at entry is in the record).
#[derive(Clone, Copy, Debug)]
pub struct Stubs {
    pub at: u64,
    pub stride: u64,
    pub vectors: u16,
    pub record: u64,
    pub end: StubEnd,
}

/// The vectors that push an error code.
pub fn has_error_code(v: u8) -> bool {
    matches!(v, 8 | 10..=14 | 17 | 21)
}

impl Stubs {
    /// The stub for vector `v`: RAX to `record + 72`, the error code (or 0) to `+ 8`, the
    /// interrupt frame (RIP, CS, RFLAGS, RSP, SS) to `+ 24`, CR2 to `+ 16`, and `0x100 | v` to
    /// `+ 0` last.
    pub fn code(&self, v: u8) -> Result<Vec<u8>> {
        let at = self.at + u64::from(v) * self.stride;
        let rec = self.record;
        try_asm(64, at, |a| {
            a.mov(qword_ptr(rec + 72), rax)?;
            if has_error_code(v) {
                a.pop(rax)?;
            } else {
                a.xor(rax, rax)?;
            }
            a.mov(qword_ptr(rec + 8), rax)?;
            for k in 0..5i32 {
                a.mov(rax, qword_ptr(rsp + 8 * k))?;
                a.mov(qword_ptr(rec + 24 + 8 * k as u64), rax)?;
            }
            a.mov(rax, iced_x86::code_asm::cr2)?;
            a.mov(qword_ptr(rec + 16), rax)?;
            a.mov(qword_ptr(rec), 0x100 + i32::from(v))?;
            match self.end {
                StubEnd::Halt => {
                    a.mov(rax, qword_ptr(rec + 72))?;
                    a.cli()?;
                    a.hlt()
                }
                StubEnd::Port { port, value } => {
                    a.mov(al, u32::from(value))?;
                    a.out(u32::from(port), al)?;
                    spin(a)
                }
            }
        })
    }

    /// Writes every stub and points the IDT at `idt` to them.
    pub fn install(&self, mem: &GuestMemory, idt: u64) -> Result<()> {
        for v in 0..self.vectors {
            let v = u8::try_from(v).unwrap_or(u8::MAX);
            let at = self.at + u64::from(v) * self.stride;
            let code = self.code(v)?;
            if code.len() as u64 > self.stride {
                return Err(Error::StubTooLong {
                    vector: v,
                    len: code.len(),
                    stride: self.stride,
                });
            }
            mem.write_slice(&code, GuestAddress(at))?;
            set_gate(mem, idt, v, at)?;
        }
        Ok(())
    }

    /// Clears the record (before a run).
    pub fn clear(&self, mem: &GuestMemory) -> Result<()> {
        Ok(mem.write_slice(&[0u8; 80], GuestAddress(self.record))?)
    }

    /// The record the stubs wrote, if any.
    pub fn exception(&self, mem: &GuestMemory) -> Result<Option<Exception>> {
        let r = |k: u64| read_u64(mem, self.record + 8 * k);
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

/// A guest memory image and how to enter it: what [`Guest::create`] builds.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub mem_bytes: usize,
    /// Page tables, GDT, IDT and the initial vCPU state.
    pub mode: LongMode,
    /// U/S set on the identity map.
    pub user_pages: bool,
    /// Map the 4th GiB (local APIC) through this page directory.
    pub pd_4g: Option<u64>,
    /// The GDT's descriptors (at [`GDT`]).
    pub gdt: &'static [u64],
    /// RSP0 written into the TSS at `mode.tr.1` (`None`: the TSS is left as it is).
    pub rsp0: Option<u64>,
    pub stubs: Option<Stubs>,
}

impl Layout {
    /// Writes the page tables, descriptor tables and stubs into `mem`.
    pub fn write(&self, mem: &GuestMemory) -> Result<()> {
        identity_map(mem, self.mode.pml4, self.user_pages)?;
        if let Some(pd) = self.pd_4g {
            map_4th_gib(mem, self.mode.pml4, pd, self.user_pages)?;
        }
        write_u64s(mem, GDT, self.gdt)?;
        if let Some(rsp0) = self.rsp0 {
            let tss = self.mode.tr.1;
            write_u64(mem, tss + 4, rsp0)?;
            // The I/O map base beyond the limit: no permission bitmap.
            mem.write_obj(0x68u16, GuestAddress(tss + 0x66))?;
        }
        if let Some(s) = &self.stubs {
            s.install(mem, self.mode.idt)?;
        }
        Ok(())
    }
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

/// A [`DeviceIo`] that records every access. Port reads return [`IN_VALUE`] and MMIO reads
/// `0x10 + i` for byte `i` (or all-ones, [`Recorder::reading_ones`]). A write to the stop port
/// ([`Recorder::stopping_at`]) is not logged: it keeps its first byte for
/// [`Recorder::take_stop`] and kicks the vCPU. A write to a port with a hook
/// ([`Recorder::on_out`]) runs the hook (e.g. to send an MSI at a precise point).
#[derive(Default)]
pub struct Recorder {
    log: Mutex<Vec<Access>>,
    stop_port: Option<u16>,
    stop: Mutex<Option<u8>>,
    ones: bool,
    kicker: OnceLock<Arc<dyn VcpuKicker>>,
    hooks: Mutex<Vec<(u16, Hook)>>,
}

impl Recorder {
    /// A recorder whose `port` stops the run.
    pub fn stopping_at(port: u16) -> Recorder {
        Recorder {
            stop_port: Some(port),
            ..Recorder::default()
        }
    }

    /// Reads return all-ones, like an unclaimed port or address on the platform.
    pub fn reading_ones(self) -> Recorder {
        Recorder { ones: true, ..self }
    }

    /// The vCPU a stop-port write kicks (set once).
    pub fn set_kicker(&self, k: Arc<dyn VcpuKicker>) {
        let _ = self.kicker.set(k);
    }

    pub fn accesses(&self) -> Vec<Access> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The accesses so far, leaving the log empty.
    pub fn take(&self) -> Vec<Access> {
        self.log
            .lock()
            .map(|mut l| std::mem::take(&mut *l))
            .unwrap_or_default()
    }

    /// Port writes as (port, bytes).
    pub fn pio_writes(&self) -> Vec<(u16, Vec<u8>)> {
        self.accesses()
            .into_iter()
            .filter_map(|a| match a {
                Access::PioOut(p, d) => Some((p, d)),
                _ => None,
            })
            .collect()
    }

    /// Bytes written to `port`, concatenated.
    pub fn port_bytes(&self, port: u16) -> Vec<u8> {
        self.pio_writes()
            .into_iter()
            .filter(|(p, _)| *p == port)
            .flat_map(|(_, d)| d)
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

    /// The byte written to the stop port since the last call.
    pub fn take_stop(&self) -> Option<u8> {
        self.stop.lock().ok().and_then(|mut s| s.take())
    }

    fn push(&self, a: Access) {
        if let Ok(mut l) = self.log.lock() {
            l.push(a);
        }
    }
}

impl DeviceIo for Recorder {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        self.push(Access::PioIn(port, data.len()));
        data.fill(if self.ones { 0xff } else { IN_VALUE });
    }

    fn pio_write(&self, port: u16, data: &[u8]) {
        if Some(port) == self.stop_port {
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
            *b = if self.ones { 0xff } else { 0x10 + i as u8 };
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.push(Access::MmioWrite(addr, data.to_vec()));
    }
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The guest wrote this byte to the stop port.
    Port(u8),
    Halted,
    Shutdown,
    /// The watchdog kicked the vCPU.
    Timeout,
}

/// What the VM is created with besides its memory.
#[derive(Clone, Debug)]
pub struct VmSpec {
    pub cpu_model: CpuModel,
    pub vcpus: u32,
    pub tsc_khz: Option<u32>,
}

impl Default for VmSpec {
    /// The portable model, one vCPU, the backend's TSC frequency.
    fn default() -> VmSpec {
        VmSpec {
            cpu_model: CpuModel::portable(),
            vcpus: 1,
            tsc_khz: None,
        }
    }
}

/// A VM on some backend, its memory, vCPU 0 and its [`Recorder`].
pub struct Guest {
    pub mem: Arc<GuestMemory>,
    pub vm: Arc<dyn Vm>,
    pub vcpu: Box<dyn Vcpu>,
    pub io: Arc<Recorder>,
    pub layout: Layout,
    /// How long [`Guest::run_until_stop`] lets a run go before kicking it.
    pub timeout: Duration,
}

/// A run that has not stopped after this long is kicked and reported as [`Stop::Timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Declares an adapter's guest type, `pub struct $name(pub testkit::Guest)`, that derefs to the
/// kit's [`Guest`] (its fields and methods) so the adapter can add helpers in its tests' style.
#[macro_export]
macro_rules! guest_type {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        pub struct $name(pub $crate::Guest);

        impl ::std::ops::Deref for $name {
            type Target = $crate::Guest;
            fn deref(&self) -> &$crate::Guest {
                &self.0
            }
        }

        impl ::std::ops::DerefMut for $name {
            fn deref_mut(&mut self) -> &mut $crate::Guest {
                &mut self.0
            }
        }
    };
}

impl Guest {
    /// Writes `layout` into new memory, creates the VM and vCPU 0 on `hv` and puts the vCPU in
    /// 64-bit mode, CPL 0, at `layout.mode.rip`. `io` is the guest's `DeviceIo`; its stop port
    /// kicks vCPU 0.
    pub fn create(
        hv: &dyn Hypervisor,
        layout: Layout,
        spec: VmSpec,
        io: Recorder,
    ) -> Result<Guest> {
        let mem = memory(layout.mem_bytes)?;
        layout.write(&mem)?;
        let vm = hv.create_vm(VmConfig {
            memory: mem.clone(),
            cpu_model: spec.cpu_model,
            vcpus: spec.vcpus,
            tsc_khz: spec.tsc_khz,
        })?;
        let vcpu = vm.create_vcpu(0)?;
        io.set_kicker(vcpu.kicker());
        let mut g = Guest {
            mem,
            vm,
            vcpu,
            io: Arc::new(io),
            layout,
            timeout: DEFAULT_TIMEOUT,
        };
        g.update_state(|m, st| m.kernel(st))?;
        Ok(g)
    }

    /// Changes the vCPU state with `f` (given the layout's [`LongMode`]).
    pub fn update_state(&mut self, f: impl FnOnce(&LongMode, &mut CpuState)) -> Result<()> {
        let mut st = self.vcpu.state()?;
        f(&self.layout.mode, &mut st);
        self.vcpu.set_state(&st)?;
        Ok(())
    }

    /// Writes `code` at the layout's start address and resets the vCPU to 64-bit CPL 0 there.
    pub fn load(&mut self, code: &[u8]) -> Result<()> {
        self.write(self.layout.mode.rip, code)?;
        self.update_state(|m, st| m.kernel(st))
    }

    /// Like [`Guest::load`], but the program runs at CPL 3 (see [`LongMode::user`]).
    pub fn load_user(&mut self, code: &[u8], code_sel: u16, data_sel: u16) -> Result<()> {
        self.write(self.layout.mode.rip, code)?;
        self.update_state(|m, st| m.user(st, code_sel, data_sel))
    }

    /// One `Vcpu::run` with the recorder: until the guest halts, shuts down or is kicked.
    pub fn run_once(&mut self) -> hv::Result<VcpuExit> {
        self.vcpu.run(&*self.io)
    }

    /// Runs until the program stops (see [`Stop`]), kicking the vCPU after [`Guest::timeout`].
    /// The exception record and the stop byte are cleared first.
    pub fn run_until_stop(&mut self) -> Result<Stop> {
        let timeout = self.timeout;
        if let Some(s) = &self.layout.stubs {
            s.clear(&self.mem)?;
        }
        let _ = self.io.take_stop();
        let kicker = self.vcpu.kicker();
        let fired = Arc::new(AtomicBool::new(false));
        let (done, wait) = mpsc::channel::<()>();
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
        Ok(match (exit, self.io.take_stop()) {
            (_, Some(v)) => Stop::Port(v),
            (VcpuExit::Halted, None) => Stop::Halted,
            (VcpuExit::Shutdown, None) => Stop::Shutdown,
            (VcpuExit::Interrupted, None) if fired.load(Ordering::SeqCst) => Stop::Timeout,
            (VcpuExit::Interrupted, None) => return Err(Error::Interrupted),
        })
    }

    /// The exception the stubs recorded in the last run, if any.
    pub fn exception(&self) -> Result<Option<Exception>> {
        match &self.layout.stubs {
            Some(s) => s.exception(&self.mem),
            None => Ok(None),
        }
    }

    pub fn write(&self, addr: u64, bytes: &[u8]) -> Result<()> {
        Ok(self.mem.write_slice(bytes, GuestAddress(addr))?)
    }

    pub fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>> {
        let mut b = vec![0u8; len];
        self.mem.read_slice(&mut b, GuestAddress(addr))?;
        Ok(b)
    }

    pub fn read_u64(&self, addr: u64) -> Result<u64> {
        read_u64(&self.mem, addr)
    }

    pub fn write_u64(&self, addr: u64, v: u64) -> Result<()> {
        write_u64(&self.mem, addr, v)
    }

    /// Points IDT vector `v` at `handler` (64-bit interrupt gate, DPL 0).
    pub fn set_gate(&self, v: u8, handler: u64) -> Result<()> {
        set_gate(&self.mem, self.layout.mode.idt, v, handler)
    }

    /// [`map_4k`] in this guest's page tables (supervisor pages unless the layout's are user).
    pub fn map_4k(&self, region: u64, pt: u64, absent: &[u64]) -> Result<()> {
        let l = &self.layout;
        map_4k(&self.mem, l.mode.pml4, region, pt, l.user_pages, absent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_hand_encoded_ones() {
        assert_eq!(CODE64, 0x00af_9b00_0000_ffff);
        assert_eq!(DATA32, 0x00cf_9300_0000_ffff);
        assert_eq!(CODE32, 0x00cf_9b00_0000_ffff);
        assert_eq!(CODE16, 0x008f_9b00_0000_ffff);
        assert_eq!(USER_CODE64, 0x00af_fb00_0000_ffff);
        assert_eq!(USER_DATA, 0x00cf_f300_0000_ffff);
        assert_eq!(tss_entry(0x7000), 0x0000_8b00_7000_0067);
        let [lo, hi] = idt_gate(0x1234_5678_9abc, 3);
        assert_eq!(lo, 0x5678_ee00_0008_9abc);
        assert_eq!(hi, 0x1234);
    }

    #[test]
    fn stubs_fit_their_slots_and_the_record_reads_back() {
        let mem = memory(1 << 20).expect("memory");
        for (end, stride) in [
            (StubEnd::Halt, 256),
            (
                StubEnd::Port {
                    port: 0xe9,
                    value: 0xee,
                },
                128,
            ),
        ] {
            let s = Stubs {
                at: 0x8000,
                stride,
                vectors: 32,
                record: 0xa000,
                end,
            };
            s.install(&mem, IDT).expect("install");
            let short = Stubs { stride: 16, ..s };
            assert!(matches!(
                short.install(&mem, IDT),
                Err(Error::StubTooLong { vector: 0, .. })
            ));
            assert_eq!(s.exception(&mem).expect("read"), None);
            write_u64s(
                &mem,
                0xa000,
                &[0x10e, 2, 0xdead, 0x10001, 8, 0x202, 0x7ff8, 0x10],
            )
            .expect("write");
            write_u64(&mem, 0xa000 + 72, 77).expect("write");
            let e = s.exception(&mem).expect("read").expect("a record");
            assert_eq!(
                (e.vector, e.error_code, e.cr2, e.rip, e.rax),
                (14, 2, 0xdead, 0x10001, 77)
            );
            s.clear(&mem).expect("clear");
            assert_eq!(s.exception(&mem).expect("read"), None);
        }
    }

    #[test]
    fn map_4k_leaves_absent_pages_out() {
        let mem = memory(1 << 20).expect("memory");
        identity_map(&mem, PML4, false).expect("map");
        assert_eq!(read_u64(&mem, 0x3000 + 8).expect("pde"), (1 << 21) | 0x83);
        map_4k(&mem, PML4, 0, 0x8000, true, &[0x3000]).expect("4k");
        assert_eq!(read_u64(&mem, 0x3000).expect("pde"), 0x8007);
        assert_eq!(
            read_u64(&mem, pte_of(0x8000, 0, 0x2000)).expect("pte"),
            0x2007
        );
        assert_eq!(read_u64(&mem, pte_of(0x8000, 0, 0x3000)).expect("pte"), 0);
    }

    #[test]
    fn recorder_logs_and_stops() {
        let r = Recorder::stopping_at(0xe9);
        r.pio_write(0x80, &[1, 2]);
        r.pio_write(0xe9, &[7]);
        r.mmio_write(0x1000, &[3]);
        let mut b = [0u8; 2];
        r.mmio_read(0x2000, &mut b);
        assert_eq!(b, [0x10, 0x11]);
        r.pio_read(0x60, &mut b[..1]);
        assert_eq!(b[0], IN_VALUE);
        assert_eq!(r.port_bytes(0x80), vec![1, 2]);
        assert_eq!(r.mmio_writes(), vec![(0x1000, vec![3])]);
        assert_eq!(r.take_stop(), Some(7));
        assert_eq!(r.take_stop(), None);
        assert_eq!(r.take().len(), 4);
        assert!(r.accesses().is_empty());
        let ones = Recorder::default().reading_ones();
        ones.mmio_read(0, &mut b);
        assert_eq!(b, [0xff, 0xff]);
    }
}
