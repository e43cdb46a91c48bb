//! Differential tests: translated code against the interpreter on random states, one form at a
//! time and as random blocks (so flags flow between translated instructions).

use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::cpu::{AF, CF, Cpu, OF, PF, SF, ZF};
use crate::vm::VmShared;

pub(super) const MEM: usize = 1 << 17;
pub(super) const CODE: u64 = 0x1000;

use crate::testutil::{Rng, assert_same_memory, exec};
use crate::vcpu::NoIo;

fn cpu64(rng: &mut Rng) -> Cpu {
    // Address registers above the code, 8-byte aligned; GS points into RAM too.
    let mut c = crate::testutil::cpu64(rng, 0x3000, 0x6000, 8);
    c.seg[crate::cpu::GS].base = 0x8000;
    debug_assert_eq!(c.rip, CODE);
    c
}

/// Two memories (one per engine) and the VM they belong to.
pub(super) struct Rig {
    pub(super) m1: hv::GuestMemory,
    pub(super) m2: hv::GuestMemory,
    pub(super) vm: VmShared,
    pub(super) jit: Jit,
}

impl Rig {
    fn new() -> Rig {
        Rig::with_model(hv::CpuModel::portable())
    }

    pub(super) fn load(&self, seed: u64, code: &[u8]) {
        let fill: Vec<u8> = (0..MEM / 8)
            .flat_map(|k| (k as u64).wrapping_mul(seed).to_le_bytes())
            .collect();
        for m in [&self.m1, &self.m2] {
            m.write_slice(&fill, GuestAddress(0)).unwrap();
            m.write_slice(code, GuestAddress(CODE)).unwrap();
        }
    }

    /// Runs `budget` instructions on each engine from the same state and compares. Returns
    /// whether the run was translated code only (no TLB miss, no interpreted instruction).
    fn compare(&mut self, ctx: &str, seed: u64, budget: u32, undefined: u64) -> bool {
        let mut a = cpu64(&mut Rng(seed | 1));
        let mut b = cpu64(&mut Rng(seed | 1));
        let ctx = format!("{ctx} seed {seed:#x}");
        let Both {
            jit: ra,
            interp: rb,
            steps,
            translated,
        } = self.run_both(&ctx, &mut a, &mut b, budget, |c| {
            c.mp_state != MpState::Runnable
        });
        // A run that ended in a fault stopped mid-block: any flag undefined on the way may be
        // the one seen there.
        let undefined = if ra.is_err() {
            undefined >> 32 | undefined
        } else {
            undefined
        };
        let undefined = undefined & 0xffff_ffff;
        assert_eq!(
            a.rflags & !undefined,
            b.rflags & !undefined,
            "{ctx}: flags (undefined {undefined:#x}), {ra:?} {steps} steps, interp {rb:?}"
        );
        assert_eq!(a.rip, b.rip, "{ctx}: rip");
        translated
    }
}

/// RFLAGS bits of iced-x86's `RflagsBits`.
pub(super) fn arch_flags(r: u32) -> u64 {
    use iced_x86::RflagsBits as F;
    [
        (F::OF, OF),
        (F::SF, SF),
        (F::ZF, ZF),
        (F::AF, AF),
        (F::CF, CF),
        (F::PF, PF),
    ]
    .iter()
    .filter(|(b, _)| r & b != 0)
    .fold(0, |acc, (_, f)| acc | f)
}

/// Flags undefined after running `code` from its start (`None` if an instruction reads one:
/// then results may legitimately differ from the hardware's); bits 32.. hold every flag that
/// was undefined at some point.
fn undefined_after(code: &[u8]) -> Option<u64> {
    let mut d = Decoder::with_ip(64, code, CODE, DecoderOptions::NONE);
    let mut undef = 0u64;
    let mut ever = 0u64;
    for i in &mut d {
        if i.mnemonic() == iced_x86::Mnemonic::Hlt {
            break;
        }
        if arch_flags(i.rflags_read()) & undef & 0xffff_ffff != 0 {
            return None;
        }
        undef = (undef & !arch_flags(i.rflags_modified())) | arch_flags(i.rflags_undefined());
        ever |= undef;
    }
    Some(undef | ever << 32)
}

pub(super) type Gen = Box<dyn Fn(&mut CodeAssembler) -> Result<(), IcedError>>;

/// Instruction forms, each with whether it must be translated.
fn templates() -> Vec<(String, Gen)> {
    let mut v: Vec<(String, Gen)> = Vec::new();
    macro_rules! t {
        ($($e:tt)*) => {
            v.push((stringify!($($e)*).to_string(), Box::new(|a: &mut CodeAssembler| { a.$($e)*?; Ok(()) })));
        };
    }
    macro_rules! t2 {
        ($a:ident ($($x:tt)*), $b:ident ($($y:tt)*)) => {
            v.push((
                concat!(stringify!($a($($x)*)), "; ", stringify!($b($($y)*))).to_string(),
                Box::new(|a: &mut CodeAssembler| {
                    a.$a($($x)*)?;
                    a.$b($($y)*)?;
                    Ok(())
                }),
            ));
        };
    }
    macro_rules! alu {
        ($op:ident) => {
            t!($op(rax, rbx));
            t!($op(ecx, edx));
            t!($op(r9w, ax));
            t!($op(sil, r10b));
            t!($op(qword_ptr(rbx + rcx * 2 + 8), rdx));
            t!($op(dword_ptr(rsi - 4), r8d));
            t!($op(word_ptr(rdi), r11w));
            t!($op(byte_ptr(rbp + 1), cl));
            t!($op(rdx, qword_ptr(rsp + 16)));
            t!($op(r12d, dword_ptr(rbx + rsi)));
            t!($op(rax, -5));
            t!($op(ecx, 0x7fff_0001));
            t!($op(al, 0x80));
            t!($op(qword_ptr(rdi + 8), 3));
            t!($op(dword_ptr(rbx), -100));
            t!($op(byte_ptr(rsi), 7));
            t!($op(rsp, 8));
        };
    }
    alu!(add);
    alu!(or);
    alu!(adc);
    alu!(sbb);
    alu!(and);
    alu!(sub);
    alu!(xor);
    alu!(cmp);
    t!(test(rax, rbx));
    t!(test(ecx, edx));
    t!(test(qword_ptr(rbx), rcx));
    t!(test(byte_ptr(rdi + 3), 0x41));
    t!(mov(rax, rbx));
    t!(mov(r13d, esp));
    t!(mov(cx, r9w));
    t!(mov(rdx, qword_ptr(rsp + 8)));
    t!(mov(esi, dword_ptr(rbx + rcx * 4)));
    t!(mov(al, byte_ptr(rdi)));
    t!(mov(qword_ptr(rbp - 8), rdi));
    t!(mov(dword_ptr(rsi), eax));
    t!(mov(word_ptr(rsi + 1), r15w));
    t!(mov(rax, 0x1234_5678_9abc_def0u64));
    t!(mov(ecx, 0xffff_fff0u32));
    t!(mov(qword_ptr(rbx), -2));
    t!(mov(byte_ptr(rbx), 0xfe));
    t!(mov(rcx, qword_ptr(0x5008u64)));
    t!(add_instruction(
        iced_x86::Instruction::with2(
            iced_x86::Code::Mov_r64_rm64,
            iced_x86::Register::RCX,
            iced_x86::MemoryOperand::with_base_displ(iced_x86::Register::RIP, 0x4010),
        )
        .unwrap()
    ));
    t!(mov(rax, qword_ptr(rbx).gs()));
    t!(mov(dword_ptr(rsi + 16).gs(), ecx));
    t!(movzx(eax, bl));
    t!(movzx(ecx, byte_ptr(rsi)));
    t!(movzx(edx, word_ptr(rdi)));
    t!(movzx(rax, r9b));
    t!(movsx(rax, bl));
    t!(movsx(ecx, word_ptr(rsi)));
    t!(movsxd(rax, ecx));
    t!(movsxd(rdx, dword_ptr(rbx)));
    t!(lea(rax, qword_ptr(rbx + rcx * 8 - 16)));
    t!(lea(ecx, dword_ptr(rsi + rdi)));
    t!(add_instruction(
        iced_x86::Instruction::with2(
            iced_x86::Code::Lea_r64_m,
            iced_x86::Register::R8,
            iced_x86::MemoryOperand::with_base_displ(iced_x86::Register::RIP, 0x1100),
        )
        .unwrap()
    ));
    t!(lea(ax, word_ptr(rcx * 4 + 7)));
    t!(inc(dword_ptr(rbx + 4)));
    t!(dec(qword_ptr(rsi)));
    t!(neg(rax));
    t!(neg(ecx));
    t!(neg(byte_ptr(rdi)));
    t!(not(rdx));
    t!(not(r9d));
    t!(inc(rax));
    t!(dec(ecx));
    t!(inc(r10w));
    t!(dec(r15));
    t!(shl(rax, 1));
    t!(shl(rax, 3));
    t!(shr(rax, 63));
    t!(sar(rax, 0));
    t!(rol(rax, 3));
    t!(ror(rax, 1));
    t!(shl(edx, 5));
    t!(shr(ecx, 31));
    t!(sar(r8d, 7));
    t!(ror(esi, 13));
    t!(rcl(rax, 1));
    t!(rcr(ebx, 3));
    t!(shl(rax, cl));
    t!(shr(rdx, cl));
    t!(sar(esi, cl));
    t!(shl(ecx, cl));
    t!(rol(word_ptr(rbx), cl));
    t!(shl(qword_ptr(rsi + 8), 4));
    t!(shld(rax, rdx, 7));
    t!(shrd(ecx, ebx, cl));
    t!(imul_2(rax, rbx));
    t!(imul_2(ecx, edx));
    t!(imul_2(rdx, qword_ptr(rsi)));
    t!(imul_3(eax, dword_ptr(rdi + 4), 1000));
    t!(imul_3(r9, r10, -3));
    t!(bt(rax, 17));
    t!(bts(rcx, rdx));
    t!(btr(dword_ptr(rbx), 5));
    t!(btc(r8d, 31));
    t!(bsf(rax, rbx));
    t!(bsr(ecx, dword_ptr(rsi)));
    t!(bswap(rax));
    t!(bswap(r9d));
    t!(xchg(rax, rbx));
    t!(xchg(qword_ptr(rsi), rdx));
    t!(xadd(rcx, rdx));
    t!(lock().add(qword_ptr(rbx), rax));
    t!(lock().xadd(dword_ptr(rsi), ecx));
    t!(lock().bts(qword_ptr(rdi), 3));
    t!(seto(al));
    t!(setb(bl));
    t!(setbe(cl));
    t!(setl(r9b));
    t!(setg(byte_ptr(rsi)));
    t!(setnp(dl));
    t!(cmovae(rax, rbx));
    t!(cmovne(ecx, edx));
    t!(cmovle(rdx, qword_ptr(rsi)));
    t!(cmovs(eax, dword_ptr(rdi)));
    t!(jne(0x1080u64));
    t!(je(0x900u64));
    t!(jl(0x5000u64));
    t!(jbe(0x1002u64));
    t!(jp(0x1002u64));
    t!(jg(0x1100u64));
    t!(jo(0x1000u64));
    t!(jmp(0x1234u64));
    t!(jmp(rax));
    t!(jmp(qword_ptr(rbx)));
    t!(call(0x2000u64));
    t!(call(rdx));
    t!(ret());
    t!(ret_1(16));
    t!(push(rbx));
    t!(push(rsp));
    t!(push(-3));
    t!(push(0x1234_5678));
    t!(pop(rcx));
    t!(pop(rsp));
    t!(nop());
    t!(nop_1(dword_ptr(rax + rax)));
    t!(lfence());
    t!(pause());
    // Implicit rax/rdx, division (the setup keeps most runs on the fast path).
    t2!(xor(edx, edx), div(rbx));
    t2!(xor(edx, edx), div(ecx));
    t!(div(bl));
    t2!(xor(edx, edx), div(qword_ptr(rsi)));
    t2!(mov(edx, 1), div(word_ptr(rdi + 2)));
    t2!(cqo(), idiv(rbx));
    t2!(cdq(), idiv(dword_ptr(rsi)));
    t2!(cwd(), idiv(r9w));
    t2!(cbw(), idiv(cl));
    t!(mul(rbx));
    t!(mul(dword_ptr(rsi)));
    t!(mul(bl));
    t!(imul(rcx));
    t!(imul(word_ptr(rdi)));
    t!(cdqe());
    t!(cwde());
    t!(cbw());
    t!(cqo());
    t!(cdq());
    t!(cwd());
    t!(cmpxchg(qword_ptr(rsi), rbx));
    t!(lock().cmpxchg(dword_ptr(rdi), ecx));
    t!(cmpxchg(rdx, r9));
    t!(cmpxchg(byte_ptr(rbx), dl));
    // High-byte registers.
    t!(test(bh, 0x41));
    t!(and(bh, 0x0f));
    t!(add(bh, al));
    t!(or(dh, 1));
    t!(sub(ah, bh));
    t!(mov(ah, byte_ptr(rsi)));
    t!(mov(byte_ptr(rbp + 2), ch));
    t!(movzx(edi, ah));
    t!(xchg(ah, al));
    t!(cmp(byte_ptr(rbx + rsi), dh));
    t!(shl(bh, cl));
    t!(pushfq());
    t!(leave());
    t!(call(qword_ptr(rbx + 8)));
    t!(bt(qword_ptr(rsi), rcx));
    t!(bts(dword_ptr(rbx + 8), ecx));
    t!(lock().btr(qword_ptr(rdi), rcx));
    t!(btc(word_ptr(rsi), cx));
    t!(bt(qword_ptr(rsp), rcx));
    t2!(neg(rcx), bts(qword_ptr(rsi + 64), rcx));
    t2!(neg(ecx), btr(dword_ptr(rdi + 64), ecx));
    t!(stosq());
    t!(stosb());
    t!(movsb());
    t!(movsd());
    t!(rep().stosq());
    t!(rep().stosb());
    t!(rep().stosd());
    t!(rep().movsb());
    t!(rep().movsq());
    t!(rep().movsw());
    t!(prefetchw(byte_ptr(rsi)));
    t!(prefetcht0(byte_ptr(rax + rbx)));
    v
}

pub(super) fn assemble(f: &Gen) -> Vec<u8> {
    code_of(f)
}

#[test]
fn every_form_matches_the_interpreter() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut rig = Rig::new();
    let list = templates();
    assert!(list.len() > 200, "{} templates", list.len());
    for (name, f) in &list {
        let code = assemble(f);
        for i in Decoder::with_ip(64, &code, CODE, DecoderOptions::NONE) {
            let hlt = i.mnemonic() == iced_x86::Mnemonic::Hlt;
            assert!(hlt || classify(&i).is_some(), "{name} is not translated");
            let generic = classify(&i) == Some(Kind::Generic);
            assert!(
                !generic || rig.jit.emitter.encodes(&i),
                "{name} does not encode"
            );
        }
        rig.jit.clear();
        let mut translated = 0;
        for _ in 0..64 {
            let seed = rng.next();
            rig.load(seed, &code);
            if rig.compare(name, seed, 1, undefined_after(&code).unwrap_or(0)) {
                translated += 1;
            }
        }
        // With a warm TLB most runs must not need the interpreter (misses fill the TLB;
        // stores into the code page and page-crossing accesses always take it).
        // Targets of indirect branches are random, mostly non-canonical (#GP, interpreted).
        let indirect = ["jmp(r", "jmp(q", "call(r", "call(q", "ret"]
            .iter()
            .any(|p| name.starts_with(p));
        assert!(
            indirect || translated >= 16,
            "{name}: only {translated} of 64 runs translated"
        );
    }
}

#[test]
fn division_faults_come_from_the_interpreter() {
    // #DE cases (zero divisor, quotient too wide, idiv of MIN by -1, a dividend idiv leaves
    // to the interpreter) exit before the instruction: both engines end in the same state.
    let a = |f: &dyn Fn(&mut CodeAssembler) -> Result<(), IcedError>| {
        let mut a = CodeAssembler::new(64).unwrap();
        f(&mut a).unwrap();
        a.hlt().unwrap();
        a.assemble(CODE).unwrap()
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "div rbx by 0",
            a(&|a| {
                a.xor(ebx, ebx)?;
                a.div(rbx)
            }),
        ),
        (
            "div [rsi] by 0",
            a(&|a| {
                a.mov(qword_ptr(rsi), 0)?;
                a.div(qword_ptr(rsi))
            }),
        ),
        (
            "div bl by 0",
            a(&|a| {
                a.xor(ebx, ebx)?;
                a.div(bl)
            }),
        ),
        (
            "div overflow",
            a(&|a| {
                a.mov(rdx, rbx)?;
                a.div(rbx)
            }),
        ),
        (
            "div ecx overflow",
            a(&|a| {
                a.mov(edx, -1i32)?;
                a.div(ecx)
            }),
        ),
        (
            "idiv MIN/-1",
            a(&|a| {
                a.mov(rax, 0x8000_0000_0000_0000u64)?;
                a.cqo()?;
                a.mov(rbx, -1i64)?;
                a.idiv(rbx)
            }),
        ),
        (
            "idiv by 0",
            a(&|a| {
                a.cdq()?;
                a.xor(ecx, ecx)?;
                a.idiv(ecx)
            }),
        ),
        (
            "idiv wide dividend",
            a(&|a| {
                a.mov(edx, 1)?;
                a.idiv(rbx)
            }),
        ),
    ];
    let mut rig = Rig::new();
    let mut rng = Rng(0x3c6e_f372_fe94_f82b);
    for (name, code) in &cases {
        rig.jit.clear();
        for _ in 0..8 {
            let seed = rng.next();
            rig.load(seed, code);
            let exits = rig.jit.stats.exits_to_interp;
            rig.compare(name, seed, 8, undefined_after(code).unwrap_or(0));
            assert!(
                rig.jit.stats.exits_to_interp > exits,
                "{name}: not interpreted"
            );
        }
    }
}

#[test]
fn string_edge_cases_come_from_the_interpreter() {
    // DF set, a count of 0 or over a page, bytes in two pages: interpreted, same result.
    let a = |f: &dyn Fn(&mut CodeAssembler) -> Result<(), IcedError>| {
        let mut a = CodeAssembler::new(64).unwrap();
        f(&mut a).unwrap();
        a.hlt().unwrap();
        a.assemble(CODE).unwrap()
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "std; rep movsb",
            a(&|a| {
                a.std()?;
                a.rep().movsb()
            }),
        ),
        (
            "std; stosq",
            a(&|a| {
                a.std()?;
                a.stosq()
            }),
        ),
        (
            "rcx 0",
            a(&|a| {
                a.xor(ecx, ecx)?;
                a.rep().stosq()
            }),
        ),
        (
            "rcx 513",
            a(&|a| {
                a.mov(ecx, 513)?;
                a.mov(edi, 0x4000)?;
                a.rep().stosq()
            }),
        ),
        (
            "dst crosses",
            a(&|a| {
                a.mov(ecx, 4)?;
                a.mov(edi, 0x4ff8)?;
                a.rep().stosq()
            }),
        ),
        (
            "src crosses",
            a(&|a| {
                a.mov(ecx, 3)?;
                a.mov(esi, 0x5fff)?;
                a.mov(edi, 0x3000)?;
                a.rep().movsb()
            }),
        ),
        (
            "stosd crosses",
            a(&|a| {
                a.mov(edi, 0x4ffe)?;
                a.stosd()
            }),
        ),
    ];
    let mut rig = Rig::new();
    let mut rng = Rng(0x6a09_e667_f3bc_c908);
    for (name, code) in &cases {
        rig.jit.clear();
        for _ in 0..4 {
            let seed = rng.next();
            rig.load(seed, code);
            let exits = rig.jit.stats.exits_to_interp;
            rig.compare(name, seed, 8, undefined_after(code).unwrap_or(0));
            assert!(
                rig.jit.stats.exits_to_interp > exits,
                "{name}: not interpreted"
            );
        }
    }
}

#[test]
fn random_blocks_match_the_interpreter() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut rig = Rig::new();
    let list: Vec<_> = templates()
        .into_iter()
        // Not `rep`: with another form's rcx it may run over the interpreter's REP chunk,
        // and the run then stops inside it, where a flag left undefined before is seen.
        .filter(|(n, _)| {
            !["j", "call", "ret", "push", "pop", "rep"]
                .iter()
                .any(|p| n.starts_with(p))
        })
        .collect();
    for round in 0..300 {
        let picks: Vec<usize> = (0..12)
            .map(|_| (rng.next() % list.len() as u64) as usize)
            .collect();
        let mut a = CodeAssembler::new(64).unwrap();
        for &p in &picks {
            (list[p].1)(&mut a).unwrap();
        }
        a.hlt().unwrap();
        let code = a.assemble(CODE).unwrap();
        let names: Vec<&str> = picks.iter().map(|&p| list[p].0.as_str()).collect();
        let Some(undefined) = undefined_after(&code) else {
            continue;
        };
        // Some templates are two instructions.
        let insns = Decoder::with_ip(64, &code, CODE, DecoderOptions::NONE)
            .into_iter()
            .count() as u32;
        rig.jit.clear();
        for _ in 0..8 {
            let seed = rng.next();
            rig.load(seed, &code);
            rig.compare(&format!("round {round}: {names:?}"), seed, insns, undefined);
        }
    }
}

#[test]
fn loops_run_inside_the_block_and_stop_at_the_budget() {
    // sum of 64 qwords: a back edge to the block head.
    let mut a = CodeAssembler::new(64).unwrap();
    let mut top = a.create_label();
    a.set_label(&mut top).unwrap();
    a.add(rax, qword_ptr(rsi)).unwrap();
    a.adc(rdx, 0).unwrap();
    a.lea(rsi, qword_ptr(rsi + 8)).unwrap();
    a.dec(ecx).unwrap();
    a.jne(top).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(CODE).unwrap();
    let mut rig = Rig::new();
    let mut rng = Rng(77);
    for budget in [5, 40, 1000] {
        for _ in 0..8 {
            let seed = rng.next();
            rig.load(seed, &code);
            rig.compare(&format!("loop, budget {budget}"), seed, budget, 0);
        }
    }
    assert!(rig.jit.stats.blocks >= 1);
}

#[test]
fn harness_detects_a_wrong_translation() {
    // A translation of `add` run against the interpreter's `sub` must be caught.
    let mut rig = Rig::new();
    let mut a = CodeAssembler::new(64).unwrap();
    a.add(rax, rbx).unwrap();
    a.hlt().unwrap();
    let add = a.assemble(CODE).unwrap();
    let mut a = CodeAssembler::new(64).unwrap();
    a.sub(rax, rbx).unwrap();
    a.hlt().unwrap();
    let sub = a.assemble(CODE).unwrap();
    rig.load(3, &add);
    rig.m2.write_slice(&sub, GuestAddress(CODE)).unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rig.compare("add", 3, 1, 0)));
    assert!(r.is_err());
}

#[test]
fn self_modifying_store_invalidates_the_translation() {
    // The block overwrites its own next instruction (mov eax, imm32's immediate) and then
    // runs again: the second run must see the new immediate.
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(eax, 0x1111_1111u32).unwrap(); // at CODE, imm32 at CODE + 1
    a.mov(dword_ptr(0x1001u64), ecx).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(CODE).unwrap();
    let mut rig = Rig::new();
    rig.load(9, &code);
    let mut c = cpu64(&mut Rng(9));
    c.gpr[1] = 0x2222_2222;
    let mut blocks = BlockCache::new();
    run_jit_in(&mut rig, &mut c, &mut blocks, 2);
    assert_eq!(c.gpr[0], 0x1111_1111);
    c.rip = CODE;
    run_jit_in(&mut rig, &mut c, &mut blocks, 1);
    assert_eq!(c.gpr[0], 0x2222_2222, "stale translation ran");
}

#[test]
fn random_code_runs_the_same_on_both_engines() {
    // Random bytes mixed with translatable forms, through `run_engine` as the fuzz target
    // does: whenever both runs stop by themselves (an exception or hlt), the states agree.
    let mut rng = Rng(0x51ed_270b_2707_8f1d);
    let list: Vec<_> = templates()
        .into_iter()
        .filter(|(n, _)| !["push", "pop"].iter().any(|p| n.starts_with(p)))
        .collect();
    let rig = Rig::new();
    let model = hv::CpuModel::portable();
    let (mut compared, mut translated) = (0, 0);
    for round in 0..400 {
        let mut a = CodeAssembler::new(64).unwrap();
        for _ in 0..(rng.next() % 16) {
            let p = (rng.next() % list.len() as u64) as usize;
            (list[p].1)(&mut a).unwrap();
        }
        let mut code = a.assemble(CODE).unwrap();
        for _ in 0..(rng.next() % 24) {
            code.push(rng.next() as u8);
        }
        code.push(0xf4);
        let seed = rng.next();
        rig.load(seed, &code);
        let start = cpu64(&mut Rng(seed | 1)).to_state(&[], 0, 0);
        let (mut s1, mut s2) = (start.clone(), start);
        let before = TRANSLATED.load(Ordering::Relaxed);
        let d1 = run_engine(Engine::Jit, &model, &mut s1, &rig.m1, &NoIo, 200);
        translated += TRANSLATED.load(Ordering::Relaxed) - before;
        let d2 = run_engine(Engine::Interp, &model, &mut s2, &rig.m2, &NoIo, 200);
        let (d1, d2) = match (d1, d2) {
            (Ok(a), Ok(b)) => (a, b),
            // An instruction emu does not implement: both must stop at it.
            (Err(a), Err(b)) => {
                assert_eq!(a.to_string(), b.to_string(), "round {round}");
                continue;
            }
            (a, b) => panic!("round {round}: {a:?} vs {b:?}"),
        };
        // Compare runs that stopped inside `code` (not in the random bytes around it) and
        // whose control flow does not depend on a flag left undefined.
        let inside = |s: &hv::CpuState| (CODE..CODE + code.len() as u64).contains(&s.regs.rip);
        if !(d1 && d2 && inside(&s1) && inside(&s2)) || undefined_after(&code).is_none() {
            continue;
        }
        compared += 1;
        let ctx = format!("round {round} seed {seed:#x} code {code:02x?}");
        assert_eq!(s1.events.exception, s2.events.exception, "{ctx}");
        assert_eq!(s1.regs.rip, s2.regs.rip, "{ctx}");
        let gpr = |s: &hv::CpuState| (0..16).map(|r| s.regs.gpr(r)).collect::<Vec<_>>();
        assert_eq!(gpr(&s1), gpr(&s2), "{ctx}");
        // Branches may run random bytes outside `code`, whose undefined flags cannot be
        // tracked: arithmetic flags are compared by the other tests.
        assert_eq!(
            s1.regs.rflags & !ARITH_FLAGS,
            s2.regs.rflags & !ARITH_FLAGS,
            "{ctx}"
        );
        assert_same_memory(&rig.m1, &rig.m2, MEM, &ctx);
    }
    assert!(compared > 100, "only {compared} runs compared");
    assert!(translated > 0);
}

/// Runs `budget` instructions of the code at CODE on the translator alone and returns the
/// instructions executed.
pub(super) fn run_jit(rig: &mut Rig, c: &mut Cpu, budget: u32) -> u32 {
    run_jit_in(rig, c, &mut BlockCache::new(), budget)
}

/// [`run_jit`] with the caller's decoded-block cache (kept from run to run).
fn run_jit_in(rig: &mut Rig, c: &mut Cpu, blocks: &mut BlockCache, budget: u32) -> u32 {
    exec(c, &rig.m1, &rig.vm, |ex| {
        ex.run_batch_jit(&mut rig.jit, blocks, budget, false)
    })
    .unwrap()
    .0
}

#[test]
fn chained_blocks_run_without_the_run_loop() {
    // Three blocks of one page in a loop (A -> B -> C -> A while ecx lasts): after the first
    // round every exit is linked to its successor, so the whole loop is one entry.
    let mut a = CodeAssembler::new(64).unwrap();
    let mut la = a.create_label();
    let mut lb = a.create_label();
    let mut lc = a.create_label();
    a.set_label(&mut la).unwrap();
    a.add(rax, rbx).unwrap();
    a.jmp(lb).unwrap();
    a.db(&[0xcc; 16]).unwrap();
    a.set_label(&mut lc).unwrap();
    a.sub(rdi, rdx).unwrap();
    a.dec(ecx).unwrap();
    a.jne(la).unwrap();
    a.hlt().unwrap();
    a.db(&[0xcc; 16]).unwrap();
    a.set_label(&mut lb).unwrap();
    a.xor(rdx, rax).unwrap();
    a.adc(rsi, rdx).unwrap();
    a.jmp(lc).unwrap();
    let code = a.assemble(CODE).unwrap();
    let mut rig = Rig::new();
    let mut rng = Rng(0xc4a1);
    for _ in 0..16 {
        let seed = rng.next();
        rig.load(seed, &code);
        rig.compare("chained loop", seed, 2000, 0);
    }
    assert!(rig.jit.stats.links >= 3, "{:?}", rig.jit.stats);
    // One long run: a handful of entries (the first round links), not one per block.
    rig.jit.clear();
    rig.load(5, &code);
    let mut c = cpu64(&mut Rng(5));
    c.gpr[1] = 200;
    let entries = rig.jit.stats.entries;
    let n = run_jit(&mut rig, &mut c, 2000);
    assert_eq!(n, 200 * 8 + 1, "whole loop and the hlt");
    let entries = rig.jit.stats.entries - entries;
    assert!(entries <= 6, "{entries} entries for 600 blocks");
}

#[test]
fn self_modifying_code_through_a_chain_runs_the_new_code() {
    // W (page 2) stores eax into the immediate of B (page 1) and goes on at B through the
    // jump cache; B must run with the new immediate every time (its head compares the page's
    // write generation).
    let w_at = CODE + 0x1000;
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(eax, 5).unwrap();
    a.mov(edx, 30).unwrap();
    a.jmp(w_at).unwrap();
    a.db(&[0xcc; 0x30]).unwrap();
    a.mov(esi, 0x1111_1111u32).unwrap();
    a.add(rdi, rsi).unwrap();
    a.dec(edx).unwrap();
    a.jne(w_at).unwrap();
    a.hlt().unwrap();
    let page1 = a.assemble(CODE).unwrap();
    let b_imm = CODE + page1.windows(4).position(|w| w == [0x11; 4]).unwrap() as u64;
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(dword_ptr(b_imm), eax).unwrap();
    a.inc(eax).unwrap();
    a.jmp(b_imm - 1).unwrap();
    let w = a.assemble(w_at).unwrap();
    let mut code = page1.clone();
    code.resize(0x1000, 0xcc);
    code.extend_from_slice(&w);
    // The same 30 rounds on both engines, and the sum they must reach.
    let mut rig = Rig::new();
    for seed in [3u64, 4, 5] {
        rig.load(seed, &code);
        rig.compare("smc through a chain", seed, 400, 0);
    }
    rig.load(7, &code);
    let mut c = cpu64(&mut Rng(7));
    let rdi0 = c.gpr[7];
    run_jit(&mut rig, &mut c, 400);
    assert_eq!(c.mp_state, MpState::Halted);
    let want = (5..35u64).fold(rdi0, |s, v| s.wrapping_add(v));
    assert_eq!(c.gpr[7], want, "a stale translation of B ran");
    assert!(rig.jit.stats.stale >= 1, "{:?}", rig.jit.stats);
}

#[test]
fn a_page_written_by_another_vcpu_ends_its_links() {
    // A -> B linked in one page; another vCPU then rewrites B (memory write plus the code
    // tracker, as its store would): entering A again must run the new B.
    let mut a = CodeAssembler::new(64).unwrap();
    let mut lb = a.create_label();
    a.add(rdi, 1).unwrap();
    a.jmp(lb).unwrap();
    a.db(&[0xcc; 8]).unwrap();
    a.set_label(&mut lb).unwrap();
    a.mov(eax, 0x1111_1111u32).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(CODE).unwrap();
    let imm = CODE + code.len() as u64 - 5;
    let mut rig = Rig::new();
    rig.load(1, &code);
    for round in 0..3u32 {
        let mut c = cpu64(&mut Rng(1));
        run_jit(&mut rig, &mut c, 100);
        let want = 0x1111_1111 + round;
        assert_eq!(c.gpr[0], u64::from(want), "round {round}");
        rig.m1.write_obj(want + 1, GuestAddress(imm)).unwrap();
        rig.vm.code.on_write(imm >> 12);
    }
    assert!(rig.jit.stats.links >= 1);
}

#[test]
fn exit_request_ends_a_chain_promptly() {
    // An endless loop of two linked blocks with an (almost) endless budget: a kick from
    // another thread sets the exit-request word, and the run stops at a block head long
    // before the budget, with every instruction counted.
    let mut a = CodeAssembler::new(64).unwrap();
    let mut la = a.create_label();
    let mut lb = a.create_label();
    a.set_label(&mut la).unwrap();
    a.inc(rax).unwrap();
    a.jmp(lb).unwrap();
    a.db(&[0xcc; 8]).unwrap();
    a.set_label(&mut lb).unwrap();
    a.inc(rdx).unwrap();
    a.jmp(la).unwrap();
    let code = a.assemble(CODE).unwrap();
    let b = CODE + 3 + 2 + 8;
    let mut rig = Rig::new();
    rig.load(2, &code);
    let mut c = cpu64(&mut Rng(2));
    let (rax0, rdx0) = (c.gpr[0], c.gpr[2]);
    let t0 = std::time::Instant::now();
    let n = std::thread::scope(|s| {
        let vm = &rig.vm;
        s.spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(30));
            vm.vcpus[0].kick();
        });
        exec(&mut c, &rig.m1, vm, |ex| {
            ex.run_batch_jit(&mut rig.jit, &mut BlockCache::new(), u32::MAX, false)
        })
        .unwrap()
        .0
    });
    assert!(n < u32::MAX / 4, "ran {n} instructions, {:?}", t0.elapsed());
    assert!(c.rip == CODE || c.rip == b, "stopped at {:#x}", c.rip);
    let incs = c.gpr[0].wrapping_sub(rax0) + c.gpr[2].wrapping_sub(rdx0);
    assert_eq!(incs * 2, u64::from(n));
    assert!(rig.jit.stats.links >= 2);
}

#[test]
fn dirty_bitmap_sees_the_first_write_after_a_harvest() {
    // A translated store to an already-dirty data page skips the bitmap (unlogged write
    // entry); after a harvest (reset, then `quiesce_unlogged_writes`, as `take_dirty_log`
    // does) the next store marks the page again.
    const D: u64 = 0x5000;
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rbx, D).unwrap();
    a.mov(qword_ptr(rbx), rax).unwrap();
    a.inc(rax).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(CODE).unwrap();
    let mut rig = Rig::new();
    rig.load(11, &code);
    use vm_memory::GuestMemoryBackend as _;
    use vm_memory::bitmap::Bitmap as _;
    let dirty = |r: &hv::GuestMemory| r.iter().next().unwrap().bitmap().dirty_at(D as usize);
    let harvest = |r: &hv::GuestMemory| {
        let _ = r.iter().next().unwrap().bitmap().get_and_reset();
    };
    let run = |rig: &mut Rig, v: u64| {
        let mut c = cpu64(&mut Rng(11));
        c.gpr[0] = v;
        run_jit(rig, &mut c, 10);
        assert_eq!(rig.m1.read_obj::<u64>(GuestAddress(D)).unwrap(), v);
    };
    // The first store misses the soft TLB (the interpreter marks the page), the second goes
    // through a write entry made for a dirty page.
    run(&mut rig, 1);
    run(&mut rig, 2);
    assert!(dirty(&rig.m1));
    // Without the hand-shake the entry stays unlogged: the write is not marked (which is
    // why a harvest must quiesce).
    harvest(&rig.m1);
    run(&mut rig, 3);
    assert!(!dirty(&rig.m1), "the store went through a logged path");
    // With it, the first store after the harvest is marked (the entry logs again until it
    // is made anew).
    harvest(&rig.m1);
    rig.vm.quiesce_unlogged_writes();
    run(&mut rig, 4);
    assert!(
        dirty(&rig.m1),
        "first write after a harvest not in the bitmap"
    );
    harvest(&rig.m1);
    rig.vm.quiesce_unlogged_writes();
    run(&mut rig, 5);
    assert!(
        dirty(&rig.m1),
        "first write after a harvest not in the bitmap"
    );
}

/// Where [`patch_and_call`]'s callee `mov eax, imm32; ret` stands.
pub(super) const PATCHED: u64 = CODE + 0x4000;

/// A program that six times runs `patch` (which writes ecx into the callee's immediate at
/// [`PATCHED`] + 1), then `inc ecx`, calls the callee and adds its eax to rdi, then halts
/// ([`code_of`]):
/// each call must run the code as patched last. `setup` runs once first (rsp is set).
pub(super) fn patch_and_call(
    setup: impl Fn(&mut CodeAssembler) -> Result<(), IcedError>,
    patch: impl Fn(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Vec<u8> {
    let mut code = code_of(|a| {
        let mut top = a.create_label();
        a.mov(edx, 6)?;
        a.mov(ecx, 100)?;
        a.mov(rsp, 0x9000u64)?;
        setup(a)?;
        a.set_label(&mut top)?;
        patch(a)?;
        a.inc(ecx)?;
        a.call(PATCHED)?;
        a.add(rdi, rax)?;
        a.dec(edx)?;
        a.jne(top)
    });
    let mut p = CodeAssembler::new(64).unwrap();
    p.mov(eax, 0).unwrap();
    p.ret().unwrap();
    code.resize((PATCHED - CODE) as usize, 0xcc);
    code.extend_from_slice(&p.assemble(PATCHED).unwrap());
    code
}

#[test]
fn a_store_into_a_page_that_became_code_invalidates_it() {
    // X stores into P (a dirty data page with an unlogged write entry), then P's code runs
    // (P becomes code), then X patches P's immediate and calls it again: every call must
    // run the patched code.
    let code = patch_and_call(
        |_| Ok(()),
        |a| {
            a.mov(rbx, PATCHED + 1)?;
            a.mov(dword_ptr(rbx), ecx)
        },
    );
    let mut rig = Rig::new();
    for seed in [1u64, 2] {
        rig.load(seed, &code);
        rig.compare("store into code", seed, 200, 0);
    }
    rig.load(3, &code);
    let mut c = cpu64(&mut Rng(3));
    let rdi0 = c.gpr[7];
    run_jit(&mut rig, &mut c, 200);
    assert_eq!(c.mp_state, MpState::Halted);
    assert_eq!(c.gpr[7], rdi0.wrapping_add((100..106).sum::<u64>()));
}

/// Runs the one instruction at `c.rip` through the one-instruction cache.
fn run_one(rig: &mut Rig, c: &mut Cpu) {
    exec(c, &rig.m1, &rig.vm, |ex| ex.interp_one(&mut rig.jit, false)).unwrap();
}

#[test]
fn the_one_instruction_cache_decodes_once_and_sees_rewritten_code() {
    // `mov eax, imm32` at CODE: decoded on the first run, then run from the cache; a write to
    // its page (another vCPU's store, through the code tracker) makes the next run decode the
    // new bytes. An instruction that crosses into the next page is left to `step`.
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(eax, 0x1111_1111u32).unwrap();
    let code = a.assemble(CODE).unwrap();
    let mut rig = Rig::new();
    rig.load(1, &code);
    for _ in 0..3 {
        let mut c = cpu64(&mut Rng(1));
        run_one(&mut rig, &mut c);
        assert_eq!(c.gpr[0], 0x1111_1111);
        assert_eq!(c.rip, CODE + 5);
    }
    assert_eq!(rig.jit.stats.one_op_decodes, 1, "{:?}", rig.jit.stats);
    assert_eq!(rig.jit.stats.one_ops, 3);
    rig.m1
        .write_obj(0x2222_2222u32, GuestAddress(CODE + 1))
        .unwrap();
    rig.vm.code.on_write(CODE >> 12);
    let mut c = cpu64(&mut Rng(1));
    run_one(&mut rig, &mut c);
    assert_eq!(c.gpr[0], 0x2222_2222, "a stale decode ran");
    assert_eq!(rig.jit.stats.one_op_decodes, 2);
    // Across a page end: same result, not cached.
    let at = CODE + 0xffe;
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(eax, 0x3333_3333u32).unwrap();
    rig.m1
        .write_slice(&a.assemble(at).unwrap(), GuestAddress(at))
        .unwrap();
    let mut c = cpu64(&mut Rng(1));
    c.rip = at;
    run_one(&mut rig, &mut c);
    assert_eq!((c.gpr[0], c.rip), (0x3333_3333, at + 5));
    assert_eq!(rig.jit.stats.one_op_decodes, 2);
}

// What the vector tests (`jit/simd_tests.rs`) share with these.

impl Rig {
    /// Two memories and a VM of `model`, with a translator that translates every block at once
    /// (no warm-up).
    pub(super) fn with_model(model: hv::CpuModel) -> Rig {
        Rig {
            m1: hv::GuestMemory::from_ranges(&[(GuestAddress(0), MEM)]).unwrap(),
            m2: hv::GuestMemory::from_ranges(&[(GuestAddress(0), MEM)]).unwrap(),
            vm: VmShared::new(model, 1, 1_000_000, MEM as u64),
            jit: {
                let mut j = Jit::new(1 << 20).unwrap();
                j.hot = 0;
                j
            },
        }
    }

    /// Runs `budget` instructions from `a` on the translator (in `m1`) and, from `b`, as many
    /// as it ran on the interpreter (in `m2`; a block runs whole, as in `run_batch`), which
    /// stops early at an error or where `stopped` says. Checks that both ended alike (an error
    /// or not) with the same memory and general registers; the caller compares the rest.
    pub(super) fn run_both(
        &mut self,
        ctx: &str,
        a: &mut Cpu,
        b: &mut Cpu,
        budget: u32,
        stopped: fn(&Cpu) -> bool,
    ) -> Both {
        self.run_both_stepping(ctx, a, b, budget, |ex| ex.step(), stopped)
    }

    /// [`Rig::run_both`] with the interpreter's side taking each of its steps through `step`
    /// (e.g. [`step_with_interrupts`], as the run loop does), then stopping early at an error
    /// or where `stopped` says.
    pub(super) fn run_both_stepping(
        &mut self,
        ctx: &str,
        a: &mut Cpu,
        b: &mut Cpu,
        budget: u32,
        step: fn(&mut Exec<'_>) -> R<()>,
        stopped: fn(&Cpu) -> bool,
    ) -> Both {
        let exits = self.jit.stats.exits_to_interp;
        let before = self.jit.stats.run;
        let ra = exec(a, &self.m1, &self.vm, |ex| {
            ex.run_batch_jit(&mut self.jit, &mut BlockCache::new(), budget, false)
        });
        let translated = self.jit.stats.exits_to_interp == exits && self.jit.stats.run > before;
        let steps = ra.as_ref().map_or(budget, |r| r.0);
        let rb = exec(b, &self.m2, &self.vm, |ex| {
            let mut r = Ok(());
            for _ in 0..steps {
                r = step(ex);
                if r.is_err() || stopped(ex.cpu) {
                    break;
                }
            }
            r
        });
        assert_eq!(ra.is_ok(), rb.is_ok(), "{ctx}: {ra:?} vs {rb:?}");
        assert_same_memory(&self.m1, &self.m2, MEM, ctx);
        assert_eq!(a.gpr, b.gpr, "{ctx}: registers");
        Both {
            jit: ra,
            interp: rb,
            steps,
            translated,
        }
    }
}

impl Rig {
    /// Writes `bytes` at `at` in both memories.
    pub(super) fn write(&self, at: u64, bytes: &[u8]) {
        for m in [&self.m1, &self.m2] {
            m.write_slice(bytes, GuestAddress(at)).unwrap();
        }
    }
}

/// How a family of tests (system, vector instructions) runs the interpreter's side of
/// [`Rig::compare_in`], and what it compares beyond memory, general registers, the exception,
/// flags and RIP.
pub(super) struct Family {
    /// One interpreter step (see [`Rig::run_both_stepping`]).
    pub(super) step: fn(&mut Exec<'_>) -> R<()>,
    /// Where the interpreter stops early.
    pub(super) stopped: fn(&Cpu) -> bool,
    /// The family's own checks of the end states (context, translator's, interpreter's).
    pub(super) more: fn(&str, &Cpu, &Cpu),
}

impl Rig {
    /// Runs `budget` instructions from `a` on the translator and, from `b`, on the interpreter
    /// as `family` runs it ([`Rig::run_both_stepping`]); compares the exception, the flags
    /// but `undefined`, RIP and what `family` adds; says how the translator ran.
    pub(super) fn compare_in(
        &mut self,
        family: &Family,
        ctx: &str,
        mut a: Cpu,
        mut b: Cpu,
        undefined: u64,
        budget: u32,
    ) -> Ran {
        let (step, stopped) = (family.step, family.stopped);
        let both = self.run_both_stepping(ctx, &mut a, &mut b, budget, step, stopped);
        assert_eq!(a.reported, b.reported, "{ctx}: exception");
        assert_eq!(
            a.rflags & !undefined,
            b.rflags & !undefined,
            "{ctx}: flags {:#x} vs {:#x}",
            a.rflags,
            b.rflags
        );
        assert_eq!(a.rip, b.rip, "{ctx}: rip");
        (family.more)(ctx, &a, &b);
        both.ran()
    }
}

/// One interpreter step as the run loop takes it: an interrupt first where `irq_check` says
/// one may be deliverable, then the instruction (unless the delivery left the vCPU not
/// runnable).
pub(super) fn step_with_interrupts(ex: &mut Exec<'_>) -> R<()> {
    if ex.cpu.irq_check {
        ex.try_inject()?;
        if ex.cpu.mp_state != MpState::Runnable {
            return Ok(());
        }
    }
    ex.step()
}

/// How the two runs of [`Rig::run_both`] ended.
pub(super) struct Both {
    /// The translator's result (instructions run, and whether it stopped at user mode).
    pub(super) jit: R<(u32, bool)>,
    /// The interpreter's result.
    pub(super) interp: R<()>,
    /// Instructions the interpreter was given (those the translator ran).
    pub(super) steps: u32,
    /// Whether the translator's run was translated code only (no TLB miss, no interpreted
    /// instruction).
    pub(super) translated: bool,
}

impl Both {
    /// How the translator's side ran.
    pub(super) fn ran(&self) -> Ran {
        if self.translated {
            Ran::Translated
        } else {
            Ran::Interpreted
        }
    }
}

/// How a comparison went on the translator's side.
#[derive(Debug, PartialEq)]
pub(super) enum Ran {
    /// All of it as translated code.
    Translated,
    /// Not all: the interpreter ran an instruction (an exit before it, a TLB miss).
    Interpreted,
}

/// The state the tests set, copied (`Cpu` itself is not `Clone`): the same start for both
/// engines.
pub(super) fn copy(c: &Cpu) -> Cpu {
    let mut d = Cpu::new(0);
    d.gpr = c.gpr;
    d.rip = c.rip;
    d.rflags = c.rflags;
    d.seg = c.seg;
    d.cr0 = c.cr0;
    d.cr4 = c.cr4;
    d.efer = c.efer;
    d.cpl = c.cpl;
    d.gdt = c.gdt;
    d.idt = c.idt;
    d.msr.kernel_gs_base = c.msr.kernel_gs_base;
    d.xmm = c.xmm;
    d.ymm_hi = c.ymm_hi;
    d.mxcsr = c.mxcsr;
    d.xcr0 = c.xcr0;
    d.deliver_exceptions = c.deliver_exceptions;
    d.irq_check = c.irq_check;
    d
}

/// The first instruction of `code` (at [`CODE`]).
pub(super) fn first(code: &[u8]) -> iced_x86::Instruction {
    Decoder::with_ip(64, code, CODE, DecoderOptions::NONE).decode()
}

/// The flags `i` leaves undefined.
pub(super) fn undefined_of(i: &iced_x86::Instruction) -> u64 {
    arch_flags(i.rflags_undefined())
}

/// The code of `f` at [`CODE`], then `hlt`.
pub(super) fn code_of(f: impl Fn(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    a.hlt().unwrap();
    a.assemble(CODE).unwrap()
}

/// Guest RIPs below `MEM` that share one set of the translator's index and of the decoded-block
/// cache (both hash `rip ^ rip >> 13 ^ rip >> 26`; below 2^26 that is `rip ^ rip >> 13`, so
/// `0x2000 * k + (s ^ k)` all land in set `s`).
fn starts_in_one_set(n: u64) -> Vec<u64> {
    (1..=n).map(|k| 0x2000 * k + (0x500 ^ k)).collect()
}

/// A rig with `add eax, k; hlt` at each of `n` starts in one set (k its position), a CPU to
/// run them, and the starts.
fn counting_blocks(n: u64) -> (Rig, Cpu, Vec<u64>) {
    let rig = Rig::new();
    rig.load(1, &[0xf4]);
    let starts = starts_in_one_set(n);
    for (k, &at) in starts.iter().enumerate() {
        let mut a = CodeAssembler::new(64).unwrap();
        a.add(eax, k as i32 + 1).unwrap();
        a.hlt().unwrap();
        rig.m1
            .write_slice(&a.assemble(at).unwrap(), GuestAddress(at))
            .unwrap();
    }
    (rig, cpu64(&mut Rng(1)), starts)
}

#[test]
fn block_starts_sharing_an_index_set_are_translated_once() {
    // Five block starts in one 2-way set, run round-robin: a direct-mapped table lost each
    // start's translation whenever another took its slot (20 translations here); the index
    // keeps the pushed-out ones in its victim map.
    let (mut rig, mut c, starts) = counting_blocks(5);
    c.gpr[0] = 0;
    for round in 0..4u64 {
        for (k, &at) in starts.iter().enumerate() {
            c.rip = at;
            assert_eq!(run_jit(&mut rig, &mut c, 1), 1);
            assert_eq!(c.rip, at + 5, "round {round}: start {k} stops before hlt");
        }
    }
    assert_eq!(c.gpr[0] as u32, 4 * (1 + 2 + 3 + 4 + 5));
    assert_eq!(rig.jit.stats.blocks, 5, "{:?}", rig.jit.stats);
    assert_eq!(rig.jit.stats.entries, 20);
    assert!(rig.jit.index.stats.recalls > 0, "{:?}", rig.jit.index.stats);
}

#[test]
fn a_translation_recalled_from_the_victim_map_sees_its_page_written() {
    // The first start is pushed out of the table by two others, then its code is rewritten
    // (as a device or another vCPU would: through the code tracker): brought back from the
    // victim map, its translation must be refused and the new code translated.
    let (mut rig, mut c, starts) = counting_blocks(3);
    for &at in &starts {
        c.rip = at;
        run_jit(&mut rig, &mut c, 1);
    }
    assert!(rig.jit.index.stats.evictions > 0);
    let at = starts[0];
    let mut a = CodeAssembler::new(64).unwrap();
    a.add(eax, 0x100).unwrap();
    rig.m1
        .write_slice(&a.assemble(at).unwrap(), GuestAddress(at))
        .unwrap();
    rig.vm.code.on_external_write(at >> 12, at >> 12);
    c.gpr[0] = 0;
    c.rip = at;
    run_jit(&mut rig, &mut c, 1);
    assert_eq!(c.gpr[0] as u32, 0x100, "the old translation ran");
    assert_eq!(rig.jit.stats.blocks, 4);
}

#[test]
fn cold_block_starts_sharing_a_set_heat_up_and_decode_once() {
    // With the default threshold, four starts in one set alternate on the interpreter: each
    // keeps its heat (so each is translated after HOT runs, not never) and its decoded block
    // (the decoded-block cache has 4 ways, the index 2 and its victim map).
    let (mut rig, mut c, starts) = counting_blocks(4);
    rig.jit.hot = HOT;
    let mut blocks = BlockCache::new();
    for _ in 0..=HOT {
        for &at in &starts {
            c.rip = at;
            run_jit_in(&mut rig, &mut c, &mut blocks, 1);
        }
    }
    assert_eq!(
        rig.jit.stats.cold,
        4 * u64::from(HOT),
        "{:?}",
        rig.jit.stats
    );
    assert_eq!(rig.jit.stats.blocks, 4);
    assert_eq!(rig.jit.stats.entries, 4);
    assert_eq!(blocks.decoded, 4, "cold blocks decoded again");
}

/// Whether the jump cache holds an entry for `rip`.
fn jc_holds(jit: &Jit, rip: u64) -> bool {
    jit.ctx.jc[jc_index(rip)].neg_rip == rip.wrapping_neg()
        || jit.ctx.jc[jc_index(rip) + JC_ENTRIES].neg_rip == rip.wrapping_neg()
}

#[test]
fn mov_to_cr3_keeps_the_jump_cache_entries_of_global_pages() {
    // Kernel text is global (no page-table isolation): a context switch keeps its TLB
    // translations, so the jump-cache entries made from them stay right. Entries of other
    // pages (user code, which the new address space may map elsewhere) must go, and a flush
    // that drops global translations too (INVLPG, a full flush) empties the cache.
    let mut jit = Jit::new(1 << 20).unwrap();
    jit.cache.push(&[0xc3; 256]).unwrap();
    let (kernel, user) = (0xffff_ffff_8100_0040u64, 0x40_1000u64);
    jit.jc_fill(kernel, 16, true, 0);
    jit.jc_fill(user, 32, false, 3);
    assert!(jc_holds(&jit, kernel) && jc_holds(&jit, user));
    jit.flush_nonglobal_tlb();
    assert!(jc_holds(&jit, kernel), "a global page's entry was dropped");
    assert!(
        !jc_holds(&jit, user),
        "a non-global entry survived MOV to CR3"
    );
    assert_eq!(jit.jc_used.len(), 1);
    // The slot is reused by a non-global entry: the next MOV to CR3 drops it.
    jit.jc_fill(kernel, 48, false, 0);
    jit.flush_nonglobal_tlb();
    assert!(!jc_holds(&jit, kernel));
    assert!(jit.jc_used.is_empty());
    jit.jc_fill(kernel, 16, true, 0);
    jit.flush_tlb();
    assert!(!jc_holds(&jit, kernel));
    assert!(jit.ctx.jc.iter().all(|e| e.neg_rip == 1) && jit.jc_used.is_empty());
}

#[test]
fn the_jump_cache_has_a_half_per_privilege_class() {
    // One RIP filled at CPL 0 and at CPL 3 takes two entries (each made after a fetch at its
    // class); MOV to CR3 keeps the global ones of both halves, a full flush empties both.
    let mut jit = Jit::new(1 << 20).unwrap();
    jit.cache.push(&[0xc3; 256]).unwrap();
    let rip = 0x40_1000u64;
    let at = |jit: &Jit, half: usize| jit.ctx.jc[jc_index(rip) + half];
    jit.jc_fill(rip, 16, true, 0);
    assert_eq!(
        at(&jit, JC_ENTRIES).neg_rip,
        1,
        "a kernel fill reached the user half"
    );
    jit.jc_fill(rip, 32, false, 3);
    let (k, u) = (at(&jit, 0), at(&jit, JC_ENTRIES));
    assert_eq!(
        (k.neg_rip, u.neg_rip),
        (rip.wrapping_neg(), rip.wrapping_neg())
    );
    assert_ne!(k.addr, u.addr);
    assert_eq!(jit.jc_used.len(), 2);
    jit.flush_nonglobal_tlb();
    assert_eq!(at(&jit, 0).neg_rip, rip.wrapping_neg());
    assert_eq!(at(&jit, JC_ENTRIES).neg_rip, 1);
    jit.jc_fill(rip, 32, true, 3);
    jit.flush_jc();
    assert!(jit.ctx.jc.iter().all(|e| e.neg_rip == 1) && jit.jc_used.is_empty());
}
