//! Integer arithmetic, flags, multiply/divide (with #DE), bit operations and atomics.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use crate::common;

use common::*;
use hv::{Hypervisor, VcpuExit};
use iced_x86::code_asm::*;

const CF: u64 = 1;
const ZF: u64 = 1 << 6;
const SF: u64 = 1 << 7;
const OF: u64 = 1 << 11;

fn add_sub_flags(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        a.mov(rax, -1i64)?;
        a.add(rax, 1)?; // 0, CF, ZF
        a.pushfq()?;
        a.pop(rbx)?;
        a.mov(ecx, 0x7fff_ffffu32)?;
        a.add(ecx, 1)?; // OF, SF
        a.pushfq()?;
        a.pop(rdx)?;
        a.mov(r8, 5u64)?;
        a.sub(r8, 7)?; // -2, CF, SF
        a.pushfq()?;
        a.pop(r9)?;
        a.hlt()
    });
    let mut g = long_mode_guest(hv, &code);
    assert_eq!(g.run(), VcpuExit::Halted);
    let r = g.regs();
    assert_eq!(r.rax, 0);
    assert_eq!(r.rbx & (CF | ZF | SF | OF), CF | ZF);
    assert_eq!(r.rcx, 0x8000_0000);
    assert_eq!(r.rdx & (CF | ZF | SF | OF), SF | OF);
    assert_eq!(r.r8, (-2i64) as u64);
    assert_eq!(r.r9 & (CF | ZF | SF | OF), CF | SF);
}

fn mul_div(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        a.mov(rax, 0x1_0000_0000u64)?;
        a.mov(rbx, 0x1_0000_0001u64)?;
        a.mul(rbx)?; // rdx:rax = 2^64 + 2^32
        a.mov(r10, rax)?;
        a.mov(r11, rdx)?;
        a.mov(rax, 100u64)?;
        a.xor(edx, edx)?;
        a.mov(rcx, 7u64)?;
        a.div(rcx)?; // 14 r 2
        a.mov(r12, rax)?;
        a.mov(r13, rdx)?;
        a.mov(rax, -100i64)?;
        a.cqo()?;
        a.idiv(rcx)?; // -14 r -2
        a.mov(r14, rax)?;
        a.mov(r15, rdx)?;
        a.imul_3(rsi, rcx, -3)?;
        a.hlt()
    });
    let mut g = long_mode_guest(hv, &code);
    assert_eq!(g.run(), VcpuExit::Halted);
    let r = g.regs();
    assert_eq!((r.r10, r.r11), (0x1_0000_0000, 1));
    assert_eq!((r.r12, r.r13), (14, 2));
    assert_eq!((r.r14 as i64, r.r15 as i64), (-14, -2));
    assert_eq!(r.rsi as i64, -21);
}

fn divide_error(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        a.xor(ecx, ecx)?;
        a.mov(eax, 1)?;
        a.div(ecx)?;
        a.hlt()
    });
    let mut g = long_mode_guest(hv, &code);
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(g.exception(), Some((0, 0)));
    // The pushed RIP is the faulting instruction.
    let st = g.state();
    let frame_rip = g.read_u64(st.regs.rsp);
    assert_eq!(frame_rip, CODE + 7);
}

fn shifts_and_bits(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        a.mov(rax, 0x8000_0000_0000_0001u64)?;
        a.rol(rax, 4)?; // 0x18
        a.mov(rbx, 0xf0u64)?;
        a.shr(rbx, 4)?; // 0xf
        a.mov(rcx, -16i64)?;
        a.sar(rcx, 2)?; // -4
        a.mov(rdx, 0x100u64)?;
        a.bsf(r8, rdx)?; // 8
        a.bsr(r9, rdx)?; // 8
        a.popcnt(r10, rcx)?; // 62
        a.mov(r11, 0u64)?;
        a.bts(r11, 63)?;
        a.mov(r12, 0x1234u64)?;
        a.mov(r13, 0xabcd_0000_0000_0000u64)?;
        a.shld(r12, r13, 16)?; // 0x1234abcd
        a.mov(r14, 0x1122_3344u64)?;
        a.bswap(r14d)?;
        a.hlt()
    });
    let mut g = long_mode_guest(hv, &code);
    assert_eq!(g.run(), VcpuExit::Halted);
    let r = g.regs();
    assert_eq!(r.rax, 0x18);
    assert_eq!(r.rbx, 0xf);
    assert_eq!(r.rcx as i64, -4);
    assert_eq!((r.r8, r.r9), (8, 8));
    assert_eq!(r.r10, 62);
    assert_eq!(r.r11, 1 << 63);
    assert_eq!(r.r12, 0x1234_abcd);
    assert_eq!(r.r14, 0x4433_2211);
}

fn atomics(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        a.mov(rdi, DATA)?;
        a.mov(qword_ptr(rdi), 10)?;
        a.mov(rax, 10u64)?;
        a.mov(rbx, 20u64)?;
        a.lock().cmpxchg(qword_ptr(rdi), rbx)?; // succeeds -> 20
        a.mov(rcx, 5u64)?;
        a.lock().xadd(qword_ptr(rdi), rcx)?; // rcx = 20, mem 25
        a.lock().inc(qword_ptr(rdi))?; // 26
        a.lock().bts(qword_ptr(rdi), 8)?; // 26 | 256
        // cmpxchg16b at DATA+16: compare rdx:rax with {1, 2}, store rcx:rbx.
        a.mov(qword_ptr(rdi + 16), 1)?;
        a.mov(qword_ptr(rdi + 24), 2)?;
        a.mov(rax, 1u64)?;
        a.mov(rdx, 2u64)?;
        a.mov(rbx, 0x33u64)?;
        a.mov(rcx, 0x44u64)?;
        a.lock().cmpxchg16b(xmmword_ptr(rdi + 16))?;
        a.setz(r8b)?;
        a.mov(rcx, 5u64)?;
        a.xchg(qword_ptr(rdi + 32), rcx)?;
        a.hlt()
    });
    let mut g = long_mode_guest(hv, &code);
    g.write_u64(DATA + 32, 77);
    assert_eq!(g.run(), VcpuExit::Halted);
    let r = g.regs();
    assert_eq!(r.rcx, 77);
    assert_eq!(r.r8 & 0xff, 1);
    assert_eq!(g.read_u64(DATA), 26 | 256);
    assert_eq!((g.read_u64(DATA + 16), g.read_u64(DATA + 24)), (0x33, 0x44));
    assert_eq!(g.read_u64(DATA + 32), 5);
}

#[test]
fn emu_add_sub_flags() {
    add_sub_flags(&emu());
}

#[test]
fn emu_mul_div() {
    mul_div(&emu());
}

#[test]
fn emu_divide_error() {
    divide_error(&emu());
}

#[test]
fn emu_shifts_and_bits() {
    shifts_and_bits(&emu());
}

#[test]
fn emu_atomics() {
    atomics(&emu());
}

#[test]
fn harness_detects_wrong_results() {
    // A wrong expected value must fail: the harness is not vacuous.
    expect_panics(|| {
        let code = asm(|a| {
            a.mov(rax, 1u64)?;
            a.hlt()
        });
        let mut g = long_mode_guest(&emu(), &code);
        g.run();
        assert_eq!(g.regs().rax, 2);
    });
}
