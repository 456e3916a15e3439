//! The encoder through the CUDA kernels, on the host harness: all-MiniLM-L6-v2
//! run inside `ops::host::run`, where the packed attention, the LayerNorms
//! with their residual add and the mean pooling take their `kernels/*.cu`
//! path (the same launch plans as on a GPU), gives the plain CPU path's
//! hidden states and gradients: the kernels composed in the real model, not
//! only each on its own.

use crate::bert_support;

use bert_support::model_files;
use candle_core::{DType, Device, Tensor, Var};
use sentence_mtl::model::load_trainable;
use sentence_mtl::model::tokenize::{encode_batch, load_tokenizer};
use sentence_mtl::ops::masked_mean_pool;

const TEXTS: [&str; 3] = [
    "The kernels run the whole encoder.",
    "short",
    "A somewhat longer sentence, so that the batch has padding to drop and restore.",
];

/// The pooled embeddings and every parameter's gradient of a fixed projection
/// of them (no dropout: the CPU path and the kernels draw it differently).
fn run(on_kernels: bool) -> (Vec<f64>, Vec<(String, Vec<f64>)>) {
    let files = model_files();
    let (encoder, vars, _) = load_trainable(&files, DType::F32, &Device::Cpu).unwrap();
    let tokenizer = load_tokenizer(&files, 64).unwrap();
    let batch = encode_batch(&tokenizer, &TEXTS, &Device::Cpu).unwrap();
    let direction = Tensor::arange(0f32, 384., &Device::Cpu)
        .unwrap()
        .affine(0.37, 0.1)
        .unwrap()
        .sin()
        .unwrap()
        .reshape((384, 1))
        .unwrap();
    let pass = || -> candle_core::Result<(Tensor, candle_core::backprop::GradStore)> {
        let hidden = encoder.forward(
            &batch.input_ids,
            Some(&batch.token_type_ids),
            &batch.attention_mask,
            false,
        )?;
        let pooled = masked_mean_pool(&hidden, &batch.attention_mask)?;
        let grads = pooled.matmul(&direction)?.sum_all()?.backward()?;
        Ok((pooled, grads))
    };
    let (pooled, grads) = if on_kernels {
        sentence_mtl::ops::host::run(pass)
    } else {
        pass()
    }
    .unwrap();
    let values = |t: &Tensor| -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let mut all: Vec<(String, Var)> = vars.data().lock().unwrap().clone().into_iter().collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let grads = all
        .into_iter()
        .map(|(name, var)| {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            (name, values(g))
        })
        .collect();
    (values(&pooled), grads)
}

#[test]
fn encoder_on_the_kernels_gives_the_cpu_paths_embeddings_and_gradients() {
    let (want_pooled, want_grads) = run(false);
    let (got_pooled, got_grads) = run(true);
    // Not the same bits: the kernels (online softmax, other summation
    // orders) really ran, rather than the CPU path twice.
    assert_ne!(got_pooled, want_pooled, "the kernel path was not taken");
    let max_abs = |v: &[f64]| v.iter().fold(0f64, |m, x| m.max(x.abs()));
    let scale = max_abs(&want_pooled);
    for (i, (g, w)) in got_pooled.iter().zip(&want_pooled).enumerate() {
        assert!((g - w).abs() <= 2e-5 * scale, "pooled[{i}]: {g} vs {w}");
    }
    assert_eq!(got_grads.len(), want_grads.len());
    let largest = want_grads
        .iter()
        .map(|(_, g)| max_abs(g))
        .fold(0f64, f64::max);
    for ((name, got), (_, want)) in got_grads.iter().zip(&want_grads) {
        // Against the largest gradient of the tensor (f32 sums in another
        // order), but at least a thousandth of the model's largest: the key
        // biases' gradient is 0 in exact arithmetic (a softmax ignores a shift
        // of all its scores), so both paths give rounding noise there.
        let scale = max_abs(want).max(1e-3 * largest);
        let worst = got
            .iter()
            .zip(want)
            .map(|(g, w)| (g - w).abs() / scale)
            .fold(0f64, f64::max);
        assert!(
            worst <= 2e-4,
            "{name}: gradient off by {worst:.2e} of its largest value"
        );
    }
}
