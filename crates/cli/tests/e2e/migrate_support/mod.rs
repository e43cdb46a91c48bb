//! Tools of the live-migration end-to-end tests (`migrate.rs`, `migrate_faults.rs`):
//! * [`Proxy`]: sits between `anyvisor migrate` and the destination, parses the source's
//!   frames (docs/migration-protocol.md §2) and, at a chosen message, kills the destination,
//!   cuts the connection, or feeds the destination garbage, a replayed or a truncated message;
//! * [`Namespaces`]: two network namespaces joined by a veth pair ("two hosts"), removed when
//!   dropped, also when the test fails.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::persist_harness::Vm;

// ---- a proxy that breaks the migration stream ----

/// Message types of the source's frames (docs/migration-protocol.md §5).
pub const CLIENT_HELLO: u16 = 1;
pub const PROOF: u16 = 3;
pub const HELLO: u16 = 16;
pub const MEMORY_PAGES: u16 = 32;
pub const ROUND_END: u16 = 33;
pub const STATE_BLOB: u16 = 48;
pub const COMPLETE: u16 = 49;

/// Larger frames than the protocol allows end the proxy (the source never sends them).
const MAX_FRAME: usize = 4 * 1024 * 1024 + 64 * 1024;
const MAC_LEN: usize = 32;

/// What the proxy does to the chosen message from the source, instead of forwarding it.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Run the proxy's action (the test kills the destination), then close both connections.
    Kill,
    /// Forward it but nothing the destination sends from then on, wait a little, run the
    /// action, close both connections: the destination has the message (and may act on it),
    /// the source never hears the answer.
    KillAfterForwarding,
    /// Close both connections.
    Cut,
    /// Forward it with every payload byte inverted.
    Garbage,
    /// Forward it twice.
    Replay,
    /// Forward the first half of it, then close both connections.
    Truncate,
    /// Forward it with its JSON payload rewritten (unauthenticated streams only).
    Rewrite(fn(&mut serde_json::Value)),
}

/// A one-connection proxy between a migration source and its destination. `to` is the
/// address to give `anyvisor migrate --to`.
pub struct Proxy {
    pub to: String,
    hit: Arc<AtomicBool>,
}

enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn connect(addr: &str) -> std::io::Result<Conn> {
        match addr.split_once(':') {
            Some(("tcp", hp)) => TcpStream::connect(hp).map(Conn::Tcp),
            Some(("unix", p)) => UnixStream::connect(p).map(Conn::Unix),
            _ => Err(std::io::Error::other(format!("bad address {addr}"))),
        }
    }

    fn try_clone(&self) -> std::io::Result<Conn> {
        match self {
            Conn::Tcp(s) => s.try_clone().map(Conn::Tcp),
            Conn::Unix(s) => s.try_clone().map(Conn::Unix),
        }
    }

    fn close(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Proxy {
    /// Listens on `listen` (`tcp:127.0.0.1:0` or `unix:PATH`), and for the first connection
    /// connects to `upstream` and forwards both ways, the source's bytes frame by frame.
    /// The `nth` (0-based) message of type `kind` from the source gets `fault`; with
    /// [`Fault::Kill`], `action` runs first. `keyed`: the stream is authenticated (every
    /// frame after the ClientHello carries a MAC).
    pub fn start(
        listen: &str,
        upstream: &str,
        keyed: bool,
        (kind, nth): (u16, usize),
        fault: Fault,
        action: impl FnOnce() + Send + 'static,
    ) -> Proxy {
        let (accept, to): (Box<dyn FnOnce() -> std::io::Result<Conn> + Send>, String) =
            match listen.split_once(':') {
                Some(("tcp", hp)) => {
                    let l = TcpListener::bind(hp).unwrap();
                    let to = format!("tcp:{}", l.local_addr().unwrap());
                    (Box::new(move || l.accept().map(|(s, _)| Conn::Tcp(s))), to)
                }
                Some(("unix", p)) => {
                    let _ = std::fs::remove_file(p);
                    let l = UnixListener::bind(p).unwrap();
                    (
                        Box::new(move || l.accept().map(|(s, _)| Conn::Unix(s))),
                        listen.to_string(),
                    )
                }
                _ => panic!("bad proxy address {listen}"),
            };
        let hit = Arc::new(AtomicBool::new(false));
        let hit2 = hit.clone();
        let hold = Arc::new(AtomicBool::new(false));
        let hold2 = hold.clone();
        let upstream = upstream.to_string();
        std::thread::spawn(move || {
            let Ok(client) = accept() else { return };
            let Ok(server) = Conn::connect(&upstream) else {
                client.close();
                return;
            };
            let (Ok(mut back_from), Ok(mut back_to)) = (server.try_clone(), client.try_clone())
            else {
                return;
            };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = back_from.read(&mut buf) {
                    if n == 0
                        || hold2.load(Ordering::Acquire)
                        || back_to.write_all(&buf[..n]).is_err()
                    {
                        break;
                    }
                }
                back_from.close();
                back_to.close();
            });
            let mut f = Forwarder {
                client,
                server,
                keyed,
                at: (kind, nth),
                fault,
                action: Some(Box::new(action)),
                hit: hit2,
                hold,
            };
            f.run();
            f.client.close();
            f.server.close();
        });
        Proxy { to, hit }
    }

    /// The chosen message came by (so the fault happened).
    pub fn hit(&self) -> bool {
        self.hit.load(Ordering::Acquire)
    }
}

struct Forwarder {
    client: Conn,
    server: Conn,
    keyed: bool,
    at: (u16, usize),
    fault: Fault,
    action: Option<Box<dyn FnOnce() + Send>>,
    hit: Arc<AtomicBool>,
    /// Set: the destination's bytes are no longer forwarded.
    hold: Arc<AtomicBool>,
}

impl Forwarder {
    /// Forwards frames until either side is gone or the fault ends the connection.
    fn run(&mut self) {
        let mut seen: HashMap<u16, usize> = HashMap::new();
        let mut first = true;
        loop {
            let mut head = [0u8; 8];
            if self.client.read_exact(&mut head).is_err() {
                return;
            }
            let kind = u16::from_le_bytes([head[0], head[1]]);
            let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
            if len > MAX_FRAME {
                return;
            }
            let mac = if self.keyed && !first { MAC_LEN } else { 0 };
            first = false;
            let mut body = vec![0u8; len + mac];
            if self.client.read_exact(&mut body).is_err() {
                return;
            }
            let n = seen.entry(kind).or_default();
            let chosen = (kind, *n) == self.at;
            *n += 1;
            if !chosen {
                if self.send(&head, &body).is_err() {
                    return;
                }
                continue;
            }
            self.hit.store(true, Ordering::Release);
            match self.fault {
                Fault::Kill => {
                    if let Some(a) = self.action.take() {
                        a();
                    }
                    return;
                }
                Fault::KillAfterForwarding => {
                    self.hold.store(true, Ordering::Release);
                    let _ = self.send(&head, &body);
                    std::thread::sleep(Duration::from_millis(200));
                    if let Some(a) = self.action.take() {
                        a();
                    }
                    return;
                }
                Fault::Cut => return,
                Fault::Garbage => {
                    body[..len].iter_mut().for_each(|b| *b = !*b);
                    if self.send(&head, &body).is_err() {
                        return;
                    }
                }
                Fault::Replay => {
                    if self.send(&head, &body).is_err() || self.send(&head, &body).is_err() {
                        return;
                    }
                }
                Fault::Truncate => {
                    let whole = [&head[..], &body].concat();
                    let _ = self.server.write_all(&whole[..whole.len() / 2]);
                    // Let the half frame reach the destination before the connection closes.
                    std::thread::sleep(Duration::from_millis(100));
                    return;
                }
                Fault::Rewrite(f) => {
                    let mut v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    f(&mut v);
                    let body = serde_json::to_vec(&v).unwrap();
                    head[4..8].copy_from_slice(&(body.len() as u32).to_le_bytes());
                    if self.send(&head, &body).is_err() {
                        return;
                    }
                }
            }
        }
    }

    fn send(&mut self, head: &[u8], body: &[u8]) -> std::io::Result<()> {
        self.server.write_all(head)?;
        self.server.write_all(body)
    }
}

// ---- two network namespaces ----

static NAMESPACE_PAIRS: AtomicU32 = AtomicU32::new(0);

/// Two network namespaces ("hosts") joined by a veth pair: `names[i]` has address
/// `addrs[i]` on its end. Created with unique names per test process; dropping removes
/// both namespaces (and with them the veth pair).
pub struct Namespaces {
    pub names: [String; 2],
    pub addrs: [String; 2],
    veth: [String; 2],
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|u| u.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// The namespaces `ip netns list` shows.
pub fn netns_list() -> String {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

impl Namespaces {
    /// Creates the pair, or prints a `NOTE:` line and returns None when this process is not
    /// root or has no `ip` command.
    pub fn create() -> Option<Namespaces> {
        if !is_root() {
            println!("NOTE: two network namespaces need root: one host only");
            return None;
        }
        if Command::new("ip").arg("-V").output().is_err() {
            println!("NOTE: no ip command (iproute2) for network namespaces: one host only");
            return None;
        }
        let pid = std::process::id();
        let n = NAMESPACE_PAIRS.fetch_add(1, Ordering::Relaxed);
        let ns = Namespaces {
            names: [
                format!("anyvisor-mig-{pid}-{n}-a"),
                format!("anyvisor-mig-{pid}-{n}-b"),
            ],
            addrs: ["10.231.7.1".into(), "10.231.7.2".into()],
            // Interface names have at most 15 characters.
            veth: [format!("avm{pid}x{n}a"), format!("avm{pid}x{n}b")],
        };
        // `ns` exists from here on: whatever fails, dropping it removes what was made.
        let [a, b] = &ns.names;
        let [va, vb] = &ns.veth;
        let steps: [&[&str]; 10] = [
            &["netns", "add", a],
            &["netns", "add", b],
            &["link", "add", va, "type", "veth", "peer", "name", vb],
            &["link", "set", va, "netns", a],
            &["link", "set", vb, "netns", b],
            &["-n", a, "addr", "add", "10.231.7.1/24", "dev", va],
            &["-n", b, "addr", "add", "10.231.7.2/24", "dev", vb],
            &["-n", a, "link", "set", va, "up"],
            &["-n", b, "link", "set", vb, "up"],
            &["-n", a, "link", "set", "lo", "up"],
        ];
        for step in steps {
            ip(step).unwrap_or_else(|e| panic!("cannot set up two network namespaces: {e}"));
        }
        Some(ns)
    }

    /// The prefix running a command in namespace `i`.
    pub fn exec(&self, i: usize) -> Vec<String> {
        ["ip", "netns", "exec", &self.names[i]]
            .map(String::from)
            .to_vec()
    }

    /// The processes in namespace `i` (`ip netns pids`).
    pub fn pids(&self, i: usize) -> Vec<u32> {
        Command::new("ip")
            .args(["netns", "pids", &self.names[i]])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = ip(&["netns", "del", n]);
        }
        // Only left when setup failed before moving it.
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth[0]])
            .stderr(Stdio::null())
            .status();
    }
}

// ---- migration steps and their checks ----

/// The guest size of the migration tests.
pub const MEMORY: &str = "512M";

/// `args` with the guest memory set to [`MEMORY`].
pub fn with_memory(mut args: Vec<String>) -> Vec<String> {
    let i = args.iter().position(|a| a == "--memory").unwrap();
    args[i + 1] = MEMORY.to_string();
    args
}

/// `run --incoming FROM [--migration-key KEY] --backend BACKEND`.
pub fn incoming_args(from: &str, key: Option<&Path>, backend: &str) -> Vec<String> {
    let mut a: Vec<String> = ["run", "--incoming", from, "--backend", backend]
        .map(String::from)
        .to_vec();
    if let Some(k) = key {
        a.extend(["--migration-key".into(), k.display().to_string()]);
    }
    a
}

/// Waits until a destination listens.
pub fn wait_listening(dst: &mut Vm) {
    let start = Instant::now();
    while !dst.stderr().contains("waiting for a migration") {
        assert!(
            dst.is_running() && start.elapsed() < Duration::from_secs(30),
            "the destination does not listen\n{}",
            dst.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `anyvisor migrate --to TO [--migration-key KEY]` against `src`.
pub fn migrate(src: &Vm, to: &str, key: Option<&Path>) -> Output {
    let mut extra = vec!["--to", to];
    if let Some(k) = key {
        extra.extend(["--migration-key", k.to_str().unwrap()]);
    }
    src.control("migrate", &extra)
}

/// `anyvisor info` of a VM, as JSON.
pub fn info(vm: &Vm) -> serde_json::Value {
    let out = vm.control("info", &[]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "info failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            vm.diagnostics()
        )
    })
}

/// A successful migration: status 0, one JSON line with the statistics, the source exits 0,
/// the destination runs the VM on `backend` with [`MEMORY`] and its workload continues from
/// where the source was, without corruption. Returns the statistics line.
pub fn assert_migrated(
    src: &mut Vm,
    dst: &mut Vm,
    out: &Output,
    what: &str,
    backend: &str,
) -> String {
    use crate::persist_harness::*;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{what}: {stderr}\nsource: {}\ndestination: {}",
        src.diagnostics(),
        dst.diagnostics()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default().to_string();
    let v: serde_json::Value = serde_json::from_str(&line).expect("no JSON line");
    for k in ["total_ms", "downtime_ms", "bytes"] {
        assert!(v[k].is_u64(), "{what}: {k} missing in {line}");
    }
    let status = src.wait_exit(Duration::from_secs(30));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}",
        src.diagnostics()
    );
    assert!(!src.stderr().contains("error:"), "{}", src.diagnostics());
    let at = last_report(&src.serial_text());
    dst.wait_serial(RESUME_LIMIT, at_least_ok(2))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_memwork_continues(&dst.serial_text(), at);
    let i = info(dst);
    assert_eq!(i["state"], "running", "{what}: {i}");
    assert_eq!(i["backend"], backend, "{what}: {i}");
    assert_eq!(
        i["memory_mib"].as_u64().map(|m| format!("{m}M")).as_deref(),
        Some(MEMORY),
        "{what}: {i}"
    );
    line
}

/// A failed migration: `migrate` exits non-zero with exactly one `error:` line, and the
/// source VM keeps running, its workload counting on without corruption (two more reports).
/// Returns the error line.
pub fn assert_source_survived(src: &mut Vm, out: &Output, what: &str) -> String {
    use crate::persist_harness::*;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(
        out.status.code(),
        Some(0),
        "{what}: the migration succeeded\n{stderr}"
    );
    let errors = error_lines(out);
    assert_eq!(errors.len(), 1, "{what}: {stderr}");
    assert!(src.is_running(), "{what}: {}", src.diagnostics());
    let i = info(src);
    assert_eq!(i["state"], "running", "{what}: {i}");
    let before = memwork_counts(&src.serial_text()).len();
    src.wait_serial(RESUME_LIMIT, at_least_ok(before + 2))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_memwork_continues(&src.serial_text(), None);
    errors[0].clone()
}
