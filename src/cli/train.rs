//! `sentence-mtl train`: fine-tunes the multi-task model: by default the two
//! TweetEval heads (emotion, sentiment), or any tasks given with `--task`.
//!
//! The defaults are the reference recipe (`TrainConfig::default()`, the recipe
//! of `benchmarks/train_torch.py`). Progress and per-epoch metrics go to stderr;
//! the final metrics are one JSON line on stdout; the checkpoint, `metrics.json`
//! and the PNG plots go to `--output`.

use std::path::PathBuf;

use super::device::DeviceArgs;
use super::text::TextPrepArgs;
use crate::data::SamplerKind;
use crate::model::multitask::Freeze;
use crate::model::Pooling;
use crate::train::{ClassWeighting, MultiTaskTrainer, OverfitConfig, TaskSpec, TrainConfig};

/// The options of `sentence-mtl train`.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// The TweetEval folder, with one folder per task (`emotion/`, `sentiment/`),
    /// as in the `datasets/` folder of the benchmark's repository
    /// (cardiffnlp/tweeteval on GitHub): the two-task command's data.
    #[arg(long, value_name = "DIR", required_unless_present = "task")]
    pub data: Option<PathBuf>,
    /// A task, `NAME=DIR[:KIND]` (or `DIR[:KIND]`, named after the folder),
    /// KIND `classification` (TweetEval layout, the default) or `sts` (STS-B
    /// layout, CoSENT on the embeddings); repeat for each task. Replaces the
    /// two `--data` tasks; with `--data` too, those two come first.
    #[arg(long, value_name = "NAME=DIR[:KIND]")]
    pub task: Vec<TaskSpec>,
    /// A task's weight in the total loss, `NAME=W` (default 1); repeatable.
    #[arg(long, value_name = "NAME=W", value_parser = parse_task_weight)]
    pub task_weight: Vec<(String, f64)>,
    /// How many times an epoch visits a task's training examples, `NAME=K`
    /// (default 1): K above 1 oversamples a small task; repeatable.
    #[arg(long, value_name = "NAME=K", value_parser = parse_task_passes)]
    pub task_passes: Vec<(String, usize)>,
    /// A local model folder or a Hugging Face repo id.
    #[arg(long, default_value = crate::model::DEFAULT_MODEL)]
    pub model: String,
    /// Head A's task folder in `--data`.
    #[arg(long, default_value = "emotion")]
    pub task_a: String,
    /// Head B's task folder in `--data`.
    #[arg(long, default_value = "sentiment")]
    pub task_b: String,
    /// Where the checkpoint, metrics.json and the plots go.
    #[arg(long, value_name = "DIR", default_value = "runs/mtl")]
    pub output: PathBuf,
    /// What to freeze: none, all, backbone, head:NAME (one task's head; head-a
    /// and head-b are the first two tasks'), embeddings, lower:N (the
    /// embeddings and the lowest N layers).
    #[arg(long, default_value = "none")]
    pub freeze: Freeze,
    /// Passes over the training data.
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Rows per training batch, mixed from the tasks.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Rows per forward pass when evaluating.
    #[arg(long, default_value_t = 64)]
    pub eval_batch_size: usize,
    /// Truncation length in tokens (`[CLS]` and `[SEP]` included).
    #[arg(long, default_value_t = 64)]
    pub max_len: usize,
    /// AdamW learning rate of the encoder (embeddings and layers).
    #[arg(long, default_value_t = 5e-5)]
    pub backbone_lr: f64,
    /// AdamW learning rate of the heads.
    #[arg(long, default_value_t = 1e-3)]
    pub head_lr: f64,
    /// Layer-wise learning-rate decay (the top layer at --backbone-lr, each
    /// one below at this factor times the one above; 1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub layer_decay: f64,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Exempt biases and LayerNorm weights from weight decay.
    #[arg(long)]
    pub no_decay_bias_norm: bool,
    /// Fraction of the steps spent in linear warmup.
    #[arg(long, default_value_t = 0.06)]
    pub warmup_ratio: f64,
    /// Clip the global gradient norm to this (no clipping by default).
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// How the tasks are mixed into batches.
    #[arg(long, value_enum, default_value_t = SamplerKind::Proportional)]
    pub sampler: SamplerKind,
    /// Seed of the heads' initialisation, the batches and dropout.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Weight of the first task's loss in the total.
    #[arg(long, default_value_t = 1.0)]
    pub weight_a: f64,
    /// Weight of the second task's loss in the total.
    #[arg(long, default_value_t = 1.0)]
    pub weight_b: f64,
    /// How classification tasks weigh their classes: none, or balanced
    /// (`n / (k·n_c)` on the training split).
    #[arg(long, value_enum, default_value_t = ClassWeighting::None)]
    pub class_weighting: ClassWeighting,
    /// Label smoothing of the classification losses, in [0, 1]: the target
    /// puts 1 − ε + ε/C on the label and ε/C on each other class.
    #[arg(long, value_name = "EPS", default_value_t = 0.0)]
    pub label_smoothing: f64,
    /// Dropout probability on the pooled vector the classification heads read
    /// (training only; 0 = none, the recipe's).
    #[arg(long, value_name = "P", default_value_t = 0.0)]
    pub head_dropout: f64,
    /// How token states become the sentence vector the heads read (one mode;
    /// mean is the recipe's).
    #[arg(long, value_enum, default_value_t = Pooling::Mean)]
    pub pooling: Pooling,
    /// How tweets are prepared before tokenisation (all off in the recipe);
    /// the checkpoint keeps the settings for `eval` and `predict`.
    #[command(flatten)]
    pub text: TextPrepArgs,
    /// Stop after this many steps (writing a checkpoint); `--resume` carries on.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Also write a checkpoint every N steps.
    #[arg(long, value_name = "N")]
    pub checkpoint_every: Option<usize>,
    /// Overfit mode: memorise one mixed batch of this many rows (8 if no value).
    #[arg(long, value_name = "ROWS", num_args = 0..=1, default_missing_value = "8")]
    pub overfit_batch: Option<usize>,
    /// Overfit mode's step budget (every step is taken).
    #[arg(long, default_value_t = 30)]
    pub overfit_steps: usize,
    /// Carry on from the checkpoint in --output (same settings).
    #[arg(long)]
    pub resume: bool,
    /// Skip the evaluation on the test splits at the end.
    #[arg(long)]
    pub no_test: bool,
    /// Keep the epoch with the best validation scores (mean macro-F1, or
    /// Spearman for similarity tasks): tested at the end, saved in `best/`.
    #[arg(long)]
    pub best_epoch: bool,
    /// Validate, test and keep an exponential moving average of the weights,
    /// updated after every step with this decay (e.g. 0.995), saved in `ema/`
    #[arg(long, value_name = "DECAY")]
    pub ema_decay: Option<f64>,
    /// No progress bar or log lines on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// Where training runs and in which dtype.
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl TrainArgs {
    /// The tasks these options name, with their weights.
    pub fn tasks(&self) -> anyhow::Result<Vec<TaskSpec>> {
        let mut tasks = match &self.data {
            Some(data) => TrainConfig::tweeteval_tasks(data, &self.task_a, &self.task_b),
            None => Vec::new(),
        };
        tasks.extend(self.task.iter().cloned());
        for (t, w) in [self.weight_a, self.weight_b].into_iter().enumerate() {
            if let Some(task) = tasks.get_mut(t) {
                task.weight = w;
            }
        }
        for (name, weight) in &self.task_weight {
            named_task(&mut tasks, "--task-weight", name)?.weight = *weight;
        }
        for (name, passes) in &self.task_passes {
            named_task(&mut tasks, "--task-passes", name)?.passes = *passes;
        }
        Ok(tasks)
    }

    /// The trainer configuration these options describe.
    pub fn to_config(&self) -> anyhow::Result<TrainConfig> {
        Ok(TrainConfig {
            tasks: self.tasks()?,
            model: self.model.clone(),
            output_dir: Some(self.output.clone()),
            freeze: self.freeze.clone(),
            epochs: self.epochs,
            batch_size: self.batch_size,
            eval_batch_size: self.eval_batch_size,
            max_len: self.max_len,
            backbone_lr: self.backbone_lr,
            head_lr: self.head_lr,
            layer_decay: self.layer_decay,
            weight_decay: self.weight_decay,
            decay_bias_and_norm: !self.no_decay_bias_norm,
            adam: Default::default(),
            warmup_ratio: self.warmup_ratio,
            max_grad_norm: self.max_grad_norm,
            sampler: self.sampler,
            seed: self.seed,
            class_weighting: self.class_weighting,
            label_smoothing: self.label_smoothing,
            head_dropout: self.head_dropout,
            pooling: self.pooling,
            emoji: self.text.emoji,
            unescape: self.text.unescape,
            split_hashtags: self.text.split_hashtags,
            emoticons: self.text.emoticons,
            shorten_elongations: self.text.shorten_elongations,
            max_steps: self.max_steps,
            checkpoint_every: self.checkpoint_every,
            overfit: self.overfit_batch.map(|batch_size| OverfitConfig {
                batch_size,
                max_steps: self.overfit_steps,
            }),
            test_at_end: !self.no_test,
            best_epoch: self.best_epoch,
            ema_decay: self.ema_decay,
            verbose: !self.quiet,
            resume: self.resume,
        })
    }
}

/// The task a per-task flag names.
fn named_task<'a>(
    tasks: &'a mut [TaskSpec],
    flag: &str,
    name: &str,
) -> anyhow::Result<&'a mut TaskSpec> {
    tasks
        .iter_mut()
        .find(|t| t.name == name)
        .ok_or_else(|| anyhow::anyhow!("{flag} {name}=..: no task named {name}"))
}

/// `NAME=VALUE`, as the per-task flags take it.
fn parse_named<T: std::str::FromStr>(s: &str, what: &str) -> Result<(String, T), String>
where
    T::Err: std::fmt::Display,
{
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME={}", what.to_uppercase()))?;
    let value = value
        .parse()
        .map_err(|e| format!("{s:?}: the {what} is not valid: {e}"))?;
    Ok((name.to_string(), value))
}

fn parse_task_weight(s: &str) -> Result<(String, f64), String> {
    parse_named(s, "weight")
}

fn parse_task_passes(s: &str) -> Result<(String, usize), String> {
    match parse_named(s, "passes")? {
        (_, 0) => Err(format!("{s:?}: the passes must be at least 1")),
        named => Ok(named),
    }
}

/// Runs `sentence-mtl train`.
pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let mut trainer = MultiTaskTrainer::new(
        args.to_config()?,
        args.device.device()?,
        args.device.dtype(),
    )?;
    trainer.prepare_data()?;
    trainer.setup()?;
    let report = trainer.train()?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::data::TaskKind;
    use crate::model::text::EmojiMode;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        train: TrainArgs,
    }

    /// The command's defaults are the recipe: `TrainConfig::default()`.
    #[test]
    fn defaults_are_the_recipe() {
        let args = Cli::parse_from(["train", "--data", "d"]).train;
        let config = args.to_config().unwrap();
        let expected = TrainConfig {
            tasks: TrainConfig::tweeteval_tasks("d".as_ref(), "emotion", "sentiment"),
            output_dir: Some("runs/mtl".into()),
            ..TrainConfig::default()
        };
        assert_eq!(config, expected);
    }

    #[test]
    fn label_smoothing_and_head_dropout_flags() {
        let parse = |flag: &str, value: &str| {
            Cli::parse_from(["train", "--data", "d", flag, value])
                .train
                .to_config()
                .unwrap()
        };
        assert_eq!(parse("--label-smoothing", "0.1").label_smoothing, 0.1);
        assert_eq!(parse("--head-dropout", "0.1").head_dropout, 0.1);
        for (flag, bad, message) in [
            (
                "--label-smoothing",
                "1.5",
                "label_smoothing must be in [0, 1]",
            ),
            ("--head-dropout", "1", "head_dropout must be in [0, 1)"),
        ] {
            let err = parse(flag, bad).validate().unwrap_err().to_string();
            assert!(err.contains(message), "{err}");
        }
    }

    #[test]
    fn overfit_and_freeze_flags() {
        let args = Cli::parse_from([
            "train",
            "--data",
            "d",
            "--overfit-batch",
            "--freeze",
            "lower:2",
        ])
        .train;
        let config = args.to_config().unwrap();
        assert_eq!(
            config.overfit,
            Some(OverfitConfig {
                batch_size: 8,
                max_steps: 30
            })
        );
        assert_eq!(config.freeze, Freeze::Lower(2));
        let cls = Cli::parse_from(["train", "--data", "d", "--pooling", "cls"]).train;
        assert_eq!(cls.to_config().unwrap().pooling, Pooling::Cls);
        assert_eq!(
            cls.to_config().unwrap().text_prep(),
            crate::model::text::TextPrep::default()
        );
        let prep = Cli::parse_from([
            "train",
            "--data",
            "d",
            "--emoji",
            "text",
            "--unescape",
            "--split-hashtags",
            "--emoticons",
            "--shorten-elongations",
        ])
        .train;
        assert_eq!(
            prep.to_config().unwrap().text_prep(),
            crate::model::text::TextPrep {
                emoji: EmojiMode::Text,
                unescape: true,
                split_hashtags: true,
                emoticons: true,
                shorten_elongations: true,
            }
        );
        assert!(Cli::try_parse_from(["train", "--data", "d", "--emoji", "names"]).is_err());
        assert!(Cli::try_parse_from(["train", "--data", "d", "--freeze", "some"]).is_err());
    }

    /// `--task` adds tasks of any kind; without `--data` they are all the tasks.
    #[test]
    fn task_flags_name_folders_kinds_and_weights() {
        let args = Cli::parse_from([
            "train",
            "--task",
            "emo=data/emotion",
            "--task",
            "../shared/data/stsb:sts",
            "--task-weight",
            "stsb=0.5",
        ])
        .train;
        let tasks = args.to_config().unwrap().tasks;
        assert_eq!(tasks.len(), 2);
        assert_eq!(
            (tasks[0].name.as_str(), tasks[0].kind),
            ("emo", TaskKind::Classification)
        );
        assert_eq!(tasks[0].dir, std::path::PathBuf::from("data/emotion"));
        assert_eq!(
            (tasks[1].name.as_str(), tasks[1].kind),
            ("stsb", TaskKind::Sts)
        );
        assert_eq!((tasks[0].weight, tasks[1].weight), (1.0, 0.5));

        let both = Cli::parse_from(["train", "--data", "d", "--task", "s=x:sts"]).train;
        let names: Vec<String> = both
            .to_config()
            .unwrap()
            .tasks
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(names, ["emotion", "sentiment", "s"]);

        assert!(Cli::try_parse_from(["train"]).is_err(), "no task at all");
        assert!(Cli::try_parse_from(["train", "--task", "x=d:topic"]).is_err());
        let unknown = Cli::parse_from(["train", "--data", "d", "--task-weight", "x=1"]).train;
        assert!(unknown
            .to_config()
            .unwrap_err()
            .to_string()
            .contains("no task named x"));
    }

    /// `--task-passes` oversamples one task; zero, a fraction or an unknown
    /// task is refused.
    #[test]
    fn task_passes_flag() {
        let args = Cli::parse_from(["train", "--data", "d", "--task-passes", "emotion=3"]).train;
        let passes: Vec<usize> = args.tasks().unwrap().iter().map(|t| t.passes).collect();
        assert_eq!(passes, [3, 1]);
        for bad in ["emotion=0", "emotion=1.5", "emotion"] {
            assert!(
                Cli::try_parse_from(["train", "--data", "d", "--task-passes", bad]).is_err(),
                "{bad}"
            );
        }
        let unknown = Cli::parse_from(["train", "--data", "d", "--task-passes", "x=2"]).train;
        assert!(unknown
            .tasks()
            .unwrap_err()
            .to_string()
            .contains("no task named x"));
    }

    #[test]
    fn ema_decay_flag() {
        let config = |extra: &[&str]| {
            let args = [&["train", "--data", "d"], extra].concat();
            Cli::parse_from(args).train.to_config().unwrap()
        };
        assert_eq!(config(&[]).ema_decay, None);
        assert_eq!(config(&["--ema-decay", "0.995"]).ema_decay, Some(0.995));
    }
}
