//! A fully connected layer `y = x·Wᵀ + b` as one op, with a fused backward on
//! the CPU.
//!
//! Composed from candle ops this is a matmul (whose CPU output is zero-filled
//! before the product writes it, and whose fresh pages fault in), a bias add
//! (one more pass over the output) and, backward, a transposed copy per
//! product plus a separate reduction: together up to twice the time of the
//! product itself on the sizes of a BERT layer. Here the output starts as the
//! bias, rows in place, and one gemm call accumulates `x·Wᵀ` into it; the
//! backward makes `dx = dy·W` and `dW = dyᵀ·x` by two gemm calls on the
//! strided views (no copies), and `db` by [`super::sum_rows`]. Gradients
//! nobody asked for (a frozen weight, a detached input) are not computed.
//!
//! f32 and f64 run the fused op on the CPU; f16, bf16 and other devices
//! compose candle ops ([`linear_composed`]).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::buffer::output_buffer;
use super::dtype::with_gemm_dtype;
use super::layout::{check_same_device, check_same_dtype, contiguous_slice};
use super::matmul::{Gemm, GemmFloat, Mat};

const OP: &str = "linear";

/// Below this many output elements the bias rows are copied on the calling thread.
const PARALLEL_MIN_ELEMS: usize = 1 << 15;

/// `x` `[.., in]` times `weight` `[out, in]` transposed, plus `bias` `[out]`
/// on every row: `[.., out]` (PyTorch's `nn.Linear`). Differentiable with
/// respect to all three.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    check_inputs(x, weight, bias)?;
    if !x.device().is_cpu() || !matches!(x.dtype(), DType::F32 | DType::F64) {
        return linear_composed(x, weight, bias);
    }
    let (out_size, in_size) = weight.dims2()?;
    let rows = x.elem_count() / in_size.max(1);
    let mut out_dims = x.dims().to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = out_size;
    }
    x.reshape((rows, in_size))?
        .contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, Linear)?
        .reshape(out_dims)
}

/// The same layer composed from candle ops (each recording its backward).
pub fn linear_composed(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    check_inputs(x, weight, bias)?;
    let (out_size, in_size) = weight.dims2()?;
    let rows = x.elem_count() / in_size.max(1);
    let mut out_dims = x.dims().to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = out_size;
    }
    x.reshape((rows, in_size))?
        .matmul(&weight.t()?)?
        .broadcast_add(bias)?
        .reshape(out_dims)
}

fn check_inputs(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<()> {
    let (out_size, in_size) = match weight.dims() {
        [o, i] => (*o, *i),
        dims => bail!("{OP}: weight must have rank 2 [out, in], got shape {dims:?}"),
    };
    match x.dims().last() {
        None => bail!("{OP}: x must have rank >= 1 [.., in], got a scalar"),
        Some(&n) if n != in_size => bail!(
            "{OP}: x {:?} has {n} features but weight {:?} takes {in_size}",
            x.dims(),
            weight.dims()
        ),
        Some(_) => {}
    }
    if bias.dims() != [out_size] {
        bail!(
            "{OP}: bias must have shape [{out_size}] (weight is {:?}), got {:?}",
            weight.dims(),
            bias.dims()
        );
    }
    check_same_dtype(OP, ("x", x), ("weight", weight))?;
    check_same_dtype(OP, ("x", x), ("bias", bias))?;
    check_same_device(OP, ("x", x), ("weight", weight))?;
    check_same_device(OP, ("x", x), ("bias", bias))?;
    crate::ops::dtype::with_float_dtype!(OP, "x", x.dtype(), _T => Ok(()))
}

fn forward_cpu<F: GemmFloat>(
    (x, weight, bias): (&[F], &[F], &[F]),
    (rows, in_size, out_size): (usize, usize, usize),
) -> Vec<F> {
    // SAFETY: every row is first set to the bias below.
    let mut y = unsafe { output_buffer::<F>(rows * out_size) };
    if out_size == 0 {
        return y;
    }
    if y.len() >= PARALLEL_MIN_ELEMS {
        y.par_chunks_mut(out_size)
            .for_each(|row| row.copy_from_slice(bias));
    } else {
        y.chunks_mut(out_size)
            .for_each(|row| row.copy_from_slice(bias));
    }
    // SAFETY: y is rows × out, x rows × in and weight out × in, all row-major
    // and distinct.
    unsafe {
        Gemm::new(F::one()).accumulate().parallel().run(
            (rows, out_size, in_size),
            Mat::rows(y.as_mut_ptr(), out_size),
            Mat::rows(x.as_ptr(), in_size),
            Mat::transposed(weight.as_ptr(), in_size),
        )
    };
    y
}

/// `[dx (rows × in) | dW (out × in)]`, either part left out when not wanted.
fn backward_cpu<F: GemmFloat>(
    (x, weight, dy): (&[F], &[F], &[F]),
    (rows, in_size, out_size): (usize, usize, usize),
    (want_dx, want_dw): (bool, bool),
) -> Vec<F> {
    let dx_len = if want_dx { rows * in_size } else { 0 };
    let dw_len = if want_dw { out_size * in_size } else { 0 };
    // SAFETY: both parts are fully written by gemm (which zeroes when k = 0).
    let mut grads = unsafe { output_buffer::<F>(dx_len + dw_len) };
    let (dx, dw) = grads.split_at_mut(dx_len);
    // SAFETY: dy is rows × out, weight out × in, x rows × in, row-major;
    // dx and dw are distinct parts of `grads`.
    unsafe {
        if want_dx {
            // dx = dy · W
            Gemm::new(F::one()).parallel().run(
                (rows, in_size, out_size),
                Mat::rows(dx.as_mut_ptr(), in_size),
                Mat::rows(dy.as_ptr(), out_size),
                Mat::rows(weight.as_ptr(), in_size),
            );
        }
        if want_dw {
            // dW = dyᵀ · x
            Gemm::new(F::one()).parallel().run(
                (out_size, in_size, rows),
                Mat::rows(dw.as_mut_ptr(), in_size),
                Mat::transposed(dy.as_ptr(), out_size),
                Mat::rows(x.as_ptr(), in_size),
            );
        }
    }
    grads
}

struct Linear;

/// `(x, weight, dy) -> [dx | dW]`.
struct LinearBackward {
    want_dx: bool,
    want_dw: bool,
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "linear"
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
        let (rows, in_size) = (lx.dims()[0], lx.dims()[1]);
        let out_size = lw.dims()[0];
        with_gemm_dtype!(OP, "x", sx.dtype(), F => {
            let y = forward_cpu(
                (
                    contiguous_slice::<F>(OP, sx, lx)?,
                    contiguous_slice::<F>(OP, sw, lw)?,
                    contiguous_slice::<F>(OP, sb, lb)?,
                ),
                (rows, in_size, out_size),
            );
            Ok((<F as candle_core::WithDType>::to_cpu_storage_owned(y), Shape::from((rows, out_size))))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (want_dx, want_dw) = (x.track_op(), weight.track_op());
        let (rows, in_size) = x.dims2()?;
        let out_size = weight.dim(0)?;
        let dy = dy.contiguous()?;
        let (mut dx, mut dw) = (None, None);
        if want_dx || want_dw {
            let grads = x.apply_op3(weight, &dy, LinearBackward { want_dx, want_dw })?;
            let mut at = 0;
            if want_dx {
                dx = Some(
                    grads
                        .narrow(0, 0, rows * in_size)?
                        .reshape((rows, in_size))?,
                );
                at = rows * in_size;
            }
            if want_dw {
                dw = Some(
                    grads
                        .narrow(0, at, out_size * in_size)?
                        .reshape((out_size, in_size))?,
                );
            }
        }
        let db = bias.track_op().then(|| super::sum_rows(&dy)).transpose()?;
        Ok((dx, dw, db))
    }
}

impl CustomOp3 for LinearBackward {
    fn name(&self) -> &'static str {
        "linear-backward"
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
        let (rows, in_size) = (lx.dims()[0], lx.dims()[1]);
        let out_size = lw.dims()[0];
        let len = usize::from(self.want_dx) * rows * in_size
            + usize::from(self.want_dw) * out_size * in_size;
        with_gemm_dtype!(OP, "x", sx.dtype(), F => {
            let grads = backward_cpu(
                (
                    contiguous_slice::<F>(OP, sx, lx)?,
                    contiguous_slice::<F>(OP, sw, lw)?,
                    contiguous_slice::<F>(OP, sg, lg)?,
                ),
                (rows, in_size, out_size),
                (self.want_dx, self.want_dw),
            );
            debug_assert_eq!(grads.len(), len);
            Ok((<F as candle_core::WithDType>::to_cpu_storage_owned(grads), Shape::from(len)))
        })
    }
}
