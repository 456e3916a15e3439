//! f64 reference for the fused bias + GELU (erf form), forward and backward.
//!
//! All slices are row-major: `x` and the output are `[rows, H]`, `bias` is `[H]`.
//! `z = x + bias` on every row; `gelu(z) = z·Φ(z)` with `Φ(z) = (1 + erf(z/√2))/2`;
//! `gelu'(z) = Φ(z) + z·φ(z)` with `φ(z) = exp(−z²/2)/√(2π)`.

use candle_core::cpu::erf::erf_f64;

/// `Φ(z)`, the standard normal CDF.
fn cdf(z: f64) -> f64 {
    0.5 * (1.0 + erf_f64(z * std::f64::consts::FRAC_1_SQRT_2))
}

/// `gelu(z) = z·Φ(z)`.
pub fn gelu(z: f64) -> f64 {
    z * cdf(z)
}

/// `gelu'(z) = Φ(z) + z·φ(z)`.
pub fn gelu_derivative(z: f64) -> f64 {
    let pdf = (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt();
    cdf(z) + z * pdf
}

/// `y[r,h] = gelu(x[r,h] + bias[h])`; `[rows, H]`.
pub fn bias_gelu(x: &[f64], bias: &[f64]) -> Vec<f64> {
    let h = bias.len();
    assert!(
        h > 0 && x.len().is_multiple_of(h),
        "x must hold whole rows of H = {h} values"
    );
    let mut y = vec![0.0; x.len()];
    for (r, row) in x.chunks_exact(h).enumerate() {
        for (c, (&xv, &bv)) in row.iter().zip(bias).enumerate() {
            y[r * h + c] = gelu(xv + bv);
        }
    }
    y
}

/// The gradients of [`bias_gelu`] given `grad_out` (`[rows, H]`):
/// `dx[r,h] = grad_out[r,h]·gelu'(x[r,h] + bias[h])` and `dbias[h] = Σ_r dx[r,h]`;
/// returns `(dx [rows, H], dbias [H])`.
pub fn bias_gelu_backward(x: &[f64], bias: &[f64], grad_out: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let h = bias.len();
    assert!(
        h > 0 && x.len().is_multiple_of(h),
        "x must hold whole rows of H = {h} values"
    );
    assert_eq!(grad_out.len(), x.len(), "grad_out must have x's shape");
    let mut dx = vec![0.0; x.len()];
    let mut dbias = vec![0.0; h];
    for r in 0..x.len() / h {
        for c in 0..h {
            let i = r * h + c;
            let d = grad_out[i] * gelu_derivative(x[i] + bias[c]);
            dx[i] = d;
            dbias[c] += d;
        }
    }
    (dx, dbias)
}
