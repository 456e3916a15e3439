//! Loading BERT weights from a Hugging Face safetensors checkpoint.
//!
//! Checkpoints name their tensors `bert.embeddings...` (pre-training and
//! classification heads saved with the backbone) or `embeddings...` (a bare
//! `BertModel`, as sentence-transformers saves it), and older ones call the
//! LayerNorm parameters `gamma`/`beta`. `CheckpointBackend` hides both, so the
//! encoder always asks for the same names: Hugging Face's, without `bert.`,
//! LayerNorm parameters as `weight`/`bias`.

use super::config::BertConfig;
use anyhow::{bail, Context};
use candle_core::safetensors::BufferedSafetensors;
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};

use super::bert::BertEncoder;
use super::config::load_bert_config;
use super::resolve::ModelFiles;

/// A tensor every BERT checkpoint has, used to detect the `bert.` prefix.
const PROBE: &str = "embeddings.word_embeddings.weight";

/// Serves a checkpoint's tensors under their canonical names. With `vars` set,
/// each tensor is turned into a [`Var`] and recorded there under that name.
struct CheckpointBackend {
    tensors: BufferedSafetensors,
    prefix: &'static str,
    vars: Option<VarMap>,
}

impl CheckpointBackend {
    fn open(files: &ModelFiles, vars: Option<VarMap>) -> anyhow::Result<Self> {
        let path = &files.weights;
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let tensors = BufferedSafetensors::new(bytes)
            .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
        let prefix = if tensors.get(PROBE).is_ok() {
            ""
        } else if tensors.get(&format!("bert.{PROBE}")).is_ok() {
            "bert."
        } else {
            bail!(
                "{} holds no BERT weights (neither {PROBE} nor bert.{PROBE})",
                path.display()
            );
        };
        Ok(Self {
            tensors,
            prefix,
            vars,
        })
    }

    /// The name under which the checkpoint stores the canonical `name`.
    fn stored_name(&self, name: &str) -> Option<String> {
        let stored = format!("{}{name}", self.prefix);
        if self.tensors.get(&stored).is_ok() {
            return Some(stored);
        }
        let legacy = if let Some(stem) = stored.strip_suffix("LayerNorm.weight") {
            format!("{stem}LayerNorm.gamma")
        } else if let Some(stem) = stored.strip_suffix("LayerNorm.bias") {
            format!("{stem}LayerNorm.beta")
        } else {
            return None;
        };
        self.tensors.get(&legacy).is_ok().then_some(legacy)
    }

    fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let stored = self.stored_name(name).ok_or_else(|| {
            candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }
            .bt()
        })?;
        self.tensors.load(&stored, device)?.to_dtype(dtype)
    }
}

impl SimpleBackend for CheckpointBackend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _init: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.load(name, dtype, device)?;
        if tensor.shape() != &shape {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("checkpoint tensor {name} has the wrong shape"),
                expected: shape,
                got: tensor.shape().clone(),
            }
            .bt());
        }
        match &self.vars {
            None => Ok(tensor),
            Some(vars) => {
                let var = Var::from_tensor(&tensor)?;
                let mut data = vars
                    .data()
                    .lock()
                    .map_err(|_| candle_core::Error::Msg("the VarMap's lock is poisoned".into()))?;
                data.insert(name.to_string(), var.clone());
                Ok(var.as_tensor().clone())
            }
        }
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load(name, dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.stored_name(name).is_some()
    }
}

fn check_dtype(dtype: DType) -> anyhow::Result<()> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 | DType::F64 => Ok(()),
        other => bail!("the encoder runs in f32, f16, bf16 or f64, not {other:?}"),
    }
}

fn load_with(
    files: &ModelFiles,
    dtype: DType,
    device: &Device,
    vars: Option<VarMap>,
) -> anyhow::Result<(BertEncoder, BertConfig)> {
    check_dtype(dtype)?;
    let config = load_bert_config(files)?;
    let backend = CheckpointBackend::open(files, vars)?;
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    let encoder = BertEncoder::load(vb, &config).with_context(|| {
        format!(
            "{} does not match {}",
            files.weights.display(),
            files.config.display()
        )
    })?;
    Ok((encoder, config))
}

/// Loads the encoder for inference: weights are plain tensors (no gradient).
pub fn load_frozen(
    files: &ModelFiles,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<(BertEncoder, BertConfig)> {
    load_with(files, dtype, device, None)
}

/// Loads the encoder for fine-tuning: every backbone weight is a [`Var`] in the
/// returned [`VarMap`], named as Hugging Face names it without `bert.`
/// (`embeddings.word_embeddings.weight`, `encoder.layer.0.attention.self.query.weight`,
/// LayerNorm parameters as `weight`/`bias`), whatever the checkpoint's own names.
pub fn load_trainable(
    files: &ModelFiles,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<(BertEncoder, VarMap, BertConfig)> {
    let vars = VarMap::new();
    let (encoder, config) = load_with(files, dtype, device, Some(vars.clone()))?;
    Ok((encoder, vars, config))
}
