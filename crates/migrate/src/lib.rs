//! Live migration of a running VM to another anyvisor process.
//!
//! The wire protocol is specified in `docs/migration-protocol.md`; this crate is its engine.
//! It knows nothing about machines or devices: the VMM implements [`SourceVm`] on the sending
//! side and [`DestinationVm`] on the receiving side, and the VM description, compatibility
//! information and final vCPU/device state travel as opaque JSON and bytes the VMM provides.
//!
//! * Source: [`send`] (or [`send_on`] over an already connected stream) runs pre-copy rounds
//!   while the guest keeps running, pauses it when the rest fits in the allowed downtime, sends
//!   the final state and returns only once the destination confirmed it resumed the VM. Any
//!   failure before that resumes the source VM and returns `Err`.
//! * Destination: [`Listener::bind`] then [`receive`] / [`receive_with`] (or [`receive_on`])
//!   returns an [`Arrived`] VM; the VMM restores the state, resumes the guest and then calls
//!   [`Confirmation::resumed`]. Until a peer has completed the handshake, the listener's gate
//!   ([`Limits`]) keeps idle, slow or numerous strangers from delaying a genuine source.

// The migration stream is untrusted: besides the workspace lints, no index may panic here
// either.
#![deny(clippy::indexing_slicing)]
// Integer casts say whether they can lose bits: `u64::from`, `try_from`, or an `#[allow]` with
// the reason the truncation is intended.
#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

mod destination;
mod gate;
mod pages;
mod source;
mod wire;

use std::fmt;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use destination::{Arrived, Confirmation, receive_on};
pub use gate::{Limits, Waiting};
pub use source::{Outcome, Progress, ProgressFn, SendOptions, send_on};
pub use wire::PROTOCOL_VERSION;

/// Default socket read/write timeout: a silent peer fails the migration after this long.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest final-state blob accepted (vCPU and device state), in bytes.
pub const MAX_STATE_BYTES: usize = 64 * 1024 * 1024;

/// Minimum length of a migration key, in bytes.
pub const MIN_KEY_BYTES: usize = 16;

/// Largest key file read, in bytes.
const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid migration address {0:?}: expected tcp:HOST:PORT or unix:PATH")]
    Address(String),
    #[error("migration key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    /// The key file cannot be inspected or read; the OS error is the source.
    #[error("migration key {path}")]
    KeyRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("a tcp migration requires a migration key")]
    KeyRequired,
    #[error("cannot listen on {0}")]
    Bind(String, #[source] std::io::Error),
    #[error("cannot connect to {0}")]
    Connect(String, #[source] std::io::Error),
    #[error("peer gone")]
    PeerGone,
    #[error("timeout waiting for the peer")]
    Timeout,
    #[error("migration stream I/O")]
    Io(#[source] std::io::Error),
    #[error("authentication failed: {0}")]
    Auth(&'static str),
    #[error("protocol version mismatch: this side speaks {ours}, the peer {theirs}")]
    Version { ours: u32, theirs: u32 },
    #[error("refused: {0}")]
    Refused(String),
    #[error("peer failed: {0}")]
    Peer(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("VM: {0}")]
    Vm(String),
    /// A call into the VMM's [`SourceVm`] (or its description) failed; `what` names the step,
    /// the VMM's error is the source.
    #[error("VM: {what}")]
    VmCall {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Guest memory refused a page copy (`op` is `reading` or `writing`).
    #[error("VM: {op} guest page {page:#x}")]
    GuestPage {
        op: &'static str,
        page: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The source's Hello payload is not JSON.
    #[error("protocol error: Hello does not carry a JSON description")]
    Description(#[source] serde_json::Error),
    /// The receiver was told to stop waiting ([`Waiting::stop`]).
    #[error("the receiver was stopped")]
    Stopped,
}

pub type Result<T> = std::result::Result<T, Error>;

/// Where a migration stream goes: `tcp:HOST:PORT` or `unix:PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// `HOST:PORT` (HOST may be a name, an IPv4 address or a bracketed IPv6 address).
    Tcp(String),
    Unix(PathBuf),
}

impl std::str::FromStr for Address {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::Address(s.to_string());
        if let Some(rest) = s.strip_prefix("tcp:") {
            let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(bad());
            }
            Ok(Address::Tcp(rest.to_string()))
        } else if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad());
            }
            Ok(Address::Unix(PathBuf::from(path)))
        } else {
            Err(bad())
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(hp) => write!(f, "tcp:{hp}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A shared migration secret. Never printed.
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl Key {
    /// Reads a key file: its whole content with leading and trailing ASCII whitespace removed
    /// (so `echo SECRET > FILE` works). At least [`MIN_KEY_BYTES`] bytes must remain.
    pub fn from_file(path: &Path) -> Result<Key> {
        let err = |reason: String| Error::Key {
            path: path.to_path_buf(),
            reason,
        };
        let read_err = |source| Error::KeyRead {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        if !meta.is_file() {
            return Err(err("not a regular file".into()));
        }
        if meta.len() > MAX_KEY_FILE_BYTES {
            return Err(err(format!("larger than {MAX_KEY_FILE_BYTES} bytes")));
        }
        let bytes = std::fs::read(path).map_err(read_err)?;
        Key::from_bytes(bytes.trim_ascii()).map_err(|_| {
            err(format!(
                "shorter than {MIN_KEY_BYTES} bytes after trimming whitespace"
            ))
        })
    }

    /// A warning when the key file at `path` can be read by its group or by others (a shared
    /// secret others can read is no secret); `None` when only its owner can, or it cannot be
    /// inspected (reading it reports that).
    pub fn exposure_warning(path: &Path) -> Option<String> {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode();
        (mode & 0o044 != 0).then(|| {
            format!(
                "migration key file {} is readable by {} (mode {:o}); chmod 600 it",
                path.display(),
                if mode & 0o004 != 0 {
                    "others"
                } else {
                    "its group"
                },
                mode & 0o777
            )
        })
    }

    /// A key from raw bytes (used as is, no trimming); at least [`MIN_KEY_BYTES`] long.
    pub fn from_bytes(bytes: &[u8]) -> Result<Key> {
        if bytes.len() < MIN_KEY_BYTES {
            return Err(Error::Key {
                path: PathBuf::new(),
                reason: format!("shorter than {MIN_KEY_BYTES} bytes"),
            });
        }
        Ok(Key(bytes.to_vec()))
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(..)")
    }
}

/// The sending side's VM, implemented by the VMM.
///
/// `send` calls these from the thread that called it; vCPUs keep running between calls until
/// [`SourceVm::pause`].
/// What a [`SourceVm`] call failed with: the VMM's own error, kept whole as the source of
/// [`Error::VmCall`].
pub type VmError = Box<dyn std::error::Error + Send + Sync>;

pub trait SourceVm {
    /// Guest RAM. Its regions must be page-aligned.
    fn memory(&self) -> &hv::GuestMemory;
    /// Everything the destination needs to build a compatible VM (configuration, CPU model,
    /// memory layout, devices). Sent first, before anything is paused.
    fn describe(&self) -> serde_json::Value;
    fn set_dirty_tracking(&self, on: bool) -> std::result::Result<(), VmError>;
    /// Guest page frame numbers written since the previous call (or since tracking was turned
    /// on), by vCPUs and devices alike; duplicates and unsorted input are fine.
    fn take_dirty_pages(&self) -> std::result::Result<Vec<u64>, VmError>;
    /// Auto-converge: slow the vCPUs down to roughly `100 - percent` % of their speed. 0 = off.
    fn throttle(&self, percent: u8);
    fn pause(&self) -> std::result::Result<(), VmError>;
    /// Resumes after a failed migration.
    fn resume(&self) -> std::result::Result<(), VmError>;
    /// vCPU and device state, taken while paused. Opaque to this crate; at most
    /// [`MAX_STATE_BYTES`].
    fn final_state(&self) -> std::result::Result<Vec<u8>, VmError>;
}

/// The receiving side's VM, built by the VMM from the source's description before any page
/// arrives.
pub trait DestinationVm {
    /// Guest RAM, laid out as the source described it and zero-filled: pages the source finds
    /// zero in its first round are not sent at all.
    fn memory(&self) -> &hv::GuestMemory;
}

impl<T: DestinationVm + ?Sized> DestinationVm for Box<T> {
    fn memory(&self) -> &hv::GuestMemory {
        (**self).memory()
    }
}

/// Connects to `addr` and migrates `vm` there. See [`send_on`].
///
/// A `tcp:` address requires `key`.
pub fn send(
    addr: &Address,
    key: Option<&Key>,
    vm: &dyn SourceVm,
    opts: SendOptions,
) -> Result<Outcome> {
    match addr {
        Address::Tcp(hp) => {
            if key.is_none() {
                return Err(Error::KeyRequired);
            }
            let stream = connect_tcp(hp, opts.timeout)?;
            send_on(stream, key, vm, opts)
        }
        Address::Unix(path) => {
            let stream =
                UnixStream::connect(path).map_err(|e| Error::Connect(addr.to_string(), e))?;
            set_unix_timeouts(&stream, opts.timeout)?;
            send_on(stream, key, vm, opts)
        }
    }
}

fn connect_tcp(host_port: &str, timeout: Duration) -> Result<TcpStream> {
    let name = format!("tcp:{host_port}");
    let addrs = host_port
        .to_socket_addrs()
        .map_err(|e| Error::Connect(name.clone(), e))?;
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
    for sa in addrs {
        match TcpStream::connect_timeout(&sa, timeout) {
            Ok(s) => {
                set_tcp_options(&s, timeout)?;
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(Error::Connect(name, last))
}

fn set_tcp_options(s: &TcpStream, timeout: Duration) -> Result<()> {
    s.set_nodelay(true).map_err(Error::Io)?;
    s.set_read_timeout(Some(timeout)).map_err(Error::Io)?;
    s.set_write_timeout(Some(timeout)).map_err(Error::Io)
}

fn set_unix_timeouts(s: &UnixStream, timeout: Duration) -> Result<()> {
    s.set_read_timeout(Some(timeout)).map_err(Error::Io)?;
    s.set_write_timeout(Some(timeout)).map_err(Error::Io)
}

/// A bound endpoint waiting for an incoming migration.
///
/// A failed [`receive`] leaves the listener usable: the VMM may wait for the next attempt.
/// A unix socket file is created with mode 0600 and removed when the listener is dropped.
pub struct Listener {
    inner: ListenerKind,
    timeout: Duration,
    limits: Limits,
}

pub(crate) enum ListenerKind {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl std::os::fd::AsFd for ListenerKind {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            ListenerKind::Tcp(l) => l.as_fd(),
            ListenerKind::Unix(l, _) => l.as_fd(),
        }
    }
}

impl Listener {
    /// Binds `addr`. A `tcp:` listener without a key is refused ([`Error::KeyRequired`]).
    /// A stale unix socket file at the path is replaced; any other existing file is an error.
    /// The socket is non-blocking: the gate waits for connections with `poll`.
    pub fn bind(addr: &Address, key: Option<&Key>) -> Result<Listener> {
        let inner = match addr {
            Address::Tcp(hp) => {
                if key.is_none() {
                    return Err(Error::KeyRequired);
                }
                ListenerKind::Tcp(
                    TcpListener::bind(hp.as_str()).map_err(|e| Error::Bind(addr.to_string(), e))?,
                )
            }
            Address::Unix(path) => {
                if let Ok(meta) = std::fs::symlink_metadata(path)
                    && meta.file_type().is_socket()
                {
                    std::fs::remove_file(path).map_err(|e| Error::Bind(addr.to_string(), e))?;
                }
                let l = UnixListener::bind(path).map_err(|e| Error::Bind(addr.to_string(), e))?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| Error::Bind(addr.to_string(), e))?;
                ListenerKind::Unix(l, path.clone())
            }
        };
        match &inner {
            ListenerKind::Tcp(l) => l.set_nonblocking(true),
            ListenerKind::Unix(l, _) => l.set_nonblocking(true),
        }
        .map_err(|e| Error::Bind(addr.to_string(), e))?;
        Ok(Listener {
            inner,
            timeout: DEFAULT_TIMEOUT,
            limits: Limits::default(),
        })
    }

    /// The bound address (for `tcp:HOST:0`, with the port the system chose).
    pub fn local_address(&self) -> Result<Address> {
        match &self.inner {
            ListenerKind::Tcp(l) => {
                Ok(Address::Tcp(l.local_addr().map_err(Error::Io)?.to_string()))
            }
            ListenerKind::Unix(_, p) => Ok(Address::Unix(p.clone())),
        }
    }

    /// Read/write timeout on accepted connections (default [`DEFAULT_TIMEOUT`]).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// How many handshakes run at once, from one address, and for how long
    /// (default [`Limits::default`]).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    fn requires_key(&self) -> bool {
        matches!(self.inner, ListenerKind::Tcp(_))
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let ListenerKind::Unix(_, path) = &self.inner {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Waits on `listener` for a source and receives a VM from it. See [`receive_with`]; this one
/// waits until a source completes the handshake and reports nothing about the others.
pub fn receive<D, F, E>(listener: &Listener, key: Option<&Key>, prepare: F) -> Result<Arrived<D>>
where
    D: DestinationVm,
    F: FnOnce(&serde_json::Value) -> std::result::Result<D, E>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    receive_with(listener, key, &Waiting::forever(), prepare)
}

/// Waits on `listener` until a peer completes the handshake (proves `key`, speaks this
/// protocol version), then receives a VM from it over that connection (see [`receive_on`]).
/// Connections that do not get there within the listener's [`Limits`] are closed and
/// reported to `waiting.rejected`; they never end the wait. Only an error of the listener
/// itself, or [`Waiting::stop`], ends it before a source got through.
///
/// `prepare` builds the destination VM from the source's description, or returns the reason
/// it cannot (incompatible CPU model, not enough memory, disk missing, ...): a `String` or an
/// error, whose message and chain of causes the source reports as `refused: <reason>` before
/// it pauses anything.
pub fn receive_with<D, F, E>(
    listener: &Listener,
    key: Option<&Key>,
    waiting: &Waiting<'_>,
    prepare: F,
) -> Result<Arrived<D>>
where
    D: DestinationVm,
    F: FnOnce(&serde_json::Value) -> std::result::Result<D, E>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if listener.requires_key() && key.is_none() {
        return Err(Error::KeyRequired);
    }
    let ch = gate::admit(
        &listener.inner,
        &listener.limits,
        listener.timeout,
        key,
        waiting,
    )?;
    destination::receive_admitted(ch, waiting.stop, prepare)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(
            "tcp:127.0.0.1:4444".parse::<Address>().ok(),
            Some(Address::Tcp("127.0.0.1:4444".into()))
        );
        assert_eq!(
            "tcp:[::1]:80".parse::<Address>().ok(),
            Some(Address::Tcp("[::1]:80".into()))
        );
        assert_eq!(
            "unix:/tmp/x.sock".parse::<Address>().ok(),
            Some(Address::Unix("/tmp/x.sock".into()))
        );
        for bad in [
            "",
            "tcp:",
            "tcp:host",
            "tcp::80",
            "tcp:h:99999",
            "unix:",
            "udp:h:1",
            "/tmp/x",
        ] {
            assert!(bad.parse::<Address>().is_err(), "{bad}");
        }
        let a: Address = "tcp:localhost:1".parse().unwrap();
        assert_eq!(a.to_string(), "tcp:localhost:1");
    }

    #[test]
    fn keys_need_sixteen_bytes_and_never_print() {
        let dir = std::env::temp_dir().join(format!("migrate-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let short = dir.join("short");
        std::fs::write(&short, "0123456789abcde\n").unwrap();
        let err = Key::from_file(&short).unwrap_err().to_string();
        assert!(err.contains("shorter than 16"), "{err}");
        let good = dir.join("good");
        std::fs::write(&good, "  0123456789abcdef\n").unwrap();
        let k = Key::from_file(&good).unwrap();
        assert_eq!(k.bytes(), b"0123456789abcdef");
        assert_eq!(format!("{k:?}"), "Key(..)");
        assert!(Key::from_file(&dir.join("missing")).is_err());
        {
            use std::os::unix::fs::PermissionsExt;
            let set = |m| std::fs::set_permissions(&good, std::fs::Permissions::from_mode(m));
            set(0o600).unwrap();
            assert_eq!(Key::exposure_warning(&good), None);
            set(0o640).unwrap();
            assert!(Key::exposure_warning(&good).unwrap().contains("its group"));
            set(0o644).unwrap();
            let w = Key::exposure_warning(&good).unwrap();
            assert!(w.contains("others") && w.contains("644"), "{w}");
            assert_eq!(Key::exposure_warning(&dir.join("missing")), None);
        }
        assert!(Key::from_file(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tcp_listener_without_key_is_refused() {
        let a: Address = "tcp:127.0.0.1:0".parse().unwrap();
        assert!(matches!(Listener::bind(&a, None), Err(Error::KeyRequired)));
    }
}
