//! CPUID as the guest sees it equals the CPU model's table, leaf by leaf.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use crate::common;

use common::*;
use hv::{CpuModel, Hypervisor, VcpuExit};
use iced_x86::code_asm::*;

fn cpuid_matches_model(hv: &dyn Hypervisor) {
    let model = CpuModel::portable();
    let mut leaves: Vec<(u32, u32)> = model.cpuid.iter().map(|e| (e.function, e.index)).collect();
    // Leaves above the maximum read as zero.
    leaves.extend([(0xd, 0), (0x8000_0009, 0), (0x4000_0002, 0)]);
    assert!(!leaves.is_empty());
    let code = asm(|a| {
        a.mov(rdi, DATA)?;
        for (k, (f, i)) in leaves.iter().enumerate() {
            a.mov(eax, *f)?;
            a.mov(ecx, *i)?;
            a.cpuid()?;
            let o = (k * 16) as i32;
            a.mov(dword_ptr(rdi + o), eax)?;
            a.mov(dword_ptr(rdi + o + 4), ebx)?;
            a.mov(dword_ptr(rdi + o + 8), ecx)?;
            a.mov(dword_ptr(rdi + o + 12), edx)?;
        }
        a.hlt()
    });
    let mut g = long_mode_guest(hv, &code);
    assert_eq!(g.run(), VcpuExit::Halted);
    for (k, (f, i)) in leaves.iter().enumerate() {
        let a = g.read_u64(DATA + k as u64 * 16);
        let b = g.read_u64(DATA + k as u64 * 16 + 8);
        let got = [a as u32, (a >> 32) as u32, b as u32, (b >> 32) as u32];
        let want = model.cpuid_value(0, 1, *f, *i);
        assert_eq!(got, want, "leaf {f:#x}.{i}");
    }
}

#[test]
fn emu_cpuid_matches_model() {
    cpuid_matches_model(&emu());
}
