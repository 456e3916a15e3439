//! f64 reference of [`crate::ops::dual_head_cross_entropy`], forward and backward.
//!
//! Inputs are row-major slices: `logits_a` is `[n, ca]`, `logits_b` is `[n, cb]`,
//! `labels` is `[n, 2]` as i64 (column 0 head A, column 1 head B), where
//! [`IGNORE_INDEX`] (-100) leaves the row out of that head. (Callers with unsigned
//! labels map their ignore value, 255 or `u32::MAX`, to -100 first.)

pub use crate::ops::cross_entropy::IGNORE_INDEX;

/// The class of row `i` for `head`, `None` when ignored.
///
/// # Panics
/// On a label outside `[0, classes)` that is not [`IGNORE_INDEX`].
fn class(labels: &[i64], i: usize, head: usize, classes: usize) -> Option<usize> {
    let label = labels[2 * i + head];
    if label == IGNORE_INDEX {
        return None;
    }
    assert!(
        (0..classes as i64).contains(&label),
        "reference: label {label} at row {i}, head {head} is out of range 0..{classes}"
    );
    Some(label as usize)
}

/// `[loss_a, loss_b]`: each head's mean of `logsumexp(row) - row[label]` over its
/// labelled rows, 0 for a head with none.
///
/// # Panics
/// On mismatched slice lengths or an out-of-range label.
pub fn dual_head_cross_entropy(
    logits_a: &[f64],
    logits_b: &[f64],
    labels: &[i64],
    n: usize,
) -> [f64; 2] {
    let heads = heads(logits_a, logits_b, labels, n);
    std::array::from_fn(|h| {
        let (logits, classes) = heads[h];
        let mut sum = 0.0;
        let mut count = 0;
        for i in 0..n {
            if let Some(y) = class(labels, i, h, classes) {
                let row = &logits[i * classes..(i + 1) * classes];
                sum += log_sum_exp(row) - row[y];
                count += 1;
            }
        }
        if count == 0 {
            0.0
        } else {
            sum / count as f64
        }
    })
}

/// `(grad_a, grad_b)` for an incoming gradient `grad = [g_a, g_b]` of the losses:
/// `(softmax(row) - onehot(label)) * g_h / n_h` for labelled rows, 0 for ignored ones.
///
/// # Panics
/// On mismatched slice lengths or an out-of-range label.
pub fn dual_head_cross_entropy_backward(
    logits_a: &[f64],
    logits_b: &[f64],
    labels: &[i64],
    n: usize,
    grad: [f64; 2],
) -> (Vec<f64>, Vec<f64>) {
    let heads = heads(logits_a, logits_b, labels, n);
    let [grad_a, grad_b] = std::array::from_fn(|h| {
        let (logits, classes) = heads[h];
        let labelled = (0..n)
            .filter(|&i| class(labels, i, h, classes).is_some())
            .count();
        let mut out = vec![0.0; n * classes];
        for i in 0..n {
            if let Some(y) = class(labels, i, h, classes) {
                let row = &logits[i * classes..(i + 1) * classes];
                let lse = log_sum_exp(row);
                for j in 0..classes {
                    let onehot = if j == y { 1.0 } else { 0.0 };
                    out[i * classes + j] =
                        ((row[j] - lse).exp() - onehot) * grad[h] / labelled as f64;
                }
            }
        }
        out
    });
    (grad_a, grad_b)
}

fn log_sum_exp(row: &[f64]) -> f64 {
    let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln()
}

/// Each head's logits and class count, after checking the slice lengths.
fn heads<'a>(a: &'a [f64], b: &'a [f64], labels: &[i64], n: usize) -> [(&'a [f64], usize); 2] {
    assert_eq!(labels.len(), 2 * n, "reference: labels must hold 2 per row");
    assert!(
        n > 0 || (a.is_empty() && b.is_empty()),
        "reference: logits without rows"
    );
    let classes = |logits: &[f64]| logits.len().checked_div(n).unwrap_or(0);
    let (ca, cb) = (classes(a), classes(b));
    assert_eq!(a.len(), n * ca, "reference: logits_a is not [n, ca]");
    assert_eq!(b.len(), n * cb, "reference: logits_b is not [n, cb]");
    [(a, ca), (b, cb)]
}
