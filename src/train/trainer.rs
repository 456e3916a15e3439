//! [`MultiTaskTrainer`]: `prepare_data()` loads and validates every task,
//! `setup()` tokenises them and builds the model and the optimiser (or restores
//! them from a checkpoint), `train()` runs the epochs (or overfit mode) and
//! `evaluate()` scores a split.
//!
//! One training step: collate a mixed batch, forward with dropout, the fused
//! N-head cross-entropy of the classification tasks plus CoSENT for each
//! similarity task, backward, optional clipping of the global gradient norm,
//! and an AdamW step at the scheduled learning rates. After each epoch every
//! task is scored on its validation split and a checkpoint is written
//! atomically.
//!
//! Determinism: batches are a function of `(seed, epoch)`, dropout masks of
//! `(seed, step)` and the heads are initialised from the seed, so the same seed
//! gives the same losses on the CPU, and a resumed run the same result as one
//! that never stopped.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use tokenizers::Tokenizer;

use super::checkpoint::{self, RunInfo};
use super::config::{TaskSpec, TrainConfig};
use super::evaluate::{argmax, evaluate_split, predict_probabilities, EvalReport};
use super::metrics::TaskScores;
use super::optim::{AdamW, ParamGroup};
use super::records::{
    self, EpochRecord, OverfitReport, StepRecord, TrainReport, TrainState, MEMORISED_LOSS,
};
use super::schedule::LrSchedule;
use crate::data::sampler::epoch_rng;
use crate::data::{
    collate, epoch_batches, Example, ExampleRef, Split, TaskKind, TaskRows, TaskSource,
};
use crate::model::multitask::{label_columns, layer_of, MultiTaskModel, TaskHead, TaskLoss};
use crate::model::tokenize::Tokens;
use crate::model::tokenize::{load_tokenizer, pad_id};
use crate::model::{resolve_model, ModelFiles};

/// One task's folder and the splits training reads, validated.
#[derive(Debug, Clone)]
pub struct PreparedTask {
    /// What the run was told of the task.
    pub spec: TaskSpec,
    /// Its opened folder.
    pub source: TaskSource,
    /// Its training split.
    pub train: TaskRows,
    /// Its validation split.
    pub val: TaskRows,
}

/// Every task's data, in task order.
#[derive(Debug, Clone)]
pub struct PreparedData {
    /// The tasks.
    pub tasks: Vec<PreparedTask>,
}

impl PreparedData {
    /// The model's tasks: names, kinds and class counts.
    pub fn heads(&self) -> Vec<TaskHead> {
        self.tasks
            .iter()
            .map(|t| match t.spec.kind {
                TaskKind::Classification => {
                    TaskHead::classification(&t.spec.name, t.source.label_names().len())
                }
                TaskKind::Sts => TaskHead::similarity(&t.spec.name),
            })
            .collect()
    }

    /// Each task's label names (empty for a similarity task).
    pub fn label_names(&self) -> Vec<Vec<String>> {
        self.tasks
            .iter()
            .map(|t| t.source.label_names().to_vec())
            .collect()
    }
}

/// The model, data and optimiser of a run, built by `setup()`.
struct Run {
    model: MultiTaskModel,
    tokenizer: Tokenizer,
    pad_id: u32,
    /// Where the checkpoint copies `config.json` and `tokenizer.json` from.
    model_files: ModelFiles,
    /// Each task's tokenised training and validation examples.
    train: Vec<Vec<Example>>,
    val: Vec<Vec<Example>>,
    /// Each task's label column in a batch (`None` for similarity tasks).
    columns: Vec<Option<usize>>,
    /// How each task's loss enters the total.
    task_losses: Vec<TaskLoss>,
    /// `None` when nothing trains (`Freeze::All`).
    optimizer: Option<AdamW>,
    steps_per_epoch: usize,
    schedule: LrSchedule,
    state: TrainState,
    /// With `best_epoch`: the best validation score so far, its epoch, and a
    /// copy of its weights.
    best: Option<(f64, usize, HashMap<String, Tensor>)>,
    /// With `ema_decay`: the moving average of every parameter (f32).
    ema: Option<HashMap<String, Tensor>>,
}

/// The notebook's trainer: [`prepare_data`](Self::prepare_data) reads and checks
/// every task, [`setup`](Self::setup) builds the model and optimiser (or resumes a
/// checkpoint), and [`train`](Self::train) runs the epochs or overfit mode.
pub struct MultiTaskTrainer {
    config: TrainConfig,
    device: Device,
    dtype: DType,
    data: Option<PreparedData>,
    run: Option<Run>,
}

impl MultiTaskTrainer {
    /// A trainer for `config` (validated here) running on `device` in `dtype`.
    pub fn new(config: TrainConfig, device: Device, dtype: DType) -> anyhow::Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            device,
            dtype,
            data: None,
            run: None,
        })
    }

    /// The run's settings.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The model, once `setup()` has built it.
    pub fn model(&self) -> Option<&MultiTaskModel> {
        self.run.as_ref().map(|r| &r.model)
    }

    /// The run's history, once `setup()` has run.
    pub fn state(&self) -> Option<&TrainState> {
        self.run.as_ref().map(|r| &r.state)
    }

    /// The optimiser's parameter groups (name, learning rate, tensors,
    /// values), once `setup()` has run; `None` when nothing trains.
    pub fn optimizer_groups(&self) -> Option<Vec<(String, f64, usize, usize)>> {
        self.run
            .as_ref()?
            .optimizer
            .as_ref()
            .map(AdamW::group_summary)
    }

    /// The tasks' data, once `prepare_data()` has read it.
    pub fn data(&self) -> Option<&PreparedData> {
        self.data.as_ref()
    }

    /// Loads every task's folder (a classification task's mapping) and its
    /// train and validation splits, failing with the file and line of the
    /// first problem.
    pub fn prepare_data(&mut self) -> anyhow::Result<&PreparedData> {
        let mut tasks = Vec::with_capacity(self.config.tasks.len());
        for spec in &self.config.tasks {
            let source = TaskSource::open(spec.kind, &spec.dir)
                .with_context(|| format!("task {}", spec.name))?;
            let (train, val) = (source.load(Split::Train)?, source.load(Split::Val)?);
            anyhow::ensure!(
                !train.is_empty(),
                "task {}: the training split is empty",
                spec.name
            );
            tasks.push(PreparedTask {
                spec: spec.clone(),
                source,
                train,
                val,
            });
        }
        Ok(self.data.insert(PreparedData { tasks }))
    }

    /// Tokenises the data and builds the model and the optimiser: fresh from the
    /// base model, or from the checkpoint in the output folder with `resume`.
    pub fn setup(&mut self) -> anyhow::Result<()> {
        if self.data.is_none() {
            self.prepare_data()?;
        }
        let data = self.data.as_ref().expect("prepared");
        let config = &self.config;
        let heads = data.heads();
        crate::model::multitask::check_tasks(&heads)?;
        config.freeze.frozen_head(&heads)?;
        let (model, model_files, resumed) = if config.resume {
            let out = config
                .output_dir
                .as_deref()
                .expect("validated: resume has an output folder");
            let dir = checkpoint::locate(out).context("--resume")?;
            let info: RunInfo = checkpoint::read_json(&dir.join(checkpoint::RUN_FILE))?;
            let differences = config.trajectory_differences(&info.config);
            anyhow::ensure!(
                differences.is_empty(),
                "--resume: the settings differ from the checkpoint's in {}:\n  {}",
                dir.display(),
                differences.join("\n  ")
            );
            anyhow::ensure!(
                info.tasks == heads,
                "--resume: the checkpoint in {} has the tasks {}, the run now {}",
                dir.display(),
                describe_heads(&info.tasks),
                describe_heads(&heads)
            );
            let files = checkpoint::model_files(&dir);
            let model = MultiTaskModel::load(&files, &heads, self.dtype, &self.device)?
                .with_pooling(config.pooling)
                .with_head_dropout(config.head_dropout as f32)?;
            (model, files, Some(dir))
        } else {
            let files = resolve_model(&config.model)?;
            let model = MultiTaskModel::new(&files, &heads, config.seed, self.dtype, &self.device)?
                .with_pooling(config.pooling)
                .with_head_dropout(config.head_dropout as f32)?;
            (model, files, None)
        };
        let tokenizer = load_tokenizer(&model_files, config.max_len)?;
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for (t, task) in data.tasks.iter().enumerate() {
            train.push(task.train.tokenize(&tokenizer, config.text_prep(), t)?);
            val.push(task.val.tokenize(&tokenizer, config.text_prep(), t)?);
        }
        let task_losses = data
            .tasks
            .iter()
            .map(|task| TaskLoss {
                weight: task.spec.weight,
                class_weights: match &task.train {
                    TaskRows::Classes(split) => config
                        .class_weighting
                        .weights(&split.labels, task.source.label_names().len()),
                    TaskRows::Pairs(_) => None,
                },
                label_smoothing: config.label_smoothing,
            })
            .collect();

        let optimizer = self.build_optimizer(&model)?;
        let (steps_per_epoch, schedule) = match config.overfit {
            Some(_) => (1, LrSchedule::Constant),
            None => {
                let per_epoch = epoch_batches(
                    config.sampler,
                    &sizes(&train),
                    &passes(config),
                    config.batch_size,
                    config.seed,
                    0,
                )
                .len();
                (
                    per_epoch,
                    LrSchedule::linear(config.warmup_ratio, per_epoch * config.epochs),
                )
            }
        };
        let mut run = Run {
            pad_id: pad_id(&tokenizer),
            model,
            tokenizer,
            model_files,
            columns: label_columns(&heads),
            train,
            val,
            task_losses,
            optimizer,
            steps_per_epoch,
            schedule,
            state: TrainState::default(),
            best: None,
            ema: None,
        };
        if config.ema_decay.is_some() {
            run.ema = Some(match &resumed {
                Some(dir) => {
                    checkpoint::read_safetensors(&dir.join(checkpoint::EMA_FILE), &self.device)
                        .with_context(|| {
                            format!("--resume with ema_decay: the average in {}", dir.display())
                        })?
                }
                None => run
                    .model
                    .parameters()
                    .into_iter()
                    .map(|(k, v)| Ok((k, v.as_detached_tensor().to_dtype(DType::F32)?.copy()?)))
                    .collect::<candle_core::Result<_>>()?,
            });
        }
        if let Some(dir) = resumed {
            run.state = checkpoint::read_json(&dir.join(checkpoint::STATE_FILE))?;
            if let Some(opt) = run.optimizer.as_mut() {
                let saved = checkpoint::read_safetensors(
                    &dir.join(checkpoint::OPTIMIZER_FILE),
                    &self.device,
                )?;
                opt.load_state_tensors(&saved)
                    .with_context(|| format!("restoring the optimiser from {}", dir.display()))?;
            }
        }
        self.log_setup(&run, data);
        self.run = Some(run);
        Ok(())
    }

    fn log_setup(&self, run: &Run, data: &PreparedData) {
        let c = &self.config;
        let quiet = ProgressBar::hidden();
        let sizes: Vec<String> = data
            .tasks
            .iter()
            .map(|t| {
                format!(
                    "{} train {} val {}",
                    t.spec.name,
                    t.train.len(),
                    t.val.len()
                )
            })
            .collect();
        log(c.verbose, &quiet, &format!("data: {}", sizes.join(" | ")));
        let groups = run.optimizer.as_ref().map_or_else(
            || "nothing".to_string(),
            |opt| {
                opt.group_summary()
                    .iter()
                    .map(|(name, lr, tensors, elems)| {
                        format!("{name} lr {lr:e} ({tensors} tensors, {elems} values)")
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        );
        log(
            c.verbose,
            &quiet,
            &format!(
                "model: {} layers, hidden {}, freeze {}; training {groups}",
                run.model.num_layers(),
                run.model.hidden_size(),
                c.freeze
            ),
        );
        if let LrSchedule::LinearWarmupDecay {
            warmup_steps,
            total_steps,
        } = run.schedule
        {
            log(
                c.verbose,
                &quiet,
                &format!(
                    "{} steps per epoch, {total_steps} in all, {warmup_steps} of warmup{}",
                    run.steps_per_epoch,
                    if run.state.global_step > 0 {
                        format!("; resuming after step {}", run.state.global_step)
                    } else {
                        String::new()
                    }
                ),
            );
        }
    }

    /// AdamW over the trainable parameters: backbone and heads in separate
    /// groups (their own learning rates), each split once more when biases and
    /// LayerNorm weights are exempt from weight decay.
    fn build_optimizer(&self, model: &MultiTaskModel) -> anyhow::Result<Option<AdamW>> {
        let c = &self.config;
        let layers = model.num_layers();
        let mut groups: Vec<ParamGroup> = Vec::new();
        for (name, var) in model.trainable_parameters(&c.freeze) {
            let is_head = name.starts_with("heads.");
            let no_decay =
                !c.decay_bias_and_norm && (name.ends_with(".bias") || name.contains("LayerNorm"));
            // Layer-wise decay: the top layer at the backbone's rate, each one
            // below at `layer_decay` times the one above, the embeddings last.
            let depth = match (is_head, layer_of(&name)) {
                (true, _) => None,
                (false, Some(layer)) => Some(layers.saturating_sub(layer + 1)),
                (false, None) => Some(layers),
            }
            .filter(|_| c.layer_decay != 1.0);
            let group_name = format!(
                "{}{}{}",
                if is_head { "heads" } else { "backbone" },
                depth.map_or(String::new(), |d| format!("_depth{d}")),
                if no_decay { "_no_decay" } else { "" }
            );
            let lr = if is_head {
                c.head_lr
            } else {
                c.backbone_lr * c.layer_decay.powi(depth.unwrap_or(0) as i32)
            };
            let group = match groups.iter_mut().position(|g| g.name == group_name) {
                Some(i) => &mut groups[i],
                None => {
                    groups.push(ParamGroup {
                        name: group_name,
                        lr,
                        weight_decay: if no_decay { 0.0 } else { c.weight_decay },
                        params: Vec::new(),
                    });
                    groups.last_mut().expect("just pushed")
                }
            };
            group.params.push((name, var));
        }
        if groups.is_empty() {
            return Ok(None);
        }
        Ok(Some(AdamW::new(groups, c.adam)?))
    }

    fn run_ref(&self) -> anyhow::Result<&Run> {
        self.run.as_ref().context("call setup() first")
    }

    /// Scores every task on a split.
    pub fn evaluate(&self, split: Split) -> anyhow::Result<EvalReport> {
        let run = self.run_ref()?;
        let data = self.data.as_ref().context("call prepare_data() first")?;
        let mut loaded = Vec::new();
        let examples: Vec<&[Example]> = match split {
            Split::Train => run.train.iter().map(Vec::as_slice).collect(),
            Split::Val => run.val.iter().map(Vec::as_slice).collect(),
            Split::Test => {
                for (t, task) in data.tasks.iter().enumerate() {
                    loaded.push(task.source.load(split)?.tokenize(
                        &run.tokenizer,
                        self.config.text_prep(),
                        t,
                    )?);
                }
                loaded.iter().map(Vec::as_slice).collect()
            }
        };
        evaluate_split(
            &run.model,
            split,
            &examples,
            &data.label_names(),
            run.pad_id,
            self.config.eval_batch_size,
            &self.device,
        )
    }

    /// Trains (or, in overfit mode, memorises one batch), then evaluates on the
    /// test splits if configured. With [`Freeze::All`](crate::model::Freeze::All) nothing trains: the model
    /// as loaded is evaluated and saved, and no step is taken.
    pub fn train(&mut self) -> anyhow::Result<TrainReport> {
        if self.run.is_none() {
            self.setup()?;
        }
        let mut report = TrainReport {
            tasks: self.task_names(),
            freeze: self.config.freeze.clone(),
            steps: 0,
            epochs_completed: 0,
            stopped_early: false,
            best_epoch: None,
            train_seconds: 0.0,
            seconds_per_step: None,
            val: None,
            test: None,
            overfit: None,
            checkpoint: None,
        };
        if let Some(overfit) = self.config.overfit {
            report.overfit = Some(self.overfit(overfit.batch_size, overfit.max_steps)?);
        } else if self.run_ref()?.optimizer.is_none() {
            log(
                self.config.verbose,
                &ProgressBar::hidden(),
                "freeze=all: nothing trains; evaluating the model as it is",
            );
            let val = self.evaluate(Split::Val)?;
            log(
                self.config.verbose,
                &ProgressBar::hidden(),
                &format!("val: {}", describe(&val)),
            );
            report.val = Some(by_task(&val));
            self.save_if_configured()?;
        } else {
            report.stopped_early = self.train_epochs()?;
            if !report.stopped_early {
                report.best_epoch = self.restore_best()?;
                if report.best_epoch.is_none() {
                    self.keep_average()?;
                }
            }
        }
        let run = self.run_ref()?;
        report.steps = run.state.global_step;
        report.epochs_completed = run.state.epochs.len();
        report.train_seconds = run.state.train_seconds;
        report.seconds_per_step =
            (report.steps > 0).then(|| run.state.train_seconds / report.steps as f64);
        // The validation scores of the weights the run ends with.
        let kept = match report.best_epoch {
            Some(epoch) => run.state.epochs.get(epoch - 1),
            None => run.state.epochs.last(),
        };
        if let Some(kept) = kept {
            report.val = Some(
                self.task_names()
                    .into_iter()
                    .zip(kept.val.clone())
                    .collect(),
            );
        }
        if self.config.test_at_end && !report.stopped_early && self.config.overfit.is_none() {
            let test = self.evaluate(Split::Test)?;
            log(
                self.config.verbose,
                &ProgressBar::hidden(),
                &format!("test: {}", describe(&test)),
            );
            report.test = Some(by_task(&test));
        }
        if let Some(out) = self.config.output_dir.clone() {
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            report.checkpoint = checkpoint::find(&out.join(checkpoint::CHECKPOINT_DIR));
            checkpoint::write_json(&out.join("metrics.json"), &report)?;
            let run = self.run_ref()?;
            if let Err(e) = records::training_plots(
                &out,
                &self.task_names(),
                &run.state,
                report.overfit.as_ref(),
            ) {
                eprintln!("warning: no plots: {e:#}");
            }
        }
        Ok(report)
    }

    /// The epoch loop; returns whether `max_steps` stopped it early.
    fn train_epochs(&mut self) -> anyhow::Result<bool> {
        let (steps_per_epoch, total_steps, start) = {
            let run = self.run_ref()?;
            (
                run.steps_per_epoch,
                run.steps_per_epoch * self.config.epochs,
                run.state.global_step,
            )
        };
        let stop_at = self
            .config
            .max_steps
            .map_or(total_steps, |m| m.min(total_steps));
        let bar = progress_bar(self.config.verbose, total_steps as u64, start as u64);
        let sizes = sizes(&self.run_ref()?.train);
        let passes = passes(&self.config);
        let names = self.task_names();
        for epoch in start / steps_per_epoch..self.config.epochs {
            let batches = epoch_batches(
                self.config.sampler,
                &sizes,
                &passes,
                self.config.batch_size,
                self.config.seed,
                epoch,
            );
            debug_assert_eq!(batches.len(), steps_per_epoch);
            let skip = self.run_ref()?.state.global_step - epoch * steps_per_epoch;
            let started = Instant::now();
            for refs in &batches[skip..] {
                if self.run_ref()?.state.global_step >= stop_at {
                    bar.finish_and_clear();
                    self.save_if_configured()?;
                    log(
                        self.config.verbose,
                        &bar,
                        &format!("stopped after {stop_at} steps (max_steps)"),
                    );
                    return Ok(true);
                }
                let record = self.train_step(refs, epoch)?;
                let run = self.run.as_mut().expect("setup");
                run.state.steps.push(record);
                bar.set_message(running_losses(
                    &run.state.steps,
                    epoch + 1,
                    &names,
                    epoch + 1,
                    self.config.epochs,
                ));
                bar.inc(1);
                let step = run.state.global_step;
                if self
                    .config
                    .checkpoint_every
                    .is_some_and(|n| step.is_multiple_of(n))
                    && !step.is_multiple_of(steps_per_epoch)
                {
                    self.save_if_configured()?;
                }
            }
            let epoch_seconds = started.elapsed().as_secs_f64();
            // With `ema_decay` the average is validated (and kept as the best).
            let trained = self.swap_in_average()?;
            let val = self.evaluate(Split::Val)?;
            let run = self.run.as_mut().expect("setup");
            let record = EpochRecord {
                epoch: epoch + 1,
                global_step: run.state.global_step,
                train_loss: mean_losses(&run.state.steps, epoch + 1),
                val: val.tasks.iter().map(|t| t.metrics).collect(),
                val_loss: val.tasks.iter().map(|t| t.loss).collect(),
                train_seconds: epoch_seconds,
            };
            log(
                self.config.verbose,
                &bar,
                &format!(
                    "epoch {}/{} ({} steps, {:.1}s, {:.3}s/step): val {}",
                    epoch + 1,
                    self.config.epochs,
                    batches.len() - skip,
                    epoch_seconds,
                    epoch_seconds / (batches.len() - skip).max(1) as f64,
                    describe(&val)
                ),
            );
            if self.config.best_epoch {
                let score = val
                    .tasks
                    .iter()
                    .map(|t| t.metrics.selection_score())
                    .sum::<f64>()
                    / val.tasks.len() as f64;
                if run.best.as_ref().is_none_or(|(best, _, _)| score > *best) {
                    run.best = Some((score, epoch + 1, copy_weights(&run.model)?));
                }
            }
            if let Some(trained) = trained {
                set_weights(&run.model, &trained)?;
            }
            run.state.epochs.push(record);
            self.save_if_configured()?;
        }
        bar.finish_and_clear();
        Ok(false)
    }

    /// One optimiser step on the rows `refs` of the training sets.
    fn train_step(&mut self, refs: &[ExampleRef], epoch: usize) -> anyhow::Result<StepRecord> {
        let run = self.run.as_mut().context("call setup() first")?;
        // Owned copies (a few short id vectors) so that the step can borrow the run mutably.
        let rows: Vec<Example> = refs
            .iter()
            .map(|r| run.train[r.task][r.index].clone())
            .collect();
        let rows: Vec<&Example> = rows.iter().collect();
        let lr_factor = run.schedule.factor(run.state.global_step);
        let started = Instant::now();
        let (loss, total, grad_norm) = step_on(run, &rows, &self.config, lr_factor, &self.device)?;
        run.state.train_seconds += started.elapsed().as_secs_f64();
        run.state.global_step += 1;
        Ok(StepRecord {
            step: run.state.global_step,
            epoch: epoch + 1,
            loss,
            total,
            lr_factor: lr_factor as f32,
            grad_norm,
        })
    }

    /// Overfit mode: one batch of the classification tasks' rows in equal
    /// shares (a seeded pick from the training sets; similarity tasks sit it
    /// out), trained at constant learning rates for all `max_steps`; after each
    /// step, each head's accuracy and the total loss on the batch in eval mode
    /// (see [`OverfitReport`]).
    fn overfit(&mut self, batch_size: usize, max_steps: usize) -> anyhow::Result<OverfitReport> {
        let config = self.config.clone();
        let run = self.run.as_mut().context("call setup() first")?;
        anyhow::ensure!(
            run.optimizer.is_some(),
            "overfit mode needs something to train (freeze=all trains nothing)"
        );
        let classified: Vec<usize> = (0..run.columns.len())
            .filter(|&t| run.columns[t].is_some())
            .collect();
        anyhow::ensure!(
            !classified.is_empty(),
            "overfit mode needs a classification task"
        );
        let mut rng = epoch_rng(config.seed, 0);
        let mut refs = Vec::new();
        for (k, &task) in classified.iter().enumerate() {
            let share =
                batch_size / classified.len() + usize::from(k < batch_size % classified.len());
            let mut all: Vec<ExampleRef> = (0..run.train[task].len())
                .map(|index| ExampleRef { task, index })
                .collect();
            all.shuffle(&mut rng);
            all.truncate(share);
            refs.extend(all);
        }
        let rows: Vec<Example> = refs
            .iter()
            .map(|r| run.train[r.task][r.index].clone())
            .collect();
        let row_refs: Vec<&Example> = rows.iter().collect();
        let tokens: Vec<&Tokens> = rows.iter().map(|r| &r.tokens).collect();
        // Each head's accuracy on its own rows of the batch, and the total
        // loss (the heads' mean cross-entropies summed), in eval mode.
        let batch_scores = |model: &MultiTaskModel,
                            pad_id: u32|
         -> anyhow::Result<(Vec<f64>, f64)> {
            let probs = predict_probabilities(model, &tokens, pad_id, rows.len(), &self.device)?;
            let mut loss = 0.0;
            let accuracy = classified
                .iter()
                .map(|&task| {
                    let own: Vec<(usize, usize)> = rows
                        .iter()
                        .enumerate()
                        .filter(|(_, r)| r.task == task)
                        .filter_map(|(i, r)| Some((i, r.class()?)))
                        .collect();
                    let right = own
                        .iter()
                        .filter(|&&(i, y)| argmax(&probs[i][task]) == y)
                        .count();
                    let nll: f64 = own
                        .iter()
                        .map(|&(i, y)| -(probs[i][task][y] as f64).max(1e-300).ln())
                        .sum();
                    loss += nll / own.len().max(1) as f64;
                    right as f64 / own.len().max(1) as f64
                })
                .collect();
            Ok((accuracy, loss))
        };
        let bar = progress_bar(config.verbose, max_steps as u64, 0);
        let (initial_accuracy, initial_loss) = batch_scores(&run.model, run.pad_id)?;
        let mut report = OverfitReport {
            batch_size: rows.len(),
            tasks: classified
                .iter()
                .map(|&t| config.tasks[t].name.clone())
                .collect(),
            initial_accuracy,
            initial_loss,
            memorised: false,
            memorised_at: None,
            steps: 0,
            accuracy: Vec::new(),
            loss: Vec::new(),
            eval_loss: Vec::new(),
        };
        for step in 0..max_steps {
            let started = Instant::now();
            let (loss, total, grad_norm) = step_on(run, &row_refs, &config, 1.0, &self.device)?;
            run.state.train_seconds += started.elapsed().as_secs_f64();
            run.state.global_step += 1;
            run.state.steps.push(StepRecord {
                step: step + 1,
                epoch: 1,
                loss: loss.clone(),
                total,
                lr_factor: 1.0,
                grad_norm,
            });
            let (accuracy, eval_loss) = batch_scores(&run.model, run.pad_id)?;
            report.memorised = accuracy.iter().all(|&a| a == 1.0) && eval_loss < MEMORISED_LOSS;
            if report.memorised && report.memorised_at.is_none() {
                report.memorised_at = Some(step + 1);
            }
            bar.set_message(format!(
                "loss {total:.4} (eval {eval_loss:.4}) accuracy {}",
                accuracy
                    .iter()
                    .map(|a| format!("{a:.2}"))
                    .collect::<Vec<_>>()
                    .join("/")
            ));
            report.accuracy.push(accuracy);
            report.loss.push(loss);
            report.eval_loss.push(eval_loss);
            report.steps = step + 1;
            bar.inc(1);
        }
        bar.finish_and_clear();
        let final_loss = report.eval_loss.last().copied().unwrap_or(initial_loss);
        let message = format!(
            "overfit: batch of {}, loss {initial_loss:.3} -> {final_loss:.4} in {max_steps} steps: {}",
            rows.len(),
            if report.memorised {
                "memorised (every head 100%, loss < 0.05)"
            } else {
                "not memorised"
            }
        );
        log(self.config.verbose, &bar, &message);
        Ok(report)
    }

    /// With `ema_decay`: puts the moving average into the model and returns
    /// a copy of the weights it replaced; `None` without an average.
    fn swap_in_average(&mut self) -> anyhow::Result<Option<HashMap<String, Tensor>>> {
        let Some(run) = self.run.as_mut() else {
            return Ok(None);
        };
        let Some(average) = run.ema.as_ref() else {
            return Ok(None);
        };
        let trained = copy_weights(&run.model)?;
        set_weights(&run.model, average)?;
        Ok(Some(trained))
    }

    /// With `ema_decay` (and no best epoch): the moving average becomes the
    /// model's weights for the test and is saved in `ema/` (the checkpoint
    /// keeps the trained weights and the average, to resume from).
    fn keep_average(&mut self) -> anyhow::Result<()> {
        if self.swap_in_average()?.is_none() {
            return Ok(());
        }
        log(
            self.config.verbose,
            &ProgressBar::hidden(),
            "the weights' moving average is kept (ema_decay)",
        );
        if self.config.output_dir.is_some() {
            self.save_checkpoint_in(EMA_DIR, false)?;
        }
        Ok(())
    }

    /// With `best_epoch`: puts the best epoch's weights back (the checkpoint
    /// keeps the last epoch's, to resume from) and saves them in `best/`.
    fn restore_best(&mut self) -> anyhow::Result<Option<usize>> {
        let Some(run) = self.run.as_mut() else {
            return Ok(None);
        };
        let Some((score, epoch, weights)) = run.best.take() else {
            return Ok(None);
        };
        set_weights(&run.model, &weights)?;
        log(
            self.config.verbose,
            &ProgressBar::hidden(),
            &format!(
                "best epoch: {epoch} (mean validation score {score:.4}); its weights are kept"
            ),
        );
        if self.config.output_dir.is_some() {
            self.save_checkpoint_in(BEST_DIR, false)?;
        }
        Ok(Some(epoch))
    }

    /// The tasks' names, in order.
    fn task_names(&self) -> Vec<String> {
        self.config.tasks.iter().map(|t| t.name.clone()).collect()
    }

    fn save_if_configured(&self) -> anyhow::Result<()> {
        if self.config.output_dir.is_some() {
            self.save_checkpoint()?;
        }
        Ok(())
    }

    /// Writes the checkpoint into `<output>/checkpoint`, atomically.
    pub fn save_checkpoint(&self) -> anyhow::Result<PathBuf> {
        self.save_checkpoint_in(checkpoint::CHECKPOINT_DIR, true)
    }

    /// Writes the model (and, with `optimizer`, AdamW's state) into
    /// `<output>/<name>`, atomically.
    fn save_checkpoint_in(&self, name: &str, optimizer: bool) -> anyhow::Result<PathBuf> {
        let run = self.run_ref()?;
        let data = self.data.as_ref().context("call prepare_data() first")?;
        let out = self
            .config
            .output_dir
            .as_deref()
            .context("no output folder configured")?;
        let dir = out.join(name);
        let info = RunInfo {
            tasks: run.model.tasks().to_vec(),
            label_names: data.label_names(),
            max_len: self.config.max_len,
            dtype: self.dtype.as_str().to_string(),
            base_model: run.model_files.dir.clone(),
            config: self.config.clone(),
        };
        checkpoint::write_atomically(&dir, |tmp: &Path| {
            checkpoint::write_safetensors(&tmp.join(checkpoint::MODEL_FILE), &run.model.weights())?;
            if let Some(opt) = run.optimizer.as_ref().filter(|_| optimizer) {
                checkpoint::write_safetensors(
                    &tmp.join(checkpoint::OPTIMIZER_FILE),
                    &opt.state_tensors()?,
                )?;
            }
            if let Some(average) = run.ema.as_ref().filter(|_| optimizer) {
                checkpoint::write_safetensors(&tmp.join(checkpoint::EMA_FILE), average)?;
            }
            checkpoint::copy_file(
                &run.model_files.config,
                &tmp.join(checkpoint::BERT_CONFIG_FILE),
            )?;
            checkpoint::copy_file(
                &run.model_files.tokenizer,
                &tmp.join(checkpoint::TOKENIZER_FILE),
            )?;
            checkpoint::write_json(&tmp.join(checkpoint::RUN_FILE), &info)?;
            checkpoint::write_json(&tmp.join(checkpoint::STATE_FILE), &run.state)
        })?;
        Ok(dir)
    }
}

/// Forward, loss, backward, clipping and the optimiser step on `rows`; returns
/// each task's loss (None without rows for it), the total and the gradient norm.
#[allow(clippy::type_complexity)]
fn step_on(
    run: &mut Run,
    rows: &[&Example],
    config: &TrainConfig,
    lr_factor: f64,
    device: &Device,
) -> anyhow::Result<(Vec<Option<f32>>, f32, Option<f32>)> {
    let batch = collate(rows, &run.columns, run.pad_id, device)?;
    // Dropout masks are a function of (seed, step), so that a run, and a run
    // resumed from a checkpoint, repeat exactly.
    run.model
        .seed_dropout(dropout_seed(config.seed, run.state.global_step));
    let outputs = run.model.forward(
        &batch.inputs.input_ids,
        Some(&batch.inputs.token_type_ids),
        &batch.inputs.attention_mask,
        true,
        &config.freeze,
    )?;
    let (losses, labels_checked) =
        run.model
            .loss_deferred(&outputs, &batch.labels, &batch.pairs, &run.task_losses)?;
    // The step's one synchronisation: the losses, then the label check (on a
    // GPU, a bad label has made them NaN until now).
    let per_task: Vec<f32> = losses.per_task.to_dtype(DType::F32)?.to_vec1()?;
    labels_checked.verify()?;
    let total = losses.total.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    anyhow::ensure!(
        total.is_finite(),
        "the loss is {total} at step {}",
        run.state.global_step + 1
    );
    let grads = losses.total.backward()?;
    let optimizer = run.optimizer.as_mut().context("nothing to train")?;
    let (grad_norm, scale) = match config.max_grad_norm {
        Some(max_norm) => {
            let norm = optimizer.grad_norm(&grads)?;
            anyhow::ensure!(
                norm.is_finite(),
                "the gradient norm is {norm} at step {}",
                run.state.global_step + 1
            );
            // As torch.nn.utils.clip_grad_norm_: scale down only, by max/(norm + 1e-6).
            (Some(norm as f32), (max_norm / (norm + 1e-6)).min(1.0))
        }
        None => (None, 1.0),
    };
    optimizer.step(&grads, lr_factor, scale)?;
    if let (Some(average), Some(decay)) = (run.ema.as_mut(), config.ema_decay) {
        update_average(average, &run.model, decay)?;
    }
    let loss = (0..per_task.len())
        .map(|t| rows.iter().any(|r| r.task == t).then_some(per_task[t]))
        .collect();
    Ok((loss, total, grad_norm))
}

/// The folder, in the output folder, of the best epoch's model (`best_epoch`).
pub const BEST_DIR: &str = "best";

/// The folder, in the output folder, of the weights' moving average (`ema_decay`).
pub const EMA_DIR: &str = "ema";

/// `average = decay·average + (1 − decay)·weights` for every parameter, in f32.
fn update_average(
    average: &mut HashMap<String, Tensor>,
    model: &MultiTaskModel,
    decay: f64,
) -> candle_core::Result<()> {
    for (name, var) in model.parameters() {
        if let Some(avg) = average.get_mut(&name) {
            // Detached: from a variable, the sum would record an autograd
            // graph holding every earlier average (memory growing each step).
            let now = var.as_detached_tensor().to_dtype(DType::F32)?;
            *avg = (avg.affine(decay, 0.0)? + now.affine(1.0 - decay, 0.0)?)?;
            debug_assert!(!avg.track_op(), "the average records a graph");
        }
    }
    Ok(())
}

/// A copy of every parameter, by name (`weights()` alone shares the
/// parameters' storage, which `Var::set` overwrites).
fn copy_weights(model: &MultiTaskModel) -> candle_core::Result<HashMap<String, Tensor>> {
    model
        .weights()
        .into_iter()
        .map(|(k, v)| Ok((k, v.copy()?)))
        .collect()
}

/// Writes `weights` (by parameter name, any float dtype) into the model's
/// parameters, in the parameters' dtype.
fn set_weights(
    model: &MultiTaskModel,
    weights: &HashMap<String, Tensor>,
) -> candle_core::Result<()> {
    for (name, var) in model.parameters() {
        if let Some(w) = weights.get(&name) {
            var.set(&w.to_dtype(var.dtype())?)?;
        }
    }
    Ok(())
}

/// The dropout seed of the step after `global_step` steps.
fn dropout_seed(seed: u64, global_step: usize) -> u64 {
    seed ^ (global_step as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// Each task's mean batch loss over the steps of `epoch` (1-based).
fn mean_losses(steps: &[StepRecord], epoch: usize) -> Vec<Option<f64>> {
    let tasks = steps.iter().map(|s| s.loss.len()).max().unwrap_or(0);
    (0..tasks)
        .map(|t| {
            let values: Vec<f64> = steps
                .iter()
                .filter(|s| s.epoch == epoch)
                .filter_map(|s| s.loss.get(t).copied().flatten().map(f64::from))
                .collect();
            (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
        })
        .collect()
}

/// The batch sizes the sampler draws from: each task's training examples.
fn sizes(train: &[Vec<Example>]) -> Vec<usize> {
    train.iter().map(Vec::len).collect()
}

/// How many times an epoch visits each task's examples.
fn passes(config: &TrainConfig) -> Vec<usize> {
    config.tasks.iter().map(|t| t.passes).collect()
}

/// `emotion (4 classes), sts (similarity)`.
fn describe_heads(heads: &[TaskHead]) -> String {
    heads
        .iter()
        .map(|h| match h.classes() {
            Some(c) => format!("{} ({c} classes)", h.name),
            None => format!("{} (similarity)", h.name),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn running_losses(
    steps: &[StepRecord],
    epoch: usize,
    tasks: &[String],
    shown_epoch: usize,
    epochs: usize,
) -> String {
    let losses = mean_losses(steps, epoch);
    let fmt = |l: Option<&Option<f64>>| {
        l.copied()
            .flatten()
            .map_or("-".to_string(), |l| format!("{l:.4}"))
    };
    let parts: Vec<String> = tasks
        .iter()
        .enumerate()
        .map(|(t, name)| format!("{name} {}", fmt(losses.get(t))))
        .collect();
    format!("epoch {shown_epoch}/{epochs} loss {}", parts.join(" "))
}

fn by_task(report: &EvalReport) -> BTreeMap<String, TaskScores> {
    report
        .tasks
        .iter()
        .map(|t| (t.task.clone(), t.metrics))
        .collect()
}

/// `emotion acc 0.8149 macro-F1 0.7725 macro-recall 0.7601 | sts Spearman 82.03 ...`
fn describe(report: &EvalReport) -> String {
    report
        .tasks
        .iter()
        .map(|t| format!("{} {}", t.task, t.metrics.describe()))
        .collect::<Vec<_>>()
        .join(" | ")
}

fn progress_bar(show: bool, len: u64, position: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len).with_position(position);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} ({eta}) {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar
}

/// A line on stderr (when verbose) that does not tear the progress bar.
fn log(verbose: bool, bar: &ProgressBar, line: &str) {
    if verbose {
        bar.suspend(|| eprintln!("{line}"));
    }
}
