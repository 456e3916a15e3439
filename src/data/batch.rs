//! Tokenised examples and their collation into padded tensors.
//!
//! Every example is tokenised once (truncated at the tokenizer's `max_len`, not
//! padded); a batch is padded to its own longest row when it is collated, as
//! PyTorch's `padding="longest"` does. Tokenising and padding are the model's
//! ([`crate::model::tokenize`]); this module adds the labels.

use candle_core::{Device, Tensor};
use tokenizers::Tokenizer;

use super::tweeteval::TaskSplit;
use crate::model::tokenize::{self, Batch, Tokens};
use crate::model::Head;
use crate::ops::IGNORE_INDEX;

/// One tokenised, labelled row of one task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The text's tokens, unpadded.
    pub tokens: Tokens,
    /// The head (task) the row is labelled for.
    pub head: Head,
    /// The class index in that head's task.
    pub label: usize,
}

/// A collated batch, on the model's device.
#[derive(Debug, Clone)]
pub struct LabelledBatch {
    /// The padded `[B, T]` token tensors.
    pub inputs: Batch,
    /// `[B, 2]` i64: column 0 is head A's label, column 1 head B's; the head a
    /// row is not labelled for holds [`IGNORE_INDEX`].
    pub labels: Tensor,
}

/// Tokenises a split for `head` with `tokenizer`'s truncation (see
/// [`tokenize::load_tokenizer`]), leaving padding to [`collate`].
pub fn tokenize_split(
    tokenizer: &Tokenizer,
    split: &TaskSplit,
    head: Head,
) -> anyhow::Result<Vec<Example>> {
    let tokens = tokenize::tokenize(tokenizer, &split.texts)?;
    Ok(tokens
        .into_iter()
        .zip(&split.labels)
        .map(|(tokens, &label)| Example {
            tokens,
            head,
            label,
        })
        .collect())
}

/// Pads `rows` to the longest among them ([`tokenize::pad`]) and adds their labels.
pub fn collate(rows: &[&Example], pad_id: u32, device: &Device) -> anyhow::Result<LabelledBatch> {
    anyhow::ensure!(
        !rows.is_empty(),
        "collate: a batch needs at least one example"
    );
    let tokens: Vec<&Tokens> = rows.iter().map(|r| &r.tokens).collect();
    let inputs = tokenize::pad(&tokens, pad_id, device)?;
    let mut labels = vec![IGNORE_INDEX; rows.len() * 2];
    for (i, row) in rows.iter().enumerate() {
        labels[i * 2 + row.head.index()] = row.label as i64;
    }
    Ok(LabelledBatch {
        inputs,
        labels: Tensor::from_vec(labels, (rows.len(), 2), device)?,
    })
}
