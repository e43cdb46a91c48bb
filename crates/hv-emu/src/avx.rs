//! AVX, AVX2, FMA3, F16C (every VEX-encoded vector instruction) and the XSAVE family
//! (XSAVE/XRSTOR/XSAVEOPT/XSAVEC, XGETBV/XSETBV), with the YMM register file's upper halves.
//!
//! A VEX instruction either maps onto a legacy SSE operation applied to each 128-bit lane
//! ([`lane`]: the VEX mnemonic without its `V`, three operands instead of two) or has its own
//! arm in [`Exec::exec_vex`] (broadcasts, cross-lane permutes, masked moves, gathers, FMA,
//! F16C, widening conversions). VEX.128 forms zero bits 255:128 of their destination; legacy
//! SSE (sse.rs) leaves them alone. Floating point goes through `vfp` (MXCSR rounding, DAZ/FTZ,
//! exception flags; an unmasked exception raises #XM, or #UD without CR4.OSXMMEXCPT, and
//! writes nothing).

// Lane-wise loops index several arrays at once.
#![allow(clippy::needless_range_loop)]

use std::collections::HashMap;
use std::sync::OnceLock;

use hv::CpuModel;
use hv::cpu_model::Feature;
use iced_x86::{CpuidFeature, Instruction, Mnemonic as M, OpKind, Register};

use crate::cpu::{ARITH_FLAGS, CF, CR0_TS, ZF};
use crate::exec::{Exc, Exec, R, gp0, ud};
use crate::vfp::{Env, Fl};

pub const XCR0_X87: u64 = 1;
pub const XCR0_SSE: u64 = 2;
pub const XCR0_AVX: u64 = 4;
/// Offset of YMM_Hi128 (state component 2) in the standard and (as the first extended
/// component) the compacted XSAVE format.
pub const YMM_OFFSET: usize = 576;
pub const CR4_OSXSAVE: u64 = 1 << 18;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const XSAVE_HEADER: u64 = 512;

/// XCR0 bits a model supports (CPUID.(0xD,0):EDX:EAX); x87|SSE without XSAVE, so that states
/// of older models with XCR0 = 3 stay acceptable.
pub fn xcr0_supported(model: &CpuModel) -> u64 {
    if !model.has(Feature::Xsave) {
        return XCR0_X87 | XCR0_SSE;
    }
    model.lookup(0xd, 0).map_or(XCR0_X87 | XCR0_SSE, |e| {
        u64::from(e.eax) | (u64::from(e.edx) << 32)
    })
}

/// Every XSAVE state component the model's CPUID leaf 0xD gives a size (sub-leaves 2..62),
/// including ones its XCR0 cannot enable (`CpuModel::avx512_xsave_layout`).
pub fn laid_out_components(model: &CpuModel) -> u64 {
    if !model.has(Feature::Xsave) {
        return 0;
    }
    (2..63u32)
        .filter(|i| model.lookup(0xd, *i).is_some_and(|e| e.eax != 0))
        .fold(0, |m, i| m | (1 << i))
}

/// A 256-bit value: lanes 0 (bits 127:0) and 1 (bits 255:128).
type Y = [u128; 2];

/// The legacy mnemonic of each VEX mnemonic (`Vaddps` -> `Addps`).
fn legacy(mn: M) -> Option<M> {
    static MAP: OnceLock<HashMap<M, M>> = OnceLock::new();
    let map = MAP.get_or_init(|| {
        let by_name: HashMap<String, M> = M::values().map(|m| (format!("{m:?}"), m)).collect();
        M::values()
            .filter_map(|m| {
                let name = format!("{m:?}");
                let rest = name.strip_prefix('V')?;
                let mut c = rest.chars();
                let first = c.next()?.to_ascii_uppercase();
                let legacy_name: String = std::iter::once(first).chain(c).collect();
                by_name.get(&legacy_name).map(|l| (m, *l))
            })
            .collect()
    });
    map.get(&mn).copied()
}

fn vreg(r: Register) -> Option<(usize, bool)> {
    let n = r as usize;
    let x0 = Register::XMM0 as usize;
    let y0 = Register::YMM0 as usize;
    if (x0..x0 + 16).contains(&n) {
        Some((n - x0, false))
    } else if (y0..y0 + 16).contains(&n) {
        Some((n - y0, true))
    } else {
        None
    }
}

fn is_gpr(r: Register) -> bool {
    (Register::AL as usize..=Register::R15 as usize).contains(&(r as usize))
}

// ---- element helpers (the legacy SSE code's, one definition) ----

use crate::sse::{
    from_u8s as from8, from_u16s as from16, from_u32s as from32, from_u64s as from64, map8, map16,
    map32, map64, sat_i8, sat_i16, sat_u8, sat_u16, u8s as b8, u16s as w16, u32s as d32,
    u64s as q64,
};

/// Interleaves the low (or high) halves of `a` and `b` by elements of `size` bytes.
fn unpack(a: u128, b: u128, size: usize, high: bool) -> u128 {
    let (x, y) = (b8(a), b8(b));
    let mut o = [0u8; 16];
    let base = if high { 8 } else { 0 };
    for e in 0..8 / size {
        for k in 0..size {
            o[2 * e * size + k] = x[base + e * size + k];
            o[2 * e * size + size + k] = y[base + e * size + k];
        }
    }
    from8(o)
}

fn f32s(v: u128) -> [f32; 4] {
    d32(v).map(f32::from_bits)
}
fn from_f32s(a: [f32; 4]) -> u128 {
    from32(a.map(f32::to_bits))
}
fn f64s(v: u128) -> [f64; 2] {
    q64(v).map(f64::from_bits)
}
fn from_f64s(a: [f64; 2]) -> u128 {
    from64(a.map(f64::to_bits))
}

/// One VEX compare predicate (0..31) on two values: (result, signaling).
fn cmp_pred<F: Fl>(p: u8, x: F, y: F) -> (bool, bool) {
    let un = x.is_nan_() || y.is_nan_();
    let lt = !un && x < y;
    let eq = !un && x == y;
    let gt = !un && x > y;
    let r = match p & 0xf {
        0 => eq,
        1 => lt,
        2 => lt || eq,
        3 => un,
        4 => !eq,
        5 => !lt,
        6 => !(lt || eq),
        7 => !un,
        8 => eq || un,
        9 => lt || un,
        10 => lt || eq || un,
        11 => false,
        12 => !eq && !un,
        13 => gt || eq,
        14 => gt,
        _ => true,
    };
    let quiet_low = matches!(p & 0xf, 0 | 3 | 4 | 7 | 8 | 11 | 12 | 15);
    let signaling = quiet_low == (p & 0x10 != 0);
    (r, signaling)
}

/// Integer operations of one 128-bit lane, by legacy mnemonic: `a` is the first source (the
/// destination of the legacy form), `b` the second; unary operations read `b`.
fn int_lane(mn: M, a: u128, b: u128, imm: u8) -> Option<u128> {
    let i8_ = |x: u8| i32::from(x as i8);
    let i16_ = |x: u16| i32::from(x as i16);
    Some(match mn {
        M::Paddb => map8(a, b, u8::wrapping_add),
        M::Paddw => map16(a, b, u16::wrapping_add),
        M::Paddd => map32(a, b, u32::wrapping_add),
        M::Paddq => map64(a, b, u64::wrapping_add),
        M::Psubb => map8(a, b, u8::wrapping_sub),
        M::Psubw => map16(a, b, u16::wrapping_sub),
        M::Psubd => map32(a, b, u32::wrapping_sub),
        M::Psubq => map64(a, b, u64::wrapping_sub),
        M::Paddsb => map8(a, b, |x, y| sat_i8(i8_(x) + i8_(y))),
        M::Paddsw => map16(a, b, |x, y| sat_i16(i16_(x) + i16_(y))),
        M::Paddusb => map8(a, b, u8::saturating_add),
        M::Paddusw => map16(a, b, u16::saturating_add),
        M::Psubsb => map8(a, b, |x, y| sat_i8(i8_(x) - i8_(y))),
        M::Psubsw => map16(a, b, |x, y| sat_i16(i16_(x) - i16_(y))),
        M::Psubusb => map8(a, b, u8::saturating_sub),
        M::Psubusw => map16(a, b, u16::saturating_sub),
        M::Pmullw => map16(a, b, u16::wrapping_mul),
        M::Pmulhw => map16(a, b, |x, y| ((i16_(x) * i16_(y)) >> 16) as u16),
        M::Pmulhuw => map16(a, b, |x, y| ((u32::from(x) * u32::from(y)) >> 16) as u16),
        M::Pmulhrsw => map16(a, b, |x, y| ((((i16_(x) * i16_(y)) >> 14) + 1) >> 1) as u16),
        M::Pmulld => map32(a, b, u32::wrapping_mul),
        M::Pmuludq => map64(a, b, |x, y| (x & 0xffff_ffff) * (y & 0xffff_ffff)),
        M::Pmuldq => map64(a, b, |x, y| {
            (i64::from(x as i32)).wrapping_mul(i64::from(y as i32)) as u64
        }),
        M::Pmaddwd => {
            let (x, y) = (w16(a), w16(b));
            from32(std::array::from_fn(|k| {
                (i16_(x[2 * k]) * i16_(y[2 * k]))
                    .wrapping_add(i16_(x[2 * k + 1]) * i16_(y[2 * k + 1])) as u32
            }))
        }
        M::Pmaddubsw => {
            let (x, y) = (b8(a), b8(b));
            from16(std::array::from_fn(|k| {
                sat_i16(
                    i32::from(x[2 * k]) * i8_(y[2 * k])
                        + i32::from(x[2 * k + 1]) * i8_(y[2 * k + 1]),
                )
            }))
        }
        M::Psadbw => {
            let (x, y) = (b8(a), b8(b));
            let s = |h: usize| -> u64 {
                (0..8)
                    .map(|k| u64::from(x[h * 8 + k].abs_diff(y[h * 8 + k])))
                    .sum()
            };
            from64([s(0), s(1)])
        }
        M::Pavgb => map8(a, b, |x, y| ((u16::from(x) + u16::from(y) + 1) >> 1) as u8),
        M::Pavgw => map16(a, b, |x, y| ((u32::from(x) + u32::from(y) + 1) >> 1) as u16),
        M::Pminsb => map8(a, b, |x, y| (x as i8).min(y as i8) as u8),
        M::Pminsw => map16(a, b, |x, y| (x as i16).min(y as i16) as u16),
        M::Pminsd => map32(a, b, |x, y| (x as i32).min(y as i32) as u32),
        M::Pminub => map8(a, b, u8::min),
        M::Pminuw => map16(a, b, u16::min),
        M::Pminud => map32(a, b, u32::min),
        M::Pmaxsb => map8(a, b, |x, y| (x as i8).max(y as i8) as u8),
        M::Pmaxsw => map16(a, b, |x, y| (x as i16).max(y as i16) as u16),
        M::Pmaxsd => map32(a, b, |x, y| (x as i32).max(y as i32) as u32),
        M::Pmaxub => map8(a, b, u8::max),
        M::Pmaxuw => map16(a, b, u16::max),
        M::Pmaxud => map32(a, b, u32::max),
        M::Pcmpeqb => map8(a, b, |x, y| if x == y { 0xff } else { 0 }),
        M::Pcmpeqw => map16(a, b, |x, y| if x == y { 0xffff } else { 0 }),
        M::Pcmpeqd => map32(a, b, |x, y| if x == y { u32::MAX } else { 0 }),
        M::Pcmpeqq => map64(a, b, |x, y| if x == y { u64::MAX } else { 0 }),
        M::Pcmpgtb => map8(a, b, |x, y| if (x as i8) > (y as i8) { 0xff } else { 0 }),
        M::Pcmpgtw => map16(
            a,
            b,
            |x, y| if (x as i16) > (y as i16) { 0xffff } else { 0 },
        ),
        M::Pcmpgtd => map32(
            a,
            b,
            |x, y| if (x as i32) > (y as i32) { u32::MAX } else { 0 },
        ),
        M::Pcmpgtq => map64(
            a,
            b,
            |x, y| if (x as i64) > (y as i64) { u64::MAX } else { 0 },
        ),
        M::Pand | M::Andps | M::Andpd => a & b,
        M::Pandn | M::Andnps | M::Andnpd => !a & b,
        M::Por | M::Orps | M::Orpd => a | b,
        M::Pxor | M::Xorps | M::Xorpd => a ^ b,
        M::Punpcklbw => unpack(a, b, 1, false),
        M::Punpcklwd => unpack(a, b, 2, false),
        M::Punpckldq | M::Unpcklps => unpack(a, b, 4, false),
        M::Punpcklqdq | M::Unpcklpd => unpack(a, b, 8, false),
        M::Punpckhbw => unpack(a, b, 1, true),
        M::Punpckhwd => unpack(a, b, 2, true),
        M::Punpckhdq | M::Unpckhps => unpack(a, b, 4, true),
        M::Punpckhqdq | M::Unpckhpd => unpack(a, b, 8, true),
        M::Packsswb | M::Packuswb => {
            let (x, y) = (w16(a), w16(b));
            let f = |v: u16| {
                if mn == M::Packsswb {
                    sat_i8(i16_(v))
                } else {
                    sat_u8(i16_(v))
                }
            };
            from8(std::array::from_fn(|k| {
                if k < 8 { f(x[k]) } else { f(y[k - 8]) }
            }))
        }
        M::Packssdw | M::Packusdw => {
            let (x, y) = (d32(a), d32(b));
            let f = |v: u32| {
                if mn == M::Packssdw {
                    sat_i16(v as i32)
                } else {
                    sat_u16(v as i32)
                }
            };
            from16(std::array::from_fn(|k| {
                if k < 4 { f(x[k]) } else { f(y[k - 4]) }
            }))
        }
        M::Pshufb => {
            let (x, y) = (b8(a), b8(b));
            from8(std::array::from_fn(|k| {
                if y[k] & 0x80 != 0 {
                    0
                } else {
                    x[usize::from(y[k] & 15)]
                }
            }))
        }
        M::Pshufd | M::Vpermilps => {
            let x = d32(b);
            from32(std::array::from_fn(|k| {
                x[usize::from((imm >> (2 * k)) & 3)]
            }))
        }
        M::Pshufhw => {
            let x = w16(b);
            from16(std::array::from_fn(|k| {
                if k < 4 {
                    x[k]
                } else {
                    x[4 + usize::from((imm >> (2 * (k - 4))) & 3)]
                }
            }))
        }
        M::Pshuflw => {
            let x = w16(b);
            from16(std::array::from_fn(|k| {
                if k < 4 {
                    x[usize::from((imm >> (2 * k)) & 3)]
                } else {
                    x[k]
                }
            }))
        }
        M::Shufps => {
            let (x, y) = (d32(a), d32(b));
            let s = |k: usize| usize::from((imm >> (2 * k)) & 3);
            from32([x[s(0)], x[s(1)], y[s(2)], y[s(3)]])
        }
        M::Shufpd => {
            let (x, y) = (q64(a), q64(b));
            from64([x[usize::from(imm & 1)], y[usize::from((imm >> 1) & 1)]])
        }
        M::Vpermilpd => {
            let x = q64(b);
            from64([x[usize::from(imm & 1)], x[usize::from((imm >> 1) & 1)]])
        }
        M::Palignr => {
            let sh = u32::from(imm) * 8;
            let lo = if sh >= 128 { 0 } else { b >> sh };
            let hi = if sh >= 256 {
                0
            } else if sh >= 128 {
                a >> (sh - 128)
            } else if sh == 0 {
                0
            } else {
                a << (128 - sh)
            };
            lo | hi
        }
        M::Pblendw => {
            let (x, y) = (w16(a), w16(b));
            from16(std::array::from_fn(|k| {
                if imm & (1 << k) != 0 { y[k] } else { x[k] }
            }))
        }
        M::Blendps | M::Vpblendd => {
            let (x, y) = (d32(a), d32(b));
            from32(std::array::from_fn(|k| {
                if imm & (1 << k) != 0 { y[k] } else { x[k] }
            }))
        }
        M::Blendpd => {
            let (x, y) = (q64(a), q64(b));
            from64(std::array::from_fn(|k| {
                if imm & (1 << k) != 0 { y[k] } else { x[k] }
            }))
        }
        M::Phaddw | M::Phsubw | M::Phaddsw | M::Phsubsw => {
            let (x, y) = (w16(a), w16(b));
            let f = |p: u16, q: u16| -> u16 {
                match mn {
                    M::Phaddw => p.wrapping_add(q),
                    M::Phsubw => p.wrapping_sub(q),
                    M::Phaddsw => sat_i16(i16_(p) + i16_(q)),
                    _ => sat_i16(i16_(p) - i16_(q)),
                }
            };
            from16(std::array::from_fn(|k| {
                let s = if k < 4 { &x } else { &y };
                let j = (k % 4) * 2;
                f(s[j], s[j + 1])
            }))
        }
        M::Phaddd | M::Phsubd => {
            let (x, y) = (d32(a), d32(b));
            let f = |p: u32, q: u32| {
                if mn == M::Phaddd {
                    p.wrapping_add(q)
                } else {
                    p.wrapping_sub(q)
                }
            };
            from32([f(x[0], x[1]), f(x[2], x[3]), f(y[0], y[1]), f(y[2], y[3])])
        }
        M::Psignb => map8(a, b, |x, y| match (y as i8).signum() {
            -1 => x.wrapping_neg(),
            0 => 0,
            _ => x,
        }),
        M::Psignw => map16(a, b, |x, y| match (y as i16).signum() {
            -1 => x.wrapping_neg(),
            0 => 0,
            _ => x,
        }),
        M::Psignd => map32(a, b, |x, y| match (y as i32).signum() {
            -1 => x.wrapping_neg(),
            0 => 0,
            _ => x,
        }),
        M::Pabsb => map8(b, 0, |x, _| (x as i8).unsigned_abs()),
        M::Pabsw => map16(b, 0, |x, _| (x as i16).unsigned_abs()),
        M::Pabsd => map32(b, 0, |x, _| (x as i32).unsigned_abs()),
        M::Movddup => {
            let x = q64(b);
            from64([x[0], x[0]])
        }
        M::Movshdup => {
            let x = d32(b);
            from32([x[1], x[1], x[3], x[3]])
        }
        M::Movsldup => {
            let x = d32(b);
            from32([x[0], x[0], x[2], x[2]])
        }
        M::Phminposuw => {
            let x = w16(b);
            let mut best = 0;
            for k in 1..8 {
                if x[k] < x[best] {
                    best = k;
                }
            }
            u128::from(x[best]) | ((best as u128) << 16)
        }
        M::Mpsadbw => {
            let (x, y) = (b8(a), b8(b));
            let bo = usize::from(imm & 3) * 4;
            let ao = usize::from((imm >> 2) & 1) * 4;
            from16(std::array::from_fn(|k| {
                (0..4)
                    .map(|j| u16::from(x[ao + k + j].abs_diff(y[bo + j])))
                    .sum()
            }))
        }
        M::Pslldq => {
            let n = u32::from(imm);
            if n > 15 { 0 } else { b << (n * 8) }
        }
        M::Psrldq => {
            let n = u32::from(imm);
            if n > 15 { 0 } else { b >> (n * 8) }
        }
        _ => return None,
    })
}

/// Shifts of one lane by `c` (an immediate or the low 64 bits of a count register).
fn shift_lane(mn: M, v: u128, c: u64) -> Option<u128> {
    Some(match mn {
        M::Psllw => map16(v, 0, |x, _| if c > 15 { 0 } else { x << c }),
        M::Pslld => map32(v, 0, |x, _| if c > 31 { 0 } else { x << c }),
        M::Psllq => map64(v, 0, |x, _| if c > 63 { 0 } else { x << c }),
        M::Psrlw => map16(v, 0, |x, _| if c > 15 { 0 } else { x >> c }),
        M::Psrld => map32(v, 0, |x, _| if c > 31 { 0 } else { x >> c }),
        M::Psrlq => map64(v, 0, |x, _| if c > 63 { 0 } else { x >> c }),
        M::Psraw => map16(v, 0, |x, _| ((x as i16) >> c.min(15)) as u16),
        M::Psrad => map32(v, 0, |x, _| ((x as i32) >> c.min(31)) as u32),
        _ => return None,
    })
}

/// VDPPS/VDPPD of `lanes` 128-bit lanes, step by step (products, then the sums) over every
/// lane at once: a step that raises an unmasked exception ends the instruction (the caller's
/// `fp_done` faults), and the flags of the steps before it stay recorded.
fn dot_product(
    ps: bool,
    a: [u128; 2],
    b: [u128; 2],
    lanes: usize,
    imm: u8,
    env: &mut Env,
) -> [u128; 2] {
    let mut r = [0u128; 2];
    if ps {
        let mut t = [[0f32; 4]; 2];
        for l in 0..lanes {
            let (x, y) = (f32s(a[l]), f32s(b[l]));
            for k in 0..4 {
                if imm & (0x10 << k) != 0 {
                    t[l][k] = env.mul(x[k], y[k]);
                }
            }
        }
        if env.end_step() {
            return r;
        }
        // Only which NaN a sum returns depends on the order of its operands. The order here
        // reproduces the host CPU (measured with tests/integration/avx.rs's differential run): a
        // butterfly, v[j] = t[j^1] + t[j], then element j = v[j] + v[j^2].
        let mut v = [[0f32; 4]; 2];
        for l in 0..lanes {
            for j in 0..4 {
                v[l][j] = env.add(t[l][j ^ 1], t[l][j]);
            }
        }
        if env.end_step() {
            return r;
        }
        for l in 0..lanes {
            // The sums are computed (and raise their flags) whether written or not.
            let mut o = [0f32; 4];
            for j in 0..4 {
                let sum = env.add(v[l][j], v[l][j ^ 2]);
                o[j] = if imm & (1 << j) != 0 { sum } else { 0.0 };
            }
            r[l] = from_f32s(o);
        }
    } else {
        let mut t = [[0f64; 2]; 2];
        for l in 0..lanes {
            let (x, y) = (f64s(a[l]), f64s(b[l]));
            for k in 0..2 {
                if imm & (0x10 << k) != 0 {
                    t[l][k] = env.mul(x[k], y[k]);
                }
            }
        }
        if env.end_step() {
            return r;
        }
        for l in 0..lanes {
            // Element j adds its own product first (measured, as for DPPS).
            let mut o = [0f64; 2];
            for j in 0..2 {
                let sum = env.add(t[l][j], t[l][j ^ 1]);
                o[j] = if imm & (1 << j) != 0 { sum } else { 0.0 };
            }
            r[l] = from_f64s(o);
        }
    }
    r
}

/// Floating-point operations of one 128-bit lane, by legacy mnemonic (see [`int_lane`]).
fn fp_lane(mn: M, a: u128, b: u128, imm: u8, env: &mut Env) -> Option<u128> {
    let lo32 = 0xffff_ffffu128;
    let lo64 = u128::from(u64::MAX);
    let ss = |env: &mut Env, f: &dyn Fn(&mut Env, f32, f32) -> f32| -> u128 {
        let r = f(env, f32::from_bits(a as u32), f32::from_bits(b as u32));
        (a & !lo32) | u128::from(r.to_bits())
    };
    let sd = |env: &mut Env, f: &dyn Fn(&mut Env, f64, f64) -> f64| -> u128 {
        let r = f(env, f64::from_bits(a as u64), f64::from_bits(b as u64));
        (a & !lo64) | u128::from(r.to_bits())
    };
    let ps = |env: &mut Env, f: &dyn Fn(&mut Env, f32, f32) -> f32| -> u128 {
        let (x, y) = (f32s(a), f32s(b));
        let mut o = [0f32; 4];
        for k in 0..4 {
            o[k] = f(env, x[k], y[k]);
        }
        from_f32s(o)
    };
    let pd = |env: &mut Env, f: &dyn Fn(&mut Env, f64, f64) -> f64| -> u128 {
        let (x, y) = (f64s(a), f64s(b));
        let mut o = [0f64; 2];
        for k in 0..2 {
            o[k] = f(env, x[k], y[k]);
        }
        from_f64s(o)
    };
    let rc = env.rc;
    Some(match mn {
        M::Addss => ss(env, &|e, x, y| e.add(x, y)),
        M::Subss => ss(env, &|e, x, y| e.sub(x, y)),
        M::Mulss => ss(env, &|e, x, y| e.mul(x, y)),
        M::Divss => ss(env, &|e, x, y| e.div(x, y)),
        M::Minss => ss(env, &|e, x, y| e.minmax(x, y, false)),
        M::Maxss => ss(env, &|e, x, y| e.minmax(x, y, true)),
        M::Sqrtss => ss(env, &|e, _, y| e.sqrt(y)),
        M::Addsd => sd(env, &|e, x, y| e.add(x, y)),
        M::Subsd => sd(env, &|e, x, y| e.sub(x, y)),
        M::Mulsd => sd(env, &|e, x, y| e.mul(x, y)),
        M::Divsd => sd(env, &|e, x, y| e.div(x, y)),
        M::Minsd => sd(env, &|e, x, y| e.minmax(x, y, false)),
        M::Maxsd => sd(env, &|e, x, y| e.minmax(x, y, true)),
        M::Sqrtsd => sd(env, &|e, _, y| e.sqrt(y)),
        M::Addps => ps(env, &|e, x, y| e.add(x, y)),
        M::Subps => ps(env, &|e, x, y| e.sub(x, y)),
        M::Mulps => ps(env, &|e, x, y| e.mul(x, y)),
        M::Divps => ps(env, &|e, x, y| e.div(x, y)),
        M::Minps => ps(env, &|e, x, y| e.minmax(x, y, false)),
        M::Maxps => ps(env, &|e, x, y| e.minmax(x, y, true)),
        M::Sqrtps => ps(env, &|e, _, y| e.sqrt(y)),
        M::Addpd => pd(env, &|e, x, y| e.add(x, y)),
        M::Subpd => pd(env, &|e, x, y| e.sub(x, y)),
        M::Mulpd => pd(env, &|e, x, y| e.mul(x, y)),
        M::Divpd => pd(env, &|e, x, y| e.div(x, y)),
        M::Minpd => pd(env, &|e, x, y| e.minmax(x, y, false)),
        M::Maxpd => pd(env, &|e, x, y| e.minmax(x, y, true)),
        M::Sqrtpd => pd(env, &|e, _, y| e.sqrt(y)),
        M::Addsubps => {
            let (x, y) = (f32s(a), f32s(b));
            let mut o = [0f32; 4];
            for k in 0..4 {
                o[k] = if k % 2 == 0 {
                    env.sub(x[k], y[k])
                } else {
                    env.add(x[k], y[k])
                };
            }
            from_f32s(o)
        }
        M::Addsubpd => {
            let (x, y) = (f64s(a), f64s(b));
            from_f64s([env.sub(x[0], y[0]), env.add(x[1], y[1])])
        }
        M::Haddps | M::Hsubps => {
            let (x, y) = (f32s(a), f32s(b));
            let mut f = |p: f32, q: f32| {
                if mn == M::Haddps {
                    env.add(p, q)
                } else {
                    env.sub(p, q)
                }
            };
            let o = [f(x[0], x[1]), f(x[2], x[3]), f(y[0], y[1]), f(y[2], y[3])];
            from_f32s(o)
        }
        M::Haddpd | M::Hsubpd => {
            let (x, y) = (f64s(a), f64s(b));
            let mut f = |p: f64, q: f64| {
                if mn == M::Haddpd {
                    env.add(p, q)
                } else {
                    env.sub(p, q)
                }
            };
            let o = [f(x[0], x[1]), f(y[0], y[1])];
            from_f64s(o)
        }
        M::Roundps | M::Roundpd | M::Roundss | M::Roundsd => {
            let m = if imm & 4 != 0 { rc } else { u32::from(imm & 3) };
            let pe = imm & 8 == 0;
            match mn {
                M::Roundps => from_f32s(f32s(b).map(|v| env.round_int(v, m, pe))),
                M::Roundpd => from_f64s(f64s(b).map(|v| env.round_int(v, m, pe))),
                M::Roundss => {
                    let r = env.round_int(f32::from_bits(b as u32), m, pe);
                    (a & !lo32) | u128::from(r.to_bits())
                }
                _ => {
                    let r = env.round_int(f64::from_bits(b as u64), m, pe);
                    (a & !lo64) | u128::from(r.to_bits())
                }
            }
        }
        M::Cmpps | M::Cmpss => {
            let (x, y) = (f32s(a), f32s(b));
            let n = if mn == M::Cmpps { 4 } else { 1 };
            let mut o = d32(a);
            for k in 0..n {
                let (_, sig) = cmp_pred(imm, x[k], y[k]);
                let (p, q) = env.cmp_inputs(x[k], y[k], sig);
                o[k] = if cmp_pred(imm, p, q).0 { u32::MAX } else { 0 };
            }
            from32(o)
        }
        M::Cmppd | M::Cmpsd => {
            let (x, y) = (f64s(a), f64s(b));
            let n = if mn == M::Cmppd { 2 } else { 1 };
            let mut o = q64(a);
            for k in 0..n {
                let (_, sig) = cmp_pred(imm, x[k], y[k]);
                let (p, q) = env.cmp_inputs(x[k], y[k], sig);
                o[k] = if cmp_pred(imm, p, q).0 { u64::MAX } else { 0 };
            }
            from64(o)
        }
        M::Cvtdq2ps => from_f32s(d32(b).map(|v| env.int_to_float::<f32>(i64::from(v as i32)))),
        M::Cvtps2dq => from32(f32s(b).map(|v| env.float_to_int(v, 32, rc) as u32)),
        M::Cvttps2dq => from32(f32s(b).map(|v| env.float_to_int(v, 32, 3) as u32)),
        M::Cvtdq2pd => {
            let x = d32(b);
            from_f64s([f64::from(x[0] as i32), f64::from(x[1] as i32)])
        }
        M::Cvtps2pd => {
            let x = f32s(b);
            from_f64s([env.widen(x[0]), env.widen(x[1])])
        }
        M::Cvtpd2ps => {
            let x = f64s(b);
            let lo = [env.narrow(x[0]), env.narrow(x[1])];
            u128::from(lo[0].to_bits()) | (u128::from(lo[1].to_bits()) << 32)
        }
        M::Cvtpd2dq | M::Cvttpd2dq => {
            let m = if mn == M::Cvtpd2dq { rc } else { 3 };
            let x = f64s(b);
            u128::from(env.float_to_int(x[0], 32, m))
                | (u128::from(env.float_to_int(x[1], 32, m)) << 32)
        }
        M::Cvtss2sd => {
            let r = env.widen(f32::from_bits(b as u32));
            (a & !lo64) | u128::from(r.to_bits())
        }
        M::Cvtsd2ss => {
            let r = env.narrow(f64::from_bits(b as u64));
            (a & !lo32) | u128::from(r.to_bits())
        }
        M::Rcpps | M::Rsqrtps => from_f32s(f32s(b).map(|v| approx(mn, v))),
        M::Rcpss | M::Rsqrtss => {
            let r = approx(mn, f32::from_bits(b as u32));
            (a & !lo32) | u128::from(r.to_bits())
        }
        M::Insertps => {
            // (A memory source is one dword: the caller clears the count_s bits.)
            let src = d32(b)[usize::from((imm >> 6) & 3)];
            let mut o = d32(a);
            o[usize::from((imm >> 4) & 3)] = src;
            for k in 0..4 {
                if imm & (1 << k) != 0 {
                    o[k] = 0;
                }
            }
            from32(o)
        }
        _ => return None,
    })
}

/// RCP/RSQRT: an approximation with a relative error below 1.5 * 2^-12, as the SDM allows.
/// Hardware tables differ between vendors; this rounds the exact value to 12 significant bits.
fn approx(mn: M, v: f32) -> f32 {
    let x = f64::from(v);
    let r = if matches!(mn, M::Rcpps | M::Rcpss) {
        1.0 / x
    } else {
        1.0 / x.sqrt()
    };
    if !r.is_finite() || r == 0.0 {
        return r as f32;
    }
    let bits = (r as f32).to_bits();
    let rounded = bits.wrapping_add(0x400) & !0x7ff;
    f32::from_bits(rounded)
}

impl Exec<'_> {
    // ---------------- CPUID and XSAVE family ----------------

    /// CPUID answers that follow the vCPU's state: leaf 1 ECX.OSXSAVE = CR4.OSXSAVE; leaf 0xD
    /// sub-leaf 0 EBX = XSAVE area size for the current XCR0, sub-leaf 1 EBX = the compacted
    /// size for XCR0 (as KVM computes them).
    pub fn cpuid_dynamic(&self, f: u32, idx: u32, mut v: [u32; 4]) -> [u32; 4] {
        if !self.has(Feature::Xsave) {
            return v;
        }
        match (f, idx) {
            (1, _) => {
                v[2] &= !(1 << 27);
                if self.cpu.cr4 & CR4_OSXSAVE != 0 {
                    v[2] |= 1 << 27;
                }
            }
            (0xd, 0) => v[1] = self.xsave_size(self.cpu.xcr0, false) as u32,
            (0xd, 1) if v[0] & 0b10 != 0 => {
                v[1] = self.xsave_size(self.cpu.xcr0, true) as u32;
            }
            _ => {}
        }
        v
    }

    /// Size of an XSAVE area holding the components of `mask` (standard or compacted form).
    /// (AVX is the only extended component and the first one, so both forms agree.)
    fn xsave_size(&self, mask: u64, _compacted: bool) -> usize {
        if mask & XCR0_AVX != 0 {
            YMM_OFFSET + 256
        } else {
            YMM_OFFSET
        }
    }

    /// XINUSE: components not in their initial configuration (x87, SSE incl. MXCSR, AVX).
    pub fn xinuse(&self) -> u64 {
        let c = &*self.cpu;
        let mut v = 0;
        if c.fcw != 0x37f
            || c.fsw != 0
            || c.ftw != 0
            || c.fop != 0
            || c.fip != 0
            || c.fdp != 0
            || c.st.iter().any(|s| s[..10].iter().any(|b| *b != 0))
        {
            v |= XCR0_X87;
        }
        if c.xmm.iter().any(|x| *x != 0) || c.mxcsr != 0x1f80 {
            v |= XCR0_SSE;
        }
        if c.ymm_hi.iter().any(|x| *x != 0) {
            v |= XCR0_AVX;
        }
        v
    }

    fn osxsave(&self) -> R<()> {
        if !self.has(Feature::Xsave) || self.cpu.cr4 & CR4_OSXSAVE == 0 {
            return ud();
        }
        Ok(())
    }

    pub fn exec_xsave(&mut self, i: &Instruction) -> R<()> {
        let mn = i.mnemonic();
        let need = match mn {
            M::Xsaveopt | M::Xsaveopt64 => Feature::Xsaveopt,
            M::Xsavec | M::Xsavec64 => Feature::Xsavec,
            _ => Feature::Xsave,
        };
        if !self.has(need) {
            return ud();
        }
        self.osxsave()?;
        match mn {
            M::Xgetbv => {
                let v = match self.cpu.gpr[1] as u32 {
                    0 => self.cpu.xcr0,
                    1 if self.has(Feature::Xgetbv1) => self.cpu.xcr0 & self.xinuse(),
                    _ => return gp0(),
                };
                self.cpu.gpr[0] = v & 0xffff_ffff;
                self.cpu.gpr[2] = v >> 32;
                Ok(())
            }
            M::Xsetbv => {
                if self.cpu.cpl != 0 || self.cpu.gpr[1] as u32 != 0 {
                    return gp0();
                }
                let v = (self.cpu.gpr[0] & 0xffff_ffff) | (self.cpu.gpr[2] << 32);
                let ok = v & XCR0_X87 != 0
                    && (v & XCR0_AVX == 0 || v & XCR0_SSE != 0)
                    && v & !xcr0_supported(&self.vm.model) == 0;
                if !ok {
                    return gp0();
                }
                if v & XCR0_AVX == 0 {
                    self.cpu.ymm_hi = [0; 16];
                }
                self.cpu.xcr0 = v;
                Ok(())
            }
            _ => {
                if self.cpu.cr0 & CR0_TS != 0 {
                    return Err(Exc::Fault(7, None));
                }
                let a = self.mem_lin(i)?;
                if a & 63 != 0 {
                    return gp0();
                }
                let rfbm =
                    ((self.cpu.gpr[0] & 0xffff_ffff) | (self.cpu.gpr[2] << 32)) & self.cpu.xcr0;
                match mn {
                    M::Xrstor | M::Xrstor64 => self.xrstor(a, rfbm),
                    M::Xsavec | M::Xsavec64 => self.xsave(a, rfbm, 2),
                    M::Xsaveopt | M::Xsaveopt64 => self.xsave(a, rfbm, 1),
                    _ => self.xsave(a, rfbm, 0),
                }
            }
        }
    }

    /// XSAVE (`kind` 0), XSAVEOPT (1, skips components in their initial configuration) and
    /// XSAVEC (2, compacted, skips them too).
    fn xsave(&mut self, a: u64, rfbm: u64, kind: u8) -> R<()> {
        let inuse = self.xinuse();
        let end = self.xsave_size(rfbm, kind == 2);
        self.probe_write(a, end)?;
        let img = self.fpu_image();
        let save = |k: u64| -> bool { rfbm & k != 0 && (kind == 0 || inuse & k != 0) };
        let mut ranges: Vec<(usize, usize)> = Vec::new();
        if save(XCR0_X87) {
            ranges.push((0, 24));
            ranges.push((32, 160));
        }
        if (kind == 2 && save(XCR0_SSE)) || (kind != 2 && rfbm & (XCR0_SSE | XCR0_AVX) != 0) {
            ranges.push((24, 32));
        }
        if save(XCR0_SSE) {
            ranges.push((160, 416));
        }
        for (s, e) in ranges {
            for off in (s..e).step_by(8) {
                let mut w = [0u8; 8];
                w.copy_from_slice(&img[off..off + 8]);
                self.write_lin(a + off as u64, 8, u64::from_le_bytes(w))?;
            }
        }
        if save(XCR0_AVX) {
            for k in 0..16 {
                let v = self.cpu.ymm_hi[k];
                self.write_u128(a + YMM_OFFSET as u64 + 16 * k as u64, v)?;
            }
        }
        let hdr = a + XSAVE_HEADER;
        if kind == 2 {
            let bv = inuse & rfbm;
            self.write_lin(hdr, 8, bv)?;
            self.write_lin(hdr + 8, 8, rfbm | (1 << 63))?;
            for off in (16..64).step_by(8) {
                self.write_lin(hdr + off, 8, 0)?;
            }
        } else {
            let old = self.read_lin(hdr, 8)?;
            let bv = (old & !rfbm) | (inuse & rfbm);
            self.write_lin(hdr, 8, bv)?;
        }
        Ok(())
    }

    /// The 512-byte legacy region as FXSAVE would write it.
    fn fpu_image(&self) -> [u8; 512] {
        let mut xmm = [[0u8; 16]; 16];
        for (d, x) in xmm.iter_mut().zip(self.cpu.xmm.iter()) {
            *d = x.to_le_bytes();
        }
        hv::FpuState {
            fcw: self.cpu.fcw,
            fsw: self.cpu.fsw,
            ftw: self.cpu.ftw,
            fop: self.cpu.fop,
            fip: self.cpu.fip,
            fdp: self.cpu.fdp,
            mxcsr: self.cpu.mxcsr,
            st: self.cpu.st,
            xmm,
        }
        .to_fxsave()
    }

    fn xrstor(&mut self, a: u64, rfbm: u64) -> R<()> {
        let hdr = a + XSAVE_HEADER;
        let bv = self.read_lin(hdr, 8)?;
        let comp = self.read_lin(hdr + 8, 8)?;
        let compacted = comp & (1 << 63) != 0;
        let mut xcr0 = self.cpu.xcr0;
        if self.cpu.cpl == 3 && (bv | comp) & !(1 << 63) & !xcr0 != 0 {
            // User mode on the hybrid kvm backend runs under the host's XCR0, so a user
            // `xsavec`/`xsave` there also saves the AVX-512 components, and the matching
            // `xrstor` may run here (a user stretch emu runs itself, or after a move). At CPL 3
            // the components the model lays out in leaf 0xD beyond XCR0 are accepted in the
            // header as that host XCR0 would, and left as they are: emu has no such registers
            // (docs/cpu-model.md, "XSAVE state user mode can see").
            xcr0 |= laid_out_components(&self.vm.model);
        }
        if compacted {
            if !self.has(Feature::Xsavec) || comp & !(1 << 63) & !xcr0 != 0 || bv & !comp != 0 {
                return gp0();
            }
            for off in (16..64).step_by(8) {
                if self.read_lin(hdr + off, 8)? != 0 {
                    return gp0();
                }
            }
        } else {
            if bv & !xcr0 != 0 || comp != 0 || self.read_lin(hdr + 16, 8)? != 0 {
                return gp0();
            }
        }
        // Read everything first, so that a fault leaves the state untouched.
        let mut img = [0u8; 512];
        for k in 0..64 {
            let v = self.read_lin(a + 8 * k as u64, 8)?;
            img[k * 8..k * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        let f = hv::FpuState::from_fxsave(&img);
        // Where the AVX component is in a compacted image: after the legacy region and header
        // (it is the first extended component, and XCOMP_BV must include it to be there).
        let ymm_present = if compacted {
            comp & XCR0_AVX != 0
        } else {
            true
        };
        let mut ymm = [0u128; 16];
        if rfbm & XCR0_AVX != 0 && bv & XCR0_AVX != 0 && ymm_present {
            for (k, y) in ymm.iter_mut().enumerate() {
                *y = self.read_u128(a + YMM_OFFSET as u64 + 16 * k as u64)?;
            }
        }
        let load_mxcsr = if compacted {
            rfbm & XCR0_SSE != 0
        } else {
            rfbm & (XCR0_SSE | XCR0_AVX) != 0
        };
        let mxcsr = if compacted && bv & XCR0_SSE == 0 {
            0x1f80
        } else {
            f.mxcsr
        };
        if load_mxcsr && mxcsr & !0xffff != 0 {
            return gp0();
        }
        let c = &mut *self.cpu;
        if rfbm & XCR0_X87 != 0 {
            if bv & XCR0_X87 != 0 {
                c.fcw = f.fcw;
                c.fsw = f.fsw;
                c.ftw = f.ftw;
                c.fop = f.fop;
                c.fip = f.fip;
                c.fdp = f.fdp;
                c.st = f.st;
            } else {
                c.fcw = 0x37f;
                c.fsw = 0;
                c.ftw = 0;
                c.fop = 0;
                c.fip = 0;
                c.fdp = 0;
                c.st = [[0; 16]; 8];
            }
        }
        if rfbm & XCR0_SSE != 0 {
            for (d, x) in c.xmm.iter_mut().zip(f.xmm.iter()) {
                *d = if bv & XCR0_SSE != 0 {
                    u128::from_le_bytes(*x)
                } else {
                    0
                };
            }
        }
        if load_mxcsr {
            c.mxcsr = mxcsr;
        }
        if rfbm & XCR0_AVX != 0 {
            c.ymm_hi = ymm;
        }
        Ok(())
    }

    // ---------------- VEX ----------------

    /// #UD unless the model shows the instruction's features, CR4.OSXSAVE is set and XCR0
    /// enables SSE and AVX state; #NM when CR0.TS is set.
    fn vex_check(&mut self, i: &Instruction) -> R<()> {
        for f in i.cpuid_features() {
            let need = match f {
                CpuidFeature::AVX => Feature::Avx,
                CpuidFeature::AVX2 => Feature::Avx2,
                CpuidFeature::FMA => Feature::Fma,
                CpuidFeature::F16C => Feature::F16c,
                CpuidFeature::AES => Feature::Aes,
                CpuidFeature::PCLMULQDQ => Feature::Pclmulqdq,
                _ => return ud(),
            };
            if !self.has(need) {
                return ud();
            }
        }
        if !self.cpu.protected()
            || self.cpu.rflags & crate::cpu::VM != 0
            || self.cpu.cr4 & CR4_OSXSAVE == 0
            || self.cpu.xcr0 & (XCR0_SSE | XCR0_AVX) != XCR0_SSE | XCR0_AVX
        {
            return ud();
        }
        if self.cpu.cr0 & CR0_TS != 0 {
            return Err(Exc::Fault(7, None));
        }
        Ok(())
    }

    fn yget(&self, k: usize) -> Y {
        [self.cpu.xmm[k & 15], self.cpu.ymm_hi[k & 15]]
    }

    /// Writes a VEX destination register: VEX.128 zeroes bits 255:128.
    fn yset(&mut self, k: usize, v: Y, wide: bool) {
        self.cpu.xmm[k & 15] = v[0];
        self.cpu.ymm_hi[k & 15] = if wide { v[1] } else { 0 };
    }

    /// Reads operand `n`: a vector register, a GPR, memory of the operand's size
    /// (zero-extended) or an immediate.
    fn vrd(&mut self, i: &Instruction, n: u32) -> R<Y> {
        match i.op_kind(n) {
            OpKind::Register => {
                let r = i.op_register(n);
                match vreg(r) {
                    Some((k, true)) => Ok(self.yget(k)),
                    Some((k, false)) => Ok([self.cpu.xmm[k], 0]),
                    None => Ok([u128::from(self.rd_reg(r)), 0]),
                }
            }
            OpKind::Memory => {
                let a = self.mem_lin(i)?;
                self.vread(a, i.memory_size().size())
            }
            _ => Ok([u128::from(self.rd(i, n)?), 0]),
        }
    }

    fn vread(&mut self, a: u64, size: usize) -> R<Y> {
        match size {
            32 => {
                let lo = self.read_u128(a)?;
                let hi = self.read_u128(a.wrapping_add(16))?;
                Ok([lo, hi])
            }
            16 => Ok([self.read_u128(a)?, 0]),
            s @ (1 | 2 | 4 | 8) => Ok([u128::from(self.read_lin(a, s)?), 0]),
            _ => Err(Exc::unhandled("VEX memory operand size")),
        }
    }

    fn vwrite(&mut self, a: u64, size: usize, v: Y) -> R<()> {
        match size {
            32 => {
                self.probe_write(a, 32)?;
                self.write_u128(a, v[0])?;
                self.write_u128(a.wrapping_add(16), v[1])
            }
            16 => self.write_u128(a, v[0]),
            s @ (1 | 2 | 4 | 8) => self.write_lin(a, s, v[0] as u64),
            _ => Err(Exc::unhandled("VEX memory operand size")),
        }
    }

    /// Writes operand 0 (register: zero-extended to 256 bits unless `wide`; GPR; memory of
    /// the operand's size).
    fn vwr0(&mut self, i: &Instruction, v: Y, wide: bool) -> R<()> {
        match i.op_kind(0) {
            OpKind::Register => {
                let r = i.op_register(0);
                match vreg(r) {
                    Some((k, _)) => {
                        self.yset(k, v, wide);
                        Ok(())
                    }
                    None if is_gpr(r) => {
                        let size = crate::exec::reg_size(r);
                        let idx = crate::exec::gpr_index(r);
                        self.set_gpr_sized(idx, size.max(4), v[0] as u64);
                        Ok(())
                    }
                    None => Err(Exc::unhandled("VEX destination register")),
                }
            }
            OpKind::Memory => {
                let a = self.mem_lin(i)?;
                self.vwrite(a, i.memory_size().size(), v)
            }
            _ => Err(Exc::unhandled("VEX destination")),
        }
    }

    fn is_wide(i: &Instruction) -> bool {
        (0..i.op_count()).any(|n| match i.op_kind(n) {
            OpKind::Register => vreg(i.op_register(n)).is_some_and(|r| r.1),
            OpKind::Memory => i.memory_size().size() == 32,
            _ => false,
        })
    }

    /// Applies the FP environment: flags into MXCSR; an unmasked exception faults (#XM, or
    /// #UD without CR4.OSXMMEXCPT) before anything is written.
    fn fp_done(&mut self, env: &Env) -> R<()> {
        self.cpu.mxcsr |= env.recorded();
        if env.unmasked() != 0 {
            return Err(if self.cpu.cr4 & CR4_OSXMMEXCPT != 0 {
                Exc::Fault(19, None)
            } else {
                Exc::Fault(6, None)
            });
        }
        Ok(())
    }

    fn last_imm(i: &Instruction) -> Option<u8> {
        let n = i.op_count().checked_sub(1)?;
        (i.op_kind(n) == OpKind::Immediate8).then(|| i.immediate8())
    }

    /// Requires memory operands of aligned moves to be aligned to their size (#GP(0)).
    fn aligned(&self, i: &Instruction) -> R<()> {
        if (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Memory) {
            let a = self.mem_lin(i)?;
            let size = i.memory_size().size() as u64;
            if size > 1 && a % size != 0 {
                return gp0();
            }
        }
        Ok(())
    }

    pub fn exec_vex(&mut self, i: &Instruction) -> R<()> {
        self.vex_check(i)?;
        let mn = i.mnemonic();
        let wide = Self::is_wide(i);
        match mn {
            M::Vldmxcsr => {
                let v = self.vrd(i, 0)?[0] as u32;
                if v & !0xffff != 0 {
                    return gp0();
                }
                self.cpu.mxcsr = v;
                Ok(())
            }
            M::Vstmxcsr => {
                let v = self.cpu.mxcsr;
                self.vwr0(i, [u128::from(v), 0], false)
            }
            M::Vzeroupper => {
                self.cpu.ymm_hi = [0; 16];
                Ok(())
            }
            M::Vzeroall => {
                self.cpu.ymm_hi = [0; 16];
                self.cpu.xmm = [0; 16];
                Ok(())
            }
            M::Vmovdqa
            | M::Vmovaps
            | M::Vmovapd
            | M::Vmovntdq
            | M::Vmovntps
            | M::Vmovntpd
            | M::Vmovntdqa => {
                self.aligned(i)?;
                let v = self.vrd(i, 1)?;
                self.vwr0(i, v, wide)
            }
            M::Vmovdqu | M::Vmovups | M::Vmovupd | M::Vlddqu => {
                let v = self.vrd(i, 1)?;
                self.vwr0(i, v, wide)
            }
            M::Vmovd | M::Vmovq => {
                let v = self.vrd(i, 1)?[0];
                let m = if mn == M::Vmovd {
                    0xffff_ffff
                } else {
                    u128::from(u64::MAX)
                };
                self.vwr0(i, [v & m, 0], false)
            }
            M::Vmovss | M::Vmovsd => {
                let m: u128 = if mn == M::Vmovss {
                    0xffff_ffff
                } else {
                    u128::from(u64::MAX)
                };
                if i.op_count() == 3 {
                    let a = self.vrd(i, 1)?[0];
                    let b = self.vrd(i, 2)?[0];
                    self.vwr0(i, [(a & !m) | (b & m), 0], false)
                } else {
                    let v = self.vrd(i, 1)?[0] & m;
                    self.vwr0(i, [v, 0], false)
                }
            }
            M::Vmovlps | M::Vmovlpd | M::Vmovhps | M::Vmovhpd => {
                let high = matches!(mn, M::Vmovhps | M::Vmovhpd);
                if i.op_kind(0) == OpKind::Memory {
                    let v = self.vrd(i, 1)?[0];
                    let q = if high { v >> 64 } else { v };
                    self.vwr0(i, [q & u128::from(u64::MAX), 0], false)
                } else {
                    let a = self.vrd(i, 1)?[0];
                    let m = self.vrd(i, 2)?[0] & u128::from(u64::MAX);
                    let r = if high {
                        (a & u128::from(u64::MAX)) | (m << 64)
                    } else {
                        (a & !u128::from(u64::MAX)) | m
                    };
                    self.vwr0(i, [r, 0], false)
                }
            }
            M::Vmovhlps | M::Vmovlhps => {
                let a = self.vrd(i, 1)?[0];
                let b = self.vrd(i, 2)?[0];
                let lo = u128::from(u64::MAX);
                let r = if mn == M::Vmovhlps {
                    (a & !lo) | (b >> 64)
                } else {
                    (a & lo) | (b << 64)
                };
                self.vwr0(i, [r, 0], false)
            }
            M::Vmovmskps | M::Vmovmskpd | M::Vpmovmskb => {
                let v = self.vrd(i, 1)?;
                let (esz, n) = match mn {
                    M::Vmovmskps => (32, 4),
                    M::Vmovmskpd => (64, 2),
                    _ => (8, 16),
                };
                let lanes = if wide { 2 } else { 1 };
                let mut m = 0u64;
                for l in 0..lanes {
                    for k in 0..n {
                        if (v[l] >> (esz * k + esz - 1)) & 1 != 0 {
                            m |= 1 << (l * n + k);
                        }
                    }
                }
                self.vwr0(i, [u128::from(m), 0], false)
            }
            M::Vpextrb | M::Vpextrw | M::Vpextrd | M::Vpextrq | M::Vextractps => {
                let v = self.vrd(i, 1)?[0];
                let imm = u32::from(i.immediate8());
                let (bits, n) = match mn {
                    M::Vpextrb => (8, 16),
                    M::Vpextrw => (16, 8),
                    M::Vpextrq => (64, 2),
                    _ => (32, 4),
                };
                let e = (v >> (bits * (imm % n))) & ((1u128 << bits) - 1);
                self.vwr0(i, [e, 0], false)
            }
            M::Vpinsrb | M::Vpinsrw | M::Vpinsrd | M::Vpinsrq => {
                let a = self.vrd(i, 1)?[0];
                let b = self.vrd(i, 2)?[0];
                let imm = u32::from(i.immediate8());
                let (bits, n) = match mn {
                    M::Vpinsrb => (8, 16),
                    M::Vpinsrw => (16, 8),
                    M::Vpinsrq => (64, 2),
                    _ => (32, 4),
                };
                let m = (1u128 << bits) - 1;
                let sh = bits * (imm % n);
                let r = (a & !(m << sh)) | ((b & m) << sh);
                self.vwr0(i, [r, 0], false)
            }
            M::Vmaskmovdqu => {
                let regs: Vec<usize> = (0..i.op_count())
                    .filter(|n| i.op_kind(*n) == OpKind::Register)
                    .filter_map(|n| vreg(i.op_register(n)).map(|r| r.0))
                    .collect();
                let (v, m) = match regs.as_slice() {
                    [v, m] => (self.cpu.xmm[*v], self.cpu.xmm[*m]),
                    _ => return Err(Exc::unhandled("vmaskmovdqu operands")),
                };
                let base = self.seg_lin(i.memory_segment(), self.cpu.gpr[7]);
                let (vb, mb) = (b8(v), b8(m));
                for k in 0..16 {
                    if mb[k] & 0x80 != 0 {
                        self.probe_write(base.wrapping_add(k as u64), 1)?;
                    }
                }
                for k in 0..16 {
                    if mb[k] & 0x80 != 0 {
                        self.write_lin(base.wrapping_add(k as u64), 1, u64::from(vb[k]))?;
                    }
                }
                Ok(())
            }
            M::Vptest | M::Vtestps | M::Vtestpd => {
                let a = self.vrd(i, 0)?;
                let b = self.vrd(i, 1)?;
                let sel: u128 = match mn {
                    M::Vtestps => from32([1 << 31; 4]),
                    M::Vtestpd => from64([1 << 63; 2]),
                    _ => u128::MAX,
                };
                let (mut zf, mut cf) = (true, true);
                for l in 0..2 {
                    if a[l] & b[l] & sel != 0 {
                        zf = false;
                    }
                    if !a[l] & b[l] & sel != 0 {
                        cf = false;
                    }
                }
                let mut f = 0;
                if zf {
                    f |= ZF;
                }
                if cf {
                    f |= CF;
                }
                self.set_flags(ARITH_FLAGS, f);
                Ok(())
            }
            M::Vbroadcastss
            | M::Vbroadcastsd
            | M::Vpbroadcastb
            | M::Vpbroadcastw
            | M::Vpbroadcastd
            | M::Vpbroadcastq
            | M::Vbroadcastf128
            | M::Vbroadcasti128 => {
                let s = self.vrd(i, 1)?[0];
                let bits = match mn {
                    M::Vpbroadcastb => 8,
                    M::Vpbroadcastw => 16,
                    M::Vbroadcastss | M::Vpbroadcastd => 32,
                    M::Vbroadcastsd | M::Vpbroadcastq => 64,
                    _ => 128,
                };
                let e = if bits == 128 {
                    s
                } else {
                    s & ((1u128 << bits) - 1)
                };
                let mut lane = 0u128;
                for k in 0..128 / bits {
                    lane |= e << (k * bits);
                }
                self.vwr0(i, [lane, lane], wide)
            }
            M::Vinsertf128 | M::Vinserti128 => {
                let a = self.vrd(i, 1)?;
                let b = self.vrd(i, 2)?[0];
                let mut r = a;
                r[usize::from(i.immediate8() & 1)] = b;
                self.vwr0(i, r, true)
            }
            M::Vextractf128 | M::Vextracti128 => {
                let v = self.vrd(i, 1)?;
                let e = v[usize::from(i.immediate8() & 1)];
                self.vwr0(i, [e, 0], false)
            }
            M::Vperm2f128 | M::Vperm2i128 => {
                let a = self.vrd(i, 1)?;
                let b = self.vrd(i, 2)?;
                let imm = i.immediate8();
                let pick = |sel: u8| -> u128 {
                    if sel & 8 != 0 {
                        return 0;
                    }
                    match sel & 3 {
                        0 => a[0],
                        1 => a[1],
                        2 => b[0],
                        _ => b[1],
                    }
                };
                self.vwr0(i, [pick(imm & 0xf), pick(imm >> 4)], true)
            }
            M::Vpermd | M::Vpermps => {
                let idx = self.vrd(i, 1)?;
                let src = self.vrd(i, 2)?;
                let s: Vec<u32> = src.iter().flat_map(|l| d32(*l)).collect();
                let x: Vec<u32> = idx.iter().flat_map(|l| d32(*l)).collect();
                let o: Vec<u32> = x.iter().map(|k| s[(*k & 7) as usize]).collect();
                let r = [
                    from32([o[0], o[1], o[2], o[3]]),
                    from32([o[4], o[5], o[6], o[7]]),
                ];
                self.vwr0(i, r, true)
            }
            M::Vpermq | M::Vpermpd => {
                let src = self.vrd(i, 1)?;
                let imm = i.immediate8();
                let s = [
                    q64(src[0])[0],
                    q64(src[0])[1],
                    q64(src[1])[0],
                    q64(src[1])[1],
                ];
                let o: [u64; 4] = std::array::from_fn(|k| s[usize::from((imm >> (2 * k)) & 3)]);
                self.vwr0(i, [from64([o[0], o[1]]), from64([o[2], o[3]])], true)
            }
            M::Vpermilps | M::Vpermilpd if Self::last_imm(i).is_none() => {
                // Variable form: the selector is a vector (per 128-bit lane).
                let a = self.vrd(i, 1)?;
                let c = self.vrd(i, 2)?;
                let mut r = [0u128; 2];
                for l in 0..2 {
                    r[l] = if mn == M::Vpermilps {
                        let (x, s) = (d32(a[l]), d32(c[l]));
                        from32(std::array::from_fn(|k| x[(s[k] & 3) as usize]))
                    } else {
                        let (x, s) = (q64(a[l]), q64(c[l]));
                        from64(std::array::from_fn(|k| x[((s[k] >> 1) & 1) as usize]))
                    };
                }
                self.vwr0(i, r, wide)
            }
            M::Vpsllvd | M::Vpsllvq | M::Vpsrlvd | M::Vpsrlvq | M::Vpsravd => {
                let a = self.vrd(i, 1)?;
                let c = self.vrd(i, 2)?;
                let mut r = [0u128; 2];
                for l in 0..2 {
                    r[l] = match mn {
                        M::Vpsllvd => map32(a[l], c[l], |x, n| if n > 31 { 0 } else { x << n }),
                        M::Vpsrlvd => map32(a[l], c[l], |x, n| if n > 31 { 0 } else { x >> n }),
                        M::Vpsravd => map32(a[l], c[l], |x, n| ((x as i32) >> n.min(31)) as u32),
                        M::Vpsllvq => map64(a[l], c[l], |x, n| if n > 63 { 0 } else { x << n }),
                        _ => map64(a[l], c[l], |x, n| if n > 63 { 0 } else { x >> n }),
                    };
                }
                self.vwr0(i, r, wide)
            }
            M::Vmaskmovps | M::Vmaskmovpd | M::Vpmaskmovd | M::Vpmaskmovq => self.maskmov(i, wide),
            M::Vblendvps | M::Vblendvpd | M::Vpblendvb => {
                let a = self.vrd(i, 1)?;
                let b = self.vrd(i, 2)?;
                let m = self.vrd(i, 3)?;
                let esz = match mn {
                    M::Vblendvps => 32,
                    M::Vblendvpd => 64,
                    _ => 8,
                };
                let mut r = [0u128; 2];
                for l in 0..2 {
                    for k in 0..128 / esz {
                        let sel = (m[l] >> (k * esz + esz - 1)) & 1 != 0;
                        let em = (u128::MAX >> (128 - esz)) << (k * esz);
                        r[l] |= if sel { b[l] & em } else { a[l] & em };
                    }
                }
                self.vwr0(i, r, wide)
            }
            M::Vpmovsxbw
            | M::Vpmovsxbd
            | M::Vpmovsxbq
            | M::Vpmovsxwd
            | M::Vpmovsxwq
            | M::Vpmovsxdq
            | M::Vpmovzxbw
            | M::Vpmovzxbd
            | M::Vpmovzxbq
            | M::Vpmovzxwd
            | M::Vpmovzxwq
            | M::Vpmovzxdq => {
                let s = self.vrd(i, 1)?[0];
                let name = format!("{mn:?}");
                let signed = name.starts_with("Vpmovsx");
                let (from, to) = match &name[name.len() - 2..] {
                    "bw" => (8, 16),
                    "bd" => (8, 32),
                    "bq" => (8, 64),
                    "wd" => (16, 32),
                    "wq" => (16, 64),
                    _ => (32, 64),
                };
                let n = if wide { 256 / to } else { 128 / to };
                let mut r = [0u128; 2];
                for k in 0..n {
                    let e = (s >> (k * from)) & ((1u128 << from) - 1);
                    let v = if signed && e >> (from - 1) != 0 {
                        (e | (u128::MAX << from)) & (u128::MAX >> (128 - to))
                    } else {
                        e
                    };
                    let bit = k * to;
                    r[bit / 128] |= v << (bit % 128);
                }
                self.vwr0(i, r, wide)
            }
            M::Vgatherdps
            | M::Vgatherqps
            | M::Vgatherdpd
            | M::Vgatherqpd
            | M::Vpgatherdd
            | M::Vpgatherqd
            | M::Vpgatherdq
            | M::Vpgatherqq => self.gather(i),
            M::Vcvtph2ps => {
                let s = self.vrd(i, 1)?[0];
                let mut env = Env::new(self.cpu.mxcsr);
                let n = if wide { 8 } else { 4 };
                let mut r = [0u128; 2];
                for k in 0..n {
                    let f = crate::vfp::half_to_single((s >> (16 * k)) as u16, &mut env);
                    r[k / 4] |= u128::from(f.to_bits()) << (32 * (k % 4));
                }
                self.fp_done(&env)?;
                self.vwr0(i, r, wide)
            }
            M::Vcvtps2ph => {
                let s = self.vrd(i, 1)?;
                let imm = i.immediate8();
                let mut env = Env::new(self.cpu.mxcsr);
                let rc = if imm & 4 != 0 {
                    env.rc
                } else {
                    u32::from(imm & 3)
                };
                let n = if wide { 8 } else { 4 };
                let mut r = 0u128;
                for k in 0..n {
                    let f = f32::from_bits((s[k / 4] >> (32 * (k % 4))) as u32);
                    let h = crate::vfp::single_to_half(f, rc, &mut env);
                    r |= u128::from(h) << (16 * k);
                }
                self.fp_done(&env)?;
                self.vwr0(i, [r, 0], false)
            }
            M::Vcvtpd2ps | M::Vcvtpd2dq | M::Vcvttpd2dq if wide => {
                // ymm source, xmm destination: four doubles to four singles/dwords.
                let s = self.vrd(i, 1)?;
                let mut env = Env::new(self.cpu.mxcsr);
                let leg = legacy(mn).unwrap_or(mn);
                let lo = fp_lane(leg, 0, s[0], 0, &mut env).unwrap_or(0);
                let hi = fp_lane(leg, 0, s[1], 0, &mut env).unwrap_or(0);
                self.fp_done(&env)?;
                let r = (lo & u128::from(u64::MAX)) | ((hi & u128::from(u64::MAX)) << 64);
                self.vwr0(i, [r, 0], false)
            }
            M::Vcvtdq2pd | M::Vcvtps2pd if wide => {
                let s = self.vrd(i, 1)?[0];
                let mut env = Env::new(self.cpu.mxcsr);
                let leg = legacy(mn).unwrap_or(mn);
                let lo = fp_lane(leg, 0, s, 0, &mut env).unwrap_or(0);
                let hi = fp_lane(leg, 0, s >> 64, 0, &mut env).unwrap_or(0);
                self.fp_done(&env)?;
                self.vwr0(i, [lo, hi], true)
            }
            M::Vcvtsi2ss | M::Vcvtsi2sd => {
                let a = self.vrd(i, 1)?[0];
                let size = self.op_size(i, 2);
                let b = crate::exec::sx(self.vrd(i, 2)?[0] as u64, size) as i64;
                let mut env = Env::new(self.cpu.mxcsr);
                let r = if mn == M::Vcvtsi2ss {
                    (a & !0xffff_ffff) | u128::from(env.int_to_float::<f32>(b).to_bits())
                } else {
                    (a & !u128::from(u64::MAX)) | u128::from(env.int_to_float::<f64>(b).to_bits())
                };
                self.fp_done(&env)?;
                self.vwr0(i, [r, 0], false)
            }
            M::Vcvtss2si | M::Vcvttss2si | M::Vcvtsd2si | M::Vcvttsd2si => {
                let s = self.vrd(i, 1)?[0];
                let bits = (crate::exec::reg_size(i.op_register(0)) * 8) as u32;
                let mut env = Env::new(self.cpu.mxcsr);
                let rc = if matches!(mn, M::Vcvttss2si | M::Vcvttsd2si) {
                    3
                } else {
                    env.rc
                };
                let v = if matches!(mn, M::Vcvtss2si | M::Vcvttss2si) {
                    env.float_to_int(f32::from_bits(s as u32), bits, rc)
                } else {
                    env.float_to_int(f64::from_bits(s as u64), bits, rc)
                };
                self.fp_done(&env)?;
                self.vwr0(i, [u128::from(v), 0], false)
            }
            M::Vcomiss | M::Vucomiss | M::Vcomisd | M::Vucomisd => {
                let a = self.vrd(i, 0)?[0];
                let b = self.vrd(i, 1)?[0];
                let sig = matches!(mn, M::Vcomiss | M::Vcomisd);
                let mut env = Env::new(self.cpu.mxcsr);
                let (un, lt, eq) = if matches!(mn, M::Vcomiss | M::Vucomiss) {
                    let (x, y) =
                        env.cmp_inputs(f32::from_bits(a as u32), f32::from_bits(b as u32), sig);
                    (x.is_nan() || y.is_nan(), x < y, x == y)
                } else {
                    let (x, y) =
                        env.cmp_inputs(f64::from_bits(a as u64), f64::from_bits(b as u64), sig);
                    (x.is_nan() || y.is_nan(), x < y, x == y)
                };
                self.fp_done(&env)?;
                use crate::cpu::PF;
                let f = if un {
                    ZF | PF | CF
                } else if lt {
                    CF
                } else if eq {
                    ZF
                } else {
                    0
                };
                self.set_flags(ARITH_FLAGS, f);
                Ok(())
            }
            M::Vpcmpistri
            | M::Vpcmpestri
            | M::Vpcmpistrm
            | M::Vpcmpestrm
            | M::Vpcmpestri64
            | M::Vpcmpestrm64 => {
                // The same operation as the legacy form (sse.rs), whose only register output
                // other than ECX/flags is XMM0: run it, then zero YMM0's upper half.
                let code = match mn {
                    M::Vpcmpistri => iced_x86::Code::Pcmpistri_xmm_xmmm128_imm8,
                    M::Vpcmpestri | M::Vpcmpestri64 => iced_x86::Code::Pcmpestri_xmm_xmmm128_imm8,
                    M::Vpcmpistrm => iced_x86::Code::Pcmpistrm_xmm_xmmm128_imm8,
                    _ => iced_x86::Code::Pcmpestrm_xmm_xmmm128_imm8,
                };
                let mut j = *i;
                j.set_code(code);
                // The explicit lengths (EAX/EDX, or RAX/RDX for VEX.W1) are reduced to their
                // effective value |len| clamped to 16 before the legacy code reads them, so it
                // sees the same small non-negative numbers whichever register width it reads.
                let (rax, rdx) = (self.cpu.gpr[0], self.cpu.gpr[2]);
                let wide64 = matches!(mn, M::Vpcmpestri64 | M::Vpcmpestrm64);
                let eff = |v: u64| -> u64 {
                    let l = if wide64 {
                        v as i64
                    } else {
                        i64::from(v as i32)
                    };
                    l.unsigned_abs().min(16)
                };
                let explicit = !matches!(mn, M::Vpcmpistri | M::Vpcmpistrm);
                if explicit {
                    self.cpu.gpr[0] = eff(rax);
                    self.cpu.gpr[2] = eff(rdx);
                }
                let r = self.exec_fp(&j);
                if explicit {
                    self.cpu.gpr[0] = rax;
                    self.cpu.gpr[2] = rdx;
                }
                r?;
                if matches!(mn, M::Vpcmpistrm | M::Vpcmpestrm | M::Vpcmpestrm64) {
                    self.cpu.ymm_hi[0] = 0;
                }
                Ok(())
            }
            M::Vaesenc | M::Vaesenclast | M::Vaesdec | M::Vaesdeclast | M::Vpclmulqdq => {
                // VEX.128 only (the 256-bit forms are VAES/VPCLMULQDQ: #UD in vex_check).
                let a = self.vrd(i, 1)?[0];
                let b = self.vrd(i, 2)?[0];
                let r = match mn {
                    M::Vaesenc => crate::crypto::aesenc(a, b),
                    M::Vaesenclast => crate::crypto::aesenclast(a, b),
                    M::Vaesdec => crate::crypto::aesdec(a, b),
                    M::Vaesdeclast => crate::crypto::aesdeclast(a, b),
                    _ => crate::crypto::pclmulqdq(a, b, i.immediate8()),
                };
                self.vwr0(i, [r, 0], false)
            }
            M::Vaesimc | M::Vaeskeygenassist => {
                let a = self.vrd(i, 1)?[0];
                let r = if mn == M::Vaesimc {
                    crate::crypto::aesimc(a)
                } else {
                    crate::crypto::aeskeygenassist(a, i.immediate8())
                };
                self.vwr0(i, [r, 0], false)
            }
            _ if Self::is_fma(mn) => self.fma(i, wide),
            _ => self.vex_lanes(i, wide),
        }
    }

    fn is_fma(mn: M) -> bool {
        let n = format!("{mn:?}");
        n.starts_with("Vfmadd")
            || n.starts_with("Vfmsub")
            || n.starts_with("Vfnmadd")
            || n.starts_with("Vfnmsub")
    }

    /// Lane-wise VEX forms of legacy SSE operations.
    fn vex_lanes(&mut self, i: &Instruction, wide: bool) -> R<()> {
        let mn = i.mnemonic();
        let leg = legacy(mn).unwrap_or(mn);
        let imm = Self::last_imm(i);
        let nregs = i.op_count() - u32::from(imm.is_some());
        // Shifts: by an immediate (dst, src, imm) or by a count register (dst, src, count).
        if matches!(
            leg,
            M::Psllw | M::Pslld | M::Psllq | M::Psrlw | M::Psrld | M::Psrlq | M::Psraw | M::Psrad
        ) {
            let v = self.vrd(i, 1)?;
            let c = match imm {
                Some(c) => u64::from(c),
                None => self.vrd(i, 2)?[0] as u64,
            };
            let mut r = [0u128; 2];
            for l in 0..2 {
                r[l] = shift_lane(leg, v[l], c).unwrap_or(0);
            }
            return self.vwr0(i, r, wide);
        }
        let (a, b) = if nregs >= 3 {
            (self.vrd(i, 1)?, self.vrd(i, 2)?)
        } else {
            ([0, 0], self.vrd(i, 1)?)
        };
        let mut imm = imm.unwrap_or(0);
        if mn == M::Vinsertps && i.op_kind(2) == OpKind::Memory {
            imm &= 0x3f;
        }
        let mut env = Env::new(self.cpu.mxcsr);
        let mut r = [0u128; 2];
        let lanes = if wide { 2 } else { 1 };
        if matches!(leg, M::Dpps | M::Dppd) {
            r = dot_product(leg == M::Dpps, a, b, lanes, imm, &mut env);
            self.fp_done(&env)?;
            return self.vwr0(i, r, wide);
        }
        for l in 0..lanes {
            // Immediates whose bits are consumed lane by lane.
            let li = match leg {
                M::Blendps | M::Vpblendd => imm >> (4 * l),
                M::Blendpd | M::Shufpd | M::Vpermilpd => imm >> (2 * l),
                M::Mpsadbw => imm >> (3 * l),
                _ => imm,
            };
            r[l] = match int_lane(leg, a[l], b[l], li) {
                Some(v) => v,
                None => fp_lane(leg, a[l], b[l], li, &mut env)
                    .ok_or_else(|| Exc::unhandled(format!("{mn:?}")))?,
            };
        }
        self.fp_done(&env)?;
        self.vwr0(i, r, wide)
    }

    /// VMASKMOVPS/PD, VPMASKMOVD/Q: loads zero the masked-off elements; stores write only the
    /// selected ones (masked-off elements never fault).
    fn maskmov(&mut self, i: &Instruction, wide: bool) -> R<()> {
        let mn = i.mnemonic();
        let esz: usize = if matches!(mn, M::Vmaskmovps | M::Vpmaskmovd) {
            4
        } else {
            8
        };
        let n = if wide { 32 } else { 16 } / esz;
        let bits = esz * 8;
        let el = |v: &Y, k: usize| -> u64 {
            let bit = k * bits;
            ((v[bit / 128] >> (bit % 128)) as u64) & (u64::MAX >> (64 - bits))
        };
        if i.op_kind(0) == OpKind::Memory {
            let a = self.mem_lin(i)?;
            let m = self.vrd(i, 1)?;
            let v = self.vrd(i, 2)?;
            let on: Vec<usize> = (0..n).filter(|&k| el(&m, k) >> (bits - 1) != 0).collect();
            // The selected elements' first and last byte.
            let (lo, hi) = match (on.first(), on.last()) {
                (Some(&f), Some(&l)) => (
                    a.wrapping_add((f * esz) as u64),
                    a.wrapping_add((l * esz + esz - 1) as u64),
                ),
                _ => (a, a),
            };
            for &k in &on {
                if let Err(e) = self.probe_write(a.wrapping_add((k * esz) as u64), esz) {
                    // When the selected elements span two pages and the second one faults, the
                    // CPU (measured on this Intel host: tests/integration/avx.rs in crates/conformance)
                    // reports the last byte of the highest selected element in CR2, not the
                    // first faulting byte.
                    if matches!(e, Exc::Fault(14, _))
                        && lo >> 12 != hi >> 12
                        && self.cpu.cr2 >> 12 == hi >> 12
                    {
                        self.cpu.cr2 = hi;
                    }
                    return Err(e);
                }
            }
            for k in 0..n {
                if el(&m, k) >> (bits - 1) != 0 {
                    self.write_lin(a.wrapping_add((k * esz) as u64), esz, el(&v, k))?;
                }
            }
            Ok(())
        } else {
            let m = self.vrd(i, 1)?;
            let a = self.mem_lin(i)?;
            let mut r = [0u128; 2];
            for k in 0..n {
                if el(&m, k) >> (bits - 1) != 0 {
                    let v = self.read_lin(a.wrapping_add((k * esz) as u64), esz)?;
                    let bit = k * bits;
                    r[bit / 128] |= u128::from(v) << (bit % 128);
                }
            }
            self.vwr0(i, r, wide)
        }
    }

    /// VGATHER*/VPGATHER*: elements are loaded in order; each one loaded clears its mask
    /// element, so a fault leaves the loaded ones in the destination and the rest of the mask
    /// set (the instruction restarts where it stopped). The mask is all zero at the end.
    fn gather(&mut self, i: &Instruction) -> R<()> {
        let mn = i.mnemonic();
        let dst = i.op_register(0);
        let mreg = i.op_register(2);
        let (dk, dwide) = vreg(dst).ok_or_else(|| Exc::unhandled("gather destination"))?;
        let (mk, _) = vreg(mreg).ok_or_else(|| Exc::unhandled("gather mask"))?;
        let index = i.memory_index();
        let (xk, xwide) = vreg(index).ok_or_else(|| Exc::unhandled("gather index"))?;
        if dk == mk || dk == xk || mk == xk {
            return ud();
        }
        let (esz, isz) = match mn {
            M::Vgatherdps | M::Vpgatherdd => (4usize, 4usize),
            M::Vgatherqps | M::Vpgatherqd => (4, 8),
            M::Vgatherdpd | M::Vpgatherdq => (8, 4),
            _ => (8, 8),
        };
        let nidx = if xwide { 32 } else { 16 } / isz;
        let ndst = if dwide { 32 } else { 16 } / esz;
        let n = nidx.min(ndst);
        let idxv = self.yget(xk);
        let base = match i.memory_base() {
            Register::None => 0,
            Register::RIP => i.next_ip(),
            r => self.rd_reg(r),
        };
        let disp = i.memory_displacement64();
        let scale = u64::from(i.memory_index_scale());
        let ebits = esz * 8;
        let get = |v: &Y, k: usize, bits: usize| -> u64 {
            let bit = k * bits;
            ((v[bit / 128] >> (bit % 128)) as u64) & (u64::MAX >> (64 - bits))
        };
        let set = |v: &mut Y, k: usize, bits: usize, x: u64| {
            let bit = k * bits;
            let m = (u128::MAX >> (128 - bits)) << (bit % 128);
            v[bit / 128] = (v[bit / 128] & !m) | ((u128::from(x) << (bit % 128)) & m);
        };
        let mut d = self.yget(dk);
        let mut m = self.yget(mk);
        // Elements beyond what the index vector covers are zeroed (e.g. VGATHERQPS with a
        // ymm index fills the low four dwords of an xmm destination).
        let mut fault = None;
        for k in 0..n {
            if get(&m, k, ebits) >> (ebits - 1) == 0 {
                continue;
            }
            let idx = get(&idxv, k, isz * 8);
            let idx = if isz == 4 {
                idx as u32 as i32 as i64 as u64
            } else {
                idx
            };
            let off = base
                .wrapping_add(disp)
                .wrapping_add(idx.wrapping_mul(scale));
            let lin = self.seg_lin(i.memory_segment(), off);
            if self.cpu.mode64() && !crate::decode::canonical(lin) {
                fault = Some(Exc::Fault(13, Some(0)));
                break;
            }
            match self.read_lin(lin, esz) {
                Ok(v) => {
                    set(&mut d, k, ebits, v);
                    set(&mut m, k, ebits, 0);
                }
                Err(e) => {
                    fault = Some(e);
                    break;
                }
            }
        }
        let width_wide = dwide;
        if let Some(e) = fault {
            // Partial progress stays architecturally visible: destination and mask as far as
            // the loads went (upper halves as on completion).
            self.yset(dk, d, width_wide);
            self.yset(mk, m, width_wide);
            return Err(e);
        }
        // Completed: mask cleared, elements beyond `n` zeroed.
        let mut dd = [0u128; 2];
        for k in 0..n {
            set(&mut dd, k, ebits, get(&d, k, ebits));
        }
        self.yset(dk, dd, width_wide);
        self.yset(mk, [0, 0], width_wide);
        Ok(())
    }

    /// FMA3: `132` = dst*src3 + src2, `213` = src2*dst + src3, `231` = src2*src3 + dst, with
    /// negations for fmsub/fnmadd/fnmsub and alternation for fmaddsub/fmsubadd.
    fn fma(&mut self, i: &Instruction, wide: bool) -> R<()> {
        let mn = i.mnemonic();
        let name = format!("{mn:?}");
        let d = self.vrd(i, 0)?;
        let s2 = self.vrd(i, 1)?;
        let s3 = self.vrd(i, 2)?;
        let neg_prod = name.starts_with("Vfnm");
        let body = name
            .trim_start_matches("Vfnm")
            .trim_start_matches("Vfm")
            .to_string();
        // body: "add132ps", "sub213sd", "addsub231ps", "subadd132pd"...
        let (op, rest) = if let Some(r) = body.strip_prefix("addsub") {
            ("addsub", r)
        } else if let Some(r) = body.strip_prefix("subadd") {
            ("subadd", r)
        } else if let Some(r) = body.strip_prefix("add") {
            ("add", r)
        } else if let Some(r) = body.strip_prefix("sub") {
            ("sub", r)
        } else {
            return Err(Exc::unhandled(name));
        };
        let order = &rest[..3.min(rest.len())];
        let ty = &rest[3.min(rest.len())..];
        let double = ty.ends_with('d');
        let scalar = ty.starts_with('s');
        let esz = if double { 64 } else { 32 };
        let n = if scalar {
            1
        } else if wide {
            256 / esz
        } else {
            128 / esz
        };
        let mut env = Env::new(self.cpu.mxcsr);
        let mut r = d;
        let get = |v: &Y, k: usize| -> u64 {
            let bit = k * esz;
            ((v[bit / 128] >> (bit % 128)) as u64) & (u64::MAX >> (64 - esz))
        };
        for k in 0..n {
            let (x1, x2, x3) = (get(&d, k), get(&s2, k), get(&s3, k));
            // (a, b, c) of a*b + c in terms of the operands.
            let (a, b, c) = match order {
                "132" => (x1, x3, x2),
                "213" => (x2, x1, x3),
                _ => (x2, x3, x1),
            };
            let sub = match op {
                "add" => false,
                "sub" => true,
                // fmaddsub: odd elements add, even subtract; fmsubadd the other way.
                "addsub" => k % 2 == 0,
                _ => k % 2 == 1,
            };
            let v = if double {
                let f = |u: u64| f64::from_bits(u);
                let (pa, pc) = (
                    if neg_prod { -f(a) } else { f(a) },
                    if sub { -f(c) } else { f(c) },
                );
                env.fma(pa, f(b), pc, [f(a), f(b), f(c)]).to_bits()
            } else {
                let f = |u: u64| f32::from_bits(u as u32);
                let (pa, pc) = (
                    if neg_prod { -f(a) } else { f(a) },
                    if sub { -f(c) } else { f(c) },
                );
                u64::from(env.fma(pa, f(b), pc, [f(a), f(b), f(c)]).to_bits())
            };
            let bit = k * esz;
            let m = (u128::MAX >> (128 - esz)) << (bit % 128);
            r[bit / 128] = (r[bit / 128] & !m) | ((u128::from(v) << (bit % 128)) & m);
        }
        self.fp_done(&env)?;
        if scalar {
            r[1] = 0;
        }
        self.yset(
            vreg(i.op_register(0)).map_or(0, |x| x.0),
            r,
            wide && !scalar,
        );
        Ok(())
    }
}
