//! The shared test harness: real HTTP servers on loopback, no mocks.
//!
//! Every integration test that needs "someone else's web server" uses this
//! module (`mod common;` at the top of the test file):
//!
//! - [`FakeHost`] is a real hyper 1 HTTP/1.1 server on its own loopback
//!   address (`127.0.0.10`, `127.0.0.11`, … handed out by [`next_ip`]) and a
//!   free port. Each path gets a [`Route`]: a status, headers (repeatable, so
//!   several `Link` headers are possible), a body, a redirect, a delay, an
//!   answer that never comes, or a body that never ends. The host records
//!   every request it receives ([`Recorded`]), so a test can assert what was
//!   sent, and what was *not* (say, that a POST was not redirected).
//! - [`serve_dir`] serves a folder as a static site (a built Hugo site, for
//!   example), with `index.html` for folders; routes may still override or
//!   add single paths on top of it.
//!
//! Each host runs on its own thread with its own Tokio runtime, so it works
//! the same from `#[test]` and `#[tokio::test]` functions, and from tests that
//! block on a child process. Dropping the host stops it and closes every
//! connection it holds.
//!
//! Each test should take fresh addresses from [`next_ip`] / [`next_addr`]:
//! distinct hosts on distinct IPs make "which host got the request" and
//! per-address rules (the fetcher's guard) unambiguous.

#![allow(dead_code)] // every test crate uses a different part of the harness

pub mod pm;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;
use url::Url;

/// The next unused loopback IPv4 address of this test process:
/// `127.0.0.10`, `127.0.0.11`, … (then `127.0.1.0`, …). Linux routes all of
/// `127.0.0.0/8` to the loopback interface, so each one can be bound.
pub fn next_ip() -> IpAddr {
    static NEXT: AtomicU32 = AtomicU32::new(10);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    assert!(n < 1 << 24, "ran out of loopback addresses");
    let [_, b, c, d] = n.to_be_bytes();
    IpAddr::V4(Ipv4Addr::new(127, b, c, d))
}

/// [`next_ip`] with port 0: bind it to get a free port.
pub fn next_addr() -> SocketAddr {
    SocketAddr::new(next_ip(), 0)
}

/// What a [`FakeHost`] answers on one path.
#[derive(Clone, Debug)]
pub struct Route {
    status: StatusCode,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
    /// After `body`, repeat this chunk forever.
    endless: Option<Bytes>,
    /// Wait this long before answering.
    delay: Duration,
    /// Never answer at all (the connection stays open until the host stops).
    never: bool,
}

impl Route {
    /// An empty answer with `status`.
    pub fn status(status: u16) -> Route {
        Route {
            status: StatusCode::from_u16(status).expect("a valid HTTP status"),
            headers: Vec::new(),
            body: Bytes::new(),
            endless: None,
            delay: Duration::ZERO,
            never: false,
        }
    }

    /// `200 OK` with an empty body.
    pub fn ok() -> Route {
        Route::status(200)
    }

    /// `200 OK`, `Content-Type: text/html; charset=utf-8`, and `body`.
    pub fn html(body: impl Into<Bytes>) -> Route {
        Route::ok()
            .header("content-type", "text/html; charset=utf-8")
            .body(body)
    }

    /// `200 OK`, `Content-Type: application/json`, and `body`.
    pub fn json(body: &serde_json::Value) -> Route {
        Route::ok()
            .header("content-type", "application/json")
            .body(body.to_string())
    }

    /// A redirect with `status` (301, 302, 303, 307, 308) to `location`,
    /// absolute or relative, sent verbatim.
    pub fn redirect(status: u16, location: &str) -> Route {
        Route::status(status).header("location", location)
    }

    /// A route that reads the request and never answers.
    pub fn never() -> Route {
        Route {
            never: true,
            ..Route::ok()
        }
    }

    /// Adds a header. Call it again with the same name for several headers
    /// (e.g. several `Link` headers); they are sent in this order. The value
    /// is sent as its UTF-8 bytes, so non-ASCII text goes out raw, as some
    /// real servers send it.
    pub fn header(mut self, name: &str, value: &str) -> Route {
        let name = HeaderName::from_bytes(name.as_bytes()).expect("a valid header name");
        let value = HeaderValue::from_bytes(value.as_bytes()).expect("a valid header value");
        self.headers.push((name, value));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Route {
        self.body = body.into();
        self
    }

    /// After the body, sends `chunk` over and over, forever (chunked
    /// encoding): a response no client can read to its end.
    pub fn endless(mut self, chunk: impl Into<Bytes>) -> Route {
        let chunk = chunk.into();
        assert!(!chunk.is_empty(), "an endless body needs a non-empty chunk");
        self.endless = Some(chunk);
        self
    }

    /// Waits `delay` after reading the request before answering.
    pub fn delay(mut self, delay: Duration) -> Route {
        self.delay = delay;
        self
    }
}

/// One request a [`FakeHost`] received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// The path, as sent: `/pm`.
    pub path: String,
    /// The query string without `?`, if there was one.
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    /// The first value of header `name` as text, if present and ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body decoded as `application/x-www-form-urlencoded` pairs.
    pub fn form(&self) -> Vec<(String, String)> {
        url::form_urlencoded::parse(&self.body)
            .into_owned()
            .collect()
    }

    /// The value of form field `name` in the body, if present.
    pub fn form_field(&self, name: &str) -> Option<String> {
        self.form()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }
}

/// State shared between a host's handle and its server thread.
#[derive(Default)]
struct Shared {
    /// Keyed by path, or by path and query (`/pm?x=1`), which wins.
    routes: Mutex<HashMap<String, Route>>,
    requests: Mutex<Vec<Recorded>>,
    /// When set, paths without a route are served from this folder.
    dir: Option<PathBuf>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding the lock leaves consistent data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A real HTTP/1.1 server on one loopback address. See the module docs.
pub struct FakeHost {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeHost {
    /// Starts a host on a fresh loopback address ([`next_addr`]).
    pub fn start() -> FakeHost {
        FakeHost::start_on(next_addr())
    }

    /// Starts a host on `addr` (port 0 picks a free port), e.g.
    /// `127.0.0.1:0` for tests of `localhost`, or `[::1]:0`.
    pub fn start_on(addr: SocketAddr) -> FakeHost {
        FakeHost::spawn(addr, Shared::default())
    }

    fn spawn(addr: SocketAddr, shared: Shared) -> FakeHost {
        let listener = std::net::TcpListener::bind(addr)
            .unwrap_or_else(|e| panic!("cannot bind a fake host on {addr}: {e}"));
        listener.set_nonblocking(true).expect("non-blocking socket");
        let addr = listener.local_addr().expect("bound address");
        let shared = Arc::new(shared);
        let (stop, stopped) = oneshot::channel();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("fake-host-{addr}"))
            .spawn(move || run_host(listener, thread_shared, stopped))
            .expect("spawn the fake host thread");
        FakeHost {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Sets what `path` answers. `path` is the request path (`/pm`), or a
    /// path with its query (`/pm?x=1`), which takes precedence over the
    /// bare path. Routes may be changed while the host runs.
    pub fn route(&self, path: &str, route: Route) -> &FakeHost {
        assert!(path.starts_with('/'), "a route path starts with /: {path}");
        lock(&self.shared.routes).insert(path.to_string(), route);
        self
    }

    /// The address the host listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR` without a trailing slash, for building URLs by hand.
    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The absolute URL of `path` on this host (`path` starts with `/`).
    pub fn url(&self, path: &str) -> Url {
        Url::parse(&format!("{}{path}", self.origin())).expect("a valid URL")
    }

    /// Every request received so far, in order of arrival.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared.requests).clone()
    }

    /// The requests received for `path` (query ignored).
    pub fn requests_to(&self, path: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// How many requests `path` received (query ignored).
    pub fn hits(&self, path: &str) -> usize {
        self.requests_to(path).len()
    }
}

impl Drop for FakeHost {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            // Dropping the runtime at the end of the thread cancels every
            // connection task, the never-answering ones included.
            let _ = thread.join();
        }
    }
}

/// Serves the folder `dir` on `addr` (port 0 picks a free port) as a static
/// web host would: files by path, `index.html` for a folder, a `301` from
/// `/folder` to `/folder/`, `404` otherwise. Paths that try to leave `dir`
/// are `404`. Routes added with [`FakeHost::route`] take precedence.
pub fn serve_dir(addr: SocketAddr, dir: impl Into<PathBuf>) -> FakeHost {
    FakeHost::spawn(
        addr,
        Shared {
            dir: Some(dir.into()),
            ..Shared::default()
        },
    )
}

fn run_host(listener: std::net::TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime for the fake host");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("a Tokio listener");
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => continue,
                },
                _ = &mut stop => return,
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let shared = shared.clone();
                    async move { Ok::<_, Infallible>(answer(&shared, req).await) }
                });
                // Errors here are the client hanging up, which tests do on purpose.
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

type Body = BoxBody<Bytes, Infallible>;

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed()
}

async fn answer(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().map(str::to_string);
    lock(&shared.requests).push(Recorded {
        method: parts.method.to_string(),
        path: path.clone(),
        query: query.clone(),
        headers: parts.headers,
        body,
    });

    let route = {
        let routes = lock(&shared.routes);
        let with_query = query.as_ref().map(|q| format!("{path}?{q}"));
        with_query
            .and_then(|k| routes.get(&k).cloned())
            .or_else(|| routes.get(&path).cloned())
    };
    match route {
        Some(route) => respond(route).await,
        None => match &shared.dir {
            Some(dir) => static_file(dir, &path, query.as_deref()).await,
            None => not_found(),
        },
    }
}

async fn respond(route: Route) -> Response<Body> {
    if route.never {
        std::future::pending::<()>().await;
    }
    if !route.delay.is_zero() {
        tokio::time::sleep(route.delay).await;
    }
    let body = match route.endless {
        None => full(route.body),
        Some(chunk) => {
            let frames = futures_util::stream::once(async move { route.body })
                .chain(futures_util::stream::repeat(chunk))
                .map(|bytes| Ok::<_, Infallible>(Frame::data(bytes)));
            BodyExt::boxed(StreamBody::new(frames))
        }
    };
    let mut response = Response::new(body);
    *response.status_mut() = route.status;
    for (name, value) in route.headers {
        response.headers_mut().append(name, value);
    }
    response
}

fn not_found() -> Response<Body> {
    let mut response = Response::new(full("not found\n"));
    *response.status_mut() = StatusCode::NOT_FOUND;
    response
}

/// A file of `root` for the request path `path`, as a static host serves it.
async fn static_file(root: &Path, path: &str, query: Option<&str>) -> Response<Body> {
    let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    let mut file = root.to_path_buf();
    for component in Path::new(decoded.trim_start_matches('/')).components() {
        match component {
            Component::Normal(part) => file.push(part),
            Component::CurDir => {}
            // `..`, a root or a prefix would leave the folder.
            _ => return not_found(),
        }
    }
    if file.is_dir() {
        if !path.ends_with('/') {
            let location = match query {
                Some(q) => format!("{path}/?{q}"),
                None => format!("{path}/"),
            };
            let mut response = Response::new(full(Bytes::new()));
            *response.status_mut() = StatusCode::MOVED_PERMANENTLY;
            response.headers_mut().insert(
                http::header::LOCATION,
                HeaderValue::from_str(&location).expect("a valid Location"),
            );
            return response;
        }
        file.push("index.html");
    }
    match tokio::fs::read(&file).await {
        Ok(bytes) => {
            let mut response = Response::new(full(bytes));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static(content_type(&file)),
            );
            response
        }
        Err(_) => not_found(),
    }
}

fn content_type(file: &Path) -> &'static str {
    let ext = file
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("json") => "application/json",
        Some("xml") => "application/xml",
        Some("txt" | "md") => "text/plain; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("ico") => "image/x-icon",
        Some("woff2") => "font/woff2",
        _ => "application/octet-stream",
    }
}
