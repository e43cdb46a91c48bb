//! `hv::InstructionEmulator` (used by the KVM backend): one instruction on a neutral state.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use crate::common;

use common::*;
use hv::InstructionEmulator;
use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress};

fn state_at_code(g: &mut Guest) -> hv::CpuState {
    let mut st = g.state();
    set_long_mode(&mut st);
    st
}

#[test]
fn lock_cmpxchg16b() {
    let code = asm(|a| {
        a.mov(rsi, DATA)?;
        a.lock().cmpxchg16b(xmmword_ptr(rsi))
    });
    let mut g = long_mode_guest(&emu(), &[]);
    // Only the instruction itself is in memory.
    let code = &code[code.len() - 5..];
    g.write_code(CODE, code);
    g.write_u64(DATA, 5);
    g.write_u64(DATA + 8, 6);
    let mut st = state_at_code(&mut g);
    st.regs.rsi = DATA;
    st.regs.rax = 5;
    st.regs.rdx = 6;
    st.regs.rbx = 0xaa;
    st.regs.rcx = 0xbb;
    let emu = hv_emu::Emulator::new(hv::CpuModel::portable());
    emu.emulate_one(&mut st, &g.mem, &*g.io).unwrap();
    assert_eq!(st.regs.rip, CODE + code.len() as u64);
    assert_ne!(st.regs.rflags & (1 << 6), 0, "ZF set on success");
    assert_eq!((g.read_u64(DATA), g.read_u64(DATA + 8)), (0xaa, 0xbb));
    // A second attempt fails and loads the current value.
    st.regs.rip = CODE;
    emu.emulate_one(&mut st, &g.mem, &*g.io).unwrap();
    assert_eq!(st.regs.rflags & (1 << 6), 0);
    assert_eq!((st.regs.rax, st.regs.rdx), (0xaa, 0xbb));
}

#[test]
fn int3_becomes_pending_exception() {
    let mut g = long_mode_guest(&emu(), &[0xcc]);
    let mut st = state_at_code(&mut g);
    let emu = hv_emu::Emulator::new(hv::CpuModel::portable());
    emu.emulate_one(&mut st, &g.mem, &*g.io).unwrap();
    let e = st.events.exception.expect("pending #BP");
    assert_eq!((e.vector, e.error_code), (3, None));
    assert_eq!(st.regs.rip, CODE + 1, "trap: RIP after int3");
}

#[test]
fn page_fault_reports_cr2() {
    let code = asm(|a| {
        a.mov(rax, qword_ptr(rsi))?;
        Ok(())
    });
    let mut g = long_mode_guest(&emu(), &code);
    g.map_small();
    g.write_u64(g.pte(SMALL), 0);
    let mut st = state_at_code(&mut g);
    st.regs.rsi = SMALL + 8;
    let emu = hv_emu::Emulator::new(hv::CpuModel::portable());
    emu.emulate_one(&mut st, &g.mem, &*g.io).unwrap();
    let e = st.events.exception.expect("pending #PF");
    assert_eq!((e.vector, e.error_code), (14, Some(0)));
    assert_eq!(st.sregs.cr2, SMALL + 8);
    assert_eq!(st.regs.rip, CODE, "fault: RIP unchanged");
}

#[test]
fn unsupported_instruction_is_an_error_with_bytes() {
    // ENTER with a nesting level (c8 00 00 01) is not implemented.
    let mut g = long_mode_guest(&emu(), &[0xc8, 0x00, 0x00, 0x01]);
    let mut st = state_at_code(&mut g);
    let emu = hv_emu::Emulator::new(hv::CpuModel::portable());
    let err = emu.emulate_one(&mut st, &g.mem, &*g.io).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "unsupported instruction c8000001 at rip {CODE:#x}"
        )),
        "{msg}"
    );
    let _ = g.mem.read_obj::<u8>(GuestAddress(CODE));
}
