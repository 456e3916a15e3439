//! The ops (`sentence_mtl::ops`) against the f64 reference: every op forward
//! and backward, all float dtypes, strided and offset inputs, odd sizes, bad
//! input. One test binary for the layer, a module per op.

#[path = "../common/mod.rs"]
mod common;

mod attention;
mod bias_gelu;
mod cosine;
mod cross_entropy;
mod encoder_ops;
mod layer_norm;
mod mean_pool;
mod multi_head_cross_entropy;
mod top_k;
