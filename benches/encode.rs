//! CPU encoding throughput of all-MiniLM-L6-v2 (f32, batch 32) on the 50
//! reference sentences repeated 20 times: the workload of
//! `benchmarks/st_encode.py`, which runs sentence-transformers on the same
//! sentences, so the two can be run side by side.
//!
//! `scripts/fetch-model.sh && cargo bench --bench encode`
//! (`ENCODE_BENCH_REPEATS=4` for a shorter set; `--profile-time 30` to profile)
//! (threads: candle follows RAYON_NUM_THREADS, default all cores).

use std::time::Duration;

use candle_core::{DType, Device};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use sentence_mtl::model::{resolve_cached, SentenceEncoder, DEFAULT_MODEL};

const BATCH_SIZE: usize = 32;

/// How many times the 50 sentences are repeated: `$ENCODE_BENCH_REPEATS`, default 20.
#[path = "../tests/common/shared.rs"]
mod shared;
use shared::shared_dir;

fn repeats() -> usize {
    std::env::var("ENCODE_BENCH_REPEATS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

fn sentences() -> Vec<String> {
    let path = shared_dir().join("reference/minilm_reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {} (set SENTENCE_MTL_SHARED): {e}",
            path.display()
        )
    });
    let json: serde_json::Value = serde_json::from_str(&text).expect("reference JSON");
    let base: Vec<String> = serde_json::from_value(json["sentences"].clone()).expect("sentences");
    base.iter()
        .cycle()
        .take(base.len() * repeats())
        .cloned()
        .collect()
}

fn encode(c: &mut Criterion) {
    // As the `sentence-mtl` binary does.
    sentence_mtl::runtime::keep_freed_memory();
    let files = resolve_cached(DEFAULT_MODEL).expect("run scripts/fetch-model.sh first");
    let encoder = SentenceEncoder::from_files(&files, DType::F32, &Device::Cpu)
        .expect("model loads")
        .with_batch_size(BATCH_SIZE);
    let sentences = sentences();
    let texts: Vec<&str> = sentences.iter().map(String::as_str).collect();

    let mut group = c.benchmark_group("encode_minilm_cpu");
    // One encode of the whole set takes seconds: 10 flat samples, one each.
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(60));
    group.throughput(Throughput::Elements(texts.len() as u64));
    group.bench_function(
        format!("f32_batch{BATCH_SIZE}_{}_sentences", texts.len()),
        |b| b.iter(|| encoder.encode(&texts).expect("encode")),
    );
    group.finish();
}

criterion_group!(benches, encode);
criterion_main!(benches);
