//! GELU (the exact, erf form BERT uses) with a fused backward on the CPU.
//!
//! candle's `gelu_erf` calls libm's `erf` one element at a time forward, and
//! its recorded backward is a chain of five element-wise ops with two more
//! `erf` and `exp` calls: together about a tenth of a training step. This op
//! evaluates `erf` and `exp` with vectorisable f32 approximations
//! (`ops::math`, `erf` within 7e-7) and computes the derivative in one pass.
//!
//! `gelu(x) = x·Φ(x)`, `Φ(x) = (1 + erf(x/√2))/2`;
//! `gelu'(x) = Φ(x) + x·φ(x)`, `φ(x) = exp(−x²/2)/√(2π)`.
//!
//! f32, f16 and bf16 run the fused op on the CPU (f32 arithmetic); f64 and
//! other devices use candle's `gelu_erf`.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use super::buffer::output_buffer;
use super::layout::contiguous_slice;
use super::math::{erf_f32, exp_f32};
use crate::ops::dtype::with_float_dtype;

const OP: &str = "gelu_erf";

/// Below this many elements the work stays on the calling thread.
const PARALLEL_MIN_ELEMS: usize = 1 << 15;

/// Elements per parallel work item.
const CHUNK: usize = 4096;

/// `x·Φ(x)` element-wise. Differentiable.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    with_float_dtype!(OP, "x", x.dtype(), _T => Ok(()))?;
    if !x.device().is_cpu() || x.dtype() == DType::F64 {
        return x.gelu_erf();
    }
    x.contiguous()?.apply_op1(Gelu)
}

#[inline(always)]
pub(crate) fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[inline(always)]
pub(crate) fn gelu_derivative(x: f32) -> f32 {
    // 1/sqrt(2π)
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let cdf = 0.5 * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2));
    cdf + x * INV_SQRT_2PI * exp_f32(-0.5 * x * x)
}

/// `out[i] = f(inputs at i)` over chunks, in parallel for large inputs.
fn map_chunks<T: Send>(out: &mut [T], body: impl Fn(usize, &mut [T]) + Sync + Send) {
    if out.len() >= PARALLEL_MIN_ELEMS {
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, o)| body(c * CHUNK, o));
    } else {
        body(0, out);
    }
}

struct Gelu;

/// `(x, dy) -> dx`.
struct GeluBackward;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        with_float_dtype!(OP, "x", s.dtype(), T => {
            let x = contiguous_slice::<T>(OP, s, l)?;
            // SAFETY: map_chunks writes every element.
            let mut y = unsafe { output_buffer::<T>(x.len()) };
            map_chunks(&mut y, |start, out| {
                for (o, v) in out.iter_mut().zip(&x[start..]) {
                    *o = T::from_f64(f64::from(gelu(v.to_f64() as f32)));
                }
            });
            Ok((T::to_cpu_storage_owned(y), l.shape().clone()))
        })
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2(&dy.contiguous()?, GeluBackward)?))
    }
}

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "gelu-erf-backward"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        with_float_dtype!(OP, "x", sx.dtype(), T => {
            let (x, g) = (contiguous_slice::<T>(OP, sx, lx)?, contiguous_slice::<T>(OP, sg, lg)?);
            // SAFETY: map_chunks writes every element.
            let mut dx = unsafe { output_buffer::<T>(x.len()) };
            map_chunks(&mut dx, |start, out| {
                for ((o, v), gv) in out.iter_mut().zip(&x[start..]).zip(&g[start..]) {
                    let d = gelu_derivative(v.to_f64() as f32) * (gv.to_f64() as f32);
                    *o = T::from_f64(f64::from(d));
                }
            });
            Ok((T::to_cpu_storage_owned(dx), lx.shape().clone()))
        })
    }
}
