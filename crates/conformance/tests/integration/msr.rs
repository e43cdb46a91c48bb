//! MSRs: STAR/LSTAR/FS_BASE written by the guest read back, take effect, and appear in the state.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use conformance::*;
use hv::Hypervisor;
use hv::msr::{IA32_FS_BASE, IA32_LSTAR, IA32_STAR};
use iced_x86::code_asm::*;

const STAR: u64 = 0x0023_0010_0000_0000;
const LSTAR: u64 = 0xffff_ffff_8100_0000;

fn wrmsr(a: &mut CodeAssembler, index: u32, value: u64) -> AsmResult {
    a.mov(ecx, index)?;
    a.mov(eax, value as u32)?;
    a.mov(edx, (value >> 32) as u32)?;
    a.wrmsr()
}

fn rdmsr_to(a: &mut CodeAssembler, index: u32, dst: AsmRegister64) -> AsmResult {
    a.mov(ecx, index)?;
    a.rdmsr()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.mov(dst, rax)
}

fn msrs_round_trip(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        wrmsr(a, IA32_STAR, STAR)?;
        wrmsr(a, IA32_LSTAR, LSTAR)?;
        wrmsr(a, IA32_FS_BASE, DATA)?;
        rdmsr_to(a, IA32_STAR, r8)?;
        rdmsr_to(a, IA32_LSTAR, r9)?;
        rdmsr_to(a, IA32_FS_BASE, r10)?;
        // FS_BASE takes effect: fs:[8] is DATA+8.
        a.mov(r11, qword_ptr(8).fs())?;
        stop(a)
    });
    let mut g = Guest::with_code(hv, &code);
    g.write_u64(DATA + 8, 0xfeed_f00d).unwrap();
    let o = g.go();
    o.assert_clean();
    let r = o.regs();
    assert_eq!((r.r8, r.r9, r.r10), (STAR, LSTAR, DATA));
    assert_eq!(r.r11, 0xfeed_f00d);
    assert_eq!(o.state.msr(IA32_STAR), Some(STAR));
    assert_eq!(o.state.msr(IA32_LSTAR), Some(LSTAR));
    assert_eq!(o.state.sregs.fs.base, DATA);
}

/// Set through the state, read by the guest.
fn msrs_from_the_state(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        rdmsr_to(a, IA32_LSTAR, r9)?;
        stop(a)
    });
    let mut g = Guest::with_code(hv, &code);
    let mut st = g.vcpu.state().unwrap();
    st.set_msr(IA32_LSTAR, LSTAR);
    g.vcpu.set_state(&st).unwrap();
    let o = g.go();
    o.assert_clean();
    assert_eq!(o.regs().r9, LSTAR);
}

fn non_canonical_lstar_raises_gp(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        wrmsr(a, IA32_LSTAR, 0x8000_0000_0000_0000)?;
        stop(a)
    });
    let mut g = Guest::with_code(hv, &code);
    g.go().assert_exception(13, 0);
}

conformance!(
    msrs_round_trip,
    msrs_from_the_state,
    non_canonical_lstar_raises_gp
);
