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
    }
}

/// Each command with the arguments it needs besides the device options.
const COMMANDS: [&[&str]; 6] = [
    &["embed", "a sentence"],
    &["similarity"],
    &["sts", "--data", "stsb"],
    &["train", "--data", "data"],
    &["eval", "--checkpoint", "run", "--data", "data"],
    &["predict", "--checkpoint", "run", "a sentence"],
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
    assert_eq!(args.encoder.pooling, Some(Pooling::Cls));
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
