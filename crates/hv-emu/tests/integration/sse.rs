//! SSE integer operations libc string functions use, FXSAVE/FXRSTOR, and PCMPISTRI.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use crate::common;

use common::*;
use hv::{Hypervisor, VcpuExit};
use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress};

fn strlen_like(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        a.mov(rdi, DATA)?;
        a.pxor(xmm0, xmm0)?;
        a.movdqu(xmm1, xmmword_ptr(rdi))?;
        a.pcmpeqb(xmm1, xmm0)?;
        a.pmovmskb(eax, xmm1)?;
        a.bsf(eax, eax)?;
        a.movdqa(xmm2, xmmword_ptr(rdi + 16))?;
        a.pshufd(xmm3, xmm2, 0x1b)?;
        a.movdqu(xmmword_ptr(rdi + 32), xmm3)?;
        a.paddd(xmm2, xmm2)?;
        a.movq(rbx, xmm2)?;
        a.mov(ecx, 0x4142_4344)?;
        a.movd(xmm4, ecx)?;
        a.punpcklbw(xmm4, xmm0)?;
        a.movq(rdx, xmm4)?;
        a.hlt()
    });
    let mut g = long_mode_guest(hv, &code);
    g.mem
        .write_slice(b"hello, world\0xyz", GuestAddress(DATA))
        .unwrap();
    for k in 0..4u32 {
        g.mem
            .write_obj(k + 1, GuestAddress(DATA + 16 + u64::from(k) * 4))
            .unwrap();
    }
    assert_eq!(g.run(), VcpuExit::Halted);
    let r = g.regs();
    assert_eq!(r.rax, 12);
    assert_eq!(g.read_u64(DATA + 32), 0x0000_0003_0000_0004);
    assert_eq!(r.rbx, 0x0000_0004_0000_0002);
    assert_eq!(r.rdx, 0x0041_0042_0043_0044);
}

fn pcmpistri_equal_any(hv: &dyn Hypervisor) {
    // Index of the first byte of "xyzabc" that is one of "cb" (equal any, least index).
    let code = asm(|a| {
        a.mov(rdi, DATA)?;
        a.movdqu(xmm1, xmmword_ptr(rdi))?;
        a.movdqu(xmm2, xmmword_ptr(rdi + 16))?;
        a.pcmpistri(xmm1, xmm2, 0x00)?;
        a.hlt()
    });
    let mut g = long_mode_guest(hv, &code);
    g.mem.write_slice(b"cb\0", GuestAddress(DATA)).unwrap();
    g.mem
        .write_slice(b"xyzabc\0", GuestAddress(DATA + 16))
        .unwrap();
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(g.regs().rcx, 4);
}

fn fxsave_round_trip(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        a.mov(rdi, DATA)?;
        a.mov(eax, 0x1234_5678)?;
        a.movd(xmm5, eax)?;
        a.fxsave64(ptr(rdi))?;
        a.pxor(xmm5, xmm5)?;
        a.fxrstor64(ptr(rdi))?;
        a.movd(ebx, xmm5)?;
        a.hlt()
    });
    let mut g = long_mode_guest(hv, &code);
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(g.regs().rbx, 0x1234_5678);
    // FXSAVE image: FCW at 0, MXCSR at 24, XMM5 at 160 + 5*16.
    assert_eq!(g.read_u64(DATA) & 0xffff, 0x37f);
    assert_eq!(g.read_u64(DATA + 24) & 0xffff_ffff, 0x1f80);
    assert_eq!(g.read_u64(DATA + 240), 0x1234_5678);
}

fn scalar_double(hv: &dyn Hypervisor) {
    // movsd to memory is the SSE store, not the string instruction of the same mnemonic.
    let code = asm(|a| {
        a.mov(rdi, DATA)?;
        a.mov(eax, 7)?;
        a.cvtsi2sd(xmm0, eax)?;
        a.mov(eax, 2)?;
        a.cvtsi2sd(xmm1, eax)?;
        a.divsd(xmm0, xmm1)?;
        a.movsd_2(qword_ptr(rdi), xmm0)?;
        a.cvttsd2si(ebx, xmm0)?;
        a.mov(rsi, DATA + 64)?;
        a.mov(rdi, DATA + 128)?;
        a.movsd()?; // string form: copies 4 bytes
        a.hlt()
    });
    let mut g = long_mode_guest(hv, &code);
    g.write_u64(DATA + 64, 0x1122_3344);
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(f64::from_bits(g.read_u64(DATA)), 3.5);
    assert_eq!(g.regs().rbx, 3);
    assert_eq!(g.read_u64(DATA + 128), 0x1122_3344);
}

#[test]
fn emu_scalar_double() {
    scalar_double(&emu());
}

#[test]
fn emu_strlen_like() {
    strlen_like(&emu());
}

#[test]
fn emu_pcmpistri_equal_any() {
    pcmpistri_equal_any(&emu());
}

#[test]
fn emu_fxsave_round_trip() {
    fxsave_round_trip(&emu());
}

// ---- MXCSR-exact floating point, the SSE3..SSE4.2 forms, faults and gating ----

const IE: u32 = 1;
const DE: u32 = 2;
const ZE: u32 = 4;
const OE: u32 = 8;
const UE: u32 = 16;
const PE: u32 = 32;
const DAZ: u32 = 1 << 6;
const FTZ: u32 = 1 << 15;
const MASKED: u32 = 0x1f80;

/// Runs `code` (ending in `hlt`) after `prep` changed the initial state; returns the final
/// state and the recorded exception.
fn run_fp(
    code: impl FnOnce(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>,
    prep: impl FnOnce(&mut hv::CpuState),
) -> (hv::CpuState, Option<(u8, u64)>, Guest) {
    run_fp_model(hv::CpuModel::portable(), code, prep)
}

fn run_fp_model(
    model: hv::CpuModel,
    code: impl FnOnce(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>,
    prep: impl FnOnce(&mut hv::CpuState),
) -> (hv::CpuState, Option<(u8, u64)>, Guest) {
    let code = asm(|a| {
        code(a)?;
        a.hlt()
    });
    let mut g = guest_with_model(&emu(), &code, 1, Some(2_000_000), model);
    let mut st = g.state();
    prep(&mut st);
    g.set_state(&st);
    assert_eq!(g.run(), VcpuExit::Halted);
    let e = g.exception();
    (g.state(), e, g)
}

fn xmm(st: &hv::CpuState, k: usize) -> u128 {
    u128::from_le_bytes(st.fpu.xmm[k])
}

fn set_xmm(st: &mut hv::CpuState, k: usize, v: u128) {
    st.fpu.xmm[k] = v.to_le_bytes();
}

fn f32x(v: f32) -> u128 {
    u128::from(v.to_bits())
}

fn f64x(v: f64) -> u128 {
    u128::from(v.to_bits())
}

/// ADDSS of 1 + 2^-24 (a tie) and -1 - 2^-24 in each rounding mode, with PE.
#[test]
fn emu_rounding_modes_apply_to_arithmetic() {
    let tie = f32x(2f32.powi(-24));
    // (rc, result for +1, result for -1)
    let cases = [
        (0u32, 1.0f32, -1.0f32),
        (1, 1.0, -(1.0 + 2f32.powi(-23))),
        (2, 1.0 + 2f32.powi(-23), -1.0),
        (3, 1.0, -1.0),
    ];
    for (rc, pos, neg) in cases {
        let (st, e, _) = run_fp(
            |a| {
                a.addss(xmm0, xmm1)?;
                a.subss(xmm2, xmm1)
            },
            |st| {
                st.fpu.mxcsr = MASKED | (rc << 13);
                set_xmm(st, 0, f32x(1.0));
                set_xmm(st, 1, tie);
                set_xmm(st, 2, f32x(-1.0));
            },
        );
        assert_eq!(e, None);
        assert_eq!(f32::from_bits(xmm(&st, 0) as u32), pos, "rc {rc}");
        assert_eq!(f32::from_bits(xmm(&st, 2) as u32), neg, "rc {rc}");
        assert_eq!(st.fpu.mxcsr & 0x3f, PE, "rc {rc}");
    }
}

/// SQRTSD and CVTSD2SS round by MXCSR too.
#[test]
fn emu_rounding_modes_apply_to_sqrt_and_conversions() {
    let two = f64x(2.0);
    let mut seen = Vec::new();
    for rc in 0..4u32 {
        let (st, _, _) = run_fp(
            |a| {
                a.sqrtsd(xmm0, xmm1)?;
                a.cvtsd2ss(xmm2, xmm3)?;
                a.cvtsi2ss(xmm4, eax)
            },
            |st| {
                st.fpu.mxcsr = MASKED | (rc << 13);
                set_xmm(st, 1, two);
                set_xmm(st, 3, f64x(1.0 / 3.0));
                st.regs.rax = 16_777_217; // 2^24 + 1
            },
        );
        seen.push((
            xmm(&st, 0) as u64,
            xmm(&st, 2) as u32,
            f32::from_bits(xmm(&st, 4) as u32),
        ));
    }
    let s = std::f64::consts::SQRT_2.to_bits();
    // The nearest double to sqrt(2) is above it: down/zero give the previous double.
    assert_eq!(seen[0].0, s);
    assert_eq!(seen[1].0, s - 1);
    assert_eq!(seen[2].0, s);
    assert_eq!(seen[3].0, s - 1);
    let third = (1.0f64 / 3.0) as f32;
    // The nearest single to 1/3 is above it.
    assert_eq!(seen[0].1, third.to_bits());
    assert_eq!(seen[1].1, third.to_bits() - 1);
    assert_eq!(seen[2].1, third.to_bits());
    assert_eq!(seen[3].1, third.to_bits() - 1);
    assert_eq!(seen[0].2, 16_777_216.0);
    assert_eq!(seen[2].2, 16_777_218.0);
    assert_eq!(seen[3].2, 16_777_216.0);
}

/// ROUNDSD/ROUNDSS in every immediate mode and from MXCSR; imm[3] suppresses PE.
#[test]
fn emu_roundsd_all_modes() {
    let vals = [2.5f64, -2.5, 1.5, -0.25];
    // floor, ceil, trunc, nearest-even
    let expect = |imm: u32, v: f64| -> f64 {
        match imm & 3 {
            0 => {
                let r = v.round();
                if (v - v.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
                    r - v.signum()
                } else {
                    r
                }
            }
            1 => v.floor(),
            2 => v.ceil(),
            _ => v.trunc(),
        }
    };
    for imm in [0u32, 1, 2, 3, 8, 9, 0xa, 0xb] {
        for v in vals {
            let (st, e, _) = run_fp(
                |a| {
                    a.roundsd(xmm0, xmm1, imm)?;
                    a.roundss(xmm2, xmm3, imm)
                },
                |st| {
                    set_xmm(st, 0, 0xdead_0000_0000_0000_0000_0000_0000_0000);
                    set_xmm(st, 1, f64x(v));
                    set_xmm(st, 3, f32x(v as f32));
                },
            );
            assert_eq!(e, None);
            let r = f64::from_bits(xmm(&st, 0) as u64);
            assert_eq!(r, expect(imm, v), "imm {imm} v {v}");
            assert_eq!(r.is_sign_negative(), v < 0.0, "sign kept: imm {imm} v {v}");
            assert_eq!(xmm(&st, 0) >> 64, 0xdead_0000_0000_0000, "upper half kept");
            assert_eq!(f32::from_bits(xmm(&st, 2) as u32), expect(imm, v) as f32);
            let pe = if imm & 8 != 0 { 0 } else { PE };
            assert_eq!(st.fpu.mxcsr & 0x3f, pe, "imm {imm} v {v}");
        }
    }
    // imm[2]: MXCSR.RC (round up).
    let (st, _, _) = run_fp(
        |a| a.roundpd(xmm0, xmm1, 4),
        |st| {
            st.fpu.mxcsr = MASKED | (2 << 13);
            set_xmm(st, 1, f64x(1.25) | (f64x(-1.75) << 64));
        },
    );
    assert_eq!(xmm(&st, 0), f64x(2.0) | (f64x(-1.0) << 64));
}

/// DAZ reads denormal operands as zero (no DE); FTZ flushes tiny results to zero (UE|PE).
#[test]
fn emu_daz_and_ftz() {
    let den = 0x0000_0001u128; // smallest single denormal
    let tiny = f32x(2f32.powi(-100));
    let run = |mxcsr: u32| {
        run_fp(
            |a| {
                a.addss(xmm0, xmm1)?;
                a.mulss(xmm2, xmm3)
            },
            |st| {
                st.fpu.mxcsr = mxcsr;
                set_xmm(st, 0, 0);
                set_xmm(st, 1, den);
                set_xmm(st, 2, tiny);
                set_xmm(st, 3, f32x(2f32.powi(-40)));
            },
        )
        .0
    };
    let st = run(MASKED);
    assert_eq!(xmm(&st, 0), den, "0 + denormal");
    assert_eq!(f32::from_bits(xmm(&st, 2) as u32), 2f32.powi(-140));
    assert_eq!(
        st.fpu.mxcsr & 0x3f,
        DE,
        "exact denormal result: no UE without UM unmasked"
    );
    let st = run(MASKED | DAZ);
    assert_eq!(xmm(&st, 0), 0, "DAZ");
    assert_eq!(st.fpu.mxcsr & 0x3f, 0, "DAZ: no DE");
    let st = run(MASKED | FTZ);
    assert_eq!(xmm(&st, 2), 0, "FTZ");
    assert_eq!(st.fpu.mxcsr & 0x3f, DE | UE | PE);
    // Inexact tiny result without FTZ: UE and PE.
    let (st, _, _) = run_fp(
        |a| a.mulss(xmm0, xmm1),
        |st| {
            set_xmm(st, 0, f32x(1.5 * 2f32.powi(-100)));
            set_xmm(st, 1, f32x(1.5 * 2f32.powi(-48)));
        },
    );
    assert_eq!(st.fpu.mxcsr & 0x3f, UE | PE);
}

/// NaN rules: the first source's NaN, SNaN quieted with IE, the default NaN for an invalid
/// operation; MIN/MAX return the second source for NaN and for two zeros.
#[test]
fn emu_nan_rules() {
    let q1 = 0x7ff8_0000_0000_0001u128;
    let q2 = 0xfff8_0000_0000_0002u128;
    let s1 = 0x7ff0_0000_0000_0003u128;
    let inf = f64x(f64::INFINITY);
    let (st, e, _) = run_fp(
        |a| {
            a.addsd(xmm0, xmm1)?; // q1 + q2 -> q1
            a.addsd(xmm2, xmm3)?; // 1 + s1 -> quiet s1, IE
            a.subsd(xmm4, xmm5)?; // inf - inf -> default NaN, IE
            a.maxsd(xmm6, xmm7)?; // max(q1, 1) -> 1
            a.minsd(xmm8, xmm9)?; // min(-0, +0) -> +0
            a.minsd(xmm10, xmm11) // min(1, s1) -> s1 unchanged
        },
        |st| {
            for (k, v) in [
                (0, q1),
                (1, q2),
                (2, f64x(1.0)),
                (3, s1),
                (4, inf),
                (5, inf),
                (6, q1),
                (7, f64x(1.0)),
                (8, f64x(-0.0)),
                (9, f64x(0.0)),
                (10, f64x(1.0)),
                (11, s1),
            ] {
                set_xmm(st, k, v);
            }
        },
    );
    assert_eq!(e, None);
    assert_eq!(xmm(&st, 0), q1);
    assert_eq!(xmm(&st, 2), s1 | (1 << 51));
    assert_eq!(xmm(&st, 4), 0xfff8_0000_0000_0000);
    assert_eq!(xmm(&st, 6), f64x(1.0));
    assert_eq!(xmm(&st, 8), f64x(0.0));
    assert_eq!(xmm(&st, 10), s1);
    assert_eq!(st.fpu.mxcsr & 0x3f, IE);
}

/// An unmasked exception raises #XM (CR4.OSXMMEXCPT=1) or #UD (=0); the destination keeps
/// its value, the flag is set.
#[test]
fn emu_unmasked_exception_xm_or_ud() {
    for osxmmexcpt in [true, false] {
        let (st, e, _) = run_fp(
            |a| a.divss(xmm0, xmm1),
            |st| {
                st.fpu.mxcsr = MASKED & !(1 << 9); // ZM clear
                set_xmm(st, 0, f32x(1.0));
                set_xmm(st, 1, 0);
                if !osxmmexcpt {
                    st.sregs.cr4 &= !(1 << 10);
                }
            },
        );
        assert_eq!(e.map(|e| e.0), Some(if osxmmexcpt { 19 } else { 6 }));
        assert_eq!(xmm(&st, 0), f32x(1.0), "destination unchanged");
        assert_eq!(st.fpu.mxcsr & 0x3f, ZE);
    }
    // Masked: infinity and ZE.
    let (st, e, _) = run_fp(
        |a| a.divss(xmm0, xmm1),
        |st| {
            set_xmm(st, 0, f32x(1.0));
            set_xmm(st, 1, 0);
        },
    );
    assert_eq!(e, None);
    assert_eq!(xmm(&st, 0), f32x(f32::INFINITY));
    assert_eq!(st.fpu.mxcsr & 0x3f, ZE);
    // Unmasked overflow: OE (and PE of the unbounded result), #XM.
    let (st, e, _) = run_fp(
        |a| a.mulsd(xmm0, xmm0),
        |st| {
            st.fpu.mxcsr = MASKED & !(1 << 10);
            set_xmm(st, 0, f64x(1e300));
        },
    );
    assert_eq!(e.map(|e| e.0), Some(19));
    assert_eq!(st.fpu.mxcsr & 0x3f, OE | PE);
}

/// 16-byte operands of aligned forms: #GP(0) when misaligned; MOVUPS reads across a page
/// boundary and faults (#PF, CR2 at the second page) with the register unchanged.
#[test]
fn emu_alignment_and_page_crossing() {
    let (st, e, _) = run_fp(
        |a| {
            a.mov(rdi, DATA + 8)?;
            a.movaps(xmm0, xmmword_ptr(rdi))
        },
        |_| {},
    );
    assert_eq!(e, Some((13, 0)));
    assert_eq!(xmm(&st, 0), 0);
    let (_, e, _) = run_fp(
        |a| {
            a.mov(rdi, DATA + 8)?;
            a.paddd(xmm0, xmmword_ptr(rdi))
        },
        |_| {},
    );
    assert_eq!(
        e,
        Some((13, 0)),
        "legacy SSE arithmetic needs alignment too"
    );
    // Page crossing on 4 KiB pages.
    let addr = SMALL + 0x1000 - 8;
    let code = asm(|a| {
        a.mov(rdi, addr)?;
        a.movups(xmm0, xmmword_ptr(rdi))?;
        a.pcmpistri(xmm1, xmmword_ptr(rdi), 0)?;
        a.hlt()
    });
    let mut g = long_mode_guest(&emu(), &code);
    g.map_small();
    g.write_u64(addr, 0x1111_2222_3333_4444);
    g.write_u64(addr + 8, 0x5555_6666_7777_8888);
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(g.exception(), None);
    assert_eq!(
        xmm(&g.state(), 0),
        0x5555_6666_7777_8888_1111_2222_3333_4444
    );
    // The second page not present: #PF on it, XMM0 unchanged.
    let mut g = long_mode_guest(&emu(), &code);
    g.map_small();
    let pte = g.pte(SMALL + 0x1000);
    g.write_u64(pte, 0);
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(g.exception().map(|e| e.0), Some(14));
    let st = g.state();
    assert_eq!(st.sregs.cr2, SMALL + 0x1000);
    assert_eq!(xmm(&st, 0), 0);
}

/// Float → integer: MXCSR rounding, truncation, the integer indefinite with IE.
#[test]
fn emu_float_to_int_conversions() {
    let (st, e, _) = run_fp(
        |a| {
            a.cvtsd2si(rax, xmm0)?; // 1e20 -> indefinite, IE
            a.cvtss2si(ebx, xmm1)?; // 2.5 -> 2 (nearest even), PE
            a.cvttss2si(ecx, xmm2)?; // -2.7 -> -2
            a.cvtsd2si(edx, xmm3)?; // NaN -> 0x80000000
            a.cvtpd2dq(xmm4, xmm5)?; // [1.5, -1.5] -> [2, -2]
            a.cvttps2dq(xmm6, xmm7) // [3e9, -0.5, 7.9, -7.9] -> [indef, 0, 7, -7]
        },
        |st| {
            set_xmm(st, 0, f64x(1e20));
            set_xmm(st, 1, f32x(2.5));
            set_xmm(st, 2, f32x(-2.7));
            set_xmm(st, 3, 0x7ff8_0000_0000_0000);
            set_xmm(st, 5, f64x(1.5) | (f64x(-1.5) << 64));
            set_xmm(
                st,
                7,
                f32x(3e9) | (f32x(-0.5) << 32) | (f32x(7.9) << 64) | (f32x(-7.9) << 96),
            );
        },
    );
    assert_eq!(e, None);
    assert_eq!(st.regs.rax, 0x8000_0000_0000_0000);
    assert_eq!(st.regs.rbx, 2);
    assert_eq!(st.regs.rcx, 0xffff_fffe);
    assert_eq!(st.regs.rdx, 0x8000_0000);
    assert_eq!(xmm(&st, 4), 2 | (0xffff_fffe << 32));
    assert_eq!(
        xmm(&st, 6),
        0x8000_0000 | (7u128 << 64) | (0xffff_fff9u128 << 96)
    );
    assert_eq!(st.fpu.mxcsr & 0x3f, IE | PE);
}

/// CVTPD2PS overflow (masked: infinity, OE|PE) and CVTPS2PD of an SNaN (quieted, IE).
#[test]
fn emu_fp_format_conversions() {
    let (st, _, _) = run_fp(
        |a| {
            a.cvtpd2ps(xmm0, xmm1)?;
            a.cvtps2pd(xmm2, xmm3)
        },
        |st| {
            set_xmm(st, 0, u128::MAX);
            set_xmm(st, 1, f64x(1e300) | (f64x(0.5) << 64));
            set_xmm(st, 3, 0x7f80_0001 | (f32x(-2.0) << 32));
        },
    );
    assert_eq!(xmm(&st, 0), f32x(f32::INFINITY) | (f32x(0.5) << 32));
    assert_eq!(xmm(&st, 2), 0x7ff8_0000_2000_0000 | (f64x(-2.0) << 64));
    assert_eq!(st.fpu.mxcsr & 0x3f, IE | OE | PE);
}

/// Every compare predicate of CMPSD on (1, 2), (2, 2) and (NaN, 1); signaling predicates
/// raise IE on a QNaN, quiet ones do not.
#[test]
fn emu_cmp_predicates_and_comis() {
    let nan = 0x7ff8_0000_0000_0000u128;
    for (x, y, expect) in [
        (
            f64x(1.0),
            f64x(2.0),
            [false, true, true, false, true, false, false, true],
        ),
        (
            f64x(2.0),
            f64x(2.0),
            [true, false, true, false, false, true, false, true],
        ),
        (
            nan,
            f64x(1.0),
            [false, false, false, true, true, true, true, false],
        ),
    ] {
        for p in 0..8u32 {
            let (st, _, _) = run_fp(
                |a| {
                    a.cmpsd_3(xmm0, xmm1, p)?;
                    a.ucomisd(xmm2, xmm1)?;
                    a.pushfq()?;
                    a.pop(rax)
                },
                |st| {
                    set_xmm(st, 0, x);
                    set_xmm(st, 2, x);
                    set_xmm(st, 1, y);
                    st.regs.rsp = 0x80000;
                },
            );
            let r = xmm(&st, 0) as u64;
            assert_eq!(r == u64::MAX, expect[p as usize], "pred {p} x {x:#x}");
            let signaling = matches!(p, 1 | 2 | 5 | 6);
            let ie = if x == nan && signaling { IE } else { 0 };
            assert_eq!(st.fpu.mxcsr & IE, ie, "pred {p}");
            let f = st.regs.rax & 0x8d5;
            let want = if x == nan {
                0x45
            } else if x == y {
                0x40
            } else {
                0x01
            };
            assert_eq!(f, want, "ucomisd flags");
        }
    }
}

/// SSE3/SSSE3/SSE4.1/SSE4.2 forms with known results.
#[test]
fn emu_sse3_to_sse42_forms() {
    let ps = |v: [f32; 4]| {
        v.iter().enumerate().fold(0u128, |acc, (k, x)| {
            acc | (u128::from(x.to_bits()) << (32 * k))
        })
    };
    let (st, e, g) = run_fp(
        |a| {
            a.mov(rdi, DATA)?;
            a.movaps(xmm0, xmm8)?;
            a.dpps(xmm0, xmm9, 0xf1)?; // 1*5+2*6+3*7+4*8 = 70 in lane 0
            a.movaps(xmm1, xmm8)?;
            a.haddps(xmm1, xmm9)?; // [3, 7, 11, 15]
            a.movaps(xmm2, xmm8)?;
            a.addsubps(xmm2, xmm9)?; // [-4, 8, -4, 12]
            a.movddup(xmm3, xmm9)?; // [5, 6, 5, 6]
            a.movshdup(xmm4, xmm9)?; // [6, 6, 8, 8]
            a.movaps(xmm5, xmm8)?;
            a.insertps(xmm5, xmm9, 0b1101_0001)?; // source lane 3, destination lane 1, lane 0 zeroed
            a.extractps(dword_ptr(rdi), xmm9, 2)?; // 7.0 to memory
            a.pextrb(byte_ptr(rdi + 4), xmm10, 5)?;
            a.mov(rax, 0x1122_3344_5566_7788u64)?;
            a.movdqa(xmm6, xmm10)?;
            a.pinsrq(xmm6, rax, 1)?;
            a.phminposuw(xmm7, xmm10)?;
            a.movdqa(xmm11, xmm10)?;
            a.pcmpgtq(xmm11, xmm12)?;
            a.movdqa(xmm13, xmm10)?;
            a.packusdw(xmm13, xmm12)?;
            a.movdqa(xmm14, xmm10)?;
            a.mpsadbw(xmm14, xmm12, 0)?;
            a.movdqa(xmm15, xmm10)?;
            a.blendvps(xmm15, xmm12) // xmm0 mask: lane 0 (70.0) has the sign clear
        },
        |st| {
            set_xmm(st, 8, ps([1.0, 2.0, 3.0, 4.0]));
            set_xmm(st, 9, ps([5.0, 6.0, 7.0, 8.0]));
            set_xmm(st, 10, 0x0010_0009_0008_0007_0006_0005_0004_0003);
            set_xmm(st, 12, 0x8000_0000_0000_0000_0000_0001_0002_0003);
        },
    );
    assert_eq!(e, None);
    assert_eq!(xmm(&st, 0), ps([70.0, 0.0, 0.0, 0.0]));
    assert_eq!(xmm(&st, 1), ps([3.0, 7.0, 11.0, 15.0]));
    assert_eq!(xmm(&st, 2), ps([-4.0, 8.0, -4.0, 12.0]));
    assert_eq!(xmm(&st, 3), ps([5.0, 6.0, 5.0, 6.0]));
    assert_eq!(xmm(&st, 4), ps([6.0, 6.0, 8.0, 8.0]));
    assert_eq!(xmm(&st, 5), ps([0.0, 8.0, 3.0, 4.0]));
    assert_eq!(g.read_u64(DATA) & 0xffff_ffff, u64::from(7f32.to_bits()));
    assert_eq!((g.read_u64(DATA) >> 32) & 0xff, 0x00);
    assert_eq!(xmm(&st, 6) >> 64, 0x1122_3344_5566_7788);
    assert_eq!(xmm(&st, 7), 3, "min word 3 at index 0");
    // xmm10 > xmm12 per signed qword: low 0x0006_0005_0004_0003 > 0x1_0002_0003: yes;
    // high 0x0010_0009_0008_0007 > 0x8000...: yes (negative).
    assert_eq!(xmm(&st, 11), u128::MAX);
    // packusdw: dwords of xmm10 [0x40003, 0x60005, 0x80007, 0x100009] saturate to 0xffff;
    // xmm12 dwords [0x20003, 0x1, 0, 0x80000000] -> [0xffff, 1, 0, 0].
    assert_eq!(xmm(&st, 13), 0x0000_0000_0001_ffff_ffff_ffff_ffff_ffff);
    // mpsadbw: |x[k+j] - y[j]| over j<4, bytes of xmm10 vs the first 4 bytes of xmm12.
    let (x, y) = (
        0x0010_0009_0008_0007_0006_0005_0004_0003u128.to_le_bytes(),
        [3u8, 0, 2, 0],
    );
    for k in 0..8 {
        let want: u16 = (0..4).map(|j| u16::from(x[k + j].abs_diff(y[j]))).sum();
        assert_eq!((xmm(&st, 14) >> (16 * k)) as u16, want, "mpsadbw {k}");
    }
    // blendvps with XMM0 = [70.0, 0, 0, 0]: no sign bits set, xmm15 stays xmm10.
    assert_eq!(xmm(&st, 15), 0x0010_0009_0008_0007_0006_0005_0004_0003);
}

/// SSSE3 integer forms.
#[test]
fn emu_ssse3_integer() {
    let (st, e, _) = run_fp(
        |a| {
            a.movdqa(xmm0, xmm8)?;
            a.phaddw(xmm0, xmm9)?;
            a.movdqa(xmm1, xmm8)?;
            a.psignw(xmm1, xmm9)?;
            a.movdqa(xmm2, xmm8)?;
            a.pmulhrsw(xmm2, xmm9)?;
            a.movdqa(xmm3, xmm10)?;
            a.pmaddubsw(xmm3, xmm11)?;
            a.movdqa(xmm4, xmm8)?;
            a.palignr(xmm4, xmm9, 2)
        },
        |st| {
            // words: x = [1, -2, 3, 0x7fff, 0x7fff, 5, -6, 7]
            let x: [u16; 8] = [1, 0xfffe, 3, 0x7fff, 0x7fff, 5, 0xfffa, 7];
            let y: [u16; 8] = [0x4000, 0, 0xffff, 0x7fff, 1, 0x8000, 2, 0xffff];
            let w = |a: [u16; 8]| {
                a.iter()
                    .enumerate()
                    .fold(0u128, |acc, (k, v)| acc | (u128::from(*v) << (16 * k)))
            };
            set_xmm(st, 8, w(x));
            set_xmm(st, 9, w(y));
            set_xmm(st, 10, 0xffff_ffff_ffff_ffff_ffff_ffff_ffff_ffff);
            set_xmm(st, 11, 0x7f7f_7f7f_7f7f_7f7f_8080_8080_8080_8080);
        },
    );
    assert_eq!(e, None);
    let w = |v: u128, k: usize| (v >> (16 * k)) as u16;
    // phaddw: [1-2, 3+0x7fff, 0x7fff+5, -6+7, y...]
    assert_eq!(w(xmm(&st, 0), 0), 0xffff);
    assert_eq!(w(xmm(&st, 0), 1), 0x8002);
    assert_eq!(w(xmm(&st, 0), 4), 0x4000);
    // psignw: y=0 zeroes, y<0 negates.
    assert_eq!(w(xmm(&st, 1), 1), 0);
    assert_eq!(w(xmm(&st, 1), 2), 0xfffd);
    assert_eq!(w(xmm(&st, 1), 7), 0xfff9);
    // pmulhrsw: (1*0x4000*2 + 0x8000) >> 16 = 1 (rounded); 0x7fff*0x7fff -> 0x7ffe.
    assert_eq!(w(xmm(&st, 2), 0), 1);
    assert_eq!(w(xmm(&st, 2), 3), 0x7ffe);
    // pmaddubsw: 255 * -128 * 2 saturates to -32768; 255*127*2 to 32767.
    assert_eq!(w(xmm(&st, 3), 0), 0x8000);
    assert_eq!(w(xmm(&st, 3), 7), 0x7fff);
    // palignr by 2 bytes: low word of the result is y[1].
    assert_eq!(w(xmm(&st, 4), 0), 0);
    assert_eq!(w(xmm(&st, 4), 7), 1);
}

fn without(f: hv::cpu_model::Feature) -> hv::CpuModel {
    let mut m = hv::CpuModel::portable();
    let b = f.bit();
    for e in m.cpuid.iter_mut() {
        if e.function == b.function && (!e.indexed || e.index == b.index) {
            let r = match b.reg {
                0 => &mut e.eax,
                1 => &mut e.ebx,
                2 => &mut e.ecx,
                _ => &mut e.edx,
            };
            *r &= !(1 << b.bit);
        }
    }
    assert!(!m.has(f));
    m
}

/// A model without the instruction's family raises #UD; CR0.TS raises #NM; CR0.EM and
/// CR4.OSFXSR=0 raise #UD.
#[test]
fn emu_gating_and_control_bits() {
    use hv::cpu_model::Feature;
    for (f, code) in [
        (
            Feature::Sse41,
            (|a: &mut CodeAssembler| a.roundsd(xmm0, xmm1, 0))
                as fn(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>,
        ),
        (Feature::Ssse3, |a| a.pshufb(xmm0, xmm1)),
        (Feature::Sse3, |a| a.haddps(xmm0, xmm1)),
        (Feature::Sse42, |a| a.pcmpgtq(xmm0, xmm1)),
    ] {
        let (_, e, _) = run_fp_model(without(f), code, |_| {});
        assert_eq!(e, Some((6, 0)), "{f:?}");
        let (_, e, _) = run_fp(code, |_| {});
        assert_eq!(e, None, "{f:?} present");
    }
    let (_, e, _) = run_fp(|a| a.addps(xmm0, xmm1), |st| st.sregs.cr0 |= 1 << 3);
    assert_eq!(e, Some((7, 0)), "CR0.TS");
    let (_, e, _) = run_fp(|a| a.addps(xmm0, xmm1), |st| st.sregs.cr0 |= 1 << 2);
    assert_eq!(e, Some((6, 0)), "CR0.EM");
    let (_, e, _) = run_fp(|a| a.addps(xmm0, xmm1), |st| st.sregs.cr4 &= !(1 << 9));
    assert_eq!(e, Some((6, 0)), "CR4.OSFXSR");
    let (_, e, _) = run_fp(
        |a| {
            a.mov(rdi, DATA)?;
            a.stmxcsr(dword_ptr(rdi))
        },
        |st| st.sregs.cr0 |= 1 << 3,
    );
    assert_eq!(e, Some((7, 0)), "STMXCSR and CR0.TS");
}

/// RCPPS/RSQRTPS: within the architectural 1.5 * 2^-12 relative error, special values exact.
#[test]
fn emu_rcp_rsqrt_approximations() {
    for v in [1.0f32, 3.0, 0.1, 1e30, 7.5e-30, 123_456.79] {
        let (st, _, _) = run_fp(
            |a| {
                a.rcpss(xmm0, xmm1)?;
                a.rsqrtss(xmm2, xmm1)
            },
            |st| set_xmm(st, 1, f32x(v)),
        );
        let r = f64::from(f32::from_bits(xmm(&st, 0) as u32));
        let want = 1.0 / f64::from(v);
        assert!(((r - want) / want).abs() <= 1.5 * 2f64.powi(-12), "rcp {v}");
        let r = f64::from(f32::from_bits(xmm(&st, 2) as u32));
        let want = 1.0 / f64::from(v).sqrt();
        assert!(
            ((r - want) / want).abs() <= 1.5 * 2f64.powi(-12),
            "rsqrt {v}"
        );
        assert_eq!(st.fpu.mxcsr & 0x3f, 0, "no flags");
    }
    let (st, _, _) = run_fp(
        |a| {
            a.rcpps(xmm0, xmm1)?;
            a.rsqrtps(xmm2, xmm1)
        },
        |st| {
            set_xmm(
                st,
                1,
                f32x(0.0) | (f32x(-0.0) << 32) | (f32x(f32::INFINITY) << 64) | (f32x(-4.0) << 96),
            )
        },
    );
    assert_eq!(xmm(&st, 0) as u32, f32::INFINITY.to_bits());
    assert_eq!((xmm(&st, 0) >> 32) as u32, f32::NEG_INFINITY.to_bits());
    assert_eq!((xmm(&st, 0) >> 64) as u32, 0);
    assert_eq!(
        (xmm(&st, 2) >> 96) as u32,
        0xffc0_0000,
        "rsqrt of a negative"
    );
}
