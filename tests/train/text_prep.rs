//! `emoji: Text`, `unescape`, `split_hashtags`, `emoticons` and
//! `shorten_elongations` prepare the text wherever it meets the
//! tokenizer: a run on tweets with emoji and escapes is, to the bit, a run
//! without them on the same tweets already prepared by `TextPrep::apply`
//! (training, validation and test), and a checkpoint's `eval` and `predict`
//! follow the settings it recorded.

use crate::train_support;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use sentence_mtl::data::Split;
use sentence_mtl::model::text::{EmojiMode, TextPrep};
use sentence_mtl::train::checkpoint::LoadedCheckpoint;
use sentence_mtl::train::evaluate::{evaluate_checkpoint, predict};
use sentence_mtl::train::{checkpoint, MultiTaskTrainer, TrainConfig, TrainReport};
use train_support::{snapshot, temp_dir, tiny_config, tiny_data, tiny_model};

/// Emoji alone, with a skin tone, as a flag, with a variation selector; an
/// escaped line break, quote and ampersand; camel-cased hashtags;
/// emoticons (one escaped) and elongated words (`reallly` shortens to a
/// word of the tiny vocabulary).
const EXTRAS: [&str; 5] = [
    "😂 #FaceYourFears :)",
    r"\nso 😡 reallly",
    "👍🏽 &amp; #NoWay &lt;3",
    r"🇺🇸 Don\u2019t :'(",
    "❤️#SoHappy Noooo",
];

const ALL: TextPrep = TextPrep {
    emoji: EmojiMode::Text,
    unescape: true,
    split_hashtags: true,
    emoticons: true,
    shorten_elongations: true,
};

/// Copies the tiny TweetEval folder `src` to `dst`, one of [`EXTRAS`]
/// appended to each text (prepared by [`ALL`] when `prepared`).
fn add_extras(src: &Path, dst: &Path, prepared: bool) -> PathBuf {
    for task in ["emotion", "sentiment"] {
        std::fs::create_dir_all(dst.join(task)).unwrap();
        for entry in std::fs::read_dir(src.join(task)).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            let mut text = std::fs::read_to_string(&path).unwrap();
            if name.ends_with("_text.txt") {
                let lines: Vec<String> = text
                    .lines()
                    .enumerate()
                    .map(|(i, line)| {
                        let line = format!("{line} {}", EXTRAS[i % EXTRAS.len()]);
                        if prepared {
                            ALL.apply(&line).into_owned()
                        } else {
                            line
                        }
                    })
                    .collect();
                text = lines.join("\n");
            }
            std::fs::write(dst.join(task).join(name), text).unwrap();
        }
    }
    dst.to_path_buf()
}

fn run(
    root: &Path,
    data: &Path,
    prep: TextPrep,
    output: &str,
) -> (TrainReport, String, serde_json::Value) {
    let config = TrainConfig {
        output_dir: Some(root.join(output)),
        epochs: 1,
        test_at_end: true,
        emoji: prep.emoji,
        unescape: prep.unescape,
        split_hashtags: prep.split_hashtags,
        emoticons: prep.emoticons,
        shorten_elongations: prep.shorten_elongations,
        ..tiny_config(&root.join("model"), data)
    };
    let mut trainer = MultiTaskTrainer::new(config, Device::Cpu, DType::F32).unwrap();
    let report = trainer.train().unwrap();
    let weights = snapshot(&trainer.model().unwrap().parameters());
    // The trainer's own test pass, losses included (the scores alone are
    // too coarse to tell two token sequences apart on the tiny model).
    let test = json(&trainer.evaluate(Split::Test).unwrap());
    (report, format!("{weights:?}"), test)
}

/// Each sentence's predictions, the sentence itself left out.
fn probabilities(loaded: &LoadedCheckpoint, sentences: &[String]) -> Vec<serde_json::Value> {
    let predictions = json(&predict(loaded, sentences, 4, &Device::Cpu).unwrap());
    let mut rows = predictions.as_array().unwrap().clone();
    for row in &mut rows {
        row.as_object_mut().unwrap().remove("text");
    }
    rows
}

fn json(value: &impl serde::Serialize) -> serde_json::Value {
    serde_json::to_value(value).unwrap()
}

#[test]
fn prepared_text_is_the_run_on_prepared_tweets() {
    let root = temp_dir("text-prep");
    tiny_model(&root.join("model"), 5, 0.1);
    let plain = tiny_data(&root.join("plain"), [21, 6, 6], 8);
    let raw = add_extras(&plain, &root.join("raw"), false);
    let named = add_extras(&plain, &root.join("named"), true);

    let none = TextPrep::default();
    let (text, text_weights, text_test) = run(&root, &raw, ALL, "text");
    let (keep_named, named_weights, named_test) = run(&root, &named, none, "keep-named");
    let (_, raw_weights, raw_test) = run(&root, &raw, none, "keep-raw");
    assert_eq!(text_weights, named_weights, "the trained weights");
    assert_eq!(json(&text.val), json(&keep_named.val));
    assert_eq!(json(&text.test), json(&keep_named.test));
    assert!(text.test.is_some());
    assert_eq!(text_test, named_test);
    // The setting changed what the model read: with the emoji kept, the
    // tokens (and so the steps) differ.
    assert_ne!(text_weights, raw_weights);
    assert_ne!(text_test, raw_test);

    let loaded_text = checkpoint::load(&root.join("text"), &Device::Cpu, None).unwrap();
    let loaded_named = checkpoint::load(&root.join("keep-named"), &Device::Cpu, None).unwrap();
    assert_eq!(loaded_text.info.config.text_prep(), ALL);
    assert_eq!(loaded_named.info.config.text_prep(), none);
    let eval = |loaded, data: &Path| {
        json(&evaluate_checkpoint(loaded, Some(data), Split::Test, 4, &Device::Cpu).unwrap())
    };
    assert_eq!(eval(&loaded_text, &raw), eval(&loaded_named, &named));

    let sentences: Vec<String> = EXTRAS.iter().map(|e| format!("so happy {e}")).collect();
    let written: Vec<String> = ALL.apply_all(&sentences);
    let from_raw = probabilities(&loaded_text, &sentences);
    assert_eq!(from_raw, probabilities(&loaded_named, &written));
    // Each setting on its own is followed: with it alone off, predictions
    // on a sentence that only it changes differ.
    type TurnOff = fn(&mut TrainConfig);
    let settings: [(&str, TurnOff); 3] = [
        ("so #FaceYourFears", |c| c.split_hashtags = false),
        ("so happy :)", |c| c.emoticons = false),
        ("so reallly happy", |c| c.shorten_elongations = false),
    ];
    for (sentence, turn_off) in settings {
        let mut without = checkpoint::load(&root.join("text"), &Device::Cpu, None).unwrap();
        turn_off(&mut without.info.config);
        let sentence = [sentence.to_string()];
        assert_ne!(
            probabilities(&loaded_text, &sentence),
            probabilities(&without, &sentence),
            "{sentence:?}"
        );
    }
    let mut kept = loaded_text;
    kept.info.config.emoji = EmojiMode::Keep;
    kept.info.config.unescape = false;
    kept.info.config.split_hashtags = false;
    kept.info.config.emoticons = false;
    kept.info.config.shorten_elongations = false;
    assert_ne!(from_raw, probabilities(&kept, &sentences));
}
