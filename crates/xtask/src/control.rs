//! Control channels: QEMU's QMP (JSON lines on a Unix socket) and anyvisor's HTTP API.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to {0}")]
    Connect(String),
    #[error("control socket i/o")]
    Io(#[from] std::io::Error),
    #[error("bad reply: {0}")]
    Reply(String),
    #[error("{0}")]
    Command(String),
}

/// Connects to a Unix socket, retrying until it exists and accepts or `deadline` passes.
fn connect(path: &Path, deadline: Instant) -> Result<UnixStream, Error> {
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
            Err(_) => return Err(Error::Connect(path.display().to_string())),
        }
    }
}

/// A QMP session after capabilities negotiation.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    pub fn connect(path: &Path, deadline: Instant) -> Result<Qmp, Error> {
        let stream = connect(path, deadline)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let writer = stream.try_clone()?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_msg()?;
        if greeting.get("QMP").is_none() {
            return Err(Error::Reply(greeting.to_string()));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read_msg(&mut self) -> Result<Value, Error> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(Error::Reply("connection closed".into()));
        }
        serde_json::from_str(&line).map_err(|_| Error::Reply(line.trim().to_string()))
    }

    /// Runs a command; returns its `return` value (events in between are skipped).
    pub fn execute(&mut self, cmd: &str, args: Option<Value>) -> Result<Value, Error> {
        let mut msg = serde_json::json!({ "execute": cmd });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        self.writer.write_all(format!("{msg}\n").as_bytes())?;
        loop {
            let v = self.read_msg()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                let desc = e.get("desc").and_then(Value::as_str).unwrap_or("error");
                return Err(Error::Command(format!("{cmd}: {desc}")));
            }
        }
    }

    /// `query-status` -> `status` string.
    pub fn status(&mut self) -> Result<String, Error> {
        let r = self.execute("query-status", None)?;
        Ok(r.get("status")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string())
    }
}

/// One HTTP/1.1 request to anyvisor's API socket; returns (status, body).
pub fn http(
    socket: &Path,
    method: &str,
    path: &str,
    deadline: Instant,
) -> Result<(u16, String), Error> {
    let mut s = connect(socket, deadline)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_http_response(&raw)
}

/// Status code and body of a `Connection: close` HTTP response.
pub fn parse_http_response(raw: &[u8]) -> Result<(u16, String), Error> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| Error::Reply("no HTTP header end".into()))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::Reply(head.lines().next().unwrap_or("").to_string()))?;
    Ok((status, body.to_string()))
}

/// Polls `GET /vm` until its `state` is `running`.
pub fn wait_anyvisor_running(socket: &Path, deadline: Instant) -> Result<(), Error> {
    loop {
        if let Ok((200, body)) = http(socket, "GET", "/vm", deadline) {
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            if v.get("state").and_then(Value::as_str) == Some("running") {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::Reply("VM not running before the deadline".into()));
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Polls QMP `query-status` until `running` (sends `cont` once it is `paused`/`prelaunch`
/// after an incoming migration completed).
pub fn wait_qemu_running(qmp: &mut Qmp, deadline: Instant) -> Result<(), Error> {
    let mut sent_cont = false;
    loop {
        match qmp.status()?.as_str() {
            "running" => return Ok(()),
            "paused" | "prelaunch" | "postmigrate" if !sent_cont => {
                qmp.execute("cont", None)?;
                sent_cont = true;
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(Error::Reply("VM not running before the deadline".into()));
        }
        thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_response() {
        let r = parse_http_response(b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 2\r\n\r\n{}");
        assert_eq!(r.ok(), Some((501, "{}".to_string())));
        assert!(parse_http_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_http_response(b"garbage\r\n\r\n").is_err());
    }

    #[test]
    fn qmp_against_a_fake_server() {
        let dir = std::env::temp_dir().join(format!("xtask-qmp-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&path);
        let Ok(listener) = std::os::unix::net::UnixListener::bind(&path) else {
            panic!("cannot bind a test socket");
        };
        let server = thread::spawn(move || {
            let Ok((s, _)) = listener.accept() else {
                return;
            };
            let mut w = match s.try_clone() {
                Ok(w) => w,
                Err(_) => return,
            };
            let mut r = BufReader::new(s);
            let _ = writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#);
            let mut line = String::new();
            let _ = r.read_line(&mut line); // qmp_capabilities
            let _ = writeln!(w, r#"{{"return": {{}}}}"#);
            line.clear();
            let _ = r.read_line(&mut line); // query-status
            let _ = writeln!(w, r#"{{"event": "RESUME", "timestamp": {{}}}}"#);
            let _ = writeln!(
                w,
                r#"{{"return": {{"status": "running", "running": true}}}}"#
            );
            line.clear();
            let _ = r.read_line(&mut line); // bogus
            let _ = writeln!(
                w,
                r#"{{"error": {{"class": "CommandNotFound", "desc": "nope"}}}}"#
            );
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut q = match Qmp::connect(&path, deadline) {
            Ok(q) => q,
            Err(e) => panic!("connect: {e}"),
        };
        assert_eq!(q.status().ok().as_deref(), Some("running"));
        let err = q.execute("bogus", None).err().map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some("bogus: nope"));
        let _ = server.join();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
