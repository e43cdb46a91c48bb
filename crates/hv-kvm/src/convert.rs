//! Conversions between KVM's structures and the neutral state of `hv`.
//!
//! Plain field copies where the layouts agree; the few real translations (interrupt-shadow bit
//! order, MP states, the XSAVE image split) are commented where they happen.

use hv::{
    DebugRegisters, DescriptorTable, FpuState, LapicState, MpState, PendingEvents,
    PendingException, PendingInterrupt, Registers, Segment, SpecialRegisters,
};
use kvm_bindings::{
    KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_RUNNABLE,
    KVM_MP_STATE_SIPI_RECEIVED, KVM_MP_STATE_UNINITIALIZED, KVM_VCPUEVENT_VALID_NMI_PENDING,
    KVM_VCPUEVENT_VALID_SHADOW, KVM_X86_SHADOW_INT_MOV_SS, KVM_X86_SHADOW_INT_STI, kvm_debugregs,
    kvm_dtable, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_regs, kvm_segment, kvm_sregs,
    kvm_vcpu_events,
};

/// A KVM structure, wrapped so this crate can implement `From`/`TryFrom` between it and the
/// neutral `hv` types (both foreign here). `Registers::from(Kvm(regs))` and
/// `Kvm::<kvm_regs>::from(&registers).0`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Kvm<T>(pub T);

/// Offset of the XSAVE header (XSTATE_BV, XCOMP_BV) in a standard-format XSAVE image.
pub const XSAVE_HEADER: usize = 512;
/// Size of the legacy (FXSAVE) region plus the XSAVE header.
pub const XSAVE_EXT_START: usize = 576;

impl From<Kvm<kvm_regs>> for Registers {
    fn from(Kvm(r): Kvm<kvm_regs>) -> Self {
        Registers {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        }
    }
}

impl From<&Registers> for Kvm<kvm_regs> {
    fn from(r: &Registers) -> Self {
        Kvm(kvm_regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        })
    }
}

impl From<Kvm<kvm_segment>> for Segment {
    fn from(Kvm(s): Kvm<kvm_segment>) -> Self {
        Segment {
            base: s.base,
            limit: s.limit,
            selector: s.selector,
            type_: s.type_ & 0xf,
            present: s.present != 0,
            dpl: s.dpl & 3,
            db: s.db != 0,
            s: s.s != 0,
            l: s.l != 0,
            g: s.g != 0,
            avl: s.avl != 0,
            unusable: s.unusable != 0,
        }
    }
}

impl From<&Segment> for Kvm<kvm_segment> {
    fn from(s: &Segment) -> Self {
        Kvm(kvm_segment {
            base: s.base,
            limit: s.limit,
            selector: s.selector,
            type_: s.type_ & 0xf,
            present: s.present.into(),
            dpl: s.dpl & 3,
            db: s.db.into(),
            s: s.s.into(),
            l: s.l.into(),
            g: s.g.into(),
            avl: s.avl.into(),
            unusable: s.unusable.into(),
            padding: 0,
        })
    }
}

impl From<Kvm<kvm_dtable>> for DescriptorTable {
    fn from(Kvm(t): Kvm<kvm_dtable>) -> Self {
        DescriptorTable {
            base: t.base,
            limit: t.limit,
        }
    }
}

impl From<&DescriptorTable> for Kvm<kvm_dtable> {
    fn from(t: &DescriptorTable) -> Self {
        Kvm(kvm_dtable {
            base: t.base,
            limit: t.limit,
            padding: [0; 3],
        })
    }
}

/// `interrupt_bitmap` (an external interrupt in delivery) is not carried over: KVM reports the
/// same interrupt through `KVM_GET_VCPU_EVENTS`, which is where [`PendingEvents`] takes it from.
impl From<Kvm<kvm_sregs>> for SpecialRegisters {
    fn from(Kvm(s): Kvm<kvm_sregs>) -> Self {
        SpecialRegisters {
            cs: Kvm(s.cs).into(),
            ds: Kvm(s.ds).into(),
            es: Kvm(s.es).into(),
            fs: Kvm(s.fs).into(),
            gs: Kvm(s.gs).into(),
            ss: Kvm(s.ss).into(),
            tr: Kvm(s.tr).into(),
            ldt: Kvm(s.ldt).into(),
            gdt: Kvm(s.gdt).into(),
            idt: Kvm(s.idt).into(),
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.apic_base,
        }
    }
}

impl From<&SpecialRegisters> for Kvm<kvm_sregs> {
    fn from(s: &SpecialRegisters) -> Self {
        Kvm(kvm_sregs {
            cs: Kvm::from(&s.cs).0,
            ds: Kvm::from(&s.ds).0,
            es: Kvm::from(&s.es).0,
            fs: Kvm::from(&s.fs).0,
            gs: Kvm::from(&s.gs).0,
            ss: Kvm::from(&s.ss).0,
            tr: Kvm::from(&s.tr).0,
            ldt: Kvm::from(&s.ldt).0,
            gdt: Kvm::from(&s.gdt).0,
            idt: Kvm::from(&s.idt).0,
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.apic_base,
            interrupt_bitmap: [0; 4],
        })
    }
}

impl From<Kvm<kvm_debugregs>> for DebugRegisters {
    fn from(Kvm(d): Kvm<kvm_debugregs>) -> Self {
        DebugRegisters {
            dr0: d.db[0],
            dr1: d.db[1],
            dr2: d.db[2],
            dr3: d.db[3],
            dr6: d.dr6,
            dr7: d.dr7,
        }
    }
}

impl From<&DebugRegisters> for Kvm<kvm_debugregs> {
    fn from(d: &DebugRegisters) -> Self {
        Kvm(kvm_debugregs {
            db: [d.dr0, d.dr1, d.dr2, d.dr3],
            dr6: d.dr6,
            dr7: d.dr7,
            ..Default::default()
        })
    }
}

impl From<Kvm<kvm_fpu>> for FpuState {
    fn from(Kvm(f): Kvm<kvm_fpu>) -> Self {
        FpuState {
            fcw: f.fcw,
            fsw: f.fsw,
            ftw: f.ftwx,
            fop: f.last_opcode,
            fip: f.last_ip,
            fdp: f.last_dp,
            mxcsr: f.mxcsr,
            st: f.fpr,
            xmm: f.xmm,
        }
    }
}

impl From<&FpuState> for Kvm<kvm_fpu> {
    fn from(f: &FpuState) -> Self {
        Kvm(kvm_fpu {
            fpr: f.st,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftw,
            pad1: 0,
            last_opcode: f.fop,
            last_ip: f.fip,
            last_dp: f.fdp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            pad2: 0,
        })
    }
}

/// KVM's `kvm_lapic_state` is the xAPIC register page (without `KVM_CAP_X2APIC_API`, KVM keeps
/// the ID in bits 31:24 even in x2APIC mode), so the neutral page is a byte copy.
impl From<Kvm<kvm_lapic_state>> for LapicState {
    fn from(Kvm(l): Kvm<kvm_lapic_state>) -> Self {
        LapicState {
            regs: l.regs.iter().map(|&b| b as u8).collect(),
        }
    }
}

impl TryFrom<&LapicState> for Kvm<kvm_lapic_state> {
    type Error = hv::Error;

    fn try_from(l: &LapicState) -> hv::Result<Self> {
        l.validate().map_err(hv::Error::InvalidState)?;
        let mut k = kvm_lapic_state::default();
        for (d, s) in k.regs.iter_mut().zip(&l.regs) {
            *d = *s as std::os::raw::c_char;
        }
        Ok(Kvm(k))
    }
}

impl TryFrom<Kvm<kvm_mp_state>> for MpState {
    type Error = hv::Error;

    fn try_from(Kvm(m): Kvm<kvm_mp_state>) -> hv::Result<Self> {
        Ok(match m.mp_state {
            KVM_MP_STATE_RUNNABLE => MpState::Runnable,
            KVM_MP_STATE_UNINITIALIZED => MpState::Uninitialized,
            KVM_MP_STATE_INIT_RECEIVED => MpState::InitReceived,
            KVM_MP_STATE_HALTED => MpState::Halted,
            KVM_MP_STATE_SIPI_RECEIVED => MpState::SipiReceived,
            other => {
                return Err(hv::Error::Incompatible(format!(
                    "KVM reports MP state {other}, which has no neutral form"
                )));
            }
        })
    }
}

impl From<MpState> for Kvm<kvm_mp_state> {
    fn from(m: MpState) -> Self {
        Kvm(kvm_mp_state {
            mp_state: match m {
                MpState::Runnable => KVM_MP_STATE_RUNNABLE,
                MpState::Uninitialized => KVM_MP_STATE_UNINITIALIZED,
                MpState::InitReceived => KVM_MP_STATE_INIT_RECEIVED,
                MpState::Halted => KVM_MP_STATE_HALTED,
                MpState::SipiReceived => KVM_MP_STATE_SIPI_RECEIVED,
            },
        })
    }
}

// Neutral interrupt shadow: bit 0 = after `sti`, bit 1 = after `mov ss`/`pop ss`.
// KVM: KVM_X86_SHADOW_INT_MOV_SS = 1, KVM_X86_SHADOW_INT_STI = 2 (the other way round).
fn shadow_from_kvm(s: u8) -> u8 {
    let s = u32::from(s);
    u8::from(s & KVM_X86_SHADOW_INT_STI != 0) | (u8::from(s & KVM_X86_SHADOW_INT_MOV_SS != 0) << 1)
}

fn shadow_to_kvm(s: u8) -> u8 {
    let mut k = 0u32;
    if s & 1 != 0 {
        k |= KVM_X86_SHADOW_INT_STI;
    }
    if s & 2 != 0 {
        k |= KVM_X86_SHADOW_INT_MOV_SS;
    }
    k as u8
}

/// Without `KVM_CAP_EXCEPTION_PAYLOAD` (not enabled), KVM reports a pending exception as
/// injected; SMM and a pending triple fault have no neutral form and are dropped (this platform
/// has no SMM; a triple fault surfaces as [`hv::VcpuExit::Shutdown`] instead).
impl From<Kvm<kvm_vcpu_events>> for PendingEvents {
    fn from(Kvm(e): Kvm<kvm_vcpu_events>) -> Self {
        let exception =
            (e.exception.injected != 0 || e.exception.pending != 0).then(|| PendingException {
                vector: e.exception.nr,
                error_code: (e.exception.has_error_code != 0).then_some(e.exception.error_code),
                injected: e.exception.injected != 0,
            });
        let interrupt = (e.interrupt.injected != 0).then_some(PendingInterrupt {
            vector: e.interrupt.nr,
            soft: e.interrupt.soft != 0,
        });
        PendingEvents {
            exception,
            interrupt,
            nmi_pending: e.nmi.pending != 0,
            nmi_injected: e.nmi.injected != 0,
            nmi_masked: e.nmi.masked != 0,
            interrupt_shadow: shadow_from_kvm(e.interrupt.shadow),
        }
    }
}

/// A neutral exception that is only pending is handed to KVM as injected: without the payload
/// capability KVM makes no difference between the two (CR2/DR6 are already in the state).
impl From<&PendingEvents> for Kvm<kvm_vcpu_events> {
    fn from(p: &PendingEvents) -> Self {
        Kvm({
            let mut e = kvm_vcpu_events::default();
            if let Some(x) = p.exception {
                e.exception.injected = 1;
                e.exception.nr = x.vector;
                e.exception.has_error_code = x.error_code.is_some().into();
                e.exception.error_code = x.error_code.unwrap_or(0);
            }
            if let Some(i) = p.interrupt {
                e.interrupt.injected = 1;
                e.interrupt.nr = i.vector;
                e.interrupt.soft = i.soft.into();
            }
            e.interrupt.shadow = shadow_to_kvm(p.interrupt_shadow);
            e.nmi.pending = p.nmi_pending.into();
            e.nmi.injected = p.nmi_injected.into();
            e.nmi.masked = p.nmi_masked.into();
            e.flags = KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SHADOW;
            e
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_bits_swap() {
        for s in 0..4u8 {
            assert_eq!(shadow_from_kvm(shadow_to_kvm(s)), s);
        }
        assert_eq!(shadow_to_kvm(1), KVM_X86_SHADOW_INT_STI as u8);
        assert_eq!(shadow_from_kvm(KVM_X86_SHADOW_INT_MOV_SS as u8), 2);
    }

    #[test]
    fn events_round_trip() {
        let p = PendingEvents {
            exception: Some(PendingException {
                vector: 14,
                error_code: Some(2),
                injected: true,
            }),
            interrupt: Some(PendingInterrupt {
                vector: 0x30,
                soft: false,
            }),
            nmi_pending: true,
            nmi_injected: false,
            nmi_masked: true,
            interrupt_shadow: 1,
        };
        let k = Kvm::<kvm_vcpu_events>::from(&p).0;
        assert_eq!(PendingEvents::from(Kvm(k)), p);
    }

    #[test]
    fn segment_and_mp_state_round_trip() {
        let s = Segment {
            base: 0x1000,
            limit: 0xffff_ffff,
            selector: 0x10,
            type_: 3,
            present: true,
            dpl: 0,
            db: true,
            s: true,
            l: false,
            g: true,
            avl: false,
            unusable: false,
        };
        assert_eq!(Segment::from(Kvm(Kvm::<kvm_segment>::from(&s).0)), s);
        for m in [
            MpState::Runnable,
            MpState::Uninitialized,
            MpState::InitReceived,
            MpState::Halted,
            MpState::SipiReceived,
        ] {
            assert_eq!(
                MpState::try_from(Kvm::<kvm_mp_state>::from(m)).ok(),
                Some(m)
            );
        }
        assert!(MpState::try_from(Kvm(kvm_mp_state { mp_state: 5 })).is_err());
    }

    #[test]
    fn lapic_page_length_checked() {
        let mut l = LapicState::default();
        l.set(LapicState::ID, 3 << 24);
        let k = Kvm::<kvm_lapic_state>::try_from(&l).ok();
        assert_eq!(k.map(LapicState::from), Some(l));
        let short = LapicState { regs: vec![0; 10] };
        assert!(Kvm::<kvm_lapic_state>::try_from(&short).is_err());
    }
}
