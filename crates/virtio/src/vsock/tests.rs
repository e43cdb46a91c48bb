//! virtio-vsock on virtio-queue's mock queues with real Unix sockets in a temp dir: header
//! parsing, both connection directions, credit flow, resets, hostile packets and descriptors,
//! saved state, and the whole path through the transport's kick.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;

use super::muxer::{
    CONN_BUF, HOST_CID, MAX_CONNECTIONS, MAX_CONTROL, MAX_PKT_DATA, Muxer, parse_connect,
};
use super::packet::*;
use super::*;
use crate::net::testq::{QDriver, notify, probe};
use crate::testutil::{DATA, MEM_SIZE, TempDir, irq, memory, pattern, r, w};
use crate::{MmioTransport, RngState};

const CID: u64 = 3;
const RXQ: u64 = 0;
const TXQ: u64 = 0x1_0000;
const EVQ: u64 = 0x2_0000;
const TX_DATA: u64 = DATA + 0x40_0000;
const EV_DATA: u64 = DATA + 0x80_0000;

#[test]
fn header_round_trip() {
    let h = Header {
        src_cid: 3,
        dst_cid: 2,
        src_port: 0x1234_5678,
        dst_port: 80,
        len: 5,
        type_: TYPE_STREAM,
        op: OP_RW,
        flags: 3,
        buf_alloc: 1 << 18,
        fwd_cnt: 0xdead_beef,
    };
    let b = h.to_bytes();
    assert_eq!(b.len(), 44);
    assert_eq!(&b[0..8], &3u64.to_le_bytes());
    assert_eq!(&b[16..20], &0x1234_5678u32.to_le_bytes());
    assert_eq!(&b[30..32], &OP_RW.to_le_bytes());
    assert_eq!(&b[40..44], &0xdead_beefu32.to_le_bytes());
    assert_eq!(Header::parse(&b), Some(h));
    let mut longer = b.to_vec();
    longer.extend_from_slice(b"hello");
    assert_eq!(Header::parse(&longer), Some(h));
    assert_eq!(Header::parse(&b[..43]), None);
    let rst = h.reset_reply();
    assert_eq!(
        (rst.src_cid, rst.dst_cid, rst.src_port, rst.dst_port, rst.op),
        (2, 3, 80, 0x1234_5678, OP_RST)
    );
}

#[test]
fn connect_line() {
    assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
    assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
    assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
    for bad in [
        &b"CONNECT"[..],
        b"CONNECT ",
        b"CONNECT -1",
        b"CONNECT +1",
        b"CONNECT 4294967296",
        b"connect 52",
        b"CONNECT 5 2",
        b"\xff",
    ] {
        assert_eq!(parse_connect(bad), None, "{bad:?}");
    }
}

/// Waits up to `ms` for `fd` to poll readable.
fn wait_readable(fd: Option<std::os::fd::RawFd>, ms: i32) {
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
    let Some(fd) = fd else { return };
    let ep = Epoll::new().unwrap();
    ep.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 0))
        .unwrap();
    let mut ev = [EpollEvent::default(); 1];
    let _ = ep.wait(ms, &mut ev);
}

struct Guest<'a> {
    dev: Vsock,
    rx: QDriver<'a>,
    tx: QDriver<'a>,
    rx_seen: u16,
    rx_posted: u16,
    tx_slot: u64,
    rx_bufs: std::collections::HashMap<u32, u64>,
    uds: PathBuf,
    dir: TempDir,
}

fn hdr(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 256 * 1024,
        fwd_cnt: 0,
    }
}

impl<'a> Guest<'a> {
    fn new(mem: &'a GuestMemory) -> Guest<'a> {
        let dir = TempDir::new("vsock");
        let uds = dir.path("v.sock");
        let mut dev = Vsock::new(VsockConfig {
            guest_cid: CID,
            uds_path: uds.clone(),
        })
        .unwrap();
        dev.activate(dev.features()).unwrap();
        Guest {
            dev,
            rx: QDriver::new(mem, RXQ, 64),
            tx: QDriver::new(mem, TXQ, 64),
            rx_seen: 0,
            rx_posted: 0,
            tx_slot: 0,
            rx_bufs: Default::default(),
            uds,
            dir,
        }
    }

    fn send(&mut self, h: Header, data: &[u8]) {
        let h = Header {
            len: data.len() as u32,
            ..h
        };
        let at = TX_DATA + (self.tx_slot % 8) * 0x2_0000;
        self.tx_slot += 1;
        self.tx.fill(at, &h.to_bytes());
        self.tx.fill(at + 0x1000, data);
        if data.is_empty() {
            self.tx.add(&[r(at, 44)]);
        } else {
            self.tx.add(&[r(at, 44), r(at + 0x1000, data.len() as u32)]);
        }
        self.tx.process(&mut self.dev, TX_QUEUE).unwrap();
    }

    /// Posts receive buffers like Linux 6.1 (header + 4 KiB) so that some are outstanding.
    fn post_rx(&mut self) {
        while self.rx_posted.wrapping_sub(self.rx_seen) < 8 {
            let at = DATA + u64::from(self.rx_posted % 16) * 0x2000;
            let head = self.rx.add(&[w(at, 44), w(at + 0x100, 4096)]);
            self.rx_bufs.insert(u32::from(head), at);
            self.rx_posted = self.rx_posted.wrapping_add(1);
        }
    }

    /// Processes the receive queue once; returns the next packet delivered, if any.
    fn try_recv(&mut self) -> Option<(Header, Vec<u8>)> {
        if self.rx.used_idx() == self.rx_seen {
            self.post_rx();
            self.rx.process(&mut self.dev, RX_QUEUE).unwrap();
        }
        if self.rx.used_idx() == self.rx_seen {
            return None;
        }
        let (id, len) = self.rx.used(self.rx_seen);
        self.rx_seen = self.rx_seen.wrapping_add(1);
        let at = self.rx_bufs[&id];
        let h = Header::parse(&self.rx.read(at, 44)).unwrap();
        assert_eq!(len, 44 + h.len);
        let data = self.rx.read(at + 0x100, h.len as usize);
        Some((h, data))
    }

    /// Does the worker's host-side work until the next packet arrives.
    fn recv(&mut self) -> (Header, Vec<u8>) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(p) = self.try_recv() {
                return p;
            }
            assert!(Instant::now() < deadline, "no packet for the guest");
            wait_readable(self.dev.host_fd(), 20);
            self.dev.host_event();
            self.dev.take_kicks();
        }
    }

    #[track_caller]
    fn recv_op(&mut self, op: u16) -> (Header, Vec<u8>) {
        let (h, d) = self.recv();
        assert_eq!(h.op, op, "{h:?}");
        assert_eq!(
            (h.src_cid, h.dst_cid, h.type_),
            (HOST_CID, CID, TYPE_STREAM)
        );
        (h, d)
    }

    /// A host service listening on `<uds>_<port>`.
    fn service(&self, port: u32) -> UnixListener {
        let mut p = self.uds.clone().into_os_string();
        p.push(format!("_{port}"));
        UnixListener::bind(p).unwrap()
    }

    /// Guest connects to host `port` from guest port `gport`; returns the host's end.
    fn connect(&mut self, svc: &UnixListener, gport: u32, port: u32) -> UnixStream {
        self.send(hdr(OP_REQUEST, gport, port), &[]);
        let (h, _) = self.recv_op(OP_RESPONSE);
        assert_eq!((h.src_port, h.dst_port), (port, gport));
        assert_eq!(h.buf_alloc, CONN_BUF);
        let (s, _) = svc.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }
}

fn read_exact(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).unwrap();
    v
}

#[test]
fn guest_initiated_stream() {
    let mem = memory();
    let mut g = Guest::new(&mem);
    let svc = g.service(1234);
    let mut host = g.connect(&svc, 5000, 1234);
    g.send(hdr(OP_RW, 5000, 1234), b"hello");
    assert_eq!(read_exact(&mut host, 5), b"hello");
    // The first bytes forwarded with an empty buffer earn a credit update.
    let (h, _) = g.recv_op(OP_CREDIT_UPDATE);
    assert_eq!(h.fwd_cnt, 5);
    host.write_all(b"world").unwrap();
    let (h, d) = g.recv_op(OP_RW);
    assert_eq!(d, b"world");
    assert_eq!((h.src_port, h.dst_port, h.fwd_cnt), (1234, 5000, 5));
    // Guest closes: the host sees EOF and the guest gets its RST.
    g.send(
        Header {
            flags: SHUTDOWN_BOTH,
            ..hdr(OP_SHUTDOWN, 5000, 1234)
        },
        &[],
    );
    g.recv_op(OP_RST);
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert_eq!(g.dev.connection_count(), 0);
    let c = g.dev.counters();
    assert_eq!((c.bytes_written, c.bytes_read), (5, 5));
}

#[test]
fn host_eof_and_half_close() {
    let mem = memory();
    let mut g = Guest::new(&mem);
    let svc = g.service(7);
    let mut host = g.connect(&svc, 6000, 7);
    // Guest shuts down its sending side: the host reads EOF but may still write.
    g.send(
        Header {
            flags: SHUTDOWN_SEND,
            ..hdr(OP_SHUTDOWN, 6000, 7)
        },
        &[],
    );
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    host.write_all(b"bye").unwrap();
    assert_eq!(g.recv_op(OP_RW).1, b"bye");
    drop(host);
    let (h, _) = g.recv_op(OP_SHUTDOWN);
    assert_eq!(h.flags, SHUTDOWN_SEND);
    g.send(hdr(OP_RST, 6000, 7), &[]);
    assert_eq!(g.dev.connection_count(), 0);
}

/// A host that half-closes (sends its request, then `shutdown(Write)`) still gets the guest's
/// answer: its EOF becomes SHUTDOWN(SEND) only. Found by the end-to-end echo test, where the
/// guest's echo failed with EPIPE after a SHUTDOWN(both).
#[test]
fn host_half_close_still_receives() {
    let mem = memory();
    let mut g = Guest::new(&mem);
    let svc = g.service(8);
    let mut host = g.connect(&svc, 6001, 8);
    host.write_all(b"ping").unwrap();
    host.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(g.recv_op(OP_RW).1, b"ping");
    let (h, _) = g.recv_op(OP_SHUTDOWN);
    assert_eq!(h.flags, SHUTDOWN_SEND);
    g.send(hdr(OP_RW, 6001, 8), b"pong");
    assert_eq!(read_exact(&mut host, 4), b"pong");
    // The guest closes too: RST, and the host reads EOF.
    g.send(
        Header {
            flags: SHUTDOWN_BOTH,
            ..hdr(OP_SHUTDOWN, 6001, 8)
        },
        &[],
    );
    g.recv_op(OP_RST);
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert_eq!(g.dev.connection_count(), 0);
}

/// A host that closed for good: the guest's next write resets the connection.
#[test]
fn host_close_then_guest_write_is_reset() {
    let mem = memory();
    let mut g = Guest::new(&mem);
    let svc = g.service(9);
    let host = g.connect(&svc, 6002, 9);
    drop(host);
    let (h, _) = g.recv_op(OP_SHUTDOWN);
    assert_eq!(h.flags, SHUTDOWN_SEND);
    g.send(hdr(OP_RW, 6002, 9), b"late");
    g.recv_op(OP_RST);
    assert_eq!(g.dev.connection_count(), 0);
}

#[test]
fn guest_connect_to_missing_service_is_reset() {
    let mem = memory();
    let mut g = Guest::new(&mem);
    g.send(hdr(OP_REQUEST, 5000, 999), &[]);
    let (h, _) = g.recv_op(OP_RST);
    assert_eq!((h.src_port, h.dst_port), (999, 5000));
    assert_eq!(g.dev.connection_count(), 0);
}

#[test]
fn guest_connect_to_a_full_backlog_is_reset_not_blocked() {
    use socket2::{Domain, SockAddr, Socket, Type};
    let mem = memory();
    let mut g = Guest::new(&mem);
    let mut p = g.uds.clone().into_os_string();
    p.push("_7000");
    // A service that listens with the smallest backlog and never accepts: once one client
    // waits in it, a blocking connect would wait for an accept that never comes.
    let svc = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
    svc.bind(&SockAddr::unix(&p).unwrap()).unwrap();
    svc.listen(0).unwrap();
    let mut waiting = Vec::new();
    for _ in 0..4 {
        let c = Socket::new(Domain::UNIX, Type::STREAM.nonblocking(), None).unwrap();
        if c.connect(&SockAddr::unix(&p).unwrap()).is_err() {
            break;
        }
        waiting.push(c);
    }
    assert!(waiting.len() < 4, "the backlog never filled");
    let start = Instant::now();
    g.send(hdr(OP_REQUEST, 5000, 7000), &[]);
    let (h, _) = g.recv_op(OP_RST);
    assert_eq!((h.src_port, h.dst_port), (7000, 5000));
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(g.dev.connection_count(), 0);
}

#[test]
fn host_initiated_stream() {
    let mem = memory();
    let mut g = Guest::new(&mem);
    let mut client = UnixStream::connect(&g.uds).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // The CONNECT line and the first data in one write: the data belongs to the connection.
    client.write_all(b"CONNECT 52\nearly").unwrap();
    let (req, _) = g.recv_op(OP_REQUEST);
    assert_eq!(req.dst_port, 52);
    assert!(req.src_port >= 1 << 30);
    let mut resp = hdr(OP_RESPONSE, 52, req.src_port);
    resp.buf_alloc = 4096;
    g.send(resp, &[]);
    let ok = format!("OK {}\n", req.src_port);
    assert_eq!(read_exact(&mut client, ok.len()), ok.as_bytes());
    let (h, d) = g.recv_op(OP_RW);
    assert_eq!((h.src_port, h.dst_port), (req.src_port, 52));
    assert_eq!(d, b"early");
    g.send(hdr(OP_RW, 52, req.src_port), b"from guest");
    assert_eq!(read_exact(&mut client, 10), b"from guest");
    // Guest resets: the client sees EOF.
    g.send(hdr(OP_RST, 52, req.src_port), &[]);
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(g.dev.connection_count(), 0);
}

#[test]
fn host_initiated_refused_by_guest() {
    let mem = memory();
    let mut g = Guest::new(&mem);
    let mut client = UnixStream::connect(&g.uds).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.write_all(b"CONNECT 9\n").unwrap();
    let (req, _) = g.recv_op(OP_REQUEST);
    g.send(hdr(OP_RST, 9, req.src_port), &[]);
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn bad_connect_line_closes_client() {
    let mem = memory();
    let mut g = Guest::new(&mem);
    let mut client = UnixStream::connect(&g.uds).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.write_all(b"HELLO THERE\n").unwrap();
    assert_closed(&mut g.dev, &mut client);
    // A line that never ends is cut at 32 bytes.
    let mut client = UnixStream::connect(&g.uds).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.write_all(&[b'7'; 100]).unwrap();
    assert_closed(&mut g.dev, &mut client);
    assert!(g.try_recv().is_none());
}

/// The peer closed: EOF, or a reset when it closed with our bytes unread. The device does its
/// host-side work meanwhile, as its worker would.
fn assert_closed(dev: &mut Vsock, s: &mut UnixStream) {
    let mut buf = [0u8; 16];
    s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        dev.host_event();
        dev.take_kicks();
        match s.read(&mut buf) {
            Ok(0) => return,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            other => panic!("socket not closed: {other:?}"),
        }
        assert!(Instant::now() < deadline, "socket not closed");
    }
}

#[test]
fn credit_limits_host_to_guest() {
    let mem = memory();
    let mut g = Guest::new(&mem);
    let svc = g.service(80);
    let mut req = hdr(OP_REQUEST, 5001, 80);
    req.buf_alloc = 100;
    g.send(req, &[]);
    g.recv_op(OP_RESPONSE);
    let (mut host, _) = svc.accept().unwrap();
    let data = pattern(300, 1);
    host.write_all(&data).unwrap();
    let (_, d1) = g.recv_op(OP_RW);
    assert_eq!(d1, &data[..100]);
    // Out of credit: the device asks once, then waits.
    g.recv_op(OP_CREDIT_REQUEST);
    std::thread::sleep(Duration::from_millis(30));
    assert!(g.try_recv().is_none());
    let mut upd = hdr(OP_CREDIT_UPDATE, 5001, 80);
    upd.buf_alloc = 100;
    upd.fwd_cnt = 100;
    g.send(upd, &[]);
    let (_, d2) = g.recv_op(OP_RW);
    assert_eq!(d2, &data[100..200]);
    g.recv_op(OP_CREDIT_REQUEST);
    // A bigger buffer takes the rest at once.
    upd.buf_alloc = 1000;
    upd.fwd_cnt = 200;
    g.send(upd, &[]);
    let (h, d3) = g.recv_op(OP_RW);
    assert_eq!(d3, &data[200..]);
    assert_eq!(h.len, 100);
}

#[test]
fn guest_credit_request_is_answered() {
    let mem = memory();
    let mut g = Guest::new(&mem);
    let svc = g.service(81);
    let _host = g.connect(&svc, 5002, 81);
    g.send(hdr(OP_CREDIT_REQUEST, 5002, 81), &[]);
    let (h, _) = g.recv_op(OP_CREDIT_UPDATE);
    assert_eq!((h.buf_alloc, h.fwd_cnt), (CONN_BUF, 0));
}

#[test]
fn guest_overrunning_credit_is_reset() {
    let mem = memory();
    let mut g = Guest::new(&mem);
    let svc = g.service(82);
    let _host = g.connect(&svc, 5003, 82);
    // The host never reads: its socket buffer fills, then ours; past CONN_BUF the guest broke
    // the credit rules.
    let chunk = vec![7u8; MAX_PKT_DATA];
    let mut reset = false;
    for _ in 0..64 {
        g.send(hdr(OP_RW, 5003, 82), &chunk);
        while let Some((h, _)) = g.try_recv() {
            if h.op == OP_RST {
                reset = true;
            }
        }
        if reset {
            break;
        }
    }
    assert!(reset, "no RST after overrunning {CONN_BUF} bytes of credit");
    assert_eq!(g.dev.connection_count(), 0);
}

#[test]
fn hostile_packets() {
    let mem = memory();
    let mut g = Guest::new(&mem);
    // Wrong source CID: dropped, counted.
    let mut h = hdr(OP_REQUEST, 1, 2);
    h.src_cid = 99;
    g.send(h, &[]);
    // Wrong destination CID.
    let mut h = hdr(OP_REQUEST, 1, 2);
    h.dst_cid = 7;
    g.send(h, &[]);
    assert!(g.try_recv().is_none());
    assert_eq!(g.dev.counters().errors, 2);
    // Not a stream: RST.
    let mut h = hdr(OP_REQUEST, 1, 2);
    h.type_ = 2;
    g.send(h, &[]);
    g.recv_op(OP_RST);
    // Data, shutdown, credit ops on no connection: RST.
    for op in [OP_RW, OP_SHUTDOWN, OP_CREDIT_UPDATE, OP_RESPONSE, 0, 99] {
        g.send(hdr(op, 1, 2), b"x");
        g.recv_op(OP_RST);
    }
    // An RST to no connection is not answered.
    g.send(hdr(OP_RST, 1, 2), &[]);
    assert!(g.try_recv().is_none());
    // A second REQUEST on an open connection resets it.
    let svc = g.service(3);
    let _host = g.connect(&svc, 10, 3);
    g.send(hdr(OP_REQUEST, 10, 3), &[]);
    g.recv_op(OP_RST);
    assert_eq!(g.dev.connection_count(), 0);
}

#[test]
fn malformed_transmit_chains() {
    let mem = memory();
    let mut g = Guest::new(&mem);
    let at = TX_DATA;
    // Shorter than a header.
    g.tx.add(&[r(at, 20)]);
    // Header claims more data than the chain has.
    let mut h = hdr(OP_RW, 1, 2);
    h.len = 100;
    g.tx.fill(at + 0x1000, &h.to_bytes());
    g.tx.add(&[r(at + 0x1000, 44), r(at + 0x2000, 10)]);
    // Device-writable buffer.
    g.tx.add(&[r(at + 0x1000, 44), w(at + 0x2000, 10)]);
    // Outside guest RAM.
    g.tx.add(&[r(MEM_SIZE - 10, 44)]);
    // Larger than any packet.
    g.tx.add(&[r(at, 44), r(at, (MAX_PKT_DATA + 1) as u32)]);
    g.tx.process(&mut g.dev, TX_QUEUE).unwrap();
    assert_eq!(g.tx.used_idx(), 5);
    assert_eq!(g.dev.counters().errors, 5);
    assert!(g.try_recv().is_none());
    // A loop needs a reset.
    g.tx.write_desc(10, at, 44, VRING_DESC_F_NEXT as u16, 10);
    g.tx.publish(10);
    assert!(matches!(
        g.tx.process(&mut g.dev, TX_QUEUE),
        Err(DeviceError::InvalidChain)
    ));
}

#[test]
fn unusable_receive_buffer_keeps_the_packet() {
    let mem = memory();
    let mut g = Guest::new(&mem);
    g.send(hdr(OP_RW, 1, 2), &[]);
    // A device-readable buffer and one too small for a header.
    g.rx.add(&[r(DATA, 4096)]);
    g.rx.add(&[w(DATA, 20)]);
    g.rx.process(&mut g.dev, RX_QUEUE).unwrap();
    assert_eq!(g.rx.used_idx(), 2);
    assert_eq!(g.rx.used(0).1, 0);
    assert_eq!(g.rx.used(1).1, 0);
    g.rx_seen = 2;
    g.rx_posted = 2;
    g.recv_op(OP_RST);
}

#[test]
fn reset_closes_connections() {
    let mem = memory();
    let mut g = Guest::new(&mem);
    let svc = g.service(5);
    let mut host = g.connect(&svc, 11, 5);
    assert_eq!(g.dev.connection_count(), 1);
    g.dev.reset();
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert_eq!(g.dev.connection_count(), 0);
    // The listener survives a reset; a new activation serves it again.
    g.dev.activate(g.dev.features()).unwrap();
    let mut client = UnixStream::connect(&g.uds).unwrap();
    client.write_all(b"CONNECT 1\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while g.dev.connection_count() == 0 {
        assert!(Instant::now() < deadline);
        wait_readable(g.dev.host_fd(), 5);
        g.dev.host_event();
    }
}

#[test]
fn config_and_construction_errors() {
    let mem = memory();
    let g = Guest::new(&mem);
    let mut c = [0u8; 8];
    g.dev.read_config(0, &mut c);
    assert_eq!(u64::from_le_bytes(c), CID);
    assert_eq!(g.dev.device_type(), 19);
    assert_eq!(g.dev.queue_max_sizes().len(), 3);
    for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 40] {
        let e = Vsock::new(VsockConfig {
            guest_cid: cid,
            uds_path: g.dir.path("x.sock"),
        });
        assert!(matches!(e, Err(Error::Cid(_))));
    }
    let e = match Vsock::new(VsockConfig {
        guest_cid: 3,
        uds_path: g.dir.path("no/such/dir/v.sock"),
    }) {
        Err(e) => e,
        Ok(_) => panic!("bound in a missing directory"),
    };
    assert!(e.to_string().contains("no/such/dir/v.sock"), "{e}");
    // A stale socket file is replaced; dropping the device removes it.
    let stale = g.dir.path("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let d = Vsock::new(VsockConfig {
        guest_cid: 3,
        uds_path: stale.clone(),
    })
    .unwrap();
    drop(d);
    assert!(!stale.exists());
}

#[test]
fn state_round_trip_and_reset_event() {
    let mem = memory();
    let g = Guest::new(&mem);
    let s = g.dev.save();
    let dir = TempDir::new("vsock-restore");
    let mut other = Vsock::new(VsockConfig {
        guest_cid: CID,
        uds_path: dir.path("v.sock"),
    })
    .unwrap();
    other.restore(&s).unwrap();
    assert_eq!(other.save(), s);
    let DeviceState::Vsock(vs) = &s else {
        panic!("not vsock state")
    };
    let mut bad = vs.clone();
    bad.guest_cid = 4;
    assert!(other.restore(&DeviceState::Vsock(bad)).is_err());
    assert!(
        other
            .restore(&DeviceState::Rng(RngState::default()))
            .is_err()
    );
    // Restored and activated: the device asks for the event queue, which gets one
    // TRANSPORT_RESET event.
    assert_eq!(other.take_kicks(), 0);
    other.activate(other.features()).unwrap();
    assert_eq!(other.take_kicks(), 1 << EVENT_QUEUE);
    let mut ev = QDriver::new(&mem, EVQ, 16);
    ev.fill(EV_DATA, &[0xff; 4]);
    ev.add(&[w(EV_DATA, 4)]);
    ev.add(&[w(EV_DATA + 8, 4)]);
    assert!(ev.process(&mut other, EVENT_QUEUE).unwrap());
    assert_eq!(ev.used_idx(), 1);
    assert_eq!(ev.used(0).1, 4);
    assert_eq!(ev.read(EV_DATA, 4), [0, 0, 0, 0]);
    assert!(!ev.process(&mut other, EVENT_QUEUE).unwrap());
    let json = serde_json::to_string(&s).unwrap();
    assert_eq!(serde_json::from_str::<DeviceState>(&json).unwrap(), s);
}

/// The whole path through the transport and its worker: a host client connects, the worker
/// accepts it and processes the receive queue, the REQUEST lands in the guest's buffer with an
/// interrupt.
#[test]
fn worker_delivers_request() {
    let mem = memory();
    let dir = TempDir::new("vsock-mmio");
    let uds = dir.path("v.sock");
    let dev = Vsock::new(VsockConfig {
        guest_cid: CID,
        uds_path: uds.clone(),
    })
    .unwrap();
    let i = irq();
    let mut t = MmioTransport::new(Box::new(dev), Arc::new(mem.clone()), i.clone()).unwrap();
    let worker = crate::Worker::spawn(&t, "vsock-test".into(), || Ok(())).unwrap();
    let mut rx = QDriver::new(&mem, RXQ, 16);
    let tx = QDriver::new(&mem, TXQ, 16);
    let ev = QDriver::new(&mem, EVQ, 16);
    probe(&mut t, &[&rx, &tx, &ev]);
    rx.add(&[w(DATA, 44), w(DATA + 0x100, 4096)]);
    notify(&mut t, 0);
    let mut client = UnixStream::connect(&uds).unwrap();
    client.write_all(b"CONNECT 77\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while rx.used_idx() == 0 || i.count() == 0 {
        assert!(Instant::now() < deadline, "REQUEST not delivered");
        std::thread::sleep(Duration::from_millis(2));
    }
    let h = Header::parse(&rx.read(DATA, 44)).unwrap();
    assert_eq!((h.op, h.dst_port, h.dst_cid), (OP_REQUEST, 77, CID));
    assert_eq!(i.count(), 1);
    drop(worker);
    drop(t);
    // The device is gone: the client sees its socket closed.
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(!uds.exists());
}

/// A muxer without a device around it: the queue test driver (virtio-queue's mock split queue)
/// cannot publish more than half a queue of chains, far fewer than the caps below.
fn bare_muxer(dir: &TempDir) -> (Muxer, PathBuf) {
    let uds = dir.path("v.sock");
    let listener = Arc::new(UnixListener::bind(&uds).unwrap());
    let epoll = Arc::new(vmm_sys_util::epoll::Epoll::new().unwrap());
    (Muxer::new(CID, &uds, listener, epoll).unwrap(), uds)
}

#[test]
fn pending_replies_are_capped_when_the_guest_reads_nothing() {
    let dir = TempDir::new("vsock-cap");
    let (mut mux, _) = bare_muxer(&dir);
    let mut c = Counters::default();
    // Each data packet for no connection earns an RST; the guest takes none of them.
    let extra = 100;
    for i in 0..(MAX_CONTROL + extra) as u32 {
        mux.guest_packet(&hdr(OP_RW, 1000 + i, 2), b"x", &mut c);
    }
    assert_eq!(
        c.errors, extra as u64,
        "replies beyond the cap are dropped and counted"
    );
    let mut rsts = 0;
    while let Some((h, _)) = mux.next_rx_packet(4096, &mut c) {
        assert_eq!(h.op, OP_RST);
        rsts += 1;
    }
    assert_eq!(rsts, MAX_CONTROL);
}

#[test]
fn connections_are_capped() {
    let dir = TempDir::new("vsock-conns");
    let (mut mux, uds) = bare_muxer(&dir);
    let mut svc_path = uds.into_os_string();
    svc_path.push("_3");
    let svc = UnixListener::bind(&svc_path).unwrap();
    let mut c = Counters::default();
    let mut hosts = Vec::new();
    for i in 0..MAX_CONNECTIONS as u32 {
        mux.guest_packet(&hdr(OP_REQUEST, 10_000 + i, 3), &[], &mut c);
        let (h, _) = mux.next_rx_packet(4096, &mut c).unwrap();
        assert_eq!((h.op, h.dst_port), (OP_RESPONSE, 10_000 + i));
        hosts.push(svc.accept().unwrap().0);
    }
    assert_eq!(mux.connection_count(), MAX_CONNECTIONS);
    // One more is refused with an RST, and nothing reaches the host.
    mux.guest_packet(&hdr(OP_REQUEST, 9, 3), &[], &mut c);
    let (h, _) = mux.next_rx_packet(4096, &mut c).unwrap();
    assert_eq!((h.op, h.dst_port), (OP_RST, 9));
    assert_eq!(mux.connection_count(), MAX_CONNECTIONS);
    svc.set_nonblocking(true).unwrap();
    assert!(
        svc.accept().is_err(),
        "a connection beyond the cap reached the host"
    );
}
