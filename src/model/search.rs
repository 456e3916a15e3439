//! Semantic search and paraphrase mining over embeddings, with the fused
//! [`cosine_top_k`](crate::ops::cosine_top_k) underneath: a corpus is searched
//! chunk by chunk and the chunks' best lists merged, so memory is that of one
//! chunk (of embeddings, and for text corpora of encoded text), never a
//! query × corpus matrix. Quantised embeddings are searched too: int8/uint8 by
//! dot product, binary/ubinary by Hamming distance.

use anyhow::{bail, ensure};
use candle_core::{DType, Tensor};
use serde::Serialize;

use super::encoder::SentenceEncoder;
use super::npy::NpyMatrix;
use super::quantize::{Precision, QuantizedEmbeddings, QuantizedValues};

/// Corpus rows per chunk by default: 16k rows of 384 floats are 24 MiB.
pub const DEFAULT_CHUNK_ROWS: usize = 16384;

/// One corpus row found for a query.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Hit {
    /// The corpus row.
    pub index: usize,
    /// Its similarity: cosine for float embeddings, the integer dot product for
    /// int8/uint8, minus the Hamming distance for binary/ubinary (higher is
    /// closer in every case).
    pub score: f64,
}

/// Best first: the higher score, then the lower index.
fn rank(hits: &mut Vec<Hit>, k: usize) {
    hits.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.index.cmp(&b.index)));
    hits.truncate(k);
}

fn check_k_and_rows(k: usize, rows: usize) -> anyhow::Result<()> {
    ensure!(k >= 1, "top-k must be at least 1");
    ensure!(rows >= 1, "the corpus has no rows");
    Ok(())
}

/// The `k` corpus rows most cosine-similar to each query (`[Q, H]` against
/// `[M, H]`), best first, ties to the lower index; the corpus is taken
/// `chunk_rows` rows at a time.
pub fn search_embeddings(
    queries: &Tensor,
    corpus: &Tensor,
    k: usize,
    chunk_rows: usize,
) -> anyhow::Result<Vec<Vec<Hit>>> {
    search_chunks(queries, corpus.dim(0)?, k, chunk_rows, |start, len| {
        Ok(corpus.narrow(0, start, len)?)
    })
}

/// [`search_embeddings`] over a corpus in an `.npy` file, read `chunk_rows`
/// rows at a time: memory is one chunk's, whatever the file's size.
pub fn search_npy(
    queries: &Tensor,
    corpus: &mut NpyMatrix,
    k: usize,
    chunk_rows: usize,
) -> anyhow::Result<Vec<Vec<Hit>>> {
    let m = corpus.rows;
    check_k_and_rows(k, m)?;
    ensure!(
        queries.rank() == 2 && queries.dim(1)? == corpus.cols,
        "queries of shape {:?} against a corpus of {} values per row",
        queries.dims(),
        corpus.cols
    );
    let queries = queries.to_dtype(DType::F32)?;
    search_chunks(&queries, m, k, chunk_rows, |start, len| {
        corpus.read_rows(start, len, queries.device())
    })
}

/// The search loop of every corpus form: `chunk(start, len)` gives corpus rows
/// `start..start + len` as embeddings, `chunk_rows` at a time, and each chunk's
/// best rows are merged into one list per query. Memory is one chunk's.
fn search_chunks(
    queries: &Tensor,
    rows: usize,
    k: usize,
    chunk_rows: usize,
    mut chunk: impl FnMut(usize, usize) -> anyhow::Result<Tensor>,
) -> anyhow::Result<Vec<Vec<Hit>>> {
    check_k_and_rows(k, rows)?;
    let mut lists = vec![Vec::new(); queries.dim(0)?];
    let mut start = 0;
    while start < rows {
        let len = chunk_rows.max(1).min(rows - start);
        merge_chunk(&mut lists, queries, &chunk(start, len)?, start, k)?;
        start += len;
    }
    Ok(lists)
}

/// Merges the top-k of `queries` in one corpus chunk (its first row `offset`).
fn merge_chunk(
    lists: &mut [Vec<Hit>],
    queries: &Tensor,
    chunk: &Tensor,
    offset: usize,
    k: usize,
) -> anyhow::Result<()> {
    let top = crate::ops::cosine_top_k(queries, chunk, k)?;
    let scores = top.scores.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let indices = top.indices.to_vec2::<u32>()?;
    for ((list, s), ix) in lists.iter_mut().zip(scores).zip(indices) {
        list.extend(s.into_iter().zip(ix).map(|(score, i)| Hit {
            index: offset + i as usize,
            score,
        }));
        rank(list, k);
    }
    Ok(())
}

/// Searches quantised embeddings of one precision: int8/uint8 by dot product,
/// binary/ubinary by Hamming distance (score = −distance), float32 by cosine.
pub fn search_quantized(
    queries: &QuantizedEmbeddings,
    corpus: &QuantizedEmbeddings,
    k: usize,
) -> anyhow::Result<Vec<Vec<Hit>>> {
    check_k_and_rows(k, corpus.rows)?;
    ensure!(
        queries.precision == corpus.precision && queries.width == corpus.width,
        "queries ({:?}, width {}) and corpus ({:?}, width {}) must share precision and width",
        queries.precision,
        queries.width,
        corpus.precision,
        corpus.width
    );
    let w = corpus.width;
    let score_all = |score: &dyn Fn(usize, usize) -> f64| -> Vec<Vec<Hit>> {
        (0..queries.rows)
            .map(|q| {
                let mut hits: Vec<Hit> = (0..corpus.rows)
                    .map(|i| Hit {
                        index: i,
                        score: score(q, i),
                    })
                    .collect();
                rank(&mut hits, k);
                hits
            })
            .collect()
    };
    Ok(match (&queries.values, &corpus.values, corpus.precision) {
        (QuantizedValues::F32(q), QuantizedValues::F32(c), _) => {
            let device = candle_core::Device::Cpu;
            let qt = Tensor::from_slice(q, (queries.rows, w), &device)?;
            let ct = Tensor::from_slice(c, (corpus.rows, w), &device)?;
            return search_embeddings(&qt, &ct, k, DEFAULT_CHUNK_ROWS);
        }
        (QuantizedValues::I8(q), QuantizedValues::I8(c), Precision::Int8) => {
            score_all(&|a, b| dot_i8(row(q, w, a), row(c, w, b)))
        }
        (QuantizedValues::U8(q), QuantizedValues::U8(c), Precision::Uint8) => {
            score_all(&|a, b| dot_u8(row(q, w, a), row(c, w, b)))
        }
        (QuantizedValues::I8(q), QuantizedValues::I8(c), Precision::Binary) => {
            // The stored byte is the packed byte minus 128: the bits differ alike.
            let (q, c): (&[u8], &[u8]) = (bytemuck::cast_slice(q), bytemuck::cast_slice(c));
            score_all(&|a, b| -hamming(row(q, w, a), row(c, w, b)))
        }
        (QuantizedValues::U8(q), QuantizedValues::U8(c), Precision::Ubinary) => {
            score_all(&|a, b| -hamming(row(q, w, a), row(c, w, b)))
        }
        _ => bail!("mismatched quantised values for {:?}", corpus.precision),
    })
}

/// Row `i` of a row-major matrix of width `w`.
fn row<T>(v: &[T], w: usize, i: usize) -> &[T] {
    &v[i * w..(i + 1) * w]
}

/// The number of bits that differ.
fn hamming(x: &[u8], y: &[u8]) -> f64 {
    x.iter()
        .zip(y)
        .map(|(&u, &v)| (u ^ v).count_ones())
        .sum::<u32>() as f64
}

fn dot_i8(x: &[i8], y: &[i8]) -> f64 {
    x.iter()
        .zip(y)
        .map(|(&u, &v)| u as i32 * v as i32)
        .sum::<i32>() as f64
}

fn dot_u8(x: &[u8], y: &[u8]) -> f64 {
    x.iter()
        .zip(y)
        .map(|(&u, &v)| u as i64 * v as i64)
        .sum::<i64>() as f64
}

impl SentenceEncoder {
    /// The `k` corpus texts most similar to each query, best first: the corpus is
    /// encoded and searched `chunk_rows` texts at a time, so only one chunk's
    /// embeddings are held at once.
    pub fn search(
        &self,
        queries: &[&str],
        corpus: &[&str],
        k: usize,
        chunk_rows: usize,
    ) -> anyhow::Result<Vec<Vec<Hit>>> {
        check_k_and_rows(k, corpus.len())?;
        let q = self.encode(queries)?;
        search_chunks(&q, corpus.len(), k, chunk_rows, |start, len| {
            self.encode(&corpus[start..start + len])
        })
    }
}

/// One pair found by [`paraphrase_mine`]: rows `i < j` and their cosine.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Pair {
    /// The first row.
    pub i: usize,
    /// The second row, after `i`.
    pub j: usize,
    /// Their cosine similarity.
    pub score: f64,
}

/// The most similar pairs within one set of embeddings (sentence-transformers'
/// `paraphrase_mining`): each row's `k` nearest other rows, every pair once,
/// best first (ties by `(i, j)`).
pub fn paraphrase_mine(
    embeddings: &Tensor,
    k: usize,
    chunk_rows: usize,
) -> anyhow::Result<Vec<Pair>> {
    let n = embeddings.dim(0)?;
    check_k_and_rows(k, n)?;
    // One more than k: each row finds itself (or an identical row) too.
    let lists = search_embeddings(embeddings, embeddings, k + 1, chunk_rows)?;
    let mut pairs = std::collections::BTreeMap::new();
    for (i, hits) in lists.into_iter().enumerate() {
        for hit in hits.into_iter().filter(|h| h.index != i).take(k) {
            let key = (i.min(hit.index), i.max(hit.index));
            pairs.entry(key).or_insert(hit.score);
        }
    }
    let mut pairs: Vec<Pair> = pairs
        .into_iter()
        .map(|((i, j), score)| Pair { i, j, score })
        .collect();
    pairs.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then((a.i, a.j).cmp(&(b.i, b.j)))
    });
    Ok(pairs)
}
