//! One VM builder: booting (`anyvisor run`), restoring a snapshot (`--restore`) and receiving a
//! live migration (`--incoming`) assemble a VM through the same functions.
//!
//! Each path first gathers what only it knows into a [`Blueprint`]: the [`VmConfig`] (with this
//! process's serial, API socket, backend and seccomp settings), the opened backend and the CPU
//! model the guest sees, and guest memory (fresh for a boot, the snapshot's RAM image mapped
//! privately for a restore, the received pages for a migration). [`assemble`] then builds the
//! VM around it, in one order for every path:
//!
//! 1. the run control ([`Control`]) and the backend's VM on the memory ([`create_vm`]); a saved
//!    VM gets its VM-wide state (kvm-clock) and TSC frequency back;
//! 2. the platform ([`Platform`]: serial, IOAPIC, i8042), attached to the VM, fresh or
//!    [`Persist::restore`]d from its saved state;
//! 3. the virtio devices in their slots ([`crate::devices::attach`]), each fresh or restored
//!    from its saved transport state;
//! 4. the vCPUs ([`create_vcpus`]) with their first states: from the kernel loader for a boot
//!    ([`machine::boot::load_linux`], which needs the device slots for its ACPI tables), the
//!    saved ones otherwise;
//! 5. a VM saved while paused is recorded as paused (its vCPU threads park when launched).
//!
//! The result, [`VmParts`], goes to [`crate::vm::Vmm::launch`], which starts its threads.
//!
//! Saved state is typed per device through [`Persist`]: a component's `State` is plain serde
//! data, `save` reads it, and `restore` *builds* the component from it plus the live resources
//! a state cannot hold (guest memory, the VM, open files). The states of one VM travel together
//! as [`crate::snapshot::VmDevices`] inside [`crate::snapshot::SavedVm`], the one type for a
//! snapshot's contents and a migration's final state.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hv::{CpuModel, CpuState, GuestMemory};
use machine::{Platform, PlatformEvents, PlatformState};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::backend::Backend;
use crate::config::VmConfig;
use crate::control::Control;
use crate::error::{Error, Result};
use crate::snapshot::{DeviceStateError, SavedVm};
use crate::vm::{SharedVcpu, VmParts};

/// A component whose state can be saved and that can be built again from that state.
///
/// `State` is what a snapshot file or a migration stream carries for it; `ConstructorArgs` is
/// what restoring needs besides it: live resources that no state can hold (guest memory, the VM,
/// opened host files), provided by the builder.
pub trait Persist: Sized {
    type State: Serialize + DeserializeOwned;
    type ConstructorArgs<'a>;
    type Error;
    /// The component's state now (with the VM paused, so that it does not change meanwhile).
    fn save(&self) -> Self::State;
    /// A component built from `args` that continues from `state`, after checking the state
    /// against what `args` describe.
    fn restore(
        args: Self::ConstructorArgs<'_>,
        state: &Self::State,
    ) -> std::result::Result<Self, Self::Error>;
}

/// Why a VM could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot create guest memory")]
    GuestMemory(#[source] machine::memory::Error),
    #[error("cannot load the kernel")]
    LoadKernel(#[source] machine::boot::Error),
    #[error("cannot open tap {tap}")]
    Tap {
        tap: String,
        #[source]
        source: virtio::net::Error,
    },
    #[error("cannot create the vsock device")]
    Vsock(#[source] virtio::vsock::Error),
    #[error("cannot create the rng device")]
    Rng(#[source] virtio::rng::Error),
    #[error("cannot create {kind}")]
    Transport {
        kind: &'static str,
        #[source]
        source: virtio::mmio::Error,
    },
    #[error("cannot restore {kind}")]
    RestoreTransport {
        kind: &'static str,
        #[source]
        source: virtio::mmio::Error,
    },
    #[error("the saved VM state is malformed: platform")]
    RestorePlatform(#[source] machine::platform::Error),
    #[error("saved state has {saved} virtio devices, the config {config}")]
    VirtioCount { saved: usize, config: usize },
    #[error("the saved VM state is malformed")]
    DeviceStates(#[source] DeviceStateError),
    #[error("the saved VM state is malformed: memory layout differs from the header")]
    MemoryLayout,
    #[error("the saved VM state is malformed: {states} vcpu states for {vcpus} vcpus")]
    VcpuCount { states: usize, vcpus: u32 },
    #[error("the saved VM config is malformed")]
    Config(#[source] serde_json::Error),
    #[error("the saved config has {config} vcpus, the header {header}")]
    ConfigVcpus { config: u32, header: u32 },
    #[error("the saved config has {config} bytes of memory, the header {header}")]
    ConfigMemory { config: u64, header: u64 },
    #[error("the saved config's CPU model choice does not match the header's model {model}")]
    ConfigCpuModel { model: String },
    #[error("the source's memory layout is not one this VMM builds")]
    SourceLayout,
    #[error(transparent)]
    Arrival(crate::migration::ArrivalError),
}

impl From<BuildError> for Error {
    fn from(e: BuildError) -> Self {
        Error::Build(e)
    }
}

/// What a VM is built from: everything that differs between booting, restoring and receiving
/// it, settled before anything is assembled.
pub(crate) struct Blueprint {
    /// The VM's configuration with this process's runtime settings applied.
    pub config: VmConfig,
    /// The backend, opened and checked against the CPU model.
    pub backend: Backend,
    /// The CPU model the guest sees.
    pub cpu_model: CpuModel,
    /// Guest RAM, holding what the guest had for a restored or arriving VM.
    pub memory: Arc<GuestMemory>,
    /// The serial port's host side, opened early so that a bad `--serial` fails fast.
    pub serial_out: Box<dyn Write + Send>,
}

/// How the VM starts.
pub(crate) enum Start {
    /// From the kernel in the config.
    Boot,
    /// Where a saved VM (snapshot, migration) left off.
    Saved(Box<SavedVm>),
}

/// Builds the VM `bp` describes, fresh or from saved state (module doc), and returns its
/// parts, ready for [`crate::vm::Vmm::launch`]. No vCPU runs yet.
pub(crate) fn assemble(bp: Blueprint, start: Start) -> Result<VmParts> {
    let Blueprint {
        config,
        backend,
        cpu_model,
        memory,
        serial_out,
    } = bp;
    let saved = match start {
        Start::Boot => None,
        Start::Saved(s) => Some(*s),
    };
    if let Some(s) = &saved {
        check_saved(s, &config, &memory)?;
    }
    let control = Arc::new(Control::new(config.cpus));

    let vm = create_vm(
        &backend,
        &memory,
        &cpu_model,
        config.cpus,
        saved.as_ref().map(|s| s.header.tsc_khz),
    )?;
    if let Some(s) = &saved {
        vm.set_state(&s.vm)?;
    }

    let args = PlatformArgs {
        serial_out,
        control: &control,
        vm: vm.clone(),
    };
    let platform = match &saved {
        Some(s) => <Platform as Persist>::restore(args, &s.devices.platform)?,
        None => new_platform(args),
    };

    let virtio = crate::devices::attach(
        &config,
        &memory,
        &platform,
        saved.as_ref().map(|s| s.devices.virtio.as_slice()),
    )?;

    let (states, paused) = match saved {
        Some(s) => (s.vcpus, s.devices.run.paused),
        None => {
            let slots: Vec<machine::boot::VirtioSlot> = virtio.iter().map(|d| d.slot).collect();
            let boot = machine::boot::BootConfig {
                kernel: &config.kernel,
                initrd: config.initrd.as_deref(),
                cmdline: &config.cmdline,
                cpus: config.cpus,
                virtio: &slots,
            };
            let states =
                machine::boot::load_linux(&memory, &boot).map_err(BuildError::LoadKernel)?;
            (states, false)
        }
    };
    let vcpus = create_vcpus(vm.as_ref(), &control, config.cpus, &states)?;
    if paused {
        // Only records the pause: no vCPU thread runs yet, so none can park before the
        // timeout. The threads park on their first `before_run`; the caller waits for that.
        let _ = control.pause(Duration::ZERO);
    }
    Ok(VmParts::new(
        config,
        backend.kind(),
        cpu_model,
        memory,
        vm,
        Arc::new(platform),
        virtio,
        vcpus,
        control,
    ))
}

/// A saved VM's states against the VM being built for them.
fn check_saved(saved: &SavedVm, config: &VmConfig, memory: &GuestMemory) -> Result<()> {
    if snapshot::memory_regions_of(memory) != saved.header.memory_regions {
        return Err(BuildError::MemoryLayout.into());
    }
    if saved.vcpus.len() != config.cpus as usize {
        return Err(BuildError::VcpuCount {
            states: saved.vcpus.len(),
            vcpus: config.cpus,
        }
        .into());
    }
    Ok(())
}

/// Guest RAM of `bytes` bytes laid out by the platform, zero-filled (a boot, or a migration's
/// destination before pages arrive).
pub(crate) fn create_memory(bytes: u64) -> Result<GuestMemory> {
    Ok(machine::memory::create_guest_memory(bytes).map_err(BuildError::GuestMemory)?)
}

/// The backend's VM on `memory`, presenting `cpu_model`; `tsc_khz` is the saved guest's TSC
/// frequency (`None`: the backend's own).
pub(crate) fn create_vm(
    backend: &Backend,
    memory: &Arc<GuestMemory>,
    cpu_model: &CpuModel,
    vcpus: u32,
    tsc_khz: Option<u32>,
) -> Result<Arc<dyn hv::Vm>> {
    Ok(backend.hypervisor.create_vm(hv::VmConfig {
        memory: memory.clone(),
        cpu_model: cpu_model.clone(),
        vcpus,
        tsc_khz,
    })?)
}

/// Creates vCPUs `0..count` with `states` and hands their kickers to `control`.
pub(crate) fn create_vcpus(
    vm: &dyn hv::Vm,
    control: &Control,
    count: u32,
    states: &[CpuState],
) -> Result<Vec<SharedVcpu>> {
    if states.len() != count as usize {
        return Err(Error::Internal(format!(
            "{} vcpu states for {count} vcpus",
            states.len()
        )));
    }
    let mut vcpus = Vec::with_capacity(states.len());
    let mut kickers = Vec::with_capacity(states.len());
    for (id, state) in (0..count).zip(states) {
        let mut vcpu = vm.create_vcpu(id)?;
        vcpu.set_state(state)?;
        kickers.push(vcpu.kicker());
        vcpus.push(Arc::new(Mutex::new(vcpu)));
    }
    control.set_kickers(kickers);
    Ok(vcpus)
}

/// What a platform is built from besides its state.
pub struct PlatformArgs<'a> {
    /// The serial port's host side (console output passes through the guest-panic watch).
    pub serial_out: Box<dyn Write + Send>,
    /// Where its power events (power-off, reset) and a guest panic on the console go.
    pub control: &'a Arc<Control>,
    /// The VM its interrupt controller delivers to.
    pub vm: Arc<dyn hv::Vm>,
}

/// A platform in its reset state, attached to its VM.
pub fn new_platform(args: PlatformArgs<'_>) -> Platform {
    let out = crate::serial::PanicWatch::new(args.serial_out, args.control.clone());
    let platform = Platform::new(Box::new(out), Arc::new(Events(args.control.clone())));
    platform.attach_vm(args.vm);
    platform
}

impl Persist for Platform {
    type State = PlatformState;
    type ConstructorArgs<'a> = PlatformArgs<'a>;
    type Error = BuildError;

    fn save(&self) -> PlatformState {
        self.state()
    }

    /// A new platform attached to its VM (before anything is restored, as
    /// [`Platform::restore`] requires) with every device's state checked and adopted.
    fn restore(
        args: PlatformArgs<'_>,
        state: &PlatformState,
    ) -> std::result::Result<Self, BuildError> {
        let platform = new_platform(args);
        Platform::restore(&platform, state).map_err(BuildError::RestorePlatform)?;
        Ok(platform)
    }
}

/// Platform power events stop the VM.
struct Events(Arc<Control>);

impl PlatformEvents for Events {
    fn request(&self, ev: machine::PlatformEvent) {
        use crate::control::Stop;
        self.0.request_stop(match ev {
            machine::PlatformEvent::PowerOff => Stop::PowerOff,
            machine::PlatformEvent::Reset => Stop::Reset,
        });
    }
}

#[cfg(test)]
mod tests {
    use hv::{DeviceIo, Hypervisor};
    use machine::layout::IOAPIC_BASE;

    use super::*;

    fn emu_vm(memory: &Arc<GuestMemory>) -> Arc<dyn hv::Vm> {
        hv_emu::EmuHypervisor::new()
            .create_vm(hv::VmConfig {
                memory: memory.clone(),
                cpu_model: hv::CpuModel::portable(),
                vcpus: 1,
                tsc_khz: None,
            })
            .unwrap()
    }

    /// A platform's state survives save, JSON and restore, and restore refuses a bad one.
    #[test]
    fn platform_persist_round_trip() {
        let memory = Arc::new(machine::memory::create_guest_memory(16 << 20).unwrap());
        let vm = emu_vm(&memory);
        let control = Arc::new(Control::new(1));
        let args = || PlatformArgs {
            serial_out: Box::new(std::io::sink()),
            control: &control,
            vm: vm.clone(),
        };
        let platform = new_platform(args());
        // Change something in each device: an IOAPIC redirection entry, the UART's scratch
        // and line control registers, input waiting for the guest.
        platform.mmio_write(IOAPIC_BASE, &0x12u32.to_le_bytes());
        platform.mmio_write(IOAPIC_BASE + 0x10, &0x41u32.to_le_bytes());
        platform.pio_write(0x3ff, &[0x5a]);
        platform.pio_write(0x3fb, &[0x03]);
        platform.serial_input(b"hi");
        let saved = Persist::save(&platform);
        assert_ne!(saved, PlatformState::default());
        let json = serde_json::to_string(&saved).unwrap();
        let back: PlatformState = serde_json::from_str(&json).unwrap();
        let restored = <Platform as Persist>::restore(args(), &back).unwrap();
        assert_eq!(Persist::save(&restored), saved);

        let mut bad = saved;
        bad.ioapic.redirection.pop();
        let e = <Platform as Persist>::restore(args(), &bad).err().unwrap();
        assert!(matches!(e, BuildError::RestorePlatform(_)), "{e}");
    }
}
