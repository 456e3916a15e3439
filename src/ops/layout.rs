//! Strided views of op inputs and the shape checks every op shares.

use candle_core::{CpuStorage, Layout, Result, Tensor, WithDType};

/// A rank-`N` strided view: element `idx` lives at `offset + Σ idx[i]·strides[i]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View<const N: usize> {
    pub dims: [usize; N],
    pub strides: [usize; N],
    pub offset: usize,
}

impl<const N: usize> View<N> {
    /// The view of `layout`, or an `Err` naming `op` and `what` if its rank is not `N`.
    pub fn new(op: &str, what: &str, layout: &Layout) -> Result<Self> {
        let dims = layout.dims();
        if dims.len() != N {
            candle_core::bail!("{op}: {what} must have rank {N}, got shape {dims:?}");
        }
        let mut view = Self {
            dims: [0; N],
            strides: [0; N],
            offset: layout.start_offset(),
        };
        view.dims.copy_from_slice(dims);
        view.strides.copy_from_slice(layout.stride());
        Ok(view)
    }

    #[inline(always)]
    pub fn at(&self, idx: [usize; N]) -> usize {
        idx.iter()
            .zip(&self.strides)
            .fold(self.offset, |pos, (i, s)| pos + i * s)
    }

    /// True when the last dimension is unit-stride (rows can be read as slices).
    #[inline]
    pub fn rows_contiguous(&self) -> bool {
        N == 0 || self.strides[N - 1] == 1 || self.dims[N - 1] <= 1
    }

    /// The number of elements the view spans (the launch plans size buffers by it).
    #[cfg(any(feature = "cuda", feature = "host-kernels"))]
    pub fn elem_count(&self) -> usize {
        self.dims.iter().product()
    }
}

/// `Err` unless `t` has rank `rank`; `expected` describes the shape, e.g. `"[B,T,H]"`.
pub fn check_rank(op: &str, what: &str, t: &Tensor, rank: usize, expected: &str) -> Result<()> {
    if t.rank() != rank {
        candle_core::bail!(
            "{op}: {what} must have rank {rank} {expected}, got shape {:?}",
            t.dims()
        );
    }
    Ok(())
}

/// `x` of rank >= 1 (`[.., H]`) and each of `vectors` of shape `[H]` (a per-column
/// bias, weight...), on `x`'s device and of its dtype, which must be a float.
pub fn check_column_vectors(op: &str, x: &Tensor, vectors: &[(&str, &Tensor)]) -> Result<()> {
    if x.rank() == 0 {
        candle_core::bail!("{op}: x must have rank >= 1 [.., H], got a scalar");
    }
    let h = x.dim(candle_core::D::Minus1)?;
    for &(what, t) in vectors {
        if t.dims() != [h] {
            candle_core::bail!(
                "{op}: {what} must have shape [{h}] (the last dimension of x {:?}), got {:?}",
                x.dims(),
                t.dims()
            );
        }
        check_same_dtype(op, ("x", x), (what, t))?;
        check_same_device(op, ("x", x), (what, t))?;
    }
    super::dtype::check_float_dtype(op, "x", x.dtype())
}

/// `Err` unless both tensors live on the same device.
pub fn check_same_device(op: &str, a: (&str, &Tensor), b: (&str, &Tensor)) -> Result<()> {
    if !a.1.device().same_device(b.1.device()) {
        candle_core::bail!(
            "{op}: {} is on {:?} but {} is on {:?}",
            a.0,
            a.1.device().location(),
            b.0,
            b.1.device().location()
        );
    }
    Ok(())
}

/// `Err` unless both tensors have the same dtype.
pub fn check_same_dtype(op: &str, a: (&str, &Tensor), b: (&str, &Tensor)) -> Result<()> {
    if a.1.dtype() != b.1.dtype() {
        candle_core::bail!(
            "{op}: {} is {:?} but {} is {:?}; both must have the same dtype",
            a.0,
            a.1.dtype(),
            b.0,
            b.1.dtype()
        );
    }
    Ok(())
}

/// The elements of a contiguous CPU input (ops that take only contiguous
/// inputs make them so first); the start offset of a narrowed tensor is honoured.
pub fn contiguous_slice<'a, T: WithDType>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&storage.as_slice::<T>()?[start..end]),
        None => candle_core::bail!("{op}: internal error, input not contiguous"),
    }
}
