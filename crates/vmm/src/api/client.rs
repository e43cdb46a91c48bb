//! The client side of the API, used by `anyvisor info|pause|resume|...`.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::http;
use crate::error::{Error, Result};

/// Largest response accepted.
const MAX_RESPONSE: usize = 16 << 20;

/// Sends one request and returns the response body (`None` when empty). A non-2xx status is
/// [`Error::ApiRequest`] carrying the server's `error` message.
pub fn call(socket: &Path, method: &str, path: &str, body: Option<&str>) -> Result<Option<String>> {
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
    let (status, body) =
        http::read_response(&mut stream, MAX_RESPONSE).map_err(|e| Error::ApiRequest {
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
