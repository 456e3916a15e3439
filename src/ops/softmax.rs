//! Softmax over the last dimension with a fused backward on the CPU.
//!
//! candle-nn's fused `softmax_last_dim` records no backward; composed from
//! candle ops (max, subtract, exp, sum, divide) it costs five passes forward
//! and a longer chain backward over the attention probabilities, the largest
//! activations of a BERT layer. This op is one pass per row forward (with a
//! vectorised `exp`, `ops::math::exp_f32`) and one backward:
//! `dx = y·(dy − Σ dy·y)`.
//!
//! f32, f16 and bf16 run the fused op on the CPU (f32 arithmetic); f64 and
//! other devices compose candle ops.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType, D,
};
use rayon::prelude::*;

use super::buffer::output_buffer;
use super::layout::contiguous_slice;
use super::math::exp_f32;
use crate::ops::dtype::with_float_dtype;

const OP: &str = "softmax_last_dim";

/// Below this many elements the rows run on the calling thread.
const PARALLEL_MIN_ELEMS: usize = 1 << 15;

/// Softmax of `x` over its last dimension. Differentiable.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.rank() == 0 {
        candle_core::bail!("{OP}: x must have rank >= 1, got a scalar");
    }
    with_float_dtype!(OP, "x", x.dtype(), _T => Ok(()))?;
    if !x.device().is_cpu() || x.dtype() == DType::F64 {
        return softmax_composed(x);
    }
    x.contiguous()?.apply_op1(Softmax)
}

/// Softmax composed from candle ops, each recording its backward.
pub fn softmax_composed(x: &Tensor) -> Result<Tensor> {
    // Softmax is invariant to the shift, so the row maximum (there only to keep
    // exp finite) needs no gradient: detaching it spares the backward of `max`.
    let max = x.max_keepdim(D::Minus1)?.detach();
    let exp = x.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

/// Runs `body(row index, out row)` over rows of length `n`, in parallel when large.
fn for_each_row<T: Send>(out: &mut [T], n: usize, body: impl Fn(usize, &mut [T]) + Sync + Send) {
    if n == 0 {
        return;
    }
    if out.len() >= PARALLEL_MIN_ELEMS {
        out.par_chunks_mut(n)
            .with_min_len(16)
            .enumerate()
            .for_each(|(i, r)| body(i, r));
    } else {
        out.chunks_mut(n).enumerate().for_each(|(i, r)| body(i, r));
    }
}

struct Softmax;

/// `(y, dy) -> dx`.
struct SoftmaxBackward;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = *l.dims().last().unwrap_or(&1);
        with_float_dtype!(OP, "x", s.dtype(), T => {
            let x = contiguous_slice::<T>(OP, s, l)?;
            // SAFETY: for_each_row writes every row.
            let mut y = unsafe { output_buffer::<T>(x.len()) };
            for_each_row(&mut y, n, |i, out| {
                let row = &x[i * n..(i + 1) * n];
                let mut exps: Vec<f32> = row.iter().map(|v| v.to_f64() as f32).collect();
                // `>` rather than `max`: a NaN then poisons the row instead of vanishing.
                let max = exps.iter().copied().fold(f32::NEG_INFINITY, |m, v| if v > m { v } else { m });
                for e in exps.iter_mut() {
                    *e = exp_f32(*e - max);
                }
                let inv = 1.0 / exps.iter().sum::<f32>();
                for (o, e) in out.iter_mut().zip(&exps) {
                    *o = T::from_f64(f64::from(e * inv));
                }
            });
            Ok((T::to_cpu_storage_owned(y), l.shape().clone()))
        })
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2(&dy.contiguous()?, SoftmaxBackward)?))
    }
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "softmax-last-dim-backward"
    }

    fn cpu_fwd(
        &self,
        sy: &CpuStorage,
        ly: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = *ly.dims().last().unwrap_or(&1);
        with_float_dtype!(OP, "y", sy.dtype(), T => {
            let (y, g) = (contiguous_slice::<T>(OP, sy, ly)?, contiguous_slice::<T>(OP, sg, lg)?);
            // SAFETY: for_each_row writes every row.
            let mut dx = unsafe { output_buffer::<T>(y.len()) };
            for_each_row(&mut dx, n, |i, out| {
                let (yr, gr) = (&y[i * n..(i + 1) * n], &g[i * n..(i + 1) * n]);
                let dot: f32 = yr
                    .iter()
                    .zip(gr)
                    .map(|(a, b)| a.to_f64() as f32 * b.to_f64() as f32)
                    .sum();
                for ((o, a), b) in out.iter_mut().zip(yr).zip(gr) {
                    let (a, b) = (a.to_f64() as f32, b.to_f64() as f32);
                    *o = T::from_f64(f64::from(a * (b - dot)));
                }
            });
            Ok((T::to_cpu_storage_owned(dx), ly.shape().clone()))
        })
    }
}
