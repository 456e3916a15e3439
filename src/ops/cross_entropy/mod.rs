//! Dual-head cross-entropy: the mean cross-entropy losses of two classification
//! heads over one batch, in one fused op (one pass over the rows, both heads).
//!
//! [`dual_head_cross_entropy`]`(logits_a [N,Ca], logits_b [N,Cb], labels [N,2])`
//! returns `[loss_a, loss_b]`, where column 0 of `labels` holds head A's class and
//! column 1 head B's, and for each head `h`
//!
//! ```text
//! loss_h = 1/n_h · Σ_{rows i labelled for h} ( logsumexp(logits_h[i,:]) − logits_h[i, y_h[i]] )
//! ```
//!
//! with `n_h` the number of rows labelled for `h`. A row whose label is the ignore
//! index is left out of that head's mean, so a batch can mix rows labelled only for
//! A with rows labelled only for B. A head with no labelled row has loss 0 and a
//! zero gradient (never NaN).
//!
//! The backward pass writes both logits' gradients in one fused pass:
//! `grad_h[i,:] = (softmax(logits_h[i,:]) − onehot(y_h[i])) · g[h] / n_h` for
//! labelled rows and 0 for ignored rows. Labels get no gradient.
//!
//! CPU: one pass over the rows (rayon over row chunks when the batch is large),
//! reading strided and offset logits and labels in place, in tiles of rows that
//! every row goes through alike, labelled or not: which rows a mixed batch
//! labels for a head is random, and a branch on it mispredicts half the time.
//! `exp` and `ln` are vectorised polynomials; heads of 2 to 8 classes get
//! fixed-size row loops. CUDA: see `kernels/cross_entropy.cu` and the launch
//! plans in `cuda.rs`; the forward also checks every label on the device and
//! leaves a small status record there. [`dual_head_cross_entropy`] reads it back
//! (one synchronisation), so an out-of-range label is an `Err` there too;
//! [`dual_head_cross_entropy_deferred`] leaves that read to the caller's next
//! synchronisation (a training step's loss read-back), and the backward takes
//! the labelled-row counts from the device.

use std::sync::{Arc, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use num_traits::Zero;
use rayon::prelude::*;

use super::buffer::output_buffer;
use super::dtype::{
    check_float_dtype, check_label_dtype, with_label_dtype, Accum, FloatElem, Label,
};
use super::layout::{check_rank, check_same_device, check_same_dtype, View};
use super::math::{exp_f32, ln_f32};
use crate::ops::dtype::with_float_dtype;

mod cpu;
#[cfg(any(feature = "cuda", feature = "host-kernels"))]
mod cuda;

use cpu::{forward_cpu, forward_with_grads_cpu, Labels, Logits};

const OP: &str = "dual_head_cross_entropy";

/// The label that leaves a row out of a head's loss, for signed label dtypes
/// (i64, i32, i16). Unsigned label dtypes have no -100: for u8 the ignore index is
/// 255 and for u32 it is `u32::MAX` (their maximum value).
pub const IGNORE_INDEX: i64 = -100;

/// The mean cross-entropy losses of two heads, `[loss_a, loss_b]` (shape `[2]`).
///
/// - `logits_a`: `[N, Ca]`, `logits_b`: `[N, Cb]`, raw scores of one float dtype
///   (f32, f16, bf16 or f64) on one device; any strides and offsets. `Ca, Cb >= 1`.
/// - `labels`: `[N, 2]` integer classes, column 0 for head A, column 1 for head B.
///   Dtypes: i64, i32, i16 (ignore index [`IGNORE_INDEX`] = -100), u32 (ignore
///   index `u32::MAX`) or u8 (ignore index 255).
///
/// The result has the logits' dtype; sums accumulate in f32 (f64 for f64) with a
/// numerically stable log-sum-exp (the row maximum is subtracted). A head with no
/// labelled row (including `N = 0`) gets loss 0 and zero gradient. Differentiable
/// with respect to both logits (one fused backward pass).
///
/// Errors (each message names the problem): logits or labels not of rank 2, a
/// different `N` in the three inputs, labels not `[N, 2]`, a head with 0 classes,
/// inputs on different devices, logits of different or non-float dtypes, float
/// labels, and a label outside `[0, C)` that is not the ignore index (the message
/// names the head, the row and the value).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use sentence_mtl::ops::{dual_head_cross_entropy, IGNORE_INDEX};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let logits_a = Tensor::new(&[[2.0f32, 0.0, -1.0, 0.5], [0.1, 0.2, 0.3, 0.4]], &dev)?;
/// let logits_b = Tensor::new(&[[1.0f32, -1.0, 0.0], [0.0, 3.0, 1.0]], &dev)?;
/// // Row 0 is labelled only for head A, row 1 only for head B.
/// let labels = Tensor::new(&[[0i64, IGNORE_INDEX], [IGNORE_INDEX, 1]], &dev)?;
/// let losses = dual_head_cross_entropy(&logits_a, &logits_b, &labels)?;
/// assert_eq!(losses.dims(), &[2]);
/// # Ok(()) }
/// ```
pub fn dual_head_cross_entropy(
    logits_a: &Tensor,
    logits_b: &Tensor,
    labels: &Tensor,
) -> Result<Tensor> {
    let (losses, labels_checked) = dual_head_cross_entropy_deferred(logits_a, logits_b, labels)?;
    labels_checked.verify()?;
    Ok(losses)
}

/// [`dual_head_cross_entropy`] without waiting for the label check on a GPU:
/// the losses, and the [`LabelCheck`] to [verify](LabelCheck::verify) once the
/// step synchronises anyway (when its loss is read back). Until then an
/// out-of-range label shows only as NaN losses. On the CPU the labels are
/// checked before this returns (an `Err`), as by [`dual_head_cross_entropy`].
pub fn dual_head_cross_entropy_deferred(
    logits_a: &Tensor,
    logits_b: &Tensor,
    labels: &Tensor,
) -> Result<(Tensor, LabelCheck)> {
    check_rank(OP, "logits_a", logits_a, 2, "[N,Ca]")?;
    check_rank(OP, "logits_b", logits_b, 2, "[N,Cb]")?;
    check_rank(OP, "labels", labels, 2, "[N,2]")?;
    Dims::of(logits_a.dims(), logits_b.dims(), labels.dims())?;
    check_same_device(OP, ("logits_a", logits_a), ("logits_b", logits_b))?;
    check_same_device(OP, ("logits_a", logits_a), ("labels", labels))?;
    check_same_dtype(OP, ("logits_a", logits_a), ("logits_b", logits_b))?;
    check_float_dtype(OP, "logits", logits_a.dtype())?;
    check_label_dtype(labels.dtype())?;
    let state = Arc::new(ForwardState::default());
    let op = DualCrossEntropy {
        keep_grads: logits_a.track_op() || logits_b.track_op(),
        state: state.clone(),
        cpu_grads: OnceLock::new(),
    };
    let losses = logits_a.apply_op3(logits_b, labels, op)?;
    Ok((losses, LabelCheck { state }))
}

/// The label check of one [`dual_head_cross_entropy_deferred`] call.
pub struct LabelCheck {
    state: Arc<ForwardState>,
}

impl LabelCheck {
    /// `Err` naming the first out-of-range label (head, row, value), if the
    /// forward found one. On a GPU this reads 32 bytes back: a synchronisation.
    pub fn verify(&self) -> Result<()> {
        match self.state.device.get() {
            None => Ok(()),
            Some(status) => match status.label_error()? {
                Some(error) => Err(error),
                None => Ok(()),
            },
        }
    }
}

/// What the forward leaves for the backward and for [`LabelCheck`].
#[derive(Default)]
struct ForwardState {
    /// CPU path: the per-head labelled-row counts (its labels are checked).
    labelled_rows: OnceLock<[usize; 2]>,
    /// Kernel path: the status record, still on the device.
    device: OnceLock<DeviceStatus>,
}

/// The kernels' status record where it lives, with what reading it needs.
/// (Without a kernel path, `cuda` or `host-kernels`, none is ever made.)
#[cfg_attr(not(any(feature = "cuda", feature = "host-kernels")), allow(dead_code))]
struct DeviceStatus {
    status: StatusBuffer,
    classes: [usize; 2],
    ignore: i64,
}

enum StatusBuffer {
    #[cfg(feature = "cuda")]
    Cuda(candle_core::CudaStorage),
    #[cfg(feature = "host-kernels")]
    Host(super::host::HostBuffer),
}

impl DeviceStatus {
    #[cfg_attr(
        not(any(feature = "cuda", feature = "host-kernels")),
        allow(unused_variables)
    )]
    fn label_error(&self) -> Result<Option<candle_core::Error>> {
        match self.status {
            #[cfg(feature = "cuda")]
            StatusBuffer::Cuda(ref s) => {
                let exec = super::cuda::CudaExecutor::new(s.device());
                cuda::label_error(&exec, s, self.classes, self.ignore)
            }
            #[cfg(feature = "host-kernels")]
            StatusBuffer::Host(ref s) => {
                cuda::label_error(&super::host::HostExecutor, s, self.classes, self.ignore)
            }
        }
    }
}

/// The same losses as [`dual_head_cross_entropy`], composed from candle's tensor
/// ops (log-softmax, gather, masks): several kernels and temporaries per head.
/// Kept as the cross-check and the benchmark baseline. `labels` must be i64 with
/// [`IGNORE_INDEX`] for unlabelled entries; labels are not range-checked.
pub fn dual_head_cross_entropy_composed(
    logits_a: &Tensor,
    logits_b: &Tensor,
    labels: &Tensor,
) -> Result<Tensor> {
    let head_loss = |logits: &Tensor, column: usize| -> Result<Tensor> {
        let labels = labels.narrow(1, column, 1)?;
        let labelled = labels.ne(IGNORE_INDEX)?;
        let safe_labels = labelled.where_cond(&labels, &labels.zeros_like()?)?;
        let log_probs = candle_nn::ops::log_softmax(logits, 1)?;
        let picked = log_probs.gather(&safe_labels, 1)?;
        let weights = labelled.to_dtype(logits.dtype())?;
        let count = weights.sum_all()?.maximum(1.0)?;
        (picked * weights)?.sum_all()?.neg()?.div(&count)
    };
    Tensor::stack(&[head_loss(logits_a, 0)?, head_loss(logits_b, 1)?], 0)
}

// ---------------------------------------------------------------------------
// Shapes, dtypes and labels
// ---------------------------------------------------------------------------

/// The problem size: `n` rows, `classes[h]` classes for head `h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dims {
    n: usize,
    classes: [usize; 2],
}

impl Dims {
    /// Checks the three shapes (ranks already checked) against each other.
    fn of(a: &[usize], b: &[usize], labels: &[usize]) -> Result<Self> {
        let (n, ca, cb) = (a[0], a[1], b[1]);
        if labels[1] != 2 {
            candle_core::bail!(
                "{OP}: labels must have shape [N,2] (one column per head), got {labels:?}"
            );
        }
        if b[0] != n || labels[0] != n {
            candle_core::bail!(
                "{OP}: batch size mismatch: logits_a has N={n}, logits_b has N={}, labels has N={}",
                b[0],
                labels[0]
            );
        }
        for (what, c) in [("logits_a", ca), ("logits_b", cb)] {
            if c == 0 {
                candle_core::bail!("{OP}: {what} has 0 classes; each head needs at least one");
            }
        }
        Ok(Self {
            n,
            classes: [ca, cb],
        })
    }

    /// The views of the three inputs (rank-checked) and the checked sizes.
    fn views(la: &Layout, lb: &Layout, ll: &Layout) -> Result<(Self, [View<2>; 2], View<2>)> {
        let a = View::<2>::new(OP, "logits_a", la)?;
        let b = View::<2>::new(OP, "logits_b", lb)?;
        let labels = View::<2>::new(OP, "labels", ll)?;
        Ok((Self::of(&a.dims, &b.dims, &labels.dims)?, [a, b], labels))
    }
}

const HEAD_NAMES: [&str; 2] = [
    "A (logits_a, labels column 0)",
    "B (logits_b, labels column 1)",
];

/// The error for a label that is neither a class of its head nor the ignore index.
fn label_out_of_range(
    head: usize,
    row: usize,
    value: i64,
    classes: usize,
    ignore: i64,
) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{OP}: label out of range for head {} at row {row}: {value} \
         (expected a class in [0, {classes}) or the ignore index {ignore})",
        HEAD_NAMES[head]
    ))
}

/// The class of `label` for a head with `classes` classes: `Ok(None)` when it is
/// the ignore index, `Err(value)` when out of range.
#[inline(always)]
fn decode<L: Label>(label: L, classes: usize) -> std::result::Result<Option<usize>, i64> {
    if label == L::IGNORE {
        return Ok(None);
    }
    let value = label.to_i64();
    if value >= 0 && (value as u64) < classes as u64 {
        Ok(Some(value as usize))
    } else {
        Err(value)
    }
}

// ---------------------------------------------------------------------------
// The custom ops
// ---------------------------------------------------------------------------

/// Forward op: `(logits_a, logits_b, labels) -> [2]`. The forward records the
/// per-head counts of labelled rows (on the kernel path, in the status record on
/// the device), so that the backward is one pass with no reduction of its own.
///
/// On the CPU, when a gradient may be wanted (`keep_grads`), the forward also
/// writes `softmax − onehot` of every labelled row while the exponentials are
/// at hand (in the accumulator dtype, so that scaling rounds once); the
/// backward then only scales it by `g[h] / n_h`.
struct DualCrossEntropy {
    keep_grads: bool,
    state: Arc<ForwardState>,
    cpu_grads: OnceLock<Tensor>,
}

/// Backward op: `(logits_a, logits_b, labels) -> [N·Ca + N·Cb]`, both gradients
/// in one buffer (head A's rows, then head B's), split by [`split_grads`].
/// CustomOp3 has room for three inputs, so the incoming gradient `g` (`[2]`,
/// contiguous) rides in the struct.
struct DualCrossEntropyBackward {
    state: Arc<ForwardState>,
    grad_losses: Tensor,
}

impl CustomOp3 for DualCrossEntropy {
    fn name(&self) -> &'static str {
        "dual-head-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
        sl: &CpuStorage,
        ll: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (dims, logits, labels) = Dims::views(la, lb, ll)?;
        check_same_storage_dtype(sa.dtype(), sb.dtype())?;
        #[cfg(feature = "host-kernels")]
        if super::host::enabled() {
            check_float_dtype(OP, "logits", sa.dtype())?;
            let ignore = ignore_index(sl.dtype())?;
            let exec = super::host::HostExecutor;
            let [a, b, l] = [sa, sb, sl].map(super::host::HostBuffer::upload);
            let (a, b, l) = (a?, b?, l?);
            let (losses, status) = cuda::forward(
                &exec,
                dims,
                [(&a, logits[0]), (&b, logits[1])],
                (&l, labels),
                ignore,
            )?;
            self.keep_status(StatusBuffer::Host(status), dims, ignore);
            return Ok((losses.download()?, Shape::from_dims(&[2])));
        }
        let (losses, counts) = with_float_dtype!(OP, "logits", sa.dtype(), T => {
            with_label_dtype!(sl.dtype(), L => {
                let logits = [Logits::<T>::new(sa, logits[0])?, Logits::<T>::new(sb, logits[1])?];
                let labels = Labels::<L>::new(sl, labels)?;
                if self.keep_grads {
                    let (losses, counts, grads) = forward_with_grads_cpu(dims, &logits, &labels)?;
                    let grads = Tensor::from_vec(grads, grad_len(dims), &candle_core::Device::Cpu)?;
                    let _ = self.cpu_grads.set(grads);
                    Ok((T::to_cpu_storage(&losses), counts))
                } else {
                    forward_cpu(dims, &logits, &labels).map(|(losses, counts)| {
                        (T::to_cpu_storage(&losses), counts)
                    })
                }
            })
        })?;
        let _ = self.state.labelled_rows.set(counts);
        Ok((losses, Shape::from_dims(&[2])))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sa: &candle_core::CudaStorage,
        la: &Layout,
        sb: &candle_core::CudaStorage,
        lb: &Layout,
        sl: &candle_core::CudaStorage,
        ll: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (dims, logits, labels) = Dims::views(la, lb, ll)?;
        check_same_storage_dtype(sa.dtype(), sb.dtype())?;
        check_float_dtype(OP, "logits", sa.dtype())?;
        let ignore = ignore_index(sl.dtype())?;
        let exec = super::cuda::CudaExecutor::new(sa.device());
        let (losses, status) = cuda::forward(
            &exec,
            dims,
            [(sa, logits[0]), (sb, logits[1])],
            (sl, labels),
            ignore,
        )?;
        self.keep_status(StatusBuffer::Cuda(status), dims, ignore);
        Ok((losses, Shape::from_dims(&[2])))
    }

    fn bwd(
        &self,
        logits_a: &Tensor,
        logits_b: &Tensor,
        labels: &Tensor,
        _losses: &Tensor,
        grad_losses: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if let Some(unscaled) = self.cpu_grads.get() {
            let Some(&labelled_rows) = self.state.labelled_rows.get() else {
                candle_core::bail!("{OP}: backward called before the forward pass ran");
            };
            let g = grad_losses.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            let scales = head_scales([g[0], g[1]], labelled_rows);
            let grads = with_float_dtype!(OP, "logits", logits_a.dtype(), T => {
                scale_kept_grads::<T>(unscaled, scales, logits_a.dim(0)? * logits_a.dim(1)?)
            })?;
            let (grad_a, grad_b) = split_grads(&grads, logits_a.dims(), logits_b.dims())?;
            return Ok((Some(grad_a), Some(grad_b), None));
        }
        let backward = DualCrossEntropyBackward {
            state: self.state.clone(),
            grad_losses: grad_losses.contiguous()?,
        };
        let grads = logits_a.apply_op3(logits_b, labels, backward)?;
        let (grad_a, grad_b) = split_grads(&grads, logits_a.dims(), logits_b.dims())?;
        Ok((Some(grad_a), Some(grad_b), None))
    }
}

impl DualCrossEntropy {
    /// Keeps the kernels' status record for the backward and the label check.
    #[cfg(any(feature = "cuda", feature = "host-kernels"))]
    fn keep_status(&self, status: StatusBuffer, dims: Dims, ignore: i64) {
        let _ = self.state.device.set(DeviceStatus {
            status,
            classes: dims.classes,
            ignore,
        });
    }
}

/// The ignore index of a label dtype (`Err` for a non-integer dtype).
#[cfg(any(feature = "cuda", feature = "host-kernels"))]
fn ignore_index(dtype: DType) -> Result<i64> {
    with_label_dtype!(dtype, L => Ok(L::IGNORE.to_i64()))
}

/// The backward of a CPU forward that kept `softmax − onehot` (`unscaled`, in
/// the accumulator dtype): one pass that scales head A's `len_a` values by
/// `scales[0]` and head B's by `scales[1]`, rounding once to `T`.
fn scale_kept_grads<T: FloatElem>(
    unscaled: &Tensor,
    scales: [f64; 2],
    len_a: usize,
) -> Result<Tensor>
where
    T::Acc: WithDType,
{
    let (storage, layout) = unscaled.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("{OP}: the kept gradient is not on the CPU");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{OP}: the kept gradient is not contiguous");
    };
    let unscaled = &cpu.as_slice::<T::Acc>()?[start..end];
    let grads = scale_heads::<T>(unscaled, scales, len_a);
    Tensor::from_vec(grads, end - start, &candle_core::Device::Cpu)
}

/// `unscaled[..len_a]·scales[0]` then `unscaled[len_a..]·scales[1]`, as `T`.
fn scale_heads<T: FloatElem>(unscaled: &[T::Acc], scales: [f64; 2], len_a: usize) -> Vec<T> {
    let scales = scales.map(T::Acc::of);
    let (a, b) = unscaled.split_at(len_a);
    let mut grads = Vec::with_capacity(unscaled.len());
    grads.extend(a.iter().map(|&v| T::from_acc(v * scales[0])));
    grads.extend(b.iter().map(|&v| T::from_acc(v * scales[1])));
    grads
}

/// Splits the backward op's flat buffer into `[N,Ca]` and `[N,Cb]` views (no copy).
fn split_grads(grads: &Tensor, a: &[usize], b: &[usize]) -> Result<(Tensor, Tensor)> {
    let len_a = a[0] * a[1];
    let grad_a = grads.narrow(0, 0, len_a)?.reshape(a)?;
    let grad_b = grads.narrow(0, len_a, b[0] * b[1])?.reshape(b)?;
    Ok((grad_a, grad_b))
}

impl CustomOp3 for DualCrossEntropyBackward {
    fn name(&self) -> &'static str {
        "dual-head-cross-entropy-backward"
    }

    fn cpu_fwd(
        &self,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
        sl: &CpuStorage,
        ll: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (dims, logits, labels) = Dims::views(la, lb, ll)?;
        check_same_storage_dtype(sa.dtype(), sb.dtype())?;
        #[cfg(feature = "host-kernels")]
        if let Some(DeviceStatus {
            status: StatusBuffer::Host(status),
            ..
        }) = self.state.device.get()
        {
            let ignore = ignore_index(sl.dtype())?;
            let (g, g_layout) = self.grad_losses.storage_and_layout();
            let candle_core::Storage::Cpu(g) = &*g else {
                candle_core::bail!("{OP}: the loss gradient is not on the CPU");
            };
            let grads = super::host::on_host([sa, sb, sl, g], |exec, [a, b, l, g]| {
                let logits = [(a, logits[0]), (b, logits[1])];
                let grad = (g, g_layout.start_offset());
                cuda::backward(exec, dims, logits, (l, labels), ignore, grad, status)
            })?;
            return Ok((grads, Shape::from_dims(&[grad_len(dims)])));
        }
        let Some(&labelled_rows) = self.state.labelled_rows.get() else {
            candle_core::bail!("{OP}: backward called before the CPU forward pass ran");
        };
        let grads = with_float_dtype!(OP, "logits", sa.dtype(), T => {
            with_label_dtype!(sl.dtype(), L => {
                let logits = [Logits::<T>::new(sa, logits[0])?, Logits::<T>::new(sb, logits[1])?];
                let labels = Labels::<L>::new(sl, labels)?;
                let g = self.grad_losses.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                let scales = head_scales([g[0], g[1]], labelled_rows);
                // The same pass the forward makes when it keeps the gradient,
                // then the per-head scale.
                let (_, _, unscaled) = forward_with_grads_cpu(dims, &logits, &labels)?;
                let grads = scale_heads::<T>(&unscaled, scales, dims.n * dims.classes[0]);
                Ok(T::to_cpu_storage_owned(grads))
            })
        })?;
        Ok((grads, Shape::from_dims(&[grad_len(dims)])))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sa: &candle_core::CudaStorage,
        la: &Layout,
        sb: &candle_core::CudaStorage,
        lb: &Layout,
        sl: &candle_core::CudaStorage,
        ll: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (dims, logits, labels) = Dims::views(la, lb, ll)?;
        check_same_storage_dtype(sa.dtype(), sb.dtype())?;
        let Some(DeviceStatus {
            status: StatusBuffer::Cuda(status),
            ..
        }) = self.state.device.get()
        else {
            candle_core::bail!("{OP}: CUDA backward without a CUDA forward");
        };
        let ignore = ignore_index(sl.dtype())?;
        let (g, g_layout) = self.grad_losses.storage_and_layout();
        let candle_core::Storage::Cuda(g) = &*g else {
            candle_core::bail!("{OP}: the loss gradient is not on the CUDA device");
        };
        let exec = super::cuda::CudaExecutor::new(sa.device());
        let logits = [(sa, logits[0]), (sb, logits[1])];
        let grad = (g, g_layout.start_offset());
        let grads = cuda::backward(&exec, dims, logits, (sl, labels), ignore, grad, status)?;
        Ok((grads, Shape::from_dims(&[grad_len(dims)])))
    }
}

fn grad_len(dims: Dims) -> usize {
    dims.n * (dims.classes[0] + dims.classes[1])
}

/// `g[h] / n_h`, or 0 for a head with no labelled row.
fn head_scales<A: Accum>(g: [A; 2], labelled_rows: [usize; 2]) -> [A; 2] {
    std::array::from_fn(|h| match labelled_rows[h] {
        0 => A::zero(),
        n => g[h] / A::of(n as f64),
    })
}

fn check_same_storage_dtype(a: DType, b: DType) -> Result<()> {
    if a != b {
        candle_core::bail!(
            "{OP}: logits_a is {a:?} but logits_b is {b:?}; both must have the same dtype"
        );
    }
    Ok(())
}

/// Launches an empty kernel once on `device` (CUDA only): the launch-overhead
/// baseline for the CUDA benches. Not part of the op.
#[cfg(feature = "cuda")]
#[doc(hidden)]
pub fn launch_empty_kernel(device: &candle_core::Device) -> Result<()> {
    match device {
        candle_core::Device::Cuda(dev) => {
            cuda::launch_empty_kernel(&super::cuda::CudaExecutor::new(dev))
        }
        _ => candle_core::bail!("{OP}: launch_empty_kernel needs a CUDA device"),
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::ops::reference::cross_entropy as reference;

    fn values(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f64>())
            .expect("tensor to f64 vec")
    }

    /// The backward op's own CPU pass (the CPU forward keeps the gradient
    /// whenever one may be wanted, so `bwd` normally only scales that) against
    /// the f64 reference, with an ignored row in each head and a strided input.
    #[test]
    fn backward_op_on_the_cpu_matches_reference() -> Result<()> {
        let dev = Device::Cpu;
        let n = 37;
        let a = Tensor::randn(0f32, 1., (n, 4), &dev)?;
        let b = Tensor::randn(0f32, 1., (3, n), &dev)?.t()?; // strided
        let labels: Vec<i64> = (0..n as i64)
            .flat_map(|i| {
                let la = if i % 5 == 0 { IGNORE_INDEX } else { i % 4 };
                let lb = if i % 7 == 3 {
                    IGNORE_INDEX
                } else {
                    (i * 2) % 3
                };
                [la, lb]
            })
            .collect();
        let labelled_rows = [0, 1].map(|h| {
            labels
                .iter()
                .skip(h)
                .step_by(2)
                .filter(|&&l| l != IGNORE_INDEX)
                .count()
        });
        let label_tensor = Tensor::from_vec(labels.clone(), (n, 2), &dev)?;
        let g = [0.7, -1.3];
        let state = ForwardState::default();
        let _ = state.labelled_rows.set(labelled_rows);
        let backward = DualCrossEntropyBackward {
            state: Arc::new(state),
            grad_losses: Tensor::new(&[g[0] as f32, g[1] as f32], &dev)?,
        };
        let grads = a.apply_op3(&b, &label_tensor, backward)?;
        let (grad_a, grad_b) = split_grads(&grads, a.dims(), b.dims())?;
        let (want_a, want_b) =
            reference::dual_head_cross_entropy_backward(&values(&a), &values(&b), &labels, n, g);
        for (what, got, want) in [
            ("a", values(&grad_a), want_a),
            ("b", values(&grad_b), want_b),
        ] {
            assert_eq!(got.len(), want.len());
            for (i, (x, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (x - w).abs() <= 1e-6 + 1e-5 * w.abs(),
                    "grad {what}[{i}]: {x} vs {w}"
                );
            }
        }
        Ok(())
    }
}
