//! The kernel tests (`tests/kernels/`) on a CUDA device: every op's kernels
//! against the CPU path, in one binary so that `scripts/gpu/build-binaries.sh`
//! has one file to carry to a GPU machine. Where no CUDA device can be opened
//! each test prints that it was skipped and passes; `SENTENCE_MTL_REQUIRE_GPU=1`
//! (set by `scripts/gpu/run.sh`) makes that a failure instead. The same tests
//! run on the host harness in `tests/host_kernels` on every `cargo test`.

// `common` and `train_support` both include `common/shared.rs`.
#![allow(clippy::duplicate_mod)]

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

/// The CUDA device, or `None` (the test is skipped) where none can be opened.
fn kernel_target(test: &str) -> Option<common::KernelTarget> {
    common::cuda_device(test).map(common::KernelTarget::Cuda)
}
