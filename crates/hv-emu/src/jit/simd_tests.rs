//! Translated vector instructions against the interpreter, one form at a time, on random
//! register files, memory, MXCSR rounding modes; and the cases that must leave to the
//! interpreter (#GP, #NM, #UD, #XM).

use iced_x86::code_asm::*;
use iced_x86::{Decoder, DecoderOptions};

use super::super::classify;
use crate::cpu::Cpu;
use crate::jit::tests::{
    CODE, Family, Gen, Ran, Rig, assemble, code_of, copy, first, run_jit, undefined_of,
};
use crate::testutil::Rng;
use hv::MpState;

const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;

fn cpu(seed: u64) -> Cpu {
    let mut rng = Rng(seed | 1);
    let mut c = crate::testutil::cpu64(&mut rng, 0x3000, 0x6000, 32);
    c.cr4 |= CR4_OSFXSR | CR4_OSXMMEXCPT | crate::avx::CR4_OSXSAVE;
    c.xcr0 = 7;
    c.deliver_exceptions = false;
    for k in 0..16 {
        let mut v = || u128::from(rng.next()) | (u128::from(rng.next()) << 64);
        c.xmm[k] = v();
        c.ymm_hi[k] = v();
        // Some lanes of ordinary floats (random bits are mostly NaN/huge/tiny otherwise).
        if k % 3 == 0 {
            c.xmm[k] = 0x4049_0fdb_c000_0000_3ff8_0000_0000_0000 ^ (c.xmm[k] & 0xffff);
        }
    }
    c
}

/// The vector side of the comparison: the interpreter stops at a reported exception; the
/// vector registers and MXCSR are compared too, and neither run may halt.
const SIMD: Family = Family {
    step: |ex| ex.step(),
    stopped: |c| c.reported.is_some(),
    more: |ctx, a, b| {
        for k in 0..16 {
            assert_eq!(
                (a.xmm[k], a.ymm_hi[k]),
                (b.xmm[k], b.ymm_hi[k]),
                "{ctx}: ymm{k} (jit vs interp)"
            );
        }
        assert_eq!(a.mxcsr, b.mxcsr, "{ctx}: mxcsr");
        assert_eq!(a.mp_state, MpState::Runnable);
    },
};

impl Rig {
    /// Runs one instruction from `a` on the translator and from `b` (a copy) on the
    /// interpreter, compares everything, and says how the translator ran it.
    fn compare_simd(&mut self, ctx: &str, a: Cpu, b: Cpu, undefined: u64) -> Ran {
        self.compare_in(&SIMD, ctx, a, b, undefined, 1)
    }
}

/// Vector instruction forms; `fp` ones also run under random rounding modes, DAZ and FTZ.
fn templates() -> Vec<(String, Gen)> {
    // One `CodeAssembler` call each, named by its text.
    macro_rules! forms {
        ($($m:ident($($x:tt)*);)*) => {
            vec![$((
                stringify!($m($($x)*)).to_string(),
                Box::new(|a: &mut CodeAssembler| {
                    a.$m($($x)*)?;
                    Ok(())
                }) as Gen,
            )),*]
        };
    }
    forms! {
        // Legacy SSE integer and moves.
        movdqa(xmm1, xmm2); movdqa(xmm3, xmmword_ptr(rbx)); movdqa(xmmword_ptr(rsi + 32), xmm4);
        movdqu(xmm5, xmmword_ptr(rdi + 3)); movdqu(xmmword_ptr(rbx + rcx + 1), xmm15);
        movups(xmm8, xmmword_ptr(rsi + 5)); movaps(xmmword_ptr(rbp), xmm9); movapd(xmm2, xmm12);
        movd(xmm1, eax); movd(r9d, xmm2); movq(xmm3, rdx); movq(r10, xmm4);
        movq(xmm5, qword_ptr(rbx + 7)); movq(qword_ptr(rsi + 9), xmm6); movq(xmm7, xmm8);
        movd(dword_ptr(rdi + 2), xmm0); movss(xmm1, xmm2); movss(xmm1, dword_ptr(rbx + 1));
        movsd_2(xmm3, xmm4); movsd_2(qword_ptr(rsi), xmm5); movhps(xmm6, qword_ptr(rdi));
        movlps(qword_ptr(rbx + 4), xmm7); movhlps(xmm1, xmm2); movlhps(xmm3, xmm4);
        pxor(xmm1, xmm2); pxor(xmm3, xmmword_ptr(rsi)); por(xmm4, xmm5); pand(xmm6, xmm7);
        pandn(xmm8, xmm9); xorps(xmm10, xmm11); andps(xmm1, xmmword_ptr(rdi)); paddb(xmm1, xmm2);
        paddd(xmm3, xmm4); paddq(xmm5, xmmword_ptr(rbx)); psubw(xmm6, xmm7); pmulld(xmm1, xmm2);
        pmuludq(xmm3, xmm4); pmaddwd(xmm5, xmm6); pcmpeqb(xmm1, xmm2);
        pcmpeqd(xmm3, xmmword_ptr(rsi)); pcmpgtb(xmm4, xmm5); pminub(xmm6, xmm7);
        pmaxsd(xmm8, xmm9); pmovmskb(eax, xmm1); pmovmskb(r11d, xmm14); movmskps(ecx, xmm2);
        pshufb(xmm1, xmm2); pshufb(xmm3, xmmword_ptr(rbx)); pshufd(xmm4, xmm5, 0x1b);
        pshufd(xmm6, xmmword_ptr(rdi), 0xe4); pshuflw(xmm7, xmm8, 0x39); palignr(xmm1, xmm2, 5);
        pslldq(xmm3, 3); psrldq(xmm4, 9); psllq(xmm5, 13); psrld(xmm6, xmm7); psraw(xmm8, 4);
        punpcklbw(xmm1, xmm2); punpckhqdq(xmm3, xmm4); packuswb(xmm5, xmm6); packssdw(xmm7, xmm8);
        ptest(xmm1, xmm2); ptest(xmm3, xmmword_ptr(rsi)); pextrd(eax, xmm1, 2); pextrq(r9, xmm2, 1);
        pextrb(dword_ptr(rbx + 3), xmm3, 7); pextrw(edx, xmm4, 5); pinsrd(xmm5, ecx, 1);
        pinsrq(xmm6, rdx, 0); pinsrb(xmm7, byte_ptr(rsi + 1), 15); pmovzxbw(xmm1, xmm2);
        pmovsxdq(xmm3, qword_ptr(rdi + 1)); pblendw(xmm4, xmm5, 0xa5); pblendvb(xmm1, xmm2);
        blendvps(xmm3, xmm4); shufps(xmm5, xmm6, 0x4e); unpcklps(xmm7, xmm8);
        pcmpistri(xmm1, xmm2, 0x0c); pcmpistri(xmm3, xmmword_ptr(rbx + 1), 0x1a);
        pcmpestri(xmm4, xmm5, 0x08); pcmpistrm(xmm6, xmm7, 0x40);
        pcmpestrm(xmm8, xmmword_ptr(rsi), 0x44); phminposuw(xmm1, xmm2); psadbw(xmm3, xmm4);
        lddqu(xmm5, xmmword_ptr(rdi + 7)); movntdq(xmmword_ptr(rbx), xmm6);
        insertps(xmm1, xmm2, 0x5c); extractps(eax, xmm3, 2);
        // Crypto.
        aesenc(xmm1, xmm2); aesenclast(xmm3, xmmword_ptr(rsi)); aesdec(xmm4, xmm5);
        aesdeclast(xmm6, xmm7); aesimc(xmm8, xmm9); aeskeygenassist(xmm10, xmm11, 0x1b);
        pclmulqdq(xmm1, xmm2, 0x11); pclmulqdq(xmm3, xmmword_ptr(rdi), 0x01);
        sha1rnds4(xmm1, xmm2, 3); sha1nexte(xmm3, xmm4); sha1msg1(xmm5, xmm6); sha1msg2(xmm7, xmm8);
        sha256rnds2(xmm1, xmm2); sha256rnds2(xmm3, xmmword_ptr(rbx)); sha256msg1(xmm4, xmm5);
        sha256msg2(xmm6, xmm7); crc32(eax, byte_ptr(rsi)); crc32(r9d, ecx);
        crc32(rdx, qword_ptr(rdi + 5));
        // AVX / AVX2.
        vpxor(xmm1, xmm2, xmm3); vpxor(ymm1, ymm2, ymm3); vpor(ymm4, ymm5, ymmword_ptr(rbx));
        vpand(ymm6, ymm6, ymm7); vpaddd(ymm8, ymm9, ymm10);
        vpaddq(xmm11, xmm12, xmmword_ptr(rsi + 4)); vpsubb(ymm13, ymm14, ymm15);
        vpcmpeqb(ymm1, ymm2, ymm3); vpcmpeqb(ymm4, ymm0, ymmword_ptr(rdi + 1));
        vpminub(ymm5, ymm6, ymm7); vpmovmskb(eax, ymm1); vpmovmskb(ecx, xmm2); vptest(ymm3, ymm4);
        vpshufb(ymm5, ymm6, ymm7); vpshufd(ymm8, ymm9, 0x93); vpalignr(ymm1, ymm2, ymm3, 7);
        vpermq(ymm4, ymm5, 0x4e); vpermd(ymm6, ymm7, ymm8); vperm2i128(ymm1, ymm2, ymm3, 0x21);
        vpbroadcastb(ymm1, xmm2); vpbroadcastd(ymm3, dword_ptr(rsi)); vpbroadcastq(xmm4, xmm5);
        vbroadcastss(ymm6, dword_ptr(rbx + 2)); vinserti128(ymm1, ymm2, xmm3, 1);
        vextracti128(xmm4, ymm5, 1); vextracti128(xmmword_ptr(rdi), ymm6, 0);
        vmovdqa(ymm1, ymmword_ptr(rbx)); vmovdqa(xmmword_ptr(rsi), xmm2);
        vmovdqu(ymm3, ymmword_ptr(rdi + 1)); vmovdqu(ymmword_ptr(rbx + 5), ymm4);
        vmovdqu(xmm5, xmm6); vmovups(ymm7, ymm8); vmovd(xmm1, eax); vmovq(rdx, xmm2);
        vpsllq(ymm3, ymm4, 7); vpsrlvd(ymm5, ymm6, ymm7); vpunpcklbw(ymm8, ymm9, ymm10);
        vpackuswb(ymm1, ymm2, ymm3); vpblendd(ymm4, ymm5, ymm6, 0x3c);
        vpblendvb(ymm7, ymm8, ymm9, ymm10); vpmovzxbw(ymm1, xmm2); vpmaddubsw(ymm3, ymm4, ymm5);
        vpandn(ymm6, ymm7, ymm8); vpcmpgtq(ymm9, ymm10, ymm11); vpminud(ymm12, ymm13, ymm14);
        vpsadbw(ymm1, ymm2, ymm3); vxorps(ymm4, ymm5, ymm6); vshufps(ymm7, ymm8, ymm9, 0x1b);
        vaesenc(xmm1, xmm2, xmm3); vpclmulqdq(xmm4, xmm5, xmm6, 0x10); vpcmpistri(xmm7, xmm8, 0x0c);
        // Floating point (MXCSR).
        addps(xmm1, xmm2); addsd(xmm3, qword_ptr(rsi)); mulpd(xmm4, xmm5); divss(xmm6, xmm7);
        sqrtps(xmm8, xmm9); minps(xmm1, xmm2); maxsd(xmm3, xmm4); cmpps(xmm5, xmm6, 1);
        ucomisd(xmm7, xmm8); comiss(xmm1, dword_ptr(rdi)); cvtsi2sd(xmm2, rax);
        cvttsd2si(ecx, xmm0); cvtsd2si(rdx, xmm3); cvtps2dq(xmm4, xmm5); cvtdq2ps(xmm6, xmm7);
        cvtss2sd(xmm8, xmm9); roundps(xmm1, xmm2, 4); haddps(xmm3, xmm4); dpps(xmm5, xmm6, 0xf1);
        vaddps(ymm1, ymm2, ymm3); vmulsd(xmm4, xmm5, xmm6); vdivpd(ymm7, ymm8, ymmword_ptr(rbx));
        vfmadd231ps(ymm1, ymm2, ymm3); vfmadd213sd(xmm4, xmm5, xmm6); vcvtph2ps(ymm7, xmm8);
        vcvtps2ph(xmm9, ymm10, 0); vsqrtps(ymm11, ymm12); vcmpps(ymm1, ymm2, ymm3, 0x11);
    }
}

/// Flags the instruction leaves undefined (masked in the comparison).
fn undefined(code: &[u8]) -> u64 {
    undefined_of(&first(code))
}

#[test]
fn every_vector_form_matches_the_interpreter() {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut rig = Rig::with_model(hv::CpuModel::portable_v3());
    let list = templates();
    assert!(list.len() > 180, "{} templates", list.len());
    for (name, f) in &list {
        let code = assemble(f);
        let i = first(&code);
        assert_eq!(
            classify(&i),
            Some(super::Kind::Simd),
            "{name} is not translated"
        );
        let fp = !super::integer_like(i.mnemonic());
        rig.jit.clear();
        let mut translated = 0;
        for n in 0..48 {
            let seed = rng.next();
            rig.load(seed | 1, &code);
            let mut c = cpu(seed);
            if fp && n % 2 == 1 {
                // Rounding control, DAZ, FTZ at random; every exception masked.
                c.mxcsr = 0x1f80 | (seed as u32 & 0xe040);
            }
            let undef = undefined(&code);
            if rig.compare_simd(name, copy(&c), c, undef) == Ran::Translated {
                translated += 1;
            }
        }
        // TLB misses (first touch of a page) and page-crossing operands are interpreted.
        assert!(
            translated >= 24,
            "{name}: only {translated} of 48 runs translated"
        );
    }
}

/// One run of `code` from `c`; how the translator ran it.
fn run(rig: &mut Rig, code: &[u8], c: Cpu, name: &str) -> Ran {
    rig.load(7, code);
    rig.jit.clear();
    // Twice: the first run fills the soft TLB.
    rig.compare_simd(name, copy(&c), copy(&c), 0);
    rig.load(7, code);
    rig.compare_simd(name, copy(&c), c, 0)
}

#[test]
fn misaligned_sse_operands_raise_gp_through_the_interpreter() {
    let mut rig = Rig::with_model(hv::CpuModel::portable_v3());
    let code = code_of(|a| a.movdqa(xmm1, xmmword_ptr(rbx + 8)));
    let c = cpu(3);
    assert_eq!(c.gpr[3] & 31, 0);
    assert_eq!(run(&mut rig, &code, copy(&c), "movdqa"), Ran::Interpreted);
    let mut c2 = copy(&c);
    c2.gpr[3] += 8;
    assert_eq!(run(&mut rig, &code, c2, "movdqa aligned"), Ran::Translated);
    let code = code_of(|a| a.vmovdqa(ymm1, ymmword_ptr(rbx + 16)));
    assert_eq!(run(&mut rig, &code, copy(&c), "vmovdqa"), Ran::Interpreted);
    let code = code_of(|a| a.paddd(xmm1, xmmword_ptr(rbx + 4)));
    assert_eq!(run(&mut rig, &code, copy(&c), "paddd"), Ran::Interpreted);
    // Unaligned forms stay translated.
    let code = code_of(|a| a.movdqu(xmm1, xmmword_ptr(rbx + 4)));
    assert_eq!(run(&mut rig, &code, copy(&c), "movdqu"), Ran::Translated);
    // The #GP itself (compared with the interpreter inside `run`).
    let code = code_of(|a| a.movdqa(xmm1, xmmword_ptr(rbx + 8)));
    let mut a = copy(&c);
    rig.load(7, &code);
    rig.jit.clear();
    rig.compare_simd("movdqa #GP", copy(&c), copy(&c), 0);
    run_jit(&mut rig, &mut a, 1);
    assert_eq!(a.reported, Some((13, Some(0))));
}

#[test]
fn guest_control_state_and_model_gate_translated_vector_code() {
    let sse = code_of(|a| a.paddd(xmm1, xmm2));
    let avx = code_of(|a| a.vpaddd(ymm1, ymm2, ymm3));
    let sha = code_of(|a| a.sha256msg1(xmm1, xmm2));
    let mut rig = Rig::with_model(hv::CpuModel::portable_v3());
    assert_eq!(run(&mut rig, &sse, cpu(5), "paddd"), Ran::Translated);
    assert_eq!(run(&mut rig, &avx, cpu(5), "vpaddd"), Ran::Translated);
    // CR0.TS: #NM from the interpreter.
    for code in [&sse, &avx, &sha] {
        let mut c = cpu(5);
        c.cr0 |= crate::cpu::CR0_TS;
        assert_eq!(run(&mut rig, code, copy(&c), "TS"), Ran::Interpreted);
        let mut a = c;
        run_jit(&mut rig, &mut a, 1);
        assert_eq!(a.reported, Some((7, None)));
    }
    // CR4.OSFXSR clear: SSE is #UD; XCR0 without AVX: VEX is #UD.
    let mut c = cpu(5);
    c.cr4 &= !CR4_OSFXSR;
    assert_eq!(run(&mut rig, &sse, c, "OSFXSR"), Ran::Interpreted);
    let mut c = cpu(5);
    c.xcr0 = 3;
    assert_eq!(run(&mut rig, &avx, c, "XCR0"), Ran::Interpreted);
    assert_eq!(
        run(&mut rig, &sse, cpu(5), "paddd, XCR0=3"),
        Ran::Translated
    );
    // A model without AVX/SHA (portable, x86-64-v2): the interpreter raises #UD.
    let mut rig = Rig::with_model(hv::CpuModel::portable());
    assert_eq!(run(&mut rig, &sse, cpu(5), "paddd on v2"), Ran::Translated);
    for (code, name) in [(&avx, "vpaddd on v2"), (&sha, "sha256msg1 on v2")] {
        assert_eq!(run(&mut rig, code, cpu(5), name), Ran::Interpreted);
        let mut a = cpu(5);
        run_jit(&mut rig, &mut a, 1);
        assert_eq!(a.reported, Some((6, None)), "{name}");
    }
}

#[test]
fn unmasked_fp_exceptions_are_raised_by_the_interpreter() {
    let mut rig = Rig::with_model(hv::CpuModel::portable_v3());
    let code = code_of(|a| a.divps(xmm1, xmm2));
    let mut c = cpu(9);
    c.xmm[1] = 0x3f80_0000_3f80_0000_3f80_0000_3f80_0000; // 1.0
    c.xmm[2] = 0;
    // Masked: translated, ZE and the infinities as the host computes them.
    let r = run(&mut rig, &code, copy(&c), "divps masked");
    assert_eq!(r, Ran::Translated);
    // Divide-by-zero unmasked: #XM from the interpreter, nothing written.
    c.mxcsr = 0x1f80 & !(1 << 9);
    assert_eq!(
        run(&mut rig, &code, copy(&c), "divps #XM"),
        Ran::Interpreted
    );
    let mut a = c;
    run_jit(&mut rig, &mut a, 1);
    assert_eq!(a.reported, Some((19, None)));
    // Integer forms do not care about MXCSR.
    let code = code_of(|a| a.paddd(xmm1, xmm2));
    assert_eq!(run(&mut rig, &code, copy(&a), "paddd"), Ran::Translated);
}

#[test]
fn rounding_modes_reach_translated_code() {
    let mut rig = Rig::with_model(hv::CpuModel::portable_v3());
    let code = code_of(|a| a.cvtsd2si(rax, xmm1));
    for (rc, want) in [(0, 2u64), (1, 1), (2, 2), (3, 1)] {
        let mut c = cpu(11);
        c.xmm[1] = u128::from(1.5f64.to_bits());
        c.mxcsr = 0x1f80 | (rc << 13);
        let mut a = copy(&c);
        assert_eq!(run(&mut rig, &code, c, "cvtsd2si"), Ran::Translated);
        run_jit(&mut rig, &mut a, 1);
        assert_eq!(a.gpr[0], want, "rounding control {rc}");
        // Inexact: the sticky flag reaches the guest MXCSR.
        assert_eq!(a.mxcsr & 0x20, 0x20);
    }
}

#[test]
fn glue_encodings_decode_as_intended() {
    let mut b = Vec::new();
    super::vex_mem(&mut b, 1, 2, 0, 0x6f, 9, 0, crate::jit::asm::RBP, 0x90);
    super::vex_mem(&mut b, 3, 1, 1, 0x18, 9, 9, crate::jit::asm::R8, 0x90);
    b.push(1);
    super::vex_mem(&mut b, 1, 2, 0, 0x7f, 3, 0, crate::jit::asm::RBP, 0x30);
    super::vex_mem(&mut b, 3, 1, 1, 0x19, 15, 0, crate::jit::asm::R8, 0xf0);
    b.push(1);
    super::mxcsr_op(&mut b, 3, crate::jit::asm::R15, 0x1234);
    super::mxcsr_op(&mut b, 2, super::R11, 0);
    b.extend_from_slice(&[0xc4, 0xe2, 0xf2, 0xf5, 0xca]);
    let got: Vec<String> = Decoder::with_ip(64, &b, 0, DecoderOptions::NONE)
        .into_iter()
        .map(|i| {
            let regs: Vec<_> = (0..i.op_count())
                .filter(|&n| i.op_kind(n) == iced_x86::OpKind::Register)
                .map(|n| format!("{:?}", i.op_register(n)))
                .collect();
            format!(
                "{:?} {} [{:?}+{:#x}]",
                i.code(),
                regs.join(","),
                i.memory_base(),
                i.memory_displacement64()
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            "VEX_Vmovdqu_xmm_xmmm128 XMM9 [RBP+0x90]",
            "VEX_Vinsertf128_ymm_ymm_xmmm128_imm8 YMM9,YMM9 [R8+0x90]",
            "VEX_Vmovdqu_xmmm128_xmm XMM3 [RBP+0x30]",
            "VEX_Vextractf128_xmmm128_ymm_imm8 YMM15 [R8+0xf0]",
            "Stmxcsr_m32  [R15+0x1234]",
            "Ldmxcsr_m32  [R11+0x0]",
            "VEX_Pext_r64_r64_rm64 RCX,RCX,RDX [None+0x0]",
        ]
    );
}

#[test]
fn random_vector_blocks_match_the_interpreter() {
    // Legacy SSE and VEX forms mixed, so upper halves, MXCSR flags and RFLAGS (ptest,
    // comiss, pcmpistri) flow between translated instructions.
    let mut rng = Rng(0x0ddc_0ffe_e0dd_f00d);
    let mut rig = Rig::with_model(hv::CpuModel::portable_v3());
    let list = templates();
    let mut whole = 0;
    for n in 0..300 {
        let picks: Vec<usize> = (0..8).map(|_| rng.next() as usize % list.len()).collect();
        let mut a = CodeAssembler::new(64).unwrap();
        for &p in &picks {
            (list[p].1)(&mut a).unwrap();
        }
        a.hlt().unwrap();
        let code = a.assemble(CODE).unwrap();
        let names: Vec<&str> = picks.iter().map(|&p| list[p].0.as_str()).collect();
        // Flags left undefined by any instruction of the block are not compared.
        let undef = Decoder::with_ip(64, &code, CODE, DecoderOptions::NONE)
            .into_iter()
            .map(|i| undefined_of(&i))
            .fold(0, |x, y| x | y);
        let seed = rng.next();
        let mut c = cpu(seed);
        if n % 2 == 1 {
            c.mxcsr = 0x1f80 | (seed as u32 & 0xe040);
        }
        rig.jit.clear();
        for _ in 0..2 {
            rig.load(seed | 1, &code);
            let r = rig.compare_in(&SIMD, &format!("{names:?}"), copy(&c), copy(&c), undef, 8);
            if r == Ran::Translated {
                whole += 1;
            }
        }
    }
    assert!(
        whole > 150,
        "only {whole} of 600 block runs translated whole"
    );
}
