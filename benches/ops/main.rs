//! Criterion benchmarks: each fused op against the same computation composed from
//! candle's tensor ops. One module per op.

use criterion::{criterion_group, criterion_main, Criterion};

mod composed;
mod cosine;
mod cross_entropy;
mod mean_pool;

fn all(c: &mut Criterion) {
    // The default allocator settings, as a program linking the crate has them
    // (with `runtime::keep_freed_memory`, as the binary sets, the composed ops'
    // temporaries stop page-faulting and gain more than the fused ops: see
    // BENCHMARKS.md).
    if std::env::var_os("OPS_BENCH_KEEP_FREED_MEMORY").is_some() {
        sentence_mtl::runtime::keep_freed_memory();
    }
    mean_pool::benches(c);
    cosine::benches(c);
    cross_entropy::benches(c);
}

criterion_group!(benches, all);
criterion_main!(benches);
