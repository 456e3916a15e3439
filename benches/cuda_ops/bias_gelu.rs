//! Bias + GELU (erf) on CUDA, the epilogue of the encoder's intermediate layer,
//! at [32·64, 1536] (a batch of 32 sentences of 64 tokens, BERT-base's
//! intermediate size) and [128·128, 1536], f32 and bf16: the fused kernels
//! against candle's composed `broadcast_add` then `gelu_erf`, forward, and
//! forward+backward through autograd (the gradients of x and of the bias).
//!
//! Each timed batch launches `iters` ops back to back, rotating through enough
//! input buffers to exceed the 60 MB L2, and synchronises the device before the
//! clock stops. After each group a line gives the median's GB/s against the
//! 4.3 TB/s floor.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Result, Tensor, Var};
use criterion::{black_box, BenchmarkId, Criterion, Throughput};
use sentence_mtl::ops::bias_gelu;

const SHAPES: [(usize, usize); 2] = [(32 * 64, 1536), (128 * 128, 1536)];
const PEAK_BYTES_PER_S: f64 = 4.3e12;
const L2_BYTES: usize = 60 << 20;

type Op = fn(&Tensor, &Tensor) -> Result<Tensor>;

/// A benchmark group: name, bytes moved, the fused and composed ops.
type Run<'a> = (&'a str, usize, [(&'a str, Op); 2]);

/// candle's composed form: the broadcast add, then the erf GELU.
fn composed_forward(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.broadcast_add(bias)?.gelu_erf()
}

fn fused_forward_backward(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    forward_backward(x, bias, bias_gelu)
}

fn composed_forward_backward(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    forward_backward(x, bias, composed_forward)
}

/// Applies `op` to `x` and `bias` (variables, made once outside the timed
/// loop) and backpropagates the sum; returns the bias gradient (x's is made too).
fn forward_backward(x: &Tensor, bias: &Tensor, op: Op) -> Result<Tensor> {
    let grads = op(x, bias)?.sum_all()?.backward()?;
    Ok(grads.get(bias).expect("bias gradient").clone())
}

/// Runs `op` `iters` times over the rotating inputs, synchronised; the elapsed time.
fn timed(device: &Device, inputs: &[Tensor], bias: &Tensor, op: Op, iters: u64) -> Duration {
    let start = Instant::now();
    for i in 0..iters as usize {
        black_box(op(&inputs[i % inputs.len()], bias).expect("op"));
    }
    device.synchronize().expect("synchronize");
    start.elapsed()
}

/// Median time per op over 31 batches of 20, for the printed GB/s line.
fn median_per_op(device: &Device, inputs: &[Tensor], bias: &Tensor, op: Op) -> Duration {
    const BATCH: u64 = 20;
    let mut times: Vec<Duration> = (0..31)
        .map(|_| timed(device, inputs, bias, op, BATCH) / BATCH as u32)
        .collect();
    times.sort();
    times[times.len() / 2]
}

/// Benchmarks `impls` on x of `[rows, h]`, then prints each median's bandwidth
/// against the floor for `bytes` (the bytes the op must move at least).
fn bench_group(
    c: &mut Criterion,
    device: &Device,
    group_name: &str,
    (rows, h): (usize, usize),
    dtype: DType,
    bytes: usize,
    impls: [(&str, Op); 2],
) -> Result<()> {
    let input_bytes = rows * h * dtype.size_in_bytes();
    let copies = (3 * L2_BYTES).div_ceil(input_bytes).max(2);
    // Through autograd the inputs must be variables; they are made so here.
    let through_autograd = group_name.ends_with("forward_backward");
    let variable = |t: Tensor| -> Result<Tensor> {
        if through_autograd {
            Ok(Var::from_tensor(&t)?.as_tensor().clone())
        } else {
            Ok(t)
        }
    };
    let inputs = (0..copies)
        .map(|_| variable(Tensor::randn(0f32, 1.0, (rows, h), device)?.to_dtype(dtype)?))
        .collect::<Result<Vec<_>>>()?;
    let bias = variable(Tensor::randn(0f32, 1.0, h, device)?.to_dtype(dtype)?)?;

    let label = format!("{dtype:?}/{rows}x{h}");
    let mut group = c.benchmark_group(group_name);
    group.throughput(Throughput::Bytes(bytes as u64));
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(2));
    group.sample_size(30);
    for (name, op) in impls {
        group.bench_with_input(BenchmarkId::new(name, &label), &(), |bench, _| {
            bench.iter_custom(|iters| timed(device, &inputs, &bias, op, iters))
        });
    }
    group.finish();

    let floor = bytes as f64 / PEAK_BYTES_PER_S;
    for (name, op) in impls {
        let median = median_per_op(device, &inputs, &bias, op).as_secs_f64();
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
            eprintln!("bias_gelu CUDA benches skipped: no CUDA device ({e})");
            return;
        }
    };
    for shape in SHAPES {
        let (rows, h) = shape;
        for dtype in [DType::F32, DType::BF16] {
            let n = rows * h * dtype.size_in_bytes();
            // Forward: read x, write y (the bias is noise).
            let forward_bytes = 2 * n;
            // Backward: read x and dy, write dx (the bias gradient's partials are noise).
            let backward_bytes = 3 * n;
            let runs: [Run; 2] = [
                (
                    "bias_gelu_cuda_forward",
                    forward_bytes,
                    [("fused", bias_gelu), ("composed", composed_forward)],
                ),
                (
                    "bias_gelu_cuda_forward_backward",
                    forward_bytes + backward_bytes,
                    [
                        ("fused", fused_forward_backward),
                        ("composed", composed_forward_backward),
                    ],
                ),
            ];
            for (group, bytes, impls) in runs {
                bench_group(c, &device, group, shape, dtype, bytes, impls).expect(group);
            }
        }
    }
}
