//! The command line (`sentence_mtl::cli`): every command takes the same
//! `--device` and `--dtype` options, values are checked by clap with clear
//! messages, and the older `--cpu`/`--cuda` flags still parse.

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
        Command::Train(a) => &a.device,
        Command::Eval(a) => &a.device,
        Command::Predict(a) => &a.device,
    }
}

/// Each command with the arguments it needs besides the device options.
const COMMANDS: [&[&str]; 5] = [
    &["embed", "a sentence"],
    &["similarity"],
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
