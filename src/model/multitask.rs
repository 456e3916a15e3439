//! The multi-task model: our BERT encoder, masked mean pooling (the fused op)
//! and one head per task. A task is either a classification task, with a linear
//! head of its own over the pooled embedding, or a sentence-pair similarity
//! task, which has no head: its loss is CoSENT on the cosine of the two
//! sentences' pooled embeddings, so it trains the embedding itself.
//!
//! All classification heads run as one linear layer (their weights stacked,
//! `[ΣC, H]`), and their losses are one fused op,
//! [`multi_head_cross_entropy`](crate::ops::multi_head_cross_entropy()): the heads' logits side by side, one column of
//! labels per head, [`IGNORE_INDEX`](crate::ops::IGNORE_INDEX) where a row is
//! not labelled for a head. The total is `Σ_t w_t · loss_t` over every task.
//!
//! [`Freeze`] decides what trains. Frozen parameters are never handed to the
//! optimiser, and the graph is cut where it enters the trainable part, so no
//! gradient is computed for them at all: the encoder detaches the hidden state
//! leaving its frozen lower part, and a frozen head is applied with detached
//! weights (the loss still reaches the backbone through it).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;

use anyhow::Context;
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::bert::BertEncoder;
use super::layers::{Dropout, Pass};
use super::pooling::pool;
use super::{load_trainable, ModelFiles, Pooling};
use crate::ops::multi_head_cross_entropy::{multi_head_cross_entropy_deferred, CeHead, LabelCheck};

/// What a task trains: a classifier head, or the embedding's similarities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum HeadKind {
    /// A linear head of `classes` outputs, trained with cross-entropy.
    Classification {
        /// The number of classes (at least 1).
        classes: usize,
    },
    /// Sentence pairs with a similarity score: no head, the CoSENT loss on the
    /// cosine of the pair's pooled embeddings.
    Similarity,
}

/// One task of the model: its name (which names its parameters) and kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskHead {
    /// The task's name: letters, digits, `_` and `-`.
    pub name: String,
    /// Classification (with its class count) or similarity.
    #[serde(flatten)]
    pub kind: HeadKind,
}

impl TaskHead {
    /// A classification task of `classes` classes.
    pub fn classification(name: impl Into<String>, classes: usize) -> Self {
        Self {
            name: name.into(),
            kind: HeadKind::Classification { classes },
        }
    }

    /// A sentence-pair similarity task.
    pub fn similarity(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            kind: HeadKind::Similarity,
        }
    }

    /// The class count of a classification task, `None` for similarity.
    pub fn classes(&self) -> Option<usize> {
        match self.kind {
            HeadKind::Classification { classes } => Some(classes),
            HeadKind::Similarity => None,
        }
    }
}

/// Checks a task list: at least one task, names valid and distinct, every
/// classification task with at least one class.
pub fn check_tasks(tasks: &[TaskHead]) -> anyhow::Result<()> {
    anyhow::ensure!(!tasks.is_empty(), "the model needs at least one task");
    for (i, task) in tasks.iter().enumerate() {
        anyhow::ensure!(
            !task.name.is_empty()
                && task
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            "task name {:?}: use letters, digits, '_' and '-' only",
            task.name
        );
        anyhow::ensure!(
            tasks[..i].iter().all(|t| t.name != task.name),
            "two tasks are named {:?}",
            task.name
        );
        if let Some(classes) = task.classes() {
            anyhow::ensure!(classes >= 1, "task {} needs at least one class", task.name);
        }
    }
    Ok(())
}

/// What to freeze during training.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Freeze {
    /// Everything trains.
    None,
    /// Nothing trains: the model is a fixed feature extractor with its heads as
    /// initialised (or loaded). `train` then takes no step; it evaluates the model
    /// as it is.
    All,
    /// The whole backbone (embeddings and every layer): only the heads train.
    Backbone,
    /// One classification task's head (`head:NAME`); the backbone and the other
    /// heads train. `head-a` and `head-b` (the two-task command's names) are the
    /// first and second task's heads, unless a task is named `a` or `b`.
    Head(String),
    /// The embeddings and the lowest `n` encoder layers (`lower:0` = the
    /// embeddings only).
    Lower(usize),
}

impl Freeze {
    /// What the encoder's `forward_partly_frozen` takes, for an encoder of
    /// `num_layers` layers.
    pub fn frozen_layers(&self, num_layers: usize) -> Option<usize> {
        match self {
            Freeze::None | Freeze::Head(_) => None,
            Freeze::All | Freeze::Backbone => Some(num_layers),
            Freeze::Lower(n) => Some(*n),
        }
    }

    /// The index in `tasks` of the head this setting freezes alone, checked:
    /// `Ok(None)` for settings that freeze no single head, an error for a name
    /// that is no classification task.
    pub fn frozen_head(&self, tasks: &[TaskHead]) -> anyhow::Result<Option<usize>> {
        let Freeze::Head(name) = self else {
            return Ok(None);
        };
        let index = tasks
            .iter()
            .position(|t| &t.name == name)
            .or(match name.as_str() {
                "a" => Some(0),
                "b" => Some(1),
                _ => None,
            })
            .filter(|&i| i < tasks.len())
            .with_context(|| {
                format!(
                    "--freeze head:{name}: no task of that name (tasks: {})",
                    names(tasks)
                )
            })?;
        anyhow::ensure!(
            tasks[index].classes().is_some(),
            "--freeze head:{name}: task {} is a similarity task and has no head",
            tasks[index].name
        );
        Ok(Some(index))
    }

    /// Whether this setting freezes task `task`'s head (`tasks[task]`).
    pub fn freezes_head(&self, task: usize, tasks: &[TaskHead]) -> bool {
        match self {
            Freeze::All => true,
            Freeze::Head(_) => self.frozen_head(tasks).ok().flatten() == Some(task),
            _ => false,
        }
    }

    /// Whether the parameter `name` (as [`MultiTaskModel::parameters`] names it)
    /// is frozen.
    pub fn freezes_param(&self, name: &str, num_layers: usize, tasks: &[TaskHead]) -> bool {
        match task_of_param(name) {
            Some(task) => tasks
                .iter()
                .position(|t| t.name == task)
                .is_some_and(|i| self.freezes_head(i, tasks)),
            None => match self.frozen_layers(num_layers) {
                None => false,
                Some(n) => {
                    name.starts_with("embeddings.")
                        || layer_of(name).is_some_and(|layer| layer < n)
                        // What lies beside the encoder layers (a checkpoint's
                        // unused pooler) freezes with the whole backbone.
                        || (n >= num_layers && layer_of(name).is_none())
                }
            },
        }
    }
}

fn names(tasks: &[TaskHead]) -> String {
    tasks
        .iter()
        .map(|t| t.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for Freeze {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Freeze::None => f.write_str("none"),
            Freeze::All => f.write_str("all"),
            Freeze::Backbone => f.write_str("backbone"),
            Freeze::Head(name) => write!(f, "head:{name}"),
            Freeze::Lower(n) => write!(f, "lower:{n}"),
        }
    }
}

impl FromStr for Freeze {
    type Err = String;

    /// `none`, `all`, `backbone`, `head:NAME`, `head-a`, `head-b`, `embeddings`
    /// (= `lower:0`) or `lower:N`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "none" => Freeze::None,
            "all" => Freeze::All,
            "backbone" => Freeze::Backbone,
            "head-a" => Freeze::Head("a".into()),
            "head-b" => Freeze::Head("b".into()),
            "embeddings" => Freeze::Lower(0),
            _ => {
                if let Some(name) = s.strip_prefix("head:").filter(|n| !n.is_empty()) {
                    return Ok(Freeze::Head(name.to_string()));
                }
                match s.strip_prefix("lower:").map(str::parse) {
                    Some(Ok(n)) => Freeze::Lower(n),
                    _ => {
                        return Err(format!(
                            "unknown freezing {s:?}: expected none, all, backbone, head:NAME, head-a, head-b, embeddings or lower:N"
                        ))
                    }
                }
            }
        })
    }
}

impl From<Freeze> for String {
    fn from(f: Freeze) -> String {
        f.to_string()
    }
}

impl TryFrom<String> for Freeze {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

/// The parameter-name prefix of a task's head: `heads.emotion` for
/// `heads.emotion.weight` and `heads.emotion.bias`.
pub fn head_prefix(task: &str) -> String {
    format!("heads.{task}")
}

/// The task whose head `name` is a parameter of.
fn task_of_param(name: &str) -> Option<&str> {
    let rest = name.strip_prefix("heads.")?;
    rest.rsplit_once('.').map(|(task, _)| task)
}

/// `Some(i)` for a parameter of `encoder.layer.{i}.`.
pub fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("encoder.layer.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// The scale of CoSENT's cosine differences (sentence-transformers' default, 20).
pub const COSENT_SCALE: f64 = 20.0;

/// A batch's outputs: what the losses and the predictions are read from.
#[derive(Debug, Clone)]
pub struct Outputs {
    /// `[S, H]`: every sequence's pooled embedding.
    pub pooled: Tensor,
    /// `[S, ΣC]`: the classification heads' logits side by side, in task order;
    /// `None` when the model has no classification task.
    pub logits: Option<Tensor>,
}

/// One similarity task's sentence pairs in a batch: rows of [`Outputs::pooled`].
#[derive(Debug, Clone)]
pub struct PairTargets {
    /// The task's index in the model's tasks.
    pub task: usize,
    /// `[P]` u32: each pair's first sentence's row.
    pub first: Tensor,
    /// `[P]` u32: each pair's second sentence's row.
    pub second: Tensor,
    /// `[P]` f32: each pair's gold similarity score.
    pub scores: Tensor,
}

/// How one task's loss enters the total.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TaskLoss {
    /// The task's weight `w_t` in the total.
    pub weight: f64,
    /// A classification task's per-class weights (`None`: all 1).
    pub class_weights: Option<Vec<f64>>,
    /// A classification task's label smoothing (see [`CeHead::label_smoothing`]).
    pub label_smoothing: f64,
}

impl TaskLoss {
    /// Weight `weight`, no class weights.
    pub fn weighted(weight: f64) -> Self {
        Self {
            weight,
            class_weights: None,
            label_smoothing: 0.0,
        }
    }
}

/// The dtype a model of `dtype` computes its losses in: f32 for f16 and bf16
/// (mixed precision: the logits and cosines are upcast, so the losses, their
/// sums and the gradient entering the model are f32), else `dtype` itself.
pub fn loss_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// The losses of one batch, in [`loss_dtype`] of the model's dtype.
#[derive(Debug, Clone)]
pub struct Losses {
    /// `[T]`, in task order: a classification task's mean cross-entropy over
    /// its labelled rows, a similarity task's CoSENT loss over its pairs (0 for
    /// a task with no rows in the batch).
    pub per_task: Tensor,
    /// The scalar `Σ_t w_t · loss_t` that is back-propagated.
    pub total: Tensor,
}

/// The label check of a batch's loss (see [`MultiTaskModel::loss_deferred`]).
pub struct LossCheck(Option<LabelCheck>);

impl LossCheck {
    /// `Err` naming the first out-of-range label, if the loss found one.
    pub fn verify(&self) -> Result<()> {
        self.0.as_ref().map_or(Ok(()), LabelCheck::verify)
    }
}

/// CoSENT (Su, 2022) over pairs with cosines `cos` `[P]` and gold scores
/// `scores` `[P]`: `log(1 + Σ_{s_i > s_j} exp(λ·(cos_j − cos_i)))`, λ =
/// [`COSENT_SCALE`]. It asks only that the cosines be ordered as the scores
/// are; 0 for fewer than two pairs.
pub fn cosent_loss(cos: &Tensor, scores: &Tensor) -> Result<Tensor> {
    let p = cos.dim(0)?;
    let dtype = cos.dtype();
    if p < 2 {
        return Tensor::zeros((), dtype, cos.device());
    }
    let cos = cos.to_dtype(DType::F32)?;
    let scores = scores.to_dtype(DType::F32)?;
    // [i, j] = λ·(cos_j − cos_i), kept where s_i > s_j.
    let diff = (cos.unsqueeze(0)?.broadcast_sub(&cos.unsqueeze(1)?)? * COSENT_SCALE)?;
    let ordered = scores.unsqueeze(1)?.broadcast_gt(&scores.unsqueeze(0)?)?;
    let never = Tensor::full(-1e4f32, (p, p), cos.device())?;
    let kept = ordered.where_cond(&diff, &never)?.flatten_all()?;
    // The 1 in log(1 + Σ ...) is exp(0).
    let with_one = Tensor::cat(&[&Tensor::zeros(1, DType::F32, cos.device())?, &kept], 0)?;
    with_one.log_sum_exp(0)?.to_dtype(dtype)
}

#[derive(Debug, Clone)]
struct LinearHead {
    weight: Tensor,
    bias: Tensor,
}

/// The encoder, the pooling and one head per classification task; every
/// parameter is a [`Var`] in one [`VarMap`], named as in the checkpoint
/// (`embeddings.…`, `encoder.layer.{i}.…`, `heads.{task}.weight`, `heads.{task}.bias`).
pub struct MultiTaskModel {
    encoder: BertEncoder,
    /// How token states become the sentence vector the heads read (mean by
    /// default, the recipe's).
    pooling: Pooling,
    tasks: Vec<TaskHead>,
    /// `heads[t]` for task `t`, `None` for a similarity task.
    heads: Vec<Option<LinearHead>>,
    /// Dropout on the pooled vector the heads read, in training passes only
    /// (probability 0 by default, the recipe's; similarity tasks read the
    /// pooled vector without it).
    head_dropout: Dropout,
    vars: VarMap,
}

impl fmt::Debug for MultiTaskModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MultiTaskModel")
            .field("num_layers", &self.num_layers())
            .field("hidden_size", &self.hidden_size())
            .field("tasks", &self.tasks)
            .finish()
    }
}

impl MultiTaskModel {
    /// The backbone of `files` with a new head for each classification task,
    /// initialised from `seed` as PyTorch initialises `nn.Linear`: weight and
    /// bias uniform in ±1/sqrt(hidden), task by task in order.
    pub fn new(
        files: &ModelFiles,
        tasks: &[TaskHead],
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> anyhow::Result<Self> {
        check_tasks(tasks)?;
        let (encoder, vars, _) = load_trainable(files, dtype, device)?;
        let hidden = encoder.hidden_size();
        let mut rng = StdRng::seed_from_u64(seed);
        let bound = 1.0 / (hidden as f64).sqrt();
        let mut uniform = |dims: &[usize]| -> Result<Var> {
            let n = dims.iter().product();
            let values: Vec<f64> = (0..n).map(|_| rng.random_range(-bound..bound)).collect();
            Var::from_tensor(&Tensor::from_vec(values, dims, device)?.to_dtype(dtype)?)
        };
        {
            let mut data = vars.data().lock().expect("VarMap lock");
            for task in tasks {
                if let Some(classes) = task.classes() {
                    let prefix = head_prefix(&task.name);
                    data.insert(format!("{prefix}.weight"), uniform(&[classes, hidden])?);
                    data.insert(format!("{prefix}.bias"), uniform(&[classes])?);
                }
            }
        }
        Self::assemble(encoder, vars, tasks)
    }

    /// A model saved with [`weights`](Self::weights): the backbone and every
    /// head from `files.weights`. A head missing from the file, or of another
    /// shape, is an error naming it.
    pub fn load(
        files: &ModelFiles,
        tasks: &[TaskHead],
        dtype: DType,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let model = Self::new(files, tasks, 0, dtype, device)?;
        // SAFETY: mmap's contract: the file must not change while it is mapped.
        // It is a checkpoint's own weights file, mapped read-only for the few
        // reads below and unmapped before this function returns.
        let saved = unsafe { candle_core::safetensors::MmapedSafetensors::new(&files.weights) }
            .with_context(|| format!("opening {}", files.weights.display()))?;
        for task in tasks.iter().filter(|t| t.classes().is_some()) {
            for part in ["weight", "bias"] {
                let name = format!("{}.{part}", head_prefix(&task.name));
                let saved = saved.load(&name, device).with_context(|| {
                    format!(
                        "{}: no {name}: not a multi-task checkpoint with a task named {}",
                        files.weights.display(),
                        task.name
                    )
                })?;
                let var = model.var(&name).expect("head parameter");
                anyhow::ensure!(
                    saved.shape() == var.shape(),
                    "{}: {name} has shape {:?}, the data's mapping needs {:?}",
                    files.weights.display(),
                    saved.dims(),
                    var.dims()
                );
                var.set(&saved.to_dtype(dtype)?)?;
            }
        }
        Ok(model)
    }

    fn assemble(encoder: BertEncoder, vars: VarMap, tasks: &[TaskHead]) -> anyhow::Result<Self> {
        let heads = {
            let data = vars.data().lock().expect("VarMap lock");
            let get = |name: String| {
                data.get(&name)
                    .map(|v| v.as_tensor().clone())
                    .with_context(|| format!("missing {name}"))
            };
            tasks
                .iter()
                .map(|task| -> anyhow::Result<Option<LinearHead>> {
                    if task.classes().is_none() {
                        return Ok(None);
                    }
                    let prefix = head_prefix(&task.name);
                    Ok(Some(LinearHead {
                        weight: get(format!("{prefix}.weight"))?,
                        bias: get(format!("{prefix}.bias"))?,
                    }))
                })
                .collect::<anyhow::Result<Vec<_>>>()?
        };
        Ok(Self {
            encoder,
            pooling: Pooling::Mean,
            tasks: tasks.to_vec(),
            heads,
            head_dropout: Dropout::new(0.0),
            vars,
        })
    }

    /// The model pooling by `pooling` (one mode: the heads read `hidden`
    /// values) instead of the masked mean.
    pub fn with_pooling(mut self, pooling: Pooling) -> Self {
        self.pooling = pooling;
        self
    }

    /// How the model pools token states into sentence vectors.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// The model with dropout of probability `p` on the pooled vector its
    /// classification heads read in training passes (as BERT's sequence
    /// classifier drops its pooled output). `p` must be in `[0, 1)`.
    pub fn with_head_dropout(mut self, p: f32) -> anyhow::Result<Self> {
        anyhow::ensure!(
            (0.0..1.0).contains(&p),
            "head dropout must be in [0, 1), got {p}"
        );
        self.head_dropout = Dropout::new(p);
        Ok(self)
    }

    /// The probability of the heads' input dropout.
    pub fn head_dropout(&self) -> f32 {
        self.head_dropout.p()
    }

    /// Restarts every dropout stream (the backbone's, then the heads'
    /// input's, from a seed derived from `seed`), so that a training forward
    /// pass is a function of its inputs and the seed.
    pub fn seed_dropout(&self, seed: u64) {
        self.encoder.seed_dropout(seed);
        self.head_dropout
            .reseed(seed.rotate_left(17) ^ 0x9E37_79B9_7F4A_7C15);
    }

    /// The shared BERT backbone.
    pub fn encoder(&self) -> &BertEncoder {
        &self.encoder
    }

    /// The number of transformer layers of the backbone.
    pub fn num_layers(&self) -> usize {
        self.encoder.num_layers()
    }

    /// The width of the backbone's hidden states (the heads' input).
    pub fn hidden_size(&self) -> usize {
        self.encoder.hidden_size()
    }

    /// The model's tasks, in order.
    pub fn tasks(&self) -> &[TaskHead] {
        &self.tasks
    }

    /// The label column of each task in a batch's `[S, Hc]` labels: the
    /// classification tasks numbered in order, `None` for similarity tasks.
    pub fn label_columns(&self) -> Vec<Option<usize>> {
        label_columns(&self.tasks)
    }

    /// Task `task`'s `[S, C]` logits out of the batch's outputs (`None` for a
    /// similarity task).
    pub fn task_logits(&self, outputs: &Outputs, task: usize) -> Result<Option<Tensor>> {
        let Some(classes) = self.tasks[task].classes() else {
            return Ok(None);
        };
        let offset: usize = self.tasks[..task].iter().filter_map(|t| t.classes()).sum();
        match &outputs.logits {
            Some(logits) => Ok(Some(logits.narrow(1, offset, classes)?)),
            None => candle_core::bail!("the outputs hold no logits"),
        }
    }

    /// The pooled embeddings and every classification head's logits for a
    /// batch. `train` turns dropout on; `freeze` cuts the graph below the
    /// trainable part (pass [`Freeze::All`] when no gradient is wanted).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: &Tensor,
        train: bool,
        freeze: &Freeze,
    ) -> Result<Outputs> {
        let frozen_layers = freeze.frozen_layers(self.num_layers());
        let hidden = self.encoder.forward_partly_frozen(
            input_ids,
            token_type_ids,
            attention_mask,
            train,
            frozen_layers,
        )?;
        let pooled = pool(&hidden, attention_mask, &[self.pooling])?;
        let pass = if train { Pass::TRAIN } else { Pass::EVAL };
        let head_input = self.head_dropout.forward(&pooled, pass)?;
        // One product for all heads: their weights stacked, frozen ones detached.
        let (mut weights, mut biases) = (Vec::new(), Vec::new());
        for (t, head) in self.heads.iter().enumerate() {
            if let Some(head) = head {
                let frozen = freeze.freezes_head(t, &self.tasks);
                let part = |x: &Tensor| if frozen { x.detach() } else { x.clone() };
                weights.push(part(&head.weight));
                biases.push(part(&head.bias));
            }
        }
        let logits = if weights.is_empty() {
            None
        } else {
            let weight = Tensor::cat(&weights, 0)?;
            let bias = Tensor::cat(&biases, 0)?;
            Some(crate::ops::linear(&head_input, &weight, &bias)?)
        };
        Ok(Outputs { pooled, logits })
    }

    /// Every task's loss and their weighted total (see [`Losses`]); `labels` is
    /// the batch's `[S, Hc]` i64 labels (one column per classification task,
    /// [`IGNORE_INDEX`](crate::ops::IGNORE_INDEX) where a row is not labelled for it),
    /// `pairs` the similarity tasks' pairs, `task_losses` one entry per task.
    pub fn loss(
        &self,
        outputs: &Outputs,
        labels: &Tensor,
        pairs: &[PairTargets],
        task_losses: &[TaskLoss],
    ) -> Result<Losses> {
        let (losses, labels_checked) = self.loss_deferred(outputs, labels, pairs, task_losses)?;
        labels_checked.verify()?;
        Ok(losses)
    }

    /// [`Self::loss`] without waiting on a GPU for the label check: verify the
    /// returned [`LossCheck`] once the step reads its losses back anyway (until
    /// then a bad label shows only as NaN losses), so that a training step
    /// synchronises once.
    pub fn loss_deferred(
        &self,
        outputs: &Outputs,
        labels: &Tensor,
        pairs: &[PairTargets],
        task_losses: &[TaskLoss],
    ) -> Result<(Losses, LossCheck)> {
        if task_losses.len() != self.tasks.len() {
            candle_core::bail!(
                "{} task losses for a model of {} tasks",
                task_losses.len(),
                self.tasks.len()
            );
        }
        let columns = self.label_columns();
        let dtype = loss_dtype(outputs.pooled.dtype());
        let device = outputs.pooled.device();
        let mut per_task: Vec<Tensor> = Vec::with_capacity(self.tasks.len());
        let (mut total, mut check) = (None, LossCheck(None));
        if let Some(logits) = &outputs.logits {
            let ce_heads: Vec<CeHead> = self
                .tasks
                .iter()
                .zip(task_losses)
                .filter_map(|(task, loss)| {
                    task.classes().map(|classes| CeHead {
                        weight: loss.weight,
                        class_weights: loss.class_weights.clone(),
                        label_smoothing: loss.label_smoothing,
                        ..CeHead::new(classes)
                    })
                })
                .collect();
            // The logits are a few columns a row: upcasting them is cheap.
            let logits = logits.to_dtype(dtype)?;
            let (ce, labels_checked) =
                multi_head_cross_entropy_deferred(&logits, labels, &ce_heads)?;
            check = LossCheck(Some(labels_checked));
            for column in columns.iter().flatten() {
                per_task.push(ce.per_head.get(*column)?);
            }
            total = Some(ce.total);
        }
        // Similarity tasks after the classification ones, then reordered.
        let mut similarity = Vec::new();
        for (t, task) in self.tasks.iter().enumerate() {
            if task.classes().is_some() {
                continue;
            }
            let loss = match pairs.iter().find(|p| p.task == t) {
                Some(p) => {
                    let first = outputs.pooled.index_select(&p.first, 0)?;
                    let second = outputs.pooled.index_select(&p.second, 0)?;
                    let cos = crate::ops::cosine_similarity(&first, &second)?;
                    cosent_loss(&cos.to_dtype(dtype)?, &p.scores)?
                }
                None => Tensor::zeros((), dtype, device)?,
            };
            let weighted = (&loss * task_losses[t].weight)?;
            total = Some(match total {
                Some(sum) => (sum + weighted)?,
                None => weighted,
            });
            similarity.push((t, loss));
        }
        let mut ordered = Vec::with_capacity(self.tasks.len());
        let (mut cls, mut sim) = (per_task.into_iter(), similarity.into_iter());
        for task in &self.tasks {
            ordered.push(match task.classes() {
                Some(_) => cls.next().expect("one loss per classification task"),
                None => sim.next().expect("one loss per similarity task").1,
            });
        }
        let per_task = Tensor::stack(&ordered, 0)?;
        let total = total.expect("at least one task");
        Ok((Losses { per_task, total }, check))
    }

    /// Every parameter, sorted by name.
    pub fn parameters(&self) -> BTreeMap<String, Var> {
        self.vars
            .data()
            .lock()
            .expect("VarMap lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The parameters that train under `freeze`, sorted by name.
    pub fn trainable_parameters(&self, freeze: &Freeze) -> Vec<(String, Var)> {
        let layers = self.num_layers();
        self.parameters()
            .into_iter()
            .filter(|(name, _)| !freeze.freezes_param(name, layers, &self.tasks))
            .collect()
    }

    /// The parameter `name`, if the model has one.
    pub fn var(&self, name: &str) -> Option<Var> {
        self.vars
            .data()
            .lock()
            .expect("VarMap lock")
            .get(name)
            .cloned()
    }

    /// Every parameter's current value, by name, for saving.
    pub fn weights(&self) -> HashMap<String, Tensor> {
        self.parameters()
            .into_iter()
            .map(|(k, v)| (k, v.as_detached_tensor()))
            .collect()
    }
}

/// Each task's label column (see [`MultiTaskModel::label_columns`]).
pub fn label_columns(tasks: &[TaskHead]) -> Vec<Option<usize>> {
    let mut next = 0;
    tasks
        .iter()
        .map(|t| {
            t.classes().map(|_| {
                next += 1;
                next - 1
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_tasks() -> Vec<TaskHead> {
        vec![
            TaskHead::classification("emotion", 4),
            TaskHead::classification("sentiment", 3),
            TaskHead::similarity("sts"),
        ]
    }

    #[test]
    fn freeze_parses_and_prints() {
        for s in [
            "none",
            "all",
            "backbone",
            "head:emotion",
            "lower:0",
            "lower:3",
        ] {
            assert_eq!(s.parse::<Freeze>().unwrap().to_string(), s);
        }
        assert_eq!("embeddings".parse::<Freeze>().unwrap(), Freeze::Lower(0));
        assert_eq!(
            "head-a".parse::<Freeze>().unwrap(),
            Freeze::Head("a".into())
        );
        let err = "lower:x".parse::<Freeze>().unwrap_err();
        assert!(err.contains("lower:N"), "{err}");
        assert!("head:".parse::<Freeze>().is_err());
    }

    #[test]
    fn freeze_resolves_head_names() {
        let tasks = two_tasks();
        let head = |s: &str| s.parse::<Freeze>().unwrap().frozen_head(&tasks);
        assert_eq!(head("head:sentiment").unwrap(), Some(1));
        assert_eq!(head("head-a").unwrap(), Some(0));
        assert_eq!(head("head-b").unwrap(), Some(1));
        assert_eq!(head("backbone").unwrap(), None);
        let err = head("head:topic").unwrap_err().to_string();
        assert!(err.contains("emotion, sentiment, sts"), "{err}");
        let err = head("head:sts").unwrap_err().to_string();
        assert!(err.contains("similarity task"), "{err}");
    }

    #[test]
    fn freeze_selects_parameters_by_name() {
        let tasks = two_tasks();
        let names = [
            "embeddings.word_embeddings.weight",
            "encoder.layer.0.attention.self.query.weight",
            "encoder.layer.1.output.LayerNorm.bias",
            "encoder.layer.10.output.dense.weight",
            "pooler.dense.weight",
            "heads.emotion.weight",
            "heads.sentiment.bias",
        ];
        let frozen = |f: &str| -> Vec<&str> {
            let f: Freeze = f.parse().unwrap();
            names
                .iter()
                .copied()
                .filter(|n| f.freezes_param(n, 12, &tasks))
                .collect()
        };
        assert!(frozen("none").is_empty());
        assert_eq!(frozen("all"), names);
        assert_eq!(frozen("backbone"), names[..5]);
        assert_eq!(frozen("head:emotion"), ["heads.emotion.weight"]);
        assert_eq!(frozen("head-b"), ["heads.sentiment.bias"]);
        assert_eq!(frozen("lower:0"), ["embeddings.word_embeddings.weight"]);
        assert_eq!(frozen("lower:2"), names[..3]);
        assert_eq!(frozen("lower:12"), names[..5]);
    }

    #[test]
    fn task_lists_are_checked() {
        assert!(check_tasks(&two_tasks()).is_ok());
        assert!(check_tasks(&[]).is_err());
        let twice = [TaskHead::similarity("x"), TaskHead::classification("x", 2)];
        assert!(check_tasks(&twice)
            .unwrap_err()
            .to_string()
            .contains("two tasks"));
        assert!(check_tasks(&[TaskHead::classification("a.b", 2)]).is_err());
        assert!(check_tasks(&[TaskHead::classification("a", 0)]).is_err());
        assert_eq!(label_columns(&two_tasks()), [Some(0), Some(1), None]);
    }

    /// CoSENT against its formula, in f64, on random cosines and scores.
    #[test]
    fn cosent_matches_its_formula() -> Result<()> {
        let mut rng = StdRng::seed_from_u64(7);
        let p = 9;
        let cos: Vec<f32> = (0..p).map(|_| rng.random_range(-1.0..1.0)).collect();
        let scores: Vec<f32> = (0..p).map(|_| rng.random_range(0..6) as f32).collect();
        let mut sum = 1.0f64;
        for i in 0..p {
            for j in 0..p {
                if scores[i] > scores[j] {
                    sum += (COSENT_SCALE * (cos[j] as f64 - cos[i] as f64)).exp();
                }
            }
        }
        let dev = Device::Cpu;
        let got = cosent_loss(
            &Tensor::new(cos.as_slice(), &dev)?,
            &Tensor::new(scores.as_slice(), &dev)?,
        )?
        .to_scalar::<f32>()? as f64;
        assert!(
            (got - sum.ln()).abs() < 1e-4 * sum.ln().max(1.0),
            "{got} vs {}",
            sum.ln()
        );
        let one = cosent_loss(&Tensor::new(&[0.3f32], &dev)?, &Tensor::new(&[1f32], &dev)?)?;
        assert_eq!(one.to_scalar::<f32>()?, 0.0);
        Ok(())
    }
}
