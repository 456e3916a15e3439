//! LayerNorm on CUDA, with and without the residual added first, f32 and bf16,
//! at [32·64, 384] (a MiniLM batch of 32 sentences of 64 tokens) and
//! [4096·32, 384] (large): the fused kernels (`layer_norm`,
//! `layer_norm_residual`) against the same computation composed from candle
//! tensor ops (`layer_norm_composed`, after `x + residual`), and in the forward
//! groups candle-nn's fused inference kernel (no backward), forward and
//! forward+backward through autograd.
//!
//! Each timed batch launches `iters` ops back to back, rotating through enough
//! input buffers to exceed the 60 MB L2, and synchronises the device before the
//! clock stops. The forward+backward groups backpropagate `Σ y` (the same
//! `sum_all` and its broadcast gradient on both sides). After each group a line
//! gives the median's GB/s against the 4.3 TB/s floor of the bytes the fused
//! op must move.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Result, Tensor, Var};
use criterion::{black_box, BenchmarkId, Criterion, Throughput};
use sentence_mtl::ops::layer_norm::layer_norm_composed;
use sentence_mtl::ops::{layer_norm, layer_norm_residual};

const SHAPES: [(usize, usize); 2] = [(32 * 64, 384), (4096 * 32, 384)];
const PEAK_BYTES_PER_S: f64 = 4.3e12;
const L2_BYTES: usize = 60 << 20;
const EPS: f64 = 1e-12;

/// One op's inputs: x and the residual `[rows, H]`, weight and bias `[H]`.
struct Inputs {
    x: Tensor,
    residual: Tensor,
    weight: Tensor,
    bias: Tensor,
}

type Op = fn(&Inputs) -> Result<Tensor>;

fn fused(i: &Inputs) -> Result<Tensor> {
    layer_norm(&i.x, &i.weight, &i.bias, EPS)
}

fn composed(i: &Inputs) -> Result<Tensor> {
    layer_norm_composed(&i.x, &i.weight, &i.bias, EPS)
}

fn candle_nn(i: &Inputs) -> Result<Tensor> {
    candle_nn::ops::layer_norm(&i.x, &i.weight, &i.bias, EPS as f32)
}

fn fused_residual(i: &Inputs) -> Result<Tensor> {
    layer_norm_residual(&i.x, &i.residual, &i.weight, &i.bias, EPS)
}

fn composed_residual(i: &Inputs) -> Result<Tensor> {
    layer_norm_composed(&(&i.x + &i.residual)?, &i.weight, &i.bias, EPS)
}

fn candle_nn_residual(i: &Inputs) -> Result<Tensor> {
    candle_nn::ops::layer_norm(&(&i.x + &i.residual)?, &i.weight, &i.bias, EPS as f32)
}

/// Backpropagates `Σ op(inputs)` (the inputs are variables, made once outside
/// the timed loop); returns x's gradient.
fn forward_backward(i: &Inputs, op: Op) -> Result<Tensor> {
    let grads = op(i)?.sum_all()?.backward()?;
    Ok(grads.get(&i.x).expect("gradient").clone())
}

fn fused_fwd_bwd(i: &Inputs) -> Result<Tensor> {
    forward_backward(i, fused)
}

fn composed_fwd_bwd(i: &Inputs) -> Result<Tensor> {
    forward_backward(i, composed)
}

fn fused_residual_fwd_bwd(i: &Inputs) -> Result<Tensor> {
    forward_backward(i, fused_residual)
}

fn composed_residual_fwd_bwd(i: &Inputs) -> Result<Tensor> {
    forward_backward(i, composed_residual)
}

/// Runs `op` `iters` times over the rotating inputs, synchronised; the elapsed time.
fn timed(device: &Device, inputs: &[Inputs], op: Op, iters: u64) -> Duration {
    let start = Instant::now();
    for i in 0..iters as usize {
        black_box(op(&inputs[i % inputs.len()]).expect("op"));
    }
    device.synchronize().expect("synchronize");
    start.elapsed()
}

/// Median time per op over 31 batches of 20, for the printed GB/s line.
fn median_per_op(device: &Device, inputs: &[Inputs], op: Op) -> Duration {
    const BATCH: u64 = 20;
    let mut times: Vec<Duration> = (0..31)
        .map(|_| timed(device, inputs, op, BATCH) / BATCH as u32)
        .collect();
    times.sort();
    times[times.len() / 2]
}

/// Random inputs of `(rows, h)` in `dtype` (variables when `variables`):
/// enough copies to exceed the L2 three times.
fn make_inputs(
    device: &Device,
    (rows, h): (usize, usize),
    dtype: DType,
    variables: bool,
) -> Result<Vec<Inputs>> {
    let input_bytes = 2 * rows * h * dtype.size_in_bytes();
    let copies = (3 * L2_BYTES).div_ceil(input_bytes).max(2);
    let make = |dims: &[usize], mean: f32| -> Result<Tensor> {
        let t = Tensor::randn(mean, 1.0, dims, device)?.to_dtype(dtype)?;
        if variables {
            Ok(Var::from_tensor(&t)?.as_tensor().clone())
        } else {
            Ok(t)
        }
    };
    (0..copies)
        .map(|_| {
            Ok(Inputs {
                x: make(&[rows, h], 0.5)?,
                residual: make(&[rows, h], -0.25)?,
                weight: make(&[h], 1.0)?,
                bias: make(&[h], 0.0)?,
            })
        })
        .collect()
}

/// Benchmarks `impls` on inputs of `shape`, then prints each median's
/// bandwidth against the floor for `bytes`.
fn bench_group(
    c: &mut Criterion,
    device: &Device,
    group_name: &str,
    shape: (usize, usize),
    dtype: DType,
    bytes: usize,
    impls: &[(&str, Op)],
) -> Result<()> {
    let inputs = make_inputs(
        device,
        shape,
        dtype,
        group_name.ends_with("forward_backward"),
    )?;
    let label = format!("{dtype:?}/{}x{}", shape.0, shape.1);
    let mut group = c.benchmark_group(group_name);
    group.throughput(Throughput::Bytes(bytes as u64));
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(2));
    group.sample_size(30);
    for &(name, op) in impls {
        group.bench_with_input(BenchmarkId::new(name, &label), &(), |bench, _| {
            bench.iter_custom(|iters| timed(device, &inputs, op, iters))
        });
    }
    group.finish();

    let floor = bytes as f64 / PEAK_BYTES_PER_S;
    for &(name, op) in impls {
        let median = median_per_op(device, &inputs, op).as_secs_f64();
        println!(
            "{group_name}/{name}/{label}: median {:.1} us, {:.0} GB/s, {:.0}% of the \
             {:.1} us floor ({:.1} MB at 4.3 TB/s)",
            median * 1e6,
            bytes as f64 / median / 1e9,
            100.0 * floor / median,
            floor * 1e6,
            bytes as f64 / 1e6,
        );
    }
    Ok(())
}

pub fn benches(c: &mut Criterion) {
    let device = match Device::new_cuda(0) {
        Ok(device) => device,
        Err(e) => {
            eprintln!("layer_norm CUDA benches skipped: no CUDA device ({e})");
            return;
        }
    };
    for shape in SHAPES {
        for dtype in [DType::F32, DType::BF16] {
            // One tensor of the activations' size, in bytes.
            let n = shape.0 * shape.1 * dtype.size_in_bytes();
            // Forward: read x (and the residual), write y. Backward: read x
            // (and the residual) and dy, write dx.
            let runs: [(&str, usize, &[(&str, Op)]); 4] = [
                (
                    "layer_norm_cuda_forward",
                    2 * n,
                    &[
                        ("fused", fused),
                        ("composed", composed),
                        ("candle_nn", candle_nn),
                    ],
                ),
                (
                    "layer_norm_residual_cuda_forward",
                    3 * n,
                    &[
                        ("fused", fused_residual),
                        ("composed", composed_residual),
                        ("candle_nn", candle_nn_residual),
                    ],
                ),
                (
                    "layer_norm_cuda_forward_backward",
                    5 * n,
                    &[("fused", fused_fwd_bwd), ("composed", composed_fwd_bwd)],
                ),
                (
                    "layer_norm_residual_cuda_forward_backward",
                    7 * n,
                    &[
                        ("fused", fused_residual_fwd_bwd),
                        ("composed", composed_residual_fwd_bwd),
                    ],
                ),
            ];
            for (group, bytes, impls) in runs {
                bench_group(c, &device, group, shape, dtype, bytes, impls).expect(group);
            }
        }
    }
}
