//! Interrupt and exception delivery: MSI through `Vm::signal_msi` to the IDT, the `sti` shadow,
//! `int3` → #BP, `ud2` → #UD.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use std::time::Duration;

use conformance::*;
use hv::Hypervisor;
use iced_x86::code_asm::*;

/// Software-enables the local APIC (SVR = 0x1ff).
fn enable_apic(a: &mut CodeAssembler) -> AsmResult {
    a.mov(rsi, 0xfee0_00f0u64)?;
    a.mov(dword_ptr(rsi), 0x1ff)
}

fn msi_wakes_a_halted_vcpu(hv: &dyn Hypervisor) {
    let mut after_hlt = 0;
    let code = asm(|a| {
        enable_apic(a)?;
        a.sti()?;
        a.hlt()?;
        stop(a)
    });
    // `hlt` is the byte before `stop`'s first instruction.
    if let Some(p) = code.iter().position(|&b| b == 0xf4) {
        after_hlt = CODE + p as u64 + 1;
    }
    let mut g = Guest::with_code(hv, &code);
    let vm = g.vm.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        vm.signal_msi(0xfee0_0000, 0x41).expect("signal_msi");
    });
    let o = g.go();
    t.join().unwrap();
    let e = o.assert_exception(0x41, 0);
    assert_eq!(e.rip, after_hlt, "the frame returns after the hlt");
    assert_ne!(e.rflags & IF, 0);
}

/// An MSI that arrives while IF=0 stays pending; after `sti` exactly one more instruction runs
/// (the shadow) before it is taken. KVM on a PVM host emulates CPL-0 code in batches and
/// recognizes the interrupt only between batches: there it must still never be taken inside
/// the shadow, and the lateness is printed as a known platform difference.
fn sti_shadow_delays_a_pending_msi(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        enable_apic(a)?;
        a.out(0x80, al)?; // the recorder sends the MSI now, while IF=0
        a.mov(ecx, 100)?;
        let mut wait = a.create_label();
        a.set_label(&mut wait)?;
        a.dec(ecx)?; // still pending, IF=0
        a.jnz(wait)?;
        a.xor(eax, eax)?;
        a.mov(ecx, 5000)?;
        a.sti()?;
        a.inc(eax)?; // runs in the shadow
        let mut busy = a.create_label();
        a.set_label(&mut busy)?;
        a.inc(eax)?; // exact CPUs take the interrupt before the first of these
        a.dec(ecx)?;
        a.jnz(busy)?;
        stop(a)
    });
    let mut g = Guest::with_code(hv, &code);
    let vm = g.vm.clone();
    g.io.on_out(0x80, move || {
        vm.signal_msi(0xfee0_0000, 0x40).expect("signal_msi");
    });
    let e = g.go().assert_exception(0x40, 0);
    assert_ne!(e.rflags & IF, 0);
    assert!(e.rax >= 1, "interrupt taken inside the sti shadow");
    if e.rax != 1 {
        assert_eq!(
            hv.kind(),
            hv::BackendKind::Kvm,
            "late interrupt on {}",
            hv.kind()
        );
        println!(
            "NOTE: known platform difference: KVM took the pending interrupt {} instructions after the sti shadow (PVM emulates CPL 0 in batches)",
            3 * (e.rax - 1)
        );
    }
}

fn int3_reaches_the_breakpoint_handler(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        a.nop()?;
        a.int3()?;
        stop(a)
    });
    let mut g = Guest::with_code(hv, &code);
    let e = g.go().assert_exception(3, 0);
    assert_eq!(
        e.rip,
        CODE + 2,
        "#BP is a trap: the frame returns after int3"
    );
    assert_eq!((e.cs, e.rsp, e.ss), (0x08, STACK, 0x10));
}

fn ud2_raises_ud(hv: &dyn Hypervisor) {
    let mut g = Guest::with_code(hv, &asm(|a| a.ud2()));
    let e = g.go().assert_exception(6, 0);
    assert_eq!(e.rip, CODE);
}

conformance!(
    msi_wakes_a_halted_vcpu,
    sti_shadow_delays_a_pending_msi,
    int3_reaches_the_breakpoint_handler,
    ud2_raises_ud,
);
