//! `indiepm send`: queues a message through the running server's Micropub endpoint.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args as ClapArgs;

use super::CmdResult;
use crate::config::Config;
use crate::fetch::Fetcher;

/// Send a private message from your site.
///
/// Hands the message to the running `indiepm serve` (through its Micropub
/// endpoint), which stores it and delivers it, retrying for days if the
/// recipient's server is down. Prints the new message's ID.
///
/// The bearer token comes from the INDIEPM_TOKEN environment variable or
/// from --token-file; make one with `indiepm token`.
///
/// Example: indiepm send --config pm.toml --to https://bob.example.com/ "Hello Bob"
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The server's TOML config file.
    #[arg(long, short)]
    pub config: PathBuf,
    /// The recipient's identity (homepage) URL.
    #[arg(long)]
    pub to: String,
    /// A subject line.
    #[arg(long)]
    pub subject: Option<String>,
    /// The ID of the message this one answers (IDs may start with "-").
    #[arg(long, allow_hyphen_values = true)]
    pub reply_to: Option<String>,
    /// A file holding the bearer token (instead of INDIEPM_TOKEN).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The message text (CommonMark), or "-" to read it from standard input.
    /// Text may start with "-" (a list, say): options go before it.
    #[arg(allow_hyphen_values = true)]
    pub text: String,
}

pub fn run(args: Args) -> CmdResult {
    let config = Config::load(&args.config)?;
    let token = match (&args.token_file, std::env::var("INDIEPM_TOKEN")) {
        (Some(f), _) => std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the token file {}", f.display()))?
            .trim()
            .to_string(),
        (None, Ok(t)) if !t.trim().is_empty() => t.trim().to_string(),
        _ => bail!(
            "no token: set INDIEPM_TOKEN or pass --token-file (make one with `indiepm token`)"
        ),
    };
    let text = if args.text == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read the message from standard input")?;
        s
    } else {
        args.text.clone()
    };
    if text.trim().is_empty() {
        bail!("the message is empty");
    }
    let base = server_url(&config)?;
    let url = base.join("micropub")?;
    let mut form = vec![
        ("h", "entry"),
        ("content", text.as_str()),
        ("audience[]", args.to.as_str()),
    ];
    if let Some(s) = &args.subject {
        form.push(("name", s));
    }
    if let Some(r) = &args.reply_to {
        form.push(("in-reply-to", r));
    }
    // Our own server, on our own machine: the private-address guard is for strangers' URLs.
    let fetcher = Fetcher::new(true);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let resp = runtime
        .block_on(fetcher.post_form(&url, &form, Some(&token)))
        .map_err(|e| {
            anyhow::anyhow!(
                "the server is not answering at {base} ({e}); start it with `indiepm serve --config {}`",
                args.config.display()
            )
        })?;
    let body: serde_json::Value = serde_json::from_slice(&resp.body).unwrap_or_default();
    let why = body["error_description"].as_str().unwrap_or("");
    match resp.status.as_u16() {
        202 => {
            let id = body["messages"][0]["id"]
                .as_str()
                .context("the server answered 202 without a message ID")?;
            println!("{id}");
            Ok(ExitCode::SUCCESS)
        }
        401 | 403 => bail!(
            "the server refused the token ({} {}: {why}); check INDIEPM_TOKEN against the config's tokens",
            resp.status.as_u16(),
            body["error"].as_str().unwrap_or("")
        ),
        s => bail!("the server refused the message (HTTP {s}): {why}"),
    }
}

/// Where the running server listens: the address it wrote at start-up (it
/// may have picked a free port), else `[server] listen`.
fn server_url(config: &Config) -> anyhow::Result<url::Url> {
    let written =
        std::fs::read_to_string(config.server.data_dir.join(crate::server::ADDR_FILE)).ok();
    let addr = match written {
        Some(a) => a.trim().to_string(),
        None => {
            let mut a = config.listen_addr().map_err(anyhow::Error::msg)?;
            if a.ip().is_unspecified() {
                a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            a.to_string()
        }
    };
    Ok(url::Url::parse(&format!("http://{addr}/"))?)
}
