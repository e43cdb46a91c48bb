//! Time-stamp counter reads in translated code: `rdtsc`, `rdtscp` and `rdpid`.
//!
//! Linux reads its clock (kvm-clock: `pvclock_clocksource_read` -> `rdtsc_ordered`, which is
//! `rdtscp` or `lfence; rdtsc`) many times per system call and interrupt; left to the
//! interpreter, each read costs an exit from translated code, a run-loop lookup and an entry.
//!
//! **Same value as the interpreter.** The interpreter's guest TSC is
//! `max(raw + Cpu::msr.tsc_offset, tsc_floor)` (`Cpu::tsc_at`), where the raw TSC depends on
//! the clock's mode (`crate::clock`). Where it is this host's `rdtsc` plus a constant (host and
//! paced modes, [`Clock::rdtsc_base`]), generated code runs the host's `rdtsc` and adds the
//! constant plus the vCPU's offset, which [`enter`] folds into one word ([`TimeCtx::add`]) at
//! every entry. The floor is settled at entry too: the TSC only grows, so if it has already
//! passed the floor when the run starts, the floor cannot matter during the run; if not
//! (rare: only after a user-mode runner's TSC report moved the offset back), the reads leave to
//! the interpreter. Where the raw TSC is scaled from the monotonic clock (another TSC rate than
//! the host's, a host TSC that is not constant) generated code cannot compute it, and the reads
//! leave to the interpreter as well. The mode is looked at on every entry, so a
//! `Clock::leave_host_tsc` or a state load takes effect at the next run: no translation holds
//! a decision about the clock.
//!
//! **Faults.** CR4.TSD at CPL > 0 makes `rdtsc`/`rdtscp` raise #GP: [`enter`] sets the deny word
//! then (only the interpreter changes CR4 and the CPL, and a translated chain does not cross a
//! CPL change), and the instruction leaves to the interpreter with the state before it, which
//! raises the fault. `rdtscp` and `rdpid` are translated only for a model that has them (the
//! interpreter raises #UD otherwise); `rdpid` reads `IA32_TSC_AUX` only and has no TSD check.
//!
//! **Flags.** The glue is flag-neutral (`mov`, `lea`, `shlx`/`shrx`, `jrcxz`), like all glue
//! (see `emit.rs`): `rdtsc` itself changes no flag. The host `rdtsc` stands for the guest's
//! `rdtscp` too: the interpreter does not model the ordering `rdtscp` adds.

use std::mem::offset_of;

use hv::cpu_model::{Feature, FeatureSet};
use iced_x86::{Code, Instruction};

use super::super::Ctx;
use super::{E, EmitError, Emitter, Kind, ctx, gpr_num, greg};
use crate::clock::Clock;
use crate::cpu::Cpu;
use crate::jit::asm::{Mem, RAX, RCX, RDX};

/// What translated TSC reads use (a field of [`Ctx`], set by [`enter`] at every entry).
#[repr(C)]
#[derive(Default)]
pub struct TimeCtx {
    /// Nonzero: `rdtsc`/`rdtscp` leave to the interpreter (see the module doc).
    deny: u64,
    /// Added (wrapping) to the host's `rdtsc` to give the guest TSC.
    add: u64,
    /// `IA32_TSC_AUX`, low 32 bits (`rdtscp`'s ecx, `rdpid`'s result).
    aux: u64,
}

const C_TIME: i32 = offset_of!(Ctx, time) as i32;
const C_DENY: i32 = C_TIME + offset_of!(TimeCtx, deny) as i32;
const C_ADD: i32 = C_TIME + offset_of!(TimeCtx, add) as i32;
const C_AUX: i32 = C_TIME + offset_of!(TimeCtx, aux) as i32;

const CR4_TSD: u64 = 1 << 2;

/// Sets [`TimeCtx`] up for a run on `cpu` under `clock` (before every entry).
pub(crate) fn enter(t: &mut TimeCtx, cpu: &Cpu, clock: &Clock) {
    t.aux = cpu.msr.tsc_aux & 0xffff_ffff;
    let Some(base) = clock.rdtsc_base() else {
        t.deny = 1;
        return;
    };
    t.add = base.wrapping_add(cpu.msr.tsc_offset);
    let tsd = cpu.cr4 & CR4_TSD != 0 && cpu.cpl != 0;
    // The floor has not been passed yet: the interpreter applies it. (A TSC in the top half
    // of its range also goes there while a floor is set: it could wrap during the run, after
    // which `max` with the floor would matter again.)
    // (The host TSC is read only while a floor is set: most entries have none.)
    let below_floor = cpu.msr.tsc_floor != 0 && {
        let now = hv_emu_jit_rt::host_tsc().wrapping_add(t.add);
        now < cpu.msr.tsc_floor || now >> 63 != 0
    };
    t.deny = u64::from(tsd || below_floor);
}

/// How this module translates `i` under a model with `features`, or `None`.
pub(super) fn classify(i: &Instruction, features: FeatureSet) -> Option<Kind> {
    match i.code() {
        Code::Rdtsc => Some(Kind::Rdtsc),
        Code::Rdtscp => features.contains(Feature::Rdtscp).then_some(Kind::Rdtscp),
        Code::Rdpid_r64 => features.contains(Feature::Rdpid).then_some(Kind::Rdpid),
        _ => None,
    }
}

impl Emitter {
    /// Instruction `k` of the block, a kind of this module.
    pub(super) fn time(&mut self, k: u32, i: &Instruction, kind: Kind) -> E<()> {
        match kind {
            Kind::Rdpid => {
                let g = gpr_num(i.op0_register()).ok_or_else(|| EmitError("gpr".into()))?;
                self.a.load(RCX, ctx(C_AUX));
                self.a.store(greg(g), RCX);
            }
            Kind::Rdtsc | Kind::Rdtscp => {
                let stub = self.stub(k, i.ip(), 0);
                let a = &mut self.a;
                a.load(RCX, ctx(C_DENY));
                a.jmp_unless_rcx_zero(stub);
                a.bytes(&[0x0f, 0x31]); // rdtsc: edx:eax, upper halves zeroed
                a.mov_imm(RCX, 32);
                a.shlx(RDX, RDX, RCX);
                let sum = |r| Mem {
                    base: Some(RAX),
                    index: Some((r, 1)),
                    disp: 0,
                };
                a.lea(RAX, sum(RDX));
                a.load(RDX, ctx(C_ADD));
                a.lea(RAX, sum(RDX));
                a.lea32(RDX, RAX, 0);
                a.store(greg(0), RDX);
                a.shrx(RAX, RAX, RCX);
                a.store(greg(2), RAX);
                if kind == Kind::Rdtscp {
                    a.load(RCX, ctx(C_AUX));
                    a.store(greg(1), RCX);
                }
            }
            _ => return Err(EmitError(format!("{kind:?} is not a time kind"))),
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "time_tests.rs"]
mod tests;
