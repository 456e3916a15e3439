//! The fused ops, each a differentiable candle `CustomOp` with a CPU path and a
//! CUDA path (`cuda` feature) in one file beside its one `kernels/*.cu` file.
//!
//! | op | file | kernel |
//! | --- | --- | --- |
//! | [`masked_mean_pool`] | `mean_pool.rs` | `kernels/mean_pool.cu` |
//! | [`cosine_similarity`], [`cosine_similarity_matrix`], [`l2_normalize`] | `cosine.rs` | `kernels/cosine.cu` |
//! | [`dual_head_cross_entropy`] | `cross_entropy.rs` | `kernels/cross_entropy.cu` |
//!
//! Every op takes f32, f16, bf16 and f64 (f16/bf16 accumulate in f32), honours
//! strided and offset inputs, and returns an `Err` naming the problem for bad input.
//! [`reference`] holds a plain f64 implementation of each, forward and backward.

pub mod cosine;
pub mod cross_entropy;
pub mod dtype;
pub mod layout;
pub mod mean_pool;
pub mod reference;

#[cfg(feature = "cuda")]
pub mod cuda;

pub use cosine::{cosine_similarity, cosine_similarity_matrix, l2_normalize};
pub use cross_entropy::{dual_head_cross_entropy, IGNORE_INDEX};
pub use mean_pool::masked_mean_pool;
