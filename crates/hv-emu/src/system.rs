//! System instructions: segments and descriptor tables, control/debug registers, MSRs, CPUID,
//! port I/O, interrupt and exception delivery, far transfers, SYSCALL/SYSRET, the local APIC
//! page and kvm-clock.

use std::sync::atomic::Ordering;

use hv::{MpState, msr};
use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

use crate::cpu::*;
use crate::decode::canonical;
use crate::exec::{Exc, Exec, R, gp0, mask, reg_size, ud};
use crate::lapic::{APIC_BASE_ENABLE, WriteEffect};

/// How an event entered the CPU (for the pushed RIP and privilege checks).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Event {
    /// A fault or abort: RIP of the faulting instruction is pushed.
    Exception,
    /// `int n`, `int3`, `into`: RIP of the next instruction, gate DPL checked.
    Software,
    /// External interrupt or NMI.
    External,
}

/// `HV_EMU_TRACE=1` logs every exception and software interrupt, `HV_EMU_TRACE=2` also external
/// interrupts, LAPIC and MSR writes (debugging aid): `tracing` events at `TRACE` level, which the
/// cli prints with `ANYVISOR_LOG=trace`.
fn trace_events() -> bool {
    static T: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *T.get_or_init(|| std::env::var_os("HV_EMU_TRACE").is_some())
}

fn trace_irqs() -> bool {
    static T: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *T.get_or_init(|| std::env::var("HV_EMU_TRACE").is_ok_and(|v| v == "2"))
}

fn contributory(v: u8) -> bool {
    matches!(v, 0 | 10 | 11 | 12 | 13)
}

const MSR_K7_HWCR: u32 = 0xc001_0015;
const MSR_K8_INT_PENDING_MSG: u32 = 0xc001_0055;
const MSR_AMD64_DE_CFG: u32 = 0xc001_1029;
const MSR_K8_SYSCFG: u32 = 0xc001_0010;
const MSR_AMD64_PATCH_LEVEL: u32 = 0x8b;
const MSR_VM_CR: u32 = 0xc001_0114;
const MSR_AMD64_OSVW_ID_LENGTH: u32 = 0xc001_0140;
const MSR_AMD64_OSVW_STATUS: u32 = 0xc001_0141;
const MSR_IA32_MCG_CAP: u32 = 0x179;
const MSR_IA32_MCG_STATUS: u32 = 0x17a;
const MSR_IA32_MCG_CTL: u32 = 0x17b;

impl Exec<'_> {
    pub fn exec_system(&mut self, i: &Instruction) -> R<()> {
        let mn = i.mnemonic();
        match mn {
            M::Hlt => {
                self.cpl0()?;
                self.cpu.mp_state = MpState::Halted;
                Ok(())
            }
            M::Int => {
                let v = i.immediate8();
                self.raise_event(v, None, Event::Software)
            }
            M::Int3 => self.raise_event(3, None, Event::Software),
            M::Int1 => self.raise_event(1, None, Event::Software),
            M::Into => {
                if self.cpu.mode64() {
                    return ud();
                }
                if self.flag(OF) {
                    self.raise_event(4, None, Event::Software)
                } else {
                    Ok(())
                }
            }
            M::Cpuid => {
                let f = self.cpu.gpr[0] as u32;
                let idx = self.cpu.gpr[1] as u32;
                let v = self
                    .vm
                    .model
                    .cpuid_value(self.cpu.id, self.vm.vcpu_count, f, idx);
                let v = self.cpuid_dynamic(f, idx, v);
                for (r, val) in [0usize, 3, 1, 2].iter().zip(v.iter()) {
                    self.cpu.gpr[*r] = u64::from(*val);
                }
                Ok(())
            }
            M::Rdtsc => {
                if self.cpu.cr4 & (1 << 2) != 0 && self.cpu.cpl != 0 {
                    return gp0();
                }
                let t = self.guest_tsc();
                self.cpu.gpr[0] = t & 0xffff_ffff;
                self.cpu.gpr[2] = t >> 32;
                Ok(())
            }
            M::Rdmsr => {
                self.cpl0()?;
                let idx = self.cpu.gpr[1] as u32;
                let v = self.rdmsr(idx)?;
                self.cpu.gpr[0] = v & 0xffff_ffff;
                self.cpu.gpr[2] = v >> 32;
                Ok(())
            }
            M::Wrmsr => {
                self.cpl0()?;
                let idx = self.cpu.gpr[1] as u32;
                let v = (self.cpu.gpr[0] & 0xffff_ffff) | (self.cpu.gpr[2] << 32);
                self.wrmsr(idx, v)
            }
            M::Rdpmc => gp0(),
            M::Lgdt | M::Lidt => {
                self.cpl0()?;
                let a = self.mem_lin(i)?;
                let limit = self.read_lin(a, 2)? as u16;
                let base = if self.cpu.mode64() {
                    self.read_lin(a.wrapping_add(2), 8)?
                } else {
                    let b = self.read_lin(a.wrapping_add(2), 4)?;
                    if i.memory_size().size() <= 6 && self.cpu.bitness() == 16 {
                        b & 0xff_ffff
                    } else {
                        b
                    }
                };
                let t = hv::DescriptorTable { base, limit };
                if mn == M::Lgdt {
                    self.cpu.gdt = t;
                } else {
                    self.cpu.idt = t;
                }
                Ok(())
            }
            M::Sgdt | M::Sidt => {
                let t = if mn == M::Sgdt {
                    self.cpu.gdt
                } else {
                    self.cpu.idt
                };
                let a = self.mem_lin(i)?;
                let bsize = if self.cpu.mode64() { 8 } else { 4 };
                self.probe_write(a, 2 + bsize)?;
                self.write_lin(a, 2, u64::from(t.limit))?;
                self.write_lin(a.wrapping_add(2), bsize, t.base & mask(bsize))
            }
            M::Ltr | M::Lldt => {
                self.cpl0()?;
                let sel = self.rd(i, 0)? as u16;
                self.load_system_seg(mn == M::Ltr, sel)
            }
            M::Str | M::Sldt => {
                let s = if mn == M::Str {
                    self.cpu.tr.selector
                } else {
                    self.cpu.ldtr.selector
                };
                if i.op_kind(0) == OpKind::Register {
                    let r = i.op_register(0);
                    let idx = crate::exec::gpr_index(r);
                    self.set_gpr_sized(idx, reg_size(r), u64::from(s));
                    Ok(())
                } else {
                    self.wr(i, 0, u64::from(s))
                }
            }
            M::Smsw => {
                let v = self.cpu.cr0 & 0xffff;
                if i.op_kind(0) == OpKind::Register {
                    let r = i.op_register(0);
                    let idx = crate::exec::gpr_index(r);
                    self.set_gpr_sized(idx, reg_size(r), self.cpu.cr0);
                    Ok(())
                } else {
                    self.wr(i, 0, v)
                }
            }
            M::Lmsw => {
                self.cpl0()?;
                let v = self.rd(i, 0)? & 0xf;
                let cr0 = (self.cpu.cr0 & !0xe) | v | (self.cpu.cr0 & CR0_PE);
                self.set_cr0(cr0)
            }
            M::Invlpg => {
                self.cpl0()?;
                let a = self.seg_lin(i.memory_segment(), self.ea(i));
                self.cpu.tlb.flush_page(a);
                Ok(())
            }
            M::Invlpga | M::Invpcid => ud(),
            M::Wbinvd | M::Invd | M::Wbnoinvd => self.cpl0(),
            M::Clts => {
                self.cpl0()?;
                self.cpu.cr0 &= !CR0_TS;
                Ok(())
            }
            M::Swapgs => {
                if !self.cpu.mode64() {
                    return ud();
                }
                self.cpl0()?;
                std::mem::swap(&mut self.cpu.seg[GS].base, &mut self.cpu.msr.kernel_gs_base);
                Ok(())
            }
            M::Syscall => self.syscall(),
            M::Sysret | M::Sysretq => self.sysret(i),
            M::Sysenter | M::Sysexit | M::Sysexitq => ud(),
            M::In | M::Out => self.port_io(i),
            M::Lsl | M::Lar => self.lsl_lar(i),
            M::Verr | M::Verw => {
                // Nothing in our GDTs is unreadable for these callers; report "accessible".
                self.cpu.rflags |= ZF;
                Ok(())
            }
            M::Lss | M::Lfs | M::Lgs | M::Lds | M::Les => {
                let a = self.mem_lin(i)?;
                let osz = i.memory_size().size() - 2;
                let off = self.read_lin(a, osz)?;
                let sel = self.read_lin(a.wrapping_add(osz as u64), 2)? as u16;
                let s = match mn {
                    M::Lss => Register::SS,
                    M::Lfs => Register::FS,
                    M::Lgs => Register::GS,
                    M::Lds => Register::DS,
                    _ => Register::ES,
                };
                self.mov_sreg(s, sel)?;
                self.wr_reg(i.op_register(0), off);
                Ok(())
            }
            _ => self.exec_fp(i),
        }
    }

    pub fn cpl0(&self) -> R<()> {
        if self.cpu.cpl != 0 { gp0() } else { Ok(()) }
    }

    fn port_io(&mut self, i: &Instruction) -> R<()> {
        self.check_io_priv()?;
        if i.mnemonic() == M::In {
            let size = reg_size(i.op_register(0));
            let port = self.rd(i, 1)? as u16;
            let mut b = [0u8; 8];
            self.io.pio_read(port, &mut b[..size]);
            let v = u64::from_le_bytes(b);
            let idx = crate::exec::gpr_index(i.op_register(0));
            self.set_gpr_sized(idx, size, v);
        } else {
            let size = reg_size(i.op_register(1));
            let port = self.rd(i, 0)? as u16;
            let v = self.rd_reg(i.op_register(1));
            self.io.pio_write(port, &v.to_le_bytes()[..size]);
        }
        Ok(())
    }

    pub fn check_io_priv(&self) -> R<()> {
        if self.cpu.protected() && u64::from(self.cpu.cpl) > (self.cpu.rflags & IOPL) >> 12 {
            return gp0();
        }
        Ok(())
    }

    fn lsl_lar(&mut self, i: &Instruction) -> R<()> {
        let sel = self.rd(i, 1)? as u16;
        let ok = sel & !3 != 0;
        let d = if ok {
            self.read_descriptor(sel).ok()
        } else {
            None
        };
        match d {
            Some(d) if d & (1 << 47) != 0 => {
                let s = parse_descriptor(sel, d);
                let v = if i.mnemonic() == M::Lsl {
                    u64::from(s.limit)
                } else {
                    d >> 32 & 0x00ff_ff00
                };
                let size = self.op_size(i, 0);
                let r = i.op_register(0);
                self.set_gpr_sized(crate::exec::gpr_index(r), size, v);
                self.cpu.rflags |= ZF;
            }
            _ => self.cpu.rflags &= !ZF,
        }
        Ok(())
    }

    // ---- segments ----

    /// Reads the 8-byte descriptor `sel` refers to (GDT or LDT).
    pub fn read_descriptor(&mut self, sel: u16) -> R<u64> {
        let (base, limit) = if sel & 4 != 0 {
            (self.cpu.ldtr.base, u64::from(self.cpu.ldtr.limit))
        } else {
            (self.cpu.gdt.base, u64::from(self.cpu.gdt.limit))
        };
        let off = u64::from(sel & !7);
        if off + 7 > limit {
            return Err(Exc::Fault(13, Some(u32::from(sel & !3))));
        }
        self.read_lin_as(base.wrapping_add(off), 8, false)
    }

    fn set_accessed(&mut self, sel: u16, d: u64) {
        if d & (1 << 40) == 0 {
            let base = if sel & 4 != 0 {
                self.cpu.ldtr.base
            } else {
                self.cpu.gdt.base
            };
            let a = base.wrapping_add(u64::from(sel & !7)).wrapping_add(5);
            let _ = self.write_lin_as(a, 1, (d >> 40) & 0xff | 1, false);
        }
    }

    /// Loads a data/stack segment register.
    pub fn mov_sreg(&mut self, r: Register, sel: u16) -> R<()> {
        let idx = (r as usize).wrapping_sub(71);
        if idx == CS || idx > GS {
            return ud();
        }
        if !self.cpu.protected() || self.cpu.rflags & VM != 0 {
            let s = &mut self.cpu.seg[idx];
            s.selector = sel;
            s.base = u64::from(sel) << 4;
            if idx == SS {
                self.cpu.shadow |= 2;
            }
            return Ok(());
        }
        if sel & !3 == 0 {
            if idx == SS && !(self.cpu.mode64() && self.cpu.cpl != 3) {
                return gp0();
            }
            let base = if self.cpu.mode64() && (idx == FS || idx == GS) {
                // Null selector in 64-bit mode keeps FS/GS base on AMD? Intel clears; Linux
                // writes the base MSR afterwards anyway.
                self.cpu.seg[idx].base
            } else {
                0
            };
            self.cpu.seg[idx] = hv::Segment {
                selector: sel,
                base,
                unusable: true,
                ..hv::Segment::default()
            };
            if idx == SS {
                self.cpu.seg[idx].dpl = self.cpu.cpl;
                self.cpu.seg[idx].db = true;
                self.cpu.shadow |= 2;
            }
            return Ok(());
        }
        let d = self.read_descriptor(sel)?;
        if d & (1 << 47) == 0 {
            let v = if idx == SS { 12 } else { 11 };
            return Err(Exc::Fault(v, Some(u32::from(sel & !3))));
        }
        self.set_accessed(sel, d);
        let mut s = parse_descriptor(sel, d | (1 << 40));
        if self.cpu.mode64() && (idx == FS || idx == GS) {
            s.base &= 0xffff_ffff;
        }
        self.cpu.seg[idx] = s;
        if idx == SS {
            self.cpu.shadow |= 2;
        }
        Ok(())
    }

    /// Loads CS from a selector (far transfers). `cpl` is the new privilege level.
    pub fn load_cs(&mut self, sel: u16, cpl: u8) -> R<()> {
        if !self.cpu.protected() || self.cpu.rflags & VM != 0 {
            let s = &mut self.cpu.seg[CS];
            s.selector = sel;
            s.base = u64::from(sel) << 4;
            return Ok(());
        }
        if sel & !3 == 0 {
            return gp0();
        }
        let d = self.read_descriptor(sel)?;
        if d & (1 << 47) == 0 {
            return Err(Exc::Fault(11, Some(u32::from(sel & !3))));
        }
        if d & (1 << 43) == 0 {
            return Err(Exc::Fault(13, Some(u32::from(sel & !3))));
        }
        self.set_accessed(sel, d);
        let mut s = parse_descriptor((sel & !3) | u16::from(cpl), d | (1 << 40));
        if s.l && s.db {
            return Err(Exc::Fault(13, Some(u32::from(sel & !3))));
        }
        s.dpl = if s.type_ & 4 != 0 { s.dpl } else { cpl };
        self.cpu.seg[CS] = s;
        self.cpu.cpl = cpl;
        Ok(())
    }

    fn load_system_seg(&mut self, tr: bool, sel: u16) -> R<()> {
        if sel & !3 == 0 {
            if tr {
                return gp0();
            }
            self.cpu.ldtr = hv::Segment {
                unusable: true,
                ..hv::Segment::default()
            };
            return Ok(());
        }
        if sel & 4 != 0 {
            return Err(Exc::Fault(13, Some(u32::from(sel & !3))));
        }
        let lo = self.read_descriptor(sel)?;
        let hi = if self.cpu.long_mode() {
            self.read_descriptor(sel.wrapping_add(8)).unwrap_or(0)
        } else {
            0
        };
        if lo & (1 << 47) == 0 {
            return Err(Exc::Fault(11, Some(u32::from(sel & !3))));
        }
        let mut s = parse_descriptor(sel, lo);
        if self.cpu.long_mode() {
            s.base |= (hi & 0xffff_ffff) << 32;
        }
        if tr {
            // Mark the TSS busy in the GDT.
            let a = self
                .cpu
                .gdt
                .base
                .wrapping_add(u64::from(sel & !7))
                .wrapping_add(5);
            self.write_lin_as(a, 1, ((lo >> 40) & 0xff) | 2, false)?;
            s.type_ |= 2;
            self.cpu.tr = s;
        } else {
            self.cpu.ldtr = s;
        }
        Ok(())
    }

    pub fn far_jump(&mut self, sel: u16, off: u64) -> R<()> {
        let saved = self.cpu.seg[CS];
        let cpl = if self.cpu.protected() {
            self.cpu.cpl
        } else {
            0
        };
        self.load_cs(sel, cpl)?;
        let m = if self.cpu.mode64() {
            u64::MAX
        } else if self.cpu.seg[CS].db {
            0xffff_ffff
        } else {
            0xffff
        };
        let target = off & m;
        if self.cpu.mode64() && !canonical(target) {
            self.cpu.seg[CS] = saved;
            return gp0();
        }
        self.cpu.rip = target;
        Ok(())
    }

    pub fn far_call(&mut self, i: &Instruction) -> R<()> {
        let (sel, off, osz) = match i.op_kind(0) {
            OpKind::FarBranch16 => (i.far_branch_selector(), u64::from(i.far_branch16()), 2),
            OpKind::FarBranch32 => (i.far_branch_selector(), u64::from(i.far_branch32()), 4),
            _ => {
                let a = self.mem_lin(i)?;
                let osz = i.memory_size().size() - 2;
                let off = self.read_lin(a, osz)?;
                let sel = self.read_lin(a.wrapping_add(osz as u64), 2)? as u16;
                (sel, off, osz)
            }
        };
        let old_cs = u64::from(self.cpu.seg[CS].selector);
        let ret = self.cpu.rip;
        let sp = self.cpu.gpr[4];
        self.push(old_cs, osz)?;
        self.push(ret, osz)?;
        if let Err(e) = self.far_jump(sel, off) {
            self.cpu.gpr[4] = sp;
            return Err(e);
        }
        Ok(())
    }

    pub fn far_ret(&mut self, i: &Instruction) -> R<()> {
        let imm = if i.op_count() == 1 {
            u64::from(i.immediate16())
        } else {
            0
        };
        let osz = ((i.stack_pointer_increment() as u64).wrapping_sub(imm) / 2) as usize;
        let osz = if matches!(osz, 2 | 4 | 8) { osz } else { 4 };
        let off = self.peek(0, osz)?;
        let sel = self.peek(osz as u64, osz)? as u16;
        let new_cpl = if self.cpu.protected() {
            (sel & 3) as u8
        } else {
            0
        };
        if new_cpl != self.cpu.cpl && self.cpu.protected() {
            // Return to an outer level also pops SS:RSP.
            let sp = self.peek(2 * osz as u64 + imm, osz)?;
            let ss = self.peek(3 * osz as u64 + imm, osz)? as u16;
            self.load_cs(sel, new_cpl)?;
            self.cpu.rip = off & self.ip_mask();
            self.mov_sreg(Register::SS, ss)?;
            self.cpu.gpr[4] = sp;
            return Ok(());
        }
        self.load_cs(sel, new_cpl)?;
        self.cpu.rip = off & self.ip_mask();
        let ss = self.stack_size();
        let sp = self.cpu.gpr[4].wrapping_add(2 * osz as u64 + imm);
        self.set_gpr_sized(4, ss, sp);
        Ok(())
    }

    pub fn iret(&mut self, i: &Instruction) -> R<()> {
        let osz = match i.mnemonic() {
            M::Iretq => 8,
            M::Iretd => 4,
            _ => 2,
        };
        if !self.cpu.protected() {
            let ip = self.peek(0, osz)?;
            let cs = self.peek(osz as u64, osz)? as u16;
            let fl = self.peek(2 * osz as u64, osz)?;
            self.load_cs(cs, 0)?;
            self.cpu.rip = ip & mask(osz);
            let w = if osz == 2 { 0xffff } else { FLAGS_WRITABLE };
            self.cpu.rflags =
                (self.cpu.rflags & !(w & FLAGS_WRITABLE)) | (fl & w & FLAGS_WRITABLE) | 2;
            let ss = self.stack_size();
            let sp = self.cpu.gpr[4].wrapping_add(3 * osz as u64);
            self.set_gpr_sized(4, ss, sp);
            self.cpu.nmi_masked = false;
            self.cpu.irq_check = true;
            return Ok(());
        }
        if self.cpu.rflags & NT != 0 && !self.cpu.long_mode() {
            return Err(Exc::unhandled("iret with NT (task switch)"));
        }
        let ip = self.peek(0, osz)?;
        let cs = self.peek(osz as u64, osz)? as u16;
        let fl = self.peek(2 * osz as u64, osz)?;
        let new_cpl = (cs & 3) as u8;
        let outer = self.cpu.mode64() || new_cpl != self.cpu.cpl;
        let (sp, ss) = if outer {
            (
                self.peek(3 * osz as u64, osz)?,
                self.peek(4 * osz as u64, osz)? as u16,
            )
        } else {
            (0, 0)
        };
        let old_cpl = self.cpu.cpl;
        let saved_cs = self.cpu.seg[CS];
        self.load_cs(cs, new_cpl)?;
        let target = ip & self.ip_mask();
        if self.cpu.mode64() && !canonical(target) {
            self.cpu.seg[CS] = saved_cs;
            self.cpu.cpl = old_cpl;
            return gp0();
        }
        // Flags: IOPL only at CPL 0, IF only if CPL <= IOPL.
        let mut w = FLAGS_WRITABLE | RF;
        if old_cpl != 0 {
            w &= !IOPL;
            if u64::from(old_cpl) > (self.cpu.rflags & IOPL) >> 12 {
                w &= !IF;
            }
        }
        if osz == 2 {
            w &= 0xffff;
        }
        self.cpu.rflags = (self.cpu.rflags & !w) | (fl & w) | 2;
        self.cpu.rip = target;
        if outer {
            if self.cpu.long_mode() && ss & !3 == 0 {
                self.cpu.seg[SS] = hv::Segment {
                    selector: ss,
                    unusable: true,
                    dpl: new_cpl,
                    db: true,
                    ..hv::Segment::default()
                };
            } else {
                self.mov_sreg(Register::SS, ss)?;
            }
            self.cpu.shadow &= !2;
            if self.cpu.mode64() || self.stack_size() == 8 {
                self.cpu.gpr[4] = sp;
            } else {
                let s = self.stack_size();
                self.set_gpr_sized(4, s, sp);
            }
            if new_cpl > old_cpl {
                // Data segments the new level may not use become null.
                for idx in [ES, DS, FS, GS] {
                    let s = self.cpu.seg[idx];
                    let conforming_code = s.type_ & 0xc == 0xc;
                    if !s.unusable && s.dpl < new_cpl && !conforming_code && !self.cpu.mode64() {
                        self.cpu.seg[idx] = hv::Segment {
                            unusable: true,
                            ..hv::Segment::default()
                        };
                    }
                }
            }
        } else {
            let ss = self.stack_size();
            let sp = self.cpu.gpr[4].wrapping_add(3 * osz as u64);
            self.set_gpr_sized(4, ss, sp);
        }
        self.cpu.nmi_masked = false;
        self.cpu.irq_check = true;
        Ok(())
    }

    pub fn syscall(&mut self) -> R<()> {
        if self.cpu.efer & EFER_SCE == 0 {
            return ud();
        }
        if !self.cpu.long_mode() {
            return Err(Exc::unhandled("legacy-mode syscall"));
        }
        let star = self.cpu.msr.star;
        let sel = ((star >> 32) & 0xffff) as u16;
        self.cpu.gpr[1] = self.cpu.rip;
        self.cpu.gpr[11] = self.cpu.rflags & !RF;
        self.cpu.seg[CS] = flat_code(sel & !3, 0, true);
        self.cpu.seg[SS] = flat_data((sel & !3).wrapping_add(8), 0);
        self.cpu.cpl = 0;
        self.cpu.rflags &= !(self.cpu.msr.fmask | RF);
        self.cpu.rflags |= 2;
        self.cpu.rip = if self.cpu.mode64() {
            self.cpu.msr.lstar
        } else {
            self.cpu.msr.cstar
        };
        Ok(())
    }

    fn sysret(&mut self, i: &Instruction) -> R<()> {
        if self.cpu.efer & EFER_SCE == 0 {
            return ud();
        }
        if !self.cpu.protected() || self.cpu.cpl != 0 || !self.cpu.long_mode() {
            return gp0();
        }
        let star = self.cpu.msr.star;
        let base = ((star >> 48) & 0xffff) as u16;
        let to64 = i.mnemonic() == M::Sysretq;
        if to64 && !canonical(self.cpu.gpr[1]) {
            return gp0();
        }
        if to64 {
            self.cpu.seg[CS] = flat_code(base.wrapping_add(16) | 3, 3, true);
            self.cpu.rip = self.cpu.gpr[1];
        } else {
            self.cpu.seg[CS] = flat_code(base | 3, 3, false);
            self.cpu.rip = self.cpu.gpr[1] & 0xffff_ffff;
        }
        // AMD keeps the SS attributes but loads the selector; use a flat user data segment.
        self.cpu.seg[SS] = flat_data(base.wrapping_add(8) | 3, 3);
        self.cpu.rflags = (self.cpu.gpr[11] & (FLAGS_WRITABLE | RF)) & !RF | 2;
        self.cpu.cpl = 3;
        self.cpu.irq_check = true;
        Ok(())
    }

    // ---- control and debug registers ----

    pub fn mov_cr(&mut self, i: &Instruction) -> R<()> {
        self.cpl0()?;
        let r0 = i.op_register(0);
        if crate::exec::is_cr(r0) {
            let n = r0 as usize - 185;
            let v = self.rd_reg(i.op_register(1));
            match n {
                0 => self.set_cr0(v),
                2 => {
                    self.cpu.cr2 = v;
                    Ok(())
                }
                3 => {
                    self.cpu.cr3 = v & 0x000f_ffff_ffff_ffff;
                    if self.cpu.cr4 & crate::cpu::CR4_PGE != 0 {
                        self.cpu.tlb.flush_nonglobal();
                    } else {
                        self.cpu.tlb.flush_all();
                    }
                    Ok(())
                }
                4 => self.set_cr4(v),
                8 => {
                    self.cpu.lapic.set_tpr(((v & 0xf) << 4) as u32);
                    self.cpu.irq_check = true;
                    Ok(())
                }
                _ => ud(),
            }
        } else {
            let n = i.op_register(1) as usize - 185;
            let v = match n {
                0 => self.cpu.cr0,
                2 => self.cpu.cr2,
                3 => self.cpu.cr3,
                4 => self.cpu.cr4,
                8 => u64::from(self.cpu.lapic.tpr() >> 4),
                _ => return ud(),
            };
            let r = i.op_register(0);
            self.set_gpr_sized(crate::exec::gpr_index(r), reg_size(r), v);
            Ok(())
        }
    }

    pub fn set_cr0(&mut self, v: u64) -> R<()> {
        let v = (v & 0xffff_ffff) | CR0_ET;
        if v & CR0_PG != 0 && v & CR0_PE == 0 {
            return gp0();
        }
        let old = self.cpu.cr0;
        if v & CR0_PG != 0 && old & CR0_PG == 0 && self.cpu.efer & EFER_LME != 0 {
            if self.cpu.cr4 & CR4_PAE == 0 {
                return gp0();
            }
            self.cpu.efer |= EFER_LMA;
        }
        if v & CR0_PG == 0 && old & CR0_PG != 0 {
            if self.cpu.mode64() {
                return gp0();
            }
            self.cpu.efer &= !EFER_LMA;
        }
        self.cpu.cr0 = v;
        if (old ^ v) & (CR0_PG | CR0_WP | CR0_PE) != 0 {
            self.cpu.tlb.flush_all();
        }
        if (old ^ v) & CR0_PE != 0 && v & CR0_PE == 0 {
            self.cpu.cpl = 0;
        }
        Ok(())
    }

    fn set_cr4(&mut self, v: u64) -> R<()> {
        // Bits of features the model does not have (VME..PCE allowed, OSFXSR, OSXMMEXCPT).
        const ALLOWED: u64 = 0x7ff | (1 << 9) | (1 << 10);
        let mut allowed = ALLOWED;
        if self.has(hv::cpu_model::Feature::Fsgsbase) {
            allowed |= crate::ext::CR4_FSGSBASE;
        }
        if self.has(hv::cpu_model::Feature::Xsave) {
            allowed |= crate::avx::CR4_OSXSAVE;
        }
        if v & !allowed != 0 {
            return gp0();
        }
        if self.cpu.long_mode() && v & CR4_PAE == 0 {
            return gp0();
        }
        let old = self.cpu.cr4;
        self.cpu.cr4 = v;
        if (old ^ v) & (CR4_PAE | CR4_PGE | CR4_PSE) != 0 {
            self.cpu.tlb.flush_all();
        }
        Ok(())
    }

    pub fn mov_dr(&mut self, i: &Instruction) -> R<()> {
        self.cpl0()?;
        let r0 = i.op_register(0);
        if crate::exec::is_dr(r0) {
            let n = r0 as usize - 201;
            let v = self.rd_reg(i.op_register(1));
            match n {
                0..=3 => self.cpu.dr[n] = v,
                4 | 6 => self.cpu.dr6 = (v & 0xe00f) | 0xffff_0ff0,
                5 | 7 => self.cpu.dr7 = (v & 0xffff_2bff) | 0x400,
                _ => return ud(),
            }
            Ok(())
        } else {
            let n = i.op_register(1) as usize - 201;
            let v = match n {
                0..=3 => self.cpu.dr[n],
                4 | 6 => self.cpu.dr6,
                5 | 7 => self.cpu.dr7,
                _ => return ud(),
            };
            let r = i.op_register(0);
            self.set_gpr_sized(crate::exec::gpr_index(r), 8, v);
            Ok(())
        }
    }

    // ---- MSRs and time ----

    /// IA32_TSC_AUX exists when the model has RDTSCP or RDPID (which read it).
    fn has_tsc_aux(&self) -> bool {
        use hv::cpu_model::Feature;
        self.has(Feature::Rdtscp) || self.has(Feature::Rdpid)
    }

    pub fn guest_tsc(&self) -> u64 {
        let ns = self.vm.clock.host_ns();
        self.cpu.tsc_at(&self.vm.clock, ns)
    }

    pub fn rdmsr(&mut self, idx: u32) -> R<u64> {
        if idx == msr::IA32_TSC_AUX && !self.has_tsc_aux() {
            return gp0();
        }
        if let Some(v) = self.cpu.msr_value(idx) {
            return Ok(v);
        }
        Ok(match idx {
            msr::IA32_TSC => self.guest_tsc(),
            msr::IA32_TSC_DEADLINE => self.cpu.lapic.tsc_deadline,
            MSR_K7_HWCR => 0,
            MSR_K8_INT_PENDING_MSG => 0,
            MSR_AMD64_DE_CFG => 0,
            MSR_K8_SYSCFG => 0,
            MSR_AMD64_PATCH_LEVEL => 0,
            MSR_VM_CR => 0,
            MSR_AMD64_OSVW_ID_LENGTH | MSR_AMD64_OSVW_STATUS => 0,
            MSR_IA32_MCG_CAP | MSR_IA32_MCG_STATUS | MSR_IA32_MCG_CTL => 0,
            _ => return gp0(),
        })
    }

    pub fn wrmsr(&mut self, idx: u32, v: u64) -> R<()> {
        if trace_irqs() {
            tracing::trace!("[emu] wrmsr {idx:#x} {v:#x}");
        }
        match idx {
            msr::IA32_TSC => {
                // With the host's TSC as the guest's (user mode on hardware) the write is
                // dropped, as the hardware would not apply it to user code either.
                if !self.vm.clock.fixed_tsc() {
                    let now = self.vm.clock.raw_tsc(self.vm.clock.host_ns());
                    self.cpu.msr.tsc_offset = v.wrapping_sub(now);
                    self.cpu.msr.tsc_floor = 0;
                }
                Ok(())
            }
            msr::IA32_TSC_DEADLINE => {
                self.set_tsc_deadline(v);
                Ok(())
            }
            msr::IA32_EFER => {
                let allowed = EFER_SCE | EFER_LME | EFER_NXE;
                if v & !(allowed | EFER_LMA) != 0 {
                    return gp0();
                }
                let lma = self.cpu.efer & EFER_LMA;
                if (v ^ self.cpu.efer) & EFER_LME != 0 && self.cpu.cr0 & CR0_PG != 0 {
                    return gp0();
                }
                self.cpu.efer = (v & allowed) | lma;
                self.cpu.tlb.flush_all();
                Ok(())
            }
            msr::IA32_APIC_BASE => {
                let bsp = self.cpu.apic_base & crate::lapic::APIC_BASE_BSP;
                self.cpu.apic_base = (v & !(crate::lapic::APIC_BASE_BSP | (1 << 10))) | bsp;
                Ok(())
            }
            msr::IA32_FS_BASE
            | msr::IA32_GS_BASE
            | msr::IA32_KERNEL_GS_BASE
            | msr::IA32_LSTAR
            | msr::IA32_CSTAR => {
                if !canonical(v) {
                    return gp0();
                }
                self.cpu.set_plain_msr(idx, v);
                Ok(())
            }
            msr::IA32_PAT => {
                // Each byte must be a valid memory type (0, 1, 4, 5, 6, 7).
                if (0..8).any(|b| matches!((v >> (b * 8)) & 0xff, 2 | 3 | 8..=255)) {
                    return gp0();
                }
                self.cpu.msr.pat = v;
                Ok(())
            }
            msr::IA32_TSC_AUX => {
                // Only with RDTSCP or RDPID; bits 63:32 are reserved.
                if !self.has_tsc_aux() || v >> 32 != 0 {
                    return gp0();
                }
                self.cpu.msr.tsc_aux = v;
                Ok(())
            }
            msr::KVM_SYSTEM_TIME_NEW => {
                self.cpu.msr.system_time = v;
                self.write_pvclock();
                Ok(())
            }
            msr::KVM_WALL_CLOCK_NEW => {
                self.cpu.msr.wall_clock = v;
                self.write_wall_clock(v);
                Ok(())
            }
            MSR_K7_HWCR
            | MSR_AMD64_DE_CFG
            | MSR_K8_SYSCFG
            | MSR_AMD64_PATCH_LEVEL
            | MSR_IA32_MCG_STATUS
            | MSR_IA32_MCG_CTL => Ok(()),
            _ => {
                if self.cpu.set_plain_msr(idx, v) {
                    Ok(())
                } else {
                    gp0()
                }
            }
        }
    }

    /// Moves the guest TSC to `tsc` now (what a user-mode runner reports after running on
    /// hardware), keeping what the kernel reads monotonic: when the TSC would go back, reads
    /// stay at the current value until the new timeline passes it. Differences below 250 us
    /// are ignored: reading the runner's TSC and the host clock some microseconds apart makes
    /// them jitter by about +-25 us (more when the host preempts the thread), and following
    /// that would step the kernel's clock on every return. The TSC-deadline timer and the
    /// pvclock page follow the new offset.
    ///
    /// Not when the TSC is the host's (`Clock::fixed_tsc`): user mode then reads the host TSC
    /// itself, so the guest TSC is exactly the host's with offset 0, and "following" the
    /// runner's report would only turn the jitter of two reads taken microseconds (or, when
    /// the thread is preempted, milliseconds) apart into a changed offset, which user-mode
    /// `clock_gettime` (the host TSC through a pvclock page written with the new offset) sees
    /// as time going backwards.
    pub fn follow_tsc(&mut self, tsc: u64) {
        let clock = &self.vm.clock;
        if clock.fixed_tsc() {
            return;
        }
        let now = clock.host_ns();
        let offset = tsc.wrapping_sub(clock.raw_tsc(now));
        let diff = offset.wrapping_sub(self.cpu.msr.tsc_offset) as i64;
        if diff.unsigned_abs() < u64::from(clock.tsc_khz) / 4 {
            return;
        }
        let cur = self.cpu.tsc_at(clock, now);
        if diff < 0 {
            self.cpu.msr.tsc_floor = cur;
        }
        self.cpu.msr.tsc_offset = offset;
        let d = self.cpu.lapic.tsc_deadline;
        if d != 0 {
            self.set_tsc_deadline(d);
        }
        self.write_pvclock();
    }

    pub fn set_tsc_deadline(&mut self, v: u64) {
        if trace_irqs() {
            tracing::trace!(
                "[emu] tsc deadline {v:#x} mode {} now {:#x}",
                self.cpu.lapic.timer_mode(),
                self.guest_tsc()
            );
        }
        if self.cpu.lapic.timer_mode() != 2 {
            return;
        }
        let deadline_ns = if v == 0 {
            None
        } else {
            let clock = &self.vm.clock;
            let now = clock.host_ns();
            let cur = self.cpu.tsc_at(clock, now);
            // Ticks to go (none if the deadline has passed), as VM-clock ns from now.
            let ahead = v.wrapping_sub(cur);
            Some(if ahead == 0 || ahead > (1 << 63) {
                now
            } else {
                now.saturating_add(clock.tsc_to_ns(ahead))
            })
        };
        let l = &mut self.cpu.lapic;
        l.tsc_deadline = v;
        l.deadline_ns = deadline_ns;
    }

    /// Writes this vCPU's `pvclock_vcpu_time_info` if kvm-clock is enabled.
    pub fn write_pvclock(&mut self) {
        let v = self.cpu.msr.system_time;
        if v & 1 == 0 {
            return;
        }
        let gpa = v & !1;
        let host = self.vm.clock.host_ns();
        // The TSC's own timeline (no monotonic floor), so guest time stays linear in it.
        let tsc = self
            .vm
            .clock
            .raw_tsc(host)
            .wrapping_add(self.cpu.msr.tsc_offset);
        let system_time = self.vm.clock.kvmclock_ns(host);
        let (mul, shift) = crate::clock::pvclock_scale(self.vm.clock.tsc_khz);
        let mut b = [0u8; 32];
        b[8..16].copy_from_slice(&tsc.to_le_bytes());
        b[16..24].copy_from_slice(&system_time.to_le_bytes());
        b[24..28].copy_from_slice(&mul.to_le_bytes());
        b[28] = shift as u8;
        b[29] = 1; // PVCLOCK_TSC_STABLE_BIT
        use vm_memory::{Bytes, GuestAddress};
        let ver = self
            .mem
            .load::<u32>(GuestAddress(gpa), Ordering::Relaxed)
            .unwrap_or(0);
        let odd = (ver | 1).wrapping_add(0);
        let _ = self.mem.store(odd, GuestAddress(gpa), Ordering::SeqCst);
        let _ = self.mem.write_slice(&b[4..], GuestAddress(gpa + 4));
        let _ = self
            .mem
            .store(odd.wrapping_add(1), GuestAddress(gpa), Ordering::SeqCst);
        self.note_write(gpa);
    }

    fn write_wall_clock(&mut self, gpa: u64) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let boot = now.saturating_sub(self.vm.clock.kvmclock_ns(self.vm.clock.host_ns()));
        use vm_memory::{Bytes, GuestAddress};
        let ver = self
            .mem
            .load::<u32>(GuestAddress(gpa), Ordering::Relaxed)
            .unwrap_or(0);
        let odd = ver | 1;
        let _ = self.mem.store(odd, GuestAddress(gpa), Ordering::SeqCst);
        let mut b = [0u8; 8];
        b[0..4].copy_from_slice(&((boot / 1_000_000_000) as u32).to_le_bytes());
        b[4..8].copy_from_slice(&((boot % 1_000_000_000) as u32).to_le_bytes());
        let _ = self.mem.write_slice(&b, GuestAddress(gpa + 4));
        let _ = self
            .mem
            .store(odd.wrapping_add(1), GuestAddress(gpa), Ordering::SeqCst);
        self.note_write(gpa);
    }

    // ---- local APIC page ----

    pub fn lapic_read(&mut self, pa: u64, size: usize) -> R<u64> {
        let off = (pa & 0xfff) as usize;
        let now = self.vm.clock.host_ns();
        let v = u64::from(self.cpu.lapic.read(off & !0xf, now));
        Ok((v >> ((off & 3) * 8)) & mask(size))
    }

    pub fn lapic_write(&mut self, pa: u64, _size: usize, v: u64) -> R<()> {
        let off = (pa & 0xfff) as usize;
        if off & 0xf != 0 {
            return Ok(());
        }
        let now = self.vm.clock.host_ns();
        if trace_irqs() {
            tracing::trace!("[emu] lapic write {off:#x} {v:#x}");
        }
        match self.cpu.lapic.write(off, v as u32, now) {
            WriteEffect::SendIpi(lo, hi) => {
                self.vm.send_ipi(self.cpu.id as usize, lo, hi);
                self.cpu.irq_check = true;
            }
            WriteEffect::Recheck | WriteEffect::Timer => self.cpu.irq_check = true,
            WriteEffect::Routing => self.publish_routing(),
            WriteEffect::None => {}
        }
        Ok(())
    }

    pub fn publish_routing(&self) {
        if let Some(s) = self.vm.vcpus.get(self.cpu.id as usize) {
            s.apic_id.store(self.cpu.lapic.id(), Ordering::Relaxed);
            s.ldr.store(self.cpu.lapic.ldr(), Ordering::Relaxed);
            s.dfr.store(self.cpu.lapic.dfr(), Ordering::Relaxed);
        }
    }

    pub fn apic_hw_enabled(&self) -> bool {
        self.cpu.apic_base & APIC_BASE_ENABLE != 0
    }

    // ---- events ----

    /// Delivers an event, turning faults during delivery into #DF / triple fault.
    pub fn raise_event(&mut self, vector: u8, code: Option<u32>, kind: Event) -> R<()> {
        if trace_events() && (kind != Event::External || trace_irqs()) {
            tracing::trace!(
                "[emu] vcpu {} event {vector} {code:x?} {kind:?} at rip {:#x} cr2 {:#x}",
                self.cpu.id,
                self.cpu.rip,
                self.cpu.cr2
            );
        }
        if !self.cpu.deliver_exceptions && (kind == Event::Software || kind == Event::Exception) {
            self.cpu.reported = Some((vector, code));
            return Ok(());
        }
        let mut vector = vector;
        let mut code = code;
        let mut kind = kind;
        let mut first: Option<u8> = None;
        loop {
            let saved_rip = self.cpu.rip;
            match self.deliver(vector, code, kind) {
                Ok(()) => return Ok(()),
                Err(Exc::Fault(v2, c2)) => {
                    self.cpu.rip = saved_rip;
                    let prev = first.unwrap_or(vector);
                    if prev == 8 || first == Some(8) {
                        return Err(Exc::Shutdown);
                    }
                    let df = (contributory(prev) && contributory(v2))
                        || (prev == 14 && (contributory(v2) || v2 == 14));
                    if df {
                        first = Some(8);
                        vector = 8;
                        code = Some(0);
                    } else {
                        first = Some(v2);
                        vector = v2;
                        code = c2;
                    }
                    kind = Event::Exception;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn deliver(&mut self, vector: u8, code: Option<u32>, kind: Event) -> R<()> {
        let v = u64::from(vector);
        if !self.cpu.protected() {
            // Real mode: IVT.
            let ent = self.read_lin_as(self.cpu.idt.base.wrapping_add(v * 4), 4, false)?;
            let fl = self.cpu.rflags;
            let cs = u64::from(self.cpu.seg[CS].selector);
            let ip = self.cpu.rip;
            self.push(fl, 2)?;
            self.push(cs, 2)?;
            self.push(ip, 2)?;
            self.cpu.rflags &= !(IF | TF | AC | RF);
            self.load_cs((ent >> 16) as u16, 0)?;
            self.cpu.rip = ent & 0xffff;
            return Ok(());
        }
        let err_sel = Some((vector as u32) * 8 + 2);
        let long = self.cpu.long_mode();
        let gate_size = if long { 16 } else { 8 };
        if v * gate_size + gate_size - 1 > u64::from(self.cpu.idt.limit) {
            return Err(Exc::Fault(13, err_sel));
        }
        let ga = self.cpu.idt.base.wrapping_add(v * gate_size);
        let lo = self.read_lin_as(ga, 8, false)?;
        let hi = if long {
            self.read_lin_as(ga.wrapping_add(8), 8, false)?
        } else {
            0
        };
        let typ = (lo >> 40) & 0xf;
        let dpl = ((lo >> 45) & 3) as u8;
        if lo & (1 << 47) == 0 {
            return Err(Exc::Fault(11, err_sel));
        }
        if kind == Event::Software && dpl < self.cpu.cpl {
            return Err(Exc::Fault(13, err_sel));
        }
        let sel = ((lo >> 16) & 0xffff) as u16;
        let target = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000) | ((hi & 0xffff_ffff) << 32);
        let cs_desc = self.read_descriptor(sel)?;
        let cs_seg = parse_descriptor(sel, cs_desc);
        if !cs_seg.present {
            return Err(Exc::Fault(11, Some(u32::from(sel & !3))));
        }
        let new_cpl = if cs_seg.type_ & 4 != 0 {
            self.cpu.cpl
        } else {
            cs_seg.dpl
        };
        if !long {
            return self.deliver32(vector, code, typ, sel, target & 0xffff_ffff, new_cpl);
        }
        if typ != 0xe && typ != 0xf {
            return Err(Exc::Fault(13, err_sel));
        }
        let ist = (lo >> 32) & 7;
        let old_rsp = self.cpu.gpr[4];
        let old_ss = u64::from(self.cpu.seg[SS].selector);
        let old_cs = u64::from(self.cpu.seg[CS].selector);
        let old_fl = self.cpu.rflags;
        let changes = new_cpl < self.cpu.cpl;
        let mut rsp = if ist != 0 {
            self.read_lin_as(
                self.cpu.tr.base.wrapping_add(0x24 + (ist - 1) * 8),
                8,
                false,
            )?
        } else if changes {
            self.read_lin_as(
                self.cpu.tr.base.wrapping_add(4 + u64::from(new_cpl) * 8),
                8,
                false,
            )?
        } else {
            old_rsp
        };
        rsp &= !0xf;
        let mut frame = [self.cpu.rip, old_cs, old_fl, old_rsp, old_ss];
        if self.cpu.reported.is_some() {
            frame[0] = self.cpu.rip;
        }
        let n = if code.is_some() { 6 } else { 5 };
        let sup = new_cpl != 3;
        let top = rsp.wrapping_sub(8 * n as u64);
        if !canonical(top) {
            return Err(Exc::Fault(12, Some(0)));
        }
        // Write the frame top-down: [code], rip, cs, rflags, rsp, ss.
        let mut a = top;
        if let Some(c) = code {
            self.write_lin_as(a, 8, u64::from(c), !sup)?;
            a = a.wrapping_add(8);
        }
        for val in frame {
            self.write_lin_as(a, 8, val, !sup)?;
            a = a.wrapping_add(8);
        }
        let mut cs = cs_seg;
        cs.selector = (sel & !3) | u16::from(new_cpl);
        cs.dpl = if cs.type_ & 4 != 0 { cs.dpl } else { new_cpl };
        self.cpu.seg[CS] = cs;
        if changes {
            self.cpu.seg[SS] = hv::Segment {
                selector: u16::from(new_cpl),
                unusable: true,
                dpl: new_cpl,
                db: true,
                ..hv::Segment::default()
            };
        }
        self.cpu.cpl = new_cpl;
        self.cpu.gpr[4] = top;
        self.cpu.rflags &= !(TF | NT | RF | VM);
        if typ == 0xe {
            self.cpu.rflags &= !IF;
        }
        self.cpu.rip = target;
        Ok(())
    }

    fn deliver32(
        &mut self,
        _vector: u8,
        code: Option<u32>,
        typ: u64,
        sel: u16,
        target: u64,
        new_cpl: u8,
    ) -> R<()> {
        if typ != 0xe && typ != 0xf {
            return Err(Exc::unhandled(format!("protected-mode gate type {typ:#x}")));
        }
        let old_cs = u64::from(self.cpu.seg[CS].selector);
        let old_fl = self.cpu.rflags;
        let ip = self.cpu.rip;
        if new_cpl < self.cpu.cpl {
            // 32-bit TSS: ESP0 at +4, SS0 at +8.
            let tss = self.cpu.tr.base;
            let esp = self.read_lin_as(tss.wrapping_add(4 + 8 * u64::from(new_cpl)), 4, false)?;
            let ss = self.read_lin_as(tss.wrapping_add(8 + 8 * u64::from(new_cpl)), 2, false)?;
            let old_ss = u64::from(self.cpu.seg[SS].selector);
            let old_esp = self.cpu.gpr[4];
            let saved = self.cpu.seg;
            self.load_cs(sel, new_cpl)?;
            if let Err(e) = self.mov_sreg(Register::SS, ss as u16) {
                self.cpu.seg = saved;
                return Err(e);
            }
            self.cpu.gpr[4] = esp;
            for v in [old_ss, old_esp, old_fl, old_cs, ip] {
                self.push(v, 4)?;
            }
        } else {
            self.push(old_fl, 4)?;
            self.push(old_cs, 4)?;
            self.push(ip, 4)?;
            self.load_cs(sel, new_cpl)?;
        }
        if let Some(c) = code {
            self.push(u64::from(c), 4)?;
        }
        self.cpu.rflags &= !(TF | NT | RF | VM);
        if typ == 0xe {
            self.cpu.rflags &= !IF;
        }
        self.cpu.rip = target;
        Ok(())
    }
}

pub fn flat_code(sel: u16, dpl: u8, long: bool) -> hv::Segment {
    hv::Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: sel,
        type_: 0xb,
        present: true,
        dpl,
        db: !long,
        s: true,
        l: long,
        g: true,
        avl: false,
        unusable: false,
    }
}

pub fn flat_data(sel: u16, dpl: u8) -> hv::Segment {
    hv::Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: sel,
        type_: 0x3,
        present: true,
        dpl,
        db: true,
        s: true,
        l: false,
        g: true,
        avl: false,
        unusable: false,
    }
}
