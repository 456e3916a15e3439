//! `bias_gelu` on the CPU against the f64 reference (forward, dx, dbias), every
//! dtype, odd sizes, leading dimensions, strided and offset inputs; bit for bit
//! against the composed ops it replaces in f32 (`gelu_erf(add_bias(..))`);
//! gradients against finite differences in f64; bad input.

use crate::common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::{rng, strided_view, values, FLOAT_DTYPES, STRIDED_KINDS};
use rand::rngs::StdRng;
use sentence_mtl::ops::reference::bias_gelu as reference;
use sentence_mtl::ops::{add_bias, bias_gelu, gelu_erf};

/// Values in `[-scale, scale)` as a `dtype` tensor of `dims`.
fn uniform(rng: &mut StdRng, dims: &[usize], scale: f64, dtype: DType) -> Result<Tensor> {
    let n = dims.iter().product();
    Tensor::from_vec(common::random_values(rng, n, scale), dims, &Device::Cpu)?.to_dtype(dtype)
}

/// (y, dx, dbias) of `bias_gelu` on x presented as `kind`, backpropagating
/// `Σ weight ⊙ y`.
fn run(
    x: &Tensor,
    bias: &Tensor,
    weight: &Tensor,
    kind: common::Strided,
) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    let xv = Var::from_tensor(x)?;
    let bv = Var::from_tensor(bias)?;
    let y = bias_gelu(&strided_view(xv.as_tensor(), kind)?, bv.as_tensor())?;
    assert_eq!(y.dims(), x.dims());
    let grads = y.mul(weight)?.sum_all()?.backward()?;
    Ok((
        values(&y),
        values(grads.get(xv.as_tensor()).expect("dx")),
        values(grads.get(bv.as_tensor()).expect("dbias")),
    ))
}

/// Absolute tolerance of an element-wise result: the dtype's, scaled by 4 (the
/// largest |x + bias|); f32 evaluates erf within 7e-7 (`ops::math`), as
/// `gelu_erf` does: a few 1e-6 at |z| = 4.
fn element_atol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 4e-6,
        other => 4.0 * common::tolerance(other).1,
    }
}

/// Every dtype and layout; H in {1, 7, 33, 384}, one row to 300 rows, leading
/// dimensions; `x + bias` over [-4, 4).
#[test]
fn bias_gelu_matches_reference_forward_and_backward() -> Result<()> {
    let shapes: [&[usize]; 7] = [
        &[1, 1],
        &[1, 384],
        &[5, 7],
        &[300, 33],
        &[3, 7, 33],
        &[2, 65, 130],
        &[300, 384],
    ];
    let mut rng = rng(50);
    let mut run_index = 0;
    for dtype in FLOAT_DTYPES {
        for dims in shapes {
            let kind = STRIDED_KINDS[run_index % STRIDED_KINDS.len()];
            run_index += 1;
            let h = *dims.last().unwrap();
            let x = uniform(&mut rng, dims, 3.0, dtype)?;
            let bias = uniform(&mut rng, &[h], 1.0, dtype)?;
            let weight = uniform(&mut rng, dims, 2.0, dtype)?;
            let (y, dx, db) = run(&x, &bias, &weight, kind)?;
            let (xs, bs, ws) = (values(&x), values(&bias), values(&weight));
            let what = format!("{dims:?} {dtype:?} {kind:?}");
            let (rtol, atol) = common::tolerance(dtype);
            let want_y = reference::bias_gelu(&xs, &bs);
            let (want_dx, want_db) = reference::bias_gelu_backward(&xs, &bs, &ws);
            let element = element_atol(dtype);
            common::assert_close_tol(&format!("{what} y"), &y, &want_y, rtol, element);
            common::assert_close_tol(&format!("{what} dx"), &dx, &want_dx, rtol, element);
            for (c, (&got, &want)) in db.iter().zip(&want_db).enumerate() {
                let magnitude: f64 = want_dx.iter().skip(c).step_by(h).map(|v| v.abs()).sum();
                assert!(
                    (got - want).abs() <= rtol * magnitude + atol,
                    "{what} dbias: column {c} is {got}, want {want} (Σ|dx| {magnitude:.3e})"
                );
            }
        }
    }
    Ok(())
}

/// On the CPU in f32 the fused op gives exactly the figures of the composed
/// ops it stands for, forward and backward: the same erf, the same rounding,
/// the bias gradient summed in the same chunks of rows in the same order.
#[test]
fn bias_gelu_is_bitwise_the_composed_ops_in_f32() -> Result<()> {
    let mut rng = rng(51);
    for dims in [&[300usize, 384][..], &[3, 7, 33], &[200, 1536]] {
        let h = *dims.last().unwrap();
        let x = uniform(&mut rng, dims, 3.0, DType::F32)?;
        let bias = uniform(&mut rng, &[h], 1.0, DType::F32)?;
        let weight = uniform(&mut rng, dims, 2.0, DType::F32)?;
        let fused = run(&x, &bias, &weight, common::Strided::Contiguous)?;
        let composed = {
            let xv = Var::from_tensor(&x)?;
            let bv = Var::from_tensor(&bias)?;
            let y = gelu_erf(&add_bias(xv.as_tensor(), bv.as_tensor())?)?;
            let grads = y.mul(&weight)?.sum_all()?.backward()?;
            (
                values(&y),
                values(grads.get(xv.as_tensor()).unwrap()),
                values(grads.get(bv.as_tensor()).unwrap()),
            )
        };
        assert_eq!(fused.0, composed.0, "{dims:?}: forward");
        assert_eq!(fused.1, composed.1, "{dims:?}: dx");
        assert_eq!(fused.2, composed.2, "{dims:?}: dbias");
    }
    Ok(())
}

/// The autograd gradients in f64 against central finite differences of
/// `L = Σ weight ⊙ bias_gelu(x, bias)`.
#[test]
fn bias_gelu_gradients_match_finite_differences() -> Result<()> {
    let mut rng = rng(52);
    let (rows, h) = (4, 5);
    let x = uniform(&mut rng, &[rows, h], 3.0, DType::F64)?;
    let bias = uniform(&mut rng, &[h], 1.0, DType::F64)?;
    let weight = uniform(&mut rng, &[rows, h], 2.0, DType::F64)?;
    let (_, dx, db) = run(&x, &bias, &weight, common::Strided::Contiguous)?;
    let loss = |x: &[f64], b: &[f64]| -> Result<f64> {
        let x = Tensor::from_slice(x, (rows, h), &Device::Cpu)?;
        let b = Tensor::from_slice(b, h, &Device::Cpu)?;
        bias_gelu(&x, &b)?
            .mul(&weight)?
            .sum_all()?
            .to_scalar::<f64>()
    };
    let (xs, bs) = (values(&x), values(&bias));
    let eps = 1e-6;
    let numeric = |input: &[f64], i: usize, of_x: bool| -> Result<f64> {
        let (mut plus, mut minus) = (input.to_vec(), input.to_vec());
        plus[i] += eps;
        minus[i] -= eps;
        let (lp, lm) = if of_x {
            (loss(&plus, &bs)?, loss(&minus, &bs)?)
        } else {
            (loss(&xs, &plus)?, loss(&xs, &minus)?)
        };
        Ok((lp - lm) / (2.0 * eps))
    };
    for (i, &g) in dx.iter().enumerate() {
        let n = numeric(&xs, i, true)?;
        assert!(
            (g - n).abs() <= 1e-7 * (1.0 + n.abs()),
            "dx[{i}] = {g}, finite differences {n}"
        );
    }
    for (i, &g) in db.iter().enumerate() {
        let n = numeric(&bs, i, false)?;
        assert!(
            (g - n).abs() <= 1e-7 * (1.0 + n.abs()),
            "dbias[{i}] = {g}, finite differences {n}"
        );
    }
    Ok(())
}

/// A batch with no rows gives an empty output and a zero bias gradient.
#[test]
fn bias_gelu_of_no_rows_is_empty() -> Result<()> {
    let x = Var::from_tensor(&Tensor::zeros((0, 5), DType::F32, &Device::Cpu)?)?;
    let bias = Var::from_tensor(&Tensor::ones(5, DType::F32, &Device::Cpu)?)?;
    let y = bias_gelu(x.as_tensor(), bias.as_tensor())?;
    assert_eq!(y.dims(), [0, 5]);
    let grads = y.sum_all()?.backward()?;
    assert_eq!(values(grads.get(bias.as_tensor()).unwrap()), [0.0; 5]);
    Ok(())
}

/// Bad input is an `Err` naming the problem, never a panic.
#[test]
fn bias_gelu_rejects_bad_input() -> Result<()> {
    let dev = &Device::Cpu;
    let x = Tensor::ones((3, 4), DType::F32, dev)?;
    let bias = Tensor::ones(4, DType::F32, dev)?;
    let cases = [
        (
            x.clone(),
            Tensor::ones(5, DType::F32, dev)?,
            "bias must have shape [4]",
        ),
        (
            x.clone(),
            Tensor::ones((1, 4), DType::F32, dev)?,
            "bias must have shape [4]",
        ),
        (
            Tensor::new(1f32, dev)?,
            bias.clone(),
            "x must have rank >= 1",
        ),
        (
            x.clone(),
            bias.to_dtype(DType::F64)?,
            "both must have the same dtype",
        ),
        (
            x.to_dtype(DType::U32)?,
            bias.to_dtype(DType::U32)?,
            "unsupported dtype U32",
        ),
    ];
    for (x, bias, expected) in cases {
        let message = bias_gelu(&x, &bias).expect_err(expected).to_string();
        assert!(message.starts_with("bias_gelu: "), "{message}");
        assert!(
            message.contains(expected),
            "expected {expected:?} in {message:?}"
        );
    }
    Ok(())
}
