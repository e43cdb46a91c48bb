//! A tiny x86-64 emitter for the translator's glue code.
//!
//! Written by hand instead of using iced-x86's `CodeAssembler`/`BlockEncoder` because those
//! cost about 8-13 us per guest instruction during a Linux boot (measured: 3.7 s of a 15 s
//! run went to emission), which ate the whole gain of translating. The glue needs only a
//! dozen fixed forms (64-bit `mov`/`lea` with a `[base + index*scale + disp32]` operand,
//! `mov` immediates, BMI2 shifts, `jrcxz`, `jmp`/`jcc` rel32), so they are encoded here
//! directly; the guest instructions themselves are still re-encoded with iced-x86's
//! `Encoder`. Memory operands take the shortest displacement (none, 8 or 32 bits; the RBP/R13
//! and RSP/R12 special cases handled), since most glue addresses the guest register file and
//! the context at small offsets.

/// Host register numbers.
pub const RAX: u8 = 0;
pub const RCX: u8 = 1;
pub const RDX: u8 = 2;
pub const RBX: u8 = 3;
pub const RBP: u8 = 5;
pub const RSP: u8 = 4;
pub const RSI: u8 = 6;
pub const RDI: u8 = 7;
pub const R8: u8 = 8;
pub const R12: u8 = 12;
pub const R13: u8 = 13;
pub const R14: u8 = 14;
pub const R15: u8 = 15;

/// A jump target inside the block being emitted.
#[derive(Clone, Copy)]
pub struct Label(usize);

#[derive(Default)]
pub struct Asm {
    pub buf: Vec<u8>,
    labels: Vec<Option<usize>>,
    /// (position of a rel32 field, label)
    fixups: Vec<(usize, usize)>,
}

/// A memory operand `[base + index*scale + disp]`.
#[derive(Clone, Copy)]
pub struct Mem {
    pub base: Option<u8>,
    pub index: Option<(u8, u32)>,
    pub disp: i32,
}

/// `[base + index]`.
pub fn sum(base: u8, index: u8) -> Mem {
    Mem {
        base: Some(base),
        index: Some((index, 1)),
        disp: 0,
    }
}

pub fn at(base: u8, disp: i32) -> Mem {
    Mem {
        base: Some(base),
        index: None,
        disp,
    }
}

impl Asm {
    pub fn reset(&mut self) {
        self.buf.clear();
        self.labels.clear();
        self.fixups.clear();
    }

    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    pub fn bind(&mut self, l: Label) {
        if let Some(p) = self.labels.get_mut(l.0) {
            *p = Some(self.buf.len());
        }
    }

    /// Where `l` was bound, if it was.
    pub fn pos(&self, l: Label) -> Option<usize> {
        self.labels.get(l.0).copied().flatten()
    }

    /// Patches every rel32 to its label. False if a label was never bound.
    pub fn finish(&mut self) -> bool {
        for &(pos, l) in &self.fixups {
            let Some(Some(target)) = self.labels.get(l) else {
                return false;
            };
            let rel = (*target as i64 - (pos as i64 + 4)) as i32;
            if let Some(f) = self.buf.get_mut(pos..pos + 4) {
                f.copy_from_slice(&rel.to_le_bytes());
            }
        }
        true
    }

    pub fn bytes(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }

    fn rel32(&mut self, l: Label) {
        self.fixups.push((self.buf.len(), l.0));
        self.buf.extend_from_slice(&[0; 4]);
    }

    /// REX.W + opcode + ModRM/SIB/disp for `reg, [mem]`.
    fn op_mem(&mut self, opcode: &[u8], reg: u8, m: Mem) {
        self.op_mem_w(true, opcode, reg, m);
    }

    /// [REX] + opcode + ModRM/SIB/disp for `reg, [mem]`, 64-bit operand size if `w`.
    fn op_mem_w(&mut self, w: bool, opcode: &[u8], reg: u8, m: Mem) {
        let (x, b) = (
            m.index.map_or(0, |(i, _)| i >> 3),
            m.base.map_or(0, |b| b >> 3),
        );
        let rex = (u8::from(w) << 3) | ((reg >> 3) << 2) | (x << 1) | b;
        if rex != 0 {
            self.buf.push(0x40 | rex);
        }
        self.buf.extend_from_slice(opcode);
        self.modrm(reg, m);
    }

    /// ModRM, SIB and displacement of `reg, [m]` (the prefixes and opcode already out).
    fn modrm(&mut self, reg: u8, m: Mem) {
        let r = (reg & 7) << 3;
        let ss = |s: u32| match s {
            2 => 1u8,
            4 => 2,
            8 => 3,
            _ => 0,
        };
        // The shortest displacement: none (mod 00) unless the base is rbp/r13, whose mod 00
        // means something else; 8 bits (mod 01); else 32 bits (mod 10).
        let (md, disp8) = match m.base {
            Some(base) if m.disp == 0 && base & 7 != 5 => (0x00, None),
            Some(_) => match i8::try_from(m.disp) {
                Ok(d) => (0x40, Some(d)),
                Err(_) => (0x80, None),
            },
            None => (0x00, None),
        };
        match (m.base, m.index) {
            (Some(base), None) if base & 7 != 4 => self.buf.push(md | r | (base & 7)),
            (Some(base), None) => {
                self.buf.push(md | r | 4);
                self.buf.push(0x20 | (base & 7));
            }
            (Some(base), Some((i, s))) => {
                self.buf.push(md | r | 4);
                self.buf.push((ss(s) << 6) | ((i & 7) << 3) | (base & 7));
            }
            (None, Some((i, s))) => {
                self.buf.push(r | 4);
                self.buf.push((ss(s) << 6) | ((i & 7) << 3) | 5);
            }
            (None, None) => {
                // [disp32] through SIB (no base, no index): absolute, not RIP-relative.
                self.buf.push(r | 4);
                self.buf.push(0x25);
            }
        }
        match (md, disp8) {
            (0x40, Some(d)) => self.buf.push(d as u8),
            (0x00, _) if m.base.is_some() => {}
            _ => self.buf.extend_from_slice(&m.disp.to_le_bytes()),
        }
    }

    /// mov r64, [m]
    pub fn load(&mut self, dst: u8, m: Mem) {
        self.op_mem(&[0x8b], dst, m);
    }

    /// mov [m], r64
    pub fn store(&mut self, m: Mem, src: u8) {
        self.op_mem(&[0x89], src, m);
    }

    /// lea r64, [m]
    pub fn lea(&mut self, dst: u8, m: Mem) {
        self.op_mem(&[0x8d], dst, m);
    }

    /// mov qword [m], imm32 (sign-extended)
    pub fn store_imm(&mut self, m: Mem, imm: i32) {
        self.op_mem(&[0xc7], 0, m);
        self.buf.extend_from_slice(&imm.to_le_bytes());
    }

    /// mov r64, r64
    pub fn mov(&mut self, dst: u8, src: u8) {
        self.buf.push(0x48 | ((src >> 3) << 2) | (dst >> 3));
        self.buf.push(0x89);
        self.buf.push(0xc0 | ((src & 7) << 3) | (dst & 7));
    }

    /// mov r64, imm64 (shortest flag-neutral form)
    pub fn mov_imm(&mut self, dst: u8, imm: u64) {
        if imm <= u64::from(u32::MAX) {
            if dst >= 8 {
                self.buf.push(0x41);
            }
            self.buf.push(0xb8 + (dst & 7));
            self.buf.extend_from_slice(&(imm as u32).to_le_bytes());
        } else if (imm as i64) >= i64::from(i32::MIN) && (imm as i64) <= i64::from(i32::MAX) {
            self.buf.push(0x48 | (dst >> 3));
            self.buf.push(0xc7);
            self.buf.push(0xc0 | (dst & 7));
            self.buf.extend_from_slice(&(imm as i32).to_le_bytes());
        } else {
            self.buf.push(0x48 | (dst >> 3));
            self.buf.push(0xb8 + (dst & 7));
            self.buf.extend_from_slice(&imm.to_le_bytes());
        }
    }

    /// pdep (pp = 3; pext would be pp = 2) r64 dst, r64 src, qword [m]; no flags.
    fn bmi2_mem(&mut self, pp: u8, dst: u8, src: u8, m: Mem) {
        let (x, b) = (
            m.index.map_or(0, |(i, _)| i >> 3),
            m.base.map_or(0, |b| b >> 3),
        );
        self.buf.push(0xc4);
        self.buf
            .push(((!(dst >> 3) & 1) << 7) | ((!x & 1) << 6) | ((!b & 1) << 5) | 0x02);
        self.buf.push(0x80 | ((!src & 15) << 3) | pp);
        self.buf.push(0xf5);
        self.modrm(dst, m);
    }

    /// pdep dst, src, qword [m]: the low bits of `src` spread to where the mask at `m` has
    /// ones (flags unchanged).
    pub fn pdep_mem(&mut self, dst: u8, src: u8, m: Mem) {
        self.bmi2_mem(3, dst, src, m);
    }

    /// pext dst, src, qword [m]: the bits of `src` where the mask at `m` has ones, packed into
    /// the low bits of `dst` (flags unchanged).
    pub fn pext_mem(&mut self, dst: u8, src: u8, m: Mem) {
        self.bmi2_mem(2, dst, src, m);
    }

    /// shrx (pp = 3), sarx (pp = 2), shlx (pp = 1): dst = src shifted by cnt; no flags.
    fn bmi2_shift(&mut self, pp: u8, dst: u8, src: u8, cnt: u8) {
        self.buf.push(0xc4);
        self.buf
            .push(((!(dst >> 3) & 1) << 7) | (1 << 6) | ((!(src >> 3) & 1) << 5) | 0x02);
        self.buf.push(0x80 | ((!cnt & 15) << 3) | pp);
        self.buf.push(0xf7);
        self.buf.push(0xc0 | ((dst & 7) << 3) | (src & 7));
    }

    pub fn shrx(&mut self, dst: u8, src: u8, cnt: u8) {
        self.bmi2_shift(3, dst, src, cnt);
    }

    pub fn sarx(&mut self, dst: u8, src: u8, cnt: u8) {
        self.bmi2_shift(2, dst, src, cnt);
    }

    pub fn shlx(&mut self, dst: u8, src: u8, cnt: u8) {
        self.bmi2_shift(1, dst, src, cnt);
    }

    /// jrcxz over the next 5-byte jmp: `jrcxz +5; jmp l` (jump to `l` when rcx != 0).
    pub fn jmp_unless_rcx_zero(&mut self, l: Label) {
        self.bytes(&[0xe3, 0x05, 0xe9]);
        self.rel32(l);
    }

    /// `jrcxz l` (`jecxz l` when `ecx`: the low 32 bits only) to a label already bound
    /// within a rel8 reach behind; false (nothing emitted) otherwise.
    pub fn jrcxz_back(&mut self, l: Label, ecx: bool) -> bool {
        let len = if ecx { 3 } else { 2 };
        let Some(target) = self.pos(l) else {
            return false;
        };
        let Ok(rel) = i8::try_from(target as i64 - (self.buf.len() + len) as i64) else {
            return false;
        };
        if ecx {
            self.buf.push(0x67);
        }
        self.buf.extend_from_slice(&[0xe3, rel as u8]);
        true
    }

    /// Jumps to `l` when rcx is 0, falling through otherwise, with a not-taken branch on the
    /// fall-through path: `jrcxz +2` into the immediate of a `mov dead, imm64` whose first
    /// five immediate bytes are `jmp rel32 l`. On the fall-through path the `mov` runs and
    /// only writes `dead`, which the caller does not need. (`jrcxz` reaches 127 bytes and
    /// jumps on zero; this gives a far target without a branch taken in the common case.)
    pub fn jrcxz_far(&mut self, l: Label, dead: u8) {
        self.buf.extend_from_slice(&[0xe3, 0x02]);
        self.buf.push(0x48 | (dead >> 3));
        self.buf.push(0xb8 | (dead & 7));
        self.buf.push(0xe9);
        self.rel32(l);
        self.buf.extend_from_slice(&[0xcc; 3]);
    }

    /// rorx r64, r64, imm8 (BMI2; flags unchanged)
    pub fn rorx(&mut self, dst: u8, src: u8, imm: u8) {
        self.buf.push(0xc4);
        self.buf
            .push(((!(dst >> 3) & 1) << 7) | (1 << 6) | ((!(src >> 3) & 1) << 5) | 0x03);
        self.buf.push(0xfb);
        self.buf.push(0xf0);
        self.buf.push(0xc0 | ((dst & 7) << 3) | (src & 7));
        self.buf.push(imm);
    }

    /// lea r64, [rip + label]
    pub fn lea_label(&mut self, dst: u8, l: Label) {
        self.buf.push(0x48 | ((dst >> 3) << 2));
        self.buf.push(0x8d);
        self.buf.push(0x05 | ((dst & 7) << 3));
        self.rel32(l);
    }

    /// `jmp l` whose rel32 field is bound to `site` (a jump that may be patched later).
    pub fn jmp_site(&mut self, l: Label, site: Label) {
        self.buf.push(0xe9);
        self.bind(site);
        self.rel32(l);
    }

    /// not r64 (flags unchanged)
    pub fn not(&mut self, r: u8) {
        self.buf.push(0x48 | (r >> 3));
        self.buf.push(0xf7);
        self.buf.push(0xd0 | (r & 7));
    }

    /// mov r32, [r64] (zero-extends)
    pub fn load32(&mut self, dst: u8, base: u8) {
        self.op_mem_w(false, &[0x8b], dst, at(base, 0));
    }

    /// lea r32, [r32 + disp] (32-bit result, zero-extended; flags unchanged)
    pub fn lea32(&mut self, dst: u8, base: u8, disp: i32) {
        self.op_mem_w(false, &[0x8d], dst, at(base, disp));
    }

    /// ret
    pub fn ret(&mut self) {
        self.buf.push(0xc3);
    }

    /// jmp qword [base + disp32]
    pub fn jmp_mem(&mut self, base: u8, disp: i32) {
        if base >= 8 {
            self.buf.push(0x41);
        }
        self.buf.push(0xff);
        self.buf.push(0xa0 | (base & 7));
        if base & 7 == 4 {
            self.buf.push(0x24);
        }
        self.buf.extend_from_slice(&disp.to_le_bytes());
    }

    pub fn jmp(&mut self, l: Label) {
        self.buf.push(0xe9);
        self.rel32(l);
    }

    /// jcc rel32 with condition number `cc` (0 = o .. 15 = g).
    pub fn jcc(&mut self, cc: u8, l: Label) {
        self.bytes(&[0x0f, 0x80 | (cc & 15)]);
        self.rel32(l);
    }
}

#[cfg(test)]
mod tests {
    use iced_x86::code_asm::{self as x, CodeAssembler};
    use iced_x86::{Decoder, DecoderOptions, Instruction};

    use super::*;

    const R9: u8 = 9;

    /// What matters of an instruction: form, registers, memory operand, immediate.
    fn key(i: &Instruction) -> String {
        let regs: Vec<_> = (0..i.op_count())
            .map(|n| (i.op_kind(n), i.op_register(n)))
            .collect();
        let imm = (0..i.op_count())
            .find(|&n| {
                !matches!(
                    i.op_kind(n),
                    iced_x86::OpKind::Register | iced_x86::OpKind::Memory
                )
            })
            .map(|n| i.immediate(n));
        format!(
            "{:?} {regs:?} [{:?}+{:?}*{}+{:#x}] {imm:?}",
            i.mnemonic(),
            i.memory_base(),
            i.memory_index(),
            i.memory_index_scale(),
            i.memory_displacement64()
        )
    }

    fn keys(b: &[u8]) -> Vec<String> {
        Decoder::with_ip(64, b, 0, DecoderOptions::NONE)
            .into_iter()
            .map(|i| key(&i))
            .collect()
    }

    #[test]
    fn encodings_match_the_assembler() {
        let mut a = Asm::default();
        a.load(R12, at(RBX, 8 * 5));
        a.store(at(R12, -8), R8);
        a.lea(
            RSI,
            Mem {
                base: Some(R13),
                index: Some((RDI, 8)),
                disp: 16,
            },
        );
        a.lea(
            RSI,
            Mem {
                base: None,
                index: Some((RCX, 4)),
                disp: -3,
            },
        );
        a.store_imm(at(R15, 0x40), -1);
        a.mov(RBP, RSI);
        a.mov(R8, RAX);
        a.mov_imm(RAX, 0x1234);
        a.mov_imm(RDX, 0x1234_5678_9abc);
        a.shrx(RDX, RSI, R13);
        a.sarx(RCX, R8, RDX);
        a.shlx(R9, RSI, RDX);
        a.load(
            RSI,
            Mem {
                base: None,
                index: None,
                disp: 0x5008,
            },
        );
        a.lea(
            RCX,
            Mem {
                base: Some(RCX),
                index: Some((R12, 1)),
                disp: 0,
            },
        );
        a.not(RCX);
        a.not(R12);
        a.load32(RCX, RCX);
        a.load32(R8, R12);
        a.lea32(RCX, RCX, -5);
        a.lea32(RDX, R13, 0x7000_0000);
        a.jmp_mem(RDI, 8);
        a.jmp_mem(R12, -16);
        // Short displacements and their special cases (rbp/r13 base, rsp/r12 base).
        a.load(RAX, at(RBP, 0));
        a.load(RCX, at(R13, 0));
        a.store(at(R12, 0), RDX);
        a.load(RDX, at(RSI, 0x1000));
        a.load(RDX, at(RSI, -128));
        a.lea(
            RDI,
            Mem {
                base: Some(R14),
                index: Some((RCX, 8)),
                disp: 0,
            },
        );
        a.lea(
            RSI,
            Mem {
                base: Some(R13),
                index: Some((RAX, 1)),
                disp: 0,
            },
        );
        a.load(R8, at(R12, 24));
        a.load32(RCX, R13);
        a.lea32(RCX, RBP, 3);
        a.pdep_mem(RDX, RSI, at(RSP, 8));
        a.pdep_mem(RCX, RCX, at(RSP, 16));
        a.pdep_mem(R8, R13, at(R12, 0));
        a.pext_mem(RDX, RSI, at(RSP, 8));
        a.pext_mem(R9, R9 + 1, at(R12, 0));
        a.rorx(RCX, RCX, 32);
        a.rorx(R9, R12, 1);
        let mut c = CodeAssembler::new(64).unwrap();
        c.mov(x::r12, x::qword_ptr(x::rbx + 40)).unwrap();
        c.mov(x::qword_ptr(x::r12 - 8), x::r8).unwrap();
        c.lea(x::rsi, x::qword_ptr(x::r13 + x::rdi * 8 + 16))
            .unwrap();
        c.lea(x::rsi, x::qword_ptr(x::rcx * 4 - 3)).unwrap();
        c.mov(x::qword_ptr(x::r15 + 0x40), -1).unwrap();
        c.mov(x::rbp, x::rsi).unwrap();
        c.mov(x::r8, x::rax).unwrap();
        c.mov(x::eax, 0x1234).unwrap();
        c.mov(x::rdx, 0x1234_5678_9abcu64).unwrap();
        c.shrx(x::rdx, x::rsi, x::r13).unwrap();
        c.sarx(x::rcx, x::r8, x::rdx).unwrap();
        c.shlx(x::r9, x::rsi, x::rdx).unwrap();
        c.mov(x::rsi, x::qword_ptr(0x5008u64)).unwrap();
        c.lea(x::rcx, x::qword_ptr(x::rcx + x::r12)).unwrap();
        c.not(x::rcx).unwrap();
        c.not(x::r12).unwrap();
        c.mov(x::ecx, x::dword_ptr(x::rcx)).unwrap();
        c.mov(x::r8d, x::dword_ptr(x::r12)).unwrap();
        c.lea(x::ecx, x::dword_ptr(x::rcx - 5)).unwrap();
        c.lea(x::edx, x::dword_ptr(x::r13 + 0x7000_0000)).unwrap();
        c.jmp(x::qword_ptr(x::rdi + 8)).unwrap();
        c.jmp(x::qword_ptr(x::r12 - 16)).unwrap();
        c.mov(x::rax, x::qword_ptr(x::rbp)).unwrap();
        c.mov(x::rcx, x::qword_ptr(x::r13)).unwrap();
        c.mov(x::qword_ptr(x::r12), x::rdx).unwrap();
        c.mov(x::rdx, x::qword_ptr(x::rsi + 0x1000)).unwrap();
        c.mov(x::rdx, x::qword_ptr(x::rsi - 128)).unwrap();
        c.lea(x::rdi, x::qword_ptr(x::r14 + x::rcx * 8)).unwrap();
        c.lea(x::rsi, x::qword_ptr(x::r13 + x::rax)).unwrap();
        c.mov(x::r8, x::qword_ptr(x::r12 + 24)).unwrap();
        c.mov(x::ecx, x::dword_ptr(x::r13)).unwrap();
        c.lea(x::ecx, x::dword_ptr(x::rbp + 3)).unwrap();
        c.pdep(x::rdx, x::rsi, x::qword_ptr(x::rsp + 8)).unwrap();
        c.pdep(x::rcx, x::rcx, x::qword_ptr(x::rsp + 16)).unwrap();
        c.pdep(x::r8, x::r13, x::qword_ptr(x::r12)).unwrap();
        c.pext(x::rdx, x::rsi, x::qword_ptr(x::rsp + 8)).unwrap();
        c.pext(x::r9, x::r10, x::qword_ptr(x::r12)).unwrap();
        c.rorx(x::rcx, x::rcx, 32).unwrap();
        c.rorx(x::r9, x::r12, 1).unwrap();
        let want = keys(&c.assemble(0).unwrap());
        let got = keys(&a.buf);
        assert_eq!(got, want);
        let mut a = Asm::default();
        a.mov_imm(R8, u64::MAX);
        let i = Decoder::with_ip(64, &a.buf, 0, DecoderOptions::NONE).decode();
        assert_eq!(
            (i.op0_register(), i.immediate(1)),
            (iced_x86::Register::R8, u64::MAX)
        );
        // Label forms: a patchable jmp and a rip-relative lea, both to the same label.
        let mut a = Asm::default();
        let l = a.label();
        let site = a.label();
        a.jmp_site(l, site);
        a.lea_label(RCX, l);
        a.bind(l);
        a.bytes(&[0x90]);
        assert!(a.finish());
        let v: Vec<_> = Decoder::with_ip(64, &a.buf, 0x1000, DecoderOptions::NONE)
            .into_iter()
            .collect();
        assert_eq!(v[0].near_branch64(), 0x1000 + 12);
        assert_eq!(v[1].memory_displacement64(), 0x1000 + 12);
        assert_eq!(v[1].op0_register(), iced_x86::Register::RCX);
        assert_eq!(a.labels[site.0], Some(1));
        // jrcxz/jecxz back to a bound label, and refused out of reach.
        let mut a = Asm::default();
        let l = a.label();
        a.bind(l);
        a.bytes(&[0x90; 10]);
        assert!(a.jrcxz_back(l, false));
        assert!(a.jrcxz_back(l, true));
        let v: Vec<_> = Decoder::with_ip(64, &a.buf, 0x1000, DecoderOptions::NONE)
            .into_iter()
            .collect();
        assert_eq!(v[10].code(), iced_x86::Code::Jrcxz_rel8_64);
        assert_eq!(v[10].near_branch64(), 0x1000);
        assert_eq!(v[11].code(), iced_x86::Code::Jecxz_rel8_64);
        assert_eq!(v[11].near_branch64(), 0x1000);
        a.bytes(&[0x90; 120]);
        let len = a.buf.len();
        assert!(!a.jrcxz_back(l, false));
        assert_eq!(a.buf.len(), len);
        // jrcxz_far: a jrcxz into a mov's immediate, which is a jmp to the label.
        let mut a = Asm::default();
        let l = a.label();
        a.jrcxz_far(l, RDI);
        a.bytes(&[0x90; 40]);
        a.bind(l);
        a.bytes(&[0x90]);
        assert!(a.finish());
        let v: Vec<_> = Decoder::with_ip(64, &a.buf, 0x1000, DecoderOptions::NONE)
            .into_iter()
            .collect();
        assert_eq!(v[0].near_branch64(), 0x1004);
        assert_eq!(v[1].code(), iced_x86::Code::Mov_r64_imm64);
        assert_eq!(v[1].op0_register(), iced_x86::Register::RDI);
        let j = Decoder::with_ip(64, &a.buf[4..], 0x1004, DecoderOptions::NONE).decode();
        assert_eq!(j.code(), iced_x86::Code::Jmp_rel32_64);
        assert_eq!(j.near_branch64(), 0x1000 + 12 + 40);
        // The displacement sizes: none, 8 and 32 bits.
        let mut a = Asm::default();
        a.load(RAX, at(RBX, 0));
        assert_eq!(a.buf.len(), 3);
        a.load(RAX, at(RBX, 8));
        assert_eq!(a.buf.len(), 3 + 4);
        a.load(RAX, at(RBX, 0x100));
        assert_eq!(a.buf.len(), 3 + 4 + 7);
    }
}
