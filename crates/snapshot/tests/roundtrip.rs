//! Write → read round trips, sparseness, lazy private mapping, atomic replacement.
//! Needs: a filesystem with holes (ext4, xfs, tmpfs, btrfs). No root, no KVM.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::MetadataExt;

use common::*;
use snapshot::{Error, SnapshotReader, SnapshotWriter};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

fn read_all(m: &hv::GuestMemory) -> Vec<(u64, Vec<u8>)> {
    m.iter()
        .map(|r| {
            let mut v = vec![0u8; r.len() as usize];
            m.read_slice(&mut v, r.start_addr()).unwrap();
            (r.start_addr().0, v)
        })
        .collect()
}

#[test]
fn round_trip_states_and_memory() {
    let dir = Scratch::new("rt");
    let (path, contents, mem) = write_small(&dir);
    let r = SnapshotReader::open(&path).unwrap();
    assert_eq!(r.contents(), &contents);
    assert_eq!(r.version(), (1, 1));
    assert!(
        r.has_chunk_sums(),
        "1.1 files carry per-chunk memory checksums"
    );
    // Pages with data: 0, 5, 0xfe, 0xff in region 0; the last page of region 1.
    assert_eq!(r.stored_pages(), 5);
    let mapped = r.map_memory().unwrap();
    assert_eq!(read_all(&mapped), read_all(&mem));
    r.verify_memory().unwrap();
    // Memory stays readable after the reader (and its file handle) is gone.
    assert_eq!(r.into_contents(), contents);
    assert_eq!(read_all(&mapped), read_all(&mem));
    // Only the temp name was used; nothing is left besides the snapshot.
    assert_eq!(dir.entries(), vec!["vm.snap".to_string()]);
}

#[test]
fn info_reports_the_essentials() {
    let dir = Scratch::new("info");
    let (path, _, _) = write_small(&dir);
    let info = SnapshotReader::open(&path).unwrap().info();
    assert_eq!(info["format_version"], "1.1");
    assert_eq!(info["memory_checksums"], "per 2 MiB chunk");
    assert_eq!(info["cpu_model"], "portable-v2");
    assert_eq!(info["memory_bytes"], (1u64 << 20) + (64 << 10));
    assert_eq!(info["vcpus"], 2);
    assert_eq!(info["backend"], "kvm");
    assert_eq!(
        info["devices"],
        serde_json::json!(["platform", "virtio-blk0"])
    );
    assert_eq!(info["tsc_khz"], 2_500_000);
}

#[test]
fn mapping_is_private_copy_on_write() {
    let dir = Scratch::new("cow");
    let (path, _, mem) = write_small(&dir);
    let before = std::fs::read(&path).unwrap();
    let r = SnapshotReader::open(&path).unwrap();
    let mapped = r.map_memory().unwrap();
    mapped
        .write_slice(&[0xee; 4096], GuestAddress(0x1000))
        .unwrap();
    mapped.write_slice(&[0x11; 16], GuestAddress(0)).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), before);
    // A second mapping sees the file, not the first mapping's writes.
    let again = r.map_memory().unwrap();
    assert_eq!(read_all(&again), read_all(&mem));
    // Writes are recorded in the dirty bitmap (for migration after restore).
    use vm_memory::bitmap::Bitmap;
    let region = mapped.iter().next().unwrap();
    assert!(region.bitmap().dirty_at(0x1000));
    assert!(!region.bitmap().dirty_at(0x3000));
}

#[test]
fn zero_pages_are_holes_in_a_256_mib_guest() {
    let dir = Scratch::new("sparse");
    let mem = memory(&[(0, 256 << 20)]);
    for i in 0..16u64 {
        mem.write_slice(&[i as u8 + 1; 100], GuestAddress(i * (16 << 20) + 0x3000))
            .unwrap();
    }
    let contents = contents_for(&mem, 1);
    let path = dir.path("big.snap");
    let sum = SnapshotWriter::write(&path, &contents, &mem).unwrap();
    assert_eq!(sum.stored_pages, 16);
    let md = std::fs::metadata(&path).unwrap();
    assert_eq!(md.len(), sum.file_len);
    assert!(md.len() > 256 << 20);
    let allocated = md.blocks() * 512;
    assert!(allocated < 1 << 20, "{allocated} bytes allocated");

    let r = SnapshotReader::open(&path).unwrap();
    let mapped = r.map_memory().unwrap();
    let mut b = [0u8; 100];
    mapped
        .read_slice(&mut b, GuestAddress(15 * (16 << 20) + 0x3000))
        .unwrap();
    assert_eq!(b, [16; 100]);
    r.verify_memory().unwrap();
}

#[test]
fn rewriting_replaces_atomically_and_old_mapping_survives() {
    let dir = Scratch::new("replace");
    let (path, mut contents, mem) = write_small(&dir);
    let r = SnapshotReader::open(&path).unwrap();
    let mapped = r.map_memory().unwrap();
    // Change memory and state, write again under the same name.
    mem.write_slice(&[0x99; 4096], GuestAddress(0)).unwrap();
    contents.vm.clock_ns += 1;
    SnapshotWriter::write(&path, &contents, &mem).unwrap();
    // The old mapping still reads the old inode.
    let mut b = [0u8; 1];
    mapped.read_slice(&mut b, GuestAddress(0)).unwrap();
    assert_eq!(b, [0xaa]);
    let r2 = SnapshotReader::open(&path).unwrap();
    assert_eq!(r2.contents().vm.clock_ns, contents.vm.clock_ns);
    assert_eq!(read_all(&r2.map_memory().unwrap()), read_all(&mem));
    assert_eq!(dir.entries(), vec!["vm.snap".to_string()]);
}

#[test]
fn writer_refuses_inconsistent_contents() {
    let dir = Scratch::new("refuse");
    let mem = small_memory();
    let path = dir.path("x.snap");
    let check = |c: &snapshot::SnapshotContents| {
        let e = SnapshotWriter::write(&path, c, &mem).unwrap_err();
        assert!(!path.exists());
        e
    };
    let good = contents_for(&mem, 2);

    let mut c = good.clone();
    c.vcpus.pop();
    assert!(matches!(check(&c), Error::InvalidContents(_)));

    let mut c = good.clone();
    c.header.memory_regions[0].len += 4096;
    assert!(matches!(check(&c), Error::InvalidContents(_)));

    let mut c = good.clone();
    c.devices.push(("platform".into(), serde_json::Value::Null));
    assert_eq!(
        check(&c).to_string(),
        "cannot snapshot: device 'platform' appears twice"
    );

    let mut c = good.clone();
    c.vcpus[1].lapic.regs.truncate(10);
    assert!(matches!(check(&c), Error::InvalidVcpu { index: 1, .. }));

    let mut c = good.clone();
    c.devices[0].1 = serde_json::Value::String("x".repeat(17 << 20));
    assert!(matches!(check(&c), Error::SectionTooLarge { .. }));

    assert!(dir.entries().is_empty());
}

/// A real full disk: a 1 MiB tmpfs. Needs root (mount); skipped otherwise.
#[test]
fn full_disk_leaves_no_file() {
    let dir = Scratch::new("tmpfs");
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1M", "tmpfs"])
        .arg(&dir.0)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipped: cannot mount a tmpfs (not root?)");
        return;
    }
    let mem = memory(&[(0, 4 << 20)]);
    for i in 0..(4 << 20) / 4096 {
        mem.write_slice(&[1], GuestAddress(i * 4096)).unwrap();
    }
    let contents = contents_for(&mem, 1);
    let path = dir.path("full.snap");
    let err = SnapshotWriter::write(&path, &contents, &mem).unwrap_err();
    let entries = dir.entries();
    // A small snapshot still fits afterwards: the failed one released its space.
    let small = small_memory();
    let fits = SnapshotWriter::write(dir.path("ok.snap"), &contents_for(&small, 1), &small);
    let _ = std::process::Command::new("umount").arg(&dir.0).status();
    assert!(matches!(err, Error::Io { op: "write", .. }), "{err}");
    assert!(entries.is_empty(), "{entries:?}");
    fits.unwrap();
}

/// A device set that names its states itself, as a VMM's typed states do.
#[derive(Debug, PartialEq)]
struct Counters(Vec<u32>);

#[derive(Debug, thiserror::Error)]
#[error("bad record {0}")]
struct BadRecord(String);

impl snapshot::DeviceSet for Counters {
    type Error = BadRecord;
    fn to_records(&self) -> Result<snapshot::DeviceRecords, BadRecord> {
        Ok(self
            .0
            .iter()
            .enumerate()
            .map(|(i, n)| (format!("counter-{i}"), serde_json::json!({ "n": n })))
            .collect())
    }
    fn from_records(records: snapshot::DeviceRecords) -> Result<Self, BadRecord> {
        records
            .into_iter()
            .enumerate()
            .map(|(i, (name, v))| {
                let n = v["n"].as_u64().and_then(|n| u32::try_from(n).ok());
                match n {
                    Some(n) if name == format!("counter-{i}") => Ok(n),
                    _ => Err(BadRecord(name)),
                }
            })
            .collect::<Result<_, _>>()
            .map(Counters)
    }
}

/// Typed device states are written as the file's named device sections, read back as records
/// and decoded; as JSON (a migration's final state) the contents keep the record shape
/// `"devices": [[name, state], ...]`, and a bad record is refused when decoding.
#[test]
fn typed_device_sets_round_trip_as_named_records() {
    let dir = Scratch::new("typed");
    let memory = small_memory();
    let plain = contents_for(&memory, 1);
    let typed = snapshot::SnapshotContents {
        header: plain.header.clone(),
        vcpus: plain.vcpus.clone(),
        vm: plain.vm,
        devices: Counters(vec![7, 9]),
    };
    let path = dir.path("typed.snap");
    SnapshotWriter::write(&path, &typed, &memory).unwrap();
    let reader = SnapshotReader::open(&path).unwrap();
    assert_eq!(
        reader.contents().devices,
        vec![
            ("counter-0".to_string(), serde_json::json!({"n": 7})),
            ("counter-1".to_string(), serde_json::json!({"n": 9})),
        ]
    );
    let back: snapshot::SnapshotContents<Counters> =
        reader.into_contents().decode_devices().unwrap();
    assert_eq!(back, typed);

    let json = serde_json::to_value(&typed).unwrap();
    assert_eq!(
        json["devices"],
        serde_json::json!([["counter-0", {"n": 7}], ["counter-1", {"n": 9}]])
    );
    let records: snapshot::SnapshotContents = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(records.devices.len(), 2);
    let again: snapshot::SnapshotContents<Counters> = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(again, typed);
    let mut bad = json;
    bad["devices"][1][0] = serde_json::json!("counter-7");
    let e = serde_json::from_value::<snapshot::SnapshotContents<Counters>>(bad).unwrap_err();
    assert!(e.to_string().contains("bad record counter-7"), "{e}");
}
