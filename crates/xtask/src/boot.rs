//! `bench boot`: process start to `ANYVISOR-INIT-OK`, to exit after `poweroff`, the CPU time
//! (user + system) the VMM used up to `ANYVISOR-INIT-OK`, and memory.

use std::path::PathBuf;
use std::time::Duration;

use crate::table::{self, Outcome, Table};
use crate::vmproc::{VmProc, Wait, command_line};
use crate::{Setup, anyvisor_args, cmdline, qemu_args};

const MEM_MIB: u64 = 256;

struct Case {
    vmm: String,
    backend: String,
    kernel: &'static str,
    program: PathBuf,
    args: Vec<String>,
    /// QEMU TCG: what anyvisor is compared with.
    peer: bool,
}

#[derive(Debug, Clone)]
struct RunResult {
    init: Outcome<Duration>,
    /// CPU time (user + system) of the VMM process when `ANYVISOR-INIT-OK` arrived.
    init_cpu: Option<Duration>,
    exit: Outcome<Duration>,
    hwm_kb: Option<u64>,
    guest_kb: Option<u64>,
}

/// Turns a wait that did not find the marker into an outcome.
pub fn wait_outcome(p: &VmProc, w: &Wait, timeout: u64) -> Outcome<usize> {
    match w {
        Wait::Found(i) => Outcome::Ok(*i),
        Wait::Exited => Outcome::Failed(p.failure_reason()),
        Wait::Fatal(m) => Outcome::Failed(m.clone()),
        Wait::Timeout => {
            if let Some(l) = p.lines.last() {
                eprintln!("[xtask]   timeout; last console line: {}", l.text);
            }
            Outcome::Timeout(timeout)
        }
    }
}

fn run_once(setup: &Setup, case: &Case) -> RunResult {
    let mut r = RunResult {
        init: Outcome::Failed("not started".into()),
        init_cpu: None,
        exit: Outcome::Failed("not reached".into()),
        hwm_kb: None,
        guest_kb: None,
    };
    let mut p = match VmProc::spawn(&case.program, &case.args, MEM_MIB << 20) {
        Ok(p) => p,
        Err(e) => {
            r.init = Outcome::Failed(format!("cannot start: {e}"));
            return r;
        }
    };
    let deadline = setup.deadline();
    let w = p.wait_line(0, "ANYVISOR-INIT-OK", deadline);
    if matches!(w, Wait::Found(_)) {
        r.init_cpu = crate::cpu::cpu_time(p.pid());
    }
    r.init = match wait_outcome(&p, &w, setup.timeout_secs) {
        Outcome::Ok(i) => Outcome::Ok(p.lines[i].at),
        Outcome::Failed(m) => Outcome::Failed(m),
        Outcome::Timeout(s) => Outcome::Timeout(s),
    };
    if r.init.ok().is_some() {
        r.exit = match p.wait_exit(deadline) {
            Some((t, st)) if st.success() => Outcome::Ok(t),
            Some((_, st)) => Outcome::Failed(format!("{st}: {}", p.failure_reason())),
            None => Outcome::Timeout(setup.timeout_secs),
        };
    } else {
        r.exit = r.init.clone();
    }
    if p.mem.hwm_kb > 0 {
        r.hwm_kb = Some(p.mem.hwm_kb);
    }
    r.guest_kb = p.mem.guest_rss_kb;
    p.kill();
    r
}

struct Summary {
    ok: usize,
    init: Option<f64>,
    init_cpu: Option<f64>,
    exit: Option<f64>,
    hwm_kb: Option<f64>,
    guest_kb: Option<f64>,
    beyond_kb: Option<f64>,
    problem: Option<String>,
}

fn summarize(results: &[RunResult]) -> Summary {
    let init: Vec<f64> = results
        .iter()
        .filter_map(|r| r.init.ok().map(Duration::as_secs_f64))
        .collect();
    let exit: Vec<f64> = results
        .iter()
        .filter_map(|r| r.exit.ok().map(Duration::as_secs_f64))
        .collect();
    let init_cpu: Vec<f64> = results
        .iter()
        .filter_map(|r| r.init_cpu.map(|d| d.as_secs_f64()))
        .collect();
    // Memory only from runs that booted and powered off: a failed run stops early.
    let good: Vec<&RunResult> = results.iter().filter(|r| r.exit.ok().is_some()).collect();
    let hwm: Vec<f64> = good
        .iter()
        .filter_map(|r| r.hwm_kb.map(|v| v as f64))
        .collect();
    let guest: Vec<f64> = good
        .iter()
        .filter_map(|r| r.guest_kb.map(|v| v as f64))
        .collect();
    let beyond: Vec<f64> = good
        .iter()
        .filter_map(|r| Some(r.hwm_kb?.saturating_sub(r.guest_kb?) as f64))
        .collect();
    Summary {
        ok: exit.len(),
        init: table::median(&init),
        init_cpu: table::median(&init_cpu),
        exit: table::median(&exit),
        hwm_kb: table::median(&hwm),
        guest_kb: table::median(&guest),
        beyond_kb: table::median(&beyond),
        problem: results
            .iter()
            .find_map(|r| r.init.problem().or_else(|| r.exit.problem())),
    }
}

fn cases(setup: &Setup) -> Vec<Case> {
    let append = cmdline("poweroff");
    let mut v = Vec::new();
    for b in &setup.backends {
        for k in ["bzImage", "vmlinux"] {
            v.push(Case {
                vmm: "anyvisor".into(),
                backend: b.clone(),
                kernel: k,
                program: setup.anyvisor.clone(),
                args: anyvisor_args(setup, b, k, MEM_MIB, &append),
                peer: false,
            });
        }
    }
    if setup.qemu_enabled {
        for (accel, k) in [("tcg", "bzImage"), ("tcg", "vmlinux"), ("kvm", "bzImage")] {
            v.push(Case {
                vmm: "QEMU 7.2 microvm".into(),
                backend: accel.into(),
                kernel: k,
                program: setup.qemu.clone(),
                args: qemu_args(setup, accel, k, MEM_MIB, &append),
                peer: accel == "tcg",
            });
        }
    }
    v
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "-".into())
}

pub fn run(setup: &Setup) {
    let cases = cases(setup);
    let mut sums = Vec::new();
    for c in &cases {
        let mut results = Vec::new();
        for i in 0..setup.runs {
            eprintln!(
                "[boot] {} {} {} run {}/{}",
                c.vmm,
                c.backend,
                c.kernel,
                i + 1,
                setup.runs
            );
            let r = run_once(setup, c);
            eprintln!(
                "[boot]   init {:?} exit {:?} hwm {:?} KiB guest {:?} KiB",
                r.init, r.exit, r.hwm_kb, r.guest_kb
            );
            results.push(r);
        }
        sums.push(summarize(&results));
    }
    crate::print_header("Boot: process start to ANYVISOR-INIT-OK and to exit", setup);
    let mut t = Table::new(&[
        "VMM",
        "backend",
        "kernel",
        "ok runs",
        "to INIT-OK (s)",
        "to exit (s)",
        "CPU to INIT-OK (s)",
        "INIT-OK vs QEMU TCG",
        "exit vs QEMU TCG",
        "CPU vs QEMU TCG",
        "peak RSS (MiB)",
        "guest RAM resident (MiB)",
        "RSS beyond guest (MiB)",
        "beyond vs QEMU TCG",
        "result",
    ]);
    let peer_for = |kernel: &str| -> Option<usize> {
        let same = cases
            .iter()
            .zip(&sums)
            .position(|(c, s)| c.peer && c.kernel == kernel && s.ok > 0);
        same.or_else(|| {
            cases
                .iter()
                .zip(&sums)
                .position(|(c, s)| c.peer && s.ok > 0)
        })
    };
    for (c, s) in cases.iter().zip(&sums) {
        let peer = if c.peer {
            None
        } else {
            peer_for(c.kernel).map(|i| &sums[i])
        };
        let mib = |kb: f64| table::mib(kb as u64);
        t.row(vec![
            c.vmm.clone(),
            c.backend.clone(),
            c.kernel.into(),
            format!("{}/{}", s.ok, setup.runs),
            opt(s.init, |v| format!("{v:.2}")),
            opt(s.exit, |v| format!("{v:.2}")),
            opt(s.init_cpu, |v| format!("{v:.2}")),
            table::ratio(s.init, peer.and_then(|p| p.init)),
            table::ratio(s.exit, peer.and_then(|p| p.exit)),
            table::ratio(s.init_cpu, peer.and_then(|p| p.init_cpu)),
            opt(s.hwm_kb, mib),
            opt(s.guest_kb, mib),
            opt(s.beyond_kb, mib),
            table::ratio(s.beyond_kb, peer.and_then(|p| p.beyond_kb)),
            s.problem.clone().unwrap_or_else(|| "ok".into()),
        ]);
    }
    print!("{t}");
    println!(
        "\nRatios are anyvisor / QEMU TCG with the same kernel (bzImage row if that one failed); \
         below 1 is better. CPU to INIT-OK is the VMM process's user + system time (/proc/PID/stat) \
         when ANYVISOR-INIT-OK arrived: the figure to compare on a loaded host. Peak RSS is the highest VmHWM sampled (every 100 ms and at \
         ANYVISOR-INIT-OK); guest RAM resident is the Rss of the {MEM_MIB} MiB anonymous mapping \
         in /proc/PID/smaps at the last sample; RSS beyond guest = peak RSS - guest RAM resident."
    );
    let cmds: Vec<(String, String)> = cases
        .iter()
        .map(|c| {
            (
                format!("{} {} {}", c.vmm, c.backend, c.kernel),
                command_line(&c.program, &c.args),
            )
        })
        .collect();
    crate::print_commands(&cmds);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_uses_successful_runs_and_reports_the_first_problem() {
        let ok = RunResult {
            init: Outcome::Ok(Duration::from_secs(2)),
            init_cpu: Some(Duration::from_millis(1500)),
            exit: Outcome::Ok(Duration::from_secs(3)),
            hwm_kb: Some(300_000),
            guest_kb: Some(100_000),
        };
        let timeout = RunResult {
            init: Outcome::Timeout(60),
            init_cpu: None,
            exit: Outcome::Timeout(60),
            hwm_kb: Some(900_000),
            guest_kb: None,
        };
        let s = summarize(&[timeout, ok]);
        assert_eq!(s.ok, 1);
        assert_eq!(s.init, Some(2.0));
        assert_eq!(s.exit, Some(3.0));
        assert_eq!(s.init_cpu, Some(1.5));
        assert_eq!(s.beyond_kb, Some(200_000.0));
        assert_eq!(s.hwm_kb, Some(300_000.0));
        assert_eq!(s.problem.as_deref(), Some("timeout (60 s)"));
    }
}
