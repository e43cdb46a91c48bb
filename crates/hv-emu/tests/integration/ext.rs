//! The scalar and crypto extensions of x86-64-v3 (BMI1, BMI2, LZCNT/TZCNT, MOVBE, ADX,
//! RDRAND/RDSEED, RDTSCP/RDPID, CLFLUSHOPT/CLWB, FSGSBASE, AES-NI, PCLMULQDQ, SHA-NI, TSX #UD),
//! their #UD under a model without them, and the policy that an instruction emu does not
//! implement raises #UD in the guest instead of ending the VM.

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use crate::common;

use common::*;
use hv::cpu_model::Feature;
use hv::{CpuModel, Hypervisor, InstructionEmulator, VcpuExit};
use iced_x86::code_asm::*;

const CF: u64 = 1;
const PF: u64 = 1 << 2;
const AF: u64 = 1 << 4;
const ZF: u64 = 1 << 6;
const SF: u64 = 1 << 7;
const OF: u64 = 1 << 11;
const STATUS: u64 = CF | PF | AF | ZF | SF | OF;

/// The x86-64-v3 model as far as emu implements it: `portable_v3`, or, while emu lacks the
/// AVX/XSAVE families, `portable_v3` without them.
fn v3() -> CpuModel {
    let m = CpuModel::portable_v3();
    if emu().check_cpu_model(&m).is_ok() {
        return m;
    }
    let mut m = m;
    use Feature::*;
    for f in [Avx, Avx2, Fma, F16c, Xsave, Xsaveopt, Xsavec, Xgetbv1] {
        let b = f.bit();
        for e in m
            .cpuid
            .iter_mut()
            .filter(|e| e.function == b.function && (!e.indexed || e.index == b.index))
        {
            let r = match b.reg {
                0 => &mut e.eax,
                1 => &mut e.ebx,
                2 => &mut e.ecx,
                _ => &mut e.edx,
            };
            *r &= !(1 << b.bit);
        }
    }
    m
}

fn guest(model: CpuModel, code: &[u8]) -> Guest {
    guest_with_model(&emu(), code, 1, Some(2_000_000), model)
}

/// Runs `code` (ending in `hlt`) under `model`; returns the registers and the exception the
/// IDT stubs recorded.
fn run(model: CpuModel, code: &[u8]) -> (hv::Registers, Option<(u8, u64)>, Guest) {
    let mut g = guest(model, code);
    assert_eq!(g.run(), VcpuExit::Halted);
    let r = g.regs();
    let e = g.exception();
    (r, e, g)
}

/// Runs on the v3 model and expects no exception.
fn run3(f: impl FnOnce(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>) -> hv::Registers {
    let (r, e, _) = run(v3(), &asm(f));
    assert_eq!(e, None, "unexpected exception at rip {:#x}", r.rip);
    r
}

fn flags(a: &mut CodeAssembler, to: AsmRegister64) -> Result<(), iced_x86::IcedError> {
    a.pushfq()?;
    a.pop(to)
}

/// Sets the status flags to `f`.
fn set_flags(a: &mut CodeAssembler, f: u64) -> Result<(), iced_x86::IcedError> {
    a.push(f as i32 | 2)?;
    a.popfq()
}

#[test]
fn tzcnt_lzcnt_with_zero_and_nonzero_inputs() {
    let r = run3(|a| {
        a.xor(eax, eax)?;
        a.mov(rbx, -1i64)?;
        a.tzcnt(ebx, eax)?; // 32, CF, upper half cleared
        flags(a, rsi)?;
        a.mov(rdx, 0x8u64)?;
        a.tzcnt(rcx, rdx)?; // 3
        flags(a, rdi)?;
        a.mov(r8, -1i64)?;
        a.tzcnt(r8w, ax)?; // 16, upper bits kept
        a.mov(edx, 1u32)?;
        a.lzcnt(r9d, edx)?; // 31
        a.lzcnt(r10, rax)?; // 64, CF
        flags(a, r11)?;
        a.mov(rdx, 0x8000_0000_0000_0000u64)?;
        a.lzcnt(r12, rdx)?; // 0, ZF
        flags(a, r13)?;
        a.mov(dx, 0x00ffu32)?;
        a.lzcnt(r14w, dx)?; // 8
        a.hlt()
    });
    assert_eq!(r.rbx, 32);
    assert_eq!(r.rsi & STATUS, CF);
    assert_eq!(r.rcx, 3);
    assert_eq!(r.rdi & STATUS, 0);
    assert_eq!(r.r8, 0xffff_ffff_ffff_0010);
    assert_eq!(r.r9, 31);
    assert_eq!(r.r10, 64);
    assert_eq!(r.r11 & STATUS, CF);
    assert_eq!(r.r12, 0);
    assert_eq!(r.r13 & STATUS, ZF);
    assert_eq!(r.r14 & 0xffff, 8);
}

#[test]
fn tzcnt_and_lzcnt_are_bsf_and_bsr_without_bmi1_and_abm() {
    let code = asm(|a| {
        a.xor(eax, eax)?;
        a.mov(rbx, 0x77u64)?;
        a.tzcnt(rbx, rax)?; // BSF of 0: destination unchanged, ZF
        flags(a, rsi)?;
        a.mov(edx, 1u32)?;
        a.lzcnt(ecx, edx)?; // BSR of 1: 0
        a.mov(edx, 0x100u32)?;
        a.tzcnt(edi, edx)?; // BSF: 8
        a.hlt()
    });
    let (r, e, _) = run(CpuModel::portable(), &code);
    assert_eq!(e, None);
    assert_eq!(r.rbx, 0x77);
    assert_ne!(r.rsi & ZF, 0);
    assert_eq!(r.rcx, 0);
    assert_eq!(r.rdi, 8);
}

#[test]
fn bextr_and_bzhi_with_indices_beyond_the_operand() {
    let r = run3(|a| {
        a.mov(ebx, 0x1234_5678u32)?;
        a.mov(ecx, 0x0804u32)?; // start 4, len 8
        a.bextr(eax, ebx, ecx)?; // 0x67
        a.mov(ecx, 0x0820u32)?; // start 32: 0
        a.bextr(edx, ebx, ecx)?;
        flags(a, rsi)?;
        a.mov(ecx, 0xff04u32)?; // len 255: everything from bit 4
        a.bextr(edi, ebx, ecx)?;
        a.mov(rbx, 0xf123_4567_89ab_cdefu64)?;
        a.mov(ecx, 0x083cu32)?; // start 60, len 8: the top nibble
        a.bextr(r8, rbx, rcx)?;
        a.mov(ecx, 8u32)?;
        a.bzhi(r9, rbx, rcx)?; // low byte, CF=0
        flags(a, r10)?;
        a.mov(ecx, 200u32)?;
        a.bzhi(r11, rbx, rcx)?; // index >= 64: source, CF=1
        flags(a, r12)?;
        a.mov(ecx, 0x120u32)?; // index byte 0x20 = 32 on a 32-bit operand: CF=1
        a.bzhi(r13d, ebx, ecx)?;
        flags(a, r14)?;
        a.xor(ecx, ecx)?;
        a.bzhi(r15, rbx, rcx)?; // 0, ZF
        flags(a, rbp)?;
        a.hlt()
    });
    assert_eq!(r.rax, 0x67);
    assert_eq!(r.rdx, 0);
    assert_eq!(r.rsi & (ZF | CF | OF), ZF);
    assert_eq!(r.rdi, 0x0123_4567);
    assert_eq!(r.r8, 0xf);
    assert_eq!(r.r9, 0xef);
    assert_eq!(r.r10 & (CF | ZF | SF | OF), 0);
    assert_eq!(r.r11, 0xf123_4567_89ab_cdef);
    assert_eq!(r.r12 & (CF | ZF | SF | OF), CF | SF);
    assert_eq!(r.r13, 0x89ab_cdef);
    assert_eq!(r.r14 & (CF | ZF | OF), CF);
    assert_eq!(r.r15, 0);
    assert_eq!(r.rbp & (CF | ZF | SF | OF), ZF);
}

/// Flags the SDM leaves undefined, as this Intel host sets them (found by `diff_ext`).
#[test]
fn undefined_flags_follow_the_intel_host() {
    let r = run3(|a| {
        set_flags(a, STATUS)?;
        a.mov(ecx, 0x8000_0000u32)?;
        a.mov(edx, 0x2000u32)?;
        a.bextr(eax, ecx, edx)?; // top bit set, yet SF clear
        flags(a, rbx)?;
        set_flags(a, STATUS)?;
        a.mov(ecx, 0x3u32)?;
        a.tzcnt(esi, ecx)?; // 0: ZF; OF SF AF PF clear
        flags(a, rdi)?;
        set_flags(a, STATUS)?;
        a.andn(r8d, edx, ecx)?; // 3: PF would be set from the result; cleared
        flags(a, r9)?;
        a.hlt()
    });
    assert_eq!(r.rax, 0x8000_0000);
    assert_eq!(r.rbx & STATUS, 0);
    assert_eq!(r.rdi & STATUS, ZF);
    assert_eq!(r.r8, 3);
    assert_eq!(r.r9 & STATUS, 0);
}

#[test]
fn andn_blsi_blsmsk_blsr_values_and_flags() {
    let r = run3(|a| {
        a.mov(rbx, 0xff00u64)?;
        a.mov(rcx, 0x0ff0u64)?;
        a.andn(rax, rbx, rcx)?; // 0x00f0
        a.xor(edx, edx)?;
        a.blsi(esi, edx)?; // 0, CF=0, ZF
        flags(a, rdi)?;
        a.mov(edx, 0b1100u32)?;
        a.blsi(r8d, edx)?; // 4, CF=1
        flags(a, r9)?;
        a.xor(edx, edx)?;
        a.blsmsk(r10d, edx)?; // all ones, CF=1, SF
        flags(a, r11)?;
        a.blsr(r12, rdx)?; // 0, CF=1, ZF
        flags(a, r13)?;
        a.mov(rdx, 0x8000_0000_0000_0100u64)?;
        a.blsr(r14, rdx)?; // 0x8000..., SF
        flags(a, r15)?;
        a.hlt()
    });
    assert_eq!(r.rax, 0xf0);
    assert_eq!(r.rsi, 0);
    assert_eq!(r.rdi & (CF | ZF | SF | OF), ZF);
    assert_eq!(r.r8, 4);
    assert_eq!(r.r9 & (CF | ZF | SF | OF), CF);
    assert_eq!(r.r10, 0xffff_ffff);
    assert_eq!(r.r11 & (CF | ZF | SF | OF), CF | SF);
    assert_eq!(r.r12, 0);
    assert_eq!(r.r13 & (CF | ZF | SF | OF), CF | ZF);
    assert_eq!(r.r14, 0x8000_0000_0000_0000);
    assert_eq!(r.r15 & (CF | ZF | SF | OF), SF);
}

#[test]
fn pdep_pext_with_all_ones_and_sparse_masks() {
    let r = run3(|a| {
        a.mov(rbx, 0x0123_4567_89ab_cdefu64)?;
        a.mov(rcx, -1i64)?;
        a.pdep(rax, rbx, rcx)?; // all-ones mask: the source
        a.pext(rdx, rbx, rcx)?; // the source
        a.mov(ecx, 0xf0f0u32)?;
        a.mov(ebx, 0b101u32)?;
        a.pdep(esi, ebx, ecx)?; // 0x50
        a.mov(ebx, 0xabcdu32)?;
        a.pext(edi, ebx, ecx)?; // 0xac
        a.mov(rcx, 0x8000_0000_0000_0001u64)?;
        a.mov(rbx, -1i64)?;
        a.pext(r8, rbx, rcx)?; // 0b11
        a.pdep(r9, rbx, rcx)?; // the mask
        a.mov(ecx, -1i32)?;
        a.mov(rbx, -1i64)?;
        a.pdep(r10d, ebx, ecx)?; // 32-bit: zero-extended
        a.xor(ecx, ecx)?;
        a.pext(r11, rbx, rcx)?; // empty mask: 0
        a.hlt()
    });
    assert_eq!(r.rax, 0x0123_4567_89ab_cdef);
    assert_eq!(r.rdx, 0x0123_4567_89ab_cdef);
    assert_eq!(r.rsi, 0x50);
    assert_eq!(r.rdi, 0xac);
    assert_eq!(r.r8, 3);
    assert_eq!(r.r9, 0x8000_0000_0000_0001);
    assert_eq!(r.r10, 0xffff_ffff);
    assert_eq!(r.r11, 0);
}

#[test]
fn mulx_rorx_and_shifts_leave_flags_alone() {
    let r = run3(|a| {
        set_flags(a, STATUS)?;
        a.mov(rdx, -1i64)?;
        a.mov(r10, -1i64)?;
        a.mulx(r8, r9, r10)?; // (2^64-1)^2: high 2^64-2, low 1
        flags(a, r11)?;
        set_flags(a, 0)?;
        a.mov(edx, 0x8000_0001u32)?;
        a.mov(ecx, 4u32)?;
        a.mulx(esi, edi, ecx)?; // high 2, low 4
        a.mov(ecx, 3u32)?;
        a.mulx(ebx, ebx, ecx)?; // same register: the high half (1)
        flags(a, r12)?;
        a.mov(rax, 0x0123_4567_89ab_cdefu64)?;
        a.rorx(r13, rax, 68)?; // count masked to 4
        a.mov(ecx, 33u32)?;
        a.shlx(r14d, eax, ecx)?; // count 33 masked to 1
        a.mov(rcx, 0x8000_0000_0000_0000u64)?;
        a.mov(edx, 127u32)?;
        a.sarx(r15, rcx, rdx)?; // 63: all ones
        a.shrx(rbp, rcx, rdx)?; // 1
        flags(a, rax)?;
        a.hlt()
    });
    assert_eq!((r.r8, r.r9), (0xffff_ffff_ffff_fffe, 1));
    assert_eq!(r.r11 & STATUS, STATUS, "mulx changed flags");
    assert_eq!((r.rsi, r.rdi), (2, 4));
    assert_eq!(r.rbx, 1);
    assert_eq!(r.r12 & STATUS, 0, "mulx changed flags");
    assert_eq!(r.r13, 0xf012_3456_789a_bcde);
    assert_eq!(r.r14, 0x1357_9bde);
    assert_eq!(r.r15, u64::MAX);
    assert_eq!(r.rbp, 1);
    assert_eq!(r.rax & STATUS, 0);
}

#[test]
fn adcx_adox_carry_chains_are_independent() {
    let r = run3(|a| {
        a.mov(rax, -1i64)?;
        a.xor(ebx, ebx)?;
        set_flags(a, CF | ZF | SF)?; // CF in, OF clear
        a.adcx(rax, rbx)?; // -1 + 0 + 1 = 0, CF out
        a.mov(rcx, 5u64)?;
        a.adox(rcx, rbx)?; // 5 + 0 + OF(0) = 5, OF stays 0
        flags(a, rsi)?;
        a.mov(rdx, -1i64)?;
        a.mov(edi, 1u32)?;
        a.adox(rdx, rdi)?; // -1 + 1 = 0, OF out
        a.mov(r8, 10u64)?;
        a.adox(r8, rbx)?; // 10 + 0 + OF = 11, OF clear
        a.mov(r9d, -1i32)?;
        a.adcx(r9d, ebx)?; // 32-bit: 0xffffffff + 0 + CF(1) = 0, CF
        flags(a, r10)?;
        a.hlt()
    });
    assert_eq!(r.rax, 0);
    assert_eq!(r.rcx, 5);
    assert_eq!(r.rsi & STATUS, CF | ZF | SF, "only CF/OF may change");
    assert_eq!(r.rdx, 0);
    assert_eq!(r.r8, 11);
    assert_eq!(r.r9, 0);
    assert_eq!(r.r10 & STATUS, CF | ZF | SF);
}

#[test]
fn movbe_loads_and_stores_every_size() {
    let r = run3(|a| {
        a.mov(rsi, DATA)?;
        a.mov(rax, 0x0102_0304_0506_0708u64)?;
        a.movbe(qword_ptr(rsi), rax)?;
        a.mov(rbx, qword_ptr(rsi))?; // swapped in memory
        a.movbe(ecx, dword_ptr(rsi))?; // bytes 01 02 03 04 read big-endian
        a.mov(rdx, -1i64)?;
        a.movbe(dx, word_ptr(rsi))?; // bytes 01 02, upper bits kept
        a.mov(edi, 0xaabbu32)?;
        a.movbe(word_ptr(rsi + 8), di)?;
        a.movzx(r8d, word_ptr(rsi + 8))?;
        a.movbe(r9, qword_ptr(rsi))?;
        a.hlt()
    });
    assert_eq!(r.rbx, 0x0807_0605_0403_0201);
    assert_eq!(r.rcx, 0x0102_0304);
    assert_eq!(r.rdx, 0xffff_ffff_ffff_0102);
    assert_eq!(r.r8, 0xbbaa);
    assert_eq!(r.r9, 0x0102_0304_0506_0708);
}

#[test]
fn rdrand_and_rdseed_set_cf_for_every_size() {
    let r = run3(|a| {
        set_flags(a, ZF | OF | SF)?;
        a.rdrand(rax)?;
        flags(a, rsi)?;
        a.rdrand(rbx)?;
        a.mov(rcx, -1i64)?;
        a.rdseed(cx)?; // upper 48 bits kept
        flags(a, rdi)?;
        a.mov(rdx, -1i64)?;
        a.rdrand(edx)?; // upper half cleared
        a.hlt()
    });
    assert_eq!(r.rsi & STATUS, CF);
    assert_eq!(r.rdi & STATUS, CF);
    assert_ne!(r.rax, r.rbx, "two 64-bit random values are equal");
    assert_eq!(r.rcx >> 16, 0xffff_ffff_ffff);
    assert_eq!(r.rdx >> 32, 0);
}

const TSC_AUX: u32 = 0xc000_0103;

#[test]
fn rdtscp_and_rdpid_read_tsc_aux() {
    let r = run3(|a| {
        a.mov(ecx, TSC_AUX)?;
        a.mov(eax, 0x42u32)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.rdtsc()?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        a.mov(r8, rax)?;
        a.mov(rcx, -1i64)?;
        a.rdtscp()?;
        a.mov(r9, rcx)?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        a.mov(r10, rax)?;
        a.rdpid(r11)?;
        a.mov(ecx, TSC_AUX)?;
        a.rdmsr()?;
        a.mov(r12, rax)?;
        a.hlt()
    });
    assert_eq!(r.r9, 0x42);
    assert!(
        r.r10 >= r.r8,
        "rdtscp {:#x} before rdtsc {:#x}",
        r.r10,
        r.r8
    );
    assert_eq!(r.r11, 0x42);
    assert_eq!(r.r12, 0x42);
    // Bits 63:32 of IA32_TSC_AUX are reserved.
    let code = asm(|a| {
        a.mov(ecx, TSC_AUX)?;
        a.mov(edx, 1u32)?;
        a.wrmsr()?;
        a.hlt()
    });
    let (_, e, _) = run(v3(), &code);
    assert_eq!(e, Some((13, 0)));
    // The model's state includes it.
    let mut g = guest(v3(), &asm(|a| a.hlt()));
    let mut st = g.state();
    st.set_msr(TSC_AUX, 7);
    g.set_state(&st);
    assert_eq!(g.state().msr(TSC_AUX), Some(7));
}

#[test]
fn cache_line_instructions_check_the_address() {
    let r = run3(|a| {
        a.mov(rsi, DATA)?;
        a.clflush(byte_ptr(rsi))?;
        a.clflushopt(byte_ptr(rsi + 1))?;
        a.clwb(byte_ptr(rsi + 2))?;
        a.mov(eax, 1u32)?;
        a.hlt()
    });
    assert_eq!(r.rax, 1);
    for (addr, want) in [
        (0x8000_0000_0000u64, (13, 0)), // non-canonical
        (0x4000_0000, (14, 0)),         // not mapped: read, not present, supervisor
    ] {
        for op in 0..3 {
            let code = asm(|a| {
                a.mov(rsi, addr)?;
                match op {
                    0 => a.clflush(byte_ptr(rsi))?,
                    1 => a.clflushopt(byte_ptr(rsi))?,
                    _ => a.clwb(byte_ptr(rsi))?,
                }
                a.hlt()
            });
            let (_, e, _) = run(v3(), &code);
            assert_eq!(e, Some(want), "op {op} at {addr:#x}");
        }
    }
}

#[test]
fn fsgsbase_needs_cr4_fsgsbase() {
    // CR4.FSGSBASE clear: #UD.
    let (_, e, _) = run(
        v3(),
        &asm(|a| {
            a.rdfsbase(rax)?;
            a.hlt()
        }),
    );
    assert_eq!(e, Some((6, 0)));
    let r = run3(|a| {
        a.mov(rax, cr4)?;
        a.or(eax, 1 << 16)?;
        a.mov(cr4, rax)?;
        a.mov(rax, DATA - 0x10)?;
        a.wrfsbase(rax)?;
        a.mov(rsi, 0x1122_3344_5566_7788u64)?;
        a.mov(qword_ptr(DATA), rsi)?;
        a.mov(rbx, qword_ptr(0x10).fs())?;
        a.rdfsbase(rcx)?;
        a.mov(rdx, -1i64)?;
        a.wrgsbase(rdx)?; // canonical
        a.rdgsbase(edi)?; // 32-bit read: zero-extended low half
        a.mov(r8d, 0x1234u32)?;
        a.wrgsbase(r8d)?;
        a.rdgsbase(r9)?;
        a.hlt()
    });
    assert_eq!(r.rbx, 0x1122_3344_5566_7788);
    assert_eq!(r.rcx, DATA - 0x10);
    assert_eq!(r.rdi, 0xffff_ffff);
    assert_eq!(r.r9, 0x1234);
    // A non-canonical base: #GP(0).
    let (_, e, _) = run(
        v3(),
        &asm(|a| {
            a.mov(rax, cr4)?;
            a.or(eax, 1 << 16)?;
            a.mov(cr4, rax)?;
            a.mov(rax, 0x8000_0000_0000u64)?;
            a.wrgsbase(rax)?;
            a.hlt()
        }),
    );
    assert_eq!(e, Some((13, 0)));
    // Without FSGSBASE in the model, CR4.FSGSBASE cannot be set.
    let (_, e, _) = run(
        CpuModel::portable(),
        &asm(|a| {
            a.mov(rax, cr4)?;
            a.or(eax, 1 << 16)?;
            a.mov(cr4, rax)?;
            a.hlt()
        }),
    );
    assert_eq!(e, Some((13, 0)));
}

fn read_u128(g: &Guest, a: u64) -> u128 {
    u128::from(g.read_u64(a)) | u128::from(g.read_u64(a + 8)) << 64
}

fn write_u128(g: &Guest, a: u64, v: u128) {
    g.write_u64(a, v as u64);
    g.write_u64(a + 8, (v >> 64) as u64);
}

fn hex128(s: &str) -> u128 {
    let b: Vec<u8> = (0..16)
        .map(|k| u8::from_str_radix(&s[2 * k..2 * k + 2], 16).unwrap())
        .collect();
    u128::from_le_bytes(b.try_into().unwrap())
}

/// FIPS-197 appendix C.1 (AES-128): key expansion with AESKEYGENASSIST, encryption with
/// AESENC/AESENCLAST (register and memory forms), decryption with AESIMC/AESDEC/AESDECLAST.
#[test]
fn aes128_fips_197_in_the_guest() {
    const KEYS: u64 = DATA + 0x100;
    const OUT: u64 = DATA + 0x300;
    const RCON: [u32; 10] = [1, 2, 4, 8, 0x10, 0x20, 0x40, 0x80, 0x1b, 0x36];
    let code = asm(|a| {
        a.movdqa(xmm1, xmmword_ptr(DATA))?;
        a.movdqa(xmmword_ptr(KEYS), xmm1)?;
        a.movdqa(xmm0, xmmword_ptr(DATA + 16))?;
        a.pxor(xmm0, xmm1)?;
        for r in 1..=10u64 {
            a.aeskeygenassist(xmm2, xmm1, RCON[r as usize - 1])?;
            a.pshufd(xmm2, xmm2, 0xff)?;
            a.movdqa(xmm3, xmm1)?;
            for _ in 0..3 {
                a.pslldq(xmm3, 4)?;
                a.pxor(xmm1, xmm3)?;
            }
            a.pxor(xmm1, xmm2)?;
            a.movdqa(xmmword_ptr(KEYS + 16 * r), xmm1)?;
            match (r, r % 2) {
                (10, _) => a.aesenclast(xmm0, xmm1)?,
                (_, 0) => a.aesenc(xmm0, xmm1)?,
                _ => a.aesenc(xmm0, xmmword_ptr(KEYS + 16 * r))?,
            }
        }
        a.movdqa(xmmword_ptr(OUT), xmm0)?;
        a.pxor(xmm0, xmmword_ptr(KEYS + 160))?;
        for r in (1..10u64).rev() {
            if r % 2 == 0 {
                a.aesimc(xmm4, xmmword_ptr(KEYS + 16 * r))?;
            } else {
                a.movdqa(xmm4, xmmword_ptr(KEYS + 16 * r))?;
                a.aesimc(xmm4, xmm4)?;
            }
            a.aesdec(xmm0, xmm4)?;
        }
        a.aesdeclast(xmm0, xmmword_ptr(KEYS))?;
        a.movdqa(xmmword_ptr(OUT + 16), xmm0)?;
        a.hlt()
    });
    let mut g = guest(v3(), &code);
    write_u128(&g, DATA, hex128("000102030405060708090a0b0c0d0e0f"));
    write_u128(&g, DATA + 16, hex128("00112233445566778899aabbccddeeff"));
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(g.exception(), None);
    assert_eq!(
        read_u128(&g, KEYS + 160),
        hex128("13111d7fe3944a17f307a78b4d2b30c5")
    );
    assert_eq!(
        read_u128(&g, OUT),
        hex128("69c4e0d86a7b0430d8cdb78070b4c55a")
    );
    assert_eq!(
        read_u128(&g, OUT + 16),
        hex128("00112233445566778899aabbccddeeff")
    );
}

#[test]
fn crypto_memory_operands_must_be_aligned() {
    for op in 0..3 {
        let code = asm(|a| {
            match op {
                0 => a.aesenc(xmm0, xmmword_ptr(DATA + 8))?,
                1 => a.pclmulqdq(xmm0, xmmword_ptr(DATA + 8), 0)?,
                _ => a.sha256msg1(xmm0, xmmword_ptr(DATA + 8))?,
            }
            a.hlt()
        });
        let (_, e, _) = run(v3(), &code);
        assert_eq!(e, Some((13, 0)), "op {op}");
    }
}

#[test]
fn pclmulqdq_picks_quadwords_by_immediate() {
    let code = asm(|a| {
        a.movdqa(xmm1, xmmword_ptr(DATA))?;
        a.movdqa(xmm2, xmmword_ptr(DATA + 16))?;
        for (k, imm) in [0x00u32, 0x01, 0x10, 0x11].iter().enumerate() {
            a.movdqa(xmm0, xmm1)?;
            a.pclmulqdq(xmm0, xmm2, *imm)?;
            a.movdqa(xmmword_ptr(DATA + 0x100 + 16 * k as u64), xmm0)?;
        }
        a.movdqa(xmm0, xmm1)?;
        a.pclmulqdq(xmm0, xmmword_ptr(DATA + 16), 0x11)?;
        a.movdqa(xmmword_ptr(DATA + 0x200), xmm0)?;
        a.hlt()
    });
    let mut g = guest(v3(), &code);
    // a = (hi 0x8000000000000001, lo 3), b = (hi u64::MAX, lo 0b101)
    write_u128(&g, DATA, 3 | 0x8000_0000_0000_0001u128 << 64);
    write_u128(&g, DATA + 16, 5 | u128::from(u64::MAX) << 64);
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(g.exception(), None);
    // 3 * 5 (carry-less) = 0b1111
    assert_eq!(read_u128(&g, DATA + 0x100), 0xf);
    // (x^63 + 1) * (x^2 + 1) = x^65 + x^63 + x^2 + 1
    assert_eq!(read_u128(&g, DATA + 0x110), 1 << 65 | 1 << 63 | 5);
    // 3 * all-ones: x^64 + 1 (every middle bit cancels)
    assert_eq!(read_u128(&g, DATA + 0x120), 1 << 64 | 1);
    // (x^63 + 1) * all-ones: bits 126..63 from the first term xor bits 63..0
    let want = (u128::from(u64::MAX) << 63) ^ u128::from(u64::MAX);
    assert_eq!(read_u128(&g, DATA + 0x130), want);
    assert_eq!(read_u128(&g, DATA + 0x200), want);
}

/// "abc" padded to one 512-bit block, as big-endian words.
fn abc_block() -> [u32; 16] {
    let mut w = [0u32; 16];
    w[0] = 0x6162_6380;
    w[15] = 24;
    w
}

fn dword_lane(d: [u32; 4]) -> u128 {
    d.iter()
        .enumerate()
        .fold(0, |acc, (k, v)| acc | u128::from(*v) << (32 * k))
}

/// FIPS 180-4 example: SHA-1("abc") with SHA1MSG1/SHA1MSG2/SHA1NEXTE/SHA1RNDS4.
#[test]
fn sha1_abc_in_the_guest() {
    const M: u64 = DATA;
    const ST: u64 = DATA + 0x100;
    const OUT: u64 = DATA + 0x200;
    let h = [
        0x6745_2301u32,
        0xefcd_ab89,
        0x98ba_dcfe,
        0x1032_5476,
        0xc3d2_e1f0,
    ];
    let xmm = [xmm4, xmm5, xmm6, xmm7];
    let code = asm(|a| {
        for (k, r) in xmm.iter().enumerate() {
            a.movdqa(*r, xmmword_ptr(M + 16 * k as u64))?;
        }
        a.movdqa(xmm1, xmmword_ptr(ST))?;
        a.pxor(xmm10, xmm10)?;
        for g in 0..20usize {
            let cur = xmm[g % 4];
            if g >= 4 {
                a.sha1msg1(cur, xmm[(g + 1) % 4])?;
                a.pxor(cur, xmm[(g + 2) % 4])?;
                a.sha1msg2(cur, xmm[(g + 3) % 4])?;
            }
            if g == 0 {
                a.movdqa(xmm2, xmmword_ptr(ST + 16))?;
                a.paddd(xmm2, cur)?;
            } else {
                a.movdqa(xmm2, xmm3)?;
                a.sha1nexte(xmm2, cur)?;
            }
            a.movdqa(xmm3, xmm1)?;
            a.sha1rnds4(xmm1, xmm2, (g / 5) as u32)?;
        }
        a.sha1nexte(xmm3, xmm10)?;
        a.movdqa(xmmword_ptr(OUT), xmm1)?;
        a.movdqa(xmmword_ptr(OUT + 16), xmm3)?;
        a.hlt()
    });
    let mut g = guest(v3(), &code);
    let w = abc_block();
    for k in 0..4 {
        let d = [w[4 * k + 3], w[4 * k + 2], w[4 * k + 1], w[4 * k]];
        write_u128(&g, M + 16 * k as u64, dword_lane(d));
    }
    write_u128(&g, ST, dword_lane([h[3], h[2], h[1], h[0]]));
    write_u128(&g, ST + 16, dword_lane([0, 0, 0, h[4]]));
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(g.exception(), None);
    let abcd = read_u128(&g, OUT);
    let e = (read_u128(&g, OUT + 16) >> 96) as u32;
    let dw = |v: u128, k: u32| (v >> (32 * k)) as u32;
    let digest = [
        dw(abcd, 3).wrapping_add(h[0]),
        dw(abcd, 2).wrapping_add(h[1]),
        dw(abcd, 1).wrapping_add(h[2]),
        dw(abcd, 0).wrapping_add(h[3]),
        e.wrapping_add(h[4]),
    ];
    assert_eq!(
        digest,
        [
            0xa999_3e36,
            0x4706_816a,
            0xba3e_2571,
            0x7850_c26c,
            0x9cd0_d89d
        ]
    );
}

const K256: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

/// FIPS 180-4 example: SHA-256("abc") with SHA256MSG1/SHA256MSG2/SHA256RNDS2.
#[test]
fn sha256_abc_in_the_guest() {
    const M: u64 = DATA;
    const K: u64 = DATA + 0x100;
    const ST: u64 = DATA + 0x200;
    const OUT: u64 = DATA + 0x300;
    let h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let xmm = [xmm4, xmm5, xmm6, xmm7];
    let code = asm(|a| {
        for (k, r) in xmm.iter().enumerate() {
            a.movdqa(*r, xmmword_ptr(M + 16 * k as u64))?;
        }
        a.movdqa(xmm1, xmmword_ptr(ST))?; // ABEF
        a.movdqa(xmm2, xmmword_ptr(ST + 16))?; // CDGH
        for g in 0..16usize {
            let cur = xmm[g % 4];
            if g >= 4 {
                a.movdqa(xmm8, xmm[(g + 3) % 4])?;
                a.palignr(xmm8, xmm[(g + 2) % 4], 4)?;
                a.sha256msg1(cur, xmm[(g + 1) % 4])?;
                a.paddd(cur, xmm8)?;
                a.sha256msg2(cur, xmm[(g + 3) % 4])?;
            }
            a.movdqa(xmm0, cur)?;
            a.paddd(xmm0, xmmword_ptr(K + 16 * g as u64))?;
            a.sha256rnds2(xmm2, xmm1)?;
            a.pshufd(xmm0, xmm0, 0x0e)?;
            a.sha256rnds2(xmm1, xmm2)?;
        }
        a.movdqa(xmmword_ptr(OUT), xmm1)?;
        a.movdqa(xmmword_ptr(OUT + 16), xmm2)?;
        a.hlt()
    });
    let mut g = guest(v3(), &code);
    let w = abc_block();
    for k in 0..4 {
        let d = [w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3]];
        write_u128(&g, M + 16 * k as u64, dword_lane(d));
    }
    for k in 0..16 {
        let d = [
            K256[4 * k],
            K256[4 * k + 1],
            K256[4 * k + 2],
            K256[4 * k + 3],
        ];
        write_u128(&g, K + 16 * k as u64, dword_lane(d));
    }
    write_u128(&g, ST, dword_lane([h[5], h[4], h[1], h[0]]));
    write_u128(&g, ST + 16, dword_lane([h[7], h[6], h[3], h[2]]));
    assert_eq!(g.run(), VcpuExit::Halted);
    assert_eq!(g.exception(), None);
    let abef = read_u128(&g, OUT);
    let cdgh = read_u128(&g, OUT + 16);
    let dw = |v: u128, k: u32| (v >> (32 * k)) as u32;
    let s = [
        dw(abef, 3),
        dw(abef, 2),
        dw(cdgh, 3),
        dw(cdgh, 2),
        dw(abef, 1),
        dw(abef, 0),
        dw(cdgh, 1),
        dw(cdgh, 0),
    ];
    let digest: Vec<u32> = s.iter().zip(h).map(|(x, y)| x.wrapping_add(y)).collect();
    assert_eq!(
        digest,
        [
            0xba7816bf, 0x8f01cfea, 0x414140de, 0x5dae2223, 0xb00361a3, 0x96177a9c, 0xb410ff61,
            0xf20015ad
        ]
    );
}

type Emit = fn(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>;

/// One instruction of each family of this module.
const FAMILIES: &[(&str, Emit)] = &[
    ("andn", |a| a.andn(eax, ebx, ecx)),
    ("bextr", |a| a.bextr(eax, ebx, ecx)),
    ("blsr", |a| a.blsr(rax, rbx)),
    ("bzhi", |a| a.bzhi(rax, rbx, rcx)),
    ("mulx", |a| a.mulx(rax, rbx, rcx)),
    ("pdep", |a| a.pdep(rax, rbx, rcx)),
    ("rorx", |a| a.rorx(eax, ebx, 3)),
    ("shlx", |a| a.shlx(rax, rbx, rcx)),
    ("movbe", |a| a.movbe(eax, dword_ptr(DATA))),
    ("adcx", |a| a.adcx(rax, rbx)),
    ("adox", |a| a.adox(eax, ebx)),
    ("rdrand", |a| a.rdrand(eax)),
    ("rdseed", |a| a.rdseed(rax)),
    ("rdtscp", |a| a.rdtscp()),
    ("rdpid", |a| a.rdpid(rax)),
    ("clflushopt", |a| a.clflushopt(byte_ptr(DATA))),
    ("clwb", |a| a.clwb(byte_ptr(DATA))),
    ("aesenc", |a| a.aesenc(xmm0, xmm1)),
    ("aesdeclast", |a| a.aesdeclast(xmm0, xmm1)),
    ("aesimc", |a| a.aesimc(xmm0, xmm1)),
    ("aeskeygenassist", |a| a.aeskeygenassist(xmm0, xmm1, 1)),
    ("pclmulqdq", |a| a.pclmulqdq(xmm0, xmm1, 0)),
    ("sha1rnds4", |a| a.sha1rnds4(xmm0, xmm1, 0)),
    ("sha1msg2", |a| a.sha1msg2(xmm0, xmm1)),
    ("sha256rnds2", |a| a.sha256rnds2(xmm0, xmm1)),
    ("sha256msg1", |a| a.sha256msg1(xmm0, xmm1)),
];

#[test]
fn every_family_is_ud_without_its_feature_and_runs_with_it() {
    for (name, emit) in FAMILIES {
        let code = asm(|a| {
            emit(a)?;
            a.hlt()
        });
        let (r, e, _) = run(CpuModel::portable(), &code);
        assert_eq!(e, Some((6, 0)), "{name} under portable (v2)");
        assert_ne!(r.rip, CODE + code.len() as u64, "{name}");
        let (_, e, _) = run(v3(), &code);
        assert_eq!(e, None, "{name} under v3");
    }
    // FSGSBASE: #UD whatever CR4 says when the model lacks it (CR4.FSGSBASE cannot be set).
    let (_, e, _) = run(
        CpuModel::portable(),
        &asm(|a| {
            a.wrfsbase(rax)?;
            a.hlt()
        }),
    );
    assert_eq!(e, Some((6, 0)));
    // IA32_TSC_AUX exists only with RDTSCP/RDPID.
    let (_, e, _) = run(
        CpuModel::portable(),
        &asm(|a| {
            a.mov(ecx, TSC_AUX)?;
            a.rdmsr()?;
            a.hlt()
        }),
    );
    assert_eq!(e, Some((13, 0)));
}

#[test]
fn tsx_is_ud_and_hle_prefixes_are_ignored() {
    let cases: [Emit; 3] = [
        |a| {
            let mut l = a.create_label();
            a.xbegin(l)?;
            a.set_label(&mut l)?;
            a.nop()
        },
        |a| a.xend(),
        |a| a.xtest(),
    ];
    for (k, emit) in cases.iter().enumerate() {
        let code = asm(|a| {
            emit(a)?;
            a.hlt()
        });
        let (_, e, _) = run(v3(), &code);
        assert_eq!(e, Some((6, 0)), "case {k}");
    }
    let r = run3(|a| {
        a.mov(rsi, DATA)?;
        a.mov(qword_ptr(rsi), 5)?;
        a.mov(eax, 3u32)?;
        a.xacquire().lock().add(qword_ptr(rsi), rax)?;
        a.mov(ecx, 9u32)?;
        a.xrelease().lock().xchg(qword_ptr(rsi + 8), rcx)?;
        a.xrelease().mov(qword_ptr(rsi + 16), rax)?;
        a.mov(rbx, qword_ptr(rsi))?;
        a.mov(rdx, qword_ptr(rsi + 8))?;
        a.hlt()
    });
    assert_eq!(r.rbx, 8);
    assert_eq!(r.rdx, 9);
}

/// Collects the messages of `tracing` events (on the thread it is the default of).
#[derive(Clone, Default)]
struct Lines(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl tracing::Subscriber for Lines {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                if f.name() == "message" {
                    self.0 = format!("{v:?}");
                }
            }
        }
        let mut m = Message(String::new());
        event.record(&mut m);
        self.0.lock().unwrap().push(m.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// An instruction emu does not implement (here `enter` with a nesting level) in user mode
/// raises #UD through the guest IDT; the handler skips it and the program goes on. Each is
/// logged (bytes, RIP, mnemonic) and counted.
#[test]
fn unimplemented_instruction_in_user_mode_is_ud_and_the_vm_keeps_running() {
    const HANDLER: u64 = 0x30000;
    const COUNT: u64 = 0x31000;
    let user = asm(|a| {
        a.enter(16u32, 1u32)?; // c8 10 00 01
        a.mov(r12, 0x1234u64)?;
        a.enter(16u32, 1u32)?;
        a.mov(r13, 0x5678u64)?;
        a.hlt() // #GP at CPL 3: the stub records it and stops
    });
    assert_eq!(&user[..4], &[0xc8, 0x10, 0x00, 0x01]);
    let mut g = guest(CpuModel::portable(), &user);
    // User segments, user-accessible paging, RSP0 in the TSS (at linear 0).
    g.write_u64(GDT + 0x28, testkit::USER_CODE64);
    g.write_u64(GDT + 0x30, testkit::USER_DATA);
    testkit::identity_map(&g.mem, PML4, true).unwrap();
    g.write_u64(4, STACK);
    let handler = asm_at(64, HANDLER, |a| {
        a.add(qword_ptr(rsp), 4)?;
        a.inc(qword_ptr(COUNT))?;
        a.iretq()
    });
    g.write_code(HANDLER, &handler);
    g.set_gate(6, HANDLER);
    let mut st = g.state();
    st.sregs.gdt.limit = 7 * 8 - 1;
    let code = hv::Segment {
        selector: 0x2b,
        dpl: 3,
        ..st.sregs.cs
    };
    let data = hv::Segment {
        selector: 0x33,
        dpl: 3,
        ..st.sregs.ds
    };
    st.sregs.cs = code;
    st.sregs.ss = data;
    st.sregs.ds = data;
    st.sregs.es = data;
    st.regs.rsp = 0x70000;
    g.set_state(&st);
    let before = hv_emu::unsupported_instructions();
    let lines = Lines::default();
    let exit = tracing::subscriber::with_default(lines.clone(), || g.run());
    assert_eq!(exit, VcpuExit::Halted);
    let lines = lines.0.lock().unwrap().clone();
    assert_eq!(
        lines.first().map(String::as_str),
        Some(
            "emu: vCPU 0: unsupported instruction c8100001 at rip 0x10000 (Enter: enter with nesting level): #UD"
        ),
        "{lines:?}"
    );
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(g.exception(), Some((13, 0)), "the final hlt at CPL 3");
    let r = g.regs();
    assert_eq!((r.r12, r.r13), (0x1234, 0x5678));
    assert_eq!(g.read_u64(COUNT), 2, "#UD handler runs");
    assert!(hv_emu::unsupported_instructions() >= before + 2);
}

/// `hv::InstructionEmulator` (the KVM backend's fallback): an instruction emu does not
/// implement is an error naming bytes, RIP and mnemonic (the hardware may have it, so no #UD is
/// made up); one the model lacks is #UD, reported in the state.
#[test]
fn emulate_one_reports_unimplemented_as_error_and_out_of_model_as_ud() {
    let code = asm(|a| a.enter(16u32, 1u32));
    let mut g = guest(CpuModel::portable(), &code);
    let mut st = g.state();
    set_long_mode(&mut st);
    let em = hv_emu::Emulator::new(CpuModel::portable());
    let err = em.emulate_one(&mut st.clone(), &g.mem, &*g.io).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "unsupported instruction c8100001 at rip {CODE:#x} (Enter: enter with nesting level)"
        )
    );
    g.write_code(CODE, &asm(|a| a.andn(eax, ebx, ecx)));
    em.emulate_one(&mut st, &g.mem, &*g.io).unwrap();
    assert_eq!(st.events.exception.map(|e| e.vector), Some(6));
    assert_eq!(st.regs.rip, CODE);
    // Under v3 the same instruction runs.
    let mut s3 = g.state();
    set_long_mode(&mut s3);
    s3.regs.rbx = 0xf0;
    s3.regs.rcx = 0xff;
    hv_emu::Emulator::new(v3())
        .emulate_one(&mut s3, &g.mem, &*g.io)
        .unwrap();
    assert_eq!(s3.events.exception, None);
    assert_eq!(s3.regs.rax, 0x0f);
}
