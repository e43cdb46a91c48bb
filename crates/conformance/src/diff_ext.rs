//! Differential testing of the scalar and crypto extensions of x86-64-v3 (emu's `ext.rs`):
//! random blocks of BMI1, BMI2, LZCNT, TZCNT, MOVBE, ADCX/ADOX, AES-NI, PCLMULQDQ and SHA-NI
//! instructions (register and memory forms, 16/32/64-bit where the instruction has them), mixed
//! with a few flag-setting ALU instructions, run at CPL 3 on KVM (the host CPU) and on emu under
//! the v3 model ([`comparison_model`]; see [`model_for`] for KVM); GPRs, RFLAGS, the scratch page and all 16 XMM registers must be
//! bit-for-bit equal.
//!
//! Flags are compared *including* those the SDM leaves undefined for these instructions: emu
//! sets them the way this Intel host does, and this tester is what checks it.
//!
//! After a flag-writing instruction a block often stores RFLAGS' status bits to the scratch page
//! ([`FLAGS_AREA`]), so every such instruction's flags are compared, not only the last one's.
//!
//! A block starts by loading XMM0-15 from the top of the scratch page (random contents) and ends
//! by storing them back there, so the scratch comparison covers the vector registers. Memory
//! operands stay below that area and the flag snapshots ([`FLAGS_AREA`]); 128-bit ones are
//! 16-byte aligned (misaligned legacy-SSE operands raise #GP, which the plain runs of
//! `tests/integration/ext.rs` cover). General-register operands are at any alignment and sometimes cross
//! into the second scratch page or into the unmapped page after it (a #PF that must match), as
//! in [`crate::diff`].

use hv::{CpuModel, Hypervisor};
use iced_x86::{Code, Encoder, Instruction, MemoryOperand, Register};

use crate::diff::{Block, Divergence, Privilege, Report, Rng, Runner, SCRATCH, compare};
use crate::{CODE, Result, STACK, STATUS};

/// Offset in the scratch page where XMM0-15 are loaded from and stored to.
pub const XMM_AREA: u64 = 0xf00;
/// Offset in the scratch page where flag snapshots go (32 slots of 8 bytes).
pub const FLAGS_AREA: u64 = 0xe00;

/// The x86-64-v3 model as far as emu implements it: `portable_v3`, or, while emu lacks the
/// AVX/XSAVE families, `portable_v3` without them (everything this tester generates is in it).
pub fn ext_model() -> CpuModel {
    use hv::cpu_model::Feature::*;
    let m = CpuModel::portable_v3();
    if hv::Hypervisor::check_cpu_model(&crate::emu(), &m).is_ok() {
        return m;
    }
    let mut m = m;
    for f in [Avx, Avx2, Fma, F16c, Xsave, Xsaveopt, Xsavec, Xgetbv1] {
        clear_feature(&mut m, f);
    }
    m
}

/// [`ext_model`] as both backends of a comparison can present it: without FSGSBASE, which KVM
/// on this (PVM) host cannot provide (`KVM_GET_SUPPORTED_CPUID` lacks it) and which user code
/// on the host CPU could use whatever the model says. Nothing the tester generates needs it.
pub fn comparison_model() -> CpuModel {
    let mut m = ext_model();
    clear_feature(&mut m, hv::cpu_model::Feature::Fsgsbase);
    m
}

/// The model a backend runs the comparison under: [`comparison_model`] where the backend accepts
/// it, else the portable (v2) model. KVM on this PVM host refuses the leaf-7 bits (BMI1, BMI2,
/// ADX, SHA, RDSEED, CLFLUSHOPT, CLWB: `KVM_GET_SUPPORTED_CPUID` hides them and hv-kvm's
/// native-ISA allowance covers leaves 1 and 0x80000001 only), but CPL-3 code runs on the host
/// CPU, which executes them whatever CPUID shows: the hardware stays the oracle.
pub fn model_for(hv: &dyn Hypervisor) -> CpuModel {
    let m = comparison_model();
    if hv.check_cpu_model(&m).is_ok() {
        m
    } else {
        CpuModel::portable()
    }
}

fn clear_feature(m: &mut CpuModel, f: hv::cpu_model::Feature) {
    let b = f.bit();
    for e in m
        .cpuid
        .iter_mut()
        .filter(|e| e.function == b.function && (!e.indexed || e.index == b.index))
    {
        let r = match b.reg {
            0 => &mut e.eax,
            1 => &mut e.ebx,
            2 => &mut e.ecx,
            _ => &mut e.edx,
        };
        *r &= !(1 << b.bit);
    }
}

/// GPRs a block may write: all but RSP and R15 (the scratch base).
const WRITABLE: [usize; 14] = [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14];

fn gpr(size: usize, index: usize) -> Register {
    let base = match size {
        2 => Register::AX,
        4 => Register::EAX,
        _ => Register::RAX,
    };
    // iced numbers each size's 16 registers consecutively in encoding order.
    iced_x86::Register::values()
        .nth(base as usize + (index & 15))
        .unwrap_or(base)
}

fn xmm(index: usize) -> Register {
    iced_x86::Register::values()
        .nth(Register::XMM0 as usize + (index & 15))
        .unwrap_or(Register::XMM0)
}

fn pick<T: Copy>(rng: &mut Rng, items: &[T]) -> T {
    items[rng.below(items.len() as u64) as usize]
}

/// A value with interesting bit patterns more often than uniform.
fn value(rng: &mut Rng) -> u64 {
    match rng.below(9) {
        0 => 0,
        1 => u64::MAX,
        2 => 1u64 << rng.below(64),
        3 => (1u64 << rng.below(64)).wrapping_sub(1),
        4 => rng.below(300),
        5 => 0x8000_0000_0000_0000 | rng.below(16),
        // BEXTR/BZHI controls: start and length around the operand sizes.
        6 => rng.below(72) | rng.below(72) << 8 | (rng.next_u64() & !0xffff),
        _ => rng.next_u64(),
    }
}

/// A memory operand on the scratch page for `size` bytes (16-byte aligned for 16). Smaller
/// ones: any alignment below [`FLAGS_AREA`], one time in 16 across the end of the first page
/// (into the second), one time in 64 across the end of the second into the unmapped page.
fn mem(rng: &mut Rng, size: u64) -> MemoryOperand {
    let disp = if size == 16 {
        rng.below(FLAGS_AREA / 16) * 16
    } else {
        let across = |rng: &mut Rng, end: u64| end - 1 - rng.below(size - 1);
        match rng.below(64) {
            0 => across(rng, 8192),
            1..=4 => across(rng, 4096),
            _ => rng.below(FLAGS_AREA - size + 1),
        }
    };
    MemoryOperand::with_base_displ(Register::R15, disp as i64)
}

use Code::*;

/// (code for 32-bit, code for 64-bit) of `op r, r, r/m`-shaped VEX GPR instructions, with the
/// operand shape.
#[derive(Clone, Copy)]
enum Shape {
    /// r, vvvv, r/m (ANDN, MULX, PDEP, PEXT)
    RVm,
    /// r, r/m, vvvv (BEXTR, BZHI, SARX, SHLX, SHRX)
    RmV,
    /// vvvv, r/m (BLSI, BLSMSK, BLSR)
    Vm,
    /// r, r/m, imm8 (RORX)
    RmI,
}

const VEX_GPR: &[(Code, Code, Shape)] = &[
    (VEX_Andn_r32_r32_rm32, VEX_Andn_r64_r64_rm64, Shape::RVm),
    (VEX_Mulx_r32_r32_rm32, VEX_Mulx_r64_r64_rm64, Shape::RVm),
    (VEX_Pdep_r32_r32_rm32, VEX_Pdep_r64_r64_rm64, Shape::RVm),
    (VEX_Pext_r32_r32_rm32, VEX_Pext_r64_r64_rm64, Shape::RVm),
    (VEX_Bextr_r32_rm32_r32, VEX_Bextr_r64_rm64_r64, Shape::RmV),
    (VEX_Bzhi_r32_rm32_r32, VEX_Bzhi_r64_rm64_r64, Shape::RmV),
    (VEX_Sarx_r32_rm32_r32, VEX_Sarx_r64_rm64_r64, Shape::RmV),
    (VEX_Shlx_r32_rm32_r32, VEX_Shlx_r64_rm64_r64, Shape::RmV),
    (VEX_Shrx_r32_rm32_r32, VEX_Shrx_r64_rm64_r64, Shape::RmV),
    (VEX_Blsi_r32_rm32, VEX_Blsi_r64_rm64, Shape::Vm),
    (VEX_Blsmsk_r32_rm32, VEX_Blsmsk_r64_rm64, Shape::Vm),
    (VEX_Blsr_r32_rm32, VEX_Blsr_r64_rm64, Shape::Vm),
    (VEX_Rorx_r32_rm32_imm8, VEX_Rorx_r64_rm64_imm8, Shape::RmI),
];

/// `op r, r/m` in 16/32/64-bit forms.
const COUNT: &[[Code; 3]] = &[
    [Tzcnt_r16_rm16, Tzcnt_r32_rm32, Tzcnt_r64_rm64],
    [Lzcnt_r16_rm16, Lzcnt_r32_rm32, Lzcnt_r64_rm64],
];

const ADX: &[[Code; 2]] = &[
    [Adcx_r32_rm32, Adcx_r64_rm64],
    [Adox_r32_rm32, Adox_r64_rm64],
];

/// XMM, XMM/m128 crypto instructions; the bool says whether an imm8 follows.
const CRYPTO: &[(Code, bool)] = &[
    (Aesenc_xmm_xmmm128, false),
    (Aesenclast_xmm_xmmm128, false),
    (Aesdec_xmm_xmmm128, false),
    (Aesdeclast_xmm_xmmm128, false),
    (Aesimc_xmm_xmmm128, false),
    (Aeskeygenassist_xmm_xmmm128_imm8, true),
    (Pclmulqdq_xmm_xmmm128_imm8, true),
    (Sha1rnds4_xmm_xmmm128_imm8, true),
    (Sha1nexte_xmm_xmmm128, false),
    (Sha1msg1_xmm_xmmm128, false),
    (Sha1msg2_xmm_xmmm128, false),
    (Sha256rnds2_xmm_xmmm128, false),
    (Sha256msg1_xmm_xmmm128, false),
    (Sha256msg2_xmm_xmmm128, false),
];

/// Plain ALU instructions that set every status flag (so flag chains start from known values).
const ALU: &[Code] = &[
    Add_rm64_r64,
    Sub_rm64_r64,
    Cmp_rm64_r64,
    Adc_rm64_r64,
    Sbb_rm32_r32,
    Xor_rm32_r32,
];

fn item(rng: &mut Rng) -> std::result::Result<Instruction, iced_x86::IcedError> {
    let w64 = rng.below(2) == 1;
    let size = if w64 { 8 } else { 4 };
    let d = pick(rng, &WRITABLE);
    let s1 = pick(rng, &WRITABLE);
    let s2 = pick(rng, &WRITABLE);
    let in_mem = rng.below(4) == 0;
    Ok(match rng.below(16) {
        0..=5 => {
            let (c32, c64, shape) = pick(rng, VEX_GPR);
            let code = if w64 { c64 } else { c32 };
            let rm = |rng: &mut Rng, r: usize| -> MemOrReg {
                if in_mem {
                    MemOrReg::M(mem(rng, size as u64))
                } else {
                    MemOrReg::R(gpr(size, r))
                }
            };
            match shape {
                Shape::RVm => match rm(rng, s2) {
                    MemOrReg::M(m) => Instruction::with3(code, gpr(size, d), gpr(size, s1), m)?,
                    MemOrReg::R(r) => Instruction::with3(code, gpr(size, d), gpr(size, s1), r)?,
                },
                Shape::RmV => match rm(rng, s1) {
                    MemOrReg::M(m) => Instruction::with3(code, gpr(size, d), m, gpr(size, s2))?,
                    MemOrReg::R(r) => Instruction::with3(code, gpr(size, d), r, gpr(size, s2))?,
                },
                Shape::Vm => match rm(rng, s1) {
                    MemOrReg::M(m) => Instruction::with2(code, gpr(size, d), m)?,
                    MemOrReg::R(r) => Instruction::with2(code, gpr(size, d), r)?,
                },
                Shape::RmI => {
                    let imm = rng.below(256) as u32;
                    match rm(rng, s1) {
                        MemOrReg::M(m) => Instruction::with3(code, gpr(size, d), m, imm)?,
                        MemOrReg::R(r) => Instruction::with3(code, gpr(size, d), r, imm)?,
                    }
                }
            }
        }
        6 | 7 => {
            let slot = rng.below(3) as usize;
            let sz = [2, 4, 8][slot];
            let code = pick(rng, COUNT)[slot];
            if in_mem {
                Instruction::with2(code, gpr(sz, d), mem(rng, sz as u64))?
            } else {
                Instruction::with2(code, gpr(sz, d), gpr(sz, s1))?
            }
        }
        8 => {
            let slot = rng.below(3) as usize;
            let sz = [2, 4, 8][slot];
            let m = mem(rng, sz as u64);
            if rng.below(2) == 0 {
                let code = [Movbe_r16_m16, Movbe_r32_m32, Movbe_r64_m64][slot];
                Instruction::with2(code, gpr(sz, d), m)?
            } else {
                let code = [Movbe_m16_r16, Movbe_m32_r32, Movbe_m64_r64][slot];
                Instruction::with2(code, m, gpr(sz, s1))?
            }
        }
        9 | 10 => {
            let code = pick(rng, ADX)[usize::from(w64)];
            if in_mem {
                Instruction::with2(code, gpr(size, d), mem(rng, size as u64))?
            } else {
                Instruction::with2(code, gpr(size, d), gpr(size, s1))?
            }
        }
        11..=14 => {
            let (code, imm) = pick(rng, CRYPTO);
            let dst = xmm(rng.below(16) as usize);
            let imm8 = rng.below(256) as u32;
            match (in_mem, imm) {
                (true, true) => Instruction::with3(code, dst, mem(rng, 16), imm8)?,
                (true, false) => Instruction::with2(code, dst, mem(rng, 16))?,
                (false, true) => Instruction::with3(code, dst, xmm(rng.below(16) as usize), imm8)?,
                (false, false) => Instruction::with2(code, dst, xmm(rng.below(16) as usize))?,
            }
        }
        _ => {
            let code = pick(rng, ALU);
            let sz = if code == Sbb_rm32_r32 || code == Xor_rm32_r32 {
                4
            } else {
                8
            };
            Instruction::with2(code, gpr(sz, d), gpr(sz, s1))?
        }
    })
}

/// Stores the status flags (and DF) to the scratch page at `off` without changing any register
/// or flag: `pushfq; pushfq; and qword [rsp], mask; pop qword [r15+off]; popfq`. The mask drops
/// the bits the backends legitimately differ in at CPL 3 (IF, IOPL).
fn snapshot_flags(
    body: &mut Vec<Instruction>,
    off: u64,
) -> std::result::Result<(), iced_x86::IcedError> {
    let top = MemoryOperand::with_base(Register::RSP);
    body.push(Instruction::with(Pushfq));
    body.push(Instruction::with(Pushfq));
    body.push(Instruction::with2(
        And_rm64_imm32,
        top,
        (STATUS | crate::DF) as i32,
    )?);
    body.push(Instruction::with1(
        Pop_rm64,
        MemoryOperand::with_base_displ(Register::R15, off as i64),
    )?);
    body.push(Instruction::with(Popfq));
    Ok(())
}

enum MemOrReg {
    M(MemoryOperand),
    R(Register),
}

/// A generated block: the instructions of its body and its initial state.
#[derive(Clone, Debug)]
pub struct ExtBlock {
    pub body: Vec<Instruction>,
    /// Generated instructions in `body` (the rest are flag snapshots).
    pub items: u64,
    pub regs: [u64; 16],
    pub rflags: u64,
    pub scratch: Vec<u8>,
}

/// Generates block `n` of the run seeded with `seed`: up to `max_len` instructions.
pub fn generate(seed: u64, n: u64, max_len: usize) -> Result<ExtBlock> {
    let mut rng = Rng::new(seed ^ n.wrapping_mul(0x9e6c_63d0_676a_9a99));
    let len = 1 + rng.below(max_len.max(1) as u64);
    let mut body = Vec::new();
    let mut snapshots = 0u64;
    for _ in 0..len {
        let i = item(&mut rng)?;
        body.push(i);
        if i.rflags_modified() != 0 && snapshots < 32 && rng.below(2) == 0 {
            snapshot_flags(&mut body, FLAGS_AREA + 8 * snapshots)?;
            snapshots += 1;
        }
    }
    let mut regs = [0u64; 16];
    for r in regs.iter_mut() {
        *r = value(&mut rng);
    }
    regs[4] = STACK;
    regs[15] = SCRATCH;
    let rflags = (rng.next_u64() & STATUS) | 0x3002;
    let mut scratch = vec![0u8; crate::diff::SCRATCH_LEN];
    for c in scratch.chunks_mut(8) {
        c.copy_from_slice(&value(&mut rng).to_le_bytes());
    }
    Ok(ExtBlock {
        body,
        items: len,
        regs,
        rflags,
        scratch,
    })
}

impl ExtBlock {
    /// The first `k` body instructions as a runnable block: XMM loads, the body, XMM stores.
    pub fn block(&self, k: usize) -> Result<Block> {
        let xmm_slot = |r: usize| {
            MemoryOperand::with_base_displ(Register::R15, (XMM_AREA + 16 * r as u64) as i64)
        };
        let mut instructions = Vec::new();
        for r in 0..16 {
            instructions.push(Instruction::with2(Movdqu_xmm_xmmm128, xmm(r), xmm_slot(r))?);
        }
        instructions.extend_from_slice(&self.body[..k.min(self.body.len())]);
        for r in 0..16 {
            instructions.push(Instruction::with2(Movdqu_xmmm128_xmm, xmm_slot(r), xmm(r))?);
        }
        let mut enc = Encoder::new(64);
        let mut offsets = vec![0];
        let mut ip = CODE;
        for i in &instructions {
            let len = enc.encode(i, ip)?;
            ip += len as u64;
            offsets.push(offsets.last().copied().unwrap_or(0) + len);
        }
        Ok(Block {
            instructions,
            offsets,
            bytes: enc.take_buffer(),
            // Compared bit for bit, undefined flags included.
            undefined: 0,
            undefined_at: Vec::new(),
            regs: self.regs,
            rflags: self.rflags,
            scratch: self.scratch.clone(),
        })
    }
}

/// Runs `count` blocks from `seed` on both backends (CPL 3, [`ext_model`]) and compares them;
/// at most `max_report` divergences are collected, each cut to its first diverging instruction.
pub fn run(
    reference: &dyn Hypervisor,
    candidate: &dyn Hypervisor,
    seed: u64,
    count: u64,
    max_report: usize,
) -> Result<Report> {
    let mut r = Runner::with_model(reference, Privilege::User, model_for(reference))?;
    let mut c = Runner::with_model(candidate, Privilege::User, model_for(candidate))?;
    let mut report = Report::default();
    for n in 0..count {
        let ext = generate(seed, n, 12)?;
        let block = ext.block(ext.body.len())?;
        report.blocks += 1;
        report.instructions += ext.items;
        let a = r.run(&block)?;
        let b = c.run(&block)?;
        report.count_end(&a, CODE + block.bytes.len() as u64);
        if compare(&block, &a, &b).is_none() {
            continue;
        }
        for k in 1..=ext.body.len() {
            let p = ext.block(k)?;
            let (a, b) = (r.run(&p)?, c.run(&p)?);
            if let Some((what, x, y)) = compare(&p, &a, &b) {
                // The prefix ends with the XMM stores: name the body instruction.
                let culprit = p.describe(16 + k - 1);
                report.divergences.push(Divergence {
                    seed,
                    block: n,
                    prefix: p,
                    what: format!("{what}, after {culprit}"),
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

/// KVM (reference) against emu (candidate); `None` after printing `SKIP: no /dev/kvm` when KVM
/// cannot be used.
pub fn differential(seed: u64, count: u64) -> Option<Result<Report>> {
    let kvm = crate::kvm()?;
    Some(run(&kvm, &crate::emu(), seed, count, 20))
}
