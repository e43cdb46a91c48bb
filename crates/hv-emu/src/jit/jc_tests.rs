//! The jump cache's two ways ([`JC_WAYS`]): targets sharing a set stay cached together (the
//! generated probe finds either way), a third pushes out the older, flushes reach both ways
//! and keep a moved entry's global state, and the privilege classes stay apart.

use iced_x86::code_asm::*;

use super::tests::{CODE, Rig, run_jit};
use super::*;
use crate::testutil::Rng;

/// Up to `n` RIPs of the test memory's pages (one per page, past `CODE`'s, with room for a
/// few instructions before the page end) in the jump-cache set of `of`.
fn same_set(of: u64, n: usize) -> Vec<u64> {
    let set = jc_index(of);
    (2..32u64)
        .filter_map(|p| {
            (0..0xf00u64)
                .map(|off| p * 0x1000 + off)
                .find(|&rip| jc_index(rip) == set)
        })
        .filter(|&rip| rip >> 12 != of >> 12)
        .take(n)
        .collect()
}

/// Whether the jump-cache half of `cpl` holds `rip` (in either way of its set), and the host
/// address it goes to.
fn jc_entry(jit: &Jit, rip: u64, cpl: u8) -> Option<u64> {
    let i = jc_index(rip) + jc_half(cpl);
    [i, i + 1]
        .into_iter()
        .map(|i| jit.ctx.jc[i])
        .find(|e| e.neg_rip == rip.wrapping_neg())
        .map(|e| e.addr)
}

#[test]
fn the_sets_are_where_the_probe_looks() {
    // The emitter's pdep mask selects a 32-byte set: way 0 at `jc_index`, way 1 next to it.
    assert_eq!(JC_WAYS, 2);
    assert_eq!(jc_index(0) % JC_WAYS, 0);
    assert_eq!(jc_index(0x10) - jc_index(0), 0x10 * JC_WAYS);
    let rips = same_set(CODE + 0x40, 3);
    assert_eq!(rips.len(), 3, "no three colliding RIPs in the test memory");
}

#[test]
fn two_targets_of_one_set_alternate_without_leaving_translated_code() {
    // X (one page) and Y (another, same jump-cache set) jump to each other through the jump
    // cache, ecx rounds: a direct-mapped cache lost one of them at every jump (two exits per
    // round); with two ways the whole loop is one entry once both are cached.
    let x = CODE + 0x40;
    let y = same_set(x, 1)[0];
    assert_eq!(jc_index(x), jc_index(y));
    let mut a = CodeAssembler::new(64).unwrap();
    let mut again = a.create_label();
    a.add(rax, 1).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(again).unwrap();
    a.hlt().unwrap();
    a.set_label(&mut again).unwrap();
    a.jmp(y).unwrap();
    let xs = a.assemble(x).unwrap();
    let mut b = CodeAssembler::new(64).unwrap();
    b.add(rax, 0x100).unwrap();
    b.jmp(x).unwrap();
    let ys = b.assemble(y).unwrap();
    let mut rig = Rig::with_model(hv::CpuModel::portable());
    rig.load(3, &[]);
    rig.write(x, &xs);
    rig.write(y, &ys);
    let mut c = crate::testutil::cpu64(&mut Rng(5), 0x3000, 0x1000, 8);
    let mut round = |rig: &mut Rig, n: u64| {
        c.rip = x;
        c.mp_state = MpState::Runnable;
        c.gpr[0] = 0;
        c.gpr[1] = n;
        run_jit(rig, &mut c, 2000);
        assert_eq!(c.mp_state, MpState::Halted, "stopped at {:#x}", c.rip);
        assert_eq!(
            c.gpr[0],
            n + 0x100 * (n - 1),
            "a probe went to the wrong block"
        );
    };
    round(&mut rig, 3);
    assert!(jc_entry(&rig.jit, x, 0).is_some() && jc_entry(&rig.jit, y, 0).is_some());
    assert_ne!(jc_entry(&rig.jit, x, 0), jc_entry(&rig.jit, y, 0));
    let s = rig.jit.stats;
    round(&mut rig, 200);
    let t = rig.jit.stats;
    assert_eq!(t.entries - s.entries, 1, "{t:?}");
    assert_eq!(t.exits_other, s.exits_other, "jump-cache misses: {t:?}");
    assert!(t.run - s.run >= 200 * 3 + 199 * 3, "{t:?}");
}

#[test]
fn a_third_target_of_a_set_pushes_out_the_older() {
    let mut jit = Jit::new(1 << 20).unwrap();
    jit.cache.push(&[0xc3; 256]).unwrap();
    let x = CODE + 0x40;
    let v = same_set(x, 2);
    let (y, z) = (v[0], v[1]);
    jit.jc_fill(x, 16, true, 0);
    jit.jc_fill(y, 32, true, 0);
    // Filled again (a new translation): replaced where it is, not cached twice.
    jit.jc_fill(x, 48, true, 0);
    let base = jit.cache.address_of(0).unwrap();
    let at = |k: u64| Some(base + k);
    assert_eq!(jc_entry(&jit, x, 0), at(48));
    assert_eq!(jc_entry(&jit, y, 0), at(32));
    assert_eq!(jit.jc_used.len(), 2);
    jit.jc_fill(z, 64, true, 0);
    assert_eq!(jc_entry(&jit, z, 0), at(64));
    assert_eq!(
        jc_entry(&jit, y, 0),
        at(32),
        "the newer of the two was pushed out"
    );
    assert_eq!(jc_entry(&jit, x, 0), None, "three entries in a 2-way set");
    assert_eq!(jit.jc_used.len(), 2);
}

#[test]
fn flushes_reach_both_ways_and_a_moved_entry_keeps_its_global_state() {
    let mut jit = Jit::new(1 << 20).unwrap();
    jit.cache.push(&[0xc3; 256]).unwrap();
    let k = 0xffff_ffff_8100_0040u64;
    let u = (k + 0x1000..k + 0x20000)
        .find(|&r| jc_index(r) == jc_index(k))
        .unwrap();
    // A global entry moved to way 1 by a non-global one: MOV to CR3 drops way 0 only.
    jit.jc_fill(k, 16, true, 0);
    jit.jc_fill(u, 32, false, 0);
    assert!(jc_entry(&jit, k, 0).is_some() && jc_entry(&jit, u, 0).is_some());
    jit.flush_nonglobal_tlb();
    assert!(jc_entry(&jit, k, 0).is_some(), "a global entry was dropped");
    assert!(
        jc_entry(&jit, u, 0).is_none(),
        "a non-global entry survived"
    );
    // The other way round: the non-global entry moved to way 1 goes with the next flush.
    jit.flush_jc();
    jit.jc_fill(u, 32, false, 0);
    jit.jc_fill(k, 16, true, 0);
    jit.flush_nonglobal_tlb();
    assert!(
        jc_entry(&jit, u, 0).is_none(),
        "a non-global entry moved to way 1 survived MOV to CR3"
    );
    // A full flush empties both ways.
    jit.jc_fill(k, 16, true, 0);
    jit.jc_fill(u, 32, true, 0);
    jit.flush_tlb();
    assert!(jc_entry(&jit, k, 0).is_none() && jc_entry(&jit, u, 0).is_none());
    assert!(jit.ctx.jc.iter().all(|e| e.neg_rip == 1) && jit.jc_used.is_empty());
}

#[test]
fn the_privilege_halves_do_not_share_sets() {
    // Two user targets of one set fill the CPL 3 half only: the kernel's entry of that set
    // stays, and neither class finds the other's.
    let mut jit = Jit::new(1 << 20).unwrap();
    jit.cache.push(&[0xc3; 256]).unwrap();
    let x = CODE + 0x40;
    let v = same_set(x, 2);
    jit.jc_fill(x, 16, true, 0);
    jit.jc_fill(v[0], 32, false, 3);
    jit.jc_fill(v[1], 48, false, 3);
    assert!(
        jc_entry(&jit, x, 0).is_some(),
        "user fills evicted a kernel entry"
    );
    assert!(jc_entry(&jit, x, 3).is_none());
    assert!(jc_entry(&jit, v[0], 3).is_some() && jc_entry(&jit, v[1], 3).is_some());
    assert!(jc_entry(&jit, v[0], 0).is_none() && jc_entry(&jit, v[1], 0).is_none());
    jit.flush_nonglobal_tlb();
    assert!(jc_entry(&jit, x, 0).is_some());
    assert!(jc_entry(&jit, v[0], 3).is_none() && jc_entry(&jit, v[1], 3).is_none());
    assert_eq!(jit.jc_used.len(), 1);
}
