//! The kernel tests (`tests/kernels/`) on the host harness: the same
//! `kernels/*.cu` compiled for the CPU with CUDA semantics (kernels/host/),
//! launched through the same launch plans as on a GPU, against the CPU path.
//! No GPU needed; `tests/gpu` runs the same tests on a CUDA device. The
//! encoder and a short training run on the kernels are here too
//! (`encoder_training`), and all-MiniLM-L6-v2 itself (`minilm`).

// `common` and the support modules all include `common/shared.rs`.
#![allow(clippy::duplicate_mod)]

#[path = "../bert_support/mod.rs"]
mod bert_support;
#[path = "../common/mod.rs"]
mod common;
#[path = "../train_support/mod.rs"]
mod train_support;

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
#[path = "../kernels/encoder_training.rs"]
mod encoder_training;
#[path = "../kernels/layer_norm.rs"]
mod layer_norm;
#[path = "../kernels/mean_pool.rs"]
mod mean_pool;
#[path = "../kernels/multi_head_cross_entropy.rs"]
mod multi_head_cross_entropy;
#[path = "../kernels/top_k.rs"]
mod top_k;

mod harness;
mod minilm;

/// Always the host harness.
fn kernel_target(_test: &str) -> Option<common::KernelTarget> {
    Some(common::KernelTarget::Host)
}
