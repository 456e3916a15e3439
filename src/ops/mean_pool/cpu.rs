//! The CPU path of masked mean pooling: rows of the batch in parallel (rayon)
//! once there is enough work, the mask read in its own dtype.

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Result, WithDType};
use num_traits::Zero;
use rayon::prelude::*;

use super::{MIN_COUNT, OP};
use crate::ops::buffer::output_buffer;
use crate::ops::dtype::{Accum, FloatElem};
use crate::ops::layout::View;

/// Below this many hidden elements (B·T·H) the CPU path runs on one thread:
/// spreading smaller work over rayon costs more than it saves.
const PARALLEL_MIN_ELEMS: usize = 1 << 16;

/// The mask's storage as u8 flags, 1 where the value is non-zero, element for
/// element (so the mask's layout still indexes it). A u8 mask is borrowed; any
/// other is converted here, in one pass over its `[B,T]` values, rather than by
/// a candle comparison op (a scalar tensor, a broadcast and a fresh tensor per call).
pub(super) fn cpu_flags(storage: &CpuStorage) -> Result<Cow<'_, [u8]>> {
    fn non_zero<T: WithDType>(values: &[T]) -> Cow<'static, [u8]> {
        // Also true for NaN, as `mask.ne(0)` is.
        Cow::Owned(values.iter().map(|v| u8::from(v.to_f64() != 0.0)).collect())
    }
    Ok(match storage {
        CpuStorage::U8(values) => Cow::Borrowed(values),
        CpuStorage::U32(values) => non_zero(values),
        CpuStorage::I16(values) => non_zero(values),
        CpuStorage::I32(values) => non_zero(values),
        CpuStorage::I64(values) => non_zero(values),
        CpuStorage::F16(values) => non_zero(values),
        CpuStorage::BF16(values) => non_zero(values),
        CpuStorage::F32(values) => non_zero(values),
        CpuStorage::F64(values) => non_zero(values),
        // By bits: candle 0.11's `to_f64` of f8e4m3 never returns. Any magnitude
        // bit set is non-zero (NaN too); the sign alone is -0.
        CpuStorage::F8E4M3(values) => Cow::Owned(
            values
                .iter()
                .map(|v| u8::from(v.to_bits() & 0x7f != 0))
                .collect(),
        ),
        other => candle_core::bail!("{OP}: unsupported dtype {:?} for mask", other.dtype()),
    })
}

/// Runs `body(row index, row)` over the `row_len`-sized rows of `out`, on rayon
/// when `work` (elements touched) is large enough to pay for it.
fn for_each_row<T: Send>(
    out: &mut [T],
    row_len: usize,
    work: usize,
    body: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    if row_len == 0 {
        return;
    }
    if work >= PARALLEL_MIN_ELEMS {
        out.par_chunks_mut(row_len)
            .enumerate()
            .for_each(|(i, row)| body(i, row));
    } else {
        out.chunks_mut(row_len)
            .enumerate()
            .for_each(|(i, row)| body(i, row));
    }
}

/// `count` clamped as sentence-transformers does, in the accumulator type.
fn clamped_count<A: Accum>(count: usize) -> A {
    A::of((count as f64).max(MIN_COUNT))
}

/// Columns summed at a time by the CPU forward: whole rows up to 1024 (MiniLM's
/// 384, BERT-base's 768). Each token's vector is then read front to back, one
/// sequential stream the hardware prefetches, into sums that stay in L1 (4 KiB).
/// Blocks of 64 columns (sums in registers) read each token in 256-byte pieces
/// 1.5 KiB apart and took 1.2-2x as long.
const COLUMN_BLOCK: usize = 1024;

/// CPU forward: for each row, the real tokens' vectors summed (four tokens per
/// pass over the sums, so the sums are loaded and stored once per four tokens),
/// then divided by the count.
pub(super) fn forward_cpu<T: FloatElem>(
    hidden: &[T],
    hv: View<3>,
    flags: &[u8],
    fv: View<2>,
) -> Vec<T> {
    let [b, t, h] = hv.dims;
    // SAFETY: every row of the output is written by for_each_row.
    let mut pooled = unsafe { output_buffer::<T>(b * h) };
    let h_stride = hv.strides[2];
    for_each_row(&mut pooled, h, b * t * h, |bi, out| {
        let starts: Vec<usize> = (0..t)
            .filter(|&ti| flags[fv.at([bi, ti])] != 0)
            .map(|ti| hv.at([bi, ti, 0]))
            .collect();
        let count = clamped_count::<T::Acc>(starts.len());
        if hv.rows_contiguous() {
            let mut col = 0;
            for block in out.chunks_mut(COLUMN_BLOCK) {
                let width = block.len();
                let mut sums = [T::Acc::zero(); COLUMN_BLOCK];
                let sums = &mut sums[..width];
                let token = |start: usize| &hidden[start + col..start + col + width];
                let mut quads = starts.chunks_exact(4);
                for quad in &mut quads {
                    let [x0, x1, x2, x3] = [quad[0], quad[1], quad[2], quad[3]].map(token);
                    for (i, s) in sums.iter_mut().enumerate() {
                        *s += (x0[i].to_acc() + x1[i].to_acc()) + (x2[i].to_acc() + x3[i].to_acc());
                    }
                }
                for &start in quads.remainder() {
                    for (s, &x) in sums.iter_mut().zip(token(start)) {
                        *s += x.to_acc();
                    }
                }
                for (o, &s) in block.iter_mut().zip(sums.iter()) {
                    *o = T::from_acc(s / count);
                }
                col += width;
            }
        } else {
            let mut sum = vec![T::Acc::zero(); h];
            for &start in &starts {
                for (hi, s) in sum.iter_mut().enumerate() {
                    *s += hidden[start + hi * h_stride].to_acc();
                }
            }
            for (o, &s) in out.iter_mut().zip(&sum) {
                *o = T::from_acc(s / count);
            }
        }
    });
    pooled
}

/// CPU backward: each row's gradient share `dout[b,:] / count_b` is computed once
/// and copied to that row's real tokens; padding tokens get zeros (one write per
/// element, no zero-filled buffer first).
pub(super) fn backward_cpu<T: FloatElem>(
    grad: &[T],
    gv: View<2>,
    flags: &[u8],
    fv: View<2>,
) -> Vec<T> {
    let [b, h] = gv.dims;
    let t = fv.dims[1];
    // SAFETY: every token row is written below, the share or zeros.
    let mut grad_hidden = unsafe { output_buffer::<T>(b * t * h) };
    for_each_row(&mut grad_hidden, t * h, b * t * h, |bi, rows| {
        let is_token = |ti: usize| flags[fv.at([bi, ti])] != 0;
        let count = clamped_count::<T::Acc>((0..t).filter(|&ti| is_token(ti)).count());
        let share: Vec<T> = (0..h)
            .map(|hi| T::from_acc(grad[gv.at([bi, hi])].to_acc() / count))
            .collect();
        for (ti, row) in rows.chunks_exact_mut(h).enumerate() {
            if is_token(ti) {
                row.copy_from_slice(&share);
            } else {
                row.fill(T::zero());
            }
        }
    });
    grad_hidden
}
