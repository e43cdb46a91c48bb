//! Differential testing of AVX, AVX2, FMA and F16C: random blocks of VEX instructions run at
//! CPL 3 on KVM (the host CPU executes them: the hardware is the oracle) and on emu with the
//! `portable-v3` model, from the same initial YMM registers, MXCSR, GPRs and scratch page.
//!
//! Every VEX instruction form iced-x86 knows whose CPUID features are among AVX, AVX2, FMA,
//! F16C, AES and PCLMULQDQ and whose operands are vector/general registers, `[r15 + disp]` memory and imm8 is a
//! candidate, except: VLDMXCSR/VSTMXCSR (the harness uses them), VMASKMOVDQU (implicit RDI
//! address), the gathers (VSIB addresses; covered by hv-emu's tests), and VRCPPS/VRSQRTPS and
//! their scalar forms (approximations whose exact bits are implementation-specific: emu's differ
//! from Intel's tables).
//!
//! Each block is wrapped: a prologue loads MXCSR and YMM0-15 from the scratch page, an epilogue
//! stores them back to it, so comparing the scratch page (as [`crate::diff::compare`] does)
//! compares every YMM register and MXCSR too. Vector values are drawn from interesting floats
//! (zeros, infinities, quiet and signaling NaNs, denormals, extremes, small integers) as well as
//! random bits; MXCSR gets a random rounding mode, sometimes DAZ/FTZ, sometimes an unmasked
//! exception.
//!
//! Memory operands are mostly aligned to their size, often not (VEX forms take any alignment;
//! the forms that demand it, VMOVAPS/VMOVAPD/VMOVDQA/VMOVNT*, always get it), sometimes across
//! the end of the scratch page into a second one, and sometimes across the end of that one into
//! an unmapped page: the #PF (error code, CR2) must match and nothing may be written (masked
//! loads and stores whose mask leaves out the unmapped part must not fault at all).

use hv::{CpuModel, CpuState, Hypervisor};
use iced_x86::{
    Code, CpuidFeature, EncodingKind, Instruction, Mnemonic, OpCodeOperandKind as K, OpKind,
    Register,
};

use crate::diff::{Block, Divergence, Report, Result1, Rng, compare};
use crate::{CODE, DATA, Guest, Result, STACK};

/// The scratch page (addressed through R15).
pub const SCRATCH: u64 = DATA;
/// Where the prologue loads YMM0-15 from (32 bytes each), then MXCSR.
const YMM_IN: u64 = 0x800;
const MXCSR_IN: u64 = 0xa00;
/// Where the epilogue stores YMM0-15, then MXCSR.
const YMM_OUT: u64 = 0xc00;
const MXCSR_OUT: u64 = 0xe00;
/// Memory operands stay below this offset (or cross the end of a page, from 0xe04 on, which
/// nothing else uses).
const DATA_END: u64 = 0x800;

/// Whether `m` demands an operand aligned to its size.
fn needs_alignment(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        Vmovaps | Vmovapd | Vmovdqa | Vmovntps | Vmovntpd | Vmovntdq | Vmovntdqa
    )
}

/// A displacement for `code`'s memory operand of `size` bytes.
fn mem_disp(rng: &mut Rng, code: Code, size: u64) -> u64 {
    let size = size.max(1);
    if needs_alignment(code.mnemonic()) {
        return size * rng.below(DATA_END / size);
    }
    let across = |rng: &mut Rng, end: u64| end - 1 - rng.below(size.max(2) - 1);
    match rng.below(32) {
        0 if size > 1 => across(rng, 8192),
        1..=3 if size > 1 => across(rng, 4096),
        4..=11 => rng.below(DATA_END - size + 1),
        _ => size * rng.below(DATA_END / size),
    }
}

const GPRS: [Register; 14] = [
    Register::RAX,
    Register::RCX,
    Register::RDX,
    Register::RBX,
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
];

fn excluded(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        Vldmxcsr
            | Vstmxcsr
            | Vmaskmovdqu
            | Vrcpps
            | Vrcpss
            | Vrsqrtps
            | Vrsqrtss
            | Vgatherdps
            | Vgatherdpd
            | Vgatherqps
            | Vgatherqpd
            | Vpgatherdd
            | Vpgatherdq
            | Vpgatherqd
            | Vpgatherqq
    )
}

fn operand_ok(k: K) -> bool {
    matches!(
        k,
        K::xmm_reg
            | K::xmm_rm
            | K::xmm_vvvv
            | K::xmm_is4
            | K::xmm_or_mem
            | K::ymm_reg
            | K::ymm_rm
            | K::ymm_vvvv
            | K::ymm_is4
            | K::ymm_or_mem
            | K::r32_reg
            | K::r32_rm
            | K::r32_or_mem
            | K::r64_reg
            | K::r64_rm
            | K::r64_or_mem
            | K::mem
            | K::imm8
    )
}

/// Every instruction form the generator draws from.
pub fn candidates() -> Vec<Code> {
    Code::values()
        .filter(|c| c.encoding() == EncodingKind::VEX)
        .filter(|c| {
            let op = c.op_code();
            op.is_instruction()
                && op.mode64()
                && !excluded(c.mnemonic())
                && (0..op.op_count()).all(|n| operand_ok(op.op_kind(n)))
                && !c.cpuid_features().is_empty()
                && c.cpuid_features().iter().all(|f| {
                    matches!(
                        f,
                        CpuidFeature::AVX
                            | CpuidFeature::AVX2
                            | CpuidFeature::FMA
                            | CpuidFeature::F16C
                            | CpuidFeature::AES
                            | CpuidFeature::PCLMULQDQ
                    )
                })
        })
        .collect()
}

fn xmm(n: u64) -> Register {
    Register::XMM0 + (n as u32 & 15)
}
fn ymm(n: u64) -> Register {
    Register::YMM0 + (n as u32 & 15)
}

fn gpr32(r: Register) -> Register {
    Register::EAX + (r as u32 - Register::RAX as u32)
}

/// Instruction `code` with random operands.
fn instance(rng: &mut Rng, code: Code) -> Instruction {
    let op = code.op_code();
    let mut i = Instruction::default();
    i.set_code(code);
    let mut used_mem = false;
    for n in 0..op.op_count() {
        let k = op.op_kind(n);
        let want_mem = match k {
            K::mem => true,
            K::xmm_or_mem | K::ymm_or_mem | K::r32_or_mem | K::r64_or_mem => {
                !used_mem && rng.below(3) == 0
            }
            _ => false,
        };
        if want_mem {
            used_mem = true;
            i.set_op_kind(n, OpKind::Memory);
            i.set_memory_base(Register::R15);
            i.set_memory_index(Register::None);
            i.set_memory_index_scale(1);
            let disp = mem_disp(rng, code, code.op_code().memory_size().size() as u64);
            i.set_memory_displacement64(disp);
            i.set_memory_displ_size(if disp < 0x80 { 1 } else { 8 });
            continue;
        }
        match k {
            K::imm8 => {
                i.set_op_kind(n, OpKind::Immediate8);
                i.set_immediate8(rng.next_u64() as u8);
            }
            K::xmm_reg | K::xmm_rm | K::xmm_vvvv | K::xmm_is4 | K::xmm_or_mem => {
                i.set_op_kind(n, OpKind::Register);
                i.set_op_register(n, xmm(rng.below(16)));
            }
            K::ymm_reg | K::ymm_rm | K::ymm_vvvv | K::ymm_is4 | K::ymm_or_mem => {
                i.set_op_kind(n, OpKind::Register);
                i.set_op_register(n, ymm(rng.below(16)));
            }
            K::r32_reg | K::r32_rm | K::r32_or_mem => {
                i.set_op_kind(n, OpKind::Register);
                let r = GPRS[rng.below(GPRS.len() as u64) as usize];
                i.set_op_register(n, gpr32(r));
            }
            _ => {
                i.set_op_kind(n, OpKind::Register);
                i.set_op_register(n, GPRS[rng.below(GPRS.len() as u64) as usize]);
            }
        }
    }
    i
}

fn f32_value(rng: &mut Rng) -> u32 {
    const SPECIAL: [u32; 16] = [
        0,
        0x8000_0000,
        0x7f80_0000,
        0xff80_0000,
        0x7fc0_0000,
        0xffc0_0001,
        0x7fa0_0000,
        0xff80_0001,
        1,
        0x807f_ffff,
        0x0080_0000,
        0x7f7f_ffff,
        0x3f80_0000,
        0xbf00_0000,
        0x4b80_0001,
        0x0000_1234,
    ];
    match rng.below(4) {
        0 => SPECIAL[rng.below(16) as usize],
        1 => (((rng.next_u64() as i64 % 2000) - 1000) as f32 / 8.0).to_bits(),
        2 => {
            // A normal value with random significand near 1.0 (rounding-sensitive sums).
            0x3f00_0000 | (rng.next_u64() as u32 & 0x00ff_ffff) | ((rng.below(2) as u32) << 31)
        }
        _ => rng.next_u64() as u32,
    }
}

fn f64_value(rng: &mut Rng) -> u64 {
    const SPECIAL: [u64; 12] = [
        0,
        1 << 63,
        0x7ff0_0000_0000_0000,
        0xfff0_0000_0000_0000,
        0x7ff8_0000_0000_0000,
        0x7ff4_0000_0000_0000,
        1,
        0x0010_0000_0000_0000,
        0x7fef_ffff_ffff_ffff,
        0x3ff0_0000_0000_0000,
        0xc1e0_0000_0000_0000,
        0x41e0_0000_0000_0001,
    ];
    match rng.below(4) {
        0 => SPECIAL[rng.below(12) as usize],
        1 => (((rng.next_u64() as i64 % 2_000_000) - 1_000_000) as f64 / 16.0).to_bits(),
        2 => {
            0x3fe0_0000_0000_0000 | (rng.next_u64() & 0x001f_ffff_ffff_ffff) | (rng.below(2) << 63)
        }
        _ => rng.next_u64(),
    }
}

/// Eight bytes of vector data.
fn vec_qword(rng: &mut Rng) -> u64 {
    match rng.below(4) {
        0 => u64::from(f32_value(rng)) | (u64::from(f32_value(rng)) << 32),
        1 => f64_value(rng),
        2 => {
            // Small signed integers in every element width.
            let mut v = 0u64;
            for k in 0..4 {
                v |= ((rng.below(9) as i64 - 4) as u16 as u64) << (16 * k);
            }
            v
        }
        _ => rng.next_u64(),
    }
}

/// Block `n` of the run seeded with `seed`: up to `max_len` VEX instructions.
pub fn generate(codes: &[Code], seed: u64, n: u64, max_len: usize) -> Result<Block> {
    let mut rng = Rng::new(seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xa5a5);
    let items = 1 + rng.below(max_len.max(1) as u64);
    let mut instructions = Vec::new();
    for _ in 0..items {
        let code = codes[rng.below(codes.len() as u64) as usize];
        instructions.push(instance(&mut rng, code));
    }
    let mut regs = [0u64; 16];
    for r in regs.iter_mut() {
        *r = match rng.below(4) {
            0 => rng.below(64),
            1 => f64_value(&mut rng),
            _ => rng.next_u64(),
        };
    }
    regs[4] = STACK;
    regs[15] = SCRATCH;
    let rflags = (rng.next_u64() & crate::STATUS) | 0x3002;
    let mut scratch = vec![0u8; crate::diff::SCRATCH_LEN];
    for c in scratch.chunks_mut(8) {
        c.copy_from_slice(&vec_qword(&mut rng).to_le_bytes());
    }
    let mut mxcsr: u32 = 0x1f80 | ((rng.below(4) as u32) << 13);
    if rng.below(8) == 0 {
        mxcsr |= 1 << 6; // DAZ
    }
    if rng.below(8) == 0 {
        mxcsr |= 1 << 15; // FTZ
    }
    if rng.below(4) == 0 {
        mxcsr |= rng.below(64) as u32; // sticky flags already set
    }
    if rng.below(16) == 0 {
        mxcsr &= !(1 << (7 + rng.below(6))); // one exception unmasked
    }
    let m = MXCSR_IN as usize;
    scratch[m..m + 4].copy_from_slice(&mxcsr.to_le_bytes());
    let block = Block {
        instructions,
        offsets: Vec::new(),
        bytes: Vec::new(),
        undefined: 0,
        undefined_at: Vec::new(),
        regs,
        rflags,
        scratch,
    };
    // `prefix` encodes the instructions (and computes their boundaries).
    block.prefix(block.instructions.len())
}

fn mem(disp: u64) -> iced_x86::code_asm::AsmMemoryOperand {
    iced_x86::code_asm::ptr(iced_x86::code_asm::r15 + disp as i32)
}

/// The code to load: prologue, the block, epilogue, `ud2`.
fn program(block: &Block) -> Result<(Vec<u8>, u64)> {
    use iced_x86::code_asm::*;
    let regs = [
        ymm0, ymm1, ymm2, ymm3, ymm4, ymm5, ymm6, ymm7, ymm8, ymm9, ymm10, ymm11, ymm12, ymm13,
        ymm14, ymm15,
    ];
    let mut pro = CodeAssembler::new(64)?;
    pro.vldmxcsr(dword_ptr(r15 + MXCSR_IN as i32))?;
    for (k, r) in regs.iter().enumerate() {
        pro.vmovdqu(*r, mem(YMM_IN + 32 * k as u64))?;
    }
    let pro = pro.assemble(CODE)?;
    let mut epi = CodeAssembler::new(64)?;
    for (k, r) in regs.iter().enumerate() {
        epi.vmovdqu(mem(YMM_OUT + 32 * k as u64), *r)?;
    }
    epi.vstmxcsr(dword_ptr(r15 + MXCSR_OUT as i32))?;
    epi.ud2()?;
    let epi = epi.assemble(0)?;
    let mut p = pro;
    p.extend_from_slice(&block.bytes);
    p.extend_from_slice(&epi);
    let end = CODE + p.len() as u64 - 2;
    Ok((p, end))
}

/// A backend VM with the `portable-v3` model, reused for every block.
pub struct Runner {
    guest: Guest,
    base: CpuState,
}

impl Runner {
    /// On emu: the `portable-v3` model with CR4.OSXSAVE and XCR0 = x87|SSE|AVX. On KVM: the
    /// portable model as it is (this host's KVM cannot present XSAVE); its CPL-3 code runs on
    /// the host CPU under the host's XCR0, so VEX instructions execute natively all the same.
    pub fn new(hv: &dyn Hypervisor) -> Result<Runner> {
        let emu = hv.kind() == hv::BackendKind::Emu;
        let model = if emu {
            CpuModel::portable_v3()
        } else {
            CpuModel::portable()
        };
        let mut guest = Guest::with_model(hv, 2, model)?;
        guest.timeout = std::time::Duration::from_secs(30);
        guest.map_low_4k(&[crate::GUARD])?;
        let mut base = guest.vcpu.state()?;
        crate::user_mode(&mut base);
        if emu {
            base.sregs.cr4 |= 1 << 18; // OSXSAVE
            base.xcr0 = 7;
            base.xsave_ext = vec![0; 64 + 256];
        }
        Ok(Runner { guest, base })
    }

    pub fn run(&mut self, block: &Block) -> Result<Result1> {
        let (code, end) = program(block)?;
        self.guest.write(CODE, &code)?;
        crate::diff::write_scratch(&self.guest, &block.scratch)?;
        let mut st = self.base.clone();
        for (k, v) in block.regs.iter().enumerate() {
            st.regs.set_gpr(k, *v);
        }
        st.regs.rip = CODE;
        st.regs.rflags = block.rflags;
        self.guest.vcpu.set_state(&st)?;
        let o = self.guest.run()?;
        let mut regs = o.state.regs;
        let mut exception = o.exception.map(|e| (e.vector, e.error_code));
        if let Some(e) = o.exception {
            // The state the stub saw (RAX, the frame), not the stub's own.
            regs.rax = e.rax;
            regs.rsp = e.rsp;
            regs.rip = e.rip;
            regs.rflags = e.rflags;
            if e.vector == 6 && e.rip == end {
                exception = None;
            }
        }
        Ok(Result1 {
            stop: o.stop,
            regs,
            exception,
            cr2: o.exception.filter(|e| e.vector == 14).map_or(0, |e| e.cr2),
            scratch: self.guest.read(SCRATCH, crate::diff::SCRATCH_LEN)?,
        })
    }
}

/// Runs `count` blocks from `seed` on both backends (CPL 3) and compares them; at most
/// `max_report` divergences are collected, each cut to its first diverging instruction.
pub fn run(
    reference: &dyn Hypervisor,
    candidate: &dyn Hypervisor,
    seed: u64,
    count: u64,
    max_report: usize,
) -> Result<Report> {
    let codes = candidates();
    let mut r = Runner::new(reference)?;
    let mut c = Runner::new(candidate)?;
    let mut report = Report::default();
    for n in 0..count {
        let block = generate(&codes, seed, n, 8)?;
        report.blocks += 1;
        report.instructions += block.instructions.len() as u64;
        let a = r.run(&block)?;
        let b = c.run(&block)?;
        let end = CODE + program(&block)?.0.len() as u64 - 2;
        report.count_end(&a, end);
        if compare(&block, &a, &b).is_none() {
            continue;
        }
        for k in 1..=block.instructions.len() {
            let p = block.prefix(k)?;
            let (a, b) = (r.run(&p)?, c.run(&p)?);
            if let Some((what, x, y)) = compare(&p, &a, &b) {
                report.divergences.push(Divergence {
                    seed,
                    block: n,
                    what: describe(&what),
                    prefix: p,
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

/// Names the YMM register or MXCSR behind a scratch offset in a divergence.
fn describe(what: &str) -> String {
    let off = what
        .strip_prefix("scratch[0x")
        .and_then(|r| r.split(']').next())
        .and_then(|h| u64::from_str_radix(h, 16).ok());
    match off {
        Some(o) if (YMM_OUT..YMM_OUT + 512).contains(&o) => format!(
            "{what}: ymm{} bytes {}..{}",
            (o - YMM_OUT) / 32,
            (o - YMM_OUT) % 32,
            (o - YMM_OUT) % 32 + 8
        ),
        Some(o) if o == MXCSR_OUT => format!("{what}: MXCSR (low dword)"),
        _ => what.to_string(),
    }
}

/// KVM (reference) against emu (candidate); `None` after printing `SKIP: no /dev/kvm` when
/// KVM cannot be used.
pub fn differential(seed: u64, count: u64) -> Option<Result<Report>> {
    let kvm = crate::kvm()?;
    Some(run(&kvm, &crate::emu(), seed, count, 10))
}
