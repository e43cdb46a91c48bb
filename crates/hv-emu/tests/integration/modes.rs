//! Mode switches: real mode -> protected mode -> long mode, as a boot loader or the Linux AP
//! trampoline does it; and state save/restore equality.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use crate::common;

use common::*;
use hv::{Hypervisor, VcpuExit};
use iced_x86::code_asm::*;

const RM: u64 = 0x7000;
const PM: u64 = 0x7100;
const LM: u64 = 0x7200;
const GDTR: u64 = 0x7f00;

fn real_to_long(hv: &dyn Hypervisor) {
    let rm = asm_at(16, RM, |a| {
        a.cli()?;
        a.xor(ax, ax)?;
        a.mov(ds, ax)?;
        a.lgdt(ptr(GDTR as u32))?;
        a.mov(eax, cr0)?;
        a.or(eax, 1)?;
        a.mov(cr0, eax)?;
        // ljmpl $0x18, $PM
        a.db(&[0x66, 0xea])?;
        a.db(&(PM as u32).to_le_bytes())?;
        a.db(&0x18u16.to_le_bytes())
    });
    let pm = asm_at(32, PM, |a| {
        a.mov(ax, 0x10)?;
        a.mov(ds, ax)?;
        a.mov(ss, ax)?;
        a.mov(esp, STACK as u32)?;
        a.mov(eax, cr4)?;
        a.or(eax, 0x20)?;
        a.mov(cr4, eax)?;
        a.mov(eax, PML4 as u32)?;
        a.mov(cr3, eax)?;
        a.mov(ecx, 0xc000_0080u32)?;
        a.rdmsr()?;
        a.or(eax, 0x100)?;
        a.wrmsr()?;
        a.mov(eax, cr0)?;
        a.or(eax, 0x8000_0000u32)?;
        a.mov(cr0, eax)?;
        a.db(&[0xea])?;
        a.db(&(LM as u32).to_le_bytes())?;
        a.db(&0x08u16.to_le_bytes())
    });
    let lm = asm_at(64, LM, |a| {
        a.mov(rax, 0x1234_5678_9abc_def0u64)?;
        a.push(rax)?;
        a.pop(rbx)?;
        a.hlt()
    });
    let mut g = long_mode_guest(hv, &[0xf4]);
    g.write_code(RM, &rm);
    g.write_code(PM, &pm);
    g.write_code(LM, &lm);
    g.write_u64(GDTR, (GDT << 16) | 39);
    let mut st = g.state();
    st.regs = hv::Registers {
        rip: RM,
        rflags: 2,
        ..Default::default()
    };
    let real = |sel: u16| hv::Segment {
        base: u64::from(sel) << 4,
        limit: 0xffff,
        selector: sel,
        type_: 3,
        present: true,
        s: true,
        ..Default::default()
    };
    st.sregs.cs = hv::Segment {
        type_: 0xb,
        ..real(0)
    };
    st.sregs.ds = real(0);
    st.sregs.es = real(0);
    st.sregs.ss = real(0);
    st.sregs.fs = real(0);
    st.sregs.gs = real(0);
    st.sregs.cr0 = 0x10;
    st.sregs.cr3 = 0;
    st.sregs.cr4 = 0;
    st.sregs.efer = 0;
    g.set_state(&st);
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(g.exception(), None);
    let st = g.state();
    assert_eq!(st.regs.rbx, 0x1234_5678_9abc_def0);
    assert!(st.sregs.cs.l);
    assert_eq!(st.sregs.efer & 0x500, 0x500, "LME and LMA");
    assert_eq!(st.regs.rsp, STACK);
}

fn save_restore_save_is_equal(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        a.mov(rax, 7u64)?;
        a.mov(ecx, 0xc000_0081u32)?;
        a.mov(edx, 0x0023_0010)?;
        a.xor(eax, eax)?;
        a.wrmsr()?;
        a.hlt()
    });
    let mut g = long_mode_guest(hv, &code);
    assert_eq!(g.run(), VcpuExit::Halted);
    let mut s1 = g.state();
    g.set_state(&s1);
    let mut s2 = g.state();
    // The TSC and the timer's current count move with time.
    for s in [&mut s1, &mut s2] {
        s.set_msr(hv::msr::IA32_TSC, 0);
    }
    assert_eq!(s1, s2);
    assert_eq!(s1.msr(hv::msr::IA32_STAR), Some(0x0023_0010_0000_0000));
    // Invalid state is refused.
    let mut bad = s1.clone();
    bad.lapic.regs.truncate(10);
    assert!(g.vcpu.set_state(&bad).is_err());
}

#[test]
fn emu_real_to_long() {
    real_to_long(&emu());
}

#[test]
fn emu_save_restore_save_is_equal() {
    save_restore_save_is_equal(&emu());
}

/// The TSC in a vCPU's saved state and kvm-clock in the VM's describe one instant even when the
/// VMM reads them tens of milliseconds apart (a loaded host), so a restored guest sees no skew
/// between them; the next run takes a new instant.
#[test]
fn saved_tsc_and_kvmclock_describe_one_instant() {
    let hv = hv_emu::EmuHypervisor::new();
    let code = asm(|a| a.hlt());
    let mut g = guest_with(&hv, &code, 1);
    assert_eq!(g.run(), VcpuExit::Halted);
    let khz = u128::from(g.vm.tsc_khz());
    let skew = |g: &mut Guest| {
        let cpu = g.state();
        std::thread::sleep(std::time::Duration::from_millis(60));
        let vm = g.vm.state().unwrap();
        let tsc = cpu.msr(hv::msr::IA32_TSC).unwrap();
        let tsc_ns = (u128::from(tsc) * 1_000_000 / khz) as i128;
        (tsc_ns - i128::from(vm.clock_ns)).unsigned_abs()
    };
    let first = skew(&mut g);
    assert!(first < 1_000_000, "TSC and kvm-clock {first} ns apart");
    // A second read after a run: a new instant, still one for both.
    g.write_code(CODE, &asm(|a| a.hlt()));
    let mut st = g.state();
    st.regs.rip = CODE;
    g.set_state(&st);
    std::thread::sleep(std::time::Duration::from_millis(30));
    assert_eq!(g.run(), VcpuExit::Halted);
    let second = skew(&mut g);
    assert!(second < 1_000_000, "TSC and kvm-clock {second} ns apart");
}
