//! The `indiepm` binary: parses the command line and hands over to the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use indiepm::cmd;

/// mimalloc instead of glibc malloc: the server allocates many small,
/// short-lived buffers on every worker thread; glibc's malloc took 14 % of
/// the servers' CPU in perf, and mimalloc saves about 5 % of the CPU per
/// message (back to back, `cargo bench --bench server`). Built without
/// transparent huge pages, which grew the idle RSS from 11 to 18 MB.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Private messages for static sites (IndieWeb rel=pm).
///
/// Advertise a PM endpoint on every page of your built site with `inject`,
/// run the PM server with `serve`, and write to other sites with `send`.
/// `indiepm demo` shows the whole exchange on this machine with no set-up.
#[derive(Debug, Parser)]
#[command(name = "indiepm", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Demo(cmd::demo::Args),
    Serve(cmd::serve::Args),
    Send(cmd::send::Args),
    Inject(cmd::inject::Args),
    Discover(cmd::discover::Args),
    Token(cmd::token::Args),
    Password(cmd::password::Args),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            // Help and the version are not errors; `indiepm` alone shows the
            // help too, as users expect.
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            eprintln!("indiepm: {}", usage_error_line(&e));
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Demo(args) => cmd::demo::run(args),
        Command::Serve(args) => cmd::serve::run(args),
        Command::Send(args) => cmd::send::run(args),
        Command::Token(args) => cmd::token::run(args),
        Command::Password(args) => cmd::password::run(args),
        Command::Inject(args) => cmd::inject::run(args),
        Command::Discover(args) => cmd::discover::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            // One line that says what to fix: the error and its causes, joined.
            eprintln!("indiepm: error: {err:#}");
            ExitCode::from(2)
        }
    }
}

/// A usage error as one line (CONTRACT.md: every error is one line on
/// stderr): clap's message without its usage block, pointing at `--help`.
/// "error: the following required arguments were not provided:" and its
/// indented list become one sentence; further paragraphs (a tip) follow
/// after a semicolon.
fn usage_error_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let mut paragraphs: Vec<String> = Vec::new();
    let mut current = String::new();
    for line in text.lines().take_while(|l| !l.starts_with("Usage:")) {
        let line = line.trim();
        if line.starts_with("For more information") {
            continue;
        }
        if line.is_empty() {
            if !current.is_empty() {
                paragraphs.push(std::mem::take(&mut current));
            }
        } else if current.is_empty() {
            current.push_str(line);
        } else {
            current.push_str(if current.ends_with(':') { " " } else { ", " });
            current.push_str(line);
        }
    }
    if !current.is_empty() {
        paragraphs.push(current);
    }
    format!("{} (see --help)", paragraphs.join("; "))
}
