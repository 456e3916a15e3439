//! Everything a training run is configured by. [`TrainConfig::default`] is the
//! reference recipe the PyTorch baseline was measured with (see
//! `benchmarks/train_torch.py`).

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::optim::AdamWParams;
use crate::data::{SamplerKind, TaskKind};
use crate::model::multitask::Freeze;
use crate::model::text::{EmojiMode, TextPrep};
use crate::model::Pooling;

/// One task of a run: its name, folder, kind, weight in the total loss and
/// passes over its training split per epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// The task's name (names its head and its metrics).
    pub name: String,
    /// The task's data folder.
    pub dir: PathBuf,
    /// Classification (TweetEval layout) or sentence-pair similarity (STS-B).
    pub kind: TaskKind,
    /// `w_t` in `total = Σ_t w_t·loss_t`.
    pub weight: f64,
    /// How many times an epoch visits each of the task's training examples:
    /// above 1 oversamples a small task (more of its batches per epoch).
    #[serde(default = "one_pass")]
    pub passes: usize,
}

fn mean_pooling() -> Pooling {
    Pooling::Mean
}

/// Checkpoints from before `passes` existed ran one pass per epoch.
fn one_pass() -> usize {
    1
}

impl TaskSpec {
    /// A classification task named after its folder's last component, weight 1.
    pub fn classification(dir: impl Into<PathBuf>) -> Self {
        Self::of(dir.into(), TaskKind::Classification)
    }

    fn of(dir: PathBuf, kind: TaskKind) -> Self {
        let name = folder_name(&dir);
        Self {
            name,
            dir,
            kind,
            weight: 1.0,
            passes: 1,
        }
    }
}

fn folder_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl FromStr for TaskSpec {
    type Err = String;

    /// `NAME=DIR[:KIND]` or `DIR[:KIND]` (named after the folder), KIND
    /// `classification` (the default) or `sts`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, rest) = match s.split_once('=') {
            Some((name, rest)) => (Some(name), rest),
            None => (None, s),
        };
        let (dir, kind) = match rest.rsplit_once(':') {
            Some((dir, kind)) => {
                let kind = <TaskKind as clap::ValueEnum>::from_str(kind, true).map_err(|_| {
                    format!("task {s:?}: unknown kind {kind:?} (expected classification or sts)")
                })?;
                (dir, kind)
            }
            None => (rest, TaskKind::Classification),
        };
        if dir.is_empty() {
            return Err(format!("task {s:?}: no folder (expected NAME=DIR[:KIND])"));
        }
        let mut spec = Self::of(PathBuf::from(dir), kind);
        if let Some(name) = name {
            spec.name = name.to_string();
        }
        Ok(spec)
    }
}

fn one() -> f64 {
    1.0
}

/// How classification tasks weigh their classes in the loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ClassWeighting {
    /// Every class weighs 1: the mean over the labelled rows.
    #[default]
    None,
    /// scikit-learn's "balanced": class `c` weighs `n / (k · n_c)` on the
    /// task's training split, so each class counts as much in all.
    Balanced,
}

impl ClassWeighting {
    /// The class weights for a training split's `labels` of `classes` classes
    /// (`None` for unit weights). A class absent from the split weighs 0.
    pub fn weights(self, labels: &[usize], classes: usize) -> Option<Vec<f64>> {
        match self {
            ClassWeighting::None => None,
            ClassWeighting::Balanced => {
                let mut counts = vec![0usize; classes];
                for &l in labels {
                    counts[l] += 1;
                }
                let n = labels.len() as f64;
                Some(
                    counts
                        .iter()
                        .map(|&c| {
                            if c == 0 {
                                0.0
                            } else {
                                n / (classes as f64 * c as f64)
                            }
                        })
                        .collect(),
                )
            }
        }
    }
}

/// The settings of one training run (saved with its checkpoint); the default is
/// the reference recipe. Check it with [`validate`](Self::validate).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The tasks, in order (the first two are the two-task command's head A
    /// and head B).
    pub tasks: Vec<TaskSpec>,
    /// A local model folder or a Hugging Face repo id.
    pub model: String,
    /// Where checkpoints, metrics and plots go; `None` writes nothing.
    pub output_dir: Option<PathBuf>,
    /// Which parts of the model do not train (default: none).
    pub freeze: Freeze,
    /// Passes over both training sets (at least 1); the learning-rate schedule spans
    /// all of them.
    pub epochs: usize,
    /// Rows per training batch, drawn from the tasks by `sampler`.
    pub batch_size: usize,
    /// Rows per forward pass when evaluating; a resumed run may change it.
    pub eval_batch_size: usize,
    /// Truncation length in tokens, special tokens included.
    pub max_len: usize,
    /// Peak AdamW learning rate of the backbone (embeddings and encoder layers).
    pub backbone_lr: f64,
    /// Peak AdamW learning rate of the classification heads.
    pub head_lr: f64,
    /// Layer-wise learning-rate decay: the top encoder layer trains at
    /// `backbone_lr`, each layer below at this times the rate of the one
    /// above, the embeddings below the lowest layer (1 = one rate for all).
    #[serde(default = "one")]
    pub layer_decay: f64,
    /// AdamW's decoupled weight decay, for every trained parameter unless
    /// `decay_bias_and_norm` exempts it.
    pub weight_decay: f64,
    /// Whether biases and LayerNorm weights get weight decay too (the recipe:
    /// yes; `false` is the BERT paper's exemption).
    pub decay_bias_and_norm: bool,
    /// AdamW's betas and epsilon, shared by all parameter groups.
    pub adam: AdamWParams,
    /// Fraction of all optimiser steps spent warming up linearly.
    pub warmup_ratio: f64,
    /// Clip the global gradient norm to this (off when `None`).
    pub max_grad_norm: Option<f64>,
    /// How each epoch's batches are drawn from the two tasks.
    pub sampler: SamplerKind,
    /// Seeds the heads' initialisation, the batch order, dropout and the overfit
    /// batch's pick.
    pub seed: u64,
    /// How classification tasks weigh their classes.
    pub class_weighting: ClassWeighting,
    /// Label smoothing of every classification task's cross-entropy, in
    /// `[0, 1]` (0: the one-hot target, the recipe's; runs from before this
    /// setting had none).
    #[serde(default)]
    pub label_smoothing: f64,
    /// Dropout probability on the pooled vector the classification heads
    /// read, in training, in `[0, 1)` (0: none, the recipe's; runs from before
    /// this setting had none).
    #[serde(default)]
    pub head_dropout: f64,
    /// How the model pools token states into the sentence vector its heads
    /// (and similarity tasks) read; runs from before this setting used mean.
    #[serde(default = "mean_pooling")]
    pub pooling: Pooling,
    /// What happens to emoji before tokenisation (runs from before this
    /// setting kept them).
    #[serde(default)]
    pub emoji: EmojiMode,
    /// Undo escapes (`\n`, `\u2019`, `&amp;`) before tokenisation.
    #[serde(default)]
    pub unescape: bool,
    /// Split camel-cased hashtags into words before tokenisation.
    #[serde(default)]
    pub split_hashtags: bool,
    /// Write ASCII emoticons as their emoji's names before tokenisation.
    #[serde(default)]
    pub emoticons: bool,
    /// Write a letter repeated three or more times twice before tokenisation.
    #[serde(default)]
    pub shorten_elongations: bool,
    /// Stop after this many optimiser steps in all (a checkpoint is written at
    /// the stop); the schedule is still that of the full run, so `--resume`
    /// carries on as if it had not stopped.
    pub max_steps: Option<usize>,
    /// Also write a checkpoint every this many steps (besides each epoch's end).
    pub checkpoint_every: Option<usize>,
    /// Overfit mode: memorise one mixed batch instead of training.
    pub overfit: Option<OverfitConfig>,
    /// Evaluate on the test splits after training.
    pub test_at_end: bool,
    /// Keep the epoch whose validation scores are best (the mean over the
    /// tasks of macro-F1, or Spearman/100 for a similarity task): its weights
    /// are restored after the last epoch, tested, and saved in `best/`.
    #[serde(default)]
    pub best_epoch: bool,
    /// Keep an exponential moving average of the weights, updated after every
    /// step (`avg = d·avg + (1 − d)·weights`, in f32, starting from the
    /// initial weights), and validate, test and keep it instead of the
    /// weights the steps reach (saved in `ema/`; the checkpoint keeps the
    /// trained weights and the average, to resume from). `None`: off.
    #[serde(default)]
    pub ema_decay: Option<f64>,
    /// Progress bar (terminals only) and log lines on stderr.
    pub verbose: bool,
    /// Carry on from the checkpoint in `output_dir`.
    pub resume: bool,
}

/// Overfit mode: train on one batch (the classification tasks' rows in equal
/// shares; similarity tasks sit it out) at a constant
/// learning rate for a fixed number of steps, recording accuracy and loss on
/// the batch after each.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OverfitConfig {
    /// Rows in the batch (at least one per classification task): `n / k` from
    /// each of the `k` classification tasks, the first ones one more while
    /// `n mod k` rows are left.
    pub batch_size: usize,
    /// The steps to take, all of them (memorised is judged after the last).
    pub max_steps: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            tasks: Self::tweeteval_tasks(Path::new("data/tweeteval"), "emotion", "sentiment"),
            model: crate::model::DEFAULT_MODEL.into(),
            output_dir: None,
            freeze: Freeze::None,
            epochs: 3,
            batch_size: 32,
            eval_batch_size: 64,
            max_len: 64,
            backbone_lr: 5e-5,
            head_lr: 1e-3,
            layer_decay: 1.0,
            weight_decay: 0.01,
            decay_bias_and_norm: true,
            adam: AdamWParams::default(),
            warmup_ratio: 0.06,
            max_grad_norm: None,
            sampler: SamplerKind::Proportional,
            seed: 42,
            class_weighting: ClassWeighting::None,
            label_smoothing: 0.0,
            head_dropout: 0.0,
            pooling: Pooling::Mean,
            emoji: EmojiMode::Keep,
            unescape: false,
            split_hashtags: false,
            emoticons: false,
            shorten_elongations: false,
            max_steps: None,
            checkpoint_every: None,
            overfit: None,
            test_at_end: true,
            best_epoch: false,
            ema_decay: None,
            verbose: true,
            resume: false,
        }
    }
}

impl TrainConfig {
    /// The two-task command's tasks: the classification folders `data/a` and
    /// `data/b`, weight 1 each.
    pub fn tweeteval_tasks(data: &Path, a: &str, b: &str) -> Vec<TaskSpec> {
        vec![
            TaskSpec::classification(data.join(a)),
            TaskSpec::classification(data.join(b)),
        ]
    }

    /// Checks that the settings make a run: counts and sizes at least 1 (`max_len`
    /// at least 2, the overfit batch at least 2), learning rates and loss weights
    /// finite and non-negative, `weight_decay` non-negative, `warmup_ratio` and
    /// `label_smoothing` in [0, 1], `head_dropout` in [0, 1), a positive `max_grad_norm`, and `output_dir` set when `resume` is;
    /// the error names the first setting at fault.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.epochs >= 1, "epochs must be at least 1");
        anyhow::ensure!(
            self.batch_size >= 1 && self.eval_batch_size >= 1,
            "batch sizes must be at least 1"
        );
        anyhow::ensure!(
            self.max_len >= 2,
            "max_len must be at least 2 ([CLS] and [SEP])"
        );
        for (name, lr) in [("backbone_lr", self.backbone_lr), ("head_lr", self.head_lr)] {
            anyhow::ensure!(
                lr.is_finite() && lr >= 0.0,
                "{name} must be a finite non-negative number, got {lr}"
            );
        }
        anyhow::ensure!(
            self.layer_decay > 0.0 && self.layer_decay <= 1.0,
            "layer_decay must be in (0, 1], got {}",
            self.layer_decay
        );
        anyhow::ensure!(
            self.weight_decay >= 0.0,
            "weight_decay must be non-negative"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.warmup_ratio),
            "warmup_ratio must be in [0, 1]"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.label_smoothing),
            "label_smoothing must be in [0, 1], got {}",
            self.label_smoothing
        );
        anyhow::ensure!(
            (0.0..1.0).contains(&self.head_dropout),
            "head_dropout must be in [0, 1), got {}",
            self.head_dropout
        );
        if let Some(norm) = self.max_grad_norm {
            anyhow::ensure!(norm > 0.0, "max_grad_norm must be positive");
        }
        if let Some(decay) = self.ema_decay {
            anyhow::ensure!(
                decay > 0.0 && decay < 1.0,
                "ema_decay must be in (0, 1), got {decay}"
            );
            anyhow::ensure!(
                self.overfit.is_none(),
                "ema_decay does not apply to overfit mode (it judges the trained weights)"
            );
        }
        anyhow::ensure!(!self.tasks.is_empty(), "a run needs at least one task");
        for (i, task) in self.tasks.iter().enumerate() {
            anyhow::ensure!(
                task.weight.is_finite() && task.weight >= 0.0,
                "task {}: the loss weight must be non-negative, got {}",
                task.name,
                task.weight
            );
            anyhow::ensure!(
                task.passes >= 1,
                "task {}: the passes per epoch must be at least 1",
                task.name
            );
            anyhow::ensure!(
                self.tasks[..i].iter().all(|t| t.name != task.name),
                "two tasks are named {:?}: name them with NAME=DIR",
                task.name
            );
        }
        if let Some(o) = self.overfit {
            anyhow::ensure!(
                o.batch_size >= self.tasks.len().max(1),
                "the overfit batch needs at least one row per task"
            );
            anyhow::ensure!(o.max_steps >= 1, "overfit mode needs at least one step");
        }
        anyhow::ensure!(
            !self.resume || self.output_dir.is_some(),
            "--resume needs --output, the folder to resume from"
        );
        Ok(())
    }

    /// How texts are prepared for the tokenizer in this run (and by its
    /// checkpoint's `eval` and `predict`).
    pub fn text_prep(&self) -> TextPrep {
        TextPrep {
            emoji: self.emoji,
            unescape: self.unescape,
            split_hashtags: self.split_hashtags,
            emoticons: self.emoticons,
            shorten_elongations: self.shorten_elongations,
        }
    }

    /// The fields that shape the training trajectory; a resumed run must agree
    /// with its checkpoint on all of them to carry on the same run.
    pub fn trajectory_differences(&self, saved: &TrainConfig) -> Vec<String> {
        let strip = |c: &TrainConfig| {
            let mut c = c.clone();
            for task in &mut c.tasks {
                task.dir = PathBuf::new();
            }
            c.model = String::new();
            c.output_dir = None;
            c.max_steps = None;
            c.checkpoint_every = None;
            c.eval_batch_size = 0;
            c.test_at_end = false;
            c.best_epoch = false;
            c.verbose = false;
            c.resume = false;
            serde_json::to_value(c).expect("config to JSON")
        };
        let (now, then) = (strip(self), strip(saved));
        let (serde_json::Value::Object(now), serde_json::Value::Object(then)) = (now, then) else {
            unreachable!("a struct serialises to an object")
        };
        now.iter()
            .filter(|(k, v)| then.get(*k) != Some(v))
            .map(|(k, v)| {
                format!(
                    "{k}: checkpoint has {}, now {v}",
                    then.get(k).unwrap_or(&serde_json::Value::Null)
                )
            })
            .collect()
    }
}
