//! End-to-end snapshots with the real binary and the guest kit's memory workload: snapshot a
//! running and a paused VM, restore on the same and the other backend, check the workload
//! continues without corruption, check snapshot -> restore -> snapshot gives the same VM, and
//! refuse damaged files with exit status 2 and one `error:` line.
//!
//! One Linux boot (emu) serves every check; restores are cheap.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::persist_harness;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use persist_harness::*;
use vm_memory::{Bytes, GuestAddress};

#[test]
fn harness_can_fail() {
    check_harness_can_fail();
    check_disk_helpers_can_fail();
    check_kernel_trouble_can_fail();
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

/// Where a VM's workloads were: the last MEMWORK OK report and the last DISKWORK count.
#[derive(Clone, Copy, Debug)]
struct Progress {
    mem: Option<(u64, u64)>,
    disk: Option<u64>,
}

fn progress(vm: &Vm) -> Progress {
    let s = vm.serial_text();
    Progress {
        mem: last_report(&s),
        disk: diskwork_last(&s),
    }
}

/// Both workloads are healthy and, with `after`, continue from it (no corruption, guest time
/// continuous), and the guest kernel reports no lockup or stall.
fn assert_continues(vm: &Vm, name: &str, after: Option<Progress>) {
    let s = vm.serial_text();
    assert_memwork_continues(&s, after.and_then(|p| p.mem));
    assert_diskwork_continues(&s, after.and_then(|p| p.disk));
    assert_kernel_healthy(name, &s);
}

/// Waits until both workloads reported `n` more times than `vm` shows now.
fn wait_more(vm: &mut Vm, n: usize) {
    let s = vm.serial_text();
    let (m, d) = (memwork_counts(&s).len(), diskwork_counts(&s).len());
    vm.wait_serial(RESUME_LIMIT, move |s| {
        (memwork_counts(s).len() >= m + n && diskwork_counts(s).len() >= d + n)
            || memwork_corrupt(s)
            || diskwork_failed(s)
    })
    .unwrap();
}

/// Restores `file` on `backend`, waits for two reports of both workloads continuing from
/// `after`, and returns the running VM.
fn restore_and_check(
    dir: &Path,
    name: &str,
    file: &Path,
    backend: &str,
    after: Option<Progress>,
) -> Vm {
    let start = std::time::Instant::now();
    let mut vm = Vm::spawn(
        &restore_args(file, backend),
        &dir.join(format!("{name}.serial")),
        &dir.join(format!("{name}.sock")),
    );
    vm.wait_serial(RESUME_LIMIT, at_least_both_ok(2))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    println!(
        "{name}: restored on {backend}, 2 reports of both workloads after {:?}",
        start.elapsed()
    );
    assert_continues(&vm, name, after);
    vm
}

/// `snapshot --stop` of a running VM: the process ends with status 0; returns where it was.
fn snapshot_and_stop(mut vm: Vm, file: &Path) -> Progress {
    ok(&snapshot_cmd(&vm, file, true));
    let status = vm.wait_exit(Duration::from_secs(30));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}",
        vm.diagnostics()
    );
    assert!(!vm.stderr().contains("error:"), "{}", vm.diagnostics());
    progress(&vm)
}

/// `--verify` reads the RAM image: a flipped bit in a stored guest page passes a plain open
/// (pages load lazily) but `snapshot-info --verify` and `run --restore --verify` refuse it with
/// status 2 and one line naming the 2 MiB chunk.
fn check_memory_verification(good: &Path, bad: &Path) {
    let v = snapshot_info_args(good, &["--verify"]);
    assert_eq!(v["memory_verified"], true, "{v}");
    assert_eq!(v["memory_checksums"], "per 2 MiB chunk", "{v}");
    let mut bytes = std::fs::read(good).unwrap();
    let image = (v["file_bytes"].as_u64().unwrap() - v["memory_bytes"].as_u64().unwrap()) as usize;
    let page = (image..bytes.len())
        .step_by(4096)
        .find(|&p| bytes[p..p + 4096].iter().any(|&b| b != 0))
        .expect("a stored guest page");
    bytes[page + 100] ^= 0x01;
    std::fs::write(bad, &bytes).unwrap();
    snapshot_info(bad);
    let chunk = (page - image) / (2 << 20);
    let info_args: Vec<String> = ["snapshot-info", "--verify", bad.to_str().unwrap()]
        .map(String::from)
        .to_vec();
    let mut run_args = restore_args(bad, "emu");
    run_args.extend(["--verify", "--serial", "null"].map(String::from));
    for args in [info_args, run_args] {
        let out = Command::new(BIN)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("memory image chunk {chunk} ")),
            "{args:?}: {stderr}"
        );
    }
    let _ = std::fs::remove_file(bad);
}

fn snapshot_info_args(file: &Path, extra: &[&str]) -> serde_json::Value {
    let out = Command::new(BIN)
        .arg("snapshot-info")
        .args(extra)
        .arg(file)
        .output()
        .unwrap();
    ok(&out);
    serde_json::from_slice(&out.stdout).unwrap()
}

fn snapshot_info(file: &Path) -> serde_json::Value {
    let out = Command::new(BIN)
        .args(["snapshot-info", file.to_str().unwrap()])
        .output()
        .unwrap();
    ok(&out);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Kills `vm` and checks the disk holds every block the guest reported written.
fn kill_and_check_disk(vm: Vm, disk: &Path) {
    let count = diskwork_last(&vm.serial_text()).expect("no DISKWORK count");
    drop(vm);
    assert_disk_pattern(disk, count);
    println!("disk holds the pattern of all {count} reported blocks");
}

/// A copy of snapshot `from` at `to` whose CPU model `edit` changed (checksums recomputed).
fn with_cpu_model(from: &Path, to: &Path, edit: impl FnOnce(&mut hv::CpuModel)) {
    let r = snapshot::SnapshotReader::open(from).unwrap();
    let memory = r.map_memory().unwrap();
    let mut contents = r.contents().clone();
    edit(&mut contents.header.cpu_model);
    snapshot::SnapshotWriter::write(to, &contents, &memory).unwrap();
}

fn leaf(model: &mut hv::CpuModel, function: u32) -> &mut hv::CpuidEntry {
    model
        .cpuid
        .iter_mut()
        .find(|e| e.function == function && e.index == 0)
        .unwrap()
}

/// Runs `anyvisor ARGS --serial null` with `env` and expects it to be refused: it must end by
/// itself (within a minute) with status 2 and exactly one line, an `error:` line containing
/// `reason`.
fn assert_refused_with(args: &[String], env: &[(&str, &str)], reason: &str) {
    let mut child = Command::new(BIN)
        .args(args)
        .args(["--serial", "null"])
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ended = eventually(Duration::from_secs(60), || {
        child.try_wait().ok().flatten().is_some()
    });
    if !ended {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        ended,
        "{args:?} ran instead of being refused ({reason}): {stderr}"
    );
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains(reason),
        "{args:?}: expected '{reason}' in: {stderr}"
    );
}

#[test]
#[cfg_attr(
    not(boot_emu),
    ignore = "needs the guest kit and cargo test --release (or ANYVISOR_TEST_EMU=1); crates/cli/build.rs"
)]
fn snapshot_restore_end_to_end() {
    if !emu_fast_enough() {
        return;
    }
    let Some(kit) = kit() else { return };
    let _one = serial_guard();
    let dir = scratch("snapshot-e2e");
    let kvm = kvm_usable();
    let disk = dir.join("disk.img");
    disk_image(&disk, 16);

    // Boot once under emu with the memory and disk workloads and let them report a few times.
    let boot_start = std::time::Instant::now();
    let mut vm1 = Vm::spawn(
        &disk_boot_args(&kit, "emu", &disk),
        &dir.join("vm1.serial"),
        &dir.join("vm1.sock"),
    );
    vm1.wait_serial(BOOT_LIMIT, at_least_both_ok(3)).unwrap();
    println!(
        "vm1: 3 reports of both workloads after {:?}",
        boot_start.elapsed()
    );
    assert_continues(&vm1, "vm1", None);

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

    // A snapshot of the running VM: it keeps running. What the workloads reported before it
    // is a lower bound of what the snapshot holds.
    let running = dir.join("running.snap");
    let before_running = progress(&vm1);
    let t = std::time::Instant::now();
    ok(&snapshot_cmd(&vm1, &running, false));
    let running_taken = std::time::Instant::now();
    println!("snapshot of a running 256M VM took {:?}", t.elapsed());
    wait_more(&mut vm1, 2);
    assert_continues(&vm1, "vm1", None);

    // snapshot-info describes it.
    let v = snapshot_info(&running);
    assert_eq!(v["backend"], "emu", "{v}");
    assert_eq!(v["vcpus"], 1, "{v}");
    assert_eq!(v["memory_bytes"], 256u64 << 20, "{v}");
    assert_eq!(v["cpu_model"], "portable-v3", "{v}");

    // Pause, snapshot with --stop: the VM process ends with status 0, and the disk holds every
    // block the guest reported.
    ok(&vm1.control("pause", &[]));
    let paused = dir.join("paused.snap");
    let paused_at = snapshot_and_stop(vm1, &paused);
    assert_disk_pattern(&disk, paused_at.disk.unwrap());

    // Restore the paused snapshot on emu: it arrives paused; a snapshot of it equals the
    // one it came from. Then it resumes and both workloads continue: the blocks written before
    // the snapshot read back intact.
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
    vm2.wait_serial(RESUME_LIMIT, at_least_both_ok(2)).unwrap();
    assert_continues(&vm2, "vm2", Some(paused_at));
    kill_and_check_disk(vm2, &disk);

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
    check_memory_verification(&paused, &bad);

    // A model no backend here can present (AVX-512F) is refused before anything runs, on each.
    let avx = dir.join("avx.snap");
    with_cpu_model(&paused, &avx, |m| {
        leaf(m, 7).ebx |= 1 << 16;
    });
    let backends: &[&str] = if kvm { &["emu", "kvm"] } else { &["emu"] };
    for backend in backends {
        assert_refused_with(
            &restore_args(&avx, backend),
            &[],
            "cannot run this VM (CPU model portable-v3) here: backend ",
        );
    }
    let _ = std::fs::remove_file(&avx);

    // The running snapshot, taken a while ago: on kvm, then kvm -> kvm, then kvm -> emu; or on
    // emu again without KVM. Guest time continues from the snapshot, not from the host's clock:
    // with more than the soft-lockup threshold (20 s) and MEMWORK's allowance (10 s) between
    // taking and restoring, a guest clock that followed the host would show.
    let gap = Duration::from_secs(25);
    std::thread::sleep(gap.saturating_sub(running_taken.elapsed()));
    println!(
        "restoring the running snapshot {:?} after it was taken",
        running_taken.elapsed()
    );
    let last = if kvm {
        let vm3 = restore_and_check(&dir, "vm3", &running, "kvm", Some(before_running));
        let from_kvm = dir.join("from-kvm.snap");
        let at = snapshot_and_stop(vm3, &from_kvm);
        assert_eq!(snapshot_info(&from_kvm)["backend"], "kvm");
        let vm4 = restore_and_check(&dir, "vm4", &from_kvm, "kvm", Some(at));
        let from_kvm2 = dir.join("from-kvm2.snap");
        let at = snapshot_and_stop(vm4, &from_kvm2);
        restore_and_check(&dir, "vm5", &from_kvm2, "emu", Some(at))
    } else {
        println!("NOTE: no /dev/kvm: emu -> kvm, kvm -> kvm, kvm -> emu not tested");
        restore_and_check(&dir, "vm3", &running, "emu", Some(before_running))
    };
    kill_and_check_disk(last, &disk);
    let _ = std::fs::remove_dir_all(dir);
}

/// A VM under `--cpu-model host` (plain KVM; no Linux boot needed): its snapshot restores on
/// the same host's KVM and is refused, with one `error:` line naming the reason and before
/// anything runs, on emu, on a PVM host without plain KVM, and where KVM lacks a feature of
/// the model or offers another CPU.
#[test]
#[cfg_attr(
    not(boot_kvm),
    ignore = "needs a usable /dev/kvm and the guest kit (on KVM-PVM hosts also cargo test --release); crates/cli/build.rs"
)]
fn host_model_snapshot_restores_only_on_identical_kvm() {
    let Some(kit) = kit() else { return };
    if !kvm_usable() {
        return;
    }
    let _one = serial_guard();
    let dir = scratch("snapshot-host");
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    let plain = [("ANYVISOR_PLAIN_KVM", "1")];
    let mut args = boot_args(&kit, "kvm");
    args.extend(["--cpu-model".into(), "host".into()]);
    if pvm {
        assert_refused_with(&args, &[], "--cpu-model host needs plain KVM");
    }

    let mut vm = Vm::spawn_with_env(&args, &plain, &dir.join("h.serial"), &dir.join("h.sock"));
    assert!(
        eventually(Duration::from_secs(60), || vm.socket.exists()),
        "{}",
        vm.diagnostics()
    );
    let snap = dir.join("host.snap");
    ok(&snapshot_cmd(&vm, &snap, true));
    assert_eq!(
        vm.wait_exit(Duration::from_secs(30)).and_then(|s| s.code()),
        Some(0),
        "{}",
        vm.diagnostics()
    );
    let v = snapshot_info(&snap);
    let model = v["cpu_model"].as_str().unwrap().to_string();
    assert!(model.starts_with("host:kvm:"), "{v}");
    assert_eq!(v["backend"], "kvm", "{v}");

    let refused = |file: &Path, backend: &str, env: &[(&str, &str)], reason: &str| {
        assert_refused_with(
            &restore_args(file, backend),
            env,
            &format!("cannot run this VM (CPU model {reason}"),
        );
    };
    refused(
        &snap,
        "emu",
        &plain,
        &format!("{model}) here: --cpu-model host needs the kvm backend"),
    );
    if pvm {
        refused(
            &snap,
            "kvm",
            &[],
            &format!("{model}) here: --cpu-model host needs plain KVM"),
        );
    }
    // KVM lacking a feature the model has: CPUID.1:EDX bit 10 is reserved, no CPU has it.
    let lacking = dir.join("lacking.snap");
    with_cpu_model(&snap, &lacking, |m| leaf(m, 1).edx |= 1 << 10);
    refused(
        &lacking,
        "kvm",
        &plain,
        &format!(
            "{model}) here: backend kvm: CPU model {model} needs CPUID.0x1.0:edx bit 10 which \
             KVM on this host cannot provide"
        ),
    );
    // Another host's CPU (another brand string).
    let other = dir.join("other.snap");
    with_cpu_model(&snap, &other, |m| {
        leaf(m, 0x8000_0002).eax ^= 1;
        m.name = "host:kvm:0000000000000000".into();
    });
    refused(
        &other,
        "kvm",
        &plain,
        "host:kvm:0000000000000000) here: this host's KVM offers CPU model host:kvm:",
    );

    // The same host's plain KVM: kvm -> kvm restores and runs the VM under its model.
    let mut vm2 = Vm::spawn_with_env(
        &restore_args(&snap, "kvm"),
        &plain,
        &dir.join("h2.serial"),
        &dir.join("h2.sock"),
    );
    assert!(
        eventually(Duration::from_secs(60), || vm2.socket.exists()),
        "{}",
        vm2.diagnostics()
    );
    let info = vm2.control("info", &[]);
    ok(&info);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["cpu_model"], model.as_str(), "{v}");
    std::thread::sleep(Duration::from_secs(1));
    assert!(vm2.is_running(), "{}", vm2.diagnostics());
    drop(vm2);
    let _ = std::fs::remove_dir_all(dir);
}
