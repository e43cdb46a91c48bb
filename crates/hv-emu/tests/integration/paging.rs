//! 4-level paging: #PF error codes and CR2, write protection, NX, accessed/dirty bits.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use crate::common;

use common::*;
use hv::{Hypervisor, VcpuExit};
use iced_x86::code_asm::*;

fn not_present_read(hv: &dyn Hypervisor) {
    let target = SMALL + 0x1008;
    let code = asm(|a| {
        a.mov(rsi, target)?;
        a.mov(rax, qword_ptr(rsi))?;
        a.hlt()
    });
    let mut g = long_mode_guest(hv, &code);
    g.map_small();
    g.write_u64(g.pte(target), 0);
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(g.exception(), Some((14, 0)));
    assert_eq!(g.state().sregs.cr2, target);
}

fn write_to_read_only(hv: &dyn Hypervisor) {
    let target = SMALL + 0x2010;
    let code = asm(|a| {
        a.mov(rsi, target)?;
        a.mov(qword_ptr(rsi), 1)?;
        a.hlt()
    });
    let mut g = long_mode_guest(hv, &code);
    g.map_small();
    g.write_u64(g.pte(target), (target & !0xfff) | 1);
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(g.exception(), Some((14, 3)), "present | write");
    assert_eq!(g.state().sregs.cr2, target);
}

fn nx_fetch(hv: &dyn Hypervisor) {
    let target = SMALL + 0x3000;
    let code = asm(|a| {
        a.mov(rsi, target)?;
        a.jmp(rsi)?;
        Ok(())
    });
    let mut g = long_mode_guest(hv, &code);
    g.map_small();
    g.write_code(target, &[0xf4]);
    g.write_u64(g.pte(target), target | 3 | (1 << 63));
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(
        g.exception(),
        Some((14, 0x11)),
        "present | instruction fetch"
    );
    assert_eq!(g.state().sregs.cr2, target);
}

fn accessed_dirty(hv: &dyn Hypervisor) {
    let r = SMALL + 0x4000;
    let w = SMALL + 0x5000;
    let code = asm(|a| {
        a.mov(rsi, r)?;
        a.mov(rax, qword_ptr(rsi))?;
        a.mov(rsi, w)?;
        a.mov(qword_ptr(rsi), rax)?;
        a.hlt()
    });
    let mut g = long_mode_guest(hv, &code);
    g.map_small();
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(g.exception(), None);
    let (pr, pw) = (g.read_u64(g.pte(r)), g.read_u64(g.pte(w)));
    assert_eq!(pr & 0x60, 0x20, "read: accessed, not dirty");
    assert_eq!(pw & 0x60, 0x60, "write: accessed and dirty");
}

fn invlpg_sees_new_mapping(hv: &dyn Hypervisor) {
    let va = SMALL + 0x6000;
    let code = asm(|a| {
        a.mov(rsi, va)?;
        a.mov(rax, qword_ptr(rsi))?; // old mapping -> reads DATA-page value
        a.mov(rdi, PT + ((va - SMALL) >> 12) * 8)?;
        a.mov(rcx, (SMALL + 0x7000) | 3)?;
        a.mov(qword_ptr(rdi), rcx)?;
        a.invlpg(byte_ptr(rsi))?;
        a.mov(rbx, qword_ptr(rsi))?;
        a.hlt()
    });
    let mut g = long_mode_guest(hv, &code);
    g.map_small();
    g.write_u64(va, 11);
    g.write_u64(SMALL + 0x7000, 22);
    assert_eq!(g.run(), VcpuExit::Halted);
    let r = g.regs();
    assert_eq!((r.rax, r.rbx), (11, 22));
}

/// MOV to CR3 with CR4.PGE set drops the non-global translations (required) and emu keeps the
/// global ones (allowed, and what makes a guest kernel's context switches cheap: its pages are
/// global); clearing CR4.PGE drops those too.
fn cr3_write_keeps_global_translations(hv: &dyn Hypervisor) -> [u64; 5] {
    let va_g = SMALL + 0x6000;
    let va_n = SMALL + 0x8000;
    let pte = |va: u64| PT + ((va - SMALL) >> 12) * 8;
    let code = asm(|a| {
        a.mov(rax, cr4)?;
        a.or(rax, 0x80)?;
        a.mov(cr4, rax)?;
        a.mov(rsi, va_g)?;
        a.mov(rdi, va_n)?;
        a.mov(r8, qword_ptr(rsi))?;
        a.mov(r9, qword_ptr(rdi))?;
        // Both mappings move to other frames, without INVLPG.
        a.mov(rbx, pte(va_g))?;
        a.mov(rcx, (SMALL + 0x7000) | 0x103)?;
        a.mov(qword_ptr(rbx), rcx)?;
        a.mov(rbx, pte(va_n))?;
        a.mov(rcx, (SMALL + 0x9000) | 3)?;
        a.mov(qword_ptr(rbx), rcx)?;
        a.mov(rax, cr3)?;
        a.mov(cr3, rax)?;
        a.mov(r10, qword_ptr(rsi))?;
        a.mov(r11, qword_ptr(rdi))?;
        a.mov(rax, cr4)?;
        a.and(rax, !0x80i32)?;
        a.mov(cr4, rax)?;
        a.mov(r12, qword_ptr(rsi))?;
        a.hlt()
    });
    let mut g = long_mode_guest(hv, &code);
    g.map_small();
    g.write_u64(pte(va_g), va_g | 0x103);
    g.write_u64(va_g, 11);
    g.write_u64(SMALL + 0x7000, 22);
    g.write_u64(va_n, 33);
    g.write_u64(SMALL + 0x9000, 44);
    assert_eq!(g.run(), VcpuExit::Halted);
    let r = g.regs();
    [r.r8, r.r9, r.r10, r.r11, r.r12]
}

#[test]
fn emu_cr3_write_keeps_global_translations() {
    // Before CR3: the old frames. After: the global page still through its kept
    // translation, the other one through its new PTE. After clearing PGE: the new frame.
    assert_eq!(
        cr3_write_keeps_global_translations(&emu()),
        [11, 33, 11, 44, 22]
    );
}

#[test]
fn emu_not_present_read() {
    not_present_read(&emu());
}

#[test]
fn emu_write_to_read_only() {
    write_to_read_only(&emu());
}

#[test]
fn emu_nx_fetch() {
    nx_fetch(&emu());
}

#[test]
fn emu_accessed_dirty() {
    accessed_dirty(&emu());
}

#[test]
fn emu_invlpg_sees_new_mapping() {
    invlpg_sees_new_mapping(&emu());
}
