//! CUDA: fused `cosine_similarity_matrix`, `cosine_similarity` and `l2_normalize`
//! against the same computations composed from candle ops, forward and
//! forward+backward.
//!
//! - Matrix, 4096×4096×768 (f32, bf16): fused (fused normalisation + cuBLAS) vs
//!   composed normalise-then-matmul, vs matmul-then-scale by the inverse norms, and
//!   vs a bare matmul of inputs normalised beforehand.
//! - Row-wise and normalise at [65536,768] (f32, bf16), far above the 60 MB L2:
//!   criterion's throughput gives the achieved bandwidth, and a printed line the
//!   bytes moved and the time they take at 4.3 TB/s.
//!
//! - Top-k: `cosine_top_k` of 256 queries in 1M rows against forming the
//!   cosine matrix alone.
//!
//! Every timed iteration synchronises the device and takes the next of several
//! input sets, so no input is still in L2 from the previous iteration.

use std::time::Duration;

use candle_core::{DType, Device, Result, Tensor, Var};
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput};
use sentence_mtl::ops::{cosine_similarity, cosine_similarity_matrix, cosine_top_k, l2_normalize};

const EPS: f64 = 1e-12;
const HBM_BYTES_PER_S: f64 = 4.3e12;
const MATRIX: (usize, usize, usize) = (4096, 4096, 768);
const ROWS: (usize, usize) = (65536, 768);
/// Input sets each timed loop cycles through.
const SETS: usize = 3;

type Op = fn(&Tensor, &Tensor) -> Result<Tensor>;

fn clamped_norm(x: &Tensor) -> Result<Tensor> {
    x.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(EPS)
}

fn composed_normalize(x: &Tensor) -> Result<Tensor> {
    x.broadcast_div(&clamped_norm(x)?)
}

fn composed_cosine(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dot = (a * b)?.sum_keepdim(1)?;
    (dot / (clamped_norm(a)? * clamped_norm(b)?)?)?.squeeze(1)
}

fn composed_matrix(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    composed_normalize(a)?.matmul(&composed_normalize(b)?.t()?)
}

/// The other place the scaling could go: `(a·bᵀ) ⊘ (‖a‖·‖b‖ᵀ)`, a pass over the
/// N×M output instead of over the inputs.
fn matmul_then_scale(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let inv_a = clamped_norm(a)?.recip()?;
    let inv_b = clamped_norm(b)?.recip()?.t()?;
    a.matmul(&b.t()?)?
        .broadcast_mul(&inv_a)?
        .broadcast_mul(&inv_b)
}

fn bare_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.matmul(&b.t()?)
}

fn fused_normalize(a: &Tensor, _b: &Tensor) -> Result<Tensor> {
    l2_normalize(a)
}

fn composed_normalize_op(a: &Tensor, _b: &Tensor) -> Result<Tensor> {
    composed_normalize(a)
}

fn inputs(dims: (usize, usize), dtype: DType, dev: &Device) -> Result<Vec<(Var, Var)>> {
    let one = || -> Result<Var> {
        Var::from_tensor(&Tensor::randn(0f32, 1f32, dims, dev)?.to_dtype(dtype)?)
    };
    (0..SETS).map(|_| Ok((one()?, one()?))).collect()
}

/// Bytes the fused op moves to and from memory, forward and forward+backward.
type Bytes = Option<(usize, usize)>;

/// Times `op` forward (inputs detached) and forward + backward (through `Var`s).
fn bench_op(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    op: Op,
    sets: &[(Var, Var)],
    (dev, bytes): (&Device, Bytes),
) {
    let detached: Vec<(Tensor, Tensor)> = sets
        .iter()
        .map(|(a, b)| (a.as_tensor().detach(), b.as_tensor().detach()))
        .collect();
    let mut i = 0;
    if let Some((forward, _)) = bytes {
        group.throughput(Throughput::Bytes(forward as u64));
    }
    group.bench_function(format!("{name}/forward"), |bench| {
        bench.iter(|| {
            let (a, b) = &detached[i % SETS];
            i += 1;
            let out = op(a, b).expect("forward");
            dev.synchronize().expect("synchronize");
            out
        })
    });
    if let Some((_, both)) = bytes {
        group.throughput(Throughput::Bytes(both as u64));
    }
    group.bench_function(format!("{name}/forward+backward"), |bench| {
        bench.iter(|| {
            let (a, b) = &sets[i % SETS];
            i += 1;
            let out = op(a.as_tensor(), b.as_tensor()).expect("forward");
            let grads = out.sum_all().and_then(|l| l.backward()).expect("backward");
            dev.synchronize().expect("synchronize");
            grads
        })
    });
}

/// Prints the bytes the fused op moves and the time that takes at 4.3 TB/s.
fn floor_line(what: &str, (forward, both): (usize, usize)) {
    for (pass, bytes) in [("forward", forward), ("forward+backward", both)] {
        let floor_us = bytes as f64 / HBM_BYTES_PER_S * 1e6;
        println!(
            "{what} {pass}: {:.1} MB moved, floor {floor_us:.1} us at 4.3 TB/s",
            bytes as f64 / 1e6
        );
    }
}

fn group<'a>(c: &'a mut Criterion, name: String) -> BenchmarkGroup<'a, WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    group
}

pub fn benches(c: &mut Criterion) {
    let dev = match Device::new_cuda(0) {
        Ok(dev) => dev,
        Err(e) => {
            eprintln!("cuda cosine benches skipped: no CUDA device ({e})");
            return;
        }
    };
    for dtype in [DType::F32, DType::BF16] {
        let (n, m, h) = MATRIX;
        let sets = inputs((n, h), dtype, &dev).expect("inputs");
        let unit: Vec<(Var, Var)> = sets
            .iter()
            .map(|(a, b)| {
                let v = |x: &Var| Var::from_tensor(&l2_normalize(x.as_tensor())?);
                Ok((v(a)?, v(b)?))
            })
            .collect::<Result<_>>()
            .expect("normalised inputs");
        println!(
            "cosine matrix {dtype:?}: {:.1} GFLOP per matmul",
            2.0 * (n * m * h) as f64 / 1e9
        );
        let mut g = group(c, format!("cuda/cosine/matrix {n}x{m}x{h} {dtype:?}"));
        bench_op(
            &mut g,
            "fused",
            cosine_similarity_matrix,
            &sets,
            (&dev, None),
        );
        bench_op(&mut g, "composed", composed_matrix, &sets, (&dev, None));
        bench_op(
            &mut g,
            "matmul then scale",
            matmul_then_scale,
            &sets,
            (&dev, None),
        );
        bench_op(&mut g, "bare matmul", bare_matmul, &unit, (&dev, None));
        g.finish();
    }

    for dtype in [DType::F32, DType::BF16] {
        let (n, h) = ROWS;
        let sets = inputs((n, h), dtype, &dev).expect("inputs");
        let size = dtype.size_in_bytes();
        let label = format!("[{n},{h}] {dtype:?}");
        // Forward: read a and b, write [N]. Backward: read a, b and dcos, write da, db.
        let cosine = ((2 * n * h + n) * size, (6 * n * h + 2 * n) * size);
        floor_line(&format!("cosine rowwise {label}"), cosine);
        let mut g = group(c, format!("cuda/cosine/rowwise {label}"));
        bench_op(
            &mut g,
            "fused",
            cosine_similarity,
            &sets,
            (&dev, Some(cosine)),
        );
        bench_op(
            &mut g,
            "composed",
            composed_cosine,
            &sets,
            (&dev, Some(cosine)),
        );
        g.finish();

        // Forward: read x, write y. Backward: read x and dy, write dx.
        let normalize = (2 * n * h * size, 5 * n * h * size);
        floor_line(&format!("l2_normalize {label}"), normalize);
        let mut g = group(c, format!("cuda/cosine/l2_normalize {label}"));
        bench_op(
            &mut g,
            "fused",
            fused_normalize,
            &sets,
            (&dev, Some(normalize)),
        );
        bench_op(
            &mut g,
            "composed",
            composed_normalize_op,
            &sets,
            (&dev, Some(normalize)),
        );
        g.finish();
    }
}

/// Queries, corpus rows, width and k of the semantic-search bench.
const TOP_K: (usize, usize, usize, usize) = (256, 1 << 20, 384, 10);

/// The fused `cosine_top_k` against the `[Q, M]` cosine matrix it never forms
/// (the matrix alone, before any sort: a lower bound for matrix + top-k), at
/// 256 queries in a corpus of 1M rows.
pub fn top_k_benches(c: &mut Criterion) {
    let Ok(dev) = Device::new_cuda(0) else {
        eprintln!("cuda top-k benches skipped: no CUDA device");
        return;
    };
    let (q, m, h, k) = TOP_K;
    for dtype in [DType::F32, DType::BF16] {
        let make = |rows: usize| -> Tensor {
            Tensor::randn(0f32, 1f32, (rows, h), &dev)
                .and_then(|t| t.to_dtype(dtype))
                .expect("random input")
        };
        let (queries, corpus) = (make(q), make(m));
        let mut g = group(
            c,
            format!("cuda/cosine/top-k [{q},{h}] in [{m},{h}] k {k} {dtype:?}"),
        );
        g.bench_function("fused top-k", |bench| {
            bench.iter(|| {
                let top = cosine_top_k(&queries, &corpus, k).expect("top-k");
                dev.synchronize().expect("synchronize");
                top
            })
        });
        g.bench_function("matrix only", |bench| {
            bench.iter(|| {
                let scores = cosine_similarity_matrix(&queries, &corpus).expect("matrix");
                dev.synchronize().expect("synchronize");
                scores
            })
        });
        g.finish();
    }
}
