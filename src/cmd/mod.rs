//! One module per subcommand: each has its clap `Args` and a `run` that
//! returns the process exit status (CONTRACT.md: 0 success, 1 a finding the
//! user asked about, 2 an error).

use std::process::ExitCode;

pub mod discover;
pub mod inject;

/// Exit status for a finding the user asked about (no endpoint, a page without the link).
pub const FINDING: u8 = 1;

/// The result of a subcommand: an exit status, or an error printed as one line (exit 2).
pub type CmdResult = anyhow::Result<ExitCode>;
