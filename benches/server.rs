//! Server benchmark: N messages from Alice to Bob through the real servers
//! (the release binary, as child processes) on loopback, in each flow, and
//! in the same run the floor: the same number of bare hyper round trips a
//! message needs, against a server that does nothing, measured twice right
//! before the flow run and twice right after (this VM's speed drifts; the
//! ratio uses their median).
//!
//! Measured: messages per second (first creation to last file on disk),
//! p50 and p99 latency from creation (Micropub's 202) to the inbox file
//! appearing, and the receiving server's RSS idle and with 1,000
//! handshakes in flight.
//!
//! Run: `cargo bench --bench server`. Knobs: `BENCH_N` messages per flow
//! (default 2000); `BENCH_FLOWS=message` or `channel` for one flow;
//! `BENCH_DIR` for the file system (fsync costs depend on it: the README
//! numbers are from a fresh ext4); `BENCH_LOG` for the servers' `RUST_LOG`
//! (default `info`, as deployed); `BENCH_KEEP=1` keeps the folders and each
//! server's log.
//!
//! On ext4 without a journal, creating files near thousands deleted in the
//! last minute or so is slow (the kernel skips recently deleted inodes):
//! a second run right after the first's cleanup, or after `cargo test`,
//! measures that. Give each run a fresh folder with `BENCH_KEEP=1`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use indiepm::fetch::Fetcher;
use indiepm::protocol::{hash_secret, new_secret};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Messages created at once through Micropub.
const CONCURRENCY: usize = 128;

struct Server {
    child: Child,
    addr: SocketAddr,
    inbox: PathBuf,
    token: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Whole-machine CPU seconds (busy, idle incl. I/O wait) from /proc/stat.
fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let get = |i: usize| f.get(i).copied().unwrap_or(0.0) / 100.0;
    // user nice system idle iowait irq softirq steal
    let idle = get(3) + get(4);
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    (busy, idle)
}

fn free_port(ip: [u8; 4]) -> SocketAddr {
    let l = std::net::TcpListener::bind(SocketAddr::from((ip, 0))).expect("bind a free port");
    l.local_addr().expect("local addr")
}

/// Serves on `ip` a homepage advertising `endpoint`, from memory: the
/// stand-in for the web host of a static site (a CDN or a server's page
/// cache), answering as cheaply as the floor's bare server answers its
/// round trip. (Served from disk through `indiepm::static_site`, as the
/// demo does, each step-5 GET cost the harness a stat and a blocking-pool
/// read that the floor's equivalent trip does not pay.)
async fn homepage(ip: [u8; 4], endpoint: &str, stop: &CancellationToken) -> String {
    let page = format!(
        "<!doctype html><html><head><link rel=\"pm\" href=\"{endpoint}\"></head><body></body></html>"
    );
    let addr = bare_server(
        ip,
        Bytes::from(page),
        "text/html; charset=utf-8",
        stop.clone(),
    )
    .await;
    format!("http://{addr}/")
}

fn start_server(dir: &Path, me: &str, addr: SocketAddr, flow: &str) -> Server {
    let token = new_secret();
    let config = format!(
        r#"[server]
listen = "{addr}"
data_dir = "data"
[network]
allow_private = true
[[site]]
me = "{me}"
endpoint = "http://{addr}/pm"
content_dir = "content"
[delivery]
flow = "{flow}"
retry_initial_secs = 0.2
[limits]
notify_per_minute_per_host = 1000000
notify_per_minute_per_client = 1000000
messages_per_minute_per_sender = 1000000
[auth]
tokens = ["sha256:{}"]
"#,
        hash_secret(&token)
    );
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("pm.toml"), config).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_indiepm"))
        .args(["serve", "--config"])
        .arg(dir.join("pm.toml"))
        // The servers log as deployed (info) unless BENCH_LOG says otherwise.
        .env(
            "RUST_LOG",
            std::env::var("BENCH_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr.txt")).unwrap())
        .spawn()
        .expect("start indiepm serve");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let config = indiepm::config::Config::load(&dir.join("pm.toml")).expect("valid config");
    Server {
        child,
        addr,
        inbox: config.sites[0].inbox_dir(),
        token,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

struct Run {
    /// How long creating all `n` through Micropub took.
    created_in: Duration,
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

/// Records when each message file of Bob's inbox is renamed into place
/// (inotify: exact times, and no polling that would take CPU from the
/// servers). Keys are the 12-character ID prefix ending each file name.
fn watch_inbox(dir: &Path, n: usize) -> std::thread::JoinHandle<HashMap<String, Instant>> {
    std::fs::create_dir_all(dir).unwrap();
    let mut inotify = inotify::Inotify::init().expect("inotify");
    inotify
        .watches()
        .add(dir, inotify::WatchMask::MOVED_TO)
        .expect("watch the inbox");
    std::thread::spawn(move || {
        let mut arrived = HashMap::new();
        let mut buf = vec![0u8; 256 * 1024];
        while arrived.len() < n {
            let events = inotify
                .read_events_blocking(&mut buf)
                .expect("inotify events");
            let now = Instant::now();
            for e in events {
                let Some(name) = e.name.and_then(|n| n.to_str()) else {
                    continue;
                };
                // DATE-HOST-IDPART.md: the key is the 12 characters before ".md", the
                // ID's last 12.
                if name.starts_with('.') || name.starts_with('_') {
                    continue;
                }
                if let Some(stem) = name.strip_suffix(".md")
                    && let Some(key) = stem.get(stem.len().saturating_sub(12)..)
                {
                    arrived.entry(key.to_string()).or_insert(now);
                }
            }
        }
        arrived
    })
}

/// Sends `n` messages Alice → Bob and waits for every file.
async fn run_flow(n: usize, alice: &Server, bob_url: &str, bob: &Server) -> Run {
    let watcher = watch_inbox(&bob.inbox, n);
    let client = Fetcher::new(true);
    let url = url::Url::parse(&format!("http://{}/micropub", alice.addr)).unwrap();
    let slots = Arc::new(Semaphore::new(CONCURRENCY));
    let created: Arc<std::sync::Mutex<HashMap<String, Instant>>> = Default::default();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let permit = slots.clone().acquire_owned().await.unwrap();
        let (client, url, token, to, created) = (
            client.clone(),
            url.clone(),
            alice.token.clone(),
            bob_url.to_string(),
            created.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let text = format!("benchmark message {i}");
            let form = [
                ("h", "entry"),
                ("content", text.as_str()),
                ("audience[]", to.as_str()),
            ];
            let r = client.post_form(&url, &form, Some(&token)).await.unwrap();
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            let id = v["messages"][0]["id"].as_str().unwrap().to_string();
            created
                .lock()
                .unwrap()
                .insert(id[id.len() - 12..].to_string(), Instant::now());
            drop(permit);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let created_in = start.elapsed();
    let arrived = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::task::spawn_blocking(move || watcher.join().unwrap()),
    )
    .await
    .expect("every message arrives within 120 s")
    .unwrap();
    let created = created.lock().unwrap();
    assert!(
        arrived.keys().all(|k| created.contains_key(k)),
        "only the messages of this run arrive"
    );
    let total = arrived.values().max().unwrap().duration_since(start);
    let mut lat: Vec<f64> = arrived
        .iter()
        .map(|(k, t)| t.duration_since(created[k]).as_secs_f64() * 1000.0)
        .collect();
    lat.sort_by(|a, b| a.total_cmp(b));
    Run {
        created_in,
        per_sec: n as f64 / total.as_secs_f64(),
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        max_ms: percentile(&lat, 1.0),
    }
}

/// A server that answers every request at once with `body`: the floor
/// (and the homepages).
async fn bare_server(
    ip: [u8; 4],
    body: Bytes,
    content_type: &'static str,
    stop: CancellationToken,
) -> SocketAddr {
    let listener = TcpListener::bind(SocketAddr::from((ip, 0))).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                r = listener.accept() => r.unwrap().0,
                _ = stop.cancelled() => return,
            };
            let body = body.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                        let mut r = Response::new(Full::new(body.clone()));
                        r.headers_mut().insert(
                            hyper::header::CONTENT_TYPE,
                            hyper::header::HeaderValue::from_static(content_type),
                        );
                        async { Ok::<_, Infallible>(r) }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// `n` messages of `trips` sequential POST round trips each, `CONCURRENCY` at once.
async fn run_floor(n: usize, trips: usize, addr: SocketAddr) -> f64 {
    let client = Fetcher::new(true);
    let url = url::Url::parse(&format!("http://{addr}/pm")).unwrap();
    let slots = Arc::new(Semaphore::new(CONCURRENCY));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..n {
        let permit = slots.clone().acquire_owned().await.unwrap();
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..trips {
                client
                    .post_form(
                        &url,
                        &[("action", "message"), ("content", "benchmark message")],
                        None,
                    )
                    .await
                    .unwrap();
            }
            drop(permit);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// The floor runs beside one flow run: two right before it and two right
/// after, for the full and the protocol-only trip counts.
struct Floors {
    full: Vec<f64>,
    protocol: Vec<f64>,
}

impl Floors {
    async fn measure(&mut self, n: usize, trips: usize, addr: SocketAddr) {
        for _ in 0..2 {
            self.full.push(run_floor(n, trips, addr).await);
            self.protocol.push(run_floor(n, trips - 1, addr).await);
        }
    }
}

/// The floor is pure CPU on a shared VM whose speed drifts from minute to
/// minute: the median of the runs bracketing the flow run in time.
fn median(runs: &[f64]) -> f64 {
    let mut v = runs.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}

/// Bob's RSS while 1,000 notifies wait on a sender whose homepage never answers.
async fn rss_with_handshakes(bob: &Server, bob_url: &str, stop: &CancellationToken) -> u64 {
    // A "sender homepage" that accepts and then stalls: handshakes pile up.
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 9], 0)))
        .await
        .unwrap();
    let slow = listener.local_addr().unwrap();
    let stop2 = stop.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            tokio::select! {
                r = listener.accept() => if let Ok((s, _)) = r { held.push(s) },
                _ = stop2.cancelled() => return,
            }
        }
    });
    let client = Fetcher::new(true);
    let url = url::Url::parse(&format!("http://{}/pm", bob.addr)).unwrap();
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let (client, url, to) = (client.clone(), url.clone(), bob_url.to_string());
        tasks.push(tokio::spawn(async move {
            let sender = format!("http://{slow}/u{i}/");
            let m = new_secret();
            let form = [
                ("action", "notify"),
                ("sender", sender.as_str()),
                ("recipient", to.as_str()),
                ("message", m.as_str()),
            ];
            client.post_form(&url, &form, None).await.unwrap().status
        }));
    }
    let mut accepted = 0;
    for t in tasks {
        if t.await.unwrap().as_u16() == 202 {
            accepted += 1;
        }
    }
    assert_eq!(accepted, 1000, "all notifies accepted");
    tokio::time::sleep(Duration::from_millis(500)).await;
    rss_kb(bob.child.id())
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    // BENCH_DIR picks the file system (fsync and inode costs depend on it).
    // BENCH_KEEP=1 keeps the folders, with each server's log (stderr.txt).
    let mut tmp = match std::env::var_os("BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    if std::env::var_os("BENCH_KEEP").is_some() {
        tmp.disable_cleanup(true);
        println!("keeping {}", tmp.path().display());
    }
    let stop = CancellationToken::new();
    println!(
        "indiepm server benchmark: {n} messages Alice -> Bob per flow, {CONCURRENCY} created at once"
    );
    println!(
        "{:<14} {:>10} {:>9} {:>9} {:>9} {:>12} {:>8}",
        "flow", "msgs/s", "p50 ms", "p99 ms", "max ms", "floor msg/s", "ratio"
    );
    let mut idle_rss = 0;
    // Round trips per message once the step-1 and step-2 discovery caches
    // are warm, counting the Micropub create that the timed run includes:
    // channel = create and push; message = create, notify, verify,
    // deliver, the step-5 fresh discovery GET, and the push.
    // BENCH_FLOWS=message (or channel) runs one flow only.
    let only = std::env::var("BENCH_FLOWS").unwrap_or_default();
    for (flow, trips) in [("channel", 2usize), ("message", 6usize)] {
        if !only.is_empty() && !only.split(',').any(|f| f == flow) {
            continue;
        }
        let dir = tmp.path().join(flow);
        let (a_addr, b_addr) = (free_port([127, 0, 0, 2]), free_port([127, 0, 0, 3]));
        let alice_url = homepage([127, 0, 0, 2], &format!("http://{a_addr}/pm"), &stop).await;
        let bob_url = homepage([127, 0, 0, 3], &format!("http://{b_addr}/pm"), &stop).await;
        let alice = start_server(&dir.join("alice"), &alice_url, a_addr, flow);
        let bob = start_server(&dir.join("bob"), &bob_url, b_addr, flow);
        tokio::time::sleep(Duration::from_millis(300)).await;
        if flow == "channel" {
            idle_rss = rss_kb(bob.child.id());
        }
        // Warm-up: one message (and, in the channel flow, the handshake).
        let _ = run_flow(1, &alice, &bob_url, &bob).await;
        std::fs::remove_dir_all(&bob.inbox).ok();
        let floor_addr = bare_server(
            [127, 0, 0, 4],
            Bytes::from_static(b"{\"status\":\"ok\"}"),
            "application/json",
            stop.clone(),
        )
        .await;
        let mut floors = Floors {
            full: Vec::new(),
            protocol: Vec::new(),
        };
        // The floor must have the machine to itself: the servers are idle
        // before the run and after it.
        let (busy_f0, idle_f0) = machine_cpu();
        let servers_f0 = cpu_secs(alice.child.id()) + cpu_secs(bob.child.id());
        floors.measure(n, trips, floor_addr).await;
        let (servers_f1, (busy_f1, idle_f1)) = (
            cpu_secs(alice.child.id()) + cpu_secs(bob.child.id()),
            machine_cpu(),
        );
        let me = std::process::id();
        let (a0, b0, h0) = (
            cpu_secs(alice.child.id()),
            cpu_secs(bob.child.id()),
            cpu_secs(me),
        );
        let (busy0, idle0) = machine_cpu();
        let run = run_flow(n, &alice, &bob_url, &bob).await;
        let (busy1, idle1) = machine_cpu();
        let (a1, b1, h1) = (
            cpu_secs(alice.child.id()),
            cpu_secs(bob.child.id()),
            cpu_secs(me),
        );
        let (busy_f2, idle_f2) = machine_cpu();
        let servers_f2 = cpu_secs(alice.child.id()) + cpu_secs(bob.child.id());
        floors.measure(n, trips, floor_addr).await;
        let servers_f3 = cpu_secs(alice.child.id()) + cpu_secs(bob.child.id());
        let (busy_f3, idle_f3) = machine_cpu();
        let (floor, protocol_floor) = (median(&floors.full), median(&floors.protocol));
        let floor_busy = busy_f1 - busy_f0 + busy_f3 - busy_f2;
        let floor_idle = idle_f1 - idle_f0 + idle_f3 - idle_f2;
        let floor_note = format!(
            "floor runs before/after: {:.0} {:.0} / {:.0} {:.0} msg/s; servers' CPU meanwhile {:.2} s, machine idle {:.0}%",
            floors.full[0],
            floors.full[1],
            floors.full[2],
            floors.full[3],
            servers_f1 - servers_f0 + servers_f3 - servers_f2,
            floor_idle / (floor_busy + floor_idle) * 100.0
        );
        println!(
            "{:<14} {:>10.0} {:>9.1} {:>9.1} {:>9.1} {:>12.0} {:>7.0}%",
            format!("{flow} ({trips} trips)"),
            run.per_sec,
            run.p50_ms,
            run.p99_ms,
            run.max_ms,
            floor,
            run.per_sec / floor * 100.0
        );
        // The floor without the create, for whoever counts only the
        // protocol's own round trips.
        println!(
            "{:<14} without the Micropub trip: floor {:.0} msg/s, ratio {:.0}%; {floor_note}",
            "",
            protocol_floor,
            run.per_sec / protocol_floor * 100.0
        );
        let per_msg = |secs: f64| secs / n as f64 * 1e6;
        let (servers, harness) = (a1 - a0 + b1 - b0, h1 - h0);
        println!(
            "{:<14} all {n} created in {:.2} s; CPU per message: sender {:.0} µs, receiver {:.0} µs, harness {:.0} µs, kernel threads and the rest {:.0} µs; machine idle {:.0}%",
            "",
            run.created_in.as_secs_f64(),
            per_msg(a1 - a0),
            per_msg(b1 - b0),
            per_msg(harness),
            per_msg((busy1 - busy0 - servers - harness).max(0.0)),
            (idle1 - idle0) / (busy1 - busy0 + idle1 - idle0) * 100.0
        );
        if flow == "message" {
            let busy = rss_with_handshakes(&bob, &bob_url, &stop).await;
            println!(
                "\nreceiving server RSS: idle {:.1} MB, with 1,000 handshakes in flight {:.1} MB",
                idle_rss as f64 / 1024.0,
                busy as f64 / 1024.0
            );
        }
    }
    stop.cancel();
}
