//! `soak`: one VM running the guest kit's memory workload (`memwork`) and disk workload
//! (`diskwork` on a raw disk) is moved back and forth between the kvm and emu backends many
//! times, live-migrated over a Unix socket every round, with pause/resume and snapshot/restore
//! (onto the other backend) between, while a thread polls the API (`GET /vm`, what
//! `anyvisor info` asks). After every step the guest must report, on its serial console, fresh
//! verifications of both workloads; at the end the VM is shut down and the disk image checked
//! block by block on the host. See docs/benchmarks.md ("Soak").
//!
//! What counts:
//! * corruption: a `MEMWORK CORRUPT` or `DISKWORK CORRUPT` line, or a block of the final disk
//!   image that does not hold the workload's pattern;
//! * failures: a move, pause, resume, snapshot or restore that fails, a workload that reports a
//!   failed system call or stops reporting, reports out of order (the disk count must grow
//!   across every move, the memory workload's iterations must not go back), guest output while
//!   the VM is paused, a kernel panic/BUG/Oops, and API polls that fail while the VMM they asked
//!   lives (a poll refused because its VMM just ended at a hand-over is counted apart);
//! * the exit status is 0 only with no corruption and no failure.
//!
//! Percentiles are computed by hand (nearest rank, a few lines) rather than with a statistics
//! crate.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::Value;

use crate::control::{self, Error as ControlError};
use crate::serial::Line;
use crate::table::Table;
use crate::vmproc::{VmProc, command_line, run_command};
use crate::{Common, Setup, anyvisor_args, cmdline};

/// How often the API is polled.
const POLL_EVERY: Duration = Duration::from_millis(100);
/// How long a VMM whose API poll failed may take to be seen gone for the failure to count as
/// a hand-over (the VMM ended after a migration or `snapshot --stop`) rather than an error.
const GONE_WITHIN: Duration = Duration::from_secs(3);
/// New reports of each workload awaited after a step (the first may come from a pass that
/// began before it).
const FRESH: u64 = 2;
/// Rounds that end with a snapshot and a restore on the other backend: every fourth, so that
/// live migrations go kvm -> emu and emu -> kvm equally often, and restores too.
const SNAPSHOT_EVERY: u32 = 4;
/// Rounds done even when `--duration` has passed: a move each way, a pause/resume, a
/// snapshot/restore.
const MIN_ROUNDS: u32 = 4;
/// How long the guest is kept paused.
const PAUSED_FOR: Duration = Duration::from_millis(2000);
/// Console lines that arrive this long after `pause` returned were written while paused.
const PAUSE_GRACE: Duration = Duration::from_millis(1000);
/// The workload block size and pattern of guest/src/diskwork.c.
const DISK_BLOCK: u64 = 4096;
const DISK_MAGIC: u64 = 0xD15C_0000_0000_0000;

#[derive(Debug, Args)]
pub struct SoakArgs {
    /// Live migrations to do (alternating kvm -> emu and emu -> kvm).
    #[arg(long, value_name = "N", default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Start no new round after this many seconds (counted from the start, boot included);
    /// the first four rounds (moves both ways, pause/resume, snapshot/restore) are always done.
    #[arg(long, value_name = "SECS")]
    duration: Option<u64>,
    /// Guest RAM in MiB (the memory workload uses 64 MiB of it).
    #[arg(long, value_name = "MIB", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(128..=65536))]
    memory: u64,
    /// Size of the raw disk the disk workload writes, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=4096))]
    disk: u64,
    /// Give up on one step (boot, move, fresh workload reports) after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 180,
          value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,
    /// anyvisor binary [default: build `cli` in release mode and use it].
    #[arg(long, value_name = "PATH")]
    anyvisor: Option<PathBuf>,
    /// Guest kit directory [default: guest/out].
    #[arg(long, value_name = "DIR")]
    kit: Option<PathBuf>,
    /// Scratch directory for sockets, the disk image, snapshots and VM logs
    /// [default: TARGET/xtask-soak].
    #[arg(long, value_name = "DIR")]
    workdir: Option<PathBuf>,
}

// ---------------------------------------------------------------------------------------------
// The guest's reports

/// What the guest's console lines say about its workloads, across every VMM it ran in.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Health {
    /// `MEMWORK OK` lines seen.
    pub mem_reports: u64,
    /// Iterations of the latest `MEMWORK OK <iterations> <seconds>`.
    pub mem_iter: Option<u64>,
    /// `DISKWORK <count> ok` lines seen.
    pub disk_reports: u64,
    /// Count of the latest `DISKWORK <count> ok`.
    pub disk_count: Option<u64>,
    /// Corruption lines (verbatim, trimmed).
    pub corrupt: Vec<String>,
    /// Other failures seen on the console.
    pub failures: Vec<String>,
    /// `MEMWORK CLOCK-JUMP` lines (informative).
    pub clock_jumps: u64,
}

/// `MEMWORK OK <iterations> <seconds>` -> iterations (both numbers must be there: a line cut at
/// a hand-over is not a report).
fn memwork_ok(text: &str) -> Option<u64> {
    let rest = &text[text.find("MEMWORK OK ")? + "MEMWORK OK ".len()..];
    let mut it = rest.split_whitespace();
    let iter = it.next()?.parse().ok()?;
    it.next()?.parse::<u64>().ok()?;
    it.next().is_none().then_some(iter)
}

/// `DISKWORK <count> ok` -> count.
fn diskwork_ok(text: &str) -> Option<u64> {
    let rest = &text[text.find("DISKWORK ")? + "DISKWORK ".len()..];
    rest.trim_end().strip_suffix(" ok")?.parse().ok()
}

impl Health {
    /// Takes in one console line.
    pub fn absorb(&mut self, text: &str) {
        let t = text.trim();
        if t.contains("MEMWORK CORRUPT") || t.contains("DISKWORK CORRUPT") {
            self.corrupt.push(t.to_string());
        } else if t.contains("DISKWORK error=")
            || t.contains("Kernel panic")
            || t.contains("BUG:")
            || t.contains("Oops")
            || t.contains("memwork:")
        {
            self.failures.push(format!("guest: {t}"));
        } else if t.contains("MEMWORK CLOCK-JUMP") {
            self.clock_jumps += 1;
        } else if let Some(n) = memwork_ok(t) {
            if self.mem_iter.is_some_and(|m| n < m) {
                self.failures.push(format!(
                    "memory workload went back: {n} iterations after {}",
                    self.mem_iter.unwrap_or(0)
                ));
            }
            self.mem_iter = Some(n);
            self.mem_reports += 1;
        } else if let Some(n) = diskwork_ok(t) {
            if self.disk_count.is_some_and(|m| n <= m) {
                self.failures.push(format!(
                    "disk workload did not go on: {n} blocks after {}",
                    self.disk_count.unwrap_or(0)
                ));
            }
            self.disk_count = Some(n);
            self.disk_reports += 1;
        }
    }

    fn bad(&self) -> bool {
        !self.corrupt.is_empty() || !self.failures.is_empty()
    }
}

/// Checks a raw disk image after the disk workload reported `count` blocks written: for each of
/// the last `nblocks` blocks k below `count`, slot `k mod nblocks` holds block k or a later
/// block of the same slot. Returns the first bad block.
pub fn check_disk(data: &[u8], count: u64) -> Result<(), String> {
    let nblocks = data.len() as u64 / DISK_BLOCK;
    if nblocks == 0 {
        return Err("disk image smaller than a block".into());
    }
    for k in count.saturating_sub(nblocks)..count {
        let slot = k % nblocks;
        let start = usize::try_from(slot * DISK_BLOCK).map_err(|e| e.to_string())?;
        let block = data
            .get(start..start + DISK_BLOCK as usize)
            .ok_or("disk image shorter than its block count")?;
        let word = |i: usize| {
            block
                .get(i * 8..i * 8 + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
        };
        let w0 = word(0).unwrap_or(0);
        let found = (w0 >> 9) & ((1 << 39) - 1);
        let whole = (0..(DISK_BLOCK / 8) as usize)
            .all(|i| word(i) == Some(DISK_MAGIC | (found << 9) | i as u64));
        if !whole || found % nblocks != slot || found < k {
            return Err(format!(
                "disk block {k} (slot {slot}) does not hold its pattern (word 0 = {w0:#x})"
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Statistics

/// Nearest-rank percentile `p` (0..=100) of `v`.
pub fn percentile(v: &[f64], p: f64) -> Option<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s.get(rank.clamp(1, s.len()) - 1).copied()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------------------------
// The API poller

/// The VMM the poller asks.
#[derive(Debug, Clone)]
struct Target {
    api: PathBuf,
    pid: u32,
    backend: String,
}

#[derive(Debug, Default)]
struct PollStats {
    polls: u64,
    ok: u64,
    /// Polls that failed because their VMM had just ended (migration or `snapshot --stop`).
    handover: u64,
    /// Polls that failed while their VMM lived, or gave a wrong answer.
    errors: u64,
    /// The first few error messages.
    error_samples: Vec<String>,
    latency_ms: Vec<f64>,
    paused_seen: u64,
}

impl PollStats {
    fn error(&mut self, msg: String) {
        self.errors += 1;
        if self.error_samples.len() < 5 {
            self.error_samples.push(msg);
        }
    }
}

/// Whether process `pid` has ended (gone or a zombie).
fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|st| st == "Z" || st == "X"),
    }
}

struct Poller {
    target: Arc<Mutex<Option<Target>>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<PollStats>>,
}

impl Poller {
    fn start() -> Poller {
        let target: Arc<Mutex<Option<Target>>> = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (Arc::clone(&target), Arc::clone(&stop));
        let handle = thread::spawn(move || poll_loop(&t, &s));
        Poller {
            target,
            stop,
            handle: Some(handle),
        }
    }

    fn set(&self, t: Option<Target>) {
        if let Ok(mut g) = self.target.lock() {
            *g = t;
        }
    }

    fn finish(mut self) -> PollStats {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

fn poll_loop(target: &Mutex<Option<Target>>, stop: &AtomicBool) -> PollStats {
    let mut st = PollStats::default();
    while !stop.load(Ordering::SeqCst) {
        thread::sleep(POLL_EVERY);
        let Some(t) = target.lock().ok().and_then(|g| g.clone()) else {
            continue;
        };
        st.polls += 1;
        let t0 = Instant::now();
        // One connection attempt (a deadline already passed).
        match control::http(&t.api, "GET", "/vm", t0) {
            Ok((200, body)) => {
                let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                let state = v.get("state").and_then(Value::as_str).unwrap_or("");
                let backend = v.get("backend").and_then(Value::as_str).unwrap_or("");
                if state.is_empty() || backend != t.backend {
                    st.error(format!(
                        "GET /vm on the {} VMM answered {}",
                        t.backend,
                        body.chars().take(200).collect::<String>()
                    ));
                } else {
                    st.ok += 1;
                    st.paused_seen += u64::from(state == "paused");
                    st.latency_ms.push(ms(t0.elapsed()));
                }
            }
            Ok((code, body)) => st.error(format!(
                "GET /vm: HTTP {code} {}",
                body.chars().take(200).collect::<String>()
            )),
            Err(e) => {
                // Refused or cut off: fine if the VMM is ending (its VM moved on).
                let seen_by = Instant::now() + GONE_WITHIN;
                let mut gone = process_gone(t.pid);
                while !gone && Instant::now() < seen_by {
                    thread::sleep(Duration::from_millis(20));
                    gone = process_gone(t.pid);
                }
                let retargeted = target
                    .lock()
                    .ok()
                    .and_then(|g| g.as_ref().map(|n| n.pid))
                    .is_some_and(|p| p != t.pid);
                if gone || retargeted && matches!(e, ControlError::Connect(_)) {
                    st.handover += 1;
                } else {
                    st.error(format!("GET /vm on the live {} VMM: {e}", t.backend));
                }
            }
        }
    }
    st
}

// ---------------------------------------------------------------------------------------------
// The VM and its moves

/// One VMM process holding the VM.
struct Vm {
    proc: VmProc,
    backend: String,
    api: PathBuf,
    /// Console lines taken into [`Health`] so far.
    scanned: usize,
    name: String,
}

impl Vm {
    fn target(&self) -> Target {
        Target {
            api: self.api.clone(),
            pid: self.proc.pid(),
            backend: self.backend.clone(),
        }
    }

    /// Takes the console lines that arrived into `h`.
    fn absorb(&mut self, h: &mut Health) {
        for l in self.proc.lines.iter().skip(self.scanned) {
            h.absorb(&l.text);
        }
        self.scanned = self.proc.lines.len();
    }

    /// Waits until both workloads report again, [`FRESH`] times each: at least one whole
    /// verification pass then ran after the step.
    fn wait_fresh(&mut self, h: &mut Health, deadline: Instant) -> Result<(), String> {
        let (m0, d0) = (h.mem_reports + FRESH - 1, h.disk_reports + FRESH - 1);
        loop {
            self.proc.idle(Duration::from_millis(50));
            self.absorb(h);
            if h.bad() {
                return Err("the guest reported a problem".into());
            }
            if h.mem_reports > m0 && h.disk_reports > d0 {
                return Ok(());
            }
            if self.proc.exit.is_some() {
                return Err(format!(
                    "{} VMM ended: {}",
                    self.backend,
                    self.proc.failure_reason()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no fresh MEMWORK and DISKWORK reports from the {} VM in time (last line: {})",
                    self.backend,
                    self.proc.lines.last().map_or("none", |l| l.text.as_str())
                ));
            }
        }
    }

    /// Waits for the process to end (after a migration or `snapshot --stop`) and takes its last
    /// lines.
    fn wait_gone(&mut self, h: &mut Health, within: Duration) -> Result<(), String> {
        let ended = self.proc.wait_exit(Instant::now() + within);
        self.absorb(h);
        if ended.is_none() {
            self.proc.kill();
            return Err(format!(
                "the {} VMM still ran {} s after its VM moved away",
                self.backend,
                within.as_secs()
            ));
        }
        Ok(())
    }

    /// Writes the console and stderr to `dir/<name>.log`.
    fn save_log(&self, dir: &Path) {
        let mut text: String = self
            .proc
            .lines
            .iter()
            .map(|l| format!("[{:>9.3}] {}\n", l.at.as_secs_f64(), l.text))
            .collect();
        text.push_str("---- stderr ----\n");
        text.push_str(&self.proc.stderr_text());
        let _ = std::fs::write(dir.join(format!("{}.log", self.name)), text);
    }
}

fn deadline_in(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

fn other(backend: &str) -> &'static str {
    if backend == "kvm" { "emu" } else { "kvm" }
}

/// The `error:` line of a control command, or its status.
fn command_error(what: &str, stderr: &str, status: Option<std::process::ExitStatus>) -> String {
    let why = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .map(|l| l.trim_start_matches("error:").trim().to_string())
        .unwrap_or_else(|| match status {
            Some(st) => format!("{st}"),
            None => "no answer in time".into(),
        });
    format!("{what}: {why}")
}

/// What the soak measured.
#[derive(Debug, Default)]
struct Report {
    rounds_planned: u32,
    migrations: Vec<Migration>,
    snapshots: Vec<SnapRestore>,
    pauses: Vec<f64>,
    stopped_early: Option<String>,
    failures: Vec<String>,
    health: Health,
    disk_checked: Option<Result<u64, String>>,
    polls: PollStats,
    boot_s: f64,
    elapsed_s: f64,
    commands: Vec<(String, String)>,
}

#[derive(Debug)]
struct Migration {
    from: String,
    to: String,
    wall_ms: f64,
    total_ms: f64,
    downtime_ms: f64,
    bytes: u64,
}

#[derive(Debug)]
struct SnapRestore {
    snapshot_ms: f64,
    restore_ms: f64,
    restore_in_vmm_ms: Option<f64>,
    /// Snapshot requested to the restored VM running.
    downtime_ms: f64,
}

struct Soak<'a> {
    setup: &'a Setup,
    args: &'a SoakArgs,
    disk: PathBuf,
    logs: PathBuf,
    seq: u32,
    health: Health,
    poller: Poller,
    report: Report,
}

impl Soak<'_> {
    fn deadline(&self) -> Instant {
        deadline_in(self.args.timeout)
    }

    fn next_name(&mut self, backend: &str) -> String {
        self.seq += 1;
        format!("vm{:03}-{backend}", self.seq)
    }

    /// Saves the log of the VM left after a failed step (it ends when dropped); returns `e`.
    fn lost(&self, vm: Option<&Vm>, e: String) -> String {
        if let Some(vm) = vm {
            vm.save_log(&self.logs);
        }
        e
    }

    fn note_command(&mut self, label: &str, args: &[String]) {
        if !self.report.commands.iter().any(|(l, _)| l == label) {
            // Paths relative to the repository, as in the rest of docs/benchmarks.md.
            let root = format!("{}/", crate::workspace_root().display());
            let cl = command_line(&self.setup.anyvisor, args).replace(&root, "");
            self.report.commands.push((label.to_string(), cl));
        }
    }

    fn spawn(&mut self, backend: &str, name: String, args: Vec<String>) -> Result<Vm, String> {
        let api = self.setup.scratch(&format!("soak-{}.sock", self.seq));
        let mut args = args;
        args.extend(["--api-socket".into(), api.display().to_string()]);
        let proc = VmProc::spawn(&self.setup.anyvisor, &args, self.args.memory << 20)
            .map_err(|e| format!("cannot start anyvisor: {e}"))?;
        Ok(Vm {
            proc,
            backend: backend.to_string(),
            api,
            scanned: 0,
            name,
        })
    }

    fn boot(&mut self) -> Result<Vm, String> {
        let name = self.next_name("kvm");
        let mut args = anyvisor_args(
            self.setup,
            "kvm",
            "bzImage",
            self.args.memory,
            &cmdline("memwork-disk"),
        );
        args.extend([
            "--disk".into(),
            format!("{},format=raw", self.disk.display()),
        ]);
        self.note_command("boot (kvm)", &args);
        let mut vm = self.spawn("kvm", name, args)?;
        let t0 = Instant::now();
        let r = vm.wait_fresh(&mut self.health, deadline_in(self.args.timeout));
        self.report.boot_s = t0.elapsed().as_secs_f64();
        if let Err(e) = r {
            vm.save_log(&self.logs);
            return Err(format!("boot: {e}"));
        }
        self.poller.set(Some(vm.target()));
        Ok(vm)
    }

    /// Live-migrates `vm` to the other backend over a Unix socket.
    fn migrate(&mut self, mut vm: Vm) -> Result<Vm, String> {
        let to = other(&vm.backend);
        let name = self.next_name(to);
        let incoming = self.setup.scratch(&format!("soak-{}.in", self.seq));
        let addr = format!("unix:{}", incoming.display());
        let dargs: Vec<String> = vec![
            "run".into(),
            "--incoming".into(),
            addr.clone(),
            "--backend".into(),
            to.into(),
            "--serial".into(),
            "stdio".into(),
        ];
        self.note_command(&format!("destination ({to})"), &dargs);
        let mut dst = match self.spawn(to, name, dargs) {
            Ok(d) => d,
            Err(e) => return Err(self.lost(Some(&vm), e)),
        };
        let listen_by = Instant::now() + Duration::from_secs(30);
        while !incoming.exists() && dst.proc.exit.is_none() && Instant::now() < listen_by {
            dst.proc.idle(Duration::from_millis(10));
        }
        if !incoming.exists() {
            dst.save_log(&self.logs);
            return Err(self.lost(
                Some(&vm),
                format!(
                    "the {to} destination did not listen: {}",
                    dst.proc.failure_reason()
                ),
            ));
        }
        let margs: Vec<String> = vec![
            "migrate".into(),
            "--api-socket".into(),
            vm.api.display().to_string(),
            "--to".into(),
            addr,
        ];
        self.note_command("migrate", &margs);
        let from = vm.backend.clone();
        let r = run_command(
            &self.setup.anyvisor,
            &margs,
            Duration::from_secs(self.args.timeout),
        );
        let what = format!("migrate {from} -> {to}");
        let (wall, out) = match r {
            Err(e) => return Err(self.lost(Some(&vm), format!("{what}: cannot run: {e}"))),
            Ok((wall, Some(st), out, _)) if st.success() => (wall, out),
            Ok((_, st, _, err)) => {
                dst.save_log(&self.logs);
                return Err(self.lost(Some(&vm), command_error(&what, &err, st)));
            }
        };
        let Some((total_ms, downtime_ms, bytes)) = crate::migrate::parse_final_json(&out) else {
            return Err(self.lost(Some(&vm), format!("{what}: no final JSON line")));
        };
        self.report.migrations.push(Migration {
            from: from.clone(),
            to: to.to_string(),
            wall_ms: ms(wall),
            total_ms,
            downtime_ms,
            bytes,
        });
        self.poller.set(Some(dst.target()));
        let gone = vm.wait_gone(&mut self.health, Duration::from_secs(30));
        vm.save_log(&self.logs);
        drop(vm);
        if let Err(e) = gone {
            return Err(self.lost(Some(&dst), e));
        }
        match dst.wait_fresh(&mut self.health, deadline_in(self.args.timeout)) {
            Ok(()) => Ok(dst),
            Err(e) => Err(self.lost(Some(&dst), format!("after {what}: {e}"))),
        }
    }

    /// Pauses `vm`, checks it stays quiet, resumes it and waits for fresh reports.
    fn pause_resume(&mut self, vm: &mut Vm) -> Result<(), String> {
        let api = vm.api.display().to_string();
        let pargs: Vec<String> = vec!["pause".into(), "--api-socket".into(), api.clone()];
        let rargs: Vec<String> = vec!["resume".into(), "--api-socket".into(), api];
        self.note_command("pause", &pargs);
        self.note_command("resume", &rargs);
        let limit = Duration::from_secs(self.args.timeout);
        let t0 = Instant::now();
        match run_command(&self.setup.anyvisor, &pargs, limit) {
            Ok((_, Some(st), _, _)) if st.success() => {}
            Ok((_, st, _, err)) => return Err(command_error("pause", &err, st)),
            Err(e) => return Err(format!("pause: cannot run: {e}")),
        }
        let paused_at = vm.proc.start.elapsed();
        match control::http(&vm.api, "GET", "/vm", self.deadline()) {
            Ok((200, body)) if body.contains("\"state\":\"paused\"") => {}
            Ok((code, body)) => {
                return Err(format!(
                    "after pause GET /vm gave {code}: {}",
                    body.chars().take(200).collect::<String>()
                ));
            }
            Err(e) => return Err(format!("after pause GET /vm: {e}")),
        }
        vm.proc.idle(PAUSED_FOR);
        let talked: Vec<&Line> = vm
            .proc
            .lines
            .iter()
            .skip(vm.scanned)
            .filter(|l| l.at > paused_at + PAUSE_GRACE)
            .filter(|l| l.text.contains("MEMWORK") || l.text.contains("DISKWORK"))
            .collect();
        if let Some(l) = talked.first() {
            return Err(format!(
                "the paused {} guest printed `{}`",
                vm.backend,
                l.text.trim()
            ));
        }
        vm.absorb(&mut self.health);
        match run_command(&self.setup.anyvisor, &rargs, limit) {
            Ok((_, Some(st), _, _)) if st.success() => {}
            Ok((_, st, _, err)) => return Err(command_error("resume", &err, st)),
            Err(e) => return Err(format!("resume: cannot run: {e}")),
        }
        self.report.pauses.push(ms(t0.elapsed()));
        vm.wait_fresh(&mut self.health, deadline_in(self.args.timeout))
            .map_err(|e| format!("after resume: {e}"))
    }

    /// Snapshots `vm` to a file (ending it) and restores the file on the other backend.
    fn snapshot_restore(&mut self, mut vm: Vm) -> Result<Vm, String> {
        let file = self.setup.scratch("soak.snap");
        let sargs: Vec<String> = vec![
            "snapshot".into(),
            "--api-socket".into(),
            vm.api.display().to_string(),
            "--output".into(),
            file.display().to_string(),
            "--stop".into(),
        ];
        self.note_command("snapshot", &sargs);
        let t0 = Instant::now();
        let limit = Duration::from_secs(self.args.timeout);
        match run_command(&self.setup.anyvisor, &sargs, limit) {
            Ok((_, Some(st), _, _)) if st.success() => {}
            Ok((_, st, _, err)) => {
                return Err(self.lost(Some(&vm), command_error("snapshot --stop", &err, st)));
            }
            Err(e) => return Err(self.lost(Some(&vm), format!("snapshot: cannot run: {e}"))),
        }
        let snapshot_ms = ms(t0.elapsed());
        let gone = vm.wait_gone(&mut self.health, Duration::from_secs(30));
        vm.save_log(&self.logs);
        let from = vm.backend.clone();
        drop(vm);
        gone.map_err(|e| self.lost(None, e))?;
        let to = other(&from);
        let name = self.next_name(to);
        let rargs: Vec<String> = vec![
            "run".into(),
            "--restore".into(),
            file.display().to_string(),
            "--backend".into(),
            to.into(),
            "--serial".into(),
            "stdio".into(),
        ];
        self.note_command(&format!("restore ({to})"), &rargs);
        let t1 = Instant::now();
        let mut r = self
            .spawn(to, name, rargs)
            .map_err(|e| self.lost(None, e))?;
        let deadline = self.deadline();
        loop {
            if control::wait_anyvisor_running(&r.api, Instant::now() + Duration::from_millis(20))
                .is_ok()
            {
                break;
            }
            r.proc.idle(Duration::from_millis(1));
            if r.proc.exit.is_some() || Instant::now() >= deadline {
                r.save_log(&self.logs);
                let why = if r.proc.exit.is_some() {
                    r.proc.failure_reason()
                } else {
                    "not running in time".into()
                };
                return Err(self.lost(None, format!("restore {from} -> {to}: {why}")));
            }
        }
        let restore_ms = ms(t1.elapsed());
        let downtime_ms = ms(t0.elapsed());
        let restore_in_vmm_ms = control::http(&r.api, "GET", "/vm", self.deadline())
            .ok()
            .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
            .and_then(|v| v.get("restore_ms").and_then(Value::as_f64));
        self.poller.set(Some(r.target()));
        let _ = std::fs::remove_file(&file);
        self.report.snapshots.push(SnapRestore {
            snapshot_ms,
            restore_ms,
            restore_in_vmm_ms,
            downtime_ms,
        });
        match r.wait_fresh(&mut self.health, deadline_in(self.args.timeout)) {
            Ok(()) => Ok(r),
            Err(e) => Err(self.lost(Some(&r), format!("after restore {from} -> {to}: {e}"))),
        }
    }

    /// Powers the VM off and checks the disk image.
    fn finish(&mut self, mut vm: Vm) {
        self.poller.set(None);
        let args: Vec<String> = vec![
            "shutdown".into(),
            "--api-socket".into(),
            vm.api.display().to_string(),
        ];
        self.note_command("shutdown", &args);
        match run_command(
            &self.setup.anyvisor,
            &args,
            Duration::from_secs(self.args.timeout),
        ) {
            Ok((_, Some(st), _, _)) if st.success() => {}
            Ok((_, st, _, err)) => self
                .report
                .failures
                .push(command_error("shutdown", &err, st)),
            Err(e) => self
                .report
                .failures
                .push(format!("shutdown: cannot run: {e}")),
        }
        if let Err(e) = vm.wait_gone(&mut self.health, Duration::from_secs(60)) {
            self.report.failures.push(e);
        }
        vm.save_log(&self.logs);
        drop(vm);
        let count = self.health.disk_count.unwrap_or(0);
        self.report.disk_checked = Some(
            std::fs::read(&self.disk)
                .map_err(|e| format!("{}: {e}", self.disk.display()))
                .and_then(|d| check_disk(&d, count))
                .map(|()| count),
        );
    }

    fn run(&mut self) {
        let started = Instant::now();
        let mut vm = match self.boot() {
            Ok(vm) => vm,
            Err(e) => {
                self.report.failures.push(e);
                return;
            }
        };
        let rounds = self.args.rounds;
        for round in 1..=rounds {
            if let Some(limit) = self.args.duration
                && round > MIN_ROUNDS
                && started.elapsed() >= Duration::from_secs(limit)
            {
                self.report.stopped_early = Some(format!(
                    "--duration {limit}: stopped after {} rounds",
                    round - 1
                ));
                break;
            }
            let from = vm.backend.clone();
            let t = Instant::now();
            vm = match self.migrate(vm) {
                Ok(v) => v,
                Err(e) => {
                    self.report.failures.push(format!("round {round}: {e}"));
                    return;
                }
            };
            let mut did = vec![format!(
                "{from} -> {} (downtime {:.0} ms)",
                vm.backend,
                self.report.migrations.last().map_or(0.0, |m| m.downtime_ms)
            )];
            if round % 2 == 0 {
                if let Err(e) = self.pause_resume(&mut vm) {
                    self.report.failures.push(format!("round {round}: {e}"));
                    vm.save_log(&self.logs);
                    return;
                }
                did.push("pause/resume".into());
            }
            if round % SNAPSHOT_EVERY == 0 {
                let before = vm.backend.clone();
                vm = match self.snapshot_restore(vm) {
                    Ok(v) => v,
                    Err(e) => {
                        self.report.failures.push(format!("round {round}: {e}"));
                        return;
                    }
                };
                did.push(format!("snapshot {before}, restore {}", vm.backend));
            }
            eprintln!(
                "[soak] round {round}/{rounds} ({:.1} s): {}; memwork {} reports, diskwork at block {}",
                t.elapsed().as_secs_f64(),
                did.join(", "),
                self.health.mem_reports,
                self.health.disk_count.unwrap_or(0),
            );
            if self.health.bad() {
                break;
            }
        }
        self.finish(vm);
    }
}

fn kvm_usable() -> Result<(), String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| {
            format!("/dev/kvm is not usable ({e}): the soak moves a VM between kvm and emu")
        })
}

/// `cargo xtask soak`.
pub fn main(a: &SoakArgs) -> ExitCode {
    let prepared = kvm_usable().and_then(|()| {
        let root = crate::workspace_root();
        let c = Common {
            anyvisor: a.anyvisor.clone(),
            qemu: PathBuf::from("qemu-system-x86_64"),
            kit: a.kit.clone(),
            timeout: a.timeout,
            runs: 1,
            backends: vec![],
            no_qemu: true,
            no_tsc_hint: true,
            emu_example: None,
            workdir: Some(
                a.workdir
                    .clone()
                    .unwrap_or_else(|| crate::target_dir(&root).join("xtask-soak")),
            ),
        };
        let setup = crate::setup(&c, &["kvm", "emu"])?;
        let logs = setup.work.join("logs");
        let _ = std::fs::remove_dir_all(&logs);
        std::fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;
        let disk = setup.scratch("soak-disk.img");
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(a.disk << 20))
            .map_err(|e| format!("{}: {e}", disk.display()))?;
        Ok((setup, logs, disk))
    });
    let (setup, logs, disk) = match prepared {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let mut soak = Soak {
        setup: &setup,
        args: a,
        disk,
        logs,
        seq: 0,
        health: Health::default(),
        poller: Poller::start(),
        report: Report {
            rounds_planned: a.rounds,
            ..Report::default()
        },
    };
    let started = Instant::now();
    soak.run();
    soak.report.elapsed_s = started.elapsed().as_secs_f64();
    let Soak {
        poller,
        mut report,
        health,
        logs,
        ..
    } = soak;
    report.polls = poller.finish();
    report.health = health;
    let passed = print_report(&report, a, &setup, &logs);
    if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| {
        if v < 10.0 {
            format!("{v:.1}")
        } else {
            format!("{v:.0}")
        }
    })
}

fn pct_row(t: &mut Table, what: &str, v: &[f64]) {
    t.row(vec![
        what.to_string(),
        v.len().to_string(),
        fmt_ms(percentile(v, 50.0)),
        fmt_ms(percentile(v, 90.0)),
        fmt_ms(percentile(v, 99.0)),
        fmt_ms(percentile(v, 100.0)),
    ]);
}

/// Prints the Markdown report; returns whether the soak passed.
fn print_report(r: &Report, a: &SoakArgs, setup: &Setup, logs: &Path) -> bool {
    let h = &r.health;
    let disk_corrupt = matches!(&r.disk_checked, Some(Err(_)));
    let corruption = h.corrupt.len() + usize::from(disk_corrupt);
    let mut failures: Vec<String> = r.failures.clone();
    failures.extend(h.failures.iter().cloned());
    failures.extend(r.polls.error_samples.iter().cloned());
    if r.disk_checked.is_none() {
        failures.push("the disk image was not checked".into());
    }
    let passed = corruption == 0 && failures.is_empty() && r.polls.errors == 0;

    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "## Soak: kvm <-> emu, {} MiB guest running memwork and diskwork\n",
        a.memory
    );
    println!(
        "host {}, {cores} cores, load at the end {}; {} rounds planned{}; {:.0} s in all (boot {:.0} s)\n",
        host.trim(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        r.rounds_planned,
        r.stopped_early
            .as_ref()
            .map_or(String::new(), |s| format!(" ({s})")),
        r.elapsed_s,
        r.boot_s,
    );
    let dir = |a: &str, b: &str| {
        r.migrations
            .iter()
            .filter(|m| m.from == a && m.to == b)
            .count()
    };
    let mut t = Table::new(&["measure", "value"]);
    t.row(vec![
        "live migrations done (kvm -> emu / emu -> kvm)".into(),
        format!(
            "{} ({} / {})",
            r.migrations.len(),
            dir("kvm", "emu"),
            dir("emu", "kvm")
        ),
    ]);
    t.row(vec![
        "snapshot + restore on the other backend".into(),
        r.snapshots.len().to_string(),
    ]);
    t.row(vec!["pause/resume".into(), r.pauses.len().to_string()]);
    let sent: u64 = r.migrations.iter().map(|m| m.bytes).sum();
    t.row(vec![
        "sent by live migration (MiB)".into(),
        format!("{:.0}", sent as f64 / 1048576.0),
    ]);
    t.row(vec![
        "workload reports (MEMWORK OK / DISKWORK ok)".into(),
        format!("{} / {}", h.mem_reports, h.disk_reports),
    ]);
    t.row(vec![
        "disk blocks written and verified at the end".into(),
        match &r.disk_checked {
            Some(Ok(n)) => format!("{n} (image checked)"),
            Some(Err(e)) => format!("CORRUPT: {e}"),
            None => "not checked".into(),
        },
    ]);
    t.row(vec![
        "API polls (ok / failed at a hand-over / errors)".into(),
        format!(
            "{} ({} / {} / {}); {} saw `paused`",
            r.polls.polls, r.polls.ok, r.polls.handover, r.polls.errors, r.polls.paused_seen
        ),
    ]);
    t.row(vec![
        "memwork clock jumps reported".into(),
        h.clock_jumps.to_string(),
    ]);
    t.row(vec!["corruption found".into(), corruption.to_string()]);
    t.row(vec!["failures".into(), failures.len().to_string()]);
    t.row(vec![
        "result".into(),
        if passed { "PASS" } else { "FAIL" }.into(),
    ]);
    print!("{t}");

    let mut p = Table::new(&["ms", "n", "p50", "p90", "p99", "max"]);
    let col = |f: fn(&Migration) -> f64| r.migrations.iter().map(f).collect::<Vec<_>>();
    pct_row(
        &mut p,
        "live migration: downtime (reported)",
        &col(|m| m.downtime_ms),
    );
    for (a, b) in [("kvm", "emu"), ("emu", "kvm")] {
        let v: Vec<f64> = r
            .migrations
            .iter()
            .filter(|m| m.from == a && m.to == b)
            .map(|m| m.downtime_ms)
            .collect();
        pct_row(&mut p, &format!("  of which {a} -> {b}"), &v);
    }
    pct_row(
        &mut p,
        "live migration: total (reported)",
        &col(|m| m.total_ms),
    );
    pct_row(
        &mut p,
        "live migration: wall (harness)",
        &col(|m| m.wall_ms),
    );
    let sc = |f: fn(&SnapRestore) -> f64| r.snapshots.iter().map(f).collect::<Vec<_>>();
    pct_row(
        &mut p,
        "snapshot --stop (to a file)",
        &sc(|s| s.snapshot_ms),
    );
    pct_row(&mut p, "restore: start to running", &sc(|s| s.restore_ms));
    let in_vmm: Vec<f64> = r
        .snapshots
        .iter()
        .filter_map(|s| s.restore_in_vmm_ms)
        .collect();
    pct_row(&mut p, "restore: in the VMM (`restore_ms`)", &in_vmm);
    pct_row(
        &mut p,
        "snapshot + restore: guest stopped",
        &sc(|s| s.downtime_ms),
    );
    pct_row(&mut p, "pause to resumed", &r.pauses);
    pct_row(&mut p, "API `GET /vm` latency", &r.polls.latency_ms);
    println!();
    print!("{p}");

    if !h.corrupt.is_empty() || !failures.is_empty() {
        println!("\nProblems:\n");
        for c in &h.corrupt {
            println!("- corruption: {c}");
        }
        for f in &failures {
            println!("- {f}");
        }
    }
    println!(
        "\nEach round live-migrates the VM to the other backend over a Unix socket; even rounds \
         then pause it for {:.1} s (no guest output allowed) and resume it; every fourth round \
         snapshots it to a file (`--stop`) and restores it on the other backend. After every \
         step both workloads must report {FRESH} fresh verifications (memwork checks all 64 MiB \
         of its pages, diskwork re-reads its last blocks; the disk count must grow across each \
         move); at the end the VM is powered off and every block of the disk image checked. The API is polled every {} ms throughout. Downtime: as reported by \
         `anyvisor migrate`. VM logs: {}.",
        PAUSED_FOR.as_secs_f64(),
        POLL_EVERY.as_millis(),
        logs.display()
    );
    let _ = setup;
    crate::print_commands(&r.commands);
    passed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_reads_the_workload_lines() {
        let mut h = Health::default();
        for l in [
            "DISKWORK START dev=/dev/vda blocks=16384",
            "[  3.1] MEMWORK OK 10 1",
            "DISKWORK 9 ok\r",
            "MEMWORK OK 5", // cut at a hand-over: not a report
            "MEMWORK OK 20 2",
            "DISKWORK 19 ok",
            "MEMWORK CLOCK-JUMP 31000",
        ] {
            h.absorb(l);
        }
        assert_eq!((h.mem_reports, h.mem_iter), (2, Some(20)));
        assert_eq!((h.disk_reports, h.disk_count), (2, Some(19)));
        assert_eq!(h.clock_jumps, 1);
        assert!(!h.bad());
        h.absorb("DISKWORK 19 ok");
        assert_eq!(h.failures.len(), 1, "{:?}", h.failures);
        h.absorb("MEMWORK OK 3 9");
        assert_eq!(h.failures.len(), 2, "{:?}", h.failures);
        h.absorb("DISKWORK CORRUPT at 7");
        h.absorb("MEMWORK CORRUPT page=3 expected_gen=2 found=0");
        assert_eq!(h.corrupt.len(), 2);
        h.absorb("DISKWORK error=write:Input/output-error");
        h.absorb("[ 9.0] Kernel panic - not syncing");
        assert_eq!(h.failures.len(), 4);
    }

    fn block(k: u64) -> Vec<u8> {
        (0..DISK_BLOCK / 8)
            .flat_map(|i| (DISK_MAGIC | (k << 9) | i).to_le_bytes())
            .collect()
    }

    #[test]
    fn disk_check_finds_missing_damaged_and_stale_blocks() {
        // 4 slots; 6 blocks written: slots hold 4, 5, 2, 3.
        let image: Vec<u8> = [4, 5, 2, 3].iter().flat_map(|&k| block(k)).collect();
        assert_eq!(check_disk(&image, 6), Ok(()));
        // Block 6 was reported but slot 2 still holds block 2.
        assert!(check_disk(&image, 7).is_err());
        let mut bad = image.clone();
        if let Some(b) = bad.get_mut(3 * 4096 + 100) {
            *b ^= 1;
        }
        assert!(check_disk(&bad, 6).is_err());
        assert!(check_disk(&[0u8; 100], 1).is_err());
        assert!(check_disk(&vec![0u8; 4 * 4096], 1).is_err());
        assert_eq!(check_disk(&vec![0u8; 4 * 4096], 0), Ok(()));
    }

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 90.0), Some(7.0));
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 0.0), Some(1.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn a_process_that_ended_is_gone() {
        assert!(!process_gone(std::process::id()));
        let Ok(mut child) = std::process::Command::new("/bin/true").spawn() else {
            panic!("cannot run /bin/true");
        };
        let pid = child.id();
        // A zombie until reaped, then gone.
        let end = Instant::now() + Duration::from_secs(5);
        while !process_gone(pid) && Instant::now() < end {
            thread::sleep(Duration::from_millis(10));
        }
        assert!(process_gone(pid));
        let _ = child.wait();
        assert!(process_gone(pid));
    }
}
