//! `sentence-mtl train` (being written).

#[derive(Debug, clap::Args)]
pub struct TrainArgs {}

pub fn run(_args: TrainArgs) -> anyhow::Result<()> {
    anyhow::bail!("sentence-mtl train: not implemented yet")
}
