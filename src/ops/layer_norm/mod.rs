//! LayerNorm over the last dimension, with a fused backward on the CPU.
//!
//! candle-nn's fused `layer_norm` records no backward, so training needs either
//! LayerNorm composed from candle ops (about ten passes over the activations
//! forward and more backward, two of them candle's slow strided sums over rows
//! for the weight and bias gradients) or this op: the forward is one pass per
//! row, the backward one more pass that writes `dx` and sums `dweight` and
//! `dbias` per chunk of rows, chunks in parallel.
//!
//! `y = (x − mean) / sqrt(var + eps) · weight + bias`, with the biased variance
//! (as PyTorch and Hugging Face BERT), statistics in f32 for f16/bf16 and f64
//! for f64.
//!
//! The fused op runs on the CPU. On other devices [`layer_norm`] composes the
//! same computation from candle ops ([`layer_norm_composed`]), whose CUDA
//! kernels candle provides.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType, D};
use num_traits::{Float, Zero};
use rayon::prelude::*;

use super::buffer::output_buffer;
use super::dtype::{Accum, FloatElem};
use super::layout::{check_same_device, check_same_dtype, contiguous_slice};
use crate::ops::dtype::with_float_dtype;

const OP: &str = "layer_norm";

/// Rows per parallel work item of the backward: fixed, so that the order in
/// which the weight and bias gradients are summed never depends on the number
/// of threads.
const CHUNK_ROWS: usize = 32;

/// Below this many elements the rows run on the calling thread.
const PARALLEL_MIN_ELEMS: usize = 1 << 15;

/// LayerNorm of `x` `[.., H]` over its last dimension with `weight` and `bias`
/// `[H]`. Differentiable with respect to all three.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    check_inputs(x, weight, bias, eps)?;
    if !x.device().is_cpu() {
        return layer_norm_composed(x, weight, bias, eps);
    }
    let (x, weight, bias) = (x.contiguous()?, weight.contiguous()?, bias.contiguous()?);
    x.apply_op3(&weight, &bias, LayerNormOp { eps })
}

/// The same LayerNorm composed from candle tensor ops (each recording its
/// backward): the path on non-CPU devices and the comparison in tests.
pub fn layer_norm_composed(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    check_inputs(x, weight, bias, eps)?;
    let dtype = x.dtype();
    let acc = super::dtype::accumulation_dtype(dtype);
    let x = x.to_dtype(acc)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let variance = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(variance + eps)?.sqrt()?)?;
    normed
        .broadcast_mul(&weight.to_dtype(acc)?)?
        .broadcast_add(&bias.to_dtype(acc)?)?
        .to_dtype(dtype)
}

fn check_inputs(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<()> {
    if x.rank() == 0 {
        candle_core::bail!("{OP}: x must have rank >= 1 [.., H], got a scalar");
    }
    let h = x.dim(D::Minus1)?;
    for (what, t) in [("weight", weight), ("bias", bias)] {
        if t.dims() != [h] {
            candle_core::bail!(
                "{OP}: {what} must have shape [{h}] (the last dimension of x {:?}), got {:?}",
                x.dims(),
                t.dims()
            );
        }
        check_same_dtype(OP, ("x", x), (what, t))?;
        check_same_device(OP, ("x", x), (what, t))?;
    }
    with_float_dtype!(OP, "x", x.dtype(), _T => Ok(()))?;
    if eps.is_nan() || eps <= 0.0 {
        candle_core::bail!("{OP}: eps must be positive, got {eps}");
    }
    Ok(())
}

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

fn forward_cpu<T: FloatElem>(x: &[T], weight: &[T], bias: &[T], eps: f64) -> Vec<T> {
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
fn backward_cpu<T: FloatElem>(x: &[T], weight: &[T], g: &[T], eps: f64) -> Vec<T> {
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

/// Forward: `(x, weight, bias) -> y`.
struct LayerNormOp {
    eps: f64,
}

/// Backward: `(x, weight, dy) -> [dx | dweight | dbias]`, split by the forward's `bwd`.
struct LayerNormBackward {
    eps: f64,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        with_float_dtype!(OP, "x", sx.dtype(), T => {
            let y = forward_cpu::<T>(
                contiguous_slice(OP, sx, lx)?,
                contiguous_slice(OP, sw, lw)?,
                contiguous_slice(OP, sb, lb)?,
                self.eps,
            );
            Ok((T::to_cpu_storage_owned(y), lx.shape().clone()))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grads = x.apply_op3(
            weight,
            &dy.contiguous()?,
            LayerNormBackward { eps: self.eps },
        )?;
        let (n, h) = (x.elem_count(), weight.elem_count());
        let dx = grads.narrow(0, 0, n)?.reshape(x.dims())?;
        let dweight = grads.narrow(0, n, h)?;
        let dbias = grads.narrow(0, n + h, h)?;
        Ok((Some(dx), Some(dweight), Some(dbias)))
    }
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        with_float_dtype!(OP, "x", sx.dtype(), T => {
            let grads = backward_cpu::<T>(
                contiguous_slice(OP, sx, lx)?,
                contiguous_slice(OP, sw, lw)?,
                contiguous_slice(OP, sg, lg)?,
                self.eps,
            );
            let len = grads.len();
            Ok((T::to_cpu_storage_owned(grads), Shape::from(len)))
        })
    }
}
