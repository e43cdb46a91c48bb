//! The translator keeps a soft TLB and a jump cache per privilege class (CPL 0-2, CPL 3) and
//! does not empty them when the CPL changes: what one class filled must never let the other
//! class skip its own permission checks. Each guest's kernel runs a translated loop that fills
//! entries, goes to user mode with `sysretq` (or comes back with `syscall`), and the other class
//! then runs a translated loop over the same addresses, ending on one it may not touch.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use crate::common;

use common::*;
use hv::VcpuExit;
use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress};

// All code shares one page, so no page becomes code after the first fill (that drops every
// soft-TLB write entry and would hide a write entry used by the wrong class).
const USER: u64 = CODE + 0x800;
const SYSCALL_ENTRY: u64 = CODE + 0xc00;
/// A user function (`inc r13; ret`).
const USER_FN: u64 = CODE + 0xf00;
/// Supervisor-only, writable.
const SUP: u64 = SMALL + 0x1000;
/// User, writable.
const UPG: u64 = SMALL + 0x2000;
/// User, read-only.
const ROP: u64 = SMALL + 0x3000;
/// Supervisor-only code (`inc r13; ret`).
const SUP_FN: u64 = SMALL + 0x4000;
/// Loop iterations: well past the heat at which block starts are translated.
const N: i32 = 200;

/// `sysretq` to `USER` with IF=0.
fn to_user(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(rcx, USER)?;
    a.mov(r11, 2u64)?;
    a.sysretq()
}

/// A loop of `N` runs of `body` (which uses rsi) with rsi = `first`, then with rsi = `last`
/// (which must fault); `ud2` if it runs on 3 more times. r12 counts the finished bodies.
fn loop_then(
    a: &mut CodeAssembler,
    first: u64,
    last: u64,
    body: impl Fn(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Result<(), IcedError> {
    let mut l = a.create_label();
    a.mov(rsi, first)?;
    a.mov(rdi, last)?;
    a.mov(r9, N as u64)?;
    a.xor(r12d, r12d)?;
    a.set_label(&mut l)?;
    body(a)?;
    a.inc(r12)?;
    a.dec(r9)?;
    a.cmovz(rsi, rdi)?;
    a.cmp(r9, -3)?;
    a.jne(l)?;
    a.ud2()
}

/// `N` runs of `body` (which uses rsi) with rsi = `at`, in a translated loop.
fn repeat(
    a: &mut CodeAssembler,
    at: u64,
    body: impl Fn(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Result<(), IcedError> {
    let mut l = a.create_label();
    a.mov(rsi, at)?;
    a.mov(r9, N as u64)?;
    a.set_label(&mut l)?;
    body(a)?;
    a.dec(r9)?;
    a.jnz(l)
}

/// `N` loads (or stores) at `at` in a translated loop.
fn fill(a: &mut CodeAssembler, at: u64, write: bool) -> Result<(), IcedError> {
    repeat(a, at, |a| {
        if write {
            a.mov(qword_ptr(rsi), r9)
        } else {
            a.mov(rax, qword_ptr(rsi))
        }
    })
}

/// The guest: every page user-accessible except `SUP` and `SUP_FN`, `ROP` read-only, RSP0 in
/// the TSS, `user` at `USER` and `entry` at `SYSCALL_ENTRY`.
fn guest(kernel: &[u8], user: &[u8], entry: &[u8]) -> Guest {
    // The translator's caches are under test: run it whatever `ANYVISOR_EMU_ENGINE` says (the
    // suite also runs this crate's tests with the interpreter alone).
    let g = long_mode_guest(&emu().with_engine(hv_emu::Engine::Jit), kernel);
    testkit::identity_map(&g.mem, PML4, true).unwrap();
    testkit::map_4k(&g.mem, PML4, SMALL, PT, true, &[]).unwrap();
    g.write_u64(g.pte(SUP), SUP | 3);
    g.write_u64(g.pte(SUP_FN), SUP_FN | 3);
    g.write_u64(g.pte(ROP), ROP | 5);
    g.write_u64(UPG, 0x1111);
    g.mem.write_obj(STACK, GuestAddress(4)).unwrap();
    g.write_code(USER, user);
    g.write_code(SYSCALL_ENTRY, entry);
    let f = |at| {
        asm_at(64, at, |a| {
            a.inc(r13)?;
            a.ret()
        })
    };
    g.write_code(USER_FN, &f(USER_FN));
    g.write_code(SUP_FN, &f(SUP_FN));
    g
}

/// Runs the guest to its exception; checks that translated code ran.
fn run(g: &mut Guest) -> (u8, u64) {
    let before = hv_emu::instructions_translated();
    assert_eq!(g.run(), VcpuExit::Halted);
    assert!(
        hv_emu::instructions_translated() >= before + 4 * N as u64,
        "the loops did not run as translated code"
    );
    g.exception().expect("an exception")
}

#[test]
fn user_read_after_kernel_filled_the_page_faults() {
    let kernel = asm(|a| {
        syscall_msrs(a, SYSCALL_ENTRY)?;
        fill(a, SUP, false)?;
        fill(a, UPG, false)?;
        to_user(a)
    });
    let user = asm_at(64, USER, |a| {
        loop_then(a, UPG, SUP, |a| a.mov(rax, qword_ptr(rsi)))
    });
    let mut g = guest(&kernel, &user, &[]);
    assert_eq!(run(&mut g), (14, 5), "present | user");
    let st = g.state();
    assert_eq!(st.sregs.cr2, SUP);
    assert_eq!(st.regs.r12, N as u64, "every read of the user page ran");
    assert_eq!(st.regs.rax, 0x1111);
}

#[test]
fn user_write_after_kernel_wrote_the_read_only_page_without_wp_faults() {
    let kernel = asm(|a| {
        syscall_msrs(a, SYSCALL_ENTRY)?;
        a.mov(rax, cr0)?;
        a.and(rax, !0x1_0000i32)?;
        a.mov(cr0, rax)?;
        fill(a, ROP, true)?;
        to_user(a)
    });
    let user = asm_at(64, USER, |a| {
        loop_then(a, UPG, ROP, |a| a.mov(qword_ptr(rsi), r9))
    });
    let mut g = guest(&kernel, &user, &[]);
    assert_eq!(run(&mut g), (14, 7), "present | write | user");
    let st = g.state();
    assert_eq!(st.sregs.cr2, ROP);
    assert_eq!(st.regs.r12, N as u64);
    assert_eq!(g.read_u64(ROP), 1, "the kernel's last write");
}

#[test]
fn kernel_write_with_wp_after_user_read_the_read_only_page_faults() {
    let kernel = asm(|a| {
        syscall_msrs(a, SYSCALL_ENTRY)?;
        to_user(a)
    });
    let user = asm_at(64, USER, |a| {
        fill(a, ROP, false)?;
        fill(a, UPG, true)?;
        a.syscall()
    });
    let entry = asm_at(64, SYSCALL_ENTRY, |a| {
        loop_then(a, UPG, ROP, |a| a.mov(qword_ptr(rsi), r9))
    });
    let mut g = guest(&kernel, &user, &entry);
    assert_eq!(run(&mut g), (14, 3), "present | write, CR0.WP=1");
    let st = g.state();
    assert_eq!(st.sregs.cr2, ROP);
    assert_eq!(st.regs.r12, N as u64);
    assert_eq!(g.read_u64(ROP), 0);
}

#[test]
fn user_indirect_call_to_a_function_the_kernel_called_faults() {
    let kernel = asm(|a| {
        syscall_msrs(a, SYSCALL_ENTRY)?;
        repeat(a, SUP_FN, |a| a.call(rsi))?;
        to_user(a)
    });
    let user = asm_at(64, USER, |a| {
        a.xor(r13d, r13d)?;
        loop_then(a, USER_FN, SUP_FN, |a| a.call(rsi))
    });
    let mut g = guest(&kernel, &user, &[]);
    assert_eq!(run(&mut g), (14, 0x15), "present | user | fetch");
    let st = g.state();
    assert_eq!(st.sregs.cr2, SUP_FN);
    assert_eq!(st.regs.r13, N as u64, "the user function ran every time");
}
