//! End-to-end: the virtio devices (`--disk`, `--net`, `--vsock`, `--rng`) seen and used by the
//! real Linux guest (guest/build-kit.sh; cases `devices`, `net`, `vsock` in guest/src/init.sh),
//! checked from the host side: disk contents by hash, the written disk read back with qemu-img,
//! network bytes through a tap in a private network namespace, vsock bytes both ways.
//!
//! Needs: the built guest kit, `qemu-img`/`qemu-io` (disk test), root and `ip` (net test),
//! /dev/kvm for the kvm runs. A test whose needs this host lacks is ignored, with the reason
//! (cfgs from crates/cli/build.rs).
//! Boots are expensive (15 s to minutes), so each backend boots at most three times here.
//! Bad host input (no boot): exit 2 with exactly one `error:` line.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::persist_harness;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use persist_harness::{Kit, kit, serial_guard, wait_timeout};

const CMDLINE: &str = "console=ttyS0 quiet reboot=k panic=-1";

/// Generous: a nested, loaded host boots the guest under emu in minutes.
const BOOT_LIMIT: Duration = Duration::from_secs(900);

// ------------------------------------------------------------------------------------ harness

/// The kit and the backend, checked: each test is ignored (cfgs from crates/cli/build.rs) where
/// this host cannot boot it, so a failed check here fails the test.
fn ready(backend: &str) -> Kit {
    let kit = kit().expect("guest kit");
    assert!(persist_harness::backend_ready(backend));
    kit
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("anyvisor-dev-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !ok {
        persist_harness::host_changed(&format!("{tool} not installed"));
    }
    ok
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

fn sha256(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// The bytes of `seq 1 1000000 | head -c len`, which the guest generates too.
fn seq_pattern(len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 16);
    let mut i = 1u64;
    while v.len() < len {
        v.extend_from_slice(format!("{i}\n").as_bytes());
        i += 1;
    }
    v.truncate(len);
    v
}

/// Deterministic bytes without structure (xorshift), so misplaced blocks change the hash.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.extend_from_slice(&seed.to_le_bytes());
    }
    v.truncate(len);
    v
}

fn boot_args(kit: &Kit, backend: &str, test: &str) -> Vec<String> {
    [
        "run",
        "--backend",
        backend,
        "--kernel",
        kit.vmlinux.to_str().unwrap(),
        "--initrd",
        kit.initrd.to_str().unwrap(),
        "--memory",
        "256M",
        "--cmdline",
        &format!("{CMDLINE} anyvisor.test={test}"),
    ]
    .map(String::from)
    .to_vec()
}

/// A running VM whose serial output arrives line by line.
struct Guest {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: std::thread::JoinHandle<String>,
}

/// What a finished VM left behind.
struct Finished {
    status: Option<ExitStatus>,
    stdout: String,
    stderr: String,
}

impl Finished {
    /// The rest of the first stdout line starting with `marker ` (serial lines end in `\r`).
    fn marker(&self, marker: &str) -> Option<&str> {
        self.stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(marker)?.strip_prefix(' '))
    }

    /// Every `marker ...` line's rest.
    fn markers(&self, marker: &str) -> Vec<&str> {
        self.stdout
            .lines()
            .filter_map(|l| l.trim().strip_prefix(marker)?.strip_prefix(' '))
            .collect()
    }

    fn context(&self) -> String {
        format!(
            "status {:?}\nstdout:\n{}\nstderr:\n{}",
            self.status, self.stdout, self.stderr
        )
    }

    /// Why this is not "the test guest booted, powered off, and the VMM exited 0 without
    /// errors", if it is not.
    fn poweroff_problem(&self) -> Option<&'static str> {
        if !self.stdout.contains("ANYVISOR-INIT-OK") {
            Some("the guest's /init never ran")
        } else if self.status.and_then(|s| s.code()) != Some(0) {
            Some("the VMM did not exit 0")
        } else if self.stderr.contains("error:") {
            Some("the VMM reported an error")
        } else {
            None
        }
    }

    fn assert_clean_poweroff(&self) {
        if let Some(problem) = self.poweroff_problem() {
            panic!("{problem}\n{}", self.context());
        }
    }
}

impl Guest {
    fn start(program: &str, args: &[String]) -> Guest {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = err.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        });
        Guest {
            child,
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    /// Waits at most `limit` for a serial line containing `marker`.
    fn wait_for(&mut self, marker: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(marker);
                    self.seen.push(line);
                    if hit {
                        return true;
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return false,
            }
        }
    }

    /// Waits at most `limit` for the VMM to exit (killing it after), then collects its output.
    fn finish(mut self, limit: Duration) -> Finished {
        let status = wait_timeout(&mut self.child, limit);
        // The reader thread ends at EOF, which follows the exit.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        Finished {
            status,
            stdout: self.seen.join("\n"),
            stderr: self.stderr.join().unwrap_or_default(),
        }
    }
}

fn anyvisor() -> &'static str {
    env!("CARGO_BIN_EXE_anyvisor")
}

fn run_tool(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn harness_helpers_can_fail() {
    let mut child = Command::new("sleep").arg("10").spawn().unwrap();
    assert!(wait_timeout(&mut child, Duration::from_millis(200)).is_none());

    let mut g = Guest::start("sh", &["-c".into(), "echo one; echo two".into()]);
    assert!(!g.wait_for("three", Duration::from_secs(5)));
    let f = g.finish(Duration::from_secs(5));
    assert_eq!(f.marker("one"), None);
    assert_eq!(f.markers("two"), Vec::<&str>::new());
    assert!(f.poweroff_problem().is_some(), "no ANYVISOR-INIT-OK");
    let ok = Guest::start("sh", &["-c".into(), "echo ANYVISOR-INIT-OK".into()]);
    assert_eq!(ok.finish(Duration::from_secs(5)).poweroff_problem(), None);
    let failed = Guest::start("sh", &["-c".into(), "echo ANYVISOR-INIT-OK; exit 1".into()]);
    assert!(
        failed
            .finish(Duration::from_secs(5))
            .poweroff_problem()
            .is_some()
    );

    let g = Guest::start(
        "sh",
        &["-c".into(), "echo 'M a'; echo 'M b'; exit 3".into()],
    );
    let f = g.finish(Duration::from_secs(5));
    assert_eq!(f.marker("M"), Some("a"));
    assert_eq!(f.markers("M"), vec!["a", "b"]);
    assert_eq!(f.status.and_then(|s| s.code()), Some(3));

    assert_ne!(sha256(b"a"), sha256(b"b"));
    assert_eq!(
        sha256(b""),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(seq_pattern(12), b"1\n2\n3\n4\n5\n6\n");
    assert_ne!(noise(64, 1), noise(64, 2));
}

// --------------------------------------------------------------------------- disks and rng

/// One boot per backend: a 16 MiB qcow2 whose first 8 MiB are 0x5a (read by hash), a blank
/// 8 MiB qcow2 the guest writes 4 MiB to, a read-only raw disk the guest must not change, and
/// the rng. Afterwards the host reads the written disk back and `qemu-img check`s it.
#[test]
#[cfg_attr(
    not(all(boot_emu, qemu_img)),
    ignore = "needs the guest kit, qemu-img/qemu-io and cargo test --release (or ANYVISOR_TEST_EMU=1); crates/cli/build.rs"
)]
fn emu_disks_and_rng_end_to_end() {
    assert!(have("qemu-img") && have("qemu-io"));
    disks_and_rng(&ready("emu"), "emu");
}

#[test]
#[cfg_attr(
    not(all(boot_kvm, qemu_img)),
    ignore = "needs a usable /dev/kvm, the guest kit and qemu-img/qemu-io (on KVM-PVM hosts also cargo test --release); crates/cli/build.rs"
)]
fn kvm_disks_and_rng_end_to_end() {
    assert!(have("qemu-img") && have("qemu-io"));
    disks_and_rng(&ready("kvm"), "kvm");
}

fn disks_and_rng(kit: &Kit, backend: &str) {
    let _one = serial_guard();
    let dir = scratch(&format!("disks-{backend}"));
    let d1 = dir.join("d1.qcow2");
    let d2 = dir.join("d2.qcow2");
    let d3 = dir.join("d3.raw");
    let (s1, s2, s3) = (
        d1.to_str().unwrap(),
        d2.to_str().unwrap(),
        d3.to_str().unwrap(),
    );
    run_tool("qemu-img", &["create", "-q", "-f", "qcow2", s1, "16M"]);
    run_tool("qemu-io", &["-c", "write -P 0x5a 0 8M", s1]);
    run_tool("qemu-img", &["create", "-q", "-f", "qcow2", s2, "8M"]);
    let ro_bytes = noise(4 << 20, 0x5eed);
    std::fs::write(&d3, &ro_bytes).unwrap();

    let d1_raw = dir.join("d1.raw");
    run_tool(
        "qemu-img",
        &["convert", "-O", "raw", s1, d1_raw.to_str().unwrap()],
    );
    let d1_expected = sha256(&std::fs::read(&d1_raw).unwrap());

    let mut args = boot_args(kit, backend, "devices");
    args.extend(
        [
            "--disk",
            s1,
            "--disk",
            &format!("{s2},format=qcow2"),
            "--disk",
            &format!("{s3},readonly=on"),
            "--rng",
        ]
        .map(String::from),
    );
    let r = Guest::start(anyvisor(), &args).finish(BOOT_LIMIT);
    println!(
        "{backend}: {}",
        r.stdout
            .lines()
            .filter(|l| l.contains("ANYVISOR-"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    r.assert_clean_poweroff();
    let ctx = r.context();

    assert_eq!(r.marker("ANYVISOR-DEVS"), Some("4"), "{ctx}");
    assert_eq!(
        r.markers("ANYVISOR-DISK-INFO"),
        vec!["vda 32768 0", "vdb 16384 0", "vdc 8192 1"],
        "{ctx}"
    );
    let disks = r.markers("ANYVISOR-DISK");
    assert_eq!(
        disks,
        vec![
            format!("vda {d1_expected}"),
            format!("vdb {}", sha256(&vec![0u8; 8 << 20])),
            format!("vdc {}", sha256(&ro_bytes)),
        ],
        "{ctx}"
    );
    let pattern = seq_pattern(4 << 20);
    // The guest's own read-back after dropping its page cache.
    assert_eq!(
        r.marker("ANYVISOR-WROTE"),
        Some(format!("vdb {}", sha256(&pattern)).as_str()),
        "{ctx}"
    );
    assert_eq!(r.marker("ANYVISOR-RO"), Some("vdc refused"), "{ctx}");
    assert_eq!(
        r.marker("ANYVISOR-RNG-CURRENT"),
        Some("virtio_rng.0"),
        "{ctx}"
    );
    assert_eq!(r.marker("ANYVISOR-RNG"), Some("64"), "{ctx}");

    // Host side: what the guest wrote is in the image, the rest stays zero, the image is clean.
    let d2_raw = dir.join("d2.raw");
    run_tool(
        "qemu-img",
        &["convert", "-O", "raw", s2, d2_raw.to_str().unwrap()],
    );
    let written = std::fs::read(&d2_raw).unwrap();
    assert_eq!(written.len(), 8 << 20);
    assert!(written[..4 << 20] == pattern[..], "disk 2 data differs");
    assert!(written[4 << 20..].iter().all(|&b| b == 0), "disk 2 tail");
    run_tool("qemu-img", &["check", "-q", s2]);
    run_tool("qemu-img", &["check", "-q", s1]);
    assert!(
        std::fs::read(&d3).unwrap() == ro_bytes,
        "the read-only disk changed"
    );
    let _ = std::fs::remove_dir_all(dir);
}

// ------------------------------------------------------------------------------------ net

/// Deletes the network namespace (and the tap in it) however the test ends.
struct Netns(String);

impl Netns {
    fn create(name: &str, tap: &str) -> Netns {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        run_tool("ip", &["netns", "add", name]);
        let ns = Netns(name.to_owned());
        for cmd in [
            vec!["link", "set", "lo", "up"],
            vec!["tuntap", "add", "dev", tap, "mode", "tap"],
            vec!["addr", "add", "10.0.0.1/24", "dev", tap],
            vec!["link", "set", tap, "up"],
        ] {
            let mut args = vec!["netns", "exec", name, "ip"];
            args.extend(cmd);
            run_tool("ip", &args);
        }
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Kills a helper process however the test ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const NET_SERVE_ENV: &str = "ANYVISOR_DEVTEST_NET_SERVE";

/// Not a test: the host end of `net_end_to_end`, run by it inside the network namespace (this
/// test binary started again with `ANYVISOR_DEVTEST_NET_SERVE=BLOB,RECEIVED`). Port 8000 sends
/// BLOB and closes; port 8001 reads up to BLOB's length and stores it in RECEIVED.
#[test]
#[ignore = "helper process of net_end_to_end"]
fn net_serve_helper() {
    let Some(spec) = std::env::var_os(NET_SERVE_ENV) else {
        return;
    };
    let spec = spec.into_string().unwrap();
    let (blob, received) = spec.split_once(',').unwrap();
    let blob = std::fs::read(blob).unwrap();
    let send = std::net::TcpListener::bind("10.0.0.1:8000").unwrap();
    let take = std::net::TcpListener::bind("10.0.0.1:8001").unwrap();
    println!("NET-SERVE-READY");
    std::io::stdout().flush().unwrap();
    let (mut c, _) = send.accept().unwrap();
    c.write_all(&blob).unwrap();
    drop(c);
    let (c, _) = take.accept().unwrap();
    let mut got = Vec::new();
    let _ = c.take(blob.len() as u64).read_to_end(&mut got);
    std::fs::write(received, got).unwrap();
    println!("NET-SERVE-DONE");
}

/// One boot per backend: the guest (10.0.0.2) pings the host end of its tap (10.0.0.1, in a
/// private network namespace), fetches 2 MiB over TCP and sends it back.
#[test]
#[cfg_attr(
    not(all(boot_emu, root, ip_tool)),
    ignore = "needs root and ip (a network namespace and a tap), the guest kit and cargo test --release (or ANYVISOR_TEST_EMU=1); crates/cli/build.rs"
)]
fn emu_net_end_to_end() {
    assert!(is_root() && have("ip"), "needs root and ip");
    net(&ready("emu"), "emu");
}

#[test]
#[cfg_attr(
    not(all(boot_kvm, root, ip_tool)),
    ignore = "needs root and ip (a network namespace and a tap), a usable /dev/kvm and the guest kit; crates/cli/build.rs"
)]
fn kvm_net_end_to_end() {
    assert!(is_root() && have("ip"), "needs root and ip");
    net(&ready("kvm"), "kvm");
}

fn net(kit: &Kit, backend: &str) {
    let _one = serial_guard();
    let dir = scratch(&format!("net-{backend}"));
    let name = format!("avdev{}{backend}", std::process::id());
    let tap = "avdevtap0";
    let _ns = Netns::create(&name, tap);
    let blob = noise(2 << 20, 0x0e7);
    let blob_path = dir.join("blob");
    let received = dir.join("received");
    std::fs::write(&blob_path, &blob).unwrap();

    let exe = std::env::current_exe().unwrap();
    let mut server = Command::new("ip")
        .args(["netns", "exec", &name])
        .arg(&exe)
        .args([
            "--exact",
            "devices::net_serve_helper",
            "--ignored",
            "--nocapture",
        ])
        .env(
            NET_SERVE_ENV,
            format!("{},{}", blob_path.display(), received.display()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    let mut out = BufReader::new(server.stdout.take().unwrap());
    while out.read_line(&mut ready).unwrap_or(0) > 0 && !ready.contains("NET-SERVE-READY") {}
    let _server = KillOnDrop(server);
    assert!(ready.contains("NET-SERVE-READY"), "server: {ready}");

    let mac = "52:54:00:12:34:56";
    let mut args = vec![
        "netns".to_owned(),
        "exec".into(),
        name.clone(),
        anyvisor().into(),
    ];
    args.extend(boot_args(kit, backend, "net"));
    args.extend(["--net".into(), format!("tap={tap},mac={mac}")]);
    let r = Guest::start("ip", &args).finish(BOOT_LIMIT);
    println!(
        "{backend}: {}",
        r.stdout
            .lines()
            .filter(|l| l.contains("ANYVISOR-"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    r.assert_clean_poweroff();
    let ctx = r.context();
    assert_eq!(r.marker("ANYVISOR-MAC"), Some(mac), "{ctx}");
    assert_eq!(r.marker("ANYVISOR-PING"), Some("ok"), "{ctx}");
    assert_eq!(
        r.marker("ANYVISOR-NET-SHA"),
        Some(sha256(&blob).as_str()),
        "{ctx}"
    );
    assert_eq!(r.marker("ANYVISOR-NET-SENT"), Some("ok"), "{ctx}");
    let got = std::fs::read(&received).unwrap_or_default();
    assert!(
        got == blob,
        "host received {} bytes, not the blob",
        got.len()
    );
    let _ = std::fs::remove_dir_all(dir);
}

// ---------------------------------------------------------------------------------- vsock

/// One boot per backend: the host connects to the guest's port 5000 (`CONNECT 5000` on the
/// uds) and gets 1 MiB echoed; then the guest connects to host port 6000 (`<uds>_6000`) and
/// gets its 1 MiB echoed by the host.
#[test]
#[cfg_attr(
    not(boot_emu),
    ignore = "needs the guest kit and cargo test --release (or ANYVISOR_TEST_EMU=1); crates/cli/build.rs"
)]
fn emu_vsock_end_to_end() {
    vsock(&ready("emu"), "emu");
}

#[test]
#[cfg_attr(
    not(boot_kvm),
    ignore = "needs a usable /dev/kvm and the guest kit (on KVM-PVM hosts also cargo test --release); crates/cli/build.rs"
)]
fn kvm_vsock_end_to_end() {
    vsock(&ready("kvm"), "kvm");
}

fn vsock(kit: &Kit, backend: &str) {
    let _one = serial_guard();
    let dir = scratch(&format!("vsock-{backend}"));
    let uds = dir.join("v.sock");
    let listener = UnixListener::bind(format!("{}_6000", uds.display())).unwrap();
    let guest_sent = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
        let (mut c, _) = listener.accept()?;
        let mut got = Vec::new();
        c.read_to_end(&mut got)?;
        c.write_all(&got)?;
        c.shutdown(Shutdown::Both)?;
        Ok(got)
    });

    let mut args = boot_args(kit, backend, "vsock");
    args.extend(["--vsock".into(), format!("3,uds={}", uds.display())]);
    let mut g = Guest::start(anyvisor(), &args);
    let listening = g.wait_for("ANYVISOR-VSOCK-LISTENING 5000", BOOT_LIMIT);
    let mut echo_ok = None;
    if listening {
        let data = noise(1 << 20, 0x750c);
        let mut s = std::os::unix::net::UnixStream::connect(&uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
        s.write_all(b"CONNECT 5000\n").unwrap();
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while s.read_exact(&mut byte).is_ok() && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        assert!(
            line.starts_with(b"OK "),
            "CONNECT answer {:?}",
            String::from_utf8_lossy(&line)
        );
        let mut w = s.try_clone().unwrap();
        let to_send = data.clone();
        let writer = std::thread::spawn(move || {
            w.write_all(&to_send)?;
            w.shutdown(Shutdown::Write)
        });
        let mut back = Vec::new();
        let _ = s.read_to_end(&mut back);
        writer.join().unwrap().unwrap();
        echo_ok = Some(back == data);
    }
    let r = g.finish(BOOT_LIMIT);
    println!(
        "{backend}: {}",
        r.stdout
            .lines()
            .filter(|l| l.contains("ANYVISOR-"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let ctx = r.context();
    assert!(listening, "guest never listened\n{ctx}");
    assert_eq!(echo_ok, Some(true), "host -> guest echo differs\n{ctx}");
    r.assert_clean_poweroff();
    assert_eq!(r.marker("ANYVISOR-VSOCK-ECHO"), Some("ok"), "{ctx}");
    let pattern = seq_pattern(1 << 20);
    assert_eq!(
        r.marker("ANYVISOR-VSOCK-BACK"),
        Some(sha256(&pattern).as_str()),
        "{ctx}"
    );
    let got = guest_sent.join().unwrap().unwrap();
    assert!(got == pattern, "host received {} bytes", got.len());
    let _ = std::fs::remove_dir_all(dir);
}

// ------------------------------------------------------------------------ bad host input

/// A file that looks like a bzImage to the pre-check, so device errors are reached.
fn fake_bzimage(dir: &Path) -> PathBuf {
    let mut bz = vec![0u8; 0x400];
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    let p = dir.join("fake-bzImage");
    std::fs::write(&p, bz).unwrap();
    p
}

/// Exit 2, exactly one stderr line, an `error:` line containing `needle`, nothing on stdout.
fn assert_usage_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "want one line, stderr: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(lines[0].contains(needle), "{:?} lacks {needle:?}", lines[0]);
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn bad_device_input_exits_2() {
    let dir = scratch("bad");
    let k = fake_bzimage(&dir);
    // Magic and version 3, but a cluster size of 2^40.
    let mut corrupt = vec![0u8; 512];
    corrupt[..4].copy_from_slice(b"QFI\xfb");
    corrupt[4..8].copy_from_slice(&3u32.to_be_bytes());
    corrupt[20..24].copy_from_slice(&40u32.to_be_bytes());
    corrupt[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
    let corrupt_path = dir.join("corrupt.qcow2");
    std::fs::write(&corrupt_path, &corrupt).unwrap();
    // Only the magic: the header is cut short.
    let short_path = dir.join("short.qcow2");
    std::fs::write(&short_path, b"QFI\xfb").unwrap();
    let missing = dir.join("missing.img");
    let raw = dir.join("raw.img");
    std::fs::write(&raw, vec![0u8; 4096]).unwrap();

    let cases: Vec<(Vec<String>, String)> = vec![
        (
            vec!["--disk".into(), missing.display().to_string()],
            format!("cannot open disk {}", missing.display()),
        ),
        (
            vec!["--disk".into(), format!("{},format=qed", raw.display())],
            "unknown format 'qed'".into(),
        ),
        (
            vec!["--disk".into(), format!("{},format=vmdk", raw.display())],
            format!(
                "cannot open disk {}: not a VMDK image (bad magic)",
                raw.display()
            ),
        ),
        (
            vec!["--disk".into(), corrupt_path.display().to_string()],
            format!("cannot open disk {}", corrupt_path.display()),
        ),
        (
            vec!["--disk".into(), short_path.display().to_string()],
            format!("cannot open disk {}", short_path.display()),
        ),
        (
            vec!["--disk".into(), format!("{},format=qcow2", raw.display())],
            format!("cannot open disk {}", raw.display()),
        ),
        (
            vec![
                "--net".into(),
                "tap=this-name-is-far-too-long-for-a-tap".into(),
            ],
            "tap".into(),
        ),
        // Passes the parser, but the kernel refuses the name ('/').
        (
            vec!["--net".into(), "tap=bad/name".into()],
            "cannot open tap bad/name".into(),
        ),
    ];
    for (extra, needle) in cases {
        let mut args: Vec<String> = ["run", "--backend", "emu", "--serial", "null", "--kernel"]
            .map(String::from)
            .to_vec();
        args.push(k.display().to_string());
        args.extend(extra.iter().cloned());
        let out = Command::new(anyvisor())
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        println!("{extra:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
        assert_usage_error(&out, &needle);
    }
    let _ = std::fs::remove_dir_all(dir);
}

// ------------------------------------------------------------------------- what images open

/// A qcow2 image whose header names `backing` (qemu-img does not open it: `-u`).
fn qcow2_over(path: &Path, backing: &str, backing_format: &str) {
    run_tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            backing,
            "-F",
            backing_format,
            path.to_str().unwrap(),
            "4M",
        ],
    );
}

/// Runs `anyvisor run` on a fake kernel with `extra`, killed after 60 s: a FIFO where a file
/// should be must not hang the VMM.
fn run_bounded(kernel: &Path, extra: &[String]) -> Output {
    let mut args: Vec<String> = ["run", "--backend", "emu", "--serial", "null", "--kernel"]
        .map(String::from)
        .to_vec();
    args.push(kernel.display().to_string());
    args.extend(extra.iter().cloned());
    let mut child = Command::new(anyvisor())
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = wait_timeout(&mut child, Duration::from_secs(60));
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{extra:?}: still running after {:?}", start.elapsed());
    }
    child.wait_with_output().unwrap()
}

/// Opening an image stays inside what the user named (issue 15): a qcow2 backing file is
/// followed only with `backing=on`, and never to a FIFO, a device or a directory; a FIFO or a
/// character device as a disk or an initrd is refused at once, not waited on.
#[test]
#[cfg_attr(
    not(qemu_img),
    ignore = "needs qemu-img (scripts/setup.sh installs qemu-utils); crates/cli/build.rs"
)]
fn hostile_images_are_refused_promptly() {
    assert!(have("qemu-img"));
    let dir = scratch("hostile-images");
    let k = fake_bzimage(&dir);
    let fifo = dir.join("fifo");
    run_tool("mkfifo", &[fifo.to_str().unwrap()]);
    let fifo_s = fifo.display().to_string();
    std::fs::write(dir.join("base.raw"), vec![0u8; 4 << 20]).unwrap();
    let img = |name: &str, backing: &str| {
        let p = dir.join(name);
        qcow2_over(&p, backing, "raw");
        p.display().to_string()
    };
    let shadow = img("shadow.qcow2", "/etc/shadow");
    let chained = img("chained.qcow2", "base.raw");
    let to_fifo = img("fifo.qcow2", &fifo_s);
    let to_zero = img("zero.qcow2", "/dev/zero");
    let to_dir = img("dir.qcow2", "/etc");
    let disk = |s: &str| vec!["--disk".to_string(), s.to_string()];
    let cases: Vec<(Vec<String>, String)> = vec![
        (
            disk(&shadow),
            format!(
                "cannot open disk {shadow}: names backing file '/etc/shadow', which is followed \
                 only with backing=on (import: --backing)"
            ),
        ),
        (
            disk(&format!("{shadow},readonly=on,backing=off")),
            "names backing file '/etc/shadow'".into(),
        ),
        (disk(&chained), "names backing file 'base.raw'".into()),
        (
            disk(&format!("{to_fifo},backing=on")),
            format!(
                "backing file {fifo_s}: cannot open disk {fifo_s}: is a FIFO, not a regular file"
            ),
        ),
        (
            disk(&format!("{to_zero},backing=on,readonly=on")),
            "cannot open disk /dev/zero: is a character device, not a regular file".into(),
        ),
        (
            disk(&format!("{to_dir},backing=on")),
            "cannot open disk /etc: is a directory, not a regular file".into(),
        ),
        (
            disk(&fifo_s),
            format!("cannot open disk {fifo_s}: is a FIFO, not a regular file"),
        ),
        (
            disk(&format!("{fifo_s},readonly=on")),
            format!("cannot open disk {fifo_s}: is a FIFO, not a regular file"),
        ),
        (
            disk("/dev/zero"),
            "cannot open disk /dev/zero: is a character device, not a regular file".into(),
        ),
        (
            vec!["--initrd".into(), fifo_s.clone()],
            format!("cannot read {fifo_s}: is a FIFO, not a regular file"),
        ),
        (
            vec!["--initrd".into(), "/dev/zero".into()],
            "cannot read /dev/zero: is a character device, not a regular file".into(),
        ),
    ];
    for (extra, needle) in cases {
        let out = run_bounded(&k, &extra);
        println!("{extra:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
        assert_usage_error(&out, &needle);
    }
    // A FIFO as the kernel, too.
    let out = run_bounded(&fifo, &[]);
    assert_usage_error(&out, &format!("cannot read {fifo_s}: is a FIFO"));
    let _ = std::fs::remove_dir_all(dir);
}

/// A legitimate chain with `backing=on`: the guest reads the backing files' bytes through the
/// top image, and `info` lists the chain.
#[test]
#[cfg_attr(
    not(all(boot_emu, qemu_img)),
    ignore = "needs the guest kit, qemu-img/qemu-io and cargo test --release (or ANYVISOR_TEST_EMU=1); crates/cli/build.rs"
)]
fn emu_backing_chain_end_to_end() {
    assert!(have("qemu-img") && have("qemu-io"));
    let kit = ready("emu");
    let _one = serial_guard();
    let dir = scratch("chain");
    let base = dir.join("base.raw");
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    std::fs::write(&base, noise(4 << 20, 0xba5e)).unwrap();
    qcow2_over(&mid, "base.raw", "raw");
    run_tool(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x77 1M 64k",
            mid.to_str().unwrap(),
        ],
    );
    qcow2_over(&top, "mid.qcow2", "qcow2");
    run_tool(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x33 2M 4k",
            top.to_str().unwrap(),
        ],
    );
    let flat = dir.join("flat.raw");
    run_tool(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            top.to_str().unwrap(),
            flat.to_str().unwrap(),
        ],
    );
    let expected = sha256(&std::fs::read(&flat).unwrap());
    // Neither layer alone has those bytes.
    assert_ne!(expected, sha256(&std::fs::read(&base).unwrap()));

    let mut args = boot_args(&kit, "emu", "devices");
    args.extend(["--disk".into(), format!("{},backing=on", top.display())]);
    let serial = dir.join("serial.log");
    let socket = dir.join("api.sock");
    let mut vm = persist_harness::Vm::spawn(&args, &serial, &socket);
    let mut info = None;
    let got = persist_harness::eventually(Duration::from_secs(120), || {
        let out = vm.control("info", &[]);
        if out.status.success() {
            info = serde_json::from_slice::<serde_json::Value>(&out.stdout).ok();
        }
        info.is_some()
    });
    assert!(got, "no info: {}", vm.diagnostics());
    let info = info.unwrap();
    let blk: Vec<&serde_json::Value> = info["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["type"] == "virtio-blk")
        .collect();
    assert_eq!(blk.len(), 1, "{info}");
    assert_eq!(blk[0]["backing"], true, "{info}");
    assert_eq!(
        blk[0]["chain"],
        serde_json::json!([
            {"path": mid, "format": "qcow2", "role": "backing"},
            {"path": base, "format": "raw", "role": "backing"},
        ]),
        "{info}"
    );
    vm.wait_serial(BOOT_LIMIT, |s| s.contains("ANYVISOR-DISK vda"))
        .unwrap();
    assert!(
        vm.wait_exit(Duration::from_secs(120)).is_some(),
        "{}",
        vm.diagnostics()
    );
    let serial_text = vm.serial_text();
    let line = serial_text
        .lines()
        .find_map(|l| l.trim().strip_prefix("ANYVISOR-DISK vda "))
        .unwrap_or_default();
    assert_eq!(line, expected, "{}", vm.diagnostics());
    drop(vm);
    let _ = std::fs::remove_dir_all(dir);
}

/// `anyvisor import` opens its sources by the same rules: a qcow2 with a backing file is refused
/// unless `--backing`, and with it the imported disk holds the whole chain's bytes.
#[test]
#[cfg_attr(
    not(qemu_img),
    ignore = "needs qemu-img (scripts/setup.sh installs qemu-utils); crates/cli/build.rs"
)]
fn import_follows_backing_only_when_asked() {
    assert!(have("qemu-img") && have("qemu-io"));
    let dir = scratch("import-backing");
    std::fs::write(dir.join("base.raw"), noise(4 << 20, 0x1a2b)).unwrap();
    let top = dir.join("top.qcow2");
    qcow2_over(&top, "base.raw", "raw");
    run_tool(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x44 1M 8k",
            top.to_str().unwrap(),
        ],
    );
    let out = dir.join("out");
    let import = |extra: &[&str]| {
        Command::new(anyvisor())
            .args(["import", top.to_str().unwrap(), "--output"])
            .arg(&out)
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    assert_usage_error(
        &import(&[]),
        &format!(
            "cannot open disk {}: names backing file 'base.raw', which is followed only with \
             backing=on (import: --backing)",
            top.display()
        ),
    );
    let o = import(&["--backing"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let imported = out.join("top-disk0.qcow2");
    run_tool(
        "qemu-img",
        &["compare", top.to_str().unwrap(), imported.to_str().unwrap()],
    );
    let _ = std::fs::remove_dir_all(dir);
}
