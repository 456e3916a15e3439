//! `sentence-mtl train`: fine-tunes the multi-task model: by default the two
//! TweetEval heads (emotion, sentiment), or any tasks given with `--task` or
//! in a settings file (`--config`).
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
use crate::train::{
    ClassWeighting, MultiTaskTrainer, OverfitConfig, Settings, TaskSpec, TrainConfig,
};

/// The options of `sentence-mtl train`.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// The TweetEval folder, with one folder per task (`emotion/`, `sentiment/`),
    /// as in the `datasets/` folder of the benchmark's repository
    /// (cardiffnlp/tweeteval on GitHub): the two-task command's data.
    #[arg(long, value_name = "DIR", required_unless_present_any = ["task", "config"])]
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
    /// Settings from a file: a TOML or JSON table of the run's settings
    /// (`TrainConfig`'s fields: `epochs = 4`, `freeze = "lower:1"`, `[[tasks]]`),
    /// or a checkpoint (its folder or `multitask.json`) to rerun its settings.
    /// Options given on the command line override the file; the file
    /// overrides the defaults.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The options given on the command line, as clap names them; set by
    /// [`Cli::parse_args`](super::Cli::parse_args), needed with `--config`.
    #[arg(skip)]
    pub given: Option<Vec<String>>,
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
    /// Print the run's settings (every field, after `--config` and the options)
    /// as TOML that `--config` reads back, and exit without training.
    #[arg(long)]
    pub print_config: bool,
    /// Where training runs and in which dtype.
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl TrainArgs {
    /// The tasks these options name, with their weights.
    pub fn tasks(&self) -> anyhow::Result<Vec<TaskSpec>> {
        let mut tasks = self.listed_tasks();
        self.set_task_options(&mut tasks, |_| true)?;
        Ok(tasks)
    }

    /// `--data`'s two tasks, then the `--task`s.
    fn listed_tasks(&self) -> Vec<TaskSpec> {
        let mut tasks = match &self.data {
            Some(data) => TrainConfig::tweeteval_tasks(data, &self.task_a, &self.task_b),
            None => Vec::new(),
        };
        tasks.extend(self.task.iter().cloned());
        tasks
    }

    /// Writes the per-task options over `tasks`: `--weight-a` and `--weight-b`
    /// where `given` says they were given, every `--task-weight` and
    /// `--task-passes`.
    fn set_task_options(
        &self,
        tasks: &mut [TaskSpec],
        given: impl Fn(&str) -> bool,
    ) -> anyhow::Result<()> {
        for (t, (option, w)) in [("weight_a", self.weight_a), ("weight_b", self.weight_b)]
            .into_iter()
            .enumerate()
        {
            if let (true, Some(task)) = (given(option), tasks.get_mut(t)) {
                task.weight = w;
            }
        }
        for (name, weight) in &self.task_weight {
            named_task(tasks, "--task-weight", name)?.weight = *weight;
        }
        for (name, passes) in &self.task_passes {
            named_task(tasks, "--task-passes", name)?.passes = *passes;
        }
        Ok(())
    }

    /// The trainer configuration these options describe: with `--config`, the
    /// file's settings over the defaults and the options given over both.
    pub fn to_config(&self) -> anyhow::Result<TrainConfig> {
        let Some(path) = &self.config else {
            return Ok(self.options_config(self.tasks()?));
        };
        let given = self.given.as_ref().ok_or_else(|| {
            anyhow::anyhow!("--config needs the options given: parse with Cli::parse_args")
        })?;
        let is_given = |option: &str| given.iter().any(|g| g == option);
        let mut settings = Settings::read(path)?;
        for option in given {
            settings.remove(config_field(option));
        }
        // The tasks come from the options if any names them, else from the file.
        let tasks_given = ["data", "task", "task_a", "task_b"]
            .iter()
            .any(|o| is_given(o));
        let tasks = if tasks_given {
            self.tasks()?
        } else {
            Vec::new()
        };
        let mut config = settings.apply(&self.options_config(tasks))?;
        if !tasks_given {
            self.set_task_options(&mut config.tasks, is_given)?;
        }
        if let (true, Some(overfit)) = (is_given("overfit_steps"), config.overfit.as_mut()) {
            overfit.max_steps = self.overfit_steps;
        }
        anyhow::ensure!(
            !config.tasks.is_empty(),
            "no tasks: give --data or --task, or list [[tasks]] in {}",
            path.display()
        );
        Ok(config)
    }

    /// The configuration of the options alone (defaults where not given).
    fn options_config(&self, tasks: Vec<TaskSpec>) -> TrainConfig {
        TrainConfig {
            tasks,
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
        }
    }
}

/// The configuration field an option of `train` sets, which the option then
/// overrides in a settings file (most options share their field's name; the
/// device options and the per-task edits name no field, so remove nothing).
fn config_field(option: &str) -> &str {
    match option {
        "output" => "output_dir",
        "no_decay_bias_norm" => "decay_bias_and_norm",
        "no_test" => "test_at_end",
        "quiet" => "verbose",
        "overfit_batch" => "overfit",
        "data" | "task" | "task_a" | "task_b" => "tasks",
        same => same,
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
    let config = args.to_config()?;
    if args.print_config {
        config.validate()?;
        print!("{}", toml::to_string(&config)?);
        return Ok(());
    }
    let mut trainer = MultiTaskTrainer::new(config, args.device.device()?, args.device.dtype())?;
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

    /// A settings file for one test, under the temp folder.
    fn settings_file(name: &str, text: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("sentence-mtl-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// `train` parsed as the binary parses it (noting the options given).
    fn train_args(args: &[&str]) -> TrainArgs {
        let argv = ["sentence-mtl", "train"].iter().chain(args);
        match crate::cli::Cli::try_parse_args_from(argv).unwrap().command {
            crate::cli::Command::Train(args) => *args,
            _ => unreachable!(),
        }
    }

    const TWO_TASKS: &str = "[[tasks]]\nname = \"emo\"\ndir = \"f/emotion\"\n\
        kind = \"classification\"\nweight = 3\n[[tasks]]\nname = \"sts\"\n\
        dir = \"f/stsb\"\nkind = \"sts\"\nweight = 0.3\n";

    /// Defaults < the file < the options given: an option given at its
    /// default value still overrides the file.
    #[test]
    fn a_settings_file_sits_between_the_defaults_and_the_options_given() {
        let file = settings_file(
            "between.toml",
            &format!(
                "epochs = 4\nseed = 7\nlabel_smoothing = 0.3\nverbose = false\n\
                 head_lr = 0.002\n{TWO_TASKS}"
            ),
        );
        let path = file.to_str().unwrap();
        let config = train_args(&["--config", path, "--epochs", "3", "--seed", "9"])
            .to_config()
            .unwrap();
        assert_eq!((config.epochs, config.seed), (3, 9), "given options win");
        assert_eq!((config.label_smoothing, config.head_lr), (0.3, 0.002));
        assert!(!config.verbose);
        assert_eq!(
            config.output_dir,
            Some("runs/mtl".into()),
            "a default stays"
        );
        let tasks: Vec<(&str, f64)> = config
            .tasks
            .iter()
            .map(|t| (t.name.as_str(), t.weight))
            .collect();
        assert_eq!(
            tasks,
            [("emo", 3.0), ("sts", 0.3)],
            "the file's tasks and weights"
        );

        // Per-task options edit the file's tasks; --data replaces them.
        let edited = train_args(&[
            "--config",
            path,
            "--weight-b",
            "0.5",
            "--task-passes",
            "emo=2",
        ])
        .to_config()
        .unwrap();
        let tasks: Vec<(f64, usize)> = edited.tasks.iter().map(|t| (t.weight, t.passes)).collect();
        assert_eq!(tasks, [(3.0, 2), (0.5, 1)]);
        let replaced = train_args(&["--config", path, "--data", "d"])
            .to_config()
            .unwrap();
        assert_eq!(
            replaced.tasks,
            TrainConfig::tweeteval_tasks("d".as_ref(), "emotion", "sentiment")
        );
        assert!(train_args(&["--config", path, "--task-weight", "x=1"])
            .to_config()
            .is_err());
        // --overfit-steps alone edits the file's overfit mode.
        let overfit = settings_file(
            "overfit.toml",
            &format!("overfit = {{ batch_size = 4, max_steps = 50 }}\n{TWO_TASKS}"),
        );
        let overfit = overfit.to_str().unwrap();
        let steps = |extra: &[&str]| {
            let args = [&["--config", overfit][..], extra].concat();
            train_args(&args).to_config().unwrap().overfit
        };
        let file_overfit = OverfitConfig {
            batch_size: 4,
            max_steps: 50,
        };
        assert_eq!(steps(&[]), Some(file_overfit));
        let longer = steps(&["--overfit-steps", "100"]);
        assert_eq!(
            longer,
            Some(OverfitConfig {
                max_steps: 100,
                ..file_overfit
            })
        );
        // The flags flip the file's booleans only when given.
        let quiet = train_args(&["--config", path, "--no-test"])
            .to_config()
            .unwrap();
        assert!(!quiet.test_at_end && !quiet.verbose);
    }

    /// What `--print-config` prints, `--config` reads back as the same run.
    #[test]
    fn printed_settings_read_back_as_the_same_configuration() {
        let config = train_args(&[
            "--data",
            "d",
            "--task",
            "s=x:sts",
            "--freeze",
            "lower:1",
            "--max-grad-norm",
            "1",
            "--overfit-batch",
            "--backbone-lr",
            "3e-5",
        ])
        .to_config()
        .unwrap();
        let file = settings_file("printed.toml", &toml::to_string(&config).unwrap());
        let read = train_args(&["--config", file.to_str().unwrap()])
            .to_config()
            .unwrap();
        assert_eq!(read, config);
    }

    /// The tuned setting the README points to is the flags it stands for.
    #[test]
    fn the_shipped_tuned_settings_are_the_chosen_flags() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/tweeteval-tuned.toml");
        let from_file = train_args(&["--config", path, "--data", "d"])
            .to_config()
            .unwrap();
        let flags = [
            "--data",
            "d",
            "--emoji",
            "text",
            "--unescape",
            "--freeze",
            "lower:1",
            "--label-smoothing",
            "0.4",
        ];
        assert_eq!(from_file, train_args(&flags).to_config().unwrap());
        assert_ne!(from_file, train_args(&["--data", "d"]).to_config().unwrap());
        // The text options (flattened from `TextPrepArgs`) override it too.
        let keep = train_args(&["--config", path, "--data", "d", "--emoji", "keep"]);
        assert_eq!(keep.to_config().unwrap().emoji, EmojiMode::Keep);
    }

    #[test]
    fn a_settings_file_without_tasks_or_with_a_bad_setting_is_refused() {
        let no_tasks = settings_file("no-tasks.toml", "epochs = 2\n");
        assert!(Cli::try_parse_from(["train"]).is_err(), "no task, no file");
        let err = train_args(&["--config", no_tasks.to_str().unwrap()])
            .to_config()
            .unwrap_err()
            .to_string();
        assert!(err.contains("no tasks"), "{err}");
        let typo = settings_file("typo.json", "{\"label_smothing\": 0.1}");
        let err = train_args(&["--config", typo.to_str().unwrap(), "--data", "d"])
            .to_config()
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown setting `label_smothing`"), "{err}");
        let missing = train_args(&["--config", "/nonexistent/x.toml", "--data", "d"]).to_config();
        assert!(format!("{:#}", missing.unwrap_err()).contains("/nonexistent/x.toml"));
        // Parsed without noting the options given, --config is refused rather
        // than letting the defaults override the file.
        let plain = Cli::parse_from(["train", "--config", no_tasks.to_str().unwrap()]).train;
        assert!(plain.to_config().is_err());
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
