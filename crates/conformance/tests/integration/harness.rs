//! The harness itself: programs stop, exceptions are recorded, and wrong expectations fail.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use conformance::*;
use hv::Hypervisor;
use iced_x86::code_asm::*;

fn runs_to_stop(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        a.mov(rax, 0x1234u64)?;
        a.mov(qword_ptr(DATA), rax)?;
        stop(a)
    });
    let mut g = Guest::with_code(hv, &code);
    let o = g.go();
    o.assert_clean();
    assert_eq!(o.regs().rax, 0x1200, "al was cleared by stop()");
    assert_eq!(g.read_u64(DATA).unwrap(), 0x1234);
}

fn records_exceptions(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        a.mov(rax, 77u64)?;
        a.ud2()?;
        stop(a)
    });
    let mut g = Guest::with_code(hv, &code);
    let o = g.go();
    let e = o.assert_exception(6, 0);
    assert_eq!(e.rip, CODE + 10);
    assert_eq!(e.rax, 77);
    assert_eq!(e.cs, 0x08);
    assert_eq!(e.rsp, STACK);
}

/// A wrong expectation is detected by every helper.
fn wrong_expectations_fail(hv: &dyn Hypervisor) {
    let mut g = Guest::with_code(hv, &asm(|a| a.ud2()));
    let o = g.go();
    let o2 = o.clone();
    assert!(
        std::panic::catch_unwind(move || {
            o2.assert_clean();
        })
        .is_err()
    );
    let o3 = o.clone();
    assert!(
        std::panic::catch_unwind(move || {
            o3.assert_exception(13, 0);
        })
        .is_err()
    );
    let mut g = Guest::with_code(hv, &asm(stop));
    let o = g.go();
    assert!(
        std::panic::catch_unwind(move || {
            o.assert_exception(6, 0);
        })
        .is_err()
    );
}

fn timeout_is_reported(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        let mut l = a.create_label();
        a.set_label(&mut l)?;
        a.jmp(l)
    });
    let mut g = Guest::with_code(hv, &code);
    g.timeout = std::time::Duration::from_millis(300);
    assert_eq!(g.go().stop, Stop::Timeout);
}

conformance!(
    runs_to_stop,
    records_exceptions,
    wrong_expectations_fail,
    timeout_is_reported
);
