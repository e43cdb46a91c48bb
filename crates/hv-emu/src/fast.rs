//! Handlers chosen at decode time for the most frequent instruction forms (by the boot's
//! instruction mix), so their execution skips the generic operand dispatch of
//! [`Exec::exec`]: the operand kinds, sizes and condition codes are fixed per handler by const
//! parameters. Their semantics are the generic path's (the same `alu` / `shift_value` /
//! `szp` helpers); `tests` checks each against `Exec::exec` on random states. Everything else
//! (and any form with a LOCK prefix) runs through `Exec::exec`.

use iced_x86::{Code as C, ConditionCode, Instruction, Mnemonic as M, OpKind, Register};

use crate::cpu::*;
use crate::decode::{Handler, canonical};
use crate::exec::{Exec, R, alu, gp0, mask, shift_value, sx, szp};

fn generic(ex: &mut Exec<'_>, i: &Instruction) -> R<()> {
    ex.exec(i)
}

// ---- registers ----

/// Index of a 2/4/8-byte general register in `Cpu::gpr`.
#[inline(always)]
fn gidx<const S: usize>(r: Register) -> usize {
    let base = match S {
        8 => Register::RAX,
        4 => Register::EAX,
        _ => Register::AX,
    };
    (r as usize).wrapping_sub(base as usize) & 15
}

#[inline(always)]
fn rreg<const S: usize>(ex: &Exec<'_>, r: Register) -> u64 {
    if S == 1 {
        ex.rd_reg(r)
    } else {
        ex.cpu.gpr[gidx::<S>(r)] & mask(S)
    }
}

#[inline(always)]
fn wreg<const S: usize>(ex: &mut Exec<'_>, r: Register, v: u64) {
    match S {
        1 => ex.wr_reg(r, v),
        2 => {
            let g = &mut ex.cpu.gpr[gidx::<2>(r)];
            *g = (*g & !0xffff) | (v & 0xffff);
        }
        4 => ex.cpu.gpr[gidx::<4>(r)] = v & 0xffff_ffff,
        _ => ex.cpu.gpr[gidx::<8>(r)] = v,
    }
}

#[inline(always)]
fn set_arith(ex: &mut Exec<'_>, f: u64) {
    ex.cpu.rflags = (ex.cpu.rflags & !ARITH_FLAGS) | (f & ARITH_FLAGS);
}

/// Condition `CC` (iced `ConditionCode` as u8) on `f`.
#[inline(always)]
fn holds<const CC: u8>(f: u64) -> bool {
    let c = f & CF != 0;
    let z = f & ZF != 0;
    let s = f & SF != 0;
    let o = f & OF != 0;
    let p = f & PF != 0;
    match CC {
        1 => o,
        2 => !o,
        3 => c,
        4 => !c,
        5 => z,
        6 => !z,
        7 => c || z,
        8 => !c && !z,
        9 => s,
        10 => !s,
        11 => p,
        12 => !p,
        13 => s != o,
        14 => s == o,
        15 => z || s != o,
        16 => !z && s == o,
        _ => true,
    }
}

// ---- ALU: OP as in `alu` (ADD OR ADC SBB AND SUB XOR CMP), 8 = TEST ----

#[inline(always)]
fn alu_op<const OP: u8, const S: usize>(ex: &mut Exec<'_>, a: u64, b: u64) -> (u64, bool) {
    let op = if OP == 8 { 4 } else { OP };
    let cf = ex.cpu.rflags & CF != 0;
    let (r, f) = alu(op, S, a, b, cf);
    set_arith(ex, f);
    (r, OP != 7 && OP != 8)
}

/// `op r, r`
fn alu_rr<const OP: u8, const S: usize>(ex: &mut Exec<'_>, i: &Instruction) -> R<()> {
    let (d, s) = (i.op0_register(), i.op1_register());
    let a = rreg::<S>(ex, d);
    let b = rreg::<S>(ex, s);
    let (r, write) = alu_op::<OP, S>(ex, a, b);
    if write {
        wreg::<S>(ex, d, r);
    }
    Ok(())
}

/// `op [m], r`
fn alu_mr<const OP: u8, const S: usize>(ex: &mut Exec<'_>, i: &Instruction) -> R<()> {
    let b = rreg::<S>(ex, i.op1_register());
    let addr = ex.mem_lin(i)?;
    // A destination written back is checked as a write first (its fault is a write's).
    let a = if OP != 7 && OP != 8 {
        ex.read_lin_rmw(addr, S)?
    } else {
        ex.read_lin(addr, S)?
    };
    let cf = ex.cpu.rflags & CF != 0;
    let op = if OP == 8 { 4 } else { OP };
    let (r, f) = alu(op, S, a, b, cf);
    if OP != 7 && OP != 8 {
        ex.write_lin(addr, S, r)?;
    }
    set_arith(ex, f);
    Ok(())
}

/// `op r, [m]`
fn alu_rm<const OP: u8, const S: usize>(ex: &mut Exec<'_>, i: &Instruction) -> R<()> {
    let d = i.op0_register();
    let addr = ex.mem_lin(i)?;
    let b = ex.read_lin(addr, S)?;
    let a = rreg::<S>(ex, d);
    let (r, write) = alu_op::<OP, S>(ex, a, b);
    if write {
        wreg::<S>(ex, d, r);
    }
    Ok(())
}

/// `op r, imm`
fn alu_ri<const OP: u8, const S: usize>(ex: &mut Exec<'_>, i: &Instruction) -> R<()> {
    let d = i.op0_register();
    let a = rreg::<S>(ex, d);
    let b = i.immediate(1) & mask(S);
    let (r, write) = alu_op::<OP, S>(ex, a, b);
    if write {
        wreg::<S>(ex, d, r);
    }
    Ok(())
}

/// `op [m], imm`
fn alu_mi<const OP: u8, const S: usize>(ex: &mut Exec<'_>, i: &Instruction) -> R<()> {
    let b = i.immediate(1) & mask(S);
    let addr = ex.mem_lin(i)?;
    // A destination written back is checked as a write first (its fault is a write's).
    let a = if OP != 7 && OP != 8 {
        ex.read_lin_rmw(addr, S)?
    } else {
        ex.read_lin(addr, S)?
    };
    let cf = ex.cpu.rflags & CF != 0;
    let op = if OP == 8 { 4 } else { OP };
    let (r, f) = alu(op, S, a, b, cf);
    if OP != 7 && OP != 8 {
        ex.write_lin(addr, S, r)?;
    }
    set_arith(ex, f);
    Ok(())
}

/// INC (true) / DEC (false) of a register.
fn incdec_r<const INC: bool, const S: usize>(ex: &mut Exec<'_>, i: &Instruction) -> R<()> {
    let d = i.op0_register();
    let a = rreg::<S>(ex, d);
    let (r, f) = if INC {
        alu(0, S, a, 1, false)
    } else {
        alu(5, S, a, 1, false)
    };
    wreg::<S>(ex, d, r);
    let w = ARITH_FLAGS & !CF;
    ex.cpu.rflags = (ex.cpu.rflags & !w) | (f & w);
    Ok(())
}

/// INC (true) / DEC (false) of memory (without LOCK).
fn incdec_m<const INC: bool, const S: usize>(ex: &mut Exec<'_>, i: &Instruction) -> R<()> {
    let addr = ex.mem_lin(i)?;
    let a = ex.read_lin_rmw(addr, S)?;
    let (r, f) = if INC {
        alu(0, S, a, 1, false)
    } else {
        alu(5, S, a, 1, false)
    };
    ex.write_lin(addr, S, r)?;
    let w = ARITH_FLAGS & !CF;
    ex.cpu.rflags = (ex.cpu.rflags & !w) | (f & w);
    Ok(())
}

/// NEG (true) / NOT (false) of a register.
fn negnot_r<const NEG: bool, const S: usize>(ex: &mut Exec<'_>, i: &Instruction) -> R<()> {
    let d = i.op0_register();
    let a = rreg::<S>(ex, d);
    if NEG {
        let (r, f) = alu(5, S, 0, a, false);
        wreg::<S>(ex, d, r);
        set_arith(ex, f);
    } else {
        wreg::<S>(ex, d, !a & mask(S));
    }
    Ok(())
}

// ---- moves ----

fn mov_rr<const S: usize>(ex: &mut Exec<'_>, i: &Instruction) -> R<()> {
    let v = rreg::<S>(ex, i.op1_register());
    wreg::<S>(ex, i.op0_register(), v);
    Ok(())
}

fn mov_rm<const S: usize>(ex: &mut Exec<'_>, i: &Instruction) -> R<()> {
    let addr = ex.mem_lin(i)?;
    let v = ex.read_lin(addr, S)?;
    wreg::<S>(ex, i.op0_register(), v);
    Ok(())
}

fn mov_mr<const S: usize>(ex: &mut Exec<'_>, i: &Instruction) -> R<()> {
    let v = rreg::<S>(ex, i.op1_register());
    let addr = ex.mem_lin(i)?;
    ex.write_lin(addr, S, v)
}

fn mov_ri<const S: usize>(ex: &mut Exec<'_>, i: &Instruction) -> R<()> {
    let v = i.immediate(1);
    wreg::<S>(ex, i.op0_register(), v);
    Ok(())
}

fn mov_mi<const S: usize>(ex: &mut Exec<'_>, i: &Instruction) -> R<()> {
    let v = i.immediate(1) & mask(S);
    let addr = ex.mem_lin(i)?;
    ex.write_lin(addr, S, v)
}

/// MOVZX (SIGNED false) / MOVSX, MOVSXD (true): destination size D, source size S, the source
/// in a register (MEM false) or memory.
fn movx<const SIGNED: bool, const MEM: bool, const D: usize, const S: usize>(
    ex: &mut Exec<'_>,
    i: &Instruction,
) -> R<()> {
    let v = if MEM {
        let addr = ex.mem_lin(i)?;
        ex.read_lin(addr, S)?
    } else {
        rreg::<S>(ex, i.op1_register())
    };
    let v = if SIGNED { sx(v, S) } else { v };
    wreg::<D>(ex, i.op0_register(), v & mask(D));
    Ok(())
}

fn lea<const D: usize>(ex: &mut Exec<'_>, i: &Instruction) -> R<()> {
    let v = ex.ea(i);
    wreg::<D>(ex, i.op0_register(), v & mask(D));
    Ok(())
}

// ---- shifts and multiply ----

/// SHL/SHR/SAR/ROL/ROR of a register by an immediate (`CL` false) or CL.
fn shift_r<const MN: u8, const CL: bool, const S: usize>(
    ex: &mut Exec<'_>,
    i: &Instruction,
) -> R<()> {
    let cnt_mask = if S == 8 { 63 } else { 31 };
    let count = if CL {
        (ex.cpu.gpr[1] as u32) & cnt_mask
    } else {
        u32::from(i.immediate8()) & cnt_mask
    };
    let d = i.op0_register();
    let a = rreg::<S>(ex, d);
    if count == 0 {
        // No flag changes, but a 32-bit destination is written (upper half cleared).
        if S == 4 {
            wreg::<S>(ex, d, a);
        }
        return Ok(());
    }
    let mn = match MN {
        0 => M::Shl,
        1 => M::Shr,
        2 => M::Sar,
        3 => M::Rol,
        _ => M::Ror,
    };
    let (r, f, which) = shift_value(mn, S, a, count, ex.cpu.rflags & CF != 0);
    wreg::<S>(ex, d, r);
    ex.cpu.rflags = (ex.cpu.rflags & !which) | (f & which);
    Ok(())
}

/// Two-operand IMUL r, r/m.
fn imul2<const MEM: bool, const S: usize>(ex: &mut Exec<'_>, i: &Instruction) -> R<()> {
    let d = i.op0_register();
    let b = if MEM {
        let addr = ex.mem_lin(i)?;
        ex.read_lin(addr, S)?
    } else {
        rreg::<S>(ex, i.op1_register())
    };
    let a = rreg::<S>(ex, d);
    let p = i128::from(sx(a, S) as i64) * i128::from(sx(b, S) as i64);
    let r = (p as u64) & mask(S);
    let overflow = i128::from(sx(r, S) as i64) != p;
    wreg::<S>(ex, d, r);
    let mut f = szp(S, r);
    if overflow {
        f |= CF | OF;
    }
    set_arith(ex, f);
    Ok(())
}

// ---- conditions ----

fn setcc<const CC: u8, const MEM: bool>(ex: &mut Exec<'_>, i: &Instruction) -> R<()> {
    let v = u64::from(holds::<CC>(ex.cpu.rflags));
    if MEM {
        let addr = ex.mem_lin(i)?;
        ex.write_lin(addr, 1, v)
    } else {
        ex.wr_reg(i.op0_register(), v);
        Ok(())
    }
}

fn cmovcc<const CC: u8, const MEM: bool, const S: usize>(
    ex: &mut Exec<'_>,
    i: &Instruction,
) -> R<()> {
    let v = if MEM {
        let addr = ex.mem_lin(i)?;
        ex.read_lin(addr, S)?
    } else {
        rreg::<S>(ex, i.op1_register())
    };
    let d = i.op0_register();
    if holds::<CC>(ex.cpu.rflags) {
        wreg::<S>(ex, d, v);
    } else if S == 4 {
        // A 32-bit CMOV zero-extends its destination even when the condition is false.
        let cur = rreg::<4>(ex, d);
        wreg::<4>(ex, d, cur);
    }
    Ok(())
}

// ---- control flow (64-bit mode) ----

#[inline(always)]
fn jump64(ex: &mut Exec<'_>, t: u64) -> R<()> {
    if !canonical(t) {
        return gp0();
    }
    ex.cpu.rip = t;
    Ok(())
}

fn jcc64<const CC: u8>(ex: &mut Exec<'_>, i: &Instruction) -> R<()> {
    if holds::<CC>(ex.cpu.rflags) {
        jump64(ex, i.near_branch64())
    } else {
        Ok(())
    }
}

fn jmp64(ex: &mut Exec<'_>, i: &Instruction) -> R<()> {
    jump64(ex, i.near_branch64())
}

fn call64(ex: &mut Exec<'_>, i: &Instruction) -> R<()> {
    let sp = ex.cpu.gpr[4].wrapping_sub(8);
    let ret = ex.cpu.rip;
    ex.write_lin(sp, 8, ret)?;
    let t = i.near_branch64();
    if !canonical(t) {
        return gp0();
    }
    ex.cpu.gpr[4] = sp;
    ex.cpu.rip = t;
    Ok(())
}

fn ret64(ex: &mut Exec<'_>, _i: &Instruction) -> R<()> {
    let sp = ex.cpu.gpr[4];
    let t = ex.read_lin(sp, 8)?;
    jump64(ex, t)?;
    ex.cpu.gpr[4] = sp.wrapping_add(8);
    Ok(())
}

fn push64_r(ex: &mut Exec<'_>, i: &Instruction) -> R<()> {
    let v = ex.cpu.gpr[gidx::<8>(i.op0_register())];
    let sp = ex.cpu.gpr[4].wrapping_sub(8);
    ex.write_lin(sp, 8, v)?;
    ex.cpu.gpr[4] = sp;
    Ok(())
}

fn pop64_r(ex: &mut Exec<'_>, i: &Instruction) -> R<()> {
    let sp = ex.cpu.gpr[4];
    let v = ex.read_lin(sp, 8)?;
    ex.cpu.gpr[4] = sp.wrapping_add(8);
    ex.cpu.gpr[gidx::<8>(i.op0_register())] = v;
    Ok(())
}

fn nop(_ex: &mut Exec<'_>, _i: &Instruction) -> R<()> {
    Ok(())
}

// ---- selection ----

/// Handlers for condition codes 1..=16 (`ConditionCode as u8`), index 0 unused.
macro_rules! by_cc {
    ($f:ident $(, $p:tt)*) => {
        [
            generic as Handler,
            $f::<1 $(, $p)*>,
            $f::<2 $(, $p)*>,
            $f::<3 $(, $p)*>,
            $f::<4 $(, $p)*>,
            $f::<5 $(, $p)*>,
            $f::<6 $(, $p)*>,
            $f::<7 $(, $p)*>,
            $f::<8 $(, $p)*>,
            $f::<9 $(, $p)*>,
            $f::<10 $(, $p)*>,
            $f::<11 $(, $p)*>,
            $f::<12 $(, $p)*>,
            $f::<13 $(, $p)*>,
            $f::<14 $(, $p)*>,
            $f::<15 $(, $p)*>,
            $f::<16 $(, $p)*>,
        ]
    };
}

/// ALU handler for operation `op` (0..=8) of size `s` in form `form` (0 rr, 1 mr, 2 rm, 3 ri,
/// 4 mi).
fn alu_handler(op: u8, s: usize, form: u8) -> Handler {
    macro_rules! ops {
        ($f:ident, $s:tt) => {
            match op {
                0 => $f::<0, $s>,
                1 => $f::<1, $s>,
                2 => $f::<2, $s>,
                3 => $f::<3, $s>,
                4 => $f::<4, $s>,
                5 => $f::<5, $s>,
                6 => $f::<6, $s>,
                7 => $f::<7, $s>,
                _ => $f::<8, $s>,
            }
        };
    }
    macro_rules! sizes {
        ($f:ident) => {
            match s {
                1 => ops!($f, 1),
                2 => ops!($f, 2),
                4 => ops!($f, 4),
                _ => ops!($f, 8),
            }
        };
    }
    match form {
        0 => sizes!(alu_rr),
        1 => sizes!(alu_mr),
        2 => sizes!(alu_rm),
        3 => sizes!(alu_ri),
        _ => sizes!(alu_mi),
    }
}

fn alu_index(mn: M) -> Option<u8> {
    Some(match mn {
        M::Add => 0,
        M::Or => 1,
        M::Adc => 2,
        M::Sbb => 3,
        M::And => 4,
        M::Sub => 5,
        M::Xor => 6,
        M::Cmp => 7,
        M::Test => 8,
        _ => return None,
    })
}

fn reg_size_of(r: Register) -> usize {
    crate::exec::reg_size(r)
}

/// The handler for a decoded instruction.
pub fn handler(i: &Instruction) -> Handler {
    if i.has_lock_prefix()
        || i.has_rep_prefix()
        || i.has_repne_prefix()
        || i.encoding() != iced_x86::EncodingKind::Legacy
    {
        return generic;
    }
    let k0 = i.op0_kind();
    let k1 = if i.op_count() > 1 {
        i.op1_kind()
    } else {
        OpKind::Register
    };
    let is_gpr = |n: u32| -> bool {
        i.op_kind(n) == OpKind::Register && {
            let r = i.op_register(n) as usize;
            (1..=68).contains(&r)
        }
    };
    let mn = i.mnemonic();
    let cc = i.condition_code();
    let cci = cc as usize;
    if let Some(op) = alu_index(mn)
        && i.op_count() == 2
    {
        let s = match k0 {
            OpKind::Register if is_gpr(0) => reg_size_of(i.op0_register()),
            OpKind::Memory => i.memory_size().size(),
            _ => return generic,
        };
        if !matches!(s, 1 | 2 | 4 | 8) {
            return generic;
        }
        let form = match (k0, k1) {
            (OpKind::Register, OpKind::Register) if is_gpr(1) => 0,
            (OpKind::Memory, OpKind::Register) if is_gpr(1) => 1,
            (OpKind::Register, OpKind::Memory) => 2,
            (OpKind::Register, _) if is_imm(k1) => 3,
            (OpKind::Memory, _) if is_imm(k1) => 4,
            _ => return generic,
        };
        return alu_handler(op, s, form);
    }
    match mn {
        M::Mov if i.op_count() == 2 => {
            let s = match k0 {
                OpKind::Register if is_gpr(0) => reg_size_of(i.op0_register()),
                OpKind::Memory => i.memory_size().size(),
                _ => return generic,
            };
            macro_rules! sized {
                ($f:ident) => {
                    match s {
                        1 => $f::<1>,
                        2 => $f::<2>,
                        4 => $f::<4>,
                        8 => $f::<8>,
                        _ => generic,
                    }
                };
            }
            match (k0, k1) {
                (OpKind::Register, OpKind::Register) if is_gpr(1) => sized!(mov_rr),
                (OpKind::Register, OpKind::Memory) => sized!(mov_rm),
                (OpKind::Memory, OpKind::Register) if is_gpr(1) => sized!(mov_mr),
                (OpKind::Register, _) if is_imm(k1) => sized!(mov_ri),
                (OpKind::Memory, _) if is_imm(k1) => sized!(mov_mi),
                _ => generic,
            }
        }
        M::Movzx | M::Movsx | M::Movsxd if is_gpr(0) => {
            let d = reg_size_of(i.op0_register());
            let mem = k1 == OpKind::Memory;
            let s = match k1 {
                OpKind::Memory => i.memory_size().size(),
                OpKind::Register if is_gpr(1) => reg_size_of(i.op1_register()),
                _ => return generic,
            };
            let signed = mn != M::Movzx;
            match (signed, mem, d, s) {
                (false, false, 4, 1) => movx::<false, false, 4, 1>,
                (false, true, 4, 1) => movx::<false, true, 4, 1>,
                (false, false, 4, 2) => movx::<false, false, 4, 2>,
                (false, true, 4, 2) => movx::<false, true, 4, 2>,
                (false, false, 8, 1) => movx::<false, false, 8, 1>,
                (false, true, 8, 1) => movx::<false, true, 8, 1>,
                (false, false, 8, 2) => movx::<false, false, 8, 2>,
                (false, true, 8, 2) => movx::<false, true, 8, 2>,
                (true, false, 8, 4) => movx::<true, false, 8, 4>,
                (true, true, 8, 4) => movx::<true, true, 8, 4>,
                (true, false, 4, 1) => movx::<true, false, 4, 1>,
                (true, true, 4, 1) => movx::<true, true, 4, 1>,
                (true, false, 8, 1) => movx::<true, false, 8, 1>,
                (true, true, 8, 1) => movx::<true, true, 8, 1>,
                (true, false, 4, 2) => movx::<true, false, 4, 2>,
                (true, true, 4, 2) => movx::<true, true, 4, 2>,
                (true, false, 8, 2) => movx::<true, false, 8, 2>,
                (true, true, 8, 2) => movx::<true, true, 8, 2>,
                _ => generic,
            }
        }
        M::Lea if is_gpr(0) => match reg_size_of(i.op0_register()) {
            8 => lea::<8>,
            4 => lea::<4>,
            _ => generic,
        },
        M::Inc | M::Dec if k0 == OpKind::Memory => match (mn == M::Inc, i.memory_size().size()) {
            (true, 8) => incdec_m::<true, 8>,
            (true, 4) => incdec_m::<true, 4>,
            (false, 8) => incdec_m::<false, 8>,
            (false, 4) => incdec_m::<false, 4>,
            _ => generic,
        },
        M::Neg | M::Not if is_gpr(0) => match (mn == M::Neg, reg_size_of(i.op0_register())) {
            (true, 8) => negnot_r::<true, 8>,
            (true, 4) => negnot_r::<true, 4>,
            (false, 8) => negnot_r::<false, 8>,
            (false, 4) => negnot_r::<false, 4>,
            _ => generic,
        },
        M::Lfence | M::Mfence | M::Sfence => nop,
        M::Inc | M::Dec if is_gpr(0) => {
            let inc = mn == M::Inc;
            match (inc, reg_size_of(i.op0_register())) {
                (true, 8) => incdec_r::<true, 8>,
                (true, 4) => incdec_r::<true, 4>,
                (false, 8) => incdec_r::<false, 8>,
                (false, 4) => incdec_r::<false, 4>,
                _ => generic,
            }
        }
        M::Shl | M::Sal | M::Shr | M::Sar | M::Rol | M::Ror if is_gpr(0) && i.op_count() == 2 => {
            let cl = match k1 {
                OpKind::Immediate8 => false,
                OpKind::Register if i.op1_register() == Register::CL => true,
                _ => return generic,
            };
            macro_rules! sh {
                ($mn:tt) => {
                    match (cl, reg_size_of(i.op0_register())) {
                        (false, 8) => shift_r::<$mn, false, 8>,
                        (false, 4) => shift_r::<$mn, false, 4>,
                        (true, 8) => shift_r::<$mn, true, 8>,
                        (true, 4) => shift_r::<$mn, true, 4>,
                        _ => generic,
                    }
                };
            }
            match mn {
                M::Shl | M::Sal => sh!(0),
                M::Shr => sh!(1),
                M::Sar => sh!(2),
                M::Rol => sh!(3),
                _ => sh!(4),
            }
        }
        M::Imul if i.op_count() == 2 && is_gpr(0) => {
            let mem = k1 == OpKind::Memory;
            if !mem && !is_gpr(1) {
                return generic;
            }
            match (mem, reg_size_of(i.op0_register())) {
                (false, 8) => imul2::<false, 8>,
                (true, 8) => imul2::<true, 8>,
                (false, 4) => imul2::<false, 4>,
                (true, 4) => imul2::<true, 4>,
                _ => generic,
            }
        }
        _ if (1..=16).contains(&cci) && mn_is_setcc(mn) => match k0 {
            OpKind::Register if is_gpr(0) => by_cc!(setcc, false)[cci],
            OpKind::Memory => by_cc!(setcc, true)[cci],
            _ => generic,
        },
        _ if (1..=16).contains(&cci) && mn_is_cmovcc(mn) && is_gpr(0) => {
            let mem = k1 == OpKind::Memory;
            if !mem && !is_gpr(1) {
                return generic;
            }
            match (mem, reg_size_of(i.op0_register())) {
                (false, 8) => by_cc!(cmovcc, false, 8)[cci],
                (true, 8) => by_cc!(cmovcc, true, 8)[cci],
                (false, 4) => by_cc!(cmovcc, false, 4)[cci],
                (true, 4) => by_cc!(cmovcc, true, 4)[cci],
                _ => generic,
            }
        }
        _ => handler64(i, cc),
    }
}

/// Control flow and stack forms that exist only in 64-bit mode.
fn handler64(i: &Instruction, cc: ConditionCode) -> Handler {
    let cci = cc as usize;
    match i.code() {
        C::Jo_rel8_64
        | C::Jno_rel8_64
        | C::Jb_rel8_64
        | C::Jae_rel8_64
        | C::Je_rel8_64
        | C::Jne_rel8_64
        | C::Jbe_rel8_64
        | C::Ja_rel8_64
        | C::Js_rel8_64
        | C::Jns_rel8_64
        | C::Jp_rel8_64
        | C::Jnp_rel8_64
        | C::Jl_rel8_64
        | C::Jge_rel8_64
        | C::Jle_rel8_64
        | C::Jg_rel8_64
        | C::Jo_rel32_64
        | C::Jno_rel32_64
        | C::Jb_rel32_64
        | C::Jae_rel32_64
        | C::Je_rel32_64
        | C::Jne_rel32_64
        | C::Jbe_rel32_64
        | C::Ja_rel32_64
        | C::Js_rel32_64
        | C::Jns_rel32_64
        | C::Jp_rel32_64
        | C::Jnp_rel32_64
        | C::Jl_rel32_64
        | C::Jge_rel32_64
        | C::Jle_rel32_64
        | C::Jg_rel32_64
            if (1..=16).contains(&cci) =>
        {
            by_cc!(jcc64)[cci]
        }
        C::Jmp_rel8_64 | C::Jmp_rel32_64 => jmp64,
        C::Call_rel32_64 => call64,
        C::Retnq => ret64,
        C::Push_r64 => push64_r,
        C::Pop_r64 => pop64_r,
        C::Nopw | C::Nopd | C::Nopq | C::Nop_rm16 | C::Nop_rm32 | C::Nop_rm64 | C::Pause => nop,
        _ => generic,
    }
}

fn is_imm(k: OpKind) -> bool {
    matches!(
        k,
        OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64
    )
}

fn mn_is_setcc(mn: M) -> bool {
    matches!(
        mn,
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
            | M::Setg
    )
}

fn mn_is_cmovcc(mn: M) -> bool {
    matches!(
        mn,
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
            | M::Cmovg
    )
}

#[cfg(test)]
mod tests {
    //! Differential tests: each fast handler against `Exec::exec` on random states.

    use std::sync::Arc;

    use iced_x86::code_asm::*;
    use iced_x86::{Decoder, DecoderOptions};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::exec::Exc;
    use crate::vm::VmShared;

    const MEM: usize = 1 << 18;

    use crate::testutil::{Rng, assert_same_memory, exec};

    fn cpu64(rng: &mut Rng) -> Cpu {
        crate::testutil::cpu64(rng, 0x1000, 0x3e000, 1)
    }

    fn run(
        c: &mut Cpu,
        mem: &hv::GuestMemory,
        vm: &VmShared,
        i: &Instruction,
        fast: bool,
    ) -> R<()> {
        exec(c, mem, vm, |ex| {
            ex.cpu.rip = i.next_ip();
            if fast { handler(i)(ex, i) } else { ex.exec(i) }
        })
    }

    fn check(name: &str, bytes: &[u8], rng: &mut Rng) {
        let mut d = Decoder::with_ip(64, bytes, 0x1000, DecoderOptions::NONE);
        let i = d.decode();
        assert!(!i.is_invalid(), "{name}");
        assert_ne!(
            handler(&i) as *const () as usize,
            generic as *const () as usize,
            "{name} has no fast handler"
        );
        let vm = VmShared::new(hv::CpuModel::portable(), 1, 1_000_000, MEM as u64);
        for _ in 0..64 {
            let seed = rng.next();
            let mut r1 = Rng(seed | 1);
            let mut r2 = Rng(seed | 1);
            let mut a = cpu64(&mut r1);
            let mut b = cpu64(&mut r2);
            let m1 = hv::GuestMemory::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
            let m2 = hv::GuestMemory::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
            let fill: Vec<u8> = (0..MEM / 8)
                .flat_map(|k| (k as u64).wrapping_mul(seed).to_le_bytes())
                .collect();
            m1.write_slice(&fill, GuestAddress(0)).unwrap();
            m2.write_slice(&fill, GuestAddress(0)).unwrap();
            let ra = run(&mut a, &m1, &vm, &i, true);
            let rb = run(&mut b, &m2, &vm, &i, false);
            let ctx = format!("{name} seed {seed:#x}");
            assert_eq!(ra.is_ok(), rb.is_ok(), "{ctx}: {ra:?} vs {rb:?}");
            if let (Err(Exc::Fault(v1, c1)), Err(Exc::Fault(v2, c2))) = (&ra, &rb) {
                assert_eq!((v1, c1), (v2, c2), "{ctx}");
                continue;
            }
            assert_eq!(a.gpr, b.gpr, "{ctx}: registers");
            assert_eq!(a.rflags, b.rflags, "{ctx}: flags");
            assert_eq!(a.rip, b.rip, "{ctx}: rip");
            assert_same_memory(&m1, &m2, MEM, &ctx);
        }
    }

    type Gen = Box<dyn Fn(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>>;

    fn templates() -> Vec<(String, Gen)> {
        let mut v: Vec<(String, Gen)> = Vec::new();
        macro_rules! t {
            ($($e:tt)*) => {
                v.push((stringify!($($e)*).to_string(), Box::new(|a: &mut CodeAssembler| { a.$($e)*?; Ok(()) })));
            };
        }
        macro_rules! alu {
            ($op:ident) => {
                t!($op(rax, rbx));
                t!($op(ecx, edx));
                t!($op(r9w, ax));
                t!($op(al, ah));
                t!($op(spl, r10b));
                t!($op(qword_ptr(rbx + rcx * 2 + 8), rdx));
                t!($op(dword_ptr(rsi - 4), r8d));
                t!($op(word_ptr(rdi), r11w));
                t!($op(byte_ptr(rbp + 1), bh));
                t!($op(rdx, qword_ptr(rsp + 16)));
                t!($op(r12d, dword_ptr(rbx + rsi)));
                t!($op(rax, -5));
                t!($op(ecx, 0x7fff_0001));
                t!($op(al, 0x80));
                t!($op(qword_ptr(rdi + 8), 3));
                t!($op(dword_ptr(rbx), -100));
                t!($op(byte_ptr(rsi), 7));
            };
        }
        alu!(add);
        alu!(or);
        alu!(adc);
        alu!(sbb);
        alu!(and);
        alu!(sub);
        alu!(xor);
        alu!(cmp);
        t!(test(rax, rbx));
        t!(test(ecx, edx));
        t!(test(bl, ah));
        t!(test(qword_ptr(rbx), rcx));
        t!(test(byte_ptr(rdi + 3), 0x41));
        t!(test(eax, 0x100));
        t!(mov(rax, rbx));
        t!(mov(r13d, esp));
        t!(mov(cx, r9w));
        t!(mov(ah, dl));
        t!(mov(rdx, qword_ptr(rsp + 8)));
        t!(mov(esi, dword_ptr(rbx + rcx * 4)));
        t!(mov(al, byte_ptr(rdi)));
        t!(mov(qword_ptr(rbp - 8), rdi));
        t!(mov(dword_ptr(rsi), eax));
        t!(mov(byte_ptr(rsi + 1), ch));
        t!(mov(rax, 0x1234_5678_9abc_def0u64));
        t!(mov(ecx, 0xffff_fff0u32));
        t!(mov(rdx, -7i64));
        t!(mov(qword_ptr(rbx), -2));
        t!(mov(dword_ptr(rbx + 4), 9));
        t!(mov(byte_ptr(rbx), 0xfe));
        t!(movzx(eax, bl));
        t!(movzx(ecx, byte_ptr(rsi)));
        t!(movzx(edx, word_ptr(rdi)));
        t!(movzx(rax, r9b));
        t!(movzx(eax, ah));
        t!(movsx(rax, bl));
        t!(movsx(ecx, word_ptr(rsi)));
        t!(movsxd(rax, ecx));
        t!(movsxd(rdx, dword_ptr(rbx)));
        t!(lea(rax, qword_ptr(rbx + rcx * 8 - 16)));
        t!(lea(ecx, dword_ptr(rsi + rdi)));
        t!(inc(dword_ptr(rbx + 4)));
        t!(dec(qword_ptr(rsi)));
        t!(neg(rax));
        t!(neg(ecx));
        t!(not(rdx));
        t!(not(r9d));
        t!(lfence());
        t!(mfence());
        t!(inc(rax));
        t!(dec(ecx));
        t!(inc(r10d));
        t!(dec(r15));
        for (n, f) in [
            (
                "shl",
                CodeAssembler::shl::<AsmRegister64, i32>
                    as fn(
                        &mut CodeAssembler,
                        AsmRegister64,
                        i32,
                    ) -> Result<(), iced_x86::IcedError>,
            ),
            ("shr", CodeAssembler::shr::<AsmRegister64, i32>),
            ("sar", CodeAssembler::sar::<AsmRegister64, i32>),
            ("rol", CodeAssembler::rol::<AsmRegister64, i32>),
            ("ror", CodeAssembler::ror::<AsmRegister64, i32>),
        ] {
            for c in [1, 3, 63, 0] {
                v.push((
                    format!("{n} rax, {c}"),
                    Box::new(move |a: &mut CodeAssembler| f(a, rax, c)),
                ));
            }
        }
        t!(shl(edx, 5));
        t!(shr(ecx, 31));
        t!(sar(r8d, 7));
        t!(ror(esi, 13));
        t!(rol(edi, 1));
        t!(shl(rax, cl));
        t!(shr(rdx, cl));
        t!(sar(esi, cl));
        t!(imul_2(rax, rbx));
        t!(imul_2(ecx, edx));
        t!(imul_2(rdx, qword_ptr(rsi)));
        t!(imul_2(eax, dword_ptr(rdi + 4)));
        t!(seto(al));
        t!(setb(bl));
        t!(sete(ah));
        t!(setbe(cl));
        t!(setl(r9b));
        t!(setg(byte_ptr(rsi)));
        t!(setnp(dl));
        t!(cmovae(rax, rbx));
        t!(cmovne(ecx, edx));
        t!(cmovle(rdx, qword_ptr(rsi)));
        t!(cmovs(eax, dword_ptr(rdi)));
        t!(jne(0x1080u64));
        t!(je(0x900u64));
        t!(jl(0x5000u64));
        t!(jbe(0x1002u64));
        t!(jp(0x1002u64));
        t!(jg(0x1100u64));
        t!(jmp(0x1234u64));
        t!(call(0x2000u64));
        t!(ret());
        t!(push(rbx));
        t!(push(rsp));
        t!(pop(rcx));
        t!(pop(rsp));
        t!(nop());
        t!(pause());
        v
    }

    #[test]
    fn fast_handlers_match_the_generic_path() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let list = templates();
        assert!(list.len() > 150, "{} templates", list.len());
        for (name, f) in list {
            let mut a = CodeAssembler::new(64).unwrap();
            f(&mut a).unwrap();
            let bytes = a.assemble(0x1000).unwrap();
            check(&name, &bytes, &mut rng);
        }
    }

    #[test]
    fn differential_check_detects_a_wrong_handler() {
        // The harness must fail when a fast handler differs: run `add` through the `sub` one.
        let mut a = CodeAssembler::new(64).unwrap();
        a.add(rax, rbx).unwrap();
        let bytes = a.assemble(0x1000).unwrap();
        let i = Decoder::with_ip(64, &bytes, 0x1000, DecoderOptions::NONE).decode();
        let vm = VmShared::new(hv::CpuModel::portable(), 1, 1_000_000, MEM as u64);
        let mem = Arc::new(hv::GuestMemory::from_ranges(&[(GuestAddress(0), MEM)]).unwrap());
        let mut rng = Rng(5);
        let mut c1 = cpu64(&mut rng);
        let mut c2 = cpu64(&mut Rng(5));
        exec(&mut c1, &mem, &vm, |ex| alu_rr::<5, 8>(ex, &i)).unwrap();
        run(&mut c2, &mem, &vm, &i, false).unwrap();
        assert_ne!(c1.gpr, c2.gpr);
    }
}
