//! Launch plans of `kernels/multi_head_cross_entropy.cu`, and their run on an
//! [`Executor`] (the CUDA device, or the host harness in tests). The logits and
//! labels are read in place through their strides; the heads' settings go to
//! the kernels as a small table on the device (`Plan::table`). Nothing is read
//! back: the forward leaves the heads' weight sums (the backward's
//! denominators) and its status record (the first bad label) on the device.

use candle_core::{DType, Result};

use super::{label_out_of_range, Plan, OP};
use crate::ops::launch::{self, as_i32, kernel_name, label_tag, Alloc, Buffer, Executor, Launch};
use crate::ops::layout::View;

const MODULE: &str = "multi_head_cross_entropy";
const BLOCK: u32 = 256;
/// The forward's grid cap: enough resident blocks for any current GPU; past it
/// threads loop over rows, and the finalize launch stays one small block.
const MAX_FWD_BLOCKS: usize = 1024;
/// `status[0]` when every label was in range (the kernels' NO_BAD_LABEL).
const NO_BAD_LABEL: i64 = i64::MAX;

fn grid_for(rows: usize, max_blocks: usize) -> u32 {
    rows.div_ceil(BLOCK as usize).clamp(1, max_blocks) as u32
}

/// The problem as the kernels see it.
#[derive(Clone, Copy)]
pub(super) struct Problem {
    /// Rows.
    pub n: usize,
    /// Heads.
    pub heads: usize,
    /// `ΣC`: the logits' width, the gradient's row length.
    pub width: usize,
}

/// The arguments both kernels start with, inputs 0-2 being (logits, labels,
/// table): logits and their strides, labels and theirs, n, table, heads.
fn push_inputs(
    launch: Launch,
    problem: Problem,
    logits: &View<2>,
    labels: &View<2>,
) -> Result<Launch> {
    Ok(launch
        .ptr(Buffer::Input(0), logits.offset)
        .u64(logits.strides[0] as u64)
        .u64(logits.strides[1] as u64)
        .ptr(Buffer::Input(1), labels.offset)
        .u64(labels.strides[0] as u64)
        .u64(labels.strides[1] as u64)
        .u64(problem.n as u64)
        .ptr(Buffer::Input(2), 0)
        .i32(as_i32(OP, "heads", problem.heads)?))
}

/// The forward's buffers (outputs 0-4: losses `[H+1]`, weight sums `[H]`,
/// status `[2]`, partial sums, partial bad labels) and launches: one, or two
/// when more than one block is needed.
fn forward_plan(
    dtype: DType,
    label_dtype: DType,
    problem: Problem,
    logits: &View<2>,
    labels: &View<2>,
) -> Result<(Vec<Alloc>, Vec<Launch>)> {
    let grid = grid_for(problem.n, MAX_FWD_BLOCKS);
    let h = problem.heads;
    let allocs = vec![
        Alloc { dtype, len: h + 1 },
        Alloc {
            dtype: DType::F64,
            len: h,
        },
        Alloc {
            dtype: DType::I64,
            len: 2,
        },
        Alloc {
            dtype: DType::F64,
            len: 2 * h * grid as usize,
        },
        Alloc {
            dtype: DType::I64,
            len: 2 * grid as usize,
        },
    ];
    let fwd = Launch::new(
        MODULE,
        kernel_name(&format!("mhce_fwd_{}", label_tag(OP, label_dtype)?), dtype)?,
        (grid, 1, 1),
        (BLOCK, 1, 1),
    );
    let fwd = push_inputs(fwd, problem, logits, labels)?
        .ptr(Buffer::Output(3), 0)
        .ptr(Buffer::Output(4), 0)
        .ptr(Buffer::Output(0), 0)
        .ptr(Buffer::Output(1), 0)
        .ptr(Buffer::Output(2), 0);
    let mut launches = vec![fwd];
    if grid > 1 {
        launches.push(
            Launch::new(
                MODULE,
                kernel_name("mhce_finalize", dtype)?,
                (1, 1, 1),
                (BLOCK, 1, 1),
            )
            .ptr(Buffer::Input(2), 0)
            .i32(as_i32(OP, "heads", h)?)
            .u64(grid as u64)
            .ptr(Buffer::Output(3), 0)
            .ptr(Buffer::Output(4), 0)
            .ptr(Buffer::Output(0), 0)
            .ptr(Buffer::Output(1), 0)
            .ptr(Buffer::Output(2), 0),
        );
    }
    Ok((allocs, launches))
}

/// What the forward leaves on the device.
pub(super) struct ForwardOut<S> {
    /// `[H + 1]`: each head's loss, then the weighted total.
    pub losses: S,
    /// `[H]` f64: each head's weight sum.
    pub weight_sums: S,
    /// `[2]` i64: the first bad label's key (`row·H + head`) and value.
    pub status: S,
}

/// The losses, weight sums and status record, all left on the device.
pub(super) fn forward<E: Executor>(
    exec: &E,
    problem: Problem,
    (logits, logits_view): (&E::Storage, View<2>),
    (labels, labels_view): (&E::Storage, View<2>),
    table: &E::Storage,
) -> Result<ForwardOut<E::Storage>> {
    let (allocs, launches) = forward_plan(
        E::dtype(logits),
        E::dtype(labels),
        problem,
        &logits_view,
        &labels_view,
    )?;
    let inputs = [logits, labels, table];
    let mut outputs = launch::run(exec, &inputs, &allocs, &launches)?.into_iter();
    let mut next = || outputs.next().expect("a planned buffer");
    Ok(ForwardOut {
        losses: next(),
        weight_sums: next(),
        status: next(),
    })
}

/// Reads the status record (a synchronisation on a GPU): the error for the
/// first out-of-range label, if any.
pub(super) fn label_error<E: Executor>(
    exec: &E,
    status: &E::Storage,
    plan: &Plan,
) -> Result<Option<candle_core::Error>> {
    let status = exec.read_i64(status)?;
    let (bad_key, bad_value) = (status[0], status[1]);
    if bad_key == NO_BAD_LABEL {
        return Ok(None);
    }
    let heads = plan.heads() as i64;
    let (row, head) = ((bad_key / heads) as usize, (bad_key % heads) as usize);
    Ok(Some(label_out_of_range(
        head,
        row,
        bad_value,
        plan.classes[head],
        plan.ignore[head],
    )))
}

/// Every head's gradient in one launch, one thread per row: `[N·ΣC]`
/// row-major. Inputs 3 and 4 are the incoming gradient `[H + 1]` (contiguous
/// from its offset) and the forward's weight sums.
pub(super) fn backward<E: Executor>(
    exec: &E,
    problem: Problem,
    (logits, logits_view): (&E::Storage, View<2>),
    (labels, labels_view): (&E::Storage, View<2>),
    table: &E::Storage,
    (grad_losses, grad_offset): (&E::Storage, usize),
    weight_sums: &E::Storage,
) -> Result<E::Storage> {
    let dtype = E::dtype(logits);
    let grads = Alloc {
        dtype,
        len: problem.n * problem.width,
    };
    let mut launches = Vec::new();
    if problem.n > 0 {
        let bwd = Launch::new(
            MODULE,
            kernel_name(
                &format!("mhce_bwd_{}", label_tag(OP, E::dtype(labels))?),
                dtype,
            )?,
            (grid_for(problem.n, usize::MAX >> 1), 1, 1),
            (BLOCK, 1, 1),
        );
        launches.push(
            push_inputs(bwd, problem, &logits_view, &labels_view)?
                .ptr(Buffer::Input(3), grad_offset)
                .ptr(Buffer::Input(4), 0)
                .u64(problem.width as u64)
                .ptr(Buffer::Output(0), 0),
        );
    }
    let inputs = [logits, labels, table, grad_losses, weight_sums];
    Ok(launch::run(exec, &inputs, &[grads], &launches)?.remove(0))
}
