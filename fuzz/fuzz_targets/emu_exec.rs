//! Runs arbitrary bytes as guest code on the emu backend's instruction decoder and executor
//! (`hv_emu::Emulator`, the same code the emu vCPU runs), for at most 200 instructions (stopping at the first exception), in
//! 64-bit long mode (identity-mapped, as Linux is entered) or in real mode. Must never panic,
//! hang inside one instruction, or allocate without bound.
//!
//! Input: byte 0 bit 0 selects long mode; bytes 1.. are the code (at most 64 KiB), placed at
//! 1 MiB (long mode) or at 0x1000:0000 (real mode) in 2 MiB of RAM. Everything above RAM is
//! MMIO nobody claims: reads all-ones, writes dropped.
//!
//! Long-mode inputs then also run on both engines of the vCPU run loop
//! (`hv_emu::run_engine`: the interpreter and the translator) from the same state and memory;
//! when both runs stop by themselves (an exception or `hlt`) their registers, RIP, exception,
//! non-arithmetic flags and memory must be identical. Inputs with an instruction that leaves a
//! flag undefined are not compared (the engines may legitimately branch differently on it).
#![no_main]

use hv::{GuestMemory, InstructionEmulator, MpState};
use libfuzzer_sys::fuzz_target;
use machine::layout::{BOOT_GDT_ADDR, PD_ADDR, PDPT_ADDR, PML4_ADDR};
use vm_memory::{Bytes, GuestAddress};

const RAM: usize = 2 << 20;
const LONG_ENTRY: u64 = 0x10_0000;
const REAL_SEGMENT: u16 = 0x1000;
const STEPS: usize = 200;

struct Unclaimed;

impl hv::DeviceIo for Unclaimed {
    fn pio_read(&self, _: u16, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn pio_write(&self, _: u16, _: &[u8]) {}
    fn mmio_read(&self, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&self, _: u64, _: &[u8]) {}
}

/// The boot GDT (null, code64, data, busy 64-bit TSS) and identity-mapping page tables of
/// the first GiB, as `machine::boot` writes them.
fn write_long_mode_tables(mem: &GuestMemory) -> Option<()> {
    let gdt: [u64; 5] = [
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x0000_8b00_0000_0067,
        0,
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_ADDR + 8 * i as u64))
            .ok()?;
    }
    mem.write_obj(PDPT_ADDR | 3, GuestAddress(PML4_ADDR)).ok()?;
    mem.write_obj(PD_ADDR | 3, GuestAddress(PDPT_ADDR)).ok()?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PD_ADDR + 8 * i))
            .ok()?;
    }
    Some(())
}

fuzz_target!(|data: &[u8]| {
    let [mode, code @ ..] = data else { return };
    let code = &code[..code.len().min(64 << 10)];
    let Ok(mem) = GuestMemory::from_ranges(&[(GuestAddress(0), RAM)]) else {
        return;
    };
    let long = mode & 1 == 1;
    let mut state = if long {
        if write_long_mode_tables(&mem).is_none() {
            return;
        }
        machine::boot::bsp_boot_state(LONG_ENTRY)
    } else {
        let mut s = machine::boot::reset_state(0);
        s.mp_state = MpState::Runnable;
        s.sregs.cs.selector = REAL_SEGMENT;
        s.sregs.cs.base = u64::from(REAL_SEGMENT) << 4;
        s.regs.rip = 0;
        s
    };
    let at = if long {
        LONG_ENTRY
    } else {
        u64::from(REAL_SEGMENT) << 4
    };
    if mem.write_slice(code, GuestAddress(at)).is_err() {
        return;
    }
    // Memory around the input is zero (`add [rax], al`, all flags defined), so a branch out
    // of the input cannot make the runs depend on an undefined flag either.
    if long && hv_emu::flags_defined_throughout(code) {
        compare_engines(&mem, &state);
    }
    let emu = hv_emu::Emulator::new(hv::CpuModel::portable());
    for _ in 0..STEPS {
        // An exception is left pending for the caller to inject: the run ends there.
        if emu.emulate_one(&mut state, &mem, &Unclaimed).is_err()
            || state.events.exception.is_some()
        {
            break;
        }
    }
});

/// Runs `start` on the interpreter and on the translator, each on its own copy of `mem`.
fn compare_engines(mem: &GuestMemory, start: &hv::CpuState) {
    let mut image = vec![0u8; RAM];
    if mem.read_slice(&mut image, GuestAddress(0)).is_err() {
        return;
    }
    let run = |engine| {
        let m = GuestMemory::from_ranges(&[(GuestAddress(0), RAM)]).ok()?;
        m.write_slice(&image, GuestAddress(0)).ok()?;
        let mut s = start.clone();
        let model = hv::CpuModel::portable();
        let r = hv_emu::run_engine(engine, &model, &mut s, &m, &Unclaimed, STEPS as u32);
        let mut out = vec![0u8; RAM];
        m.read_slice(&mut out, GuestAddress(0)).ok()?;
        Some((r.map_err(|e| e.to_string()), s, out))
    };
    let (Some((r1, s1, m1)), Some((r2, s2, m2))) =
        (run(hv_emu::Engine::Interp), run(hv_emu::Engine::Jit))
    else {
        return;
    };
    match (&r1, &r2) {
        (Ok(true), Ok(true)) => {}
        (Err(a), Err(b)) => {
            assert_eq!(a, b, "engines disagree on an unsupported instruction");
            return;
        }
        (Ok(_), Ok(_)) => return, // the budget ran out mid-block on one of them
        _ => panic!("engines disagree: {r1:?} vs {r2:?}"),
    }
    assert_eq!(s1.events.exception, s2.events.exception, "exception");
    assert_eq!(s1.regs.rip, s2.regs.rip, "rip");
    for r in 0..16 {
        assert_eq!(s1.regs.gpr(r), s2.regs.gpr(r), "gpr {r}");
    }
    // Flags an instruction leaves undefined may differ (the translator computes them as the
    // host CPU does); compare DF/IF and the rest of the system bits only.
    let sys = !0x8d5u64;
    assert_eq!(s1.regs.rflags & sys, s2.regs.rflags & sys, "rflags");
    assert!(m1 == m2, "memory");
}
