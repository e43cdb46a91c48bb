//! Fake VMs for the migration tests: no hypervisor, just guest memory that a background thread
//! keeps dirtying, and a destination built from the description.

#![allow(dead_code)]

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hv::{GuestMemory, PAGE_SIZE};
use migrate::{DestinationVm, SourceVm};
use serde_json::json;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

pub const MIB: usize = 1024 * 1024;

/// xorshift64*: deterministic test randomness.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[derive(Default)]
struct Shared {
    paused: bool,
    tracking: bool,
    stop: bool,
    dirty: HashSet<u64>,
}

/// How fast the fake guest writes memory.
#[derive(Clone, Copy)]
pub struct Dirtier {
    /// Pages written per tick.
    pub pages_per_tick: u32,
    /// Tick length at throttle 0; a throttle of p% stretches it to tick * 100 / (100 - p).
    pub tick: Duration,
}

pub struct FakeSource {
    pub mem: Arc<GuestMemory>,
    shared: Arc<Mutex<Shared>>,
    throttle: Arc<AtomicU8>,
    pub resumes: AtomicU32,
    pub pauses: AtomicU32,
    pub max_throttle: AtomicU8,
    pub state: Vec<u8>,
    pub cpu_model: &'static str,
    dirtier: Option<JoinHandle<()>>,
    /// Called when the source pauses the VM (tests use it to kill the destination then).
    pub on_pause: Option<Box<dyn Fn() + Send + Sync>>,
}

/// 12 MiB at 0 and 4 MiB at 16 MiB (a hole in between), two thirds of the pages non-zero.
pub fn regions() -> Vec<(u64, u64)> {
    vec![(0, 12 * MIB as u64), (16 * MIB as u64, 4 * MIB as u64)]
}

pub fn new_memory(regions: &[(u64, u64)]) -> GuestMemory {
    let r: Vec<(GuestAddress, usize)> = regions
        .iter()
        .map(|&(a, l)| (GuestAddress(a), l as usize))
        .collect();
    GuestMemory::from_ranges(&r).unwrap()
}

fn page_list(mem: &GuestMemory) -> Vec<u64> {
    let mut v = Vec::new();
    for r in mem.iter() {
        let first = r.start_addr().0 / PAGE_SIZE;
        v.extend(first..first + r.len() / PAGE_SIZE);
    }
    v
}

impl FakeSource {
    pub fn new(regions: &[(u64, u64)], dirtier: Option<Dirtier>) -> FakeSource {
        let mem = Arc::new(new_memory(regions));
        let mut rng = Rng(0x1234_5678);
        for pfn in page_list(&mem) {
            if pfn % 3 != 0 {
                let data = rng.bytes(64);
                let off = rng.below(PAGE_SIZE - 64);
                mem.write_slice(&data, GuestAddress(pfn * PAGE_SIZE + off))
                    .unwrap();
            }
        }
        let shared = Arc::new(Mutex::new(Shared::default()));
        let throttle = Arc::new(AtomicU8::new(0));
        let handle = dirtier.map(|d| {
            let (mem, shared, throttle) = (mem.clone(), shared.clone(), throttle.clone());
            std::thread::spawn(move || dirty_loop(&mem, &shared, &throttle, d))
        });
        FakeSource {
            mem,
            shared,
            throttle,
            resumes: AtomicU32::new(0),
            pauses: AtomicU32::new(0),
            max_throttle: AtomicU8::new(0),
            state: b"vcpu and device state".repeat(100_000),
            cpu_model: "portable",
            dirtier: handle,
            on_pause: None,
        }
    }

    pub fn stop_dirtier(&mut self) {
        self.shared.lock().unwrap().stop = true;
        if let Some(h) = self.dirtier.take() {
            h.join().unwrap();
        }
    }

    pub fn is_paused(&self) -> bool {
        self.shared.lock().unwrap().paused
    }

    pub fn is_tracking(&self) -> bool {
        self.shared.lock().unwrap().tracking
    }

    pub fn throttle_now(&self) -> u8 {
        self.throttle.load(Ordering::SeqCst)
    }

    /// The source ended a failed migration as it must: running, untracked, unthrottled.
    pub fn assert_running_again(&self) {
        assert!(!self.is_paused(), "source VM left paused");
        assert!(!self.is_tracking(), "dirty tracking left on");
        assert_eq!(self.throttle_now(), 0, "throttle left on");
        assert_eq!(
            self.pauses.load(Ordering::SeqCst),
            self.resumes.load(Ordering::SeqCst),
            "every pause must be followed by a resume"
        );
    }
}

impl Drop for FakeSource {
    fn drop(&mut self) {
        self.stop_dirtier();
    }
}

fn dirty_loop(mem: &GuestMemory, shared: &Mutex<Shared>, throttle: &AtomicU8, d: Dirtier) {
    let pages = page_list(mem);
    let mut rng = Rng(0xfeed_beef);
    let mut n = 0u64;
    loop {
        {
            let mut g = shared.lock().unwrap();
            if g.stop {
                return;
            }
            if !g.paused {
                for _ in 0..d.pages_per_tick {
                    let pfn = pages[rng.below(pages.len() as u64) as usize];
                    n += 1;
                    let gpa = GuestAddress(pfn * PAGE_SIZE);
                    if n.is_multiple_of(16) {
                        // Sometimes a page becomes all-zero again.
                        mem.write_slice(&[0u8; PAGE_SIZE as usize], gpa).unwrap();
                    } else {
                        let off = rng.below(PAGE_SIZE - 8);
                        mem.write_slice(&rng.next().to_le_bytes(), GuestAddress(gpa.0 + off))
                            .unwrap();
                    }
                    if g.tracking {
                        g.dirty.insert(pfn);
                    }
                }
            }
        }
        let t = u32::from(throttle.load(Ordering::SeqCst).min(99));
        std::thread::sleep(d.tick * 100 / (100 - t));
    }
}

impl SourceVm for FakeSource {
    fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    fn describe(&self) -> serde_json::Value {
        let regions: Vec<[u64; 2]> = self
            .mem
            .iter()
            .map(|r| [r.start_addr().0, r.len()])
            .collect();
        json!({ "cpu_model": self.cpu_model, "regions": regions })
    }

    fn set_dirty_tracking(&self, on: bool) -> Result<(), migrate::VmError> {
        let mut g = self.shared.lock().unwrap();
        g.tracking = on;
        g.dirty.clear();
        Ok(())
    }

    fn take_dirty_pages(&self) -> Result<Vec<u64>, migrate::VmError> {
        Ok(self.shared.lock().unwrap().dirty.drain().collect())
    }

    fn throttle(&self, percent: u8) {
        self.throttle.store(percent, Ordering::SeqCst);
        self.max_throttle.fetch_max(percent, Ordering::SeqCst);
    }

    fn pause(&self) -> Result<(), migrate::VmError> {
        self.shared.lock().unwrap().paused = true;
        self.pauses.fetch_add(1, Ordering::SeqCst);
        if let Some(f) = &self.on_pause {
            f();
        }
        Ok(())
    }

    fn resume(&self) -> Result<(), migrate::VmError> {
        self.shared.lock().unwrap().paused = false;
        self.resumes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn final_state(&self) -> Result<Vec<u8>, migrate::VmError> {
        Ok(self.state.clone())
    }
}

pub struct FakeDest {
    pub mem: GuestMemory,
}

impl DestinationVm for FakeDest {
    fn memory(&self) -> &GuestMemory {
        &self.mem
    }
}

/// Builds the destination from the description, refusing what a real VMM would refuse.
pub fn prepare(desc: &serde_json::Value) -> Result<FakeDest, String> {
    if desc["cpu_model"] != "portable" {
        return Err(format!("incompatible CPU model {}", desc["cpu_model"]));
    }
    let regions = desc["regions"].as_array().ok_or("no regions")?;
    let mut r = Vec::new();
    for reg in regions {
        let a = reg[0].as_u64().ok_or("bad region")?;
        let l = reg[1].as_u64().ok_or("bad region")?;
        if l == 0 || l > 64 * MIB as u64 || a > 1 << 40 {
            return Err("region out of range".into());
        }
        r.push((a, l));
    }
    if r.is_empty() || r.len() > 4 {
        return Err("bad region count".into());
    }
    let r: Vec<(GuestAddress, usize)> = r
        .iter()
        .map(|&(a, l)| (GuestAddress(a), l as usize))
        .collect();
    let mem = GuestMemory::from_ranges(&r).map_err(|e| e.to_string())?;
    Ok(FakeDest { mem })
}

pub fn assert_same_memory(a: &GuestMemory, b: &GuestMemory) {
    let (pa, pb) = (page_list(a), page_list(b));
    assert_eq!(pa, pb, "memory layouts differ");
    let mut x = vec![0u8; PAGE_SIZE as usize];
    let mut y = vec![0u8; PAGE_SIZE as usize];
    for pfn in pa {
        a.read_slice(&mut x, GuestAddress(pfn * PAGE_SIZE)).unwrap();
        b.read_slice(&mut y, GuestAddress(pfn * PAGE_SIZE)).unwrap();
        assert!(x == y, "page {pfn:#x} differs");
    }
}

/// An in-memory stream for feeding scripted bytes to the receiver.
pub struct Script {
    input: io::Cursor<Vec<u8>>,
    pub output: Arc<Mutex<Vec<u8>>>,
}

impl Script {
    pub fn new(input: Vec<u8>) -> Script {
        Script {
            input: io::Cursor::new(input),
            output: Arc::default(),
        }
    }
}

impl Read for Script {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Script {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An unauthenticated frame, built from the spec (docs/migration-protocol.md §2).
pub fn frame(kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = kind.to_le_bytes().to_vec();
    v.extend_from_slice(&[0, 0]);
    v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    v.extend_from_slice(payload);
    v
}

pub fn client_hello(version: u32, flags: u32) -> Vec<u8> {
    let mut p = b"AVMIGRAT".to_vec();
    p.extend_from_slice(&version.to_le_bytes());
    p.extend_from_slice(&flags.to_le_bytes());
    p.extend_from_slice(&[0u8; 32]);
    frame(1, &p)
}

pub fn pages_payload(base: u64, flags: &[u8], fill: u8) -> Vec<u8> {
    let mut v = base.to_le_bytes().to_vec();
    v.extend_from_slice(&(flags.len() as u32).to_le_bytes());
    v.extend_from_slice(flags);
    for &f in flags {
        if f == 2 {
            v.extend_from_slice(&[fill; PAGE_SIZE as usize]);
        }
    }
    v
}

pub fn round_end(round: u32) -> Vec<u8> {
    let mut v = round.to_le_bytes().to_vec();
    v.extend_from_slice(&0u64.to_le_bytes());
    frame(33, &v)
}

pub fn small_description() -> Vec<u8> {
    serde_json::to_vec(&json!({"cpu_model": "portable", "regions": [[0, 64 * 4096]]})).unwrap()
}

/// A complete, valid unauthenticated stream for a 64-page guest: frames, one per element.
pub fn valid_stream() -> Vec<Vec<u8>> {
    vec![
        client_hello(1, 0),
        frame(16, &small_description()),
        frame(32, &pages_payload(1, &[2, 0, 1, 2], 0x5a)),
        round_end(0),
        frame(32, &pages_payload(63, &[1], 0)),
        round_end(1),
        frame(48, b"state-"),
        frame(48, b"blob"),
        frame(49, &10u64.to_le_bytes()),
    ]
}
