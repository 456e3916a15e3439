//! `sentence-mtl similarity` (being written).

#[derive(Debug, clap::Args)]
pub struct SimilarityArgs {}

pub fn run(_args: SimilarityArgs) -> anyhow::Result<()> {
    anyhow::bail!("sentence-mtl similarity: not implemented yet")
}
