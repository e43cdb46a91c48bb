//! Host side of virtio-vsock: stream connections between guest ports and Unix sockets.
//!
//! One `Muxer` lives per activation of the device, on the device's worker thread. Queue
//! processing hands it the guest's packets (`Muxer::guest_packet`) and asks it for packets to
//! put in receive buffers (`Muxer::next_rx_packet`); when the device's epoll set (the worker's
//! host descriptor) is readable, `Muxer::poll` accepts host clients on the listening socket,
//! reads their `CONNECT <port>\n` line and notes which sockets became readable or writable.
//!
//! Credit: each packet to the guest advertises our per-connection buffer ([`CONN_BUF`]) and how
//! many of the guest's bytes we have written to the host socket (`fwd_cnt`); we read from a host
//! socket only as much as the guest's advertised buffer has room for. A guest that sends past
//! our buffer gets its connection reset.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::packet::*;
use crate::Counters;

/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Open connections (including host clients still sending their CONNECT line).
pub const MAX_CONNECTIONS: usize = 1024;
/// Bytes of guest data we buffer per connection (the `buf_alloc` we advertise).
pub const CONN_BUF: u32 = 256 * 1024;
/// Largest payload in one packet, either way.
pub const MAX_PKT_DATA: usize = 64 * 1024;
/// We send a credit update once this many bytes were forwarded since the last one we sent.
const CREDIT_UPDATE_THRESHOLD: u32 = 64 * 1024;
/// Standalone control packets (RSTs to unknown connections) waiting for receive buffers.
pub(crate) const MAX_CONTROL: usize = 1024;
/// Local ports handed out for host-initiated connections start here.
const FIRST_HOST_PORT: u32 = 1 << 30;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;

const TOKEN_LISTENER: u64 = 1;
const FIRST_TOKEN: u64 = 16;
/// Host socket events handled per poll.
const POLL_EVENTS: usize = 64;

/// A connection's identity: our (host) port and the guest's port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    pub local: u32,
    pub peer: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated: REQUEST queued or sent, waiting for the guest's RESPONSE.
    HostInit,
    Established,
}

struct Conn {
    stream: UnixStream,
    token: u64,
    state: State,
    send_request: bool,
    send_response: bool,
    send_credit_update: bool,
    send_credit_request: bool,
    send_shutdown: bool,
    send_rst: bool,
    /// Whether the host socket may have data (an edge was seen and no read returned
    /// `WouldBlock` since).
    readable: bool,
    host_eof: bool,
    /// RST once the guest's data is written out (the guest shut down both directions).
    close_after_flush: bool,
    /// Half-close the host socket once the guest's data is written out.
    shutdown_write_after_flush: bool,
    in_ready: bool,
    credit_requested: bool,
    /// Bytes sent to the guest.
    rx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Guest data not yet written to the host socket.
    tx_buf: VecDeque<u8>,
    /// Guest bytes written to the host socket.
    fwd_cnt: u32,
    last_fwd_sent: u32,
}

impl Conn {
    fn new(stream: UnixStream, token: u64, state: State) -> Conn {
        Conn {
            stream,
            token,
            state,
            send_request: false,
            send_response: false,
            send_credit_update: false,
            send_credit_request: false,
            send_shutdown: false,
            send_rst: false,
            readable: false,
            host_eof: false,
            close_after_flush: false,
            shutdown_write_after_flush: false,
            in_ready: false,
            credit_requested: false,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_buf: VecDeque::new(),
            fwd_cnt: 0,
            last_fwd_sent: 0,
        }
    }

    fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn can_read(&self) -> bool {
        self.state == State::Established && self.readable && !self.host_eof
    }

    fn wants_rx(&self) -> bool {
        self.send_rst
            || self.send_request
            || self.send_response
            || self.send_credit_update
            || self.send_credit_request
            || self.send_shutdown
            || (self.can_read() && (self.peer_credit() > 0 || !self.credit_requested))
    }

    /// Writes buffered guest data to the host socket. Errors mean the host end is gone.
    fn flush(&mut self) -> io::Result<()> {
        while !self.tx_buf.is_empty() {
            let (a, _) = self.tx_buf.as_slices();
            match self.stream.write(a) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.fwd_cnt.wrapping_sub(self.last_fwd_sent) >= CREDIT_UPDATE_THRESHOLD
            || (self.tx_buf.is_empty() && self.fwd_cnt != self.last_fwd_sent)
        {
            self.send_credit_update = true;
        }
        if self.tx_buf.is_empty() {
            if self.close_after_flush {
                self.send_rst = true;
            } else if self.shutdown_write_after_flush {
                self.shutdown_write_after_flush = false;
                let _ = self.stream.shutdown(Shutdown::Write);
            }
        }
        Ok(())
    }

    fn header(&self, key: Key, guest_cid: u64, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: key.local,
            dst_port: key.peer,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// The next packet this connection has for the guest, with at most `max_data` payload.
    fn next_packet(
        &mut self,
        key: Key,
        guest_cid: u64,
        max_data: usize,
    ) -> Option<(Header, Vec<u8>)> {
        let control = |c: &mut Conn, op| Some((c.header(key, guest_cid, op), Vec::new()));
        if self.send_rst {
            return control(self, OP_RST);
        }
        if std::mem::take(&mut self.send_request) {
            return control(self, OP_REQUEST);
        }
        if std::mem::take(&mut self.send_response) {
            return control(self, OP_RESPONSE);
        }
        if self.can_read() {
            let credit = self.peer_credit() as usize;
            if credit == 0 {
                if !self.credit_requested {
                    self.credit_requested = true;
                    self.send_credit_request = true;
                }
            } else if max_data > 0 {
                let mut buf = vec![0u8; credit.min(max_data).min(MAX_PKT_DATA)];
                match self.stream.read(&mut buf) {
                    Ok(0) => {
                        self.host_eof = true;
                        self.send_shutdown = true;
                    }
                    Ok(n) => {
                        buf.truncate(n);
                        self.rx_cnt = self.rx_cnt.wrapping_add(n as u32);
                        let mut h = self.header(key, guest_cid, OP_RW);
                        h.len = n as u32;
                        self.last_fwd_sent = self.fwd_cnt;
                        self.send_credit_update = false;
                        return Some((h, buf));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.readable = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        self.send_rst = true;
                        return control(self, OP_RST);
                    }
                }
            }
        }
        if std::mem::take(&mut self.send_credit_request) {
            return control(self, OP_CREDIT_REQUEST);
        }
        if std::mem::take(&mut self.send_credit_update) {
            self.last_fwd_sent = self.fwd_cnt;
            return control(self, OP_CREDIT_UPDATE);
        }
        if std::mem::take(&mut self.send_shutdown) {
            // EOF only says the host sends no more: it may have half-closed (`shutdown(Write)`)
            // and still wait for the guest's answer. A host that closed for good makes the
            // guest's next write fail, which resets the connection.
            let (h, d) = control(self, OP_SHUTDOWN)?;
            return Some((
                Header {
                    flags: SHUTDOWN_SEND,
                    ..h
                },
                d,
            ));
        }
        None
    }
}

/// A host client that has not finished its `CONNECT <port>\n` line.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

enum Token {
    Conn(Key),
    Handshake,
}

pub(crate) struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: Arc<UnixListener>,
    epoll: Arc<Epoll>,
    conns: HashMap<Key, Conn>,
    handshakes: HashMap<u64, Handshake>,
    tokens: HashMap<u64, Token>,
    next_token: u64,
    next_host_port: u32,
    control: VecDeque<Header>,
    ready: VecDeque<Key>,
}

fn register(epoll: &Epoll, fd: RawFd, token: u64, events: EventSet) -> io::Result<()> {
    epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
}

fn stream_events() -> EventSet {
    EventSet::IN
        | EventSet::OUT
        | EventSet::READ_HANG_UP
        | EventSet::HANG_UP
        | EventSet::ERROR
        | EventSet::EDGE_TRIGGERED
}

impl Muxer {
    pub fn new(
        guest_cid: u64,
        uds_path: &Path,
        listener: Arc<UnixListener>,
        epoll: Arc<Epoll>,
    ) -> io::Result<Muxer> {
        register(
            &epoll,
            listener.as_raw_fd(),
            TOKEN_LISTENER,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        )?;
        Ok(Muxer {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            epoll,
            conns: HashMap::new(),
            handshakes: HashMap::new(),
            tokens: HashMap::new(),
            next_token: FIRST_TOKEN,
            next_host_port: FIRST_HOST_PORT,
            control: VecDeque::new(),
            ready: VecDeque::new(),
        })
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len() + self.handshakes.len()
    }

    /// Closes every connection and host client (they see EOF) and stops listening.
    pub fn shut_down(&mut self) {
        for (_, c) in self.conns.drain() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        for (_, h) in self.handshakes.drain() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                h.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            self.listener.as_raw_fd(),
            EpollEvent::default(),
        );
        self.tokens.clear();
        self.control.clear();
        self.ready.clear();
    }

    pub fn has_rx_work(&self) -> bool {
        !self.control.is_empty() || !self.ready.is_empty()
    }

    fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn enqueue(&mut self, key: Key) {
        if let Some(c) = self.conns.get_mut(&key)
            && !c.in_ready
            && c.wants_rx()
        {
            c.in_ready = true;
            self.ready.push_back(key);
        }
    }

    fn push_control(&mut self, h: Header, counters: &mut Counters) {
        if self.control.len() < MAX_CONTROL {
            self.control.push_back(h);
        } else {
            counters.errors += 1;
        }
    }

    fn remove(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            self.tokens.remove(&c.token);
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    /// Resets connection `key` towards the guest (the RST goes out with the next receive buffer).
    fn reset_conn(&mut self, key: Key, counters: &mut Counters) {
        counters.errors += 1;
        if let Some(c) = self.conns.get_mut(&key) {
            c.send_rst = true;
            let _ = c.stream.shutdown(Shutdown::Both);
        }
        self.enqueue(key);
    }

    /// Handles one packet the guest sent on the transmit queue.
    pub fn guest_packet(&mut self, h: &Header, data: &[u8], counters: &mut Counters) {
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID {
            hv::rate_limited!(tracing::debug!(
                src = h.src_cid,
                dst = h.dst_cid,
                "virtio-vsock: packet with wrong CIDs dropped"
            ));
            counters.errors += 1;
            return;
        }
        if h.type_ != TYPE_STREAM {
            if h.op != OP_RST {
                self.push_control(h.reset_reply(), counters);
            }
            return;
        }
        let key = Key {
            local: h.dst_port,
            peer: h.src_port,
        };
        let Some(c) = self.conns.get_mut(&key) else {
            match h.op {
                OP_REQUEST => self.connect_to_host(key, h, counters),
                OP_RST => {}
                _ => self.push_control(h.reset_reply(), counters),
            }
            return;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        if c.peer_credit() > 0 {
            c.credit_requested = false;
        }
        match (h.op, c.state) {
            (OP_RESPONSE, State::HostInit) => {
                c.state = State::Established;
                c.readable = true;
                let ok = format!("OK {}\n", key.local);
                if c.stream.write_all(ok.as_bytes()).is_err() {
                    self.reset_conn(key, counters);
                    return;
                }
            }
            (OP_RST, _) => {
                self.remove(key);
                return;
            }
            (OP_RW, State::Established) => {
                if c.tx_buf.len() + data.len() > CONN_BUF as usize {
                    hv::rate_limited!(tracing::debug!("virtio-vsock: guest exceeded its credit"));
                    self.reset_conn(key, counters);
                    return;
                }
                counters.bytes_written += data.len() as u64;
                c.tx_buf.extend(data);
                if c.flush().is_err() {
                    self.reset_conn(key, counters);
                    return;
                }
            }
            (OP_SHUTDOWN, State::Established) => {
                let flags = h.flags & SHUTDOWN_BOTH;
                if flags == SHUTDOWN_BOTH {
                    c.close_after_flush = true;
                } else if flags & SHUTDOWN_SEND != 0 {
                    c.shutdown_write_after_flush = true;
                }
                if c.flush().is_err() {
                    self.reset_conn(key, counters);
                    return;
                }
            }
            (OP_CREDIT_UPDATE, State::Established) => {}
            (OP_CREDIT_REQUEST, State::Established) => c.send_credit_update = true,
            _ => {
                hv::rate_limited!(tracing::debug!(
                    op = h.op,
                    "virtio-vsock: unexpected packet resets connection"
                ));
                self.reset_conn(key, counters);
                return;
            }
        }
        self.enqueue(key);
    }

    /// A guest's connection request to host port P connects to `<uds>_P`; refused (the guest
    /// gets a reset) when nothing listens there or its listen backlog is full.
    fn connect_to_host(&mut self, key: Key, h: &Header, counters: &mut Counters) {
        if self.connection_count() >= MAX_CONNECTIONS {
            self.push_control(h.reset_reply(), counters);
            return;
        }
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{}", key.local));
        let stream = match connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                hv::rate_limited!(tracing::debug!(
                    "virtio-vsock: connect to {path:?} failed: {e}"
                ));
                self.push_control(h.reset_reply(), counters);
                return;
            }
        };
        let token = self.token();
        if register(&self.epoll, stream.as_raw_fd(), token, stream_events()).is_err() {
            self.push_control(h.reset_reply(), counters);
            return;
        }
        let mut c = Conn::new(stream, token, State::Established);
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        c.send_response = true;
        c.readable = true;
        self.conns.insert(key, c);
        self.tokens.insert(token, Token::Conn(key));
        self.enqueue(key);
    }

    /// The next packet for a receive buffer with room for `max_data` payload bytes.
    pub fn next_rx_packet(
        &mut self,
        max_data: usize,
        counters: &mut Counters,
    ) -> Option<(Header, Vec<u8>)> {
        if let Some(h) = self.control.pop_front() {
            return Some((h, Vec::new()));
        }
        while let Some(key) = self.ready.pop_front() {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.in_ready = false;
            let pkt = c.next_packet(key, self.guest_cid, max_data);
            if let Some((h, d)) = &pkt {
                counters.bytes_read += d.len() as u64;
                if h.op == OP_RST {
                    self.remove(key);
                    return pkt;
                }
            }
            self.enqueue(key);
            if pkt.is_some() {
                return pkt;
            }
        }
        None
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.connection_count() >= MAX_CONNECTIONS {
                        hv::rate_limited!(tracing::debug!(
                            "virtio-vsock: connection limit, host client dropped"
                        ));
                        continue;
                    }
                    let token = self.token();
                    if stream.set_nonblocking(true).is_err()
                        || register(&self.epoll, stream.as_raw_fd(), token, stream_events())
                            .is_err()
                    {
                        continue;
                    }
                    self.handshakes.insert(
                        token,
                        Handshake {
                            stream,
                            line: Vec::new(),
                        },
                    );
                    self.tokens.insert(token, Token::Handshake);
                    self.handshake_event(token);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        hv::rate_limited!(tracing::debug!("virtio-vsock: accept failed: {e}"));
                    }
                    return;
                }
            }
        }
    }

    /// Reads a host client's CONNECT line one byte at a time (what follows belongs to the
    /// connection).
    fn handshake_event(&mut self, token: u64) {
        let Some(hs) = self.handshakes.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match hs.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break parse_connect(&hs.line),
                Ok(1) if hs.line.len() < MAX_CONNECT_LINE => hs.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                _ => break None,
            }
        };
        let Some(hs) = self.handshakes.remove(&token) else {
            return;
        };
        let Some(peer) = port else {
            hv::rate_limited!(tracing::debug!(
                "virtio-vsock: bad CONNECT line from host client"
            ));
            self.tokens.remove(&token);
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                hs.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            return;
        };
        let local = self.host_port(peer);
        let key = Key { local, peer };
        let mut c = Conn::new(hs.stream, token, State::HostInit);
        c.send_request = true;
        self.conns.insert(key, c);
        self.tokens.insert(token, Token::Conn(key));
        self.enqueue(key);
    }

    fn host_port(&mut self, peer: u32) -> u32 {
        loop {
            let p = self.next_host_port;
            self.next_host_port = self
                .next_host_port
                .checked_add(1)
                .unwrap_or(FIRST_HOST_PORT);
            if !self.conns.contains_key(&Key { local: p, peer }) {
                return p;
            }
        }
    }

    /// Handles the host socket events that are ready now (never blocks).
    pub fn poll(&mut self) {
        let mut events = [EpollEvent::default(); POLL_EVENTS];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    hv::rate_limited!(tracing::warn!("virtio-vsock: epoll: {e}"));
                }
                return;
            }
        };
        for ev in events.iter().take(n) {
            self.event(ev.data(), ev.event_set());
        }
    }

    /// Handles one host socket event.
    pub fn event(&mut self, token: u64, events: EventSet) {
        if token == TOKEN_LISTENER {
            self.accept_all();
            return;
        }
        match self.tokens.get(&token) {
            Some(Token::Handshake) => self.handshake_event(token),
            Some(&Token::Conn(key)) => {
                let Some(c) = self.conns.get_mut(&key) else {
                    return;
                };
                if events.intersects(
                    EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
                ) {
                    c.readable = true;
                }
                if events.contains(EventSet::OUT) && c.flush().is_err() {
                    c.send_rst = true;
                }
                self.enqueue(key);
            }
            None => {}
        }
    }
}

/// `CONNECT <port>` (the newline already stripped).
pub(crate) fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let s = s.strip_suffix('\r').unwrap_or(s);
    let port = s.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

/// Connects to the Unix socket at `path` without blocking: a host service whose listen backlog
/// is full makes a blocking connect wait until the service accepts, and the device's worker
/// would serve nothing else meanwhile. A non-blocking Unix connect completes at once or fails
/// with `EAGAIN`.
fn connect_nonblocking(path: &std::ffi::OsStr) -> std::io::Result<UnixStream> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::UNIX, Type::STREAM.nonblocking().cloexec(), None)?;
    socket.connect(&SockAddr::unix(path)?)?;
    Ok(socket.into())
}
