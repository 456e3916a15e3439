//! CUDA: fused `multi_head_cross_entropy` (its deferred form, as the trainer
//! calls it, and the checked form, which reads the 16-byte status back) against
//! the same losses composed from candle ops per head, forward and
//! forward+backward of the total, four heads (4 + 3 + 6 + 2 classes) side by
//! side in one `[N, 15]` logits tensor, i64 labels (each row labelled for one
//! head), f32 and bf16, at N = 256 (launch-bound: the composed form is ~10
//! launches per head) and N = 1,048,576 (bandwidth-bound; a printed line gives
//! the bytes moved and their time at 4.3 TB/s).
//!
//! Every timed iteration synchronises the device and takes the next of several
//! input sets, so at N = 1M no input is still in L2.

use std::time::Duration;

use candle_core::{DType, Device, Result, Tensor, Var};
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sentence_mtl::ops::multi_head_cross_entropy::{
    multi_head_cross_entropy_composed, multi_head_cross_entropy_deferred,
};
use sentence_mtl::ops::{multi_head_cross_entropy, CeHead, MultiHeadLoss, IGNORE_INDEX};

const HBM_BYTES_PER_S: f64 = 4.3e12;
const CLASSES: [usize; 4] = [4, 3, 6, 2];
const ROWS: [usize; 2] = [256, 1 << 20];
/// Input sets each timed loop cycles through.
const SETS: usize = 4;

type Op = fn(&Tensor, &Tensor, &[CeHead]) -> Result<MultiHeadLoss>;

struct Inputs {
    logits: Var,
    labels: Tensor,
}

fn inputs(n: usize, dtype: DType, dev: &Device, rng: &mut StdRng) -> Result<Vec<Inputs>> {
    let width: usize = CLASSES.iter().sum();
    (0..SETS)
        .map(|_| {
            let labels: Vec<i64> = (0..n)
                .flat_map(|_| {
                    let head = rng.random_range(0..CLASSES.len());
                    let class = rng.random_range(0..CLASSES[head] as i64);
                    (0..CLASSES.len()).map(move |h| if h == head { class } else { IGNORE_INDEX })
                })
                .collect();
            let logits = Tensor::randn(0f32, 2f32, (n, width), dev)?.to_dtype(dtype)?;
            Ok(Inputs {
                logits: Var::from_tensor(&logits)?,
                labels: Tensor::from_vec(labels, (n, CLASSES.len()), dev)?,
            })
        })
        .collect()
}

/// Bytes the fused op moves: the forward reads logits and labels; the backward
/// reads them again and writes the gradient.
fn bytes(n: usize, dtype: DType) -> (usize, usize) {
    let logits = n * CLASSES.iter().sum::<usize>() * dtype.size_in_bytes();
    let labels = n * CLASSES.len() * DType::I64.size_in_bytes();
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
    let heads: Vec<CeHead> = CLASSES.iter().map(|&c| CeHead::new(c)).collect();
    let mut i = 0;
    group.throughput(Throughput::Bytes(forward as u64));
    group.bench_function(format!("{name}/forward"), |bench| {
        bench.iter(|| {
            let s = &sets[i % SETS];
            i += 1;
            let loss = op(&s.logits.as_tensor().detach(), &s.labels, &heads).expect("forward");
            dev.synchronize().expect("synchronize");
            loss
        })
    });
    group.throughput(Throughput::Bytes(both as u64));
    group.bench_function(format!("{name}/forward+backward"), |bench| {
        bench.iter(|| {
            let s = &sets[i % SETS];
            i += 1;
            let loss = op(s.logits.as_tensor(), &s.labels, &heads).expect("forward");
            let grads = loss.total.backward().expect("backward");
            dev.synchronize().expect("synchronize");
            grads
        })
    });
}

/// The deferred form: no read-back (the check is dropped unread here; the
/// trainer verifies it at the step's own synchronisation).
fn deferred(logits: &Tensor, labels: &Tensor, heads: &[CeHead]) -> Result<MultiHeadLoss> {
    multi_head_cross_entropy_deferred(logits, labels, heads).map(|(loss, _check)| loss)
}

pub fn benches(c: &mut Criterion) {
    let dev = match Device::new_cuda(0) {
        Ok(dev) => dev,
        Err(e) => {
            eprintln!("cuda N-head CE benches skipped: no CUDA device ({e})");
            return;
        }
    };
    let mut rng = StdRng::seed_from_u64(0);
    for n in ROWS {
        for dtype in [DType::F32, DType::BF16] {
            let sets = inputs(n, dtype, &dev, &mut rng).expect("inputs");
            let moved = bytes(n, dtype);
            println!(
                "cuda/n_head_ce N={n} {dtype:?}: forward moves {:.1} MB (floor {:.2} us at 4.3 TB/s), \
                 forward+backward {:.1} MB (floor {:.2} us)",
                moved.0 as f64 / 1e6,
                moved.0 as f64 / HBM_BYTES_PER_S * 1e6,
                moved.1 as f64 / 1e6,
                moved.1 as f64 / HBM_BYTES_PER_S * 1e6,
            );
            let mut group = c.benchmark_group(format!("cuda/n_head_ce [{n},4+3+6+2] {dtype:?}"));
            group
                .sample_size(50)
                .measurement_time(Duration::from_secs(2));
            bench_op(&mut group, "deferred", deferred, &sets, &dev, moved);
            bench_op(
                &mut group,
                "fused",
                multi_head_cross_entropy,
                &sets,
                &dev,
                moved,
            );
            bench_op(
                &mut group,
                "composed",
                multi_head_cross_entropy_composed,
                &sets,
                &dev,
                moved,
            );
            group.finish();
        }
    }
}
