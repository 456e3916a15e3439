//! Every pooling mode of sentence-transformers' `Pooling` against an f64
//! reference (each padding rule, concatenated modes, f32/f16/bf16, strided
//! states, odd sizes, all-padding rows); then model folders built here (a tiny
//! random BERT with `modules.json`, `1_Pooling`, `2_Dense`, `Normalize` and
//! prompts) against the same reference applied to the BERT's own token states.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sentence_mtl::model::tokenize::{pad, pad_id, tokenize};
use sentence_mtl::model::{pool, ModelFiles, Pooling, SentenceEncoder};

use crate::train_support::{temp_dir, tiny_model};

/// `x[b][t][h]` and `mask[b][t]` pooled by `modes` (sentence-transformers'
/// formulas, in their order), in f64; max pooling fills padding with -1e9.
fn reference(x: &[Vec<Vec<f64>>], mask: &[Vec<f64>], modes: &[Pooling]) -> Vec<Vec<f64>> {
    reference_with_fill(x, mask, modes, -1e9)
}

/// [`reference`] with `fill` for padding in max pooling (f16 cannot hold
/// -1e9: there it is f16's lowest value, -65504).
fn reference_with_fill(
    x: &[Vec<Vec<f64>>],
    mask: &[Vec<f64>],
    modes: &[Pooling],
    fill: f64,
) -> Vec<Vec<f64>> {
    let h = x[0][0].len();
    x.iter()
        .zip(mask)
        .map(|(rows, m)| {
            let mut out = Vec::new();
            let weighted = |w: &dyn Fn(usize) -> f64, sqrt: bool| -> Vec<f64> {
                let total: f64 = (0..rows.len()).map(w).sum::<f64>().max(1e-9);
                let d = if sqrt { total.sqrt() } else { total };
                (0..h)
                    .map(|k| (0..rows.len()).map(|t| w(t) * rows[t][k]).sum::<f64>() / d)
                    .collect()
            };
            let on = |t: usize| if m[t] != 0.0 { 1.0 } else { 0.0 };
            for mode in Pooling::ALL.into_iter().filter(|p| modes.contains(p)) {
                out.extend(match mode {
                    Pooling::Cls => rows[0].clone(),
                    Pooling::Max => (0..h)
                        .map(|k| {
                            (0..rows.len())
                                .map(|t| if on(t) > 0.0 { rows[t][k] } else { fill })
                                .fold(f64::NEG_INFINITY, f64::max)
                        })
                        .collect(),
                    Pooling::Mean => weighted(&on, false),
                    Pooling::MeanSqrtLen => weighted(&on, true),
                    Pooling::WeightedMean => weighted(&|t| on(t) * (t + 1) as f64, false),
                    Pooling::LastToken => match (0..rows.len()).rev().find(|&t| on(t) > 0.0) {
                        Some(t) => rows[t].clone(),
                        None => vec![0.0; h],
                    },
                });
            }
            out
        })
        .collect()
}

fn to_f64(t: &Tensor) -> Vec<Vec<Vec<f64>>> {
    t.to_dtype(DType::F64).unwrap().to_vec3::<f64>().unwrap()
}

fn assert_rows_close(got: &Tensor, want: &[Vec<f64>], tol: f64, what: &str) {
    let got = got.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
    assert_eq!(got.len(), want.len(), "{what}: rows");
    for (b, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{what}: row {b} width");
        for (k, (x, y)) in g.iter().zip(w).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "{what}: row {b} [{k}]: {x} vs {y}"
            );
        }
    }
}

/// Masks: a full row, one token, none at all, a prefix, and one with a gap.
fn masks(t: usize) -> Vec<Vec<f64>> {
    vec![
        vec![1.0; t],
        (0..t).map(|i| (i == 0) as u8 as f64).collect(),
        vec![0.0; t],
        (0..t).map(|i| (i < t / 2 + 1) as u8 as f64).collect(),
        (0..t).map(|i| (i % 3 != 1) as u8 as f64).collect(),
    ]
}

/// Every single mode, two pairs, and all six together.
fn mode_sets() -> Vec<Vec<Pooling>> {
    let mut sets: Vec<Vec<Pooling>> = Pooling::ALL.iter().map(|&m| vec![m]).collect();
    sets.push(vec![Pooling::Mean, Pooling::Cls]);
    sets.push(vec![Pooling::LastToken, Pooling::Max]);
    sets.push(Pooling::ALL.to_vec());
    sets
}

#[test]
fn every_mode_and_concatenation_matches_the_f64_reference() {
    let mut rng = StdRng::seed_from_u64(40);
    let (b, t, h) = (5, 7, 37);
    let values: Vec<f32> = (0..b * t * h)
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    let mask_rows = masks(t);
    let mask_flat: Vec<u32> = mask_rows.iter().flatten().map(|&v| v as u32).collect();
    let mask_u32 = Tensor::from_vec(mask_flat, (b, t), &Device::Cpu).unwrap();
    let mask_f32 = mask_u32.to_dtype(DType::F32).unwrap();
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::F16, 4e-3), (DType::BF16, 2e-2)] {
        let hidden = Tensor::from_vec(values.clone(), (b, t, h), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        // The reference reads the values the dtype holds.
        let x = to_f64(&hidden);
        for modes in mode_sets() {
            let fill = if dtype == DType::F16 { -65504.0 } else { -1e9 };
            let want = reference_with_fill(&x, &mask_rows, &modes, fill);
            for mask in [&mask_u32, &mask_f32] {
                let got = pool(&hidden, mask, &modes).unwrap();
                assert_eq!(got.dtype(), dtype);
                assert_eq!(got.dims(), [b, h * modes.len()]);
                assert_rows_close(&got, &want, tol, &format!("{dtype:?} {modes:?}"));
            }
        }
    }
}

#[test]
fn strided_states_one_token_and_given_order_do_not_matter() {
    let mut rng = StdRng::seed_from_u64(41);
    let (b, t, h) = (3, 6, 33);
    // [B, H, T] transposed to a non-contiguous [B, T, H] view.
    let stored: Vec<f32> = (0..b * t * h)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let hidden = Tensor::from_vec(stored, (b, h, t), &Device::Cpu)
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    assert!(!hidden.is_contiguous());
    let mask_rows = vec![vec![1.0, 1.0, 1.0, 0.0, 0.0, 0.0]; b];
    let mask = Tensor::new(&[[1u32, 1, 1, 0, 0, 0]; 3], &Device::Cpu).unwrap();
    let x = to_f64(&hidden);
    for modes in mode_sets() {
        let got = pool(&hidden, &mask, &modes).unwrap();
        assert_rows_close(
            &got,
            &reference(&x, &mask_rows, &modes),
            1e-5,
            &format!("strided {modes:?}"),
        );
    }
    // Reversed order gives sentence-transformers' order all the same.
    let mut reversed = Pooling::ALL.to_vec();
    reversed.reverse();
    let a = pool(&hidden, &mask, &reversed)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let b_ = pool(&hidden, &mask, &Pooling::ALL)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(a, b_);
    // One token: every mode but cls and max agrees with it up to scaling by 1.
    let one = hidden.narrow(1, 0, 1).unwrap();
    let one_mask = Tensor::new(&[[1u32]; 3], &Device::Cpu).unwrap();
    let token = one.squeeze(1).unwrap().to_vec2::<f32>().unwrap();
    for mode in Pooling::ALL {
        let got = pool(&one, &one_mask, &[mode])
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (g, w) in got.iter().flatten().zip(token.iter().flatten()) {
            assert!((g - w).abs() <= 1e-6, "{mode:?}: {g} vs {w}");
        }
    }
}

#[test]
fn bad_pooling_input_is_an_error() {
    let hidden = Tensor::ones((2, 3, 4), DType::F32, &Device::Cpu).unwrap();
    let mask = Tensor::ones((2, 3), DType::U32, &Device::Cpu).unwrap();
    let e = pool(
        &hidden,
        &Tensor::ones((2, 4), DType::U32, &Device::Cpu).unwrap(),
        &[Pooling::Max],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("[batch, tokens]"), "{e}");
    assert!(pool(&hidden.flatten_from(1).unwrap(), &mask, &[Pooling::Mean]).is_err());
    let e = pool(&hidden, &mask, &[]).unwrap_err().to_string();
    assert!(e.contains("no pooling mode"), "{e}");
}

// ---- model folders ----

fn write_json(path: &Path, value: serde_json::Value) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, serde_json::to_string_pretty(&value).unwrap()).unwrap();
}

/// A tiny BERT folder with a sentence-transformers pipeline: pooling `modes`,
/// then a Dense module of `dense_out` values (tanh, with bias) if given, then
/// Normalize if asked; `include_prompt` and a `query` prompt in its config.
fn st_folder(
    name: &str,
    modes: &[Pooling],
    dense_out: Option<usize>,
    normalize: bool,
    include_prompt: bool,
) -> ModelFiles {
    let dir = temp_dir(name);
    tiny_model(&dir, 7, 0.0);
    let hidden = 32;
    let mut pooling =
        serde_json::json!({"word_embedding_dimension": hidden, "include_prompt": include_prompt});
    for mode in Pooling::ALL {
        pooling[mode.config_key()] = modes.contains(&mode).into();
    }
    write_json(&dir.join("1_Pooling/config.json"), pooling);
    let mut modules = vec![
        serde_json::json!({"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}),
        serde_json::json!({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}),
    ];
    if let Some(out) = dense_out {
        let in_features = hidden * modes.len();
        write_json(
            &dir.join("2_Dense/config.json"),
            serde_json::json!({"in_features": in_features, "out_features": out, "bias": true,
                "activation_function": "torch.nn.modules.activation.Tanh"}),
        );
        let mut rng = StdRng::seed_from_u64(8);
        let w: Vec<f32> = (0..out * in_features)
            .map(|_| rng.random_range(-0.3..0.3))
            .collect();
        let b: Vec<f32> = (0..out).map(|_| rng.random_range(-0.3..0.3)).collect();
        let tensors = std::collections::HashMap::from([
            (
                "linear.weight".to_string(),
                Tensor::from_vec(w, (out, in_features), &Device::Cpu).unwrap(),
            ),
            (
                "linear.bias".to_string(),
                Tensor::from_vec(b, out, &Device::Cpu).unwrap(),
            ),
        ]);
        candle_core::safetensors::save(&tensors, dir.join("2_Dense/model.safetensors")).unwrap();
        modules.push(serde_json::json!({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}));
    }
    if normalize {
        modules.push(serde_json::json!({"idx": 3, "name": "3", "path": "3_Normalize", "type": "sentence_transformers.models.Normalize"}));
    }
    write_json(&dir.join("modules.json"), serde_json::Value::Array(modules));
    write_json(
        &dir.join("config_sentence_transformers.json"),
        serde_json::json!({"prompts": {"query": "my hope ", "document": ""}, "default_prompt_name": null}),
    );
    ModelFiles::from_dir(&dir).unwrap()
}

/// The reference pipeline for `text` (the encoder's prompt already applied by
/// its `tokenize`): the BERT's token states, the f64 pooling with the first
/// `excluded` tokens masked, the Dense module in f64, normalisation.
fn reference_embedding(
    files: &ModelFiles,
    encoder: &SentenceEncoder,
    text: &str,
    modes: &[Pooling],
    excluded: usize,
    normalize: bool,
) -> Vec<f64> {
    let tokens = encoder.tokenize(&[text]).unwrap();
    let batch = pad(&[&tokens[0]], pad_id(encoder.tokenizer()), &Device::Cpu).unwrap();
    let hidden = encoder
        .model()
        .forward_inference(
            &batch.input_ids,
            Some(&batch.token_type_ids),
            &batch.attention_mask,
        )
        .unwrap();
    let t = tokens[0].len();
    let mask: Vec<f64> = (0..t).map(|i| (i >= excluded) as u8 as f64).collect();
    let mut v = reference(&to_f64(&hidden), &[mask], modes).remove(0);
    let dense = files.dir.join("2_Dense/model.safetensors");
    if dense.is_file() {
        let tensors = candle_core::safetensors::load(&dense, &Device::Cpu).unwrap();
        let w = tensors["linear.weight"]
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        let b = tensors["linear.bias"]
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        v = w
            .iter()
            .zip(&b)
            .map(|(row, bias)| (row.iter().zip(&v).map(|(a, x)| a * x).sum::<f64>() + bias).tanh())
            .collect();
    }
    if normalize {
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
        v.iter_mut().for_each(|x| *x /= n);
    }
    v
}

const TEXTS: [&str; 3] = [
    "the game was so fun",
    "awful",
    "my day really was the worst day",
];

#[test]
fn model_folders_with_each_pooling_mode_match_the_reference() {
    for (i, modes) in mode_sets().into_iter().enumerate() {
        let files = st_folder(&format!("pool-{i}"), &modes, None, i % 2 == 0, true);
        let encoder = SentenceEncoder::from_files(&files, DType::F32, &Device::Cpu).unwrap();
        let in_st_order: Vec<Pooling> = Pooling::ALL
            .into_iter()
            .filter(|m| modes.contains(m))
            .collect();
        assert_eq!(encoder.settings().pooling, in_st_order);
        assert_eq!(encoder.embedding_dim(), 32 * modes.len());
        let got = encoder.encode(&TEXTS).unwrap();
        let want: Vec<Vec<f64>> = TEXTS
            .iter()
            .map(|t| reference_embedding(&files, &encoder, t, &modes, 0, i % 2 == 0))
            .collect();
        assert_rows_close(&got, &want, 1e-5, &format!("folder {modes:?}"));
    }
}

#[test]
fn dense_module_and_normalize_follow_the_pooling() {
    let modes = [Pooling::Cls, Pooling::Mean];
    let files = st_folder("dense", &modes, Some(11), true, true);
    let encoder = SentenceEncoder::from_files(&files, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(encoder.embedding_dim(), 11);
    let got = encoder.encode(&TEXTS).unwrap();
    let want: Vec<Vec<f64>> = TEXTS
        .iter()
        .map(|t| reference_embedding(&files, &encoder, t, &modes, 0, true))
        .collect();
    assert_rows_close(&got, &want, 1e-5, "dense");
    // truncate_dim is bounded by the Dense output, not the hidden size.
    let e = SentenceEncoder::from_files(&files, DType::F32, &Device::Cpu)
        .unwrap()
        .with_truncate_dim(Some(12))
        .unwrap_err()
        .to_string();
    assert!(e.contains("11"), "{e}");
    // A pooling override of another width no longer fits the Dense module.
    let e = SentenceEncoder::from_files(&files, DType::F32, &Device::Cpu)
        .unwrap()
        .with_pooling_modes(&[Pooling::Mean])
        .unwrap_err()
        .to_string();
    assert!(e.contains("2_Dense") && e.contains("64"), "{e}");
}

#[test]
fn prompts_are_prepended_and_left_out_of_the_pooling_where_the_model_says() {
    let modes = [Pooling::Mean];
    // include_prompt: true — a prompt is exactly the text written before.
    let files = st_folder("prompt-in", &modes, None, true, true);
    let plain = SentenceEncoder::from_files(&files, DType::F32, &Device::Cpu).unwrap();
    let prompted = SentenceEncoder::from_files(&files, DType::F32, &Device::Cpu)
        .unwrap()
        .with_prompt_name("query")
        .unwrap();
    assert_eq!(prompted.prompt(), Some("my hope "));
    let joined: Vec<String> = TEXTS.iter().map(|t| format!("my hope {t}")).collect();
    let joined: Vec<&str> = joined.iter().map(String::as_str).collect();
    assert_eq!(
        prompted.encode(&TEXTS).unwrap().to_vec2::<f32>().unwrap(),
        plain.encode(&joined).unwrap().to_vec2::<f32>().unwrap()
    );

    // include_prompt: false — [CLS] and the prompt's two words are not pooled.
    let files = st_folder("prompt-out", &modes, None, true, false);
    let encoder = SentenceEncoder::from_files(&files, DType::F32, &Device::Cpu)
        .unwrap()
        .with_prompt(Some("my hope "))
        .unwrap();
    let prompt_len = tokenize(encoder.tokenizer(), &["my hope "]).unwrap()[0].len() - 1;
    assert_eq!(prompt_len, 3);
    let got = encoder.encode(&TEXTS).unwrap();
    let want: Vec<Vec<f64>> = TEXTS
        .iter()
        .map(|t| reference_embedding(&files, &encoder, t, &modes, prompt_len, true))
        .collect();
    assert_rows_close(&got, &want, 1e-5, "prompt excluded");
    let included: Vec<Vec<f64>> = TEXTS
        .iter()
        .map(|t| reference_embedding(&files, &encoder, t, &modes, 0, true))
        .collect();
    assert!(want[0]
        .iter()
        .zip(&included[0])
        .any(|(a, b)| (a - b).abs() > 1e-3));

    let e = encoder.with_prompt_name("passage").unwrap_err().to_string();
    assert!(
        e.contains("passage") && e.contains("document, query"),
        "{e}"
    );
}

#[test]
fn a_default_prompt_name_applies_without_asking() {
    let files = st_folder("prompt-default", &[Pooling::Mean], None, false, true);
    write_json(
        &files.dir.join("config_sentence_transformers.json"),
        serde_json::json!({"prompts": {"query": "my hope "}, "default_prompt_name": "query"}),
    );
    let encoder = SentenceEncoder::from_files(&files, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(encoder.prompt(), Some("my hope "));
    let none = encoder.with_prompt(None).unwrap();
    assert_eq!(none.prompt(), None);
    write_json(
        &files.dir.join("config_sentence_transformers.json"),
        serde_json::json!({"prompts": {"query": "q "}, "default_prompt_name": "passage"}),
    );
    let e = format!(
        "{:#}",
        SentenceEncoder::from_files(&files, DType::F32, &Device::Cpu).unwrap_err()
    );
    assert!(e.contains("passage"), "{e}");
}

#[test]
fn unknown_pooling_modes_modules_and_activations_are_errors() {
    let load = |files: &ModelFiles| {
        format!(
            "{:#}",
            SentenceEncoder::from_files(files, DType::F32, &Device::Cpu).unwrap_err()
        )
    };
    let files = st_folder("bad-mode", &[Pooling::Mean], None, false, true);
    write_json(
        &files.dir.join("1_Pooling/config.json"),
        serde_json::json!({"pooling_mode_median_tokens": true}),
    );
    let e = load(&files);
    assert!(e.contains("unknown pooling mode \"median_tokens\""), "{e}");
    write_json(
        &files.dir.join("1_Pooling/config.json"),
        serde_json::json!({"pooling_mode_mean_tokens": false}),
    );
    assert!(load(&files).contains("names no pooling mode"));

    let files = st_folder("bad-module", &[Pooling::Mean], None, false, true);
    write_json(
        &files.dir.join("modules.json"),
        serde_json::json!([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_LayerNorm", "type": "sentence_transformers.models.LayerNorm"}]),
    );
    let e = load(&files);
    assert!(
        e.contains("unsupported module") && e.contains("LayerNorm"),
        "{e}"
    );

    let files = st_folder("bad-dense", &[Pooling::Mean], Some(5), false, true);
    write_json(
        &files.dir.join("2_Dense/config.json"),
        serde_json::json!({"in_features": 32, "out_features": 5, "activation_function": "torch.nn.modules.activation.Softplus"}),
    );
    let e = load(&files);
    assert!(e.contains("Softplus"), "{e}");
    write_json(
        &files.dir.join("2_Dense/config.json"),
        serde_json::json!({"in_features": 32, "out_features": 6}),
    );
    let e = load(&files);
    assert!(e.contains("linear.weight") && e.contains("[6, 32]"), "{e}");
}
