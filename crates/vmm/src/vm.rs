//! A running VM: boot sequence, vCPU threads, and the API's view of it.
//!
//! Boot ([`Vmm::start`]):
//! 1. check the kernel and initrd files, open the serial output;
//! 2. open the backend and settle the CPU model ([`crate::backend::open`]);
//! 3. create guest RAM ([`crate::builder::create_memory`]);
//! 4. assemble the VM on it with the builder shared with restore and incoming migration
//!    ([`crate::builder::assemble`]: VM, platform, virtio devices, kernel loaded, vCPUs);
//! 5. [`Vmm::launch`]: listen on the API socket, forward stdin to the serial port, start the
//!    device workers and one thread per vCPU.
//!
//! [`Vmm::wait`] then blocks until the guest powers off or resets, a vCPU fails, or the API asks
//! to stop, stops every vCPU through its kicker and returns the [`ExitReason`].

use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use hv::{BackendKind, CpuModel, GuestMemory, Vcpu, VcpuExit};
use machine::Platform;
use sandbox::{SeccompMode, ThreadRole};

use crate::api::{
    ApiError, ApiServer, MigrateRequest, ShutdownRequest, SnapshotRequest, VmControl,
};
use crate::config::{MIB, SerialConfig, VmConfig};
use crate::control::{Control, PauseError, ShutdownBy, Stop};
use crate::error::{Error, Result};

/// How long a pause may take to park every vCPU.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the main thread looks for a termination signal.
const SIGNAL_POLL: Duration = Duration::from_millis(100);
/// How long vCPU threads get to return once stopped.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guest has to power off after SIGTERM pressed its power button.
pub const SIGTERM_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// How a VM ended without an error. Every reason exits 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    PowerOff,
    Reset,
    /// Every vCPU halted with interrupts off.
    Halted,
    /// Stopped through the API.
    Shutdown,
    /// The user typed the console's quit escape.
    Quit,
    /// Handed off by a snapshot `--stop` or a migration.
    HandedOff,
}

impl ExitReason {
    pub fn exit_code(self) -> u8 {
        crate::error::EXIT_OK
    }
}

/// One vCPU; its thread holds the lock while the vCPU runs, so whoever holds it with the VM
/// paused has the vCPU on an instruction boundary.
pub type SharedVcpu = Arc<Mutex<Box<dyn Vcpu>>>;

/// Everything about a running VM that the API, snapshots and migration need.
pub struct VmParts {
    pub config: VmConfig,
    pub backend: BackendKind,
    pub cpu_model: CpuModel,
    pub memory: Arc<GuestMemory>,
    pub vm: Arc<dyn hv::Vm>,
    pub platform: Arc<Platform>,
    /// Virtio devices in slot order.
    pub virtio: Vec<crate::devices::VirtioSlotDevice>,
    pub vcpus: Vec<SharedVcpu>,
    /// Pause, resume and stop; the platform's power events land here.
    pub control: Arc<Control>,
    /// Held by the snapshot or migration in progress: one at a time.
    pub(crate) busy: Mutex<()>,
    /// The latest progress report of a running outgoing migration, for `GET /vm`.
    pub(crate) migration_progress: Arc<Mutex<Option<migrate::Progress>>>,
    /// The boot entry of the disk this VM booted from, if it booted one (`GET /vm`).
    pub(crate) boot_entry: Option<String>,
    /// How long this VM's `--restore` took, from opening the file to the vCPU threads started,
    /// for `GET /vm`; unset for a VM that was not restored.
    pub(crate) restore_time: OnceLock<Duration>,
}

impl VmParts {
    /// The parts of a VM the builder assembled ([`crate::builder::assemble`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        config: VmConfig,
        backend: BackendKind,
        cpu_model: CpuModel,
        memory: Arc<GuestMemory>,
        vm: Arc<dyn hv::Vm>,
        platform: Arc<Platform>,
        virtio: Vec<crate::devices::VirtioSlotDevice>,
        vcpus: Vec<SharedVcpu>,
        control: Arc<Control>,
    ) -> VmParts {
        VmParts {
            config,
            backend,
            cpu_model,
            memory,
            vm,
            platform,
            virtio,
            vcpus,
            control,
            busy: Mutex::new(()),
            migration_progress: Arc::new(Mutex::new(None)),
            restore_time: OnceLock::new(),
            boot_entry: None,
        }
    }

    /// The running outgoing migration's progress, if one runs.
    fn migration_progress(&self) -> Option<serde_json::Value> {
        self.migration_progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .and_then(|p| serde_json::to_value(p).ok())
    }

    /// [`VmParts::restore_time`] in milliseconds.
    fn restore_ms(&self) -> Option<f64> {
        self.restore_time.get().map(|d| d.as_secs_f64() * 1000.0)
    }

    pub fn is_paused(&self) -> bool {
        self.control.is_paused()
    }

    /// Parks every vCPU on an instruction boundary, then stops the devices' queue processing:
    /// afterwards neither vCPUs nor devices change guest memory or device state, so both can
    /// be saved (and the dirty log read for the last time).
    pub fn pause(&self) -> std::result::Result<(), ApiError> {
        self.control.pause(PAUSE_TIMEOUT).map_err(pause_error)?;
        crate::devices::pause(&self.virtio);
        Ok(())
    }

    pub fn resume(&self) -> std::result::Result<(), ApiError> {
        crate::devices::resume(&self.virtio);
        self.control.resume().map_err(pause_error)
    }

    /// Ends the VM process with exit status 0 (after a snapshot `--stop` or a migration).
    pub fn hand_off(&self) {
        self.control.request_stop(Stop::HandedOff);
    }
}

fn pause_error(e: PauseError) -> ApiError {
    match e {
        PauseError::Stopping => ApiError::new(409, "the vm is stopping"),
        PauseError::Timeout => ApiError::new(500, "vcpus did not stop in time"),
        PauseError::Paused => ApiError::new(
            409,
            "the vm is paused and cannot react to the power button: resume it first, or force",
        ),
    }
}

impl VmControl for VmParts {
    fn info(&self) -> serde_json::Value {
        let counters =
            serde_json::to_value(self.platform.counters()).unwrap_or(serde_json::Value::Null);
        serde_json::json!({
            "state": if self.is_paused() { "paused" } else { "running" },
            "backend": self.backend.name(),
            "cpu_model": self.cpu_model.name,
            "cpus": self.config.cpus,
            "memory_mib": self.config.memory / MIB,
            "devices": self.devices(),
            "counters": counters,
            "migration": self.migration_progress(),
            "restore_ms": self.restore_ms(),
            "boot_entry": self.boot_entry,
        })
    }

    fn pause(&self) -> std::result::Result<(), ApiError> {
        VmParts::pause(self)
    }

    fn resume(&self) -> std::result::Result<(), ApiError> {
        VmParts::resume(self)
    }

    fn shutdown(&self, req: ShutdownRequest) -> std::result::Result<(), ApiError> {
        if req.force {
            // Pulling the plug; the process exits 0.
            self.control.request_stop(Stop::Shutdown);
            return Ok(());
        }
        // The ACPI power button; the main thread stops the VM if the guest has not powered
        // off by the deadline ([`Vmm::wait`]).
        let timeout =
            Duration::from_secs(req.timeout.unwrap_or(crate::api::SHUTDOWN_TIMEOUT_DEFAULT));
        self.control
            .press_power_button(timeout, ShutdownBy::Api)
            .map_err(pause_error)
    }

    fn snapshot(&self, req: SnapshotRequest) -> std::result::Result<(), ApiError> {
        crate::snapshot::take(self, req, &|| None)
    }

    fn snapshot_cancellable(
        &self,
        req: SnapshotRequest,
        cancelled: crate::api::Cancelled<'_>,
    ) -> std::result::Result<(), ApiError> {
        crate::snapshot::take(self, req, cancelled)
    }

    fn migrate(&self, req: MigrateRequest) -> std::result::Result<serde_json::Value, ApiError> {
        crate::migration::send(self, req)
    }
}

impl VmParts {
    /// The guest-visible devices, for `GET /vm`.
    fn devices(&self) -> serde_json::Value {
        let serial = serde_json::json!({
            "type": "serial",
            "model": "16550",
            "port": "0x3f8",
            "irq": machine::layout::SERIAL_IRQ,
        });
        let list = std::iter::once(serial)
            .chain(self.virtio.iter().map(|d| d.info()))
            .collect();
        serde_json::Value::Array(list)
    }
}

/// Host stdin to the guest's UART.
struct SerialIn {
    platform: Arc<Platform>,
    control: Arc<Control>,
}

impl crate::serial::InputSink for SerialIn {
    fn input(&self, bytes: &[u8]) {
        self.platform.serial_input(bytes);
    }
    fn quit(&self) {
        self.control.request_stop(Stop::Quit);
    }
}

/// Refuses files that are neither a bzImage nor an ELF vmlinux, with a clear reason, before
/// anything is loaded.
fn check_kernel(path: &Path) -> Result<()> {
    let read_err = |source| Error::ReadFile {
        path: path.to_path_buf(),
        source,
    };
    // Never blocks on a FIFO; anything but a regular file is refused, saying what it is.
    let file = disk::open_regular(path).map_err(read_err)?;
    let mut head = Vec::with_capacity(1024);
    file.take(1024).read_to_end(&mut head).map_err(read_err)?;
    let elf = head.starts_with(b"\x7fELF");
    // Linux boot protocol: "HdrS" at offset 0x202 of a bzImage.
    let bzimage = head.get(0x202..0x206) == Some(b"HdrS");
    if !elf && !bzimage {
        return Err(Error::BadFile {
            path: path.to_path_buf(),
            reason: "not a Linux kernel (neither a bzImage nor an ELF vmlinux)".into(),
        });
    }
    Ok(())
}

fn check_readable(path: &Path) -> Result<()> {
    let read_err = |source| Error::ReadFile {
        path: path.to_path_buf(),
        source,
    };
    disk::open_regular(path).map_err(read_err)?;
    Ok(())
}

/// A VM that is running.
pub struct Vmm {
    parts: Arc<VmParts>,
    threads: Vec<JoinHandle<()>>,
    api: Option<ApiServer>,
    seccomp: SeccompMode,
}

impl Vmm {
    /// Boots `config` and starts its vCPUs.
    pub fn start(config: VmConfig) -> Result<Vmm> {
        Self::boot(config, None)
    }

    /// Boots `config` and starts its vCPUs; `boot_entry`: what [`crate::diskboot::prepare`]
    /// chose on the disk, for `GET /vm`.
    pub fn boot(config: VmConfig, boot_entry: Option<String>) -> Result<Vmm> {
        check_kernel(&config.kernel)?;
        if let Some(initrd) = &config.initrd {
            check_readable(initrd)?;
        }
        // Opened before the backend, so a bad --serial path fails fast.
        let serial_out = crate::serial::output(&config.serial)?;
        let backend = crate::backend::open(config.backend, config.cpu_model)?;
        let memory = Arc::new(crate::builder::create_memory(config.memory)?);
        let blueprint = crate::builder::Blueprint {
            cpu_model: backend.cpu_model.clone(),
            config,
            backend,
            memory,
            serial_out,
        };
        let mut parts = crate::builder::assemble(blueprint, crate::builder::Start::Boot)?;
        parts.boot_entry = boot_entry;
        crate::exit::stop_if_signalled()?;
        Self::launch(Arc::new(parts))
    }

    /// Starts the API, console input and vCPU threads of a VM whose parts are ready (booted,
    /// restored or received).
    ///
    /// Each thread installs its seccomp filter ([`sandbox`]) before it handles guest or client
    /// input; the main thread installs its own in [`Vmm::wait`].
    pub fn launch(parts: Arc<VmParts>) -> Result<Vmm> {
        let seccomp = parts.config.seccomp;
        if seccomp != SeccompMode::Off {
            prime_allocator();
        }
        // From here on a termination signal stops the VM in order ([`Vmm::wait`] polls for it);
        // before, it ends the process as usual, since there is nothing to undo.
        crate::exit::install_signal_handlers().map_err(|source| Error::Io {
            op: "cannot install signal handlers",
            source,
        })?;
        let api = match &parts.config.api_socket {
            Some(path) => Some(ApiServer::start(path, parts.clone(), seccomp)?),
            None => None,
        };
        if parts.config.serial == SerialConfig::Stdio {
            crate::serial::spawn_stdin_reader(
                Arc::new(SerialIn {
                    platform: parts.platform.clone(),
                    control: parts.control.clone(),
                }),
                seccomp,
            )?;
        }
        crate::devices::start_workers(&parts.virtio, parts.vm.as_ref(), seccomp)?;
        // A restored or arriving VM's devices start paused; a VM restored paused keeps them so
        // until the API resumes it.
        if !parts.is_paused() {
            crate::devices::resume(&parts.virtio);
        }
        let mut threads = Vec::with_capacity(parts.vcpus.len());
        for (id, vcpu) in (0u32..).zip(&parts.vcpus) {
            let vcpu = vcpu.clone();
            let platform = parts.platform.clone();
            let control = parts.control.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu_thread(id, &vcpu, &platform, &control, seccomp));
            match spawned {
                Ok(t) => threads.push(t),
                Err(source) => {
                    parts
                        .control
                        .request_stop(Stop::Internal("cannot start a vcpu thread".into()));
                    return Err(Error::Io {
                        op: "cannot start a vcpu thread",
                        source,
                    });
                }
            }
        }
        Ok(Vmm {
            parts,
            threads,
            api,
            seccomp,
        })
    }

    pub fn parts(&self) -> &Arc<VmParts> {
        &self.parts
    }

    /// Runs the VM to its end.
    ///
    /// Call it on the main thread once nothing else is left to set up: it installs the
    /// [`ThreadRole::Main`] filter first.
    pub fn wait(mut self) -> Result<ExitReason> {
        let control = self.parts.control.clone();
        if let Err(e) = sandbox::install(ThreadRole::Main, self.seccomp) {
            control.request_stop(Stop::Internal(crate::error::report(&e)));
        }
        let stop = loop {
            if let Some(stop) = control.wait_stop_timeout(SIGNAL_POLL) {
                break stop;
            }
            if let Some(num) = crate::exit::take_signal() {
                // The first SIGTERM asks the guest to power off (the power button); anything
                // else, or a SIGTERM while that runs or while the VM is paused, stops it now.
                let orderly = num == libc::SIGTERM
                    && !control.shutdown_pending()
                    && control
                        .press_power_button(SIGTERM_SHUTDOWN_TIMEOUT, ShutdownBy::Signal(num))
                        .is_ok();
                if !orderly {
                    control.request_stop(Stop::Signal(num));
                }
            }
            if let Some(stop) = control.shutdown_overdue() {
                control.request_stop(stop);
            }
        };
        if control.wait_exited(STOP_TIMEOUT) {
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
        // A vCPU thread that did not return is left behind; the process ends anyway.
        drop(self.api.take());
        // A guest whose kernel panicked resets (`panic=-1`), halts or triple-faults next: that
        // ending is the panic.
        if let (Stop::Reset | Stop::AllHalted | Stop::TripleFault { .. }, Some(what)) =
            (&stop, control.panicked())
        {
            return Err(Error::GuestPanic(what));
        }
        match stop {
            Stop::PowerOff => Ok(ExitReason::PowerOff),
            Stop::Reset => Ok(ExitReason::Reset),
            Stop::AllHalted => {
                tracing::info!(target: hv::NOTICE, "anyvisor: all vcpus halted");
                Ok(ExitReason::Halted)
            }
            Stop::Shutdown => Ok(ExitReason::Shutdown),
            Stop::Quit => Ok(ExitReason::Quit),
            Stop::HandedOff => Ok(ExitReason::HandedOff),
            Stop::TripleFault { .. } => Err(Error::TripleFault),
            Stop::VcpuFailed { vcpu, error } => Err(Error::Vcpu {
                id: vcpu,
                source: error,
            }),
            Stop::Signal(num) => Err(Error::Signal(crate::exit::signal_name(num))),
            Stop::Internal(msg) => Err(Error::Internal(msg)),
            Stop::ShutdownTimeout { secs, by } => Err(Error::ShutdownTimeout {
                secs,
                by: match by {
                    ShutdownBy::Api => "the shutdown request".into(),
                    ShutdownBy::Signal(num) => crate::exit::signal_name(num),
                },
            }),
        }
    }
}

/// More than glibc's 8 arenas before it computes its arena limit (64-bit `arena_test`).
const PRIME_ARENA_THREADS: usize = 12;

/// Makes glibc read `/proc/sys/vm/overcommit_memory` now, while no filter is installed.
///
/// The first time a thread arena's heap shrinks, glibc's `free` opens that file (once per
/// process, then it keeps the answer); on a filtered thread that `openat` would be killed. A
/// new thread gets its own arena: filling it past the trim threshold (128 KiB or more) with blocks
/// below the mmap threshold and freeing them shrinks its heap.
///
/// The same goes for the arena limit: when a thread needs a new arena and more than 8 exist,
/// glibc reads `/sys/devices/system/cpu/online` (once per process) to size the limit; a
/// filtered thread that first allocates (a virtio worker, an API connection) would be killed
/// for that `openat`. [`PRIME_ARENA_THREADS`] threads that allocate at the same time make glibc
/// create that many arenas now, and settle the limit.
fn prime_allocator() {
    let all_in = Arc::new(std::sync::Barrier::new(PRIME_ARENA_THREADS));
    let threads: Vec<_> = (0..PRIME_ARENA_THREADS)
        .filter_map(|_| {
            let all_in = all_in.clone();
            std::thread::Builder::new()
                .name("prime-arena".into())
                .spawn(move || {
                    // The first allocation picks (creates) this thread's arena; everyone waits
                    // until every thread has one, so none can reuse another's.
                    let block = std::hint::black_box(vec![1u8; 64]);
                    all_in.wait();
                    drop(block);
                })
                .ok()
        })
        .collect();
    if threads.len() == PRIME_ARENA_THREADS {
        for t in threads {
            let _ = t.join();
        }
    }
    // (If a thread could not start, the others wait forever at the barrier: leave them.)
    // The heap must shrink by more than glibc's trim threshold, which is not fixed: freeing a
    // large mapped block (an incoming migration's 4 MiB frames, say) raises it to twice that
    // block's size, up to 64 MiB. So: blocks below any mmap threshold (at least 128 KiB),
    // adding up to nearly a whole thread heap (64 MiB), allocated without being touched (no
    // resident memory beyond their headers). Without this, an arrived VM that left for another
    // host was killed at its exit, freeing its disk's buffers.
    let primed = std::thread::Builder::new()
        .name("prime-alloc".into())
        .spawn(|| {
            let blocks: Vec<Vec<u8>> = (0..600).map(|_| Vec::with_capacity(100 * 1024)).collect();
            drop(std::hint::black_box(blocks));
        });
    if let Ok(t) = primed {
        let _ = t.join();
    }
}

fn vcpu_thread(
    id: u32,
    vcpu: &Mutex<Box<dyn Vcpu>>,
    io: &Platform,
    control: &Control,
    seccomp: SeccompMode,
) {
    if let Err(e) = sandbox::install(ThreadRole::Vcpu, seccomp) {
        control.request_stop(Stop::Internal(crate::error::report(&e)));
        control.exited();
        return;
    }
    let body = std::panic::AssertUnwindSafe(|| {
        while control.before_run() {
            if id == 0 && control.take_button_press() {
                io.press_power_button();
            }
            let exit = vcpu.lock().unwrap_or_else(PoisonError::into_inner).run(io);
            match exit {
                Ok(VcpuExit::Interrupted) => {}
                Ok(VcpuExit::Halted) => control.halted(),
                Ok(VcpuExit::Shutdown) => control.request_stop(Stop::TripleFault { vcpu: id }),
                Err(error) => control.request_stop(Stop::VcpuFailed { vcpu: id, error }),
            }
        }
    });
    if std::panic::catch_unwind(body).is_err() {
        control.request_stop(Stop::Internal(format!("vcpu {id} thread panicked")));
    }
    control.exited();
}

/// Runs what `anyvisor run` was asked to, to its end. `boot_entry`: for a boot from a disk,
/// what [`crate::diskboot::prepare`] chose ([`crate::diskboot::Extracted::chosen`]).
pub fn run(request: crate::config::RunRequest, boot_entry: Option<String>) -> Result<ExitReason> {
    use crate::config::RunRequest;
    match request {
        RunRequest::Boot(config) => Vmm::boot(config, boot_entry)?.wait(),
        RunRequest::Restore {
            snapshot,
            runtime,
            verify,
        } => crate::snapshot::restore(&snapshot, &runtime, verify)?.wait(),
        RunRequest::Incoming {
            from,
            migration_key,
            runtime,
        } => crate::migration::receive(&from, migration_key.as_deref(), &runtime)?.wait(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_check() {
        let dir = std::env::temp_dir().join(format!("anyvisor-kcheck-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not = dir.join("not-a-kernel");
        std::fs::write(&not, b"hello").unwrap();
        let e = check_kernel(&not).unwrap_err();
        assert!(matches!(e, Error::BadFile { .. }));
        assert_eq!(e.exit_code(), crate::error::EXIT_USAGE);
        let elf = dir.join("elf");
        std::fs::write(&elf, b"\x7fELF\x02\x01\x01").unwrap();
        check_kernel(&elf).unwrap();
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let bzp = dir.join("bz");
        std::fs::write(&bzp, &bz).unwrap();
        check_kernel(&bzp).unwrap();
        assert!(matches!(
            check_kernel(&dir.join("missing")).unwrap_err(),
            Error::ReadFile { .. }
        ));
        // Not a regular file: refused saying what it is, without blocking on a FIFO.
        assert!(matches!(
            check_kernel(&dir).unwrap_err(),
            Error::ReadFile { .. }
        ));
        let e = crate::error::report(&check_readable(Path::new("/dev/zero")).unwrap_err());
        assert!(
            e.contains("is a character device, not a regular file"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
