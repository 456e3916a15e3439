//! Adding a bias vector to every row, with a fast backward on the CPU.
//!
//! `x.broadcast_add(&bias)` records a backward whose bias gradient is candle's
//! sum over the broadcast (leading) dimensions: on the CPU a single-threaded
//! loop with two integer divisions per element, the largest cost of a training
//! step after the matrix products. This op sums the gradient's rows per chunk of
//! rows, chunks in parallel, in a fixed order (the result does not depend on
//! the thread count).
//!
//! The fused op runs on the CPU; on other devices [`add_bias`] is
//! `broadcast_add`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType, D};
use num_traits::Zero;
use rayon::prelude::*;

use super::buffer::output_buffer;
use super::dtype::FloatElem;
use super::layout::{check_column_vectors, contiguous_slice};
use crate::ops::dtype::with_float_dtype;

const OP: &str = "add_bias";

/// Rows per parallel work item of the column sums.
const CHUNK_ROWS: usize = 64;

/// Below this many elements the rows run on the calling thread.
const PARALLEL_MIN_ELEMS: usize = 1 << 15;

/// `x` `[.., H]` plus `bias` `[H]` on every row. Differentiable w.r.t. both.
pub fn add_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    check_column_vectors(OP, x, &[("bias", bias)])?;
    if !x.device().is_cpu() {
        return x.broadcast_add(bias);
    }
    x.contiguous()?.apply_op2(&bias.contiguous()?, AddBias)
}

/// The sum of the rows of `x` `[.., H]`: `[H]` (the gradient of a bias).
pub fn sum_rows(x: &Tensor) -> Result<Tensor> {
    if x.rank() == 0 {
        candle_core::bail!("sum_rows: x must have rank >= 1 [.., H], got a scalar");
    }
    if !x.device().is_cpu() {
        let rows = x.elem_count() / x.dim(D::Minus1)?.max(1);
        return x.reshape((rows, x.dim(D::Minus1)?))?.sum(0);
    }
    x.contiguous()?.apply_op1(SumRows)
}

fn add_bias_cpu<T: FloatElem>(x: &[T], bias: &[T]) -> Vec<T> {
    let h = bias.len();
    // SAFETY: every row of y is written below (no rows when h = 0).
    let mut y = unsafe { output_buffer::<T>(x.len()) };
    if h == 0 {
        return y;
    }
    let row = |(yr, xr): (&mut [T], &[T])| {
        for ((o, &xv), &bv) in yr.iter_mut().zip(xr).zip(bias) {
            *o = T::from_acc(xv.to_acc() + bv.to_acc());
        }
    };
    if x.len() >= PARALLEL_MIN_ELEMS {
        y.par_chunks_mut(h)
            .zip(x.par_chunks(h))
            .with_min_len(16)
            .for_each(row);
    } else {
        y.chunks_mut(h).zip(x.chunks(h)).for_each(row);
    }
    y
}

fn sum_rows_cpu<T: FloatElem>(x: &[T], h: usize) -> Vec<T> {
    if h == 0 {
        return Vec::new();
    }
    let chunk = |c: &[T]| {
        let mut partial = vec![<T::Acc as Zero>::zero(); h];
        for row in c.chunks_exact(h) {
            for (p, v) in partial.iter_mut().zip(row) {
                *p += v.to_acc();
            }
        }
        partial
    };
    let partials: Vec<Vec<T::Acc>> = if x.len() >= PARALLEL_MIN_ELEMS {
        x.par_chunks(CHUNK_ROWS * h).map(chunk).collect()
    } else {
        x.chunks(CHUNK_ROWS * h).map(chunk).collect()
    };
    let mut total = vec![<T::Acc as Zero>::zero(); h];
    for partial in partials {
        for (t, p) in total.iter_mut().zip(partial) {
            *t += p;
        }
    }
    total.into_iter().map(T::from_acc).collect()
}

struct AddBias;

struct SumRows;

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "add-bias"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        with_float_dtype!(OP, "x", sx.dtype(), T => {
            let y = add_bias_cpu::<T>(contiguous_slice(OP, sx, lx)?, contiguous_slice(OP, sb, lb)?);
            Ok((T::to_cpu_storage_owned(y), lx.shape().clone()))
        })
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _bias: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(dy.clone()), Some(sum_rows(dy)?)))
    }
}

impl CustomOp1 for SumRows {
    fn name(&self) -> &'static str {
        "sum-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = *l.dims().last().unwrap_or(&0);
        with_float_dtype!("sum_rows", "x", s.dtype(), T => {
            let sums = sum_rows_cpu::<T>(contiguous_slice(OP, s, l)?, h);
            Ok((T::to_cpu_storage_owned(sums), Shape::from(h)))
        })
    }

    /// Every row of x received the incoming gradient of the sum.
    fn bwd(&self, x: &Tensor, _sums: &Tensor, dsums: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(dsums.broadcast_as(x.shape())?.contiguous()?))
    }
}
