//! Masked mean pooling on CUDA at [256,128,768], f32 and bf16: the fused kernels
//! against the same computation composed from candle tensor ops, forward,
//! backward alone, and forward+backward through autograd.
//!
//! Each timed batch launches `iters` ops back to back, rotating through enough
//! input buffers to exceed the 60 MB L2, and synchronises the device before the
//! clock stops. Every token is real (the fused op skips padding, so this is its
//! worst case) and the mask is u8 (any mask dtype is read as it is, in place).
//! After each group a line gives the median's GB/s against the 4.3 TB/s floor.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Result, Tensor, Var};
use criterion::{black_box, BenchmarkId, Criterion, Throughput};
use sentence_mtl::ops::masked_mean_pool;
use sentence_mtl::ops::mean_pool::masked_mean_pool_backward;

const SHAPE: (usize, usize, usize) = (256, 128, 768);
const PEAK_BYTES_PER_S: f64 = 4.3e12;
const L2_BYTES: usize = 60 << 20;

/// Σ_t mask·hidden / max(Σ_t mask, 1e-9) from candle ops.
fn composed_forward(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(hidden.dtype())?;
    let sum = hidden.broadcast_mul(&mask.unsqueeze(2)?)?.sum(1)?;
    let count = mask.sum_keepdim(1)?.clamp(1e-9, f64::MAX)?;
    sum.broadcast_div(&count)
}

/// dhidden = mask · dpooled / max(count, 1e-9) from candle ops.
fn composed_backward(grad: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(grad.dtype())?;
    let count = mask.sum_keepdim(1)?.clamp(1e-9, f64::MAX)?;
    let weight = mask.broadcast_div(&count)?.unsqueeze(2)?;
    weight.broadcast_mul(&grad.unsqueeze(1)?)
}

type Op = fn(&Tensor, &Tensor) -> Result<Tensor>;

/// A benchmark group: name, input shape, bytes moved, the fused and composed ops.
type Run<'a> = (&'a str, &'a [usize], usize, [(&'a str, Op); 2]);

fn fused_forward_backward(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    forward_backward(hidden, mask, masked_mean_pool)
}

fn composed_forward_backward(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    forward_backward(hidden, mask, composed_forward)
}

/// Pools `hidden` (a variable, made once outside the timed loop: making it per
/// call would copy the whole input) and backpropagates the sum; returns
/// hidden's gradient.
fn forward_backward(hidden: &Tensor, mask: &Tensor, pool: Op) -> Result<Tensor> {
    let grads = pool(hidden, mask)?.sum_all()?.backward()?;
    Ok(grads.get(hidden).expect("gradient").clone())
}

/// Runs `op` `iters` times over the rotating inputs, synchronised; the elapsed time.
fn timed(device: &Device, inputs: &[Tensor], mask: &Tensor, op: Op, iters: u64) -> Duration {
    let start = Instant::now();
    for i in 0..iters as usize {
        black_box(op(&inputs[i % inputs.len()], mask).expect("op"));
    }
    device.synchronize().expect("synchronize");
    start.elapsed()
}

/// Median time per op over `batches` batches of 20, for the printed GB/s line.
fn median_per_op(device: &Device, inputs: &[Tensor], mask: &Tensor, op: Op) -> Duration {
    const BATCH: u64 = 20;
    let mut times: Vec<Duration> = (0..31)
        .map(|_| timed(device, inputs, mask, op, BATCH) / BATCH as u32)
        .collect();
    times.sort();
    times[times.len() / 2]
}

/// Benchmarks `impls` on inputs of `dims`, then prints each median's bandwidth
/// against the floor for `bytes` (the bytes the op must move at least).
fn bench_group(
    c: &mut Criterion,
    device: &Device,
    group_name: &str,
    dims: &[usize],
    dtype: DType,
    bytes: usize,
    impls: [(&str, Op); 2],
) -> Result<()> {
    let (b, t, _) = SHAPE;
    let input_bytes = dims.iter().product::<usize>() * dtype.size_in_bytes();
    let copies = (3 * L2_BYTES).div_ceil(input_bytes).max(2);
    // Through autograd the inputs must be variables; they are made so here.
    let through_autograd = group_name.ends_with("forward_backward");
    let inputs = (0..copies)
        .map(|_| {
            let t = Tensor::randn(0f32, 1.0, dims, device)?.to_dtype(dtype)?;
            if through_autograd {
                Ok(Var::from_tensor(&t)?.as_tensor().clone())
            } else {
                Ok(t)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let mask = Tensor::ones((b, t), DType::U8, device)?;

    let label = format!("{dtype:?}");
    let mut group = c.benchmark_group(group_name);
    group.throughput(Throughput::Bytes(bytes as u64));
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(2));
    group.sample_size(30);
    for (name, op) in impls {
        group.bench_with_input(BenchmarkId::new(name, &label), &(), |bench, _| {
            bench.iter_custom(|iters| timed(device, &inputs, &mask, op, iters))
        });
    }
    group.finish();

    let floor = bytes as f64 / PEAK_BYTES_PER_S;
    for (name, op) in impls {
        let median = median_per_op(device, &inputs, &mask, op).as_secs_f64();
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
            eprintln!("mean_pool CUDA benches skipped: no CUDA device ({e})");
            return;
        }
    };
    let (b, t, h) = SHAPE;
    for dtype in [DType::F32, DType::BF16] {
        let size = dtype.size_in_bytes();
        // Forward: read hidden and the mask, write the pooled rows.
        let forward_bytes = b * t * h * size + b * t + b * h * size;
        // Backward: read the pooled gradient and the mask, write dhidden.
        let backward_bytes = b * h * size + b * t + b * t * h * size;
        let runs: [Run; 3] = [
            (
                "mean_pool_cuda_forward",
                &[b, t, h],
                forward_bytes,
                [("fused", masked_mean_pool), ("composed", composed_forward)],
            ),
            (
                "mean_pool_cuda_backward",
                &[b, h],
                backward_bytes,
                [
                    ("fused", masked_mean_pool_backward),
                    ("composed", composed_backward),
                ],
            ),
            (
                "mean_pool_cuda_forward_backward",
                &[b, t, h],
                forward_bytes + backward_bytes,
                [
                    ("fused", fused_forward_backward),
                    ("composed", composed_forward_backward),
                ],
            ),
        ];
        for (group, dims, bytes, impls) in runs {
            bench_group(c, &device, group, dims, dtype, bytes, impls).expect(group);
        }
    }
}
