//! CUDA: encoding throughput of a MiniLM-L6-shaped model (issue 13's target:
//! 100k tweets at ≥ 20k sentences/s on the GPU): every TweetEval tweet of
//! `../shared/data/tweeteval` (or `tweets.txt` of `$SENTENCE_MTL_BENCH_DATA`
//! on the GPU machine), about 19k, through `SentenceEncoder::encode`
//! (tokenize, sort by length, batches of 256, the encoder, mean pooling,
//! back to the input order), f32 and bf16. Random weights with the real
//! tokenizer (`random_model`): the same token counts as the real model.

use std::time::Duration;

use candle_core::{DType, Device};
use criterion::{Criterion, SamplingMode, Throughput};
use sentence_mtl::model::SentenceEncoder;

use crate::random_model::{bench_data, minilm_folder};

#[path = "../../tests/common/shared.rs"]
mod shared;

const BATCH_SIZE: usize = 256;

/// The tweets: the packed file on a GPU machine, else every split's texts of
/// both TweetEval tasks in the shared data.
fn tweets() -> Vec<String> {
    let files: Vec<std::path::PathBuf> = match bench_data("tweets.txt") {
        Some(file) => vec![file],
        None => {
            let root = shared::shared_dir().join("data/tweeteval");
            ["emotion", "sentiment"]
                .iter()
                .flat_map(|task| {
                    let root = root.join(task);
                    ["train", "val", "test"]
                        .map(move |split| root.join(format!("{split}_text.txt")))
                })
                .collect()
        }
    };
    files
        .iter()
        .flat_map(|file| {
            std::fs::read_to_string(file)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()))
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

pub fn benches(c: &mut Criterion) {
    let dev = match Device::new_cuda(0) {
        Ok(dev) => dev,
        Err(e) => {
            eprintln!("cuda encode benches skipped: no CUDA device ({e})");
            return;
        }
    };
    let files = minilm_folder("sentence-mtl-bench-encode").expect("a random MiniLM folder");
    let tweets = tweets();
    let texts: Vec<&str> = tweets.iter().map(String::as_str).collect();
    for dtype in [DType::F32, DType::BF16] {
        let encoder = SentenceEncoder::from_files(&files, dtype, &dev)
            .expect("model loads")
            .with_batch_size(BATCH_SIZE);
        let mut group = c.benchmark_group(format!("cuda/encode MiniLM {dtype:?}"));
        // One encode of all the tweets is one sample.
        group
            .sampling_mode(SamplingMode::Flat)
            .sample_size(10)
            .measurement_time(Duration::from_secs(5))
            .throughput(Throughput::Elements(texts.len() as u64));
        group.bench_function(format!("{} tweets, batch {BATCH_SIZE}", texts.len()), |b| {
            b.iter(|| {
                encoder.encode(&texts).expect("encode");
                dev.synchronize().expect("synchronize")
            })
        });
        group.finish();
    }
}
