//! `pymem top`: placeholder until the TUI lands.
use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct TopArgs {}

pub fn run(_args: TopArgs) -> Result<()> {
    anyhow::bail!("pymem top is not implemented yet")
}
