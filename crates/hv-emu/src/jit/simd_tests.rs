//! Translated vector instructions against the interpreter, one form at a time, on random
//! register files, memory, MXCSR rounding modes; and the cases that must leave to the
//! interpreter (#GP, #NM, #UD, #XM).

use iced_x86::code_asm::*;
use iced_x86::{Decoder, DecoderOptions};
use vm_memory::{Bytes, GuestAddress};

use super::super::classify;
use crate::cpu::Cpu;
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
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;

struct Rig {
    m1: hv::GuestMemory,
    m2: hv::GuestMemory,
    vm: VmShared,
    jit: Jit,
}

/// How a comparison went on the translator's side.
#[derive(Debug, PartialEq)]
enum Ran {
    /// All of it as translated code.
    Translated,
    /// The interpreter ran the instruction (an exit before it).
    Interpreted,
}

fn cpu(seed: u64) -> Cpu {
    let mut rng = Rng(seed | 1);
    let mut c = crate::testutil::cpu64(&mut rng, 0x3000, 0x6000, 32);
    c.cr4 |= CR4_OSFXSR | CR4_OSXMMEXCPT | crate::avx::CR4_OSXSAVE;
    c.xcr0 = 7;
    c.deliver_exceptions = false;
    for k in 0..16 {
        let mut v = || u128::from(rng.next()) | (u128::from(rng.next()) << 64);
        c.xmm[k] = v();
        c.ymm_hi[k] = v();
        // Some lanes of ordinary floats (random bits are mostly NaN/huge/tiny otherwise).
        if k % 3 == 0 {
            c.xmm[k] = 0x4049_0fdb_c000_0000_3ff8_0000_0000_0000 ^ (c.xmm[k] & 0xffff);
        }
    }
    c
}

trait Copy2 {
    fn copy(&self) -> Cpu;
}

impl Copy2 for Cpu {
    /// The state a test sets (`Cpu` itself is not `Clone`).
    fn copy(&self) -> Cpu {
        let mut c = Cpu::new(0);
        c.gpr = self.gpr;
        c.rip = self.rip;
        c.rflags = self.rflags;
        c.seg = self.seg;
        c.cr0 = self.cr0;
        c.cr4 = self.cr4;
        c.efer = self.efer;
        c.xmm = self.xmm;
        c.ymm_hi = self.ymm_hi;
        c.mxcsr = self.mxcsr;
        c.xcr0 = self.xcr0;
        c.cpl = self.cpl;
        c.deliver_exceptions = self.deliver_exceptions;
        c
    }
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

    /// Runs one instruction from `a` on the translator and from `b` (a copy) on the
    /// interpreter, compares everything, and says how the translator ran it.
    fn compare(&mut self, ctx: &str, a: Cpu, b: Cpu, undefined: u64) -> Ran {
        self.compare_n(ctx, a, b, undefined, 1)
    }

    /// [`Rig::compare`] for `budget` instructions (a translated block runs whole; the
    /// interpreter then runs as many as it did).
    fn compare_n(&mut self, ctx: &str, mut a: Cpu, mut b: Cpu, undefined: u64, budget: u32) -> Ran {
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
                r = ex.step();
                if r.is_err() || ex.cpu.reported.is_some() {
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
        for k in 0..16 {
            assert_eq!(
                (a.xmm[k], a.ymm_hi[k]),
                (b.xmm[k], b.ymm_hi[k]),
                "{ctx}: ymm{k} (jit vs interp)"
            );
        }
        assert_eq!(a.mxcsr, b.mxcsr, "{ctx}: mxcsr");
        assert_eq!(a.rflags & !undefined, b.rflags & !undefined, "{ctx}: flags");
        assert_eq!(a.rip, b.rip, "{ctx}: rip");
        assert_eq!(a.mp_state, MpState::Runnable);
        if self.jit.stats.exits_to_interp == exits && self.jit.stats.run > before {
            Ran::Translated
        } else {
            Ran::Interpreted
        }
    }
}

type Gen = Box<dyn Fn(&mut CodeAssembler) -> Result<(), IcedError>>;

/// Vector instruction forms; `fp` ones also run under random rounding modes, DAZ and FTZ.
fn templates() -> Vec<(String, Gen)> {
    let mut v: Vec<(String, Gen)> = Vec::new();
    macro_rules! t {
        ($($e:tt)*) => {
            v.push((stringify!($($e)*).to_string(), Box::new(|a: &mut CodeAssembler| { a.$($e)*?; Ok(()) })));
        };
    }
    // Legacy SSE integer and moves.
    t!(movdqa(xmm1, xmm2));
    t!(movdqa(xmm3, xmmword_ptr(rbx)));
    t!(movdqa(xmmword_ptr(rsi + 32), xmm4));
    t!(movdqu(xmm5, xmmword_ptr(rdi + 3)));
    t!(movdqu(xmmword_ptr(rbx + rcx + 1), xmm15));
    t!(movups(xmm8, xmmword_ptr(rsi + 5)));
    t!(movaps(xmmword_ptr(rbp), xmm9));
    t!(movapd(xmm2, xmm12));
    t!(movd(xmm1, eax));
    t!(movd(r9d, xmm2));
    t!(movq(xmm3, rdx));
    t!(movq(r10, xmm4));
    t!(movq(xmm5, qword_ptr(rbx + 7)));
    t!(movq(qword_ptr(rsi + 9), xmm6));
    t!(movq(xmm7, xmm8));
    t!(movd(dword_ptr(rdi + 2), xmm0));
    t!(movss(xmm1, xmm2));
    t!(movss(xmm1, dword_ptr(rbx + 1)));
    t!(movsd_2(xmm3, xmm4));
    t!(movsd_2(qword_ptr(rsi), xmm5));
    t!(movhps(xmm6, qword_ptr(rdi)));
    t!(movlps(qword_ptr(rbx + 4), xmm7));
    t!(movhlps(xmm1, xmm2));
    t!(movlhps(xmm3, xmm4));
    t!(pxor(xmm1, xmm2));
    t!(pxor(xmm3, xmmword_ptr(rsi)));
    t!(por(xmm4, xmm5));
    t!(pand(xmm6, xmm7));
    t!(pandn(xmm8, xmm9));
    t!(xorps(xmm10, xmm11));
    t!(andps(xmm1, xmmword_ptr(rdi)));
    t!(paddb(xmm1, xmm2));
    t!(paddd(xmm3, xmm4));
    t!(paddq(xmm5, xmmword_ptr(rbx)));
    t!(psubw(xmm6, xmm7));
    t!(pmulld(xmm1, xmm2));
    t!(pmuludq(xmm3, xmm4));
    t!(pmaddwd(xmm5, xmm6));
    t!(pcmpeqb(xmm1, xmm2));
    t!(pcmpeqd(xmm3, xmmword_ptr(rsi)));
    t!(pcmpgtb(xmm4, xmm5));
    t!(pminub(xmm6, xmm7));
    t!(pmaxsd(xmm8, xmm9));
    t!(pmovmskb(eax, xmm1));
    t!(pmovmskb(r11d, xmm14));
    t!(movmskps(ecx, xmm2));
    t!(pshufb(xmm1, xmm2));
    t!(pshufb(xmm3, xmmword_ptr(rbx)));
    t!(pshufd(xmm4, xmm5, 0x1b));
    t!(pshufd(xmm6, xmmword_ptr(rdi), 0xe4));
    t!(pshuflw(xmm7, xmm8, 0x39));
    t!(palignr(xmm1, xmm2, 5));
    t!(pslldq(xmm3, 3));
    t!(psrldq(xmm4, 9));
    t!(psllq(xmm5, 13));
    t!(psrld(xmm6, xmm7));
    t!(psraw(xmm8, 4));
    t!(punpcklbw(xmm1, xmm2));
    t!(punpckhqdq(xmm3, xmm4));
    t!(packuswb(xmm5, xmm6));
    t!(packssdw(xmm7, xmm8));
    t!(ptest(xmm1, xmm2));
    t!(ptest(xmm3, xmmword_ptr(rsi)));
    t!(pextrd(eax, xmm1, 2));
    t!(pextrq(r9, xmm2, 1));
    t!(pextrb(dword_ptr(rbx + 3), xmm3, 7));
    t!(pextrw(edx, xmm4, 5));
    t!(pinsrd(xmm5, ecx, 1));
    t!(pinsrq(xmm6, rdx, 0));
    t!(pinsrb(xmm7, byte_ptr(rsi + 1), 15));
    t!(pmovzxbw(xmm1, xmm2));
    t!(pmovsxdq(xmm3, qword_ptr(rdi + 1)));
    t!(pblendw(xmm4, xmm5, 0xa5));
    t!(pblendvb(xmm1, xmm2));
    t!(blendvps(xmm3, xmm4));
    t!(shufps(xmm5, xmm6, 0x4e));
    t!(unpcklps(xmm7, xmm8));
    t!(pcmpistri(xmm1, xmm2, 0x0c));
    t!(pcmpistri(xmm3, xmmword_ptr(rbx + 1), 0x1a));
    t!(pcmpestri(xmm4, xmm5, 0x08));
    t!(pcmpistrm(xmm6, xmm7, 0x40));
    t!(pcmpestrm(xmm8, xmmword_ptr(rsi), 0x44));
    t!(phminposuw(xmm1, xmm2));
    t!(psadbw(xmm3, xmm4));
    t!(lddqu(xmm5, xmmword_ptr(rdi + 7)));
    t!(movntdq(xmmword_ptr(rbx), xmm6));
    t!(insertps(xmm1, xmm2, 0x5c));
    t!(extractps(eax, xmm3, 2));
    // Crypto.
    t!(aesenc(xmm1, xmm2));
    t!(aesenclast(xmm3, xmmword_ptr(rsi)));
    t!(aesdec(xmm4, xmm5));
    t!(aesdeclast(xmm6, xmm7));
    t!(aesimc(xmm8, xmm9));
    t!(aeskeygenassist(xmm10, xmm11, 0x1b));
    t!(pclmulqdq(xmm1, xmm2, 0x11));
    t!(pclmulqdq(xmm3, xmmword_ptr(rdi), 0x01));
    t!(sha1rnds4(xmm1, xmm2, 3));
    t!(sha1nexte(xmm3, xmm4));
    t!(sha1msg1(xmm5, xmm6));
    t!(sha1msg2(xmm7, xmm8));
    t!(sha256rnds2(xmm1, xmm2));
    t!(sha256rnds2(xmm3, xmmword_ptr(rbx)));
    t!(sha256msg1(xmm4, xmm5));
    t!(sha256msg2(xmm6, xmm7));
    t!(crc32(eax, byte_ptr(rsi)));
    t!(crc32(r9d, ecx));
    t!(crc32(rdx, qword_ptr(rdi + 5)));
    // AVX / AVX2.
    t!(vpxor(xmm1, xmm2, xmm3));
    t!(vpxor(ymm1, ymm2, ymm3));
    t!(vpor(ymm4, ymm5, ymmword_ptr(rbx)));
    t!(vpand(ymm6, ymm6, ymm7));
    t!(vpaddd(ymm8, ymm9, ymm10));
    t!(vpaddq(xmm11, xmm12, xmmword_ptr(rsi + 4)));
    t!(vpsubb(ymm13, ymm14, ymm15));
    t!(vpcmpeqb(ymm1, ymm2, ymm3));
    t!(vpcmpeqb(ymm4, ymm0, ymmword_ptr(rdi + 1)));
    t!(vpminub(ymm5, ymm6, ymm7));
    t!(vpmovmskb(eax, ymm1));
    t!(vpmovmskb(ecx, xmm2));
    t!(vptest(ymm3, ymm4));
    t!(vpshufb(ymm5, ymm6, ymm7));
    t!(vpshufd(ymm8, ymm9, 0x93));
    t!(vpalignr(ymm1, ymm2, ymm3, 7));
    t!(vpermq(ymm4, ymm5, 0x4e));
    t!(vpermd(ymm6, ymm7, ymm8));
    t!(vperm2i128(ymm1, ymm2, ymm3, 0x21));
    t!(vpbroadcastb(ymm1, xmm2));
    t!(vpbroadcastd(ymm3, dword_ptr(rsi)));
    t!(vpbroadcastq(xmm4, xmm5));
    t!(vbroadcastss(ymm6, dword_ptr(rbx + 2)));
    t!(vinserti128(ymm1, ymm2, xmm3, 1));
    t!(vextracti128(xmm4, ymm5, 1));
    t!(vextracti128(xmmword_ptr(rdi), ymm6, 0));
    t!(vmovdqa(ymm1, ymmword_ptr(rbx)));
    t!(vmovdqa(xmmword_ptr(rsi), xmm2));
    t!(vmovdqu(ymm3, ymmword_ptr(rdi + 1)));
    t!(vmovdqu(ymmword_ptr(rbx + 5), ymm4));
    t!(vmovdqu(xmm5, xmm6));
    t!(vmovups(ymm7, ymm8));
    t!(vmovd(xmm1, eax));
    t!(vmovq(rdx, xmm2));
    t!(vpsllq(ymm3, ymm4, 7));
    t!(vpsrlvd(ymm5, ymm6, ymm7));
    t!(vpunpcklbw(ymm8, ymm9, ymm10));
    t!(vpackuswb(ymm1, ymm2, ymm3));
    t!(vpblendd(ymm4, ymm5, ymm6, 0x3c));
    t!(vpblendvb(ymm7, ymm8, ymm9, ymm10));
    t!(vpmovzxbw(ymm1, xmm2));
    t!(vpmaddubsw(ymm3, ymm4, ymm5));
    t!(vpandn(ymm6, ymm7, ymm8));
    t!(vpcmpgtq(ymm9, ymm10, ymm11));
    t!(vpminud(ymm12, ymm13, ymm14));
    t!(vpsadbw(ymm1, ymm2, ymm3));
    t!(vxorps(ymm4, ymm5, ymm6));
    t!(vshufps(ymm7, ymm8, ymm9, 0x1b));
    t!(vaesenc(xmm1, xmm2, xmm3));
    t!(vpclmulqdq(xmm4, xmm5, xmm6, 0x10));
    t!(vpcmpistri(xmm7, xmm8, 0x0c));
    // Floating point (MXCSR).
    t!(addps(xmm1, xmm2));
    t!(addsd(xmm3, qword_ptr(rsi)));
    t!(mulpd(xmm4, xmm5));
    t!(divss(xmm6, xmm7));
    t!(sqrtps(xmm8, xmm9));
    t!(minps(xmm1, xmm2));
    t!(maxsd(xmm3, xmm4));
    t!(cmpps(xmm5, xmm6, 1));
    t!(ucomisd(xmm7, xmm8));
    t!(comiss(xmm1, dword_ptr(rdi)));
    t!(cvtsi2sd(xmm2, rax));
    t!(cvttsd2si(ecx, xmm0));
    t!(cvtsd2si(rdx, xmm3));
    t!(cvtps2dq(xmm4, xmm5));
    t!(cvtdq2ps(xmm6, xmm7));
    t!(cvtss2sd(xmm8, xmm9));
    t!(roundps(xmm1, xmm2, 4));
    t!(haddps(xmm3, xmm4));
    t!(dpps(xmm5, xmm6, 0xf1));
    t!(vaddps(ymm1, ymm2, ymm3));
    t!(vmulsd(xmm4, xmm5, xmm6));
    t!(vdivpd(ymm7, ymm8, ymmword_ptr(rbx)));
    t!(vfmadd231ps(ymm1, ymm2, ymm3));
    t!(vfmadd213sd(xmm4, xmm5, xmm6));
    t!(vcvtph2ps(ymm7, xmm8));
    t!(vcvtps2ph(xmm9, ymm10, 0));
    t!(vsqrtps(ymm11, ymm12));
    t!(vcmpps(ymm1, ymm2, ymm3, 0x11));
    v
}

fn assemble(f: &Gen) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    a.hlt().unwrap();
    a.assemble(CODE).unwrap()
}

fn first(code: &[u8]) -> iced_x86::Instruction {
    Decoder::with_ip(64, code, CODE, DecoderOptions::NONE).decode()
}

/// Flags the instruction leaves undefined (masked in the comparison).
fn undefined(code: &[u8]) -> u64 {
    undefined_of(&first(code))
}

fn undefined_of(i: &iced_x86::Instruction) -> u64 {
    use crate::cpu::{AF, CF, OF, PF, SF, ZF};
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

#[test]
fn every_vector_form_matches_the_interpreter() {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut rig = Rig::new(hv::CpuModel::portable_v3());
    let list = templates();
    assert!(list.len() > 180, "{} templates", list.len());
    for (name, f) in &list {
        let code = assemble(f);
        let i = first(&code);
        assert_eq!(
            classify(&i),
            Some(super::Kind::Simd),
            "{name} is not translated"
        );
        let fp = !super::integer_like(i.mnemonic());
        rig.jit.clear();
        let mut translated = 0;
        for n in 0..48 {
            let seed = rng.next();
            rig.load(seed, &code);
            let mut c = cpu(seed);
            if fp && n % 2 == 1 {
                // Rounding control, DAZ, FTZ at random; every exception masked.
                c.mxcsr = 0x1f80 | (seed as u32 & 0xe040);
            }
            let undef = undefined(&code);
            if rig.compare(name, c.copy(), c, undef) == Ran::Translated {
                translated += 1;
            }
        }
        // TLB misses (first touch of a page) and page-crossing operands are interpreted.
        assert!(
            translated >= 24,
            "{name}: only {translated} of 48 runs translated"
        );
    }
}

/// One run of `code` from `c`; how the translator ran it.
fn run(rig: &mut Rig, code: &[u8], c: Cpu, name: &str) -> Ran {
    rig.load(7, code);
    rig.jit.clear();
    // Twice: the first run fills the soft TLB.
    rig.compare(name, c.copy(), c.copy(), 0);
    rig.load(7, code);
    rig.compare(name, c.copy(), c, 0)
}

fn code_of(f: impl Fn(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    a.hlt().unwrap();
    a.assemble(CODE).unwrap()
}

#[test]
fn misaligned_sse_operands_raise_gp_through_the_interpreter() {
    let mut rig = Rig::new(hv::CpuModel::portable_v3());
    let code = code_of(|a| a.movdqa(xmm1, xmmword_ptr(rbx + 8)));
    let c = cpu(3);
    assert_eq!(c.gpr[3] & 31, 0);
    assert_eq!(run(&mut rig, &code, c.copy(), "movdqa"), Ran::Interpreted);
    let mut c2 = c.copy();
    c2.gpr[3] += 8;
    assert_eq!(run(&mut rig, &code, c2, "movdqa aligned"), Ran::Translated);
    let code = code_of(|a| a.vmovdqa(ymm1, ymmword_ptr(rbx + 16)));
    assert_eq!(run(&mut rig, &code, c.copy(), "vmovdqa"), Ran::Interpreted);
    let code = code_of(|a| a.paddd(xmm1, xmmword_ptr(rbx + 4)));
    assert_eq!(run(&mut rig, &code, c.copy(), "paddd"), Ran::Interpreted);
    // Unaligned forms stay translated.
    let code = code_of(|a| a.movdqu(xmm1, xmmword_ptr(rbx + 4)));
    assert_eq!(run(&mut rig, &code, c.copy(), "movdqu"), Ran::Translated);
    // The #GP itself (compared with the interpreter inside `run`).
    let code = code_of(|a| a.movdqa(xmm1, xmmword_ptr(rbx + 8)));
    let mut a = c.copy();
    rig.load(7, &code);
    rig.jit.clear();
    rig.compare("movdqa #GP", c.copy(), c.copy(), 0);
    let ram = Ram::new(&rig.m1);
    let mut ex = Exec {
        cpu: &mut a,
        mem: &rig.m1,
        ram: &ram,
        io: &NoIo,
        vm: &rig.vm,
        lapic_enabled: false,
    };
    let mut blocks = BlockCache::new();
    ex.run_batch_jit(&mut rig.jit, &mut blocks, 1, false)
        .unwrap();
    assert_eq!(a.reported, Some((13, Some(0))));
}

#[test]
fn guest_control_state_and_model_gate_translated_vector_code() {
    let sse = code_of(|a| a.paddd(xmm1, xmm2));
    let avx = code_of(|a| a.vpaddd(ymm1, ymm2, ymm3));
    let sha = code_of(|a| a.sha256msg1(xmm1, xmm2));
    let mut rig = Rig::new(hv::CpuModel::portable_v3());
    assert_eq!(run(&mut rig, &sse, cpu(5), "paddd"), Ran::Translated);
    assert_eq!(run(&mut rig, &avx, cpu(5), "vpaddd"), Ran::Translated);
    // CR0.TS: #NM from the interpreter.
    for code in [&sse, &avx, &sha] {
        let mut c = cpu(5);
        c.cr0 |= crate::cpu::CR0_TS;
        assert_eq!(run(&mut rig, code, c.copy(), "TS"), Ran::Interpreted);
        let mut a = c;
        let ram = Ram::new(&rig.m1);
        let mut ex = Exec {
            cpu: &mut a,
            mem: &rig.m1,
            ram: &ram,
            io: &NoIo,
            vm: &rig.vm,
            lapic_enabled: false,
        };
        ex.run_batch_jit(&mut rig.jit, &mut BlockCache::new(), 1, false)
            .unwrap();
        assert_eq!(a.reported, Some((7, None)));
    }
    // CR4.OSFXSR clear: SSE is #UD; XCR0 without AVX: VEX is #UD.
    let mut c = cpu(5);
    c.cr4 &= !CR4_OSFXSR;
    assert_eq!(run(&mut rig, &sse, c, "OSFXSR"), Ran::Interpreted);
    let mut c = cpu(5);
    c.xcr0 = 3;
    assert_eq!(run(&mut rig, &avx, c, "XCR0"), Ran::Interpreted);
    assert_eq!(
        run(&mut rig, &sse, cpu(5), "paddd, XCR0=3"),
        Ran::Translated
    );
    // A model without AVX/SHA (portable, x86-64-v2): the interpreter raises #UD.
    let mut rig = Rig::new(hv::CpuModel::portable());
    assert_eq!(run(&mut rig, &sse, cpu(5), "paddd on v2"), Ran::Translated);
    for (code, name) in [(&avx, "vpaddd on v2"), (&sha, "sha256msg1 on v2")] {
        assert_eq!(run(&mut rig, code, cpu(5), name), Ran::Interpreted);
        let mut a = cpu(5);
        let ram = Ram::new(&rig.m1);
        let mut ex = Exec {
            cpu: &mut a,
            mem: &rig.m1,
            ram: &ram,
            io: &NoIo,
            vm: &rig.vm,
            lapic_enabled: false,
        };
        ex.run_batch_jit(&mut rig.jit, &mut BlockCache::new(), 1, false)
            .unwrap();
        assert_eq!(a.reported, Some((6, None)), "{name}");
    }
}

#[test]
fn unmasked_fp_exceptions_are_raised_by_the_interpreter() {
    let mut rig = Rig::new(hv::CpuModel::portable_v3());
    let code = code_of(|a| a.divps(xmm1, xmm2));
    let mut c = cpu(9);
    c.xmm[1] = 0x3f80_0000_3f80_0000_3f80_0000_3f80_0000; // 1.0
    c.xmm[2] = 0;
    // Masked: translated, ZE and the infinities as the host computes them.
    let r = run(&mut rig, &code, c.copy(), "divps masked");
    assert_eq!(r, Ran::Translated);
    // Divide-by-zero unmasked: #XM from the interpreter, nothing written.
    c.mxcsr = 0x1f80 & !(1 << 9);
    assert_eq!(
        run(&mut rig, &code, c.copy(), "divps #XM"),
        Ran::Interpreted
    );
    let mut a = c;
    let ram = Ram::new(&rig.m1);
    let mut ex = Exec {
        cpu: &mut a,
        mem: &rig.m1,
        ram: &ram,
        io: &NoIo,
        vm: &rig.vm,
        lapic_enabled: false,
    };
    ex.run_batch_jit(&mut rig.jit, &mut BlockCache::new(), 1, false)
        .unwrap();
    assert_eq!(a.reported, Some((19, None)));
    // Integer forms do not care about MXCSR.
    let code = code_of(|a| a.paddd(xmm1, xmm2));
    assert_eq!(run(&mut rig, &code, a.copy(), "paddd"), Ran::Translated);
}

#[test]
fn rounding_modes_reach_translated_code() {
    let mut rig = Rig::new(hv::CpuModel::portable_v3());
    let code = code_of(|a| a.cvtsd2si(rax, xmm1));
    for (rc, want) in [(0, 2u64), (1, 1), (2, 2), (3, 1)] {
        let mut c = cpu(11);
        c.xmm[1] = u128::from(1.5f64.to_bits());
        c.mxcsr = 0x1f80 | (rc << 13);
        let mut a = c.copy();
        assert_eq!(run(&mut rig, &code, c, "cvtsd2si"), Ran::Translated);
        let ram = Ram::new(&rig.m1);
        let mut ex = Exec {
            cpu: &mut a,
            mem: &rig.m1,
            ram: &ram,
            io: &NoIo,
            vm: &rig.vm,
            lapic_enabled: false,
        };
        ex.run_batch_jit(&mut rig.jit, &mut BlockCache::new(), 1, false)
            .unwrap();
        assert_eq!(a.gpr[0], want, "rounding control {rc}");
        // Inexact: the sticky flag reaches the guest MXCSR.
        assert_eq!(a.mxcsr & 0x20, 0x20);
    }
}

#[test]
fn glue_encodings_decode_as_intended() {
    let mut b = Vec::new();
    super::vex_mem(&mut b, 1, 2, 0, 0x6f, 9, 0, crate::jit::asm::RBP, 0x90);
    super::vex_mem(&mut b, 3, 1, 1, 0x18, 9, 9, crate::jit::asm::R8, 0x90);
    b.push(1);
    super::vex_mem(&mut b, 1, 2, 0, 0x7f, 3, 0, crate::jit::asm::RBP, 0x30);
    super::vex_mem(&mut b, 3, 1, 1, 0x19, 15, 0, crate::jit::asm::R8, 0xf0);
    b.push(1);
    super::mxcsr_op(&mut b, 3, crate::jit::asm::R15, 0x1234);
    super::mxcsr_op(&mut b, 2, super::R11, 0);
    b.extend_from_slice(&[0xc4, 0xe2, 0xf2, 0xf5, 0xca]);
    let got: Vec<String> = Decoder::with_ip(64, &b, 0, DecoderOptions::NONE)
        .into_iter()
        .map(|i| {
            let regs: Vec<_> = (0..i.op_count())
                .filter(|&n| i.op_kind(n) == iced_x86::OpKind::Register)
                .map(|n| format!("{:?}", i.op_register(n)))
                .collect();
            format!(
                "{:?} {} [{:?}+{:#x}]",
                i.code(),
                regs.join(","),
                i.memory_base(),
                i.memory_displacement64()
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            "VEX_Vmovdqu_xmm_xmmm128 XMM9 [RBP+0x90]",
            "VEX_Vinsertf128_ymm_ymm_xmmm128_imm8 YMM9,YMM9 [R8+0x90]",
            "VEX_Vmovdqu_xmmm128_xmm XMM3 [RBP+0x30]",
            "VEX_Vextractf128_xmmm128_ymm_imm8 YMM15 [R8+0xf0]",
            "Stmxcsr_m32  [R15+0x1234]",
            "Ldmxcsr_m32  [R11+0x0]",
            "VEX_Pext_r64_r64_rm64 RCX,RCX,RDX [None+0x0]",
        ]
    );
}

#[test]
fn random_vector_blocks_match_the_interpreter() {
    // Legacy SSE and VEX forms mixed, so upper halves, MXCSR flags and RFLAGS (ptest,
    // comiss, pcmpistri) flow between translated instructions.
    let mut rng = Rng(0x0ddc_0ffe_e0dd_f00d);
    let mut rig = Rig::new(hv::CpuModel::portable_v3());
    let list = templates();
    let mut whole = 0;
    for n in 0..300 {
        let picks: Vec<usize> = (0..8).map(|_| rng.next() as usize % list.len()).collect();
        let mut a = CodeAssembler::new(64).unwrap();
        for &p in &picks {
            (list[p].1)(&mut a).unwrap();
        }
        a.hlt().unwrap();
        let code = a.assemble(CODE).unwrap();
        let names: Vec<&str> = picks.iter().map(|&p| list[p].0.as_str()).collect();
        // Flags left undefined by any instruction of the block are not compared.
        let undef = Decoder::with_ip(64, &code, CODE, DecoderOptions::NONE)
            .into_iter()
            .map(|i| undefined_of(&i))
            .fold(0, |x, y| x | y);
        let seed = rng.next();
        let mut c = cpu(seed);
        if n % 2 == 1 {
            c.mxcsr = 0x1f80 | (seed as u32 & 0xe040);
        }
        rig.jit.clear();
        for _ in 0..2 {
            rig.load(seed, &code);
            let r = rig.compare_n(&format!("{names:?}"), c.copy(), c.copy(), undef, 8);
            if r == Ran::Translated {
                whole += 1;
            }
        }
    }
    assert!(
        whole > 150,
        "only {whole} of 600 block runs translated whole"
    );
}
