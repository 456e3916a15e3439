//! CUDA tests of `masked_mean_pool`: the CUDA kernels, forward and backward,
//! against the CPU path on the same inputs, on a device poisoned with NaN so
//! an element the kernels fail to write shows. Without a GPU (or without the
//! `cuda` feature) each test prints why it is skipped and returns.

use crate::common;

use crate::common::{assert_close_tol, random_tensor, rng, strided_view, values, Strided};
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::rngs::StdRng;
use rand::Rng;
use sentence_mtl::ops::masked_mean_pool;

const MASK_DTYPES: [DType; 5] = [DType::U8, DType::I64, DType::U32, DType::F32, DType::BF16];

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
    /// Pools on `device` and backpropagates `Σ weight ⊙ pooled` to hidden; returns
    /// (pooled, dhidden) as f64 values. The pooled gradient reaches the backward
    /// op transposed (non-contiguous) when `strided_grad`.
    fn run(&self, device: &Device) -> Result<(Vec<f64>, Vec<f64>)> {
        common::poison_device(device)?;
        let var = Var::from_tensor(&self.hidden.to_device(device)?)?;
        let mask = strided_view(&self.mask.to_device(device)?, self.mask_layout)?;
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

/// The CUDA result vs the CPU path. Both accumulate in f32 (f64 for f64) in a
/// different order, so the forward tolerance grows with T.
fn check(device: &Device, case: &Case, what: &str) -> Result<()> {
    let dtype = case.hidden.dtype();
    let t = case.hidden.dim(1)?;
    let (cpu_pooled, cpu_grad) = case.run(&Device::Cpu)?;
    let (gpu_pooled, gpu_grad) = case.run(device)?;
    let (rtol, atol) = common::tolerance(dtype);
    let unit = if dtype == DType::F64 {
        f64::EPSILON
    } else {
        f32::EPSILON as f64
    };
    let pool_atol = atol + 4.0 * t as f64 * unit;
    assert_close_tol(
        &format!("{what} forward"),
        &gpu_pooled,
        &cpu_pooled,
        rtol,
        pool_atol,
    );
    assert_close_tol(
        &format!("{what} backward"),
        &gpu_grad,
        &cpu_grad,
        rtol,
        atol,
    );
    Ok(())
}

/// Every dtype, every layout of hidden and mask, several mask dtypes, and shapes
/// that hit both kernel forms and the edges: odd H, T = 1, one row, all-padding
/// rows, several column chunks, rows longer than one mask tile (T > 2048).
#[test]
fn cuda_matches_cpu_forward_and_backward() -> Result<()> {
    let Some(device) = common::cuda_device("cuda_matches_cpu_forward_and_backward") else {
        return Ok(());
    };
    let shapes = [
        (3, 7, 45),
        (1, 1, 1032),
        (4, 130, 768),
        (2, 2500, 64),
        (5, 33, 200),
        (6, 1, 8),
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
                check(&device, &case, &what)?;
            }
        }
    }
    Ok(())
}

/// A row with no real token pools to exact zeros and gets a zero gradient on CUDA.
#[test]
fn cuda_all_padding_row_is_zero() -> Result<()> {
    let Some(device) = common::cuda_device("cuda_all_padding_row_is_zero") else {
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
        let (pooled, grad) = case.run(&device)?;
        assert!(
            pooled[..256].iter().all(|&v| v == 0.0),
            "{dtype:?}: empty row not zero"
        );
        assert!(
            grad[..9 * 256].iter().all(|&v| v == 0.0),
            "{dtype:?}: empty row gradient"
        );
        check(&device, &case, &format!("{dtype:?} with an empty row"))?;
    }
    Ok(())
}

fn error_of(hidden: &Tensor, mask: &Tensor) -> String {
    match masked_mean_pool(hidden, mask) {
        Ok(out) => panic!("expected an error, got a tensor of shape {:?}", out.dims()),
        Err(e) => e.to_string(),
    }
}

/// Bad input on CUDA gives the same errors as on the CPU, and mixing devices is one.
#[test]
fn cuda_bad_inputs_are_errors() -> Result<()> {
    let Some(device) = common::cuda_device("cuda_bad_inputs_are_errors") else {
        return Ok(());
    };
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
        let message = error_of(&hidden, &mask);
        assert!(
            message.contains(expected),
            "expected {expected:?} in {message:?}"
        );
    }
    Ok(())
}
