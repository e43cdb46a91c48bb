//! Integer ALU instructions and the status flags they leave.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use conformance::*;
use hv::Hypervisor;
use iced_x86::IcedError;
use iced_x86::code_asm::*;

type Emit = fn(&mut CodeAssembler) -> std::result::Result<(), IcedError>;

/// (name, code leaving its result in RAX, expected RAX, expected flags, flags compared).
const CASES: &[(&str, Emit, u64, u64, u64)] = &[
    (
        "add carry out",
        |a| {
            a.mov(rax, -1i64)?;
            a.add(rax, 1)
        },
        0,
        CF | ZF | PF | AF,
        STATUS,
    ),
    (
        "sub borrow",
        |a| {
            a.mov(rax, 5u64)?;
            a.sub(rax, 7)
        },
        -2i64 as u64,
        CF | SF | AF,
        STATUS,
    ),
    (
        "adc overflow",
        |a| {
            a.stc()?;
            a.mov(eax, 0x7fff_ffff)?;
            a.adc(eax, 0)
        },
        0x8000_0000,
        OF | SF | AF | PF,
        STATUS,
    ),
    (
        "sbb borrow in",
        |a| {
            a.xor(eax, eax)?;
            a.stc()?;
            a.sbb(eax, 0)
        },
        0xffff_ffff,
        CF | SF | AF | PF,
        STATUS,
    ),
    (
        "and",
        |a| {
            a.mov(rax, 0xf0f0u64)?;
            a.mov(rcx, 0x0ff0u64)?;
            a.and(rax, rcx)
        },
        0xf0,
        PF,
        STATUS & !AF,
    ),
    (
        "or sign",
        |a| {
            a.mov(rax, 1u64 << 63)?;
            a.or(rax, 1)
        },
        (1 << 63) | 1,
        SF,
        STATUS & !AF,
    ),
    ("xor self", |a| a.xor(rax, rax), 0, ZF | PF, STATUS & !AF),
    (
        "inc keeps CF",
        |a| {
            a.stc()?;
            a.mov(eax, 0x7f)?;
            a.inc(al)
        },
        0x80,
        CF | OF | SF | AF,
        STATUS,
    ),
    (
        "dec to zero",
        |a| {
            a.clc()?;
            a.mov(eax, 1)?;
            a.dec(eax)
        },
        0,
        ZF | PF,
        STATUS,
    ),
    (
        "neg zero",
        |a| {
            a.xor(eax, eax)?;
            a.neg(rax)
        },
        0,
        ZF | PF,
        STATUS,
    ),
    (
        "neg one",
        |a| {
            a.mov(eax, 1)?;
            a.neg(rax)
        },
        u64::MAX,
        CF | SF | PF | AF,
        STATUS,
    ),
    (
        "shl 1",
        |a| {
            a.mov(rax, 0x8000_0000_0000_0001u64)?;
            a.shl(rax, 1)
        },
        2,
        CF | OF,
        STATUS & !AF,
    ),
    (
        "shl 4 (32-bit)",
        |a| {
            a.mov(rax, -1i64)?;
            a.mov(eax, 0x1000_0001)?;
            a.shl(eax, 4)
        },
        0x10,
        CF,
        CF | ZF | SF | PF,
    ),
    (
        "shr 1",
        |a| {
            a.mov(eax, 3)?;
            a.shr(rax, 1)
        },
        1,
        CF,
        STATUS & !AF,
    ),
    (
        "sar 1",
        |a| {
            a.mov(rax, -4i64)?;
            a.sar(rax, 1)
        },
        -2i64 as u64,
        SF,
        STATUS & !AF,
    ),
    (
        "sar cl=3 (16-bit)",
        |a| {
            a.mov(eax, 0x8010)?;
            a.mov(cl, 3)?;
            a.sar(ax, cl)
        },
        0xf002,
        SF,
        CF | ZF | SF | PF,
    ),
    (
        "rol 1",
        |a| {
            a.mov(rax, 1u64 << 63)?;
            a.rol(rax, 1)
        },
        1,
        CF | OF,
        CF | OF,
    ),
    (
        "ror 1",
        |a| {
            a.mov(eax, 1)?;
            a.ror(rax, 1)
        },
        1 << 63,
        CF | OF,
        CF | OF,
    ),
    (
        "rcl 1 with CF",
        |a| {
            a.xor(eax, eax)?;
            a.stc()?;
            a.rcl(rax, 1)
        },
        1,
        0,
        CF | OF,
    ),
    (
        "rcr 1 with CF",
        |a| {
            a.xor(eax, eax)?;
            a.stc()?;
            a.rcr(rax, 1)
        },
        1 << 63,
        OF,
        CF | OF,
    ),
    (
        "rcl 9 (8-bit) is identity",
        |a| {
            a.mov(eax, 0x5a)?;
            a.clc()?;
            a.rcl(al, 9)
        },
        0x5a,
        0,
        CF,
    ),
    (
        "cmp equal",
        |a| {
            a.mov(eax, 7)?;
            a.cmp(eax, 7)
        },
        7,
        ZF | PF,
        STATUS,
    ),
    (
        "test sign",
        |a| {
            a.mov(eax, 0x80)?;
            a.test(al, al)
        },
        0x80,
        SF,
        STATUS & !AF,
    ),
    (
        "32-bit write zero-extends",
        |a| {
            a.mov(rax, -1i64)?;
            a.add(eax, 0)
        },
        0xffff_ffff,
        SF | PF,
        STATUS,
    ),
    // A masked count of 0 changes no flag, but a 32-bit destination is still written.
    (
        "shl eax, cl=0 zero-extends",
        |a| {
            a.mov(rax, -1i64)?;
            a.xor(ecx, ecx)?;
            a.shl(eax, cl)
        },
        0xffff_ffff,
        ZF | PF,
        STATUS,
    ),
    (
        "rol eax, 32 zero-extends",
        |a| {
            a.mov(rax, -1i64)?;
            a.rol(eax, 32)
        },
        0xffff_ffff,
        0,
        CF | OF,
    ),
    (
        "shld eax, cl=32 zero-extends",
        |a| {
            a.mov(rax, -1i64)?;
            a.mov(ecx, 32)?;
            a.shld(eax, ebx, cl)
        },
        0xffff_ffff,
        0,
        0,
    ),
    (
        "shl rax, cl=0 keeps all",
        |a| {
            a.mov(rax, -1i64)?;
            a.xor(ecx, ecx)?;
            a.shl(rax, cl)
        },
        u64::MAX,
        ZF | PF,
        STATUS,
    ),
    (
        "16-bit write keeps upper",
        |a| {
            a.mov(rax, -1i64)?;
            a.add(ax, 1)
        },
        0xffff_ffff_ffff_0000,
        CF | ZF | PF | AF,
        STATUS,
    ),
];

const SLOT: u64 = 16;

fn alu_and_flags(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        for (k, (_, emit, ..)) in CASES.iter().enumerate() {
            a.xor(eax, eax)?; // flags: a known starting point (ZF PF)
            emit(a)?;
            a.pushfq()?;
            a.pop(rbx)?;
            a.mov(qword_ptr(DATA + k as u64 * SLOT), rax)?;
            a.mov(qword_ptr(DATA + k as u64 * SLOT + 8), rbx)?;
        }
        stop(a)
    });
    let mut g = Guest::with_code(hv, &code);
    g.go().assert_clean();
    let mut failures = Vec::new();
    for (k, (name, _, value, flags, mask)) in CASES.iter().enumerate() {
        let got = g.read_u64(DATA + k as u64 * SLOT).unwrap();
        let got_flags = g.read_u64(DATA + k as u64 * SLOT + 8).unwrap();
        if got != *value || got_flags & mask != *flags {
            failures.push(format!(
                "{name}: rax {got:#x} (expected {value:#x}), flags {:#x} (expected {flags:#x}, mask {mask:#x})",
                got_flags & mask
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{}:\n{}",
        hv.kind(),
        failures.join("\n")
    );
}

/// The harness detects a wrong expectation in this family's shape.
fn alu_wrong_expectation_fails(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        a.mov(ebx, 2)?;
        a.add(ebx, 2)?;
        stop(a)
    });
    let mut g = Guest::with_code(hv, &code);
    let o = g.go();
    let r = std::panic::catch_unwind(|| assert_eq!(o.regs().rbx, 5));
    assert!(r.is_err());
    assert_eq!(o.regs().rbx, 4);
}

conformance!(alu_and_flags, alu_wrong_expectation_fails);
