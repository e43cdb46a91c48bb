//! AVX/AVX2/FMA/F16C differential runs: random VEX blocks on KVM (the host CPU) and emu.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use conformance::diff_avx;

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => {
            let v = v.trim();
            let parsed = match v.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => v.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("{name}={v} is not a number"))
        }
        Err(_) => default,
    }
}

/// `ANYVISOR_AVX_DIFF_BLOCKS` blocks (default 300) from `ANYVISOR_AVX_DIFF_SEED`.
#[test]
fn avx_differential() {
    let seed = env_u64("ANYVISOR_AVX_DIFF_SEED", 0xa7c5);
    let count = env_u64("ANYVISOR_AVX_DIFF_BLOCKS", 300);
    let Some(report) = diff_avx::differential(seed, count) else {
        return;
    };
    let report = report.expect("differential run");
    println!(
        "AVX differential: seed {seed:#x}: {} blocks ({} ran to their end), {} instructions, {} divergences",
        report.blocks,
        report.completed,
        report.instructions,
        report.divergences.len()
    );
    for d in &report.divergences {
        println!("{d}\n");
    }
    assert!(report.divergences.is_empty(), "{} divergences", report.divergences.len());
}

/// The generator covers the families: AVX, AVX2, FMA and F16C forms are all candidates.
#[test]
fn avx_candidates_cover_the_families() {
    use iced_x86::Mnemonic as M;
    let codes = diff_avx::candidates();
    for m in [
        M::Vaddps,
        M::Vpaddb,
        M::Vfmadd231ps,
        M::Vcvtps2ph,
        M::Vpermq,
        M::Vpsllvd,
        M::Vbroadcastss,
        M::Vperm2f128,
        M::Vmaskmovps,
        M::Vpblendvb,
    ] {
        assert!(codes.iter().any(|c| c.mnemonic() == m), "{m:?}");
    }
    println!("{} instruction forms", codes.len());
}
