//! MMX at CPL 3 (where KVM runs it on the host CPU): the x87 aliasing and the MMX-register
//! forms of MMX/SSE/SSSE3 instructions, with fixed expectations on both backends.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use conformance::*;
use hv::{CpuState, Hypervisor};
use iced_x86::code_asm::*;

/// Runs `code` at CPL 3 after `prep`; the program ends with `ud2` (reported as #UD at its
/// address).
fn user_run(
    hv: &dyn Hypervisor,
    code: impl FnOnce(&mut CodeAssembler) -> AsmResult,
    prep: impl FnOnce(&mut CpuState),
) -> (Outcome, Guest) {
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
    let e = o.assert_exception(6, 0);
    assert_eq!(e.rip, end, "ran to the final ud2");
    (o, g)
}

fn slot(st: &CpuState, k: usize) -> (u64, u16) {
    let s = &st.fpu.st[k];
    (
        u64::from_le_bytes(s[..8].try_into().unwrap()),
        u16::from_le_bytes([s[8], s[9]]),
    )
}

/// TOP = 3: MM1 is R1 = ST(6) before the instruction; afterwards TOP = 0, all tags valid, the
/// destination's bits 79:64 all ones; EMMS then empties the tags.
fn mmx_aliasing(hv: &dyn Hypervisor) {
    let prep = |st: &mut CpuState| {
        st.fpu.fsw = 3 << 11;
        st.fpu.ftw = 0x01;
        for k in 0..8 {
            st.fpu.st[k] = [0; 16];
            st.fpu.st[k][..8].copy_from_slice(&(0x1111 * (k as u64 + 1)).to_le_bytes());
            st.fpu.st[k][8..10].copy_from_slice(&(0x4000 + k as u16).to_le_bytes());
        }
    };
    let (o, _) = user_run(hv, |a| a.paddw(mm1, mm2), prep);
    let st = &o.state;
    assert_eq!(slot(st, 1), (0x1111 * 7 + 0x1111 * 8, 0xffff));
    assert_eq!(slot(st, 2), (0x1111 * 8, 0x4007));
    assert_eq!(slot(st, 0), (0x1111 * 6, 0x4005));
    assert_eq!((st.fpu.fsw >> 11) & 7, 0);
    assert_eq!(st.fpu.ftw, 0xff);
    let (o, _) = user_run(hv, |a| a.emms(), prep);
    assert_eq!(o.state.fpu.ftw, 0);
    assert_eq!((o.state.fpu.fsw >> 11) & 7, 0, "EMMS sets TOP to 0 too");
    assert_eq!(
        slot(&o.state, 1),
        (0x1111 * 7, 0x4006),
        "registers rotated with TOP"
    );
}

fn mmx_forms(hv: &dyn Hypervisor) {
    let (o, g) = user_run(
        hv,
        |a| {
            a.mov(rax, 0x0807_0605_0403_0201u64)?;
            a.movq(mm0, rax)?;
            a.pshufw(mm1, mm0, 0x1b)?;
            a.mov(rcx, 0x8000_0080_0000_8080u64)?;
            a.movq(mm3, rcx)?;
            a.pmovmskb(edx, mm3)?;
            a.mov(rdi, DATA)?;
            a.maskmovq(mm0, mm3)?;
            a.movq(mm7, mm0)?;
            a.phaddw(mm7, mm1)?;
            a.movq(r11, mm7)?;
            a.movq(mm6, mm0)?;
            a.palignr(mm6, mm1, 3)?;
            a.movq(r10, mm6)?;
            a.movq(mm5, mm0)?;
            a.packsswb(mm5, mm3)?;
            a.movq(r9, mm5)?;
            a.cvtpi2ps(xmm2, mm0)?;
            a.cvttps2pi(mm1, xmm3)?;
            a.movq(r8, mm1)?;
            a.psadbw(mm0, mm3)?;
            a.movq(r14, mm0)
        },
        |st| {
            let v = u128::from(2.5f32.to_bits()) | (u128::from((-7.9f32).to_bits()) << 32);
            st.fpu.xmm[3] = v.to_le_bytes();
            st.fpu.xmm[2] = [0xff; 16];
        },
    );
    let r = &o.state.regs;
    assert_eq!(r.rdx, 0x93);
    assert_eq!(g.read_u64(DATA).unwrap(), 0x0800_0005_0000_0201);
    assert_eq!(r.r11, 0x0604_0e0c_0e0c_0604);
    assert_eq!(r.r10, 0x0302_0102_0104_0306);
    assert_eq!(r.r9, 0x807f_0080_7f7f_7f7f);
    assert_eq!(r.r8, 2 | (0xffff_fff9u64 << 32));
    assert_eq!(
        r.r14,
        0x0807_0605_0403_0201u64
            .to_le_bytes()
            .iter()
            .zip(0x8000_0080_0000_8080u64.to_le_bytes())
            .map(|(a, b)| u64::from(a.abs_diff(b)))
            .sum::<u64>()
    );
    let x2 = u128::from_le_bytes(o.state.fpu.xmm[2]);
    assert_eq!(x2 as u32, (0x0403_0201 as f32).to_bits());
    assert_eq!(x2 >> 64, u128::from(u64::MAX));
}

conformance!(mmx_aliasing, mmx_forms);
