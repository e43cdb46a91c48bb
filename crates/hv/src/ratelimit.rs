//! Rate limiting for log lines that a guest (or a peer on a socket) can trigger at will.
//!
//! Each call site gets its own budget: at most [`BURST`] lines per [`INTERVAL`]; further lines
//! in that interval are dropped and counted, and the first line let through after them is
//! preceded by one "N similar messages suppressed" line. Use it through [`rate_limited!`]:
//!
//! ```
//! # let e = "bad descriptor";
//! hv::rate_limited!(eprintln!("virtio-blk read failed: {e}"));
//! ```
//!
//! [`rate_limited!`]: crate::rate_limited

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Lines a call site may log per [`INTERVAL`].
pub const BURST: u32 = 10;
/// The length of one budget window.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// The budget of one call site (a `static`, so `new` is `const`).
#[derive(Debug)]
pub struct RateLimit {
    state: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl RateLimit {
    pub const fn new() -> RateLimit {
        RateLimit {
            state: Mutex::new(Window {
                start: None,
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether a line may be logged now: `Some(n)` to log it, after saying that `n` lines were
    /// dropped since the last one logged; `None` to drop it.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    /// [`admit`](Self::admit) at a given time (for tests).
    pub fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut w = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if w.start
            .is_none_or(|t| now.saturating_duration_since(t) >= INTERVAL)
        {
            w.start = Some(now);
            w.logged = 0;
        }
        if w.logged < BURST {
            w.logged += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            None
        }
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit::new()
    }
}

/// Logs through any format-style macro (`tracing::warn!`, `eprintln!`, ...) under a per-call-site
/// [`RateLimit`](crate::ratelimit::RateLimit):
/// `hv::rate_limited!(tracing::warn!(device = 2, "virtio-blk read failed: {e}"))`.
#[macro_export]
macro_rules! rate_limited {
    ($($log:ident)::+ ! ($($arg:tt)*)) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        $crate::rate_limited!(@at &LIMIT, ::std::time::Instant::now(); $($log)::+!($($arg)*))
    }};
    // A given limiter and time (for tests).
    (@at $limit:expr, $now:expr; $($log:ident)::+ ! ($($arg:tt)*)) => {{
        if let Some(suppressed) = $limit.admit_at($now) {
            if suppressed > 0 {
                $($log)::+!(
                    "{} similar messages suppressed ({}:{})",
                    suppressed,
                    file!(),
                    line!()
                );
            }
            $($log)::+!($($arg)*);
        }
    }};
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    #[test]
    fn burst_then_silence_then_a_count() {
        let l = RateLimit::new();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert_eq!(l.admit_at(t0), Some(0));
        }
        for i in 1..=1000 {
            assert_eq!(l.admit_at(t0 + INTERVAL / 2), None, "line {i}");
        }
        // The next window lets lines through again, the first one says what was dropped.
        assert_eq!(l.admit_at(t0 + INTERVAL), Some(1000));
        assert_eq!(l.admit_at(t0 + INTERVAL), Some(0));
    }

    #[test]
    fn a_quiet_site_is_never_limited() {
        let l = RateLimit::new();
        let t0 = Instant::now();
        for i in 0..100u32 {
            assert_eq!(l.admit_at(t0 + INTERVAL * i), Some(0));
        }
    }

    #[test]
    fn a_clock_going_backwards_does_not_reopen_the_window() {
        let l = RateLimit::new();
        let t0 = Instant::now() + INTERVAL;
        for _ in 0..BURST {
            l.admit_at(t0);
        }
        assert_eq!(l.admit_at(t0 - INTERVAL), None);
    }

    thread_local! {
        static LINES: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    }

    macro_rules! record {
        ($($arg:tt)*) => {
            LINES.with(|l| l.borrow_mut().push(format!($($arg)*)))
        };
    }

    fn site_a(i: u32) {
        rate_limited!(record!("a {i}"));
    }

    fn site_b(i: u32) {
        rate_limited!(record!("b {i}"));
    }

    #[test]
    fn each_call_site_has_its_own_budget() {
        for i in 0..1000 {
            site_a(i);
            site_b(i);
        }
        let lines = LINES.with(|l| l.take());
        let a: Vec<_> = lines.iter().filter(|l| l.starts_with("a ")).collect();
        let b: Vec<_> = lines.iter().filter(|l| l.starts_with("b ")).collect();
        assert_eq!(a.len(), BURST as usize, "{lines:?}");
        assert_eq!(b.len(), BURST as usize);
        assert_eq!(a.last().map(|s| s.as_str()), Some("a 9"));
        assert_eq!(lines.len(), 2 * BURST as usize);
    }

    #[test]
    fn the_suppressed_count_comes_before_the_next_line() {
        let l = RateLimit::new();
        let t0 = Instant::now();
        for i in 0..BURST + 5 {
            rate_limited!(@at &l, t0; record!("c {i}"));
        }
        rate_limited!(@at &l, t0 + INTERVAL; record!("c late"));
        let lines = LINES.with(|l| l.take());
        assert_eq!(lines.len(), BURST as usize + 2, "{lines:?}");
        assert_eq!(lines[BURST as usize - 1], "c 9");
        let count = &lines[BURST as usize];
        assert!(
            count.starts_with("5 similar messages suppressed (") && count.contains("ratelimit.rs:"),
            "{count}"
        );
        assert_eq!(lines[BURST as usize + 1], "c late");
    }
}
