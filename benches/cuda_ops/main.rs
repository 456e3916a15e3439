//! CUDA criterion benchmarks (`--features cuda`): each fused op against the same computation composed from
//! candle's tensor ops. One module per op.

use criterion::{criterion_group, criterion_main, Criterion};

mod bias_gelu;
mod cosine;
mod cross_entropy;
mod mean_pool;

fn all(c: &mut Criterion) {
    mean_pool::benches(c);
    cosine::benches(c);
    cosine::top_k_benches(c);
    cross_entropy::benches(c);
    bias_gelu::benches(c);
}

criterion_group!(benches, all);
criterion_main!(benches);
