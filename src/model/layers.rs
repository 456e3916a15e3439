//! The encoder's building blocks that candle-nn either lacks or implements
//! without a backward pass.
//!
//! candle-nn's fused `layer_norm` and `softmax_last_dim` are applied with
//! `apply_op*_no_bwd`: a gradient reaching them stops there. Every block here
//! therefore has two paths, chosen by [`Pass`]:
//! - differentiable: our ops with a fused backward on the CPU
//!   ([`crate::ops::layer_norm`], [`crate::ops::softmax_last_dim`],
//!   [`crate::ops::gelu_erf`], [`crate::ops::add_bias`]), composed candle ops
//!   elsewhere; used for training and whenever gradients may be wanted;
//! - fast (inference only): on the CPU the same ops of ours, which are fused
//!   either way; elsewhere candle's fused kernels, no backward bookkeeping.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

/// Added to the attention scores of padding positions. Finite in every float
/// dtype (f16 tops out at 65504, so `f32::MIN` would become -inf and a fully
/// masked row NaN), yet `exp(-10000)` is exactly 0 in f32 and f64, so padding
/// gets exactly zero attention, as with Hugging Face's `finfo.min`.
pub const MASK_BIAS: f64 = -10_000.0;

/// How one forward pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Dropout on (training mode).
    pub dropout: bool,
    /// Every op records its backward; when false, fused no-gradient kernels
    /// are used where candle has them.
    pub differentiable: bool,
}

impl Pass {
    pub const TRAIN: Pass = Pass {
        dropout: true,
        differentiable: true,
    };
    pub const EVAL: Pass = Pass {
        dropout: false,
        differentiable: true,
    };
    pub const INFERENCE: Pass = Pass {
        dropout: false,
        differentiable: false,
    };
}

/// The dtype in which attention softmax and LayerNorm statistics are computed:
/// f32 for the half types (their 8- or 11-bit mantissas lose too much in sums
/// of hundreds of terms), the input's own dtype otherwise.
pub fn accumulation_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// LayerNorm over the last dimension with learned scale and shift.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Reads `weight` and `bias` (or the legacy `gamma` and `beta`) of size `size`.
    pub fn load(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let pick = |name: &'static str, legacy: &'static str| {
            if !vb.contains_tensor(name) && vb.contains_tensor(legacy) {
                legacy
            } else {
                name
            }
        };
        let weight = vb.get(size, pick("weight", "gamma"))?;
        let bias = vb.get(size, pick("bias", "beta"))?;
        Ok(Self { weight, bias, eps })
    }

    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        // Off the CPU, inference takes candle's fused kernel (no f64 path, needs
        // a contiguous input); our op is fused on the CPU either way.
        if !pass.differentiable
            && !x.device().is_cpu()
            && x.is_contiguous()
            && x.dtype() != DType::F64
        {
            return candle_nn::ops::layer_norm(x, &self.weight, &self.bias, self.eps as f32);
        }
        crate::ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// A fully connected layer `y = x·Wᵀ + b` (Hugging Face's `nn.Linear` weights:
/// `weight` `[out, in]`, `bias` `[out]`).
///
/// Unlike candle-nn's `Linear`, the input is flattened to `[rows, in]` so that
/// the weight gradient is one matrix product (candle-nn broadcasts the weight
/// over the batch, and its backward then sums `B` copies of `[in, out]` with
/// candle's slow strided reduction), and the bias is added by
/// [`crate::ops::add_bias`], whose gradient is a fast parallel column sum.
#[derive(Debug, Clone)]
pub struct Dense {
    weight: Tensor,
    bias: Tensor,
}

impl Dense {
    pub fn load(in_size: usize, out_size: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get((out_size, in_size), "weight")?,
            bias: vb.get(out_size, "bias")?,
        })
    }

    /// `x` `[.., in]` to `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let (in_size, out_size) = (self.weight.dim(1)?, self.weight.dim(0)?);
        let rows = x.elem_count() / in_size.max(1);
        let y = x.reshape((rows, in_size))?.matmul(&self.weight.t()?)?;
        let y = crate::ops::add_bias(&y, &self.bias)?;
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = out_size;
        }
        y.reshape(out_dims)
    }
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor, pass: Pass) -> Result<Tensor> {
    if !pass.differentiable && !x.device().is_cpu() && x.is_contiguous() {
        return candle_nn::ops::softmax_last_dim(x);
    }
    crate::ops::softmax_last_dim(x)
}

/// Inverted dropout (zero with probability `p`, scale the rest by 1/(1-p)) with
/// its own seedable random stream: candle's `dropout` draws from an unseeded
/// generator, which would make training with dropout irreproducible.
///
/// Clones share one stream. Masks are drawn on the host (16 random bits per
/// element, so `p` is rounded to a multiple of 1/65536) and multiplied in, so
/// the backward is that of a product with a constant.
#[derive(Debug, Clone)]
pub struct Dropout {
    p: f32,
    rng: Arc<Mutex<StdRng>>,
}

impl Dropout {
    /// A dropout of probability `p`, seeded from the operating system until
    /// [`reseed`](Self::reseed) is called.
    pub fn new(p: f32) -> Self {
        Self {
            p,
            rng: Arc::new(Mutex::new(StdRng::from_os_rng())),
        }
    }

    pub fn p(&self) -> f32 {
        self.p
    }

    /// Restarts the random stream from `seed`: the masks that follow are a
    /// function of the seed alone.
    pub fn reseed(&self, seed: u64) {
        *self.lock() = StdRng::seed_from_u64(seed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StdRng> {
        // A poisoned lock only means another thread panicked mid-draw; the
        // generator state is still a valid state.
        self.rng.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `x` with dropout applied when the pass trains, `x` itself otherwise.
    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        if !pass.dropout || self.p <= 0.0 {
            return Ok(x.clone());
        }
        let n = x.elem_count();
        let mut bits = vec![0u16; n];
        self.lock().fill_bytes(bytemuck::cast_slice_mut(&mut bits));
        let threshold = (f64::from(self.p) * 65536.0).round().min(65535.0) as u16;
        let scale = (1.0 / (1.0 - f64::from(self.p))) as f32;
        let mask: Vec<f32> = bits
            .iter()
            .map(|&r| if r >= threshold { scale } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x.mul(&mask)
    }
}

/// The additive attention bias for a `[B, T]` mask (non-zero = a real token):
/// `[B, 1, 1, T]` in `dtype`, 0 for real tokens and [`MASK_BIAS`] for padding.
pub fn attention_bias(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (batch, len) = mask.dims2()?;
    let keep = mask.ne(0u32)?.to_dtype(dtype)?;
    keep.affine(-MASK_BIAS, MASK_BIAS)?
        .reshape((batch, 1, 1, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn dropout_zeroes_about_p_and_keeps_the_mean() {
        let x = Tensor::ones((200, 500), DType::F32, &Device::Cpu).unwrap();
        let dropout = Dropout::new(0.1);
        dropout.reseed(3);
        let y: Vec<f32> = dropout
            .forward(&x, Pass::TRAIN)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let zeros = y.iter().filter(|&&v| v == 0.0).count() as f64 / y.len() as f64;
        // 100,000 draws: the standard error of the fraction is about 0.001.
        assert!((zeros - 0.1).abs() < 0.005, "dropped fraction {zeros}");
        let mean = y.iter().map(|&v| f64::from(v)).sum::<f64>() / y.len() as f64;
        assert!((mean - 1.0).abs() < 0.01, "mean {mean}");
        assert!(y.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.9).abs() < 1e-6));
        let eval = dropout.forward(&x, Pass::EVAL).unwrap();
        assert_eq!(eval.sum_all().unwrap().to_scalar::<f32>().unwrap(), 1e5);
    }
}
