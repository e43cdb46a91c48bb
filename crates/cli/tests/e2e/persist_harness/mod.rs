//! Shared by the end-to-end tests (boot, seccomp, devices, snapshot, migration): the guest kit,
//! one boot at a time, backend availability, a VM process that is killed when dropped, waiting
//! for a process or serial output with a time limit, and the `memwork` workload's report lines.

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The guest runs the memory workload: `MEMWORK OK <n> <s>` every second.
pub const CMDLINE: &str = "console=ttyS0 quiet reboot=k panic=-1 anyvisor.test=memwork";
/// A nested, loaded host may take minutes to boot the guest under emu.
pub const BOOT_LIMIT: Duration = Duration::from_secs(600);
/// After a restore or migration the workload reports again within seconds.
pub const RESUME_LIMIT: Duration = Duration::from_secs(120);

pub const BIN: &str = env!("CARGO_BIN_EXE_anyvisor");

/// Boots share two host cores with everything else: one test at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

pub fn serial_guard() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether `/dev/kvm` opens now. Tests that need KVM are ignored by `cfg(boot_kvm)` where the
/// build found none (crates/cli/build.rs); tests that only add KVM runs to an emu test ask here
/// and say which parts they leave out.
pub fn kvm_usable() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        println!("NOTE: no /dev/kvm: the kvm parts of this test do not run");
    }
    ok
}

/// A test found the host lacking what the build-time probe (crates/cli/build.rs) saw: fail,
/// never pass without having run.
#[track_caller]
pub fn host_changed(what: &str) -> ! {
    panic!("{what}, although crates/cli/build.rs found it at build time: rebuild the tests")
}

/// The emu backend needs an optimized build (`cargo test --release`) or
/// `ANYVISOR_TEST_EMU=1` to boot the guest in reasonable time.
pub fn emu_fast_enough() -> bool {
    let ok =
        !cfg!(debug_assertions) || std::env::var_os("ANYVISOR_TEST_EMU").is_some_and(|v| v == "1");
    if !ok {
        host_changed(
            "emu tests need an optimized build (cargo test --release) or ANYVISOR_TEST_EMU=1",
        );
    }
    ok
}

pub struct Kit {
    pub bzimage: PathBuf,
    pub vmlinux: PathBuf,
    pub initrd: PathBuf,
}

/// The guest kit in `guest/out`, or where `ANYVISOR_GUEST_KIT` points (a kit built with
/// `ANYVISOR_KIT_OUT=DIR guest/build-kit.sh`). Tests that need it are ignored by
/// `cfg(guest_kit)` where it is not built, so a missing kit fails the test (never `None`).
pub fn kit() -> Option<Kit> {
    let out = std::env::var_os("ANYVISOR_GUEST_KIT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/out"));
    let kit = Kit {
        bzimage: out.join("bzImage"),
        vmlinux: out.join("vmlinux"),
        initrd: out.join("initramfs.cpio.gz"),
    };
    if kit.bzimage.is_file() && kit.vmlinux.is_file() && kit.initrd.is_file() {
        Some(kit)
    } else {
        host_changed("guest kit not built (run guest/build-kit.sh)")
    }
}

/// The emu backend is a software CPU, and on hosts whose KVM emulates guest kernel code (the
/// PVM flavour, see docs/kvm-platform.md) the kvm backend runs the guest kernel in emu too. An
/// unoptimized build boots the guest far too slowly for a test there, so those tests run in
/// optimized builds (`cargo test --release`) or when `ANYVISOR_TEST_EMU=1` says the build is
/// fast enough.
pub fn fast_enough(backend: &str) -> bool {
    let fast =
        !cfg!(debug_assertions) || std::env::var_os("ANYVISOR_TEST_EMU").is_some_and(|v| v == "1");
    let needs_emu = backend == "emu" || Path::new("/sys/module/kvm_pvm").exists();
    if needs_emu && !fast {
        host_changed(&format!(
            "{backend} boot tests need an optimized build here (cargo test --release) or ANYVISOR_TEST_EMU=1"
        ));
    }
    true
}

/// Whether guests can boot on `backend` here. Tests are ignored by `cfg(boot_emu)` /
/// `cfg(boot_kvm)` where they cannot (crates/cli/build.rs), so a `false` here fails the test.
pub fn backend_ready(backend: &str) -> bool {
    if backend == "kvm" && !kvm_usable() {
        host_changed("no usable /dev/kvm");
    }
    fast_enough(backend)
}

/// How a VMM process run to its end went: exit status (`None`: killed at the time limit) and
/// what it printed.
pub struct Run {
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

/// Starts `anyvisor ARGS` with `envs` added and stdout and stderr piped (for [`finish`]).
pub fn spawn_captured(args: &[String], envs: &[(&str, &str)]) -> Child {
    Command::new(BIN)
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start anyvisor")
}

/// Waits for `child` (at most `limit`), collecting its stdout and stderr.
pub fn finish(mut child: Child, limit: Duration) -> Run {
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let status = wait_timeout(&mut child, limit);
    Run {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// Waits for `child` at most `limit`; kills it and returns `None` on time-out.
pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("anyvisor-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `run` arguments booting the memwork guest with 256M on `backend`.
pub fn boot_args(kit: &Kit, backend: &str) -> Vec<String> {
    [
        "run",
        "--kernel",
        kit.vmlinux.to_str().unwrap(),
        "--initrd",
        kit.initrd.to_str().unwrap(),
        "--cmdline",
        CMDLINE,
        "--memory",
        "256M",
        "--backend",
        backend,
    ]
    .map(String::from)
    .to_vec()
}

/// An anyvisor VM process; killed when dropped.
pub struct Vm {
    child: Child,
    pub serial: PathBuf,
    pub socket: PathBuf,
    stderr: Arc<Mutex<String>>,
    status: Option<ExitStatus>,
}

impl Vm {
    /// Starts `anyvisor` with `args` plus `--serial SERIAL --api-socket SOCKET`.
    pub fn spawn(args: &[String], serial: &Path, socket: &Path) -> Vm {
        Vm::spawn_under(&[], &[], args, serial, socket)
    }

    /// Like [`Vm::spawn`], with extra environment variables for the VMM process.
    pub fn spawn_with_env(
        args: &[String],
        env: &[(&str, &str)],
        serial: &Path,
        socket: &Path,
    ) -> Vm {
        Vm::spawn_under(&[], env, args, serial, socket)
    }

    /// Starts `PREFIX... anyvisor ARGS --serial SERIAL --api-socket SOCKET` with `env` added.
    /// The prefix commands the tests use (`ip netns exec NS`, `prlimit --as=N`) exec the
    /// binary, so killing the child kills anyvisor.
    pub fn spawn_under(
        prefix: &[String],
        env: &[(&str, &str)],
        args: &[String],
        serial: &Path,
        socket: &Path,
    ) -> Vm {
        let mut cmd = match prefix.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let mut child = cmd
            .args(args)
            .args(["--serial", serial.to_str().unwrap()])
            .args(["--api-socket", socket.to_str().unwrap()])
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start anyvisor");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Vm {
            child,
            serial: serial.to_path_buf(),
            socket: socket.to_path_buf(),
            stderr,
            status: None,
        }
    }

    /// The process id of the child (the prefix command's, which exec'd anyvisor).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn serial_text(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// What went wrong, for assertion messages: stderr and the serial output's tail.
    pub fn diagnostics(&self) -> String {
        let serial = self.serial_text();
        let tail: String = serial
            .chars()
            .skip(serial.chars().count().saturating_sub(3000))
            .collect();
        format!("stderr:\n{}\nserial (tail):\n{tail}", self.stderr())
    }

    /// Waits until the serial output satisfies `done`, at most `limit`. Fails early when the
    /// process ends.
    pub fn wait_serial(
        &mut self,
        limit: Duration,
        done: impl Fn(&str) -> bool,
    ) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if done(&self.serial_text()) {
                return Ok(());
            }
            if let Some(status) = self.try_status() {
                return Err(format!(
                    "the VM exited ({status}) before the expected output\n{}",
                    self.diagnostics()
                ));
            }
            if start.elapsed() > limit {
                return Err(format!(
                    "no expected serial output within {limit:?}\n{}",
                    self.diagnostics()
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits for the process to end, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(s) = self.try_status() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Runs a control command against this VM's API socket.
    pub fn control(&self, cmd: &str, extra: &[&str]) -> Output {
        Command::new(BIN)
            .arg(cmd)
            .args(["--api-socket", self.socket.to_str().unwrap()])
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `(iterations, seconds)` of every `MEMWORK OK <iterations> <seconds>` line, in order.
pub fn memwork_reports(serial: &str) -> Vec<(u64, u64)> {
    serial
        .lines()
        .filter_map(|l| {
            let mut f = l.trim().strip_prefix("MEMWORK OK ")?.split_whitespace();
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect()
}

/// The iteration counters of every OK line.
pub fn memwork_counts(serial: &str) -> Vec<u64> {
    memwork_reports(serial).iter().map(|r| r.0).collect()
}

pub fn memwork_corrupt(serial: &str) -> bool {
    serial.contains("MEMWORK CORRUPT")
}

/// A predicate for [`Vm::wait_serial`]: at least `n` OK lines (or a corruption report).
pub fn at_least_ok(n: usize) -> impl Fn(&str) -> bool {
    move |s| memwork_counts(s).len() >= n || memwork_corrupt(s)
}

/// The last OK report in `serial`.
pub fn last_report(serial: &str) -> Option<(u64, u64)> {
    memwork_reports(serial).last().copied()
}

/// Asserts the workload is healthy: no CORRUPT or CLOCK-JUMP line, iterations and seconds
/// increasing, and (with `after`, the saved VM's last report) the first report continues from
/// it: more iterations, guest time a little later (not restarted, no jump).
pub fn assert_memwork_continues(serial: &str, after: Option<(u64, u64)>) {
    assert!(!memwork_corrupt(serial), "memory corrupted:\n{serial}");
    assert!(
        !serial.contains("CLOCK-JUMP"),
        "guest clock jumped:\n{serial}"
    );
    let reports = memwork_reports(serial);
    assert!(!reports.is_empty(), "no MEMWORK line:\n{serial}");
    assert!(
        reports
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
        "reports not increasing: {reports:?}"
    );
    if let Some((n, secs)) = after {
        let (n1, s1) = reports[0];
        assert!(
            n1 > n && s1 >= secs && s1 <= secs + 10,
            "workload did not continue: saved VM was at {:?}, now {reports:?}",
            (n, secs)
        );
    }
}

/// Exit code and the `error:` lines of a finished command.
pub fn error_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("error:"))
        .map(str::to_string)
        .collect()
}

/// A free TCP port on the loopback interface.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` until it holds or `limit` passes.
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// The harness itself: the wait helper reports a time-out and an early exit, and a dropped VM
/// process is killed.
pub fn check_harness_can_fail() {
    let dir = scratch("harness");
    let serial = dir.join("serial");
    std::fs::write(&serial, "MEMWORK OK 1 0\n").unwrap();
    let mut vm = Vm {
        child: Command::new("sleep").arg("30").spawn().unwrap(),
        serial: serial.clone(),
        socket: dir.join("none"),
        stderr: Arc::new(Mutex::new(String::new())),
        status: None,
    };
    let e = vm
        .wait_serial(Duration::from_millis(300), at_least_ok(2))
        .unwrap_err();
    assert!(e.contains("no expected serial output"), "{e}");
    vm.wait_serial(Duration::from_millis(300), at_least_ok(1))
        .unwrap();
    let pid = vm.child.id();
    drop(vm);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "dropped VM process still runs"
    );
    let mut gone = Vm {
        child: Command::new("true").spawn().unwrap(),
        serial,
        socket: dir.join("none"),
        stderr: Arc::new(Mutex::new(String::new())),
        status: None,
    };
    let e = gone
        .wait_serial(Duration::from_secs(10), at_least_ok(5))
        .unwrap_err();
    assert!(e.contains("exited"), "{e}");
    assert!(!eventually(Duration::from_millis(200), || false));
    assert_eq!(
        memwork_counts("x\nMEMWORK OK 7 1\n MEMWORK OK 8 2\r\n"),
        [7, 8]
    );
    let _ = std::fs::remove_dir_all(dir);
}

// ---- the disk workload (guest/src/diskwork.c, `anyvisor.test=memwork-disk`) ----

/// The guest runs the memory workload and the disk workload on `/dev/vda`:
/// `MEMWORK OK <n> <s>` and `DISKWORK <count> ok` every second.
pub const DISK_CMDLINE: &str = "console=ttyS0 quiet reboot=k panic=-1 anyvisor.test=memwork-disk";

/// The disk workload's block size.
pub const DISK_BLOCK: u64 = 4096;

/// Creates a sparse raw disk image of `mib` MiB at `path` for the disk workload.
pub fn disk_image(path: &Path, mib: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(mib << 20).unwrap();
}

/// `run` arguments booting the memory + disk workload guest with 256M on `backend`, `disk` as
/// `/dev/vda`.
pub fn disk_boot_args(kit: &Kit, backend: &str, disk: &Path) -> Vec<String> {
    let mut args = boot_args(kit, backend);
    let i = args.iter().position(|a| a == CMDLINE).unwrap();
    args[i] = DISK_CMDLINE.to_string();
    args.extend([
        "--disk".to_string(),
        format!("{},format=raw", disk.display()),
    ]);
    args
}

/// The counts of every `DISKWORK <count> ok` line, in order.
pub fn diskwork_counts(serial: &str) -> Vec<u64> {
    serial
        .lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("DISKWORK ")?.strip_suffix(" ok")?;
            rest.parse().ok()
        })
        .collect()
}

/// The count of the last `DISKWORK <count> ok` line.
pub fn diskwork_last(serial: &str) -> Option<u64> {
    diskwork_counts(serial).last().copied()
}

/// A `DISKWORK CORRUPT at <k>` line is there.
pub fn diskwork_corrupt(serial: &str) -> bool {
    serial.contains("DISKWORK CORRUPT")
}

/// The workload reported corruption or stopped on a failed system call.
pub fn diskwork_failed(serial: &str) -> bool {
    diskwork_corrupt(serial) || serial.contains("DISKWORK error=")
}

/// A predicate for [`Vm::wait_serial`]: at least `n` MEMWORK OK and `n` DISKWORK ok lines (or
/// a failure report of either).
pub fn at_least_both_ok(n: usize) -> impl Fn(&str) -> bool {
    move |s| {
        (memwork_counts(s).len() >= n && diskwork_counts(s).len() >= n)
            || memwork_corrupt(s)
            || diskwork_failed(s)
    }
}

/// Checks the disk workload is healthy: no CORRUPT or error line, counts increasing, and
/// (with `after`, the saved VM's last count) the first count past it: the blocks written
/// before were read back intact and writing went on.
pub fn check_diskwork_continues(serial: &str, after: Option<u64>) -> Result<(), String> {
    let bad: Vec<&str> = serial
        .lines()
        .filter(|l| l.contains("DISKWORK CORRUPT") || l.contains("DISKWORK error="))
        .collect();
    if !bad.is_empty() {
        return Err(format!("disk workload failed: {bad:?}"));
    }
    let counts = diskwork_counts(serial);
    if counts.is_empty() {
        return Err("no DISKWORK line".into());
    }
    if !counts.windows(2).all(|w| w[0] < w[1]) {
        return Err(format!("disk counts not increasing: {counts:?}"));
    }
    match after {
        Some(n) if counts[0] <= n => Err(format!(
            "disk workload did not continue: saved VM was at {n}, now {counts:?}"
        )),
        _ => Ok(()),
    }
}

/// Panics unless [`check_diskwork_continues`] holds.
pub fn assert_diskwork_continues(serial: &str, after: Option<u64>) {
    if let Err(e) = check_diskwork_continues(serial, after) {
        panic!("{e}\n{serial}");
    }
}

/// Block `k` of the disk workload: word i (little-endian) is `0xD15C << 48 | k << 9 | i`.
pub fn diskwork_block(k: u64) -> Vec<u8> {
    (0..DISK_BLOCK / 8)
        .flat_map(|i| (0xD15C_0000_0000_0000 | (k << 9) | i).to_le_bytes())
        .collect()
}

/// Checks the raw image at `path` after the workload reported `count`: for every block k of
/// the last `nblocks` below `count`, slot `k mod nblocks` holds block k, or a later block of
/// the same slot (written after the report).
pub fn check_disk_pattern(path: &Path, count: u64) -> Result<(), String> {
    let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let nblocks = data.len() as u64 / DISK_BLOCK;
    if nblocks == 0 {
        return Err(format!("{}: smaller than a block", path.display()));
    }
    for k in count.saturating_sub(nblocks)..count {
        let slot = k % nblocks;
        let start = usize::try_from(slot * DISK_BLOCK).unwrap();
        let block = &data[start..start + DISK_BLOCK as usize];
        let w0 = u64::from_le_bytes(block[..8].try_into().unwrap());
        let found = (w0 >> 9) & ((1 << 39) - 1);
        if block != diskwork_block(found).as_slice() || found % nblocks != slot || found < k {
            return Err(format!(
                "{}: block {k} (slot {slot}) does not hold its pattern (word 0 = {w0:#x})",
                path.display()
            ));
        }
    }
    Ok(())
}

/// Panics unless the raw image at `path` holds the pattern of every block below `count`
/// (see [`check_disk_pattern`]).
pub fn assert_disk_pattern(path: &Path, count: u64) {
    if let Err(e) = check_disk_pattern(path, count) {
        panic!("{e}");
    }
}

/// The disk helpers themselves: they parse the report lines and find a missing, damaged or
/// stale block.
pub fn check_disk_helpers_can_fail() {
    let serial = "DISKWORK START dev=/dev/vda blocks=4\nMEMWORK OK 3 1\nDISKWORK 9 ok\r\n\
                  DISKWORK 19 ok\n";
    assert_eq!(diskwork_counts(serial), [9, 19]);
    assert_eq!(diskwork_last(serial), Some(19));
    assert!(!diskwork_failed(serial));
    assert!(!at_least_both_ok(2)(serial));
    assert!(at_least_both_ok(1)(serial));
    assert_diskwork_continues(serial, Some(5));
    let bad = format!("{serial}DISKWORK CORRUPT at 7\n");
    assert!(diskwork_corrupt(&bad) && diskwork_failed(&bad) && at_least_both_ok(9)(&bad));
    assert!(diskwork_failed("DISKWORK error=write:I/O-error\n"));
    for (s, after) in [(bad.as_str(), None), (serial, Some(9)), ("", None)] {
        assert!(
            check_diskwork_continues(s, after).is_err(),
            "accepted {s:?} after {after:?}"
        );
    }
    assert!(check_diskwork_continues("DISKWORK 5 ok\nDISKWORK 5 ok\n", None).is_err());

    let dir = scratch("disk-helpers");
    let img = dir.join("disk.img");
    disk_image(&img, 1); // 256 blocks
    assert!(check_disk_pattern(&img, 1).is_err(), "an empty disk passed");
    let mut data = vec![0u8; 1 << 20];
    // 300 blocks written: slots 0..44 were overwritten by blocks 256..300.
    for k in 0..300u64 {
        let s = usize::try_from((k % 256) * DISK_BLOCK).unwrap();
        data[s..s + 4096].copy_from_slice(&diskwork_block(k));
    }
    std::fs::write(&img, &data).unwrap();
    check_disk_pattern(&img, 300).unwrap();
    check_disk_pattern(&img, 100).unwrap();
    assert!(
        check_disk_pattern(&img, 301).is_err(),
        "an unwritten block passed"
    );
    let mut flipped = data.clone();
    flipped[100 * 4096 + 1000] ^= 1;
    std::fs::write(&img, &flipped).unwrap();
    assert!(check_disk_pattern(&img, 300).is_err(), "a bit flip passed");
    let mut stale = data;
    stale[4096..8192].copy_from_slice(&diskwork_block(1)); // block 257 lost
    std::fs::write(&img, &stale).unwrap();
    assert!(
        check_disk_pattern(&img, 300).is_err(),
        "a stale block passed"
    );
    let _ = std::fs::remove_dir_all(dir);
}

// ---- guest kernel health and VMs with a special environment ----

/// Kernel reports that mean the guest's time or scheduling went wrong (soft/hard lockup, RCU
/// stall, hung task, an oops' call trace). `quiet` still prints them (they are KERN_ERR or
/// worse). Returns the offending lines.
pub fn kernel_trouble(serial: &str) -> Vec<&str> {
    const SIGNS: [&str; 6] = [
        "soft lockup",
        "hard LOCKUP",
        "self-detected stall",
        "detected stalls",
        "blocked for more than",
        "Call Trace",
    ];
    serial
        .lines()
        .filter(|l| SIGNS.iter().any(|s| l.contains(s)))
        .collect()
}

/// Panics when [`kernel_trouble`] finds anything in `serial`.
pub fn assert_kernel_healthy(what: &str, serial: &str) {
    let bad = kernel_trouble(serial);
    assert!(bad.is_empty(), "{what}: guest kernel reports {bad:?}");
}

/// The kernel-health helper finds what it must.
pub fn check_kernel_trouble_can_fail() {
    let fine = "MEMWORK OK 1 0\nclocksource: Switched to clocksource kvm-clock\n";
    assert!(kernel_trouble(fine).is_empty());
    let bad = "[  51.2] watchdog: BUG: soft lockup - CPU#0 stuck for 23s! [memwork:70]\n\
               [  60.0] rcu: INFO: rcu_sched self-detected stall on CPU\n";
    assert_eq!(kernel_trouble(bad).len(), 2);
}
