//! all-MiniLM-L6-v2 itself through the kernels on the host harness (the real
//! weights, so only here: the GPU binary runs on machines without the model,
//! and `encoder_training` covers the same path on a random model of
//! MiniLM's width there). Its embeddings and every parameter's gradient match
//! the plain CPU path's, in f32 and in bf16.

use crate::bert_support::model_files;
use crate::encoder_training::{assert_close, encoder_pass, Tolerance};
use candle_core::{DType, Device};

const TEXTS: [&str; 3] = [
    "The kernels run the whole encoder.",
    "short",
    "A somewhat longer sentence, so that the batch has padding to drop and restore.",
];

#[test]
fn minilm_on_the_kernels_gives_the_cpu_embeddings_and_gradients() {
    let files = model_files();
    let want = encoder_pass(&files, &TEXTS, &Device::Cpu, DType::F32);
    for dtype in [DType::F32, DType::BF16] {
        let got =
            sentence_mtl::ops::host::run(|| encoder_pass(&files, &TEXTS, &Device::Cpu, dtype));
        assert_close(
            &got,
            &want,
            &Tolerance::of(dtype),
            &format!("MiniLM {dtype:?}"),
        );
    }
}
