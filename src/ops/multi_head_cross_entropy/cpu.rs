//! The CPU pass of the N-head cross-entropy: every head of every row in one
//! pass over the rows (rayon over row chunks for large batches), logits and
//! labels read in place through their strides. With `keep_grads` the pass also
//! writes `(softmax − target)·cw[y]` of each labelled row (the target one-hot,
//! or smoothed) while the
//! exponentials are at hand, so that the backward only scales it.

use candle_core::{CpuStorage, Result};
use num_traits::{Float, One, Zero};
use rayon::prelude::*;

use super::{label_out_of_range, Plan};
use crate::ops::dtype::{Accum, FloatElem, Label};
use crate::ops::layout::View;

/// Rows per parallel work item: large enough that a chunk's bookkeeping is
/// negligible, small enough that a training batch (32 rows) stays serial.
const CHUNK_ROWS: usize = 2048;

/// What a range of rows adds up to, per head.
struct Sums<A> {
    loss: Vec<A>,
    weight: Vec<A>,
}

/// The forward's results: each head's (class-weighted) loss sum and weight
/// sum, and with `keep_grads` the unscaled gradient `[N, ΣC]` row-major.
pub(super) struct Forward<A> {
    pub loss: Vec<A>,
    pub weight: Vec<A>,
    pub grads: Option<Vec<A>>,
}

pub(super) fn forward<T: FloatElem, L: Label>(
    plan: &Plan,
    (logits, view): (&CpuStorage, View<2>),
    (labels, label_view): (&CpuStorage, View<2>),
    keep_grads: bool,
) -> Result<Forward<T::Acc>>
where
    T::Acc: Accum,
{
    let logits = logits.as_slice::<T>()?;
    let labels = labels.as_slice::<L>()?;
    let n = view.dims[0];
    let width = plan.width();
    let class_weights: Vec<Option<Vec<T::Acc>>> = plan
        .class_weights
        .iter()
        .map(|w| {
            w.as_ref()
                .map(|w| w.iter().map(|&v| T::Acc::of(v)).collect())
        })
        .collect();
    // Rows `start..start + len`; `grads` is their slice of the kept gradient.
    let rows =
        |start: usize, len: usize, mut grads: Option<&mut [T::Acc]>| -> Result<Sums<T::Acc>> {
            let h_count = plan.heads();
            let mut sums = Sums {
                loss: vec![T::Acc::zero(); h_count],
                weight: vec![T::Acc::zero(); h_count],
            };
            for i in start..start + len {
                for h in 0..h_count {
                    let label = labels[label_view.at([i, h])].to_i64();
                    if label == plan.ignore[h] {
                        continue;
                    }
                    let classes = plan.classes[h];
                    if !(0..classes as i64).contains(&label) {
                        return Err(label_out_of_range(h, i, label, classes, plan.ignore[h]));
                    }
                    let y = label as usize;
                    let at = |j: usize| logits[view.at([i, plan.columns[h] + j])].to_acc();
                    let mut max = at(0);
                    for j in 1..classes {
                        max = max.max(at(j));
                    }
                    let mut sum = T::Acc::zero();
                    for j in 0..classes {
                        sum += (at(j) - max).exp();
                    }
                    let cw = class_weights[h].as_ref().map_or(T::Acc::one(), |w| w[y]);
                    let target = SmoothedTarget::new(plan.smoothing[h], classes, y);
                    // Σ q_j (max − z_j) first (max − z_y alone, exact, without
                    // smoothing), then the log of the sum.
                    let shifted = if plan.smoothing[h] == 0.0 {
                        max - at(y)
                    } else {
                        (0..classes).fold(T::Acc::zero(), |acc, j| {
                            acc + target.at::<T::Acc>(j) * (max - at(j))
                        })
                    };
                    sums.loss[h] += cw * (shifted + sum.ln());
                    sums.weight[h] += cw;
                    if let Some(grads) = grads.as_deref_mut() {
                        let row = &mut grads[(i - start) * width + plan.columns[h]..][..classes];
                        let per_exp = cw / sum;
                        for (j, g) in row.iter_mut().enumerate() {
                            let p = (at(j) - max).exp() * per_exp;
                            *g = p - cw * target.at::<T::Acc>(j);
                        }
                    }
                }
            }
            Ok(sums)
        };
    let mut grads = keep_grads.then(|| vec![T::Acc::zero(); n * width]);
    let partials: Vec<Sums<T::Acc>> = if n <= CHUNK_ROWS {
        vec![rows(0, n, grads.as_deref_mut())?]
    } else {
        let starts: Vec<usize> = (0..n).step_by(CHUNK_ROWS).collect();
        let results: Vec<Result<Sums<T::Acc>>> = match grads.as_deref_mut() {
            Some(g) => g
                .par_chunks_mut(CHUNK_ROWS * width)
                .zip(starts.par_iter())
                .map(|(g, &s)| rows(s, CHUNK_ROWS.min(n - s), Some(g)))
                .collect(),
            None => starts
                .par_iter()
                .map(|&s| rows(s, CHUNK_ROWS.min(n - s), None))
                .collect(),
        };
        // In row order: a bad label is reported for its first row (each chunk
        // stops at its own first).
        results.into_iter().collect::<Result<_>>()?
    };
    let mut total = Sums {
        loss: vec![T::Acc::zero(); plan.heads()],
        weight: vec![T::Acc::zero(); plan.heads()],
    };
    for p in partials {
        for h in 0..plan.heads() {
            total.loss[h] += p.loss[h];
            total.weight[h] += p.weight[h];
        }
    }
    Ok(Forward {
        loss: total.loss,
        weight: total.weight,
        grads,
    })
}

/// A row's target distribution: `1 − ε + ε/C` on the label, `ε/C` elsewhere
/// (exactly 1 and 0 without smoothing).
struct SmoothedTarget {
    label: usize,
    on: f64,
    off: f64,
}

impl SmoothedTarget {
    fn new(smoothing: f64, classes: usize, label: usize) -> Self {
        let off = smoothing / classes as f64;
        Self {
            label,
            on: 1.0 - smoothing + off,
            off,
        }
    }

    fn at<A: Accum>(&self, j: usize) -> A {
        A::of(if j == self.label { self.on } else { self.off })
    }
}

/// `kept[i, cols of h] · scales[h]` for every head, rounded once to `T`.
pub(super) fn scale_grads<T: FloatElem>(plan: &Plan, kept: &[T::Acc], scales: &[T::Acc]) -> Vec<T>
where
    T::Acc: Accum,
{
    let width = plan.width();
    let mut column_scale = Vec::with_capacity(width);
    for (h, &c) in plan.classes.iter().enumerate() {
        column_scale.extend(std::iter::repeat_n(scales[h], c));
    }
    kept.chunks_exact(width.max(1))
        .flat_map(|row| {
            row.iter()
                .zip(&column_scale)
                .map(|(&g, &s)| T::from_acc(g * s))
        })
        .collect()
}
