//! CUDA criterion benchmarks (`--features cuda`): each fused op against the same computation composed from
//! candle's tensor ops. One module per op.

use criterion::{criterion_group, criterion_main, Criterion};

mod adamw;
mod attention;
mod bias_gelu;
mod cosine;
mod cross_entropy;
mod layer_norm;
mod mean_pool;
mod multi_head_cross_entropy;

fn all(c: &mut Criterion) {
    mean_pool::benches(c);
    cosine::benches(c);
    cosine::top_k_benches(c);
    cross_entropy::benches(c);
    attention::benches(c);
    layer_norm::benches(c);
    bias_gelu::benches(c);
    adamw::benches(c);
    multi_head_cross_entropy::benches(c);
}

criterion_group!(benches, all);
criterion_main!(benches);
