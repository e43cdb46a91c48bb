//! The CPU a guest sees, as data: CPUID leaves and the MSRs the platform saves and restores.
//!
//! The `portable` model is identical on every backend and host so a VM can move anywhere; it is
//! documented leaf by leaf in `docs/cpu-model.md`. `host` models are built by a backend from what
//! its host offers and can only move to an identical host.

use serde::{Deserialize, Serialize};

use crate::state::msr;

/// One CPUID leaf (and sub-leaf).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    pub function: u32,
    /// Sub-leaf; only meaningful when `indexed`.
    pub index: u32,
    /// The leaf depends on ECX (sub-leaf).
    pub indexed: bool,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// A CPU model: its name, CPUID table and the MSRs a guest of this model may use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuModel {
    /// `portable-v3`, `portable-v2` (`portable-v1` in snapshots of earlier versions: the same
    /// x86-64-v2 CPU), or `host:<backend>:<digest>` for host models.
    pub name: String,
    /// Leaves as the bootstrap processor sees them in a one-vCPU VM; see [`CpuModel::cpuid_for`].
    pub cpuid: Vec<CpuidEntry>,
    /// MSRs that make up a vCPU's state under this model, in ascending order.
    pub msrs: Vec<u32>,
}

/// Feature bits of the portable model, named where code needs to test them.
pub mod feature {
    // CPUID.1:ECX
    pub const SSE3: u32 = 1 << 0;
    pub const PCLMULQDQ: u32 = 1 << 1;
    pub const SSSE3: u32 = 1 << 9;
    pub const FMA: u32 = 1 << 12;
    pub const CX16: u32 = 1 << 13;
    pub const SSE4_1: u32 = 1 << 19;
    pub const SSE4_2: u32 = 1 << 20;
    pub const X2APIC: u32 = 1 << 21;
    pub const MOVBE: u32 = 1 << 22;
    pub const POPCNT: u32 = 1 << 23;
    pub const TSC_DEADLINE: u32 = 1 << 24;
    pub const AES: u32 = 1 << 25;
    pub const XSAVE: u32 = 1 << 26;
    pub const OSXSAVE: u32 = 1 << 27;
    pub const AVX: u32 = 1 << 28;
    pub const F16C: u32 = 1 << 29;
    pub const RDRAND: u32 = 1 << 30;
    pub const HYPERVISOR: u32 = 1 << 31;
    // CPUID.1:EDX
    pub const FPU: u32 = 1 << 0;
    pub const DE: u32 = 1 << 2;
    pub const PSE: u32 = 1 << 3;
    pub const TSC: u32 = 1 << 4;
    pub const MSR: u32 = 1 << 5;
    pub const PAE: u32 = 1 << 6;
    pub const CX8: u32 = 1 << 8;
    pub const APIC: u32 = 1 << 9;
    pub const SEP: u32 = 1 << 11;
    pub const PGE: u32 = 1 << 13;
    pub const CMOV: u32 = 1 << 15;
    pub const PAT: u32 = 1 << 16;
    pub const CLFSH: u32 = 1 << 19;
    pub const MMX: u32 = 1 << 23;
    pub const FXSR: u32 = 1 << 24;
    pub const SSE: u32 = 1 << 25;
    pub const SSE2: u32 = 1 << 26;
    pub const HTT: u32 = 1 << 28;
    // CPUID.80000001:ECX / EDX
    pub const LAHF_LM: u32 = 1 << 0;
    pub const SYSCALL: u32 = 1 << 11;
    pub const NX: u32 = 1 << 20;
    pub const LM: u32 = 1 << 29;
    // CPUID.6:EAX
    pub const ARAT: u32 = 1 << 2;
    // CPUID.80000007:EDX
    pub const INVARIANT_TSC: u32 = 1 << 8;
    // CPUID.40000001:EAX (KVM paravirtual features)
    pub const KVM_CLOCKSOURCE2: u32 = 1 << 3;
    pub const KVM_CLOCKSOURCE_STABLE: u32 = 1 << 24;
}

/// Declares [`Feature`] with the CPUID bit of each variant: one list for the enum, its
/// [`Feature::ALL`] and [`Feature::bit`].
macro_rules! features {
    ($($name:ident => ($function:expr, $index:expr, $reg:expr, $bit:expr)),* $(,)?) => {
        /// An instruction-set feature a model may show, with the CPUID bit that shows it.
        ///
        /// This is the one list of ISA features: models are built from it
        /// (`CpuModel::portable*`), emu gates every instruction family on [`CpuModel::has`], and
        /// snapshot/migration compare the features a VM's user code may use against what a
        /// destination runs.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[repr(u8)]
        #[serde(rename_all = "lowercase")]
        pub enum Feature {
            $($name),*
        }

        impl Feature {
            /// Every feature, in declaration order.
            pub const ALL: &'static [Feature] = &[$(Feature::$name),*];

            /// The CPUID bit (leaf, sub-leaf, register 0..=3 = EAX..EDX, bit) that shows this
            /// feature.
            pub const fn bit(self) -> FeatureBit {
                let (function, index, reg, bit) = match self {
                    $(Feature::$name => ($function, $index, $reg, $bit)),*
                };
                FeatureBit {
                    function,
                    index,
                    reg,
                    bit,
                }
            }
        }
    };
}

/// Where CPUID shows a feature: leaf, sub-leaf, register (0 EAX, 1 EBX, 2 ECX, 3 EDX) and bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeatureBit {
    pub function: u32,
    pub index: u32,
    pub reg: u8,
    pub bit: u8,
}

features! {
    Fpu => (1, 0, 3, 0),
    Mmx => (1, 0, 3, 23),
    Fxsr => (1, 0, 3, 24),
    Sse => (1, 0, 3, 25),
    Sse2 => (1, 0, 3, 26),
    Sse3 => (1, 0, 2, 0),
    Ssse3 => (1, 0, 2, 9),
    Sse41 => (1, 0, 2, 19),
    Sse42 => (1, 0, 2, 20),
    Popcnt => (1, 0, 2, 23),
    Cx16 => (1, 0, 2, 13),
    Pclmulqdq => (1, 0, 2, 1),
    Aes => (1, 0, 2, 25),
    Xsave => (1, 0, 2, 26),
    Avx => (1, 0, 2, 28),
    F16c => (1, 0, 2, 29),
    Fma => (1, 0, 2, 12),
    Movbe => (1, 0, 2, 22),
    Rdrand => (1, 0, 2, 30),
    Bmi1 => (7, 0, 1, 3),
    Bmi2 => (7, 0, 1, 8),
    Avx2 => (7, 0, 1, 5),
    Abm => (0x8000_0001, 0, 2, 5),
    Adx => (7, 0, 1, 19),
    Rdseed => (7, 0, 1, 18),
    Sha => (7, 0, 1, 29),
    Fsgsbase => (7, 0, 1, 0),
    Clflushopt => (7, 0, 1, 23),
    Clwb => (7, 0, 1, 24),
    Rdtscp => (0x8000_0001, 0, 3, 27),
    Rdpid => (7, 0, 2, 22),
    Xsaveopt => (0xd, 1, 0, 0),
    Xsavec => (0xd, 1, 0, 1),
    Xgetbv1 => (0xd, 1, 0, 2),
    Xsaves => (0xd, 1, 0, 3),
    Sse4a => (0x8000_0001, 0, 2, 6),
    Avx512f => (7, 0, 1, 16),
    Avx512dq => (7, 0, 1, 17),
    Avx512cd => (7, 0, 1, 28),
    Avx512bw => (7, 0, 1, 30),
    Avx512vl => (7, 0, 1, 31),
    Avx512ifma => (7, 0, 1, 21),
    Avx512vbmi => (7, 0, 2, 1),
    Avx512vbmi2 => (7, 0, 2, 6),
    Avx512vnni => (7, 0, 2, 11),
    Avx512bitalg => (7, 0, 2, 12),
    Avx512vpopcntdq => (7, 0, 2, 14),
    Avx512bf16 => (7, 1, 0, 5),
    Avx512fp16 => (7, 0, 3, 23),
    AvxVnni => (7, 1, 0, 4),
    Gfni => (7, 0, 2, 8),
    Vaes => (7, 0, 2, 9),
    Vpclmulqdq => (7, 0, 2, 10),
    Rtm => (7, 0, 1, 11),
    Hle => (7, 0, 1, 4),
    Erms => (7, 0, 1, 9),
    Fsrm => (7, 0, 3, 4),
    Smep => (7, 0, 1, 7),
    Smap => (7, 0, 1, 20),
    Umip => (7, 0, 2, 2),
    Invpcid => (7, 0, 1, 10),
    Serialize => (7, 0, 3, 14),
    Movdiri => (7, 0, 2, 27),
    Movdir64b => (7, 0, 2, 28),
    Cldemote => (7, 0, 2, 25),
}

/// A set of [`Feature`]s as a bit mask (bit n = the feature with discriminant n). Serialized as
/// a list of feature names, so a saved set does not depend on the enum's order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "Vec<Feature>", from = "Vec<Feature>")]
pub struct FeatureSet(pub u128);

impl From<FeatureSet> for Vec<Feature> {
    fn from(s: FeatureSet) -> Self {
        s.iter().collect()
    }
}

impl From<Vec<Feature>> for FeatureSet {
    fn from(v: Vec<Feature>) -> Self {
        v.into_iter().collect()
    }
}

impl std::fmt::Display for FeatureSet {
    /// Lower-case feature names separated by spaces (`avx512f sha`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self
            .iter()
            .map(|x| format!("{x:?}").to_ascii_lowercase())
            .collect();
        f.write_str(&names.join(" "))
    }
}

impl FeatureSet {
    pub const fn is_empty(&self) -> bool {
        self.0 == 0
    }

    pub const fn contains(self, f: Feature) -> bool {
        self.0 & (1u128 << (f as u8)) != 0
    }

    pub fn insert(&mut self, f: Feature) {
        self.0 |= 1u128 << (f as u8);
    }

    /// The features of `self` that `other` lacks.
    pub fn missing_from(self, other: FeatureSet) -> Vec<Feature> {
        Feature::ALL
            .iter()
            .copied()
            .filter(|f| self.contains(*f) && !other.contains(*f))
            .collect()
    }

    pub fn iter(self) -> impl Iterator<Item = Feature> {
        Feature::ALL
            .iter()
            .copied()
            .filter(move |f| self.contains(*f))
    }
}

impl FromIterator<Feature> for FeatureSet {
    fn from_iter<I: IntoIterator<Item = Feature>>(iter: I) -> Self {
        let mut s = FeatureSet::default();
        for f in iter {
            s.insert(f);
        }
        s
    }
}

/// The KVM paravirtual signature, "KVMKVMKVM\0\0\0", as EBX, ECX, EDX.
pub const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

fn leaf(function: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> CpuidEntry {
    CpuidEntry {
        function,
        index: 0,
        indexed: false,
        eax,
        ebx,
        ecx,
        edx,
    }
}

fn str_regs(s: &[u8; 16]) -> [u32; 4] {
    let mut regs = [0; 4];
    for (r, c) in regs.iter_mut().zip(s.as_chunks::<4>().0) {
        *r = u32::from_le_bytes(*c);
    }
    regs
}

impl CpuModel {
    pub const PORTABLE_NAME: &'static str = "portable-v2";

    /// The portable model: an x86-64-v2 CPU ("AuthenticAMD", family 15 model 107 like QEMU's
    /// `qemu64`, plus SSE3-SSE4.2, POPCNT, CX16), TSC-deadline local APIC, always-running APIC timer,
    /// and the KVM paravirtual leaves with kvm-clock. No XSAVE/AVX, no x2APIC, no PCID.
    pub fn portable() -> CpuModel {
        use feature::*;
        let [auth, enti, camd] = [*b"Auth", *b"enti", *b"cAMD"].map(u32::from_le_bytes);
        let leaf1_ecx = SSE3 | SSSE3 | CX16 | SSE4_1 | SSE4_2 | POPCNT | TSC_DEADLINE | HYPERVISOR;
        let leaf1_edx = FPU
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
            | MMX
            | FXSR
            | SSE
            | SSE2
            | HTT;
        let brand = [
            str_regs(b"anyvisor portabl"),
            str_regs(b"e x86-64-v2 CPU\0"),
            [0; 4],
        ];
        let mut cpuid = vec![
            // Max basic leaf 7, vendor "AuthenticAMD" (EBX, EDX, ECX order).
            leaf(0, 7, auth, camd, enti),
            // Family 15, model 107, stepping 1. EBX: CLFLUSH 64 bytes, 1 logical CPU, APIC ID 0.
            leaf(1, 0x0006_0fb1, 0x0001_0800, leaf1_ecx, leaf1_edx),
            leaf(6, ARAT, 0, 0, 0),
            CpuidEntry {
                function: 7,
                index: 0,
                indexed: true,
                eax: 0,
                ebx: 0,
                ecx: 0,
                edx: 0,
            },
            leaf(
                0x4000_0000,
                0x4000_0001,
                KVM_SIGNATURE[0],
                KVM_SIGNATURE[1],
                KVM_SIGNATURE[2],
            ),
            leaf(
                0x4000_0001,
                KVM_CLOCKSOURCE2 | KVM_CLOCKSOURCE_STABLE,
                0,
                0,
                0,
            ),
            leaf(0x8000_0000, 0x8000_0008, auth, camd, enti),
            leaf(0x8000_0001, 0x0006_0fb1, 0, LAHF_LM, SYSCALL | NX | LM),
        ];
        for (function, regs) in (0x8000_0002u32..).zip(brand.iter()) {
            cpuid.push(leaf(function, regs[0], regs[1], regs[2], regs[3]));
        }
        cpuid.extend([
            leaf(0x8000_0005, 0, 0, 0, 0),
            leaf(0x8000_0006, 0, 0, 0, 0),
            // No invariant-TSC bit: Linux then keeps kvm-clock as its clocksource, which every
            // backend can keep continuous across a move even when the raw TSC jumps.
            leaf(0x8000_0007, 0, 0, 0, 0),
            // 40 physical, 48 linear address bits; ECX: number of cores - 1.
            leaf(0x8000_0008, 0x3028, 0, 0, 0),
        ]);
        CpuModel {
            name: Self::PORTABLE_NAME.to_string(),
            cpuid,
            msrs: Self::portable_msrs(),
        }
    }

    pub const PORTABLE_V3_NAME: &'static str = "portable-v3";

    /// The x86-64-v3 portable model: [`CpuModel::portable`] plus AVX, AVX2, FMA, F16C, BMI1,
    /// BMI2, LZCNT (ABM), MOVBE, XSAVE (x87|SSE|AVX; XSAVEOPT, XSAVEC, XGETBV1), AES-NI,
    /// PCLMULQDQ, SHA-NI, RDRAND, RDSEED, ADX, RDTSCP, RDPID, CLFLUSHOPT, CLWB, FSGSBASE and
    /// ERMS. Leaf 1 ECX.OSXSAVE and leaf 0xD's EBX follow the vCPU's CR4 and XCR0 (the backend
    /// fills them in at `cpuid` time, as hardware does).
    pub fn portable_v3() -> CpuModel {
        use Feature::*;
        let mut m = CpuModel::portable();
        m.name = Self::PORTABLE_V3_NAME.to_string();
        for f in [
            Pclmulqdq, Fma, Movbe, Aes, Xsave, Avx, F16c, Rdrand, Fsgsbase, Bmi1, Avx2, Bmi2, Erms,
            Rdseed, Adx, Clflushopt, Clwb, Sha, Rdpid, Xsaveopt, Xsavec, Xgetbv1, Abm, Rdtscp,
        ] {
            m.set_feature(f);
        }
        // Max basic leaf 0xd (XSAVE enumeration).
        if let Some(e) = m.cpuid.iter_mut().find(|e| e.function == 0) {
            e.eax = 0xd;
        }
        let brand = [
            str_regs(b"anyvisor portabl"),
            str_regs(b"e x86-64-v3 CPU\0"),
        ];
        for (function, regs) in (0x8000_0002u32..).zip(brand.iter()) {
            if let Some(e) = m.cpuid.iter_mut().find(|e| e.function == function) {
                [e.eax, e.ebx, e.ecx, e.edx] = *regs;
            }
        }
        // XSAVE: x87|SSE|AVX; sizes for all of them (EBX is rewritten for the current XCR0).
        let xsave_leaves = [
            CpuidEntry {
                function: 0xd,
                index: 0,
                indexed: true,
                eax: 0x7,
                ebx: 0x340,
                ecx: 0x340,
                edx: 0,
            },
            CpuidEntry {
                function: 0xd,
                index: 1,
                indexed: true,
                eax: 0,
                ebx: 0,
                ecx: 0,
                edx: 0,
            },
            CpuidEntry {
                function: 0xd,
                index: 2,
                indexed: true,
                eax: 0x100,
                ebx: 0x240,
                ecx: 0,
                edx: 0,
            },
        ];
        m.cpuid.extend(xsave_leaves);
        m.cpuid.extend(Self::avx512_xsave_layout());
        for f in [Xsaveopt, Xsavec, Xgetbv1] {
            m.set_feature(f);
        }
        m.cpuid.sort_by_key(|e| (e.function, e.index));
        // RDTSCP and RDPID read IA32_TSC_AUX: part of the vCPU state.
        m.msrs.push(msr::IA32_TSC_AUX);
        m.msrs.sort_unstable();
        m
    }

    /// CPUID leaf 0xD sub-leaves 5, 6 and 7 (opmask, ZMM_Hi256, Hi16_ZMM: 64, 512 and 1024
    /// bytes, their architectural sizes; standard-format offsets 0x440, 0x480 and 0x680 as on
    /// Intel CPUs, AMD's Zen 4 puts them at 0x340.. without the MPX hole) for a model whose
    /// XCR0 (sub-leaf 0 EAX) does not include them. glibc's compacted save area depends only
    /// on the sizes.
    ///
    /// Why a model describes components it does not support: on the hybrid `kvm` backend
    /// (PVM hosts) guest user code runs under the host's XCR0, so an `xsavec` or `xsave` there
    /// saves the host's AVX-512 components too; glibc's lazy-binding trampoline
    /// (`_dl_runtime_resolve_xsavec`, mask SSE|AVX|BNDREGS|opmask|ZMM_Hi256|Hi16_ZMM) sizes
    /// its stack save area from these sub-leaves, and with zeros here it writes 1600 bytes
    /// past it (`docs/kvm-platform.md`, "XSAVE at CPL 3"). Every backend presents the same
    /// table: sub-leaf 0 EAX still says what XCR0 may enable, so a kernel (which sizes its
    /// XSAVE buffers for the components it enables) is unaffected, and on emu and plain KVM
    /// (guest XCR0 in force) the extra reserved bytes are simply not written.
    pub fn avx512_xsave_layout() -> [CpuidEntry; 3] {
        let sub = |index, eax, ebx| CpuidEntry {
            function: 0xd,
            index,
            indexed: true,
            eax,
            ebx,
            ecx: 0,
            edx: 0,
        };
        [
            sub(5, 0x40, 0x440),
            sub(6, 0x200, 0x480),
            sub(7, 0x400, 0x680),
        ]
    }

    /// Sets the CPUID bit of `feature` (the leaf must exist).
    fn set_feature(&mut self, feature: Feature) {
        let b = feature.bit();
        if let Some(e) = self
            .cpuid
            .iter_mut()
            .find(|e| e.function == b.function && (!e.indexed || e.index == b.index))
        {
            let r = match b.reg {
                0 => &mut e.eax,
                1 => &mut e.ebx,
                2 => &mut e.ecx,
                _ => &mut e.edx,
            };
            *r |= 1 << b.bit;
        }
    }

    /// MSRs saved and restored for every vCPU of the portable model.
    pub fn portable_msrs() -> Vec<u32> {
        let mut m = vec![
            msr::IA32_TSC,
            msr::IA32_APIC_BASE,
            msr::IA32_TSC_ADJUST,
            msr::IA32_SYSENTER_CS,
            msr::IA32_SYSENTER_ESP,
            msr::IA32_SYSENTER_EIP,
            msr::IA32_MISC_ENABLE,
            msr::IA32_PAT,
            msr::IA32_TSC_DEADLINE,
            msr::IA32_EFER,
            msr::IA32_STAR,
            msr::IA32_LSTAR,
            msr::IA32_CSTAR,
            msr::IA32_FMASK,
            msr::IA32_FS_BASE,
            msr::IA32_GS_BASE,
            msr::IA32_KERNEL_GS_BASE,
            msr::KVM_WALL_CLOCK_NEW,
            msr::KVM_SYSTEM_TIME_NEW,
        ];
        m.sort_unstable();
        m
    }

    /// One of the portable models (the same CPU on every backend and host).
    pub fn is_portable(&self) -> bool {
        matches!(
            self.name.as_str(),
            Self::PORTABLE_NAME | Self::PORTABLE_V3_NAME | "portable-v1"
        )
    }

    /// Looks a leaf up the way the CPU does for `cpuid` with EAX=`function`, ECX=`index`.
    pub fn lookup(&self, function: u32, index: u32) -> Option<&CpuidEntry> {
        self.cpuid
            .iter()
            .find(|e| e.function == function && (!e.indexed || e.index == index))
    }

    /// The CPUID table as vCPU `vcpu_id` of a VM with `vcpu_count` vCPUs sees it: APIC ID and
    /// logical-processor counts filled in.
    pub fn cpuid_for(&self, vcpu_id: u32, vcpu_count: u32) -> Vec<CpuidEntry> {
        let count = vcpu_count.clamp(1, 255);
        self.cpuid
            .iter()
            .map(|e| {
                let mut e = *e;
                match e.function {
                    1 => {
                        e.ebx = (e.ebx & 0x0000_ffff) | (count << 16) | ((vcpu_id & 0xff) << 24);
                    }
                    0x8000_0008 => e.ecx = (e.ecx & !0xff) | (count - 1),
                    // x2APIC ID of this vCPU (host models carry these leaves).
                    0xb | 0x1f => e.edx = vcpu_id,
                    _ => {}
                }
                e
            })
            .collect()
    }

    /// The answer of `cpuid` for vCPU `vcpu_id`: the leaf if present, else (as AMD CPUs do for
    /// leaves above the maximum) all zeros.
    pub fn cpuid_value(
        &self,
        vcpu_id: u32,
        vcpu_count: u32,
        function: u32,
        index: u32,
    ) -> [u32; 4] {
        let max = if function >= 0x8000_0000 {
            self.lookup(0x8000_0000, 0).map(|e| e.eax)
        } else if function >= 0x4000_0000 {
            self.lookup(0x4000_0000, 0).map(|e| e.eax)
        } else {
            self.lookup(0, 0).map(|e| e.eax)
        };
        if max.is_none_or(|m| function > m) {
            return [0; 4];
        }
        match self.lookup(function, index) {
            Some(e) => {
                let mut one = CpuModel {
                    name: String::new(),
                    cpuid: vec![*e],
                    msrs: Vec::new(),
                };
                one.cpuid = one.cpuid_for(vcpu_id, vcpu_count);
                match one.cpuid.first() {
                    Some(e) => [e.eax, e.ebx, e.ecx, e.edx],
                    None => [0; 4],
                }
            }
            None => [0; 4],
        }
    }

    /// Whether the model's CPUID shows `feature`.
    pub fn has(&self, feature: Feature) -> bool {
        let b = feature.bit();
        self.lookup(b.function, b.index).is_some_and(|e| {
            let r = match b.reg {
                0 => e.eax,
                1 => e.ebx,
                2 => e.ecx,
                _ => e.edx,
            };
            r & (1 << b.bit) != 0
        })
    }

    /// Every ISA feature the model shows.
    pub fn features(&self) -> FeatureSet {
        Feature::ALL
            .iter()
            .copied()
            .filter(|f| self.has(*f))
            .collect()
    }

    /// Feature registers of leaf 1 (ECX, EDX).
    pub fn leaf1_features(&self) -> (u32, u32) {
        self.lookup(1, 0).map(|e| (e.ecx, e.edx)).unwrap_or((0, 0))
    }

    /// Whether a VM created with `self` can move to a destination that presents `other`.
    /// Returns the first difference as a one-line reason.
    pub fn compatible_with(&self, other: &CpuModel) -> Result<(), String> {
        if self.name != other.name {
            return Err(format!(
                "CPU model {} cannot move to a host presenting {}",
                self.name, other.name
            ));
        }
        if self.cpuid != other.cpuid {
            return Err(format!(
                "CPU model {} differs in its CPUID table",
                self.name
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v3_shows_exactly_v2_plus_the_v3_list() {
        use Feature::*;
        let v2 = CpuModel::portable().features();
        let v3 = CpuModel::portable_v3().features();
        assert!(v2.missing_from(v3).is_empty(), "v3 must contain v2");
        for f in [
            Avx, Avx2, Fma, F16c, Bmi1, Bmi2, Abm, Movbe, Xsave, Aes, Sha, Adx, Rdtscp,
        ] {
            assert!(v3.contains(f), "{f:?}");
            assert!(!v2.contains(f), "{f:?}");
        }
        assert!(!v3.contains(Avx512f));
        let m = CpuModel::portable_v3();
        assert_eq!(m.cpuid_value(0, 1, 0, 0)[0], 0xd);
        assert_eq!(m.cpuid_value(0, 1, 0xd, 0)[0], 7);
    }

    /// glibc's `_dl_runtime_resolve_xsavec` save area, computed as glibc 2.36's
    /// `update_active` does (compacted offsets of the components in its mask, sizes from the
    /// model's sub-leaves), must hold what `xsavec` writes at CPL 3 under a host XCR0 with
    /// AVX-512 (0xe7 or 0x600e7): 2432 bytes (576 + AVX 256 + opmask 64 + 512 + 1024).
    #[test]
    fn v3_xsave_sub_leaves_size_glibcs_save_area_for_avx512_hosts() {
        let m = CpuModel::portable_v3();
        let state_save_mask = (1u32 << 1) | (1 << 2) | (1 << 3) | (1 << 5) | (1 << 6) | (1 << 7);
        let (mut offset, mut size) = (576u32, 256u32);
        for i in 3..32 {
            let [eax, _, ecx, _] = if state_save_mask & (1 << i) != 0 {
                m.cpuid_value(0, 1, 0xd, i)
            } else {
                [0; 4]
            };
            offset += size;
            if ecx & 2 != 0 {
                offset = offset.next_multiple_of(64);
            }
            size = eax;
        }
        assert_eq!(offset + size, 2432);
        // XCR0 may still enable only x87|SSE|AVX, and the sizes for it are unchanged.
        assert_eq!(m.cpuid_value(0, 1, 0xd, 0), [7, 0x340, 0x340, 0]);
        assert_eq!(m.cpuid_value(0, 1, 0xd, 2)[..2], [0x100, 0x240]);
    }

    #[test]
    fn portable_has_kvm_signature_and_vendor() {
        let m = CpuModel::portable();
        let v = m.cpuid_value(0, 1, 0x4000_0000, 0);
        assert_eq!(&v[1..], &KVM_SIGNATURE);
        let v0 = m.cpuid_value(0, 1, 0, 0);
        let mut vendor = Vec::new();
        for r in [v0[1], v0[3], v0[2]] {
            vendor.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(vendor, b"AuthenticAMD");
    }

    #[test]
    fn per_vcpu_apic_id_and_count() {
        let m = CpuModel::portable();
        let l1 = m.cpuid_value(3, 4, 1, 0);
        assert_eq!(l1[1] >> 24, 3);
        assert_eq!((l1[1] >> 16) & 0xff, 4);
        assert_eq!(m.cpuid_value(0, 4, 0x8000_0008, 0)[2] & 0xff, 3);
    }

    #[test]
    fn leaves_above_max_are_zero() {
        let m = CpuModel::portable();
        assert_eq!(m.cpuid_value(0, 1, 0xd, 0), [0; 4]);
        assert_eq!(m.cpuid_value(0, 1, 0x8000_0009, 0), [0; 4]);
    }

    #[test]
    fn portable_is_x86_64_v2_without_xsave() {
        use feature::*;
        let (ecx, edx) = CpuModel::portable().leaf1_features();
        for f in [SSE3, SSSE3, CX16, SSE4_1, SSE4_2, POPCNT] {
            assert_ne!(ecx & f, 0);
        }
        assert_eq!(ecx & (XSAVE | AVX | X2APIC), 0);
        assert_ne!(edx & SSE2, 0);
    }
}
