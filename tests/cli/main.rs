//! The command line (`sentence_mtl::cli`): every command takes the same
//! `--device` and `--dtype` options, values are checked by clap with clear
//! messages, and the older `--cpu`/`--cuda` flags still parse; `sts` runs end
//! to end on the STS-B dev split.

#[path = "../common/shared.rs"]
mod shared;

use clap::Parser;
use sentence_mtl::cli::device::{DTypeArg, DeviceArgs, DeviceChoice};
use sentence_mtl::cli::{Cli, Command};
use sentence_mtl::model::Pooling;
use sentence_mtl::train::TrainConfig;

fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("sentence-mtl").chain(args.iter().copied()))
}

/// The device options of any command.
fn device_args(cli: &Cli) -> &DeviceArgs {
    match &cli.command {
        Command::Embed(a) => &a.encoder.device,
        Command::Similarity(a) => &a.encoder.device,
        Command::Sts(a) => &a.encoder.device,
        Command::Train(a) => &a.device,
        Command::Eval(a) => &a.device,
        Command::Predict(a) => &a.device,
        Command::Search(a) => &a.encoder.device,
        Command::Mine(a) => &a.encoder.device,
    }
}

/// Each command with the arguments it needs besides the device options.
const COMMANDS: [&[&str]; 8] = [
    &["embed", "a sentence"],
    &["similarity"],
    &["sts", "--data", "stsb"],
    &["train", "--data", "data"],
    &["eval", "--checkpoint", "run", "--data", "data"],
    &["predict", "--checkpoint", "run", "a sentence"],
    &["search", "--corpus", "corpus.txt", "a query"],
    &["mine", "--file", "sentences.txt"],
];

#[test]
fn every_command_takes_the_same_device_and_dtype_options() {
    for command in COMMANDS {
        let cli = parse(&[command, &["--device", "cuda:1", "--dtype", "bf16"]].concat()).unwrap();
        let device = device_args(&cli);
        assert_eq!(device.choice(), DeviceChoice::Cuda(1), "{command:?}");
        assert_eq!(device.dtype, Some(DTypeArg::Bf16), "{command:?}");

        let cli = parse(command).unwrap();
        let device = device_args(&cli);
        assert_eq!(device.choice(), DeviceChoice::Auto, "{command:?} default");
        assert_eq!(
            device.dtype(),
            candle_core::DType::F32,
            "{command:?} default"
        );
        assert_eq!(device.dtype_override(), None, "{command:?} default");
    }
}

#[test]
fn device_cpu_opens_the_cpu() {
    let cli = parse(&["similarity", "--device", "cpu"]).unwrap();
    assert!(device_args(&cli).device().unwrap().is_cpu());
}

#[test]
fn a_bad_device_or_dtype_is_refused_with_the_accepted_values() {
    let err = parse(&["train", "--data", "d", "--device", "gpu"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("expected auto, cpu, cuda or cuda:N"), "{err}");
    let err = parse(&["embed", "x", "--dtype", "f8"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("f32") && err.contains("bf16"), "{err}");
}

#[test]
fn the_older_cpu_and_cuda_flags_still_parse() {
    let cli = parse(&["train", "--data", "d", "--cpu"]).unwrap();
    assert_eq!(device_args(&cli).choice(), DeviceChoice::Cpu);
    let cli = parse(&["embed", "x", "--cuda"]).unwrap();
    assert_eq!(device_args(&cli).choice(), DeviceChoice::Cuda(0));
    assert!(parse(&["train", "--data", "d", "--cpu", "--device", "cuda"]).is_err());
}

#[test]
fn pooling_is_one_of_the_pooling_modes() {
    let cli = parse(&["embed", "x", "--pooling", "cls"]).unwrap();
    let Command::Embed(args) = cli.command else {
        panic!("not embed")
    };
    assert_eq!(args.encoder.pooling, vec![Pooling::Cls]);
    // Several modes (concatenated), by our names or sentence-transformers'.
    let cli = parse(&[
        "embed",
        "x",
        "--pooling",
        "mean,weighted-mean,lasttoken,mean_sqrt_len_tokens",
    ])
    .unwrap();
    let Command::Embed(args) = cli.command else {
        panic!("not embed")
    };
    assert_eq!(
        args.encoder.pooling,
        vec![
            Pooling::Mean,
            Pooling::WeightedMean,
            Pooling::LastToken,
            Pooling::MeanSqrtLen
        ]
    );
    assert!(parse(&["embed", "x", "--prompt", "q: ", "--prompt-name", "query"]).is_err());
    let err = parse(&["embed", "x", "--pooling", "maximum"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("mean") && err.contains("cls"), "{err}");
}

#[test]
fn sts_prints_the_dev_split_scores_as_one_json_line() {
    let data = shared::shared_dir().join("data/stsb");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_sentence-mtl"))
        .args(["sts", "--split", "dev", "--device", "cpu", "--data"])
        .arg(&data)
        .output()
        .expect("the binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "sts failed: {stderr}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["pairs"], 1500);
    assert!(json["file"].as_str().unwrap().ends_with("stsb-en-dev.csv"));
    // An encoder that works scores far above chance (0) on dev; the test split's
    // exact figure is checked in tests/model/sts.rs.
    let spearman = json["spearman"].as_f64().unwrap();
    let pearson = json["pearson"].as_f64().unwrap();
    assert!(spearman > 80.0 && spearman <= 100.0, "{json}");
    assert!(pearson > 80.0 && pearson <= 100.0, "{json}");
}

#[test]
fn sts_on_a_missing_folder_is_an_error_naming_it() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_sentence-mtl"))
        .args(["sts", "--device", "cpu", "--data", "/nonexistent/stsb"])
        .output()
        .expect("the binary runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/stsb"), "{stderr}");
}

#[test]
fn embed_writes_truncated_binary_embeddings_as_json_bytes() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_sentence-mtl"))
        .args([
            "embed",
            "--device",
            "cpu",
            "--truncate-dim",
            "20",
            "--precision",
            "ubinary",
        ])
        .args(["first sentence", "second sentence"])
        .output()
        .expect("the binary runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rows: Vec<Vec<u8>> = serde_json::from_slice(&output.stdout).unwrap();
    // 20 bits per row: 3 bytes, the last holding 4 bits (its low 4 zero).
    assert_eq!(rows.len(), 2);
    assert!(
        rows.iter().all(|r| r.len() == 3 && r[2] & 0x0f == 0),
        "{rows:?}"
    );
}

#[test]
fn calibration_without_an_integer_precision_is_refused() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_sentence-mtl"))
        .args(["embed", "--device", "cpu", "--calibration", "c.npy", "x"])
        .output()
        .expect("the binary runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("int8 or uint8"), "{stderr}");
}

/// A file under the system's temp folder, unique to this test process.
fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sentence-mtl-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn run_cli(args: &[&std::ffi::OsStr]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_sentence-mtl"))
        .args(args)
        .output()
        .expect("the binary runs")
}

/// Runs the binary, asserts it succeeded, and parses its JSON output.
fn run_cli_json(args: &[&std::ffi::OsStr]) -> serde_json::Value {
    let output = run_cli(args);
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

const CORPUS: &str = "The stock market crashed today.\nA man is playing the guitar.\nIt is raining in London.\nShare prices plunged this morning.\n";

#[test]
fn search_prints_each_querys_best_rows_with_index_text_and_score() {
    let corpus = temp_file("corpus.txt", CORPUS.as_bytes());
    let json = run_cli_json(&[
        "search".as_ref(),
        "--device".as_ref(),
        "cpu".as_ref(),
        "--top-k".as_ref(),
        "2".as_ref(),
        "--chunk-rows".as_ref(),
        "3".as_ref(),
        "--corpus".as_ref(),
        corpus.as_os_str(),
        "Someone plays a guitar.".as_ref(),
        "Stocks fell sharply.".as_ref(),
    ]);
    let queries = json.as_array().unwrap();
    assert_eq!(queries.len(), 2);
    assert_eq!(queries[0]["query"], "Someone plays a guitar.");
    let hits = queries[0]["hits"].as_array().unwrap();
    assert_eq!(hits.len(), 2);
    assert_eq!(hits[0]["index"], 1);
    assert_eq!(hits[0]["text"], "A man is playing the guitar.");
    assert!(hits[0]["score"].as_f64().unwrap() > hits[1]["score"].as_f64().unwrap());
    let finance: Vec<u64> = queries[1]["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["index"].as_u64().unwrap())
        .collect();
    assert_eq!(finance.len(), 2);
    assert!(finance.contains(&0) && finance.contains(&3), "{json}");
}

#[test]
fn search_refuses_k_zero_an_empty_corpus_bad_utf8_and_a_wrong_width_npy() {
    let corpus = temp_file("corpus-ok.txt", CORPUS.as_bytes());
    let empty = temp_file("corpus-empty.txt", b"");
    let bad_utf8 = temp_file("queries-bad.txt", b"fine\n\xff\xfe broken\n");
    // An [2, 5] float32 .npy (the model's embeddings have 384 values), and
    // an [2, 384] int32 one.
    let npy = |descr: &str, cols: usize| -> Vec<u8> {
        let mut npy = b"\x93NUMPY\x01\x00".to_vec();
        let header =
            format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': (2, {cols}), }}");
        let padded = format!("{header:<117}\n");
        npy.extend_from_slice(&(padded.len() as u16).to_le_bytes());
        npy.extend_from_slice(padded.as_bytes());
        npy.extend(std::iter::repeat_n(0u8, 2 * cols * 4));
        npy
    };
    let narrow = temp_file("corpus-narrow.npy", &npy("<f4", 5));
    let integer = temp_file("corpus-int.npy", &npy("<i4", 384));
    let cases: [(Vec<&std::ffi::OsStr>, &str); 5] = [
        (
            vec![
                "--top-k".as_ref(),
                "0".as_ref(),
                "--corpus".as_ref(),
                corpus.as_os_str(),
                "q".as_ref(),
            ],
            "at least 1",
        ),
        (
            vec!["--corpus".as_ref(), empty.as_os_str(), "q".as_ref()],
            "no",
        ),
        (
            vec![
                "--corpus".as_ref(),
                corpus.as_os_str(),
                "--file".as_ref(),
                bad_utf8.as_os_str(),
            ],
            "UTF-8",
        ),
        (
            vec!["--corpus".as_ref(), narrow.as_os_str(), "q".as_ref()],
            "384",
        ),
        (
            vec!["--corpus".as_ref(), integer.as_os_str(), "q".as_ref()],
            "float",
        ),
    ];
    for (args, message) in cases {
        let mut all: Vec<&std::ffi::OsStr> =
            vec!["search".as_ref(), "--device".as_ref(), "cpu".as_ref()];
        all.extend(args);
        let output = run_cli(&all);
        assert!(!output.status.success(), "{all:?} succeeded");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(message), "{all:?}: {stderr}");
    }
}

#[test]
fn mine_prints_the_closest_pair_first() {
    let file = temp_file("mine.txt", CORPUS.as_bytes());
    let json = run_cli_json(&[
        "mine".as_ref(),
        "--device".as_ref(),
        "cpu".as_ref(),
        "--top-k".as_ref(),
        "1".as_ref(),
        "--file".as_ref(),
        file.as_os_str(),
    ]);
    let pairs = json.as_array().unwrap();
    assert!(!pairs.is_empty());
    assert_eq!(
        (pairs[0]["i"].as_u64(), pairs[0]["j"].as_u64()),
        (Some(0), Some(3)),
        "{json}"
    );
    assert_eq!(pairs[0]["text_j"], "Share prices plunged this morning.");
}

#[test]
fn an_unknown_prompt_name_is_an_error_naming_the_models_prompts() {
    let output = run_cli(&[
        "embed".as_ref(),
        "--device".as_ref(),
        "cpu".as_ref(),
        "--prompt-name".as_ref(),
        "query".as_ref(),
        "x".as_ref(),
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no prompt named \"query\"") && stderr.contains("none"),
        "{stderr}"
    );
}

/// `embed --device cpu ARGS...`'s JSON embeddings.
fn embed_cpu(args: &[&str]) -> Vec<Vec<f64>> {
    let mut all: Vec<&std::ffi::OsStr> =
        vec!["embed".as_ref(), "--device".as_ref(), "cpu".as_ref()];
    all.extend(args.iter().map(std::ffi::OsStr::new));
    serde_json::from_value(run_cli_json(&all)).unwrap()
}

/// `got` is the embedding of the text as written out (to 1e-6), not that of
/// the plain text.
fn assert_written_not_plain(got: &[f64], written: &[f64], plain: &[f64]) {
    for (a, b) in got.iter().zip(written) {
        assert!((a - b).abs() <= 1e-6, "{a} vs {b}");
    }
    assert!(got.iter().zip(plain).any(|(a, b)| (a - b).abs() > 1e-3));
}

#[test]
fn a_prompt_changes_the_embedding_as_the_text_written_before_it_would() {
    let prompted = embed_cpu(&["--prompt", "query: ", "how do magnets work"]);
    let written = embed_cpu(&["query: how do magnets work"]);
    let plain = embed_cpu(&["how do magnets work"]);
    assert_written_not_plain(&prompted[0], &written[0], &plain[0]);
}

#[test]
fn embed_text_flags_embed_the_prepared_text() {
    let raw = "sooo funny😂 &amp; #FaceYourFears :)";
    let flags = [
        "--emoji",
        "text",
        "--unescape",
        "--split-hashtags",
        "--emoticons",
        "--shorten-elongations",
    ];
    let prepared = embed_cpu(&[&flags[..], &[raw]].concat());
    let written =
        embed_cpu(&["soo funny face with tears of joy  & #Face Your Fears slightly smiling face"]);
    let plain = embed_cpu(&[raw]);
    assert_written_not_plain(&prepared[0], &written[0], &plain[0]);
}

#[test]
fn search_on_embed_npy_output_finds_what_the_text_corpus_finds() {
    let corpus = temp_file("corpus-for-npy.txt", CORPUS.as_bytes());
    let npy = corpus.with_extension("npy");
    let output = run_cli(&[
        "embed".as_ref(),
        "--device".as_ref(),
        "cpu".as_ref(),
        "--format".as_ref(),
        "npy".as_ref(),
        "--output".as_ref(),
        npy.as_os_str(),
        "--file".as_ref(),
        corpus.as_os_str(),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let search = |source: &std::path::Path| -> serde_json::Value {
        run_cli_json(&[
            "search".as_ref(),
            "--device".as_ref(),
            "cpu".as_ref(),
            "--chunk-rows".as_ref(),
            "1".as_ref(),
            "--top-k".as_ref(),
            "4".as_ref(),
            "--corpus".as_ref(),
            source.as_os_str(),
            "Stocks fell sharply.".as_ref(),
        ])
    };
    let (from_npy, from_text) = (search(&npy), search(&corpus));
    let hits = |v: &serde_json::Value| -> Vec<(u64, f64)> {
        v[0]["hits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| (h["index"].as_u64().unwrap(), h["score"].as_f64().unwrap()))
            .collect()
    };
    let (a, b) = (hits(&from_npy), hits(&from_text));
    assert_eq!(a.len(), 4);
    for ((ia, sa), (ib, sb)) in a.iter().zip(&b) {
        assert_eq!(ia, ib);
        assert!((sa - sb).abs() <= 1e-5, "{sa} vs {sb}");
    }
}

/// `train --task NAME=DIR[:KIND]`: a classification task and the STS task on
/// the real model, two steps; the checkpoint records both tasks and `eval`
/// scores both (macro-F1 for one, Spearman for the other).
#[test]
fn train_takes_any_tasks_and_eval_scores_each() {
    let shared = shared::shared_dir().join("data");
    let out = std::env::temp_dir().join(format!("sentence-mtl-cli-tasks-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let emotion = format!("emo={}", shared.join("tweeteval/emotion").display());
    let sts = format!("sts={}:sts", shared.join("stsb").display());
    let report = run_cli_json(&[
        "train".as_ref(),
        "--task".as_ref(),
        emotion.as_ref(),
        "--task".as_ref(),
        sts.as_ref(),
        "--max-steps".as_ref(),
        "2".as_ref(),
        "--max-len".as_ref(),
        "32".as_ref(),
        "--quiet".as_ref(),
        "--device".as_ref(),
        "cpu".as_ref(),
        "--output".as_ref(),
        out.as_os_str(),
    ]);
    assert_eq!(report["tasks"], serde_json::json!(["emo", "sts"]));
    assert_eq!(report["steps"], 2);
    let eval = run_cli_json(&[
        "eval".as_ref(),
        "--checkpoint".as_ref(),
        out.as_os_str(),
        "--split".as_ref(),
        "val".as_ref(),
        "--device".as_ref(),
        "cpu".as_ref(),
    ]);
    let tasks = eval["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 2);
    assert_eq!(tasks[0]["task"], "emo");
    assert!(tasks[0]["metrics"]["macro_f1"].as_f64().unwrap() >= 0.0);
    assert_eq!(tasks[1]["metrics"]["pairs"], 1500);
    // Two steps barely move MiniLM: its STS figure stays near the encoder's.
    let spearman = tasks[1]["metrics"]["spearman"].as_f64().unwrap();
    assert!(spearman > 75.0, "{eval}");
    // A head of another task is refused by name.
    let output = run_cli(&[
        "train".as_ref(),
        "--task".as_ref(),
        emotion.as_ref(),
        "--freeze".as_ref(),
        "head:topic".as_ref(),
        "--max-steps".as_ref(),
        "1".as_ref(),
        "--device".as_ref(),
        "cpu".as_ref(),
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("head:topic") && stderr.contains("emo"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&out).unwrap();
}

/// `train --config FILE.toml` runs the file's settings; `--config CHECKPOINT`
/// reruns a run's settings into another folder, options given overriding.
#[test]
fn train_runs_a_settings_file_and_reruns_a_checkpoints_settings() {
    let shared = shared::shared_dir().join("data");
    let base = std::env::temp_dir().join(format!("sentence-mtl-cli-config-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (first, second) = (base.join("first"), base.join("second"));
    let settings = format!(
        "max_steps = 1\nmax_len = 24\nlabel_smoothing = 0.3\nfreeze = \"lower:1\"\n\
         emoji = \"text\"\nverbose = false\ntest_at_end = false\n\
         [[tasks]]\nname = \"emo\"\ndir = {:?}\nkind = \"classification\"\nweight = 1\n",
        shared.join("tweeteval/emotion").display().to_string()
    );
    let file = temp_file("settings.toml", settings.as_bytes());
    let cpu: [&std::ffi::OsStr; 2] = ["--device".as_ref(), "cpu".as_ref()];
    let report = run_cli_json(
        &[
            &["train".as_ref(), "--config".as_ref(), file.as_os_str()][..],
            &["--output".as_ref(), first.as_os_str()],
            &cpu,
        ]
        .concat(),
    );
    assert_eq!(report["tasks"], serde_json::json!(["emo"]));
    assert_eq!(
        (report["steps"].clone(), report["freeze"].clone()),
        (1.into(), "lower:1".into())
    );
    let recorded = |dir: &std::path::Path| -> serde_json::Value {
        let text = std::fs::read_to_string(dir.join("checkpoint/multitask.json")).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["config"].clone()
    };
    let first_config = recorded(&first);
    assert_eq!(first_config["label_smoothing"], 0.3);
    assert_eq!(first_config["emoji"], "text");

    // --print-config prints, as TOML, the settings the run recorded.
    let printed = run_cli(
        &[
            &["train".as_ref(), "--config".as_ref(), file.as_os_str()][..],
            &[
                "--output".as_ref(),
                first.as_os_str(),
                "--print-config".as_ref(),
            ],
        ]
        .concat(),
    );
    assert!(printed.status.success());
    let printed: TrainConfig =
        toml::from_str(std::str::from_utf8(&printed.stdout).unwrap()).unwrap();
    assert_eq!(
        printed,
        serde_json::from_value(first_config.clone()).unwrap()
    );

    // Rerun from the checkpoint folder, one setting overridden.
    let checkpoint = first.join("checkpoint");
    run_cli_json(
        &[
            &[
                "train".as_ref(),
                "--config".as_ref(),
                checkpoint.as_os_str(),
            ][..],
            &[
                "--output".as_ref(),
                second.as_os_str(),
                "--seed".as_ref(),
                "5".as_ref(),
            ],
            &cpu,
        ]
        .concat(),
    );
    let mut expected = first_config.clone();
    expected["output_dir"] = second.to_str().unwrap().into();
    expected["seed"] = 5.into();
    assert_eq!(recorded(&second), expected);
    std::fs::remove_dir_all(&base).unwrap();
}
