//! `sentence-mtl predict` (being written).

#[derive(Debug, clap::Args)]
pub struct PredictArgs {}

pub fn run(_args: PredictArgs) -> anyhow::Result<()> {
    anyhow::bail!("sentence-mtl predict: not implemented yet")
}
