//! Masked mean pooling on the CPU: the fused op against the same computation
//! composed from candle tensor ops (sentence-transformers' formula), forward and
//! forward+backward, f32, with a u32 mask as tokenizers hand it in and every
//! token real (the fused op's worst case: padding tokens are skipped).

use candle_core::{DType, Device, Result, Tensor, Var};
use criterion::{black_box, BenchmarkId, Criterion, Throughput};
use sentence_mtl::ops::masked_mean_pool;

const SHAPES: [(usize, usize, usize); 2] = [(32, 128, 384), (64, 128, 768)];

use crate::composed;

fn fused(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    masked_mean_pool(hidden, mask)
}

type Pool = fn(&Tensor, &Tensor) -> Result<Tensor>;

fn inputs(b: usize, t: usize, h: usize) -> Result<(Var, Tensor)> {
    let hidden = Var::randn(0f32, 1.0, (b, t, h), &Device::Cpu)?;
    let mask = Tensor::ones((b, t), DType::U32, &Device::Cpu)?;
    Ok((hidden, mask))
}

pub fn benches(c: &mut Criterion) {
    let impls: [(&str, Pool); 2] = [("fused", fused), ("composed", composed::mean_pool)];

    let mut group = c.benchmark_group("mean_pool_cpu_forward");
    for (b, t, h) in SHAPES {
        let (hidden, mask) = inputs(b, t, h).expect("inputs");
        group.throughput(Throughput::Bytes((b * t * h * 4) as u64));
        for (name, pool) in impls {
            group.bench_with_input(
                BenchmarkId::new(name, format!("{b}x{t}x{h}")),
                &(),
                |bench, _| {
                    bench.iter(|| black_box(pool(hidden.as_tensor(), &mask).expect("forward")))
                },
            );
        }
    }
    group.finish();

    let mut group = c.benchmark_group("mean_pool_cpu_forward_backward");
    for (b, t, h) in SHAPES {
        let (hidden, mask) = inputs(b, t, h).expect("inputs");
        group.throughput(Throughput::Bytes((2 * b * t * h * 4) as u64));
        for (name, pool) in impls {
            group.bench_with_input(
                BenchmarkId::new(name, format!("{b}x{t}x{h}")),
                &(),
                |bench, _| {
                    bench.iter(|| {
                        let loss = pool(hidden.as_tensor(), &mask).and_then(|p| p.sum_all());
                        black_box(loss.and_then(|l| l.backward()).expect("forward+backward"))
                    })
                },
            );
        }
    }
    group.finish();
}
