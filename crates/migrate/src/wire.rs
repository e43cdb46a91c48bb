//! Framing, the handshake and per-message authentication (docs/migration-protocol.md §2–§4).

use std::io::{self, Read, Write};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::{Error, Key, Result};

type HmacSha256 = Hmac<Sha256>;

/// The protocol version this build speaks. Both sides must speak the same one.
pub const PROTOCOL_VERSION: u32 = 1;

pub(crate) const MAGIC: [u8; 8] = *b"AVMIGRAT";
pub(crate) const HEADER_LEN: usize = 8;
pub(crate) const MAC_LEN: usize = 32;
pub(crate) const NONCE_LEN: usize = 32;
/// Largest payload of one message: a full page batch (12 + 1024 + 1024 * 4096 bytes) fits.
pub(crate) const MAX_PAYLOAD: usize = 4 * 1024 * 1024 + 64 * 1024;
const HELLO_LEN: usize = 8 + 4 + 4 + NONCE_LEN;
const FLAG_AUTH: u32 = 1;
/// Reasons in Refuse/Error messages are cut to this many characters when shown.
const MAX_REASON_CHARS: usize = 512;

/// Message types (u16 on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    ClientHello = 1,
    ServerHello = 2,
    Proof = 3,
    Hello = 16,
    Ready = 17,
    Refuse = 18,
    MemoryPages = 32,
    RoundEnd = 33,
    StateBlob = 48,
    Complete = 49,
    Resumed = 50,
    Error = 64,
}

impl Kind {
    fn from_code(code: u16) -> Option<Kind> {
        Some(match code {
            1 => Kind::ClientHello,
            2 => Kind::ServerHello,
            3 => Kind::Proof,
            16 => Kind::Hello,
            17 => Kind::Ready,
            18 => Kind::Refuse,
            32 => Kind::MemoryPages,
            33 => Kind::RoundEnd,
            48 => Kind::StateBlob,
            49 => Kind::Complete,
            50 => Kind::Resumed,
            64 => Kind::Error,
            _ => return None,
        })
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::ClientHello => "ClientHello",
            Kind::ServerHello => "ServerHello",
            Kind::Proof => "Proof",
            Kind::Hello => "Hello",
            Kind::Ready => "Ready",
            Kind::Refuse => "Refuse",
            Kind::MemoryPages => "MemoryPages",
            Kind::RoundEnd => "RoundEnd",
            Kind::StateBlob => "StateBlob",
            Kind::Complete => "Complete",
            Kind::Resumed => "Resumed",
            Kind::Error => "Error",
        }
    }
}

/// Which end of the stream a [`Channel`] is; also the direction byte in every MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    Source = 0,
    Destination = 1,
}

pub(crate) trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

pub(crate) struct Frame {
    pub kind: Kind,
    pub payload: Vec<u8>,
}

/// One end of a migration stream: frames messages, and once authenticated, MACs them with
/// sequence numbers.
pub(crate) struct Channel {
    stream: Box<dyn Stream>,
    role: Role,
    mac: Option<HmacSha256>,
    sent: u64,
    received: u64,
    pub(crate) bytes_out: u64,
}

impl Channel {
    pub(crate) fn new(stream: Box<dyn Stream>, role: Role) -> Channel {
        Channel {
            stream,
            role,
            mac: None,
            sent: 0,
            received: 0,
            bytes_out: 0,
        }
    }

    /// Carries on over `stream` (MAC state and counters unchanged): the handshake ran over a
    /// buffer, the rest of the session runs over the socket.
    pub(crate) fn set_stream(&mut self, stream: Box<dyn Stream>) {
        self.stream = stream;
    }

    pub(crate) fn is_authenticated(&self) -> bool {
        self.mac.is_some()
    }

    /// From now on every message in both directions carries a MAC under `session_key`; sequence
    /// numbers start at 0 in each direction.
    fn authenticate(&mut self, session_key: &[u8]) -> Result<()> {
        let mac = HmacSha256::new_from_slice(session_key)
            .map_err(|_| Error::Auth("cannot key the MAC"))?;
        self.mac = Some(mac);
        self.sent = 0;
        self.received = 0;
        Ok(())
    }

    fn tag(
        mac: &HmacSha256,
        dir: Role,
        seq: u64,
        header: &[u8; HEADER_LEN],
        payload: &[u8],
    ) -> HmacSha256 {
        let mut m = mac.clone();
        m.update(&[dir as u8]);
        m.update(&seq.to_le_bytes());
        m.update(header);
        m.update(payload);
        m
    }

    pub(crate) fn send(&mut self, kind: Kind, payload: &[u8]) -> Result<()> {
        if payload.len() > MAX_PAYLOAD {
            return Err(Error::Protocol(format!(
                "{} of {} bytes exceeds the message size limit",
                kind.name(),
                payload.len()
            )));
        }
        let len = u32::try_from(payload.len())
            .map_err(|_| Error::Protocol("message too large".into()))?;
        let mut header = [0u8; HEADER_LEN];
        header[0..2].copy_from_slice(&(kind as u16).to_le_bytes());
        header[4..8].copy_from_slice(&len.to_le_bytes());
        let tag = self.mac.as_ref().map(|m| {
            Self::tag(m, self.role, self.sent, &header, payload)
                .finalize()
                .into_bytes()
        });
        self.stream.write_all(&header).map_err(map_io)?;
        self.stream.write_all(payload).map_err(map_io)?;
        let mut n = HEADER_LEN + payload.len();
        if let Some(t) = tag {
            self.stream.write_all(&t).map_err(map_io)?;
            n += MAC_LEN;
        }
        self.stream.flush().map_err(map_io)?;
        self.sent += 1;
        self.bytes_out += n as u64;
        Ok(())
    }

    /// Reads one message. The length is capped before anything is allocated, and the MAC (when
    /// authenticated) is checked before the type is interpreted.
    pub(crate) fn recv(&mut self) -> Result<Frame> {
        let mut header = [0u8; HEADER_LEN];
        self.stream.read_exact(&mut header).map_err(map_io)?;
        let code = u16::from_le_bytes([header[0], header[1]]);
        let reserved = u16::from_le_bytes([header[2], header[3]]);
        let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        if reserved != 0 {
            return Err(Error::Protocol("malformed message header".into()));
        }
        if len > MAX_PAYLOAD {
            return Err(Error::Protocol(format!(
                "message of {len} bytes exceeds the size limit"
            )));
        }
        let mut payload = vec![0u8; len];
        self.stream.read_exact(&mut payload).map_err(map_io)?;
        if let Some(mac) = &self.mac {
            let mut tag = [0u8; MAC_LEN];
            self.stream.read_exact(&mut tag).map_err(map_io)?;
            let peer = match self.role {
                Role::Source => Role::Destination,
                Role::Destination => Role::Source,
            };
            Self::tag(mac, peer, self.received, &header, &payload)
                .verify_slice(&tag)
                .map_err(|_| {
                    Error::Auth("message MAC mismatch (tampered, replayed or reordered)")
                })?;
        }
        self.received += 1;
        let kind = Kind::from_code(code)
            .ok_or_else(|| Error::Protocol(format!("unknown message type {code}")))?;
        Ok(Frame { kind, payload })
    }

    /// Best effort: tells the peer why we stop. Never fails.
    pub(crate) fn send_error(&mut self, reason: &str) {
        let _ = self.send(Kind::Error, reason.as_bytes());
    }
}

fn map_io(e: io::Error) -> Error {
    use io::ErrorKind::*;
    match e.kind() {
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected => {
            Error::PeerGone
        }
        WouldBlock | TimedOut => Error::Timeout,
        _ => Error::Io(e),
    }
}

/// A peer-supplied reason, made safe to show on one line.
pub(crate) fn reason_text(payload: &[u8]) -> String {
    let s = String::from_utf8_lossy(payload);
    let mut out: String = s
        .chars()
        .take(MAX_REASON_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.trim().is_empty() {
        out = "(no reason given)".into();
    }
    out
}

/// The error for a message that is valid but not expected now. An `Error` message from the
/// peer becomes [`Error::Peer`] with its reason.
pub(crate) fn unexpected(frame: &Frame, during: &str) -> Error {
    match frame.kind {
        Kind::Error => Error::Peer(reason_text(&frame.payload)),
        k => Error::Protocol(format!("unexpected {} {during}", k.name())),
    }
}

fn hello_payload(auth: bool, nonce: &[u8; NONCE_LEN]) -> Vec<u8> {
    let mut p = Vec::with_capacity(HELLO_LEN);
    p.extend_from_slice(&MAGIC);
    p.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    p.extend_from_slice(&(if auth { FLAG_AUTH } else { 0 }).to_le_bytes());
    p.extend_from_slice(nonce);
    p
}

struct PeerHello {
    version: u32,
    auth: bool,
    nonce: [u8; NONCE_LEN],
}

fn parse_hello(p: &[u8]) -> Result<PeerHello> {
    let p = match <&[u8; HELLO_LEN]>::try_from(p) {
        Ok(p) if p[0..8] == MAGIC => p,
        _ => return Err(Error::Protocol("not an anyvisor migration stream".into())),
    };
    let version = u32::from_le_bytes([p[8], p[9], p[10], p[11]]);
    let flags = u32::from_le_bytes([p[12], p[13], p[14], p[15]]);
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&p[16..16 + NONCE_LEN]);
    Ok(PeerHello {
        version,
        auth: flags & FLAG_AUTH != 0,
        nonce,
    })
}

fn new_nonce(auth: bool) -> Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    if auth {
        getrandom::fill(&mut n).map_err(|_| Error::Auth("no randomness for the nonce"))?;
    }
    Ok(n)
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> Result<[u8; MAC_LEN]> {
    let mut m = HmacSha256::new_from_slice(key).map_err(|_| Error::Auth("cannot key the MAC"))?;
    for p in parts {
        m.update(p);
    }
    Ok(m.finalize().into_bytes().into())
}

fn session_key(key: &Key, nonce_s: &[u8], nonce_d: &[u8]) -> Result<[u8; MAC_LEN]> {
    hmac(key.bytes(), &[b"anyvisor-migration", nonce_s, nonce_d])
}

fn transcript(client_hello: &[u8], server_hello: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(client_hello);
    h.update(server_hello);
    h.finalize().into()
}

const SOURCE_PROOF: &[u8] = b"anyvisor-migration source proof";
const DESTINATION_PROOF: &[u8] = b"anyvisor-migration destination proof";

fn check_peer(ours_auth: bool, peer: &PeerHello) -> Result<()> {
    if peer.version != PROTOCOL_VERSION {
        return Err(Error::Version {
            ours: PROTOCOL_VERSION,
            theirs: peer.version,
        });
    }
    match (ours_auth, peer.auth) {
        (true, false) => Err(Error::Auth("the peer has no migration key")),
        (false, true) => Err(Error::Auth("the peer requires a migration key")),
        _ => Ok(()),
    }
}

fn verify_proof(ch: &mut Channel, session: &[u8], label: &[u8], t: &[u8]) -> Result<()> {
    // The first authenticated message fails its MAC when the keys differ.
    let f = ch.recv().map_err(|e| match e {
        Error::Auth(_) => Error::Auth("wrong key"),
        e => e,
    })?;
    if f.kind != Kind::Proof {
        return Err(unexpected(&f, "during the handshake"));
    }
    let mut m =
        HmacSha256::new_from_slice(session).map_err(|_| Error::Auth("cannot key the MAC"))?;
    m.update(label);
    m.update(t);
    m.verify_slice(&f.payload)
        .map_err(|_| Error::Auth("wrong key"))
}

/// The source's half of the handshake (§3). On return the channel is authenticated iff `key`
/// was given.
pub(crate) fn handshake_source(ch: &mut Channel, key: Option<&Key>) -> Result<()> {
    let nonce_s = new_nonce(key.is_some())?;
    let ours = hello_payload(key.is_some(), &nonce_s);
    ch.send(Kind::ClientHello, &ours)?;
    let f = ch.recv()?;
    if f.kind != Kind::ServerHello {
        return Err(unexpected(&f, "instead of ServerHello"));
    }
    let peer = parse_hello(&f.payload)?;
    // On failure the caller tells the destination why.
    check_peer(key.is_some(), &peer)?;
    let Some(key) = key else { return Ok(()) };
    let session = session_key(key, &nonce_s, &peer.nonce)?;
    let t = transcript(&ours, &f.payload);
    ch.authenticate(&session)?;
    ch.send(Kind::Proof, &hmac(&session, &[SOURCE_PROOF, &t])?)?;
    verify_proof(ch, &session, DESTINATION_PROOF, &t)
}

/// What the destination still has to check after the hellos: the source's proof under the
/// session key and the transcript.
pub(crate) struct AwaitProof {
    session: [u8; MAC_LEN],
    transcript: [u8; 32],
}

/// The destination's half of the handshake (§3).
pub(crate) fn handshake_destination(ch: &mut Channel, key: Option<&Key>) -> Result<()> {
    match destination_hello(ch, key)? {
        Some(p) => destination_proof(ch, &p),
        None => Ok(()),
    }
}

/// The first step of [`handshake_destination`]: reads exactly one frame (the ClientHello) and
/// answers it. `None`: no key, the handshake is complete.
pub(crate) fn destination_hello(ch: &mut Channel, key: Option<&Key>) -> Result<Option<AwaitProof>> {
    let not_ours = || Error::Protocol("not an anyvisor migration stream".into());
    let f = ch.recv().map_err(|e| match e {
        Error::Protocol(_) => not_ours(),
        e => e,
    })?;
    if f.kind != Kind::ClientHello {
        return Err(not_ours());
    }
    let peer = parse_hello(&f.payload)?;
    let nonce_d = new_nonce(key.is_some())?;
    let ours = hello_payload(key.is_some(), &nonce_d);
    if peer.version != PROTOCOL_VERSION {
        // Answer with an Error the peer's version can still read: the header is unchanged.
        let e = Error::Version {
            ours: PROTOCOL_VERSION,
            theirs: peer.version,
        };
        ch.send_error(&e.to_string());
        return Err(e);
    }
    ch.send(Kind::ServerHello, &ours)?;
    check_peer(key.is_some(), &peer)?;
    let Some(key) = key else { return Ok(None) };
    let session = session_key(key, &peer.nonce, &nonce_d)?;
    let transcript = transcript(&f.payload, &ours);
    ch.authenticate(&session)?;
    Ok(Some(AwaitProof {
        session,
        transcript,
    }))
}

/// The second step of [`handshake_destination`]: reads exactly one frame (the source's Proof),
/// verifies it and sends ours.
pub(crate) fn destination_proof(ch: &mut Channel, p: &AwaitProof) -> Result<()> {
    verify_proof(ch, &p.session, SOURCE_PROOF, &p.transcript)?;
    ch.send(
        Kind::Proof,
        &hmac(&p.session, &[DESTINATION_PROOF, &p.transcript])?,
    )
}

/// The length of the frame at the start of `buf` (header, payload and, on an authenticated
/// channel, MAC) once all of it is there; `Err` when its payload is longer than `max_payload`.
/// The header's other fields are checked by [`Channel::recv`].
pub(crate) fn complete_frame_len(
    buf: &[u8],
    authenticated: bool,
    max_payload: usize,
) -> std::result::Result<Option<usize>, usize> {
    let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
    if len > max_payload {
        return Err(len);
    }
    let total = HEADER_LEN + len + if authenticated { MAC_LEN } else { 0 };
    Ok((buf.len() >= total).then_some(total))
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A stream that records what is written and reads from a fixed input.
    #[derive(Clone, Default)]
    struct Tape {
        out: Arc<Mutex<Vec<u8>>>,
        input: Arc<Mutex<Cursor<Vec<u8>>>>,
    }

    impl Read for Tape {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.lock().unwrap().read(buf)
        }
    }

    impl Write for Tape {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.out.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn authed(role: Role, tape: Tape) -> Channel {
        let mut ch = Channel::new(Box::new(tape), role);
        ch.authenticate(&[7u8; 32]).unwrap();
        ch
    }

    /// Frames as the source writes them, split into one byte vector per message.
    fn source_frames(msgs: &[(Kind, &[u8])]) -> Vec<Vec<u8>> {
        let tape = Tape::default();
        let mut ch = authed(Role::Source, tape.clone());
        let mut frames = Vec::new();
        for (k, p) in msgs {
            let before = tape.out.lock().unwrap().len();
            ch.send(*k, p).unwrap();
            frames.push(tape.out.lock().unwrap()[before..].to_vec());
        }
        frames
    }

    fn read_all(role: Role, bytes: Vec<u8>) -> Vec<Result<Frame>> {
        let tape = Tape::default();
        *tape.input.lock().unwrap() = Cursor::new(bytes);
        let mut ch = authed(role, tape);
        let mut out = Vec::new();
        loop {
            let r = ch.recv();
            let stop = r.is_err();
            out.push(r);
            if stop {
                return out;
            }
        }
    }

    #[test]
    fn authenticated_frames_round_trip() {
        let f = source_frames(&[(Kind::Hello, b"{}"), (Kind::RoundEnd, b"abc")]);
        let r = read_all(Role::Destination, f.concat());
        assert!(
            r[0].as_ref()
                .is_ok_and(|f| f.kind == Kind::Hello && f.payload == b"{}")
        );
        assert!(r[1].as_ref().is_ok_and(|f| f.kind == Kind::RoundEnd));
        assert!(matches!(r[2], Err(Error::PeerGone)));
    }

    #[test]
    fn tampering_replay_reorder_and_reflection_are_rejected() {
        let f = source_frames(&[(Kind::Hello, b"{}"), (Kind::RoundEnd, b"abc")]);
        let auth_err = |r: &[Result<Frame>], at: usize| matches!(r[at], Err(Error::Auth(_)));
        // Tampered payload byte, type and length.
        for pos in [0, 4, 8, f[0].len() - 1] {
            let mut bytes = f.concat();
            bytes[pos] ^= 1;
            let r = read_all(Role::Destination, bytes);
            assert!(r[0].is_err(), "flip at {pos}");
        }
        // Replay of the first message.
        let r = read_all(Role::Destination, [f[0].clone(), f[0].clone()].concat());
        assert!(r[0].is_ok() && auth_err(&r, 1));
        // Reordering.
        let r = read_all(Role::Destination, [f[1].clone(), f[0].clone()].concat());
        assert!(auth_err(&r, 0));
        // Reflection: the source's own message fed back to a source.
        let r = read_all(Role::Source, f[0].clone());
        assert!(auth_err(&r, 0));
        // Dropped message.
        let r = read_all(Role::Destination, f[1].clone());
        assert!(auth_err(&r, 0));
    }

    #[test]
    fn oversized_and_malformed_headers_fail_before_allocation() {
        let mut h = vec![16u8, 0, 0, 0];
        h.extend_from_slice(&u32::MAX.to_le_bytes());
        let tape = Tape::default();
        *tape.input.lock().unwrap() = Cursor::new(h);
        let mut ch = Channel::new(Box::new(tape.clone()), Role::Destination);
        assert!(matches!(ch.recv(), Err(Error::Protocol(m)) if m.contains("exceeds")));
        *tape.input.lock().unwrap() = Cursor::new(vec![16, 0, 1, 0, 0, 0, 0, 0]);
        assert!(matches!(ch.recv(), Err(Error::Protocol(m)) if m.contains("malformed")));
        *tape.input.lock().unwrap() = Cursor::new(vec![99, 0, 0, 0, 0, 0, 0, 0]);
        assert!(matches!(ch.recv(), Err(Error::Protocol(m)) if m.contains("unknown")));
    }

    #[test]
    fn reasons_are_one_line() {
        assert_eq!(reason_text(b"a\nb\x1b[31m"), "a b [31m");
        assert_eq!(reason_text(b""), "(no reason given)");
        assert_eq!(reason_text(&[b'x'; 5000]).len(), MAX_REASON_CHARS);
    }
}
