//! `sentence-mtl search` (the best corpus rows for each query) and
//! `sentence-mtl mine` (the most similar pairs within one file), as JSON.

use std::path::{Path, PathBuf};

use anyhow::bail;
use candle_core::{DType, Tensor};
use serde::Serialize;

use super::embed::{read_sentences, EncoderArgs};
use crate::model::npy::NpyMatrix;
use crate::model::quantize::{quantize_embeddings, Precision, Ranges};
use crate::model::search::{
    paraphrase_mine, search_npy, search_quantized, Hit, DEFAULT_CHUNK_ROWS,
};
use crate::model::SentenceEncoder;

/// The options of `sentence-mtl search`.
#[derive(Debug, clap::Args)]
pub struct SearchArgs {
    /// Queries; if none, they are read from --file or stdin, one per line.
    pub queries: Vec<String>,
    /// File with one query per line ("-" for stdin).
    #[arg(long, short)]
    pub file: Option<PathBuf>,
    /// The corpus: a text file (one row per line), or a float [M, D] .npy of
    /// its embeddings (from `embed --format npy`), read --chunk-rows rows at a time.
    #[arg(long, value_name = "FILE")]
    pub corpus: PathBuf,
    /// For an .npy corpus: its texts, one per line, to print beside the hits.
    #[arg(long, value_name = "FILE")]
    pub corpus_text: Option<PathBuf>,
    /// Hits per query.
    #[arg(long, default_value_t = 10)]
    pub top_k: usize,
    /// Corpus rows encoded and searched at a time (bounds the memory).
    #[arg(long, default_value_t = DEFAULT_CHUNK_ROWS)]
    pub chunk_rows: usize,
    /// Search quantised embeddings (int8/uint8 ranges from the corpus; binary by
    /// Hamming distance).
    #[arg(long, value_enum, default_value_t = Precision::Float32)]
    pub precision: Precision,
    /// The encoder of the queries (and of a text corpus).
    #[command(flatten)]
    pub encoder: EncoderArgs,
}

#[derive(Serialize)]
struct HitOut<'a> {
    index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    score: f64,
}

#[derive(Serialize)]
struct QueryOut<'a> {
    query: &'a str,
    hits: Vec<HitOut<'a>>,
}

fn lines(path: &Path) -> anyhow::Result<Vec<String>> {
    read_sentences(&[], Some(path))
}

/// The corpus as embeddings (an .npy file, read chunk by chunk) or texts.
enum Corpus {
    Embeddings(NpyMatrix),
    Texts(Vec<String>),
}

fn read_corpus(path: &Path, encoder: &SentenceEncoder) -> anyhow::Result<Corpus> {
    if path.extension().is_some_and(|e| e == "npy") {
        let matrix = NpyMatrix::open(path)?;
        let dim = encoder.embedding_dim();
        if matrix.cols != dim {
            bail!(
                "{}: an .npy corpus must be float [M, {dim}] embeddings of this encoder, got [{}, {}]",
                path.display(),
                matrix.rows,
                matrix.cols
            );
        }
        if matrix.rows == 0 {
            bail!("{}: the corpus has no rows", path.display());
        }
        return Ok(Corpus::Embeddings(matrix));
    }
    let texts = lines(path)?;
    Ok(Corpus::Texts(texts))
}

/// Runs `sentence-mtl search`.
pub fn run_search(args: SearchArgs) -> anyhow::Result<()> {
    if args.top_k == 0 {
        bail!("--top-k must be at least 1");
    }
    let queries = read_sentences(&args.queries, args.file.as_deref())?;
    let encoder = args.encoder.load()?;
    let corpus = read_corpus(&args.corpus, &encoder)?;
    let texts: Vec<&str> = queries.iter().map(String::as_str).collect();
    let (hits, corpus_texts): (Vec<Vec<Hit>>, Option<Vec<String>>) = match corpus {
        Corpus::Texts(rows) => {
            let refs: Vec<&str> = rows.iter().map(String::as_str).collect();
            let hits = if args.precision == Precision::Float32 {
                encoder.search(&texts, &refs, args.top_k, args.chunk_rows)?
            } else {
                let c = encoder.encode(&refs)?.to_dtype(DType::F32)?;
                quantized(&encoder.encode(&texts)?, &c, args.precision, args.top_k)?
            };
            (hits, Some(rows))
        }
        Corpus::Embeddings(mut c) => {
            let q = encoder.encode(&texts)?.to_dtype(DType::F32)?;
            let hits = if args.precision == Precision::Float32 {
                search_npy(&q, &mut c, args.top_k, args.chunk_rows)?
            } else {
                // The int8/uint8 ranges come from the whole corpus.
                let all = c.read_rows(0, c.rows, q.device())?;
                quantized(&q, &all, args.precision, args.top_k)?
            };
            let rows = args.corpus_text.as_deref().map(lines).transpose()?;
            if let Some(rows) = &rows {
                if rows.len() != c.rows {
                    bail!(
                        "--corpus-text has {} lines, the corpus {} rows",
                        rows.len(),
                        c.rows
                    );
                }
            }
            (hits, rows)
        }
    };
    let out: Vec<QueryOut> = queries
        .iter()
        .zip(&hits)
        .map(|(query, hits)| QueryOut {
            query,
            hits: hits
                .iter()
                .map(|h| HitOut {
                    index: h.index,
                    text: corpus_texts.as_ref().map(|t| t[h.index].as_str()),
                    score: h.score,
                })
                .collect(),
        })
        .collect();
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}

/// Both sides quantised with the corpus's int8/uint8 ranges, then searched.
fn quantized(
    q: &Tensor,
    c: &Tensor,
    precision: Precision,
    k: usize,
) -> anyhow::Result<Vec<Vec<Hit>>> {
    let ranges = Ranges::from_rows(&c.to_dtype(DType::F32)?.to_vec2::<f32>()?)?;
    let qq = quantize_embeddings(q, precision, Some(&ranges))?;
    let cq = quantize_embeddings(c, precision, Some(&ranges))?;
    search_quantized(&qq, &cq, k)
}

/// The options of `sentence-mtl mine`.
#[derive(Debug, clap::Args)]
pub struct MineArgs {
    /// File with one sentence per line ("-" for stdin).
    #[arg(long, short)]
    pub file: PathBuf,
    /// Nearest other sentences considered per sentence.
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    /// The encoder.
    #[command(flatten)]
    pub encoder: EncoderArgs,
}

#[derive(Serialize)]
struct PairOut<'a> {
    score: f64,
    i: usize,
    j: usize,
    text_i: &'a str,
    text_j: &'a str,
}

/// Runs `sentence-mtl mine`.
pub fn run_mine(args: MineArgs) -> anyhow::Result<()> {
    if args.top_k == 0 {
        bail!("--top-k must be at least 1");
    }
    let sentences = lines(&args.file)?;
    let encoder = args.encoder.load()?;
    let texts: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let embeddings = encoder.encode(&texts)?.to_dtype(DType::F32)?;
    let pairs = paraphrase_mine(&embeddings, args.top_k, DEFAULT_CHUNK_ROWS)?;
    let out: Vec<PairOut> = pairs
        .iter()
        .map(|p| PairOut {
            score: p.score,
            i: p.i,
            j: p.j,
            text_i: &sentences[p.i],
            text_j: &sentences[p.j],
        })
        .collect();
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}
