//! The encoder's building blocks that candle-nn either lacks or implements
//! without a backward pass.
//!
//! candle-nn's fused `layer_norm` and `softmax_last_dim` are applied with
//! `apply_op*_no_bwd`: a gradient reaching them stops there. Every block here
//! therefore has two paths, chosen by [`Pass`]:
//! - differentiable: composed from candle tensor ops, each of which records
//!   its backward (used for training and whenever gradients may be wanted);
//! - fast: candle's fused kernels, no backward bookkeeping (inference only).

use candle_core::{DType, Result, Tensor, D};
use candle_nn::VarBuilder;

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
        // candle's fused kernel has no f64 path and needs a contiguous input.
        if !pass.differentiable && x.is_contiguous() && x.dtype() != DType::F64 {
            return candle_nn::ops::layer_norm(x, &self.weight, &self.bias, self.eps as f32);
        }
        let dtype = x.dtype();
        let acc = accumulation_dtype(dtype);
        let x = x.to_dtype(acc)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let variance = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(variance + self.eps)?.sqrt()?)?;
        // Scale and shift before rounding back to a half type: one rounding, not three.
        normed
            .broadcast_mul(&self.weight.to_dtype(acc)?)?
            .broadcast_add(&self.bias.to_dtype(acc)?)?
            .to_dtype(dtype)
    }
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor, pass: Pass) -> Result<Tensor> {
    if !pass.differentiable && x.is_contiguous() {
        return candle_nn::ops::softmax_last_dim(x);
    }
    // Softmax is invariant to the shift, so the row maximum (there only to keep
    // exp finite) needs no gradient: detaching it spares the backward of `max`.
    let max = x.max_keepdim(D::Minus1)?.detach();
    let exp = x.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

/// Inverted dropout with probability `p` when the pass trains, identity otherwise.
pub fn dropout(x: &Tensor, p: f32, pass: Pass) -> Result<Tensor> {
    if pass.dropout && p > 0.0 {
        candle_nn::ops::dropout(x, p)
    } else {
        Ok(x.clone())
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
