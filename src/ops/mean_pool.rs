//! Masked mean pooling (being written).
use candle_core::{Result, Tensor};

pub fn masked_mean_pool(_hidden: &Tensor, _mask: &Tensor) -> Result<Tensor> {
    candle_core::bail!("masked_mean_pool: not implemented yet")
}
