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
        // `irq_check` asks the run loop to look for an interrupt: translated code leaves it
        // clear after a `sti` or `popfq` whose window it checked itself, where the
        // interpreter's look would find nothing to deliver.
        assert!(
            a.irq_check == b.irq_check || (!a.irq_check && !irq_check_matters(b)),
            "{ctx}: irq_check {} vs {}",
            a.irq_check,
            b.irq_check
        );
        assert_eq!(a.mp_state, b.mp_state, "{ctx}: run state");
    },
};

/// Whether the run loop's look for an interrupt (`Exec::try_inject`) would do anything for
/// `c` now: wait for the end of a shadow, or deliver (nothing is posted in these tests).
fn irq_check_matters(c: &Cpu) -> bool {
    c.shadow != 0
        || (c.nmi_pending && !c.nmi_masked)
        || (c.rflags & IF != 0 && c.lapic.deliverable().is_some())
}

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

// The interrupt window of `sti` and `popfq` in translated code (see the module doc).

/// The handler of vector [`VEC`] (a `hlt`).
const HANDLER: u64 = 0x2000;
const VEC: u8 = 0x40;

/// Memory for `code` from `c` (seed `seed`): the code, the handler, the descriptor tables and,
/// if `stack` is given, that qword at the guest's rsp (for `popfq`).
fn irq_memory(rig: &Rig, seed: u64, code: &[u8], c: &mut Cpu, stack: Option<u64>) {
    rig.load(seed | 1, code);
    rig.write(HANDLER, &[0xf4]);
    tables(rig, c, HANDLER);
    if let Some(v) = stack {
        rig.write(c.gpr[4], &v.to_le_bytes());
    }
}

/// A CPU for the window tests at CPL 0: IF and IOPL clear, code selector 8, a null SS, rax and
/// rbx 0x77 (so the tests see which instructions ran).
fn irq_cpu(seed: u64) -> Cpu {
    let mut c = cpu(seed);
    c.rflags &= !(IF | IOPL);
    c.seg[crate::cpu::CS].selector = 8;
    c.seg[crate::cpu::SS].selector = 0;
    c.gpr[0] = 0x77;
    c.gpr[3] = 0x77;
    c
}

/// What a translated run of a window test did.
struct IrqRun {
    c: Cpu,
    /// The interrupt frame's RIP, when the run ended halted in the handler.
    frame: Option<u64>,
    /// Entries into translated code and translated instructions of the (last) run.
    entries: u64,
    run: u64,
}

/// Runs `code` from `c` with vector [`VEC`] pending in the local APIC if `pending`: first on
/// both engines, compared (the interpreter as the run loop steps it), then on the translator
/// twice from the same state (the second run finds the soft TLB filled), or once from an empty
/// soft TLB (`cold`); returns how the last translated run went.
fn run_irq(
    rig: &mut Rig,
    name: &str,
    code: &[u8],
    c: &Cpu,
    stack: Option<u64>,
    pending: bool,
    cold: bool,
) -> IrqRun {
    let seed = c.gpr[15];
    let mut c = copy(c);
    rig.jit.clear();
    irq_memory(rig, seed, code, &mut c, stack);
    let (mut a, mut b) = (copy(&c), copy(&c));
    if pending {
        a.lapic.set_irr(VEC, false);
        b.lapic.set_irr(VEC, false);
    }
    rig.compare_in(&SYS, name, a, b, 0, 64);
    let mut last = None;
    for _ in 0..if cold { 1 } else { 2 } {
        if cold {
            rig.jit.clear();
        }
        let mut a = copy(&c);
        if pending {
            a.lapic.set_irr(VEC, false);
        }
        irq_memory(rig, seed, code, &mut a, stack);
        let before = rig.jit.stats;
        run_jit(rig, &mut a, 64);
        last = Some((a, before));
    }
    let (c, before) = last.unwrap();
    let frame = (c.mp_state == MpState::Halted && c.rip == HANDLER + 1).then(|| {
        let mut ret = [0u8; 8];
        rig.m1.read_slice(&mut ret, GuestAddress(c.gpr[4])).unwrap();
        u64::from_le_bytes(ret)
    });
    IrqRun {
        frame,
        entries: rig.jit.stats.entries - before.entries,
        run: rig.jit.stats.run - before.run,
        c,
    }
}

#[test]
fn a_pending_interrupt_comes_right_after_the_sti_shadow() {
    let mut rig = Rig::with_model(hv::CpuModel::portable_v3());
    let code = code_of(|a| {
        a.sti()?;
        a.mov(eax, 1)?;
        a.mov(ebx, 2)
    });
    for seed in 1..6u64 {
        let c = irq_cpu(seed);
        let r = run_irq(&mut rig, "sti window", &code, &c, None, true, false);
        assert_eq!(r.frame, Some(CODE + 1 + 5), "seed {seed}: after mov eax, 1");
        assert_eq!(r.c.gpr[0], 1, "the instruction in the shadow ran");
        assert_eq!(r.c.gpr[3], 0x77, "the one after it did not");
        assert_eq!(r.run, 2, "sti and the shadow instruction ran translated");
        assert_eq!(r.entries, 1);
        // Nothing pending: the block runs through to the hlt, in one entry.
        let r = run_irq(&mut rig, "sti window", &code, &c, None, false, false);
        assert_eq!((r.frame, r.c.gpr[0], r.c.gpr[3]), (None, 1, 2));
        assert_eq!((r.run, r.entries), (3, 1));
        assert!(!r.c.irq_check && r.c.shadow == 0);
    }
}

#[test]
fn the_shadow_instruction_interpreted_after_a_soft_tlb_miss_keeps_the_shadow() {
    // The load misses the (emptied) soft TLB: the interpreter runs it with the shadow the
    // translated `sti` left, and the interrupt comes right after it.
    let mut rig = Rig::with_model(hv::CpuModel::portable_v3());
    let code = code_of(|a| {
        a.sti()?;
        a.mov(eax, dword_ptr(rsi))?;
        a.mov(ebx, 2)
    });
    for seed in 1..6u64 {
        let c = irq_cpu(seed);
        let r = run_irq(&mut rig, "sti miss", &code, &c, None, true, true);
        assert_eq!(r.frame, Some(CODE + 1 + 2), "seed {seed}: after the load");
        assert_eq!(r.c.gpr[3], 0x77);
        assert_eq!(r.run, 1, "the load was interpreted");
    }
}

#[test]
fn sti_with_if_set_opens_the_window_at_once() {
    // IF set and an interrupt deliverable that nothing looked for yet: the interpreter's `sti`
    // asks for a look right after it (no shadow), and so does the translated one.
    let mut rig = Rig::with_model(hv::CpuModel::portable_v3());
    let code = code_of(|a| {
        a.sti()?;
        a.mov(eax, 1)?;
        a.mov(ebx, 2)
    });
    for seed in 1..6u64 {
        let mut c = irq_cpu(seed);
        c.rflags |= IF;
        c.irq_check = false;
        let r = run_irq(&mut rig, "sti if set", &code, &c, None, true, false);
        assert_eq!(r.frame, Some(CODE + 1), "seed {seed}: right after sti");
        assert_eq!((r.c.gpr[0], r.c.gpr[3]), (0x77, 0x77));
        assert_eq!(r.run, 1);
    }
}

#[test]
fn sti_then_cli_leaves_no_window() {
    // `sti; cli`: IF is clear again when the shadow ends; nothing is delivered and the block
    // runs through without returning to the run loop.
    let mut rig = Rig::with_model(hv::CpuModel::portable_v3());
    let code = code_of(|a| {
        a.sti()?;
        a.cli()?;
        a.mov(eax, 1)
    });
    for seed in 1..6u64 {
        let c = irq_cpu(seed);
        let r = run_irq(&mut rig, "sti cli", &code, &c, None, true, false);
        assert_eq!(r.frame, None);
        assert_eq!(r.c.mp_state, MpState::Halted);
        assert_eq!((r.c.gpr[0], r.c.rflags & IF), (1, 0));
        assert_eq!((r.run, r.entries), (3, 1), "seed {seed}");
    }
}

#[test]
fn popfq_that_sets_if_delivers_a_pending_interrupt_right_after_it() {
    let mut rig = Rig::with_model(hv::CpuModel::portable_v3());
    let code = code_of(|a| {
        a.popfq()?;
        a.mov(eax, 1)?;
        a.mov(ebx, 2)
    });
    for seed in 1..6u64 {
        let c = irq_cpu(seed);
        let flags = 0x202 | (seed & 0xd5);
        let r = run_irq(&mut rig, "popf if", &code, &c, Some(flags), true, false);
        assert_eq!(r.frame, Some(CODE + 1), "seed {seed}: right after popfq");
        assert_eq!((r.c.gpr[0], r.c.gpr[3]), (0x77, 0x77));
        assert_eq!(r.run, 1);
        // IF stays clear: no window, the block goes on.
        let r = run_irq(&mut rig, "popf no if", &code, &c, Some(2), true, false);
        assert_eq!((r.frame, r.c.gpr[0], r.c.gpr[3]), (None, 1, 2));
        assert_eq!((r.run, r.entries), (3, 1));
        // IF set, nothing pending: the block goes on too.
        let r = run_irq(&mut rig, "popf idle", &code, &c, Some(flags), false, false);
        assert_eq!((r.frame, r.c.gpr[0], r.c.gpr[3]), (None, 1, 2));
        assert_eq!((r.run, r.entries), (3, 1));
        assert_eq!(r.c.rflags & 0xfd7, flags & 0xfd7);
    }
}

#[test]
fn popfq_that_changes_iopl_ends_the_run() {
    // The deny word and POPF's mask hold for the IOPL the run was entered with.
    let mut rig = Rig::with_model(hv::CpuModel::portable_v3());
    let code = code_of(|a| {
        a.popfq()?;
        a.mov(eax, 1)?;
        a.mov(ebx, 2)
    });
    for seed in 1..6u64 {
        for (iopl, runs_through) in [(0u64, true), (3, false), (1, false)] {
            let mut c = irq_cpu(seed);
            irq_memory(&rig, seed, &code, &mut c, Some(2 | iopl << 12));
            // Warm the soft TLB, then one run (budget 1: one entry).
            run_jit(&mut rig, &mut copy(&c), 64);
            let mut a = copy(&c);
            irq_memory(&rig, seed, &code, &mut a, Some(2 | iopl << 12));
            let n = run_jit(&mut rig, &mut a, 1);
            assert_eq!(a.rflags & IOPL, iopl << 12);
            if runs_through {
                assert_eq!((n, a.gpr[0], a.gpr[3]), (3, 1, 2), "seed {seed}");
            } else {
                assert_eq!((n, a.rip), (1, CODE + 1), "seed {seed} iopl {iopl}");
                assert_eq!((a.gpr[0], a.gpr[3]), (0x77, 0x77));
            }
            irq_memory(&rig, seed, &code, &mut copy(&c), Some(2 | iopl << 12));
            rig.compare_in(&SYS, "popf iopl", copy(&c), copy(&c), 0, 64);
        }
    }
}

#[test]
fn an_interrupt_posted_while_the_block_runs_comes_after_the_shadow() {
    // Nothing pending at entry; another thread posts an interrupt after the batch cleared the
    // exit-request word (set here before the block runs, as that thread would): the block
    // leaves at the end of the shadow and the run loop delivers it there.
    let mut rig = Rig::with_model(hv::CpuModel::portable_v3());
    let code = code_of(|a| {
        a.sti()?;
        a.mov(eax, 1)?;
        a.mov(ebx, 2)
    });
    for seed in 1..6u64 {
        let mut c = irq_cpu(seed);
        // As the run loop leaves it after looking (nothing to deliver).
        c.irq_check = false;
        irq_memory(&rig, seed, &code, &mut c, None);
        let jit = &mut rig.jit;
        let vm = &rig.vm;
        let me = &vm.vcpus[0];
        let n = crate::testutil::exec(&mut c, &rig.m1, vm, |ex| {
            let super::super::super::Found::Code(code, _, _) = ex.jit_lookup(jit).unwrap() else {
                panic!("not translated");
            };
            jit.ctx.req = me.exit_req.as_ptr() as u64;
            me.exit_req.store(1, std::sync::atomic::Ordering::SeqCst);
            let n = ex.jit_run(jit, code, 64).unwrap();
            me.exit_req.store(0, std::sync::atomic::Ordering::SeqCst);
            n
        });
        assert_eq!(
            (n, c.rip),
            (2, CODE + 1 + 5),
            "seed {seed}: left after the shadow"
        );
        assert!(c.irq_check && c.shadow == 0);
        assert_eq!((c.gpr[0], c.gpr[3]), (1, 0x77));
        // The posted vector reaches the vCPU through its mailbox.
        me.post(|m| m.irr[usize::from(VEC / 32)] |= 1 << (VEC % 32));
        run_jit(&mut rig, &mut c, 64);
        assert_eq!((c.mp_state, c.rip), (MpState::Halted, HANDLER + 1));
        let mut ret = [0u8; 8];
        rig.m1.read_slice(&mut ret, GuestAddress(c.gpr[4])).unwrap();
        assert_eq!(u64::from_le_bytes(ret), CODE + 1 + 5);
        assert_eq!(c.gpr[3], 0x77);
    }
}

#[test]
fn sti_and_popfq_without_interrupts_stay_in_translated_code() {
    // A loop that enables and disables interrupts both ways (as spin_unlock_irq and
    // spin_unlock_irqrestore do): with nothing pending it runs as one chain, and ends as the
    // interpreter does.
    let mut rig = Rig::with_model(hv::CpuModel::portable_v3());
    let mut a = CodeAssembler::new(64).unwrap();
    let mut top = a.create_label();
    a.mov(ecx, 40).unwrap();
    a.set_label(&mut top).unwrap();
    a.cli().unwrap();
    a.add(rax, rcx).unwrap();
    a.sti().unwrap();
    a.db(&[0x0f, 0x1f, 0x44, 0x00, 0x00]).unwrap(); // the nop after a patched-in sti
    a.pushfq().unwrap();
    a.cli().unwrap();
    a.xor(rdx, rax).unwrap();
    a.popfq().unwrap();
    a.nop().unwrap();
    a.dec(ecx).unwrap();
    a.jne(top).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(CODE).unwrap();
    for seed in 1..6u64 {
        let mut c = irq_cpu(seed);
        c.rflags |= IF;
        rig.jit.clear();
        irq_memory(&rig, seed, &code, &mut c, None);
        rig.compare_in(&SYS, "irq loop", copy(&c), copy(&c), 0, 4000);
        let mut a = copy(&c);
        irq_memory(&rig, seed, &code, &mut a, None);
        let before = rig.jit.stats;
        let n = run_jit(&mut rig, &mut a, 4000);
        assert_eq!(n, 1 + 40 * 11 + 1, "seed {seed}");
        assert_eq!(a.mp_state, MpState::Halted);
        let entries = rig.jit.stats.entries - before.entries;
        assert!(entries <= 3, "seed {seed}: {entries} entries for 40 rounds");
    }
}
