//! Launch plans of `kernels/cosine.cu` (one warp per row, 8 rows per block), and
//! their run on an [`Executor`] (the CUDA device, or the host harness in tests).
//! Inputs need unit-stride rows (`for_kernels` copies others first); any row
//! stride and offset are kernel arguments.

use candle_core::{DType, Result};

use crate::ops::launch::{self, as_i32, kernel_name, Alloc, Buffer, Executor, Launch};
use crate::ops::layout::View;

const MODULE: &str = "cosine";
/// Rows per 256-thread block: one warp per row.
const ROWS_PER_BLOCK: usize = 8;

/// The kernel's (row pointer, row stride) arguments for input `index`.
fn rows(op: &str, launch: Launch, index: usize, view: &View<2>) -> Result<Launch> {
    if !view.rows_contiguous() {
        // for_kernels() copies such inputs first; reaching here is a bug.
        candle_core::bail!(
            "{op}: CUDA kernels need unit-stride rows, got strides {:?}",
            view.strides
        );
    }
    Ok(launch
        .ptr(Buffer::Input(index), view.offset)
        .i64(view.strides[0] as i64))
}

/// A launch of `base` over the rows of `view` (`None` when there are none).
fn over_rows(op: &str, base: &str, dtype: DType, view: &View<2>) -> Result<Option<Launch>> {
    let [n, h] = view.dims;
    if n == 0 {
        return Ok(None);
    }
    as_i32(op, "N", n)?;
    as_i32(op, "H", h)?;
    let blocks = u32::try_from(n.div_ceil(ROWS_PER_BLOCK))
        .map_err(|_| candle_core::Error::Msg(format!("{op}: {n} rows are too many")))?;
    Ok(Some(Launch::new(
        MODULE,
        kernel_name(base, dtype)?,
        (blocks, 1, 1),
        (32 * ROWS_PER_BLOCK as u32, 1, 1),
    )))
}

/// `(out, n, h)`, the arguments every cosine kernel ends with.
fn finish(launch: Launch, view: &View<2>) -> Launch {
    launch
        .ptr(Buffer::Output(0), 0)
        .i32(view.dims[0] as i32)
        .i32(view.dims[1] as i32)
}

/// Runs `launch` (if any) on `inputs` into one fresh output of `len` elements.
fn run_one<E: Executor>(
    exec: &E,
    inputs: &[&E::Storage],
    len: usize,
    launch: Option<Launch>,
) -> Result<E::Storage> {
    let out = Alloc {
        dtype: E::dtype(inputs[0]),
        len,
    };
    let launches: Vec<Launch> = launch.into_iter().collect();
    Ok(launch::run(exec, inputs, &[out], &launches)?.remove(0))
}

fn normalize_launch(op: &str, dtype: DType, xv: &View<2>) -> Result<Option<Launch>> {
    over_rows(op, "l2_normalize_fwd", dtype, xv)?
        .map(|l| Ok(finish(rows(op, l, 0, xv)?, xv)))
        .transpose()
}

fn normalize_backward_launch(
    op: &str,
    dtype: DType,
    xv: &View<2>,
    gv: &View<2>,
) -> Result<Option<Launch>> {
    over_rows(op, "l2_normalize_bwd", dtype, xv)?
        .map(|l| Ok(finish(rows(op, rows(op, l, 0, xv)?, 1, gv)?, xv)))
        .transpose()
}

fn row_cosine_launch(op: &str, dtype: DType, av: &View<2>, bv: &View<2>) -> Result<Option<Launch>> {
    over_rows(op, "cosine_rows_fwd", dtype, av)?
        .map(|l| Ok(finish(rows(op, rows(op, l, 0, av)?, 1, bv)?, av)))
        .transpose()
}

fn row_cosine_backward_launch(
    op: &str,
    dtype: DType,
    av: &View<2>,
    bv: &View<2>,
    gv: &View<1>,
) -> Result<Option<Launch>> {
    over_rows(op, "cosine_rows_bwd", dtype, av)?
        .map(|l| {
            let l = rows(op, rows(op, l, 0, av)?, 1, bv)?
                .ptr(Buffer::Input(2), gv.offset)
                .i64(gv.strides[0] as i64);
            Ok(finish(l, av))
        })
        .transpose()
}

/// `x / max(‖x‖, EPS)` per row: `[N,H]`.
pub(super) fn normalize<E: Executor>(
    exec: &E,
    op: &str,
    x: &E::Storage,
    xv: View<2>,
) -> Result<E::Storage> {
    let launch = normalize_launch(op, E::dtype(x), &xv)?;
    run_one(exec, &[x], xv.elem_count(), launch)
}

/// The gradient of [`normalize`]: `[N,H]`.
pub(super) fn normalize_backward<E: Executor>(
    exec: &E,
    op: &str,
    (x, xv): (&E::Storage, View<2>),
    (g, gv): (&E::Storage, View<2>),
) -> Result<E::Storage> {
    let launch = normalize_backward_launch(op, E::dtype(x), &xv, &gv)?;
    run_one(exec, &[x, g], xv.elem_count(), launch)
}

/// Row-wise cosine: `[N]`.
pub(super) fn row_cosine<E: Executor>(
    exec: &E,
    op: &str,
    (a, av): (&E::Storage, View<2>),
    (b, bv): (&E::Storage, View<2>),
) -> Result<E::Storage> {
    let launch = row_cosine_launch(op, E::dtype(a), &av, &bv)?;
    run_one(exec, &[a, b], av.dims[0], launch)
}

/// The gradients of [`row_cosine`]: `[2,N,H]`, `da` then `db`.
pub(super) fn row_cosine_backward<E: Executor>(
    exec: &E,
    op: &str,
    (a, av): (&E::Storage, View<2>),
    (b, bv): (&E::Storage, View<2>),
    (g, gv): (&E::Storage, View<1>),
) -> Result<E::Storage> {
    let launch = row_cosine_backward_launch(op, E::dtype(a), &av, &bv, &gv)?;
    run_one(exec, &[a, b, g], 2 * av.elem_count(), launch)
}

/// Corpus rows scored per tile of the top-k kernels (`TOPK_TILE`).
const TOPK_TILE: usize = 256;
/// Blocks the top-k search aims for across queries and corpus slices: a few per
/// SM of a large GPU, so a single query still fills the device.
const TOPK_TARGET_BLOCKS: usize = 1024;
/// The largest k the kernels take: the list and one tile (1024 + 256) fit a
/// power-of-two buffer of 2048 candidates in shared memory (24 KiB in f64).
pub(super) const TOPK_MAX_K: usize = 1024;

/// How the corpus is cut into slices, one block per (query, slice).
fn topk_slices(nq: usize, m: usize) -> (usize, usize) {
    let tiles = m.div_ceil(TOPK_TILE);
    let slices = TOPK_TARGET_BLOCKS
        .div_ceil(nq.max(1))
        .clamp(1, tiles.max(1));
    let rows_per_slice = tiles.div_ceil(slices) * TOPK_TILE;
    (m.div_ceil(rows_per_slice), rows_per_slice)
}

/// The two launches of the top-k search and the sizes of its scratch.
struct TopkPlan {
    launches: Vec<Launch>,
    partial_len: usize,
}

fn topk_plan(op: &str, dtype: DType, qv: &View<2>, cv: &View<2>, k: usize) -> Result<TopkPlan> {
    let ([nq, h], m) = (qv.dims, cv.dims[0]);
    if k > TOPK_MAX_K {
        candle_core::bail!("{op}: k = {k} is more than the CUDA kernel's {TOPK_MAX_K}");
    }
    let (slices, rows_per_slice) = topk_slices(nq, m);
    let partial_len = nq * slices * k;
    if nq == 0 || m == 0 || k == 0 {
        return Ok(TopkPlan {
            launches: Vec::new(),
            partial_len,
        });
    }
    as_i32(op, "M", m)?;
    as_i32(op, "H", h)?;
    let acc = crate::ops::dtype::accumulation_dtype(dtype);
    let p = (k + TOPK_TILE).next_power_of_two();
    let shared = u32::try_from(p * (acc.size_in_bytes() + 4)).expect("at most 2048 candidates");
    let grid_q = u32::try_from(nq)
        .map_err(|_| candle_core::Error::Msg(format!("{op}: {nq} queries are too many")))?;
    let mut partial = Launch::new(
        MODULE,
        kernel_name("cosine_topk_partial", dtype)?,
        (grid_q, slices as u32, 1),
        (TOPK_TILE as u32, 1, 1),
    );
    partial.shared_bytes = shared;
    let partial = rows(op, rows(op, partial, 0, qv)?, 1, cv)?
        .ptr(Buffer::Output(1), 0)
        .ptr(Buffer::Output(2), 0)
        .i32(m as i32)
        .i32(h as i32)
        .i32(k as i32)
        .i32(k as i32)
        .i32(p as i32)
        .i32(rows_per_slice as i32);
    let mut merge = Launch::new(
        MODULE,
        kernel_name("cosine_topk_merge", acc)?,
        (grid_q, 1, 1),
        (TOPK_TILE as u32, 1, 1),
    );
    merge.shared_bytes = shared;
    let merge = merge
        .ptr(Buffer::Output(1), 0)
        .ptr(Buffer::Output(2), 0)
        .ptr(Buffer::Output(0), 0)
        .i32(slices as i32)
        .i32(k as i32)
        .i32(k as i32)
        .i32(p as i32);
    Ok(TopkPlan {
        launches: vec![partial, merge],
        partial_len,
    })
}

/// The `k` best corpus rows of each query: `[Q, k, 2]` f64 (score, index).
pub(super) fn cosine_top_k<E: Executor>(
    exec: &E,
    op: &str,
    (q, qv): (&E::Storage, View<2>),
    (c, cv): (&E::Storage, View<2>),
    k: usize,
) -> Result<E::Storage> {
    let dtype = E::dtype(q);
    let plan = topk_plan(op, dtype, &qv, &cv, k)?;
    let acc = crate::ops::dtype::accumulation_dtype(dtype);
    let allocs = [
        Alloc {
            dtype: DType::F64,
            len: qv.dims[0] * k * 2,
        },
        Alloc {
            dtype: acc,
            len: plan.partial_len,
        },
        Alloc {
            dtype: DType::U32,
            len: plan.partial_len,
        },
    ];
    Ok(launch::run(exec, &[q, c], &allocs, &plan.launches)?.remove(0))
}
