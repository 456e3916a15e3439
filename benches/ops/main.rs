//! Criterion benchmarks: each fused op against the same computation composed from
//! candle's tensor ops. One module per op.

use criterion::{criterion_group, criterion_main, Criterion};

mod cosine;
mod cross_entropy;
mod mean_pool;

fn all(c: &mut Criterion) {
    // As the `sentence-mtl` binary does: freed blocks stay with the process,
    // so neither side pays fresh page faults for its outputs on every call.
    sentence_mtl::runtime::keep_freed_memory();
    mean_pool::benches(c);
    cosine::benches(c);
    cross_entropy::benches(c);
}

criterion_group!(benches, all);
criterion_main!(benches);
