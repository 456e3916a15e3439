//! `--device` and `--dtype`, the same for every command.

use candle_core::{DType, Device};

/// Where the model runs and in which dtype (flattened into every command).
#[derive(Debug, Clone, clap::Args)]
pub struct DeviceArgs {
    /// Where to run: `auto` (GPU 0 when built with the `cuda` feature and one
    /// is found, else the CPU), `cpu`, `cuda` (GPU 0) or `cuda:N`.
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    pub device: DeviceChoice,
    /// Same as `--device cpu` (kept for older command lines).
    #[arg(long, hide = true, conflicts_with = "device")]
    pub cpu: bool,
    /// Same as `--device cuda` (kept for older command lines).
    #[arg(long, hide = true, conflicts_with_all = ["device", "cpu"])]
    pub cuda: bool,
    /// Weight and activation dtype [default: f32; eval and predict: the
    /// checkpoint's own].
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
}

/// A `--device` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The first GPU if there is one, else the CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// The GPU of this ordinal.
    Cuda(usize),
}

/// A `--dtype` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DTypeArg {
    /// 32-bit float.
    F32,
    /// IEEE half precision (accumulates in f32).
    F16,
    /// bfloat16 (accumulates in f32).
    Bf16,
    /// 64-bit float.
    F64,
}

impl From<DTypeArg> for DType {
    fn from(d: DTypeArg) -> Self {
        match d {
            DTypeArg::F32 => DType::F32,
            DTypeArg::F16 => DType::F16,
            DTypeArg::Bf16 => DType::BF16,
            DTypeArg::F64 => DType::F64,
        }
    }
}

/// Parses `auto`, `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(text: &str) -> Result<DeviceChoice, String> {
    match text {
        "auto" => Ok(DeviceChoice::Auto),
        "cpu" => Ok(DeviceChoice::Cpu),
        "cuda" => Ok(DeviceChoice::Cuda(0)),
        _ => text
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(DeviceChoice::Cuda)
            .ok_or_else(|| format!("{text:?}: expected auto, cpu, cuda or cuda:N")),
    }
}

impl DeviceArgs {
    /// The choice, with the hidden `--cpu`/`--cuda` folded in.
    pub fn choice(&self) -> DeviceChoice {
        match (self.cpu, self.cuda) {
            (true, _) => DeviceChoice::Cpu,
            (_, true) => DeviceChoice::Cuda(0),
            _ => self.device,
        }
    }

    /// Opens the device; asking for a GPU that cannot be opened is an error
    /// (`auto` falls back to the CPU instead).
    pub fn device(&self) -> anyhow::Result<Device> {
        use anyhow::Context;
        Ok(match self.choice() {
            DeviceChoice::Auto => Device::cuda_if_available(0)?,
            DeviceChoice::Cpu => Device::Cpu,
            DeviceChoice::Cuda(n) => Device::new_cuda(n).with_context(|| {
                format!("cannot open CUDA device {n} (is the crate built with --features cuda?)")
            })?,
        })
    }

    /// The dtype asked for, f32 by default.
    pub fn dtype(&self) -> DType {
        self.dtype.map_or(DType::F32, DType::from)
    }

    /// The dtype asked for, if any (commands that load a checkpoint default
    /// to its dtype).
    pub fn dtype_override(&self) -> Option<DType> {
        self.dtype.map(DType::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_device("auto"), Ok(DeviceChoice::Auto));
        assert_eq!(parse_device("cpu"), Ok(DeviceChoice::Cpu));
        assert_eq!(parse_device("cuda"), Ok(DeviceChoice::Cuda(0)));
        assert_eq!(parse_device("cuda:3"), Ok(DeviceChoice::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU"] {
            assert!(
                parse_device(bad).unwrap_err().contains("expected auto"),
                "{bad}"
            );
        }
    }
}
