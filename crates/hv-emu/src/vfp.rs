//! IEEE single/double arithmetic as SSE/AVX performs it: MXCSR rounding control, DAZ/FTZ,
//! x86 NaN propagation and the six exception flags.
//!
//! Results come from the host's correctly rounded round-to-nearest operations (`+ - * /`,
//! `sqrt`, `mul_add` are exact IEEE operations in Rust); the exact error of each (error-free
//! transformations: TwoSum, an FMA residual, Boldo-Muller for FMA) tells whether the result is
//! inexact and which way it must move for the other rounding modes. Written here rather than
//! taken from a soft-float crate because the crates we could use do not model x86's NaN
//! selection, DAZ/FTZ and tininess-after-rounding together, and this keeps emu dependency-free.

pub const IE: u32 = 1;
pub const DE: u32 = 2;
pub const ZE: u32 = 4;
pub const OE: u32 = 8;
pub const UE: u32 = 16;
pub const PE: u32 = 32;
pub const DAZ: u32 = 1 << 6;
pub const FTZ: u32 = 1 << 15;

/// One instruction's floating-point environment: MXCSR controls in, flags out.
#[derive(Clone, Copy, Debug)]
pub struct Env {
    pub mxcsr: u32,
    /// Rounding control: 0 nearest, 1 down, 2 up, 3 toward zero.
    pub rc: u32,
    pub flags: u32,
    /// Flags of the finished steps of a multi-step instruction (VDPPS/VDPPD): recorded in
    /// full when a later step traps.
    done: u32,
    /// A denormal operand of the element being computed: reported (DE) only when no NaN
    /// operand, invalid operation or division by zero takes precedence over it.
    pend_de: bool,
}

impl Env {
    pub fn new(mxcsr: u32) -> Env {
        Env {
            mxcsr,
            rc: (mxcsr >> 13) & 3,
            flags: 0,
            done: 0,
            pend_de: false,
        }
    }
    fn daz_on(&self) -> bool {
        self.mxcsr & DAZ != 0
    }
    fn ftz(&self) -> bool {
        self.mxcsr & FTZ != 0
    }
    /// Exceptions raised whose mask bit is clear.
    pub fn unmasked(&self) -> u32 {
        self.flags & !(self.mxcsr >> 7) & 0x3f
    }
    /// The flags MXCSR records: when an unmasked pre-computation exception (IE, DE, ZE) traps,
    /// the step's post-computation flags (OE, UE, PE of its other elements) are not; a
    /// finished earlier step's flags all are.
    pub fn recorded(&self) -> u32 {
        let f = self.flags & 0x3f;
        let f = if self.unmasked() & (IE | DE | ZE) != 0 {
            f & (IE | DE | ZE)
        } else {
            f
        };
        f | (self.done & 0x3f)
    }
    /// Ends one step of a multi-step instruction: true when it raised an unmasked exception
    /// (the instruction stops there), else its flags become a finished step's.
    pub fn end_step(&mut self) -> bool {
        if self.unmasked() != 0 {
            return true;
        }
        self.done |= std::mem::take(&mut self.flags);
        false
    }
}

/// A binary floating-point format (f32 or f64) seen through its bits.
pub trait Fl:
    Copy
    + PartialEq
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
{
    const BITS: u32;
    const MANT: u32;
    const MAX: Self;
    fn bits(self) -> u64;
    fn from_bits64(b: u64) -> Self;
    fn fma(self, b: Self, c: Self) -> Self;
    fn sqrt_(self) -> Self;
    fn is_nan_(self) -> bool;
    fn is_inf(self) -> bool;
    fn is_finite_(self) -> bool {
        !self.is_inf() && !self.is_nan_()
    }
    fn next_up_(self) -> Self;
    fn next_down_(self) -> Self;
    fn to_f64(self) -> f64;
    fn from_f64_rne(v: f64) -> Self;
    fn sign_bit() -> u64 {
        1 << (Self::BITS - 1)
    }
    fn qbit() -> u64 {
        1 << (Self::MANT - 1)
    }
    fn exp_mask() -> u64 {
        ((1u64 << (Self::BITS - 1 - Self::MANT)) - 1) << Self::MANT
    }
    fn is_snan(self) -> bool {
        self.is_nan_() && self.bits() & Self::qbit() == 0
    }
    fn is_denormal(self) -> bool {
        let b = self.bits();
        b & Self::exp_mask() == 0 && b & ((1u64 << Self::MANT) - 1) != 0
    }
    fn is_zero(self) -> bool {
        self.bits() & !Self::sign_bit() == 0
    }
    fn neg_(self) -> bool {
        self.bits() & Self::sign_bit() != 0
    }
    fn quiet(self) -> Self {
        Self::from_bits64(self.bits() | Self::qbit())
    }
    /// The x86 "QNaN floating-point indefinite".
    fn indefinite() -> Self {
        Self::from_bits64(Self::sign_bit() | Self::exp_mask() | Self::qbit())
    }
    fn signed_zero(neg: bool) -> Self {
        Self::from_bits64(if neg { Self::sign_bit() } else { 0 })
    }
    fn inf(neg: bool) -> Self {
        Self::from_bits64(Self::exp_mask() | if neg { Self::sign_bit() } else { 0 })
    }
}

impl Fl for f32 {
    const BITS: u32 = 32;
    const MANT: u32 = 23;
    const MAX: f32 = f32::MAX;
    fn bits(self) -> u64 {
        u64::from(self.to_bits())
    }
    fn from_bits64(b: u64) -> f32 {
        f32::from_bits(b as u32)
    }
    fn fma(self, b: f32, c: f32) -> f32 {
        self.mul_add(b, c)
    }
    fn sqrt_(self) -> f32 {
        self.sqrt()
    }
    fn is_nan_(self) -> bool {
        self.is_nan()
    }
    fn is_inf(self) -> bool {
        self.is_infinite()
    }
    fn next_up_(self) -> f32 {
        self.next_up()
    }
    fn next_down_(self) -> f32 {
        self.next_down()
    }
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn from_f64_rne(v: f64) -> f32 {
        v as f32
    }
}

impl Fl for f64 {
    const BITS: u32 = 64;
    const MANT: u32 = 52;
    const MAX: f64 = f64::MAX;
    fn bits(self) -> u64 {
        self.to_bits()
    }
    fn from_bits64(b: u64) -> f64 {
        f64::from_bits(b)
    }
    fn fma(self, b: f64, c: f64) -> f64 {
        self.mul_add(b, c)
    }
    fn sqrt_(self) -> f64 {
        self.sqrt()
    }
    fn is_nan_(self) -> bool {
        self.is_nan()
    }
    fn is_inf(self) -> bool {
        self.is_infinite()
    }
    fn next_up_(self) -> f64 {
        self.next_up()
    }
    fn next_down_(self) -> f64 {
        self.next_down()
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64_rne(v: f64) -> f64 {
        v
    }
}

/// 2^32 in the format.
fn scale<F: Fl>() -> F {
    let bias = (1u64 << (F::BITS - 2 - F::MANT)) - 1;
    F::from_bits64((bias + 32) << F::MANT)
}

/// 2^-32 in `F` (to recompute an overflowing operation in range).
fn scale_down<F: Fl>() -> F {
    let bias = (1u64 << (F::BITS - 2 - F::MANT)) - 1;
    F::from_bits64((bias - 32) << F::MANT)
}

/// Sign of a value as -1, 0, 1 (for error terms; NaN never reaches here).
fn sgn<F: Fl>(v: F) -> i32 {
    if v.is_zero() {
        0
    } else if v.neg_() {
        -1
    } else {
        1
    }
}

impl Env {
    /// Input denormal handling: DAZ turns it into a signed zero, otherwise it raises DE.
    pub fn input<F: Fl>(&mut self, v: F) -> F {
        if v.is_denormal() {
            if self.daz_on() {
                return F::signed_zero(v.neg_());
            }
            self.pend_de = true;
        }
        v
    }

    /// Computes one element: the denormal-operand flag its inputs raised is reported unless
    /// an operand is a NaN or the operation raised IE or ZE (SDM exception precedence).
    fn elem<F: Fl>(&mut self, ops: &[F], f: impl FnOnce(&mut Env) -> F) -> F {
        let before = self.flags;
        self.flags = 0;
        self.pend_de = false;
        let r = f(self);
        if self.pend_de && self.flags & (IE | ZE) == 0 && !ops.iter().any(|v| v.is_nan_()) {
            self.flags |= DE;
        }
        self.pend_de = false;
        self.flags |= before;
        r
    }

    /// NaN operands: IE for an SNaN; the result is the first NaN operand, quieted.
    fn nan2<F: Fl>(&mut self, a: F, b: F) -> Option<F> {
        if !a.is_nan_() && !b.is_nan_() {
            return None;
        }
        if a.is_snan() || b.is_snan() {
            self.flags |= IE;
        }
        Some(if a.is_nan_() { a.quiet() } else { b.quiet() })
    }

    /// Whether an operation whose round-to-nearest result `r` overflowed to infinity overflows
    /// in the current mode too. A mode that rounds toward zero for the result's sign (RZ, RD of
    /// a positive, RU of a negative result) gives ±MAX without OE when the exact value is below
    /// 2^(EMAX+1) (as the CPU does: overflow is decided after rounding to an unbounded
    /// exponent). `down` recomputes the operation scaled by 2^-32: (result, its error's sign).
    fn overflows<F: Fl>(&self, r: F, down: &dyn Fn() -> (F, i32)) -> bool {
        let neg = r.neg_();
        let toward_zero = match self.rc {
            3 => true,
            1 => !neg,
            2 => neg,
            _ => false,
        };
        if !toward_zero {
            return true;
        }
        let (s, e) = down();
        // 2^(EMAX+1) scaled by 2^-32: the biased exponent of infinity, minus 32.
        let inf_exp = (1u64 << (F::BITS - 1 - F::MANT)) - 1;
        let t = (inf_exp - 32) << F::MANT;
        let mag = s.bits() & !F::sign_bit();
        // The error points toward zero when it has the opposite sign of the result.
        let below = if neg { e > 0 } else { e < 0 };
        mag > t || (mag == t && !below)
    }

    /// ±MAX for a result that rounds toward zero below 2^(EMAX+1): inexact, no overflow.
    fn max_inexact<F: Fl>(&mut self, r: F) -> F {
        self.flags |= PE;
        if r.neg_() { -F::MAX } else { F::MAX }
    }

    /// Rounds the RNE result `r` whose exact value is `r + err` (err's sign `e`) into the
    /// current mode, and applies overflow, underflow and inexact rules. `ovf`: `r` is infinite
    /// although the exact result is finite.
    fn finish<F: Fl>(&mut self, r: F, e: i32, ovf: bool) -> F {
        self.finish_u(r, e, ovf, &|| None)
    }

    /// Rounds in the current mode (see [`Env::finish`]); `unb` recomputes the operation scaled
    /// by 2^32 (the result and its error's sign), which decides tininess for a result that
    /// rounded to ±MIN_POSITIVE: x86 detects tininess after rounding to an unbounded
    /// exponent.
    fn finish_u<F: Fl>(
        &mut self,
        r: F,
        e: i32,
        ovf: bool,
        unb: &dyn Fn() -> Option<(F, i32)>,
    ) -> F {
        if ovf {
            self.flags |= OE | PE;
            let neg = r.neg_();
            let to_inf = match self.rc {
                0 => true,
                1 => neg,
                2 => !neg,
                _ => false,
            };
            return if to_inf {
                F::inf(neg)
            } else if neg {
                -F::MAX
            } else {
                F::MAX
            };
        }
        let rne = r;
        let mut r = r;
        if e != 0 {
            self.flags |= PE;
            r = match self.rc {
                1 if e < 0 => r.next_down_(),
                2 if e > 0 => r.next_up_(),
                3 if (e < 0 && !r.neg_() && !r.is_zero())
                    || (e > 0 && r.neg_() && !r.is_zero()) =>
                {
                    if r.neg_() {
                        r.next_up_()
                    } else {
                        r.next_down_()
                    }
                }
                _ => r,
            };
            if r.is_inf() {
                self.flags |= OE;
            }
            if r.is_zero() {
                // A zero from a non-zero exact value has the exact value's sign (that of the
                // nearest result when it is not zero itself).
                r = F::signed_zero(if rne.is_zero() { e < 0 } else { rne.neg_() });
            }
        }
        let mut tiny = (r.is_zero() && e != 0) || r.is_denormal();
        if !tiny
            && e != 0
            && r.bits() & !F::sign_bit() == 1 << F::MANT
            && let Some((su, eu)) = unb()
        {
            let ru = self.directed(su, eu);
            let threshold = 33u64 << F::MANT;
            tiny = ru.bits() & !F::sign_bit() < threshold;
        }
        if tiny {
            // Masked underflow is reported for inexact tiny results; unmasked, for every tiny
            // result (which then faults without writing).
            let um = self.mxcsr & (UE << 7) == 0;
            if self.ftz() && !um {
                self.flags |= UE | PE;
                return F::signed_zero(r.neg_());
            }
            if e != 0 || um {
                self.flags |= UE;
            }
        }
        r
    }

    /// `r` (round-to-nearest, exact value on the side `e`) moved to the current mode.
    fn directed<F: Fl>(&self, r: F, e: i32) -> F {
        match self.rc {
            1 if e < 0 => r.next_down_(),
            2 if e > 0 => r.next_up_(),
            3 if (e < 0 && !r.neg_() && !r.is_zero()) || (e > 0 && r.neg_() && !r.is_zero()) => {
                if r.neg_() {
                    r.next_up_()
                } else {
                    r.next_down_()
                }
            }
            _ => r,
        }
    }

    pub fn add<F: Fl>(&mut self, a: F, b: F) -> F {
        self.elem(&[a, b], |e| e.add_(a, b))
    }

    fn add_<F: Fl>(&mut self, a: F, b: F) -> F {
        let (a, b) = (self.input(a), self.input(b));
        if let Some(n) = self.nan2(a, b) {
            return n;
        }
        if a.is_inf() && b.is_inf() && a.neg_() != b.neg_() {
            self.flags |= IE;
            return F::indefinite();
        }
        let s = a + b;
        if s.is_inf() {
            if a.is_inf() || b.is_inf() {
                return s;
            }
            let down = || {
                let k = scale_down::<F>();
                let (x, y) = (a * k, b * k);
                let t = x + y;
                let bb = t - x;
                (t, sgn((x - (t - bb)) + (y - bb)))
            };
            if !self.overflows(s, &down) {
                return self.max_inexact(s);
            }
            return self.finish(s, 0, true);
        }
        // TwoSum: exact error of the rounded sum.
        let bb = s - a;
        let err = (a - (s - bb)) + (b - bb);
        let mut r = self.finish(s, sgn(err), false);
        if s.is_zero() && sgn(err) == 0 {
            // Exact zero sum of opposite values: +0, or -0 when rounding down.
            if !(a.is_zero() && b.is_zero() && a.neg_() == b.neg_()) {
                r = F::signed_zero(self.rc == 1);
            }
        }
        r
    }

    pub fn sub<F: Fl>(&mut self, a: F, b: F) -> F {
        self.elem(&[a, b], |e| e.sub_(a, b))
    }

    fn sub_<F: Fl>(&mut self, a: F, b: F) -> F {
        let (a, b) = (self.input(a), self.input(b));
        if let Some(n) = self.nan2(a, b) {
            return n;
        }
        // The inputs are already DAZ-filtered and DE-checked; `add` repeats both harmlessly.
        self.add_(a, -b)
    }

    pub fn mul<F: Fl>(&mut self, a: F, b: F) -> F {
        self.elem(&[a, b], |e| e.mul_(a, b))
    }

    fn mul_<F: Fl>(&mut self, a: F, b: F) -> F {
        let (a, b) = (self.input(a), self.input(b));
        if let Some(n) = self.nan2(a, b) {
            return n;
        }
        if (a.is_inf() && b.is_zero()) || (a.is_zero() && b.is_inf()) {
            self.flags |= IE;
            return F::indefinite();
        }
        let p = a * b;
        if a.is_inf() || b.is_inf() {
            return p;
        }
        if p.is_inf() {
            let down = || {
                let k = scale_down::<F>();
                let (x, y) = if a.bits() & !F::sign_bit() >= b.bits() & !F::sign_bit() {
                    (a * k, b)
                } else {
                    (a, b * k)
                };
                let t = x * y;
                (t, sgn(x.fma(y, -t)))
            };
            if !self.overflows(p, &down) {
                return self.max_inexact(p);
            }
            return self.finish(p, 0, true);
        }
        let err = a.fma(b, -p);
        let e = if (err.is_zero() || err.is_denormal()) && !p.is_zero() {
            // The residual of a subnormal product may itself underflow to zero: check exactly
            // in the wider format.
            exact_mul_sign(a, b, p)
        } else if p.is_zero() && !a.is_zero() && !b.is_zero() {
            if a.neg_() != b.neg_() { -1 } else { 1 }
        } else {
            sgn(err)
        };
        self.finish_u(p, e, false, &|| {
            let k = scale::<F>();
            let (x, y) = if a.bits() & !F::sign_bit() <= b.bits() & !F::sign_bit() {
                (a * k, b)
            } else {
                (a, b * k)
            };
            let p = x * y;
            let err = x.fma(y, -p);
            (!p.is_inf()).then(|| {
                (
                    p,
                    if err.is_zero() {
                        exact_mul_sign(x, y, p)
                    } else {
                        sgn(err)
                    },
                )
            })
        })
    }

    pub fn div<F: Fl>(&mut self, a: F, b: F) -> F {
        self.elem(&[a, b], |e| e.div_(a, b))
    }

    fn div_<F: Fl>(&mut self, a: F, b: F) -> F {
        let (a, b) = (self.input(a), self.input(b));
        if let Some(n) = self.nan2(a, b) {
            return n;
        }
        if (a.is_zero() && b.is_zero()) || (a.is_inf() && b.is_inf()) {
            self.flags |= IE;
            return F::indefinite();
        }
        if b.is_zero() {
            if !a.is_inf() {
                self.flags |= ZE;
            }
            return F::inf(a.neg_() != b.neg_());
        }
        let q = a / b;
        if a.is_inf() || b.is_inf() {
            return q;
        }
        if q.is_inf() {
            return self.finish(q, 0, true);
        }
        let e = if q.is_zero() {
            if a.is_zero() {
                0
            } else if a.neg_() != b.neg_() {
                -1
            } else {
                1
            }
        } else {
            // a - q*b has the sign of (exact - q) * b.
            let rem = (-q).fma(b, a);
            let s = sgn(rem);
            if s == 0 || rem.is_denormal() {
                // The residual may have underflowed: decide exactly.
                exact_div_sign(a, b, q)
            } else if b.neg_() {
                -s
            } else {
                s
            }
        };
        self.finish_u(q, e, false, &|| {
            let x = a * scale::<F>();
            let q = x / b;
            (!q.is_inf()).then(|| (q, exact_div_sign(x, b, q)))
        })
    }

    pub fn sqrt<F: Fl>(&mut self, a: F) -> F {
        self.elem(&[a], |e| e.sqrt_(a))
    }

    fn sqrt_<F: Fl>(&mut self, a: F) -> F {
        let a = self.input(a);
        if a.is_nan_() {
            if a.is_snan() {
                self.flags |= IE;
            }
            return a.quiet();
        }
        if a.is_zero() {
            return a;
        }
        if a.neg_() {
            self.flags |= IE;
            return F::indefinite();
        }
        if a.is_inf() {
            return a;
        }
        let r = a.sqrt_();
        let rem = (-r).fma(r, a);
        let e = if rem.is_zero() || rem.is_denormal() {
            exact_sign(&[signed_term(a, false), signed_prod(r, r, true)])
        } else {
            sgn(rem)
        };
        self.finish(r, e, false)
    }

    /// a*b + c with one rounding. NaN selection follows the operand order given (the caller
    /// passes the instruction's operands in encoding order as `order`).
    pub fn fma<F: Fl>(&mut self, a: F, b: F, c: F, order: [F; 3]) -> F {
        self.elem(&[a, b, c], |e| e.fma_(a, b, c, order))
    }

    fn fma_<F: Fl>(&mut self, a: F, b: F, c: F, order: [F; 3]) -> F {
        let (a, b, c) = (self.input(a), self.input(b), self.input(c));
        if a.is_nan_() || b.is_nan_() || c.is_nan_() {
            // inf * 0 with a quiet NaN addend is not invalid (as on Intel CPUs).
            if a.is_snan() || b.is_snan() || c.is_snan() {
                self.flags |= IE;
            }
            for v in order {
                if v.is_nan_() {
                    return v.quiet();
                }
            }
            return F::indefinite();
        }
        if (a.is_inf() && b.is_zero()) || (a.is_zero() && b.is_inf()) {
            self.flags |= IE;
            return F::indefinite();
        }
        let p_inf = a.is_inf() || b.is_inf();
        if p_inf && c.is_inf() && ((a.neg_() != b.neg_()) != c.neg_()) {
            self.flags |= IE;
            return F::indefinite();
        }
        let r = a.fma(b, c);
        if p_inf || c.is_inf() {
            return r;
        }
        if r.is_inf() {
            let down = || {
                let k = scale_down::<F>();
                // Scale the larger factor (the smaller one may be tiny).
                let (x, y) = if a.bits() & !F::sign_bit() >= b.bits() & !F::sign_bit() {
                    (a * k, b)
                } else {
                    (a, b * k)
                };
                let z = c * k;
                let t = x.fma(y, z);
                (t, exact_fma_sign(x, y, z, t))
            };
            if !self.overflows(r, &down) {
                return self.max_inexact(r);
            }
            return self.finish(r, 0, true);
        }
        // The exact error's sign (a*b + c - r), from an exact fixed-point sum.
        let e = exact_fma_sign(a, b, c, r);
        let unb = || {
            let k = scale::<F>();
            let (x, y) = if a.bits() & !F::sign_bit() <= b.bits() & !F::sign_bit() {
                (a * k, b)
            } else {
                (a, b * k)
            };
            let z = c * k;
            let r = x.fma(y, z);
            (r.is_finite_()).then(|| (r, exact_fma_sign(x, y, z, r)))
        };
        let mut out = self.finish_u(r, e, false, &unb);
        if r.is_zero() && e == 0 {
            // Exact zero: sign per IEEE (x + -x = +0 except when rounding down).
            let pneg = a.neg_() != b.neg_();
            let pz = a.is_zero() || b.is_zero();
            if !(pz && c.is_zero() && pneg == c.neg_()) {
                out = F::signed_zero(self.rc == 1);
            } else {
                out = F::signed_zero(pneg);
            }
        }
        out
    }

    /// Rounds `v` to an integral value of the same format in mode `rc`; `pe`: report inexact.
    pub fn round_int<F: Fl>(&mut self, v: F, rc: u32, pe: bool) -> F {
        let v = self.daz(v);
        if v.is_nan_() {
            if v.is_snan() {
                self.flags |= IE;
            }
            return v.quiet();
        }
        if v.is_inf() || v.is_zero() {
            return v;
        }
        let x = v.to_f64();
        let r = match rc & 3 {
            0 => x.round_ties_even(),
            1 => x.floor(),
            2 => x.ceil(),
            _ => x.trunc(),
        };
        if r != x && pe {
            self.flags |= PE;
        }
        let out = F::from_f64_rne(r);
        if out.is_zero() {
            F::signed_zero(v.neg_())
        } else {
            out
        }
    }

    /// Float to signed integer of `bits` (32 or 64) in mode `rc`; out of range or NaN gives
    /// the integer indefinite with IE.
    pub fn float_to_int<F: Fl>(&mut self, v: F, bits: u32, rc: u32) -> u64 {
        let indefinite = 1u64 << (bits - 1);
        if v.is_nan_() {
            self.flags |= IE;
            return indefinite;
        }
        let v = self.daz(v);
        let x = v.to_f64();
        let r = match rc & 3 {
            0 => x.round_ties_even(),
            1 => x.floor(),
            2 => x.ceil(),
            _ => x.trunc(),
        };
        let lim = 2f64.powi(bits as i32 - 1);
        if !(r >= -lim && r < lim) || r.is_nan() {
            self.flags |= IE;
            return indefinite;
        }
        if r != x {
            self.flags |= PE;
        }
        let m = if bits == 64 {
            u64::MAX
        } else {
            u64::from(u32::MAX)
        };
        (r as i64 as u64) & m
    }

    /// Signed integer to float (correctly rounded on the host, then moved to `rc`).
    pub fn int_to_float<F: Fl>(&mut self, v: i64) -> F {
        let r = if F::BITS == 32 {
            F::from_bits64(u64::from((v as f32).to_bits()))
        } else {
            F::from_bits64((v as f64).to_bits())
        };
        let e = (i128::from(v) - r.to_f64() as i128).signum() as i32;
        self.finish(r, e, false)
    }

    /// DAZ without the denormal flag (conversions and ROUND raise no DE).
    pub fn daz<F: Fl>(&self, v: F) -> F {
        if v.is_denormal() && self.daz_on() {
            F::signed_zero(v.neg_())
        } else {
            v
        }
    }

    /// Double to single (cvtsd2ss/cvtpd2ps).
    pub fn narrow(&mut self, v: f64) -> f32 {
        let mut out = 0f32;
        self.elem(&[v], |e| {
            out = e.narrow_(v);
            v
        });
        out
    }

    fn narrow_(&mut self, v: f64) -> f32 {
        let v = self.input(v);
        if v.is_nan() {
            if v.is_snan() {
                self.flags |= IE;
            }
            let q = v.to_bits() | (1 << 51);
            let sign = ((q >> 63) as u32) << 31;
            return f32::from_bits(sign | 0x7fc0_0000 | ((q >> 29) as u32 & 0x003f_ffff));
        }
        if v.is_infinite() || v == 0.0 {
            return v as f32;
        }
        let r = v as f32;
        if r.is_infinite() {
            return self.finish(r, 0, true);
        }
        let sgn64 = |d: f64| {
            if d > 0.0 {
                1
            } else if d < 0.0 {
                -1
            } else {
                0
            }
        };
        let e = sgn64(v - f64::from(r));
        self.finish_u(r, e, false, &|| {
            let x = v * 2f64.powi(32);
            let r = x as f32;
            r.is_finite().then(|| (r, sgn64(x - f64::from(r))))
        })
    }

    /// Single to double (cvtss2sd/cvtps2pd): exact.
    pub fn widen(&mut self, v: f32) -> f64 {
        let mut out = 0f64;
        self.elem(&[v], |e| {
            out = e.widen_(v);
            v
        });
        out
    }

    fn widen_(&mut self, v: f32) -> f64 {
        let v = self.input(v);
        if v.is_nan() {
            if v.is_snan() {
                self.flags |= IE;
            }
            let b = u64::from(v.to_bits() | 0x0040_0000);
            return f64::from_bits(((b >> 31) << 63) | (0x7ff << 52) | ((b & 0x7f_ffff) << 29));
        }
        f64::from(v)
    }

    /// The operands of a compare: DAZ, DE and (for signaling predicates or any SNaN) IE.
    pub fn cmp_inputs<F: Fl>(&mut self, a: F, b: F, signaling: bool) -> (F, F) {
        let mut out = (a, b);
        self.elem(&[a, b], |e| {
            out = (e.input(a), e.input(b));
            if a.is_snan() || b.is_snan() || (signaling && (a.is_nan_() || b.is_nan_())) {
                e.flags |= IE;
            }
            a
        });
        out
    }

    /// MIN/MAX: the second operand when either is NaN or both are zero (IE for any NaN).
    pub fn minmax<F: Fl>(&mut self, a: F, b: F, max: bool) -> F {
        let (a, b) = self.cmp_inputs(a, b, true);
        if a.is_nan_() || b.is_nan_() {
            return b;
        }
        let pick_a = if max { a > b } else { a < b };
        if pick_a { a } else { b }
    }
}

/// sign(a*b - p) for the rounded product p, exactly.
fn exact_mul_sign<F: Fl>(a: F, b: F, p: F) -> i32 {
    let sp = a.neg_() != b.neg_();
    exact_sign(&[signed_prod(a, b, sp), signed_term(p, !p.neg_())])
}

/// sign(a/b - q) for the rounded quotient q, exactly: the sign of (a - q*b) / b.
fn exact_div_sign<F: Fl>(a: F, b: F, q: F) -> i32 {
    let rem = exact_sign(&[
        signed_term(a, a.neg_()),
        signed_prod(q, b, q.neg_() == b.neg_()),
    ]);
    if b.neg_() { -rem } else { rem }
}

/// sign(a*b + c - r), exactly.
fn exact_fma_sign<F: Fl>(a: F, b: F, c: F, r: F) -> i32 {
    exact_sign(&[
        signed_prod(a, b, a.neg_() != b.neg_()),
        signed_term(c, c.neg_()),
        signed_term(r, !r.neg_()),
    ])
}

/// (negative, significand, exponent) of |v| (finite), as a term of an exact sum.
fn signed_term<F: Fl>(v: F, neg: bool) -> (bool, u128, i32) {
    let (m, e) = decompose(v);
    (neg, u128::from(m), e)
}

fn signed_prod<F: Fl>(a: F, b: F, neg: bool) -> (bool, u128, i32) {
    let (ma, ea) = decompose(a);
    let (mb, eb) = decompose(b);
    (neg, u128::from(ma) * u128::from(mb), ea + eb)
}

/// The sign of a sum of terms ±m·2^e computed exactly in a fixed-point accumulator wide enough
/// for every double (products included): 72 limbs of 64 bits, two's complement.
fn exact_sign(terms: &[(bool, u128, i32)]) -> i32 {
    const LIMBS: usize = 72;
    let emin = terms
        .iter()
        .filter(|t| t.1 != 0)
        .map(|t| t.2)
        .min()
        .unwrap_or(0);
    let mut acc = [0u64; LIMBS];
    for &(neg, m, e) in terms {
        if m == 0 {
            continue;
        }
        let sh = (e - emin) as usize;
        // The term as limbs, then added or subtracted.
        let mut t = [0u64; LIMBS];
        let (w, b) = (sh / 64, sh % 64);
        let lo = m << b;
        let mid = if b == 0 { 0 } else { m >> (128 - b) };
        for (k, part) in [lo as u64, (lo >> 64) as u64, mid as u64]
            .into_iter()
            .enumerate()
        {
            if let Some(x) = t.get_mut(w + k) {
                *x = part;
            }
        }
        let mut carry = 0u128;
        if neg {
            // acc - t = acc + !t + 1
            carry = 1;
            for x in t.iter_mut() {
                *x = !*x;
            }
        }
        for (x, y) in acc.iter_mut().zip(t.iter()) {
            let s = u128::from(*x) + u128::from(*y) + carry;
            *x = s as u64;
            carry = s >> 64;
        }
    }
    if acc.iter().all(|x| *x == 0) {
        0
    } else if acc[LIMBS - 1] >> 63 != 0 {
        -1
    } else {
        1
    }
}

/// |v| = m * 2^e with integer m.
fn decompose<F: Fl>(v: F) -> (u64, i32) {
    let b = v.bits() & !F::sign_bit();
    let exp = (b >> F::MANT) as i32;
    let frac = b & ((1u64 << F::MANT) - 1);
    let bias = (1i32 << (F::BITS - 2 - F::MANT)) - 1;
    if exp == 0 {
        (frac, 1 - bias - F::MANT as i32)
    } else {
        (frac | (1u64 << F::MANT), exp - bias - F::MANT as i32)
    }
}

/// IEEE half (binary16) to single: exact; an SNaN is quieted (IE).
pub fn half_to_single(h: u16, env: &mut Env) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let frac = u32::from(h & 0x3ff);
    let bits = if exp == 0x1f {
        if frac != 0 {
            if frac & 0x200 == 0 {
                env.flags |= IE;
            }
            sign | 0x7fc0_0000 | (frac << 13)
        } else {
            sign | 0x7f80_0000
        }
    } else if exp == 0 {
        if frac == 0 {
            sign
        } else {
            // Subnormal half: normalize.
            let shift = frac.leading_zeros() - 21;
            let f = (frac << shift) & 0x3ff;
            let e = 127 - 15 + 1 - shift;
            sign | (e << 23) | (f << 13)
        }
    } else {
        sign | ((exp + 127 - 15) << 23) | (frac << 13)
    };
    f32::from_bits(bits)
}

/// Single to half with rounding `rc` (VCVTPS2PH): flags IE (SNaN), OE, UE, PE, DE.
pub fn single_to_half(v: f32, rc: u32, env: &mut Env) -> u16 {
    let mut v0 = v;
    env.elem(&[v], |e| {
        v0 = e.input(v);
        v
    });
    let v = v0;
    let b = v.to_bits();
    let sign = ((b >> 31) as u16) << 15;
    if v.is_nan() {
        if b & 0x0040_0000 == 0 {
            env.flags |= IE;
        }
        return sign | 0x7e00 | ((b >> 13) as u16 & 0x1ff);
    }
    if v.is_infinite() {
        return sign | 0x7c00;
    }
    if v == 0.0 {
        return sign;
    }
    let neg = sign != 0;
    let a = f64::from(v.abs());
    let round = |x: f64| -> (f64, bool) {
        let fl = x.floor();
        let rem = x - fl;
        let up = match rc & 3 {
            0 => rem > 0.5 || (rem == 0.5 && fl % 2.0 != 0.0),
            1 => neg && rem > 0.0,
            2 => !neg && rem > 0.0,
            _ => false,
        };
        (fl + if up { 1.0 } else { 0.0 }, rem != 0.0)
    };
    let exp = ((a.to_bits() >> 52) & 0x7ff) as i32 - 1023;
    let ulp_exp = exp.max(-14) - 10;
    // Power-of-two scalings of a single are exact in f64.
    let (m, inexact) = round(a * 2f64.powi(-ulp_exp));
    let r = m * 2f64.powi(ulp_exp);
    if r > 65504.0 {
        env.flags |= OE | PE;
        let to_inf = match rc & 3 {
            0 => true,
            1 => neg,
            2 => !neg,
            _ => false,
        };
        return sign | if to_inf { 0x7c00 } else { 0x7bff };
    }
    let min_normal = 2f64.powi(-14);
    if inexact {
        env.flags |= PE;
        // Tininess after rounding: round with the normal precision and an unbounded exponent.
        let (m2, _) = round(a * 2f64.powi(10 - exp));
        if m2 * 2f64.powi(exp - 10) < min_normal {
            env.flags |= UE;
        }
    }
    let h = if r < min_normal {
        (r * 2f64.powi(24)) as u16
    } else {
        let e = ((r.to_bits() >> 52) & 0x7ff) as i32 - 1023;
        let frac = (r * 2f64.powi(10 - e)) as u32 - 1024;
        (((e + 15) as u16) << 10) | frac as u16
    };
    sign | h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64 for reproducible operands.
    fn rng(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn operand(s: &mut u64) -> f32 {
        let r = rng(s);
        match r % 4 {
            0 => f32::from_bits(
                0x3f00_0000 | (rng(s) as u32 & 0x00ff_ffff) | ((r as u32 >> 8) & 0x8000_0000),
            ),
            1 => ((rng(s) as i64 % 2000) - 1000) as f32 / 8.0,
            2 => f32::from_bits(rng(s) as u32 & 0x8fff_ffff),
            _ => f32::from_bits(rng(s) as u32),
        }
    }

    /// sign(x - (s + e)) for an f32 candidate x and an exact value s + e.
    fn above(x: f32, s: f64, e: f64) -> i32 {
        let d = (f64::from(x) - s) - e;
        if d > 0.0 {
            1
        } else if d < 0.0 {
            -1
        } else {
            0
        }
    }

    /// The correctly rounded f32 of s + e in mode rc, by checking the neighbours of the
    /// round-to-nearest result.
    fn round_ref(rne: f32, s: f64, e: f64, rc: u32) -> f32 {
        let cands = [rne.next_down(), rne, rne.next_up()];
        match rc {
            0 => rne,
            1 => cands
                .into_iter()
                .filter(|x| above(*x, s, e) <= 0)
                .fold(f32::NEG_INFINITY, f32::max),
            2 => cands
                .into_iter()
                .filter(|x| above(*x, s, e) >= 0)
                .fold(f32::INFINITY, f32::min),
            _ => {
                let neg = s + e < 0.0;
                if neg {
                    round_ref(rne, s, e, 2)
                } else {
                    round_ref(rne, s, e, 1)
                }
            }
        }
    }

    #[test]
    fn fma_single_rounding_in_every_mode_with_inexact_flag() {
        let mut st = 0x1234_5678;
        let mut checked = 0;
        for _ in 0..200_000 {
            let (a, b, c) = (operand(&mut st), operand(&mut st), operand(&mut st));
            if !(a.is_finite() && b.is_finite() && c.is_finite()) {
                continue;
            }
            let p = f64::from(a) * f64::from(b);
            let s = p + f64::from(c);
            let bb = s - p;
            let e = (p - (s - bb)) + (f64::from(c) - bb);
            let rne = a.mul_add(b, c);
            if !rne.is_finite() || rne.is_subnormal() || rne == 0.0 || !s.is_finite() {
                continue;
            }
            for rc in 0..4u32 {
                let mut env = Env::new(0x1f80 | (rc << 13));
                let r = env.fma(a, b, c, [a, b, c]);
                let want = round_ref(rne, s, e, rc);
                assert_eq!(
                    r.to_bits(),
                    want.to_bits(),
                    "fma({a:e}, {b:e}, {c:e}) rc {rc}: {r:e} vs {want:e}"
                );
                let inexact = above(rne, s, e) != 0;
                assert_eq!(
                    env.flags & PE != 0,
                    inexact,
                    "PE of fma({a:e}, {b:e}, {c:e})"
                );
                checked += 1;
            }
        }
        assert!(checked > 100_000, "{checked}");
    }

    #[test]
    fn add_mul_div_sqrt_round_in_every_mode() {
        let mut st = 99;
        for _ in 0..100_000 {
            let (a, b) = (operand(&mut st), operand(&mut st));
            if !(a.is_finite() && b.is_finite()) || b == 0.0 {
                continue;
            }
            for rc in 0..4u32 {
                let two_sum = |x: f64, y: f64| {
                    let s = x + y;
                    let bb = s - x;
                    (s, (x - (s - bb)) + (y - bb))
                };
                let (sa, ea) = two_sum(f64::from(a), f64::from(b));
                let (ss, es) = two_sum(f64::from(a), -f64::from(b));
                type Op = fn(&mut Env, f32, f32) -> f32;
                let ops: [(f64, f64, f32, Op); 3] = [
                    (sa, ea, a + b, |e, x, y| e.add(x, y)),
                    (f64::from(a) * f64::from(b), 0.0, a * b, |e, x, y| {
                        e.mul(x, y)
                    }),
                    (ss, es, a - b, |e, x, y| e.sub(x, y)),
                ];
                for (exact, err, rne, f) in ops {
                    if !rne.is_finite() || rne.is_subnormal() || rne == 0.0 {
                        continue;
                    }
                    let mut env = Env::new(0x1f80 | (rc << 13));
                    let r = f(&mut env, a, b);
                    assert_eq!(
                        r.to_bits(),
                        round_ref(rne, exact, err, rc).to_bits(),
                        "{a:e} {b:e} rc {rc}"
                    );
                }
                // Division: the f64 quotient is not exact; its residual tells the direction.
                let q = a / b;
                if q.is_finite() && q.is_normal() {
                    let mut env = Env::new(0x1f80 | (rc << 13));
                    let r = env.div(a, b);
                    let qd = f64::from(a) / f64::from(b);
                    let res = (-qd).mul_add(f64::from(b), f64::from(a)) / f64::from(b);
                    assert_eq!(
                        r.to_bits(),
                        round_ref(q, qd, res, rc).to_bits(),
                        "{a:e}/{b:e} rc {rc}"
                    );
                }
            }
        }
    }

    #[test]
    fn denormal_flag_yields_to_nan_and_invalid() {
        let den = f32::from_bits(1);
        let mut env = Env::new(0x1f80);
        env.add(den, f32::NAN);
        assert_eq!(env.flags & DE, 0);
        env.add(den, 1.0);
        assert_eq!(env.flags & (DE | PE), DE | PE);
        let mut env = Env::new(0x1f80 | DAZ);
        assert_eq!(env.add(den, 0.0).to_bits(), 0);
        assert_eq!(env.flags, 0);
    }

    #[test]
    fn half_conversions() {
        let mut env = Env::new(0x1f80);
        assert_eq!(single_to_half(1.0, 0, &mut env), 0x3c00);
        assert_eq!(single_to_half(65504.0, 0, &mut env), 0x7bff);
        assert_eq!(env.flags, 0);
        assert_eq!(single_to_half(65520.0, 0, &mut env), 0x7c00);
        assert_eq!(env.flags & (OE | PE), OE | PE);
        assert_eq!(single_to_half(65520.0, 3, &mut env), 0x7bff);
        // 1 + 2^-11 is halfway between two halves: ties to even rounds down, up rounds up.
        let x = 1.0 + 2f32.powi(-11);
        assert_eq!(single_to_half(x, 0, &mut env), 0x3c00);
        assert_eq!(single_to_half(x, 2, &mut env), 0x3c01);
        assert_eq!(single_to_half(2f32.powi(-24), 0, &mut env), 1);
        assert_eq!(half_to_single(0x0001, &mut env), 2f32.powi(-24));
        assert_eq!(half_to_single(0xfc00, &mut env), f32::NEG_INFINITY);
        assert_eq!(half_to_single(0x3555, &mut env).to_bits(), 0x3eaa_a000);
    }
}
