//! The kernel tests (`tests/kernels/`) on the host harness: the same
//! `kernels/*.cu` compiled for the CPU with CUDA semantics (kernels/host/),
//! launched through the same launch plans as on a GPU, against the CPU path.
//! No GPU needed; `tests/gpu` runs the same tests on a CUDA device.

#[path = "../common/mod.rs"]
mod common;

#[path = "../kernels/adamw.rs"]
mod adamw;
#[path = "../kernels/attention.rs"]
mod attention;
#[path = "../kernels/bias_gelu.rs"]
mod bias_gelu;
#[path = "../kernels/cosine.rs"]
mod cosine;
#[path = "../kernels/cross_entropy.rs"]
mod cross_entropy;
#[path = "../kernels/layer_norm.rs"]
mod layer_norm;
#[path = "../kernels/mean_pool.rs"]
mod mean_pool;
#[path = "../kernels/multi_head_cross_entropy.rs"]
mod multi_head_cross_entropy;
#[path = "../kernels/top_k.rs"]
mod top_k;

mod harness;

/// Always the host harness.
fn kernel_target(_test: &str) -> Option<common::KernelTarget> {
    Some(common::KernelTarget::Host)
}
