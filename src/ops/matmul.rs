//! Matrix products on strided CPU buffers through the gemm crate (the kernels
//! candle's own CPU matmul uses), for the ops that fuse a product with
//! something else: the output can be written in place (no zero-filled
//! temporary), start from a bias, or be a column block of a larger tensor.

/// The float types the fused products take: gemm's f32 and f64.
pub(crate) trait GemmFloat:
    num_traits::Float + candle_core::WithDType + Send + Sync + 'static
{
}
impl GemmFloat for f32 {}
impl GemmFloat for f64 {}

/// A strided matrix: element `(i, j)` at `ptr + i·row_stride + j·col_stride`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mat<P> {
    pub ptr: P,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<P> Mat<P> {
    /// A row-major matrix whose rows are `row_stride` apart.
    pub fn rows(ptr: P, row_stride: usize) -> Self {
        Self {
            ptr,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major matrix whose rows are `row_stride` apart.
    pub fn transposed(ptr: P, row_stride: usize) -> Self {
        Self {
            ptr,
            row_stride: 1,
            col_stride: row_stride,
        }
    }
}

/// How a product runs and where its result goes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Gemm<F> {
    /// `dst = alpha·lhs·rhs` (+ `dst` when `accumulate`).
    pub alpha: F,
    pub accumulate: bool,
    /// Split over rayon's threads (false inside a task that is itself parallel).
    pub parallel: bool,
}

impl<F: GemmFloat> Gemm<F> {
    pub fn new(alpha: F) -> Self {
        Self {
            alpha,
            accumulate: false,
            parallel: false,
        }
    }

    pub fn accumulate(self) -> Self {
        Self {
            accumulate: true,
            ..self
        }
    }

    pub fn parallel(self) -> Self {
        Self {
            parallel: true,
            ..self
        }
    }

    /// `dst[m×n] (+)= alpha · lhs[m×k] · rhs[k×n]`. With `k = 0` the product is
    /// zero: `dst` is zeroed, or left as it is when accumulating.
    ///
    /// # Safety
    /// Each pointer must address its whole matrix under its strides, and `dst`
    /// must not overlap `lhs` or `rhs` (nor be written by anyone else meanwhile).
    pub unsafe fn run(
        self,
        (m, n, k): (usize, usize, usize),
        dst: Mat<*mut F>,
        lhs: Mat<*const F>,
        rhs: Mat<*const F>,
    ) {
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            if !self.accumulate {
                for i in 0..m {
                    for j in 0..n {
                        // SAFETY: (i, j) lies inside dst (caller's contract).
                        unsafe {
                            *dst.ptr.add(i * dst.row_stride + j * dst.col_stride) = F::zero()
                        };
                    }
                }
            }
            return;
        }
        let parallelism = if self.parallel && rayon::current_num_threads() > 1 {
            gemm::Parallelism::Rayon(rayon::current_num_threads())
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: the caller's contract. gemm computes
        // dst = alpha_gemm·dst + beta_gemm·lhs·rhs, reading dst only if read_dst.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.ptr,
                dst.col_stride as isize,
                dst.row_stride as isize,
                self.accumulate,
                lhs.ptr,
                lhs.col_stride as isize,
                lhs.row_stride as isize,
                rhs.ptr,
                rhs.col_stride as isize,
                rhs.row_stride as isize,
                F::one(),
                self.alpha,
                false,
                false,
                false,
                parallelism,
            )
        }
    }
}
