//! Live migration: `PUT /vm/migrate` (source) and `anyvisor run --incoming` (destination).
//!
//! The engine and wire protocol are crate `migrate` (`docs/migration-protocol.md`); this module
//! is the VMM's side of it:
//! * the source implements [`migrate::SourceVm`] over [`VmParts`]: the description is the
//!   snapshot [`snapshot::Header`] (config, CPU model, memory regions, backend, TSC frequency),
//!   dirty pages are the backend's dirty log merged with guest memory's own bitmap, throttling
//!   pauses the whole VM for a share of every 100 ms, and the final state is a snapshot's
//!   metadata ([`SavedVm`]) as JSON;
//! * the destination checks the description against this host before any page arrives
//!   (backend and CPU model, memory layout, disks), receives RAM into zero-filled guest memory,
//!   then rebuilds the VM exactly like `--restore` ([`crate::snapshot::rebuild`]), launches it
//!   and confirms.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use migrate::{Address, Key, Listener, SendOptions};
use serde::Deserialize;
use snapshot::Header;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::api::{ApiError, MigrateRequest};
use crate::backend::Backend;
use crate::config::RuntimeOptions;
use crate::control::Control;
use crate::error::{Error, Result};
use crate::snapshot::{RunState, SavedVm};
use crate::vm::{VmParts, Vmm};

/// How long pausing for the final round may take.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// One throttle cycle: the VM runs `100 - percent` % of it and is paused for the rest.
const THROTTLE_PERIOD: Duration = Duration::from_millis(100);

/// The latest progress report of a running outgoing migration, for `GET /vm`.
static PROGRESS: Mutex<Option<migrate::Progress>> = Mutex::new(None);

/// The running migration's progress, if one runs.
pub fn progress() -> Option<serde_json::Value> {
    PROGRESS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .and_then(|p| serde_json::to_value(p).ok())
}

fn set_progress(p: Option<migrate::Progress>) {
    *PROGRESS.lock().unwrap_or_else(PoisonError::into_inner) = p;
}

/// Pauses the VM for a share of every [`THROTTLE_PERIOD`] until dropped.
struct Throttle {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Throttle {
    fn start(control: Arc<Control>, percent: u8) -> Option<Throttle> {
        let percent = u32::from(percent.min(99));
        let paused = THROTTLE_PERIOD * percent / 100;
        let running = THROTTLE_PERIOD - paused;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("throttle".into())
            .spawn(move || {
                while !stop2.load(Ordering::Acquire) {
                    std::thread::sleep(running);
                    if stop2.load(Ordering::Acquire) || control.pause(PAUSE_TIMEOUT).is_err() {
                        break;
                    }
                    std::thread::sleep(paused);
                    if control.resume().is_err() {
                        break;
                    }
                }
            })
            .ok()?;
        Some(Throttle {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Throttle {
    /// Returns once the throttle thread ended with the VM running.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The sending side's view of a running VM.
struct Source<'a> {
    parts: &'a VmParts,
    /// The VM was paused through the API before the migration: never run it.
    was_paused: bool,
    throttle: Mutex<Option<Throttle>>,
}

impl Source<'_> {
    fn stop_throttle(&self) {
        drop(
            self.throttle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
    }

    /// Pages written through guest memory (devices, emu's vCPUs) since the last call.
    fn memory_dirty_pages(&self, out: &mut Vec<u64>) {
        for region in self.parts.memory.iter() {
            let first = region.start_addr().0 / hv::PAGE_SIZE;
            for (word_index, word) in
                (0u64..).zip(std::ops::Deref::deref(region).bitmap().get_and_reset())
            {
                let mut bits = word;
                while bits != 0 {
                    let bit = u64::from(bits.trailing_zeros());
                    out.push(first + word_index * 64 + bit);
                    bits &= bits - 1;
                }
            }
        }
    }
}

impl migrate::SourceVm for Source<'_> {
    fn memory(&self) -> &hv::GuestMemory {
        &self.parts.memory
    }

    fn describe(&self) -> serde_json::Value {
        crate::snapshot::header_of(self.parts)
            .and_then(|h| serde_json::to_value(h).map_err(|e| e.to_string()))
            .unwrap_or(serde_json::Value::Null)
    }

    fn set_dirty_tracking(&self, on: bool) -> std::result::Result<(), String> {
        self.parts
            .vm
            .set_dirty_tracking(on)
            .map_err(|e| crate::error::report(&e))?;
        if on {
            // Start from a clean slate: everything is sent in the first round anyway.
            let _ = self.parts.vm.take_dirty_log();
            self.memory_dirty_pages(&mut Vec::new());
        }
        Ok(())
    }

    fn take_dirty_pages(&self) -> std::result::Result<Vec<u64>, String> {
        let mut pages = self
            .parts
            .vm
            .take_dirty_log()
            .map_err(|e| crate::error::report(&e))?;
        self.memory_dirty_pages(&mut pages);
        Ok(pages)
    }

    fn throttle(&self, percent: u8) {
        self.stop_throttle();
        if percent > 0 && !self.was_paused {
            *self.throttle.lock().unwrap_or_else(PoisonError::into_inner) =
                Throttle::start(self.parts.control.clone(), percent);
        }
    }

    fn pause(&self) -> std::result::Result<(), String> {
        self.stop_throttle();
        self.parts.pause().map_err(|e| e.message)
    }

    fn resume(&self) -> std::result::Result<(), String> {
        self.stop_throttle();
        if self.was_paused {
            return Ok(());
        }
        self.parts.resume().map_err(|e| e.message)
    }

    fn final_state(&self) -> std::result::Result<Vec<u8>, String> {
        let saved = crate::snapshot::capture(
            self.parts,
            RunState {
                paused: self.was_paused,
            },
        )?;
        serde_json::to_vec(&saved).map_err(|e| format!("cannot encode the final state: {e}"))
    }
}

/// Writes progress lines on stderr when it is a terminal.
fn progress_reporter() -> migrate::ProgressFn {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    Box::new(move |p: &migrate::Progress| {
        if tty {
            eprintln!(
                "anyvisor: migration round {}: {} MiB sent, {} pages remaining, {} pages/s dirtied, expected downtime {} ms",
                p.round,
                p.bytes_sent >> 20,
                p.remaining_pages,
                p.dirty_rate,
                p.expected_downtime_ms
            );
        }
        set_progress(Some(p.clone()));
    })
}

/// `PUT /vm/migrate`: returns `{"total_ms":..,"downtime_ms":..,"bytes":..}`.
pub fn send(vm: &VmParts, req: MigrateRequest) -> std::result::Result<serde_json::Value, ApiError> {
    let _busy = crate::snapshot::exclusive()?;
    let addr: Address = req
        .to
        .parse()
        .map_err(|e: migrate::Error| ApiError::new(400, e.to_string()))?;
    let key = req
        .migration_key_file
        .as_deref()
        .map(Key::from_file)
        .transpose()
        .map_err(|e| ApiError::new(400, e.to_string()))?;
    if matches!(addr, Address::Tcp(_)) && key.is_none() {
        return Err(ApiError::new(
            400,
            "a tcp migration requires --migration-key",
        ));
    }
    let mut opts = SendOptions {
        progress: Some(progress_reporter()),
        ..SendOptions::default()
    };
    if let Some(ms) = req.max_downtime_ms {
        opts.max_downtime_ms = ms;
    }
    let source = Source {
        parts: vm,
        was_paused: vm.is_paused(),
        throttle: Mutex::new(None),
    };
    let result = migrate::send(&addr, key.as_ref(), &source, opts);
    source.stop_throttle();
    set_progress(None);
    match result {
        Ok(outcome) => {
            vm.hand_off();
            Ok(serde_json::json!({
                "total_ms": outcome.total_ms,
                "downtime_ms": outcome.downtime_ms,
                "bytes": outcome.bytes,
            }))
        }
        Err(e) => Err(ApiError::new(
            500,
            format!("migration failed: {}", crate::error::report(&e)),
        )),
    }
}

/// The destination VM between `prepare` and the final state: its memory and backend.
struct Incoming {
    memory: hv::GuestMemory,
    backend: Backend,
    header: Header,
}

impl migrate::DestinationVm for Incoming {
    fn memory(&self) -> &hv::GuestMemory {
        &self.memory
    }
}

/// Checks a source's description against this host and builds zero-filled guest memory for it.
fn prepare(description: &serde_json::Value, runtime: &RuntimeOptions) -> Result<Incoming> {
    let header = Header::deserialize(description)
        .map_err(|e| Error::Setup(format!("malformed VM description: {e}")))?;
    let config = crate::snapshot::config_of(&header, runtime)?;
    for disk in &config.disks {
        std::fs::metadata(&disk.path).map_err(|source| Error::ReadFile {
            path: disk.path.clone(),
            source,
        })?;
    }
    let backend = crate::snapshot::open_backend(&header, runtime)?;
    let memory = machine::memory::create_guest_memory(header.memory_size())
        .map_err(|e| Error::Setup(format!("cannot create guest memory: {e}")))?;
    if snapshot::memory_regions_of(&memory) != header.memory_regions {
        return Err(Error::Setup(
            "the source's memory layout is not one this VMM builds".into(),
        ));
    }
    Ok(Incoming {
        memory,
        backend,
        header,
    })
}

fn usage(e: migrate::Error) -> Error {
    Error::Usage(crate::error::report(&e))
}

/// `anyvisor run --incoming ADDR`: waits for one migration and returns the arrived VM.
///
/// A migration that fails before the VM runs here (wrong key, refused, stream broken) is
/// reported on stderr and the next one is awaited.
pub fn receive(from: &str, key: Option<&Path>, runtime: &RuntimeOptions) -> Result<Vmm> {
    let addr: Address = from.parse().map_err(usage)?;
    let key = key.map(Key::from_file).transpose().map_err(usage)?;
    if matches!(addr, Address::Tcp(_)) && key.is_none() {
        return Err(Error::Usage(
            "--incoming tcp: requires --migration-key".into(),
        ));
    }
    let listener = Listener::bind(&addr, key.as_ref()).map_err(usage)?;
    let shown = listener
        .local_address()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| from.to_string());
    eprintln!("anyvisor: waiting for a migration on {shown}");
    loop {
        let arrived = migrate::receive(&listener, key.as_ref(), |d| {
            prepare(d, runtime).map_err(|e| crate::error::report(&e))
        });
        let arrived = match arrived {
            Ok(a) => a,
            Err(e) => {
                hv::rate_limited!(eprintln!(
                    "anyvisor: incoming migration failed: {}; waiting for another",
                    crate::error::report(&e)
                ));
                continue;
            }
        };
        let migrate::Arrived {
            vm: incoming,
            state,
            confirmation,
            ..
        } = arrived;
        let started = start_arrived(incoming, &state, runtime);
        match started {
            Ok(vmm) => {
                if let Err(e) = confirmation.resumed() {
                    // The source may resume its copy: never run the VM twice.
                    vmm.parts()
                        .control
                        .request_stop(crate::control::Stop::Internal(format!(
                            "cannot confirm the migration: {}",
                            crate::error::report(&e)
                        )));
                }
                return Ok(vmm);
            }
            Err(e) => {
                let reason = crate::error::report(&e);
                hv::rate_limited!(eprintln!(
                    "anyvisor: cannot start the arrived VM: {reason}; waiting for another"
                ));
                confirmation.abort(&reason);
            }
        }
    }
}

fn start_arrived(incoming: Incoming, state: &[u8], runtime: &RuntimeOptions) -> Result<Vmm> {
    let saved: SavedVm = serde_json::from_slice(state)
        .map_err(|e| Error::Setup(format!("malformed final state: {e}")))?;
    if saved.header.cpu_model != incoming.header.cpu_model
        || saved.header.memory_regions != incoming.header.memory_regions
    {
        return Err(Error::Setup(
            "the final state does not match the description".into(),
        ));
    }
    for (id, s) in saved.vcpus.iter().enumerate() {
        s.validate()
            .map_err(|e| Error::Setup(format!("invalid state of vcpu {id}: {e}")))?;
    }
    crate::snapshot::check_states(incoming.backend.hypervisor.kind(), &saved.vcpus)?;
    let parts = crate::snapshot::rebuild(saved, incoming.memory, incoming.backend, runtime)?;
    let vmm = Vmm::launch(parts)?;
    crate::snapshot::settle(&vmm);
    Ok(vmm)
}
