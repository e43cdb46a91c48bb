//! virtio-net on virtio-queue's mock queues with a datagram socket pair as the tap: transmit,
//! receive from the tap (host events) and through a worker, bounds, hostile descriptors,
//! saved state; and, as root, a real tap interface.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

use super::testq::{QDriver, notify, probe};
use super::*;
use crate::testutil::{DATA, MEM_SIZE, irq, memory, pattern, r, w};
use crate::{MmioHandler, MmioTransport, RngState};

const RXQ: u64 = 0;
const TXQ: u64 = 0x1_0000;
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// A device on one end of a socket pair; the other end plays the host network.
fn device() -> (Net, UnixDatagram) {
    let (dev_end, host) = UnixDatagram::pair().unwrap();
    dev_end.set_nonblocking(true).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (Net::with_backend(Some(MAC), Arc::new(dev_end)), host)
}

/// Does what the worker does when the tap is readable, until the device asks for a queue.
fn wait_kick(dev: &mut Net) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        dev.host_event();
        let k = dev.take_kicks();
        if k != 0 {
            return k;
        }
        assert!(Instant::now() < deadline, "no frame read from the tap");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    pattern(len, seed)
}

#[test]
fn features_and_config() {
    let (dev, _host) = device();
    let f = dev.features();
    assert_ne!(f & (1 << VIRTIO_NET_F_MAC), 0);
    assert_ne!(f & (1 << VIRTIO_NET_F_STATUS), 0);
    assert_ne!(
        f & (1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1),
        0
    );
    assert_eq!(f & (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_CSUM), 0);
    let mut c = [0u8; 8];
    dev.read_config(0, &mut c);
    assert_eq!(&c[..6], &MAC);
    assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1);
    assert_eq!(dev.device_type(), 1);
    assert_eq!(dev.queue_max_sizes(), &[256, 256]);
    let no_mac = Net::with_backend(None, Arc::new(UnixDatagram::pair().unwrap().0));
    assert_eq!(no_mac.features() & (1 << VIRTIO_NET_F_MAC), 0);
}

#[test]
fn transmit_strips_header() {
    let mem = memory();
    let (mut dev, host) = device();
    let mut tx = QDriver::new(&mem, TXQ, 16);
    let f = frame(1000, 3);
    // Header and frame in separate buffers, as Linux sends them without offloads.
    tx.fill(DATA, &[0xaa; HEADER_LEN]);
    tx.fill(DATA + 0x1000, &f);
    tx.add(&[r(DATA, HEADER_LEN as u32), r(DATA + 0x1000, 1000)]);
    // Header and frame start sharing one buffer.
    let mut both = vec![0u8; HEADER_LEN];
    both.extend_from_slice(&f[..10]);
    tx.fill(DATA + 0x2000, &both);
    tx.fill(DATA + 0x3000, &f[10..]);
    tx.add(&[r(DATA + 0x2000, both.len() as u32), r(DATA + 0x3000, 990)]);
    assert!(tx.process(&mut dev, TX_QUEUE).unwrap());
    let mut buf = vec![0u8; 4096];
    for _ in 0..2 {
        let n = host.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], &f[..]);
    }
    assert_eq!(tx.used_idx(), 2);
    assert_eq!(tx.used(0), (0, 0));
    let c = dev.counters();
    assert_eq!((c.requests, c.bytes_written, c.errors), (2, 2000, 0));
}

#[test]
fn transmit_hostile_chains_are_dropped() {
    let mem = memory();
    let (mut dev, host) = device();
    host.set_nonblocking(true).unwrap();
    let mut tx = QDriver::new(&mem, TXQ, 16);
    // Shorter than the header.
    tx.add(&[r(DATA, 4)]);
    // Device-writable buffer in a transmit chain.
    tx.add(&[r(DATA, 12), w(DATA + 0x1000, 64)]);
    // Buffer outside guest RAM.
    tx.add(&[r(DATA, 12), r(MEM_SIZE - 8, 64)]);
    // Larger than any frame.
    tx.add(&[r(DATA, 12), r(DATA, (MAX_FRAME + 1) as u32)]);
    assert!(tx.process(&mut dev, TX_QUEUE).unwrap());
    assert_eq!(tx.used_idx(), 4);
    let mut buf = [0u8; 64];
    assert_eq!(
        host.recv(&mut buf).unwrap_err().kind(),
        io::ErrorKind::WouldBlock
    );
    let c = dev.counters();
    assert_eq!((c.requests, c.errors, c.bytes_written), (4, 4, 0));
}

#[test]
fn transmit_length_overflow_needs_reset() {
    let mem = memory();
    let (mut dev, _host) = device();
    let mut tx = QDriver::new(&mem, TXQ, 16);
    // virtio-queue ends a chain whose lengths overflow 32 bits: the chain is cut short.
    tx.add(&[r(DATA, u32::MAX), r(DATA, u32::MAX)]);
    assert!(matches!(
        tx.process(&mut dev, TX_QUEUE),
        Err(DeviceError::InvalidChain)
    ));
}

#[test]
fn transmit_loop_needs_reset() {
    let mem = memory();
    let (mut dev, _host) = device();
    let mut tx = QDriver::new(&mem, TXQ, 16);
    tx.write_desc(0, DATA, 16, VRING_DESC_F_NEXT as u16, 0);
    tx.publish(0);
    assert!(matches!(
        tx.process(&mut dev, TX_QUEUE),
        Err(DeviceError::InvalidChain)
    ));
    assert_eq!(dev.counters().invalid_descriptors, 1);
}

#[test]
fn tap_refusal_is_counted() {
    let mem = memory();
    let (mut dev, host) = device();
    drop(host);
    let mut tx = QDriver::new(&mem, TXQ, 16);
    tx.add(&[r(DATA, 64)]);
    assert!(tx.process(&mut dev, TX_QUEUE).unwrap());
    assert_eq!(dev.counters().errors, 1);
}

/// Reads the tap (as the worker does) until `n` frames are queued.
fn wait_pending(dev: &mut Net, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        dev.host_event();
        if dev.pending_frames() >= n {
            break;
        }
        assert!(Instant::now() < deadline, "no frame read from the tap");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn receive_from_tap_asks_for_the_receive_queue() {
    let mem = memory();
    let (mut dev, host) = device();
    let mut rxq = QDriver::new(&mem, RXQ, 16);
    assert_eq!(dev.host_fd(), Some(dev.tap.poll_fd()));
    let f = frame(1514, 9);
    host.send(&f).unwrap();
    // Not active: the tap is not read, the frame waits there.
    dev.host_event();
    assert_eq!(dev.pending_frames(), 0);
    dev.activate(dev.features()).unwrap();
    assert_eq!(wait_kick(&mut dev), 1 << RX_QUEUE);
    assert_eq!(dev.take_kicks(), 0);
    // No buffer yet: the frame waits.
    assert!(!rxq.process(&mut dev, RX_QUEUE).unwrap());
    assert_eq!(dev.pending_frames(), 1);
    // Linux's layout without mergeable buffers: header and data in two descriptors.
    rxq.add(&[w(DATA, HEADER_LEN as u32), w(DATA + 0x1000, 0x1_0000)]);
    assert!(rxq.process(&mut dev, RX_QUEUE).unwrap());
    assert_eq!(rxq.used(0), (0, (HEADER_LEN + f.len()) as u32));
    let mut hdr = [0u8; HEADER_LEN];
    hdr[10] = 1;
    assert_eq!(rxq.read(DATA, HEADER_LEN), hdr);
    assert_eq!(rxq.read(DATA + 0x1000, f.len()), f);
    assert_eq!(dev.counters().bytes_read, f.len() as u64);
    assert_eq!(dev.pending_frames(), 0);
}

#[test]
fn receive_frame_too_large_for_buffer_is_dropped() {
    let mem = memory();
    let (mut dev, host) = device();
    dev.activate(dev.features()).unwrap();
    let mut rxq = QDriver::new(&mem, RXQ, 16);
    host.send(&frame(600, 1)).unwrap();
    host.send(&frame(60, 2)).unwrap();
    wait_pending(&mut dev, 2);
    rxq.add(&[w(DATA, 512)]);
    rxq.add(&[r(DATA + 0x1000, 512)]); // device-readable: unusable for receive
    rxq.add(&[w(DATA + 0x2000, 512)]);
    rxq.process(&mut dev, RX_QUEUE).unwrap();
    assert_eq!(rxq.used(0).1, 0);
    assert_eq!(rxq.used(1).1, 0);
    assert_eq!(
        rxq.used_idx(),
        2,
        "second frame lost to the unusable buffer"
    );
    assert_eq!(dev.counters().errors, 2);
    rxq.process(&mut dev, RX_QUEUE).unwrap();
    assert_eq!(rxq.used_idx(), 2);
}

#[test]
fn receive_backlog_is_bounded() {
    let (mut dev, host) = device();
    dev.activate(dev.features()).unwrap();
    let f = frame(64, 5);
    for i in 0..MAX_PENDING + 10 {
        host.send(&f).unwrap();
        if i % 16 == 0 {
            dev.host_event();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        dev.host_event();
        if dev.counters().errors >= 10 {
            break;
        }
        assert!(Instant::now() < deadline, "{:?}", dev.counters());
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(dev.pending_frames(), MAX_PENDING);
    assert_eq!(dev.counters().errors, 10);
}

#[test]
fn reset_stops_receive() {
    let (mut dev, host) = device();
    dev.activate(dev.features()).unwrap();
    host.send(&frame(64, 1)).unwrap();
    wait_pending(&mut dev, 1);
    dev.reset();
    assert_eq!(dev.pending_frames(), 0);
    host.send(&frame(64, 1)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(dev.pending_frames(), 0);
    // Activated again, the device reads what waited on the tap.
    dev.activate(dev.features()).unwrap();
    wait_pending(&mut dev, 1);
}

#[test]
fn receive_loop_needs_reset() {
    let mem = memory();
    let (mut dev, host) = device();
    dev.activate(dev.features()).unwrap();
    host.send(&frame(64, 1)).unwrap();
    wait_pending(&mut dev, 1);
    let mut rxq = QDriver::new(&mem, RXQ, 16);
    let flags = (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16;
    rxq.write_desc(0, DATA, 16, flags, 0);
    rxq.publish(0);
    assert!(rxq.process(&mut dev, RX_QUEUE).is_err());
    assert_eq!(dev.counters().invalid_descriptors, 1);
}

/// The whole path: the worker activates the device, frames from the host reach the guest
/// through the worker with an interrupt, and guest frames reach the host on notify.
#[test]
fn worker_delivers_with_interrupt() {
    let mem = memory();
    let (dev, host) = device();
    let i = irq();
    let mut t = MmioTransport::new(Box::new(dev), Arc::new(mem.clone()), i.clone()).unwrap();
    let worker = crate::Worker::spawn(&t, "net-test".into(), || Ok(())).unwrap();
    let mut rxq = QDriver::new(&mem, RXQ, 16);
    let mut txq = QDriver::new(&mem, TXQ, 16);
    probe(&mut t, &[&rxq, &txq]);
    rxq.add(&[w(DATA, 2048)]);
    notify(&mut t, 0);
    let f = frame(1000, 4);
    host.send(&f).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while rxq.used_idx() == 0 || i.count() == 0 {
        assert!(Instant::now() < deadline, "frame not delivered");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(i.count(), 1);
    assert_eq!(rxq.read(DATA + HEADER_LEN as u64, f.len()), f);

    txq.fill(DATA + 0x10000 + HEADER_LEN as u64, &f);
    txq.add(&[r(DATA + 0x10000, (HEADER_LEN + f.len()) as u32)]);
    notify(&mut t, 1);
    let mut buf = [0u8; 2048];
    let n = host.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &f[..]);
    // Paused: a frame stays on the tap; resumed, it is delivered.
    t.pause();
    rxq.add(&[w(DATA, 2048)]);
    host.send(&f).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(rxq.used_idx(), 1);
    t.resume();
    let deadline = Instant::now() + Duration::from_secs(5);
    while rxq.used_idx() == 1 {
        assert!(
            Instant::now() < deadline,
            "frame not delivered after resume"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    // Reset by the driver: the worker stops reading the tap.
    t.write(0x70, &0u32.to_le_bytes());
    drop(worker);
    drop(t);
    let _ = host.send(&f);
}

#[test]
fn state_round_trip_and_checks() {
    let (mut dev, _host) = device();
    let mem = memory();
    let mut tx = QDriver::new(&mem, TXQ, 16);
    tx.add(&[r(DATA, 64)]);
    tx.process(&mut dev, TX_QUEUE).unwrap();
    let s = dev.save();
    let (mut other, _h2) = device();
    other.restore(&s).unwrap();
    assert_eq!(other.save(), s);

    let DeviceState::Net(ns) = &s else {
        panic!("not net state")
    };
    let mut bad = ns.clone();
    bad.mac = Some([0; 6]);
    assert!(other.restore(&DeviceState::Net(bad)).is_err());
    let mut bad = ns.clone();
    bad.mac = None;
    assert!(other.restore(&DeviceState::Net(bad)).is_err());
    let mut bad = ns.clone();
    bad.features |= 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_CSUM;
    assert!(other.restore(&DeviceState::Net(bad)).is_err());
    assert!(
        other
            .restore(&DeviceState::Rng(RngState::default()))
            .is_err()
    );
    let json = serde_json::to_string(&s).unwrap();
    assert_eq!(serde_json::from_str::<DeviceState>(&json).unwrap(), s);
}

#[test]
fn open_error_names_the_tap() {
    let e = match Net::new(NetConfig {
        tap: "no/such:tap-name-too-long-for-ifnamsiz".into(),
        mac: None,
    }) {
        Ok(_) => panic!("opened an impossible tap"),
        Err(e) => e,
    };
    assert!(e.to_string().contains("no/such:tap-name-too-long"), "{e}");
}

/// As root: a real tap interface (no addresses) in the root namespace; a frame the guest sends
/// shows in the interface's counters, and a frame the kernel sends on it reaches the guest.
#[test]
fn real_tap_as_root() {
    let name = format!("avtap{}", std::process::id() % 100_000);
    let Some(_guard) = RealTap::create(&name) else {
        return;
    };
    let mut dev = match Net::new(NetConfig {
        tap: name.clone(),
        mac: Some(MAC),
    }) {
        Ok(d) => d,
        Err(e) => panic!("{e}: {:?}", std::error::Error::source(&e)),
    };
    let mem = memory();
    let mut txq = QDriver::new(&mem, TXQ, 16);
    let mut rxq = QDriver::new(&mem, RXQ, 16);
    dev.activate(dev.features()).unwrap();
    // Link-local IPv6 on the tap makes the kernel send router solicitations / MLD reports:
    // frames from the host side without any socket. Wait for one.
    let ipv6_off = std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"))
        .map_or(true, |v| v.trim() != "0");
    if ipv6_off {
        eprintln!("real_tap_as_root: IPv6 off on {name}, receive direction not checked");
    } else {
        rxq.add(&[w(DATA, 4096)]);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            dev.host_event();
            rxq.process(&mut dev, RX_QUEUE).unwrap();
            if rxq.used_idx() > 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no frame from the host side of {name}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let (_, len) = rxq.used(0);
        assert!(len as usize > HEADER_LEN + 14);
        let eth = rxq.read(DATA + HEADER_LEN as u64, 14);
        assert_eq!(&eth[12..14], &[0x86, 0xdd], "expected an IPv6 frame");
    }
    // Transmit: a broadcast frame of the IEEE local experimental ethertype (no IP at all); the
    // interface's receive counter rises.
    let before = tap_stat(&name, "rx_packets");
    let mut eth = vec![0xff; 6];
    eth.extend_from_slice(&MAC);
    eth.extend_from_slice(&[0x88, 0xb5]);
    eth.extend_from_slice(b"anyvisor virtio-net test frame");
    eth.resize(60, 0);
    txq.fill(DATA + 0x8000 + HEADER_LEN as u64, &eth);
    txq.add(&[r(DATA + 0x8000, (HEADER_LEN + eth.len()) as u32)]);
    txq.process(&mut dev, TX_QUEUE).unwrap();
    assert_eq!(dev.counters().errors, 0);
    assert_eq!(tap_stat(&name, "rx_packets"), before + 1);
}

fn tap_stat(name: &str, stat: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{name}/statistics/{stat}"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A tap created with `ip tuntap add` and brought up; deleted on drop.
struct RealTap(String);

impl RealTap {
    fn create(name: &str) -> Option<RealTap> {
        let is_root = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .map(|l| l.split_whitespace().nth(1) == Some("0"))
            })
            .unwrap_or(false);
        let ip = |args: &[&str]| {
            std::process::Command::new("ip")
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        if !is_root || !std::path::Path::new("/dev/net/tun").exists() {
            eprintln!("SKIP real_tap_as_root: needs root and /dev/net/tun");
            return None;
        }
        if !ip(&["tuntap", "add", "dev", name, "mode", "tap"]) {
            eprintln!("SKIP real_tap_as_root: `ip tuntap add` failed");
            return None;
        }
        let guard = RealTap(name.to_string());
        assert!(ip(&["link", "set", name, "up"]), "ip link set up");
        Some(guard)
    }
}

impl Drop for RealTap {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.0])
            .status();
    }
}
