//! The HTTP server: binding, connection limits, routing, request limits and
//! graceful shutdown. Protocol semantics live in [`crate::receiver`] and
//! [`crate::sender`]; this module only gets requests to them safely.
//!
//! Limits a stranger cannot get around: the request body is read through
//! [`http_body_util::Limited`] (256 KiB, then `413`), request headers must
//! arrive within `header_timeout_secs` and the body within `body_timeout_secs`
//! (a slow client cannot pin a connection), and at most `max_connections`
//! connections are kept open at once. Past that, as many again are served
//! one request each and closed, so that idle keep-alive connections (a
//! peer's connection pool, or a stranger holding them on purpose) never
//! keep a new client waiting; past twice the cap, connections wait in the
//! kernel's backlog.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::app::App;
use crate::protocol::{self, ProtoError};
use crate::store::Store;

pub type Body = Full<Bytes>;

/// File in `data_dir` that holds the address the server actually listens on.
pub const ADDR_FILE: &str = "server.addr";

/// How long shutdown waits for in-flight work (CONTRACT.md: at most 10 s).
pub const DRAIN: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("cannot open the database in {0}: {1}")]
    Store(String, crate::store::StoreError),
    #[error("{0}")]
    Config(String),
}

/// A server that is accepting connections.
pub struct Running {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops accepting, drains in-flight requests and background work (at
    /// most [`DRAIN`]), and returns when done.
    pub async fn shutdown(self) {
        self.app.shutdown.cancel();
        let _ = self.task.await;
    }

    /// Waits until the server stops (after [`App::shutdown`] is cancelled).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Binds `[server] listen`, then serves as [`start_on`] does.
pub async fn start(config: crate::config::Config) -> Result<Running, ServeError> {
    let addr = config.listen_addr().map_err(ServeError::Config)?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| ServeError::Bind(addr, e))?;
    start_on(listener, config).await
}

/// Opens the store, resumes the outgoing queue, and serves `listener` in
/// the background. (The demo binds first so that its config can name the
/// port the system picked.)
pub async fn start_on(
    listener: TcpListener,
    config: crate::config::Config,
) -> Result<Running, ServeError> {
    let addr = listener
        .local_addr()
        .map_err(|e| ServeError::Bind(([0, 0, 0, 0], 0).into(), e))?;
    let store = Store::open(&config.server.data_dir)
        .map_err(|e| ServeError::Store(config.server.data_dir.display().to_string(), e))?;
    for site in &config.sites {
        sweep_temp_files(&site.inbox_dir());
        sweep_temp_files(&site.sent_dir());
    }
    let files = crate::inbox::writer::Writer::start()
        .map_err(|e| ServeError::Config(format!("cannot start the file writer: {e}")))?;
    let give_up = config.delivery.give_up_after_secs;
    if give_up < crate::protocol::RETRY_DAYS_SECS {
        tracing::warn!(
            give_up_after_secs = give_up,
            "undelivered messages are given up before the 3 days of retries PROTOCOL.md asks of a sender"
        );
    }
    let app = App::new(config, store, files);
    crate::sender::resume(&app).map_err(|e| ServeError::Store("queue".into(), e))?;
    // `indiepm send` reads the address from here: `listen` may name port 0.
    let _ = std::fs::write(app.config.server.data_dir.join(ADDR_FILE), addr.to_string());
    tracing::info!("listening on {addr}");
    for site in &app.config.sites {
        tracing::info!(me = %site.me, endpoint = %site.endpoint, inbox = %site.inbox_dir().display(), "serving site");
    }
    let task = tokio::spawn(accept_loop(listener, app.clone()));
    Ok(Running { addr, app, task })
}

/// Removes the inbox writer's temp files (`.indiepm-*.tmp`) that a crash
/// left in `dir`. Nothing writes there before the server starts (the
/// database lock keeps a second server off the same data), and a message
/// whose file never got its final name was not acknowledged: its sender
/// retries it.
fn sweep_temp_files(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".indiepm-")
            && name.ends_with(".tmp")
            && entry.file_type().is_ok_and(|t| t.is_file())
        {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {
                    tracing::info!(file = %entry.path().display(), "removed a temp file left by a crash")
                }
                Err(e) => {
                    tracing::warn!(file = %entry.path().display(), error = %e, "cannot remove a temp file")
                }
            }
        }
    }
}

async fn accept_loop(listener: TcpListener, app: Arc<App>) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let max = app.config.limits.max_connections;
    let (kept, one_shot) = (Arc::new(Semaphore::new(max)), Arc::new(Semaphore::new(max)));
    let header_timeout = Duration::from_secs(app.config.limits.header_timeout_secs);
    let worker = tokio::spawn(crate::sender::run_queue(app.clone()));
    let sweeper = tokio::spawn(sweep_loop(app.clone()));
    loop {
        // A kept-alive slot if there is one, else a one-request slot.
        let (permit, keep_alive) = tokio::select! {
            biased;
            p = kept.clone().acquire_owned() => match p { Ok(p) => (p, true), Err(_) => break },
            p = one_shot.clone().acquire_owned() => match p { Ok(p) => (p, false), Err(_) => break },
            _ = app.shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = app.shutdown.cancelled() => break,
        };
        // Answers go out as soon as they are written, whatever the size
        // of the previous segment still unacknowledged.
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |req| {
            let app = app.clone();
            async move { Ok::<_, Infallible>(handle(&app, req, peer).await) }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .keep_alive(keep_alive)
            .max_buf_size(64 * 1024);
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!("shutting down: draining in-flight requests and deliveries");
    app.tracker.close();
    let drain = async {
        graceful.shutdown().await;
        app.tracker.wait().await;
    };
    if tokio::time::timeout(DRAIN, drain).await.is_err() {
        tracing::warn!(
            "drain took longer than {} s; stopping anyway",
            DRAIN.as_secs()
        );
    }
    worker.abort();
    sweeper.abort();
    // Lazy bookkeeping (store.rs) goes to disk before the process ends.
    if let Err(e) = app.store.sync().await {
        tracing::error!(error = %e, "cannot sync the database at shutdown");
    }
    tracing::info!("stopped");
}

/// Drops expired tokens and codes at start and then hourly.
async fn sweep_loop(app: Arc<App>) {
    loop {
        match app.store.sweep(crate::app::now_ms()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "expired tokens and codes removed"),
            Err(e) => tracing::warn!(error = %e, "sweep of expired tokens failed"),
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

/// Routes one request. Never panics on input; every protocol error is JSON.
async fn handle(app: &Arc<App>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let path = req.uri().path().to_string();
    let is_endpoint = app.config.sites.iter().any(|s| s.endpoint_path() == path);
    if is_endpoint {
        return match *req.method() {
            Method::POST => match protocol_post(app, req, peer, &path).await {
                Ok(resp) => resp,
                Err(e) => error_response(&e),
            },
            Method::GET | Method::HEAD => endpoint_info(app, &req, &path),
            _ => {
                let mut r = error_response(&ProtoError::invalid_request(
                    "the endpoint takes POST (protocol) and GET (information)",
                ));
                *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
                r.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD, POST"));
                r
            }
        };
    }
    if path == "/micropub" {
        return crate::micropub::handle(app, req).await;
    }
    if path == "/ui" || path.starts_with("/ui/") {
        return crate::web::handle(app, req, peer).await;
    }
    text(StatusCode::NOT_FOUND, "not found\n")
}

/// Reads at most `limit` bytes of body; more is `413 too_large`.
pub async fn read_body(
    req: Request<Incoming>,
    limit: usize,
    deadline: Duration,
) -> Result<(http::request::Parts, Bytes), ProtoError> {
    let (parts, body) = req.into_parts();
    let too_large = || ProtoError::too_large(format!("the body is over {} KiB", limit / 1024));
    if let Some(len) = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(too_large());
    }
    // The header timeout does not cover the body: without this deadline a
    // client trickling its body would hold a connection slot forever.
    let read = tokio::time::timeout(deadline, Limited::new(body, limit).collect());
    let Ok(collected) = read.await else {
        return Err(ProtoError::invalid_request(format!(
            "the body did not arrive within {} s",
            deadline.as_secs()
        )));
    };
    match collected {
        Ok(collected) => Ok((parts, collected.to_bytes())),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large())
        }
        Err(e) => Err(ProtoError::invalid_request(format!(
            "could not read the body: {e}"
        ))),
    }
}

/// True when the Content-Type is `application/x-www-form-urlencoded` (parameters allowed).
pub fn is_form(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| {
            m.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

/// A protocol POST: body limits, media type, parameters, then the action.
/// Oversize and non-form bodies are judged first: there are no parameters
/// to judge in them.
async fn protocol_post(
    app: &Arc<App>,
    req: Request<Incoming>,
    peer: SocketAddr,
    path: &str,
) -> Result<Response<Body>, ProtoError> {
    let (parts, body) =
        read_body(req, protocol::MAX_BODY, app.config.limits.body_timeout()).await?;
    if !is_form(&parts.headers) {
        return Err(ProtoError::unsupported_media_type(
            "the body must be application/x-www-form-urlencoded",
        ));
    }
    let request = protocol::Request::parse(&body)?;
    let bearer = bearer_token(&parts.headers);
    use protocol::Request as R;
    match request {
        R::Notify {
            sender,
            recipient,
            subject,
        } => crate::receiver::notify(app, peer, path, sender, recipient, subject).await,
        R::Message(push) => crate::receiver::message(app, path, bearer, push).await,
        R::Verify {
            sender,
            recipient,
            subject,
        } => crate::sender::verify(app, path, sender, recipient, subject).await,
        R::Deliver {
            sender,
            recipient,
            subject,
            endpoint,
            token,
            expires_in,
        } => {
            crate::sender::deliver(
                app, path, sender, recipient, subject, endpoint, token, expires_in,
            )
            .await
        }
    }
}

/// The token of an `Authorization: Bearer …` header.
pub fn bearer_token(headers: &http::HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// GET of an endpoint: who it belongs to, as HTML or as the JSON info document.
fn endpoint_info(app: &Arc<App>, req: &Request<Incoming>, path: &str) -> Response<Body> {
    let wants_json = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json"));
    if wants_json {
        return json(
            StatusCode::OK,
            &serde_json::json!({
                "protocol": "pm/1",
                "actions": ["notify", "verify", "deliver", "message"],
                "max_content_bytes": app.config.limits.max_content_bytes,
            }),
        );
    }
    let owners: Vec<&str> = app
        .config
        .sites
        .iter()
        .filter(|s| s.endpoint_path() == path)
        .map(|s| s.me.as_str())
        .collect();
    let page = maud::html! {
        (maud::DOCTYPE)
        html lang="en" {
            head { meta charset="utf-8"; title { "rel=pm endpoint" } }
            body {
                h1 { "Private message endpoint" }
                p { "This is the rel=pm endpoint of:" }
                ul { @for me in &owners { li { a href=(me) { (me) } } } }
                p { "It speaks the pm/1 protocol: form-encoded POSTs with an "
                    code { "action" } " of notify, verify, deliver or message." }
            }
        }
    };
    let mut r = Response::new(Full::new(Bytes::from(page.into_string())));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub fn error_response(e: &ProtoError) -> Response<Body> {
    let mut r = json(e.status, &e.body());
    if e.status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
    }
    if let Some(secs) = e.retry_after {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    r
}

pub fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
