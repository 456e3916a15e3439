//! Launch plans of `kernels/mean_pool.cu`, and their run on an [`Executor`]
//! (the CUDA device, or the host harness in tests).
//!
//! Strides and offsets go to the kernels as arguments, so strided inputs are
//! never copied, and the mask is read in its own dtype. The kernels come in two
//! forms per dtype: `_vec` moves 16 bytes per thread per token (float4, 8
//! halves, 2 doubles) and needs unit stride on H and H, the other strides and
//! the offset all multiples of that width; the plain form takes any strides,
//! one element per thread.

use candle_core::{DType, Result};

use super::OP;
use crate::ops::launch::{self, as_i32, kernel_name, Alloc, Buffer, Executor, Launch};
use crate::ops::layout::View;

const MODULE: &str = "mean_pool";
/// Threads per block (8 warps); must match `BLOCK` in the kernel file.
const BLOCK: u32 = 256;
/// Columns one warp covers per element of a thread's vector.
const WARP: usize = 32;
/// Bytes one thread moves per token on the vector path.
const VEC_BYTES: usize = 16;

/// Elements per thread on the vector path for `dtype`, or 1 when the strides,
/// offset or H rule vector loads out. Device allocations are 256-byte aligned,
/// so an element offset that is a multiple of the width is aligned.
pub(super) fn vector_width(dtype: DType, h: usize, strides: &[usize], offset: usize) -> usize {
    let width = VEC_BYTES / dtype.size_in_bytes();
    let (outer, h_stride) = strides.split_at(strides.len() - 1);
    let unit_h = h_stride[0] == 1 || h == 1;
    let aligned = |n: &usize| n.is_multiple_of(width);
    if unit_h && aligned(&h) && aligned(&offset) && outer.iter().all(aligned) {
        width
    } else {
        1
    }
}

/// One block per (row b, chunk of `32·width` columns); B on grid x (no 65535 cap).
fn grid(b: usize, h: usize, width: usize) -> Result<(u32, u32, u32)> {
    let chunks = h.div_ceil(WARP * width);
    if b > i32::MAX as usize || chunks > 65535 {
        candle_core::bail!("{OP}: shape too large for the CUDA kernel (B = {b}, H = {h})");
    }
    Ok((b as u32, chunks as u32, 1))
}

/// The bits of a mask element that make it non-zero: all of an integer's, all
/// but the sign of a float's (`-0.0` is zero, NaN is not, as for `mask != 0`).
fn mask_magnitude(dtype: DType) -> Result<u64> {
    Ok(match dtype {
        DType::U8 => 0xff,
        DType::I16 => 0xffff,
        DType::U32 | DType::I32 => 0xffff_ffff,
        DType::I64 => u64::MAX,
        DType::F8E4M3 => 0x7f,
        DType::F16 | DType::BF16 => 0x7fff,
        DType::F32 => 0x7fff_ffff,
        DType::F64 => 0x7fff_ffff_ffff_ffff,
        other => candle_core::bail!("{OP}: unsupported dtype {other:?} for mask"),
    })
}

/// The mask's kernel arguments: its bytes from the view's offset, the strides,
/// the element width and the bits that count.
fn push_mask(launch: Launch, mask_dtype: DType, fv: &View<2>) -> Result<Launch> {
    let [msb, mst] = fv.strides.map(|s| s as i64);
    Ok(launch
        .bytes(Buffer::Input(1), fv.offset)
        .i64(msb)
        .i64(mst)
        .i32(mask_dtype.size_in_bytes() as i32)
        .u64(mask_magnitude(mask_dtype)?))
}

/// The forward launch (`None` when the output is empty), on inputs
/// (hidden `[B,T,H]`, mask `[B,T]`) and output 0 (pooled `[B,H]`, contiguous).
pub(super) fn forward_launch(
    dtype: DType,
    hv: &View<3>,
    mask_dtype: DType,
    fv: &View<2>,
) -> Result<Option<Launch>> {
    let [b, t, h] = hv.dims;
    if b * h == 0 {
        return Ok(None);
    }
    let width = vector_width(dtype, h, &hv.strides, hv.offset);
    let base = if width > 1 {
        "mean_pool_fwd_vec"
    } else {
        "mean_pool_fwd"
    };
    let [xsb, xst, xsh] = hv.strides.map(|s| s as i64);
    let launch = Launch::new(
        MODULE,
        kernel_name(base, dtype)?,
        grid(b, h, width)?,
        (BLOCK, 1, 1),
    )
    .ptr(Buffer::Input(0), hv.offset)
    .i64(xsb)
    .i64(xst)
    .i64(xsh);
    let launch = push_mask(launch, mask_dtype, fv)?
        .ptr(Buffer::Output(0), 0)
        .i32(as_i32(OP, "T", t)?)
        .i32(as_i32(OP, "H", h)?);
    Ok(Some(launch))
}

/// The backward launch (`None` when the output is empty), on inputs
/// (gradient `[B,H]`, mask `[B,T]`) and output 0 (gradient of hidden `[B,T,H]`).
pub(super) fn backward_launch(
    dtype: DType,
    gv: &View<2>,
    mask_dtype: DType,
    fv: &View<2>,
) -> Result<Option<Launch>> {
    let [b, h] = gv.dims;
    let t = fv.dims[1];
    if b * t * h == 0 {
        return Ok(None);
    }
    // The output is fresh and contiguous: only H decides the vector width.
    let width = vector_width(dtype, h, &[h, 1], 0);
    let base = if width > 1 {
        "mean_pool_bwd_vec"
    } else {
        "mean_pool_bwd"
    };
    let [gsb, gsh] = gv.strides.map(|s| s as i64);
    let launch = Launch::new(
        MODULE,
        kernel_name(base, dtype)?,
        grid(b, h, width)?,
        (BLOCK, 1, 1),
    )
    .ptr(Buffer::Input(0), gv.offset)
    .i64(gsb)
    .i64(gsh);
    let launch = push_mask(launch, mask_dtype, fv)?
        .ptr(Buffer::Output(0), 0)
        .i32(as_i32(OP, "T", t)?)
        .i32(as_i32(OP, "H", h)?);
    Ok(Some(launch))
}

/// Pooled `[B,H]` of `hidden` under `mask`, on `exec`.
pub(super) fn forward<E: Executor>(
    exec: &E,
    hidden: &E::Storage,
    hv: View<3>,
    mask: &E::Storage,
    fv: View<2>,
) -> Result<E::Storage> {
    let dtype = E::dtype(hidden);
    let out = Alloc {
        dtype,
        len: hv.dims[0] * hv.dims[2],
    };
    let launches: Vec<Launch> = forward_launch(dtype, &hv, E::dtype(mask), &fv)?
        .into_iter()
        .collect();
    let mut outputs = launch::run(exec, &[hidden, mask], &[out], &launches)?;
    Ok(outputs.remove(0))
}

/// The gradient of hidden `[B,T,H]` from the pooled gradient, on `exec`.
pub(super) fn backward<E: Executor>(
    exec: &E,
    grad: &E::Storage,
    gv: View<2>,
    mask: &E::Storage,
    fv: View<2>,
) -> Result<E::Storage> {
    let dtype = E::dtype(grad);
    let out = Alloc {
        dtype,
        len: gv.dims[0] * fv.dims[1] * gv.dims[1],
    };
    let launches: Vec<Launch> = backward_launch(dtype, &gv, E::dtype(mask), &fv)?
        .into_iter()
        .collect();
    let mut outputs = launch::run(exec, &[grad, mask], &[out], &launches)?;
    Ok(outputs.remove(0))
}
