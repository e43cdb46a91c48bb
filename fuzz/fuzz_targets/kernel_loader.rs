//! Loads arbitrary bytes as a kernel file (bzImage or ELF vmlinux, with or without an initrd)
//! with an arbitrary command line into 64 MiB of guest RAM. Must refuse or load, never panic,
//! write outside guest RAM, or allocate without bound.
//!
//! Input: byte 0 = flags (bit 0: add a 4 KiB initrd; bits 1-2: 1-4 vCPUs, bit 3: a virtio
//! slot), bytes 1-2 = command line length (LE), then the command line, then the kernel file.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use hv::GuestMemory;
use libfuzzer_sys::fuzz_target;
use machine::boot::{BootConfig, VirtioSlot, load_linux};

fn memory() -> Option<&'static GuestMemory> {
    static MEM: OnceLock<Option<GuestMemory>> = OnceLock::new();
    MEM.get_or_init(|| machine::create_guest_memory(64 << 20).ok())
        .as_ref()
}

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "anyvisor-fuzz-loader-{}-{name}",
        std::process::id()
    ))
}

fuzz_target!(|data: &[u8]| {
    let Some(mem) = memory() else { return };
    let [flags, l0, l1, rest @ ..] = data else {
        return;
    };
    let len = usize::from(u16::from_le_bytes([*l0, *l1])).min(rest.len());
    let (cmdline, kernel) = rest.split_at(len);
    let cmdline = String::from_utf8_lossy(cmdline);
    let kernel_path = scratch("kernel");
    let initrd_path = scratch("initrd");
    if std::fs::write(&kernel_path, kernel).is_err()
        || std::fs::write(&initrd_path, [0x5au8; 4096]).is_err()
    {
        let _ = std::fs::remove_file(&kernel_path);
        return;
    }
    let slots: Vec<VirtioSlot> = if flags & 8 != 0 {
        VirtioSlot::for_index(0).into_iter().collect()
    } else {
        Vec::new()
    };
    let cfg = BootConfig {
        kernel: &kernel_path,
        initrd: (flags & 1 != 0).then_some(initrd_path.as_path()),
        cmdline: &cmdline,
        cpus: 1 + u32::from((flags >> 1) & 3),
        virtio: &slots,
    };
    let _ = load_linux(mem, &cfg);
    // The files exist only for this input: a fuzz run leaves nothing behind in the temp dir.
    let _ = std::fs::remove_file(&kernel_path);
    let _ = std::fs::remove_file(&initrd_path);
});
