//! End-to-end snapshots with the real binary and the guest kit's memory workload: snapshot a
//! running and a paused VM, restore on the same and the other backend, check the workload
//! continues without corruption, check snapshot -> restore -> snapshot gives the same VM, and
//! refuse damaged files with exit status 2 and one `error:` line.
//!
//! One Linux boot (emu) serves every check; restores are cheap.

mod persist_harness;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use persist_harness::*;
use vm_memory::{Bytes, GuestAddress};

#[test]
fn harness_can_fail() {
    check_harness_can_fail();
    check_disk_helpers_can_fail();
}

/// The state a snapshot holds, with what legitimately differs between two snapshots of the
/// same paused VM (the TSC counts host time, the creation time) taken out.
fn comparable(c: &snapshot::SnapshotContents) -> (Vec<hv::CpuState>, Vec<(String, String)>) {
    let vcpus = c
        .vcpus
        .iter()
        .map(|s| {
            let mut s = s.clone();
            s.msrs.retain(|m| m.index != hv::msr::IA32_TSC);
            s
        })
        .collect();
    let devices = c
        .devices
        .iter()
        .map(|(n, v)| (n.clone(), v.to_string()))
        .collect();
    (vcpus, devices)
}

/// Asserts two snapshot files hold the same VM: header, vCPU and device states, and every
/// byte of guest RAM.
fn assert_same_vm(a: &Path, b: &Path) {
    let ra = snapshot::SnapshotReader::open(a).unwrap();
    let rb = snapshot::SnapshotReader::open(b).unwrap();
    ra.verify_memory().unwrap();
    rb.verify_memory().unwrap();
    let (ha, hb) = (ra.header(), rb.header());
    assert_eq!(ha.cpu_model, hb.cpu_model);
    assert_eq!(ha.memory_regions, hb.memory_regions);
    assert_eq!(ha.vcpus, hb.vcpus);
    assert_eq!(ha.tsc_khz, hb.tsc_khz);
    let (va, da) = comparable(ra.contents());
    let (vb, db) = comparable(rb.contents());
    assert_eq!(da, db, "device states differ");
    assert_eq!(va, vb, "vcpu states differ");
    // The kvm-clock structures the guest registered are the hypervisor's to write: every
    // backend refreshes them when it sets the clock, so they legitimately differ.
    let pv_pages: Vec<u64> = ra
        .contents()
        .vcpus
        .iter()
        .flat_map(|s| [hv::msr::KVM_SYSTEM_TIME_NEW, hv::msr::KVM_WALL_CLOCK_NEW].map(|m| s.msr(m)))
        .flatten()
        .map(|v| v & !0xfff)
        .collect();
    let ma = ra.map_memory().unwrap();
    let mb = rb.map_memory().unwrap();
    let mut pa = vec![0u8; 1 << 20];
    let mut pb = vec![0u8; 1 << 20];
    for r in &ha.memory_regions {
        let mut off = 0;
        while off < r.len {
            let n = (r.len - off).min(pa.len() as u64) as usize;
            let addr = GuestAddress(r.guest_addr + off);
            ma.read_slice(&mut pa[..n], addr).unwrap();
            mb.read_slice(&mut pb[..n], addr).unwrap();
            let differing = pa[..n]
                .chunks(4096)
                .zip(pb[..n].chunks(4096))
                .enumerate()
                .filter(|(_, (x, y))| x != y)
                .map(|(i, _)| r.guest_addr + off + i as u64 * 4096)
                .find(|page| !pv_pages.contains(page));
            if let Some(page) = differing {
                panic!("guest RAM differs at {page:#x} (kvm-clock pages: {pv_pages:x?})");
            }
            off += n as u64;
        }
    }
}

fn ok(out: &std::process::Output) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn snapshot_cmd(vm: &Vm, file: &Path, stop: bool) -> std::process::Output {
    let mut extra = vec!["--output", file.to_str().unwrap()];
    if stop {
        extra.push("--stop");
    }
    vm.control("snapshot", &extra)
}

fn restore_args(file: &Path, backend: &str) -> Vec<String> {
    [
        "run",
        "--restore",
        file.to_str().unwrap(),
        "--backend",
        backend,
    ]
    .map(String::from)
    .to_vec()
}

/// `run --restore FILE` and `snapshot-info FILE` on a damaged file: status 2, one `error:` line.
fn assert_refused(file: &Path, what: &str) {
    let restore = Command::new(BIN)
        .args(restore_args(file, "emu"))
        .args(["--serial", "null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let info = Command::new(BIN)
        .args(["snapshot-info", file.to_str().unwrap()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    for (cmd, out) in [("restore", &restore), ("snapshot-info", &info)] {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what} {cmd}: {stderr}");
        assert_eq!(error_lines(out).len(), 1, "{what} {cmd}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{what} {cmd}: {stderr}");
        assert!(!stderr.contains("panicked"), "{what} {cmd}: {stderr}");
    }
}

fn last_seen(vm: &Vm) -> Option<(u64, u64)> {
    last_report(&vm.serial_text())
}

/// Restores `file` on `backend`, waits for two more OK lines continuing from `after`, and
/// returns the running VM.
fn restore_and_check(
    dir: &Path,
    name: &str,
    file: &Path,
    backend: &str,
    after: Option<(u64, u64)>,
) -> Vm {
    let start = std::time::Instant::now();
    let mut vm = Vm::spawn(
        &restore_args(file, backend),
        &dir.join(format!("{name}.serial")),
        &dir.join(format!("{name}.sock")),
    );
    vm.wait_serial(RESUME_LIMIT, at_least_ok(2))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    println!(
        "{name}: restored on {backend}, 2 OK lines after {:?}",
        start.elapsed()
    );
    assert_memwork_continues(&vm.serial_text(), after);
    vm
}

#[test]
fn snapshot_restore_end_to_end() {
    if !emu_fast_enough() {
        return;
    }
    let Some(kit) = kit() else { return };
    let _one = serial_guard();
    let dir = scratch("snapshot-e2e");
    let kvm = kvm_usable();

    // Boot once under emu and let the workload report a few times.
    let boot_start = std::time::Instant::now();
    let mut vm1 = Vm::spawn(
        &boot_args(&kit, "emu"),
        &dir.join("vm1.serial"),
        &dir.join("vm1.sock"),
    );
    vm1.wait_serial(BOOT_LIMIT, at_least_ok(3)).unwrap();
    println!("vm1: 3 OK lines after {:?}", boot_start.elapsed());
    assert_memwork_continues(&vm1.serial_text(), None);

    // A failed snapshot (no such directory) leaves no file and the VM running.
    let missing = dir.join("no-such-dir").join("x.snap");
    let out = snapshot_cmd(&vm1, &missing, false);
    assert_ne!(out.status.code(), Some(0));
    assert_eq!(error_lines(&out).len(), 1, "{out:?}");
    assert!(!missing.exists());
    assert_eq!(
        std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("tmp"))
            .count(),
        0,
        "temporary file left behind"
    );

    // A snapshot of the running VM: it keeps running.
    let running = dir.join("running.snap");
    let t = std::time::Instant::now();
    ok(&snapshot_cmd(&vm1, &running, false));
    println!("snapshot of a running 256M VM took {:?}", t.elapsed());
    let before = memwork_counts(&vm1.serial_text()).len();
    vm1.wait_serial(RESUME_LIMIT, at_least_ok(before + 2))
        .unwrap();
    assert_memwork_continues(&vm1.serial_text(), None);

    // snapshot-info describes it.
    let info = Command::new(BIN)
        .args(["snapshot-info", running.to_str().unwrap()])
        .output()
        .unwrap();
    ok(&info);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["backend"], "emu", "{v}");
    assert_eq!(v["vcpus"], 1, "{v}");
    assert_eq!(v["memory_bytes"], 256u64 << 20, "{v}");
    assert_eq!(v["cpu_model"], "portable-v1", "{v}");

    // Pause, snapshot with --stop: the VM process ends with status 0.
    ok(&vm1.control("pause", &[]));
    let paused_at = last_seen(&vm1);
    let paused = dir.join("paused.snap");
    ok(&snapshot_cmd(&vm1, &paused, true));
    let status = vm1.wait_exit(Duration::from_secs(30));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}",
        vm1.diagnostics()
    );
    assert!(!vm1.stderr().contains("error:"), "{}", vm1.diagnostics());

    // Restore the paused snapshot on emu: it arrives paused; a snapshot of it equals the
    // one it came from. Then it resumes and the workload continues.
    let t = std::time::Instant::now();
    let mut vm2 = Vm::spawn(
        &restore_args(&paused, "emu"),
        &dir.join("vm2.serial"),
        &dir.join("vm2.sock"),
    );
    assert!(
        eventually(Duration::from_secs(60), || vm2.socket.exists()),
        "{}",
        vm2.diagnostics()
    );
    println!("restore to a paused VM took {:?}", t.elapsed());
    let info = vm2.control("info", &[]);
    ok(&info);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["state"], "paused", "{v}");
    let again = dir.join("again.snap");
    ok(&snapshot_cmd(&vm2, &again, false));
    assert_same_vm(&paused, &again);
    ok(&vm2.control("resume", &[]));
    vm2.wait_serial(RESUME_LIMIT, at_least_ok(2)).unwrap();
    assert_memwork_continues(&vm2.serial_text(), paused_at);
    drop(vm2);

    // Damaged files are refused before anything runs.
    let bytes = std::fs::read(&paused).unwrap();
    let bad = dir.join("bad.snap");
    std::fs::write(&bad, b"").unwrap();
    assert_refused(&bad, "empty");
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    assert_refused(&bad, "truncated");
    let mut flipped = bytes[..64 * 1024].to_vec();
    flipped[200] ^= 0x10;
    let mut f = flipped;
    f.extend_from_slice(&bytes[64 * 1024..]);
    std::fs::write(&bad, &f).unwrap();
    assert_refused(&bad, "bit-flipped");
    let mut magic = bytes.clone();
    magic[0] = b'X';
    std::fs::write(&bad, &magic).unwrap();
    assert_refused(&bad, "wrong magic");
    drop((bytes, magic, f));
    assert_refused(&dir.join("missing.snap"), "missing");

    // The running snapshot on the other backend and back: emu -> kvm -> emu.
    if kvm {
        let vm3 = restore_and_check(&dir, "vm3", &running, "kvm", None);
        let from_kvm = dir.join("from-kvm.snap");
        ok(&snapshot_cmd(&vm3, &from_kvm, true));
        let at = last_seen(&vm3);
        drop(vm3);
        let v: serde_json::Value = serde_json::from_slice(
            &Command::new(BIN)
                .args(["snapshot-info", from_kvm.to_str().unwrap()])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        assert_eq!(v["backend"], "kvm", "{v}");
        let vm4 = restore_and_check(&dir, "vm4", &from_kvm, "emu", at);
        drop(vm4);
    } else {
        let vm3 = restore_and_check(&dir, "vm3", &running, "emu", None);
        drop(vm3);
    }
    let _ = std::fs::remove_dir_all(dir);
}
