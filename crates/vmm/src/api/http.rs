//! A deliberately small HTTP/1.1 subset for the API socket: one request per connection,
//! `Content-Length` bodies only, hard caps on every size. Anything else is answered with a 4xx,
//! never a panic.

use std::io::{Read, Write};

/// Largest request line plus headers.
pub const MAX_HEAD: usize = 8 * 1024;
/// Largest request body.
pub const MAX_BODY: usize = 64 * 1024;
/// Most header lines.
const MAX_HEADERS: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path without any query string.
    pub path: String,
    pub body: Vec<u8>,
}

/// Why a request could not be read; maps to the status it is answered with.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HttpError {
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("request headers too large")]
    HeadTooLarge,
    #[error("request body too large")]
    BodyTooLarge,
    #[error("length required")]
    LengthRequired,
    #[error("only HTTP/1.0 and HTTP/1.1 are supported")]
    Version,
    #[error("connection closed")]
    Closed,
    #[error("read failed: {0}")]
    Io(String),
}

impl HttpError {
    /// The status to answer with; `None` when there is nobody to answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            HttpError::BadRequest(_) => Some(400),
            HttpError::HeadTooLarge => Some(431),
            HttpError::BodyTooLarge => Some(413),
            HttpError::LengthRequired => Some(411),
            HttpError::Version => Some(505),
            HttpError::Closed | HttpError::Io(_) => None,
        }
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Reads one request from `stream`.
pub fn read_request(stream: &mut impl Read) -> Result<Request, HttpError> {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(end) = find_head_end(&buf) {
            break end;
        }
        if buf.len() >= MAX_HEAD {
            return Err(HttpError::HeadTooLarge);
        }
        let want = chunk.len().min(MAX_HEAD + 4 - buf.len());
        let n = match stream.read(&mut chunk[..want]) {
            Ok(0) if buf.is_empty() => return Err(HttpError::Closed),
            Ok(0) => return Err(HttpError::BadRequest("incomplete request")),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(HttpError::Io(e.to_string())),
        };
        buf.extend_from_slice(&chunk[..n]);
    };
    if head_end > MAX_HEAD {
        return Err(HttpError::HeadTooLarge);
    }
    let head = std::str::from_utf8(&buf[..head_end - 4])
        .map_err(|_| HttpError::BadRequest("request head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::BadRequest("malformed request line"));
    };
    if !is_token(method) {
        return Err(HttpError::BadRequest("malformed method"));
    }
    if !target.starts_with('/') || target.bytes().any(|b| b.is_ascii_control()) {
        return Err(HttpError::BadRequest("malformed request target"));
    }
    if !version.starts_with("HTTP/") {
        return Err(HttpError::BadRequest("malformed request line"));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(HttpError::Version);
    }
    let mut content_length: Option<usize> = None;
    for (i, line) in lines.enumerate() {
        if i >= MAX_HEADERS {
            return Err(HttpError::HeadTooLarge);
        }
        let (name, value) = line
            .split_once(':')
            .ok_or(HttpError::BadRequest("malformed header"))?;
        if !is_token(name) {
            return Err(HttpError::BadRequest("malformed header"));
        }
        let value = value.trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("content-length") {
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HttpError::BadRequest("malformed Content-Length"));
            }
            // Anything with more digits than a usize holds is too large anyway.
            let len = value.parse::<usize>().unwrap_or(usize::MAX);
            if content_length.is_some_and(|l| l != len) {
                return Err(HttpError::BadRequest("conflicting Content-Length"));
            }
            content_length = Some(len);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::LengthRequired);
        }
    }
    let length = content_length.unwrap_or(0);
    if length > MAX_BODY {
        return Err(HttpError::BodyTooLarge);
    }
    let mut body = buf[head_end..].to_vec();
    if body.len() > length {
        return Err(HttpError::BadRequest("more data than Content-Length"));
    }
    let have = body.len();
    body.resize(length, 0);
    stream.read_exact(&mut body[have..]).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            HttpError::BadRequest("body shorter than Content-Length")
        } else {
            HttpError::Io(e.to_string())
        }
    })?;
    let path = target.split('?').next().unwrap_or(target).to_string();
    Ok(Request {
        method: method.to_string(),
        path,
        body,
    })
}

/// A response: a status and an optional JSON body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Option<String>,
}

impl Response {
    pub fn no_content() -> Self {
        Response {
            status: 204,
            body: None,
        }
    }

    pub fn json(status: u16, value: &serde_json::Value) -> Self {
        Response {
            status,
            body: Some(value.to_string()),
        }
    }

    pub fn error(status: u16, message: &str) -> Self {
        Self::json(status, &serde_json::json!({ "error": message }))
    }

    pub fn write_to(&self, w: &mut impl Write) -> std::io::Result<()> {
        let body = self.body.as_deref().unwrap_or("");
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.status,
            reason(self.status),
            body.len()
        );
        if self.body.is_some() {
            out.push_str("Content-Type: application/json\r\n");
        }
        out.push_str("\r\n");
        out.push_str(body);
        w.write_all(out.as_bytes())?;
        w.flush()
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// Reads a response (the client side): status and body.
pub fn read_response(stream: &mut impl Read, max_body: usize) -> Result<(u16, Vec<u8>), String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(end) = find_head_end(&buf) {
            break end;
        }
        if buf.len() > MAX_HEAD {
            return Err("response headers too large".into());
        }
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Err("connection closed before a response".into()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.to_string()),
        };
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end - 4]).map_err(|_| "malformed response")?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or("malformed response")?;
    let mut length = None;
    for line in lines {
        if let Some((n, v)) = line.split_once(':')
            && n.eq_ignore_ascii_case("content-length")
        {
            length = Some(
                v.trim()
                    .parse::<usize>()
                    .map_err(|_| "malformed response")?,
            );
        }
    }
    let mut body = buf[head_end..].to_vec();
    match length {
        Some(len) if len > max_body => return Err("response too large".into()),
        Some(len) => {
            if body.len() < len {
                let have = body.len();
                body.resize(len, 0);
                stream
                    .read_exact(&mut body[have..])
                    .map_err(|e| e.to_string())?;
            }
            body.truncate(len);
        }
        None => {
            stream
                .take(max_body as u64 + 1)
                .read_to_end(&mut body)
                .map_err(|e| e.to_string())?;
            if body.len() > max_body {
                return Err("response too large".into());
            }
        }
    }
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Result<Request, HttpError> {
        read_request(&mut &bytes[..])
    }

    /// A reader that hands out one byte per call, as a slow client would.
    struct Trickle<'a>(&'a [u8]);
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0.is_empty() || buf.is_empty() {
                return Ok(0);
            }
            buf[0] = self.0[0];
            self.0 = &self.0[1..];
            Ok(1)
        }
    }

    #[test]
    fn valid_requests() {
        let r = parse(b"GET /vm HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/vm");
        assert!(r.body.is_empty());
        let raw = b"PUT /vm/snapshot?x=1 HTTP/1.1\r\ncontent-length: 13\r\n\r\n{\"stop\":true}";
        let r = parse(raw).unwrap();
        assert_eq!(r.path, "/vm/snapshot");
        assert_eq!(r.body, b"{\"stop\":true}");
        let r = read_request(&mut Trickle(raw)).unwrap();
        assert_eq!(r.body, b"{\"stop\":true}");
        assert!(parse(b"GET /vm HTTP/1.0\r\n\r\n").is_ok());
    }

    #[test]
    fn malformed_requests_are_4xx() {
        let cases: &[(&[u8], u16)] = &[
            (b"\r\n\r\n", 400),
            (b"GET\r\n\r\n", 400),
            (b"GET /vm\r\n\r\n", 400),
            (b"GET /vm HTTP/1.1 extra\r\n\r\n", 400),
            (b"GET vm HTTP/1.1\r\n\r\n", 400),
            (b"G(T /vm HTTP/1.1\r\n\r\n", 400),
            (b"GET /vm FTP/1.1\r\n\r\n", 400),
            (b"GET /vm HTTP/2.0\r\n\r\n", 505),
            (b"GET /vm HTTP/1.1\r\nno colon\r\n\r\n", 400),
            (b"GET /vm HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
            (b"GET /vm HTTP/1.1\r\nContent-Length: 1x\r\n\r\n", 400),
            (
                b"GET /vm HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                400,
            ),
            (
                b"PUT /vm HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                413,
            ),
            (b"PUT /vm HTTP/1.1\r\nContent-Length: 70000\r\n\r\n", 413),
            (b"PUT /vm HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc", 400),
            (b"PUT /vm HTTP/1.1\r\nContent-Length: 1\r\n\r\nabc", 400),
            (
                b"PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                411,
            ),
            (b"GET /vm HTTP/1.1\r\n", 400),
            (b"GET /\xff HTTP/1.1\r\n\r\n", 400),
        ];
        for (raw, status) in cases {
            let e = parse(raw).unwrap_err();
            assert_eq!(
                e.status(),
                Some(*status),
                "{:?}: {e}",
                String::from_utf8_lossy(raw)
            );
        }
        assert_eq!(parse(b"").unwrap_err(), HttpError::Closed);
    }

    #[test]
    fn oversized_heads() {
        let mut raw = b"GET /vm HTTP/1.1\r\nX: ".to_vec();
        raw.extend(std::iter::repeat_n(b'a', MAX_HEAD));
        raw.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse(&raw).unwrap_err().status(), Some(431));
        // Endless garbage without a blank line stops at the cap.
        let endless = std::io::repeat(b'a');
        assert_eq!(
            read_request(&mut endless.take(1 << 30))
                .unwrap_err()
                .status(),
            Some(431)
        );
        let mut many = b"GET /vm HTTP/1.1\r\n".to_vec();
        for _ in 0..100 {
            many.extend_from_slice(b"A: b\r\n");
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse(&many).unwrap_err().status(), Some(431));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: every prefix and many byte flips of a valid request.
        let valid = b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
        for n in 0..valid.len() {
            let _ = parse(&valid[..n]);
        }
        let mut seed = 0x1234_5678_u32;
        for _ in 0..20_000 {
            let mut v = valid.to_vec();
            for _ in 0..3 {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                let i = seed as usize % v.len();
                v[i] = (seed >> 8) as u8;
            }
            let _ = parse(&v);
        }
    }

    #[test]
    fn responses_round_trip() {
        let mut out = Vec::new();
        Response::error(404, "no such endpoint")
            .write_to(&mut out)
            .unwrap();
        let (status, body) = read_response(&mut &out[..], 1024).unwrap();
        assert_eq!(status, 404);
        assert_eq!(body, br#"{"error":"no such endpoint"}"#);
        let mut out = Vec::new();
        Response::no_content().write_to(&mut out).unwrap();
        assert_eq!(read_response(&mut &out[..], 1024).unwrap(), (204, vec![]));
        assert!(read_response(&mut &b"garbage"[..], 1024).is_err());
        assert!(
            read_response(
                &mut &b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n"[..],
                1024
            )
            .is_err()
        );
    }
}
