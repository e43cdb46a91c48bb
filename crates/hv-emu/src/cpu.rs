//! Architectural state of one software vCPU and its conversion to and from [`hv::CpuState`].

use hv::{CpuState, DescriptorTable, MpState, Segment, msr};

use crate::lapic::Lapic;
use crate::mmu::Tlb;

pub const CF: u64 = 1 << 0;
pub const PF: u64 = 1 << 2;
pub const AF: u64 = 1 << 4;
pub const ZF: u64 = 1 << 6;
pub const SF: u64 = 1 << 7;
pub const TF: u64 = 1 << 8;
pub const IF: u64 = 1 << 9;
pub const DF: u64 = 1 << 10;
pub const OF: u64 = 1 << 11;
pub const IOPL: u64 = 3 << 12;
pub const NT: u64 = 1 << 14;
pub const RF: u64 = 1 << 16;
pub const VM: u64 = 1 << 17;
pub const AC: u64 = 1 << 18;
pub const ID: u64 = 1 << 21;
/// Flags software can change with POPF at CPL 0 (VM/VIF/VIP excluded).
pub const FLAGS_WRITABLE: u64 = CF | PF | AF | ZF | SF | TF | IF | DF | OF | IOPL | NT | AC | ID;
pub const ARITH_FLAGS: u64 = CF | PF | AF | ZF | SF | OF;

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_TS: u64 = 1 << 3;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_WP: u64 = 1 << 16;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PSE: u64 = 1 << 4;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_PGE: u64 = 1 << 7;
pub const EFER_SCE: u64 = 1 << 0;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const EFER_NXE: u64 = 1 << 11;

/// Segment register indices (the order of iced-x86's ES..GS registers).
pub const ES: usize = 0;
pub const CS: usize = 1;
pub const SS: usize = 2;
pub const DS: usize = 3;
pub const FS: usize = 4;
pub const GS: usize = 5;

/// MSRs that are plain storage for the emulator.
#[derive(Clone, Debug, Default)]
pub struct Msrs {
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub fmask: u64,
    pub kernel_gs_base: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub pat: u64,
    pub misc_enable: u64,
    pub tsc_aux: u64,
    pub tsc_adjust: u64,
    pub wall_clock: u64,
    pub system_time: u64,
    /// Guest TSC = scaled host clock + this offset (wrapping).
    pub tsc_offset: u64,
    /// The guest TSC reads at least this (set when the offset moves backwards to follow a
    /// user-mode runner's TSC, so the TSC the kernel sees never goes back).
    pub tsc_floor: u64,
}

pub struct Cpu {
    pub id: u32,
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    pub seg: [Segment; 6],
    pub tr: Segment,
    pub ldtr: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub apic_base: u64,
    pub dr: [u64; 4],
    pub dr6: u64,
    pub dr7: u64,
    pub fcw: u16,
    pub fsw: u16,
    pub ftw: u8,
    pub fop: u16,
    pub fip: u64,
    pub fdp: u64,
    pub mxcsr: u32,
    pub st: [[u8; 16]; 8],
    pub xmm: [u128; 16],
    /// Bits 255:128 of YMM0-15 (`xmm` holds bits 127:0). Legacy SSE leaves them alone, VEX.128
    /// writes zero them.
    pub ymm_hi: [u128; 16],
    pub xcr0: u64,
    pub msr: Msrs,
    pub cpl: u8,
    /// Interrupt shadow: bit 0 after STI, bit 1 after MOV SS / POP SS.
    pub shadow: u8,
    pub nmi_masked: bool,
    pub nmi_pending: bool,
    pub mp_state: MpState,
    pub lapic: Lapic,
    pub tlb: Tlb,
    /// A write hit a page holding cached code: the block being executed may be stale.
    pub code_written: bool,
    /// Something happened that may make an interrupt deliverable; re-check before the next
    /// instruction.
    pub irq_check: bool,
    /// An exception that `emulate_one` reports instead of delivering.
    pub reported: Option<(u8, Option<u32>)>,
    /// Deliver exceptions through the IDT (true for the emu backend) or only report them.
    pub deliver_exceptions: bool,
}

impl Cpu {
    pub fn new(id: u32) -> Cpu {
        let mut c = Cpu {
            id,
            gpr: [0; 16],
            rip: 0,
            rflags: 2,
            seg: [Segment::default(); 6],
            tr: Segment::default(),
            ldtr: Segment::default(),
            gdt: DescriptorTable::default(),
            idt: DescriptorTable::default(),
            cr0: 0,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            efer: 0,
            apic_base: 0,
            dr: [0; 4],
            dr6: 0xffff_0ff0,
            dr7: 0x400,
            fcw: 0x37f,
            fsw: 0,
            ftw: 0,
            fop: 0,
            fip: 0,
            fdp: 0,
            mxcsr: 0x1f80,
            st: [[0; 16]; 8],
            xmm: [0; 16],
            ymm_hi: [0; 16],
            xcr0: 1,
            msr: Msrs::default(),
            cpl: 0,
            shadow: 0,
            nmi_masked: false,
            nmi_pending: false,
            mp_state: MpState::Runnable,
            lapic: Lapic::new(id),
            tlb: Tlb::new(),
            code_written: false,
            irq_check: true,
            reported: None,
            deliver_exceptions: true,
        };
        c.reset();
        c
    }

    /// Power-on / INIT state (the local APIC is reset separately).
    pub fn reset(&mut self) {
        self.gpr = [0; 16];
        self.gpr[2] = 0x0006_0fb1; // EDX = family/model/stepping
        self.rip = 0xfff0;
        self.rflags = 2;
        for s in self.seg.iter_mut() {
            *s = real_segment(0);
        }
        self.seg[CS] = Segment {
            base: 0xffff_0000,
            selector: 0xf000,
            ..real_segment(0)
        };
        self.seg[CS].type_ = 0xb;
        self.tr = Segment {
            type_: 0xb,
            present: true,
            limit: 0xffff,
            ..Segment::default()
        };
        self.ldtr = Segment {
            type_: 0x2,
            present: true,
            limit: 0xffff,
            ..Segment::default()
        };
        self.gdt = DescriptorTable {
            base: 0,
            limit: 0xffff,
        };
        self.idt = self.gdt;
        self.cr0 = CR0_ET | (1 << 30) | (1 << 29);
        self.cr2 = 0;
        self.cr3 = 0;
        self.cr4 = 0;
        self.efer = 0;
        self.dr = [0; 4];
        self.dr6 = 0xffff_0ff0;
        self.dr7 = 0x400;
        self.fcw = 0x37f;
        self.fsw = 0;
        self.ftw = 0;
        self.mxcsr = 0x1f80;
        self.xmm = [0; 16];
        self.ymm_hi = [0; 16];
        self.st = [[0; 16]; 8];
        self.cpl = 0;
        self.shadow = 0;
        self.nmi_masked = false;
        self.tlb.flush_all();
        self.irq_check = true;
    }

    #[inline]
    pub fn long_mode(&self) -> bool {
        self.efer & EFER_LMA != 0
    }

    /// 64-bit mode (long mode with CS.L).
    #[inline]
    pub fn mode64(&self) -> bool {
        self.efer & EFER_LMA != 0 && self.seg[CS].l
    }

    #[inline]
    pub fn protected(&self) -> bool {
        self.cr0 & CR0_PE != 0
    }

    /// Code bitness: 16, 32 or 64.
    #[inline]
    pub fn bitness(&self) -> u32 {
        if self.mode64() {
            64
        } else if self.seg[CS].db {
            32
        } else {
            16
        }
    }

    /// The guest TSC at VM-clock time `ns`.
    #[inline]
    pub fn tsc_at(&self, clock: &crate::clock::Clock, ns: u64) -> u64 {
        clock
            .raw_tsc(ns)
            .wrapping_add(self.msr.tsc_offset)
            .max(self.msr.tsc_floor)
    }

    pub fn to_state(&self, msrs_in_model: &[u32], tsc: u64, now_ns: u64) -> CpuState {
        let mut s = CpuState::default();
        let g = &self.gpr;
        s.regs = hv::Registers {
            rax: g[0],
            rcx: g[1],
            rdx: g[2],
            rbx: g[3],
            rsp: g[4],
            rbp: g[5],
            rsi: g[6],
            rdi: g[7],
            r8: g[8],
            r9: g[9],
            r10: g[10],
            r11: g[11],
            r12: g[12],
            r13: g[13],
            r14: g[14],
            r15: g[15],
            rip: self.rip,
            rflags: self.rflags,
        };
        s.sregs = hv::SpecialRegisters {
            es: self.seg[ES],
            cs: self.seg[CS],
            ss: self.seg[SS],
            ds: self.seg[DS],
            fs: self.seg[FS],
            gs: self.seg[GS],
            tr: self.tr,
            ldt: self.ldtr,
            gdt: self.gdt,
            idt: self.idt,
            cr0: self.cr0,
            cr2: self.cr2,
            cr3: self.cr3,
            cr4: self.cr4,
            cr8: u64::from(self.lapic.tpr() >> 4),
            efer: self.efer,
            apic_base: self.apic_base,
        };
        s.debug = hv::DebugRegisters {
            dr0: self.dr[0],
            dr1: self.dr[1],
            dr2: self.dr[2],
            dr3: self.dr[3],
            dr6: self.dr6,
            dr7: self.dr7,
        };
        let mut xmm = [[0u8; 16]; 16];
        for (d, x) in xmm.iter_mut().zip(self.xmm.iter()) {
            *d = x.to_le_bytes();
        }
        s.fpu = hv::FpuState {
            fcw: self.fcw,
            fsw: self.fsw,
            ftw: self.ftw,
            fop: self.fop,
            fip: self.fip,
            fdp: self.fdp,
            mxcsr: self.mxcsr,
            st: self.st,
            xmm,
        };
        s.xcr0 = self.xcr0;
        s.xsave_ext = self.xsave_ext();
        for &index in msrs_in_model {
            let value = match index {
                msr::IA32_TSC => tsc,
                msr::IA32_TSC_DEADLINE => self.lapic.tsc_deadline,
                _ => self.msr_value(index).unwrap_or(0),
            };
            s.msrs.push(hv::Msr { index, value });
        }
        s.lapic = self.lapic.to_state(now_ns);
        s.events = hv::PendingEvents {
            exception: None,
            interrupt: None,
            nmi_pending: self.nmi_pending,
            nmi_injected: false,
            nmi_masked: self.nmi_masked,
            interrupt_shadow: self.shadow & 3,
        };
        s.mp_state = self.mp_state;
        s
    }

    /// Plain-storage MSRs (no side effects).
    pub fn msr_value(&self, index: u32) -> Option<u64> {
        Some(match index {
            msr::IA32_APIC_BASE => self.apic_base,
            msr::IA32_TSC_ADJUST => self.msr.tsc_adjust,
            msr::IA32_SYSENTER_CS => self.msr.sysenter_cs,
            msr::IA32_SYSENTER_ESP => self.msr.sysenter_esp,
            msr::IA32_SYSENTER_EIP => self.msr.sysenter_eip,
            msr::IA32_MISC_ENABLE => self.msr.misc_enable,
            msr::IA32_PAT => self.msr.pat,
            msr::IA32_EFER => self.efer,
            msr::IA32_STAR => self.msr.star,
            msr::IA32_LSTAR => self.msr.lstar,
            msr::IA32_CSTAR => self.msr.cstar,
            msr::IA32_FMASK => self.msr.fmask,
            msr::IA32_FS_BASE => self.seg[FS].base,
            msr::IA32_GS_BASE => self.seg[GS].base,
            msr::IA32_KERNEL_GS_BASE => self.msr.kernel_gs_base,
            msr::IA32_TSC_AUX => self.msr.tsc_aux,
            msr::KVM_WALL_CLOCK_NEW => self.msr.wall_clock,
            msr::KVM_SYSTEM_TIME_NEW => self.msr.system_time,
            _ => return None,
        })
    }

    pub fn load_state(&mut self, s: &CpuState) {
        let r = &s.regs;
        self.gpr = [
            r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ];
        self.rip = r.rip;
        self.rflags = (r.rflags & (FLAGS_WRITABLE | RF | VM)) | 2;
        let sr = &s.sregs;
        self.seg = [sr.es, sr.cs, sr.ss, sr.ds, sr.fs, sr.gs];
        self.tr = sr.tr;
        self.ldtr = sr.ldt;
        self.gdt = sr.gdt;
        self.idt = sr.idt;
        self.cr0 = sr.cr0;
        self.cr2 = sr.cr2;
        self.cr3 = sr.cr3;
        self.cr4 = sr.cr4;
        self.efer = sr.efer;
        self.apic_base = sr.apic_base;
        self.dr = [s.debug.dr0, s.debug.dr1, s.debug.dr2, s.debug.dr3];
        self.dr6 = s.debug.dr6;
        self.dr7 = s.debug.dr7;
        let f = &s.fpu;
        self.fcw = f.fcw;
        self.fsw = f.fsw;
        self.ftw = f.ftw;
        self.fop = f.fop;
        self.fip = f.fip;
        self.fdp = f.fdp;
        self.mxcsr = f.mxcsr;
        self.st = f.st;
        for (d, x) in self.xmm.iter_mut().zip(f.xmm.iter()) {
            *d = u128::from_le_bytes(*x);
        }
        self.xcr0 = s.xcr0;
        self.load_xsave_ext(&s.xsave_ext);
        self.cpl = if self.protected() {
            if self.rflags & VM != 0 {
                3
            } else {
                self.seg[SS].dpl & 3
            }
        } else {
            0
        };
        if self.mode64() || self.protected() {
            self.cpl = self.seg[CS].dpl & 3;
        }
        for m in &s.msrs {
            // EFER, APIC base and the FS/GS bases are authoritative in `sregs`.
            if !matches!(
                m.index,
                msr::IA32_EFER | msr::IA32_APIC_BASE | msr::IA32_FS_BASE | msr::IA32_GS_BASE
            ) {
                self.set_plain_msr(m.index, m.value);
            }
        }
        self.shadow = s.events.interrupt_shadow & 3;
        self.nmi_masked = s.events.nmi_masked;
        self.nmi_pending = s.events.nmi_pending || s.events.nmi_injected;
        self.mp_state = s.mp_state;
        self.tlb.flush_all();
        self.irq_check = true;
    }

    /// Takes back what a user-mode runner can change: general registers, RIP, RFLAGS,
    /// segments (FS/GS bases), x87/SSE state and CR2 (set for #PF).
    pub fn apply_user_state(&mut self, s: &CpuState) {
        let r = &s.regs;
        self.gpr = [
            r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ];
        self.rip = r.rip;
        self.rflags = (r.rflags & (FLAGS_WRITABLE | RF)) | 2;
        let sr = &s.sregs;
        self.seg = [sr.es, sr.cs, sr.ss, sr.ds, sr.fs, sr.gs];
        self.cpl = self.seg[CS].dpl & 3;
        self.cr2 = sr.cr2;
        let f = &s.fpu;
        self.fcw = f.fcw;
        self.fsw = f.fsw;
        self.ftw = f.ftw;
        self.fop = f.fop;
        self.fip = f.fip;
        self.fdp = f.fdp;
        self.mxcsr = f.mxcsr;
        self.st = f.st;
        for (d, x) in self.xmm.iter_mut().zip(f.xmm.iter()) {
            *d = u128::from_le_bytes(*x);
        }
        self.load_xsave_ext(&s.xsave_ext);
    }

    /// `CpuState::xsave_ext` for the components beyond x87/SSE that XCR0 enables, laid out as
    /// hv-kvm lays it out: bytes 512.. of a standard-format XSAVE image (the 64-byte header with
    /// XSTATE_BV, XCOMP_BV = 0, then YMM_Hi128 at image offset 576). XSTATE_BV's x87/SSE bits are
    /// left clear (that state is in `fpu`); the AVX bit is set when an upper half is non-zero.
    pub fn xsave_ext(&self) -> Vec<u8> {
        if self.xcr0 & crate::avx::XCR0_AVX == 0 {
            return Vec::new();
        }
        let mut ext = vec![0u8; crate::avx::YMM_OFFSET + 256 - 512];
        let base = crate::avx::YMM_OFFSET - 512;
        for (k, v) in self.ymm_hi.iter().enumerate() {
            if let Some(d) = ext.get_mut(base + k * 16..base + k * 16 + 16) {
                d.copy_from_slice(&v.to_le_bytes());
            }
        }
        if self.ymm_hi.iter().any(|v| *v != 0)
            && let Some(b) = ext.first_mut()
        {
            *b = crate::avx::XCR0_AVX as u8;
        }
        ext
    }

    /// Takes the YMM upper halves from a `CpuState::xsave_ext` (see [`Cpu::xsave_ext`]); a
    /// component whose XSTATE_BV bit is clear, or that is absent, is in its initial state (0).
    pub fn load_xsave_ext(&mut self, ext: &[u8]) {
        self.ymm_hi = [0; 16];
        let base = crate::avx::YMM_OFFSET - 512;
        if ext
            .first()
            .is_some_and(|b| u64::from(*b) & crate::avx::XCR0_AVX != 0)
            && self.xcr0 & crate::avx::XCR0_AVX != 0
        {
            for (k, v) in self.ymm_hi.iter_mut().enumerate() {
                if let Some(b) = ext.get(base + k * 16..base + k * 16 + 16) {
                    let mut w = [0u8; 16];
                    w.copy_from_slice(b);
                    *v = u128::from_le_bytes(w);
                }
            }
        }
    }

    /// Stores MSRs that have no side effects beyond their value. Returns false for others.
    pub fn set_plain_msr(&mut self, index: u32, v: u64) -> bool {
        match index {
            msr::IA32_APIC_BASE => self.apic_base = v,
            msr::IA32_TSC_ADJUST => self.msr.tsc_adjust = v,
            msr::IA32_SYSENTER_CS => self.msr.sysenter_cs = v,
            msr::IA32_SYSENTER_ESP => self.msr.sysenter_esp = v,
            msr::IA32_SYSENTER_EIP => self.msr.sysenter_eip = v,
            msr::IA32_MISC_ENABLE => self.msr.misc_enable = v,
            msr::IA32_PAT => self.msr.pat = v,
            msr::IA32_EFER => self.efer = v,
            msr::IA32_STAR => self.msr.star = v,
            msr::IA32_LSTAR => self.msr.lstar = v,
            msr::IA32_CSTAR => self.msr.cstar = v,
            msr::IA32_FMASK => self.msr.fmask = v,
            msr::IA32_FS_BASE => self.seg[FS].base = v,
            msr::IA32_GS_BASE => self.seg[GS].base = v,
            msr::IA32_KERNEL_GS_BASE => self.msr.kernel_gs_base = v,
            msr::IA32_TSC_AUX => self.msr.tsc_aux = v,
            msr::KVM_WALL_CLOCK_NEW => self.msr.wall_clock = v,
            msr::KVM_SYSTEM_TIME_NEW => self.msr.system_time = v,
            _ => return false,
        }
        true
    }
}

/// A real-mode data segment with the given selector.
pub fn real_segment(selector: u16) -> Segment {
    Segment {
        base: u64::from(selector) << 4,
        limit: 0xffff,
        selector,
        type_: 0x3,
        present: true,
        dpl: 0,
        db: false,
        s: true,
        l: false,
        g: false,
        avl: false,
        unusable: false,
    }
}

/// Parses an 8-byte segment descriptor.
pub fn parse_descriptor(selector: u16, d: u64) -> Segment {
    let base = ((d >> 16) & 0xff_ffff) | (((d >> 56) & 0xff) << 24);
    let mut limit = ((d & 0xffff) | (((d >> 48) & 0xf) << 16)) as u32;
    let g = d & (1 << 55) != 0;
    if g {
        limit = (limit << 12) | 0xfff;
    }
    Segment {
        base,
        limit,
        selector,
        type_: ((d >> 40) & 0xf) as u8,
        s: d & (1 << 44) != 0,
        dpl: ((d >> 45) & 3) as u8,
        present: d & (1 << 47) != 0,
        avl: d & (1 << 52) != 0,
        l: d & (1 << 53) != 0,
        db: d & (1 << 54) != 0,
        g,
        unusable: false,
    }
}
