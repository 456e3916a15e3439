//! `sentence-mtl sts`: scores the encoder on the STS benchmark (cosine of the two
//! sentences' embeddings against the human ratings) and prints one JSON line.

use std::path::PathBuf;

use serde::Serialize;

use super::embed::EncoderArgs;
use crate::data::{load_stsb, stsb_split_path, Split};
use crate::train::{evaluate_sts, StsReport};

/// The options of `sentence-mtl sts`.
#[derive(Debug, clap::Args)]
pub struct StsArgs {
    /// The STS-B folder (`stsb-en-{train,dev,test}.csv`).
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// The split to score (`dev` and `val` are the same).
    #[arg(long, value_enum, default_value_t = Split::Test)]
    pub split: Split,
    /// The encoder to score.
    #[command(flatten)]
    pub encoder: EncoderArgs,
}

#[derive(Serialize)]
struct Output<'a> {
    model: &'a str,
    file: String,
    #[serde(flatten)]
    report: StsReport,
}

/// Runs `sentence-mtl sts`.
pub fn run(args: StsArgs) -> anyhow::Result<()> {
    let pairs = load_stsb(&args.data, args.split)?;
    let encoder = args.encoder.load()?;
    let report = evaluate_sts(&encoder, &pairs)?;
    eprintln!(
        "STS-B {}: {} pairs, cosine Spearman {:.2}, Pearson {:.2}",
        args.split, report.pairs, report.spearman, report.pearson
    );
    let output = Output {
        model: &args.encoder.model,
        file: stsb_split_path(&args.data, args.split)
            .display()
            .to_string(),
        report,
    };
    println!("{}", serde_json::to_string(&output)?);
    Ok(())
}
