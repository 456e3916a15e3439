//! The fused ops' computations composed from candle tensor ops, as a user would
//! write them without this crate: what the benchmarks measure the fused ops
//! against. Shared by `benches/ops` (criterion) and `benches/side_by_side.rs`.

#![allow(dead_code)] // each benchmark binary uses its own subset

use candle_core::{Result, Tensor};

/// The norm clamp of `F.normalize` and `util.cos_sim`.
const EPS: f64 = 1e-12;

/// `Σ_t mask·hidden / max(Σ_t mask, 1e-9)` (sentence-transformers' formula).
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(hidden.dtype())?;
    let sum = hidden.broadcast_mul(&mask.unsqueeze(2)?)?.sum(1)?;
    let count = mask.sum_keepdim(1)?.clamp(1e-9, f64::MAX)?;
    sum.broadcast_div(&count)
}

fn clamped_norm(x: &Tensor) -> Result<Tensor> {
    x.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(EPS)
}

/// `x / max(‖x‖, EPS)` per row.
pub fn normalize(x: &Tensor) -> Result<Tensor> {
    x.broadcast_div(&clamped_norm(x)?)
}

/// `⟨a,b⟩ / (max(‖a‖,EPS)·max(‖b‖,EPS))` per row.
pub fn row_cosine(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dot = (a * b)?.sum_keepdim(1)?;
    (dot / (clamped_norm(a)? * clamped_norm(b)?)?)?.squeeze(1)
}

/// `normalize(a) · normalize(b)ᵀ`.
pub fn matrix(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    normalize(a)?.matmul(&normalize(b)?.t()?)
}

/// `a · bᵀ` of inputs that are already normalised: the floor the matrix form
/// should stay within 1.2x of.
pub fn bare_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.matmul(&b.t()?)
}
