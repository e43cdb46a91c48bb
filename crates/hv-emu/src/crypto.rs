//! The arithmetic of the AES-NI, PCLMULQDQ and SHA-NI instructions as pure functions on 128-bit
//! lanes (an XMM register as a little-endian `u128`: byte 0 of memory is bits 7:0).
//!
//! Each function is exactly one instruction's operation on one 128-bit lane, following the
//! pseudocode of the Intel SDM (the legacy-SSE forms use them directly; VEX/VAES forms apply
//! them per lane).
//!
//! AES rounds come from RustCrypto's `aes` crate (`hazmat`): its round functions are AESENC,
//! AESDEC and AESIMC exactly, they run on the host's AES-NI where it has it and on the crate's
//! constant-time bitsliced code elsewhere, so a guest's AES costs tens of nanoseconds and
//! leaks no key through table lookups. The crate has no last rounds; they follow from the
//! full ones because MixColumns and InvMixColumns undo each other: AESENCLAST(s, k) =
//! InvMixColumns(AESENC(s, 0)) ^ k, AESDECLAST(s, k) = MixColumns(AESDEC(s, 0)) ^ k, and
//! AESKEYGENASSIST's SubWord is SubBytes = InvShiftRows(AESENCLAST(s, 0)).
//!
//! PCLMULQDQ and SHA-NI are written here: no crate exposes a bare 64x64 carry-less product
//! (GHASH/POLYVAL crates keep theirs inside their field arithmetic) or the SHA instructions'
//! individual steps (a SHA-1 quad round, the message schedule helpers, two SHA-256 rounds on
//! the instruction's odd register layout).

use aes::hazmat;

type Block = aes::Block;

fn block(v: u128) -> Block {
    Block::from(v.to_le_bytes())
}

fn lane_of(b: Block) -> u128 {
    let a: [u8; 16] = b.into();
    u128::from_le_bytes(a)
}

/// AESENC: one encryption round (ShiftRows, SubBytes, MixColumns, AddRoundKey).
pub(crate) fn aesenc(state: u128, key: u128) -> u128 {
    let mut b = block(state);
    hazmat::cipher_round(&mut b, &block(key));
    lane_of(b)
}

/// AESENCLAST: the last encryption round (no MixColumns).
pub(crate) fn aesenclast(state: u128, key: u128) -> u128 {
    let mut b = block(state);
    hazmat::cipher_round(&mut b, &Block::default());
    hazmat::inv_mix_columns(&mut b);
    lane_of(b) ^ key
}

/// AESDEC: one round of the equivalent inverse cipher (InvShiftRows, InvSubBytes,
/// InvMixColumns, AddRoundKey).
pub(crate) fn aesdec(state: u128, key: u128) -> u128 {
    let mut b = block(state);
    hazmat::equiv_inv_cipher_round(&mut b, &block(key));
    lane_of(b)
}

/// AESDECLAST: the last decryption round (no InvMixColumns).
pub(crate) fn aesdeclast(state: u128, key: u128) -> u128 {
    let mut b = block(state);
    hazmat::equiv_inv_cipher_round(&mut b, &Block::default());
    hazmat::mix_columns(&mut b);
    lane_of(b) ^ key
}

/// AESIMC: InvMixColumns of a round key (for the equivalent inverse cipher).
pub(crate) fn aesimc(key: u128) -> u128 {
    let mut b = block(key);
    hazmat::inv_mix_columns(&mut b);
    lane_of(b)
}

/// Where InvShiftRows takes each byte of its result from (byte `r + 4c` is row r, column c;
/// row r moves right by r).
const INV_SHIFT_ROWS: [usize; 16] = [0, 13, 10, 7, 4, 1, 14, 11, 8, 5, 2, 15, 12, 9, 6, 3];

/// InvShiftRows of a state.
fn inv_shift_rows(v: u128) -> u128 {
    let s = v.to_le_bytes();
    u128::from_le_bytes(INV_SHIFT_ROWS.map(|k| s.get(k).copied().unwrap_or(0)))
}

/// AESKEYGENASSIST: SubWord of dwords 1 and 3, and RotWord(SubWord) XOR `rcon` of each.
pub(crate) fn aeskeygenassist(src: u128, rcon: u8) -> u128 {
    let sub = inv_shift_rows(aesenclast(src, 0));
    let x1 = (sub >> 32) as u32;
    let x3 = (sub >> 96) as u32;
    let rc = u32::from(rcon);
    u128::from(x1)
        | u128::from(x1.rotate_right(8) ^ rc) << 32
        | u128::from(x3) << 64
        | u128::from(x3.rotate_right(8) ^ rc) << 96
}

/// The bits of a 64-bit word whose index is `c` modulo 5.
const fn holes64(c: u32) -> u64 {
    let mut m = 0u64;
    let mut k = c;
    while k < 64 {
        m |= 1 << k;
        k += 5;
    }
    m
}

/// The bits of a 128-bit word whose index is `c` modulo 5.
const fn holes128(c: u32) -> u128 {
    let mut m = 0u128;
    let mut k = c;
    while k < 128 {
        m |= 1 << k;
        k += 5;
    }
    m
}

const H64: [u64; 5] = [holes64(0), holes64(1), holes64(2), holes64(3), holes64(4)];
const H128: [u128; 5] = [
    holes128(0),
    holes128(1),
    holes128(2),
    holes128(3),
    holes128(4),
];

/// Carry-less product of two 64-bit polynomials, with integer multiplications and no
/// data-dependent branch or lookup. Each operand is split into five parts holding the bits of
/// one residue class modulo 5 (at most 13 bits each); in an integer product of two parts a
/// result bit gathers at most 13 one-bit terms, a sum below 16 that carries at most 3 places
/// up, short of the next bit of the same class 5 places up, so the class's bits of the
/// integer product are the XOR sums the carry-less product wants.
pub(crate) fn clmul(a: u64, b: u64) -> u128 {
    let mut z = [0u128; 5];
    for (i, ma) in H64.iter().enumerate() {
        let x = u128::from(a & ma);
        for (j, mb) in H64.iter().enumerate() {
            z[(i + j) % 5] ^= x * u128::from(b & mb);
        }
    }
    z.iter().zip(H128).fold(0, |r, (v, m)| r | (v & m))
}

/// PCLMULQDQ: imm bit 0 picks the quadword of `a` (the destination), bit 4 that of `b`.
pub(crate) fn pclmulqdq(a: u128, b: u128, imm: u8) -> u128 {
    let qa = if imm & 1 != 0 {
        (a >> 64) as u64
    } else {
        a as u64
    };
    let qb = if imm & 0x10 != 0 {
        (b >> 64) as u64
    } else {
        b as u64
    };
    clmul(qa, qb)
}

/// Dword `k` (0 = bits 31:0) of a lane.
fn dw(v: u128, k: u32) -> u32 {
    (v >> (32 * k)) as u32
}

/// A lane from dwords, highest first (bits 127:96, 95:64, 63:32, 31:0).
fn from_dw(d3: u32, d2: u32, d1: u32, d0: u32) -> u128 {
    u128::from(d3) << 96 | u128::from(d2) << 64 | u128::from(d1) << 32 | u128::from(d0)
}

/// SHA1RNDS4: four SHA-1 rounds on ABCD (`abcd`, A in bits 127:96) with the message words and
/// E in `we` (W0+E in bits 127:96); `func` (imm8 bits 1:0) chooses f and K.
pub(crate) fn sha1rnds4(abcd: u128, we: u128, func: u8) -> u128 {
    let (k, f): (u32, fn(u32, u32, u32) -> u32) = match func & 3 {
        0 => (0x5a82_7999, |b, c, d| (b & c) ^ (!b & d)),
        1 => (0x6ed9_eba1, |b, c, d| b ^ c ^ d),
        2 => (0x8f1b_bcdc, |b, c, d| (b & c) ^ (b & d) ^ (c & d)),
        _ => (0xca62_c1d6, |b, c, d| b ^ c ^ d),
    };
    let (mut a, mut b, mut c, mut d) = (dw(abcd, 3), dw(abcd, 2), dw(abcd, 1), dw(abcd, 0));
    let mut e = 0u32;
    for i in 0..4 {
        // W0 already carries E; later rounds add the rotated-in E.
        let w = dw(we, 3 - i);
        let na = f(b, c, d)
            .wrapping_add(a.rotate_left(5))
            .wrapping_add(w)
            .wrapping_add(e)
            .wrapping_add(k);
        e = d;
        d = c;
        c = b.rotate_left(30);
        b = a;
        a = na;
    }
    from_dw(a, b, c, d)
}

/// SHA1NEXTE: E (A of four rounds ago, rotated left by 30) added to the first message word.
pub(crate) fn sha1nexte(dst: u128, src: u128) -> u128 {
    let e = dw(dst, 3).rotate_left(30);
    (src & !(u128::from(u32::MAX) << 96)) | u128::from(dw(src, 3).wrapping_add(e)) << 96
}

/// SHA1MSG1: the XOR of W[i-16] and W[i-14] for the next four message words.
pub(crate) fn sha1msg1(dst: u128, src: u128) -> u128 {
    let (w0, w1, w2, w3) = (dw(dst, 3), dw(dst, 2), dw(dst, 1), dw(dst, 0));
    let (w4, w5) = (dw(src, 3), dw(src, 2));
    from_dw(w2 ^ w0, w3 ^ w1, w4 ^ w2, w5 ^ w3)
}

/// SHA1MSG2: completes four message words with W[i-3] and the rotate.
pub(crate) fn sha1msg2(dst: u128, src: u128) -> u128 {
    let (w13, w14, w15) = (dw(src, 2), dw(src, 1), dw(src, 0));
    let w16 = (dw(dst, 3) ^ w13).rotate_left(1);
    let w17 = (dw(dst, 2) ^ w14).rotate_left(1);
    let w18 = (dw(dst, 1) ^ w15).rotate_left(1);
    let w19 = (dw(dst, 0) ^ w16).rotate_left(1);
    from_dw(w16, w17, w18, w19)
}

fn big_sigma0(x: u32) -> u32 {
    x.rotate_right(2) ^ x.rotate_right(13) ^ x.rotate_right(22)
}

fn big_sigma1(x: u32) -> u32 {
    x.rotate_right(6) ^ x.rotate_right(11) ^ x.rotate_right(25)
}

fn small_sigma0(x: u32) -> u32 {
    x.rotate_right(7) ^ x.rotate_right(18) ^ (x >> 3)
}

fn small_sigma1(x: u32) -> u32 {
    x.rotate_right(17) ^ x.rotate_right(19) ^ (x >> 10)
}

/// SHA256RNDS2: two SHA-256 rounds. `cdgh` is the destination (C, D, G, H from bits 127:96
/// down), `abef` the source (A, B, E, F), `wk` XMM0 (W+K of the two rounds in dwords 0 and 1).
/// The result is the new A, B, E, F.
pub(crate) fn sha256rnds2(cdgh: u128, abef: u128, wk: u128) -> u128 {
    let (mut a, mut b, mut e, mut f) = (dw(abef, 3), dw(abef, 2), dw(abef, 1), dw(abef, 0));
    let (mut c, mut d, mut g, mut h) = (dw(cdgh, 3), dw(cdgh, 2), dw(cdgh, 1), dw(cdgh, 0));
    for i in 0..2 {
        let ch = (e & f) ^ (!e & g);
        let maj = (a & b) ^ (a & c) ^ (b & c);
        let t = ch
            .wrapping_add(big_sigma1(e))
            .wrapping_add(dw(wk, i))
            .wrapping_add(h);
        let na = t.wrapping_add(maj).wrapping_add(big_sigma0(a));
        let ne = t.wrapping_add(d);
        h = g;
        g = f;
        f = e;
        e = ne;
        d = c;
        c = b;
        b = a;
        a = na;
    }
    from_dw(a, b, e, f)
}

/// SHA256MSG1: W[i-16] + sigma0(W[i-15]) for the next four message words.
pub(crate) fn sha256msg1(dst: u128, src: u128) -> u128 {
    let w = [dw(dst, 0), dw(dst, 1), dw(dst, 2), dw(dst, 3), dw(src, 0)];
    from_dw(
        w[3].wrapping_add(small_sigma0(w[4])),
        w[2].wrapping_add(small_sigma0(w[3])),
        w[1].wrapping_add(small_sigma0(w[2])),
        w[0].wrapping_add(small_sigma0(w[1])),
    )
}

/// SHA256MSG2: adds sigma1(W[i-2]) to four partial message words.
pub(crate) fn sha256msg2(dst: u128, src: u128) -> u128 {
    let (w14, w15) = (dw(src, 2), dw(src, 3));
    let w16 = dw(dst, 0).wrapping_add(small_sigma1(w14));
    let w17 = dw(dst, 1).wrapping_add(small_sigma1(w15));
    let w18 = dw(dst, 2).wrapping_add(small_sigma1(w16));
    let w19 = dw(dst, 3).wrapping_add(small_sigma1(w17));
    from_dw(w19, w18, w17, w16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference implementations straight from FIPS 197 and the carry-less product's
    /// definition, bit by bit: the fast functions above must agree with them.
    mod reference {
        const fn gmul(mut a: u8, mut b: u8) -> u8 {
            let mut p = 0u8;
            while b != 0 {
                if b & 1 != 0 {
                    p ^= a;
                }
                let hi = a & 0x80;
                a <<= 1;
                if hi != 0 {
                    a ^= 0x1b;
                }
                b >>= 1;
            }
            p
        }

        /// The S-box: the inverse in GF(2^8) (0 for 0) through the affine map.
        pub fn sbox(x: u8) -> u8 {
            let mut inv = 1u8;
            for _ in 0..254 {
                inv = gmul(inv, x);
            }
            let b = if x == 0 { 0 } else { inv };
            b ^ b.rotate_left(1) ^ b.rotate_left(2) ^ b.rotate_left(3) ^ b.rotate_left(4) ^ 0x63
        }

        pub fn inv_sbox(y: u8) -> u8 {
            (0..=255u8).find(|&x| sbox(x) == y).unwrap()
        }

        fn mix(s: [u8; 16], m: [u8; 4]) -> [u8; 16] {
            let mut o = [0u8; 16];
            for c in 0..4 {
                for r in 0..4 {
                    for k in 0..4 {
                        o[r + 4 * c] ^= gmul(m[(k + 4 - r) % 4], s[k + 4 * c]);
                    }
                }
            }
            o
        }

        fn shift(s: [u8; 16], inv: bool) -> [u8; 16] {
            let mut o = [0u8; 16];
            for c in 0..4 {
                for r in 0..4 {
                    if inv {
                        o[r + 4 * ((c + r) % 4)] = s[r + 4 * c];
                    } else {
                        o[r + 4 * c] = s[r + 4 * ((c + r) % 4)];
                    }
                }
            }
            o
        }

        pub fn round(state: u128, key: u128, dec: bool, last: bool) -> u128 {
            let s = shift(state.to_le_bytes(), dec);
            let s = s.map(|b| if dec { inv_sbox(b) } else { sbox(b) });
            let s = match (last, dec) {
                (true, _) => s,
                (false, false) => mix(s, [2, 3, 1, 1]),
                (false, true) => mix(s, [14, 11, 13, 9]),
            };
            u128::from_le_bytes(s) ^ key
        }

        pub fn imc(v: u128) -> u128 {
            u128::from_le_bytes(mix(v.to_le_bytes(), [14, 11, 13, 9]))
        }

        pub fn clmul(a: u64, b: u64) -> u128 {
            (0..64)
                .filter(|k| (b >> k) & 1 != 0)
                .fold(0, |r, k| r ^ (u128::from(a) << k))
        }
    }

    /// A xorshift generator for the cross-checks.
    fn next(x: &mut u64) -> u64 {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    #[test]
    fn aes_rounds_match_the_reference() {
        let mut x = 0x1234_5678_9abc_def1u64;
        for _ in 0..500 {
            let s = u128::from(next(&mut x)) << 64 | u128::from(next(&mut x));
            let k = u128::from(next(&mut x)) << 64 | u128::from(next(&mut x));
            assert_eq!(aesenc(s, k), reference::round(s, k, false, false));
            assert_eq!(aesenclast(s, k), reference::round(s, k, false, true));
            assert_eq!(aesdec(s, k), reference::round(s, k, true, false));
            assert_eq!(aesdeclast(s, k), reference::round(s, k, true, true));
            assert_eq!(aesimc(s), reference::imc(s));
            let rcon = next(&mut x) as u8;
            let sw = |w: u32| u32::from_le_bytes(w.to_le_bytes().map(reference::sbox));
            let (x1, x3) = (sw((s >> 32) as u32), sw((s >> 96) as u32));
            let want = u128::from(x1)
                | u128::from(x1.rotate_right(8) ^ u32::from(rcon)) << 32
                | u128::from(x3) << 64
                | u128::from(x3.rotate_right(8) ^ u32::from(rcon)) << 96;
            assert_eq!(aeskeygenassist(s, rcon), want);
        }
    }

    #[test]
    fn clmul_matches_the_reference() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let edges = [
            0,
            1,
            u64::MAX,
            1 << 63,
            0x5555_5555_5555_5555,
            0xaaaa_aaaa_aaaa_aaaa,
        ];
        for a in edges {
            for b in edges {
                assert_eq!(clmul(a, b), reference::clmul(a, b), "{a:#x} {b:#x}");
            }
        }
        for _ in 0..20_000 {
            let (a, b) = (next(&mut x), next(&mut x));
            // Sparse and dense operands too.
            let (a2, b2) = (a & next(&mut x), b | next(&mut x));
            assert_eq!(clmul(a, b), reference::clmul(a, b));
            assert_eq!(clmul(a2, b2), reference::clmul(a2, b2));
        }
    }

    fn hex128(s: &str) -> u128 {
        let b: Vec<u8> = (0..16)
            .map(|k| u8::from_str_radix(&s[2 * k..2 * k + 2], 16).unwrap())
            .collect();
        u128::from_le_bytes(b.try_into().unwrap())
    }

    /// AES-128 key expansion the way software does it with AESKEYGENASSIST.
    fn expand(key: u128) -> [u128; 11] {
        const RCON: [u8; 10] = [1, 2, 4, 8, 0x10, 0x20, 0x40, 0x80, 0x1b, 0x36];
        let mut k = [0u128; 11];
        k[0] = key;
        for r in 1..11 {
            let t = aeskeygenassist(k[r - 1], RCON[r - 1]);
            let t = u128::from(dw(t, 3)) * 0x0000_0001_0000_0001_0000_0001_0000_0001;
            let p = k[r - 1];
            k[r] = p ^ (p << 32) ^ (p << 64) ^ (p << 96) ^ t;
        }
        k
    }

    /// Per-call cost of each operation (a timing loop, not an assertion on time):
    /// `cargo test -p hv-emu --release --lib crypto::tests::cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, run by hand"]
    fn cost() {
        use std::hint::black_box;
        use std::time::Instant;
        const N: u32 = 200_000;
        type Op = fn(u128, u128) -> u128;
        let ops: [(&str, Op); 8] = [
            ("aesenc", aesenc),
            ("aesenclast", aesenclast),
            ("aesdec", aesdec),
            ("aesdeclast", aesdeclast),
            ("aesimc", |a, _| aesimc(a)),
            ("aeskeygenassist", |a, _| aeskeygenassist(a, 0x1b)),
            ("pclmulqdq", |a, b| pclmulqdq(a, b, 0x01)),
            ("sha256rnds2", |a, b| sha256rnds2(a, b, a ^ b)),
        ];
        for (name, f) in ops {
            let mut s = 0x0011_2233_4455_6677_8899_aabb_ccdd_eeffu128;
            let k = 0x0f0e_0d0c_0b0a_0908_0706_0504_0302_0100u128;
            let t = Instant::now();
            for _ in 0..N {
                s = f(black_box(s), black_box(k));
            }
            black_box(s);
            println!(
                "{name}: {:.1} ns",
                t.elapsed().as_nanos() as f64 / f64::from(N)
            );
        }
    }

    #[test]
    fn sbox_matches_fips_197() {
        assert_eq!(reference::sbox(0x00), 0x63);
        assert_eq!(reference::sbox(0x53), 0xed);
        assert_eq!(reference::sbox(0xff), 0x16);
        assert_eq!(reference::inv_sbox(0x63), 0x00);
    }

    #[test]
    fn aes128_fips_197_appendix_c1() {
        let key = hex128("000102030405060708090a0b0c0d0e0f");
        let pt = hex128("00112233445566778899aabbccddeeff");
        let ct = hex128("69c4e0d86a7b0430d8cdb78070b4c55a");
        let k = expand(key);
        // FIPS-197 appendix C.1: the last round key.
        assert_eq!(k[10], hex128("13111d7fe3944a17f307a78b4d2b30c5"));
        let mut s = pt ^ k[0];
        for rk in &k[1..10] {
            s = aesenc(s, *rk);
        }
        assert_eq!(aesenclast(s, k[10]), ct);
        let mut s = ct ^ k[10];
        for r in (1..10).rev() {
            s = aesdec(s, aesimc(k[r]));
        }
        assert_eq!(aesdeclast(s, k[0]), pt);
    }

    #[test]
    fn clmul_small_and_top_bits() {
        assert_eq!(clmul(3, 3), 5);
        assert_eq!(clmul(u64::MAX, 2), u128::from(u64::MAX) << 1);
        assert_eq!(clmul(1 << 63, 1 << 63), 1u128 << 126);
        let a = 0x1111_2222_3333_4444_u128 | (0x8000_0000_0000_0001_u128 << 64);
        let b = 7u128 | (2u128 << 64);
        assert_eq!(pclmulqdq(a, b, 0x00), clmul(0x1111_2222_3333_4444, 7));
        assert_eq!(pclmulqdq(a, b, 0x11), clmul(0x8000_0000_0000_0001, 2));
        assert_eq!(pclmulqdq(a, b, 0x01), clmul(0x8000_0000_0000_0001, 7));
        assert_eq!(pclmulqdq(a, b, 0x10), clmul(0x1111_2222_3333_4444, 2));
    }

    fn pad_abc() -> [u32; 16] {
        let mut w = [0u32; 16];
        w[0] = 0x6162_6380;
        w[15] = 24;
        w
    }

    /// SHA-1 of "abc" with the instruction sequence software uses (FIPS 180 example).
    #[test]
    fn sha1_abc() {
        let h0 = [
            0x6745_2301u32,
            0xefcd_ab89,
            0x98ba_dcfe,
            0x1032_5476,
            0xc3d2_e1f0,
        ];
        let w = pad_abc();
        let mut m: Vec<u128> = (0..4)
            .map(|g| from_dw(w[4 * g], w[4 * g + 1], w[4 * g + 2], w[4 * g + 3]))
            .collect();
        for g in 4..20 {
            let x = sha1msg1(m[g - 4], m[g - 3]) ^ m[g - 2];
            m.push(sha1msg2(x, m[g - 1]));
        }
        let mut abcd = from_dw(h0[0], h0[1], h0[2], h0[3]);
        let mut saved = 0u128;
        for (g, mg) in m.iter().enumerate() {
            let e = if g == 0 {
                mg.wrapping_add(u128::from(h0[4]) << 96)
            } else {
                sha1nexte(saved, *mg)
            };
            saved = abcd;
            abcd = sha1rnds4(abcd, e, (g / 5) as u8);
        }
        let e = dw(sha1nexte(saved, 0), 3);
        let out = [
            dw(abcd, 3).wrapping_add(h0[0]),
            dw(abcd, 2).wrapping_add(h0[1]),
            dw(abcd, 1).wrapping_add(h0[2]),
            dw(abcd, 0).wrapping_add(h0[3]),
            e.wrapping_add(h0[4]),
        ];
        assert_eq!(
            out,
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
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];

    fn add32x4(a: u128, b: u128) -> u128 {
        from_dw(
            dw(a, 3).wrapping_add(dw(b, 3)),
            dw(a, 2).wrapping_add(dw(b, 2)),
            dw(a, 1).wrapping_add(dw(b, 1)),
            dw(a, 0).wrapping_add(dw(b, 0)),
        )
    }

    /// SHA-256 of "abc" with SHA256RNDS2/MSG1/MSG2 (FIPS 180 example).
    #[test]
    fn sha256_abc() {
        let h: [u32; 8] = [
            0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
            0x5be0cd19,
        ];
        let w = pad_abc();
        let mut m: Vec<u128> = (0..4)
            .map(|g| from_dw(w[4 * g + 3], w[4 * g + 2], w[4 * g + 1], w[4 * g]))
            .collect();
        for g in 4..16 {
            // palignr(m[g-1], m[g-2], 4): W[4g-7 .. 4g-4].
            let mid = (m[g - 2] >> 32) | (m[g - 1] << 96);
            let x = add32x4(sha256msg1(m[g - 4], m[g - 3]), mid);
            m.push(sha256msg2(x, m[g - 1]));
        }
        let mut abef = from_dw(h[0], h[1], h[4], h[5]);
        let mut cdgh = from_dw(h[2], h[3], h[6], h[7]);
        for (g, mg) in m.iter().enumerate() {
            let k = from_dw(
                K256[4 * g + 3],
                K256[4 * g + 2],
                K256[4 * g + 1],
                K256[4 * g],
            );
            let wk = add32x4(*mg, k);
            cdgh = sha256rnds2(cdgh, abef, wk);
            abef = sha256rnds2(abef, cdgh, wk >> 64);
        }
        let out = [
            dw(abef, 3).wrapping_add(h[0]),
            dw(abef, 2).wrapping_add(h[1]),
            dw(cdgh, 3).wrapping_add(h[2]),
            dw(cdgh, 2).wrapping_add(h[3]),
            dw(abef, 1).wrapping_add(h[4]),
            dw(abef, 0).wrapping_add(h[5]),
            dw(cdgh, 1).wrapping_add(h[6]),
            dw(cdgh, 0).wrapping_add(h[7]),
        ];
        assert_eq!(
            out,
            [
                0xba7816bf, 0x8f01cfea, 0x414140de, 0x5dae2223, 0xb00361a3, 0x96177a9c, 0xb410ff61,
                0xf20015ad
            ]
        );
    }
}
