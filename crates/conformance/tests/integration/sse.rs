//! SSE basics (movdqu, pxor, paddd, pshufd) and `lock cmpxchg16b`. On KVM at CPL 0 these go
//! through emu's instruction emulator behind KVM (KVM's own emulator refuses most of them).

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use conformance::*;
use hv::Hypervisor;
use iced_x86::code_asm::*;

fn u32s(b: &[u8]) -> Vec<u32> {
    b.chunks(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn sse_basics(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        a.mov(rsi, DATA)?;
        a.movdqu(xmm0, xmmword_ptr(rsi))?;
        a.movdqu(xmm1, xmmword_ptr(rsi + 16))?;
        a.paddd(xmm0, xmm1)?;
        a.movdqu(xmmword_ptr(rsi + 32), xmm0)?;
        a.pshufd(xmm2, xmm0, 0x1b)?; // reverse the dwords
        a.movdqu(xmmword_ptr(rsi + 48), xmm2)?;
        a.pxor(xmm3, xmm3)?;
        a.pxor(xmm1, xmm1)?;
        stop(a)
    });
    let mut g = Guest::with_code(hv, &code);
    let x: Vec<u8> = [1u32, 2, 0xffff_ffff, 0x8000_0000]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let y: Vec<u8> = [10u32, 20, 1, 0x8000_0000]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    g.write(DATA, &x).unwrap();
    g.write(DATA + 16, &y).unwrap();
    let mut st = g.vcpu.state().unwrap();
    st.fpu.xmm[3] = [0xaa; 16];
    g.vcpu.set_state(&st).unwrap();
    let o = g.go();
    o.assert_clean();
    assert_eq!(u32s(&g.read(DATA + 32, 16).unwrap()), [11, 22, 0, 0]);
    assert_eq!(u32s(&g.read(DATA + 48, 16).unwrap()), [0, 0, 22, 11]);
    assert_eq!(u32s(&o.state.fpu.xmm[0]), [11, 22, 0, 0]);
    assert_eq!(u32s(&o.state.fpu.xmm[2]), [0, 0, 22, 11]);
    assert_eq!(o.state.fpu.xmm[3], [0; 16]);
    assert_eq!(o.state.fpu.xmm[1], [0; 16]);
}

fn cmpxchg16b(hv: &dyn Hypervisor) {
    let target = DATA + 0x100; // 16-byte aligned
    let code = asm(|a| {
        a.mov(rsi, target)?;
        // Equal: store RCX:RBX, ZF=1.
        a.mov(rax, 0x1111u64)?;
        a.mov(rdx, 0x2222u64)?;
        a.mov(rbx, 0x3333u64)?;
        a.mov(rcx, 0x4444u64)?;
        a.lock().cmpxchg16b(xmmword_ptr(rsi))?;
        a.pushfq()?;
        a.pop(r8)?;
        // Not equal now: RDX:RAX loaded with memory, ZF=0.
        a.mov(rax, 0x1111u64)?;
        a.mov(rdx, 0x2222u64)?;
        a.lock().cmpxchg16b(xmmword_ptr(rsi))?;
        a.pushfq()?;
        a.pop(r9)?;
        a.mov(r10, rax)?;
        a.mov(r11, rdx)?;
        stop(a)
    });
    let mut g = Guest::with_code(hv, &code);
    g.write_u64(target, 0x1111).unwrap();
    g.write_u64(target + 8, 0x2222).unwrap();
    let o = g.go();
    o.assert_clean();
    let r = o.regs();
    assert_eq!(r.r8 & ZF, ZF);
    assert_eq!(r.r9 & ZF, 0);
    assert_eq!((r.r10, r.r11), (0x3333, 0x4444));
    assert_eq!(g.read_u64(target).unwrap(), 0x3333);
    assert_eq!(g.read_u64(target + 8).unwrap(), 0x4444);
}

fn cmpxchg16b_misaligned_raises_gp(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        a.mov(rsi, DATA + 8)?;
        a.lock().cmpxchg16b(xmmword_ptr(rsi))?;
        stop(a)
    });
    let mut g = Guest::with_code(hv, &code);
    g.go().assert_exception(13, 0);
}

/// Runs `code` at CPL 3 (the host CPU on KVM) after `prep`; returns the final state and the
/// exception vector (`None` when the program reached its final `ud2`).
fn user_run(
    hv: &dyn Hypervisor,
    code: impl FnOnce(&mut CodeAssembler) -> AsmResult,
    prep: impl FnOnce(&mut hv::CpuState),
) -> (hv::CpuState, Option<u8>) {
    let code = asm(|a| {
        code(a)?;
        a.ud2()
    });
    let end = CODE + code.len() as u64 - 2;
    let mut g = Guest::new(hv, DEFAULT_MIB).unwrap();
    g.load_user(&code).unwrap();
    let mut st = g.vcpu.state().unwrap();
    prep(&mut st);
    g.vcpu.set_state(&st).unwrap();
    let o = g.go();
    let e = o.exception.expect("ends in an exception");
    let v = if e.vector == 6 && e.rip == end {
        None
    } else {
        Some(e.vector)
    };
    (o.state, v)
}

fn x(st: &hv::CpuState, k: usize) -> u128 {
    u128::from_le_bytes(st.fpu.xmm[k])
}

/// ADDSS/SUBSS of a tie, SQRTSD and CVTSI2SS in the four rounding modes, with PE.
fn fp_rounding_modes(hv: &dyn Hypervisor) {
    let one = u128::from(1f32.to_bits());
    let m_one = u128::from((-1f32).to_bits());
    let tie = u128::from(2f32.powi(-24).to_bits());
    let up = (1f32 + 2f32.powi(-23)).to_bits();
    let s2 = std::f64::consts::SQRT_2.to_bits();
    let expect = [
        (1f32.to_bits(), (-1f32).to_bits(), s2, 16_777_216f32),
        (
            1f32.to_bits(),
            (-(1f32 + 2f32.powi(-23))).to_bits(),
            s2 - 1,
            16_777_216.0,
        ),
        (up, (-1f32).to_bits(), s2, 16_777_218.0),
        (1f32.to_bits(), (-1f32).to_bits(), s2 - 1, 16_777_216.0),
    ];
    for (rc, (p, n, s, c)) in expect.into_iter().enumerate() {
        let (st, e) = user_run(
            hv,
            |a| {
                a.addss(xmm0, xmm1)?;
                a.subss(xmm2, xmm1)?;
                a.sqrtsd(xmm3, xmm4)?;
                a.mov(eax, 16_777_217)?;
                a.cvtsi2ss(xmm5, eax)
            },
            |st| {
                st.fpu.mxcsr = 0x1f80 | ((rc as u32) << 13);
                st.fpu.xmm[0] = one.to_le_bytes();
                st.fpu.xmm[1] = tie.to_le_bytes();
                st.fpu.xmm[2] = m_one.to_le_bytes();
                st.fpu.xmm[4] = u128::from(2f64.to_bits()).to_le_bytes();
            },
        );
        assert_eq!(e, None);
        assert_eq!(x(&st, 0) as u32, p, "rc {rc}");
        assert_eq!(x(&st, 2) as u32, n, "rc {rc}");
        assert_eq!(x(&st, 3) as u64, s, "rc {rc}");
        assert_eq!(f32::from_bits(x(&st, 5) as u32), c, "rc {rc}");
        assert_eq!(st.fpu.mxcsr & 0x3f, 0x20, "PE only");
    }
}

/// ROUNDSD/ROUNDPS in the immediate modes (PE unless imm[3]) and from MXCSR.
fn roundsd_modes(hv: &dyn Hypervisor) {
    let v = [2.5f64, -2.5, 1.5, -0.25];
    let want = [
        [2.0f64, -2.0, 2.0, -0.0],
        [2.0, -3.0, 1.0, -1.0],
        [3.0, -2.0, 2.0, -0.0],
        [2.0, -2.0, 1.0, -0.0],
    ];
    for imm in 0..16u32 {
        let mode = if imm & 4 != 0 { 1 } else { imm & 3 } as usize;
        for k in 0..4 {
            let (st, e) = user_run(
                hv,
                |a| a.roundsd(xmm0, xmm1, imm),
                |st| {
                    st.fpu.mxcsr = 0x1f80 | (1 << 13); // RC = down, for imm[2]
                    st.fpu.xmm[1] = u128::from(v[k].to_bits()).to_le_bytes();
                },
            );
            assert_eq!(e, None);
            assert_eq!(
                x(&st, 0) as u64,
                want[mode][k].to_bits(),
                "imm {imm} {}",
                v[k]
            );
            let pe = if imm & 8 != 0 { 0 } else { 0x20 };
            assert_eq!(st.fpu.mxcsr & 0x3f, pe, "imm {imm}");
        }
    }
}

/// DAZ, FTZ, denormal results and their flags.
fn daz_ftz(hv: &dyn Hypervisor) {
    for (mxcsr, r0, r2, flags) in [
        (0x1f80u32, 1u32, 0x0000_0200u32, 0x02u32), // denormal + 0; 2^-100 * 2^-40 exact
        (0x1fc0, 0, 0x0000_0200, 0x00),             // DAZ
        (0x9f80, 0, 0, 0x32), // FTZ: tiny results (exact ones too) are 0, UE|PE (and DE)
    ] {
        let (st, e) = user_run(
            hv,
            |a| {
                a.addss(xmm0, xmm1)?;
                a.mulss(xmm2, xmm3)
            },
            |st| {
                st.fpu.mxcsr = mxcsr;
                st.fpu.xmm[1] = 1u128.to_le_bytes();
                st.fpu.xmm[2] = u128::from(2f32.powi(-100).to_bits()).to_le_bytes();
                st.fpu.xmm[3] = u128::from(2f32.powi(-40).to_bits()).to_le_bytes();
            },
        );
        assert_eq!(e, None);
        assert_eq!(x(&st, 0) as u32, r0, "mxcsr {mxcsr:#x}");
        assert_eq!(x(&st, 2) as u32, r2, "mxcsr {mxcsr:#x}");
        assert_eq!(st.fpu.mxcsr & 0x3f, flags, "mxcsr {mxcsr:#x}");
    }
}

/// NaN selection and quieting, the default NaN, MIN/MAX special cases, and an unmasked
/// exception (#XM, destination unchanged).
fn nan_rules_and_xm(hv: &dyn Hypervisor) {
    let q1 = 0x7ff8_0000_0000_0001u128;
    let q2 = 0xfff8_0000_0000_0002u128;
    let s1 = 0x7ff0_0000_0000_0003u128;
    let one = u128::from(1f64.to_bits());
    let inf = u128::from(f64::INFINITY.to_bits());
    let (st, e) = user_run(
        hv,
        |a| {
            a.addsd(xmm0, xmm1)?;
            a.addsd(xmm2, xmm3)?;
            a.subsd(xmm4, xmm5)?;
            a.maxsd(xmm6, xmm7)?;
            a.minsd(xmm8, xmm9)?;
            a.minsd(xmm10, xmm11)
        },
        |st| {
            for (k, v) in [
                (0, q1),
                (1, q2),
                (2, one),
                (3, s1),
                (4, inf),
                (5, inf),
                (6, q1),
                (7, one),
                (8, u128::from((-0f64).to_bits())),
                (9, 0),
                (10, one),
                (11, s1),
            ] {
                st.fpu.xmm[k] = v.to_le_bytes();
            }
        },
    );
    assert_eq!(e, None);
    assert_eq!(x(&st, 0), q1);
    assert_eq!(x(&st, 2), s1 | (1 << 51));
    assert_eq!(x(&st, 4), 0xfff8_0000_0000_0000);
    assert_eq!(x(&st, 6), one);
    assert_eq!(x(&st, 8), 0);
    assert_eq!(x(&st, 10), s1);
    assert_eq!(st.fpu.mxcsr & 0x3f, 1);
    let (st, e) = user_run(
        hv,
        |a| a.divss(xmm0, xmm1),
        |st| {
            st.fpu.mxcsr = 0x1f80 & !(1 << 9);
            st.fpu.xmm[0] = u128::from(1f32.to_bits()).to_le_bytes();
        },
    );
    assert_eq!(e, Some(19));
    assert_eq!(x(&st, 0), u128::from(1f32.to_bits()));
    assert_eq!(st.fpu.mxcsr & 0x3f, 4);
}

conformance!(
    sse_basics,
    cmpxchg16b,
    cmpxchg16b_misaligned_raises_gp,
    fp_rounding_modes,
    roundsd_modes,
    daz_ftz,
    nan_rules_and_xm,
    dpps_dppd_unmasked_invalid_in_sum
);

/// Random MMX/SSE blocks from random FP states: KVM (the host CPU) against emu, bit for bit.
/// `ANYVISOR_SSE_DIFF_BLOCKS` or `ANYVISOR_DIFF_BLOCKS` (default 400) and
/// `ANYVISOR_SSE_DIFF_SEED` or `ANYVISOR_DIFF_SEED` choose the run.
#[test]
fn sse_differential() {
    let count = conformance::diff_blocks("ANYVISOR_SSE_DIFF_BLOCKS", 400);
    let seed = conformance::diff_seed("ANYVISOR_SSE_DIFF_SEED", 0x55e_5eed);
    let Some(report) = conformance::diff_sse::differential(seed, count, 10) else {
        return;
    };
    let report = report.expect("differential run");
    println!(
        "sse differential: seed {seed:#x}: {} blocks ({} ran to their end, {} ended in the #PF of an operand crossing into the unmapped page), {} instructions, {} divergences, {} known (misaligned #GP seen as #UD through PVM)",
        report.blocks,
        report.completed,
        report.page_faults,
        report.instructions,
        report.divergences.len(),
        report.known.len()
    );
    if let Some(d) = report.known.first() {
        println!(
            "NOTE: known PVM difference (not emu), block {}: {}",
            d.block, d.what
        );
    }
    for d in &report.divergences {
        println!("{d}\n");
    }
    assert_eq!(report.divergences.len(), 0);
}

/// The SSE comparison can fail: one changed XMM bit, MXCSR flag or x87 tag is reported.
#[test]
fn sse_differential_detects_a_difference() {
    use conformance::diff_sse::{Runner, codes, compare, generate};
    let codes = codes();
    let block = generate(&codes, 1, 0, 4).unwrap();
    let mut r = Runner::new(&emu()).unwrap();
    let a = r.run(&block).unwrap();
    let b = r.run(&block).unwrap();
    assert_eq!(compare(&a, &b), None, "deterministic");
    let mut c = b.clone();
    c.fpu.xmm[5][3] ^= 0x10;
    assert!(compare(&a, &c).is_some());
    let mut c = b.clone();
    c.fpu.mxcsr ^= 0x20;
    assert!(compare(&a, &c).is_some());
    let mut c = b.clone();
    c.fpu.ftw ^= 1;
    assert!(compare(&a, &c).is_some());
    let mut c = b;
    c.fpu.st[3][9] ^= 1;
    assert!(compare(&a, &c).is_some());
}

/// Packs four f32 into an XMM value.
fn f4(v: [f32; 4]) -> u128 {
    v.iter()
        .rev()
        .fold(0u128, |acc, f| (acc << 32) | u128::from(f.to_bits()))
}

/// Packs two f64 into an XMM value.
fn d2(v: [f64; 2]) -> u128 {
    (u128::from(v[1].to_bits()) << 64) | u128::from(v[0].to_bits())
}

/// DPPS/DPPD with an unmasked invalid operation in their sums (differential seed 0x10006,
/// block 36163): the products are a finished step, so their masked flags stay recorded (PE,
/// OE of an overflowed product) beside IE when the sum traps; the destination is unchanged.
/// HADDPS/HSUBPD are one step: the other element's PE is not recorded beside IE.
fn dpps_dppd_unmasked_invalid_in_sum(hv: &dyn Hypervisor) {
    let inf = f32::INFINITY;
    // (instruction: 0 DPPS, 1 DPPD, 2 HADDPS, 3 HSUBPD; xmm0; xmm1; MXCSR after the #XM)
    let cases: [(u8, u128, u128, u32); 6] = [
        // Products: inf, -inf, 1.1*1.1 (inexact), 0; the first sums: inf + -inf.
        (
            0,
            f4([inf, -inf, 1.1, 0.0]),
            f4([1.0, 1.0, 1.1, 0.0]),
            0x1f21,
        ),
        // Exact products; the trapping sums: inf + -inf beside 1.3 + 1.1 (inexact).
        (0, f4([inf, -inf, 1.1, 1.3]), f4([1.0; 4]), 0x1f01),
        // Products: 1e300 * 1e300 overflows (OE, PE), -inf; their sum is invalid.
        (1, d2([1e300, f64::NEG_INFINITY]), d2([1e300, 1.0]), 0x1f29),
        // Exact products; the sum is invalid.
        (
            1,
            d2([f64::INFINITY, f64::NEG_INFINITY]),
            d2([1.0, 1.0]),
            0x1f01,
        ),
        // inf + -inf beside 1.1 + 1.3 (inexact).
        (2, f4([inf, -inf, 1.1, 1.3]), f4([0.0; 4]), 0x1f01),
        // inf - inf beside 1 - 1e-30 (inexact).
        (
            3,
            d2([f64::INFINITY, f64::INFINITY]),
            d2([1.0, 1e-30]),
            0x1f01,
        ),
    ];
    for (k, (op, a, b, want)) in cases.into_iter().enumerate() {
        let (st, e) = user_run(
            hv,
            |a| match op {
                0 => a.dpps(xmm0, xmm1, 0xff),
                1 => a.dppd(xmm0, xmm1, 0x33),
                2 => a.haddps(xmm0, xmm1),
                _ => a.hsubpd(xmm0, xmm1),
            },
            |st| {
                st.fpu.mxcsr = 0x1f00; // IM clear
                st.fpu.xmm[0] = a.to_le_bytes();
                st.fpu.xmm[1] = b.to_le_bytes();
            },
        );
        assert_eq!(e, Some(19), "case {k}: #XM");
        assert_eq!(x(&st, 0), a, "case {k}: destination unchanged");
        // Measured on the host CPU.
        assert_eq!(st.fpu.mxcsr, want, "case {k}: MXCSR");
    }
}
