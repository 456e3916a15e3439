//! The CPU path of the fused bias + GELU: one pass forward (`z = x + b` and
//! `gelu(z)` per element), one pass backward (`dx` per element and the column
//! sums of `dx` per chunk of rows, chunks summed in a fixed order: the result
//! does not depend on the thread count).
//!
//! f32, f16 and bf16 evaluate in f32 with the vectorisable `erf`/`exp` of
//! `ops::math` (as [`crate::ops::gelu_erf`] does); f64 with candle's f64 `erf`
//! (as candle's `gelu_erf`, which `ops::gelu_erf` runs for f64, does).

use num_traits::Zero;
use rayon::prelude::*;

use crate::ops::buffer::output_buffer;
use crate::ops::dtype::{Accum, FloatElem};

/// Rows per parallel work item (and per partial of the bias gradient).
const CHUNK_ROWS: usize = 64;

/// Below this many elements the work stays on the calling thread.
const PARALLEL_MIN_ELEMS: usize = 1 << 15;

/// GELU and its derivative in an accumulator type.
pub(super) trait GeluAcc: Accum {
    fn gelu(self) -> Self;
    fn gelu_derivative(self) -> Self;
}

impl GeluAcc for f32 {
    #[inline(always)]
    fn gelu(self) -> f32 {
        crate::ops::gelu::gelu(self)
    }

    #[inline(always)]
    fn gelu_derivative(self) -> f32 {
        crate::ops::gelu::gelu_derivative(self)
    }
}

impl GeluAcc for f64 {
    #[inline(always)]
    fn gelu(self) -> f64 {
        0.5 * self * (1.0 + candle_core::cpu::erf::erf_f64(self * std::f64::consts::FRAC_1_SQRT_2))
    }

    #[inline(always)]
    fn gelu_derivative(self) -> f64 {
        let cdf =
            0.5 * (1.0 + candle_core::cpu::erf::erf_f64(self * std::f64::consts::FRAC_1_SQRT_2));
        let inv_sqrt_2pi = 1.0 / (2.0 * std::f64::consts::PI).sqrt();
        cdf + self * inv_sqrt_2pi * (-0.5 * self * self).exp()
    }
}

/// `y = gelu(x + bias)` over the rows of contiguous `x` `[rows, H]`.
pub(super) fn forward_cpu<T: FloatElem>(x: &[T], bias: &[T]) -> Vec<T>
where
    T::Acc: GeluAcc,
{
    let h = bias.len();
    // SAFETY: every row of y is written below (none when h = 0).
    let mut y = unsafe { output_buffer::<T>(x.len()) };
    if h == 0 {
        return y;
    }
    let bias: Vec<T::Acc> = bias.iter().map(|b| b.to_acc()).collect();
    let chunk = |(out, xs): (&mut [T], &[T])| {
        for (yr, xr) in out.chunks_exact_mut(h).zip(xs.chunks_exact(h)) {
            for ((o, &xv), &bv) in yr.iter_mut().zip(xr).zip(&bias) {
                *o = T::from_acc((xv.to_acc() + bv).gelu());
            }
        }
    };
    if x.len() >= PARALLEL_MIN_ELEMS {
        y.par_chunks_mut(CHUNK_ROWS * h)
            .zip(x.par_chunks(CHUNK_ROWS * h))
            .for_each(chunk);
    } else {
        chunk((&mut y[..], x));
    }
    y
}

/// `[dx (rows·H) | dbias (H)]` for contiguous `x` and `dy` `[rows, H]`:
/// `dx = dy·gelu'(x + bias)` rounded to `T`, `dbias` the column sums of those
/// rounded values (accumulated in `T::Acc`).
pub(super) fn backward_cpu<T: FloatElem>(x: &[T], bias: &[T], dy: &[T]) -> Vec<T>
where
    T::Acc: GeluAcc,
{
    let h = bias.len();
    let n = x.len();
    // SAFETY: dx is written chunk by chunk and dbias after it (nothing when h = 0).
    let mut grads = unsafe { output_buffer::<T>(n + h) };
    if h == 0 {
        return grads;
    }
    let bias: Vec<T::Acc> = bias.iter().map(|b| b.to_acc()).collect();
    let (dx, dbias) = grads.split_at_mut(n);
    let chunk = |((out, xs), gs): ((&mut [T], &[T]), &[T])| {
        let mut partial = vec![<T::Acc as Zero>::zero(); h];
        for ((dr, xr), gr) in out
            .chunks_exact_mut(h)
            .zip(xs.chunks_exact(h))
            .zip(gs.chunks_exact(h))
        {
            for ((((o, &xv), &g), &bv), p) in dr
                .iter_mut()
                .zip(xr)
                .zip(gr)
                .zip(&bias)
                .zip(partial.iter_mut())
            {
                let d = T::from_acc(g.to_acc() * (xv.to_acc() + bv).gelu_derivative());
                *o = d;
                *p += d.to_acc();
            }
        }
        partial
    };
    let partials: Vec<Vec<T::Acc>> = if n >= PARALLEL_MIN_ELEMS {
        dx.par_chunks_mut(CHUNK_ROWS * h)
            .zip(x.par_chunks(CHUNK_ROWS * h))
            .zip(dy.par_chunks(CHUNK_ROWS * h))
            .map(chunk)
            .collect()
    } else {
        dx.chunks_mut(CHUNK_ROWS * h)
            .zip(x.chunks(CHUNK_ROWS * h))
            .zip(dy.chunks(CHUNK_ROWS * h))
            .map(chunk)
            .collect()
    };
    let mut total = vec![<T::Acc as Zero>::zero(); h];
    for partial in partials {
        for (t, p) in total.iter_mut().zip(partial) {
            *t += p;
        }
    }
    for (o, t) in dbias.iter_mut().zip(total) {
        *o = T::from_acc(t);
    }
    grads
}
