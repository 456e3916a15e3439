//! Launch plans of `kernels/attention.cu` (packed multi-head attention,
//! forward and backward), and their run on an [`Executor`] (the CUDA device,
//! or the host harness in tests).
//!
//! Inputs: `qkv` `[N, 3H]` with unit column stride and any row stride and
//! offset (no copy), the sentence table `[2S + 1]` (i64: the prefix sums of
//! the lengths, then each sentence's key count). The forward writes the
//! context `[N, H]` and the log-sum-exp of every row's scores `[heads, N]`
//! (f32; f64 for f64), which the backward reads instead of recomputing the
//! softmax statistics.

use candle_core::{DType, Result};

use super::OP;
use crate::ops::launch::{self, as_i32, kernel_name, Alloc, Buffer, Executor, Launch};

const MODULE: &str = "attention";
/// Threads per block (4 warps); must match `BLOCK` in the kernel file.
const BLOCK: u32 = 128;
const WARPS: usize = 4;

/// Query rows per warp in the forward; must match `Rows::fwd` in the kernel.
fn fwd_rows(dtype: DType, head_dim: usize) -> usize {
    match (dtype, head_dim) {
        (DType::F64, 64) => 4,
        (DType::F64, _) => 8,
        (_, 128) => 4,
        _ => 8,
    }
}

/// Key (dK/dV) or query (dQ) rows per warp in the backward; must match
/// `Rows::bwd` in the kernel.
fn bwd_rows(dtype: DType, head_dim: usize) -> usize {
    match (dtype, head_dim) {
        (DType::F64, 64) => 2,
        (DType::F64, _) => 4,
        (_, 128) => 2,
        _ => 8,
    }
}

/// The dtype of the per-row statistics (log-sum-exp, rowsum(dO∘O)).
pub(super) fn stats_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// One packed attention problem, as the kernels see it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Problem {
    pub dtype: DType,
    /// Tokens `N`.
    pub rows: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// The sentences `S` and the longest one.
    pub sentences: usize,
    pub max_len: usize,
    /// qkv's row stride and start offset, in elements.
    pub row_stride: usize,
    pub offset: usize,
}

impl Problem {
    pub fn hidden(&self) -> usize {
        self.heads * self.head_dim
    }

    /// `Err` unless the kernels can take it.
    pub fn check(&self) -> Result<()> {
        if !super::packed_kernel_supports(self.dtype, self.head_dim) {
            candle_core::bail!(
                "{OP}: the CUDA kernels take head sizes 32, 64 and 128 (32 and 64 in f64), \
                 got {} in {:?}",
                self.head_dim,
                self.dtype
            );
        }
        if self.sentences > i32::MAX as usize || self.heads > 65535 {
            candle_core::bail!(
                "{OP}: too many sentences ({}) or heads ({}) for the CUDA kernels",
                self.sentences,
                self.heads
            );
        }
        // Token indices are `int` in the kernels and 32 bits of the dropout counter.
        as_i32(OP, "the number of tokens", self.rows)?;
        Ok(())
    }

    /// Grid: x = sentence, y = tile of `tile` rows, z = head.
    fn grid(&self, tile: usize) -> Result<(u32, u32, u32)> {
        let tiles = self.max_len.div_ceil(tile).max(1);
        if tiles > 65535 {
            candle_core::bail!("{OP}: sentences of {} tokens are too long", self.max_len);
        }
        Ok((self.sentences as u32, tiles as u32, self.heads as u32))
    }

    fn base(&self, kernel: &str) -> String {
        format!("attention_{kernel}_d{}", self.head_dim)
    }
}

/// The in-kernel dropout: `seed`, the 32-bit draw below which a weight is
/// dropped (0: no dropout) and the kept weights' scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct KernelDropout {
    pub seed: u64,
    pub threshold: u32,
    pub scale: f32,
}

impl KernelDropout {
    pub const NONE: Self = Self {
        seed: 0,
        threshold: 0,
        scale: 1.0,
    };

    fn push(&self, launch: Launch) -> Launch {
        launch
            .u64(self.seed)
            .u64(u64::from(self.threshold))
            .i32(self.scale.to_bits() as i32)
    }
}

/// Context `[N, H]` and log-sum-exp `[heads, N]`, from inputs (qkv, offsets).
pub(super) fn forward<E: Executor>(
    exec: &E,
    qkv: &E::Storage,
    offsets: &E::Storage,
    p: Problem,
    drop: KernelDropout,
) -> Result<(E::Storage, E::Storage)> {
    p.check()?;
    let allocs = [
        Alloc {
            dtype: p.dtype,
            len: p.rows * p.hidden(),
        },
        Alloc {
            dtype: stats_dtype(p.dtype),
            len: p.heads * p.rows,
        },
    ];
    let mut launches = Vec::new();
    if p.rows > 0 {
        let launch = Launch::new(
            MODULE,
            kernel_name(&p.base("fwd"), p.dtype)?,
            p.grid(WARPS * fwd_rows(p.dtype, p.head_dim))?,
            (BLOCK, 1, 1),
        )
        .ptr(Buffer::Input(0), p.offset)
        .i64(p.row_stride as i64)
        .ptr(Buffer::Input(1), 0)
        .ptr(Buffer::Output(0), 0)
        .ptr(Buffer::Output(1), 0)
        .i32(as_i32(OP, "N", p.rows)?);
        launches.push(drop.push(launch));
    }
    let mut outputs = launch::run(exec, &[qkv, offsets], &allocs, &launches)?;
    let lse = outputs.pop().expect("two outputs");
    let out = outputs.pop().expect("two outputs");
    Ok((out, lse))
}

/// The backward's inputs: `out` and `dout` are contiguous `[N, H]` from
/// element `out_offset` / `dout_offset` of their buffers.
pub(super) struct BackwardInputs<'a, S> {
    pub qkv: &'a S,
    pub offsets: &'a S,
    pub out: (&'a S, usize),
    pub dout: (&'a S, usize),
    pub lse: &'a S,
}

/// `d qkv` `[N, 3H]` (contiguous).
pub(super) fn backward<E: Executor>(
    exec: &E,
    inputs: BackwardInputs<'_, E::Storage>,
    p: Problem,
    drop: KernelDropout,
) -> Result<E::Storage> {
    p.check()?;
    let stats = stats_dtype(p.dtype);
    let allocs = [
        Alloc {
            dtype: p.dtype,
            len: p.rows * 3 * p.hidden(),
        },
        Alloc {
            dtype: stats,
            len: p.heads * p.rows,
        },
    ];
    let n = as_i32(OP, "N", p.rows)?;
    let mut launches = Vec::new();
    if p.rows > 0 {
        // Inputs: 0 qkv, 1 offsets, 2 out, 3 dout, 4 lse; outputs: 0 dqkv, 1 dd.
        let pairs = p.rows * p.heads;
        let dot_blocks = pairs.div_ceil(WARPS);
        if dot_blocks > i32::MAX as usize {
            candle_core::bail!("{OP}: {pairs} (token, head) pairs are too many");
        }
        launches.push(
            Launch::new(
                MODULE,
                kernel_name("attention_bwd_dot", p.dtype)?,
                (dot_blocks as u32, 1, 1),
                (BLOCK, 1, 1),
            )
            .ptr(Buffer::Input(2), inputs.out.1)
            .ptr(Buffer::Input(3), inputs.dout.1)
            .ptr(Buffer::Output(1), 0)
            .i32(n)
            .i32(as_i32(OP, "heads", p.heads)?)
            .i32(as_i32(OP, "head size", p.head_dim)?),
        );
        let grid = p.grid(WARPS * bwd_rows(p.dtype, p.head_dim))?;
        for kernel in ["bwd_dkdv", "bwd_dq"] {
            let launch = Launch::new(
                MODULE,
                kernel_name(&p.base(kernel), p.dtype)?,
                grid,
                (BLOCK, 1, 1),
            )
            .ptr(Buffer::Input(0), p.offset)
            .i64(p.row_stride as i64)
            .ptr(Buffer::Input(1), 0)
            .ptr(Buffer::Input(3), inputs.dout.1)
            .ptr(Buffer::Input(4), 0)
            .ptr(Buffer::Output(1), 0)
            .ptr(Buffer::Output(0), 0)
            .i32(n);
            launches.push(drop.push(launch));
        }
    }
    let buffers = [
        inputs.qkv,
        inputs.offsets,
        inputs.out.0,
        inputs.dout.0,
        inputs.lse,
    ];
    let mut outputs = launch::run(exec, &buffers, &allocs, &launches)?;
    Ok(outputs.swap_remove(0))
}
