//! `layer_norm_residual` on the CPU: against LayerNorm of the sum composed
//! from candle ops in f64 (forward and the gradients of x, the residual, the
//! weight and the bias), every dtype, strided inputs, odd sizes; bit for bit the
//! same as `layer_norm(x + residual)`; and bad input. (`layer_norm` itself is
//! held to the composed form in `encoder_ops.rs`; the kernels in
//! `tests/kernels/layer_norm.rs`.)

use crate::common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::{random_tensor, rng, strided_view, values, FLOAT_DTYPES, STRIDED_KINDS};
use sentence_mtl::ops::layer_norm::layer_norm_composed;
use sentence_mtl::ops::{layer_norm, layer_norm_residual};

const SHAPES: [&[usize]; 5] = [&[1, 1], &[1, 37], &[5, 1], &[3, 7, 37], &[67, 384]];
const EPS: f64 = 1e-12;

/// Close to the f64 reference relative to the result's largest value, with
/// f16/bf16 allowed twice their tolerance (the sum is rounded, then the
/// output), and sums over rows (the weight and bias gradients) `rows` times
/// the absolute part.
fn check(what: &str, got: &Tensor, want: &Tensor, dtype: DType, terms: usize) {
    let (got, want) = (values(got), values(want));
    let (r, a) = common::tolerance(dtype);
    let largest = want.iter().fold(1f64, |m, w| m.max(w.abs()));
    let a = a * terms as f64 * largest;
    match dtype {
        DType::F16 | DType::BF16 => common::assert_close_tol(what, &got, &want, 2.0 * r, 2.0 * a),
        _ => common::assert_close_tol(what, &got, &want, r, a),
    }
}

#[test]
fn layer_norm_residual_matches_the_composed_reference() -> Result<()> {
    let dev = Device::Cpu;
    let mut r = rng(31);
    for (s, dims) in SHAPES.iter().enumerate() {
        let h = *dims.last().unwrap();
        let rows = dims.iter().product::<usize>() / h;
        // Shifted inputs: the statistics must not lose them to cancellation.
        let x = random_tensor(&mut r, dims, DType::F64, &dev)?.affine(2.0, s as f64 + 1.0)?;
        let res = random_tensor(&mut r, dims, DType::F64, &dev)?.affine(1.5, -2.0)?;
        let w = random_tensor(&mut r, &[h], DType::F64, &dev)?;
        let b = random_tensor(&mut r, &[h], DType::F64, &dev)?;
        let g = random_tensor(&mut r, dims, DType::F64, &dev)?;
        for dtype in FLOAT_DTYPES {
            for (k, kind) in STRIDED_KINDS.into_iter().enumerate() {
                let what = format!("{dims:?} {dtype:?} {kind:?}");
                let ours = [&x, &res, &w, &b]
                    .map(|t| t.to_dtype(dtype).and_then(|t| Var::from_tensor(&t)));
                let [vx, vr, vw, vb] = ours;
                let (vx, vr, vw, vb) = (vx?, vr?, vw?, vb?);
                // The reference sees exactly the values the op sees.
                let refs = [&vx, &vr, &vw, &vb].map(|v| {
                    v.as_tensor()
                        .to_dtype(DType::F64)
                        .and_then(|t| Var::from_tensor(&t))
                });
                let [rx, rr, rw, rb] = refs;
                let (rx, rr, rw, rb) = (rx?, rr?, rw?, rb?);
                let y = layer_norm_residual(
                    &strided_view(vx.as_tensor(), kind)?,
                    &strided_view(vr.as_tensor(), STRIDED_KINDS[(k + 1) % 4])?,
                    vw.as_tensor(),
                    vb.as_tensor(),
                    EPS,
                )?;
                // The sum as the op rounds it (in `dtype`), then LayerNorm in f64.
                let sum = (vx.as_tensor() + vr.as_tensor())?.to_dtype(DType::F64)?;
                let y_sum = layer_norm_composed(&sum, rw.as_tensor(), rb.as_tensor(), EPS)?;
                check(&format!("{what} forward"), &y, &y_sum, dtype, 1);
                // Gradients against the composed form over the f64 sum of the inputs.
                let y_ref = layer_norm_composed(
                    &(rx.as_tensor() + rr.as_tensor())?,
                    rw.as_tensor(),
                    rb.as_tensor(),
                    EPS,
                )?;
                let gd = g.to_dtype(dtype)?.to_dtype(DType::F64)?;
                let grads = (y.to_dtype(DType::F64)? * &gd)?.sum_all()?.backward()?;
                let grads_ref = (y_ref * &gd)?.sum_all()?.backward()?;
                for (name, v, rv, terms) in [
                    ("dx", &vx, &rx, 1),
                    ("dresidual", &vr, &rr, 1),
                    ("dweight", &vw, &rw, rows),
                    ("dbias", &vb, &rb, rows),
                ] {
                    let got = grads.get(v).expect("gradient");
                    let want = grads_ref.get(rv).expect("reference gradient");
                    check(&format!("{what} {name}"), got, want, dtype, terms);
                }
                let (dx, dr) = (grads.get(&vx).unwrap(), grads.get(&vr).unwrap());
                assert_eq!(values(dx), values(dr), "{what}: dx and dresidual differ");
            }
        }
    }
    Ok(())
}

/// On the CPU the op is `layer_norm(x + residual)`: the same bits, forward and
/// backward (what keeps the encoder's CPU figures unchanged).
#[test]
fn layer_norm_residual_on_the_cpu_is_layer_norm_of_the_sum() -> Result<()> {
    let dev = Device::Cpu;
    let mut r = rng(32);
    for dtype in FLOAT_DTYPES {
        let dims = [4, 9, 384];
        let make = |r: &mut _, d: &[usize]| -> Result<Var> {
            Var::from_tensor(&random_tensor(r, d, DType::F64, &dev)?.to_dtype(dtype)?)
        };
        let (x, res, w, b) = (
            make(&mut r, &dims)?,
            make(&mut r, &dims)?,
            make(&mut r, &[384])?,
            make(&mut r, &[384])?,
        );
        let g = random_tensor(&mut r, &dims, dtype, &dev)?;
        let fused = layer_norm_residual(&x, &res, &w, &b, EPS)?;
        let plain = layer_norm(&(x.as_tensor() + res.as_tensor())?, &w, &b, EPS)?;
        assert_eq!(values(&fused), values(&plain), "{dtype:?} forward");
        let grads_fused = (fused * &g)?.sum_all()?.backward()?;
        let grads_plain = (plain * &g)?.sum_all()?.backward()?;
        for v in [&x, &res, &w, &b] {
            assert_eq!(
                values(grads_fused.get(v).unwrap()),
                values(grads_plain.get(v).unwrap()),
                "{dtype:?} gradients"
            );
        }
    }
    Ok(())
}

#[test]
fn layer_norm_residual_rejects_bad_input() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::ones((2, 5), DType::F32, &dev)?;
    let h5 = Tensor::ones(5, DType::F32, &dev)?;
    let h4 = Tensor::ones(4, DType::F32, &dev)?;
    let scalar = Tensor::new(1f32, &dev)?;
    let expect_err = |r: Result<Tensor>, needle: &str| {
        let e = r.expect_err("bad input accepted").to_string();
        assert!(
            e.contains(needle),
            "error {e:?} does not mention {needle:?}"
        );
        assert!(
            e.contains("layer_norm_residual"),
            "error {e:?} does not name the op"
        );
    };
    let x_t = Tensor::ones((5, 2), DType::F32, &dev)?;
    expect_err(
        layer_norm_residual(&x, &x_t, &h5, &h5, EPS),
        "residual shape [5, 2] does not match x's [2, 5]",
    );
    expect_err(
        layer_norm_residual(
            &x,
            &Tensor::ones((2, 1, 5), DType::F32, &dev)?,
            &h5,
            &h5,
            EPS,
        ),
        "residual shape [2, 1, 5] does not match",
    );
    expect_err(
        layer_norm_residual(&x, &x.to_dtype(DType::F64)?, &h5, &h5, EPS),
        "same dtype",
    );
    expect_err(
        layer_norm_residual(&x, &x, &h4, &h5, EPS),
        "weight must have shape [5]",
    );
    expect_err(
        layer_norm_residual(&x, &x, &Tensor::ones((1, 5), DType::F32, &dev)?, &h5, EPS),
        "weight must have shape [5]",
    );
    expect_err(
        layer_norm_residual(&x, &x, &h5, &h4, EPS),
        "bias must have shape [5]",
    );
    expect_err(
        layer_norm_residual(&x, &x, &h5, &h5, 0.0),
        "eps must be positive",
    );
    expect_err(
        layer_norm_residual(&scalar, &scalar, &h5, &h5, EPS),
        "rank >= 1",
    );
    let ints = x.to_dtype(DType::U32)?;
    let h5i = h5.to_dtype(DType::U32)?;
    expect_err(
        layer_norm_residual(&ints, &ints, &h5i, &h5i, EPS),
        "unsupported dtype",
    );
    Ok(())
}
