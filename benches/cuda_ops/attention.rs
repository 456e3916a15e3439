//! Multi-head self-attention on CUDA at 32 sentences × 64 tokens, 12 heads ×
//! 32 (MiniLM-L6's attention), f32 and bf16: the packed attention kernels
//! (`attention_packed` on `[N, 3H]` with the sentence lengths) against
//! `attention_composed` on the same batch padded to `[B, T, 3H]` (every token
//! real, so both do the same arithmetic), forward, and forward+backward
//! through autograd (with and without the kernels' own dropout). `padded` is
//! the padded op, `attention`, which runs the same kernels on `[B, T, 3H]`
//! for a right-padded mask (its cost over `fused`: reading the mask back).
//!
//! Each timed batch runs `iters` ops back to back over a few input sets and
//! synchronises the device before the clock stops. The composed forward uses
//! candle's fused softmax (the encoder's inference path off the CPU); the
//! composed forward+backward the differentiable `ops::softmax_last_dim`.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Result, Tensor, Var};
use criterion::{black_box, BenchmarkId, Criterion};
use sentence_mtl::ops::attention::{
    attention, attention_composed, attention_packed, attention_packed_seeded, SeededDropout,
};

const SENTENCES: usize = 32;
const LEN: usize = 64;
const HEADS: usize = 12;
const HEAD_DIM: usize = 32;
/// Input sets each timed loop cycles through.
const SETS: usize = 4;

/// The same qkv values packed `[N, 3H]` and padded `[B, T, 3H]`, both
/// variables (made once, outside the timed loops).
struct Inputs {
    packed: Tensor,
    padded: Tensor,
    mask: Tensor,
    lengths: Vec<usize>,
}

type Op = fn(&Inputs) -> Result<Tensor>;

fn fused(x: &Inputs) -> Result<Tensor> {
    attention_packed(&x.packed, &x.lengths, HEADS, None)
}

fn padded(x: &Inputs) -> Result<Tensor> {
    attention(&x.padded, &x.mask, HEADS, None)
}

fn composed(x: &Inputs) -> Result<Tensor> {
    attention_composed(
        &x.padded,
        &x.mask,
        HEADS,
        None,
        candle_nn::ops::softmax_last_dim,
    )
}

/// Backpropagates the sum of `out` to `input`; returns input's gradient.
fn gradient(out: Tensor, input: &Tensor) -> Result<Tensor> {
    let grads = out.sum_all()?.backward()?;
    Ok(grads.get(input).expect("gradient").clone())
}

fn fused_forward_backward(x: &Inputs) -> Result<Tensor> {
    gradient(fused(x)?, &x.packed)
}

fn fused_dropout_forward_backward(x: &Inputs) -> Result<Tensor> {
    let dropout = SeededDropout { p: 0.1, seed: 1 };
    let out = attention_packed_seeded(&x.packed, &x.lengths, HEADS, Some(dropout))?;
    gradient(out, &x.packed)
}

fn padded_forward_backward(x: &Inputs) -> Result<Tensor> {
    gradient(padded(x)?, &x.padded)
}

fn composed_forward_backward(x: &Inputs) -> Result<Tensor> {
    let out = attention_composed(
        &x.padded,
        &x.mask,
        HEADS,
        None,
        sentence_mtl::ops::softmax_last_dim,
    )?;
    gradient(out, &x.padded)
}

const FORWARD: [(&str, Op); 3] = [("fused", fused), ("padded", padded), ("composed", composed)];
const FORWARD_BACKWARD: [(&str, Op); 4] = [
    ("fused", fused_forward_backward),
    ("fused_dropout", fused_dropout_forward_backward),
    ("padded", padded_forward_backward),
    ("composed", composed_forward_backward),
];

fn inputs(device: &Device, dtype: DType) -> Result<Vec<Inputs>> {
    let width = 3 * HEADS * HEAD_DIM;
    (0..SETS)
        .map(|_| {
            let values =
                Tensor::randn(0f32, 1.0, (SENTENCES, LEN, width), device)?.to_dtype(dtype)?;
            let packed = values.reshape((SENTENCES * LEN, width))?;
            Ok(Inputs {
                packed: Var::from_tensor(&packed)?.as_tensor().clone(),
                padded: Var::from_tensor(&values)?.as_tensor().clone(),
                mask: Tensor::ones((SENTENCES, LEN), DType::U8, device)?,
                lengths: vec![LEN; SENTENCES],
            })
        })
        .collect()
}

/// Runs `op` `iters` times over the input sets, synchronised; the elapsed time.
fn timed(device: &Device, inputs: &[Inputs], op: Op, iters: u64) -> Duration {
    let start = Instant::now();
    for i in 0..iters as usize {
        black_box(op(&inputs[i % inputs.len()]).expect("op"));
    }
    device.synchronize().expect("synchronize");
    start.elapsed()
}

/// Median time per op over 31 batches of 20, for the printed line.
fn median_per_op(device: &Device, inputs: &[Inputs], op: Op) -> Duration {
    const BATCH: u64 = 20;
    let mut times: Vec<Duration> = (0..31)
        .map(|_| timed(device, inputs, op, BATCH) / BATCH as u32)
        .collect();
    times.sort();
    times[times.len() / 2]
}

fn bench_group(
    c: &mut Criterion,
    device: &Device,
    group_name: &str,
    dtype: DType,
    impls: &[(&str, Op)],
) -> Result<()> {
    let inputs = inputs(device, dtype)?;
    let label = format!("{dtype:?}");
    let mut group = c.benchmark_group(group_name);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(2));
    group.sample_size(30);
    for &(name, op) in impls {
        group.bench_with_input(BenchmarkId::new(name, &label), &(), |bench, _| {
            bench.iter_custom(|iters| timed(device, &inputs, op, iters))
        });
    }
    group.finish();
    for &(name, op) in impls {
        let median = median_per_op(device, &inputs, op).as_secs_f64();
        println!(
            "{group_name}/{name}/{label}: median {:.1} us ({SENTENCES} sentences × {LEN} tokens, \
             {HEADS} heads × {HEAD_DIM})",
            median * 1e6
        );
    }
    Ok(())
}

pub fn benches(c: &mut Criterion) {
    let device = match Device::new_cuda(0) {
        Ok(device) => device,
        Err(e) => {
            eprintln!("attention CUDA benches skipped: no CUDA device ({e})");
            return;
        }
    };
    for dtype in [DType::F32, DType::BF16] {
        let runs: [(&str, &[(&str, Op)]); 2] = [
            ("attention_cuda_forward", &FORWARD),
            ("attention_cuda_forward_backward", &FORWARD_BACKWARD),
        ];
        for (group, impls) in runs {
            bench_group(c, &device, group, dtype, impls).expect(group);
        }
    }
}
