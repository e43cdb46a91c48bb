//! The x87 FPU: every x87 instruction at true 80-bit extended precision.
//!
//! Values are the architectural register image (sign, 15-bit exponent, 64-bit significand with
//! the explicit integer bit). Arithmetic is a small soft-float written here rather than
//! `rustc_apfloat`: the x87 needs precision control (results rounded to 24/53/64 bits while
//! keeping the 15-bit exponent range), the masked/unmasked overflow and underflow responses
//! (re-biasing by 2^±24576), the C1 "rounded up" bit, and the x87 classes apfloat has no notion
//! of (unnormals, pseudo-NaNs, pseudo-infinities, pseudo-denormals). Add, subtract, multiply,
//! divide and square root are exact before a single rounding (128-bit intermediate with a sticky
//! bit), so they agree bit for bit with the hardware; FPREM/FPREM1/FSCALE/FRNDINT/FXTRACT and all
//! conversions are exact as well.
//!
//! Transcendentals (FSIN, FCOS, FSINCOS, FPTAN, FPATAN, F2XM1, FYL2X, FYL2XP1) are computed in
//! host double precision around an exact argument split (the 64-bit significand is split into
//! two doubles; FSIN/FCOS/FPTAN reduce by pi/2 with a three-part constant, FYL2X takes the
//! binary exponent apart exactly). They are accurate to about 1 ulp of a double (relative error
//! below 2^-51), where the hardware is accurate to about 1 ulp of the 64-bit significand; the
//! differential tester compares them with that tolerance.
//!
//! Exceptions follow the SDM: IE (with SF and C1 for stack faults), DE, ZE, OE, UE, PE, the ES
//! and B summary bits; a masked exception delivers the default result, an unmasked IE/DE/ZE
//! leaves the destination (and the stack) unchanged, unmasked OE/UE deliver the result re-biased
//! by 2^∓24576 to a register (a memory destination is left unchanged). The #MF for an unmasked
//! pending exception is raised by the next waiting x87 instruction (CR0.NE=1 behaviour; with
//! CR0.NE=0 no exception is raised, as there is no FERR# line). CR0.EM or CR0.TS raise #NM
//! (WAIT only with CR0.MP and CR0.TS). FIP is the last non-control instruction's address; FOP
//! and FDP are written only by an instruction that takes an unmasked exception (as on this
//! host's Intel CPUs: FOP compatibility off, FDP_EXCPTN_ONLY); FCS/FDS are stored as 0, as on
//! CPUs that deprecate them.
//!
//! Registers are kept in ST order (`cpu.st[k]` is ST(k), the FXSAVE layout) with the abridged
//! tag word per physical register; anything that moves TOP turns the array with it.
//!
//! The corner cases the SDM leaves open were taken from the hardware through the differential
//! tester (`conformance::diff::x87`): which instructions leave C1 alone (FCOMI, FCMOVcc, FNOP),
//! C2 after FPREM faults, FXTRACT/FPTAN/FSINCOS and FLD on stack faults, DE losing to IE/ZE, an
//! unmasked DE still loading FLD, FSCALE beyond the re-bias range getting the masked response.

use iced_x86::{Instruction, MemorySize, Mnemonic as M, OpKind, Register};

use crate::exec::{Exc, Exec, R, ud};

// Status word bits.
const IE: u16 = 1;
const DE: u16 = 2;
const ZE: u16 = 4;
const OE: u16 = 8;
const UE: u16 = 0x10;
const PE: u16 = 0x20;
const SF: u16 = 0x40;
const ES: u16 = 0x80;
const C0: u16 = 0x100;
const C1: u16 = 0x200;
const C2: u16 = 0x400;
const C3: u16 = 0x4000;
const BUSY: u16 = 0x8000;
const CC: u16 = C0 | C1 | C2 | C3;

const CR0_MP: u64 = 1 << 1;
const CR0_EM: u64 = 1 << 2;
const CR0_TS: u64 = 1 << 3;
const CR0_NE: u64 = 1 << 5;

/// Rounding control values.
const RN: u8 = 0;
const RD: u8 = 1;
const RU: u8 = 2;
const RZ: u8 = 3;

/// An 80-bit register value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct F80 {
    /// Sign (bit 15) and biased exponent.
    pub se: u16,
    /// Significand with the explicit integer bit 63.
    pub m: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Zero,
    /// Denormal or pseudo-denormal (exponent 0, significand non-zero).
    Denormal,
    Normal,
    Inf,
    QNan,
    SNan,
    /// Unnormal, pseudo-NaN, pseudo-infinity.
    Unsupported,
}

impl F80 {
    pub const INDEFINITE: F80 = F80 {
        se: 0xffff,
        m: 0xc000_0000_0000_0000,
    };
    pub const ZERO: F80 = F80 { se: 0, m: 0 };
    pub const ONE: F80 = F80 {
        se: 0x3fff,
        m: 1 << 63,
    };

    pub fn from_bytes(b: &[u8; 16]) -> F80 {
        let mut m = [0u8; 8];
        m.copy_from_slice(&b[..8]);
        F80 {
            m: u64::from_le_bytes(m),
            se: u16::from_le_bytes([b[8], b[9]]),
        }
    }

    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.m.to_le_bytes());
        b[8..10].copy_from_slice(&self.se.to_le_bytes());
        b
    }

    pub fn sign(self) -> bool {
        self.se & 0x8000 != 0
    }

    fn exp(self) -> u16 {
        self.se & 0x7fff
    }

    fn inf(s: bool) -> F80 {
        F80 {
            se: 0x7fff | (u16::from(s) << 15),
            m: 1 << 63,
        }
    }

    fn zero(s: bool) -> F80 {
        F80 {
            se: u16::from(s) << 15,
            m: 0,
        }
    }

    fn neg(self) -> F80 {
        F80 {
            se: self.se ^ 0x8000,
            m: self.m,
        }
    }

    fn abs(self) -> F80 {
        F80 {
            se: self.se & 0x7fff,
            m: self.m,
        }
    }

    fn quiet(self) -> F80 {
        F80 {
            se: self.se,
            m: self.m | (1 << 62),
        }
    }

    pub fn class(self) -> Class {
        let (e, m) = (self.exp(), self.m);
        if e == 0 {
            if m == 0 { Class::Zero } else { Class::Denormal }
        } else if e == 0x7fff {
            if m >> 63 == 0 {
                Class::Unsupported
            } else if m << 1 == 0 {
                Class::Inf
            } else if m & (1 << 62) != 0 {
                Class::QNan
            } else {
                Class::SNan
            }
        } else if m >> 63 == 0 {
            Class::Unsupported
        } else {
            Class::Normal
        }
    }

    fn is_nan(self) -> bool {
        matches!(self.class(), Class::QNan | Class::SNan)
    }

    /// A finite non-zero value as (sign, exponent x, significand m) with value = m * 2^x and
    /// m normalized (bit 63 set). Zero gives m = 0.
    fn unpack(self) -> (bool, i32, u64) {
        let s = self.sign();
        let e = i32::from(self.exp());
        if self.m == 0 {
            return (s, 0, 0);
        }
        let e = if e == 0 { 1 } else { e };
        let lz = self.m.leading_zeros();
        (s, e - 16383 - 63 - lz as i32, self.m << lz)
    }

    /// Exact integer-to-extended conversion.
    fn from_i128(v: i128) -> F80 {
        if v == 0 {
            return F80::ZERO;
        }
        let s = v < 0;
        let a = v.unsigned_abs();
        let lz = a.leading_zeros();
        let sig = a << lz;
        // Exact for |v| < 2^64 (every integer the x87 loads).
        F80 {
            se: (u16::from(s) << 15) | (16383 + 127 - lz) as u16,
            m: (sig >> 64) as u64,
        }
    }
}

/// A destination format for rounding.
#[derive(Clone, Copy)]
struct Fmt {
    /// Significand bits including the integer bit.
    prec: u32,
    bias: i32,
    /// Largest biased exponent of a finite value.
    emax: i32,
}

const EXT: Fmt = Fmt {
    prec: 64,
    bias: 16383,
    emax: 0x7ffe,
};
const DBL: Fmt = Fmt {
    prec: 53,
    bias: 1023,
    emax: 0x7fe,
};
const SGL: Fmt = Fmt {
    prec: 24,
    bias: 127,
    emax: 0xfe,
};

/// A rounded value: biased exponent (0 for denormals and zero), significand of `prec`
/// bits (integer bit included); `inf` for an overflow to infinity.
#[derive(Clone, Copy, Debug)]
struct Rounded {
    be: i32,
    q: u64,
    inf: bool,
}

/// Rounding environment: control word bits and whether the destination is a register
/// (where unmasked OE/UE re-bias the result).
#[derive(Clone, Copy)]
struct Env {
    rc: u8,
    fcw: u16,
    reg: bool,
}

fn shr_jam(v: u128, n: u32) -> u128 {
    if n == 0 {
        v
    } else if n >= 128 {
        u128::from(v != 0)
    } else {
        (v >> n) | u128::from(v & ((1u128 << n) - 1) != 0)
    }
}

/// Drops `drop` (1..=127) low bits of `sig` with rounding: (kept, inexact, incremented).
fn round_bits(sig: u128, drop: u32, s: bool, rc: u8) -> (u128, bool, bool) {
    let q = sig >> drop;
    let rem = sig & ((1u128 << drop) - 1);
    let half = 1u128 << (drop - 1);
    let inc = match rc {
        RN => rem > half || (rem == half && q & 1 == 1),
        RD => s && rem != 0,
        RU => !s && rem != 0,
        _ => false,
    };
    (q + u128::from(inc), rem != 0, inc)
}

/// Rounds value = sig * 2^x (sig != 0) to `f`. Returns None when an unmasked overflow or
/// underflow leaves a memory destination unchanged. Sets exception bits and C1 in `fl`.
fn round(s: bool, sig: u128, x: i32, f: Fmt, env: Env, fl: &mut u16) -> Option<Rounded> {
    let lz = sig.leading_zeros();
    let sig = sig << lz;
    let mut be = x - lz as i32 + 127 + f.bias;
    let drop = 128 - f.prec;
    let um = env.fcw & UE == 0;
    let om = env.fcw & OE == 0;
    if be < 1 {
        // Tininess after rounding with an unbounded exponent.
        let (q, _, _) = round_bits(sig, drop, s, env.rc);
        let tiny = !(be == 0 && q >> f.prec != 0);
        // Unmasked underflow re-biases by 2^24576 when that brings the value into range
        // (FSCALE can go beyond; it then gets the masked response, like the hardware).
        let wrap = tiny && um && be + 24576 >= 1;
        if wrap {
            if !env.reg {
                *fl |= UE;
                return None;
            }
            *fl |= UE;
            be += 24576;
        } else if tiny && um && env.reg {
            // Unmasked, beyond the re-bias range (FSCALE): a zero, C1 clear (as the hardware).
            *fl |= UE | PE;
            return Some(Rounded {
                be: 0,
                q: 0,
                inf: false,
            });
        } else if tiny {
            let d = shr_jam(sig, (1 - be) as u32);
            let (q, inexact, inc) = round_bits(d, drop, s, env.rc);
            if inexact {
                *fl |= PE | UE;
            }
            if inc {
                *fl |= C1;
            }
            let be = if q >> (f.prec - 1) != 0 { 1 } else { 0 };
            return Some(Rounded {
                be,
                q: q as u64,
                inf: false,
            });
        }
    }
    let (mut q, inexact, inc) = round_bits(sig, drop, s, env.rc);
    if q >> f.prec != 0 {
        q >>= 1;
        be += 1;
    }
    if be > f.emax {
        if om && (!env.reg || be - 24576 <= f.emax) {
            *fl |= OE;
            if !env.reg {
                return None;
            }
            be -= 24576;
        } else {
            *fl |= OE | PE;
            // Masked: infinity or the largest finite value per RC. Unmasked but beyond the
            // re-bias range (FSCALE): infinity whatever RC (as the hardware).
            let to_inf = om
                || match env.rc {
                    RN => true,
                    RD => s,
                    RU => !s,
                    _ => false,
                };
            if to_inf {
                *fl |= C1;
            }
            return Some(Rounded {
                be: f.emax,
                q: (1u64 << (f.prec - 1)) | ((1u64 << (f.prec - 1)) - 1),
                inf: to_inf,
            });
        }
    }
    if inexact {
        *fl |= PE;
    }
    if inc {
        *fl |= C1;
    }
    Some(Rounded {
        be,
        q: q as u64,
        inf: false,
    })
}

/// Rounds to the extended register format at precision `prec`.
fn round80(s: bool, sig: u128, x: i32, prec: u32, env: Env, fl: &mut u16) -> F80 {
    if sig == 0 {
        return F80::zero(s);
    }
    let f = Fmt { prec, ..EXT };
    match round(s, sig, x, f, env, fl) {
        Some(r) => F80 {
            m: if r.inf { 1 << 63 } else { r.q << (64 - prec) },
            se: if r.inf {
                0x7fff | (u16::from(s) << 15)
            } else {
                (u16::from(s) << 15) | (r.be as u16 & 0x7fff)
            },
        },
        None => F80::INDEFINITE,
    }
}

/// Precision control: significand bits for FADD/FSUB/FMUL/FDIV/FSQRT.
fn pc_bits(fcw: u16) -> u32 {
    match (fcw >> 8) & 3 {
        0 => 24,
        2 => 53,
        _ => 64,
    }
}

/// The NaN result of an operation with NaN operands (SDM table 4-7, x87 column).
fn nan_result(a: F80, b: F80) -> F80 {
    match (a.is_nan(), b.is_nan()) {
        (true, false) => a.quiet(),
        (false, _) => b.quiet(),
        (true, true) => {
            let (qa, qb) = (a.class() == Class::QNan, b.class() == Class::QNan);
            if qa != qb {
                return if qa { a } else { b };
            }
            let (ma, mb) = (a.m | (1 << 62), b.m | (1 << 62));
            if ma > mb {
                a.quiet()
            } else if mb > ma {
                b.quiet()
            } else if a.se <= b.se {
                a.quiet()
            } else {
                b.quiet()
            }
        }
    }
}

/// Checks operands for invalid/NaN/denormal: Some(result) ends the operation.
fn check2(a: F80, b: F80, fl: &mut u16) -> Option<F80> {
    let (ca, cb) = (a.class(), b.class());
    if ca == Class::Unsupported || cb == Class::Unsupported {
        *fl |= IE;
        return Some(F80::INDEFINITE);
    }
    if a.is_nan() || b.is_nan() {
        if ca == Class::SNan || cb == Class::SNan {
            *fl |= IE;
        }
        return Some(nan_result(a, b));
    }
    if ca == Class::Denormal || cb == Class::Denormal {
        *fl |= DE;
    }
    None
}

fn check1(a: F80, fl: &mut u16) -> Option<F80> {
    match a.class() {
        Class::Unsupported => {
            *fl |= IE;
            Some(F80::INDEFINITE)
        }
        Class::SNan => {
            *fl |= IE;
            Some(a.quiet())
        }
        Class::QNan => Some(a),
        Class::Denormal => {
            *fl |= DE;
            None
        }
        _ => None,
    }
}

fn fadd(a: F80, b: F80, env: Env, prec: u32, fl: &mut u16) -> F80 {
    if let Some(r) = check2(a, b, fl) {
        return r;
    }
    let (ca, cb) = (a.class(), b.class());
    if ca == Class::Inf || cb == Class::Inf {
        if ca == Class::Inf && cb == Class::Inf && a.sign() != b.sign() {
            *fl |= IE;
            return F80::INDEFINITE;
        }
        return if ca == Class::Inf { a } else { b };
    }
    let (sa, xa, ma) = a.unpack();
    let (sb, xb, mb) = b.unpack();
    if ma == 0 && mb == 0 {
        return if sa == sb {
            F80::zero(sa)
        } else {
            F80::zero(env.rc == RD)
        };
    }
    if ma == 0 {
        return round80(sb, u128::from(mb), xb, prec, env, fl);
    }
    if mb == 0 {
        return round80(sa, u128::from(ma), xa, prec, env, fl);
    }
    let (mut sa, mut xa, mut ma, mut sb, mut xb, mut mb) = (sa, xa, ma, sb, xb, mb);
    if xb > xa {
        std::mem::swap(&mut sa, &mut sb);
        std::mem::swap(&mut xa, &mut xb);
        std::mem::swap(&mut ma, &mut mb);
    }
    let big = u128::from(ma) << 62;
    let small = shr_jam(u128::from(mb) << 62, (xa - xb).min(200) as u32);
    let x = xa - 62;
    if sa == sb {
        round80(sa, big + small, x, prec, env, fl)
    } else if big > small {
        round80(sa, big - small, x, prec, env, fl)
    } else if small > big {
        round80(sb, small - big, x, prec, env, fl)
    } else {
        F80::zero(env.rc == RD)
    }
}

fn fmul(a: F80, b: F80, env: Env, prec: u32, fl: &mut u16) -> F80 {
    if let Some(r) = check2(a, b, fl) {
        return r;
    }
    let s = a.sign() != b.sign();
    let (ca, cb) = (a.class(), b.class());
    if ca == Class::Inf || cb == Class::Inf {
        if ca == Class::Zero || cb == Class::Zero {
            *fl |= IE;
            return F80::INDEFINITE;
        }
        return F80::inf(s);
    }
    let (_, xa, ma) = a.unpack();
    let (_, xb, mb) = b.unpack();
    if ma == 0 || mb == 0 {
        return F80::zero(s);
    }
    round80(s, u128::from(ma) * u128::from(mb), xa + xb, prec, env, fl)
}

fn fdiv(a: F80, b: F80, env: Env, prec: u32, fl: &mut u16) -> F80 {
    if let Some(r) = check2(a, b, fl) {
        return r;
    }
    let s = a.sign() != b.sign();
    let (ca, cb) = (a.class(), b.class());
    match (ca, cb) {
        (Class::Inf, Class::Inf) | (Class::Zero, Class::Zero) => {
            *fl |= IE;
            return F80::INDEFINITE;
        }
        (Class::Inf, _) => return F80::inf(s),
        (_, Class::Inf) | (Class::Zero, _) => return F80::zero(s),
        (_, Class::Zero) => {
            *fl |= ZE;
            return F80::inf(s);
        }
        _ => {}
    }
    let (_, xa, ma) = a.unpack();
    let (_, xb, mb) = b.unpack();
    let n = u128::from(ma) << 63;
    let q1 = n / u128::from(mb);
    let r1 = n % u128::from(mb);
    let n2 = r1 << 64;
    let q2 = n2 / u128::from(mb);
    let r2 = n2 % u128::from(mb);
    let q = (q1 << 64) | q2 | u128::from(r2 != 0);
    round80(s, q, xa - xb - 127, prec, env, fl)
}

fn fsqrt(a: F80, env: Env, prec: u32, fl: &mut u16) -> F80 {
    if let Some(r) = check1(a, fl) {
        return r;
    }
    match a.class() {
        Class::Zero => return a,
        Class::Inf if !a.sign() => return a,
        _ if a.sign() => {
            *fl |= IE;
            return F80::INDEFINITE;
        }
        _ => {}
    }
    let (_, mut x, m) = a.unpack();
    let mut rad = u128::from(m);
    if x & 1 != 0 {
        rad <<= 1;
        x -= 1;
    }
    // Root of rad * 4^k with k = 36 appended zero pairs: about 69 result bits.
    let k: u32 = 36;
    let pairs = 33 + k;
    let (mut rem, mut root) = (0u128, 0u128);
    for pair in (0..pairs).rev() {
        let two = if pair >= k {
            (rad >> (2 * (pair - k))) & 3
        } else {
            0
        };
        rem = (rem << 2) | two;
        let trial = (root << 2) | 1;
        root <<= 1;
        if rem >= trial {
            rem -= trial;
            root |= 1;
        }
    }
    let sig = (root << 1) | u128::from(rem != 0);
    round80(false, sig, (x - 2 * k as i32) / 2 - 1, prec, env, fl)
}

/// Rounds a finite value to an integer (as extended) per `rc`: FRNDINT.
fn frndint(a: F80, env: Env, fl: &mut u16) -> F80 {
    if let Some(r) = check1(a, fl) {
        return r;
    }
    if matches!(a.class(), Class::Zero | Class::Inf) {
        return a;
    }
    let (s, x, m) = a.unpack();
    if x >= 0 {
        return a;
    }
    let (q, inexact, inc) = round_int(s, m, x, env.rc);
    if inexact {
        *fl |= PE;
    }
    if inc {
        *fl |= C1;
    }
    if q == 0 {
        return F80::zero(s);
    }
    let v = F80::from_i128(q as i128);
    if s { v.neg() } else { v }
}

/// |m * 2^x| rounded to an integer (x < 0 or small): (magnitude, inexact, rounded up).
fn round_int(s: bool, m: u64, x: i32, rc: u8) -> (u128, bool, bool) {
    if x >= 0 {
        if x >= 64 {
            return (u128::MAX, false, false);
        }
        return (u128::from(m) << x, false, false);
    }
    let d = (-x) as u32;
    if d > 64 {
        // |value| < 0.5.
        let inc = match rc {
            RD => s,
            RU => !s,
            _ => false,
        };
        return (u128::from(inc), true, inc);
    }
    let sig = u128::from(m) << 1;
    let (q, inexact, inc) = round_bits(sig, d + 1, s, rc);
    (q, inexact, inc)
}

/// Converts to a signed integer of `bits` with the x87 integer indefinite on overflow/invalid.
fn to_int(a: F80, bits: u32, rc: u8, fl: &mut u16) -> u64 {
    let indefinite = 1u64 << (bits - 1);
    match a.class() {
        Class::Zero => return 0,
        Class::Normal | Class::Denormal => {}
        _ => {
            *fl |= IE;
            return indefinite;
        }
    }
    let (s, x, m) = a.unpack();
    let (q, inexact, inc) = round_int(s, m, x, rc);
    let limit = 1u128 << (bits - 1);
    if (!s && q >= limit) || (s && q > limit) {
        *fl |= IE;
        // The denormal flag stands; PE does not.
        return indefinite;
    }
    if inexact {
        *fl |= PE;
    }
    if inc {
        *fl |= C1;
    }
    let v = if s {
        (q as i128).wrapping_neg()
    } else {
        q as i128
    };
    (v as u64) & (u64::MAX >> (64 - bits))
}

/// Loads a single or double exactly; a denormal source sets DE in `fl`.
fn from_ieee(bits: u64, f: Fmt, fl: &mut u16) -> F80 {
    let fb = f.prec - 1;
    let width = if f.prec == 24 { 32 } else { 64 };
    let s = (bits >> (width - 1)) & 1 == 1;
    let e = ((bits >> fb) & (f.emax as u64 + 1)) as i32;
    let frac = bits & ((1u64 << fb) - 1);
    let sgn = u16::from(s) << 15;
    if e == f.emax + 1 {
        if frac == 0 {
            return F80::inf(s);
        }
        let m = (1u64 << 63) | (frac << (64 - f.prec));
        // An SNaN stays signaling: FLD quiets it (IE), arithmetic propagates it.
        return F80 {
            se: sgn | 0x7fff,
            m,
        };
    }
    if e == 0 {
        if frac == 0 {
            return F80::zero(s);
        }
        *fl |= DE;
        let lz = frac.leading_zeros();
        let m = frac << lz;
        // value = frac * 2^(1 - bias - fb)
        let x = 1 - f.bias - fb as i32 - lz as i32;
        return F80 {
            se: sgn | (x + 63 + 16383) as u16,
            m,
        };
    }
    F80 {
        se: sgn | (e - f.bias + 16383) as u16,
        m: (1u64 << 63) | (frac << (64 - f.prec)),
    }
}

/// Stores to single/double: None when an unmasked exception leaves memory unchanged.
fn to_ieee(a: F80, f: Fmt, env: Env, fl: &mut u16) -> Option<u64> {
    let fb = f.prec - 1;
    let width = if f.prec == 24 { 32 } else { 64 };
    let sbit = |s: bool| u64::from(s) << (width - 1);
    let expf = |e: u64| e << fb;
    match a.class() {
        Class::Unsupported => {
            *fl |= IE;
            return Some(sbit(true) | expf(f.emax as u64 + 1) | (1u64 << (fb - 1)));
        }
        Class::SNan | Class::QNan => {
            if a.class() == Class::SNan {
                *fl |= IE;
            }
            let frac = ((a.m << 1) >> (65 - f.prec)) | (1u64 << (fb - 1));
            return Some(sbit(a.sign()) | expf(f.emax as u64 + 1) | frac);
        }
        Class::Inf => return Some(sbit(a.sign()) | expf(f.emax as u64 + 1)),
        Class::Zero => return Some(sbit(a.sign())),
        Class::Denormal => {
            // The x87 does not signal DE for FST: the value just underflows.
        }
        Class::Normal => {}
    }
    let (s, x, m) = a.unpack();
    let r = round(s, u128::from(m), x, f, env, fl)?;
    if r.inf {
        return Some(sbit(s) | expf(f.emax as u64 + 1));
    }
    Some(sbit(s) | expf(r.be as u64) | (r.q & ((1u64 << fb) - 1)))
}

/// Compares: None for unordered. Sets IE for SNaN/unsupported (any NaN unless `quiet`), DE.
fn fcmp(a: F80, b: F80, quiet: bool, fl: &mut u16) -> Option<std::cmp::Ordering> {
    use std::cmp::Ordering;
    let (ca, cb) = (a.class(), b.class());
    if ca == Class::Unsupported || cb == Class::Unsupported {
        *fl |= IE;
        return None;
    }
    if a.is_nan() || b.is_nan() {
        if !quiet || ca == Class::SNan || cb == Class::SNan {
            *fl |= IE;
        }
        return None;
    }
    if ca == Class::Denormal || cb == Class::Denormal {
        *fl |= DE;
    }
    let key = |v: F80| -> (i8, i32, u64) {
        match v.class() {
            Class::Zero => (0, 0, 0),
            Class::Inf => (if v.sign() { -2 } else { 2 }, 0, 0),
            _ => {
                let (s, x, m) = v.unpack();
                (if s { -1 } else { 1 }, x, m)
            }
        }
    };
    let (ka, kb) = (key(a), key(b));
    Some(match ka.0.cmp(&kb.0) {
        Ordering::Equal if ka.0 == 1 => (ka.1, ka.2).cmp(&(kb.1, kb.2)),
        Ordering::Equal if ka.0 == -1 => (kb.1, kb.2).cmp(&(ka.1, ka.2)),
        o => o,
    })
}

/// FPREM (`ieee` false) / FPREM1: (result, quotient low bits, incomplete).
fn fprem(a: F80, b: F80, ieee: bool, fcw: u16, fl: &mut u16) -> (F80, u64, bool) {
    if let Some(r) = check2(a, b, fl) {
        return (r, 0, false);
    }
    let (ca, cb) = (a.class(), b.class());
    if ca == Class::Inf || cb == Class::Zero {
        *fl |= IE;
        return (F80::INDEFINITE, 0, false);
    }
    if cb == Class::Inf || ca == Class::Zero {
        return (canon(a), 0, false);
    }
    let (s, xa, ma) = a.unpack();
    let (_, xb, mb) = b.unpack();
    let d = xa - xb;
    // The remainder is exact; only a tiny result with UE unmasked signals (re-biased).
    let env = Env {
        rc: RN,
        fcw,
        reg: true,
    };
    if d >= 64 {
        let n = ((d & 31) | 32) as u32;
        let r = (u128::from(ma) << n) % u128::from(mb);
        let v = if r == 0 {
            F80::zero(s)
        } else {
            round80(s, r, xa - n as i32, 64, env, fl)
        };
        return (v, 0, true);
    }
    let (mut q, mut r, mut rs, xr) = if d >= 0 {
        let n = u128::from(ma) << d;
        (n / u128::from(mb), n % u128::from(mb), s, xb)
    } else {
        (0u128, u128::from(ma), s, xa)
    };
    if ieee {
        // r is at scale 2^xr; b = mb * 2^xb. Compare 2r with b.
        let (r2, bb) = if d >= 0 {
            (r << 1, u128::from(mb))
        } else if d == -1 {
            (r, u128::from(mb))
        } else {
            (0, 1)
        };
        if r2 > bb || (r2 == bb && q & 1 == 1) {
            q += 1;
            if d >= 0 {
                r = u128::from(mb) - r;
            } else {
                // d == -1: r' = b - a = (2 mb - ma) * 2^xa.
                r = (u128::from(mb) << 1) - r;
            }
            rs = !rs;
        }
    }
    let v = if r == 0 {
        F80::zero(s)
    } else {
        round80(rs, r, xr, 64, env, fl)
    };
    (v, q as u64, false)
}

/// The five constants with 128 bits of significand and the unbiased exponent of bit 127.
const K_PI: (u128, i32) = (0xc90f_daa2_2168_c234_c4c6_628b_80dc_1cd1, 1);
const K_L2E: (u128, i32) = (0xb8aa_3b29_5c17_f0bb_be87_fed0_691d_3e88, 0);
const K_L2T: (u128, i32) = (0xd49a_784b_cd1b_8afe_492b_f6ff_4daf_db4c, 1);
const K_LG2: (u128, i32) = (0x9a20_9a84_fbcf_f798_8f89_59ac_0b7c_9178, -2);
const K_LN2: (u128, i32) = (0xb172_17f7_d1cf_79ab_c9e3_b398_03f2_f6af, -1);

/// A constant rounded per RC (no exception flags).
fn constant(k: (u128, i32), rc: u8) -> F80 {
    let (q, _, _) = round_bits(k.0, 64, false, rc);
    // None of the constants rounds up to the next binade.
    F80 {
        se: (k.1 + 16383) as u16,
        m: q as u64,
    }
}

/// The value as a double pair (hi + lo exact), for finite values in double range.
fn to_dd(a: F80) -> (f64, f64) {
    let (s, x, m) = a.unpack();
    if m == 0 {
        return (if s { -0.0 } else { 0.0 }, 0.0);
    }
    let hi_m = m & !0x7ff;
    let lo_m = m & 0x7ff;
    let sc = 2f64.powi(x.clamp(-1100, 1100));
    let sgn = if s { -1.0 } else { 1.0 };
    (sgn * (hi_m as f64) * sc, sgn * (lo_m as f64) * sc)
}

/// A double back to extended (exact).
fn from_f64(v: f64) -> F80 {
    let mut fl = 0;
    from_ieee(v.to_bits(), DBL, &mut fl)
}

/// Rounds a double result to the register (64-bit precision, RC), setting PE when `inexact`.
fn from_f64_inexact(v: f64, fl: &mut u16) -> F80 {
    let r = from_f64(v);
    if v != 0.0 && v.is_finite() {
        *fl |= PE;
    }
    r
}

fn f64_of(a: F80) -> f64 {
    let (h, l) = to_dd(a);
    h + l
}

/// sin/cos of an extended finite value with |x| < 2^63: reduction by pi/2 in double-double.
fn sincos(a: F80) -> (f64, f64) {
    let (xh, xl) = to_dd(a);
    const P1: f64 = std::f64::consts::FRAC_PI_2;
    const P2: f64 = 6.123_233_995_736_766e-17;
    const P3: f64 = -1.497_384_904_859_169_8e-33;
    let k = ((xh + xl) * std::f64::consts::FRAC_2_PI).round();
    // One rounding for x - k*P1 (a fused multiply-add), then the small corrections.
    let r = (-k).mul_add(P1, xh) + xl - k * P2 - k * P3;
    let (s, c) = r.sin_cos();
    match (k as i64).rem_euclid(4) {
        0 => (s, c),
        1 => (c, -s),
        2 => (-s, -c),
        _ => (-c, s),
    }
}

fn tag_class(v: F80) -> u16 {
    match v.class() {
        Class::Zero => 1,
        Class::Normal => 0,
        _ => 2,
    }
}

/// Mnemonics this module executes.
pub fn is_x87(m: M) -> bool {
    matches!(
        m,
        M::F2xm1
            | M::Fabs
            | M::Fadd
            | M::Faddp
            | M::Fbld
            | M::Fbstp
            | M::Fchs
            | M::Fcmovb
            | M::Fcmovbe
            | M::Fcmove
            | M::Fcmovnb
            | M::Fcmovnbe
            | M::Fcmovne
            | M::Fcmovnu
            | M::Fcmovu
            | M::Fcom
            | M::Fcomi
            | M::Fcomip
            | M::Fcomp
            | M::Fcompp
            | M::Fcos
            | M::Fdecstp
            | M::Fdiv
            | M::Fdivp
            | M::Fdivr
            | M::Fdivrp
            | M::Ffree
            | M::Ffreep
            | M::Fiadd
            | M::Ficom
            | M::Ficomp
            | M::Fidiv
            | M::Fidivr
            | M::Fild
            | M::Fimul
            | M::Fincstp
            | M::Fist
            | M::Fistp
            | M::Fisttp
            | M::Fisub
            | M::Fisubr
            | M::Fld
            | M::Fld1
            | M::Fldcw
            | M::Fldenv
            | M::Fldl2e
            | M::Fldl2t
            | M::Fldlg2
            | M::Fldln2
            | M::Fldpi
            | M::Fldz
            | M::Fmul
            | M::Fmulp
            | M::Fnclex
            | M::Fndisi
            | M::Fneni
            | M::Fninit
            | M::Fnop
            | M::Fnsave
            | M::Fnsetpm
            | M::Fnstcw
            | M::Fnstenv
            | M::Fnstsw
            | M::Fpatan
            | M::Fprem
            | M::Fprem1
            | M::Fptan
            | M::Frndint
            | M::Frstor
            | M::Fscale
            | M::Fsin
            | M::Fsincos
            | M::Fsqrt
            | M::Fst
            | M::Fstp
            | M::Fsub
            | M::Fsubp
            | M::Fsubr
            | M::Fsubrp
            | M::Ftst
            | M::Fucom
            | M::Fucomi
            | M::Fucomip
            | M::Fucomp
            | M::Fucompp
            | M::Fxam
            | M::Fxch
            | M::Fxtract
            | M::Fyl2x
            | M::Fyl2xp1
            | M::Wait
    )
}

/// ST(i) index of an FPU register operand.
fn sti(r: Register) -> usize {
    (r as usize).wrapping_sub(Register::ST0 as usize) & 7
}

/// Where an arithmetic operand comes from.
#[derive(Clone, Copy)]
enum Src {
    St(usize),
    Val(F80),
}

impl Exec<'_> {
    fn top(&self) -> u16 {
        (self.cpu.fsw >> 11) & 7
    }

    fn phys(&self, k: usize) -> usize {
        (usize::from(self.top()) + k) & 7
    }

    fn empty(&self, k: usize) -> bool {
        self.cpu.ftw & (1 << self.phys(k)) == 0
    }

    fn get(&self, k: usize) -> F80 {
        F80::from_bytes(&self.cpu.st[k & 7])
    }

    fn set(&mut self, k: usize, v: F80) {
        self.cpu.st[k & 7] = v.to_bytes();
        self.cpu.ftw |= 1 << self.phys(k);
    }

    fn set_top(&mut self, top: u16) {
        self.cpu.fsw = (self.cpu.fsw & !(7 << 11)) | ((top & 7) << 11);
    }

    /// Pops: marks ST0 empty and increments TOP.
    fn fpop(&mut self) {
        let p = self.phys(0);
        self.cpu.ftw &= !(1 << p);
        self.cpu.st.rotate_left(1);
        self.set_top(self.top() + 1);
    }

    /// Decrements TOP (the old ST7 becomes ST0).
    fn dec_top(&mut self) {
        self.cpu.st.rotate_right(1);
        self.set_top(self.top().wrapping_sub(1));
    }

    fn im_masked(&self) -> bool {
        self.cpu.fcw & IE != 0
    }

    /// Pushes `v`; on stack overflow sets IE|SF|C1 and pushes the indefinite when IE is masked.
    fn fpush(&mut self, v: F80, fl: &mut u16) {
        if !self.empty(7) {
            *fl |= IE | SF | C1;
            if !self.im_masked() {
                return;
            }
            self.dec_top();
            self.set(0, F80::INDEFINITE);
            return;
        }
        self.dec_top();
        self.set(0, v);
    }

    fn env(&self, reg: bool) -> Env {
        Env {
            rc: ((self.cpu.fcw >> 10) & 3) as u8,
            fcw: self.cpu.fcw,
            reg,
        }
    }

    /// Whether `fl` holds an exception whose mask is clear among IE/DE/ZE (those block the
    /// result).
    fn blocks(&self, fl: u16) -> bool {
        let fl = if fl & (IE | ZE) != 0 { fl & !DE } else { fl };
        fl & (IE | DE | ZE) & !self.cpu.fcw != 0
    }

    /// Merges exception bits and C1 (cleared unless set in `fl`), recomputes ES/B.
    fn finish(&mut self, fl: u16) {
        // An invalid operation or a division by zero takes precedence over the denormal
        // operand exception.
        let fl = if fl & (IE | ZE) != 0 { fl & !DE } else { fl };
        // A blocked operation (unmasked IE/DE/ZE) produced no result: no OE/UE/PE, and C1
        // only for a stack fault.
        let fl = if fl & (IE | DE | ZE) & !self.cpu.fcw != 0 {
            (fl & (IE | DE | ZE | SF)) | if fl & SF != 0 { fl & C1 } else { 0 }
        } else {
            fl
        };
        self.cpu.fsw = (self.cpu.fsw & !C1) | (fl & (0x7f | C1));
        self.summary();
    }

    fn summary(&mut self) {
        if self.cpu.fsw & !self.cpu.fcw & 0x3f != 0 {
            self.cpu.fsw |= ES | BUSY;
        } else {
            self.cpu.fsw &= !(ES | BUSY);
        }
    }

    fn set_cc(&mut self, c: u16) {
        self.cpu.fsw = (self.cpu.fsw & !CC) | (c & CC);
    }

    fn read80(&mut self, a: u64) -> R<F80> {
        let m = self.read_lin(a, 8)?;
        let se = self.read_lin(a.wrapping_add(8), 2)? as u16;
        Ok(F80 { se, m })
    }

    /// Stores an 80-bit value as the CPU does: the significand's 8 bytes, then the sign and
    /// exponent. Not atomic: when only the last 2 bytes reach into a faulting page, the 8 are
    /// already written (as on this Intel host; the x87 differential tester checks it).
    fn write80(&mut self, a: u64, v: F80) -> R<()> {
        self.write_lin(a, 8, v.m)?;
        self.write_lin(a.wrapping_add(8), 2, u64::from(v.se))
    }

    /// Reads a memory operand as an extended value (with load exceptions into `fl`).
    fn load_mem(&mut self, i: &Instruction, fl: &mut u16) -> R<F80> {
        let a = self.mem_lin(i)?;
        Ok(match i.memory_size() {
            MemorySize::Float32 => from_ieee(self.read_lin(a, 4)?, SGL, fl),
            MemorySize::Float64 => from_ieee(self.read_lin(a, 8)?, DBL, fl),
            MemorySize::Float80 => self.read80(a)?,
            MemorySize::Int16 => F80::from_i128(i128::from(self.read_lin(a, 2)? as i16)),
            MemorySize::Int32 => F80::from_i128(i128::from(self.read_lin(a, 4)? as i32)),
            MemorySize::Int64 => F80::from_i128(i128::from(self.read_lin(a, 8)? as i64)),
            MemorySize::Bcd => {
                let lo = self.read_lin(a, 8)?;
                let hi = self.read_lin(a.wrapping_add(8), 2)?;
                let mut v: i128 = 0;
                for k in (0..18).rev() {
                    let byte = if k / 2 < 8 {
                        (lo >> (8 * (k / 2))) & 0xff
                    } else {
                        hi & 0xff
                    };
                    let d = (byte >> (4 * (k % 2))) & 0xf;
                    v = v * 10 + i128::from(d as u8);
                }
                let f = F80::from_i128(v);
                if hi & 0x8000 != 0 { f.neg() } else { f }
            }
            _ => return Err(Exc::unhandled("x87 memory operand size")),
        })
    }

    /// Records FIP for a non-control instruction.
    fn note_ip(&mut self, i: &Instruction) {
        self.cpu.fip = i.ip();
    }

    /// FDP as on CPUs with CPUID.7.EBX[6] (FDP_EXCPTN_ONLY, this host's class): updated only
    /// by an instruction with a memory operand that raised an unmasked exception.
    /// FOP likewise (the last instruction with an unmasked exception): the low 3 bits of the
    /// D8..DF opcode byte and the ModRM byte, read back from the code.
    fn note_dp(&mut self, i: &Instruction, fsw_before: u16) {
        let new = self.cpu.fsw & !fsw_before & !self.cpu.fcw & 0x3f;
        if new == 0 {
            return;
        }
        if (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Memory) {
            self.cpu.fdp = self.ea(i);
        }
        let at = self.seg_lin(Register::CS, i.ip());
        let mut k = 0u64;
        while k < 14 {
            let Ok(b) = self.read_lin(at.wrapping_add(k), 1) else {
                return;
            };
            let prefix = matches!(
                b,
                0x66 | 0x67 | 0xf2 | 0xf3 | 0x2e | 0x36 | 0x3e | 0x26 | 0x64 | 0x65 | 0xf0 | 0x9b
            ) || (self.cpu.mode64() && (0x40..0x50).contains(&b));
            if !prefix {
                let Ok(modrm) = self.read_lin(at.wrapping_add(k + 1), 1) else {
                    return;
                };
                self.cpu.fop = (((b & 7) << 8) | modrm) as u16;
                return;
            }
            k += 1;
        }
    }

    /// Instructions that do not check for pending unmasked exceptions.
    fn no_wait(mn: M) -> bool {
        matches!(
            mn,
            M::Fninit
                | M::Fnclex
                | M::Fnstsw
                | M::Fnstcw
                | M::Fnstenv
                | M::Fnsave
                | M::Fneni
                | M::Fndisi
                | M::Fnsetpm
        )
    }

    fn control(mn: M) -> bool {
        Self::no_wait(mn) || matches!(mn, M::Fldcw | M::Fldenv | M::Frstor | M::Wait)
    }

    pub fn exec_x87(&mut self, i: &Instruction) -> R<()> {
        use hv::cpu_model::Feature;
        let mn = i.mnemonic();
        if !self.has(Feature::Fpu) {
            return ud();
        }
        let cr0 = self.cpu.cr0;
        if mn == M::Wait {
            if cr0 & (CR0_MP | CR0_TS) == CR0_MP | CR0_TS {
                return Err(Exc::Fault(7, None));
            }
        } else if cr0 & (CR0_EM | CR0_TS) != 0 {
            return Err(Exc::Fault(7, None));
        }
        if mn == M::Fisttp && !self.has(Feature::Sse3) {
            return ud();
        }
        if !Self::no_wait(mn) && self.cpu.fsw & ES != 0 && cr0 & CR0_NE != 0 {
            return Err(Exc::Fault(16, None));
        }
        if Self::control(mn) {
            return self.exec_x87_control(i);
        }
        // FIP names the last non-control instruction that completed: one that faults (a #PF
        // on its memory operand, say) leaves it as it was, as the CPU does.
        let fip = self.cpu.fip;
        self.note_ip(i);
        let before = self.cpu.fsw;
        if let Err(e) = self.exec_x87_op(i) {
            self.cpu.fip = fip;
            return Err(e);
        }
        self.note_dp(i, before);
        Ok(())
    }

    fn exec_x87_control(&mut self, i: &Instruction) -> R<()> {
        self.exec_x87_op(i)
    }

    fn exec_x87_op(&mut self, i: &Instruction) -> R<()> {
        let mn = i.mnemonic();
        let mut fl: u16 = 0;
        match mn {
            // FNOP changes nothing (C1 included), but it is a non-control instruction (FIP).
            M::Wait | M::Fnop | M::Fneni | M::Fndisi | M::Fnsetpm => Ok(()),
            M::Fninit => {
                self.reinit();
                Ok(())
            }
            M::Fnclex => {
                self.cpu.fsw &= 0x7f00;
                Ok(())
            }
            M::Fnstsw => {
                let v = u64::from(self.cpu.fsw);
                self.wr(i, 0, v)
            }
            M::Fnstcw => {
                let v = u64::from(self.cpu.fcw);
                self.wr(i, 0, v)
            }
            M::Fldcw => {
                let v = self.rd(i, 0)? as u16;
                self.cpu.fcw = v | 0x40;
                self.summary();
                Ok(())
            }
            M::Fnstenv | M::Fldenv | M::Fnsave | M::Frstor => self.env_op(i),
            M::Ffree | M::Ffreep => {
                let k = sti(i.op_register(0));
                let p = self.phys(k);
                self.cpu.ftw &= !(1 << p);
                if mn == M::Ffreep {
                    self.fpop();
                }
                self.cpu.fsw &= !C1;
                Ok(())
            }
            M::Fincstp | M::Fdecstp => {
                if mn == M::Fincstp {
                    self.cpu.st.rotate_left(1);
                    self.set_top(self.top() + 1);
                } else {
                    self.dec_top();
                }
                self.cpu.fsw &= !C1;
                Ok(())
            }
            M::Fld | M::Fild | M::Fbld => {
                let v = if i.op_kind(0) == OpKind::Memory || i.op_count() > 1 {
                    let n = i.op_count() - 1;
                    if i.op_kind(n) == OpKind::Memory {
                        let v = self.load_mem(i, &mut fl)?;
                        if v.class() == Class::SNan
                            && matches!(i.memory_size(), MemorySize::Float32 | MemorySize::Float64)
                        {
                            fl |= IE;
                            v.quiet()
                        } else {
                            v
                        }
                    } else {
                        self.reg_src(i.op_register(n), &mut fl)
                    }
                } else {
                    self.reg_src(i.op_register(0), &mut fl)
                };
                if fl & SF != 0 {
                    // Source underflow: the indefinite is pushed (IE masked), C1 stays 0 even
                    // when the push overflows too.
                    if !self.im_masked() {
                        self.finish(fl);
                        return Ok(());
                    }
                    let mut f2 = 0;
                    self.fpush(v, &mut f2);
                    self.finish(fl | (f2 & !C1));
                    return Ok(());
                }
                if !self.empty(7) {
                    // Stack overflow: the source's own exceptions are not reported.
                    fl = 0;
                } else if self.blocks(fl & !DE) {
                    // An unmasked DE still loads (only an SNaN's IE blocks the load).
                    self.finish(fl);
                    return Ok(());
                }
                self.fpush(v, &mut fl);
                self.finish(fl);
                Ok(())
            }
            M::Fld1 | M::Fldz | M::Fldpi | M::Fldl2e | M::Fldl2t | M::Fldlg2 | M::Fldln2 => {
                let rc = self.env(true).rc;
                let v = match mn {
                    M::Fld1 => F80::ONE,
                    M::Fldz => F80::ZERO,
                    M::Fldpi => constant(K_PI, rc),
                    M::Fldl2e => constant(K_L2E, rc),
                    M::Fldl2t => constant(K_L2T, rc),
                    M::Fldlg2 => constant(K_LG2, rc),
                    _ => constant(K_LN2, rc),
                };
                self.fpush(v, &mut fl);
                self.finish(fl);
                Ok(())
            }
            M::Fst | M::Fstp => self.fst(i),
            M::Fist | M::Fistp | M::Fisttp | M::Fbstp => self.fist(i),
            M::Fxch => {
                let k = if i.op_count() > 1 {
                    sti(i.op_register(1))
                } else if i.op_count() == 1 {
                    sti(i.op_register(0))
                } else {
                    1
                };
                if self.empty(0) || self.empty(k) {
                    fl |= IE | SF;
                    if !self.im_masked() {
                        self.finish(fl);
                        return Ok(());
                    }
                    for j in [0, k] {
                        if self.empty(j) {
                            self.set(j, F80::INDEFINITE);
                        }
                    }
                }
                let (a, b) = (self.get(0), self.get(k));
                self.set(0, b);
                self.set(k, a);
                self.finish(fl);
                Ok(())
            }
            M::Fadd
            | M::Faddp
            | M::Fiadd
            | M::Fsub
            | M::Fsubp
            | M::Fisub
            | M::Fsubr
            | M::Fsubrp
            | M::Fisubr
            | M::Fmul
            | M::Fmulp
            | M::Fimul
            | M::Fdiv
            | M::Fdivp
            | M::Fidiv
            | M::Fdivr
            | M::Fdivrp
            | M::Fidivr => self.arith(i),
            M::Fcom
            | M::Fcomp
            | M::Fcompp
            | M::Fucom
            | M::Fucomp
            | M::Fucompp
            | M::Ficom
            | M::Ficomp
            | M::Ftst
            | M::Fcomi
            | M::Fcomip
            | M::Fucomi
            | M::Fucomip => self.compare(i),
            M::Fcmovb
            | M::Fcmovbe
            | M::Fcmove
            | M::Fcmovnb
            | M::Fcmovnbe
            | M::Fcmovne
            | M::Fcmovnu
            | M::Fcmovu => {
                use crate::cpu::{CF, PF, ZF};
                let f = self.cpu.rflags;
                let (c, z, p) = (f & CF != 0, f & ZF != 0, f & PF != 0);
                let cond = match mn {
                    M::Fcmovb => c,
                    M::Fcmovbe => c || z,
                    M::Fcmove => z,
                    M::Fcmovnb => !c,
                    M::Fcmovnbe => !c && !z,
                    M::Fcmovne => !z,
                    M::Fcmovnu => !p,
                    _ => p,
                };
                let k = sti(i.op_register(1));
                if self.empty(0) || self.empty(k) {
                    fl |= IE | SF;
                    // Masked: the indefinite, whatever the condition.
                    if self.im_masked() {
                        self.set(0, F80::INDEFINITE);
                    }
                } else if cond {
                    let v = self.get(k);
                    self.set(0, v);
                }
                // C1 is only written (cleared) on a stack underflow.
                let c1 = if fl == 0 { self.cpu.fsw & C1 } else { 0 };
                self.finish(fl | c1);
                Ok(())
            }
            _ => self.unary(i),
        }
    }

    /// ST(k) as a source: stack underflow gives the indefinite with IE|SF.
    fn reg_src(&mut self, r: Register, fl: &mut u16) -> F80 {
        let k = sti(r);
        if self.empty(k) {
            *fl |= IE | SF;
            F80::INDEFINITE
        } else {
            self.get(k)
        }
    }

    fn fst(&mut self, i: &Instruction) -> R<()> {
        let mn = i.mnemonic();
        let mut fl = 0;
        let underflow = self.empty(0);
        if underflow {
            fl |= IE | SF;
        }
        let v = if underflow {
            F80::INDEFINITE
        } else {
            self.get(0)
        };
        if i.op_kind(0) == OpKind::Memory {
            let a = self.mem_lin(i)?;
            if underflow && !self.im_masked() {
                self.finish(fl);
                return Ok(());
            }
            let env = self.env(false);
            match i.memory_size() {
                MemorySize::Float80 => self.write80(a, v)?,
                ms => {
                    let (f, size) = if ms == MemorySize::Float32 {
                        (SGL, 4)
                    } else {
                        (DBL, 8)
                    };
                    let mut f2 = 0;
                    let out = to_ieee(v, f, env, &mut f2);
                    if !underflow {
                        fl |= f2;
                    }
                    if self.blocks(fl) {
                        self.finish(fl);
                        return Ok(());
                    }
                    match out {
                        Some(b) => self.write_lin(a, size, b)?,
                        None => {
                            self.finish(fl);
                            return Ok(());
                        }
                    }
                }
            }
        } else {
            if underflow && !self.im_masked() {
                self.finish(fl);
                return Ok(());
            }
            let k = sti(i.op_register(0));
            self.set(k, v);
        }
        if mn == M::Fstp {
            self.fpop();
        }
        self.finish(fl);
        Ok(())
    }

    fn fist(&mut self, i: &Instruction) -> R<()> {
        let mn = i.mnemonic();
        let a = self.mem_lin(i)?;
        let mut fl = 0;
        let underflow = self.empty(0);
        let v = if underflow {
            fl |= IE | SF;
            F80::INDEFINITE
        } else {
            self.get(0)
        };
        let rc = if mn == M::Fisttp {
            RZ
        } else {
            self.env(false).rc
        };
        if mn == M::Fbstp {
            let mut f2 = 0;
            let r = to_int(v, 64, rc, &mut f2);
            let val = r as i64;
            let mag = val.unsigned_abs();
            let bad = f2 & IE != 0 || mag >= 1_000_000_000_000_000_000;
            let (lo, hi) = if bad {
                fl |= IE;
                (0u64, 0xffffu64 | 0xc0 << 56)
            } else {
                fl |= f2;
                let mut lo = 0u64;
                let mut m = mag;
                for k in 0..16 {
                    lo |= (m % 10) << (4 * k);
                    m /= 10;
                }
                let mut hi = (m % 10) | ((m / 10 % 10) << 4);
                if v.sign() {
                    hi |= 0x8000;
                }
                (lo, hi)
            };
            if self.blocks(fl) {
                self.finish(fl);
                return Ok(());
            }
            // Low 8 bytes, then the last 2, not atomic (as `write80`).
            if bad {
                // BCD indefinite: FFFF C000 0000 0000 0000.
                self.write_lin(a, 8, 0xc000_0000_0000_0000)?;
                self.write_lin(a.wrapping_add(8), 2, 0xffff)?;
            } else {
                self.write_lin(a, 8, lo)?;
                self.write_lin(a.wrapping_add(8), 2, hi)?;
            }
            self.fpop();
            self.finish(fl);
            return Ok(());
        }
        let (bits, size) = match i.memory_size() {
            MemorySize::Int16 => (16, 2),
            MemorySize::Int32 => (32, 4),
            _ => (64, 8),
        };
        let out = to_int(v, bits, rc, &mut fl);
        if self.blocks(fl) {
            self.finish(fl);
            return Ok(());
        }
        self.write_lin(a, size, out)?;
        if mn != M::Fist {
            self.fpop();
        }
        self.finish(fl);
        Ok(())
    }

    fn arith(&mut self, i: &Instruction) -> R<()> {
        let mn = i.mnemonic();
        let mut fl = 0;
        let mut lfl = 0;
        // (destination ST index, source).
        let (dst, src) = if i.op_count() == 2 {
            let d = sti(i.op_register(0));
            if i.op_kind(1) == OpKind::Memory {
                (d, Src::Val(self.load_mem(i, &mut lfl)?))
            } else {
                (d, Src::St(sti(i.op_register(1))))
            }
        } else if i.op_count() == 1 {
            if i.op_kind(0) == OpKind::Memory {
                (0, Src::Val(self.load_mem(i, &mut lfl)?))
            } else {
                (0, Src::St(sti(i.op_register(0))))
            }
        } else {
            (1, Src::St(0))
        };
        let mut under = self.empty(dst);
        let b = match src {
            Src::St(k) => {
                under |= self.empty(k);
                self.get(k)
            }
            Src::Val(v) => v,
        };
        let a = self.get(dst);
        let pop = matches!(
            mn,
            M::Faddp | M::Fsubp | M::Fsubrp | M::Fmulp | M::Fdivp | M::Fdivrp
        );
        let r = if under {
            fl = IE | SF;
            F80::INDEFINITE
        } else {
            if !a.is_nan() && !b.is_nan() && a.class() != Class::Unsupported {
                fl |= lfl;
            }
            let env = self.env(true);
            let prec = pc_bits(self.cpu.fcw);
            match mn {
                M::Fadd | M::Faddp | M::Fiadd => fadd(a, b, env, prec, &mut fl),
                M::Fsub | M::Fsubp | M::Fisub => fadd(a, negate(b), env, prec, &mut fl),
                M::Fsubr | M::Fsubrp | M::Fisubr => fadd(b, negate(a), env, prec, &mut fl),
                M::Fmul | M::Fmulp | M::Fimul => fmul(a, b, env, prec, &mut fl),
                M::Fdiv | M::Fdivp | M::Fidiv => fdiv(a, b, env, prec, &mut fl),
                _ => fdiv(b, a, env, prec, &mut fl),
            }
        };
        if self.blocks(fl) {
            self.finish(fl);
            return Ok(());
        }
        self.set(dst, r);
        if pop {
            self.fpop();
        }
        self.finish(fl);
        Ok(())
    }

    fn compare(&mut self, i: &Instruction) -> R<()> {
        use std::cmp::Ordering;
        let mn = i.mnemonic();
        let mut fl = 0;
        let quiet = matches!(
            mn,
            M::Fucom | M::Fucomp | M::Fucompp | M::Fucomi | M::Fucomip
        );
        let (b, under_b) = if mn == M::Ftst {
            (F80::ZERO, false)
        } else if matches!(mn, M::Fcompp | M::Fucompp) || i.op_count() == 0 {
            (self.get(1), self.empty(1))
        } else {
            let n = i.op_count() - 1;
            if i.op_kind(n) == OpKind::Memory {
                let mut lfl = 0;
                let v = self.load_mem(i, &mut lfl)?;
                let a = self.get(0);
                if !self.empty(0) && !a.is_nan() && !v.is_nan() && a.class() != Class::Unsupported {
                    fl |= lfl;
                }
                (v, false)
            } else {
                let k = sti(i.op_register(n));
                (self.get(k), self.empty(k))
            }
        };
        let under = self.empty(0) || under_b;
        let a = self.get(0);
        let ord = if under {
            fl |= IE | SF;
            None
        } else {
            fcmp(a, b, quiet, &mut fl)
        };
        let pops = match mn {
            M::Fcomp | M::Fucomp | M::Ficomp | M::Fcomip | M::Fucomip => 1,
            M::Fcompp | M::Fucompp => 2,
            _ => 0,
        };
        // An unmasked exception still writes the condition codes ("unordered"), but does
        // not pop.
        let blocked = self.blocks(fl);
        if matches!(mn, M::Fcomi | M::Fcomip | M::Fucomi | M::Fucomip) {
            use crate::cpu::{ARITH_FLAGS, CF, PF, ZF};
            let f = match ord {
                None => ZF | PF | CF,
                Some(Ordering::Less) => CF,
                Some(Ordering::Equal) => ZF,
                Some(Ordering::Greater) => 0,
            };
            self.set_flags(ARITH_FLAGS, f);
        } else {
            let c = match ord {
                None => C3 | C2 | C0,
                Some(Ordering::Less) => C0,
                Some(Ordering::Equal) => C3,
                Some(Ordering::Greater) => 0,
            };
            self.set_cc(c);
        }
        if !blocked {
            for _ in 0..pops {
                self.fpop();
            }
        }
        let c1 = self.cpu.fsw & C1;
        self.finish(fl);
        if fl & SF == 0 && matches!(mn, M::Fcomi | M::Fcomip | M::Fucomi | M::Fucomip) {
            // FCOMI and friends write C1 only on a stack underflow (cleared).
            self.cpu.fsw |= c1;
        }
        Ok(())
    }

    fn unary(&mut self, i: &Instruction) -> R<()> {
        let mn = i.mnemonic();
        let mut fl = 0;
        let env = self.env(true);
        if mn == M::Fxam {
            let v = self.get(0);
            let c = if self.empty(0) {
                C3 | C0
            } else {
                match v.class() {
                    Class::Unsupported => 0,
                    Class::QNan | Class::SNan => C0,
                    Class::Normal => C2,
                    Class::Inf => C2 | C0,
                    Class::Zero => C3,
                    Class::Denormal => C3 | C2,
                }
            };
            self.set_cc(c | if v.sign() { C1 } else { 0 });
            return Ok(());
        }
        // Two-operand instructions read ST1 as well.
        let two = matches!(
            mn,
            M::Fprem | M::Fprem1 | M::Fscale | M::Fpatan | M::Fyl2x | M::Fyl2xp1
        );
        let pushes = matches!(mn, M::Fxtract | M::Fptan | M::Fsincos);
        if self.empty(0) || (two && self.empty(1)) {
            fl |= IE | SF;
            if matches!(
                mn,
                M::Fprem | M::Fprem1 | M::Fsin | M::Fcos | M::Fsincos | M::Fptan
            ) {
                self.cpu.fsw &= !C2;
            }
            if self.im_masked() {
                match mn {
                    M::Fxtract | M::Fptan | M::Fsincos => {
                        // Both results are the indefinite; the push happens even onto a
                        // full register (underflow wins: C1 = 0).
                        self.set(0, F80::INDEFINITE);
                        self.dec_top();
                        self.set(0, F80::INDEFINITE);
                    }
                    M::Fpatan | M::Fyl2x | M::Fyl2xp1 => {
                        self.set(1, F80::INDEFINITE);
                        self.fpop();
                    }
                    M::Fprem | M::Fprem1 | M::Fscale => self.set(0, F80::INDEFINITE),
                    _ => self.set(0, F80::INDEFINITE),
                }
            }
            self.finish(fl);
            return Ok(());
        }
        if pushes && !self.empty(7) {
            fl |= IE | SF | C1;
            if mn != M::Fxtract {
                self.cpu.fsw &= !C2;
            }
            if self.im_masked() {
                self.set(0, F80::INDEFINITE);
                self.fpush(F80::INDEFINITE, &mut 0);
            }
            self.finish(fl);
            return Ok(());
        }
        let a = self.get(0);
        let b = self.get(1);
        match mn {
            M::Fabs | M::Fchs => {
                self.set(0, if mn == M::Fabs { a.abs() } else { a.neg() });
                self.finish(0);
            }
            M::Fsqrt => {
                let r = fsqrt(a, env, pc_bits(self.cpu.fcw), &mut fl);
                self.result(0, r, fl);
            }
            M::Frndint => {
                let r = frndint(a, env, &mut fl);
                self.result(0, r, fl);
            }
            M::Fscale => {
                let r = self.fscale(a, b, env, &mut fl);
                self.result(0, r, fl);
            }
            M::Fxtract => {
                let (e, s) = fxtract(a, &mut fl);
                if self.blocks(fl) {
                    self.finish(fl);
                    return Ok(());
                }
                self.set(0, e);
                self.fpush(s, &mut fl);
                self.finish(fl);
            }
            M::Fprem | M::Fprem1 => {
                let (r, q, partial) = fprem(a, b, mn == M::Fprem1, self.cpu.fcw, &mut fl);
                if self.blocks(fl) {
                    // No result; C2 (incomplete) is cleared.
                    self.cpu.fsw &= !C2;
                    self.finish(fl);
                    return Ok(());
                }
                self.set(0, r);
                let mut c = 0;
                if r.is_nan() {
                    // A NaN result (NaN operand or invalid operation) only clears C2.
                    c = self.cpu.fsw & (C3 | C0);
                } else if partial {
                    c |= C2;
                } else {
                    if q & 1 != 0 {
                        c |= C1;
                    }
                    if q & 2 != 0 {
                        c |= C3;
                    }
                    if q & 4 != 0 {
                        c |= C0;
                    }
                }
                self.set_cc(c);
                let f = if fl & (IE | ZE) != 0 { fl & !DE } else { fl };
                self.cpu.fsw |= f & 0x7f;
                self.summary();
            }
            _ => self.transcendental(mn, a, b, &mut fl),
        }
        Ok(())
    }

    /// Writes ST(k) unless an unmasked IE/DE/ZE blocks it.
    fn result(&mut self, k: usize, r: F80, fl: u16) {
        if !self.blocks(fl) {
            self.set(k, r);
        }
        self.finish(fl);
    }

    fn fscale(&mut self, a: F80, b: F80, env: Env, fl: &mut u16) -> F80 {
        if let Some(r) = check2(a, b, fl) {
            return r;
        }
        let (ca, cb) = (a.class(), b.class());
        if cb == Class::Inf {
            return match (ca, b.sign()) {
                (Class::Zero, false) | (Class::Inf, true) => {
                    *fl |= IE;
                    F80::INDEFINITE
                }
                (Class::Zero, true) | (Class::Inf, false) => a,
                (_, false) => F80::inf(a.sign()),
                (_, true) => F80::zero(a.sign()),
            };
        }
        if matches!(ca, Class::Zero | Class::Inf) {
            return a;
        }
        // A zero scale returns ST(0) without rounding it again: the hardware reports no
        // underflow for a denormal ST(0) here, even with the exception unmasked, and only
        // writes a pseudo-denormal (exponent 0, integer bit set) in its canonical form,
        // exponent 1 (seen by the x87 differential tester, seed 0x50002 blocks 49 543,
        // 77 896 and 127 283).
        if cb == Class::Zero {
            let pseudo_denormal = a.se & 0x7fff == 0 && a.m >> 63 == 1;
            return if pseudo_denormal {
                F80 {
                    se: a.se | 1,
                    m: a.m,
                }
            } else {
                a
            };
        }
        let (sb, xb, mb) = b.unpack();
        let n: i64 = if mb == 0 || xb < -63 {
            0
        } else if xb >= 0 {
            1 << 20
        } else {
            (mb >> (-xb)) as i64
        };
        let n = n.min(1 << 20) as i32;
        let n = if sb { -n } else { n };
        let (s, x, m) = a.unpack();
        round80(s, u128::from(m), x + n, 64, env, fl)
    }

    fn transcendental(&mut self, mn: M, a: F80, b: F80, fl: &mut u16) {
        let pi = F80 {
            se: 0x4000,
            m: 0xc90f_daa2_2168_c235,
        };
        match mn {
            M::Fsin | M::Fcos | M::Fsincos | M::Fptan => {
                if let Some(r) = check1(a, fl) {
                    if !self.blocks(*fl) {
                        self.set(0, r);
                        if matches!(mn, M::Fsincos | M::Fptan) {
                            self.fpush(r, fl);
                        }
                    }
                    self.cpu.fsw &= !C2;
                    self.finish(*fl);
                    return;
                }
                if a.class() == Class::Inf {
                    *fl |= IE;
                    if !self.blocks(*fl) {
                        self.set(0, F80::INDEFINITE);
                        if matches!(mn, M::Fsincos | M::Fptan) {
                            self.fpush(F80::INDEFINITE, fl);
                        }
                    }
                    self.cpu.fsw &= !C2;
                    self.finish(*fl);
                    return;
                }
                if a.exp() >= 16383 + 63 {
                    self.cpu.fsw |= C2;
                    self.finish(*fl);
                    return;
                }
                self.cpu.fsw &= !C2;
                if self.blocks(*fl) {
                    self.finish(*fl);
                    return;
                }
                if a.class() == Class::Zero {
                    match mn {
                        M::Fsin => self.set(0, a),
                        M::Fcos => self.set(0, F80::ONE),
                        M::Fsincos => {
                            self.set(0, a);
                            self.fpush(F80::ONE, fl);
                        }
                        _ => {
                            self.set(0, a);
                            self.fpush(F80::ONE, fl);
                        }
                    }
                    self.finish(*fl);
                    return;
                }
                let (s, c) = sincos(a);
                match mn {
                    M::Fsin => {
                        let r = from_f64_inexact(s, fl);
                        self.set(0, r);
                    }
                    M::Fcos => {
                        let r = from_f64_inexact(c, fl);
                        self.set(0, r);
                    }
                    M::Fsincos => {
                        let rs = from_f64_inexact(s, fl);
                        let rc = from_f64_inexact(c, fl);
                        self.set(0, rs);
                        self.fpush(rc, fl);
                    }
                    _ => {
                        let r = from_f64_inexact(s / c, fl);
                        self.set(0, r);
                        self.fpush(F80::ONE, fl);
                    }
                }
                self.finish(*fl);
            }
            M::F2xm1 => {
                let r = if let Some(r) = check1(a, fl) {
                    r
                } else {
                    match a.class() {
                        Class::Zero => a,
                        Class::Inf => {
                            if a.sign() {
                                F80::ONE.neg()
                            } else {
                                a
                            }
                        }
                        _ => {
                            let x = f64_of(a);
                            from_f64_inexact((x * std::f64::consts::LN_2).exp_m1(), fl)
                        }
                    }
                };
                self.result(0, r, *fl);
            }
            M::Fpatan | M::Fyl2x | M::Fyl2xp1 => {
                // ST1 <- f(ST1, ST0); pop.
                let r = match mn {
                    M::Fpatan => fpatan(b, a, pi, fl),
                    M::Fyl2x => fyl2x(b, a, fl),
                    _ => fyl2xp1(b, a, fl),
                };
                if self.blocks(*fl) {
                    self.finish(*fl);
                    return;
                }
                self.set(1, r);
                self.fpop();
                self.finish(*fl);
            }
            _ => {}
        }
    }

    /// FNSTENV/FLDENV/FNSAVE/FRSTOR in all four layouts.
    fn env_op(&mut self, i: &Instruction) -> R<()> {
        let mn = i.mnemonic();
        let a = self.mem_lin(i)?;
        let size = i.memory_size().size();
        let wide = size == 28 || size == 108;
        let real = !self.cpu.protected() || self.cpu.rflags & crate::cpu::VM != 0;
        let env_len: u64 = if wide { 28 } else { 14 };
        match mn {
            M::Fnstenv | M::Fnsave => {
                self.probe_write(a, size)?;
                let tw = self.full_tag();
                let (fip, fdp) = (self.cpu.fip, self.cpu.fdp);
                let fop = u64::from(self.cpu.fop & 0x7ff);
                let words: Vec<(u64, usize, u64)> = if wide {
                    let mut w = vec![
                        (0, 4, 0xffff_0000 | u64::from(self.cpu.fcw)),
                        (4, 4, 0xffff_0000 | u64::from(self.cpu.fsw)),
                        (8, 4, 0xffff_0000 | u64::from(tw)),
                    ];
                    if real {
                        w.push((12, 4, 0xffff_0000 | (fip & 0xffff)));
                        w.push((16, 4, ((fip >> 16) & 0xffff) << 12 | fop));
                        w.push((20, 4, 0xffff_0000 | (fdp & 0xffff)));
                        w.push((24, 4, ((fdp >> 16) & 0xffff) << 12));
                    } else {
                        w.push((12, 4, fip & 0xffff_ffff));
                        w.push((16, 4, fop << 16));
                        w.push((20, 4, fdp & 0xffff_ffff));
                        w.push((24, 4, 0xffff_0000));
                    }
                    w
                } else {
                    let mut w = vec![
                        (0, 2, u64::from(self.cpu.fcw)),
                        (2, 2, u64::from(self.cpu.fsw)),
                        (4, 2, u64::from(tw)),
                    ];
                    if real {
                        w.push((6, 2, fip & 0xffff));
                        w.push((8, 2, ((fip >> 16) & 0xf) << 12 | fop));
                        w.push((10, 2, fdp & 0xffff));
                        w.push((12, 2, ((fdp >> 16) & 0xf) << 12));
                    } else {
                        w.push((6, 2, fip & 0xffff));
                        w.push((8, 2, 0));
                        w.push((10, 2, fdp & 0xffff));
                        w.push((12, 2, 0));
                    }
                    w
                };
                for (off, sz, v) in words {
                    self.write_lin(a.wrapping_add(off), sz, v)?;
                }
                if mn == M::Fnsave {
                    for k in 0..8 {
                        let v = self.get(k);
                        self.write80(a.wrapping_add(env_len + 10 * k as u64), v)?;
                    }
                    self.reinit();
                } else {
                    self.cpu.fcw |= 0x3f;
                    self.summary();
                }
                Ok(())
            }
            _ => {
                let (fcw, fsw, tw, fip, fdp, fop);
                if wide {
                    fcw = self.read_lin(a, 2)? as u16;
                    fsw = self.read_lin(a.wrapping_add(4), 2)? as u16;
                    tw = self.read_lin(a.wrapping_add(8), 2)? as u16;
                    let w3 = self.read_lin(a.wrapping_add(12), 4)?;
                    let w4 = self.read_lin(a.wrapping_add(16), 4)?;
                    let w5 = self.read_lin(a.wrapping_add(20), 4)?;
                    let w6 = self.read_lin(a.wrapping_add(24), 4)?;
                    if real {
                        fip = (w3 & 0xffff) | ((w4 >> 12) & 0xffff) << 16;
                        fop = (w4 & 0x7ff) as u16;
                        fdp = (w5 & 0xffff) | ((w6 >> 12) & 0xffff) << 16;
                    } else {
                        fip = w3;
                        fop = ((w4 >> 16) & 0x7ff) as u16;
                        fdp = w5;
                    }
                } else {
                    fcw = self.read_lin(a, 2)? as u16;
                    fsw = self.read_lin(a.wrapping_add(2), 2)? as u16;
                    tw = self.read_lin(a.wrapping_add(4), 2)? as u16;
                    let w3 = self.read_lin(a.wrapping_add(6), 2)?;
                    let w4 = self.read_lin(a.wrapping_add(8), 2)?;
                    let w5 = self.read_lin(a.wrapping_add(10), 2)?;
                    let w6 = self.read_lin(a.wrapping_add(12), 2)?;
                    if real {
                        fip = w3 | ((w4 >> 12) & 0xf) << 16;
                        fop = (w4 & 0x7ff) as u16;
                        fdp = w5 | ((w6 >> 12) & 0xf) << 16;
                    } else {
                        fip = w3;
                        fop = 0;
                        fdp = w5;
                    }
                }
                let mut regs = [F80::ZERO; 8];
                if mn == M::Frstor {
                    for (k, r) in regs.iter_mut().enumerate() {
                        *r = self.read80(a.wrapping_add(env_len + 10 * k as u64))?;
                    }
                }
                // The registers stay where they are physically: re-align the ST-relative
                // array with the new TOP (FRSTOR then loads them in ST order).
                let shift = usize::from(((fsw >> 11) & 7).wrapping_sub(self.top()) & 7);
                self.cpu.st.rotate_left(shift);
                self.cpu.fcw = fcw | 0x40;
                self.cpu.fsw = fsw;
                self.cpu.fip = fip;
                self.cpu.fdp = fdp;
                self.cpu.fop = fop;
                let mut ftw = 0u8;
                for p in 0..8 {
                    if (tw >> (2 * p)) & 3 != 3 {
                        ftw |= 1 << p;
                    }
                }
                self.cpu.ftw = ftw;
                if mn == M::Frstor {
                    for (k, r) in regs.iter().enumerate() {
                        self.cpu.st[k] = r.to_bytes();
                    }
                }
                self.summary();
                Ok(())
            }
        }
    }

    /// FNINIT: TOP becomes 0 (the register contents stay in their physical registers, so the
    /// ST-relative array turns with it), all tags empty, default control word.
    fn reinit(&mut self) {
        let top = usize::from(self.top());
        self.cpu.st.rotate_right(top);
        self.cpu.fcw = 0x37f;
        self.cpu.fsw = 0;
        self.cpu.ftw = 0;
        self.cpu.fop = 0;
        self.cpu.fip = 0;
        self.cpu.fdp = 0;
    }

    /// The full 16-bit tag word.
    fn full_tag(&self) -> u16 {
        let top = usize::from(self.top());
        let mut tw = 0u16;
        for p in 0..8 {
            let t = if self.cpu.ftw & (1 << p) == 0 {
                3
            } else {
                tag_class(self.get((p + 8 - top) & 7))
            };
            tw |= t << (2 * p);
        }
        tw
    }
}

/// A pseudo-denormal (exponent 0, integer bit set) as the normal value it stands for.
fn canon(v: F80) -> F80 {
    if v.exp() == 0 && v.m >> 63 != 0 {
        F80 {
            se: v.se + 1,
            m: v.m,
        }
    } else {
        v
    }
}

fn negate(v: F80) -> F80 {
    // Subtraction is addition of the negated operand; NaNs keep their sign for propagation.
    if v.is_nan() || v.class() == Class::Unsupported {
        v
    } else {
        v.neg()
    }
}

/// FXTRACT: (exponent, significand).
fn fxtract(a: F80, fl: &mut u16) -> (F80, F80) {
    if let Some(r) = check1(a, fl) {
        return (r, r);
    }
    match a.class() {
        Class::Zero => {
            *fl |= ZE;
            (F80::inf(true), a)
        }
        Class::Inf => (F80::inf(false), a),
        _ => {
            let (s, x, m) = a.unpack();
            let e = F80::from_i128(i128::from(x + 63));
            let sig = F80 {
                se: (u16::from(s) << 15) | 0x3fff,
                m,
            };
            (e, sig)
        }
    }
}

fn fpatan(y: F80, x: F80, pi: F80, fl: &mut u16) -> F80 {
    if let Some(r) = check2(y, x, fl) {
        return r;
    }
    let (cy, cx) = (y.class(), x.class());
    let half = |v: F80| F80 {
        se: v.se - 1,
        m: v.m,
    };
    let signed = |v: F80, s: bool| if s { v.neg() } else { v };
    let r = match (cy, cx) {
        (Class::Zero, _) => {
            if x.sign() {
                signed(pi, y.sign())
            } else {
                F80::zero(y.sign())
            }
        }
        (Class::Inf, Class::Inf) => {
            let q = half(half(pi));
            let v = if x.sign() {
                // 3pi/4
                let mut f = 0;
                fadd(
                    pi,
                    q.neg(),
                    Env {
                        rc: RN,
                        fcw: 0x3f,
                        reg: true,
                    },
                    64,
                    &mut f,
                )
            } else {
                q
            };
            signed(v, y.sign())
        }
        (Class::Inf, _) | (_, Class::Zero) => signed(half(pi), y.sign()),
        (_, Class::Inf) => {
            if x.sign() {
                signed(pi, y.sign())
            } else {
                F80::zero(y.sign())
            }
        }
        _ => {
            let (_, xy, _) = y.unpack();
            let (_, xx, _) = x.unpack();
            let sc = xy.max(xx) + 63;
            let scale = |v: F80| {
                let (s, e, m) = v.unpack();
                let (h, l) = to_dd(F80 {
                    se: (u16::from(s) << 15) | ((e - sc + 63 + 16383).clamp(1, 0x7ffe) as u16),
                    m,
                });
                h + l
            };
            let (fy, fx) = (scale(y), scale(x));
            return from_f64_inexact(fy.atan2(fx), fl);
        }
    };
    if r.class() != Class::Zero {
        *fl |= PE;
    }
    r
}

/// log2 of a positive finite extended value as double-double-ish f64.
fn log2_of(v: F80) -> f64 {
    let (_, x, m) = v.unpack();
    // v = 2^(x+63) * f with f = m / 2^63 in [1, 2); f - 1 (or f/2 - 1) is exact in the
    // integer domain, so log1p keeps the relative accuracy near 1.
    let (e, t) = if m > 0xb504_f333_f9de_6484 {
        (x + 64, -((m.wrapping_neg()) as f64) / 2f64.powi(64))
    } else {
        (x + 63, (m - (1 << 63)) as f64 / 2f64.powi(63))
    };
    f64::from(e) + t.ln_1p() * std::f64::consts::LOG2_E
}

fn fyl2x(y: F80, x: F80, fl: &mut u16) -> F80 {
    if let Some(r) = check2(y, x, fl) {
        return r;
    }
    let (cy, cx) = (y.class(), x.class());
    if x.sign() && cx != Class::Zero {
        *fl |= IE;
        return F80::INDEFINITE;
    }
    let is_one = x == F80::ONE;
    match (cy, cx) {
        (_, Class::Zero) => {
            if cy == Class::Zero {
                *fl |= IE;
                return F80::INDEFINITE;
            }
            *fl |= ZE;
            return F80::inf(!y.sign());
        }
        (Class::Zero, Class::Inf) => {
            *fl |= IE;
            return F80::INDEFINITE;
        }
        (Class::Inf, _) if is_one => {
            *fl |= IE;
            return F80::INDEFINITE;
        }
        (Class::Inf, _) => {
            let below = fcmp(x, F80::ONE, true, &mut 0) == Some(std::cmp::Ordering::Less);
            return F80::inf(y.sign() != below);
        }
        (_, Class::Inf) => return F80::inf(y.sign()),
        _ => {}
    }
    if is_one || cy == Class::Zero {
        let below = fcmp(x, F80::ONE, true, &mut 0) == Some(std::cmp::Ordering::Less);
        return F80::zero(y.sign() != below);
    }
    let l = log2_of(x);
    let (yh, yl) = to_dd(y);
    let r = (yh + yl) * l;
    if !r.is_finite() || r == 0.0 {
        // Beyond double range: exact exponent arithmetic in extended.
        let mut f = 0;
        let lv = from_f64(l);
        return fmul(
            y,
            lv,
            Env {
                rc: RN,
                fcw: 0x3f,
                reg: true,
            },
            64,
            &mut f,
        );
    }
    from_f64_inexact(r, fl)
}

fn fyl2xp1(y: F80, x: F80, fl: &mut u16) -> F80 {
    if let Some(r) = check2(y, x, fl) {
        return r;
    }
    let (cy, cx) = (y.class(), x.class());
    if cx == Class::Inf || cy == Class::Inf {
        if cx == Class::Zero || cy == Class::Zero {
            *fl |= IE;
            return F80::INDEFINITE;
        }
        if cx == Class::Inf && x.sign() {
            *fl |= IE;
            return F80::INDEFINITE;
        }
        return F80::inf(y.sign() != x.sign());
    }
    if cx == Class::Zero || cy == Class::Zero {
        return F80::zero(y.sign() != x.sign());
    }
    let xv = f64_of(x);
    if xv <= -1.0 {
        *fl |= IE;
        return F80::INDEFINITE;
    }
    let r = f64_of(y) * xv.ln_1p() * std::f64::consts::LOG2_E;
    from_f64_inexact(r, fl)
}
