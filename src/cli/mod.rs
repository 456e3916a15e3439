//! The `sentence-mtl` command line: one file per subcommand.

use clap::{Parser, Subcommand};

pub mod device;
pub mod embed;
pub mod eval;
pub mod predict;
pub mod search;
pub mod similarity;
pub mod sts;
pub mod text;
pub mod train;

#[derive(Debug, Parser)]
#[command(
    name = "sentence-mtl",
    version,
    about = "Sentence embeddings and multi-task learning on BERT, with fused CPU/CUDA ops"
)]
/// The parsed command line.
pub struct Cli {
    /// The subcommand and its options.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Encode sentences into embeddings (JSON or .npy).
    Embed(embed::EmbedArgs),
    /// Cosine-similarity matrix of sentences (the notebook's Task 1).
    Similarity(similarity::SimilarityArgs),
    /// The best corpus rows for each query (semantic search), as JSON.
    Search(search::SearchArgs),
    /// The most similar sentence pairs within one file, as JSON.
    Mine(search::MineArgs),
    /// Score the encoder on the STS benchmark (cosine Spearman and Pearson, x100).
    Sts(sts::StsArgs),
    /// Train the dual-head multi-task model on TweetEval.
    Train(train::TrainArgs),
    /// Evaluate a checkpoint on a split.
    Eval(eval::EvalArgs),
    /// Predict both heads' labels for sentences.
    Predict(predict::PredictArgs),
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Embed(args) => embed::run(args),
        Command::Similarity(args) => similarity::run(args),
        Command::Sts(args) => sts::run(args),
        Command::Search(args) => search::run_search(args),
        Command::Mine(args) => search::run_mine(args),
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Predict(args) => predict::run(args),
    }
}
