//! MMX: the x87 aliasing (TOP, tags, bits 79:64), EMMS, CR0.EM/TS and pending x87 exceptions,
//! and the MMX-register forms of MMX/SSE/SSE2/SSSE3 instructions.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use crate::common;

use common::*;
use hv::VcpuExit;
use iced_x86::code_asm::*;

fn run(
    code: impl FnOnce(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>,
    prep: impl FnOnce(&mut hv::CpuState),
) -> (hv::CpuState, Option<(u8, u64)>, Guest) {
    let code = asm(|a| {
        code(a)?;
        a.hlt()
    });
    let mut g = long_mode_guest(&emu(), &code);
    let mut st = g.state();
    prep(&mut st);
    g.set_state(&st);
    assert_eq!(g.run(), VcpuExit::Halted);
    let e = g.exception();
    (g.state(), e, g)
}

/// The image slot of MMk after the transition (TOP = 0): slot k.
fn mm(st: &hv::CpuState, k: usize) -> u64 {
    u64::from_le_bytes(st.fpu.st[k][..8].try_into().unwrap())
}

fn set_slot(st: &mut hv::CpuState, slot: usize, v: u64, exp: u16) {
    st.fpu.st[slot] = [0; 16];
    st.fpu.st[slot][..8].copy_from_slice(&v.to_le_bytes());
    st.fpu.st[slot][8..10].copy_from_slice(&exp.to_le_bytes());
}

/// With TOP = 3, MM1 is physical R1 = ST(6): the instruction reads it there, then sets TOP to
/// 0 (the image now has R1 in slot 1), tags every register valid and sets bits 79:64 of the
/// written register to ones; EMMS empties the tags and leaves TOP at 0.
#[test]
fn emu_mmx_aliases_physical_x87_registers() {
    let (st, e, _) = run(
        |a| a.paddw(mm1, mm2),
        |st| {
            st.fpu.fsw = 3 << 11;
            st.fpu.ftw = 0x01;
            for slot in 0..8 {
                set_slot(st, slot, 0x1111 * (slot as u64 + 1), 0x4000 + slot as u16);
            }
        },
    );
    assert_eq!(e, None);
    // R1 was slot (1 - 3) & 7 = 6, R2 slot 7.
    let r1 = 0x1111 * 7u64;
    let r2 = 0x1111 * 8u64;
    assert_eq!(mm(&st, 1), r1 + r2);
    assert_eq!(&st.fpu.st[1][8..10], &[0xff, 0xff], "bits 79:64 set");
    // R2 keeps its exponent (only the destination is written).
    assert_eq!(mm(&st, 2), r2);
    assert_eq!(
        u16::from_le_bytes([st.fpu.st[2][8], st.fpu.st[2][9]]),
        0x4007
    );
    assert_eq!((st.fpu.fsw >> 11) & 7, 0, "TOP = 0");
    assert_eq!(st.fpu.ftw, 0xff, "all valid");

    let (st, _, _) = run(
        |a| {
            a.movq(mm0, rax)?;
            a.emms()
        },
        |st| {
            st.fpu.fsw = 5 << 11;
            st.regs.rax = 0x1234;
        },
    );
    assert_eq!(st.fpu.ftw, 0, "EMMS empties every tag");
    assert_eq!((st.fpu.fsw >> 11) & 7, 0);
    assert_eq!(mm(&st, 0), 0x1234);
}

/// CR0.EM → #UD, CR0.TS → #NM, FSW.ES (pending unmasked x87 exception) → #MF; state untouched.
#[test]
fn emu_mmx_faults() {
    for (cr0_bits, fsw, vector) in [(1u64 << 2, 0u16, 6u8), (1 << 3, 0, 7), (0, 0x8081, 16)] {
        let (st, e, _) = run(
            |a| a.paddb(mm0, mm1),
            |st| {
                st.sregs.cr0 |= cr0_bits;
                st.fpu.fsw = fsw | (2 << 11);
                st.fpu.fcw = 0x37e;
            },
        );
        assert_eq!(e.map(|e| e.0), Some(vector));
        assert_eq!((st.fpu.fsw >> 11) & 7, 2, "no transition");
    }
    let (_, e, _) = run(|a| a.emms(), |st| st.sregs.cr0 |= 1 << 3);
    assert_eq!(e.map(|e| e.0), Some(7), "EMMS and CR0.TS");
}

/// Arithmetic, saturation, compares, packs, unpacks, shifts on MMX registers.
#[test]
fn emu_mmx_arithmetic() {
    let (st, e, _) = run(
        |a| {
            a.mov(rax, 0x7fff_8000_0001_fffeu64)?;
            a.mov(rbx, 0x0001_ffff_7fff_0002u64)?;
            a.movq(mm0, rax)?;
            a.movq(mm1, rbx)?;
            a.movq(mm2, mm0)?;
            a.paddsw(mm2, mm1)?; // [0, 0x7fff, 0x8000, 0x7fff]
            a.movq(mm3, mm0)?;
            a.psubusw(mm3, mm1)?; // [0xfffc, 0, 0, 0x7ffe]
            a.movq(mm4, mm0)?;
            a.pmulhw(mm4, mm1)?;
            a.movq(mm5, mm0)?;
            a.pmaddwd(mm5, mm1)?;
            a.movq(mm6, mm0)?;
            a.packsswb(mm6, mm1)?;
            a.movq(mm7, mm0)?;
            a.punpckhwd(mm7, mm1)?;
            a.movq(r8, mm2)?;
            a.movq(r9, mm3)?;
            a.movq(r10, mm4)?;
            a.movq(r11, mm5)?;
            a.movq(r12, mm6)?;
            a.movq(r13, mm7)?;
            a.psllq(mm0, 4)?;
            a.movq(r14, mm0)?;
            a.psraw(mm1, mm1)?; // count = whole 64 bits (huge): sign fill
            a.movq(r15, mm1)
        },
        |_| {},
    );
    assert_eq!(e, None);
    let w = |v: u64| {
        [
            v as u16,
            (v >> 16) as u16,
            (v >> 32) as u16,
            (v >> 48) as u16,
        ]
    };
    assert_eq!(w(st.regs.r8), [0, 0x7fff, 0x8000, 0x7fff]);
    assert_eq!(w(st.regs.r9), [0xfffc, 0, 0, 0x7ffe]);
    let x = [-2i32, 1, -32768, 32767];
    let y = [2i32, 32767, -1, 1];
    let hi: Vec<u16> = (0..4).map(|k| ((x[k] * y[k]) >> 16) as u16).collect();
    assert_eq!(w(st.regs.r10).to_vec(), hi);
    let lo = (x[0] * y[0] + x[1] * y[1]) as u32;
    let hi2 = (x[2] * y[2] + x[3] * y[3]) as u32;
    assert_eq!(st.regs.r11, u64::from(lo) | (u64::from(hi2) << 32));
    // packsswb: a's words then b's words, saturated to bytes.
    assert_eq!(st.regs.r12, 0x01_ff_7f_02_7f_80_01_fe);
    // punpckhwd: a2, b2, a3, b3.
    assert_eq!(w(st.regs.r13), [0x8000, 0xffff, 0x7fff, 0x0001]);
    assert_eq!(st.regs.r14, 0x7fff_8000_0001_fffeu64 << 4);
    assert_eq!(w(st.regs.r15), [0, 0, 0xffff, 0]);
}

/// The SSE/SSE2/SSSE3 forms with MMX operands, MOVQ2DQ/MOVDQ2Q, MASKMOVQ, CVT*PI*.
#[test]
fn emu_mmx_sse_forms() {
    let (st, e, g) = run(
        |a| {
            a.mov(rax, 0x0807_0605_0403_0201u64)?;
            a.movq(mm0, rax)?;
            a.pshufw(mm1, mm0, 0x1b)?; // reverse words
            a.pextrw(ebx, mm0, 3)?;
            a.movq(mm2, mm0)?;
            a.pinsrw(mm2, ebx, 0)?;
            a.mov(rcx, 0x8000_0080_0000_8080u64)?;
            a.movq(mm3, rcx)?;
            a.pmovmskb(edx, mm3)?;
            a.movq2dq(xmm0, mm0)?;
            a.movdq2q(mm4, xmm1)?;
            a.mov(rdi, DATA)?;
            a.maskmovq(mm0, mm3)?; // bytes 0, 1, 4, 7 of mm0
            a.movq(mm5, mm0)?;
            a.pshufb(mm5, mm1)?;
            a.movq(mm6, mm0)?;
            a.palignr(mm6, mm1, 3)?;
            a.movq(mm7, mm0)?;
            a.phaddw(mm7, mm1)?;
            a.cvtpi2ps(xmm2, mm0)?;
            a.cvttps2pi(mm1, xmm3)?;
            a.movq(r8, mm1)?;
            a.movq(r9, mm5)?;
            a.movq(r10, mm6)?;
            a.movq(r11, mm7)?;
            a.movq(r12, mm4)?;
            a.movq(r13, mm2)?;
            a.psadbw(mm0, mm3)?;
            a.movq(r14, mm0)
        },
        |st| {
            st.fpu.xmm[1] = 0xdead_beef_0123_4567_89ab_cdefu128.to_le_bytes();
            let v = u128::from(2.5f32.to_bits()) | (u128::from((-7.9f32).to_bits()) << 32);
            st.fpu.xmm[3] = v.to_le_bytes();
            st.fpu.xmm[2] = [0xff; 16];
            let mut m = [0u8; 16];
            m[..8].copy_from_slice(&0xaaaa_aaaa_aaaa_aaaau64.to_le_bytes());
            st.fpu.xmm[0] = m;
        },
    );
    assert_eq!(e, None);
    let x = |k: usize| u128::from_le_bytes(st.fpu.xmm[k]);
    assert_eq!(st.regs.rbx, 0x0807);
    assert_eq!(st.regs.r13, 0x0807_0605_0403_0807);
    assert_eq!(st.regs.rdx, 0b1001_0011, "pmovmskb");
    assert_eq!(x(0), 0x0807_0605_0403_0201, "movq2dq zero-extends");
    assert_eq!(st.regs.r12, 0x0123_4567_89ab_cdef, "movdq2q");
    // maskmovq: the mask 0x8000_0080_0000_8080 selects bytes 0, 1, 4, 7.
    let mem = g.read_u64(DATA);
    assert_eq!(mem, 0x0800_0005_0000_0201);
    // pshufb mm with indexes from mm1 = reversed words of mm0.
    let idx = 0x0201_0403_0605_0807u64.to_le_bytes();
    let src = 0x0807_0605_0403_0201u64.to_le_bytes();
    let want: Vec<u8> = idx
        .iter()
        .map(|i| {
            if i & 0x80 != 0 {
                0
            } else {
                src[usize::from(i & 7)]
            }
        })
        .collect();
    assert_eq!(st.regs.r9.to_le_bytes().to_vec(), want);
    // palignr: (mm6:mm1) >> 24.
    let cat = (u128::from(0x0807_0605_0403_0201u64) << 64) | u128::from(0x0201_0403_0605_0807u64);
    assert_eq!(st.regs.r10, (cat >> 24) as u64);
    // phaddw: [a0+a1, a2+a3, b0+b1, b2+b3].
    assert_eq!(st.regs.r11, 0x0604_0e0c_0e0c_0604);
    assert_eq!(
        x(2),
        u128::from((0x0403_0201 as f32).to_bits())
            | (u128::from((0x0807_0605 as f32).to_bits()) << 32)
            | (u128::MAX << 64),
        "cvtpi2ps keeps the upper half"
    );
    assert_eq!(st.regs.r8, 2 | (0xffff_fff9u64 << 32), "cvttps2pi");
    let sad: u64 = src
        .iter()
        .zip(0x8000_0080_0000_8080u64.to_le_bytes())
        .map(|(a, b)| u64::from(a.abs_diff(b)))
        .sum();
    assert_eq!(st.regs.r14, sad);
}
