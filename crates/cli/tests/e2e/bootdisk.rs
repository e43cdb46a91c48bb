//! End-to-end: `anyvisor run --disk IMAGE` without `--kernel` boots the kernel the image holds
//! (docs/boot-from-disk.md).
//!
//! * The kit tests make their images here: the guest kit's bzImage and initramfs in an ext4
//!   filesystem (`mkfs.ext4 -d`) with a Debian-style grub.cfg, inside a GPT made with `sfdisk`.
//! * The Debian tests use `guest/out/debian.img` (GPT/ext4, the Debian cloud kernel with its
//!   initramfs-tools initrd, Debian's grub.cfg; `guest/build-distro.sh`) converted by
//!   `qemu-img convert` into every format `crates/disk` reads, in a directory the test makes and
//!   removes. A Debian boot costs ~25 s of CPU on emu (1.5-2 min on a loaded 2-core host), so
//!   each format boots once, on emu, to the Debian init (initramfs-tools mounts the root found
//!   by UUID; `init=/bin/sh` prints the kernel and root device, then powers off by SysRq):
//!   [`debian_boots_from_qcow2_emu`], [`debian_boots_from_vmdk_sparse_emu`],
//!   [`debian_boots_from_vhdx_emu`], [`debian_boots_from_vpc_emu`],
//!   [`debian_boots_from_vdi_emu`]. One boot on kvm, from the streamOptimized VMDK,
//!   ([`debian_boots_from_vmdk_stream_kvm_and_reads_every_format_like_qemu`]) attaches all nine
//!   conversions (both VMDK subformats, VHDX dynamic and fixed, VPC dynamic and fixed, VDI
//!   dynamic and static, qcow2) as extra read-only disks; the guest copies a fixed large range
//!   of each (the first [`HEAD_MIB`] MiB, which hold the GPT and the first ~250 MiB of the ext4
//!   filesystem, and the last [`TAIL_MIB`] MiB, the backup GPT and any size rounding) with
//!   `O_DIRECT` to a raw scratch disk, and the host compares those bytes with what
//!   `qemu-img convert -O raw` reads from the same file. (Hashing inside the guest instead runs
//!   its user code at ~1 MB/s here; copying whole devices would take minutes.)
//!
//! A test that cannot run here (no guest kit, qemu-img, e2fsprogs/sfdisk, Debian image, /dev/kvm,
//! or an unoptimized build for the boots) is ignored by the `cfg`s of crates/cli/build.rs, with
//! the reason.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::disk_image;
use crate::persist_harness;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use persist_harness::{backend_ready, finish, kit, serial_guard, spawn_captured};

const BOOT_LIMIT: Duration = Duration::from_secs(600);
use disk_image::*;

/// Boots `disk` (grub.cfg without console=, so anyvisor's added console=ttyS0 is what makes
/// the kit's init visible) and checks the init ran, the VMM exited 0, the chosen entry was
/// logged, and the image is unchanged.
fn boot_disk(backend: &str, qcow2: bool) {
    assert!(backend_ready(backend));
    require_tools();
    let kit = kit().unwrap();
    let dir = scratch(&format!("boot-{backend}"));
    let cfg = debian_grub_cfg(&format!(
        "root=UUID={ROOT_UUID} ro quiet reboot=k panic=-1 anyvisor.test=poweroff"
    ));
    let tree = kit_tree(&dir, &kit, Some(&cfg));
    let mut img = gpt_image(&dir, &tree, 48);
    if qcow2 {
        let q = dir.join("disk.qcow2");
        sh(&format!(
            "qemu-img convert -O qcow2 {} {}",
            img.display(),
            q.display()
        ));
        img = q;
    }
    let before = sha(&img);
    let _one = serial_guard();
    let args: Vec<String> = [
        "run",
        "--disk",
        &format!("{},readonly=on", img.display()),
        "--backend",
        backend,
    ]
    .map(String::from)
    .to_vec();
    let r = finish(
        spawn_captured(&args, &[("ANYVISOR_LOG", "info")]),
        BOOT_LIMIT,
    );
    assert!(
        r.stdout.contains("ANYVISOR-INIT-OK"),
        "stdout: {}\nstderr: {}",
        r.stdout,
        r.stderr
    );
    assert_eq!(
        r.status.map(|s| s.code()),
        Some(Some(0)),
        "stderr: {}",
        r.stderr
    );
    assert!(
        r.stderr.contains(
            "booting grub.cfg entry 'Debian GNU/Linux' (/boot/grub/grub.cfg on partition 2)"
        ),
        "stderr: {}",
        r.stderr
    );
    assert_eq!(sha(&img), before, "the image changed");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
#[cfg_attr(
    not(all(boot_emu, disk_tools, qemu_img)),
    ignore = "needs the guest kit, cargo test --release (or ANYVISOR_TEST_EMU=1), e2fsprogs, sfdisk and qemu-img; crates/cli/build.rs"
)]
fn disk_boot_grub_gpt_emu() {
    boot_disk("emu", false);
}

#[test]
#[cfg_attr(
    not(all(boot_kvm, disk_tools, qemu_img)),
    ignore = "needs a usable /dev/kvm, the guest kit (on KVM-PVM hosts also cargo test --release), e2fsprogs, sfdisk and qemu-img; crates/cli/build.rs"
)]
fn disk_boot_grub_gpt_qcow2_kvm() {
    boot_disk("kvm", true);
}

/// Runs `anyvisor run --disk IMG ...` expecting exit 2 with one `error:` line containing
/// `needle`.
fn refused(img: &Path, needle: &str) {
    let out = Command::new(persist_harness::BIN)
        .args(["run", "--disk", img.to_str().unwrap(), "--backend", "emu"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "stderr: {err}");
    assert!(err.starts_with("error: "), "stderr: {err}");
    assert!(err.contains(needle), "stderr: {err}");
}

#[test]
#[cfg_attr(
    not(all(guest_kit, disk_tools, qemu_img)),
    ignore = "needs the guest kit, e2fsprogs, sfdisk and qemu-img; crates/cli/build.rs"
)]
fn disk_boot_errors() {
    require_tools();
    let kit = kit().unwrap();
    let dir = scratch("errors");
    // Nothing on the disk.
    let zero = dir.join("zero.img");
    sh(&format!("truncate -s 8M {}", zero.display()));
    refused(&zero, "no partition table and no filesystem");
    // A GPT whose only filesystem is not ext (a swap signature, then an XFS magic).
    let other = dir.join("other.img");
    sh(&format!("truncate -s 8M {}", other.display()));
    std::fs::write(
        dir.join("t.txt"),
        "label: gpt\nstart=2048, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
    )
    .unwrap();
    sh(&format!(
        "sfdisk -q {} < {}",
        other.display(),
        dir.join("t.txt").display()
    ));
    sh(&format!(
        "printf XFSB | dd of={} bs=1 seek=1048576 conv=notrunc status=none",
        other.display()
    ));
    refused(&other, "unsupported filesystem: xfs on partition 1");
    // ext4 without any boot configuration or kernel.
    let empty = dir.join("empty");
    std::fs::create_dir_all(empty.join("etc")).unwrap();
    let sub = dir.join("e");
    std::fs::create_dir_all(&sub).unwrap();
    let img = gpt_image(&sub, &empty, 8);
    refused(&img, "no bootable entry");
    // A grub entry whose "kernel" is not an x86-64 kernel.
    let sub = dir.join("k");
    std::fs::create_dir_all(&sub).unwrap();
    let tree = kit_tree(&sub, &kit, Some(&debian_grub_cfg("root=/dev/vda")));
    std::fs::write(tree.join(format!("boot/vmlinuz-{KVER}")), b"not a kernel\n").unwrap();
    let img = gpt_image(&sub, &tree, 48);
    refused(&img, "is not an x86-64 Linux kernel");
    // A grub entry naming a kernel that is not there.
    let sub = dir.join("m");
    std::fs::create_dir_all(&sub).unwrap();
    let tree = kit_tree(&sub, &kit, Some(&debian_grub_cfg("root=/dev/vda")));
    std::fs::remove_file(tree.join(format!("boot/vmlinuz-{KVER}"))).unwrap();
    let img = gpt_image(&sub, &tree, 48);
    refused(
        &img,
        "kernel /boot/vmlinuz-6.1.0-57-cloud-amd64 named by the boot entry is not on partition 2",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Without any boot configuration, the /vmlinuz and /initrd.img links are booted with
/// `root=UUID=<the filesystem's UUID> ro console=ttyS0`; `--cmdline +...` extends that.
#[test]
#[cfg_attr(
    not(all(boot_emu, disk_tools, qemu_img)),
    ignore = "needs the guest kit, cargo test --release (or ANYVISOR_TEST_EMU=1), e2fsprogs, sfdisk and qemu-img; crates/cli/build.rs"
)]
fn disk_boot_vmlinuz_links_emu() {
    assert!(backend_ready("emu"));
    require_tools();
    let kit = kit().unwrap();
    let dir = scratch("links");
    let tree = kit_tree(&dir, &kit, None);
    let img = gpt_image(&dir, &tree, 48);
    let _one = serial_guard();
    let args: Vec<String> = [
        "run",
        "--disk",
        img.to_str().unwrap(),
        "--backend",
        "emu",
        "--cmdline",
        "+ reboot=k panic=-1 anyvisor.test=poweroff",
    ]
    .map(String::from)
    .to_vec();
    let r = finish(
        spawn_captured(&args, &[("ANYVISOR_LOG", "info")]),
        BOOT_LIMIT,
    );
    assert!(
        r.stdout.contains("ANYVISOR-INIT-OK"),
        "stdout: {}\nstderr: {}",
        r.stdout,
        r.stderr
    );
    assert!(
        r.stdout
            .contains(&format!("Command line: root=UUID={ROOT_UUID} ro console=ttyS0 reboot=k panic=-1 anyvisor.test=poweroff")),
        "stdout: {}",
        r.stdout
    );
    assert!(
        r.stderr
            .contains("booting the /vmlinuz link on partition 2"),
        "{}",
        r.stderr
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A Debian boot to its init, generous for a loaded host (1.5-2 min of wall time per boot there).
const DEBIAN_LIMIT: Duration = Duration::from_secs(900);
/// The kvm boot also copies [`HEAD_MIB`] + [`TAIL_MIB`] MiB of nine disks.
const DEBIAN_COPY_LIMIT: Duration = Duration::from_secs(1500);
/// The guest copies the first `HEAD_MIB` MiB of every converted disk (the GPT, the ext4
/// superblock, group descriptors and inode tables, and the first ~250 MiB of file data)...
const HEAD_MIB: u64 = 256;
/// ... and the last `TAIL_MIB` MiB (the backup GPT; for VPC, qemu's CHS rounding).
const TAIL_MIB: u64 = 2;

/// The Debian image and the kernel version its build recorded (guest/out/debian-info). Tests
/// that need it are ignored by `cfg(debian_img)` where it is not built, so here it must exist.
fn debian() -> (PathBuf, String) {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/out");
    let img = out.join("debian.img");
    if !img.is_file() {
        persist_harness::host_changed("guest/out/debian.img is not built (guest/build-distro.sh)");
    }
    let info = std::fs::read_to_string(out.join("debian-info")).unwrap();
    let kver = info
        .lines()
        .find_map(|l| l.strip_prefix("kernel_version="))
        .expect("no kernel_version= in guest/out/debian-info")
        .to_string();
    (img, kver)
}

/// One `qemu-img convert` target.
struct Conversion {
    /// The test's name for it.
    name: &'static str,
    /// qemu's format name (`-O`, and `-f` when reading it back).
    format: &'static str,
    /// `-o` options (none when empty).
    options: &'static str,
    file: &'static str,
}

/// Every format and subformat `qemu-img` writes that `crates/disk` reads.
const CONVERSIONS: [Conversion; 9] = [
    Conversion {
        name: "vmdk-monolithicSparse",
        format: "vmdk",
        options: "subformat=monolithicSparse",
        file: "sparse.vmdk",
    },
    Conversion {
        name: "vmdk-streamOptimized",
        format: "vmdk",
        options: "subformat=streamOptimized",
        file: "stream.vmdk",
    },
    Conversion {
        name: "vhdx-dynamic",
        format: "vhdx",
        options: "",
        file: "dynamic.vhdx",
    },
    Conversion {
        name: "vhdx-fixed",
        format: "vhdx",
        options: "subformat=fixed",
        file: "fixed.vhdx",
    },
    Conversion {
        name: "vpc-dynamic",
        format: "vpc",
        options: "",
        file: "dynamic.vhd",
    },
    Conversion {
        name: "vpc-fixed",
        format: "vpc",
        options: "subformat=fixed",
        file: "fixed.vhd",
    },
    Conversion {
        name: "vdi-dynamic",
        format: "vdi",
        options: "",
        file: "dynamic.vdi",
    },
    Conversion {
        name: "vdi-static",
        format: "vdi",
        options: "static=on",
        file: "static.vdi",
    },
    Conversion {
        name: "qcow2",
        format: "qcow2",
        options: "",
        file: "debian.qcow2",
    },
];

fn conversion(name: &str) -> &'static Conversion {
    CONVERSIONS.iter().find(|c| c.name == name).unwrap()
}

/// `qemu-img convert`s the raw `src` as `c` says into `dir`.
fn convert(src: &Path, dir: &Path, c: &Conversion) -> PathBuf {
    let out = dir.join(c.file);
    let options = if c.options.is_empty() {
        String::new()
    } else {
        format!("-o {}", c.options)
    };
    sh(&format!(
        "qemu-img convert -f raw -O {} {options} {} {}",
        c.format,
        src.display(),
        out.display()
    ));
    out
}

/// Length and modification time: an image booted from must not change.
fn stamp(p: &Path) -> (u64, std::time::SystemTime) {
    let m = std::fs::metadata(p).unwrap();
    (m.len(), m.modified().unwrap())
}

/// `anyvisor run --disk BOOT,readonly=on [--disk EXTRA]... --backend BACKEND` without a kernel:
/// the image's grub entry, extended by `init=/bin/sh -- -c "SCRIPT"` (Debian's initramfs-tools
/// hands init's arguments on).
fn debian_run(
    boot: &Path,
    extra: &[String],
    backend: &str,
    memory: &str,
    script: &str,
    limit: Duration,
) -> persist_harness::Run {
    // The kernel ends the quoted argument at a double quote; `--` would end anyvisor's kernel part.
    assert!(!script.contains('"') && !script.split_whitespace().any(|t| t == "--"));
    let mut args = vec![
        "run".to_string(),
        "--disk".into(),
        format!("{},readonly=on", boot.display()),
    ];
    for d in extra {
        args.push("--disk".into());
        args.push(d.clone());
    }
    args.extend([
        "--backend".into(),
        backend.into(),
        "--memory".into(),
        memory.into(),
        "--cmdline".into(),
        format!("+ panic=-1 reboot=k init=/bin/sh -- -c \"{script}\""),
    ]);
    let _one = serial_guard();
    finish(spawn_captured(&args, &[("ANYVISOR_LOG", "info")]), limit)
}

/// Lines the guest printed that start with `tag` (not the kernel's echo of its command line).
fn tagged<'a>(stdout: &'a str, tag: &'a str) -> impl Iterator<Item = &'a str> {
    stdout
        .lines()
        .filter_map(move |l| l.trim_end_matches('\r').strip_prefix(tag))
}

/// Converts debian.img to `name` and boots it on emu to the Debian init: Debian's initramfs
/// finds the root filesystem by UUID on the converted disk and mounts it, `/bin/sh` from it
/// prints the kernel version and root device, and SysRq powers off (exit 0).
fn debian_boot_emu(name: &str) {
    assert!(backend_ready("emu"));
    let (img, kver) = debian();
    let dir = TempDir(scratch(&format!("debian-{name}")));
    let disk = convert(&img, &dir.0, conversion(name));
    let before = stamp(&disk);
    let r = debian_run(
        &disk,
        &[],
        "emu",
        "512M",
        "echo DEBIAN-INIT $(uname -r) $(findmnt -n -o SOURCE /); echo o > /proc/sysrq-trigger; sleep 60",
        DEBIAN_LIMIT,
    );
    let ctx = format!(
        "{name}: stdout tail: {}\nstderr: {}",
        tail(&r.stdout),
        r.stderr
    );
    assert!(
        r.stderr
            .contains("booting grub.cfg entry 'Debian GNU/Linux'"),
        "{ctx}"
    );
    assert!(
        r.stdout.contains("Begin: Mounting root file system"),
        "{ctx}"
    );
    assert!(
        tagged(&r.stdout, "DEBIAN-INIT ").any(|l| l == format!("{kver} /dev/vda1")),
        "{ctx}"
    );
    assert_eq!(r.status.map(|s| s.code()), Some(Some(0)), "{ctx}");
    assert_eq!(stamp(&disk), before, "{name}: the image changed");
}

#[test]
#[cfg_attr(
    not(all(boot_emu, qemu_img, debian_img)),
    ignore = "needs guest/out/debian.img (guest/build-distro.sh), qemu-img, and what boot_emu needs (the guest kit, cargo test --release or ANYVISOR_TEST_EMU=1); crates/cli/build.rs"
)]
fn debian_boots_from_qcow2_emu() {
    debian_boot_emu("qcow2");
}

#[test]
#[cfg_attr(
    not(all(boot_emu, qemu_img, debian_img)),
    ignore = "needs guest/out/debian.img (guest/build-distro.sh), qemu-img, and what boot_emu needs (the guest kit, cargo test --release or ANYVISOR_TEST_EMU=1); crates/cli/build.rs"
)]
fn debian_boots_from_vmdk_sparse_emu() {
    debian_boot_emu("vmdk-monolithicSparse");
}

#[test]
#[cfg_attr(
    not(all(boot_emu, qemu_img, debian_img)),
    ignore = "needs guest/out/debian.img (guest/build-distro.sh), qemu-img, and what boot_emu needs (the guest kit, cargo test --release or ANYVISOR_TEST_EMU=1); crates/cli/build.rs"
)]
fn debian_boots_from_vhdx_emu() {
    debian_boot_emu("vhdx-dynamic");
}

#[test]
#[cfg_attr(
    not(all(boot_emu, qemu_img, debian_img)),
    ignore = "needs guest/out/debian.img (guest/build-distro.sh), qemu-img, and what boot_emu needs (the guest kit, cargo test --release or ANYVISOR_TEST_EMU=1); crates/cli/build.rs"
)]
fn debian_boots_from_vpc_emu() {
    debian_boot_emu("vpc-dynamic");
}

#[test]
#[cfg_attr(
    not(all(boot_emu, qemu_img, debian_img)),
    ignore = "needs guest/out/debian.img (guest/build-distro.sh), qemu-img, and what boot_emu needs (the guest kit, cargo test --release or ANYVISOR_TEST_EMU=1); crates/cli/build.rs"
)]
fn debian_boots_from_vdi_emu() {
    debian_boot_emu("vdi-dynamic");
}

/// `qemu-img info`'s virtual size of `path` read as `format`.
fn qemu_size(path: &Path, format: &str) -> u64 {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-f", format])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

/// Asserts `len` bytes of `want` at `want_at` equal those of `got` at `got_at`, naming the
/// first differing offset.
fn same_bytes(
    what: &str,
    want: &std::fs::File,
    want_at: u64,
    got: &std::fs::File,
    got_at: u64,
    len: u64,
) {
    const CHUNK: u64 = 1 << 20;
    let mut a = vec![0u8; CHUNK as usize];
    let mut b = vec![0u8; CHUNK as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done) as usize;
        want.read_exact_at(&mut a[..n], want_at + done).unwrap();
        got.read_exact_at(&mut b[..n], got_at + done).unwrap();
        if a[..n] != b[..n] {
            let i = a[..n]
                .iter()
                .zip(&b[..n])
                .position(|(x, y)| x != y)
                .unwrap();
            panic!(
                "{what}: the guest read other bytes than qemu-img at offset {:#x} (qemu {:#04x}, guest {:#04x})",
                want_at + done + i as u64,
                a[i],
                b[i]
            );
        }
        done += n as u64;
    }
}

/// The Debian image converted by qemu-img into every format boots on kvm from its
/// streamOptimized VMDK, and the guest reads the same bytes as qemu-img from each of the nine
/// conversions, attached as extra read-only disks (vdb..vdj): it copies the first [`HEAD_MIB`]
/// and the last [`TAIL_MIB`] MiB of each with `O_DIRECT` to a raw scratch disk (vdk), and the
/// host compares them with `qemu-img convert -O raw` of the same file; each disk's size is
/// qemu's virtual size. The script then ends, so init exits: the kernel panics (`panic=-1`
/// reboots) and `run` reports the panic (exit 1 and one `error:` line).
#[test]
#[cfg_attr(
    not(all(boot_kvm, qemu_img, debian_img)),
    ignore = "needs a usable /dev/kvm, guest/out/debian.img (guest/build-distro.sh), qemu-img, and what boot_kvm needs (the guest kit; on KVM-PVM hosts cargo test --release); crates/cli/build.rs"
)]
fn debian_boots_from_vmdk_stream_kvm_and_reads_every_format_like_qemu() {
    assert!(backend_ready("kvm"));
    let (img, _) = debian();
    let dir = TempDir(scratch("debian-formats"));
    let images: Vec<(&Conversion, PathBuf)> = CONVERSIONS
        .iter()
        .map(|c| (c, convert(&img, &dir.0, c)))
        .collect();
    let boot = dir.0.join(conversion("vmdk-streamOptimized").file);
    let before = stamp(&boot);
    let slot = (HEAD_MIB + TAIL_MIB) << 20;
    let (head, tail_len) = (HEAD_MIB << 20, TAIL_MIB << 20);
    let out = dir.0.join("out.raw");
    std::fs::File::create(&out)
        .unwrap()
        .set_len(images.len() as u64 * slot)
        .unwrap();
    // vda is the boot disk, then the conversions, then the scratch disk.
    let dev = |i: usize| format!("vd{}", char::from(b'b' + u8::try_from(i).unwrap()));
    let names: Vec<String> = (0..images.len()).map(dev).collect();
    let sink = dev(images.len());
    let mut extra: Vec<String> = images
        .iter()
        .map(|(_, p)| format!("{},readonly=on", p.display()))
        .collect();
    extra.push(format!("{},format=raw", out.display()));
    let script = format!(
        "i=0; for d in {names}; do s=$(cat /sys/block/$d/size); \
         echo FMT-DEV $i $d $s $(readlink /sys/block/$d); \
         dd if=/dev/$d of=/dev/{sink} bs=1M count={HEAD_MIB} iflag=direct oflag=direct,seek_bytes seek=$((i*{slot})) status=none || echo FMT-FAILED $d head; \
         dd if=/dev/$d of=/dev/{sink} bs=1M count={tail_len} skip=$((s*512-{tail_len})) iflag=direct,skip_bytes,count_bytes oflag=direct,seek_bytes seek=$((i*{slot}+{head})) status=none || echo FMT-FAILED $d tail; \
         i=$((i+1)); done; echo FMT-DONE $(cat /proc/uptime)",
        names = names.join(" "),
    );
    let r = debian_run(&boot, &extra, "kvm", "1G", &script, DEBIAN_COPY_LIMIT);
    let ctx = format!("stdout tail: {}\nstderr: {}", tail(&r.stdout), r.stderr);
    assert!(
        r.stderr
            .contains("booting grub.cfg entry 'Debian GNU/Linux'"),
        "{ctx}"
    );
    assert!(
        r.stdout.contains("Begin: Mounting root file system"),
        "{ctx}"
    );
    assert_eq!(tagged(&r.stdout, "FMT-FAILED ").count(), 0, "{ctx}");
    let done: Vec<&str> = tagged(&r.stdout, "FMT-DONE ").collect();
    assert_eq!(done.len(), 1, "{ctx}");
    println!("guest uptime when the copies were done: {}", done[0]);
    // Init exited: the kernel panicked, `run` says so and exits 1.
    assert!(
        r.stdout
            .contains("Attempted to kill init! exitcode=0x00000000"),
        "{ctx}"
    );
    assert_eq!(r.status.map(|s| s.code()), Some(Some(1)), "{ctx}");
    assert!(
        r.stderr
            .contains("error: the guest kernel panicked: Attempted to kill init!"),
        "{ctx}"
    );
    assert_eq!(stamp(&boot), before, "the boot image changed");
    let devs: Vec<Vec<&str>> = tagged(&r.stdout, "FMT-DEV ")
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(devs.len(), images.len(), "{ctx}");
    let sunk = std::fs::File::open(&out).unwrap();
    for (i, ((c, path), d)) in images.iter().zip(&devs).enumerate() {
        // `i vdX sectors ../devices/platform/LNRO0005:NN/virtioN/block/vdX`
        assert_eq!(d.len(), 4, "{}: {d:?}", c.name);
        assert_eq!(d[0], i.to_string(), "{d:?}");
        assert_eq!(d[1], names[i], "{d:?}");
        assert!(
            d[3].ends_with(&format!("/virtio{}/block/{}", i + 1, names[i])),
            "{}: {d:?} is not the disk attached as number {}",
            c.name,
            i + 2
        );
        let size = qemu_size(path, c.format);
        let sectors: u64 = d[2].parse().unwrap();
        assert_eq!(sectors * 512, size, "{}: the guest's disk size", c.name);
        let reference = dir.0.join("qemu.raw");
        sh(&format!(
            "qemu-img convert -f {} -O raw {} {}",
            c.format,
            path.display(),
            reference.display()
        ));
        let want = std::fs::File::open(&reference).unwrap();
        assert_eq!(want.metadata().unwrap().len(), size);
        let base = i as u64 * slot;
        same_bytes(c.name, &want, 0, &sunk, base, head);
        same_bytes(c.name, &want, size - tail_len, &sunk, base + head, tail_len);
        std::fs::remove_file(&reference).unwrap();
    }
}

fn tail(s: &str) -> &str {
    let n = s.len().saturating_sub(3000);
    s.get(n..).unwrap_or(s)
}
