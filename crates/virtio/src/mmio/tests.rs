use std::sync::Arc;

use super::*;
use crate::testutil::{CountingIrq, DATA, Driver, irq, memory, w};
use crate::{Rng, RngState};

fn rng_transport(mem: &GuestMemory) -> (MmioTransport, Arc<CountingIrq>) {
    let i = irq();
    let t = MmioTransport::new(
        Box::new(Rng::new().unwrap()),
        Arc::new(mem.clone()),
        i.clone(),
    )
    .unwrap();
    (t, i)
}

fn rd(t: &MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn wr(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn features(t: &mut MmioTransport) -> u64 {
    wr(t, reg::DEVICE_FEATURES_SEL, 1);
    let hi = rd(t, reg::DEVICE_FEATURES);
    wr(t, reg::DEVICE_FEATURES_SEL, 0);
    u64::from(hi) << 32 | u64::from(rd(t, reg::DEVICE_FEATURES))
}

fn ack_features(t: &mut MmioTransport, f: u64) {
    wr(t, reg::DRIVER_FEATURES_SEL, 1);
    wr(t, reg::DRIVER_FEATURES, (f >> 32) as u32);
    wr(t, reg::DRIVER_FEATURES_SEL, 0);
    wr(t, reg::DRIVER_FEATURES, f as u32);
}

fn setup_queue(t: &mut MmioTransport, d: &Driver) {
    wr(t, reg::QUEUE_SEL, 0);
    assert_eq!(rd(t, reg::QUEUE_READY), 0);
    let max = rd(t, reg::QUEUE_NUM_MAX);
    assert!(max >= 16);
    wr(t, reg::QUEUE_NUM, 16);
    let desc = d.mq.desc_table_addr().0;
    let avail = d.mq.avail_addr().0;
    let used = d.mq.used_addr().0;
    wr(t, reg::QUEUE_DESC_LOW, desc as u32);
    wr(t, reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
    wr(t, reg::QUEUE_AVAIL_LOW, avail as u32);
    wr(t, reg::QUEUE_AVAIL_HIGH, (avail >> 32) as u32);
    wr(t, reg::QUEUE_USED_LOW, used as u32);
    wr(t, reg::QUEUE_USED_HIGH, (used >> 32) as u32);
    wr(t, reg::QUEUE_READY, 1);
}

/// What Linux's virtio_mmio + virtio core do at probe time.
fn linux_probe(t: &mut MmioTransport, d: &Driver) {
    wr(t, reg::STATUS, 0);
    wr(t, reg::STATUS, ACK);
    wr(t, reg::STATUS, ACK | DRIVER);
    let f = features(t);
    ack_features(t, f);
    wr(t, reg::STATUS, ACK | DRIVER | FEATURES_OK);
    assert_eq!(rd(t, reg::STATUS), ACK | DRIVER | FEATURES_OK);
    setup_queue(t, d);
    wr(t, reg::STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
}

#[test]
fn identity_registers() {
    let mem = memory();
    let (t, _) = rng_transport(&mem);
    assert_eq!(rd(&t, reg::MAGIC), 0x7472_6976);
    assert_eq!(rd(&t, reg::VERSION), 2);
    assert_eq!(rd(&t, reg::DEVICE_ID), 4);
    assert_eq!(rd(&t, reg::VENDOR_ID), VENDOR_ID);
    assert_eq!(rd(&t, reg::SHM_LEN_LOW), u32::MAX);
    assert_eq!(rd(&t, reg::SHM_LEN_HIGH), u32::MAX);
}

#[test]
fn features_offer_version_1() {
    let mem = memory();
    let (mut t, _) = rng_transport(&mem);
    let f = features(&mut t);
    assert_ne!(f & VERSION_1, 0);
    wr(&mut t, reg::DEVICE_FEATURES_SEL, 2);
    assert_eq!(rd(&t, reg::DEVICE_FEATURES), 0);
}

#[test]
fn linux_probe_sequence_reaches_driver_ok_and_processes() {
    let mem = memory();
    let (mut t, irq) = rng_transport(&mem);
    let mut d = Driver::new(&mem, 16);
    linux_probe(&mut t, &d);
    assert_eq!(t.status(), ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    d.add(&[w(DATA, 64)]);
    wr(&mut t, reg::QUEUE_NOTIFY, 0);
    assert_eq!(d.used_idx(), 1);
    assert_eq!(d.used(0), (0, 64));
    assert_eq!(rd(&t, reg::INTERRUPT_STATUS), 1);
    assert_eq!(irq.count(), 1);
    wr(&mut t, reg::INTERRUPT_ACK, 1);
    assert_eq!(rd(&t, reg::INTERRUPT_STATUS), 0);
}

#[test]
fn interrupt_raised_only_when_status_gains_a_bit() {
    let mem = memory();
    let (mut t, irq) = rng_transport(&mem);
    let mut d = Driver::new(&mem, 16);
    linux_probe(&mut t, &d);
    for i in 0..2 {
        d.set_used_event(i);
        d.add(&[w(DATA, 8)]);
        wr(&mut t, reg::QUEUE_NOTIFY, 0);
    }
    assert_eq!(irq.count(), 1, "bit already pending");
    wr(&mut t, reg::INTERRUPT_ACK, 1);
    d.set_used_event(2);
    d.add(&[w(DATA, 8)]);
    wr(&mut t, reg::QUEUE_NOTIFY, 0);
    assert_eq!(irq.count(), 2);
    // The driver asks for no interrupt until used index 10: none comes.
    wr(&mut t, reg::INTERRUPT_ACK, 1);
    d.set_used_event(10);
    d.add(&[w(DATA, 8)]);
    wr(&mut t, reg::QUEUE_NOTIFY, 0);
    assert_eq!(d.used_idx(), 4);
    assert_eq!(irq.count(), 2);
}

#[test]
fn illegal_status_transitions_are_ignored() {
    let mem = memory();
    let (mut t, _) = rng_transport(&mem);
    // DRIVER before ACKNOWLEDGE.
    wr(&mut t, reg::STATUS, DRIVER);
    assert_eq!(t.status(), 0);
    wr(&mut t, reg::STATUS, ACK);
    // Skipping DRIVER.
    wr(&mut t, reg::STATUS, ACK | FEATURES_OK);
    assert_eq!(t.status(), ACK);
    wr(&mut t, reg::STATUS, ACK | DRIVER);
    // DRIVER_OK before FEATURES_OK.
    wr(&mut t, reg::STATUS, ACK | DRIVER | DRIVER_OK);
    assert_eq!(t.status(), ACK | DRIVER);
    // Clearing a bit without reset.
    wr(&mut t, reg::STATUS, ACK);
    assert_eq!(t.status(), ACK | DRIVER);
    // The driver cannot set DEVICE_NEEDS_RESET.
    wr(&mut t, reg::STATUS, ACK | DRIVER | NEEDS_RESET);
    assert_eq!(t.status(), ACK | DRIVER);
    // FAILED is always accepted, and blocks progress until reset.
    wr(&mut t, reg::STATUS, ACK | DRIVER | FAILED);
    assert_eq!(t.status(), ACK | DRIVER | FAILED);
    ack_features(&mut t, VERSION_1);
    wr(&mut t, reg::STATUS, ACK | DRIVER | FAILED | FEATURES_OK);
    assert_eq!(t.status(), ACK | DRIVER | FAILED);
    wr(&mut t, reg::STATUS, 0);
    assert_eq!(t.status(), 0);
}

#[test]
fn features_ok_requires_version_1_and_a_subset() {
    let mem = memory();
    let (mut t, _) = rng_transport(&mem);
    wr(&mut t, reg::STATUS, ACK);
    wr(&mut t, reg::STATUS, ACK | DRIVER);
    ack_features(&mut t, 0);
    wr(&mut t, reg::STATUS, ACK | DRIVER | FEATURES_OK);
    assert_eq!(t.status(), ACK | DRIVER, "no VERSION_1");
    ack_features(&mut t, VERSION_1 | (1 << 40));
    wr(&mut t, reg::STATUS, ACK | DRIVER | FEATURES_OK);
    assert_eq!(t.status(), ACK | DRIVER, "feature not offered");
    ack_features(&mut t, VERSION_1);
    wr(&mut t, reg::STATUS, ACK | DRIVER | FEATURES_OK);
    assert_eq!(t.status(), ACK | DRIVER | FEATURES_OK);
    // Feature writes after FEATURES_OK are dropped.
    ack_features(&mut t, VERSION_1 | EVENT_IDX);
    assert_eq!(t.acked_features(), VERSION_1);
}

#[test]
fn driver_features_ignored_before_driver_state() {
    let mem = memory();
    let (mut t, _) = rng_transport(&mem);
    ack_features(&mut t, VERSION_1);
    assert_eq!(t.acked_features(), 0);
    wr(&mut t, reg::STATUS, ACK);
    ack_features(&mut t, VERSION_1);
    assert_eq!(t.acked_features(), 0);
}

/// Regression test (the Firecracker rule): queue registers only change between FEATURES_OK and
/// DRIVER_OK.
#[test]
fn queue_registers_writable_only_between_features_ok_and_driver_ok() {
    let mem = memory();
    let (mut t, _) = rng_transport(&mem);
    let d = Driver::new(&mem, 16);
    wr(&mut t, reg::QUEUE_SEL, 0);
    wr(&mut t, reg::QUEUE_NUM, 16);
    wr(&mut t, reg::QUEUE_READY, 1);
    assert_eq!(rd(&t, reg::QUEUE_NUM), 256);
    assert_eq!(rd(&t, reg::QUEUE_READY), 0);
    wr(&mut t, reg::STATUS, ACK);
    wr(&mut t, reg::STATUS, ACK | DRIVER);
    wr(&mut t, reg::QUEUE_NUM, 16);
    assert_eq!(rd(&t, reg::QUEUE_NUM), 256);
    ack_features(&mut t, VERSION_1);
    wr(&mut t, reg::STATUS, ACK | DRIVER | FEATURES_OK);
    setup_queue(&mut t, &d);
    assert_eq!(rd(&t, reg::QUEUE_NUM), 16);
    assert_eq!(rd(&t, reg::QUEUE_READY), 1);
    wr(&mut t, reg::STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    wr(&mut t, reg::QUEUE_NUM, 32);
    wr(&mut t, reg::QUEUE_READY, 0);
    wr(&mut t, reg::QUEUE_DESC_LOW, 0x8000);
    assert_eq!(rd(&t, reg::QUEUE_NUM), 16);
    assert_eq!(rd(&t, reg::QUEUE_READY), 1);
    assert_eq!(t.save().queues[0].desc_table, d.mq.desc_table_addr().0);
}

#[test]
fn invalid_queue_sizes_are_ignored() {
    let mem = memory();
    let (mut t, _) = rng_transport(&mem);
    wr(&mut t, reg::STATUS, ACK);
    wr(&mut t, reg::STATUS, ACK | DRIVER);
    ack_features(&mut t, VERSION_1);
    wr(&mut t, reg::STATUS, ACK | DRIVER | FEATURES_OK);
    for bad in [0, 3, 512, 0x1_0000] {
        wr(&mut t, reg::QUEUE_NUM, bad);
        assert_eq!(rd(&t, reg::QUEUE_NUM), 256, "size {bad}");
    }
    // Selecting a queue that does not exist: reads zero, writes dropped.
    wr(&mut t, reg::QUEUE_SEL, 7);
    assert_eq!(rd(&t, reg::QUEUE_NUM_MAX), 0);
    wr(&mut t, reg::QUEUE_READY, 1);
    assert_eq!(rd(&t, reg::QUEUE_READY), 0);
}

#[test]
fn odd_width_and_unaligned_register_accesses_are_dropped() {
    let mem = memory();
    let (t, _) = rng_transport(&mem);
    t.write(reg::STATUS, &[1]);
    t.write(reg::STATUS + 1, &1u32.to_le_bytes());
    t.write(reg::STATUS, &[1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(t.status(), 0);
    let mut b = [0xffu8; 2];
    t.read(reg::MAGIC, &mut b);
    assert_eq!(b, [0, 0]);
    let mut b = [0xffu8; 4];
    t.read(reg::MAGIC + 2, &mut b);
    assert_eq!(b, [0; 4]);
}

#[test]
fn notify_before_driver_ok_does_nothing() {
    let mem = memory();
    let (mut t, irq) = rng_transport(&mem);
    let mut d = Driver::new(&mem, 16);
    wr(&mut t, reg::STATUS, ACK);
    wr(&mut t, reg::STATUS, ACK | DRIVER);
    ack_features(&mut t, VERSION_1);
    wr(&mut t, reg::STATUS, ACK | DRIVER | FEATURES_OK);
    setup_queue(&mut t, &d);
    d.add(&[w(DATA, 8)]);
    wr(&mut t, reg::QUEUE_NOTIFY, 0);
    assert_eq!(d.used_idx(), 0);
    assert_eq!(irq.count(), 0);
    // Notifying a queue that does not exist is harmless.
    wr(&mut t, reg::STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    wr(&mut t, reg::QUEUE_NOTIFY, 5);
    wr(&mut t, reg::QUEUE_NOTIFY, u32::MAX);
    assert_eq!(d.used_idx(), 0);
}

#[test]
fn device_error_sets_needs_reset_and_raises_config_interrupt() {
    let mem = memory();
    let (mut t, irq) = rng_transport(&mem);
    let mut d = Driver::new(&mem, 16);
    linux_probe(&mut t, &d);
    // A descriptor whose `next` points outside the table.
    d.write_desc(
        0,
        DATA,
        8,
        (VRING_DESC_F_NEXT_ | VRING_DESC_F_WRITE_) as u16,
        99,
    );
    d.publish(0);
    wr(&mut t, reg::QUEUE_NOTIFY, 0);
    assert_ne!(t.status() & NEEDS_RESET, 0);
    assert_eq!(rd(&t, reg::INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
    assert_eq!(irq.count(), 1);
    // Nothing more is processed until reset.
    d.add(&[w(DATA, 8)]);
    wr(&mut t, reg::QUEUE_NOTIFY, 0);
    assert_eq!(d.used_idx(), 0);
    wr(&mut t, reg::STATUS, 0);
    assert_eq!(t.status(), 0);
    assert_eq!(rd(&t, reg::INTERRUPT_STATUS), 0);
    assert_eq!(rd(&t, reg::QUEUE_READY), 0);
    assert_eq!(t.counters().invalid_descriptors, 1);
}

const VRING_DESC_F_NEXT_: u32 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
const VRING_DESC_F_WRITE_: u32 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;

#[test]
fn queue_outside_memory_at_driver_ok_needs_reset() {
    let mem = memory();
    let (mut t, _) = rng_transport(&mem);
    wr(&mut t, reg::STATUS, ACK);
    wr(&mut t, reg::STATUS, ACK | DRIVER);
    ack_features(&mut t, VERSION_1);
    wr(&mut t, reg::STATUS, ACK | DRIVER | FEATURES_OK);
    wr(&mut t, reg::QUEUE_NUM, 16);
    wr(&mut t, reg::QUEUE_DESC_LOW, 0);
    wr(&mut t, reg::QUEUE_DESC_HIGH, 0x10);
    wr(&mut t, reg::QUEUE_AVAIL_LOW, 0x1000);
    wr(&mut t, reg::QUEUE_USED_LOW, 0x2000);
    wr(&mut t, reg::QUEUE_READY, 1);
    wr(&mut t, reg::STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_ne!(t.status() & NEEDS_RESET, 0);
}

#[test]
fn hostile_avail_index_needs_reset() {
    let mem = memory();
    let (mut t, _) = rng_transport(&mem);
    let d = Driver::new(&mem, 16);
    linux_probe(&mut t, &d);
    d.set_avail_idx(100);
    wr(&mut t, reg::QUEUE_NOTIFY, 0);
    assert_ne!(t.status() & NEEDS_RESET, 0);
}

#[test]
fn config_space_reads_any_width() {
    let mem = memory();
    let (t, _) = rng_transport(&mem);
    let mut b = [0xffu8; 3];
    t.read(0x100, &mut b);
    assert_eq!(b, [0; 3]);
    t.write(0x101, &[1, 2]);
    t.config_changed();
    assert_eq!(rd(&t, reg::CONFIG_GENERATION), 1);
    assert_eq!(rd(&t, reg::INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
}

// ---- notifications through eventfds, pause ----

#[test]
fn queue_events_defer_notifications() {
    let mem = memory();
    let (mut t, irq) = rng_transport(&mem);
    let mut d = Driver::new(&mem, 16);
    linux_probe(&mut t, &d);
    let events = t.queue_events().unwrap();
    assert_eq!(events.len(), 1);
    assert!(Arc::ptr_eq(&events[0], &t.queue_events().unwrap()[0]));
    d.add(&[w(DATA, 8)]);
    wr(&mut t, reg::QUEUE_NOTIFY, 0);
    wr(&mut t, reg::QUEUE_NOTIFY, 0);
    wr(&mut t, reg::QUEUE_NOTIFY, 1); // no such queue: dropped
    assert_eq!(d.used_idx(), 0, "nothing processed inside the write");
    assert_eq!(events[0].read().unwrap(), 2);
    t.notify(0);
    assert_eq!(d.used_idx(), 1);
    assert_eq!(irq.count(), 1);
}

#[test]
fn pause_records_notifications_until_resume() {
    let mem = memory();
    let (mut t, irq) = rng_transport(&mem);
    let mut d = Driver::new(&mem, 16);
    linux_probe(&mut t, &d);
    t.pause();
    t.pause();
    d.add(&[w(DATA, 8)]);
    let before = mem_snapshot(&d);
    wr(&mut t, reg::QUEUE_NOTIFY, 0);
    t.notify(0);
    assert_eq!(d.used_idx(), 0);
    assert_eq!(
        mem_snapshot(&d),
        before,
        "guest memory untouched while paused"
    );
    assert_eq!(irq.count(), 0);
    t.resume();
    assert_eq!(d.used_idx(), 1);
    assert_eq!(irq.count(), 1);
    // Nothing left pending: a second resume does nothing.
    t.resume();
    assert_eq!(d.used_idx(), 1);
    // A reset forgets what was pending.
    t.pause();
    d.add(&[w(DATA, 8)]);
    t.notify(0);
    wr(&mut t, reg::STATUS, 0);
    t.resume();
    assert_eq!(d.used_idx(), 1);
}

fn mem_snapshot(d: &Driver) -> Vec<u8> {
    d.read(DATA, 8)
}

fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let t = std::time::Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

#[test]
fn worker_processes_notified_queues_and_obeys_pause() {
    let mem = memory();
    let (mut t, irq) = rng_transport(&mem);
    let mut d = Driver::new(&mem, 16);
    linux_probe(&mut t, &d);
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = crate::Worker::spawn(&t, "test-worker".into(), move || {
        tx.send(()).map_err(|e| e.to_string())
    })
    .unwrap();
    rx.recv().unwrap();
    let lock = || &t;
    for n in 1..=3u16 {
        d.add(&[w(DATA, 8)]);
        lock().write(reg::QUEUE_NOTIFY, &0u32.to_le_bytes());
        wait_for("the worker", || d.used_idx() == n);
    }
    wait_for("the interrupt", || irq.count() == 1);
    assert_eq!(rd(lock(), reg::INTERRUPT_STATUS), 1);
    assert_eq!(irq.count(), 1);
    // Paused: notified, not processed.
    lock().pause();
    d.add(&[w(DATA, 8)]);
    lock().write(reg::QUEUE_NOTIFY, &0u32.to_le_bytes());
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(d.used_idx(), 3);
    lock().resume();
    wait_for("the worker after resume", || d.used_idx() == 4);
    // Dropping the worker stops it: notifications then stay in the eventfd.
    drop(worker);
    d.add(&[w(DATA, 8)]);
    lock().write(reg::QUEUE_NOTIFY, &0u32.to_le_bytes());
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(d.used_idx(), 4);
}

#[test]
fn worker_setup_failure_ends_the_thread() {
    let mem = memory();
    let (t, _) = rng_transport(&mem);
    let worker =
        crate::Worker::spawn(&t, "test-worker".into(), || Err("no filter".into())).unwrap();
    drop(worker); // joins a thread that already returned
}

// ---- saved state ----

fn active_transport(mem: &GuestMemory) -> (MmioTransport, Driver<'_>) {
    let (mut t, _) = rng_transport(mem);
    let mut d = Driver::new(mem, 16);
    linux_probe(&mut t, &d);
    d.add(&[w(DATA, 8)]);
    wr(&mut t, reg::QUEUE_NOTIFY, 0);
    (t, d)
}

fn restore(mem: &GuestMemory, s: &MmioState) -> Result<MmioTransport, Error> {
    MmioTransport::restore(
        Box::new(Rng::new().unwrap()),
        Arc::new(mem.clone()),
        irq(),
        s,
    )
}

#[test]
fn save_restore_save_is_identity_and_keeps_working() {
    let mem = memory();
    let (t, mut d) = active_transport(&mem);
    let s1 = t.save();
    let json = serde_json::to_string(&s1).unwrap();
    let s1b: MmioState = serde_json::from_str(&json).unwrap();
    let mut t2 = restore(&mem, &s1b).unwrap();
    assert_eq!(t2.save(), s1);
    // Restored paused: a notification is only recorded until resume.
    assert!(t2.is_paused());
    d.add(&[w(DATA, 8)]);
    wr(&mut t2, reg::QUEUE_NOTIFY, 0);
    assert_eq!(d.used_idx(), 1);
    t2.resume();
    assert_eq!(d.used_idx(), 2);

    // A fresh (reset) transport round-trips too.
    let (fresh, _) = rng_transport(&mem);
    let s = fresh.save();
    assert_eq!(restore(&mem, &s).unwrap().save(), s);
}

#[test]
fn restore_rejects_each_invalid_field() {
    let mem = memory();
    let (t, _) = active_transport(&mem);
    let good = t.save();
    restore(&mem, &good).unwrap();
    type Mutation = (&'static str, fn(&mut MmioState));
    let cases: &[Mutation] = &[
        ("device type", |s| s.device_type = 2),
        ("status unreachable", |s| s.status = ACK | DRIVER_OK),
        ("status without ack", |s| s.status = DRIVER),
        ("acked not offered", |s| s.acked_features |= 1 << 50),
        ("no version 1", |s| s.acked_features &= !VERSION_1),
        ("interrupt bits", |s| s.interrupt_status = 4),
        ("queue count", |s| s.queues.push(s.queues[0])),
        ("no queues", |s| s.queues.clear()),
        ("queue max size", |s| s.queues[0].max_size = 128),
        ("queue size not power of two", |s| s.queues[0].size = 15),
        ("queue size above max", |s| s.queues[0].size = 512),
        ("queue size zero", |s| s.queues[0].size = 0),
        ("desc misaligned", |s| s.queues[0].desc_table += 1),
        ("avail misaligned", |s| s.queues[0].avail_ring += 1),
        ("used misaligned", |s| s.queues[0].used_ring += 2),
        ("desc outside memory", |s| {
            s.queues[0].desc_table = MEM_SIZE_
        }),
        ("used outside memory", |s| {
            s.queues[0].used_ring = MEM_SIZE_ - 8
        }),
        ("event idx disagrees", |s| {
            s.queues[0].event_idx_enabled = !s.queues[0].event_idx_enabled
        }),
        ("device kind", |s| {
            s.device = DeviceState::Block(crate::BlockState {
                capacity_sectors: 0,
                readonly: false,
                features: 0,
                counters: Default::default(),
            })
        }),
    ];
    for (name, mutate) in cases {
        let mut s = good.clone();
        mutate(&mut s);
        assert!(restore(&mem, &s).is_err(), "{name} accepted");
    }
    // Before DRIVER no features may be acked; before FEATURES_OK no queue may be ready.
    let mut s = good.clone();
    s.status = ACK;
    assert!(restore(&mem, &s).is_err());
    s.acked_features = 0;
    assert!(restore(&mem, &s).is_err(), "queue ready before FEATURES_OK");
    s.queues[0].ready = false;
    s.queues[0].event_idx_enabled = false;
    restore(&mem, &s).unwrap();
    let _ = RngState::default();
}

const MEM_SIZE_: u64 = crate::testutil::MEM_SIZE;

#[test]
fn block_through_the_transport() {
    use crate::testutil::{TempDir, pattern, r};
    use crate::{Block, BlockConfig};
    let dir = TempDir::new("mmioblk");
    let path = dir.path("vda.img");
    std::fs::write(&path, pattern(64 * 1024, 3)).unwrap();
    let dev = Block::new(BlockConfig {
        path,
        readonly: false,
        format: None,
    })
    .unwrap();
    let mem = memory();
    let i = irq();
    let mut t = MmioTransport::new(Box::new(dev), Arc::new(mem.clone()), i.clone()).unwrap();
    assert_eq!(rd(&t, reg::DEVICE_ID), 2);
    let mut cap = [0u8; 8];
    t.read(reg::CONFIG, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 128);
    let mut d = Driver::new(&mem, 16);
    linux_probe(&mut t, &d);
    let mut h = [0u8; 16];
    h[8] = 1; // IN, sector 1
    d.fill(0x8_0000, &h);
    d.add(&[r(0x8_0000, 16), w(DATA, 512), w(0x9_0000, 1)]);
    wr(&mut t, reg::QUEUE_NOTIFY, 0);
    assert_eq!(d.read(0x9_0000, 1)[0], 0);
    assert_eq!(d.read(DATA, 512), pattern(64 * 1024, 3)[512..1024]);
    assert_eq!(i.count(), 1);
    assert_eq!(t.counters().requests, 1);
    // Save/restore with a block device.
    let s = t.save();
    let dev2 = Block::new(BlockConfig {
        path: dir.path("vda.img"),
        readonly: false,
        format: None,
    })
    .unwrap();
    let t2 = MmioTransport::restore(Box::new(dev2), Arc::new(mem.clone()), irq(), &s).unwrap();
    assert_eq!(t2.save(), s);
    // A different disk (read-only: other features) is refused.
    let dev3 = Block::new(BlockConfig {
        path: dir.path("vda.img"),
        readonly: true,
        format: None,
    })
    .unwrap();
    assert!(MmioTransport::restore(Box::new(dev3), Arc::new(mem.clone()), irq(), &s).is_err());
}
