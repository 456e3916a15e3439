//! f64 reference for masked mean pooling, forward and backward.
//!
//! All slices are row-major: `hidden` is `[B,T,H]`, `mask` is `[B,T]`, the pooled
//! output and its gradient are `[B,H]`. A token counts iff its mask value is
//! non-zero; the count is clamped at [`MIN_COUNT`] as sentence-transformers does,
//! so a row with no token pools to zeros.

pub use crate::ops::mean_pool::MIN_COUNT;

/// The number of tokens of row `b` whose mask value is non-zero.
fn token_count(mask: &[f64], b: usize, t: usize) -> f64 {
    mask[b * t..(b + 1) * t]
        .iter()
        .filter(|&&m| m != 0.0)
        .count() as f64
}

/// `out[b,h] = Σ_t [mask[b,t] ≠ 0]·hidden[b,t,h] / max(count_b, 1e-9)`; `[B,H]`.
pub fn masked_mean_pool(hidden: &[f64], mask: &[f64], b: usize, t: usize, h: usize) -> Vec<f64> {
    assert_eq!(hidden.len(), b * t * h, "hidden must hold B·T·H values");
    assert_eq!(mask.len(), b * t, "mask must hold B·T values");
    let mut out = vec![0.0; b * h];
    for bi in 0..b {
        let count = token_count(mask, bi, t).max(MIN_COUNT);
        for hi in 0..h {
            let mut sum = 0.0;
            for ti in 0..t {
                if mask[bi * t + ti] != 0.0 {
                    sum += hidden[(bi * t + ti) * h + hi];
                }
            }
            out[bi * h + hi] = sum / count;
        }
    }
    out
}

/// The gradient of [`masked_mean_pool`] with respect to `hidden`, given the
/// gradient `grad_out` (`[B,H]`) of the pooled output:
/// `dhidden[b,t,h] = [mask[b,t] ≠ 0]·grad_out[b,h] / max(count_b, 1e-9)`; `[B,T,H]`.
pub fn masked_mean_pool_backward(
    grad_out: &[f64],
    mask: &[f64],
    b: usize,
    t: usize,
    h: usize,
) -> Vec<f64> {
    assert_eq!(grad_out.len(), b * h, "grad_out must hold B·H values");
    assert_eq!(mask.len(), b * t, "mask must hold B·T values");
    let mut grad_hidden = vec![0.0; b * t * h];
    for bi in 0..b {
        let count = token_count(mask, bi, t).max(MIN_COUNT);
        for ti in 0..t {
            if mask[bi * t + ti] == 0.0 {
                continue;
            }
            for hi in 0..h {
                grad_hidden[(bi * t + ti) * h + hi] = grad_out[bi * h + hi] / count;
            }
        }
    }
    grad_hidden
}
