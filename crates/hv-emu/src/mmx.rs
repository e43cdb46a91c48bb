//! MMX, and the SSE/SSE2/SSSE3 forms with MMX operands.
//!
//! MMi is the low 64 bits (significand) of x87 physical register Ri. `cpu.st` holds the x87
//! stack in FXSAVE order (slot k = ST(k) = R[(TOP + k) & 7]). An MMX instruction makes TOP 0
//! (so slot k = Rk = MMk) and tags every register valid; a write sets bits 79:64 (sign and
//! exponent) to ones. EMMS also sets TOP to 0 (what this host's CPU does), then tags every
//! register empty. The checks come first, in the hardware's
//! order: CR0.EM → #UD, CR0.TS → #NM, a pending unmasked x87 exception → #MF.
//!
//! The arithmetic is [`crate::sse::lane_op`] on the 64-bit values; where the 64-bit form is not
//! the low half of the 128-bit one (packs and horizontal operations take both sources' words,
//! high unpacks take the upper halves), the operands are rearranged first.

use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

use crate::exec::{Exc, Exec, R, reg_size, ud};
use crate::sse::{from_u16s, lane_op, u8s, u16s, xidx};

const CR0_EM: u64 = 1 << 2;
const CR4_OSFXSR: u64 = 1 << 9;
/// FSW.ES: an unmasked x87 exception is pending.
const FSW_ES: u16 = 1 << 7;

fn mmidx(r: Register) -> Option<usize> {
    let n = (r as usize).wrapping_sub(Register::MM0 as usize);
    (n < 8).then_some(n)
}

impl Exec<'_> {
    /// The image slot of physical register Rk (slot j holds ST(j) = R[(TOP + j) & 7]).
    fn mm_slot(&self, k: usize) -> usize {
        (k + 8 - usize::from((self.cpu.fsw >> 11) & 7)) & 7
    }

    /// MMk: the significand of physical register Rk.
    fn mm(&self, k: usize) -> u64 {
        let s = &self.cpu.st[self.mm_slot(k)];
        u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]])
    }

    fn set_mm(&mut self, k: usize, v: u64) {
        let slot = self.mm_slot(k);
        let s = &mut self.cpu.st[slot];
        s[..8].copy_from_slice(&v.to_le_bytes());
        s[8] = 0xff;
        s[9] = 0xff;
        for b in s[10..].iter_mut() {
            *b = 0;
        }
    }

    /// The x87 → MMX transition: TOP = 0 (the stack image rotated so slot k is Rk), all tags
    /// valid.
    fn mmx_transition(&mut self) {
        self.mmx_top0();
        self.cpu.ftw = 0xff;
    }

    /// The first half of the transition: TOP = 0. An MMX store whose destination faults has
    /// done this much on the CPU (tags unchanged; measured on this Intel host).
    fn mmx_top0(&mut self) {
        let top = usize::from((self.cpu.fsw >> 11) & 7);
        self.cpu.st.rotate_right(top);
        self.cpu.fsw &= !(7 << 11);
    }

    /// Operand `n` as 64 bits: an MMX register, an XMM register (low half), a GPR, or memory
    /// of the operand's size (zero-extended; 16-byte operands are the SSE forms and return
    /// the low half, see `cvtpd2pi`).
    fn mrd(&mut self, i: &Instruction, n: u32) -> R<u64> {
        if i.op_kind(n) == OpKind::Register
            && let Some(k) = mmidx(i.op_register(n))
        {
            return Ok(self.mm(k));
        }
        Ok(self.xrd(i, n)? as u64)
    }

    pub(crate) fn exec_mmx(&mut self, i: &Instruction) -> R<()> {
        let mn = i.mnemonic();
        if self.cpu.cr0 & CR0_EM != 0 {
            return ud();
        }
        if let Some(r) = self.simd_family(i) {
            r?;
        }
        let xmm_operand = (0..i.op_count())
            .any(|n| i.op_kind(n) == OpKind::Register && xidx(i.op_register(n)).is_some());
        if xmm_operand && self.cpu.cr4 & CR4_OSFXSR == 0 {
            return ud();
        }
        if self.cpu.cr0 & crate::cpu::CR0_TS != 0 {
            return Err(Exc::Fault(7, None));
        }
        if self.cpu.fsw & FSW_ES != 0 {
            return Err(Exc::Fault(16, None));
        }
        if mn == M::Emms {
            // As the CPU does: TOP = 0 (like every MMX instruction), then every tag empty.
            self.mmx_transition();
            self.cpu.ftw = 0;
            return Ok(());
        }
        // Sources are read (and may fault) before the transition changes any state.
        match mn {
            M::Movd | M::Movq | M::Movntq | M::Movdq2q => {
                let v = self.mrd(i, 1)?;
                let v = if mn == M::Movd { v & 0xffff_ffff } else { v };
                match i.op_kind(0) {
                    OpKind::Register => {
                        let r = i.op_register(0);
                        if let Some(k) = mmidx(r) {
                            self.mmx_transition();
                            self.set_mm(k, v);
                        } else {
                            let idx = crate::exec::gpr_index(r);
                            self.set_gpr_sized(idx, reg_size(r).max(4), v);
                            self.mmx_transition();
                        }
                    }
                    _ => {
                        let a = self.mem_lin(i)?;
                        let size = i.memory_size().size();
                        self.mmx_top0();
                        self.write_lin(a, size, v)?;
                        self.mmx_transition();
                    }
                }
                Ok(())
            }
            M::Movq2dq => {
                let v = self.mrd(i, 1)?;
                let d = xidx(i.op_register(0)).unwrap_or(0);
                self.cpu.xmm[d] = u128::from(v);
                self.mmx_transition();
                Ok(())
            }
            M::Pextrw | M::Pmovmskb => {
                let v = self.mrd(i, 1)?;
                let r = if mn == M::Pextrw {
                    u64::from(u16s(u128::from(v))[usize::from(i.immediate8() & 3)])
                } else {
                    u8s(u128::from(v))
                        .iter()
                        .take(8)
                        .enumerate()
                        .fold(0u64, |acc, (k, b)| acc | (u64::from(b >> 7) << k))
                };
                let reg = i.op_register(0);
                let idx = crate::exec::gpr_index(reg);
                self.set_gpr_sized(idx, reg_size(reg).max(4), r);
                self.mmx_transition();
                Ok(())
            }
            M::Pinsrw => {
                let k = mmidx(i.op_register(0)).unwrap_or(0);
                let v = self.mrd(i, 1)? as u16;
                self.mmx_transition();
                let mut w = u16s(u128::from(self.mm(k)));
                w[usize::from(i.immediate8() & 3)] = v;
                self.set_mm(k, from_u16s(w) as u64);
                Ok(())
            }
            M::Maskmovq => {
                let data = self.mrd(i, 1)?.to_le_bytes();
                let mask = self.mrd(i, 2)?.to_le_bytes();
                // Unlike MOVQ's store, the whole transition comes before the store's fault
                // (measured on this Intel host).
                self.mmx_transition();
                self.masked_store(i, &data, &mask)
            }
            M::Cvtpi2ps | M::Cvtpi2pd => {
                // The transition happens even when the conversion then raises #XM.
                let v = self.mrd(i, 1)?;
                let d = xidx(i.op_register(0)).unwrap_or(0);
                self.mmx_transition();
                self.cvtpi(d, mn, v)
            }
            M::Cvtps2pi | M::Cvttps2pi | M::Cvtpd2pi | M::Cvttpd2pi => {
                let k = mmidx(i.op_register(0)).unwrap_or(0);
                let v = self.xrd(i, 1)?;
                self.mmx_transition();
                let r = self.cvt2pi(mn, v)?;
                self.set_mm(k, r);
                Ok(())
            }
            _ => self.mmx_binary(i),
        }
    }

    /// `mm = mm op src` forms (and the immediate shifts).
    fn mmx_binary(&mut self, i: &Instruction) -> R<()> {
        let mn = i.mnemonic();
        let Some(k) = mmidx(i.op_register(0)) else {
            return Err(Exc::unhandled(format!("MMX {mn:?}")));
        };
        let (b, imm) = if i.op_count() == 2 && i.op_kind(1) == OpKind::Immediate8 {
            (u64::from(i.immediate8()), i.immediate8())
        } else if i.op_count() == 3 {
            (self.mrd(i, 1)?, i.immediate8())
        } else {
            (self.mrd(i, 1)?, 0)
        };
        self.mmx_transition();
        let a = self.mm(k);
        let r = mmx_op(mn, a, b, imm).ok_or_else(|| Exc::unhandled(format!("MMX {mn:?}")))?;
        self.set_mm(k, r);
        Ok(())
    }
}

/// The 64-bit MMX form of `mn` on `a` (destination) and `b` (source).
pub(crate) fn mmx_op(mn: M, a: u64, b: u64, imm: u8) -> Option<u64> {
    let (wa, wb) = (u128::from(a), u128::from(b));
    let mut mxcsr = 0x1f80;
    let lane = |m: M, x: u128, y: u128, imm: u8, mxcsr: &mut u32| -> Option<u64> {
        lane_op(m, x, y, imm, mxcsr)?.ok().map(|v| v as u64)
    };
    match mn {
        // Both sources' elements land in the result: pack / horizontal ops see a:b as one
        // 128-bit source.
        M::Packsswb
        | M::Packssdw
        | M::Packuswb
        | M::Phaddw
        | M::Phaddd
        | M::Phaddsw
        | M::Phsubw
        | M::Phsubd
        | M::Phsubsw => lane(mn, wa | (wb << 64), 0, 0, &mut mxcsr),
        M::Punpckhbw => lane(M::Punpcklbw, wa >> 32, wb >> 32, 0, &mut mxcsr),
        M::Punpckhwd => lane(M::Punpcklwd, wa >> 32, wb >> 32, 0, &mut mxcsr),
        M::Punpckhdq => lane(M::Punpckldq, wa >> 32, wb >> 32, 0, &mut mxcsr),
        M::Pshufb => {
            let (x, y) = (a.to_le_bytes(), b.to_le_bytes());
            let mut o = [0u8; 8];
            for k in 0..8 {
                o[k] = if y[k] & 0x80 != 0 {
                    0
                } else {
                    x[usize::from(y[k] & 7)]
                };
            }
            Some(u64::from_le_bytes(o))
        }
        M::Palignr => {
            let v = (wa << 64) | wb;
            Some(if imm >= 16 {
                0
            } else {
                (v >> (8 * u32::from(imm))) as u64
            })
        }
        M::Pshufw => {
            let x = u16s(wb);
            let mut o = [0u16; 8];
            for k in 0..4 {
                o[k] = x[usize::from((imm >> (2 * k)) & 3)];
            }
            Some(from_u16s(o) as u64)
        }
        M::Psrldq | M::Pslldq | M::Pshufd | M::Pshuflw | M::Pshufhw => None,
        _ => lane(mn, wa, wb, imm, &mut mxcsr),
    }
}
