//! The control API: HTTP/1.1 with JSON bodies on a Unix socket (documented in
//! `api/openapi.yaml`). [`ApiServer`] accepts connections on its own thread and serves each
//! (one request, one response) on a short-lived thread of its own, so `GET /vm` answers while a
//! `PUT /vm/migrate` runs; requests go to a [`VmControl`]. How many connections are read and
//! served at once, for how long, and the places kept for control requests are [`limits`].
//! [`client`] is what the control subcommands use.

pub mod client;
pub mod http;
pub mod limits;

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use http::{Request, Response};
use limits::{Class, Reading, Serving};

/// How long a client may take to read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long stopping the server waits for requests in progress (a `snapshot --stop` reply).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// An API failure: the HTTP status and a one-line message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

/// The endpoints' paths, named once for the server's router and the client.
pub mod path {
    /// `GET`: the VM's state.
    pub const VM: &str = "/vm";
    pub const PAUSE: &str = "/vm/pause";
    pub const RESUME: &str = "/vm/resume";
    pub const SHUTDOWN: &str = "/vm/shutdown";
    pub const SNAPSHOT: &str = "/vm/snapshot";
    pub const MIGRATE: &str = "/vm/migrate";
}

/// A request body of the API: the type the server deserializes is the type the client
/// serializes, and it knows its endpoint (`PUT` to [`Endpoint::PATH`]).
pub trait Endpoint: Serialize {
    const PATH: &'static str;
}

impl Endpoint for SnapshotRequest {
    const PATH: &'static str = path::SNAPSHOT;
}

impl Endpoint for ShutdownRequest {
    const PATH: &'static str = path::SHUTDOWN;
}

impl Endpoint for MigrateRequest {
    const PATH: &'static str = path::MIGRATE;
}

/// `PUT /vm/snapshot` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// An absolute path: the VMM's working directory is not the client's.
    pub output: PathBuf,
    #[serde(default)]
    pub stop: bool,
    /// Replace a regular file already at `output` (only once the new one is complete).
    #[serde(default)]
    pub overwrite: bool,
}

/// Asked while a long request runs: `Some(reason)` when it should be abandoned (its client
/// hung up).
pub type Cancelled<'a> = &'a dyn Fn() -> Option<String>;

/// `PUT /vm/shutdown` default `timeout`, in seconds.
pub const SHUTDOWN_TIMEOUT_DEFAULT: u64 = 30;

/// `PUT /vm/shutdown` body (optional: an empty body is all defaults).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownRequest {
    /// Seconds the guest has to power off after the power button before the VM is stopped
    /// [default: [`SHUTDOWN_TIMEOUT_DEFAULT`]].
    #[serde(default)]
    pub timeout: Option<u64>,
    /// Stop the VM at once, without asking the guest.
    #[serde(default)]
    pub force: bool,
}

/// `PUT /vm/migrate` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    pub to: String,
    #[serde(default)]
    pub migration_key_file: Option<PathBuf>,
    #[serde(default)]
    pub max_downtime_ms: Option<u64>,
}

/// What the API can do to a VM.
pub trait VmControl: Send + Sync {
    /// `GET /vm`: state, backend, cpu model, cpus, memory, devices, counters.
    fn info(&self) -> serde_json::Value;
    fn pause(&self) -> std::result::Result<(), ApiError>;
    fn resume(&self) -> std::result::Result<(), ApiError>;
    /// Presses the power button (the VM stops when the guest powers off, or after the
    /// timeout), or with `force` stops the VM at once.
    fn shutdown(&self, req: ShutdownRequest) -> std::result::Result<(), ApiError>;
    fn snapshot(&self, req: SnapshotRequest) -> std::result::Result<(), ApiError>;
    /// [`VmControl::snapshot`] abandoned (the old file left as it was) when `cancelled` says so
    /// before the new file is in place. The server passes a check of its client's connection.
    fn snapshot_cancellable(
        &self,
        req: SnapshotRequest,
        cancelled: Cancelled<'_>,
    ) -> std::result::Result<(), ApiError> {
        let _ = cancelled;
        self.snapshot(req)
    }
    /// Returns the final statistics object.
    fn migrate(&self, req: MigrateRequest) -> std::result::Result<serde_json::Value, ApiError>;
}

fn body_json<T: serde::de::DeserializeOwned>(req: &Request) -> std::result::Result<T, ApiError> {
    serde_json::from_slice(&req.body)
        .map_err(|e| ApiError::new(400, format!("invalid request body: {e}")))
}

/// Answers one parsed request.
pub fn route(control: &dyn VmControl, req: &Request) -> Response {
    route_cancellable(control, req, &|| None)
}

/// [`route`], with a snapshot abandoned when `cancelled` says so.
pub fn route_cancellable(
    control: &dyn VmControl,
    req: &Request,
    cancelled: Cancelled<'_>,
) -> Response {
    let done = |r: std::result::Result<(), ApiError>| match r {
        Ok(()) => Response::no_content(),
        Err(e) => Response::error(e.status, &e.message),
    };
    let method = req.method.as_str();
    match (req.path.trim_end_matches('/'), method) {
        (path::VM, "GET") => Response::json(200, &control.info()),
        (path::PAUSE, "PUT") => done(control.pause()),
        (path::RESUME, "PUT") => done(control.resume()),
        (path::SHUTDOWN, "PUT") => {
            let req = if req.body.iter().all(u8::is_ascii_whitespace) {
                Ok(ShutdownRequest::default())
            } else {
                body_json(req)
            };
            done(req.and_then(|r| control.shutdown(r)))
        }
        (path::SNAPSHOT, "PUT") => done(body_json::<SnapshotRequest>(req).and_then(|r| {
            if r.output.is_relative() {
                return Err(ApiError::new(
                    400,
                    format!("output {} is not an absolute path", r.output.display()),
                ));
            }
            control.snapshot_cancellable(r, cancelled)
        })),
        (path::MIGRATE, "PUT") => match body_json(req).and_then(|r| control.migrate(r)) {
            Ok(v) => Response::json(200, &v),
            Err(e) => Response::error(e.status, &e.message),
        },
        (
            path::VM | path::PAUSE | path::RESUME | path::SHUTDOWN | path::SNAPSHOT | path::MIGRATE,
            _,
        ) => Response::error(405, &format!("method {method} not allowed here")),
        _ => Response::error(404, &format!("no such endpoint: {}", req.path)),
    }
}

/// Serves one connection: one request, one response. The request is read by
/// [`limits::REQUEST_DEADLINE`] (`reading` counts the connection until then), then served in a
/// place of its [`Class`] or answered 503.
fn serve(
    control: &dyn VmControl,
    stream: &UnixStream,
    id: u64,
    reading: &Reading,
    serving: &Serving,
) {
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let until = Instant::now() + limits::REQUEST_DEADLINE;
    let read = http::read_request(&mut limits::Deadline { stream, until });
    reading.leave(id);
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    // Held until the answer is written (even if serving panics): a stopping server waits for
    // it, so a request that was carried out (a migration's hand-off) is answered.
    let mut place = None;
    let response = match read {
        Ok(req) => {
            place = limits::Place::take(serving, Class::of(&req));
            if place.is_some() {
                let gone = || client_gone(stream).then(|| "the api client hung up".to_string());
                route_cancellable(control, &req, &gone)
            } else {
                Response::error(
                    503,
                    "too many api requests in progress, or the VMM is stopping",
                )
            }
        }
        Err(http::HttpError::Io(_)) if Instant::now() >= until => Response::error(
            408,
            &format!(
                "the request did not arrive within {} s",
                limits::REQUEST_DEADLINE.as_secs()
            ),
        ),
        Err(e) => match e.status() {
            Some(status) => Response::error(status, &e.to_string()),
            None => return,
        },
    };
    let _ = response.write_to(&mut &*stream);
    drop(place);
}

/// Whether the client of `stream` closed its connection (or its sending side: a client that
/// stops waiting shuts down its writes and reads what became of its request). The request was
/// read whole, so anything else it sends is ignored.
fn client_gone(stream: &UnixStream) -> bool {
    use std::io::Read;
    // A read that waits at most a microsecond: end of stream means the client is gone.
    if stream
        .set_read_timeout(Some(Duration::from_micros(1)))
        .is_err()
    {
        return false;
    }
    let mut byte = [0u8; 1];
    let gone = match (&*stream).read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock
                | std::io::ErrorKind::TimedOut
                | std::io::ErrorKind::Interrupted
        ),
    };
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    gone
}

/// The accept loop: one thread per connection. A new connection is never refused: when
/// [`limits::MAX_READING`] are being read, the oldest of them is cut.
fn accept_loop(
    listener: &UnixListener,
    control: &Arc<dyn VmControl>,
    stop: &AtomicBool,
    reading: &Arc<Reading>,
    serving: &Arc<Serving>,
) {
    for (id, conn) in (0u64..).zip(listener.incoming()) {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let Ok(stream) = conn else { continue };
        let stream = Arc::new(stream);
        if let Some(cut) = reading.enter(id, stream.clone()) {
            let _ = cut.shutdown(std::net::Shutdown::Both);
        }
        let control = control.clone();
        let (reading2, serving2) = (reading.clone(), serving.clone());
        // Connection threads inherit the API thread's seccomp filter.
        let spawned = std::thread::Builder::new()
            .name("api-conn".into())
            .spawn(move || serve(&*control, &stream, id, &reading2, &serving2));
        if spawned.is_err() {
            reading.leave(id);
        }
    }
}

/// The API socket: listening while this value lives; dropping it stops the server (after the
/// requests in progress were answered, at most [`DRAIN_TIMEOUT`]) and removes the socket file.
pub struct ApiServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Disconnected when the API thread has returned.
    done: std::sync::mpsc::Receiver<()>,
    /// Device and inode of the socket file this server made: another VMM may have put its own
    /// socket at the same path since (after someone removed ours), and that one is not ours to
    /// wake or remove.
    file_id: Option<(u64, u64)>,
    reading: Arc<Reading>,
    serving: Arc<Serving>,
}

impl ApiServer {
    /// Listens on `path`. A stale socket file left by a dead VMM is replaced; a live one, or any
    /// other kind of file, is an error.
    ///
    /// The API thread installs the [`sandbox::ThreadRole::Api`] filter (`seccomp`) before it
    /// accepts its first connection; if that fails it serves nothing and stops the socket.
    pub fn start(
        path: &Path,
        control: Arc<dyn VmControl>,
        seccomp: sandbox::SeccompMode,
    ) -> Result<ApiServer> {
        let listen_err = |source| Error::ApiListen {
            path: path.to_path_buf(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(listen_err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "file exists and is not a socket",
                )));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(listen_err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another VMM is listening on it",
                )));
            }
            std::fs::remove_file(path).map_err(listen_err)?;
        }
        let listener = UnixListener::bind(path).map_err(listen_err)?;
        let file_id = socket_file_id(path);
        let (done_tx, done) = std::sync::mpsc::channel::<()>();
        crate::exit::remove_on_exit(path);
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let reading = Arc::new(Reading::default());
        let serving = Arc::new(Serving::default());
        let (reading2, serving2) = (reading.clone(), serving.clone());
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                let _done = done_tx;
                if let Err(e) = sandbox::install(sandbox::ThreadRole::Api, seccomp) {
                    tracing::warn!(target: hv::NOTICE, "anyvisor: api disabled: {}", crate::error::report(&e));
                    return;
                }
                crate::test_hooks::after_api_filter();
                accept_loop(&listener, &control, &stop2, &reading2, &serving2);
            })
            .map_err(|source| Error::Io {
                op: "cannot start the api thread",
                source,
            })?;
        Ok(ApiServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
            done,
            file_id,
            reading,
            serving,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Device and inode of the file at `path`.
fn socket_file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept loop so it sees the flag, if the socket file is still ours. The join
        // waits only if the thread did return (a connect that reached someone else's socket
        // wakes nobody here); otherwise the thread is left blocked in accept, which the process
        // exit ends.
        let ours = self.file_id.is_some() && socket_file_id(&self.path) == self.file_id;
        if ours && UnixStream::connect(&self.path).is_ok() {
            let returned = !matches!(
                self.done.recv_timeout(Duration::from_secs(1)),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout)
            );
            if let Some(t) = self.thread.take().filter(|_| returned) {
                let _ = t.join();
            }
        }
        // Requests not read yet are not answered; those being served are, for a while.
        self.reading.cut_all();
        self.serving.close_and_drain(DRAIN_TIMEOUT);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
        crate::exit::forget_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Fake {
        calls: Mutex<Vec<String>>,
    }

    impl VmControl for Fake {
        fn info(&self) -> serde_json::Value {
            serde_json::json!({"state": "running"})
        }
        fn pause(&self) -> std::result::Result<(), ApiError> {
            self.calls.lock().unwrap().push("pause".into());
            Ok(())
        }
        fn resume(&self) -> std::result::Result<(), ApiError> {
            Err(ApiError::new(409, "not paused"))
        }
        fn shutdown(&self, req: ShutdownRequest) -> std::result::Result<(), ApiError> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("shutdown {:?} {}", req.timeout, req.force));
            Ok(())
        }
        fn snapshot(&self, req: SnapshotRequest) -> std::result::Result<(), ApiError> {
            self.calls.lock().unwrap().push(format!(
                "snapshot {} {}",
                req.output.display(),
                req.stop
            ));
            Ok(())
        }
        fn migrate(&self, _: MigrateRequest) -> std::result::Result<serde_json::Value, ApiError> {
            Err(ApiError::new(501, "migrate is not supported yet"))
        }
    }

    fn req(method: &str, path: &str, body: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn routing() {
        let f = Fake::default();
        assert_eq!(route(&f, &req("GET", "/vm", "")).status, 200);
        assert_eq!(route(&f, &req("PUT", "/vm/pause", "")).status, 204);
        let r = route(&f, &req("PUT", "/vm/resume", ""));
        assert_eq!(r.status, 409);
        assert_eq!(r.body.as_deref(), Some(r#"{"error":"not paused"}"#));
        assert_eq!(route(&f, &req("GET", "/vm/pause", "")).status, 405);
        assert_eq!(route(&f, &req("PUT", "/vm/nope", "")).status, 404);
        assert_eq!(route(&f, &req("PUT", "/vm/snapshot", "")).status, 400);
        assert_eq!(
            route(&f, &req("PUT", "/vm/snapshot", "{\"stop\":1}")).status,
            400
        );
        assert_eq!(
            route(
                &f,
                &req("PUT", "/vm/snapshot", r#"{"output":"/x","stop":true}"#)
            )
            .status,
            204
        );
        // The VMM's working directory is not the client's: relative outputs are refused.
        let r = route(&f, &req("PUT", "/vm/snapshot", r#"{"output":"x.snap"}"#));
        assert_eq!(r.status, 400);
        assert!(r.body.unwrap().contains("not an absolute path"));
        assert_eq!(
            route(&f, &req("PUT", "/vm/migrate", r#"{"to":"unix:/m"}"#)).status,
            501
        );
        assert_eq!(route(&f, &req("PUT", "/vm/shutdown", "")).status, 204);
        assert_eq!(
            route(&f, &req("PUT", "/vm/shutdown", r#"{"timeout":5}"#)).status,
            204
        );
        assert_eq!(
            route(&f, &req("PUT", "/vm/shutdown", r#"{"force":true}"#)).status,
            204
        );
        assert_eq!(
            route(&f, &req("PUT", "/vm/shutdown", r#"{"timeout":-1}"#)).status,
            400
        );
        assert_eq!(
            route(&f, &req("PUT", "/vm/shutdown", r#"{"grace":1}"#)).status,
            400
        );
        assert_eq!(
            f.calls.lock().unwrap().as_slice(),
            [
                "pause",
                "snapshot /x true",
                "shutdown None false",
                "shutdown Some(5) false",
                "shutdown None true"
            ]
        );
    }

    #[test]
    fn openapi_documents_every_route() {
        let doc = include_str!("../../../../api/openapi.yaml");
        for path in [
            "/vm",
            "/vm/pause",
            "/vm/resume",
            "/vm/shutdown",
            "/vm/snapshot",
            "/vm/migrate",
        ] {
            assert!(
                doc.contains(&format!("\n  {path}:\n")),
                "{path} not in api/openapi.yaml"
            );
            let f = Fake::default();
            let method = if path == "/vm" { "GET" } else { "PUT" };
            assert_ne!(route(&f, &req(method, path, "")).status, 404, "{path}");
        }
    }

    /// Someone removed our socket file and another VMM listens at the path now: stopping our
    /// server must neither hang (joining a thread nobody woke) nor remove the other's socket.
    #[test]
    fn stopping_leaves_a_replaced_socket_alone() {
        let dir =
            std::env::temp_dir().join(format!("anyvisor-api-replaced-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let server =
            ApiServer::start(&path, Arc::new(Fake::default()), sandbox::SeccompMode::Off).unwrap();
        std::fs::remove_file(&path).unwrap();
        let other = UnixListener::bind(&path).unwrap();
        let start = std::time::Instant::now();
        drop(server);
        assert!(start.elapsed() < Duration::from_secs(5), "stopping hung");
        assert!(path.exists(), "removed the other server's socket");
        drop(other);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Snapshots take a while (as real ones do): a flood of them fills the work places.
    #[derive(Default)]
    struct Slow(std::sync::atomic::AtomicUsize, AtomicBool);

    impl VmControl for Slow {
        fn info(&self) -> serde_json::Value {
            serde_json::json!({"state": "running"})
        }
        fn pause(&self) -> std::result::Result<(), ApiError> {
            Ok(())
        }
        fn resume(&self) -> std::result::Result<(), ApiError> {
            Ok(())
        }
        fn shutdown(&self, _: ShutdownRequest) -> std::result::Result<(), ApiError> {
            Ok(())
        }
        fn snapshot(&self, _: SnapshotRequest) -> std::result::Result<(), ApiError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_secs(3));
            Ok(())
        }
        fn migrate(&self, _: MigrateRequest) -> std::result::Result<serde_json::Value, ApiError> {
            self.1.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(500));
            // More than a socket buffer holds: writing it waits for the client to read.
            Err(ApiError::new(501, "no".repeat(1 << 19)))
        }
    }

    /// A migration's hand-off stops the server while the migrate request is being served: the
    /// server is gone only once the answer was written (else the process exits first and the
    /// client reads "connection closed before a response").
    #[test]
    fn a_stopping_server_answers_what_it_carried_out() {
        use std::io::{Read, Write};
        let dir = std::env::temp_dir().join(format!("anyvisor-api-stop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let slow = Arc::new(Slow::default());
        let server = ApiServer::start(&path, slow.clone(), sandbox::SeccompMode::Off).unwrap();
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"PUT /vm/migrate HTTP/1.1\r\nContent-Length: 16\r\n\r\n{\"to\":\"unix:/x\"}")
            .unwrap();
        let start = Instant::now();
        while !slow.1.load(Ordering::SeqCst) {
            assert!(start.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(5));
        }
        let (stopped_tx, stopped) = std::sync::mpsc::channel();
        let stopping = std::thread::spawn(move || {
            drop(server);
            let _ = stopped_tx.send(());
        });
        // The answer cannot be written whole until the client reads: the server must wait.
        assert!(
            stopped.recv_timeout(Duration::from_secs(2)).is_err(),
            "the server stopped before its answer was written"
        );
        let mut answer = Vec::new();
        c.read_to_end(&mut answer).unwrap();
        stopping.join().unwrap();
        assert!(answer.len() > 1 << 20, "{}", answer.len());
        assert!(answer.starts_with(b"HTTP/1.1 501 "));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A hundred idle clients, a few that drip their request a byte at a time, clients that
    /// announce a large body and never send it, and a flood of snapshot requests: `info`,
    /// `pause` and `resume` are still answered, and promptly. (Before the limits, eight idle
    /// clients made every other request a 503 for five seconds.)
    #[test]
    fn control_requests_are_answered_under_idle_clients_and_a_flood() {
        use std::io::Write;
        let dir = std::env::temp_dir().join(format!("anyvisor-api-flood-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let slow = Arc::new(Slow::default());
        let server = ApiServer::start(&path, slow.clone(), sandbox::SeccompMode::Off).unwrap();
        let info = || {
            let start = Instant::now();
            let r = client::call(&path, "GET", "/vm", None);
            (r, start.elapsed())
        };
        let idle: Vec<UnixStream> = (0..100)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        let (r, took) = info();
        assert_eq!(r.unwrap().as_deref(), Some(r#"{"state":"running"}"#));
        assert!(took < Duration::from_secs(2), "info took {took:?}");
        let drips: Vec<_> = (0..3)
            .map(|_| {
                let mut s = UnixStream::connect(&path).unwrap();
                std::thread::spawn(move || {
                    for b in b"GET /vm HTTP/1.1\r\nHost: x\r\n\r\n" {
                        if s.write_all(&[*b]).is_err() {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(300));
                    }
                })
            })
            .collect();
        let bodies: Vec<UnixStream> = (0..20)
            .map(|_| {
                let mut s = UnixStream::connect(&path).unwrap();
                s.write_all(b"PUT /vm/snapshot HTTP/1.1\r\nContent-Length: 60000\r\n\r\n{")
                    .unwrap();
                s
            })
            .collect();
        let flood: Vec<_> = (0..30)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || {
                    client::call(&path, "PUT", "/vm/snapshot", Some(r#"{"output":"/x"}"#))
                })
            })
            .collect();
        // The flood fills the work places ...
        let start = Instant::now();
        while slow.0.load(Ordering::SeqCst) < limits::MAX_WORK {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the flood never arrived"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // ... and control requests are served all the same.
        for _ in 0..5 {
            let (r, took) = info();
            assert!(r.is_ok(), "{r:?}");
            assert!(took < Duration::from_secs(2), "info took {took:?}");
        }
        assert_eq!(client::call(&path, "PUT", "/vm/pause", None).unwrap(), None);
        assert_eq!(
            client::call(&path, "PUT", "/vm/resume", None).unwrap(),
            None
        );
        let results: Vec<_> = flood.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(results.iter().any(|r| r.is_ok()));
        assert!(
            results
                .iter()
                .any(|r| matches!(r, Err(Error::ApiRequest { status: 503, .. }))),
            "the work places are unbounded"
        );
        assert_eq!(slow.0.load(Ordering::SeqCst), limits::MAX_WORK);
        drop((idle, bodies));
        for t in drips {
            t.join().unwrap();
        }
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn server_and_client() {
        let dir = std::env::temp_dir().join(format!("anyvisor-api-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        // A stale socket file is replaced.
        drop(UnixListener::bind(&path).unwrap());
        let fake = Arc::new(Fake::default());
        let server = ApiServer::start(&path, fake.clone(), sandbox::SeccompMode::Off).unwrap();
        // A second server on a live socket is refused.
        let e = ApiServer::start(&path, Arc::new(Fake::default()), sandbox::SeccompMode::Off)
            .err()
            .unwrap();
        assert!(matches!(e, Error::ApiListen { .. }));
        let info = client::call(&path, "GET", "/vm", None).unwrap();
        assert_eq!(info.as_deref(), Some(r#"{"state":"running"}"#));
        assert_eq!(client::call(&path, "PUT", "/vm/pause", None).unwrap(), None);
        let e = client::call(&path, "PUT", "/vm/resume", None).unwrap_err();
        assert!(
            matches!(e, Error::ApiRequest { status: 409, ref message } if message == "not paused")
        );
        // Garbage gets a 400 and the server keeps serving.
        {
            use std::io::{Read, Write};
            let mut s = UnixStream::connect(&path).unwrap();
            s.write_all(b"NONSENSE\r\n\r\n").unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
        }
        assert!(client::call(&path, "GET", "/vm", None).is_ok());
        // The typed requests arrive as the server's types, as sent.
        assert_eq!(client::info(&path).unwrap(), info);
        assert_eq!(client::put_empty(&path, path::PAUSE).unwrap(), None);
        let shutdown = ShutdownRequest {
            timeout: Some(7),
            force: false,
        };
        assert_eq!(client::put(&path, &shutdown).unwrap(), None);
        let snapshot = SnapshotRequest {
            output: "/snap/x".into(),
            stop: true,
            overwrite: false,
        };
        assert_eq!(client::put(&path, &snapshot).unwrap(), None);
        let migrate = MigrateRequest {
            to: "unix:/m".into(),
            migration_key_file: None,
            max_downtime_ms: Some(5),
        };
        let e = client::put(&path, &migrate).unwrap_err();
        assert!(matches!(e, Error::ApiRequest { status: 501, .. }), "{e:?}");
        assert_eq!(
            fake.calls.lock().unwrap().as_slice(),
            [
                "pause",
                "pause",
                "shutdown Some(7) false",
                "snapshot /snap/x true"
            ]
        );
        drop(server);
        assert!(!path.exists());
        let e = client::call(&path, "GET", "/vm", None).unwrap_err();
        assert!(matches!(e, Error::ApiConnect { .. }));
        assert_eq!(e.exit_code(), crate::error::EXIT_USAGE);
        // Refuses to replace a regular file.
        std::fs::write(&path, b"x").unwrap();
        assert!(
            ApiServer::start(&path, Arc::new(Fake::default()), sandbox::SeccompMode::Off).is_err()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
