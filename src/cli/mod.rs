//! The `sentence-mtl` command line: one file per subcommand.

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

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
    /// Train the multi-task model: TweetEval's emotion and sentiment heads, or
    /// any tasks (`--task`, `--config`).
    Train(Box<train::TrainArgs>),
    /// Evaluate a checkpoint on a split.
    Eval(eval::EvalArgs),
    /// Predict every head's labels for sentences.
    Predict(predict::PredictArgs),
}

impl Cli {
    /// Parses the process's arguments (exiting with clap's message on a bad
    /// one), noting which options of `train` were given, which `--config`
    /// needs: given options override the file, defaults do not.
    pub fn parse_args() -> Self {
        Self::try_parse_args_from(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    /// [`parse_args`](Self::parse_args) from `args` (the program's name first).
    pub fn try_parse_args_from<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let command = Self::command();
        let matches = command.clone().try_get_matches_from(args)?;
        let mut cli = Self::from_arg_matches(&matches)?;
        if let (Command::Train(args), Some(("train", m))) = (&mut cli.command, matches.subcommand())
        {
            let train = command
                .find_subcommand("train")
                .expect("train is a subcommand");
            let given = train
                .get_arguments()
                .map(|arg| arg.get_id().as_str())
                .filter(|id| m.value_source(id) == Some(ValueSource::CommandLine))
                .map(String::from)
                .collect();
            args.given = Some(given);
        }
        Ok(cli)
    }
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Embed(args) => embed::run(args),
        Command::Similarity(args) => similarity::run(args),
        Command::Sts(args) => sts::run(args),
        Command::Search(args) => search::run_search(args),
        Command::Mine(args) => search::run_mine(args),
        Command::Train(args) => train::run(*args),
        Command::Eval(args) => eval::run(args),
        Command::Predict(args) => predict::run(args),
    }
}
