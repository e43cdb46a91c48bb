//! SSE/AVX (and AES-NI, PCLMULQDQ, SHA-NI, CRC32) guest instructions run as themselves.
//!
//! A submodule of `emit` (declared there with a `path`), so that it can use the emitter's
//! address computation, soft-TLB check and exit stubs.
//!
//! **Registers**: guest vector register *k* is loaded into host register *k* (identity, so
//! implicit operands such as `xmm0` of `sha256rnds2`/`blendvps`/`pcmpistrm` just work), from
//! `Cpu::xmm` (bits 127:0) and `Cpu::ymm_hi` (bits 255:128), whose addresses the run loop puts
//! in [`SimdCtx`] before every entry ([`enter`]). Every vector register the instruction names
//! is loaded (all 256 bits for a `ymm` operand), the instruction runs re-encoded (memory
//! operand `[rsi]` = host address from the soft TLB, general registers on host scratch
//! registers, guest `rax`/`rcx`/`rdx` always on host `rax`/`rcx`/`rdx` for the implicit
//! operands of `pcmpestri` and friends), and every written vector register is stored back:
//! bits 127:0 for legacy SSE (which leaves bits 255:128 alone, as the guest sees it); for a VEX
//! instruction bits 255:128 too (the `ymm` half, or zero for an `xmm` destination: VEX.128
//! zeroes it). Glue loads and stores are VEX-encoded and a `vzeroupper` follows any use of a
//! 256-bit register, so the host's upper halves are clean whenever other code (legacy SSE
//! guest instructions, the Rust code after the block) runs: no SSE/AVX transition penalty.
//! Vector registers are caller-saved in the SysV ABI the block is called with, so clobbering
//! them is allowed.
//!
//! **What may run** is checked at run time, in a flag-neutral way, against the word
//! [`SimdCtx::deny`] that [`enter`] computes from the VM's CPU model (a model without AVX2 must
//! raise #UD on `vpbroadcastd`), CR0.EM/TS, CR4.OSFXSR/OSXSAVE, XCR0 and MXCSR: each
//! instruction needs some of its bits clear (`pext` of the deny word with the instruction's
//! needs, `jrcxz`), otherwise the block leaves before the instruction and the interpreter
//! runs it (raising #UD, #NM, ...). What the host lacks is never translated ([`classify`]).
//!
//! **MXCSR**: floating-point forms run only while the guest MXCSR masks every exception (the
//! host must never take #XM/SIGFPE; an unmasked exception is the interpreter's to raise), with
//! the guest MXCSR loaded around the instruction (`ldmxcsr`; rounding, DAZ, FTZ) and stored
//! back after it (the sticky flags), then the host's restored (its control bits are
//! callee-saved in the ABI). Integer forms do not touch MXCSR.
//!
//! **Faults**: legacy SSE 16-byte memory operands (except the unaligned moves and the SSE4.2
//! string compares) and the aligned VEX moves check alignment and leave to the interpreter
//! (#GP) when misaligned; page-crossing and unmapped operands leave through the soft TLB as for
//! integer instructions.

use std::cell::RefCell;
use std::mem::offset_of;
use std::sync::OnceLock;

use hv::cpu_model::{Feature, FeatureSet};
use iced_x86::{
    CpuidFeature as C, EncodingKind, Instruction, InstructionInfoFactory, Mnemonic as M, OpAccess,
    OpKind, Register,
};

use super::super::Ctx;
use super::{E, Emitter, Kind, gpr_of, greg, mem_ok};
use crate::cpu::Cpu;
use crate::jit::asm::{R8, R15, RBP, RCX, RDI, RDX};

/// What generated code reads to run vector instructions: the last field of [`Ctx`].
#[repr(C)]
#[derive(Default)]
pub struct SimdCtx {
    /// Bit set: the requirement of that bit ([`FEATURES`], [`SSE_STATE`], [`VEX_STATE`],
    /// [`FP`]) is not met now.
    deny: u64,
    /// Host addresses of `Cpu::xmm`, `Cpu::ymm_hi` and `Cpu::mxcsr` of the vCPU.
    xmm: u64,
    hi: u64,
    mxcsr: u64,
    /// The host MXCSR, saved around floating-point instructions.
    host_mxcsr: u64,
}

const C_SIMD: i32 = offset_of!(Ctx, simd) as i32;
const C_DENY: i32 = C_SIMD + offset_of!(SimdCtx, deny) as i32;
const C_XMM: i32 = C_SIMD + offset_of!(SimdCtx, xmm) as i32;
const C_HI: i32 = C_SIMD + offset_of!(SimdCtx, hi) as i32;
const C_MXCSR: i32 = C_SIMD + offset_of!(SimdCtx, mxcsr) as i32;
const C_HOST_MXCSR: i32 = C_SIMD + offset_of!(SimdCtx, host_mxcsr) as i32;

/// Model features by deny-word bit.
const FEATURES: [Feature; 13] = [
    Feature::Sse,
    Feature::Sse2,
    Feature::Sse3,
    Feature::Ssse3,
    Feature::Sse41,
    Feature::Sse42,
    Feature::Aes,
    Feature::Pclmulqdq,
    Feature::Sha,
    Feature::Avx,
    Feature::Avx2,
    Feature::Fma,
    Feature::F16c,
];
/// Legacy SSE state usable: CR0.EM = 0, CR0.TS = 0, CR4.OSFXSR = 1.
const SSE_STATE: u64 = 1 << 13;
/// VEX state usable: CR0.TS = 0, CR4.OSXSAVE = 1, XCR0 enables SSE and AVX state.
const VEX_STATE: u64 = 1 << 14;
/// MXCSR masks every floating-point exception.
const FP: u64 = 1 << 15;

const CR0_EM: u64 = 1 << 2;
const CR4_OSFXSR: u64 = 1 << 9;
const MXCSR_MASKS: u32 = 0x1f80;

/// Sets the context up for a run of translated code on `cpu` (called before every entry).
pub(crate) fn enter(s: &mut SimdCtx, cpu: &mut Cpu, features: FeatureSet) {
    s.xmm = cpu.xmm.as_mut_ptr() as u64;
    s.hi = cpu.ymm_hi.as_mut_ptr() as u64;
    s.mxcsr = &mut cpu.mxcsr as *mut u32 as u64;
    let mut deny = 0;
    for (b, f) in FEATURES.iter().enumerate() {
        if !features.contains(*f) {
            deny |= 1 << b;
        }
    }
    if cpu.cr0 & (CR0_EM | crate::cpu::CR0_TS) != 0 || cpu.cr4 & CR4_OSFXSR == 0 {
        deny |= SSE_STATE;
    }
    let ymm = crate::avx::XCR0_SSE | crate::avx::XCR0_AVX;
    if cpu.cr0 & crate::cpu::CR0_TS != 0
        || cpu.cr4 & crate::avx::CR4_OSXSAVE == 0
        || cpu.xcr0 & ymm != ymm
    {
        deny |= VEX_STATE;
    }
    if cpu.mxcsr & MXCSR_MASKS != MXCSR_MASKS {
        deny |= FP;
    }
    s.deny = deny;
}

/// The deny-word bit of an instruction's CPUID feature; `None`: not translated.
fn feature_bit(f: C) -> Option<u64> {
    Some(match f {
        C::SSE => 1,
        C::SSE2 => 1 << 1,
        C::SSE3 => 1 << 2,
        C::SSSE3 => 1 << 3,
        C::SSE4_1 => 1 << 4,
        C::SSE4_2 => 1 << 5,
        C::AES => 1 << 6,
        C::PCLMULQDQ => 1 << 7,
        C::SHA => 1 << 8,
        C::AVX => 1 << 9,
        C::AVX2 => 1 << 10,
        C::FMA => 1 << 11,
        C::F16C => 1 << 12,
        _ => return None,
    })
}

/// The deny bits the host CPU would have (features it lacks); `None` without AVX (the glue is
/// VEX-encoded).
fn host_deny() -> Option<u64> {
    static H: OnceLock<Option<u64>> = OnceLock::new();
    *H.get_or_init(|| {
        if !std::arch::is_x86_feature_detected!("avx") {
            return None;
        }
        let has = [
            std::arch::is_x86_feature_detected!("sse"),
            std::arch::is_x86_feature_detected!("sse2"),
            std::arch::is_x86_feature_detected!("sse3"),
            std::arch::is_x86_feature_detected!("ssse3"),
            std::arch::is_x86_feature_detected!("sse4.1"),
            std::arch::is_x86_feature_detected!("sse4.2"),
            std::arch::is_x86_feature_detected!("aes"),
            std::arch::is_x86_feature_detected!("pclmulqdq"),
            std::arch::is_x86_feature_detected!("sha"),
            std::arch::is_x86_feature_detected!("avx"),
            std::arch::is_x86_feature_detected!("avx2"),
            std::arch::is_x86_feature_detected!("fma"),
            std::arch::is_x86_feature_detected!("f16c"),
        ];
        let mut deny = 0;
        for (b, h) in has.iter().enumerate() {
            if !h {
                deny |= 1 << b;
            }
        }
        Some(deny)
    })
}

/// Mnemonics (legacy names; VEX ones are `V` + these, or start with `Vp`) that neither read
/// nor write MXCSR: moves, shuffles, bitwise and integer operations, the crypto instructions.
/// Everything else translated is floating point.
fn integer_like(m: M) -> bool {
    static SET: OnceLock<std::collections::HashSet<M>> = OnceLock::new();
    SET.get_or_init(|| {
        const NAMES: &[&str] = &[
            "Movdqa",
            "Movdqu",
            "Movaps",
            "Movups",
            "Movapd",
            "Movupd",
            "Movd",
            "Movq",
            "Movss",
            "Movsd",
            "Movhps",
            "Movlps",
            "Movhpd",
            "Movlpd",
            "Movhlps",
            "Movlhps",
            "Movshdup",
            "Movsldup",
            "Movddup",
            "Lddqu",
            "Movntdq",
            "Movntps",
            "Movntpd",
            "Movntdqa",
            "Shufps",
            "Shufpd",
            "Unpcklps",
            "Unpckhps",
            "Unpcklpd",
            "Unpckhpd",
            "Andps",
            "Andnps",
            "Orps",
            "Xorps",
            "Andpd",
            "Andnpd",
            "Orpd",
            "Xorpd",
            "Blendps",
            "Blendpd",
            "Blendvps",
            "Blendvpd",
            "Movmskps",
            "Movmskpd",
            "Insertps",
            "Extractps",
            "Crc32",
            "Aesenc",
            "Aesenclast",
            "Aesdec",
            "Aesdeclast",
            "Aesimc",
            "Aeskeygenassist",
            "Sha1rnds4",
            "Sha1nexte",
            "Sha1msg1",
            "Sha1msg2",
            "Sha256rnds2",
            "Sha256msg1",
            "Sha256msg2",
            "Broadcastss",
            "Broadcastsd",
            "Broadcastf128",
            "Broadcasti128",
            "Insertf128",
            "Inserti128",
            "Extractf128",
            "Extracti128",
            "Testps",
            "Testpd",
        ];
        M::values()
            .filter(|m| {
                let n = format!("{m:?}");
                let bare = n.strip_prefix('V').unwrap_or(&n);
                n.starts_with('P') || n.starts_with("Vp") || NAMES.contains(&bare)
            })
            .collect()
    })
    .contains(&m)
}

/// VEX moves that need their operand aligned to its size.
fn vex_aligned(m: M) -> bool {
    matches!(
        m,
        M::Vmovdqa
            | M::Vmovaps
            | M::Vmovapd
            | M::Vmovntdq
            | M::Vmovntps
            | M::Vmovntpd
            | M::Vmovntdqa
    )
}

/// Vector register number and whether it is named as `ymm`.
fn vreg(r: Register) -> Option<(usize, bool)> {
    if r.is_xmm() && r.number() < 16 {
        Some((r.number(), false))
    } else if r.is_ymm() && r.number() < 16 {
        Some((r.number(), true))
    } else {
        None
    }
}

/// Host registers for guest general registers: guest rax/rcx/rdx on themselves (implicit
/// operands), others on rdi, r9, r10.
const POOL: [u8; 3] = [RDI, 9, 10];

fn host_gpr(num: u8, size: usize) -> Option<Register> {
    let r = *super::GPR64.get(usize::from(num))?;
    Some(match size {
        8 => r,
        4 => r.full_register32(),
        2 => Register::AX + u32::from(num),
        1 => match num {
            0..=3 => Register::AL + u32::from(num),
            _ => Register::SPL + u32::from(num - 4),
        },
        _ => return None,
    })
}

/// How one instruction is run.
struct Plan {
    /// Deny-word bits that must be clear.
    need: u64,
    fp: bool,
    vex: bool,
    /// `vzeroupper`: bits 255:128 of every register become zero.
    zero_upper: bool,
    /// Vector registers: (number, named as ymm, written), each once.
    vregs: Vec<(usize, bool, bool)>,
    /// Guest GPR -> host register number, and whether written.
    gprs: Vec<(usize, u8, bool)>,
    /// (size, written, alignment to check)
    mem: Option<(usize, bool, usize)>,
    out: Instruction,
}

fn is_write(a: OpAccess) -> bool {
    matches!(
        a,
        OpAccess::Write | OpAccess::ReadWrite | OpAccess::CondWrite | OpAccess::ReadCondWrite
    )
}

/// Cheap first test: an SSE/AVX/crypto instruction this module may take.
fn needs(i: &Instruction) -> Option<(u64, bool)> {
    let vex = match i.encoding() {
        EncodingKind::Legacy => false,
        EncodingKind::VEX => true,
        _ => return None,
    };
    let mut need = 0;
    for f in i.cpuid_features() {
        if *f == C::X64 {
            continue;
        }
        need |= feature_bit(*f)?;
    }
    if need == 0 {
        return None;
    }
    Some((need, vex))
}

fn plan(info: &mut InstructionInfoFactory, i: &Instruction) -> Option<Plan> {
    let (mut need, vex) = needs(i)?;
    if need & host_deny()? != 0 {
        return None;
    }
    let m = i.mnemonic();
    if matches!(
        m,
        M::Maskmovdqu | M::Vmaskmovdqu | M::Vzeroall | M::Ldmxcsr | M::Stmxcsr
    ) || m == M::Vldmxcsr
        || m == M::Vstmxcsr
    {
        return None;
    }
    if m == M::Vzeroupper {
        return Some(Plan {
            need: need | VEX_STATE,
            fp: false,
            vex: true,
            zero_upper: true,
            vregs: Vec::new(),
            gprs: Vec::new(),
            mem: None,
            out: *i,
        });
    }
    let crc = m == M::Crc32;
    need |= if vex {
        VEX_STATE
    } else if crc {
        0
    } else {
        SSE_STATE
    };
    let fp = !integer_like(m);
    if fp {
        need |= FP;
    }
    let mut out = *i;
    let mut gprs: Vec<(usize, u8, bool)> = Vec::new();
    let mut vregs: Vec<(usize, bool, bool)> = Vec::new();
    let mut mem = None;
    let access = info.info(i);
    let mut next = 0;
    let mut host_of = |g: usize, gprs: &mut Vec<(usize, u8, bool)>| -> Option<u8> {
        if let Some(e) = gprs.iter().find(|e| e.0 == g) {
            return Some(e.1);
        }
        let h = if g <= 2 {
            g as u8
        } else {
            let h = *POOL.get(next)?;
            next += 1;
            h
        };
        gprs.push((g, h, false));
        Some(h)
    };
    for n in 0..i.op_count() {
        match i.op_kind(n) {
            OpKind::Register => {
                let r = i.op_register(n);
                if let Some((k, y)) = vreg(r) {
                    // Identity; accesses come from used_registers below.
                    match vregs.iter_mut().find(|e| e.0 == k) {
                        Some(e) => e.1 |= y,
                        None => vregs.push((k, y, false)),
                    }
                    continue;
                }
                let g = super::gpr_num(r)?;
                let h = host_of(g, &mut gprs)?;
                out.set_op_register(n, host_gpr(h, r.size())?);
                if is_write(access.op_access(n))
                    && let Some(e) = gprs.iter_mut().find(|e| e.0 == g)
                {
                    e.2 = true;
                }
            }
            OpKind::Memory => {
                if !mem_ok(i) {
                    return None;
                }
                let size = i.memory_size().size();
                if !matches!(size, 1 | 2 | 4 | 8 | 16 | 32) {
                    return None;
                }
                let align = if vex {
                    if vex_aligned(m) { size } else { 1 }
                } else if size == 16 && !crate::sse::unaligned_ok(m) && !crc {
                    16
                } else {
                    1
                };
                mem = Some((size, is_write(access.op_access(n)), align));
                out.set_memory_base(Register::RSI);
                out.set_memory_index(Register::None);
                out.set_memory_index_scale(1);
                out.set_memory_displacement64(0);
                out.set_memory_displ_size(0);
                out.set_segment_prefix(Register::None);
            }
            OpKind::Immediate8 => {}
            _ => return None,
        }
    }
    // Every register the instruction uses, implicit ones included.
    let (mb, mx) = (i.memory_base(), i.memory_index());
    for u in access.used_registers() {
        let r = u.register();
        // iced-x86 reports a VEX destination as the zmm register (the write clears every
        // bit above the result): the width it is named with comes from the operands above.
        let zmm = r.is_zmm() && r.number() < 16;
        if let Some(k) = vreg(r).map(|v| v.0).or(zmm.then(|| r.number())) {
            let w = is_write(u.access());
            match vregs.iter_mut().find(|e| e.0 == k) {
                Some(e) => e.2 |= w,
                None => vregs.push((k, false, w)),
            }
            continue;
        }
        if r.is_segment_register() {
            continue; // 64-bit mode: FS/GS bases are added by `address`, others are zero
        }
        if !r.is_gpr() {
            return None;
        }
        let full = r.full_register();
        let g = gpr_of(full)?;
        let explicit = (0..i.op_count())
            .any(|n| i.op_kind(n) == OpKind::Register && i.op_register(n).full_register() == full);
        if explicit {
            continue;
        }
        if g <= 2 {
            // An implicit operand (pcmpestri's eax/edx, pcmpistri's ecx): on itself.
            host_of(g, &mut gprs)?;
            if is_write(u.access())
                && let Some(e) = gprs.iter_mut().find(|e| e.0 == g)
            {
                e.2 = true;
            }
        } else if full != mb && full != mx {
            return None;
        }
    }
    if vregs.is_empty() && !crc {
        return None;
    }
    Some(Plan {
        need,
        fp,
        vex,
        zero_upper: false,
        vregs,
        gprs,
        mem,
        out,
    })
}

thread_local! {
    static INFO: RefCell<InstructionInfoFactory> = RefCell::new(InstructionInfoFactory::new());
}

/// [`Kind::Simd`] if `i` is an SSE/AVX/AES/PCLMUL/SHA/CRC32 form this module runs (whether the
/// guest may run it now is checked by the code, see the module doc).
pub(super) fn classify(i: &Instruction) -> Option<Kind> {
    needs(i)?;
    INFO.with(|f| plan(&mut f.borrow_mut(), i).map(|_| Kind::Simd))
}

/// A VEX instruction with a `[base + disp32]` operand: `map` 1 = 0F, 3 = 0F3A; `pp` 1 = 66,
/// 2 = F3; `vvvv` the second source (0 when unused, encoded inverted).
#[allow(clippy::too_many_arguments)] // the fields of one encoding, named as the SDM does
fn vex_mem(buf: &mut Vec<u8>, map: u8, pp: u8, l: u8, op: u8, reg: u8, vvvv: u8, base: u8, d: i32) {
    buf.push(0xc4);
    buf.push(((!(reg >> 3) & 1) << 7) | (1 << 6) | ((!(base >> 3) & 1) << 5) | map);
    buf.push(((!vvvv & 15) << 3) | (l << 2) | pp);
    buf.push(op);
    buf.push(0x80 | ((reg & 7) << 3) | (base & 7));
    if base & 7 == 4 {
        buf.push(0x24);
    }
    buf.extend_from_slice(&d.to_le_bytes());
}

/// ldmxcsr (`ext` 2) / stmxcsr (3) `[base + disp32]`.
fn mxcsr_op(buf: &mut Vec<u8>, ext: u8, base: u8, d: i32) {
    if base >= 8 {
        buf.push(0x41);
    }
    buf.extend_from_slice(&[0x0f, 0xae, 0x80 | (ext << 3) | (base & 7)]);
    if base & 7 == 4 {
        buf.push(0x24);
    }
    buf.extend_from_slice(&d.to_le_bytes());
}

const R11: u8 = 11;

impl Emitter {
    /// Instruction `k` of the block, a [`Kind::Simd`] form.
    pub(super) fn simd(&mut self, k: u32, i: &Instruction) -> E<()> {
        let ip = i.ip();
        let Some(p) = plan(&mut self.info, i) else {
            // Not expected (classify said yes): let the interpreter run it.
            let stub = self.stub(k, ip, 0);
            self.a.jmp(stub);
            return Ok(());
        };
        let encoded = self.enc.encode(&p.out, 0).map(|_| self.enc.take_buffer());
        let Ok(mut code) = encoded else {
            let stub = self.stub(k, ip, 0);
            self.a.jmp(stub);
            return Ok(());
        };
        // May it run now? rcx = pext(deny, need) is zero if so.
        let stub = self.stub(k, ip, 0);
        self.a.load(RCX, at(R15, C_DENY));
        self.a.mov_imm(RDX, p.need);
        self.a.bytes(&[0xc4, 0xe2, 0xf2, 0xf5, 0xca]); // pext rcx, rcx, rdx
        self.a.jmp_unless_rcx_zero(stub);
        if let Some((size, write, align)) = p.mem {
            self.address(i);
            if align > 1 {
                self.check_aligned(k, ip, align);
            }
            self.tlb(k, ip, size, write);
        }
        if p.zero_upper {
            self.a.load(R8, at(R15, C_HI));
            self.a.bytes(&[0xc5, 0xf9, 0xef, 0xc0]); // vpxor xmm0, xmm0, xmm0
            for j in 0..8 {
                // vmovdqu [r8 + 32j], ymm0
                vex_mem(&mut self.a.buf, 1, 2, 1, 0x7f, 0, 0, R8, 32 * j);
            }
            self.a.bytes(&[0xc5, 0xf8, 0x77]); // vzeroupper
            code.clear();
            self.enc.set_buffer(code);
            return Ok(());
        }
        self.a.load(RBP, at(R15, C_XMM));
        let wide = p.vregs.iter().any(|v| v.1);
        if p.vex {
            self.a.load(R8, at(R15, C_HI));
        }
        if p.fp {
            self.a.load(R11, at(R15, C_MXCSR));
        }
        for &(g, h, _) in &p.gprs {
            self.a.load(h, greg(g));
        }
        let b = &mut self.a.buf;
        for &(x, y, _) in &p.vregs {
            let x8 = x as u8;
            // vmovdqu xmm_x, [rbp + 16x]
            vex_mem(b, 1, 2, 0, 0x6f, x8, 0, RBP, 16 * x as i32);
            if y {
                // vinsertf128 ymm_x, ymm_x, [r8 + 16x], 1
                vex_mem(b, 3, 1, 1, 0x18, x8, x8, R8, 16 * x as i32);
                b.push(1);
            }
        }
        if p.fp {
            mxcsr_op(b, 3, R15, C_HOST_MXCSR);
            mxcsr_op(b, 2, R11, 0);
        }
        b.extend_from_slice(&code);
        if p.fp {
            mxcsr_op(b, 3, R11, 0);
            mxcsr_op(b, 2, R15, C_HOST_MXCSR);
        }
        for &(x, y, w) in &p.vregs {
            if !w {
                continue;
            }
            let x8 = x as u8;
            // vmovdqu [rbp + 16x], xmm_x
            vex_mem(&mut self.a.buf, 1, 2, 0, 0x7f, x8, 0, RBP, 16 * x as i32);
            if p.vex {
                if y {
                    // vextractf128 [r8 + 16x], ymm_x, 1
                    vex_mem(&mut self.a.buf, 3, 1, 1, 0x19, x8, 0, R8, 16 * x as i32);
                    self.a.buf.push(1);
                } else {
                    // VEX.128 zeroes bits 255:128.
                    self.a.store_imm(at(R8, 16 * x as i32), 0);
                    self.a.store_imm(at(R8, 16 * x as i32 + 8), 0);
                }
            }
        }
        for &(g, h, w) in &p.gprs {
            if w {
                self.a.store(greg(g), h);
            }
        }
        if wide {
            self.a.bytes(&[0xc5, 0xf8, 0x77]); // vzeroupper
        }
        code.clear();
        self.enc.set_buffer(code);
        Ok(())
    }
}

use crate::jit::asm::at;

#[cfg(test)]
#[path = "simd_tests.rs"]
mod tests;
