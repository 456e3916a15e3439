//! CUDA criterion benchmarks (`--features cuda`): each fused op against the same computation composed from
//! candle's tensor ops. One module per op, and the whole model's training step
//! (`train_step`) and encoding throughput (`encode`).

use criterion::{criterion_group, criterion_main, Criterion};

mod adamw;
mod attention;
mod bias_gelu;
mod cosine;
mod cross_entropy;
mod encode;
mod layer_norm;
mod mean_pool;
mod multi_head_cross_entropy;
mod random_model;
mod train_step;

fn all(c: &mut Criterion) {
    // Issue 13's targets first (the GPU run's bench step has a time cap;
    // BENCH_FILTER in scripts/gpu/run.sh picks others).
    train_step::benches(c);
    encode::benches(c);
    attention::benches(c);
    layer_norm::benches(c);
    adamw::benches(c);
    bias_gelu::benches(c);
    multi_head_cross_entropy::benches(c);
    mean_pool::benches(c);
    cosine::benches(c);
    cosine::top_k_benches(c);
    cross_entropy::benches(c);
}

criterion_group!(benches, all);
criterion_main!(benches);
