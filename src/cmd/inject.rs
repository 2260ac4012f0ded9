//! `indiepm inject DIR --endpoint URL`: the build-time plugin. (Being written.)

use clap::Args as ClapArgs;

use super::CmdResult;

/// Add <link rel="pm" href=URL> to every HTML page of a built site.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The built site's folder (e.g. Hugo's public/).
    pub dir: std::path::PathBuf,
    /// The PM endpoint URL to advertise.
    #[arg(long)]
    pub endpoint: Option<String>,
}

pub fn run(_args: Args) -> CmdResult {
    anyhow::bail!("inject is not built yet")
}
