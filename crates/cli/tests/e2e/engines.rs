//! End-to-end: a VM whose vCPU runs translated code (emu's translator, the default engine) is
//! snapshotted while running and live-migrated, and continues on emu's interpreter
//! (`ANYVISOR_EMU_ENGINE=interp` in the restoring / receiving process). Issue 12 item 3. The
//! other legs (translator -> translator, translator -> kvm, kvm -> translator) are in
//! `snapshot.rs` and `migrate.rs`, which run emu with the default engine.
//!
//! One boot of the memory workload (whose hot loops run translated) serves both.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::migrate_support;
use crate::persist_harness;

use std::path::Path;

use migrate_support::*;
use persist_harness::*;

const JIT: &[(&str, &str)] = &[("ANYVISOR_EMU_ENGINE", "jit")];
const INTERP: &[(&str, &str)] = &[("ANYVISOR_EMU_ENGINE", "interp")];

fn restore_args(file: &Path) -> Vec<String> {
    [
        "run",
        "--restore",
        file.to_str().unwrap(),
        "--backend",
        "emu",
    ]
    .map(String::from)
    .to_vec()
}

#[test]
#[cfg_attr(
    not(boot_emu),
    ignore = "needs the guest kit and cargo test --release (or ANYVISOR_TEST_EMU=1); crates/cli/build.rs"
)]
fn translated_vm_continues_on_the_interpreter() {
    assert!(backend_ready("emu"));
    let kit = kit().expect("guest kit");
    let _one = serial_guard();
    let dir = scratch("engines-e2e");

    let boot = std::time::Instant::now();
    let mut src = Vm::spawn_with_env(
        &with_memory(boot_args(&kit, "emu")),
        JIT,
        &dir.join("src.serial"),
        &dir.join("src.sock"),
    );
    src.wait_serial(BOOT_LIMIT, at_least_ok(3)).unwrap();
    println!("jit source: 3 reports after {:?}", boot.elapsed());

    // A snapshot of the running VM (it keeps running), restored on the interpreter.
    let snap = dir.join("running.snap");
    let before = last_report(&src.serial_text());
    let out = src.control("snapshot", &["--output", snap.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut restored = Vm::spawn_with_env(
        &restore_args(&snap),
        INTERP,
        &dir.join("restored.serial"),
        &dir.join("restored.sock"),
    );
    restored
        .wait_serial(RESUME_LIMIT, at_least_ok(2))
        .unwrap_or_else(|e| panic!("restored on interp: {e}"));
    assert_memwork_continues(&restored.serial_text(), before);
    assert_kernel_healthy("restored on interp", &restored.serial_text());
    assert!(
        !restored.stderr().contains("error:"),
        "{}",
        restored.diagnostics()
    );
    println!("snapshot of the jit VM: continues on interp");
    drop(restored);
    let _ = std::fs::remove_file(&snap);

    // The source, still translating, live-migrated to an interpreting destination.
    let to = format!("unix:{}", dir.join("mig.sock").display());
    let mut dst = Vm::spawn_with_env(
        &incoming_args(&to, None, "emu"),
        INTERP,
        &dir.join("dst.serial"),
        &dir.join("dst.sock"),
    );
    wait_listening(&mut dst);
    let out = migrate(&src, &to, None);
    let line = assert_migrated(&mut src, &mut dst, &out, "emu jit -> emu interp", "emu");
    assert_kernel_healthy("migrated to interp", &dst.serial_text());
    println!("emu jit -> emu interp: {line}");
    drop((src, dst));
    let _ = std::fs::remove_dir_all(dir);
}
