//! AVX, AVX2, FMA, F16C, VEX AES/PCLMULQDQ and the XSAVE family under `portable-v3`: register
//! file (upper-half zeroing), permutes, gathers with a fault, FMA's single rounding, F16C,
//! XSAVE/XSAVEC/XSAVEOPT/XRSTOR formats, XGETBV/XSETBV, CPUID's OSXSAVE and leaf 0xD, the
//! #UD/#GP/#NM conditions, and the YMM state in `CpuState::xsave_ext`.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use crate::common;

use common::*;
use hv::{CpuModel, VcpuExit};
use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress};

fn v3_guest(code: &[u8]) -> Guest {
    guest_with_model(&emu(), code, 1, Some(2_000_000), CpuModel::portable_v3())
}

/// CR4.OSXSAVE, then XCR0 = x87|SSE|AVX.
fn enable_avx(a: &mut CodeAssembler) -> Result<(), iced_x86::IcedError> {
    a.mov(rax, cr4)?;
    a.or(rax, 1 << 18)?;
    a.mov(cr4, rax)?;
    a.xor(ecx, ecx)?;
    a.mov(eax, 7)?;
    a.xor(edx, edx)?;
    a.xsetbv()
}

fn write_bytes(g: &Guest, addr: u64, b: &[u8]) {
    g.mem.write_slice(b, GuestAddress(addr)).unwrap();
}

fn read_bytes(g: &Guest, addr: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    g.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

fn u32s(g: &Guest, addr: u64, n: usize) -> Vec<u32> {
    read_bytes(g, addr, 4 * n)
        .chunks(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn put_u32s(g: &Guest, addr: u64, v: &[u32]) {
    let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    write_bytes(g, addr, &b);
}

fn run_clean(g: &mut Guest) {
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(g.exception(), None, "unexpected exception");
}

#[test]
fn vex128_zeroes_upper_half_legacy_sse_preserves_it_vzeroupper_clears() {
    let code = asm(|a| {
        enable_avx(a)?;
        a.mov(rdi, DATA)?;
        a.vmovdqu(ymm1, ymmword_ptr(rdi))?;
        a.vmovdqu(ymm3, ymmword_ptr(rdi))?;
        a.vmovdqu(ymm5, ymmword_ptr(rdi))?;
        // Legacy SSE write: ymm1[255:128] kept.
        a.movaps(xmm1, xmm2)?;
        // VEX.128 write: ymm3[255:128] zeroed.
        a.vpaddd(xmm3, xmm3, xmm3)?;
        a.vmovdqu(ymmword_ptr(rdi + 0x40), ymm1)?;
        a.vmovdqu(ymmword_ptr(rdi + 0x60), ymm3)?;
        // XINUSE[2] is set while an upper half is non-zero.
        a.mov(ecx, 1)?;
        a.xgetbv()?;
        a.mov(r8, rax)?;
        a.vzeroupper()?;
        a.vmovdqu(ymmword_ptr(rdi + 0x80), ymm5)?;
        a.mov(ecx, 1)?;
        a.xgetbv()?;
        a.mov(r9, rax)?;
        a.hlt()
    });
    let mut g = v3_guest(&code);
    let pat: Vec<u32> = (1..=8).collect();
    put_u32s(&g, DATA, &pat);
    run_clean(&mut g);
    let y1 = u32s(&g, DATA + 0x40, 8);
    assert_eq!(&y1[..4], &[0, 0, 0, 0]);
    assert_eq!(&y1[4..], &[5, 6, 7, 8], "legacy SSE keeps bits 255:128");
    assert_eq!(u32s(&g, DATA + 0x60, 8), vec![2, 4, 6, 8, 0, 0, 0, 0]);
    assert_eq!(u32s(&g, DATA + 0x80, 8), vec![1, 2, 3, 4, 0, 0, 0, 0]);
    let r = g.regs();
    assert_eq!(r.r8 & 4, 4, "XINUSE[2] with live upper halves");
    assert_eq!(r.r9 & 4, 0, "XINUSE[2] after vzeroupper");
}

#[test]
fn avx2_permutes_broadcasts_blends_and_variable_shifts() {
    let code = asm(|a| {
        enable_avx(a)?;
        a.mov(rdi, DATA)?;
        a.vmovdqu(ymm0, ymmword_ptr(rdi))?;
        a.vpermq(ymm1, ymm0, 0x1b)?;
        a.vmovdqu(ymmword_ptr(rdi + 0x40), ymm1)?;
        a.vmovdqu(ymm2, ymmword_ptr(rdi + 0x20))?; // indices
        a.vpermd(ymm3, ymm2, ymm0)?;
        a.vmovdqu(ymmword_ptr(rdi + 0x60), ymm3)?;
        a.vpbroadcastd(ymm4, dword_ptr(rdi + 4))?;
        a.vmovdqu(ymmword_ptr(rdi + 0x80), ymm4)?;
        a.vperm2i128(ymm5, ymm0, ymm4, 0x21)?;
        a.vmovdqu(ymmword_ptr(rdi + 0xa0), ymm5)?;
        a.vpblendd(ymm6, ymm0, ymm4, 0xf0)?;
        a.vmovdqu(ymmword_ptr(rdi + 0xc0), ymm6)?;
        a.vpsllvd(ymm7, ymm0, ymm2)?;
        a.vmovdqu(ymmword_ptr(rdi + 0xe0), ymm7)?;
        a.vextracti128(xmm8, ymm0, 1)?;
        a.vinserti128(ymm9, ymm4, xmm8, 0)?;
        a.vmovdqu(ymmword_ptr(rdi + 0x100), ymm9)?;
        a.vpunpcklbw(ymm10, ymm0, ymm0)?; // in-lane
        a.vmovdqu(ymmword_ptr(rdi + 0x120), ymm10)?;
        a.hlt()
    });
    let mut g = v3_guest(&code);
    put_u32s(&g, DATA, &[10, 11, 12, 13, 14, 15, 16, 17]);
    put_u32s(&g, DATA + 0x20, &[7, 6, 5, 4, 3, 2, 1, 40]);
    run_clean(&mut g);
    assert_eq!(
        u32s(&g, DATA + 0x40, 8),
        vec![16, 17, 14, 15, 12, 13, 10, 11]
    );
    assert_eq!(
        u32s(&g, DATA + 0x60, 8),
        vec![17, 16, 15, 14, 13, 12, 11, 10]
    );
    assert_eq!(u32s(&g, DATA + 0x80, 8), vec![11; 8]);
    assert_eq!(
        u32s(&g, DATA + 0xa0, 8),
        vec![14, 15, 16, 17, 11, 11, 11, 11]
    );
    assert_eq!(
        u32s(&g, DATA + 0xc0, 8),
        vec![10, 11, 12, 13, 11, 11, 11, 11]
    );
    assert_eq!(
        u32s(&g, DATA + 0xe0, 8),
        vec![
            10 << 7,
            11 << 6,
            12 << 5,
            13 << 4,
            14 << 3,
            15 << 2,
            16 << 1,
            0
        ],
        "count 40 > 31 gives 0"
    );
    assert_eq!(
        u32s(&g, DATA + 0x100, 8),
        vec![14, 15, 16, 17, 11, 11, 11, 11]
    );
    let lo = u32s(&g, DATA + 0x120, 8);
    assert_eq!(lo[0], 0x0a0a);
    assert_eq!(lo[4], 0x0e0e, "the upper lane interleaves its own low half");
}

#[test]
fn gather_fault_leaves_progress_and_mask_then_completes() {
    let code = asm(|a| {
        enable_avx(a)?;
        a.mov(rsi, SMALL)?;
        a.vmovdqu(ymm1, ymmword_ptr(DATA as i32))?; // dword indices
        a.vpcmpeqd(ymm2, ymm2, ymm2)?; // mask: all
        a.vpxor(ymm0, ymm0, ymm0)?;
        a.vgatherdps_3(ymm0, dword_ptr(rsi + ymm1 * 4), ymm2)?;
        a.hlt()
    });
    let mut g = v3_guest(&code);
    g.map_small();
    // Element 3 reads the second page, which is not present.
    put_u32s(&g, DATA, &[0, 1, 2, 1024, 4, 5, 6, 7]);
    put_u32s(&g, SMALL, &[100, 101, 102, 103, 104, 105, 106, 107]);
    g.write_u64(g.pte(SMALL + 0x1000), 0);
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(g.exception().map(|e| e.0), Some(14));
    let s = g.state();
    assert_eq!(s.sregs.cr2, SMALL + 0x1000);
    let xmm = |k: usize| u128::from_le_bytes(s.fpu.xmm[k]);
    let d = xmm(0);
    assert_eq!(d as u32, 100);
    assert_eq!(
        (d >> 64) as u32,
        102,
        "elements before the fault are loaded"
    );
    let m = xmm(2);
    assert_eq!(m as u64, 0, "mask elements 0 and 1 cleared");
    assert_eq!((m >> 64) as u32, 0, "mask element 2 cleared");
    assert_eq!((m >> 96) as u32, u32::MAX, "mask element 3 still set");
    // Restart after mapping the page: completes, mask all zero.
    g.write_u64(g.pte(SMALL + 0x1000), (SMALL + 0x1000) | 3);
    put_u32s(&g, SMALL + 0x1000, &[555]);
    let code2 = asm(|a| {
        a.mov(rsi, SMALL)?;
        a.vgatherdps_3(ymm0, dword_ptr(rsi + ymm1 * 4), ymm2)?;
        a.vmovdqu(ymmword_ptr(DATA as i32 + 0x40), ymm0)?;
        a.vmovdqu(ymmword_ptr(DATA as i32 + 0x60), ymm2)?;
        a.hlt()
    });
    g.write_code(CODE, &code2);
    let mut st = g.state();
    st.regs.rip = CODE;
    st.mp_state = hv::MpState::Runnable;
    g.set_state(&st);
    g.write_u64(EXC, 0);
    run_clean(&mut g);
    assert_eq!(
        u32s(&g, DATA + 0x40, 8),
        vec![100, 101, 102, 555, 104, 105, 106, 107]
    );
    assert_eq!(u32s(&g, DATA + 0x60, 8), vec![0; 8]);
}

#[test]
fn fma_rounds_once_and_follows_mxcsr() {
    let code = asm(|a| {
        enable_avx(a)?;
        a.mov(rdi, DATA)?;
        a.vmovsd(xmm0, qword_ptr(rdi))?; // a
        a.vmovsd(xmm1, qword_ptr(rdi + 8))?; // b
        a.vmovsd(xmm2, qword_ptr(rdi + 16))?; // c
        a.vmovapd(xmm3, xmm2)?;
        a.vfmadd231sd(xmm3, xmm0, xmm1)?; // a*b + c, fused
        a.vmovsd(qword_ptr(rdi + 0x40), xmm3)?;
        a.vmulsd(xmm4, xmm0, xmm1)?;
        a.vaddsd(xmm4, xmm4, xmm2)?; // two roundings
        a.vmovsd(qword_ptr(rdi + 0x48), xmm4)?;
        // Single precision 1 + 2^-30 with round-up: the next float above 1.
        a.vldmxcsr(dword_ptr(rdi + 0x30))?;
        a.vmovss(xmm5, dword_ptr(rdi + 0x20))?;
        a.vmovss(xmm6, dword_ptr(rdi + 0x24))?;
        a.vfmadd213ss(xmm5, xmm5, xmm6)?; // 1*1 + 2^-30
        a.vmovss(dword_ptr(rdi + 0x50), xmm5)?;
        a.vstmxcsr(dword_ptr(rdi + 0x54))?;
        a.hlt()
    });
    let mut g = v3_guest(&code);
    let e = 2f64.powi(-30);
    for (k, v) in [1.0 + e, 1.0 - e, -1.0].iter().enumerate() {
        g.write_u64(DATA + 8 * k as u64, v.to_bits());
    }
    put_u32s(&g, DATA + 0x20, &[1f32.to_bits(), 2f32.powi(-30).to_bits()]);
    put_u32s(&g, DATA + 0x30, &[0x1f80 | (2 << 13)]);
    run_clean(&mut g);
    assert_eq!(f64::from_bits(g.read_u64(DATA + 0x40)), -(2f64.powi(-60)));
    assert_eq!(f64::from_bits(g.read_u64(DATA + 0x48)), 0.0);
    let r = u32s(&g, DATA + 0x50, 2);
    assert_eq!(r[0], 1f32.next_up().to_bits(), "rounded up");
    assert_eq!(r[1] & 0x20, 0x20, "precision flag");
}

#[test]
fn f16c_conversions_with_rounding_immediate() {
    let code = asm(|a| {
        enable_avx(a)?;
        a.mov(rdi, DATA)?;
        a.vmovups(xmm0, xmmword_ptr(rdi))?;
        a.vcvtps2ph(qword_ptr(rdi + 0x20), xmm0, 0)?; // nearest
        a.vcvtps2ph(qword_ptr(rdi + 0x28), xmm0, 2)?; // up
        a.vcvtph2ps(ymm1, xmmword_ptr(rdi + 0x40))?;
        a.vmovups(ymmword_ptr(rdi + 0x60), ymm1)?;
        a.hlt()
    });
    let mut g = v3_guest(&code);
    let x = 1.0 + 2f32.powi(-11); // halfway between two halves
    put_u32s(
        &g,
        DATA,
        &[
            1f32.to_bits(),
            x.to_bits(),
            65520f32.to_bits(),
            (-2.5f32).to_bits(),
        ],
    );
    let halves: [u16; 8] = [
        0x3c00, 0xc000, 0x7c00, 0x0001, 0x7bff, 0x8000, 0x3555, 0xfe00,
    ];
    let hb: Vec<u8> = halves.iter().flat_map(|h| h.to_le_bytes()).collect();
    write_bytes(&g, DATA + 0x40, &hb);
    run_clean(&mut g);
    let h = |addr: u64| -> Vec<u16> {
        read_bytes(&g, addr, 8)
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect()
    };
    assert_eq!(h(DATA + 0x20), vec![0x3c00, 0x3c00, 0x7c00, 0xc100]);
    assert_eq!(h(DATA + 0x28), vec![0x3c00, 0x3c01, 0x7c00, 0xc100]);
    assert_eq!(
        u32s(&g, DATA + 0x60, 8),
        vec![
            0x3f80_0000,
            0xc000_0000,
            0x7f80_0000,
            0x3380_0000,
            0x477f_e000,
            0x8000_0000,
            0x3eaa_a000,
            0xffc0_0000
        ]
    );
}

#[test]
fn vex_aes_and_pclmul_match_the_legacy_forms() {
    let code = asm(|a| {
        enable_avx(a)?;
        a.mov(rdi, DATA)?;
        a.movdqu(xmm0, xmmword_ptr(rdi))?;
        a.movdqu(xmm1, xmmword_ptr(rdi + 16))?;
        a.vaesenc(xmm2, xmm0, xmm1)?;
        a.movdqa(xmm3, xmm0)?;
        a.aesenc(xmm3, xmm1)?;
        a.vpclmulqdq(xmm4, xmm0, xmm1, 0x11)?;
        a.movdqa(xmm5, xmm0)?;
        a.pclmulqdq(xmm5, xmm1, 0x11)?;
        a.movdqu(xmmword_ptr(rdi + 0x20), xmm2)?;
        a.movdqu(xmmword_ptr(rdi + 0x30), xmm3)?;
        a.movdqu(xmmword_ptr(rdi + 0x40), xmm4)?;
        a.movdqu(xmmword_ptr(rdi + 0x50), xmm5)?;
        a.hlt()
    });
    let mut g = v3_guest(&code);
    let b: Vec<u8> = (0..32u8)
        .map(|k| k.wrapping_mul(37).wrapping_add(5))
        .collect();
    write_bytes(&g, DATA, &b);
    run_clean(&mut g);
    assert_eq!(
        read_bytes(&g, DATA + 0x20, 16),
        read_bytes(&g, DATA + 0x30, 16)
    );
    assert_eq!(
        read_bytes(&g, DATA + 0x40, 16),
        read_bytes(&g, DATA + 0x50, 16)
    );
    assert_ne!(read_bytes(&g, DATA + 0x20, 16), read_bytes(&g, DATA, 16));
}

/// XSAVE (standard), XSAVEC (compacted), XSAVEOPT and XRSTOR of both, with the header rules.
#[test]
fn xsave_formats_and_xrstor() {
    const AREA: i32 = 0x30000;
    const AREA2: i32 = 0x31000;
    let code = asm(|a| {
        enable_avx(a)?;
        a.vmovdqu(ymm7, ymmword_ptr(DATA as i32))?;
        a.mov(eax, 7)?;
        a.xor(edx, edx)?;
        a.xsave64(ptr(AREA))?;
        a.xsavec64(ptr(AREA2))?;
        // Change ymm7, restore from the compacted image, store it again.
        a.vpxor(ymm7, ymm7, ymm7)?;
        a.mov(eax, 7)?;
        a.xrstor64(ptr(AREA2))?;
        a.vmovdqu(ymmword_ptr(DATA as i32 + 0x40), ymm7)?;
        // Restore from the standard image with XSTATE_BV[2] cleared: upper halves init (0).
        a.and(byte_ptr(AREA + 512), 0xfb)?;
        a.xrstor64(ptr(AREA))?;
        a.vmovdqu(ymmword_ptr(DATA as i32 + 0x60), ymm7)?;
        a.hlt()
    });
    let mut g = v3_guest(&code);
    put_u32s(&g, DATA, &[1, 2, 3, 4, 5, 6, 7, 8]);
    run_clean(&mut g);
    // (The program cleared the standard header's AVX bit before its second XRSTOR.)
    assert_eq!(g.read_u64(0x30000 + 512) & 4, 0);
    assert_eq!(g.read_u64(0x30000 + 520), 0, "standard XCOMP_BV");
    // YMM7's upper half at 576 + 7*16.
    assert_eq!(u32s(&g, 0x30000 + 576 + 7 * 16, 4), vec![5, 6, 7, 8]);
    assert_eq!(
        g.read_u64(0x31000 + 520),
        (1 << 63) | 7,
        "compacted XCOMP_BV"
    );
    assert_eq!(g.read_u64(0x31000 + 512) & 4, 4);
    assert_eq!(u32s(&g, 0x31000 + 576 + 7 * 16, 4), vec![5, 6, 7, 8]);
    assert_eq!(u32s(&g, DATA + 0x40, 8), vec![1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(u32s(&g, DATA + 0x60, 8), vec![1, 2, 3, 4, 0, 0, 0, 0]);
    // MXCSR is in the legacy region at 24.
    assert_eq!(u32s(&g, 0x30000 + 24, 1), vec![0x1f80]);
}

/// XSAVEOPT skips components in their initial state but still updates XSTATE_BV.
#[test]
fn xsaveopt_skips_initial_components() {
    let code = asm(|a| {
        enable_avx(a)?;
        a.vzeroupper()?;
        a.mov(eax, 7)?;
        a.xor(edx, edx)?;
        a.xsaveopt64(ptr(0x30000))?;
        a.hlt()
    });
    let mut g = v3_guest(&code);
    // Garbage where YMM_Hi128 goes, XSTATE_BV claiming AVX.
    write_bytes(&g, 0x30000 + 576, &[0xaa; 256]);
    g.write_u64(0x30000 + 512, 7);
    run_clean(&mut g);
    assert_eq!(g.read_u64(0x30000 + 512) & 4, 0, "AVX not in use");
    assert_eq!(
        read_bytes(&g, 0x30000 + 576, 4),
        vec![0xaa; 4],
        "not written"
    );
}

/// Runs `body` after enabling AVX (unless `enable` is false) and returns the recorded
/// exception vector and error code.
fn fault_of(
    model: CpuModel,
    enable: bool,
    body: impl Fn(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>,
) -> Option<(u8, u64)> {
    let code = asm(|a| {
        if enable {
            enable_avx(a)?;
        }
        body(a)?;
        a.hlt()
    });
    let mut g = guest_with_model(&emu(), &code, 1, Some(2_000_000), model);
    assert_eq!(g.run(), VcpuExit::Halted);
    g.exception()
}

#[test]
fn ud_gp_nm_conditions() {
    let v3 = CpuModel::portable_v3;
    // VEX without CR4.OSXSAVE: #UD.
    assert_eq!(
        fault_of(v3(), false, |a| a.vaddps(ymm0, ymm1, ymm2)),
        Some((6, 0))
    );
    // XGETBV without CR4.OSXSAVE: #UD.
    assert_eq!(fault_of(v3(), false, |a| a.xgetbv()), Some((6, 0)));
    // The v2 model: CR4.OSXSAVE is reserved (#GP), VEX is #UD.
    let set_osxsave = |a: &mut CodeAssembler| {
        a.mov(rax, cr4)?;
        a.or(rax, 1 << 18)?;
        a.mov(cr4, rax)
    };
    assert_eq!(
        fault_of(CpuModel::portable(), false, set_osxsave),
        Some((13, 0))
    );
    assert_eq!(
        fault_of(CpuModel::portable(), false, |a| a.vpaddd(xmm0, xmm1, xmm2)),
        Some((6, 0))
    );
    // XCR0 with AVX but not SSE, without x87, or with a bit the model lacks: #GP.
    for bad in [5u32, 6, 0x27] {
        let f = fault_of(v3(), true, move |a| {
            a.xor(ecx, ecx)?;
            a.mov(eax, bad)?;
            a.xor(edx, edx)?;
            a.xsetbv()
        });
        assert_eq!(f, Some((13, 0)), "XCR0 {bad:#x}");
    }
    // XGETBV of an unknown XCR: #GP.
    assert_eq!(
        fault_of(v3(), true, |a| {
            a.mov(ecx, 2)?;
            a.xgetbv()
        }),
        Some((13, 0))
    );
    // XCR0 = x87|SSE: VEX is #UD again.
    assert_eq!(
        fault_of(v3(), true, |a| {
            a.xor(ecx, ecx)?;
            a.mov(eax, 3)?;
            a.xor(edx, edx)?;
            a.xsetbv()?;
            a.vpaddd(xmm0, xmm1, xmm2)
        }),
        Some((6, 0))
    );
    // CR0.TS: #NM for VEX and XSAVE.
    let ts = |a: &mut CodeAssembler| {
        a.mov(rax, cr0)?;
        a.or(rax, 8)?;
        a.mov(cr0, rax)
    };
    assert_eq!(
        fault_of(v3(), true, move |a| {
            ts(a)?;
            a.vaddps(ymm0, ymm1, ymm2)
        }),
        Some((7, 0))
    );
    assert_eq!(
        fault_of(v3(), true, move |a| {
            ts(a)?;
            a.xsave64(ptr(0x30000))
        }),
        Some((7, 0))
    );
    // XSAVE to an area not 64-byte aligned: #GP. XRSTOR with a reserved header bit: #GP.
    assert_eq!(
        fault_of(v3(), true, |a| a.xsave64(ptr(0x30010))),
        Some((13, 0))
    );
    let code = asm(|a| {
        enable_avx(a)?;
        a.mov(eax, 7)?;
        a.xor(edx, edx)?;
        a.xrstor64(ptr(0x30000))?;
        a.hlt()
    });
    let mut g = v3_guest(&code);
    g.write_u64(0x30000 + 512, 8); // XSTATE_BV bit 3: not in XCR0
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(g.exception(), Some((13, 0)));
    // VMOVAPS on a misaligned address: #GP; VMOVUPS: fine.
    assert_eq!(
        fault_of(v3(), true, |a| a
            .vmovaps(ymm0, ymmword_ptr(DATA as i32 + 16))),
        Some((13, 0))
    );
    assert_eq!(
        fault_of(v3(), true, |a| a
            .vmovups(ymm0, ymmword_ptr(DATA as i32 + 16))),
        None
    );
    // Gather with the mask register equal to the destination: #UD.
    assert_eq!(
        fault_of(v3(), true, |a| a.vgatherdps_3(
            ymm0,
            dword_ptr(rsi + ymm1 * 4),
            ymm0
        )),
        Some((6, 0))
    );
}

#[test]
fn cpuid_follows_cr4_osxsave_and_xcr0() {
    let code = asm(|a| {
        a.mov(eax, 1)?;
        a.cpuid()?;
        a.mov(r8, rcx)?;
        enable_avx(a)?;
        a.mov(eax, 1)?;
        a.cpuid()?;
        a.mov(r9, rcx)?;
        a.mov(eax, 0xd)?;
        a.xor(ecx, ecx)?;
        a.cpuid()?;
        a.mov(r10, rbx)?;
        a.xor(ecx, ecx)?;
        a.mov(eax, 3)?;
        a.xor(edx, edx)?;
        a.xsetbv()?;
        a.mov(eax, 0xd)?;
        a.xor(ecx, ecx)?;
        a.cpuid()?;
        a.mov(r11, rbx)?;
        a.hlt()
    });
    let mut g = v3_guest(&code);
    run_clean(&mut g);
    let r = g.regs();
    assert_eq!(r.r8 & (1 << 27), 0);
    assert_eq!(r.r9 & (1 << 27), 1 << 27);
    assert_eq!(r.r10, 0x340);
    assert_eq!(r.r11, 0x240);
}

/// The YMM upper halves travel in `CpuState::xsave_ext` as hv-kvm lays it out (bytes 512.. of
/// a standard XSAVE image) and come back on another vCPU.
#[test]
fn ymm_state_round_trips_through_cpustate() {
    let code = asm(|a| {
        enable_avx(a)?;
        a.vmovdqu(ymm15, ymmword_ptr(DATA as i32))?;
        a.hlt()
    });
    let mut g = v3_guest(&code);
    put_u32s(&g, DATA, &[1, 2, 3, 4, 5, 6, 7, 8]);
    run_clean(&mut g);
    let s = g.state();
    assert_eq!(s.xcr0, 7);
    assert_eq!(s.xsave_ext.len(), 64 + 256);
    assert_eq!(s.xsave_ext[0], 4, "XSTATE_BV: AVX");
    let off = 64 + 15 * 16;
    let hi: Vec<u32> = s.xsave_ext[off..off + 16]
        .chunks(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(hi, vec![5, 6, 7, 8]);
    // Another VM: restore the state, then store ymm15.
    let code2 = asm(|a| {
        a.vmovdqu(ymmword_ptr(DATA as i32 + 0x40), ymm15)?;
        a.hlt()
    });
    let mut g2 = v3_guest(&code2);
    let mut s2 = s.clone();
    s2.regs.rip = CODE;
    s2.mp_state = hv::MpState::Runnable;
    g2.set_state(&s2);
    run_clean(&mut g2);
    assert_eq!(u32s(&g2, DATA + 0x40, 8), vec![1, 2, 3, 4, 5, 6, 7, 8]);
    // A model without XSAVE refuses the state.
    let mut g3 = guest_with_model(&emu(), &code2, 1, Some(2_000_000), CpuModel::portable());
    assert!(g3.vcpu.set_state(&s2).is_err());
}

#[test]
fn masked_moves_do_not_fault_on_masked_off_elements() {
    let code = asm(|a| {
        enable_avx(a)?;
        a.mov(rdi, SMALL + 0x1000 - 8)?; // two dwords before an unmapped page
        a.vmovdqu(xmm1, xmmword_ptr(DATA as i32))?; // mask
        a.vpmaskmovd(xmm0, xmm1, xmmword_ptr(rdi))?;
        a.vmovdqu(xmmword_ptr(DATA as i32 + 0x20), xmm0)?;
        a.vmaskmovps(xmmword_ptr(rdi), xmm1, xmm1)?;
        a.hlt()
    });
    let mut g = v3_guest(&code);
    g.map_small();
    g.write_u64(g.pte(SMALL + 0x1000), 0);
    put_u32s(&g, DATA, &[u32::MAX, 0x8000_0000, 0x7fff_ffff, 0]);
    put_u32s(&g, SMALL + 0x1000 - 8, &[11, 12]);
    run_clean(&mut g);
    assert_eq!(u32s(&g, DATA + 0x20, 4), vec![11, 12, 0, 0]);
    assert_eq!(u32s(&g, SMALL + 0x1000 - 8, 2), vec![u32::MAX, 0x8000_0000]);
}

/// The image a user-mode `xsavec` (mask 0xee) writes on the hybrid kvm backend, whose user mode
/// runs under the host's XCR0: XCOMP_BV also names opmask, ZMM_Hi256 and Hi16_ZMM (bits 5-7),
/// which the model lays out (leaf 0xD sub-leaves 5-7) but XCR0 = 7 does not enable. glibc's
/// lazy-binding trampoline restores it with `xrstor`, which emu may run (a short user stretch,
/// or after a move). At CPL 3 emu accepts it and loads SSE/AVX; at CPL 0 it stays #GP.
fn write_host_xcr0_xsavec_image(g: &Guest) {
    const AREA: u64 = 0x30000;
    let mut legacy = [0u8; 512];
    legacy[0..2].copy_from_slice(&0x37fu16.to_le_bytes());
    legacy[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
    for (k, v) in [1u32, 2, 3, 4].iter().enumerate() {
        let off = 160 + 7 * 16 + 4 * k;
        legacy[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    write_bytes(g, AREA, &legacy);
    g.write_u64(AREA + 512, 0x26); // XSTATE_BV: SSE, AVX, opmask
    g.write_u64(AREA + 520, (1 << 63) | 0xe6); // XCOMP_BV
    for off in (528..576).step_by(8) {
        g.write_u64(AREA + off, 0);
    }
    put_u32s(g, AREA + 576 + 7 * 16, &[5, 6, 7, 8]);
}

#[test]
fn user_xrstor_accepts_the_host_xcr0_components_the_model_lays_out() {
    const STUB_AREA: i32 = 0x30000;
    let user = asm(|a| {
        a.mov(eax, 0xeeu32)?;
        a.xor(edx, edx)?;
        a.xrstor64(ptr(STUB_AREA))?;
        a.vmovdqu(ymmword_ptr(DATA as i32 + 0x40), ymm7)?;
        a.hlt() // #GP at CPL 3: the stub records it and stops
    });
    let mut g = v3_guest(&user);
    write_host_xcr0_xsavec_image(&g);
    // User segments, user-accessible paging, RSP0 in the TSS (at linear 0).
    g.write_u64(GDT + 0x28, 0x00af_fb00_0000_ffff);
    g.write_u64(GDT + 0x30, 0x00cf_f300_0000_ffff);
    g.write_u64(PML4, 0x2000 | 7);
    g.write_u64(0x2000, 0x3000 | 7);
    for k in 0..512u64 {
        g.write_u64(0x3000 + k * 8, (k << 21) | 0x87);
    }
    g.write_u64(4, STACK);
    let mut st = g.state();
    st.sregs.gdt.limit = 7 * 8 - 1;
    st.sregs.cs = hv::Segment {
        selector: 0x2b,
        dpl: 3,
        ..st.sregs.cs
    };
    let data = hv::Segment {
        selector: 0x33,
        dpl: 3,
        ..st.sregs.ds
    };
    st.sregs.ss = data;
    st.sregs.ds = data;
    st.sregs.es = data;
    st.sregs.cr4 |= 1 << 18;
    st.xcr0 = 7;
    st.xsave_ext = vec![0; 64 + 256]; // XSAVE header, AVX component (in its initial state)
    st.regs.rsp = 0x70000;
    g.set_state(&st);
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(g.exception(), Some((13, 0)), "the final hlt at CPL 3");
    assert_eq!(u32s(&g, DATA + 0x40, 8), vec![1, 2, 3, 4, 5, 6, 7, 8]);

    let kernel = asm(|a| {
        enable_avx(a)?;
        a.mov(eax, 0xeeu32)?;
        a.xor(edx, edx)?;
        a.xrstor64(ptr(STUB_AREA))?;
        a.hlt()
    });
    let mut g = v3_guest(&kernel);
    write_host_xcr0_xsavec_image(&g);
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(
        g.exception(),
        Some((13, 0)),
        "XCOMP_BV beyond XCR0 at CPL 0"
    );
}
