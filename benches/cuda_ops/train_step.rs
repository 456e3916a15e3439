//! CUDA: one training step of the recipe (issue 13's training-step bench):
//! a MiniLM-L6-shaped multi-task model (hidden 384, 6 layers, 12 heads of 32,
//! the emotion and sentiment heads), a batch of 32 sentences padded to 64
//! tokens, forward with dropout, the two losses, backward, AdamW over every
//! parameter — what `sentence-mtl train --cuda` does each step, read-back of
//! the losses included. f32, and bf16 with f32 master weights and losses.
//!
//! The weights are random (written to a temp folder), so the bench needs no
//! model download and runs on a GPU machine without network: a step's time
//! does not depend on the weights' values. The sentence lengths are fixed
//! and tweet-like (6 to 45 tokens, mean about 25, as the recipe's data; one
//! sentence of 64 sets the padded width).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{DType, Device, Result, Tensor};
use criterion::{Criterion, Throughput};
use sentence_mtl::model::multitask::{Freeze, MultiTaskModel, TaskHead, TaskLoss};
use sentence_mtl::model::ModelFiles;
use sentence_mtl::ops::IGNORE_INDEX;
use sentence_mtl::train::{AdamW, AdamWParams, ParamGroup};

const BATCH: usize = 32;
const MAX_LEN: usize = 64;
const VOCAB: usize = 30522;

/// all-MiniLM-L6-v2's configuration with random weights, written once.
fn random_minilm(dir: &Path) -> Result<PathBuf> {
    let (h, ffn, layers, positions) = (384, 1536, 6, 512);
    std::fs::create_dir_all(dir)?;
    let config = format!(
        r#"{{"architectures": ["BertModel"], "model_type": "bert", "vocab_size": {VOCAB},
  "hidden_size": {h}, "num_hidden_layers": {layers}, "num_attention_heads": 12,
  "intermediate_size": {ffn}, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
  "attention_probs_dropout_prob": 0.1, "max_position_embeddings": {positions},
  "type_vocab_size": 2, "initializer_range": 0.02, "layer_norm_eps": 1e-12,
  "pad_token_id": 0, "position_embedding_type": "absolute"}}"#
    );
    std::fs::write(dir.join("config.json"), config)?;
    // The model's loader reads no tokenizer, but a model folder has one.
    std::fs::write(
        dir.join("tokenizer.json"),
        r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
  "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
  "decoder": null, "model": {"type": "WordLevel", "vocab": {"[PAD]": 0, "[UNK]": 1},
  "unk_token": "[UNK]"}}"#,
    )?;
    let cpu = Device::Cpu;
    let mut weights: HashMap<String, Tensor> = HashMap::new();
    let mut add = |name: String, dims: &[usize], fill: Option<f32>| -> Result<()> {
        let t = match fill {
            Some(v) => Tensor::full(v, dims, &cpu)?,
            None => Tensor::randn(0f32, 0.02, dims, &cpu)?,
        };
        weights.insert(name, t);
        Ok(())
    };
    add(
        "embeddings.word_embeddings.weight".into(),
        &[VOCAB, h],
        None,
    )?;
    add(
        "embeddings.position_embeddings.weight".into(),
        &[positions, h],
        None,
    )?;
    add(
        "embeddings.token_type_embeddings.weight".into(),
        &[2, h],
        None,
    )?;
    add("embeddings.LayerNorm.weight".into(), &[h], Some(1.0))?;
    add("embeddings.LayerNorm.bias".into(), &[h], Some(0.0))?;
    for i in 0..layers {
        let p = format!("encoder.layer.{i}");
        for (m, rows, cols) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", ffn, h),
            ("output.dense", h, ffn),
        ] {
            add(format!("{p}.{m}.weight"), &[rows, cols], None)?;
            add(format!("{p}.{m}.bias"), &[rows], None)?;
        }
        for ln in ["attention.output.LayerNorm", "output.LayerNorm"] {
            add(format!("{p}.{ln}.weight"), &[h], Some(1.0))?;
            add(format!("{p}.{ln}.bias"), &[h], Some(0.0))?;
        }
    }
    candle_core::safetensors::save(&weights, dir.join("model.safetensors"))?;
    Ok(dir.to_path_buf())
}

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
    let dir = std::env::temp_dir().join("sentence-mtl-bench-random-minilm");
    let files = random_minilm(&dir)
        .and_then(|dir| ModelFiles::from_dir(dir).map_err(candle_core::Error::msg))
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
