//! End-to-end: boot the test guest kit (guest/build-kit.sh) with the real binary.
//! Needs /dev/kvm for the KVM tests and the built kit; a test whose needs this host lacks is
//! ignored with the reason (cfgs from crates/cli/build.rs).

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::persist_harness;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use persist_harness::{
    Kit, Run, backend_ready, eventually, finish, kit, serial_guard, spawn_captured, wait_timeout,
};

const CMDLINE: &str = "console=ttyS0 quiet reboot=k panic=-1";

/// Generous: a nested, loaded host boots the guest in minutes.
const BOOT_LIMIT: Duration = Duration::from_secs(600);

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("anyvisor-boot-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn boot_args(kernel: &Path, kit: &Kit, test: &str) -> Vec<String> {
    vec![
        "run".into(),
        "--kernel".into(),
        kernel.display().to_string(),
        "--initrd".into(),
        kit.initrd.display().to_string(),
        "--cmdline".into(),
        format!("{CMDLINE} anyvisor.test={test}"),
    ]
}

/// Runs the binary to its end (at most `limit`), collecting stdout and stderr.
fn run(args: &[String], limit: Duration) -> Run {
    finish(spawn_captured(args, &[]), limit)
}

fn control(cmd: &str, socket: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_anyvisor"))
        .args([cmd, "--api-socket", socket.to_str().unwrap()])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn harness_helpers_can_fail() {
    let mut child = Command::new("sleep").arg("10").spawn().unwrap();
    assert!(wait_timeout(&mut child, Duration::from_millis(200)).is_none());
    assert!(!eventually(Duration::from_millis(200), || false));
}

/// Kernel error lines the platform is responsible for; `quiet` still prints errors. Linux
/// prints `PCI: Fatal: No config space access function found` when it finds no PCI
/// configuration mechanism (docs/platform.md, section 2: the conf1 host bridge).
fn assert_no_platform_errors(console: &str) {
    for line in console.lines() {
        assert!(!line.contains("PCI: Fatal"), "{line}\nconsole: {console}");
    }
}

/// `--cpus 2 --memory 4G`, test `cpus`: the guest sees both CPUs and the memory, then powers
/// off, and the VMM exits 0.
fn boot_two_cpus_4g_poweroff(backend: &str) {
    if !backend_ready(backend) {
        return;
    }
    let Some(kit) = kit() else { return };
    let _one = serial_guard();
    let mut args = boot_args(&kit.bzimage, &kit, "cpus");
    args.extend(["--cpus", "2", "--memory", "4G", "--backend", backend].map(String::from));
    let r = run(&args, BOOT_LIMIT);
    assert!(
        r.stdout.contains("ANYVISOR-INIT-OK"),
        "stdout: {}\nstderr: {}",
        r.stdout,
        r.stderr
    );
    assert!(r.stdout.contains("ANYVISOR-CPUS 2"), "stdout: {}", r.stdout);
    assert_no_platform_errors(&r.stdout);
    let mem_kib: u64 = r
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("ANYVISOR-MEM "))
        .and_then(|v| v.trim().parse().ok())
        .expect("no ANYVISOR-MEM line");
    assert!(mem_kib > 3 * 1024 * 1024, "guest sees {mem_kib} KiB");
    assert_eq!(
        r.status.and_then(|s| s.code()),
        Some(0),
        "stderr: {}",
        r.stderr
    );
    assert!(!r.stderr.contains("error:"), "stderr: {}", r.stderr);
}

/// Test `reboot` with `reboot=k`: the reset ends the VMM with status 0.
fn reboot_exits_0(backend: &str) {
    if !backend_ready(backend) {
        return;
    }
    let Some(kit) = kit() else { return };
    let _one = serial_guard();
    // The ELF vmlinux: no decompression, a faster boot.
    let mut args = boot_args(&kit.vmlinux, &kit, "reboot");
    args.extend(["--backend", backend].map(String::from));
    let r = run(&args, BOOT_LIMIT);
    assert!(
        r.stdout.contains("ANYVISOR-INIT-OK"),
        "stdout: {}\nstderr: {}",
        r.stdout,
        r.stderr
    );
    assert_no_platform_errors(&r.stdout);
    assert_eq!(
        r.status.and_then(|s| s.code()),
        Some(0),
        "stderr: {}",
        r.stderr
    );
}

fn info(socket: &Path) -> serde_json::Value {
    let out = control("info", socket);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    serde_json::from_slice(&out.stdout).expect("info is not JSON")
}

/// A guest idling in its shell: info, pause, resume, shutdown through the API socket.
fn api_pause_resume_info_shutdown(backend: &str) {
    if !backend_ready(backend) {
        return;
    }
    let Some(kit) = kit() else { return };
    let _one = serial_guard();
    let dir = scratch(&format!("api-{backend}"));
    let socket = dir.join("api.sock");
    let serial = dir.join("serial.log");
    // No test selected: the guest runs a shell on ttyS0 and waits.
    let mut args = boot_args(&kit.vmlinux, &kit, "none");
    args.extend([
        "--backend".into(),
        backend.into(),
        "--cpus".into(),
        "2".into(),
        "--serial".into(),
        serial.display().to_string(),
        "--api-socket".into(),
        socket.display().to_string(),
    ]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_anyvisor"))
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let booted = eventually(BOOT_LIMIT, || {
        std::fs::read_to_string(&serial).is_ok_and(|s| s.contains("ANYVISOR-INIT-OK"))
    });
    if !booted {
        let _ = child.kill();
        let _ = child.wait();
        let mut stderr = String::new();
        let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
        panic!(
            "guest did not boot: {stderr}\n{}",
            std::fs::read_to_string(&serial).unwrap_or_default()
        );
    }
    let v = info(&socket);
    assert_eq!(v["state"], "running");
    assert_eq!(v["backend"], backend);
    assert_eq!(v["cpu_model"], "portable-v3");
    assert_eq!(v["cpus"], 2);
    assert_eq!(v["memory_mib"], 256);
    assert_eq!(v["devices"][0]["type"], "serial", "{v}");
    assert!(v["counters"].is_object(), "{v}");

    for _ in 0..3 {
        assert_eq!(control("pause", &socket).status.code(), Some(0));
        assert_eq!(info(&socket)["state"], "paused");
        // Pausing twice is fine.
        assert_eq!(control("pause", &socket).status.code(), Some(0));
        assert_eq!(control("resume", &socket).status.code(), Some(0));
        assert_eq!(info(&socket)["state"], "running");
    }
    // The guest still runs after resume: its shell answers. (stdin is /dev/null, so prove it
    // by the VM staying alive and serving the API; a hung VM would not stop cleanly below.)
    assert_eq!(control("shutdown", &socket).status.code(), Some(0));
    let status = wait_timeout(&mut child, Duration::from_secs(60));
    let mut stderr = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    assert_eq!(status.and_then(|s| s.code()), Some(0), "stderr: {stderr}");
    assert!(!stderr.contains("error:"), "stderr: {stderr}");
    assert!(!socket.exists(), "api socket left behind");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[cfg_attr(
    not(boot_kvm),
    ignore = "needs a usable /dev/kvm and the guest kit (on KVM-PVM hosts also cargo test --release); crates/cli/build.rs"
)]
fn kvm_boot_two_cpus_4g_poweroff() {
    boot_two_cpus_4g_poweroff("kvm");
}

#[test]
#[cfg_attr(
    not(boot_kvm),
    ignore = "needs a usable /dev/kvm and the guest kit (on KVM-PVM hosts also cargo test --release); crates/cli/build.rs"
)]
fn kvm_reboot_exits_0() {
    reboot_exits_0("kvm");
}

#[test]
#[cfg_attr(
    not(boot_kvm),
    ignore = "needs a usable /dev/kvm and the guest kit (on KVM-PVM hosts also cargo test --release); crates/cli/build.rs"
)]
fn kvm_api_pause_resume_info_shutdown() {
    api_pause_resume_info_shutdown("kvm");
}

#[test]
#[cfg_attr(
    not(boot_emu),
    ignore = "needs the guest kit and cargo test --release (or ANYVISOR_TEST_EMU=1); crates/cli/build.rs"
)]
fn emu_boot_two_cpus_4g_poweroff() {
    boot_two_cpus_4g_poweroff("emu");
}

#[test]
#[cfg_attr(
    not(boot_emu),
    ignore = "needs the guest kit and cargo test --release (or ANYVISOR_TEST_EMU=1); crates/cli/build.rs"
)]
fn emu_reboot_exits_0() {
    reboot_exits_0("emu");
}

#[test]
#[cfg_attr(
    not(boot_emu),
    ignore = "needs the guest kit and cargo test --release (or ANYVISOR_TEST_EMU=1); crates/cli/build.rs"
)]
fn emu_api_pause_resume_info_shutdown() {
    api_pause_resume_info_shutdown("emu");
}

/// SIGTERM ends a running VM in order: status 1 with one `error:` line, socket removed.
/// Runs on emu (any build: the guest need not get far).
#[test]
#[cfg_attr(
    not(guest_kit),
    ignore = "needs the guest kit (guest/build-kit.sh); crates/cli/build.rs"
)]
fn sigterm_stops_in_order() {
    let Some(kit) = kit() else { return };
    let dir = scratch("sigterm");
    let socket = dir.join("api.sock");
    let mut args = boot_args(&kit.vmlinux, &kit, "none");
    args.extend([
        "--backend".into(),
        "emu".into(),
        "--serial".into(),
        "null".into(),
        "--api-socket".into(),
        socket.display().to_string(),
    ]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_anyvisor"))
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(60), || socket.exists()),
        "api socket never appeared"
    );
    // The first SIGTERM presses the power button (the booting guest cannot answer it yet);
    // the second stops the VM at once.
    for _ in 0..2 {
        let kill = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        std::thread::sleep(Duration::from_millis(300));
    }
    let status = wait_timeout(&mut child, Duration::from_secs(30));
    let mut stderr = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    assert_eq!(status.and_then(|s| s.code()), Some(1), "stderr: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors, ["error: stopped by SIGTERM"], "stderr: {stderr}");
    assert!(!socket.exists(), "api socket left behind");
    let _ = std::fs::remove_dir_all(dir);
}

/// Test `faults`: an invalid opcode, a page fault and a divide error in guest user space reach
/// the guest kernel as the right exceptions and kill only that process (SIGILL 4, SIGSEGV 11,
/// SIGFPE 8); the guest goes on and powers off. On emu the run also goes through `--backend
/// auto` with KVM made unusable, which must pick emu and say so.
fn guest_faults_kill_only_the_process(backend: &str) {
    if !backend_ready(backend) {
        return;
    }
    let Some(kit) = kit() else { return };
    let _one = serial_guard();
    let mut args = boot_args(&kit.vmlinux, &kit, "faults");
    let r = if backend == "emu" {
        args.extend(["--backend", "auto"].map(String::from));
        let mut child = Command::new(env!("CARGO_BIN_EXE_anyvisor"));
        child
            .args(&args)
            .env("ANYVISOR_KVM_DEVICE", "/nonexistent/kvm")
            .stdin(Stdio::null());
        let out = child.output().expect("cannot start anyvisor");
        Run {
            status: Some(out.status),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    } else {
        args.extend(["--backend", backend].map(String::from));
        run(&args, BOOT_LIMIT)
    };
    if backend == "emu" {
        assert!(
            r.stderr.contains("using backend emu"),
            "auto did not report emu: {}",
            r.stderr
        );
    }
    for expected in [
        "ANYVISOR-FAULT ud 4",
        "ANYVISOR-FAULT pf 11",
        "ANYVISOR-FAULT de 8",
    ] {
        assert!(
            r.stdout.contains(expected),
            "missing {expected}\nstdout: {}\nstderr: {}",
            r.stdout,
            r.stderr
        );
    }
    assert_eq!(
        r.status.and_then(|s| s.code()),
        Some(0),
        "stderr: {}",
        r.stderr
    );
}

#[test]
#[cfg_attr(
    not(boot_emu),
    ignore = "needs the guest kit and cargo test --release (or ANYVISOR_TEST_EMU=1); crates/cli/build.rs"
)]
fn emu_guest_faults_kill_only_the_process() {
    guest_faults_kill_only_the_process("emu");
}

#[test]
#[cfg_attr(
    not(boot_kvm),
    ignore = "needs a usable /dev/kvm and the guest kit (on KVM-PVM hosts also cargo test --release); crates/cli/build.rs"
)]
fn kvm_guest_faults_kill_only_the_process() {
    guest_faults_kill_only_the_process("kvm");
}
