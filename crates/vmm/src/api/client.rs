//! The client side of the API, used by `anyvisor info|pause|resume|...`.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::{Endpoint, http, path};
use crate::error::{Error, Result};

/// `GET /vm`: the VM's state as the server wrote it (JSON).
pub fn info(socket: &Path) -> Result<Option<String>> {
    call(socket, "GET", path::VM, None)
}

/// `PUT` of a request without a body (`path::PAUSE`, `path::RESUME`).
pub fn put_empty(socket: &Path, path: &str) -> Result<Option<String>> {
    call(socket, "PUT", path, None)
}

/// `PUT` of one of the API's request types to its endpoint: the body is the type the server
/// deserializes, serialized.
pub fn put<R: Endpoint>(socket: &Path, request: &R) -> Result<Option<String>> {
    call(socket, "PUT", R::PATH, Some(&body(request)?))
}

/// [`put`] through [`call_interruptible`].
pub fn put_interruptible<R: Endpoint>(socket: &Path, request: &R) -> Result<Option<String>> {
    call_interruptible(socket, "PUT", R::PATH, Some(&body(request)?))
}

/// The JSON body of `request`; a path that is not UTF-8 cannot be sent in JSON.
fn body<R: Endpoint>(request: &R) -> Result<String> {
    serde_json::to_string(request)
        .map_err(|e| Error::Usage(format!("cannot send the request to {}: {e}", R::PATH)))
}

/// Largest response accepted.
const MAX_RESPONSE: usize = 16 << 20;

/// How often [`call_interruptible`] looks for a signal while it waits.
const SIGNAL_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// [`call`] for a request that changes things outside the VM (a snapshot file): SIGINT, SIGTERM
/// or SIGHUP while it waits do not kill the client in the middle. It shuts down its sending
/// side, which tells the server its client is gone (a snapshot not yet in place is abandoned,
/// the old file left as it was), reads what the server did, and reports that with the signal:
/// `stopped by SIGINT: <server's error>` or `stopped by SIGINT after the request had completed`.
pub fn call_interruptible(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<Option<String>> {
    use std::io::Read;
    crate::exit::install_signal_handlers().map_err(|source| Error::Io {
        op: "cannot install signal handlers",
        source,
    })?;
    let mut stream = send(socket, method, path, body)?;
    let _ = stream.set_read_timeout(Some(SIGNAL_POLL));
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut signal = None;
    loop {
        if signal.is_none()
            && let Some(num) = crate::exit::take_signal()
        {
            signal = Some(crate::exit::signal_name(num));
            let _ = stream.shutdown(std::net::Shutdown::Write);
        }
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                raw.extend_from_slice(chunk.get(..n).unwrap_or_default());
                if raw.len() > MAX_RESPONSE + 64 * 1024 {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                raw.clear();
                if signal.is_none() {
                    return Err(Error::Io {
                        op: "cannot read the api response",
                        source: e,
                    });
                }
                break;
            }
        }
    }
    let answer = parse(&mut &raw[..]);
    match (signal, answer) {
        (None, answer) => answer,
        (Some(sig), Ok(_)) => Err(Error::Signal(format!(
            "{sig} after the request had completed"
        ))),
        (Some(sig), Err(Error::ApiRequest { message, .. })) => {
            Err(Error::Signal(format!("{sig}: {message}")))
        }
        (Some(sig), Err(_)) => Err(Error::Signal(format!(
            "{sig} before the VMM answered; what it did is unknown"
        ))),
    }
}

/// Sends one request and returns the response body (`None` when empty). A non-2xx status is
/// [`Error::ApiRequest`] carrying the server's `error` message.
pub fn call(socket: &Path, method: &str, path: &str, body: Option<&str>) -> Result<Option<String>> {
    let mut stream = send(socket, method, path, body)?;
    parse(&mut stream)
}

/// Connects and sends the request.
fn send(socket: &Path, method: &str, path: &str, body: Option<&str>) -> Result<UnixStream> {
    let mut stream = UnixStream::connect(socket).map_err(|source| Error::ApiConnect {
        path: socket.to_path_buf(),
        source,
    })?;
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|source| Error::Io {
            op: "cannot send the api request",
            source,
        })?;
    Ok(stream)
}

/// Reads the response: the body of a 2xx, else [`Error::ApiRequest`].
fn parse(stream: &mut impl std::io::Read) -> Result<Option<String>> {
    let (status, body) =
        http::read_response(stream, MAX_RESPONSE).map_err(|e| Error::ApiRequest {
            status: 500,
            message: format!("bad api response: {e}"),
        })?;
    let text = String::from_utf8_lossy(&body).into_owned();
    if !(200..300).contains(&status) {
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(|m| m.as_str()).map(str::to_string))
            .unwrap_or_else(|| format!("api request failed with status {status}"));
        return Err(Error::ApiRequest { status, message });
    }
    Ok((!text.is_empty()).then_some(text))
}
