//! A sentence-transformers `Dense` module: `activation(x·Wᵀ + b)` on the pooled
//! vector, with its weights from the module's folder (`linear.weight`
//! `[out, in]` and `linear.bias` `[out]`, in `model.safetensors` or, from older
//! versions, `pytorch_model.bin`).

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};

use super::config::{DenseActivation, DenseConfig};
use super::resolve::ModelFiles;

/// A loaded `Dense` module.
#[derive(Debug, Clone)]
pub struct Dense {
    weight: Tensor,
    bias: Option<Tensor>,
    activation: DenseActivation,
}

impl Dense {
    /// Loads the module `config` describes from its folder in `files`.
    pub fn load(
        files: &ModelFiles,
        config: &DenseConfig,
        dtype: DType,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let dir = files.dir.join(&config.path);
        let safetensors = dir.join("model.safetensors");
        let pickle = dir.join("pytorch_model.bin");
        let tensors: Vec<(String, Tensor)> = if safetensors.is_file() {
            candle_core::safetensors::load(&safetensors, &Device::Cpu)
                .with_context(|| format!("cannot read {}", safetensors.display()))?
                .into_iter()
                .collect()
        } else if pickle.is_file() {
            candle_core::pickle::read_all(&pickle)
                .with_context(|| format!("cannot read {}", pickle.display()))?
        } else {
            bail!(
                "{}: no model.safetensors or pytorch_model.bin",
                dir.display()
            );
        };
        let find = |name: &str| tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t);
        let weight = find("linear.weight")
            .with_context(|| format!("{}: no linear.weight", dir.display()))?;
        let want = [config.out_features, config.in_features];
        if weight.dims() != want {
            bail!(
                "{}: linear.weight is {:?}, config.json says [out_features, in_features] = {want:?}",
                dir.display(),
                weight.dims()
            );
        }
        let bias = match (config.bias, find("linear.bias")) {
            (false, _) => None,
            (true, Some(b)) if b.dims() == [config.out_features] => Some(b),
            (true, Some(b)) => bail!(
                "{}: linear.bias is {:?}, not [{}]",
                dir.display(),
                b.dims(),
                config.out_features
            ),
            (true, None) => bail!(
                "{}: bias is true but there is no linear.bias",
                dir.display()
            ),
        };
        let to = |t: &Tensor| t.to_dtype(dtype)?.to_device(device);
        Ok(Self {
            weight: to(weight)?,
            bias: bias.map(to).transpose()?,
            activation: config.activation,
        })
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// `[N, in] -> [N, out]`.
    pub fn forward(&self, x: &Tensor) -> anyhow::Result<Tensor> {
        if x.rank() != 2 || x.dim(1)? != self.in_features() {
            bail!(
                "Dense: input is {:?}, the layer takes [N, {}]",
                x.dims(),
                self.in_features()
            );
        }
        let y = x.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        Ok(match self.activation {
            DenseActivation::Identity => y,
            DenseActivation::Tanh => y.tanh()?,
            DenseActivation::Relu => y.relu()?,
            DenseActivation::Gelu => y.gelu_erf()?,
            DenseActivation::Sigmoid => candle_nn::ops::sigmoid(&y)?,
        })
    }
}
