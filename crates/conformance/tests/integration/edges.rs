//! Edge cases the differential testers found where emu differed from this Intel host (each was
//! fixed in emu); the expectations are what the CPU does, and every body runs on emu and, when
//! usable, on KVM (whose CPL-3 code runs on the host CPU).

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use conformance::{DATA, GUARD, Guest, conformance};
use hv::Hypervisor;
use iced_x86::code_asm::*;

conformance!(
    rotate_through_carry_by_width_plus_one_keeps_of,
    maskmov_legacy_checks_whole_halves,
    x87_m80_store_is_not_atomic,
    mmx_store_fault_sets_top_only,
);

/// A CPL-3 guest for `code` with the page after the two scratch pages ([`GUARD`]) unmapped.
fn guest(hv: &dyn Hypervisor, code: &[u8]) -> Guest {
    let mut g = Guest::new(hv, 2).unwrap();
    g.map_low_4k(&[GUARD]).unwrap();
    g.load_user(code).unwrap();
    g
}

/// RCL/RCR of an 8-bit operand by 9 or a 16-bit one by 17 rotates nothing; OF stays as it was
/// (emu computed it from the result). Every byte value, CF in 0 and 1, OF in 1.
fn rotate_through_carry_by_width_plus_one_keeps_of(hv: &dyn Hypervisor) {
    for (rcr, wide) in [(false, false), (true, false), (false, true), (true, true)] {
        let count = if wide { 17 } else { 9 };
        let code = conformance::asm(|a| {
            a.mov(rdi, DATA)?;
            a.xor(ecx, ecx)?;
            let mut l = a.create_label();
            a.set_label(&mut l)?;
            a.imul_3(eax, ecx, 0x101)?;
            // OF = 1 (0x7f + 1), then CF = bit 0 of the counter.
            a.mov(dl, 0x7f)?;
            a.add(dl, 1)?;
            a.bt(ecx, 0)?;
            match (rcr, wide) {
                (false, false) => a.rcl(al, count)?,
                (true, false) => a.rcr(al, count)?,
                (false, true) => a.rcl(ax, count)?,
                (true, true) => a.rcr(ax, count)?,
            }
            a.pushfq()?;
            a.pop(rdx)?;
            a.mov(byte_ptr(rdi + rcx), dl)?;
            a.shr(edx, 11)?;
            a.mov(byte_ptr(rdi + rcx + 0x100), dl)?;
            a.inc(ecx)?;
            a.cmp(ecx, 256)?;
            a.jne(l)?;
            a.ud2()
        });
        let mut g = guest(hv, &code);
        assert_eq!(g.go().exception.unwrap().vector, 6);
        let flags = g.read(DATA, 256).unwrap();
        let of = g.read(DATA + 0x100, 256).unwrap();
        for v in 0..256 {
            assert_eq!(of[v] & 1, 1, "rcr={rcr} wide={wide} value {v:#x}: OF");
            assert_eq!(
                flags[v] & 1,
                (v & 1) as u8,
                "rcr={rcr} wide={wide} value {v:#x}: CF"
            );
        }
    }
}

/// MASKMOVDQU/MASKMOVQ check their whole destination for writing whatever the mask, in 8-byte
/// halves, the upper one first; a fault writes nothing. (vector, error code, CR2) per case.
fn maskmov_legacy_checks_whole_halves(hv: &dyn Hypervisor) {
    let cases: [(bool, i32, u16, u64); 9] = [
        (true, 0x1ff8, 0x0001, 0x22000),
        (true, 0x1ff8, 0x0000, 0x22000),
        (true, 0x1ff9, 0x0001, 0x22001),
        (true, 0x1ff1, 0x0080, 0x22000),
        (true, 0x1ffe, 0x0001, 0x22006),
        (false, 0x1ffe, 0x0000, 0x22000),
        (false, 0x1ff9, 0x0001, 0x22000),
        (false, 0x1fff, 0x0080, 0x22000),
        (true, 0x1ff0, 0xffff, 0),
    ];
    for (dq, off, mask, fault_at) in cases {
        let code = conformance::asm(|a| {
            a.mov(r15, DATA)?;
            a.movdqu(xmm1, xmmword_ptr(r15 + 0x100))?;
            a.lea(rdi, ptr(r15 + off))?;
            if dq {
                a.maskmovdqu(xmm2, xmm1)?;
            } else {
                a.movq(mm1, qword_ptr(r15 + 0x100))?;
                a.maskmovq(mm2, mm1)?;
            }
            a.ud2()
        });
        let mut g = guest(hv, &code);
        let m: Vec<u8> = (0..16)
            .map(|b| if mask & (1 << b) != 0 { 0x80 } else { 0 })
            .collect();
        g.write(DATA + 0x100, &m).unwrap();
        g.write(DATA + 0x1fe0, &[0x5a; 32]).unwrap();
        let e = g.go().exception.unwrap();
        let what = format!(
            "maskmov{} at +{off:#x} mask {mask:#x}",
            if dq { "dqu" } else { "q" }
        );
        if fault_at == 0 {
            assert_eq!(e.vector, 6, "{what}");
            continue;
        }
        assert_eq!((e.vector, e.error_code, e.cr2), (14, 6, fault_at), "{what}");
        assert_eq!(g.read(DATA + 0x1fe0, 32).unwrap(), vec![0x5a; 32], "{what}");
    }
}

/// FSTP m80 whose last 2 bytes reach into an unmapped page writes the significand's 8 bytes,
/// then faults (CR2 at the page); the stack is not popped.
fn x87_m80_store_is_not_atomic(hv: &dyn Hypervisor) {
    let code = conformance::asm(|a| {
        a.mov(r15, DATA)?;
        a.fld1()?;
        a.fstp(tword_ptr(r15 + 0x1ff8))?;
        a.ud2()
    });
    let mut g = guest(hv, &code);
    g.write(DATA + 0x1ff0, &[0x5a; 16]).unwrap();
    let o = g.go();
    let e = o.exception.unwrap();
    assert_eq!((e.vector, e.error_code, e.cr2), (14, 6, GUARD));
    assert_eq!(
        g.read_u64(DATA + 0x1ff8).unwrap(),
        1 << 63,
        "significand of 1.0"
    );
    assert_eq!((o.state.fpu.fsw >> 11) & 7, 7, "1.0 still on the stack");
}

/// An MMX store whose destination faults: MOVQ has set TOP to 0 but left the tags alone;
/// MASKMOVQ has done the whole transition (TOP 0, every tag valid).
fn mmx_store_fault_sets_top_only(hv: &dyn Hypervisor) {
    for masked in [false, true] {
        let code = conformance::asm(|a| {
            a.mov(r15, DATA)?;
            if masked {
                a.lea(rdi, ptr(r15 + 0x1ffb))?;
                a.maskmovq(mm1, mm2)?;
            } else {
                a.movq(qword_ptr(r15 + 0x1ffb), mm1)?;
            }
            a.ud2()
        });
        let mut g = guest(hv, &code);
        let mut st = g.vcpu.state().unwrap();
        st.fpu.fsw = 4 << 11;
        st.fpu.ftw = 0x82;
        g.vcpu.set_state(&st).unwrap();
        let o = g.go();
        let e = o.exception.unwrap();
        assert_eq!(
            (e.vector, e.error_code, e.cr2),
            (14, 6, GUARD),
            "masked={masked}"
        );
        assert_eq!((o.state.fpu.fsw >> 11) & 7, 0, "TOP, masked={masked}");
        let tags = if masked { 0xff } else { 0x82 };
        assert_eq!(o.state.fpu.ftw, tags, "tags, masked={masked}");
    }
}
