//! Tokenizer loading and batch encoding into the encoder's input tensors.

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use tokenizers::{
    Encoding, PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

use super::resolve::ModelFiles;

/// One padded batch: `[B, T]` u32 tensors, `T` the longest sequence in the batch.
#[derive(Debug, Clone)]
pub struct Batch {
    pub input_ids: Tensor,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor,
    pub token_type_ids: Tensor,
}

/// Loads `tokenizer.json`, padding each batch to its longest sequence (right,
/// with the tokenizer's pad token) and truncating at `max_len` tokens, special
/// tokens included (whatever padding and truncation the file itself sets).
pub fn load_tokenizer(files: &ModelFiles, max_len: usize) -> anyhow::Result<Tokenizer> {
    let path = &files.tokenizer;
    if max_len < 2 {
        bail!("max_len {max_len} leaves no room for [CLS] and [SEP]");
    }
    let mut tokenizer = Tokenizer::from_file(path)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("cannot load tokenizer {}", path.display()))?;
    let (pad_id, pad_token) = match tokenizer.get_padding() {
        Some(padding) => (padding.pad_id, padding.pad_token.clone()),
        None => {
            let id = tokenizer.token_to_id("[PAD]").with_context(|| {
                format!("{} sets no padding and has no [PAD] token", path.display())
            })?;
            (id, "[PAD]".to_string())
        }
    };
    tokenizer.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::BatchLongest,
        direction: PaddingDirection::Right,
        pad_to_multiple_of: None,
        pad_id,
        pad_type_id: 0,
        pad_token,
    }));
    tokenizer
        .with_truncation(Some(TruncationParams {
            direction: TruncationDirection::Right,
            max_length: max_len,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
        }))
        .map_err(anyhow::Error::msg)
        .context("cannot set the tokenizer's truncation")?;
    Ok(tokenizer)
}

/// The pad id the tokenizer uses (0, BERT's `[PAD]`, if it names none).
pub fn pad_id(tok: &Tokenizer) -> u32 {
    tok.get_padding()
        .map(|padding| padding.pad_id)
        .or_else(|| tok.token_to_id("[PAD]"))
        .unwrap_or(0)
}

/// Tokenizes `texts` (with `[CLS]`/`[SEP]`) into one batch on `device`,
/// padded to its longest text.
pub fn encode_batch(tok: &Tokenizer, texts: &[&str], device: &Device) -> anyhow::Result<Batch> {
    if texts.is_empty() {
        bail!("no texts to encode");
    }
    let encodings = tok
        .encode_batch(texts.to_vec(), true)
        .map_err(anyhow::Error::msg)
        .context("tokenization failed")?;
    let encodings: Vec<&Encoding> = encodings.iter().collect();
    pad_encodings(&encodings, pad_id(tok), device)
}

/// Stacks tokenized texts into one batch, right-padding each to the longest
/// with `pad_id` (mask 0, segment 0).
pub fn pad_encodings(
    encodings: &[&Encoding],
    pad_id: u32,
    device: &Device,
) -> anyhow::Result<Batch> {
    let len = encodings.iter().map(|e| e.len()).max().unwrap_or(0);
    if len == 0 {
        bail!("nothing to encode: no tokens in the batch");
    }
    let shape = (encodings.len(), len);
    let stack = |field: fn(&Encoding) -> &[u32], pad: u32| -> anyhow::Result<Tensor> {
        let mut flat = Vec::with_capacity(encodings.len() * len);
        for encoding in encodings {
            let values = field(encoding);
            flat.extend_from_slice(values);
            flat.resize(flat.len() + len - values.len(), pad);
        }
        Ok(Tensor::from_vec(flat, shape, device)?)
    };
    Ok(Batch {
        input_ids: stack(Encoding::get_ids, pad_id)?,
        attention_mask: stack(Encoding::get_attention_mask, 0)?,
        token_type_ids: stack(Encoding::get_type_ids, 0)?,
    })
}
