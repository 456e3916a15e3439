//! `sentence-mtl eval` (being written).

#[derive(Debug, clap::Args)]
pub struct EvalArgs {}

pub fn run(_args: EvalArgs) -> anyhow::Result<()> {
    anyhow::bail!("sentence-mtl eval: not implemented yet")
}
