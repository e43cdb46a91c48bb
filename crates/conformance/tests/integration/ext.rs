//! The scalar and crypto extensions of x86-64-v3 at CPL 3 under the v3 model: the same programs
//! and expectations on emu and on KVM (where they run on the host CPU), plus the differential
//! tester of `diff_ext` (random BMI1/BMI2/LZCNT/TZCNT/MOVBE/ADX/AES/PCLMUL/SHA blocks, compared
//! bit for bit, undefined flags and XMM registers included).
//!
//! Known platform difference: CLWB on a non-canonical address raises #UD under KVM (presumably
//! PVM hands the #GP to KVM's instruction emulator, which lacks CLWB); the SDM and emu: #GP(0).
//!
//! Not compared with KVM: values that come from the host (RDRAND, RDTSCP/RDPID read the host's
//! IA32_TSC_AUX in PVM user mode), FSGSBASE and TSX (user code on the host CPU can use them
//! whatever the model shows: a model cannot take an instruction away from native code).

// A test crate: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use conformance::diff_ext::{self, comparison_model};
use conformance::*;
use hv::{BackendKind, Hypervisor};
use iced_x86::code_asm::*;

/// Runs `code` (ending in `ud2`) at CPL 3 under the v3 model (`model_for`) after `setup`; returns the final
/// registers (RAX and RFLAGS from the #UD frame).
fn run_user(
    hv: &dyn Hypervisor,
    code: &[u8],
    setup: impl FnOnce(&Guest),
) -> (hv::Registers, Guest) {
    let mut g = Guest::with_model(hv, DEFAULT_MIB, diff_ext::model_for(hv)).unwrap();
    setup(&g);
    g.load_user(code).unwrap();
    let o = g.go();
    let e = o.assert_exception(6, 0);
    assert_eq!(
        e.rip,
        CODE + code.len() as u64 - 2,
        "stopped before the final ud2"
    );
    let mut r = o.state.regs;
    r.rax = e.rax;
    r.rflags = e.rflags;
    (r, g)
}

fn flags(a: &mut CodeAssembler, to: AsmRegister64) -> AsmResult {
    a.pushfq()?;
    a.pop(to)
}

fn bmi_and_counts(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        a.xor(eax, eax)?;
        a.mov(rbx, -1i64)?;
        a.tzcnt(ebx, eax)?; // 32, CF
        flags(a, rsi)?;
        a.lzcnt(rcx, rax)?; // 64, CF
        a.mov(edx, 0x100u32)?;
        a.tzcnt(di, dx)?; // 8
        a.mov(r8d, 0x1234_5678u32)?;
        a.mov(r9d, 0xff04u32)?;
        a.bextr(r10d, r8d, r9d)?; // start 4, len 255
        a.mov(r9d, 200u32)?;
        a.bzhi(r11, r8, r9)?; // index beyond 64: source, CF
        flags(a, r12)?;
        a.mov(r13, -1i64)?;
        a.pdep(r13, r8, r13)?; // all-ones mask: the source
        a.mov(r14, 0xf0f0u64)?;
        a.pext(r14, r8, r14)?; // 0x57 (bits 4-7, then 12-15, of 0x5678)
        a.blsmsk(ebp, eax)?; // source 0: all ones, CF
        a.mov(rdx, -1i64)?;
        a.mulx(r15, rax, rdx)?; // (2^64-1)^2
        // BEXTR leaves SF undefined: Intel clears it even for a result with the top bit set.
        a.mov(r9d, 0x8000_0000u32)?;
        a.mov(edx, 0x2000u32)?;
        a.bextr(r9d, r9d, edx)?;
        flags(a, rdx)?;
        a.ud2()
    });
    let (r, _) = run_user(hv, &code, |_| {});
    assert_eq!(r.rbx, 32);
    assert_eq!(r.rsi & CF, CF);
    assert_eq!(r.rcx, 64);
    assert_eq!(r.rdi & 0xffff, 8);
    assert_eq!(r.r10, 0x0123_4567);
    assert_eq!(r.r11, 0x1234_5678);
    assert_eq!(r.r12 & CF, CF);
    assert_eq!(r.r13, 0x1234_5678);
    assert_eq!(r.r14, 0x57);
    assert_eq!(r.rbp, 0xffff_ffff);
    assert_eq!((r.r15, r.rax), (0xffff_ffff_ffff_fffe, 1));
    assert_eq!(r.r9, 0x8000_0000);
    assert_eq!(r.rdx & STATUS, 0, "bextr flags");
}

fn movbe_and_adx(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        a.mov(rsi, DATA)?;
        a.mov(rax, 0x0102_0304_0506_0708u64)?;
        a.movbe(qword_ptr(rsi), rax)?;
        a.mov(rbx, qword_ptr(rsi))?;
        a.movbe(ecx, dword_ptr(rsi + 4))?;
        a.mov(rdx, -1i64)?;
        a.xor(edi, edi)?;
        a.stc()?;
        a.adcx(rdx, rdi)?; // 0, CF
        a.mov(r8, -1i64)?;
        a.mov(r9d, 1u32)?;
        a.adox(r8, r9)?; // 0, OF (CF kept)
        a.adox(r9, rdi)?; // 1 + 0 + OF = 2
        flags(a, r10)?;
        a.ud2()
    });
    let (r, _) = run_user(hv, &code, |_| {});
    assert_eq!(r.rbx, 0x0807_0605_0403_0201);
    assert_eq!(r.rcx, 0x0506_0708);
    assert_eq!(r.rdx, 0);
    assert_eq!(r.r8, 0);
    assert_eq!(r.r9, 2);
    assert_eq!(r.r10 & (CF | OF), CF);
}

fn write_u128(g: &Guest, a: u64, v: u128) {
    g.write(a, &v.to_le_bytes()).unwrap();
}

fn read_u128(g: &Guest, a: u64) -> u128 {
    u128::from_le_bytes(g.read(a, 16).unwrap().try_into().unwrap())
}

fn hex128(s: &str) -> u128 {
    let b: Vec<u8> = (0..16)
        .map(|k| u8::from_str_radix(&s[2 * k..2 * k + 2], 16).unwrap())
        .collect();
    u128::from_le_bytes(b.try_into().unwrap())
}

/// FIPS-197 appendix C.1 (AES-128) with AESKEYGENASSIST, AESENC(LAST), AESIMC, AESDEC(LAST).
fn aes128_fips_197(hv: &dyn Hypervisor) {
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
            if r == 10 {
                a.aesenclast(xmm0, xmm1)?;
            } else {
                a.aesenc(xmm0, xmmword_ptr(KEYS + 16 * r))?;
            }
        }
        a.movdqa(xmmword_ptr(OUT), xmm0)?;
        a.pxor(xmm0, xmmword_ptr(KEYS + 160))?;
        for r in (1..10u64).rev() {
            a.aesimc(xmm4, xmmword_ptr(KEYS + 16 * r))?;
            a.aesdec(xmm0, xmm4)?;
        }
        a.aesdeclast(xmm0, xmmword_ptr(KEYS))?;
        a.movdqa(xmmword_ptr(OUT + 16), xmm0)?;
        a.ud2()
    });
    let (_, g) = run_user(hv, &code, |g| {
        write_u128(g, DATA, hex128("000102030405060708090a0b0c0d0e0f"));
        write_u128(g, DATA + 16, hex128("00112233445566778899aabbccddeeff"));
    });
    assert_eq!(
        read_u128(&g, OUT),
        hex128("69c4e0d86a7b0430d8cdb78070b4c55a")
    );
    assert_eq!(
        read_u128(&g, OUT + 16),
        hex128("00112233445566778899aabbccddeeff")
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

fn lane(d: [u32; 4]) -> u128 {
    d.iter()
        .enumerate()
        .fold(0, |acc, (k, v)| acc | u128::from(*v) << (32 * k))
}

/// FIPS 180-4 example: SHA-256("abc") with SHA256MSG1/SHA256MSG2/SHA256RNDS2.
fn sha256_abc(hv: &dyn Hypervisor) {
    const M: u64 = DATA;
    const K: u64 = DATA + 0x100;
    const ST: u64 = DATA + 0x200;
    const OUT: u64 = DATA + 0x300;
    let h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let x = [xmm4, xmm5, xmm6, xmm7];
    let code = asm(|a| {
        for (k, r) in x.iter().enumerate() {
            a.movdqa(*r, xmmword_ptr(M + 16 * k as u64))?;
        }
        a.movdqa(xmm1, xmmword_ptr(ST))?;
        a.movdqa(xmm2, xmmword_ptr(ST + 16))?;
        for g in 0..16usize {
            let cur = x[g % 4];
            if g >= 4 {
                a.movdqa(xmm8, x[(g + 3) % 4])?;
                a.palignr(xmm8, x[(g + 2) % 4], 4)?;
                a.sha256msg1(cur, x[(g + 1) % 4])?;
                a.paddd(cur, xmm8)?;
                a.sha256msg2(cur, x[(g + 3) % 4])?;
            }
            a.movdqa(xmm0, cur)?;
            a.paddd(xmm0, xmmword_ptr(K + 16 * g as u64))?;
            a.sha256rnds2(xmm2, xmm1)?;
            a.pshufd(xmm0, xmm0, 0x0e)?;
            a.sha256rnds2(xmm1, xmm2)?;
        }
        a.movdqa(xmmword_ptr(OUT), xmm1)?;
        a.movdqa(xmmword_ptr(OUT + 16), xmm2)?;
        a.ud2()
    });
    let (_, g) = run_user(hv, &code, |g| {
        write_u128(g, M, lane([0x6162_6380, 0, 0, 0]));
        write_u128(g, M + 16, 0);
        write_u128(g, M + 32, 0);
        write_u128(g, M + 48, lane([0, 0, 0, 24]));
        for k in 0..16 {
            let d = [
                K256[4 * k],
                K256[4 * k + 1],
                K256[4 * k + 2],
                K256[4 * k + 3],
            ];
            write_u128(g, K + 16 * k as u64, lane(d));
        }
        write_u128(g, ST, lane([h[5], h[4], h[1], h[0]]));
        write_u128(g, ST + 16, lane([h[7], h[6], h[3], h[2]]));
    });
    let (abef, cdgh) = (read_u128(&g, OUT), read_u128(&g, OUT + 16));
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

/// RDRAND/RDSEED set CF (the values are the host's); RDTSCP and RDPID run. The hardware may
/// clear CF when its entropy is spent for the moment (SDM: software retries), which RDSEED
/// does on a loaded host: both are retried up to 64 times, as the SDM advises.
fn random_and_tsc_aux_run(hv: &dyn Hypervisor) {
    let code = asm(|a| {
        let mut rdrand = a.create_label();
        let mut rdseed = a.create_label();
        a.mov(edx, 64)?;
        a.set_label(&mut rdrand)?;
        a.xor(eax, eax)?; // CF clear
        a.rdrand(rbx)?;
        flags(a, rsi)?;
        a.bt(esi, 0)?;
        a.jb(rdseed)?;
        a.dec(edx)?;
        a.jne(rdrand)?;
        a.set_label(&mut rdseed)?;
        a.mov(edx, 64)?;
        let mut again = a.create_label();
        let mut done = a.create_label();
        a.set_label(&mut again)?;
        a.xor(eax, eax)?;
        a.rdseed(ecx)?;
        flags(a, rdi)?;
        a.bt(edi, 0)?;
        a.jb(done)?;
        a.dec(edx)?;
        a.jne(again)?;
        a.set_label(&mut done)?;
        a.rdtscp()?;
        a.rdpid(r8)?;
        a.ud2()
    });
    let (r, _) = run_user(hv, &code, |_| {});
    assert_eq!(r.rsi & STATUS, CF);
    assert_eq!(r.rdi & STATUS, CF);
}

/// CLFLUSH, CLFLUSHOPT and CLWB check their address like a read: #PF (user, read, not present)
/// for an unmapped one, #GP(0) for a non-canonical one.
fn cache_line_faults(hv: &dyn Hypervisor) {
    for op in 0..3 {
        for (addr, vector, code) in [(0x10_0000_0000u64, 14, 4), (0x8000_0000_0000_0000, 13, 0)] {
            let prog = asm(|a| {
                a.mov(rsi, DATA)?;
                a.clflushopt(byte_ptr(rsi))?; // mapped: fine
                a.mov(rsi, addr)?;
                match op {
                    0 => a.clflush(byte_ptr(rsi))?,
                    1 => a.clflushopt(byte_ptr(rsi))?,
                    _ => a.clwb(byte_ptr(rsi))?,
                }
                a.ud2()
            });
            let mut g = Guest::with_model(hv, DEFAULT_MIB, diff_ext::model_for(hv)).unwrap();
            g.load_user(&prog).unwrap();
            let o = g.go();
            if hv.kind() == BackendKind::Kvm
                && op == 2
                && vector == 13
                && o.exception.is_some_and(|e| e.vector == 6)
            {
                // Measured: CLFLUSH/CLFLUSHOPT give #GP(0) there, CLWB #UD. Presumably PVM hands
                // the #GP to KVM's instruction emulator, which knows CLFLUSH(OPT) but not CLWB.
                // The SDM (and emu) say #GP(0).
                println!(
                    "NOTE: known platform difference: KVM (PVM) turns CLWB's non-canonical #GP into #UD"
                );
                continue;
            }
            let e = o.assert_exception(vector, code);
            if vector == 14 {
                assert_eq!(e.cr2, addr, "op {op}");
            }
        }
    }
}

conformance!(
    cache_line_faults,
    bmi_and_counts,
    movbe_and_adx,
    aes128_fips_197,
    sha256_abc,
    random_and_tsc_aux_run
);

fn differential(seed: u64, count: u64) {
    let run = diff_ext::differential(seed, count);
    let Some(report) = crate::differential::checked("ext", seed, run) else {
        return;
    };
    assert_eq!(
        report.completed + report.page_faults,
        report.blocks,
        "blocks that faulted other than on the unmapped page"
    );
}

/// KVM (the host CPU) against emu on random ext blocks.
#[test]
fn ext_differential_short() {
    differential(
        conformance::diff_seed("ANYVISOR_EXT_DIFF_SEED", 0xe47),
        conformance::diff_blocks("ANYVISOR_EXT_DIFF_BLOCKS", 300),
    );
}

#[test]
#[ignore = "long: cargo test -p conformance --release --test integration ext:: -- --ignored"]
fn ext_differential_long() {
    differential(
        conformance::diff_seed("ANYVISOR_EXT_DIFF_SEED", 0xe47_1234),
        conformance::diff_blocks("ANYVISOR_DIFF_COUNT", 20_000),
    );
}

/// The tester can fail: emu against a KVM run whose blocks get one extra instruction is caught
/// (here: emu against itself with a block whose XMM result differs).
#[test]
fn ext_differential_detects_an_xmm_difference() {
    use conformance::diff::{Privilege, Runner, compare};
    let emu = emu();
    let mut r = Runner::with_model(&emu, Privilege::User, comparison_model()).unwrap();
    let ext = diff_ext::generate(7, 0, 4).unwrap();
    let block = ext.block(ext.body.len()).unwrap();
    let a = r.run(&block).unwrap();
    let b = r.run(&block).unwrap();
    assert!(
        compare(&block, &a, &b).is_none(),
        "emu is not deterministic"
    );
    // The same block with XMM3's initial value changed must differ in the stored XMM area.
    let mut other = block.clone();
    other.scratch[(diff_ext::XMM_AREA + 3 * 16) as usize] ^= 1;
    let c = r.run(&other).unwrap();
    assert!(
        compare(&block, &a, &c).is_some(),
        "an XMM difference went unseen"
    );
}
