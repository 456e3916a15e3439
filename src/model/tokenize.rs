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
    /// Token ids, padded with the tokenizer's pad id.
    pub input_ids: Tensor,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// Segment ids (0 for single sentences and for padding).
    pub token_type_ids: Tensor,
}

/// Loads `tokenizer.json`, truncating at `max_len` tokens, special tokens
/// included, and padding a batch to its longest sequence (right, with the
/// tokenizer's pad token), whatever padding and truncation the file itself sets.
/// [`tokenize`] and [`pad`] are the crate's own path over it.
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

/// One text's tokens, `[CLS] ... [SEP]`, truncated, unpadded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    /// Token ids, `[CLS]` first and `[SEP]` last.
    pub input_ids: Vec<u32>,
    /// Segment ids, one per token (0 for a single sentence).
    pub type_ids: Vec<u32>,
}

impl Tokens {
    /// The number of tokens, special tokens included.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether there is no token at all (never so for a BERT tokenizer, which
    /// adds `[CLS]` and `[SEP]`).
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
}

/// Tokenizes each text on its own (in parallel), with `[CLS]`/`[SEP]` and the
/// tokenizer's truncation, unpadded: [`pad`] pads them when they are batched.
///
/// `tok` should come from [`load_tokenizer`]: its batch-longest padding does
/// nothing to a single text, so no copy of the tokenizer is needed to turn it off.
pub fn tokenize<S: AsRef<str> + Sync>(tok: &Tokenizer, texts: &[S]) -> anyhow::Result<Vec<Tokens>> {
    use rayon::prelude::*;
    texts
        .par_iter()
        .map(|text| {
            let encoding = tok
                .encode(text.as_ref(), true)
                .map_err(anyhow::Error::msg)
                .context("tokenization failed")?;
            Ok(Tokens::from(&encoding))
        })
        .collect()
}

impl From<&Encoding> for Tokens {
    /// The real tokens of an encoding (those its attention mask keeps).
    fn from(encoding: &Encoding) -> Self {
        let keep = |values: &[u32]| -> Vec<u32> {
            values
                .iter()
                .zip(encoding.get_attention_mask())
                .filter(|(_, &mask)| mask != 0)
                .map(|(&v, _)| v)
                .collect()
        };
        Tokens {
            input_ids: keep(encoding.get_ids()),
            type_ids: keep(encoding.get_type_ids()),
        }
    }
}

/// Tokenizes `texts` into one batch on `device`, padded to its longest text.
pub fn encode_batch<S: AsRef<str> + Sync>(
    tok: &Tokenizer,
    texts: &[S],
    device: &Device,
) -> anyhow::Result<Batch> {
    if texts.is_empty() {
        bail!("no texts to encode");
    }
    let tokens = tokenize(tok, texts)?;
    pad(&tokens.iter().collect::<Vec<_>>(), pad_id(tok), device)
}

/// Stacks tokenized texts into one batch, right-padding each to the longest
/// with `pad_id` (mask 0, segment 0). The one padding routine: the encoder and
/// the training data's collation both use it.
pub fn pad(rows: &[&Tokens], pad_id: u32, device: &Device) -> anyhow::Result<Batch> {
    let len = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    if len == 0 {
        bail!("nothing to encode: no tokens in the batch");
    }
    let shape = (rows.len(), len);
    let mut ids = vec![pad_id; rows.len() * len];
    let mut mask = vec![0u32; rows.len() * len];
    let mut types = vec![0u32; rows.len() * len];
    for (i, row) in rows.iter().enumerate() {
        let n = row.len();
        ids[i * len..i * len + n].copy_from_slice(&row.input_ids);
        mask[i * len..i * len + n].fill(1);
        let t = row.type_ids.len().min(n);
        types[i * len..i * len + t].copy_from_slice(&row.type_ids[..t]);
    }
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, shape, device)?,
        attention_mask: Tensor::from_vec(mask, shape, device)?,
        token_type_ids: Tensor::from_vec(types, shape, device)?,
    })
}
