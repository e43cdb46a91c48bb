//! `bench cpu`: a user-mode, AVX2/SHA-heavy workload with fixed work in the Debian 12 guest
//! (`guest/out/debian.img`, built by `guest/build-distro.sh`), on anyvisor emu, anyvisor kvm
//! (the hybrid: guest user mode on the CPU) and QEMU TCG `-cpu max`, side by side.
//!
//! Each runner boots the image (a fresh qcow2 overlay, 1 GiB, one vCPU) into the image's shell
//! mode (`anyvisor.distro=shell`), the harness types the workload on the serial console, and
//! the guest prints a marker line before the workload, one after each step and one at the end.
//! When a marker arrives the harness reads the VMM process's CPU time (`utime + stime` of
//! `/proc/PID/stat`, every thread): each step's CPU time and host wall time are the differences
//! between its markers, so only the workload is measured, not the boot or the preparation.
//!
//! The steps (fixed inputs: `data.bin` of the image, 256 KiB of text, repeated to 16 MiB):
//! * `openssl-sha256`: `openssl dgst -sha256` of 32 MiB (SHA-NI where the CPU shows it, else
//!   OpenSSL's AVX2 code),
//! * `sha256sum`: coreutils' portable C SHA-256 of 16 MiB (integer code),
//! * `aes-256-cbc`: `openssl enc` of 16 MiB (AES-NI),
//! * `wc-l`: `wc -l` of 64 MiB (coreutils' AVX2 line counting),
//! * `xz`: `xz -1` of 16 MiB and back (integer code, CLMUL CRC).
//!
//! Each step's output goes through `sha256sum` in the guest and its first 16 hex digits are
//! printed: every runner must print the same (the last column says so).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::Setup;
use crate::boot::wait_outcome;
use crate::table::{self, Outcome, Table};
use crate::vmproc::{VmProc, command_line};

/// Guest RAM in MiB (the image's workload wants ~1 GiB for xz -9; this one needs less).
const MEM_MIB: u64 = 1024;
/// Guest markers. The harness turns the tty's echo off first, and the markers are built by the
/// shell (`CPUB-$((0))BEGIN` prints `CPUB-0BEGIN`), so a typed line echoed before `stty -echo`
/// took effect is never taken for one.
const READY: &str = "CPUB-READY-16777216";
const BEGIN: &str = "CPUB-BEGIN";
const STEP: &str = "CPUB-0STEP ";
const END: &str = "CPUB-END";

/// (step name, what it exercises), in the order the guest runs them.
pub const STEPS: [(&str, &str); 5] = [
    (
        "openssl-sha256",
        "openssl dgst -sha256, 32 MiB (SHA-NI / AVX2)",
    ),
    ("sha256sum", "coreutils sha256sum, 16 MiB (integer C)"),
    ("aes-256-cbc", "openssl enc, 16 MiB (AES-NI)"),
    ("wc-l", "wc -l, 64 MiB (AVX2)"),
    ("xz", "xz -1 and xz -d, 16 MiB (integer, CLMUL CRC)"),
];

/// The lines typed on the guest's console, in order.
fn script() -> Vec<String> {
    let mut s = vec![
        "stty -echo".to_string(),
        "cd /tmp && D=/usr/local/share/anyvisor-distro/data.bin && \
         for i in $(seq 64); do cat $D; done > big && sync && \
         echo CPUB-READY-$(stat -c %s big)"
            .to_string(),
        "K=000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f; \
         V=f0e0d0c0b0a090807060504030201000"
            .to_string(),
        "st() { local n=$1; shift; local h; h=$(\"$@\" 2>&1 | sha256sum | cut -c1-16); \
         echo \"CPUB-$((0))STEP $n $h\"; }"
            .to_string(),
        "w_openssl_sha256() { openssl dgst -sha256 big big; }".to_string(),
        "w_sha256sum() { sha256sum big; }".to_string(),
        "w_aes_256_cbc() { openssl enc -aes-256-cbc -K $K -iv $V -in big; }".to_string(),
        "w_wc_l() { wc -l big big big big; }".to_string(),
        "w_xz() { xz -1 -T1 -c big | xz -dc; }".to_string(),
    ];
    let mut run = "echo CPUB-$((0))BEGIN".to_string();
    for (name, _) in STEPS {
        run.push_str(&format!("; st {name} w_{}", name.replace('-', "_")));
    }
    run.push_str("; echo CPUB-$((0))END");
    // `CPUB-$((0))BEGIN` prints `CPUB-0BEGIN`: match what the shell prints.
    s.push(run);
    s
}

/// The markers as the guest prints them (see [`script`]).
fn begin_marker() -> String {
    BEGIN.replace("CPUB-", "CPUB-0")
}

fn end_marker() -> String {
    END.replace("CPUB-", "CPUB-0")
}

/// `utime + stime` of a `/proc/PID/stat` line, in clock ticks (USER_HZ, 100 on Linux).
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(0) ppid pgrp session tty_nr tpgid flags minflt cminflt majflt
    // cmajflt utime(11) stime(12).
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// CPU time the process has used so far (user + system).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_ticks(&text).map(|t| Duration::from_millis(t * 10))
}

/// One step's figures on one runner.
#[derive(Debug, Clone, PartialEq)]
pub struct StepResult {
    pub wall: Duration,
    pub cpu: Duration,
    /// First 16 hex digits of the sha256 of the step's output.
    pub digest: String,
}

/// One runner's figures: boot to the shell, then each step.
#[derive(Debug, Clone)]
struct RunnerResult {
    boot: Outcome<(Duration, Duration)>,
    steps: Outcome<Vec<StepResult>>,
}

/// `CPUB-STEP <name> <digest>`: (name, digest).
pub fn parse_step(line: &str) -> Option<(String, String)> {
    let rest = &line[line.find(STEP)? + STEP.len()..];
    let mut f = rest.split_whitespace();
    Some((f.next()?.to_string(), f.next()?.to_string()))
}

fn kernel_cmdline(kit: &Path) -> Result<String, String> {
    let info = kit.join("debian-info");
    let text = std::fs::read_to_string(&info)
        .map_err(|e| format!("{}: {e} (run guest/build-distro.sh)", info.display()))?;
    let root = text
        .lines()
        .find_map(|l| l.strip_prefix("cmdline="))
        .ok_or_else(|| format!("{}: no cmdline= line", info.display()))?;
    Ok(format!(
        "{root} panic=-1 reboot=k init=/usr/local/bin/anyvisor-distro-init anyvisor.distro=shell"
    ))
}

/// A fresh qcow2 overlay on the image in the scratch directory.
fn overlay(setup: &Setup, image: &Path, name: &str) -> Result<PathBuf, String> {
    let ov = setup.scratch(name);
    let image = image
        .canonicalize()
        .map_err(|e| format!("{}: {e}", image.display()))?;
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&image)
        .arg(&ov)
        .output()
        .map_err(|e| format!("qemu-img: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img create: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(ov)
}

fn run_case(setup: &Setup, program: &Path, args: &[String]) -> RunnerResult {
    let mut r = RunnerResult {
        boot: Outcome::Failed("not started".into()),
        steps: Outcome::Failed("not reached".into()),
    };
    let mut p = match VmProc::spawn(program, args, MEM_MIB << 20) {
        Ok(p) => p,
        Err(e) => {
            r.boot = Outcome::Failed(format!("cannot start: {e}"));
            return r;
        }
    };
    let w = p.wait_line(0, "DISTRO-SHELL", setup.deadline());
    let shell = match wait_outcome(&p, &w, setup.timeout_secs) {
        Outcome::Ok(i) => i,
        other => {
            r.boot = other
                .failure()
                .unwrap_or(Outcome::Failed("no shell".into()));
            return r;
        }
    };
    let boot_cpu = cpu_time(p.pid()).unwrap_or_default();
    r.boot = Outcome::Ok((p.lines[shell].at, boot_cpu));
    // Let bash start reading the console.
    p.idle(Duration::from_secs(2));
    for line in script() {
        if let Err(e) = p.send(&format!("{line}\n")) {
            r.steps = Outcome::Failed(format!("typing on the console: {e}"));
            return r;
        }
        p.idle(Duration::from_millis(200));
    }
    r.steps = measure(setup, &mut p, shell);
    p.kill();
    r
}

/// Waits for the markers and takes the figures between them.
fn measure(setup: &Setup, p: &mut VmProc, from: usize) -> Outcome<Vec<StepResult>> {
    let ready = p.wait_line(from, READY, setup.deadline());
    let from = match wait_outcome(p, &ready, setup.timeout_secs) {
        Outcome::Ok(i) => i,
        other => {
            return other
                .failure()
                .unwrap_or(Outcome::Failed("no READY".into()));
        }
    };
    let deadline = setup.deadline();
    let begin = p.wait_line(from, &begin_marker(), deadline);
    let mut at = match wait_outcome(p, &begin, setup.timeout_secs) {
        Outcome::Ok(i) => i,
        other => {
            return other
                .failure()
                .unwrap_or(Outcome::Failed("no BEGIN".into()));
        }
    };
    let mut last_wall = p.lines[at].at;
    let mut last_cpu = cpu_time(p.pid()).unwrap_or_default();
    let mut out = Vec::new();
    for (name, _) in STEPS {
        let w = p.wait_any(at + 1, &[STEP, &end_marker()], deadline);
        at = match wait_outcome(p, &w, setup.timeout_secs) {
            Outcome::Ok(i) => i,
            other => return other.failure().unwrap_or(Outcome::Failed("no step".into())),
        };
        let cpu = cpu_time(p.pid()).unwrap_or_default();
        let line = p.lines[at].clone();
        let Some((got, digest)) = parse_step(&line.text) else {
            return Outcome::Failed(format!("no line for step {name}: {}", line.text));
        };
        if got != name {
            return Outcome::Failed(format!("expected step {name}, the guest ran {got}"));
        }
        out.push(StepResult {
            wall: line.at.saturating_sub(last_wall),
            cpu: cpu.saturating_sub(last_cpu),
            digest,
        });
        last_wall = line.at;
        last_cpu = cpu;
    }
    let end = p.wait_line(at + 1, &end_marker(), deadline);
    match wait_outcome(p, &end, setup.timeout_secs) {
        Outcome::Ok(_) => Outcome::Ok(out),
        other => other.failure().unwrap_or(Outcome::Failed("no END".into())),
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64())
}

/// "wall / CPU" of one step on one runner.
fn cell(r: &RunnerResult, k: Option<usize>) -> String {
    match k {
        None => match &r.boot {
            Outcome::Ok((w, c)) => format!("{} / {}", secs(*w), secs(*c)),
            other => other.problem().unwrap_or_default(),
        },
        Some(k) => match &r.steps {
            Outcome::Ok(s) => s.get(k).map_or("-".into(), |s| {
                format!("{} / {}", secs(s.wall), secs(s.cpu))
            }),
            other => other.problem().unwrap_or_default(),
        },
    }
}

fn step_of(r: &RunnerResult, k: usize) -> Option<&StepResult> {
    r.steps.ok().and_then(|s| s.get(k))
}

fn total(r: &RunnerResult) -> Option<(Duration, Duration)> {
    r.steps.ok().map(|s| {
        s.iter().fold((Duration::ZERO, Duration::ZERO), |a, x| {
            (a.0 + x.wall, a.1 + x.cpu)
        })
    })
}

pub fn run(setup: &Setup) {
    let kit = &setup.kit;
    let image = kit.join("debian.img");
    let vmlinuz = kit.join("debian-vmlinuz");
    let initrd = kit.join("debian-initrd.img");
    let cmdline = match kernel_cmdline(kit) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return;
        }
    };
    let mut cmds = Vec::new();
    let mut results: Vec<(String, RunnerResult)> = Vec::new();
    let mut runners: Vec<(String, PathBuf, Vec<String>)> = Vec::new();
    for b in &setup.backends {
        let ov = setup.work.join(format!("cpu-{b}.qcow2"));
        let args: Vec<String> = vec![
            "run".into(),
            "--backend".into(),
            b.clone(),
            "--kernel".into(),
            vmlinuz.display().to_string(),
            "--initrd".into(),
            initrd.display().to_string(),
            "--cmdline".into(),
            cmdline.clone(),
            "--memory".into(),
            format!("{MEM_MIB}M"),
            "--serial".into(),
            "stdio".into(),
            "--disk".into(),
            format!("{},format=qcow2,backing=on", ov.display()),
        ];
        runners.push((format!("anyvisor {b}"), setup.anyvisor.clone(), args));
    }
    if setup.qemu_enabled {
        let ov = setup.work.join("cpu-qemu.qcow2");
        let append = match setup.qemu_tsc_khz {
            Some(khz) => format!("{cmdline} tsc_early_khz={khz}"),
            None => cmdline.clone(),
        };
        let args: Vec<String> = [
            "-M",
            "microvm,pit=on,pic=on,rtc=on",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-m",
            &MEM_MIB.to_string(),
            "-nographic",
            "-no-reboot",
            "-kernel",
            &vmlinuz.display().to_string(),
            "-initrd",
            &initrd.display().to_string(),
            "-append",
            &append,
            "-device",
            "virtio-blk-device,drive=d0",
            "-drive",
            &format!("id=d0,file={},format=qcow2,if=none", ov.display()),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        runners.push(("QEMU TCG -cpu max".into(), setup.qemu.clone(), args));
    }
    for (label, program, args) in runners {
        cmds.push((label.clone(), command_line(&program, &args)));
        eprintln!("[cpu] {label}");
        let ov_name = if label.starts_with("QEMU") {
            "cpu-qemu.qcow2".to_string()
        } else {
            format!("cpu-{}.qcow2", label.trim_start_matches("anyvisor "))
        };
        let r = match overlay(setup, &image, &ov_name) {
            Ok(_) => run_case(setup, &program, &args),
            Err(e) => RunnerResult {
                boot: Outcome::Failed(e),
                steps: Outcome::Failed("not reached".into()),
            },
        };
        results.push((label, r));
    }
    report(setup, &results);
    crate::print_commands(&cmds);
}

fn report(setup: &Setup, results: &[(String, RunnerResult)]) {
    crate::print_header(
        "CPU: AVX2/SHA user-mode workload in the Debian 12 guest",
        setup,
    );
    let qemu = results
        .iter()
        .find(|(l, _)| l.starts_with("QEMU"))
        .map(|r| &r.1);
    let mut header = vec!["step".to_string()];
    for (l, _) in results {
        header.push(format!("{l}: wall / CPU (s)"));
    }
    for (l, _) in results.iter().filter(|(l, _)| !l.starts_with("QEMU")) {
        header.push(format!("{} CPU vs QEMU", l.trim_start_matches("anyvisor ")));
    }
    header.push("same output everywhere".into());
    let h: Vec<&str> = header.iter().map(String::as_str).collect();
    let mut t = Table::new(&h);
    let ours: Vec<&(String, RunnerResult)> = results
        .iter()
        .filter(|(l, _)| !l.starts_with("QEMU"))
        .collect();
    // Boot to the shell (not part of the workload; for scale).
    let mut row = vec!["(boot to shell)".to_string()];
    row.extend(results.iter().map(|(_, r)| cell(r, None)));
    t.row(row);
    for (k, (name, what)) in STEPS.iter().enumerate() {
        let mut row = vec![format!("{name}: {what}")];
        row.extend(results.iter().map(|(_, r)| cell(r, Some(k))));
        let q = qemu
            .and_then(|q| step_of(q, k))
            .map(|s| s.cpu.as_secs_f64());
        for (_, r) in &ours {
            row.push(table::ratio(step_of(r, k).map(|s| s.cpu.as_secs_f64()), q));
        }
        let digests: Vec<&str> = results
            .iter()
            .filter_map(|(_, r)| step_of(r, k).map(|s| s.digest.as_str()))
            .collect();
        row.push(match digests.first() {
            None => "-".into(),
            Some(d) if digests.iter().all(|x| x == d) => format!("yes ({d})"),
            Some(_) => format!("NO: {}", digests.join(", ")),
        });
        t.row(row);
    }
    let mut row = vec!["total".to_string()];
    row.extend(
        results.iter().map(|(_, r)| {
            total(r).map_or("-".into(), |(w, c)| format!("{} / {}", secs(w), secs(c)))
        }),
    );
    let qt = qemu.and_then(total).map(|t| t.1.as_secs_f64());
    for (_, r) in &ours {
        row.push(table::ratio(total(r).map(|t| t.1.as_secs_f64()), qt));
    }
    t.row(row);
    print!("{t}");
    println!(
        "\nwall: host time between the guest's marker lines; CPU: user+sys time of the whole \
         VMM process over the same span (/proc/PID/stat). Ratios are CPU time against QEMU's \
         (below 1.00x: less CPU than QEMU). Issue 11's target: emu within 2x of QEMU TCG."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_ticks() {
        let s = "4242 (qemu-system-x86) S 1 4242 4242 0 -1 4194560 5000 0 12 0 731 42 0 0 20 0 \
                 5 0 100 1000000 2000 18446744073709551615";
        assert_eq!(parse_stat_ticks(s), Some(773));
        // A name with spaces and parentheses.
        let s = "7 (a (b) c) R 1 7 7 0 -1 0 0 0 0 0 5 6 0 0";
        assert_eq!(parse_stat_ticks(s), Some(11));
        assert_eq!(parse_stat_ticks("7 (x) R 1"), None);
        assert_eq!(parse_stat_ticks("no parenthesis"), None);
    }

    #[test]
    fn step_lines_and_markers() {
        assert_eq!(
            parse_step("[ 12.0] CPUB-0STEP xz 0123456789abcdef"),
            Some(("xz".into(), "0123456789abcdef".into()))
        );
        assert_eq!(parse_step("CPUB-0STEP"), None);
        assert_eq!(parse_step("nothing"), None);
        // The typed script never contains a marker as the guest prints it.
        for line in script() {
            for m in [READY.to_string(), begin_marker(), end_marker(), STEP.into()] {
                assert!(!line.contains(&m), "{line} contains {m}");
            }
            assert!(line.len() < 1000, "tty line limit: {line}");
        }
        let run = script().last().cloned().unwrap_or_default();
        for (name, _) in STEPS {
            assert!(run.contains(&format!("st {name} w_")), "{name}");
        }
        assert_eq!(begin_marker(), "CPUB-0BEGIN");
        assert_eq!(end_marker(), "CPUB-0END");
    }
}
