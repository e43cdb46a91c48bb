//! Differential testing of the x87 FPU: random blocks of x87 instructions run at CPL 3 on KVM
//! (the host CPU) and on emu from the same initial state; the x87 state (FCW, FSW, abridged tag
//! word, FIP, the eight 80-bit registers), RFLAGS, RAX and the scratch page are compared bit for
//! bit, and the status word after every generated item is recorded in a trace on the scratch page.
//!
//! Blocks start from a random stack (random TOP, random tags, registers holding random bit
//! patterns biased to the special classes: zeros, denormals, pseudo-denormals, infinities,
//! QNaNs, SNaNs, unsupported encodings, values near the exponent limits, small integers) and a
//! scratch page of random single/double/extended/integer/BCD patterns. Items are loads (all
//! formats, constants), arithmetic (register, memory and integer forms), unary operations
//! (FSQRT, FRNDINT, FSCALE, FXTRACT, FPREM, FPREM1, FABS, FCHS, FXAM, FTST), compares (FCOM,
//! FUCOM, FICOM, FCOMI, FUCOMI and their popping forms), FCMOVcc, stores (all formats, FBSTP,
//! FISTTP), stack operations (FXCH, FFREE, FINCSTP, FDECSTP), FLDCW with random rounding and
//! precision control and, rarely, unmasked exceptions (a pending one raises #MF, which ends
//! the block on both backends), FNCLEX, FNINIT, FNSTENV/FLDENV, FNSAVE/FRSTOR.
//!
//! Memory operands of loads, arithmetic and stores are at any alignment in the data area, one
//! time in 16 across the end of the scratch page into the second scratch page (both mapped with
//! 4 KiB pages and compared), and one time in 64 across the end of the second page into an
//! unmapped one: the #PF (error code, CR2) must match and nothing may be written.
//!
//! Transcendentals (FSIN, FCOS, FSINCOS, FPTAN, FPATAN, F2XM1, FYL2X, FYL2XP1) run on inputs
//! loaded from a separate table, and their results are stored at once into [`TRANS`] and popped,
//! so they never feed the bit-exact comparison; [`TRANS`] is compared with a relative tolerance
//! of 2^-[`TRANS_BITS`] (emu computes them in double precision).

use hv::{CpuState, Hypervisor};
use iced_x86::{Code, Encoder, Instruction, MemoryOperand, Register};

use super::Rng;
use crate::{CODE, DATA, Guest, Result, STACK};

/// Scratch page (addressed through R15).
pub const SCRATCH: u64 = DATA;
/// Random data area: loads and stores.
const AREA: u64 = 0x800;
/// Control words FLDCW loads.
const CWS: u64 = 0x900;
/// Valid packed BCD values.
const BCDS: u64 = 0xa00;
/// Transcendental inputs (extended).
const TIN: u64 = 0xb00;
/// Transcendental outputs, compared with a tolerance.
pub const TRANS: u64 = 0xc00;
/// FNSTENV images.
const ENVS: u64 = 0xd00;
/// FNSAVE image (108 bytes).
const SAVE: u64 = 0x700;
/// FNSTSW trace, one word per item.
const TRACE: u64 = 0xe00;
/// Relative tolerance of transcendental results: 2^-TRANS_BITS.
pub const TRANS_BITS: i32 = 50;

/// An x87 block and its initial state.
#[derive(Clone, Debug)]
pub struct Block {
    pub instructions: Vec<Instruction>,
    pub bytes: Vec<u8>,
    pub offsets: Vec<usize>,
    /// Instruction counts at item boundaries: divergences are cut down to these prefixes (a
    /// transcendental and the stores that take its results apart are never split).
    pub cuts: Vec<usize>,
    pub fpu: hv::FpuState,
    pub rflags: u64,
    pub scratch: Vec<u8>,
}

fn m(disp: u64) -> MemoryOperand {
    MemoryOperand::with_base_displ(Register::R15, disp as i64)
}

fn st(k: u64) -> Register {
    match k & 7 {
        0 => Register::ST0,
        1 => Register::ST1,
        2 => Register::ST2,
        3 => Register::ST3,
        4 => Register::ST4,
        5 => Register::ST5,
        6 => Register::ST6,
        _ => Register::ST7,
    }
}

/// A random 80-bit pattern, biased to special classes.
pub fn f80(rng: &mut Rng) -> (u16, u64) {
    let s = (rng.below(2) as u16) << 15;
    let r = rng.next_u64();
    let (e, mm): (u16, u64) = match rng.below(20) {
        0 => (0, 0),
        1 => (0, r >> (1 + rng.below(63))),
        2 => (0, r | (1 << 63)),
        3 => (0x7fff, 1 << 63),
        4 => (0x7fff, (1 << 63) | (1 << 62) | (r >> 2 >> rng.below(40))),
        5 => (0x7fff, (1 << 63) | ((r >> 2 >> rng.below(40)) | 1)),
        6 => (
            rng.below(0x8000) as u16,
            r & !(1 << 63) & if rng.below(2) == 0 { u64::MAX } else { 0 },
        ),
        7 => (rng.below(3) as u16 + 1, r | (1 << 63)),
        8 => (0x7ffe - rng.below(3) as u16, r | (1 << 63)),
        9 | 10 => {
            // A small integer.
            let v = rng.below(1000) + 1;
            let lz = v.leading_zeros();
            ((16383 + 63 - lz) as u16, v << lz)
        }
        11 => (0x3fff, (1 << 63) | (r >> 40 << 40)),
        12 => (rng.below(0x7ffe) as u16 + 1, r | (1 << 63)),
        _ => (16383 - 70 + rng.below(140) as u16, r | (1 << 63)),
    };
    (s | e, mm)
}

fn f80_bytes(v: (u16, u64)) -> [u8; 10] {
    let mut b = [0u8; 10];
    b[..8].copy_from_slice(&v.1.to_le_bytes());
    b[8..].copy_from_slice(&v.0.to_le_bytes());
    b
}

/// A random double/single bit pattern.
fn ieee(rng: &mut Rng, dbl: bool) -> u64 {
    let (eb, fb) = if dbl { (11, 52) } else { (8, 23) };
    let emax = (1u64 << eb) - 1;
    let s = rng.below(2) << (eb + fb);
    let frac = rng.next_u64() & ((1u64 << fb) - 1);
    let e = match rng.below(10) {
        0 => 0,
        1 => emax,
        2 => 1,
        3 => emax - 1,
        4 => {
            return s;
        }
        5 => return s | (emax << fb),
        _ => (emax >> 1) - 20 + rng.below(40),
    };
    s | (e << fb) | frac
}

const ARITH_REG: &[[Code; 3]] = &[
    // (st0, st(i)), (st(i), st0), (st(i), st0 popping)
    [Code::Fadd_st0_sti, Code::Fadd_sti_st0, Code::Faddp_sti_st0],
    [Code::Fsub_st0_sti, Code::Fsub_sti_st0, Code::Fsubp_sti_st0],
    [
        Code::Fsubr_st0_sti,
        Code::Fsubr_sti_st0,
        Code::Fsubrp_sti_st0,
    ],
    [Code::Fmul_st0_sti, Code::Fmul_sti_st0, Code::Fmulp_sti_st0],
    [Code::Fdiv_st0_sti, Code::Fdiv_sti_st0, Code::Fdivp_sti_st0],
    [
        Code::Fdivr_st0_sti,
        Code::Fdivr_sti_st0,
        Code::Fdivrp_sti_st0,
    ],
];

const ARITH_MEM: &[[Code; 4]] = &[
    // m32fp, m64fp, m16int, m32int
    [
        Code::Fadd_m32fp,
        Code::Fadd_m64fp,
        Code::Fiadd_m16int,
        Code::Fiadd_m32int,
    ],
    [
        Code::Fsub_m32fp,
        Code::Fsub_m64fp,
        Code::Fisub_m16int,
        Code::Fisub_m32int,
    ],
    [
        Code::Fsubr_m32fp,
        Code::Fsubr_m64fp,
        Code::Fisubr_m16int,
        Code::Fisubr_m32int,
    ],
    [
        Code::Fmul_m32fp,
        Code::Fmul_m64fp,
        Code::Fimul_m16int,
        Code::Fimul_m32int,
    ],
    [
        Code::Fdiv_m32fp,
        Code::Fdiv_m64fp,
        Code::Fidiv_m16int,
        Code::Fidiv_m32int,
    ],
    [
        Code::Fdivr_m32fp,
        Code::Fdivr_m64fp,
        Code::Fidivr_m16int,
        Code::Fidivr_m32int,
    ],
    [
        Code::Fcom_m32fp,
        Code::Fcom_m64fp,
        Code::Ficom_m16int,
        Code::Ficom_m32int,
    ],
    [
        Code::Fcomp_m32fp,
        Code::Fcomp_m64fp,
        Code::Ficomp_m16int,
        Code::Ficomp_m32int,
    ],
];

const UNARY: &[Code] = &[
    Code::Fsqrt,
    Code::Frndint,
    Code::Fscale,
    Code::Fxtract,
    Code::Fprem,
    Code::Fprem1,
    Code::Fabs,
    Code::Fchs,
    Code::Fxam,
    Code::Ftst,
    Code::Fcompp,
    Code::Fucompp,
    Code::Fnop,
];

const CMP_REG: &[Code] = &[
    Code::Fcom_st0_sti,
    Code::Fcomp_st0_sti,
    Code::Fucom_st0_sti,
    Code::Fucomp_st0_sti,
    Code::Fcomi_st0_sti,
    Code::Fcomip_st0_sti,
    Code::Fucomi_st0_sti,
    Code::Fucomip_st0_sti,
];

const FCMOV: &[Code] = &[
    Code::Fcmovb_st0_sti,
    Code::Fcmove_st0_sti,
    Code::Fcmovbe_st0_sti,
    Code::Fcmovu_st0_sti,
    Code::Fcmovnb_st0_sti,
    Code::Fcmovne_st0_sti,
    Code::Fcmovnbe_st0_sti,
    Code::Fcmovnu_st0_sti,
];

const LOADS: &[Code] = &[
    Code::Fld_m32fp,
    Code::Fld_m64fp,
    Code::Fld_m80fp,
    Code::Fild_m16int,
    Code::Fild_m32int,
    Code::Fild_m64int,
];

const STORES: &[Code] = &[
    Code::Fst_m32fp,
    Code::Fst_m64fp,
    Code::Fstp_m32fp,
    Code::Fstp_m64fp,
    Code::Fstp_m80fp,
    Code::Fist_m16int,
    Code::Fist_m32int,
    Code::Fistp_m16int,
    Code::Fistp_m32int,
    Code::Fistp_m64int,
    Code::Fisttp_m16int,
    Code::Fisttp_m32int,
    Code::Fisttp_m64int,
];

const CONSTS: &[Code] = &[
    Code::Fld1,
    Code::Fldz,
    Code::Fldpi,
    Code::Fldl2e,
    Code::Fldl2t,
    Code::Fldlg2,
    Code::Fldln2,
];

/// A displacement for a `size`-byte operand (see the module documentation).
fn disp(rng: &mut Rng, size: u64) -> u64 {
    let across = |rng: &mut Rng, end: u64| end - 1 - rng.below(size - 1);
    match rng.below(64) {
        0 => across(rng, 8192),
        1..=4 => across(rng, 4096),
        _ => AREA + rng.below(256 - size + 1),
    }
}

fn size_of(c: Code) -> u64 {
    let s = format!("{c:?}");
    if s.ends_with("m16int") {
        2
    } else if s.ends_with("m32fp") || s.ends_with("m32int") {
        4
    } else if s.ends_with("m80fp") || s.ends_with("m80bcd") {
        10
    } else {
        8
    }
}

fn generate_item(
    rng: &mut Rng,
    out: &mut Vec<Instruction>,
    k: u64,
    trans_slot: &mut u64,
) -> std::result::Result<(), iced_x86::IcedError> {
    let i = |c: Code| Instruction::with(c);
    match rng.below(40) {
        0..=4 => {
            let c = rng.pick(LOADS);
            let off = disp(rng, size_of(c));
            out.push(Instruction::with1(c, m(SCRATCH_OFF + off))?);
        }
        5 => out.push(Instruction::with1(Code::Fld_sti, st(rng.below(8)))?),
        6 => out.push(i(rng.pick(CONSTS))),
        7 => out.push(Instruction::with1(
            Code::Fbld_m80bcd,
            m(BCDS + 16 * rng.below(8)),
        )?),
        8..=14 => {
            let f = rng.pick(ARITH_REG);
            let which = rng.below(3) as usize;
            let r = st(rng.below(8));
            let ins = match which {
                0 => Instruction::with2(f[0], Register::ST0, r)?,
                _ => Instruction::with2(f[which], r, Register::ST0)?,
            };
            out.push(ins);
        }
        15..=18 => {
            let f = rng.pick(ARITH_MEM);
            let c = f[rng.below(4) as usize];
            let off = disp(rng, size_of(c));
            out.push(Instruction::with1(c, m(off))?);
        }
        19..=22 => out.push(i(rng.pick(UNARY))),
        23 | 24 => out.push(Instruction::with2(
            rng.pick(CMP_REG),
            Register::ST0,
            st(rng.below(8)),
        )?),
        25 => out.push(Instruction::with2(
            rng.pick(FCMOV),
            Register::ST0,
            st(rng.below(8)),
        )?),
        26..=29 => {
            let c = rng.pick(STORES);
            let off = disp(rng, size_of(c));
            out.push(Instruction::with1(c, m(off))?);
        }
        30 => match rng.below(3) {
            0 => out.push(Instruction::with1(Code::Fst_sti, st(rng.below(8)))?),
            1 => out.push(Instruction::with1(Code::Fstp_sti, st(rng.below(8)))?),
            _ => out.push(Instruction::with1(Code::Fbstp_m80bcd, m(disp(rng, 10)))?),
        },
        31 => match rng.below(5) {
            0 => out.push(Instruction::with1(Code::Ffree_sti, st(rng.below(8)))?),
            1 => out.push(i(Code::Fincstp)),
            2 => out.push(i(Code::Fdecstp)),
            3 => out.push(Instruction::with1(Code::Ffreep_sti, st(rng.below(8)))?),
            _ => out.push(Instruction::with2(
                Code::Fxch_st0_sti,
                Register::ST0,
                st(rng.below(8)),
            )?),
        },
        32 | 33 => out.push(Instruction::with1(
            Code::Fldcw_m2byte,
            m(CWS + 2 * rng.below(16)),
        )?),
        34 => match rng.below(6) {
            0 => out.push(i(Code::Fnclex)),
            1 => out.push(i(Code::Fninit)),
            2 | 3 => {
                // FNSAVE (which re-initialises), something on the fresh state, FRSTOR.
                out.push(Instruction::with1(Code::Fnsave_m108byte, m(SAVE))?);
                out.push(i(rng.pick(CONSTS)));
                out.push(Instruction::with1(Code::Frstor_m108byte, m(SAVE))?);
            }
            _ => {
                let slot = ENVS + 32 * rng.below(4);
                out.push(Instruction::with1(Code::Fnstenv_m28byte, m(slot))?);
                out.push(Instruction::with1(Code::Fldenv_m28byte, m(slot))?);
            }
        },
        _ => {
            // A transcendental on a table input; its results go to TRANS and are popped.
            if *trans_slot >= 12 {
                return Ok(());
            }
            let c = rng.pick(&[
                Code::Fsin,
                Code::Fcos,
                Code::Fsincos,
                Code::Fptan,
                Code::Fpatan,
                Code::F2xm1,
                Code::Fyl2x,
                Code::Fyl2xp1,
            ]);
            // Tables k % 4 == 0 or 2 hold |x| < 1/8 (F2XM1 and FYL2XP1 need |x| < 1 and
            // |x| < 1 - sqrt(2)/2); FYL2X takes the absolute value of its x.
            let small = matches!(c, Code::F2xm1 | Code::Fyl2xp1);
            let table = TIN + 32 * (rng.below(4) * 2 + if small { 0 } else { rng.below(2) });
            let two_in = matches!(c, Code::Fpatan | Code::Fyl2x | Code::Fyl2xp1);
            let two_out = matches!(c, Code::Fsincos | Code::Fptan);
            if two_in {
                out.push(Instruction::with1(Code::Fld_m80fp, m(table + 16))?);
            }
            out.push(Instruction::with1(Code::Fld_m80fp, m(table))?);
            if c == Code::Fyl2x {
                out.push(i(Code::Fabs));
            }
            out.push(i(c));
            // Tag the kind into the table index so inputs fit the function.
            let _ = k;
            out.push(Instruction::with1(
                Code::Fstp_m80fp,
                m(TRANS + 16 * *trans_slot),
            )?);
            *trans_slot += 1;
            if two_out {
                out.push(Instruction::with1(
                    Code::Fstp_m80fp,
                    m(TRANS + 16 * *trans_slot),
                )?);
                *trans_slot += 1;
            }
            return Ok(());
        }
    }
    out.push(Instruction::with1(
        Code::Fnstsw_m2byte,
        m(TRACE + 2 * (k & 127)),
    )?);
    Ok(())
}

/// Offset of the data area inside the scratch page (loads at [`AREA`]).
const SCRATCH_OFF: u64 = 0;

/// Generates x87 block `n` of the run seeded with `seed`.
pub fn generate(seed: u64, n: u64, max_len: usize) -> Result<Block> {
    let mut rng = Rng::new(seed ^ n.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x87);
    rng.0 = rng.next_u64();
    let mut out = Vec::new();
    let items = 1 + rng.below(max_len.max(1) as u64);
    let mut trans_slot = 0;
    let mut cuts = Vec::new();
    for k in 0..items {
        generate_item(&mut rng, &mut out, k, &mut trans_slot)?;
        if cuts.last() != Some(&out.len()) {
            cuts.push(out.len());
        }
    }
    let mut fpu = hv::FpuState::default();
    let top = rng.below(8) as u16;
    fpu.fsw = top << 11;
    fpu.ftw = match rng.below(4) {
        0 => 0xff,
        1 => 0,
        _ => rng.next_u64() as u8,
    };
    fpu.fcw = 0x37f | ((rng.below(4) as u16) << 10) | ((rng.below(4) as u16) << 8);
    for r in fpu.st.iter_mut() {
        r[..10].copy_from_slice(&f80_bytes(f80(&mut rng)));
    }
    let mut scratch = vec![0u8; crate::diff::SCRATCH_LEN];
    // Data areas (the one loads and stores address, the end of the first page and the second
    // page that operands cross into): mixed formats.
    let areas = (AREA as usize..(AREA + 256) as usize)
        .step_by(16)
        .chain((0xf00..0x1100).step_by(16))
        .chain((0x1f00..0x2000).step_by(16));
    for off in areas {
        match rng.below(5) {
            0 => scratch[off..off + 10].copy_from_slice(&f80_bytes(f80(&mut rng))),
            1 => scratch[off..off + 8].copy_from_slice(&ieee(&mut rng, true).to_le_bytes()),
            2 => {
                let a = ieee(&mut rng, false) as u32;
                let b = ieee(&mut rng, false) as u32;
                scratch[off..off + 4].copy_from_slice(&a.to_le_bytes());
                scratch[off + 8..off + 12].copy_from_slice(&b.to_le_bytes());
            }
            3 => scratch[off..off + 8].copy_from_slice(&rng.value().to_le_bytes()),
            _ => {
                let v = (rng.below(2000) as i64 - 1000) as u64;
                scratch[off..off + 8].copy_from_slice(&v.to_le_bytes());
            }
        }
    }
    // Control words: rounding and precision random, usually all exceptions masked.
    for k in 0..16 {
        let mut cw = 0x037fu16 & !0xf00;
        cw |= (rng.below(4) as u16) << 10;
        cw |= (rng.below(4) as u16) << 8;
        if rng.below(6) == 0 {
            cw &= !(1u16 << rng.below(6));
        }
        let o = (CWS + 2 * k) as usize;
        scratch[o..o + 2].copy_from_slice(&cw.to_le_bytes());
    }
    for k in 0..8 {
        let mut v = rng.below(1_000_000_000_000_000_000);
        let mut b = [0u8; 10];
        for byte in b.iter_mut().take(9) {
            *byte = ((v % 10) | ((v / 10 % 10) << 4)) as u8;
            v /= 100;
        }
        if rng.below(2) == 0 {
            b[9] = 0x80;
        }
        let o = (BCDS + 16 * k) as usize;
        scratch[o..o + 10].copy_from_slice(&b);
    }
    // Transcendental inputs: x in [-4, 4) (tables 0..=3), y moderate and x in (0, 2) for the
    // logarithms (4..=7, first slot y... second x).
    for k in 0..8u64 {
        let o = (TIN + 32 * k) as usize;
        let x = trans_input(&mut rng, k);
        let y = trans_input(&mut rng, k + 8);
        scratch[o..o + 10].copy_from_slice(&f80_bytes(x));
        scratch[o + 16..o + 26].copy_from_slice(&f80_bytes(y));
    }
    let (bytes, offsets) = encode(&out)?;
    Ok(Block {
        instructions: out,
        bytes,
        offsets,
        cuts,
        fpu,
        rflags: (rng.next_u64() & crate::STATUS) | 0x3002,
        scratch,
    })
}

/// Inputs every transcendental accepts: |x| < 1/4 (fine for F2XM1 and FYL2XP1), or positive
/// and moderate (fine for FYL2X), or in [-8, 8) (FSIN/FCOS/FPTAN/FPATAN).
fn trans_input(rng: &mut Rng, k: u64) -> (u16, u64) {
    let mm = rng.next_u64() | (1 << 63);
    let s = if k.is_multiple_of(3) {
        0
    } else {
        (rng.below(2) as u16) << 15
    };
    let e = match k % 4 {
        0 => 16383 - 4 - rng.below(20) as u16,
        1 => 16383 + rng.below(3) as u16,
        2 => 16383 - 4 - rng.below(4) as u16,
        _ => 16383 - 10 + rng.below(12) as u16,
    };
    if rng.below(40) == 0 {
        return (s, 0);
    }
    (s | e, mm)
}

fn encode(instrs: &[Instruction]) -> Result<(Vec<u8>, Vec<usize>)> {
    let mut enc = Encoder::new(64);
    let mut offsets = vec![0];
    let mut ip = CODE;
    for i in instrs {
        let len = enc.encode(i, ip)?;
        ip += len as u64;
        offsets.push(offsets.last().copied().unwrap_or(0) + len);
    }
    Ok((enc.take_buffer(), offsets))
}

impl Block {
    pub fn prefix(&self, k: usize) -> Result<Block> {
        let instructions = self.instructions[..k].to_vec();
        let (bytes, offsets) = encode(&instructions)?;
        Ok(Block {
            instructions,
            bytes,
            offsets,
            ..self.clone()
        })
    }

    pub fn listing(&self) -> String {
        use iced_x86::{Formatter, IntelFormatter};
        let mut s = String::new();
        for (k, i) in self.instructions.iter().enumerate() {
            let mut text = String::new();
            IntelFormatter::new().format(i, &mut text);
            s.push_str(&format!(
                "    {:#x}: {text}\n",
                CODE + self.offsets[k] as u64
            ));
        }
        s
    }
}

/// What a backend ended with.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub exception: Option<(u8, u64)>,
    /// CR2 of a #PF (0 otherwise).
    pub cr2: u64,
    pub rflags: u64,
    pub rax: u64,
    pub fpu: hv::FpuState,
    pub scratch: Vec<u8>,
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

    pub fn run(&mut self, block: &Block) -> Result<Outcome> {
        let mut p = block.bytes.clone();
        p.extend_from_slice(&[0x0f, 0x0b]);
        self.guest.write(CODE, &p)?;
        crate::diff::write_scratch(&self.guest, &block.scratch)?;
        let mut st = self.base.clone();
        st.regs.r15 = SCRATCH;
        st.regs.rsp = STACK;
        st.regs.rip = CODE;
        st.regs.rflags = block.rflags;
        st.fpu.fcw = block.fpu.fcw;
        st.fpu.fsw = block.fpu.fsw;
        st.fpu.ftw = block.fpu.ftw;
        st.fpu.st = block.fpu.st;
        st.fpu.fop = 0;
        st.fpu.fip = 0;
        st.fpu.fdp = 0;
        self.guest.vcpu.set_state(&st)?;
        let o = self.guest.run()?;
        let end = CODE + block.bytes.len() as u64;
        let (exception, rflags, rax) = match o.exception {
            Some(e) if e.vector == 6 && e.rip == end => (None, e.rflags, e.rax),
            Some(e) => (Some((e.vector, e.rip)), e.rflags, e.rax),
            None => (Some((0xff, o.state.regs.rip)), 0, 0),
        };
        Ok(Outcome {
            exception,
            cr2: o.exception.filter(|e| e.vector == 14).map_or(0, |e| e.cr2),
            rflags,
            rax,
            fpu: o.state.fpu,
            scratch: self.guest.read(SCRATCH, crate::diff::SCRATCH_LEN)?,
        })
    }
}

fn f80_value(b: &[u8]) -> Option<f64> {
    let mut mm = [0u8; 8];
    mm.copy_from_slice(&b[..8]);
    let mm = u64::from_le_bytes(mm);
    let se = u16::from_le_bytes([b[8], b[9]]);
    let e = i32::from(se & 0x7fff);
    if e == 0x7fff {
        return None;
    }
    let v = (mm as f64) * 2f64.powi(e.max(1) - 16383 - 63);
    Some(if se & 0x8000 != 0 { -v } else { v })
}

/// Whether two transcendental results agree within the tolerance.
fn trans_close(a: &[u8], b: &[u8]) -> bool {
    if a == b {
        return true;
    }
    match (f80_value(a), f80_value(b)) {
        (Some(x), Some(y)) => {
            let tol = x.abs().max(y.abs()) * 2f64.powi(-TRANS_BITS);
            (x - y).abs() <= tol || (x - y).abs() < 2f64.powi(-1000)
        }
        _ => false,
    }
}

/// The first difference: (what, reference, candidate). `loose`: the block ran a
/// transcendental and ended in #MF, so its result may still sit in a register (compared with
/// the tolerance) and C1 (its rounding direction) is not compared.
pub fn compare(a: &Outcome, b: &Outcome, loose: bool) -> Option<(String, String, String)> {
    let d = |w: &str, x: String, y: String| Some((w.to_string(), x, y));
    if a.exception != b.exception || a.cr2 != b.cr2 {
        return d(
            "end (exception, rip; cr2)",
            format!("{:?}; {:#x}", a.exception, a.cr2),
            format!("{:?}; {:#x}", b.exception, b.cr2),
        );
    }
    let (fa, fb) = (&a.fpu, &b.fpu);
    if fa.fcw != fb.fcw {
        return d("fcw", format!("{:#x}", fa.fcw), format!("{:#x}", fb.fcw));
    }
    let c1 = if loose { 0x200 } else { 0 };
    if fa.fsw & !c1 != fb.fsw & !c1 {
        return d("fsw", format!("{:#x}", fa.fsw), format!("{:#x}", fb.fsw));
    }
    if fa.ftw != fb.ftw {
        return d("ftw", format!("{:#x}", fa.ftw), format!("{:#x}", fb.ftw));
    }
    let top = usize::from((fa.fsw >> 11) & 7);
    for k in 0..8 {
        // An empty register keeps its old contents, which may be a popped transcendental
        // result: compared with the transcendental tolerance.
        let empty = fa.ftw & (1 << ((top + k) & 7)) == 0;
        if (empty || loose) && trans_close(&fa.st[k][..10], &fb.st[k][..10]) {
            continue;
        }
        if fa.st[k][..10] != fb.st[k][..10] {
            return d(
                &format!("st{k}"),
                format!("{:02x?}", &fa.st[k][..10]),
                format!("{:02x?}", &fb.st[k][..10]),
            );
        }
    }
    if fa.fip != fb.fip {
        return d("fip", format!("{:#x}", fa.fip), format!("{:#x}", fb.fip));
    }
    let mask = crate::STATUS;
    if a.rflags & mask != b.rflags & mask {
        return d(
            "rflags",
            format!("{:#x}", a.rflags & mask),
            format!("{:#x}", b.rflags & mask),
        );
    }
    if a.scratch.len() != b.scratch.len() {
        return d(
            "scratch length",
            a.scratch.len().to_string(),
            b.scratch.len().to_string(),
        );
    }
    for off in 0..a.scratch.len() {
        let t = off as u64;
        if (TRANS..TRANS + 0x100).contains(&t) {
            if t.is_multiple_of(16)
                && !trans_close(&a.scratch[off..off + 10], &b.scratch[off..off + 10])
            {
                return d(
                    &format!("transcendental result at scratch[{off:#x}]"),
                    format!("{:02x?}", &a.scratch[off..off + 10]),
                    format!("{:02x?}", &b.scratch[off..off + 10]),
                );
            }
            continue;
        }
        // The registers in the FNSAVE image: the empty ones may hold popped transcendental
        // results (the live ones are compared exactly after FRSTOR).
        if (SAVE + 28..SAVE + 108).contains(&t) {
            let slot = (t - SAVE - 28) % 10;
            if slot == 0 && !trans_close(&a.scratch[off..off + 10], &b.scratch[off..off + 10]) {
                return d(
                    &format!("FNSAVE register at scratch[{off:#x}]"),
                    format!("{:02x?}", &a.scratch[off..off + 10]),
                    format!("{:02x?}", &b.scratch[off..off + 10]),
                );
            }
            continue;
        }
        if a.scratch[off] != b.scratch[off] {
            let s = off & !7;
            let e = (s + 16).min(a.scratch.len());
            return d(
                &format!("scratch[{off:#x}]"),
                format!("{:02x?}", &a.scratch[s..e]),
                format!("{:02x?}", &b.scratch[s..e]),
            );
        }
    }
    None
}

/// Whether `o` ended in #MF in a block that ran a transcendental.
fn loose(block: &Block, o: &Outcome) -> bool {
    use iced_x86::Mnemonic::*;
    matches!(o.exception, Some((16, _)))
        && block.instructions.iter().any(|i| {
            matches!(
                i.mnemonic(),
                Fsin | Fcos | Fsincos | Fptan | Fpatan | F2xm1 | Fyl2x | Fyl2xp1
            )
        })
}

/// A diverging block cut to its shortest diverging prefix.
#[derive(Clone, Debug)]
pub struct Divergence {
    pub block: u64,
    pub prefix: Block,
    pub what: String,
    pub reference: String,
    pub candidate: String,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "x87 divergence (block {}): {}: reference {}, candidate {}",
            self.block, self.what, self.reference, self.candidate
        )?;
        write!(f, "  block:\n{}", self.prefix.listing())?;
        write!(
            f,
            "  initial: fcw={:#x} fsw={:#x} ftw={:#x} rflags={:#x}\n  st:",
            self.prefix.fpu.fcw, self.prefix.fpu.fsw, self.prefix.fpu.ftw, self.prefix.rflags
        )?;
        for r in &self.prefix.fpu.st {
            write!(f, " {:04x}:{:016x}", u16::from_le_bytes([r[8], r[9]]), {
                let mut m = [0u8; 8];
                m.copy_from_slice(&r[..8]);
                u64::from_le_bytes(m)
            })?;
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub blocks: u64,
    pub completed: u64,
    /// Blocks the reference ended with a #PF on the unmapped page after the scratch area.
    pub page_faults: u64,
    pub instructions: u64,
    pub divergences: Vec<Divergence>,
}

/// Runs `count` x87 blocks from `seed` on both backends.
pub fn run(
    reference: &dyn Hypervisor,
    candidate: &dyn Hypervisor,
    seed: u64,
    count: u64,
    max_report: usize,
) -> Result<Report> {
    let mut r = Runner::new(reference)?;
    let mut c = Runner::new(candidate)?;
    let mut report = Report::default();
    for n in 0..count {
        let block = generate(seed, n, 16)?;
        report.blocks += 1;
        report.instructions += block.instructions.len() as u64;
        let a = r.run(&block)?;
        let b = c.run(&block)?;
        if a.exception.is_none() {
            report.completed += 1;
        }
        if matches!(a.exception, Some((14, _)))
            && (crate::GUARD..crate::GUARD + 4096).contains(&a.cr2)
        {
            report.page_faults += 1;
        }
        if compare(&a, &b, loose(&block, &a)).is_none() {
            continue;
        }
        for &k in &block.cuts {
            let p = block.prefix(k)?;
            let (a, b) = (r.run(&p)?, c.run(&p)?);
            if let Some((what, x, y)) = compare(&a, &b, loose(&p, &a)) {
                report.divergences.push(Divergence {
                    block: n,
                    prefix: p,
                    what,
                    reference: x,
                    candidate: y,
                });
                break;
            }
        }
        if report.divergences.len() >= max_report {
            break;
        }
    }
    Ok(report)
}

/// KVM against emu; `None` after printing `SKIP: no /dev/kvm` when KVM cannot be used.
pub fn differential(seed: u64, count: u64, max_report: usize) -> Option<Result<Report>> {
    let kvm = crate::kvm()?;
    Some(run(&kvm, &crate::emu(), seed, count, max_report))
}
