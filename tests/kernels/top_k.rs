//! The top-k kernels of `kernels/cosine.cu` (`cosine_top_k`) against the f64
//! brute force and the CPU path: every dtype and layout, one and many corpus
//! slices and tiles, k above one tile, ties, NaN rows, and the kernel's limit
//! on k; on the kernel target of the including binary.

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use sentence_mtl::ops::{cosine_top_k, TopK};

const CPU: Device = Device::Cpu;

/// `(Q, M, H, k)`: one of everything; k above M; several tiles in one slice
/// (one query: up to 1024 slices, so a slice per tile); many queries, so one
/// slice holds several tiles; k above one tile (the list and tile buffer 1024).
const CASES: [(usize, usize, usize, usize); 6] = [
    (1, 1, 1, 1),
    (3, 5, 33, 10),
    (1, 700, 31, 9),
    (600, 600, 7, 4),
    (2, 900, 385, 300),
    (5, 260, 64, 260),
];

fn on_target(target: &KernelTarget, q: &Tensor, c: &Tensor, kind: Strided, k: usize) -> TopK {
    target.run(|device| {
        let q = strided_view_on(q, kind, device).unwrap();
        let c = strided_view_on(c, kind, device).unwrap();
        poison_device(device).unwrap();
        let top = cosine_top_k(&q, &c, k).unwrap();
        TopK {
            scores: top.scores.to_device(&CPU).unwrap(),
            indices: top.indices.to_device(&CPU).unwrap(),
        }
    })
}

#[test]
fn top_k_kernels_match_the_reference_in_every_dtype_and_layout() {
    let Some(target) =
        crate::kernel_target("top_k_kernels_match_the_reference_in_every_dtype_and_layout")
    else {
        return;
    };
    let mut rng = rng(11);
    for (q, m, h, k) in CASES {
        for dtype in FLOAT_DTYPES {
            let queries = random_tensor(&mut rng, &[q, h], dtype, &CPU).unwrap();
            let corpus = random_tensor(&mut rng, &[m, h], dtype, &CPU).unwrap();
            let (qv, cv) = (values(&queries), values(&corpus));
            // The big cases once per dtype, contiguous; the small in every layout.
            let kinds: &[Strided] = if q * m * h > 200_000 {
                &[Strided::Contiguous]
            } else {
                &STRIDED_KINDS
            };
            for &kind in kinds {
                let what = format!("[{q},{m},{h}] k={k} {dtype:?} {kind:?}");
                let top = on_target(&target, &queries, &corpus, kind, k);
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
fn top_k_kernels_break_ties_by_index_and_rank_nan_rows_last() {
    let Some(target) =
        crate::kernel_target("top_k_kernels_break_ties_by_index_and_rank_nan_rows_last")
    else {
        return;
    };
    // 700 rows: three tiles. Every row is one of two vectors, so scores tie
    // exactly (the same arithmetic on the same values); row 650 is NaN.
    let mut rows = Vec::new();
    for i in 0..700 {
        rows.extend_from_slice(if i % 3 == 0 {
            &[1f32, 2., 2.]
        } else {
            &[2., -1., 0.5]
        });
    }
    rows[650 * 3] = f32::NAN;
    let corpus = Tensor::from_vec(rows, (700, 3), &CPU).unwrap();
    let query = Tensor::new(&[[1f32, 2., 2.]], &CPU).unwrap();
    let top = on_target(&target, &query, &corpus, Strided::Contiguous, 700);
    let indices = top.indices.to_vec2::<u32>().unwrap().remove(0);
    let best: Vec<u32> = (0..700).step_by(3).filter(|&i| i != 650).collect();
    assert_eq!(indices[..best.len()], best[..]);
    let rest: Vec<u32> = (0..700).filter(|i| i % 3 != 0 && *i != 650).collect();
    assert_eq!(indices[best.len()..699], rest[..]);
    assert_eq!(indices[699], 650);
    let cpu = cosine_top_k(&query, &corpus, 700).unwrap();
    assert_eq!(cpu.indices.to_vec2::<u32>().unwrap()[0], indices);
}

#[test]
fn top_k_kernels_refuse_k_above_their_limit() {
    let Some(target) = crate::kernel_target("top_k_kernels_refuse_k_above_their_limit") else {
        return;
    };
    let corpus = Tensor::ones((1100, 4), DType::F32, &CPU).unwrap();
    let query = Tensor::ones((1, 4), DType::F32, &CPU).unwrap();
    let err = target.run(|device| {
        let c = corpus.to_device(device).unwrap();
        let q = query.to_device(device).unwrap();
        cosine_top_k(&q, &c, 1025).unwrap_err().to_string()
    });
    assert!(err.contains("1024"), "{err}");
    // The CPU has no such limit.
    assert_eq!(
        cosine_top_k(&query, &corpus, 1100).unwrap().indices.dims(),
        [1, 1100]
    );
}
