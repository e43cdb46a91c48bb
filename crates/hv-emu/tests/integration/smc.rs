//! Self-modifying code: a write into code that has been (or is being) decoded must take effect
//! at the next execution of the written instruction, whichever path wrote it (plain store,
//! store into the running block, REP MOVS).

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use crate::common;

use common::*;
use hv::{Hypervisor, VcpuExit};
use iced_x86::code_asm::*;

/// Offset of the first occurrence of `pat` in `code`.
fn find(code: &[u8], pat: &[u8]) -> u64 {
    code.windows(pat.len())
        .position(|w| w == pat)
        .expect("pattern in code") as u64
}

/// A store into an instruction later in the same straight-line run.
fn store_into_the_running_block(hv: &dyn Hypervisor) {
    let build = |imm_at: u64| {
        asm(|a| {
            a.mov(rdi, imm_at)?;
            a.mov(dword_ptr(rdi), 2)?;
            a.mov(eax, 0x1111_1111u32)?;
            a.mov(rsi, DATA)?;
            a.mov(qword_ptr(rsi), rax)?;
            a.hlt()
        })
    };
    let probe = build(0);
    let imm_at = CODE + find(&probe, &[0xb8, 0x11, 0x11, 0x11, 0x11]) + 1;
    let mut g = long_mode_guest(hv, &build(imm_at));
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(g.read_u64(DATA), 2);
}

/// A loop whose body patches its own immediate: the second iteration runs the new value. The
/// loop starts the code, so its body is one cached block that the back edge reruns.
fn loop_patches_itself(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.mov(eax, 0x5555_5555u32)?;
        a.add(rcx, rax)?;
        a.mov(dword_ptr(rdi), 7)?;
        a.cmp(rcx, 0x5555_5555 + 7)?;
        a.jb(top)?;
        a.mov(rsi, DATA)?;
        a.mov(qword_ptr(rsi), rcx)?;
        a.hlt()
    });
    assert_eq!(&code[..5], &[0xb8, 0x55, 0x55, 0x55, 0x55]);
    let mut g = long_mode_guest(hv, &code);
    let mut st = g.state();
    st.regs.rcx = 0;
    st.regs.rdi = CODE + 1;
    g.set_state(&st);
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(g.read_u64(DATA), 0x5555_5555 + 7, "stale loop body");
}

/// A function that ran once is overwritten with REP MOVSB (the bulk copy path), then called
/// again.
fn rep_movs_over_called_code(hv: &dyn Hypervisor) {
    let func = CODE + 0x2000;
    let new_body = DATA + 0x100;
    let code = asm(|a| {
        a.mov(rbx, func)?;
        a.call(rbx)?;
        a.mov(r12, rax)?;
        a.mov(rsi, new_body)?;
        a.mov(rdi, func)?;
        a.mov(ecx, 6)?;
        a.rep().movsb()?;
        a.call(rbx)?;
        a.mov(rsi, DATA)?;
        a.mov(qword_ptr(rsi), r12)?;
        a.mov(qword_ptr(rsi + 8), rax)?;
        a.hlt()
    });
    let mut g = long_mode_guest(hv, &code);
    g.write_code(
        func,
        &asm_at(64, func, |a| {
            a.mov(eax, 3)?;
            a.ret()
        }),
    );
    g.write_code(
        new_body,
        &asm_at(64, func, |a| {
            a.mov(eax, 9)?;
            a.ret()
        }),
    );
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(g.read_u64(DATA), 3);
    assert_eq!(
        g.read_u64(DATA + 8),
        9,
        "the overwritten function ran stale code"
    );
}

#[test]
fn emu_store_into_the_running_block() {
    store_into_the_running_block(&emu());
}

#[test]
fn emu_loop_patches_itself() {
    loop_patches_itself(&emu());
}

#[test]
fn emu_rep_movs_over_called_code() {
    rep_movs_over_called_code(&emu());
}
