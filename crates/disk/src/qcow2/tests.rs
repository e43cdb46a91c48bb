//! qcow2 against qemu-img: images qemu makes read as `qemu-img convert -O raw` says, images we
//! write pass `qemu-img check` and convert to our bytes. They fail without qemu-img
//! (`scripts/setup.sh` installs qemu-utils).

// Test images are small and built here: their sizes and offsets fit every integer type.
#![allow(clippy::cast_possible_truncation)]

use std::fs::OpenOptions;

use super::*;
use crate::testutil::{TempDir, need_qemu_img, path_str, pattern, run};

fn open(
    path: &Path,
    readonly: bool,
    format: Option<Format>,
) -> Result<Box<dyn DiskFile>, crate::Error> {
    crate::open(
        path,
        crate::OpenOptions {
            readonly,
            format,
            backing: true,
        },
    )
}

fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

fn qemu_io(path: &Path, fmt: &str, cmd: &str) {
    run("qemu-io", &["-f", fmt, "-c", cmd, path_str(path)]);
}

fn create(path: &Path, size: &str, opts: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([path_str(path), size]);
    qemu_img(&args);
}

/// The disk as qemu sees it.
fn qemu_raw(dir: &TempDir, path: &Path) -> Vec<u8> {
    let out = dir.path("converted.raw");
    qemu_img(&["convert", "-O", "raw", path_str(path), path_str(&out)]);
    std::fs::read(&out).unwrap()
}

fn check_clean(path: &Path) {
    let out = std::process::Command::new("qemu-img")
        .args(["check", path_str(path)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn read_all(img: &mut dyn DiskFile) -> Vec<u8> {
    let mut v = vec![0u8; img.size() as usize];
    img.read_at(0, &mut v).unwrap();
    v
}

fn open_rw(path: &Path) -> Box<dyn DiskFile> {
    open(path, false, Some(Format::Qcow2)).unwrap()
}

fn open_q(path: &Path, readonly: bool) -> Result<Qcow2, Error> {
    let f = OpenOptions::new()
        .read(true)
        .write(!readonly)
        .open(path)
        .unwrap();
    Qcow2::open(f, path, readonly, &mut Walk::new(true))
}

#[test]
fn qemu_images_read_like_qemu_says() {
    need_qemu_img();
    for (cluster, opts) in [
        ("512", "cluster_size=512"),
        ("4k", "cluster_size=4096"),
        ("64k", ""),
        ("2M", "cluster_size=2M"),
        ("v2", "compat=0.10"),
        ("rc1", "refcount_bits=1"),
        ("rc64", "refcount_bits=64"),
    ] {
        let dir = TempDir::new("q2read");
        let p = dir.path("a.qcow2");
        create(&p, "9M", opts);
        qemu_io(&p, "qcow2", "write -P 0xab 0 1M");
        qemu_io(&p, "qcow2", "write -P 0xcd 3000k 100k");
        qemu_io(&p, "qcow2", "write -P 0x11 8M 1M");
        qemu_io(&p, "qcow2", "write -z 512k 128k");
        let expected = qemu_raw(&dir, &p);
        let mut img = open(&p, true, None).unwrap();
        assert_eq!(img.size(), 9 << 20, "{cluster}");
        assert!(
            read_all(img.as_mut()) == expected,
            "{cluster}: content differs"
        );
        // The direct-I/O mapping agrees with the content.
        crate::testutil::check_map(img.as_mut(), &expected);
        // Unaligned small reads too.
        let mut b = vec![0u8; 1000];
        img.read_at(3000 * 1024 - 500, &mut b).unwrap();
        assert!(
            b == expected[3000 * 1024 - 500..3000 * 1024 + 500],
            "{cluster}"
        );
    }
}

/// Our writes, then `qemu-img check` must be clean and qemu must see our bytes.
fn write_and_verify(opts: &str, size: u64, writes: &[(u64, usize, u8)]) {
    let dir = TempDir::new("q2write");
    let p = dir.path("w.qcow2");
    create(&p, &size.to_string(), opts);
    let mut expected = vec![0u8; size as usize];
    {
        let mut img = open_rw(&p);
        for &(off, len, seed) in writes {
            let data = pattern(len, seed);
            img.write_at(off, &data).unwrap();
            expected[off as usize..off as usize + len].copy_from_slice(&data);
        }
        img.flush().unwrap();
        assert!(
            read_all(img.as_mut()) == expected,
            "{opts}: our read-back differs"
        );
    }
    check_clean(&p);
    assert!(
        qemu_raw(&dir, &p) == expected,
        "{opts}: qemu sees other bytes"
    );
    // Reopen: everything persisted.
    let mut img = open(&p, true, None).unwrap();
    assert!(read_all(img.as_mut()) == expected);
}

#[test]
fn writes_pass_qemu_img_check() {
    need_qemu_img();
    let writes = [
        (0, 4096, 1),
        (100, 50, 2),                   // partial, inside an allocated cluster
        (65536 - 10, 20, 3),            // across a cluster boundary
        (1 << 20, 200_000, 4),          // many clusters
        ((4 << 20) - 512, 512, 5),      // the last sector
        ((2 << 20) + 12345, 70_000, 6), // unaligned start and end
    ];
    for opts in [
        "",
        "cluster_size=512",
        "cluster_size=4096",
        "cluster_size=2M",
        "compat=0.10",
        "refcount_bits=1",
        "refcount_bits=8",
        "refcount_bits=64",
    ] {
        write_and_verify(opts, 4 << 20, &writes);
    }
}

#[test]
fn overwrite_qemu_written_data() {
    need_qemu_img();
    let dir = TempDir::new("q2over");
    let p = dir.path("o.qcow2");
    create(&p, "2M", "cluster_size=4096");
    qemu_io(&p, "qcow2", "write -P 0xab 0 1M");
    qemu_io(&p, "qcow2", "write -z 8k 8k");
    let mut expected = qemu_raw(&dir, &p);
    {
        let mut img = open_rw(&p);
        // In place, into a zero-flag cluster, and into unallocated space.
        for (off, len) in [(10usize, 100usize), (8192 + 7, 3000), ((1 << 20) + 5, 9000)] {
            let data = pattern(len, 9);
            img.write_at(off as u64, &data).unwrap();
            expected[off..off + len].copy_from_slice(&data);
        }
        img.flush().unwrap();
    }
    check_clean(&p);
    assert!(qemu_raw(&dir, &p) == expected);
}

#[test]
fn refcount_table_grows() {
    need_qemu_img();
    // 512-byte clusters: a refcount block covers 128 KiB and one table cluster 8 MiB of file,
    // so 12 MiB of data needs a larger table (and many new refcount blocks).
    let dir = TempDir::new("q2grow");
    let p = dir.path("g.qcow2");
    create(&p, "16M", "cluster_size=512");
    let before = open_q(&p, true).unwrap().reftable.len();
    let data = pattern(12 << 20, 3);
    {
        let mut img = open_rw(&p);
        img.write_at(0, &data).unwrap();
        img.flush().unwrap();
    }
    let after = open_q(&p, true).unwrap();
    assert!(after.reftable.len() > before, "table did not grow");
    check_clean(&p);
    let out = qemu_raw(&dir, &p);
    assert!(out[..12 << 20] == data[..]);
    assert!(out[12 << 20..].iter().all(|&b| b == 0));
}

#[test]
fn refcounts_of_new_clusters_are_one() {
    need_qemu_img();
    let dir = TempDir::new("q2rc");
    let p = dir.path("r.qcow2");
    create(&p, "1M", "cluster_size=4096");
    let mut q = open_q(&p, false).unwrap();
    let first_new = q.end;
    q.write_at(0, &[1u8; 10]).unwrap();
    // One L2 table and one data cluster.
    assert_eq!(q.end, first_new + 2 * 4096);
    assert_eq!(q.refcount(first_new / 4096).unwrap(), 1);
    assert_eq!(q.refcount(first_new / 4096 + 1).unwrap(), 1);
    assert_eq!(q.refcount(first_new / 4096 + 2).unwrap(), 0);
}

#[test]
fn backing_file_reads_and_copy_on_write() {
    need_qemu_img();
    let dir = TempDir::new("q2back");
    let base = dir.path("base.raw");
    let base_data = pattern(3 << 20, 42);
    std::fs::write(&base, &base_data).unwrap();
    let mid = dir.path("mid.qcow2");
    // Relative backing names resolve against the image's directory.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        path_str(&mid),
        "4M",
    ]);
    qemu_io(&mid, "qcow2", "write -P 0x77 64k 64k");
    let top = dir.path("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        path_str(&top),
    ]);
    let mut expected = qemu_raw(&dir, &top);
    assert_eq!(expected[..4096], base_data[..4096]);
    {
        let mut img = open_rw(&top);
        assert_eq!(img.size(), 4 << 20);
        assert!(read_all(img.as_mut()) == expected, "backing chain read");
        // Partial cluster writes: the rest of each cluster comes from the backing chain.
        for (off, len) in [
            (100usize, 10usize),
            (65536 + 4000, 200),
            ((3 << 20) - 50, 100),
        ] {
            let data = pattern(len, 1);
            img.write_at(off as u64, &data).unwrap();
            expected[off..off + len].copy_from_slice(&data);
        }
        // A whole cluster of zeros hides the backing data.
        img.write_zeroes(8192, 4096).unwrap();
        expected[8192..12288].fill(0);
        img.flush().unwrap();
        assert!(read_all(img.as_mut()) == expected);
    }
    check_clean(&top);
    assert!(qemu_raw(&dir, &top) == expected, "qemu sees other bytes");
    // The backing files are untouched.
    assert!(std::fs::read(&base).unwrap() == base_data);
}

#[test]
fn write_zeroes_and_discard() {
    need_qemu_img();
    for opts in ["cluster_size=4096", "compat=0.10,cluster_size=4096"] {
        let dir = TempDir::new("q2zero");
        let p = dir.path("z.qcow2");
        create(&p, "1M", opts);
        qemu_io(&p, "qcow2", "write -P 0xab 0 1M");
        let mut expected = vec![0xabu8; 1 << 20];
        {
            let mut img = open_rw(&p);
            img.write_zeroes(4096, 8192).unwrap(); // whole clusters
            img.write_zeroes(20000, 100).unwrap(); // partial
            expected[4096..4096 + 8192].fill(0);
            expected[20000..20100].fill(0);
            // Rewrite part of a zeroed cluster: the rest stays zero.
            img.write_at(4096 + 10, &[1, 2, 3]).unwrap();
            expected[4096 + 10..4096 + 13].copy_from_slice(&[1, 2, 3]);
            img.discard(65536, 65536).unwrap();
            img.flush().unwrap();
            let got = read_all(img.as_mut());
            // Discarded content is unspecified: compare around it.
            assert!(got[..65536] == expected[..65536], "{opts}");
            assert!(got[131072..] == expected[131072..], "{opts}");
            expected[65536..131072].copy_from_slice(&got[65536..131072]);
        }
        check_clean(&p);
        assert!(qemu_raw(&dir, &p) == expected, "{opts}");
    }
}

// ---- refused images ----

#[test]
fn compressed_images_are_refused() {
    need_qemu_img();
    let dir = TempDir::new("q2comp");
    let raw = dir.path("src.raw");
    std::fs::write(&raw, vec![0x61u8; 1 << 20]).unwrap();
    let p = dir.path("c.qcow2");
    qemu_img(&["convert", "-c", "-O", "qcow2", path_str(&raw), path_str(&p)]);
    assert!(matches!(open_q(&p, true), Err(Error::Compressed)));
}

#[test]
fn encrypted_images_are_refused() {
    need_qemu_img();
    let dir = TempDir::new("q2enc");
    let p = dir.path("e.qcow2");
    create(&p, "1M", "");
    patch(&p, 32, &1u32.to_be_bytes());
    assert!(matches!(open_q(&p, true), Err(Error::Encrypted)));
}

#[test]
fn snapshots_allow_read_only_opening_only() {
    need_qemu_img();
    let dir = TempDir::new("q2snap");
    let p = dir.path("s.qcow2");
    create(&p, "1M", "");
    qemu_io(&p, "qcow2", "write -P 0x12 0 64k");
    qemu_img(&["snapshot", "-c", "snap1", path_str(&p)]);
    qemu_io(&p, "qcow2", "write -P 0x34 0 4k");
    assert!(matches!(open_q(&p, false), Err(Error::Snapshots)));
    let mut q = open_q(&p, true).unwrap();
    assert!(read_all(&mut q) == qemu_raw(&dir, &p));
}

#[test]
fn dirty_images_open_read_only_only() {
    need_qemu_img();
    let dir = TempDir::new("q2dirty");
    let p = dir.path("d.qcow2");
    create(&p, "1M", "");
    patch(&p, 72, &1u64.to_be_bytes());
    assert!(matches!(open_q(&p, false), Err(Error::Dirty)));
    assert!(open_q(&p, true).is_ok());
}

#[test]
fn autoclear_bits_are_cleared_when_writing() {
    need_qemu_img();
    let dir = TempDir::new("q2auto");
    let p = dir.path("a.qcow2");
    create(&p, "1M", "");
    patch(&p, 88, &1u64.to_be_bytes());
    drop(open_q(&p, false).unwrap());
    let b = std::fs::read(&p).unwrap();
    assert_eq!(b[88..96], [0; 8]);
}

#[test]
fn backing_loop_is_refused() {
    need_qemu_img();
    let dir = TempDir::new("q2loop");
    let a = dir.path("a.qcow2");
    let b = dir.path("b.qcow2");
    create(&b, "1M", "");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        path_str(&a),
    ]);
    // Point b back at a (same name length as qemu wrote for a: rewrite b's header by hand).
    qemu_img(&["rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", path_str(&b)]);
    let e = open_q(&a, true).err().expect("loop accepted");
    let msg = format!("{e:?}");
    assert!(msg.contains("Loop"), "{msg}");
    // A missing backing file is a clear error too.
    std::fs::remove_file(&b).unwrap();
    assert!(matches!(open_q(&a, true), Err(Error::Backing { .. })));
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

#[test]
fn corrupt_headers_are_clear_errors() {
    need_qemu_img();
    let dir = TempDir::new("q2corrupt");
    let good = dir.path("good.qcow2");
    create(&good, "1M", "");
    qemu_io(&good, "qcow2", "write -P 0xab 0 64k");
    let orig = std::fs::read(&good).unwrap();
    let l1_off = u64::from_be_bytes(orig[40..48].try_into().unwrap());
    let l1e = u64::from_be_bytes(
        orig[l1_off as usize..l1_off as usize + 8]
            .try_into()
            .unwrap(),
    );
    let l2_off = l1e & OFFSET_MASK;
    type Case = (&'static str, u64, Vec<u8>);
    let cases: Vec<Case> = vec![
        ("magic", 0, b"QFI\0".to_vec()),
        ("version 1", 4, 1u32.to_be_bytes().to_vec()),
        ("version 4", 4, 4u32.to_be_bytes().to_vec()),
        ("cluster bits 8", 20, 8u32.to_be_bytes().to_vec()),
        ("cluster bits 22", 20, 22u32.to_be_bytes().to_vec()),
        ("cluster bits huge", 20, u32::MAX.to_be_bytes().to_vec()),
        ("virtual size absurd", 24, u64::MAX.to_be_bytes().to_vec()),
        (
            "virtual size beyond L1",
            24,
            (1u64 << 40).to_be_bytes().to_vec(),
        ),
        ("l1 size huge", 36, u32::MAX.to_be_bytes().to_vec()),
        (
            "l1 offset outside file",
            40,
            (1u64 << 40).to_be_bytes().to_vec(),
        ),
        (
            "l1 offset unaligned",
            40,
            (l1_off + 8).to_be_bytes().to_vec(),
        ),
        (
            "reftable outside file",
            48,
            (1u64 << 50).to_be_bytes().to_vec(),
        ),
        (
            "reftable clusters huge",
            56,
            u32::MAX.to_be_bytes().to_vec(),
        ),
        ("reftable clusters zero", 56, 0u32.to_be_bytes().to_vec()),
        (
            "backing name outside file",
            8,
            (1u64 << 40).to_be_bytes().to_vec(),
        ),
        (
            "unknown incompatible bit",
            72,
            (1u64 << 40).to_be_bytes().to_vec(),
        ),
        ("external data file", 72, 4u64.to_be_bytes().to_vec()),
        ("extended L2", 72, 16u64.to_be_bytes().to_vec()),
        ("refcount order 7", 96, 7u32.to_be_bytes().to_vec()),
        ("header length short", 100, 50u32.to_be_bytes().to_vec()),
        ("header length huge", 100, u32::MAX.to_be_bytes().to_vec()),
        (
            "L1 entry outside file",
            l1_off,
            ((1u64 << 50) | COPIED).to_be_bytes().to_vec(),
        ),
        (
            "L1 entry reserved bits",
            l1_off,
            (l1e | 1).to_be_bytes().to_vec(),
        ),
        (
            "L2 entry compressed",
            l2_off,
            (COMPRESSED | 0x1000).to_be_bytes().to_vec(),
        ),
        (
            "L2 entry reserved bits",
            l2_off,
            (COPIED | 0x10000 | 2).to_be_bytes().to_vec(),
        ),
    ];
    for (name, at, bytes) in cases {
        let p = dir.path("bad.qcow2");
        std::fs::write(&p, &orig).unwrap();
        patch(&p, at, &bytes);
        for readonly in [true, false] {
            match open_q(&p, readonly) {
                Ok(_) => panic!("{name}: accepted"),
                Err(e) => {
                    // Short, printable, no panic.
                    let msg = e.to_string();
                    assert!(!msg.is_empty() && msg.len() < 200, "{name}: {msg}");
                }
            }
        }
    }
    // Truncated files.
    for len in [0usize, 4, 71, 100, 1000, orig.len() / 2] {
        let p = dir.path("short.qcow2");
        std::fs::write(&p, &orig[..len]).unwrap();
        assert!(open_q(&p, true).is_err(), "truncated to {len}");
    }
    // The untouched image still opens.
    open_q(&good, false).unwrap();
}

#[test]
fn access_beyond_virtual_size_fails() {
    need_qemu_img();
    let dir = TempDir::new("q2range");
    let p = dir.path("r.qcow2");
    create(&p, "1M", "");
    let mut img = open_rw(&p);
    let mut b = [0u8; 512];
    assert!(img.read_at(1 << 20, &mut b).is_err());
    assert!(img.write_at((1 << 20) - 100, &b).is_err());
    assert!(img.write_zeroes(u64::MAX - 10, 100).is_err());
}

#[test]
fn check_helper_detects_a_leaked_cluster() {
    need_qemu_img();
    // Proves `check_clean` can fail: a cluster with a refcount but no reference is a leak.
    let dir = TempDir::new("q2leak");
    let p = dir.path("l.qcow2");
    create(&p, "1M", "");
    {
        let mut q = open_q(&p, false).unwrap();
        let off = q.alloc_cluster().unwrap();
        q.file
            .write_all_at(&vec![0u8; q.cluster_size as usize], off)
            .unwrap();
    }
    let caught = std::panic::catch_unwind(|| check_clean(&p));
    assert!(caught.is_err(), "qemu-img check missed a leak");
}

// ---- what opening may touch ----

/// A qcow2 image whose header names `backing` (not opened by qemu-img: `-u`).
fn with_backing(path: &Path, backing: &str) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        backing,
        "-F",
        "raw",
        path_str(path),
        "1M",
    ]);
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[test]
fn backing_files_are_followed_only_when_allowed() {
    need_qemu_img();
    let dir = TempDir::new("q2policy");
    let fifo = dir.path("fifo");
    run("mkfifo", &[path_str(&fifo)]);
    let top = dir.path("top.qcow2");
    let off = |readonly| crate::OpenOptions::readonly(readonly);
    for name in [
        "/etc/shadow",
        "/etc/passwd",
        path_str(&fifo),
        "/dev/zero",
        "base.raw",
    ] {
        with_backing(&top, name);
        for readonly in [true, false] {
            let e = crate::open(&top, off(readonly))
                .err()
                .expect("backing followed");
            assert_eq!(
                error_chain(&e),
                format!(
                    "cannot open disk {}: names backing file '{name}', which is followed only \
                     with backing=on (import: --backing)",
                    top.display()
                )
            );
        }
    }
    // Allowed, but never to a file that is not a regular file (and never blocking).
    let start = std::time::Instant::now();
    for (name, what) in [
        (path_str(&fifo), "is a FIFO, not a regular file"),
        ("/dev/zero", "is a character device, not a regular file"),
        ("/dev", "is a directory, not a regular file"),
    ] {
        with_backing(&top, name);
        let e = crate::open(&top, off(true).backing(true))
            .err()
            .expect("opened");
        let msg = error_chain(&e);
        assert!(msg.ends_with(what), "{msg}");
        assert!(msg.contains(&format!("backing file {name}")), "{msg}");
    }
    assert!(start.elapsed() < std::time::Duration::from_secs(10));
    // A legitimate chain with backing=on: read through, and listed.
    let base = dir.path("base.raw");
    std::fs::write(&base, pattern(1 << 20, 9)).unwrap();
    with_backing(&top, "base.raw");
    let mut img = crate::open(&top, off(true).backing(true)).unwrap();
    assert!(read_all(img.as_mut()) == pattern(1 << 20, 9));
    assert_eq!(
        img.chain(),
        vec![crate::Link {
            path: dir.path("base.raw"),
            format: Format::Raw,
            role: "backing",
        }]
    );
    // An image without a backing file opens either way, with an empty chain.
    create(&base, "1M", "");
    assert!(crate::open(&base, off(false)).unwrap().chain().is_empty());
}

#[test]
fn l2_tables_are_checked_when_first_used() {
    need_qemu_img();
    let dir = TempDir::new("q2lazy");
    let p = dir.path("l.qcow2");
    create(&p, "1M", "cluster_size=4096");
    qemu_io(&p, "qcow2", "write -P 0x11 0 4k");
    let mut q = open_q(&p, true).unwrap();
    // The first L2 table, after the image was opened: a compressed entry is refused at use.
    let l2 = q.l1[0] & OFFSET_MASK;
    let e0 = {
        let mut b = [0u8; 8];
        q.file.read_exact_at(&mut b, l2).unwrap();
        u64::from_be_bytes(b)
    };
    patch(&p, l2, &(e0 | COMPRESSED).to_be_bytes());
    let mut b = [0u8; 512];
    let e = q.read_at(0, &mut b).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert!(e.to_string().contains("compressed"), "{e}");
}

/// A header may name millions of L2 tables in a sparse file (which costs nothing to make):
/// opening reads a bounded number of them, not all.
#[test]
fn opening_does_not_scan_every_l2_table() {
    need_qemu_img();
    let dir = TempDir::new("q2sparse");
    let p = dir.path("s.qcow2");
    // 512-byte clusters: 64 entries per L2 table, so 128 GiB needs 4 Mi L1 entries (32 MiB).
    create(&p, "128G", "cluster_size=512");
    let mut q = open_q(&p, true).unwrap();
    let n = q.l1.len() as u64;
    assert_eq!(n, 4 << 20);
    let len = std::fs::metadata(&p).unwrap().len().next_multiple_of(512);
    let l1: Vec<u8> = (0..n).flat_map(|i| (len + i * 512).to_be_bytes()).collect();
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(&l1, q.l1_offset).unwrap();
    f.set_len(len + n * 512).unwrap();
    drop(f);
    let start = std::time::Instant::now();
    q = open_q(&p, true).unwrap();
    let took = start.elapsed();
    assert!(
        took < std::time::Duration::from_secs(2),
        "open took {took:?}"
    );
    // The tables read as zeros when used.
    let mut b = vec![1u8; 4096];
    q.read_at(100 << 30, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
}
