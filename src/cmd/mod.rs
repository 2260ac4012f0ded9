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
///
/// Lines are written by a thread of their own (in order, none dropped): a
/// busy server logs several lines per message, and a write to stderr for
/// each of them on the request's thread cost about a tenth of the CPU per
/// message (measured with `cargo bench --bench server`). The thread takes
/// every line waiting, then flushes: through a buffer, that is one write
/// per burst instead of one per line. Keep the guard until the end:
/// dropping it writes what is left.
pub fn init_logging() -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        // The default holds 128,000 lines, preallocated: 4 MB of an idle
        // server's memory. A full buffer makes callers wait, never drops.
        .buffered_lines_limit(4096)
        .thread_name("indiepm-log")
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    guard
}
