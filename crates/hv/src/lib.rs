//! The hypervisor contract of anyvisor.
//!
//! Everything a backend (KVM, the `emu` software CPU, ...) must provide, and the hypervisor-neutral
//! state it converts to and from. Nothing here names a backend type: a [`CpuState`] saved under one
//! backend restores under any other.
//!
//! Shape:
//! * [`Hypervisor`] opens a backend and creates a [`Vm`] over a [`GuestMemory`].
//! * A [`Vm`] creates [`Vcpu`]s and delivers interrupts as x86 MSI messages ([`Vm::signal_msi`]).
//!   The platform's IOAPIC lives outside the backend (crate `machine`), so it is the same everywhere.
//!   Backends may also offer ioeventfds and irqfds on MSI routes ([`Vm::register_ioevent`],
//!   [`Vm::register_irqfd`]); callers fall back to the paths above when they answer
//!   [`Error::Unsupported`].
//! * [`Vcpu::run`] executes guest code until something needs the VMM. Port and MMIO accesses go
//!   through the [`DeviceIo`] callback handed to `run`, so a backend that emulates instructions
//!   (emu, or KVM completing an instruction its own emulator refused) calls devices directly.

// CPU state images (FXSAVE, XSAVE, LAPIC registers) come from snapshot files and migration
// streams: besides the workspace lints, no index may panic here either.
#![deny(clippy::indexing_slicing)]
// Integer casts say whether they can lose bits: `u64::from`, `try_from`, or an `#[allow]` with
// the reason the truncation is intended.
#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

pub mod bitmap;
pub mod cpu_model;
pub mod dirty;
pub mod ratelimit;
pub mod state;

use std::sync::Arc;

pub use bitmap::{DirtyBitmap, WriteWatch, unwatch_writes, watch_writes};
pub use cpu_model::{CpuModel, CpuidEntry};
pub use state::*;
/// The event counter the optional fast paths ([`Vm::register_ioevent`], [`Vm::register_irqfd`])
/// are built on: rust-vmm's, so devices and backends share one type.
pub use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Guest RAM as every backend and device sees it. Writes through this type (devices, the software
/// CPU) are recorded in its dirty bitmap; writes by hardware-virtualized vCPUs are reported by the
/// backend through [`Vm::take_dirty_log`]. A backend that caches guest code sees the writes made
/// through this type's accessors through a [`WriteWatch`] ([`bitmap`]).
pub type GuestMemory = vm_memory::GuestMemoryMmap<DirtyBitmap>;

/// Size of a guest page for dirty tracking and snapshots.
pub const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The backend cannot be used on this host (no device node, missing capability, ...).
    /// The reason names what failed; an OS error behind it is the source.
    #[error("{backend} is not usable: {reason}")]
    Unavailable {
        backend: &'static str,
        reason: String,
        #[source]
        source: Option<std::io::Error>,
    },
    /// A call into the backend failed. The message names the call only; the OS error is the
    /// [`source`](std::error::Error::source) (print the chain with [`Chain`]).
    #[error("{op} failed")]
    Backend {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The CPU model or state asks for something this backend cannot present.
    #[error("{0}")]
    Incompatible(String),
    /// State handed to `set_state` violates an invariant.
    #[error("invalid state: {0}")]
    InvalidState(String),
    /// The guest executed something the backend cannot complete. The message names the
    /// instruction bytes and RIP.
    #[error("{0}")]
    Unhandled(String),
    /// The backend does not offer this optional facility (ioeventfd, irqfd); the caller falls
    /// back to the path every backend has.
    #[error("{0} is not supported by this backend")]
    Unsupported(&'static str),
}

pub type Result<T> = std::result::Result<T, Error>;

/// The `tracing` target of lines meant for the user rather than for diagnosis (the backend the
/// VMM picked, "waiting for a migration", a warning about a key file): the cli prints each such
/// event's message as written, whatever `ANYVISOR_LOG` says. Emit them at `INFO` or above:
/// `tracing::info!(target: hv::NOTICE, "anyvisor: using backend emu")`.
pub const NOTICE: &str = "anyvisor::notice";

/// Displays an error and its chain of causes on one line, `outer: cause: root cause`.
///
/// Every error in the workspace names only its own operation and leaves its cause to
/// [`source`](std::error::Error::source), so flattening an error into a message or a log line
/// goes through this instead of `{e}`, which would drop the causes.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

/// An error from another crate whose message already contains its cause (`vm-memory`,
/// `seccompiler` write `"...: {0}"` and also return the cause as `source`): shown as its
/// message alone and reporting no source, so a [`Chain`] names that cause once.
#[derive(Debug)]
pub struct Flat<E>(pub E);

impl<E: std::fmt::Display> std::fmt::Display for Flat<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<E: std::fmt::Debug + std::fmt::Display> std::error::Error for Flat<E> {}

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            let text = c.to_string();
            if !text.is_empty() {
                write!(f, ": {text}")?;
            }
            cause = c.source();
        }
        Ok(())
    }
}

/// Which backend runs a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Kvm,
    Emu,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Kvm => "kvm",
            BackendKind::Emu => "emu",
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a VM is made of, as far as the backend is concerned.
#[derive(Clone)]
pub struct VmConfig {
    pub memory: Arc<GuestMemory>,
    pub cpu_model: CpuModel,
    pub vcpus: u32,
    /// Guest TSC frequency in kHz. `None`: the host's (KVM) or a backend default (emu).
    /// A restored or migrated VM passes the frequency it was created with.
    pub tsc_khz: Option<u32>,
}

/// An opened hypervisor backend.
pub trait Hypervisor: Send + Sync {
    fn kind(&self) -> BackendKind;

    /// Fails with [`Error::Incompatible`] and a one-line reason when this backend cannot present
    /// `model` to a guest exactly.
    fn check_cpu_model(&self, model: &CpuModel) -> Result<()>;

    /// The model for `--cpu-model host`: everything this host can offer a guest under this backend.
    fn host_cpu_model(&self) -> Result<CpuModel>;

    /// Fails with [`Error::Incompatible`] naming the missing features when guest user code that
    /// has seen `extra` beyond its CPU model (`VmState::user_extra`) cannot run here.
    fn check_user_extra(&self, extra: cpu_model::FeatureSet) -> Result<()> {
        if extra.is_empty() {
            Ok(())
        } else {
            Err(Error::Incompatible(format!(
                "guest user code has seen CPU features beyond its model that backend {} does not \
                 run: {extra}",
                self.kind()
            )))
        }
    }

    fn create_vm(&self, config: VmConfig) -> Result<Arc<dyn Vm>>;
}

/// A virtual machine: memory is mapped, vCPUs can be created.
pub trait Vm: Send + Sync {
    fn kind(&self) -> BackendKind;

    /// Creates vCPU `id` (0 = bootstrap processor). Each vCPU is run by one thread at a time.
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>>;

    /// Delivers an x86 MSI: `addr` in the 0xFEEx_xxxx window (destination), `data` (vector,
    /// delivery mode, trigger). This is how the platform's IOAPIC and devices interrupt vCPUs.
    fn signal_msi(&self, addr: u64, data: u32) -> Result<()>;

    /// The guest TSC frequency this VM presents, in kHz.
    fn tsc_khz(&self) -> u32;

    /// Starts (or stops) recording which guest pages vCPUs write.
    fn set_dirty_tracking(&self, enabled: bool) -> Result<()>;

    /// Guest-physical page numbers written by vCPUs since the last call (or since tracking was
    /// enabled), then forgets them. Writes made through [`GuestMemory`] by devices are in the
    /// memory's own bitmap, not here. Backends whose vCPUs write through [`GuestMemory`] (emu)
    /// may return an empty list.
    fn take_dirty_log(&self) -> Result<Vec<u64>>;

    /// VM-wide state the backend owns (paravirtual clock reference).
    fn state(&self) -> Result<VmState>;
    fn set_state(&self, state: &VmState) -> Result<()>;

    // Optional fast paths. A backend without them returns [`Error::Unsupported`] and the VMM
    // keeps the paths every backend has: MMIO writes reach [`DeviceIo`], interrupts go through
    // [`Vm::signal_msi`].

    /// From now on a guest write of `len` bytes (1, 2, 4 or 8) to guest-physical MMIO address
    /// `addr` only signals `fd` (the vCPU does not leave the backend and [`DeviceIo`] does not
    /// see the access). With `datamatch`, only writes of exactly that value do; other writes
    /// reach [`DeviceIo`] as usual.
    fn register_ioevent(
        &self,
        _addr: u64,
        _len: u32,
        _datamatch: Option<u64>,
        _fd: &EventFd,
    ) -> Result<()> {
        Err(Error::Unsupported("ioeventfd"))
    }

    /// Undoes [`Vm::register_ioevent`] with the same arguments.
    fn unregister_ioevent(
        &self,
        _addr: u64,
        _len: u32,
        _datamatch: Option<u64>,
        _fd: &EventFd,
    ) -> Result<()> {
        Err(Error::Unsupported("ioeventfd"))
    }

    /// Makes interrupt source `gsi` send the MSI `addr`/`data` (as [`Vm::signal_msi`] would),
    /// replacing its previous route. Routes exist for irqfds; `gsi` is below 24 (one per IOAPIC
    /// pin).
    fn set_msi_route(&self, _gsi: u32, _addr: u64, _data: u32) -> Result<()> {
        Err(Error::Unsupported("interrupt routing"))
    }

    /// From now on each write to `fd` sends the MSI routed to `gsi` ([`Vm::set_msi_route`])
    /// without the VMM's involvement. A count already in `fd` when it is registered is delivered
    /// at once.
    fn register_irqfd(&self, _gsi: u32, _fd: &EventFd) -> Result<()> {
        Err(Error::Unsupported("irqfd"))
    }

    /// Undoes [`Vm::register_irqfd`]: writes to `fd` only accumulate in its counter again.
    fn unregister_irqfd(&self, _gsi: u32, _fd: &EventFd) -> Result<()> {
        Err(Error::Unsupported("irqfd"))
    }
}

/// Why [`Vcpu::run`] returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuExit {
    /// `hlt` with interrupts disabled and nothing that can wake the vCPU: it will never run again.
    Halted,
    /// Triple fault (or an equivalent unrecoverable CPU shutdown).
    Shutdown,
    /// [`VcpuKicker::kick`] was called; the vCPU stopped on an instruction boundary.
    Interrupted,
}

/// Makes a running vCPU return [`VcpuExit::Interrupted`] soon, from any thread.
pub trait VcpuKicker: Send + Sync {
    fn kick(&self);
}

/// A virtual CPU.
pub trait Vcpu: Send {
    fn id(&self) -> u32;

    /// Runs guest code until an exit. Port and MMIO accesses are served through `io` while the
    /// call is in progress.
    fn run(&mut self, io: &dyn DeviceIo) -> Result<VcpuExit>;

    /// A handle that interrupts `run`. Kicks sent before `run` is entered make the next `run`
    /// return [`VcpuExit::Interrupted`] at once; after that, each kick is consumed.
    fn kicker(&self) -> Arc<dyn VcpuKicker>;

    /// The complete architectural state, on an instruction boundary.
    fn state(&mut self) -> Result<CpuState>;

    /// Replaces the complete state. Invalid combinations fail with [`Error::InvalidState`].
    fn set_state(&mut self, state: &CpuState) -> Result<()>;
}

/// Port and MMIO accesses of the guest, dispatched to the platform's devices.
///
/// Accesses nobody claims read as all-ones and writes are dropped (and counted): the same on
/// every backend. `data.len()` is 1, 2, 4 or 8.
pub trait DeviceIo: Sync {
    fn pio_read(&self, port: u16, data: &mut [u8]);
    fn pio_write(&self, port: u16, data: &[u8]);
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    fn mmio_write(&self, addr: u64, data: &[u8]);
}

/// A memory-mapped device on the platform's MMIO bus (the IOAPIC, a virtio-mmio transport).
/// `offset` is relative to the base it was registered at; `data.len()` is 1, 2, 4 or 8.
///
/// Defined here, below both `machine` (the bus) and `virtio` (the transports), so a device of
/// either crate plugs into the bus as it is.
pub trait MmioHandler: Send + Sync {
    fn read(&self, offset: u64, data: &mut [u8]);
    fn write(&self, offset: u64, data: &[u8]);
}

/// An interrupt line from a device to the platform's interrupt controller (`machine`'s
/// IOAPIC pins); `virtio` transports raise theirs through it.
///
/// Edge-triggered: [`Interrupt::trigger`] signals one edge, each time the device's interrupt
/// status gains a bit.
pub trait Interrupt: Send + Sync {
    fn trigger(&self);
}

/// Completes one guest instruction in software. The KVM backend uses this when the kernel's
/// instruction emulator gives up; the implementation is the emu backend's, so instruction
/// semantics are written once.
pub trait InstructionEmulator: Send + Sync {
    /// Executes exactly one instruction at `state.regs.rip` (fetched through the guest's page
    /// tables), updating `state` and memory, or delivering the exception the instruction raises
    /// as a pending event in `state.events`.
    ///
    /// An instruction the emulator's CPU model does not show raises #UD that way, like any
    /// fault. One the emulator does not implement is `Err(Error::Unhandled)` naming its bytes,
    /// RIP and mnemonic, with `state` unchanged: the caller's CPU may have it, so no #UD is made
    /// up (the emu backend itself, running a whole guest, raises #UD in the guest instead).
    fn emulate_one(
        &self,
        state: &mut CpuState,
        memory: &GuestMemory,
        io: &dyn DeviceIo,
    ) -> Result<()>;
}

/// Why [`UserModeRunner::run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserExit {
    /// The guest executed `syscall`. The state is the user-mode state with RIP already past the
    /// instruction; the caller performs the `syscall` semantics (RCX, R11, LSTAR, ...).
    Syscall,
    /// An exception or interrupt (including `int n`) was raised in user mode. The state is the
    /// user-mode state to push in the interrupt frame (RIP = the return address the CPU pushed:
    /// the faulting instruction for faults, the next one for traps and `int n`); `cr2` is set for
    /// #PF. The caller delivers the event through the guest's IDT.
    Event { vector: u8, error_code: Option<u32> },
    /// The kicker fired or the deadline passed; the state is on a user-mode instruction boundary.
    Interrupted,
}

/// Runs a guest's user-mode (CPL 3, 64-bit) code on hardware on behalf of a backend that
/// executes everything else itself (emu). Used where the hardware backend cannot run guest
/// kernel code at useful speed (KVM's PVM flavour emulates all CPL 0 code instruction by
/// instruction): the kernel runs in emu, user programs run natively.
pub trait UserModeAccelerator: Send + Sync {
    /// A runner for vCPU `vcpu_id` over `memory` (the VM's guest RAM, shared with the caller).
    fn create_runner(
        &self,
        vcpu_id: u32,
        memory: Arc<GuestMemory>,
    ) -> Result<Box<dyn UserModeRunner>>;
    /// The TSC frequency user code observes, in kHz (the caller's guest TSC must match it).
    fn tsc_khz(&self) -> u32;

    /// The TSC user code reads right now, when it is the host's (user `rdtsc` is not offset by
    /// the hardware backend): the caller must then use it as its guest TSC so that user-mode
    /// time (vDSO over kvm-clock) agrees with the kernel's.
    fn host_tsc(&self) -> Option<u64> {
        None
    }

    /// ISA features guest user code run by this accelerator can see (through `cpuid`) beyond
    /// `model`. Empty when user-mode `cpuid` is answered from the model (the runner returns
    /// #GP(0) at the `cpuid` instruction, which the caller executes itself); otherwise the
    /// host's extra features, which a VM then carries for life (`VmState::user_extra`).
    fn user_visible_extra(&self, _model: &CpuModel) -> cpu_model::FeatureSet {
        cpu_model::FeatureSet::default()
    }

    /// ISA features the hardware running user mode executes; a VM whose model shows more than
    /// this cannot use the accelerator (its user code would fault on the model's instructions).
    fn native_features(&self) -> cpu_model::FeatureSet {
        cpu_model::FeatureSet(u128::MAX)
    }
}

pub trait UserModeRunner: Send {
    /// Runs `state` (which must be at CPL 3 in long mode with paging) until it leaves user mode,
    /// the kicker fires, or `deadline` passes. On return `state` is updated, and every guest page
    /// user code wrote has been marked in the [`GuestMemory`] dirty bitmap and is listed in
    /// `written` (guest page frame numbers) so the caller can drop cached translations.
    fn run(
        &mut self,
        state: &mut CpuState,
        deadline: Option<std::time::Instant>,
        io: &dyn DeviceIo,
        written: &mut Vec<u64>,
    ) -> Result<UserExit>;
    /// Interrupts a `run` in progress (or makes the next one return at once).
    fn kicker(&self) -> Arc<dyn VcpuKicker>;

    /// Says, just before a `run`, whether this guest vCPU flushed its TLB since the previous
    /// `run` returned (MOV to CR3, INVLPG, INVPCID, a CR0/CR4/EFER write that flushes, a state
    /// load). A runner that keeps translations of the guest's page tables between runs (KVM's
    /// shadow page tables) may keep them for that run only when told `false` right before it,
    /// as a TLB would; without the call it drops them, so a caller that does not track flushes
    /// stays correct. The default ignores it (nothing cached).
    fn set_tlb_flushed(&mut self, _flushed: bool) {}

    /// User-mode stretches shorter than about this many instructions are cheaper for the
    /// caller to execute itself than to hand to this runner (whose runs have a fixed cost); the
    /// caller may run up to this many of a stretch before handing the rest over. 0 (the
    /// default): hand every stretch over.
    fn emulate_below(&self) -> u64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_names_its_cause_once() {
        let e = Error::Backend {
            op: "KVM_RUN",
            source: std::io::Error::from_raw_os_error(4),
        };
        assert_eq!(e.to_string(), "KVM_RUN failed");
        let chain = Chain(&e).to_string();
        assert!(chain.starts_with("KVM_RUN failed: "), "{chain}");
        assert_eq!(chain.matches("os error 4").count(), 1, "{chain}");
    }

    #[test]
    fn flat_cuts_a_cause_its_message_already_names() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer: {0}")]
        struct Prints(#[source] std::io::Error);
        let inner = || Prints(std::io::Error::other("root"));
        assert_eq!(Chain(&inner()).to_string(), "outer: root: root");
        assert_eq!(Chain(&Flat(inner())).to_string(), "outer: root");
    }
}
