//! End-to-end live migration with the real binary and the guest kit's memory workload:
//! emu -> emu over a unix socket, a refused attempt with the wrong key (the source keeps
//! running), then over tcp with the right key to the same listener, and to kvm and back when
//! /dev/kvm is there. One Linux boot serves every step.

mod persist_harness;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use persist_harness::*;

fn incoming_args(from: &str, key: Option<&Path>, backend: &str) -> Vec<String> {
    let mut a: Vec<String> = ["run", "--incoming", from, "--backend", backend]
        .map(String::from)
        .to_vec();
    if let Some(k) = key {
        a.extend(["--migration-key".into(), k.display().to_string()]);
    }
    a
}

fn migrate(src: &Vm, to: &str, key: Option<&Path>) -> std::process::Output {
    let mut extra = vec!["--to", to];
    if let Some(k) = key {
        extra.extend(["--migration-key", k.to_str().unwrap()]);
    }
    src.control("migrate", &extra)
}

/// A successful migration: status 0, one JSON line with the statistics, the source exits 0,
/// the destination's workload continues from where the source was.
fn assert_migrated(src: &mut Vm, dst: &mut Vm, out: &std::process::Output, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{what}: {stderr}\nsource: {}\ndestination: {}",
        src.diagnostics(),
        dst.diagnostics()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(line).expect("no JSON line");
    for k in ["total_ms", "downtime_ms", "bytes"] {
        assert!(v[k].is_u64(), "{what}: {k} missing in {line}");
    }
    println!("{what}: {line}");
    let status = src.wait_exit(Duration::from_secs(30));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}",
        src.diagnostics()
    );
    assert!(!src.stderr().contains("error:"), "{}", src.diagnostics());
    let at = last_report(&src.serial_text());
    dst.wait_serial(RESUME_LIMIT, at_least_ok(2))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_memwork_continues(&dst.serial_text(), at);
}

#[test]
fn harness_can_fail() {
    check_harness_can_fail();
}

/// `--incoming tcp:` without a key is bad usage; so is a bad address.
#[test]
fn incoming_tcp_needs_a_key() {
    for (addr, what) in [
        ("tcp:127.0.0.1:1", "requires --migration-key"),
        ("udp:x", "invalid migration address"),
    ] {
        let out = Command::new(BIN)
            .args([
                "run",
                "--incoming",
                addr,
                "--backend",
                "emu",
                "--serial",
                "null",
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert_eq!(error_lines(&out).len(), 1, "{stderr}");
        assert!(stderr.contains(what), "{stderr}");
    }
}

#[test]
fn live_migration_end_to_end() {
    if !emu_fast_enough() {
        return;
    }
    let Some(kit) = kit() else { return };
    let _one = serial_guard();
    let dir = scratch("migrate-e2e");
    let key = dir.join("key");
    std::fs::write(&key, "0123456789abcdef-the-right-key\n").unwrap();
    let wrong = dir.join("wrong");
    std::fs::write(&wrong, "0123456789abcdef-another-key\n").unwrap();

    let boot = Instant::now();
    let mut src = Vm::spawn(
        &boot_args(&kit, "emu"),
        &dir.join("src.serial"),
        &dir.join("src.sock"),
    );
    src.wait_serial(BOOT_LIMIT, at_least_ok(3)).unwrap();
    println!("source: 3 OK lines after {:?}", boot.elapsed());

    // emu -> emu over a unix socket.
    let path = dir.join("mig.sock");
    let to = format!("unix:{}", path.display());
    let mut dst = Vm::spawn(
        &incoming_args(&to, None, "emu"),
        &dir.join("dst.serial"),
        &dir.join("dst.sock"),
    );
    assert!(
        eventually(Duration::from_secs(30), || path.exists()),
        "{}",
        dst.diagnostics()
    );
    let out = migrate(&src, &to, None);
    assert_migrated(&mut src, &mut dst, &out, "emu -> emu over unix");
    drop(src);

    // Over tcp: the listener has `key`; the wrong key fails and the VM keeps running.
    let port = free_port();
    let to = format!("tcp:127.0.0.1:{port}");
    let mut dst2 = Vm::spawn(
        &incoming_args(&to, Some(&key), "emu"),
        &dir.join("dst2.serial"),
        &dir.join("dst2.sock"),
    );
    assert!(
        eventually(Duration::from_secs(30), || dst2
            .stderr()
            .contains("waiting for a migration")),
        "{}",
        dst2.diagnostics()
    );
    let out = migrate(&dst, &to, Some(&wrong));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "wrong key accepted: {stderr}");
    assert_eq!(error_lines(&out).len(), 1, "{stderr}");
    println!("wrong key: {}", stderr.trim());
    assert!(dst.is_running(), "{}", dst.diagnostics());
    let before = memwork_counts(&dst.serial_text()).len();
    dst.wait_serial(RESUME_LIMIT, at_least_ok(before + 2))
        .unwrap();
    assert_memwork_continues(&dst.serial_text(), None);
    let v: serde_json::Value = serde_json::from_slice(&dst.control("info", &[]).stdout).unwrap();
    assert_eq!(v["state"], "running", "{v}");

    // The same listener then takes the right key.
    let out = migrate(&dst, &to, Some(&key));
    assert_migrated(&mut dst, &mut dst2, &out, "emu -> emu over tcp");
    drop(dst);

    // To kvm and back, when there is KVM.
    if kvm_usable() {
        let path = dir.join("mig3.sock");
        let to = format!("unix:{}", path.display());
        let mut dst3 = Vm::spawn(
            &incoming_args(&to, None, "kvm"),
            &dir.join("dst3.serial"),
            &dir.join("dst3.sock"),
        );
        assert!(eventually(Duration::from_secs(30), || path.exists()));
        let out = migrate(&dst2, &to, None);
        assert_migrated(&mut dst2, &mut dst3, &out, "emu -> kvm");
        drop(dst2);
        let path = dir.join("mig4.sock");
        let to = format!("unix:{}", path.display());
        let mut dst4 = Vm::spawn(
            &incoming_args(&to, None, "emu"),
            &dir.join("dst4.serial"),
            &dir.join("dst4.sock"),
        );
        assert!(eventually(Duration::from_secs(30), || path.exists()));
        let out = migrate(&dst3, &to, None);
        assert_migrated(&mut dst3, &mut dst4, &out, "kvm -> emu");
    }
    let _ = std::fs::remove_dir_all(dir);
}
