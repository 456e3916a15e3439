//! [`SentenceEncoder`]: sentences in, one embedding per sentence out, as a
//! sentence-transformers pipeline (Transformer, Pooling, any Dense, optional
//! Normalize), with its prompts.

use std::borrow::Cow;

use anyhow::bail;
use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use tokenizers::Tokenizer;

use super::bert::BertEncoder;
use super::checkpoint::load_frozen;
use super::config::{Pooling, SentenceConfig};
use super::dense::Dense;
use super::pooling::{exclude_prefix, pool};
use super::resolve::{resolve_model, ModelFiles};
use super::text::TextPrep;
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
    /// The pipeline's Dense modules, loaded.
    dense: Vec<Dense>,
    /// Prepended to every text (sentence-transformers' `prompt`).
    prompt: Option<String>,
    /// The prompt's tokens, `[CLS]` included: left out of the pooling unless
    /// the pooling includes the prompt.
    prompt_tokens: usize,
    device: Device,
    batch_size: usize,
    progress: bool,
    /// Keep only the first this-many values of each embedding (Matryoshka).
    truncate_dim: Option<usize>,
    /// How texts are prepared before tokenisation (by default not at all).
    text_prep: TextPrep,
}

impl SentenceEncoder {
    /// Resolves `name_or_path` (see [`resolve_model`]) and loads it.
    pub fn load(name_or_path: &str, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        let files = resolve_model(name_or_path)?;
        Self::from_files(&files, dtype, device)
    }

    /// Loads a model folder with the settings it declares (see
    /// [`SentenceConfig::load`]: pooling, Dense modules, normalisation,
    /// truncation at `max_seq_length`, the default prompt).
    pub fn from_files(files: &ModelFiles, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        let settings = SentenceConfig::load(files)?;
        let (model, _config) = load_frozen(files, dtype, device)?;
        let tokenizer = load_tokenizer(files, settings.max_seq_length)?;
        let dense = settings
            .dense
            .iter()
            .map(|d| Dense::load(files, d, dtype, device))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let default_prompt = settings
            .default_prompt_name
            .as_ref()
            .map(|name| settings.prompts[name].clone());
        let encoder = Self {
            model,
            tokenizer,
            settings,
            dense,
            prompt: None,
            prompt_tokens: 0,
            device: device.clone(),
            batch_size: DEFAULT_BATCH_SIZE,
            progress: false,
            truncate_dim: None,
            text_prep: TextPrep::default(),
        };
        encoder.check_widths()?;
        encoder.with_prompt(default_prompt.as_deref())
    }

    /// The width pooling gives: the hidden size per pooling mode.
    fn pooled_dim(&self) -> usize {
        self.model.hidden_size() * self.settings.pooling.len()
    }

    /// Each Dense module takes what the step before it gives.
    fn check_widths(&self) -> anyhow::Result<()> {
        let mut width = self.pooled_dim();
        for (dense, config) in self.dense.iter().zip(&self.settings.dense) {
            if dense.in_features() != width {
                bail!(
                    "the Dense module in {:?} takes {} values, but the step before it gives {width} ({} pooling mode(s) of {})",
                    config.path,
                    dense.in_features(),
                    self.settings.pooling.len(),
                    self.model.hidden_size()
                );
            }
            width = dense.out_features();
        }
        Ok(())
    }

    /// Prepares every text with `prep` before tokenisation (emoji as names,
    /// escapes undone, hashtags split: [`TextPrep`]); the prompt is left as
    /// it is. The default, no preparation, reads texts as sentence-transformers
    /// does; a model fine-tuned with `train --emoji text ...` wants the same
    /// settings here.
    pub fn with_text_prep(mut self, prep: TextPrep) -> Self {
        self.text_prep = prep;
        self
    }

    /// How texts are prepared before tokenisation.
    pub fn text_prep(&self) -> TextPrep {
        self.text_prep
    }

    /// Sentences per forward pass (default 32); 0 is taken as 1.
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// Overrides the pooling the model folder declares with one mode.
    pub fn with_pooling(self, pooling: Pooling) -> Self {
        self.with_pooling_modes(&[pooling])
            .expect("one mode is never empty")
    }

    /// Overrides the pooling with `modes`, concatenated in sentence-transformers'
    /// order. An error when there is none, or when the model's Dense module
    /// takes another width.
    pub fn with_pooling_modes(mut self, modes: &[Pooling]) -> anyhow::Result<Self> {
        if modes.is_empty() {
            bail!("no pooling mode");
        }
        let before = std::mem::replace(&mut self.settings.pooling, Pooling::in_order(modes));
        if let Err(e) = self.check_widths() {
            self.settings.pooling = before;
            return Err(e);
        }
        Ok(self)
    }

    /// Prepends `prompt` to every text (sentence-transformers' `prompt=`);
    /// `None` for none. Its tokens are left out of the pooling where the
    /// model's pooling says `include_prompt: false`.
    pub fn with_prompt(mut self, prompt: Option<&str>) -> anyhow::Result<Self> {
        self.prompt_tokens = match prompt {
            // As sentence-transformers counts it: the prompt tokenised alone,
            // less its trailing [SEP].
            Some(p) => tokenize(&self.tokenizer, &[p])?[0].len().saturating_sub(1),
            None => 0,
        };
        self.prompt = prompt.map(str::to_string);
        Ok(self)
    }

    /// Uses the model's prompt called `name` (`config_sentence_transformers.json`);
    /// an error naming the known prompts when there is no such one.
    pub fn with_prompt_name(self, name: &str) -> anyhow::Result<Self> {
        let Some(prompt) = self.settings.prompts.get(name).cloned() else {
            let known: Vec<&str> = self.settings.prompts.keys().map(String::as_str).collect();
            bail!(
                "the model has no prompt named {name:?}; its prompts: {}",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            );
        };
        self.with_prompt(Some(&prompt))
    }

    /// The prompt prepended to every text, if any.
    pub fn prompt(&self) -> Option<&str> {
        self.prompt.as_deref()
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
            let full = self.full_dim();
            if d == 0 || d > full {
                bail!("truncate_dim {d} must be between 1 and the model's embedding size {full}");
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

    /// The width of an embedding: what the pipeline gives (the hidden size per
    /// pooling mode, or the last Dense module's output), or the truncation's.
    pub fn embedding_dim(&self) -> usize {
        self.truncate_dim.unwrap_or(self.full_dim())
    }

    fn full_dim(&self) -> usize {
        self.dense
            .last()
            .map_or(self.pooled_dim(), Dense::out_features)
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Tokenizes `texts` one by one, prepared (see
    /// [`with_text_prep`](Self::with_text_prep)) and after the prompt if one
    /// is set: `[CLS] ... [SEP]`, truncated, unpadded.
    pub fn tokenize(&self, texts: &[&str]) -> anyhow::Result<Vec<Tokens>> {
        let prepared: Vec<Cow<'_, str>> = texts.iter().map(|t| self.text_prep.apply(t)).collect();
        match &self.prompt {
            Some(prompt) => {
                let prompted: Vec<String> =
                    prepared.iter().map(|t| format!("{prompt}{t}")).collect();
                let refs: Vec<&str> = prompted.iter().map(String::as_str).collect();
                tokenize(&self.tokenizer, &refs)
            }
            None => {
                let refs: Vec<&str> = prepared.iter().map(|t| t.as_ref()).collect();
                tokenize(&self.tokenizer, &refs)
            }
        }
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

    /// Embeds one batch of texts tokenized by [`tokenize`](Self::tokenize),
    /// `[B, D]`, in their order.
    pub fn encode_tokens(&self, tokens: &[&Tokens]) -> anyhow::Result<Tensor> {
        let batch = pad(tokens, pad_id(&self.tokenizer), &self.device)?;
        let hidden = self.model.forward_inference(
            &batch.input_ids,
            Some(&batch.token_type_ids),
            &batch.attention_mask,
        )?;
        let mask = if self.settings.include_prompt {
            batch.attention_mask.clone()
        } else {
            exclude_prefix(&batch.attention_mask, self.prompt_tokens)?
        };
        let mut pooled = pool(&hidden, &mask, &self.settings.pooling)?;
        for dense in &self.dense {
            pooled = dense.forward(&pooled)?;
        }
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
