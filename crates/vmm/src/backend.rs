//! Choosing and opening the hypervisor backend, and the CPU model the guest sees.

use std::path::PathBuf;
use std::sync::Arc;

use hv::{BackendKind, CpuModel, Hypervisor};

use crate::config::{BackendChoice, CpuModelChoice};
use crate::error::{Error, Result};

const KVM_DEVICE: &str = "/dev/kvm";

/// `/dev/kvm`, or in test builds the node a test substitutes ([`crate::test_hooks`]).
fn kvm_device() -> PathBuf {
    crate::test_hooks::kvm_device().unwrap_or_else(|| PathBuf::from(KVM_DEVICE))
}

/// Whether the KVM device can be opened read-write; the reason when it cannot.
pub fn kvm_available() -> hv::Result<()> {
    let path = kvm_device();
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map(drop)
        .map_err(|e| hv::Error::Unavailable {
            backend: "kvm",
            reason: format!("cannot open {}", path.display()),
            source: Some(e),
        })
}

/// An opened backend and the CPU model its guest sees.
pub struct Backend {
    pub hypervisor: Arc<dyn Hypervisor>,
    pub cpu_model: CpuModel,
    /// The backend the user asked for and snapshots record. On PVM hosts `kvm` is served by
    /// emu with KVM running guest user mode (see [`open_kvm_hybrid`]), so this can differ from
    /// `hypervisor.kind()`.
    kind: BackendKind,
}

impl Backend {
    pub fn kind(&self) -> BackendKind {
        self.kind
    }
}

/// Environment switch that forces plain KVM even on a PVM host (for measuring it).
pub const PLAIN_KVM_ENV: &str = "ANYVISOR_PLAIN_KVM";

/// On KVM's PVM flavour every guest kernel instruction goes through KVM's instruction emulator
/// (a Linux boot does not reach init in 15 minutes), while user mode runs natively. There the
/// `kvm` backend runs the guest kernel in emu and hands user-mode stretches to KVM, unless
/// [`PLAIN_KVM_ENV`] is set.
fn hybrid_kvm() -> bool {
    std::env::var_os(PLAIN_KVM_ENV).is_none() && hv_kvm::KvmUserAccelerator::is_useful()
}

fn open_kvm_hybrid() -> Option<Result<Arc<dyn Hypervisor>>> {
    if !hybrid_kvm() {
        return None;
    }
    Some(
        kvm_available()
            .map_err(Error::from)
            .and_then(|()| Ok(hv_kvm::KvmUserAccelerator::open()?))
            .map(|accel| {
                Arc::new(hv_emu::EmuHypervisor::with_user_accelerator(Arc::new(
                    accel,
                ))) as Arc<dyn Hypervisor>
            }),
    )
}

fn open_kvm(model: Option<&CpuModel>) -> Result<Arc<dyn Hypervisor>> {
    kvm_available()?;
    // KVM completes the instructions its own emulator refuses with emu's instruction emulator.
    let emulator = model
        .map(|m| Arc::new(hv_emu::Emulator::new(m.clone())) as Arc<dyn hv::InstructionEmulator>);
    Ok(Arc::new(hv_kvm::KvmHypervisor::open(emulator)?))
}

fn open_emu() -> Result<Arc<dyn Hypervisor>> {
    Ok(Arc::new(hv_emu::EmuHypervisor::new()))
}

/// What `--backend auto` picks: KVM where `/dev/kvm` opens, except on KVM's PVM flavour, where
/// `kvm` would be the hybrid (guest kernel in emu, user mode on KVM) and plain emu boots faster
/// and uses less CPU (boot to init 9.2-10.0 s wall / 9.1-9.2 s CPU on emu against 10.5-10.8 s /
/// 10.4-10.6 s on the hybrid, `docs/benchmarks.md` "backend auto"); else emu.
fn auto_pick() -> (BackendKind, &'static str) {
    match kvm_available() {
        Ok(()) if hybrid_kvm() => (
            BackendKind::Emu,
            " (KVM here is the PVM flavour, where emu boots faster than the kvm hybrid)",
        ),
        Ok(()) => (BackendKind::Kvm, ""),
        Err(_) => (BackendKind::Emu, " (no usable /dev/kvm)"),
    }
}

/// Opens the backend `choice` names and settles the CPU model. `auto` logs its pick on stderr.
pub fn open(choice: BackendChoice, model: CpuModelChoice) -> Result<Backend> {
    let mut why = "";
    let kind = match choice {
        BackendChoice::Kvm => BackendKind::Kvm,
        BackendChoice::Emu => BackendKind::Emu,
        BackendChoice::Auto => {
            let (kind, reason) = auto_pick();
            why = reason;
            kind
        }
    };
    let mut kind = kind;
    let (hypervisor, cpu_model) = match (kind, model) {
        (BackendKind::Emu, CpuModelChoice::Host) => {
            return Err(Error::Unsupported(
                "--cpu-model host needs the kvm backend".into(),
            ));
        }
        (BackendKind::Emu, CpuModelChoice::Portable) => (open_emu()?, CpuModel::portable_v3()),
        (BackendKind::Emu, CpuModelChoice::PortableV2) => (open_emu()?, CpuModel::portable()),
        (BackendKind::Kvm, CpuModelChoice::Portable | CpuModelChoice::PortableV2) => {
            let model = model.portable_model().unwrap_or_else(CpuModel::portable_v3);
            let opened = match open_kvm_hybrid() {
                Some(hybrid) => hybrid,
                None => open_kvm(Some(&model)),
            };
            match opened {
                Ok(h) => (h, model),
                // `auto` falls back to emu when KVM is there but refuses to open.
                Err(e) if choice == BackendChoice::Auto => {
                    tracing::warn!(
                        target: hv::NOTICE,
                        "anyvisor: kvm not usable ({}), falling back to emu",
                        crate::error::report(&e)
                    );
                    kind = BackendKind::Emu;
                    (open_emu()?, model)
                }
                Err(e) => return Err(e),
            }
        }
        (BackendKind::Kvm, CpuModelChoice::Host) => {
            // The hybrid's kernel half is emu, which presents only the portable model; plain
            // KVM on a PVM host would emulate every kernel instruction (docs/cpu-model.md).
            if hybrid_kvm() {
                return Err(Error::Unsupported(format!(
                    "--cpu-model host needs plain KVM, which on this host (KVM PVM) runs guest \
                     kernel code about 4000x slower; set {PLAIN_KVM_ENV}=1 to use it anyway"
                )));
            }
            // The host model is known only once KVM is open; the emulator must present it too.
            let model = open_kvm(None)?.host_cpu_model()?;
            (open_kvm(Some(&model))?, model)
        }
    };
    hypervisor.check_cpu_model(&cpu_model)?;
    if choice == BackendChoice::Auto {
        tracing::info!(target: hv::NOTICE, "anyvisor: using backend {kind}{why}");
    }
    Ok(Backend {
        hypervisor,
        cpu_model,
        kind,
    })
}
