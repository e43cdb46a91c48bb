//! Blocks whose last instruction crosses a page end (`XPage` in `mod.rs`): translated, and
//! dropped when either page is written (a guest store, a device-style write through the code
//! tracker) or when the next page's translation changes; a next page that is not mapped
//! raises #PF (CR2 = its address, RIP = the crossing instruction) on both engines.

use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress};

use super::tests::{CODE, Rig, run_jit};
use super::*;
use crate::cpu::{CR0_PG, CR4_PAE, Cpu};
use crate::testutil::Rng;

/// Where the crossing `mov eax, imm32` starts: its opcode and first two immediate bytes in
/// the page at `CODE`, the last two in the next page.
const CROSS: u64 = CODE + 0xffd;
/// The block's start, a few instructions before it.
const START: u64 = CROSS - 8;

/// `add rbx, 1; add rsi, rbx; nop` (8 bytes from START), `mov eax, imm` at CROSS, then `hlt`
/// (in the next page).
fn crossing(imm: u32) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    a.add(rbx, 1).unwrap();
    a.add(rsi, rbx).unwrap();
    a.nop().unwrap();
    a.mov(eax, imm).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(START).unwrap();
    assert_eq!(code.len(), 8 + 5 + 1);
    code
}

fn cpu_at(seed: u64, rip: u64) -> Cpu {
    let mut c = crate::testutil::cpu64(&mut Rng(seed | 1), 0x3000, 0x4000, 8);
    c.rip = rip;
    c
}

fn rig_with(code: &[u8], at: u64) -> Rig {
    let rig = Rig::with_model(hv::CpuModel::portable());
    rig.load(7, &[]);
    rig.write(at, code);
    rig
}

/// Runs from START on the translator until the `hlt`; returns eax.
fn run_to_hlt(rig: &mut Rig, seed: u64) -> u64 {
    let mut c = cpu_at(seed, START);
    run_jit(rig, &mut c, 50);
    assert_eq!(c.mp_state, MpState::Halted, "stopped at {:#x}", c.rip);
    assert_eq!(c.rip, CROSS + 6);
    c.gpr[0]
}

#[test]
fn a_page_crossing_instruction_is_translated_and_sees_its_second_page_rewritten() {
    let mut rig = rig_with(&crossing(0x1111_1111), START);
    // Against the interpreter first, then alone.
    let (mut a, mut b) = (cpu_at(3, START), cpu_at(3, START));
    rig.run_both("crossing", &mut a, &mut b, 3, |_| false);
    assert_eq!((a.rip, a.gpr[0]), (b.rip, b.gpr[0]));
    let run = rig.jit.stats.run;
    assert_eq!(run_to_hlt(&mut rig, 3), 0x1111_1111);
    assert_eq!(rig.jit.stats.xpage_blocks, 1, "{:?}", rig.jit.stats);
    assert!(
        rig.jit.stats.run >= run + 4,
        "the crossing block did not run as translated code: {:?}",
        rig.jit.stats
    );
    let blocks = rig.jit.stats.blocks;
    // A device-style write to the second page (the immediate's high half): what the VM's
    // write watch does after `GuestMemory`'s accessors.
    rig.m1
        .write_obj(0x2222u16, GuestAddress(CODE + 0x1000))
        .unwrap();
    rig.vm
        .code
        .on_external_write((CODE + 0x1000) >> 12, (CODE + 0x1000) >> 12);
    assert_eq!(
        run_to_hlt(&mut rig, 3),
        0x2222_1111,
        "a stale translation ran"
    );
    assert!(rig.jit.stats.blocks > blocks, "not translated again");
    // A write to the first page (the immediate's low half), through a vCPU's store path.
    rig.m1
        .write_obj(0x3333u16, GuestAddress(CROSS + 1))
        .unwrap();
    rig.vm.code.on_write(CROSS >> 12);
    assert_eq!(
        run_to_hlt(&mut rig, 3),
        0x2222_3333,
        "a stale translation ran"
    );
    assert_eq!(run_to_hlt(&mut rig, 3), 0x2222_3333);
}

#[test]
fn a_guest_store_to_the_second_page_kills_the_crossing_block() {
    // W (two pages on) stores edx into the crossing instruction's immediate high half, in the
    // next page, and jumps to START through the jump cache; the crossing block then runs to a
    // `jmp` back to W, 20 rounds, each with a new immediate. The block's head must find the
    // second page written every time.
    let w_at = CODE + 0x3000;
    let mut a = CodeAssembler::new(64).unwrap();
    a.add(rbx, 1).unwrap();
    a.add(rsi, rbx).unwrap();
    a.nop().unwrap();
    a.mov(eax, 0x1111_1111u32).unwrap();
    a.add(rdi, rax).unwrap();
    a.dec(ecx).unwrap();
    a.jne(w_at).unwrap();
    a.hlt().unwrap();
    let cross = a.assemble(START).unwrap();
    let mut w = CodeAssembler::new(64).unwrap();
    w.inc(edx).unwrap();
    w.mov(word_ptr(CODE + 0x1000), dx).unwrap();
    w.jmp(START).unwrap();
    let w = w.assemble(w_at).unwrap();
    let mut rig = rig_with(&cross, START);
    rig.write(w_at, &w);
    let setup = |c: &mut Cpu| {
        c.rip = w_at;
        c.gpr[1] = 20;
        c.gpr[2] = 0x100;
    };
    let (mut a, mut b) = (cpu_at(5, 0), cpu_at(5, 0));
    setup(&mut a);
    setup(&mut b);
    rig.run_both("store to the second page", &mut a, &mut b, 400, |c| {
        c.mp_state != MpState::Runnable
    });
    assert_eq!(a.mp_state, MpState::Halted);
    assert_eq!((a.rip, a.gpr[7]), (b.rip, b.gpr[7]));
    // The sum of the 20 immediates: each round's high half is the new edx.
    let mut c = cpu_at(5, 0);
    setup(&mut c);
    let rdi0 = c.gpr[7];
    rig.write(CODE + 0x1000, &0x1111u16.to_le_bytes());
    rig.vm
        .code
        .on_external_write((CODE + 0x1000) >> 12, (CODE + 0x1000) >> 12);
    let stale = rig.jit.stats.stale;
    run_jit(&mut rig, &mut c, 400);
    assert_eq!(c.mp_state, MpState::Halted);
    let want = (0x101..0x115u64).fold(rdi0, |s, v| s.wrapping_add(v << 16 | 0x1111));
    assert_eq!(
        c.gpr[7], want,
        "a stale translation of the crossing block ran"
    );
    assert!(rig.jit.stats.xpage_blocks >= 2, "{:?}", rig.jit.stats);
    assert!(rig.jit.stats.stale > stale, "{:?}", rig.jit.stats);
}

/// Page tables (PML4 0x10000, PDPT 0x11000, PD 0x12000, PT 0x13000) mapping the first
/// 128 KiB one to one, except `remap` (virtual page, physical page or `None`: not present).
fn map(rig: &Rig, remap: (u64, Option<u64>)) {
    for m in [&rig.m1, &rig.m2] {
        let w = |a: u64, v: u64| m.write_obj(v, GuestAddress(a)).unwrap();
        for k in 0..512 {
            for t in [0x10000, 0x11000, 0x12000, 0x13000] {
                w(t + 8 * k, 0);
            }
        }
        w(0x10000, 0x11000 | 3);
        w(0x11000, 0x12000 | 3);
        w(0x12000, 0x13000 | 3);
        for p in 0..32u64 {
            let pa = if p * 0x1000 == remap.0 {
                remap.1
            } else {
                Some(p * 0x1000)
            };
            if let Some(pa) = pa {
                w(0x13000 + 8 * p, pa | 3);
            }
        }
    }
}

/// A paged CPU at `rip` whose TLB has a new epoch (as after the flush that must follow a
/// change of the page tables).
fn paged(seed: u64, rip: u64) -> Cpu {
    static EPOCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let mut c = cpu_at(seed, rip);
    c.cr0 |= CR0_PG;
    c.cr4 |= CR4_PAE;
    c.cr3 = 0x10000;
    let epoch = EPOCH.fetch_add(1, Ordering::Relaxed);
    c.tlb.epoch = epoch;
    c.tlb.global_epoch = epoch;
    c
}

/// Runs from START on both engines with paging; returns the translator's result and state.
fn run_paged(rig: &mut Rig, seed: u64) -> (crate::exec::R<(u32, bool)>, Cpu) {
    run_paged_from(rig, seed, START)
}

/// [`run_paged`] from `rip`.
fn run_paged_from(rig: &mut Rig, seed: u64, rip: u64) -> (crate::exec::R<(u32, bool)>, Cpu) {
    let (mut a, mut b) = (paged(seed, rip), paged(seed, rip));
    let both = rig.run_both("paged", &mut a, &mut b, 20, |c| {
        c.mp_state != MpState::Runnable
    });
    assert_eq!(
        format!("{:?}", both.jit.as_ref().err()),
        format!("{:?}", both.interp.as_ref().err()),
        "exception"
    );
    assert_eq!((a.rip, a.cr2, a.mp_state), (b.rip, b.cr2, b.mp_state));
    (both.jit, a)
}

#[test]
fn a_crossing_instruction_into_an_unmapped_page_faults_with_its_address() {
    let next = CODE + 0x1000;
    // Not mapped when first translated: the block ends before the crossing instruction.
    let mut rig = rig_with(&crossing(0x1111_1111), START);
    map(&rig, (next, None));
    for _ in 0..2 {
        let (r, c) = run_paged(&mut rig, 9);
        assert!(r.is_err(), "no fault");
        assert_eq!((c.cr2, c.rip), (next, CROSS));
    }
    assert_eq!(rig.jit.stats.xpage_blocks, 0);
    // Mapped, translated across the page end, then unmapped: the translation must not run.
    let mut rig = rig_with(&crossing(0x1111_1111), START);
    map(&rig, (0, None));
    let (r, c) = run_paged(&mut rig, 9);
    assert!(r.is_ok() && c.mp_state == MpState::Halted, "{r:?}");
    assert_eq!(c.gpr[0], 0x1111_1111);
    assert_eq!(rig.jit.stats.xpage_blocks, 1, "{:?}", rig.jit.stats);
    map(&rig, (next, None));
    for _ in 0..2 {
        let (r, c) = run_paged(&mut rig, 9);
        assert!(r.is_err(), "no fault");
        assert_eq!((c.cr2, c.rip), (next, CROSS));
    }
}

#[test]
fn a_crossing_block_follows_the_next_pages_mapping() {
    // The same first page, its next virtual page mapped to another physical page holding
    // other bytes: the translation made under the first mapping must not run.
    let next = CODE + 0x1000;
    let other = 0x9000;
    let mut rig = rig_with(&crossing(0x1111_1111), START);
    rig.write(other, &[0x22, 0x22, 0xf4]);
    map(&rig, (0, None));
    let (r, c) = run_paged(&mut rig, 4);
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(c.gpr[0], 0x1111_1111);
    map(&rig, (next, Some(other)));
    let (r, c) = run_paged(&mut rig, 4);
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(c.gpr[0], 0x2222_1111, "the old next page's bytes ran");
    assert_eq!(rig.jit.stats.xpage_blocks, 2, "{:?}", rig.jit.stats);
}

#[test]
fn a_jump_linked_to_a_crossing_block_ends_with_the_translations() {
    // A, in the crossing block's first page, jumps to it (a linked jump after the first
    // round); were that link kept, entering A after the next page was remapped (a new address
    // space mapping the first page alike) would run the crossing block without the run
    // loop's check of the next page. Each run here starts with an empty TLB (a new epoch).
    let next = CODE + 0x1000;
    let a_at = CODE + 0x100;
    let mut rig = rig_with(&crossing(0x1111_1111), START);
    let mut a = CodeAssembler::new(64).unwrap();
    a.add(rdx, 1).unwrap();
    a.jmp(START).unwrap();
    rig.write(a_at, &a.assemble(a_at).unwrap());
    rig.write(0x9000, &[0x22, 0x22, 0xf4]);
    map(&rig, (0, None));
    for _ in 0..3 {
        let (r, c) = run_paged_from(&mut rig, 4, a_at);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(c.gpr[0], 0x1111_1111);
    }
    map(&rig, (next, Some(0x9000)));
    let (r, c) = run_paged_from(&mut rig, 4, a_at);
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(c.gpr[0], 0x2222_1111, "the old next page's bytes ran");
    assert!(rig.jit.stats.links >= 1, "{:?}", rig.jit.stats);
}

#[test]
fn a_chain_within_a_page_sees_its_page_rewritten_when_entered_again() {
    // A -> B -> C linked in one page (each link past its target's page-generation check);
    // W, on another page, rewrites B's immediate and enters A through the jump cache, 30
    // rounds. Every round must run the new immediate: A's head (an entry from outside the
    // page) finds the page written, and the chain is translated and linked anew.
    let w_at = CODE + 0x2000;
    let mut a = CodeAssembler::new(64).unwrap();
    let mut lb = a.create_label();
    let mut lc = a.create_label();
    a.add(rbx, 1).unwrap();
    a.jmp(lb).unwrap();
    a.db(&[0xcc; 8]).unwrap();
    a.set_label(&mut lc).unwrap();
    a.add(rdi, rsi).unwrap();
    a.dec(edx).unwrap();
    a.jne(w_at).unwrap();
    a.hlt().unwrap();
    a.db(&[0xcc; 8]).unwrap();
    a.set_label(&mut lb).unwrap();
    a.mov(esi, 0x1111_1111u32).unwrap();
    a.jmp(lc).unwrap();
    let page = a.assemble(CODE).unwrap();
    let b_imm = CODE + page.windows(4).position(|w| w == [0x11; 4]).unwrap() as u64;
    let mut w = CodeAssembler::new(64).unwrap();
    w.mov(dword_ptr(b_imm), eax).unwrap();
    w.inc(eax).unwrap();
    w.jmp(CODE).unwrap();
    let w = w.assemble(w_at).unwrap();
    let mut rig = rig_with(&page, CODE);
    rig.write(w_at, &w);
    let setup = |c: &mut Cpu| {
        c.rip = w_at;
        c.gpr[0] = 5;
        c.gpr[2] = 30;
    };
    for seed in [3u64, 4] {
        let (mut a, mut b) = (cpu_at(seed, 0), cpu_at(seed, 0));
        setup(&mut a);
        setup(&mut b);
        rig.write(b_imm, &0x1111_1111u32.to_le_bytes());
        rig.vm.code.on_external_write(b_imm >> 12, b_imm >> 12);
        rig.run_both("chain", &mut a, &mut b, 400, |c| {
            c.mp_state != MpState::Runnable
        });
        assert_eq!(a.mp_state, MpState::Halted);
    }
    let mut c = cpu_at(7, 0);
    setup(&mut c);
    let rdi0 = c.gpr[7];
    run_jit(&mut rig, &mut c, 400);
    assert_eq!(c.mp_state, MpState::Halted);
    let want = (5..35u64).fold(rdi0, |s, v| s.wrapping_add(v));
    assert_eq!(c.gpr[7], want, "a stale translation of B ran");
    assert!(rig.jit.stats.links >= 2, "{:?}", rig.jit.stats);
}

/// Page tables like [`map`], every upper level user-accessible, the page at `p * 0x1000`
/// (below 128 KiB) mapped one to one with the leaf flags `flags(p)` (`None`: not present;
/// `0x3`: supervisor, `0x7`: user).
fn map_flags(rig: &Rig, flags: impl Fn(u64) -> Option<u64>) {
    for m in [&rig.m1, &rig.m2] {
        let w = |a: u64, v: u64| m.write_obj(v, GuestAddress(a)).unwrap();
        for k in 0..512 {
            for t in [0x10000, 0x11000, 0x12000, 0x13000] {
                w(t + 8 * k, 0);
            }
        }
        w(0x10000, 0x11000 | 7);
        w(0x11000, 0x12000 | 7);
        w(0x12000, 0x13000 | 7);
        for p in 0..32u64 {
            if let Some(f) = flags(p) {
                w(0x13000 + 8 * p, (p * 0x1000) | f);
            }
        }
    }
}

/// Runs the translator from `rip` at `cpl` on `c` (its TLB and epoch kept from run to run).
fn run_at(
    rig: &mut Rig,
    c: &mut Cpu,
    rip: u64,
    cpl: u8,
    budget: u32,
) -> crate::exec::R<(u32, bool)> {
    c.rip = rip;
    c.cpl = cpl;
    c.mp_state = MpState::Runnable;
    crate::testutil::exec(c, &rig.m1, &rig.vm, |ex| {
        ex.run_batch_jit(&mut rig.jit, &mut BlockCache::new(), budget, false)
    })
}

/// A at `CODE + 0x100` (`add rdx, 1; jmp START`) in the crossing block's first page, and a
/// user-mode loop at 0x5000 (`add rdx, 1; jmp 0x5000`).
fn linked_rig(imm: u32) -> (Rig, u64, u64) {
    let a_at = CODE + 0x100;
    let user = 0x5000;
    let rig = rig_with(&crossing(imm), START);
    let mut a = CodeAssembler::new(64).unwrap();
    a.add(rdx, 1).unwrap();
    a.jmp(START).unwrap();
    rig.write(a_at, &a.assemble(a_at).unwrap());
    let mut u = CodeAssembler::new(64).unwrap();
    let mut top = u.create_label();
    u.set_label(&mut top).unwrap();
    u.add(rdx, 1).unwrap();
    u.jmp(top).unwrap();
    rig.write(user, &u.assemble(user).unwrap());
    (rig, a_at, user)
}

#[test]
fn a_kernel_link_to_a_crossing_block_survives_a_round_trip_through_user_mode() {
    // Supervisor pages hold A and the crossing block (and its next page), 0x5000 is a user
    // page. A's jump is linked at CPL 0; a run at CPL 3 under the same translations (a system
    // call's return and the next call) cannot reach A, so back at CPL 0 the link still holds
    // and is taken: no unlink, no new link, no exit through an unlinked jump.
    let (mut rig, a_at, user) = linked_rig(0x1111_1111);
    map_flags(&rig, |p| Some(if p == 5 { 7 } else { 3 }));
    let mut c = paged(6, a_at);
    for _ in 0..2 {
        let r = run_at(&mut rig, &mut c, a_at, 0, 50);
        assert!(r.is_ok() && c.mp_state == MpState::Halted, "{r:?}");
        assert_eq!(c.gpr[0], 0x1111_1111);
    }
    let s = rig.jit.stats;
    assert_eq!((s.links, s.xpage_blocks), (1, 1), "{s:?}");
    let r = run_at(&mut rig, &mut c, user, 3, 50);
    assert!(r.is_ok(), "{r:?}");
    assert!(rig.jit.stats.entries > s.entries, "no entry at CPL 3");
    let r = run_at(&mut rig, &mut c, a_at, 0, 50);
    assert!(r.is_ok() && c.mp_state == MpState::Halted, "{r:?}");
    assert_eq!(c.gpr[0], 0x1111_1111);
    let t = rig.jit.stats;
    assert_eq!(
        (t.unlinks, t.links, t.exits_link),
        (s.unlinks, s.links, s.exits_link),
        "the link was undone by the round trip: {t:?}"
    );
}

#[test]
fn a_user_block_crossing_into_a_supervisor_page_faults_after_a_kernel_link() {
    // A and the crossing block in a user page, the next page supervisor-only (the kernel may
    // run user pages: no SMEP). Linked at CPL 0, A's jump must not take the crossing block at
    // CPL 3: its fetch of the next page faults there (#PF, CR2 = the next page, RIP = the
    // crossing instruction), as on the interpreter.
    let next = CODE + 0x1000;
    let (mut rig, a_at, _) = linked_rig(0x1111_1111);
    map_flags(&rig, |p| {
        Some(if p == CODE >> 12 || p == 5 { 7 } else { 3 })
    });
    let mut c = paged(8, a_at);
    for _ in 0..2 {
        let r = run_at(&mut rig, &mut c, a_at, 0, 50);
        assert!(r.is_ok() && c.mp_state == MpState::Halted, "{r:?}");
        assert_eq!(c.gpr[0], 0x1111_1111);
    }
    assert_eq!(rig.jit.stats.links, 1, "{:?}", rig.jit.stats);
    for _ in 0..2 {
        c.cr2 = 0;
        let r = run_at(&mut rig, &mut c, a_at, 3, 50);
        assert!(r.is_err(), "no fault");
        assert_eq!((c.cr2, c.rip), (next, CROSS), "{r:?}");
    }
}

#[test]
fn a_link_to_a_crossing_block_ends_when_the_next_page_changes() {
    // Linked with the next page mapped, then (a TLB flush later) the next page unmapped at
    // CPL 0, or made supervisor-only under user code at CPL 3: the linked jump must not run
    // the crossing block past the changed translation.
    let next = CODE + 0x1000;
    for (cpl, code_flags, changed) in [(0u8, 3u64, None), (3, 7, Some(3u64))] {
        let (mut rig, a_at, _) = linked_rig(0x1111_1111);
        map_flags(&rig, |p| {
            Some(if p == 1 || p == 2 { code_flags } else { 3 })
        });
        let mut c = paged(9, a_at);
        for _ in 0..2 {
            let r = run_at(&mut rig, &mut c, a_at, cpl, 50);
            // At CPL 3 the `hlt` after the crossing instruction raises #GP.
            assert_eq!(r.is_ok(), cpl == 0, "{r:?}");
            assert_eq!(c.gpr[0], 0x1111_1111);
        }
        assert_eq!(rig.jit.stats.links, 1, "{:?}", rig.jit.stats);
        map_flags(&rig, |p| match p {
            2 => changed,
            1 => Some(code_flags),
            _ => Some(3),
        });
        c.tlb.flush_all();
        c.cr2 = 0;
        let r = run_at(&mut rig, &mut c, a_at, cpl, 50);
        assert!(r.is_err(), "CPL {cpl}: no fault");
        assert_eq!((c.cr2, c.rip), (next, CROSS), "CPL {cpl}: {r:?}");
    }
}

#[test]
fn a_kernel_link_is_undone_when_its_page_becomes_user_accessible_without_a_flush() {
    // Linked at CPL 0 out of a supervisor page and kept across the class change; the guest
    // then makes that page user-accessible without flushing (a permission upgrade; the TLB
    // walks again when its cached entry refuses the fetch). At CPL 3 the crossing block must
    // still fault on its supervisor-only next page: the lookup that lets user mode into the
    // page undoes the kept link.
    let next = CODE + 0x1000;
    let (mut rig, a_at, user) = linked_rig(0x1111_1111);
    map_flags(&rig, |p| Some(if p == 5 { 7 } else { 3 }));
    let mut c = paged(10, a_at);
    for _ in 0..2 {
        let r = run_at(&mut rig, &mut c, a_at, 0, 50);
        assert!(r.is_ok() && c.mp_state == MpState::Halted, "{r:?}");
    }
    assert_eq!(rig.jit.stats.links, 1, "{:?}", rig.jit.stats);
    let r = run_at(&mut rig, &mut c, user, 3, 50);
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(rig.jit.stats.unlinks, 0, "not kept across the class change");
    map_flags(&rig, |p| {
        Some(if p == 5 || p == CODE >> 12 { 7 } else { 3 })
    });
    c.cr2 = 0;
    let r = run_at(&mut rig, &mut c, a_at, 3, 50);
    assert!(r.is_err(), "no fault");
    assert_eq!((c.cr2, c.rip), (next, CROSS), "{r:?}");
}

#[test]
fn a_kernel_link_out_of_a_page_user_mode_ran_is_undone_at_the_class_change() {
    // A and the crossing block in a user page, the next page supervisor-only. User code at
    // 0x5000 jumps to A (through the jump cache: another page), so the CPL-3 half caches A;
    // then the kernel runs A and links its jump. Back at CPL 3 the jump cache enters A
    // without a lookup in its page: the link, made out of a page user mode had run, must not
    // have survived the change to CPL 3.
    let next = CODE + 0x1000;
    let (mut rig, a_at, user) = linked_rig(0x1111_1111);
    let mut u = CodeAssembler::new(64).unwrap();
    u.add(rdx, 1).unwrap();
    u.jmp(a_at).unwrap();
    rig.write(user, &u.assemble(user).unwrap());
    map_flags(&rig, |p| {
        Some(if p == CODE >> 12 || p == 5 { 7 } else { 3 })
    });
    let mut c = paged(11, user);
    for _ in 0..2 {
        c.cr2 = 0;
        let r = run_at(&mut rig, &mut c, user, 3, 50);
        assert!(r.is_err(), "no fault");
        assert_eq!((c.cr2, c.rip), (next, CROSS), "{r:?}");
    }
    for _ in 0..2 {
        let r = run_at(&mut rig, &mut c, a_at, 0, 50);
        assert!(r.is_ok() && c.mp_state == MpState::Halted, "{r:?}");
    }
    assert!(rig.jit.stats.links >= 1, "{:?}", rig.jit.stats);
    c.cr2 = 0;
    let r = run_at(&mut rig, &mut c, user, 3, 50);
    assert!(r.is_err(), "no fault");
    assert_eq!((c.cr2, c.rip), (next, CROSS), "{r:?}");
}
