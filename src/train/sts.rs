//! Semantic textual similarity evaluation, as sentence-transformers'
//! `EmbeddingSimilarityEvaluator`: embed both sentences of every pair, score
//! each pair by the cosine of its embeddings, and correlate the scores with the
//! human ratings (Spearman and Pearson, x100).

use candle_core::DType;
use serde::{Deserialize, Serialize};

use super::metrics::{pearson, spearman};
use crate::data::StsPair;
use crate::model::SentenceEncoder;

/// How well an encoder's cosine similarities follow the human ratings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StsReport {
    /// The number of pairs scored.
    pub pairs: usize,
    /// Spearman rank correlation of cosine and rating, x100 (the usual STS figure).
    pub spearman: f64,
    /// Pearson correlation of cosine and rating, x100.
    pub pearson: f64,
}

/// The cosine similarity of each pair's two embeddings, in pair order (f32
/// arithmetic, as the encoder's output).
pub fn pair_cosines(encoder: &SentenceEncoder, pairs: &[StsPair]) -> anyhow::Result<Vec<f32>> {
    anyhow::ensure!(!pairs.is_empty(), "no sentence pairs to score");
    // One encode call for both sides: the length-sorted batches pad less.
    let texts: Vec<&str> = pairs
        .iter()
        .map(|p| p.sentence1.as_str())
        .chain(pairs.iter().map(|p| p.sentence2.as_str()))
        .collect();
    let embeddings = encoder.encode(&texts)?.to_dtype(DType::F32)?;
    let first = embeddings.narrow(0, 0, pairs.len())?;
    let second = embeddings.narrow(0, pairs.len(), pairs.len())?;
    Ok(crate::ops::cosine_similarity(&first, &second)?.to_vec1::<f32>()?)
}

/// Scores `encoder` on `pairs` (at least 2, with ratings that are not all equal).
pub fn evaluate_sts(encoder: &SentenceEncoder, pairs: &[StsPair]) -> anyhow::Result<StsReport> {
    anyhow::ensure!(
        pairs.len() >= 2,
        "STS evaluation needs at least 2 sentence pairs, got {}",
        pairs.len()
    );
    let cosines: Vec<f64> = pair_cosines(encoder, pairs)?
        .into_iter()
        .map(f64::from)
        .collect();
    let ratings: Vec<f64> = pairs.iter().map(|p| p.score).collect();
    sts_report(&cosines, &ratings)
}

/// The report of pairs with cosines `cosines` and human ratings `ratings`.
pub fn sts_report(cosines: &[f64], ratings: &[f64]) -> anyhow::Result<StsReport> {
    Ok(StsReport {
        pairs: cosines.len(),
        spearman: 100.0 * spearman(cosines, ratings)?,
        pearson: 100.0 * pearson(cosines, ratings)?,
    })
}
