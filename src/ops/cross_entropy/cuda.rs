//! Launch plans of `kernels/cross_entropy.cu`, and their run on an
//! [`Executor`] (the CUDA device, or the host harness in tests). Strides and
//! offsets go to the kernels as arguments: no input is copied. Nothing is read
//! back to the host: the forward leaves its status record (first bad label,
//! labelled-row counts) on the device for the backward and for [`label_error`].

use candle_core::{DType, Result};

use super::{label_out_of_range, Dims, OP};
use crate::ops::launch::{self, kernel_name, label_tag, Alloc, Buffer, Executor, Launch};
use crate::ops::layout::View;

const MODULE: &str = "cross_entropy";
const BLOCK: u32 = 256;
/// Enough resident blocks to fill any current GPU; above this, threads loop
/// over several rows (more independent loads each) and the finalize launch
/// stays one small block.
pub(super) const MAX_FWD_BLOCKS: usize = 1024;
/// `status[0]` when every label was in range (the kernels' NO_BAD_LABEL).
const NO_BAD_LABEL: i64 = i64::MAX;

fn grid_for(rows: usize, max_blocks: usize) -> u32 {
    rows.div_ceil(BLOCK as usize).clamp(1, max_blocks) as u32
}

/// The arguments both kernels start with, inputs 0-2 being (logits_a,
/// logits_b, labels): each head's (logits, row stride, col stride, classes),
/// then (labels, row stride, col stride, n, ignore index).
fn push_inputs(
    mut launch: Launch,
    dims: Dims,
    logits: &[View<2>; 2],
    labels: &View<2>,
    ignore: i64,
) -> Launch {
    for (i, view) in logits.iter().enumerate() {
        launch = launch
            .ptr(Buffer::Input(i), view.offset)
            .u64(view.strides[0] as u64)
            .u64(view.strides[1] as u64)
            .u64(view.dims[1] as u64);
    }
    launch
        .ptr(Buffer::Input(2), labels.offset)
        .u64(labels.strides[0] as u64)
        .u64(labels.strides[1] as u64)
        .u64(dims.n as u64)
        .i64(ignore)
}

/// The forward's buffers (outputs 0-3: losses, status, partial losses,
/// partial counts) and launches: one, or two when more than one block is needed.
fn forward_plan(
    dtype: DType,
    label_dtype: DType,
    dims: Dims,
    logits: &[View<2>; 2],
    labels: &View<2>,
    ignore: i64,
) -> Result<(Vec<Alloc>, Vec<Launch>)> {
    let grid = grid_for(dims.n, MAX_FWD_BLOCKS);
    let allocs = vec![
        Alloc { dtype, len: 2 },
        Alloc {
            dtype: DType::I64,
            len: 4,
        },
        Alloc {
            dtype: DType::F64,
            len: 2 * grid as usize,
        },
        Alloc {
            dtype: DType::I64,
            len: 4 * grid as usize,
        },
    ];
    let fwd = Launch::new(
        MODULE,
        kernel_name(
            &format!("dual_ce_fwd_{}", label_tag(OP, label_dtype)?),
            dtype,
        )?,
        (grid, 1, 1),
        (BLOCK, 1, 1),
    );
    let fwd = push_inputs(fwd, dims, logits, labels, ignore)
        .ptr(Buffer::Output(2), 0)
        .ptr(Buffer::Output(3), 0)
        .ptr(Buffer::Output(0), 0)
        .ptr(Buffer::Output(1), 0);
    let mut launches = vec![fwd];
    if grid > 1 {
        launches.push(
            Launch::new(
                MODULE,
                kernel_name("dual_ce_finalize", dtype)?,
                (1, 1, 1),
                (BLOCK, 1, 1),
            )
            .ptr(Buffer::Output(2), 0)
            .ptr(Buffer::Output(3), 0)
            .u64(grid as u64)
            .ptr(Buffer::Output(0), 0)
            .ptr(Buffer::Output(1), 0),
        );
    }
    Ok((allocs, launches))
}

/// The two losses `[2]` and the status record, left on the device.
pub(super) fn forward<E: Executor>(
    exec: &E,
    dims: Dims,
    logits: [(&E::Storage, View<2>); 2],
    labels: (&E::Storage, View<2>),
    ignore: i64,
) -> Result<(E::Storage, E::Storage)> {
    let views = [logits[0].1, logits[1].1];
    let (allocs, launches) = forward_plan(
        E::dtype(logits[0].0),
        E::dtype(labels.0),
        dims,
        &views,
        &labels.1,
        ignore,
    )?;
    let inputs = [logits[0].0, logits[1].0, labels.0];
    let mut outputs = launch::run(exec, &inputs, &allocs, &launches)?.into_iter();
    let losses = outputs.next().expect("losses buffer");
    let status = outputs.next().expect("status buffer");
    Ok((losses, status))
}

/// Reads the status record (a synchronisation on a GPU): the error for the
/// first out-of-range label, if any.
pub(super) fn label_error<E: Executor>(
    exec: &E,
    status: &E::Storage,
    classes: [usize; 2],
    ignore: i64,
) -> Result<Option<candle_core::Error>> {
    let status = exec.read_i64(status)?;
    let (bad_key, bad_value) = (status[0], status[1]);
    if bad_key == NO_BAD_LABEL {
        return Ok(None);
    }
    let (row, head) = ((bad_key / 2) as usize, (bad_key % 2) as usize);
    Ok(Some(label_out_of_range(
        head,
        row,
        bad_value,
        classes[head],
        ignore,
    )))
}

/// Both gradients in one launch, one thread per row: `[N·Ca]` then `[N·Cb]`.
/// Inputs 3 and 4 are the incoming gradient `[2]` (contiguous) and the status.
pub(super) fn backward<E: Executor>(
    exec: &E,
    dims: Dims,
    logits: [(&E::Storage, View<2>); 2],
    labels: (&E::Storage, View<2>),
    ignore: i64,
    (grad_losses, grad_offset): (&E::Storage, usize),
    status: &E::Storage,
) -> Result<E::Storage> {
    let dtype = E::dtype(logits[0].0);
    let grads = Alloc {
        dtype,
        len: super::grad_len(dims),
    };
    let mut launches = Vec::new();
    if dims.n > 0 {
        let views = [logits[0].1, logits[1].1];
        let bwd = Launch::new(
            MODULE,
            kernel_name(
                &format!("dual_ce_bwd_{}", label_tag(OP, E::dtype(labels.0))?),
                dtype,
            )?,
            (grid_for(dims.n, usize::MAX >> 1), 1, 1),
            (BLOCK, 1, 1),
        );
        launches.push(
            push_inputs(bwd, dims, &views, &labels.1, ignore)
                .ptr(Buffer::Input(3), grad_offset)
                .ptr(Buffer::Input(4), 0)
                .ptr(Buffer::Output(0), 0),
        );
    }
    let inputs = [logits[0].0, logits[1].0, labels.0, grad_losses, status];
    Ok(launch::run(exec, &inputs, &[grads], &launches)?.remove(0))
}

/// Launches the empty kernel `dual_ce_empty` once: the launch-overhead
/// baseline the CUDA benches compare the op with.
#[cfg(feature = "cuda")]
pub(super) fn launch_empty_kernel<E: Executor>(exec: &E) -> Result<()> {
    let empty = Launch::new(MODULE, "dual_ce_empty", (1, 1, 1), (BLOCK, 1, 1));
    launch::run(exec, &[], &[], &[empty]).map(|_| ())
}
