//! L2 normalisation and cosine similarity, fused and differentiable.
//!
//! # Semantics
//!
//! The epsilon rule is PyTorch's `F.normalize(x, p=2, dim=-1, eps=1e-12)`, which is
//! what sentence-transformers' `util.cos_sim` and `util.pairwise_cos_sim` use:
//!
//! - [`l2_normalize`]: `y = x / max(‖x‖₂, EPS)` for every row (last dimension).
//! - [`cosine_similarity`] (row-wise, `[N,H] × [N,H] → [N]`) and
//!   [`cosine_similarity_matrix`] (all pairs, `[N,H] × [M,H] → [N,M]`):
//!   `cos(a, b) = ⟨a, b⟩ / (max(‖a‖, EPS) · max(‖b‖, EPS))`, i.e. normalise, then
//!   dot. A zero row gives similarity 0, never NaN.
//! - [`cosine_top_k`] (`[Q,H] × [M,H] → [Q,k]` scores and indices): the `k`
//!   corpus rows of highest cosine for each query, best first, ties to the lower
//!   index, computed without the `[Q,M]` matrix (not differentiable).
//!
//! Sums run in the accumulator type (f32 for f16/bf16/f32, f64 for f64), so, as in
//! PyTorch, f32 rows whose norm exceeds ~1.8e19 overflow.
//!
//! Gradients w.r.t. both inputs follow the clamp exactly: at or above it
//! `dy/dx = (I − y·yᵀ) / ‖x‖`; below it the divisor is the constant `EPS` and
//! `y = x / EPS` is linear in `x` (PyTorch's `clamp_min` passes the gradient at
//! `‖x‖ = EPS` to the norm, and so do these ops).
//!
//! # Implementation
//!
//! - `l2_normalize` and the row-wise cosine are fused `CustomOp`s: one pass over
//!   the inputs per row (CPU: rows in parallel with rayon once there is enough
//!   work; CUDA: one warp per row, 16-byte vector loads where rows are aligned),
//!   and a fused backward op that reads the inputs once more and writes both
//!   gradients.
//! - The matrix form is `l2_normalize(a) · l2_normalize(b)ᵀ`: the fused
//!   normalisation, then candle's matmul (gemm on the CPU, cuBLAS on CUDA), whose
//!   backward is itself a pair of matmuls. Scaling the `N×M` product by the inverse
//!   norms instead would add a pass over the output, larger than the inputs
//!   whenever `N·M > (N+M)·H`.
//!
//! `cosine_top_k` scores corpus chunks and keeps one bounded list per query
//! (CPU: chunks in parallel, each chunk's dot products one blocked gemm,
//! candidates rescored row by row into a heap per query; CUDA: a block per query and
//! corpus slice merges each scored tile into a shared-memory list by bitonic
//! sort, then a block per query merges the slices' lists).
//!
//! # Errors
//!
//! Every function returns an `Err` naming itself and the problem for: a rank
//! other than 2 (`l2_normalize`: rank 0), a hidden-size mismatch, a row-count
//! mismatch (row-wise form), inputs on different devices, inputs of different
//! dtypes, or a non-float dtype.
//!
//! # Example
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use sentence_mtl::ops::{cosine_similarity, cosine_similarity_matrix, l2_normalize};
//!
//! let dev = Device::Cpu;
//! let a = Tensor::new(&[[3f32, 4.], [0., 0.]], &dev)?;
//! let b = Tensor::new(&[[6f32, 8.], [1., 2.]], &dev)?;
//! let y = l2_normalize(&a)?.to_vec2::<f32>()?;
//! assert!((y[0][0] - 0.6).abs() < 1e-6 && y[1] == [0., 0.]);
//! let cos = cosine_similarity(&a, &b)?.to_vec1::<f32>()?;
//! assert!((cos[0] - 1.0).abs() < 1e-6 && cos[1] == 0.0); // a zero row gives 0
//! let all = cosine_similarity_matrix(&a, &b)?;
//! assert_eq!(all.dims(), &[2, 2]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
};
use num_traits::{Float, Zero};
use rayon::prelude::*;

mod cpu;
#[cfg(any(feature = "cuda", feature = "host-kernels"))]
mod cuda;

use cpu::Rows;

use super::buffer::output_buffer;
use super::dtype::{check_float_dtype, Accum, FloatElem};
use super::layout::{check_rank, check_same_device, check_same_dtype, View};
use crate::ops::dtype::with_float_dtype;

/// The clamp on norms: `F.normalize`'s default `eps`.
pub const EPS: f64 = 1e-12;

const NORMALIZE: &str = "l2_normalize";
const ROW_COSINE: &str = "cosine_similarity";
const MATRIX_COSINE: &str = "cosine_similarity_matrix";
const TOP_K: &str = "cosine_top_k";

// ---- public functions --------------------------------------------------------

/// Divides every row (the last dimension) of `x` by `max(‖row‖₂, 1e-12)`, exactly
/// `torch.nn.functional.normalize(x, p=2, dim=-1)`. A zero row stays zero.
///
/// `x` may have any rank ≥ 1 and any float dtype; ranks other than 2 are viewed
/// as `[rows, H]` (a copy when that view is not contiguous). Differentiable.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    if x.rank() == 0 {
        candle_core::bail!("{NORMALIZE}: x must have rank >= 1 [.., H], got a scalar");
    }
    check_float_dtype(NORMALIZE, "x", x.dtype())?;
    if x.rank() == 2 {
        return for_kernels(x)?.apply_op1(L2Normalize);
    }
    let dims = x.dims();
    let (h, rows) = (
        dims[dims.len() - 1],
        dims[..dims.len() - 1].iter().product::<usize>(),
    );
    let y = for_kernels(&x.reshape((rows, h))?)?.apply_op1(L2Normalize)?;
    y.reshape(dims)
}

/// Row-wise cosine similarity of `a` `[N,H]` and `b` `[N,H]`: `[N]`, with
/// `cos = ⟨a,b⟩ / (max(‖a‖,1e-12)·max(‖b‖,1e-12))` as sentence-transformers'
/// `pairwise_cos_sim`. Differentiable w.r.t. both inputs.
pub fn cosine_similarity(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    check_pair(ROW_COSINE, a, b)?;
    if a.dim(0)? != b.dim(0)? {
        candle_core::bail!(
            "{ROW_COSINE}: a and b must have the same number of rows N, got a {:?} and b {:?}",
            a.dims(),
            b.dims()
        );
    }
    for_kernels(a)?.apply_op2(&for_kernels(b)?, RowCosine)
}

/// Cosine similarity of every row of `a` `[N,H]` with every row of `b` `[M,H]`:
/// `[N,M]`, as sentence-transformers' `util.cos_sim` (normalise, then matmul).
/// Differentiable w.r.t. both inputs; when `b` is `a` itself it is normalised once.
pub fn cosine_similarity_matrix(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    check_pair(MATRIX_COSINE, a, b)?;
    let a_hat = l2_normalize(a)?;
    let b_hat = if a.id() == b.id() {
        a_hat.clone()
    } else {
        l2_normalize(b)?
    };
    a_hat.matmul(&b_hat.t()?)
}

/// The best matches of each query: what [`cosine_top_k`] returns.
#[derive(Debug, Clone)]
pub struct TopK {
    /// `[Q, k]` cosine similarities, best first: f32, or f64 for f64 inputs.
    pub scores: Tensor,
    /// `[Q, k]` (u32) the corpus rows those scores belong to.
    pub indices: Tensor,
}

/// The largest `k` [`cosine_top_k`] takes on a GPU (the CPU has no limit).
pub const MAX_TOP_K_ON_GPU: usize = 1024;

/// The `k` rows of `corpus` `[M,H]` most cosine-similar to each row of
/// `queries` `[Q,H]`, best first, ties broken by the lower corpus index (the
/// cosine as in [`cosine_similarity_matrix`], in the accumulator type). Gives
/// `min(k, M)` columns. The `[Q,M]` matrix is never formed: memory is
/// `O(Q·k)` beyond the inputs, so a large corpus can also be searched chunk by
/// chunk, merging the chunks' lists.
///
/// An `Err` for `k = 0`, an empty corpus, more than `u32::MAX` corpus rows,
/// `k > MAX_TOP_K_ON_GPU` on a GPU, and the checks every cosine op makes. Not
/// differentiable.
pub fn cosine_top_k(queries: &Tensor, corpus: &Tensor, k: usize) -> Result<TopK> {
    check_rank(TOP_K, "queries", queries, 2, "[Q,H]")?;
    check_rank(TOP_K, "corpus", corpus, 2, "[M,H]")?;
    check_same_device(TOP_K, ("queries", queries), ("corpus", corpus))?;
    check_float_dtype(TOP_K, "queries", queries.dtype())?;
    check_same_dtype(TOP_K, ("queries", queries), ("corpus", corpus))?;
    let (h, m) = (queries.dim(1)?, corpus.dim(0)?);
    if corpus.dim(1)? != h {
        candle_core::bail!(
            "{TOP_K}: queries and corpus must have the same width H, got queries {:?} and corpus {:?}",
            queries.dims(),
            corpus.dims()
        );
    }
    if k == 0 {
        candle_core::bail!("{TOP_K}: k must be at least 1");
    }
    if m == 0 {
        candle_core::bail!("{TOP_K}: the corpus has no rows");
    }
    if u32::try_from(m).is_err() {
        candle_core::bail!(
            "{TOP_K}: {m} corpus rows are more than u32 indices reach; search it in chunks"
        );
    }
    let k = k.min(m);
    if super::runs_kernels(queries.device()) && k > MAX_TOP_K_ON_GPU {
        candle_core::bail!("{TOP_K}: k = {k} is more than the GPU's {MAX_TOP_K_ON_GPU}");
    }
    let packed =
        for_kernels(queries)?.apply_op2_no_bwd(&for_kernels(corpus)?, &CosineTopK { k })?;
    let acc = super::dtype::accumulation_dtype(queries.dtype());
    Ok(TopK {
        scores: packed.narrow(2, 0, 1)?.squeeze(2)?.to_dtype(acc)?,
        indices: packed.narrow(2, 1, 1)?.squeeze(2)?.to_dtype(DType::U32)?,
    })
}

// ---- validation -----------------------------------------------------------------

/// The checks both cosine forms share: ranks, device, dtype and hidden size.
fn check_pair(op: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    check_rank(op, "a", a, 2, "[N,H]")?;
    check_rank(op, "b", b, 2, "[N,H]")?;
    check_same_device(op, ("a", a), ("b", b))?;
    check_float_dtype(op, "a", a.dtype())?;
    check_same_dtype(op, ("a", a), ("b", b))?;
    if a.dim(1)? != b.dim(1)? {
        candle_core::bail!(
            "{op}: a and b must have the same hidden size H, got a {:?} and b {:?}",
            a.dims(),
            b.dims()
        );
    }
    Ok(())
}

/// The kernels read rows with unit stride (coalesced); on CUDA, copy an input
/// whose last dimension is strided (a transpose, a broadcast). The CPU path reads
/// any layout as it is.
fn for_kernels(t: &Tensor) -> Result<Tensor> {
    let unit_rows = t.stride().last() == Some(&1) || t.dims().last().is_some_and(|&h| h <= 1);
    if super::runs_kernels(t.device()) && !unit_rows {
        t.contiguous()
    } else {
        Ok(t.clone())
    }
}

/// `[N,H]` views of two inputs with the same H (and, if `same_rows`, the same N).
fn row_views(op: &str, l1: &Layout, l2: &Layout, same_rows: bool) -> Result<(View<2>, View<2>)> {
    let (v1, v2) = (View::<2>::new(op, "a", l1)?, View::<2>::new(op, "b", l2)?);
    if v1.dims[1] != v2.dims[1] || (same_rows && v1.dims[0] != v2.dims[0]) {
        candle_core::bail!("{op}: shape mismatch, {:?} and {:?}", v1.dims, v2.dims);
    }
    Ok((v1, v2))
}

fn check_dtypes(op: &str, dtypes: &[DType]) -> Result<()> {
    if dtypes.windows(2).any(|w| w[0] != w[1]) {
        candle_core::bail!("{op}: inputs must share one dtype, got {dtypes:?}");
    }
    Ok(())
}

// ---- the custom ops ------------------------------------------------------------

/// `x [N,H] → x / max(‖x‖, EPS)` per row.
struct L2Normalize;

/// `(x [N,H], grad [N,H]) → dx [N,H]`.
struct L2NormalizeBackward;

/// `(a [N,H], b [N,H]) → cos [N]`.
struct RowCosine;

/// `(a [N,H], b [N,H], grad [N]) → [2,N,H]`: `da` then `db`.
struct RowCosineBackward;

impl CustomOp1 for L2Normalize {
    fn name(&self) -> &'static str {
        NORMALIZE
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let view = View::<2>::new(NORMALIZE, "x", l)?;
        #[cfg(feature = "host-kernels")]
        if super::host::enabled() {
            let out =
                super::host::on_host([s], |exec, [x]| cuda::normalize(exec, NORMALIZE, x, view))?;
            return Ok((out, Shape::from(view.dims.to_vec())));
        }
        with_float_dtype!(NORMALIZE, "x", s.dtype(), T => {
            let x = Rows::new(s.as_slice::<T>()?, view);
            Ok((T::to_cpu_storage_owned(cpu::normalize(&x)), Shape::from(view.dims.to_vec())))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let view = View::<2>::new(NORMALIZE, "x", l)?;
        check_float_dtype(NORMALIZE, "x", s.dtype())?;
        let exec = super::cuda::CudaExecutor::new(s.device());
        let out = cuda::normalize(&exec, NORMALIZE, s, view)?;
        Ok((out, Shape::from(view.dims.to_vec())))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2(&for_kernels(grad)?, L2NormalizeBackward)?))
    }
}

impl CustomOp2 for L2NormalizeBackward {
    fn name(&self) -> &'static str {
        "l2_normalize_backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (xv, gv) = row_views(self.name(), l1, l2, true)?;
        check_dtypes(self.name(), &[s1.dtype(), s2.dtype()])?;
        #[cfg(feature = "host-kernels")]
        if super::host::enabled() {
            let out = super::host::on_host([s1, s2], |exec, [x, g]| {
                cuda::normalize_backward(exec, self.name(), (x, xv), (g, gv))
            })?;
            return Ok((out, Shape::from(xv.dims.to_vec())));
        }
        with_float_dtype!(self.name(), "x", s1.dtype(), T => {
            let x = Rows::new(s1.as_slice::<T>()?, xv);
            let g = Rows::new(s2.as_slice::<T>()?, gv);
            Ok((T::to_cpu_storage_owned(cpu::normalize_backward(&x, &g)), Shape::from(xv.dims.to_vec())))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (xv, gv) = row_views(self.name(), l1, l2, true)?;
        check_dtypes(self.name(), &[s1.dtype(), s2.dtype()])?;
        check_float_dtype(self.name(), "x", s1.dtype())?;
        let exec = super::cuda::CudaExecutor::new(s1.device());
        let out = cuda::normalize_backward(&exec, self.name(), (s1, xv), (s2, gv))?;
        Ok((out, Shape::from(xv.dims.to_vec())))
    }
}

impl CustomOp2 for RowCosine {
    fn name(&self) -> &'static str {
        ROW_COSINE
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (av, bv) = row_views(ROW_COSINE, l1, l2, true)?;
        check_dtypes(ROW_COSINE, &[s1.dtype(), s2.dtype()])?;
        #[cfg(feature = "host-kernels")]
        if super::host::enabled() {
            let out = super::host::on_host([s1, s2], |exec, [a, b]| {
                cuda::row_cosine(exec, ROW_COSINE, (a, av), (b, bv))
            })?;
            return Ok((out, Shape::from(av.dims[0])));
        }
        with_float_dtype!(ROW_COSINE, "a", s1.dtype(), T => {
            let a = Rows::new(s1.as_slice::<T>()?, av);
            let b = Rows::new(s2.as_slice::<T>()?, bv);
            Ok((T::to_cpu_storage_owned(cpu::row_cosine(&a, &b)), Shape::from(av.dims[0])))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (av, bv) = row_views(ROW_COSINE, l1, l2, true)?;
        check_dtypes(ROW_COSINE, &[s1.dtype(), s2.dtype()])?;
        check_float_dtype(ROW_COSINE, "a", s1.dtype())?;
        let exec = super::cuda::CudaExecutor::new(s1.device());
        let out = cuda::row_cosine(&exec, ROW_COSINE, (s1, av), (s2, bv))?;
        Ok((out, Shape::from(av.dims[0])))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _cos: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grads = a.apply_op3(b, grad, RowCosineBackward)?;
        Ok((Some(grads.get(0)?), Some(grads.get(1)?)))
    }
}

impl CustomOp3 for RowCosineBackward {
    fn name(&self) -> &'static str {
        "cosine_similarity_backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (av, bv) = row_views(self.name(), l1, l2, true)?;
        let gv = grad_view(self.name(), l3, av.dims[0])?;
        check_dtypes(self.name(), &[s1.dtype(), s2.dtype(), s3.dtype()])?;
        let shape = Shape::from((2, av.dims[0], av.dims[1]));
        #[cfg(feature = "host-kernels")]
        if super::host::enabled() {
            let out = super::host::on_host([s1, s2, s3], |exec, [a, b, g]| {
                cuda::row_cosine_backward(exec, self.name(), (a, av), (b, bv), (g, gv))
            })?;
            return Ok((out, shape));
        }
        with_float_dtype!(self.name(), "a", s1.dtype(), T => {
            let a = Rows::new(s1.as_slice::<T>()?, av);
            let b = Rows::new(s2.as_slice::<T>()?, bv);
            let g = s3.as_slice::<T>()?;
            let grad = |i: usize| g[gv.at([i])];
            let out = cpu::row_cosine_backward(&a, &b, grad);
            Ok((T::to_cpu_storage_owned(out), shape))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (av, bv) = row_views(self.name(), l1, l2, true)?;
        let gv = grad_view(self.name(), l3, av.dims[0])?;
        check_dtypes(self.name(), &[s1.dtype(), s2.dtype(), s3.dtype()])?;
        check_float_dtype(self.name(), "a", s1.dtype())?;
        let exec = super::cuda::CudaExecutor::new(s1.device());
        let out = cuda::row_cosine_backward(&exec, self.name(), (s1, av), (s2, bv), (s3, gv))?;
        Ok((out, Shape::from((2, av.dims[0], av.dims[1]))))
    }
}

/// `(queries [Q,H], corpus [M,H]) → [Q,k,2]` f64: (score, index) pairs, both
/// exact in f64.
struct CosineTopK {
    k: usize,
}

impl CustomOp2 for CosineTopK {
    fn name(&self) -> &'static str {
        TOP_K
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (qv, cv) = row_views(TOP_K, l1, l2, false)?;
        check_dtypes(TOP_K, &[s1.dtype(), s2.dtype()])?;
        let shape = Shape::from((qv.dims[0], self.k, 2));
        #[cfg(feature = "host-kernels")]
        if super::host::enabled() {
            let out = super::host::on_host([s1, s2], |exec, [q, c]| {
                cuda::cosine_top_k(exec, TOP_K, (q, qv), (c, cv), self.k)
            })?;
            return Ok((out, shape));
        }
        with_float_dtype!(TOP_K, "queries", s1.dtype(), T => {
            let q = Rows::new(s1.as_slice::<T>()?, qv);
            let c = Rows::new(s2.as_slice::<T>()?, cv);
            Ok((CpuStorage::F64(cpu::cosine_top_k(&q, &c, self.k)), shape))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (qv, cv) = row_views(TOP_K, l1, l2, false)?;
        check_dtypes(TOP_K, &[s1.dtype(), s2.dtype()])?;
        check_float_dtype(TOP_K, "queries", s1.dtype())?;
        let exec = super::cuda::CudaExecutor::new(s1.device());
        let out = cuda::cosine_top_k(&exec, TOP_K, (s1, qv), (s2, cv), self.k)?;
        Ok((out, Shape::from((qv.dims[0], self.k, 2))))
    }
}

/// The `[N]` view of the row-wise gradient (often a stride-0 broadcast).
fn grad_view(op: &str, l: &Layout, n: usize) -> Result<View<1>> {
    let v = View::<1>::new(op, "grad", l)?;
    if v.dims[0] != n {
        candle_core::bail!("{op}: grad has {} rows, the inputs {n}", v.dims[0]);
    }
    Ok(v)
}
