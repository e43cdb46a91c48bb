//! Shared helpers: a sample VM, scratch directories, and a minimal independent encoder of the
//! file layout (built from docs/snapshot-format.md) to craft files the writer never produces.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use snapshot::{Header, SnapshotContents, memory_regions_of};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// A directory under the cargo tmp dir, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "snap-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn memory(ranges: &[(u64, usize)]) -> hv::GuestMemory {
    let r: Vec<(GuestAddress, usize)> = ranges.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    GuestMemoryMmap::from_ranges(&r).unwrap()
}

/// Two regions (1 MiB at 0, 64 KiB at 4 GiB) with a few patterned pages, rest zero.
pub fn small_memory() -> hv::GuestMemory {
    let m = memory(&[(0, 1 << 20), (1 << 32, 64 << 10)]);
    m.write_slice(&[0xaa; 4096], GuestAddress(0)).unwrap();
    m.write_slice(&[1, 2, 3], GuestAddress(0x5003)).unwrap();
    m.write_slice(&[0x55; 8192], GuestAddress(0xf_e000))
        .unwrap();
    m.write_slice(&[7], GuestAddress((1 << 32) + 0xffff))
        .unwrap();
    m
}

pub fn contents_for(memory: &hv::GuestMemory, vcpus: u32) -> SnapshotContents {
    let vcpu_states = (0..vcpus)
        .map(|i| {
            let mut s = hv::CpuState::default();
            s.regs.rip = 0xffff_0000 + u64::from(i);
            s.regs.rax = 0x1234_5678_9abc_def0;
            s.sregs.cr0 = 0x8000_0011;
            s.set_msr(hv::msr::IA32_TSC, 1_000_000 * u64::from(i));
            s.set_msr(hv::msr::IA32_LSTAR, 0xffff_ffff_8100_0000);
            s.lapic.set(hv::LapicState::ID, i << 24);
            s.fpu.xmm[3] = [9; 16];
            s
        })
        .collect();
    SnapshotContents {
        header: Header {
            cpu_model: hv::CpuModel::portable(),
            memory_regions: memory_regions_of(memory),
            vcpus,
            backend: hv::BackendKind::Kvm,
            tsc_khz: 2_500_000,
            created_unix: 1_700_000_000,
            config: serde_json::json!({"cmdline": "console=ttyS0", "disks": ["/tmp/a.img"]}),
            user_extra: Default::default(),
        },
        vcpus: vcpu_states,
        vm: hv::VmState {
            clock_ns: 123_456_789,
            tsc_khz: 2_500_000,
            user_extra: [hv::cpu_model::Feature::Avx512f, hv::cpu_model::Feature::Sha]
                .into_iter()
                .collect(),
        },
        devices: vec![
            ("platform".into(), serde_json::json!({"ioapic": [1, 2, 3]})),
            (
                "virtio-blk0".into(),
                serde_json::json!({"features": 0x1_0000_0000u64, "queues": []}),
            ),
        ],
    }
}

// ---- An independent encoder of the layout, for crafting files. ----

pub const END: u32 = 0xff;
pub const MEMORY: u32 = 5;

#[derive(Clone, Debug)]
pub struct Section {
    pub offset: u64,
    pub tag: u32,
    pub flags: u32,
    pub payload: Vec<u8>,
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().unwrap())
}
fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}

/// Splits a valid file into (major, minor), its sections (up to and including end), and the
/// RAM image.
pub fn split(bytes: &[u8]) -> ((u32, u32), Vec<Section>, Vec<u8>) {
    let version = (le32(&bytes[8..]), le32(&bytes[12..]));
    let mut off = 24usize;
    let mut sections = Vec::new();
    let mut image_offset = 0;
    loop {
        let tag = le32(&bytes[off..]);
        let flags = le32(&bytes[off + 4..]);
        let len = le64(&bytes[off + 8..]) as usize;
        let payload = bytes[off + 20..off + 20 + len].to_vec();
        if tag == MEMORY {
            image_offset = le64(&payload) as usize;
        }
        sections.push(Section {
            offset: off as u64,
            tag,
            flags,
            payload,
        });
        off += 20 + len;
        if tag == END {
            break;
        }
    }
    (version, sections, bytes[image_offset..].to_vec())
}

pub fn section_header(tag: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&tag.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h), payload);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

/// Lays out a file from parts: fresh checksums, the memory section's image offset patched.
pub fn join(version: (u32, u32), sections: &[Section], image: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"ANYVSNAP");
    out.extend_from_slice(&version.0.to_le_bytes());
    out.extend_from_slice(&version.1.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    let meta: usize = 24 + sections.iter().map(|s| 20 + s.payload.len()).sum::<usize>();
    let image_offset = meta.div_ceil(4096) * 4096;
    for s in sections {
        let mut p = s.payload.clone();
        if s.tag == MEMORY && p.len() >= 8 {
            p[..8].copy_from_slice(&(image_offset as u64).to_le_bytes());
        }
        out.extend_from_slice(&section_header(s.tag, s.flags, &p));
        out.extend_from_slice(&p);
    }
    out.resize(image_offset, 0);
    out.extend_from_slice(image);
    out
}

pub fn write_small(dir: &Scratch) -> (PathBuf, SnapshotContents, hv::GuestMemory) {
    let mem = small_memory();
    let contents = contents_for(&mem, 2);
    let path = dir.path("vm.snap");
    snapshot::SnapshotWriter::write(&path, &contents, &mem).unwrap();
    (path, contents, mem)
}
