//! SSE integer operations libc string functions use, FXSAVE/FXRSTOR, and PCMPISTRI.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use common::*;
use hv::{Hypervisor, VcpuExit};
use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress};

fn strlen_like(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        a.mov(rdi, DATA)?;
        a.pxor(xmm0, xmm0)?;
        a.movdqu(xmm1, xmmword_ptr(rdi))?;
        a.pcmpeqb(xmm1, xmm0)?;
        a.pmovmskb(eax, xmm1)?;
        a.bsf(eax, eax)?;
        a.movdqa(xmm2, xmmword_ptr(rdi + 16))?;
        a.pshufd(xmm3, xmm2, 0x1b)?;
        a.movdqu(xmmword_ptr(rdi + 32), xmm3)?;
        a.paddd(xmm2, xmm2)?;
        a.movq(rbx, xmm2)?;
        a.mov(ecx, 0x4142_4344)?;
        a.movd(xmm4, ecx)?;
        a.punpcklbw(xmm4, xmm0)?;
        a.movq(rdx, xmm4)?;
        a.hlt()
    });
    let mut g = long_mode_guest(hv, &code);
    g.mem
        .write_slice(b"hello, world\0xyz", GuestAddress(DATA))
        .unwrap();
    for k in 0..4u32 {
        g.mem
            .write_obj(k + 1, GuestAddress(DATA + 16 + u64::from(k) * 4))
            .unwrap();
    }
    assert_eq!(g.run(), VcpuExit::Halted);
    let r = g.regs();
    assert_eq!(r.rax, 12);
    assert_eq!(g.read_u64(DATA + 32), 0x0000_0003_0000_0004);
    assert_eq!(r.rbx, 0x0000_0004_0000_0002);
    assert_eq!(r.rdx, 0x0041_0042_0043_0044);
}

fn pcmpistri_equal_any(hv: &dyn Hypervisor) {
    // Index of the first byte of "xyzabc" that is one of "cb" (equal any, least index).
    let code = asm(|a| {
        a.mov(rdi, DATA)?;
        a.movdqu(xmm1, xmmword_ptr(rdi))?;
        a.movdqu(xmm2, xmmword_ptr(rdi + 16))?;
        a.pcmpistri(xmm1, xmm2, 0x00)?;
        a.hlt()
    });
    let mut g = long_mode_guest(hv, &code);
    g.mem.write_slice(b"cb\0", GuestAddress(DATA)).unwrap();
    g.mem
        .write_slice(b"xyzabc\0", GuestAddress(DATA + 16))
        .unwrap();
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(g.regs().rcx, 4);
}

fn fxsave_round_trip(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        a.mov(rdi, DATA)?;
        a.mov(eax, 0x1234_5678)?;
        a.movd(xmm5, eax)?;
        a.fxsave64(ptr(rdi))?;
        a.pxor(xmm5, xmm5)?;
        a.fxrstor64(ptr(rdi))?;
        a.movd(ebx, xmm5)?;
        a.hlt()
    });
    let mut g = long_mode_guest(hv, &code);
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(g.regs().rbx, 0x1234_5678);
    // FXSAVE image: FCW at 0, MXCSR at 24, XMM5 at 160 + 5*16.
    assert_eq!(g.read_u64(DATA) & 0xffff, 0x37f);
    assert_eq!(g.read_u64(DATA + 24) & 0xffff_ffff, 0x1f80);
    assert_eq!(g.read_u64(DATA + 240), 0x1234_5678);
}

fn scalar_double(hv: &dyn Hypervisor) {
    // movsd to memory is the SSE store, not the string instruction of the same mnemonic.
    let code = asm(|a| {
        a.mov(rdi, DATA)?;
        a.mov(eax, 7)?;
        a.cvtsi2sd(xmm0, eax)?;
        a.mov(eax, 2)?;
        a.cvtsi2sd(xmm1, eax)?;
        a.divsd(xmm0, xmm1)?;
        a.movsd_2(qword_ptr(rdi), xmm0)?;
        a.cvttsd2si(ebx, xmm0)?;
        a.mov(rsi, DATA + 64)?;
        a.mov(rdi, DATA + 128)?;
        a.movsd()?; // string form: copies 4 bytes
        a.hlt()
    });
    let mut g = long_mode_guest(hv, &code);
    g.write_u64(DATA + 64, 0x1122_3344);
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(f64::from_bits(g.read_u64(DATA)), 3.5);
    assert_eq!(g.regs().rbx, 3);
    assert_eq!(g.read_u64(DATA + 128), 0x1122_3344);
}

#[test]
fn emu_scalar_double() {
    scalar_double(&emu());
}

#[test]
fn emu_strlen_like() {
    strlen_like(&emu());
}

#[test]
fn emu_pcmpistri_equal_any() {
    pcmpistri_equal_any(&emu());
}

#[test]
fn emu_fxsave_round_trip() {
    fxsave_round_trip(&emu());
}
