//! all-MiniLM-L6-v2's shape with random weights, for the benches of whole
//! model steps (`train_step`, `encode`): a step's time does not depend on the
//! weights' values, and a GPU machine has no network to fetch the real ones.
//! The tokenizer is the real one where it can be found (`tokenizer.json` in
//! `$SENTENCE_MTL_BENCH_DATA`, which `scripts/gpu/build-binaries.sh` packs, or
//! in the model cache), so texts get their real token counts; else a
//! word-level stand-in.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Result, Tensor};
use sentence_mtl::model::{resolve_cached, ModelFiles, DEFAULT_MODEL};

pub const VOCAB: usize = 30522;

/// A file of `$SENTENCE_MTL_BENCH_DATA` (the data `scripts/gpu/run.sh` unpacks
/// beside the binaries), if it is there.
pub fn bench_data(name: &str) -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os("SENTENCE_MTL_BENCH_DATA")?).join(name);
    path.is_file().then_some(path)
}

/// The real tokenizer: from the bench data, else from the model cache.
fn real_tokenizer() -> Option<PathBuf> {
    bench_data("tokenizer.json").or_else(|| {
        resolve_cached(DEFAULT_MODEL)
            .ok()
            .map(|files| files.tokenizer)
    })
}

const STAND_IN_TOKENIZER: &str = r#"{"version": "1.0", "truncation": null, "padding": null,
  "added_tokens": [], "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
  "post_processor": null, "decoder": null, "model": {"type": "WordLevel",
  "vocab": {"[PAD]": 0, "[UNK]": 1}, "unk_token": "[UNK]"}}"#;

/// Writes the folder (config, random weights, tokenizer) under the temp dir,
/// named `name`, and returns its files.
pub fn minilm_folder(name: &str) -> Result<ModelFiles> {
    let dir = std::env::temp_dir().join(name);
    write(&dir)?;
    ModelFiles::from_dir(&dir).map_err(candle_core::Error::msg)
}

fn write(dir: &Path) -> Result<()> {
    let (h, ffn, layers, positions) = (384, 1536, 6, 512);
    std::fs::create_dir_all(dir)?;
    let config = format!(
        r#"{{"architectures": ["BertModel"], "model_type": "bert", "vocab_size": {VOCAB},
  "hidden_size": {h}, "num_hidden_layers": {layers}, "num_attention_heads": 12,
  "intermediate_size": {ffn}, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
  "attention_probs_dropout_prob": 0.1, "max_position_embeddings": {positions},
  "type_vocab_size": 2, "initializer_range": 0.02, "layer_norm_eps": 1e-12,
  "pad_token_id": 0, "position_embedding_type": "absolute"}}"#
    );
    std::fs::write(dir.join("config.json"), config)?;
    match real_tokenizer() {
        Some(path) => {
            std::fs::copy(path, dir.join("tokenizer.json"))?;
        }
        None => std::fs::write(dir.join("tokenizer.json"), STAND_IN_TOKENIZER)?,
    }
    let cpu = Device::Cpu;
    let mut weights: HashMap<String, Tensor> = HashMap::new();
    let mut add = |name: String, dims: &[usize], fill: Option<f32>| -> Result<()> {
        let t = match fill {
            Some(v) => Tensor::full(v, dims, &cpu)?,
            None => Tensor::randn(0f32, 0.02, dims, &cpu)?,
        };
        weights.insert(name, t);
        Ok(())
    };
    add(
        "embeddings.word_embeddings.weight".into(),
        &[VOCAB, h],
        None,
    )?;
    add(
        "embeddings.position_embeddings.weight".into(),
        &[positions, h],
        None,
    )?;
    add(
        "embeddings.token_type_embeddings.weight".into(),
        &[2, h],
        None,
    )?;
    add("embeddings.LayerNorm.weight".into(), &[h], Some(1.0))?;
    add("embeddings.LayerNorm.bias".into(), &[h], Some(0.0))?;
    for i in 0..layers {
        let p = format!("encoder.layer.{i}");
        for (m, rows, cols) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", ffn, h),
            ("output.dense", h, ffn),
        ] {
            add(format!("{p}.{m}.weight"), &[rows, cols], None)?;
            add(format!("{p}.{m}.bias"), &[rows], None)?;
        }
        for ln in ["attention.output.LayerNorm", "output.LayerNorm"] {
            add(format!("{p}.{ln}.weight"), &[h], Some(1.0))?;
            add(format!("{p}.{ln}.bias"), &[h], Some(0.0))?;
        }
    }
    candle_core::safetensors::save(&weights, dir.join("model.safetensors"))
}
