//! Semantic search and paraphrase mining (`model::search`): chunked search
//! equals a brute-force search of the whole corpus (ties to the lower index) for
//! every chunk size, quantised search equals integer dot products and Hamming
//! distances computed here, and bad input is an `Err`.

use crate::bert_support::model_files;
use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use sentence_mtl::model::{
    paraphrase_mine, quantize_embeddings, search_embeddings, search_quantized, Hit, Precision,
    QuantizedValues, SentenceEncoder,
};
use sentence_mtl::ops::reference::cosine::cosine_top_k as reference_top_k;

const H: usize = 24;

/// Random rows in [-1, 1), with row `dup.1` a copy of row `dup.0` (an exact tie).
fn random_rows(rng: &mut StdRng, rows: usize, dup: Option<(usize, usize)>) -> Vec<f32> {
    let mut v: Vec<f32> = (0..rows * H).map(|_| rng.random_range(-1.0..1.0)).collect();
    if let Some((from, to)) = dup {
        let src = v[from * H..(from + 1) * H].to_vec();
        v[to * H..(to + 1) * H].copy_from_slice(&src);
    }
    v
}

fn tensor(v: &[f32]) -> Tensor {
    Tensor::from_slice(v, (v.len() / H, H), &Device::Cpu).unwrap()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Asserts `got` lists the reference's indices in order, scores within f32
/// rounding.
fn assert_hits_match(got: &[Vec<Hit>], want: &[Vec<(usize, f64)>], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: queries");
    for (q, (g, w)) in got.iter().zip(want).enumerate() {
        let got_ix: Vec<usize> = g.iter().map(|h| h.index).collect();
        let want_ix: Vec<usize> = w.iter().map(|h| h.0).collect();
        assert_eq!(got_ix, want_ix, "{what}: query {q}");
        for (h, (_, s)) in g.iter().zip(w) {
            assert!((h.score - s).abs() <= 1e-5, "{what}: {} vs {s}", h.score);
        }
    }
}

#[test]
fn chunked_search_equals_brute_force_for_every_chunk_size() {
    let mut rng = StdRng::seed_from_u64(14);
    let queries = random_rows(&mut rng, 5, None);
    // Row 61 repeats row 10: both score alike, and 10 must come first.
    let corpus = random_rows(&mut rng, 103, Some((10, 61)));
    // Query 0 is row 10 itself, so the tie is at the top of its list.
    let mut queries = queries;
    queries[..H].copy_from_slice(&corpus[10 * H..11 * H]);
    for k in [1, 2, 10, 103, 500] {
        let want = reference_top_k(&f64s(&queries), &f64s(&corpus), H, k);
        for chunk_rows in [1, 7, 61, 103, 100_000] {
            let got =
                search_embeddings(&tensor(&queries), &tensor(&corpus), k, chunk_rows).unwrap();
            assert_hits_match(&got, &want, &format!("k {k}, chunks of {chunk_rows}"));
            assert!(got.iter().all(|l| l.len() == k.min(103)));
        }
    }
    let top = search_embeddings(&tensor(&queries), &tensor(&corpus), 2, 7).unwrap();
    assert_eq!((top[0][0].index, top[0][1].index), (10, 61));
    assert_eq!(top[0][0].score, top[0][1].score);
}

/// Brute force over quantised rows: `score(query row, corpus row)`, best first,
/// ties to the lower index.
fn brute_force<T>(
    q: &[T],
    c: &[T],
    w: usize,
    k: usize,
    score: impl Fn(&[T], &[T]) -> f64,
) -> Vec<Vec<(usize, f64)>> {
    q.chunks(w)
        .map(|qr| {
            let mut s: Vec<(usize, f64)> =
                c.chunks(w).map(|cr| score(qr, cr)).enumerate().collect();
            s.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            s.truncate(k);
            s
        })
        .collect()
}

fn hamming(x: &[u8], y: &[u8]) -> f64 {
    // Bit by bit, not by count_ones, to check the library's packing-aware count.
    let mut d = 0;
    for (a, b) in x.iter().zip(y) {
        for bit in 0..8 {
            d += ((a >> bit) & 1 != (b >> bit) & 1) as u32;
        }
    }
    d as f64
}

#[test]
fn quantised_search_equals_brute_force_on_the_quantised_values() {
    let mut rng = StdRng::seed_from_u64(15);
    let q = tensor(&random_rows(&mut rng, 4, None));
    let c = tensor(&random_rows(&mut rng, 57, Some((3, 40))));
    let k = 9;
    for precision in [
        Precision::Int8,
        Precision::Uint8,
        Precision::Binary,
        Precision::Ubinary,
    ] {
        let ranges = sentence_mtl::model::Ranges::from_rows(&c.to_vec2::<f32>().unwrap()).unwrap();
        let qq = quantize_embeddings(&q, precision, Some(&ranges)).unwrap();
        let cq = quantize_embeddings(&c, precision, Some(&ranges)).unwrap();
        let w = cq.width;
        let want = match (&qq.values, &cq.values) {
            (QuantizedValues::I8(a), QuantizedValues::I8(b)) if precision == Precision::Int8 => {
                brute_force(a, b, w, k, |x, y| {
                    x.iter().zip(y).map(|(&u, &v)| u as f64 * v as f64).sum()
                })
            }
            (QuantizedValues::U8(a), QuantizedValues::U8(b)) if precision == Precision::Uint8 => {
                brute_force(a, b, w, k, |x, y| {
                    x.iter().zip(y).map(|(&u, &v)| u as f64 * v as f64).sum()
                })
            }
            (QuantizedValues::I8(a), QuantizedValues::I8(b)) => {
                // binary: each byte is the packed bits minus 128.
                let unsign = |v: &[i8]| {
                    v.iter()
                        .map(|&x| (x as i16 + 128) as u8)
                        .collect::<Vec<u8>>()
                };
                brute_force(&unsign(a), &unsign(b), w, k, |x, y| -hamming(x, y))
            }
            (QuantizedValues::U8(a), QuantizedValues::U8(b)) => {
                brute_force(a, b, w, k, |x, y| -hamming(x, y))
            }
            _ => panic!("{precision:?}: unexpected values"),
        };
        let got = search_quantized(&qq, &cq, k).unwrap();
        assert_hits_match(&got, &want, &format!("{precision:?}"));
    }
    // float32 "quantisation" is plain cosine search.
    let qq = quantize_embeddings(&q, Precision::Float32, None).unwrap();
    let cq = quantize_embeddings(&c, Precision::Float32, None).unwrap();
    assert_eq!(
        search_quantized(&qq, &cq, k).unwrap(),
        search_embeddings(&q, &c, k, 16).unwrap()
    );
}

#[test]
fn paraphrase_mining_lists_each_pair_once_best_first() {
    let mut rng = StdRng::seed_from_u64(16);
    let mut rows = random_rows(&mut rng, 40, Some((5, 33)));
    // Row 20 is row 7 slightly moved: the second-best pair.
    for d in 0..H {
        rows[20 * H + d] = rows[7 * H + d] + 0.01 * rng.random_range(-1.0f32..1.0);
    }
    let k = 3;
    let pairs = paraphrase_mine(&tensor(&rows), k, 9).unwrap();
    assert_eq!((pairs[0].i, pairs[0].j), (5, 33));
    assert_eq!((pairs[1].i, pairs[1].j), (7, 20));
    assert!(pairs.windows(2).all(|w| w[0].score >= w[1].score));
    // Exactly the pairs {i, j} with j among i's k nearest other rows.
    let all = reference_top_k(&f64s(&rows), &f64s(&rows), H, 40);
    let mut want = std::collections::BTreeSet::new();
    for (i, list) in all.iter().enumerate() {
        for &(j, _) in list.iter().filter(|h| h.0 != i).take(k) {
            want.insert((i.min(j), i.max(j)));
        }
    }
    let got: std::collections::BTreeSet<(usize, usize)> =
        pairs.iter().map(|p| (p.i, p.j)).collect();
    assert_eq!(got.len(), pairs.len(), "a pair listed twice");
    assert!(pairs.iter().all(|p| p.i < p.j));
    assert_eq!(got, want);
}

#[test]
fn searching_with_no_rows_a_k_of_zero_or_other_widths_is_an_error() {
    let mut rng = StdRng::seed_from_u64(17);
    let q = tensor(&random_rows(&mut rng, 2, None));
    let c = tensor(&random_rows(&mut rng, 5, None));
    let err = search_embeddings(&q, &c, 0, 8).unwrap_err().to_string();
    assert!(err.contains("top-k"), "{err}");
    let empty = Tensor::zeros((0, H), DType::F32, &Device::Cpu).unwrap();
    let err = search_embeddings(&q, &empty, 3, 8).unwrap_err().to_string();
    assert!(err.contains("no rows"), "{err}");
    let narrow = c.narrow(1, 0, H - 1).unwrap();
    assert!(search_embeddings(&q, &narrow, 3, 8).is_err());
    let qq = quantize_embeddings(&q, Precision::Binary, None).unwrap();
    let cq = quantize_embeddings(&c, Precision::Ubinary, None).unwrap();
    let err = search_quantized(&qq, &cq, 2).unwrap_err().to_string();
    assert!(err.contains("precision"), "{err}");
    assert!(paraphrase_mine(&c, 0, 8).is_err());
}

#[test]
fn encoder_search_in_chunks_finds_the_paraphrase_first() {
    let encoder = SentenceEncoder::from_files(&model_files(), DType::F32, &Device::Cpu).unwrap();
    let corpus = [
        "The stock market crashed today.",
        "A man is playing the guitar.",
        "It is raining in London.",
        "The cat sleeps on the sofa.",
        "Share prices plunged this morning.",
    ];
    let queries = ["Someone plays a guitar.", "Stocks fell sharply."];
    let whole = search_embeddings(
        &encoder.encode(&queries).unwrap(),
        &encoder.encode(&corpus).unwrap(),
        5,
        100,
    )
    .unwrap();
    let chunked = encoder.search(&queries, &corpus, 5, 2).unwrap();
    assert_eq!(whole.len(), 2);
    for (w, c) in whole.iter().zip(&chunked) {
        let wi: Vec<usize> = w.iter().map(|h| h.index).collect();
        let ci: Vec<usize> = c.iter().map(|h| h.index).collect();
        assert_eq!(wi, ci);
        for (a, b) in w.iter().zip(c) {
            assert!((a.score - b.score).abs() <= 1e-5);
        }
    }
    assert_eq!(chunked[0][0].index, 1);
    let finance: Vec<usize> = chunked[1][..2].iter().map(|h| h.index).collect();
    assert!(finance.contains(&0) && finance.contains(&4), "{chunked:?}");
}

#[test]
fn an_npy_corpus_searched_chunk_by_chunk_equals_the_whole_in_memory() {
    use sentence_mtl::model::{search_npy, NpyMatrix};
    let mut rng = StdRng::seed_from_u64(18);
    let queries = tensor(&random_rows(&mut rng, 3, None));
    let corpus = tensor(&random_rows(&mut rng, 97, Some((4, 90))));
    let whole = search_embeddings(&queries, &corpus, 6, 1000).unwrap();
    let dir = std::env::temp_dir().join(format!("sentence-mtl-npy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for dtype in [DType::F32, DType::F64] {
        let path = dir.join(format!("corpus-{dtype:?}.npy"));
        corpus.to_dtype(dtype).unwrap().write_npy(&path).unwrap();
        let mut matrix = NpyMatrix::open(&path).unwrap();
        assert_eq!((matrix.rows, matrix.cols, matrix.dtype), (97, H, dtype));
        for chunk_rows in [1, 10, 97, 500] {
            let got = search_npy(&queries, &mut matrix, 6, chunk_rows).unwrap();
            assert_eq!(got, whole, "{dtype:?}, chunks of {chunk_rows}");
        }
    }
    // Not float, Fortran order, truncated, not 2-D: clear errors.
    let write = |name: &str, header: &str, bytes: usize| {
        let mut npy = b"\x93NUMPY\x01\x00".to_vec();
        let padded = format!("{header:<117}\n");
        npy.extend_from_slice(&(padded.len() as u16).to_le_bytes());
        npy.extend_from_slice(padded.as_bytes());
        npy.extend(std::iter::repeat_n(0u8, bytes));
        let path = dir.join(name);
        std::fs::write(&path, npy).unwrap();
        NpyMatrix::open(&path).unwrap_err().to_string()
    };
    let e = write(
        "int.npy",
        "{'descr': '<i4', 'fortran_order': False, 'shape': (2, 3), }",
        24,
    );
    assert!(e.contains("must be float"), "{e}");
    let e = write(
        "fortran.npy",
        "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }",
        24,
    );
    assert!(e.contains("Fortran"), "{e}");
    let e = write(
        "short.npy",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
        20,
    );
    assert!(e.contains("needs"), "{e}");
    let e = write(
        "flat.npy",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (6,), }",
        24,
    );
    assert!(e.contains("not 2-D"), "{e}");
    let mut matrix = NpyMatrix::open(&dir.join("corpus-F32.npy")).unwrap();
    assert!(search_npy(&queries.narrow(1, 0, 5).unwrap(), &mut matrix, 2, 8).is_err());
}
