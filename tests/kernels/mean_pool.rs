//! Kernel tests of `masked_mean_pool`: the kernels of `kernels/mean_pool.cu`,
//! forward and backward, against the CPU path on the same inputs, with poisoned
//! allocations so that an element the kernels fail to write shows. They run on
//! the kernel target of the binary that includes them: the host harness
//! (`tests/host_kernels`, every `cargo test`) or a CUDA device (`tests/gpu`).

use crate::common;

use crate::common::{
    assert_close_tol, random_tensor, rng, strided_view, strided_view_on, values, KernelTarget,
    Strided,
};
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::rngs::StdRng;
use rand::Rng;
use sentence_mtl::ops::masked_mean_pool;

/// Every mask dtype the op reads, each in its own dtype on every device.
const MASK_DTYPES: [DType; 10] = [
    DType::U8,
    DType::I64,
    DType::U32,
    DType::F32,
    DType::BF16,
    DType::I16,
    DType::I32,
    DType::F16,
    DType::F64,
    DType::F8E4M3,
];

/// A random 0/1 mask `[B,T]` with about 70% real tokens; `empty_row` has none.
fn random_mask(rng: &mut StdRng, b: usize, t: usize, empty_row: Option<usize>) -> Vec<f64> {
    (0..b * t)
        .map(|i| f64::from(u8::from(Some(i / t) != empty_row && rng.random_bool(0.7))))
        .collect()
}

/// One input set, built on the CPU and copied to the device under test.
struct Case {
    hidden: Tensor,
    mask: Tensor,
    weight: Tensor,
    layout: Strided,
    mask_layout: Strided,
    strided_grad: bool,
}

impl Case {
    /// Pools on the CPU path (`None`) or on `target`'s kernels and backpropagates
    /// `Σ weight ⊙ pooled` to hidden; returns (pooled, dhidden) as f64 values. The
    /// pooled gradient reaches the backward op transposed (non-contiguous) when
    /// `strided_grad`.
    fn run(&self, target: Option<&KernelTarget>) -> Result<(Vec<f64>, Vec<f64>)> {
        match target {
            Some(target) => target.run(|device| self.run_on(device)),
            None => self.run_on(&Device::Cpu),
        }
    }

    fn run_on(&self, device: &Device) -> Result<(Vec<f64>, Vec<f64>)> {
        common::poison_device(device)?;
        let var = Var::from_tensor(&self.hidden.to_device(device)?)?;
        let mask = strided_view_on(&self.mask, self.mask_layout, device)?;
        let weight = self.weight.to_device(device)?;
        let pooled = masked_mean_pool(&strided_view(var.as_tensor(), self.layout)?, &mask)?;
        let loss = if self.strided_grad {
            pooled.t()?.mul(&weight.t()?.contiguous()?)?.sum_all()?
        } else {
            pooled.mul(&weight)?.sum_all()?
        };
        let grads = loss.backward()?;
        let grad = grads.get(var.as_tensor()).expect("gradient of hidden");
        Ok((values(&pooled), values(grad)))
    }
}

/// Per pooled element, the mean |x| over the row's real tokens (1 for a row
/// with none): the scale of the forward's rounding.
fn mean_magnitude(case: &Case) -> Result<Vec<f64>> {
    let (b, t, h) = case.hidden.dims3()?;
    let x = values(&case.hidden);
    // Through `ne`: candle 0.11's f8e4m3-to-f64 conversion never returns.
    let m = values(&case.mask.ne(0f64)?.to_dtype(DType::F64)?);
    let mut out = vec![0.0; b * h];
    for bi in 0..b {
        let count = (0..t).filter(|&ti| m[bi * t + ti] != 0.0).count();
        for hi in 0..h {
            let sum: f64 = (0..t)
                .filter(|&ti| m[bi * t + ti] != 0.0)
                .map(|ti| x[(bi * t + ti) * h + hi].abs())
                .sum();
            out[bi * h + hi] = if count == 0 { 1.0 } else { sum / count as f64 };
        }
    }
    Ok(out)
}

/// The kernels' result vs the CPU path. Both accumulate in f32 (f64 for f64) in
/// a different order: the forward is held relative to the mean magnitude of the
/// summed tokens, `Σ|x| / count` per output element (the scale of a summation's
/// rounding error), never to an absolute floor.
fn check(target: &KernelTarget, case: &Case, what: &str) -> Result<()> {
    let dtype = case.hidden.dtype();
    let (cpu_pooled, cpu_grad) = case.run(None)?;
    let (gpu_pooled, gpu_grad) = case.run(Some(target))?;
    let (rtol, _) = common::tolerance(dtype);
    let magnitude = mean_magnitude(case)?;
    for (i, ((&g, &w), &m)) in gpu_pooled
        .iter()
        .zip(&cpu_pooled)
        .zip(&magnitude)
        .enumerate()
    {
        assert!(
            g.is_finite() && (g - w).abs() <= rtol * (w.abs() + m),
            "{what} forward: element {i} is {g}, want {w} (token magnitude {m:.3e}, rtol {rtol:.0e})"
        );
    }
    // Backward: one division per (row, column) on both paths: relative only.
    assert_close_tol(&format!("{what} backward"), &gpu_grad, &cpu_grad, rtol, 0.0);
    Ok(())
}

/// Every dtype, every layout of hidden and mask, several mask dtypes, and shapes
/// that hit both kernel forms and the edges: odd H, T = 1, one row, all-padding
/// rows, several column chunks, rows longer than one mask tile (T > 2048).
#[test]
fn kernels_match_cpu_forward_and_backward() -> Result<()> {
    let Some(target) = crate::kernel_target("kernels_match_cpu_forward_and_backward") else {
        return Ok(());
    };
    // Odd H (1, 3, 33, 385), T = 1, one row, several column chunks (and
    // several blocks), rows longer than one mask tile (T > 2048).
    let shapes = [
        (3, 7, 45),
        (1, 1, 1032),
        (4, 130, 768),
        (2, 2500, 64),
        (5, 33, 200),
        (6, 1, 8),
        (3, 9, 1),
        (4, 5, 3),
        (7, 17, 33),
        (2, 40, 385),
    ];
    let mut rng = rng(20);
    let mut run = 0usize;
    for dtype in common::FLOAT_DTYPES {
        for (b, t, h) in shapes {
            for layout in common::STRIDED_KINDS {
                run += 1;
                let mask_layout = common::STRIDED_KINDS[run % 4];
                let mask_dtype = MASK_DTYPES[run % MASK_DTYPES.len()];
                let empty_row = (b > 1).then(|| run % b);
                let mask = random_mask(&mut rng, b, t, empty_row);
                let case = Case {
                    hidden: random_tensor(&mut rng, &[b, t, h], dtype, &Device::Cpu)?,
                    mask: Tensor::from_vec(mask, (b, t), &Device::Cpu)?.to_dtype(mask_dtype)?,
                    weight: random_tensor(&mut rng, &[b, h], dtype, &Device::Cpu)?,
                    layout,
                    mask_layout,
                    strided_grad: run.is_multiple_of(2),
                };
                let what = format!(
                    "[{b},{t},{h}] {dtype:?} {layout:?}, mask {mask_dtype:?} {mask_layout:?}"
                );
                check(&target, &case, &what)?;
            }
        }
    }
    Ok(())
}

/// A row with no real token pools to exact zeros and gets a zero gradient.
#[test]
fn kernels_give_an_all_padding_row_zeros() -> Result<()> {
    let Some(target) = crate::kernel_target("kernels_give_an_all_padding_row_zeros") else {
        return Ok(());
    };
    for dtype in common::FLOAT_DTYPES {
        let case = Case {
            hidden: random_tensor(&mut rng(21), &[2, 9, 256], dtype, &Device::Cpu)?,
            mask: Tensor::new(&[[0u8; 9], [1, 0, 1, 1, 0, 0, 0, 0, 1]], &Device::Cpu)?,
            weight: random_tensor(&mut rng(22), &[2, 256], dtype, &Device::Cpu)?,
            layout: Strided::Contiguous,
            mask_layout: Strided::Contiguous,
            strided_grad: false,
        };
        let (pooled, grad) = case.run(Some(&target))?;
        assert!(
            pooled[..256].iter().all(|&v| v == 0.0),
            "{dtype:?}: empty row not zero"
        );
        assert!(
            grad[..9 * 256].iter().all(|&v| v == 0.0),
            "{dtype:?}: empty row gradient"
        );
        check(&target, &case, &format!("{dtype:?} with an empty row"))?;
    }
    Ok(())
}

fn error_of(hidden: &Tensor, mask: &Tensor) -> String {
    match masked_mean_pool(hidden, mask) {
        Ok(out) => panic!("expected an error, got a tensor of shape {:?}", out.dims()),
        Err(e) => e.to_string(),
    }
}

/// Bad input on the kernel path gives the same errors as on the CPU, and (on a
/// GPU) mixing devices is one.
#[test]
fn kernels_reject_bad_inputs() -> Result<()> {
    let Some(target) = crate::kernel_target("kernels_reject_bad_inputs") else {
        return Ok(());
    };
    let device = target.device();
    let dev = &device;
    let hidden = Tensor::ones((2, 3, 4), DType::F32, dev)?;
    let mask = Tensor::ones((2, 3), DType::U8, dev)?;
    let cases = [
        (
            Tensor::ones((2, 3), DType::F32, dev)?,
            mask.clone(),
            "hidden must have rank 3",
        ),
        (
            hidden.clone(),
            Tensor::ones((2, 3, 1), DType::U8, dev)?,
            "mask must have rank 2",
        ),
        (
            hidden.clone(),
            Tensor::ones((3, 3), DType::U8, dev)?,
            "mask shape [3, 3] does not match",
        ),
        (
            hidden.to_dtype(DType::U32)?,
            mask.clone(),
            "unsupported dtype U32 for hidden",
        ),
        (
            hidden.clone(),
            mask.to_device(&Device::Cpu)?,
            "mask is on Cpu",
        ),
        (
            hidden.to_device(&Device::Cpu)?,
            mask.clone(),
            "hidden is on Cpu",
        ),
    ];
    for (hidden, mask, expected) in cases {
        if target.is_host() && expected.contains("is on Cpu") {
            continue; // one device on the host: nothing to mix
        }
        let message = target.run(|_| error_of(&hidden, &mask));
        assert!(
            message.contains(expected),
            "expected {expected:?} in {message:?}"
        );
    }
    Ok(())
}
