//! What a model folder says about itself: the BERT `config.json` (parsed into
//! candle-transformers' `Config`), and the sentence-transformers settings
//! (`sentence_bert_config.json`, `1_Pooling/config.json`, `modules.json`).

use std::path::Path;

use anyhow::{bail, Context};
use candle_transformers::models::bert::Config;
use serde::Deserialize;

use super::resolve::ModelFiles;

/// Sequence length used when a folder names none (BERT's usual position limit).
const DEFAULT_MAX_SEQ_LENGTH: usize = 512;

fn read_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// Parses and checks `config.json`: only BERT (`model_type: "bert"`) with
/// absolute position embeddings is supported.
pub fn load_bert_config(files: &ModelFiles) -> anyhow::Result<Config> {
    let path = &files.config;
    let json = read_json(path)?;
    match json.get("model_type").and_then(|v| v.as_str()) {
        Some("bert") => {}
        Some(other) => bail!(
            "{}: unsupported model type {other:?}; sentence-mtl runs BERT models (model_type \"bert\") only",
            path.display()
        ),
        None => bail!(
            "{}: no model_type; sentence-mtl runs BERT models (model_type \"bert\") only",
            path.display()
        ),
    }
    let config: Config = serde_json::from_value(json)
        .with_context(|| format!("{} is not a BERT config this crate can run", path.display()))?;
    check_bert_config(&config).with_context(|| format!("{}", path.display()))?;
    Ok(config)
}

/// Checks the sizes that the encoder relies on.
pub fn check_bert_config(config: &Config) -> anyhow::Result<()> {
    let sizes = [
        ("vocab_size", config.vocab_size),
        ("hidden_size", config.hidden_size),
        ("num_attention_heads", config.num_attention_heads),
        ("intermediate_size", config.intermediate_size),
        ("max_position_embeddings", config.max_position_embeddings),
        ("type_vocab_size", config.type_vocab_size),
    ];
    if let Some((name, _)) = sizes.iter().find(|(_, size)| *size == 0) {
        bail!("{name} is 0");
    }
    if !config
        .hidden_size
        .is_multiple_of(config.num_attention_heads)
    {
        bail!(
            "hidden_size {} is not a multiple of num_attention_heads {}",
            config.hidden_size,
            config.num_attention_heads
        );
    }
    if !(0.0..1.0).contains(&config.hidden_dropout_prob) {
        bail!(
            "hidden_dropout_prob {} is not in [0, 1)",
            config.hidden_dropout_prob
        );
    }
    Ok(())
}

/// How token states become one sentence vector (`1_Pooling/config.json`).
/// Also the CLI's `--pooling` value (`mean`, `cls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pooling {
    /// Mean of the hidden states over the real (unpadded) tokens.
    Mean,
    /// The hidden state of the first token, `[CLS]`.
    Cls,
}

/// The sentence-transformers settings of a model folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentenceConfig {
    /// Longest input in tokens, `[CLS]` and `[SEP]` included; longer ones are truncated.
    pub max_seq_length: usize,
    /// How token states are pooled into the sentence vector.
    pub pooling: Pooling,
    /// Whether the pipeline ends with L2 normalisation (a `Normalize` module).
    pub normalize: bool,
}

#[derive(Deserialize)]
struct PoolingFile {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

#[derive(Deserialize)]
struct ModuleEntry {
    #[serde(rename = "type")]
    kind: String,
}

impl SentenceConfig {
    /// Reads the folder's settings; a plain BERT folder (none of these files)
    /// gives mean pooling, no normalisation and [`max_seq_length`].
    pub fn load(files: &ModelFiles) -> anyhow::Result<Self> {
        let pooling = match files.optional("1_Pooling/config.json") {
            Some(path) => pooling_from(&path)?,
            None => Pooling::Mean,
        };
        let normalize = match files.optional("modules.json") {
            Some(path) => {
                let modules: Vec<ModuleEntry> = serde_json::from_value(read_json(&path)?)
                    .with_context(|| format!("{} is not a module list", path.display()))?;
                modules.iter().any(|m| m.kind.ends_with(".Normalize"))
            }
            None => false,
        };
        Ok(Self {
            max_seq_length: max_seq_length(files),
            pooling,
            normalize,
        })
    }
}

fn pooling_from(path: &Path) -> anyhow::Result<Pooling> {
    let file: PoolingFile = serde_json::from_value(read_json(path)?)
        .with_context(|| format!("{} is not a pooling config", path.display()))?;
    let unsupported = file.pooling_mode_max_tokens
        || file.pooling_mode_mean_sqrt_len_tokens
        || file.pooling_mode_weightedmean_tokens
        || file.pooling_mode_lasttoken;
    match (file.pooling_mode_mean_tokens, file.pooling_mode_cls_token) {
        _ if unsupported => bail!(
            "{}: only mean or CLS pooling is supported (max, mean-sqrt-len, weighted-mean and last-token are not)",
            path.display()
        ),
        (true, false) => Ok(Pooling::Mean),
        (false, true) => Ok(Pooling::Cls),
        (true, true) => bail!(
            "{}: mean and CLS pooling together (concatenated) are not supported",
            path.display()
        ),
        (false, false) => bail!("{}: names no pooling mode", path.display()),
    }
}

/// The model's longest input in tokens: `max_seq_length` of
/// `sentence_bert_config.json`, else 512; never beyond the model's
/// `max_position_embeddings`.
pub fn max_seq_length(files: &ModelFiles) -> usize {
    let named = files
        .optional("sentence_bert_config.json")
        .and_then(|path| read_json(&path).ok())
        .and_then(|json| json.get("max_seq_length")?.as_u64())
        .map_or(DEFAULT_MAX_SEQ_LENGTH, |n| n as usize);
    let positions = read_json(&files.config)
        .ok()
        .and_then(|json| json.get("max_position_embeddings")?.as_u64())
        .map_or(DEFAULT_MAX_SEQ_LENGTH, |n| n as usize);
    named.min(positions).max(2)
}
