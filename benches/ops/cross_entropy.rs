//! CPU: fused `dual_head_cross_entropy` against the same losses composed from
//! candle ops (log-softmax, gather, masking of ignored rows, per head, stacked),
//! forward and forward+backward, [4096,4] + [4096,3] f32, i64 labels with each row
//! labelled for one head only (the mixed multi-task batch).

use std::time::Duration;

use candle_core::{DType, Device, Result, Tensor, Var};
use criterion::{BenchmarkGroup, Criterion};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sentence_mtl::ops::cross_entropy::dual_head_cross_entropy_composed;
use sentence_mtl::ops::{dual_head_cross_entropy, IGNORE_INDEX};

const ROWS: usize = 4096;
const CLASSES: [usize; 2] = [4, 3];

type Op = fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>;

/// `[ROWS, 2]` i64 labels: each row has a class for one head and IGNORE_INDEX
/// for the other.
fn mixed_labels(rng: &mut StdRng) -> Result<Tensor> {
    let labels: Vec<i64> = (0..ROWS)
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
    Tensor::from_vec(labels, (ROWS, 2), &Device::Cpu)
}

/// Times `op` forward (detached inputs) and forward + backward (through `Var`s).
fn bench_op(
    group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    op: Op,
    inputs: &(Var, Var, Tensor),
) {
    let (a, b, labels) = inputs;
    let (ad, bd) = (a.as_tensor().detach(), b.as_tensor().detach());
    group.bench_function(format!("{name}/forward"), |bench| {
        bench.iter(|| op(&ad, &bd, labels).expect("forward"))
    });
    group.bench_function(format!("{name}/forward+backward"), |bench| {
        bench.iter(|| {
            let losses = op(a.as_tensor(), b.as_tensor(), labels).expect("forward");
            losses
                .sum_all()
                .and_then(|l| l.backward())
                .expect("backward")
        })
    });
}

pub fn benches(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(0);
    let logits = |c: usize| Var::randn(0f32, 2f32, (ROWS, c), &Device::Cpu).expect("random logits");
    let inputs = (
        logits(CLASSES[0]),
        logits(CLASSES[1]),
        mixed_labels(&mut rng).expect("labels"),
    );
    assert_eq!(inputs.0.dtype(), DType::F32);
    let mut group = c.benchmark_group(format!(
        "cpu/dual_ce [{ROWS},{}]+[{ROWS},{}] f32",
        CLASSES[0], CLASSES[1]
    ));
    group
        .sample_size(50)
        .measurement_time(Duration::from_secs(3));
    bench_op(&mut group, "fused", dual_head_cross_entropy, &inputs);
    bench_op(
        &mut group,
        "composed",
        dual_head_cross_entropy_composed,
        &inputs,
    );
    group.finish();
}
