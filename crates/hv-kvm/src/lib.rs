//! The KVM backend of the `hv` contract.
//!
//! [`KvmHypervisor::open`] opens `/dev/kvm`; the VMs it creates use a split irqchip (local APICs
//! in the kernel, the IOAPIC in crate `machine`, interrupts as `KVM_SIGNAL_MSI` or through irqfds
//! on MSI routes; guest MMIO writes may signal ioeventfds: `docs/kvm-platform.md`), one memory slot
//! per region of [`hv::GuestMemory`], and per-vCPU CPUID from the VM's [`hv::CpuModel`]. State
//! converts to and from the neutral `hv` types in [`convert`]. Platform findings of this host
//! (which CPUID leaves KVM controls, what its instruction emulator refuses) are in
//! `docs/kvm-platform.md`.
#![allow(unsafe_code)] // KVM is driven through ioctls, a shared run page and raw memory mappings.

pub mod convert;
mod cpuid;
mod user_accel;
mod vcpu;
mod vm;
mod walk;

use std::sync::Arc;

use hv::{BackendKind, CpuModel, Hypervisor, InstructionEmulator, VmConfig};
use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, Msrs, kvm_cpuid_entry2, kvm_msr_entry};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

pub use user_accel::{
    KvmUserAccelerator, KvmUserRunner, MAX_RUNNERS, PRIVATE_GPA, PRIVATE_STRIDE, shadow_drop_stats,
};
pub use vcpu::KvmVcpu;
pub use vm::KvmVm;

pub(crate) const BACKEND: &str = "kvm";

/// Capabilities without which the platform cannot be built.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SplitIrqchip, "KVM_CAP_SPLIT_IRQCHIP"),
    (Cap::SignalMsi, "KVM_CAP_SIGNAL_MSI"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    (Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS"),
    (Cap::Debugregs, "KVM_CAP_DEBUGREGS"),
    (Cap::MpState, "KVM_CAP_MP_STATE"),
    (Cap::GetTscKhz, "KVM_CAP_GET_TSC_KHZ"),
    (Cap::AdjustClock, "KVM_CAP_ADJUST_CLOCK"),
    (Cap::TscDeadlineTimer, "KVM_CAP_TSC_DEADLINE_TIMER"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
];

pub(crate) fn backend_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> hv::Error {
    move |e| hv::Error::Backend {
        op,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// Opens `/dev/kvm` and checks the API version and `caps` (each with the name an error shows).
/// The one place both the backend and the user-mode accelerator open KVM.
pub(crate) fn open_kvm(caps: &[(Cap, &str)]) -> hv::Result<Kvm> {
    let kvm = Kvm::new().map_err(|e| unavailable_os("cannot open /dev/kvm", &e))?;
    if kvm.get_api_version() != 12 {
        return Err(unavailable(format!(
            "KVM API version {} (expected 12)",
            kvm.get_api_version()
        )));
    }
    for (cap, name) in caps {
        if !kvm.check_extension(*cap) {
            return Err(unavailable(format!("missing capability {name}")));
        }
    }
    Ok(kvm)
}

/// A VM with one vCPU for questions only a vCPU answers (TSC frequency, MSRs KVM accepts).
/// The VM fd is kept with the vCPU so both close together.
pub(crate) struct ScratchVcpu {
    pub vcpu: VcpuFd,
    _vm: VmFd,
}

impl ScratchVcpu {
    pub(crate) fn new(kvm: &Kvm) -> hv::Result<ScratchVcpu> {
        let vm = kvm
            .create_vm()
            .map_err(|e| unavailable_os("cannot create a scratch VM", &e))?;
        let vcpu = vm
            .create_vcpu(0)
            .map_err(|e| unavailable_os("cannot create a scratch vCPU", &e))?;
        Ok(ScratchVcpu { vcpu, _vm: vm })
    }

    /// The host's TSC frequency as KVM reports it (`KVM_GET_TSC_KHZ`, a vCPU ioctl), in kHz.
    pub(crate) fn tsc_khz(&self) -> hv::Result<u32> {
        self.vcpu
            .get_tsc_khz()
            .map_err(|e| unavailable_os("cannot read the TSC frequency", &e))
    }
}

/// `KVM_SET_MSRS` of `entries` on `fd`; an MSR KVM refuses is an error naming it (KVM stops at
/// the first one it refuses). Nothing to write is not a call.
pub(crate) fn set_msrs(fd: &VcpuFd, entries: &[kvm_msr_entry]) -> hv::Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let msrs =
        Msrs::from_entries(entries).map_err(|_| hv::Error::InvalidState("too many MSRs".into()))?;
    let n = fd.set_msrs(&msrs).map_err(backend_err("KVM_SET_MSRS"))?;
    if n < entries.len() {
        let e = entries.get(n).copied().unwrap_or_default();
        return Err(hv::Error::InvalidState(format!(
            "KVM refused MSR {:#x} = {:#x}",
            e.index, e.data
        )));
    }
    Ok(())
}

/// Appends to `pages` the frames of memory slot `slot` (`size` bytes at `gpa`) that KVM logged
/// dirty since the last call, and clears the log (`KVM_GET_DIRTY_LOG`).
pub(crate) fn dirty_pages(
    fd: &VmFd,
    slot: u32,
    gpa: u64,
    size: u64,
    pages: &mut Vec<u64>,
) -> hv::Result<()> {
    let size = usize::try_from(size)
        .map_err(|_| hv::Error::InvalidState("memory slot too large".into()))?;
    let bitmap = fd
        .get_dirty_log(slot, size)
        .map_err(backend_err("KVM_GET_DIRTY_LOG"))?;
    pages.extend(hv::dirty::dirty_pages(gpa >> 12, &bitmap));
    Ok(())
}

/// What the host offers, read once when the backend is opened.
pub(crate) struct HostInfo {
    pub supported_cpuid: Vec<kvm_cpuid_entry2>,
    pub msr_index: Vec<u32>,
    pub tsc_khz: u32,
    pub has_xsave: bool,
    pub has_xcrs: bool,
    pub has_msr_filter: bool,
}

/// An opened `/dev/kvm`.
pub struct KvmHypervisor {
    kvm: Kvm,
    host: Arc<HostInfo>,
    emulator: Option<Arc<dyn InstructionEmulator>>,
}

fn unavailable(reason: String) -> hv::Error {
    hv::Error::Unavailable {
        backend: BACKEND,
        reason,
        source: None,
    }
}

/// [`hv::Error::Unavailable`] for a KVM call that failed: `what` names it, the errno is the
/// source.
pub(crate) fn unavailable_os(what: &str, e: &kvm_ioctls::Error) -> hv::Error {
    hv::Error::Unavailable {
        backend: BACKEND,
        reason: what.to_string(),
        source: Some(std::io::Error::from_raw_os_error(e.errno())),
    }
}

impl KvmHypervisor {
    /// Opens `/dev/kvm` and checks the capabilities the platform needs. `emulator` completes
    /// instructions KVM's own emulator refuses (see [`hv::InstructionEmulator`]).
    pub fn open(emulator: Option<Arc<dyn InstructionEmulator>>) -> hv::Result<KvmHypervisor> {
        let kvm = open_kvm(REQUIRED_CAPS)?;
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| unavailable_os("KVM_GET_SUPPORTED_CPUID failed", &e))?
            .as_slice()
            .to_vec();
        let msr_index = kvm
            .get_msr_index_list()
            .map_err(|e| unavailable_os("KVM_GET_MSR_INDEX_LIST failed", &e))?
            .as_slice()
            .to_vec();
        let tsc_khz = ScratchVcpu::new(&kvm)?.tsc_khz()?;
        let host = HostInfo {
            supported_cpuid,
            msr_index,
            tsc_khz,
            has_xsave: kvm.check_extension(Cap::Xsave),
            has_xcrs: kvm.check_extension(Cap::Xcrs),
            has_msr_filter: kvm.check_extension(Cap::X86MsrFilter),
        };
        Ok(KvmHypervisor {
            kvm,
            host: Arc::new(host),
            emulator,
        })
    }

    /// The host's TSC frequency as KVM reports it, in kHz.
    pub fn host_tsc_khz(&self) -> u32 {
        self.host.tsc_khz
    }
}

impl Hypervisor for KvmHypervisor {
    fn kind(&self) -> BackendKind {
        BackendKind::Kvm
    }

    fn check_cpu_model(&self, model: &CpuModel) -> hv::Result<()> {
        cpuid::check_model(model, &self.host.supported_cpuid)?;
        Ok(())
    }

    fn check_user_extra(&self, extra: hv::cpu_model::FeatureSet) -> hv::Result<()> {
        // Guest user code runs on this host's CPU: it runs what the host has.
        let missing = hv::cpu_model::FeatureSet(extra.0 & !cpuid::host_user_features().0);
        if missing.is_empty() {
            Ok(())
        } else {
            Err(hv::Error::Incompatible(format!(
                "guest user code has seen CPU features this host lacks: {missing}"
            )))
        }
    }

    fn host_cpu_model(&self) -> hv::Result<CpuModel> {
        Ok(cpuid::host_model(
            &self.host.supported_cpuid,
            &self.host.msr_index,
        ))
    }

    fn create_vm(&self, config: VmConfig) -> hv::Result<Arc<dyn hv::Vm>> {
        self.check_cpu_model(&config.cpu_model)?;
        let vm = KvmVm::new(&self.kvm, self.host.clone(), self.emulator.clone(), config)?;
        Ok(Arc::new(vm))
    }
}
