//! Writes the seed corpora under `fuzz/corpus/<target>/` from real data produced by the crates
//! themselves (a snapshot file written by `SnapshotWriter`, a migration stream recorded from
//! `migrate::send_on`) and from hand-built inputs (register sequences, requests, code).
//! Run: `cd fuzz && cargo run --example make_seeds` (no sanitizer needed). Seeds stay small.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};

use hv::GuestMemory;
use vm_memory::{Bytes, GuestAddress};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn put(target: &str, name: &str, bytes: &[u8]) -> Res<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir)?;
    assert!(
        bytes.len() < 100 << 10,
        "{target}/{name} is {} bytes",
        bytes.len()
    );
    std::fs::write(dir.join(name), bytes)?;
    println!("{target}/{name}: {} bytes", bytes.len());
    Ok(())
}

/// A 16 KiB guest with a few non-zero pages.
fn small_memory() -> Res<GuestMemory> {
    let mem =
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x2000), (GuestAddress(0x4000), 0x2000)])?;
    mem.write_slice(b"anyvisor seed page", GuestAddress(0x10))?;
    mem.write_slice(&[0xa5; 64], GuestAddress(0x4800))?;
    Ok(mem)
}

fn snapshot_seeds() -> Res<()> {
    let mem = small_memory()?;
    for (name, vcpus) in [("two-vcpus", 2u32), ("one-vcpu", 1)] {
        let contents = snapshot::SnapshotContents {
            header: snapshot::Header {
                cpu_model: hv::CpuModel::portable(),
                memory_regions: snapshot::memory_regions_of(&mem),
                vcpus,
                backend: hv::BackendKind::Emu,
                tsc_khz: 2_000_000,
                created_unix: 1_700_000_000,
                config: serde_json::json!({"cmdline": "console=ttyS0"}),
                user_extra: Default::default(),
            },
            vcpus: vec![hv::CpuState::default(); vcpus as usize],
            vm: hv::VmState::default(),
            devices: vec![("platform".into(), serde_json::json!({"serial": {"ier": 0}}))],
        };
        let path = std::env::temp_dir().join(format!("anyvisor-seed-{}.snap", std::process::id()));
        snapshot::SnapshotWriter::write(&path, &contents, &mem)?;
        let bytes = std::fs::read(&path)?;
        std::fs::remove_file(&path)?;
        // The seed must be one the reader accepts.
        snapshot::fuzz_open(&bytes)?;
        put("snapshot_reader", name, &bytes)?;
    }
    Ok(())
}

/// The destination's side of a socket that records everything the source sent.
struct Recorder {
    inner: UnixStream,
    log: Arc<Mutex<Vec<u8>>>,
}

impl Read for Recorder {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.log
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

impl Write for Recorder {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

struct Source {
    mem: GuestMemory,
    dirty_rounds: Mutex<u32>,
}

impl migrate::SourceVm for Source {
    fn memory(&self) -> &GuestMemory {
        &self.mem
    }
    fn describe(&self) -> serde_json::Value {
        serde_json::json!({"memory": [[0, 0x2000], [0x4000, 0x2000]], "cpus": 1})
    }
    fn set_dirty_tracking(&self, _: bool) -> Result<(), migrate::VmError> {
        Ok(())
    }
    fn take_dirty_pages(&self) -> Result<Vec<u64>, migrate::VmError> {
        let mut n = self.dirty_rounds.lock().map_err(|_| "poisoned")?;
        *n += 1;
        Ok(if *n == 1 { vec![0, 4] } else { Vec::new() })
    }
    fn throttle(&self, _: u8) {}
    fn pause(&self) -> Result<(), migrate::VmError> {
        Ok(())
    }
    fn resume(&self) -> Result<(), migrate::VmError> {
        Ok(())
    }
    fn final_state(&self) -> Result<Vec<u8>, migrate::VmError> {
        Ok(br#"{"vcpus":[{"rip":1048576}],"devices":{}}"#.to_vec())
    }
}

struct Dest(GuestMemory);

impl migrate::DestinationVm for Dest {
    fn memory(&self) -> &GuestMemory {
        &self.0
    }
}

fn migrate_seeds() -> Res<()> {
    let (a, b) = UnixStream::pair()?;
    let log = Arc::new(Mutex::new(Vec::new()));
    let recorder = Recorder {
        inner: b,
        log: log.clone(),
    };
    let dest = std::thread::spawn(move || {
        let arrived = migrate::receive_on(recorder, None, |_| {
            small_memory().map(Dest).map_err(|e| e.to_string())
        });
        arrived
            .map(|a| a.confirmation.resumed())
            .map_err(|e| e.to_string())
    });
    let src = Source {
        mem: small_memory()?,
        dirty_rounds: Mutex::new(0),
    };
    migrate::send_on(a, None, &src, migrate::SendOptions::default())?;
    dest.join().map_err(|_| "destination panicked")???;
    let bytes = log.lock().map_err(|_| "poisoned")?.clone();
    put("migrate_receiver", "full-migration", &bytes)?;
    // The handshake alone, and the stream cut in the middle of the memory phase.
    put(
        "migrate_receiver",
        "first-64-bytes",
        &bytes[..64.min(bytes.len())],
    )?;
    put("migrate_receiver", "cut-half", &bytes[..bytes.len() / 2])?;
    Ok(())
}

fn api_seeds() -> Res<()> {
    let reqs: [(&str, &[u8]); 5] = [
        ("get-vm", b"GET /vm HTTP/1.1\r\nHost: localhost\r\n\r\n"),
        ("pause", b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
        (
            "snapshot",
            b"PUT /vm/snapshot HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 37\r\n\r\n{\"path\":\"/tmp/x.snap\",\"stop\":false}\n\n",
        ),
        (
            "migrate",
            b"PUT /vm/migrate HTTP/1.1\r\nContent-Length: 33\r\n\r\n{\"to\":\"unix:/tmp/m.sock\",\"x\":1}",
        ),
        ("http10-shutdown", b"PUT /vm/shutdown HTTP/1.0\r\n\r\n"),
    ];
    for (name, r) in reqs {
        put("api_http", name, r)?;
    }
    Ok(())
}

/// A minimal ELF64 vmlinux: one PT_LOAD of `code` at 16 MiB, entry at its start.
fn tiny_elf(code: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 0x78];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1; // version
    f[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[0x12..0x14].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    f[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
    f[0x18..0x20].copy_from_slice(&0x100_0000u64.to_le_bytes()); // entry
    f[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes()); // phoff
    f[0x34..0x36].copy_from_slice(&0x40u16.to_le_bytes()); // ehsize
    f[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes()); // phentsize
    f[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes()); // phnum
    let ph = 0x40;
    f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    f[ph + 8..ph + 16].copy_from_slice(&0x78u64.to_le_bytes()); // offset
    f[ph + 16..ph + 24].copy_from_slice(&0x100_0000u64.to_le_bytes()); // vaddr
    f[ph + 24..ph + 32].copy_from_slice(&0x100_0000u64.to_le_bytes()); // paddr
    f[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes()); // filesz
    f[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64).to_le_bytes()); // memsz
    f[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes()); // align
    f.extend_from_slice(code);
    f
}

/// A bzImage-shaped file: boot sector signature, the setup header (copied from the test kit's
/// real bzImage when it is built, so the fields are a real kernel's; hand-made otherwise), no
/// kernel code, and a short `hlt` payload as the protected-mode part.
fn tiny_bzimage() -> Vec<u8> {
    let mut k = vec![0u8; 0x3000];
    k[0x1f1] = 4; // setup_sects
    k[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    k[0x202..0x206].copy_from_slice(b"HdrS");
    k[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    k[0x211] = 1; // LOADED_HIGH
    let kit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest/out/bzImage");
    if let Ok(real) = std::fs::read(&kit)
        && real.len() > 0x280
    {
        // Header fields only (0x1f1..0x280), not code.
        k[0x1f1..0x280].copy_from_slice(&real[0x1f1..0x280]);
        k[0x1f1] = 4; // keep the payload where this file has it
    }
    k.extend_from_slice(&[0xf4; 512]); // hlt
    k
}

fn loader_seeds() -> Res<()> {
    let cmd = b"console=ttyS0 quiet reboot=k panic=-1 anyvisor.test=poweroff";
    for (name, flags, kernel) in [
        ("elf", 0u8, tiny_elf(&[0xf4; 64])),
        (
            "elf-initrd-4cpus-virtio",
            1 | 6 | 8,
            tiny_elf(&[0x90, 0xf4]),
        ),
        ("bzimage", 0, tiny_bzimage()),
        ("bzimage-initrd", 1, tiny_bzimage()),
    ] {
        let mut seed = vec![flags];
        seed.extend_from_slice(&(cmd.len() as u16).to_le_bytes());
        seed.extend_from_slice(cmd);
        seed.extend_from_slice(&kernel);
        put("kernel_loader", name, &seed)?;
    }
    Ok(())
}

fn emu_seeds() -> Res<()> {
    // Long mode: arithmetic, a loop, memory, the stack, port and MMIO I/O, rep movs, cpuid.
    let long: &[u8] = &[
        0x01, // long mode
        0x48, 0xc7, 0xc0, 0x10, 0x00, 0x00, 0x00, // mov rax, 16
        0x48, 0xc7, 0xc1, 0x04, 0x00, 0x00, 0x00, // mov rcx, 4
        0x48, 0x01, 0xc8, // add rax, rcx
        0xe2, 0xfb, // loop -5
        0x50, 0x5b, // push rax; pop rbx
        0x48, 0x89, 0x04, 0x25, 0x00, 0x20, 0x00, 0x00, // mov [0x2000], rax
        0xba, 0xf8, 0x03, 0x00, 0x00, // mov edx, 0x3f8
        0xb0, 0x41, 0xee, // mov al, 'A'; out dx, al
        0xec, // in al, dx
        0x48, 0xc7, 0xc6, 0x00, 0x00, 0x10, 0x00, // mov rsi, 0x100000
        0x48, 0xc7, 0xc7, 0x00, 0x30, 0x00, 0x00, // mov rdi, 0x3000
        0x48, 0xc7, 0xc1, 0x20, 0x00, 0x00, 0x00, // mov rcx, 32
        0xf3, 0xa4, // rep movsb
        0x31, 0xc0, 0x0f, 0xa2, // xor eax, eax; cpuid
        0x48, 0xb8, 0x00, 0x00, 0x00, 0xfe, 0x00, 0x00, 0x00, 0x00, // mov rax, 0xfe000000
        0x8b, 0x00, // mov eax, [rax] (MMIO)
        0x0f, 0x01, 0xd0, // xgetbv
        0xf4, // hlt
    ];
    put("emu_exec", "long-mode-mix", long)?;
    let real: &[u8] = &[
        0x00, // real mode
        0xb8, 0x00, 0x10, // mov ax, 0x1000
        0x8e, 0xd8, // mov ds, ax
        0xc6, 0x06, 0x00, 0x01, 0x5a, // mov byte [0x100], 0x5a
        0xe4, 0x64, // in al, 0x64
        0xfa, // cli
        0x0f, 0x01, 0x16, 0x00, 0x02, // lgdt [0x200]
        0x0f, 0x20, 0xc0, // mov eax, cr0
        0x66, 0x83, 0xc8, 0x01, // or eax, 1
        0x0f, 0x22, 0xc0, // mov cr0, eax
        0xf4, // hlt
    ];
    put("emu_exec", "real-mode-to-protected", real)?;
    Ok(())
}

/// Register writes (op 1) that take a virtio device through ACKNOWLEDGE, DRIVER, features,
/// FEATURES_OK, queue 0 setup at desc 0x1000 / avail 0x2000 / used 0x3000, DRIVER_OK, then a
/// request written into guest memory (op 4 pokes at guest addresses) and a notify (op 3).
fn mmio_init(flags: u8, request: &[(u16, [u8; 8])]) -> Vec<u8> {
    let mut s = vec![flags];
    let mut w = |off: u16, v: u32| {
        s.push(1);
        s.extend_from_slice(&off.to_le_bytes());
        s.extend_from_slice(&v.to_le_bytes());
    };
    w(0x70, 1); // ACKNOWLEDGE
    w(0x70, 3); // DRIVER
    w(0x24, 1); // driver features sel 1
    w(0x20, 1); // VERSION_1
    w(0x70, 11); // FEATURES_OK
    w(0x30, 0); // queue 0
    w(0x38, 8); // size 8
    w(0x80, 0x1000);
    w(0x90, 0x2000);
    w(0xa0, 0x3000);
    w(0x44, 1); // ready
    w(0x70, 15); // DRIVER_OK
    for (slot, bytes) in request {
        s.push(4);
        s.extend_from_slice(&slot.to_le_bytes()); // address = slot * 0x80
        s.extend_from_slice(bytes);
    }
    s.extend_from_slice(&[3, 0]); // notify queue 0
    s.extend_from_slice(&[0, 0x08, 0x00, 2]); // read device id
    s.extend_from_slice(&[0, 0x00, 0x01, 3]); // read 8 bytes of config
    s
}

fn mmio_seeds() -> Res<()> {
    // One 16-byte descriptor as two 8-byte pokes at `at` and `at + 8`.
    let desc = |at: u16, addr: u64, len: u32, flags: u16, next: u16| -> [(u16, [u8; 8]); 2] {
        let mut hi = [0u8; 8];
        hi[..4].copy_from_slice(&len.to_le_bytes());
        hi[4..6].copy_from_slice(&flags.to_le_bytes());
        hi[6..8].copy_from_slice(&next.to_le_bytes());
        [(at, addr.to_le_bytes()), (at + 8, hi)]
    };
    // Available ring at 0x2000: flags 0, idx 1, ring[0] = descriptor 0.
    let avail = (0x2000u16, [0u8, 0, 1, 0, 0, 0, 0, 0]);
    // virtio-rng: one 64-byte device-writable buffer at 0x4000.
    let mut rng: Vec<(u16, [u8; 8])> = desc(0x1000, 0x4000, 64, 2, 0).to_vec();
    rng.push(avail);
    put("virtio_mmio", "rng-one-request", &mmio_init(0, &rng))?;
    put("virtio_mmio", "rng-init-only", &mmio_init(0, &[]))?;
    // virtio-blk: header (IN, sector 0) -> 512-byte data buffer -> status byte.
    let mut blk: Vec<(u16, [u8; 8])> = Vec::new();
    blk.extend(desc(0x1000, 0x5000, 16, 1, 1));
    blk.extend(desc(0x1010, 0x6000, 512, 3, 2));
    blk.extend(desc(0x1020, 0x7000, 1, 2, 0));
    blk.push((0x5000, [0; 8]));
    blk.push((0x5008, [0; 8]));
    blk.push(avail);
    put("virtio_mmio", "blk-read-sector-0", &mmio_init(1, &blk))?;
    // The same as a write (type 1) on a read-only disk.
    let mut ro = blk.clone();
    ro[6] = (0x5000, [1, 0, 0, 0, 0, 0, 0, 0]);
    ro[3].1[4] = 1; // the data buffer is device-readable for a write
    put("virtio_mmio", "blk-write-readonly", &mmio_init(3, &ro))?;
    Ok(())
}

/// `anyvisor run` as the e2e tests (crates/cli/tests) and the CLI spec run it.
fn cli_seeds() -> Res<()> {
    use vmm::fuzz::args_input;
    let kit = [
        ("backend", "emu"),
        ("kernel", "guest/out/vmlinux"),
        ("initrd", "guest/out/initramfs.cpio.gz"),
        ("memory", "256M"),
        (
            "cmdline",
            "console=ttyS0 quiet reboot=k panic=-1 anyvisor.test=devices",
        ),
    ];
    let mut devices = kit.to_vec();
    devices.extend([
        ("disk", "/tmp/anyvisor-devices/vda.img"),
        ("disk", "/tmp/anyvisor-devices/vdb.qcow2,format=qcow2"),
        (
            "disk",
            "/tmp/anyvisor-devices/vdc.img,readonly=on,format=raw",
        ),
        ("rng", ""),
        ("serial", "null"),
    ]);
    let mut net = kit.to_vec();
    net.extend([("net", "tap=anyv0,mac=52:54:00:12:34:56"), ("cpus", "2")]);
    let mut vsock = kit.to_vec();
    vsock.extend([
        ("vsock", "3,uds=/tmp/anyvisor-vsock/v.sock"),
        ("api-socket", "/tmp/anyvisor-vsock/api.sock"),
        ("seccomp", "log"),
    ]);
    let seeds: [(&str, Vec<u8>); 6] = [
        ("devices", args_input("", &devices)),
        ("net", args_input("", &net)),
        ("vsock", args_input("", &vsock)),
        (
            "config-file-and-flag",
            args_input(
                r#"{"kernel":"/nonexistent/k","cpus":0,"memory":"4G","disk":["a.img"]}"#,
                &[("cpus", "1")],
            ),
        ),
        (
            "restore",
            args_input("", &[("restore", "/tmp/vm.snap"), ("serial", "null")]),
        ),
        (
            "incoming",
            args_input(
                "",
                &[
                    ("incoming", "tcp:127.0.0.1:4444"),
                    ("migration-key", "/tmp/key"),
                    ("backend", "kvm"),
                ],
            ),
        ),
    ];
    for (name, input) in seeds {
        put("cli_args", name, &input)?;
    }
    Ok(())
}

fn main() -> Res<()> {
    cli_seeds()?;
    snapshot_seeds()?;
    migrate_seeds()?;
    api_seeds()?;
    loader_seeds()?;
    emu_seeds()?;
    mmio_seeds()?;
    Ok(())
}
