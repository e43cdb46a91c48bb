//! A KVM virtual machine: memory slots, split irqchip, MSI delivery, dirty log, clock, and the
//! fast paths: ioeventfds, MSI routes and irqfds.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use hv::EventFd;
use hv::state::msr;
use hv::{BackendKind, CpuModel, GuestMemory, InstructionEmulator, VmConfig, VmState};
use kvm_bindings::{
    KVM_CAP_SPLIT_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MEM_LOG_DIRTY_PAGES, KvmIrqRouting,
    kvm_clock_data, kvm_enable_cap, kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1,
    kvm_irq_routing_msi, kvm_msi, kvm_userspace_memory_region,
};
use kvm_ioctls::{
    IoEventAddress, Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, NoDatamatch,
    VmFd,
};
use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion};

use crate::vcpu::KvmVcpu;
use crate::{BACKEND, HostInfo, backend_err, cpuid};

/// IOAPIC pins reserved for userspace routes in split-irqchip mode.
const SPLIT_IRQCHIP_ROUTES: u64 = 24;
/// Where KVM may put the real-mode TSS it needs on VMX hosts: just below the 4 GiB BIOS area,
/// outside the platform's RAM and MMIO windows.
const TSS_ADDRESS: usize = 0xfffb_d000;

/// MSRs whose value lives in the special registers; the state takes them from there.
pub(crate) const MIRRORED_MSRS: &[u32] = &[
    msr::IA32_APIC_BASE,
    msr::IA32_EFER,
    msr::IA32_FS_BASE,
    msr::IA32_GS_BASE,
];

struct Slot {
    slot: u32,
    gpa: u64,
    size: u64,
    host_addr: u64,
}

/// What every vCPU of a VM shares.
pub(crate) struct VmShared {
    pub fd: VmFd,
    pub memory: Arc<GuestMemory>,
    pub model: CpuModel,
    pub vcpus: u32,
    pub host: Arc<HostInfo>,
    pub emulator: Option<Arc<dyn InstructionEmulator>>,
    /// `Some(khz)` when every vCPU needs `KVM_SET_TSC_KHZ`.
    pub set_tsc_khz: Option<u32>,
    pub tsc_khz: u32,
    /// Model MSRs read and written through KVM_GET/SET_MSRS (mirrored and refused ones removed);
    /// decided when the first vCPU is created.
    pub msrs: OnceLock<Vec<u32>>,
    pub refused_msrs: OnceLock<Vec<u32>>,
}

/// A VM created by [`crate::KvmHypervisor`].
pub struct KvmVm {
    shared: Arc<VmShared>,
    slots: Vec<Slot>,
    dirty_tracking: Mutex<bool>,
    /// The MSI routes set so far, by GSI. `KVM_SET_GSI_ROUTING` replaces the whole table, so
    /// every change sends all of them.
    routes: Mutex<BTreeMap<u32, (u64, u32)>>,
    /// `VmState::user_extra`. Under KVM's PVM flavour guest user code executes `cpuid` on the
    /// host CPU, so it sees the host's features beyond the model (docs/cpu-model.md).
    user_extra: Mutex<hv::cpu_model::FeatureSet>,
}

fn within_tolerance(a: u32, b: u32) -> bool {
    // 0.1 %
    u64::from(a.abs_diff(b)) * 1000 <= u64::from(b)
}

impl KvmVm {
    pub(crate) fn new(
        kvm: &Kvm,
        host: Arc<HostInfo>,
        emulator: Option<Arc<dyn InstructionEmulator>>,
        config: VmConfig,
    ) -> hv::Result<KvmVm> {
        if config.vcpus == 0 {
            return Err(hv::Error::InvalidState(
                "a VM needs at least one vCPU".into(),
            ));
        }
        let set_tsc_khz = match config.tsc_khz {
            Some(khz) if !within_tolerance(khz, host.tsc_khz) => {
                probe_tsc_khz(kvm, khz, host.tsc_khz)?;
                Some(khz)
            }
            _ => None,
        };
        let tsc_khz = config.tsc_khz.unwrap_or(host.tsc_khz);
        let fd = kvm.create_vm().map_err(backend_err("KVM_CREATE_VM"))?;
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_SPLIT_IRQCHIP,
            ..Default::default()
        };
        cap.args[0] = SPLIT_IRQCHIP_ROUTES;
        fd.enable_cap(&cap)
            .map_err(backend_err("KVM_ENABLE_CAP(SPLIT_IRQCHIP)"))?;
        // Only VMX hosts need it; elsewhere the ioctl may be refused, which is harmless.
        let _ = fd.set_tss_address(TSS_ADDRESS);
        if host.has_msr_filter && !config.cpu_model.name.starts_with("host:") {
            install_msr_filter(&fd, &config.cpu_model.msrs)?;
        }

        let mut slots = Vec::new();
        for (i, region) in config.memory.iter().enumerate() {
            let slot = Slot {
                slot: u32::try_from(i)
                    .map_err(|_| hv::Error::InvalidState("too many memory regions".into()))?,
                gpa: region.start_addr().0,
                size: region.len(),
                host_addr: region.as_ptr() as u64,
            };
            set_slot(&fd, &slot, 0)?;
            slots.push(slot);
        }

        let user_extra = if crate::KvmUserAccelerator::is_useful() {
            hv::cpu_model::FeatureSet(
                crate::cpuid::host_user_features().0 & !config.cpu_model.features().0,
            )
        } else {
            hv::cpu_model::FeatureSet::default()
        };
        Ok(KvmVm {
            user_extra: Mutex::new(user_extra),
            shared: Arc::new(VmShared {
                fd,
                memory: config.memory,
                model: config.cpu_model,
                vcpus: config.vcpus,
                host,
                emulator,
                set_tsc_khz,
                tsc_khz,
                msrs: OnceLock::new(),
                refused_msrs: OnceLock::new(),
            }),
            slots,
            dirty_tracking: Mutex::new(false),
            routes: Mutex::new(BTreeMap::new()),
        })
    }

    /// MSRs of the CPU model that KVM refused to read or write; they are left out of the vCPU
    /// state. Empty until the first vCPU is created.
    pub fn refused_msrs(&self) -> Vec<u32> {
        self.shared.refused_msrs.get().cloned().unwrap_or_default()
    }
}

/// Without TSC scaling KVM can still accept some frequencies (a higher one by "catch-up"), so
/// the way to know is to ask a scratch vCPU.
fn probe_tsc_khz(kvm: &Kvm, khz: u32, host_khz: u32) -> hv::Result<()> {
    let scratch = crate::ScratchVcpu::new(kvm)?;
    scratch.vcpu.set_tsc_khz(khz).map_err(|_| {
        hv::Error::Incompatible(format!(
            "guest TSC runs at {khz} kHz but this host runs at {host_khz} kHz and KVM cannot scale it"
        ))
    })
}

fn msi_route(gsi: u32, addr: u64, data: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            msi: kvm_irq_routing_msi {
                address_lo: addr as u32,
                address_hi: (addr >> 32) as u32,
                data,
                ..Default::default()
            },
        },
        ..Default::default()
    }
}

/// `KVM_IOEVENTFD` (un)registration; `datamatch`'s width is the access length KVM matches.
fn ioevent(
    fd: &VmFd,
    assign: bool,
    addr: u64,
    len: u32,
    datamatch: Option<u64>,
    efd: &EventFd,
) -> hv::Result<()> {
    let op = if assign {
        "KVM_IOEVENTFD"
    } else {
        "KVM_IOEVENTFD(DEASSIGN)"
    };
    let addr = IoEventAddress::Mmio(addr);
    let bad_len = || hv::Error::InvalidState(format!("ioevent length {len} is not 1, 2, 4 or 8"));
    macro_rules! call {
        ($value:expr) => {
            if assign {
                fd.register_ioevent(efd, &addr, $value)
            } else {
                fd.unregister_ioevent(efd, &addr, $value)
            }
        };
    }
    let result = match (datamatch, len) {
        (None, 1 | 2 | 4 | 8) => call!(NoDatamatch),
        (Some(v), 1) => call!(u8::try_from(v).map_err(|_| bad_len())?),
        (Some(v), 2) => call!(u16::try_from(v).map_err(|_| bad_len())?),
        (Some(v), 4) => call!(u32::try_from(v).map_err(|_| bad_len())?),
        (Some(v), 8) => call!(v),
        _ => return Err(bad_len()),
    };
    result.map_err(backend_err(op))
}

fn set_slot(fd: &VmFd, slot: &Slot, flags: u32) -> hv::Result<()> {
    let region = kvm_userspace_memory_region {
        slot: slot.slot,
        flags,
        guest_phys_addr: slot.gpa,
        memory_size: slot.size,
        userspace_addr: slot.host_addr,
    };
    // SAFETY: the host range is a live mapping of `slot.size` bytes owned by the VM's
    // `GuestMemory`, which `VmShared` keeps alive for as long as the VM fd (and so the slot)
    // exists.
    unsafe { fd.set_user_memory_region(region) }.map_err(backend_err("KVM_SET_USER_MEMORY_REGION"))
}

/// Guest accesses to MSRs outside the model raise #GP, as on every other backend. KVM applies
/// the filter to guest RDMSR/WRMSR only; KVM_GET/SET_MSRS are not affected.
fn install_msr_filter(fd: &VmFd, msrs: &[u32]) -> hv::Result<()> {
    // One range per 4096-MSR block that holds model MSRs.
    let mut blocks: Vec<(u32, Vec<u8>)> = Vec::new();
    for &m in msrs {
        let base = m & !0xfff;
        let idx = match blocks.iter().position(|(b, _)| *b == base) {
            Some(i) => i,
            None => {
                blocks.push((base, vec![0u8; 512]));
                blocks.len() - 1
            }
        };
        let off = (m - base) as usize;
        blocks[idx].1[off / 8] |= 1 << (off % 8);
    }
    let ranges: Vec<MsrFilterRange<'_>> = blocks
        .iter()
        .map(|(base, bitmap)| MsrFilterRange {
            flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
            base: *base,
            msr_count: 4096,
            bitmap,
        })
        .collect();
    fd.set_msr_filter(MsrFilterDefaultAction::DENY, &ranges)
        .map_err(backend_err("KVM_X86_SET_MSR_FILTER"))
}

impl hv::Vm for KvmVm {
    fn kind(&self) -> BackendKind {
        BackendKind::Kvm
    }

    fn create_vcpu(&self, id: u32) -> hv::Result<Box<dyn hv::Vcpu>> {
        if id >= self.shared.vcpus {
            return Err(hv::Error::InvalidState(format!(
                "vCPU {id} out of range (VM has {})",
                self.shared.vcpus
            )));
        }
        let fd = self
            .shared
            .fd
            .create_vcpu(u64::from(id))
            .map_err(backend_err("KVM_CREATE_VCPU"))?;
        let cpuid = cpuid::kvm_cpuid_for(&self.shared.model, id, self.shared.vcpus)?;
        fd.set_cpuid2(&cpuid)
            .map_err(backend_err("KVM_SET_CPUID2"))?;
        if let Some(khz) = self.shared.set_tsc_khz {
            fd.set_tsc_khz(khz).map_err(|_| {
                hv::Error::Incompatible(format!("KVM refused a guest TSC of {khz} kHz"))
            })?;
        }
        if self.shared.msrs.get().is_none() {
            let (ok, refused) = crate::vcpu::probe_msrs(&fd, &self.shared.model.msrs);
            if !refused.is_empty() {
                tracing::warn!(
                    backend = BACKEND,
                    "KVM refuses model MSRs {refused:#x?}; they are not saved"
                );
            }
            let _ = self.shared.msrs.set(ok);
            let _ = self.shared.refused_msrs.set(refused);
        }
        Ok(Box::new(KvmVcpu::new(id, fd, self.shared.clone())?))
    }

    fn signal_msi(&self, addr: u64, data: u32) -> hv::Result<()> {
        let msi = kvm_msi {
            address_lo: addr as u32,
            address_hi: (addr >> 32) as u32,
            data,
            ..Default::default()
        };
        // 0 means the guest masked it (e.g. APIC software-disabled): dropped, as on hardware.
        self.shared
            .fd
            .signal_msi(msi)
            .map(|_| ())
            .map_err(backend_err("KVM_SIGNAL_MSI"))
    }

    fn tsc_khz(&self) -> u32 {
        self.shared.tsc_khz
    }

    fn set_dirty_tracking(&self, enabled: bool) -> hv::Result<()> {
        let mut on = self
            .dirty_tracking
            .lock()
            .map_err(|_| hv::Error::InvalidState("dirty tracking lock poisoned".into()))?;
        if *on == enabled {
            return Ok(());
        }
        let flags = if enabled { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        for slot in &self.slots {
            set_slot(&self.shared.fd, slot, flags)?;
        }
        *on = enabled;
        Ok(())
    }

    fn take_dirty_log(&self) -> hv::Result<Vec<u64>> {
        let on = self
            .dirty_tracking
            .lock()
            .map_err(|_| hv::Error::InvalidState("dirty tracking lock poisoned".into()))?;
        if !*on {
            return Ok(Vec::new());
        }
        let mut pages = Vec::new();
        for slot in &self.slots {
            crate::dirty_pages(&self.shared.fd, slot.slot, slot.gpa, slot.size, &mut pages)?;
        }
        Ok(pages)
    }

    fn state(&self) -> hv::Result<VmState> {
        let clock = self
            .shared
            .fd
            .get_clock()
            .map_err(backend_err("KVM_GET_CLOCK"))?;
        Ok(VmState {
            clock_ns: clock.clock,
            tsc_khz: self.shared.tsc_khz,
            user_extra: *self.user_extra.lock().unwrap_or_else(|p| p.into_inner()),
        })
    }

    fn register_ioevent(
        &self,
        addr: u64,
        len: u32,
        datamatch: Option<u64>,
        fd: &EventFd,
    ) -> hv::Result<()> {
        ioevent(&self.shared.fd, true, addr, len, datamatch, fd)
    }

    fn unregister_ioevent(
        &self,
        addr: u64,
        len: u32,
        datamatch: Option<u64>,
        fd: &EventFd,
    ) -> hv::Result<()> {
        ioevent(&self.shared.fd, false, addr, len, datamatch, fd)
    }

    fn set_msi_route(&self, gsi: u32, addr: u64, data: u32) -> hv::Result<()> {
        let mut routes = self
            .routes
            .lock()
            .map_err(|_| hv::Error::InvalidState("route table lock poisoned".into()))?;
        if u64::from(gsi) >= SPLIT_IRQCHIP_ROUTES {
            return Err(hv::Error::InvalidState(format!(
                "GSI {gsi} is beyond the {SPLIT_IRQCHIP_ROUTES} IOAPIC routes"
            )));
        }
        if routes.get(&gsi) == Some(&(addr, data)) {
            return Ok(());
        }
        let mut table = routes.clone();
        table.insert(gsi, (addr, data));
        let entries: Vec<kvm_irq_routing_entry> = table
            .iter()
            .map(|(&gsi, &(addr, data))| msi_route(gsi, addr, data))
            .collect();
        let routing = KvmIrqRouting::from_entries(&entries).map_err(|_| {
            hv::Error::InvalidState(format!("{} interrupt routes are too many", entries.len()))
        })?;
        self.shared
            .fd
            .set_gsi_routing(&routing)
            .map_err(backend_err("KVM_SET_GSI_ROUTING"))?;
        *routes = table;
        Ok(())
    }

    fn register_irqfd(&self, gsi: u32, fd: &EventFd) -> hv::Result<()> {
        self.shared
            .fd
            .register_irqfd(fd, gsi)
            .map_err(backend_err("KVM_IRQFD"))
    }

    fn unregister_irqfd(&self, gsi: u32, fd: &EventFd) -> hv::Result<()> {
        self.shared
            .fd
            .unregister_irqfd(fd, gsi)
            .map_err(backend_err("KVM_IRQFD(DEASSIGN)"))
    }

    fn set_state(&self, state: &VmState) -> hv::Result<()> {
        if !within_tolerance(state.tsc_khz, self.shared.tsc_khz) {
            return Err(hv::Error::Incompatible(format!(
                "saved VM has a {} kHz TSC, this VM runs at {} kHz",
                state.tsc_khz, self.shared.tsc_khz
            )));
        }
        self.user_extra.lock().unwrap_or_else(|p| p.into_inner()).0 |= state.user_extra.0;
        let clock = kvm_clock_data {
            clock: state.clock_ns,
            ..Default::default()
        };
        self.shared
            .fd
            .set_clock(&clock)
            .map_err(backend_err("KVM_SET_CLOCK"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_tolerance_is_a_tenth_of_a_percent() {
        assert!(within_tolerance(2_600_000, 2_601_000));
        assert!(within_tolerance(2_602_600, 2_600_000));
        assert!(!within_tolerance(2_602_700, 2_600_000));
    }
}
