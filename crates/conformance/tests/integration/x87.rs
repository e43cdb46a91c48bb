//! x87 on KVM (the host CPU at CPL 3) against emu: fixed bodies whose whole x87 state, flags,
//! registers and data page must agree, and the random-block differential tester
//! (`conformance::diff::x87`).

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use conformance::diff::x87;
use conformance::{CODE, DATA, Guest};
use hv::Hypervisor;
use iced_x86::code_asm::*;

type Body = fn(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>;
/// Exception (vector, offset), GPRs then RFLAGS, the x87 state, the data page.
type Ran = (Option<(u8, u64)>, Vec<u64>, hv::FpuState, Vec<u8>);

/// What a body leaves: exception (vector, rip), GPRs, RFLAGS, the x87 state, the data page.
fn run_body(hv: &dyn Hypervisor, body: Body, data: &[u8]) -> Ran {
    let code = conformance::asm(|a| {
        a.mov(rsi, DATA)?;
        body(a)?;
        a.ud2()
    });
    let mut g = Guest::new(hv, 2).unwrap();
    g.load_user(&code).unwrap();
    g.write(DATA, data).unwrap();
    let o = g.go();
    let e = o.exception.unwrap();
    let regs: Vec<u64> = (0..16)
        .map(|k| if k == 0 { e.rax } else { o.state.regs.gpr(k) })
        .collect();
    let mut regs = regs;
    regs.push(e.rflags & 0x8d5);
    let exc = if e.vector == 6 {
        None
    } else {
        Some((e.vector, e.rip - CODE))
    };
    (exc, regs, o.state.fpu, g.read(DATA, 4096).unwrap())
}

/// Runs `body` on KVM and emu and requires identical results; returns emu's.
fn both(body: Body, data: &[u8]) -> Option<Ran> {
    let kvm = conformance::kvm()?;
    let a = run_body(&kvm, body, data);
    let b = run_body(&conformance::emu(), body, data);
    assert_eq!(a.0, b.0, "exception");
    assert_eq!(a.1, b.1, "registers and flags");
    let (fa, fb) = (&a.2, &b.2);
    assert_eq!(
        (fa.fcw, fa.fsw, fa.ftw),
        (fb.fcw, fb.fsw, fb.ftw),
        "fcw/fsw/ftw"
    );
    for k in 0..8 {
        assert_eq!(fa.st[k][..10], fb.st[k][..10], "st{k}");
    }
    assert_eq!(fa.fip, fb.fip, "fip");
    if let Some(off) = (0..a.3.len()).find(|&k| a.3[k] != b.3[k]) {
        let s = off & !15;
        panic!(
            "data page differs at {off:#x}: kvm {:02x?} emu {:02x?}",
            &a.3[s..s + 16],
            &b.3[s..s + 16]
        );
    }
    Some(b)
}

fn words(v: &[u16]) -> Vec<u8> {
    v.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// 1/3, 2/3 and -2/3 in every rounding and precision mode, stored as m80/m64/m32 and integers.
#[test]
fn x87_rounding_modes_hw() {
    let mut data = Vec::new();
    for rc in 0..4u16 {
        for pc in [0u16, 2, 3] {
            data.extend(words(&[0x7f | (pc << 8) | (rc << 10)]));
        }
    }
    data.resize(0x40, 0);
    data.extend(words(&[3, 0xfffe]));
    let body: Body = |a| {
        a.xor(ecx, ecx)?;
        a.mov(rdi, DATA + 0x100)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.fninit()?;
        a.fldcw(word_ptr(rsi + rcx * 2))?;
        a.fld1()?;
        a.fidiv(word_ptr(rsi + 0x40))?;
        a.fild(word_ptr(rsi + 0x42))?;
        a.fidiv(word_ptr(rsi + 0x40))?;
        a.fld(st1)?;
        a.fsub_2(st0, st1)?;
        a.fst(qword_ptr(rdi + 10))?;
        a.fst(dword_ptr(rdi + 18))?;
        a.fist(dword_ptr(rdi + 22))?;
        a.fstp(tword_ptr(rdi))?;
        a.fstp(tword_ptr(rdi + 26))?;
        a.fstp(tword_ptr(rdi + 36))?;
        a.fnstsw(word_ptr(rdi + 46))?;
        a.add(rdi, 48)?;
        a.inc(ecx)?;
        a.cmp(ecx, 12)?;
        a.jne(top)
    };
    both(body, &data);
}

/// The constants in every rounding mode, FNSAVE (re-initialises) / FRSTOR / FNSTENV images.
#[test]
fn x87_constants_and_save_hw() {
    let data = words(&[0x37f, 0x77f, 0xb7f, 0xf7f]);
    let body: Body = |a| {
        for rc in 0..4 {
            a.fldcw(word_ptr(rsi + rc * 2))?;
            a.fldpi()?;
            a.fldl2e()?;
            a.fldl2t()?;
            a.fldlg2()?;
            a.fldln2()?;
            a.fnsave(ptr(rsi + 0x100 + rc * 0x80))?;
        }
        a.frstor(ptr(rsi + 0x100))?;
        a.fnstenv(ptr(rsi + 0x400))?;
        a.fldenv(ptr(rsi + 0x400))
    };
    both(body, &data);
}

/// FCOMI/FUCOMI flags and FCMOVcc on them, FCOM/FXAM codes, with a QNaN and an SNaN.
#[test]
fn x87_compares_hw() {
    let mut data = Vec::new();
    data.extend(0x7ff8_0000_0000_0000u64.to_le_bytes());
    data.extend(0x7ff0_0000_0000_0001u64.to_le_bytes());
    let body: Body = |a| {
        a.fninit()?;
        a.fld1()?;
        a.fldz()?;
        a.fcomi(st0, st1)?;
        a.fcmovb(st0, st1)?;
        a.pushfq()?;
        a.fld(qword_ptr(rsi))?;
        a.fucomi(st0, st1)?;
        a.pushfq()?;
        a.fcomi(st0, st1)?;
        a.pushfq()?;
        a.fnstsw(ax)?;
        a.mov(ebx, eax)?;
        a.fxam()?;
        a.fnstsw(ax)?;
        a.fld(qword_ptr(rsi + 8))?;
        a.fcom_2(st0, st1)?;
        a.fnstsw(ax)?;
        a.mov(edx, eax)?;
        a.pop(r8)?;
        a.pop(r9)?;
        a.pop(r10)?;
        for r in [r8, r9, r10] {
            a.and(r, 0x8d5)?;
        }
        Ok(())
    };
    let r = both(body, &data);
    if let Some((_, regs, _, _)) = r {
        assert_eq!(regs[8] & 0x45, 0x45, "unordered");
        assert_eq!(regs[10] & 0x45, 0x01, "less");
    }
}

/// An unmasked division by zero: the result is not written, #MF at the next waiting
/// instruction, the FNSTENV image records FOP/FIP/FDP.
#[test]
fn x87_mf_hw() {
    let data = words(&[0x37b, 0, 0]);
    let body: Body = |a| {
        a.fninit()?;
        a.fldcw(word_ptr(rsi))?;
        a.fld1()?;
        a.fidiv(word_ptr(rsi + 2))?;
        a.fnstenv(ptr(rsi + 0x100))?;
        a.fldenv(ptr(rsi + 0x100))?;
        a.mov(eax, 7)?;
        a.fld1()
    };
    if let Some((e, _, fpu, _)) = both(body, &data) {
        assert_eq!(e.map(|x| x.0), Some(16), "#MF");
        assert_eq!(fpu.fsw & 0x84, 0x84, "ZE and ES");
    }
}

fn differential(seed: u64, count: u64) {
    let Some(report) = x87::differential(seed, count, 5) else {
        return;
    };
    let report = report.expect("x87 differential run");
    println!(
        "x87 differential: seed {seed:#x}: {} blocks ({} ran to their end, {} ended in the #PF of an operand crossing into the unmapped page), {} instructions, {} divergences",
        report.blocks,
        report.completed,
        report.page_faults,
        report.instructions,
        report.divergences.len()
    );
    for d in &report.divergences {
        println!("{d}\n");
    }
    assert_eq!(report.divergences.len(), 0, "x87 divergences");
}

/// Random x87 blocks, bit for bit against the hardware (`ANYVISOR_X87_BLOCKS` or
/// `ANYVISOR_DIFF_BLOCKS` for more, `ANYVISOR_X87_SEED` or `ANYVISOR_DIFF_SEED`).
#[test]
fn x87_differential() {
    differential(
        conformance::diff_seed("ANYVISOR_X87_SEED", 0x87),
        conformance::diff_blocks("ANYVISOR_X87_BLOCKS", 500),
    );
}

/// The comparison sees a one-bit difference in a register, the status word or memory, and
/// tolerates a transcendental result only within its tolerance.
#[test]
fn x87_compare_detects_differences() {
    let base = x87::Outcome {
        exception: None,
        cr2: 0,
        rflags: 0x202,
        rax: 0,
        fpu: hv::FpuState {
            ftw: 0xff,
            ..Default::default()
        },
        scratch: vec![0; 8192],
    };
    assert!(x87::compare(&base, &base, false).is_none());
    // A different CR2 of the same #PF, a byte of the second scratch page.
    let mut pf = base.clone();
    pf.exception = Some((14, 0x10000));
    pf.cr2 = 0x22000;
    let mut b = pf.clone();
    b.cr2 = 0x22001;
    assert!(x87::compare(&pf, &b, false).is_some());
    let mut b = base.clone();
    b.scratch[0x1ff0] ^= 4;
    assert!(x87::compare(&base, &b, false).is_some());
    let mut b = base.clone();
    b.fpu.st[3][0] ^= 1;
    assert!(x87::compare(&base, &b, false).is_some(), "register bit");
    let mut b = base.clone();
    b.fpu.fsw ^= 0x200;
    assert!(x87::compare(&base, &b, false).is_some(), "C1");
    assert!(
        x87::compare(&base, &b, true).is_none(),
        "C1 after a transcendental and #MF"
    );
    let mut b = base.clone();
    b.scratch[0x812] ^= 0x10;
    assert!(x87::compare(&base, &b, false).is_some(), "memory");
    // A transcendental result 1.0 vs 1.0 + 2^-60 (tolerated) and 1.0 + 2^-40 (not).
    let one = |m: u64| {
        let mut v = m.to_le_bytes().to_vec();
        v.extend_from_slice(&0x3fffu16.to_le_bytes());
        v
    };
    let mut a = base.clone();
    a.scratch[x87::TRANS as usize..x87::TRANS as usize + 10].copy_from_slice(&one(1 << 63));
    let mut b = a.clone();
    b.scratch[x87::TRANS as usize..x87::TRANS as usize + 10].copy_from_slice(&one((1 << 63) | 8));
    assert!(x87::compare(&a, &b, false).is_none(), "within tolerance");
    b.scratch[x87::TRANS as usize..x87::TRANS as usize + 10]
        .copy_from_slice(&one((1 << 63) | (1 << 23)));
    assert!(x87::compare(&a, &b, false).is_some(), "beyond tolerance");
}
