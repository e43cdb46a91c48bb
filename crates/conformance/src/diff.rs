//! Differential testing: random blocks of integer instructions run from the same initial state on
//! a reference backend (KVM) and a candidate (emu); the full neutral state is compared.
//!
//! A block is generated from a seed by a small deterministic PRNG: register-only ALU, shift,
//! rotate, multiply/divide, bit, move and flag instructions on 8/16/32/64-bit registers, plus
//! memory forms on a scratch page addressed through R15 (which, like RSP, the block never
//! writes). Flags an instruction leaves undefined (iced-x86's per-instruction RFLAGS info) are
//! tracked through the block: no instruction reading an undefined flag is generated (a `cmp`
//! defining all six is inserted first), and the flags still undefined at the end are masked.
//! Divisions are preceded by instructions that make the divisor non-zero and the quotient fit;
//! `bsf`/`bsr` by a `bts` that makes their source non-zero or, one time in four, an `xor` that
//! makes it zero (ZF set, destination as the CPU leaves it).
//!
//! The scratch area is two pages ([`SCRATCH`] and [`crate::DATA2`], mapped with 4 KiB pages by
//! [`crate::Guest::map_low_4k`]) followed by an unmapped page ([`crate::GUARD`]). Memory operands
//! are mostly inside the first page at any alignment, sometimes across the boundary between the
//! two pages, and sometimes across the end of the second into the unmapped page: that access
//! must raise the same #PF (error code and CR2) on both sides with nothing written.
//!
//! By default blocks run at CPL 3, where KVM executes them on the host CPU: the hardware is the
//! oracle. [`Privilege::Kernel`] runs them at CPL 0 instead, which on a PVM host compares KVM's
//! instruction emulator with emu.
//!
//! A diverging block is cut down to its first diverging instruction by re-running prefixes.

#[path = "diff_x87.rs"]
pub mod x87;

use std::fmt;

use hv::{CpuState, Hypervisor};
use iced_x86::{
    Code, Encoder, Formatter, Instruction, IntelFormatter, MemoryOperand, Register, RflagsBits,
};

use crate::{CF, CODE, DATA, DF, Guest, OF, PF, Result, STACK, STATUS, Stop, ZF};

/// The page memory instructions address (through R15).
pub const SCRATCH: u64 = DATA;
/// Bytes of scratch memory compared: [`SCRATCH`] and the page after it.
pub const SCRATCH_LEN: usize = 8192;

/// SplitMix64: tiny, deterministic, good enough to pick instructions.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    /// A value with interesting bit patterns more often than uniform.
    fn value(&mut self) -> u64 {
        match self.below(8) {
            0 => 0,
            1 => u64::MAX,
            2 => 1u64 << self.below(64),
            3 => (1u64 << self.below(64)).wrapping_sub(1),
            4 => self.below(256),
            5 => 0x8000_0000_0000_0000 | self.below(16),
            _ => self.next_u64(),
        }
    }
}

/// Where blocks run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Privilege {
    /// CPL 3: natively on KVM.
    User,
    /// CPL 0: through KVM's instruction emulator on a PVM host.
    Kernel,
}

/// GPR encoding indices a block may write: all but RSP (4) and R15 (scratch base).
const WRITABLE: [usize; 14] = [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14];

/// Operand sizes in bytes: 1, 2, 4, 8.
const SIZES: [usize; 4] = [1, 2, 4, 8];

fn size_slot(size: usize) -> usize {
    match size {
        1 => 0,
        2 => 1,
        4 => 2,
        _ => 3,
    }
}

fn reg(size: usize, index: usize) -> Register {
    const R8: [Register; 16] = [
        Register::AL,
        Register::CL,
        Register::DL,
        Register::BL,
        Register::SPL,
        Register::BPL,
        Register::SIL,
        Register::DIL,
        Register::R8L,
        Register::R9L,
        Register::R10L,
        Register::R11L,
        Register::R12L,
        Register::R13L,
        Register::R14L,
        Register::R15L,
    ];
    const R16: [Register; 16] = [
        Register::AX,
        Register::CX,
        Register::DX,
        Register::BX,
        Register::SP,
        Register::BP,
        Register::SI,
        Register::DI,
        Register::R8W,
        Register::R9W,
        Register::R10W,
        Register::R11W,
        Register::R12W,
        Register::R13W,
        Register::R14W,
        Register::R15W,
    ];
    const R32: [Register; 16] = [
        Register::EAX,
        Register::ECX,
        Register::EDX,
        Register::EBX,
        Register::ESP,
        Register::EBP,
        Register::ESI,
        Register::EDI,
        Register::R8D,
        Register::R9D,
        Register::R10D,
        Register::R11D,
        Register::R12D,
        Register::R13D,
        Register::R14D,
        Register::R15D,
    ];
    const R64: [Register; 16] = [
        Register::RAX,
        Register::RCX,
        Register::RDX,
        Register::RBX,
        Register::RSP,
        Register::RBP,
        Register::RSI,
        Register::RDI,
        Register::R8,
        Register::R9,
        Register::R10,
        Register::R11,
        Register::R12,
        Register::R13,
        Register::R14,
        Register::R15,
    ];
    let i = index & 15;
    match size {
        1 => R8[i],
        2 => R16[i],
        4 => R32[i],
        _ => R64[i],
    }
}

use Code::*;

/// `op rm, r` forms by size.
const RM_R: &[[Code; 4]] = &[
    [Add_rm8_r8, Add_rm16_r16, Add_rm32_r32, Add_rm64_r64],
    [Or_rm8_r8, Or_rm16_r16, Or_rm32_r32, Or_rm64_r64],
    [Adc_rm8_r8, Adc_rm16_r16, Adc_rm32_r32, Adc_rm64_r64],
    [Sbb_rm8_r8, Sbb_rm16_r16, Sbb_rm32_r32, Sbb_rm64_r64],
    [And_rm8_r8, And_rm16_r16, And_rm32_r32, And_rm64_r64],
    [Sub_rm8_r8, Sub_rm16_r16, Sub_rm32_r32, Sub_rm64_r64],
    [Xor_rm8_r8, Xor_rm16_r16, Xor_rm32_r32, Xor_rm64_r64],
    [Cmp_rm8_r8, Cmp_rm16_r16, Cmp_rm32_r32, Cmp_rm64_r64],
    [Test_rm8_r8, Test_rm16_r16, Test_rm32_r32, Test_rm64_r64],
    [Mov_rm8_r8, Mov_rm16_r16, Mov_rm32_r32, Mov_rm64_r64],
    [Xchg_rm8_r8, Xchg_rm16_r16, Xchg_rm32_r32, Xchg_rm64_r64],
    [Xadd_rm8_r8, Xadd_rm16_r16, Xadd_rm32_r32, Xadd_rm64_r64],
    [
        Cmpxchg_rm8_r8,
        Cmpxchg_rm16_r16,
        Cmpxchg_rm32_r32,
        Cmpxchg_rm64_r64,
    ],
];

/// `op r, rm` forms by size (the memory-source direction).
const R_RM: &[[Code; 4]] = &[
    [Add_r8_rm8, Add_r16_rm16, Add_r32_rm32, Add_r64_rm64],
    [Adc_r8_rm8, Adc_r16_rm16, Adc_r32_rm32, Adc_r64_rm64],
    [Sub_r8_rm8, Sub_r16_rm16, Sub_r32_rm32, Sub_r64_rm64],
    [Sbb_r8_rm8, Sbb_r16_rm16, Sbb_r32_rm32, Sbb_r64_rm64],
    [Xor_r8_rm8, Xor_r16_rm16, Xor_r32_rm32, Xor_r64_rm64],
    [Cmp_r8_rm8, Cmp_r16_rm16, Cmp_r32_rm32, Cmp_r64_rm64],
    [Mov_r8_rm8, Mov_r16_rm16, Mov_r32_rm32, Mov_r64_rm64],
];

/// `op rm, imm` forms by size (full-size immediate).
const RM_IMM: &[[Code; 4]] = &[
    [Add_rm8_imm8, Add_rm16_imm16, Add_rm32_imm32, Add_rm64_imm32],
    [Or_rm8_imm8, Or_rm16_imm16, Or_rm32_imm32, Or_rm64_imm32],
    [Adc_rm8_imm8, Adc_rm16_imm16, Adc_rm32_imm32, Adc_rm64_imm32],
    [Sbb_rm8_imm8, Sbb_rm16_imm16, Sbb_rm32_imm32, Sbb_rm64_imm32],
    [And_rm8_imm8, And_rm16_imm16, And_rm32_imm32, And_rm64_imm32],
    [Sub_rm8_imm8, Sub_rm16_imm16, Sub_rm32_imm32, Sub_rm64_imm32],
    [Xor_rm8_imm8, Xor_rm16_imm16, Xor_rm32_imm32, Xor_rm64_imm32],
    [Cmp_rm8_imm8, Cmp_rm16_imm16, Cmp_rm32_imm32, Cmp_rm64_imm32],
    [
        Test_rm8_imm8,
        Test_rm16_imm16,
        Test_rm32_imm32,
        Test_rm64_imm32,
    ],
];

const UNARY: &[[Code; 4]] = &[
    [Inc_rm8, Inc_rm16, Inc_rm32, Inc_rm64],
    [Dec_rm8, Dec_rm16, Dec_rm32, Dec_rm64],
    [Neg_rm8, Neg_rm16, Neg_rm32, Neg_rm64],
    [Not_rm8, Not_rm16, Not_rm32, Not_rm64],
];

/// One-operand multiplies (RDX:RAX).
const MUL: &[[Code; 4]] = &[
    [Mul_rm8, Mul_rm16, Mul_rm32, Mul_rm64],
    [Imul_rm8, Imul_rm16, Imul_rm32, Imul_rm64],
];

/// Shifts and rotates: (by 1, by imm8, by CL).
const SHIFT: &[[[Code; 4]; 3]] = &[
    [
        [Rol_rm8_1, Rol_rm16_1, Rol_rm32_1, Rol_rm64_1],
        [Rol_rm8_imm8, Rol_rm16_imm8, Rol_rm32_imm8, Rol_rm64_imm8],
        [Rol_rm8_CL, Rol_rm16_CL, Rol_rm32_CL, Rol_rm64_CL],
    ],
    [
        [Ror_rm8_1, Ror_rm16_1, Ror_rm32_1, Ror_rm64_1],
        [Ror_rm8_imm8, Ror_rm16_imm8, Ror_rm32_imm8, Ror_rm64_imm8],
        [Ror_rm8_CL, Ror_rm16_CL, Ror_rm32_CL, Ror_rm64_CL],
    ],
    [
        [Rcl_rm8_1, Rcl_rm16_1, Rcl_rm32_1, Rcl_rm64_1],
        [Rcl_rm8_imm8, Rcl_rm16_imm8, Rcl_rm32_imm8, Rcl_rm64_imm8],
        [Rcl_rm8_CL, Rcl_rm16_CL, Rcl_rm32_CL, Rcl_rm64_CL],
    ],
    [
        [Rcr_rm8_1, Rcr_rm16_1, Rcr_rm32_1, Rcr_rm64_1],
        [Rcr_rm8_imm8, Rcr_rm16_imm8, Rcr_rm32_imm8, Rcr_rm64_imm8],
        [Rcr_rm8_CL, Rcr_rm16_CL, Rcr_rm32_CL, Rcr_rm64_CL],
    ],
    [
        [Shl_rm8_1, Shl_rm16_1, Shl_rm32_1, Shl_rm64_1],
        [Shl_rm8_imm8, Shl_rm16_imm8, Shl_rm32_imm8, Shl_rm64_imm8],
        [Shl_rm8_CL, Shl_rm16_CL, Shl_rm32_CL, Shl_rm64_CL],
    ],
    [
        [Shr_rm8_1, Shr_rm16_1, Shr_rm32_1, Shr_rm64_1],
        [Shr_rm8_imm8, Shr_rm16_imm8, Shr_rm32_imm8, Shr_rm64_imm8],
        [Shr_rm8_CL, Shr_rm16_CL, Shr_rm32_CL, Shr_rm64_CL],
    ],
    [
        [Sar_rm8_1, Sar_rm16_1, Sar_rm32_1, Sar_rm64_1],
        [Sar_rm8_imm8, Sar_rm16_imm8, Sar_rm32_imm8, Sar_rm64_imm8],
        [Sar_rm8_CL, Sar_rm16_CL, Sar_rm32_CL, Sar_rm64_CL],
    ],
];

/// Bit tests with an immediate bit number (16/32/64 only).
const BT_IMM: &[[Code; 3]] = &[
    [Bt_rm16_imm8, Bt_rm32_imm8, Bt_rm64_imm8],
    [Bts_rm16_imm8, Bts_rm32_imm8, Bts_rm64_imm8],
    [Btr_rm16_imm8, Btr_rm32_imm8, Btr_rm64_imm8],
    [Btc_rm16_imm8, Btc_rm32_imm8, Btc_rm64_imm8],
];

const BT_REG: &[[Code; 3]] = &[
    [Bt_rm16_r16, Bt_rm32_r32, Bt_rm64_r64],
    [Bts_rm16_r16, Bts_rm32_r32, Bts_rm64_r64],
    [Btr_rm16_r16, Btr_rm32_r32, Btr_rm64_r64],
    [Btc_rm16_r16, Btc_rm32_r32, Btc_rm64_r64],
];

/// `op r, rm` for 16/32/64.
const R_RM_WIDE: &[[Code; 3]] = &[
    [Imul_r16_rm16, Imul_r32_rm32, Imul_r64_rm64],
    [Popcnt_r16_rm16, Popcnt_r32_rm32, Popcnt_r64_rm64],
    [Cmovo_r16_rm16, Cmovo_r32_rm32, Cmovo_r64_rm64],
    [Cmovb_r16_rm16, Cmovb_r32_rm32, Cmovb_r64_rm64],
    [Cmove_r16_rm16, Cmove_r32_rm32, Cmove_r64_rm64],
    [Cmovbe_r16_rm16, Cmovbe_r32_rm32, Cmovbe_r64_rm64],
    [Cmovs_r16_rm16, Cmovs_r32_rm32, Cmovs_r64_rm64],
    [Cmovp_r16_rm16, Cmovp_r32_rm32, Cmovp_r64_rm64],
    [Cmovl_r16_rm16, Cmovl_r32_rm32, Cmovl_r64_rm64],
    [Cmovle_r16_rm16, Cmovle_r32_rm32, Cmovle_r64_rm64],
    [Cmovno_r16_rm16, Cmovno_r32_rm32, Cmovno_r64_rm64],
    [Cmovae_r16_rm16, Cmovae_r32_rm32, Cmovae_r64_rm64],
    [Cmovne_r16_rm16, Cmovne_r32_rm32, Cmovne_r64_rm64],
    [Cmova_r16_rm16, Cmova_r32_rm32, Cmova_r64_rm64],
    [Cmovns_r16_rm16, Cmovns_r32_rm32, Cmovns_r64_rm64],
    [Cmovnp_r16_rm16, Cmovnp_r32_rm32, Cmovnp_r64_rm64],
    [Cmovge_r16_rm16, Cmovge_r32_rm32, Cmovge_r64_rm64],
    [Cmovg_r16_rm16, Cmovg_r32_rm32, Cmovg_r64_rm64],
];

const SETCC: &[Code] = &[
    Seto_rm8, Setno_rm8, Setb_rm8, Setae_rm8, Sete_rm8, Setne_rm8, Setbe_rm8, Seta_rm8, Sets_rm8,
    Setns_rm8, Setp_rm8, Setnp_rm8, Setl_rm8, Setge_rm8, Setle_rm8, Setg_rm8,
];

/// Instructions without operands.
const BARE: &[Code] = &[Cbw, Cwde, Cdqe, Cwd, Cdq, Cqo, Clc, Stc, Cmc, Lahf, Sahf];

/// Extensions: (r, rm) with different sizes.
const EXTEND: &[(Code, usize, usize)] = &[
    (Movzx_r32_rm8, 4, 1),
    (Movzx_r64_rm16, 8, 2),
    (Movzx_r16_rm8, 2, 1),
    (Movsx_r32_rm8, 4, 1),
    (Movsx_r64_rm8, 8, 1),
    (Movsx_r64_rm16, 8, 2),
    (Movsxd_r64_rm32, 8, 4),
];

/// Converts iced-x86's RFLAGS bit set to architectural RFLAGS bits.
fn arch_flags(iced: u32) -> u64 {
    let map = [
        (RflagsBits::OF, OF),
        (RflagsBits::SF, crate::SF),
        (RflagsBits::ZF, ZF),
        (RflagsBits::AF, crate::AF),
        (RflagsBits::CF, CF),
        (RflagsBits::PF, PF),
        (RflagsBits::DF, DF),
    ];
    map.iter()
        .filter(|(i, _)| iced & i != 0)
        .fold(0, |acc, (_, a)| acc | a)
}

/// Whether the instruction may leave flags untouched at run time (a count that can be 0).
fn count_may_be_zero(i: &Instruction) -> bool {
    i.op_count() >= 2 && (i.op1_register() == Register::CL || i.op2_register() == Register::CL)
}

/// CF and OF of `shl`/`shr`/`sar` by an immediate count of at least the operand size are
/// undefined (iced-x86 reports them as written).
fn shift_beyond_size(i: &Instruction) -> u64 {
    use iced_x86::Mnemonic;
    if !matches!(i.mnemonic(), Mnemonic::Shl | Mnemonic::Shr | Mnemonic::Sar) {
        return 0;
    }
    let bits = match i.op0_kind() {
        iced_x86::OpKind::Register => i.op0_register().size() * 8,
        _ => i.memory_size().size() * 8,
    };
    let count = match i.op1_kind() {
        iced_x86::OpKind::Immediate8 => u64::from(i.immediate8()),
        _ => return 0,
    };
    if count as usize >= bits { CF | OF } else { 0 }
}

/// A generated block and the state it starts from.
#[derive(Clone, Debug)]
pub struct Block {
    pub instructions: Vec<Instruction>,
    /// Encoded instruction boundaries: `bytes[offsets[k]..offsets[k + 1]]` is instruction k.
    pub offsets: Vec<usize>,
    pub bytes: Vec<u8>,
    /// RFLAGS bits undefined after the whole block.
    pub undefined: u64,
    /// RFLAGS bits undefined before instruction k (`undefined_at[k]`; the last entry is
    /// `undefined`): what is compared when instruction k faults. Empty: `undefined` throughout.
    pub undefined_at: Vec<u64>,
    pub regs: [u64; 16],
    pub rflags: u64,
    pub scratch: Vec<u8>,
}

struct Builder {
    out: Vec<Instruction>,
    undefined: u64,
    undefined_at: Vec<u64>,
}

impl Builder {
    fn push(&mut self, rng: &mut Rng, i: Instruction) {
        if arch_flags(i.rflags_read()) & self.undefined != 0 {
            // Define all six status flags first.
            let a = reg(8, rng.pick(&WRITABLE));
            let b = reg(8, rng.pick(&WRITABLE));
            if let Ok(cmp) = Instruction::with2(Cmp_rm64_r64, a, b) {
                self.out.push(cmp);
                self.undefined = 0;
                self.undefined_at.push(0);
            }
        }
        let undefined = arch_flags(i.rflags_undefined()) | shift_beyond_size(&i);
        let modified = arch_flags(i.rflags_modified());
        if count_may_be_zero(&i) {
            // A count of 0 leaves the flags alone, one beyond the size leaves CF undefined:
            // whatever the count did to the flags is unknown.
            self.undefined |= modified;
        } else {
            self.undefined = (self.undefined & !modified) | undefined;
        }
        self.out.push(i);
        self.undefined_at.push(self.undefined);
    }
}

/// A scratch displacement for a `size`-byte operand: anywhere in the first page (any
/// alignment), one time in 16 across into the second page, one time in 64 across the end of
/// the second page into the unmapped one (a #PF).
pub fn edge_disp(rng: &mut Rng, size: u64) -> i64 {
    let across = |rng: &mut Rng, end: u64| end - 1 - rng.below(size.max(2) - 1);
    (match rng.below(64) {
        0 if size > 1 => across(rng, 8192),
        1..=4 if size > 1 => across(rng, 4096),
        _ => rng.below(4096 - size + 1),
    }) as i64
}

fn mem(rng: &mut Rng, size: usize) -> MemoryOperand {
    MemoryOperand::with_base_displ(Register::R15, edge_disp(rng, size as u64))
}

fn imm(rng: &mut Rng, size: usize) -> i32 {
    let v = rng.value();
    match size {
        1 => i32::from(v as i8),
        2 => i32::from(v as i16),
        _ => v as i32,
    }
}

/// Appends one generated item (one or a few instructions) to `b`.
fn generate_item(rng: &mut Rng, b: &mut Builder) -> std::result::Result<(), iced_x86::IcedError> {
    let size = rng.pick(&SIZES);
    let s = size_slot(size);
    let d = rng.pick(&WRITABLE);
    let src = rng.pick(&WRITABLE);
    let wide = rng.below(3) as usize; // 16/32/64 slot
    let wsize = [2, 4, 8][wide];
    let i = match rng.below(20) {
        0..=3 => {
            let code = rng.pick(RM_R)[s];
            Instruction::with2(code, reg(size, d), reg(size, src))?
        }
        4 | 5 => {
            let code = rng.pick(RM_IMM)[s];
            Instruction::with2(code, reg(size, d), imm(rng, size))?
        }
        6 => Instruction::with1(rng.pick(UNARY)[s], reg(size, d))?,
        7 => Instruction::with1(rng.pick(MUL)[s], reg(size, src))?,
        8 | 9 => {
            let forms = rng.pick(SHIFT);
            let bits = (size * 8) as u64;
            match rng.below(3) {
                0 => Instruction::with2(forms[0][s], reg(size, d), 1u32)?,
                1 => {
                    let mask = if size == 8 { 63 } else { 31 };
                    let count = 1 + rng.below(mask.min(bits + 2));
                    Instruction::with2(forms[1][s], reg(size, d), count as u32)?
                }
                _ => Instruction::with2(forms[2][s], reg(size, d), Register::CL)?,
            }
        }
        10 => {
            let code = rng.pick(R_RM_WIDE)[wide];
            Instruction::with2(code, reg(wsize, d), reg(wsize, src))?
        }
        11 => {
            if rng.below(2) == 0 {
                let n = rng.below((wsize * 8) as u64) as u32;
                Instruction::with2(rng.pick(BT_IMM)[wide], reg(wsize, d), n)?
            } else {
                Instruction::with2(rng.pick(BT_REG)[wide], reg(wsize, d), reg(wsize, src))?
            }
        }
        12 => {
            // bsf/bsr of a source made non-zero first, or zero (one time in four).
            if rng.below(4) == 0 {
                b.push(
                    rng,
                    Instruction::with2(Xor_rm32_r32, reg(4, src), reg(4, src))?,
                );
            } else {
                let n = rng.below((wsize * 8) as u64) as u32;
                let bts = [Bts_rm16_imm8, Bts_rm32_imm8, Bts_rm64_imm8][wide];
                b.push(rng, Instruction::with2(bts, reg(wsize, src), n)?);
            }
            let op = if rng.below(2) == 0 {
                [Bsf_r16_rm16, Bsf_r32_rm32, Bsf_r64_rm64]
            } else {
                [Bsr_r16_rm16, Bsr_r32_rm32, Bsr_r64_rm64]
            };
            Instruction::with2(op[wide], reg(wsize, d), reg(wsize, src))?
        }
        13 => return divide(rng, b),
        14 => {
            let (code, dsz, ssz) = rng.pick(EXTEND);
            Instruction::with2(code, reg(dsz, d), reg(ssz, src))?
        }
        15 => match rng.below(4) {
            0 => Instruction::with1(rng.pick(SETCC), reg(1, d))?,
            1 => Instruction::with(rng.pick(BARE)),
            2 => {
                let q = rng.below(2) as usize;
                Instruction::with1([Bswap_r32, Bswap_r64][q], reg(4 << q, d))?
            }
            _ => {
                let by_cl = rng.below(2) == 0;
                let s64 = rng.below(2) == 1;
                let (r, code) = match (by_cl, s64, rng.below(2)) {
                    (false, false, 0) => (4, Shld_rm32_r32_imm8),
                    (false, false, _) => (4, Shrd_rm32_r32_imm8),
                    (false, true, 0) => (8, Shld_rm64_r64_imm8),
                    (false, true, _) => (8, Shrd_rm64_r64_imm8),
                    (true, false, 0) => (4, Shld_rm32_r32_CL),
                    (true, false, _) => (4, Shrd_rm32_r32_CL),
                    (true, true, 0) => (8, Shld_rm64_r64_CL),
                    (true, true, _) => (8, Shrd_rm64_r64_CL),
                };
                if by_cl {
                    Instruction::with3(code, reg(r, d), reg(r, src), Register::CL)?
                } else {
                    let count = 1 + rng.below((r * 8 - 1) as u64) as u32;
                    Instruction::with3(code, reg(r, d), reg(r, src), count)?
                }
            }
        },
        // Memory forms on the scratch page.
        16 => {
            let code = rng.pick(RM_R)[s];
            Instruction::with2(code, mem(rng, size), reg(size, src))?
        }
        17 => {
            let code = rng.pick(R_RM)[s];
            Instruction::with2(code, reg(size, d), mem(rng, size))?
        }
        18 => match rng.below(3) {
            0 => Instruction::with1(rng.pick(UNARY)[s], mem(rng, size))?,
            1 => {
                let code = rng.pick(RM_IMM)[s];
                Instruction::with2(code, mem(rng, size), imm(rng, size))?
            }
            _ => {
                let forms = rng.pick(SHIFT);
                let count = 1 + rng.below(((size * 8) as u64).min(31));
                Instruction::with2(forms[1][s], mem(rng, size), count as u32)?
            }
        },
        _ => {
            let n = rng.below((wsize * 8) as u64) as u32;
            Instruction::with2(rng.pick(BT_IMM)[wide], mem(rng, wsize), n)?
        }
    };
    b.push(rng, i);
    Ok(())
}

/// `div`/`idiv` with a divisor made non-zero and a quotient that fits.
fn divide(rng: &mut Rng, b: &mut Builder) -> std::result::Result<(), iced_x86::IcedError> {
    // The divisor must not be RAX or RDX.
    let pool: Vec<usize> = WRITABLE
        .iter()
        .copied()
        .filter(|&r| r != 0 && r != 2)
        .collect();
    let src = rng.pick(&pool);
    let s64 = rng.below(2) == 1;
    let (size, or, btr, div, idiv, ext) = if s64 {
        (8, Or_rm64_imm8, Btr_rm64_imm8, Div_rm64, Idiv_rm64, Cqo)
    } else {
        (4, Or_rm32_imm8, Btr_rm32_imm8, Div_rm32, Idiv_rm32, Cdq)
    };
    b.push(rng, Instruction::with2(or, reg(size, src), 1i32)?);
    if rng.below(2) == 0 {
        // Unsigned: RDX = 0.
        b.push(
            rng,
            Instruction::with2(Xor_rm32_r32, Register::EDX, Register::EDX)?,
        );
        b.push(rng, Instruction::with1(div, reg(size, src))?);
    } else {
        // Signed: positive divisor, sign-extended dividend.
        b.push(
            rng,
            Instruction::with2(btr, reg(size, src), (size * 8 - 1) as u32)?,
        );
        b.push(rng, Instruction::with(ext));
        b.push(rng, Instruction::with1(idiv, reg(size, src))?);
    }
    Ok(())
}

/// Generates block `n` of the run seeded with `seed`: up to `max_len` items.
pub fn generate(seed: u64, n: u64, max_len: usize) -> Result<Block> {
    let mut rng = Rng::new(seed ^ n.wrapping_mul(0x2545_f491_4f6c_dd1d));
    let mut b = Builder {
        out: Vec::new(),
        undefined: 0,
        undefined_at: vec![0],
    };
    let items = 1 + rng.below(max_len.max(1) as u64);
    for _ in 0..items {
        generate_item(&mut rng, &mut b)?;
    }
    let mut regs = [0u64; 16];
    for r in regs.iter_mut() {
        *r = rng.value();
    }
    regs[4] = STACK;
    regs[15] = SCRATCH;
    let rflags = (rng.next_u64() & STATUS) | 0x3002;
    let mut scratch = vec![0u8; SCRATCH_LEN];
    for c in scratch.chunks_mut(8) {
        c.copy_from_slice(&rng.value().to_le_bytes());
    }
    let (bytes, offsets) = encode(&b.out)?;
    Ok(Block {
        instructions: b.out,
        offsets,
        bytes,
        undefined: b.undefined,
        undefined_at: b.undefined_at,
        regs,
        rflags,
        scratch,
    })
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
    /// The first `k` instructions as a block of their own (undefined flags recomputed).
    pub fn prefix(&self, k: usize) -> Result<Block> {
        let mut rng = Rng::new(0);
        let mut b = Builder {
            out: Vec::new(),
            undefined: 0,
            undefined_at: vec![0],
        };
        for i in &self.instructions[..k] {
            // Replays: the generator already inserted any flag-defining `cmp`.
            let before = b.out.len();
            b.push(&mut rng, *i);
            debug_assert_eq!(b.out.len(), before + 1);
        }
        let (bytes, offsets) = encode(&b.out)?;
        Ok(Block {
            instructions: b.out,
            offsets,
            bytes,
            undefined: b.undefined,
            undefined_at: if self.undefined_at.is_empty() {
                Vec::new()
            } else {
                b.undefined_at
            },
            ..self.clone()
        })
    }

    /// One line per instruction: address, bytes, Intel syntax.
    pub fn listing(&self) -> String {
        let mut s = String::new();
        for k in 0..self.instructions.len() {
            s.push_str(&format!("    {}\n", self.describe(k)));
        }
        s
    }

    /// Instruction `k`: address, bytes and disassembly.
    pub fn describe(&self, k: usize) -> String {
        let bytes = &self.bytes[self.offsets[k]..self.offsets[k + 1]];
        let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mut text = String::new();
        IntelFormatter::new().format(&self.instructions[k], &mut text);
        format!(
            "{:#x}: {:<32} {text}",
            CODE + self.offsets[k] as u64,
            hex.join(" ")
        )
    }

    /// The code to load: the block, then `ud2`. The block ends through the #UD stub rather
    /// than `out`, because at CPL 3 KVM on a PVM host ignores IOPL (`out` raises #GP).
    fn program(&self) -> Vec<u8> {
        let mut p = self.bytes.clone();
        p.extend_from_slice(&[0x0f, 0x0b]);
        p
    }
}

/// What one backend ended with after a block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Result1 {
    pub stop: Stop,
    pub regs: hv::Registers,
    pub exception: Option<(u8, u64)>,
    /// CR2 of a #PF (0 otherwise).
    pub cr2: u64,
    /// [`SCRATCH_LEN`] bytes from [`SCRATCH`].
    pub scratch: Vec<u8>,
}

/// A backend VM reused for every block.
pub struct Runner {
    guest: Guest,
    base: CpuState,
    privilege: Privilege,
}

impl Runner {
    pub fn new(hv: &dyn Hypervisor, privilege: Privilege) -> Result<Runner> {
        Runner::with_model(hv, privilege, hv::CpuModel::portable())
    }

    /// [`Runner::new`] with another CPU model.
    pub fn with_model(
        hv: &dyn Hypervisor,
        privilege: Privilege,
        model: hv::CpuModel,
    ) -> Result<Runner> {
        let mut guest = Guest::with_model(hv, 2, model)?;
        guest.timeout = std::time::Duration::from_secs(30);
        guest.map_low_4k(&[crate::GUARD])?;
        let mut base = guest.vcpu.state()?;
        match privilege {
            Privilege::User => crate::user_mode(&mut base),
            Privilege::Kernel => crate::kernel_mode(&mut base),
        }
        Ok(Runner {
            guest,
            base,
            privilege,
        })
    }

    pub fn run(&mut self, block: &Block) -> Result<Result1> {
        self.guest.write(CODE, &block.program())?;
        write_scratch(&self.guest, &block.scratch)?;
        let mut st = self.base.clone();
        for (k, v) in block.regs.iter().enumerate() {
            st.regs.set_gpr(k, *v);
        }
        st.regs.rip = CODE;
        st.regs.rflags = match self.privilege {
            Privilege::User => block.rflags,
            Privilege::Kernel => block.rflags & !0x3000,
        };
        self.guest.vcpu.set_state(&st)?;
        let o = self.guest.run()?;
        let mut regs = o.state.regs;
        let mut exception = o.exception.map(|e| (e.vector, e.error_code));
        let end = CODE + block.bytes.len() as u64;
        if let Some(e) = o.exception {
            // The state the stub saw (RAX, the frame), not the stub's own.
            regs.rax = e.rax;
            regs.rsp = e.rsp;
            regs.rip = e.rip;
            regs.rflags = e.rflags;
            if e.vector == 6 && e.rip == end {
                // The final `ud2`.
                exception = None;
            }
        }
        let cr2 = o.exception.filter(|e| e.vector == 14).map_or(0, |e| e.cr2);
        Ok(Result1 {
            stop: o.stop,
            regs,
            exception,
            cr2,
            scratch: self.guest.read(SCRATCH, SCRATCH_LEN)?,
        })
    }
}

/// Loads `scratch` at [`SCRATCH`], zero-filled to [`SCRATCH_LEN`] bytes (a tester whose data
/// fills one page still starts every block from the same second page).
pub fn write_scratch(guest: &Guest, scratch: &[u8]) -> Result<()> {
    let mut all = scratch.to_vec();
    all.resize(SCRATCH_LEN, 0);
    Ok(guest.write(SCRATCH, &all)?)
}

const GPR_NAMES: [&str; 16] = [
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15",
];

/// The first difference between two results of `block`, as (what, reference, candidate).
pub fn compare(
    block: &Block,
    reference: &Result1,
    candidate: &Result1,
) -> Option<(String, u64, u64)> {
    if reference.stop != candidate.stop
        || reference.exception != candidate.exception
        || reference.cr2 != candidate.cr2
    {
        return Some((
            format!(
                "end of run: {:?} {:?} cr2 {:#x} vs {:?} {:?} cr2 {:#x}",
                reference.stop,
                reference.exception,
                reference.cr2,
                candidate.stop,
                candidate.exception,
                candidate.cr2
            ),
            reference.regs.rip,
            candidate.regs.rip,
        ));
    }
    for (k, name) in GPR_NAMES.iter().enumerate() {
        let (a, b) = (reference.regs.gpr(k), candidate.regs.gpr(k));
        if a != b {
            return Some((name.to_string(), a, b));
        }
    }
    if reference.regs.rip != candidate.regs.rip {
        return Some(("rip".into(), reference.regs.rip, candidate.regs.rip));
    }
    // A block that faulted at instruction k left the flags as they were before it.
    let undefined = match reference.exception {
        Some(_) => block
            .offsets
            .iter()
            .position(|&o| CODE + o as u64 == reference.regs.rip)
            .and_then(|k| block.undefined_at.get(k))
            .copied()
            .unwrap_or(block.undefined),
        None => block.undefined,
    };
    let mask = (STATUS | DF) & !undefined;
    if reference.regs.rflags & mask != candidate.regs.rflags & mask {
        return Some((
            format!("rflags (compared bits {mask:#x})"),
            reference.regs.rflags & mask,
            candidate.regs.rflags & mask,
        ));
    }
    let len = reference.scratch.len().min(candidate.scratch.len());
    if reference.scratch.len() != candidate.scratch.len() {
        return Some((
            "scratch length".into(),
            reference.scratch.len() as u64,
            candidate.scratch.len() as u64,
        ));
    }
    for off in (0..len).step_by(8) {
        let a = u64::from_le_bytes(reference.scratch[off..off + 8].try_into().unwrap_or([0; 8]));
        let b = u64::from_le_bytes(candidate.scratch[off..off + 8].try_into().unwrap_or([0; 8]));
        if a != b {
            return Some((format!("scratch[{off:#x}] (qword)"), a, b));
        }
    }
    None
}

/// A block whose results differ, cut down to its first diverging instruction.
#[derive(Clone, Debug)]
pub struct Divergence {
    pub seed: u64,
    pub block: u64,
    /// The shortest diverging prefix.
    pub prefix: Block,
    pub what: String,
    pub reference: u64,
    pub candidate: u64,
}

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.prefix;
        let last = p.instructions.len().saturating_sub(1);
        writeln!(
            f,
            "divergence (seed {:#x}, block {}): {}: reference {:#x}, candidate {:#x}",
            self.seed, self.block, self.what, self.reference, self.candidate
        )?;
        if !p.instructions.is_empty() {
            writeln!(f, "  first diverging instruction: {}", p.describe(last))?;
        }
        write!(f, "  block:\n{}", p.listing())?;
        write!(f, "  initial:")?;
        for (k, name) in GPR_NAMES.iter().enumerate() {
            write!(f, " {name}={:#x}", p.regs[k])?;
        }
        write!(f, " rflags={:#x}", p.rflags)
    }
}

/// Totals of a differential run.
#[derive(Debug, Default)]
pub struct Report {
    pub blocks: u64,
    /// Blocks that ran to their end on the reference (not stopped by an exception).
    pub completed: u64,
    pub instructions: u64,
    pub divergences: Vec<Divergence>,
    /// At CPL 0: divergences that are known differences of KVM's instruction emulator
    /// ([`known_kvm_emulator_difference`]); they do not count towards the report limit.
    pub known: Vec<Divergence>,
    /// Blocks the reference ended with a #PF on the unmapped page after the scratch area (an
    /// operand crossing into it, generated on purpose).
    pub page_faults: u64,
}

impl Report {
    /// Counts how the reference ended a block: to its end, or by a #PF on [`crate::GUARD`].
    pub fn count_end(&mut self, reference: &Result1, end: u64) {
        if reference.exception.is_none() && reference.regs.rip == end {
            self.completed += 1;
        }
        if matches!(reference.exception, Some((14, _)))
            && (crate::GUARD..crate::GUARD + 4096).contains(&reference.cr2)
        {
            self.page_faults += 1;
        }
    }
}

/// At CPL 0 on a PVM host the reference is KVM's instruction emulator, not the CPU. It differs
/// from the host CPU (AMD Zen 4, checked at CPL 3) where emu agrees with the CPU:
/// * `cmpxchg r32, r32` whose comparison fails: KVM zero-extends the 32-bit destination into
///   its 64-bit register; the CPU (and emu) leave the register unchanged.
/// * a store crossing the end of the scratch area into the unmapped page: KVM writes the part
///   before the page boundary, then injects the #PF; the CPU (and emu) write nothing.
pub fn known_kvm_emulator_difference(d: &Divergence) -> bool {
    d.prefix.instructions.last().is_some_and(|i| {
        (i.code() == Cmpxchg_rm32_r32 && i.op0_kind() == iced_x86::OpKind::Register)
            || (d.what.starts_with("scratch[")
                && i.op0_kind() == iced_x86::OpKind::Memory
                && i.memory_displacement64() + i.memory_size().size() as u64 > SCRATCH_LEN as u64)
    })
}

/// Runs `count` blocks from `seed` on both backends and compares them; at most `max_report`
/// divergences are collected (each cut to its first diverging instruction).
pub fn run(
    reference: &dyn Hypervisor,
    candidate: &dyn Hypervisor,
    privilege: Privilege,
    seed: u64,
    count: u64,
    max_report: usize,
) -> Result<Report> {
    let mut r = Runner::new(reference, privilege)?;
    let mut c = Runner::new(candidate, privilege)?;
    let mut report = Report::default();
    for n in 0..count {
        let block = generate(seed, n, 12)?;
        report.blocks += 1;
        report.instructions += block.instructions.len() as u64;
        let a = r
            .run(&block)
            .map_err(|e| context(e, "reference", n, &block))?;
        let b = c
            .run(&block)
            .map_err(|e| context(e, "candidate", n, &block))?;
        report.count_end(&a, CODE + block.bytes.len() as u64);
        if compare(&block, &a, &b).is_none() {
            continue;
        }
        // Shortest diverging prefix.
        for k in 1..=block.instructions.len() {
            let p = block.prefix(k)?;
            let (a, b) = (r.run(&p)?, c.run(&p)?);
            if let Some((what, x, y)) = compare(&p, &a, &b) {
                let d = Divergence {
                    seed,
                    block: n,
                    prefix: p,
                    what,
                    reference: x,
                    candidate: y,
                };
                if privilege == Privilege::Kernel && known_kvm_emulator_difference(&d) {
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

fn context(e: crate::Error, side: &str, n: u64, block: &Block) -> crate::Error {
    let msg = match &e {
        crate::Error::Hv(h) => h.to_string(),
        other => other.to_string(),
    };
    crate::Error::Memory(format!(
        "{side} failed on block {n}: {msg}\n{}",
        block.listing()
    ))
}

/// KVM (reference) against emu (candidate) at CPL 3; `None` after printing `SKIP: no /dev/kvm`
/// when KVM cannot be used.
pub fn differential(seed: u64, count: u64) -> Option<Result<Report>> {
    differential_at(Privilege::User, seed, count)
}

/// [`differential`] at a chosen privilege.
pub fn differential_at(privilege: Privilege, seed: u64, count: u64) -> Option<Result<Report>> {
    let kvm = crate::kvm()?;
    Some(run(&kvm, &crate::emu(), privilege, seed, count, 20))
}
