//! SSE..SSE4.2 (integer and the scalar/packed FP the kernel and libc use), FXSAVE/FXRSTOR,
//! MXCSR (x87 is `x87.rs`).

// Lane-wise loops index several arrays at once.
#![allow(clippy::needless_range_loop)]

use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

use crate::exec::{Exc, Exec, R, gp0, reg_size, ud};
use crate::ssefp;

pub(crate) fn xidx(r: Register) -> Option<usize> {
    let n = r as usize;
    if (77..93).contains(&n) {
        Some(n - 77)
    } else {
        None
    }
}

pub(crate) fn u8s(v: u128) -> [u8; 16] {
    v.to_le_bytes()
}
pub(crate) fn from_u8s(b: [u8; 16]) -> u128 {
    u128::from_le_bytes(b)
}
pub(crate) fn u16s(v: u128) -> [u16; 8] {
    let mut o = [0u16; 8];
    for (k, x) in o.iter_mut().enumerate() {
        *x = (v >> (16 * k)) as u16;
    }
    o
}
pub(crate) fn from_u16s(a: [u16; 8]) -> u128 {
    a.iter()
        .enumerate()
        .fold(0u128, |acc, (k, x)| acc | (u128::from(*x) << (16 * k)))
}
pub(crate) fn u32s(v: u128) -> [u32; 4] {
    [
        (v) as u32,
        (v >> 32) as u32,
        (v >> 64) as u32,
        (v >> 96) as u32,
    ]
}
pub(crate) fn from_u32s(a: [u32; 4]) -> u128 {
    u128::from(a[0])
        | (u128::from(a[1]) << 32)
        | (u128::from(a[2]) << 64)
        | (u128::from(a[3]) << 96)
}
pub(crate) fn u64s(v: u128) -> [u64; 2] {
    [v as u64, (v >> 64) as u64]
}
pub(crate) fn from_u64s(a: [u64; 2]) -> u128 {
    u128::from(a[0]) | (u128::from(a[1]) << 64)
}

pub(crate) fn map8(a: u128, b: u128, f: impl Fn(u8, u8) -> u8) -> u128 {
    let (x, y) = (u8s(a), u8s(b));
    let mut o = [0u8; 16];
    for k in 0..16 {
        o[k] = f(x[k], y[k]);
    }
    from_u8s(o)
}
pub(crate) fn map16(a: u128, b: u128, f: impl Fn(u16, u16) -> u16) -> u128 {
    let (x, y) = (u16s(a), u16s(b));
    let mut o = [0u16; 8];
    for k in 0..8 {
        o[k] = f(x[k], y[k]);
    }
    from_u16s(o)
}
pub(crate) fn map32(a: u128, b: u128, f: impl Fn(u32, u32) -> u32) -> u128 {
    let (x, y) = (u32s(a), u32s(b));
    let mut o = [0u32; 4];
    for k in 0..4 {
        o[k] = f(x[k], y[k]);
    }
    from_u32s(o)
}
pub(crate) fn map64(a: u128, b: u128, f: impl Fn(u64, u64) -> u64) -> u128 {
    let (x, y) = (u64s(a), u64s(b));
    from_u64s([f(x[0], y[0]), f(x[1], y[1])])
}

pub(crate) fn sat_i8(v: i32) -> u8 {
    v.clamp(-128, 127) as i8 as u8
}
pub(crate) fn sat_u8(v: i32) -> u8 {
    v.clamp(0, 255) as u8
}
pub(crate) fn sat_i16(v: i32) -> u16 {
    v.clamp(-32768, 32767) as i16 as u16
}
pub(crate) fn sat_u16(v: i32) -> u16 {
    v.clamp(0, 65535) as u16
}

// ---- Lane-wise operations (shared with the VEX forms) ----

/// Computes one 128-bit lane of a lane-wise SSE operation: `mn` is the legacy (non-V)
/// mnemonic, `a` the first source (the destination's old value in legacy SSE), `b` the second
/// source, `imm` the immediate (0 if none).
///
/// Conventions:
/// * Shifts by a count (`psllw`..`psrad`): the count is the low 64 bits of `b` (the CPU
///   ignores bits 127:64); for the immediate forms pass the immediate as `b`.
///   `psrldq`/`pslldq` shift by `imm` bytes.
/// * `cmpps`/`cmpss`/`cmppd`/`cmpsd` take the predicate as `imm & 0x1f` (the VEX encoding);
///   legacy SSE passes `imm & 7`.
/// * Scalar forms (`addss`, `sqrtsd`, `roundss`, `cvtss2sd`...) keep the upper part of `a`.
/// * `insertps` from memory: pass the loaded single in bits 31:0 of `b` and `imm & 0x3f`.
/// * Widening/narrowing conversions (`cvtps2pd`, `cvtdq2pd`, `cvtpd2ps`, `cvtpd2dq`,
///   `pmovzx*`/`pmovsx*`) compute the 128-bit legacy result from the low part of `b`.
///
/// Returns `None` for mnemonics that are not lane-wise (moves, `blendv*`/`pblendvb` with their
/// implicit mask — see [`blendv`] —, `ptest`, (u)comis, GPR forms, `pcmp[ei]str*`...). FP
/// operations follow MXCSR (rounding, DAZ, FTZ), add their exception flags to `*mxcsr` and
/// return `Err(Exc::Fault(19, None))` (#XM) when one is unmasked; the caller turns that into
/// #UD when CR4.OSXMMEXCPT=0 (`Exec::simd_fault`) and leaves the destination unwritten.
pub(crate) fn lane_op(mn: M, a: u128, b: u128, imm: u8, mxcsr: &mut u32) -> Option<R<u128>> {
    if let Some(r) = int_lane(mn, a, b, imm) {
        return Some(Ok(r));
    }
    let mut env = ssefp::Env::new(*mxcsr);
    let r = fp_lane(mn, a, b, imm, &mut env)?;
    Some(env.finish(mxcsr).map(|()| r))
}

/// The variable blends: each element of `b` whose mask element has its top bit set replaces
/// the element of `a` (`pblendvb` bytes, `blendvps` dwords, `blendvpd` qwords).
pub(crate) fn blendv(mn: M, a: u128, b: u128, mask: u128) -> Option<u128> {
    let (w, top) = match mn {
        M::Pblendvb => (8, 7),
        M::Blendvps => (32, 31),
        M::Blendvpd => (64, 63),
        _ => return None,
    };
    let mut out = a;
    for k in 0..128 / w {
        if (mask >> (k * w + top)) & 1 != 0 {
            let m = (u128::MAX >> (128 - w)) << (k * w);
            out = (out & !m) | (b & m);
        }
    }
    Some(out)
}

/// Shift counts are the low 64 bits of the count operand.
fn shift_count(b: u128) -> u64 {
    b as u64
}

/// Integer, logic and shuffle lane operations (no MXCSR).
fn int_lane(mn: M, a: u128, b: u128, imm: u8) -> Option<u128> {
    let imm32 = u32::from(imm);
    let c = shift_count(b);
    Some(match mn {
        M::Pxor | M::Xorps | M::Xorpd => a ^ b,
        M::Por | M::Orps | M::Orpd => a | b,
        M::Pand | M::Andps | M::Andpd => a & b,
        M::Pandn | M::Andnps | M::Andnpd => !a & b,
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
        M::Paddb => map8(a, b, |x, y| x.wrapping_add(y)),
        M::Paddw => map16(a, b, |x, y| x.wrapping_add(y)),
        M::Paddd => map32(a, b, |x, y| x.wrapping_add(y)),
        M::Paddq => map64(a, b, |x, y| x.wrapping_add(y)),
        M::Psubb => map8(a, b, |x, y| x.wrapping_sub(y)),
        M::Psubw => map16(a, b, |x, y| x.wrapping_sub(y)),
        M::Psubd => map32(a, b, |x, y| x.wrapping_sub(y)),
        M::Psubq => map64(a, b, |x, y| x.wrapping_sub(y)),
        M::Paddusb => map8(a, b, |x, y| x.saturating_add(y)),
        M::Paddusw => map16(a, b, |x, y| x.saturating_add(y)),
        M::Psubusb => map8(a, b, |x, y| x.saturating_sub(y)),
        M::Psubusw => map16(a, b, |x, y| x.saturating_sub(y)),
        M::Paddsb => map8(a, b, |x, y| sat_i8(i32::from(x as i8) + i32::from(y as i8))),
        M::Paddsw => map16(a, b, |x, y| {
            sat_i16(i32::from(x as i16) + i32::from(y as i16))
        }),
        M::Psubsb => map8(a, b, |x, y| sat_i8(i32::from(x as i8) - i32::from(y as i8))),
        M::Psubsw => map16(a, b, |x, y| {
            sat_i16(i32::from(x as i16) - i32::from(y as i16))
        }),
        M::Pminub => map8(a, b, |x, y| x.min(y)),
        M::Pmaxub => map8(a, b, |x, y| x.max(y)),
        M::Pminsb => map8(a, b, |x, y| (x as i8).min(y as i8) as u8),
        M::Pmaxsb => map8(a, b, |x, y| (x as i8).max(y as i8) as u8),
        M::Pminuw => map16(a, b, |x, y| x.min(y)),
        M::Pmaxuw => map16(a, b, |x, y| x.max(y)),
        M::Pminsw => map16(a, b, |x, y| (x as i16).min(y as i16) as u16),
        M::Pmaxsw => map16(a, b, |x, y| (x as i16).max(y as i16) as u16),
        M::Pminud => map32(a, b, |x, y| x.min(y)),
        M::Pmaxud => map32(a, b, |x, y| x.max(y)),
        M::Pminsd => map32(a, b, |x, y| (x as i32).min(y as i32) as u32),
        M::Pmaxsd => map32(a, b, |x, y| (x as i32).max(y as i32) as u32),
        M::Pavgb => map8(a, b, |x, y| ((u16::from(x) + u16::from(y) + 1) >> 1) as u8),
        M::Pavgw => map16(a, b, |x, y| ((u32::from(x) + u32::from(y) + 1) >> 1) as u16),
        M::Pabsb => map8(0, b, |_, y| (y as i8).unsigned_abs()),
        M::Pabsw => map16(0, b, |_, y| (y as i16).unsigned_abs()),
        M::Pabsd => map32(0, b, |_, y| (y as i32).unsigned_abs()),
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
        M::Pmullw => map16(a, b, |x, y| x.wrapping_mul(y)),
        M::Pmulhw => map16(a, b, |x, y| {
            ((i32::from(x as i16) * i32::from(y as i16)) >> 16) as u16
        }),
        M::Pmulhuw => map16(a, b, |x, y| ((u32::from(x) * u32::from(y)) >> 16) as u16),
        M::Pmulhrsw => map16(a, b, |x, y| {
            ((((i32::from(x as i16) * i32::from(y as i16)) >> 14) + 1) >> 1) as u16
        }),
        M::Pmulld => map32(a, b, |x, y| x.wrapping_mul(y)),
        M::Pmuludq => map64(a, b, |x, y| (x & 0xffff_ffff) * (y & 0xffff_ffff)),
        M::Pmuldq => map64(a, b, |x, y| {
            (i64::from(x as u32 as i32) * i64::from(y as u32 as i32)) as u64
        }),
        M::Pmaddwd => {
            let (x, y) = (u16s(a), u16s(b));
            let mut o = [0u32; 4];
            for k in 0..4 {
                let p0 = i32::from(x[2 * k] as i16) * i32::from(y[2 * k] as i16);
                let p1 = i32::from(x[2 * k + 1] as i16) * i32::from(y[2 * k + 1] as i16);
                o[k] = p0.wrapping_add(p1) as u32;
            }
            from_u32s(o)
        }
        M::Pmaddubsw => {
            let (x, y) = (u8s(a), u8s(b));
            let mut o = [0u16; 8];
            for k in 0..8 {
                let p0 = i32::from(x[2 * k]) * i32::from(y[2 * k] as i8);
                let p1 = i32::from(x[2 * k + 1]) * i32::from(y[2 * k + 1] as i8);
                o[k] = sat_i16(p0 + p1);
            }
            from_u16s(o)
        }
        M::Psadbw => {
            let (x, y) = (u8s(a), u8s(b));
            let lo: u64 = (0..8).map(|k| u64::from(x[k].abs_diff(y[k]))).sum();
            let hi: u64 = (8..16).map(|k| u64::from(x[k].abs_diff(y[k]))).sum();
            from_u64s([lo, hi])
        }
        M::Mpsadbw => {
            let (x, y) = (u8s(a), u8s(b));
            let ao = usize::from((imm >> 2) & 1) * 4;
            let bo = usize::from(imm & 3) * 4;
            let mut o = [0u16; 8];
            for k in 0..8 {
                o[k] = (0..4)
                    .map(|j| u16::from(x[ao + k + j].abs_diff(y[bo + j])))
                    .sum();
            }
            from_u16s(o)
        }
        M::Phminposuw => {
            let y = u16s(b);
            let mut best = 0usize;
            for k in 1..8 {
                if y[k] < y[best] {
                    best = k;
                }
            }
            u128::from(y[best]) | ((best as u128) << 16)
        }
        M::Phaddw | M::Phaddsw | M::Phsubw | M::Phsubsw => {
            let (x, y) = (u16s(a), u16s(b));
            let f = |p: u16, q: u16| -> u16 {
                let (p, q) = (i32::from(p as i16), i32::from(q as i16));
                match mn {
                    M::Phaddw => (p + q) as u16,
                    M::Phaddsw => sat_i16(p + q),
                    M::Phsubw => (p - q) as u16,
                    _ => sat_i16(p - q),
                }
            };
            let mut o = [0u16; 8];
            for k in 0..4 {
                o[k] = f(x[2 * k], x[2 * k + 1]);
                o[k + 4] = f(y[2 * k], y[2 * k + 1]);
            }
            from_u16s(o)
        }
        M::Phaddd | M::Phsubd => {
            let (x, y) = (u32s(a), u32s(b));
            let f = |p: u32, q: u32| {
                if mn == M::Phaddd {
                    p.wrapping_add(q)
                } else {
                    p.wrapping_sub(q)
                }
            };
            from_u32s([f(x[0], x[1]), f(x[2], x[3]), f(y[0], y[1]), f(y[2], y[3])])
        }
        M::Psllw => map16(a, 0, |x, _| if c > 15 { 0 } else { x << c }),
        M::Pslld => map32(a, 0, |x, _| if c > 31 { 0 } else { x << c }),
        M::Psllq => map64(a, 0, |x, _| if c > 63 { 0 } else { x << c }),
        M::Psrlw => map16(a, 0, |x, _| if c > 15 { 0 } else { x >> c }),
        M::Psrld => map32(a, 0, |x, _| if c > 31 { 0 } else { x >> c }),
        M::Psrlq => map64(a, 0, |x, _| if c > 63 { 0 } else { x >> c }),
        M::Psraw => map16(a, 0, |x, _| ((x as i16) >> c.min(15)) as u16),
        M::Psrad => map32(a, 0, |x, _| ((x as i32) >> c.min(31)) as u32),
        M::Psrldq => {
            if imm > 15 {
                0
            } else {
                a >> (8 * imm32)
            }
        }
        M::Pslldq => {
            if imm > 15 {
                0
            } else {
                a << (8 * imm32)
            }
        }
        M::Pshufd => {
            let x = u32s(b);
            from_u32s([
                x[(imm & 3) as usize],
                x[((imm >> 2) & 3) as usize],
                x[((imm >> 4) & 3) as usize],
                x[((imm >> 6) & 3) as usize],
            ])
        }
        M::Pshuflw | M::Pshufhw => {
            let x = u16s(b);
            let mut o = x;
            let base = if mn == M::Pshuflw { 0 } else { 4 };
            for k in 0..4 {
                o[base + k] = x[base + ((imm >> (2 * k)) & 3) as usize];
            }
            from_u16s(o)
        }
        M::Pshufb => {
            let (x, y) = (u8s(a), u8s(b));
            let mut o = [0u8; 16];
            for k in 0..16 {
                o[k] = if y[k] & 0x80 != 0 {
                    0
                } else {
                    x[(y[k] & 15) as usize]
                };
            }
            from_u8s(o)
        }
        M::Shufps => {
            let (x, y) = (u32s(a), u32s(b));
            from_u32s([
                x[(imm & 3) as usize],
                x[((imm >> 2) & 3) as usize],
                y[((imm >> 4) & 3) as usize],
                y[((imm >> 6) & 3) as usize],
            ])
        }
        M::Shufpd => {
            let (x, y) = (u64s(a), u64s(b));
            from_u64s([x[(imm & 1) as usize], y[((imm >> 1) & 1) as usize]])
        }
        M::Palignr => {
            let wide = [u8s(b), u8s(a)].concat();
            let mut o = [0u8; 16];
            for k in 0..16 {
                o[k] = wide.get(k + imm as usize).copied().unwrap_or(0);
            }
            from_u8s(o)
        }
        M::Punpcklbw | M::Punpckhbw => {
            let (x, y) = (u8s(a), u8s(b));
            let base = if mn == M::Punpcklbw { 0 } else { 8 };
            let mut o = [0u8; 16];
            for k in 0..8 {
                o[2 * k] = x[base + k];
                o[2 * k + 1] = y[base + k];
            }
            from_u8s(o)
        }
        M::Punpcklwd | M::Punpckhwd => {
            let (x, y) = (u16s(a), u16s(b));
            let base = if mn == M::Punpcklwd { 0 } else { 4 };
            let mut o = [0u16; 8];
            for k in 0..4 {
                o[2 * k] = x[base + k];
                o[2 * k + 1] = y[base + k];
            }
            from_u16s(o)
        }
        M::Punpckldq | M::Punpckhdq | M::Unpcklps | M::Unpckhps => {
            let (x, y) = (u32s(a), u32s(b));
            let base = if matches!(mn, M::Punpckldq | M::Unpcklps) {
                0
            } else {
                2
            };
            from_u32s([x[base], y[base], x[base + 1], y[base + 1]])
        }
        M::Punpcklqdq | M::Unpcklpd => from_u64s([u64s(a)[0], u64s(b)[0]]),
        M::Punpckhqdq | M::Unpckhpd => from_u64s([u64s(a)[1], u64s(b)[1]]),
        M::Packuswb | M::Packsswb => {
            let (x, y) = (u16s(a), u16s(b));
            let mut o = [0u8; 16];
            for k in 0..8 {
                let (p, q) = (i32::from(x[k] as i16), i32::from(y[k] as i16));
                if mn == M::Packuswb {
                    o[k] = sat_u8(p);
                    o[k + 8] = sat_u8(q);
                } else {
                    o[k] = sat_i8(p);
                    o[k + 8] = sat_i8(q);
                }
            }
            from_u8s(o)
        }
        M::Packssdw | M::Packusdw => {
            let (x, y) = (u32s(a), u32s(b));
            let mut o = [0u16; 8];
            for k in 0..4 {
                let (p, q) = (x[k] as i32, y[k] as i32);
                if mn == M::Packusdw {
                    o[k] = sat_u16(p);
                    o[k + 4] = sat_u16(q);
                } else {
                    o[k] = sat_i16(p);
                    o[k + 4] = sat_i16(q);
                }
            }
            from_u16s(o)
        }
        M::Pmovzxbw | M::Pmovsxbw => {
            let x = u8s(b);
            let mut o = [0u16; 8];
            for k in 0..8 {
                o[k] = if mn == M::Pmovzxbw {
                    u16::from(x[k])
                } else {
                    x[k] as i8 as i16 as u16
                };
            }
            from_u16s(o)
        }
        M::Pmovzxbd | M::Pmovsxbd => {
            let x = u8s(b);
            let mut o = [0u32; 4];
            for k in 0..4 {
                o[k] = if mn == M::Pmovzxbd {
                    u32::from(x[k])
                } else {
                    x[k] as i8 as i32 as u32
                };
            }
            from_u32s(o)
        }
        M::Pmovzxwd | M::Pmovsxwd => {
            let x = u16s(b);
            let mut o = [0u32; 4];
            for k in 0..4 {
                o[k] = if mn == M::Pmovzxwd {
                    u32::from(x[k])
                } else {
                    x[k] as i16 as i32 as u32
                };
            }
            from_u32s(o)
        }
        M::Pmovzxdq | M::Pmovsxdq => {
            let x = u32s(b);
            let f = |v: u32| {
                if mn == M::Pmovzxdq {
                    u64::from(v)
                } else {
                    v as i32 as i64 as u64
                }
            };
            from_u64s([f(x[0]), f(x[1])])
        }
        M::Pmovzxbq | M::Pmovsxbq => {
            let x = u8s(b);
            let f = |v: u8| {
                if mn == M::Pmovzxbq {
                    u64::from(v)
                } else {
                    v as i8 as i64 as u64
                }
            };
            from_u64s([f(x[0]), f(x[1])])
        }
        M::Pmovzxwq | M::Pmovsxwq => {
            let x = u16s(b);
            let f = |v: u16| {
                if mn == M::Pmovzxwq {
                    u64::from(v)
                } else {
                    v as i16 as i64 as u64
                }
            };
            from_u64s([f(x[0]), f(x[1])])
        }
        M::Pblendw => {
            let (x, y) = (u16s(a), u16s(b));
            let mut o = x;
            for k in 0..8 {
                if imm & (1 << k) != 0 {
                    o[k] = y[k];
                }
            }
            from_u16s(o)
        }
        M::Blendps => {
            let (x, y) = (u32s(a), u32s(b));
            let mut o = x;
            for k in 0..4 {
                if imm & (1 << k) != 0 {
                    o[k] = y[k];
                }
            }
            from_u32s(o)
        }
        M::Blendpd => {
            let (x, y) = (u64s(a), u64s(b));
            let mut o = x;
            for k in 0..2 {
                if imm & (1 << k) != 0 {
                    o[k] = y[k];
                }
            }
            from_u64s(o)
        }
        M::Insertps => {
            let s = u32s(b)[usize::from((imm >> 6) & 3)];
            let mut o = u32s(a);
            o[usize::from((imm >> 4) & 3)] = s;
            for k in 0..4 {
                if imm & (1 << k) != 0 {
                    o[k] = 0;
                }
            }
            from_u32s(o)
        }
        M::Movddup => from_u64s([b as u64, b as u64]),
        M::Movshdup => {
            let x = u32s(b);
            from_u32s([x[1], x[1], x[3], x[3]])
        }
        M::Movsldup => {
            let x = u32s(b);
            from_u32s([x[0], x[0], x[2], x[2]])
        }
        _ => return None,
    })
}

fn ps(a: u128, b: u128, mut f: impl FnMut(u64, u64) -> u64) -> u128 {
    let (x, y) = (u32s(a), u32s(b));
    let mut o = [0u32; 4];
    for k in 0..4 {
        o[k] = f(u64::from(x[k]), u64::from(y[k])) as u32;
    }
    from_u32s(o)
}
fn pd(a: u128, b: u128, mut f: impl FnMut(u64, u64) -> u64) -> u128 {
    let (x, y) = (u64s(a), u64s(b));
    from_u64s([f(x[0], y[0]), f(x[1], y[1])])
}
fn ss(a: u128, r: u64) -> u128 {
    (a & !0xffff_ffffu128) | u128::from(r as u32)
}
fn sd(a: u128, r: u64) -> u128 {
    (a & !u128::from(u64::MAX)) | u128::from(r)
}

/// Approximate reciprocal (`rsqrt` false) or reciprocal square root of a single, as RCPPS /
/// RSQRTPS: the exact value rounded to 12 fraction bits (the hardware's tables give other
/// bits within the same 1.5 * 2^-12 relative error), denormal inputs as zero, tiny results
/// flushed, no flags.
pub(crate) fn approx(rsqrt: bool, x: u32) -> u32 {
    use ssefp::Fmt;
    let x64 = u64::from(x);
    if ssefp::S32::is_nan(x64) {
        return x | 0x0040_0000;
    }
    let sign = x & 0x8000_0000;
    if x & 0x7f80_0000 == 0 {
        return sign | 0x7f80_0000;
    }
    if rsqrt && sign != 0 {
        return 0xffc0_0000;
    }
    if x & 0x7fff_ffff == 0x7f80_0000 {
        return sign;
    }
    let v = f64::from(f32::from_bits(x & 0x7fff_ffff));
    let r = if rsqrt { 1.0 / v.sqrt() } else { 1.0 / v };
    // Round to 1 + 12 significant bits.
    let bits = r.to_bits();
    let keep = 52 - 12;
    let rounded = (bits + (1u64 << (keep - 1))) & !((1u64 << keep) - 1);
    let r = f64::from_bits(rounded);
    if r < f64::from(f32::MIN_POSITIVE) {
        return sign;
    }
    sign | (r as f32).to_bits()
}

/// FP lane operations (MXCSR rounding, DAZ/FTZ, flags into `env`).
fn fp_lane(mn: M, a: u128, b: u128, imm: u8, env: &mut ssefp::Env) -> Option<u128> {
    use ssefp::{Op, S32, S64};
    let (a0, b0) = (a as u64 & 0xffff_ffff, b as u64 & 0xffff_ffff);
    let (a64, b64) = (a as u64, b as u64);
    let op = |m| match m {
        M::Addps | M::Addss | M::Addpd | M::Addsd => Op::Add,
        M::Subps | M::Subss | M::Subpd | M::Subsd => Op::Sub,
        M::Mulps | M::Mulss | M::Mulpd | M::Mulsd => Op::Mul,
        _ => Op::Div,
    };
    let pred = u32::from(imm & 0x1f);
    let rmode = if imm & 4 != 0 {
        (env.mxcsr >> 13) & 3
    } else {
        u32::from(imm & 3)
    };
    let quiet_pe = imm & 8 != 0;
    Some(match mn {
        M::Addps | M::Subps | M::Mulps | M::Divps => {
            ps(a, b, |x, y| env.arith::<S32>(op(mn), x, y))
        }
        M::Addpd | M::Subpd | M::Mulpd | M::Divpd => {
            pd(a, b, |x, y| env.arith::<S64>(op(mn), x, y))
        }
        M::Addss | M::Subss | M::Mulss | M::Divss => ss(a, env.arith::<S32>(op(mn), a0, b0)),
        M::Addsd | M::Subsd | M::Mulsd | M::Divsd => sd(a, env.arith::<S64>(op(mn), a64, b64)),
        M::Minps | M::Maxps => ps(a, b, |x, y| env.minmax::<S32>(mn == M::Maxps, x, y)),
        M::Minpd | M::Maxpd => pd(a, b, |x, y| env.minmax::<S64>(mn == M::Maxpd, x, y)),
        M::Minss | M::Maxss => ss(a, env.minmax::<S32>(mn == M::Maxss, a0, b0)),
        M::Minsd | M::Maxsd => sd(a, env.minmax::<S64>(mn == M::Maxsd, a64, b64)),
        M::Sqrtps => ps(0, b, |_, y| env.sqrt::<S32>(y)),
        M::Sqrtpd => pd(0, b, |_, y| env.sqrt::<S64>(y)),
        M::Sqrtss => ss(a, env.sqrt::<S32>(b0)),
        M::Sqrtsd => sd(a, env.sqrt::<S64>(b64)),
        M::Cmpps => ps(a, b, |x, y| {
            if env.cmp::<S32>(pred, x, y) {
                u64::MAX
            } else {
                0
            }
        }),
        M::Cmppd => pd(a, b, |x, y| {
            if env.cmp::<S64>(pred, x, y) {
                u64::MAX
            } else {
                0
            }
        }),
        M::Cmpss => ss(
            a,
            if env.cmp::<S32>(pred, a0, b0) {
                u64::MAX
            } else {
                0
            },
        ),
        M::Cmpsd => sd(
            a,
            if env.cmp::<S64>(pred, a64, b64) {
                u64::MAX
            } else {
                0
            },
        ),
        M::Haddps | M::Hsubps => {
            let o = if mn == M::Haddps { Op::Add } else { Op::Sub };
            let (x, y) = (u32s(a), u32s(b));
            let mut f = |p: u32, q: u32| env.arith::<S32>(o, u64::from(p), u64::from(q)) as u32;
            let r0 = f(x[0], x[1]);
            let r1 = f(x[2], x[3]);
            let r2 = f(y[0], y[1]);
            let r3 = f(y[2], y[3]);
            from_u32s([r0, r1, r2, r3])
        }
        M::Haddpd | M::Hsubpd => {
            let o = if mn == M::Haddpd { Op::Add } else { Op::Sub };
            let (x, y) = (u64s(a), u64s(b));
            let r0 = env.arith::<S64>(o, x[0], x[1]);
            let r1 = env.arith::<S64>(o, y[0], y[1]);
            from_u64s([r0, r1])
        }
        M::Addsubps => {
            let mut k = 0;
            ps(a, b, |x, y| {
                k += 1;
                env.arith::<S32>(if k % 2 == 1 { Op::Sub } else { Op::Add }, x, y)
            })
        }
        M::Addsubpd => {
            let (x, y) = (u64s(a), u64s(b));
            let r0 = env.arith::<S64>(Op::Sub, x[0], y[0]);
            let r1 = env.arith::<S64>(Op::Add, x[1], y[1]);
            from_u64s([r0, r1])
        }
        M::Roundps => ps(0, b, |_, y| env.round_int::<S32>(rmode, quiet_pe, y)),
        M::Roundpd => pd(0, b, |_, y| env.round_int::<S64>(rmode, quiet_pe, y)),
        M::Roundss => ss(a, env.round_int::<S32>(rmode, quiet_pe, b0)),
        M::Roundsd => sd(a, env.round_int::<S64>(rmode, quiet_pe, b64)),
        M::Dpps => {
            let (x, y) = (u32s(a), u32s(b));
            let mut t = [0u64; 4];
            for k in 0..4 {
                if imm & (0x10 << k) != 0 {
                    t[k] = env.arith::<S32>(Op::Mul, u64::from(x[k]), u64::from(y[k]));
                }
            }
            // The CPU sums per destination element, in an order that decides which NaN
            // propagates: v[k] = t[k^1] + t[k], then w[k] = v[k] + v[k^2]. Intermediate
            // results are operands like any (DAZ, DE); an unmasked exception in a step ends
            // the instruction there (#XM with that step's flags).
            if env.end_step() {
                return Some(0);
            }
            let mut v = [0u64; 4];
            for k in 0..4 {
                v[k] = env.arith::<S32>(Op::Add, t[k ^ 1], t[k]);
            }
            if env.end_step() {
                return Some(0);
            }
            let mut w = [0u32; 4];
            for k in 0..4 {
                w[k] = env.arith::<S32>(Op::Add, v[k], v[k ^ 2]) as u32;
            }
            let mut o = [0u32; 4];
            for k in 0..4 {
                if imm & (1 << k) != 0 {
                    o[k] = w[k];
                }
            }
            from_u32s(o)
        }
        M::Dppd => {
            let (x, y) = (u64s(a), u64s(b));
            let mut t = [0u64; 2];
            for k in 0..2 {
                if imm & (0x10 << k) != 0 {
                    t[k] = env.arith::<S64>(Op::Mul, x[k], y[k]);
                }
            }
            // Element k is t[k] + t[k^1] (the order decides which NaN propagates); the sum
            // is not done when the products raised an unmasked exception.
            if env.end_step() {
                return Some(0);
            }
            let w = [
                env.arith::<S64>(Op::Add, t[0], t[1]),
                env.arith::<S64>(Op::Add, t[1], t[0]),
            ];
            let mut o = [0u64; 2];
            for k in 0..2 {
                if imm & (1 << k) != 0 {
                    o[k] = w[k];
                }
            }
            from_u64s(o)
        }
        M::Rcpps => ps(0, b, |_, y| {
            u64::from(approx(false, env.input_quiet::<S32>(y) as u32))
        }),
        M::Rsqrtps => ps(0, b, |_, y| {
            u64::from(approx(true, env.input_quiet::<S32>(y) as u32))
        }),
        M::Rcpss => ss(a, u64::from(approx(false, b0 as u32))),
        M::Rsqrtss => ss(a, u64::from(approx(true, b0 as u32))),
        M::Cvtdq2ps => ps(0, b, |_, y| {
            env.cvt_from_int::<S32>(i64::from(y as u32 as i32))
        }),
        M::Cvtps2dq | M::Cvttps2dq => ps(0, b, |_, y| {
            env.cvt_to_int::<S32>(mn == M::Cvttps2dq, 32, y)
        }),
        M::Cvtdq2pd => {
            let x = u32s(b);
            let r0 = env.cvt_from_int::<S64>(i64::from(x[0] as i32));
            let r1 = env.cvt_from_int::<S64>(i64::from(x[1] as i32));
            from_u64s([r0, r1])
        }
        M::Cvtpd2dq | M::Cvttpd2dq => {
            let t = mn == M::Cvttpd2dq;
            let x = u64s(b);
            let r0 = env.cvt_to_int::<S64>(t, 32, x[0]);
            let r1 = env.cvt_to_int::<S64>(t, 32, x[1]);
            u128::from(r0) | (u128::from(r1) << 32)
        }
        M::Cvtps2pd => {
            let x = u32s(b);
            let r0 = env.s2d(u64::from(x[0]));
            let r1 = env.s2d(u64::from(x[1]));
            from_u64s([r0, r1])
        }
        M::Cvtpd2ps => {
            let x = u64s(b);
            let r0 = env.d2s(x[0]);
            let r1 = env.d2s(x[1]);
            u128::from(r0) | (u128::from(r1) << 32)
        }
        M::Cvtss2sd => sd(a, env.s2d(b0)),
        M::Cvtsd2ss => ss(a, env.d2s(b64)),
        _ => return None,
    })
}

const CR0_EM: u64 = 1 << 2;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;

/// The legacy SSE instructions whose 128-bit memory operand needs no alignment: the unaligned
/// moves and the SSE4.2 string compares (also the translator's rule, `jit/simd.rs`).
pub(crate) fn unaligned_ok(m: M) -> bool {
    matches!(
        m,
        M::Movdqu
            | M::Movups
            | M::Movupd
            | M::Lddqu
            | M::Pcmpestri
            | M::Pcmpestri64
            | M::Pcmpestrm64
            | M::Pcmpestrm
            | M::Pcmpistri
            | M::Pcmpistrm
    )
}

/// Legacy SSE 128-bit memory operands must be 16-byte aligned (#GP(0)), except for
/// [`unaligned_ok`] ones.
fn check_align(i: &Instruction, a: u64) -> R<()> {
    let unaligned = unaligned_ok(i.mnemonic());
    if a & 15 != 0 && !unaligned && i.encoding() == iced_x86::EncodingKind::Legacy {
        return gp0();
    }
    Ok(())
}

impl Exec<'_> {
    /// Reads operand `n` as a 128-bit value (XMM register, GPR, or memory of the operand's
    /// size, zero-extended).
    pub(crate) fn xrd(&mut self, i: &Instruction, n: u32) -> R<u128> {
        match i.op_kind(n) {
            OpKind::Register => {
                let r = i.op_register(n);
                match xidx(r) {
                    Some(x) => Ok(self.cpu.xmm[x]),
                    None if reg_size(r) <= 8 => Ok(u128::from(self.rd_reg(r))),
                    None => Err(Exc::unhandled("MMX register operand")),
                }
            }
            OpKind::Memory => {
                let a = self.mem_lin(i)?;
                match i.memory_size().size() {
                    16 => {
                        check_align(i, a)?;
                        self.read_u128(a)
                    }
                    s @ (1 | 2 | 4 | 8) => Ok(u128::from(self.read_lin(a, s)?)),
                    _ => Err(Exc::unhandled("SSE memory operand size")),
                }
            }
            _ => Ok(u128::from(self.rd(i, n)?)),
        }
    }

    pub(crate) fn xwr(&mut self, i: &Instruction, n: u32, v: u128) -> R<()> {
        match i.op_kind(n) {
            OpKind::Register => {
                let r = i.op_register(n);
                match xidx(r) {
                    Some(x) => {
                        self.cpu.xmm[x] = v;
                        Ok(())
                    }
                    None if reg_size(r) <= 8 => {
                        let idx = crate::exec::gpr_index(r);
                        self.set_gpr_sized(idx, reg_size(r), v as u64);
                        Ok(())
                    }
                    None => Err(Exc::unhandled("MMX register operand")),
                }
            }
            OpKind::Memory => {
                let a = self.mem_lin(i)?;
                match i.memory_size().size() {
                    16 => {
                        check_align(i, a)?;
                        self.write_u128(a, v)
                    }
                    s @ (1 | 2 | 4 | 8) => self.write_lin(a, s, v as u64),
                    _ => Err(Exc::unhandled("SSE memory operand size")),
                }
            }
            _ => Err(Exc::unhandled("SSE destination")),
        }
    }

    pub(crate) fn is_mmx(&self, i: &Instruction) -> bool {
        (0..i.op_count()).any(|n| {
            i.op_kind(n) == OpKind::Register && (225..233).contains(&(i.op_register(n) as usize))
        })
    }

    fn fpu_state(&self) -> hv::FpuState {
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
    }

    pub fn exec_fp(&mut self, i: &Instruction) -> R<()> {
        let mn = i.mnemonic();
        if crate::x87::is_x87(mn) {
            return self.exec_x87(i);
        }
        if mn == M::Emms || self.is_mmx(i) {
            return self.exec_mmx(i);
        }
        match mn {
            M::Fxsave | M::Fxsave64 => {
                let a = self.mem_lin(i)?;
                if a & 15 != 0 {
                    return gp0();
                }
                let img = self.fpu_state().to_fxsave();
                self.probe_write(a, 512)?;
                for k in 0..64 {
                    let mut w = [0u8; 8];
                    w.copy_from_slice(&img[k * 8..k * 8 + 8]);
                    // Bytes 464..511 are available to software: leave them.
                    if k * 8 >= 464 {
                        break;
                    }
                    self.write_lin(a + (k as u64) * 8, 8, u64::from_le_bytes(w))?;
                }
                Ok(())
            }
            M::Fxrstor | M::Fxrstor64 => {
                let a = self.mem_lin(i)?;
                if a & 15 != 0 {
                    return gp0();
                }
                let mut img = [0u8; 512];
                for k in 0..58 {
                    let v = self.read_lin(a + (k as u64) * 8, 8)?;
                    img[k * 8..k * 8 + 8].copy_from_slice(&v.to_le_bytes());
                }
                let f = hv::FpuState::from_fxsave(&img);
                if f.mxcsr & !0xffff != 0 {
                    return gp0();
                }
                self.cpu.fcw = f.fcw;
                self.cpu.fsw = f.fsw;
                self.cpu.ftw = f.ftw;
                self.cpu.fop = f.fop;
                self.cpu.fip = f.fip;
                self.cpu.fdp = f.fdp;
                self.cpu.mxcsr = f.mxcsr;
                self.cpu.st = f.st;
                for (d, x) in self.cpu.xmm.iter_mut().zip(f.xmm.iter()) {
                    *d = u128::from_le_bytes(*x);
                }
                Ok(())
            }
            M::Ldmxcsr => {
                self.sse_enabled()?;
                let v = self.rd(i, 0)? as u32;
                if v & !0xffff != 0 {
                    return gp0();
                }
                self.cpu.mxcsr = v;
                Ok(())
            }
            M::Stmxcsr => {
                self.sse_enabled()?;
                let v = u64::from(self.cpu.mxcsr);
                self.wr(i, 0, v)
            }
            _ => self.exec_sse(i),
        }
    }

    /// #XM from an FP operation becomes #UD when CR4.OSXMMEXCPT=0.
    pub(crate) fn simd_fault(&self, e: Exc) -> Exc {
        match e {
            Exc::Fault(ssefp::XM, _) if self.cpu.cr4 & CR4_OSXMMEXCPT == 0 => Exc::Fault(6, None),
            e => e,
        }
    }

    /// The ISA family (MMX, SSE..SSE4.2) of `i`, if it is one of them: a model without it
    /// raises #UD.
    pub(crate) fn simd_family(&self, i: &Instruction) -> Option<R<()>> {
        use hv::cpu_model::Feature as F;
        use iced_x86::CpuidFeature as C;
        let mut found = None;
        for f in i.cpuid_features() {
            let need = match f {
                C::MMX => F::Mmx,
                C::SSE => F::Sse,
                C::SSE2 => F::Sse2,
                C::SSE3 => F::Sse3,
                C::SSSE3 => F::Ssse3,
                C::SSE4_1 => F::Sse41,
                C::SSE4_2 => F::Sse42,
                _ => continue,
            };
            if !self.has(need) {
                return Some(ud());
            }
            found = Some(Ok(()));
        }
        found
    }

    /// What every SSE instruction checks first: CR0.EM or CR4.OSFXSR=0 → #UD, CR0.TS → #NM.
    pub(crate) fn sse_enabled(&self) -> R<()> {
        if self.cpu.cr0 & CR0_EM != 0 || self.cpu.cr4 & CR4_OSFXSR == 0 {
            return ud();
        }
        if self.cpu.cr0 & crate::cpu::CR0_TS != 0 {
            return Err(Exc::Fault(7, None));
        }
        Ok(())
    }

    /// Runs a lane operation on the destination and source and writes the destination.
    fn lane_exec(&mut self, d: usize, mn: M, a: u128, b: u128, imm: u8) -> R<()> {
        let mut mxcsr = self.cpu.mxcsr;
        let r =
            lane_op(mn, a, b, imm, &mut mxcsr).ok_or_else(|| Exc::unhandled(format!("{mn:?}")))?;
        self.cpu.mxcsr = mxcsr;
        self.cpu.xmm[d] = r.map_err(|e| self.simd_fault(e))?;
        Ok(())
    }

    /// Runs `f` on a fresh FP environment and merges its flags into MXCSR (#XM/#UD if unmasked).
    fn with_env<T>(&mut self, f: impl FnOnce(&mut ssefp::Env) -> T) -> R<T> {
        let mut env = ssefp::Env::new(self.cpu.mxcsr);
        let v = f(&mut env);
        let mut mxcsr = self.cpu.mxcsr;
        let r = env.finish(&mut mxcsr);
        self.cpu.mxcsr = mxcsr;
        r.map_err(|e| self.simd_fault(e))?;
        Ok(v)
    }

    fn exec_sse(&mut self, i: &Instruction) -> R<()> {
        let mn = i.mnemonic();
        match self.simd_family(i) {
            None => return Err(Exc::unhandled(format!("{mn:?}"))),
            Some(r) => r?,
        }
        if mn == M::Crc32 {
            // A general-register instruction: no SSE state involved.
            return self.sse_to_gpr(i);
        }
        self.sse_enabled()?;
        match mn {
            M::Movdqa
            | M::Movdqu
            | M::Movaps
            | M::Movups
            | M::Movapd
            | M::Movupd
            | M::Lddqu
            | M::Movntdq
            | M::Movntps
            | M::Movntpd
            | M::Movntdqa => {
                let v = self.xrd(i, 1)?;
                self.xwr(i, 0, v)
            }
            M::Movd | M::Movq => {
                // To an XMM register the rest is zeroed; to a GPR/memory only the low part moves.
                let v = self.xrd(i, 1)?;
                let w = if mn == M::Movd {
                    v & 0xffff_ffff
                } else {
                    v & u128::from(u64::MAX)
                };
                self.xwr(i, 0, w)
            }
            M::Movss | M::Movsd => {
                let m: u128 = if mn == M::Movss {
                    0xffff_ffff
                } else {
                    u128::from(u64::MAX)
                };
                let src = self.xrd(i, 1)?;
                match (i.op_kind(0), i.op_kind(1)) {
                    (OpKind::Register, OpKind::Register) => {
                        let d = xidx(i.op_register(0)).unwrap_or(0);
                        self.cpu.xmm[d] = (self.cpu.xmm[d] & !m) | (src & m);
                        Ok(())
                    }
                    _ => self.xwr(i, 0, src & m),
                }
            }
            M::Movlps | M::Movlpd | M::Movhps | M::Movhpd => {
                let high = matches!(mn, M::Movhps | M::Movhpd);
                if i.op_kind(0) == OpKind::Memory {
                    let v = self.xrd(i, 1)?;
                    let w = if high { v >> 64 } else { v };
                    self.xwr(i, 0, w & u128::from(u64::MAX))
                } else {
                    let d = xidx(i.op_register(0)).unwrap_or(0);
                    let v = self.xrd(i, 1)? & u128::from(u64::MAX);
                    let cur = self.cpu.xmm[d];
                    self.cpu.xmm[d] = if high {
                        (cur & u128::from(u64::MAX)) | (v << 64)
                    } else {
                        (cur & !u128::from(u64::MAX)) | v
                    };
                    Ok(())
                }
            }
            M::Movhlps | M::Movlhps => {
                let d = xidx(i.op_register(0)).unwrap_or(0);
                let s = self.xrd(i, 1)?;
                let cur = self.cpu.xmm[d];
                self.cpu.xmm[d] = if mn == M::Movhlps {
                    (cur & !u128::from(u64::MAX)) | (s >> 64)
                } else {
                    (cur & u128::from(u64::MAX)) | (s << 64)
                };
                Ok(())
            }
            M::Pmovmskb | M::Movmskps | M::Movmskpd => {
                let v = self.xrd(i, 1)?;
                let r = match mn {
                    M::Pmovmskb => u8s(v)
                        .iter()
                        .enumerate()
                        .fold(0u64, |acc, (k, b)| acc | (u64::from(b >> 7) << k)),
                    M::Movmskps => u32s(v)
                        .iter()
                        .enumerate()
                        .fold(0u64, |acc, (k, d)| acc | (u64::from(d >> 31) << k)),
                    _ => u64s(v)
                        .iter()
                        .enumerate()
                        .fold(0u64, |acc, (k, q)| acc | ((q >> 63) << k)),
                };
                let reg = i.op_register(0);
                let idx = crate::exec::gpr_index(reg);
                self.set_gpr_sized(idx, reg_size(reg).max(4), r);
                Ok(())
            }
            M::Pextrb | M::Pextrw | M::Pextrd | M::Pextrq | M::Extractps => {
                let v = self.xrd(i, 1)?;
                let imm = u32::from(i.immediate8());
                let r = match mn {
                    M::Pextrb => u64::from(u8s(v)[(imm & 15) as usize]),
                    M::Pextrw => u64::from(u16s(v)[(imm & 7) as usize]),
                    M::Pextrd | M::Extractps => u64::from(u32s(v)[(imm & 3) as usize]),
                    _ => u64s(v)[(imm & 1) as usize],
                };
                if i.op_kind(0) == OpKind::Register {
                    let reg = i.op_register(0);
                    let idx = crate::exec::gpr_index(reg);
                    self.set_gpr_sized(idx, reg_size(reg).max(4), r);
                    Ok(())
                } else {
                    self.wr(i, 0, r)
                }
            }
            M::Pinsrb | M::Pinsrw | M::Pinsrd | M::Pinsrq => {
                let d = xidx(i.op_register(0)).unwrap_or(0);
                let v = self.xrd(i, 1)?;
                let imm = u32::from(i.immediate8());
                let cur = self.cpu.xmm[d];
                let (bits, lane) = match mn {
                    M::Pinsrb => (8, imm & 15),
                    M::Pinsrw => (16, imm & 7),
                    M::Pinsrd => (32, imm & 3),
                    _ => (64, imm & 1),
                };
                let m = ((1u128 << bits) - 1) << (bits * lane);
                self.cpu.xmm[d] = (cur & !m) | ((v << (bits * lane)) & m);
                Ok(())
            }
            M::Maskmovdqu => {
                let n = i.op_count();
                let data = self.xrd(i, n - 2)?;
                let mask = self.xrd(i, n - 1)?;
                self.masked_store(i, &u8s(data), &u8s(mask))
            }
            M::Ptest => {
                let a = self.xrd(i, 0)?;
                let b = self.xrd(i, 1)?;
                let mut f = 0;
                if a & b == 0 {
                    f |= crate::cpu::ZF;
                }
                if !a & b == 0 {
                    f |= crate::cpu::CF;
                }
                self.set_flags(crate::cpu::ARITH_FLAGS, f);
                Ok(())
            }
            M::Pblendvb | M::Blendvps | M::Blendvpd => {
                let d = xidx(i.op_register(0)).unwrap_or(0);
                let b = self.xrd(i, 1)?;
                let r = blendv(mn, self.cpu.xmm[d], b, self.cpu.xmm[0])
                    .ok_or_else(|| Exc::unhandled("blendv"))?;
                self.cpu.xmm[d] = r;
                Ok(())
            }
            M::Ucomisd | M::Comisd | M::Ucomiss | M::Comiss => {
                let a = self.xrd(i, 0)?;
                let b = self.xrd(i, 1)?;
                let signaling = matches!(mn, M::Comisd | M::Comiss);
                let f = self.with_env(|e| {
                    if matches!(mn, M::Ucomisd | M::Comisd) {
                        e.comis::<ssefp::S64>(signaling, a as u64, b as u64)
                    } else {
                        e.comis::<ssefp::S32>(
                            signaling,
                            a as u64 & 0xffff_ffff,
                            b as u64 & 0xffff_ffff,
                        )
                    }
                })?;
                self.set_flags(crate::cpu::ARITH_FLAGS, f);
                Ok(())
            }
            M::Cvtsi2sd | M::Cvtsi2ss => {
                let d = xidx(i.op_register(0)).unwrap_or(0);
                let size = self.op_size(i, 1);
                let v = crate::exec::sx(self.xrd(i, 1)? as u64, size) as i64;
                let a = self.cpu.xmm[d];
                let r = self.with_env(|e| {
                    if mn == M::Cvtsi2sd {
                        (a & !u128::from(u64::MAX)) | u128::from(e.cvt_from_int::<ssefp::S64>(v))
                    } else {
                        (a & !0xffff_ffffu128) | u128::from(e.cvt_from_int::<ssefp::S32>(v))
                    }
                })?;
                self.cpu.xmm[d] = r;
                Ok(())
            }
            M::Cvtpi2ps | M::Cvtpi2pd => {
                // Memory source (the MMX-register form runs in mmx.rs).
                let d = xidx(i.op_register(0)).unwrap_or(0);
                let v = self.xrd(i, 1)? as u64;
                self.cvtpi(d, mn, v)
            }
            M::Insertps => {
                let d = xidx(i.op_register(0)).unwrap_or(0);
                let b = self.xrd(i, 1)?;
                let mut imm = i.immediate8();
                if i.op_kind(1) == OpKind::Memory {
                    imm &= 0x3f;
                }
                self.lane_exec(d, mn, self.cpu.xmm[d], b, imm)
            }
            _ => self.sse_binary(i),
        }
    }

    /// MASKMOVQ/MASKMOVDQU: the bytes of `data` whose `mask` byte has its top bit set go to
    /// DS:rDI (address size of the instruction).
    pub(crate) fn masked_store(&mut self, i: &Instruction, data: &[u8], mask: &[u8]) -> R<()> {
        let asz = match i.op_kind(0) {
            OpKind::MemorySegDI => 2,
            OpKind::MemorySegEDI => 4,
            _ => 8,
        };
        let di = self.cpu.gpr[7] & crate::exec::mask(asz);
        let seg = i.memory_segment();
        let base = self.seg_lin(seg, di);
        let sel: Vec<usize> = (0..data.len()).filter(|&k| mask[k] & 0x80 != 0).collect();
        if let (Some(&first), Some(&last)) = (sel.first(), sel.last()) {
            let lo = base.wrapping_add(first as u64);
            if self.cpu.mode64()
                && (!crate::decode::canonical(lo)
                    || !crate::decode::canonical(base.wrapping_add(last as u64)))
            {
                return gp0();
            }
        }
        // The CPU checks the whole destination, selected bytes or not, in 8-byte halves, the
        // upper half first (measured on this Intel host: a fault in the upper half has its
        // first byte in that page in CR2 even when the lower half faults too; nothing is
        // written).
        for half in (0..data.len()).step_by(8).rev() {
            self.probe_write(base.wrapping_add(half as u64), 8.min(data.len() - half))?;
        }
        if !sel.is_empty() {
            for k in sel {
                self.write_lin(base.wrapping_add(k as u64), 1, u64::from(data[k]))?;
            }
        }
        Ok(())
    }

    /// CVTPI2PS/CVTPI2PD of two packed dwords `v` into XMM `d`.
    pub(crate) fn cvtpi(&mut self, d: usize, mn: M, v: u64) -> R<()> {
        let (x0, x1) = (
            i64::from(v as u32 as i32),
            i64::from((v >> 32) as u32 as i32),
        );
        let a = self.cpu.xmm[d];
        let r = self.with_env(|e| {
            if mn == M::Cvtpi2ps {
                let r0 = e.cvt_from_int::<ssefp::S32>(x0);
                let r1 = e.cvt_from_int::<ssefp::S32>(x1);
                (a & !u128::from(u64::MAX)) | u128::from(r0) | (u128::from(r1) << 32)
            } else {
                let r0 = e.cvt_from_int::<ssefp::S64>(x0);
                let r1 = e.cvt_from_int::<ssefp::S64>(x1);
                from_u64s([r0, r1])
            }
        })?;
        self.cpu.xmm[d] = r;
        Ok(())
    }

    /// CVT(T)PS2PI / CVT(T)PD2PI: two packed dwords from the low singles or both doubles.
    pub(crate) fn cvt2pi(&mut self, mn: M, v: u128) -> R<u64> {
        let t = matches!(mn, M::Cvttps2pi | M::Cvttpd2pi);
        self.with_env(|e| {
            let (r0, r1) = if matches!(mn, M::Cvtps2pi | M::Cvttps2pi) {
                let x = u32s(v);
                (
                    e.cvt_to_int::<ssefp::S32>(t, 32, u64::from(x[0])),
                    e.cvt_to_int::<ssefp::S32>(t, 32, u64::from(x[1])),
                )
            } else {
                let x = u64s(v);
                (
                    e.cvt_to_int::<ssefp::S64>(t, 32, x[0]),
                    e.cvt_to_int::<ssefp::S64>(t, 32, x[1]),
                )
            };
            r0 | (r1 << 32)
        })
    }

    /// Two-operand (dst = dst op src) lane-wise forms, through [`lane_op`].
    fn sse_binary(&mut self, i: &Instruction) -> R<()> {
        let mn = i.mnemonic();
        if i.op_kind(0) != OpKind::Register {
            return Err(Exc::unhandled(format!("{mn:?}")));
        }
        let Some(d) = xidx(i.op_register(0)) else {
            return self.sse_to_gpr(i);
        };
        if matches!(
            mn,
            M::Pcmpistri
                | M::Pcmpestri
                | M::Pcmpistrm
                | M::Pcmpestrm
                | M::Pcmpestri64
                | M::Pcmpestrm64
        ) {
            let a = self.cpu.xmm[d];
            let b = self.xrd(i, 1)?;
            return self.pcmpstr(i, a, b, u32::from(i.immediate8()));
        }
        let a = self.cpu.xmm[d];
        // Shifts by immediate have only the destination and an immediate (the count).
        let (b, imm) = if i.op_count() == 2 && i.op_kind(1) == OpKind::Immediate8 {
            (u128::from(i.immediate8()), i.immediate8())
        } else if i.op_count() == 3 {
            (self.xrd(i, 1)?, i.immediate8())
        } else {
            (self.xrd(i, 1)?, 0)
        };
        // Legacy compares encode only predicates 0..7.
        let imm = if matches!(mn, M::Cmpps | M::Cmpss | M::Cmppd | M::Cmpsd) {
            imm & 7
        } else {
            imm
        };
        self.lane_exec(d, mn, a, b, imm)
    }

    /// SSE instructions whose destination is a general register.
    fn sse_to_gpr(&mut self, i: &Instruction) -> R<()> {
        let mn = i.mnemonic();
        let reg = i.op_register(0);
        let size = reg_size(reg);
        let idx = crate::exec::gpr_index(reg);
        let src = self.xrd(i, 1)?;
        let v: u64 = match mn {
            M::Cvttsd2si | M::Cvtsd2si | M::Cvttss2si | M::Cvtss2si => {
                let t = matches!(mn, M::Cvttsd2si | M::Cvttss2si);
                let width = if size == 8 { 64 } else { 32 };
                self.with_env(|e| {
                    if matches!(mn, M::Cvttsd2si | M::Cvtsd2si) {
                        e.cvt_to_int::<ssefp::S64>(t, width, src as u64)
                    } else {
                        e.cvt_to_int::<ssefp::S32>(t, width, src as u64 & 0xffff_ffff)
                    }
                })?
            }
            M::Crc32 => {
                let ssz = self.op_size(i, 1);
                let mut crc = self.rd_reg(reg) as u32;
                for k in 0..ssz {
                    crc ^= ((src >> (8 * k)) & 0xff) as u32;
                    for _ in 0..8 {
                        crc = if crc & 1 != 0 {
                            (crc >> 1) ^ 0x82f6_3b78
                        } else {
                            crc >> 1
                        };
                    }
                }
                u64::from(crc)
            }
            _ => return Err(Exc::unhandled(format!("{mn:?}"))),
        };
        self.set_gpr_sized(idx, size.max(4), v);
        Ok(())
    }

    /// PCMPISTRI/PCMPESTRI/PCMPISTRM/PCMPESTRM (SSE4.2 string compare).
    fn pcmpstr(&mut self, i: &Instruction, a: u128, b: u128, imm: u32) -> R<()> {
        use crate::cpu::{ARITH_FLAGS, CF, OF, SF, ZF};
        let mn = i.mnemonic();
        let words = imm & 1 != 0;
        let signed = imm & 2 != 0;
        let n = if words { 8 } else { 16 };
        let elem = |v: u128, k: usize| -> i32 {
            if words {
                let x = (v >> (16 * k)) as u16;
                if signed {
                    i32::from(x as i16)
                } else {
                    i32::from(x)
                }
            } else {
                let x = (v >> (8 * k)) as u8;
                if signed {
                    i32::from(x as i8)
                } else {
                    i32::from(x)
                }
            }
        };
        let explicit = matches!(
            mn,
            M::Pcmpestri | M::Pcmpestrm | M::Pcmpestri64 | M::Pcmpestrm64
        );
        let wide = matches!(mn, M::Pcmpestri64 | M::Pcmpestrm64);
        let len = |v: u128, reg: usize| -> usize {
            if explicit {
                let l = if wide {
                    self.cpu.gpr[reg] as i64
                } else {
                    i64::from(self.cpu.gpr[reg] as i32)
                };
                (l.unsigned_abs() as usize).min(n)
            } else {
                (0..n).find(|&k| elem(v, k) == 0).unwrap_or(n)
            }
        };
        let la = len(a, 0);
        let lb = len(b, 2);
        let agg = (imm >> 2) & 3;
        let mut res: u32 = 0;
        for j in 0..n {
            let bit = match agg {
                0 => (0..la).any(|k| j < lb && elem(a, k) == elem(b, j)),
                1 => (0..la / 2 * 2)
                    .step_by(2)
                    .any(|k| j < lb && elem(a, k) <= elem(b, j) && elem(b, j) <= elem(a, k + 1)),
                2 => {
                    if j >= la && j >= lb {
                        true
                    } else if j >= la || j >= lb {
                        false
                    } else {
                        elem(a, j) == elem(b, j)
                    }
                }
                _ => (0..n - j).all(|k| {
                    if k >= la {
                        true
                    } else if j + k >= lb {
                        false
                    } else {
                        elem(a, k) == elem(b, j + k)
                    }
                }),
            };
            if bit {
                res |= 1 << j;
            }
        }
        let full = if n == 16 { 0xffff } else { 0xff };
        match (imm >> 4) & 3 {
            1 => res ^= full,
            3 => res ^= ((1u32 << lb) - 1) & full,
            _ => {}
        }
        let mut f = 0;
        if res != 0 {
            f |= CF;
        }
        if lb < n {
            f |= ZF;
        }
        if la < n {
            f |= SF;
        }
        if res & 1 != 0 {
            f |= OF;
        }
        self.set_flags(ARITH_FLAGS, f);
        if matches!(mn, M::Pcmpistri | M::Pcmpestri | M::Pcmpestri64) {
            let idx = if res == 0 {
                n as u32
            } else if imm & 0x40 != 0 {
                31 - res.leading_zeros()
            } else {
                res.trailing_zeros()
            };
            self.cpu.gpr[1] = u64::from(idx);
        } else {
            let m = if imm & 0x40 != 0 {
                let mut o: u128 = 0;
                for j in 0..n {
                    if res & (1 << j) != 0 {
                        o |= if words {
                            0xffffu128 << (16 * j)
                        } else {
                            0xffu128 << (8 * j)
                        };
                    }
                }
                o
            } else {
                u128::from(res)
            };
            self.cpu.xmm[0] = m;
        }
        Ok(())
    }
}
