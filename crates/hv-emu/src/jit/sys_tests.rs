//! Translated system instructions and scalar extensions against the interpreter, one form at
//! a time on random states, and the cases that must leave to the interpreter (#GP, #UD,
//! misaligned `cmpxchg16b`, a model without BMI) or wait for the run loop (the STI shadow).

use iced_x86::code_asm::*;
use iced_x86::{Decoder, DecoderOptions};
use vm_memory::{Bytes, GuestAddress};

use super::super::{Kind, classify_for};
use crate::cpu::{AF, CF, Cpu, DF, IF, IOPL, OF, PF, SF, ZF};
use crate::decode::BlockCache;
use crate::exec::Exec;
use crate::jit::Jit;
use crate::mmu::Ram;
use crate::testutil::Rng;
use crate::vcpu::NoIo;
use crate::vm::VmShared;
use hv::MpState;

const MEM: usize = 1 << 17;
const CODE: u64 = 0x1000;
const AC: u64 = 1 << 18;

struct Rig {
    m1: hv::GuestMemory,
    m2: hv::GuestMemory,
    vm: VmShared,
    jit: Jit,
}

#[derive(Debug, PartialEq)]
enum Ran {
    Translated,
    Interpreted,
}

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

fn copy(c: &Cpu) -> Cpu {
    let mut d = Cpu::new(0);
    d.gpr = c.gpr;
    d.rip = c.rip;
    d.rflags = c.rflags;
    d.seg = c.seg;
    d.cr0 = c.cr0;
    d.cr4 = c.cr4;
    d.efer = c.efer;
    d.cpl = c.cpl;
    d.msr.kernel_gs_base = c.msr.kernel_gs_base;
    d.deliver_exceptions = c.deliver_exceptions;
    d.gdt = c.gdt;
    d.idt = c.idt;
    d.irq_check = c.irq_check;
    d
}

impl Rig {
    fn new(model: hv::CpuModel) -> Rig {
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

    fn load(&self, seed: u64, code: &[u8]) {
        let fill: Vec<u8> = (0..MEM / 8)
            .flat_map(|k| (k as u64).wrapping_mul(seed | 1).to_le_bytes())
            .collect();
        for m in [&self.m1, &self.m2] {
            m.write_slice(&fill, GuestAddress(0)).unwrap();
            m.write_slice(code, GuestAddress(CODE)).unwrap();
        }
    }

    fn write(&self, at: u64, bytes: &[u8]) {
        for m in [&self.m1, &self.m2] {
            m.write_slice(bytes, GuestAddress(at)).unwrap();
        }
    }

    /// Runs `budget` instructions from `a` with the translator and from `b` with the
    /// interpreter (`run_batch`, the reference run loop, so interrupts and shadows are
    /// handled the same way), compares everything, says how the translator ran.
    fn compare(&mut self, ctx: &str, mut a: Cpu, mut b: Cpu, undefined: u64, budget: u32) -> Ran {
        let exits = self.jit.stats.exits_to_interp;
        let before = self.jit.stats.run;
        let ra = {
            let ram = Ram::new(&self.m1);
            let mut ex = Exec {
                cpu: &mut a,
                mem: &self.m1,
                ram: &ram,
                io: &NoIo,
                vm: &self.vm,
                lapic_enabled: false,
            };
            let mut blocks = BlockCache::new();
            ex.run_batch_jit(&mut self.jit, &mut blocks, budget, false)
        };
        let steps = ra.as_ref().map_or(budget, |r| r.0);
        let rb = {
            let ram = Ram::new(&self.m2);
            let mut ex = Exec {
                cpu: &mut b,
                mem: &self.m2,
                ram: &ram,
                io: &NoIo,
                vm: &self.vm,
                lapic_enabled: false,
            };
            let mut r = Ok(());
            for _ in 0..steps {
                if ex.cpu.irq_check {
                    r = ex.try_inject();
                }
                if r.is_err() || ex.cpu.mp_state != MpState::Runnable {
                    break;
                }
                r = ex.step();
                if r.is_err() || ex.cpu.reported.is_some() || ex.cpu.mp_state != MpState::Runnable {
                    break;
                }
            }
            r
        };
        assert_eq!(ra.is_ok(), rb.is_ok(), "{ctx}: {ra:?} vs {rb:?}");
        let mut x = vec![0u8; MEM];
        let mut y = vec![0u8; MEM];
        self.m1.read_slice(&mut x, GuestAddress(0)).unwrap();
        self.m2.read_slice(&mut y, GuestAddress(0)).unwrap();
        if let Some(k) = (0..MEM).find(|&k| x[k] != y[k]) {
            panic!("{ctx}: memory at {k:#x}: {:#x} vs {:#x}", x[k], y[k]);
        }
        assert_eq!(a.reported, b.reported, "{ctx}: exception");
        assert_eq!(a.gpr, b.gpr, "{ctx}: registers");
        assert_eq!(
            a.rflags & !undefined,
            b.rflags & !undefined,
            "{ctx}: flags {:#x} vs {:#x}",
            a.rflags,
            b.rflags
        );
        assert_eq!(a.rip, b.rip, "{ctx}: rip");
        assert_eq!(a.seg, b.seg, "{ctx}: segments");
        assert_eq!(
            a.msr.kernel_gs_base, b.msr.kernel_gs_base,
            "{ctx}: kernel gs base"
        );
        assert_eq!(a.shadow, b.shadow, "{ctx}: interrupt shadow");
        assert_eq!(a.irq_check, b.irq_check, "{ctx}: irq_check");
        assert_eq!(a.mp_state, b.mp_state, "{ctx}: run state");
        if self.jit.stats.exits_to_interp == exits && self.jit.stats.run > before {
            Ran::Translated
        } else {
            Ran::Interpreted
        }
    }

    /// Three runs of `code` from `c` (the first two fill the soft TLB: an instruction may
    /// touch two pages); how the last went.
    fn run(&mut self, name: &str, code: &[u8], c: &Cpu, seed: u64, undefined: u64) -> Ran {
        self.jit.clear();
        for _ in 0..2 {
            self.load(seed, code);
            self.compare(name, copy(c), copy(c), undefined, 1);
        }
        self.load(seed, code);
        self.compare(name, copy(c), copy(c), undefined, 1)
    }
}

fn code_of(f: impl Fn(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    a.hlt().unwrap();
    a.assemble(CODE).unwrap()
}

fn first(code: &[u8]) -> iced_x86::Instruction {
    Decoder::with_ip(64, code, CODE, DecoderOptions::NONE).decode()
}

fn undefined_of(i: &iced_x86::Instruction) -> u64 {
    use iced_x86::RflagsBits as F;
    let r = i.rflags_undefined();
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
    let mut rig = Rig::new(hv::CpuModel::portable_v3());
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
            if rig.run(name, &code, &c, seed, undefined_of(&i)) == Ran::Translated {
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
    let mut rig = Rig::new(hv::CpuModel::portable_v3());
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
            rig.load(seed, &code);
            let mut q = [0u8; 16];
            rig.m1.read_slice(&mut q, GuestAddress(a)).unwrap();
            c.gpr[0] = u64::from_le_bytes(q[..8].try_into().unwrap());
            c.gpr[2] = u64::from_le_bytes(q[8..].try_into().unwrap());
        }
        assert_eq!(rig.run("cmpxchg16b", &code, &c, seed, 0), Ran::Translated);
    }
    // Misaligned: #GP(0) from the interpreter.
    let mut c = cpu(3);
    c.gpr[6] = (c.gpr[6] & !15) + 8;
    assert_eq!(
        rig.run("cmpxchg16b misaligned", &code, &c, 3, 0),
        Ran::Interpreted
    );
}

#[test]
fn privileged_and_gated_cases_leave_to_the_interpreter() {
    let mut rig = Rig::new(hv::CpuModel::portable_v3());
    let user = |seed: u64, iopl: u64| {
        let mut c = cpu(seed);
        c.cpl = 3;
        c.seg[crate::cpu::CS].dpl = 3;
        c.rflags = (c.rflags & !IOPL) | (iopl << 12);
        c
    };
    // CLI/STI at CPL 3 with IOPL 0: #GP; with IOPL 3 they run translated.
    for (name, code) in [("cli", code_of(|a| a.cli())), ("sti", code_of(|a| a.sti()))] {
        let r = rig.run(name, &code, &user(5, 0), 5, 0);
        assert_eq!(r, Ran::Interpreted, "{name} at CPL 3, IOPL 0");
        let r = rig.run(name, &code, &user(5, 3), 5, 0);
        assert_eq!(r, Ran::Translated, "{name} at CPL 3, IOPL 3");
    }
    // POPF at CPL 3 keeps IOPL and (IOPL 0) IF.
    let code = code_of(|a| a.popfq());
    for seed in 1..16 {
        assert_eq!(
            rig.run("popfq cpl3", &code, &user(seed, seed % 4), seed, 0),
            Ran::Translated
        );
    }
    // SWAPGS at CPL 3: #GP.
    let code = code_of(|a| a.swapgs());
    assert_eq!(
        rig.run("swapgs cpl3", &code, &user(9, 3), 9, 0),
        Ran::Interpreted
    );
    // FSGSBASE with CR4.FSGSBASE clear: #UD.
    let code = code_of(|a| a.rdgsbase(rax));
    let mut c = cpu(11);
    c.cr4 &= !(1 << 16);
    assert_eq!(rig.run("rdgsbase cr4", &code, &c, 11, 0), Ran::Interpreted);
    // A non-canonical base: #GP.
    let code = code_of(|a| a.wrfsbase(rcx));
    let mut c = cpu(12);
    c.gpr[1] = 0x8000_0000_0000_0000;
    assert_eq!(
        rig.run("wrfsbase non-canonical", &code, &c, 12, 0),
        Ran::Interpreted
    );
    assert_eq!(c.reported, None);
}

#[test]
fn extensions_follow_the_model() {
    // The v2 model has no BMI1/ABM/BMI2/MOVBE/ADX: not translated; tzcnt/lzcnt run as
    // bsf/bsr and the others raise #UD in the interpreter.
    let mut rig = Rig::new(hv::CpuModel::portable());
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
            rig.run(name, &code, &c, 21, undefined_of(&i)),
            Ran::Interpreted,
            "{name}"
        );
    }
}

#[test]
fn one_vcpu_only_for_cmpxchg16b() {
    let mut rig = Rig::new(hv::CpuModel::portable_v3());
    rig.vm = VmShared::new(hv::CpuModel::portable_v3(), 2, 1_000_000, MEM as u64);
    let code = code_of(|a| a.cmpxchg16b(xmmword_ptr(rsi)));
    let mut c = cpu(4);
    c.gpr[6] &= !15;
    assert_eq!(rig.run("cmpxchg16b smp", &code, &c, 4, 0), Ran::Interpreted);
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
    let mut rig = Rig::new(hv::CpuModel::portable_v3());
    // sti; mov eax, 1; mov ebx, 2; hlt — with an interrupt pending and IF clear.
    let code = code_of(|a| {
        a.sti()?;
        a.mov(eax, 1)?;
        a.mov(ebx, 2)
    });
    let handler = 0x2000u64;
    for seed in 1..6u64 {
        rig.jit.clear();
        rig.load(seed, &code);
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
        let ran = rig.compare("sti shadow", a, b, 0, 16);
        assert_eq!(ran, Ran::Translated);
        // Check the translated side's outcome directly too.
        let mut a = copy(&c);
        a.lapic.set_irr(0x40, false);
        let ram = Ram::new(&rig.m1);
        rig.load(seed, &code);
        rig.write(handler, &[0xf4]);
        tables(&rig, &mut a, handler);
        let mut ex = Exec {
            cpu: &mut a,
            mem: &rig.m1,
            ram: &ram,
            io: &NoIo,
            vm: &rig.vm,
            lapic_enabled: false,
        };
        let mut blocks = BlockCache::new();
        ex.run_batch_jit(&mut rig.jit, &mut blocks, 16, false)
            .unwrap();
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
    let mut rig = Rig::new(hv::CpuModel::portable_v3());
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
                rig.load(seed, &code);
                let bytes: Vec<u8> = gdt.iter().flat_map(|q| q.to_le_bytes()).collect();
                rig.write(0xa000, &bytes);
                iret_frame(&rig, &c, frame);
                last = rig.compare(name, copy(&c), copy(&c), 0, 1);
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
    let mut rig = Rig::new(hv::CpuModel::portable_v3());
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
                rig.load(seed, code);
                rig.compare(name, copy(&c), copy(&c), 0, *n);
            }
        }
    }
}
