//! End-to-end: orderly shutdown through the ACPI power button and the guest kernel panic
//! report, with the real binary and the guest kit (guest/build-kit.sh), on both backends.
//!
//! The kit's init answers the button (busybox acpid, `guest/src/init.sh`): it prints
//! `ANYVISOR-POWER-BUTTON pressed`, then `ANYVISOR-POWEROFF orderly` and powers off; under
//! `anyvisor.test=ignore-power-button` it prints `ANYVISOR-POWER-BUTTON ignored` and runs on.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::persist_harness;

use std::process::Command;
use std::time::Duration;

use persist_harness::{BOOT_LIMIT, Vm, backend_ready, kit, scratch, serial_guard};

fn args(kit: &persist_harness::Kit, backend: &str, test: &str) -> Vec<String> {
    [
        "run",
        "--kernel",
        kit.vmlinux.to_str().unwrap(),
        "--initrd",
        kit.initrd.to_str().unwrap(),
        "--cmdline",
        &format!("console=ttyS0 reboot=k panic=-1 anyvisor.test={test}"),
        "--memory",
        "256M",
        "--backend",
        backend,
    ]
    .map(String::from)
    .to_vec()
}

/// Boots `test` on `backend` and waits for the guest to be idle (button handler running).
fn boot_idle(backend: &str, test: &str, name: &str) -> Option<(Vm, std::path::PathBuf)> {
    if !backend_ready(backend) {
        return None;
    }
    let kit = kit()?;
    let dir = scratch(name);
    let mut vm = Vm::spawn(
        &args(&kit, backend, test),
        &dir.join("serial"),
        &dir.join("api.sock"),
    );
    vm.wait_serial(BOOT_LIMIT, |s| s.contains("ANYVISOR-IDLE"))
        .unwrap();
    assert!(
        !vm.serial_text().contains("ANYVISOR-POWER-BUTTON absent"),
        "the guest kit predates the power button: rebuild it (guest/build-kit.sh)"
    );
    Some((vm, dir))
}

/// `anyvisor shutdown`: the guest logs its orderly power-off, `shutdown` returns once the VM
/// is gone, and `run` exits 0 without an error line.
fn shutdown_is_orderly(backend: &str) {
    let _one = serial_guard();
    let Some((mut vm, dir)) = boot_idle(backend, "idle", &format!("shutdown-{backend}")) else {
        return;
    };
    let out = vm.control("shutdown", &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}\n{}", vm.diagnostics());
    // `shutdown` waited for the VMM to go: its socket is gone already.
    assert!(!vm.socket.exists(), "shutdown returned before the vm ended");
    let status = vm.wait_exit(Duration::from_secs(30));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}",
        vm.diagnostics()
    );
    let serial = vm.serial_text();
    assert!(
        serial.contains("ANYVISOR-POWER-BUTTON pressed")
            && serial.contains("ANYVISOR-POWEROFF orderly"),
        "{}",
        vm.diagnostics()
    );
    assert!(!vm.stderr().contains("error:"), "{}", vm.diagnostics());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[cfg_attr(
    not(boot_emu),
    ignore = "needs the guest kit and cargo test --release (or ANYVISOR_TEST_EMU=1); crates/cli/build.rs"
)]
fn emu_shutdown_is_orderly() {
    shutdown_is_orderly("emu");
}

#[test]
#[cfg_attr(
    not(boot_kvm),
    ignore = "needs a usable /dev/kvm and the guest kit (on KVM-PVM hosts also cargo test --release); crates/cli/build.rs"
)]
fn kvm_shutdown_is_orderly() {
    shutdown_is_orderly("kvm");
}

/// A guest that ignores the button is stopped after `--timeout`: `run` exits 1 with one
/// `error:` line saying so; `shutdown` itself succeeds (its request was carried out).
#[test]
#[cfg_attr(
    not(boot_emu),
    ignore = "needs the guest kit and cargo test --release (or ANYVISOR_TEST_EMU=1); crates/cli/build.rs"
)]
fn emu_shutdown_stops_a_guest_that_ignores_the_button() {
    let _one = serial_guard();
    let Some((mut vm, dir)) = boot_idle("emu", "ignore-power-button", "shutdown-ignored") else {
        return;
    };
    let start = std::time::Instant::now();
    let out = vm.control("shutdown", &["--timeout", "3"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}\n{}", vm.diagnostics());
    assert!(
        start.elapsed() >= Duration::from_secs(3),
        "stopped before the timeout"
    );
    let status = vm.wait_exit(Duration::from_secs(30));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "{}",
        vm.diagnostics()
    );
    assert!(vm.serial_text().contains("ANYVISOR-POWER-BUTTON ignored"));
    let stderr = vm.stderr();
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(
        errors,
        [
            "error: the guest did not power off within 3 s of the ACPI power button (the shutdown request); stopped it"
        ],
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// `shutdown --force` stops at once (the guest is not asked) and `run` exits 0, also with an
/// API client connected that has not sent its request.
#[test]
#[cfg_attr(
    not(boot_emu),
    ignore = "needs the guest kit and cargo test --release (or ANYVISOR_TEST_EMU=1); crates/cli/build.rs"
)]
fn emu_shutdown_force_stops_at_once() {
    let _one = serial_guard();
    let Some((mut vm, dir)) = boot_idle("emu", "ignore-power-button", "shutdown-force") else {
        return;
    };
    // A client that connected and sent nothing yet: the stopping API server cuts it (on the
    // main thread, under its seccomp filter: this once died of SIGSYS on `shutdown(2)`).
    let idle = std::os::unix::net::UnixStream::connect(&vm.socket).unwrap();
    let out = vm.control("shutdown", &["--force"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}\n{}", vm.diagnostics());
    let status = vm.wait_exit(Duration::from_secs(30));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{status:?}\n{}",
        vm.diagnostics()
    );
    drop(idle);
    assert!(!vm.serial_text().contains("ANYVISOR-POWER-BUTTON"));
    let _ = std::fs::remove_dir_all(dir);
}

/// SIGTERM to `run` presses the button as well: orderly power-off, exit 0.
#[test]
#[cfg_attr(
    not(boot_emu),
    ignore = "needs the guest kit and cargo test --release (or ANYVISOR_TEST_EMU=1); crates/cli/build.rs"
)]
fn emu_sigterm_is_an_orderly_shutdown() {
    let _one = serial_guard();
    let Some((mut vm, dir)) = boot_idle("emu", "idle", "shutdown-sigterm") else {
        return;
    };
    let killed = Command::new("kill")
        .args(["-TERM", &vm.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = vm.wait_exit(Duration::from_secs(60));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}",
        vm.diagnostics()
    );
    assert!(
        vm.serial_text().contains("ANYVISOR-POWEROFF orderly"),
        "{}",
        vm.diagnostics()
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A guest kernel panic (sysrq `c`; `panic=-1` then resets) ends `run` with exit 1 and one
/// `error:` line naming the panic, where a plain reset exits 0 (boot.rs `reboot_exits_0`).
fn panic_exits_1(backend: &str) {
    let _one = serial_guard();
    if !backend_ready(backend) {
        return;
    }
    let Some(kit) = kit() else { return };
    let dir = scratch(&format!("panic-{backend}"));
    let mut vm = Vm::spawn(
        &args(&kit, backend, "panic"),
        &dir.join("serial"),
        &dir.join("api.sock"),
    );
    let status = vm.wait_exit(BOOT_LIMIT);
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "{}",
        vm.diagnostics()
    );
    let stderr = vm.stderr();
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(
        errors,
        ["error: the guest kernel panicked: sysrq triggered crash"],
        "{}",
        vm.diagnostics()
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[cfg_attr(
    not(boot_emu),
    ignore = "needs the guest kit and cargo test --release (or ANYVISOR_TEST_EMU=1); crates/cli/build.rs"
)]
fn emu_guest_panic_exits_1() {
    panic_exits_1("emu");
}

#[test]
#[cfg_attr(
    not(boot_kvm),
    ignore = "needs a usable /dev/kvm and the guest kit (on KVM-PVM hosts also cargo test --release); crates/cli/build.rs"
)]
fn kvm_guest_panic_exits_1() {
    panic_exits_1("kvm");
}

/// A receiver still waiting for its migration (`run --incoming`), with idle strangers connected,
/// ends on SIGTERM, SIGINT and SIGHUP as every other mode does: status 1, exactly one
/// `error: stopped by SIG...` line, its socket file removed. (It used to die of the signal,
/// silently.) No guest is needed.
#[test]
fn a_waiting_receiver_ends_with_its_error_line_on_a_signal() {
    for signal in ["TERM", "INT", "HUP"] {
        let dir = scratch(&format!("incoming-{signal}"));
        let sock = dir.join("m.sock");
        let child = persist_harness::spawn_captured(
            &[
                "run".into(),
                "--incoming".into(),
                format!("unix:{}", sock.display()),
            ],
            &[],
        );
        assert!(
            persist_harness::eventually(Duration::from_secs(10), || sock.exists()),
            "the receiver does not listen"
        );
        let _idle: Vec<_> = (0..5)
            .map(|_| std::os::unix::net::UnixStream::connect(&sock).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        let killed = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let run = persist_harness::finish(child, Duration::from_secs(20));
        let errors: Vec<&str> = run
            .stderr
            .lines()
            .filter(|l| l.starts_with("error:"))
            .collect();
        assert_eq!(
            errors,
            [format!("error: stopped by SIG{signal}")],
            "SIG{signal}: {}",
            run.stderr
        );
        assert_eq!(
            run.status.and_then(|s| s.code()),
            Some(1),
            "SIG{signal}: {}",
            run.stderr
        );
        assert!(
            !sock.exists(),
            "SIG{signal}: the socket file was left behind"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A control command waiting for a VMM that never answers (a socket nobody serves) ends on
/// SIGTERM, SIGINT or SIGHUP with its one `error:` line and status 1, not silently by the signal.
#[test]
fn a_waiting_control_command_ends_with_its_error_line_on_a_signal() {
    let dir = scratch("client-signal");
    let sock = dir.join("mute.sock");
    // Connections queue in the backlog and are never accepted: the client waits for an answer.
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    for (signal, cmd) in [("TERM", "info"), ("INT", "pause"), ("HUP", "migrate")] {
        let mut args = vec![
            cmd.to_string(),
            "--api-socket".into(),
            sock.display().to_string(),
        ];
        if cmd == "migrate" {
            args.extend(["--to".into(), "unix:/nonexistent/anyvisor.sock".into()]);
        }
        let child = persist_harness::spawn_captured(&args, &[]);
        std::thread::sleep(Duration::from_millis(500));
        let killed = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let run = persist_harness::finish(child, Duration::from_secs(20));
        let lines: Vec<&str> = run.stderr.lines().collect();
        assert_eq!(
            lines,
            [format!(
                "error: stopped by SIG{signal} before the command completed; what the VMM did is unknown"
            )],
            "{cmd} on SIG{signal}: {}",
            run.stderr
        );
        assert_eq!(
            run.status.and_then(|s| s.code()),
            Some(1),
            "{cmd}: {}",
            run.stderr
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// `run` signalled before its VM launches (a long restore or disk read, stood in for by the
/// `ANYVISOR_TEST_SLOW_START` hook) ends with one `error:` line and status 1 instead of dying
/// without a word, and leaves no API socket behind.
#[test]
fn run_signalled_before_its_vm_launches_ends_with_its_error_line() {
    let Some(kit) = kit() else { return };
    for signal in ["TERM", "INT", "HUP"] {
        let dir = scratch(&format!("prelaunch-{signal}"));
        let socket = dir.join("api.sock");
        let mut vm = Vm::spawn_with_env(
            &args(&kit, "emu", "idle"),
            &[("ANYVISOR_TEST_SLOW_START", "1")],
            &dir.join("serial"),
            &socket,
        );
        let start = std::time::Instant::now();
        while !vm
            .stderr()
            .contains("test hook: waiting before the VM launches")
        {
            assert!(
                vm.is_running() && start.elapsed() < BOOT_LIMIT,
                "run never reached its last checkpoint: {}",
                vm.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let killed = Command::new("kill")
            .args([&format!("-{signal}"), &vm.pid().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let status = vm.wait_exit(Duration::from_secs(20));
        // The stderr reader may still be draining the pipe.
        let drained = std::time::Instant::now();
        while !vm.stderr().contains("error:") && drained.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let stderr = vm.stderr();
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.starts_with("test hook:"))
            .collect();
        assert_eq!(
            lines,
            [format!(
                "error: stopped by SIG{signal} before the VM started"
            )],
            "SIG{signal}: {stderr}"
        );
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(1),
            "SIG{signal}: {stderr}"
        );
        assert!(!socket.exists(), "the API socket was left behind");
        assert!(
            !vm.serial_text().contains("Linux version"),
            "the guest ran: {}",
            vm.diagnostics()
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
