//! The fused ops, each a differentiable candle `CustomOp` with a CPU path and a
//! CUDA path (`cuda` feature) in one file beside its one `kernels/*.cu` file.
//!
//! | op | file | kernel |
//! | --- | --- | --- |
//! | [`masked_mean_pool`] | `mean_pool/` | `kernels/mean_pool.cu` |
//! | [`cosine_similarity`], [`cosine_similarity_matrix`], [`l2_normalize`], [`cosine_top_k`] | `cosine/` | `kernels/cosine.cu` |
//! | [`dual_head_cross_entropy`] | `cross_entropy/` | `kernels/cross_entropy.cu` |
//! | [`multi_tensor_adamw`] (the optimiser step, in place, one launch for all tensors) | `adamw/` | `kernels/adamw.cu` |
//! | [`layer_norm()`], [`layer_norm_residual`] | `layer_norm/` | `kernels/layer_norm.cu` |
//! | [`bias_gelu()`] (the encoder's intermediate layer off the CPU) | `bias_gelu/` | `kernels/bias_gelu.cu` |
//! | [`multi_head_cross_entropy()`] | `multi_head_cross_entropy/` | `kernels/multi_head_cross_entropy.cu` |
//!
//! Each op folder has the same three files: `mod.rs` (the public function, its
//! input checks and the `CustomOp`), `cpu.rs` (the CPU path) and `cuda.rs` (the
//! launch plans of its kernels, run by cudarc on a GPU or by the host harness in
//! tests). The helpers they share (`dtype`: dtype dispatch; `layout`: strided
//! views and checks; `math`: vectorisable `exp`/`ln`; `buffer`; `launch`) are
//! private to the crate, except `launch` and `host` (under `host-kernels`), which the kernel tests
//! drive directly.
//!
//! The encoder's training path adds CPU ops with a fused backward where
//! candle's composed ops are slow on the CPU ([`layer_norm()`], [`add_bias`],
//! [`sum_rows`], [`softmax_last_dim`], [`gelu_erf`], [`linear()`], and multi-head
//! [`attention()`] on a fused query-key-value projection); on other devices they compose candle ops.
//!
//! Every op takes f32, f16, bf16 and f64 (f16/bf16 accumulate in f32), honours
//! strided and offset inputs, and returns an `Err` naming the problem for bad input.
//! [`mod@reference`] holds a plain f64 implementation of each, forward and backward.

pub mod adamw;
pub mod attention;
pub mod bias;
pub mod bias_gelu;
mod buffer;
pub mod cosine;
pub mod cross_entropy;
pub(crate) mod dtype;
pub mod gelu;
pub mod layer_norm;
pub(crate) mod layout;
pub mod linear;
pub(crate) mod math;
mod matmul;
pub mod mean_pool;
pub mod multi_head_cross_entropy;
pub mod reference;
pub mod softmax;

#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "host-kernels")]
pub mod host;
#[cfg(any(feature = "cuda", feature = "host-kernels"))]
pub mod launch;

pub use adamw::multi_tensor_adamw;
pub use attention::attention;
pub use bias::{add_bias, sum_rows};
pub use bias_gelu::bias_gelu;
pub use cosine::{cosine_similarity, cosine_similarity_matrix, cosine_top_k, l2_normalize, TopK};
pub use cross_entropy::{dual_head_cross_entropy, IGNORE_INDEX};
pub use gelu::gelu_erf;
pub use layer_norm::{layer_norm, layer_norm_residual};
pub use linear::linear;
pub use mean_pool::masked_mean_pool;
pub use multi_head_cross_entropy::{multi_head_cross_entropy, CeHead, MultiHeadLoss};
pub use softmax::softmax_last_dim;

/// Whether the fused ops on `device` run the `kernels/*.cu` kernels: on a CUDA
/// device, and on the CPU inside `ops::host::run` (the host harness, which
/// executes the same kernels under CUDA semantics). The model asks this too,
/// so that under the harness it takes the path it takes on a GPU.
pub fn runs_kernels(device: &candle_core::Device) -> bool {
    #[cfg(feature = "host-kernels")]
    if device.is_cpu() && host::enabled() {
        return true;
    }
    device.is_cuda()
}
