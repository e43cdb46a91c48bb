//! VHDX against qemu-img: dynamic and fixed images qemu makes read as the raw source, writable
//! opens are refused with the one-line error, damaged structures fail with the field named.

// Test images are small and built here: their sizes and offsets fit every integer type.
#![allow(clippy::cast_possible_truncation)]

use super::*;
use crate::testutil::*;

const MB: usize = 1 << 20;

/// Rewrites `bytes` at `at` in both headers and fixes their CRCs.
fn set_header(path: &std::path::Path, at: usize, bytes: &[u8]) {
    let mut img = std::fs::read(path).unwrap();
    for off in HEADER_OFFSETS {
        let h = &mut img[off as usize..(off + HEADER_LEN) as usize];
        h[at..at + bytes.len()].copy_from_slice(bytes);
        let c = crc_without_field(h);
        h[4..8].copy_from_slice(&c.to_le_bytes());
    }
    std::fs::write(path, img).unwrap();
}

/// Rewrites `bytes` at `at` in both region tables and fixes their CRCs.
fn set_regions(path: &std::path::Path, at: usize, bytes: &[u8]) {
    let mut img = std::fs::read(path).unwrap();
    for off in REGION_OFFSETS {
        let r = &mut img[off as usize..(off + REGION_LEN) as usize];
        r[at..at + bytes.len()].copy_from_slice(bytes);
        let c = crc_without_field(r);
        r[4..8].copy_from_slice(&c.to_le_bytes());
    }
    std::fs::write(path, img).unwrap();
}

/// File offsets of (metadata region, BAT region) as the first region table says.
fn regions(img: &[u8]) -> (usize, usize) {
    let r = &img[REGION_OFFSETS[0] as usize..];
    let mut meta = 0;
    let mut bat = 0;
    for i in 0..le32(r, 8) as usize {
        let e = &r[16 + i * 32..];
        if e[..16] == METADATA_GUID {
            meta = le64(e, 16) as usize;
        }
        if e[..16] == BAT_GUID {
            bat = le64(e, 16) as usize;
        }
    }
    (meta, bat)
}

/// File offset of metadata item `guid`.
fn item(img: &[u8], guid: &[u8; 16]) -> usize {
    let (meta, _) = regions(img);
    let t = &img[meta..];
    for i in 0..le16(t, 10) as usize {
        let e = &t[32 + i * 32..];
        if e[..16] == *guid {
            return meta + le32(e, 16) as usize;
        }
    }
    panic!("no item");
}

#[test]
fn qemu_images_read_like_the_source() {
    need_qemu_img();
    let dir = TempDir::new("vhdxr");
    let (raw, data) = raw_source(&dir, 5 * MB + 3 * 512);
    for opts in [
        "",
        "subformat=fixed",
        "block_size=1M",
        "block_size=8M,subformat=fixed",
    ] {
        let p = dir.path("r.vhdx");
        let _ = std::fs::remove_file(&p);
        convert(&raw, "vhdx", opts, &p);
        check_reads(&p, Format::Vhdx, &data);
    }
}

#[test]
fn writable_open_is_refused() {
    need_qemu_img();
    let dir = TempDir::new("vhdxo");
    let p = dir.path("w.vhdx");
    create("vhdx", "", &p, "4M");
    assert_eq!(
        open_error(&p, false),
        format!(
            "cannot open disk {}: VHDX images are read-only; attach with readonly=on or convert \
             with anyvisor import",
            p.display()
        )
    );
}

#[test]
fn damaged_images_fail_with_the_field_named() {
    need_qemu_img();
    let dir = TempDir::new("vhdxc");
    let (raw, _) = raw_source(&dir, 3 * MB);
    let base = dir.path("base.vhdx");
    convert(&raw, "vhdx", "block_size=1M", &base);
    let orig = std::fs::read(&base).unwrap();
    let (meta, bat) = regions(&orig);
    let params = item(&orig, &FILE_PARAMETERS);
    let vsize = item(&orig, &VIRTUAL_DISK_SIZE);
    let lss = item(&orig, &LOGICAL_SECTOR_SIZE);
    let p = dir.path("c.vhdx");
    let fresh = || std::fs::copy(&base, &p).unwrap();
    let err = || match Vhdx::open(std::fs::File::open(&p).unwrap(), true) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("opened"),
    };

    fresh();
    patch(&p, 64 * 1024 + 100, &[1]);
    patch(&p, 128 * 1024 + 100, &[1]);
    assert!(err().starts_with("VHDX header checksum"), "{}", err());
    // One damaged header: the other one serves.
    fresh();
    patch(&p, 64 * 1024 + 100, &[1]);
    assert!(Vhdx::open(std::fs::File::open(&p).unwrap(), true).is_ok());

    fresh();
    set_header(&p, 48, &[1; 16]);
    assert_eq!(
        err(),
        "VHDX: images with a non-empty log (open them once in Hyper-V or run `qemu-img check \
         -r all` to replay it) not supported"
    );
    fresh();
    set_header(&p, 66, &2u16.to_le_bytes());
    assert_eq!(err(), "VHDX header version is 0x2: not 1");

    fresh();
    patch(&p, 192 * 1024 + 40, &[9]);
    patch(&p, 256 * 1024 + 40, &[9]);
    assert!(err().starts_with("VHDX region table checksum"), "{}", err());
    fresh();
    set_regions(&p, 8, &3000u32.to_le_bytes());
    assert_eq!(err(), "VHDX region table entry count is 0xbb8: above 2047");
    fresh();
    let len = orig.len() as u64;
    // Entry 0 is the BAT in qemu's images.
    set_regions(&p, 16 + 16, &(len.next_multiple_of(1 << 20)).to_le_bytes());
    assert_eq!(
        err(),
        format!(
            "VHDX region offset is {:#x}: region outside the file",
            len.next_multiple_of(1 << 20)
        )
    );
    fresh();
    set_regions(&p, 16 + 16, &12345u64.to_le_bytes());
    assert_eq!(
        err(),
        "VHDX region offset is 0x3039: not a non-zero MiB multiple past 1 MiB"
    );
    fresh();
    set_regions(&p, 16, &[0xee; 16]);
    assert_eq!(err(), "VHDX region table is 0x2: no BAT region");
    fresh();
    set_regions(&p, 16, &[0xee; 16]);
    set_regions(&p, 16 + 28, &1u32.to_le_bytes());
    assert_eq!(err(), "VHDX: an unknown required region not supported");

    fresh();
    patch(&p, meta as u64, b"metadatX");
    assert!(err().starts_with("VHDX metadata table is"), "{}", err());
    fresh();
    patch(&p, params as u64, &3000u32.to_le_bytes());
    assert_eq!(
        err(),
        "VHDX block size is 0xbb8: not a power of two from 1 to 256 MiB"
    );
    fresh();
    patch(&p, params as u64 + 4, &2u32.to_le_bytes());
    assert_eq!(
        err(),
        "VHDX: differencing disks (a parent image) not supported"
    );
    fresh();
    patch(&p, vsize as u64, &(1u64 << 50).to_le_bytes());
    assert_eq!(
        err(),
        "VHDX virtual disk size is 0x4000000000000: zero, above 64 TiB or not whole sectors"
    );
    fresh();
    patch(&p, lss as u64, &1000u32.to_le_bytes());
    assert_eq!(err(), "VHDX logical sector size is 0x3e8: not 512 or 4096");
    // The BAT's first entry: past the end of the file, then partially present.
    fresh();
    let e = (((len >> 20) + 4) << 20) | 6;
    patch(&p, bat as u64, &e.to_le_bytes());
    assert_eq!(
        err(),
        format!("VHDX BAT entry is {e:#x}: block outside the file")
    );
    fresh();
    patch(&p, bat as u64, &((2u64 << 20) | 7).to_le_bytes());
    assert_eq!(
        err(),
        "VHDX BAT entry is 0x200007: state not valid for a disk without parent"
    );
    fresh();
    patch(&p, 0, b"vhdxfilX");
    assert_eq!(err(), "not a VHDX image (bad magic)");
}

#[test]
fn mutated_images_never_panic() {
    // The structures are spread over MiBs: mutate the headers and region tables only (the
    // metadata and BAT are covered by the damaged-image cases and the fuzz target).
    crate::fuzz::tests::mutate_image("vhdx", "block_size=1M", "4M", Format::Vhdx, 320 * 1024);
}

/// The BAT is read and checked when used, past the first blocks: a damaged entry far into it
/// fails the read of that block, not the open (whose work does not grow with the disk size).
#[test]
fn bat_entries_are_checked_when_used() {
    need_qemu_img();
    let dir = TempDir::new("vhdxlazy");
    let p = dir.path("l.vhdx");
    // 1 MiB blocks: 131072 blocks, more than are checked at open; chunk ratio 4096.
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            "block_size=1M",
            path_str(&p),
            "128G",
        ],
    );
    let img = std::fs::read(&p).unwrap();
    let (_, bat) = regions(&img);
    let len = img.len() as u64;
    let b = 100_000u64;
    let i = b + b / 4096;
    let e = (((len >> 20) + 4) << 20) | 6;
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(&e.to_le_bytes(), bat as u64 + i * 8)
        .unwrap();
    drop(f);
    let mut v = crate::open(&p, crate::OpenOptions::readonly(true)).unwrap();
    let mut buf = vec![1u8; 4096];
    v.read_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&x| x == 0));
    let err = v.read_at(b << 20, &mut buf).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert_eq!(
        err.to_string(),
        format!("VHDX BAT entry is {e:#x}: block outside the file")
    );
    v.read_at((b + 1) << 20, &mut buf).unwrap();
}
