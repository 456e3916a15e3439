//! The kernels of `kernels/cosine.cu` against the CPU path for `l2_normalize`,
//! `cosine_similarity` and `cosine_similarity_matrix`, forward and backward,
//! every dtype and layout, on the kernel target of the including binary (the
//! host harness in `tests/host_kernels`, a CUDA device in `tests/gpu`).

use crate::common::*;
use candle_core::{DType, Device, Result, Tensor, Var};
use sentence_mtl::ops::reference::cosine as reference;
use sentence_mtl::ops::{cosine_similarity, cosine_similarity_matrix, l2_normalize};

const CPU: Device = Device::Cpu;

/// `[N,M,H]`: one row of one element, odd H (1, 3, 31, 33, 385, 1001), H a
/// multiple of the 16-byte pack, more rows than one block (8), BERT sizes.
const SHAPES: [(usize, usize, usize); 9] = [
    (1, 1, 1),
    (3, 2, 3),
    (11, 9, 385),
    (1, 2, 31),
    (9, 7, 33),
    (17, 5, 64),
    (40, 33, 384),
    (300, 3, 768),
    (70, 40, 1001),
];

type Op = fn(&Tensor, &Tensor) -> Result<Tensor>;

/// What the loss does with the op's output.
#[derive(Clone, Copy, Debug)]
enum Loss {
    /// `Σ w ⊙ out`, random `w`: a contiguous upstream gradient.
    Weighted,
    /// `Σ out`: the upstream gradient is a stride-0 broadcast.
    Sum,
}

/// The op's output and the gradients of both inputs, on `device`.
struct Run {
    out: Vec<f64>,
    da: Vec<f64>,
    db: Vec<f64>,
}

fn run(
    op: Op,
    (a, b): (&Tensor, &Tensor),
    kinds: (Strided, Strided),
    (loss, w): (Loss, &Tensor),
    target: Option<&KernelTarget>,
) -> Result<Run> {
    match target {
        Some(target) => target.run(|device| run_on(op, (a, b), kinds, (loss, w), device)),
        None => run_on(op, (a, b), kinds, (loss, w), &CPU),
    }
}

fn run_on(
    op: Op,
    (a, b): (&Tensor, &Tensor),
    kinds: (Strided, Strided),
    (loss, w): (Loss, &Tensor),
    device: &Device,
) -> Result<Run> {
    let (va, vb) = (
        Var::from_tensor(&a.to_device(device)?)?,
        Var::from_tensor(&b.to_device(device)?)?,
    );
    let a = strided_view(va.as_tensor(), kinds.0)?;
    let b = strided_view(vb.as_tensor(), kinds.1)?;
    poison_device(device)?;
    let out = op(&a, &b)?;
    let loss = match loss {
        Loss::Weighted => (&out * w.to_device(device)?)?.sum_all()?,
        Loss::Sum => out.sum_all()?,
    };
    poison_device(device)?;
    let grads = loss.backward()?;
    let grad = |v: &Var| values(grads.get(v.as_tensor()).expect("gradient reaches the Var"));
    Ok(Run {
        out: values(&out),
        da: grad(&va),
        db: grad(&vb),
    })
}

/// `|got − want| ≤ rtol·(|want| + scale_row)`: gradients through the
/// normalisation are accurate relative to their row's scale (see
/// `reference::gradient_scale`); no absolute floor.
fn assert_grad_close(what: &str, got: &[f64], want: &[f64], scales: &[f64], dtype: DType) {
    let (rtol, _) = tolerance(dtype);
    let h = got.len() / scales.len().max(1);
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        let scale = scales[k / h];
        assert!(g.is_finite(), "{what}: element {k} is {g}, want {w}");
        assert!(
            (g - w).abs() <= rtol * (w.abs() + scale),
            "{what}: element {k} is {g}, want {w} (row scale {scale:.3e})"
        );
    }
}

/// `|got − want| ≤ rtol·(|want| + scale)` with `scale` the largest |want| of
/// each run of `row` elements, or 1 where `row` is 1 (a cosine's own scale).
fn assert_scaled_close(what: &str, got: &[f64], want: &[f64], row: usize, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (r, (g, w)) in got
        .chunks(row.max(1))
        .zip(want.chunks(row.max(1)))
        .enumerate()
    {
        let scale = if row <= 1 {
            1.0
        } else {
            w.iter().fold(0f64, |m, v| m.max(v.abs()))
        };
        for (k, (x, y)) in g.iter().zip(w).enumerate() {
            assert!(
                x.is_finite() && (x - y).abs() <= rtol * (y.abs() + scale),
                "{what}: element {} is {x}, want {y} (scale {scale:.3e}, rtol {rtol:.0e})",
                r * row.max(1) + k
            );
        }
    }
}

fn f64s(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::F64)
}

/// Compares one op on the kernel target with the CPU path: output, then both gradients.
fn compare(
    gpu: &KernelTarget,
    name: &str,
    op: Op,
    (a, b): (&Tensor, &Tensor),
    kinds: (Strided, Strided),
    loss: Loss,
) -> Result<()> {
    let dtype = a.dtype();
    let mut rng = rng(a.dims().iter().product::<usize>() as u64);
    let out_dims = op(a, b)?.dims().to_vec();
    let w = random_tensor(&mut rng, &out_dims, dtype, &CPU)?;
    let want = run(op, (a, b), kinds, (loss, &w), None)?;
    let got = run(op, (a, b), kinds, (loss, &w), Some(gpu))?;
    let what = format!(
        "{name} {dtype:?} a {:?} b {:?} {kinds:?} {loss:?}",
        a.dims(),
        b.dims()
    );

    let (rtol, _) = tolerance(dtype);
    // The matrix form rounds normalised rows to the dtype before the matmul.
    let rtol = if name == "matrix" { 2.0 * rtol } else { rtol };
    // Relative to each output's scale: 1 for a cosine (a dot of unit rows), the
    // row's largest element for a normalised row.
    let row = if name == "l2_normalize" { a.dim(1)? } else { 1 };
    assert_scaled_close(&format!("{what}: forward"), &got.out, &want.out, row, rtol);

    // The gradient arriving at â and b̂ sets each row's scale.
    let w = match loss {
        Loss::Weighted => f64s(&w)?,
        Loss::Sum => Tensor::ones(out_dims.as_slice(), DType::F64, &CPU)?,
    };
    let (a64, b64) = (f64s(a)?, f64s(b)?);
    let (up_a, up_b) = match name {
        // normalize_both stacks â over b̂.
        "l2_normalize" => (
            w.narrow(0, 0, a.dim(0)?)?,
            w.narrow(0, a.dim(0)?, b.dim(0)?)?,
        ),
        "cosine_similarity" => (
            l2_normalize(&b64)?.broadcast_mul(&w.unsqueeze(1)?)?,
            l2_normalize(&a64)?.broadcast_mul(&w.unsqueeze(1)?)?,
        ),
        _ => (
            w.matmul(&l2_normalize(&b64)?)?,
            w.t()?.matmul(&l2_normalize(&a64)?)?,
        ),
    };
    let h = a.dim(1)?;
    let scale_a = reference::gradient_scale(&values(&a64), &values(&up_a), h);
    let scale_b = reference::gradient_scale(&values(&b64), &values(&up_b), h);
    assert_grad_close(&format!("{what}: da"), &got.da, &want.da, &scale_a, dtype);
    assert_grad_close(&format!("{what}: db"), &got.db, &want.db, &scale_b, dtype);
    Ok(())
}

fn normalize_both(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Tensor::cat(&[l2_normalize(a)?, l2_normalize(b)?], 0)
}

#[test]
fn kernels_match_cpu_forward_and_backward() -> Result<()> {
    let Some(gpu) = crate::kernel_target("kernels_match_cpu_forward_and_backward") else {
        return Ok(());
    };
    let ops: [(&str, Op); 3] = [
        ("l2_normalize", normalize_both),
        ("cosine_similarity", cosine_similarity),
        ("matrix", cosine_similarity_matrix),
    ];
    let mut rng = rng(1);
    for dtype in FLOAT_DTYPES {
        for (i, &(n, m, h)) in SHAPES.iter().enumerate() {
            let a = random_tensor(&mut rng, &[n, h], dtype, &CPU)?;
            for (j, kind_a) in STRIDED_KINDS.into_iter().enumerate() {
                let kind_b = STRIDED_KINDS[(i + j) % STRIDED_KINDS.len()];
                let loss = if (i + j) % 3 == 0 {
                    Loss::Sum
                } else {
                    Loss::Weighted
                };
                for (name, op) in ops {
                    let rows_b = if name == "matrix" { m } else { n };
                    let b = random_tensor(&mut rng, &[rows_b, h], dtype, &CPU)?;
                    compare(&gpu, name, op, (&a, &b), (kind_a, kind_b), loss)?;
                }
            }
        }
    }
    Ok(())
}

#[test]
fn kernels_handle_zero_tiny_and_self_rows() -> Result<()> {
    let Some(gpu) = crate::kernel_target("kernels_handle_zero_tiny_and_self_rows") else {
        return Ok(());
    };
    let mut rng = rng(2);
    for dtype in [DType::F32, DType::F64] {
        // Rows with norm 0, below the clamp, and ordinary, over 12 rows (two blocks).
        let base = random_tensor(&mut rng, &[12, 40], DType::F64, &CPU)?;
        let scales: Vec<f64> = (0..12).map(|i| [0.0, 1e-14, 1.0][i % 3]).collect();
        let scales = Tensor::from_vec(scales, (12, 1), &CPU)?;
        let a = base.broadcast_mul(&scales)?.to_dtype(dtype)?;
        let b = random_tensor(&mut rng, &[12, 40], dtype, &CPU)?;
        let kinds = (Strided::Contiguous, Strided::Offset);
        compare(
            &gpu,
            "l2_normalize",
            normalize_both,
            (&a, &b),
            kinds,
            Loss::Weighted,
        )?;
        compare(
            &gpu,
            "cosine_similarity",
            cosine_similarity,
            (&a, &b),
            kinds,
            Loss::Weighted,
        )?;
        compare(
            &gpu,
            "cosine_similarity",
            cosine_similarity,
            (&b, &a),
            kinds,
            Loss::Sum,
        )?;
        compare(
            &gpu,
            "matrix",
            cosine_similarity_matrix,
            (&a, &b),
            kinds,
            Loss::Weighted,
        )?;
        let cos = gpu.run(|dev| cosine_similarity(&a.to_device(dev)?, &b.to_device(dev)?))?;
        assert_eq!(values(&cos)[0], 0.0, "a zero row has similarity 0");
    }
    // A tensor against itself: normalised once, both gradients summed.
    let x = Var::from_tensor(&random_tensor(
        &mut rng,
        &[33, 65],
        DType::F32,
        &gpu.device(),
    )?)?;
    let (s, dx) = gpu.run(|_| -> Result<_> {
        let s = cosine_similarity_matrix(x.as_tensor(), x.as_tensor())?;
        let dx = values(s.sum_all()?.backward()?.get(x.as_tensor()).unwrap());
        Ok((s, dx))
    })?;
    let xv = values(x.as_tensor());
    let want = reference::cosine_similarity_matrix(&xv, &xv, 65);
    assert_scaled_close("self-similarity", &values(&s), &want, 1, 1e-5);
    let ones = vec![1.0; 33 * 33];
    let (d1, d2) = reference::cosine_similarity_matrix_backward(&xv, &xv, &ones, 65);
    let want: Vec<f64> = d1.iter().zip(&d2).map(|(p, q)| p + q).collect();
    // Each element is a difference of terms ~‖Σ x̂‖/‖x‖: compare relative to the
    // largest element rather than to each.
    let largest = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    assert_close_tol(
        "self-similarity dx",
        &dx,
        &want,
        0.0,
        1e-5 * largest.max(1.0),
    );
    Ok(())
}

#[test]
fn kernels_l2_normalize_any_rank() -> Result<()> {
    let Some(gpu) = crate::kernel_target("kernels_l2_normalize_any_rank") else {
        return Ok(());
    };
    let mut rng = rng(3);
    for dims in [vec![77], vec![3, 5, 130], vec![2, 3, 4, 24]] {
        let x = random_tensor(&mut rng, &dims, DType::BF16, &CPU)?;
        let kind = Strided::Transposed;
        let want = l2_normalize(&strided_view(&x, kind)?)?;
        let got = gpu.run(|dev| {
            poison_device(dev)?;
            l2_normalize(&strided_view_on(&x, kind, dev)?)
        })?;
        assert_eq!(got.dims(), &dims[..]);
        assert_scaled_close(
            "rank",
            &values(&got),
            &values(&want),
            dims[dims.len() - 1],
            1e-2,
        );
    }
    Ok(())
}

#[test]
fn kernels_give_the_cpu_errors_for_bad_input() -> Result<()> {
    let Some(target) = crate::kernel_target("kernels_give_the_cpu_errors_for_bad_input") else {
        return Ok(());
    };
    let gpu = target.device();
    let mut rng = rng(4);
    let a = random_tensor(&mut rng, &[4, 8], DType::F32, &gpu)?;
    let a_cpu = a.to_device(&CPU)?;
    let wide = random_tensor(&mut rng, &[4, 9], DType::F32, &gpu)?;
    let tall = random_tensor(&mut rng, &[5, 8], DType::F32, &gpu)?;
    let f16s = a.to_dtype(DType::F16)?;
    let ints = Tensor::zeros((4, 8), DType::U32, &gpu)?;
    let rank3 = a.unsqueeze(0)?;
    let ops: [(&str, Op); 2] = [
        ("cosine_similarity", cosine_similarity),
        ("cosine_similarity_matrix", cosine_similarity_matrix),
    ];
    // The message itself, without the backtrace candle appends under RUST_BACKTRACE.
    let message = |r: Result<Tensor>| {
        r.err()
            .and_then(|e| e.to_string().lines().next().map(str::to_string))
            .unwrap_or_default()
    };
    for (name, op) in ops {
        if !target.is_host() {
            let on_two_devices = message(op(&a, &a_cpu));
            assert!(
                on_two_devices.contains(name)
                    && on_two_devices.contains("Cuda")
                    && on_two_devices.contains("Cpu"),
                "{on_two_devices:?}"
            );
        }
        // The same input on the CPU gives the same message.
        for (x, y) in [(&a, &wide), (&a, &f16s), (&ints, &ints), (&rank3, &a)] {
            let on_gpu = target.run(|_| message(op(x, y)));
            let on_cpu = message(op(&x.to_device(&CPU)?, &y.to_device(&CPU)?));
            assert!(on_gpu.contains(name), "{on_gpu:?}");
            assert_eq!(on_gpu, on_cpu);
        }
    }
    let rows = target.run(|_| message(cosine_similarity(&a, &tall)));
    assert!(rows.contains("same number of rows N"), "{rows:?}");
    Ok(())
}

/// `|got − want| ≤ rtol · max|want|` per row of `h`: no absolute floor, so
/// values of any magnitude are held to their own scale.
fn assert_rows_close(what: &str, got: &[f64], want: &[f64], h: usize, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (r, (g, w)) in got.chunks(h).zip(want.chunks(h)).enumerate() {
        let scale = w.iter().fold(0f64, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{what}: row {r} of the reference is zero");
        for (k, (x, y)) in g.iter().zip(w).enumerate() {
            assert!(
                x.is_finite() && (x - y).abs() <= rtol * scale,
                "{what}: row {r} element {k} is {x:e}, want {y:e} (row scale {scale:e})"
            );
        }
    }
}

/// f32 rows with norms of ~1.5e19: each square sum is finite, but the product
/// of two norms (~2.3e38) exceeds 2^126, past which fast math's division
/// (`__fdividef`) returns 0. The kernels divide by each norm on its own and
/// match the f64 reference, forward and backward.
#[test]
fn kernels_handle_norms_whose_product_exceeds_2_pow_126() -> Result<()> {
    let Some(target) = crate::kernel_target("kernels_handle_norms_whose_product_exceeds_2_pow_126")
    else {
        return Ok(());
    };
    let (n, h) = (20, 48);
    let mut rng = rng(5);
    let unit_rows = |rng: &mut rand::rngs::StdRng| -> Vec<f64> {
        let u = random_values(rng, n * h, 1.0);
        reference::l2_normalize(&u, h)
    };
    let scaled = |u: &[f64], norm: f64| -> Result<Tensor> {
        let v: Vec<f32> = u.iter().map(|x| (x * norm) as f32).collect();
        Tensor::from_vec(v, (n, h), &CPU)
    };
    let (ua, ub) = (unit_rows(&mut rng), unit_rows(&mut rng));
    let (a, b) = (scaled(&ua, 1.5e19)?, scaled(&ub, 1.4e19)?);
    let (a64, b64) = (values(&a), values(&b));
    let g: Vec<f64> = random_values(&mut rng, n, 1.0);
    let (cos, da, db, y, dy) = target.run(|dev| -> Result<_> {
        let (va, vb) = (
            Var::from_tensor(&a.to_device(dev)?)?,
            Var::from_tensor(&b.to_device(dev)?)?,
        );
        let w = Tensor::from_vec(g.iter().map(|&v| v as f32).collect::<Vec<_>>(), n, dev)?;
        let cos = cosine_similarity(va.as_tensor(), vb.as_tensor())?;
        let grads = (&cos * &w)?.sum_all()?.backward()?;
        let y = l2_normalize(va.as_tensor())?;
        let wy = Tensor::from_vec(
            ub.iter().map(|&v| v as f32).collect::<Vec<_>>(),
            (n, h),
            dev,
        )?;
        let dy = (&y * &wy)?.sum_all()?.backward()?;
        Ok((
            values(&cos),
            values(grads.get(va.as_tensor()).expect("da")),
            values(grads.get(vb.as_tensor()).expect("db")),
            values(&y),
            values(dy.get(va.as_tensor()).expect("dy")),
        ))
    })?;
    let want_cos = reference::cosine_similarity(&a64, &b64, h);
    assert_rows_close("cos", &cos, &want_cos, 1, 1e-5);
    let (want_da, want_db) = reference::cosine_similarity_backward(&a64, &b64, &g, h);
    assert_rows_close("da", &da, &want_da, h, 1e-4);
    assert_rows_close("db", &db, &want_db, h, 1e-4);
    assert_rows_close(
        "l2_normalize",
        &y,
        &reference::l2_normalize(&a64, h),
        h,
        1e-5,
    );
    let want_dy = reference::l2_normalize_backward(&a64, &ub, h);
    assert_rows_close("l2_normalize backward", &dy, &want_dy, h, 1e-4);
    Ok(())
}
