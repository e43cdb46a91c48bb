//! Translated TSC reads against the interpreter's clock: values between two interpreter reads
//! taken before and after, the offset, the floor, TSC_AUX, CR4.TSD, the model gates, and each
//! clock mode (host, paced, scaled, a host mode whose counter is not `rdtsc`), including a mode
//! change under a translation that already exists.

use std::sync::Arc;

use iced_x86::code_asm::*;

use super::super::{Kind, classify_for};
use crate::clock::Clock;
use crate::cpu::Cpu;
use crate::jit::tests::{CODE, Rig, code_of, copy, first, run_jit};
use crate::testutil::{Rng, exec};
use hv::{GuestMemory, UserModeAccelerator, UserModeRunner};

/// An accelerator whose user code reads the host TSC: `counter` gives it (this host's `rdtsc`,
/// or another counter a translation cannot read).
struct Accel {
    counter: fn() -> u64,
}

impl UserModeAccelerator for Accel {
    fn create_runner(&self, _: u32, _: Arc<GuestMemory>) -> hv::Result<Box<dyn UserModeRunner>> {
        Err(hv::Error::InvalidState("no runner in these tests".into()))
    }
    fn tsc_khz(&self) -> u32 {
        1_000_000
    }
    fn host_tsc(&self) -> Option<u64> {
        Some((self.counter)())
    }
}

/// A counter that is not the host's: 2^50 plus the host TSC.
fn foreign_counter() -> u64 {
    hv_emu_jit_rt::host_tsc().wrapping_add(1 << 50)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// The hybrid's: the host TSC is the guest's (an accelerator reading `rdtsc`).
    Host,
    /// emu's on a host with a constant TSC at the VM's rate.
    Paced,
    /// The host TSC paces nothing: the TSC is scaled from the monotonic clock.
    Scaled,
    /// Host mode with an accelerator whose counter is not `rdtsc`.
    ForeignHost,
}

fn clock(mode: Mode) -> Clock {
    let mut c = Clock::with_pacing(1_000_000, mode == Mode::Paced);
    match mode {
        Mode::Host => c.use_host_tsc(Arc::new(Accel {
            counter: hv_emu_jit_rt::host_tsc,
        })),
        Mode::ForeignHost => c.use_host_tsc(Arc::new(Accel {
            counter: foreign_counter,
        })),
        Mode::Paced | Mode::Scaled => {}
    }
    c
}

fn rig(mode: Mode) -> Rig {
    let mut rig = Rig::with_model(hv::CpuModel::portable_v3());
    rig.vm.clock = clock(mode);
    rig
}

fn cpu(seed: u64) -> Cpu {
    let mut rng = Rng(seed | 1);
    let mut c = crate::testutil::cpu64(&mut rng, 0x3000, 0x6000, 8);
    c.deliver_exceptions = false;
    c.msr.tsc_offset = rng.next() >> 8;
    c.msr.tsc_aux = rng.next();
    c
}

/// Puts `code` at CODE, with `seed`'s fill around it, and drops the translations of what was
/// there (the rig's memory writes do not go through the code tracker).
fn load(rig: &mut Rig, seed: u64, code: &[u8]) {
    rig.jit.clear();
    rig.load(seed, code);
}

/// The interpreter's guest TSC of `c` now.
fn interp_tsc(rig: &Rig, c: &Cpu) -> u64 {
    c.tsc_at(&rig.vm.clock, rig.vm.clock.host_ns())
}

/// `c` with the MSRs the TSC reads use (`copy` leaves them out).
fn copy_tsc(c: &Cpu) -> Cpu {
    let mut d = copy(c);
    d.msr.tsc_offset = c.msr.tsc_offset;
    d.msr.tsc_floor = c.msr.tsc_floor;
    d.msr.tsc_aux = c.msr.tsc_aux;
    d
}

/// How one run of the translator went.
#[derive(Debug, PartialEq)]
enum Ran {
    /// All of it translated.
    Translated,
    /// An instruction left to the interpreter.
    Interpreted,
}

/// Runs `n` instructions at CODE from `c` on the translator; how that went and the interpreter's
/// TSC just before and after.
fn run(rig: &mut Rig, c: &mut Cpu, n: u32) -> (Ran, u64, u64) {
    let exits = rig.jit.stats.exits_to_interp;
    let before = interp_tsc(rig, c);
    assert_eq!(run_jit(rig, c, n), n);
    let after = interp_tsc(rig, c);
    let ran = if rig.jit.stats.exits_to_interp == exits {
        Ran::Translated
    } else {
        Ran::Interpreted
    };
    (ran, before, after)
}

/// The same on the interpreter alone (in the rig's second memory).
fn interp(rig: &Rig, c: &mut Cpu, n: u32) -> (u64, u64) {
    let before = interp_tsc(rig, c);
    exec(c, &rig.m2, &rig.vm, |ex| {
        for _ in 0..n {
            ex.step().unwrap();
        }
    });
    (before, interp_tsc(rig, c))
}

/// Checks what a read of `kind` left in `c` (started from `start`): edx:eax within
/// `[lo, hi]`, ecx = TSC_AUX for `rdtscp`, nothing else changed.
fn check_read(name: &str, kind: Kind, start: &Cpu, c: &Cpu, lo: u64, hi: u64) -> u64 {
    let t = c.gpr[2] << 32 | c.gpr[0];
    assert!(
        c.gpr[0] >> 32 == 0 && c.gpr[2] >> 32 == 0,
        "{name}: upper halves"
    );
    assert!(
        lo <= t && t <= hi,
        "{name}: {t:#x} not in [{lo:#x}, {hi:#x}]"
    );
    let mut want = start.gpr;
    want[0] = c.gpr[0];
    want[2] = c.gpr[2];
    if kind == Kind::Rdtscp {
        want[1] = start.msr.tsc_aux & 0xffff_ffff;
    }
    assert_eq!(c.gpr, want, "{name}: registers");
    assert_eq!(c.rflags, start.rflags, "{name}: flags");
    assert_eq!(c.rip, CODE + if kind == Kind::Rdtscp { 3 } else { 2 });
    t
}

fn reads() -> [(&'static str, Kind, Vec<u8>); 2] {
    [
        ("rdtsc", Kind::Rdtsc, code_of(|a| a.rdtsc())),
        ("rdtscp", Kind::Rdtscp, code_of(|a| a.rdtscp())),
    ]
}

#[test]
fn translated_reads_fall_between_interpreter_reads_in_host_and_paced_modes() {
    for mode in [Mode::Host, Mode::Paced] {
        let mut rig = rig(mode);
        for (name, kind, code) in reads() {
            assert_eq!(classify_for(&first(&code), rig.vm.features), Some(kind));
            let mut last = 0;
            for seed in 1..24u64 {
                load(&mut rig, seed, &code);
                let start = cpu(seed);
                // Twice: the first run may translate the block.
                for _ in 0..2 {
                    let mut c = copy_tsc(&start);
                    let (ran, lo, hi) = run(&mut rig, &mut c, 1);
                    let ctx = format!("{mode:?} {name} seed {seed}");
                    assert_eq!(ran, Ran::Translated, "{ctx}");
                    check_read(&ctx, kind, &start, &c, lo, hi);
                    // The interpreter itself, for the same state, reads in the same range.
                    let mut d = copy_tsc(&start);
                    let (lo, hi) = interp(&rig, &mut d, 1);
                    check_read(&format!("{ctx} interpreted"), kind, &start, &d, lo, hi);
                }
                // Same offset from one read to the next: time goes forward.
                let mut c = copy_tsc(&start);
                c.msr.tsc_offset = 0;
                let (_, lo, _) = run(&mut rig, &mut c, 1);
                let t = c.gpr[2] << 32 | c.gpr[0];
                assert!(t >= last && t >= lo, "{mode:?} {name}: went back");
                last = t;
            }
        }
    }
}

#[test]
fn the_floor_holds_until_the_tsc_passes_it() {
    for mode in [Mode::Host, Mode::Paced] {
        let mut rig = rig(mode);
        for (name, kind, code) in reads() {
            load(&mut rig, 3, &code);
            let start = cpu(3);
            let now = interp_tsc(&rig, &start);
            // A floor far ahead: the interpreter reads it, exactly.
            let mut c = copy_tsc(&start);
            c.msr.tsc_floor = now + (1 << 40);
            let floor = c.msr.tsc_floor;
            let (ran, _, _) = run(&mut rig, &mut c, 1);
            assert_eq!(ran, Ran::Interpreted, "{mode:?} {name} below the floor");
            check_read(name, kind, &start, &c, floor, floor);
            // A floor already passed: translated, and the reading is the TSC.
            let mut c = copy_tsc(&start);
            c.msr.tsc_floor = now;
            let (ran, lo, hi) = run(&mut rig, &mut c, 1);
            assert_eq!(ran, Ran::Translated, "{mode:?} {name} past the floor");
            check_read(name, kind, &start, &c, lo.max(now), hi);
            // A floor with a TSC in the top half of its range (it could wrap during a run):
            // the interpreter's too.
            let mut c = copy_tsc(&start);
            c.msr.tsc_offset = 1 << 63;
            c.msr.tsc_floor = 1;
            let (ran, lo, hi) = run(&mut rig, &mut c, 1);
            assert_eq!(ran, Ran::Interpreted, "{mode:?} {name} top half");
            check_read(name, kind, &start, &c, lo, hi);
        }
    }
}

#[test]
fn cr4_tsd_at_cpl3_raises_gp_through_the_interpreter() {
    for mode in [Mode::Host, Mode::Paced] {
        let mut rig = rig(mode);
        for (name, _, code) in reads() {
            load(&mut rig, 5, &code);
            let mut start = cpu(5);
            start.cr4 |= 1 << 2;
            start.cpl = 3;
            start.seg[crate::cpu::CS].dpl = 3;
            for _ in 0..2 {
                let mut a = copy_tsc(&start);
                let mut b = copy_tsc(&start);
                a.cpl = 3;
                b.cpl = 3;
                let both = rig.run_both(name, &mut a, &mut b, 1, |c| c.reported.is_some());
                assert!(!both.translated, "{mode:?} {name}");
                assert_eq!(a.reported, b.reported, "{name}");
                assert_eq!(a.reported.map(|e| e.0), Some(13), "{mode:?} {name}: #GP");
                assert_eq!((a.gpr, a.rip), (start.gpr, CODE), "{name}: state before it");
            }
            // At CPL 0 TSD does not apply.
            let mut c = copy_tsc(&start);
            c.cpl = 0;
            c.seg[crate::cpu::CS].dpl = 0;
            let (ran, _, _) = run(&mut rig, &mut c, 1);
            assert_eq!(ran, Ran::Translated, "{mode:?} {name} at CPL 0");
        }
    }
}

#[test]
fn other_clock_modes_leave_reads_to_the_interpreter() {
    for mode in [Mode::Scaled, Mode::ForeignHost] {
        let mut rig = rig(mode);
        for (name, kind, code) in reads() {
            load(&mut rig, 7, &code);
            let start = cpu(7);
            let mut c = copy_tsc(&start);
            let (ran, lo, hi) = run(&mut rig, &mut c, 1);
            assert_eq!(ran, Ran::Interpreted, "{mode:?} {name}");
            let t = check_read(name, kind, &start, &c, lo, hi);
            if mode == Mode::ForeignHost {
                assert!(t >= 1 << 50, "{name}: not the accelerator's counter");
            }
        }
    }
}

#[test]
fn leaving_the_host_tsc_stops_a_translation_made_before() {
    // A block translated while the TSC was the host's; then the VM leaves it (a restored
    // foreign TSC). On a scaled clock the same translation must now leave to the interpreter,
    // on a paced one it keeps running translated, with the new raw TSC.
    for paced in [false, true] {
        let mut rig = Rig::with_model(hv::CpuModel::portable_v3());
        let mut clock = Clock::with_pacing(1_000_000, paced);
        clock.use_host_tsc(Arc::new(Accel {
            counter: hv_emu_jit_rt::host_tsc,
        }));
        rig.vm.clock = clock;
        let code = code_of(|a| a.rdtscp());
        load(&mut rig, 9, &code);
        let start = cpu(9);
        let mut c = copy_tsc(&start);
        assert_eq!(run(&mut rig, &mut c, 1).0, Ran::Translated);
        let blocks = rig.jit.stats.blocks;
        rig.vm.clock.leave_host_tsc();
        let mut c = copy_tsc(&start);
        let (ran, lo, hi) = run(&mut rig, &mut c, 1);
        assert_eq!(rig.jit.stats.blocks, blocks, "the same translation");
        let want = if paced {
            Ran::Translated
        } else {
            Ran::Interpreted
        };
        assert_eq!(ran, want, "paced {paced}");
        check_read("after leaving", Kind::Rdtscp, &start, &c, lo, hi);
    }
}

#[test]
fn the_models_gates_and_rdpid() {
    // RDTSCP and RDPID only for a model that has them (the v2 model has neither: #UD).
    let v2 = hv::CpuModel::portable().features();
    for code in [code_of(|a| a.rdtscp()), code_of(|a| a.rdpid(r9))] {
        assert_eq!(classify_for(&first(&code), v2), None);
    }
    assert_eq!(
        classify_for(&first(&code_of(|a| a.rdtsc())), v2),
        Some(Kind::Rdtsc)
    );
    // RDPID reads TSC_AUX in any clock mode, with CR4.TSD at CPL 3 too.
    for mode in [Mode::Host, Mode::Scaled] {
        let mut rig = rig(mode);
        for (r, g) in [(rax, 0usize), (r9, 9), (rsp, 4)] {
            let code = code_of(|a| a.rdpid(r));
            assert_eq!(
                classify_for(&first(&code), rig.vm.features),
                Some(Kind::Rdpid)
            );
            for seed in 1..6u64 {
                load(&mut rig, seed, &code);
                let mut a = cpu(seed);
                a.cr4 |= 1 << 2;
                a.cpl = 3;
                a.seg[crate::cpu::CS].dpl = 3;
                let mut b = copy_tsc(&a);
                let mut a = copy_tsc(&a);
                let both = rig.run_both("rdpid", &mut a, &mut b, 1, |c| c.reported.is_some());
                assert!(both.translated, "{mode:?} rdpid");
                assert_eq!(a.reported, None);
                assert_eq!(a.gpr[g], a.msr.tsc_aux & 0xffff_ffff);
            }
        }
    }
}

#[test]
fn a_block_with_clock_reads_runs_as_one_translation() {
    // What `pvclock_clocksource_read` does around its `rdtscp`: the whole block, reads
    // included, runs translated in one entry, with no instruction left to the interpreter.
    let code = code_of(|a| {
        a.mov(r8, qword_ptr(rbx))?;
        a.rdtscp()?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        a.sub(rax, r8)?;
        a.lfence()?;
        a.rdtsc()?;
        a.add(rax, rcx)?;
        a.rdpid(rsi)?;
        a.mov(qword_ptr(rdi), rax)
    });
    for mode in [Mode::Host, Mode::Paced] {
        let mut rig = rig(mode);
        load(&mut rig, 11, &code);
        let start = cpu(11);
        // Warm the soft TLB (two data pages).
        for _ in 0..3 {
            let mut c = copy_tsc(&start);
            run_jit(&mut rig, &mut c, 10);
        }
        let stats = rig.jit.stats;
        let mut c = copy_tsc(&start);
        let (ran, _, _) = run(&mut rig, &mut c, 10);
        assert_eq!(ran, Ran::Translated, "{mode:?}");
        let s = &rig.jit.stats;
        assert_eq!(s.entries - stats.entries, 1, "{mode:?}: {s:?}");
        assert_eq!(s.run - stats.run, 10, "{mode:?}: {s:?}");
        assert_eq!(s.untranslated, stats.untranslated, "{mode:?}: {s:?}");
        assert_eq!(s.exits_to_interp, stats.exits_to_interp, "{mode:?}: {s:?}");
        assert_eq!(c.rip, code.len() as u64 - 1 + CODE, "at the hlt");
    }
}

#[test]
fn a_delay_loop_of_clock_reads_runs_translated() {
    // A one-block loop (the kernel's `delay_tsc` shape): the register cache carried around the
    // back edge and the reads' write-backs must agree; the last reading is the newest.
    let mut a = CodeAssembler::new(64).unwrap();
    let mut top = a.create_label();
    a.set_label(&mut top).unwrap();
    a.rdtsc().unwrap();
    a.add(r8, 1).unwrap();
    a.mov(r9, rax).unwrap();
    a.dec(ecx).unwrap();
    a.jne(top).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(CODE).unwrap();
    for mode in [Mode::Host, Mode::Paced] {
        let mut rig = rig(mode);
        load(&mut rig, 13, &code);
        let start = cpu(13);
        for _ in 0..2 {
            let mut c = copy_tsc(&start);
            c.gpr[1] = 100;
            let (ran, lo, hi) = run(&mut rig, &mut c, 500);
            assert_eq!(ran, Ran::Translated, "{mode:?}");
            let t = c.gpr[2] << 32 | c.gpr[0];
            assert!(
                lo <= t && t <= hi,
                "{mode:?}: {t:#x} not in [{lo:#x}, {hi:#x}]"
            );
            assert_eq!(c.gpr[9], c.gpr[0], "{mode:?}: r9");
            assert_eq!(c.gpr[8], start.gpr[8].wrapping_add(100), "{mode:?}: r8");
            assert_eq!((c.gpr[1], c.rip), (0, code.len() as u64 - 1 + CODE));
        }
    }
}
