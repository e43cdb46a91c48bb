//! mul/imul/div/idiv, and #DE delivered through the IDT.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use conformance::*;
use hv::Hypervisor;
use iced_x86::code_asm::*;

fn multiply(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        a.mov(rax, 0x1_0000_0000u64)?;
        a.mov(rbx, 0x1_0000_0001u64)?;
        a.mul(rbx)?; // RDX:RAX = 2^64 + 2^32
        a.pushfq()?;
        a.pop(r8)?;
        a.mov(r10, rax)?;
        a.mov(r11, rdx)?;
        a.mov(eax, 3)?;
        a.mov(rcx, -5i64)?;
        a.imul(rcx)?; // RDX:RAX = -15, fits: CF=OF=0
        a.pushfq()?;
        a.pop(r9)?;
        a.mov(r12, rax)?;
        a.mov(r13, rdx)?;
        a.imul_3(rsi, rcx, 7)?; // -35
        a.mov(edi, 0x10000)?;
        a.imul_2(edi, edi)?; // 2^32 truncated to 0: CF=OF=1
        a.pushfq()?;
        a.pop(r14)?;
        a.mov(al, 0x80)?;
        a.mov(bl, 2)?;
        a.mul(bl)?; // AX = 0x100
        a.mov(r15, rax)?;
        stop(a)
    });
    let mut g = Guest::with_code(hv, &code);
    let o = g.go();
    let r = o.regs();
    o.assert_clean();
    assert_eq!((r.r10, r.r11), (0x1_0000_0000, 1));
    assert_eq!(r.r8 & (CF | OF), CF | OF, "mul with a high half");
    assert_eq!((r.r12 as i64, r.r13 as i64), (-15, -1));
    assert_eq!(r.r9 & (CF | OF), 0, "imul that fits");
    assert_eq!(r.rsi as i64, -35);
    assert_eq!(r.rdi, 0);
    assert_eq!(r.r14 & (CF | OF), CF | OF);
    assert_eq!(r.r15 & 0xffff, 0x100);
}

fn divide(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        a.mov(eax, 100)?;
        a.xor(edx, edx)?;
        a.mov(ecx, 7)?;
        a.div(rcx)?; // 14 r 2
        a.mov(r8, rax)?;
        a.mov(r9, rdx)?;
        a.mov(rax, -100i64)?;
        a.cqo()?;
        a.idiv(rcx)?; // -14 r -2
        a.mov(r10, rax)?;
        a.mov(r11, rdx)?;
        a.mov(eax, 0x0434)?;
        a.mov(bl, 0x10)?;
        a.div(bl)?; // AL = 0x43, AH = 4
        a.mov(r12, rax)?;
        a.mov(rdx, 1u64)?;
        a.xor(eax, eax)?;
        a.mov(rcx, 1u64 << 32)?;
        a.div(rcx)?; // 2^64 / 2^32 = 2^32 r 0
        a.mov(r13, rax)?;
        stop(a)
    });
    let mut g = Guest::with_code(hv, &code);
    let o = g.go();
    o.assert_clean();
    let r = o.regs();
    assert_eq!((r.r8, r.r9), (14, 2));
    assert_eq!((r.r10 as i64, r.r11 as i64), (-14, -2));
    assert_eq!(r.r12 & 0xffff, 0x0443);
    assert_eq!(r.r13, 1 << 32);
}

type Emit = fn(&mut CodeAssembler) -> std::result::Result<(), iced_x86::IcedError>;

/// Runs `setup` then `faulting`; expects #DE with the frame naming `faulting` and RAX as
/// `setup` left it.
fn expect_de(hv: &dyn Hypervisor, setup: Emit, faulting: Emit, expect_rax: u64) {
    let at = CODE + asm(setup).len() as u64;
    let code = asm(|a| {
        setup(a)?;
        faulting(a)?;
        stop(a)
    });
    let mut g = Guest::with_code(hv, &code);
    let e = g.go().assert_exception(0, 0);
    assert_eq!(e.rip, at, "#DE is a fault: the frame names the divide");
    assert_eq!(e.rax, expect_rax, "RAX unchanged");
}

fn divide_by_zero_raises_de(hv: &dyn Hypervisor) {
    expect_de(
        hv,
        |a| {
            a.xor(ecx, ecx)?;
            a.mov(eax, 1)
        },
        |a| a.div(ecx),
        1,
    );
}

fn idiv_overflow_raises_de(hv: &dyn Hypervisor) {
    expect_de(
        hv,
        |a| {
            a.mov(rax, i64::MIN)?;
            a.cqo()?;
            a.mov(rcx, -1i64)
        },
        |a| a.idiv(rcx),
        i64::MIN as u64,
    );
    // 8-bit quotient overflow.
    expect_de(
        hv,
        |a| {
            a.mov(eax, 0x1000)?;
            a.mov(bl, 2)
        },
        |a| a.div(bl),
        0x1000,
    );
}

conformance!(
    multiply,
    divide,
    divide_by_zero_raises_de,
    idiv_overflow_raises_de
);
