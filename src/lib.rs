//! sentence-mtl: fused CPU/CUDA candle ops for sentence embeddings and multi-task
//! learning on a BERT backbone.
//!
//! Layers, each using only those below it:
//! - [`ops`]: the fused ops (masked mean pooling, cosine similarity, dual-head
//!   cross-entropy) as candle `CustomOp`s with CPU and CUDA paths, and an f64
//!   [`ops::reference`] for each.
//! - [`model`]: a BERT encoder that fine-tunes, pooling, the sentence encoder and
//!   the multi-task model.
//! - [`data`] and [`train`]: TweetEval loading, batching, and the trainer.
//! - [`cli`]: the `sentence-mtl` command line; [`runtime`]: its process-wide
//!   allocator setting.
//!
//! [`plots`] (PNG charts from plain series and matrices) stands apart: it uses
//! no other module, and `train` and `cli` draw with it.

#![warn(missing_docs)]

pub mod cli;
pub mod data;
pub mod model;
pub mod ops;
pub mod plots;
pub mod runtime;
pub mod train;

// The README's example runs as a doctest, so it cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExample;
