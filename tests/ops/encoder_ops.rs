//! The encoder's training ops with a fused CPU backward (`layer_norm`,
//! `linear`, `add_bias`, `sum_rows`, `softmax_last_dim`, `gelu_erf`) against the same
//! computation composed from candle ops in f64 (exact formulas, each op with
//! its own recorded backward): forward values and the gradients of every
//! input, every dtype, contiguous and strided inputs, odd sizes; and bad input.

use crate::common;

use candle_core::{DType, Device, Result, Tensor, Var, D};
use common::{random_tensor, rng, strided_view, values, FLOAT_DTYPES, STRIDED_KINDS};
use sentence_mtl::ops::{add_bias, gelu_erf, layer_norm, linear, softmax_last_dim, sum_rows};

const SHAPES: [&[usize]; 6] = [
    &[1, 1],
    &[1, 37],
    &[5, 1],
    &[3, 7, 37],
    &[2, 65, 130],
    &[300, 384],
];

/// f16/bf16 results are rounded once at the end from f32 arithmetic; their
/// gradients pass through a second rounded op, so allow twice the tolerance.
/// A result that sums `terms` values of order one (a bias gradient sums the
/// rows) may cancel to much less than its terms: its absolute tolerance grows
/// with the number of terms; and every absolute tolerance is relative to the
/// largest value of the result (an element that cancels to near zero carries
/// the rounding error of its larger terms).
fn check(what: &str, got: &Tensor, want: &[f64], dtype: DType, terms: usize) {
    let got = values(got);
    let (r, a) = common::tolerance(dtype);
    let largest = want.iter().fold(1f64, |m, w| m.max(w.abs()));
    let a = a * terms as f64 * largest;
    match dtype {
        DType::F16 | DType::BF16 => common::assert_close_tol(what, &got, want, 2.0 * r, 2.0 * a),
        _ => common::assert_close_tol(what, &got, want, r, a),
    }
}

/// Inputs as Vars of `dtype`, plus their f64 values as Vars for the reference.
fn vars(inputs: &[Tensor], dtype: DType) -> Result<(Vec<Var>, Vec<Var>)> {
    let ours = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(dtype)?))
        .collect::<Result<Vec<_>>>()?;
    let reference = ours
        .iter()
        .map(|v| Var::from_tensor(&v.as_tensor().to_dtype(DType::F64)?))
        .collect::<Result<Vec<_>>>()?;
    Ok((ours, reference))
}

/// Runs `op` and `reference` on the same inputs (the first one presented
/// through `kind` of strided view), and compares the outputs and the gradients
/// of `Σ y·w` for a random `w` with respect to every input. `row_sums` lists the
/// results that are sums over the rows of the first input (0: the output,
/// i + 1: the gradient of input i).
fn compare(
    name: &str,
    inputs: &[Tensor],
    row_sums: &[usize],
    dtype: DType,
    kind: common::Strided,
    op: impl Fn(&[Tensor]) -> Result<Tensor>,
    reference: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<()> {
    let (ours, refs) = vars(inputs, dtype)?;
    let mut ours_in: Vec<Tensor> = ours.iter().map(|v| v.as_tensor().clone()).collect();
    ours_in[0] = strided_view(&ours_in[0], kind)?;
    let refs_in: Vec<Tensor> = refs.iter().map(|v| v.as_tensor().clone()).collect();
    let y = op(&ours_in)?;
    let y_ref = reference(&refs_in)?;
    assert_eq!(y.dims(), y_ref.dims(), "{name}: shape");
    assert_eq!(y.dtype(), dtype, "{name}: dtype");
    let what = format!("{name} {dtype:?} {kind:?} {:?}", inputs[0].dims());
    let rows = inputs[0].elem_count() / inputs[0].dim(D::Minus1)?.max(1);
    let terms = |result: usize| if row_sums.contains(&result) { rows } else { 1 };
    check(
        &format!("{what} forward"),
        &y,
        &values(&y_ref),
        dtype,
        terms(0),
    );

    // Representable in `dtype`, so that both sides see the same incoming gradient.
    let w = random_tensor(&mut rng(9), y.dims(), dtype, &Device::Cpu)?.to_dtype(DType::F64)?;
    let grads = (y.to_dtype(DType::F64)? * &w)?.sum_all()?.backward()?;
    let grads_ref = (y_ref * &w)?.sum_all()?.backward()?;
    for (i, (v, r)) in ours.iter().zip(&refs).enumerate() {
        let g = grads
            .get(v)
            .unwrap_or_else(|| panic!("{what}: no gradient for input {i}"));
        let g_ref = grads_ref.get(r).expect("reference gradient");
        check(
            &format!("{what} d/d input {i}"),
            g,
            &values(g_ref),
            dtype,
            terms(i + 1),
        );
    }
    Ok(())
}

fn layer_norm_reference(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(w)?
        .broadcast_add(b)
}

fn softmax_reference(x: &Tensor) -> Result<Tensor> {
    let exp = x.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

#[test]
fn layer_norm_matches_the_composed_reference() -> Result<()> {
    let mut r = rng(1);
    for (s, dims) in SHAPES.iter().enumerate() {
        let h = *dims.last().unwrap();
        let x = random_tensor(&mut r, dims, DType::F64, &Device::Cpu)?;
        // A shifted, scaled input: the statistics must not lose it to cancellation.
        let x = x.affine(3.0, s as f64 - 2.0)?;
        let w = random_tensor(&mut r, &[h], DType::F64, &Device::Cpu)?;
        let b = random_tensor(&mut r, &[h], DType::F64, &Device::Cpu)?;
        for dtype in FLOAT_DTYPES {
            for kind in STRIDED_KINDS {
                compare(
                    "layer_norm",
                    &[x.clone(), w.clone(), b.clone()],
                    &[2, 3],
                    dtype,
                    kind,
                    |t| layer_norm(&t[0], &t[1], &t[2], 1e-12),
                    |t| layer_norm_reference(&t[0], &t[1], &t[2], 1e-12),
                )?;
            }
        }
    }
    Ok(())
}

#[test]
fn add_bias_and_sum_rows_match_the_composed_reference() -> Result<()> {
    let mut r = rng(2);
    for dims in SHAPES {
        let h = *dims.last().unwrap();
        let x = random_tensor(&mut r, dims, DType::F64, &Device::Cpu)?;
        let b = random_tensor(&mut r, &[h], DType::F64, &Device::Cpu)?;
        for dtype in FLOAT_DTYPES {
            for kind in STRIDED_KINDS {
                compare(
                    "add_bias",
                    &[x.clone(), b.clone()],
                    &[2],
                    dtype,
                    kind,
                    |t| add_bias(&t[0], &t[1]),
                    |t| t[0].broadcast_add(&t[1]),
                )?;
                let rows = x.elem_count() / h;
                compare(
                    "sum_rows",
                    std::slice::from_ref(&x),
                    &[0],
                    dtype,
                    kind,
                    |t| sum_rows(&t[0]),
                    |t| t[0].reshape((rows, h))?.sum(0),
                )?;
            }
        }
    }
    Ok(())
}

#[test]
fn linear_matches_the_composed_reference() -> Result<()> {
    let mut r = rng(5);
    for dims in SHAPES {
        let in_size = *dims.last().unwrap();
        for out_size in [1, 5, 130] {
            let x = random_tensor(&mut r, dims, DType::F64, &Device::Cpu)?;
            let w = random_tensor(&mut r, &[out_size, in_size], DType::F64, &Device::Cpu)?;
            let b = random_tensor(&mut r, &[out_size], DType::F64, &Device::Cpu)?;
            for dtype in FLOAT_DTYPES {
                for kind in STRIDED_KINDS {
                    compare(
                        "linear",
                        &[x.clone(), w.clone(), b.clone()],
                        // Each output sums `in` products; dW and db sum over the rows.
                        &[0, 2, 3],
                        dtype,
                        kind,
                        |t| linear(&t[0], &t[1], &t[2]),
                        |t| t[0].broadcast_matmul(&t[1].t()?)?.broadcast_add(&t[2]),
                    )?;
                }
            }
        }
    }
    Ok(())
}

#[test]
fn linear_skips_gradients_nobody_wants() -> Result<()> {
    // A frozen weight (a plain tensor) gets no gradient; the input's is still right.
    let dev = Device::Cpu;
    let mut r = rng(6);
    let x = Var::from_tensor(&random_tensor(&mut r, &[4, 6], DType::F32, &dev)?)?;
    let w = random_tensor(&mut r, &[3, 6], DType::F32, &dev)?;
    let b = random_tensor(&mut r, &[3], DType::F32, &dev)?;
    let grads = linear(x.as_tensor(), &w, &b)?.sum_all()?.backward()?;
    assert!(grads.get(&w).is_none() && grads.get(&b).is_none());
    let dx = values(grads.get(&x).expect("dx"));
    let want = values(&w.sum_keepdim(0)?.broadcast_as((4, 6))?.contiguous()?);
    common::assert_close("linear dx", &dx, &want, DType::F32);
    Ok(())
}

#[test]
fn softmax_matches_the_composed_reference() -> Result<()> {
    let mut r = rng(3);
    for dims in SHAPES {
        let x = (random_tensor(&mut r, dims, DType::F64, &Device::Cpu)? * 4.0)?;
        for dtype in FLOAT_DTYPES {
            for kind in STRIDED_KINDS {
                compare(
                    "softmax_last_dim",
                    std::slice::from_ref(&x),
                    &[],
                    dtype,
                    kind,
                    |t| softmax_last_dim(&t[0]),
                    |t| softmax_reference(&t[0]),
                )?;
            }
        }
    }
    Ok(())
}

#[test]
fn softmax_gives_masked_positions_exactly_zero() -> Result<()> {
    // BERT's padding bias: -10000 added to a score. Its probability must be 0,
    // not a subnormal that slows every later product down.
    let x = Tensor::new(&[[0.5f32, -10_000.0, 1.0, -10_000.5]], &Device::Cpu)?;
    let y = softmax_last_dim(&x)?.to_vec2::<f32>()?;
    assert_eq!((y[0][1], y[0][3]), (0.0, 0.0));
    assert!((y[0][0] + y[0][2] - 1.0).abs() < 1e-6);
    Ok(())
}

#[test]
fn gelu_matches_the_composed_reference() -> Result<()> {
    let mut r = rng(4);
    for dims in SHAPES {
        // Spread over [-8, 8): both tails, where erf saturates.
        let x = (random_tensor(&mut r, dims, DType::F64, &Device::Cpu)? * 4.0)?;
        for dtype in FLOAT_DTYPES {
            for kind in STRIDED_KINDS {
                compare(
                    "gelu_erf",
                    std::slice::from_ref(&x),
                    &[],
                    dtype,
                    kind,
                    |t| gelu_erf(&t[0]),
                    |t| t[0].gelu_erf(),
                )?;
            }
        }
    }
    Ok(())
}

#[test]
fn bad_input_is_an_error() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::ones((2, 5), DType::F32, &dev)?;
    let h5 = Tensor::ones(5, DType::F32, &dev)?;
    let h4 = Tensor::ones(4, DType::F32, &dev)?;
    let scalar = Tensor::new(1f32, &dev)?;
    let ints = Tensor::ones((2, 5), DType::U32, &dev)?;
    let expect_err = |r: Result<Tensor>, needle: &str| {
        let e = r.expect_err("bad input accepted").to_string();
        assert!(
            e.contains(needle),
            "error {e:?} does not mention {needle:?}"
        );
    };
    expect_err(layer_norm(&x, &h4, &h5, 1e-5), "weight must have shape [5]");
    expect_err(layer_norm(&x, &h5, &h4, 1e-5), "bias must have shape [5]");
    expect_err(
        layer_norm(&x, &h5, &h5.to_dtype(DType::F64)?, 1e-5),
        "same dtype",
    );
    expect_err(layer_norm(&x, &h5, &h5, 0.0), "eps must be positive");
    expect_err(layer_norm(&scalar, &h5, &h5, 1e-5), "rank >= 1");
    expect_err(
        layer_norm(
            &ints,
            &h5.to_dtype(DType::U32)?,
            &h5.to_dtype(DType::U32)?,
            1e-5,
        ),
        "unsupported dtype",
    );
    let w = Tensor::ones((3, 5), DType::F32, &dev)?;
    let h3 = Tensor::ones(3, DType::F32, &dev)?;
    expect_err(linear(&x, &w.t()?, &h3), "has 5 features");
    expect_err(linear(&x, &h5, &h3), "weight must have rank 2");
    expect_err(linear(&x, &w, &h5), "bias must have shape [3]");
    expect_err(linear(&scalar, &w, &h3), "rank >= 1");
    expect_err(linear(&x.to_dtype(DType::F64)?, &w, &h3), "same dtype");
    expect_err(add_bias(&x, &h4), "bias must have shape [5]");
    expect_err(add_bias(&ints, &h5), "same dtype");
    expect_err(add_bias(&scalar, &h5), "rank >= 1");
    expect_err(sum_rows(&scalar), "rank >= 1");
    expect_err(softmax_last_dim(&ints), "unsupported dtype");
    expect_err(softmax_last_dim(&scalar), "rank >= 1");
    expect_err(gelu_erf(&ints), "unsupported dtype");
    Ok(())
}
