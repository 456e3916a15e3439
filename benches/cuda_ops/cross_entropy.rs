//! CUDA: fused `dual_head_cross_entropy` against the same losses composed from
//! candle ops, forward and forward+backward, [N,4] + [N,3] with i64 labels (each
//! row labelled for one head), f32 and bf16, at
//!
//! - N = 256: launch-bound. Compared with an empty kernel's launch + synchronise,
//!   and with an empty launch + a 32-byte device-to-host copy (what the checked
//!   op's label check costs: it reads a 4 x i64 status record back; the
//!   `deferred` form, which the trainer uses, leaves that to the step's own
//!   synchronisation).
//! - N = 1,048,576: bandwidth-bound. Criterion's throughput gives the achieved
//!   bandwidth; a printed line gives the bytes moved and their time at 4.3 TB/s.
//!
//! Every timed iteration synchronises the device and takes the next of several
//! input sets, so at N = 1M no input is still in the 60 MB L2.

use std::time::Duration;

use candle_core::{DType, Device, Result, Tensor, Var};
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sentence_mtl::ops::cross_entropy::{
    dual_head_cross_entropy_composed, dual_head_cross_entropy_deferred, launch_empty_kernel,
};
use sentence_mtl::ops::{dual_head_cross_entropy, IGNORE_INDEX};

const HBM_BYTES_PER_S: f64 = 4.3e12;
const CLASSES: [usize; 2] = [4, 3];
const ROWS: [usize; 2] = [256, 1 << 20];
/// Input sets each timed loop cycles through (4 x 30-44 MB at N = 1M).
const SETS: usize = 4;

type Op = fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>;

struct Inputs {
    a: Var,
    b: Var,
    labels: Tensor,
}

fn inputs(n: usize, dtype: DType, dev: &Device, rng: &mut StdRng) -> Result<Vec<Inputs>> {
    let logits = |c: usize| -> Result<Var> {
        Var::from_tensor(&Tensor::randn(0f32, 2f32, (n, c), dev)?.to_dtype(dtype)?)
    };
    (0..SETS)
        .map(|_| {
            let labels: Vec<i64> = (0..n)
                .flat_map(|_| {
                    let head = rng.random_range(0..2);
                    let class = rng.random_range(0..CLASSES[head] as i64);
                    if head == 0 {
                        [class, IGNORE_INDEX]
                    } else {
                        [IGNORE_INDEX, class]
                    }
                })
                .collect();
            Ok(Inputs {
                a: logits(CLASSES[0])?,
                b: logits(CLASSES[1])?,
                labels: Tensor::from_vec(labels, (n, 2), dev)?,
            })
        })
        .collect()
}

/// Bytes the fused op moves: forward reads logits and labels; the backward reads
/// them again and writes the gradients.
fn bytes(n: usize, dtype: DType) -> (usize, usize) {
    let logits = n * (CLASSES[0] + CLASSES[1]) * dtype.size_in_bytes();
    let labels = n * 2 * DType::I64.size_in_bytes();
    let forward = logits + labels;
    (forward, 2 * forward + logits)
}

fn bench_op(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    op: Op,
    sets: &[Inputs],
    dev: &Device,
    (forward, both): (usize, usize),
) {
    let mut i = 0;
    group.throughput(Throughput::Bytes(forward as u64));
    group.bench_function(format!("{name}/forward"), |bench| {
        bench.iter(|| {
            let s = &sets[i % SETS];
            i += 1;
            let losses = op(
                &s.a.as_tensor().detach(),
                &s.b.as_tensor().detach(),
                &s.labels,
            )
            .expect("forward");
            dev.synchronize().expect("synchronize");
            losses
        })
    });
    group.throughput(Throughput::Bytes(both as u64));
    group.bench_function(format!("{name}/forward+backward"), |bench| {
        bench.iter(|| {
            let s = &sets[i % SETS];
            i += 1;
            let losses = op(s.a.as_tensor(), s.b.as_tensor(), &s.labels).expect("forward");
            let grads = losses
                .sum_all()
                .and_then(|l| l.backward())
                .expect("backward");
            dev.synchronize().expect("synchronize");
            grads
        })
    });
}

/// The launch-overhead baselines: an empty kernel, then the same with the
/// 32-byte status read-back the fused forward does.
fn bench_launch_baselines(c: &mut Criterion, dev: &Device) {
    let status = Tensor::zeros(4, DType::I64, dev).expect("status");
    let mut group = c.benchmark_group("cuda/launch baseline");
    group
        .sample_size(100)
        .measurement_time(Duration::from_secs(2));
    group.bench_function("empty kernel + synchronize", |bench| {
        bench.iter(|| {
            launch_empty_kernel(dev).expect("launch");
            dev.synchronize().expect("synchronize")
        })
    });
    group.bench_function("empty kernel + 32 B device-to-host copy", |bench| {
        bench.iter(|| {
            launch_empty_kernel(dev).expect("launch");
            status.to_vec1::<i64>().expect("read back")
        })
    });
    group.finish();
}

/// The deferred form's forward: no read-back (the check is dropped unread here;
/// the trainer verifies it at the step's own synchronisation).
fn deferred(a: &Tensor, b: &Tensor, labels: &Tensor) -> Result<Tensor> {
    dual_head_cross_entropy_deferred(a, b, labels).map(|(losses, _check)| losses)
}

pub fn benches(c: &mut Criterion) {
    let dev = match Device::new_cuda(0) {
        Ok(dev) => dev,
        Err(e) => {
            eprintln!("cuda dual CE benches skipped: no CUDA device ({e})");
            return;
        }
    };
    bench_launch_baselines(c, &dev);
    let mut rng = StdRng::seed_from_u64(0);
    for n in ROWS {
        for dtype in [DType::F32, DType::BF16] {
            let sets = inputs(n, dtype, &dev, &mut rng).expect("inputs");
            let moved = bytes(n, dtype);
            println!(
                "cuda/dual_ce N={n} {dtype:?}: forward moves {:.1} MB (floor {:.2} us at 4.3 TB/s), \
                 forward+backward {:.1} MB (floor {:.2} us)",
                moved.0 as f64 / 1e6,
                moved.0 as f64 / HBM_BYTES_PER_S * 1e6,
                moved.1 as f64 / 1e6,
                moved.1 as f64 / HBM_BYTES_PER_S * 1e6,
            );
            let mut group = c.benchmark_group(format!("cuda/dual_ce [{n},4]+[{n},3] {dtype:?}"));
            group
                .sample_size(50)
                .measurement_time(Duration::from_secs(2));
            bench_op(
                &mut group,
                "fused",
                dual_head_cross_entropy,
                &sets,
                &dev,
                moved,
            );
            bench_op(&mut group, "deferred", deferred, &sets, &dev, moved);
            bench_op(
                &mut group,
                "composed",
                dual_head_cross_entropy_composed,
                &sets,
                &dev,
                moved,
            );
            group.finish();
        }
    }
}
