//! Damaged and hostile files: every failure is an `Err` with a specific message, never a panic.
//! No root, no KVM.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use snapshot::{Error, SnapshotReader, fuzz_open};

fn sample() -> (Vec<u8>, snapshot::SnapshotContents) {
    let dir = Scratch::new("sample");
    let (path, contents, _) = write_small(&dir);
    (std::fs::read(path).unwrap(), contents)
}

fn open_bytes(bytes: &[u8]) -> Result<SnapshotReader, Error> {
    let dir = Scratch::new("open");
    let p = dir.path("f.snap");
    std::fs::write(&p, bytes).unwrap();
    SnapshotReader::open(&p)
}

fn metadata_end(bytes: &[u8]) -> usize {
    let (_, sections, _) = split(bytes);
    let end = sections.last().unwrap();
    end.offset as usize + 20
}

#[test]
fn sample_is_valid_in_both_readers() {
    let (bytes, contents) = sample();
    assert_eq!(fuzz_open(&bytes).unwrap(), contents);
    assert_eq!(open_bytes(&bytes).unwrap().contents(), &contents);
    // The independent encoder reproduces the writer's bytes exactly.
    let (v, s, image) = split(&bytes);
    assert_eq!(join(v, &s, &image), bytes);
}

#[test]
fn empty_and_tiny_files() {
    assert_eq!(
        open_bytes(&[]).unwrap_err().to_string(),
        "file is 0 bytes, shorter than the 24-byte preamble"
    );
    assert!(matches!(
        fuzz_open(b"ANYVSNAP"),
        Err(Error::TooShort { len: 8 })
    ));
}

#[test]
fn wrong_magic() {
    let (mut bytes, _) = sample();
    bytes[0] = b'X';
    assert_eq!(open_bytes(&bytes).unwrap_err().to_string(), "bad magic");
}

#[test]
fn future_major_version_is_refused() {
    let (bytes, _) = sample();
    let (_, s, image) = split(&bytes);
    let future = join((3, 0), &s, &image);
    assert_eq!(
        open_bytes(&future).unwrap_err().to_string(),
        "unsupported format version 3.0 (this build reads 1.x)"
    );
}

#[test]
fn newer_minor_with_an_optional_section_is_read() {
    let (bytes, contents) = sample();
    let (_, mut s, image) = split(&bytes);
    s.insert(
        3,
        Section {
            offset: 0,
            tag: 0x1234,
            flags: 0,
            payload: b"something new".to_vec(),
        },
    );
    // ... and an optional header field it does not know.
    let mut h: serde_json::Value = serde_json::from_slice(&s[0].payload).unwrap();
    h["added_in_1_7"] = serde_json::json!({"x": 1});
    s[0].payload = serde_json::to_vec(&h).unwrap();
    let newer = join((1, 7), &s, &image);
    let r = open_bytes(&newer).unwrap();
    assert_eq!(r.version(), (1, 7));
    assert_eq!(r.contents(), &contents);
    r.verify_memory().unwrap();

    // The same section marked required is refused.
    s[3].flags = 1;
    let e = fuzz_open(&join((1, 7), &s, &image)).unwrap_err();
    assert!(
        matches!(e, Error::UnknownRequiredSection { tag: 0x1234, .. }),
        "{e}"
    );
}

#[test]
fn truncation_at_every_metadata_offset_and_in_the_image() {
    let (bytes, _) = sample();
    let meta = metadata_end(&bytes);
    let image_offset = meta.div_ceil(4096) * 4096;
    for len in 0..image_offset {
        assert!(fuzz_open(&bytes[..len]).is_err(), "accepted {len} bytes");
    }
    for len in (image_offset..bytes.len()).step_by(4093) {
        let e = fuzz_open(&bytes[..len]).unwrap_err();
        assert!(matches!(e, Error::MemoryImageShort { .. }), "{len}: {e}");
    }
    // Through the file reader, with the exact messages.
    let e = open_bytes(&bytes[..100]).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("truncated file: section at offset 24 needs "),
        "{e}"
    );
    let e = open_bytes(&bytes[..bytes.len() - 1]).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("memory image is smaller than the header's memory size"),
        "{e}"
    );
    let mut longer = bytes.clone();
    longer.push(0);
    assert_eq!(
        open_bytes(&longer).unwrap_err().to_string(),
        "1 bytes of trailing data after the memory image"
    );
}

#[test]
fn a_bit_flip_anywhere_is_caught() {
    let (bytes, _) = sample();
    let meta = metadata_end(&bytes);
    let image_offset = meta.div_ceil(4096) * 4096;
    // Every byte of the metadata and padding (a different bit each time).
    for i in 0..image_offset {
        let mut b = bytes.clone();
        b[i] ^= 1 << (i % 8);
        assert!(fuzz_open(&b).is_err(), "flip at {i} accepted");
    }
    // The image: stored pages are caught by the checksum, holes by the zero check; neither by
    // `open` alone (documented trade-off), both by `verify_memory`.
    for i in [
        image_offset,
        image_offset + 0x5003,
        image_offset + 0x3000,
        bytes.len() - 1,
    ] {
        let mut b = bytes.clone();
        b[i] ^= 0x10;
        let r = open_bytes(&b).unwrap();
        let e = r.verify_memory().unwrap_err();
        assert!(
            matches!(e, Error::ChunkChecksum { .. } | Error::AbsentPageNotZero(_)),
            "{i}: {e}"
        );
    }
}

#[test]
fn a_bad_chunk_is_named_by_its_guest_address() {
    let (bytes, _) = sample();
    let meta = metadata_end(&bytes);
    let image_offset = meta.div_ceil(4096) * 4096;
    // Find a stored page (non-zero) in the second 2 MiB chunk, if the sample has one; else the
    // first stored page.
    let page = (0..(bytes.len() - image_offset) / 4096)
        .find(|p| {
            let at = image_offset + p * 4096;
            bytes[at..at + 4096].iter().any(|&x| x != 0)
        })
        .expect("the sample stores a page");
    let mut b = bytes.clone();
    b[image_offset + page * 4096 + 7] ^= 0x80;
    let e = open_bytes(&b).unwrap().verify_memory().unwrap_err();
    let chunk = (page * 4096) as u64 / (2 << 20);
    assert_eq!(
        e.to_string(),
        format!(
            "memory image chunk {chunk} (guest memory from {:#x}, 2 MiB) checksum mismatch",
            chunk * (2 << 20)
        )
    );
}

#[test]
fn checksum_messages_name_the_section() {
    let (bytes, _) = sample();
    let (_, s, _) = split(&bytes);
    let vcpu1 = s.iter().filter(|s| s.tag == 3).nth(1).unwrap();
    let mut b = bytes.clone();
    b[vcpu1.offset as usize + 30] ^= 4;
    assert_eq!(
        open_bytes(&b).unwrap_err().to_string(),
        "section 'vcpu 1' checksum mismatch"
    );
}

#[test]
fn lengths_that_lie() {
    let (bytes, _) = sample();
    let (_, s, _) = split(&bytes);
    let vm = s.iter().find(|s| s.tag == 2).unwrap().offset as usize;
    // Huge: refused before anything is allocated.
    let mut b = bytes.clone();
    b[vm + 8..vm + 16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_eq!(
        fuzz_open(&b).unwrap_err().to_string(),
        format!("section 'vm' is {} bytes (limit {})", u64::MAX, 16 << 20)
    );
    // Within the cap but beyond the end of the file.
    let mut b = bytes[..vm + 20 + 100].to_vec();
    b[vm + 8..vm + 16].copy_from_slice(&(16u64 << 20).to_le_bytes());
    assert_eq!(
        fuzz_open(&b).unwrap_err().to_string(),
        format!(
            "truncated file: section at offset {vm} needs {} bytes",
            20 + (16 << 20)
        )
    );
    // A memory section length beyond its cap.
    let mem = s.iter().find(|s| s.tag == MEMORY).unwrap().offset as usize;
    let mut b = bytes.clone();
    b[mem + 8..mem + 16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(matches!(fuzz_open(&b), Err(Error::SectionTooLarge { .. })));
}

fn with_header(bytes: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let (v, mut s, image) = split(bytes);
    let mut h: serde_json::Value = serde_json::from_slice(&s[0].payload).unwrap();
    edit(&mut h);
    s[0].payload = serde_json::to_vec(&h).unwrap();
    join(v, &s, &image)
}

#[test]
fn absurd_headers_are_refused() {
    let (bytes, _) = sample();
    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|h| h["memory_regions"][0]["len"] = (1u64 << 62).into()),
            "invalid header: memory size exceeds 1099511627776 bytes",
        ),
        (
            Box::new(|h| h["memory_regions"][1]["guest_addr"] = u64::MAX.into()),
            "invalid header: memory region 1 is not 4 KiB-aligned",
        ),
        (
            Box::new(|h| h["memory_regions"][1]["guest_addr"] = 0x1000.into()),
            "invalid header: memory region 1 overlaps its predecessor or is out of order",
        ),
        (
            Box::new(|h| h["vcpus"] = 100_000.into()),
            "invalid header: 100000 vCPUs (allowed 1..=256)",
        ),
        (
            Box::new(|h| h["vcpus"] = 3.into()),
            "missing section 'vcpu 2' (the header declares 3 vCPUs)",
        ),
        (
            Box::new(|h| h["vcpus"] = 1.into()),
            "unexpected section 'vcpu 1': the header declares 1 vCPUs",
        ),
        (
            Box::new(|h| h["memory_regions"] = serde_json::json!([])),
            "invalid header: no memory regions",
        ),
        (
            Box::new(|h| {
                h["memory_regions"] = (0..65u64)
                    .map(|i| serde_json::json!({"guest_addr": i << 20, "len": 4096}))
                    .collect()
            }),
            "invalid header: 65 memory regions (limit 64)",
        ),
        (
            Box::new(|h| h["devices"][1] = "virtio-net0".into()),
            "unexpected section 'device 1': it holds device 'virtio-blk0' where the header lists 'virtio-net0'",
        ),
        (
            Box::new(|h| h["backend"] = "xen".into()),
            "section 'header' is malformed",
        ),
    ];
    for (edit, msg) in cases {
        let b = with_header(&bytes, edit);
        assert_eq!(fuzz_open(&b).unwrap_err().to_string(), msg);
    }
    // A header whose memory grew: the image no longer matches it.
    let b = with_header(&bytes, |h| {
        h["memory_regions"][1]["len"] = (128u64 << 10).into()
    });
    let e = fuzz_open(&b).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("invalid memory section: image is 1114112 bytes but the header"),
        "{e}"
    );
}

#[test]
fn structural_errors() {
    let (bytes, _) = sample();
    let (v, s, image) = split(&bytes);
    let msg = |sections: Vec<Section>| {
        fuzz_open(&join(v, &sections, &image))
            .unwrap_err()
            .to_string()
    };

    let mut t = s.clone();
    t.swap(0, 1);
    assert_eq!(msg(t), "the first section is 'vm', not the header");

    let mut t = s.clone();
    t.insert(2, s[1].clone());
    assert_eq!(msg(t), "duplicate section 'vm'");

    let t: Vec<Section> = s.iter().filter(|x| x.tag != MEMORY).cloned().collect();
    assert_eq!(msg(t), "missing memory section");

    let t: Vec<Section> = s.iter().filter(|x| x.tag != 2).cloned().collect();
    assert_eq!(msg(t), "missing vm section");

    let mut t = s.clone();
    let vcpu = t.iter_mut().find(|x| x.tag == 3).unwrap();
    vcpu.payload = b"{\"regs\": 1}".to_vec();
    assert_eq!(msg(t), "section 'vcpu 0' is malformed");

    let mut t = s.clone();
    t[1].flags = 3;
    assert_eq!(msg(t), "section 'vm' has unsupported flags 0x3");

    // A vCPU state that parses but breaks CpuState's invariants.
    let mut t = s.clone();
    let vcpu = t.iter_mut().find(|x| x.tag == 3).unwrap();
    let mut state: hv::CpuState = serde_json::from_slice(&vcpu.payload).unwrap();
    state.lapic.regs = vec![0; 4];
    vcpu.payload = serde_json::to_vec(&state).unwrap();
    assert_eq!(
        msg(t),
        "invalid state of vcpu 0: local APIC page is 4 bytes, expected 1024"
    );

    // Bitmap claiming more pages than it marks.
    let mut t = s.clone();
    let m = t.iter_mut().find(|x| x.tag == MEMORY).unwrap();
    m.payload[24] += 1;
    assert_eq!(
        msg(t),
        "invalid memory section: bitmap holds 5 pages, section says 6"
    );

    // Non-zero padding between the sections and the image.
    let mut b = bytes.clone();
    let pad = metadata_end(&bytes);
    b[pad] = 1;
    assert_eq!(
        fuzz_open(&b).unwrap_err().to_string(),
        "non-zero padding before the memory image"
    );

    // Too many sections.
    let mut t = vec![s[0].clone()];
    t.extend((0..1100).map(|_| Section {
        offset: 0,
        tag: 0x999,
        flags: 0,
        payload: vec![],
    }));
    assert_eq!(msg(t), "more than 1024 sections");
}

/// Deterministic pseudo-random mutations (a stand-in for the fuzz target in CI).
#[test]
fn random_mutations_never_panic() {
    let (bytes, _) = sample();
    let meta = metadata_end(&bytes);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..3000 {
        let mut b = bytes.clone();
        for _ in 0..1 + next() % 8 {
            let i = (next() as usize) % meta;
            b[i] = next() as u8;
        }
        if next() % 4 == 0 {
            b.truncate((next() as usize) % b.len());
        }
        let _ = fuzz_open(&b);
    }
}

/// The spec names CRC-32C by its check value; pin it.
#[test]
fn checksum_is_crc32c() {
    assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
}

#[test]
fn a_version_1_0_file_without_chunk_sums_still_verifies() {
    let (bytes, contents) = sample();
    let (_, mut s, mut image) = split(&bytes);
    assert!(
        s.iter().any(|s| s.tag == 6),
        "the writer emits memory-chunks"
    );
    s.retain(|s| s.tag != 6);
    let old = join((1, 0), &s, &image);
    let r = open_bytes(&old).unwrap();
    assert_eq!(r.contents(), &contents);
    assert!(!r.has_chunk_sums());
    r.verify_memory().unwrap();
    // Without chunk sums a damaged stored page is caught by the whole-image checksum.
    let page = (0..image.len() / 4096)
        .find(|p| image[p * 4096..(p + 1) * 4096].iter().any(|&x| x != 0))
        .unwrap();
    image[page * 4096] ^= 1;
    let e = open_bytes(&join((1, 0), &s, &image))
        .unwrap()
        .verify_memory()
        .unwrap_err();
    assert!(matches!(e, Error::MemoryChecksum), "{e}");
}
