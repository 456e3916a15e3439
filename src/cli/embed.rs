//! `sentence-mtl embed` (being written).

#[derive(Debug, clap::Args)]
pub struct EmbedArgs {}

pub fn run(_args: EmbedArgs) -> anyhow::Result<()> {
    anyhow::bail!("sentence-mtl embed: not implemented yet")
}
