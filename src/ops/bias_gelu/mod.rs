//! Bias + GELU (exact, erf form) as one op: the epilogue of the encoder's
//! intermediate dense layer off the CPU, where the product is candle's matmul
//! (cuBLAS) without its bias, and this op adds the bias and applies GELU in one
//! pass over the activations (`kernels/bias_gelu.cu`) instead of two (candle's
//! `broadcast_add`, then `gelu_erf`), with a backward that makes `dx` and the
//! bias gradient in one pass plus a small reduction, instead of candle's five
//! element-wise ops and a strided sum.
//!
//! [`bias_gelu`] validates its inputs and applies the private `BiasGelu` op,
//! whose backward applies `BiasGeluBackward` on the saved x and bias (z = x + b
//! is recomputed, never stored). The CPU path (`cpu.rs`) is fused too; `cuda.rs`
//! holds the launch plans of the kernels, run by the CUDA device and, inside
//! `crate::ops::host::run`, by the host harness.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType};

mod cpu;
#[cfg(any(feature = "cuda", feature = "host-kernels"))]
mod cuda;

use cpu::{backward_cpu, forward_cpu};

use super::layout::{check_column_vectors, contiguous_slice};
use crate::ops::dtype::with_float_dtype;

const OP: &str = "bias_gelu";

/// `gelu(x + bias)` with `x` `[.., H]` and `bias` `[H]` added to every row, where
/// `gelu(z) = z·Φ(z) = z·(1 + erf(z/√2))/2` (the exact form BERT uses);
/// the shape of `x`. Differentiable with respect to both:
/// `dx = dy·gelu'(x + bias)` with `gelu'(z) = Φ(z) + z·φ(z)`, and
/// `dbias = Σ_rows dx` (the sum of the `dx` values as returned).
///
/// - dtypes f32, f16, bf16, f64; f16/bf16 evaluate in f32 (`z` is not rounded
///   to the input dtype before GELU), f64 in f64. Bias sums accumulate in f32
///   (f64 for f64), in a fixed order: the same bits on every run.
/// - `x` may be strided: the op copies it to a contiguous tensor first (as
///   `broadcast_add` would write a new one anyway); the backward keeps x (not
///   the output) and recomputes `x + bias`.
/// - On the CPU it runs fused loops (f32/f16/bf16 with `ops::math`'s erf, within
///   7e-7, as [`crate::ops::gelu_erf`]); on CUDA the kernels of
///   `kernels/bias_gelu.cu` (erf of the CUDA math library).
///
/// Errors (never a panic): `x` of rank 0, `bias` not of shape `[H]` (H the last
/// dimension of x), different dtypes or devices, a dtype other than the four.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use sentence_mtl::ops::bias_gelu;
///
/// let x = Tensor::new(&[[0f32, 1.], [-1., 2.]], &Device::Cpu)?;
/// let bias = Tensor::new(&[1f32, -1.], &Device::Cpu)?;
/// let y = bias_gelu(&x, &bias)?.to_vec2::<f32>()?;
/// assert!((y[0][0] - 0.841_344_7).abs() < 1e-5); // gelu(1)
/// assert_eq!(y[0][1], 0.0); // gelu(0)
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn bias_gelu(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    check_column_vectors(OP, x, &[("bias", bias)])?;
    x.contiguous()?.apply_op2(&bias.contiguous()?, BiasGelu)
}

/// The flattened problem: `rows` rows of `h` columns, and where x and bias start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dims {
    rows: usize,
    h: usize,
    x_offset: usize,
    bias_offset: usize,
}

impl Dims {
    /// From the layouts of x (contiguous, rank >= 1) and bias (`[H]`, contiguous).
    fn of(x: &Layout, bias: &Layout) -> Result<Self> {
        let h = *x
            .dims()
            .last()
            .ok_or_else(|| candle_core::Error::Msg(format!("{OP}: x must have rank >= 1")))?;
        if bias.dims() != [h] {
            candle_core::bail!(
                "{OP}: bias must have shape [{h}] (the last dimension of x {:?}), got {:?}",
                x.dims(),
                bias.dims()
            );
        }
        let (Some((x_offset, _)), Some((bias_offset, _))) =
            (x.contiguous_offsets(), bias.contiguous_offsets())
        else {
            candle_core::bail!("{OP}: internal error, input not contiguous");
        };
        Ok(Self {
            rows: x.shape().elem_count().checked_div(h).unwrap_or(0),
            h,
            x_offset,
            bias_offset,
        })
    }
}

/// Forward: (x `[.., H]`, bias `[H]`) -> `gelu(x + bias)` `[.., H]`.
struct BiasGelu;

/// Backward: (x, bias, dy) -> `[dx (x's element count) | dbias (H)]`, flat.
struct BiasGeluBackward;

impl CustomOp2 for BiasGelu {
    fn name(&self) -> &'static str {
        "bias-gelu"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = Dims::of(lx, lb)?;
        #[cfg(feature = "host-kernels")]
        if super::host::enabled() {
            let y = super::host::on_host([sx, sb], |exec, [x, b]| cuda::forward(exec, x, b, dims))?;
            return Ok((y, lx.shape().clone()));
        }
        let _ = dims;
        with_float_dtype!(OP, "x", sx.dtype(), T => {
            let y = forward_cpu::<T>(contiguous_slice(OP, sx, lx)?, contiguous_slice(OP, sb, lb)?);
            Ok((T::to_cpu_storage_owned(y), lx.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sb: &candle_core::CudaStorage,
        lb: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dims = Dims::of(lx, lb)?;
        super::dtype::check_float_dtype(OP, "x", sx.dtype())?;
        let exec = super::cuda::CudaExecutor::new(sx.device());
        Ok((cuda::forward(&exec, sx, sb, dims)?, lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        bias: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = x.elem_count();
        let h = bias.elem_count();
        let grads = x.apply_op3(bias, &dy.contiguous()?, BiasGeluBackward)?;
        let dx = grads.narrow(0, 0, n)?.reshape(x.shape())?;
        let dbias = grads.narrow(0, n, h)?;
        Ok((Some(dx), Some(dbias)))
    }
}

impl CustomOp3 for BiasGeluBackward {
    fn name(&self) -> &'static str {
        "bias-gelu-backward"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (dims, dy_offset) = backward_dims(lx, lb, lg)?;
        let shape = Shape::from(dims.rows * dims.h + dims.h);
        #[cfg(feature = "host-kernels")]
        if super::host::enabled() {
            let grads = super::host::on_host([sx, sb, sg], |exec, [x, b, g]| {
                cuda::backward(exec, x, b, (g, dy_offset), dims)
            })?;
            return Ok((grads, shape));
        }
        let _ = dy_offset;
        with_float_dtype!(OP, "x", sx.dtype(), T => {
            let grads = backward_cpu::<T>(
                contiguous_slice(OP, sx, lx)?,
                contiguous_slice(OP, sb, lb)?,
                contiguous_slice(OP, sg, lg)?,
            );
            Ok((T::to_cpu_storage_owned(grads), shape))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sb: &candle_core::CudaStorage,
        lb: &Layout,
        sg: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (dims, dy_offset) = backward_dims(lx, lb, lg)?;
        super::dtype::check_float_dtype(OP, "x", sx.dtype())?;
        let shape = Shape::from(dims.rows * dims.h + dims.h);
        let exec = super::cuda::CudaExecutor::new(sx.device());
        Ok((cuda::backward(&exec, sx, sb, (sg, dy_offset), dims)?, shape))
    }
}

/// The backward's dims and the incoming gradient's offset (it must be
/// contiguous with x's shape).
fn backward_dims(x: &Layout, bias: &Layout, dy: &Layout) -> Result<(Dims, usize)> {
    let dims = Dims::of(x, bias)?;
    if dy.dims() != x.dims() {
        candle_core::bail!(
            "{OP}: gradient shape {:?} does not match x's {:?}",
            dy.dims(),
            x.dims()
        );
    }
    let Some((dy_offset, _)) = dy.contiguous_offsets() else {
        candle_core::bail!("{OP}: internal error, gradient not contiguous");
    };
    Ok((dims, dy_offset))
}
