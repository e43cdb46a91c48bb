//! The API server's bounds (docs/threat-model.md, "Listeners"): no client, idle, slow or
//! numerous, can keep another from being answered.
//!
//! * **Reading** a request has a deadline for the whole request ([`REQUEST_DEADLINE`]), however
//!   slowly its bytes drip, and at most [`MAX_READING`] connections are read at once. A new
//!   connection never waits: when all places are taken the oldest one still being read is cut
//!   (an idle or dripping client is always older than a client that sends its request at once).
//! * **Serving**: a request that was read whole is a *control* request (`GET /vm`, pause,
//!   resume, shutdown: quick, never blocked by another request) or *work* (snapshot, migrate).
//!   Each class has its own places ([`MAX_CONTROL`], [`MAX_WORK`]); a request finding its class
//!   full is answered 503 at once. So a flood of work can never take the place of `info`.

use std::collections::VecDeque;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::http::Request;
use super::path;

/// Time a client has to send its whole request.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Connections whose request is being read at once.
pub const MAX_READING: usize = 32;
/// Work requests (snapshot, migrate) served at once.
pub const MAX_WORK: usize = 8;
/// Control requests (`GET /vm`, pause, resume, shutdown) served at once.
pub const MAX_CONTROL: usize = 8;

/// The two kinds of request, each with its own places.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Control,
    Work,
}

impl Class {
    pub fn of(req: &Request) -> Class {
        match (req.method.as_str(), req.path.trim_end_matches('/')) {
            ("GET", path::VM) | ("PUT", path::PAUSE | path::RESUME | path::SHUTDOWN) => {
                Class::Control
            }
            _ => Class::Work,
        }
    }
}

/// Connections being read, oldest first.
#[derive(Default)]
pub struct Reading {
    conns: Mutex<VecDeque<(u64, Arc<UnixStream>)>>,
}

impl Reading {
    /// Counts `stream` as being read; returns the connection cut to make room for it, if any.
    pub fn enter(&self, id: u64, stream: Arc<UnixStream>) -> Option<Arc<UnixStream>> {
        let mut conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        let victim = if conns.len() >= MAX_READING {
            conns.pop_front().map(|(_, s)| s)
        } else {
            None
        };
        conns.push_back((id, stream));
        victim
    }

    /// The request of `id` was read (or reading it failed).
    pub fn leave(&self, id: u64) {
        self.conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(i, _)| *i != id);
    }

    /// Cuts every connection still being read (the server stops).
    pub fn cut_all(&self) {
        let conns = std::mem::take(&mut *self.conns.lock().unwrap_or_else(PoisonError::into_inner));
        for (_, s) in conns {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    #[cfg(test)]
    fn count(&self) -> usize {
        self.conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// Requests being served, per class, and a signal when one ends.
#[derive(Default)]
pub struct Serving {
    state: Mutex<Places>,
    changed: Condvar,
}

#[derive(Default)]
struct Places {
    control: usize,
    work: usize,
    /// The server stops: no request starts any more.
    closed: bool,
}

impl Serving {
    /// Takes a place of `class` unless all are taken (or the server stops).
    pub fn enter(&self, class: Class) -> bool {
        let mut p = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if p.closed {
            return false;
        }
        let (n, max) = match class {
            Class::Control => (&mut p.control, MAX_CONTROL),
            Class::Work => (&mut p.work, MAX_WORK),
        };
        if *n >= max {
            return false;
        }
        *n += 1;
        true
    }

    pub fn leave(&self, class: Class) {
        let mut p = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let n = match class {
            Class::Control => &mut p.control,
            Class::Work => &mut p.work,
        };
        *n = n.saturating_sub(1);
        self.changed.notify_all();
    }

    /// Lets no request start any more, and waits until none is served, at most `limit`.
    pub fn close_and_drain(&self, limit: Duration) {
        let mut p = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        p.closed = true;
        let _ = self
            .changed
            .wait_timeout_while(p, limit, |p| p.control + p.work > 0)
            .unwrap_or_else(PoisonError::into_inner);
    }
}

/// A place taken in [`Serving`], given back when dropped.
pub struct Place<'a> {
    serving: &'a Serving,
    class: Class,
}

impl<'a> Place<'a> {
    /// A place of `class`, unless all are taken (or the server stops).
    pub fn take(serving: &'a Serving, class: Class) -> Option<Place<'a>> {
        serving.enter(class).then(|| Place { serving, class })
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.serving.leave(self.class);
    }
}

/// Reads from a socket until a deadline: each read may wait only for the time left.
pub struct Deadline<'a> {
    pub stream: &'a UnixStream,
    pub until: Instant,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the request took too long",
            ));
        }
        self.stream.set_read_timeout(Some(left))?;
        (&mut &*self.stream).read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            body: Vec::new(),
        }
    }

    #[test]
    fn control_requests_have_their_own_places() {
        assert_eq!(Class::of(&req("GET", "/vm")), Class::Control);
        assert_eq!(Class::of(&req("GET", "/vm/")), Class::Control);
        for p in ["/vm/pause", "/vm/resume", "/vm/shutdown"] {
            assert_eq!(Class::of(&req("PUT", p)), Class::Control, "{p}");
        }
        for (m, p) in [
            ("PUT", "/vm/snapshot"),
            ("PUT", "/vm/migrate"),
            ("PUT", "/vm"),
            ("GET", "/vm/pause"),
            ("GET", "/nope"),
        ] {
            assert_eq!(Class::of(&req(m, p)), Class::Work, "{m} {p}");
        }
        let s = Serving::default();
        for _ in 0..MAX_WORK {
            assert!(s.enter(Class::Work));
        }
        assert!(!s.enter(Class::Work), "work is bounded");
        for _ in 0..MAX_CONTROL {
            assert!(s.enter(Class::Control), "work took a control place");
        }
        assert!(!s.enter(Class::Control), "control is bounded");
        s.leave(Class::Work);
        assert!(s.enter(Class::Work));
        // Stopping: what runs is waited for, nothing new starts.
        for _ in 0..MAX_WORK {
            s.leave(Class::Work);
        }
        for _ in 0..MAX_CONTROL {
            s.leave(Class::Control);
        }
        let start = Instant::now();
        s.close_and_drain(Duration::from_secs(10));
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(!s.enter(Class::Control));
    }

    #[test]
    fn a_new_connection_cuts_the_oldest_being_read() {
        let r = Reading::default();
        let mut peers = Vec::new();
        let mut ours = Vec::new();
        for id in 0..MAX_READING as u64 {
            let (a, b) = UnixStream::pair().unwrap();
            let a = Arc::new(a);
            assert!(r.enter(id, a.clone()).is_none());
            ours.push(a);
            peers.push(b);
        }
        r.leave(3);
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(r.enter(100, Arc::new(a)).is_none(), "a place was free");
        let (a, _b) = UnixStream::pair().unwrap();
        let cut = r.enter(101, Arc::new(a)).unwrap();
        assert!(Arc::ptr_eq(&cut, &ours[0]), "not the oldest");
        assert_eq!(r.count(), MAX_READING);
        r.cut_all();
        assert_eq!(r.count(), 0);
        // Cut connections read end-of-stream.
        let mut buf = [0u8; 1];
        assert_eq!((&*ours[1]).read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn a_dripping_request_ends_at_its_deadline() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            use std::io::Write;
            for byte in b"GET /vm HTTP/1.1\r\n\r\n" {
                if b.write_all(&[*byte]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let start = Instant::now();
        let mut d = Deadline {
            stream: &a,
            until: start + Duration::from_millis(500),
        };
        let e = super::super::http::read_request(&mut d).unwrap_err();
        assert!(matches!(e, super::super::http::HttpError::Io(_)), "{e:?}");
        assert!(start.elapsed() < Duration::from_secs(2));
        drop(a);
        t.join().unwrap();
    }
}
