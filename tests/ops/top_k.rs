//! `cosine_top_k` on the CPU against the f64 brute force: every float dtype,
//! strided inputs, odd widths, k above the corpus size, ties, zero and NaN
//! rows, and bad input.

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use sentence_mtl::ops::cosine_top_k;

const CPU: Device = Device::Cpu;

/// `(Q, M, H, k)`: one of everything, odd widths, k above M, more corpus rows
/// than one parallel chunk (512), k larger than a kernel tile.
const CASES: [(usize, usize, usize, usize); 7] = [
    (1, 1, 1, 1),
    (3, 5, 3, 10),
    (4, 37, 33, 5),
    (2, 1200, 31, 7),
    (5, 700, 385, 300),
    (1, 2000, 64, 1),
    (9, 64, 384, 64),
];

#[test]
fn top_k_equals_the_brute_force_reference_in_every_dtype_and_layout() {
    let mut rng = rng(7);
    for (q, m, h, k) in CASES {
        for dtype in FLOAT_DTYPES {
            let queries = random_tensor(&mut rng, &[q, h], dtype, &CPU).unwrap();
            let corpus = random_tensor(&mut rng, &[m, h], dtype, &CPU).unwrap();
            let (qv, cv) = (values(&queries), values(&corpus));
            for kind in STRIDED_KINDS {
                let what = format!("[{q},{m},{h}] k={k} {dtype:?} {kind:?}");
                let top = cosine_top_k(
                    &strided_view(&queries, kind).unwrap(),
                    &strided_view(&corpus, kind).unwrap(),
                    k,
                )
                .unwrap();
                let acc = if dtype == DType::F64 {
                    DType::F64
                } else {
                    DType::F32
                };
                assert_eq!(top.scores.dtype(), acc, "{what}");
                assert_eq!(top.indices.dtype(), DType::U32, "{what}");
                assert_top_k_matches_reference(
                    &what,
                    (&top.scores, &top.indices),
                    (&qv, &cv),
                    h,
                    k,
                    dtype,
                    true,
                );
            }
        }
    }
}

#[test]
fn duplicate_rows_in_different_chunks_score_exactly_alike() {
    // Row 3 copied to rows 700 and 1400 (three CPU chunks of 512, different
    // places in each chunk's blocked product), and to 7 in the first chunk.
    let mut rng = rng(21);
    for dtype in FLOAT_DTYPES {
        let corpus = random_tensor(&mut rng, &[1500, 37], dtype, &CPU).unwrap();
        let row = corpus.narrow(0, 3, 1).unwrap();
        let mut parts = Vec::new();
        let mut at = 0;
        for dup in [7, 700, 1400] {
            parts.push(corpus.narrow(0, at, dup - at).unwrap());
            parts.push(row.clone());
            at = dup + 1;
        }
        parts.push(corpus.narrow(0, at, 1500 - at).unwrap());
        let corpus = Tensor::cat(&parts, 0).unwrap();
        let queries = Tensor::cat(&[row.clone(), (row * 0.5).unwrap()], 0).unwrap();
        let top = cosine_top_k(&queries, &corpus, 4).unwrap();
        let indices = top.indices.to_vec2::<u32>().unwrap();
        let scores = top
            .scores
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        for (q, (ix, sc)) in indices.iter().zip(&scores).enumerate() {
            assert_eq!(ix, &[3, 7, 700, 1400], "{dtype:?} query {q}");
            assert!(
                sc.iter().all(|&s| s == sc[0]),
                "{dtype:?} query {q}: {sc:?}"
            );
        }
    }
}

#[test]
fn equal_scores_go_to_the_lower_index() {
    // Rows 0, 2 and 4 are the same vector, row 3 a multiple of it: four equal
    // cosines (1 up to rounding for row 3), listed by index.
    let corpus = Tensor::new(
        &[
            [1f32, 2., 3.],
            [-1., 0., 1.],
            [1., 2., 3.],
            [2., 4., 6.],
            [1., 2., 3.],
        ],
        &CPU,
    )
    .unwrap();
    let query = Tensor::new(&[[1f32, 2., 3.]], &CPU).unwrap();
    let top = cosine_top_k(&query, &corpus, 3).unwrap();
    let indices = top.indices.to_vec2::<u32>().unwrap();
    // Rows 0, 2, 4 give bit-identical scores; row 3's may round either way.
    let exact: Vec<u32> = indices[0].iter().copied().filter(|&i| i != 3).collect();
    assert!(exact.windows(2).all(|w| w[0] < w[1]), "{indices:?}");
    let top = cosine_top_k(&query, &corpus.narrow(0, 0, 3).unwrap(), 2).unwrap();
    assert_eq!(top.indices.to_vec2::<u32>().unwrap(), [[0, 2]]);
}

#[test]
fn a_zero_row_scores_zero_and_a_nan_row_ranks_last() {
    let corpus = Tensor::new(&[[0f32, 0.], [f32::NAN, 1.], [-1., 0.], [1., 1.]], &CPU).unwrap();
    let query = Tensor::new(&[[1f32, 0.]], &CPU).unwrap();
    let top = cosine_top_k(&query, &corpus, 4).unwrap();
    assert_eq!(top.indices.to_vec2::<u32>().unwrap(), [[3, 0, 2, 1]]);
    let scores = top.scores.to_vec2::<f32>().unwrap();
    assert_eq!(scores[0][1], 0.0);
    assert_eq!(scores[0][3], f32::NEG_INFINITY);
}

#[test]
fn no_queries_give_an_empty_result() {
    let corpus = Tensor::ones((4, 3), DType::F32, &CPU).unwrap();
    let queries = Tensor::ones((0, 3), DType::F32, &CPU).unwrap();
    let top = cosine_top_k(&queries, &corpus, 2).unwrap();
    assert_eq!(top.scores.dims(), [0, 2]);
}

#[test]
fn bad_input_is_an_error_naming_the_problem() {
    let q = Tensor::ones((2, 3), DType::F32, &CPU).unwrap();
    let c = Tensor::ones((4, 3), DType::F32, &CPU).unwrap();
    let cases: Vec<(candle_core::Result<_>, &str)> = vec![
        (cosine_top_k(&q, &c, 0), "k must be at least 1"),
        (
            cosine_top_k(&q, &Tensor::ones((0, 3), DType::F32, &CPU).unwrap(), 1),
            "no rows",
        ),
        (
            cosine_top_k(&q, &Tensor::ones((4, 5), DType::F32, &CPU).unwrap(), 1),
            "same width",
        ),
        (cosine_top_k(&q.flatten_all().unwrap(), &c, 1), "rank"),
        (
            cosine_top_k(&q, &c.to_dtype(DType::F16).unwrap(), 1),
            "dtype",
        ),
        (
            cosine_top_k(
                &q.to_dtype(DType::U32).unwrap(),
                &c.to_dtype(DType::U32).unwrap(),
                1,
            ),
            "U32",
        ),
    ];
    for (result, want) in cases {
        let err = result.unwrap_err().to_string();
        assert!(
            err.contains("cosine_top_k") && err.contains(want),
            "{err} (want {want:?})"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn top_k_indices_equal_the_reference_in_f64(
        q in 1usize..4, m in 1usize..80, h in 1usize..40, k in 1usize..90, seed in any::<u64>()
    ) {
        let mut rng = rng(seed);
        let queries = random_tensor(&mut rng, &[q, h], DType::F64, &CPU).unwrap();
        let corpus = random_tensor(&mut rng, &[m, h], DType::F64, &CPU).unwrap();
        let top = cosine_top_k(&queries, &corpus, k).unwrap();
        assert_top_k_matches_reference(
            "proptest", (&top.scores, &top.indices), (&values(&queries), &values(&corpus)),
            h, k, DType::F64, true,
        );
    }
}
