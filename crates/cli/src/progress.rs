//! The progress line `anyvisor migrate` draws on a terminal while the migration runs: it polls
//! `GET /vm` on a second connection and redraws one line on stderr.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the line is redrawn.
const POLL: Duration = Duration::from_millis(500);
const PAGE: u64 = 4096;

/// Draws the progress line until dropped; does nothing when stderr is not a terminal.
pub struct Shown {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Shown {
    pub fn start(socket: &Path) -> Shown {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = if std::io::stderr().is_terminal() {
            let stop2 = stop.clone();
            let socket = socket.to_path_buf();
            std::thread::Builder::new()
                .name("progress".into())
                .spawn(move || poll(&socket, &stop2))
                .ok()
        } else {
            None
        };
        Shown { stop, thread }
    }
}

impl Drop for Shown {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn poll(socket: &Path, stop: &AtomicBool) {
    let mut drawn = false;
    loop {
        // Sleep in small steps so the line goes away soon after the migration ends.
        for _ in 0..10 {
            if stop.load(Ordering::Acquire) {
                if drawn {
                    eprint!("\r\x1b[2K");
                    let _ = std::io::stderr().flush();
                }
                return;
            }
            std::thread::sleep(POLL / 10);
        }
        let info = vmm::api::client::info(socket)
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok());
        if let Some(line) = info.as_ref().and_then(|i| line(i.get("migration")?)) {
            eprint!("\r\x1b[2K{line}");
            let _ = std::io::stderr().flush();
            drawn = true;
        }
    }
}

/// One progress line from `GET /vm`'s `migration` object (`None` when no migration runs).
pub fn line(m: &serde_json::Value) -> Option<String> {
    if m.is_null() {
        return None;
    }
    let n = |k: &str| m.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    let phase = if m.get("stopped").and_then(serde_json::Value::as_bool) == Some(true) {
        "final round"
    } else {
        "round"
    };
    Some(format!(
        "migrating: {} sent, {} remaining, dirty {}/s, {phase} {}, expected downtime {} ms, throttle {}%",
        bytes(n("bytes_sent")),
        bytes(n("remaining_pages").saturating_mul(PAGE)),
        bytes(n("dirty_rate").saturating_mul(PAGE)),
        n("round"),
        n("expected_downtime_ms"),
        n("throttle"),
    ))
}

/// `1.5 GiB`, `12.0 MiB`, `512 B`.
fn bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_line() {
        assert_eq!(line(&serde_json::Value::Null), None);
        let m = serde_json::json!({
            "round": 2, "bytes_sent": 3 << 29, "remaining_pages": 256, "dirty_rate": 512,
            "bandwidth": 1, "expected_downtime_ms": 40, "throttle": 20, "stopped": false,
        });
        assert_eq!(
            line(&m).unwrap(),
            "migrating: 1.5 GiB sent, 1.0 MiB remaining, dirty 2.0 MiB/s, round 2, expected downtime 40 ms, throttle 20%"
        );
        assert_eq!(bytes(100), "100 B");
    }
}
