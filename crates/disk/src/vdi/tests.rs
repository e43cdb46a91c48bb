//! VDI against qemu-img: dynamic and static images qemu makes read as qemu reads them, our
//! writes pass `qemu-img check` and `qemu-img compare`, damaged headers fail with the field
//! named.

// Test images are small and built here: their sizes and offsets fit every integer type.
#![allow(clippy::cast_possible_truncation)]

use super::*;
use crate::testutil::*;

const MIB: usize = 1 << 20;

#[test]
fn qemu_images_read_like_qemu() {
    need_qemu_img();
    let dir = TempDir::new("vdir");
    let (raw, data) = raw_source(&dir, 5 * MIB + 1536);
    for opts in ["", "static=on"] {
        let p = dir.path("r.vdi");
        let _ = std::fs::remove_file(&p);
        convert(&raw, "vdi", opts, &p);
        assert!(qemu_view(&dir, &p, "vdi") == data);
        check_reads(&p, Format::Vdi, &data);
    }
}

#[test]
fn writes_pass_qemu_check_and_compare() {
    need_qemu_img();
    let dir = TempDir::new("vdiw");
    let (raw, data) = raw_source(&dir, 4 * MIB);
    for (opts, from_source) in [
        ("", false),
        ("", true),
        ("static=on", false),
        ("static=on", true),
    ] {
        let p = dir.path("w.vdi");
        let _ = std::fs::remove_file(&p);
        let mut expect = if from_source {
            convert(&raw, "vdi", opts, &p);
            data.clone()
        } else {
            create("vdi", opts, &p, "4M");
            vec![0u8; 4 * MIB]
        };
        let mut img = crate::open(&p, crate::OpenOptions::readonly(false)).unwrap();
        write_pattern(img.as_mut(), &mut expect);
        drop(img);
        qemu_agrees(&dir, &p, "vdi", &expect, true);
        check_reads(&p, Format::Vdi, &expect);
    }
}

#[test]
fn damaged_images_fail_with_the_field_named() {
    need_qemu_img();
    let dir = TempDir::new("vdic");
    let (raw, _) = raw_source(&dir, 3 * MIB);
    let base = dir.path("base.vdi");
    convert(&raw, "vdi", "", &base);
    let len = std::fs::metadata(&base).unwrap().len();
    let cases: Vec<(u64, Vec<u8>, String)> = vec![
        (
            68,
            0x0001_0000u32.to_le_bytes().to_vec(),
            "VDI version is 0x10000: not 1.1".into(),
        ),
        (
            72,
            16u32.to_le_bytes().to_vec(),
            "VDI header size is 0x10: outside 384..4096 or the file".into(),
        ),
        (
            76,
            4u32.to_le_bytes().to_vec(),
            "VDI: undo and differencing images not supported".into(),
        ),
        (
            76,
            7u32.to_le_bytes().to_vec(),
            "VDI image type is 0x7: not normal (1) or fixed (2)".into(),
        ),
        (
            360,
            4096u32.to_le_bytes().to_vec(),
            "VDI sector size is 0x1000: not 512".into(),
        ),
        (
            368,
            (1u64 << 50).to_le_bytes().to_vec(),
            "VDI disk size is 0x4000000000000: above 64 TiB or not whole sectors".into(),
        ),
        (
            376,
            3000u32.to_le_bytes().to_vec(),
            "VDI block size is 0xbb8: not a power of two from 512 B to 256 MiB".into(),
        ),
        (
            380,
            8u32.to_le_bytes().to_vec(),
            "VDI: extra data in blocks not supported".into(),
        ),
        (
            384,
            1u32.to_le_bytes().to_vec(),
            "VDI block count is 0x1: too few for the disk size".into(),
        ),
        (
            384,
            u32::MAX.to_le_bytes().to_vec(),
            "VDI block count is 0xffffffff: above 2^24".into(),
        ),
        (
            388,
            9u32.to_le_bytes().to_vec(),
            "VDI allocated blocks is 0x9: more than the block count".into(),
        ),
        (
            340,
            (len as u32).to_le_bytes().to_vec(),
            format!(
                "VDI block map offset is {len:#x}: overlaps the header or the data, or outside the file"
            ),
        ),
        (
            340,
            16u32.to_le_bytes().to_vec(),
            "VDI block map offset is 0x10: overlaps the header or the data, or outside the file"
                .into(),
        ),
        (
            344,
            0x2000_0000u32.to_le_bytes().to_vec(),
            "VDI allocated blocks is 0x2: data beyond the end of the file".into(),
        ),
        // Map entry 2 (a zero MiB in the source) pointing at data block 0, already used.
        (
            0x200 + 8,
            0u32.to_le_bytes().to_vec(),
            "VDI block map entry is 0x2: shares its data block".into(),
        ),
        (
            0x200 + 8,
            5u32.to_le_bytes().to_vec(),
            "VDI block map entry is 0x2: beyond the allocated blocks".into(),
        ),
        (
            64,
            [0, 0, 0, 0].to_vec(),
            "not a VDI image (bad magic)".into(),
        ),
    ];
    for (at, bytes, want) in cases {
        let p = dir.path("c.vdi");
        std::fs::copy(&base, &p).unwrap();
        patch(&p, at, &bytes);
        let f = std::fs::File::open(&p).unwrap();
        let got = match Vdi::open(f, true) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("opened with {bytes:x?} at {at:#x}"),
        };
        assert_eq!(got, want, "patch at {at:#x}");
    }
    // Through the public entry point the path comes first.
    let p = dir.path("c.vdi");
    std::fs::copy(&base, &p).unwrap();
    patch(&p, 376, &3000u32.to_le_bytes());
    assert_eq!(
        open_error(&p, true),
        format!(
            "cannot open disk {}: VDI block size is 0xbb8: not a power of two from 512 B to 256 MiB",
            p.display()
        )
    );
}

#[test]
fn mutated_images_never_panic() {
    crate::fuzz::tests::mutate_image("vdi", "", "64k", Format::Vdi, 0x200 + 64);
}
