//! Test helpers: temporary directories, patterns, and qemu-img / qemu-io runs.

// Test images are small and built here: their sizes and offsets fit every integer type.
#![allow(clippy::cast_possible_truncation)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "anyvisor-disk-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A deterministic byte pattern.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i >> 9) as u8))
        .collect()
}

/// The format tests compare with qemu-img and qemu-io: without them they fail (not pass), and
/// say how to install them.
pub fn need_qemu_img() {
    for tool in ["qemu-img", "qemu-io"] {
        let ok = std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            ok,
            "{tool} is not installed: these tests need it (scripts/setup.sh installs qemu-utils)"
        );
    }
}

/// Runs qemu-img or qemu-io with `args`, panicking with its output on failure.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd} {args:?} failed: {text}");
    text
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// A raw image of `size` bytes: a pattern, with whole zero MiBs (every third) so converted
/// images have unallocated blocks, and a short zero run inside data.
pub fn raw_source(dir: &TempDir, size: usize) -> (PathBuf, Vec<u8>) {
    let mut data = pattern(size, 7);
    for (i, chunk) in data.chunks_mut(1 << 20).enumerate() {
        if i % 3 == 1 {
            chunk.fill(0);
        }
    }
    if let Some(s) = data.get_mut(5000..9096) {
        s.fill(0);
    }
    let p = dir.path("source.raw");
    std::fs::write(&p, &data).unwrap();
    (p, data)
}

/// `qemu-img convert -f raw -O fmt [-o opts] raw out`.
pub fn convert(raw: &Path, fmt: &str, opts: &str, out: &Path) {
    let mut args = vec!["convert", "-f", "raw", "-O", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([path_str(raw), path_str(out)]);
    run("qemu-img", &args);
}

/// `qemu-img create -f fmt [-o opts] out size`.
pub fn create(fmt: &str, opts: &str, out: &Path, size: &str) {
    let mut args = vec!["create", "-q", "-f", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([path_str(out), size]);
    run("qemu-img", &args);
}

/// Opens `path` (format detected) and checks it presents exactly `expect`: read whole, and in
/// odd-sized pieces that straddle every block boundary.
pub fn check_reads(path: &Path, format: crate::Format, expect: &[u8]) {
    let mut img = crate::open(path, crate::OpenOptions::readonly(true)).unwrap();
    assert_eq!(img.format(), format, "{}", path.display());
    assert_eq!(img.size(), expect.len() as u64, "virtual size");
    let mut all = vec![0u8; expect.len()];
    img.read_at(0, &mut all).unwrap();
    assert!(all == expect, "whole-disk read differs from the source");
    let mut pos = 0usize;
    let mut n = 1000usize;
    while pos < expect.len() {
        let len = n.min(expect.len() - pos);
        let mut b = vec![0xa5u8; len];
        img.read_at(pos as u64, &mut b).unwrap();
        assert!(
            b[..] == expect[pos..pos + len],
            "read of {len} at {pos} differs"
        );
        pos += len;
        n = n * 7 % 70_001 + 333;
    }
    let mut b = [0u8; 1];
    assert!(
        img.read_at(expect.len() as u64, &mut b).is_err(),
        "read past the end"
    );
    check_map(img.as_mut(), expect);
}

/// Walks the disk with `DiskFile::map` (in pieces of up to 1 MiB starting at odd offsets):
/// file ranges hold the expected bytes, zero ranges are zeros.
pub fn check_map(img: &mut dyn crate::DiskFile, expect: &[u8]) {
    use std::os::unix::fs::FileExt;
    let mut pos = 0u64;
    let mut want = 1000u64;
    while pos < expect.len() as u64 {
        let len = want.min(expect.len() as u64 - pos);
        let m = img.map(pos, len, false).unwrap();
        let n = match m {
            crate::Mapping::File {
                file,
                offset,
                len: n,
            } => {
                let mut b = vec![0u8; n as usize];
                file.read_exact_at(&mut b, offset).unwrap();
                assert!(
                    b[..] == expect[pos as usize..(pos + n) as usize],
                    "mapped file bytes at {pos}"
                );
                n
            }
            crate::Mapping::Zero { len: n } => {
                assert!(
                    expect[pos as usize..(pos + n) as usize]
                        .iter()
                        .all(|&x| x == 0),
                    "zero map at {pos}"
                );
                n
            }
            crate::Mapping::Other { len: n } => n,
        };
        assert!(n > 0 && n <= len, "map answered {n} of {len}");
        pos += n;
        want = want * 3 % (1 << 20) + 511;
    }
}

/// Writes into `img` (a writable image of `expect.len()` bytes) aligned and unaligned pieces,
/// into allocated and unallocated areas, mirroring them into `expect`.
pub fn write_pattern(img: &mut dyn crate::DiskFile, expect: &mut [u8]) {
    let size = expect.len();
    let writes = [
        (0usize, 4096usize, 1u8),
        ((1 << 20) + 512, 8192, 2),
        ((1 << 20) + 3, 1000, 3),
        (size - 4096, 4096, 4),
        (size / 2 - 77, 300_000, 5),
        ((2 << 20) - 512, 1024, 6),
    ];
    for (off, len, seed) in writes {
        let data = pattern(len, seed);
        img.write_at(off as u64, &data).unwrap();
        expect[off..off + len].copy_from_slice(&data);
    }
    img.write_zeroes(100_000, 5000).unwrap();
    expect[100_000..105_000].fill(0);
    img.flush().unwrap();
    let mut all = vec![0u8; size];
    img.read_at(0, &mut all).unwrap();
    assert!(all == expect, "our own reads after writing differ");
}

/// qemu agrees: `qemu-img compare` with the expected raw content, and `qemu-img check` clean
/// where the format has a checker.
pub fn qemu_agrees(dir: &TempDir, img: &Path, fmt: &str, expect: &[u8], has_check: bool) {
    let raw = dir.path("expect.raw");
    std::fs::write(&raw, expect).unwrap();
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            fmt,
            "-F",
            "raw",
            path_str(img),
            path_str(&raw),
        ],
    );
    if has_check {
        run("qemu-img", &["check", "-f", fmt, path_str(img)]);
    }
}

/// Writes `bytes` at `at` in the file `path`.
pub fn patch(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

/// Opens `path` and returns the error report (every source joined by ": ").
pub fn open_error(path: &Path, readonly: bool) -> String {
    match crate::open(path, crate::OpenOptions::readonly(readonly)) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(c) = src {
                s.push_str(": ");
                s.push_str(&c.to_string());
                src = c.source();
            }
            s
        }
    }
}

/// The disk as qemu sees it (`qemu-img convert -f fmt -O raw`).
pub fn qemu_view(dir: &TempDir, img: &Path, fmt: &str) -> Vec<u8> {
    let out = dir.path("qemu-view.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            fmt,
            "-O",
            "raw",
            path_str(img),
            path_str(&out),
        ],
    );
    std::fs::read(&out).unwrap()
}
