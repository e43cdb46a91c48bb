//! Differential testing of the MMX and SSE..SSE4.2 families: random blocks of every legacy
//! encoding iced-x86 lists for those families (operands picked from the encoding's operand
//! kinds: MMX/XMM registers, general registers, memory on the scratch page through R15 —
//! aligned, unaligned, crossing into the second scratch page, or crossing the end of that one
//! into an unmapped page (a #PF whose error code and CR2 must match, with nothing written) —,
//! random immediates) run from random
//! XMM, MMX/x87 and MXCSR states (special FP values: zeros, denormals, the smallest normal,
//! infinities, quiet and signaling NaNs, integers near the conversion limits; random rounding
//! mode, DAZ, FTZ, exception masks and flags; a pending x87 exception) on KVM at CPL 3 (the
//! host CPU) and on emu. Registers, flags, MXCSR, the x87/MMX image (TOP, tags, the 80-bit
//! registers), the XMM registers, the scratch page and the exception must agree.
//!
//! Left out: RCPPS/RCPSS/RSQRTPS/RSQRTSS (vendor-specific approximations, see docs/emu.md),
//! MONITOR/MWAIT, FXSAVE/FXRSTOR, and fences/prefetches (nothing to compare).

use hv::{CpuState, Hypervisor};
use iced_x86::{
    Code, CpuidFeature, EncodingKind, Instruction, MemoryOperand, Mnemonic, OpCodeOperandKind as K,
    Register,
};

use crate::diff::{Rng, SCRATCH};
use crate::{CODE, DF, Guest, Result, STACK, STATUS, Stop};

/// The instruction forms a block draws from.
pub fn codes() -> Vec<Code> {
    use CpuidFeature as C;
    Code::values()
        .filter(|c| {
            let f = c.cpuid_features();
            c.encoding() == EncodingKind::Legacy
                && c.op_code().mode64()
                && !f.is_empty()
                && f.iter().all(|x| {
                    matches!(
                        x,
                        C::MMX | C::SSE | C::SSE2 | C::SSE3 | C::SSSE3 | C::SSE4_1 | C::SSE4_2
                    )
                })
                && !matches!(
                    c.mnemonic(),
                    Mnemonic::Rcpps
                        | Mnemonic::Rcpss
                        | Mnemonic::Rsqrtps
                        | Mnemonic::Rsqrtss
                        | Mnemonic::Monitor
                        | Mnemonic::Mwait
                        | Mnemonic::Fxsave
                        | Mnemonic::Fxsave64
                        | Mnemonic::Fxrstor
                        | Mnemonic::Fxrstor64
                        | Mnemonic::Lfence
                        | Mnemonic::Sfence
                        | Mnemonic::Mfence
                        | Mnemonic::Pause
                        | Mnemonic::Prefetchnta
                        | Mnemonic::Prefetcht0
                        | Mnemonic::Prefetcht1
                        | Mnemonic::Prefetcht2
                        | Mnemonic::Clflush
                )
                && c.op_code().op_kinds().iter().all(|k| operand_supported(*k))
        })
        .collect()
}

fn operand_supported(k: K) -> bool {
    matches!(
        k,
        K::mm_reg
            | K::mm_rm
            | K::mm_or_mem
            | K::xmm_reg
            | K::xmm_rm
            | K::xmm_or_mem
            | K::r32_reg
            | K::r32_rm
            | K::r32_or_mem
            | K::r32_reg_mem
            | K::r64_reg
            | K::r64_rm
            | K::r64_or_mem
            | K::r64_reg_mem
            | K::r16_or_mem
            | K::r8_or_mem
            | K::mem
            | K::imm8
            | K::seg_rDI
    )
}

/// GPRs a block may write: not RSP, RDI (the MASKMOV address), R15 (the scratch base).
const GPRS: [usize; 13] = [0, 1, 2, 3, 5, 6, 8, 9, 10, 11, 12, 13, 14];

fn gpr(size: usize, k: usize) -> Register {
    let base = match size {
        1 => Register::AL,
        2 => Register::AX,
        4 => Register::EAX,
        _ => Register::RAX,
    };
    let r = base as usize + (k & 15);
    Register::values().nth(r).unwrap_or(base)
}

#[derive(Clone, Copy)]
enum Opnd {
    Reg(Register),
    Mem(i64),
    Imm(u32),
}

/// A scratch displacement: mostly 16-byte aligned, sometimes not, sometimes crossing the
/// end of the first page (into the second), rarely the end of the second (into the unmapped
/// page).
fn disp(rng: &mut Rng) -> i64 {
    match rng.below(64) {
        0 | 1 => 4096 - 1 - rng.below(15) as i64,
        2 | 3 => 4096 - 8,
        4 => 8192 - 1 - rng.below(15) as i64,
        5..=8 => rng.below(4080) as i64,
        _ => (rng.below(255) * 16) as i64,
    }
}

fn operand(rng: &mut Rng, k: K) -> Opnd {
    let mm = |rng: &mut Rng| {
        Opnd::Reg(
            Register::values()
                .nth(Register::MM0 as usize + rng.below(8) as usize)
                .unwrap_or(Register::MM0),
        )
    };
    let xmm = |rng: &mut Rng| {
        Opnd::Reg(
            Register::values()
                .nth(Register::XMM0 as usize + rng.below(16) as usize)
                .unwrap_or(Register::XMM0),
        )
    };
    let r = |rng: &mut Rng, size: usize| {
        let k = GPRS[rng.below(GPRS.len() as u64) as usize];
        Opnd::Reg(gpr(size, k))
    };
    let or_mem = |rng: &mut Rng, o: Opnd| {
        if rng.below(3) == 0 {
            Opnd::Mem(disp(rng))
        } else {
            o
        }
    };
    match k {
        K::mm_reg | K::mm_rm => mm(rng),
        K::mm_or_mem => {
            let o = mm(rng);
            or_mem(rng, o)
        }
        K::xmm_reg | K::xmm_rm => xmm(rng),
        K::xmm_or_mem => {
            let o = xmm(rng);
            or_mem(rng, o)
        }
        K::r32_reg | K::r32_rm => r(rng, 4),
        K::r64_reg | K::r64_rm => r(rng, 8),
        K::r32_or_mem | K::r32_reg_mem => {
            let o = r(rng, 4);
            or_mem(rng, o)
        }
        K::r64_or_mem | K::r64_reg_mem => {
            let o = r(rng, 8);
            or_mem(rng, o)
        }
        K::r16_or_mem => Opnd::Mem(disp(rng)),
        K::r8_or_mem => Opnd::Mem(disp(rng)),
        K::imm8 => Opnd::Imm(match rng.below(4) {
            0 => rng.below(8) as u32,
            1 => rng.below(16) as u32,
            _ => rng.below(256) as u32,
        }),
        _ => Opnd::Mem(disp(rng)),
    }
}

fn build(code: Code, ops: &[Opnd]) -> std::result::Result<Instruction, iced_x86::IcedError> {
    let m = |d: i64| MemoryOperand::with_base_displ(Register::R15, d);
    use Opnd::*;
    Ok(match ops {
        [] => Instruction::with(code),
        [Reg(a)] => Instruction::with1(code, *a)?,
        [Mem(a)] => Instruction::with1(code, m(*a))?,
        [Reg(a), Reg(b)] => Instruction::with2(code, *a, *b)?,
        [Reg(a), Mem(b)] => Instruction::with2(code, *a, m(*b))?,
        [Mem(a), Reg(b)] => Instruction::with2(code, m(*a), *b)?,
        [Reg(a), Imm(b)] => Instruction::with2(code, *a, *b)?,
        [Reg(a), Reg(b), Imm(c)] => Instruction::with3(code, *a, *b, *c)?,
        [Reg(a), Mem(b), Imm(c)] => Instruction::with3(code, *a, m(*b), *c)?,
        [Mem(a), Reg(b), Imm(c)] => Instruction::with3(code, m(*a), *b, *c)?,
        [Reg(a), Reg(b), Reg(c)] => Instruction::with3(code, *a, *b, *c)?,
        // Not produced by `operand` for the listed codes; a plain form keeps the block valid.
        _ => Instruction::with(Code::Nopd),
    })
}

/// One random block and its initial state.
#[derive(Clone, Debug)]
pub struct Block {
    pub instructions: Vec<Instruction>,
    pub regs: [u64; 16],
    pub rflags: u64,
    pub fpu: hv::FpuState,
    pub osxmmexcpt: bool,
    pub scratch: Vec<u8>,
}

/// An FP-interesting 32-bit pattern.
fn f32_value(rng: &mut Rng) -> u32 {
    let s = if rng.below(2) == 0 { 0 } else { 0x8000_0000 };
    s | match rng.below(16) {
        0 => 0,
        1 => 0x3f80_0000,                                       // 1.0
        2 => rng.below(0x7f_ffff) as u32 + 1,                   // denormal
        3 => 0x0080_0000 + rng.below(4) as u32,                 // near the smallest normal
        4 => 0x7f80_0000,                                       // infinity
        5 => 0x7fc0_0000 | rng.below(0x40_0000) as u32,         // QNaN
        6 => 0x7f80_0001 + rng.below(0x3f_ffff) as u32,         // SNaN
        7 => 0x7f7f_ffff,                                       // largest
        8 => 0x4f00_0000 + rng.below(3) as u32,                 // about 2^31
        9 => 0x3f00_0000 + (rng.below(8) as u32) * 0x0080_0000, // halves, small integers
        10 => 0x0040_0000 + rng.below(0x40_0000) as u32,
        _ => (rng.next_u64() as u32) & 0x7fff_ffff,
    }
}

fn f64_value(rng: &mut Rng) -> u64 {
    let s = if rng.below(2) == 0 { 0 } else { 1u64 << 63 };
    s | match rng.below(16) {
        0 => 0,
        1 => 0x3ff0_0000_0000_0000,
        2 => rng.below(0x000f_ffff_ffff_ffff) + 1,
        3 => 0x0010_0000_0000_0000 + rng.below(4),
        4 => 0x7ff0_0000_0000_0000,
        5 => 0x7ff8_0000_0000_0000 | rng.below(1 << 51),
        6 => 0x7ff0_0000_0000_0001 + rng.below((1 << 51) - 1),
        7 => 0x7fef_ffff_ffff_ffff,
        8 => 0x41e0_0000_0000_0000 + rng.below(3) * 0x10_0000,
        9 => 0x43e0_0000_0000_0000 + rng.below(3),
        10 => 0x3fe0_0000_0000_0000 + rng.below(8) * 0x0010_0000_0000_0000,
        11 => {
            // A value that single precision rounds near its smallest normal.
            0x3800_0000_0000_0000 + rng.below(1 << 40)
        }
        _ => rng.next_u64() & 0x7fff_ffff_ffff_ffff,
    }
}

fn xmm_value(rng: &mut Rng) -> u128 {
    match rng.below(4) {
        0 => {
            let mut v = 0u128;
            for k in 0..4 {
                v |= u128::from(f32_value(rng)) << (32 * k);
            }
            v
        }
        1 => u128::from(f64_value(rng)) | (u128::from(f64_value(rng)) << 64),
        2 => u128::from(rng.next_u64()) | (u128::from(rng.next_u64()) << 64),
        _ => {
            // Small integers in every lane width.
            let mut v = 0u128;
            for k in 0..8 {
                let w = match rng.below(4) {
                    0 => 0u128,
                    1 => 0xffff,
                    2 => 0x8000 | rng.below(3) as u128,
                    _ => rng.below(0x100) as u128,
                };
                v |= w << (16 * k);
            }
            v
        }
    }
}

/// Generates block `n` of the run seeded with `seed`: up to `max_len` instructions.
pub fn generate(codes: &[Code], seed: u64, n: u64, max_len: usize) -> Result<Block> {
    let mut rng = Rng::new(seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x55e);
    let len = 1 + rng.below(max_len as u64) as usize;
    let mut instructions = Vec::new();
    for _ in 0..len {
        let code = codes[rng.below(codes.len() as u64) as usize];
        let kinds = code.op_code().op_kinds();
        let ops: Vec<Opnd> = kinds
            .iter()
            .filter(|k| **k != K::seg_rDI)
            .map(|k| operand(&mut rng, *k))
            .collect();
        if kinds.contains(&K::seg_rDI) {
            // MASKMOVQ/MASKMOVDQU store at DS:RDI: point RDI into the scratch page.
            let d = disp(&mut rng);
            instructions.push(Instruction::with2(
                Code::Lea_r64_m,
                Register::RDI,
                MemoryOperand::with_base_displ(Register::R15, d),
            )?);
            let (r1, r2) = (reg_of(ops[0]), reg_of(ops[1]));
            let i = if code.mnemonic() == Mnemonic::Maskmovq {
                Instruction::with_maskmovq(64, r1, r2, Register::None)?
            } else {
                Instruction::with_maskmovdqu(64, r1, r2, Register::None)?
            };
            instructions.push(i);
            continue;
        }
        instructions.push(build(code, &ops)?);
    }
    let mut regs = [0u64; 16];
    for r in regs.iter_mut() {
        *r = match rng.below(4) {
            0 => rng.below(256),
            1 => f64_value(&mut rng),
            2 => u64::from(f32_value(&mut rng)),
            _ => rng.next_u64(),
        };
    }
    regs[4] = STACK;
    regs[7] = SCRATCH;
    regs[15] = SCRATCH;
    let rflags = (rng.next_u64() & STATUS) | 0x3002;
    let mut fpu = hv::FpuState::default();
    for x in fpu.xmm.iter_mut() {
        *x = xmm_value(&mut rng).to_le_bytes();
    }
    for s in fpu.st.iter_mut() {
        let m = if rng.below(2) == 0 {
            rng.next_u64()
        } else {
            f64_value(&mut rng)
        };
        let e = if rng.below(2) == 0 {
            0xffffu16
        } else {
            rng.next_u64() as u16
        };
        *s = [0; 16];
        s[..8].copy_from_slice(&m.to_le_bytes());
        s[8..10].copy_from_slice(&e.to_le_bytes());
    }
    fpu.ftw = rng.next_u64() as u8;
    // A pending unmasked x87 exception (ES, with B mirroring it as the CPU stores it).
    fpu.fsw = ((rng.below(8) as u16) << 11) | if rng.below(16) == 0 { 0x8081 } else { 0 };
    fpu.fcw = if fpu.fsw & 0x80 != 0 { 0x37e } else { 0x37f };
    let masks = if rng.below(2) == 0 {
        (rng.below(64) as u32) << 7
    } else {
        0x1f80
    };
    fpu.mxcsr = masks
        | (rng.below(4) as u32) << 13
        | if rng.below(4) == 0 { 1 << 6 } else { 0 }
        | if rng.below(4) == 0 { 1 << 15 } else { 0 }
        | if rng.below(2) == 0 {
            rng.below(64) as u32
        } else {
            0
        };
    // CR4.OSXMMEXCPT=0 cannot be tested against this host: under PVM the guest's user code
    // runs with the host's CR4, so the CPU raises #XM regardless (emu's #UD path is covered
    // by hv-emu's tests).
    let osxmmexcpt = true;
    let mut scratch = vec![0u8; crate::diff::SCRATCH_LEN];
    for c in scratch.chunks_mut(16) {
        c.copy_from_slice(&xmm_value(&mut rng).to_le_bytes());
    }
    Ok(Block {
        instructions,
        regs,
        rflags,
        fpu,
        osxmmexcpt,
        scratch,
    })
}

fn reg_of(o: Opnd) -> Register {
    match o {
        Opnd::Reg(r) => r,
        _ => Register::None,
    }
}

impl Block {
    fn bytes(&self) -> Result<Vec<u8>> {
        let mut enc = iced_x86::Encoder::new(64);
        let mut ip = CODE;
        for i in &self.instructions {
            ip += enc.encode(i, ip)? as u64;
        }
        let mut b = enc.take_buffer();
        b.extend_from_slice(&[0x0f, 0x0b]);
        Ok(b)
    }

    /// The first `k` instructions with the same initial state.
    pub fn prefix(&self, k: usize) -> Block {
        Block {
            instructions: self.instructions[..k].to_vec(),
            ..self.clone()
        }
    }

    pub fn listing(&self) -> String {
        use iced_x86::Formatter;
        let mut s = String::new();
        let mut f = iced_x86::IntelFormatter::new();
        for i in &self.instructions {
            let mut t = String::new();
            f.format(i, &mut t);
            s.push_str(&format!("    {t}\n"));
        }
        s
    }
}

/// What a backend ended with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Result1 {
    pub stop: Stop,
    pub exception: Option<(u8, u64)>,
    /// CR2 of a #PF (0 otherwise).
    pub cr2: u64,
    pub regs: hv::Registers,
    pub fpu: hv::FpuState,
    pub scratch: Vec<u8>,
    /// Bytes of the code: the block's length (where a completed run ends).
    pub end: u64,
}

pub struct Runner {
    guest: Guest,
    base: CpuState,
}

impl Runner {
    pub fn new(hv: &dyn Hypervisor) -> Result<Runner> {
        let mut guest = Guest::new(hv, 2)?;
        guest.timeout = std::time::Duration::from_secs(30);
        guest.map_low_4k(&[crate::GUARD])?;
        let mut base = guest.vcpu.state()?;
        crate::user_mode(&mut base);
        Ok(Runner { guest, base })
    }

    pub fn run(&mut self, block: &Block) -> Result<Result1> {
        let code = block.bytes()?;
        self.guest.write(CODE, &code)?;
        crate::diff::write_scratch(&self.guest, &block.scratch)?;
        let mut st = self.base.clone();
        for (k, v) in block.regs.iter().enumerate() {
            st.regs.set_gpr(k, *v);
        }
        st.regs.rip = CODE;
        st.regs.rflags = block.rflags;
        st.fpu = block.fpu;
        if !block.osxmmexcpt {
            st.sregs.cr4 &= !(1 << 10);
        }
        self.guest.vcpu.set_state(&st)?;
        let o = self.guest.run()?;
        let mut regs = o.state.regs;
        let mut exception = o.exception.map(|e| (e.vector, e.error_code));
        let end = CODE + code.len() as u64 - 2;
        if let Some(e) = o.exception.filter(|e| e.vector == 6 && e.rip == end) {
            regs.rax = e.rax;
            regs.rsp = e.rsp;
            regs.rip = e.rip;
            regs.rflags = e.rflags;
            exception = None;
        } else if let Some(e) = o.exception {
            regs.rax = e.rax;
            regs.rsp = e.rsp;
            regs.rip = e.rip;
            regs.rflags = e.rflags;
        }
        Ok(Result1 {
            stop: o.stop,
            exception,
            cr2: o.exception.filter(|e| e.vector == 14).map_or(0, |e| e.cr2),
            regs,
            fpu: o.state.fpu,
            scratch: self.guest.read(SCRATCH, crate::diff::SCRATCH_LEN)?,
            end,
        })
    }
}

/// The first difference, as text.
pub fn compare(a: &Result1, b: &Result1) -> Option<String> {
    if a.stop != b.stop || a.exception != b.exception || a.cr2 != b.cr2 {
        return Some(format!(
            "end: {:?} {:?} at {:#x} cr2 {:#x} vs {:?} {:?} at {:#x} cr2 {:#x}",
            a.stop, a.exception, a.regs.rip, a.cr2, b.stop, b.exception, b.regs.rip, b.cr2
        ));
    }
    for k in 0..16 {
        if a.regs.gpr(k) != b.regs.gpr(k) {
            return Some(format!(
                "gpr {k}: {:#x} vs {:#x}",
                a.regs.gpr(k),
                b.regs.gpr(k)
            ));
        }
    }
    if a.regs.rip != b.regs.rip {
        return Some(format!("rip {:#x} vs {:#x}", a.regs.rip, b.regs.rip));
    }
    let m = STATUS | DF;
    if a.regs.rflags & m != b.regs.rflags & m {
        return Some(format!(
            "rflags {:#x} vs {:#x}",
            a.regs.rflags & m,
            b.regs.rflags & m
        ));
    }
    if a.fpu.mxcsr != b.fpu.mxcsr {
        return Some(format!("mxcsr {:#x} vs {:#x}", a.fpu.mxcsr, b.fpu.mxcsr));
    }
    for k in 0..16 {
        if a.fpu.xmm[k] != b.fpu.xmm[k] {
            return Some(format!(
                "xmm{k}: {:#034x} vs {:#034x}",
                u128::from_le_bytes(a.fpu.xmm[k]),
                u128::from_le_bytes(b.fpu.xmm[k])
            ));
        }
    }
    if a.fpu.fsw != b.fpu.fsw || a.fpu.ftw != b.fpu.ftw {
        return Some(format!(
            "fsw/ftw {:#x}/{:#x} vs {:#x}/{:#x}",
            a.fpu.fsw, a.fpu.ftw, b.fpu.fsw, b.fpu.ftw
        ));
    }
    for k in 0..8 {
        if a.fpu.st[k][..10] != b.fpu.st[k][..10] {
            return Some(format!(
                "st{k}: {:02x?} vs {:02x?}",
                &a.fpu.st[k][..10],
                &b.fpu.st[k][..10]
            ));
        }
    }
    if a.scratch != b.scratch {
        let off = (0..a.scratch.len().min(b.scratch.len()))
            .find(|&k| a.scratch[k] != b.scratch[k])
            .unwrap_or(0);
        return Some(format!(
            "scratch[{off:#x}]: {:#x} vs {:#x}",
            a.scratch[off], b.scratch[off]
        ));
    }
    None
}

/// A diverging block cut to its first diverging instruction.
#[derive(Clone, Debug)]
pub struct Divergence {
    pub block: u64,
    pub prefix: Block,
    pub what: String,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = &self.prefix;
        writeln!(f, "SSE divergence (block {}): {}", self.block, self.what)?;
        write!(f, "  block:\n{}", p.listing())?;
        writeln!(
            f,
            "  mxcsr={:#x} osxmmexcpt={} fsw={:#x} ftw={:#x}",
            p.fpu.mxcsr, p.osxmmexcpt, p.fpu.fsw, p.fpu.ftw
        )?;
        for k in 0..16 {
            writeln!(f, "  xmm{k}={:#034x}", u128::from_le_bytes(p.fpu.xmm[k]))?;
        }
        for k in 0..8 {
            writeln!(f, "  st{k}={:02x?}", &p.fpu.st[k][..10])?;
        }
        write!(f, "  gprs={:x?}", p.regs)
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub blocks: u64,
    pub completed: u64,
    pub instructions: u64,
    pub divergences: Vec<Divergence>,
    /// Misaligned 16-byte SSE operands and LDMXCSR of reserved bits: the CPU raises #GP(0)
    /// (emu too), but at CPL 3 on this PVM host the #GP goes to the hypervisor, whose
    /// instruction emulator cannot run SSE and injects #UD instead. Counted, not failures.
    pub known: Vec<Divergence>,
    /// Blocks the reference ended with a #PF on the unmapped page after the scratch area.
    pub page_faults: u64,
}

/// Whether `i` has a 16-byte memory operand that is not 16-byte aligned (the scratch page
/// through R15 is page aligned).
pub fn misaligned_16(i: &Instruction) -> bool {
    (0..i.op_count()).any(|n| i.op_kind(n) == iced_x86::OpKind::Memory)
        && i.memory_size().size() == 16
        && i.memory_base() == Register::R15
        && !i.memory_displacement64().is_multiple_of(16)
}

/// Runs `count` blocks from `seed` on both backends; at most `max_report` divergences.
pub fn run(
    reference: &dyn Hypervisor,
    candidate: &dyn Hypervisor,
    seed: u64,
    count: u64,
    max_report: usize,
) -> Result<Report> {
    let codes = codes();
    let mut r = Runner::new(reference)?;
    let mut c = Runner::new(candidate)?;
    let mut report = Report::default();
    for n in 0..count {
        let block = generate(&codes, seed, n, 8)?;
        report.blocks += 1;
        report.instructions += block.instructions.len() as u64;
        let a = r.run(&block)?;
        let b = match c.run(&block) {
            Ok(b) => b,
            Err(e) => {
                let what = match &e {
                    crate::Error::Hv(h) => format!("candidate failed: {h}"),
                    other => format!("candidate failed: {other}"),
                };
                report.divergences.push(Divergence {
                    block: n,
                    prefix: block,
                    what,
                });
                c = Runner::new(candidate)?;
                if report.divergences.len() >= max_report {
                    break;
                }
                continue;
            }
        };
        if a.exception.is_none() && a.regs.rip == a.end {
            report.completed += 1;
        }
        if matches!(a.exception, Some((14, _)))
            && (crate::GUARD..crate::GUARD + 4096).contains(&a.cr2)
        {
            report.page_faults += 1;
        }
        if compare(&a, &b).is_none() {
            continue;
        }
        for k in 1..=block.instructions.len() {
            let p = block.prefix(k);
            let (a, b) = (r.run(&p)?, c.run(&p)?);
            if let Some(what) = compare(&a, &b) {
                let known = a.exception == Some((6, 0))
                    && b.exception == Some((13, 0))
                    && p.instructions
                        .last()
                        .is_some_and(|i| misaligned_16(i) || i.mnemonic() == Mnemonic::Ldmxcsr);
                let d = Divergence {
                    block: n,
                    prefix: p,
                    what,
                };
                if known {
                    report.known.push(d);
                } else {
                    report.divergences.push(d);
                }
                break;
            }
        }
        if report.divergences.len() >= max_report {
            break;
        }
    }
    Ok(report)
}

/// KVM (reference, CPL 3: the host CPU) against emu; `None` after `SKIP: no /dev/kvm`.
pub fn differential(seed: u64, count: u64, max_report: usize) -> Option<Result<Report>> {
    let kvm = crate::kvm()?;
    Some(run(&kvm, &crate::emu(), seed, count, max_report))
}
