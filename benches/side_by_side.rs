//! The CPU ops' targets measured side by side: each fused op and what it is
//! compared with (the same computation composed from candle ops, a bare matmul,
//! a plain pass over memory) run alternately, one call each per round, in one
//! process. On a noisy machine the ratio of two medians taken minutes apart (as
//! criterion's `benches/ops` takes them, one function after the other) moves with
//! the neighbours; taken round by round, both sides see the same neighbours.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo bench --bench side_by_side
//! ```
//!
//! Prints a Markdown table of the medians, their ratio and the target.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Result, Storage, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use sentence_mtl::ops::cross_entropy::dual_head_cross_entropy_composed;
use sentence_mtl::ops::multi_head_cross_entropy::{
    multi_head_cross_entropy, multi_head_cross_entropy_composed, CeHead, MultiHeadLoss,
};
use sentence_mtl::ops::{
    cosine_similarity, cosine_similarity_matrix, cosine_top_k, dual_head_cross_entropy,
    l2_normalize, masked_mean_pool, IGNORE_INDEX,
};

#[path = "ops/composed.rs"]
mod composed;

/// Wall time each comparison gets (beyond its warm-up), and its round limits.
const BUDGET: Duration = Duration::from_secs(3);
const MIN_ROUNDS: usize = 9;
const MAX_ROUNDS: usize = 500;

type Run = Box<dyn FnMut() -> Result<()>>;

/// One comparison: `fused` against `other`.
struct Comparison {
    op: String,
    size: String,
    other_name: &'static str,
    target: &'static str,
    fused: Run,
    other: Run,
}

/// `fused` against `other` (`other_name`), for `op` at `size`.
fn compare(
    op: &str,
    size: &str,
    other_name: &'static str,
    target: &'static str,
    fused: Run,
    other: Run,
) -> Comparison {
    Comparison {
        op: op.into(),
        size: size.into(),
        other_name,
        target,
        fused,
        other,
    }
}

/// Medians of `fused` and `other` over alternating rounds (which one goes
/// first alternates too). In a round each side first runs untimed for `WARM`,
/// then is timed over calls adding up to at least `TIMED`: on this VM an idle
/// vCPU (the second core sits idle through a single-threaded composed op, or
/// any pause) takes about 10 ms of work to come back to speed, and a call
/// right after the other side would pay for that, or for the other side's
/// cache state, instead of its own cost.
fn medians(c: &mut Comparison) -> Result<(Duration, Duration, usize)> {
    const WARM: Duration = Duration::from_millis(20);
    const TIMED: Duration = Duration::from_millis(20);
    let (mut fused, mut other) = (Vec::new(), Vec::new());
    let start = Instant::now();
    while fused.len() < MIN_ROUNDS || (start.elapsed() < BUDGET && fused.len() < MAX_ROUNDS) {
        let fused_first = fused.len() % 2 == 0;
        for first in [fused_first, !fused_first] {
            let (run, times) = if first {
                (&mut c.fused, &mut fused)
            } else {
                (&mut c.other, &mut other)
            };
            let warm = Instant::now();
            run()?;
            while warm.elapsed() < WARM {
                run()?;
            }
            let (t, mut calls) = (Instant::now(), 0u32);
            while calls == 0 || t.elapsed() < TIMED {
                run()?;
                calls += 1;
            }
            times.push(t.elapsed() / calls);
        }
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let rounds = fused.len();
    Ok((median(&mut fused), median(&mut other), rounds))
}

fn forward2(op: fn(&Tensor, &Tensor) -> Result<Tensor>, a: &Var, b: &Tensor) -> Run {
    let (a, b) = (a.as_tensor().detach(), b.clone());
    Box::new(move || op(&a, &b).map(drop))
}

/// Forward, sum, backward: `a` is the `Var` the gradient flows to.
fn backward2(op: fn(&Tensor, &Tensor) -> Result<Tensor>, a: &Var, b: &Tensor) -> Run {
    let (a, b) = (a.clone(), b.clone());
    Box::new(move || op(a.as_tensor(), &b)?.sum_all()?.backward().map(drop))
}

fn random(dims: &[usize]) -> Result<Var> {
    Var::randn(0f32, 1f32, dims, &Device::Cpu)
}

/// One read and one write of every element, in parallel, into a fresh tensor:
/// the least any elementwise op on `x` does (a normalisation also reads each
/// row a second time, from L1).
fn memory_floor(x: &Tensor, _: &Tensor) -> Result<Tensor> {
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("memory_floor: CPU tensors only");
    };
    let (start, end) = layout
        .contiguous_offsets()
        .expect("memory_floor: a contiguous input");
    let data = &cpu.as_slice::<f32>()?[start..end];
    let out: Vec<f32> = data.par_iter().map(|v| v * 0.5).collect();
    Tensor::from_vec(out, x.shape(), x.device())
}

fn mean_pool_cases(cases: &mut Vec<Comparison>) -> Result<()> {
    for (b, t, h) in [(32, 128, 384), (64, 128, 768)] {
        let hidden = random(&[b, t, h])?;
        let mask = Tensor::ones((b, t), DType::U32, &Device::Cpu)?;
        let size = format!("[{b},{t},{h}]");
        cases.push(compare(
            "mean pool forward",
            &size,
            "composed",
            "≥ 3",
            forward2(masked_mean_pool, &hidden, &mask),
            forward2(composed::mean_pool, &hidden, &mask),
        ));
        cases.push(compare(
            "mean pool fwd+bwd",
            &size,
            "composed",
            "≥ 3",
            backward2(masked_mean_pool, &hidden, &mask),
            backward2(composed::mean_pool, &hidden, &mask),
        ));
    }
    Ok(())
}

fn cosine_cases(cases: &mut Vec<Comparison>) -> Result<()> {
    let (a, b) = (random(&[4096, 384])?, random(&[4096, 384])?);
    let b = b.as_tensor().detach();
    let size = "[4096,384]";
    cases.push(compare(
        "cosine row-wise forward",
        size,
        "composed",
        "≥ 3",
        forward2(cosine_similarity, &a, &b),
        forward2(composed::row_cosine, &a, &b),
    ));
    cases.push(compare(
        "cosine row-wise fwd+bwd",
        size,
        "composed",
        "≥ 3",
        backward2(cosine_similarity, &a, &b),
        backward2(composed::row_cosine, &a, &b),
    ));
    let normalize = |x: &Tensor, _: &Tensor| l2_normalize(x);
    let composed_normalize = |x: &Tensor, _: &Tensor| composed::normalize(x);
    cases.push(compare(
        "l2_normalize forward",
        size,
        "composed",
        "≥ 3",
        forward2(normalize, &a, &b),
        forward2(composed_normalize, &a, &b),
    ));
    cases.push(compare(
        "l2_normalize forward",
        size,
        "memory floor",
        "(≤ 1: floor)",
        forward2(normalize, &a, &b),
        forward2(memory_floor, &a, &b),
    ));
    cases.push(compare(
        "l2_normalize fwd+bwd",
        size,
        "composed",
        "≥ 3",
        backward2(normalize, &a, &b),
        backward2(composed_normalize, &a, &b),
    ));

    let (a, b) = (random(&[1024, 384])?, random(&[1024, 384])?);
    let b = b.as_tensor().detach();
    // The bare matmul's inputs, normalised beforehand.
    let a_hat = Var::from_tensor(&composed::normalize(a.as_tensor())?)?;
    let b_hat = composed::normalize(&b)?;
    let size = "[1024,384]x[1024,384]";
    cases.push(compare(
        "cosine matrix forward",
        size,
        "composed",
        "— (gemm-bound)",
        forward2(cosine_similarity_matrix, &a, &b),
        forward2(composed::matrix, &a, &b),
    ));
    cases.push(compare(
        "cosine matrix forward",
        size,
        "bare matmul",
        "≥ 0.83 (within 1.2x)",
        forward2(cosine_similarity_matrix, &a, &b),
        forward2(composed::bare_matmul, &a_hat, &b_hat),
    ));
    cases.push(compare(
        "cosine matrix fwd+bwd",
        size,
        "bare matmul",
        "≥ 0.83 (within 1.2x)",
        backward2(cosine_similarity_matrix, &a, &b),
        backward2(composed::bare_matmul, &a_hat, &b_hat),
    ));
    Ok(())
}

/// Semantic search: the fused `cosine_top_k` against the `[Q, M]` cosine matrix
/// then, per query, candle's full sort (`arg_sort_last_dim`) or a partial
/// selection (`select_nth_unstable`, rows in parallel) of the k best.
fn top_k_cases(cases: &mut Vec<Comparison>) -> Result<()> {
    const Q: usize = 32;
    const M: usize = 65536;
    const K: usize = 10;
    let queries = random(&[Q, 384])?.as_tensor().detach();
    let corpus = random(&[M, 384])?.as_tensor().detach();
    let size = format!("[{Q},384] in [{M},384], k {K}");
    let fused: fn(&Tensor, &Tensor) -> Result<()> = |q, c| cosine_top_k(q, c, K).map(drop);
    let matrix_sort: fn(&Tensor, &Tensor) -> Result<()> = |q, c| {
        let scores = cosine_similarity_matrix(q, c)?;
        let order = scores.arg_sort_last_dim(false)?.narrow(1, 0, K)?;
        scores.gather(&order.contiguous()?, 1).map(drop)
    };
    let matrix_select: fn(&Tensor, &Tensor) -> Result<()> = |q, c| {
        let scores = cosine_similarity_matrix(q, c)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let best: Vec<Vec<(u32, f32)>> = scores
            .par_chunks(M)
            .map(|row| {
                let mut hits: Vec<(u32, f32)> = row
                    .iter()
                    .enumerate()
                    .map(|(i, &s)| (i as u32, s))
                    .collect();
                let by_score =
                    |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
                hits.select_nth_unstable_by(K - 1, by_score);
                hits.truncate(K);
                hits.sort_by(by_score);
                hits
            })
            .collect();
        std::hint::black_box(best);
        Ok(())
    };
    let run = |op: fn(&Tensor, &Tensor) -> Result<()>| -> Run {
        let (q, c) = (queries.clone(), corpus.clone());
        Box::new(move || op(&q, &c))
    };
    cases.push(compare(
        "cosine top-k",
        &size,
        "matrix + sort",
        "≥ 1",
        run(fused),
        run(matrix_sort),
    ));
    cases.push(compare(
        "cosine top-k",
        &size,
        "matrix + select",
        "≥ 1",
        run(fused),
        run(matrix_select),
    ));
    Ok(())
}

fn cross_entropy_cases(cases: &mut Vec<Comparison>) -> Result<()> {
    const ROWS: usize = 4096;
    let mut rng = StdRng::seed_from_u64(0);
    // Each row labelled for one head only: the mixed multi-task batch.
    let labels: Vec<i64> = (0..ROWS)
        .flat_map(|_| match rng.random_range(0..2) {
            0 => [rng.random_range(0..4), IGNORE_INDEX],
            _ => [IGNORE_INDEX, rng.random_range(0..3)],
        })
        .collect();
    let labels = Tensor::from_vec(labels, (ROWS, 2), &Device::Cpu)?;
    let (a, b) = (random(&[ROWS, 4])?, random(&[ROWS, 3])?);
    let size = format!("[{ROWS},4]+[{ROWS},3]");
    type Ce = fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>;
    let forward = |op: Ce| -> Run {
        let (a, b, l) = (
            a.as_tensor().detach(),
            b.as_tensor().detach(),
            labels.clone(),
        );
        Box::new(move || op(&a, &b, &l).map(drop))
    };
    let backward = |op: Ce| -> Run {
        let (a, b, l) = (a.clone(), b.clone(), labels.clone());
        Box::new(move || {
            op(a.as_tensor(), b.as_tensor(), &l)?
                .sum_all()?
                .backward()
                .map(drop)
        })
    };
    cases.push(compare(
        "dual CE forward",
        &size,
        "composed",
        "≥ 3",
        forward(dual_head_cross_entropy),
        forward(dual_head_cross_entropy_composed),
    ));
    cases.push(compare(
        "dual CE fwd+bwd",
        &size,
        "composed",
        "≥ 5",
        backward(dual_head_cross_entropy),
        backward(dual_head_cross_entropy_composed),
    ));
    Ok(())
}

/// The N-head op against its composed candle ops: the recipe's two heads (4 + 3
/// classes) and four heads (4, 3, 6, 2), each row labelled for one head.
fn multi_head_cases(cases: &mut Vec<Comparison>) -> Result<()> {
    type Ce = fn(&Tensor, &Tensor, &[CeHead]) -> Result<MultiHeadLoss>;
    for classes in [&[4usize, 3][..], &[4, 3, 6, 2]] {
        for rows in [32usize, 4096] {
            let mut rng = StdRng::seed_from_u64(1);
            let h = classes.len();
            let labels: Vec<i64> = (0..rows)
                .flat_map(|_| {
                    let own = rng.random_range(0..h);
                    (0..h)
                        .map(|k| {
                            if k == own {
                                rng.random_range(0..classes[k] as i64)
                            } else {
                                IGNORE_INDEX
                            }
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            let labels = Tensor::from_vec(labels, (rows, h), &Device::Cpu)?;
            let heads: Vec<CeHead> = classes.iter().map(|&c| CeHead::new(c)).collect();
            let logits = random(&[rows, classes.iter().sum()])?;
            let size = format!("N={rows}, {h} heads");
            let run = |op: Ce, backward: bool| -> Run {
                let (z, l, heads) = (logits.clone(), labels.clone(), heads.clone());
                Box::new(move || {
                    let input = if backward {
                        z.as_tensor().clone()
                    } else {
                        z.as_tensor().detach()
                    };
                    let loss = op(&input, &l, &heads)?;
                    if backward {
                        loss.total.backward()?;
                    }
                    Ok(())
                })
            };
            for (name, backward) in [("N-head CE forward", false), ("N-head CE fwd+bwd", true)] {
                cases.push(compare(
                    name,
                    &size,
                    "composed",
                    "≥ 3",
                    run(multi_head_cross_entropy, backward),
                    run(multi_head_cross_entropy_composed, backward),
                ));
            }
        }
    }
    Ok(())
}

fn fmt(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; a name given after `--` filters the ops.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let mut cases = Vec::new();
    mean_pool_cases(&mut cases)?;
    cosine_cases(&mut cases)?;
    top_k_cases(&mut cases)?;
    cross_entropy_cases(&mut cases)?;
    multi_head_cases(&mut cases)?;
    println!(
        "| op | size | fused | compared with | its time | ratio (its / fused) | target | rounds |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for case in &mut cases {
        if filter
            .as_ref()
            .is_some_and(|f| !case.op.contains(f.as_str()))
        {
            continue;
        }
        let (fused, other, rounds) = medians(case)?;
        println!(
            "| {} | {} | {} | {} | {} | {:.2} | {} | {rounds} |",
            case.op,
            case.size,
            fmt(fused),
            case.other_name,
            fmt(other),
            other.as_secs_f64() / fused.as_secs_f64(),
            case.target,
        );
    }
    Ok(())
}
