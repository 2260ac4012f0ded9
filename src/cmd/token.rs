//! `indiepm token`: makes a Micropub bearer token and the config line for it.

use std::process::ExitCode;

use clap::Args as ClapArgs;

use super::CmdResult;
use crate::protocol::{hash_secret, new_secret};

/// Generate a Micropub bearer token.
///
/// Prints the token (give it to `indiepm send` through INDIEPM_TOKEN or
/// --token-file, or to your Micropub client) and the line to add to the
/// config, which stores only its SHA-256 hash.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Print only the token, and the hash line on stderr (for scripts).
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(args: Args) -> CmdResult {
    let token = new_secret();
    let line = format!("tokens = [\"sha256:{}\"]", hash_secret(&token));
    if args.quiet {
        println!("{token}");
        eprintln!("{line}");
    } else {
        println!("token: {token}");
        println!();
        println!("Add to the [auth] table (or to one [[site]]) of your config:");
        println!("{line}");
        println!();
        println!("Keep the token secret; the config holds only its hash.");
    }
    Ok(ExitCode::SUCCESS)
}
