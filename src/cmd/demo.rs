//! `indiepm demo`: the whole exchange on this machine, with no set-up.
//!
//! Two static sites (copies of `site-example`, built in) and two PM servers,
//! Alice's on 127.0.0.2 and Bob's on 127.0.0.3, each with a temporary
//! config and state. The sites get their rel=pm links from `inject`, then
//! messages go both ways in both flows through each server's Micropub
//! endpoint, while the protocol trace is printed step by step. At the end
//! the inbox files are shown; `--keep` leaves everything running.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args as ClapArgs;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt;

use super::CmdResult;
use crate::config::Config;
use crate::fetch::Fetcher;
use crate::protocol::{hash_secret, new_secret};

/// Show a private-message exchange between two sites on this machine.
///
/// Starts two static sites and two PM servers on loopback addresses
/// (127.0.0.2 and 127.0.0.3) with temporary state, adds the rel=pm links to
/// the sites, sends messages both ways in both flows, prints every protocol
/// step, and shows the markdown files that landed in each inbox.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Leave the sites and servers running (until Ctrl-C) and print the web
    /// UI addresses and sign-in.
    #[arg(long)]
    pub keep: bool,
    /// Put the sites and state here instead of a temporary folder.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// One demo participant.
struct Person {
    name: &'static str,
    site_url: String,
    pm_url: String,
    token: String,
    password: String,
    content_dir: PathBuf,
    running: Option<crate::server::Running>,
}

pub fn run(args: Args) -> CmdResult {
    let names = Arc::new(Mutex::new(BTreeMap::new()));
    let subscriber = tracing_subscriber::registry().with(TraceLayer {
        names: names.clone(),
        start: Instant::now(),
    });
    tracing::subscriber::set_global_default(subscriber).ok();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(demo(args, names))
}

async fn demo(args: Args, names: Arc<Mutex<BTreeMap<String, String>>>) -> CmdResult {
    let temp;
    let root = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            temp = tempfile::Builder::new().prefix("indiepm-demo-").tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let stop = CancellationToken::new();
    println!("indiepm demo: two sites, two PM servers, all on this machine");
    println!("working folder: {}\n", root.display());

    let mut people = Vec::new();
    for (name, last) in [("alice", 2u8), ("bob", 3u8)] {
        people.push(setup(&root, name, [127, 0, 0, last].into(), &stop).await?);
    }
    {
        let mut n = names.lock().unwrap_or_else(|e| e.into_inner());
        for p in &people {
            n.insert(p.site_url.clone(), p.name.to_string());
            n.insert(p.pm_url.clone(), format!("{}'s server", p.name));
        }
    }
    for p in &people {
        println!(
            "{:>5}: site {}  PM endpoint {}",
            p.name, p.site_url, p.pm_url
        );
    }

    let client = Fetcher::new(true);
    let script: [(usize, usize, &str, &str, &str); 4] = [
        (
            0,
            1,
            "channel",
            "Hello Bob",
            "Hi Bob! This came through the **channel flow**: one handshake, then a token for many messages.",
        ),
        (
            1,
            0,
            "channel",
            "Re: Hello Bob",
            "Hello Alice, got it. <script>alert('raw HTML is neutralised')</script>",
        ),
        (
            0,
            1,
            "message",
            "Per-message flow",
            "And this one took the six-step flow, with a single-use token.",
        ),
        (
            1,
            0,
            "message",
            "Re: Per-message flow",
            "Received. Both flows work both ways.",
        ),
    ];
    let mut last_id: Option<String> = None;
    for (from, to, flow, subject, text) in script {
        let (a, b) = (&people[from], &people[to]);
        println!("\n── {} → {} ({flow} flow): \"{subject}\"", a.name, b.name);
        let id = micropub_send(
            &client,
            a,
            &b.site_url,
            subject,
            text,
            flow,
            last_id.as_deref(),
        )
        .await?;
        wait_delivered(&client, a, &id).await?;
        last_id = Some(id);
    }

    println!("\n── the inbox files (private: the generator does not publish them)");
    for p in &people {
        for f in files_under(&p.content_dir.join("inbox"))? {
            println!("\n{}'s inbox: {}", p.name, f.display());
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            for line in text.lines() {
                println!("    {line}");
            }
        }
    }

    if args.keep {
        println!("\n── still running (Ctrl-C to stop)");
        for p in &people {
            println!(
                "{:>5}: web UI {}ui/  password {}  Micropub token {}",
                p.name,
                p.pm_url.trim_end_matches("pm"),
                p.password,
                p.token
            );
        }
        tokio::signal::ctrl_c().await.ok();
    }
    stop.cancel();
    for p in &mut people {
        if let Some(r) = p.running.take() {
            r.shutdown().await;
        }
    }
    println!("\ndone: 4 messages delivered, both flows, both ways.");
    Ok(ExitCode::SUCCESS)
}

/// Lays out one person's site and server, and starts both.
async fn setup(
    root: &Path,
    name: &'static str,
    ip: IpAddr,
    stop: &CancellationToken,
) -> anyhow::Result<Person> {
    let home = root.join(name);
    let public = home.join("public");
    let content_dir = home.join("content");
    std::fs::create_dir_all(&content_dir)?;
    write_site(&public, name)?;
    let listener = TcpListener::bind(SocketAddr::new(ip, 0))
        .await
        .with_context(|| {
            format!(
                "cannot bind {ip}: the demo needs the loopback range 127.0.0.0/8 (Linux has it)"
            )
        })?;
    let pm_addr = listener.local_addr()?;
    let pm_url = format!("http://{pm_addr}/pm");
    let site_addr =
        crate::static_site::serve(SocketAddr::new(ip, 0), public.clone(), stop.clone()).await?;
    let site_url = format!("http://{site_addr}/");
    crate::inject::inject_for_demo(&public, &pm_url, &format!("http://{pm_addr}/micropub"))?;

    let token = new_secret();
    let password = new_secret()[..12].to_string();
    let password_hash = crate::web::hash_password(&password).map_err(anyhow::Error::msg)?;
    let config_text = format!(
        r#"# indiepm demo config for {name}
[server]
listen = "{pm_addr}"
data_dir = "data"

[network]
allow_private = true    # the demo lives on loopback addresses

[[site]]
me = "{site_url}"
endpoint = "{pm_url}"
content_dir = "content"
flavor = "hugo"

[delivery]
flow = "channel"
retry_initial_secs = 0.5

[auth]
tokens = ["sha256:{hash}"]
password = "{password_hash}"
"#,
        hash = hash_secret(&token)
    );
    let config_path = home.join("indiepm.toml");
    std::fs::write(&config_path, config_text)?;
    let config = Config::load(&config_path)?;
    let running = crate::server::start_on(listener, config).await?;
    Ok(Person {
        name,
        site_url,
        pm_url,
        token,
        password,
        content_dir,
        running: Some(running),
    })
}

/// Copies the built-in `site-example` and makes it this person's.
fn write_site(public: &Path, name: &str) -> anyhow::Result<()> {
    let owner = format!("{}{}", name[..1].to_uppercase(), &name[1..]);
    for (path, bytes) in crate::demo_site::FILES {
        let dest = public.join(path);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let is_html = path.ends_with(".html");
        if is_html {
            let text = String::from_utf8_lossy(bytes).replace(crate::demo_site::OWNER, &owner);
            std::fs::write(&dest, text)?;
        } else {
            std::fs::write(&dest, bytes)?;
        }
    }
    Ok(())
}

async fn micropub_send(
    client: &Fetcher,
    from: &Person,
    to: &str,
    subject: &str,
    text: &str,
    flow: &str,
    reply_to: Option<&str>,
) -> anyhow::Result<String> {
    let url = url::Url::parse(&from.pm_url)?.join("/micropub")?;
    let mut form = vec![
        ("h", "entry"),
        ("content", text),
        ("audience[]", to),
        ("name", subject),
        ("pm-flow", flow),
    ];
    if let Some(r) = reply_to {
        form.push(("in-reply-to", r));
    }
    let resp = client.post_form(&url, &form, Some(&from.token)).await?;
    let body: serde_json::Value = serde_json::from_slice(&resp.body).unwrap_or_default();
    match body["messages"][0]["id"].as_str() {
        Some(id) if resp.status.as_u16() == 202 => Ok(id.to_string()),
        _ => bail!(
            "Micropub refused the message: HTTP {} {body}",
            resp.status.as_u16()
        ),
    }
}

async fn wait_delivered(client: &Fetcher, from: &Person, id: &str) -> anyhow::Result<()> {
    let url = url::Url::parse(&from.pm_url)?.join(&format!("/micropub?q=source&id={id}"))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let resp = client.get_with_bearer(&url, &from.token).await?;
        let v: serde_json::Value = serde_json::from_slice(&resp.body).unwrap_or_default();
        match v["properties"]["pm-state"][0].as_str() {
            Some("delivered") => return Ok(()),
            Some("failed") => bail!(
                "message {id} failed: {}",
                v["properties"]["pm-last-error"][0].as_str().unwrap_or("?")
            ),
            _ if Instant::now() > deadline => bail!("message {id} was not delivered within 20 s"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

fn files_under(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "md"))
            .filter(|p| {
                !p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('_'))
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    Ok(files)
}

/// Prints protocol events (those with a `step` field) as a readable trace,
/// with URLs replaced by the demo's names.
struct TraceLayer {
    names: Arc<Mutex<BTreeMap<String, String>>>,
    start: Instant,
}

#[derive(Default)]
struct Fields(Vec<(String, String)>);

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.push((field.name().to_string(), value.to_string()));
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .push((field.name().to_string(), format!("{value:?}")));
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for TraceLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        let get = |k: &str| f.0.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let level = *event.metadata().level();
        let Some(step) = get("step") else {
            if level <= tracing::Level::WARN {
                eprintln!("  warning: {}", get("message").unwrap_or_default());
            }
            return;
        };
        let names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        let rename = |v: &str| {
            // Longest URLs first, so an endpoint is not renamed as its site.
            let mut out = v.to_string();
            let mut keys: Vec<&String> = names.keys().collect();
            keys.sort_by_key(|k| std::cmp::Reverse(k.len()));
            for k in keys {
                out = out.replace(k.as_str(), &names[k]);
            }
            out
        };
        let mut line = format!(
            "  {:>6.3}s  step {step}  {}",
            self.start.elapsed().as_secs_f64(),
            get("message").unwrap_or_default()
        );
        for (k, v) in &f.0 {
            if k == "message" || k == "step" {
                continue;
            }
            let v = if k == "id" && v.len() > 10 {
                format!("{}…", &v[..10])
            } else {
                rename(v)
            };
            let _ = write!(line, "  {k}={v}");
        }
        println!("{line}");
    }
}
