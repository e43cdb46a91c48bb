//! `emu`: a software x86-64 CPU behind the `hv` contract.
//!
//! Instructions are decoded with `iced-x86` and executed by this crate's own code (`exec`,
//! `system`, `string`, `sse`). Guest RAM is accessed only through `hv::GuestMemory`, so every
//! vCPU write lands in the memory's dirty bitmap. The local APIC (xAPIC at the APIC base),
//! the TSC and kvm-clock live here; everything else on the platform is reached through
//! `hv::DeviceIo`.
//!
//! * [`EmuHypervisor`] implements `hv::Hypervisor` (kind `Emu`).
//! * [`Emulator`] implements `hv::InstructionEmulator` for the KVM backend: one instruction on
//!   a neutral `CpuState`.
#![forbid(unsafe_code)]

mod avx;
mod clock;
mod cpu;
mod crypto;
mod decode;
mod exec;
mod ext;
mod fast;
mod jit;
mod lapic;
mod mmu;
mod mmx;
mod sse;
mod ssefp;
mod string;
mod system;
#[cfg(test)]
mod testutil;
mod vcpu;
mod vfp;
mod vm;
mod x87;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use hv::cpu_model::FeatureSet;
use hv::{BackendKind, CpuModel, CpuState, DeviceIo, GuestMemory, VmConfig, VmState};
use vm_memory::GuestMemoryBackend as _;

pub use clock::default_tsc_khz;
pub use jit::{Engine, flags_defined_throughout, run_engine};
pub use vcpu::{EmuVcpu, disassemble};

/// Instructions decoded so far (decode-cache misses) by all emu vCPUs in this process.
pub fn instructions_decoded() -> u64 {
    decode::DECODES.load(Ordering::Relaxed)
}

/// Times emu vCPUs of this process handed user mode to a user-mode accelerator's runner.
pub fn user_mode_runs() -> u64 {
    vcpu::USER_RUNS.load(Ordering::Relaxed)
}

/// Instructions emu does not implement that guests of this process executed: each raised #UD
/// in its guest (and was logged, rate-limited) instead of ending the VM.
pub fn unsupported_instructions() -> u64 {
    vcpu::UNSUPPORTED.load(Ordering::Relaxed)
}

/// Instructions of [`instructions_retired`] that ran as translated code ([`Engine::Jit`]).
pub fn instructions_translated() -> u64 {
    jit::TRANSLATED.load(Ordering::Relaxed)
}

/// Instructions executed so far by all emu vCPUs in this process.
pub fn instructions_retired() -> u64 {
    vcpu::INSTRUCTIONS.load(Ordering::Relaxed)
}

use crate::vm::VmShared;

/// The software-CPU hypervisor backend.
#[derive(Default)]
pub struct EmuHypervisor {
    accel: Option<Arc<dyn hv::UserModeAccelerator>>,
    /// `None`: [`Engine::from_env`].
    engine: Option<Engine>,
}

impl EmuHypervisor {
    pub fn new() -> EmuHypervisor {
        EmuHypervisor {
            accel: None,
            engine: None,
        }
    }

    /// The same backend with its VMs' vCPUs run by `engine` (instead of the one
    /// `ANYVISOR_EMU_ENGINE` names).
    pub fn with_engine(mut self, engine: Engine) -> EmuHypervisor {
        self.engine = Some(engine);
        self
    }

    /// An emu backend whose vCPUs run guest user mode (CPL 3, 64-bit) through `accel` instead
    /// of interpreting it. Each vCPU gets a runner from `accel`; the VM's TSC frequency is
    /// `accel.tsc_khz()`. A VM created with a different `VmConfig::tsc_khz` (a restored or
    /// migrated one) does not use the accelerator, since its user code would see another rate.
    pub fn with_user_accelerator(accel: Arc<dyn hv::UserModeAccelerator>) -> EmuHypervisor {
        EmuHypervisor {
            accel: Some(accel),
            engine: None,
        }
    }
}

/// The ISA features emu implements: exactly the x86-64-v3 portable model's list (the one list
/// in `hv::cpu_model::Feature`; `portable-v2` is a subset).
pub fn implemented() -> FeatureSet {
    CpuModel::portable_v3().features()
}

/// Whether emu can present `model` exactly: every ISA feature it shows is implemented, and its
/// other CPUID bits (platform features of leaves 1, 7 and 0x80000001) are ones emu provides.
fn supported(model: &CpuModel) -> Result<(), String> {
    use hv::cpu_model::feature::*;
    let missing = FeatureSet(model.features().0 & !implemented().0);
    if !missing.is_empty() {
        return Err(format!("emu does not implement CPU features: {missing}"));
    }
    // Bits of (leaf, register) that implemented features occupy.
    let feature_bits = |function: u32, reg: u8| -> u32 {
        implemented()
            .iter()
            .map(|f| f.bit())
            .filter(|b| b.function == function && b.index == 0 && b.reg == reg)
            .fold(0, |acc, b| acc | (1 << b.bit))
    };
    let (ecx, edx) = model.leaf1_features();
    let ecx_ok = feature_bits(1, 2) | CX16 | TSC_DEADLINE | HYPERVISOR | OSXSAVE;
    // Platform bits besides the ISA: DE, PSE, TSC, MSR, PAE, CX8, APIC, SEP, MTRR, PGE, MCA,
    // CMOV, PAT, CLFSH, HTT and MCE.
    let edx_ok = feature_bits(1, 3)
        | DE
        | PSE
        | TSC
        | MSR
        | PAE
        | CX8
        | APIC
        | SEP
        | PGE
        | CMOV
        | PAT
        | CLFSH
        | HTT
        | (1 << 7)
        | (1 << 14)
        | (1 << 12);
    if ecx & !ecx_ok != 0 {
        return Err(format!(
            "emu does not implement CPUID.1:ECX features {:#x}",
            ecx & !ecx_ok
        ));
    }
    if edx & !edx_ok != 0 {
        return Err(format!(
            "emu does not implement CPUID.1:EDX features {:#x}",
            edx & !edx_ok
        ));
    }
    if let Some(e) = model.lookup(7, 0)
        && (e.ebx & !feature_bits(7, 1) != 0
            || e.ecx & !feature_bits(7, 2) != 0
            || e.edx & !feature_bits(7, 3) != 0)
    {
        return Err("emu does not implement CPUID.7 features".into());
    }
    if let Some(e) = model.lookup(0x8000_0001, 0) {
        let ok_ecx = LAHF_LM | feature_bits(0x8000_0001, 2);
        let ok_edx = SYSCALL | NX | LM | (1 << 11) | feature_bits(0x8000_0001, 3);
        if e.ecx & !ok_ecx != 0 || e.edx & !(ok_edx | (edx_ok & 0x0183_f3ff)) != 0 {
            return Err("emu does not implement CPUID.80000001 features".into());
        }
    }
    Ok(())
}

impl hv::Hypervisor for EmuHypervisor {
    fn kind(&self) -> BackendKind {
        BackendKind::Emu
    }

    fn check_cpu_model(&self, model: &CpuModel) -> hv::Result<()> {
        supported(model).map_err(hv::Error::Incompatible)?;
        if let Some(a) = &self.accel {
            let missing = FeatureSet(model.features().0 & !a.native_features().0);
            if !missing.is_empty() {
                return Err(hv::Error::Incompatible(format!(
                    "this host's CPU, which runs guest user mode, lacks: {missing}"
                )));
            }
        }
        Ok(())
    }

    fn check_user_extra(&self, extra: FeatureSet) -> hv::Result<()> {
        let missing = FeatureSet(extra.0 & !implemented().0);
        if missing.is_empty() {
            Ok(())
        } else {
            Err(hv::Error::Incompatible(format!(
                "guest user code has seen CPU features emu does not implement: {missing}"
            )))
        }
    }

    fn host_cpu_model(&self) -> hv::Result<CpuModel> {
        // The software CPU offers exactly the portable model.
        Ok(CpuModel::portable())
    }

    fn create_vm(&self, config: VmConfig) -> hv::Result<Arc<dyn hv::Vm>> {
        self.check_cpu_model(&config.cpu_model)?;
        if config.vcpus == 0 || config.vcpus > 255 {
            return Err(hv::Error::Incompatible(format!(
                "emu supports 1 to 255 vCPUs, not {}",
                config.vcpus
            )));
        }
        let (tsc_khz, accel) = match (&self.accel, config.tsc_khz) {
            (Some(a), None) => (a.tsc_khz(), Some(a.clone())),
            (Some(a), Some(k)) if k == a.tsc_khz() => (k, Some(a.clone())),
            (_, k) => (k.unwrap_or_else(default_tsc_khz), None),
        };
        let max_addr = config.memory.last_addr().0;
        let mut shared = VmShared::new(config.cpu_model.clone(), config.vcpus, tsc_khz, max_addr);
        shared.engine = self.engine.unwrap_or_else(Engine::from_env);
        if let Some(a) = &accel {
            shared.clock.use_host_tsc(a.clone());
            shared.user_extra = std::sync::Mutex::new(a.user_visible_extra(&config.cpu_model));
        }
        let shared = Arc::new(shared);
        // Device DMA and other writes through the memory's accessors invalidate cached code.
        let watch: Arc<dyn hv::WriteWatch> = shared.clone();
        hv::watch_writes(&config.memory, watch);
        Ok(Arc::new(EmuVm {
            memory: config.memory,
            shared,
            created: std::sync::Mutex::new(vec![false; config.vcpus as usize]),
            accel,
        }))
    }
}

/// A VM whose vCPUs run in software.
pub struct EmuVm {
    memory: Arc<GuestMemory>,
    shared: Arc<VmShared>,
    created: std::sync::Mutex<Vec<bool>>,
    accel: Option<Arc<dyn hv::UserModeAccelerator>>,
}

impl Drop for EmuVm {
    fn drop(&mut self) {
        let watch: Arc<dyn hv::WriteWatch> = self.shared.clone();
        hv::unwatch_writes(&self.memory, &watch);
    }
}

impl hv::Vm for EmuVm {
    fn kind(&self) -> BackendKind {
        BackendKind::Emu
    }

    fn create_vcpu(&self, id: u32) -> hv::Result<Box<dyn hv::Vcpu>> {
        let mut created = vm::lock(&self.created);
        match created.get_mut(id as usize) {
            None => Err(hv::Error::InvalidState(format!(
                "vCPU {id} is outside the VM's {} vCPUs",
                self.shared.vcpu_count
            ))),
            Some(true) => Err(hv::Error::InvalidState(format!("vCPU {id} already exists"))),
            Some(c) => {
                let runner = match &self.accel {
                    Some(a) => {
                        let r = a.create_runner(id, self.memory.clone())?;
                        if let Some(v) = self.shared.vcpus.get(id as usize) {
                            let _ = v.user_kicker.set(r.kicker());
                        }
                        Some(r)
                    }
                    None => None,
                };
                *c = true;
                let mut v = EmuVcpu::new(id, self.memory.clone(), self.shared.clone());
                v.set_user_runner(runner);
                Ok(Box::new(v))
            }
        }
    }

    fn signal_msi(&self, addr: u64, data: u32) -> hv::Result<()> {
        if addr >> 20 != 0xfee {
            return Err(hv::Error::InvalidState(format!(
                "MSI address {addr:#x} is outside 0xfee00000-0xfeefffff"
            )));
        }
        self.shared.signal_msi(addr, data);
        Ok(())
    }

    fn tsc_khz(&self) -> u32 {
        self.shared.clock.tsc_khz
    }

    fn set_dirty_tracking(&self, _enabled: bool) -> hv::Result<()> {
        // vCPU writes go through GuestMemory and its bitmap.
        Ok(())
    }

    /// The pages the memory's dirty bitmap has marked (then reset), after which no vCPU
    /// stores through a translated write that skips the bitmap for an already-dirty page
    /// (see `VmShared::quiesce_unlogged_writes`): harvesting here, not only in the VMM, puts
    /// the reset before that hand-shake, so every first write of the next round is marked.
    fn take_dirty_log(&self) -> hv::Result<Vec<u64>> {
        use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};
        let mut pages = Vec::new();
        for region in self.memory.iter() {
            let first = region.start_addr().0 / hv::PAGE_SIZE;
            let bitmap = std::ops::Deref::deref(region).bitmap();
            for (word_index, word) in (0u64..).zip(bitmap.get_and_reset()) {
                let mut bits = word;
                while bits != 0 {
                    let bit = u64::from(bits.trailing_zeros());
                    pages.push(first + word_index * 64 + bit);
                    bits &= bits - 1;
                }
            }
        }
        self.shared.quiesce_unlogged_writes();
        Ok(pages)
    }

    fn state(&self) -> hv::Result<VmState> {
        let c = &self.shared.clock;
        Ok(VmState {
            clock_ns: c.kvmclock_ns(c.state_ns()),
            tsc_khz: c.tsc_khz,
            user_extra: *vm::lock(&self.shared.user_extra),
        })
    }

    fn set_state(&self, state: &VmState) -> hv::Result<()> {
        if state.tsc_khz != self.shared.clock.tsc_khz {
            return Err(hv::Error::InvalidState(format!(
                "VM state has a TSC of {} kHz, this VM runs at {} kHz",
                state.tsc_khz, self.shared.clock.tsc_khz
            )));
        }
        // What the guest's user code has seen stays part of the VM, wherever it moves.
        let mut extra = vm::lock(&self.shared.user_extra);
        extra.0 |= state.user_extra.0;
        drop(extra);
        self.shared.clock.set_kvmclock_ns(state.clock_ns);
        self.shared.clock_epoch.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }
}

/// Executes single instructions for another backend (KVM) on a neutral [`CpuState`].
pub struct Emulator {
    shared: VmShared,
}

impl Emulator {
    pub fn new(model: CpuModel) -> Emulator {
        Emulator {
            shared: VmShared::new(model, 1, default_tsc_khz(), 0),
        }
    }
}

impl hv::InstructionEmulator for Emulator {
    fn emulate_one(
        &self,
        state: &mut CpuState,
        memory: &GuestMemory,
        io: &dyn DeviceIo,
    ) -> hv::Result<()> {
        vcpu::emulate_one(&self.shared, state, memory, io)
    }
}
