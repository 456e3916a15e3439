//! Our encoder computes what candle-transformers' `BertModel` computes
//! (inference, f32), on both its differentiable and its fused path.

use crate::bert_support;

use bert_support::{max_diff_on_tokens, model_files};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::BertModel;
use sentence_mtl::model::tokenize::{encode_batch, load_tokenizer};
use sentence_mtl::model::{load_bert_config, load_trainable};

#[test]
fn f32_output_equals_candle_transformers_bert() {
    let files = model_files();
    // Their own config type, from the same file; ours must accept it too.
    load_bert_config(&files).unwrap();
    let config: candle_transformers::models::bert::Config =
        serde_json::from_str(&std::fs::read_to_string(&files.config).unwrap()).unwrap();
    let bytes = std::fs::read(&files.weights).unwrap();
    let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, &Device::Cpu).unwrap();
    let theirs = BertModel::load(vb, &config).unwrap();
    let (ours, _vars, _config) = load_trainable(&files, DType::F32, &Device::Cpu).unwrap();

    let tokenizer = load_tokenizer(&files, 256).unwrap();
    let texts = [
        "The Eiffel Tower is in Paris.",
        "Transformers are used in deep learning, and padding must not change a thing.",
        "",
        "Serendipity",
    ];
    let batch = encode_batch(&tokenizer, &texts, &Device::Cpu).unwrap();
    let expected = theirs
        .forward(
            &batch.input_ids,
            &batch.token_type_ids,
            Some(&batch.attention_mask),
        )
        .unwrap();
    // Real tokens only: hidden states at padding positions are never used
    // (there candle's f32::MIN mask and ours differ by up to ~5e-5).
    let max_diff = |t: &Tensor| max_diff_on_tokens(t, &expected, &batch.attention_mask);
    let differentiable = ours
        .forward(
            &batch.input_ids,
            Some(&batch.token_type_ids),
            &batch.attention_mask,
            false,
        )
        .unwrap();
    let fused = ours
        .forward_inference(
            &batch.input_ids,
            Some(&batch.token_type_ids),
            &batch.attention_mask,
        )
        .unwrap();
    assert_eq!(differentiable.dims(), expected.dims());
    let (d, f) = (max_diff(&differentiable), max_diff(&fused));
    eprintln!("max abs diff on real tokens: differentiable {d:e}, fused {f:e}");
    assert!(d <= 1e-5, "differentiable path differs by {d:e}");
    assert!(f <= 1e-5, "fused path differs by {f:e}");
}
