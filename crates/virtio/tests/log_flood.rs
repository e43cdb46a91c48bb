//! A guest that floods a virtio-mmio device with bad accesses gets a bounded number of log lines
//! (`hv::rate_limited!`), whatever the number of accesses. Its own test binary, so that no other
//! test shares the per-call-site budgets.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hv::ratelimit::{BURST, INTERVAL};
use tracing::span;
use virtio::{GuestMemory, Interrupt, MmioHandler, MmioTransport, Rng};
use vm_memory::GuestAddress;

/// Counts events per call site (file:line), at every level.
#[derive(Default)]
struct Counter(Mutex<BTreeMap<String, u64>>);

impl tracing::Subscriber for Counter {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }
    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        let m = e.metadata();
        let site = format!("{}:{}", m.file().unwrap_or("?"), m.line().unwrap_or(0));
        *self.0.lock().unwrap().entry(site).or_default() += 1;
    }
    fn enter(&self, _: &span::Id) {}
    fn exit(&self, _: &span::Id) {}
}

struct NoIrq;
impl Interrupt for NoIrq {
    fn trigger(&self) {}
}

const STATUS: u64 = 0x70;
const ACK: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;

fn wr(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// One round of every kind of misuse a guest can repeat, including a queue outside RAM at
/// DRIVER_OK (the device goes to NEEDS_RESET, a warning).
fn misbehave(t: &mut MmioTransport) {
    let mut b = [0u8; 4];
    t.read(0x1, &mut b); // unaligned register read
    t.write(0x0, &[1, 2]); // not a 32-bit write
    wr(t, 0x0, 1); // read-only register
    wr(t, STATUS, 0); // reset
    wr(t, 0x38, 16); // QUEUE_NUM before FEATURES_OK: refused
    wr(t, STATUS, DRIVER); // DRIVER without ACK: illegal transition
    wr(t, STATUS, ACK);
    wr(t, STATUS, ACK | DRIVER);
    wr(t, STATUS, ACK | DRIVER | FEATURES_OK); // no VERSION_1: FEATURES_OK refused
    wr(t, 0x24, 1); // DRIVER_FEATURES_SEL = 1
    wr(t, 0x20, 1); // VERSION_1
    wr(t, STATUS, ACK | DRIVER | FEATURES_OK);
    wr(t, 0x38, 0x7777); // an invalid queue size
    wr(t, 0x38, 16);
    wr(t, 0x84, 0x10); // descriptor table at 64 GiB: outside RAM
    wr(t, 0x44, 1); // QUEUE_READY
    wr(t, STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK); // -> NEEDS_RESET
}

#[test]
fn a_flood_of_bad_accesses_logs_a_bounded_number_of_lines() {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let mut t = MmioTransport::new(
        Box::new(Rng::new().unwrap()),
        Arc::new(mem),
        Arc::new(NoIrq),
    )
    .unwrap();
    let counter = Arc::new(Counter::default());
    const ROUNDS: u64 = 20_000;
    let start = Instant::now();
    tracing::subscriber::with_default(counter.clone(), || {
        for _ in 0..ROUNDS {
            misbehave(&mut t);
        }
    });
    let windows = start.elapsed().as_secs_f64() / INTERVAL.as_secs_f64();
    let per_site = (windows.floor() as u64 + 1) * (u64::from(BURST) + 1);
    let lines = counter.0.lock().unwrap().clone();
    let total: u64 = lines.values().sum();
    eprintln!("{total} lines for {ROUNDS} rounds of misuse: {lines:#?}");
    // Every kind of misuse was seen and logged (the capture works) ...
    let sites = |file: &str| lines.keys().filter(|k| k.contains(file)).count();
    assert!(sites("mmio.rs") >= 7, "{lines:#?}");
    assert!(
        lines.values().all(|&n| n <= per_site),
        "a call site logged more than {per_site} lines: {lines:#?}"
    );
    // ... and the whole flood (17 accesses a round) made at most a few lines per call site.
    assert!(total <= lines.len() as u64 * per_site);
    assert!(total < 200, "{total} lines");
}
