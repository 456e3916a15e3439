//! [`BertEncoder`]: a BERT transformer encoder that fine-tunes.
//!
//! Same architecture and parameter names as Hugging Face's `BertModel` (without
//! the pooler), but every op records its backward (LayerNorm and attention
//! softmax included, see [`super::layers`]), dropout is real in training, and
//! the attention mask stays finite in f16 and bf16.

use super::config::{BertConfig, HiddenAct};
use candle_core::{bail, DType, Result, Tensor};
use candle_nn::{embedding, Embedding, Module, VarBuilder};

use crate::ops::attention::{attention_packed, attention_packed_seeded, packed_kernel_supports};

use super::layers::{softmax_last_dim, Dense, Dropout, LayerNorm, Pass};

pub use super::checkpoint::load_trainable;

/// Token, position and segment embeddings, summed and normalised.
#[derive(Debug, Clone)]
struct Embeddings {
    words: Embedding,
    positions: Embedding,
    token_types: Embedding,
    norm: LayerNorm,
}

impl Embeddings {
    fn load(vb: VarBuilder, config: &BertConfig) -> Result<Self> {
        let hidden = config.hidden_size;
        Ok(Self {
            words: embedding(config.vocab_size, hidden, vb.pp("word_embeddings"))?,
            positions: embedding(
                config.max_position_embeddings,
                hidden,
                vb.pp("position_embeddings"),
            )?,
            token_types: embedding(
                config.type_vocab_size,
                hidden,
                vb.pp("token_type_embeddings"),
            )?,
            norm: LayerNorm::load(hidden, config.layer_norm_eps, vb.pp("LayerNorm"))?,
        })
    }

    fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        drop: &Dropout,
        pass: Pass,
    ) -> Result<Tensor> {
        let len = input_ids.dim(1)?;
        let words = self.words.forward(input_ids)?;
        let types = match token_type_ids {
            Some(ids) => self.token_types.forward(ids)?,
            // All segment 0: one row, broadcast (no index tensor to build).
            None => self
                .token_types
                .embeddings()
                .narrow(0, 0, 1)?
                .unsqueeze(0)?,
        };
        // Absolute positions 0..len: the first `len` rows of the table.
        let positions = self
            .positions
            .embeddings()
            .narrow(0, 0, len)?
            .unsqueeze(0)?;
        let summed = words.broadcast_add(&types)?.broadcast_add(&positions)?;
        drop.forward(&self.norm.forward(&summed, pass)?, pass)
    }
}

/// Multi-head self-attention, up to the concatenated heads (before `output.dense`).
#[derive(Debug, Clone)]
struct SelfAttention {
    query: Dense,
    key: Dense,
    value: Dense,
    heads: usize,
}

impl SelfAttention {
    fn load(vb: VarBuilder, config: &BertConfig) -> Result<Self> {
        let hidden = config.hidden_size;
        Ok(Self {
            query: Dense::load(hidden, hidden, vb.pp("query"))?,
            key: Dense::load(hidden, hidden, vb.pp("key"))?,
            value: Dense::load(hidden, hidden, vb.pp("value"))?,
            heads: config.num_attention_heads,
        })
    }

    /// `x` is `[B, T, H]` under a mask, or `[N, H]` packed (see [`Tokens`]).
    fn forward(&self, x: &Tensor, tokens: &Tokens, drop: &Dropout, pass: Pass) -> Result<Tensor> {
        // One product for the three projections: [.., 3H].
        let qkv = Dense::concat(&[&self.query, &self.key, &self.value])?.forward(x)?;
        match tokens {
            Tokens::Padded(mask) => {
                let (batch, len) = mask.dims2()?;
                let probs_shape = (batch, self.heads, len, len).into();
                let dropout = drop.multiplier(&probs_shape, x.dtype(), x.device(), pass)?;
                if !pass.differentiable && !x.device().is_cpu() {
                    // Inference off the CPU: candle's fused softmax (no backward).
                    return crate::ops::attention::attention_composed(
                        &qkv,
                        mask,
                        self.heads,
                        dropout.as_ref(),
                        |s| softmax_last_dim(s, pass),
                    );
                }
                crate::ops::attention(&qkv, mask, self.heads, dropout.as_ref())
            }
            Tokens::Packed { lengths, .. } if !crate::ops::runs_kernels(x.device()) => {
                let weights = self.heads * lengths.iter().map(|l| l * l).sum::<usize>();
                let dropout = drop.multiplier(&weights.into(), x.dtype(), x.device(), pass)?;
                attention_packed(&qkv, lengths, self.heads, dropout.as_ref())
            }
            // The attention kernels, which draw the dropout themselves.
            Tokens::Packed { lengths, .. } => {
                attention_packed_seeded(&qkv, lengths, self.heads, drop.seeded(pass))
            }
        }
    }
}

/// How the tokens of a batch flow through the layers.
enum Tokens<'a> {
    /// `[B, T, H]`, padding included, marked by the `[B, T]` attention mask.
    Padded(&'a Tensor),
    /// `[N, H]`: the real tokens only, sentence after sentence (`lengths`),
    /// gathered from the padded rows at `rows` (u32 indices into `B·T`).
    /// The feed-forward half of a layer then does no work on padding.
    Packed { lengths: Vec<usize>, rows: Tensor },
}

impl Tokens<'_> {
    /// The packing of `mask` `[B, T]`: each sentence's real tokens (all of its
    /// positions when it has none, matching the padded form's attention).
    fn packed(mask: &Tensor) -> Result<Self> {
        let (batch, len) = mask.dims2()?;
        let device = mask.device().clone();
        let mask = mask.ne(0u32)?.to_vec2::<u8>()?;
        let mut rows = Vec::with_capacity(batch * len);
        let mut lengths = Vec::with_capacity(batch);
        for (b, row) in mask.iter().enumerate() {
            let before = rows.len();
            let all_padding = !row.contains(&1);
            rows.extend(
                (0..len)
                    .filter(|&t| all_padding || row[t] != 0)
                    .map(|t| (b * len + t) as u32),
            );
            lengths.push(rows.len() - before);
        }
        let rows = Tensor::from_vec(rows, lengths.iter().sum::<usize>(), &device)?;
        Ok(Self::Packed { lengths, rows })
    }
}

/// One transformer layer: attention and feed-forward, each followed by a
/// residual connection and LayerNorm (post-norm, as BERT).
#[derive(Debug, Clone)]
struct Layer {
    attention: SelfAttention,
    attention_output: Dense,
    attention_norm: LayerNorm,
    intermediate: Dense,
    activation: HiddenAct,
    output: Dense,
    output_norm: LayerNorm,
}

impl Layer {
    fn load(vb: VarBuilder, config: &BertConfig) -> Result<Self> {
        let hidden = config.hidden_size;
        let eps = config.layer_norm_eps;
        let attention = vb.pp("attention");
        Ok(Self {
            attention: SelfAttention::load(attention.pp("self"), config)?,
            attention_output: Dense::load(hidden, hidden, attention.pp("output").pp("dense"))?,
            attention_norm: LayerNorm::load(hidden, eps, attention.pp("output").pp("LayerNorm"))?,
            intermediate: Dense::load(
                hidden,
                config.intermediate_size,
                vb.pp("intermediate").pp("dense"),
            )?,
            activation: config.hidden_act,
            output: Dense::load(
                config.intermediate_size,
                hidden,
                vb.pp("output").pp("dense"),
            )?,
            output_norm: LayerNorm::load(hidden, eps, vb.pp("output").pp("LayerNorm"))?,
        })
    }

    fn forward(&self, x: &Tensor, tokens: &Tokens, drop: &Dropout, pass: Pass) -> Result<Tensor> {
        let context = self.attention.forward(x, tokens, drop, pass)?;
        let attended = drop.forward(&self.attention_output.forward(&context)?, pass)?;
        let x = self.attention_norm.forward_residual(&attended, x, pass)?;

        let inner = match self.activation {
            // On the CPU linear then gelu_erf; elsewhere the product, then bias_gelu.
            HiddenAct::Gelu => self.intermediate.forward_gelu_erf(&x)?,
            HiddenAct::GeluApproximate => self.intermediate.forward(&x)?.gelu()?,
            HiddenAct::Relu => self.intermediate.forward(&x)?.relu()?,
        };
        let out = drop.forward(&self.output.forward(&inner)?, pass)?;
        self.output_norm.forward_residual(&out, &x, pass)
    }
}

/// A BERT encoder: embeddings and `num_layers()` transformer layers; returns
/// the last hidden state `[B, T, H]` (no pooler).
///
/// On the CPU in f32 and f64, and on a CUDA device where the packed attention
/// kernels take the head size (32, 64, 128), the layers run on the real tokens
/// only, packed (see [`BertEncoder::with_packing`]): a batch padded to its longest sentence
/// costs what its tokens cost. The output is then 0 at padding positions
/// (which pooling ignores); elsewhere padding positions carry what BERT
/// computes for them.
#[derive(Debug, Clone)]
pub struct BertEncoder {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    hidden_size: usize,
    max_positions: usize,
    /// Dropout probability, from `hidden_dropout_prob`; also used on the
    /// attention probabilities (BERT checkpoints set
    /// `attention_probs_dropout_prob` to the same 0.1).
    /// Seedable: see [`BertEncoder::seed_dropout`].
    dropout: Dropout,
    /// Run the layers on the real tokens only (see [`BertEncoder::with_packing`]).
    pack_tokens: bool,
}

impl BertEncoder {
    /// Builds the encoder from `vb`, whose paths are Hugging Face's without the
    /// `bert.` prefix (`embeddings.word_embeddings.weight`,
    /// `encoder.layer.{i}.attention.self.query.weight`, ...).
    pub fn load(vb: VarBuilder, config: &BertConfig) -> Result<Self> {
        if let Err(e) = super::config::check_bert_config(config) {
            bail!("invalid BERT config: {e}");
        }
        let embeddings = Embeddings::load(vb.pp("embeddings"), config)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| Layer::load(vb.pp(format!("encoder.layer.{i}")), config))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings,
            layers,
            hidden_size: config.hidden_size,
            max_positions: config.max_position_embeddings,
            dropout: Dropout::new(config.hidden_dropout_prob as f32),
            pack_tokens: true,
        })
    }

    /// Restarts the dropout masks' random stream from `seed`, so that a
    /// training forward pass is a function of its inputs and the seed. (Until
    /// then the stream is seeded by the operating system.)
    pub fn seed_dropout(&self, seed: u64) {
        self.dropout.reseed(seed);
    }

    /// The number of transformer layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The width of the hidden states (384 for MiniLM-L6).
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// The longest input, in tokens, the position table allows.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// The dtype of the weights (and of the output).
    pub fn dtype(&self) -> DType {
        self.embeddings.words.embeddings().dtype()
    }

    /// The last hidden state `[B, T, H]` for `input_ids` `[B, T]` and
    /// `attention_mask` `[B, T]` (non-zero = real token), with `token_type_ids`
    /// `[B, T]` (all 0 when `None`). `train` turns dropout on. Every op records
    /// its backward.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        self.forward_partly_frozen(input_ids, token_type_ids, attention_mask, train, None)
    }

    /// As [`forward`](Self::forward), but with the embeddings and the first
    /// `n` layers frozen when `frozen_layers` is `Some(n)`: the hidden state
    /// leaving them is detached, so no gradient is computed for them. `Some(0)`
    /// freezes the embeddings only, `Some(num_layers())` the whole backbone.
    /// The frozen part runs candle's fused no-gradient kernels.
    pub fn forward_partly_frozen(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: &Tensor,
        train: bool,
        frozen_layers: Option<usize>,
    ) -> Result<Tensor> {
        if let Some(n) = frozen_layers {
            if n > self.num_layers() {
                bail!(
                    "cannot freeze {n} layers: the encoder has {}",
                    self.num_layers()
                );
            }
        }
        let trainable = Pass {
            dropout: train,
            differentiable: true,
        };
        let frozen = Pass {
            dropout: train,
            differentiable: false,
        };
        // Stage 0 is the embeddings, stage i + 1 is layer i.
        let frozen_stages = frozen_layers.map_or(0, |n| n + 1);
        let pass_of = |stage: usize| {
            if stage < frozen_stages {
                frozen
            } else {
                trainable
            }
        };
        self.run(
            input_ids,
            token_type_ids,
            attention_mask,
            pass_of,
            frozen_stages,
        )
    }

    /// Inference: no dropout, and candle's fused LayerNorm and softmax kernels,
    /// which record no backward (faster). Gives the same values as
    /// `forward(.., train = false)` up to float rounding; never use it for training.
    pub fn forward_inference(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: &Tensor,
    ) -> Result<Tensor> {
        self.run(
            input_ids,
            token_type_ids,
            attention_mask,
            |_| Pass::INFERENCE,
            0,
        )
    }

    /// Runs the stages with `pass_of(stage)`; detaches the hidden state after
    /// the first `detach_after` stages.
    fn run(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: &Tensor,
        pass_of: impl Fn(usize) -> Pass,
        detach_after: usize,
    ) -> Result<Tensor> {
        self.check_inputs(input_ids, token_type_ids, attention_mask)?;
        let detach_if = |stage: usize, x: Tensor| {
            if stage + 1 == detach_after {
                x.detach()
            } else {
                x
            }
        };
        let mut hidden =
            self.embeddings
                .forward(input_ids, token_type_ids, &self.dropout, pass_of(0))?;
        let (batch, len, hidden_size) = hidden.dims3()?;
        let tokens = if self.packs(&hidden) {
            Tokens::packed(attention_mask)?
        } else {
            Tokens::Padded(attention_mask)
        };
        if let Tokens::Packed { rows, .. } = &tokens {
            hidden = hidden
                .reshape((batch * len, hidden_size))?
                .index_select(rows, 0)?;
        }
        hidden = detach_if(0, hidden);
        for (i, layer) in self.layers.iter().enumerate() {
            hidden = layer.forward(&hidden, &tokens, &self.dropout, pass_of(i + 1))?;
            hidden = detach_if(i + 1, hidden);
        }
        match &tokens {
            Tokens::Packed { rows, .. } => {
                Tensor::zeros((batch * len, hidden_size), hidden.dtype(), hidden.device())?
                    .index_add(rows, &hidden, 0)?
                    .reshape((batch, len, hidden_size))
            }
            Tokens::Padded(_) => Ok(hidden),
        }
    }

    /// Whether the layers run on packed tokens: where the fused packed
    /// attention runs (the CPU in f32 or f64; a CUDA device in a dtype and
    /// head size the attention kernels take) unless turned off.
    fn packs(&self, hidden: &Tensor) -> bool {
        let dtype = hidden.dtype();
        let device = hidden.device();
        let head_size = self
            .layers
            .first()
            .map_or(0, |l| self.hidden_size / l.attention.heads.max(1));
        // Under the host harness the CPU takes the GPU's path (the kernels).
        let fused = if crate::ops::runs_kernels(device) {
            packed_kernel_supports(dtype, head_size)
        } else {
            device.is_cpu() && matches!(dtype, DType::F32 | DType::F64)
        };
        self.pack_tokens && fused
    }

    /// Turns packing off (`false`) or back on: the layers then run on the
    /// padded `[B, T, H]` batch under the attention mask. Same results at the
    /// real tokens (to float rounding); for tests and comparisons.
    pub fn with_packing(mut self, pack: bool) -> Self {
        self.pack_tokens = pack;
        self
    }

    fn check_inputs(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: &Tensor,
    ) -> Result<()> {
        let (batch, len) = match input_ids.dims() {
            [b, t] => (*b, *t),
            dims => bail!("input_ids must be [batch, tokens], got shape {dims:?}"),
        };
        if !matches!(input_ids.dtype(), DType::U8 | DType::U32 | DType::I64) {
            bail!(
                "input_ids must be integer (u8, u32 or i64), got {:?}",
                input_ids.dtype()
            );
        }
        if batch == 0 || len == 0 {
            bail!("empty input: input_ids has shape [{batch}, {len}]");
        }
        if len > self.max_positions {
            bail!(
                "input of {len} tokens is longer than the model's {} positions; truncate it",
                self.max_positions
            );
        }
        if attention_mask.dims() != [batch, len] {
            bail!(
                "attention_mask has shape {:?}, input_ids [{batch}, {len}]",
                attention_mask.dims()
            );
        }
        if let Some(types) = token_type_ids {
            if types.dims() != [batch, len] {
                bail!(
                    "token_type_ids has shape {:?}, input_ids [{batch}, {len}]",
                    types.dims()
                );
            }
        }
        let device = self.embeddings.words.embeddings().device();
        let tensors = [Some(input_ids), Some(attention_mask), token_type_ids];
        if tensors
            .iter()
            .flatten()
            .any(|t| !t.device().same_device(device))
        {
            bail!("inputs must be on the model's device ({device:?})");
        }
        Ok(())
    }
}
