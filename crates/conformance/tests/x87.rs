//! x87 on KVM (the host CPU at CPL 3) against emu: fixed bodies and the random-block
//! differential tester (`conformance::diff::x87`).

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use conformance::diff::x87;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().parse().unwrap_or_else(|_| panic!("{name}={v} is not a number")))
        .unwrap_or(default)
}

fn differential(seed: u64, count: u64) {
    let Some(report) = x87::differential(seed, count, 5) else {
        return;
    };
    let report = report.expect("x87 differential run");
    println!(
        "x87 differential: seed {seed:#x}: {} blocks ({} ran to their end), {} instructions, {} divergences",
        report.blocks,
        report.completed,
        report.instructions,
        report.divergences.len()
    );
    for d in &report.divergences {
        println!("{d}\n");
    }
    assert_eq!(report.divergences.len(), 0, "x87 divergences");
}

/// Random x87 blocks, bit for bit against the hardware (`ANYVISOR_X87_BLOCKS` for more).
#[test]
fn x87_differential() {
    differential(
        env_u64("ANYVISOR_X87_SEED", 0x87),
        env_u64("ANYVISOR_X87_BLOCKS", 500),
    );
}
