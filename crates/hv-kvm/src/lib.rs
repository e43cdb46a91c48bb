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
use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_cpuid_entry2};
use kvm_ioctls::{Cap, Kvm};

pub use user_accel::{KvmUserAccelerator, KvmUserRunner, MAX_RUNNERS, PRIVATE_GPA, PRIVATE_STRIDE};
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
        let kvm = Kvm::new().map_err(|e| unavailable_os("cannot open /dev/kvm", &e))?;
        if kvm.get_api_version() != 12 {
            return Err(unavailable(format!(
                "KVM API version {} (expected 12)",
                kvm.get_api_version()
            )));
        }
        for (cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(*cap) {
                return Err(unavailable(format!("missing capability {name}")));
            }
        }
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
        // KVM_GET_TSC_KHZ is a vCPU ioctl: ask a scratch VM once.
        let tsc_khz = kvm
            .create_vm()
            .and_then(|vm| vm.create_vcpu(0))
            .and_then(|vcpu| vcpu.get_tsc_khz())
            .map_err(|e| unavailable_os("cannot read the TSC frequency", &e))?;
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
