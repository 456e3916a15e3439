//! Launch plans of `kernels/layer_norm.cu`, and their run on an [`Executor`]
//! (the CUDA device, or the host harness in tests).
//!
//! The inputs are contiguous rows (the op makes them so); each reaches the
//! kernels as a pointer at its layout's start offset. The forward writes `y`
//! and the per-row statistics `[mean (rows) | rstd (rows)]` in the accumulator
//! dtype (f32, f64 for f64), which the op keeps for the backward. The backward
//! writes `[dx (rows·H) | dweight (H) | dbias (H)]`: one launch for `dx` and the
//! per-block partial sums of `dweight` and `dbias`, one that reduces those
//! partials in a fixed order (no atomics).

use candle_core::{DType, Result};

use super::OP;
use crate::ops::dtype::accumulation_dtype;
use crate::ops::launch::{self, as_i32, kernel_name, Alloc, Buffer, Executor, Launch};

const MODULE: &str = "layer_norm";
/// Threads per block, every kernel; must match `BLOCK` in the kernel file.
const BLOCK: u32 = 256;
/// Rows per block of the warp-per-row forms (one per warp).
const WARPS: usize = BLOCK as usize / 32;
/// The warp-per-row forms: values per lane `V` (`_w<V>`, for H ≤ 32·V). The
/// smallest that fits H is used; above 32·32 = 1024 the block-per-row form.
const WARP_FORMS: [usize; 7] = [1, 4, 8, 12, 16, 24, 32];
/// The most blocks a backward launch uses (its partial rows: `blocks × 2H`
/// accumulator values); more rows make each block loop over more of them.
/// Several waves of blocks on any GPU (an H100 holds about 400 of the H = 384
/// form at once), so that the last, partial wave costs little; the partials
/// stay a few percent of the rows' bytes.
pub(super) const MAX_BWD_BLOCKS: usize = 2048;
/// Rows each warp of the warp-per-row backward takes at least, so that small
/// batches do not spend more on partial rows than on the rows themselves.
const MIN_ROWS_PER_WARP: usize = 2;

/// The problem: `rows` rows of `h` values, and the LayerNorm's `eps`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Dims {
    pub rows: usize,
    pub h: usize,
    pub eps: f64,
}

/// A contiguous operand: its storage and the element offset where it starts.
pub(super) struct Operand<'a, S> {
    pub storage: &'a S,
    pub offset: usize,
}

impl<S> Clone for Operand<'_, S> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<S> Copy for Operand<'_, S> {}

/// The `V` of the warp-per-row form for `h`, or `None` for the block form.
fn warp_form(h: usize) -> Option<usize> {
    WARP_FORMS.into_iter().find(|&v| h <= 32 * v)
}

/// The forward's kernel name for `h` (`layer_norm_fwd_w12_f32`, ...).
fn forward_kernel(dtype: DType, h: usize) -> Result<String> {
    match warp_form(h) {
        Some(v) => kernel_name(&format!("layer_norm_fwd_w{v}"), dtype),
        None => kernel_name("layer_norm_fwd_block", dtype),
    }
}

/// The forward's grid: a warp per row (8 rows per block), or a block per row.
fn forward_grid(dims: Dims) -> Result<u32> {
    let blocks = match warp_form(dims.h) {
        Some(_) => dims.rows.div_ceil(WARPS),
        None => dims.rows,
    };
    u32::try_from(blocks)
        .ok()
        .filter(|&b| b <= i32::MAX as u32)
        .ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{OP}: {} rows of {} are too many for the CUDA kernel",
                dims.rows, dims.h
            ))
        })
}

/// The backward's blocks: each owns one partial row of `2H` sums.
pub(super) fn backward_blocks(dims: Dims) -> usize {
    let per_block = match warp_form(dims.h) {
        Some(_) => WARPS * MIN_ROWS_PER_WARP,
        None => 1,
    };
    dims.rows.div_ceil(per_block).clamp(1, MAX_BWD_BLOCKS)
}

/// The forward launch over inputs `0..4` = (x, residual or x, weight, bias),
/// writing `y` to `y` (with `store_y`) and the statistics to `stats`.
fn forward_launch(
    dtype: DType,
    dims: Dims,
    offsets: [usize; 4],
    has_residual: bool,
    (y, store_y): (Buffer, bool),
    stats: Buffer,
) -> Result<Launch> {
    Ok(Launch::new(
        MODULE,
        forward_kernel(dtype, dims.h)?,
        (forward_grid(dims)?, 1, 1),
        (BLOCK, 1, 1),
    )
    .ptr(Buffer::Input(0), offsets[0])
    .ptr(Buffer::Input(1), offsets[1])
    .i32(i32::from(has_residual))
    .ptr(Buffer::Input(2), offsets[2])
    .ptr(Buffer::Input(3), offsets[3])
    .ptr(y, 0)
    .ptr(stats, 0)
    .i64(dims.rows as i64)
    .i32(as_i32(OP, "H", dims.h)?)
    .u64(dims.eps.to_bits())
    .i32(i32::from(store_y)))
}

/// The forward's buffers (0: `y` `[rows·H]`, 1: statistics `[2·rows]`) and launches.
pub(super) fn forward_plan(
    dtype: DType,
    dims: Dims,
    offsets: [usize; 4],
    has_residual: bool,
) -> Result<(Vec<Alloc>, Vec<Launch>)> {
    let allocs = vec![
        Alloc {
            dtype,
            len: dims.rows * dims.h,
        },
        Alloc {
            dtype: accumulation_dtype(dtype),
            len: 2 * dims.rows,
        },
    ];
    let mut launches = Vec::new();
    if dims.rows * dims.h > 0 {
        launches.push(forward_launch(
            dtype,
            dims,
            offsets,
            has_residual,
            (Buffer::Output(0), true),
            Buffer::Output(1),
        )?);
    }
    Ok((allocs, launches))
}

/// The backward's buffers and launches, over inputs `0..4` = (x, residual or
/// x, weight, dy) and, when `stats_input`, input 4 = the forward's statistics.
/// Buffers: 0: `[dx | dweight | dbias]`, 1: the partial sums `[blocks][2H]`,
/// and without `stats_input`, 2: statistics, which a statistics-only forward
/// launch computes first.
pub(super) fn backward_plan(
    dtype: DType,
    dims: Dims,
    offsets: [usize; 4],
    has_residual: bool,
    stats_input: bool,
) -> Result<(Vec<Alloc>, Vec<Launch>)> {
    let Dims { rows, h, .. } = dims;
    let acc = accumulation_dtype(dtype);
    let blocks = backward_blocks(dims);
    let mut allocs = vec![
        Alloc {
            dtype,
            len: rows * h + 2 * h,
        },
        Alloc {
            dtype: acc,
            len: blocks * 2 * h,
        },
    ];
    let mut launches = Vec::new();
    if h == 0 {
        return Ok((allocs, launches));
    }
    let stats = if stats_input {
        Buffer::Input(4)
    } else {
        allocs.push(Alloc {
            dtype: acc,
            len: 2 * rows,
        });
        if rows > 0 {
            // y points at dx's buffer (of y's dtype) and is never written.
            launches.push(forward_launch(
                dtype,
                dims,
                offsets,
                has_residual,
                (Buffer::Output(0), false),
                Buffer::Output(2),
            )?);
        }
        Buffer::Output(2)
    };
    let base = match warp_form(h) {
        Some(v) => format!("layer_norm_bwd_w{v}"),
        None => "layer_norm_bwd_block".to_string(),
    };
    launches.push(
        Launch::new(
            MODULE,
            kernel_name(&base, dtype)?,
            (blocks as u32, 1, 1),
            (BLOCK, 1, 1),
        )
        .ptr(Buffer::Input(0), offsets[0])
        .ptr(Buffer::Input(1), offsets[1])
        .i32(i32::from(has_residual))
        .ptr(Buffer::Input(2), offsets[2])
        .ptr(Buffer::Input(3), offsets[3])
        .ptr(stats, 0)
        .ptr(Buffer::Output(0), 0)
        .ptr(Buffer::Output(1), 0)
        .i64(rows as i64)
        .i32(as_i32(OP, "H", h)?),
    );
    let width = 2 * h;
    launches.push(
        Launch::new(
            MODULE,
            kernel_name("layer_norm_bwd_finalize", dtype)?,
            (width.div_ceil(32) as u32, 1, 1),
            (BLOCK, 1, 1),
        )
        .ptr(Buffer::Output(1), 0)
        .i32(blocks as i32)
        .i32(as_i32(OP, "2H", width)?)
        .ptr(Buffer::Output(0), rows * h),
    );
    Ok((allocs, launches))
}

/// `y` and the statistics of LayerNorm(x (+ residual)), on `exec`.
pub(super) fn forward<E: Executor>(
    exec: &E,
    dims: Dims,
    x: Operand<'_, E::Storage>,
    residual: Option<Operand<'_, E::Storage>>,
    weight: Operand<'_, E::Storage>,
    bias: Operand<'_, E::Storage>,
) -> Result<(E::Storage, E::Storage)> {
    let r = residual.unwrap_or(x);
    let offsets = [x.offset, r.offset, weight.offset, bias.offset];
    let (allocs, launches) = forward_plan(E::dtype(x.storage), dims, offsets, residual.is_some())?;
    let inputs = [x.storage, r.storage, weight.storage, bias.storage];
    let mut outputs = launch::run(exec, &inputs, &allocs, &launches)?.into_iter();
    let y = outputs.next().expect("y buffer");
    let stats = outputs.next().expect("statistics buffer");
    Ok((y, stats))
}

/// `[dx | dweight | dbias]` of LayerNorm(x (+ residual)) for the gradient
/// `dy`, on `exec`, from the forward's statistics (recomputed when `None`).
pub(super) fn backward<E: Executor>(
    exec: &E,
    dims: Dims,
    x: Operand<'_, E::Storage>,
    residual: Option<Operand<'_, E::Storage>>,
    weight: Operand<'_, E::Storage>,
    dy: Operand<'_, E::Storage>,
    stats: Option<&E::Storage>,
) -> Result<E::Storage> {
    let r = residual.unwrap_or(x);
    let offsets = [x.offset, r.offset, weight.offset, dy.offset];
    let (allocs, launches) = backward_plan(
        E::dtype(x.storage),
        dims,
        offsets,
        residual.is_some(),
        stats.is_some(),
    )?;
    let mut inputs = vec![x.storage, r.storage, weight.storage, dy.storage];
    inputs.extend(stats);
    Ok(launch::run(exec, &inputs, &allocs, &launches)?.remove(0))
}
