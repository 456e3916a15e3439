//! Inference over tokenised examples, the per-task evaluation of a split, and
//! a saved checkpoint's evaluation and predictions (what `sentence-mtl eval`
//! and `predict` print).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::checkpoint::LoadedCheckpoint;
use super::metrics::{ConfusionMatrix, TaskMetrics};
use crate::data::{collate, tokenize_split, Example, Split, TaskData};
use crate::model::multitask::{Freeze, Head, MultiTaskModel};
use crate::model::tokenize::{pad_id, tokenize};

/// Both heads' class probabilities for each row, in input order.
///
/// Rows are batched in order of length so that little padding is computed
/// (padding does not change a row's result: the mask keeps it out).
pub fn predict_probabilities(
    model: &MultiTaskModel,
    rows: &[&Example],
    pad_id: u32,
    batch_size: usize,
    device: &Device,
) -> anyhow::Result<Vec<[Vec<f32>; 2]>> {
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| rows[i].tokens.len());
    let mut out = vec![[Vec::new(), Vec::new()]; rows.len()];
    for chunk in order.chunks(batch_size.max(1)) {
        let batch_rows: Vec<&Example> = chunk.iter().map(|&i| rows[i]).collect();
        let batch = collate(&batch_rows, pad_id, device)?;
        let logits = model.forward(
            &batch.inputs.input_ids,
            Some(&batch.inputs.token_type_ids),
            &batch.inputs.attention_mask,
            false,
            Freeze::All,
        )?;
        let probs = [softmax_rows(&logits.a)?, softmax_rows(&logits.b)?];
        for (j, &i) in chunk.iter().enumerate() {
            out[i] = [probs[0][j].clone(), probs[1][j].clone()];
        }
    }
    Ok(out)
}

fn softmax_rows(logits: &Tensor) -> candle_core::Result<Vec<Vec<f32>>> {
    candle_nn::ops::softmax_last_dim(&logits.to_dtype(DType::F32)?)?.to_vec2::<f32>()
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
    /// The task's name (its data folder's).
    pub task: String,
    /// The head's label names, indexed by class.
    pub label_names: Vec<String>,
    /// Accuracy, macro-F1 and macro-recall of the head on its task's rows.
    pub metrics: TaskMetrics,
    /// Mean cross-entropy of the head on its task's rows.
    pub loss: f64,
    /// Counts of (true, predicted) classes.
    pub confusion: ConfusionMatrix,
}

/// Both tasks' results on a split.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    /// The split scored.
    pub split: Split,
    /// Head A's and head B's results.
    pub tasks: [TaskEval; 2],
}

/// Evaluates each head on its own task's examples of a split.
pub fn evaluate_split(
    model: &MultiTaskModel,
    split: Split,
    examples: [&[Example]; 2],
    tasks: &[TaskData; 2],
    pad_id: u32,
    batch_size: usize,
    device: &Device,
) -> anyhow::Result<EvalReport> {
    let eval_task = |head: Head| -> anyhow::Result<TaskEval> {
        let rows: Vec<&Example> = examples[head.index()].iter().collect();
        let task = &tasks[head.index()];
        anyhow::ensure!(
            !rows.is_empty(),
            "the {split} split of task '{}' has no examples",
            task.name
        );
        let probs = predict_probabilities(model, &rows, pad_id, batch_size, device)?;
        let labels: Vec<usize> = rows.iter().map(|r| r.label).collect();
        let own: Vec<&[f32]> = probs.iter().map(|p| p[head.index()].as_slice()).collect();
        let predictions: Vec<usize> = own.iter().map(|p| argmax(p)).collect();
        let loss = own
            .iter()
            .zip(&labels)
            .map(|(p, &l)| -(p[l].max(f32::MIN_POSITIVE) as f64).ln())
            .sum::<f64>()
            / labels.len() as f64;
        let confusion =
            ConfusionMatrix::new(model.num_classes()[head.index()], &labels, &predictions)?;
        Ok(TaskEval {
            task: task.name.clone(),
            label_names: task.label_names.clone(),
            metrics: confusion.metrics(),
            loss,
            confusion,
        })
    };
    Ok(EvalReport {
        split,
        tasks: [eval_task(Head::A)?, eval_task(Head::B)?],
    })
}

/// Scores a loaded checkpoint's heads on a split of their tasks, read from
/// `data` (one folder per task, named as in training). The tasks' label names
/// must be the checkpoint's.
pub fn evaluate_checkpoint(
    loaded: &LoadedCheckpoint,
    data: &Path,
    split: Split,
    batch_size: usize,
    device: &Device,
) -> anyhow::Result<EvalReport> {
    let info = &loaded.info;
    let tasks = [
        TaskData::open(data.join(&info.tasks[0]))?,
        TaskData::open(data.join(&info.tasks[1]))?,
    ];
    for (task, names) in tasks.iter().zip(&info.label_names) {
        anyhow::ensure!(
            &task.label_names == names,
            "{}: labels {:?} differ from the checkpoint's {:?}",
            task.dir.join("mapping.txt").display(),
            task.label_names,
            names
        );
    }
    let examples = [
        tokenize_split(&loaded.tokenizer, &tasks[0].load(split)?, Head::A)?,
        tokenize_split(&loaded.tokenizer, &tasks[1].load(split)?, Head::B)?,
    ];
    let pad = pad_id(&loaded.tokenizer);
    evaluate_split(
        &loaded.model,
        split,
        [&examples[0], &examples[1]],
        &tasks,
        pad,
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

/// Both heads' answers for one sentence.
#[derive(Debug, Serialize)]
pub struct Prediction {
    /// The sentence.
    pub text: String,
    /// By task name (e.g. `emotion`, `sentiment`).
    #[serde(flatten)]
    pub heads: BTreeMap<String, HeadPrediction>,
}

/// Both heads' predictions for each sentence, in input order.
pub fn predict(
    loaded: &LoadedCheckpoint,
    sentences: &[String],
    batch_size: usize,
    device: &Device,
) -> anyhow::Result<Vec<Prediction>> {
    let info = &loaded.info;
    let examples: Vec<Example> = tokenize(&loaded.tokenizer, sentences)?
        .into_iter()
        // The label is unused: prediction reads both heads.
        .map(|tokens| Example {
            tokens,
            head: Head::A,
            label: 0,
        })
        .collect();
    let rows: Vec<&Example> = examples.iter().collect();
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
            let heads = Head::BOTH
                .map(|head| {
                    let (p, names) = (&probs[head.index()], &info.label_names[head.index()]);
                    let prediction = HeadPrediction {
                        label: names[argmax(p)].clone(),
                        probabilities: names.iter().cloned().zip(p.iter().copied()).collect(),
                    };
                    (info.tasks[head.index()].clone(), prediction)
                })
                .into_iter()
                .collect();
            Prediction {
                text: text.clone(),
                heads,
            }
        })
        .collect())
}
