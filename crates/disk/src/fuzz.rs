//! Entry points for the fuzz targets `fuzz/fuzz_targets/disk_*.rs`, also run by unit tests on
//! mutated images. Each must never panic, hang, or allocate without bound.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{DiskFile, Format, OpenOptions};

/// A private directory (removed on drop) holding the input as `image`: a VMDK descriptor's
/// extents resolve inside it, where nothing else is.
struct TempImage(PathBuf);

impl TempImage {
    fn with(data: &[u8]) -> Option<TempImage> {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "anyvisor-disk-fuzz-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).ok()?;
        let t = TempImage(dir);
        let mut f = std::fs::File::create(t.image()).ok()?;
        f.write_all(data).ok()?;
        Some(t)
    }

    fn image(&self) -> PathBuf {
        self.0.join("image")
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reads a little at the start, middle and end, and where `write` says writes some back.
fn exercise(img: &mut dyn DiskFile, write: bool) {
    let size = img.size();
    let mut buf = vec![0u8; 4096];
    for off in [0, 512, size / 3, size / 2, size.saturating_sub(4096)] {
        let n = size.saturating_sub(off).min(4096) as usize;
        let b = buf.get_mut(..n).unwrap_or_default();
        let _ = img.read_at(off, b);
        if write {
            let m = n.min(700);
            let _ = img.write_at(off, buf.get(..m).unwrap_or_default());
            let _ = img.write_zeroes(off, n as u64);
            let _ = img.discard(off, n as u64);
        }
    }
    // Past the end must fail, not panic.
    let _ = img.read_at(size, &mut buf);
    let _ = img.flush();
}

/// Opens `data` as an image of `format` (or detected, with `None`), read-only and writable, and
/// reads and writes a little of it.
pub fn open_image(data: &[u8], format: Option<Format>) {
    let Some(t) = TempImage::with(data) else {
        return;
    };
    for readonly in [true, false] {
        if let Ok(mut img) = crate::open(
            &t.image(),
            OpenOptions {
                readonly,
                format,
                backing: false,
            },
        ) {
            exercise(img.as_mut(), !readonly);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testutil::{TempDir, need_qemu_img, path_str, run};

    /// Deterministic mutations of a real image made by qemu-img: about 300 bytes of the
    /// first `head` bytes (all when fewer) and 100 after, set to 0x00, 0xff and flipped.
    pub(crate) fn mutate_image(fmt: &str, opts: &str, size: &str, format: Format, head: usize) {
        need_qemu_img();
        let dir = TempDir::new("fuzzm");
        let p = dir.path("f.img");
        let mut args = vec!["create", "-q", "-f", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([path_str(&p), size]);
        run("qemu-img", &args);
        // Stream-optimized VMDKs take whole grains only.
        let write = if opts.contains("streamOptimized") {
            "write -P 0x5a 0 64k"
        } else {
            "write -P 0x5a 0 8k"
        };
        run("qemu-io", &["-f", fmt, "-c", write, path_str(&p)]);
        let orig = std::fs::read(&p).unwrap();
        let mut count = 0;
        // About 300 header bytes and 100 places in the rest (mostly data).
        let head = head.min(orig.len());
        let step = (orig.len().saturating_sub(head) / 100).max(7);
        let positions: Vec<usize> = (0..head)
            .step_by((head / 300).max(1))
            .chain((head..orig.len()).step_by(step))
            .collect();
        for &i in &positions {
            for f in [|_: u8| 0u8, |_: u8| 0xffu8, |b: u8| b ^ 0x80] {
                let mut m = orig.clone();
                m[i] = f(m[i]);
                open_image(&m, Some(format));
                count += 1;
            }
        }
        assert!(count > 300, "{count} mutations");
    }

    #[test]
    fn qcow2_open_survives_mutations() {
        mutate_image("qcow2", "cluster_size=512", "256k", Format::Qcow2, 112);
    }
}
