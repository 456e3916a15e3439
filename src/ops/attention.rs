//! The core of multi-head self-attention, fused on the CPU:
//! `softmax(q·kᵀ/√d + mask) · v` for every head, from one `[B, T, 3H]` tensor
//! holding the query, key and value projections side by side (one matrix
//! product `x·[Wq; Wk; Wv]ᵀ` makes it).
//!
//! Composed from candle ops this is about a dozen graph nodes per layer: three
//! head-splitting copies, two batched products of `B·heads` tiny matrices,
//! scale, mask, softmax, dropout, the copy back to `[B, T, H]`, and as many
//! backward nodes, each with a tensor the size of the attention weights. Here
//! each `(sentence, head)` is one task: its two products run through the gemm
//! crate straight on the strided head slices of the input and output (no
//! copies), and the softmax runs in place on a per-thread buffer. Keys past the
//! last real token of a sentence are skipped (they would get weight exactly 0).
//! The backward recomputes the weights (cheaper than storing `B·heads·T²`
//! values for the whole graph) and writes `d[q, k, v]` in the same layout.
//!
//! Two layouts: [`attention`] takes a padded `[B, T, 3H]` batch and its mask;
//! [`attention_packed`] takes the real tokens only, `[N, 3H]` with the
//! sentence lengths, so that the layers around it (row-wise: products,
//! LayerNorm, GELU) do no work on padding either.
//!
//! The mask rule is the encoder's: a key whose mask is 0 gets weight 0 (the
//! composed form adds [`MASK_BIAS`], whose `exp` is exactly 0 in f32 and f64);
//! a sentence with no real token attends to all its positions, as it does under
//! an additive bias that is the same for every key.
//!
//! On a CUDA device (and on the host harness, inside `ops::host::run`) both
//! forms run the flash-attention style kernels of `kernels/attention.cu` in
//! f32, f16, bf16 and f64 (head sizes 32, 64, 128; f64 32 and 64): the weights
//! are never stored, the backward recomputes them from the saved per-row
//! log-sum-exp. [`attention`] takes them for a right-padded mask (each row's
//! real tokens first) and no dropout tensor: every row is a sentence of `T`
//! queries over its real keys, so padding queries get the composed form's
//! values and padding keys weight 0. Elsewhere f32 and f64 run the fused op
//! on the CPU, and f16, bf16 and the padded op's other cases on a GPU
//! (another head size, a dropout tensor, a mask that is not right-padded)
//! compose candle ops ([`attention_composed`]).
//! The kernels draw their dropout themselves from a seed
//! ([`attention_packed_seeded`]); [`packed_dropout_mask`] gives the same
//! multipliers as a tensor, for the CPU op.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage,
    Tensor,
};
use rayon::prelude::*;

use super::buffer::output_buffer;
use super::dtype::with_gemm_dtype;
use super::layout::{check_same_device, check_same_dtype, contiguous_slice};
use super::math::exp_f32;
use super::matmul::{Gemm, GemmFloat, Mat};

#[cfg(any(feature = "cuda", feature = "host-kernels"))]
mod cuda;
#[cfg(any(feature = "cuda", feature = "host-kernels"))]
mod kernel;

const OP: &str = "attention";

/// Added to the attention scores of padding keys in the composed form. Finite
/// in every float dtype (f16 tops out at 65504, so `f32::MIN` would become
/// -inf and a fully masked row NaN), yet `exp(-10000)` is exactly 0 in f32 and
/// f64, so padding gets exactly zero attention, as with Hugging Face's `finfo.min`.
pub const MASK_BIAS: f64 = -10_000.0;

/// Multi-head self-attention of `qkv` `[B, T, 3H]` (queries, keys and values
/// concatenated along the last dimension, each `H = heads · head_size` wide)
/// under `key_mask` `[B, T]` (non-zero = a real token; any dtype). `dropout`,
/// when given, is a `[B, heads, T, T]` multiplier of the attention weights
/// (0 or `1/(1−p)`, same dtype as `qkv`). Returns the concatenated heads'
/// outputs `[B, T, H]`. Scores are scaled by `1/√head_size`. Differentiable
/// with respect to `qkv`.
pub fn attention(
    qkv: &Tensor,
    key_mask: &Tensor,
    heads: usize,
    dropout: Option<&Tensor>,
) -> Result<Tensor> {
    check_inputs(qkv, key_mask, heads, dropout)?;
    let (batch, len, width) = qkv.dims3()?;
    if super::runs_kernels(qkv.device())
        && dropout.is_none()
        && packed_kernel_supports(qkv.dtype(), width / 3 / heads)
    {
        if let Some(keys) = right_padded_key_counts(key_mask)? {
            return kernel_padded(qkv, &keys, heads);
        }
    }
    if !qkv.device().is_cpu() || !matches!(qkv.dtype(), DType::F32 | DType::F64) {
        return attention_composed(qkv, key_mask, heads, dropout, crate::ops::softmax_last_dim);
    }
    let op = Attention {
        heads,
        packing: Packing::Padded { batch, len },
        dropout: dropout.map(Tensor::contiguous).transpose()?,
    };
    qkv.contiguous()?
        .apply_op2(&key_mask.ne(0u32)?.contiguous()?, op)
}

/// [`attention`] on packed sentences: `qkv` `[N, 3H]` holds only real tokens,
/// sentence after sentence, `lengths` tokens each (summing to `N`), and every
/// token attends to the tokens of its own sentence. `dropout`, when given, is
/// the sentences' `[heads, len, len]` multipliers one after the other
/// (`Σ heads·len²` elements). Returns `[N, H]`. With no padding to skip, mask
/// or compute, this is the fast form for batches of uneven lengths.
/// Differentiable with respect to `qkv`; f32 and f64 on the CPU only.
///
/// On a CUDA device (and on the host harness) this runs the attention kernels
/// (see the module docs), which draw their own dropout: there `dropout` must
/// be `None` (use [`attention_packed_seeded`]), and the head size must be one
/// the kernels take ([`packed_kernel_supports`]). `qkv` may then have any row
/// stride (e.g. a `narrow` of wider rows) without a copy.
pub fn attention_packed(
    qkv: &Tensor,
    lengths: &[usize],
    heads: usize,
    dropout: Option<&Tensor>,
) -> Result<Tensor> {
    check_packed(qkv, lengths, heads)?;
    if super::runs_kernels(qkv.device()) {
        if dropout.is_some() {
            bail!(
                "{OP}: the packed attention kernels draw their own dropout: \
                 give a seed to `attention_packed_seeded` instead of a multiplier"
            );
        }
        return kernel_packed(qkv, lengths, heads, None);
    }
    if !qkv.device().is_cpu() || !matches!(qkv.dtype(), DType::F32 | DType::F64) {
        bail!(
            "{OP}: packed attention runs on the CPU in f32 or f64 (got {:?} on {:?}); \
             use `attention` with a mask",
            qkv.dtype(),
            qkv.device().location()
        );
    }
    if let Some(drop) = dropout {
        let want = heads * lengths.iter().map(|l| l * l).sum::<usize>();
        if drop.dims() != [want] {
            bail!(
                "{OP}: dropout must have shape [{want}] (Σ heads·len²), got {:?}",
                drop.dims()
            );
        }
        check_same_dtype(OP, ("dropout", drop), ("qkv", qkv))?;
        check_same_device(OP, ("qkv", qkv), ("dropout", drop))?;
    }
    let op = Attention {
        heads,
        packing: Packing::Packed(lengths.to_vec()),
        dropout: dropout.map(Tensor::contiguous).transpose()?,
    };
    qkv.contiguous()?.apply_op1(op)
}

/// `[N, 3H]` packed qkv of `heads` heads whose `lengths` sum to `N`: its `N`.
fn check_packed(qkv: &Tensor, lengths: &[usize], heads: usize) -> Result<usize> {
    let (rows, width) = match qkv.dims() {
        [n, w] => (*n, *w),
        dims => bail!("{OP}: packed qkv must have rank 2 [N, 3H], got shape {dims:?}"),
    };
    check_heads(width, heads)?;
    if lengths.iter().sum::<usize>() != rows {
        bail!(
            "{OP}: the sentence lengths sum to {}, but qkv has {rows} rows",
            lengths.iter().sum::<usize>()
        );
    }
    Ok(rows)
}

/// Whether [`attention_packed`] can run on a CUDA device for `dtype` and
/// `head_size` (the sizes the kernels are built for).
pub fn packed_kernel_supports(dtype: DType, head_size: usize) -> bool {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => matches!(head_size, 32 | 64 | 128),
        DType::F64 => matches!(head_size, 32 | 64),
        _ => false,
    }
}

#[cfg(any(feature = "cuda", feature = "host-kernels"))]
fn kernel_packed(
    qkv: &Tensor,
    lengths: &[usize],
    heads: usize,
    dropout: Option<SeededDropout>,
) -> Result<Tensor> {
    let drop = match dropout {
        Some(d) => {
            let threshold = d.threshold()?;
            cuda::KernelDropout {
                seed: d.seed,
                threshold,
                scale: d.scale(threshold),
            }
        }
        None => cuda::KernelDropout::NONE,
    };
    kernel::attention_packed(qkv, lengths, lengths, heads, drop)
}

#[cfg(not(any(feature = "cuda", feature = "host-kernels")))]
fn kernel_packed(
    _qkv: &Tensor,
    _lengths: &[usize],
    _heads: usize,
    _dropout: Option<SeededDropout>,
) -> Result<Tensor> {
    bail!("{OP}: built without the attention kernels")
}

/// The padded op on the packed kernels: every row of `qkv` `[B, T, 3H]` is a
/// sentence of `T` tokens whose queries attend to its first `keys[b]`.
#[cfg(any(feature = "cuda", feature = "host-kernels"))]
fn kernel_padded(qkv: &Tensor, keys: &[usize], heads: usize) -> Result<Tensor> {
    let (batch, len, width) = qkv.dims3()?;
    let rows = qkv.contiguous()?.reshape((batch * len, width))?;
    let lengths = vec![len; batch];
    kernel::attention_packed(&rows, &lengths, keys, heads, cuda::KernelDropout::NONE)?.reshape((
        batch,
        len,
        width / 3,
    ))
}

#[cfg(not(any(feature = "cuda", feature = "host-kernels")))]
fn kernel_padded(_qkv: &Tensor, _keys: &[usize], _heads: usize) -> Result<Tensor> {
    bail!("{OP}: built without the attention kernels")
}

/// Each row's key count for the kernels when `key_mask` `[B, T]` is
/// right-padded (every row's real tokens come first): its real tokens, or all
/// `T` for a row with none (which attends to every position). `None` for any
/// other mask (left padding, holes), which the kernels do not take.
fn right_padded_key_counts(key_mask: &Tensor) -> Result<Option<Vec<usize>>> {
    let rows = key_mask.ne(0u32)?.to_vec2::<u8>()?;
    let mut keys = Vec::with_capacity(rows.len());
    for row in &rows {
        let real = row.iter().take_while(|&&m| m != 0).count();
        if row[real..].iter().any(|&m| m != 0) {
            return Ok(None);
        }
        keys.push(if real == 0 { row.len() } else { real });
    }
    Ok(Some(keys))
}

/// Dropout on the attention weights drawn from a counter-based generator: the
/// weight of query token `i` on key token `j` (rows of the packed `qkv`) in
/// head `h` is kept, scaled by `1/(1−p)`, unless a hash of `(seed, h, i, j)`
/// falls below `p` (see [`dropout_multiplier`]). The same seed gives the same
/// multipliers in the forward, the backward and [`packed_dropout_mask`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SeededDropout {
    /// The probability of dropping a weight, in `[0, 1)`.
    pub p: f32,
    /// The generator's seed.
    pub seed: u64,
}

impl SeededDropout {
    /// The 32-bit draw below which a weight is dropped (0: none is).
    fn threshold(&self) -> Result<u32> {
        if !(0.0..1.0).contains(&self.p) {
            bail!(
                "{OP}: dropout probability must be in [0, 1), got {}",
                self.p
            );
        }
        Ok((f64::from(self.p) * 4_294_967_296.0)
            .round()
            .min(f64::from(u32::MAX)) as u32)
    }

    /// The kept weights' multiplier, `1/(1−p)` (1 when nothing is dropped).
    fn scale(&self, threshold: u32) -> f32 {
        if threshold == 0 {
            1.0
        } else {
            (1.0 / (1.0 - f64::from(self.p))) as f32
        }
    }
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// splitmix64's finaliser (as `mix64` in `kernels/attention.cu`).
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The key of head `head`'s stream.
fn head_key(seed: u64, head: usize) -> u64 {
    mix64(seed.wrapping_add((head as u64 + 1).wrapping_mul(GOLDEN)))
}

/// The multiplier of the weight of query row `i` on key row `j` of head `head`
/// (rows of the packed qkv) under `dropout`: 0 or `1/(1−p)`, exactly what the
/// kernels apply. `Err` for a probability outside `[0, 1)`.
pub fn dropout_multiplier(dropout: SeededDropout, head: usize, i: usize, j: usize) -> Result<f32> {
    let threshold = dropout.threshold()?;
    Ok(multiplier(
        head_key(dropout.seed, head),
        threshold,
        dropout.scale(threshold),
        i,
        j,
    ))
}

#[inline]
fn multiplier(key: u64, threshold: u32, scale: f32, i: usize, j: usize) -> f32 {
    if threshold == 0 {
        return 1.0;
    }
    let counter = ((i as u64) << 32) | (j as u64 & 0xffff_ffff);
    let draw = (mix64(key.wrapping_add(counter.wrapping_mul(GOLDEN))) >> 32) as u32;
    if draw < threshold {
        0.0
    } else {
        scale
    }
}

/// The dropout multipliers the kernels draw for packed sentences of `lengths`
/// under `dropout`, laid out as [`attention_packed`] takes them: the sentences'
/// `[heads, len, len]` blocks one after the other (`Σ heads·len²` elements), in
/// `dtype` on `device`. With it the CPU op computes what the kernels do.
pub fn packed_dropout_mask(
    lengths: &[usize],
    heads: usize,
    dropout: SeededDropout,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let threshold = dropout.threshold()?;
    let scale = dropout.scale(threshold);
    let total = heads * lengths.iter().map(|l| l * l).sum::<usize>();
    let mut mask = Vec::with_capacity(total);
    let mut start = 0;
    for &len in lengths {
        for h in 0..heads {
            let key = head_key(dropout.seed, h);
            for i in start..start + len {
                mask.extend((start..start + len).map(|j| multiplier(key, threshold, scale, i, j)));
            }
        }
        start += len;
    }
    Tensor::from_vec(mask, total, device)?.to_dtype(dtype)
}

/// [`attention_packed`] with its dropout drawn from a seed ([`SeededDropout`];
/// `None` or `p = 0`: no dropout): in the kernels on a CUDA device (and on the
/// host harness), through [`packed_dropout_mask`] on the CPU, so both give the
/// same result for the same seed.
pub fn attention_packed_seeded(
    qkv: &Tensor,
    lengths: &[usize],
    heads: usize,
    dropout: Option<SeededDropout>,
) -> Result<Tensor> {
    check_packed(qkv, lengths, heads)?;
    if super::runs_kernels(qkv.device()) {
        return kernel_packed(qkv, lengths, heads, dropout);
    }
    let mask = match dropout {
        Some(d) if d.threshold()? > 0 => Some(packed_dropout_mask(
            lengths,
            heads,
            d,
            qkv.dtype(),
            qkv.device(),
        )?),
        _ => None,
    };
    attention_packed(qkv, lengths, heads, mask.as_ref())
}

/// The same attention composed from candle ops, with `softmax` over the last
/// dimension (a differentiable one for training, or a faster inference-only
/// kernel): the path for f16/bf16 and non-CPU devices, and the comparison in tests.
pub fn attention_composed(
    qkv: &Tensor,
    key_mask: &Tensor,
    heads: usize,
    dropout: Option<&Tensor>,
    softmax: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    check_inputs(qkv, key_mask, heads, dropout)?;
    let (batch, len, width) = qkv.dims3()?;
    let hidden = width / 3;
    let head_size = hidden / heads;
    // [B, T, H] -> [B, heads, T, head_size]
    let split = |part: usize| {
        qkv.narrow(2, part * hidden, hidden)?
            .reshape((batch, len, heads, head_size))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (query, key, value) = (split(0)?, split(1)?, split(2)?);
    let acc = super::dtype::accumulation_dtype(qkv.dtype());
    let scale = 1.0 / (head_size as f64).sqrt();
    let scores = query.matmul(&key.t()?.contiguous()?)?;
    let scores = (scores.to_dtype(acc)? * scale)?.broadcast_add(&attention_bias(key_mask, acc)?)?;
    let mut probs = softmax(&scores)?.to_dtype(qkv.dtype())?;
    if let Some(drop) = dropout {
        probs = probs.mul(drop)?;
    }
    probs
        .matmul(&value)?
        .transpose(1, 2)?
        .reshape((batch, len, hidden))
}

/// The additive attention bias for a `[B, T]` mask (non-zero = a real token):
/// `[B, 1, 1, T]` in `dtype`, 0 for real tokens and [`MASK_BIAS`] for padding.
pub fn attention_bias(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (batch, len) = mask.dims2()?;
    let keep = mask.ne(0u32)?.to_dtype(dtype)?;
    keep.affine(-MASK_BIAS, MASK_BIAS)?
        .reshape((batch, 1, 1, len))
}

/// `Err` unless a `width`-wide qkv row splits into q, k and v of `heads` heads.
fn check_heads(width: usize, heads: usize) -> Result<()> {
    if heads == 0 || width == 0 || !width.is_multiple_of(3 * heads) {
        bail!(
            "{OP}: the last dimension of qkv ({width}) must be 3·heads·head_size \
             with {heads} heads and head_size >= 1"
        );
    }
    Ok(())
}

fn check_inputs(
    qkv: &Tensor,
    key_mask: &Tensor,
    heads: usize,
    dropout: Option<&Tensor>,
) -> Result<()> {
    let (batch, len, width) = match qkv.dims() {
        [b, t, w] => (*b, *t, *w),
        dims => bail!("{OP}: qkv must have rank 3 [B, T, 3H], got shape {dims:?}"),
    };
    check_heads(width, heads)?;
    crate::ops::dtype::with_float_dtype!(OP, "qkv", qkv.dtype(), _T => Ok(()))?;
    if key_mask.dims() != [batch, len] {
        bail!(
            "{OP}: key_mask must have shape [{batch}, {len}] (qkv is {:?}), got {:?}",
            qkv.dims(),
            key_mask.dims()
        );
    }
    check_same_device(OP, ("qkv", qkv), ("key_mask", key_mask))?;
    if let Some(drop) = dropout {
        let want = [batch, heads, len, len];
        if drop.dims() != want {
            bail!(
                "{OP}: dropout must have shape {want:?} [B, heads, T, T], got {:?}",
                drop.dims()
            );
        }
        check_same_dtype(OP, ("dropout", drop), ("qkv", qkv))?;
        check_same_device(OP, ("qkv", qkv), ("dropout", drop))?;
    }
    Ok(())
}

/// The float types of the fused path: gemm's, with an `exp` that flushes
/// results below the smallest normal f32 to 0 (see [`exp_f32`]).
trait AttnFloat: GemmFloat {
    fn exp_flushed(self) -> Self;
}

impl AttnFloat for f32 {
    #[inline(always)]
    fn exp_flushed(self) -> Self {
        exp_f32(self)
    }
}

impl AttnFloat for f64 {
    #[inline(always)]
    fn exp_flushed(self) -> Self {
        self.exp()
    }
}

/// The head layout of one attention problem.
#[derive(Debug, Clone, Copy)]
struct Dims {
    heads: usize,
    head_size: usize,
}

impl Dims {
    fn of(qkv: &Layout, heads: usize) -> Self {
        let width = *qkv.dims().last().unwrap_or(&0);
        Self {
            heads,
            head_size: width / 3 / heads.max(1),
        }
    }

    fn hidden(&self) -> usize {
        self.heads * self.head_size
    }
}

/// How the sentences lie in the rows of `qkv`.
#[derive(Debug, Clone)]
enum Packing {
    /// `[B, T, 3H]`: every sentence `T` rows, its padding marked by a `[B, T]`
    /// mask (an input of the op).
    Padded { batch: usize, len: usize },
    /// `[N, 3H]`: the sentences' real tokens only, one after the other, of
    /// these lengths.
    Packed(Vec<usize>),
}

/// One sentence, as the kernels see it.
struct Sentence<'a, F> {
    /// Its `rows × 3H` block of `qkv`, which starts at row `first_row` (its
    /// output rows start there too).
    qkv: &'a [F],
    first_row: usize,
    rows: usize,
    /// Keys `0..keys` can have non-zero weight (the rest are padding).
    keys: usize,
    /// 0 for a real key, -inf for padding (`keys` entries).
    key_bias: Vec<F>,
    /// Some key before `keys` is padding (`key_bias` is not all 0).
    has_padding: bool,
    /// Where its dropout multiplier `[heads, rows, drop_stride]` starts.
    drop_at: usize,
    drop_stride: usize,
}

impl<'a, F: AttnFloat> Sentence<'a, F> {
    /// The sentences of `qkv` laid out as `packing` (`mask` for padded input).
    fn split(
        packing: &Packing,
        dims: Dims,
        qkv: &'a [F],
        mask: Option<&[u8]>,
    ) -> Result<Vec<Self>> {
        let width = 3 * dims.hidden();
        match packing {
            Packing::Padded { batch, len } => {
                let (batch, len) = (*batch, *len);
                let Some(mask) = mask else {
                    bail!("{OP}: internal error, padded input without a mask");
                };
                Ok((0..batch)
                    .map(|b| {
                        let row = &mask[b * len..(b + 1) * len];
                        // No real token: attend to every position (see the module docs).
                        let keys = row.iter().rposition(|&m| m != 0).map_or(len, |l| l + 1);
                        let all_padding = !row.contains(&1);
                        let key_bias: Vec<F> = row[..keys]
                            .iter()
                            .map(|&m| {
                                if m != 0 || all_padding {
                                    F::zero()
                                } else {
                                    F::neg_infinity()
                                }
                            })
                            .collect();
                        Self {
                            qkv: &qkv[b * len * width..(b + 1) * len * width],
                            first_row: b * len,
                            rows: len,
                            keys,
                            has_padding: key_bias.iter().any(|v| v.is_infinite()),
                            key_bias,
                            drop_at: b * dims.heads * len * len,
                            drop_stride: len,
                        }
                    })
                    .collect())
            }
            Packing::Packed(lengths) => {
                let (mut row, mut drop_at) = (0, 0);
                Ok(lengths
                    .iter()
                    .map(|&len| {
                        let s = Self {
                            qkv: &qkv[row * width..(row + len) * width],
                            first_row: row,
                            rows: len,
                            keys: len,
                            key_bias: vec![F::zero(); len],
                            has_padding: false,
                            drop_at,
                            drop_stride: len,
                        };
                        row += len;
                        drop_at += dims.heads * len * len;
                        s
                    })
                    .collect())
            }
        }
    }

    /// The dropout multiplier of head `h`, `[rows, drop_stride]`.
    fn dropout<'d>(&self, drop: &'d [F], h: usize) -> &'d [F] {
        let size = self.rows * self.drop_stride;
        &drop[self.drop_at + h * size..self.drop_at + (h + 1) * size]
    }
}

/// A raw output pointer shared by the tasks, which write disjoint elements.
#[derive(Clone, Copy)]
struct SharedOut<F>(*mut F);
// SAFETY: every task writes only its own head's columns of its own sentence.
unsafe impl<F> Send for SharedOut<F> {}
unsafe impl<F> Sync for SharedOut<F> {}

impl<F> SharedOut<F> {
    /// The element `offset` past the start.
    ///
    /// # Safety
    /// `offset` must lie inside the buffer.
    unsafe fn at(&self, offset: usize) -> *mut F {
        // SAFETY: the caller's contract.
        unsafe { self.0.add(offset) }
    }
}

/// `dst[m×n] = alpha · lhs[m×k] · rhs[k×n]`, each matrix given as (pointer,
/// row stride, column stride); single-threaded: the tasks are the parallelism.
///
/// # Safety
/// As [`Gemm::run`].
unsafe fn matmul<F: AttnFloat>(
    dims: (usize, usize, usize),
    dst: (*mut F, usize, usize),
    lhs: (*const F, usize, usize),
    rhs: (*const F, usize, usize),
    alpha: F,
) {
    // SAFETY: the caller's contract.
    unsafe { Gemm::new(alpha).run(dims, mat(dst), mat(lhs), mat(rhs)) }
}

fn mat<P>((ptr, row_stride, col_stride): (P, usize, usize)) -> Mat<P> {
    Mat {
        ptr,
        row_stride,
        col_stride,
    }
}

/// The attention weights of head `h` of `s` into `probs` (`[rows, keys]`,
/// before dropout): scaled scores, masked, softmax per row.
fn weights<F: AttnFloat>(dims: Dims, s: &Sentence<F>, h: usize, probs: &mut [F]) {
    let (keys, width) = (s.keys, 3 * dims.hidden());
    let scale = F::from(dims.head_size).unwrap().sqrt().recip();
    let q = s.qkv[h * dims.head_size..].as_ptr();
    let k = s.qkv[dims.hidden() + h * dims.head_size..].as_ptr();
    // SAFETY: q and k rows are `width` apart within the sentence's block (the
    // last row's head slice ends inside it); probs holds rows × keys.
    unsafe {
        matmul(
            (s.rows, keys, dims.head_size),
            (probs.as_mut_ptr(), keys, 1),
            (q, width, 1),
            (k, 1, width),
            scale,
        )
    };
    for row in probs.chunks_exact_mut(keys) {
        if s.has_padding {
            row.iter_mut().zip(&s.key_bias).for_each(|(v, &b)| *v += b);
        }
        // A NaN score is skipped by the maximum but poisons the sum, and so the row.
        let max = lane_fold(row, F::neg_infinity(), |m, v| if v > m { v } else { m });
        row.iter_mut().for_each(|v| *v = (*v - max).exp_flushed());
        let inv = lane_fold(row, F::zero(), |a, v| a + v).recip();
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

/// Folds `v` with `f` in 16 independent lanes, then folds the lanes: a
/// reduction the compiler can vectorise (a single running value cannot be,
/// float operations not being associative). `f` must be associative and
/// commutative up to rounding, with `init` its identity.
#[inline(always)]
fn lane_fold<F: AttnFloat>(v: &[F], init: F, f: impl Fn(F, F) -> F) -> F {
    const LANES: usize = 16;
    let mut lanes = [init; LANES];
    let chunks = v.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (l, &x) in lanes.iter_mut().zip(chunk) {
            *l = f(*l, x);
        }
    }
    let tail = rest.iter().fold(init, |a, &x| f(a, x));
    lanes.iter().fold(tail, |a, &l| f(a, l))
}

/// `Σ a·b` in 16 lanes (see [`lane_fold`]).
#[inline(always)]
fn lane_dot<F: AttnFloat>(a: &[F], b: &[F]) -> F {
    const LANES: usize = 16;
    let mut lanes = [F::zero(); LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .fold(F::zero(), |acc, (&x, &y)| acc + x * y);
    for (xa, xb) in ca.zip(cb) {
        for ((l, &x), &y) in lanes.iter_mut().zip(xa).zip(xb) {
            *l += x * y;
        }
    }
    lanes.iter().fold(tail, |acc, &l| acc + l)
}

/// `probs[i][j] *= drop[i][j]` for the `[rows, keys]` block of a
/// `[rows, stride]` multiplier.
fn apply_dropout<F: AttnFloat>(probs: &mut [F], drop: &[F], stride: usize, keys: usize) {
    for (row, drow) in probs.chunks_exact_mut(keys).zip(drop.chunks_exact(stride)) {
        row.iter_mut().zip(drow).for_each(|(p, &d)| *p *= d);
    }
}

/// The CPU slice of an optional dropout multiplier.
fn with_dropout<F: AttnFloat, R>(
    drop: Option<&Tensor>,
    body: impl FnOnce(Option<&[F]>) -> Result<R>,
) -> Result<R> {
    let Some(drop) = drop else {
        return body(None);
    };
    let (storage, layout) = drop.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("{OP}: dropout must be on the CPU with qkv");
    };
    body(Some(contiguous_slice::<F>(OP, cpu, layout)?))
}

/// The context rows `[total_rows, H]` of all sentences, one task per
/// (sentence, head).
fn forward_cpu<F: AttnFloat>(
    dims: Dims,
    sentences: &[Sentence<F>],
    total_rows: usize,
    drop: Option<&[F]>,
) -> Vec<F> {
    let (hidden, hs) = (dims.hidden(), dims.head_size);
    // SAFETY: the sentences' rows cover all rows, and every (sentence, head)
    // task writes its rows × head_size block below.
    let mut out = unsafe { output_buffer::<F>(total_rows * hidden) };
    let shared = SharedOut(out.as_mut_ptr());
    (0..sentences.len() * dims.heads)
        .into_par_iter()
        .for_each_init(Vec::new, |probs, task| {
            let (s, h) = (&sentences[task / dims.heads], task % dims.heads);
            if s.rows == 0 {
                return;
            }
            probs.resize(s.rows * s.keys, F::zero());
            weights(dims, s, h, probs);
            if let Some(drop) = drop {
                apply_dropout(probs, s.dropout(drop, h), s.drop_stride, s.keys);
            }
            let v = s.qkv[2 * hidden + h * hs..].as_ptr();
            // SAFETY: the block [first_row.., h·hs..(h+1)·hs] of `out` is this
            // task's alone; v's rows are 3H apart inside the sentence's block.
            unsafe {
                let dst = shared.at(s.first_row * hidden + h * hs);
                matmul(
                    (s.rows, hs, s.keys),
                    (dst, hidden, 1),
                    (probs.as_ptr(), s.keys, 1),
                    (v, 3 * hidden, 1),
                    F::one(),
                )
            };
        });
    out
}

/// Scratch buffers of one backward task.
struct BackwardScratch<F> {
    probs: Vec<F>,
    dropped: Vec<F>,
    grad: Vec<F>,
}

impl<F> BackwardScratch<F> {
    fn new() -> Self {
        Self {
            probs: Vec::new(),
            dropped: Vec::new(),
            grad: Vec::new(),
        }
    }
}

/// `d qkv` `[total_rows, 3H]` for the incoming `dout` `[total_rows, H]`.
fn backward_cpu<F: AttnFloat>(
    dims: Dims,
    sentences: &[Sentence<F>],
    total_rows: usize,
    drop: Option<&[F]>,
    dout: &[F],
) -> Vec<F> {
    let (hidden, hs) = (dims.hidden(), dims.head_size);
    let width = 3 * hidden;
    // Zeroed: the rows of dk and dv past a sentence's last real key stay 0.
    let mut dqkv = vec![F::zero(); total_rows * width];
    let shared = SharedOut(dqkv.as_mut_ptr());
    let scale = F::from(hs).unwrap().sqrt().recip();
    (0..sentences.len() * dims.heads)
        .into_par_iter()
        .for_each_init(BackwardScratch::new, |scratch, task| {
            let (s, h) = (&sentences[task / dims.heads], task % dims.heads);
            let (rows, keys) = (s.rows, s.keys);
            if rows == 0 {
                return;
            }
            let BackwardScratch {
                probs,
                dropped,
                grad,
            } = scratch;
            probs.resize(rows * keys, F::zero());
            grad.resize(rows * keys, F::zero());
            weights(dims, s, h, probs);
            let drop = drop.map(|d| s.dropout(d, h));
            // The weights the forward multiplied v by.
            let used: &[F] = match drop {
                Some(d) => {
                    dropped.clear();
                    dropped.extend_from_slice(probs);
                    apply_dropout(dropped, d, s.drop_stride, keys);
                    dropped
                }
                None => probs,
            };
            let q = s.qkv[h * hs..].as_ptr();
            let k = s.qkv[hidden + h * hs..].as_ptr();
            let v = s.qkv[2 * hidden + h * hs..].as_ptr();
            let dy = dout[s.first_row * hidden + h * hs..].as_ptr();
            let base = s.first_row * width + h * hs;
            // SAFETY (all products): every source is a strided block inside its
            // slice as in the forward; the destination blocks [the sentence's
            // rows, h's columns of q, k or v] of `dqkv` belong to this task alone.
            unsafe {
                // dv = usedᵀ · dy   ([keys, hs])
                matmul(
                    (keys, hs, rows),
                    (shared.at(base + 2 * hidden), width, 1),
                    (used.as_ptr(), 1, keys),
                    (dy, hidden, 1),
                    F::one(),
                );
                // d(used) = dy · vᵀ   ([rows, keys])
                matmul(
                    (rows, keys, hs),
                    (grad.as_mut_ptr(), keys, 1),
                    (dy, hidden, 1),
                    (v, 1, width),
                    F::one(),
                );
            }
            if let Some(d) = drop {
                apply_dropout(grad, d, s.drop_stride, keys);
            }
            // Softmax backward in place: d(scores) = p · (dp − Σ dp·p).
            for (g, p) in grad.chunks_exact_mut(keys).zip(probs.chunks_exact(keys)) {
                let dot = lane_dot(g, p);
                g.iter_mut()
                    .zip(p)
                    .for_each(|(gv, &pv)| *gv = pv * (*gv - dot));
            }
            unsafe {
                // dq = scale · d(scores) · k   ([rows, hs])
                matmul(
                    (rows, hs, keys),
                    (shared.at(base), width, 1),
                    (grad.as_ptr(), keys, 1),
                    (k, width, 1),
                    scale,
                );
                // dk = scale · d(scores)ᵀ · q   ([keys, hs])
                matmul(
                    (keys, hs, rows),
                    (shared.at(base + hidden), width, 1),
                    (grad.as_ptr(), 1, keys),
                    (q, width, 1),
                    scale,
                );
            }
        });
    dqkv
}

/// The fused forward; holds the dropout multiplier, which needs no gradient.
/// A `CustomOp2` (qkv, mask) for padded input, a `CustomOp1` for packed.
struct Attention {
    heads: usize,
    packing: Packing,
    dropout: Option<Tensor>,
}

/// `(qkv, [mask,] d out) -> d qkv`.
struct AttentionBackward {
    heads: usize,
    packing: Packing,
    dropout: Option<Tensor>,
}

impl Attention {
    fn cpu(&self, s: &CpuStorage, l: &Layout, mask: Option<&[u8]>) -> Result<(CpuStorage, Shape)> {
        let dims = Dims::of(l, self.heads);
        let rows = l.shape().elem_count() / (3 * dims.hidden()).max(1);
        let mut out_dims = l.dims().to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = dims.hidden();
        }
        with_gemm_dtype!(OP, "qkv", s.dtype(), F => {
            let qkv = contiguous_slice::<F>(OP, s, l)?;
            let sentences = Sentence::split(&self.packing, dims, qkv, mask)?;
            let out = with_dropout::<F, _>(self.dropout.as_ref(), |drop| {
                Ok(forward_cpu(dims, &sentences, rows, drop))
            })?;
            Ok((<F as candle_core::WithDType>::to_cpu_storage_owned(out), Shape::from(out_dims)))
        })
    }

    fn backward(&self) -> AttentionBackward {
        AttentionBackward {
            heads: self.heads,
            packing: self.packing.clone(),
            dropout: self.dropout.clone(),
        }
    }
}

impl AttentionBackward {
    fn cpu(
        &self,
        (s, l): (&CpuStorage, &Layout),
        mask: Option<&[u8]>,
        (gs, gl): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let dims = Dims::of(l, self.heads);
        let rows = l.shape().elem_count() / (3 * dims.hidden()).max(1);
        with_gemm_dtype!(OP, "qkv", s.dtype(), F => {
            let qkv = contiguous_slice::<F>(OP, s, l)?;
            let dout = contiguous_slice::<F>(OP, gs, gl)?;
            let sentences = Sentence::split(&self.packing, dims, qkv, mask)?;
            let dqkv = with_dropout::<F, _>(self.dropout.as_ref(), |drop| {
                Ok(backward_cpu(dims, &sentences, rows, drop, dout))
            })?;
            Ok((<F as candle_core::WithDType>::to_cpu_storage_owned(dqkv), l.shape().clone()))
        })
    }
}

impl CustomOp2 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu(s, l, Some(contiguous_slice::<u8>(OP, ms, ml)?))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        mask: &Tensor,
        _out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dqkv = qkv.apply_op3(mask, &dout.contiguous()?, self.backward())?;
        Ok((Some(dqkv), None))
    }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "attention-packed"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu(s, l, None)
    }

    fn bwd(&self, qkv: &Tensor, _out: &Tensor, dout: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(qkv.apply_op2(&dout.contiguous()?, self.backward())?))
    }
}

impl CustomOp3 for AttentionBackward {
    fn name(&self) -> &'static str {
        "attention-backward"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let mask = contiguous_slice::<u8>(OP, ms, ml)?;
        self.cpu((s, l), Some(mask), (gs, gl))
    }
}

impl CustomOp2 for AttentionBackward {
    fn name(&self) -> &'static str {
        "attention-packed-backward"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu((s, l), None, (gs, gl))
    }
}
