//! Instruction execution: operand access, flags, and the integer instruction set.
//!
//! Every instruction either completes (RIP advanced or branched) or fails with an [`Exc`] that
//! leaves the architectural state as it was before the instruction (string instructions keep
//! the iterations they completed, as on hardware).

use iced_x86::{ConditionCode, Instruction, Mnemonic as M, OpKind, Register};

use crate::cpu::*;
use crate::decode::canonical;
use crate::vm::VmShared;

/// Why an instruction did not complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exc {
    /// A guest exception: vector and error code.
    Fault(u8, Option<u32>),
    /// Something the emulator does not implement. Boxed (a thin pointer) so that `Exc` and
    /// `R<()>`, returned by every instruction, stay two words.
    #[allow(clippy::box_collection)]
    Unhandled(Box<String>),
    /// Triple fault.
    Shutdown,
}

impl Exc {
    pub fn unhandled(msg: impl Into<String>) -> Exc {
        Exc::Unhandled(Box::new(msg.into()))
    }
}

pub type R<T> = Result<T, Exc>;

pub fn gp0<T>() -> R<T> {
    Err(Exc::Fault(13, Some(0)))
}

pub fn ud<T>() -> R<T> {
    Err(Exc::Fault(6, None))
}

/// One instruction's execution context: the vCPU, guest memory, devices and the VM.
pub struct Exec<'a> {
    pub cpu: &'a mut Cpu,
    pub mem: &'a hv::GuestMemory,
    /// Fast access to the RAM regions of `mem`.
    pub ram: &'a crate::mmu::Ram<'a>,
    pub io: &'a dyn hv::DeviceIo,
    pub vm: &'a VmShared,
    /// The local APIC page is served by the emulator (false when KVM owns the APIC).
    pub lapic_enabled: bool,
}

/// A resolved operand location.
#[derive(Clone, Copy)]
pub enum Loc {
    Reg(Register),
    Mem(u64),
}

#[inline]
pub fn mask(size: usize) -> u64 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

#[inline]
pub fn sign(size: usize) -> u64 {
    1u64 << (size * 8 - 1)
}

#[inline]
pub fn sx(v: u64, size: usize) -> u64 {
    match size {
        1 => v as u8 as i8 as i64 as u64,
        2 => v as u16 as i16 as i64 as u64,
        4 => v as u32 as i32 as i64 as u64,
        _ => v,
    }
}

#[inline]
pub fn reg_size(r: Register) -> usize {
    match r as usize {
        1..=20 => 1,
        21..=36 => 2,
        37..=52 | 69 => 4,
        53..=68 | 70 => 8,
        71..=76 => 2,
        _ => 16,
    }
}

#[inline]
pub fn szp(size: usize, r: u64) -> u64 {
    let r = r & mask(size);
    let mut f = 0;
    if r == 0 {
        f |= ZF;
    }
    if r & sign(size) != 0 {
        f |= SF;
    }
    // Parity of the low byte: 0x6996 is the odd-parity table of a nibble.
    let b = (r ^ (r >> 4)) & 0xf;
    if (0x6996u32 >> b) & 1 == 0 {
        f |= PF;
    }
    f
}

/// Result and flags of the eight classic ALU operations (ADD OR ADC SBB AND SUB XOR CMP).
#[inline]
pub fn alu(op: u8, size: usize, a: u64, b: u64, cf: bool) -> (u64, u64) {
    let m = mask(size);
    let (a, b) = (a & m, b & m);
    match op {
        0 | 2 => {
            let c = u64::from(op == 2 && cf);
            let r = a.wrapping_add(b).wrapping_add(c) & m;
            let wide = u128::from(a) + u128::from(b) + u128::from(c);
            let mut f = szp(size, r);
            if wide > u128::from(m) {
                f |= CF;
            }
            if (a ^ r) & (b ^ r) & sign(size) != 0 {
                f |= OF;
            }
            f |= (a ^ b ^ r) & AF;
            (r, f)
        }
        3 | 5 | 7 => {
            let c = u64::from(op == 3 && cf);
            let r = a.wrapping_sub(b).wrapping_sub(c) & m;
            let mut f = szp(size, r);
            if u128::from(a) < u128::from(b) + u128::from(c) {
                f |= CF;
            }
            if (a ^ b) & (a ^ r) & sign(size) != 0 {
                f |= OF;
            }
            f |= (a ^ b ^ r) & AF;
            (r, f)
        }
        1 => {
            let r = a | b;
            (r, szp(size, r))
        }
        4 => {
            let r = a & b;
            (r, szp(size, r))
        }
        _ => {
            let r = a ^ b;
            (r, szp(size, r))
        }
    }
}

impl Exec<'_> {
    #[inline]
    pub fn set_flags(&mut self, which: u64, f: u64) {
        self.cpu.rflags = (self.cpu.rflags & !which) | (f & which);
    }

    #[inline]
    pub fn flag(&self, f: u64) -> bool {
        self.cpu.rflags & f != 0
    }

    #[inline]
    pub fn rd_reg(&self, r: Register) -> u64 {
        let n = r as usize;
        let g = &self.cpu.gpr;
        match n {
            1..=4 => g[n - 1] & 0xff,
            5..=8 => (g[n - 5] >> 8) & 0xff,
            9..=20 => g[n - 5] & 0xff,
            21..=36 => g[n - 21] & 0xffff,
            37..=52 => g[n - 37] & 0xffff_ffff,
            53..=68 => g[n - 53],
            69 => self.cpu.rip & 0xffff_ffff,
            70 => self.cpu.rip,
            71..=76 => u64::from(self.cpu.seg[n - 71].selector),
            _ => 0,
        }
    }

    #[inline]
    pub fn wr_reg(&mut self, r: Register, v: u64) {
        let n = r as usize;
        let g = &mut self.cpu.gpr;
        match n {
            1..=4 => g[n - 1] = (g[n - 1] & !0xff) | (v & 0xff),
            5..=8 => g[n - 5] = (g[n - 5] & !0xff00) | ((v & 0xff) << 8),
            9..=20 => g[n - 5] = (g[n - 5] & !0xff) | (v & 0xff),
            21..=36 => g[n - 21] = (g[n - 21] & !0xffff) | (v & 0xffff),
            37..=52 => g[n - 37] = v & 0xffff_ffff,
            53..=68 => g[n - 53] = v,
            _ => {}
        }
    }

    /// Writes a GPR by encoding index with an operand size (32-bit writes zero-extend).
    #[inline]
    pub fn set_gpr_sized(&mut self, idx: usize, size: usize, v: u64) {
        let g = &mut self.cpu.gpr[idx & 15];
        *g = match size {
            1 => (*g & !0xff) | (v & 0xff),
            2 => (*g & !0xffff) | (v & 0xffff),
            4 => v & 0xffff_ffff,
            _ => v,
        };
    }

    /// Linear address of `off` in segment `s` (an iced segment register).
    #[inline(always)]
    pub fn seg_lin(&self, s: Register, off: u64) -> u64 {
        let idx = (s as usize).wrapping_sub(71);
        if self.cpu.mode64() {
            if idx == FS || idx == GS {
                self.cpu.seg[idx].base.wrapping_add(off)
            } else {
                off
            }
        } else {
            let base = self.cpu.seg.get(idx).map_or(0, |s| s.base);
            base.wrapping_add(off) & 0xffff_ffff
        }
    }

    /// The offset (effective address) of the memory operand.
    #[inline(always)]
    pub fn ea(&self, i: &Instruction) -> u64 {
        // The common long-mode forms first: a 64-bit base (+ a 64-bit index), or RIP-relative.
        let (b, x) = (i.memory_base() as usize, i.memory_index() as usize);
        let r64 = Register::RAX as usize..=Register::R15 as usize;
        if r64.contains(&b) {
            let mut a = i
                .memory_displacement64()
                .wrapping_add(self.cpu.gpr[b - Register::RAX as usize]);
            if r64.contains(&x) {
                let v = self.cpu.gpr[x - Register::RAX as usize];
                a = a.wrapping_add(v.wrapping_mul(u64::from(i.memory_index_scale())));
            } else if x != Register::None as usize {
                return self.ea_any(i);
            }
            return a;
        }
        if i.memory_base() == Register::RIP && x == Register::None as usize {
            return i.memory_displacement64();
        }
        self.ea_any(i)
    }

    /// `ea` for every addressing form.
    #[inline(never)]
    fn ea_any(&self, i: &Instruction) -> u64 {
        let base = i.memory_base();
        let index = i.memory_index();
        let mut a = i.memory_displacement64();
        let mut asz = 0;
        if base != Register::None {
            asz = reg_size(base);
            if base != Register::RIP && base != Register::EIP {
                a = a.wrapping_add(self.rd_reg(base));
            }
        }
        if index != Register::None {
            asz = reg_size(index);
            a = a.wrapping_add(
                self.rd_reg(index)
                    .wrapping_mul(u64::from(i.memory_index_scale())),
            );
        }
        if asz == 0 {
            let d = i.memory_displ_size() as usize;
            asz = if d >= 2 {
                d
            } else {
                (self.cpu.bitness() / 8) as usize
            };
        }
        a & mask(asz)
    }

    /// Linear address of the memory operand, with the 64-bit canonical check.
    #[inline(always)]
    pub fn mem_lin(&self, i: &Instruction) -> R<u64> {
        let seg = i.memory_segment();
        let lin = self.seg_lin(seg, self.ea(i));
        if self.cpu.mode64() && !canonical(lin) {
            let v = if seg == Register::SS { 12 } else { 13 };
            return Err(Exc::Fault(v, Some(0)));
        }
        Ok(lin)
    }

    pub fn op_size(&self, i: &Instruction, n: u32) -> usize {
        match i.op_kind(n) {
            OpKind::Register => reg_size(i.op_register(n)),
            OpKind::Memory => i.memory_size().size(),
            OpKind::Immediate8 | OpKind::Immediate8_2nd => 1,
            OpKind::Immediate16 | OpKind::Immediate8to16 => 2,
            OpKind::Immediate32 | OpKind::Immediate8to32 => 4,
            _ => 8,
        }
    }

    #[inline]
    pub fn loc(&self, i: &Instruction, n: u32) -> R<Loc> {
        match i.op_kind(n) {
            OpKind::Register => Ok(Loc::Reg(i.op_register(n))),
            OpKind::Memory => Ok(Loc::Mem(self.mem_lin(i)?)),
            _ => Err(Exc::unhandled("operand is not a location")),
        }
    }

    #[inline]
    pub fn rd_loc(&mut self, l: Loc, size: usize) -> R<u64> {
        match l {
            Loc::Reg(r) => Ok(self.rd_reg(r)),
            Loc::Mem(a) => self.read_lin(a, size),
        }
    }

    /// [`Exec::rd_loc`] of a read-modify-write destination (see `read_lin_rmw`).
    #[inline]
    pub fn rd_loc_rmw(&mut self, l: Loc, size: usize) -> R<u64> {
        match l {
            Loc::Reg(r) => Ok(self.rd_reg(r)),
            Loc::Mem(a) => self.read_lin_rmw(a, size),
        }
    }

    #[inline]
    pub fn wr_loc(&mut self, l: Loc, size: usize, v: u64) -> R<()> {
        match l {
            Loc::Reg(r) => {
                self.wr_reg(r, v);
                Ok(())
            }
            Loc::Mem(a) => self.write_lin(a, size, v & mask(size)),
        }
    }

    /// Reads operand `n` (register, memory or immediate).
    #[inline]
    pub fn rd(&mut self, i: &Instruction, n: u32) -> R<u64> {
        match i.op_kind(n) {
            OpKind::Register => Ok(self.rd_reg(i.op_register(n))),
            OpKind::Memory => {
                let a = self.mem_lin(i)?;
                self.read_lin(a, i.memory_size().size())
            }
            OpKind::Immediate8 => Ok(u64::from(i.immediate8())),
            OpKind::Immediate8_2nd => Ok(u64::from(i.immediate8_2nd())),
            OpKind::Immediate16 => Ok(u64::from(i.immediate16())),
            OpKind::Immediate32 => Ok(u64::from(i.immediate32())),
            OpKind::Immediate64 => Ok(i.immediate64()),
            OpKind::Immediate8to16 => Ok(i.immediate8to16() as u16 as u64),
            OpKind::Immediate8to32 => Ok(i.immediate8to32() as u32 as u64),
            OpKind::Immediate8to64 => Ok(i.immediate8to64() as u64),
            OpKind::Immediate32to64 => Ok(i.immediate32to64() as u64),
            _ => Err(Exc::unhandled("unsupported operand kind")),
        }
    }

    #[inline]
    pub fn wr(&mut self, i: &Instruction, n: u32, v: u64) -> R<()> {
        let l = self.loc(i, n)?;
        let size = self.op_size(i, n);
        self.wr_loc(l, size, v)
    }

    /// Stack address size in bytes.
    #[inline]
    pub fn stack_size(&self) -> usize {
        if self.cpu.mode64() {
            8
        } else if self.cpu.seg[SS].db {
            4
        } else {
            2
        }
    }

    #[inline]
    fn sp_lin(&self, sp: u64) -> u64 {
        if self.cpu.mode64() {
            sp
        } else {
            self.cpu.seg[SS].base.wrapping_add(sp) & 0xffff_ffff
        }
    }

    #[inline]
    pub fn set_sp(&mut self, v: u64) {
        let ss = self.stack_size();
        self.set_gpr_sized(4, ss, v);
    }

    pub fn push(&mut self, v: u64, size: usize) -> R<()> {
        let ss = self.stack_size();
        let sp = self.cpu.gpr[4].wrapping_sub(size as u64) & mask(ss);
        let lin = self.sp_lin(sp);
        self.write_lin(lin, size, v & mask(size))?;
        self.set_sp(sp);
        Ok(())
    }

    pub fn pop(&mut self, size: usize) -> R<u64> {
        let v = self.peek(0, size)?;
        let ss = self.stack_size();
        let sp = self.cpu.gpr[4].wrapping_add(size as u64);
        self.set_gpr_sized(4, ss, sp);
        Ok(v)
    }

    /// Reads the stack at RSP + `off` without popping.
    pub fn peek(&mut self, off: u64, size: usize) -> R<u64> {
        let ss = self.stack_size();
        let sp = self.cpu.gpr[4].wrapping_add(off) & mask(ss);
        let lin = self.sp_lin(sp);
        self.read_lin(lin, size)
    }

    pub fn cond(&self, cc: ConditionCode) -> bool {
        let f = self.cpu.rflags;
        let c = f & CF != 0;
        let z = f & ZF != 0;
        let s = f & SF != 0;
        let o = f & OF != 0;
        let p = f & PF != 0;
        match cc {
            ConditionCode::o => o,
            ConditionCode::no => !o,
            ConditionCode::b => c,
            ConditionCode::ae => !c,
            ConditionCode::e => z,
            ConditionCode::ne => !z,
            ConditionCode::be => c || z,
            ConditionCode::a => !c && !z,
            ConditionCode::s => s,
            ConditionCode::ns => !s,
            ConditionCode::p => p,
            ConditionCode::np => !p,
            ConditionCode::l => s != o,
            ConditionCode::ge => s == o,
            ConditionCode::le => z || s != o,
            ConditionCode::g => !z && s == o,
            _ => true,
        }
    }

    /// Mask of the instruction pointer for the current code size.
    #[inline]
    pub fn ip_mask(&self) -> u64 {
        match self.cpu.bitness() {
            64 => u64::MAX,
            32 => 0xffff_ffff,
            _ => 0xffff,
        }
    }

    pub fn jump(&mut self, target: u64) -> R<()> {
        let t = target & self.ip_mask();
        if self.cpu.mode64() && !canonical(t) {
            return gp0();
        }
        self.cpu.rip = t;
        Ok(())
    }

    /// Whether the VM's CPU model shows `f`; an instruction of a family the model does not show
    /// raises #UD (`if !self.has(F) { return ud(); }`).
    #[inline]
    pub fn has(&self, f: hv::cpu_model::Feature) -> bool {
        self.vm.features.contains(f)
    }

    fn unhandled(&self, i: &Instruction) -> Exc {
        Exc::unhandled(format!("{:?}", i.mnemonic()))
    }

    /// Executes one decoded instruction. RIP already points past it.
    pub fn exec(&mut self, i: &Instruction) -> R<()> {
        if i.encoding() != iced_x86::EncodingKind::Legacy {
            // VEX: BMI1/BMI2 on general registers (ext.rs); AVX, AVX2, FMA, F16C (avx.rs).
            // EVEX/XOP/3DNow!: in no model we present.
            if i.encoding() != iced_x86::EncodingKind::VEX {
                return ud();
            }
            if let Some(r) = self.exec_vex_gpr(i) {
                return r;
            }
            return self.exec_vex(i);
        }
        let mn = i.mnemonic();
        match mn {
            M::Mov => {
                let size = self.op_size(i, 0);
                match (i.op_kind(0), i.op_kind(1)) {
                    (OpKind::Register, OpKind::Register) if is_sreg(i.op_register(0)) => {
                        let v = self.rd_reg(i.op_register(1));
                        self.mov_sreg(i.op_register(0), v as u16)
                    }
                    (OpKind::Memory, OpKind::Register) if is_sreg(i.op_register(1)) => {
                        let v = self.rd_reg(i.op_register(1));
                        let a = self.mem_lin(i)?;
                        self.write_lin(a, 2, v)
                    }
                    (OpKind::Register, OpKind::Memory) if is_sreg(i.op_register(0)) => {
                        let a = self.mem_lin(i)?;
                        let v = self.read_lin(a, 2)?;
                        self.mov_sreg(i.op_register(0), v as u16)
                    }
                    (OpKind::Register, OpKind::Register)
                        if is_cr(i.op_register(0)) || is_cr(i.op_register(1)) =>
                    {
                        self.mov_cr(i)
                    }
                    (OpKind::Register, OpKind::Register)
                        if is_dr(i.op_register(0)) || is_dr(i.op_register(1)) =>
                    {
                        self.mov_dr(i)
                    }
                    (OpKind::Register, OpKind::Register) if is_sreg(i.op_register(1)) => {
                        // mov r32/r64, sreg zero-extends.
                        let v = self.rd_reg(i.op_register(1));
                        let r = i.op_register(0);
                        let idx = gpr_index(r);
                        self.set_gpr_sized(idx, reg_size(r).clamp(4, 8), v);
                        if reg_size(r) == 2 {
                            self.wr_reg(r, v);
                        }
                        Ok(())
                    }
                    _ => {
                        let v = self.rd(i, 1)?;
                        self.wr(i, 0, v & mask(size))
                    }
                }
            }
            M::Movzx => {
                let v = self.rd(i, 1)?;
                self.wr(i, 0, v)
            }
            M::Movsx | M::Movsxd => {
                let s = self.op_size(i, 1);
                let d = self.op_size(i, 0);
                let v = sx(self.rd(i, 1)?, s);
                self.wr(i, 0, v & mask(d))
            }
            M::Lea => {
                let v = self.ea(i);
                let d = self.op_size(i, 0);
                self.wr(i, 0, v & mask(d))
            }
            M::Add | M::Or | M::Adc | M::Sbb | M::And | M::Sub | M::Xor | M::Cmp => {
                let op = match mn {
                    M::Add => 0,
                    M::Or => 1,
                    M::Adc => 2,
                    M::Sbb => 3,
                    M::And => 4,
                    M::Sub => 5,
                    M::Xor => 6,
                    _ => 7,
                };
                let size = self.op_size(i, 0);
                let b = self.rd(i, 1)? & mask(size);
                let cf = self.flag(CF);
                let l = self.loc(i, 0)?;
                let a = if let (Loc::Mem(a), true) = (l, i.has_lock_prefix() && op != 7) {
                    self.locked_rmw(a, size, |x| Some(alu(op, size, x, b, cf).0))?
                } else if op == 7 {
                    self.rd_loc(l, size)?
                } else {
                    let a = self.rd_loc_rmw(l, size)?;
                    let r = alu(op, size, a, b, cf).0;
                    self.wr_loc(l, size, r)?;
                    a
                };
                let f = alu(op, size, a, b, cf).1;
                self.set_flags(ARITH_FLAGS, f);
                Ok(())
            }
            M::Test => {
                let size = self.op_size(i, 0);
                let a = self.rd(i, 0)?;
                let b = self.rd(i, 1)?;
                let f = alu(4, size, a, b, false).1;
                self.set_flags(ARITH_FLAGS, f);
                Ok(())
            }
            M::Inc | M::Dec | M::Neg | M::Not => {
                let size = self.op_size(i, 0);
                let l = self.loc(i, 0)?;
                let f = move |x: u64| -> u64 {
                    match mn {
                        M::Inc => x.wrapping_add(1),
                        M::Dec => x.wrapping_sub(1),
                        M::Neg => x.wrapping_neg(),
                        _ => !x,
                    }
                };
                let a = if let (Loc::Mem(a), true) = (l, i.has_lock_prefix()) {
                    self.locked_rmw(a, size, |x| Some(f(x) & mask(size)))?
                } else {
                    let a = self.rd_loc_rmw(l, size)?;
                    self.wr_loc(l, size, f(a) & mask(size))?;
                    a
                };
                match mn {
                    M::Inc => {
                        let fl = alu(0, size, a, 1, false).1;
                        self.set_flags(ARITH_FLAGS & !CF, fl);
                    }
                    M::Dec => {
                        let fl = alu(5, size, a, 1, false).1;
                        self.set_flags(ARITH_FLAGS & !CF, fl);
                    }
                    M::Neg => {
                        let fl = alu(5, size, 0, a, false).1;
                        self.set_flags(ARITH_FLAGS, fl);
                    }
                    _ => {}
                }
                Ok(())
            }
            M::Xchg => {
                let size = self.op_size(i, 0);
                let l0 = self.loc(i, 0)?;
                let l1 = self.loc(i, 1)?;
                match (l0, l1) {
                    (Loc::Mem(a), Loc::Reg(r)) | (Loc::Reg(r), Loc::Mem(a)) => {
                        let v = self.rd_reg(r) & mask(size);
                        let old = self.locked_rmw(a, size, |_| Some(v))?;
                        self.wr_reg(r, old);
                    }
                    (Loc::Reg(a), Loc::Reg(b)) => {
                        let va = self.rd_reg(a);
                        let vb = self.rd_reg(b);
                        self.wr_reg(a, vb);
                        self.wr_reg(b, va);
                    }
                    _ => return Err(self.unhandled(i)),
                }
                Ok(())
            }
            M::Xadd => {
                let size = self.op_size(i, 0);
                let l = self.loc(i, 0)?;
                let r = i.op_register(1);
                let b = self.rd_reg(r) & mask(size);
                let a = if let Loc::Mem(a) = l {
                    if i.has_lock_prefix() {
                        self.locked_rmw(a, size, |x| Some(x.wrapping_add(b) & mask(size)))?
                    } else {
                        let a0 = self.read_lin_rmw(a, size)?;
                        self.write_lin(a, size, a0.wrapping_add(b) & mask(size))?;
                        a0
                    }
                } else {
                    let a0 = self.rd_loc(l, size)?;
                    self.wr_loc(l, size, a0.wrapping_add(b) & mask(size))?;
                    a0
                };
                self.wr_reg(r, a);
                if let Loc::Reg(d) = l {
                    self.wr_reg(d, a.wrapping_add(b) & mask(size));
                }
                let f = alu(0, size, a, b, false).1;
                self.set_flags(ARITH_FLAGS, f);
                Ok(())
            }
            M::Cmpxchg => {
                let size = self.op_size(i, 0);
                let l = self.loc(i, 0)?;
                let src = self.rd_reg(i.op_register(1)) & mask(size);
                let acc = self.cpu.gpr[0] & mask(size);
                let old = match l {
                    Loc::Mem(a) => self.locked_rmw(a, size, |x| (x == acc).then_some(src))?,
                    Loc::Reg(r) => {
                        let x = self.rd_reg(r);
                        if x == acc {
                            self.wr_reg(r, src);
                        }
                        x
                    }
                };
                let f = alu(7, size, acc, old, false).1;
                self.set_flags(ARITH_FLAGS, f);
                if old != acc {
                    self.set_gpr_sized(0, size, old);
                }
                Ok(())
            }
            M::Cmpxchg8b => {
                let a = self.mem_lin(i)?;
                let cmp = (self.cpu.gpr[0] & 0xffff_ffff) | (self.cpu.gpr[2] << 32);
                let new = (self.cpu.gpr[3] & 0xffff_ffff) | (self.cpu.gpr[1] << 32);
                let old = self.locked_rmw(a, 8, |x| (x == cmp).then_some(new))?;
                if old == cmp {
                    self.cpu.rflags |= ZF;
                } else {
                    self.cpu.rflags &= !ZF;
                    self.cpu.gpr[0] = old & 0xffff_ffff;
                    self.cpu.gpr[2] = old >> 32;
                }
                Ok(())
            }
            M::Cmpxchg16b => self.cmpxchg16b(i),
            M::Push => {
                let size = (-i.stack_pointer_increment()) as usize;
                let v = self.rd(i, 0)?;
                self.push(v, size)
            }
            M::Pop => {
                let size = i.stack_pointer_increment() as usize;
                if i.op_kind(0) == OpKind::Register && is_sreg(i.op_register(0)) {
                    let v = self.peek(0, size)?;
                    self.mov_sreg(i.op_register(0), v as u16)?;
                    self.pop(size)?;
                    return Ok(());
                }
                let v = self.peek(0, size)?;
                // pop [rsp+x] computes the address after the increment.
                let ss = self.stack_size();
                let old_sp = self.cpu.gpr[4];
                self.set_gpr_sized(4, ss, old_sp.wrapping_add(size as u64));
                if let Err(e) = self.wr(i, 0, v) {
                    self.cpu.gpr[4] = old_sp;
                    return Err(e);
                }
                Ok(())
            }
            M::Pushf | M::Pushfd | M::Pushfq => {
                if self.cpu.rflags & VM != 0 && (self.cpu.rflags & IOPL) != IOPL {
                    return gp0();
                }
                let size = (-i.stack_pointer_increment()) as usize;
                let v = self.cpu.rflags & !(VM | RF);
                self.push(v, size)
            }
            M::Popf | M::Popfd | M::Popfq => {
                let size = i.stack_pointer_increment() as usize;
                let v = self.peek(0, size)?;
                self.pop(size)?;
                let mut writable = FLAGS_WRITABLE;
                if self.cpu.cpl != 0 {
                    writable &= !IOPL;
                    if u64::from(self.cpu.cpl) > (self.cpu.rflags & IOPL) >> 12 {
                        writable &= !IF;
                    }
                }
                if size == 2 {
                    writable &= 0xffff;
                }
                self.cpu.rflags = ((self.cpu.rflags & !writable) | (v & writable)) | 2;
                self.cpu.irq_check = true;
                Ok(())
            }
            M::Pushad | M::Pusha => {
                let size = if mn == M::Pushad { 4 } else { 2 };
                let sp = self.cpu.gpr[4];
                for r in 0..8 {
                    let v = if r == 4 { sp } else { self.cpu.gpr[r] };
                    self.push(v, size)?;
                }
                Ok(())
            }
            M::Popad | M::Popa => {
                let size = if mn == M::Popad { 4 } else { 2 };
                for r in (0..8).rev() {
                    let v = self.pop(size)?;
                    if r != 4 {
                        self.set_gpr_sized(r, size, v);
                    }
                }
                Ok(())
            }
            M::Cbw => {
                let v = sx(self.cpu.gpr[0], 1);
                self.set_gpr_sized(0, 2, v);
                Ok(())
            }
            M::Cwde => {
                let v = sx(self.cpu.gpr[0], 2);
                self.set_gpr_sized(0, 4, v);
                Ok(())
            }
            M::Cdqe => {
                self.cpu.gpr[0] = sx(self.cpu.gpr[0], 4);
                Ok(())
            }
            M::Cwd | M::Cdq | M::Cqo => {
                let size = match mn {
                    M::Cwd => 2,
                    M::Cdq => 4,
                    _ => 8,
                };
                let v = if self.cpu.gpr[0] & sign(size) != 0 {
                    u64::MAX
                } else {
                    0
                };
                self.set_gpr_sized(2, size, v);
                Ok(())
            }
            M::Cmovo
            | M::Cmovno
            | M::Cmovb
            | M::Cmovae
            | M::Cmove
            | M::Cmovne
            | M::Cmovbe
            | M::Cmova
            | M::Cmovs
            | M::Cmovns
            | M::Cmovp
            | M::Cmovnp
            | M::Cmovl
            | M::Cmovge
            | M::Cmovle
            | M::Cmovg => {
                let v = self.rd(i, 1)?;
                let size = self.op_size(i, 0);
                if self.cond(i.condition_code()) {
                    self.wr(i, 0, v)
                } else if size == 4 {
                    // A 32-bit cmov zero-extends its destination even when false.
                    let r = i.op_register(0);
                    let cur = self.rd_reg(r);
                    self.wr_reg(r, cur);
                    Ok(())
                } else {
                    Ok(())
                }
            }
            M::Seto
            | M::Setno
            | M::Setb
            | M::Setae
            | M::Sete
            | M::Setne
            | M::Setbe
            | M::Seta
            | M::Sets
            | M::Setns
            | M::Setp
            | M::Setnp
            | M::Setl
            | M::Setge
            | M::Setle
            | M::Setg => {
                let v = u64::from(self.cond(i.condition_code()));
                self.wr(i, 0, v)
            }
            M::Jo
            | M::Jno
            | M::Jb
            | M::Jae
            | M::Je
            | M::Jne
            | M::Jbe
            | M::Ja
            | M::Js
            | M::Jns
            | M::Jp
            | M::Jnp
            | M::Jl
            | M::Jge
            | M::Jle
            | M::Jg => {
                if self.cond(i.condition_code()) {
                    self.jump(i.near_branch_target())?;
                }
                Ok(())
            }
            M::Jmp => match i.op_kind(0) {
                OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                    self.jump(i.near_branch_target())
                }
                OpKind::FarBranch16 | OpKind::FarBranch32 => {
                    let off = if i.op_kind(0) == OpKind::FarBranch16 {
                        u64::from(i.far_branch16())
                    } else {
                        u64::from(i.far_branch32())
                    };
                    self.far_jump(i.far_branch_selector(), off)
                }
                OpKind::Memory if i.is_jmp_far_indirect() => {
                    let a = self.mem_lin(i)?;
                    let osz = i.memory_size().size() - 2;
                    let off = self.read_lin(a, osz)?;
                    let sel = self.read_lin(a.wrapping_add(osz as u64), 2)?;
                    self.far_jump(sel as u16, off)
                }
                _ => {
                    let t = self.rd(i, 0)?;
                    self.jump(t)
                }
            },
            M::Call => {
                let size = (-i.stack_pointer_increment()) as usize;
                match i.op_kind(0) {
                    OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                        let ret = self.cpu.rip;
                        self.push(ret, size)?;
                        self.jump(i.near_branch_target())
                    }
                    OpKind::FarBranch16 | OpKind::FarBranch32 | OpKind::Memory
                        if i.is_call_far() || i.is_call_far_indirect() =>
                    {
                        self.far_call(i)
                    }
                    _ => {
                        let t = self.rd(i, 0)?;
                        let sp = self.cpu.gpr[4];
                        let ret = self.cpu.rip;
                        self.push(ret, size)?;
                        if let Err(e) = self.jump(t) {
                            self.cpu.gpr[4] = sp;
                            return Err(e);
                        }
                        Ok(())
                    }
                }
            }
            M::Ret => {
                let imm = if i.op_count() == 1 {
                    u64::from(i.immediate16())
                } else {
                    0
                };
                let size = (i.stack_pointer_increment() as u64).wrapping_sub(imm) as usize;
                let size = if matches!(size, 2 | 4 | 8) { size } else { 8 };
                let t = self.peek(0, size)?;
                self.jump(t)?;
                let ss = self.stack_size();
                let sp = self.cpu.gpr[4].wrapping_add(size as u64 + imm);
                self.set_gpr_sized(4, ss, sp);
                Ok(())
            }
            M::Retf => self.far_ret(i),
            M::Iret | M::Iretd | M::Iretq => self.iret(i),
            M::Leave => {
                let size = i.stack_pointer_increment() as usize;
                let size = if matches!(size, 2 | 4 | 8) { size } else { 8 };
                let ss = self.stack_size();
                let bp = self.cpu.gpr[5];
                let old_sp = self.cpu.gpr[4];
                self.set_gpr_sized(4, ss, bp);
                match self.pop(size) {
                    Ok(v) => {
                        self.set_gpr_sized(5, size, v);
                        Ok(())
                    }
                    Err(e) => {
                        self.cpu.gpr[4] = old_sp;
                        Err(e)
                    }
                }
            }
            M::Enter => {
                let alloc = u64::from(i.immediate16());
                let level = i.immediate8_2nd() & 31;
                if level != 0 {
                    return Err(Exc::unhandled("enter with nesting level"));
                }
                let size = if self.cpu.mode64() {
                    8
                } else {
                    self.stack_size()
                };
                let bp = self.cpu.gpr[5];
                self.push(bp, size)?;
                let frame = self.cpu.gpr[4];
                self.set_gpr_sized(5, size, frame);
                let ss = self.stack_size();
                self.set_gpr_sized(4, ss, frame.wrapping_sub(alloc));
                Ok(())
            }
            M::Loop | M::Loope | M::Loopne | M::Jcxz | M::Jecxz | M::Jrcxz => {
                let asz = match mn {
                    M::Jcxz => 2,
                    M::Jecxz => 4,
                    M::Jrcxz => 8,
                    _ => loop_addr_size(i),
                };
                let c = self.cpu.gpr[1] & mask(asz);
                let take = match mn {
                    M::Jcxz | M::Jecxz | M::Jrcxz => c == 0,
                    _ => {
                        let c = c.wrapping_sub(1) & mask(asz);
                        self.set_gpr_sized(1, asz, c);
                        c != 0
                            && match mn {
                                M::Loope => self.flag(ZF),
                                M::Loopne => !self.flag(ZF),
                                _ => true,
                            }
                    }
                };
                if take {
                    self.jump(i.near_branch_target())?;
                }
                Ok(())
            }
            M::Mul | M::Imul if i.op_count() == 1 => self.mul1(i),
            M::Imul => {
                let size = self.op_size(i, 0);
                let (a, b) = if i.op_count() == 3 {
                    (self.rd(i, 1)?, self.rd(i, 2)?)
                } else {
                    (self.rd(i, 0)?, self.rd(i, 1)?)
                };
                let p = i128::from(sx(a, size) as i64) * i128::from(sx(b, size) as i64);
                let r = (p as u64) & mask(size);
                let overflow = i128::from(sx(r, size) as i64) != p;
                self.wr(i, 0, r)?;
                let mut f = szp(size, r);
                if overflow {
                    f |= CF | OF;
                }
                self.set_flags(ARITH_FLAGS, f);
                Ok(())
            }
            M::Div | M::Idiv => self.div(i),
            M::Shl | M::Sal | M::Shr | M::Sar | M::Rol | M::Ror | M::Rcl | M::Rcr => self.shift(i),
            M::Shld | M::Shrd => self.shld(i),
            M::Bt | M::Bts | M::Btr | M::Btc => self.bt(i),
            M::Bsf | M::Bsr => {
                let size = self.op_size(i, 0);
                let v = self.rd(i, 1)? & mask(size);
                if v == 0 {
                    self.cpu.rflags |= ZF;
                } else {
                    self.cpu.rflags &= !ZF;
                    let r = if mn == M::Bsf {
                        v.trailing_zeros()
                    } else {
                        63 - v.leading_zeros()
                    };
                    self.wr(i, 0, u64::from(r))?;
                }
                Ok(())
            }
            M::Popcnt => {
                if !self.has(hv::cpu_model::Feature::Popcnt) {
                    return ud();
                }
                let size = self.op_size(i, 0);
                let v = self.rd(i, 1)? & mask(size);
                self.wr(i, 0, u64::from(v.count_ones()))?;
                let f = if v == 0 { ZF } else { 0 };
                self.set_flags(ARITH_FLAGS, f);
                Ok(())
            }
            M::Bswap => {
                let r = i.op_register(0);
                let size = reg_size(r);
                let v = self.rd_reg(r);
                let out = match size {
                    4 => u64::from((v as u32).swap_bytes()),
                    8 => v.swap_bytes(),
                    _ => 0, // 16-bit BSWAP is undefined; zero like most CPUs.
                };
                self.wr_reg(r, out);
                Ok(())
            }
            M::Lahf => {
                let v = (self.cpu.rflags & (SF | ZF | AF | PF | CF)) | 2;
                self.wr_reg(Register::AH, v);
                Ok(())
            }
            M::Sahf => {
                let ah = self.rd_reg(Register::AH);
                self.set_flags(SF | ZF | AF | PF | CF, ah);
                Ok(())
            }
            M::Clc => {
                self.cpu.rflags &= !CF;
                Ok(())
            }
            M::Stc => {
                self.cpu.rflags |= CF;
                Ok(())
            }
            M::Cmc => {
                self.cpu.rflags ^= CF;
                Ok(())
            }
            M::Cld => {
                self.cpu.rflags &= !DF;
                Ok(())
            }
            M::Std => {
                self.cpu.rflags |= DF;
                Ok(())
            }
            M::Cli => {
                self.check_iopl()?;
                self.cpu.rflags &= !IF;
                Ok(())
            }
            M::Sti => {
                self.check_iopl()?;
                if self.cpu.rflags & IF == 0 {
                    self.cpu.shadow |= 1;
                }
                self.cpu.rflags |= IF;
                self.cpu.irq_check = true;
                Ok(())
            }
            M::Nop | M::Pause | M::Endbr64 | M::Endbr32 | M::Lfence | M::Mfence | M::Sfence => {
                Ok(())
            }
            M::Prefetch
            | M::Prefetchnta
            | M::Prefetcht0
            | M::Prefetcht1
            | M::Prefetcht2
            | M::Prefetchw => Ok(()),
            M::Ud0 | M::Ud1 | M::Ud2 => ud(),
            M::Xlatb => {
                let off = self.cpu.gpr[3].wrapping_add(self.cpu.gpr[0] & 0xff);
                let asz = if self.cpu.mode64() { 8 } else { 4 };
                let a = self.seg_lin(i.memory_segment(), off & mask(asz));
                let v = self.read_lin(a, 1)?;
                self.set_gpr_sized(0, 1, v);
                Ok(())
            }
            M::Xgetbv | M::Xsetbv | M::Xsave | M::Xsave64 | M::Xrstor | M::Xrstor64 => {
                self.exec_xsave(i)
            }
            M::Xsaveopt | M::Xsaveopt64 | M::Xsavec | M::Xsavec64 => self.exec_xsave(i),
            M::Xsaves | M::Xsaves64 | M::Xrstors | M::Xrstors64 => ud(),
            M::Monitor | M::Mwait | M::Monitorx | M::Mwaitx => ud(),
            // Features the portable model does not have (SMAP, PKU, SERIALIZE, VMX/SVM):
            // #UD, as on a CPU without them. A guest that saw SMAP on another host gets #UD
            // here, like it would after migrating to such a CPU.
            M::Clac | M::Stac | M::Rdpkru | M::Wrpkru | M::Serialize => ud(),
            M::Vmcall | M::Vmmcall | M::Vmlaunch | M::Vmresume | M::Vmxoff | M::Vmrun => ud(),
            M::Movnti => {
                let v = self.rd(i, 1)?;
                self.wr(i, 0, v)
            }
            M::Movsb
            | M::Movsw
            | M::Movsq
            | M::Stosb
            | M::Stosw
            | M::Stosd
            | M::Stosq
            | M::Lodsb
            | M::Lodsw
            | M::Lodsd
            | M::Lodsq
            | M::Scasb
            | M::Scasw
            | M::Scasd
            | M::Scasq
            | M::Cmpsb
            | M::Cmpsw
            | M::Cmpsq
            | M::Insb
            | M::Insw
            | M::Insd
            | M::Outsb
            | M::Outsw
            | M::Outsd => self.string(i),
            // String MOVSD/CMPSD (not the SSE scalar-double forms of the same mnemonic).
            M::Movsd | M::Cmpsd if is_string_op(i) => self.string(i),
            // Scalar and crypto extensions (ext.rs), then system instructions.
            _ => match self.exec_ext(i) {
                Some(r) => r,
                None => self.exec_system(i),
            },
        }
    }

    fn check_iopl(&self) -> R<()> {
        if self.cpu.protected() && u64::from(self.cpu.cpl) > (self.cpu.rflags & IOPL) >> 12 {
            return gp0();
        }
        Ok(())
    }

    fn mul1(&mut self, i: &Instruction) -> R<()> {
        let size = self.op_size(i, 0);
        let src = self.rd(i, 0)? & mask(size);
        let a = self.cpu.gpr[0] & mask(size);
        let signed = i.mnemonic() == M::Imul;
        let (lo, hi, overflow) = if signed {
            let p = i128::from(sx(a, size) as i64) * i128::from(sx(src, size) as i64);
            let lo = (p as u64) & mask(size);
            let hi = ((p >> (size * 8)) as u64) & mask(size);
            (lo, hi, i128::from(sx(lo, size) as i64) != p)
        } else {
            let p = u128::from(a) * u128::from(src);
            let lo = (p as u64) & mask(size);
            let hi = ((p >> (size * 8)) as u64) & mask(size);
            (lo, hi, hi != 0)
        };
        if size == 1 {
            self.set_gpr_sized(0, 2, lo | (hi << 8));
        } else {
            self.set_gpr_sized(0, size, lo);
            self.set_gpr_sized(2, size, hi);
        }
        let mut f = szp(size, lo);
        if overflow {
            f |= CF | OF;
        }
        self.set_flags(ARITH_FLAGS, f);
        Ok(())
    }

    fn div(&mut self, i: &Instruction) -> R<()> {
        let size = self.op_size(i, 0);
        let d = self.rd(i, 0)? & mask(size);
        if d == 0 {
            return Err(Exc::Fault(0, None));
        }
        let bits = size * 8;
        let (lo, hi) = if size == 1 {
            (self.cpu.gpr[0] & 0xff, (self.cpu.gpr[0] >> 8) & 0xff)
        } else {
            (self.cpu.gpr[0] & mask(size), self.cpu.gpr[2] & mask(size))
        };
        let n = (u128::from(hi) << bits) | u128::from(lo);
        let (q, r) = if i.mnemonic() == M::Div {
            let q = n / u128::from(d);
            if q > u128::from(mask(size)) {
                return Err(Exc::Fault(0, None));
            }
            (q as u64, (n % u128::from(d)) as u64)
        } else {
            // Sign-extend the 2*size dividend.
            let total = bits * 2;
            let n = if total == 128 {
                n as i128
            } else {
                ((n << (128 - total)) as i128) >> (128 - total)
            };
            let d = i128::from(sx(d, size) as i64);
            if d == -1 && n == i128::MIN {
                return Err(Exc::Fault(0, None));
            }
            let q = n / d;
            let r = n % d;
            let min = -(1i128 << (bits - 1));
            let max = (1i128 << (bits - 1)) - 1;
            if q < min || q > max {
                return Err(Exc::Fault(0, None));
            }
            ((q as u64) & mask(size), (r as u64) & mask(size))
        };
        if size == 1 {
            self.set_gpr_sized(0, 2, q | (r << 8));
        } else {
            self.set_gpr_sized(0, size, q);
            self.set_gpr_sized(2, size, r);
        }
        Ok(())
    }

    fn shift(&mut self, i: &Instruction) -> R<()> {
        let size = self.op_size(i, 0);
        let cnt_mask = if size == 8 { 63 } else { 31 };
        let count = if i.op_count() > 1 {
            (self.rd(i, 1)? as u32) & cnt_mask
        } else {
            1
        };
        let l = self.loc(i, 0)?;
        let a = self.rd_loc_rmw(l, size)? & mask(size);
        if count == 0 {
            return self.write_back_count0(l, size, a);
        }
        let cf_in = self.flag(CF);
        let (r, flags, which) = shift_value(i.mnemonic(), size, a, count, cf_in);
        self.wr_loc(l, size, r)?;
        self.set_flags(which, flags);
        Ok(())
    }

    /// A shift or rotate whose masked count is 0 changes no flag and no memory, but a 32-bit
    /// register destination is still written: its upper half is cleared (as the CPU does).
    fn write_back_count0(&mut self, l: Loc, size: usize, a: u64) -> R<()> {
        match l {
            Loc::Reg(_) if size == 4 => self.wr_loc(l, size, a),
            _ => Ok(()),
        }
    }

    fn shld(&mut self, i: &Instruction) -> R<()> {
        let size = self.op_size(i, 0);
        let bits = (size * 8) as u32;
        let count = (self.rd(i, 2)? as u32) & if size == 8 { 63 } else { 31 };
        let l = self.loc(i, 0)?;
        let a = self.rd_loc_rmw(l, size)? & mask(size);
        let b = self.rd(i, 1)? & mask(size);
        if count == 0 {
            return self.write_back_count0(l, size, a);
        }
        let m = mask(size);
        let (r, cf) = if i.mnemonic() == M::Shld {
            let wide = (u128::from(a) << bits) | u128::from(b);
            let r = ((wide << count) >> bits) as u64 & m;
            let cf = (wide >> (2 * bits - count)) & 1 != 0;
            (r, cf)
        } else {
            let wide = (u128::from(b) << bits) | u128::from(a);
            let r = (wide >> count) as u64 & m;
            let cf = (wide >> (count - 1)) & 1 != 0;
            (r, cf)
        };
        self.wr_loc(l, size, r)?;
        let mut f = szp(size, r);
        if cf {
            f |= CF;
        }
        if (a ^ r) & sign(size) != 0 {
            f |= OF;
        }
        self.set_flags(ARITH_FLAGS, f);
        Ok(())
    }

    fn bt(&mut self, i: &Instruction) -> R<()> {
        let size = self.op_size(i, 0);
        let bits = (size * 8) as u64;
        let src_is_imm = i.op_kind(1) != OpKind::Register;
        let off = self.rd(i, 1)?;
        let mn = i.mnemonic();
        let apply = move |v: u64, bit: u64| -> u64 {
            match mn {
                M::Bts => v | (1 << bit),
                M::Btr => v & !(1 << bit),
                M::Btc => v ^ (1 << bit),
                _ => v,
            }
        };
        let (old, bit) = match self.loc(i, 0)? {
            Loc::Reg(r) => {
                let bit = off & (bits - 1);
                let v = self.rd_reg(r);
                if mn != M::Bt {
                    self.wr_reg(r, apply(v, bit) & mask(size));
                }
                (v, bit)
            }
            Loc::Mem(a) => {
                let (addr, bit) = if src_is_imm {
                    (a, off & (bits - 1))
                } else {
                    let s = sx(off, size) as i64;
                    let word = s.div_euclid(bits as i64);
                    let bit = s.rem_euclid(bits as i64) as u64;
                    (a.wrapping_add((word * size as i64) as u64), bit)
                };
                let addr = if self.cpu.mode64() {
                    addr
                } else {
                    addr & 0xffff_ffff
                };
                let v = if mn == M::Bt {
                    self.read_lin(addr, size)?
                } else if i.has_lock_prefix() {
                    self.locked_rmw(addr, size, |x| Some(apply(x, bit)))?
                } else {
                    let v = self.read_lin_rmw(addr, size)?;
                    self.write_lin(addr, size, apply(v, bit) & mask(size))?;
                    v
                };
                (v, bit)
            }
        };
        if (old >> bit) & 1 != 0 {
            self.cpu.rflags |= CF;
        } else {
            self.cpu.rflags &= !CF;
        }
        Ok(())
    }

    fn cmpxchg16b(&mut self, i: &Instruction) -> R<()> {
        let a = self.mem_lin(i)?;
        if a & 15 != 0 {
            return gp0();
        }
        let vm = self.vm;
        let _g = crate::vm::lock(&vm.atomic_lock);
        self.probe_write(a, 16)?;
        let old = self.read_u128(a)?;
        let cmp = u128::from(self.cpu.gpr[0]) | (u128::from(self.cpu.gpr[2]) << 64);
        if old == cmp {
            let new = u128::from(self.cpu.gpr[3]) | (u128::from(self.cpu.gpr[1]) << 64);
            self.write_u128(a, new)?;
            self.cpu.rflags |= ZF;
        } else {
            self.cpu.rflags &= !ZF;
            self.cpu.gpr[0] = old as u64;
            self.cpu.gpr[2] = (old >> 64) as u64;
        }
        Ok(())
    }
}

/// Result, flags and the mask of flags changed of SHL/SAL/SHR/SAR/ROL/ROR/RCL/RCR of the
/// `size`-byte value `a` by a masked, non-zero `count`.
#[inline]
pub fn shift_value(mn: M, size: usize, a: u64, count: u32, cf_in: bool) -> (u64, u64, u64) {
    let bits = (size * 8) as u32;
    let m = mask(size);
    let sb = sign(size);
    let cf_in = u64::from(cf_in);
    match mn {
        M::Shl | M::Sal => {
            let r = if count >= bits { 0 } else { (a << count) & m };
            let cf = if count > bits {
                false
            } else {
                (a >> (bits - count)) & 1 != 0
            };
            let mut f = szp(size, r);
            if cf {
                f |= CF;
            }
            if ((r & sb != 0) as u64 ^ cf as u64) != 0 {
                f |= OF;
            }
            (r, f, ARITH_FLAGS)
        }
        M::Shr => {
            let r = if count >= bits { 0 } else { a >> count };
            let cf = count <= bits && (a >> (count - 1)) & 1 != 0;
            let mut f = szp(size, r);
            if cf {
                f |= CF;
            }
            if a & sb != 0 {
                f |= OF;
            }
            (r, f, ARITH_FLAGS)
        }
        M::Sar => {
            let s = sx(a, size) as i64;
            let c = count.min(63);
            let r = ((s >> c) as u64) & m;
            let cf = ((s >> (c - 1).min(63)) & 1) != 0;
            let mut f = szp(size, r);
            if cf {
                f |= CF;
            }
            (r, f, ARITH_FLAGS)
        }
        M::Rol => {
            let c = count % bits;
            let r = if c == 0 {
                a
            } else {
                ((a << c) | (a >> (bits - c))) & m
            };
            let cf = r & 1 != 0;
            let mut f = if cf { CF } else { 0 };
            if ((r & sb != 0) as u64 ^ cf as u64) != 0 {
                f |= OF;
            }
            (r, f, CF | OF)
        }
        M::Ror => {
            let c = count % bits;
            let r = if c == 0 {
                a
            } else {
                ((a >> c) | (a << (bits - c))) & m
            };
            let cf = r & sb != 0;
            let mut f = if cf { CF } else { 0 };
            if ((r & sb != 0) as u64 ^ ((r & (sb >> 1)) != 0) as u64) != 0 {
                f |= OF;
            }
            (r, f, CF | OF)
        }
        M::Rcl => {
            let c = count % (bits + 1);
            let wide = (u128::from(cf_in) << bits) | u128::from(a);
            let total = bits + 1;
            let rot = if c == 0 {
                wide
            } else {
                ((wide << c) | (wide >> (total - c))) & ((1u128 << total) - 1)
            };
            let r = (rot as u64) & m;
            let cf = (rot >> bits) & 1 != 0;
            let mut f = if cf { CF } else { 0 };
            if ((r & sb != 0) as u64 ^ cf as u64) != 0 {
                f |= OF;
            }
            // A count that is a multiple of 9 (17) on an 8-bit (16-bit) operand rotates
            // nothing: the CPU leaves OF as it was (and CF, which is CF in).
            (r, f, if c == 0 { CF } else { CF | OF })
        }
        _ => {
            // RCR
            let c = count % (bits + 1);
            let wide = (u128::from(cf_in) << bits) | u128::from(a);
            let total = bits + 1;
            let rot = if c == 0 {
                wide
            } else {
                ((wide >> c) | (wide << (total - c))) & ((1u128 << total) - 1)
            };
            let r = (rot as u64) & m;
            let cf = (rot >> bits) & 1 != 0;
            let mut f = if cf { CF } else { 0 };
            if ((r & sb != 0) as u64 ^ ((r & (sb >> 1)) != 0) as u64) != 0 {
                f |= OF;
            }
            // As RCL: no rotation, OF as it was.
            (r, f, if c == 0 { CF } else { CF | OF })
        }
    }
}

fn is_string_op(i: &Instruction) -> bool {
    (0..i.op_count()).any(|n| {
        matches!(
            i.op_kind(n),
            OpKind::MemorySegSI
                | OpKind::MemorySegESI
                | OpKind::MemorySegRSI
                | OpKind::MemoryESDI
                | OpKind::MemoryESEDI
                | OpKind::MemoryESRDI
        )
    })
}

pub fn is_sreg(r: Register) -> bool {
    (71..=76).contains(&(r as usize))
}

pub fn is_cr(r: Register) -> bool {
    (185..201).contains(&(r as usize))
}

pub fn is_dr(r: Register) -> bool {
    (201..217).contains(&(r as usize))
}

/// GPR encoding index of a general register of any size (AH..BH map to 0..3).
pub fn gpr_index(r: Register) -> usize {
    let n = r as usize;
    match n {
        1..=4 => n - 1,
        5..=8 => n - 5,
        9..=20 => n - 5,
        21..=36 => n - 21,
        37..=52 => n - 37,
        53..=68 => n - 53,
        _ => 0,
    }
}

fn loop_addr_size(i: &Instruction) -> usize {
    use iced_x86::Code as C;
    match i.code() {
        C::Loop_rel8_16_CX
        | C::Loop_rel8_32_CX
        | C::Loope_rel8_16_CX
        | C::Loope_rel8_32_CX
        | C::Loopne_rel8_16_CX
        | C::Loopne_rel8_32_CX => 2,
        C::Loop_rel8_16_ECX
        | C::Loop_rel8_32_ECX
        | C::Loop_rel8_64_ECX
        | C::Loope_rel8_16_ECX
        | C::Loope_rel8_32_ECX
        | C::Loope_rel8_64_ECX
        | C::Loopne_rel8_16_ECX
        | C::Loopne_rel8_32_ECX
        | C::Loopne_rel8_64_ECX => 4,
        _ => 8,
    }
}
