//! Masked mean pooling: each sequence's mean token vector, counting only the
//! tokens its attention mask marks as real, fused into one pass forward and one
//! pass backward on the CPU and on CUDA (`kernels/mean_pool.cu`).
//!
//! [`masked_mean_pool`] validates its inputs and applies the private `MeanPool`
//! op, which reads the mask in its own dtype (`mask != 0`) on every device; its
//! backward applies `MeanPoolBackward`, whose backward is `MeanPool` again (the
//! two are adjoint linear maps), so gradients of any order stay fused.
//!
//! The CPU path is here; `cuda.rs` holds the launch plans of
//! `kernels/mean_pool.cu`, run by the CUDA device and by the host harness.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};

mod cpu;
#[cfg(any(feature = "cuda", feature = "host-kernels"))]
mod cuda;

use cpu::{backward_cpu, cpu_flags, forward_cpu};

use super::dtype::check_float_dtype;
use super::layout::{check_rank, check_same_device, View};
use crate::ops::dtype::with_float_dtype;

const OP: &str = "masked_mean_pool";

/// The token count is clamped at this value, as sentence-transformers does
/// (`torch.clamp(mask.sum(1), min=1e-9)`): a row with no real token pools to
/// `0 / 1e-9 = 0`, never NaN.
pub const MIN_COUNT: f64 = 1e-9;

/// Mean of the token vectors of `hidden` (`[B,T,H]`) whose `mask` (`[B,T]`) value
/// is non-zero; returns `[B,H]` in the dtype of `hidden`.
///
/// `out[b,h] = Σ_t [mask[b,t] ≠ 0]·hidden[b,t,h] / max(count_b, 1e-9)` where
/// `count_b` is the number of tokens with a non-zero mask value. For 0/1 masks
/// this is exactly sentence-transformers' mean pooling; other non-zero values
/// count as 1 (they are not weights). A row with no real token gives a zero
/// vector. Padding tokens are never read, so a NaN or inf there does not leak
/// into the result (unlike `hidden * mask`).
///
/// - `hidden`: f32, f16, bf16 or f64, any strides. Sums accumulate in f32 (f64
///   for f64).
/// - `mask`: u8, u32, i16, i32, i64, f8e4m3, f16, bf16, f32 or f64 (what tokenizers and
///   users hand in), on the same device as `hidden`, any strides.
/// - Backward: `dhidden[b,t,:] = [mask[b,t] ≠ 0]·dout[b,:] / count_b`, zero for
///   padding tokens and for rows with no real token; the mask gets no gradient.
///
/// Errors (never a panic): `hidden` not of rank 3, `mask` not of rank 2, mask
/// `[B,T]` not matching hidden's, tensors on different devices, an integer
/// `hidden`, or a mask dtype not listed above. Each message names the problem.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use sentence_mtl::ops::masked_mean_pool;
///
/// // One sequence of three tokens, the last one padding.
/// let hidden = Tensor::new(&[[[1f32, 2.], [3., 4.], [100., 100.]]], &Device::Cpu)?;
/// let mask = Tensor::new(&[[1i64, 1, 0]], &Device::Cpu)?;
/// let pooled = masked_mean_pool(&hidden, &mask)?;
/// assert_eq!(pooled.to_vec2::<f32>()?, [[2., 3.]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn masked_mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    check_rank(OP, "hidden", hidden, 3, "[B,T,H]")?;
    check_rank(OP, "mask", mask, 2, "[B,T]")?;
    let (b, t, _) = hidden.dims3()?;
    if mask.dims() != [b, t] {
        candle_core::bail!(
            "{OP}: mask shape {:?} does not match hidden's [B,T] = [{b}, {t}] (hidden shape {:?})",
            mask.dims(),
            hidden.dims()
        );
    }
    check_same_device(OP, ("hidden", hidden), ("mask", mask))?;
    check_float_dtype(OP, "hidden", hidden.dtype())?;
    check_mask_dtype(mask.dtype())?;
    hidden.apply_op2(mask, MeanPool)
}

/// The backward pass of [`masked_mean_pool`] on its own: the gradient of `hidden`
/// (`[B,T,H]`) given the gradient `grad_pooled` (`[B,H]`) of the pooled output,
/// `dhidden[b,t,:] = [mask[b,t] ≠ 0]·grad_pooled[b,:] / count_b` (zeros for padding
/// tokens and rows with no real token). `Tensor::backward` runs this for you;
/// call it directly for hand-written gradients or to time the kernel. Same
/// dtypes, mask rules and errors as [`masked_mean_pool`].
///
/// ```
/// use candle_core::{Device, Tensor};
/// use sentence_mtl::ops::mean_pool::masked_mean_pool_backward;
///
/// let grad_pooled = Tensor::new(&[[2f32, 4.]], &Device::Cpu)?;
/// let mask = Tensor::new(&[[1u8, 0, 1]], &Device::Cpu)?;
/// let grad_hidden = masked_mean_pool_backward(&grad_pooled, &mask)?;
/// assert_eq!(grad_hidden.to_vec3::<f32>()?, [[[1., 2.], [0., 0.], [1., 2.]]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn masked_mean_pool_backward(grad_pooled: &Tensor, mask: &Tensor) -> Result<Tensor> {
    check_rank(OP, "grad_pooled", grad_pooled, 2, "[B,H]")?;
    check_rank(OP, "mask", mask, 2, "[B,T]")?;
    if mask.dim(0)? != grad_pooled.dim(0)? {
        candle_core::bail!(
            "{OP}: mask shape {:?} does not match grad_pooled's batch size (shape {:?})",
            mask.dims(),
            grad_pooled.dims()
        );
    }
    check_same_device(OP, ("grad_pooled", grad_pooled), ("mask", mask))?;
    check_float_dtype(OP, "grad_pooled", grad_pooled.dtype())?;
    check_mask_dtype(mask.dtype())?;
    grad_pooled.apply_op2(mask, MeanPoolBackward)
}

/// `Err` unless the ops can read a mask of `dtype` (on every device: the CPU
/// path and the kernels read it in its own dtype).
fn check_mask_dtype(dtype: DType) -> Result<()> {
    match dtype {
        DType::U8
        | DType::U32
        | DType::I16
        | DType::I32
        | DType::I64
        | DType::F16
        | DType::BF16
        | DType::F32
        | DType::F64
        | DType::F8E4M3 => Ok(()),
        other => candle_core::bail!(
            "{OP}: unsupported dtype {other:?} for mask \
             (expected u8, u32, i16, i32, i64, f8e4m3, f16, bf16, f32 or f64)"
        ),
    }
}

/// Forward: (`hidden` `[B,T,H]`, mask `[B,T]`) -> pooled `[B,H]`.
struct MeanPool;

/// Backward: (gradient of the pooled output `[B,H]`, mask `[B,T]`)
/// -> gradient of `hidden` `[B,T,H]`.
struct MeanPoolBackward;

/// The strided views of the forward op's inputs, checked: ranks and matching [B,T].
fn forward_views(hidden: &Layout, flags: &Layout) -> Result<(View<3>, View<2>)> {
    let hv = View::<3>::new(OP, "hidden", hidden)?;
    let fv = View::<2>::new(OP, "mask", flags)?;
    if fv.dims != [hv.dims[0], hv.dims[1]] {
        candle_core::bail!(
            "{OP}: mask shape {:?} does not match hidden's [B,T] (hidden shape {:?})",
            fv.dims,
            hv.dims
        );
    }
    Ok((hv, fv))
}

/// The strided views of the backward op's inputs, checked: ranks and matching B.
fn backward_views(grad: &Layout, flags: &Layout) -> Result<(View<2>, View<2>)> {
    let gv = View::<2>::new(OP, "gradient of the pooled output", grad)?;
    let fv = View::<2>::new(OP, "mask", flags)?;
    if fv.dims[0] != gv.dims[0] {
        candle_core::bail!(
            "{OP}: mask shape {:?} does not match the pooled gradient's batch size (shape {:?})",
            fv.dims,
            gv.dims
        );
    }
    Ok((gv, fv))
}

impl CustomOp2 for MeanPool {
    fn name(&self) -> &'static str {
        "masked-mean-pool"
    }

    fn cpu_fwd(
        &self,
        hidden: &CpuStorage,
        hidden_layout: &Layout,
        flags: &CpuStorage,
        flags_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (hv, fv) = forward_views(hidden_layout, flags_layout)?;
        let shape = Shape::from((hv.dims[0], hv.dims[2]));
        #[cfg(feature = "host-kernels")]
        if super::host::enabled() {
            let pooled = super::host::on_host([hidden, flags], |exec, [h, m]| {
                cuda::forward(exec, h, hv, m, fv)
            })?;
            return Ok((pooled, shape));
        }
        let flags = cpu_flags(flags)?;
        with_float_dtype!(OP, "hidden", hidden.dtype(), T => {
            let pooled = forward_cpu::<T>(hidden.as_slice::<T>()?, hv, &flags, fv);
            Ok((T::to_cpu_storage_owned(pooled), shape))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        hidden: &candle_core::CudaStorage,
        hidden_layout: &Layout,
        flags: &candle_core::CudaStorage,
        flags_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (hv, fv) = forward_views(hidden_layout, flags_layout)?;
        check_float_dtype(OP, "hidden", hidden.dtype())?;
        let shape = Shape::from((hv.dims[0], hv.dims[2]));
        let exec = super::cuda::CudaExecutor::new(hidden.device());
        Ok((cuda::forward(&exec, hidden, hv, flags, fv)?, shape))
    }

    fn bwd(
        &self,
        _hidden: &Tensor,
        flags: &Tensor,
        _pooled: &Tensor,
        grad_pooled: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad_hidden = grad_pooled.apply_op2(flags, MeanPoolBackward)?;
        Ok((Some(grad_hidden), None))
    }
}

impl CustomOp2 for MeanPoolBackward {
    fn name(&self) -> &'static str {
        "masked-mean-pool-backward"
    }

    fn cpu_fwd(
        &self,
        grad: &CpuStorage,
        grad_layout: &Layout,
        flags: &CpuStorage,
        flags_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (gv, fv) = backward_views(grad_layout, flags_layout)?;
        let shape = Shape::from((gv.dims[0], fv.dims[1], gv.dims[1]));
        #[cfg(feature = "host-kernels")]
        if super::host::enabled() {
            let grad_hidden = super::host::on_host([grad, flags], |exec, [g, m]| {
                cuda::backward(exec, g, gv, m, fv)
            })?;
            return Ok((grad_hidden, shape));
        }
        let flags = cpu_flags(flags)?;
        with_float_dtype!(OP, "gradient", grad.dtype(), T => {
            let grad_hidden = backward_cpu::<T>(grad.as_slice::<T>()?, gv, &flags, fv);
            Ok((T::to_cpu_storage_owned(grad_hidden), shape))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        grad: &candle_core::CudaStorage,
        grad_layout: &Layout,
        flags: &candle_core::CudaStorage,
        flags_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (gv, fv) = backward_views(grad_layout, flags_layout)?;
        check_float_dtype(OP, "gradient", grad.dtype())?;
        let shape = Shape::from((gv.dims[0], fv.dims[1], gv.dims[1]));
        let exec = super::cuda::CudaExecutor::new(grad.device());
        Ok((cuda::backward(&exec, grad, gv, flags, fv)?, shape))
    }

    /// The backward map `dout -> dhidden` is the transpose of the forward map, so
    /// its own backward is the forward pooling.
    fn bwd(
        &self,
        _grad_pooled: &Tensor,
        flags: &Tensor,
        _grad_hidden: &Tensor,
        grad_grad_hidden: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad_grad_pooled = grad_grad_hidden.apply_op2(flags, MeanPool)?;
        Ok((Some(grad_grad_pooled), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The private ops see only what the public fns hand them, but still refuse
    /// a mask they cannot read rather than misread it.
    #[test]
    fn ops_reject_masks_they_cannot_read() -> Result<()> {
        let hidden = Tensor::ones((2, 3, 4), DType::F32, &Device::Cpu)?;
        let mask = Tensor::from_raw_buffer(&[1u8; 6], DType::F8E8M0, &[2, 3], &Device::Cpu)?;
        let grad = Tensor::ones((2, 4), DType::F32, &Device::Cpu)?;
        for result in [
            hidden.apply_op2(&mask, MeanPool),
            grad.apply_op2(&mask, MeanPoolBackward),
        ] {
            let message = result.expect_err("f8e8m0 mask accepted").to_string();
            assert!(
                message.contains("unsupported dtype F8E8M0 for mask"),
                "{message}"
            );
        }
        Ok(())
    }

    /// The ops check the layouts they get too: a mask of the wrong shape is an Err.
    #[test]
    fn ops_check_shapes_from_the_layouts() -> Result<()> {
        let hidden = Tensor::ones((2, 3, 4), DType::F32, &Device::Cpu)?;
        let mask = Tensor::ones((2, 5), DType::U8, &Device::Cpu)?;
        let message = hidden
            .apply_op2(&mask, MeanPool)
            .expect_err("bad shape")
            .to_string();
        assert!(
            message.contains("does not match hidden's [B,T]"),
            "{message}"
        );
        Ok(())
    }
}
