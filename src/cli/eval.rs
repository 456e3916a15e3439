//! `sentence-mtl eval`: scores a checkpoint on a split of every task. The
//! metrics and the confusion matrices are one JSON line on stdout, a readable
//! summary goes to stderr, and each task's confusion matrix is drawn as a PNG.

use std::path::PathBuf;

use super::device::DeviceArgs;
use crate::data::Split;
use crate::plots;
use crate::train::checkpoint;
use crate::train::evaluate::evaluate_checkpoint;

/// The options of `sentence-mtl eval`.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// A checkpoint folder, or the output folder of a training run.
    #[arg(long, value_name = "DIR")]
    pub checkpoint: PathBuf,
    /// A folder holding one folder per task, named as the folders trained on
    /// (default: the folders the checkpoint was trained on).
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// The split to score.
    #[arg(long, value_enum, default_value_t = Split::Test)]
    pub split: Split,
    /// Sentences per forward pass.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Where the confusion-matrix PNGs go (default: the --checkpoint folder as given).
    #[arg(long, value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// Where the checkpoint runs and in which dtype.
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Runs `sentence-mtl eval`.
pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let device = args.device.device()?;
    let loaded = checkpoint::load(&args.checkpoint, &device, args.device.dtype_override())?;
    let report = evaluate_checkpoint(
        &loaded,
        args.data.as_deref(),
        args.split,
        args.batch_size,
        &device,
    )?;

    let out = args
        .output
        .clone()
        .unwrap_or_else(|| args.checkpoint.clone());
    std::fs::create_dir_all(&out)?;
    for t in &report.tasks {
        eprintln!(
            "{} {}: {} loss {:.4}",
            t.task,
            args.split,
            t.metrics.describe(),
            t.loss
        );
        let Some(confusion) = &t.confusion else {
            continue;
        };
        let path = out.join(format!("confusion_{}_{}.png", t.task, args.split));
        match plots::confusion_matrix(
            &path,
            &format!("{} ({}): confusion matrix", t.task, args.split),
            &t.label_names,
            &confusion.counts,
        ) {
            Ok(()) => eprintln!("  confusion matrix: {}", path.display()),
            Err(e) => eprintln!("  warning: no confusion-matrix plot: {e:#}"),
        }
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
