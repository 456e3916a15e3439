//! `sentence-mtl predict`: both heads' labels and class probabilities for
//! sentences given as arguments, or one per line on stdin. One JSON object per
//! sentence, one per line, in input order.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::PathBuf;

use serde::Serialize;

use crate::data::batch::{pad_id, tokenize_unpadded};
use crate::data::{Example, Head};
use crate::train::checkpoint;
use crate::train::evaluate::{argmax, predict_probabilities};

use super::train::DeviceArgs;

#[derive(Debug, Clone, clap::Args)]
pub struct PredictArgs {
    /// A checkpoint folder, or the output folder of a training run.
    #[arg(long, value_name = "DIR")]
    pub checkpoint: PathBuf,
    /// Sentences to classify; none reads one per line from stdin.
    pub sentences: Vec<String>,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// One head's answer for one sentence.
#[derive(Debug, Serialize)]
pub struct HeadPrediction {
    pub label: String,
    pub probabilities: BTreeMap<String, f32>,
}

#[derive(Debug, Serialize)]
pub struct Prediction {
    pub text: String,
    /// By task name (e.g. `emotion`, `sentiment`).
    #[serde(flatten)]
    pub heads: BTreeMap<String, HeadPrediction>,
}

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
    let loaded = checkpoint::load(&args.checkpoint, &device)?;
    for p in predict(&loaded, &sentences, args.batch_size, &device)? {
        println!("{}", serde_json::to_string(&p)?);
    }
    Ok(())
}

/// Both heads' predictions for each sentence, in input order.
pub fn predict(
    loaded: &checkpoint::LoadedCheckpoint,
    sentences: &[String],
    batch_size: usize,
    device: &candle_core::Device,
) -> anyhow::Result<Vec<Prediction>> {
    let info = &loaded.info;
    let examples: Vec<Example> = tokenize_unpadded(&loaded.tokenizer, sentences, info.max_len)?
        .into_iter()
        // The label is unused: prediction reads both heads.
        .map(|(input_ids, type_ids)| Example {
            input_ids,
            type_ids,
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
