//! AVX, AVX2, FMA, F16C and XSAVE at CPL 3 on emu (`portable-v3`) and KVM (the host CPU runs
//! the code: the hardware is the oracle), and the AVX differential run.
//!
//! On KVM the guest keeps the portable model (this host's KVM cannot present XSAVE), but its
//! user-mode code runs under the host's CR4.OSXSAVE and XCR0, so VEX and XSAVE execute natively.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use conformance::{CODE, DATA, Guest, Outcome, SMALL, conformance, diff_avx};
use hv::{CpuModel, Hypervisor};
use iced_x86::code_asm::*;

conformance!(
    upper_halves_and_vzeroupper,
    fma_and_f16c_results,
    gather_fault_keeps_progress,
    xsave_header_tracks_avx_in_use,
    maskmov_faults,
    overflow_in_directed_modes,
    vex_unmasked_invalid_keeps_finished_steps,
);

/// A guest for `hv` with AVX usable at CPL 3 (on emu: `portable-v3`, CR4.OSXSAVE, XCR0 = 7),
/// running `code` from [`CODE`] at CPL 3. The program ends with `ud2`.
fn avx_guest(hv: &dyn Hypervisor, code: &[u8]) -> Guest {
    let emu = hv.kind() == hv::BackendKind::Emu;
    let model = if emu {
        CpuModel::portable_v3()
    } else {
        CpuModel::portable()
    };
    let mut g = Guest::with_model(hv, conformance::DEFAULT_MIB, model).unwrap();
    g.load_user(code).unwrap();
    if emu {
        let mut st = g.vcpu.state().unwrap();
        st.sregs.cr4 |= 1 << 18;
        st.xcr0 = 7;
        st.xsave_ext = vec![0; 64 + 256];
        g.vcpu.set_state(&st).unwrap();
    }
    g
}

/// Runs to the final `ud2` (at `CODE + len - 2`); panics on any other stop.
fn run_to_end(g: &mut Guest, len: usize) -> Outcome {
    let o = g.go();
    let e = o.exception.expect("the program ends with ud2");
    assert_eq!(
        (e.vector, e.rip),
        (6, CODE + len as u64 - 2),
        "stopped early: {e:?}"
    );
    o
}

fn u32s(g: &Guest, addr: u64, n: usize) -> Vec<u32> {
    g.read(addr, 4 * n)
        .unwrap()
        .chunks(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn put_u32s(g: &Guest, addr: u64, v: &[u32]) {
    let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    g.write(addr, &b).unwrap();
}

fn upper_halves_and_vzeroupper(hv: &dyn Hypervisor) {
    let code = conformance::asm(|a| {
        a.mov(rdi, DATA)?;
        a.vmovdqu(ymm1, ymmword_ptr(rdi))?;
        a.vmovdqu(ymm3, ymmword_ptr(rdi))?;
        a.vmovdqu(ymm5, ymmword_ptr(rdi))?;
        a.movaps(xmm1, xmm2)?;
        a.vpaddd(xmm3, xmm3, xmm3)?;
        a.vpermq(ymm6, ymm5, 0x1b)?;
        a.vmovdqu(ymmword_ptr(rdi + 0x40), ymm1)?;
        a.vmovdqu(ymmword_ptr(rdi + 0x60), ymm3)?;
        a.vmovdqu(ymmword_ptr(rdi + 0xa0), ymm6)?;
        a.vzeroupper()?;
        a.vmovdqu(ymmword_ptr(rdi + 0x80), ymm5)?;
        a.ud2()
    });
    let mut g = avx_guest(hv, &code);
    put_u32s(&g, DATA, &[1, 2, 3, 4, 5, 6, 7, 8]);
    put_u32s(&g, DATA + 0x40, &[0xee; 24]);
    run_to_end(&mut g, code.len());
    assert_eq!(u32s(&g, DATA + 0x40, 8), vec![0, 0, 0, 0, 5, 6, 7, 8]);
    assert_eq!(u32s(&g, DATA + 0x60, 8), vec![2, 4, 6, 8, 0, 0, 0, 0]);
    assert_eq!(u32s(&g, DATA + 0x80, 8), vec![1, 2, 3, 4, 0, 0, 0, 0]);
    assert_eq!(u32s(&g, DATA + 0xa0, 8), vec![7, 8, 5, 6, 3, 4, 1, 2]);
}

fn fma_and_f16c_results(hv: &dyn Hypervisor) {
    let code = conformance::asm(|a| {
        a.mov(rdi, DATA)?;
        a.vmovsd(xmm0, qword_ptr(rdi))?;
        a.vmovsd(xmm1, qword_ptr(rdi + 8))?;
        a.vmovsd(xmm2, qword_ptr(rdi + 16))?;
        a.vfmadd231sd(xmm2, xmm0, xmm1)?;
        a.vmovsd(qword_ptr(rdi + 0x40), xmm2)?;
        a.vldmxcsr(dword_ptr(rdi + 0x30))?;
        a.vmovups(xmm3, xmmword_ptr(rdi + 0x20))?;
        a.vcvtps2ph(qword_ptr(rdi + 0x48), xmm3, 4)?; // MXCSR rounding (up)
        a.vcvtph2ps(xmm4, qword_ptr(rdi + 0x48))?;
        a.vmovups(xmmword_ptr(rdi + 0x50), xmm4)?;
        a.vstmxcsr(dword_ptr(rdi + 0x60))?;
        a.ud2()
    });
    let mut g = avx_guest(hv, &code);
    let e = 2f64.powi(-30);
    for (k, v) in [1.0 + e, 1.0 - e, -1.0].iter().enumerate() {
        g.write_u64(DATA + 8 * k as u64, v.to_bits()).unwrap();
    }
    let x = 1.0 + 2f32.powi(-11);
    put_u32s(
        &g,
        DATA + 0x20,
        &[
            x.to_bits(),
            65520f32.to_bits(),
            (-2.5f32).to_bits(),
            1e-9f32.to_bits(),
        ],
    );
    put_u32s(&g, DATA + 0x30, &[0x1f80 | (2 << 13)]);
    run_to_end(&mut g, code.len());
    assert_eq!(
        f64::from_bits(g.read_u64(DATA + 0x40).unwrap()),
        -(2f64.powi(-60))
    );
    let r = u32s(&g, DATA + 0x50, 4);
    assert_eq!(r[0], (1.0f32 + 2f32.powi(-10)).to_bits());
    assert_eq!(r[1], f32::INFINITY.to_bits());
    assert_eq!(r[2], (-2.5f32).to_bits());
    assert_eq!(
        r[3],
        2f32.powi(-24).to_bits(),
        "tiny rounds up to the least subnormal half"
    );
    // PE, OE and UE were raised (masked).
    assert_eq!(u32s(&g, DATA + 0x60, 1)[0] & 0x3f, 0x38);
}

fn gather_fault_keeps_progress(hv: &dyn Hypervisor) {
    let code = conformance::asm(|a| {
        a.mov(rsi, SMALL)?;
        a.mov(rdi, DATA)?;
        a.vmovdqu(ymm1, ymmword_ptr(rdi))?;
        a.vpcmpeqd(ymm2, ymm2, ymm2)?;
        a.vpxor(ymm0, ymm0, ymm0)?;
        a.vpgatherdd_3(ymm0, dword_ptr(rsi + ymm1 * 4), ymm2)?;
        a.ud2()
    });
    let mut g = avx_guest(hv, &code);
    g.map_small().unwrap();
    put_u32s(&g, DATA, &[0, 1, 2, 1024, 4, 5, 6, 7]);
    put_u32s(&g, SMALL, &[100, 101, 102, 103, 104, 105, 106, 107]);
    g.write_u64(Guest::pte(SMALL + 0x1000), 0).unwrap();
    let o = g.go();
    let e = o.exception.expect("#PF");
    assert_eq!((e.vector, e.cr2), (14, SMALL + 0x1000));
    let xmm = |k: usize| u128::from_le_bytes(o.state.fpu.xmm[k]);
    assert_eq!(xmm(0) as u32, 100);
    assert_eq!((xmm(0) >> 64) as u32, 102, "loaded before the fault");
    assert_eq!(xmm(2) as u64, 0, "mask elements 0, 1 cleared");
    assert_eq!(
        (xmm(2) >> 96) as u32,
        u32::MAX,
        "the faulting element's mask stays set"
    );
}

/// XSAVE's XSTATE_BV[2] follows whether an upper half is in use; YMM_Hi128 is at 576; XSAVEC
/// writes XCOMP_BV = RFBM | bit 63 and the compacted AVX area at 576 too.
fn xsave_header_tracks_avx_in_use(hv: &dyn Hypervisor) {
    const A1: i32 = 0x21000;
    const A2: i32 = 0x22000;
    const A3: i32 = 0x23000;
    let code = conformance::asm(|a| {
        a.vmovdqu(ymm7, ymmword_ptr(DATA as i32))?;
        a.mov(eax, 4)?;
        a.xor(edx, edx)?;
        a.xsave64(ptr(A1))?;
        a.xsavec64(ptr(A2))?;
        a.vzeroupper()?;
        a.xsave64(ptr(A3))?;
        a.ud2()
    });
    let mut g = avx_guest(hv, &code);
    put_u32s(&g, DATA, &[1, 2, 3, 4, 5, 6, 7, 8]);
    run_to_end(&mut g, code.len());
    let q = |a: u64| g.read_u64(a).unwrap();
    assert_eq!(q(0x21000 + 512), 4);
    assert_eq!(u32s(&g, 0x21000 + 576 + 7 * 16, 4), vec![5, 6, 7, 8]);
    assert_eq!(q(0x22000 + 512), 4);
    assert_eq!(q(0x22000 + 520), (1 << 63) | 4);
    assert_eq!(u32s(&g, 0x22000 + 576 + 7 * 16, 4), vec![5, 6, 7, 8]);
    assert_eq!(q(0x23000 + 512), 0, "vzeroupper: AVX state initial");
}

/// `ANYVISOR_AVX_DIFF_BLOCKS` or `ANYVISOR_DIFF_BLOCKS` blocks (default 300) from
/// `ANYVISOR_AVX_DIFF_SEED` or `ANYVISOR_DIFF_SEED`.
#[test]
fn avx_differential() {
    let seed = conformance::diff_seed("ANYVISOR_AVX_DIFF_SEED", 0xa7c5);
    let count = conformance::diff_blocks("ANYVISOR_AVX_DIFF_BLOCKS", 300);
    crate::differential::checked("AVX", seed, diff_avx::differential(seed, count));
}

/// The generator covers the families: AVX, AVX2, FMA and F16C forms are all candidates.
#[test]
fn avx_candidates_cover_the_families() {
    use iced_x86::Mnemonic as M;
    let codes = diff_avx::candidates();
    for m in [
        M::Vaddps,
        M::Vpaddb,
        M::Vfmadd231ps,
        M::Vcvtps2ph,
        M::Vpermq,
        M::Vpsllvd,
        M::Vbroadcastss,
        M::Vperm2f128,
        M::Vmaskmovps,
        M::Vpblendvb,
    ] {
        assert!(codes.iter().any(|c| c.mnemonic() == m), "{m:?}");
    }
    println!("{} instruction forms", codes.len());
}

/// The comparison sees a one-bit difference in a YMM register dumped by the epilogue.
#[test]
fn avx_comparison_detects_a_ymm_difference() {
    let codes = diff_avx::candidates();
    let b = diff_avx::generate(&codes, 1, 0, 4).unwrap();
    let mut r = diff_avx::Runner::new(&conformance::emu()).unwrap();
    let a = r.run(&b).unwrap();
    let mut c = a.clone();
    c.scratch[0xc00 + 5] ^= 1; // YMM0, byte 5
    assert!(conformance::diff::compare(&b, &a, &a).is_none());
    let (what, _, _) = conformance::diff::compare(&b, &a, &c).expect("difference found");
    assert!(what.contains("0xc00"), "{what}");
}

/// A masked store or load whose operand crosses into an unmapped page: which elements fault and
/// the CR2 the CPU reports (measured on this Intel host). A store whose selected elements span
/// both pages reports the last byte of the highest selected element; otherwise CR2 is the
/// first faulting byte; elements left out by the mask never fault.
fn maskmov_faults(hv: &dyn Hypervisor) {
    /// (vector, error code, CR2).
    type End = (u8, u64, u64);
    // (store, dwords, displacement, mask of elements, expected end).
    let cases: [(bool, bool, i32, u8, End); 9] = [
        (true, true, 0x1ff7, 0x04, (14, 6, 0x22002)),
        (true, true, 0x1ff7, 0x0c, (14, 6, 0x22006)),
        (true, true, 0x1ff7, 0x44, (14, 6, 0x22012)),
        (true, true, 0x1ff7, 0x80, (14, 6, 0x22013)),
        (true, true, 0x1ff8, 0x44, (14, 6, 0x22000)),
        (true, false, 0x1ff8, 0x04, (14, 6, 0x22008)),
        (true, false, 0x1ff8, 0x01, (6, 0, 0)),
        (false, true, 0x1ff7, 0x44, (14, 4, 0x22000)),
        (false, true, 0x1ffc, 0x20, (14, 4, 0x22010)),
    ];
    for (store, ps, off, mask, want) in cases {
        let code = conformance::asm(|a| {
            a.mov(r15, DATA)?;
            a.vmovdqu(ymm1, ymmword_ptr(r15 + 0x100))?;
            match (store, ps) {
                (true, true) => a.vmaskmovps(ymmword_ptr(r15 + off), ymm1, ymm2)?,
                (true, false) => a.vmaskmovpd(ymmword_ptr(r15 + off), ymm1, ymm2)?,
                _ => a.vmaskmovps(ymm3, ymm1, ymmword_ptr(r15 + off))?,
            }
            a.ud2()
        });
        let mut g = avx_guest(hv, &code);
        g.map_low_4k(&[conformance::GUARD]).unwrap();
        let n = if ps { 8 } else { 4 };
        let esz = 32 / n;
        let mut m = vec![0u8; 32];
        for e in 0..n {
            if mask & (1 << e) != 0 {
                m[e * esz + esz - 1] = 0x80;
            }
        }
        g.write(DATA + 0x100, &m).unwrap();
        g.write(DATA + 0x1f00, &[0x5a; 256]).unwrap();
        let e = g.go().exception.expect("an exception");
        let got = (
            e.vector,
            e.error_code,
            if e.vector == 14 { e.cr2 } else { 0 },
        );
        assert_eq!(
            got, want,
            "store={store} dwords={ps} disp={off:#x} mask={mask:#x}"
        );
        // Nothing of a faulting store is written.
        if e.vector != 14 {
            continue;
        }
        assert_eq!(
            g.read(DATA + 0x1f00, 256).unwrap(),
            vec![0x5a; 256],
            "store={store} dwords={ps} disp={off:#x} mask={mask:#x}"
        );
    }
}

/// A result whose round-to-nearest value overflows but whose exact value is below 2^128: in a
/// mode rounding toward zero for its sign it is ±MAX with PE and no OE (emu raised OE). For
/// ADDSS and VFMADD231SS; (FMA, MXCSR.RC, c, a, b, expected result, expected flags).
fn overflow_in_directed_modes(hv: &dyn Hypervisor) {
    const MAX: u32 = 0x7f7f_ffff;
    let cases: [(bool, u32, u32, u32, u32, u32, u32); 7] = [
        (true, 3, MAX, 0x3309_4aad, MAX, MAX, 0x20),
        (true, 0, MAX, 0x3309_4aad, MAX, 0x7f80_0000, 0x28),
        (false, 3, MAX, 0x7300_0000, 0, MAX, 0x20),
        (false, 3, MAX, 0x7380_0000, 0, MAX, 0x28),
        (false, 2, 0xff7f_ffff, 0xf300_0000, 0, 0xff7f_ffff, 0x20),
        (false, 1, 0xff7f_ffff, 0xf300_0000, 0, 0xff80_0000, 0x28),
        (false, 1, MAX, 0x7300_0000, 0, MAX, 0x20),
    ];
    for (fma, rc, c, a, b, want, flags) in cases {
        let code = conformance::asm(|asm| {
            asm.mov(rdi, DATA)?;
            asm.ldmxcsr(dword_ptr(rdi + 0x40))?;
            asm.movss(xmm0, dword_ptr(rdi))?;
            asm.movss(xmm1, dword_ptr(rdi + 4))?;
            asm.movss(xmm2, dword_ptr(rdi + 8))?;
            if fma {
                asm.vfmadd231ss(xmm0, xmm1, xmm2)?;
            } else {
                asm.addss(xmm0, xmm1)?;
            }
            asm.movss(dword_ptr(rdi + 0x10), xmm0)?;
            asm.stmxcsr(dword_ptr(rdi + 0x44))?;
            asm.ud2()
        });
        let mut g = avx_guest(hv, &code);
        put_u32s(&g, DATA, &[c, a, b]);
        put_u32s(&g, DATA + 0x40, &[0x1f80 | (rc << 13)]);
        let len = code.len();
        run_to_end(&mut g, len);
        let what = format!("fma={fma} rc={rc} c={c:#x} a={a:#x} b={b:#x}");
        assert_eq!(u32s(&g, DATA + 0x10, 1)[0], want, "{what}: result");
        assert_eq!(u32s(&g, DATA + 0x44, 1)[0] & 0x3f, flags, "{what}: flags");
    }
}

/// VDPPS/VDPPD and VADDPS with IM clear and an invalid operation (issue 11's DPPS divergence,
/// VEX forms): the instruction traps (#XM) with the destination unchanged; the flags of a
/// finished step (DPPS's products) stay recorded, the post-computation flags of the trapping
/// step do not.
fn vex_unmasked_invalid_keeps_finished_steps(hv: &dyn Hypervisor) {
    let inf = f32::INFINITY;
    let f = |v: [f32; 4]| v.map(f32::to_bits);
    let d = |v: [f64; 2]| {
        let [a, b] = v.map(f64::to_bits);
        [a as u32, (a >> 32) as u32, b as u32, (b >> 32) as u32]
    };
    // (instruction: 0 VDPPS, 1 VDPPD, 2 VADDPS; xmm0; xmm1; MXCSR after the #XM)
    let cases: [(u8, [u32; 4], [u32; 4], u32); 5] = [
        (0, f([inf, -inf, 1.1, 0.0]), f([1.0, 1.0, 1.1, 0.0]), 0x1f21),
        (0, f([inf, -inf, 1.1, 1.3]), f([1.0; 4]), 0x1f01),
        (1, d([1e300, f64::NEG_INFINITY]), d([1e300, 1.0]), 0x1f29),
        (
            1,
            d([f64::INFINITY, f64::NEG_INFINITY]),
            d([1.0, 1.0]),
            0x1f01,
        ),
        // One element invalid, the other inexact: only IE.
        (2, f([inf, 1.1, 0.0, 0.0]), f([-inf, 1.3, 0.0, 0.0]), 0x1f01),
    ];
    for (k, (op, a, b, want)) in cases.into_iter().enumerate() {
        let code = conformance::asm(|asm| {
            asm.mov(rdi, DATA)?;
            asm.ldmxcsr(dword_ptr(rdi + 0x40))?;
            asm.movups(xmm0, xmmword_ptr(rdi))?;
            asm.movups(xmm1, xmmword_ptr(rdi + 0x10))?;
            match op {
                0 => asm.vdpps(xmm0, xmm0, xmm1, 0xff)?,
                1 => asm.vdppd(xmm0, xmm0, xmm1, 0x33)?,
                _ => asm.vaddps(xmm0, xmm0, xmm1)?,
            }
            asm.ud2()
        });
        let mut g = avx_guest(hv, &code);
        put_u32s(&g, DATA, &a);
        put_u32s(&g, DATA + 0x10, &b);
        put_u32s(&g, DATA + 0x40, &[0x1f00]);
        let o = g.go();
        let e = o.exception.expect("an exception");
        assert_eq!(e.vector, 19, "case {k}: #XM");
        let x0: Vec<u32> = o.state.fpu.xmm[0]
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(x0, a, "case {k}: destination unchanged");
        assert_eq!(o.state.fpu.mxcsr, want, "case {k}: MXCSR");
    }
}
