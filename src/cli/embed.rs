//! `sentence-mtl embed`: sentences in (arguments, a file or stdin, one per
//! line), embeddings out (JSON on stdout, or a `.npy` file), optionally
//! truncated (`--truncate-dim`) and quantised (`--precision`).

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::{DType, Tensor};

use super::device::DeviceArgs;
use super::text::TextPrepArgs;
use crate::model::{
    quantize_embeddings, Pooling, Precision, Ranges, SentenceEncoder, DEFAULT_MODEL,
};

/// Options shared by the commands that run the sentence encoder.
#[derive(Debug, Clone, clap::Args)]
pub struct EncoderArgs {
    /// Model folder or Hugging Face repo id.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Sentences per forward pass.
    #[arg(long, default_value_t = crate::model::encoder::DEFAULT_BATCH_SIZE)]
    pub batch_size: usize,
    /// Pooling, overriding the model's 1_Pooling/config.json; several modes
    /// (comma-separated) are concatenated.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub pooling: Vec<Pooling>,
    /// Text put before every sentence (sentence-transformers' `prompt`).
    #[arg(long, conflicts_with = "prompt_name")]
    pub prompt: Option<String>,
    /// One of the model's named prompts (config_sentence_transformers.json),
    /// e.g. `query`.
    #[arg(long)]
    pub prompt_name: Option<String>,
    /// Do not L2-normalise embeddings, even if the model's pipeline does.
    #[arg(long)]
    pub no_normalize: bool,
    /// Keep the first D values of each embedding (Matryoshka), renormalised
    /// when the pipeline normalises.
    #[arg(long, value_name = "D")]
    pub truncate_dim: Option<usize>,
    /// How sentences are prepared before tokenisation (off by default: the
    /// text as written, as sentence-transformers reads it).
    #[command(flatten)]
    pub text: TextPrepArgs,
    /// Where the encoder runs and in which dtype.
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl EncoderArgs {
    /// Loads the encoder these options describe, with a progress bar for long inputs.
    pub fn load(&self) -> anyhow::Result<SentenceEncoder> {
        let device = self.device.device()?;
        let mut encoder = SentenceEncoder::load(&self.model, self.device.dtype(), &device)?
            .with_batch_size(self.batch_size)
            .with_text_prep(self.text.prep())
            .with_progress(true);
        if !self.pooling.is_empty() {
            encoder = encoder.with_pooling_modes(&self.pooling)?;
        }
        if let Some(prompt) = &self.prompt {
            encoder = encoder.with_prompt(Some(prompt))?;
        }
        if let Some(name) = &self.prompt_name {
            encoder = encoder.with_prompt_name(name)?;
        }
        if self.no_normalize {
            encoder = encoder.with_normalize(false);
        }
        encoder.with_truncate_dim(self.truncate_dim)
    }
}

/// How `embed` writes the embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A JSON array of embedding arrays, in input order, on stdout.
    Json,
    /// A `[N, H]` float32 .npy file (needs --output).
    Npy,
}

/// The options of `sentence-mtl embed`.
#[derive(Debug, clap::Args)]
pub struct EmbedArgs {
    /// Sentences to embed; if none, they are read from --file or stdin, one per line.
    pub sentences: Vec<String>,
    /// File with one sentence per line ("-" for stdin).
    #[arg(long, short)]
    pub file: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Json)]
    pub format: Format,
    /// Output file (required for npy; JSON goes to stdout without it).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// The number type of the output (sentence-transformers' quantize_embeddings).
    #[arg(long, value_enum, default_value_t = Precision::Float32)]
    pub precision: Precision,
    /// int8/uint8: a float32 [K, D] .npy of embeddings whose per-dimension
    /// min and max set the ranges (default: the embeddings being written).
    #[arg(long, value_name = "NPY")]
    pub calibration: Option<PathBuf>,
    /// The encoder to run.
    #[command(flatten)]
    pub encoder: EncoderArgs,
}

/// The sentences named by arguments, `--file`, or piped on stdin.
pub fn read_sentences(
    sentences: &[String],
    file: Option<&std::path::Path>,
) -> anyhow::Result<Vec<String>> {
    if !sentences.is_empty() {
        if file.is_some() {
            bail!("give sentences either as arguments or with --file, not both");
        }
        return Ok(sentences.to_vec());
    }
    let lines = match file {
        Some(path) if path.as_os_str() != "-" => {
            let file = std::fs::File::open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            read_lines(std::io::BufReader::new(file))
                .with_context(|| format!("cannot read {}", path.display()))?
        }
        Some(_) => read_lines(std::io::stdin().lock()).context("cannot read stdin")?,
        None if !std::io::stdin().is_terminal() => {
            read_lines(std::io::stdin().lock()).context("cannot read stdin")?
        }
        None => bail!("no sentences: give them as arguments, with --file, or on stdin"),
    };
    if lines.is_empty() {
        bail!("no sentences in the input");
    }
    Ok(lines)
}

/// One sentence per line; an empty line is an empty sentence (its row is kept,
/// so output row i is input line i).
fn read_lines(reader: impl BufRead) -> std::io::Result<Vec<String>> {
    reader
        .lines()
        .map(|line| line.map(|l| l.strip_suffix('\r').map(str::to_string).unwrap_or(l)))
        .collect()
}

/// Runs `sentence-mtl embed`.
pub fn run(args: EmbedArgs) -> anyhow::Result<()> {
    // Settle where the output goes before the (slow) encoding.
    let npy_path = match (args.format, args.output.as_deref()) {
        (Format::Npy, None) => bail!("--format npy writes a file: give its path with --output"),
        (Format::Npy, Some(path)) => Some(path),
        (Format::Json, _) => None,
    };
    if args.calibration.is_some() && !matches!(args.precision, Precision::Int8 | Precision::Uint8) {
        bail!("--calibration sets int8/uint8 ranges: it needs --precision int8 or uint8");
    }
    let sentences = read_sentences(&args.sentences, args.file.as_deref())?;
    let encoder = args.encoder.load()?;
    let ranges = match &args.calibration {
        Some(path) => Some(read_calibration(path, encoder.embedding_dim())?),
        None => None,
    };
    let texts: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let embeddings = encoder.encode(&texts)?.to_dtype(DType::F32)?;
    let quantized = quantize_embeddings(&embeddings, args.precision, ranges.as_ref())?;
    match npy_path {
        Some(path) => quantized.write_npy(path),
        None => write_json(&quantized.to_json_rows(), args.output.as_deref()),
    }
}

/// The ranges of a `[K, dim]` float .npy of calibration embeddings.
fn read_calibration(path: &std::path::Path, dim: usize) -> anyhow::Result<Ranges> {
    let calibration = Tensor::read_npy(path)
        .with_context(|| format!("cannot read calibration embeddings {}", path.display()))?;
    if calibration.rank() != 2 || calibration.dim(1)? != dim || !calibration.dtype().is_float() {
        bail!(
            "{}: calibration embeddings must be a float [K, {dim}] array, got {:?} {:?}",
            path.display(),
            calibration.dtype(),
            calibration.dims()
        );
    }
    Ranges::from_rows(&calibration.to_dtype(DType::F32)?.to_vec2::<f32>()?)
        .with_context(|| format!("calibration embeddings {}", path.display()))
}

fn write_json(rows: &serde_json::Value, output: Option<&std::path::Path>) -> anyhow::Result<()> {
    let mut out: Box<dyn Write> = match output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    serde_json::to_writer(&mut out, rows)?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}
