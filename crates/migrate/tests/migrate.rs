//! End-to-end tests of the migration engine over real sockets, with fake VMs (no hypervisor).

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::*;
use migrate::{Address, Arrived, Error, Key, Listener, Outcome, Progress, SendOptions};

const T: Duration = Duration::from_secs(5);

fn key(b: u8) -> Key {
    Key::from_bytes(&[b; 32]).unwrap()
}

fn opts() -> SendOptions {
    SendOptions {
        timeout: T,
        ..SendOptions::default()
    }
}

fn busy() -> Option<Dirtier> {
    Some(Dirtier {
        pages_per_tick: 8,
        tick: Duration::from_millis(1),
    })
}

fn temp_sock(name: &str) -> Address {
    let p = std::env::temp_dir().join(format!("migrate-test-{}-{name}.sock", std::process::id()));
    Address::Unix(p)
}

type DestResult = migrate::Result<(FakeDest, Vec<u8>)>;

/// A receiver running on its own thread: [`Receiver::finish`] stops it if it still waits.
struct Receiver {
    thread: thread::JoinHandle<DestResult>,
    stop: Arc<AtomicBool>,
    rejected: Arc<Mutex<Vec<String>>>,
}

impl Receiver {
    /// The receiver's result once it returned, or, when the attempt was turned away before it
    /// became the migration, `Err` with the reason the listener gave (the receiver, which keeps
    /// waiting for a source, is then stopped).
    fn finish(self) -> std::result::Result<DestResult, String> {
        let start = std::time::Instant::now();
        while !self.thread.is_finished() && self.rejected.lock().unwrap().is_empty() {
            assert!(
                start.elapsed() < 2 * T,
                "the receiver neither ended nor rejected"
            );
            thread::sleep(Duration::from_millis(5));
        }
        self.stop.store(true, Ordering::SeqCst);
        let r = self.thread.join().unwrap();
        match r {
            Err(Error::Stopped) => Err(self.rejected.lock().unwrap().join("; ")),
            r => Ok(r),
        }
    }
}

/// Runs a receiver on `listener` in a thread; on arrival it "restores" and confirms.
fn spawn_receiver(listener: Listener, key: Option<Key>) -> Receiver {
    let stop = Arc::new(AtomicBool::new(false));
    let rejected: Arc<Mutex<Vec<String>>> = Arc::default();
    let (stop2, rejected2) = (stop.clone(), rejected.clone());
    let thread = thread::spawn(move || {
        let waiting = migrate::Waiting {
            stop: &|| stop2.load(Ordering::SeqCst),
            rejected: &|r| rejected2.lock().unwrap().push(r.to_string()),
        };
        let a: Arrived<FakeDest> =
            migrate::receive_with(&listener, key.as_ref(), &waiting, prepare)?;
        a.confirmation.resumed()?;
        Ok((a.vm, a.state))
    });
    Receiver {
        thread,
        stop,
        rejected,
    }
}

fn migrate_over(
    addr: &Address,
    src_key: Option<Key>,
    dst_key: Option<Key>,
    src: &FakeSource,
    o: SendOptions,
) -> (migrate::Result<Outcome>, DestResult) {
    let (r, d) = migrate_or_reject(addr, src_key, dst_key, src, o);
    match d {
        Ok(d) => (r, d),
        Err(why) => panic!("rejected: {why}"),
    }
}

/// [`migrate_over`], for attempts the listener may turn away before they become the migration
/// (`Err` with its reason; it then waits on for another source).
fn migrate_or_reject(
    addr: &Address,
    src_key: Option<Key>,
    dst_key: Option<Key>,
    src: &FakeSource,
    o: SendOptions,
) -> (
    migrate::Result<Outcome>,
    std::result::Result<DestResult, String>,
) {
    let mut l = Listener::bind(addr, dst_key.as_ref()).unwrap();
    l.set_timeout(T);
    let bound = l.local_address().unwrap();
    let h = spawn_receiver(l, dst_key);
    let r = migrate::send(&bound, src_key.as_ref(), src, o);
    (r, h.finish())
}

fn check_success(src: &mut FakeSource, r: migrate::Result<Outcome>, d: DestResult) -> Outcome {
    let out = r.unwrap();
    let (dst, state) = d.unwrap();
    assert!(src.is_paused(), "source must stay paused after handing off");
    src.stop_dirtier();
    assert_same_memory(&src.mem, &dst.mem);
    assert_eq!(state, src.state);
    assert!(out.rounds >= 1);
    assert!(
        out.bytes > 8 * MIB as u64,
        "round 0 carries the non-zero pages"
    );
    assert!(out.downtime_ms <= out.total_ms);
    out
}

#[test]
fn unix_migration_converges_and_memory_is_identical() {
    let mut src = FakeSource::new(&regions(), busy());
    let seen: Arc<Mutex<Vec<Progress>>> = Arc::default();
    let s2 = seen.clone();
    let o = SendOptions {
        progress: Some(Box::new(move |p: &Progress| {
            s2.lock().unwrap().push(p.clone())
        })),
        ..opts()
    };
    let (r, d) = migrate_over(&temp_sock("plain"), None, None, &src, o);
    let out = check_success(&mut src, r, d);
    let seen = seen.lock().unwrap();
    assert!(!seen.is_empty());
    assert!(seen.windows(2).all(|w| w[0].bytes_sent <= w[1].bytes_sent));
    assert!(seen.last().is_some_and(|p| p.stopped));
    assert_eq!(out.throttled, 0);
}

#[test]
fn tcp_migration_with_key_converges() {
    let mut src = FakeSource::new(&regions(), busy());
    let addr: Address = "tcp:127.0.0.1:0".parse().unwrap();
    let (r, d) = migrate_over(&addr, Some(key(1)), Some(key(1)), &src, opts());
    check_success(&mut src, r, d);
}

#[test]
fn unix_migration_with_key_is_authenticated_too() {
    let mut src = FakeSource::new(&regions(), busy());
    let (r, d) = migrate_over(
        &temp_sock("keyed"),
        Some(key(2)),
        Some(key(2)),
        &src,
        opts(),
    );
    check_success(&mut src, r, d);
}

#[test]
fn auto_converge_throttles_a_guest_faster_than_the_link() {
    // 16 MiB/s link; the guest dirties ~64 MiB/s unthrottled over a 4 MiB working set.
    let mut src = FakeSource::new(
        &[(0, 4 * MIB as u64)],
        Some(Dirtier {
            pages_per_tick: 16,
            tick: Duration::from_millis(1),
        }),
    );
    let o = SendOptions {
        bandwidth_limit: Some(16 * MIB as u64),
        max_downtime_ms: 50,
        ..opts()
    };
    let (r, d) = migrate_over(&temp_sock("converge"), None, None, &src, o);
    let out = r.unwrap();
    let (dst, _) = d.unwrap();
    src.stop_dirtier();
    assert_same_memory(&src.mem, &dst.mem);
    assert!(out.throttled >= 20, "{out:?}");
    assert_eq!(src.max_throttle.load(Ordering::SeqCst), out.throttled);
    assert_eq!(src.throttle_now(), 0, "throttle is released at the end");
}

#[test]
fn max_rounds_forces_the_final_round() {
    let mut src = FakeSource::new(&[(0, 2 * MIB as u64)], busy());
    let o = SendOptions {
        bandwidth_limit: Some(8 * MIB as u64),
        max_downtime_ms: 0,
        max_rounds: 3,
        ..opts()
    };
    let (r, d) = migrate_over(&temp_sock("maxrounds"), None, None, &src, o);
    let out = r.unwrap();
    let (dst, _) = d.unwrap();
    src.stop_dirtier();
    assert_same_memory(&src.mem, &dst.mem);
    assert_eq!(out.rounds, 4, "3 dirty rounds, then the forced final one");
}

#[test]
fn wrong_key_fails_both_sides_and_source_keeps_running() {
    let src = FakeSource::new(&regions(), busy());
    let addr: Address = "tcp:127.0.0.1:0".parse().unwrap();
    let (r, d) = migrate_or_reject(&addr, Some(key(1)), Some(key(9)), &src, opts());
    let (se, Err(de)) = (r.unwrap_err(), d) else {
        panic!("the receiver ended")
    };
    assert!(matches!(se, Error::Auth(_)), "{se}");
    assert_eq!(se.to_string(), "authentication failed: wrong key");
    // The listener turns the peer away and waits on.
    assert!(
        de.starts_with("tcp:127.0.0.1:") && de.ends_with(": authentication failed: wrong key"),
        "{de}"
    );
    assert_eq!(src.pauses.load(Ordering::SeqCst), 0);
    src.assert_running_again();
}

#[test]
fn key_on_one_side_only_fails_both_sides() {
    for (sk, dk) in [(Some(key(1)), None), (None, Some(key(1)))] {
        let src = FakeSource::new(&[(0, MIB as u64)], None);
        let (r, d) = migrate_or_reject(&temp_sock("onekey"), sk, dk, &src, opts());
        assert!(matches!(r, Err(Error::Auth(_))), "{r:?}");
        let Err(d) = d else {
            panic!("the receiver ended")
        };
        assert!(d.contains(": authentication failed: the peer"), "{d}");
        src.assert_running_again();
    }
}

/// Strangers who connect and say nothing, drip a ClientHello a byte at a time, or open a
/// hundred connections, do not keep a genuine source out: it gets through well before any of
/// theirs reaches the handshake deadline (before the gate, the receiver served the first
/// connection alone and a hundred idle ones held it for minutes).
fn strangers_do_not_delay_a_genuine_source(addr: &Address, k: Option<Key>) {
    let mut l = Listener::bind(addr, k.as_ref()).unwrap();
    l.set_timeout(T);
    let bound = l.local_address().unwrap();
    let connect = || -> Box<dyn Write + Send> {
        match &bound {
            Address::Tcp(hp) => Box::new(std::net::TcpStream::connect(hp).unwrap()),
            Address::Unix(p) => Box::new(UnixStream::connect(p).unwrap()),
        }
    };
    let start = std::time::Instant::now();
    let h = spawn_receiver(l, k.clone());
    let idle: Vec<_> = (0..100).map(|_| connect()).collect();
    let stop_drips = Arc::new(AtomicBool::new(false));
    let drips: Vec<_> = (0..3)
        .map(|_| {
            let mut s = connect();
            let stop = stop_drips.clone();
            thread::spawn(move || {
                for b in client_hello(1, 1) {
                    if stop.load(Ordering::SeqCst) || s.write_all(&[b]).is_err() {
                        return;
                    }
                    thread::sleep(Duration::from_millis(200));
                }
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(300));
    let mut src = FakeSource::new(&[(0, 4 * MIB as u64)], None);
    let r = migrate::send(&bound, k.as_ref(), &src, opts());
    let took = start.elapsed();
    let rejected = h.rejected.clone();
    let Ok(d) = h.finish() else {
        panic!("the genuine source was rejected")
    };
    stop_drips.store(true, Ordering::SeqCst);
    for t in drips {
        t.join().unwrap();
    }
    drop(idle);
    r.unwrap();
    let (dst, _) = d.unwrap();
    src.stop_dirtier();
    assert_same_memory(&src.mem, &dst.mem);
    let limits = migrate::Limits::default();
    assert!(
        took < limits.deadline - Duration::from_secs(1),
        "the source waited {took:?}"
    );
    let rejected = rejected.lock().unwrap();
    assert!(
        rejected.len() >= 100 - limits.max_handshakes,
        "{rejected:?}"
    );
    assert!(
        rejected
            .iter()
            .all(|r| r.contains(": closed for a newer connection")),
        "{rejected:?}"
    );
}

#[test]
fn strangers_on_tcp_do_not_delay_a_genuine_source() {
    let addr: Address = "tcp:127.0.0.1:0".parse().unwrap();
    strangers_do_not_delay_a_genuine_source(&addr, Some(key(3)));
}

#[test]
fn strangers_on_a_unix_socket_do_not_delay_a_genuine_source() {
    strangers_do_not_delay_a_genuine_source(&temp_sock("strangers"), None);
}

/// A peer dripping its ClientHello slower than the handshake deadline is cut at the deadline,
/// the listener says so, and it waits on.
#[test]
fn a_slow_handshake_is_cut_at_the_deadline() {
    let addr: Address = "tcp:127.0.0.1:0".parse().unwrap();
    let mut l = Listener::bind(&addr, Some(&key(5))).unwrap();
    l.set_limits(migrate::Limits {
        deadline: Duration::from_secs(1),
        ..migrate::Limits::default()
    });
    let Address::Tcp(hp) = l.local_address().unwrap() else {
        panic!("a tcp listener")
    };
    let h = spawn_receiver(l, Some(key(5)));
    let mut s = std::net::TcpStream::connect(&hp).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let start = std::time::Instant::now();
    let mut cut = false;
    for b in client_hello(1, 1) {
        if s.write_all(&[b]).is_err() {
            cut = true;
            break;
        }
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(0) => {
                cut = true;
                break;
            }
            Ok(_) => panic!("answered a partial ClientHello"),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => {
                cut = true;
                break;
            }
        }
    }
    let took = start.elapsed();
    assert!(
        cut,
        "a 5-second ClientHello got through a 1-second deadline"
    );
    assert!(took < Duration::from_secs(4), "cut only after {took:?}");
    assert!(!h.thread.is_finished(), "the receiver must wait on");
    let Err(why) = h.finish() else {
        panic!("the receiver ended")
    };
    assert!(why.contains("no handshake within 1 s"), "{why}");
}

/// [`migrate::Waiting::stop`] ends a receiver that is still waiting.
#[test]
fn a_waiting_receiver_can_be_stopped() {
    let l = Listener::bind(&temp_sock("stop"), None).unwrap();
    let h = spawn_receiver(l, None);
    thread::sleep(Duration::from_millis(200));
    assert!(!h.thread.is_finished());
    h.stop.store(true, Ordering::SeqCst);
    assert!(matches!(h.thread.join().unwrap(), Err(Error::Stopped)));
}

/// A receiver stopped while the VM arrives (the VMM got a termination signal) stops between
/// messages and tells the source, which resumes its VM.
#[test]
fn a_receiver_stopped_mid_migration_tells_the_source() {
    let mut l = Listener::bind(&temp_sock("stop-mid"), None).unwrap();
    l.set_timeout(T);
    let bound = l.local_address().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let h = thread::spawn(move || {
        let waiting = migrate::Waiting {
            stop: &|| stop2.load(Ordering::SeqCst),
            rejected: &|_| {},
        };
        migrate::receive_with(&l, None, &waiting, |d| {
            // The signal comes as the VM is being built.
            stop2.store(true, Ordering::SeqCst);
            prepare(d)
        })
        .map(|_| ())
    });
    let src = FakeSource::new(&regions(), busy());
    let r = migrate::send(&bound, None, &src, opts());
    assert!(matches!(h.join().unwrap(), Err(Error::Stopped)));
    let e = r.unwrap_err().to_string();
    assert_eq!(e, "peer failed: the receiver was stopped");
    src.assert_running_again();
}

#[test]
fn tcp_without_key_is_refused_on_both_ends() {
    let addr: Address = "tcp:127.0.0.1:0".parse().unwrap();
    assert!(matches!(
        Listener::bind(&addr, None),
        Err(Error::KeyRequired)
    ));
    let src = FakeSource::new(&[(0, MIB as u64)], None);
    let e = migrate::send(&addr, None, &src, opts()).unwrap_err();
    assert_eq!(e.to_string(), "a tcp migration requires a migration key");
}

#[test]
fn incompatible_destination_refuses_before_anything_pauses() {
    let mut src = FakeSource::new(&regions(), busy());
    src.cpu_model = "host";
    let (r, d) = migrate_over(&temp_sock("refuse"), None, None, &src, opts());
    let e = r.unwrap_err().to_string();
    assert_eq!(e, "refused: incompatible CPU model \"host\"");
    assert!(matches!(d, Err(Error::Refused(_))));
    assert_eq!(src.pauses.load(Ordering::SeqCst), 0);
    src.assert_running_again();
}

#[test]
fn version_mismatch_is_reported() {
    let mut input = client_hello(2, 0);
    input.extend(frame(16, b"{}"));
    let s = Script::new(input);
    let out = s.output.clone();
    let r = migrate::receive_on(s, None, prepare);
    assert!(matches!(r, Err(Error::Version { ours: 1, theirs: 2 })));
    let out = out.lock().unwrap();
    assert_eq!(
        &out[0..2],
        &64u16.to_le_bytes(),
        "answered with an Error message"
    );
}

/// A destination-side stream that dies (both directions shut down) after `limit` bytes were
/// read, or as soon as `kill` is set.
struct Dying {
    s: UnixStream,
    read: usize,
    limit: usize,
    kill: Arc<AtomicBool>,
}

impl Dying {
    fn check(&mut self) -> io::Result<()> {
        if self.read >= self.limit || self.kill.load(Ordering::SeqCst) {
            let _ = self.s.shutdown(Shutdown::Both);
            return Err(io::Error::new(io::ErrorKind::ConnectionReset, "killed"));
        }
        Ok(())
    }
}

impl Read for Dying {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.check()?;
        let max = buf.len().min(self.limit - self.read);
        let n = self.s.read(&mut buf[..max])?;
        self.read += n;
        Ok(n)
    }
}

impl Write for Dying {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.check()?;
        self.s.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.s.flush()
    }
}

fn pair() -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    for s in [&a, &b] {
        s.set_read_timeout(Some(T)).unwrap();
        s.set_write_timeout(Some(T)).unwrap();
    }
    (a, b)
}

#[test]
fn destination_dying_at_any_point_leaves_the_source_running() {
    let cuts = [0, 5, 60, 150, 4096, 100_000, MIB, 5 * MIB, usize::MAX];
    for (i, &limit) in cuts.iter().enumerate() {
        let kill = Arc::new(AtomicBool::new(false));
        let mut src = FakeSource::new(&regions(), busy());
        if limit == usize::MAX {
            // Die exactly when the source pauses the VM for the final round.
            let k = kill.clone();
            src.on_pause = Some(Box::new(move || k.store(true, Ordering::SeqCst)));
        }
        let key = (i % 2 == 0).then(|| key(3));
        let (a, b) = pair();
        let dk = key.clone();
        let h = thread::spawn(move || {
            let s = Dying {
                s: b,
                read: 0,
                limit,
                kill,
            };
            migrate::receive_on(s, dk.as_ref(), prepare).map(|a| a.confirmation.resumed())
        });
        let r = migrate::send_on(a, key.as_ref(), &src, opts());
        assert!(r.is_err(), "cut at {limit}: source succeeded");
        assert!(
            h.join().unwrap().is_err(),
            "cut at {limit}: destination succeeded"
        );
        src.assert_running_again();
        if limit == usize::MAX {
            assert_eq!(
                src.resumes.load(Ordering::SeqCst),
                1,
                "paused source must resume"
            );
        }
    }
}

#[test]
fn destination_abandoning_after_arrival_makes_the_source_resume() {
    let src = FakeSource::new(&regions(), busy());
    let (a, b) = pair();
    let h = thread::spawn(move || {
        let arrived = migrate::receive_on(b, None, prepare).unwrap();
        arrived.confirmation.abort("restore failed: bad vCPU state");
    });
    let e = migrate::send_on(a, None, &src, opts()).unwrap_err();
    h.join().unwrap();
    assert_eq!(e.to_string(), "peer failed: restore failed: bad vCPU state");
    assert_eq!(src.resumes.load(Ordering::SeqCst), 1);
    src.assert_running_again();
}

#[test]
fn silent_destination_times_out_instead_of_hanging() {
    let src = FakeSource::new(&[(0, MIB as u64)], None);
    let (a, b) = pair();
    let (tx, rx) = std::sync::mpsc::channel();
    let h = thread::spawn(move || {
        let arrived = migrate::receive_on(b, None, prepare).unwrap();
        // Never confirm, never close: a hung destination.
        rx.recv().unwrap();
        drop(arrived);
    });
    // send_on leaves timeouts to the caller; send() applies SendOptions::timeout.
    a.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let t0 = std::time::Instant::now();
    let e = migrate::send_on(a, None, &src, opts()).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(3));
    tx.send(()).unwrap();
    h.join().unwrap();
    assert!(matches!(e, Error::Timeout), "{e}");
    src.assert_running_again();
}

/// How the man in the middle mangles the source's stream.
#[derive(Clone, Copy, Debug)]
enum Mangle {
    Replay(usize),
    Swap(usize),
    Flip(usize),
    Drop(usize),
}

/// Reads one frame (header, payload, MAC when `mac`) from `r`.
fn read_frame(r: &mut impl Read, mac: bool) -> io::Result<Vec<u8>> {
    let mut h = [0u8; 8];
    r.read_exact(&mut h)?;
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
    let mut f = h.to_vec();
    f.resize(8 + len + if mac { 32 } else { 0 }, 0);
    r.read_exact(&mut f[8..])?;
    Ok(f)
}

/// Forwards between `src_side` and `dst_side`, mangling source→destination frame number `m`.
fn man_in_the_middle(src_side: UnixStream, dst_side: UnixStream, m: Mangle) {
    let (mut s_r, mut d_w) = (src_side.try_clone().unwrap(), dst_side.try_clone().unwrap());
    let back = {
        let (mut d_r, mut s_w) = (dst_side, src_side);
        thread::spawn(move || {
            let _ = io::copy(&mut d_r, &mut s_w);
            let _ = s_w.shutdown(Shutdown::Both);
        })
    };
    let mut held: Option<Vec<u8>> = None;
    for i in 0.. {
        // Frame 0 (ClientHello) is the only unauthenticated one from the source.
        let Ok(mut f) = read_frame(&mut s_r, i > 0) else {
            break;
        };
        let out: Vec<Vec<u8>> = match m {
            Mangle::Replay(n) if n == i => vec![f.clone(), f],
            Mangle::Swap(n) if n == i => {
                held = Some(f);
                vec![]
            }
            Mangle::Swap(n) if n + 1 == i => vec![f, held.take().unwrap_or_default()],
            Mangle::Flip(n) if n == i => {
                let at = f.len() / 2;
                f[at] ^= 0x40;
                vec![f]
            }
            Mangle::Drop(n) if n == i => vec![],
            _ => vec![f],
        };
        if out.iter().any(|f| d_w.write_all(f).is_err()) {
            break;
        }
    }
    let _ = d_w.shutdown(Shutdown::Both);
    let _ = back.join();
}

#[test]
fn tampered_replayed_reordered_or_dropped_messages_are_rejected() {
    // Source frames: 0 ClientHello, 1 Proof, 2 Hello, 3.. MemoryPages.
    for m in [
        Mangle::Replay(3),
        Mangle::Swap(3),
        Mangle::Flip(2),
        Mangle::Flip(5),
        Mangle::Drop(4),
        Mangle::Replay(1),
    ] {
        let src = FakeSource::new(&regions(), busy());
        let (a, pa) = pair();
        let (pb, b) = pair();
        let mitm = thread::spawn(move || man_in_the_middle(pa, pb, m));
        let h = thread::spawn(move || {
            migrate::receive_on(b, Some(&key(4)), prepare).map(|a| a.confirmation.resumed())
        });
        let r = migrate::send_on(a, Some(&key(4)), &src, opts());
        let d = h.join().unwrap();
        mitm.join().unwrap();
        assert!(r.is_err(), "{m:?}: source succeeded");
        assert!(
            matches!(d, Err(Error::Auth(_))),
            "{m:?}: destination: {d:?}"
        );
        src.assert_running_again();
    }
}

fn receive_script(frames: &[Vec<u8>]) -> migrate::Result<Arrived<FakeDest>> {
    migrate::receive_on(Script::new(frames.concat()), None, prepare)
}

#[test]
fn the_scripted_valid_stream_is_accepted() {
    // Proves the hand-built stream matches the spec, so the hostile variants below fail for
    // the reason they test.
    let a = receive_script(&valid_stream()).unwrap();
    assert_eq!(a.state, b"state-blob");
    let mut page = [0u8; 4096];
    use vm_memory::Bytes;
    a.vm.mem
        .read_slice(&mut page, vm_memory::GuestAddress(4096))
        .unwrap();
    assert!(page.iter().all(|&b| b == 0x5a));
    a.vm.mem
        .read_slice(&mut page, vm_memory::GuestAddress(4 * 4096))
        .unwrap();
    assert!(page.iter().all(|&b| b == 0x5a));
}

#[test]
fn hostile_streams_are_rejected_with_a_reason() {
    let v = valid_stream();
    let with = |i: usize, f: Vec<u8>| {
        let mut s = v.clone();
        s[i] = f;
        s
    };
    let without = |i: usize| {
        let mut s = v.clone();
        s.remove(i);
        s
    };
    let swapped = |i: usize| {
        let mut s = v.clone();
        s.swap(i, i + 1);
        s
    };
    let cases: Vec<(Vec<Vec<u8>>, &str)> = vec![
        (vec![b"GET / HTTP/1.1\r\n\r\n".to_vec()], "not an anyvisor"),
        (with(0, frame(1, b"AVMIGRAT")), "not an anyvisor"),
        (with(0, frame(16, b"{}")), "not an anyvisor"),
        (with(1, frame(16, b"{not json")), "JSON"),
        (
            with(1, frame(32, &pages_payload(0, &[1], 0))),
            "unexpected MemoryPages before Hello",
        ),
        (
            with(2, frame(32, &pages_payload(64, &[1], 0))),
            "outside the destination's memory",
        ),
        (
            with(2, frame(32, &pages_payload(u64::MAX, &[0, 2], 1))),
            "overflows",
        ),
        (
            with(2, frame(32, &pages_payload(0, &[7], 0))),
            "unknown page flag",
        ),
        (
            with(2, frame(16, &small_description())),
            "unexpected Hello while receiving memory",
        ),
        (with(2, frame(99, b"")), "unknown message type 99"),
        (with(3, round_end(1)), "RoundEnd 1 out of order"),
        (with(3, frame(33, b"short")), "bad RoundEnd"),
        (with(5, round_end(0)), "RoundEnd 0 out of order"),
        (
            with(8, frame(49, &11u64.to_le_bytes())),
            "announces 11 state bytes",
        ),
        (
            with(7, frame(32, &pages_payload(0, &[1], 0))),
            "unexpected MemoryPages while receiving the final state",
        ),
        (with(4, frame(50, b"")), "unexpected Resumed"),
        (
            with(4, frame(64, b"source gave up")),
            "peer failed: source gave up",
        ),
        (
            swapped(5),
            "unexpected RoundEnd while receiving the final state",
        ),
        (
            vec![v[0].clone(), v[1].clone(), v[2].clone(), v[6].clone()],
            "unexpected StateBlob while receiving memory",
        ),
        (
            without(6)
                .into_iter()
                .take(3)
                .chain([frame(49, &0u64.to_le_bytes())])
                .collect(),
            "unexpected Complete",
        ),
        (v[..8].to_vec(), "peer gone"),
        (
            vec![v.concat()[..v.concat().len() - 3].to_vec()],
            "peer gone",
        ),
        (vec![v[0].clone(), v[1][..20].to_vec()], "peer gone"),
    ];
    for (i, (s, want)) in cases.into_iter().enumerate() {
        let e = match receive_script(&s) {
            Ok(_) => panic!("case {i} ({want}) accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains(want),
            "case {i}: {e:?} does not contain {want:?}"
        );
    }
}

#[test]
fn receiver_tells_the_source_why_it_stops() {
    let mut v = valid_stream();
    v[2] = frame(32, &pages_payload(64, &[1], 0));
    let s = Script::new(v.concat());
    let out = s.output.clone();
    assert!(migrate::receive_on(s, None, prepare).is_err());
    let out = out.lock().unwrap().clone();
    // ServerHello (8 + 48), Ready (8), then Error with the reason.
    let err = &out[64..];
    assert_eq!(&err[0..2], &64u16.to_le_bytes());
    assert!(String::from_utf8_lossy(&err[8..]).contains("outside the destination's memory"));
}

#[test]
fn fuzzed_streams_never_panic_the_receiver() {
    let valid = valid_stream().concat();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut ok, mut err) = (0, 0);
    for i in 0..3000 {
        let input = match i % 4 {
            // Pure noise.
            0 => {
                let n = rng.below(300) as usize;
                rng.bytes(n)
            }
            // The valid stream with a few random byte changes.
            1 => {
                let mut s = valid.clone();
                for _ in 0..=rng.below(4) {
                    let at = rng.below(s.len() as u64) as usize;
                    s[at] = rng.next() as u8;
                }
                s
            }
            // Truncated.
            2 => valid[..rng.below(valid.len() as u64) as usize].to_vec(),
            // A valid prefix, then random well-framed messages.
            _ => {
                let mut s = valid_stream()[..2].concat();
                for _ in 0..rng.below(8) {
                    let kinds = [16u16, 17, 18, 32, 33, 48, 49, 50, 64, 3];
                    let k = kinds[rng.below(kinds.len() as u64) as usize];
                    let p = if k == 32 {
                        let n = 1 + rng.below(4) as usize;
                        let flags: Vec<u8> = (0..n).map(|_| rng.below(3) as u8).collect();
                        pages_payload(rng.below(80), &flags, 1)
                    } else {
                        let n = rng.below(16) as usize;
                        rng.bytes(n)
                    };
                    s.extend(frame(k, &p));
                }
                s
            }
        };
        match migrate::receive_on(Script::new(input), None, prepare) {
            Ok(_) => ok += 1,
            Err(_) => err += 1,
        }
    }
    assert!(err > 2000 && ok > 0, "ok {ok} err {err}");
}

/// The source side of an authenticated session written from the spec alone (§2–§5), against
/// the real receiver: proves the document and the implementation agree.
#[test]
fn spec_written_authenticated_source_is_accepted_and_replays_are_not() {
    use hmac::{Hmac, Mac};
    use sha2::{Digest, Sha256};
    type H = Hmac<Sha256>;
    fn hm(k: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        let mut m = H::new_from_slice(k).unwrap();
        for p in parts {
            m.update(p);
        }
        m.finalize().into_bytes().to_vec()
    }
    fn sealed(k: &[u8], dir: u8, seq: u64, kind: u16, p: &[u8]) -> Vec<u8> {
        let mut f = frame(kind, p);
        let mac = hm(k, &[&[dir], &seq.to_le_bytes(), &f]);
        f.extend(mac);
        f
    }

    for replay in [false, true] {
        let secret = [0x42u8; 20];
        let (mut a, b) = pair();
        let h = thread::spawn(move || {
            let k = Key::from_bytes(&secret).unwrap();
            let arrived = migrate::receive_on(b, Some(&k), prepare)?;
            arrived.confirmation.resumed()?;
            Ok::<_, Error>((arrived.vm, arrived.state))
        });
        let nonce_s = [7u8; 32];
        let mut ch = b"AVMIGRAT".to_vec();
        ch.extend(1u32.to_le_bytes());
        ch.extend(1u32.to_le_bytes());
        ch.extend(nonce_s);
        a.write_all(&frame(1, &ch)).unwrap();
        let sh = read_frame(&mut a, false).unwrap();
        assert_eq!(&sh[0..2], &2u16.to_le_bytes());
        let sh = &sh[8..];
        assert_eq!(
            &sh[0..16],
            &[&b"AVMIGRAT"[..], &1u32.to_le_bytes(), &1u32.to_le_bytes()].concat()[..]
        );
        let k = hm(&secret, &[b"anyvisor-migration", &nonce_s, &sh[16..48]]);
        let t: Vec<u8> = Sha256::new()
            .chain_update(&ch)
            .chain_update(sh)
            .finalize()
            .to_vec();
        let proof = hm(&k, &[b"anyvisor-migration source proof", &t]);
        a.write_all(&sealed(&k, 0, 0, 3, &proof)).unwrap();
        let dp = read_frame(&mut a, true).unwrap();
        assert_eq!(
            dp,
            sealed(
                &k,
                1,
                0,
                3,
                &hm(&k, &[b"anyvisor-migration destination proof", &t])
            )
        );
        a.write_all(&sealed(&k, 0, 1, 16, &small_description()))
            .unwrap();
        assert_eq!(read_frame(&mut a, true).unwrap(), sealed(&k, 1, 1, 17, b""));
        let pages = sealed(&k, 0, 2, 32, &pages_payload(3, &[2], 0x77));
        a.write_all(&pages).unwrap();
        if replay {
            a.write_all(&pages).unwrap();
        }
        let mut re = 0u32.to_le_bytes().to_vec();
        re.extend(0u64.to_le_bytes());
        // After a replay the destination may already have closed: later writes may fail.
        let _ = a.write_all(&sealed(&k, 0, 3, 33, &re));
        let _ = a.write_all(&sealed(&k, 0, 4, 48, b"st"));
        let _ = a.write_all(&sealed(&k, 0, 5, 49, &2u64.to_le_bytes()));
        let last = read_frame(&mut a, true);
        let d = h.join().unwrap();
        if replay {
            assert!(matches!(d, Err(Error::Auth(_))), "{:?}", d.err());
            // The destination's Error is sealed with its next sequence number.
            let last = last.unwrap();
            assert_eq!(&last[0..2], &64u16.to_le_bytes());
        } else {
            assert_eq!(last.unwrap(), sealed(&k, 1, 2, 50, b""));
            let (vm, state) = d.unwrap();
            assert_eq!(state, b"st");
            let mut page = [0u8; 4096];
            use vm_memory::Bytes;
            vm.mem
                .read_slice(&mut page, vm_memory::GuestAddress(3 * 4096))
                .unwrap();
            assert!(page.iter().all(|&x| x == 0x77));
        }
    }
}
