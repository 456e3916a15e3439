//! The kernels of `kernels/multi_head_cross_entropy.cu` against the CPU path of
//! `multi_head_cross_entropy`, forward and backward: every float and label
//! dtype, strided logits and labels, head and class weights, ignore indices of
//! the heads' own, heads left unlabelled, sizes from one row to more rows than
//! the capped forward grid has threads (the finalize launch), on the kernel
//! target of the including binary (the host harness in `tests/host_kernels`, a
//! CUDA device in `tests/gpu`).

use crate::common::ce_heads::{label_tensor, random_heads, random_labels};
use crate::common::*;
use candle_core::{DType, Device, Result, Tensor, Var};
use sentence_mtl::ops::multi_head_cross_entropy::multi_head_cross_entropy_deferred;
use sentence_mtl::ops::{multi_head_cross_entropy, CeHead};

const CPU: Device = Device::Cpu;

/// `(N, H)`: one row, odd sizes, several blocks, and more rows than the capped
/// forward grid has threads.
const SHAPES: [(usize, usize); 6] = [
    (1, 2),
    (7, 3),
    (257, 1),
    (5_000, 4),
    (3_000, 6),
    (300_001, 2),
];

const LABEL_DTYPES: [DType; 5] = [DType::I64, DType::I32, DType::I16, DType::U32, DType::U8];

/// The per-head losses and total, and the logits' gradient of
/// `Σ_h g_h·loss_h + g_t·total`, on the CPU path (`None`) or `target`'s
/// kernels; the device is poisoned before each pass.
fn run(
    (logits, labels, heads): (&Tensor, &Tensor, &[CeHead]),
    kinds: [Strided; 2],
    (g, g_total): (&Tensor, f64),
    target: Option<&KernelTarget>,
) -> Result<[Vec<f64>; 3]> {
    let on = |device: &Device| -> Result<[Vec<f64>; 3]> {
        let var = Var::from_tensor(&logits.to_device(device)?)?;
        let z = strided_view(var.as_tensor(), kinds[0])?;
        let labels = strided_view_on(labels, kinds[1], device)?;
        poison_device(device)?;
        let loss = multi_head_cross_entropy(&z, &labels, heads)?;
        let objective = ((&loss.per_head * g.to_device(device)?)?.sum_all()?
            + loss.total.affine(g_total, 0.0)?)?;
        poison_device(device)?;
        let grads = objective.backward()?;
        let grad = grads.get(var.as_tensor()).expect("gradient of the logits");
        Ok([values(&loss.per_head), values(&loss.total), values(grad)])
    };
    match target {
        Some(target) => target.run(on),
        None => on(&CPU),
    }
}

/// The largest |value| in each head's columns of a row-major `[N, ΣC]` gradient.
fn head_scales(grad: &[f64], heads: &[CeHead]) -> Vec<f64> {
    let width: usize = heads.iter().map(|h| h.classes).sum();
    let mut scales = vec![0f64; heads.len()];
    for row in grad.chunks(width.max(1)) {
        let mut col = 0;
        for (h, head) in heads.iter().enumerate() {
            for v in &row[col..col + head.classes] {
                scales[h] = scales[h].max(v.abs());
            }
            col += head.classes;
        }
    }
    scales
}

#[test]
fn kernels_match_cpu_forward_and_backward() -> Result<()> {
    let Some(target) = crate::kernel_target("kernels_match_cpu_forward_and_backward") else {
        return Ok(());
    };
    let mut case = 0u64;
    for dtype in FLOAT_DTYPES {
        for (s, &(n, h)) in SHAPES.iter().enumerate() {
            case += 1;
            let mut rng = rng(100 + case);
            let label_dtype = LABEL_DTYPES[(s + case as usize) % LABEL_DTYPES.len()];
            let (mut heads, ignore) = random_heads(&mut rng, h, label_dtype);
            if s == 4 {
                heads[2].classes = 130; // a wide head: long rows per thread
                heads[2].class_weights = None;
            }
            // Every other shape has its last head entirely unlabelled (loss 0, no gradient).
            let unlabelled = s % 2 == 1;
            let mut labels = random_labels(&mut rng, n, &heads, &ignore, 0.3);
            if unlabelled {
                for row in labels.chunks_mut(h) {
                    row[h - 1] = ignore[h - 1];
                }
            }
            let width: usize = heads.iter().map(|h| h.classes).sum();
            let logits = random_tensor(&mut rng, &[n, width], dtype, &CPU)?;
            let labels = label_tensor(&labels, h, label_dtype)?;
            let g: Vec<f64> = (0..h).map(|i| 0.7 - 0.45 * i as f64).collect();
            let g = Tensor::new(g.as_slice(), &CPU)?.to_dtype(dtype)?;
            let kinds = [STRIDED_KINDS[s % 4], STRIDED_KINDS[(s + 1) % 4]];
            let inputs = (&logits, &labels, heads.as_slice());
            let want = run(inputs, kinds, (&g, -1.1), None)?;
            let got = run(inputs, kinds, (&g, -1.1), Some(&target))?;
            let what = |part: &str| {
                format!("{part} {dtype:?} n={n} heads={h} labels {label_dtype:?} {kinds:?} (last head unlabelled: {unlabelled})")
            };
            let (rtol, _) = tolerance(dtype);
            // Losses are means of terms of order 1 (times class weights up to 3).
            assert_close_tol(
                &what("per-head losses"),
                &got[0],
                &want[0],
                rtol,
                3.0 * rtol,
            );
            let total_scale: f64 = heads.iter().map(|h| 3.0 * h.weight).sum();
            assert_close_tol(&what("total"), &got[1], &want[1], rtol, rtol * total_scale);
            // Each gradient value against the largest of its head (g_h and w_h·g_t
            // over the head's weight sum), plus the dtype's subnormal step.
            let scales = head_scales(&want[2], &heads);
            let width: usize = heads.iter().map(|h| h.classes).sum();
            let mut col = 0;
            for (hi, head) in heads.iter().enumerate() {
                let cols = |v: &[f64]| -> Vec<f64> {
                    v.chunks(width)
                        .flat_map(|row| row[col..col + head.classes].to_vec())
                        .collect()
                };
                assert_close_tol(
                    &what(&format!("gradient of head {hi}")),
                    &cols(&got[2]),
                    &cols(&want[2]),
                    rtol,
                    rtol * scales[hi] + subnormal_step(dtype),
                );
                col += head.classes;
            }
            if unlabelled {
                assert_eq!(got[0][h - 1], 0.0, "{}", what("unlabelled head's loss"));
                assert_eq!(scales[h - 1], 0.0, "{}", what("unlabelled head's gradient"));
            }
        }
    }
    Ok(())
}

#[test]
fn kernels_give_the_cpu_error_for_bad_labels() -> Result<()> {
    let Some(target) = crate::kernel_target("kernels_give_the_cpu_error_for_bad_labels") else {
        return Ok(());
    };
    let device = target.device();
    let heads = [CeHead::new(4), CeHead::new(3), CeHead::new(2)];
    // Bad labels in a small batch (one block) and a large one (finalize launch):
    // the first by row (then head) is reported, with the CPU's message.
    for (n, bad) in [
        (5usize, [(3usize, 2usize, 9i64), (3, 1, -7)]),
        (300_001, [(200_000, 0, 4), (250_000, 1, -1)]),
    ] {
        let mut rng = rng(n as u64);
        let logits = random_tensor(&mut rng, &[n, 9], DType::F32, &CPU)?;
        let mut labels = vec![0i64; 3 * n];
        for (row, head, value) in bad {
            labels[3 * row + head] = value;
        }
        let labels = Tensor::from_vec(labels, (n, 3), &CPU)?;
        let cpu_err = multi_head_cross_entropy(&logits, &labels, &heads)
            .unwrap_err()
            .to_string();
        let (first_row, first_head, first_value) = if bad[1].0 == bad[0].0 {
            bad[1] // the same row: the lower head comes first
        } else {
            bad[0]
        };
        assert!(
            cpu_err.contains(&format!(
                "head {first_head} at row {first_row}: {first_value}"
            )),
            "{cpu_err}"
        );
        let (logits, labels) = (logits.to_device(&device)?, labels.to_device(&device)?);
        let kernel_err = target
            .run(|_| multi_head_cross_entropy(&logits, &labels, &heads))
            .unwrap_err()
            .to_string();
        assert_eq!(kernel_err, cpu_err);
        // Deferred: NaN losses (never a plausible number) and the same error
        // once the check is read.
        let (loss, check) =
            target.run(|_| multi_head_cross_entropy_deferred(&logits, &labels, &heads))?;
        let got = [values(&loss.per_head), values(&loss.total)].concat();
        assert!(got.iter().all(|v| v.is_nan()), "{got:?}");
        assert_eq!(check.verify().unwrap_err().to_string(), cpu_err);
    }
    Ok(())
}
