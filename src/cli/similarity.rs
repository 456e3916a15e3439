//! `sentence-mtl similarity`: the cosine-similarity matrix of sentences and a
//! table of named pairs (the notebook's Task 1), optionally drawn as a heat map.

use std::path::PathBuf;

use anyhow::bail;
use candle_core::DType;

use super::embed::{read_sentences, EncoderArgs};
use crate::plots;

/// The notebook's sentences, used when none are given.
pub const NOTEBOOK_SENTENCES: [&str; 5] = [
    "I love natural language processing.",
    "NLP is a fascinating field.",
    "The Eiffel Tower is in Paris.",
    "Transformers are used in deep learning.",
    "Paris is the capital of France.",
];

/// The notebook's pairs of [`NOTEBOOK_SENTENCES`].
pub const NOTEBOOK_PAIRS: [(usize, usize); 4] = [(0, 1), (0, 2), (2, 4), (1, 3)];

/// The options of `sentence-mtl similarity`.
#[derive(Debug, clap::Args)]
pub struct SimilarityArgs {
    /// Sentences to compare; if none, the notebook's five (or --file / stdin).
    pub sentences: Vec<String>,
    /// File with one sentence per line ("-" for stdin).
    #[arg(long, short)]
    pub file: Option<PathBuf>,
    /// Pairs to list, as I,J (0-based), e.g. `--pair 0,1 --pair 2,4`; default:
    /// the notebook's pairs for its sentences, every pair otherwise.
    #[arg(long = "pair", value_parser = parse_pair)]
    pub pairs: Vec<(usize, usize)>,
    /// Also draw the matrix as a heat map PNG.
    #[arg(long)]
    pub heatmap: Option<PathBuf>,
    /// TrueType font for the heat map's labels (default: a system font if found).
    #[arg(long)]
    pub font: Option<PathBuf>,
    /// The encoder to run.
    #[command(flatten)]
    pub encoder: EncoderArgs,
}

fn parse_pair(text: &str) -> Result<(usize, usize), String> {
    let (i, j) = text
        .split_once(',')
        .ok_or_else(|| format!("{text:?} is not a pair I,J"))?;
    let index = |s: &str| {
        s.trim()
            .parse::<usize>()
            .map_err(|_| format!("{s:?} is not a sentence index"))
    };
    Ok((index(i)?, index(j)?))
}

/// Runs `sentence-mtl similarity`.
pub fn run(args: SimilarityArgs) -> anyhow::Result<()> {
    let use_notebook = args.sentences.is_empty() && args.file.is_none();
    let sentences: Vec<String> = if use_notebook {
        NOTEBOOK_SENTENCES.iter().map(|s| s.to_string()).collect()
    } else {
        read_sentences(&args.sentences, args.file.as_deref())?
    };
    let pairs: Vec<(usize, usize)> = match (&args.pairs[..], use_notebook) {
        ([], true) => NOTEBOOK_PAIRS.to_vec(),
        ([], false) => (0..sentences.len())
            .flat_map(|i| (i + 1..sentences.len()).map(move |j| (i, j)))
            .collect(),
        (given, _) => given.to_vec(),
    };
    if let Some(&(i, j)) = pairs
        .iter()
        .find(|(i, j)| *i >= sentences.len() || *j >= sentences.len())
    {
        bail!(
            "pair ({i}, {j}) names a sentence beyond the {} given (indices start at 0)",
            sentences.len()
        );
    }

    let encoder = args.encoder.load()?;
    let texts: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let embeddings = encoder.encode(&texts)?;
    let matrix = crate::ops::cosine_similarity_matrix(&embeddings, &embeddings)?
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?;

    print!("{}", format_report(&sentences, &matrix, &pairs));
    if let Some(path) = &args.heatmap {
        let font = plots::register_font(args.font.as_deref())?;
        if !font {
            eprintln!(
                "no TrueType font found: drawing the heat map without text; the table above \
                 gives the labels. Install fonts-dejavu-core, set SENTENCE_MTL_FONT or pass --font."
            );
        }
        let labels: Vec<String> = (sentences.iter().enumerate())
            .map(|(i, sentence)| shorten(&format!("[{i}] {sentence}"), 40))
            .collect();
        plots::heatmap(path, &labels, &matrix, font)?;
        eprintln!("heat map written to {}", path.display());
    }
    Ok(())
}

/// The sentences, the matrix and the pairs as plain-text tables.
pub fn format_report(
    sentences: &[String],
    matrix: &[Vec<f32>],
    pairs: &[(usize, usize)],
) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "Sentences:");
    for (i, s) in sentences.iter().enumerate() {
        let _ = writeln!(out, "  [{i}] {s}");
    }
    let _ = writeln!(out, "\nCosine similarity:");
    let _ = write!(out, "{:>6}", "");
    for j in 0..sentences.len() {
        let _ = write!(out, "{:>8}", format!("[{j}]"));
    }
    let _ = writeln!(out);
    for (i, row) in matrix.iter().enumerate() {
        let _ = write!(out, "{:>6}", format!("[{i}]"));
        for value in row {
            let _ = write!(out, "{value:>8.4}");
        }
        let _ = writeln!(out);
    }
    if !pairs.is_empty() {
        let _ = writeln!(out, "\nPairs:");
        let _ = writeln!(
            out,
            "  {:>10}  {:<45}  sentence B",
            "similarity", "sentence A"
        );
        for &(i, j) in pairs {
            let _ = writeln!(
                out,
                "  {:>10.4}  {:<45}  {}",
                matrix[i][j],
                shorten(&format!("[{i}] {}", sentences[i]), 45),
                shorten(&format!("[{j}] {}", sentences[j]), 45)
            );
        }
    }
    out
}

/// At most `max` characters, with an ellipsis when cut.
fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let kept: String = text.chars().take(max.saturating_sub(1)).collect();
        format!("{kept}…")
    }
}
