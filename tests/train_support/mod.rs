//! Fixtures for the multi-task tests: a tiny randomly initialised BERT folder
//! (config, seeded weights, a word-level tokenizer), a small TweetEval-shaped
//! data folder, and the paths of the shared data.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sentence_mtl::train::TrainConfig;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::normalizers::Lowercase;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::Tokenizer;

#[path = "../common/shared.rs"]
mod shared;
#[allow(unused_imports)] // only the test files that read shared/ use it
pub use shared::shared_dir;

/// A fresh, empty temp folder for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sentence-mtl-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const EMOTIONS: [&str; 4] = ["anger", "joy", "optimism", "sadness"];
const SENTIMENTS: [&str; 3] = ["negative", "neutral", "positive"];
/// Words that hint at each emotion / sentiment class, and filler.
const EMOTION_WORDS: [[&str; 3]; 4] = [
    ["furious", "hate", "rage"],
    ["happy", "laugh", "fun"],
    ["hope", "soon", "better"],
    ["cry", "miss", "alone"],
];
const SENTIMENT_WORDS: [[&str; 3]; 3] = [
    ["awful", "worst", "bad"],
    ["today", "news", "update"],
    ["great", "love", "best"],
];
const FILLER: [&str; 8] = ["the", "a", "day", "game", "really", "so", "my", "this"];

fn vocabulary() -> Vec<String> {
    let specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"];
    specials
        .iter()
        .chain(EMOTION_WORDS.iter().flatten())
        .chain(SENTIMENT_WORDS.iter().flatten())
        .chain(FILLER.iter())
        .map(|s| s.to_string())
        .collect()
}

/// A word-level tokenizer over [`vocabulary`]: lowercase, whitespace split,
/// `[CLS] text [SEP]`.
fn tokenizer(dir: &Path) -> Tokenizer {
    let vocab: HashMap<String, u32> = vocabulary()
        .into_iter()
        .enumerate()
        .map(|(i, w)| (w, i as u32))
        .collect();
    let vocab_path = dir.join("vocab.json");
    std::fs::write(&vocab_path, serde_json::to_string(&vocab).unwrap()).unwrap();
    let model = WordLevel::from_file(vocab_path.to_str().unwrap(), "[UNK]".into()).unwrap();
    let mut tok = Tokenizer::new(model);
    tok.with_normalizer(Some(Lowercase)).unwrap();
    tok.with_pre_tokenizer(Some(Whitespace {}));
    tok.with_post_processor(Some(
        TemplateProcessing::builder()
            .try_single("[CLS] $A [SEP]")
            .unwrap()
            .try_pair("[CLS] $A [SEP] $B [SEP]")
            .unwrap()
            .special_tokens(vec![("[CLS]", 2), ("[SEP]", 3)])
            .build()
            .unwrap(),
    ));
    tok
}

/// Writes a tiny BERT (hidden 32, 2 layers, 2 heads) with weights drawn from
/// `seed` into `dir`; `dropout` is its hidden and attention dropout.
pub fn tiny_model(dir: &Path, seed: u64, dropout: f64) -> PathBuf {
    tiny_model_sized(dir, seed, dropout, 32, 2)
}

/// [`tiny_model`] of `hidden` units in `heads` heads (the attention kernels
/// take head sizes 32, 64 and 128), intermediate size `2·hidden`.
pub fn tiny_model_sized(
    dir: &Path,
    seed: u64,
    dropout: f64,
    hidden: usize,
    heads: usize,
) -> PathBuf {
    let (vocab, layers, inter, positions) = (vocabulary().len(), 2, 2 * hidden, 64);
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "architectures": ["BertModel"], "model_type": "bert",
        "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "intermediate_size": inter, "hidden_act": "gelu",
        "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout,
        "max_position_embeddings": positions, "type_vocab_size": 2, "initializer_range": 0.02,
        "layer_norm_eps": 1e-12, "pad_token_id": 0, "position_embedding_type": "absolute",
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    tokenizer(dir)
        .save(dir.join("tokenizer.json"), false)
        .unwrap();

    let mut rng = StdRng::seed_from_u64(seed);
    let mut weights: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut add = |name: String, dims: &[usize], kind: &str| {
        let n: usize = dims.iter().product();
        let values: Vec<f32> = match kind {
            "ones" => vec![1.0; n],
            "zeros" => vec![0.0; n],
            _ => (0..n).map(|_| rng.random_range(-0.1f32..0.1)).collect(),
        };
        weights.insert(name, Tensor::from_vec(values, dims, &Device::Cpu).unwrap());
    };
    add(
        "embeddings.word_embeddings.weight".into(),
        &[vocab, hidden],
        "rand",
    );
    add(
        "embeddings.position_embeddings.weight".into(),
        &[positions, hidden],
        "rand",
    );
    add(
        "embeddings.token_type_embeddings.weight".into(),
        &[2, hidden],
        "rand",
    );
    add("embeddings.LayerNorm.weight".into(), &[hidden], "ones");
    add("embeddings.LayerNorm.bias".into(), &[hidden], "zeros");
    for i in 0..layers {
        let p = format!("encoder.layer.{i}");
        for m in [
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ] {
            add(format!("{p}.{m}.weight"), &[hidden, hidden], "rand");
            add(format!("{p}.{m}.bias"), &[hidden], "rand");
        }
        add(
            format!("{p}.intermediate.dense.weight"),
            &[inter, hidden],
            "rand",
        );
        add(format!("{p}.intermediate.dense.bias"), &[inter], "rand");
        add(format!("{p}.output.dense.weight"), &[hidden, inter], "rand");
        add(format!("{p}.output.dense.bias"), &[hidden], "rand");
        for ln in ["attention.output.LayerNorm", "output.LayerNorm"] {
            add(format!("{p}.{ln}.weight"), &[hidden], "ones");
            add(format!("{p}.{ln}.bias"), &[hidden], "zeros");
        }
    }
    let weights: HashMap<String, Tensor> = weights.into_iter().collect();
    candle_core::safetensors::save(&weights, dir.join("model.safetensors")).unwrap();
    dir.to_path_buf()
}

/// One sentence for class `label` of a task: two of its cue words among filler.
fn sentence(rng: &mut StdRng, cues: &[&str; 3]) -> String {
    let mut words: Vec<&str> = (0..rng.random_range(2..7))
        .map(|_| FILLER[rng.random_range(0..FILLER.len())])
        .collect();
    for _ in 0..2 {
        let at = rng.random_range(0..=words.len());
        words.insert(at, cues[rng.random_range(0..3)]);
    }
    words.join(" ")
}

/// A TweetEval-shaped folder (`emotion/`, `sentiment/`) of `rows[split]` rows
/// per task and split (train, val, test), labels cycling over the classes.
pub fn tiny_data(dir: &Path, rows: [usize; 3], seed: u64) -> PathBuf {
    let mut rng = StdRng::seed_from_u64(seed);
    for (task, names, cues) in [
        ("emotion", &EMOTIONS[..], &EMOTION_WORDS[..]),
        ("sentiment", &SENTIMENTS[..], &SENTIMENT_WORDS[..]),
    ] {
        let task_dir = dir.join(task);
        std::fs::create_dir_all(&task_dir).unwrap();
        let mapping: String = names
            .iter()
            .enumerate()
            .map(|(i, n)| format!("{i}\t{n}\n"))
            .collect();
        std::fs::write(task_dir.join("mapping.txt"), mapping).unwrap();
        for (split, n) in ["train", "val", "test"].into_iter().zip(rows) {
            let labels: Vec<usize> = (0..n)
                .map(|i| (i * 7 + split.len()) % names.len())
                .collect();
            let texts: Vec<String> = labels
                .iter()
                .map(|&l| sentence(&mut rng, &cues[l]))
                .collect();
            std::fs::write(task_dir.join(format!("{split}_text.txt")), texts.join("\n")).unwrap();
            let labels: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
            std::fs::write(
                task_dir.join(format!("{split}_labels.txt")),
                labels.join("\n") + "\n",
            )
            .unwrap();
        }
    }
    dir.to_path_buf()
}

/// A quick configuration on the tiny model and data: no output, no test pass,
/// quiet, dropout as the model was written with.
pub fn tiny_config(model: &Path, data: &Path) -> TrainConfig {
    TrainConfig {
        tasks: TrainConfig::tweeteval_tasks(data, "emotion", "sentiment"),
        model: model.display().to_string(),
        epochs: 2,
        batch_size: 8,
        eval_batch_size: 16,
        max_len: 16,
        backbone_lr: 1e-3,
        head_lr: 1e-2,
        test_at_end: false,
        verbose: false,
        ..TrainConfig::default()
    }
}

/// Every parameter's values, by name.
pub fn snapshot(params: &BTreeMap<String, candle_core::Var>) -> BTreeMap<String, Vec<f32>> {
    params
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_tensor()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap(),
            )
        })
        .collect()
}

/// An STS-B-shaped folder (`stsb-en-{train,dev,test}.csv`) of `rows[split]`
/// rated pairs per split: two sentences of the same emotion cues score high,
/// of different ones low (plus noise), so the ratings have a learnable order.
pub fn tiny_sts(dir: &Path, rows: [usize; 3], seed: u64) -> PathBuf {
    let mut rng = StdRng::seed_from_u64(seed);
    std::fs::create_dir_all(dir).unwrap();
    for (split, n) in ["train", "dev", "test"].into_iter().zip(rows) {
        let mut csv = String::new();
        for i in 0..n {
            let a = i % EMOTION_WORDS.len();
            let b = if i % 2 == 0 {
                a
            } else {
                (a + 1) % EMOTION_WORDS.len()
            };
            let score = if a == b { 4.0 } else { 1.0 } + rng.random_range(0.0..1.0);
            let (s1, s2) = (
                sentence(&mut rng, &EMOTION_WORDS[a]),
                sentence(&mut rng, &EMOTION_WORDS[b]),
            );
            csv.push_str(&format!("{s1},{s2},{score:.2}\n"));
        }
        std::fs::write(dir.join(format!("stsb-en-{split}.csv")), csv).unwrap();
    }
    dir.to_path_buf()
}
