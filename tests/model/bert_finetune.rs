//! The encoder fine-tunes: gradients reach every parameter, freezing stops
//! them where asked, dropout is real in training and off otherwise, and the
//! differentiable path computes what the fast inference path computes.

use crate::bert_support;

use bert_support::{max_diff_on_tokens, model_files};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use sentence_mtl::model::tokenize::{encode_batch, load_tokenizer, Batch};
use sentence_mtl::model::{load_trainable, BertEncoder};
use sentence_mtl::ops::masked_mean_pool;

const TEXTS: [&str; 3] = [
    "I love natural language processing.",
    "Paris is the capital of France.",
    "ok",
];

fn setup(dtype: DType) -> (BertEncoder, VarMap, Batch) {
    let files = model_files();
    let (encoder, vars, _config) = load_trainable(&files, dtype, &Device::Cpu).unwrap();
    let tokenizer = load_tokenizer(&files, 64).unwrap();
    let batch = encode_batch(&tokenizer, &TEXTS, &Device::Cpu).unwrap();
    (encoder, vars, batch)
}

/// A loss on the pooled output: its projection on a fixed random direction.
fn loss(hidden: &Tensor, batch: &Batch) -> Tensor {
    let pooled = masked_mean_pool(hidden, &batch.attention_mask).unwrap();
    let direction = Tensor::randn(0f32, 1., (pooled.dim(1).unwrap(), 1), &Device::Cpu)
        .unwrap()
        .to_dtype(pooled.dtype())
        .unwrap();
    pooled.matmul(&direction).unwrap().sum_all().unwrap()
}

fn sorted_vars(vars: &VarMap) -> Vec<(String, Var)> {
    let mut all: Vec<(String, Var)> = vars
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(name, var)| (name.clone(), var.clone()))
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

fn grad_abs_sum(grads: &candle_core::backprop::GradStore, var: &Var) -> Option<f64> {
    grads.get(var.as_tensor()).map(|g| {
        g.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    })
}

#[test]
fn every_parameter_gets_a_nonzero_gradient() {
    let (encoder, vars, batch) = setup(DType::F32);
    // 3 embedding tables + LayerNorm, and 16 tensors per layer.
    assert_eq!(vars.all_vars().len(), 5 + 16 * encoder.num_layers());
    let hidden = encoder
        .forward(
            &batch.input_ids,
            Some(&batch.token_type_ids),
            &batch.attention_mask,
            true,
        )
        .unwrap();
    let grads = loss(&hidden, &batch).backward().unwrap();
    for (name, var) in sorted_vars(&vars) {
        let sum = grad_abs_sum(&grads, &var).unwrap_or_else(|| panic!("{name}: no gradient"));
        assert!(
            sum.is_finite() && sum > 0.0,
            "{name}: gradient |sum| = {sum}"
        );
    }
}

#[test]
fn half_precision_gradients_are_finite() {
    for dtype in [DType::F16, DType::BF16] {
        let (encoder, vars, batch) = setup(dtype);
        let hidden = encoder
            .forward(&batch.input_ids, None, &batch.attention_mask, true)
            .unwrap();
        let grads = loss(&hidden, &batch).backward().unwrap();
        for (name, var) in sorted_vars(&vars) {
            let sum = grad_abs_sum(&grads, &var).unwrap_or_else(|| panic!("{name}: no gradient"));
            assert!(
                sum.is_finite() && sum > 0.0,
                "{dtype:?} {name}: gradient |sum| = {sum}"
            );
        }
    }
}

#[test]
fn frozen_layers_get_no_gradient() {
    let (encoder, vars, batch) = setup(DType::F32);
    let frozen = 2;
    let hidden = encoder
        .forward_partly_frozen(
            &batch.input_ids,
            None,
            &batch.attention_mask,
            true,
            Some(frozen),
        )
        .unwrap();
    let grads = loss(&hidden, &batch).backward().unwrap();
    let is_frozen = |name: &str| {
        name.starts_with("embeddings.")
            || (0..frozen).any(|i| name.starts_with(&format!("encoder.layer.{i}.")))
    };
    for (name, var) in sorted_vars(&vars) {
        let sum = grad_abs_sum(&grads, &var);
        if is_frozen(&name) {
            assert!(sum.is_none(), "{name} is frozen yet has a gradient");
        } else {
            assert!(sum.is_some_and(|s| s > 0.0), "{name}: no gradient");
        }
    }

    let whole = encoder
        .forward_partly_frozen(
            &batch.input_ids,
            None,
            &batch.attention_mask,
            false,
            Some(encoder.num_layers()),
        )
        .unwrap();
    let grads = loss(&whole, &batch).backward().unwrap();
    for (name, var) in sorted_vars(&vars) {
        assert!(
            grads.get(var.as_tensor()).is_none(),
            "{name}: gradient through a frozen backbone"
        );
    }
    assert!(encoder
        .forward_partly_frozen(
            &batch.input_ids,
            None,
            &batch.attention_mask,
            false,
            Some(7)
        )
        .is_err());
}

#[test]
fn dropout_only_in_training_and_both_paths_agree() {
    let (encoder, _vars, batch) = setup(DType::F32);
    let run = |train| {
        encoder
            .forward(&batch.input_ids, None, &batch.attention_mask, train)
            .unwrap()
    };
    let max_diff = |a: &Tensor, b: &Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let (train_a, train_b) = (run(true), run(true));
    assert!(
        max_diff(&train_a, &train_b) > 1e-2,
        "dropout does nothing in training"
    );
    // Seeded, the masks repeat; another seed draws others.
    let seeded = |seed| {
        encoder.seed_dropout(seed);
        run(true)
    };
    assert_eq!(
        max_diff(&seeded(7), &seeded(7)),
        0.0,
        "seeded dropout repeats"
    );
    assert!(
        max_diff(&seeded(7), &seeded(8)) > 1e-2,
        "seeds give other masks"
    );
    let (eval_a, eval_b) = (run(false), run(false));
    assert_eq!(max_diff(&eval_a, &eval_b), 0.0, "eval is not deterministic");

    let fast = encoder
        .forward_inference(
            &batch.input_ids,
            Some(&batch.token_type_ids),
            &batch.attention_mask,
        )
        .unwrap();
    let diff = max_diff_on_tokens(&eval_a, &fast, &batch.attention_mask);
    assert!(
        diff <= 1e-5,
        "differentiable and fused paths differ by {diff:e}"
    );
}

#[test]
fn packed_and_padded_layers_agree_with_gradients() {
    // On the CPU the layers run on the real tokens only; the padded batch
    // under the mask must give the same hidden states at the real tokens and
    // the same gradient for every parameter.
    let (packed, vars, batch) = setup(DType::F32);
    let padded = packed.clone().with_packing(false);
    let run = |encoder: &BertEncoder| {
        let hidden = encoder
            .forward(
                &batch.input_ids,
                Some(&batch.token_type_ids),
                &batch.attention_mask,
                false,
            )
            .unwrap();
        let pooled = masked_mean_pool(&hidden, &batch.attention_mask).unwrap();
        let grads = pooled.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        (hidden, grads)
    };
    let (h_packed, g_packed) = run(&packed);
    let (h_padded, g_padded) = run(&padded);
    let diff = max_diff_on_tokens(&h_packed, &h_padded, &batch.attention_mask);
    assert!(diff <= 1e-5, "hidden states differ by {diff:e}");
    for (name, var) in sorted_vars(&vars) {
        let a = g_packed.get(var.as_tensor()).expect("packed gradient");
        let b = g_padded.get(var.as_tensor()).expect("padded gradient");
        let scale = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            scale > 0.0 && diff <= 1e-4 * scale,
            "{name}: gradients differ by {diff:e} (largest {scale:e})"
        );
    }
}
