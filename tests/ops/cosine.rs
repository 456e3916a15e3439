//! CPU tests of `l2_normalize`, `cosine_similarity` and `cosine_similarity_matrix`:
//! forward and backward against the f64 reference over random shapes, dtypes and
//! layouts, finite differences, edge cases, composed candle ops, the MiniLM
//! reference outputs, and bad input.

use crate::common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};
use common::*;
use proptest::prelude::*;
use rand::rngs::StdRng;
use sentence_mtl::ops::reference::cosine as reference;
use sentence_mtl::ops::{cosine_similarity, cosine_similarity_matrix, l2_normalize};

const EPS: f64 = 1e-12;
const CPU: Device = Device::Cpu;

// ---- helpers ---------------------------------------------------------------------

/// A differentiable input: a `Var`, a view of it with the chosen layout, and its values.
struct Input {
    var: Var,
    view: Tensor,
    values: Vec<f64>,
}

fn input(rng: &mut StdRng, dims: &[usize], dtype: DType, kind: Strided) -> Result<Input> {
    let t = random_tensor(rng, dims, dtype, &CPU)?;
    from_tensor(&t, kind)
}

fn from_tensor(t: &Tensor, kind: Strided) -> Result<Input> {
    let var = Var::from_tensor(t)?;
    let view = strided_view(var.as_tensor(), kind)?;
    Ok(Input {
        values: values(t),
        var,
        view,
    })
}

/// `Σ w ⊙ out` for random weights `w` (rounded to `out`'s dtype), and `w`'s values:
/// the upstream gradient the op's backward receives.
fn weighted_sum(rng: &mut StdRng, out: &Tensor) -> Result<(Tensor, Vec<f64>)> {
    let w = random_tensor(rng, out.dims(), out.dtype(), &CPU)?;
    Ok(((out * &w)?.sum_all()?, values(&w)))
}

fn grad(grads: &GradStore, x: &Input) -> Vec<f64> {
    values(
        grads
            .get(x.var.as_tensor())
            .expect("the gradient reaches the Var"),
    )
}

fn norm(row: &[f64]) -> f64 {
    row.iter().map(|v| v * v).sum::<f64>().sqrt()
}

/// Gradients through the normalisation are accurate relative to their row's
/// scale (see `reference::gradient_scale`): checks
/// `|got − want| ≤ atol + rtol·(|want| + scale_row)`, `upstream` being the
/// gradient arriving at `x / max(‖x‖, EPS)`.
fn assert_grad_close(
    what: &str,
    got: &[f64],
    want: &[f64],
    (x, upstream): (&[f64], &[f64]),
    h: usize,
    dtype: DType,
) {
    let (rtol, atol) = tolerance(dtype);
    let scales = reference::gradient_scale(x, upstream, h);
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        let scale = scales[k / h];
        assert!(g.is_finite(), "{what}: element {k} is {g}, want {w}");
        assert!(
            (g - w).abs() <= atol + rtol * (w.abs() + scale),
            "{what}: element {k} is {g}, want {w} (row scale {scale:.3e})"
        );
    }
}

/// `rows[i] · v[i]` for `[n,h]` rows and `[n]` scalars.
fn scale_rows(rows: &[f64], v: &[f64], h: usize) -> Vec<f64> {
    rows.chunks(h)
        .zip(v)
        .flat_map(|(row, s)| row.iter().map(move |x| x * s))
        .collect()
}

/// `g · b̂` for `[n,m]` weights `g` and `[m,h]` rows `b̂`: the upstream gradient of `â`.
fn matmul(g: &[f64], b_hat: &[f64], m: usize, h: usize) -> Vec<f64> {
    g.chunks(m)
        .flat_map(|gi| (0..h).map(move |k| (0..m).map(|j| gi[j] * b_hat[j * h + k]).sum::<f64>()))
        .collect()
}

fn transpose(x: &[f64], n: usize, m: usize) -> Vec<f64> {
    (0..m)
        .flat_map(|j| (0..n).map(move |i| x[i * m + j]))
        .collect()
}

/// Normalised rows are rounded to the dtype before the matmul (as in PyTorch), so
/// each product carries up to two roundings: allow twice the dtype's atol.
fn matrix_tolerance(dtype: DType) -> (f64, f64) {
    let (rtol, atol) = tolerance(dtype);
    (rtol, 2.0 * atol)
}

fn dtypes() -> impl Strategy<Value = DType> {
    prop::sample::select(FLOAT_DTYPES.to_vec())
}

fn kinds() -> impl Strategy<Value = Strided> {
    prop::sample::select(STRIDED_KINDS.to_vec())
}

/// Mostly small hidden sizes (not multiples of 32), a few up to ~1100.
fn hidden() -> impl Strategy<Value = usize> {
    prop_oneof![8 => 1usize..80, 1 => 80usize..1100]
}

// ---- against the f64 reference, random shapes / dtypes / layouts ------------------

fn check_normalize(n: usize, h: usize, dtype: DType, kind: Strided, seed: u64) -> Result<()> {
    let mut rng = rng(seed);
    let x = input(&mut rng, &[n, h], dtype, kind)?;
    let y = l2_normalize(&x.view)?;
    assert_eq!(y.dims(), &[n, h]);
    assert_eq!(y.dtype(), dtype);
    assert_close(
        "l2_normalize",
        &values(&y),
        &reference::l2_normalize(&x.values, h),
        dtype,
    );

    let (loss, w) = weighted_sum(&mut rng, &y)?;
    let dx = grad(&loss.backward()?, &x);
    let want = reference::l2_normalize_backward(&x.values, &w, h);
    assert_grad_close("l2_normalize dx", &dx, &want, (&x.values, &w), h, dtype);
    Ok(())
}

fn check_row_cosine(
    n: usize,
    h: usize,
    dtype: DType,
    kinds: (Strided, Strided),
    seed: u64,
) -> Result<()> {
    let mut rng = rng(seed);
    let a = input(&mut rng, &[n, h], dtype, kinds.0)?;
    let b = input(&mut rng, &[n, h], dtype, kinds.1)?;
    let cos = cosine_similarity(&a.view, &b.view)?;
    assert_eq!(cos.dims(), &[n]);
    let want = reference::cosine_similarity(&a.values, &b.values, h);
    assert_close("cosine_similarity", &values(&cos), &want, dtype);

    let (loss, w) = weighted_sum(&mut rng, &cos)?;
    let grads = loss.backward()?;
    let (da, db) = reference::cosine_similarity_backward(&a.values, &b.values, &w, h);
    // The upstream gradient of â is w·b̂ (and of b̂, w·â).
    let up_a = scale_rows(&reference::l2_normalize(&b.values, h), &w, h);
    let up_b = scale_rows(&reference::l2_normalize(&a.values, h), &w, h);
    assert_grad_close(
        "cosine_similarity da",
        &grad(&grads, &a),
        &da,
        (&a.values, &up_a),
        h,
        dtype,
    );
    assert_grad_close(
        "cosine_similarity db",
        &grad(&grads, &b),
        &db,
        (&b.values, &up_b),
        h,
        dtype,
    );
    Ok(())
}

fn check_matrix_cosine(
    (n, m, h): (usize, usize, usize),
    dtype: DType,
    kinds: (Strided, Strided),
    seed: u64,
) -> Result<()> {
    let mut rng = rng(seed);
    let a = input(&mut rng, &[n, h], dtype, kinds.0)?;
    let b = input(&mut rng, &[m, h], dtype, kinds.1)?;
    let s = cosine_similarity_matrix(&a.view, &b.view)?;
    assert_eq!(s.dims(), &[n, m]);
    let want = reference::cosine_similarity_matrix(&a.values, &b.values, h);
    let (rtol, atol) = matrix_tolerance(dtype);
    assert_close_tol("cosine_similarity_matrix", &values(&s), &want, rtol, atol);

    let (loss, w) = weighted_sum(&mut rng, &s)?;
    let grads = loss.backward()?;
    let (da, db) = reference::cosine_similarity_matrix_backward(&a.values, &b.values, &w, h);
    let up_a = matmul(&w, &reference::l2_normalize(&b.values, h), m, h);
    let up_b = matmul(
        &transpose(&w, n, m),
        &reference::l2_normalize(&a.values, h),
        n,
        h,
    );
    assert_grad_close(
        "matrix da",
        &grad(&grads, &a),
        &da,
        (&a.values, &up_a),
        h,
        dtype,
    );
    assert_grad_close(
        "matrix db",
        &grad(&grads, &b),
        &db,
        (&b.values, &up_b),
        h,
        dtype,
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn l2_normalize_matches_reference(
        n in 1usize..9, h in hidden(), dtype in dtypes(), kind in kinds(), seed in any::<u64>()
    ) {
        check_normalize(n, h, dtype, kind, seed).unwrap();
    }

    #[test]
    fn cosine_similarity_matches_reference(
        n in 1usize..9, h in hidden(), dtype in dtypes(), ka in kinds(), kb in kinds(), seed in any::<u64>()
    ) {
        check_row_cosine(n, h, dtype, (ka, kb), seed).unwrap();
    }

    #[test]
    fn cosine_similarity_matrix_matches_reference(
        n in 1usize..9, m in 1usize..9, h in hidden(), dtype in dtypes(),
        ka in kinds(), kb in kinds(), seed in any::<u64>()
    ) {
        check_matrix_cosine((n, m, h), dtype, (ka, kb), seed).unwrap();
    }
}

#[test]
fn large_inputs_take_the_parallel_path() -> Result<()> {
    // 2·600·300 elements: above the rayon threshold, with padded rows; the
    // normalisation's runs of 32 rows end mid-batch and with a short last run.
    check_normalize(600, 300, DType::F32, Strided::PaddedRows, 1)?;
    check_normalize(1001, 77, DType::F32, Strided::Contiguous, 5)?;
    check_normalize(700, 101, DType::BF16, Strided::Transposed, 6)?;
    check_row_cosine(
        600,
        300,
        DType::F32,
        (Strided::Offset, Strided::Transposed),
        2,
    )?;
    check_row_cosine(
        600,
        300,
        DType::BF16,
        (Strided::Contiguous, Strided::Contiguous),
        3,
    )?;
    check_matrix_cosine(
        (300, 200, 384),
        DType::F32,
        (Strided::Contiguous, Strided::PaddedRows),
        4,
    )
}

/// The same sentence twice gets the same embedding, bit for bit, wherever it
/// sits in the batch (the CPU path sums some rows' squares in a pipelined loop).
#[test]
fn equal_rows_normalise_to_identical_rows() -> Result<()> {
    for h in [13, 77, 389] {
        for _ in 0..20 {
            let row = Tensor::randn(0f32, 1f32, (1, h), &CPU)?;
            let batch = row.repeat((1000, 1))?;
            let rows = l2_normalize(&batch)?.to_vec2::<f32>()?;
            assert!(rows.iter().all(|r| r == &rows[0]), "h = {h}");
            assert_eq!(rows[0], l2_normalize(&row)?.to_vec2::<f32>()?[0]);
        }
    }
    Ok(())
}

/// Inputs broadcast along the hidden size (stride 0 within a row) or along
/// the rows (one row repeated) give what their contiguous copies give, in all
/// three ops, forward and backward; past the parallel threshold too.
#[test]
fn broadcast_inputs_match_their_copies() -> Result<()> {
    for (n, h) in [(5, 37), (3000, 77)] {
        for dtype in [DType::F32, DType::BF16, DType::F64] {
            let mut rng = rng(9);
            let column = Var::from_tensor(&random_tensor(&mut rng, &[n, 1], DType::F32, &CPU)?)?;
            let row = Var::from_tensor(&random_tensor(&mut rng, &[1, h], DType::F32, &CPU)?)?;
            let full = Var::from_tensor(&random_tensor(&mut rng, &[n, h], DType::F32, &CPU)?)?;
            let sources = [column, row, full];
            let views = |v: &[Var]| -> Result<Vec<Tensor>> {
                v.iter()
                    .map(|v| v.as_tensor().to_dtype(dtype)?.broadcast_as((n, h)))
                    .collect()
            };
            let what = format!("[{n},{h}]");
            assert_broadcast_views_match_copies(
                &format!("l2_normalize {what}, columns broadcast"),
                &sources[..1],
                views,
                |t| l2_normalize(&t[0]),
                dtype,
            )?;
            assert_broadcast_views_match_copies(
                &format!("l2_normalize {what}, rows broadcast"),
                &sources[1..2],
                views,
                |t| l2_normalize(&t[0]),
                dtype,
            )?;
            for (pair, label) in [([0, 1], "both broadcast"), ([1, 2], "a broadcast")] {
                let two = [sources[pair[0]].clone(), sources[pair[1]].clone()];
                assert_broadcast_views_match_copies(
                    &format!("cosine_similarity {what}, {label}"),
                    &two,
                    views,
                    |t| cosine_similarity(&t[0], &t[1]),
                    dtype,
                )?;
                if n <= 100 {
                    assert_broadcast_views_match_copies(
                        &format!("cosine_similarity_matrix {what}, {label}"),
                        &two,
                        views,
                        |t| cosine_similarity_matrix(&t[0], &t[1]),
                        dtype,
                    )?;
                }
            }
        }
    }
    Ok(())
}

#[test]
fn one_row_of_one_element() -> Result<()> {
    for dtype in FLOAT_DTYPES {
        check_normalize(1, 1, dtype, Strided::Contiguous, 5)?;
        check_row_cosine(1, 1, dtype, (Strided::Contiguous, Strided::Offset), 6)?;
        check_matrix_cosine(
            (1, 1, 1),
            dtype,
            (Strided::Transposed, Strided::Contiguous),
            7,
        )?;
    }
    Ok(())
}

#[test]
fn l2_normalize_takes_any_rank() -> Result<()> {
    let mut rng = rng(8);
    for dims in [vec![37], vec![3, 4, 19], vec![2, 3, 2, 33]] {
        for kind in STRIDED_KINDS {
            let x = input(&mut rng, &dims, DType::F32, kind)?;
            let y = l2_normalize(&x.view)?;
            assert_eq!(y.dims(), &dims[..]);
            let h = *dims.last().unwrap();
            let what = format!("l2_normalize {dims:?} {kind:?}");
            assert_close(
                &what,
                &values(&y),
                &reference::l2_normalize(&x.values, h),
                DType::F32,
            );
            let (loss, w) = weighted_sum(&mut rng, &y)?;
            let want = reference::l2_normalize_backward(&x.values, &w, h);
            let dx = grad(&loss.backward()?, &x);
            assert_grad_close(&what, &dx, &want, (&x.values, &w), h, DType::F32);
        }
    }
    Ok(())
}

// ---- the epsilon rule --------------------------------------------------------------

/// Rows scaled so their norms are zero, below the clamp, and ordinary.
fn rows_around_the_clamp(dtype: DType) -> Result<Tensor> {
    let mut rng = rng(9);
    let base = random_tensor(&mut rng, &[4, 13], DType::F64, &CPU)?;
    let scales = Tensor::new(&[[0.0], [1e-14], [1.0], [3.0]], &CPU)?;
    base.broadcast_mul(&scales)?.to_dtype(dtype)
}

#[test]
fn zero_and_tiny_rows_follow_the_clamp() -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        let x = from_tensor(&rows_around_the_clamp(dtype)?, Strided::Contiguous)?;
        let y = l2_normalize(&x.view)?;
        let yv = values(&y);
        assert!(yv[..13].iter().all(|&v| v == 0.0), "a zero row stays zero");
        assert_close(
            "l2_normalize",
            &yv,
            &reference::l2_normalize(&x.values, 13),
            dtype,
        );
        // Below the clamp, y = x / EPS: tiny, not a unit vector.
        assert!(
            norm(&yv[13..26]) < 0.1,
            "a row below the clamp is divided by EPS"
        );

        // cos with a zero or tiny row: 0 and x·y/(EPS·‖y‖), never NaN.
        let other = from_tensor(&rows_around_the_clamp(dtype)?.flip(&[0])?, Strided::Offset)?;
        let cos = cosine_similarity(&x.view, &other.view)?;
        let cv = values(&cos);
        assert_eq!(cv[0], 0.0);
        assert_close(
            "cos",
            &cv,
            &reference::cosine_similarity(&x.values, &other.values, 13),
            dtype,
        );
        let s = values(&cosine_similarity_matrix(&x.view, &x.view)?);
        assert!(
            s[..4].iter().all(|&v| v == 0.0),
            "the zero row has similarity 0"
        );
    }
    Ok(())
}

#[test]
fn backward_is_linear_below_the_clamp() -> Result<()> {
    let x = from_tensor(&rows_around_the_clamp(DType::F64)?, Strided::Contiguous)?;
    let mut rng = rng(10);
    let (loss, w) = weighted_sum(&mut rng, &l2_normalize(&x.view)?)?;
    let dx = grad(&loss.backward()?, &x);
    // Zero and tiny rows: dx = w / EPS.
    let linear: Vec<f64> = w[..26].iter().map(|g| g / EPS).collect();
    assert_close("dx below the clamp", &dx[..26], &linear, DType::F64);
    let want = reference::l2_normalize_backward(&x.values, &w, 13);
    assert_close("dx", &dx, &want, DType::F64);

    let b = from_tensor(
        &rows_around_the_clamp(DType::F64)?.flip(&[0])?,
        Strided::Contiguous,
    )?;
    let cos = cosine_similarity(&x.view, &b.view)?;
    let (loss, w) = weighted_sum(&mut rng, &cos)?;
    let grads = loss.backward()?;
    let (da, db) = reference::cosine_similarity_backward(&x.values, &b.values, &w, 13);
    assert_close("da", &grad(&grads, &x), &da, DType::F64);
    assert_close("db", &grad(&grads, &b), &db, DType::F64);
    Ok(())
}

#[test]
fn empty_hidden_size_gives_zero_similarity() -> Result<()> {
    let a = Tensor::zeros((3, 0), DType::F32, &CPU)?;
    assert_eq!(l2_normalize(&a)?.dims(), &[3, 0]);
    assert_eq!(cosine_similarity(&a, &a)?.to_vec1::<f32>()?, vec![0.0; 3]);
    assert_eq!(cosine_similarity_matrix(&a, &a)?.dims(), &[3, 3]);
    Ok(())
}

// ---- gradients: finite differences, a Var upstream ------------------------------------

/// A function of two inputs, differentiated w.r.t. both.
type BinaryFn<'a> = &'a dyn Fn(&Tensor, &Tensor) -> Result<Tensor>;

/// Central differences of `Σ w ⊙ f(a, b)` w.r.t. every element of `a` and `b`, in f64.
fn finite_differences(
    f: BinaryFn,
    a: &[f64],
    b: &[f64],
    (dims_a, dims_b): (&[usize], &[usize]),
    w: &Tensor,
    step: f64,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let loss = |a: &[f64], b: &[f64]| -> Result<f64> {
        let (a, b) = (
            Tensor::from_slice(a, dims_a, &CPU)?,
            Tensor::from_slice(b, dims_b, &CPU)?,
        );
        (f(&a, &b)? * w)?.sum_all()?.to_scalar::<f64>()
    };
    let partial = |x: &[f64], which: usize| -> Result<Vec<f64>> {
        (0..x.len())
            .map(|k| {
                let (mut up, mut down) = (x.to_vec(), x.to_vec());
                up[k] += step;
                down[k] -= step;
                let (lu, ld) = if which == 0 {
                    (loss(&up, b)?, loss(&down, b)?)
                } else {
                    (loss(a, &up)?, loss(a, &down)?)
                };
                Ok((lu - ld) / (2.0 * step))
            })
            .collect()
    };
    Ok((partial(a, 0)?, partial(b, 1)?))
}

fn check_finite_differences(
    f: BinaryFn,
    (n, m, h): (usize, usize, usize),
    scale: f64,
    step: f64,
) -> Result<()> {
    let mut rng = rng(11);
    let a = (random_tensor(&mut rng, &[n, h], DType::F64, &CPU)? * scale)?;
    let b = (random_tensor(&mut rng, &[m, h], DType::F64, &CPU)? * scale)?;
    let (a, b) = (
        from_tensor(&a, Strided::Contiguous)?,
        from_tensor(&b, Strided::Contiguous)?,
    );
    let out = f(&a.view, &b.view)?;
    let w = random_tensor(&mut rng, out.dims(), DType::F64, &CPU)?;
    let grads = (out * &w)?.sum_all()?.backward()?;
    let (fa, fb) = finite_differences(f, &a.values, &b.values, (&[n, h], &[m, h]), &w, step)?;
    assert_close_tol(
        "da vs finite differences",
        &grad(&grads, &a),
        &fa,
        1e-6,
        1e-7,
    );
    assert_close_tol(
        "db vs finite differences",
        &grad(&grads, &b),
        &fb,
        1e-6,
        1e-7,
    );
    Ok(())
}

#[test]
fn gradients_match_finite_differences() -> Result<()> {
    let normalize_sum = |a: &Tensor, b: &Tensor| l2_normalize(a)? + l2_normalize(b)?;
    let ops: [(&str, BinaryFn, usize); 3] = [
        ("l2_normalize", &normalize_sum, 3),
        ("cosine_similarity", &cosine_similarity, 3),
        ("cosine_similarity_matrix", &cosine_similarity_matrix, 4),
    ];
    for (name, f, m) in ops {
        eprintln!("{name}");
        check_finite_differences(f, (3, m, 7), 1.0, 1e-6)?;
        // Below the clamp the map is linear, so differences are exact up to rounding.
        check_finite_differences(f, (3, m, 7), 1e-14, 1e-17)?;
    }
    Ok(())
}

#[test]
fn backward_reaches_a_var_upstream() -> Result<()> {
    let mut rng = rng(12);
    let x = input(&mut rng, &[5, 21], DType::F32, Strided::Contiguous)?;
    let c = random_tensor(&mut rng, &[5, 21], DType::F32, &CPU)?;
    // a = 3x and b = x ⊙ c: the ops' gradients must flow through both to x.
    let (a, b) = ((x.var.as_tensor() * 3.0)?, x.var.as_tensor().mul(&c)?);
    let (av, bv) = (values(&a), values(&b));
    let cos = cosine_similarity(&a, &b)?;
    let (loss, w) = weighted_sum(&mut rng, &cos)?;
    let dx = grad(&loss.backward()?, &x);
    let (da, db) = reference::cosine_similarity_backward(&av, &bv, &w, 21);
    let cv = values(&c);
    let want: Vec<f64> = (0..da.len()).map(|k| 3.0 * da[k] + cv[k] * db[k]).collect();
    assert_close("dx", &dx, &want, DType::F32);

    // Self-similarity: a is normalised once and its gradient is the sum of both uses.
    let s = cosine_similarity_matrix(&a, &a)?;
    let (loss, w) = weighted_sum(&mut rng, &s)?;
    let dx = grad(&loss.backward()?, &x);
    let (d1, d2) = reference::cosine_similarity_matrix_backward(&av, &av, &w, 21);
    let want: Vec<f64> = d1.iter().zip(&d2).map(|(p, q)| 3.0 * (p + q)).collect();
    assert_close("dx self-similarity", &dx, &want, DType::F32);
    Ok(())
}

// ---- the same computations composed from candle ops ------------------------------------

#[test]
fn agrees_with_composed_candle_ops() -> Result<()> {
    let mut rng = rng(13);
    let a = input(&mut rng, &[9, 45], DType::F32, Strided::Contiguous)?;
    let b = input(&mut rng, &[9, 45], DType::F32, Strided::PaddedRows)?;
    let w = random_tensor(&mut rng, &[9], DType::F32, &CPU)?;
    let clamped_norm = |t: &Tensor| t.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(EPS);
    let composed = |a: &Tensor, b: &Tensor| -> Result<Tensor> {
        let dot = (a * b)?.sum_keepdim(1)?;
        (dot / (clamped_norm(a)? * clamped_norm(b)?)?)?.squeeze(1)
    };
    let fused_out = cosine_similarity(&a.view, &b.view)?;
    let composed_out = composed(&a.view, &b.view)?;
    assert_close(
        "forward",
        &values(&fused_out),
        &values(&composed_out),
        DType::F32,
    );
    let fused = (fused_out * &w)?.sum_all()?.backward()?;
    let composed = (composed_out * &w)?.sum_all()?.backward()?;
    for (x, what) in [(&a, "da"), (&b, "db")] {
        assert_close(what, &grad(&fused, x), &grad(&composed, x), DType::F32);
    }

    let bm = input(&mut rng, &[6, 45], DType::F32, Strided::Transposed)?;
    let w = random_tensor(&mut rng, &[9, 6], DType::F32, &CPU)?;
    let normalize = |t: &Tensor| t.broadcast_div(&clamped_norm(t)?);
    let fused_out = cosine_similarity_matrix(&a.view, &bm.view)?;
    let composed_out = normalize(&a.view)?.matmul(&normalize(&bm.view)?.t()?)?;
    assert_close(
        "matrix",
        &values(&fused_out),
        &values(&composed_out),
        DType::F32,
    );
    let fused = (fused_out * &w)?.sum_all()?.backward()?;
    let composed = (composed_out * &w)?.sum_all()?.backward()?;
    for (x, what) in [(&a, "matrix da"), (&bm, "matrix db")] {
        assert_close(what, &grad(&fused, x), &grad(&composed, x), DType::F32);
    }
    Ok(())
}

// ---- sentence-transformers' outputs for all-MiniLM-L6-v2 ---------------------------------

fn reference_matrix(json: &serde_json::Value, field: &str) -> Tensor {
    let rows: Vec<Vec<f32>> = serde_json::from_value(json[field].clone()).expect(field);
    let (n, h) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (n, h), &CPU).expect(field)
}

#[test]
fn matches_sentence_transformers_on_minilm() -> Result<()> {
    let path = shared_dir().join("reference/minilm_reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {} ({e}); set SENTENCE_MTL_SHARED to the shared/ folder",
            path.display()
        )
    });
    let json: serde_json::Value = serde_json::from_str(&text).expect("reference JSON");
    let e = reference_matrix(&json, "embeddings_normalized");
    let want = reference_matrix(&json, "cosine_similarity");
    let s = cosine_similarity_matrix(&e, &e)?;
    assert_close_tol("util.cos_sim", &values(&s), &values(&want), 0.0, 1e-6);
    let pairwise = cosine_similarity(&e, &e.flip(&[0])?)?;
    let diagonal: Vec<f64> = (0..50).map(|i| values(&want)[i * 50 + 49 - i]).collect();
    assert_close_tol("pairwise_cos_sim", &values(&pairwise), &diagonal, 0.0, 1e-6);
    // Normalize (the last sentence-transformers module) of the mean-pooled rows.
    let mean = reference_matrix(&json, "embeddings_mean_unnormalized");
    assert_close_tol(
        "Normalize",
        &values(&l2_normalize(&mean)?),
        &values(&e),
        0.0,
        1e-6,
    );
    Ok(())
}

// ---- bad input ----------------------------------------------------------------------------

fn assert_err(result: Result<Tensor>, needles: &[&str]) {
    let message = match result {
        Ok(t) => panic!(
            "expected an error mentioning {needles:?}, got a tensor {:?}",
            t.dims()
        ),
        Err(e) => e.to_string(),
    };
    for needle in needles {
        assert!(
            message.contains(needle),
            "error {message:?} does not mention {needle:?}"
        );
    }
}

#[test]
fn bad_input_gives_an_error_naming_the_problem() -> Result<()> {
    let mut rng = rng(14);
    let a = random_tensor(&mut rng, &[4, 8], DType::F32, &CPU)?;
    let rank1 = random_tensor(&mut rng, &[8], DType::F32, &CPU)?;
    let rank3 = random_tensor(&mut rng, &[2, 4, 8], DType::F32, &CPU)?;
    let wide = random_tensor(&mut rng, &[4, 9], DType::F32, &CPU)?;
    let tall = random_tensor(&mut rng, &[5, 8], DType::F32, &CPU)?;
    let f64s = a.to_dtype(DType::F64)?;
    let ints = Tensor::zeros((4, 8), DType::U32, &CPU)?;
    let longs = Tensor::zeros((4, 8), DType::I64, &CPU)?;

    type Op = fn(&Tensor, &Tensor) -> Result<Tensor>;
    let both: [(&str, Op); 2] = [
        ("cosine_similarity", cosine_similarity),
        ("cosine_similarity_matrix", cosine_similarity_matrix),
    ];
    for (name, op) in both {
        assert_err(op(&rank1, &a), &[name, "a must have rank 2", "[8]"]);
        assert_err(op(&a, &rank3), &[name, "b must have rank 2", "[2, 4, 8]"]);
        assert_err(
            op(&a, &wide),
            &[name, "same hidden size H", "[4, 8]", "[4, 9]"],
        );
        assert_err(op(&a, &f64s), &[name, "F32", "F64", "same dtype"]);
        assert_err(op(&ints, &ints), &[name, "unsupported dtype U32", "a"]);
        assert_err(op(&longs, &longs), &[name, "unsupported dtype I64"]);
    }
    assert_err(
        cosine_similarity(&a, &tall),
        &["cosine_similarity", "same number of rows N", "[5, 8]"],
    );
    // The matrix form takes any number of rows on either side.
    assert_eq!(cosine_similarity_matrix(&a, &tall)?.dims(), &[4, 5]);

    assert_err(
        l2_normalize(&Tensor::new(1f32, &CPU)?),
        &["l2_normalize", "rank >= 1"],
    );
    assert_err(
        l2_normalize(&ints),
        &["l2_normalize", "unsupported dtype U32", "x"],
    );
    Ok(())
}
