//! Random heads and labels for the N-head cross-entropy tests (the CPU op's in
//! `tests/ops`, the kernels' in `tests/kernels`).

use candle_core::{DType, Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::Rng;
use sentence_mtl::ops::{CeHead, IGNORE_INDEX};

/// The ignore value of a label dtype (what `CeHead::ignore_index: None` means).
pub fn dtype_ignore(dtype: DType) -> i64 {
    match dtype {
        DType::U32 => u32::MAX as i64,
        DType::U8 => 255,
        _ => IGNORE_INDEX,
    }
}

/// Random labels `[n, H]`: a class of each head, or that head's ignore value.
pub fn random_labels(
    rng: &mut StdRng,
    n: usize,
    heads: &[CeHead],
    ignore: &[i64],
    p: f64,
) -> Vec<i64> {
    (0..n)
        .flat_map(|_| {
            heads
                .iter()
                .zip(ignore)
                .map(|(h, &ig)| (h.classes, ig))
                .collect::<Vec<_>>()
        })
        .map(|(c, ig)| {
            if rng.random_bool(p) {
                ig
            } else {
                rng.random_range(0..c as i64)
            }
        })
        .collect()
}

pub fn label_tensor(labels: &[i64], cols: usize, dtype: DType) -> Result<Tensor> {
    let n = labels.len() / cols.max(1);
    Tensor::from_vec(labels.to_vec(), (n, cols), &Device::Cpu)?.to_dtype(dtype)
}

/// Heads of random class counts, weights, class weights, label smoothing and
/// (sometimes) an ignore index of their own.
pub fn random_heads(rng: &mut StdRng, h: usize, label_dtype: DType) -> (Vec<CeHead>, Vec<i64>) {
    let heads: Vec<CeHead> = (0..h)
        .map(|_| {
            let classes = rng.random_range(1..9);
            let mut head = CeHead::new(classes).with_weight(rng.random_range(0.0..2.0));
            if rng.random_bool(0.5) {
                head = head
                    .with_class_weights((0..classes).map(|_| rng.random_range(0.1..3.0)).collect());
            }
            if rng.random_bool(0.3) {
                head.ignore_index = Some(rng.random_range(9..100));
            }
            if rng.random_bool(0.5) {
                head = head.with_label_smoothing(rng.random_range(0.0..=1.0));
            }
            head
        })
        .collect();
    let ignore = heads
        .iter()
        .map(|h| h.ignore_index.unwrap_or(dtype_ignore(label_dtype)))
        .collect();
    (heads, ignore)
}
