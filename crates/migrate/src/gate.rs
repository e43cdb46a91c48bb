//! The listener's gate: who gets to be the migration (docs/migration-protocol.md §1.1).
//!
//! Before a peer proves the key it is a stranger, and strangers must not be able to keep a
//! genuine source out. So the gate runs the handshakes of up to [`Limits::max_handshakes`]
//! connections at once, each with a deadline for the whole handshake, at most
//! [`Limits::per_peer`] of them from one IP address. A new connection is never left waiting:
//! when its peer already has its share, that peer's oldest handshake is closed; when all places
//! are taken, the oldest handshake of the peer holding the most is. A genuine source, whose
//! handshake takes one round trip, therefore gets through unless someone opens more connections
//! from its own address within that round trip. The first peer to complete the handshake (key
//! proven, same protocol version) is the migration; the others are closed.
//!
//! It is one thread (the receiver's, which may not start threads under its seccomp filter)
//! waiting in `poll(2)` (through `nix`) on the listener and every pending connection. The
//! handshake code is the blocking one the rest of the protocol uses ([`wire::destination_hello`],
//! [`wire::destination_proof`]), run over an in-memory buffer once a whole frame has arrived:
//! the bytes on the wire are exactly those of a one-connection receiver.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};

use crate::wire::{self, AwaitProof, Channel, Role};
use crate::{Error, Key, ListenerKind, Result};

/// How the gate admits connections. [`Limits::default`] is what `anyvisor run --incoming` uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Handshakes run at once.
    pub max_handshakes: usize,
    /// Handshakes run at once from one IP address (unix socket peers share the global bound).
    pub per_peer: usize,
    /// Time from accepting a connection to the end of its handshake.
    pub deadline: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_handshakes: 16,
            per_peer: 4,
            deadline: Duration::from_secs(10),
        }
    }
}

/// How often the gate asks whether to stop waiting.
const TICK: Duration = Duration::from_millis(100);
/// Largest payload of a handshake message (a ClientHello is 48 bytes, a Proof 32, an Error
/// from the source a short reason).
const MAX_HANDSHAKE_PAYLOAD: usize = 4096;
/// Socket timeouts while handshaking: reads happen only once `poll` said there is data and
/// writes are a few dozen bytes into an empty send buffer, so this only bounds the unexpected.
const STEP_TIMEOUT: Duration = Duration::from_millis(500);
/// Connections accepted per wake-up before the pending ones get their turn.
const ACCEPT_BURST: usize = 64;

/// How a receiver waits for its source.
pub struct Waiting<'a> {
    /// Asked every 100 ms while waiting (and between messages while receiving): `true` gives up
    /// with [`Error::Stopped`].
    pub stop: &'a dyn Fn() -> bool,
    /// Told about each connection closed before it became the migration: the peer and why.
    pub rejected: &'a dyn Fn(&str),
}

impl Waiting<'_> {
    /// Never stops, reports nothing.
    pub fn forever() -> Waiting<'static> {
        Waiting {
            stop: &|| false,
            rejected: &|_| {},
        }
    }
}

/// Who a connection comes from, for the per-peer cap.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Peer {
    Ip(IpAddr),
    /// A unix socket peer: only the socket file's permissions let it in.
    Local,
}

/// The pending handshake (index into `pending`) to close so that one from `peer` can start.
pub(crate) fn victim(pending: &[(Peer, Instant)], peer: &Peer, limits: &Limits) -> Option<usize> {
    let oldest = |of: &dyn Fn(&Peer) -> bool| {
        pending
            .iter()
            .enumerate()
            .filter(|(_, (p, _))| of(p))
            .min_by_key(|(_, (_, t))| *t)
            .map(|(i, _)| i)
    };
    let count = |peer: &Peer| pending.iter().filter(|(p, _)| p == peer).count();
    if matches!(peer, Peer::Ip(_)) && count(peer) >= limits.per_peer.max(1) {
        return oldest(&|p| p == peer);
    }
    if pending.len() < limits.max_handshakes.max(1) {
        return None;
    }
    let most = pending.iter().map(|(p, _)| count(p)).max().unwrap_or(0);
    oldest(&|p| count(p) == most)
}

/// An accepted connection.
pub(crate) enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
            Conn::Unix(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
        }
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Conn::Tcp(s) => s.as_fd(),
            Conn::Unix(s) => s.as_fd(),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.flush(),
            Conn::Unix(s) => s.flush(),
        }
    }
}

/// The connection once authenticated: bytes that arrived after the handshake first, then the
/// socket.
struct Joined {
    early: VecDeque<u8>,
    conn: Conn,
}

impl Read for Joined {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.early.is_empty() {
            self.conn.read(buf)
        } else {
            self.early.read(buf)
        }
    }
}

impl Write for Joined {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.conn.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.conn.flush()
    }
}

/// The handshake's stream: the frame that arrived, and what the handshake answers.
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<(VecDeque<u8>, Vec<u8>)>>);

impl Buffer {
    fn push(&self, bytes: impl IntoIterator<Item = u8>) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .extend(bytes);
    }
    fn take_output(&self) -> Vec<u8> {
        std::mem::take(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner).1)
    }
}

impl Read for Buffer {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .read(buf)
    }
}

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .1
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Step {
    Hello,
    Proof(AwaitProof),
}

/// One connection's handshake in progress.
struct Pending {
    conn: Conn,
    peer: Peer,
    /// The peer as shown in messages.
    name: String,
    opened: Instant,
    /// Bytes read and not yet handed to the handshake.
    input: Vec<u8>,
    buffer: Buffer,
    ch: Channel,
    step: Step,
}

enum Progress {
    Waiting,
    Done,
    Failed(Rejection),
}

/// Why a pending connection was closed; reported to [`Waiting::rejected`] with its causes.
#[derive(Debug, thiserror::Error)]
enum Rejection {
    #[error("closed the connection")]
    Closed,
    #[error("read failed")]
    Read(#[source] io::Error),
    #[error("write failed")]
    Write(#[source] io::Error),
    #[error(transparent)]
    Handshake(Error),
}

impl Pending {
    fn new(conn: Conn, peer: Peer, name: String) -> Pending {
        let buffer = Buffer::default();
        Pending {
            conn,
            peer,
            name,
            opened: Instant::now(),
            input: Vec::new(),
            ch: Channel::new(Box::new(buffer.clone()), Role::Destination),
            buffer,
            step: Step::Hello,
        }
    }

    /// Reads what arrived and runs the handshake over every whole frame.
    fn on_readable(&mut self, key: Option<&Key>) -> Progress {
        let mut chunk = [0u8; 512];
        match self.conn.read(&mut chunk) {
            Ok(0) => return Progress::Failed(Rejection::Closed),
            Ok(n) => self.input.extend(chunk.iter().take(n)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                ) =>
            {
                return Progress::Waiting;
            }
            Err(e) => return Progress::Failed(Rejection::Read(e)),
        }
        loop {
            let authenticated = self.ch.is_authenticated();
            let len =
                match wire::complete_frame_len(&self.input, authenticated, MAX_HANDSHAKE_PAYLOAD) {
                    Ok(Some(len)) => len,
                    Ok(None) => return Progress::Waiting,
                    Err(_) if matches!(self.step, Step::Hello) => {
                        return self
                            .fail(Error::Protocol("not an anyvisor migration stream".into()));
                    }
                    Err(len) => {
                        return self
                            .fail(Error::Protocol(format!("handshake message of {len} bytes")));
                    }
                };
            self.buffer.push(self.input.drain(..len));
            let step = std::mem::replace(&mut self.step, Step::Hello);
            let result = match step {
                Step::Hello => {
                    wire::destination_hello(&mut self.ch, key).map(|p| p.map(Step::Proof))
                }
                Step::Proof(p) => wire::destination_proof(&mut self.ch, &p).map(|()| None),
            };
            match result {
                Ok(Some(next)) => {
                    self.step = next;
                    if let Err(e) = self.send_output() {
                        return Progress::Failed(Rejection::Write(e));
                    }
                }
                Ok(None) => {
                    return match self.send_output() {
                        Ok(()) => Progress::Done,
                        Err(e) => Progress::Failed(Rejection::Write(e)),
                    };
                }
                Err(e) => return self.fail(e),
            }
        }
    }

    /// Tells the peer why, as a one-connection receiver would ([`crate::destination`]), and
    /// gives up.
    fn fail(&mut self, e: Error) -> Progress {
        if crate::destination::tell_peer(&e, &self.ch) {
            self.ch.send_error(&hv::Chain(&e).to_string());
        }
        let _ = self.send_output();
        Progress::Failed(Rejection::Handshake(e))
    }

    fn send_output(&mut self) -> io::Result<()> {
        let out = self.buffer.take_output();
        if out.is_empty() {
            return Ok(());
        }
        self.conn.write_all(&out)?;
        self.conn.flush()
    }

    /// The authenticated channel, now over the socket with the receiver's timeouts.
    fn into_channel(self, timeout: Duration) -> Result<Channel> {
        let Pending {
            conn,
            input,
            mut ch,
            ..
        } = self;
        conn.set_timeouts(timeout).map_err(Error::Io)?;
        ch.set_stream(Box::new(Joined {
            early: input.into(),
            conn,
        }));
        Ok(ch)
    }
}

/// Waits until a peer completes the handshake on `listener` and returns its channel
/// (authenticated when `key` is given). Closes every other pending connection.
pub(crate) fn admit(
    listener: &ListenerKind,
    limits: &Limits,
    timeout: Duration,
    key: Option<&Key>,
    waiting: &Waiting<'_>,
) -> Result<Channel> {
    let deadline = limits.deadline;
    let mut pending: Vec<Pending> = Vec::new();
    loop {
        if (waiting.stop)() {
            return Err(Error::Stopped);
        }
        let now = Instant::now();
        pending.retain(|p| {
            let late = now.saturating_duration_since(p.opened) >= deadline;
            if late {
                (waiting.rejected)(&format!(
                    "{}: no handshake within {} s",
                    p.name,
                    deadline.as_secs_f32()
                ));
            }
            !late
        });
        let wait = pending
            .iter()
            .map(|p| (p.opened + deadline).saturating_duration_since(now))
            .fold(TICK, Duration::min);
        let (listener_ready, ready) = {
            let mut fds = Vec::with_capacity(pending.len() + 1);
            fds.push(PollFd::new(listener.as_fd(), PollFlags::POLLIN));
            for p in &pending {
                fds.push(PollFd::new(p.conn.as_fd(), PollFlags::POLLIN));
            }
            let ms = PollTimeout::try_from(wait.max(Duration::from_millis(1)))
                .unwrap_or(PollTimeout::MAX);
            match nix::poll::poll(&mut fds, ms) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(Error::Io(e.into())),
            }
            let is_ready = |f: &PollFd<'_>| f.any().unwrap_or(false);
            let mut it = fds.iter();
            let l = it.next().is_some_and(is_ready);
            (l, it.map(is_ready).collect::<Vec<bool>>())
        };
        // Pending connections first: a source that has sent its ClientHello is further along
        // than any connection still in the accept queue.
        let mut i = 0;
        let mut seen = ready.into_iter();
        while i < pending.len() {
            if !seen.next().unwrap_or(false) {
                i += 1;
                continue;
            }
            let Some(p) = pending.get_mut(i) else { break };
            match p.on_readable(key) {
                Progress::Waiting => i += 1,
                Progress::Done => {
                    let winner = pending.swap_remove(i);
                    // Everyone else is closed as `pending` drops.
                    return winner.into_channel(timeout);
                }
                Progress::Failed(reason) => {
                    let p = pending.remove(i);
                    (waiting.rejected)(&format!("{}: {}", p.name, hv::Chain(&reason)));
                }
            }
        }
        if listener_ready {
            accept_some(listener, limits, &mut pending, waiting);
        }
    }
}

/// Accepts what is queued on the (non-blocking) listener, making room by [`victim`].
fn accept_some(
    listener: &ListenerKind,
    limits: &Limits,
    pending: &mut Vec<Pending>,
    waiting: &Waiting<'_>,
) {
    for _ in 0..ACCEPT_BURST {
        let accepted = match listener {
            ListenerKind::Tcp(l) => l.accept().map(|(s, a)| {
                let _ = s.set_nodelay(true);
                (Conn::Tcp(s), Peer::Ip(a.ip()), format!("tcp:{a}"))
            }),
            ListenerKind::Unix(l, _) => l
                .accept()
                .map(|(s, _)| (Conn::Unix(s), Peer::Local, "a unix socket peer".to_string())),
        };
        let (conn, peer, name) = match accepted {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
            Err(e) => {
                // Out of descriptors, say: let the pending handshakes end first.
                (waiting.rejected)(&format!("cannot accept a connection: {e}"));
                std::thread::sleep(TICK);
                return;
            }
        };
        if conn.set_timeouts(STEP_TIMEOUT).is_err() {
            continue;
        }
        let ages: Vec<(Peer, Instant)> =
            pending.iter().map(|p| (p.peer.clone(), p.opened)).collect();
        if let Some(v) = victim(&ages, &peer, limits) {
            let old = pending.remove(v);
            let why = if old.peer == peer && matches!(peer, Peer::Ip(_)) {
                format!(
                    "closed for a newer connection from the same address (at most {} handshakes per address)",
                    limits.per_peer
                )
            } else {
                format!(
                    "closed for a newer connection (at most {} handshakes at once)",
                    limits.max_handshakes
                )
            };
            (waiting.rejected)(&format!("{}: {why}", old.name));
        }
        pending.push(Pending::new(conn, peer, name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> Peer {
        Peer::Ip(IpAddr::from([10, 0, 0, last]))
    }

    #[test]
    fn a_new_connection_always_gets_a_place() {
        let limits = Limits {
            max_handshakes: 4,
            per_peer: 2,
            deadline: Duration::from_secs(10),
        };
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // Room left: nobody is closed.
        assert_eq!(victim(&[], &ip(1), &limits), None);
        assert_eq!(victim(&[(ip(1), at(0))], &ip(1), &limits), None);
        // A peer at its share loses its own oldest, not anyone else's.
        let p = [(ip(2), at(0)), (ip(1), at(2)), (ip(1), at(1))];
        assert_eq!(victim(&p, &ip(1), &limits), Some(2));
        // All places taken: the oldest of the peer holding the most goes.
        let p = [
            (ip(1), at(5)),
            (ip(2), at(0)),
            (ip(3), at(3)),
            (ip(3), at(4)),
        ];
        assert_eq!(victim(&p, &ip(4), &limits), Some(2));
        // Unix peers share the global bound only.
        let p = [
            (Peer::Local, at(3)),
            (Peer::Local, at(1)),
            (Peer::Local, at(2)),
        ];
        assert_eq!(victim(&p, &Peer::Local, &limits), None);
        let p = [
            (Peer::Local, at(3)),
            (Peer::Local, at(1)),
            (Peer::Local, at(2)),
            (Peer::Local, at(4)),
        ];
        assert_eq!(victim(&p, &Peer::Local, &limits), Some(1));
        // Zero limits behave as one.
        let none = Limits {
            max_handshakes: 0,
            per_peer: 0,
            deadline: Duration::ZERO,
        };
        assert_eq!(victim(&[(ip(1), at(0))], &ip(1), &none), Some(0));
        assert_eq!(victim(&[], &ip(1), &none), None);
    }

    /// Feeds `input` to a pending handshake in pieces of `piece` bytes, as a peer would send it.
    fn drive(input: &[u8], piece: usize, key: Option<&Key>) -> Progress {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        theirs.set_nonblocking(true).unwrap();
        ours.set_read_timeout(Some(STEP_TIMEOUT)).unwrap();
        let mut p = Pending::new(Conn::Unix(ours), Peer::Local, "peer".into());
        let mut sink = [0u8; 4096];
        for chunk in input.chunks(piece.max(1)) {
            if theirs.write_all(chunk).is_err() {
                break;
            }
            match p.on_readable(key) {
                Progress::Waiting => {}
                done => return done,
            }
            // Keep the answers from filling the socket buffer.
            while theirs.read(&mut sink).is_ok_and(|n| n > 0) {}
        }
        drop(theirs);
        p.on_readable(key)
    }

    fn client_hello(flags: u32) -> Vec<u8> {
        let mut f = vec![1u8, 0, 0, 0, 48, 0, 0, 0];
        f.extend(wire::MAGIC);
        f.extend(wire::PROTOCOL_VERSION.to_le_bytes());
        f.extend(flags.to_le_bytes());
        f.extend([9u8; 32]);
        f
    }

    #[test]
    fn a_keyless_handshake_completes_in_any_pieces_and_garbage_never_panics() {
        for piece in [1, 3, 7, 56] {
            assert!(matches!(
                drive(&client_hello(0), piece, None),
                Progress::Done
            ));
        }
        // A key on one side only, a stranger's bytes, a huge announced length.
        let failed = |p: Progress, what: &str| match p {
            Progress::Failed(r) => {
                let m = hv::Chain(&r).to_string();
                assert!(m.contains(what), "{m}");
            }
            _ => panic!("expected a failure with {what:?}"),
        };
        failed(drive(&client_hello(1), 5, None), "requires a migration key");
        failed(drive(b"GET / HTTP/1.1\r\n\r\n", 4, None), "not an anyvisor");
        failed(
            drive(&[1, 0, 0, 0, 255, 255, 255, 255], 8, None),
            "not an anyvisor",
        );
        // Mutations of a ClientHello followed by a Proof-sized frame, with and without a key.
        let key = Key::from_bytes(&[3u8; 32]).unwrap();
        let mut valid = client_hello(1);
        valid.extend([3u8, 0, 0, 0, 32, 0, 0, 0]);
        valid.extend([0u8; 64]);
        let mut seed = 0x9e37_79b9_u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed as usize
        };
        for round in 0..3000 {
            let mut v = valid.clone();
            for _ in 0..1 + round % 4 {
                let r = next();
                let i = r % v.len();
                v[i] = r.to_le_bytes()[1];
            }
            v.truncate(next() % (v.len() + 1));
            let k = (round % 2 == 0).then_some(&key);
            // Without a key some mutations are still a valid ClientHello; with one, nobody
            // without the key completes the handshake.
            let r = drive(&v, 1 + next() % 13, k);
            assert!(k.is_none() || !matches!(r, Progress::Done), "round {round}");
        }
    }

    #[test]
    fn frames_are_handed_over_only_when_whole() {
        let mut f = vec![1u8, 0, 0, 0, 48, 0, 0, 0];
        assert_eq!(wire::complete_frame_len(&f[..5], false, 4096), Ok(None));
        assert_eq!(wire::complete_frame_len(&f, false, 4096), Ok(None));
        f.extend([0u8; 48]);
        assert_eq!(wire::complete_frame_len(&f, false, 4096), Ok(Some(56)));
        assert_eq!(wire::complete_frame_len(&f, true, 4096), Ok(None));
        f.extend([0u8; 40]);
        assert_eq!(wire::complete_frame_len(&f, true, 4096), Ok(Some(88)));
        let big = [1u8, 0, 0, 0, 0, 0, 1, 0];
        assert_eq!(wire::complete_frame_len(&big, false, 4096), Err(65536));
    }
}
