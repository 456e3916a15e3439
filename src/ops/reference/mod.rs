//! Plain f64 reference implementations of every op, forward and backward, written
//! as loops over row-major slices. Tests compare the fused ops against these; users
//! can call them too.

pub mod adamw;
pub mod bias_gelu;
pub mod cosine;
pub mod cross_entropy;
pub mod mean_pool;
pub mod multi_head_cross_entropy;
