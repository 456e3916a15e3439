//! The encoder's building blocks that candle-nn either lacks or implements
//! without a backward pass.
//!
//! candle-nn's fused `layer_norm` and `softmax_last_dim` are applied with
//! `apply_op*_no_bwd`: a gradient reaching them stops there. Every block here
//! therefore has two paths, chosen by [`Pass`]:
//! - differentiable: our ops with a fused backward on the CPU
//!   ([`crate::ops::layer_norm()`], [`crate::ops::softmax_last_dim`],
//!   [`crate::ops::gelu_erf`], [`crate::ops::linear()`], [`crate::ops::attention()`];
//!   off the CPU [`crate::ops::bias_gelu()`] after the intermediate layer's product),
//!   composed candle ops
//!   elsewhere; used for training and whenever gradients may be wanted;
//! - fast (inference only): on the CPU the same ops of ours, which are fused
//!   either way; elsewhere candle's fused kernels, no backward bookkeeping.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

pub use crate::ops::attention::{attention_bias, MASK_BIAS};
pub use crate::ops::dtype::accumulation_dtype;

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
    /// Training: dropout on, every op differentiable.
    pub const TRAIN: Pass = Pass {
        dropout: true,
        differentiable: true,
    };
    /// Evaluation with gradients: no dropout, every op differentiable.
    pub const EVAL: Pass = Pass {
        dropout: false,
        differentiable: true,
    };
    /// Inference: no dropout, the fused no-gradient kernels where there are some.
    pub const INFERENCE: Pass = Pass {
        dropout: false,
        differentiable: false,
    };
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

    /// LayerNorm over the last dimension of `x`.
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

    /// LayerNorm of `x + residual` (the post-norm residual block), through
    /// [`crate::ops::layer_norm_residual`]: on the CPU that is exactly
    /// `forward(x + residual)` (the same bits); on CUDA one fused kernel that
    /// never writes the sum, in every pass. Other devices add, then `forward`.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor, pass: Pass) -> Result<Tensor> {
        let device = x.device();
        if device.is_cpu() || device.is_cuda() {
            return crate::ops::layer_norm_residual(
                x,
                residual,
                &self.weight,
                &self.bias,
                self.eps,
            );
        }
        self.forward(&(x + residual)?, pass)
    }
}

/// A fully connected layer `y = x·Wᵀ + b` (Hugging Face's `nn.Linear` weights:
/// `weight` `[out, in]`, `bias` `[out]`).
///
/// Runs [`crate::ops::linear()`]: on the CPU one product into a buffer that
/// starts as the bias, and a backward of two products and a column sum.
/// (candle-nn's `Linear` broadcasts the weight over the batch, and its backward
/// then sums `B` copies of `[in, out]` with candle's slow strided reduction.)
#[derive(Debug, Clone)]
pub struct Dense {
    weight: Tensor,
    bias: Tensor,
}

impl Dense {
    /// Loads `weight` `[out, in]` and `bias` `[out]` from `vb`.
    pub fn load(in_size: usize, out_size: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get((out_size, in_size), "weight")?,
            bias: vb.get(out_size, "bias")?,
        })
    }

    /// The layers `parts` (same input size) as one, their outputs side by
    /// side: one matrix product instead of several smaller ones. Gradients
    /// flow back to each part's weights.
    pub fn concat(parts: &[&Dense]) -> Result<Dense> {
        let weights: Vec<&Tensor> = parts.iter().map(|d| &d.weight).collect();
        let biases: Vec<&Tensor> = parts.iter().map(|d| &d.bias).collect();
        Ok(Dense {
            weight: Tensor::cat(&weights, 0)?,
            bias: Tensor::cat(&biases, 0)?,
        })
    }

    /// `x` `[.., in]` to `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::linear(x, &self.weight, &self.bias)
    }

    /// `gelu_erf(x·Wᵀ + b)`: the layer followed by the exact GELU. On the CPU
    /// [`crate::ops::linear()`] then [`crate::ops::gelu_erf`], as before; on
    /// other devices the product without its bias (candle's matmul: cuBLAS),
    /// then [`crate::ops::bias_gelu()`], which adds the bias and applies GELU
    /// in one pass forward and one backward (plus the bias gradient's reduction).
    /// The host harness takes the second path, as a GPU does.
    pub fn forward_gelu_erf(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() && !crate::ops::runs_kernels(x.device()) {
            return crate::ops::gelu_erf(&self.forward(x)?);
        }
        let (out_size, in_size) = self.weight.dims2()?;
        let mut out_dims = x.dims().to_vec();
        match out_dims.last_mut() {
            Some(last) if *last == in_size => *last = out_size,
            _ => candle_core::bail!(
                "linear: x {:?} does not end in the {in_size} features weight {:?} takes",
                x.dims(),
                self.weight.dims()
            ),
        }
        let rows = x.elem_count() / in_size.max(1);
        let product = x.reshape((rows, in_size))?.matmul(&self.weight.t()?)?;
        crate::ops::bias_gelu(&product, &self.bias)?.reshape(out_dims)
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

    /// The probability of zeroing an element.
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
        match self.multiplier(x.shape(), x.dtype(), x.device(), pass)? {
            Some(mask) => x.mul(&mask),
            None => Ok(x.clone()),
        }
    }

    /// A seed from this dropout's stream for dropout drawn inside a kernel
    /// (the packed attention kernels), when the pass trains; `None` when it
    /// does not.
    pub fn seeded(&self, pass: Pass) -> Option<crate::ops::attention::SeededDropout> {
        if !pass.dropout || self.p <= 0.0 {
            return None;
        }
        Some(crate::ops::attention::SeededDropout {
            p: self.p,
            seed: self.lock().next_u64(),
        })
    }

    /// The next dropout multiplier of `shape` (each element 0 with probability
    /// `p`, `1/(1−p)` otherwise) when the pass trains; `None` when it does not.
    pub fn multiplier(
        &self,
        shape: &candle_core::Shape,
        dtype: DType,
        device: &candle_core::Device,
        pass: Pass,
    ) -> Result<Option<Tensor>> {
        if !pass.dropout || self.p <= 0.0 {
            return Ok(None);
        }
        let mut bits = vec![0u16; shape.elem_count()];
        self.lock().fill_bytes(bytemuck::cast_slice_mut(&mut bits));
        let threshold = (f64::from(self.p) * 65536.0).round().min(65535.0) as u16;
        let scale = (1.0 / (1.0 - f64::from(self.p))) as f32;
        let mask: Vec<f32> = bits
            .iter()
            .map(|&r| if r >= threshold { scale } else { 0.0 })
            .collect();
        Tensor::from_vec(mask, shape, device)?
            .to_dtype(dtype)
            .map(Some)
    }
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
