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
use super::dtype::{check_float_dtype, Accum, FloatElem};
use super::layout::{check_rank, check_same_device, check_same_dtype, View};
use super::math::{exp_f32, ln_f32};
use crate::with_float_dtype;

#[cfg(any(feature = "cuda", feature = "host-kernels"))]
mod cuda;

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

fn bad_label_dtype(dtype: DType) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{OP}: labels must have an integer dtype (i64, i32, i16, u32 or u8), got {dtype:?}"
    ))
}

fn check_label_dtype(dtype: DType) -> Result<()> {
    match dtype {
        DType::I64 | DType::I32 | DType::I16 | DType::U32 | DType::U8 => Ok(()),
        other => Err(bad_label_dtype(other)),
    }
}

/// An integer label dtype and the value that marks "no label for this head".
pub(crate) trait Label: WithDType {
    /// -100 for signed dtypes; the maximum value for unsigned ones.
    const IGNORE: Self;
    /// The dtype's part of a kernel name (`dual_ce_fwd_<TAG>_<float>`).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    const TAG: &'static str;
    fn to_i64(self) -> i64;
}

macro_rules! label {
    ($t:ty, $ignore:expr, $tag:literal) => {
        impl Label for $t {
            const IGNORE: Self = $ignore;
            const TAG: &'static str = $tag;
            #[inline(always)]
            fn to_i64(self) -> i64 {
                self as i64
            }
        }
    };
}

label!(i64, IGNORE_INDEX, "i64");
label!(i32, IGNORE_INDEX as i32, "i32");
label!(i16, IGNORE_INDEX as i16, "i16");
label!(u32, u32::MAX, "u32");
label!(u8, u8::MAX, "u8");

/// Runs `$body` with `$L` bound to the Rust type of an integer label `$dtype`;
/// any other dtype (floats included) is an `Err`. The label counterpart of
/// `with_float_dtype!`, private to this op.
macro_rules! with_label_dtype {
    ($dtype:expr, $L:ident => $body:expr) => {
        match $dtype {
            DType::I64 => {
                type $L = i64;
                $body
            }
            DType::I32 => {
                type $L = i32;
                $body
            }
            DType::I16 => {
                type $L = i16;
                $body
            }
            DType::U32 => {
                type $L = u32;
                $body
            }
            DType::U8 => {
                type $L = u8;
                $body
            }
            other => Err(bad_label_dtype(other)),
        }
    };
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

// ---------------------------------------------------------------------------
// CPU
// ---------------------------------------------------------------------------

/// Rows per parallel work item, fixed by the class counts alone so that the
/// summation order (and so the result) does not depend on the thread count.
fn chunk_rows(dims: Dims) -> usize {
    const ELEMS_PER_CHUNK: usize = 16 * 1024;
    (ELEMS_PER_CHUNK / (dims.classes[0] + dims.classes[1])).max(1)
}

/// Rows per tile: a tile's shifted logits (at most this many values per head)
/// stay in L1 between the passes over them.
fn tile_rows(dims: Dims) -> usize {
    const ELEMS_PER_TILE: usize = 2048;
    (ELEMS_PER_TILE / dims.classes[0].max(dims.classes[1])).max(1)
}

/// Below this many logits a single thread beats rayon's fork/join overhead.
const PARALLEL_MIN_ELEMS: usize = 64 * 1024;

fn run_parallel(dims: Dims) -> bool {
    grad_len(dims) >= PARALLEL_MIN_ELEMS
}

/// The row ranges of the (parallel) work items.
fn chunks(dims: Dims) -> Vec<std::ops::Range<usize>> {
    let step = chunk_rows(dims);
    (0..dims.n.div_ceil(step))
        .map(|c| c * step..((c + 1) * step).min(dims.n))
        .collect()
}

/// `exp` and `ln` of every element of a slice, in place. For f32 (the
/// accumulator of f32, f16 and bf16) branch-free polynomials that the compiler
/// vectorises: a libm call per element would otherwise be most of the op's time.
trait ExpLnInPlace: Accum {
    fn exp_in_place(values: &mut [Self]);
    fn ln_in_place(values: &mut [Self]);
}

impl ExpLnInPlace for f32 {
    fn exp_in_place(values: &mut [f32]) {
        for v in values {
            *v = exp_f32(*v);
        }
    }

    fn ln_in_place(values: &mut [f32]) {
        for v in values {
            *v = ln_f32(*v);
        }
    }
}

impl ExpLnInPlace for f64 {
    fn exp_in_place(values: &mut [f64]) {
        for v in values {
            *v = v.exp();
        }
    }

    fn ln_in_place(values: &mut [f64]) {
        for v in values {
            *v = v.ln();
        }
    }
}

/// One head's logits on the CPU: the storage slice and its strided view.
struct Logits<'a, T> {
    data: &'a [T],
    view: View<2>,
}

impl<'a, T: FloatElem> Logits<'a, T> {
    fn new(storage: &'a CpuStorage, view: View<2>) -> Result<Self> {
        Ok(Self {
            data: storage.as_slice::<T>()?,
            view,
        })
    }

    /// Rows `rows` as one slice, when they lie back to back (unit-stride rows
    /// `classes` apart).
    fn tile(&self, rows: std::ops::Range<usize>) -> Option<&'a [T]> {
        let classes = self.view.dims[1];
        let packed = self.view.strides[1] == 1 || classes == 1;
        if !packed || (self.view.strides[0] != classes && rows.len() > 1) || rows.is_empty() {
            return None;
        }
        let start = self.view.at([rows.start, 0]);
        Some(&self.data[start..start + rows.len() * classes])
    }

    /// Appends row `i` minus its maximum to `out`. Unit-stride rows are read as
    /// a plain slice; other rows by index, since the class stride may be 0 (a
    /// `broadcast_as` along the classes).
    #[inline(always)]
    fn push_shifted_row(&self, i: usize, out: &mut Vec<T::Acc>) {
        let start = self.view.at([i, 0]);
        let (classes, stride) = (self.view.dims[1], self.view.strides[1]);
        if stride == 1 || classes == 1 {
            push_shifted(self.data[start..start + classes].iter(), out);
        } else {
            let data = self.data;
            push_shifted((0..classes).map(|c| &data[start + c * stride]), out);
        }
    }
}

#[inline(always)]
fn push_shifted<'a, T: FloatElem>(row: impl Iterator<Item = &'a T> + Clone, out: &mut Vec<T::Acc>) {
    // `>` rather than `max`: a NaN logit then poisons the row instead of vanishing.
    let max = row
        .clone()
        .map(|x| x.to_acc())
        .reduce(|m, x| if x > m { x } else { m })
        .expect("a head has at least one class");
    out.extend(row.map(|x| x.to_acc() - max));
}

/// Evaluates `$body` with `$c` bound to `$classes`: as a literal constant when
/// it is 2 to 8 (the class counts of classification heads), so that the
/// `#[inline(always)]` row loops in `$body` get a fixed row size, unroll and
/// vectorise across rows; as the runtime value otherwise.
macro_rules! with_small_classes {
    ($classes:expr, $c:ident => $body:expr) => {
        match $classes {
            2 => {
                let $c = 2;
                $body
            }
            3 => {
                let $c = 3;
                $body
            }
            4 => {
                let $c = 4;
                $body
            }
            5 => {
                let $c = 5;
                $body
            }
            6 => {
                let $c = 6;
                $body
            }
            7 => {
                let $c = 7;
                $body
            }
            8 => {
                let $c = 8;
                $body
            }
            $c => $body,
        }
    };
}

/// Appends each `classes`-sized row of `tile` minus the row's maximum to `out`
/// (the tile form of [`push_shifted`], with the same NaN rule).
#[inline(always)]
fn shift_by_row_max<T: FloatElem>(tile: &[T], classes: usize, out: &mut Vec<T::Acc>) {
    let base = out.len();
    out.resize(base + tile.len(), T::Acc::zero());
    let rows = out[base..]
        .chunks_exact_mut(classes)
        .zip(tile.chunks_exact(classes));
    for (o, row) in rows {
        let max =
            row[1..].iter().fold(
                row[0].to_acc(),
                |m, v| if v.to_acc() > m { v.to_acc() } else { m },
            );
        for (o, v) in o.iter_mut().zip(row) {
            *o = v.to_acc() - max;
        }
    }
}

/// Appends the sum of each `classes`-sized row of `values` to `out`.
#[inline(always)]
fn row_sums<A: Accum>(values: &[A], classes: usize, out: &mut Vec<A>) {
    out.extend(
        values
            .chunks_exact(classes)
            .map(|row| row.iter().copied().sum::<A>()),
    );
}

/// The labels on the CPU: the storage slice and its `[N,2]` view.
struct Labels<'a, L> {
    data: &'a [L],
    view: View<2>,
}

impl<'a, L: Label> Labels<'a, L> {
    fn new(storage: &'a CpuStorage, view: View<2>) -> Result<Self> {
        Ok(Self {
            data: storage.as_slice::<L>()?,
            view,
        })
    }

    /// Row `i`'s class for `head`, `None` if ignored, an `Err` if out of range.
    #[inline(always)]
    fn class(&self, i: usize, head: usize, classes: usize) -> Result<Option<usize>> {
        decode(self.data[self.view.at([i, head])], classes)
            .map_err(|value| label_out_of_range(head, i, value, classes, L::IGNORE.to_i64()))
    }

    /// Appends, for each row of `rows`, its class for `head` (0 for an ignored
    /// row, so that it can index the row) to `class` and whether it is labelled
    /// to `labelled`. Branch-free: which rows a mixed batch labels for a head is
    /// unpredictable. An `Err` names the first out-of-range label of the rows.
    fn decode_rows(
        &self,
        rows: std::ops::Range<usize>,
        head: usize,
        classes: usize,
        class: &mut Vec<usize>,
        labelled: &mut Vec<bool>,
    ) -> Result<()> {
        let (n, stride) = (rows.len(), self.view.strides[0]);
        let first = self.view.at([rows.start, head]);
        class.clear();
        class.resize(n, 0);
        labelled.clear();
        labelled.resize(n, false);
        let mut out_of_range = false;
        for (k, (class, labelled)) in class.iter_mut().zip(labelled.iter_mut()).enumerate() {
            let label = self.data[first + k * stride];
            let value = label.to_i64();
            let ignored = label == L::IGNORE;
            let in_range = (value >= 0) & ((value as u64) < classes as u64);
            out_of_range |= !ignored & !in_range;
            *class = if in_range { value as usize } else { 0 };
            *labelled = !ignored;
        }
        if out_of_range {
            for i in rows {
                self.class(i, head, classes)?;
            }
        }
        Ok(())
    }

    /// The error for the first out-of-range label by row (then head), if any.
    /// Tiles go head by head, so this in-order scan names the label the user
    /// would find first.
    fn first_error(&self, dims: Dims) -> Result<()> {
        for i in 0..dims.n {
            for (head, &classes) in dims.classes.iter().enumerate() {
                self.class(i, head, classes)?;
            }
        }
        Ok(())
    }
}

/// One head over a tile of rows, every row computed alike whether labelled or
/// not (the loops then have no data-dependent branches and vectorise; an
/// ignored row's values are never used): `exps[k*C..(k+1)*C]` holds
/// `exp(x − max)` of row `start + k`, `sums[k]` their sum, `losses[k]` the row's
/// cross-entropy `ln(sums[k]) − (x[label] − max)`.
struct Tile<A> {
    exps: Vec<A>,
    sums: Vec<A>,
    losses: Vec<A>,
    class: Vec<usize>,
    labelled: Vec<bool>,
}

impl<A: ExpLnInPlace> Tile<A> {
    fn new() -> Self {
        Self {
            exps: Vec::new(),
            sums: Vec::new(),
            losses: Vec::new(),
            class: Vec::new(),
            labelled: Vec::new(),
        }
    }

    fn fill<T: FloatElem<Acc = A>, L: Label>(
        &mut self,
        rows: std::ops::Range<usize>,
        head: usize,
        logits: &Logits<'_, T>,
        labels: &Labels<'_, L>,
    ) -> Result<()> {
        let classes = logits.view.dims[1];
        self.class.clear();
        self.labelled.clear();
        labels.decode_rows(
            rows.clone(),
            head,
            classes,
            &mut self.class,
            &mut self.labelled,
        )?;
        self.exps.clear();
        match logits.tile(rows.clone()) {
            Some(tile) => {
                with_small_classes!(classes, c => shift_by_row_max(tile, c, &mut self.exps))
            }
            None => {
                for i in rows {
                    logits.push_shifted_row(i, &mut self.exps);
                }
            }
        }
        // x[label] − max, taken before the exponentials overwrite it.
        self.losses.clear();
        let shifted = self.exps.chunks_exact(classes).zip(&self.class);
        self.losses.extend(shifted.map(|(row, &c)| row[c]));
        A::exp_in_place(&mut self.exps);
        self.sums.clear();
        with_small_classes!(classes, c => row_sums(&self.exps, c, &mut self.sums));
        // losses = ln(sums) − (x[label] − max), with ln vectorised over the tile.
        let shifted_label = std::mem::replace(&mut self.losses, self.sums.clone());
        A::ln_in_place(&mut self.losses);
        for (loss, s) in self.losses.iter_mut().zip(shifted_label) {
            *loss = *loss - s;
        }
        Ok(())
    }

    /// Writes `softmax − onehot` for each labelled row of the tile and 0 for an
    /// ignored one (whatever its logits) into `out`, `classes` per row, every
    /// element. Inlined so that a constant `classes` unrolls the row loop. Turns
    /// `sums` into their reciprocals on the way (one vectorised pass of divisions
    /// rather than one division per row in the row loop), so call it last.
    #[inline(always)]
    fn write_grads(&mut self, out: &mut [A], classes: usize) {
        for s in &mut self.sums {
            *s = s.recip();
        }
        let rows = out
            .chunks_exact_mut(classes)
            .zip(self.exps.chunks_exact(classes))
            .zip(self.sums.iter().zip(self.class.iter().zip(&self.labelled)));
        for ((out, exps), (&inv, (&class, &labelled))) in rows {
            for (j, (o, &e)) in out.iter_mut().zip(exps).enumerate() {
                let onehot = if j == class { A::one() } else { A::zero() };
                *o = (e * inv - onehot).or_zero(labelled);
            }
        }
    }

    /// The tile's loss sum and labelled-row count. The select (not a product
    /// with 0/1) keeps an ignored row's NaN or infinity out.
    fn loss_and_count(&self) -> (A, usize) {
        let mut sum = A::zero();
        let mut count = 0;
        for (&loss, &labelled) in self.losses.iter().zip(&self.labelled) {
            sum += if labelled { loss } else { A::zero() };
            count += labelled as usize;
        }
        (sum, count)
    }
}

/// Loss sums and labelled-row counts of a run of rows, per head.
#[derive(Clone, Copy)]
struct Partial<A> {
    loss: [A; 2],
    count: [usize; 2],
}

fn forward_rows<T: FloatElem, L: Label>(
    rows: std::ops::Range<usize>,
    dims: Dims,
    logits: &[Logits<'_, T>; 2],
    labels: &Labels<'_, L>,
) -> Result<Partial<T::Acc>>
where
    T::Acc: ExpLnInPlace,
{
    let mut part = Partial {
        loss: [T::Acc::zero(); 2],
        count: [0; 2],
    };
    let mut tile = Tile::new();
    for start in rows.clone().step_by(tile_rows(dims)) {
        let tile_rows = start..(start + tile_rows(dims)).min(rows.end);
        for (head, logits) in logits.iter().enumerate() {
            tile.fill(tile_rows.clone(), head, logits, labels)?;
            let (loss, count) = tile.loss_and_count();
            part.loss[head] += loss;
            part.count[head] += count;
        }
    }
    Ok(part)
}

/// The two mean losses (in `T`) and the labelled-row counts.
fn forward_cpu<T: FloatElem, L: Label>(
    dims: Dims,
    logits: &[Logits<'_, T>; 2],
    labels: &Labels<'_, L>,
) -> Result<([T; 2], [usize; 2])>
where
    T::Acc: ExpLnInPlace,
{
    let chunk = |rows| forward_rows(rows, dims, logits, labels);
    // Partials come back in chunk order and are summed in that order, so the
    // sum does not depend on the number of threads.
    let partials: Result<Vec<Partial<T::Acc>>> = if run_parallel(dims) {
        chunks(dims).into_par_iter().map(chunk).collect()
    } else {
        chunks(dims).into_iter().map(chunk).collect()
    };
    let partials = match partials {
        Ok(partials) => partials,
        Err(e) => {
            labels.first_error(dims)?;
            return Err(e);
        }
    };
    Ok(mean_losses::<T>(partials))
}

/// Sums the partials in order (the same result for any thread count) into the
/// two mean losses (0 for a head without labelled rows) and the counts.
fn mean_losses<T: FloatElem>(partials: Vec<Partial<T::Acc>>) -> ([T; 2], [usize; 2]) {
    let mut total = Partial {
        loss: [T::Acc::zero(); 2],
        count: [0; 2],
    };
    for part in partials {
        for h in 0..2 {
            total.loss[h] += part.loss[h];
            total.count[h] += part.count[h];
        }
    }
    let mean = |h: usize| match total.count[h] {
        0 => T::Acc::zero(),
        n => total.loss[h] / T::Acc::of(n as f64),
    };
    ([T::from_acc(mean(0)), T::from_acc(mean(1))], total.count)
}

/// The forward with the unscaled gradients: the two mean losses, the
/// labelled-row counts and `softmax − onehot` for every labelled row (zero for
/// ignored rows), head A's `[N,Ca]` then head B's `[N,Cb]`, in the accumulator
/// type. One pass over the logits, chunks of rows in parallel.
#[allow(clippy::type_complexity)]
fn forward_with_grads_cpu<T: FloatElem, L: Label>(
    dims: Dims,
    logits: &[Logits<'_, T>; 2],
    labels: &Labels<'_, L>,
) -> Result<([T; 2], [usize; 2], Vec<T::Acc>)>
where
    T::Acc: ExpLnInPlace + WithDType,
{
    // SAFETY: the chunks below write every row of both heads (tile by tile).
    let mut grads = unsafe { output_buffer::<T::Acc>(grad_len(dims)) };
    let (grad_a, grad_b) = grads.split_at_mut(dims.n * dims.classes[0]);
    let chunk = |(rows, outs): (std::ops::Range<usize>, [&mut [T::Acc]; 2])| {
        let mut part = Partial {
            loss: [T::Acc::zero(); 2],
            count: [0; 2],
        };
        let mut tile = Tile::new();
        for start in rows.clone().step_by(tile_rows(dims)) {
            let tile_rows = start..(start + tile_rows(dims)).min(rows.end);
            for (head, logits) in logits.iter().enumerate() {
                let classes = dims.classes[head];
                tile.fill(tile_rows.clone(), head, logits, labels)?;
                let (loss, count) = tile.loss_and_count();
                part.loss[head] += loss;
                part.count[head] += count;
                let out =
                    &mut outs[head][(start - rows.start) * classes..][..tile.sums.len() * classes];
                with_small_classes!(classes, c => tile.write_grads(out, c));
            }
        }
        Ok(part)
    };
    let step = chunk_rows(dims);
    let (step_a, step_b) = (step * dims.classes[0], step * dims.classes[1]);
    let partials: Result<Vec<Partial<T::Acc>>> = if run_parallel(dims) {
        chunks(dims)
            .into_par_iter()
            .zip(
                grad_a
                    .par_chunks_mut(step_a)
                    .zip(grad_b.par_chunks_mut(step_b)),
            )
            .map(|(rows, (a, b))| chunk((rows, [a, b])))
            .collect()
    } else {
        chunks(dims)
            .into_iter()
            .zip(grad_a.chunks_mut(step_a).zip(grad_b.chunks_mut(step_b)))
            .map(|(rows, (a, b))| chunk((rows, [a, b])))
            .collect()
    };
    let partials = match partials {
        Ok(partials) => partials,
        Err(e) => {
            labels.first_error(dims)?;
            return Err(e);
        }
    };
    let (losses, counts) = mean_losses::<T>(partials);
    Ok((losses, counts, grads))
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
