//! PM server peers for the integration tests: the real `indiepm serve`
//! binary, each with its own homepage, config, database and site folder.
//!
//! A [`Peer`] is what a user runs: a static homepage (a [`serve_dir`] host on
//! its own loopback address) that carries `<link rel="pm" href="…">`, and
//! an `indiepm serve` process on another loopback address, with a Micropub
//! token. The server's port is picked before it starts (bind port 0 on the
//! peer's own address, read the port, let go of it), because the config's
//! `endpoint` and the homepage's link must both name it; a restart binds the
//! same address again.
//!
//! Helpers: create messages through Micropub, read `q=source`, wait for
//! files in the inbox, stop with SIGTERM, kill with SIGKILL, restart. Plus a
//! plain HTTP client ([`post_raw`], [`post_form`], [`get`]) that sends
//! exactly what a test asks, from a chosen source address when it matters,
//! and hands back status, headers and JSON.

#![allow(dead_code)] // not every test crate uses every helper

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use serde_json::Value;

use super::{FakeHost, next_addr, next_ip, serve_dir};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_indiepm");

/// How long any wait in these tests may take before it is a failure.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// What differs between the peers of a test.
#[derive(Clone, Debug)]
pub struct Opts {
    /// `[delivery] flow`: `"channel"` or `"message"`.
    pub flow: &'static str,
    /// `[network] allow_private`.
    pub allow_private: bool,
    pub retry_initial_secs: f64,
    pub retry_max_secs: f64,
    /// More lines for `[delivery]`.
    pub delivery: String,
    /// Lines for `[limits]`.
    pub limits: String,
    /// More lines for the `[[site]]`.
    pub site: String,
}

impl Default for Opts {
    fn default() -> Opts {
        Opts {
            flow: "channel",
            allow_private: true,
            retry_initial_secs: 0.2,
            retry_max_secs: 1.0,
            delivery: String::new(),
            limits: String::new(),
            site: String::new(),
        }
    }
}

impl Opts {
    pub fn flow(flow: &'static str) -> Opts {
        Opts {
            flow,
            ..Opts::default()
        }
    }
    pub fn limits(mut self, lines: &str) -> Opts {
        self.limits.push_str(lines);
        self.limits.push('\n');
        self
    }
    pub fn delivery(mut self, lines: &str) -> Opts {
        self.delivery.push_str(lines);
        self.delivery.push('\n');
        self
    }
    pub fn private(mut self, allow: bool) -> Opts {
        self.allow_private = allow;
        self
    }
}

/// A site owner: homepage, PM server process, token, folders.
pub struct Peer {
    pub name: String,
    pub dir: tempfile::TempDir,
    /// The homepage host (serves `dir/www`).
    pub home: FakeHost,
    /// The identity URL, canonical: `http://127.0.0.x:port/`.
    pub me: String,
    /// Where the PM server listens.
    pub addr: SocketAddr,
    /// The PM endpoint, as the homepage advertises it.
    pub endpoint: String,
    /// The Micropub bearer token (the config holds its hash).
    pub token: String,
    pub config: PathBuf,
    child: Option<Child>,
    starts: usize,
}

impl Peer {
    /// Writes the homepage and config, then starts the server.
    pub fn start(name: &str, opts: Opts) -> Peer {
        let mut p = Peer::offline(name, opts);
        p.run();
        p
    }

    /// Writes the homepage and config; the server is not running yet.
    pub fn offline(name: &str, opts: Opts) -> Peer {
        let dir = tempfile::Builder::new()
            .prefix(&format!("pm-{}-", name.to_lowercase()))
            .tempdir()
            .expect("a temp dir");
        let www = dir.path().join("www");
        fs::create_dir_all(&www).expect("www folder");
        let addr = free_addr(next_ip());
        let endpoint = format!("http://{addr}/pm");
        fs::write(
            www.join("index.html"),
            format!(
                "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{name}</title>\n\
                 <link rel=\"pm\" href=\"{endpoint}\"></head>\n\
                 <body><div class=\"h-card\"><a class=\"p-name u-url\" href=\"/\">{name}</a></div></body></html>\n"
            ),
        )
        .expect("homepage");
        let home = serve_dir(next_addr(), &www);
        let me = format!("{}/", home.origin());
        let token = indiepm::protocol::new_secret();
        let config = dir.path().join("pm.toml");
        let text = format!(
            r#"[server]
listen = "{addr}"
data_dir = "data"

[network]
allow_private = {allow_private}

[[site]]
me = "{me}"
endpoint = "{endpoint}"
content_dir = "content"
{site}
[delivery]
flow = "{flow}"
retry_initial_secs = {ri}
retry_max_secs = {rm}
{delivery}
[limits]
{limits}
[auth]
tokens = ["sha256:{hash}"]
"#,
            allow_private = opts.allow_private,
            site = opts.site,
            flow = opts.flow,
            ri = opts.retry_initial_secs,
            rm = opts.retry_max_secs,
            delivery = opts.delivery,
            limits = opts.limits,
            hash = indiepm::protocol::hash_secret(&token),
        );
        fs::write(&config, text).expect("config");
        Peer {
            name: name.to_string(),
            dir,
            home,
            me,
            addr,
            endpoint,
            token,
            config,
            child: None,
            starts: 0,
        }
    }

    /// Starts `indiepm serve` and waits for its `listening on` line. A start
    /// that fails at once (the database of a process that just ended is
    /// still locked, or the port was taken meanwhile) is tried again.
    pub fn run(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let mut last = String::new();
        for _ in 0..5 {
            self.starts += 1;
            let log = self.log_path(self.starts);
            let stderr = fs::File::create(&log).expect("log file");
            let mut child = Command::new(BIN)
                .arg("serve")
                .arg("--config")
                .arg(&self.config)
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .expect("spawn indiepm serve");
            let deadline = Instant::now() + PATIENCE;
            loop {
                let text = fs::read_to_string(&log).unwrap_or_default();
                if let Some(line) = text.lines().find(|l| l.contains("listening on")) {
                    assert!(
                        line.contains(&self.addr.to_string()),
                        "{} listens elsewhere: {line}",
                        self.name
                    );
                    self.child = Some(child);
                    return;
                }
                if let Some(status) = child.try_wait().expect("child status") {
                    last = format!("exited with {status}: {text}");
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("{} did not start listening: {text}", self.name);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("{} could not start: {last}", self.name);
    }

    fn log_path(&self, n: usize) -> PathBuf {
        self.dir.path().join(format!("serve-{n}.log"))
    }

    /// Everything the server wrote to stderr, over all its runs.
    pub fn log(&self) -> String {
        (1..=self.starts)
            .map(|n| fs::read_to_string(self.log_path(n)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n----- restart -----\n")
    }

    /// The last lines of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let from = lines.len().saturating_sub(40);
        format!("--- {} log ---\n{}", self.name, lines[from..].join("\n"))
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => c.try_wait().expect("child status").is_none(),
            None => false,
        }
    }

    /// SIGTERM, then waits for the exit (drain is at most 10 s).
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {pid} failed");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().expect("child status") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not stop within 15 s\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL: no drain, no clean-up, as a power cut would leave it.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn micropub(&self) -> String {
        format!("{}/micropub", self.base())
    }

    /// Micropub create (form syntax) with our token; `fields` go after `h=entry`.
    pub async fn create(&self, fields: &[(&str, &str)]) -> Resp {
        let mut form = vec![("h", "entry")];
        form.extend_from_slice(fields);
        post_form(&self.micropub(), &form, Some(&self.token)).await
    }

    /// Creates a message to `to` and returns its ID.
    pub async fn send(&self, to: &str, content: &str) -> String {
        self.send_with(to, content, &[]).await
    }

    /// Creates a message with more fields (`name`, `in-reply-to`).
    pub async fn send_with(&self, to: &str, content: &str, more: &[(&str, &str)]) -> String {
        let mut fields = vec![("content", content), ("audience[]", to)];
        fields.extend_from_slice(more);
        let r = self.create(&fields).await;
        assert_eq!(r.status, 202, "Micropub create on {}: {r:?}", self.name);
        r.json["messages"][0]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no message ID in {r:?}"))
            .to_string()
    }

    /// `q=source` of an outgoing message.
    pub async fn source(&self, id: &str) -> Value {
        let r = get(
            &format!("{}?q=source&id={id}", self.micropub()),
            "application/json",
            Some(&self.token),
        )
        .await;
        assert_eq!(r.status, 200, "q=source on {}: {r:?}", self.name);
        r.json["properties"].clone()
    }

    /// `pm-state` of an outgoing message.
    pub async fn state(&self, id: &str) -> String {
        self.source(id).await["pm-state"][0]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Waits until every message of `ids` is in `state`.
    pub async fn wait_state(&self, ids: &[String], state: &str) {
        let deadline = Instant::now() + PATIENCE;
        for id in ids {
            loop {
                let props = self.source(id).await;
                if props["pm-state"][0] == state {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{id} from {} is not {state}: {props}\n{}",
                    self.name,
                    self.log_tail()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    pub fn content_dir(&self) -> PathBuf {
        self.dir.path().join("content")
    }

    pub fn inbox(&self) -> PathBuf {
        self.content_dir().join("inbox")
    }

    /// The message files of the inbox: `*.md` files, not the folder's own
    /// files (`_index.md`) or hidden ones.
    pub fn message_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = match fs::read_dir(self.inbox()) {
            Ok(entries) => entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    name.ends_with(".md") && !name.starts_with('_') && !name.starts_with('.')
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        files.sort();
        files
    }

    /// The texts of the message files.
    pub fn message_texts(&self) -> Vec<String> {
        self.message_files()
            .iter()
            .map(|p| fs::read_to_string(p).expect("read message file"))
            .collect()
    }

    /// The text of the one message file that holds `id`; fails if none or several do.
    pub fn file_with(&self, id: &str) -> String {
        let found: Vec<String> = self
            .message_texts()
            .into_iter()
            .filter(|t| t.contains(id))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "{}: files holding {id}: {found:?}",
            self.name
        );
        found.into_iter().next().unwrap_or_default()
    }

    /// Waits until the inbox holds at least `n` message files.
    pub async fn wait_files(&self, n: usize) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let have = self.message_files().len();
            if have >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} has {have} of {n} messages\n{}",
                self.name,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the server's log holds `n` lines containing all of `parts`.
    pub async fn wait_log(&self, parts: &[&str], n: usize) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let count = self.log_count(parts);
            if count >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {count} of {n} log lines with {parts:?}\n{}",
                self.name,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// How many log lines contain all of `parts`.
    pub fn log_count(&self, parts: &[&str]) -> usize {
        self.log()
            .lines()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .count()
    }

    /// Files under the site's content folder whose name starts with a dot,
    /// other than the inbox's `.gitignore`: temp files left behind.
    pub fn dot_files(&self) -> Vec<PathBuf> {
        walkdir::WalkDir::new(self.content_dir())
            .into_iter()
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_file())
            .map(|e| e.into_path())
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                name.starts_with('.') && name != ".gitignore"
            })
            .collect()
    }

    /// Every file in the peer's folder outside `data/`, `www/`, the logs and
    /// the config: where the server wrote to the site.
    pub fn site_files(&self) -> Vec<PathBuf> {
        walkdir::WalkDir::new(self.dir.path())
            .into_iter()
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_file())
            .map(|e| e.into_path())
            .filter(|p| {
                let rel = p.strip_prefix(self.dir.path()).unwrap_or(p);
                !(rel.starts_with("data")
                    || rel.starts_with("www")
                    || rel == Path::new("pm.toml")
                    || rel.to_string_lossy().starts_with("serve-"))
            })
            .collect()
    }

    /// The `indiepm` binary with this peer's config and token in the environment.
    pub fn command(&self, subcommand: &str) -> Command {
        let mut c = Command::new(BIN);
        c.arg(subcommand)
            .arg("--config")
            .arg(&self.config)
            .env("INDIEPM_TOKEN", &self.token);
        c
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `ip` with a port that was free a moment ago.
pub fn free_addr(ip: IpAddr) -> SocketAddr {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("cannot bind {ip}: {e}"))
}

/// An HTTP answer: status, headers, body, and the body as JSON (`Null` if it is not).
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub json: Value,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts a protocol error: `status`, `Content-Type: application/json`,
    /// `{"error": code, "error_description": TEXT}`.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str, ctx: &str) {
        assert_eq!(self.status, status, "{ctx}: {self:?}");
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{ctx}: {self:?}"
        );
        assert_eq!(self.json["error"], code, "{ctx}: {self:?}");
        assert!(
            self.json["error_description"]
                .as_str()
                .is_some_and(|d| !d.is_empty()),
            "{ctx}: error_description missing: {self:?}"
        );
        if status == 401 {
            assert!(
                self.header("www-authenticate")
                    .is_some_and(|v| v.starts_with("Bearer")),
                "{ctx}: a 401 carries WWW-Authenticate: Bearer: {self:?}"
            );
        }
    }
}

/// A fresh client (one per call: each test has its own runtime). No
/// proxy, no redirects, optionally bound to a source address.
pub fn client(from: Option<IpAddr>) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(15));
    if let Some(ip) = from {
        b = b.local_address(ip);
    }
    b.build().expect("an HTTP client")
}

async fn finish(r: reqwest::Response) -> Resp {
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.bytes().await.unwrap_or_default();
    let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Resp {
        status,
        headers,
        body,
        json,
    }
}

/// POST `body` with `content_type` (none if `None`) and an optional bearer token.
pub async fn post_raw(
    url: &str,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
    bearer: Option<&str>,
) -> Resp {
    post_raw_from(None, url, content_type, body, bearer).await
}

/// [`post_raw`] from the source address `from`.
pub async fn post_raw_from(
    from: Option<IpAddr>,
    url: &str,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
    bearer: Option<&str>,
) -> Resp {
    let mut req = client(from).post(url).body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    if let Some(t) = bearer {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let r = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    finish(r).await
}

/// Form-encodes `form`.
pub fn encode(form: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish()
}

/// A form POST.
pub async fn post_form(url: &str, form: &[(&str, &str)], bearer: Option<&str>) -> Resp {
    post_raw(
        url,
        Some("application/x-www-form-urlencoded"),
        encode(form),
        bearer,
    )
    .await
}

/// A form POST from the source address `from`.
pub async fn post_form_from(from: IpAddr, url: &str, form: &[(&str, &str)]) -> Resp {
    post_raw_from(
        Some(from),
        url,
        Some("application/x-www-form-urlencoded"),
        encode(form),
        None,
    )
    .await
}

/// A GET with `Accept` and an optional bearer token.
pub async fn get(url: &str, accept: &str, bearer: Option<&str>) -> Resp {
    let mut req = client(None).get(url).header("accept", accept);
    if let Some(t) = bearer {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let r = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    finish(r).await
}

/// Polls `check` until it holds, for at most [`PATIENCE`].
pub async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A fresh message ID (or code, or token) of the protocol alphabet.
pub fn new_id() -> String {
    indiepm::protocol::new_secret()
}

/// The decoded forms a [`FakeSender`] received, in order.
type Forms = Arc<Mutex<Vec<Vec<(String, String)>>>>;

/// Another sender's server, played by the test: a homepage at `path` whose
/// rel=pm names `/pm` on the same host, and an endpoint that answers as an
/// honest sender would — `verify` with `200 {"valid": true}`, `deliver`
/// with `202 {"status": "accepted"}` — and records every form it gets. The
/// tokens the receiver hands over in step 4 can be read from the recorded
/// `deliver`s ([`FakeSender::token_for`]).
pub struct FakeSender {
    /// The identity URL.
    pub me: String,
    pub endpoint: String,
    forms: Forms,
    /// How many more `deliver`s to answer `503` (a sender that is failing).
    pub failing_delivers: Arc<std::sync::atomic::AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeSender {
    pub fn start(path: &str) -> FakeSender {
        let listener = std::net::TcpListener::bind(next_addr()).expect("bind a fake sender");
        listener.set_nonblocking(true).expect("non-blocking");
        let addr = listener.local_addr().expect("address");
        let me = format!("http://{addr}{path}");
        let endpoint = format!("http://{addr}/pm");
        let page = format!(
            "<!doctype html><html><head><link rel=\"pm\" href=\"{endpoint}\"></head>\
             <body><p class=\"h-card\">Mallory</p></body></html>"
        );
        let forms: Forms = Arc::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let failing_delivers = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (home, recorded, failing) = (path.to_string(), forms.clone(), failing_delivers.clone());
        let thread =
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let mut stopped = stopped;
                loop {
                    let stream = tokio::select! {
                        a = listener.accept() => match a { Ok((s, _)) => s, Err(_) => continue },
                        _ = &mut stopped => return,
                    };
                    let (home, page, recorded, failing) =
                        (home.clone(), page.clone(), recorded.clone(), failing.clone());
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let (home, page, recorded, failing) =
                                (home.clone(), page.clone(), recorded.clone(), failing.clone());
                            async move {
                                Ok::<_, std::convert::Infallible>(
                                    fake_sender_answer(req, &home, &page, &recorded, &failing)
                                        .await,
                                )
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
            });
        FakeSender {
            me,
            endpoint,
            forms,
            failing_delivers,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The recorded forms posted to the endpoint with `action`.
    pub fn actions(&self, action: &str) -> Vec<Vec<(String, String)>> {
        self.forms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|f| f.iter().any(|(k, v)| k == "action" && v == action))
            .cloned()
            .collect()
    }

    /// Waits for the `deliver` about `subject` (a message ID or code) and returns its form.
    pub async fn wait_deliver(&self, subject: &str) -> Vec<(String, String)> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(f) = self.actions("deliver").into_iter().find(|f| {
                f.iter()
                    .any(|(k, v)| (k == "message" || k == "code") && v == subject)
            }) {
                return f;
            }
            assert!(Instant::now() < deadline, "no deliver for {subject}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The token of the `deliver` about `subject`.
    pub async fn token_for(&self, subject: &str) -> String {
        let form = self.wait_deliver(subject).await;
        field(&form, "token")
    }
}

impl Drop for FakeSender {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn fake_sender_answer(
    req: http::Request<hyper::body::Incoming>,
    home: &str,
    page: &str,
    recorded: &Mutex<Vec<Vec<(String, String)>>>,
    failing: &std::sync::atomic::AtomicUsize,
) -> http::Response<http_body_util::Full<Bytes>> {
    use http_body_util::BodyExt;
    let reply = |status: u16, ct: &str, body: String| {
        http::Response::builder()
            .status(status)
            .header("content-type", ct)
            .body(http_body_util::Full::new(Bytes::from(body)))
            .expect("a response")
    };
    let path = req.uri().path().to_string();
    if req.method() == http::Method::GET && path == home {
        return reply(200, "text/html; charset=utf-8", page.to_string());
    }
    if req.method() != http::Method::POST || path != "/pm" {
        return reply(404, "text/plain", "not found\n".into());
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let form: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    let action = form
        .iter()
        .find(|(k, _)| k == "action")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    recorded
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(form);
    use std::sync::atomic::Ordering;
    let fail = action == "deliver"
        && failing
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
    if fail {
        return reply(
            503,
            "application/json",
            r#"{"error":"server_error","error_description":"down for a moment"}"#.into(),
        );
    }
    match action.as_str() {
        "verify" => reply(200, "application/json", r#"{"valid":true}"#.into()),
        "deliver" => reply(202, "application/json", r#"{"status":"accepted"}"#.into()),
        _ => reply(
            400,
            "application/json",
            r#"{"error":"invalid_request","error_description":"unexpected"}"#.into(),
        ),
    }
}

/// The value of `name` in a decoded form; fails if it is missing.
pub fn field(form: &[(String, String)], name: &str) -> String {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("no `{name}` in {form:?}"))
}
