//! Entry points for the fuzz targets in `fuzz/fuzz_targets/virtio_*.rs`, also run by unit tests
//! on mutated inputs. Each must never panic, hang, or allocate without bound.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::block::disk::{self, Format};
use crate::{Block, GuestMemory, VirtioDevice};

/// A file removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn with(data: &[u8]) -> Option<TempFile> {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "anyvisor-fuzz-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let mut f = std::fs::File::create(&p).ok()?;
        f.write_all(data).ok()?;
        Some(TempFile(p))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Opens `data` as a qcow2 image read-only and writable, and reads and writes a little of it.
pub fn qcow2_open(data: &[u8]) {
    let Some(file) = TempFile::with(data) else {
        return;
    };
    for readonly in [true, false] {
        let Ok(mut img) = disk::open(&file.0, readonly, Some(Format::Qcow2)) else {
            continue;
        };
        let size = img.size();
        let mut buf = vec![0u8; 4096];
        for off in [0, size / 2, size.saturating_sub(4096)] {
            let n = size.saturating_sub(off).min(4096) as usize;
            let _ = img.read_at(off, &mut buf[..n]);
            if !readonly {
                let _ = img.write_at(off, &buf[..n.min(700)]);
                let _ = img.write_zeroes(off, n as u64);
            }
        }
    }
}

/// Runs a virtio-blk queue over guest memory whose first 64 KiB are `data`: descriptor table at
/// 0, available ring at 0x100, used ring at 0x200, queue size 16, over an 8 KiB raw disk.
pub fn blk_queue(data: &[u8]) {
    let Ok(mem) = GuestMemory::from_ranges(&[(GuestAddress(0), 0x1_0000)]) else {
        return;
    };
    let n = data.len().min(0x1_0000);
    if mem.write_slice(&data[..n], GuestAddress(0)).is_err() {
        return;
    }
    let Some(file) = TempFile::with(&[0u8; 8192]) else {
        return;
    };
    let Ok(mut dev) = Block::new(crate::BlockConfig {
        path: file.0.clone(),
        readonly: data.first().is_some_and(|b| b & 1 == 1),
        format: Some(Format::Raw),
    }) else {
        return;
    };
    let Ok(mut q) = Queue::new(16) else { return };
    let _ = q.try_set_desc_table_address(GuestAddress(0));
    let _ = q.try_set_avail_ring_address(GuestAddress(0x100));
    let _ = q.try_set_used_ring_address(GuestAddress(0x200));
    q.set_event_idx(data.get(1).is_some_and(|b| b & 1 == 1));
    q.set_ready(true);
    let _ = dev.process_queue(0, &mut q, &mem);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{TempDir, have_qemu_img, path_str, run};

    /// Deterministic mutations of a real image: every header byte, and bytes of the L1, L2 and
    /// refcount structures, set to 0x00, 0xff and flipped.
    #[test]
    fn qcow2_open_survives_mutations() {
        if !have_qemu_img("qcow2_open_survives_mutations") {
            return;
        }
        let dir = TempDir::new("fuzzq");
        let p = dir.path("f.qcow2");
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=512",
                path_str(&p),
                "256k",
            ],
        );
        run(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x5a 0 8k", path_str(&p)],
        );
        let orig = std::fs::read(&p).unwrap();
        let mut count = 0;
        let positions: Vec<usize> = (0..112).chain((512..orig.len()).step_by(7)).collect();
        for &i in &positions {
            for f in [|_: u8| 0u8, |_: u8| 0xffu8, |b: u8| b ^ 0x80] {
                let mut m = orig.clone();
                m[i] = f(m[i]);
                qcow2_open(&m);
                count += 1;
            }
        }
        assert!(count > 300);
    }

    #[test]
    fn blk_queue_survives_patterns() {
        let mut data = vec![0u8; 0x1_0000];
        for seed in 0..200u32 {
            let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
            for b in data.iter_mut().take(0x400) {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *b = x as u8;
            }
            // Keep the available index small enough some of the time so chains get walked.
            data[0x102] = (seed % 20) as u8;
            data[0x103] = 0;
            blk_queue(&data);
        }
    }
}
