//! The kernels of `kernels/cross_entropy.cu` against the CPU path for
//! `dual_head_cross_entropy`, forward and backward, every dtype, every label
//! dtype and layout, sizes from one row to more rows than the forward grid has
//! threads, on the kernel target of the including binary (the host harness in
//! `tests/host_kernels`, a CUDA device in `tests/gpu`).

use crate::common::*;
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::Rng;
use sentence_mtl::ops::cross_entropy::dual_head_cross_entropy_deferred;
use sentence_mtl::ops::{dual_head_cross_entropy, IGNORE_INDEX};

const CPU: Device = Device::Cpu;

/// `(N, Ca, Cb)`: one row, one class, odd sizes, several blocks, and more rows
/// than the capped forward grid has threads (so threads loop and the partials
/// need the second, finalize launch).
const SHAPES: [(usize, usize, usize); 6] = [
    (1, 1, 2),
    (7, 4, 3),
    (257, 5, 11),
    (5_000, 4, 3),
    (3_000, 130, 2),
    (300_001, 4, 3),
];

const LABEL_DTYPES: [DType; 5] = [DType::I64, DType::I32, DType::I16, DType::U32, DType::U8];

/// Labels `[n, 2]` of `dtype`: random classes, each ignored with probability
/// `ignored` (IGNORE_INDEX, or the maximum for unsigned dtypes).
fn random_labels(
    seed: u64,
    n: usize,
    classes: [usize; 2],
    ignored: f64,
    dtype: DType,
) -> Result<Tensor> {
    let mut rng = rng(seed);
    let labels: Vec<i64> = (0..n)
        .flat_map(|_| classes)
        .map(|c| {
            if rng.random_bool(ignored) {
                IGNORE_INDEX
            } else {
                rng.random_range(0..c as i64)
            }
        })
        .collect();
    let t = Tensor::from_vec(labels, (n, 2), &CPU)?;
    match dtype {
        DType::U8 | DType::U32 => {
            let max = if dtype == DType::U8 {
                255
            } else {
                u32::MAX as i64
            };
            let ignored = t.eq(IGNORE_INDEX)?;
            ignored
                .where_cond(&Tensor::full(max, (n, 2), &CPU)?, &t)?
                .to_dtype(dtype)
        }
        _ => t.to_dtype(dtype),
    }
}

/// The losses and both logits' gradients of `g · losses`, on the CPU path
/// (`None`) or `target`'s kernels, with the inputs presented through `kinds`;
/// the device is poisoned before each pass.
fn run(
    inputs: (&Tensor, &Tensor, &Tensor),
    kinds: [Strided; 3],
    g: &Tensor,
    target: Option<&KernelTarget>,
) -> Result<[Vec<f64>; 3]> {
    match target {
        Some(target) => target.run(|device| run_on(inputs, kinds, g, device)),
        None => run_on(inputs, kinds, g, &CPU),
    }
}

fn run_on(
    (a, b, labels): (&Tensor, &Tensor, &Tensor),
    kinds: [Strided; 3],
    g: &Tensor,
    device: &Device,
) -> Result<[Vec<f64>; 3]> {
    let (va, vb) = (
        Var::from_tensor(&a.to_device(device)?)?,
        Var::from_tensor(&b.to_device(device)?)?,
    );
    let a = strided_view(va.as_tensor(), kinds[0])?;
    let b = strided_view(vb.as_tensor(), kinds[1])?;
    // Built on the CPU and only viewed on the device: candle's CUDA backend has
    // no copy kernel for i32 (`ucopy_i32`), which a transposed label view needs.
    let labels = strided_view_on(labels, kinds[2], device)?;
    poison_device(device)?;
    let losses = dual_head_cross_entropy(&a, &b, &labels)?;
    let objective = (&losses * g.to_device(device)?)?.sum_all()?;
    poison_device(device)?;
    let grads = objective.backward()?;
    let grad = |v: &Var| values(grads.get(v.as_tensor()).expect("gradient reaches the Var"));
    Ok([values(&losses), grad(&va), grad(&vb)])
}

#[test]
fn kernels_match_cpu_forward_and_backward() -> Result<()> {
    let Some(gpu) = crate::kernel_target("kernels_match_cpu_forward_and_backward") else {
        return Ok(());
    };
    let mut case = 0u64;
    for dtype in FLOAT_DTYPES {
        for (s, &(n, ca, cb)) in SHAPES.iter().enumerate() {
            case += 1;
            let mut rng = rng(case);
            let a = random_tensor(&mut rng, &[n, ca], dtype, &CPU)?;
            let b = random_tensor(&mut rng, &[n, cb], dtype, &CPU)?;
            let label_dtype = LABEL_DTYPES[s % LABEL_DTYPES.len()];
            // Half the shapes with one head left entirely unlabelled.
            let ignored = [0.3, 0.0, 0.5, 1.0, 0.3, 0.5][s];
            let labels = random_labels(case, n, [ca, cb], ignored, label_dtype)?;
            let labels = if s % 2 == 1 {
                all_ignored_for_b(&labels)?
            } else {
                labels
            };
            let g = Tensor::new(&[0.7f64, -1.2], &CPU)?.to_dtype(dtype)?;
            let kinds = [
                STRIDED_KINDS[s % 4],
                STRIDED_KINDS[(s + 1) % 4],
                STRIDED_KINDS[(s + 2) % 4],
            ];
            let want = run((&a, &b, &labels), kinds, &g, None)?;
            let got = run((&a, &b, &labels), kinds, &g, Some(&gpu))?;
            // Each value against its own scale: a loss (a mean of terms of order
            // 1) against 1, a gradient row of head h (softmax − onehot, scaled
            // by g_h / n_h) against |g_h| / n_h; plus the dtype's subnormal step,
            // below which it cannot tell values apart (f16 gradients at N = 300k
            // are ~2e-6, subnormal, where one step is 6e-8).
            let g64 = values(&g);
            let labelled = labelled_rows(&labels)?;
            let scales = [
                1.0,
                g64[0].abs() / labelled[0].max(1) as f64,
                g64[1].abs() / labelled[1].max(1) as f64,
            ];
            let (rtol, _) = tolerance(dtype);
            for ((what, scale), (got, want)) in ["losses", "grad_a", "grad_b"]
                .iter()
                .zip(scales)
                .zip(got.iter().zip(&want))
            {
                let what = format!(
                    "{what} {dtype:?} n={n} ca={ca} cb={cb} labels {label_dtype:?} {kinds:?}"
                );
                assert_close_tol(&what, got, want, rtol, rtol * scale + subnormal_step(dtype));
            }
        }
    }
    Ok(())
}

/// The labelled rows of each head (labels that are not the ignore value).
fn labelled_rows(labels: &Tensor) -> Result<[usize; 2]> {
    let ignore = match labels.dtype() {
        DType::U8 => 255.0,
        DType::U32 => u32::MAX as f64,
        _ => IGNORE_INDEX as f64,
    };
    let v = values(labels);
    Ok([0, 1].map(|h| {
        v.iter()
            .skip(h)
            .step_by(2)
            .filter(|&&l| l != ignore)
            .count()
    }))
}

/// The labels with head B's column set to its ignore value.
fn all_ignored_for_b(labels: &Tensor) -> Result<Tensor> {
    let ignore = match labels.dtype() {
        DType::U8 => 255.0,
        DType::U32 => u32::MAX as f64,
        _ => IGNORE_INDEX as f64,
    };
    let b = Tensor::full(ignore, (labels.dim(0)?, 1), &CPU)?.to_dtype(labels.dtype())?;
    Tensor::cat(&[&labels.narrow(1, 0, 1)?, &b], 1)
}

#[test]
fn kernels_give_the_cpu_error_for_bad_input() -> Result<()> {
    let Some(target) = crate::kernel_target("kernels_give_the_cpu_error_for_bad_input") else {
        return Ok(());
    };
    let gpu = target.device();
    // Bad labels in a small batch (one block) and a large one (finalize launch):
    // the first bad label by row is reported, with the same message as on the CPU.
    for (n, bad) in [
        (5usize, [(3usize, 1usize, 9i64), (4, 0, -7)]),
        (300_001, [(200_000, 0, 4), (250_000, 1, -1)]),
    ] {
        let mut rng = rng(n as u64);
        let a = random_tensor(&mut rng, &[n, 4], DType::F32, &CPU)?;
        let b = random_tensor(&mut rng, &[n, 3], DType::F32, &CPU)?;
        let mut labels = vec![0i64; 2 * n];
        for (row, head, value) in bad {
            labels[2 * row + head] = value;
        }
        let labels = Tensor::from_vec(labels, (n, 2), &CPU)?;
        let cpu_err = dual_head_cross_entropy(&a, &b, &labels)
            .unwrap_err()
            .to_string();
        let on_gpu = |t: &Tensor| t.to_device(&gpu);
        let (a, b, labels) = (on_gpu(&a)?, on_gpu(&b)?, on_gpu(&labels)?);
        let gpu_err = target
            .run(|_| dual_head_cross_entropy(&a, &b, &labels))
            .unwrap_err()
            .to_string();
        assert!(cpu_err.contains(&format!("row {}", bad[0].0)), "{cpu_err}");
        assert_eq!(gpu_err, cpu_err);
        // Deferred: the kernel path returns NaN losses (never a plausible number)
        // and the same error once the check is read.
        let (losses, check) = target.run(|_| dual_head_cross_entropy_deferred(&a, &b, &labels))?;
        assert!(
            values(&losses).iter().all(|v| v.is_nan()),
            "{:?}",
            values(&losses)
        );
        assert_eq!(check.verify().unwrap_err().to_string(), cpu_err);
    }
    if target.is_host() {
        return Ok(()); // the rest mixes devices
    }

    let a = random_tensor(&mut rng(1), &[4, 3], DType::F32, &gpu)?;
    let b = random_tensor(&mut rng(2), &[4, 2], DType::F32, &gpu)?;
    let labels = Tensor::zeros((4, 2), DType::I64, &CPU)?;
    let err = dual_head_cross_entropy(&a, &b, &labels)
        .unwrap_err()
        .to_string();
    assert!(err.contains("labels is on"), "{err}");
    let err = dual_head_cross_entropy(&a, &b.to_device(&CPU)?, &labels.to_device(&gpu)?)
        .unwrap_err()
        .to_string();
    assert!(err.contains("logits_b is on"), "{err}");
    let err = dual_head_cross_entropy(&a, &b.to_dtype(DType::BF16)?, &labels.to_device(&gpu)?)
        .unwrap_err()
        .to_string();
    assert!(err.contains("logits_b is BF16"), "{err}");
    let err = dual_head_cross_entropy(&a, &b, &labels.to_device(&gpu)?.to_dtype(DType::F32)?)
        .unwrap_err()
        .to_string();
    assert!(err.contains("integer dtype"), "{err}");
    Ok(())
}
