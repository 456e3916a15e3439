//! CPU tests of `multi_head_cross_entropy`: against the f64 reference (proptest
//! over row counts, head counts, class counts, float and label dtypes, layouts,
//! ignored rows, class and head weights), the two-head case against the dual
//! op, gradients (reference, finite differences, the composed op), the
//! parallel path of large batches, and bad input.

use crate::common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::ce_heads::{label_tensor, random_heads, random_labels};
use common::{assert_close_tol, random_tensor, rng, values, FLOAT_DTYPES};
use proptest::prelude::*;
use rand::Rng;
use sentence_mtl::ops::multi_head_cross_entropy::{
    multi_head_cross_entropy_composed, multi_head_cross_entropy_deferred,
};
use sentence_mtl::ops::reference::multi_head_cross_entropy as reference;
use sentence_mtl::ops::{dual_head_cross_entropy, multi_head_cross_entropy, CeHead, IGNORE_INDEX};

const LABEL_DTYPES: [DType; 5] = [DType::I64, DType::I32, DType::I16, DType::U32, DType::U8];

fn tol(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F64 => (1e-10, 1e-12),
        DType::F32 => (1e-5, 1e-6),
        _ => (2e-2, 2e-3),
    }
}

/// One random problem checked against the reference: losses, total, gradient.
fn check_case(
    seed: u64,
    n: usize,
    h: usize,
    dtype: DType,
    label_dtype: DType,
    transposed: bool,
) -> Result<()> {
    let mut rng = rng(seed);
    let (heads, ignore) = random_heads(&mut rng, h, label_dtype);
    let width: usize = heads.iter().map(|h| h.classes).sum();
    let labels = random_labels(&mut rng, n, &heads, &ignore, 0.3);
    // Rounded to the dtype first, so that the reference sees the same values.
    let logits = Var::from_tensor(&random_tensor(&mut rng, &[n, width], dtype, &Device::Cpu)?)?;
    let input = if transposed {
        // A transposed copy: column stride 1 -> row stride 1.
        logits.as_tensor().t()?.contiguous()?.t()?
    } else {
        logits.as_tensor().clone()
    };
    let label_t = if transposed {
        label_tensor(&labels, h, label_dtype)?
            .t()?
            .contiguous()?
            .t()?
    } else {
        label_tensor(&labels, h, label_dtype)?
    };
    let loss = multi_head_cross_entropy(&input, &label_t, &heads)?;
    assert_eq!(loss.per_head.dims(), &[h]);
    assert_eq!(loss.per_head.dtype(), dtype);
    let z = values(logits.as_tensor());
    let (want, want_total) = reference::multi_head_cross_entropy(&z, &labels, n, &heads, &ignore);
    let (rtol, atol) = tol(dtype);
    let what = format!("{dtype:?} {label_dtype:?} n={n} h={h} transposed={transposed}");
    assert_close_tol(
        &format!("losses {what}"),
        &values(&loss.per_head),
        &want,
        rtol,
        atol,
    );
    assert_close_tol(
        &format!("total {what}"),
        &values(&loss.total),
        &[want_total],
        rtol,
        atol,
    );
    // The gradient of g·losses + c·total.
    let g: Vec<f64> = (0..=h)
        .map(|i| 0.5 + i as f64 * 0.25 * if i % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    let gh = Tensor::new(&g[..h], &Device::Cpu)?.to_dtype(dtype)?;
    let objective = ((&loss.per_head * gh)?.sum_all()? + (&loss.total * g[h])?)?;
    let grads = objective.backward()?;
    let got = values(
        grads
            .get(logits.as_tensor())
            .expect("a gradient for the logits"),
    );
    let want = reference::multi_head_cross_entropy_backward(&z, &labels, n, &heads, &ignore, &g);
    assert_close_tol(
        &format!("grad {what}"),
        &got,
        &want,
        rtol,
        atol.max(rtol * 0.1),
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    #[test]
    fn matches_the_reference(
        seed in 0u64..1_000_000,
        n in 0usize..40,
        h in 1usize..7,
        dtype in prop::sample::select(FLOAT_DTYPES.to_vec()),
        label_dtype in prop::sample::select(LABEL_DTYPES.to_vec()),
        transposed in any::<bool>(),
    ) {
        check_case(seed, n, h, dtype, label_dtype, transposed).unwrap();
    }
}

/// Above 2048 rows the pass runs on row chunks in parallel: same results, and
/// a bad label in a late chunk is reported for its row.
#[test]
fn large_batches_match_the_reference_and_report_late_bad_labels() -> Result<()> {
    check_case(7, 5000, 3, DType::F32, DType::I64, false)?;
    let heads = [CeHead::new(4), CeHead::new(3)];
    let n = 6000;
    let mut labels: Vec<i64> = (0..n * 2).map(|i| (i % 3) as i64).collect();
    labels[2 * 4500 + 1] = 3;
    labels[2 * 5900] = 9;
    let logits = Tensor::randn(0f32, 1., (n, 7), &Device::Cpu)?;
    let err = multi_head_cross_entropy(&logits, &label_tensor(&labels, 2, DType::I64)?, &heads)
        .unwrap_err()
        .to_string();
    assert!(err.contains("head 1 at row 4500: 3"), "{err}");
    Ok(())
}

/// Two heads of unit weight are the dual-head op on the two column blocks.
#[test]
fn two_heads_are_the_dual_head_op() -> Result<()> {
    let mut rng = rng(3);
    let n = 37;
    let heads = [CeHead::new(4), CeHead::new(3)];
    let labels = random_labels(&mut rng, n, &heads, &[IGNORE_INDEX; 2], 0.3);
    let logits = random_tensor(&mut rng, &[n, 7], DType::F32, &Device::Cpu)?;
    let labels = label_tensor(&labels, 2, DType::I64)?;
    let multi = multi_head_cross_entropy(&logits, &labels, &heads)?;
    let dual =
        dual_head_cross_entropy(&logits.narrow(1, 0, 4)?, &logits.narrow(1, 4, 3)?, &labels)?;
    assert_close_tol(
        "two heads",
        &values(&multi.per_head),
        &values(&dual),
        1e-6,
        1e-7,
    );
    let sum = values(&dual).iter().sum::<f64>();
    assert_close_tol("total", &values(&multi.total), &[sum], 1e-6, 1e-7);
    Ok(())
}

/// The fused op and candle's composed ops agree on losses and gradients, with
/// class weights, head weights and label smoothing.
#[test]
fn fused_equals_composed() -> Result<()> {
    let mut rng = rng(11);
    let n = 50;
    let heads = [
        CeHead::new(4)
            .with_class_weights(vec![0.5, 2.0, 1.0, 3.0])
            .with_weight(0.7),
        CeHead::new(3).with_label_smoothing(0.1),
        CeHead::new(2).with_weight(1.5),
        CeHead::new(5)
            .with_label_smoothing(0.3)
            .with_class_weights(vec![1.0, 0.5, 2.0, 1.5, 0.2]),
    ];
    let labels = label_tensor(
        &random_labels(&mut rng, n, &heads, &[IGNORE_INDEX; 4], 0.3),
        4,
        DType::I64,
    )?;
    let logits = Var::from_tensor(&random_tensor(
        &mut rng,
        &[n, 14],
        DType::F32,
        &Device::Cpu,
    )?)?;
    let fused = multi_head_cross_entropy(logits.as_tensor(), &labels, &heads)?;
    let composed = multi_head_cross_entropy_composed(logits.as_tensor(), &labels, &heads)?;
    assert_close_tol(
        "losses",
        &values(&fused.per_head),
        &values(&composed.per_head),
        1e-5,
        1e-6,
    );
    let g_fused = fused.total.backward()?;
    let g_composed = composed.total.backward()?;
    assert_close_tol(
        "grads",
        &values(g_fused.get(logits.as_tensor()).unwrap()),
        &values(g_composed.get(logits.as_tensor()).unwrap()),
        1e-5,
        1e-6,
    );
    Ok(())
}

/// Central finite differences of the total in f64.
#[test]
fn gradient_matches_finite_differences() -> Result<()> {
    let mut rng = rng(5);
    let (n, heads) = (
        6,
        [
            CeHead::new(3)
                .with_class_weights(vec![1.0, 2.0, 0.5])
                .with_label_smoothing(0.2),
            CeHead::new(2).with_weight(0.3),
        ],
    );
    let labels: Vec<i64> = random_labels(&mut rng, n, &heads, &[IGNORE_INDEX; 2], 0.2);
    let label_t = label_tensor(&labels, 2, DType::I64)?;
    let z: Vec<f64> = (0..n * 5).map(|_| rng.random_range(-2.0..2.0)).collect();
    let total = |z: &[f64]| -> f64 {
        let t = Tensor::from_vec(z.to_vec(), (n, 5), &Device::Cpu).unwrap();
        multi_head_cross_entropy(&t, &label_t, &heads)
            .unwrap()
            .total
            .to_scalar::<f64>()
            .unwrap()
    };
    let var = Var::from_tensor(&Tensor::from_vec(z.clone(), (n, 5), &Device::Cpu)?)?;
    let grads = multi_head_cross_entropy(var.as_tensor(), &label_t, &heads)?
        .total
        .backward()?;
    let got = values(grads.get(var.as_tensor()).unwrap());
    let eps = 1e-6;
    let want: Vec<f64> = (0..z.len())
        .map(|k| {
            let (mut up, mut down) = (z.clone(), z.clone());
            up[k] += eps;
            down[k] -= eps;
            (total(&up) - total(&down)) / (2.0 * eps)
        })
        .collect();
    assert_close_tol("finite differences", &got, &want, 1e-6, 1e-8);
    Ok(())
}

/// Label smoothing in closed form: with ε = 1 the target is uniform, so a
/// row's loss is `logsumexp(z) − mean(z)` whatever its label; with ε the loss
/// is `(1 − ε)·CE(one-hot) + ε·CE(uniform)`, and the gradient rows still sum
/// to 0.
#[test]
fn label_smoothing_mixes_one_hot_and_uniform() -> Result<()> {
    let mut rng = rng(17);
    let n = 9;
    let logits = random_tensor(&mut rng, &[n, 4], DType::F64, &Device::Cpu)?;
    let labels = Tensor::from_vec(
        (0..n as i64).map(|i| i % 4).collect::<Vec<_>>(),
        (n, 1),
        &Device::Cpu,
    )?;
    let loss = |eps: f64| -> Result<f64> {
        multi_head_cross_entropy(
            &logits,
            &labels,
            &[CeHead::new(4).with_label_smoothing(eps)],
        )?
        .total
        .to_scalar::<f64>()
    };
    let z = values(&logits);
    let uniform: f64 = z
        .chunks(4)
        .map(|row| {
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            lse - row.iter().sum::<f64>() / 4.0
        })
        .sum::<f64>()
        / n as f64;
    assert_close_tol("eps = 1", &[loss(1.0)?], &[uniform], 1e-12, 1e-12);
    let (one_hot, eps) = (loss(0.0)?, 0.15);
    assert_close_tol(
        "mixture",
        &[loss(eps)?],
        &[(1.0 - eps) * one_hot + eps * uniform],
        1e-12,
        1e-12,
    );
    assert!(loss(eps)? != one_hot);
    let var = Var::from_tensor(&logits)?;
    let head = [CeHead::new(4).with_label_smoothing(eps)];
    let grads = multi_head_cross_entropy(var.as_tensor(), &labels, &head)?
        .total
        .backward()?;
    for row in values(grads.get(var.as_tensor()).unwrap()).chunks(4) {
        assert!(row.iter().sum::<f64>().abs() < 1e-12, "{row:?}");
    }
    Ok(())
}

/// Every row ignored, or class weights of 0 on the labelled classes: loss 0,
/// gradient 0, never NaN.
#[test]
fn heads_without_weight_give_zero_not_nan() -> Result<()> {
    let heads = [
        CeHead::new(3),
        CeHead::new(2).with_class_weights(vec![0.0, 1.0]),
    ];
    let labels = Tensor::new(&[[IGNORE_INDEX, 0], [IGNORE_INDEX, 0]], &Device::Cpu)?;
    let logits = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 5), &Device::Cpu)?)?;
    let loss = multi_head_cross_entropy(logits.as_tensor(), &labels, &heads)?;
    assert_eq!(values(&loss.per_head), [0.0, 0.0]);
    let grads = loss.total.backward()?;
    assert!(values(grads.get(logits.as_tensor()).unwrap())
        .iter()
        .all(|&g| g == 0.0));
    Ok(())
}

#[test]
fn bad_input_is_a_clear_error() -> Result<()> {
    let dev = Device::Cpu;
    let logits = Tensor::randn(0f32, 1., (4, 7), &dev)?;
    let labels = Tensor::new(&[[0i64, 1], [1, 2], [3, 0], [2, IGNORE_INDEX]], &dev)?;
    let heads = [CeHead::new(4), CeHead::new(3)];
    let err = |logits: &Tensor, labels: &Tensor, heads: &[CeHead]| {
        multi_head_cross_entropy_deferred(logits, labels, heads)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert!(err(&logits.flatten_all()?, &labels, &heads).contains("logits"));
    assert!(err(&logits, &labels.flatten_all()?, &heads).contains("labels"));
    assert!(err(&logits.narrow(0, 0, 3)?, &labels, &heads).contains("batch size mismatch"));
    assert!(err(&logits, &labels, &heads[..1]).contains("2 columns but 1 heads"));
    assert!(err(&logits, &labels, &[CeHead::new(4), CeHead::new(4)])
        .contains("8 classes in all but logits has 7"));
    assert!(err(&logits, &labels, &[CeHead::new(7), CeHead::new(0)]).contains("0 classes"));
    assert!(err(
        &logits,
        &labels,
        &[
            CeHead::new(4).with_class_weights(vec![1.0; 3]),
            CeHead::new(3)
        ]
    )
    .contains("4 classes but 3 class weights"));
    assert!(err(
        &logits,
        &labels,
        &[
            CeHead::new(4).with_class_weights(vec![1.0, -1.0, 1.0, 1.0]),
            CeHead::new(3)
        ]
    )
    .contains("class weight -1"));
    assert!(err(
        &logits,
        &labels,
        &[CeHead::new(4).with_weight(f64::NAN), CeHead::new(3)]
    )
    .contains("weight NaN"));
    for eps in [-0.1, 1.5, f64::NAN] {
        let msg = err(
            &logits,
            &labels,
            &[CeHead::new(4), CeHead::new(3).with_label_smoothing(eps)],
        );
        assert!(msg.contains("head 1 has label smoothing"), "{msg}");
    }
    assert!(err(&logits, &labels.to_dtype(DType::F32)?, &heads).contains("integer"));
    assert!(err(&logits.to_dtype(DType::U32)?, &labels, &heads).contains("logits"));
    assert!(err(&logits, &labels, &[]).contains("at least one head"));
    let bad = Tensor::new(&[[0i64, 1], [1, 2], [3, 0], [2, 3]], &dev)?;
    let msg = err(&logits, &bad, &heads);
    assert!(msg.contains("head 1 at row 3: 3"), "{msg}");
    // A head's own ignore index: -100 is then a bad label, 7 is ignored.
    let own = [
        CeHead {
            ignore_index: Some(7),
            ..CeHead::new(4)
        },
        CeHead::new(3),
    ];
    let with_seven = Tensor::new(&[[7i64, 1], [1, 2], [3, 0], [2, IGNORE_INDEX]], &dev)?;
    assert!(err(&logits, &with_seven, &own).is_empty());
    assert!(err(
        &logits,
        &labels.narrow(0, 0, 4)?,
        &[
            CeHead {
                ignore_index: Some(7),
                ..CeHead::new(4)
            },
            CeHead {
                ignore_index: Some(7),
                ..CeHead::new(3)
            }
        ]
    )
    .contains("-100"));
    Ok(())
}
