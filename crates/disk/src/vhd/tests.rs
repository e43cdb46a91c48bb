//! VHD against qemu-img ("vpc"): images qemu makes read as qemu reads them, images we write
//! compare equal with `qemu-img compare`, and damaged headers fail with the field named.

// Test images are small and built here: their sizes and offsets fit every integer type.
#![allow(clippy::cast_possible_truncation)]

use super::*;
use crate::testutil::*;

const MIB: usize = 1 << 20;

/// Rewrites the footer field at `at` (at the end and in the copy at 0 of a dynamic disk) with
/// a correct checksum.
fn set_footer(path: &std::path::Path, at: usize, bytes: &[u8], dynamic: bool) {
    let mut img = std::fs::read(path).unwrap();
    let end = img.len() - 512;
    let mut f = img[end..].to_vec();
    f[at..at + bytes.len()].copy_from_slice(bytes);
    let c = checksum(&f, 64);
    f[64..68].copy_from_slice(&c.to_be_bytes());
    img[end..].copy_from_slice(&f);
    if dynamic {
        img[..512].copy_from_slice(&f);
    }
    std::fs::write(path, img).unwrap();
}

/// Rewrites a dynamic header field with a correct checksum.
fn set_dyn_header(path: &std::path::Path, at: usize, bytes: &[u8]) {
    let mut img = std::fs::read(path).unwrap();
    let h = &mut img[512..1536];
    h[at..at + bytes.len()].copy_from_slice(bytes);
    let c = checksum(h, 36);
    h[36..40].copy_from_slice(&c.to_be_bytes());
    std::fs::write(path, img).unwrap();
}

#[test]
fn qemu_images_read_like_qemu() {
    need_qemu_img();
    let dir = TempDir::new("vhdr");
    let (raw, data) = raw_source(&dir, 5 * MIB + 3 * 512);
    for (opts, name) in [
        ("force_size=on", "dyn-exact.vhd"),
        ("", "dyn-chs.vhd"),
        ("subformat=fixed,force_size=on", "fixed-exact.vhd"),
        ("subformat=fixed", "fixed-chs.vhd"),
    ] {
        let p = dir.path(name);
        convert(&raw, "vpc", opts, &p);
        let view = qemu_view(&dir, &p, "vpc");
        // CHS sizing rounds up: the source, then zeros.
        assert!(view.len() >= data.len());
        assert!(
            view[..data.len()] == data[..],
            "{name}: qemu's view differs from the source"
        );
        check_reads(&p, Format::Vhd, &view);
    }
}

#[test]
fn writes_read_back_in_qemu() {
    need_qemu_img();
    let dir = TempDir::new("vhdw");
    let (raw, data) = raw_source(&dir, 4 * MIB);
    for (opts, from_source) in [
        ("force_size=on", false),
        ("force_size=on", true),
        ("subformat=fixed,force_size=on", false),
        ("subformat=fixed,force_size=on", true),
    ] {
        let p = dir.path("w.vhd");
        let _ = std::fs::remove_file(&p);
        let mut expect = if from_source {
            convert(&raw, "vpc", opts, &p);
            data.clone()
        } else {
            create("vpc", opts, &p, "4M");
            vec![0u8; 4 * MIB]
        };
        let mut img = crate::open(&p, crate::OpenOptions::readonly(false)).unwrap();
        write_pattern(img.as_mut(), &mut expect);
        drop(img);
        // qemu-img has no checker for vpc; compare is the check.
        qemu_agrees(&dir, &p, "vpc", &expect, false);
        // And a second open sees the same (BAT, bitmaps and footer were written).
        check_reads(&p, Format::Vhd, &expect);
    }
}

#[test]
fn fixed_vhd_is_detected_by_its_footer() {
    need_qemu_img();
    let dir = TempDir::new("vhdd");
    let p = dir.path("f.vhd");
    create("vpc", "subformat=fixed,force_size=on", &p, "1M");
    let mut f = std::fs::File::open(&p).unwrap();
    assert_eq!(crate::detect_format(&mut f).unwrap(), Format::Vhd);
    // Without a valid checksum the footer is data: raw.
    patch(&p, (MIB + 64) as u64, &[0, 0, 0, 0]);
    let mut f = std::fs::File::open(&p).unwrap();
    assert_eq!(crate::detect_format(&mut f).unwrap(), Format::Raw);
}

#[test]
fn damaged_images_fail_with_the_field_named() {
    need_qemu_img();
    let dir = TempDir::new("vhdc");
    let (raw, _) = raw_source(&dir, 3 * MIB);
    let base = dir.path("base.vhd");
    convert(&raw, "vpc", "force_size=on", &base);
    let fresh = || {
        let p = dir.path("c.vhd");
        std::fs::copy(&base, &p).unwrap();
        p
    };
    let prefix = |p: &std::path::Path| format!("cannot open disk {}: ", p.display());
    let len = std::fs::metadata(&base).unwrap().len();

    let p = fresh();
    patch(&p, len - 512 + 70, &[0xff]);
    patch(&p, 70, &[0xff]);
    let e = open_error(&p, true);
    assert!(e.starts_with(&(prefix(&p) + "VHD footer checksum")), "{e}");

    let p = fresh();
    set_footer(&p, 60, &4u32.to_be_bytes(), true);
    assert_eq!(
        open_error(&p, true),
        prefix(&p) + "VHD: differencing disks (a parent image) not supported"
    );

    let p = fresh();
    set_footer(&p, 60, &9u32.to_be_bytes(), true);
    assert_eq!(
        open_error(&p, true),
        prefix(&p) + "VHD disk type is 0x9: not fixed (2) or dynamic (3)"
    );

    let p = fresh();
    set_footer(&p, 16, &(len * 2).to_be_bytes(), true);
    assert_eq!(
        open_error(&p, true),
        format!(
            "{}VHD data offset is {:#x}: dynamic header outside the file",
            prefix(&p),
            len * 2
        )
    );

    let p = fresh();
    set_footer(&p, 48, &(3u64 << 40).to_be_bytes(), true);
    assert_eq!(
        open_error(&p, true),
        prefix(&p) + "VHD disk size is 0x30000000000: above 2 TiB"
    );

    let p = fresh();
    set_dyn_header(&p, 32, &3000u32.to_be_bytes());
    assert_eq!(
        open_error(&p, true),
        prefix(&p) + "VHD block size is 0xbb8: not a power of two from 512 B to 256 MiB"
    );

    let p = fresh();
    set_dyn_header(&p, 28, &1u32.to_be_bytes());
    assert_eq!(
        open_error(&p, true),
        prefix(&p) + "VHD max table entries is 0x1: too few for the disk size"
    );

    let p = fresh();
    set_dyn_header(&p, 16, &(len - 4).to_be_bytes());
    assert_eq!(
        open_error(&p, true),
        format!(
            "{}VHD table offset is {:#x}: BAT outside the file",
            prefix(&p),
            len - 4
        )
    );

    // A BAT entry pointing past the end of the file, and one into the metadata.
    let p = fresh();
    patch(&p, 1536, &0x00ff_0000u32.to_be_bytes());
    assert_eq!(
        open_error(&p, true),
        format!(
            "{}VHD BAT entry is {:#x}: block overlaps the metadata or lies outside the file",
            prefix(&p),
            0x00ff_0000u64 * 512
        )
    );
    let p = fresh();
    patch(&p, 1536, &1u32.to_be_bytes());
    assert!(
        open_error(&p, true).ends_with(
            "VHD BAT entry is 0x200: block overlaps the metadata or lies outside the file"
        )
    );

    let p = fresh();
    set_dyn_header(&p, 0, b"cxsparsX");
    assert!(open_error(&p, true).contains("VHD dynamic header cookie"));

    let p = fresh();
    std::fs::write(&p, [0u8; 100]).unwrap();
    let e = match open(std::fs::File::open(&p).unwrap(), true) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("opened"),
    };
    assert_eq!(e, "file too short for a VHD header");
}

#[test]
fn mutated_images_never_panic() {
    crate::fuzz::tests::mutate_image("vpc", "force_size=on", "64k", Format::Vhd, 1536 + 64);
}
