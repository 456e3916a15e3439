//! GPU-vs-CPU tests of every CUDA op, in one binary so that
//! `scripts/gpu/build-binaries.sh` has one file to carry to a GPU machine.
//! Where no CUDA device can be opened each test prints that it was skipped and
//! passes; `SENTENCE_MTL_REQUIRE_GPU=1` (set by `scripts/gpu/run.sh`) makes that a
//! failure instead.

#[path = "../common/mod.rs"]
mod common;

mod cosine;
mod cross_entropy;
mod mean_pool;
