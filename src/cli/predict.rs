//! `sentence-mtl predict`: every classification head's label and class probabilities for
//! sentences given as arguments, or one per line on stdin. One JSON object per
//! sentence, one per line, in input order.

use std::io::BufRead;
use std::path::PathBuf;

use super::device::DeviceArgs;
use crate::train::checkpoint;
use crate::train::evaluate::predict;

/// The options of `sentence-mtl predict`.
#[derive(Debug, Clone, clap::Args)]
pub struct PredictArgs {
    /// A checkpoint folder, or the output folder of a training run.
    #[arg(long, value_name = "DIR")]
    pub checkpoint: PathBuf,
    /// Sentences to classify; none reads one per line from stdin.
    pub sentences: Vec<String>,
    /// Sentences per forward pass.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Where the checkpoint runs and in which dtype.
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Runs `sentence-mtl predict`.
pub fn run(args: PredictArgs) -> anyhow::Result<()> {
    let sentences = if args.sentences.is_empty() {
        std::io::stdin()
            .lock()
            .lines()
            .collect::<Result<Vec<_>, _>>()?
    } else {
        args.sentences.clone()
    };
    anyhow::ensure!(
        !sentences.is_empty(),
        "no sentences: give them as arguments or one per line on stdin"
    );
    let device = args.device.device()?;
    let loaded = checkpoint::load(&args.checkpoint, &device, args.device.dtype_override())?;
    for p in predict(&loaded, &sentences, args.batch_size, &device)? {
        println!("{}", serde_json::to_string(&p)?);
    }
    Ok(())
}
