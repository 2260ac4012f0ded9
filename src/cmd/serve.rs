//! `indiepm serve --config FILE`: the PM server.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args as ClapArgs;

use super::CmdResult;
use crate::config::Config;

/// Run the PM server for every [[site]] of the config.
///
/// Receives messages for your sites (writing each one as a private markdown
/// file under content_dir/inbox) and delivers the messages you write
/// through Micropub or `indiepm send`, retrying for days when the other side
/// is down. Stops on Ctrl-C or SIGTERM after draining work in flight (at
/// most 10 s). Logs go to stderr; set RUST_LOG=debug for more.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The TOML config file (see the README's config reference).
    #[arg(long, short)]
    pub config: PathBuf,
}

pub fn run(args: Args) -> CmdResult {
    let config = Config::load(&args.config)?;
    let _log = super::init_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // Catch the signals before `listening on` is logged: a supervisor
        // may send SIGTERM as soon as it sees that line, and the default
        // action would kill the server without its drain.
        let signals = Signals::new();
        let running = crate::server::start(config).await?;
        // CONTRACT.md promises this line on stderr whatever RUST_LOG says:
        // supervisors and test harnesses wait for it.
        if !tracing::enabled!(target: "indiepm::server", tracing::Level::INFO) {
            eprintln!("listening on {}", running.addr);
        }
        let app = running.app.clone();
        tokio::spawn(async move {
            signals.wait().await;
            tracing::info!("signal received");
            app.shutdown.cancel();
        });
        running.wait().await;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// SIGINT and SIGTERM, caught from the moment this is made.
struct Signals {
    #[cfg(unix)]
    streams: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    fn new() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let streams = signal(SignalKind::interrupt())
                .and_then(|int| Ok((int, signal(SignalKind::terminate())?)))
                .ok();
            Signals { streams }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    /// Returns when SIGINT or SIGTERM arrives.
    async fn wait(self) {
        #[cfg(unix)]
        if let Some((mut int, mut term)) = self.streams {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}
