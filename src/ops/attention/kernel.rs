//! The kernel path of [`super::attention_packed`]: the CustomOps that run
//! `kernels/attention.cu` on a CUDA device, or on the host harness for CPU
//! tensors inside [`crate::ops::host::run`].
//!
//! The forward saves the per-row log-sum-exp of the scores (`[heads, N]`, in
//! the device's storage) for its backward, which then recomputes the weights
//! from `q`, `k` and that statistic instead of a second softmax pass. The
//! sentence table (offsets and key counts) lives on the device as a small i64
//! tensor held by the ops.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::cuda::{self, KernelDropout, Problem};
use super::OP;
use crate::ops::layout::View;

/// The forward's log-sum-exp, kept for the backward.
enum Saved {
    #[cfg(feature = "cuda")]
    Cuda(candle_core::CudaStorage),
    #[cfg(feature = "host-kernels")]
    Host(CpuStorage),
}

/// What the forward and backward ops share.
#[derive(Clone)]
struct Shared {
    heads: usize,
    /// `[2S + 1]` i64, on qkv's device: the `S + 1` prefix sums of the
    /// lengths, then each sentence's key count (the kernels' `offsets`).
    offsets: Tensor,
    sentences: usize,
    max_len: usize,
    dropout: KernelDropout,
    lse: Arc<Mutex<Option<Saved>>>,
}

impl Shared {
    /// The kernels' view of a qkv of `dtype` and layout `l`.
    fn problem(&self, dtype: DType, l: &Layout) -> Result<Problem> {
        let v = View::<2>::new(OP, "qkv", l)?;
        let [rows, width] = v.dims;
        if !v.rows_contiguous() {
            bail!("{OP}: the kernels need qkv with unit column stride");
        }
        let hidden = width / 3;
        Ok(Problem {
            dtype,
            rows,
            heads: self.heads,
            head_dim: hidden / self.heads.max(1),
            sentences: self.sentences,
            max_len: self.max_len,
            row_stride: v.strides[0],
            offset: v.offset,
        })
    }

    fn saved(&self) -> MutexGuard<'_, Option<Saved>> {
        // A poisoned lock only means a panic elsewhere; the value is still whole.
        self.lse.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The forward: qkv `[N, 3H]` -> context `[N, H]`.
struct KernelAttention(Shared);

/// The backward: (qkv, out, d out) -> d qkv `[N, 3H]`.
struct KernelAttentionBackward(Shared);

/// Packed attention on the kernels: qkv `[N, 3H]` (any float dtype the kernels
/// take, unit column stride or it is copied), `lengths` summing to `N`
/// (checked by the caller); each sentence's tokens attend to its first
/// `keys[s]` tokens (`1 ≤ keys[s] ≤ lengths[s]` for a non-empty sentence;
/// `keys == lengths` is plain packed attention).
pub(super) fn attention_packed(
    qkv: &Tensor,
    lengths: &[usize],
    keys: &[usize],
    heads: usize,
    dropout: KernelDropout,
) -> Result<Tensor> {
    if keys.len() != lengths.len()
        || keys
            .iter()
            .zip(lengths)
            .any(|(&k, &len)| k > len || (k == 0 && len > 0))
    {
        bail!("{OP}: internal error, key counts {keys:?} for sentences of {lengths:?} tokens");
    }
    crate::ops::dtype::check_float_dtype(OP, "qkv", qkv.dtype())?;
    let head_dim = qkv.dim(1)? / 3 / heads;
    if !super::packed_kernel_supports(qkv.dtype(), head_dim) {
        bail!(
            "{OP}: the packed attention kernels take head sizes 32, 64 and 128 \
             (32 and 64 in f64), got {head_dim} in {:?}",
            qkv.dtype()
        );
    }
    let qkv = if qkv.stride()[1] == 1 {
        qkv.clone()
    } else {
        qkv.contiguous()?
    };
    let mut table = Vec::with_capacity(2 * lengths.len() + 1);
    let mut at = 0i64;
    table.push(at);
    for &len in lengths {
        at += len as i64;
        table.push(at);
    }
    table.extend(keys.iter().map(|&k| k as i64));
    let shared = Shared {
        heads,
        offsets: Tensor::from_vec(table, 2 * lengths.len() + 1, qkv.device())?,
        sentences: lengths.len(),
        max_len: lengths.iter().copied().max().unwrap_or(0),
        dropout,
        lse: Arc::new(Mutex::new(None)),
    };
    qkv.apply_op1(KernelAttention(shared))
}

/// `l`'s start offset, or an `Err` unless it is contiguous.
fn contiguous_offset(what: &str, l: &Layout) -> Result<usize> {
    if !l.is_contiguous() {
        bail!("{OP}: internal error, {what} is not contiguous");
    }
    Ok(l.start_offset())
}

impl CustomOp1 for KernelAttention {
    fn name(&self) -> &'static str {
        "attention-packed-kernel"
    }

    /// The host harness (the op is only built on the CPU under `host::run`).
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        #[cfg(feature = "host-kernels")]
        {
            use crate::ops::host::{HostBuffer, HostExecutor};
            let p = self.0.problem(s.dtype(), l)?;
            let (offsets, _) = self.0.offsets.storage_and_layout();
            let candle_core::Storage::Cpu(offsets) = &*offsets else {
                bail!("{OP}: the sentence offsets are not on the CPU with qkv");
            };
            let qkv = HostBuffer::upload(s)?;
            let offsets = HostBuffer::upload(offsets)?;
            let (out, lse) = cuda::forward(&HostExecutor, &qkv, &offsets, p, self.0.dropout)?;
            *self.0.saved() = Some(Saved::Host(lse.download()?));
            Ok((out.download()?, Shape::from((p.rows, p.hidden()))))
        }
        #[cfg(not(feature = "host-kernels"))]
        {
            let _ = (s, l);
            bail!("{OP}: the attention kernels run on the CPU only on the host harness")
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let p = self.0.problem(s.dtype(), l)?;
        let (offsets, _) = self.0.offsets.storage_and_layout();
        let candle_core::Storage::Cuda(offsets) = &*offsets else {
            bail!("{OP}: the sentence offsets are not on the CUDA device with qkv");
        };
        let exec = crate::ops::cuda::CudaExecutor::new(s.device());
        let (out, lse) = cuda::forward(&exec, s, offsets, p, self.0.dropout)?;
        *self.0.saved() = Some(Saved::Cuda(lse));
        Ok((out, Shape::from((p.rows, p.hidden()))))
    }

    fn bwd(&self, qkv: &Tensor, out: &Tensor, dout: &Tensor) -> Result<Option<Tensor>> {
        let backward = KernelAttentionBackward(self.0.clone());
        Ok(Some(qkv.apply_op3(out, &dout.contiguous()?, backward)?))
    }
}

impl CustomOp3 for KernelAttentionBackward {
    fn name(&self) -> &'static str {
        "attention-packed-kernel-backward"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        os: &CpuStorage,
        ol: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        #[cfg(feature = "host-kernels")]
        {
            let p = self.0.problem(s.dtype(), l)?;
            let (out_at, dout_at) = (
                contiguous_offset("out", ol)?,
                contiguous_offset("dout", gl)?,
            );
            let (offsets, _) = self.0.offsets.storage_and_layout();
            let candle_core::Storage::Cpu(offsets) = &*offsets else {
                bail!("{OP}: the sentence offsets are not on the CPU with qkv");
            };
            let saved = self.0.saved();
            let Some(Saved::Host(lse)) = &*saved else {
                bail!("{OP}: the backward found no statistics of a host-harness forward");
            };
            let dqkv = crate::ops::host::on_host(
                [s, offsets, os, gs, lse],
                |exec, [qkv, offsets, out, dout, lse]| {
                    let inputs = cuda::BackwardInputs {
                        qkv,
                        offsets,
                        out: (out, out_at),
                        dout: (dout, dout_at),
                        lse,
                    };
                    cuda::backward(exec, inputs, p, self.0.dropout)
                },
            )?;
            Ok((dqkv, l.shape().clone()))
        }
        #[cfg(not(feature = "host-kernels"))]
        {
            let _ = (s, l, os, ol, gs, gl);
            bail!("{OP}: the attention kernels run on the CPU only on the host harness")
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        os: &candle_core::CudaStorage,
        ol: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let p = self.0.problem(s.dtype(), l)?;
        let (out_at, dout_at) = (
            contiguous_offset("out", ol)?,
            contiguous_offset("dout", gl)?,
        );
        let (offsets, _) = self.0.offsets.storage_and_layout();
        let candle_core::Storage::Cuda(offsets) = &*offsets else {
            bail!("{OP}: the sentence offsets are not on the CUDA device with qkv");
        };
        let saved = self.0.saved();
        let Some(Saved::Cuda(lse)) = &*saved else {
            bail!("{OP}: the backward found no statistics of a CUDA forward");
        };
        let exec = crate::ops::cuda::CudaExecutor::new(s.device());
        let inputs = cuda::BackwardInputs {
            qkv: s,
            offsets,
            out: (os, out_at),
            dout: (gs, dout_at),
            lse,
        };
        let dqkv = cuda::backward(&exec, inputs, p, self.0.dropout)?;
        Ok((dqkv, l.shape().clone()))
    }
}
