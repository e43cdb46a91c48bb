//! Interrupt and exception delivery: int3, MSI to the local APIC, the APIC timer, #GP, #UD,
//! the STI shadow, and triple fault.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use crate::common;

use common::*;
use hv::{Hypervisor, VcpuExit};
use iced_x86::code_asm::*;
use std::sync::Arc;

const HANDLER: u64 = CODE + 0x800;

/// Handler that records `0x100 | vector` at EXC, sends EOI and halts with IF=0.
fn handler(vector: u8) -> Vec<u8> {
    asm_at(64, HANDLER, |a| {
        a.mov(rsi, EXC)?;
        a.mov(qword_ptr(rsi), 0x100 + i32::from(vector))?;
        a.mov(rsi, 0xfee0_00b0u64)?;
        a.mov(dword_ptr(rsi), 0)?;
        a.cli()?;
        a.hlt()
    })
}

fn enable_apic(a: &mut CodeAssembler) -> Result<(), iced_x86::IcedError> {
    a.mov(rsi, 0xfee0_00f0u64)?;
    a.mov(dword_ptr(rsi), 0x1ff)
}

fn int3_frame(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        a.nop()?;
        a.int3()?;
        a.hlt()
    });
    let mut g = long_mode_guest(hv, &code);
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(g.exception(), Some((3, 0)));
    let st = g.state();
    // Frame: RIP after int3, CS, RFLAGS, RSP, SS.
    assert_eq!(g.read_u64(st.regs.rsp), CODE + 2);
    assert_eq!(g.read_u64(st.regs.rsp + 8), 0x08);
    assert_eq!(g.read_u64(st.regs.rsp + 24), STACK);
}

fn ud_and_gp(hv: &dyn Hypervisor) {
    let mut g = long_mode_guest(hv, &asm(|a| a.ud2()));
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(g.exception(), Some((6, 0)));
    // Unknown MSR -> #GP(0).
    let code = asm(|a| {
        a.mov(ecx, 0x1234_5678u32)?;
        a.rdmsr()?;
        a.hlt()
    });
    let mut g = long_mode_guest(hv, &code);
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(g.exception(), Some((13, 0)));
}

/// The portable model has no SMAP: `clac` (0f 01 ca) and `stac` (0f 01 cb) raise #UD.
fn clac_stac_without_smap(hv: &dyn Hypervisor) {
    for bytes in [[0x0f, 0x01, 0xca], [0x0f, 0x01, 0xcb]] {
        let mut g = long_mode_guest(hv, &bytes);
        assert_eq!(g.run(), VcpuExit::Halted);
        assert_eq!(g.exception(), Some((6, 0)), "{bytes:02x?}");
        // The frame's RIP is the faulting instruction.
        let st = g.state();
        assert_eq!(g.read_u64(st.regs.rsp), CODE);
    }
}

fn msi_fixed_interrupt(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        enable_apic(a)?;
        a.sti()?;
        a.hlt()?;
        a.hlt()
    });
    let mut g = long_mode_guest(hv, &code);
    g.write_code(HANDLER, &handler(0x40));
    g.set_gate(0x40, HANDLER);
    // Run to the first hlt with IF=1: the vCPU waits; deliver the MSI from another thread.
    let vm = g.vm.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(50));
        vm.signal_msi(0xfee0_0000, 0x40).unwrap();
    });
    assert_eq!(g.run(), VcpuExit::Halted);
    t.join().unwrap();
    assert_eq!(g.exception(), Some((0x40, 0)));
}

/// An MSI arriving while the vCPU runs an endless loop of two blocks (which the translator
/// links into one another) is delivered, at a block boundary.
fn msi_interrupts_a_chained_loop(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        enable_apic(a)?;
        a.sti()?;
        a.nop()?;
        let mut la = a.create_label();
        let mut lb = a.create_label();
        a.set_label(&mut la)?;
        a.inc(rax)?;
        a.jmp(lb)?;
        a.int3()?;
        a.set_label(&mut lb)?;
        a.inc(rdx)?;
        a.jmp(la)
    });
    let a_at = CODE + code.len() as u64 - 2 - 3 - 1 - 2 - 3;
    let b_at = CODE + code.len() as u64 - 2 - 3;
    let mut g = long_mode_guest(hv, &code);
    g.write_code(HANDLER, &handler(0x41));
    g.set_gate(0x41, HANDLER);
    let vm = g.vm.clone();
    let kicker = g.vcpu.kicker();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = done.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(100));
        vm.signal_msi(0xfee0_0000, 0x41).unwrap();
        // A watchdog: a vCPU that never takes the interrupt returns Interrupted instead of
        // hanging the test.
        for _ in 0..200 {
            if d.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        kicker.kick();
    });
    let exit = g.run();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    t.join().unwrap();
    assert_eq!(exit, VcpuExit::Halted);
    assert_eq!(g.exception(), Some((0x41, 0)));
    let st = g.state();
    let rip = g.read_u64(st.regs.rsp);
    assert!(rip == a_at || rip == b_at, "interrupted at {rip:#x}");
    // Both blocks ran as often as each other (give or take the one interrupted between).
    let (x, y) = (st.regs.rax, st.regs.rdx);
    assert!(x > 1000 && (x == y || x == y + 1), "rax {x} rdx {y}");
}

fn apic_timer_one_shot(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        enable_apic(a)?;
        a.mov(rsi, 0xfee0_03e0u64)?;
        a.mov(dword_ptr(rsi), 0xb)?; // divide by 1
        a.mov(rsi, 0xfee0_0320u64)?;
        a.mov(dword_ptr(rsi), 0x41)?; // one-shot, vector 0x41
        a.mov(rsi, 0xfee0_0380u64)?;
        a.mov(dword_ptr(rsi), 100_000)?; // 100 us
        a.sti()?;
        a.hlt()?;
        a.hlt()
    });
    let mut g = long_mode_guest(hv, &code);
    g.write_code(HANDLER, &handler(0x41));
    g.set_gate(0x41, HANDLER);
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(g.exception(), Some((0x41, 0)));
}

fn tsc_deadline_timer(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        enable_apic(a)?;
        a.mov(rsi, 0xfee0_0320u64)?;
        a.mov(dword_ptr(rsi), 0x42 | (2 << 17))?; // TSC-deadline mode
        a.rdtsc()?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        a.add(rax, 200_000)?;
        a.mov(rdx, rax)?;
        a.shr(rdx, 32)?;
        a.mov(ecx, 0x6e0)?;
        a.wrmsr()?;
        a.sti()?;
        a.hlt()?;
        a.hlt()
    });
    let mut g = long_mode_guest(hv, &code);
    g.write_code(HANDLER, &handler(0x42));
    g.set_gate(0x42, HANDLER);
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(g.exception(), Some((0x42, 0)));
}

fn sti_shadow_blocks_one_instruction(hv: &dyn Hypervisor) {
    // An interrupt pending before `sti` is taken after the instruction following it.
    let code = asm(|a| {
        enable_apic(a)?;
        a.mov(rsi, 0xfee0_0300u64)?;
        a.mov(dword_ptr(rsi), 0x40 | (1 << 18))?; // self IPI, vector 0x40
        a.xor(eax, eax)?;
        a.sti()?;
        a.inc(eax)?; // runs in the shadow
        a.inc(eax)?; // interrupted before this one
        a.hlt()
    });
    let mut g = long_mode_guest(hv, &code);
    g.write_code(HANDLER, &handler(0x40));
    g.set_gate(0x40, HANDLER);
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(g.exception(), Some((0x40, 0)));
    assert_eq!(g.regs().rax, 1);
}

fn triple_fault_shuts_down(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        a.mov(rax, 0u64)?;
        a.lidt(ptr(rax))?; // IDT limit 0 from address 0 (zeros)
        a.ud2()
    });
    let mut g = long_mode_guest(hv, &code);
    g.write_u64(0, 0);
    assert_eq!(g.run(), VcpuExit::Shutdown);
}

#[test]
fn emu_int3_frame() {
    int3_frame(&emu());
}

#[test]
fn emu_ud_and_gp() {
    ud_and_gp(&emu());
}

#[test]
fn emu_clac_stac_without_smap() {
    clac_stac_without_smap(&emu());
}

#[test]
fn emu_msi_fixed_interrupt() {
    msi_fixed_interrupt(&emu());
}

#[test]
fn emu_msi_interrupts_a_chained_loop() {
    msi_interrupts_a_chained_loop(&emu());
}

#[test]
fn emu_apic_timer_one_shot() {
    apic_timer_one_shot(&emu());
}

#[test]
fn emu_tsc_deadline_timer() {
    tsc_deadline_timer(&emu());
}

#[test]
fn emu_sti_shadow_blocks_one_instruction() {
    sti_shadow_blocks_one_instruction(&emu());
}

#[test]
fn emu_triple_fault_shuts_down() {
    triple_fault_shuts_down(&emu());
}
