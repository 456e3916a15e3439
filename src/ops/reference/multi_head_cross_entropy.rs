//! f64 reference of [`crate::ops::multi_head_cross_entropy()`], forward and
//! backward, as loops over row-major slices: `logits` is `[n, ΣC]` (head 0's
//! columns first), `labels` is `[n, H]` as i64, and each head's ignore index is
//! `ignore[h]`.

use crate::ops::multi_head_cross_entropy::CeHead;

/// Head `h`'s class of row `i`, `None` when ignored.
///
/// # Panics
/// On a label that is neither a class nor the ignore index.
fn class(
    labels: &[i64],
    heads: usize,
    i: usize,
    h: usize,
    classes: usize,
    ignore: i64,
) -> Option<usize> {
    let label = labels[i * heads + h];
    if label == ignore {
        return None;
    }
    assert!(
        (0..classes as i64).contains(&label),
        "reference: label {label} out of range"
    );
    Some(label as usize)
}

/// The target distribution of a row labelled `y` under label smoothing `eps`.
fn target(eps: f64, classes: usize, y: usize, j: usize) -> f64 {
    eps / classes as f64 + if j == y { 1.0 - eps } else { 0.0 }
}

fn log_sum_exp(row: &[f64]) -> f64 {
    let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln()
}

/// Head `h`'s `(first column, [rows labelled: (row, class, class weight)])`.
fn labelled(
    labels: &[i64],
    n: usize,
    heads: &[CeHead],
    ignore: &[i64],
    h: usize,
) -> (usize, Vec<(usize, usize, f64)>) {
    let column: usize = heads[..h].iter().map(|x| x.classes).sum();
    let rows = (0..n)
        .filter_map(|i| {
            let y = class(labels, heads.len(), i, h, heads[h].classes, ignore[h])?;
            let cw = heads[h].class_weights.as_ref().map_or(1.0, |w| w[y]);
            Some((i, y, cw))
        })
        .collect();
    (column, rows)
}

/// `(per-head losses, total)`: each head's class-weighted mean of
/// `logsumexp − Σ_j q_j z_j` (`q` the one-hot or smoothed target) over its labelled rows (0 when their weights sum to 0),
/// and `Σ_h w_h · loss_h`.
pub fn multi_head_cross_entropy(
    logits: &[f64],
    labels: &[i64],
    n: usize,
    heads: &[CeHead],
    ignore: &[i64],
) -> (Vec<f64>, f64) {
    let width: usize = heads.iter().map(|h| h.classes).sum();
    assert_eq!(logits.len(), n * width);
    let per_head: Vec<f64> = (0..heads.len())
        .map(|h| {
            let (column, rows) = labelled(labels, n, heads, ignore, h);
            let (mut sum, mut weight) = (0.0, 0.0);
            for (i, y, cw) in rows {
                let row = &logits[i * width + column..][..heads[h].classes];
                let lse = log_sum_exp(row);
                let eps = heads[h].label_smoothing;
                let row_loss: f64 = (row.iter().enumerate())
                    .map(|(j, &z)| target(eps, row.len(), y, j) * (lse - z))
                    .sum();
                sum += cw * row_loss;
                weight += cw;
            }
            if weight > 0.0 {
                sum / weight
            } else {
                0.0
            }
        })
        .collect();
    let total = per_head.iter().zip(heads).map(|(l, h)| l * h.weight).sum();
    (per_head, total)
}

/// The gradient `[n, ΣC]` for an incoming gradient `grad` `[H + 1]` of
/// `(per-head losses, total)`: `(softmax − target)·cw[y]·(g_h + w_h·g_H) / Σcw`
/// for labelled rows, 0 elsewhere.
pub fn multi_head_cross_entropy_backward(
    logits: &[f64],
    labels: &[i64],
    n: usize,
    heads: &[CeHead],
    ignore: &[i64],
    grad: &[f64],
) -> Vec<f64> {
    let width: usize = heads.iter().map(|h| h.classes).sum();
    let total_grad = grad[heads.len()];
    let mut out = vec![0.0; n * width];
    for h in 0..heads.len() {
        let (column, rows) = labelled(labels, n, heads, ignore, h);
        let weight: f64 = rows.iter().map(|r| r.2).sum();
        if weight <= 0.0 {
            continue;
        }
        let scale = (grad[h] + heads[h].weight * total_grad) / weight;
        for (i, y, cw) in rows {
            let row = &logits[i * width + column..][..heads[h].classes];
            let lse = log_sum_exp(row);
            for (j, &z) in row.iter().enumerate() {
                let p = (z - lse).exp() - target(heads[h].label_smoothing, row.len(), y, j);
                out[i * width + column + j] = p * cw * scale;
            }
        }
    }
    out
}
