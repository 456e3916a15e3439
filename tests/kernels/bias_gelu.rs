//! Kernel tests of `bias_gelu`: the kernels of `kernels/bias_gelu.cu`, forward
//! and backward (dx and the bias gradient through per-block partials and the
//! finalize launch), against the f64 reference on the values the op saw, with
//! poisoned allocations so that an element the kernels fail to write shows. They
//! run on the kernel target of the binary that includes them: the host harness
//! (`tests/host_kernels`, every `cargo test`) or a CUDA device (`tests/gpu`).

use crate::common;

use crate::common::{rng, values, KernelTarget};
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::rngs::StdRng;
use sentence_mtl::ops::bias_gelu;
use sentence_mtl::ops::reference::bias_gelu as reference;

/// How x reaches the op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Input {
    /// Contiguous from the buffer's start.
    Contiguous,
    /// Transposed twice over (strided): the op copies it.
    Transposed,
    /// Contiguous from one element into its buffer: the vector kernels are ruled out.
    Misaligned,
}

/// `n` values in `[-scale, scale)` as a `dtype` tensor of `dims` on the CPU.
fn uniform(rng: &mut StdRng, dims: &[usize], scale: f64, dtype: DType) -> Result<Tensor> {
    let n = dims.iter().product();
    Tensor::from_vec(common::random_values(rng, n, scale), dims, &Device::Cpu)?.to_dtype(dtype)
}

/// One input set, made on the CPU: x `[rows, H]` in [-3, 3), bias in [-1, 1)
/// (so `x + bias` spreads over [-4, 4)), and the output weights (the incoming
/// gradient) in [-2, 2).
struct Case {
    x: Tensor,
    bias: Tensor,
    weight: Tensor,
    input: Input,
}

impl Case {
    fn new(rng: &mut StdRng, rows: usize, h: usize, dtype: DType, input: Input) -> Result<Self> {
        Ok(Self {
            x: uniform(rng, &[rows, h], 3.0, dtype)?,
            bias: uniform(rng, &[h], 1.0, dtype)?,
            weight: uniform(rng, &[rows, h], 2.0, dtype)?,
            input,
        })
    }

    /// x as the op sees it, on `device`.
    fn present(&self, x: &Tensor, device: &Device) -> Result<Tensor> {
        let (rows, h) = self.x.dims2()?;
        match self.input {
            Input::Contiguous => Ok(x.clone()),
            Input::Transposed => x.t()?.contiguous()?.t(),
            Input::Misaligned => {
                let pad = Tensor::ones(1, x.dtype(), device)?;
                Tensor::cat(&[&pad, &x.flatten_all()?], 0)?
                    .narrow(0, 1, rows * h)?
                    .reshape((rows, h))
            }
        }
    }

    /// Runs the op on `target` (its kernels) and backpropagates `Σ weight ⊙ y`:
    /// (y, dx, dbias) as f64 values.
    fn run(&self, target: &KernelTarget) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
        target.run(|device| {
            common::poison_device(device)?;
            let x = Var::from_tensor(&self.x.to_device(device)?)?;
            let bias = Var::from_tensor(&self.bias.to_device(device)?)?;
            let weight = self.weight.to_device(device)?;
            let y = bias_gelu(&self.present(x.as_tensor(), device)?, bias.as_tensor())?;
            let grads = y.mul(&weight)?.sum_all()?.backward()?;
            let dx = grads.get(x.as_tensor()).expect("gradient of x");
            let dbias = grads.get(bias.as_tensor()).expect("gradient of bias");
            Ok((values(&y), values(dx), values(dbias)))
        })
    }
}

/// The kernels' results against the f64 reference on the same (rounded) inputs.
/// Element-wise results: the dtype's relative tolerance plus its absolute one
/// scaled by 4 (the largest |x + bias|, the scale of an erf error). The bias
/// gradient sums `rows` rounded terms: held to the relative tolerance of the
/// sum of their magnitudes.
fn check(target: &KernelTarget, case: &Case, what: &str) -> Result<()> {
    let dtype = case.x.dtype();
    let (x, bias, dy) = (values(&case.x), values(&case.bias), values(&case.weight));
    let want_y = reference::bias_gelu(&x, &bias);
    let (want_dx, want_db) = reference::bias_gelu_backward(&x, &bias, &dy);
    let (y, dx, db) = case.run(target)?;
    let (rtol, atol) = common::tolerance(dtype);
    common::assert_close_tol(&format!("{what} forward"), &y, &want_y, rtol, 4.0 * atol);
    common::assert_close_tol(&format!("{what} dx"), &dx, &want_dx, rtol, 4.0 * atol);
    let h = bias.len();
    assert_eq!(db.len(), h, "{what}: dbias length");
    for (c, (&got, &want)) in db.iter().zip(&want_db).enumerate() {
        let magnitude: f64 = want_dx.iter().skip(c).step_by(h).map(|v| v.abs()).sum();
        assert!(
            got.is_finite() && (got - want).abs() <= rtol * magnitude + atol,
            "{what} dbias: column {c} is {got}, want {want} (Σ|dx| {magnitude:.3e})"
        );
    }
    Ok(())
}

/// Every dtype, H in {1, 7, 33, 384} (vector and plain kernels, H not a
/// multiple of 32, one column), rows in {1, 5, 300} (one block, ten blocks of
/// partials), contiguous, strided and misaligned x.
#[test]
fn kernels_match_reference_forward_and_backward() -> Result<()> {
    let Some(target) = crate::kernel_target("kernels_match_reference_forward_and_backward") else {
        return Ok(());
    };
    let inputs = [Input::Contiguous, Input::Transposed, Input::Misaligned];
    let mut rng = rng(40);
    let mut run = 0usize;
    for dtype in common::FLOAT_DTYPES {
        for h in [1, 7, 33, 384] {
            for rows in [1, 5, 300] {
                let input = inputs[run % inputs.len()];
                run += 1;
                let case = Case::new(&mut rng, rows, h, dtype, input)?;
                check(&target, &case, &format!("[{rows},{h}] {dtype:?} {input:?}"))?;
            }
        }
    }
    Ok(())
}

/// The bias gradient comes out bit for bit the same on every run (partials
/// summed in a fixed order, no atomics), with many row blocks.
#[test]
fn kernels_bias_gradient_is_deterministic() -> Result<()> {
    let Some(target) = crate::kernel_target("kernels_bias_gradient_is_deterministic") else {
        return Ok(());
    };
    for dtype in [DType::F32, DType::BF16] {
        let case = Case::new(&mut rng(41), 700, 40, dtype, Input::Contiguous)?;
        let (_, _, first) = case.run(&target)?;
        for _ in 0..2 {
            let (_, _, again) = case.run(&target)?;
            assert_eq!(
                first.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                again.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{dtype:?}: dbias differs between runs"
            );
        }
        check(&target, &case, &format!("[700,40] {dtype:?}"))?;
    }
    Ok(())
}

/// Leading dimensions are flattened: `[2, 3, H]` gives the rows of `[6, H]`.
#[test]
fn kernels_flatten_leading_dimensions() -> Result<()> {
    let Some(target) = crate::kernel_target("kernels_flatten_leading_dimensions") else {
        return Ok(());
    };
    let case = Case::new(&mut rng(42), 6, 48, DType::F32, Input::Contiguous)?;
    let (flat, _, _) = case.run(&target)?;
    let shaped = target.run(|device| {
        let x = case.x.reshape((2, 3, 48))?.to_device(device)?;
        let y = bias_gelu(&x, &case.bias.to_device(device)?)?;
        assert_eq!(y.dims(), [2, 3, 48]);
        Ok::<_, candle_core::Error>(values(&y))
    })?;
    assert_eq!(flat, shaped);
    Ok(())
}

fn error_of(x: &Tensor, bias: &Tensor) -> String {
    match bias_gelu(x, bias) {
        Ok(out) => panic!("expected an error, got a tensor of shape {:?}", out.dims()),
        Err(e) => e.to_string(),
    }
}

/// Bad input on the kernel path gives clear errors, and (on a GPU) mixing
/// devices is one.
#[test]
fn kernels_reject_bad_inputs() -> Result<()> {
    let Some(target) = crate::kernel_target("kernels_reject_bad_inputs") else {
        return Ok(());
    };
    let dev = &target.device();
    let x = Tensor::ones((3, 4), DType::F32, dev)?;
    let bias = Tensor::ones(4, DType::F32, dev)?;
    let cases = [
        (
            x.clone(),
            Tensor::ones(5, DType::F32, dev)?,
            "bias must have shape [4]",
        ),
        (
            Tensor::new(1f32, dev)?,
            bias.clone(),
            "x must have rank >= 1",
        ),
        (
            x.clone(),
            bias.to_dtype(DType::F16)?,
            "both must have the same dtype",
        ),
        (
            x.to_dtype(DType::U32)?,
            bias.to_dtype(DType::U32)?,
            "unsupported dtype U32",
        ),
        (x.clone(), bias.to_device(&Device::Cpu)?, "is on Cpu"),
    ];
    for (x, bias, expected) in cases {
        if target.is_host() && expected == "is on Cpu" {
            continue; // one device on the host: nothing to mix
        }
        let message = target.run(|_| error_of(&x, &bias));
        assert!(
            message.contains(expected),
            "expected {expected:?} in {message:?}"
        );
    }
    Ok(())
}

/// The encoder's intermediate layer, `Dense::forward_gelu_erf`, on the target's
/// device against the CPU path (linear, then gelu_erf), forward and the
/// gradients of x, the weight and the bias. On a GPU it takes the product
/// without bias and then `bias_gelu`; the host harness runs the same
/// decomposition written out (matmul, then the `bias_gelu` kernels).
#[test]
fn intermediate_layer_matches_the_cpu_path() -> Result<()> {
    use sentence_mtl::model::layers::Dense;
    let Some(target) = crate::kernel_target("intermediate_layer_matches_the_cpu_path") else {
        return Ok(());
    };
    let (rows, d_in, d_out) = (37, 24, 96);
    for dtype in [DType::F32, DType::F64] {
        let mut rng = rng(43);
        let x = uniform(&mut rng, &[rows, d_in], 1.0, dtype)?;
        let w = uniform(&mut rng, &[d_out, d_in], 0.5, dtype)?;
        let b = uniform(&mut rng, &[d_out], 1.0, dtype)?;
        let g = uniform(&mut rng, &[rows, d_out], 2.0, dtype)?;
        // (y, dx, dW, db) of `layer(x, W, b)` on `device`.
        let run = |device: &Device, layer: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>| {
            let vars = [&x, &w, &b].map(|t| {
                t.to_device(device)
                    .and_then(|t| Var::from_tensor(&t))
                    .unwrap()
            });
            let y = layer(
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
            )?;
            let grads = y.mul(&g.to_device(device)?)?.sum_all()?.backward()?;
            let mut out = vec![values(&y)];
            for v in &vars {
                out.push(values(grads.get(v.as_tensor()).expect("gradient")));
            }
            Ok::<_, candle_core::Error>(out)
        };
        let dense = |x: &Tensor, w: &Tensor, b: &Tensor| {
            let tensors = [
                ("weight".to_string(), w.clone()),
                ("bias".to_string(), b.clone()),
            ];
            let vb = candle_nn::VarBuilder::from_tensors(tensors.into(), x.dtype(), x.device());
            Dense::load(d_in, d_out, vb)?.forward_gelu_erf(x)
        };
        let want = run(&Device::Cpu, &dense)?;
        let got = if target.is_host() {
            let decomposed = |x: &Tensor, w: &Tensor, b: &Tensor| bias_gelu(&x.matmul(&w.t()?)?, b);
            target.run(|device| run(device, &decomposed))?
        } else {
            target.run(|device| run(device, &dense))?
        };
        // The CPU path's f32 erf is within 7e-7 (ops::math) and the products
        // sum 24 to 37 terms of order one; its f64 GELU backward is candle's,
        // whose derivative is off the exact one by ~1e-7 relative (1e-6 in
        // the sums of dW and db).
        let (rtol, atol) = match dtype {
            DType::F32 => (common::tolerance(dtype).0, 2e-5),
            _ => (1e-6, 1e-5),
        };
        for (what, (g, w)) in ["y", "dx", "dW", "db"].iter().zip(got.iter().zip(&want)) {
            common::assert_close_tol(&format!("{dtype:?} {what}"), g, w, rtol, atol);
        }
    }
    Ok(())
}
