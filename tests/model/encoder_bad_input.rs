//! Bad input gives a clear error or a defined result, never a panic.

use crate::bert_support;

use std::path::PathBuf;

use bert_support::model_files;
use candle_core::{DType, Device, Tensor};
use sentence_mtl::model::{load_trainable, resolve_model, ModelFiles, SentenceEncoder};

/// A fresh empty folder for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sentence-mtl-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A copy of the model folder's small files, with `weights` as model.safetensors.
fn model_copy(name: &str, weights: &[u8]) -> PathBuf {
    let source = model_files();
    let dir = scratch(name);
    for file in [
        "config.json",
        "tokenizer.json",
        "sentence_bert_config.json",
        "modules.json",
        "1_Pooling/config.json",
    ] {
        std::fs::create_dir_all(dir.join(file).parent().unwrap()).unwrap();
        std::fs::copy(source.dir.join(file), dir.join(file)).unwrap();
    }
    std::fs::write(dir.join("model.safetensors"), weights).unwrap();
    dir
}

fn load(dir: &PathBuf) -> anyhow::Result<SentenceEncoder> {
    SentenceEncoder::from_files(&ModelFiles::from_dir(dir)?, DType::F32, &Device::Cpu)
}

fn message(result: anyhow::Result<impl std::fmt::Debug>) -> String {
    format!("{:#}", result.expect_err("an error"))
}

#[test]
fn missing_model_folder_or_files() {
    let e = message(resolve_model("/nonexistent/sentence-mtl-model"));
    assert!(e.contains("neither an existing folder"), "{e}");
    let e = message(ModelFiles::from_dir("/nonexistent/sentence-mtl-model"));
    assert!(e.contains("does not exist"), "{e}");

    let dir = scratch("partial");
    std::fs::write(dir.join("config.json"), "{}").unwrap();
    let e = message(ModelFiles::from_dir(&dir));
    assert!(
        e.contains("model.safetensors") && e.contains("tokenizer.json"),
        "{e}"
    );
}

#[test]
fn corrupt_model_files() {
    let dir = model_copy("corrupt-weights", b"not a safetensors file");
    let e = message(load(&dir));
    assert!(e.contains("safetensors"), "{e}");

    let dir = model_copy("corrupt-config", b"");
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    let e = message(load(&dir));
    assert!(e.contains("not valid JSON"), "{e}");

    let dir = model_copy("corrupt-tokenizer", b"");
    std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
    let e = message(load(&dir));
    assert!(e.contains("config.json") || e.contains("tokenizer"), "{e}");

    // Valid safetensors without BERT's tensors.
    let empty = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    let dir = model_copy("foreign-weights", b"");
    candle_core::safetensors::save(
        &[("something.else".to_string(), empty)]
            .into_iter()
            .collect(),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let e = message(load(&dir));
    assert!(e.contains("no BERT weights"), "{e}");
}

#[test]
fn unsupported_model_type() {
    let dir = model_copy("roberta", b"");
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let config = config.replace("\"model_type\": \"bert\"", "\"model_type\": \"roberta\"");
    std::fs::write(dir.join("config.json"), config).unwrap();
    let e = message(load(&dir));
    assert!(e.contains("unsupported model type \"roberta\""), "{e}");
}

#[test]
fn empty_and_odd_texts() {
    let encoder = SentenceEncoder::from_files(&model_files(), DType::F32, &Device::Cpu).unwrap();
    let e = message(encoder.encode(&[]));
    assert!(e.contains("no sentences"), "{e}");

    // An empty string is "[CLS] [SEP]": a normal, unit-length embedding.
    let embedding = encoder.encode(&["", "   "]).unwrap();
    assert_eq!(embedding.dims(), [2, 384]);
    let norms = embedding
        .sqr()
        .unwrap()
        .sum(1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-5), "{norms:?}");

    // Over-long input is truncated to max_seq_length tokens, ending in [SEP].
    let long = "word ".repeat(2000);
    let tokens = encoder.tokenize(&[&long]).unwrap();
    assert_eq!(tokens[0].len(), 256);
    assert_eq!(tokens[0].input_ids.last(), Some(&102));
    let truncated = "word ".repeat(254);
    let both = encoder.encode(&[&long, &truncated]).unwrap();
    let diff = (both.get(0).unwrap() - both.get(1).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        diff < 1e-6,
        "over-long input is not its truncation: {diff:e}"
    );
}

#[test]
fn bad_tensors_to_the_backbone() {
    let (bert, _vars, _config) = load_trainable(&model_files(), DType::F32, &Device::Cpu).unwrap();
    let ids = |len: usize| Tensor::ones((1, len), DType::U32, &Device::Cpu).unwrap();
    let e = bert.forward(&ids(513), None, &ids(513), false).unwrap_err();
    assert!(
        e.to_string()
            .contains("longer than the model's 512 positions"),
        "{e}"
    );
    let e = bert.forward(&ids(4), None, &ids(5), false).unwrap_err();
    assert!(e.to_string().contains("attention_mask has shape"), "{e}");
    let floats = Tensor::ones((1, 4), DType::F32, &Device::Cpu).unwrap();
    let e = bert.forward(&floats, None, &ids(4), false).unwrap_err();
    assert!(e.to_string().contains("must be integer"), "{e}");
    let e = bert
        .forward(&ids(4).flatten_all().unwrap(), None, &ids(4), false)
        .unwrap_err();
    assert!(e.to_string().contains("[batch, tokens]"), "{e}");
    let out_of_vocab = Tensor::new(&[[101u32, 40_000, 102]], &Device::Cpu).unwrap();
    assert!(bert.forward(&out_of_vocab, None, &ids(3), false).is_err());

    // A row of padding only: finite output (uniform attention), no NaN.
    let mask = Tensor::zeros((1, 4), DType::U32, &Device::Cpu).unwrap();
    let out = bert.forward(&ids(4), None, &mask, false).unwrap();
    let total = out.sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(total.is_finite());
}
