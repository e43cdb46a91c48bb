//! The sending side: handshake, pre-copy rounds, auto-converge, stop-and-copy
//! (docs/migration-protocol.md §6).

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use hv::PAGE_SIZE;

use crate::pages::{self, BatchStats};
use crate::wire::{self, Channel, Kind, Role};
use crate::{DEFAULT_TIMEOUT, Error, Key, MAX_STATE_BYTES, Result, SourceVm};

/// Consecutive non-converging rounds before the throttle is raised one step.
const STALLS_PER_STEP: u32 = 2;
const THROTTLE_STEP: u8 = 20;
const THROTTLE_MAX: u8 = 99;
/// StateBlob messages carry at most this much each.
const STATE_CHUNK: usize = 1024 * 1024;
/// Rates over shorter rounds are computed as if the round had lasted this long.
const MIN_ROUND: Duration = Duration::from_millis(1);
/// How often progress is reported during a long round.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Receives progress reports.
pub type ProgressFn = Box<dyn FnMut(&Progress) + Send>;

/// How [`send`](crate::send) behaves.
pub struct SendOptions {
    /// Pause the VM once the remaining dirty pages are expected to transfer within this time.
    pub max_downtime_ms: u64,
    /// After this many dirty-page rounds the final round is forced whatever the estimate.
    pub max_rounds: u32,
    /// Socket read/write timeout (connect timeout for tcp).
    pub timeout: Duration,
    /// Caps the send rate in bytes per second (None: as fast as the link goes).
    pub bandwidth_limit: Option<u64>,
    /// Called after every round and every ~250 ms during long rounds.
    pub progress: Option<ProgressFn>,
}

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            max_downtime_ms: 100,
            max_rounds: 30,
            timeout: DEFAULT_TIMEOUT,
            bandwidth_limit: None,
            progress: None,
        }
    }
}

/// A snapshot of a running migration.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Progress {
    /// 0 = full copy; then one per dirty-page round.
    pub round: u32,
    pub bytes_sent: u64,
    /// Pages still to send in this round (or dirty pages waiting for the next one).
    pub remaining_pages: u64,
    /// Pages the guest dirtied per second during the last round.
    pub dirty_rate: u64,
    /// Measured send rate in bytes per second.
    pub bandwidth: u64,
    pub expected_downtime_ms: u64,
    /// Current auto-converge throttle in percent.
    pub throttle: u8,
    /// True once the VM is paused for the final round.
    pub stopped: bool,
}

/// How a successful migration went.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Outcome {
    pub total_ms: u64,
    /// From pausing the source to the destination's confirmation that it runs the VM.
    pub downtime_ms: u64,
    pub bytes: u64,
    /// Dirty-page rounds after the full copy (the final one included).
    pub rounds: u32,
    /// Highest auto-converge throttle applied, in percent (0 = never throttled).
    pub throttled: u8,
}

/// Migrates `vm` over an already connected `stream` (see the crate docs). The caller sets
/// the stream's timeouts. On any failure before the destination confirmed it resumed the VM,
/// the source VM is resumed (if it was paused), throttling and dirty tracking are turned off,
/// the peer is told why (when it can still listen), and `Err` carries a one-line reason.
pub fn send_on<S: Read + Write + Send + 'static>(
    stream: S,
    key: Option<&Key>,
    vm: &dyn SourceVm,
    opts: SendOptions,
) -> Result<Outcome> {
    let mut s = Sender {
        ch: Channel::new(Box::new(stream), Role::Source),
        vm,
        opts,
        start: Instant::now(),
        paused: false,
        tracking: false,
        throttle: 0,
        max_throttle: 0,
        last_progress: Instant::now(),
        progress: Progress::default(),
        send_time: Duration::ZERO,
        limiter: None,
    };
    let r = s.run(key);
    if let Err(e) = &r {
        if !matches!(
            e,
            Error::PeerGone | Error::Timeout | Error::Io(_) | Error::Peer(_) | Error::Refused(_)
        ) {
            s.ch.send_error(&hv::Chain(e).to_string());
        }
        if s.paused {
            // Nothing better to do if this fails: the error already says the migration failed.
            let _ = vm.resume();
        }
    }
    if s.throttle != 0 {
        vm.throttle(0);
    }
    if s.tracking {
        let _ = vm.set_dirty_tracking(false);
    }
    r
}

struct Sender<'a> {
    ch: Channel,
    vm: &'a dyn SourceVm,
    opts: SendOptions,
    start: Instant,
    paused: bool,
    tracking: bool,
    throttle: u8,
    max_throttle: u8,
    last_progress: Instant,
    progress: Progress,
    /// Time spent sending pages, for the bandwidth estimate.
    send_time: Duration,
    /// Start of rate limiting: when and at which byte count.
    limiter: Option<(Instant, u64)>,
}

impl Sender<'_> {
    fn vm_err(what: &'static str) -> impl FnOnce(crate::VmError) -> Error {
        move |source| Error::VmCall { what, source }
    }

    fn run(&mut self, key: Option<&Key>) -> Result<Outcome> {
        let mem = self.vm.memory();
        pages::check_layout(mem)?;
        wire::handshake_source(&mut self.ch, key)?;

        let description = serde_json::to_vec(&self.vm.describe()).map_err(|e| Error::VmCall {
            what: "describing the VM",
            source: Box::new(e),
        })?;
        self.ch.send(Kind::Hello, &description)?;
        let f = self.ch.recv()?;
        match f.kind {
            Kind::Ready => {}
            Kind::Refuse => return Err(Error::Refused(wire::reason_text(&f.payload))),
            _ => return Err(wire::unexpected(&f, "instead of Ready")),
        }

        self.vm
            .set_dirty_tracking(true)
            .map_err(Self::vm_err("enabling dirty tracking"))?;
        self.tracking = true;
        // Forget writes from before: round 0 reads every page after this point.
        self.vm
            .take_dirty_pages()
            .map_err(Self::vm_err("reading the dirty log"))?;

        // Round 0: every non-zero page.
        let mut round_start = Instant::now();
        let all = pages::all_pages(mem);
        let mut round_bytes = self.send_pages(&all, true)?;
        self.end_round(0)?;

        let mut round = 0u32;
        let mut stalls = 0u32;
        let pending = loop {
            let elapsed = round_start.elapsed();
            let dirty = pages::normalize(
                mem,
                self.vm
                    .take_dirty_pages()
                    .map_err(Self::vm_err("reading the dirty log"))?,
            );
            round_start = Instant::now();
            let dirty_bytes = dirty.len() as u64 * PAGE_SIZE;
            let bandwidth = self.bandwidth();
            let expected_ms = dirty_bytes.saturating_mul(1000) / bandwidth.max(1);
            self.progress.dirty_rate = per_second(dirty.len() as u64, elapsed.max(MIN_ROUND));
            self.progress.remaining_pages = dirty.len() as u64;
            self.progress.expected_downtime_ms = expected_ms;
            self.report();

            if expected_ms <= self.opts.max_downtime_ms || round >= self.opts.max_rounds {
                break dirty;
            }
            // Auto-converge: the guest dirtied more than half of what we sent meanwhile.
            if round > 0 && dirty_bytes > round_bytes / 2 {
                stalls += 1;
                if stalls >= STALLS_PER_STEP && self.throttle < THROTTLE_MAX {
                    stalls = 0;
                    self.throttle = self
                        .throttle
                        .saturating_add(THROTTLE_STEP)
                        .min(THROTTLE_MAX);
                    self.max_throttle = self.max_throttle.max(self.throttle);
                    self.vm.throttle(self.throttle);
                    self.progress.throttle = self.throttle;
                }
            } else {
                stalls = 0;
            }
            round += 1;
            self.progress.round = round;
            round_bytes = self.send_pages(&dirty, false)?;
            self.end_round(round)?;
        };

        // Stop and copy.
        let paused_at = Instant::now();
        self.vm.pause().map_err(Self::vm_err("pausing"))?;
        self.paused = true;
        self.progress.stopped = true;
        let mut last = pending;
        last.extend(
            self.vm
                .take_dirty_pages()
                .map_err(Self::vm_err("reading the dirty log"))?,
        );
        let last = pages::normalize(mem, last);
        round += 1;
        self.progress.round = round;
        self.progress.remaining_pages = last.len() as u64;
        self.report();
        self.send_pages(&last, false)?;
        self.end_round(round)?;

        let state = self
            .vm
            .final_state()
            .map_err(Self::vm_err("saving vCPU and device state"))?;
        if state.len() > MAX_STATE_BYTES {
            return Err(Error::Vm(format!(
                "final state of {} bytes exceeds the {MAX_STATE_BYTES} byte limit",
                state.len()
            )));
        }
        if state.is_empty() {
            self.ch.send(Kind::StateBlob, &[])?;
        }
        for chunk in state.chunks(STATE_CHUNK) {
            self.ch.send(Kind::StateBlob, chunk)?;
        }
        self.ch
            .send(Kind::Complete, &(state.len() as u64).to_le_bytes())?;
        let f = self.ch.recv()?;
        if f.kind != Kind::Resumed {
            return Err(wire::unexpected(&f, "instead of Resumed"));
        }
        Ok(Outcome {
            total_ms: millis(self.start.elapsed()),
            downtime_ms: millis(paused_at.elapsed()),
            bytes: self.ch.bytes_out,
            rounds: round,
            throttled: self.max_throttle,
        })
    }

    /// Bytes per second achieved so far while sending pages.
    fn bandwidth(&self) -> u64 {
        if self.send_time.is_zero() {
            return u64::MAX;
        }
        per_second(self.ch.bytes_out, self.send_time)
    }

    fn report(&mut self) {
        self.progress.bytes_sent = self.ch.bytes_out;
        self.progress.bandwidth = self.bandwidth();
        self.last_progress = Instant::now();
        if let Some(cb) = self.opts.progress.as_mut() {
            cb(&self.progress);
        }
    }

    fn end_round(&mut self, round: u32) -> Result<()> {
        let mut p = Vec::with_capacity(12);
        p.extend_from_slice(&round.to_le_bytes());
        p.extend_from_slice(&self.ch.bytes_out.to_le_bytes());
        self.send_frame(Kind::RoundEnd, &p)
    }

    /// Sends `pfns` (sorted, deduplicated, in memory). Returns the bytes put on the wire.
    fn send_pages(&mut self, pfns: &[u64], skip_zero: bool) -> Result<u64> {
        let before = self.ch.bytes_out;
        let mut buf = Vec::new();
        let mut done = 0u64;
        for batch in pages::batches(pfns) {
            let t = Instant::now();
            let stats: Option<BatchStats> =
                pages::encode_batch(self.vm.memory(), batch, skip_zero, &mut buf)?;
            if stats.is_some() {
                self.send_frame(Kind::MemoryPages, &buf)?;
            }
            self.send_time += t.elapsed();
            done += batch.len() as u64;
            if self.last_progress.elapsed() >= PROGRESS_EVERY {
                self.progress.remaining_pages = pfns.len() as u64 - done;
                self.report();
            }
        }
        Ok(self.ch.bytes_out - before)
    }

    /// Sends one message, then sleeps as needed to honour the bandwidth limit. A write that
    /// fails because the peer went away reports the peer's last words if it left any.
    fn send_frame(&mut self, kind: Kind, payload: &[u8]) -> Result<()> {
        let limit = self.opts.bandwidth_limit.filter(|&l| l > 0);
        if limit.is_some() && self.limiter.is_none() {
            self.limiter = Some((Instant::now(), self.ch.bytes_out));
        }
        if let Err(e) = self.ch.send(kind, payload) {
            if matches!(e, Error::PeerGone)
                && let Ok(f) = self.ch.recv()
                && f.kind == Kind::Error
            {
                return Err(Error::Peer(wire::reason_text(&f.payload)));
            }
            return Err(e);
        }
        if let (Some(limit), Some((since, base))) = (limit, self.limiter) {
            let due = Duration::from_secs_f64((self.ch.bytes_out - base) as f64 / limit as f64);
            let now = since.elapsed();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        Ok(())
    }
}

/// `count` per second over `over` (not zero), saturating; in integers, so no float cast can lose
/// bits.
fn per_second(count: u64, over: Duration) -> u64 {
    let nanos = over.as_nanos().max(1);
    u64::try_from(u128::from(count) * 1_000_000_000 / nanos).unwrap_or(u64::MAX)
}

/// `d` in whole milliseconds, saturating.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_milliseconds_saturate_instead_of_wrapping() {
        assert_eq!(per_second(500, Duration::from_millis(250)), 2000);
        assert_eq!(per_second(3, Duration::from_secs(2)), 1);
        assert_eq!(per_second(u64::MAX, Duration::from_nanos(1)), u64::MAX);
        // A zero duration counts as one nanosecond rather than dividing by zero.
        assert_eq!(per_second(1, Duration::ZERO), 1_000_000_000);
        assert_eq!(millis(Duration::from_micros(2500)), 2);
        assert_eq!(millis(Duration::MAX), u64::MAX);
    }
}
