//! 4-level paging faults: not present, write to read-only, NX fetch (#PF with CR2 and error code).

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use conformance::*;
use hv::Hypervisor;
use iced_x86::code_asm::*;

/// Runs `code` with the 4 KiB PTE of `target` replaced by `pte(target)`.
fn with_pte(hv: &dyn Hypervisor, code: &[u8], target: u64, pte: u64) -> Outcome {
    let mut g = Guest::with_code(hv, code);
    g.map_small().unwrap();
    g.write_u64(Guest::pte(target), pte).unwrap();
    g.go()
}

fn not_present_read(hv: &dyn Hypervisor) {
    let target = SMALL + 0x1008;
    let code = asm(|a| {
        a.mov(rsi, target)?;
        a.mov(rax, qword_ptr(rsi))?;
        stop(a)
    });
    let o = with_pte(hv, &code, target, 0);
    let e = o.assert_exception(14, 0);
    assert_eq!(e.cr2, target);
    assert_eq!(e.rip, CODE + 10, "the faulting load");
}

fn write_to_read_only(hv: &dyn Hypervisor) {
    let target = SMALL + 0x2010;
    let code = asm(|a| {
        a.mov(rsi, target)?;
        a.mov(qword_ptr(rsi), 1)?;
        stop(a)
    });
    let o = with_pte(hv, &code, target, (target & !0xfff) | 5);
    let e = o.assert_exception(14, 3); // present | write
    assert_eq!(e.cr2, target);
}

fn nx_fetch(hv: &dyn Hypervisor) {
    let target = SMALL + 0x3000;
    let code = asm(|a| {
        a.mov(rax, target)?;
        a.call(rax)?;
        stop(a)
    });
    let mut g = Guest::with_code(hv, &code);
    g.map_small().unwrap();
    g.write(target, &[0xc3]).unwrap(); // ret, never reached
    g.write_u64(Guest::pte(target), target | (1 << 63) | 7)
        .unwrap();
    let e = g.go().assert_exception(14, 0x11); // present | instruction fetch
    assert_eq!(e.cr2, target);
    assert_eq!(e.rip, target);
}

fn mapped_pages_work(hv: &dyn Hypervisor) {
    // The same program with a normal PTE runs to its end (the faults above come from the PTE).
    let target = SMALL + 0x2010;
    let code = asm(|a| {
        a.mov(rsi, target)?;
        a.mov(qword_ptr(rsi), 0x77)?;
        stop(a)
    });
    let o = with_pte(hv, &code, target, (target & !0xfff) | 7);
    o.assert_clean();
}

conformance!(
    not_present_read,
    write_to_read_only,
    nx_fetch,
    mapped_pages_work
);
