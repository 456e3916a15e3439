//! Inference over tokenised sentences, the per-task evaluation of a split, and
//! a saved checkpoint's evaluation and predictions (what `sentence-mtl eval`
//! and `predict` print).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::checkpoint::LoadedCheckpoint;
use super::metrics::{ConfusionMatrix, TaskScores};
use super::sts::sts_report;
use crate::data::{Example, Split, Target, TaskKind, TaskSource};
use crate::model::multitask::{Freeze, HeadKind, MultiTaskModel, COSENT_SCALE};
use crate::model::tokenize::{pad, pad_id, tokenize, Tokens};

/// Runs the model over `rows` in batches, in order of length so that little
/// padding is computed (padding does not change a row's result: the mask
/// keeps it out), and gives each row's `(pooled embedding, class
/// probabilities of every task)`, in input order; a similarity task's
/// probabilities are empty.
#[allow(clippy::type_complexity)]
fn run_rows(
    model: &MultiTaskModel,
    rows: &[&Tokens],
    pad_id: u32,
    batch_size: usize,
    device: &Device,
    want_embeddings: bool,
) -> anyhow::Result<(Vec<Vec<f32>>, Vec<Vec<Vec<f32>>>)> {
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| rows[i].len());
    let tasks = model.tasks().len();
    let mut embeddings = vec![Vec::new(); if want_embeddings { rows.len() } else { 0 }];
    let mut probs = vec![vec![Vec::new(); tasks]; rows.len()];
    for chunk in order.chunks(batch_size.max(1)) {
        let batch_rows: Vec<&Tokens> = chunk.iter().map(|&i| rows[i]).collect();
        let batch = pad(&batch_rows, pad_id, device)?;
        let outputs = model.forward(
            &batch.input_ids,
            Some(&batch.token_type_ids),
            &batch.attention_mask,
            false,
            &Freeze::All,
        )?;
        if want_embeddings {
            let pooled = outputs.pooled.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            for (j, &i) in chunk.iter().enumerate() {
                embeddings[i] = pooled[j].clone();
            }
        }
        #[allow(clippy::needless_range_loop)]
        for t in 0..tasks {
            if let Some(logits) = model.task_logits(&outputs, t)? {
                let p = softmax_rows(&logits)?;
                for (j, &i) in chunk.iter().enumerate() {
                    probs[i][t] = p[j].clone();
                }
            }
        }
    }
    Ok((embeddings, probs))
}

/// Every task's class probabilities for each row, in input order:
/// `[row][task][class]` (empty for a similarity task).
pub fn predict_probabilities(
    model: &MultiTaskModel,
    rows: &[&Tokens],
    pad_id: u32,
    batch_size: usize,
    device: &Device,
) -> anyhow::Result<Vec<Vec<Vec<f32>>>> {
    Ok(run_rows(model, rows, pad_id, batch_size, device, false)?.1)
}

/// Each row's pooled embedding (f32), in input order.
pub fn embed_rows(
    model: &MultiTaskModel,
    rows: &[&Tokens],
    pad_id: u32,
    batch_size: usize,
    device: &Device,
) -> anyhow::Result<Vec<Vec<f32>>> {
    Ok(run_rows(model, rows, pad_id, batch_size, device, true)?.0)
}

fn softmax_rows(logits: &Tensor) -> candle_core::Result<Vec<Vec<f32>>> {
    candle_nn::ops::softmax_last_dim(&logits.to_dtype(DType::F32)?.contiguous()?)?.to_vec2::<f32>()
}

/// The index of the largest value (the first one on ties).
pub fn argmax(values: &[f32]) -> usize {
    values
        .iter()
        .enumerate()
        .fold(0, |best, (i, &v)| if v > values[best] { i } else { best })
}

/// One task's results on a split.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskEval {
    /// The task's name.
    pub task: String,
    /// A classification head's label names, indexed by class (empty for a
    /// similarity task).
    pub label_names: Vec<String>,
    /// Accuracy, macro-F1 and macro-recall, or Spearman and Pearson.
    pub metrics: TaskScores,
    /// Mean cross-entropy on the task's rows, or CoSENT over all its pairs.
    pub loss: f64,
    /// Counts of (true, predicted) classes (classification tasks).
    pub confusion: Option<ConfusionMatrix>,
}

/// Every task's results on a split.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    /// The split scored.
    pub split: Split,
    /// The tasks' results, in task order.
    pub tasks: Vec<TaskEval>,
}

/// Evaluates each task on its own examples of a split: `examples[t]` and
/// `label_names[t]` for task `t` of the model.
pub fn evaluate_split(
    model: &MultiTaskModel,
    split: Split,
    examples: &[&[Example]],
    label_names: &[Vec<String>],
    pad_id: u32,
    batch_size: usize,
    device: &Device,
) -> anyhow::Result<EvalReport> {
    let tasks = model.tasks();
    anyhow::ensure!(
        examples.len() == tasks.len() && label_names.len() == tasks.len(),
        "evaluate_split: {} example sets and {} label lists for {} tasks",
        examples.len(),
        label_names.len(),
        tasks.len()
    );
    let mut results = Vec::with_capacity(tasks.len());
    for (t, task) in tasks.iter().enumerate() {
        let rows = examples[t];
        anyhow::ensure!(
            !rows.is_empty(),
            "the {split} split of task '{}' has no examples",
            task.name
        );
        let eval = match task.kind {
            HeadKind::Classification { classes } => {
                let tokens: Vec<&Tokens> = rows.iter().map(|r| &r.tokens).collect();
                let probs = predict_probabilities(model, &tokens, pad_id, batch_size, device)?;
                let labels: Vec<usize> = rows
                    .iter()
                    .map(|r| {
                        r.class()
                            .expect("a classification task's rows have classes")
                    })
                    .collect();
                let own: Vec<&[f32]> = probs.iter().map(|p| p[t].as_slice()).collect();
                let predictions: Vec<usize> = own.iter().map(|p| argmax(p)).collect();
                let loss = own
                    .iter()
                    .zip(&labels)
                    .map(|(p, &l)| -(p[l].max(f32::MIN_POSITIVE) as f64).ln())
                    .sum::<f64>()
                    / labels.len() as f64;
                let confusion = ConfusionMatrix::new(classes, &labels, &predictions)?;
                TaskEval {
                    task: task.name.clone(),
                    label_names: label_names[t].clone(),
                    metrics: TaskScores::Classification(confusion.metrics()),
                    loss,
                    confusion: Some(confusion),
                }
            }
            HeadKind::Similarity => {
                let (cosines, scores) = pair_cosines(model, rows, pad_id, batch_size, device)?;
                TaskEval {
                    task: task.name.clone(),
                    label_names: Vec::new(),
                    metrics: TaskScores::Similarity(sts_report(&cosines, &scores)?),
                    loss: cosent_f64(&cosines, &scores),
                    confusion: None,
                }
            }
        };
        results.push(eval);
    }
    Ok(EvalReport {
        split,
        tasks: results,
    })
}

/// The cosine of each pair's pooled embeddings, and its gold score.
fn pair_cosines(
    model: &MultiTaskModel,
    rows: &[Example],
    pad_id: u32,
    batch_size: usize,
    device: &Device,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let mut tokens: Vec<&Tokens> = Vec::with_capacity(2 * rows.len());
    let mut scores = Vec::with_capacity(rows.len());
    for row in rows {
        let Target::Pair { second, score } = &row.target else {
            anyhow::bail!("a similarity task's rows must be sentence pairs");
        };
        tokens.push(&row.tokens);
        tokens.push(second);
        scores.push(*score as f64);
    }
    let embeddings = embed_rows(model, &tokens, pad_id, batch_size, device)?;
    let cosines = embeddings
        .chunks(2)
        .map(|pair| cosine_f64(&pair[0], &pair[1]))
        .collect();
    Ok((cosines, scores))
}

fn cosine_f64(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb).max(1e-12)
}

/// CoSENT over all pairs of a split, in f64 (a stable log-sum-exp).
fn cosent_f64(cosines: &[f64], scores: &[f64]) -> f64 {
    let mut terms = vec![0.0];
    for (i, (&ci, &si)) in cosines.iter().zip(scores).enumerate() {
        for (j, (&cj, &sj)) in cosines.iter().zip(scores).enumerate() {
            if i != j && si > sj {
                terms.push(COSENT_SCALE * (cj - ci));
            }
        }
    }
    let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    max + terms.iter().map(|t| (t - max).exp()).sum::<f64>().ln()
}

/// Scores a loaded checkpoint's tasks on a split. Each task's folder is the
/// one it trained on, or, with `data`, the folder of the same name in `data`
/// (TweetEval's layout: one folder per task). A classification task's label
/// names must be the checkpoint's.
pub fn evaluate_checkpoint(
    loaded: &LoadedCheckpoint,
    data: Option<&Path>,
    split: Split,
    batch_size: usize,
    device: &Device,
) -> anyhow::Result<EvalReport> {
    let info = &loaded.info;
    let mut examples = Vec::with_capacity(info.tasks.len());
    for (t, (task, spec)) in info.tasks.iter().zip(&info.config.tasks).enumerate() {
        let dir = match data {
            Some(data) => data.join(spec.dir.file_name().unwrap_or(spec.name.as_ref())),
            None => spec.dir.clone(),
        };
        let kind = match task.kind {
            HeadKind::Classification { .. } => TaskKind::Classification,
            HeadKind::Similarity => TaskKind::Sts,
        };
        let source = TaskSource::open(kind, &dir)?;
        anyhow::ensure!(
            source.label_names() == info.label_names[t].as_slice(),
            "{}: labels {:?} differ from the checkpoint's {:?}",
            dir.join("mapping.txt").display(),
            source.label_names(),
            info.label_names[t]
        );
        examples.push(source.load(split)?.tokenize(
            &loaded.tokenizer,
            info.config.text_prep(),
            t,
        )?);
    }
    let views: Vec<&[Example]> = examples.iter().map(Vec::as_slice).collect();
    evaluate_split(
        &loaded.model,
        split,
        &views,
        &info.label_names,
        pad_id(&loaded.tokenizer),
        batch_size,
        device,
    )
}

/// One head's answer for one sentence.
#[derive(Debug, Serialize)]
pub struct HeadPrediction {
    /// The most probable class.
    pub label: String,
    /// Each class's probability, by name.
    pub probabilities: BTreeMap<String, f32>,
}

/// Every classification head's answer for one sentence.
#[derive(Debug, Serialize)]
pub struct Prediction {
    /// The sentence.
    pub text: String,
    /// By task name (e.g. `emotion`, `sentiment`).
    #[serde(flatten)]
    pub heads: BTreeMap<String, HeadPrediction>,
}

/// Every classification head's prediction for each sentence, in input order.
pub fn predict(
    loaded: &LoadedCheckpoint,
    sentences: &[String],
    batch_size: usize,
    device: &Device,
) -> anyhow::Result<Vec<Prediction>> {
    let info = &loaded.info;
    let tokens = tokenize(
        &loaded.tokenizer,
        &info.config.text_prep().apply_all(sentences),
    )?;
    let rows: Vec<&Tokens> = tokens.iter().collect();
    let probs = predict_probabilities(
        &loaded.model,
        &rows,
        pad_id(&loaded.tokenizer),
        batch_size,
        device,
    )?;
    Ok(sentences
        .iter()
        .zip(probs)
        .map(|(text, probs)| {
            let heads = info
                .tasks
                .iter()
                .enumerate()
                .filter(|(_, task)| task.classes().is_some())
                .map(|(t, task)| {
                    let (p, names) = (&probs[t], &info.label_names[t]);
                    let prediction = HeadPrediction {
                        label: names[argmax(p)].clone(),
                        probabilities: names.iter().cloned().zip(p.iter().copied()).collect(),
                    };
                    (task.name.clone(), prediction)
                })
                .collect();
            Prediction {
                text: text.clone(),
                heads,
            }
        })
        .collect())
}
