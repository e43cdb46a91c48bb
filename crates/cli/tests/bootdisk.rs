//! End-to-end: `anyvisor run --disk IMAGE` without `--kernel` boots the kernel the image holds
//! (docs/boot-from-disk.md). The test images are made here: the guest kit's bzImage and
//! initramfs in an ext4 filesystem (`mkfs.ext4 -d`) with a Debian-style grub.cfg, inside a GPT
//! made with `sfdisk`. Needs the guest kit, e2fsprogs, sfdisk and qemu-img (each test says SKIP
//! and returns when one is missing), and /dev/kvm for the KVM test.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod disk_image;
mod persist_harness;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use persist_harness::{backend_ready, finish, kit, serial_guard, spawn_captured};

const BOOT_LIMIT: Duration = Duration::from_secs(600);
use disk_image::*;

/// Boots `disk` (grub.cfg without console=, so anyvisor's added console=ttyS0 is what makes
/// the kit's init visible) and checks the init ran, the VMM exited 0, the chosen entry was
/// logged, and the image is unchanged.
fn boot_disk(backend: &str, qcow2: bool) {
    if !backend_ready(backend) || !tools_present() {
        return;
    }
    let Some(kit) = kit() else { return };
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
fn disk_boot_grub_gpt_emu() {
    boot_disk("emu", false);
}

#[test]
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
fn disk_boot_errors() {
    if !tools_present() {
        return;
    }
    let Some(kit) = kit() else { return };
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
fn disk_boot_vmlinuz_links_emu() {
    if !backend_ready("emu") || !tools_present() {
        return;
    }
    let Some(kit) = kit() else { return };
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

/// The Debian image the distro step builds (guest/out/debian.img: GPT, ext4 root, Debian's
/// grub.cfg, initramfs-tools) boots from its own grub.cfg: the initramfs finds the root
/// filesystem by UUID on the virtio disk and starts `init=/usr/bin/true` from it; that init
/// exits at once, the kernel panics (`panic=-1` reboots) and the VMM reports the panic (exit 1).
#[test]
fn disk_boot_debian_img_kvm() {
    if !backend_ready("kvm") {
        return;
    }
    let img = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/out/debian.img");
    if !img.is_file() {
        println!("SKIP: guest/out/debian.img not built (guest/build-distro.sh)");
        return;
    }
    let _one = serial_guard();
    let args: Vec<String> = [
        "run",
        "--disk",
        &format!("{},readonly=on", img.display()),
        "--backend",
        "kvm",
        "--memory",
        "1G",
        "--cmdline",
        "+ panic=-1 reboot=k init=/usr/bin/true",
    ]
    .map(String::from)
    .to_vec();
    let r = finish(
        spawn_captured(&args, &[("ANYVISOR_LOG", "info")]),
        Duration::from_secs(1200),
    );
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
    assert!(
        r.stdout
            .contains("Attempted to kill init! exitcode=0x00000000"),
        "{ctx}"
    );
    // A guest whose kernel panicked ends `run` with exit 1 and one line saying so.
    assert_eq!(r.status.map(|s| s.code()), Some(Some(1)), "{ctx}");
    assert!(
        r.stderr
            .contains("error: the guest kernel panicked: Attempted to kill init!"),
        "{ctx}"
    );
}

fn tail(s: &str) -> &str {
    let n = s.len().saturating_sub(3000);
    s.get(n..).unwrap_or(s)
}
