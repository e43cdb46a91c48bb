//! VMDK against qemu-img: every subformat qemu writes reads as the raw source; flat images we
//! write compare equal in qemu; sparse and stream-optimized images refuse a writable open with
//! the one-line error; hostile descriptors and headers fail with the field named.

// Test images are small and built here: their sizes and offsets fit every integer type.
#![allow(clippy::cast_possible_truncation)]

use super::*;
use crate::testutil::*;

const MIB: usize = 1 << 20;

#[test]
fn every_subformat_reads_like_the_source() {
    need_qemu_img();
    let dir = TempDir::new("vmdkr");
    let (raw, data) = raw_source(&dir, 5 * MIB + 3 * 512);
    for sub in [
        "monolithicSparse",
        "streamOptimized",
        "monolithicFlat",
        "twoGbMaxExtentFlat",
        "twoGbMaxExtentSparse",
    ] {
        let p = dir.path(&format!("{sub}.vmdk"));
        convert(&raw, "vmdk", &format!("subformat={sub}"), &p);
        check_reads(&p, Format::Vmdk, &data);
    }
}

#[test]
fn flat_images_are_writable() {
    need_qemu_img();
    let dir = TempDir::new("vmdkw");
    let (raw, data) = raw_source(&dir, 4 * MIB);
    let p = dir.path("flat.vmdk");
    convert(&raw, "vmdk", "subformat=monolithicFlat", &p);
    let mut expect = data.clone();
    let mut img = crate::open(&p, crate::OpenOptions::readonly(false)).unwrap();
    write_pattern(img.as_mut(), &mut expect);
    drop(img);
    qemu_agrees(&dir, &p, "vmdk", &expect, true);
    check_reads(&p, Format::Vmdk, &expect);
}

#[test]
fn sparse_and_stream_refuse_writable_opens() {
    need_qemu_img();
    let dir = TempDir::new("vmdko");
    let (raw, _) = raw_source(&dir, MIB);
    for sub in [
        "streamOptimized",
        "monolithicSparse",
        "twoGbMaxExtentSparse",
    ] {
        let p = dir.path(&format!("{sub}.vmdk"));
        convert(&raw, "vmdk", &format!("subformat={sub}"), &p);
        assert_eq!(
            open_error(&p, false),
            format!(
                "cannot open disk {}: VMDK {sub} images are read-only; attach with readonly=on \
                 or convert with anyvisor import",
                p.display()
            )
        );
    }
}

fn descriptor(extents: &str) -> String {
    format!(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
         createType=\"monolithicFlat\"\n\n# Extent description\n{extents}\n"
    )
}

#[test]
fn hostile_descriptors_are_refused() {
    let dir = TempDir::new("vmdkd");
    std::fs::write(dir.path("data.bin"), vec![7u8; 4096]).unwrap();
    std::fs::create_dir(dir.path("sub")).unwrap();
    std::os::unix::fs::symlink(dir.path("data.bin"), dir.path("link.bin")).unwrap();
    let p = dir.path("d.vmdk");
    let prefix = format!("cannot open disk {}: ", p.display());
    let cases = [
        (
            "RW 8 FLAT \"/etc/passwd\" 0",
            "VMDK descriptor: extent \"/etc/passwd\": names a file outside the descriptor's directory, which is followed only with backing=on (import: --backing)",
        ),
        (
            "RW 8 FLAT \"../data.bin\" 0",
            "VMDK descriptor: extent \"../data.bin\": names a file outside the descriptor's directory, which is followed only with backing=on (import: --backing)",
        ),
        (
            "RW 8 FLAT \"sub\" 0",
            "extent sub: I/O error: is a directory, not a regular file",
        ),
        (
            "RW 8 FLAT \"data.bin\" 1",
            "VMDK descriptor: extent \"data.bin\": extends past the end of its file",
        ),
        (
            "RW 8 FLAT \"missing.bin\" 0",
            "extent missing.bin: I/O error: No such file or directory (os error 2)",
        ),
        (
            "NOACCESS 8 FLAT \"data.bin\" 0",
            "VMDK descriptor: extent \"data.bin\": access is not RW or RDONLY",
        ),
        (
            "RW 8 VMFSRDM \"data.bin\" 0",
            "VMDK descriptor: extent \"data.bin\": type VMFSRDM not supported",
        ),
        (
            "RW x FLAT \"data.bin\" 0",
            "VMDK descriptor: bad line 'RW x FLAT \"data.bin\" 0'",
        ),
        ("", "VMDK descriptor: no extents"),
        (
            "RW 8 SPARSE \"data.bin\"",
            "extent data.bin: not a VMDK image (bad magic)",
        ),
    ];
    for (extent, want) in cases {
        std::fs::write(&p, descriptor(extent)).unwrap();
        assert_eq!(open_error(&p, true), format!("{prefix}{want}"), "{extent}");
    }
    // Symbolic links on the way are refused: the last component and any directory.
    std::os::unix::fs::symlink("/etc", dir.path("etc")).unwrap();
    std::fs::write(&p, descriptor("RW 8 FLAT \"link.bin\" 0")).unwrap();
    let e = open_error(&p, true);
    assert!(
        e.ends_with(
            "is a symbolic link, which is followed only with backing=on (import: --backing)"
        ),
        "{e}"
    );
    std::fs::write(&p, descriptor("RW 1 FLAT \"etc/passwd\" 0")).unwrap();
    let e = open_error(&p, true);
    assert!(
        e.ends_with("leads through a symbolic link, which is followed only with backing=on (import: --backing)"),
        "{e}"
    );
    // With backing=on the descriptor may name any path, but still only regular files, opened
    // without blocking.
    let on = crate::OpenOptions::readonly(true).backing(true);
    std::fs::write(&p, descriptor("RW 1 FLAT \"etc/passwd\" 0")).unwrap();
    let img = crate::open(&p, on).unwrap();
    assert_eq!(img.chain()[0].path, dir.path("etc/passwd"));
    std::fs::write(&p, descriptor("RW 8 FLAT \"link.bin\" 0")).unwrap();
    assert_eq!(crate::open(&p, on).unwrap().size(), 4096);
    let fifo = dir.path("fifo");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    for (name, want) in [
        ("/dev/zero", "character device"),
        ("fifo", "FIFO"),
        ("sub", "directory"),
    ] {
        for (readonly, opts) in [
            (true, on),
            (false, crate::OpenOptions::readonly(false).backing(true)),
        ] {
            std::fs::write(&p, descriptor(&format!("RW 8 FLAT \"{name}\" 0"))).unwrap();
            let e = crate::open(&p, opts)
                .err()
                .map(|e| format!("{:?}", e))
                .unwrap_or_default();
            assert!(e.contains(want), "{name} readonly={readonly}: {e}");
        }
    }
    // A parent is refused.
    std::fs::write(
        &p,
        descriptor("RW 8 FLAT \"data.bin\" 0").replace("parentCID=ffffffff", "parentCID=1234abcd"),
    )
    .unwrap();
    assert_eq!(
        open_error(&p, true),
        format!("{prefix}VMDK: images with a parent (parentCID) not supported")
    );
    // Too many extents.
    let many: Vec<String> = (0..=MAX_EXTENTS)
        .map(|_| "RW 1 FLAT \"data.bin\" 0".to_string())
        .collect();
    std::fs::write(&p, descriptor(&many.join("\n"))).unwrap();
    assert_eq!(
        open_error(&p, true),
        format!("{prefix}VMDK descriptor: more than 1024 extents")
    );
    // A good one: the flat extent at an offset, then a zero extent.
    std::fs::write(&p, descriptor("RW 4 FLAT \"data.bin\" 2\nRDONLY 2 ZERO")).unwrap();
    let mut img = crate::open(&p, crate::OpenOptions::readonly(true)).unwrap();
    assert_eq!(img.size(), 3072);
    let mut b = vec![1u8; 3072];
    img.read_at(0, &mut b).unwrap();
    assert!(b[..2048].iter().all(|&x| x == 7) && b[2048..].iter().all(|&x| x == 0));
    // Writable with a ZERO extent is refused.
    assert!(open_error(&p, false).ends_with("VMDK monolithicFlat (ZERO extent) images are read-only; attach with readonly=on or convert with anyvisor import"));
}

#[test]
fn damaged_sparse_headers_fail_with_the_field_named() {
    need_qemu_img();
    let dir = TempDir::new("vmdkc");
    let (raw, _) = raw_source(&dir, 3 * MIB);
    let base = dir.path("base.vmdk");
    convert(&raw, "vmdk", "", &base);
    let len = std::fs::metadata(&base).unwrap().len();
    let cases: Vec<(u64, Vec<u8>, String)> = vec![
        (
            4,
            7u32.to_le_bytes().to_vec(),
            "VMDK version is 0x7: not 1, 2 or 3".into(),
        ),
        (
            12,
            (1u64 << 40).to_le_bytes().to_vec(),
            "VMDK capacity is 0x10000000000: above 64 TiB".into(),
        ),
        (
            20,
            3u64.to_le_bytes().to_vec(),
            "VMDK grain size is 0x3: not a power of two from 8 to 65536 sectors".into(),
        ),
        (
            44,
            100u32.to_le_bytes().to_vec(),
            "VMDK grain table entries is 0x64: not 512".into(),
        ),
        (
            56,
            (len / 512).to_le_bytes().to_vec(),
            format!(
                "VMDK grain directory offset is {:#x}: outside the file",
                len / 512
            ),
        ),
        (
            56,
            u64::MAX.to_le_bytes().to_vec(),
            "VMDK grain directory offset is 0xffffffffffffffff: no footer at the end".into(),
        ),
        (
            8,
            (3u32 | FLAG_COMPRESSED).to_le_bytes().to_vec(),
            "VMDK compression algorithm is 0x0: not deflate (1)".into(),
        ),
        (
            28,
            (len / 512).to_le_bytes().to_vec(),
            format!(
                "VMDK descriptor offset is {:#x}: outside the file",
                len / 512
            ),
        ),
        (0, b"KDMX".to_vec(), "not a VMDK image (bad magic)".into()),
    ];
    for (at, bytes, want) in cases {
        let p = dir.path("c.vmdk");
        std::fs::copy(&base, &p).unwrap();
        patch(&p, at, &bytes);
        let got = match Vmdk::open(
            std::fs::File::open(&p).unwrap(),
            &p,
            true,
            &Walk::new(false),
        ) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("opened with {bytes:x?} at {at:#x}"),
        };
        assert_eq!(got, want, "patch at {at:#x}");
    }
    // The grain directory is read when used (its size is the header's to choose): an entry
    // pointing past the end fails the read of that table's grains, not the open.
    let p = dir.path("c.vmdk");
    std::fs::copy(&base, &p).unwrap();
    patch(&p, 0x1a * 512, &((len / 512) as u32).to_le_bytes());
    let mut img = Vmdk::open(
        std::fs::File::open(&p).unwrap(),
        &p,
        true,
        &Walk::new(false),
    )
    .unwrap();
    let mut b = [0u8; 512];
    let e = img.read_at(0, &mut b).unwrap_err();
    assert_eq!(
        e.to_string(),
        "VMDK grain directory entry 0: table outside the file"
    );
    // A grain table entry pointing into the metadata fails the read, not the open.
    let p = dir.path("c.vmdk");
    std::fs::copy(&base, &p).unwrap();
    let gt0 = {
        let b = std::fs::read(&p).unwrap();
        u64::from(le32(&b, 0x1a * 512)) * 512
    };
    patch(&p, gt0, &2u32.to_le_bytes());
    let mut img = Vmdk::open(
        std::fs::File::open(&p).unwrap(),
        &p,
        true,
        &Walk::new(false),
    )
    .unwrap();
    let mut b = [0u8; 512];
    let e = img.read_at(0, &mut b).unwrap_err();
    assert_eq!(e.to_string(), "VMDK grain 0 outside the file");
}

#[test]
fn stream_grain_marker_is_checked() {
    need_qemu_img();
    let dir = TempDir::new("vmdks");
    let (raw, _) = raw_source(&dir, MIB);
    let p = dir.path("s.vmdk");
    convert(&raw, "vmdk", "subformat=streamOptimized", &p);
    // The first grain's marker: its LBA must be grain 0's.
    let b = std::fs::read(&p).unwrap();
    let gt0 = u64::from(le32(&b, 0x1a * 512)) * 512;
    let g0 = u64::from(le32(&b, gt0 as usize)) * 512;
    patch(&p, g0, &99u64.to_le_bytes());
    let mut img = crate::open(&p, crate::OpenOptions::readonly(true)).unwrap();
    let mut buf = [0u8; 512];
    assert_eq!(
        img.read_at(0, &mut buf).unwrap_err().to_string(),
        "VMDK grain marker says LBA 99"
    );
    patch(&p, g0, &0u64.to_le_bytes());
    patch(&p, g0 + 8, &u32::MAX.to_le_bytes());
    let mut img = crate::open(&p, crate::OpenOptions::readonly(true)).unwrap();
    assert_eq!(
        img.read_at(0, &mut buf).unwrap_err().to_string(),
        "VMDK compressed grain size 4294967295"
    );
}

#[test]
fn mutated_images_never_panic() {
    crate::fuzz::tests::mutate_image("vmdk", "", "256k", Format::Vmdk, 0x1a * 512 + 64);
    crate::fuzz::tests::mutate_image(
        "vmdk",
        "subformat=streamOptimized",
        "256k",
        Format::Vmdk,
        0x1a * 512 + 64,
    );
}

/// A sparse extent's header may claim 64 TiB, whose grain directory (64 MiB) a sparse file
/// holds for free, and a descriptor may name such an extent hundreds of times: opening reads
/// no grain directory, so it stays fast and small (reading each would be 16 GiB here).
#[test]
fn huge_grain_directories_are_not_read_at_open() {
    need_qemu_img();
    let dir = TempDir::new("vmdkgd");
    let (raw, _) = raw_source(&dir, MIB);
    let big = dir.path("big.vmdk");
    convert(&raw, "vmdk", "", &big);
    // 2^37 sectors (64 TiB) in grains of 16 sectors: 2^24 directory entries.
    patch(&big, 12, &(1u64 << 37).to_le_bytes());
    patch(&big, 20, &16u64.to_le_bytes());
    let gd_sector = 1u64 << 20; // 512 MiB into the file
    patch(&big, 56, &gd_sector.to_le_bytes());
    let f = std::fs::OpenOptions::new().write(true).open(&big).unwrap();
    f.set_len(gd_sector * 512 + (64 << 20)).unwrap();
    drop(f);
    let p = dir.path("d.vmdk");
    let lines: Vec<String> = (0..256)
        .map(|_| "RDONLY 536870912 SPARSE \"big.vmdk\"".to_string())
        .collect();
    std::fs::write(&p, descriptor(&lines.join("\n"))).unwrap();
    let start = std::time::Instant::now();
    let mut img = crate::open(&p, crate::OpenOptions::readonly(true)).unwrap();
    let took = start.elapsed();
    assert!(
        took < std::time::Duration::from_secs(2),
        "open took {took:?}"
    );
    assert_eq!(img.size(), 256 << 38);
    // Reads go through the (zero) directory entries on demand.
    let mut b = vec![1u8; 4096];
    img.read_at(100 << 38, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
}
