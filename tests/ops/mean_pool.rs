//! CPU tests of `masked_mean_pool`: the f64 reference over random shapes, dtypes,
//! layouts and mask dtypes (proptest), edge cases, gradients (finite differences,
//! autograd through a Var, candle's composed ops) and every bad input.

use crate::common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::{assert_close, assert_close_tol, random_tensor, rng, strided_view, values, Strided};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::Rng;
use sentence_mtl::ops::masked_mean_pool;
use sentence_mtl::ops::mean_pool::masked_mean_pool_backward;
use sentence_mtl::ops::reference::mean_pool as reference;

/// Mask dtypes the op takes: what tokenizers and users hand in.
const MASK_DTYPES: [DType; 10] = [
    DType::U8,
    DType::U32,
    DType::I16,
    DType::I32,
    DType::I64,
    DType::F8E4M3,
    DType::F16,
    DType::BF16,
    DType::F32,
    DType::F64,
];

/// Rows of a mask that are not drawn at random.
#[derive(Debug, Clone, Copy, Default)]
struct SpecialRows {
    /// All padding.
    empty: Option<usize>,
    /// All real tokens.
    full: Option<usize>,
}

/// A random 0/1 mask `[B,T]` (as f64) with about `keep` of the tokens real,
/// except the `special` rows.
fn random_mask(rng: &mut StdRng, b: usize, t: usize, keep: f64, special: SpecialRows) -> Vec<f64> {
    (0..b * t)
        .map(|i| {
            let row = Some(i / t);
            let real = row != special.empty && (row == special.full || rng.random_bool(keep));
            f64::from(u8::from(real))
        })
        .collect()
}

fn mask_tensor(mask: &[f64], b: usize, t: usize, dtype: DType) -> Result<Tensor> {
    Tensor::from_vec(mask.to_vec(), (b, t), &Device::Cpu)?.to_dtype(dtype)
}

/// The tolerance of a pooled value: the dtype's, plus the f32 (or f64)
/// accumulation error of summing `t` values of magnitude <= 2.
fn pool_tolerance(dtype: DType, t: usize) -> (f64, f64) {
    let (rtol, atol) = common::tolerance(dtype);
    let unit = if dtype == DType::F64 {
        f64::EPSILON
    } else {
        f32::EPSILON as f64
    };
    (rtol, atol + 2.0 * t as f64 * unit)
}

/// Pools `hidden` and backpropagates `Σ weight ⊙ pooled`; returns (pooled, dhidden).
/// `hidden` is presented to the op through `layout`, the mask through `mask_layout`,
/// and the pooled gradient reaches the backward op transposed when `strided_grad`.
fn pool_with_grad(
    hidden: &Tensor,
    mask: &Tensor,
    weight: &Tensor,
    layout: Strided,
    mask_layout: Strided,
    strided_grad: bool,
) -> Result<(Tensor, Tensor)> {
    let var = Var::from_tensor(hidden)?;
    let pooled = masked_mean_pool(
        &strided_view(var.as_tensor(), layout)?,
        &strided_view(mask, mask_layout)?,
    )?;
    let loss = if strided_grad {
        // The gradient of a transpose is a transposed (non-contiguous) tensor.
        pooled.t()?.mul(&weight.t()?.contiguous()?)?.sum_all()?
    } else {
        pooled.mul(weight)?.sum_all()?
    };
    let grads = loss.backward()?;
    let grad = grads
        .get(var.as_tensor())
        .expect("gradient of hidden")
        .clone();
    Ok((pooled, grad))
}

/// Checks the op, forward and backward, against the f64 reference on one input.
#[allow(clippy::too_many_arguments)]
fn check_against_reference(
    seed: u64,
    (b, t, h): (usize, usize, usize),
    dtype: DType,
    layout: Strided,
    mask_dtype: DType,
    mask_layout: Strided,
    strided_grad: bool,
    special: SpecialRows,
) -> Result<()> {
    let mut rng = rng(seed);
    let hidden = random_tensor(&mut rng, &[b, t, h], dtype, &Device::Cpu)?;
    let mask = random_mask(&mut rng, b, t, 0.7, special);
    let weight = random_tensor(&mut rng, &[b, h], dtype, &Device::Cpu)?;
    let what = format!("[{b},{t},{h}] {dtype:?} {layout:?}, mask {mask_dtype:?} {mask_layout:?}");

    let (pooled, grad) = pool_with_grad(
        &hidden,
        &mask_tensor(&mask, b, t, mask_dtype)?,
        &weight,
        layout,
        mask_layout,
        strided_grad,
    )?;
    assert_eq!(pooled.dims(), [b, h], "{what}: pooled shape");
    assert_eq!(pooled.dtype(), dtype, "{what}: pooled dtype");
    assert_eq!(grad.dims(), [b, t, h], "{what}: gradient shape");
    assert_eq!(grad.dtype(), dtype, "{what}: gradient dtype");

    let want = reference::masked_mean_pool(&values(&hidden), &mask, b, t, h);
    let (rtol, atol) = pool_tolerance(dtype, t);
    assert_close_tol(
        &format!("{what} forward"),
        &values(&pooled),
        &want,
        rtol,
        atol,
    );
    let want_grad = reference::masked_mean_pool_backward(&values(&weight), &mask, b, t, h);
    assert_close(
        &format!("{what} backward"),
        &values(&grad),
        &want_grad,
        dtype,
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random shapes (mostly small, H not a multiple of 32), every dtype, layout
    /// of hidden and mask, and mask dtype; sometimes a row with no real token,
    /// sometimes a row of real tokens only.
    #[test]
    fn matches_reference(
        seed in any::<u64>(),
        b in 1usize..=4,
        t in 1usize..=12,
        h in prop_oneof![4 => 1usize..=70, 1 => 70usize..=1024],
        dtype in prop::sample::select(common::FLOAT_DTYPES.to_vec()),
        layout in prop::sample::select(common::STRIDED_KINDS.to_vec()),
        mask_dtype in prop::sample::select(MASK_DTYPES.to_vec()),
        mask_layout in prop::sample::select(common::STRIDED_KINDS.to_vec()),
        strided_grad in any::<bool>(),
        empty_row in prop::option::weighted(0.3, 0usize..4),
        full_row in prop::option::weighted(0.3, 0usize..4),
    ) {
        let empty = empty_row.filter(|&row| row < b);
        let full = full_row.filter(|&row| row < b && Some(row) != empty);
        check_against_reference(
            seed, (b, t, h), dtype, layout, mask_dtype, mask_layout, strided_grad,
            SpecialRows { empty, full },
        ).unwrap();
    }
}

/// Shapes large enough to take the multi-threaded path, with long rows.
#[test]
fn matches_reference_on_large_inputs() -> Result<()> {
    for (seed, shape, dtype) in [
        (1, (8, 128, 384), DType::F32),
        (2, (3, 300, 1000), DType::F32),
        (3, (16, 64, 768), DType::BF16),
        (4, (5, 129, 257), DType::F64),
    ] {
        for layout in [Strided::Contiguous, Strided::Transposed] {
            check_against_reference(
                seed,
                shape,
                dtype,
                layout,
                DType::I64,
                Strided::Contiguous,
                false,
                SpecialRows {
                    empty: Some(1),
                    full: Some(0),
                },
            )?;
        }
    }
    Ok(())
}

#[test]
fn all_padding_row_gives_zeros_and_zero_gradient_never_nan() -> Result<()> {
    for dtype in common::FLOAT_DTYPES {
        let mut rng = rng(7);
        let hidden = random_tensor(&mut rng, &[2, 5, 33], dtype, &Device::Cpu)?;
        let mask = Tensor::new(&[[0u32, 0, 0, 0, 0], [1, 1, 0, 1, 0]], &Device::Cpu)?;
        let weight = random_tensor(&mut rng, &[2, 33], dtype, &Device::Cpu)?;
        let (pooled, grad) = pool_with_grad(
            &hidden,
            &mask,
            &weight,
            Strided::Contiguous,
            Strided::Contiguous,
            false,
        )?;
        let empty = values(&pooled.get(0)?);
        assert!(
            empty.iter().all(|&v| v == 0.0),
            "{dtype:?}: empty row pooled to {empty:?}"
        );
        let empty_grad = values(&grad.get(0)?);
        assert!(
            empty_grad.iter().all(|&v| v == 0.0),
            "{dtype:?}: empty row gradient not zero"
        );
        // The other row is a real mean.
        let h = values(&hidden);
        let want: Vec<f64> = (0..33)
            .map(|j| (h[5 * 33 + j] + h[6 * 33 + j] + h[8 * 33 + j]) / 3.0)
            .collect();
        assert_close(
            &format!("{dtype:?} real row"),
            &values(&pooled.get(1)?),
            &want,
            dtype,
        );
    }
    Ok(())
}

#[test]
fn one_token_is_the_token_itself() -> Result<()> {
    for dtype in common::FLOAT_DTYPES {
        let hidden = random_tensor(&mut rng(8), &[3, 1, 45], dtype, &Device::Cpu)?;
        let mask = Tensor::ones((3, 1), DType::U8, &Device::Cpu)?;
        let pooled = masked_mean_pool(&hidden, &mask)?;
        assert_eq!(values(&pooled), values(&hidden), "{dtype:?}");
    }
    Ok(())
}

/// Any non-zero mask value marks a real token with weight 1, whatever its dtype.
/// Hidden states and masks broadcast (stride 0) along the batch, the tokens or
/// the hidden size give what their contiguous copies give, forward and backward.
#[test]
fn broadcast_inputs_match_their_copies() -> Result<()> {
    let (b, t, h) = (3, 6, 37);
    let cpu = &Device::Cpu;
    let mask = Tensor::new(&[[1u32, 1, 0, 1, 0, 0]], cpu)?.broadcast_as((b, t))?;
    for dtype in [DType::F32, DType::BF16, DType::F64] {
        for source_dims in [[1, t, h], [b, 1, h], [b, t, 1]] {
            let source =
                Var::from_tensor(&random_tensor(&mut rng(3), &source_dims, DType::F32, cpu)?)?;
            common::assert_broadcast_views_match_copies(
                &format!("masked_mean_pool from {source_dims:?}"),
                &[source],
                |v| {
                    Ok(vec![v[0]
                        .as_tensor()
                        .to_dtype(dtype)?
                        .broadcast_as((b, t, h))?])
                },
                |x| masked_mean_pool(&x[0], &mask),
                dtype,
            )?;
        }
    }
    Ok(())
}

#[test]
fn non_zero_mask_values_count_as_one_in_every_mask_dtype() -> Result<()> {
    let (b, t, h) = (2, 4, 19);
    let hidden = random_tensor(&mut rng(9), &[b, t, h], DType::F32, &Device::Cpu)?;
    let binary = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0];
    let want = reference::masked_mean_pool(&values(&hidden), &binary, b, t, h);
    for mask_dtype in MASK_DTYPES {
        let mut scaled = [3.0, 0.0, 1.0, 2.0, 0.0, 7.0, 0.0, 0.0];
        if !matches!(mask_dtype, DType::U8 | DType::U32) {
            scaled[2] = -1.0; // signed and float masks: negative counts too
        }
        if mask_dtype.is_float() {
            scaled[3] = 0.5;
        }
        let mask = mask_tensor(&scaled, b, t, mask_dtype)?;
        let pooled = masked_mean_pool(&hidden, &mask)?;
        assert_close(
            &format!("mask {mask_dtype:?}"),
            &values(&pooled),
            &want,
            DType::F32,
        );
    }
    Ok(())
}

/// Padding tokens are never read: NaN and inf there do not reach the result.
#[test]
fn non_finite_values_under_padding_are_ignored() -> Result<()> {
    let hidden = Tensor::new(
        &[[[1f32, 2.], [f32::NAN, f32::INFINITY], [3., 4.]]],
        &Device::Cpu,
    )?;
    let mask = Tensor::new(&[[1u8, 0, 1]], &Device::Cpu)?;
    assert_eq!(
        masked_mean_pool(&hidden, &mask)?.to_vec2::<f32>()?,
        [[2., 3.]]
    );
    Ok(())
}

/// The op equals the sentence-transformers formula composed from candle ops,
/// forward and backward (f32, 0/1 mask).
#[test]
fn agrees_with_composed_candle_ops() -> Result<()> {
    let (b, t, h) = (4, 17, 100);
    let mut rng = rng(10);
    let hidden = Var::from_tensor(&random_tensor(
        &mut rng,
        &[b, t, h],
        DType::F32,
        &Device::Cpu,
    )?)?;
    let mask = mask_tensor(
        &random_mask(
            &mut rng,
            b,
            t,
            0.6,
            SpecialRows {
                empty: Some(2),
                full: Some(0),
            },
        ),
        b,
        t,
        DType::I64,
    )?;
    let weight = random_tensor(&mut rng, &[b, h], DType::F32, &Device::Cpu)?;

    let fused = masked_mean_pool(hidden.as_tensor(), &mask)?;
    let mask_f = mask.to_dtype(DType::F32)?;
    let sum = hidden.broadcast_mul(&mask_f.unsqueeze(2)?)?.sum(1)?;
    let composed = sum.broadcast_div(&mask_f.sum_keepdim(1)?.clamp(1e-9, f64::MAX)?)?;
    assert_close("forward", &values(&fused), &values(&composed), DType::F32);

    let grad_of = |pooled: &Tensor| -> Result<Tensor> {
        let grads = pooled.mul(&weight)?.sum_all()?.backward()?;
        Ok(grads.get(hidden.as_tensor()).expect("gradient").clone())
    };
    assert_close(
        "backward",
        &values(&grad_of(&fused)?),
        &values(&grad_of(&composed)?),
        DType::F32,
    );
    Ok(())
}

/// Central differences of `L = Σ w ⊙ pool(x)` in f64 against the backward pass.
#[test]
fn gradient_matches_finite_differences() -> Result<()> {
    let (b, t, h) = (3, 5, 7);
    let mut rng = rng(11);
    let x = values(&random_tensor(
        &mut rng,
        &[b, t, h],
        DType::F64,
        &Device::Cpu,
    )?);
    let w = random_tensor(&mut rng, &[b, h], DType::F64, &Device::Cpu)?;
    let mask = mask_tensor(
        &random_mask(
            &mut rng,
            b,
            t,
            0.6,
            SpecialRows {
                empty: Some(1),
                full: None,
            },
        ),
        b,
        t,
        DType::U8,
    )?;
    let loss = |x: &[f64]| -> Result<f64> {
        let hidden = Tensor::from_vec(x.to_vec(), (b, t, h), &Device::Cpu)?;
        masked_mean_pool(&hidden, &mask)?
            .mul(&w)?
            .sum_all()?
            .to_scalar::<f64>()
    };

    let hidden = Var::from_vec(x.clone(), (b, t, h), &Device::Cpu)?;
    let grads = masked_mean_pool(hidden.as_tensor(), &mask)?
        .mul(&w)?
        .sum_all()?
        .backward()?;
    let analytic = values(grads.get(hidden.as_tensor()).expect("gradient"));

    let eps = 1e-6;
    let mut numeric = Vec::with_capacity(x.len());
    for i in 0..x.len() {
        let (mut up, mut down) = (x.clone(), x.clone());
        up[i] += eps;
        down[i] -= eps;
        numeric.push((loss(&up)? - loss(&down)?) / (2.0 * eps));
    }
    assert_close_tol("finite differences", &analytic, &numeric, 1e-6, 1e-8);
    assert!(analytic.iter().any(|&g| g != 0.0), "gradient is all zero");
    Ok(())
}

/// The gradient flows through the op to a Var further upstream.
#[test]
fn backward_reaches_an_upstream_var() -> Result<()> {
    let (b, t, h) = (2, 6, 40);
    let mut rng = rng(12);
    let var = Var::from_tensor(&random_tensor(
        &mut rng,
        &[b, t, h],
        DType::F32,
        &Device::Cpu,
    )?)?;
    let scale = random_tensor(&mut rng, &[b, t, h], DType::F32, &Device::Cpu)?;
    let mask_values = random_mask(&mut rng, b, t, 0.5, SpecialRows::default());
    let mask = mask_tensor(&mask_values, b, t, DType::F32)?;

    let pooled = masked_mean_pool(&var.as_tensor().mul(&scale)?, &mask)?;
    let grads = pooled.sum_all()?.backward()?;
    let got = values(grads.get(var.as_tensor()).expect("gradient of the Var"));

    let ones = vec![1.0; b * h];
    let want: Vec<f64> = reference::masked_mean_pool_backward(&ones, &mask_values, b, t, h)
        .iter()
        .zip(values(&scale))
        .map(|(g, s)| g * s)
        .collect();
    assert_close("upstream Var gradient", &got, &want, DType::F32);
    Ok(())
}

/// The public backward equals the reference on strided inputs, and its own
/// gradient is the forward pooling (the two maps are adjoint).
#[test]
fn backward_fn_matches_reference_and_differentiates_to_the_forward() -> Result<()> {
    let (b, t, h) = (3, 11, 50);
    let mut rng = rng(13);
    let grad = random_tensor(&mut rng, &[b, h], DType::F32, &Device::Cpu)?;
    let mask_values = random_mask(
        &mut rng,
        b,
        t,
        0.6,
        SpecialRows {
            empty: Some(0),
            full: Some(1),
        },
    );
    let mask = mask_tensor(&mask_values, b, t, DType::I64)?;
    let want = reference::masked_mean_pool_backward(&values(&grad), &mask_values, b, t, h);
    for layout in common::STRIDED_KINDS {
        let got = masked_mean_pool_backward(&strided_view(&grad, layout)?, &mask)?;
        assert_close(
            &format!("backward fn, {layout:?}"),
            &values(&got),
            &want,
            DType::F32,
        );
    }

    let grad = Var::from_tensor(&grad)?;
    let probe = random_tensor(&mut rng, &[b, t, h], DType::F32, &Device::Cpu)?;
    let grads = masked_mean_pool_backward(grad.as_tensor(), &mask)?
        .mul(&probe)?
        .sum_all()?
        .backward()?;
    let got = values(
        grads
            .get(grad.as_tensor())
            .expect("gradient of grad_pooled"),
    );
    let want = reference::masked_mean_pool(&values(&probe), &mask_values, b, t, h);
    let (rtol, atol) = pool_tolerance(DType::F32, t);
    assert_close_tol("gradient of the backward", &got, &want, rtol, atol);
    Ok(())
}

/// The message of the `Err` the op returns for these inputs.
fn error_of(hidden: &Tensor, mask: &Tensor) -> String {
    match masked_mean_pool(hidden, mask) {
        Ok(out) => panic!("expected an error, got a tensor of shape {:?}", out.dims()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_inputs_are_errors_naming_the_problem() -> Result<()> {
    let cpu = &Device::Cpu;
    let hidden = Tensor::ones((2, 3, 4), DType::F32, cpu)?;
    let mask = Tensor::ones((2, 3), DType::U8, cpu)?;

    let cases = [
        (
            Tensor::ones((2, 3), DType::F32, cpu)?,
            mask.clone(),
            "hidden must have rank 3",
        ),
        (
            Tensor::ones((1, 2, 3, 4), DType::F32, cpu)?,
            mask.clone(),
            "hidden must have rank 3",
        ),
        (
            hidden.clone(),
            Tensor::ones((2, 3, 1), DType::U8, cpu)?,
            "mask must have rank 2",
        ),
        (
            hidden.clone(),
            Tensor::ones(6, DType::U8, cpu)?,
            "mask must have rank 2",
        ),
        (
            hidden.clone(),
            Tensor::ones((3, 3), DType::U8, cpu)?,
            "mask shape [3, 3] does not match",
        ),
        (
            hidden.clone(),
            Tensor::ones((2, 4), DType::U8, cpu)?,
            "mask shape [2, 4] does not match",
        ),
        (
            hidden.to_dtype(DType::U32)?,
            mask.clone(),
            "unsupported dtype U32 for hidden",
        ),
        (
            hidden.to_dtype(DType::I64)?,
            mask.clone(),
            "unsupported dtype I64 for hidden",
        ),
    ];
    for (hidden, mask, expected) in cases {
        let message = error_of(&hidden, &mask);
        assert!(
            message.contains(expected),
            "expected {expected:?} in {message:?}"
        );
        assert!(
            message.contains("masked_mean_pool"),
            "op not named in {message:?}"
        );
    }

    // A float format the mask cannot take (candle has no comparison for it).
    let packed = Tensor::from_raw_buffer(&[1u8; 6], DType::F8E8M0, &[2, 3], cpu)?;
    let message = error_of(&hidden, &packed);
    assert!(
        message.contains("unsupported dtype F8E8M0 for mask"),
        "{message:?}"
    );
    Ok(())
}

#[test]
fn bad_inputs_to_the_backward_fn_are_errors() -> Result<()> {
    let cpu = &Device::Cpu;
    let grad = Tensor::ones((2, 4), DType::F32, cpu)?;
    let mask = Tensor::ones((2, 3), DType::U8, cpu)?;
    let cases = [
        (
            Tensor::ones((2, 1, 4), DType::F32, cpu)?,
            mask.clone(),
            "grad_pooled must have rank 2",
        ),
        (
            grad.clone(),
            Tensor::ones(2, DType::U8, cpu)?,
            "mask must have rank 2",
        ),
        (
            grad.clone(),
            Tensor::ones((3, 3), DType::U8, cpu)?,
            "does not match grad_pooled's batch",
        ),
        (
            grad.to_dtype(DType::I64)?,
            mask.clone(),
            "unsupported dtype I64 for grad_pooled",
        ),
    ];
    for (grad, mask, expected) in cases {
        let message = match masked_mean_pool_backward(&grad, &mask) {
            Ok(out) => panic!("expected an error, got a tensor of shape {:?}", out.dims()),
            Err(e) => e.to_string(),
        };
        assert!(
            message.contains(expected),
            "expected {expected:?} in {message:?}"
        );
    }
    Ok(())
}
