//! The STS benchmark end to end: all-MiniLM-L6-v2 through the encoder and
//! `train::sts` gives the published STS-B test figures (MTEB: cosine Spearman
//! 82.03, Pearson 82.74; sentence-transformers reproduces both to four digits).

use crate::bert_support::{model_files, shared_dir};
use candle_core::{DType, Device};
use sentence_mtl::data::{load_stsb, Split};
use sentence_mtl::model::SentenceEncoder;
use sentence_mtl::train::evaluate_sts;

#[test]
fn all_minilm_gives_the_published_sts_b_test_spearman_and_pearson() {
    let pairs = load_stsb(&shared_dir().join("data/stsb"), Split::Test).unwrap();
    assert_eq!(pairs.len(), 1379);
    let encoder = SentenceEncoder::from_files(&model_files(), DType::F32, &Device::Cpu).unwrap();
    let report = evaluate_sts(&encoder, &pairs).unwrap();
    assert_eq!(report.pairs, 1379);
    // The published figures are rounded to 2 decimals.
    assert!(
        (report.spearman - 82.03).abs() <= 0.005,
        "Spearman {}",
        report.spearman
    );
    assert!(
        (report.pearson - 82.74).abs() <= 0.005,
        "Pearson {}",
        report.pearson
    );
}

#[test]
fn sts_evaluation_refuses_too_few_pairs() {
    let encoder = SentenceEncoder::from_files(&model_files(), DType::F32, &Device::Cpu).unwrap();
    let pairs = load_stsb(&shared_dir().join("data/stsb"), Split::Val).unwrap();
    let err = evaluate_sts(&encoder, &pairs[..1]).unwrap_err().to_string();
    assert!(err.contains("at least 2"), "{err}");
    assert!(evaluate_sts(&encoder, &[]).is_err());
}
