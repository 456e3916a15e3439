//! What a run records (each step, each epoch, overfit mode, the final report)
//! and the training plots drawn from those records with [`crate::plots`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::metrics::TaskScores;
use crate::model::Freeze;
use crate::plots::{line_chart, moving_average, Series};

/// One optimiser step's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Steps taken, this one included.
    pub step: usize,
    /// 1-based epoch.
    pub epoch: usize,
    /// Each task's loss on the batch, in task order; `None` when the batch had
    /// no row of it.
    /// (The records are f32, which JSON carries exactly, so that a resumed run's
    /// history equals an uninterrupted one's.)
    pub loss: Vec<Option<f32>>,
    /// The weighted sum of the tasks' losses that the step minimised.
    pub total: f32,
    /// The learning-rate factor this step used.
    pub lr_factor: f32,
    /// The global gradient norm before clipping (measured when clipping).
    pub grad_norm: Option<f32>,
}

/// One epoch's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: usize,
    /// Steps taken when the epoch ended.
    pub global_step: usize,
    /// Each task's mean batch loss over the epoch.
    pub train_loss: Vec<Option<f64>>,
    /// Each task's scores on its validation split after the epoch.
    pub val: Vec<TaskScores>,
    /// Each task's loss on its validation split after the epoch (mean
    /// cross-entropy, or CoSENT over all the split's pairs).
    pub val_loss: Vec<f64>,
    /// Wall time of the epoch's training steps (validation excluded).
    pub train_seconds: f64,
}

/// What a checkpoint remembers of the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Steps taken so far.
    pub global_step: usize,
    /// Every step's record, in order.
    pub steps: Vec<StepRecord>,
    /// Every completed epoch's record, in order.
    pub epochs: Vec<EpochRecord>,
    /// Wall time of all training steps so far.
    pub train_seconds: f64,
}

/// Overfit mode's outcome. The batch counts as memorised when, after the
/// whole step budget, every classification head gets every row right and the total
/// loss (eval mode) is below [`MEMORISED_LOSS`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OverfitReport {
    /// Rows in the memorised batch.
    pub batch_size: usize,
    /// The classification tasks the batch is drawn from, in task order.
    pub tasks: Vec<String>,
    /// Each of those heads' accuracy on its rows of the batch before training.
    pub initial_accuracy: Vec<f64>,
    /// The total loss on the batch before training (eval mode).
    pub initial_loss: f64,
    /// Every head at 100% and the total loss below [`MEMORISED_LOSS`] after
    /// the last step.
    pub memorised: bool,
    /// The first step after which both held.
    pub memorised_at: Option<usize>,
    /// Steps taken: the whole budget.
    pub steps: usize,
    /// Each head's accuracy on its rows of the batch after each step (eval mode).
    pub accuracy: Vec<Vec<f64>>,
    /// Each head's loss on the batch at each step (training mode, dropout on).
    pub loss: Vec<Vec<Option<f32>>>,
    /// The total loss on the batch after each step (eval mode: the sum over the
    /// heads of each head's mean cross-entropy on its rows).
    pub eval_loss: Vec<f64>,
}

/// The total loss below which overfit mode counts a batch as memorised.
pub const MEMORISED_LOSS: f64 = 0.05;

/// The outcome of `train()`, printed as one JSON line by `sentence-mtl train`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainReport {
    /// The tasks' names, in order.
    pub tasks: Vec<String>,
    /// What did not train.
    pub freeze: Freeze,
    /// Optimiser steps taken in all (a resumed run's earlier ones included).
    pub steps: usize,
    /// Epochs run to their end.
    pub epochs_completed: usize,
    /// `max_steps` stopped the run before its last epoch ended.
    pub stopped_early: bool,
    /// With `best_epoch`: the epoch whose weights were kept (and tested).
    #[serde(default)]
    pub best_epoch: Option<usize>,
    /// Wall time of all training steps (evaluation excluded).
    pub train_seconds: f64,
    /// Mean wall time of a step; `None` when no step was taken.
    pub seconds_per_step: Option<f64>,
    /// Validation metrics after the last completed epoch, by task.
    pub val: Option<BTreeMap<String, TaskScores>>,
    /// Test metrics at the end, by task.
    pub test: Option<BTreeMap<String, TaskScores>>,
    /// Overfit mode's outcome, in that mode.
    pub overfit: Option<OverfitReport>,
    /// The checkpoint written, when there is an output folder.
    pub checkpoint: Option<PathBuf>,
}

/// Writes `loss.png`, `val_metrics.png` (when an epoch ended) and, in overfit
/// mode, `overfit_accuracy.png` and `overfit_loss.png` into `out`; returns the
/// files written.
pub fn training_plots(
    out: &Path,
    tasks: &[String],
    state: &TrainState,
    overfit: Option<&OverfitReport>,
) -> anyhow::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    if !state.steps.is_empty() {
        let series: Vec<Series> = (0..tasks.len())
            .map(|h| {
                let raw: Vec<(f64, f64)> = state
                    .steps
                    .iter()
                    .filter_map(|s| {
                        s.loss
                            .get(h)
                            .copied()
                            .flatten()
                            .map(|l| (s.step as f64, l as f64))
                    })
                    .collect();
                Series {
                    label: tasks[h].clone(),
                    points: moving_average(&raw, (raw.len() / 50).max(1)),
                }
            })
            .collect();
        let path = out.join("loss.png");
        line_chart(
            &path,
            "Training loss per task (moving average)",
            "step",
            "loss",
            &series,
        )?;
        written.push(path);
    }
    if !state.epochs.is_empty() {
        let mut series = Vec::new();
        for (h, task) in tasks.iter().enumerate() {
            let metrics = state.epochs[0].val.get(h).map_or(0, |v| v.named().len());
            for m in 0..metrics {
                let metric = state.epochs[0].val[h].named()[m].0;
                let points = state
                    .epochs
                    .iter()
                    .filter_map(|e| Some((e.epoch as f64, e.val.get(h)?.named().get(m)?.1)))
                    .collect();
                series.push(Series {
                    label: format!("{task} {metric}"),
                    points,
                });
            }
        }
        let path = out.join("val_metrics.png");
        line_chart(
            &path,
            "Validation metrics per epoch",
            "epoch",
            "score",
            &series,
        )?;
        written.push(path);
    }
    if let Some(report) = overfit {
        let series: Vec<Series> = (0..report.tasks.len())
            .map(|h| {
                // Step 0 is the batch before training.
                let after_steps = report
                    .accuracy
                    .iter()
                    .enumerate()
                    .map(|(i, a)| ((i + 1) as f64, a[h]));
                let points = std::iter::once((0.0, report.initial_accuracy[h]))
                    .chain(after_steps)
                    .collect();
                Series {
                    label: format!("{} accuracy", report.tasks[h]),
                    points,
                }
            })
            .collect();
        let path = out.join("overfit_accuracy.png");
        line_chart(
            &path,
            "Overfit batch: accuracy after each step",
            "step",
            "accuracy",
            &series,
        )?;
        written.push(path);
        let points = std::iter::once((0.0, report.initial_loss))
            .chain(
                report
                    .eval_loss
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| ((i + 1) as f64, l)),
            )
            .collect();
        let path = out.join("overfit_loss.png");
        line_chart(
            &path,
            "Overfit batch: total loss after each step (eval mode)",
            "step",
            "loss",
            &[Series {
                label: "loss".into(),
                points,
            }],
        )?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_plots_draw_the_loss_of_each_head() {
        let dir = std::env::temp_dir().join(format!("sentence-mtl-records-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let steps = (1..=40)
            .map(|step| StepRecord {
                step,
                epoch: 1,
                loss: vec![
                    Some(1.5 / step as f32),
                    (step % 3 != 0).then_some(1.0 / step as f32),
                ],
                total: 2.0,
                lr_factor: 1.0,
                grad_norm: None,
            })
            .collect();
        let state = TrainState {
            global_step: 40,
            steps,
            epochs: Vec::new(),
            train_seconds: 1.0,
        };
        let written =
            training_plots(&dir, &["emotion".into(), "sentiment".into()], &state, None).unwrap();
        assert_eq!(written, vec![dir.join("loss.png")]);
        assert!(std::fs::read(&written[0]).unwrap().starts_with(b"\x89PNG"));

        std::fs::remove_dir_all(&dir).unwrap();
    }
}
