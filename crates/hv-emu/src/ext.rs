//! The scalar and crypto extensions of x86-64-v3: BMI1, BMI2, LZCNT/TZCNT, MOVBE, ADX,
//! RDRAND/RDSEED, RDTSCP/RDPID, CLFLUSH/CLFLUSHOPT/CLWB, FSGSBASE, AES-NI, PCLMULQDQ, SHA-NI,
//! and the TSX instructions a model without RTM refuses.
//!
//! Every family is gated on the VM's CPU model (`Exec::has`): an instruction whose feature the
//! model does not show raises #UD, as on a CPU without it. The arithmetic of the crypto
//! instructions is in `crypto.rs`.
//!
//! Flags the SDM leaves undefined are set the way this project's Intel host leaves them (the
//! differential tester in `crates/conformance/src/diff_ext.rs` compares them too):
//! * ANDN, BLSI, BLSMSK, BLSR, BZHI: AF and PF cleared.
//! * BEXTR: SF, AF and PF cleared (SF too, whatever the result's top bit).
//! * TZCNT, LZCNT: OF, SF, AF, PF cleared.

use hv::cpu_model::Feature;
use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

use crate::cpu::*;
use crate::crypto;
use crate::exec::{Exc, Exec, R, gp0, mask, ud};
use crate::mmu::Acc;

/// CR4.FSGSBASE.
pub const CR4_FSGSBASE: u64 = 1 << 16;
/// CR4.OSFXSR.
const CR4_OSFXSR: u64 = 1 << 9;
/// CR0.EM.
const CR0_EM: u64 = 1 << 2;
/// CR4.TSD.
const CR4_TSD: u64 = 1 << 2;

/// XMM register index of an iced register, if it is one.
fn xmm_index(r: Register) -> Option<usize> {
    let n = (r as usize).wrapping_sub(Register::XMM0 as usize);
    (n < 16).then_some(n)
}

/// ZF and SF of a `size`-byte result (the other status flags clear).
fn zs(size: usize, r: u64) -> u64 {
    let mut f = 0;
    if r & mask(size) == 0 {
        f |= ZF;
    }
    if r & crate::exec::sign(size) != 0 {
        f |= SF;
    }
    f
}

/// Parallel bit deposit: the low bits of `src`, in order, to the set positions of `m`.
fn pdep(src: u64, mut m: u64) -> u64 {
    let mut r = 0;
    let mut k = 0;
    while m != 0 {
        let low = m & m.wrapping_neg();
        if (src >> k) & 1 != 0 {
            r |= low;
        }
        k += 1;
        m &= m - 1;
    }
    r
}

/// Parallel bit extract: the bits of `src` at the set positions of `m`, packed to the bottom.
fn pext(src: u64, mut m: u64) -> u64 {
    let mut r = 0;
    let mut k = 0;
    while m != 0 {
        let low = m & m.wrapping_neg();
        if src & low != 0 {
            r |= 1 << k;
        }
        k += 1;
        m &= m - 1;
    }
    r
}

impl Exec<'_> {
    /// The VEX-encoded general-register instructions (BMI1, BMI2), or `None` for any other VEX
    /// instruction. The VEX branch at the top of [`Exec::exec`] calls this first.
    pub(crate) fn exec_vex_gpr(&mut self, i: &Instruction) -> Option<R<()>> {
        let mn = i.mnemonic();
        let feature = match mn {
            M::Andn | M::Bextr | M::Blsi | M::Blsmsk | M::Blsr => Feature::Bmi1,
            M::Bzhi | M::Mulx | M::Pdep | M::Pext | M::Rorx | M::Sarx | M::Shlx | M::Shrx => {
                Feature::Bmi2
            }
            _ => return None,
        };
        // VEX encodings do not exist in real-address and virtual-8086 mode.
        if !self.has(feature) || !self.cpu.protected() || self.cpu.rflags & VM != 0 {
            return Some(ud());
        }
        Some(self.bmi(i, mn))
    }

    fn bmi(&mut self, i: &Instruction, mn: M) -> R<()> {
        let size = self.op_size(i, 0);
        let bits = (size * 8) as u64;
        let m = mask(size);
        match mn {
            M::Andn => {
                let a = self.rd(i, 1)? & m;
                let b = self.rd(i, 2)? & m;
                let r = !a & b & m;
                self.wr(i, 0, r)?;
                self.set_flags(ARITH_FLAGS, zs(size, r));
            }
            M::Bextr => {
                let src = self.rd(i, 1)? & m;
                let ctl = self.rd(i, 2)?;
                let start = ctl & 0xff;
                let len = (ctl >> 8) & 0xff;
                let v = if start >= bits { 0 } else { src >> start };
                let r = if len >= 64 {
                    v
                } else {
                    v & ((1u64 << len) - 1)
                };
                self.wr(i, 0, r)?;
                // SF is undefined: Intel clears it (even when bit size-1 of the result is set).
                self.set_flags(ARITH_FLAGS, zs(size, r) & ZF);
            }
            M::Blsi | M::Blsmsk | M::Blsr => {
                let src = self.rd(i, 1)? & m;
                let r = match mn {
                    M::Blsi => src & src.wrapping_neg(),
                    M::Blsmsk => src ^ src.wrapping_sub(1),
                    _ => src & src.wrapping_sub(1),
                } & m;
                self.wr(i, 0, r)?;
                let mut f = zs(size, r);
                let cf = if mn == M::Blsi { src != 0 } else { src == 0 };
                if cf {
                    f |= CF;
                }
                self.set_flags(ARITH_FLAGS, f);
            }
            M::Bzhi => {
                let src = self.rd(i, 1)? & m;
                let n = self.rd(i, 2)? & 0xff;
                let (r, cf) = if n < bits {
                    (src & ((1u64 << n) - 1), 0)
                } else {
                    (src, CF)
                };
                self.wr(i, 0, r)?;
                self.set_flags(ARITH_FLAGS, zs(size, r) | cf);
            }
            M::Mulx => {
                let b = self.rd(i, 2)? & m;
                let p = u128::from(self.cpu.gpr[2] & m) * u128::from(b);
                // Low half to the second operand first: with both the same register, the
                // high half is what stays.
                self.wr(i, 1, p as u64 & m)?;
                self.wr(i, 0, (p >> bits) as u64 & m)?;
            }
            M::Pdep | M::Pext => {
                let src = self.rd(i, 1)? & m;
                let msk = self.rd(i, 2)? & m;
                let r = if mn == M::Pdep {
                    pdep(src, msk)
                } else {
                    pext(src, msk)
                };
                self.wr(i, 0, r)?;
            }
            M::Rorx => {
                let src = self.rd(i, 1)? & m;
                let c = (self.rd(i, 2)? & (bits - 1)) as u32;
                let r = if size == 8 {
                    src.rotate_right(c)
                } else {
                    u64::from((src as u32).rotate_right(c))
                };
                self.wr(i, 0, r)?;
            }
            _ => {
                // SARX, SHLX, SHRX: the count is the third operand, masked to the size.
                let src = self.rd(i, 1)? & m;
                let c = self.rd(i, 2)? & (bits - 1);
                let r = match mn {
                    M::Shlx => src << c,
                    M::Shrx => src >> c,
                    _ => (crate::exec::sx(src, size) as i64 >> c) as u64,
                } & m;
                self.wr(i, 0, r)?;
            }
        }
        Ok(())
    }

    /// Legacy-encoded extension instructions (see the module doc). Returns `None` for any other
    /// instruction.
    pub(crate) fn exec_ext(&mut self, i: &Instruction) -> Option<R<()>> {
        let mn = i.mnemonic();
        Some(match mn {
            M::Tzcnt | M::Lzcnt => self.count_zeros(i, mn == M::Tzcnt),
            M::Movbe => self.gated(Feature::Movbe, |ex| ex.movbe(i)),
            M::Adcx | M::Adox => self.gated(Feature::Adx, |ex| ex.adx(i, mn == M::Adcx)),
            M::Rdrand => self.gated(Feature::Rdrand, |ex| ex.rdrand(i)),
            M::Rdseed => self.gated(Feature::Rdseed, |ex| ex.rdrand(i)),
            M::Rdtscp => self.gated(Feature::Rdtscp, |ex| ex.rdtscp()),
            M::Rdpid => self.gated(Feature::Rdpid, |ex| {
                let aux = ex.cpu.msr.tsc_aux & 0xffff_ffff;
                ex.wr(i, 0, aux)
            }),
            M::Clflush => self.cache_line_op(i),
            M::Clflushopt => self.gated(Feature::Clflushopt, |ex| ex.cache_line_op(i)),
            M::Clwb => self.gated(Feature::Clwb, |ex| ex.cache_line_op(i)),
            M::Rdfsbase | M::Rdgsbase | M::Wrfsbase | M::Wrgsbase => self.fsgsbase(i, mn),
            // No model emu presents shows RTM or HLE: the TSX instructions raise #UD (XTEST
            // too: it needs either). HLE's XACQUIRE/XRELEASE prefixes are ignored, as CPUs
            // without HLE do.
            M::Xbegin | M::Xend | M::Xabort | M::Xtest => ud(),
            M::Aesenc | M::Aesenclast | M::Aesdec | M::Aesdeclast | M::Aesimc => {
                self.gated(Feature::Aes, |ex| ex.aes(i, mn))
            }
            M::Aeskeygenassist => self.gated(Feature::Aes, |ex| {
                let src = ex.xmm_src(i, 1)?;
                let dst = ex.xmm_dst(i)?;
                ex.cpu.xmm[dst] = crypto::aeskeygenassist(src, i.immediate8());
                Ok(())
            }),
            M::Pclmulqdq => self.gated(Feature::Pclmulqdq, |ex| {
                let src = ex.xmm_src(i, 1)?;
                let dst = ex.xmm_dst(i)?;
                ex.cpu.xmm[dst] = crypto::pclmulqdq(ex.cpu.xmm[dst], src, i.immediate8());
                Ok(())
            }),
            M::Sha1rnds4
            | M::Sha1nexte
            | M::Sha1msg1
            | M::Sha1msg2
            | M::Sha256rnds2
            | M::Sha256msg1
            | M::Sha256msg2 => self.gated(Feature::Sha, |ex| ex.sha(i, mn)),
            _ => return None,
        })
    }

    fn gated(&mut self, f: Feature, run: impl FnOnce(&mut Self) -> R<()>) -> R<()> {
        if self.has(f) { run(self) } else { ud() }
    }

    /// TZCNT (BMI1) and LZCNT (ABM); without the feature the F3 prefix is ignored and the
    /// instruction is BSF or BSR.
    fn count_zeros(&mut self, i: &Instruction, trailing: bool) -> R<()> {
        let size = self.op_size(i, 0);
        let bits = (size * 8) as u32;
        let v = self.rd(i, 1)? & mask(size);
        let has = self.has(if trailing {
            Feature::Bmi1
        } else {
            Feature::Abm
        });
        if !has {
            if v == 0 {
                self.cpu.rflags |= ZF;
                return Ok(());
            }
            self.cpu.rflags &= !ZF;
            let r = if trailing {
                v.trailing_zeros()
            } else {
                63 - v.leading_zeros()
            };
            return self.wr(i, 0, u64::from(r));
        }
        let r = if v == 0 {
            bits
        } else if trailing {
            v.trailing_zeros()
        } else {
            v.leading_zeros() - (64 - bits)
        };
        self.wr(i, 0, u64::from(r))?;
        let mut f = 0;
        if v == 0 {
            f |= CF;
        }
        if r == 0 {
            f |= ZF;
        }
        self.set_flags(ARITH_FLAGS, f);
        Ok(())
    }

    fn movbe(&mut self, i: &Instruction) -> R<()> {
        let size = self.op_size(i, 0);
        let v = self.rd(i, 1)?;
        let swapped = match size {
            2 => u64::from((v as u16).swap_bytes()),
            4 => u64::from((v as u32).swap_bytes()),
            _ => v.swap_bytes(),
        };
        self.wr(i, 0, swapped)
    }

    /// ADCX (carry in and out through CF) and ADOX (through OF); no other flag changes.
    fn adx(&mut self, i: &Instruction, carry: bool) -> R<()> {
        let size = self.op_size(i, 0);
        let m = mask(size);
        let flag = if carry { CF } else { OF };
        let a = self.rd(i, 0)? & m;
        let b = self.rd(i, 1)? & m;
        let wide = u128::from(a) + u128::from(b) + u128::from(self.flag(flag));
        self.wr(i, 0, wide as u64 & m)?;
        let out = if wide > u128::from(m) { flag } else { 0 };
        self.set_flags(flag, out);
        Ok(())
    }

    /// RDRAND and RDSEED: host randomness; CF=1 with a value, CF=0 and 0 when the host has
    /// none to give (software retries, as on hardware).
    fn rdrand(&mut self, i: &Instruction) -> R<()> {
        let (v, f) = match getrandom::u64() {
            Ok(v) => (v, CF),
            Err(_) => (0, 0),
        };
        let size = self.op_size(i, 0);
        self.wr(i, 0, v & mask(size))?;
        self.set_flags(ARITH_FLAGS, f);
        Ok(())
    }

    fn rdtscp(&mut self) -> R<()> {
        if self.cpu.cr4 & CR4_TSD != 0 && self.cpu.cpl != 0 {
            return gp0();
        }
        let t = self.guest_tsc();
        self.cpu.gpr[0] = t & 0xffff_ffff;
        self.cpu.gpr[2] = t >> 32;
        self.cpu.gpr[1] = self.cpu.msr.tsc_aux & 0xffff_ffff;
        Ok(())
    }

    /// CLFLUSH, CLFLUSHOPT, CLWB: the address is checked like a one-byte read (#GP/#SS for a
    /// non-canonical address, #PF for an unmapped one); the cache itself is not modelled.
    fn cache_line_op(&mut self, i: &Instruction) -> R<()> {
        let a = self.mem_lin(i)?;
        let user = self.cpu.cpl == 3;
        self.translate(a, Acc::Read, user)?;
        Ok(())
    }

    fn fsgsbase(&mut self, i: &Instruction, mn: M) -> R<()> {
        if !self.cpu.mode64() || self.cpu.cr4 & CR4_FSGSBASE == 0 || !self.has(Feature::Fsgsbase) {
            return ud();
        }
        let seg = if matches!(mn, M::Rdfsbase | M::Wrfsbase) {
            FS
        } else {
            GS
        };
        let size = self.op_size(i, 0);
        match mn {
            M::Rdfsbase | M::Rdgsbase => {
                let v = self.cpu.seg[seg].base & mask(size);
                self.wr(i, 0, v)
            }
            _ => {
                let v = self.rd(i, 0)? & mask(size);
                if !crate::decode::canonical(v) {
                    return gp0();
                }
                self.cpu.seg[seg].base = v;
                Ok(())
            }
        }
    }

    /// SSE-form checks: CR0.EM or a clear CR4.OSFXSR make SSE instructions #UD.
    fn sse_enabled(&self) -> R<()> {
        if self.cpu.cr0 & CR0_EM != 0 || self.cpu.cr4 & CR4_OSFXSR == 0 {
            return ud();
        }
        Ok(())
    }

    /// The XMM register of operand 0.
    fn xmm_dst(&self, i: &Instruction) -> R<usize> {
        match i.op_kind(0) {
            OpKind::Register => xmm_index(i.op_register(0))
                .ok_or_else(|| Exc::unhandled("destination is not an XMM register")),
            _ => Err(Exc::unhandled("destination is not an XMM register")),
        }
    }

    /// Operand `n` as 128 bits: an XMM register or a 16-byte-aligned m128 (legacy SSE forms
    /// raise #GP(0) for a misaligned one).
    fn xmm_src(&mut self, i: &Instruction, n: u32) -> R<u128> {
        self.sse_enabled()?;
        match i.op_kind(n) {
            OpKind::Register => match xmm_index(i.op_register(n)) {
                Some(x) => Ok(self.cpu.xmm[x]),
                None => Err(Exc::unhandled("source is not an XMM register")),
            },
            OpKind::Memory => {
                let a = self.mem_lin(i)?;
                if a & 15 != 0 {
                    return gp0();
                }
                self.read_u128(a)
            }
            _ => Err(Exc::unhandled("source is not an XMM operand")),
        }
    }

    fn aes(&mut self, i: &Instruction, mn: M) -> R<()> {
        let src = self.xmm_src(i, 1)?;
        let dst = self.xmm_dst(i)?;
        let d = self.cpu.xmm[dst];
        self.cpu.xmm[dst] = match mn {
            M::Aesenc => crypto::aesenc(d, src),
            M::Aesenclast => crypto::aesenclast(d, src),
            M::Aesdec => crypto::aesdec(d, src),
            M::Aesdeclast => crypto::aesdeclast(d, src),
            _ => crypto::aesimc(src),
        };
        Ok(())
    }

    fn sha(&mut self, i: &Instruction, mn: M) -> R<()> {
        let src = self.xmm_src(i, 1)?;
        let dst = self.xmm_dst(i)?;
        let d = self.cpu.xmm[dst];
        self.cpu.xmm[dst] = match mn {
            M::Sha1rnds4 => crypto::sha1rnds4(d, src, i.immediate8()),
            M::Sha1nexte => crypto::sha1nexte(d, src),
            M::Sha1msg1 => crypto::sha1msg1(d, src),
            M::Sha1msg2 => crypto::sha1msg2(d, src),
            M::Sha256rnds2 => crypto::sha256rnds2(d, src, self.cpu.xmm[0]),
            M::Sha256msg1 => crypto::sha256msg1(d, src),
            _ => crypto::sha256msg2(d, src),
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pdep_pext_known_values() {
        assert_eq!(pdep(0b1011, 0b1111_0000), 0b1011_0000);
        assert_eq!(pdep(0b101, 0b1010_1000), 0b1000_1000);
        assert_eq!(pext(0b1011_0000, 0b1111_0000), 0b1011);
        assert_eq!(pext(u64::MAX, u64::MAX), u64::MAX);
        assert_eq!(pdep(u64::MAX, u64::MAX), u64::MAX);
        assert_eq!(pdep(0x1234, u64::MAX), 0x1234);
        assert_eq!(pext(0x8000_0000_0000_0001, 0x8000_0000_0000_0001), 3);
    }
}
