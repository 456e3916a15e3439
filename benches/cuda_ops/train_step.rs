//! CUDA: one training step of the recipe (issue 13's training-step bench):
//! a MiniLM-L6-shaped multi-task model (hidden 384, 6 layers, 12 heads of 32,
//! the emotion and sentiment heads), a batch of 32 sentences padded to 64
//! tokens, forward with dropout, the two losses, backward, AdamW over every
//! parameter — what `sentence-mtl train --cuda` does each step, read-back of
//! the losses included. f32, and bf16 with f32 master weights and losses.
//!
//! The weights are random (`random_model`), so the bench needs no model
//! download and runs on a GPU machine without network. The sentence lengths are fixed
//! and tweet-like (6 to 45 tokens, mean about 25, as the recipe's data; one
//! sentence of 64 sets the padded width).

use std::time::Duration;

use candle_core::{DType, Device, Result, Tensor};
use criterion::{Criterion, Throughput};
use sentence_mtl::model::multitask::{Freeze, MultiTaskModel, TaskHead, TaskLoss};
use sentence_mtl::ops::IGNORE_INDEX;
use sentence_mtl::train::{AdamW, AdamWParams, ParamGroup};

const BATCH: usize = 32;
const MAX_LEN: usize = 64;

/// The batch: token ids `[B, T]`, type ids, mask, and labels `[B, 2]` (even
/// rows emotion, odd rows sentiment, the other column ignored).
struct Batch {
    ids: Tensor,
    types: Tensor,
    mask: Tensor,
    labels: Tensor,
    tokens: usize,
}

fn batch(dev: &Device) -> Result<Batch> {
    let lengths: Vec<usize> = (0..BATCH)
        .map(|i| if i == 0 { MAX_LEN } else { 6 + (i * 29) % 40 })
        .collect();
    let mut ids = vec![0u32; BATCH * MAX_LEN];
    let mut mask = vec![0u32; BATCH * MAX_LEN];
    for (row, &len) in lengths.iter().enumerate() {
        for t in 0..len {
            ids[row * MAX_LEN + t] = 1000 + ((row * 7919 + t * 104_729) % 29_000) as u32;
            mask[row * MAX_LEN + t] = 1;
        }
    }
    let labels: Vec<i64> = (0..BATCH)
        .flat_map(|row| match row % 2 {
            0 => [(row % 4) as i64, IGNORE_INDEX],
            _ => [IGNORE_INDEX, (row % 3) as i64],
        })
        .collect();
    Ok(Batch {
        ids: Tensor::from_vec(ids, (BATCH, MAX_LEN), dev)?,
        types: Tensor::zeros((BATCH, MAX_LEN), DType::U32, dev)?,
        mask: Tensor::from_vec(mask, (BATCH, MAX_LEN), dev)?,
        labels: Tensor::from_vec(labels, (BATCH, 2), dev)?,
        tokens: lengths.iter().sum(),
    })
}

/// The trainer's step: forward (dropout on), losses (read back, as the
/// trainer logs them), backward, AdamW.
fn step(model: &MultiTaskModel, optimizer: &mut AdamW, batch: &Batch) -> Result<()> {
    let outputs = model.forward(
        &batch.ids,
        Some(&batch.types),
        &batch.mask,
        true,
        &Freeze::None,
    )?;
    let (losses, labels_checked) = model.loss_deferred(
        &outputs,
        &batch.labels,
        &[],
        &vec![TaskLoss::weighted(1.0); 2],
    )?;
    let _: Vec<f32> = losses.per_task.to_dtype(DType::F32)?.to_vec1()?;
    labels_checked.verify()?;
    let grads = losses.total.backward()?;
    optimizer.step(&grads, 1.0, 1.0)
}

pub fn benches(c: &mut Criterion) {
    let dev = match Device::new_cuda(0) {
        Ok(dev) => dev,
        Err(e) => {
            eprintln!("cuda training-step benches skipped: no CUDA device ({e})");
            return;
        }
    };
    let files = crate::random_model::minilm_folder("sentence-mtl-bench-train-step")
        .expect("a random MiniLM folder");
    let tasks = [
        TaskHead::classification("emotion", 4),
        TaskHead::classification("sentiment", 3),
    ];
    let batch = batch(&dev).expect("batch");
    for dtype in [DType::F32, DType::BF16] {
        let model = MultiTaskModel::new(&files, &tasks, 42, dtype, &dev).expect("model");
        let params = model.trainable_parameters(&Freeze::None);
        let group = ParamGroup {
            name: "all".into(),
            lr: 5e-5,
            weight_decay: 0.01,
            params,
        };
        let mut optimizer = AdamW::new(vec![group], AdamWParams::default()).expect("AdamW");
        let mut group = c.benchmark_group(format!("cuda/train_step MiniLM {dtype:?}"));
        group
            .sample_size(20)
            .measurement_time(Duration::from_secs(4))
            .throughput(Throughput::Elements(BATCH as u64));
        group.bench_function(
            format!(
                "batch {BATCH} padded to {MAX_LEN} ({} tokens)",
                batch.tokens
            ),
            |b| {
                b.iter(|| {
                    step(&model, &mut optimizer, &batch).expect("step");
                    dev.synchronize().expect("synchronize")
                })
            },
        );
        group.finish();
    }
}
