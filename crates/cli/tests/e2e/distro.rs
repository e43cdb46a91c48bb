//! End-to-end tests with a real distribution: the Debian 12 disk image that
//! `guest/build-distro.sh` makes (GPT, ext4, Debian's cloud kernel and its initramfs-tools
//! initrd, python3, gcc, openssl, xz; see guest/README.md). The guest boots the way its
//! `/boot/grub/grub.cfg` says (`root=UUID=... ro console=ttyS0`, Debian's initrd finds and mounts
//! the root file system), then `init=/usr/local/bin/anyvisor-distro-init` runs the workload
//! `anyvisor.distro=once|loop`: python3, openssl speed, openssl enc/dec, gcc building and
//! running a C program, xz -9 and sha256sum, each printing `DISTRO <step> <iteration> <sha256>`,
//! compared with the values the build computed on this host (`guest/out/debian-expected.txt`).
//!
//! The disk is a qcow2 overlay on the shared image (written by nobody). Every run fails, never
//! skips, when the image is missing (scripts/setup.sh builds it); without /dev/kvm the kvm tests
//! print `SKIP: no /dev/kvm` like the other end-to-end tests.
//!
//! * [`distro_boots_and_runs_on_emu`]: boot on emu, every step once, power off.
//! * [`distro_runs_on_kvm_and_moves_to_emu_by_snapshot`]: boot on kvm with the workload in a
//!   loop, one full iteration, `snapshot --stop`, restore on emu, one more full iteration there.
//! * [`distro_moves_kvm_emu_kvm_by_snapshot_and_migration`] (`#[ignore]`, long): kvm boot ->
//!   snapshot -> emu -> live migration -> kvm -> live migration -> emu -> snapshot -> kvm, a
//!   full iteration after every move. Run it with
//!   `cargo test --release -p cli --test e2e distro:: -- --ignored --nocapture`.
//!
//! After every move the workload must go on producing the host's checksums, and the serial
//! log must show no `traps:`, `invalid opcode`, `Kernel panic`, `segfault`, failed step or
//! kernel trouble (lockups, stalls, call traces).

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::migrate_support;
use crate::persist_harness;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use migrate_support::{incoming_args, migrate, wait_listening};
use persist_harness::*;

/// Guest RAM: `xz -9` alone needs ~674 MiB.
const MEMORY: &str = "1G";
/// Boot to the workload's first line. The kernel runs in emu on both backends here (the hybrid
/// kvm backend runs only user mode natively), and the host is shared: generous.
const DISTRO_BOOT_LIMIT: Duration = Duration::from_secs(1800);
/// One full iteration of every step (a fresh page cache after a boot makes the first slow).
const ITERATION_LIMIT: Duration = Duration::from_secs(2700);
/// Serial-log signs of a guest that went wrong: an unhandled fault in user mode (the kernel's
/// `traps:` line names the instruction class, e.g. `invalid opcode`), a segfault, a panic.
const BAD_SIGNS: [&str; 4] = ["traps:", "invalid opcode", "Kernel panic", "segfault"];

/// The built image and what the host knows about it.
struct Distro {
    image: PathBuf,
    vmlinuz: PathBuf,
    initrd: PathBuf,
    /// The kernel parameters of the image's grub.cfg default entry.
    grub_cmdline: String,
    /// `step -> sha256` computed on the host.
    expected: BTreeMap<String, String>,
}

fn out_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/out")
}

/// The image, or a failed test saying how to build it.
fn distro() -> Distro {
    let out = out_dir();
    let d = Distro {
        image: out.join("debian.img"),
        vmlinuz: out.join("debian-vmlinuz"),
        initrd: out.join("debian-initrd.img"),
        grub_cmdline: String::new(),
        expected: BTreeMap::new(),
    };
    let grub = out.join("debian-grub.cfg");
    let expected = out.join("debian-expected.txt");
    for f in [&d.image, &d.vmlinuz, &d.initrd, &grub, &expected] {
        assert!(
            f.is_file(),
            "{} is missing: the Debian distro image is not built; run scripts/setup.sh \
             (or guest/build-distro.sh as root)",
            f.display()
        );
    }
    let grub = std::fs::read_to_string(grub).unwrap();
    let (grub_cmdline, _, _) = parse_grub(&grub).unwrap_or_else(|e| panic!("grub.cfg: {e}"));
    let expected = parse_expected(&std::fs::read_to_string(expected).unwrap());
    assert!(!expected.is_empty(), "debian-expected.txt lists no step");
    Distro {
        grub_cmdline,
        expected,
        ..d
    }
}

/// The default (first) menu entry of a grub.cfg: (kernel parameters, kernel path, initrd path).
fn parse_grub(cfg: &str) -> Result<(String, String, String), String> {
    let entry = cfg
        .split("menuentry ")
        .nth(1)
        .ok_or("no menuentry")?
        .split("\n}")
        .next()
        .unwrap_or_default();
    if !entry.starts_with("'Debian GNU/Linux'") {
        return Err(format!(
            "the first entry is not 'Debian GNU/Linux': {entry}"
        ));
    }
    let line = |word: &str| {
        entry
            .lines()
            .map(str::trim)
            .find_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some(word)).then(|| f.map(str::to_string).collect::<Vec<_>>())
            })
            .ok_or(format!("no `{word}` line"))
    };
    let linux = line("linux")?;
    let initrd = line("initrd")?;
    let (kernel, params) = linux.split_first().ok_or("an empty linux line")?;
    let params = params.join(" ");
    if !params
        .split_whitespace()
        .any(|p| p.starts_with("root=UUID="))
    {
        return Err(format!("no root=UUID= in `{params}`"));
    }
    Ok((params, kernel.clone(), initrd.join(" ")))
}

/// `<step> <sha256>` lines (`#` comments).
fn parse_expected(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.to_string(), f.next()?.to_string()))
        })
        .collect()
}

/// One `DISTRO <step> <iteration> <value>` line.
#[derive(Debug, PartialEq)]
struct StepLine {
    step: String,
    iteration: u64,
    value: String,
}

/// The text from `tag` on, for lines the kernel's console output may have prefixed.
fn tagged<'a>(line: &'a str, tag: &str) -> Option<&'a str> {
    line.find(tag).map(|i| &line[i + tag.len()..])
}

fn step_lines(serial: &str) -> Vec<StepLine> {
    serial
        .lines()
        .filter_map(|l| {
            let mut f = tagged(l, "DISTRO ")?.split_whitespace();
            Some(StepLine {
                step: f.next()?.to_string(),
                iteration: f.next()?.parse().ok()?,
                value: f.next()?.to_string(),
            })
        })
        .collect()
}

/// `(step, iteration, milliseconds)` of the `DISTRO-TIME` lines.
fn step_times(serial: &str) -> Vec<(String, u64, u64)> {
    serial
        .lines()
        .filter_map(|l| {
            let mut f = tagged(l, "DISTRO-TIME ")?.split_whitespace();
            Some((
                f.next()?.to_string(),
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
            ))
        })
        .collect()
}

/// The numbers of the `DISTRO-ITER-<what> <n>` lines.
fn iteration_marks(serial: &str, what: &str) -> Vec<u64> {
    let tag = format!("DISTRO-ITER-{what} ");
    serial
        .lines()
        .filter_map(|l| tagged(l, &tag)?.trim().parse().ok())
        .collect()
}

/// `serial` up to its last newline: the guest may be in the middle of writing the last line
/// (a checksum cut short is not a wrong checksum).
fn complete_lines(serial: &str) -> &str {
    serial.rfind('\n').map_or("", |i| &serial[..=i])
}

/// Everything wrong in the complete lines of `serial`: a step line whose value is not the
/// host's (or a step the host does not know), a bad sign, kernel trouble.
fn problems(serial: &str, expected: &BTreeMap<String, String>) -> Vec<String> {
    let serial = complete_lines(serial);
    let mut bad: Vec<String> = step_lines(serial)
        .iter()
        .filter(|s| expected.get(&s.step) != Some(&s.value))
        .map(|s| {
            format!(
                "step {} (iteration {}): {} (host: {})",
                s.step,
                s.iteration,
                s.value,
                expected.get(&s.step).map_or("unknown step", String::as_str)
            )
        })
        .collect();
    bad.extend(
        serial
            .lines()
            .filter(|l| BAD_SIGNS.iter().any(|s| l.contains(s)))
            .map(|l| format!("serial: {}", l.trim())),
    );
    bad.extend(
        kernel_trouble(serial)
            .into_iter()
            .map(|l| format!("kernel: {}", l.trim())),
    );
    bad
}

/// The first iteration that started and finished in `serial` with a line for every step.
fn complete_iteration(serial: &str, expected: &BTreeMap<String, String>) -> Option<u64> {
    let serial = complete_lines(serial);
    let started = iteration_marks(serial, "START");
    let lines = step_lines(serial);
    iteration_marks(serial, "DONE").into_iter().find(|n| {
        started.contains(n)
            && expected
                .keys()
                .all(|step| lines.iter().any(|l| l.iteration == *n && &l.step == step))
    })
}

/// A predicate for [`Vm::wait_serial`]: a complete iteration, or something wrong already.
fn iteration_or_trouble(expected: &BTreeMap<String, String>) -> impl Fn(&str) -> bool + '_ {
    move |s| complete_iteration(s, expected).is_some() || !problems(s, expected).is_empty()
}

/// Panics unless `serial` holds a complete iteration and nothing wrong; prints the step times.
fn assert_iteration_ok(what: &str, serial: &str, expected: &BTreeMap<String, String>) -> u64 {
    let bad = problems(serial, expected);
    assert!(
        bad.is_empty(),
        "{what}: the distro workload went wrong:\n  {}\n{}",
        bad.join("\n  "),
        tail(serial)
    );
    let n = complete_iteration(serial, expected)
        .unwrap_or_else(|| panic!("{what}: no complete iteration\n{}", tail(serial)));
    let times: Vec<String> = step_times(serial)
        .into_iter()
        .filter(|t| t.1 == n)
        .map(|(s, _, ms)| format!("{s} {:.1}s", ms as f64 / 1000.0))
        .collect();
    println!(
        "{what}: iteration {n} correct, step times: {}",
        times.join(", ")
    );
    n
}

fn tail(serial: &str) -> String {
    let n = serial.chars().count();
    let t: String = serial.chars().skip(n.saturating_sub(4000)).collect();
    format!("serial (tail):\n{t}")
}

/// A qcow2 overlay on the shared image in `dir`: the guest's writes stay in the overlay.
fn overlay(d: &Distro, dir: &Path) -> PathBuf {
    let ov = dir.join("debian.qcow2");
    let image = d.image.canonicalize().unwrap();
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&image)
        .arg(&ov)
        .output()
        .unwrap_or_else(|e| {
            panic!("qemu-img: {e} (scripts/setup.sh installs qemu-utils)");
        });
    assert!(
        out.status.success(),
        "qemu-img create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ov
}

/// `run` arguments booting the image on `backend` with `anyvisor.distro=MODE`.
fn distro_args(d: &Distro, disk: &Path, backend: &str, mode: &str) -> Vec<String> {
    let cmdline = format!(
        "{} panic=-1 reboot=k init=/usr/local/bin/anyvisor-distro-init anyvisor.distro={mode}",
        d.grub_cmdline
    );
    vec![
        "run".into(),
        "--kernel".into(),
        d.vmlinuz.display().to_string(),
        "--initrd".into(),
        d.initrd.display().to_string(),
        "--cmdline".into(),
        cmdline,
        "--memory".into(),
        MEMORY.into(),
        "--backend".into(),
        backend.into(),
        "--disk".into(),
        // An overlay: its backing file is the shared image.
        format!("{},format=qcow2,backing=on", disk.display()),
    ]
}

/// Boots `mode` on `backend` and waits for the workload's first line; prints the boot time.
/// A kvm boot logs at debug level, for [`assert_user_mode_ran_on_kvm`].
fn boot(d: &Distro, dir: &Path, name: &str, backend: &str, mode: &str) -> Vm {
    let disk = overlay(d, dir);
    let start = Instant::now();
    let env: &[(&str, &str)] = if backend == "kvm" {
        &[("ANYVISOR_LOG", "debug")]
    } else {
        &[]
    };
    let mut vm = Vm::spawn_with_env(
        &distro_args(d, &disk, backend, mode),
        env,
        &dir.join(format!("{name}.serial")),
        &dir.join(format!("{name}.sock")),
    );
    vm.wait_serial(DISTRO_BOOT_LIMIT, |s| {
        s.contains("DISTRO-INIT ") || s.contains("Kernel panic")
    })
    .unwrap_or_else(|e| panic!("{name}: booting Debian on {backend}: {e}"));
    let serial = vm.serial_text();
    assert!(
        !serial.contains("Kernel panic"),
        "{name}: {}",
        tail(&serial)
    );
    let init = serial
        .lines()
        .find_map(|l| tagged(l, "DISTRO-INIT "))
        .unwrap_or_default()
        .to_string();
    println!(
        "{name}: Debian on {backend}: workload started after {:.1}s ({init})",
        start.elapsed().as_secs_f64()
    );
    vm
}

/// Waits for a complete, correct iteration of the workload in `vm`'s serial log.
fn wait_iteration(vm: &mut Vm, what: &str, expected: &BTreeMap<String, String>) -> u64 {
    let start = Instant::now();
    vm.wait_serial(ITERATION_LIMIT, iteration_or_trouble(expected))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let n = assert_iteration_ok(what, &vm.serial_text(), expected);
    println!(
        "{what}: complete iteration after {:.1}s",
        start.elapsed().as_secs_f64()
    );
    n
}

fn ok(what: &str, out: &std::process::Output) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// On a KVM-PVM host `--backend kvm` is the hybrid (guest kernel in emu, user mode on KVM):
/// a freshly booted VM must really have handed user mode to KVM. `stderr` is a debug-level log
/// of the whole VM process (emu prints its hand-off counters when a vCPU is dropped). Elsewhere
/// `--backend kvm` is plain KVM and there is nothing to check.
fn assert_user_mode_ran_on_kvm(what: &str, stderr: &str) {
    if !Path::new("/sys/module/kvm_pvm").exists() {
        return;
    }
    assert!(
        !stderr.contains("restored TSC differs"),
        "{what}: a fresh boot left the host TSC, so its user mode ran in emu:\n{stderr}"
    );
    let tag = "user-mode runs handed over (all vCPUs) ";
    let runs: u64 = stderr
        .lines()
        .filter_map(|l| tagged(l, tag)?.split(',').next()?.trim().parse().ok())
        .max()
        .unwrap_or_else(|| panic!("{what}: no hand-off counters in the log:\n{stderr}"));
    println!("{what}: {runs} user-mode runs handed to KVM");
    assert!(runs > 0, "{what}: no user-mode run went to KVM");
}

/// `snapshot --stop` of `vm` into `file`: status 0 and the VM process ends with status 0.
/// Returns the process's stderr.
fn snapshot_and_stop(mut vm: Vm, file: &Path) -> String {
    let t = Instant::now();
    ok(
        "snapshot",
        &vm.control("snapshot", &["--output", file.to_str().unwrap(), "--stop"]),
    );
    let status = vm.wait_exit(Duration::from_secs(60));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}",
        vm.diagnostics()
    );
    println!(
        "snapshot --stop of the running {MEMORY} Debian guest took {:.1}s",
        t.elapsed().as_secs_f64()
    );
    // The log's last lines (the vCPUs' counters) may still be in the pipe's reader.
    std::thread::sleep(Duration::from_millis(500));
    vm.stderr()
}

/// `run --restore FILE --backend BACKEND` (the disk is the overlay at the path the snapshot
/// names).
fn restore(dir: &Path, name: &str, file: &Path, backend: &str) -> Vm {
    let args = [
        "run",
        "--restore",
        file.to_str().unwrap(),
        "--backend",
        backend,
    ]
    .map(String::from);
    Vm::spawn(
        &args,
        &dir.join(format!("{name}.serial")),
        &dir.join(format!("{name}.sock")),
    )
}

/// Live-migrates `src` to a new VM on `backend` over a Unix socket; returns the destination
/// after the source has ended with status 0.
fn migrate_to(dir: &Path, name: &str, mut src: Vm, backend: &str) -> Vm {
    let to = format!("unix:{}", dir.join(format!("{name}.mig")).display());
    let mut dst = Vm::spawn(
        &incoming_args(&to, None, backend),
        &dir.join(format!("{name}.serial")),
        &dir.join(format!("{name}.sock")),
    );
    wait_listening(&mut dst);
    let t = Instant::now();
    let out = migrate(&src, &to, None);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{name}: migrate: {}\nsource: {}\ndestination: {}",
        String::from_utf8_lossy(&out.stderr),
        src.diagnostics(),
        dst.diagnostics()
    );
    let status = src.wait_exit(Duration::from_secs(60));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}",
        src.diagnostics()
    );
    println!(
        "{name}: live migration to {backend} took {:.1}s: {}",
        t.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stdout).trim()
    );
    dst
}

#[test]
fn harness_can_fail() {
    let expected = parse_expected("# c\npython aa\nxz bb\n");
    assert_eq!(expected.len(), 2);
    let good = "DISTRO-ITER-START 3\nDISTRO python 3 aa\nDISTRO-TIME python 3 1200\n\
                [ 1.0] x DISTRO xz 3 bb\nDISTRO-ITER-DONE 3\n";
    assert!(problems(good, &expected).is_empty());
    assert_eq!(complete_iteration(good, &expected), Some(3));
    assert_eq!(step_times(good), [("python".to_string(), 3, 1200)]);
    assert!(iteration_or_trouble(&expected)(good));
    // A wrong checksum, a failed step, an unknown step, a trap, a panic are all found.
    for bad in [
        "DISTRO python 1 ab\n",
        "DISTRO xz 1 FAILED:signal-4\n",
        "DISTRO gcc 1 aa\n",
        "[ 9.1] traps: python3[80] trap invalid opcode ip:7f0 sp:7ff error:0 in libc.so.6\n",
        "Kernel panic - not syncing: Attempted to kill init!\n",
        "[ 3.3] bash[1]: segfault at 0 ip 0 sp 0 error 4\n",
        "[ 9.9] Call Trace:\n",
    ] {
        let s = format!("{good}{bad}");
        assert!(!problems(&s, &expected).is_empty(), "{bad}");
        assert!(iteration_or_trouble(&expected)(bad), "{bad}");
        // A line still being written is judged only once it is complete.
        let partial = bad.trim_end_matches('\n');
        assert!(
            problems(&format!("{good}{partial}"), &expected).is_empty(),
            "{bad}"
        );
    }
    let cut = "DISTRO-ITER-START 1\nDISTRO python 1 aa\nDISTRO xz 1 b";
    assert!(!iteration_or_trouble(&expected)(cut));
    assert!(iteration_or_trouble(&expected)(&format!("{cut}\n")));
    // Incomplete: a step missing, or not started in this log (a restored VM's first one).
    let missing = "DISTRO-ITER-START 1\nDISTRO python 1 aa\nDISTRO-ITER-DONE 1\n";
    assert_eq!(complete_iteration(missing, &expected), None);
    let unstarted = "DISTRO python 4 aa\nDISTRO xz 4 bb\nDISTRO-ITER-DONE 4\n";
    assert_eq!(complete_iteration(unstarted, &expected), None);
    assert!(!iteration_or_trouble(&expected)(unstarted));
    // grub.cfg: the default entry's kernel parameters.
    let cfg = "set default=\"0\"\nmenuentry 'Debian GNU/Linux' --class debian {\n\
               \tlinux\t/boot/vmlinuz-6.1.0-9-cloud-amd64 root=UUID=abc ro console=ttyS0\n\
               \tinitrd\t/boot/initrd.img-6.1.0-9-cloud-amd64\n}\n\
               menuentry 'other' {\n\tlinux /x root=/dev/sda\n}\n";
    let (params, kernel, initrd) = parse_grub(cfg).unwrap();
    assert_eq!(params, "root=UUID=abc ro console=ttyS0");
    assert_eq!(kernel, "/boot/vmlinuz-6.1.0-9-cloud-amd64");
    assert_eq!(initrd, "/boot/initrd.img-6.1.0-9-cloud-amd64");
    assert!(parse_grub("menuentry 'Debian GNU/Linux' {\n linux /v ro\n}\n").is_err());
    assert!(parse_grub("# nothing\n").is_err());
}

/// `len` bytes of `path` from `offset`.
fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

/// The built image is what the build says: GPT with one Linux partition whose ext4 file
/// system has the UUID of grub.cfg's `root=UUID=`, the kernel and initrd grub.cfg names are
/// the ones copied out, and no `GLIBC_TUNABLES` in what the guest runs at boot.
#[test]
fn distro_image_is_a_bootable_disk() {
    let d = distro();
    let cfg = std::fs::read_to_string(out_dir().join("debian-grub.cfg")).unwrap();
    let (params, kernel, initrd) = parse_grub(&cfg).unwrap();
    let info = std::fs::read_to_string(out_dir().join("debian-info")).unwrap();
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("kernel_version="))
        .expect("no kernel_version in debian-info");
    assert_eq!(kernel, format!("/boot/vmlinuz-{version}"));
    assert_eq!(initrd, format!("/boot/initrd.img-{version}"));
    let uuid = params
        .split_whitespace()
        .find_map(|p| p.strip_prefix("root=UUID="))
        .unwrap();
    assert!(params.contains("console=ttyS0") && params.split_whitespace().any(|p| p == "ro"));
    assert!(!cfg.contains("GLIBC_TUNABLES"));

    let len = std::fs::metadata(&d.image).unwrap().len();
    let img = read_at(&d.image, 0, 2048);
    // Protective MBR, then the GPT header at LBA 1 and its first entry at LBA 2.
    assert_eq!(&img[510..512], &[0x55, 0xaa]);
    assert_eq!(&img[512..520], b"EFI PART");
    let entry = &img[1024..1024 + 128];
    // Linux file system data GUID 0FC63DAF-8483-4772-8E79-3D69D8477DE4 (mixed endian).
    assert_eq!(
        &entry[..16],
        &[
            0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47,
            0x7d, 0xe4
        ]
    );
    let first_lba = u64::from_le_bytes(entry[32..40].try_into().unwrap());
    // The ext4 superblock, 1 KiB into the partition: magic 0xEF53 at 56, UUID at 104.
    let sb = read_at(&d.image, first_lba * 512 + 1024, 1024);
    assert_eq!(&sb[56..58], &[0x53, 0xef]);
    let fs_uuid: String = sb[104..120]
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let dash = if matches!(i, 4 | 6 | 8 | 10) { "-" } else { "" };
            format!("{dash}{b:02x}")
        })
        .collect();
    assert_eq!(
        fs_uuid, uuid,
        "grub.cfg root=UUID= is not the file system's"
    );
    let init = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/distro/anyvisor-distro-init"),
    )
    .unwrap();
    assert!(!init.contains("GLIBC_TUNABLES"));
    println!(
        "debian.img: {} MiB, root=UUID={uuid}, kernel {version}",
        len >> 20
    );
}

#[test]
fn distro_boots_and_runs_on_emu() {
    let d = distro();
    if !emu_fast_enough() {
        return;
    }
    let _one = serial_guard();
    let dir = scratch("distro-emu");
    let mut vm = boot(&d, &dir, "emu", "emu", "once");
    let start = Instant::now();
    vm.wait_serial(ITERATION_LIMIT, |s| {
        s.contains("DISTRO-DONE") || !problems(s, &d.expected).is_empty()
    })
    .unwrap_or_else(|e| panic!("emu: {e}"));
    assert_iteration_ok("emu", &vm.serial_text(), &d.expected);
    println!("emu: all steps after {:.1}s", start.elapsed().as_secs_f64());
    // The guest powers off after the workload.
    let status = vm.wait_exit(Duration::from_secs(300));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}",
        vm.diagnostics()
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn distro_runs_on_kvm_and_moves_to_emu_by_snapshot() {
    let d = distro();
    if !backend_ready("kvm") || !emu_fast_enough() {
        return;
    }
    let _one = serial_guard();
    let dir = scratch("distro-kvm-emu");
    let mut vm = boot(&d, &dir, "kvm", "kvm", "loop");
    wait_iteration(&mut vm, "kvm", &d.expected);

    let snap = dir.join("kvm.snap");
    let log = snapshot_and_stop(vm, &snap);
    assert_user_mode_ran_on_kvm("kvm", &log);
    let t = Instant::now();
    let mut emu = restore(&dir, "emu", &snap, "emu");
    wait_iteration(&mut emu, "kvm -> emu (snapshot)", &d.expected);
    println!(
        "kvm -> emu (snapshot): restored and one full iteration in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    drop(emu);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[ignore = "long (one boot and four moves of a Debian guest, a workload iteration after each: 3-8 min on this 2-core host): \
            cargo test --release -p cli --test e2e distro:: -- --ignored --nocapture"]
fn distro_moves_kvm_emu_kvm_by_snapshot_and_migration() {
    let d = distro();
    if !backend_ready("kvm") || !emu_fast_enough() {
        return;
    }
    let _one = serial_guard();
    let dir = scratch("distro-chain");
    let mut vm = boot(&d, &dir, "kvm0", "kvm", "loop");
    wait_iteration(&mut vm, "kvm boot", &d.expected);

    let snap = dir.join("kvm0.snap");
    let log = snapshot_and_stop(vm, &snap);
    assert_user_mode_ran_on_kvm("kvm boot", &log);
    let mut vm = restore(&dir, "emu1", &snap, "emu");
    wait_iteration(&mut vm, "kvm -> emu (snapshot)", &d.expected);

    let mut vm = migrate_to(&dir, "kvm2", vm, "kvm");
    wait_iteration(&mut vm, "emu -> kvm (migration)", &d.expected);

    let mut vm = migrate_to(&dir, "emu3", vm, "emu");
    wait_iteration(&mut vm, "kvm -> emu (migration)", &d.expected);

    let snap = dir.join("emu3.snap");
    snapshot_and_stop(vm, &snap);
    let mut vm = restore(&dir, "kvm4", &snap, "kvm");
    wait_iteration(&mut vm, "emu -> kvm (snapshot)", &d.expected);
    drop(vm);
    let _ = std::fs::remove_dir_all(dir);
}
