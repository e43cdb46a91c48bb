//! CPL 3 code: the same programs in user mode (where KVM runs them on the host CPU).

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use conformance::*;
use hv::{BackendKind, Hypervisor};
use iced_x86::code_asm::*;

fn user_alu_and_fault(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        a.mov(rax, -1i64)?;
        a.xor(ecx, ecx)?;
        a.shl(eax, cl)?; // count 0: still clears the upper half
        a.mov(rbx, rax)?;
        a.mov(rsi, 0x10_0000_0000u64)?;
        a.mov(rdx, qword_ptr(rsi))?; // beyond the mapped GiB: #PF
        a.ud2()
    });
    let mut g = Guest::new(hv, DEFAULT_MIB).unwrap();
    g.load_user(&code).unwrap();
    let o = g.go();
    let e = o.assert_exception(14, 4); // user, read, not present
    assert_eq!(e.cr2, 0x10_0000_0000);
    assert_eq!((e.cs, e.ss), (0x2b, 0x33));
    assert_eq!(o.regs().rbx, 0xffff_ffff);
}

/// With IOPL 3, user `out` is allowed. KVM on a PVM host runs user code with IOPL 0 whatever
/// RFLAGS says (`out` raises #GP): a known platform difference.
fn user_out_with_iopl3(hv: &dyn Hypervisor) {
    let mut g = Guest::new(hv, DEFAULT_MIB).unwrap();
    g.load_user(&asm(stop)).unwrap();
    let o = g.go();
    if hv.kind() == BackendKind::Kvm && o.exception.is_some_and(|e| e.vector == 13) {
        println!(
            "NOTE: known platform difference: KVM (PVM) ignores IOPL 3 at CPL 3: `out` raised #GP"
        );
        return;
    }
    o.assert_clean();
}

conformance!(user_alu_and_fault, user_out_with_iopl3);
