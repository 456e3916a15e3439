//! Pooling: token states `[B, T, H]` and the attention mask `[B, T]` in, one
//! vector per sentence out, by any of sentence-transformers' `Pooling` modes.
//! Several modes are concatenated in sentence-transformers' order (cls, max,
//! mean, mean_sqrt_len_tokens, weightedmean, lasttoken), `H` values each.
//!
//! Padding rules are theirs: a token counts where its mask is non-zero; max
//! sets padding to -1e9 (the dtype's lowest value where -1e9 does not fit);
//! the means divide by the token count (or weight) clamped at 1e-9, so a row
//! with no token gives zeros; weightedmean weighs position `t` by `t + 1`;
//! lasttoken takes the last token whose mask is set (zeros if there is none);
//! cls takes token 0 whatever the mask says.

use candle_core::{DType, IndexOp, Result, Tensor, D};

use super::config::Pooling;

/// The mask as one 0/1 value per token, `[B, T]` u8.
fn flags(mask: &Tensor) -> Result<Tensor> {
    mask.ne(0f64)
}

/// Per-token weights `[B, T]` in f32: 0 off the mask, else 1, or `t + 1`
/// `by_position`.
fn weights(flags: &Tensor, by_position: bool) -> Result<Tensor> {
    let w = flags.to_dtype(DType::F32)?;
    if !by_position {
        return Ok(w);
    }
    let t = w.dim(1)?;
    let positions = Tensor::arange(1f32, t as f32 + 1.0, w.device())?;
    w.broadcast_mul(&positions.unsqueeze(0)?)
}

/// `Σ_t w[b,t]·x[b,t,:] / max(Σ_t w[b,t], 1e-9)` (the square root of that
/// divisor for `sqrt_len`), one batched product in f32.
fn weighted_mean(hidden: &Tensor, w: &Tensor, sqrt_len: bool) -> Result<Tensor> {
    let x = hidden.to_dtype(DType::F32)?;
    let sums = w.unsqueeze(1)?.matmul(&x)?.squeeze(1)?; // [B, H]
    let total = w.sum_keepdim(1)?.maximum(1e-9)?; // [B, 1]
    let divisor = if sqrt_len { total.sqrt()? } else { total };
    sums.broadcast_div(&divisor)?.to_dtype(hidden.dtype())
}

/// The lowest value a padding token takes in max pooling: -1e9, or the
/// dtype's lowest finite value where -1e9 is out of range (f16).
fn max_fill(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => f64::from(half::f16::MIN),
        _ => -1e9,
    }
}

fn max_pool(hidden: &Tensor, flags: &Tensor) -> Result<Tensor> {
    let fill = Tensor::full(max_fill(hidden.dtype()), (), hidden.device())?
        .to_dtype(hidden.dtype())?
        .broadcast_as(hidden.shape())?;
    let keep = flags.unsqueeze(2)?.broadcast_as(hidden.shape())?;
    keep.where_cond(hidden, &fill)?.max(1)
}

/// Each row's last token with its mask set (none: a zero vector).
fn last_token(hidden: &Tensor, flags: &Tensor) -> Result<Tensor> {
    let (b, t, h) = hidden.dims3()?;
    let rows = flags.to_dtype(DType::U8)?.to_vec2::<u8>()?;
    let last: Vec<Option<usize>> = rows
        .iter()
        .map(|r| r.iter().rposition(|&f| f != 0))
        .collect();
    let index: Vec<u32> = last
        .iter()
        .enumerate()
        .map(|(i, l)| (i * t + l.unwrap_or(0)) as u32)
        .collect();
    let present: Vec<f32> = last.iter().map(|l| l.map_or(0.0, |_| 1.0)).collect();
    let index = Tensor::from_vec(index, b, hidden.device())?;
    let present = Tensor::from_vec(present, (b, 1), hidden.device())?.to_dtype(hidden.dtype())?;
    hidden
        .reshape((b * t, h))?
        .index_select(&index, 0)?
        .broadcast_mul(&present)
}

/// Pools `hidden` `[B, T, H]` under `mask` `[B, T]` (any integer or float
/// dtype) by each of `modes`, concatenated: `[B, H·modes.len()]` in `hidden`'s
/// dtype. Modes are taken in sentence-transformers' order whatever order they
/// are given in; mean pooling is the fused [`crate::ops::masked_mean_pool`].
pub fn pool(hidden: &Tensor, mask: &Tensor, modes: &[Pooling]) -> Result<Tensor> {
    let (b, t, _) = hidden.dims3()?;
    if mask.dims() != [b, t] {
        candle_core::bail!(
            "pooling: mask has shape {:?}, the token states {:?}; it must be [batch, tokens]",
            mask.dims(),
            hidden.dims()
        );
    }
    if modes.is_empty() {
        candle_core::bail!("pooling: no pooling mode");
    }
    // 0/1 flags only for the modes that need them: the fused mean reads any mask.
    let needs_flags = modes
        .iter()
        .any(|m| !matches!(m, Pooling::Cls | Pooling::Mean));
    let flags = if needs_flags {
        flags(mask)?
    } else {
        mask.clone()
    };
    let mut parts = Vec::with_capacity(modes.len());
    for mode in Pooling::in_order(modes) {
        parts.push(match mode {
            Pooling::Cls => hidden.i((.., 0, ..))?.contiguous()?,
            Pooling::Max => max_pool(hidden, &flags)?,
            Pooling::Mean => crate::ops::masked_mean_pool(hidden, mask)?,
            Pooling::MeanSqrtLen => weighted_mean(hidden, &weights(&flags, false)?, true)?,
            Pooling::WeightedMean => weighted_mean(hidden, &weights(&flags, true)?, false)?,
            Pooling::LastToken => last_token(hidden, &flags)?,
        });
    }
    if parts.len() == 1 {
        return Ok(parts.remove(0));
    }
    Tensor::cat(&parts, D::Minus1)
}

/// `mask` with its first `tokens` columns cleared: the prompt left out of the
/// pooling (sentence-transformers' `include_prompt: false`).
pub fn exclude_prefix(mask: &Tensor, tokens: usize) -> Result<Tensor> {
    let (b, t) = mask.dims2()?;
    let cut = tokens.min(t);
    if cut == 0 {
        return Ok(mask.clone());
    }
    let zeros = Tensor::zeros((b, cut), mask.dtype(), mask.device())?;
    Tensor::cat(&[zeros, mask.narrow(1, cut, t - cut)?], 1)
}
