//! [`SentenceEncoder`]: sentences in, one embedding per sentence out, as a
//! sentence-transformers pipeline (Transformer, Pooling, optional Normalize).

use anyhow::bail;
use candle_core::{DType, Device, IndexOp, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use tokenizers::Tokenizer;

use super::bert::BertEncoder;
use super::checkpoint::load_frozen;
use super::config::{Pooling, SentenceConfig};
use super::resolve::{resolve_model, ModelFiles};
use super::tokenize::{load_tokenizer, pad, pad_id, tokenize, Tokens};

/// sentence-transformers' default batch size.
pub const DEFAULT_BATCH_SIZE: usize = 32;

/// Inputs at least this many batches long get a progress bar (when asked for).
const PROGRESS_MIN_BATCHES: usize = 4;

/// A BERT encoder with its tokenizer, pooling and normalisation settings.
#[derive(Debug, Clone)]
pub struct SentenceEncoder {
    model: BertEncoder,
    /// Truncates at `max_seq_length`; batches are padded by [`pad`] after
    /// length sorting.
    tokenizer: Tokenizer,
    settings: SentenceConfig,
    device: Device,
    batch_size: usize,
    progress: bool,
    /// Keep only the first this-many values of each embedding (Matryoshka).
    truncate_dim: Option<usize>,
}

impl SentenceEncoder {
    /// Resolves `name_or_path` (see [`resolve_model`]) and loads it.
    pub fn load(name_or_path: &str, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        let files = resolve_model(name_or_path)?;
        Self::from_files(&files, dtype, device)
    }

    /// Loads a model folder with the settings it declares (pooling from
    /// `1_Pooling/config.json`, normalisation from `modules.json`, truncation
    /// at `max_seq_length`).
    pub fn from_files(files: &ModelFiles, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        let settings = SentenceConfig::load(files)?;
        let (model, _config) = load_frozen(files, dtype, device)?;
        let tokenizer = load_tokenizer(files, settings.max_seq_length)?;
        Ok(Self {
            model,
            tokenizer,
            settings,
            device: device.clone(),
            batch_size: DEFAULT_BATCH_SIZE,
            progress: false,
            truncate_dim: None,
        })
    }

    /// Sentences per forward pass (default 32); 0 is taken as 1.
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// Overrides the pooling the model folder declares.
    pub fn with_pooling(mut self, pooling: Pooling) -> Self {
        self.settings.pooling = pooling;
        self
    }

    /// Overrides whether embeddings are L2-normalised.
    pub fn with_normalize(mut self, normalize: bool) -> Self {
        self.settings.normalize = normalize;
        self
    }

    /// Keeps only the first `dim` values of each embedding (sentence-transformers'
    /// `truncate_dim`, for Matryoshka models), renormalised when the pipeline
    /// normalises; `None` keeps them all. An error for 0 or more than the model's
    /// hidden size.
    pub fn with_truncate_dim(mut self, dim: Option<usize>) -> anyhow::Result<Self> {
        if let Some(d) = dim {
            let hidden = self.model.hidden_size();
            if d == 0 || d > hidden {
                bail!("truncate_dim {d} must be between 1 and the model's embedding size {hidden}");
            }
        }
        self.truncate_dim = dim;
        Ok(self)
    }

    /// Shows a progress bar on stderr for long inputs (hidden when stderr is not a terminal).
    pub fn with_progress(mut self, progress: bool) -> Self {
        self.progress = progress;
        self
    }

    /// The BERT encoder underneath.
    pub fn model(&self) -> &BertEncoder {
        &self.model
    }

    /// The tokenizer (truncating at [`max_seq_length`](Self::max_seq_length)).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The pipeline settings in use (pooling, normalisation, truncation).
    pub fn settings(&self) -> &SentenceConfig {
        &self.settings
    }

    /// Longest input in tokens, `[CLS]` and `[SEP]` included; longer texts are truncated.
    pub fn max_seq_length(&self) -> usize {
        self.settings.max_seq_length
    }

    /// The width of an embedding: the model's hidden size, or the truncation's.
    pub fn embedding_dim(&self) -> usize {
        self.truncate_dim.unwrap_or(self.model.hidden_size())
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Tokenizes `texts` one by one: `[CLS] ... [SEP]`, truncated, unpadded.
    pub fn tokenize(&self, texts: &[&str]) -> anyhow::Result<Vec<Tokens>> {
        tokenize(&self.tokenizer, texts)
    }

    /// Embeds `texts`: `[N, H]` in the model's dtype, row `i` for `texts[i]`.
    ///
    /// Texts are sorted by token count and batched, so each batch pads little;
    /// padding gets exactly zero attention and is left out of the pooling, so
    /// a text's embedding does not depend on its batch. An empty text is
    /// `[CLS] [SEP]` and gets an embedding like any other; an empty list is an error.
    pub fn encode(&self, texts: &[&str]) -> anyhow::Result<Tensor> {
        if texts.is_empty() {
            bail!("no sentences to encode");
        }
        let tokens = self.tokenize(texts)?;
        let mut order: Vec<usize> = (0..texts.len()).collect();
        // Longest first, as sentence-transformers: a memory problem shows at once.
        order.sort_by_key(|&i| std::cmp::Reverse(tokens[i].len()));

        let progress = self.progress_bar(texts.len());
        let mut pooled = Vec::with_capacity(order.len().div_ceil(self.batch_size));
        for chunk in order.chunks(self.batch_size) {
            let batch: Vec<&Tokens> = chunk.iter().map(|&i| &tokens[i]).collect();
            pooled.push(self.encode_tokens(&batch)?);
            progress.inc(chunk.len() as u64);
        }
        progress.finish_and_clear();

        let sorted = Tensor::cat(&pooled, 0)?;
        // Row `order[k]` of the output is row `k` of `sorted`.
        let mut position = vec![0u32; order.len()];
        for (k, &i) in order.iter().enumerate() {
            position[i] = k as u32;
        }
        let position = Tensor::from_vec(position, order.len(), &self.device)?;
        Ok(sorted.index_select(&position, 0)?)
    }

    /// Embeds one batch of tokenized texts, `[B, H]`, in their order.
    pub fn encode_tokens(&self, tokens: &[&Tokens]) -> anyhow::Result<Tensor> {
        let batch = pad(tokens, pad_id(&self.tokenizer), &self.device)?;
        let hidden = self.model.forward_inference(
            &batch.input_ids,
            Some(&batch.token_type_ids),
            &batch.attention_mask,
        )?;
        let pooled = match self.settings.pooling {
            Pooling::Mean => crate::ops::masked_mean_pool(&hidden, &batch.attention_mask)?,
            Pooling::Cls => hidden.i((.., 0, ..))?.contiguous()?,
        };
        // Truncate before normalising, so a truncated embedding has unit norm too.
        let pooled = match self.truncate_dim {
            Some(d) if d < pooled.dim(1)? => pooled.narrow(1, 0, d)?.contiguous()?,
            _ => pooled,
        };
        Ok(if self.settings.normalize {
            crate::ops::l2_normalize(&pooled)?
        } else {
            pooled
        })
    }

    fn progress_bar(&self, total: usize) -> ProgressBar {
        if !self.progress || total < PROGRESS_MIN_BATCHES * self.batch_size {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(total as u64);
        if let Ok(style) =
            ProgressStyle::with_template("{bar:40} {pos}/{len} sentences ({per_sec}, {eta} left)")
        {
            bar.set_style(style);
        }
        bar
    }
}
