//! The CPU path of LayerNorm: one pass per row forward, one more backward that
//! writes `dx` and sums `dweight` and `dbias` per chunk of rows, chunks in
//! parallel (rayon) once there is enough work.

use num_traits::{Float, Zero};
use rayon::prelude::*;

use crate::ops::buffer::output_buffer;
use crate::ops::dtype::{Accum, FloatElem};

/// Rows per parallel work item of the backward: fixed, so that the order in
/// which the weight and bias gradients are summed never depends on the number
/// of threads.
const CHUNK_ROWS: usize = 32;

/// Below this many elements the rows run on the calling thread.
const PARALLEL_MIN_ELEMS: usize = 1 << 15;

/// `(mean, 1 / sqrt(var + eps))` of a row, two passes in the accumulator type
/// (the second over the deviations, which loses nothing to cancellation).
#[inline]
fn moments<T: FloatElem>(row: &[T], eps: f64) -> (T::Acc, T::Acc) {
    let n = T::Acc::of(row.len() as f64);
    let mean = row.iter().map(|x| x.to_acc()).sum::<T::Acc>() / n;
    let var = row
        .iter()
        .map(|x| {
            let d = x.to_acc() - mean;
            d * d
        })
        .sum::<T::Acc>()
        / n;
    (mean, (var + T::Acc::of(eps)).sqrt().recip())
}

fn to_acc<T: FloatElem>(v: &[T]) -> Vec<T::Acc> {
    v.iter().map(|x| x.to_acc()).collect()
}

pub(super) fn forward_cpu<T: FloatElem>(x: &[T], weight: &[T], bias: &[T], eps: f64) -> Vec<T> {
    let h = weight.len();
    let (w, b) = (to_acc(weight), to_acc(bias));
    // SAFETY: every row is written below (no rows when h = 0).
    let mut y = unsafe { output_buffer::<T>(x.len()) };
    let row = |(yr, xr): (&mut [T], &[T])| {
        let (mean, rstd) = moments(xr, eps);
        for (((o, &xv), &wv), &bv) in yr.iter_mut().zip(xr).zip(&w).zip(&b) {
            *o = T::from_acc((xv.to_acc() - mean) * rstd * wv + bv);
        }
    };
    if h == 0 {
        return y;
    }
    if x.len() >= PARALLEL_MIN_ELEMS {
        y.par_chunks_mut(h)
            .zip(x.par_chunks(h))
            .with_min_len(8)
            .for_each(row);
    } else {
        y.chunks_mut(h).zip(x.chunks(h)).for_each(row);
    }
    y
}

/// `[dx (rows·H) | dweight (H) | dbias (H)]` for the incoming gradient `g`.
pub(super) fn backward_cpu<T: FloatElem>(x: &[T], weight: &[T], g: &[T], eps: f64) -> Vec<T> {
    let h = weight.len();
    if h == 0 {
        return vec![T::zero(); x.len() + 2 * h];
    }
    // SAFETY: every row of dx is written by its chunk, dweight and dbias at the end.
    let mut out = unsafe { output_buffer::<T>(x.len() + 2 * h) };
    let w = to_acc(weight);
    let (dx, dwb) = out.split_at_mut(x.len());
    let chunk_len = CHUNK_ROWS * h;
    // Each chunk writes its rows of dx and returns its partial [dweight | dbias].
    let chunk = |(c, dxc): (usize, &mut [T])| -> Vec<T::Acc> {
        let mut partial = vec![T::Acc::zero(); 2 * h];
        let (pw, pb) = partial.split_at_mut(h);
        let start = c * chunk_len;
        let mut xhat = vec![T::Acc::zero(); h];
        for (r, dxr) in dxc.chunks_mut(h).enumerate() {
            let xr = &x[start + r * h..start + (r + 1) * h];
            let gr = &g[start + r * h..start + (r + 1) * h];
            let (mean, rstd) = moments(xr, eps);
            // dx = rstd · (gw − mean(gw) − x̂ · mean(gw · x̂)), gw = g · weight
            let (mut sum_gw, mut sum_gw_xhat) = (T::Acc::zero(), T::Acc::zero());
            for j in 0..h {
                let xh = (xr[j].to_acc() - mean) * rstd;
                let gv = gr[j].to_acc();
                let gw = gv * w[j];
                xhat[j] = xh;
                sum_gw += gw;
                sum_gw_xhat += gw * xh;
                pw[j] += gv * xh;
                pb[j] += gv;
            }
            let n = T::Acc::of(h as f64);
            let (a, c) = (sum_gw / n, sum_gw_xhat / n);
            for j in 0..h {
                let gw = gr[j].to_acc() * w[j];
                dxr[j] = T::from_acc(rstd * (gw - a - xhat[j] * c));
            }
        }
        partial
    };
    let partials: Vec<Vec<T::Acc>> = if x.len() >= PARALLEL_MIN_ELEMS {
        dx.par_chunks_mut(chunk_len)
            .enumerate()
            .map(chunk)
            .collect()
    } else {
        dx.chunks_mut(chunk_len).enumerate().map(chunk).collect()
    };
    // Summed in chunk order: the same result for any thread count.
    let mut total = vec![T::Acc::zero(); 2 * h];
    for partial in partials {
        for (t, p) in total.iter_mut().zip(partial) {
            *t += p;
        }
    }
    for (o, t) in dwb.iter_mut().zip(total) {
        *o = T::from_acc(t);
    }
    out
}

/// `x + r` element by element, rounded to `T` (what candle's `x + r` gives):
/// the CPU form of the residual op, which the kernels recompute in the same way.
pub(super) fn add_rows<T: FloatElem>(x: &[T], r: &[T]) -> Vec<T> {
    x.iter()
        .zip(r)
        .map(|(&a, &b)| T::from_acc(a.to_acc() + b.to_acc()))
        .collect()
}
