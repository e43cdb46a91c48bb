//! Write and restore timings for mostly-zero guests.
//!
//! `cargo run --release -p snapshot --example snapshot_bench [DIR]` (DIR defaults to the system
//! temp dir). For 256 MiB and 2 GiB guests with one page in 64 written: write time, apparent and
//! allocated file size, open + map time (restore), and the cost of `verify_memory`.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Instant;

use snapshot::{Header, SnapshotContents, SnapshotReader, SnapshotWriter, memory_regions_of};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    for size in [256u64 << 20, 2 << 30] {
        let mem: hv::GuestMemory =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)])?;
        let mut page = 0u64;
        while page * 4096 < size {
            mem.write_slice(&page.to_le_bytes(), GuestAddress(page * 4096 + 8))?;
            page += 64;
        }
        let contents = SnapshotContents {
            header: Header {
                cpu_model: hv::CpuModel::portable(),
                memory_regions: memory_regions_of(&mem),
                vcpus: 4,
                backend: hv::BackendKind::Kvm,
                tsc_khz: 2_000_000,
                created_unix: snapshot::now_unix(),
                config: serde_json::json!({}),
                user_extra: Default::default(),
            },
            vcpus: vec![hv::CpuState::default(); 4],
            vm: hv::VmState::default(),
            devices: vec![("platform".into(), serde_json::json!({}))],
        };
        let path = dir.join(format!("anyvisor-bench-{}.snap", std::process::id()));

        let t = Instant::now();
        let summary = SnapshotWriter::write(&path, &contents, &mem)?;
        let write = t.elapsed();
        let md = std::fs::metadata(&path)?;

        let t = Instant::now();
        let reader = SnapshotReader::open(&path)?;
        let restored = reader.map_memory()?;
        let restore = t.elapsed();

        let mut b = [0u8; 8];
        restored.read_slice(&mut b, GuestAddress(64 * 4096 + 8))?;
        assert_eq!(u64::from_le_bytes(b), 64);

        let t = Instant::now();
        reader.verify_memory()?;
        let verify = t.elapsed();

        println!(
            "{:>5} MiB guest, {} pages stored: write {:>7.1} ms, file {} MiB apparent / {:.1} MiB allocated, open+map {:.2} ms, verify {:.1} ms",
            size >> 20,
            summary.stored_pages,
            write.as_secs_f64() * 1e3,
            md.len() >> 20,
            (md.blocks() * 512) as f64 / (1 << 20) as f64,
            restore.as_secs_f64() * 1e3,
            verify.as_secs_f64() * 1e3,
        );
        drop(restored);
        drop(reader);
        std::fs::remove_file(&path)?;
    }
    Ok(())
}
