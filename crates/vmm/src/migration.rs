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
//!   then builds the VM exactly like `--restore` ([`crate::snapshot::start_saved`], the one VM
//!   builder [`crate::builder`]), launches it and confirms.

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
use crate::error::{Error, Result, report};
use crate::snapshot::SavedVm;
use crate::vm::{VmParts, Vmm};

/// One `anyvisor: ...` line on stderr (so that `hv::rate_limited!`'s count line gets the
/// prefix too).
macro_rules! note {
    ($($arg:tt)*) => {
        tracing::warn!(target: hv::NOTICE, "anyvisor: {}", format_args!($($arg)*))
    };
}

/// How long pausing for the final round may take.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a waiting receiver looks for a termination signal.
const SIGNAL_POLL: Duration = Duration::from_millis(100);
/// One throttle cycle: the VM runs `100 - percent` % of it and is paused for the rest.
const THROTTLE_PERIOD: Duration = Duration::from_millis(100);

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
            let words = std::ops::Deref::deref(region).bitmap().get_and_reset();
            out.extend(hv::dirty::dirty_pages(first, &words));
        }
    }
}

impl migrate::SourceVm for Source<'_> {
    fn memory(&self) -> &hv::GuestMemory {
        &self.parts.memory
    }

    fn describe(&self) -> serde_json::Value {
        crate::snapshot::header_of(self.parts)
            .ok()
            .and_then(|h| serde_json::to_value(h).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    fn set_dirty_tracking(&self, on: bool) -> std::result::Result<(), migrate::VmError> {
        self.parts.vm.set_dirty_tracking(on)?;
        if on {
            // Start from a clean slate: everything is sent in the first round anyway.
            let _ = self.parts.vm.take_dirty_log();
            self.memory_dirty_pages(&mut Vec::new());
        }
        Ok(())
    }

    fn take_dirty_pages(&self) -> std::result::Result<Vec<u64>, migrate::VmError> {
        let mut pages = self.parts.vm.take_dirty_log()?;
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

    fn pause(&self) -> std::result::Result<(), migrate::VmError> {
        self.stop_throttle();
        Ok(self.parts.pause().map_err(|e| e.message)?)
    }

    fn resume(&self) -> std::result::Result<(), migrate::VmError> {
        self.stop_throttle();
        if self.was_paused {
            return Ok(());
        }
        Ok(self.parts.resume().map_err(|e| e.message)?)
    }

    fn final_state(&self) -> std::result::Result<Vec<u8>, migrate::VmError> {
        let saved = crate::snapshot::capture(self.parts, self.was_paused)?;
        Ok(serde_json::to_vec(&saved)?)
    }
}

/// Writes progress lines on stderr when it is a terminal, and keeps the latest in `latest`
/// (the VM's, for `GET /vm`).
fn progress_reporter(latest: Arc<Mutex<Option<migrate::Progress>>>) -> migrate::ProgressFn {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    Box::new(move |p: &migrate::Progress| {
        if tty {
            tracing::info!(target: hv::NOTICE,
                "anyvisor: migration round {}: {} MiB sent, {} pages remaining, {} pages/s dirtied, expected downtime {} ms",
                p.round,
                p.bytes_sent >> 20,
                p.remaining_pages,
                p.dirty_rate,
                p.expected_downtime_ms
            );
        }
        *latest.lock().unwrap_or_else(PoisonError::into_inner) = Some(p.clone());
    })
}

/// `PUT /vm/migrate`: returns `{"total_ms":..,"downtime_ms":..,"bytes":..}`.
pub fn send(vm: &VmParts, req: MigrateRequest) -> std::result::Result<serde_json::Value, ApiError> {
    let _busy = crate::snapshot::exclusive(vm)?;
    let addr: Address = req
        .to
        .parse()
        .map_err(|e: migrate::Error| ApiError::new(400, e.to_string()))?;
    let key = req
        .migration_key_file
        .as_deref()
        .map(Key::from_file)
        .transpose()
        .map_err(|e| ApiError::new(400, report(&e)))?;
    if matches!(addr, Address::Tcp(_)) && key.is_none() {
        return Err(ApiError::new(
            400,
            "a tcp migration requires --migration-key",
        ));
    }
    let mut opts = SendOptions {
        progress: Some(progress_reporter(vm.migration_progress.clone())),
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
    // The stream runs on a thread of its own under the Migration filter (stacked on this
    // thread's Api filter): everything it needs is at hand (address parsed, key read).
    let seccomp = vm.config.seccomp;
    let result = std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("migrate-out".into())
            .spawn_scoped(scope, || {
                sandbox::install(sandbox::ThreadRole::Migration, seccomp)
                    .map_err(SendError::Sandbox)?;
                let result = migrate::send(&addr, key.as_ref(), &source, opts);
                source.stop_throttle();
                result.map_err(SendError::Stream)
            })
            .map_err(SendError::Spawn)?;
        thread.join().map_err(|_| SendError::Panicked)?
    });
    source.stop_throttle();
    *vm.migration_progress
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = None;
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
            format!("migration failed: {}", report(&e)),
        )),
    }
}

/// Why an outgoing migration failed.
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("cannot sandbox the migration thread")]
    Sandbox(#[source] sandbox::Error),
    #[error("cannot start the migration thread")]
    Spawn(#[source] std::io::Error),
    #[error("the migration thread panicked")]
    Panicked,
    #[error(transparent)]
    Stream(migrate::Error),
}

/// Why an incoming migration attempt failed: logged while the next one is awaited, and the
/// reason the source is given when the VM cannot start here.
#[derive(Debug, thiserror::Error)]
enum IncomingError {
    #[error("malformed VM description")]
    Malformed(#[source] serde_json::Error),
    /// The description is beyond a snapshot header's limits (the header's check gives text).
    #[error("invalid VM description: {0}")]
    Invalid(String),
    #[error("the main thread is gone")]
    MainGone,
    /// Building memory and the backend for the description failed.
    #[error(transparent)]
    Prepare(Error),
    #[error("cannot start the arrived VM")]
    Start(#[source] Error),
    #[error(transparent)]
    Stream(migrate::Error),
    #[error("the migration thread panicked")]
    Panicked,
    #[error("the migration thread ended without a VM")]
    NoVm,
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

/// The source's description, checked against the limits of a snapshot file's header before
/// anything is built for it.
fn parse_description(
    description: &serde_json::Value,
) -> std::result::Result<Header, IncomingError> {
    let header = Header::deserialize(description).map_err(IncomingError::Malformed)?;
    header.validate().map_err(IncomingError::Invalid)?;
    Ok(header)
}

/// Builds, for a source's description (parsed on the migration thread), zero-filled guest
/// memory and the backend, after checking the description against this host.
fn prepare(header: Header, runtime: &RuntimeOptions) -> Result<Incoming> {
    let config = crate::snapshot::config_of(&header, runtime, None)?;
    for disk in &config.disks {
        std::fs::metadata(&disk.path).map_err(|source| Error::ReadFile {
            path: disk.path.clone(),
            source,
        })?;
    }
    let backend = crate::snapshot::open_backend(&header, runtime)?;
    let memory = crate::builder::create_memory(header.memory_size())?;
    if snapshot::memory_regions_of(&memory) != header.memory_regions {
        return Err(crate::builder::BuildError::SourceLayout.into());
    }
    Ok(Incoming {
        memory,
        backend,
        header,
    })
}

/// See [`Key::exposure_warning`] (for the CLI, which does not depend on `migrate`).
pub fn key_exposure_warning(path: &Path) -> Option<String> {
    Key::exposure_warning(path)
}

/// `anyvisor run --incoming ADDR`: waits for one migration and returns the arrived VM.
///
/// A migration that fails before the VM runs here (wrong key, refused, stream broken) is
/// reported on stderr and the next one is awaited.
pub fn receive(from: &str, key: Option<&Path>, runtime: &RuntimeOptions) -> Result<Vmm> {
    let addr: Address = from.parse().map_err(Error::Incoming)?;
    if let Some(w) = key.and_then(Key::exposure_warning) {
        tracing::warn!(target: hv::NOTICE, "warning: {w}");
    }
    let key = key
        .map(Key::from_file)
        .transpose()
        .map_err(Error::Incoming)?;
    if matches!(addr, Address::Tcp(_)) && key.is_none() {
        return Err(Error::Usage(
            "--incoming tcp: requires --migration-key".into(),
        ));
    }
    let listener = Listener::bind(&addr, key.as_ref()).map_err(Error::Incoming)?;
    let shown = listener
        .local_address()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| from.to_string());
    // A termination signal ends the wait with its `error:` line (the receiver thread is told
    // to stop; [`receive_one`] polls for the signal).
    crate::exit::install_signal_handlers().map_err(|source| Error::Io {
        op: "cannot install signal handlers",
        source,
    })?;
    tracing::info!(target: hv::NOTICE, "anyvisor: waiting for a migration on {shown}");
    loop {
        match receive_one(&listener, key.as_ref(), runtime)? {
            Attempt::Arrived(vmm) => return Ok(vmm),
            Attempt::Failed(reason) => {
                hv::rate_limited!(note!(
                    "incoming migration failed: {}; waiting for another",
                    report(&reason)
                ));
            }
        }
    }
}

/// What the incoming migration thread asks the main thread to do.
enum Request {
    /// Check this description and build guest memory and the backend for it.
    Prepare(Header),
    /// The VM arrived: start it (the answer says whether it runs).
    Start(Incoming, Vec<u8>),
}

enum Attempt {
    Arrived(Vmm),
    Failed(IncomingError),
}

/// How the incoming migration thread ended.
enum ThreadEnd {
    /// The source was told the VM runs here.
    Confirmed,
    /// The VM runs here but the source may not have heard it.
    Unconfirmed(IncomingError),
    /// Nothing runs here.
    Failed(IncomingError),
}

/// One incoming migration. The untrusted stream is handled by a thread of its own under the
/// [`sandbox::ThreadRole::IncomingMigration`] filter (no files, no KVM, no threads); this
/// thread does what needs more on its request: build the VM for the description (after
/// the migration thread parsed it) and start the VM that arrived. Only a failure to start
/// the thread or sandbox it is an error; any other failure is an [`Attempt::Failed`].
fn receive_one(
    listener: &Listener,
    key: Option<&Key>,
    runtime: &RuntimeOptions,
) -> Result<Attempt> {
    let (to_main, requests) = std::sync::mpsc::channel::<Request>();
    let (prepared_tx, prepared) =
        std::sync::mpsc::channel::<std::result::Result<Incoming, IncomingError>>();
    let (verdict_tx, verdict) =
        std::sync::mpsc::channel::<std::result::Result<(), IncomingError>>();
    // The thread handles the untrusted stream before anything says which mode the VM ran
    // with: `--seccomp`, else the default.
    let seccomp = runtime.seccomp.unwrap_or_default();
    let stop = AtomicBool::new(false);
    let stop = &stop;
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("migrate-in".into())
            .spawn_scoped(scope, move || -> std::result::Result<ThreadEnd, Error> {
                sandbox::install(sandbox::ThreadRole::IncomingMigration, seccomp)
                    .map_err(|e| Error::setup("cannot sandbox the migration thread", e))?;
                let waiting = migrate::Waiting {
                    stop: &|| stop.load(Ordering::Acquire),
                    rejected: &|why| {
                        hv::rate_limited!(note!("migration listener: {why}"));
                    },
                };
                let arrived = migrate::receive_with(listener, key, &waiting, |description| {
                    let header = parse_description(description)?;
                    to_main
                        .send(Request::Prepare(header))
                        .map_err(|_| IncomingError::MainGone)?;
                    prepared.recv().map_err(|_| IncomingError::MainGone)?
                });
                let migrate::Arrived {
                    vm,
                    state,
                    confirmation,
                    ..
                } = match arrived {
                    Ok(a) => a,
                    Err(e) => return Ok(ThreadEnd::Failed(IncomingError::Stream(e))),
                };
                if to_main.send(Request::Start(vm, state)).is_err() {
                    return Ok(ThreadEnd::Failed(IncomingError::MainGone));
                }
                Ok(match verdict.recv() {
                    Ok(Ok(())) => match confirmation.resumed() {
                        Ok(()) => ThreadEnd::Confirmed,
                        Err(e) => ThreadEnd::Unconfirmed(IncomingError::Stream(e)),
                    },
                    Ok(Err(reason)) => {
                        confirmation.abort(&report(&reason));
                        ThreadEnd::Failed(reason)
                    }
                    Err(_) => ThreadEnd::Failed(IncomingError::MainGone),
                })
            })
            .map_err(|e| Error::setup("cannot start the migration thread", e))?;
        // Serve the thread's requests until it ends (its sender is dropped then), and pass a
        // termination signal on to it.
        let mut started = None;
        let mut signal = None;
        loop {
            let request = match requests.recv_timeout(SIGNAL_POLL) {
                Ok(r) => r,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(num) = crate::exit::take_signal() {
                        signal.get_or_insert(num);
                        stop.store(true, Ordering::Release);
                    }
                    continue;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            };
            match request {
                Request::Prepare(header) => {
                    let _ =
                        prepared_tx.send(prepare(header, runtime).map_err(IncomingError::Prepare));
                }
                Request::Start(incoming, state) => match start_arrived(incoming, &state, runtime) {
                    Ok(vmm) => {
                        started = Some(vmm);
                        let _ = verdict_tx.send(Ok(()));
                    }
                    Err(e) => {
                        let _ = verdict_tx.send(Err(IncomingError::Start(e)));
                    }
                },
            }
        }
        let end = thread
            .join()
            .unwrap_or_else(|_| Ok(ThreadEnd::Failed(IncomingError::Panicked)))?;
        let signal = signal.or_else(crate::exit::take_signal);
        Ok(match (end, started) {
            (ThreadEnd::Confirmed, Some(vmm)) => {
                // It runs here now: a signal is the running VM's, handled as for any
                // ([`Vmm::wait`]: SIGTERM presses the power button, the others stop it).
                if let Some(num) = signal {
                    crate::exit::requeue_signal(num);
                }
                Attempt::Arrived(vmm)
            }
            (ThreadEnd::Unconfirmed(e) | ThreadEnd::Failed(e), Some(vmm)) => {
                // The source may resume its copy: never run the VM twice.
                vmm.parts()
                    .control
                    .request_stop(crate::control::Stop::Internal(format!(
                        "cannot confirm the migration: {}",
                        report(&e)
                    )));
                Attempt::Arrived(vmm)
            }
            // Nothing runs here: a signal ends the wait.
            (end, None) => match (signal, end) {
                (Some(num), _) => return Err(Error::Signal(crate::exit::signal_name(num))),
                (None, ThreadEnd::Failed(reason)) => Attempt::Failed(reason),
                (None, _) => Attempt::Failed(IncomingError::NoVm),
            },
        })
    })
}

/// Starts the VM whose final state arrived, through the same builder as `--restore`.
fn start_arrived(incoming: Incoming, state: &[u8], runtime: &RuntimeOptions) -> Result<Vmm> {
    let saved: SavedVm = serde_json::from_slice(state).map_err(ArrivalError::Malformed)?;
    if saved.header.cpu_model != incoming.header.cpu_model
        || saved.header.memory_regions != incoming.header.memory_regions
    {
        return Err(ArrivalError::NotDescribed.into());
    }
    for (id, s) in saved.vcpus.iter().enumerate() {
        s.validate()
            .map_err(|reason| ArrivalError::InvalidVcpu { id, reason })?;
    }
    crate::snapshot::check_states(incoming.backend.hypervisor.kind(), &saved.vcpus)?;
    crate::snapshot::start_saved(saved, incoming.memory, incoming.backend, runtime)
}

/// Why an arrived final state cannot be started.
#[derive(Debug, thiserror::Error)]
pub enum ArrivalError {
    #[error("malformed final state")]
    Malformed(#[source] serde_json::Error),
    #[error("the final state does not match the description")]
    NotDescribed,
    #[error("invalid state of vcpu {id}: {reason}")]
    InvalidVcpu { id: usize, reason: String },
}

impl From<ArrivalError> for Error {
    fn from(e: ArrivalError) -> Self {
        Error::Build(crate::builder::BuildError::Arrival(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn description(vcpus: u32, regions: &[(u64, u64)]) -> serde_json::Value {
        let header = Header {
            cpu_model: hv::CpuModel::portable(),
            memory_regions: regions
                .iter()
                .map(|&(guest_addr, len)| snapshot::MemoryRegion { guest_addr, len })
                .collect(),
            vcpus,
            backend: hv::BackendKind::Emu,
            tsc_khz: 1_000_000,
            created_unix: 0,
            config: serde_json::Value::Null,
            user_extra: Default::default(),
        };
        serde_json::to_value(header).unwrap()
    }

    #[test]
    fn a_description_beyond_the_limits_is_refused_before_anything_is_built() {
        assert!(parse_description(&description(2, &[(0, 256 << 20)])).is_ok());
        let cases = [
            ("no vcpus", description(0, &[(0, 1 << 20)])),
            ("a million vcpus", description(1_000_000, &[(0, 1 << 20)])),
            ("no memory", description(1, &[])),
            ("2 TiB", description(1, &[(0, 2 << 40)])),
            ("8 EiB", description(1, &[(0, 1 << 62), (1 << 62, 1 << 62)])),
            (
                "a region that wraps",
                description(1, &[(u64::MAX - 4095, 8192)]),
            ),
            ("overlapping", description(1, &[(0, 8192), (4096, 4096)])),
            (
                "65 regions",
                description(1, &(0..65).map(|i| (i << 20, 4096)).collect::<Vec<_>>()),
            ),
            ("not a header", serde_json::json!({"vcpus": 1})),
        ];
        for (what, d) in cases {
            let e = parse_description(&d).expect_err(what).to_string();
            assert!(
                e.starts_with("invalid VM description") || e.starts_with("malformed"),
                "{what}: {e}"
            );
        }
    }
}
