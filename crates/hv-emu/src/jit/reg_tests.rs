//! The register cache (`RegCache` in `emit.rs`): guest registers a block keeps in host
//! registers must reach the register file on every way out — a fault at a memory access
//! (page fault, #GP of a non-canonical address), an alignment exit, a direct link to another
//! block, a loop back edge, the jump cache, the end of the run — with exactly the values
//! before the instruction that left. Each case runs on the translator (every block
//! translated at first sight) and on the interpreter from the same state, and the general
//! registers, memory, RIP, arithmetic flags, CR2 and the exception must agree.

use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress};

use super::super::tests::{CODE, PATCHED, Rig, code_of, patch_and_call};
use crate::cpu::{ARITH_FLAGS, CR0_PG, CR4_PAE, Cpu};
use crate::testutil::Rng;

/// Page tables (PML4 0x10000, PDPT 0x11000, PD 0x12000, PT 0x13000) mapping the first
/// 128 KiB one to one, writable, except the page at [`HOLE`] (not present) and the page at
/// [`RDONLY`] (read-only).
const HOLE: u64 = 0xa000;
const RDONLY: u64 = 0xc000;

fn map(rig: &Rig) {
    for m in [&rig.m1, &rig.m2] {
        let w = |a: u64, v: u64| m.write_obj(v, GuestAddress(a)).unwrap();
        for k in 0..512 {
            for t in [0x10000, 0x11000, 0x12000] {
                w(t + 8 * k, 0);
            }
            w(0x13000 + 8 * k, 0);
        }
        w(0x10000, 0x11000 | 3);
        w(0x11000, 0x12000 | 3);
        w(0x12000, 0x13000 | 3);
        for p in 0..32u64 {
            if p * 0x1000 == RDONLY {
                w(0x13000 + 8 * p, (p * 0x1000) | 1);
            } else if p * 0x1000 != HOLE {
                w(0x13000 + 8 * p, (p * 0x1000) | 3);
            }
        }
    }
}

fn cpu(seed: u64, paging: bool, setup: &dyn Fn(&mut Cpu)) -> Cpu {
    let mut c = crate::testutil::cpu64(&mut Rng(seed | 1), 0x3000, 0x6000, 8);
    if paging {
        c.cr0 |= CR0_PG;
        c.cr4 |= CR4_PAE;
        c.cr3 = 0x10000;
    }
    setup(&mut c);
    c
}

/// Runs `code` for `budget` instructions on both engines from the state `setup` makes (on
/// random registers of `seed`) and compares everything; returns the translator's result.
fn both(
    code: &[u8],
    seed: u64,
    budget: u32,
    paging: bool,
    setup: &dyn Fn(&mut Cpu),
) -> (Rig, crate::exec::R<(u32, bool)>, Cpu) {
    let mut rig = Rig::with_model(hv::CpuModel::portable());
    rig.load(seed, code);
    if paging {
        map(&rig);
    }
    let mut a = cpu(seed, paging, setup);
    let mut b = cpu(seed, paging, setup);
    let both = rig.run_both("regcache", &mut a, &mut b, budget, |_| false);
    assert_eq!(
        format!("{:?}", both.jit.as_ref().err()),
        format!("{:?}", both.interp.as_ref().err()),
        "exception"
    );
    assert_eq!(a.rip, b.rip, "rip");
    assert_eq!(a.rflags & ARITH_FLAGS, b.rflags & ARITH_FLAGS, "flags");
    assert_eq!(a.cr2, b.cr2, "cr2");
    assert!(rig.jit.stats.blocks > 0, "nothing was translated");
    (rig, both.jit, a)
}

/// Writes to many guest registers (more than the cache holds, so some are evicted dirty),
/// including rax, rsp and the address registers.
fn scribble(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.add(rbx, 5)?;
    a.lea(r9, qword_ptr(rbx + rcx * 2 + 7))?;
    a.xor(eax, r9d)?;
    a.inc(rcx)?;
    a.mov(r10, rax)?;
    a.sub(r11, r9)?;
    a.imul_3(r12, r10, 3)?;
    a.not(r13)?;
    a.add(r14w, 0x1234)?;
    a.mov(r15b, 7)?;
    a.sub(rsp, 0x40)?;
    a.mov(rdx, rsp)?;
    a.or(rbp, 1)?;
    Ok(())
}

#[test]
fn a_page_fault_after_cached_writes_sees_them_all() {
    for (n, seed) in [3u64, 0x9e37_79b9, 0x1234_5678_9abc]
        .into_iter()
        .enumerate()
    {
        let code = code_of(|a| {
            scribble(a)?;
            a.mov(r8, qword_ptr(rdi))?; // rdi is in the hole: #PF
            a.add(rbx, 1)
        });
        let (_, r, c) = both(&code, seed, 100, true, &|c| c.gpr[7] = HOLE + 8 * n as u64);
        assert!(r.is_err(), "no fault");
        assert_eq!(c.cr2, HOLE + 8 * n as u64);
        // The faulting load is instruction 14.
        assert_eq!(c.rip, CODE + code_len_before_fault());
    }
}

fn code_len_before_fault() -> u64 {
    code_of(scribble).len() as u64 - 1 // without the hlt
}

#[test]
fn a_store_fault_and_a_non_canonical_address_see_the_cached_writes() {
    // A store into the hole (#PF, write), and a load at a non-canonical address (#GP).
    let store = code_of(|a| {
        scribble(a)?;
        a.mov(qword_ptr(rdi + 16), r9)
    });
    let (_, r, _) = both(&store, 17, 100, true, &|c| c.gpr[7] = HOLE);
    assert!(r.is_err());
    let gp = code_of(|a| {
        scribble(a)?;
        a.mov(r8, qword_ptr(rdi))
    });
    let (_, r, _) = both(&gp, 19, 100, false, &|c| c.gpr[7] = 0x8000_0000_0000_0000);
    assert!(r.is_err());
}

#[test]
fn a_misaligned_locked_access_leaves_with_the_cached_writes() {
    // The alignment exit interprets the `lock add` (no fault): the run goes on after it.
    let code = code_of(|a| {
        scribble(a)?;
        a.lock().add(dword_ptr(rsi + 1), eax)?;
        a.add(rax, r10)?;
        a.mov(qword_ptr(rsi + 64), rax)
    });
    for seed in [5, 6, 7] {
        let (_, r, _) = both(&code, seed, 200, false, &|_| {});
        assert!(r.is_ok());
    }
}

#[test]
fn links_loops_and_the_jump_cache_see_the_cached_writes() {
    // A loop (back edge to the block head), a jcc to another block of the page (a link),
    // a jump to another page (jump cache), each leaving with dirty registers.
    let code = code_of(|a| {
        let mut top = a.create_label();
        let mut odd = a.create_label();
        let mut far = a.create_label();
        a.and(ecx, 15)?;
        a.inc(ecx)?;
        a.set_label(&mut top)?;
        a.add(r8, qword_ptr(rsi))?;
        a.lea(rsi, qword_ptr(rsi + 8))?;
        a.xor(r9, r8)?;
        a.dec(ecx)?;
        a.jne(top)?;
        a.test(r8b, 1)?;
        a.jne(odd)?;
        a.add(r10, r9)?;
        a.jmp(far)?;
        a.set_label(&mut odd)?;
        a.sub(r10, r9)?;
        a.mov(r11, rsi)?;
        a.jmp(far)?;
        // Pad to the next page.
        for _ in 0..4096 {
            a.nop()?;
        }
        a.set_label(&mut far)?;
        a.mov(rax, r10)?;
        a.add(rax, r11)?;
        a.mov(qword_ptr(rdi), rax)
    });
    let mut rng = Rng(0xbeef);
    for _ in 0..12 {
        let seed = rng.next();
        let (rig, r, _) = both(&code, seed, 5000, false, &|_| {});
        assert!(r.is_ok());
        assert!(rig.jit.stats.blocks >= 3);
    }
}

#[test]
fn the_uncached_path_sees_the_cached_writes() {
    // Instructions the cache does not take (implicit operands, cl counts, high bytes, push,
    // pop, div, string, pushfq) between cached ones: the register file must be current for
    // them, and their results must be seen by the cached ones after.
    let code = code_of(|a| {
        a.add(rbx, 3)?;
        a.mov(r8, rbx)?;
        a.shl(r8, cl)?;
        a.add(rax, r8)?;
        a.mul(rbx)?;
        a.add(rdx, rax)?;
        a.mov(ah, dl)?;
        a.add(rax, 1)?;
        a.push(rax)?;
        a.add(rsp, 8)?;
        a.sub(rsp, 8)?;
        a.pop(r9)?;
        a.add(r9, rax)?;
        a.or(r9, 1)?;
        a.mov(rax, r9)?;
        a.xor(edx, edx)?;
        a.div(r9)?;
        a.add(rax, rdx)?;
        a.pushfq()?;
        a.pop(r10)?;
        a.xchg(r10, rax)?;
        a.cqo()?;
        a.mov(ecx, 4)?;
        a.add(rdi, 0x100)?;
        a.rep().stosq()?;
        a.add(rdi, rcx)?;
        a.mov(qword_ptr(rdi), rax)
    });
    let mut rng = Rng(0xfeed);
    for _ in 0..16 {
        let seed = rng.next();
        let (_, r, _) = both(&code, seed, 100, false, &|c| c.rflags &= !crate::cpu::DF);
        assert!(r.is_ok());
    }
}

#[test]
fn random_register_heavy_blocks_fault_precisely() {
    // Random mixes of register-only instructions over all 16 registers, ended by a load
    // from the hole: the #PF must see the state after exactly the instructions before it.
    let mut rng = Rng(0x5eed_cafe);
    let regs = [
        rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15,
    ];
    for _ in 0..60 {
        let picks: Vec<(u64, usize, usize)> = (0..20)
            .map(|_| {
                (
                    rng.next() % 5,
                    (rng.next() % 16) as usize,
                    (rng.next() % 16) as usize,
                )
            })
            .collect();
        let code = code_of(|a| {
            for &(op, x, y) in &picks {
                let (d, s) = (regs[x], regs[y]);
                match op {
                    0 => a.add(d, s)?,
                    1 => a.xor(d, s)?,
                    2 => a.lea(d, qword_ptr(s + 3))?,
                    3 => a.mov(d, s)?,
                    _ => a.adc(d, s)?,
                }
            }
            // A base register that none of the picks wrote would not do: take it from the
            // context through the stack-free path: mov r8, HOLE; load.
            a.mov(r8, HOLE)?;
            a.mov(r9, qword_ptr(r8 + 8))
        });
        let seed = rng.next();
        let (_, r, c) = both(&code, seed, 100, true, &|_| {});
        assert!(r.is_err());
        // The fault's delivery may fault again (no IDT, a random rsp): CR2 is then another
        // address in the hole, the same on both engines (compared above).
        assert_eq!(c.cr2 >> 12, HOLE >> 12);
    }
}

#[test]
fn memory_fills_between_runs_leave_the_cache_alone() {
    // A block whose loads miss the soft TLB once per page (each miss an exit with dirty
    // registers and a resumption in the next block run).
    let code = code_of(|a| {
        let mut top = a.create_label();
        a.mov(ecx, 40)?;
        a.set_label(&mut top)?;
        a.add(r8, qword_ptr(rsi))?;
        a.mov(qword_ptr(rdi), r8)?;
        a.lea(rsi, qword_ptr(rsi + 0x408))?;
        a.lea(rdi, qword_ptr(rdi + 0x208))?;
        a.inc(r12)?;
        a.dec(ecx)?;
        a.jne(top)
    });
    for seed in [11, 12, 13] {
        let (rig, r, _) = both(&code, seed, 1000, true, &|c| {
            c.gpr[6] = 0x1_0000 - 0x408 * 10;
            c.gpr[7] = 0x4000;
        });
        assert!(r.is_ok());
        assert!(rig.jit.stats.exits_to_interp > 2);
    }
}

#[test]
fn stack_operations_on_the_cache_fault_precisely() {
    // push, pop, call and ret keep guest rsp in the cache: a #PF at each (the stack in the
    // hole) must see rsp and the other registers as before the instruction; the same code
    // on a mapped stack must run to the end alike.
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "push",
            code_of(|a| {
                a.add(rbx, 9)?;
                a.pop(r9)?;
                a.push(rax)?;
                a.push(r9)?;
                a.push(0x1234)?;
                a.push(rsp)?;
                a.add(rbx, 1)
            }),
        ),
        (
            "pop",
            code_of(|a| {
                a.inc(r10)?;
                a.pop(rax)?;
                a.xor(rax, r10)?;
                a.pop(r11)?;
                a.pop(rbp)?;
                a.add(rbp, rax)
            }),
        ),
        (
            "call/ret",
            code_of(|a| {
                let mut f = a.create_label();
                let mut out = a.create_label();
                a.add(r8, 3)?;
                a.call(f)?;
                a.jmp(out)?;
                a.set_label(&mut f)?;
                a.mov(r9, rsp)?;
                a.add(r8, r9)?;
                a.ret()?;
                a.set_label(&mut out)?;
                a.add(r8, 1)
            }),
        ),
    ];
    for (name, code) in &cases {
        for k in 0..6u64 {
            // The stack a few slots above the hole (the ops cross into it) or in mapped RAM.
            let stack = if k < 4 {
                HOLE + 0x1000 - 0x10 + 8 * k
            } else {
                0x8000 + 8 * k
            };
            let (_, r, c) = both(code, 40 + k, 100, true, &move |c| c.gpr[4] = stack);
            if k >= 4 {
                assert!(r.is_ok(), "{name}: {r:?}");
            } else if r.is_err() {
                assert_eq!(c.cr2 >> 12, HOLE >> 12, "{name}");
            }
        }
    }
}

#[test]
fn a_loop_carrying_its_registers_leaves_exactly_at_the_budget() {
    // A one-block loop over five registers (carried around the back edge in host
    // registers): the run ends at every possible budget, so the back edge's budget exit
    // leaves with the loop's registers dirty, and must write them all back.
    let code = code_of(|a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.add(rax, qword_ptr(rsi + rcx * 8))?;
        a.adc(rdx, r9)?;
        a.xor(r9, rax)?;
        a.inc(rcx)?;
        a.jne(top)
    });
    for budget in 1..40 {
        let (rig, r, _) = both(&code, 100 + u64::from(budget), budget, false, &|c| {
            c.gpr[1] = (-1000i64) as u64;
            c.gpr[6] = 0x4000 + 8 * 1000;
        });
        assert!(r.is_ok());
        assert!(rig.jit.stats.blocks >= 1);
    }
}

// The soft-TLB check (`Emitter::tlb`): one tag per slot compared with the page of the access's
// last byte, and one check shared by two consecutive instructions with the same memory
// operand (`Covered` in emit.rs: add_n's `adc rax, [m]; mov [m], rax`).

/// Warms the soft-TLB slot of the page of `rdi - 0x100` (the first run misses and fills it,
/// the run loop then re-enters translated code), sets the flags, then runs `last`.
fn warm_then(last: &dyn Fn(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    code_of(|a| {
        a.mov(rsi, qword_ptr(rdi - 0x100))?;
        a.mov(rsi, qword_ptr(rdi - 0x100))?;
        a.cmp(rbx, rcx)?;
        last(a)?;
        a.add(rbx, 1)
    })
}

#[test]
fn page_crossing_accesses_never_hit_the_soft_tlb() {
    // Each access starts in the page below the hole (its slot warm) and ends in the hole:
    // every one must fault at the hole with the interpreter's state (a check that looked at
    // the first byte's page, or a shared check of the first instruction's smaller size,
    // would read or write past the page on the host).
    type Body = fn(&mut CodeAssembler) -> Result<(), IcedError>;
    let cases: [(&str, u64, Body); 6] = [
        ("load 8 at -4", HOLE - 4, |a| a.mov(rax, qword_ptr(rdi))),
        ("load 2 at -1", HOLE - 1, |a| a.movzx(eax, word_ptr(rdi))),
        ("store 8 at -1", HOLE - 1, |a| a.mov(qword_ptr(rdi), rdx)),
        ("add 4 then store 8 at -4", HOLE - 4, |a| {
            a.add(eax, dword_ptr(rdi))?;
            a.mov(qword_ptr(rdi), rax)
        }),
        ("load 4 then adc 8 at -4", HOLE - 4, |a| {
            a.mov(eax, dword_ptr(rdi))?;
            a.adc(rax, qword_ptr(rdi))
        }),
        ("rmw 8 at -7", HOLE - 7, |a| a.add(qword_ptr(rdi), rdx)),
    ];
    for (name, at, body) in cases {
        for seed in [1u64, 0xfeed] {
            let code = warm_then(&body);
            let (rig, r, c) = both(&code, seed, 100, true, &|c| c.gpr[7] = at);
            assert!(r.is_err(), "{name}: no fault");
            assert_eq!(c.cr2, HOLE, "{name}");
            assert!(rig.jit.stats.run > 0, "{name}: nothing ran translated");
        }
    }
}

#[test]
fn a_shared_check_misses_on_a_read_only_page_with_live_flags() {
    // `adc rax, [rdi]` shares its (write) check with the store after it; on a read-only page
    // that check misses, the interpreter runs the adc (a read, allowed) with the flags of
    // the cmp, and the store then faults with the adc's flags in RFLAGS: both engines must
    // agree on the fault, CR2, RIP and the flags, with and without CR0.WP.
    for wp in [false, true] {
        for seed in [5u64, 0x5eed, 77] {
            let code = code_of(|a| {
                a.mov(rsi, qword_ptr(rdi))?; // the slot's read entry
                a.cmp(rbx, rcx)?;
                a.adc(rax, qword_ptr(rdi))?;
                a.mov(qword_ptr(rdi), rax)?;
                a.setc(dl)?;
                a.add(rbx, 1)
            });
            let (_, r, c) = both(&code, seed, 100, true, &|c| {
                c.gpr[7] = RDONLY + 0x18;
                if wp {
                    c.cr0 |= crate::cpu::CR0_WP;
                }
            });
            assert_eq!(r.is_err(), wp, "fault iff CR0.WP");
            if wp {
                assert_eq!(c.cr2, RDONLY + 0x18);
            }
        }
    }
}

#[test]
fn a_shared_check_on_a_clean_page_logs_the_store() {
    // After a harvest the slot's write entry logs again; the store that shares the adc's
    // check must still mark the page (the logged half of the check runs out of line, with
    // the flags the adc reads untouched).
    use vm_memory::GuestMemoryBackend as _;
    use vm_memory::bitmap::Bitmap as _;
    const D: u64 = 0x7000;
    let code = code_of(|a| {
        let mut top = a.create_label();
        a.mov(ecx, 8)?;
        a.set_label(&mut top)?;
        a.mov(rax, qword_ptr(rdi + rcx * 8))?;
        a.adc(rax, qword_ptr(rbx + rcx * 8))?;
        a.mov(qword_ptr(rbx + rcx * 8), rax)?;
        a.dec(rcx)?;
        a.jne(top)?;
        a.setc(dl)
    });
    let mut rig = Rig::with_model(hv::CpuModel::portable());
    let dirty = |r: &hv::GuestMemory| r.iter().next().unwrap().bitmap().dirty_at(D as usize);
    let harvest = |r: &hv::GuestMemory| {
        let _ = r.iter().next().unwrap().bitmap().get_and_reset();
    };
    for round in 0..4u64 {
        rig.load(round + 1, &code);
        harvest(&rig.m1);
        harvest(&rig.m2);
        rig.vm.quiesce_unlogged_writes();
        let setup = |c: &mut Cpu| {
            c.gpr[7] = 0x6000;
            c.gpr[3] = D;
        };
        let mut a = cpu(round + 1, false, &setup);
        let mut b = cpu(round + 1, false, &setup);
        let both = rig.run_both("shared check, clean page", &mut a, &mut b, 100, |_| false);
        assert!(both.jit.is_ok() && both.interp.is_ok());
        assert_eq!(a.rflags & ARITH_FLAGS, b.rflags & ARITH_FLAGS, "flags");
        assert!(
            dirty(&rig.m1),
            "round {round}: the store did not mark its page"
        );
    }
}

#[test]
fn a_shared_check_never_writes_a_code_page_unseen() {
    // X reads and then writes P's immediate through one shared check, then calls P: every
    // call must run the patched code (P is code: no write entry, the store leaves).
    let code = patch_and_call(
        |a| a.mov(rbx, PATCHED + 1),
        |a| {
            a.mov(r8d, dword_ptr(rbx))?;
            a.mov(dword_ptr(rbx), ecx)?;
            a.add(rsi, r8)
        },
    );
    for seed in [1u64, 2, 3] {
        let (_, r, c) = both(&code, seed, 200, false, &|_| {});
        assert!(r.is_ok());
        assert_eq!(c.mp_state, hv::MpState::Halted);
    }
}

/// A prologue's pushes and an epilogue's pops (`stack_run` in `emit.rs`): one soft-TLB
/// check covers each run.
fn prologue_epilogue(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.add(rbx, 3)?;
    a.push(rbp)?;
    a.push(r15)?;
    a.push(r14)?;
    a.push(0x7f)?;
    a.push(r13)?;
    a.push(-2)?;
    a.push(r12)?;
    a.push(rbx)?;
    a.push(rax)?; // the ninth: a run takes at most eight
    a.xor(r12, r15)?;
    a.pop(rax)?;
    a.pop(rbx)?;
    a.pop(r12)?;
    a.pop(rcx)?;
    a.pop(rcx)?; // the same register twice: the later value stays
    a.pop(rdx)?;
    a.pop(r14)?;
    a.pop(r15)?;
    a.pop(rbp)?;
    a.add(rbp, rax)
}

#[test]
fn push_and_pop_runs_match_the_interpreter_at_every_stack_offset() {
    let code = code_of(prologue_epilogue);
    // On a mapped stack: whole runs in one page, and runs that cross a page end (the check
    // misses, the interpreter runs the first push or pop, the rest becomes its own block).
    for k in 0..24u64 {
        let stack = 0x8000 + 8 * k;
        let (_, r, c) = both(&code, 70 + k, 100, true, &move |c| c.gpr[4] = stack);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(c.gpr[4], stack, "rsp after the runs");
    }
    // In the middle of a page, after a store that fills the soft TLB's write entry: both
    // runs are translated code (one exit: the filling store's miss).
    let warm = code_of(|a| {
        a.mov(qword_ptr(rsp - 0x100), r8)?;
        prologue_epilogue(a)
    });
    let (rig, r, _) = both(&warm, 69, 100, true, &|c| c.gpr[4] = 0x8800);
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(rig.jit.stats.exits_to_interp, 1, "{:?}", rig.jit.stats);
    // The stack just above the hole (not present) and the read-only page: the push that
    // reaches it faults, with every earlier push done and rsp as before it.
    for (base, name) in [(HOLE, "hole"), (RDONLY, "read-only")] {
        // Nine pushes: a stack less than 72 bytes above the page reaches into it.
        for k in 0..9u64 {
            let stack = base + 0x1000 + 8 * k;
            // CR0.WP: supervisor writes to the read-only page fault too.
            let (_, r, c) = both(&code, 90 + k, 100, true, &move |c| {
                c.gpr[4] = stack;
                c.cr0 |= crate::cpu::CR0_WP;
            });
            assert!(r.is_err(), "{name} {k}: no fault");
            assert_eq!(c.cr2 >> 12, base >> 12, "{name} {k}");
            assert_eq!(c.gpr[4], base + 0x1000, "{name} {k}: rsp at the fault");
        }
    }
}

#[test]
fn a_pop_run_faults_at_the_first_pop_that_leaves_the_mapped_stack() {
    // Pops read upwards: the stack just below the hole, so the run crosses into it.
    let code = code_of(|a| {
        a.inc(r10)?;
        a.pop(rax)?;
        a.pop(rbx)?;
        a.pop(r11)?;
        a.pop(rbp)?;
        a.pop(r8)?;
        a.add(rbp, rax)
    });
    for k in 1..5u64 {
        let stack = HOLE - 8 * k;
        let (_, r, c) = both(&code, 110 + k, 100, true, &move |c| c.gpr[4] = stack);
        assert!(r.is_err(), "{k}: no fault");
        assert_eq!(c.cr2, HOLE, "{k}");
        assert_eq!(c.gpr[4], HOLE, "{k}: rsp at the fault");
    }
}

#[test]
fn a_stack_run_whose_check_misses_after_cache_evictions_keeps_every_register() {
    // Six guest registers dirty in the cache, then a run of pushes: taking rsp into the cache
    // for the run evicts one of them (written back) before the run's check. Where the check
    // misses (the run crosses a page end), the per-instruction version must start from the
    // cache as it is at the check, not redo that eviction with another register's value.
    let code = code_of(|a| {
        a.add(rax, 1)?;
        a.add(rbx, 2)?;
        a.add(rcx, 3)?;
        a.add(rdx, 4)?;
        a.add(r8, 5)?;
        a.add(r9, 6)?;
        a.push(r10)?;
        a.push(r11)?;
        a.push(r12)?;
        a.add(rdx, rax)?;
        a.pop(r12)?;
        a.pop(r11)?;
        a.pop(r10)?;
        a.add(rcx, rbx)
    });
    for k in 0..6u64 {
        // Across the page end at 0x8000 for k < 3 (pushes) and back (pops).
        let stack = 0x8000 + 8 * k;
        let (_, r, c) = both(&code, 130 + k, 100, true, &move |c| c.gpr[4] = stack);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(c.gpr[4], stack, "rsp after the runs");
    }
}

#[test]
fn random_register_mixes_around_stack_runs_match_the_interpreter() {
    // Random register-only instructions (filling the cache with dirty registers) around runs
    // of 1-8 pushes and pops of random registers, on a stack at random offsets around a page
    // end and next to the hole: both versions of every run (one check, or one per
    // instruction after a miss) against the interpreter, registers and memory.
    let mut rng = Rng(0x57ac_4ead);
    // Not rsp: the stack stays where the test puts it.
    let regs = [
        rax, rcx, rdx, rbx, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15,
    ];
    for round in 0..80 {
        let pick = |rng: &mut Rng| regs[(rng.next() % regs.len() as u64) as usize];
        let mut ops: Vec<(u8, AsmRegister64, AsmRegister64)> = Vec::new();
        for _ in 0..6 {
            for _ in 0..4 {
                ops.push((0, pick(&mut rng), pick(&mut rng)));
            }
            let n = 1 + (rng.next() % 8) as usize;
            for _ in 0..n {
                ops.push((1, pick(&mut rng), pick(&mut rng)));
            }
            ops.push((0, pick(&mut rng), pick(&mut rng)));
            for _ in 0..n {
                ops.push((2, pick(&mut rng), pick(&mut rng)));
            }
        }
        let code = code_of(|a| {
            for &(op, d, s) in &ops {
                match op {
                    0 => a.add(d, s)?,
                    1 => a.push(d)?,
                    _ => a.pop(d)?,
                }
            }
            a.nop()
        });
        let base = if round % 2 == 0 {
            0x8000
        } else {
            HOLE + 0x1000
        };
        let stack = base + 8 * (rng.next() % 12);
        let seed = rng.next();
        let (_, r, c) = both(&code, seed, 400, true, &move |c| c.gpr[4] = stack);
        if base == 0x8000 {
            assert!(r.is_ok(), "round {round}: {r:?}");
            assert_eq!(c.gpr[4], stack, "round {round}: rsp");
        } else if r.is_err() {
            assert_eq!(c.cr2 >> 12, HOLE >> 12, "round {round}");
        }
    }
}
