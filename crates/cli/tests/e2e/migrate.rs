//! End-to-end live migration with the real binary and the guest kit's memory workload (always
//! dirtying memory) in a 512 MiB guest:
//! * one boot migrated along a chain that covers every pair of backends (emu, and kvm when
//!   /dev/kvm is there) over `unix:` and over `tcp:` on loopback with a key, with a refused
//!   wrong-key attempt on the way (the source keeps running);
//! * between two network namespaces joined by a veth pair ("two hosts") with a raw disk
//!   attached on both sides: a destination that cannot reach the disk refuses before the
//!   source pauses; the blocks written before and after are on the disk.
//!
//! Faults: `migrate_faults.rs`.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::migrate_support;
use crate::persist_harness;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use migrate_support::*;
use persist_harness::*;

#[test]
fn harness_can_fail() {
    check_harness_can_fail();
    check_disk_helpers_can_fail();
    // The namespace guard removes its namespaces when dropped (as on a failing test's unwind).
    if let Some(ns) = Namespaces::create() {
        let names = ns.names.clone();
        assert!(names.iter().all(|n| netns_list().contains(n.as_str())));
        drop(ns);
        let list = netns_list();
        assert!(names.iter().all(|n| !list.contains(n.as_str())), "{list}");
    }
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

fn write_keys(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let key = dir.join("key");
    std::fs::write(&key, "0123456789abcdef-the-right-key\n").unwrap();
    let wrong = dir.join("wrong");
    std::fs::write(&wrong, "0123456789abcdef-another-key\n").unwrap();
    (key, wrong)
}

/// Boots the memwork guest with [`MEMORY`] on emu and waits for three reports.
fn boot_source(args: Vec<String>, dir: &Path) -> Vm {
    let boot = Instant::now();
    let mut src = Vm::spawn(&args, &dir.join("src.serial"), &dir.join("src.sock"));
    src.wait_serial(BOOT_LIMIT, at_least_ok(3)).unwrap();
    println!("source: 3 OK lines after {:?}", boot.elapsed());
    src
}

#[test]
#[cfg_attr(
    not(boot_emu),
    ignore = "needs the guest kit and cargo test --release (or ANYVISOR_TEST_EMU=1); crates/cli/build.rs"
)]
fn live_migration_end_to_end() {
    if !emu_fast_enough() {
        return;
    }
    let Some(kit) = kit() else { return };
    let _one = serial_guard();
    let dir = scratch("migrate-e2e");
    let (key, wrong) = write_keys(&dir);
    let mut vm = boot_source(with_memory(boot_args(&kit, "emu")), &dir);

    // Every (from, to) pair of backends over both transports, in one chain.
    let mut hops = vec![("emu", "unix"), ("emu", "tcp")];
    if kvm_usable() {
        hops.extend([
            ("kvm", "unix"),
            ("kvm", "unix"),
            ("emu", "unix"),
            ("kvm", "tcp"),
            ("kvm", "tcp"),
            ("emu", "tcp"),
        ]);
    }
    let mut from = "emu";
    let mut wrong_key_tried = false;
    for (n, (backend, transport)) in hops.into_iter().enumerate() {
        let (to, key) = match transport {
            "unix" => (
                format!("unix:{}", dir.join(format!("mig{n}.sock")).display()),
                None,
            ),
            _ => (
                format!("tcp:127.0.0.1:{}", free_port()),
                Some(key.as_path()),
            ),
        };
        let mut dst = Vm::spawn(
            &incoming_args(&to, key, backend),
            &dir.join(format!("dst{n}.serial")),
            &dir.join(format!("dst{n}.sock")),
        );
        wait_listening(&mut dst);
        if transport == "tcp" && !wrong_key_tried {
            // The wrong key fails, the VM keeps running, the listener takes the right key.
            wrong_key_tried = true;
            let out = migrate(&vm, &to, Some(&wrong));
            let e = assert_source_survived(&mut vm, &out, "wrong key");
            assert!(e.contains("authentication failed: wrong key"), "{e}");
            println!("wrong key: {e}");
        }
        let what = format!("{from} -> {backend} over {transport}");
        let out = migrate(&vm, &to, key);
        let line = assert_migrated(&mut vm, &mut dst, &out, &what, backend);
        println!("{what}: {line}");
        vm = dst;
        from = backend;
    }
    drop(vm);
    let _ = std::fs::remove_dir_all(dir);
}

/// Two "hosts" with a disk on both sides. The source runs in one network namespace, the
/// destination listens on tcp (with a key) in another, the two joined by a veth pair only;
/// API sockets and the raw disk image are files both see (the destination opens the disk by
/// the path in the description). A destination that cannot reach the disk refuses before the
/// source pauses and waits for the next attempt, which succeeds; the blocks written before and
/// after the migration are all on the disk. Without root or `ip`, the same runs in this
/// namespace over loopback.
#[test]
#[cfg_attr(
    not(boot_emu),
    ignore = "needs the guest kit and cargo test --release (or ANYVISOR_TEST_EMU=1); crates/cli/build.rs"
)]
fn migration_between_two_hosts_with_a_disk() {
    if !emu_fast_enough() {
        return;
    }
    let Some(kit) = kit() else { return };
    let _one = serial_guard();
    let ns = Namespaces::create();
    let dir = scratch("migrate-hosts");
    let (key, _) = write_keys(&dir);
    let disk = dir.join("disk.img");
    disk_image(&disk, 64);
    let (src_prefix, dst_prefix, to) = match &ns {
        Some(ns) => (ns.exec(0), ns.exec(1), format!("tcp:{}:7446", ns.addrs[1])),
        None => (vec![], vec![], format!("tcp:127.0.0.1:{}", free_port())),
    };
    let boot = Instant::now();
    let mut src = Vm::spawn_under(
        &src_prefix,
        &[],
        &with_memory(disk_boot_args(&kit, "emu", &disk)),
        &dir.join("src.serial"),
        &dir.join("src.sock"),
    );
    src.wait_serial(BOOT_LIMIT, at_least_both_ok(3)).unwrap();
    println!(
        "source: 3 MEMWORK and DISKWORK lines after {:?}",
        boot.elapsed()
    );

    let backend = if kvm_usable() { "kvm" } else { "emu" };
    let mut dst = Vm::spawn_under(
        &dst_prefix,
        &[],
        &incoming_args(&to, Some(&key), backend),
        &dir.join("dst.serial"),
        &dir.join("dst.sock"),
    );
    wait_listening(&mut dst);
    let hosts = match &ns {
        Some(ns) => {
            assert!(
                ns.pids(0).contains(&src.pid()),
                "source not in {}",
                ns.names[0]
            );
            assert!(
                ns.pids(1).contains(&dst.pid()),
                "destination not in {}",
                ns.names[1]
            );
            format!("{} -> {}", ns.names[0], ns.names[1])
        }
        None => "one namespace".to_string(),
    };

    // The disk is not where the description says: refused, the same destination waits.
    let away = dir.join("disk.away");
    std::fs::rename(&disk, &away).unwrap();
    let out = migrate(&src, &to, Some(&key));
    std::fs::rename(&away, &disk).unwrap();
    let e = assert_source_survived(&mut src, &out, "disk not reachable");
    assert!(
        e.contains("refused: cannot read") && e.contains(disk.to_str().unwrap()),
        "{e}"
    );
    println!("disk not reachable: {e}");
    let before = diskwork_counts(&src.serial_text()).len();
    src.wait_serial(RESUME_LIMIT, at_least_both_ok(before + 1))
        .unwrap();
    assert_diskwork_continues(&src.serial_text(), None);
    assert!(dst.is_running(), "{}", dst.diagnostics());
    assert!(
        dst.stderr().contains("incoming migration failed"),
        "{}",
        dst.diagnostics()
    );

    let what = format!("emu -> {backend} with a disk, {hosts}, over {to}");
    let out = migrate(&src, &to, Some(&key));
    let line = assert_migrated(&mut src, &mut dst, &out, &what, backend);
    println!("{what}: {line}");
    let at = diskwork_last(&src.serial_text());
    dst.wait_serial(RESUME_LIMIT, at_least_both_ok(2)).unwrap();
    assert_diskwork_continues(&dst.serial_text(), at);

    // Stop the VM and read the image: every block written, before and after, is there.
    let out = dst.control("shutdown", &[]);
    assert_eq!(out.status.code(), Some(0), "{}", dst.diagnostics());
    let status = dst.wait_exit(Duration::from_secs(30));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}",
        dst.diagnostics()
    );
    let count = diskwork_last(&dst.serial_text()).unwrap();
    let at = at.unwrap_or(0);
    assert!(count > at, "{count} <= {at}");
    assert_disk_pattern(&disk, count);
    println!("disk: blocks 0..{count} on the image, {at} of them written before the migration");
    drop((src, dst, ns));
    let _ = std::fs::remove_dir_all(dir);
}
