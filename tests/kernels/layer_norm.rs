//! The kernels of `kernels/layer_norm.cu` against the CPU path of `layer_norm`
//! and `layer_norm_residual`: forward and the gradients of x, the residual,
//! the weight and the bias, every dtype, H from 1 to past the warp-per-row
//! forms, one row to more rows than the backward has blocks (so blocks loop
//! and the finalize launch reduces many partials), strided and offset inputs,
//! values with a non-zero mean. They run on the kernel target of the including
//! binary (the host harness in `tests/host_kernels`, a CUDA device in `tests/gpu`).

use crate::common::*;
use candle_core::{DType, Device, Result, Tensor, Var};
use sentence_mtl::ops::{layer_norm, layer_norm_residual};

const CPU: Device = Device::Cpu;
const EPS: f64 = 1e-12;

/// One input set, made on the CPU in f64 and rounded once to `dtype`.
struct Case {
    x: Tensor,
    residual: Option<Tensor>,
    weight: Tensor,
    bias: Tensor,
    /// The weights of the loss `Σ g·y`: the incoming gradient.
    g: Tensor,
    layout: Strided,
}

/// Uniform values in [-2, 2) plus `shift`: a mean far from zero.
fn shifted(seed: u64, dims: &[usize], shift: f64, dtype: DType) -> Result<Tensor> {
    let n = dims.iter().product();
    let v: Vec<f64> = random_values(&mut rng(seed), n, 2.0)
        .into_iter()
        .map(|v| v + shift)
        .collect();
    Tensor::from_vec(v, dims, &CPU)?.to_dtype(dtype)
}

impl Case {
    fn new(
        seed: u64,
        dims: &[usize],
        dtype: DType,
        residual: bool,
        layout: Strided,
    ) -> Result<Self> {
        let h = *dims.last().unwrap();
        Ok(Self {
            x: shifted(seed, dims, 3.0, dtype)?,
            residual: residual
                .then(|| shifted(seed + 1, dims, -1.5, dtype))
                .transpose()?,
            weight: shifted(seed + 2, &[h], 1.0, dtype)?,
            bias: shifted(seed + 3, &[h], 0.5, dtype)?,
            g: shifted(seed + 4, dims, 0.25, dtype)?,
            layout,
        })
    }

    /// `[y, dx, dresidual, dweight, dbias]` (dresidual empty without one), on
    /// the CPU path (`None`) or on `target`'s kernels.
    fn run(&self, target: Option<&KernelTarget>) -> Result<[Vec<f64>; 5]> {
        match target {
            Some(target) => target.run(|device| self.run_on(device)),
            None => self.run_on(&CPU),
        }
    }

    fn run_on(&self, device: &Device) -> Result<[Vec<f64>; 5]> {
        poison_device(device)?;
        let var = |t: &Tensor| Var::from_tensor(&t.to_device(device)?);
        let (x, w, b) = (var(&self.x)?, var(&self.weight)?, var(&self.bias)?);
        let r = self.residual.as_ref().map(var).transpose()?;
        let y = self.forward(&x, r.as_ref(), &w, &b)?;
        let g = self.g.to_device(device)?.to_dtype(DType::F64)?;
        let grads = (y.to_dtype(DType::F64)? * g)?.sum_all()?.backward()?;
        let grad = |v: &Var| values(grads.get(v).expect("gradient"));
        Ok([
            values(&y),
            grad(&x),
            r.as_ref().map(grad).unwrap_or_default(),
            grad(&w),
            grad(&b),
        ])
    }

    fn forward(&self, x: &Var, r: Option<&Var>, w: &Var, b: &Var) -> Result<Tensor> {
        let xs = strided_view(x.as_tensor(), self.layout)?;
        match r {
            Some(r) => layer_norm_residual(&xs, r.as_tensor(), w.as_tensor(), b.as_tensor(), EPS),
            None => layer_norm(&xs, w.as_tensor(), b.as_tensor(), EPS),
        }
    }
}

/// Close element-wise, relative to each result's largest value: an element
/// that cancels to near zero (a centred value, a column sum) carries the
/// rounding of its larger terms. f16/bf16 round once from f32 on both paths
/// but may round the other way: one unit of the dtype.
fn assert_close_scaled(what: &str, got: &[f64], want: &[f64], dtype: DType) {
    let (rtol, _) = tolerance(dtype);
    let largest = want.iter().fold(0f64, |m, w| m.max(w.abs()));
    assert_close_tol(what, got, want, rtol, rtol * largest);
}

const NAMES: [&str; 5] = ["y", "dx", "dresidual", "dweight", "dbias"];

fn check(target: &KernelTarget, case: &Case, what: &str) -> Result<()> {
    let dtype = case.x.dtype();
    let cpu = case.run(None)?;
    let kernel = case.run(Some(target))?;
    for ((name, got), want) in NAMES.iter().zip(&kernel).zip(&cpu) {
        assert_close_scaled(&format!("{what}: {name}"), got, want, dtype);
    }
    if case.residual.is_some() {
        assert_eq!(kernel[1], kernel[2], "{what}: dx and dresidual differ");
    }
    Ok(())
}

/// Every dtype, H in {1, 7, 33, 384} (warp forms of 1, 4 and 12 values per
/// lane; H = 1 and odd H), rows in {1, 5, 67}, with and without the residual,
/// x in each of the strided layouts in turn.
#[test]
fn layer_norm_kernels_match_cpu() -> Result<()> {
    let Some(target) = crate::kernel_target("layer_norm_kernels_match_cpu") else {
        return Ok(());
    };
    let mut seed = 100;
    for dtype in FLOAT_DTYPES {
        for h in [1, 7, 33, 384] {
            for rows in [1, 5, 67] {
                for residual in [false, true] {
                    seed += 10;
                    let layout = STRIDED_KINDS[(seed / 10) as usize % STRIDED_KINDS.len()];
                    let dims: &[usize] = if rows == 67 { &[67, h] } else { &[rows, 1, h] };
                    let case = Case::new(seed, dims, dtype, residual, layout)?;
                    let what = format!("{dims:?} {dtype:?} residual {residual} {layout:?}");
                    check(&target, &case, &what)?;
                }
            }
        }
    }
    Ok(())
}

/// The other warp forms (H up to 1024) and the block-per-row form (H > 1024):
/// f32 and bf16, with and without the residual.
#[test]
fn layer_norm_kernels_match_cpu_for_wide_rows() -> Result<()> {
    let Some(target) = crate::kernel_target("layer_norm_kernels_match_cpu_for_wide_rows") else {
        return Ok(());
    };
    let mut seed = 2000;
    for dtype in [DType::F32, DType::BF16, DType::F64] {
        for h in [200, 511, 768, 1000, 1025, 2100] {
            for residual in [false, true] {
                seed += 10;
                let case = Case::new(seed, &[9, h], dtype, residual, Strided::Contiguous)?;
                let what = format!("[9, {h}] {dtype:?} residual {residual}");
                check(&target, &case, &what)?;
            }
        }
    }
    Ok(())
}

/// More rows than the backward has blocks (2048 of 16 rows for the warp
/// forms, 2048 of one row for the block form), and many rows per block below
/// that cap: blocks loop over several rows and the finalize launch sums up
/// to 2048 partial rows.
#[test]
fn layer_norm_kernels_match_cpu_on_a_large_grid() -> Result<()> {
    let Some(target) = crate::kernel_target("layer_norm_kernels_match_cpu_on_a_large_grid") else {
        return Ok(());
    };
    for (seed, dims, dtype, residual) in [
        (3000, [9000, 33], DType::F32, true),
        (3010, [40000, 7], DType::BF16, false),
        (3020, [33000, 1], DType::F64, true),
        (3030, [2100, 1030], DType::F32, true),
    ] {
        let case = Case::new(seed, &dims, dtype, residual, Strided::Offset)?;
        let what = format!("{dims:?} {dtype:?} residual {residual}");
        check(&target, &case, &what)?;
    }
    Ok(())
}

/// The weight and bias gradients come from a fixed reduction order: two runs
/// give the same bits.
#[test]
fn layer_norm_kernel_gradients_are_deterministic() -> Result<()> {
    let Some(target) = crate::kernel_target("layer_norm_kernel_gradients_are_deterministic") else {
        return Ok(());
    };
    let case = Case::new(4000, &[3000, 40], DType::F32, true, Strided::Contiguous)?;
    let first = case.run(Some(&target))?;
    let second = case.run(Some(&target))?;
    assert_eq!(first, second);
    Ok(())
}

/// A graph built on the CPU path and differentiated on the harness (the
/// backward then computes the statistics itself, with a statistics-only
/// forward launch), and one built on the harness and differentiated on the
/// CPU path (the residual op's CPU backward): both give the CPU's gradients.
#[test]
fn layer_norm_backward_without_the_kernel_forward() -> Result<()> {
    let Some(target) = crate::kernel_target("layer_norm_backward_without_the_kernel_forward")
    else {
        return Ok(());
    };
    if !target.is_host() {
        return Ok(()); // one device per graph on a GPU: nothing to mix
    }
    for dtype in [DType::F32, DType::BF16] {
        for (h, residual) in [(7, false), (384, true), (1030, true)] {
            let case = Case::new(
                5000 + h as u64,
                &[21, h],
                dtype,
                residual,
                Strided::Contiguous,
            )?;
            let want = case.run(None)?;
            for forward_on_kernels in [false, true] {
                let (x, w, b) = (
                    Var::from_tensor(&case.x)?,
                    Var::from_tensor(&case.weight)?,
                    Var::from_tensor(&case.bias)?,
                );
                let r = case.residual.as_ref().map(Var::from_tensor).transpose()?;
                // Inside the harness the residual op is the kernel op; outside,
                // `layer_norm_residual` adds first: build that op on the harness.
                let y = if forward_on_kernels {
                    target.run(|_| case.forward(&x, r.as_ref(), &w, &b))?
                } else {
                    case.forward(&x, r.as_ref(), &w, &b)?
                };
                let loss = (y.to_dtype(DType::F64)? * case.g.to_dtype(DType::F64)?)?.sum_all()?;
                let grads = if forward_on_kernels {
                    loss.backward()?
                } else {
                    target.run(|_| loss.backward())?
                };
                let grad = |v: &Var| values(grads.get(v).expect("gradient"));
                let got = [
                    values(&y),
                    grad(&x),
                    r.as_ref().map(grad).unwrap_or_default(),
                    grad(&w),
                    grad(&b),
                ];
                let what = format!("[21, {h}] {dtype:?} residual {residual}, forward on kernels {forward_on_kernels}");
                for ((name, got), want) in NAMES.iter().zip(&got).zip(&want) {
                    assert_close_scaled(&format!("{what}: {name}"), got, want, dtype);
                }
            }
        }
    }
    Ok(())
}

/// Bad input on the kernel path gives clear errors.
#[test]
fn layer_norm_kernels_reject_bad_inputs() -> Result<()> {
    let Some(target) = crate::kernel_target("layer_norm_kernels_reject_bad_inputs") else {
        return Ok(());
    };
    let dev = target.device();
    let x = Tensor::ones((2, 5), DType::F32, &dev)?;
    let x64 = x.to_dtype(DType::F64)?;
    let x_t = Tensor::ones((5, 2), DType::F32, &dev)?;
    let h5 = Tensor::ones(5, DType::F32, &dev)?;
    let h4 = Tensor::ones(4, DType::F32, &dev)?;
    type Call<'a> = Box<dyn Fn() -> Result<Tensor> + 'a>;
    let cases: [(Call, &str); 4] = [
        (
            Box::new(|| layer_norm_residual(&x, &x_t, &h5, &h5, EPS)),
            "residual shape [5, 2] does not match",
        ),
        (
            Box::new(|| layer_norm_residual(&x, &x64, &h5, &h5, EPS)),
            "same dtype",
        ),
        (
            Box::new(|| layer_norm_residual(&x, &x, &h4, &h5, EPS)),
            "weight must have shape [5]",
        ),
        (
            Box::new(|| layer_norm(&x, &h5, &h4, EPS)),
            "bias must have shape [5]",
        ),
    ];
    for (call, expected) in cases {
        let message = target
            .run(|_| call())
            .expect_err("bad input accepted")
            .to_string();
        assert!(
            message.contains(expected),
            "expected {expected:?} in {message:?}"
        );
    }
    Ok(())
}
