//! LayerNorm over the last dimension, fused forward and backward on the CPU and
//! on CUDA (`kernels/layer_norm.cu`), optionally with the residual added first.
//!
//! candle-nn's fused `layer_norm` records no backward, so training needs either
//! LayerNorm composed from candle ops (about ten passes over the activations
//! forward and more backward, two of them candle's slow strided sums over rows
//! for the weight and bias gradients) or this op: the forward is one pass per
//! row, the backward one more pass that writes `dx` and sums `dweight` and
//! `dbias` per chunk of rows, chunks in parallel (CPU), or per block of rows,
//! the blocks' partial sums then reduced by a second launch in a fixed order
//! (CUDA: no atomics).
//!
//! `y = (x − mean) / sqrt(var + eps) · weight + bias`, with the biased variance
//! (as PyTorch and Hugging Face BERT), statistics in f32 for f16/bf16 and f64
//! for f64. [`layer_norm_residual`] normalises `x + residual` (the sum rounded
//! to the dtype, as `x + residual` is) in the same op: on CUDA the sum is never
//! written; the forward keeps only the per-row mean and `1/sqrt(var + eps)`
//! (accumulator dtype, on the device) and the backward reads `x` and `residual`
//! again to recompute it. Inputs are made contiguous first (a copy only for a
//! strided input), as on the CPU.
//!
//! The CPU path is in `cpu.rs`; `cuda.rs` holds the launch plans of
//! `kernels/layer_norm.cu`, run by the CUDA device and by the host harness
//! (inside `ops::host::run`). On devices other than the CPU and CUDA,
//! [`layer_norm`] composes the computation from candle ops
//! ([`layer_norm_composed`]).

use std::sync::{Arc, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType, D};

mod cpu;
#[cfg(any(feature = "cuda", feature = "host-kernels"))]
mod cuda;

use cpu::{add_rows, backward_cpu, forward_cpu};

use super::layout::{check_column_vectors, check_same_device, check_same_dtype, contiguous_slice};
use crate::ops::dtype::with_float_dtype;

const OP: &str = "layer_norm";
const OP_RESIDUAL: &str = "layer_norm_residual";

/// LayerNorm of `x` `[.., H]` over its last dimension with `weight` and `bias`
/// `[H]`. Differentiable with respect to all three. Fused on the CPU and on
/// CUDA; composed from candle ops on other devices.
///
/// Errors: `x` a scalar, `weight` or `bias` not `[H]`, dtypes or devices that
/// differ, a non-float dtype, `eps` not positive.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    check_inputs(OP, x, weight, bias, eps)?;
    if !(x.device().is_cpu() || x.device().is_cuda()) {
        return layer_norm_composed(x, weight, bias, eps);
    }
    let (x, weight, bias) = (x.contiguous()?, weight.contiguous()?, bias.contiguous()?);
    x.apply_op3(
        &weight,
        &bias,
        LayerNormOp {
            eps,
            stats: SavedStats::default(),
        },
    )
}

/// `layer_norm(x + residual, weight, bias, eps)` in one op: the post-norm
/// residual block of BERT. `residual` has the shape, dtype and device of `x`.
/// Differentiable with respect to all four (`x` and `residual` get the same
/// gradient).
///
/// On CUDA one kernel adds and normalises, and the sum is never written; on
/// the CPU this is `x + residual` then the CPU [`layer_norm`] (the same
/// figures as writing it so); on other devices the composed ops.
///
/// Errors: those of [`layer_norm`], and a `residual` whose shape, dtype or
/// device differs from `x`'s.
pub fn layer_norm_residual(
    x: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    check_inputs(OP_RESIDUAL, x, weight, bias, eps)?;
    if residual.dims() != x.dims() {
        candle_core::bail!(
            "{OP_RESIDUAL}: residual shape {:?} does not match x's {:?}",
            residual.dims(),
            x.dims()
        );
    }
    check_same_dtype(OP_RESIDUAL, ("x", x), ("residual", residual))?;
    check_same_device(OP_RESIDUAL, ("x", x), ("residual", residual))?;
    if !super::runs_kernels(x.device()) {
        return layer_norm(&(x + residual)?, weight, bias, eps);
    }
    // CustomOp3 takes three tensors: weight and bias travel as one [2H].
    let weight_bias = Tensor::cat(&[weight, bias], 0)?;
    x.contiguous()?.apply_op3(
        &residual.contiguous()?,
        &weight_bias,
        LayerNormResidualOp {
            eps,
            stats: SavedStats::default(),
        },
    )
}

/// The same LayerNorm composed from candle tensor ops (each recording its
/// backward): the path on devices without a kernel and the comparison in tests.
pub fn layer_norm_composed(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    check_inputs(OP, x, weight, bias, eps)?;
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

fn check_inputs(op: &str, x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<()> {
    check_column_vectors(op, x, &[("weight", weight), ("bias", bias)])?;
    if eps.is_nan() || eps <= 0.0 {
        candle_core::bail!("{op}: eps must be positive, got {eps}");
    }
    Ok(())
}

/// The forward's per-row statistics `[mean (rows) | rstd (rows)]` in the
/// accumulator dtype, left on the device by the kernel path for the backward.
/// (Without a kernel path none is ever made.)
enum Stats {
    #[cfg(feature = "cuda")]
    Cuda(candle_core::CudaStorage),
    #[cfg(feature = "host-kernels")]
    Host(super::host::HostBuffer),
}

/// Shared by a forward op and its backward op.
type SavedStats = Arc<OnceLock<Stats>>;

/// `(rows, H)` of a rank ≥ 1 layout.
#[cfg(any(feature = "cuda", feature = "host-kernels"))]
fn rows_and_h(layout: &Layout) -> Result<(usize, usize)> {
    let Some((&h, outer)) = layout.dims().split_last() else {
        candle_core::bail!("{OP}: x must have rank >= 1 [.., H], got a scalar");
    };
    Ok((outer.iter().product(), h))
}

/// Forward: `(x, weight, bias) -> y`.
struct LayerNormOp {
    eps: f64,
    stats: SavedStats,
}

/// Backward: `(x, weight, dy) -> [dx | dweight | dbias]`, split by the forward's `bwd`.
struct LayerNormBackward {
    eps: f64,
    #[cfg_attr(not(any(feature = "cuda", feature = "host-kernels")), allow(dead_code))]
    stats: SavedStats,
}

/// Forward with the residual: `(x, residual, [weight | bias]) -> y`.
struct LayerNormResidualOp {
    eps: f64,
    stats: SavedStats,
}

/// Backward with the residual: `(x, residual, dy) -> [dx | dweight | dbias]`
/// (`dx` is also the residual's gradient). The weight rides in the struct
/// (`[weight | bias]`, contiguous): CustomOp3 has room for three inputs, and
/// this op has no backward of its own.
struct LayerNormResidualBackward {
    eps: f64,
    #[cfg_attr(not(any(feature = "cuda", feature = "host-kernels")), allow(dead_code))]
    stats: SavedStats,
    weight_bias: Tensor,
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
        #[cfg(feature = "host-kernels")]
        if super::host::enabled() {
            let y = host::forward(self, (sx, lx), None, (sw, lw.start_offset()), (sb, lb))?;
            return Ok((y, lx.shape().clone()));
        }
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sw: &candle_core::CudaStorage,
        lw: &Layout,
        sb: &candle_core::CudaStorage,
        lb: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let exec = super::cuda::CudaExecutor::new(sx.device());
        let (y, stats) = kernel_forward(
            &exec,
            self.eps,
            (sx, lx),
            None,
            (sw, lw.start_offset()),
            (sb, lb),
        )?;
        let _ = self.stats.set(Stats::Cuda(stats));
        Ok((y, lx.shape().clone()))
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
            LayerNormBackward {
                eps: self.eps,
                stats: self.stats.clone(),
            },
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
        #[cfg(feature = "host-kernels")]
        if super::host::enabled() {
            let grads = host::backward(self.eps, &self.stats, (sx, lx), None, (sw, lw), (sg, lg))?;
            return Ok((grads, Shape::from(grads_len(lx)?)));
        }
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sw: &candle_core::CudaStorage,
        lw: &Layout,
        sg: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let exec = super::cuda::CudaExecutor::new(sx.device());
        let grads = kernel_backward(
            &exec,
            self.eps,
            cuda_stats(&self.stats),
            (sx, lx),
            None,
            (sw, lw.start_offset()),
            (sg, lg),
        )?;
        Ok((grads, Shape::from(grads_len(lx)?)))
    }
}

impl CustomOp3 for LayerNormResidualOp {
    fn name(&self) -> &'static str {
        "layer-norm-residual"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sr: &CpuStorage,
        lr: &Layout,
        swb: &CpuStorage,
        lwb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        #[cfg(feature = "host-kernels")]
        if super::host::enabled() {
            let y = host::forward(
                self,
                (sx, lx),
                Some((sr, lr)),
                (swb, lwb.start_offset()),
                (swb, lwb),
            )?;
            return Ok((y, lx.shape().clone()));
        }
        // (`layer_norm_residual` adds first on the CPU; this runs only for a
        // graph built inside the harness and replayed outside it.)
        with_float_dtype!(OP_RESIDUAL, "x", sx.dtype(), T => {
            let wb = contiguous_slice::<T>(OP_RESIDUAL, swb, lwb)?;
            let (weight, bias) = wb.split_at(wb.len() / 2);
            let sum = add_rows(
                contiguous_slice(OP_RESIDUAL, sx, lx)?,
                contiguous_slice(OP_RESIDUAL, sr, lr)?,
            );
            let y = forward_cpu::<T>(&sum, weight, bias, self.eps);
            Ok((T::to_cpu_storage_owned(y), lx.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sr: &candle_core::CudaStorage,
        lr: &Layout,
        swb: &candle_core::CudaStorage,
        lwb: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let exec = super::cuda::CudaExecutor::new(sx.device());
        let (y, stats) = kernel_forward(
            &exec,
            self.eps,
            (sx, lx),
            Some((sr, lr)),
            (swb, lwb.start_offset()),
            (swb, lwb),
        )?;
        let _ = self.stats.set(Stats::Cuda(stats));
        Ok((y, lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        residual: &Tensor,
        weight_bias: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grads = x.apply_op3(
            residual,
            &dy.contiguous()?,
            LayerNormResidualBackward {
                eps: self.eps,
                stats: self.stats.clone(),
                weight_bias: weight_bias.contiguous()?,
            },
        )?;
        let (n, h2) = (x.elem_count(), weight_bias.elem_count());
        let dx = grads.narrow(0, 0, n)?.reshape(x.dims())?;
        let dweight_bias = grads.narrow(0, n, h2)?;
        Ok((Some(dx.clone()), Some(dx), Some(dweight_bias)))
    }
}

impl CustomOp3 for LayerNormResidualBackward {
    fn name(&self) -> &'static str {
        "layer-norm-residual-backward"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sr: &CpuStorage,
        lr: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (swb, lwb) = self.weight_bias.storage_and_layout();
        let candle_core::Storage::Cpu(swb) = &*swb else {
            candle_core::bail!("{OP_RESIDUAL}: the weight is not on the CPU");
        };
        #[cfg(feature = "host-kernels")]
        if super::host::enabled() {
            let grads = host::backward(
                self.eps,
                &self.stats,
                (sx, lx),
                Some((sr, lr)),
                (swb, lwb),
                (sg, lg),
            )?;
            return Ok((grads, Shape::from(grads_len(lx)?)));
        }
        with_float_dtype!(OP_RESIDUAL, "x", sx.dtype(), T => {
            let wb = contiguous_slice::<T>(OP_RESIDUAL, swb, lwb)?;
            let sum = add_rows(
                contiguous_slice(OP_RESIDUAL, sx, lx)?,
                contiguous_slice(OP_RESIDUAL, sr, lr)?,
            );
            let grads = backward_cpu::<T>(
                &sum,
                &wb[..wb.len() / 2],
                contiguous_slice(OP_RESIDUAL, sg, lg)?,
                self.eps,
            );
            let len = grads.len();
            Ok((T::to_cpu_storage_owned(grads), Shape::from(len)))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sr: &candle_core::CudaStorage,
        lr: &Layout,
        sg: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (swb, lwb) = self.weight_bias.storage_and_layout();
        let candle_core::Storage::Cuda(swb) = &*swb else {
            candle_core::bail!("{OP_RESIDUAL}: the weight is not on the CUDA device");
        };
        let exec = super::cuda::CudaExecutor::new(sx.device());
        let grads = kernel_backward(
            &exec,
            self.eps,
            cuda_stats(&self.stats),
            (sx, lx),
            Some((sr, lr)),
            (swb, lwb.start_offset()),
            (sg, lg),
        )?;
        Ok((grads, Shape::from(grads_len(lx)?)))
    }
}

/// The length of the backward's `[dx | dweight | dbias]`.
#[cfg(any(feature = "cuda", feature = "host-kernels"))]
fn grads_len(lx: &Layout) -> Result<usize> {
    let (rows, h) = rows_and_h(lx)?;
    Ok(rows * h + 2 * h)
}

/// A contiguous input as a kernel operand (`Err` for a strided layout: the
/// public fns make every input contiguous).
#[cfg(any(feature = "cuda", feature = "host-kernels"))]
fn operand<'a, S>(what: &str, storage: &'a S, layout: &Layout) -> Result<cuda::Operand<'a, S>> {
    if !layout.is_contiguous() {
        candle_core::bail!("{OP}: internal error, {what} is not contiguous");
    }
    Ok(cuda::Operand {
        storage,
        offset: layout.start_offset(),
    })
}

/// The kernel forward on `exec`: `y` and the statistics. `weight` is given by
/// its offset in its storage; `bias` by its layout, whose offset is moved past
/// the weight when both share one `[weight | bias]` storage (the residual op).
#[cfg(any(feature = "cuda", feature = "host-kernels"))]
fn kernel_forward<E: super::launch::Executor>(
    exec: &E,
    eps: f64,
    (sx, lx): (&E::Storage, &Layout),
    residual: Option<(&E::Storage, &Layout)>,
    (sw, w_offset): (&E::Storage, usize),
    (sb, lb): (&E::Storage, &Layout),
) -> Result<(E::Storage, E::Storage)> {
    let (rows, h) = rows_and_h(lx)?;
    let dims = cuda::Dims { rows, h, eps };
    let x = operand("x", sx, lx)?;
    let residual = residual
        .map(|(s, l)| operand("residual", s, l))
        .transpose()?;
    let weight = cuda::Operand {
        storage: sw,
        offset: w_offset,
    };
    let mut bias = operand("bias", sb, lb)?;
    if residual.is_some() {
        bias.offset += h;
    }
    cuda::forward(exec, dims, x, residual, weight, bias)
}

/// The kernel backward on `exec`: `[dx | dweight | dbias]`, from the forward's
/// statistics when there are some.
#[cfg(any(feature = "cuda", feature = "host-kernels"))]
fn kernel_backward<E: super::launch::Executor>(
    exec: &E,
    eps: f64,
    stats: Option<&E::Storage>,
    (sx, lx): (&E::Storage, &Layout),
    residual: Option<(&E::Storage, &Layout)>,
    (sw, w_offset): (&E::Storage, usize),
    (sg, lg): (&E::Storage, &Layout),
) -> Result<E::Storage> {
    let (rows, h) = rows_and_h(lx)?;
    let dims = cuda::Dims { rows, h, eps };
    let x = operand("x", sx, lx)?;
    let residual = residual
        .map(|(s, l)| operand("residual", s, l))
        .transpose()?;
    let weight = cuda::Operand {
        storage: sw,
        offset: w_offset,
    };
    let dy = operand("dy", sg, lg)?;
    cuda::backward(exec, dims, x, residual, weight, dy, stats)
}

/// The statistics a CUDA forward left, if any.
#[cfg(feature = "cuda")]
fn cuda_stats(stats: &SavedStats) -> Option<&candle_core::CudaStorage> {
    match stats.get() {
        Some(Stats::Cuda(s)) => Some(s),
        _ => None,
    }
}

/// The kernel path on the host harness: CPU storages uploaded, the same plans.
#[cfg(feature = "host-kernels")]
mod host {
    use candle_core::{CpuStorage, Layout, Result};

    use super::{kernel_backward, kernel_forward, SavedStats, Stats};
    use crate::ops::host::{HostBuffer, HostExecutor};

    /// The ops whose forward keeps statistics.
    pub(super) trait KeepsStats {
        fn eps(&self) -> f64;
        fn stats(&self) -> &SavedStats;
    }

    impl KeepsStats for super::LayerNormOp {
        fn eps(&self) -> f64 {
            self.eps
        }
        fn stats(&self) -> &SavedStats {
            &self.stats
        }
    }

    impl KeepsStats for super::LayerNormResidualOp {
        fn eps(&self) -> f64 {
            self.eps
        }
        fn stats(&self) -> &SavedStats {
            &self.stats
        }
    }

    /// The forward on the harness (`bias` is `weight`'s storage for the
    /// residual op); keeps the statistics in `op`.
    pub(super) fn forward(
        op: &impl KeepsStats,
        (sx, lx): (&CpuStorage, &Layout),
        residual: Option<(&CpuStorage, &Layout)>,
        (sw, w_offset): (&CpuStorage, usize),
        (sb, lb): (&CpuStorage, &Layout),
    ) -> Result<CpuStorage> {
        let x = HostBuffer::upload(sx)?;
        let r = residual.map(|(s, _)| HostBuffer::upload(s)).transpose()?;
        let w = HostBuffer::upload(sw)?;
        let b = HostBuffer::upload(sb)?;
        let (y, stats) = kernel_forward(
            &HostExecutor,
            op.eps(),
            (&x, lx),
            r.as_ref().zip(residual).map(|(r, (_, l))| (r, l)),
            (&w, w_offset),
            (&b, lb),
        )?;
        let _ = op.stats().set(Stats::Host(stats));
        y.download()
    }

    /// The backward on the harness, from the forward's statistics when it ran
    /// on the harness too.
    pub(super) fn backward(
        eps: f64,
        stats: &SavedStats,
        (sx, lx): (&CpuStorage, &Layout),
        residual: Option<(&CpuStorage, &Layout)>,
        (sw, lw): (&CpuStorage, &Layout),
        (sg, lg): (&CpuStorage, &Layout),
    ) -> Result<CpuStorage> {
        let x = HostBuffer::upload(sx)?;
        let r = residual.map(|(s, _)| HostBuffer::upload(s)).transpose()?;
        let w = HostBuffer::upload(sw)?;
        let g = HostBuffer::upload(sg)?;
        let stats = match stats.get() {
            Some(Stats::Host(s)) => Some(s),
            _ => None,
        };
        kernel_backward(
            &HostExecutor,
            eps,
            stats,
            (&x, lx),
            r.as_ref().zip(residual).map(|(r, (_, l))| (r, l)),
            (&w, lw.start_offset()),
            (&g, lg),
        )?
        .download()
    }
}
