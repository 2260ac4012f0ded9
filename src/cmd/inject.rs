//! `indiepm inject DIR --endpoint URL`: the build-time plugin.
//!
//! Run after the site generator, on its output folder. The work is in
//! [`crate::inject`]; this module picks the links, prints what happened
//! (a line per replaced, skipped or failed page, a progress bar on a
//! terminal, and a closing summary) and chooses the exit status.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args as ClapArgs;
use indicatif::{ProgressBar, ProgressStyle};

use super::{CmdResult, FINDING};
use crate::config::Config;
use crate::identity::Identity;
use crate::inject::{self, HeadersChange, Link, Mode, PageStatus};

/// Add <link rel="pm" href=URL> to every HTML page of a built site.
///
/// Rewrites each .html/.htm page under DIR in place and atomically, adding
/// the tag to its head and changing no other byte. Pages that already carry
/// the link are left alone (not even their mtime changes); a stale rel="pm"
/// link is replaced. Symbolic links are not followed and other files are not
/// touched. Exits 2 if a page could not be rewritten (it is left as it was).
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The built site's folder (e.g. Hugo's public/).
    pub dir: PathBuf,
    /// The PM endpoint URL to advertise.
    #[arg(long, value_name = "URL", required_unless_present = "config")]
    pub endpoint: Option<String>,
    /// Take the endpoint from this indiepm config (its first [[site]], or --site).
    #[arg(long, value_name = "FILE", conflicts_with = "endpoint")]
    pub config: Option<PathBuf>,
    /// With --config: the [[site]] whose endpoint to use, by its `me` URL.
    #[arg(long, value_name = "ME", requires = "config")]
    pub site: Option<String>,
    /// Also add <link rel=NAME href=URL>, e.g. micropub=https://pm.example.org/micropub (repeatable).
    #[arg(long = "rel", value_name = "NAME=URL")]
    pub rels: Vec<String>,
    /// Change nothing; list the pages that lack the link on stdout and exit 1 if there are any.
    #[arg(long)]
    pub check: bool,
    /// Change nothing; list the pages that would change on stdout.
    #[arg(long, conflicts_with = "check")]
    pub dry_run: bool,
    /// Also write or update this Netlify / Cloudflare Pages `_headers` file
    /// with `Link: <URL>; rel="pm"` for every path (/*).
    #[arg(long, value_name = "FILE")]
    pub headers: Option<PathBuf>,
    /// Pages to work on at once (default: one per CPU; more can help on slow disks).
    #[arg(
        long,
        short = 'j',
        value_name = "N",
        default_value_t = 0,
        hide_default_value = true
    )]
    pub jobs: usize,
}

pub fn run(args: Args) -> CmdResult {
    let links = links(&args)?;
    let mode = if args.check || args.dry_run {
        Mode::ReadOnly
    } else {
        Mode::Write
    };
    let bar = progress_bar();
    // Lines go out through the bar so that they do not tear it.
    let say = |line: String| bar.suspend(|| eprintln!("indiepm: {line}"));
    let report = |path: &Path, status: &PageStatus| {
        bar.inc(1);
        match status {
            PageStatus::Fine => {}
            PageStatus::Changed(outcome) => {
                if mode == Mode::ReadOnly {
                    bar.suspend(|| println!("{}", path.display()));
                }
                for (old, link) in outcome.links.iter().zip(&links) {
                    if let inject::LinkChange::Replaced { old_href } = old {
                        let verb = if mode == Mode::Write {
                            "replaced"
                        } else {
                            "would replace"
                        };
                        say(format!(
                            "{}: {verb} stale rel=\"{}\" link to {old_href}",
                            path.display(),
                            link.rel()
                        ));
                    }
                }
            }
            PageStatus::Skipped(why) => say(format!("{}: skipped: {why}", path.display())),
            PageStatus::Failed(e) => say(format!("{}: {e}; left unchanged", path.display())),
        }
    };
    let options = inject::Options {
        mode,
        jobs: args.jobs,
    };
    let summary = inject::inject_dir(&args.dir, &links, options, &report)?;
    bar.finish_and_clear();

    let mut headers_missing = false;
    if let Some(file) = &args.headers {
        match inject::update_headers(file, &links, mode)? {
            HeadersChange::Unchanged => {}
            change => {
                headers_missing = true;
                let what = match (change, mode) {
                    (HeadersChange::Created, Mode::Write) => "created",
                    (_, Mode::Write) => "updated",
                    (_, Mode::ReadOnly) if args.check => "lacks the Link header",
                    _ => "would be updated",
                };
                eprintln!("indiepm: {}: {what}", file.display());
            }
        }
    }

    let verb = match (args.check, args.dry_run) {
        (true, _) => "missing the link",
        (_, true) => "would change",
        _ => "changed",
    };
    let replaced = match (summary.replaced, mode) {
        (0, _) => String::new(),
        (1, Mode::Write) => " (1 stale link replaced)".to_string(),
        (n, Mode::Write) => format!(" ({n} stale links replaced)"),
        (n, Mode::ReadOnly) => format!(" ({n} with a stale link)"),
    };
    eprintln!(
        "indiepm inject: {} pages scanned, {} {verb}{replaced}, {} already fine, {} skipped, {} failed in {}",
        summary.scanned,
        summary.changed,
        summary.fine,
        summary.skipped,
        summary.failed,
        seconds(summary.elapsed)
    );
    if summary.failed > 0 {
        return Ok(ExitCode::from(2));
    }
    if args.check && (summary.changed > 0 || headers_missing) {
        return Ok(ExitCode::from(FINDING));
    }
    Ok(ExitCode::SUCCESS)
}

fn seconds(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// The links to add: rel=pm first, then each --rel in order.
fn links(args: &Args) -> anyhow::Result<Vec<Link>> {
    let endpoint = match (&args.endpoint, &args.config) {
        (Some(url), _) => url.clone(),
        (None, Some(file)) => endpoint_from_config(file, args.site.as_deref())?,
        (None, None) => bail!("give the endpoint with --endpoint URL or --config FILE"),
    };
    let mut links = vec![Link::pm(&endpoint).context("--endpoint")?];
    for spec in &args.rels {
        let Some((name, url)) = spec.split_once('=') else {
            bail!("--rel {spec}: expected NAME=URL, e.g. micropub=https://pm.example.org/micropub");
        };
        let link = Link::new(name.trim(), url).with_context(|| format!("--rel {spec}"))?;
        if links.iter().any(|l| l.rel() == link.rel()) {
            bail!("--rel {spec}: rel \"{}\" is given twice", link.rel());
        }
        links.push(link);
    }
    Ok(links)
}

/// The `endpoint` of the config's first `[[site]]`, or of the one whose `me` is `site`.
fn endpoint_from_config(file: &Path, site: Option<&str>) -> anyhow::Result<String> {
    let config = Config::load(file)?;
    let chosen = match site {
        Some(me) => {
            let me = Identity::parse(me).context("--site")?;
            config.site(&me).with_context(|| {
                format!(
                    "config {} has no [[site]] with me = \"{me}\"",
                    file.display()
                )
            })?
        }
        None => config
            .sites
            .first()
            .with_context(|| format!("config {} has no [[site]]", file.display()))?,
    };
    Ok(chosen.endpoint.clone())
}

/// A spinner with the count of pages done, only when stderr is a terminal
/// (a hidden bar otherwise, so logs and CI output stay clean).
fn progress_bar() -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} {pos} pages, {elapsed}") {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}
