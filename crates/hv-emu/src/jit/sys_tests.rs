//! Translated system instructions and scalar extensions against the interpreter, one form at
//! a time on random states, and the cases that must leave to the interpreter (#GP, #UD,
//! misaligned `cmpxchg16b`, a model without BMI) or wait for the run loop (the STI shadow).

use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress};

use super::super::{Kind, classify_for};
use crate::cpu::{Cpu, DF, IF, IOPL};
use crate::jit::tests::{
    CODE, Family, MEM, Ran, Rig, code_of, copy, first, run_jit, step_with_interrupts, undefined_of,
};
use crate::testutil::Rng;
use crate::vm::VmShared;
use hv::MpState;

const AC: u64 = 1 << 18;

fn cpu(seed: u64) -> Cpu {
    let mut rng = Rng(seed | 1);
    let mut c = crate::testutil::cpu64(&mut rng, 0x3000, 0x6000, 16);
    c.deliver_exceptions = false;
    for (k, s) in c.seg.iter_mut().enumerate() {
        s.selector = (rng.next() as u16) | (u16::from(k == 1) * 8);
    }
    c.seg[crate::cpu::FS].base = rng.next() % 0x8000;
    c.seg[crate::cpu::GS].base = 0x8000 + rng.next() % 0x8000;
    c.msr.kernel_gs_base = rng.next();
    c.rflags |= rng.next() & (DF | AC | IF | IOPL);
    c.cr4 |= 1 << 16; // FSGSBASE
    c
}

/// The system side of the comparison: the interpreter delivers interrupts as the run loop
/// does (so interrupts and shadows are handled the same way on both engines) and stops at a
/// reported exception or a halt; segments, the kernel GS base, the interrupt shadow and the
/// run state are compared too.
const SYS: Family = Family {
    step: step_with_interrupts,
    stopped: |c| c.reported.is_some() || c.mp_state != MpState::Runnable,
    more: |ctx, a, b| {
        assert_eq!(a.seg, b.seg, "{ctx}: segments");
        assert_eq!(
            a.msr.kernel_gs_base, b.msr.kernel_gs_base,
            "{ctx}: kernel gs base"
        );
        assert_eq!(a.shadow, b.shadow, "{ctx}: interrupt shadow");
        assert_eq!(a.irq_check, b.irq_check, "{ctx}: irq_check");
        assert_eq!(a.mp_state, b.mp_state, "{ctx}: run state");
    },
};

impl Rig {
    /// Three runs of `code` from `c` (the first two fill the soft TLB: an instruction may
    /// touch two pages); how the last went.
    fn run_sys(&mut self, name: &str, code: &[u8], c: &Cpu, seed: u64, undefined: u64) -> Ran {
        self.jit.clear();
        for _ in 0..2 {
            self.load(seed | 1, code);
            self.compare_in(&SYS, name, copy(c), copy(c), undefined, 1);
        }
        self.load(seed | 1, code);
        self.compare_in(&SYS, name, copy(c), copy(c), undefined, 1)
    }
}

type Gen = Box<dyn Fn(&mut CodeAssembler) -> Result<(), IcedError>>;

fn templates() -> Vec<(String, Gen)> {
    let mut v: Vec<(String, Gen)> = Vec::new();
    macro_rules! t {
        ($($e:tt)*) => {
            v.push((stringify!($($e)*).to_string(), Box::new(|a: &mut CodeAssembler| { a.$($e)*?; Ok(()) })));
        };
    }
    t!(mov(eax, ds));
    t!(mov(r9, ss));
    t!(mov(cx, fs));
    t!(mov(r11d, cs));
    t!(mov(edx, es));
    t!(mov(rsi, gs));
    t!(mov(word_ptr(rbx + 6), gs));
    t!(mov(word_ptr(rdi + rcx), ds));
    t!(cli());
    t!(sti());
    t!(cld());
    t!(std());
    t!(popfq());
    t!(swapgs());
    t!(rdgsbase(rax));
    t!(rdfsbase(r10d));
    t!(wrgsbase(rcx));
    t!(wrfsbase(r8d));
    t!(push(qword_ptr(rbx + 8)));
    t!(push(qword_ptr(rsp + 16)));
    t!(tzcnt(rax, rbx));
    t!(tzcnt(ecx, dword_ptr(rsi)));
    t!(tzcnt(r9w, dx));
    t!(lzcnt(rdx, r10));
    t!(lzcnt(eax, dword_ptr(rdi + 4)));
    t!(popcnt(r8, qword_ptr(rbx)));
    t!(popcnt(ecx, edx));
    t!(andn(rax, rbx, rcx));
    t!(andn(r9d, r10d, dword_ptr(rsi)));
    t!(bextr(rdx, rbx, rcx));
    t!(blsi(rax, rdx));
    t!(blsmsk(ecx, dword_ptr(rdi)));
    t!(blsr(r11, r12));
    t!(bzhi(rax, rbx, rcx));
    t!(bzhi(edx, dword_ptr(rsi), r8d));
    t!(mulx(rax, rbx, rcx));
    t!(mulx(r9d, r10d, dword_ptr(rdi)));
    t!(mulx(rax, rax, rcx));
    t!(pdep(rax, rbx, rcx));
    t!(pext(r8d, r9d, dword_ptr(rbx)));
    t!(rorx(rax, rbx, 13));
    t!(rorx(edx, dword_ptr(rsi), 5));
    t!(sarx(rax, rbx, rcx));
    t!(shlx(r10d, dword_ptr(rdi), ecx));
    t!(shrx(rdx, rdx, r9));
    t!(adcx(rax, rbx));
    t!(adox(ecx, dword_ptr(rsi)));
    t!(movbe(rax, qword_ptr(rbx)));
    t!(movbe(dword_ptr(rdi + 2), ecx));
    t!(movbe(dx, word_ptr(rsi)));
    v
}

#[test]
fn every_system_and_extension_form_matches_the_interpreter() {
    let mut rng = Rng(0x5eed_5151_0000_0001);
    let mut rig = Rig::with_model(hv::CpuModel::portable_v3());
    for (name, f) in &templates() {
        let code = code_of(f);
        let i = first(&code);
        assert!(
            classify_for(&i, rig.vm.features).is_some(),
            "{name} is not translated"
        );
        let mut translated = 0;
        for _ in 0..24 {
            let seed = rng.next();
            let c = cpu(seed);
            if rig.run_sys(name, &code, &c, seed, undefined_of(&i)) == Ran::Translated {
                translated += 1;
            }
        }
        assert!(
            translated >= 20,
            "{name}: only {translated} of 24 runs translated"
        );
    }
}

#[test]
fn cmpxchg16b_matches_the_interpreter_equal_or_not() {
    let mut rng = Rng(0x16b);
    let mut rig = Rig::with_model(hv::CpuModel::portable_v3());
    let code = code_of(|a| a.lock().cmpxchg16b(xmmword_ptr(rsi + 16)));
    assert_eq!(
        classify_for(&first(&code), rig.vm.features),
        Some(Kind::Cmpxchg16b)
    );
    for n in 0..32 {
        let seed = rng.next();
        let mut c = cpu(seed);
        c.gpr[6] &= !15;
        if n % 2 == 0 {
            // Make the comparison succeed: rdx:rax = the memory's value.
            let a = c.gpr[6] + 16;
            rig.load(seed | 1, &code);
            let mut q = [0u8; 16];
            rig.m1.read_slice(&mut q, GuestAddress(a)).unwrap();
            c.gpr[0] = u64::from_le_bytes(q[..8].try_into().unwrap());
            c.gpr[2] = u64::from_le_bytes(q[8..].try_into().unwrap());
        }
        assert_eq!(
            rig.run_sys("cmpxchg16b", &code, &c, seed, 0),
            Ran::Translated
        );
    }
    // Misaligned: #GP(0) from the interpreter.
    let mut c = cpu(3);
    c.gpr[6] = (c.gpr[6] & !15) + 8;
    assert_eq!(
        rig.run_sys("cmpxchg16b misaligned", &code, &c, 3, 0),
        Ran::Interpreted
    );
}

#[test]
fn privileged_and_gated_cases_leave_to_the_interpreter() {
    let mut rig = Rig::with_model(hv::CpuModel::portable_v3());
    let user = |seed: u64, iopl: u64| {
        let mut c = cpu(seed);
        c.cpl = 3;
        c.seg[crate::cpu::CS].dpl = 3;
        c.rflags = (c.rflags & !IOPL) | (iopl << 12);
        c
    };
    // CLI/STI at CPL 3 with IOPL 0: #GP; with IOPL 3 they run translated.
    for (name, code) in [("cli", code_of(|a| a.cli())), ("sti", code_of(|a| a.sti()))] {
        let r = rig.run_sys(name, &code, &user(5, 0), 5, 0);
        assert_eq!(r, Ran::Interpreted, "{name} at CPL 3, IOPL 0");
        let r = rig.run_sys(name, &code, &user(5, 3), 5, 0);
        assert_eq!(r, Ran::Translated, "{name} at CPL 3, IOPL 3");
    }
    // POPF at CPL 3 keeps IOPL and (IOPL 0) IF.
    let code = code_of(|a| a.popfq());
    for seed in 1..16 {
        assert_eq!(
            rig.run_sys("popfq cpl3", &code, &user(seed, seed % 4), seed, 0),
            Ran::Translated
        );
    }
    // SWAPGS at CPL 3: #GP.
    let code = code_of(|a| a.swapgs());
    assert_eq!(
        rig.run_sys("swapgs cpl3", &code, &user(9, 3), 9, 0),
        Ran::Interpreted
    );
    // FSGSBASE with CR4.FSGSBASE clear: #UD.
    let code = code_of(|a| a.rdgsbase(rax));
    let mut c = cpu(11);
    c.cr4 &= !(1 << 16);
    assert_eq!(
        rig.run_sys("rdgsbase cr4", &code, &c, 11, 0),
        Ran::Interpreted
    );
    // A non-canonical base: #GP.
    let code = code_of(|a| a.wrfsbase(rcx));
    let mut c = cpu(12);
    c.gpr[1] = 0x8000_0000_0000_0000;
    assert_eq!(
        rig.run_sys("wrfsbase non-canonical", &code, &c, 12, 0),
        Ran::Interpreted
    );
    assert_eq!(c.reported, None);
}

#[test]
fn extensions_follow_the_model() {
    // The v2 model has no BMI1/ABM/BMI2/MOVBE/ADX: not translated; tzcnt/lzcnt run as
    // bsf/bsr and the others raise #UD in the interpreter.
    let mut rig = Rig::with_model(hv::CpuModel::portable());
    for (name, f) in &templates() {
        let code = code_of(f);
        let i = first(&code);
        let Some(feature) = super::ext_feature(i.mnemonic()) else {
            continue;
        };
        if rig.vm.features.contains(feature) {
            continue;
        }
        assert_eq!(classify_for(&i, rig.vm.features), None, "{name}");
        let c = cpu(21);
        assert_eq!(
            rig.run_sys(name, &code, &c, 21, undefined_of(&i)),
            Ran::Interpreted,
            "{name}"
        );
    }
}

#[test]
fn one_vcpu_only_for_cmpxchg16b() {
    let mut rig = Rig::with_model(hv::CpuModel::portable_v3());
    rig.vm = VmShared::new(hv::CpuModel::portable_v3(), 2, 1_000_000, MEM as u64);
    let code = code_of(|a| a.cmpxchg16b(xmmword_ptr(rsi)));
    let mut c = cpu(4);
    c.gpr[6] &= !15;
    assert_eq!(
        rig.run_sys("cmpxchg16b smp", &code, &c, 4, 0),
        Ran::Interpreted
    );
}

/// A 64-bit GDT (selector 8: code) and an IDT whose vector 0x40 goes to `handler`.
fn tables(rig: &Rig, c: &mut Cpu, handler: u64) {
    let gdt = 0xa000u64;
    let idt = 0xb000u64;
    let mut g = [0u8; 16];
    g[8..].copy_from_slice(&0x00af_9b00_0000_ffffu64.to_le_bytes());
    rig.write(gdt, &g);
    let mut e = [0u8; 16];
    e[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    e[2..4].copy_from_slice(&8u16.to_le_bytes());
    e[5] = 0x8e;
    e[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    e[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    rig.write(idt + 16 * 0x40, &e);
    c.gdt = hv::DescriptorTable {
        base: gdt,
        limit: 15,
    };
    c.idt = hv::DescriptorTable {
        base: idt,
        limit: 0xfff,
    };
}

#[test]
fn sti_shadow_holds_for_one_instruction() {
    let mut rig = Rig::with_model(hv::CpuModel::portable_v3());
    // sti; mov eax, 1; mov ebx, 2; hlt — with an interrupt pending and IF clear.
    let code = code_of(|a| {
        a.sti()?;
        a.mov(eax, 1)?;
        a.mov(ebx, 2)
    });
    let handler = 0x2000u64;
    for seed in 1..6u64 {
        rig.jit.clear();
        rig.load(seed | 1, &code);
        rig.write(handler, &[0xf4]);
        let mut c = cpu(seed);
        c.rflags &= !(IF | IOPL);
        c.seg[crate::cpu::CS].selector = 8;
        c.seg[crate::cpu::SS].selector = 0;
        c.gpr[3] = 0x77;
        tables(&rig, &mut c, handler);
        c.irq_check = true;
        let mut a = copy(&c);
        let mut b = copy(&c);
        a.lapic.set_irr(0x40, false);
        b.lapic.set_irr(0x40, false);
        let ran = rig.compare_in(&SYS, "sti shadow", a, b, 0, 16);
        assert_eq!(ran, Ran::Translated);
        // Check the translated side's outcome directly too.
        let mut a = copy(&c);
        a.lapic.set_irr(0x40, false);
        rig.load(seed | 1, &code);
        rig.write(handler, &[0xf4]);
        tables(&rig, &mut a, handler);
        run_jit(&mut rig, &mut a, 16);
        assert_eq!(a.gpr[0] & 0xffff_ffff, 1, "the instruction after sti ran");
        assert_eq!(a.gpr[3], 0x77, "the interrupt came before the second one");
        assert_eq!(a.rip, handler + 1, "halted in the handler");
        let mut ret = [0u8; 8];
        rig.m1.read_slice(&mut ret, GuestAddress(a.gpr[4])).unwrap();
        let after_mov = CODE + 1 + 5;
        assert_eq!(u64::from_le_bytes(ret), after_mov, "return address");
    }
}

/// A stack frame for `iretq` at the guest's rsp: RIP, CS, RFLAGS, RSP, SS.
fn iret_frame(rig: &Rig, c: &Cpu, frame: [u64; 5]) {
    let bytes: Vec<u8> = frame.iter().flat_map(|q| q.to_le_bytes()).collect();
    rig.write(c.gpr[4], &bytes);
}

#[test]
fn iretq_to_the_same_level_is_finished_by_the_run_loop() {
    let mut rig = Rig::with_model(hv::CpuModel::portable_v3());
    let code = code_of(|a| a.iretq());
    assert_eq!(
        classify_for(&first(&code), rig.vm.features),
        Some(Kind::Iret)
    );
    // GDT: 8 = 64-bit code, 0x10 = data (both accessed), 0x18 = data, not accessed.
    let gdt: [u64; 4] = [
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00cf_9200_0000_ffff,
    ];
    let cases: [(&str, u16, u16, Ran); 4] = [
        ("same level", 8, 0x10, Ran::Translated),
        ("null ss", 8, 0, Ran::Translated),
        ("ss descriptor not accessed", 8, 0x18, Ran::Interpreted),
        ("other cs", 0x10, 0x10, Ran::Interpreted),
    ];
    let mut rng = Rng(0x1e7);
    for (name, cs_sel, ss_sel, want) in cases {
        for _ in 0..8 {
            let seed = rng.next();
            let mut c = cpu(seed);
            c.gdt = hv::DescriptorTable {
                base: 0xa000,
                limit: 31,
            };
            let seg = |sel: u16, d: u64| {
                if sel == 0 {
                    hv::Segment {
                        selector: 0,
                        unusable: true,
                        db: true,
                        ..hv::Segment::default()
                    }
                } else {
                    crate::cpu::parse_descriptor(sel, d)
                }
            };
            c.seg[crate::cpu::CS] = seg(8, gdt[1]);
            c.seg[crate::cpu::SS] = seg(ss_sel, gdt[usize::from(ss_sel >> 3)] | 1 << 40);
            let target = 0x1000 + rng.next() % 0x1000;
            let frame = [
                target,
                u64::from(cs_sel),
                rng.next(),
                rng.next() % 0x10000,
                u64::from(ss_sel),
            ];
            // Three runs, as `Rig::run`, with the tables and the frame rewritten each time.
            rig.jit.clear();
            let mut last = Ran::Interpreted;
            for _ in 0..3 {
                rig.load(seed | 1, &code);
                let bytes: Vec<u8> = gdt.iter().flat_map(|q| q.to_le_bytes()).collect();
                rig.write(0xa000, &bytes);
                iret_frame(&rig, &c, frame);
                last = rig.compare_in(&SYS, name, copy(&c), copy(&c), 0, 1);
            }
            assert_eq!(last, want, "{name}");
        }
    }
}

#[test]
fn sequences_see_what_the_instructions_before_them_changed() {
    // Blocks where a later instruction reads what a translated system instruction changed:
    // pushfq after cli/std/cld (Ctx::flags), string instructions after std (DF: interpreted),
    // GS-relative loads after swapgs/wrgsbase (the base in the context), flags after popfq.
    let mut rig = Rig::with_model(hv::CpuModel::portable_v3());
    let seqs: Vec<(&str, Vec<u8>, u32)> = vec![
        (
            "cli; pushfq",
            code_of(|a| {
                a.cli()?;
                a.pushfq()
            }),
            2,
        ),
        (
            "std; pushfq; cld; pushfq",
            code_of(|a| {
                a.std()?;
                a.pushfq()?;
                a.cld()?;
                a.pushfq()
            }),
            4,
        ),
        (
            "std; rep stosb; cld",
            code_of(|a| {
                a.mov(ecx, 3)?;
                a.std()?;
                a.rep().stosb()?;
                a.cld()?;
                a.rep().stosb()
            }),
            5,
        ),
        (
            "popfq; adc; pushfq",
            code_of(|a| {
                a.popfq()?;
                a.adc(rax, rbx)?;
                a.pushfq()
            }),
            3,
        ),
        (
            "sreg reads",
            code_of(|a| {
                a.mov(eax, ds)?;
                a.add(eax, 1)?;
                a.mov(word_ptr(rbx), es)?;
                a.mov(rdx, qword_ptr(rbx))
            }),
            4,
        ),
        (
            "swapgs; gs load; swapgs",
            code_of(|a| {
                a.swapgs()?;
                a.mov(rax, qword_ptr(8).gs())?;
                a.swapgs()?;
                a.mov(rdx, qword_ptr(16).gs())
            }),
            4,
        ),
        (
            "wrgsbase; gs load; rdgsbase",
            code_of(|a| {
                a.wrgsbase(rcx)?;
                a.mov(rax, qword_ptr(rdx + 4).gs())?;
                a.rdgsbase(r9)
            }),
            3,
        ),
        (
            "sti; nop; cli",
            code_of(|a| {
                a.sti()?;
                a.nop()?;
                a.cli()
            }),
            3,
        ),
    ];
    let mut rng = Rng(0x5e9);
    for (name, code, n) in &seqs {
        for _ in 0..16 {
            let seed = rng.next();
            let mut c = cpu(seed);
            c.msr.kernel_gs_base = 0x9000 + rng.next() % 0x1000;
            c.gpr[1] = 0xa000 + rng.next() % 0x1000;
            c.gpr[2] = rng.next() % 0x100;
            rig.jit.clear();
            for _ in 0..4 {
                rig.load(seed | 1, code);
                rig.compare_in(&SYS, name, copy(&c), copy(&c), 0, *n);
            }
        }
    }
}
