//! `--seccomp`: the test guest boots to its end with every thread filtered, on both backends,
//! and a system call outside a thread's allowlist kills the VMM with SIGSYS unless the filters
//! are off. Needs the guest kit (guest/build-kit.sh) and an optimized build for the boots (the
//! same skips as tests/e2e/boot.rs).

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::persist_harness;

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::time::Duration;

use persist_harness::{Kit, backend_ready, eventually, finish, kit, serial_guard, spawn_captured};

const CMDLINE: &str = "console=ttyS0 quiet reboot=k panic=-1";
/// Generous: a nested, loaded host boots the guest in minutes.
const BOOT_LIMIT: Duration = Duration::from_secs(600);
/// The signal `SECCOMP_RET_KILL_PROCESS` ends the process with.
const SIGSYS: i32 = 31;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("anyvisor-seccomp-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn boot_args(kit: &Kit, backend: &str, seccomp: &str, test: &str) -> Vec<String> {
    [
        "run",
        "--backend",
        backend,
        "--seccomp",
        seccomp,
        "--kernel",
        kit.vmlinux.to_str().unwrap(),
        "--initrd",
        kit.initrd.to_str().unwrap(),
        "--cmdline",
        &format!("{CMDLINE} anyvisor.test={test}"),
    ]
    .map(String::from)
    .to_vec()
}

/// Boots with every filter on, uses the API (one request on a connection thread) and lets the
/// guest power off: the VMM must exit 0.
fn boots_filtered(backend: &str) {
    let Some(kit) = kit() else { return };
    if !backend_ready(backend) {
        return;
    }
    let _one = serial_guard();
    let dir = scratch(backend);
    let socket = dir.join("api.sock");
    let mut args = boot_args(&kit, backend, "on", "poweroff");
    args.extend(["--api-socket".into(), socket.display().to_string()]);
    let child = spawn_captured(&args, &[]);
    assert!(
        eventually(Duration::from_secs(60), || socket.exists()),
        "api socket never appeared"
    );
    let info = Command::new(env!("CARGO_BIN_EXE_anyvisor"))
        .args(["info", "--api-socket", socket.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(info.status.success(), "{info:?}");
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["backend"], backend);
    assert!(info["migration"].is_null(), "{info}");
    let r = finish(child, BOOT_LIMIT);
    assert!(
        r.stdout.contains("ANYVISOR-INIT-OK"),
        "{backend}: no init banner\nstdout: {}\nstderr: {}",
        r.stdout,
        r.stderr
    );
    assert_eq!(
        r.status.and_then(|s| s.code()),
        Some(0),
        "{backend}: {:?}\nstderr: {}",
        r.status,
        r.stderr
    );
    assert!(!socket.exists(), "the api socket was left behind");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[cfg_attr(
    not(boot_emu),
    ignore = "needs the guest kit and cargo test --release (or ANYVISOR_TEST_EMU=1); crates/cli/build.rs"
)]
fn emu_boots_with_seccomp_on() {
    boots_filtered("emu");
}

#[test]
#[cfg_attr(
    not(boot_kvm),
    ignore = "needs a usable /dev/kvm and the guest kit (on KVM-PVM hosts also cargo test --release); crates/cli/build.rs"
)]
fn kvm_boots_with_seccomp_on() {
    boots_filtered("kvm");
}

/// `ANYVISOR_TEST_FORBIDDEN_SYSCALL` makes the API thread call `getcwd`, which its allowlist
/// lacks, right after installing its filter. No guest boot is needed: the API thread starts
/// before the vCPUs run much, and with the filters off the VM is stopped through the API.
fn forbidden_syscall(seccomp: &str) -> (Option<ExitStatus>, String) {
    let kit = kit().expect("checked by the caller");
    let _one = serial_guard();
    let dir = scratch(&format!("forbidden-{seccomp}"));
    let socket = dir.join("api.sock");
    let mut args = boot_args(&kit, "emu", seccomp, "poweroff");
    args.extend(["--api-socket".into(), socket.display().to_string()]);
    args.extend(["--serial".into(), "null".into()]);
    let child = spawn_captured(&args, &[("ANYVISOR_TEST_FORBIDDEN_SYSCALL", "1")]);
    if seccomp == "off" {
        assert!(
            eventually(Duration::from_secs(60), || socket.exists()),
            "api socket never appeared"
        );
        // Give the API thread time to make the call.
        std::thread::sleep(Duration::from_millis(500));
        let out = Command::new(env!("CARGO_BIN_EXE_anyvisor"))
            // At once: this test is about the filter, not the guest's power-off.
            .args([
                "shutdown",
                "--force",
                "--api-socket",
                socket.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let r = finish(child, Duration::from_secs(120));
    let _ = std::fs::remove_dir_all(&dir);
    (r.status, r.stderr)
}

#[test]
#[cfg_attr(
    not(guest_kit),
    ignore = "needs the guest kit (guest/build-kit.sh); crates/cli/build.rs"
)]
fn forbidden_syscall_kills_with_sigsys() {
    if kit().is_none() {
        return;
    }
    let (status, stderr) = forbidden_syscall("on");
    let status = status.expect("the VMM did not end");
    assert_eq!(
        status.signal(),
        Some(SIGSYS),
        "{status:?}\nstderr: {stderr}"
    );
    assert_eq!(status.code(), None);
}

#[test]
#[cfg_attr(
    not(guest_kit),
    ignore = "needs the guest kit (guest/build-kit.sh); crates/cli/build.rs"
)]
fn forbidden_syscall_is_allowed_with_seccomp_off() {
    if kit().is_none() {
        return;
    }
    let (status, stderr) = forbidden_syscall("off");
    let status = status.expect("the VMM did not end");
    assert_eq!(status.code(), Some(0), "{status:?}\nstderr: {stderr}");
}
