//! f64 reference for [`crate::ops::cosine`]: L2 normalisation and cosine
//! similarity, forward and backward, as plain loops over row-major slices.
//!
//! The epsilon rule is PyTorch's `F.normalize(p=2, eps=1e-12)`: a row is divided
//! by `max(‖row‖₂, EPS)`, and `cos(a, b) = ⟨a, b⟩ / (max(‖a‖, EPS)·max(‖b‖, EPS))`.
//! Backward follows the clamp exactly: below it the divisor is the constant
//! `EPS`, so the map is linear in the row.

/// The clamp on norms, as in `torch.nn.functional.normalize`.
pub const EPS: f64 = 1e-12;

fn dot(x: &[f64], y: &[f64]) -> f64 {
    x.iter().zip(y).map(|(u, v)| u * v).sum()
}

fn norm(x: &[f64]) -> f64 {
    dot(x, x).sqrt()
}

fn rows(x: &[f64], h: usize) -> impl Iterator<Item = &[f64]> {
    assert!(
        h > 0 && x.len().is_multiple_of(h),
        "length {} is not rows of {h}",
        x.len()
    );
    x.chunks_exact(h)
}

/// Each row of the row-major `[rows, h]` matrix `x` divided by `max(‖row‖₂, EPS)`.
pub fn l2_normalize(x: &[f64], h: usize) -> Vec<f64> {
    rows(x, h)
        .flat_map(|row| {
            let d = norm(row).max(EPS);
            row.iter().map(move |v| v / d)
        })
        .collect()
}

/// Gradient of `l2_normalize` w.r.t. `x`, given the gradient `grad` of its output.
///
/// With `n = ‖x‖`, `y = x / n`: `dx = (g − y·⟨y, g⟩) / n` when `n ≥ EPS`, else
/// `dx = g / EPS` (the clamped divisor is a constant).
pub fn l2_normalize_backward(x: &[f64], grad: &[f64], h: usize) -> Vec<f64> {
    assert_eq!(x.len(), grad.len());
    rows(x, h)
        .zip(rows(grad, h))
        .flat_map(|(x, g)| {
            let n = norm(x);
            let row: Vec<f64> = if n >= EPS {
                let y: Vec<f64> = x.iter().map(|v| v / n).collect();
                let yg = dot(&y, g);
                y.iter().zip(g).map(|(y, g)| (g - y * yg) / n).collect()
            } else {
                g.iter().map(|g| g / EPS).collect()
            };
            row
        })
        .collect()
}

/// The natural size of each row of `l2_normalize_backward(x, upstream, h)`:
/// `‖upstream row‖ / max(‖x row‖, EPS)`.
///
/// The gradient is a difference of terms of this size, so an element can cancel to
/// ~0 while its rounding error stays ~ulp·scale: compare computed gradients to
/// within a relative tolerance of this scale, not only of the element itself.
pub fn gradient_scale(x: &[f64], upstream: &[f64], h: usize) -> Vec<f64> {
    assert_eq!(x.len(), upstream.len());
    rows(x, h)
        .zip(rows(upstream, h))
        .map(|(x, u)| norm(u) / norm(x).max(EPS))
        .collect()
}

/// Row-wise cosine similarity of two `[n, h]` matrices: `[n]`.
pub fn cosine_similarity(a: &[f64], b: &[f64], h: usize) -> Vec<f64> {
    assert_eq!(a.len(), b.len());
    rows(a, h)
        .zip(rows(b, h))
        .map(|(a, b)| dot(a, b) / (norm(a).max(EPS) * norm(b).max(EPS)))
        .collect()
}

/// Gradients `(da, db)` of the row-wise cosine similarity, given the gradient
/// `grad` (`[n]`) of its output.
///
/// Per row, with `â = a / max(‖a‖, EPS)`, `b̂` likewise and `c = ⟨â, b̂⟩`:
/// `da = g·(b̂ − c·â) / ‖a‖` when `‖a‖ ≥ EPS`, else `g·b̂ / EPS`; `db` symmetrically.
pub fn cosine_similarity_backward(
    a: &[f64],
    b: &[f64],
    grad: &[f64],
    h: usize,
) -> (Vec<f64>, Vec<f64>) {
    assert_eq!(a.len(), b.len());
    assert_eq!(grad.len() * h, a.len());
    let a_hat = l2_normalize(a, h);
    let b_hat = l2_normalize(b, h);
    // The gradient of c w.r.t. â is g·b̂; pull it back through the normalisation.
    let scaled = |v: &[f64]| -> Vec<f64> {
        rows(v, h)
            .zip(grad)
            .flat_map(|(row, g)| row.iter().map(move |x| g * x))
            .collect()
    };
    let da = l2_normalize_backward(a, &scaled(&b_hat), h);
    let db = l2_normalize_backward(b, &scaled(&a_hat), h);
    (da, db)
}

/// Cosine similarity of every row of `a` (`[n, h]`) with every row of `b`
/// (`[m, h]`): `[n, m]`, row-major.
pub fn cosine_similarity_matrix(a: &[f64], b: &[f64], h: usize) -> Vec<f64> {
    let a_hat = l2_normalize(a, h);
    let b_hat = l2_normalize(b, h);
    rows(&a_hat, h)
        .flat_map(|x| rows(&b_hat, h).map(move |y| dot(x, y)))
        .collect()
}

/// Gradients `(da, db)` of the cosine similarity matrix, given the gradient
/// `grad` (`[n, m]`) of its output.
pub fn cosine_similarity_matrix_backward(
    a: &[f64],
    b: &[f64],
    grad: &[f64],
    h: usize,
) -> (Vec<f64>, Vec<f64>) {
    let (n, m) = (a.len() / h, b.len() / h);
    assert_eq!(grad.len(), n * m);
    let a_hat = l2_normalize(a, h);
    let b_hat = l2_normalize(b, h);
    // S = Â·B̂ᵀ, so dÂ = G·B̂ and dB̂ = Gᵀ·Â; then back through the normalisation.
    let mut da_hat = vec![0.0; n * h];
    let mut db_hat = vec![0.0; m * h];
    for i in 0..n {
        for j in 0..m {
            let g = grad[i * m + j];
            for k in 0..h {
                da_hat[i * h + k] += g * b_hat[j * h + k];
                db_hat[j * h + k] += g * a_hat[i * h + k];
            }
        }
    }
    (
        l2_normalize_backward(a, &da_hat, h),
        l2_normalize_backward(b, &db_hat, h),
    )
}

/// The `k` corpus rows most cosine-similar to each query, best first: for each
/// of the `[q, h]` queries, `(index, score)` of the `min(k, rows)` best rows of
/// the `[rows, h]` corpus, ties broken by the lower index. Brute force: every
/// score, then a sort.
pub fn cosine_top_k(queries: &[f64], corpus: &[f64], h: usize, k: usize) -> Vec<Vec<(usize, f64)>> {
    let corpus_rows: Vec<&[f64]> = rows(corpus, h).collect();
    rows(queries, h)
        .map(|q| {
            let qn = norm(q).max(EPS);
            let mut scored: Vec<(usize, f64)> = corpus_rows
                .iter()
                .enumerate()
                .map(|(i, c)| (i, dot(q, c) / (qn * norm(c).max(EPS))))
                .collect();
            scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            scored.truncate(k);
            scored
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_gives_unit_rows_and_keeps_zero_rows() {
        let y = l2_normalize(&[3.0, 4.0, 0.0, 0.0], 2);
        assert_eq!(y, vec![0.6, 0.8, 0.0, 0.0]);
    }

    #[test]
    fn cosine_of_zero_vector_is_zero() {
        assert_eq!(cosine_similarity(&[0.0, 0.0], &[1.0, 2.0], 2), vec![0.0]);
    }

    #[test]
    fn backward_below_the_clamp_is_linear() {
        let dx = l2_normalize_backward(&[1e-13, 0.0], &[1.0, 2.0], 2);
        assert_eq!(dx, vec![1.0 / EPS, 2.0 / EPS]);
    }
}
