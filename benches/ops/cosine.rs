//! CPU: fused `cosine_similarity`, `cosine_similarity_matrix` and `l2_normalize`
//! against the same computations composed from candle ops, forward and
//! forward+backward, f32. The matrix form is also timed against a bare matmul of
//! inputs normalised beforehand (the floor it should stay within 1.2x of).

use std::time::Duration;

use candle_core::{Device, Result, Tensor, Var};
use criterion::{BenchmarkGroup, Criterion};
use sentence_mtl::ops::{cosine_similarity, cosine_similarity_matrix, l2_normalize};

use crate::composed;

const ROWS: usize = 4096;
const MATRIX_ROWS: usize = 1024;
const HIDDEN: usize = 384;

type Op = fn(&Tensor, &Tensor) -> Result<Tensor>;

fn fused_normalize(a: &Tensor, _b: &Tensor) -> Result<Tensor> {
    l2_normalize(a)
}

fn composed_normalize(a: &Tensor, _b: &Tensor) -> Result<Tensor> {
    composed::normalize(a)
}

fn random(rows: usize) -> Var {
    Var::randn(0f32, 1f32, (rows, HIDDEN), &Device::Cpu).expect("random input")
}

/// Times `op` forward (inputs detached) and forward + backward (through `Var`s).
fn bench_op(
    group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    op: Op,
    a: &Var,
    b: &Var,
) {
    let (ad, bd) = (a.as_tensor().detach(), b.as_tensor().detach());
    group.bench_function(format!("{name}/forward"), |bench| {
        bench.iter(|| op(&ad, &bd).expect("forward"))
    });
    group.bench_function(format!("{name}/forward+backward"), |bench| {
        bench.iter(|| {
            let out = op(a.as_tensor(), b.as_tensor()).expect("forward");
            out.sum_all().and_then(|l| l.backward()).expect("backward")
        })
    });
}

pub fn benches(c: &mut Criterion) {
    let (a, b) = (random(ROWS), random(ROWS));
    let mut group = c.benchmark_group(format!("cpu/cosine/rowwise [{ROWS},{HIDDEN}] f32"));
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(4));
    bench_op(&mut group, "fused", cosine_similarity, &a, &b);
    bench_op(&mut group, "composed", composed::row_cosine, &a, &b);
    group.finish();

    let mut group = c.benchmark_group(format!("cpu/cosine/l2_normalize [{ROWS},{HIDDEN}] f32"));
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(4));
    bench_op(&mut group, "fused", fused_normalize, &a, &b);
    bench_op(&mut group, "composed", composed_normalize, &a, &b);
    group.finish();

    let (a, b) = (random(MATRIX_ROWS), random(MATRIX_ROWS));
    let unit = |x: &Var| {
        Var::from_tensor(&composed::normalize(x.as_tensor()).expect("normalise")).expect("var")
    };
    let (a_hat, b_hat) = (unit(&a), unit(&b));
    let name = format!("cpu/cosine/matrix [{MATRIX_ROWS},{HIDDEN}]x[{MATRIX_ROWS},{HIDDEN}] f32");
    let mut group = c.benchmark_group(name);
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    bench_op(&mut group, "fused", cosine_similarity_matrix, &a, &b);
    bench_op(&mut group, "composed", composed::matrix, &a, &b);
    bench_op(
        &mut group,
        "bare matmul",
        composed::bare_matmul,
        &a_hat,
        &b_hat,
    );
    group.finish();
}
