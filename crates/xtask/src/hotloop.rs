//! `bench hotloop`: guest instructions per second in two bignum-style hot loops
//! (`guest/src/hotloop.c`: the shapes of the kernel's `mpihelp_add_n` and `mpihelp_addmul_1`,
//! with an exact instruction count), run in guest user mode by each VMM.

use std::path::{Path, PathBuf};

use crate::boot::wait_outcome;
use crate::serial::parse_kv_line;
use crate::table::{self, Outcome, Table};
use crate::vmproc::{VmProc, command_line};
use crate::{Setup, anyvisor_args, cmdline, qemu_args};

const MEM_MIB: u64 = 256;

/// One run's figures: guest instructions per second of each loop, and the result digest.
#[derive(Debug, Clone, PartialEq)]
pub struct LoopResult {
    pub add_n: f64,
    pub addmul_1: f64,
    pub check: String,
}

/// Parses `HOTLOOP add_n_insns=N add_n_ns=T addmul_1_insns=N addmul_1_ns=T check=X`.
pub fn parse_hotloop(line: &str) -> Result<LoopResult, String> {
    let kv = parse_kv_line(line, "HOTLOOP").ok_or("no HOTLOOP line")?;
    let get = |k: &str| {
        kv.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .ok_or_else(|| format!("HOTLOOP without {k}"))
    };
    let num = |k: &str| -> Result<f64, String> {
        get(k)?
            .parse::<u64>()
            .map(|n| n as f64)
            .map_err(|_| format!("HOTLOOP {k} is not a count"))
    };
    let rate = |insns: &str, ns: &str| -> Result<f64, String> {
        let t = num(ns)?;
        if t <= 0.0 {
            return Err(format!("HOTLOOP {ns} is 0"));
        }
        Ok(num(insns)? / t * 1e9)
    };
    Ok(LoopResult {
        add_n: rate("add_n_insns", "add_n_ns")?,
        addmul_1: rate("addmul_1_insns", "addmul_1_ns")?,
        check: get("check")?.to_string(),
    })
}

fn run_case(setup: &Setup, program: &Path, args: &[String]) -> Outcome<LoopResult> {
    let mut p = match VmProc::spawn(program, args, MEM_MIB << 20) {
        Ok(p) => p,
        Err(e) => return Outcome::Failed(format!("cannot start: {e}")),
    };
    let w = p.wait_line(0, "HOTLOOP", setup.deadline());
    let out = match wait_outcome(&p, &w, setup.timeout_secs) {
        Outcome::Ok(i) => match parse_hotloop(&p.lines[i].text) {
            Ok(r) => Outcome::Ok(r),
            Err(e) => Outcome::Failed(e),
        },
        Outcome::Failed(m) => Outcome::Failed(m),
        Outcome::Timeout(s) => Outcome::Timeout(s),
    };
    p.kill();
    out
}

/// The median rate of each loop over the runs that succeeded; a run whose digest differs
/// from the first good run's is a failure (the loops computed something else).
fn summarize(runs: Vec<Outcome<LoopResult>>, expect: Option<&str>) -> Outcome<LoopResult> {
    let mut ok = Vec::new();
    for r in &runs {
        if let Some(v) = r.ok() {
            if expect.is_some_and(|e| e != v.check) {
                return Outcome::Failed(format!(
                    "wrong result: check={} (expected {})",
                    v.check,
                    expect.unwrap_or_default()
                ));
            }
            ok.push(v);
        }
    }
    let med =
        |g: fn(&LoopResult) -> f64| table::median(&ok.iter().map(|r| g(r)).collect::<Vec<_>>());
    match (med(|r| r.add_n), med(|r| r.addmul_1), ok.first()) {
        (Some(add_n), Some(addmul_1), Some(first)) => Outcome::Ok(LoopResult {
            add_n,
            addmul_1,
            check: first.check.clone(),
        }),
        _ => runs
            .into_iter()
            .next()
            .unwrap_or_else(|| Outcome::Failed("no run".into())),
    }
}

/// The digest the loops give on a correct CPU: the host's, from the same program built for
/// the guest kit (`guest/out/guest-bin/hotloop`), if it can run here.
fn host_check(kit: &Path) -> Option<String> {
    let bin: PathBuf = kit.join("guest-bin/hotloop");
    let out = std::process::Command::new(bin).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("HOTLOOP"))?;
    parse_hotloop(line).ok().map(|r| r.check)
}

pub fn run(setup: &Setup) {
    let append = cmdline("hotloop");
    let mut cases: Vec<(String, PathBuf, Vec<String>, bool)> = Vec::new();
    for b in &setup.backends {
        let args = anyvisor_args(setup, b, "bzImage", MEM_MIB, &append);
        cases.push((format!("anyvisor {b}"), setup.anyvisor.clone(), args, false));
    }
    if setup.qemu_enabled {
        let args = qemu_args(setup, "tcg", "bzImage", MEM_MIB, &append);
        cases.push(("QEMU 7.2 TCG".into(), setup.qemu.clone(), args, true));
    }
    let expect = host_check(&setup.kit);
    let mut cmds = Vec::new();
    let mut results: Vec<Vec<Outcome<LoopResult>>> = cases.iter().map(|_| Vec::new()).collect();
    // Rounds over all cases, so a change in the host's load hits every VMM alike.
    for round in 0..setup.runs {
        for ((label, program, args, _), out) in cases.iter().zip(results.iter_mut()) {
            if round == 0 {
                cmds.push((label.clone(), command_line(program, args)));
            }
            eprintln!("[hotloop] {label} (run {}/{})", round + 1, setup.runs);
            let r = run_case(setup, program, args);
            eprintln!("[hotloop]   {r:?}");
            out.push(r);
        }
    }
    let rows: Vec<(String, Outcome<LoopResult>, bool)> = cases
        .into_iter()
        .zip(results)
        .map(|((label, _, _, peer), runs)| (label, summarize(runs, expect.as_deref()), peer))
        .collect();
    crate::print_header("Bignum-style hot loops in guest user mode", setup);
    let mut t = Table::new(&[
        "VMM",
        "add_n (G instr/s)",
        "addmul_1 (G instr/s)",
        "add_n vs QEMU",
        "addmul_1 vs QEMU",
        "result",
    ]);
    let peer = rows.iter().find(|r| r.2).and_then(|r| r.1.ok().cloned());
    for (label, r, is_peer) in &rows {
        let v = r.ok();
        let p = if *is_peer { None } else { peer.as_ref() };
        t.row(vec![
            label.clone(),
            v.map_or("-".into(), |r| format!("{:.2}", r.add_n / 1e9)),
            v.map_or("-".into(), |r| format!("{:.2}", r.addmul_1 / 1e9)),
            table::ratio(v.map(|r| r.add_n), p.map(|r| r.add_n)),
            table::ratio(v.map(|r| r.addmul_1), p.map(|r| r.addmul_1)),
            r.problem().unwrap_or_else(|| "ok".into()),
        ]);
    }
    print!("{t}");
    println!(
        "\nMeasured inside the guest by /bin/hotloop (guest/src/hotloop.c): add_n is 648 M \
         instructions of adc-chain limb additions, addmul_1 580 M instructions of mul/add/adc \
         limb products, both timed with CLOCK_MONOTONIC in guest user mode; each rate is the \
         exact instruction count over that time. {} With --runs N, each figure is the median of \
         the runs that succeeded (the VMMs take turns). Above 1 is better here. On a KVM-PVM \
         host, `anyvisor kvm` runs guest user mode on the CPU when the hybrid hands it over.",
        match &expect {
            Some(c) => format!("Every run's result digest was checked against the host's ({c})."),
            None => "The host could not run the kit's hotloop, so results were not checked.".into(),
        }
    );
    crate::print_commands(&cmds);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_guest_line() {
        let r = parse_hotloop(
            "HOTLOOP add_n_insns=648000000 add_n_ns=324000000 addmul_1_insns=580000000 \
             addmul_1_ns=1160000000 check=a573ee34b111df05",
        )
        .unwrap();
        assert_eq!(r.add_n, 2e9);
        assert_eq!(r.addmul_1, 0.5e9);
        assert_eq!(r.check, "a573ee34b111df05");
        assert!(
            parse_hotloop(
                "HOTLOOP add_n_insns=1 add_n_ns=0 addmul_1_insns=1 addmul_1_ns=1 check=0"
            )
            .is_err()
        );
        assert!(parse_hotloop("HOTLOOP add_n_insns=1").is_err());
        assert!(parse_hotloop("nothing").is_err());
    }

    #[test]
    fn a_wrong_digest_fails_the_row() {
        let r = |c: &str| {
            Outcome::Ok(LoopResult {
                add_n: 1e9,
                addmul_1: 1e9,
                check: c.into(),
            })
        };
        assert!(summarize(vec![r("aa"), r("aa")], Some("aa")).ok().is_some());
        assert!(summarize(vec![r("aa"), r("bb")], Some("aa")).ok().is_none());
        assert!(summarize(vec![r("bb")], None).ok().is_some());
    }
}
