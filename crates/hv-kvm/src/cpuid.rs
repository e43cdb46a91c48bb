//! CPU models under KVM: the `host` model, the check of a model against what this host can
//! present, and the per-vCPU CPUID table handed to `KVM_SET_CPUID2`.
//!
//! What a guest really sees on the PVM flavour of KVM differs from what `KVM_SET_CPUID2` asks
//! for in some leaves; `docs/kvm-platform.md` records the measurement.

use hv::cpu_model::feature;
use hv::state::msr;
use hv::{CpuModel, CpuidEntry};
use kvm_bindings::{CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, kvm_cpuid_entry2};

/// KVM paravirtual features (CPUID 0x4000_0001 EAX) a host model keeps: those whose state is
/// fully in the saved MSRs or needs none. Async page faults are left out (their MSRs and
/// interrupt vector are not part of the saved state).
const KVM_PV_KEPT: u32 = (1 << 0) // CLOCKSOURCE
    | (1 << 1) // NOP_IO_DELAY
    | (1 << 3) // CLOCKSOURCE2
    | (1 << 5) // STEAL_TIME
    | (1 << 6) // PV_EOI
    | (1 << 7) // PV_UNHALT
    | (1 << 9) // PV_TLB_FLUSH
    | (1 << 11) // PV_SEND_IPI
    | (1 << 12) // POLL_CONTROL
    | (1 << 13) // PV_SCHED_YIELD
    | (1 << 24); // CLOCKSOURCE_STABLE

const IA32_SPEC_CTRL: u32 = 0x48;
const IA32_XSS: u32 = 0xda0;

/// Bits of (leaf, register) that KVM always provides itself, whatever `KVM_GET_SUPPORTED_CPUID`
/// says: the in-kernel local APIC (x2APIC, TSC deadline) and the hypervisor bit.
fn kvm_provides(function: u32, reg: usize) -> u32 {
    match (function, reg) {
        (1, 2) => feature::X2APIC | feature::TSC_DEADLINE | feature::HYPERVISOR,
        (1, 3) => feature::APIC | feature::HTT,
        _ => 0,
    }
}

/// Instruction-set bits a vCPU executes natively on this PVM host whatever CPUID says (the guest
/// runs on the host CPU; no intercept is involved), so they are available when the host CPU has
/// them even if `KVM_GET_SUPPORTED_CPUID` hides them. Measured, see `docs/kvm-platform.md`.
fn native_isa(function: u32, reg: usize) -> u32 {
    use feature::*;
    match (function, reg) {
        (1, 2) => {
            SSE3 | PCLMULQDQ
                | SSSE3
                | FMA
                | CX16
                | SSE4_1
                | SSE4_2
                | MOVBE
                | POPCNT
                | AES
                | F16C
                | RDRAND
        }
        (1, 3) => FPU | CX8 | CMOV | MMX | FXSR | SSE | SSE2 | CLFSH,
        // Leaf 7 ISA bits of the portable-v3 model: FSGSBASE, BMI1, AVX2, BMI2, ERMS, RDSEED,
        // ADX, CLFLUSHOPT, CLWB, SHA (EBX); RDPID (ECX). What KVM's own emulator cannot run
        // at CPL 0 it hands to emu's instruction emulator, which implements them.
        (7, 1) => {
            (1 << 0)
                | (1 << 3)
                | (1 << 5)
                | (1 << 8)
                | (1 << 9)
                | (1 << 18)
                | (1 << 19)
                | (1 << 23)
                | (1 << 24)
                | (1 << 29)
        }
        (7, 2) => 1 << 22,
        (0x8000_0001, 2) => LAHF_LM | (1 << 5) | (1 << 6) | (1 << 8), // ABM, SSE4A, PREFETCHW
        (0x8000_0001, 3) => 1 << 27,                                  // RDTSCP
        _ => 0,
    }
}

/// Feature registers the model check compares bit by bit: (function, index, [eax, ebx, ecx, edx]
/// compared?).
const FEATURE_LEAVES: &[(u32, u32, [bool; 4])] = &[
    (1, 0, [false, false, true, true]),
    (7, 0, [false, true, true, true]),
    (0x8000_0001, 0, [false, false, true, true]),
    (0x4000_0001, 0, [true, false, false, false]),
];

fn regs(e: &CpuidEntry) -> [u32; 4] {
    [e.eax, e.ebx, e.ecx, e.edx]
}

fn reg_name(i: usize) -> &'static str {
    ["eax", "ebx", "ecx", "edx"][i & 3]
}

/// The host CPU's own CPUID, for the native-ISA allowance.
fn host_cpuid(function: u32, index: u32) -> [u32; 4] {
    let r = std::arch::x86_64::__cpuid_count(function, index);
    [r.eax, r.ebx, r.ecx, r.edx]
}

pub fn entry_from_kvm(e: &kvm_cpuid_entry2) -> CpuidEntry {
    CpuidEntry {
        function: e.function,
        index: e.index,
        indexed: e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
    }
}

pub fn entry_to_kvm(e: &CpuidEntry) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function: e.function,
        index: if e.indexed { e.index } else { 0 },
        flags: if e.indexed {
            KVM_CPUID_FLAG_SIGNIFCANT_INDEX
        } else {
            0
        },
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
        ..Default::default()
    }
}

/// The CPUID table of vCPU `id` in KVM's form. On top of [`CpuModel::cpuid_for`], the x2APIC
/// ID of the topology leaves (0xB, 0x1F) is set, which a host model carries from the host.
pub fn kvm_cpuid_for(model: &CpuModel, id: u32, count: u32) -> hv::Result<CpuId> {
    let entries: Vec<kvm_cpuid_entry2> = model
        .cpuid_for(id, count)
        .iter()
        .map(|e| {
            let mut k = entry_to_kvm(e);
            if k.function == 0xb || k.function == 0x1f {
                k.edx = id;
            }
            k
        })
        .collect();
    CpuId::from_entries(&entries).map_err(|_| {
        hv::Error::Incompatible(format!(
            "CPU model {} has too many CPUID leaves",
            model.name
        ))
    })
}

/// FNV-1a over the table: a short, stable digest for the host model's name.
fn digest(entries: &[CpuidEntry]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for e in entries {
        for w in [
            e.function,
            e.index,
            u32::from(e.indexed),
            e.eax,
            e.ebx,
            e.ecx,
            e.edx,
        ] {
            for b in w.to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
    h
}

/// The `host` model: KVM's supported table with the bits KVM provides itself, the paravirtual
/// features trimmed to those whose state is saved, and the MSRs that state needs.
pub fn host_model(supported: &[kvm_cpuid_entry2], msr_index: &[u32]) -> CpuModel {
    let mut cpuid: Vec<CpuidEntry> = supported.iter().map(entry_from_kvm).collect();
    for e in &mut cpuid {
        match e.function {
            1 => {
                e.ecx |= kvm_provides(1, 2);
                e.ecx &= !feature::OSXSAVE; // dynamic: mirrors CR4.OSXSAVE
                e.edx |= kvm_provides(1, 3);
            }
            0x4000_0001 => e.eax &= KVM_PV_KEPT,
            _ => {}
        }
        // The APIC ID of the host CPU this thread happened to run on is per vCPU, not part of
        // the model (`CpuModel::cpuid_for` fills it in); keeping it would name the same host
        // differently from one run to the next.
        match e.function {
            1 => e.ebx &= 0x00ff_ffff,
            0xb | 0x1f => e.edx = 0,
            _ => {}
        }
    }
    let pv = cpuid
        .iter()
        .find(|e| e.function == 0x4000_0001)
        .map_or(0, |e| e.eax);
    let leaf = |f: u32, i: u32| {
        cpuid
            .iter()
            .find(|e| e.function == f && (!e.indexed || e.index == i))
            .map_or([0; 4], regs)
    };
    let mut msrs = CpuModel::portable_msrs();
    let mut add = |cond: bool, m: u32| {
        if cond {
            msrs.push(m);
        }
    };
    add(leaf(0x8000_0001, 0)[3] & (1 << 27) != 0, msr::IA32_TSC_AUX); // RDTSCP
    add(leaf(7, 0)[3] & (1 << 26) != 0, IA32_SPEC_CTRL); // IBRS/IBPB
    add(leaf(0xd, 1)[0] & (1 << 3) != 0, IA32_XSS); // XSAVES
    add(pv & (1 << 5) != 0, msr::KVM_STEAL_TIME);
    add(pv & (1 << 6) != 0, msr::KVM_PV_EOI_EN);
    add(pv & (1 << 12) != 0, msr::KVM_POLL_CONTROL);
    msrs.retain(|m| msr_index.contains(m));
    msrs.sort_unstable();
    msrs.dedup();
    CpuModel {
        name: format!("host:kvm:{:016x}", digest(&cpuid)),
        cpuid,
        msrs,
    }
}

/// Refuses a model that needs a feature bit neither KVM nor (for plain instruction-set bits) the
/// host CPU provides, naming the first such bit.
pub fn check_model(model: &CpuModel, supported: &[kvm_cpuid_entry2]) -> hv::Result<()> {
    let sup: Vec<CpuidEntry> = supported.iter().map(entry_from_kvm).collect();
    for &(function, index, compared) in FEATURE_LEAVES {
        let Some(want) = model.lookup(function, index) else {
            continue;
        };
        let have = sup
            .iter()
            .find(|e| e.function == function && (!e.indexed || e.index == index))
            .map_or([0; 4], regs);
        let native = host_cpuid(function, index);
        for (r, (&w, &h)) in regs(want).iter().zip(have.iter()).enumerate() {
            if !compared[r] {
                continue;
            }
            let mut allowed = h | kvm_provides(function, r);
            if function == 1 && r == 2 {
                allowed |= feature::OSXSAVE;
            }
            allowed |= native[r] & native_isa(function, r);
            let missing = w & !allowed;
            if missing != 0 {
                return Err(hv::Error::Incompatible(format!(
                    "CPU model {} needs CPUID.{function:#x}.{index}:{} bit {} which KVM on this host cannot provide",
                    model.name,
                    reg_name(r),
                    missing.trailing_zeros()
                )));
            }
        }
    }
    Ok(())
}

/// The ISA features this host's CPU shows to user code (`cpuid` executed natively), which is
/// what guest user mode sees under KVM's PVM flavour when CPUID faulting is unavailable.
pub fn host_user_features() -> hv::cpu_model::FeatureSet {
    hv::cpu_model::Feature::ALL
        .iter()
        .copied()
        .filter(|f| {
            let b = f.bit();
            let max = host_cpuid(b.function & 0x8000_0000, 0)[0];
            b.function <= max
                && host_cpuid(b.function, b.index)
                    .get(usize::from(b.reg))
                    .is_some_and(|r| r & (1 << b.bit) != 0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sup(function: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    #[test]
    fn host_model_is_named_by_digest_and_trims_pv_features() {
        let table = [
            sup(0, 0xd, 1, 2, 3),
            sup(1, 0, 0, feature::OSXSAVE, 0),
            sup(0x4000_0001, 0xffff_ffff, 0, 0, 0),
        ];
        let list = [msr::IA32_TSC, msr::KVM_STEAL_TIME, msr::IA32_LSTAR];
        let m = host_model(&table, &list);
        assert!(m.name.starts_with("host:kvm:"));
        assert_eq!(m.name.len(), "host:kvm:".len() + 16);
        assert_eq!(m.lookup(0x4000_0001, 0).map(|e| e.eax), Some(KVM_PV_KEPT));
        assert_eq!(m.leaf1_features().0 & feature::OSXSAVE, 0);
        assert!(m.msrs.contains(&msr::KVM_STEAL_TIME));
        assert!(!m.msrs.contains(&msr::IA32_PAT), "not in KVM's list");
        let mut other = table;
        other[0].ebx = 9;
        assert_ne!(host_model(&other, &list).name, m.name);
        // The host CPU's APIC ID (leaf 1 EBX[31:24], leaf 0xB EDX) does not change the model.
        let mut moved = table.to_vec();
        moved[1].ebx = 7 << 24;
        moved.push(sup(0xb, 0, 0, 0, 7));
        let mut there = table.to_vec();
        there.push(sup(0xb, 0, 0, 0, 3));
        assert_eq!(
            host_model(&moved, &list).name,
            host_model(&there, &list).name
        );
    }

    #[test]
    fn check_names_the_missing_bit() {
        let table = [sup(0x4000_0001, 1 << 3, 0, 0, 0)];
        let mut m = CpuModel::portable();
        m.cpuid.retain(|e| e.function == 0x4000_0001);
        let err = check_model(&m, &table).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some(
                "CPU model portable-v2 needs CPUID.0x40000001.0:eax bit 24 which KVM on this host cannot provide"
            )
        );
        let table = [sup(0x4000_0001, (1 << 3) | (1 << 24), 0, 0, 0)];
        assert!(check_model(&m, &table).is_ok());
    }
}
