//! Tokenised examples and their collation into padded tensors.
//!
//! Every example is tokenised once (truncated at the tokenizer's `max_len`, not
//! padded); a batch is padded to its own longest sequence when it is collated,
//! as PyTorch's `padding="longest"` does. Tokenising and padding are the
//! model's ([`crate::model::tokenize`]); this module adds the targets.

use candle_core::{Device, Tensor};
use tokenizers::Tokenizer;

use super::stsb::StsPair;
use super::tweeteval::TaskSplit;
use crate::model::multitask::PairTargets;
use crate::model::text::TextPrep;
use crate::model::tokenize::{self, Batch, Tokens};
use crate::ops::IGNORE_INDEX;

/// What an example is labelled with.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// A class index of a classification task.
    Class(usize),
    /// A sentence pair's second sentence and its similarity score (the
    /// example's `tokens` are the first sentence).
    Pair {
        /// The second sentence's tokens, unpadded.
        second: Tokens,
        /// The gold similarity score.
        score: f32,
    },
}

/// One tokenised, labelled row of one task.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// The text's tokens (a pair's first sentence), unpadded.
    pub tokens: Tokens,
    /// The index of the task the row belongs to.
    pub task: usize,
    /// Its class, or its pair's second sentence and score.
    pub target: Target,
}

impl Example {
    /// The class of a classification example, `None` for a pair.
    pub fn class(&self) -> Option<usize> {
        match self.target {
            Target::Class(c) => Some(c),
            Target::Pair { .. } => None,
        }
    }
}

/// A collated batch, on the model's device.
#[derive(Debug, Clone)]
pub struct LabelledBatch {
    /// The padded `[S, T]` token tensors: every row's (first) sentence in row
    /// order, then the pairs' second sentences.
    pub inputs: Batch,
    /// `[S, Hc]` i64: column `c` holds the class of classification task number
    /// `c` for its rows, [`IGNORE_INDEX`] elsewhere (and for every pair
    /// sentence).
    pub labels: Tensor,
    /// Each similarity task's pairs in the batch (tasks without pairs left out).
    pub pairs: Vec<PairTargets>,
}

/// Tokenises a classification split for task `task` with `tokenizer`'s
/// truncation (see [`tokenize::load_tokenizer`]), prepared as `text` says,
/// leaving padding to [`collate`].
pub fn tokenize_split(
    tokenizer: &Tokenizer,
    split: &TaskSplit,
    text: TextPrep,
    task: usize,
) -> anyhow::Result<Vec<Example>> {
    let tokens = tokenize::tokenize(tokenizer, &text.apply_all(&split.texts))?;
    Ok(tokens
        .into_iter()
        .zip(&split.labels)
        .map(|(tokens, &label)| Example {
            tokens,
            task,
            target: Target::Class(label),
        })
        .collect())
}

/// Tokenises sentence pairs for similarity task `task`.
pub fn tokenize_pairs(
    tokenizer: &Tokenizer,
    pairs: &[StsPair],
    text: TextPrep,
    task: usize,
) -> anyhow::Result<Vec<Example>> {
    let first: Vec<String> = pairs
        .iter()
        .map(|p| text.apply(&p.sentence1).into_owned())
        .collect();
    let second: Vec<String> = pairs
        .iter()
        .map(|p| text.apply(&p.sentence2).into_owned())
        .collect();
    let (first, second) = (
        tokenize::tokenize(tokenizer, &first)?,
        tokenize::tokenize(tokenizer, &second)?,
    );
    Ok(first
        .into_iter()
        .zip(second)
        .zip(pairs)
        .map(|((tokens, second), pair)| Example {
            tokens,
            task,
            target: Target::Pair {
                second,
                score: pair.score as f32,
            },
        })
        .collect())
}

/// Pads `rows` to the longest sentence among them ([`tokenize::pad`]) and adds
/// their targets. `columns[t]` is task `t`'s label column (`None` for a
/// similarity task; see [`label_columns`](crate::model::multitask::label_columns)).
pub fn collate(
    rows: &[&Example],
    columns: &[Option<usize>],
    pad_id: u32,
    device: &Device,
) -> anyhow::Result<LabelledBatch> {
    anyhow::ensure!(
        !rows.is_empty(),
        "collate: a batch needs at least one example"
    );
    let width = columns.iter().flatten().count();
    let mut tokens: Vec<&Tokens> = rows.iter().map(|r| &r.tokens).collect();
    // Per similarity task: (task, first rows, second rows, scores).
    #[allow(clippy::type_complexity)]
    let mut pairs: Vec<(usize, Vec<u32>, Vec<u32>, Vec<f32>)> = Vec::new();
    let mut labels = vec![IGNORE_INDEX; rows.len() * width];
    for (i, row) in rows.iter().enumerate() {
        let column = columns.get(row.task).copied().flatten();
        match (&row.target, column) {
            (Target::Class(class), Some(c)) => labels[i * width + c] = *class as i64,
            (Target::Pair { second, score }, None) => {
                let at = match pairs.iter().position(|p| p.0 == row.task) {
                    Some(at) => at,
                    None => {
                        pairs.push((row.task, Vec::new(), Vec::new(), Vec::new()));
                        pairs.len() - 1
                    }
                };
                pairs[at].1.push(i as u32);
                pairs[at].2.push(tokens.len() as u32);
                pairs[at].3.push(*score);
                tokens.push(second);
            }
            _ => anyhow::bail!(
                "collate: row {i} of task {} does not match that task's kind",
                row.task
            ),
        }
    }
    // Pair sentences are labelled for no classification task.
    labels.resize(tokens.len() * width, IGNORE_INDEX);
    let inputs = tokenize::pad(&tokens, pad_id, device)?;
    let pairs = pairs
        .into_iter()
        .map(
            |(task, first, second, scores)| -> anyhow::Result<PairTargets> {
                Ok(PairTargets {
                    task,
                    first: Tensor::new(first.as_slice(), device)?,
                    second: Tensor::new(second.as_slice(), device)?,
                    scores: Tensor::new(scores.as_slice(), device)?,
                })
            },
        )
        .collect::<anyhow::Result<_>>()?;
    Ok(LabelledBatch {
        inputs,
        labels: Tensor::from_vec(labels, (tokens.len(), width), device)?,
        pairs,
    })
}
