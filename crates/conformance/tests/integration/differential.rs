//! KVM-vs-emu differential runs, and proof that the comparison detects a difference.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use conformance::diff::{self, Privilege, compare};

fn check(privilege: Privilege, seed: u64, count: u64) {
    let Some(report) = diff::differential_at(privilege, seed, count) else {
        return;
    };
    let report = report.expect("differential run");
    println!(
        "differential ({privilege:?}): seed {seed:#x}: {}, {} known KVM emulator differences",
        totals(&report),
        report.known.len()
    );
    for d in report.known.iter().take(3) {
        println!("NOTE: known difference of KVM's instruction emulator (not emu):\n{d}\n");
    }
    if report.known.len() > 3 {
        println!(
            "NOTE: {} more known KVM emulator differences",
            report.known.len() - 3
        );
    }
    for d in &report.divergences {
        println!("{d}\n");
    }
    let real = report.divergences.len();
    assert_eq!(real, 0, "{real} divergences");
}

/// The totals of a differential run, for its summary line.
fn totals(report: &diff::Report) -> String {
    format!(
        "{} blocks ({} ran to their end, {} ended in the #PF of an operand crossing into the unmapped page), {} instructions, {} divergences",
        report.blocks,
        report.completed,
        report.page_faults,
        report.instructions,
        report.divergences.len()
    )
}

/// Checks a differential run of `what`'s blocks from `seed` (the AVX and ext testers'): prints
/// its totals and every divergence, and fails on a divergence. Returns the report for further
/// checks; `None` without KVM (nothing ran).
pub(crate) fn checked(
    what: &str,
    seed: u64,
    run: Option<conformance::Result<diff::Report>>,
) -> Option<diff::Report> {
    let report = run?.expect("differential run");
    println!("{what} differential: seed {seed:#x}: {}", totals(&report));
    for d in &report.divergences {
        println!("{d}\n");
    }
    assert!(
        report.divergences.is_empty(),
        "{} divergences",
        report.divergences.len()
    );
    Some(report)
}

/// CPL 3: KVM runs the blocks on the host CPU. `ANYVISOR_INT_DIFF_BLOCKS` or
/// `ANYVISOR_DIFF_BLOCKS` (default 200), `ANYVISOR_INT_DIFF_SEED` or `ANYVISOR_DIFF_SEED`.
#[test]
fn differential_short() {
    check(
        Privilege::User,
        conformance::diff_seed("ANYVISOR_INT_DIFF_SEED", 0x5eed),
        conformance::diff_blocks("ANYVISOR_INT_DIFF_BLOCKS", 200),
    );
}

/// CPL 0: on a PVM host, KVM's instruction emulator (and emu behind it) against emu.
#[test]
fn differential_kernel_short() {
    check(
        Privilege::Kernel,
        conformance::diff_seed("ANYVISOR_INT_DIFF_SEED", 0x5eed),
        conformance::diff_blocks("ANYVISOR_KERNEL_DIFF_BLOCKS", 100),
    );
}

#[test]
#[ignore = "long: cargo test -p conformance --release -- --ignored differential_long"]
fn differential_long() {
    let privilege = match std::env::var("ANYVISOR_DIFF_CPL").as_deref() {
        Ok("0") => Privilege::Kernel,
        _ => Privilege::User,
    };
    check(
        privilege,
        conformance::diff_seed("ANYVISOR_INT_DIFF_SEED", 0x5eed_1234),
        conformance::diff_blocks("ANYVISOR_DIFF_COUNT", 20_000),
    );
}

/// Emu against itself: the machinery (state reset between blocks, scratch page, masking) finds
/// nothing where nothing differs.
#[test]
fn emu_against_emu_agrees() {
    let r = diff::run(
        &conformance::emu(),
        &conformance::emu(),
        Privilege::User,
        7,
        50,
        5,
    )
    .expect("run");
    assert_eq!(r.blocks, 50);
    assert!(r.instructions >= 50);
    for d in &r.divergences {
        println!("{d}");
    }
    assert!(r.divergences.is_empty());
}

/// The comparison detects a changed register, flag or scratch byte, and ignores only the
/// flags the block leaves undefined.
#[test]
fn comparison_detects_differences() {
    let emu = conformance::emu();
    let mut runner = diff::Runner::new(&emu, Privilege::User).expect("runner");
    let block = diff::generate(1, 0, 4).expect("block");
    let a = runner.run(&block).expect("run");
    assert_eq!(compare(&block, &a, &a), None);
    let mut b = a.clone();
    b.regs.r9 ^= 1 << 40;
    assert_eq!(compare(&block, &a, &b).map(|d| d.0), Some("r9".to_string()));
    let mut b = a.clone();
    b.scratch[4095] ^= 0x80;
    assert!(compare(&block, &a, &b).is_some_and(|d| d.0.starts_with("scratch[0xff8]")));
    let defined = conformance::STATUS & !block.undefined;
    if defined != 0 {
        let mut b = a.clone();
        b.regs.rflags ^= defined & defined.wrapping_neg();
        assert!(compare(&block, &a, &b).is_some_and(|d| d.0.starts_with("rflags")));
    }
    let mut masked = block.clone();
    masked.undefined = conformance::STATUS;
    let mut b = a.clone();
    b.regs.rflags ^= conformance::STATUS;
    assert_eq!(compare(&masked, &a, &b), None);
    let mut b = a.clone();
    b.exception = Some((6, 0));
    assert!(compare(&block, &a, &b).is_some());
}

/// Generation is deterministic per (seed, block) and differs across seeds.
#[test]
fn generation_is_deterministic() {
    let a = diff::generate(42, 3, 12).expect("block");
    let b = diff::generate(42, 3, 12).expect("block");
    assert_eq!(a.bytes, b.bytes);
    assert_eq!(a.regs, b.regs);
    let c = diff::generate(43, 3, 12).expect("block");
    assert_ne!((a.bytes, a.regs), (c.bytes, c.regs));
}

/// Encoded blocks decode back to the generated instructions.
#[test]
fn blocks_decode_back() {
    for n in 0..300 {
        let b = diff::generate(0x5eed, n, 12).expect("block");
        let mut d = iced_x86::Decoder::with_ip(64, &b.bytes, conformance::CODE, 0);
        for (k, i) in b.instructions.iter().enumerate() {
            let got = d.decode();
            assert_eq!(
                got.code(),
                i.code(),
                "block {n} instruction {k}: {}",
                b.describe(k)
            );
        }
    }
}
