//! Tokenised examples and their collation into padded tensors.
//!
//! Every example is tokenised once (truncated at `max_len`, not padded); a batch
//! is padded to its own longest row when it is collated, as PyTorch's
//! `padding="longest"` does.

use candle_core::{Device, Tensor};
use tokenizers::{Tokenizer, TruncationParams};

use super::tweeteval::TaskSplit;
use super::Head;
use crate::ops::IGNORE_INDEX;

/// One tokenised, labelled row of one task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    pub head: Head,
    pub label: usize,
}

/// A collated batch, on the model's device.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[B, T]` u32, padded with the tokenizer's pad id.
    pub input_ids: Tensor,
    /// `[B, T]` u32: 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// `[B, T]` u32.
    pub token_type_ids: Tensor,
    /// `[B, 2]` i64: column 0 is head A's label, column 1 head B's; the head a
    /// row is not labelled for holds [`IGNORE_INDEX`].
    pub labels: Tensor,
}

/// The tokenizer's pad id: its padding setting, else `[PAD]`, else 0.
pub fn pad_id(tokenizer: &Tokenizer) -> u32 {
    tokenizer
        .get_padding()
        .map(|p| p.pad_id)
        .or_else(|| tokenizer.token_to_id("[PAD]"))
        .unwrap_or(0)
}

/// Tokenises a split for `head`, truncating each text at `max_len` tokens
/// (special tokens included) and leaving padding to [`collate`].
pub fn tokenize_split(
    tokenizer: &Tokenizer,
    split: &TaskSplit,
    head: Head,
    max_len: usize,
) -> anyhow::Result<Vec<Example>> {
    let encodings = tokenize_unpadded(tokenizer, &split.texts, max_len)?;
    Ok(encodings
        .into_iter()
        .zip(&split.labels)
        .map(|((input_ids, type_ids), &label)| Example {
            input_ids,
            type_ids,
            head,
            label,
        })
        .collect())
}

/// Token ids and type ids of each text, truncated at `max_len`, unpadded.
pub fn tokenize_unpadded<S: AsRef<str>>(
    tokenizer: &Tokenizer,
    texts: &[S],
    max_len: usize,
) -> anyhow::Result<Vec<(Vec<u32>, Vec<u32>)>> {
    anyhow::ensure!(
        max_len >= 2,
        "max_len must leave room for [CLS] and [SEP] (got {max_len})"
    );
    // The caller's tokenizer may pad to the longest of everything it is given:
    // encode with a copy that does not pad and truncates where we say.
    let mut tok = tokenizer.clone();
    tok.with_padding(None);
    tok.with_truncation(Some(TruncationParams {
        max_length: max_len,
        ..Default::default()
    }))
    .map_err(|e| anyhow::anyhow!("setting truncation at {max_len}: {e}"))?;
    let inputs: Vec<&str> = texts.iter().map(AsRef::as_ref).collect();
    let encodings = tok
        .encode_batch(inputs, true)
        .map_err(|e| anyhow::anyhow!("tokenising: {e}"))?;
    Ok(encodings
        .into_iter()
        .map(|e| (e.get_ids().to_vec(), e.get_type_ids().to_vec()))
        .collect())
}

/// Pads `rows` to the longest among them and builds the batch tensors.
pub fn collate(rows: &[&Example], pad_id: u32, device: &Device) -> candle_core::Result<Batch> {
    if rows.is_empty() {
        candle_core::bail!("collate: a batch needs at least one example");
    }
    let b = rows.len();
    let t = rows
        .iter()
        .map(|r| r.input_ids.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let mut ids = vec![pad_id; b * t];
    let mut mask = vec![0u32; b * t];
    let mut types = vec![0u32; b * t];
    let mut labels = vec![IGNORE_INDEX; b * 2];
    for (i, row) in rows.iter().enumerate() {
        let n = row.input_ids.len();
        ids[i * t..i * t + n].copy_from_slice(&row.input_ids);
        mask[i * t..i * t + n].fill(1);
        types[i * t..i * t + row.type_ids.len().min(n)]
            .copy_from_slice(&row.type_ids[..row.type_ids.len().min(n)]);
        labels[i * 2 + row.head.index()] = row.label as i64;
    }
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (b, t), device)?,
        attention_mask: Tensor::from_vec(mask, (b, t), device)?,
        token_type_ids: Tensor::from_vec(types, (b, t), device)?,
        labels: Tensor::from_vec(labels, (b, 2), device)?,
    })
}
