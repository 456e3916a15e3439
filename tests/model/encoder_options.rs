//! The encoder's output options: `truncate_dim` (Matryoshka) and quantised
//! embeddings on the real model.

use crate::bert_support::model_files;
use candle_core::{DType, Device};
use sentence_mtl::model::{quantize_embeddings, Precision, QuantizedValues, SentenceEncoder};

const TEXTS: [&str; 3] = [
    "A man is playing a guitar.",
    "The weather is lovely today.",
    "Stocks fell sharply after the announcement.",
];

fn encoder() -> SentenceEncoder {
    SentenceEncoder::from_files(&model_files(), DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn truncate_dim_keeps_the_first_values_and_renormalises() {
    let full = encoder().with_normalize(false).encode(&TEXTS).unwrap();
    let full = full.to_vec2::<f32>().unwrap();
    for dim in [1, 17, 128, 384] {
        let model = encoder().with_truncate_dim(Some(dim)).unwrap();
        assert_eq!(model.embedding_dim(), dim);
        let truncated = model.encode(&TEXTS).unwrap().to_vec2::<f32>().unwrap();
        for (row, full_row) in truncated.iter().zip(&full) {
            assert_eq!(row.len(), dim);
            let norm = full_row[..dim].iter().map(|x| x * x).sum::<f32>().sqrt();
            for (got, want) in row.iter().zip(&full_row[..dim]) {
                assert!(
                    (got - want / norm).abs() <= 1e-5,
                    "dim {dim}: {got} vs {}",
                    want / norm
                );
            }
        }
    }
    // Without normalisation the first values are kept as they are.
    let raw = encoder()
        .with_normalize(false)
        .with_truncate_dim(Some(10))
        .unwrap()
        .encode(&TEXTS)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (row, full_row) in raw.iter().zip(&full) {
        assert_eq!(row[..], full_row[..10]);
    }
}

#[test]
fn truncate_dim_outside_the_model_is_an_error() {
    for dim in [0, 385] {
        let err = encoder()
            .with_truncate_dim(Some(dim))
            .unwrap_err()
            .to_string();
        assert!(err.contains("384"), "{err}");
    }
}

#[test]
fn quantised_embeddings_keep_the_similarity_order() {
    let texts = [
        "A man is playing a guitar.",
        "A man plays the guitar.",
        "Stocks fell sharply after the announcement.",
    ];
    let embeddings = encoder().encode(&texts).unwrap();
    let int8 = quantize_embeddings(&embeddings, Precision::Int8, None).unwrap();
    let QuantizedValues::I8(v) = &int8.values else {
        panic!("int8 values")
    };
    let row = |i: usize| &v[i * 384..(i + 1) * 384];
    let dot = |a: &[i8], b: &[i8]| {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| x as i32 * y as i32)
            .sum::<i32>()
    };
    // The paraphrase is closer than the unrelated sentence, in int8 too.
    assert!(dot(row(0), row(1)) > dot(row(0), row(2)));
    let ubinary = quantize_embeddings(&embeddings, Precision::Ubinary, None).unwrap();
    assert_eq!(ubinary.width, 48);
    let QuantizedValues::U8(bits) = &ubinary.values else {
        panic!("ubinary values")
    };
    let hamming = |i: usize, j: usize| {
        (0..48)
            .map(|k| (bits[i * 48 + k] ^ bits[j * 48 + k]).count_ones())
            .sum::<u32>()
    };
    assert!(hamming(0, 1) < hamming(0, 2));
}

/// `with_text_prep` prepares each text before tokenisation (the prompt
/// left as it is): the same embeddings as the prepared texts, and not
/// those of the raw ones.
#[test]
fn text_prep_embeds_the_prepared_text() {
    use sentence_mtl::model::text::{EmojiMode, TextPrep};
    let prep = TextPrep {
        emoji: EmojiMode::Text,
        unescape: true,
        split_hashtags: true,
        emoticons: true,
        shorten_elongations: true,
    };
    let raw = ["so funny😂 &amp; #FaceYourFears :)", r"line\nbreak 😡 sooo"];
    let written: Vec<String> = prep.apply_all(&raw);
    let written: Vec<&str> = written.iter().map(String::as_str).collect();
    assert_ne!(raw[..], written[..]);
    let prepared = encoder().with_text_prep(prep);
    assert_eq!(prepared.text_prep(), prep);
    let from_raw = prepared.encode(&raw).unwrap().to_vec2::<f32>().unwrap();
    let plain = encoder();
    assert_eq!(plain.text_prep(), TextPrep::default());
    assert_eq!(
        from_raw,
        plain.encode(&written).unwrap().to_vec2::<f32>().unwrap()
    );
    assert_ne!(
        from_raw,
        plain.encode(&raw).unwrap().to_vec2::<f32>().unwrap()
    );
    // With a prompt, the prompt goes before the prepared text.
    let prompted = |e: SentenceEncoder, texts: &[&str]| {
        e.with_prompt(Some("query: &amp; "))
            .unwrap()
            .encode(texts)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    };
    assert_eq!(
        prompted(encoder().with_text_prep(prep), &raw),
        prompted(encoder(), &written)
    );
}
