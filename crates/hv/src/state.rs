//! Hypervisor-neutral vCPU and VM state.
//!
//! These are plain data: every backend converts its own representation to and from them, and the
//! snapshot and migration formats serialize them. Field meanings follow the Intel SDM; nothing
//! here depends on how a backend keeps the state internally.

use serde::{Deserialize, Serialize};

/// Architectural MSR numbers the platform relies on.
pub mod msr {
    pub const IA32_TSC: u32 = 0x10;
    pub const IA32_APIC_BASE: u32 = 0x1b;
    pub const IA32_FEATURE_CONTROL: u32 = 0x3a;
    pub const IA32_TSC_ADJUST: u32 = 0x3b;
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    pub const IA32_PAT: u32 = 0x277;
    pub const IA32_TSC_DEADLINE: u32 = 0x6e0;
    pub const IA32_EFER: u32 = 0xc000_0080;
    pub const IA32_STAR: u32 = 0xc000_0081;
    pub const IA32_LSTAR: u32 = 0xc000_0082;
    pub const IA32_CSTAR: u32 = 0xc000_0083;
    pub const IA32_FMASK: u32 = 0xc000_0084;
    pub const IA32_FS_BASE: u32 = 0xc000_0100;
    pub const IA32_GS_BASE: u32 = 0xc000_0101;
    pub const IA32_KERNEL_GS_BASE: u32 = 0xc000_0102;
    pub const IA32_TSC_AUX: u32 = 0xc000_0103;
    /// kvm-clock: wall clock structure address (new numbering).
    pub const KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
    /// kvm-clock: per-vCPU pvclock page address | enable bit.
    pub const KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
    pub const KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;
    pub const KVM_STEAL_TIME: u32 = 0x4b56_4d03;
    pub const KVM_PV_EOI_EN: u32 = 0x4b56_4d04;
    pub const KVM_POLL_CONTROL: u32 = 0x4b56_4d05;
}

/// General-purpose registers, RIP and RFLAGS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registers {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

impl Registers {
    /// The sixteen GPRs in encoding order (rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8..r15).
    pub fn gpr(&self, index: usize) -> u64 {
        match index & 15 {
            0 => self.rax,
            1 => self.rcx,
            2 => self.rdx,
            3 => self.rbx,
            4 => self.rsp,
            5 => self.rbp,
            6 => self.rsi,
            7 => self.rdi,
            8 => self.r8,
            9 => self.r9,
            10 => self.r10,
            11 => self.r11,
            12 => self.r12,
            13 => self.r13,
            14 => self.r14,
            _ => self.r15,
        }
    }

    pub fn set_gpr(&mut self, index: usize, value: u64) {
        let r = match index & 15 {
            0 => &mut self.rax,
            1 => &mut self.rcx,
            2 => &mut self.rdx,
            3 => &mut self.rbx,
            4 => &mut self.rsp,
            5 => &mut self.rbp,
            6 => &mut self.rsi,
            7 => &mut self.rdi,
            8 => &mut self.r8,
            9 => &mut self.r9,
            10 => &mut self.r10,
            11 => &mut self.r11,
            12 => &mut self.r12,
            13 => &mut self.r13,
            14 => &mut self.r14,
            _ => &mut self.r15,
        };
        *r = value;
    }
}

/// A segment register with its hidden descriptor cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub base: u64,
    /// Byte-granular limit (already scaled when G=1).
    pub limit: u32,
    pub selector: u16,
    /// Descriptor type field (4 bits).
    pub type_: u8,
    pub present: bool,
    pub dpl: u8,
    /// D/B bit.
    pub db: bool,
    /// S bit: code/data (true) or system (false).
    pub s: bool,
    /// L bit: 64-bit code segment.
    pub l: bool,
    pub g: bool,
    pub avl: bool,
    /// Null/unusable segment (VMX "unusable" attribute).
    pub unusable: bool,
}

/// GDTR or IDTR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// Segments, descriptor tables, control registers and EFER.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecialRegisters {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    /// Task priority (CR8 = TPR[7:4]).
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
}

/// Debug registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebugRegisters {
    pub dr0: u64,
    pub dr1: u64,
    pub dr2: u64,
    pub dr3: u64,
    pub dr6: u64,
    pub dr7: u64,
}

/// x87, MMX and SSE state in the terms of the FXSAVE image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    pub fcw: u16,
    pub fsw: u16,
    /// Abridged tag word as FXSAVE stores it (bit i set = ST(i) physical register valid).
    pub ftw: u8,
    pub fop: u16,
    pub fip: u64,
    pub fdp: u64,
    pub mxcsr: u32,
    /// ST0-ST7 / MM0-MM7: 80-bit values in the low 10 bytes of each 16-byte slot.
    pub st: [[u8; 16]; 8],
    pub xmm: [[u8; 16]; 16],
}

impl Default for FpuState {
    /// The state after reset / FNINIT with MXCSR at its reset value.
    fn default() -> Self {
        FpuState {
            fcw: 0x37f,
            fsw: 0,
            ftw: 0,
            fop: 0,
            fip: 0,
            fdp: 0,
            mxcsr: 0x1f80,
            st: [[0; 16]; 8],
            xmm: [[0; 16]; 16],
        }
    }
}

/// `N` bytes of `b` at `at`, zeros where `b` is shorter.
fn bytes_at<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    b.get(at..)
        .and_then(<[u8]>::first_chunk)
        .copied()
        .unwrap_or([0; N])
}

impl FpuState {
    /// The 512-byte FXSAVE image (64-bit format).
    pub fn to_fxsave(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..2].copy_from_slice(&self.fcw.to_le_bytes());
        b[2..4].copy_from_slice(&self.fsw.to_le_bytes());
        b[4] = self.ftw;
        b[6..8].copy_from_slice(&self.fop.to_le_bytes());
        b[8..16].copy_from_slice(&self.fip.to_le_bytes());
        b[16..24].copy_from_slice(&self.fdp.to_le_bytes());
        b[24..28].copy_from_slice(&self.mxcsr.to_le_bytes());
        b[28..32].copy_from_slice(&0xffffu32.to_le_bytes()); // MXCSR_MASK
        // ST0-7 at 32..160, XMM0-15 at 160..416, 16 bytes each.
        let (regs, _) = b[32..416].as_chunks_mut::<16>();
        for (dst, src) in regs.iter_mut().zip(self.st.iter().chain(&self.xmm)) {
            *dst = *src;
        }
        b
    }

    /// Parses a 512-byte FXSAVE image (64-bit format).
    pub fn from_fxsave(b: &[u8; 512]) -> Self {
        let u16_at = |o: usize| u16::from_le_bytes(bytes_at(b, o));
        let u64_at = |o: usize| u64::from_le_bytes(bytes_at(b, o));
        let mut st = [[0u8; 16]; 8];
        let mut xmm = [[0u8; 16]; 16];
        let (regs, _) = b[32..416].as_chunks::<16>();
        for (dst, src) in st.iter_mut().chain(&mut xmm).zip(regs) {
            *dst = *src;
        }
        FpuState {
            fcw: u16_at(0),
            fsw: u16_at(2),
            ftw: b[4],
            fop: u16_at(6),
            fip: u64_at(8),
            fdp: u64_at(16),
            mxcsr: u32::from_le_bytes(bytes_at(b, 24)),
            st,
            xmm,
        }
    }
}

/// An exception being delivered or waiting to be delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingException {
    pub vector: u8,
    pub error_code: Option<u32>,
    /// True when delivery had started (re-inject on resume); false when only pending.
    pub injected: bool,
}

/// An external or software interrupt in delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingInterrupt {
    pub vector: u8,
    /// Software interrupt (`int n`) rather than an external one.
    pub soft: bool,
}

/// Events that are in flight between instructions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingEvents {
    pub exception: Option<PendingException>,
    pub interrupt: Option<PendingInterrupt>,
    pub nmi_pending: bool,
    pub nmi_injected: bool,
    /// NMIs blocked (an NMI handler is running and has not executed IRET yet).
    pub nmi_masked: bool,
    /// Interrupt shadow after `sti` (bit 0) or `mov ss`/`pop ss` (bit 1).
    pub interrupt_shadow: u8,
}

/// Activity state of a vCPU (its multiprocessor state).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MpState {
    #[default]
    Runnable,
    /// An application processor waiting for INIT.
    Uninitialized,
    /// INIT received, waiting for SIPI.
    InitReceived,
    /// Executing `hlt`, waiting for an interrupt.
    Halted,
    /// SIPI received, about to start.
    SipiReceived,
}

/// Size of the local APIC register page.
pub const LAPIC_PAGE_SIZE: usize = 1024;

/// Local APIC state: the architectural register page (xAPIC layout: register at offset `0x10 * n`,
/// 32 bits each, APIC ID in bits 31:24 of offset 0x20). The current-count register (0x390) holds
/// the timer's remaining count at the time the state was taken; a TSC-deadline timer is the
/// `IA32_TSC_DEADLINE` MSR in [`CpuState::msrs`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LapicState {
    pub regs: Vec<u8>,
}

impl Default for LapicState {
    fn default() -> Self {
        LapicState {
            regs: vec![0; LAPIC_PAGE_SIZE],
        }
    }
}

impl LapicState {
    pub const ID: usize = 0x20;
    pub const VERSION: usize = 0x30;
    pub const TPR: usize = 0x80;
    pub const EOI: usize = 0xb0;
    pub const LDR: usize = 0xd0;
    pub const DFR: usize = 0xe0;
    pub const SVR: usize = 0xf0;
    pub const ISR: usize = 0x100;
    pub const TMR: usize = 0x180;
    pub const IRR: usize = 0x200;
    pub const ESR: usize = 0x280;
    pub const ICR_LOW: usize = 0x300;
    pub const ICR_HIGH: usize = 0x310;
    pub const LVT_TIMER: usize = 0x320;
    pub const LVT_THERMAL: usize = 0x330;
    pub const LVT_PERF: usize = 0x340;
    pub const LVT_LINT0: usize = 0x350;
    pub const LVT_LINT1: usize = 0x360;
    pub const LVT_ERROR: usize = 0x370;
    pub const TIMER_INITIAL: usize = 0x380;
    pub const TIMER_CURRENT: usize = 0x390;
    pub const TIMER_DIVIDE: usize = 0x3e0;

    /// Reads the 32-bit register at `offset` (0 when out of range or the state is malformed).
    pub fn get(&self, offset: usize) -> u32 {
        match self.regs.get(offset..).and_then(<[u8]>::first_chunk) {
            Some(b) => u32::from_le_bytes(*b),
            None => 0,
        }
    }

    /// Writes the 32-bit register at `offset` (ignored when out of range).
    pub fn set(&mut self, offset: usize, value: u32) {
        if let Some(b) = self.regs.get_mut(offset..offset + 4) {
            b.copy_from_slice(&value.to_le_bytes());
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.regs.len() != LAPIC_PAGE_SIZE {
            return Err(format!(
                "local APIC page is {} bytes, expected {LAPIC_PAGE_SIZE}",
                self.regs.len()
            ));
        }
        Ok(())
    }
}

/// One model-specific register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Msr {
    pub index: u32,
    pub value: u64,
}

/// Everything one vCPU's execution depends on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuState {
    pub regs: Registers,
    pub sregs: SpecialRegisters,
    pub debug: DebugRegisters,
    pub fpu: FpuState,
    /// XCR0. 0 or 3 (x87|SSE) when the guest has not enabled XSAVE.
    pub xcr0: u64,
    /// Standard-format (non-compacted) XSAVE image of the components beyond x87/SSE that XCR0
    /// enables; empty when there are none.
    pub xsave_ext: Vec<u8>,
    /// MSRs in ascending index order; includes `IA32_TSC` (the guest TSC when the state was taken),
    /// SYSCALL MSRs, FS/GS/KERNEL_GS base, PAT, TSC deadline and the kvm-clock MSRs.
    pub msrs: Vec<Msr>,
    pub lapic: LapicState,
    pub events: PendingEvents,
    pub mp_state: MpState,
}

impl CpuState {
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|m| m.index == index).map(|m| m.value)
    }

    /// Sets an MSR, keeping the list sorted by index.
    pub fn set_msr(&mut self, index: u32, value: u64) {
        match self.msrs.binary_search_by_key(&index, |m| m.index) {
            Ok(i) => {
                if let Some(m) = self.msrs.get_mut(i) {
                    m.value = value;
                }
            }
            Err(i) => self.msrs.insert(i, Msr { index, value }),
        }
    }

    /// Checks the invariants every backend relies on before loading the state.
    pub fn validate(&self) -> Result<(), String> {
        self.lapic.validate()?;
        if !self.msrs.is_sorted_by(|a, b| a.index < b.index) {
            return Err("MSR list is not sorted or has duplicates".into());
        }
        if self.xcr0 & !0x3 != 0 && self.xsave_ext.is_empty() {
            return Err(format!(
                "XCR0 {:#x} enables state that is not present",
                self.xcr0
            ));
        }
        if self.events.interrupt_shadow > 3 {
            return Err("interrupt shadow out of range".into());
        }
        Ok(())
    }
}

/// VM-wide state a backend owns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// kvm-clock (guest system time) in nanoseconds when the state was taken.
    pub clock_ns: u64,
    /// Guest TSC frequency in kHz.
    pub tsc_khz: u32,
    /// ISA features beyond the CPU model that guest user code may have seen in its life
    /// (through `cpuid` on a host where user mode reads the host's CPUID: see
    /// `UserModeAccelerator::user_visible_extra`). A destination must run all of them.
    #[serde(
        default,
        skip_serializing_if = "crate::cpu_model::FeatureSet::is_empty"
    )]
    pub user_extra: crate::cpu_model::FeatureSet,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fxsave_round_trip() {
        let mut f = FpuState {
            fsw: 0x3800,
            ftw: 0x81,
            fip: 0x1234_5678_9abc,
            ..Default::default()
        };
        f.xmm[15] = [7; 16];
        f.st[3][9] = 0x40;
        let img = f.to_fxsave();
        assert_eq!(img[32 + 3 * 16 + 9], 0x40);
        assert_eq!(img[160 + 15 * 16..416], [7; 16]);
        assert_eq!(img[416..], [0; 96]);
        assert_eq!(FpuState::from_fxsave(&img), f);
    }

    #[test]
    fn msr_list_stays_sorted() {
        let mut s = CpuState::default();
        s.set_msr(msr::IA32_LSTAR, 1);
        s.set_msr(msr::IA32_TSC, 2);
        s.set_msr(msr::IA32_LSTAR, 3);
        assert_eq!(s.msr(msr::IA32_LSTAR), Some(3));
        assert!(s.validate().is_ok());
        let sorted = s.msrs.clone();
        s.msrs.push(Msr { index: 0, value: 0 });
        assert!(s.validate().is_err());
        s.msrs = sorted;
        s.msrs.push(s.msrs[s.msrs.len() - 1]);
        assert!(s.validate().is_err(), "duplicate");
    }

    #[test]
    fn gpr_encoding_order() {
        let mut r = Registers::default();
        for i in 0..16 {
            r.set_gpr(i, i as u64 * 10);
        }
        assert_eq!(r.rsp, 40);
        assert_eq!(r.rdi, 70);
        assert_eq!(r.gpr(15), 150);
    }
}
