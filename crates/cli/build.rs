//! Probes, once per build, what the end-to-end tests in `tests/` need from this host, and tells
//! them through `cfg`s. A test that cannot run here is then marked
//! `#[cfg_attr(not(CFG), ignore = "reason")]` and the test runner reports it as ignored, with
//! the reason, instead of it passing without having run. (The tests still check at run time and
//! fail, not pass, when the host changed since the build.)
//!
//! | cfg | set when |
//! |---|---|
//! | `kvm_usable` | `/dev/kvm` opens read-write |
//! | `guest_kit` | the guest kit is built (`guest/out`, or `ANYVISOR_GUEST_KIT`) |
//! | `boot_emu` | `guest_kit`, and an optimized build (`cargo test --release`) or `ANYVISOR_TEST_EMU=1`: the software CPU boots the guest in reasonable time |
//! | `boot_kvm` | `kvm_usable`, `guest_kit`, and on KVM-PVM hosts (where the kvm backend runs the guest kernel in emu) what `boot_emu` needs |
//! | `root` | the build runs as root (network namespaces, tap devices) |
//! | `ip_tool` | `ip` (iproute2) runs |
//! | `qemu_img` | `qemu-img` and `qemu-io` run |
//! | `disk_tools` | `mkfs.ext4` (e2fsprogs) and `sfdisk` (util-linux) run: the boot-from-disk tests build GPT/ext4 images with them |
//! | `debian_img` | the Debian 12 disk image is built (`guest/out/debian.img`, `guest/build-distro.sh`) |

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn runs(tool: &str, arg: &str) -> bool {
    Command::new(tool)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

fn main() {
    for cfg in [
        "kvm_usable",
        "guest_kit",
        "boot_emu",
        "boot_kvm",
        "root",
        "ip_tool",
        "qemu_img",
        "disk_tools",
        "debian_img",
    ] {
        println!("cargo::rustc-check-cfg=cfg({cfg})");
    }
    println!("cargo::rerun-if-env-changed=ANYVISOR_TEST_EMU");
    println!("cargo::rerun-if-env-changed=ANYVISOR_GUEST_KIT");
    println!("cargo::rerun-if-changed=build.rs");

    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let kit_dir = std::env::var_os("ANYVISOR_GUEST_KIT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../../guest/out"));
    let kit_files = ["bzImage", "vmlinux", "initramfs.cpio.gz"].map(|f| kit_dir.join(f));
    for f in &kit_files {
        // A missing file makes cargo run this script again on the next build.
        println!("cargo::rerun-if-changed={}", f.display());
    }
    let kit = kit_files.iter().all(|f| f.is_file());
    let debian = manifest.join("../../guest/out/debian.img");
    println!("cargo::rerun-if-changed={}", debian.display());
    let optimized = std::env::var("PROFILE").is_ok_and(|p| p != "debug");
    let emu_fast = optimized || std::env::var_os("ANYVISOR_TEST_EMU").is_some_and(|v| v == "1");
    let pvm = Path::new("/sys/module/kvm_pvm").exists();

    let set = |cfg: &str, on: bool| {
        if on {
            println!("cargo::rustc-cfg={cfg}");
        }
    };
    set("kvm_usable", kvm);
    set("guest_kit", kit);
    set("boot_emu", kit && emu_fast);
    set("boot_kvm", kvm && kit && (emu_fast || !pvm));
    set("root", is_root());
    set("ip_tool", runs("ip", "-V"));
    set(
        "qemu_img",
        runs("qemu-img", "--version") && runs("qemu-io", "--version"),
    );
    // Both live in /sbin on Debian, which a non-root PATH may lack.
    let sbin = |tool: &str| {
        runs(tool, "-V")
            || ["/usr/sbin", "/sbin"]
                .iter()
                .any(|d| runs(&format!("{d}/{tool}"), "-V"))
    };
    set("disk_tools", sbin("mkfs.ext4") && sbin("sfdisk"));
    set("debian_img", debian.is_file());
}
