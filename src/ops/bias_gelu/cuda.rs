//! Launch plans of `kernels/bias_gelu.cu`, and their run on an [`Executor`]
//! (the CUDA device, or the host harness in tests).
//!
//! x and the incoming gradient reach the kernels contiguous (the op makes them
//! so), possibly at an offset. Blocks are 32 × 8 threads over (columns, rows);
//! the grid is (row blocks, column chunks). The `_vec` kernels move 16 bytes per
//! thread and row (float4, 8 halves, 2 doubles) and need H and the offsets to be
//! multiples of that width; the plain ones take any H.
//!
//! The backward writes `[dx | dbias]` (one buffer) and a scratch of per-block
//! partial column sums of dx, which a second launch (`bias_gelu_dbias`, one
//! thread per column) sums in block order: no atomics, the same bits every run.

use candle_core::{DType, Result};

use super::{Dims, OP};
use crate::ops::dtype::accumulation_dtype;
use crate::ops::launch::{self, as_i32, kernel_name, Alloc, Buffer, Executor, Launch};

const MODULE: &str = "bias_gelu";
/// Threads along H per block; must match `LANES` in the kernel file.
const LANES: usize = 32;
/// Threads along the rows per block; must match `ROW_LANES` in the kernel file.
const ROW_LANES: usize = 8;
/// Threads per block of `bias_gelu_dbias`; must match `FINALIZE_BLOCK` there.
const FINALIZE_BLOCK: usize = 256;
/// Bytes one thread moves per row on the vector path.
const VEC_BYTES: usize = 16;
/// Rows per block at least (4 per row lane: loads in flight, and fewer partials).
const MIN_ROWS_PER_BLOCK: usize = 32;
/// At most this many row blocks: more rows make taller blocks, so that the
/// backward's scratch (row blocks × H accumulators) stays small and the
/// finalize's loop short, while the grid still fills any current GPU.
const MAX_ROW_BLOCKS: usize = 1024;

/// Elements per thread on the vector path, or 1 when H or an offset rules it out.
/// Device allocations are 256-byte aligned, so an element offset that is a
/// multiple of the width is aligned.
pub(super) fn vector_width(dtype: DType, h: usize, offsets: &[usize]) -> usize {
    let width = VEC_BYTES / dtype.size_in_bytes();
    if h.is_multiple_of(width) && offsets.iter().all(|o| o.is_multiple_of(width)) {
        width
    } else {
        1
    }
}

/// Rows per block and the grid `(row blocks, column chunks, 1)`.
fn grid(dims: &Dims, width: usize) -> Result<(usize, (u32, u32, u32))> {
    let rows_per_block = dims
        .rows
        .div_ceil(MAX_ROW_BLOCKS)
        .max(MIN_ROWS_PER_BLOCK)
        .next_multiple_of(ROW_LANES);
    let row_blocks = dims.rows.div_ceil(rows_per_block);
    let chunks = dims.h.div_ceil(LANES * width);
    if chunks > 65535 || rows_per_block > i32::MAX as usize {
        candle_core::bail!(
            "{OP}: shape too large for the CUDA kernel (rows = {}, H = {})",
            dims.rows,
            dims.h
        );
    }
    Ok((rows_per_block, (row_blocks as u32, chunks as u32, 1)))
}

/// The forward launch (`None` when the output is empty): inputs (x, bias),
/// output 0 (y, contiguous like x).
pub(super) fn forward_launch(dtype: DType, dims: &Dims) -> Result<Option<Launch>> {
    if dims.rows * dims.h == 0 {
        return Ok(None);
    }
    let width = vector_width(dtype, dims.h, &[dims.x_offset, dims.bias_offset]);
    let base = if width > 1 {
        "bias_gelu_fwd_vec"
    } else {
        "bias_gelu_fwd"
    };
    let (rows_per_block, grid) = grid(dims, width)?;
    Ok(Some(
        Launch::new(
            MODULE,
            kernel_name(base, dtype)?,
            grid,
            (LANES as u32, ROW_LANES as u32, 1),
        )
        .ptr(Buffer::Input(0), dims.x_offset)
        .ptr(Buffer::Input(1), dims.bias_offset)
        .ptr(Buffer::Output(0), 0)
        .i64(dims.rows as i64)
        .i32(as_i32(OP, "H", dims.h)?)
        .i32(rows_per_block as i32),
    ))
}

/// The backward's buffers (output 0: `[dx | dbias]`; output 1: the partial
/// column sums, in the accumulator dtype) and launches (none when empty):
/// inputs (x, bias, dy).
pub(super) fn backward_plan(
    dtype: DType,
    dims: &Dims,
    dy_offset: usize,
) -> Result<(Vec<Alloc>, Vec<Launch>)> {
    let n = dims.rows * dims.h;
    let width = vector_width(dtype, dims.h, &[dims.x_offset, dims.bias_offset, dy_offset]);
    let (rows_per_block, grid) = grid(dims, width)?;
    let row_blocks = grid.0 as usize;
    let allocs = vec![
        Alloc {
            dtype,
            len: n + dims.h,
        },
        Alloc {
            dtype: accumulation_dtype(dtype),
            len: row_blocks * dims.h,
        },
    ];
    if dims.h == 0 {
        return Ok((allocs, Vec::new()));
    }
    let h = as_i32(OP, "H", dims.h)?;
    let mut launches = Vec::new();
    if n > 0 {
        let base = if width > 1 {
            "bias_gelu_bwd_vec"
        } else {
            "bias_gelu_bwd"
        };
        launches.push(
            Launch::new(
                MODULE,
                kernel_name(base, dtype)?,
                grid,
                (LANES as u32, ROW_LANES as u32, 1),
            )
            .ptr(Buffer::Input(0), dims.x_offset)
            .ptr(Buffer::Input(1), dims.bias_offset)
            .ptr(Buffer::Input(2), dy_offset)
            .ptr(Buffer::Output(0), 0)
            .ptr(Buffer::Output(1), 0)
            .i64(dims.rows as i64)
            .i32(h)
            .i32(rows_per_block as i32),
        );
    }
    // With no rows there are no partials: the finalize sums none and writes zeros.
    launches.push(
        Launch::new(
            MODULE,
            kernel_name("bias_gelu_dbias", dtype)?,
            (dims.h.div_ceil(FINALIZE_BLOCK) as u32, 1, 1),
            (FINALIZE_BLOCK as u32, 1, 1),
        )
        .ptr(Buffer::Output(1), 0)
        .i32(as_i32(OP, "row blocks", row_blocks)?)
        .i32(h)
        .ptr(Buffer::Output(0), n),
    );
    Ok((allocs, launches))
}

/// `gelu(x + bias)`, contiguous like x, on `exec`.
pub(super) fn forward<E: Executor>(
    exec: &E,
    x: &E::Storage,
    bias: &E::Storage,
    dims: Dims,
) -> Result<E::Storage> {
    let dtype = E::dtype(x);
    let out = Alloc {
        dtype,
        len: dims.rows * dims.h,
    };
    let launches: Vec<Launch> = forward_launch(dtype, &dims)?.into_iter().collect();
    Ok(launch::run(exec, &[x, bias], &[out], &launches)?.remove(0))
}

/// `[dx | dbias]` on `exec`, from x, bias and the incoming gradient (contiguous
/// from `dy_offset`).
pub(super) fn backward<E: Executor>(
    exec: &E,
    x: &E::Storage,
    bias: &E::Storage,
    dy: (&E::Storage, usize),
    dims: Dims,
) -> Result<E::Storage> {
    let (allocs, launches) = backward_plan(E::dtype(x), &dims, dy.1)?;
    Ok(launch::run(exec, &[x, bias, dy.0], &allocs, &launches)?.remove(0))
}
