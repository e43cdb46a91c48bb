//! String instructions with REP prefixes, both directions.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use crate::common;

use common::*;
use hv::{Hypervisor, VcpuExit};
use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress};

fn rep_movs_stos_scas(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        a.cld()?;
        // Fill 8 KiB (crossing pages) with a pattern.
        a.mov(rdi, DATA)?;
        a.mov(rax, 0x0102_0304_0506_0708u64)?;
        a.mov(ecx, 1024)?;
        a.rep().stosq()?;
        // Copy 5000 bytes to DATA+0x4000.
        a.mov(rsi, DATA)?;
        a.mov(rdi, DATA + 0x4000)?;
        a.mov(ecx, 5000)?;
        a.rep().movsb()?;
        a.mov(r8, rdi)?;
        // Find the first 0x05 byte.
        a.mov(rdi, DATA)?;
        a.mov(al, 5)?;
        a.mov(ecx, 100)?;
        a.repne().scasb()?;
        a.mov(r9, rdi)?;
        a.mov(r10, rcx)?;
        // Backwards copy with DF=1 (overlapping, shifts 16 bytes up by 1).
        a.std()?;
        a.mov(rsi, DATA + 0x8000 + 15)?;
        a.mov(rdi, DATA + 0x8000 + 16)?;
        a.mov(ecx, 16)?;
        a.rep().movsb()?;
        a.cld()?;
        a.hlt()
    });
    let mut g = long_mode_guest(hv, &code);
    let seq: Vec<u8> = (1..=16).collect();
    g.mem
        .write_slice(&seq, GuestAddress(DATA + 0x8000))
        .unwrap();
    assert_eq!(g.run(), VcpuExit::Halted);
    let r = g.regs();
    assert_eq!(r.r8, DATA + 0x4000 + 5000);
    assert_eq!(r.r9, DATA + 4, "scasb stops after the match");
    assert_eq!(r.r10, 96);
    let mut buf = vec![0u8; 5000];
    g.mem
        .read_slice(&mut buf, GuestAddress(DATA + 0x4000))
        .unwrap();
    assert!(
        buf.chunks(8)
            .all(|c| c == &[8, 7, 6, 5, 4, 3, 2, 1][..c.len()])
    );
    let mut out = [0u8; 17];
    g.mem
        .read_slice(&mut out, GuestAddress(DATA + 0x8000))
        .unwrap();
    assert_eq!(out[0], 1);
    assert_eq!(&out[1..], &seq[..]);
}

fn outs_to_port(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        a.mov(rsi, DATA)?;
        a.mov(dx, 0x3f8)?;
        a.mov(ecx, 3)?;
        a.rep().outsb()?;
        a.hlt()
    });
    let mut g = long_mode_guest(hv, &code);
    g.mem.write_slice(b"abc", GuestAddress(DATA)).unwrap();
    assert_eq!(g.run(), VcpuExit::Halted);
    let w = g.io.pio_writes();
    let bytes: Vec<u8> = w
        .iter()
        .map(|(p, d)| {
            assert_eq!(*p, 0x3f8);
            d[0]
        })
        .collect();
    assert_eq!(bytes, b"abc");
}

#[test]
fn emu_rep_movs_stos_scas() {
    rep_movs_stos_scas(&emu());
}

#[test]
fn emu_outs_to_port() {
    outs_to_port(&emu());
}
