//! One module per subcommand: each has its clap `Args` and a `run` that
//! returns the process exit status (CONTRACT.md: 0 success, 1 a finding the
//! user asked about, 2 an error).

use std::process::ExitCode;

pub mod demo;
pub mod discover;
pub mod inject;
pub mod password;
pub mod send;
pub mod serve;
pub mod token;

/// Exit status for a finding the user asked about (no endpoint, a page without the link).
pub const FINDING: u8 = 1;

/// The result of a subcommand: an exit status, or an error printed as one line (exit 2).
pub type CmdResult = anyhow::Result<ExitCode>;

/// Logs to stderr; `RUST_LOG` overrides the default `info` level.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
