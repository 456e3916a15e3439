//! Vectorisable elementary functions for the CPU paths: the libm calls they
//! replace run one element at a time and would dominate the ops that use them.

/// `exp(x)` to within a few ulp for -87 <= x <= 88, and 0 below -87 (the
/// callers pass x <= 0: values minus their row maximum); NaN stays NaN. `exp(x) = 2^n · exp(r)` with `n = round(x / ln 2)`,
/// `|r| <= ln(2)/2`, and `exp(r)` from its degree-6 Taylor polynomial (truncation
/// error below 2e-7 relative).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n * LN2_HI is exact for the n that occur.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding then subtracting 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    // Below -87 the result is flushed to 0: exp(-87) is the last normal f32,
    // and subnormal results (attention to padding, say) would make every later
    // product on them a hundred times slower.
    let flush = x < -87.0;
    let x = if flush { -87.0 } else { x };
    let rounded = x * LOG2_E + ROUND;
    let n = rounded - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // `rounded`'s low mantissa bits hold n (its ulp is 1): build 2^n's exponent
    // from them with integer ops, which vectorise (a float-to-int cast does not).
    let n_bits = rounded.to_bits().wrapping_sub(ROUND.to_bits());
    let two_to_n = f32::from_bits(n_bits.wrapping_add(127) << 23);
    if flush {
        0.0
    } else {
        p * two_to_n
    }
}

/// `ln(x)` for f32 to within a few ulp for positive, finite, normal x (the
/// callers pass sums of exponentials, at least 1); NaN stays NaN. `x = m · 2^e`
/// with `m` in [√½, √2), `ln x = e·ln 2 + ln m`, and `ln m = 2·atanh(s)` with
/// `s = (m − 1)/(m + 1)`, `|s| < 0.172`, from its odd series to `s⁹` (truncation
/// error below 1e-9).
#[inline(always)]
pub fn ln_f32(x: f32) -> f32 {
    const SQRT_HALF_BITS: u32 = 0x3f35_04f3;
    // ln 2 split so that e * LN2_HI is exact for every exponent.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let bits = x.to_bits();
    // The exponent that brings the mantissa into [√½, √2), by integer ops (which
    // vectorise): subtracting √½'s bits borrows from the exponent field below √½.
    let e = (bits.wrapping_sub(SQRT_HALF_BITS) as i32) >> 23;
    let m = f32::from_bits(bits.wrapping_sub((e as u32) << 23));
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let ln_m =
        s * (2.0 + s2 * (2.0 / 3.0 + s2 * (2.0 / 5.0 + s2 * (2.0 / 7.0 + s2 * (2.0 / 9.0)))));
    let e = e as f32;
    let y = e * LN2_HI + (ln_m + e * LN2_LO);
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// `erf(x)` for f32 to within 7e-7 absolute (the polynomial 1.5e-7, the rest `exp_f32` and rounding): Abramowitz & Stegun 7.1.26,
/// `1 − (a₁t + … + a₅t⁵)·exp(−x²)` with `t = 1/(1 + p|x|)`, odd in `x`. NaN
/// stays NaN.
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_7,
        -1.453_152_1,
        1.061_405_4,
    ];
    let ax = x.abs();
    let t = 1.0 / (1.0 + P * ax);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let y = 1.0 - poly * exp_f32(-ax * ax);
    y.copysign(x)
}

#[cfg(test)]
mod tests {
    use super::{erf_f32, exp_f32, ln_f32};

    #[test]
    fn exp_f32_is_accurate_and_keeps_nan() {
        let mut worst = 0f64;
        for k in 0..=200_000 {
            let x = -90.0 + 90.0 * k as f32 / 200_000.0;
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            if x >= -87.0 {
                worst = worst.max((got - want).abs() / want);
            } else {
                assert_eq!(got, 0.0, "exp({x}) is flushed to 0");
            }
        }
        assert!(worst < 5e-7, "worst relative error {worst:e}");
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(0.0), 1.0);
    }

    #[test]
    fn ln_f32_is_accurate_and_keeps_nan() {
        let mut worst = 0f64;
        // Log-spaced over the normal range, plus the region near 1 where ln is small.
        let samples = (0..=200_000)
            .map(|k| 2f64.powf(-125.0 + 252.0 * k as f64 / 200_000.0))
            .chain((0..=20_000).map(|k| 0.5 + k as f64 / 10_000.0));
        for x in samples {
            let x = x as f32;
            let want = (x as f64).ln();
            let got = ln_f32(x) as f64;
            // Relative error, measured against at least ulp(1) in absolute terms
            // (ln crosses 0 at 1).
            worst = worst.max((got - want).abs() / want.abs().max(1.0));
        }
        assert!(worst < 3e-7, "worst error {worst:e}");
        assert!(ln_f32(f32::NAN).is_nan());
        assert_eq!(ln_f32(1.0), 0.0);
    }

    #[test]
    fn erf_f32_is_accurate_and_odd() {
        let mut worst = 0f64;
        for k in 0..=200_000 {
            let x = -6.0 + 12.0 * k as f32 / 200_000.0;
            let want = libm_erf(x as f64);
            worst = worst.max((erf_f32(x) as f64 - want).abs());
            assert_eq!(erf_f32(-x), -erf_f32(x));
        }
        assert!(worst < 7e-7, "worst absolute error {worst:e}");
        assert!(erf_f32(f32::NAN).is_nan());
    }

    /// erf in f64 from its series (|x| < 3) or continued fraction, accurate to
    /// ~1e-15: the test's reference.
    fn libm_erf(x: f64) -> f64 {
        let ax = x.abs();
        let v = if ax < 3.0 {
            // erf(x) = 2/sqrt(pi) * sum_n (-1)^n x^(2n+1) / (n! (2n+1))
            let (mut term, mut sum, mut n) = (ax, ax, 0.0);
            while term.abs() > 1e-17 * sum.abs() {
                n += 1.0;
                term *= -ax * ax / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc by Lentz's continued fraction.
            let mut f = ax;
            for k in (1..60).rev() {
                f = ax + (k as f64 / 2.0) / f;
            }
            1.0 - (-ax * ax).exp() / (f * std::f64::consts::PI.sqrt())
        };
        v.copysign(x)
    }
}
