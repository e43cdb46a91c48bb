//! SSE floating point exactly as the hardware computes it: MXCSR rounding control, DAZ and FTZ,
//! the six exception flags, unmasked exceptions, and the x86 NaN rules.
//!
//! Host `f32`/`f64` arithmetic rounds to nearest and reports no flags, so arithmetic and
//! conversions go through `rustc_apfloat` (LLVM's APFloat in Rust), which rounds in every IEEE
//! mode and reports the IEEE status. What x86 adds on top is here: NaN selection (first source's
//! NaN, quieted; invalid operations give the negative default NaN), denormal operands (DE, or
//! zero under DAZ), tininess detected *after* rounding (APFloat detects it on the rounded
//! subnormal, which differs just below the smallest normal: that case is recomputed in a format
//! with the same precision and a wider exponent), FTZ, and the split between pre-computation
//! (IE/DE/ZE) and post-computation (OE/UE/PE) exceptions when one is unmasked.
//! `rustc_apfloat` has no square root: it is the host's correctly rounded `sqrt` (nearest) with
//! an exact square check for the directed modes and for PE.

use rustc_apfloat::ieee::{Double, IeeeFloat, Quad, Semantics, Single};
use rustc_apfloat::{Float, FloatConvert, Round, Status, StatusAnd};

use crate::exec::Exc;

pub(crate) const IE: u32 = 1;
pub(crate) const DE: u32 = 2;
pub(crate) const ZE: u32 = 4;
pub(crate) const OE: u32 = 8;
pub(crate) const UE: u32 = 16;
pub(crate) const PE: u32 = 32;
const DAZ: u32 = 1 << 6;
const OM: u32 = 1 << 10;
const UM: u32 = 1 << 11;
const FTZ: u32 = 1 << 15;

/// The #XM vector; [`crate::exec::Exec::simd_fault`] turns it into #UD when CR4.OSXMMEXCPT=0.
pub(crate) const XM: u8 = 19;

/// The FP environment of one instruction: MXCSR at its start and the flags it raised.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Env {
    pub mxcsr: u32,
    /// Flags raised by the step being computed.
    pub flags: u32,
    /// Flags of the finished steps of a multi-step instruction (DPPS/DPPD): they stay recorded
    /// when a later step traps.
    done: u32,
}

impl Env {
    pub(crate) fn new(mxcsr: u32) -> Env {
        Env {
            mxcsr,
            flags: 0,
            done: 0,
        }
    }

    /// The rounding mode of MXCSR.RC.
    pub(crate) fn round(&self) -> Round {
        rc_round((self.mxcsr >> 13) & 3)
    }

    /// Merges the raised flags into `mxcsr` as the hardware does and fails with #XM when one
    /// of them is unmasked (then only the pre-computation flags of the trapping step are
    /// recorded if one of those is the unmasked one; earlier steps' flags all are).
    pub(crate) fn finish(self, mxcsr: &mut u32) -> Result<(), Exc> {
        let mut f = self.flags & 0x3f;
        let unmasked = f & !(self.mxcsr >> 7) & 0x3f;
        if unmasked & (IE | DE | ZE) != 0 {
            f &= IE | DE | ZE;
        }
        *mxcsr |= f | (self.done & 0x3f);
        if unmasked != 0 {
            Err(Exc::Fault(XM, None))
        } else {
            Ok(())
        }
    }
}

/// Rounding control value (0 nearest, 1 down, 2 up, 3 toward zero) as an APFloat mode.
pub(crate) fn rc_round(rc: u32) -> Round {
    match rc & 3 {
        0 => Round::NearestTiesToEven,
        1 => Round::TowardNegative,
        2 => Round::TowardPositive,
        _ => Round::TowardZero,
    }
}

/// Single precision with a 15-bit exponent: the same rounding, no subnormals in reach (not even
/// for double denormal inputs of CVTSD2SS), so "tiny after rounding" and the exactness of the
/// exponent-unbounded result can be read off its result.
pub(crate) struct WideSingleS;
impl Semantics for WideSingleS {
    const BITS: usize = 39;
    const EXP_BITS: usize = 15;
}
/// Double precision with a 15-bit exponent.
pub(crate) struct WideDoubleS;
impl Semantics for WideDoubleS {
    const BITS: usize = 68;
    const EXP_BITS: usize = 15;
}

/// One IEEE binary format (single or double) as raw bits in a `u64`.
pub(crate) trait Fmt {
    type F: Float + FloatConvert<Self::W>;
    type W: Float;
    const BITS: u32;
    const MANT: u32;
    const SIGN: u64 = 1 << (Self::BITS - 1);
    const EXP: u64 = ((1u64 << (Self::BITS - 1 - Self::MANT)) - 1) << Self::MANT;
    const FRAC: u64 = (1u64 << Self::MANT) - 1;
    const QBIT: u64 = 1 << (Self::MANT - 1);
    /// The x86 default NaN ("real indefinite"): negative, quiet, zero payload.
    const DEFAULT_NAN: u64 = Self::SIGN | Self::EXP | Self::QBIT;
    const MIN_NORMAL: u64 = 1 << Self::MANT;
    const LARGEST: u64 = (Self::EXP - Self::MIN_NORMAL) | Self::FRAC;
    const MASK: u64 = if Self::BITS == 64 {
        u64::MAX
    } else {
        (1u64 << Self::BITS) - 1
    };

    fn f(x: u64) -> Self::F {
        Self::F::from_bits(u128::from(x & Self::MASK))
    }
    fn bits(x: Self::F) -> u64 {
        x.to_bits() as u64
    }
    fn is_nan(x: u64) -> bool {
        x & Self::EXP == Self::EXP && x & Self::FRAC != 0
    }
    fn is_snan(x: u64) -> bool {
        Self::is_nan(x) && x & Self::QBIT == 0
    }
    fn quiet(x: u64) -> u64 {
        x | Self::QBIT
    }
    fn is_denormal(x: u64) -> bool {
        x & Self::EXP == 0 && x & Self::FRAC != 0
    }
    fn is_zero(x: u64) -> bool {
        x & !Self::SIGN & Self::MASK == 0
    }
    fn is_inf(x: u64) -> bool {
        x & !Self::SIGN & Self::MASK == Self::EXP
    }
}

pub(crate) struct S32;
impl Fmt for S32 {
    type F = Single;
    type W = IeeeFloat<WideSingleS>;
    const BITS: u32 = 32;
    const MANT: u32 = 23;
}
pub(crate) struct S64;
impl Fmt for S64 {
    type F = Double;
    type W = IeeeFloat<WideDoubleS>;
    const BITS: u32 = 64;
    const MANT: u32 = 52;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Add,
    Sub,
    Mul,
    Div,
}

fn apply<F: Float>(op: Op, x: F, y: F, r: Round) -> StatusAnd<F> {
    match op {
        Op::Add => x.add_r(y, r),
        Op::Sub => x.sub_r(y, r),
        Op::Mul => x.mul_r(y, r),
        Op::Div => x.div_r(y, r),
    }
}

impl Env {
    /// A non-NaN source operand: zero under DAZ if denormal, else DE for a denormal.
    pub(crate) fn input<T: Fmt>(&mut self, x: u64) -> u64 {
        if T::is_denormal(x) {
            if self.mxcsr & DAZ != 0 {
                return x & T::SIGN;
            }
            self.flags |= DE;
        }
        x & T::MASK
    }

    /// DAZ without DE (instructions that do not report denormal operands).
    pub(crate) fn input_quiet<T: Fmt>(&self, x: u64) -> u64 {
        if T::is_denormal(x) && self.mxcsr & DAZ != 0 {
            x & T::SIGN
        } else {
            x & T::MASK
        }
    }

    /// NaN operands of a two-source arithmetic operation: IE for an SNaN, the first NaN source
    /// quieted.
    fn nan2<T: Fmt>(&mut self, a: u64, b: u64) -> Option<u64> {
        if !T::is_nan(a) && !T::is_nan(b) {
            return None;
        }
        if T::is_snan(a) || T::is_snan(b) {
            self.flags |= IE;
        }
        Some(
            if T::is_nan(a) {
                T::quiet(a)
            } else {
                T::quiet(b)
            } & T::MASK,
        )
    }

    /// The rounded result `r` of an operation with status `st`; `wide` recomputes it with the
    /// same precision and unbounded exponent (for tininess after rounding, overflow in the
    /// directed modes, and PE of a trapping overflow/underflow).
    fn result<T: Fmt>(&mut self, r: StatusAnd<T::F>, wide: impl Fn() -> StatusAnd<T::W>) -> u64 {
        let st = r.status;
        let mut v = T::bits(r.value);
        if st.intersects(Status::INVALID_OP) {
            self.flags |= IE;
            return T::DEFAULT_NAN;
        }
        if st.intersects(Status::DIV_BY_ZERO) {
            self.flags |= ZE;
        }
        let inexact = st.intersects(Status::INEXACT);
        // APFloat reports no overflow when a directed mode rounds to the largest finite value;
        // IEEE (and x86) do when the exponent-unbounded result is beyond it.
        let overflow = st.intersects(Status::OVERFLOW)
            || (inexact && v & !T::SIGN == T::LARGEST && {
                let w = wide().value;
                let max: T::W = T::F::largest().convert(&mut false).value;
                w.abs() > max
            });
        if overflow {
            self.flags |= OE;
        }
        let tiny = if overflow {
            false
        } else if st.intersects(Status::UNDERFLOW) || T::is_denormal(v) {
            true
        } else if inexact && v & !T::SIGN == T::MIN_NORMAL {
            let w = wide().value;
            let min: T::W = T::F::smallest_normalized().convert(&mut false).value;
            w.abs() < min
        } else {
            false
        };
        if tiny {
            if self.mxcsr & UM == 0 {
                self.flags |= UE;
            } else if self.mxcsr & FTZ != 0 {
                v &= T::SIGN;
                self.flags |= UE | PE;
            } else if inexact {
                self.flags |= UE;
            }
        }
        // When it traps, PE tells whether the exponent-unbounded result is inexact.
        let trapped = (overflow && self.mxcsr & OM == 0) || (tiny && self.mxcsr & UM == 0);
        let inexact = if trapped {
            wide().status.intersects(Status::INEXACT)
        } else {
            inexact
        };
        if inexact {
            self.flags |= PE;
        }
        v
    }

    /// Whether an unmasked exception has been raised (a multi-step instruction such as DPPS
    /// stops at the end of the step that raised it).
    pub(crate) fn trapping(&self) -> bool {
        self.flags & !(self.mxcsr >> 7) & 0x3f != 0
    }

    /// Ends one step of a multi-step instruction: true when it raised an unmasked exception
    /// (the instruction stops there), else its flags become a finished step's, recorded in
    /// full whatever a later step raises (measured: DPPS whose products were inexact and
    /// whose sums are invalid with IM clear records PE and IE).
    pub(crate) fn end_step(&mut self) -> bool {
        if self.trapping() {
            return true;
        }
        self.done |= std::mem::take(&mut self.flags);
        false
    }

    /// `a op b` (ADD/SUB/MUL/DIV).
    pub(crate) fn arith<T: Fmt>(&mut self, op: Op, a: u64, b: u64) -> u64 {
        if let Some(r) = fast_arith::<T>(self.mxcsr, op, a, b) {
            return r;
        }
        if let Some(n) = self.nan2::<T>(a, b) {
            return n;
        }
        // DE is not reported when the operation is invalid or divides by zero.
        let den = self.mxcsr & DAZ == 0 && (T::is_denormal(a) || T::is_denormal(b));
        let (a, b) = (self.input_quiet::<T>(a), self.input_quiet::<T>(b));
        let saved = std::mem::take(&mut self.flags);
        let rnd = self.round();
        let (x, y) = (T::f(a), T::f(b));
        let r = apply(op, x, y, rnd);
        let v = self.result::<T>(r, || {
            let (wx, wy): (T::W, T::W) = (x.convert(&mut false).value, y.convert(&mut false).value);
            apply(op, wx, wy, rnd)
        });
        if den && self.flags & (IE | ZE) == 0 {
            self.flags |= DE;
        }
        self.flags |= saved;
        v
    }

    /// MIN/MAX: the second source when either is NaN (IE) or both are zero.
    pub(crate) fn minmax<T: Fmt>(&mut self, max: bool, a: u64, b: u64) -> u64 {
        if T::is_nan(a) || T::is_nan(b) {
            self.flags |= IE;
            return self.input_quiet::<T>(b);
        }
        let (a, b) = (self.input::<T>(a), self.input::<T>(b));
        if T::is_zero(a) && T::is_zero(b) {
            return b;
        }
        let (x, y) = (T::f(a), T::f(b));
        let pick_a = if max { x > y } else { x < y };
        if pick_a { a } else { b }
    }

    /// Compare predicate `p` (0..31, the AVX encoding; legacy SSE uses 0..7). Returns the
    /// truth value.
    pub(crate) fn cmp<T: Fmt>(&mut self, p: u32, a: u64, b: u64) -> bool {
        let unord = T::is_nan(a) || T::is_nan(b);
        let k = p & 15;
        let signaling = matches!(k, 1 | 2 | 5 | 6 | 9 | 10 | 13 | 14) != (p & 16 != 0);
        if T::is_snan(a) || T::is_snan(b) || (unord && signaling) {
            self.flags |= IE;
        }
        let (lt, eq) = if unord {
            (false, false)
        } else {
            let (a, b) = (self.input::<T>(a), self.input::<T>(b));
            let (x, y) = (T::f(a), T::f(b));
            (x < y, x == y)
        };
        let gt = !unord && !lt && !eq;
        match k {
            0 => eq,
            1 => lt,
            2 => lt || eq,
            3 => unord,
            4 => unord || !eq,
            5 => unord || !lt,
            6 => unord || gt,
            7 => !unord,
            8 => unord || eq,
            9 => unord || lt,
            10 => unord || lt || eq,
            11 => false,
            12 => !unord && !eq,
            13 => gt || eq,
            14 => gt,
            _ => true,
        }
    }

    /// (U)COMIS: ZF/PF/CF as the x86 flags word, IE for SNaN (any NaN when `signaling`).
    pub(crate) fn comis<T: Fmt>(&mut self, signaling: bool, a: u64, b: u64) -> u64 {
        use crate::cpu::{CF, PF, ZF};
        if T::is_nan(a) || T::is_nan(b) {
            if signaling || T::is_snan(a) || T::is_snan(b) {
                self.flags |= IE;
            }
            return ZF | PF | CF;
        }
        let (a, b) = (self.input::<T>(a), self.input::<T>(b));
        let (x, y) = (T::f(a), T::f(b));
        if x < y {
            CF
        } else if x == y {
            ZF
        } else {
            0
        }
    }

    /// Square root.
    pub(crate) fn sqrt<T: Fmt>(&mut self, b: u64) -> u64 {
        if T::is_nan(b) {
            if T::is_snan(b) {
                self.flags |= IE;
            }
            return T::quiet(b) & T::MASK;
        }
        if b & T::SIGN != 0 && !T::is_zero(self.input_quiet::<T>(b)) {
            // Invalid; a negative denormal reports no DE.
            self.flags |= IE;
            return T::DEFAULT_NAN;
        }
        let b = self.input::<T>(b);
        if T::is_zero(b) {
            return b;
        }
        if T::is_inf(b) {
            return b;
        }
        let rc = (self.mxcsr >> 13) & 3;
        // Nearest result and the sign of (result^2 - b), both exact.
        let (r, ord) = if T::BITS == 32 {
            let x = f64::from(f32::from_bits(b as u32));
            let r = x.sqrt() as f32;
            let sq = f64::from(r) * f64::from(r);
            (u64::from(r.to_bits()), sq.partial_cmp(&x))
        } else {
            let x = f64::from_bits(b);
            let r = x.sqrt();
            let q = |v: f64| -> Quad {
                Double::from_bits(u128::from(v.to_bits()))
                    .convert(&mut false)
                    .value
            };
            let sq = (q(r) * q(r)).value;
            (r.to_bits(), sq.partial_cmp(&q(x)))
        };
        let ord = ord.unwrap_or(core::cmp::Ordering::Equal);
        if ord == core::cmp::Ordering::Equal {
            return r;
        }
        self.flags |= PE;
        // r > sqrt(b) when r^2 > b. Results are positive: down/zero step below, up above.
        match (rc, ord) {
            (1 | 3, core::cmp::Ordering::Greater) => r - 1,
            (2, core::cmp::Ordering::Less) => r + 1,
            _ => r,
        }
    }

    /// Round to an integral value in mode `rc` (0..3); `quiet_pe` suppresses PE (ROUNDxx imm[3]).
    pub(crate) fn round_int<T: Fmt>(&mut self, rc: u32, quiet_pe: bool, b: u64) -> u64 {
        if T::is_nan(b) {
            if T::is_snan(b) {
                self.flags |= IE;
            }
            return T::quiet(b) & T::MASK;
        }
        let b = self.input_quiet::<T>(b);
        let r = T::f(b).round_to_integral(rc_round(rc));
        if r.status.intersects(Status::INEXACT) && !quiet_pe {
            self.flags |= PE;
        }
        // Keep the sign of a value rounded to zero.
        T::bits(r.value) | (b & T::SIGN)
    }

    /// Float to signed integer of `width` bits (32 or 64): MXCSR rounding, or truncation.
    /// NaN and out of range give the "integer indefinite" (the most negative value) and IE.
    pub(crate) fn cvt_to_int<T: Fmt>(&mut self, truncate: bool, width: usize, b: u64) -> u64 {
        let indefinite = 1u64 << (width - 1);
        if T::is_nan(b) {
            self.flags |= IE;
            return indefinite;
        }
        let b = self.input_quiet::<T>(b);
        let rnd = if truncate {
            Round::TowardZero
        } else {
            self.round()
        };
        let mut exact = true;
        let r = T::f(b).to_i128_r(width, rnd, &mut exact);
        if r.status.intersects(Status::INVALID_OP) {
            self.flags |= IE;
            return indefinite;
        }
        if r.status.intersects(Status::INEXACT) || (!exact && !T::is_zero(b)) {
            self.flags |= PE;
        }
        let m = if width == 64 {
            u64::MAX
        } else {
            (1u64 << width) - 1
        };
        (r.value as u64) & m
    }

    /// Signed integer to float, MXCSR rounding.
    pub(crate) fn cvt_from_int<T: Fmt>(&mut self, v: i64) -> u64 {
        let r = T::F::from_i128_r(i128::from(v), self.round());
        if r.status.intersects(Status::INEXACT) {
            self.flags |= PE;
        }
        T::bits(r.value)
    }

    /// Single to double (exact; SNaN quieted with IE, DE/DAZ for denormals).
    pub(crate) fn s2d(&mut self, b: u64) -> u64 {
        let b = b & 0xffff_ffff;
        if S32::is_nan(b) {
            if S32::is_snan(b) {
                self.flags |= IE;
            }
            let q = S32::quiet(b);
            return ((q & S32::SIGN) << 32) | S64::EXP | ((q & S32::FRAC) << 29);
        }
        let b = self.input::<S32>(b);
        f64::from(f32::from_bits(b as u32)).to_bits()
    }

    /// Double to single, MXCSR rounding, overflow/underflow/precision.
    pub(crate) fn d2s(&mut self, b: u64) -> u64 {
        if S64::is_nan(b) {
            if S64::is_snan(b) {
                self.flags |= IE;
            }
            let q = S64::quiet(b);
            return ((q >> 32) & S32::SIGN) | S32::EXP | ((q & S64::FRAC) >> 29);
        }
        let b = self.input::<S64>(b);
        let rnd = self.round();
        let x = S64::f(b);
        let r: StatusAnd<Single> = x.convert_r(rnd, &mut false);
        self.result::<S32>(r, || x.convert_r(rnd, &mut false))
    }
}

/// The host's arithmetic where it provably gives the same bits and flags: MXCSR at its default
/// control (all masked, round to nearest, no DAZ/FTZ) with PE already set (sticky, so
/// inexactness needs no report), both operands normal or zero, and a result that is zero or
/// normal, finite and above the smallest normal (so no IE, DE, ZE, OE or UE can have
/// occurred: those need a NaN, an infinity, a denormal operand, a zero divisor with an
/// infinite result, or a result at the edge of or outside the normal range). IEEE round-to-nearest results are unique, so the bits are the same.
fn fast_arith<T: Fmt>(mxcsr: u32, op: Op, a: u64, b: u64) -> Option<u64> {
    if mxcsr & 0xffe0 != 0x1fa0 {
        return None;
    }
    let plain = |x: u64| {
        let e = x & T::EXP;
        (e != 0 && e != T::EXP) || T::is_zero(x)
    };
    if !plain(a) || !plain(b) {
        return None;
    }
    let r = if T::BITS == 32 {
        let (x, y) = (f32::from_bits(a as u32), f32::from_bits(b as u32));
        let r = match op {
            Op::Add => x + y,
            Op::Sub => x - y,
            Op::Mul => x * y,
            Op::Div => x / y,
        };
        u64::from(r.to_bits())
    } else {
        let (x, y) = (f64::from_bits(a), f64::from_bits(b));
        let r = match op {
            Op::Add => x + y,
            Op::Sub => x - y,
            Op::Mul => x * y,
            Op::Div => x / y,
        };
        r.to_bits()
    };
    // A zero result must be exact: only x - x style cancellations (not an underflow to 0,
    // which is inexact and tiny) and products/quotients with a zero operand.
    let zero_ok = T::is_zero(r)
        && match op {
            Op::Add | Op::Sub => true,
            Op::Mul => T::is_zero(a) || T::is_zero(b),
            Op::Div => T::is_zero(a) && !T::is_zero(b),
        };
    // The smallest normal may be a tiny result rounded up (UE after rounding): not here.
    let edge = r & !T::SIGN & T::MASK == T::MIN_NORMAL;
    (plain(r) && !edge && (!T::is_zero(r) || zero_ok)).then_some(r)
}
