//! What a model folder says about itself: the BERT `config.json` (our own
//! [`BertConfig`]: the fields the encoder reads, so the crate does not compile
//! candle-transformers for one struct), and the sentence-transformers settings
//! (`sentence_bert_config.json`, `1_Pooling/config.json`, `modules.json`).

use std::path::Path;

use anyhow::{bail, Context};
use serde::Deserialize;

use super::resolve::ModelFiles;

/// Sequence length used when a folder names none (BERT's usual position limit).
const DEFAULT_MAX_SEQ_LENGTH: usize = 512;

fn read_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// The activation of the feed-forward block (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum HiddenAct {
    /// GELU with the exact erf (`"gelu"`, BERT's own).
    #[default]
    #[serde(rename = "gelu")]
    Gelu,
    /// GELU's tanh approximation (`"gelu_new"`, `"gelu_pytorch_tanh"`).
    #[serde(
        alias = "gelu_new",
        alias = "gelu_pytorch_tanh",
        alias = "gelu_approximate"
    )]
    GeluApproximate,
    /// `max(x, 0)` (`"relu"`).
    #[serde(rename = "relu")]
    Relu,
}

/// A BERT `config.json`: the fields the encoder reads, under Hugging Face's
/// names, with `transformers`' defaults where a file may leave one out.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BertConfig {
    /// Rows of the word-embedding table.
    pub vocab_size: usize,
    /// Width of every token state.
    pub hidden_size: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer (`hidden_size` is a multiple of it).
    pub num_attention_heads: usize,
    /// Width of the feed-forward block's inner layer.
    pub intermediate_size: usize,
    /// The feed-forward activation.
    #[serde(default)]
    pub hidden_act: HiddenAct,
    /// Dropout after embeddings, attention output and feed-forward (training).
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    /// Rows of the position-embedding table: the longest input.
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    /// Rows of the token-type (segment) embedding table.
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// The LayerNorms' epsilon.
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// The padding token's id.
    #[serde(default)]
    pub pad_token_id: usize,
    /// Only `"absolute"` (the default) is supported.
    #[serde(default)]
    pub position_embedding_type: Option<String>,
}

fn default_dropout() -> f64 {
    0.1
}
fn default_positions() -> usize {
    512
}
fn default_type_vocab() -> usize {
    2
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}

/// Parses and checks `config.json`: only BERT (`model_type: "bert"`) with
/// absolute position embeddings is supported.
pub fn load_bert_config(files: &ModelFiles) -> anyhow::Result<BertConfig> {
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
    let config: BertConfig = serde_json::from_value(json)
        .with_context(|| format!("{} is not a BERT config this crate can run", path.display()))?;
    check_bert_config(&config).with_context(|| format!("{}", path.display()))?;
    Ok(config)
}

/// Checks the sizes that the encoder relies on.
pub fn check_bert_config(config: &BertConfig) -> anyhow::Result<()> {
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
    if let Some(kind) = config
        .position_embedding_type
        .as_deref()
        .filter(|&k| k != "absolute")
    {
        bail!("position_embedding_type {kind:?} is not supported; only \"absolute\" is");
    }
    if !(0.0..1.0).contains(&config.hidden_dropout_prob) {
        bail!(
            "hidden_dropout_prob {} is not in [0, 1)",
            config.hidden_dropout_prob
        );
    }
    Ok(())
}

/// How token states become one sentence vector: the modes of
/// sentence-transformers' `Pooling` (`1_Pooling/config.json`; see
/// [`super::pooling`] for each one's padding rule). Also the CLI's `--pooling`
/// value, which takes the `pooling_mode_*` names too.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Pooling {
    /// The hidden state of the first token, `[CLS]`.
    #[value(alias = "cls_token")]
    Cls,
    /// Element-wise maximum over the real tokens.
    #[value(alias = "max_tokens")]
    Max,
    /// Mean of the hidden states over the real (unpadded) tokens.
    #[value(alias = "mean_tokens")]
    Mean,
    /// Sum over the real tokens divided by the square root of their count.
    #[value(name = "mean-sqrt-len", alias = "mean_sqrt_len_tokens")]
    MeanSqrtLen,
    /// Mean weighted by position (token `t` weighs `t + 1`).
    #[value(
        name = "weighted-mean",
        alias = "weightedmean_tokens",
        alias = "weightedmean"
    )]
    WeightedMean,
    /// The hidden state of the last real token.
    #[value(name = "last-token", alias = "lasttoken")]
    LastToken,
}

impl Pooling {
    /// Every mode, in the order sentence-transformers concatenates them.
    pub const ALL: [Pooling; 6] = [
        Pooling::Cls,
        Pooling::Max,
        Pooling::Mean,
        Pooling::MeanSqrtLen,
        Pooling::WeightedMean,
        Pooling::LastToken,
    ];

    /// `modes` once each, in [`Pooling::ALL`]'s order (the order of their
    /// concatenated outputs).
    pub fn in_order(modes: &[Pooling]) -> Vec<Pooling> {
        Pooling::ALL
            .into_iter()
            .filter(|m| modes.contains(m))
            .collect()
    }

    /// The mode's key in `1_Pooling/config.json`.
    pub fn config_key(self) -> &'static str {
        match self {
            Pooling::Cls => "pooling_mode_cls_token",
            Pooling::Max => "pooling_mode_max_tokens",
            Pooling::Mean => "pooling_mode_mean_tokens",
            Pooling::MeanSqrtLen => "pooling_mode_mean_sqrt_len_tokens",
            Pooling::WeightedMean => "pooling_mode_weightedmean_tokens",
            Pooling::LastToken => "pooling_mode_lasttoken",
        }
    }
}

/// The activation of a `Dense` module (`activation_function`, a torch class).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenseActivation {
    /// `torch.nn.modules.linear.Identity`.
    Identity,
    /// `torch.nn.modules.activation.Tanh` (sentence-transformers' default).
    Tanh,
    /// `torch.nn.modules.activation.ReLU`.
    Relu,
    /// `torch.nn.modules.activation.GELU` (exact erf).
    Gelu,
    /// `torch.nn.modules.activation.Sigmoid`.
    Sigmoid,
}

/// A `Dense` module of the pipeline (`2_Dense/config.json`): a linear layer
/// and an activation, applied to the pooled vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenseConfig {
    /// Its folder within the model folder (`modules.json`'s `path`).
    pub path: String,
    /// Input width.
    pub in_features: usize,
    /// Output width.
    pub out_features: usize,
    /// Whether the layer adds a bias.
    pub bias: bool,
    /// The activation after the linear layer.
    pub activation: DenseActivation,
}

/// The sentence-transformers settings of a model folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentenceConfig {
    /// Longest input in tokens, `[CLS]` and `[SEP]` included; longer ones are truncated.
    pub max_seq_length: usize,
    /// How token states are pooled into the sentence vector: one mode, or
    /// several concatenated (in [`Pooling::ALL`]'s order).
    pub pooling: Vec<Pooling>,
    /// Whether a prompt's tokens count in the pooling (`include_prompt`).
    pub include_prompt: bool,
    /// `Dense` modules after the pooling, in order.
    pub dense: Vec<DenseConfig>,
    /// Whether the pipeline ends with L2 normalisation (a `Normalize` module).
    pub normalize: bool,
    /// Named prompts (`config_sentence_transformers.json`), e.g. `query`.
    pub prompts: std::collections::BTreeMap<String, String>,
    /// The prompt used when none is asked for, if any.
    pub default_prompt_name: Option<String>,
}

#[derive(Deserialize)]
struct ModuleEntry {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    path: String,
}

#[derive(Deserialize, Default)]
struct PromptsFile {
    #[serde(default)]
    prompts: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    default_prompt_name: Option<String>,
}

#[derive(Deserialize)]
struct DenseFile {
    in_features: usize,
    out_features: usize,
    #[serde(default = "yes")]
    bias: bool,
    #[serde(default)]
    activation_function: Option<String>,
}

fn yes() -> bool {
    true
}

impl SentenceConfig {
    /// Reads the folder's settings. With a `modules.json`, its modules in order
    /// (Transformer, Pooling, any Dense, Normalize; another kind is an error);
    /// without one, `1_Pooling/config.json` if present, else mean pooling, and
    /// no normalisation. Prompts come from `config_sentence_transformers.json`.
    pub fn load(files: &ModelFiles) -> anyhow::Result<Self> {
        let mut config = Self {
            max_seq_length: max_seq_length(files),
            pooling: vec![Pooling::Mean],
            include_prompt: true,
            dense: Vec::new(),
            normalize: false,
            prompts: Default::default(),
            default_prompt_name: None,
        };
        match files.optional("modules.json") {
            Some(path) => config.read_modules(files, &path)?,
            None => {
                if let Some(path) = files.optional("1_Pooling/config.json") {
                    (config.pooling, config.include_prompt) = pooling_from(&path)?;
                }
            }
        }
        if let Some(path) = files.optional("config_sentence_transformers.json") {
            let file: PromptsFile = serde_json::from_value(read_json(&path)?)
                .with_context(|| format!("{} has no valid prompts", path.display()))?;
            if let Some(name) = &file.default_prompt_name {
                if !file.prompts.contains_key(name) {
                    bail!(
                        "{}: default_prompt_name {name:?} is not one of its prompts",
                        path.display()
                    );
                }
            }
            config.prompts = file.prompts;
            config.default_prompt_name = file.default_prompt_name;
        }
        Ok(config)
    }

    fn read_modules(&mut self, files: &ModelFiles, path: &Path) -> anyhow::Result<()> {
        let modules: Vec<ModuleEntry> = serde_json::from_value(read_json(path)?)
            .with_context(|| format!("{} is not a module list", path.display()))?;
        let mut pooling = false;
        for module in &modules {
            let kind = module.kind.rsplit('.').next().unwrap_or_default();
            let file = |name: &str| {
                let rel = Path::new(&module.path).join(name);
                files
                    .optional(&rel.to_string_lossy())
                    .with_context(|| format!("{}: no {}", path.display(), rel.display()))
            };
            match kind {
                "Transformer" => {}
                "Pooling" => {
                    (self.pooling, self.include_prompt) = pooling_from(&file("config.json")?)?;
                    pooling = true;
                }
                "Dense" => self.dense.push(dense_from(&file("config.json")?, &module.path)?),
                "Normalize" => self.normalize = true,
                _ => bail!(
                    "{}: unsupported module {:?}; sentence-mtl runs Transformer, Pooling, Dense and Normalize",
                    path.display(),
                    module.kind
                ),
            }
        }
        if !pooling {
            bail!("{}: no Pooling module", path.display());
        }
        Ok(())
    }
}

/// The pooling modes a `1_Pooling/config.json` sets, and its `include_prompt`.
fn pooling_from(path: &Path) -> anyhow::Result<(Vec<Pooling>, bool)> {
    let json = read_json(path)?;
    let Some(fields) = json.as_object() else {
        bail!("{} is not a pooling config", path.display());
    };
    // `pooling_mode` names one mode (sentence-transformers' constructor form).
    let mut modes: Vec<Pooling> = Vec::new();
    for (key, value) in fields {
        if let Some(name) = key.strip_prefix("pooling_mode_") {
            let mode = Pooling::ALL
                .into_iter()
                .find(|m| m.config_key() == key)
                .with_context(|| format!("{}: unknown pooling mode {name:?}", path.display()))?;
            match value.as_bool() {
                Some(true) => modes.push(mode),
                Some(false) => {}
                None => bail!("{}: {key} must be true or false", path.display()),
            }
        }
    }
    if let Some(name) = fields.get("pooling_mode").and_then(|v| v.as_str()) {
        let mode = <Pooling as clap::ValueEnum>::from_str(name, true)
            .map_err(|_| anyhow::anyhow!("{}: unknown pooling mode {name:?}", path.display()))?;
        modes.push(mode);
    }
    if modes.is_empty() {
        bail!("{}: names no pooling mode", path.display());
    }
    let include_prompt = fields
        .get("include_prompt")
        .and_then(|v| v.as_bool())
        .unwrap_or(true);
    Ok((Pooling::in_order(&modes), include_prompt))
}

fn dense_from(path: &Path, folder: &str) -> anyhow::Result<DenseConfig> {
    let file: DenseFile = serde_json::from_value(read_json(path)?)
        .with_context(|| format!("{} is not a Dense config", path.display()))?;
    let name = file
        .activation_function
        .as_deref()
        .unwrap_or("torch.nn.modules.activation.Tanh");
    let activation = match name.rsplit('.').next().unwrap_or_default() {
        "Identity" => DenseActivation::Identity,
        "Tanh" => DenseActivation::Tanh,
        "ReLU" => DenseActivation::Relu,
        "GELU" => DenseActivation::Gelu,
        "Sigmoid" => DenseActivation::Sigmoid,
        _ => bail!(
            "{}: unsupported activation_function {name:?} (Identity, Tanh, ReLU, GELU and Sigmoid are)",
            path.display()
        ),
    };
    if file.in_features == 0 || file.out_features == 0 {
        bail!(
            "{}: in_features and out_features must be positive",
            path.display()
        );
    }
    Ok(DenseConfig {
        path: folder.to_string(),
        in_features: file.in_features,
        out_features: file.out_features,
        bias: file.bias,
        activation,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> anyhow::Result<BertConfig> {
        let config: BertConfig = serde_json::from_str(json)?;
        check_bert_config(&config)?;
        Ok(config)
    }

    const SIZES: &str = r#""vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 37"#;

    #[test]
    fn missing_optional_fields_take_transformers_defaults() {
        let c = parse(&format!("{{{SIZES}}}")).unwrap();
        assert_eq!(c.hidden_act, HiddenAct::Gelu);
        assert_eq!(c.hidden_dropout_prob, 0.1);
        assert_eq!(c.max_position_embeddings, 512);
        assert_eq!(c.type_vocab_size, 2);
        assert_eq!(c.layer_norm_eps, 1e-12);
        assert_eq!(c.pad_token_id, 0);
    }

    #[test]
    fn activations_by_their_transformers_names() {
        for (name, act) in [
            ("gelu", HiddenAct::Gelu),
            ("gelu_new", HiddenAct::GeluApproximate),
            ("gelu_pytorch_tanh", HiddenAct::GeluApproximate),
            ("relu", HiddenAct::Relu),
        ] {
            let c = parse(&format!(r#"{{{SIZES}, "hidden_act": "{name}"}}"#)).unwrap();
            assert_eq!(c.hidden_act, act, "{name}");
        }
        assert!(parse(&format!(r#"{{{SIZES}, "hidden_act": "swish"}}"#)).is_err());
    }

    #[test]
    fn relative_positions_and_missing_sizes_are_refused() {
        let e = parse(&format!(
            r#"{{{SIZES}, "position_embedding_type": "relative_key"}}"#
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("relative_key"), "{e}");
        assert!(parse(&format!(
            r#"{{{SIZES}, "position_embedding_type": "absolute"}}"#
        ))
        .is_ok());
        let e = parse(r#"{"vocab_size": 99}"#).unwrap_err().to_string();
        assert!(e.contains("hidden_size"), "{e}");
        let five_heads = SIZES.replace("\"num_attention_heads\": 4", "\"num_attention_heads\": 5");
        let e = parse(&format!("{{{five_heads}}}")).map(|_| ()).unwrap_err();
        assert!(e.to_string().contains("multiple"), "{e}");
    }
}
