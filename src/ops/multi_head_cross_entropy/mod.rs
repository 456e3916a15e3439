//! N-head cross-entropy: the mean cross-entropy losses of any number of
//! classification heads over one batch, and their weighted total, in one fused
//! op (one pass over the rows for all heads).
//!
//! [`multi_head_cross_entropy`]`(logits [N, ΣC], labels [N, H], heads)` takes the
//! heads' logits side by side in one tensor (head 0's `C_0` columns, then head
//! 1's, ...: what one linear layer with the heads' weights stacked gives) and
//! returns each head's loss and `Σ_h w_h · loss_h`, where
//!
//! ```text
//! loss_h = Σ_{rows i labelled for h} cw_h[y_i] · (logsumexp(z_h[i,:]) − z_h[i, y_i])
//!          / Σ_{rows i labelled for h} cw_h[y_i]
//! ```
//!
//! with `cw_h` the head's class weights (all 1 by default: the mean over its
//! labelled rows; with weights, PyTorch's `CrossEntropyLoss(weight=…)`). With
//! label smoothing `ε_h` the target is `(1 − ε_h)·onehot(y) + ε_h / C_h` and the
//! row's term `logsumexp(z) − Σ_j q_j z_j` (still weighted by `cw_h[y_i]`: the
//! same as PyTorch's `label_smoothing` without class weights; PyTorch weighs
//! the smoothing part of a row by each class's weight instead). A row
//! whose label in column `h` is that head's ignore index is left out of head
//! `h`; a head with no labelled row has loss 0 and a zero gradient.
//!
//! The two-head op [`dual_head_cross_entropy`](crate::ops::dual_head_cross_entropy)
//! is the special case with two separate logits tensors, unit weights and no
//! class weights.
//!
//! One fused `CustomOp3` (`(logits, labels, head table) -> [H + 1]`: the heads'
//! losses, then the total). CPU: one pass over the rows for all heads
//! (`cpu.rs`), labels checked in the same pass; its backward scales the
//! `softmax − target` the forward kept by `(g_h + w_h·g_total) / Σcw`. CUDA:
//! `kernels/multi_head_cross_entropy.cu`, launch plans in `cuda.rs`: one
//! forward launch for all heads (two past one block of rows), one backward
//! launch; the heads' settings travel as a small table of words (`Plan::table`).
//! The forward checks every label on the device and leaves the heads' weight
//! sums and a status record there: [`multi_head_cross_entropy`] reads the
//! status back (one synchronisation) so that a bad label is an `Err`, and
//! [`multi_head_cross_entropy_deferred`] leaves that read to the caller's next
//! synchronisation, as the trainer does.

use std::sync::{Arc, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use num_traits::ToPrimitive;

use super::dtype::{
    check_float_dtype, check_label_dtype, with_float_dtype, with_label_dtype, Accum, FloatElem,
    Label,
};
use super::layout::{check_rank, check_same_device, View};

mod cpu;
#[cfg(any(feature = "cuda", feature = "host-kernels"))]
mod cuda;

const OP: &str = "multi_head_cross_entropy";

/// One head of a [`multi_head_cross_entropy`] call.
#[derive(Debug, Clone, PartialEq)]
pub struct CeHead {
    /// The head's number of classes: its columns of the logits, in head order.
    pub classes: usize,
    /// The head's weight `w_h` in the total (≥ 0).
    pub weight: f64,
    /// The label that leaves a row out of this head; `None` for the label
    /// dtype's ignore index (-100 for signed dtypes, the maximum for unsigned).
    pub ignore_index: Option<i64>,
    /// Per-class weights (`classes` values, each ≥ 0): the head's loss is their
    /// weighted mean over its labelled rows. `None` weighs every class 1.
    pub class_weights: Option<Vec<f64>>,
    /// Label smoothing `ε` in `[0, 1]`: the target puts `1 − ε + ε/C` on the
    /// label and `ε/C` on every other class (0: the one-hot target).
    pub label_smoothing: f64,
}

impl CeHead {
    /// A head of `classes` classes, weight 1, the dtype's ignore index and no
    /// class weights.
    pub fn new(classes: usize) -> Self {
        Self {
            classes,
            weight: 1.0,
            ignore_index: None,
            class_weights: None,
            label_smoothing: 0.0,
        }
    }

    /// The same head with weight `weight` in the total.
    pub fn with_weight(self, weight: f64) -> Self {
        Self { weight, ..self }
    }

    /// The same head with per-class weights.
    pub fn with_class_weights(self, class_weights: Vec<f64>) -> Self {
        Self {
            class_weights: Some(class_weights),
            ..self
        }
    }

    /// The same head with label smoothing `label_smoothing` (in `[0, 1]`).
    pub fn with_label_smoothing(self, label_smoothing: f64) -> Self {
        Self {
            label_smoothing,
            ..self
        }
    }
}

/// What [`multi_head_cross_entropy`] returns.
#[derive(Debug, Clone)]
pub struct MultiHeadLoss {
    /// `[H]`: each head's (class-weighted) mean loss over its labelled rows.
    pub per_head: Tensor,
    /// The scalar `Σ_h w_h · loss_h`, the one to back-propagate.
    pub total: Tensor,
}

/// The losses of `heads.len()` classification heads and their weighted total.
///
/// - `logits`: `[N, ΣC]` of one float dtype (f32, f16, bf16, f64), any strides.
/// - `labels`: `[N, H]` integer classes, column `h` for head `h` (i64, i32, i16,
///   u32 or u8), on the logits' device.
/// - `heads`: one [`CeHead`] per label column, at least one.
///
/// Errors: wrong ranks, `N` or `H` mismatches, `ΣC` not the logits' width, a
/// head of 0 classes, class weights of the wrong length or negative, a
/// negative or non-finite head weight, label smoothing outside `[0, 1]`, and a label that is neither a class of
/// its head nor its ignore index (naming the head, row and value).
pub fn multi_head_cross_entropy(
    logits: &Tensor,
    labels: &Tensor,
    heads: &[CeHead],
) -> Result<MultiHeadLoss> {
    let (loss, labels_checked) = multi_head_cross_entropy_deferred(logits, labels, heads)?;
    labels_checked.verify()?;
    Ok(loss)
}

/// [`multi_head_cross_entropy`] without waiting for the label check on a GPU:
/// the losses, and the [`LabelCheck`] to [verify](LabelCheck::verify) once the
/// step synchronises anyway (when its loss is read back). Until then an
/// out-of-range label shows only as NaN losses. On the CPU the labels are
/// checked before this returns (an `Err`), as by [`multi_head_cross_entropy`].
pub fn multi_head_cross_entropy_deferred(
    logits: &Tensor,
    labels: &Tensor,
    heads: &[CeHead],
) -> Result<(MultiHeadLoss, LabelCheck)> {
    check_inputs(logits, labels, heads)?;
    check_float_dtype(OP, "logits", logits.dtype())?;
    check_label_dtype(labels.dtype())?;
    let plan = Arc::new(Plan::new(heads, labels.dtype())?);
    let table = plan.table();
    let table = Tensor::from_vec(table.clone(), table.len(), logits.device())?;
    let h = plan.heads();
    let state = Arc::new(ForwardState::default());
    let op = FusedCrossEntropy {
        plan: plan.clone(),
        keep_grads: logits.track_op(),
        state: state.clone(),
    };
    let out = logits.apply_op3(labels, &table, op)?;
    let loss = MultiHeadLoss {
        per_head: out.narrow(0, 0, h)?,
        total: out.get(h)?,
    };
    Ok((loss, LabelCheck { state, plan }))
}

/// Each head's place and settings, for the fused pass.
pub(crate) struct Plan {
    classes: Vec<usize>,
    /// Each head's first column in the logits.
    columns: Vec<usize>,
    ignore: Vec<i64>,
    weights: Vec<f64>,
    class_weights: Vec<Option<Vec<f64>>>,
    smoothing: Vec<f64>,
}

impl Plan {
    fn new(heads: &[CeHead], label_dtype: DType) -> Result<Self> {
        let mut columns = Vec::with_capacity(heads.len());
        let mut next = 0;
        for head in heads {
            columns.push(next);
            next += head.classes;
        }
        Ok(Self {
            classes: heads.iter().map(|h| h.classes).collect(),
            columns,
            ignore: heads
                .iter()
                .map(|h| ignore_of(h, label_dtype))
                .collect::<Result<_>>()?,
            weights: heads.iter().map(|h| h.weight).collect(),
            class_weights: heads.iter().map(|h| h.class_weights.clone()).collect(),
            smoothing: heads.iter().map(|h| h.label_smoothing).collect(),
        })
    }

    fn heads(&self) -> usize {
        self.classes.len()
    }

    fn width(&self) -> usize {
        self.classes.iter().sum()
    }

    /// The heads' settings as the kernels read them (i64 words): per head its
    /// first column, class count, ignore index, weight (f64 bits), where its
    /// class weights start in the table (-1 for none) and its label smoothing
    /// (f64 bits); then the class weights (f64 bits).
    fn table(&self) -> Vec<i64> {
        let h = self.heads();
        let mut words = Vec::with_capacity(h * TABLE_HEAD_WORDS + self.width());
        let mut class_weights = Vec::new();
        for head in 0..h {
            let cw_start = match &self.class_weights[head] {
                Some(w) => {
                    let start = h * TABLE_HEAD_WORDS + class_weights.len();
                    class_weights.extend(w.iter().map(|v| v.to_bits() as i64));
                    start as i64
                }
                None => -1,
            };
            words.extend([
                self.columns[head] as i64,
                self.classes[head] as i64,
                self.ignore[head],
                self.weights[head].to_bits() as i64,
                cw_start,
                self.smoothing[head].to_bits() as i64,
            ]);
        }
        words.extend(class_weights);
        words
    }
}

/// Words per head in [`Plan::table`] (the kernels' MHCE_HEAD_WORDS).
const TABLE_HEAD_WORDS: usize = 6;

/// The error for a label that is neither a class of its head nor its ignore index.
fn label_out_of_range(
    head: usize,
    row: usize,
    value: i64,
    classes: usize,
    ignore: i64,
) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{OP}: label out of range for head {head} at row {row}: {value} \
         (expected a class in [0, {classes}) or the ignore index {ignore})"
    ))
}

/// What the CPU forward keeps for the backward: the unscaled gradient (in the
/// accumulator dtype) and each head's weight sum.
type Kept = (Tensor, Vec<f64>);

/// What the forward leaves for the backward and for [`LabelCheck`].
#[derive(Default)]
struct ForwardState {
    /// CPU path (with a gradient wanted): the kept gradient and weight sums.
    kept: OnceLock<Kept>,
    /// Kernel path: the weight sums and the status record, on the device.
    #[cfg(any(feature = "cuda", feature = "host-kernels"))]
    device: OnceLock<KernelState>,
}

/// The kernels' results that stay where they were computed.
#[cfg(any(feature = "cuda", feature = "host-kernels"))]
enum KernelState {
    #[cfg(feature = "cuda")]
    Cuda {
        weight_sums: candle_core::CudaStorage,
        status: candle_core::CudaStorage,
    },
    #[cfg(feature = "host-kernels")]
    Host {
        weight_sums: super::host::HostBuffer,
        status: super::host::HostBuffer,
    },
}

/// The fused op `(logits, labels, head table) -> [H + 1]`.
struct FusedCrossEntropy {
    plan: Arc<Plan>,
    keep_grads: bool,
    state: Arc<ForwardState>,
}

/// The kernels' view of the problem.
#[cfg(any(feature = "cuda", feature = "host-kernels"))]
fn problem(plan: &Plan, logits: &View<2>) -> cuda::Problem {
    cuda::Problem {
        n: logits.dims[0],
        heads: plan.heads(),
        width: plan.width(),
    }
}

impl CustomOp3 for FusedCrossEntropy {
    fn name(&self) -> &'static str {
        "multi-head-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        logits: &CpuStorage,
        logits_layout: &Layout,
        labels: &CpuStorage,
        labels_layout: &Layout,
        _table: &CpuStorage,
        _table_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let view = View::<2>::new(OP, "logits", logits_layout)?;
        let label_view = View::<2>::new(OP, "labels", labels_layout)?;
        let plan = &self.plan;
        let h = plan.heads();
        #[cfg(feature = "host-kernels")]
        if super::host::enabled() {
            use super::host::{HostBuffer, HostExecutor};
            let [logits, labels, table] = [logits, labels, _table].map(HostBuffer::upload);
            let out = cuda::forward(
                &HostExecutor,
                problem(plan, &view),
                (&logits?, view),
                (&labels?, label_view),
                &table?,
            )?;
            let losses = out.losses.download()?;
            let _ = self.state.device.set(KernelState::Host {
                weight_sums: out.weight_sums,
                status: out.status,
            });
            return Ok((losses, Shape::from_dims(&[h + 1])));
        }
        with_float_dtype!(OP, "logits", logits.dtype(), T => {
            with_label_dtype!(labels.dtype(), L => {
                let fwd = cpu::forward::<T, L>(plan, (logits, view), (labels, label_view), self.keep_grads)?;
                let mut out: Vec<T> = Vec::with_capacity(h + 1);
                let mut total = <T as FloatElem>::Acc::of(0.0);
                for head in 0..h {
                    let w = fwd.weight[head];
                    let mean = if w > <T as FloatElem>::Acc::of(0.0) {
                        fwd.loss[head] / w
                    } else {
                        <T as FloatElem>::Acc::of(0.0)
                    };
                    total += <T as FloatElem>::Acc::of(plan.weights[head]) * mean;
                    out.push(T::from_acc(mean));
                }
                out.push(T::from_acc(total));
                if let Some(grads) = fwd.grads {
                    let weights = fwd.weight.iter().map(|w| w.to_f64().unwrap_or(0.0)).collect();
                    let len = grads.len();
                    let grads = Tensor::from_vec(grads, len, &candle_core::Device::Cpu)?;
                    let _ = self.state.kept.set((grads, weights));
                }
                Ok((T::to_cpu_storage_owned(out), Shape::from_dims(&[h + 1])))
            })
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        logits: &candle_core::CudaStorage,
        logits_layout: &Layout,
        labels: &candle_core::CudaStorage,
        labels_layout: &Layout,
        table: &candle_core::CudaStorage,
        _table_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let view = View::<2>::new(OP, "logits", logits_layout)?;
        let label_view = View::<2>::new(OP, "labels", labels_layout)?;
        let exec = super::cuda::CudaExecutor::new(logits.device());
        let out = cuda::forward(
            &exec,
            problem(&self.plan, &view),
            (logits, view),
            (labels, label_view),
            table,
        )?;
        let _ = self.state.device.set(KernelState::Cuda {
            weight_sums: out.weight_sums,
            status: out.status,
        });
        Ok((out.losses, Shape::from_dims(&[self.plan.heads() + 1])))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        table: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let plan = &self.plan;
        let (n, width) = logits.dims2()?;
        let Some((kept, weight_sums)) = self.state.kept.get() else {
            // The kernel path: the backward kernel, on the forward's weight sums.
            let backward = FusedCrossEntropyBackward {
                plan: plan.clone(),
                state: self.state.clone(),
                grad_losses: grad_out.contiguous()?,
            };
            let grads = logits.apply_op3(labels, table, backward)?;
            return Ok((Some(grads.reshape((n, width))?), None, None));
        };
        let g = grad_out.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let h = plan.heads();
        // d total / d loss_h = w_h; a head of weight sum 0 has no gradient.
        let scales: Vec<f64> = (0..h)
            .map(|head| match weight_sums[head] {
                w if w > 0.0 => (g[head] + plan.weights[head] * g[h]) / w,
                _ => 0.0,
            })
            .collect();
        let grads = with_float_dtype!(OP, "logits", logits.dtype(), T => {
            let kept = kept.to_vec1::<<T as FloatElem>::Acc>()?;
            let scales: Vec<_> = scales.iter().map(|&s| <T as FloatElem>::Acc::of(s)).collect();
            let grads = cpu::scale_grads::<T>(plan, &kept, &scales);
            Tensor::from_vec(grads, (n, width), logits.device())
        })?;
        Ok((Some(grads), None, None))
    }
}

/// The kernel path's backward: `(logits, labels, head table) -> [N·ΣC]`, every
/// head's gradient from the forward's weight sums (left on the device) and the
/// incoming gradient `[H + 1]`, which rides in the struct (contiguous).
#[cfg_attr(not(any(feature = "cuda", feature = "host-kernels")), allow(dead_code))]
struct FusedCrossEntropyBackward {
    plan: Arc<Plan>,
    state: Arc<ForwardState>,
    grad_losses: Tensor,
}

impl CustomOp3 for FusedCrossEntropyBackward {
    fn name(&self) -> &'static str {
        "multi-head-cross-entropy-backward"
    }

    #[cfg_attr(not(feature = "host-kernels"), allow(unused_variables))]
    fn cpu_fwd(
        &self,
        logits: &CpuStorage,
        logits_layout: &Layout,
        labels: &CpuStorage,
        labels_layout: &Layout,
        table: &CpuStorage,
        _table_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        #[cfg(feature = "host-kernels")]
        if let Some(KernelState::Host { weight_sums, .. }) = self.state.device.get() {
            let view = View::<2>::new(OP, "logits", logits_layout)?;
            let label_view = View::<2>::new(OP, "labels", labels_layout)?;
            let problem = problem(&self.plan, &view);
            let (g, g_layout) = self.grad_losses.storage_and_layout();
            let candle_core::Storage::Cpu(g) = &*g else {
                candle_core::bail!("{OP}: the loss gradient is not on the CPU");
            };
            let grads = super::host::on_host([logits, labels, table, g], |exec, [l, y, t, g]| {
                let grad = (g, g_layout.start_offset());
                cuda::backward(
                    exec,
                    problem,
                    (l, view),
                    (y, label_view),
                    t,
                    grad,
                    weight_sums,
                )
            })?;
            return Ok((grads, Shape::from_dims(&[problem.n * problem.width])));
        }
        candle_core::bail!("{OP}: kernel backward without a kernel forward")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        logits: &candle_core::CudaStorage,
        logits_layout: &Layout,
        labels: &candle_core::CudaStorage,
        labels_layout: &Layout,
        table: &candle_core::CudaStorage,
        _table_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let Some(KernelState::Cuda { weight_sums, .. }) = self.state.device.get() else {
            candle_core::bail!("{OP}: CUDA backward without a CUDA forward");
        };
        let view = View::<2>::new(OP, "logits", logits_layout)?;
        let label_view = View::<2>::new(OP, "labels", labels_layout)?;
        let problem = problem(&self.plan, &view);
        let (g, g_layout) = self.grad_losses.storage_and_layout();
        let candle_core::Storage::Cuda(g) = &*g else {
            candle_core::bail!("{OP}: the loss gradient is not on the CUDA device");
        };
        let exec = super::cuda::CudaExecutor::new(logits.device());
        let grad = (g, g_layout.start_offset());
        let grads = cuda::backward(
            &exec,
            problem,
            (logits, view),
            (labels, label_view),
            table,
            grad,
            weight_sums,
        )?;
        Ok((grads, Shape::from_dims(&[problem.n * problem.width])))
    }
}

/// The label check of one [`multi_head_cross_entropy_deferred`] call.
pub struct LabelCheck {
    #[cfg_attr(not(any(feature = "cuda", feature = "host-kernels")), allow(dead_code))]
    state: Arc<ForwardState>,
    #[cfg_attr(not(any(feature = "cuda", feature = "host-kernels")), allow(dead_code))]
    plan: Arc<Plan>,
}

impl LabelCheck {
    /// `Err` naming the first out-of-range label (head, row, value), if the
    /// forward found one. On a GPU this reads 16 bytes back: a synchronisation.
    pub fn verify(&self) -> Result<()> {
        #[cfg(any(feature = "cuda", feature = "host-kernels"))]
        {
            let error = match self.state.device.get() {
                None => None,
                #[cfg(feature = "cuda")]
                Some(KernelState::Cuda { status, .. }) => {
                    let exec = super::cuda::CudaExecutor::new(status.device());
                    cuda::label_error(&exec, status, &self.plan)?
                }
                #[cfg(feature = "host-kernels")]
                Some(KernelState::Host { status, .. }) => {
                    cuda::label_error(&super::host::HostExecutor, status, &self.plan)?
                }
            };
            if let Some(error) = error {
                return Err(error);
            }
        }
        Ok(())
    }
}

fn check_inputs(logits: &Tensor, labels: &Tensor, heads: &[CeHead]) -> Result<()> {
    check_rank(OP, "logits", logits, 2, "[N,ΣC]")?;
    check_rank(OP, "labels", labels, 2, "[N,H]")?;
    check_same_device(OP, ("logits", logits), ("labels", labels))?;
    if heads.is_empty() {
        candle_core::bail!("{OP}: needs at least one head");
    }
    let (n, width) = logits.dims2()?;
    let (label_rows, label_cols) = labels.dims2()?;
    if label_rows != n {
        candle_core::bail!(
            "{OP}: batch size mismatch: logits has N={n}, labels has N={label_rows}"
        );
    }
    if label_cols != heads.len() {
        candle_core::bail!(
            "{OP}: labels has {label_cols} columns but {} heads were given (one column per head)",
            heads.len()
        );
    }
    for (h, head) in heads.iter().enumerate() {
        if head.classes == 0 {
            candle_core::bail!("{OP}: head {h} has 0 classes; each head needs at least one");
        }
        if !(head.weight.is_finite() && head.weight >= 0.0) {
            candle_core::bail!(
                "{OP}: head {h} has weight {}; weights must be finite and >= 0",
                head.weight
            );
        }
        if let Some(w) = &head.class_weights {
            if w.len() != head.classes {
                candle_core::bail!(
                    "{OP}: head {h} has {} classes but {} class weights",
                    head.classes,
                    w.len()
                );
            }
            if let Some(bad) = w.iter().find(|w| !(w.is_finite() && **w >= 0.0)) {
                candle_core::bail!(
                    "{OP}: head {h} has class weight {bad}; class weights must be finite and >= 0"
                );
            }
        }
        if !(0.0..=1.0).contains(&head.label_smoothing) {
            candle_core::bail!(
                "{OP}: head {h} has label smoothing {}; it must be in [0, 1]",
                head.label_smoothing
            );
        }
    }
    let sum: usize = heads.iter().map(|h| h.classes).sum();
    if sum != width {
        candle_core::bail!(
            "{OP}: the heads have {sum} classes in all but logits has {width} columns"
        );
    }
    Ok(())
}

/// The ignore index of head `head` for labels of `dtype`.
fn ignore_of(head: &CeHead, dtype: DType) -> Result<i64> {
    match head.ignore_index {
        Some(i) => Ok(i),
        None => with_label_dtype!(dtype, L => Ok(<L as Label>::IGNORE.to_i64())),
    }
}

/// The same losses composed from candle's tensor ops (log-softmax, gather,
/// masks) per head: the cross-check and the benchmark baseline. Labels are not
/// range-checked.
pub fn multi_head_cross_entropy_composed(
    logits: &Tensor,
    labels: &Tensor,
    heads: &[CeHead],
) -> Result<MultiHeadLoss> {
    let labels_i64 = labels.to_dtype(DType::I64)?;
    let mut losses = Vec::with_capacity(heads.len());
    let mut offset = 0;
    for (h, head) in heads.iter().enumerate() {
        let z = logits.narrow(1, offset, head.classes)?;
        offset += head.classes;
        let y = labels_i64.narrow(1, h, 1)?;
        let labelled = y.ne(ignore_of(head, labels.dtype())?)?;
        let safe = labelled.where_cond(&y, &y.zeros_like()?)?;
        let log_p = candle_nn::ops::log_softmax(&z, 1)?;
        let picked = log_p.gather(&safe, 1)?;
        // The smoothed target's log-likelihood: (1 − ε)·log p_y + ε·mean_j log p_j.
        let eps = head.label_smoothing;
        let picked = if eps > 0.0 {
            ((picked * (1.0 - eps))? + (log_p.mean_keepdim(1)? * eps)?)?
        } else {
            picked
        };
        let mut w = labelled.to_dtype(logits.dtype())?;
        if let Some(cw) = &head.class_weights {
            let cw = Tensor::new(cw.as_slice(), logits.device())?.to_dtype(logits.dtype())?;
            let row_w = cw.index_select(&safe.flatten_all()?.to_dtype(DType::U32)?, 0)?;
            w = w.mul(&row_w.unsqueeze(1)?)?;
        }
        let denom = w.sum_all()?;
        let zero_denom = denom.eq(0.0)?;
        let safe_denom = zero_denom.where_cond(&denom.ones_like()?, &denom)?;
        losses.push((picked * w)?.sum_all()?.neg()?.div(&safe_denom)?);
    }
    let per_head = Tensor::stack(&losses, 0)?;
    let weights: Vec<f64> = heads.iter().map(|h| h.weight).collect();
    let weights = Tensor::new(weights.as_slice(), logits.device())?.to_dtype(per_head.dtype())?;
    let total = per_head.mul(&weights)?.sum_all()?;
    Ok(MultiHeadLoss { per_head, total })
}
