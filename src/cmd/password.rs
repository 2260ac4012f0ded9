//! `indiepm password`: hashes a web UI password and prints the config line.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args as ClapArgs;

use super::CmdResult;

/// Make the web UI password line for the config.
///
/// Reads the password from standard input: typed twice without echo on a
/// terminal, or the first line of a pipe (`echo "$PW" | indiepm password`).
/// Prints `password = "$argon2id$..."` on stdout: add it to the [auth]
/// table (it signs in to the first site) or to one [[site]]. The config
/// holds only the argon2 hash.
#[derive(Debug, ClapArgs)]
pub struct Args {}

pub fn run(_args: Args) -> CmdResult {
    let password = if std::io::stdin().is_terminal() {
        let first = prompt("Password: ")?;
        let again = prompt("Again: ")?;
        if first != again {
            bail!("the two passwords differ; run `indiepm password` again");
        }
        first
    } else {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("cannot read the password from standard input")?;
        line.trim_end_matches(['\r', '\n']).to_string()
    };
    if password.is_empty() {
        bail!("the password is empty: type one, or pipe one line into `indiepm password`");
    }
    if password.chars().count() < 12 {
        eprintln!("indiepm: warning: a password of at least 12 characters is wiser");
    }
    let hash = crate::web::hash_password(&password).map_err(anyhow::Error::msg)?;
    eprintln!("Add this line to the [auth] table (or to one [[site]]) of your config:");
    println!("password = \"{hash}\"");
    Ok(ExitCode::SUCCESS)
}

/// Reads one line from the terminal with echo off (through `stty`, so no
/// extra dependency; if `stty` is missing the typing shows).
fn prompt(label: &str) -> anyhow::Result<String> {
    eprint!("{label}");
    let _ = std::io::stderr().flush();
    let silenced = set_echo(false);
    let mut line = String::new();
    let read = std::io::stdin().lock().read_line(&mut line);
    if silenced {
        set_echo(true);
        eprintln!();
    }
    read.context("cannot read the password")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

fn set_echo(on: bool) -> bool {
    std::process::Command::new("stty")
        .arg(if on { "echo" } else { "-echo" })
        .stdin(std::process::Stdio::inherit())
        .status()
        .is_ok_and(|s| s.success())
}
