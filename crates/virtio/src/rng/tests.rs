use super::*;
use crate::testutil::{DATA, Driver, MEM_SIZE, memory, r, w};

#[test]
fn fills_writable_buffers() {
    let mem = memory();
    let mut dev = Rng::new().unwrap();
    let mut d = Driver::new(&mem, 16);
    d.add(&[w(DATA, 64), w(DATA + 0x1000, 64)]);
    assert!(d.process(&mut dev).unwrap());
    assert_eq!(d.used(0), (0, 128));
    let a = d.read(DATA, 64);
    let b = d.read(DATA + 0x1000, 64);
    assert!(a.iter().any(|&x| x != 0) && b.iter().any(|&x| x != 0));
    assert_ne!(a, b);
    assert_eq!(dev.counters().bytes_read, 128);
    assert_eq!(dev.counters().requests, 1);
}

#[test]
fn caps_each_request() {
    let mem = memory();
    let mut dev = Rng::new().unwrap();
    let mut d = Driver::new(&mem, 16);
    d.add(&[w(DATA, 1 << 20)]);
    d.process(&mut dev).unwrap();
    assert_eq!(d.used(0).1, MAX_BYTES_PER_REQUEST);
    assert!(
        d.read(DATA + u64::from(MAX_BYTES_PER_REQUEST), 4096)
            .iter()
            .all(|&x| x == 0)
    );
}

#[test]
fn readable_buffers_are_left_alone() {
    let mem = memory();
    let mut dev = Rng::new().unwrap();
    let mut d = Driver::new(&mem, 16);
    d.add(&[r(DATA, 64)]);
    d.process(&mut dev).unwrap();
    assert_eq!(d.used(0).1, 0);
    assert!(d.read(DATA, 64).iter().all(|&x| x == 0));
}

#[test]
fn buffer_outside_ram_completes_short() {
    let mem = memory();
    let mut dev = Rng::new().unwrap();
    let mut d = Driver::new(&mem, 16);
    d.add(&[w(DATA, 16), w(MEM_SIZE - 8, 64)]);
    d.process(&mut dev).unwrap();
    assert_eq!(d.used(0).1, 16);
    assert_eq!(dev.counters().errors, 1);
}

#[test]
fn hostile_loop_needs_reset() {
    let mem = memory();
    let mut dev = Rng::new().unwrap();
    let mut d = Driver::new(&mem, 16);
    let flags = (virtio_bindings::virtio_ring::VRING_DESC_F_NEXT
        | virtio_bindings::virtio_ring::VRING_DESC_F_WRITE) as u16;
    d.write_desc(0, DATA, 16, flags, 0);
    d.publish(0);
    assert!(d.process(&mut dev).is_err());
    assert_eq!(dev.counters().invalid_descriptors, 1);
}

#[test]
fn state_round_trip() {
    let mut dev = Rng::new().unwrap();
    let mem = memory();
    let mut d = Driver::new(&mem, 16);
    d.add(&[w(DATA, 8)]);
    d.process(&mut dev).unwrap();
    let s = dev.save();
    let mut other = Rng::new().unwrap();
    other.restore(&s).unwrap();
    assert_eq!(other.save(), s);
    let wrong = DeviceState::Block(crate::BlockState {
        capacity_sectors: 0,
        readonly: false,
        features: 0,
        counters: Counters::default(),
    });
    assert!(other.restore(&wrong).is_err());
}
