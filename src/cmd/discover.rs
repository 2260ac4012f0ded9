//! `indiepm discover URL`: prints the PM endpoint of an identity.

use std::process::ExitCode;

use clap::Args as ClapArgs;

use super::{CmdResult, FINDING};
use crate::discover::discover;
use crate::fetch::Fetcher;
use crate::identity::Identity;

/// Find the PM endpoint an identity URL advertises with rel="pm".
///
/// Looks at the HTTP Link headers first, then the first <link> or <a> with
/// rel="pm" in the page, exactly as a PM server does before it talks to a
/// site. Prints the endpoint on stdout and exits 0, or exits 1 when the site
/// advertises none.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The identity (homepage) URL, e.g. https://alice.example.org/
    pub url: String,
    /// Also connect to loopback and private-network addresses (refused by default).
    #[arg(long)]
    pub allow_private: bool,
}

pub fn run(args: Args) -> CmdResult {
    let identity = Identity::parse(&args.url)?;
    let fetcher = Fetcher::new(args.allow_private);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match runtime.block_on(discover(&fetcher, identity.url()))? {
        Some(endpoint) => {
            println!("{endpoint}");
            Ok(ExitCode::SUCCESS)
        }
        None => {
            eprintln!("indiepm: {identity} advertises no rel=\"pm\" endpoint");
            Ok(ExitCode::from(FINDING))
        }
    }
}
