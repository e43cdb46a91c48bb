//! virtio-blk on virtio-queue's mock queue: each request type, read-only refusal, and one test
//! per hostile descriptor layout.

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

use virtio_queue::QueueT;
use virtio_queue::desc::RawDescriptor;

use super::*;
use crate::testutil::{Buf, DATA, Driver, MEM_SIZE, TempDir, memory, pattern, r, w};

const HDR: u64 = 0x8_0000;
const STATUS: u64 = 0x9_0000;
const DISK_SIZE: usize = 1 << 20;

struct Fixture {
    _dir: TempDir,
    path: PathBuf,
    dev: Block,
}

fn fixture(readonly: bool) -> Fixture {
    let dir = TempDir::new("blk");
    let path = dir.path("disk0.raw");
    std::fs::write(&path, pattern(DISK_SIZE, 7)).unwrap();
    let dev = Block::new(BlockConfig {
        path: path.clone(),
        readonly,
        format: None,
    })
    .unwrap();
    Fixture {
        _dir: dir,
        path,
        dev,
    }
}

fn header(d: &Driver, typ: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&typ.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    d.fill(HDR, &h);
    d.fill(STATUS, &[0xff]);
}

/// Submits one chain, processes the queue; returns the device's result.
fn run(dev: &mut Block, d: &mut Driver, bufs: &[Buf]) -> Result<bool, DeviceError> {
    d.add(bufs);
    d.process(dev)
}

fn status(d: &Driver) -> u8 {
    d.read(STATUS, 1)[0]
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn features_and_config() {
    let f = fixture(false);
    let feats = f.dev.features();
    for bit in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
    ] {
        assert_ne!(feats & (1 << bit), 0, "bit {bit}");
    }
    assert_eq!(feats & (1 << VIRTIO_BLK_F_RO), 0);
    let mut cap = [0u8; 8];
    f.dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), (DISK_SIZE / 512) as u64);
    let mut blk = [0u8; 4];
    f.dev.read_config(20, &mut blk);
    assert_eq!(u32::from_le_bytes(blk), 512);
    let mut past = [0xffu8; 4];
    f.dev.read_config(200, &mut past);
    assert_eq!(past, [0; 4]);
}

#[test]
fn read_request() {
    let mut f = fixture(false);
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    header(&d, VIRTIO_BLK_T_IN, 2);
    // Data split over two descriptors.
    let res = run(
        &mut f.dev,
        &mut d,
        &[
            r(HDR, 16),
            w(DATA, 512),
            w(DATA + 0x1000, 1024),
            w(STATUS, 1),
        ],
    );
    assert!(res.unwrap());
    assert_eq!(status(&d), OK);
    let disk = pattern(DISK_SIZE, 7);
    assert_eq!(d.read(DATA, 512), disk[1024..1536]);
    assert_eq!(d.read(DATA + 0x1000, 1024), disk[1536..2560]);
    assert_eq!(d.used(0), (0, 1536 + 1));
    assert_eq!(f.dev.counters().bytes_read, 1536);
}

#[test]
fn read_through_indirect_table() {
    let mut f = fixture(false);
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    header(&d, VIRTIO_BLK_T_IN, 0);
    d.add_indirect(0x7_0000, &[r(HDR, 16), w(DATA, 4096), w(STATUS, 1)]);
    d.process(&mut f.dev).unwrap();
    assert_eq!(status(&d), OK);
    assert_eq!(d.read(DATA, 4096), pattern(DISK_SIZE, 7)[..4096]);
}

#[test]
fn write_request() {
    let mut f = fixture(false);
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    header(&d, VIRTIO_BLK_T_OUT, 8);
    let data = pattern(2048, 99);
    d.fill(DATA, &data);
    run(
        &mut f.dev,
        &mut d,
        &[r(HDR, 16), r(DATA, 2048), w(STATUS, 1)],
    )
    .unwrap();
    assert_eq!(status(&d), OK);
    assert_eq!(d.used(0).1, 1);
    let file = std::fs::read(&f.path).unwrap();
    assert_eq!(file[4096..4096 + 2048], data[..]);
    assert_eq!(file[..4096], pattern(DISK_SIZE, 7)[..4096]);
}

#[test]
fn header_and_data_in_one_descriptor() {
    // Drivers may merge header and data (VIRTIO_F_ANY_LAYOUT is implied by VERSION_1).
    let mut f = fixture(false);
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    header(&d, VIRTIO_BLK_T_OUT, 0);
    d.fill(HDR + 16, &[0x5a; 512]);
    run(&mut f.dev, &mut d, &[r(HDR, 16 + 512), w(STATUS, 1)]).unwrap();
    assert_eq!(status(&d), OK);
    assert_eq!(std::fs::read(&f.path).unwrap()[..512], [0x5a; 512]);
}

#[test]
fn flush_request() {
    let mut f = fixture(false);
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    header(&d, VIRTIO_BLK_T_FLUSH, 0);
    run(&mut f.dev, &mut d, &[r(HDR, 16), w(STATUS, 1)]).unwrap();
    assert_eq!(status(&d), OK);
}

#[test]
fn get_id_request() {
    let mut f = fixture(false);
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    header(&d, VIRTIO_BLK_T_GET_ID, 0);
    run(&mut f.dev, &mut d, &[r(HDR, 16), w(DATA, 20), w(STATUS, 1)]).unwrap();
    assert_eq!(status(&d), OK);
    let id = d.read(DATA, 20);
    assert_eq!(&id[..9], b"disk0.raw");
    assert!(id[9..].iter().all(|&b| b == 0));
    assert_eq!(d.used(0).1, 21);
}

fn range(sector: u64, num: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}

#[test]
fn write_zeroes_request() {
    let mut f = fixture(false);
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    header(&d, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    d.fill(DATA, &range(4, 8, 0));
    run(&mut f.dev, &mut d, &[r(HDR, 16), r(DATA, 16), w(STATUS, 1)]).unwrap();
    assert_eq!(status(&d), OK);
    let file = std::fs::read(&f.path).unwrap();
    assert!(file[2048..2048 + 4096].iter().all(|&b| b == 0));
    assert_eq!(file[..2048], pattern(DISK_SIZE, 7)[..2048]);
    assert_eq!(file[6144..8192], pattern(DISK_SIZE, 7)[6144..8192]);
}

#[test]
fn discard_request() {
    let mut f = fixture(false);
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    header(&d, VIRTIO_BLK_T_DISCARD, 0);
    d.fill(DATA, &range(0, 16, 0));
    run(&mut f.dev, &mut d, &[r(HDR, 16), r(DATA, 16), w(STATUS, 1)]).unwrap();
    assert_eq!(status(&d), OK);
    // The unmap flag is reserved for discard.
    header(&d, VIRTIO_BLK_T_DISCARD, 0);
    d.fill(DATA, &range(0, 16, 1));
    run(&mut f.dev, &mut d, &[r(HDR, 16), r(DATA, 16), w(STATUS, 1)]).unwrap();
    assert_eq!(status(&d), UNSUPP);
    // Beyond the disk.
    header(&d, VIRTIO_BLK_T_DISCARD, 0);
    d.fill(DATA, &range((DISK_SIZE / 512) as u64 - 1, 2, 0));
    run(&mut f.dev, &mut d, &[r(HDR, 16), r(DATA, 16), w(STATUS, 1)]).unwrap();
    assert_eq!(status(&d), IOERR);
    // More segments than max_discard_seg.
    header(&d, VIRTIO_BLK_T_DISCARD, 0);
    run(&mut f.dev, &mut d, &[r(HDR, 16), r(DATA, 32), w(STATUS, 1)]).unwrap();
    assert_eq!(status(&d), UNSUPP);
}

#[test]
fn readonly_disk_refuses_writes() {
    let mut f = fixture(true);
    assert_ne!(f.dev.features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(f.dev.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    header(&d, VIRTIO_BLK_T_OUT, 0);
    run(
        &mut f.dev,
        &mut d,
        &[r(HDR, 16), r(DATA, 512), w(STATUS, 1)],
    )
    .unwrap();
    assert_eq!(status(&d), IOERR);
    header(&d, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    d.fill(DATA, &range(0, 1, 0));
    run(&mut f.dev, &mut d, &[r(HDR, 16), r(DATA, 16), w(STATUS, 1)]).unwrap();
    assert_ne!(status(&d), OK);
    assert_eq!(std::fs::read(&f.path).unwrap(), pattern(DISK_SIZE, 7));
    // Reads still work.
    header(&d, VIRTIO_BLK_T_IN, 0);
    run(
        &mut f.dev,
        &mut d,
        &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)],
    )
    .unwrap();
    assert_eq!(status(&d), OK);
    assert_eq!(f.dev.counters().errors, 2);
}

#[test]
fn unsupported_request_type() {
    let mut f = fixture(false);
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    for typ in [2, 10, 14, 0xdead] {
        header(&d, typ, 0);
        run(&mut f.dev, &mut d, &[r(HDR, 16), w(STATUS, 1)]).unwrap();
        assert_eq!(status(&d), UNSUPP, "type {typ}");
    }
}

#[test]
fn out_of_range_and_partial_sectors_fail() {
    let mut f = fixture(false);
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    let last = (DISK_SIZE / 512) as u64;
    for (sector, len) in [
        (last, 512),
        (last - 1, 1024),
        (u64::MAX / 256, 512),
        (0, 100),
    ] {
        header(&d, VIRTIO_BLK_T_IN, sector);
        run(
            &mut f.dev,
            &mut d,
            &[r(HDR, 16), w(DATA, len), w(STATUS, 1)],
        )
        .unwrap();
        assert_eq!(status(&d), IOERR, "sector {sector} len {len}");
    }
}

#[test]
fn event_idx_suppresses_and_requests_interrupts() {
    let mut f = fixture(false);
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    header(&d, VIRTIO_BLK_T_FLUSH, 0);
    d.add(&[r(HDR, 16), w(STATUS, 1)]);
    d.queue.set_event_idx(true);
    d.set_used_event(5);
    assert!(!d.process(&mut f.dev).unwrap());
    d.set_used_event(1);
    d.add(&[r(HDR, 16), w(STATUS, 1)]);
    assert!(d.process(&mut f.dev).unwrap());
}

// ---- hostile descriptors: each ends in an error status or DEVICE_NEEDS_RESET ----

#[test]
fn hostile_descriptor_loop() {
    let mut f = fixture(false);
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    header(&d, VIRTIO_BLK_T_IN, 0);
    let next = VRING_DESC_F_NEXT as u16;
    d.write_desc(0, HDR, 16, next, 1);
    d.write_desc(1, DATA, 512, next | VRING_DESC_F_WRITE as u16, 0);
    d.publish(0);
    let e = d.process(&mut f.dev).unwrap_err();
    assert!(matches!(e, DeviceError::InvalidChain), "{e}");
    assert_eq!(f.dev.counters().invalid_descriptors, 1);
}

#[test]
fn hostile_chain_longer_than_queue() {
    // Every descriptor of the table chained, the last pointing back to the first.
    let mut f = fixture(false);
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    for i in 0..16u16 {
        d.write_desc(i, DATA, 512, VRING_DESC_F_NEXT as u16, (i + 1) % 16);
    }
    d.publish(0);
    assert!(d.process(&mut f.dev).is_err());
}

#[test]
fn hostile_indirect_table_longer_than_seg_max() {
    let mut f = fixture(false);
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    header(&d, VIRTIO_BLK_T_IN, 0);
    let mut bufs = vec![r(HDR, 16)];
    bufs.extend((0..300).map(|i| w(DATA + i * 512, 512)));
    bufs.push(w(STATUS, 1));
    d.add_indirect(0x7_0000, &bufs);
    assert!(matches!(
        d.process(&mut f.dev),
        Err(DeviceError::InvalidChain)
    ));
}

#[test]
fn hostile_next_index_outside_table() {
    let mut f = fixture(false);
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    d.write_desc(0, HDR, 16, VRING_DESC_F_NEXT as u16, 16);
    d.publish(0);
    assert!(d.process(&mut f.dev).is_err());
}

#[test]
fn hostile_head_index_outside_table() {
    let mut f = fixture(false);
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    d.publish(200);
    assert!(d.process(&mut f.dev).is_err());
}

#[test]
fn hostile_avail_index_too_far_ahead() {
    let mut f = fixture(false);
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    d.set_avail_idx(17);
    assert!(matches!(d.process(&mut f.dev), Err(DeviceError::Queue(_))));
}

#[test]
fn hostile_data_outside_ram() {
    let mut f = fixture(false);
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    header(&d, VIRTIO_BLK_T_IN, 0);
    run(
        &mut f.dev,
        &mut d,
        &[r(HDR, 16), w(MEM_SIZE - 256, 512), w(STATUS, 1)],
    )
    .unwrap();
    assert_eq!(status(&d), IOERR);
    header(&d, VIRTIO_BLK_T_OUT, 0);
    run(
        &mut f.dev,
        &mut d,
        &[r(HDR, 16), r(1 << 40, 512), w(STATUS, 1)],
    )
    .unwrap();
    assert_eq!(status(&d), IOERR);
    assert_eq!(std::fs::read(&f.path).unwrap(), pattern(DISK_SIZE, 7));
}

#[test]
fn hostile_header_outside_ram() {
    let mut f = fixture(false);
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    d.fill(STATUS, &[0xff]);
    run(&mut f.dev, &mut d, &[r(u64::MAX - 8, 16), w(STATUS, 1)]).unwrap();
    assert_eq!(status(&d), IOERR);
}

#[test]
fn hostile_short_header() {
    let mut f = fixture(false);
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    header(&d, VIRTIO_BLK_T_IN, 0);
    run(&mut f.dev, &mut d, &[r(HDR, 8), w(STATUS, 1)]).unwrap();
    assert_eq!(status(&d), IOERR);
}

#[test]
fn hostile_status_outside_ram() {
    let mut f = fixture(false);
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    header(&d, VIRTIO_BLK_T_IN, 0);
    let res = run(
        &mut f.dev,
        &mut d,
        &[r(HDR, 16), w(DATA, 512), w(MEM_SIZE + 4096, 1)],
    );
    assert!(matches!(res, Err(DeviceError::Memory(_))));
}

#[test]
fn hostile_status_not_writable() {
    let mut f = fixture(false);
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    header(&d, VIRTIO_BLK_T_IN, 0);
    let res = run(
        &mut f.dev,
        &mut d,
        &[r(HDR, 16), w(DATA, 512), r(STATUS, 1)],
    );
    assert!(matches!(res, Err(DeviceError::NoStatus)));
}

#[test]
fn hostile_zero_length_status() {
    let mut f = fixture(false);
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    header(&d, VIRTIO_BLK_T_FLUSH, 0);
    let res = run(&mut f.dev, &mut d, &[r(HDR, 16), w(STATUS, 0)]);
    assert!(matches!(res, Err(DeviceError::NoStatus)));
}

#[test]
fn zero_length_data_descriptor_is_harmless() {
    let mut f = fixture(false);
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    header(&d, VIRTIO_BLK_T_IN, 0);
    run(
        &mut f.dev,
        &mut d,
        &[r(HDR, 16), w(DATA, 0), w(DATA, 512), w(STATUS, 1)],
    )
    .unwrap();
    assert_eq!(status(&d), OK);
}

#[test]
fn hostile_huge_length() {
    // 4 GiB - 512 of "data" in one descriptor: refused before any allocation or I/O.
    let mut f = fixture(false);
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    header(&d, VIRTIO_BLK_T_IN, 0);
    run(
        &mut f.dev,
        &mut d,
        &[r(HDR, 16), w(DATA, 0xffff_fe00), w(STATUS, 1)],
    )
    .unwrap();
    assert_eq!(status(&d), IOERR);
    header(&d, VIRTIO_BLK_T_OUT, 0);
    run(
        &mut f.dev,
        &mut d,
        &[r(HDR, 16), r(DATA, 0xffff_fe00), w(STATUS, 1)],
    )
    .unwrap();
    assert_eq!(status(&d), IOERR);
}

#[test]
fn hostile_chain_over_4gib_total() {
    // virtio-queue stops a chain whose lengths overflow u32; we see it as cut short.
    let mut f = fixture(false);
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    header(&d, VIRTIO_BLK_T_IN, 0);
    let res = run(
        &mut f.dev,
        &mut d,
        &[
            r(HDR, 16),
            w(DATA, u32::MAX),
            w(DATA, u32::MAX),
            w(STATUS, 1),
        ],
    );
    assert!(matches!(res, Err(DeviceError::InvalidChain)));
}

#[test]
fn hostile_indirect_table_bad_length() {
    let mut f = fixture(false);
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    d.write_desc(0, 0x7_0000, 17, VRING_DESC_F_INDIRECT as u16, 0);
    d.publish(0);
    assert!(matches!(
        d.process(&mut f.dev),
        Err(DeviceError::InvalidChain)
    ));
}

#[test]
fn hostile_indirect_table_outside_ram() {
    let mut f = fixture(false);
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    d.write_desc(0, MEM_SIZE - 16, 64, VRING_DESC_F_INDIRECT as u16, 0);
    d.publish(0);
    assert!(d.process(&mut f.dev).is_err());
}

#[test]
fn hostile_nested_indirect_table() {
    let mut f = fixture(false);
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    // The indirect table's first entry is itself indirect.
    let nested = RawDescriptor::from(virtio_queue::desc::split::Descriptor::new(
        0x7_1000,
        32,
        VRING_DESC_F_INDIRECT as u16,
        0,
    ));
    mem.write_obj(nested, GuestAddress(0x7_0000)).unwrap();
    d.write_desc(0, 0x7_0000, 16, VRING_DESC_F_INDIRECT as u16, 0);
    d.publish(0);
    assert!(d.process(&mut f.dev).is_err());
}

#[test]
fn hostile_readable_after_writable() {
    let mut f = fixture(false);
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    header(&d, VIRTIO_BLK_T_IN, 0);
    run(
        &mut f.dev,
        &mut d,
        &[r(HDR, 16), w(DATA, 512), r(DATA, 512), w(STATUS, 1)],
    )
    .unwrap();
    assert_eq!(status(&d), IOERR);
}

// ---- saved state ----

#[test]
fn block_state_round_trip_and_checks() {
    let mut f = fixture(false);
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    header(&d, VIRTIO_BLK_T_FLUSH, 0);
    run(&mut f.dev, &mut d, &[r(HDR, 16), w(STATUS, 1)]).unwrap();
    let s = f.dev.save();
    let mut other = Block::new(BlockConfig {
        path: f.path.clone(),
        readonly: false,
        format: Some(Format::Raw),
    })
    .unwrap();
    other.restore(&s).unwrap();
    assert_eq!(other.save(), s);
    let DeviceState::Block(good) = s else {
        panic!("block state")
    };
    type Mutation = fn(&mut BlockState);
    let cases: &[Mutation] = &[
        |s| s.capacity_sectors += 1,
        |s| s.readonly = true,
        |s| s.features ^= 1 << VIRTIO_BLK_F_FLUSH,
    ];
    for m in cases {
        let mut bad = good.clone();
        m(&mut bad);
        assert!(other.restore(&DeviceState::Block(bad)).is_err());
    }
}

#[test]
fn format_raw_on_a_qcow2_file_gives_raw_access() {
    let dir = TempDir::new("blkfmt");
    let path = dir.path("x.img");
    let mut content = b"QFI\xfb".to_vec();
    content.resize(4096, 0);
    std::fs::write(&path, &content).unwrap();
    let dev = Block::new(BlockConfig {
        path: path.clone(),
        readonly: true,
        format: Some(Format::Raw),
    })
    .unwrap();
    assert_eq!(dev.capacity_sectors(), 8);
    // Detection says qcow2, and this is not a valid qcow2 image.
    let e = Block::new(BlockConfig {
        path,
        readonly: true,
        format: None,
    });
    assert!(e.is_err());
}

/// The device over a qcow2 image (the format itself is tested in the `disk` crate).
#[test]
fn block_device_over_qcow2() {
    if !have_qemu_img("block_device_over_qcow2") {
        return;
    }
    use crate::testutil::{have_qemu_img, path_str, run as tool};
    let dir = TempDir::new("q2blk");
    let p = dir.path("d.qcow2");
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", path_str(&p), "1M"],
    );
    let mut dev = Block::new(BlockConfig {
        path: p.clone(),
        readonly: false,
        format: None,
    })
    .unwrap();
    assert_eq!(dev.capacity_sectors(), 2048);
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    let mut h = [0u8; 16];
    h[0] = 1; // OUT
    h[8] = 3; // sector 3
    d.fill(0x8_0000, &h);
    d.fill(DATA, &[0xee; 1024]);
    d.add(&[r(0x8_0000, 16), r(DATA, 1024), w(0x9_0000, 1)]);
    d.process(&mut dev).unwrap();
    assert_eq!(d.read(0x9_0000, 1)[0], 0);
    // Read back sectors 1..9 into a dirty buffer: zeros (a zero mapping), the data (a file
    // mapping of the new cluster), zeros again.
    h[0] = 0; // IN
    h[8] = 1;
    d.fill(0x8_0000, &h);
    d.fill(DATA, &[0x77; 4096]);
    d.add(&[r(0x8_0000, 16), w(DATA, 4096), w(0x9_0000, 1)]);
    d.process(&mut dev).unwrap();
    assert_eq!(d.read(0x9_0000, 1)[0], 0);
    let got = d.read(DATA, 4096);
    assert!(got[..1024].iter().all(|&b| b == 0));
    assert!(got[1024..2048].iter().all(|&b| b == 0xee));
    assert!(got[2048..].iter().all(|&b| b == 0));
    drop(dev);
    tool("qemu-img", &["check", path_str(&p)]);
    let out = dir.path("converted.raw");
    tool(
        "qemu-img",
        &["convert", "-O", "raw", path_str(&p), path_str(&out)],
    );
    let raw = std::fs::read(&out).unwrap();
    assert!(raw[1536..2560].iter().all(|&b| b == 0xee));
    assert!(raw[..1536].iter().all(|&b| b == 0));
}

/// Pages of `mem` written since the last call (what migration reads), inside `[from, to)`.
fn dirty_pages(mem: &GuestMemory, from: u64, to: u64) -> Vec<u64> {
    let region = mem.iter().next().unwrap();
    let words = std::ops::Deref::deref(region).bitmap().get_and_reset();
    let mut pages = Vec::new();
    for (i, word) in (0u64..).zip(words) {
        for bit in 0..64 {
            let page = i * 64 + bit;
            if word & (1 << bit) != 0 && (from / 4096..to.div_ceil(4096)).contains(&page) {
                pages.push(page);
            }
        }
    }
    pages
}

/// Scattered guest buffers of varied sizes (whole sectors, not page aligned), with gaps; the
/// pages they touch.
fn scattered(count: u64, writable: bool) -> (Vec<Buf>, Vec<(u64, u64)>, Vec<u64>) {
    let mut bufs = Vec::new();
    let mut pieces = Vec::new();
    let mut pages = std::collections::BTreeSet::new();
    let mut addr = DATA + 0x200;
    for i in 0..count {
        let len = 512 * (1 + (i * 7) % 16);
        bufs.push(if writable {
            w(addr, len as u32)
        } else {
            r(addr, len as u32)
        });
        pieces.push((addr, len));
        pages.extend(addr / 4096..(addr + len).div_ceil(4096));
        addr += len + 0x1200 * (i % 3);
    }
    (bufs, pieces, pages.into_iter().collect())
}

/// A request of many small buffers on a raw image reads straight from the file into each of
/// them (one `preadv`), and marks exactly their pages dirty.
#[test]
fn scattered_read_is_exact_and_marks_dirty_pages() {
    let mut f = fixture(false);
    let mem = memory();
    let mut d = Driver::new(&mem, 256);
    header(&d, VIRTIO_BLK_T_IN, 5);
    let (data, pieces, pages) = scattered(60, true);
    let total: u64 = pieces.iter().map(|p| p.1).sum();
    let mut chain = vec![r(HDR, 16)];
    chain.extend(data);
    chain.push(w(STATUS, 1));
    dirty_pages(&mem, 0, MEM_SIZE);
    run(&mut f.dev, &mut d, &chain).unwrap();
    assert_eq!(status(&d), OK);
    let disk = pattern(DISK_SIZE, 7);
    let mut at = 5 * 512;
    for &(addr, len) in &pieces {
        assert_eq!(d.read(addr, len as usize), disk[at..at + len as usize]);
        at += len as usize;
    }
    assert_eq!(f.dev.counters().bytes_read, total);
    assert_eq!(dirty_pages(&mem, DATA, DATA + 0x10_0000), pages);
}

/// The same the other way: many small buffers written with one `pwritev`.
#[test]
fn scattered_write_lands_in_the_file() {
    let mut f = fixture(false);
    let mem = memory();
    let mut d = Driver::new(&mem, 256);
    header(&d, VIRTIO_BLK_T_OUT, 9);
    let (data, pieces, _) = scattered(60, false);
    let mut expect = Vec::new();
    for (i, &(addr, len)) in pieces.iter().enumerate() {
        let bytes = pattern(len as usize, i as u8 + 20);
        d.fill(addr, &bytes);
        expect.extend(bytes);
    }
    let mut chain = vec![r(HDR, 16)];
    chain.extend(data);
    chain.push(w(STATUS, 1));
    run(&mut f.dev, &mut d, &chain).unwrap();
    assert_eq!(status(&d), OK);
    drop(f.dev);
    let file = std::fs::read(&f.path).unwrap();
    assert_eq!(file[9 * 512..9 * 512 + expect.len()], expect[..]);
    // Untouched around it.
    let orig = pattern(DISK_SIZE, 7);
    assert_eq!(file[..9 * 512], orig[..9 * 512]);
    let end = 9 * 512 + expect.len();
    assert_eq!(file[end..], orig[end..]);
}

/// An image without a file mapping (`DiskFile::map`'s default): requests larger than
/// `disk::CHUNK` go through `read_at`/`write_at` in chunks whose borders cut guest buffers.
#[test]
fn unmapped_image_goes_through_the_bounce_buffer() {
    struct VecDisk(Vec<u8>);
    impl DiskFile for VecDisk {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            buf.copy_from_slice(&self.0[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&mut self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
            self.0[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
        fn format(&self) -> Format {
            Format::Raw
        }
        fn readonly(&self) -> bool {
            false
        }
    }
    let size = 4 << 20;
    let mut dev = Block::with_disk(Box::new(VecDisk(pattern(size, 3))), false, Path::new("vec"));
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    // 3 x 700 KiB: the 1 MiB chunk border falls inside the second buffer.
    let len = 700 * 1024u64;
    let addrs = [DATA, DATA + 0x20_0000, DATA + 0x40_0000];
    header(&d, VIRTIO_BLK_T_IN, 1);
    let mut chain = vec![r(HDR, 16)];
    chain.extend(addrs.iter().map(|&a| w(a, len as u32)));
    chain.push(w(STATUS, 1));
    dirty_pages(&mem, 0, MEM_SIZE);
    run(&mut dev, &mut d, &chain).unwrap();
    assert_eq!(status(&d), OK);
    let disk = pattern(size, 3);
    for (i, &a) in addrs.iter().enumerate() {
        let at = 512 + i * len as usize;
        assert_eq!(d.read(a, len as usize), disk[at..at + len as usize], "{i}");
    }
    let want: Vec<u64> = addrs
        .iter()
        .flat_map(|&a| a / 4096..(a + len).div_ceil(4096))
        .collect();
    assert_eq!(dirty_pages(&mem, DATA, DATA + 0x60_0000), want);
    // Write them back shifted by one sector, and read the disk through the device again.
    header(&d, VIRTIO_BLK_T_OUT, 2);
    let mut chain = vec![r(HDR, 16)];
    chain.extend(addrs.iter().map(|&a| r(a, len as u32)));
    chain.push(w(STATUS, 1));
    run(&mut dev, &mut d, &chain).unwrap();
    assert_eq!(status(&d), OK);
    header(&d, VIRTIO_BLK_T_IN, 2);
    let back = DATA + 0x60_0000;
    run(
        &mut dev,
        &mut d,
        &[r(HDR, 16), w(back, 3 * len as u32), w(STATUS, 1)],
    )
    .unwrap();
    assert_eq!(status(&d), OK);
    assert_eq!(
        d.read(back, 3 * len as usize),
        disk[512..512 + 3 * len as usize]
    );
}

/// Measurement, not a check of speed (run with `--ignored --nocapture`; docs/benchmarks.md):
/// host-side cost of 1 MiB requests made of 256 scattered 4 KiB guest pages on a raw image in
/// the page cache, the shape Linux sends for a large O_DIRECT transfer. Checks the data.
#[test]
#[ignore = "measurement; run by hand"]
fn measure_scattered_1mib_requests() {
    let dir = TempDir::new("blkmeasure");
    let path = dir.path("m.raw");
    let disk_len = 16usize << 20;
    std::fs::write(&path, pattern(disk_len, 5)).unwrap();
    let mut dev = Block::new(BlockConfig {
        path: path.clone(),
        readonly: false,
        format: None,
    })
    .unwrap();
    let mem = memory();
    let mut d = Driver::new(&mem, 256);
    // Every other page from DATA: 256 pages over 2 MiB.
    let pages: Vec<u64> = (0..254).map(|i| DATA + i * 0x2000).collect();
    let rounds = 400u32;
    for (name, typ) in [("read", VIRTIO_BLK_T_IN), ("write", VIRTIO_BLK_T_OUT)] {
        let t = std::time::Instant::now();
        for i in 0..rounds {
            // A fresh queue now and then: the mock driver's rings misbehave after 128 chains
            // of 256 descriptors.
            if i % 100 == 0 {
                d = Driver::new(&mem, 256);
            }
            let sector = u64::from(i % 15) * 2048;
            header(&d, typ, sector);
            let mut chain = vec![r(HDR, 16)];
            chain.extend(pages.iter().map(|&a| {
                if typ == VIRTIO_BLK_T_IN {
                    w(a, 4096)
                } else {
                    r(a, 4096)
                }
            }));
            chain.push(w(STATUS, 1));
            run(&mut dev, &mut d, &chain).unwrap();
            assert_eq!(status(&d), OK, "{name} round {i}");
        }
        let secs = t.elapsed().as_secs_f64();
        let mb = f64::from(rounds) * 254.0 * 4096.0 / 1e6;
        println!(
            "scattered {name}: {:.0} MB/s ({:.1} us per 1016 KiB request)",
            mb / secs,
            secs * 1e6 / f64::from(rounds)
        );
    }
    // The last read request (sector 14 * 2048 after the writes) holds what the writes put there.
    let disk = std::fs::read(&path).unwrap();
    let at = 14 * 2048 * 512;
    assert_eq!(d.read(pages[0], 4096), disk[at..at + 4096]);
}
