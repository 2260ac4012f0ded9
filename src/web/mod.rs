//! The owner's web UI under `/ui/`: server-rendered with maud, working
//! without JavaScript.
//!
//! | route | what |
//! | --- | --- |
//! | `GET /ui/signin`, `POST /ui/signin` | password sign-in ([`auth`]) |
//! | `POST /ui/indieauth`, `GET /ui/indieauth/go`, `GET /ui/indieauth/callback` | IndieAuth sign-in with the site's own domain |
//! | `POST /ui/signout` | ends the session |
//! | `GET /ui/` | the inbox, newest first, unread marked ([`inbox`]) |
//! | `GET /ui/inbox/FILE` | a received message and its conversation, reply form |
//! | `GET /ui/outbox`, `GET /ui/outbox/ID` | sent messages and their delivery state ([`outbox`]) |
//! | `GET /ui/compose`, `POST /ui/compose` | a new message or a reply ([`compose`]) |
//! | `GET /ui/blocked`, `POST /ui/block`, `POST /ui/unblock` | the blocklist |
//! | `GET /ui/style.css` | the stylesheet |
//!
//! Security model, in short: a session is a random secret in a cookie
//! (`Secure; HttpOnly; SameSite=Strict; Path=/ui`) stored server-side only
//! as its SHA-256, for one site, expiring after [`auth::SESSION_SECS`].
//! Every form carries a CSRF token (the session's, or before sign-in one
//! bound to a sign-in cookie) checked in constant time. Every response
//! carries a strict Content-Security-Policy (no scripts at all), and every
//! accepted form POST answers with a `303` redirect (post/redirect/get).
//! Message text is rendered by pulldown-cmark with raw HTML shown as text,
//! links restricted to http, https and mailto, and images never loaded.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use maud::Markup;

use crate::app::{App, lock};
use crate::ratelimit::RateLimiter;
use crate::server::{Body, read_body};

mod auth;
mod compose;
mod inbox;
mod layout;
mod markdown;
mod outbox;
#[cfg(test)]
mod tests;

pub use auth::{hash_password, verify_password};

/// The Content-Security-Policy of every UI response: no script at all,
/// styles only from `/ui/style.css`, images from here and https (sender
/// photos), forms only to here, never framed.
pub const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; \
                       form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Sign-in attempts (password or IndieAuth) per client address per minute.
const LOGINS_PER_CLIENT: u32 = 10;
/// Sign-in attempts per minute from everyone together.
const LOGINS_IN_ALL: u32 = 60;
/// Most flashes (a refused form's error and draft) kept at once.
const MAX_FLASHES: usize = 1000;

/// The web UI's share of the server state (in [`App::web`]).
pub struct WebState {
    login_per_client: RateLimiter,
    login_in_all: RateLimiter,
    /// IndieAuth sign-ins under way, by their `state`.
    pending: Mutex<HashMap<String, auth::Pending>>,
    /// What a refused form said, shown once on the next page, by session hash.
    flashes: Mutex<HashMap<String, Flash>>,
    /// Binds the sign-in form's CSRF token to its cookie (per process).
    key: [u8; 32],
}

impl Default for WebState {
    fn default() -> Self {
        use rand::Rng;
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        WebState {
            login_per_client: RateLimiter::new(LOGINS_PER_CLIENT),
            login_in_all: RateLimiter::new(LOGINS_IN_ALL),
            pending: Mutex::new(HashMap::new()),
            flashes: Mutex::new(HashMap::new()),
            key,
        }
    }
}

/// A refused compose form: why, and what was typed, to show again.
#[derive(Debug, Clone, Default)]
pub(crate) struct Flash {
    pub error: String,
    pub draft: compose::Draft,
}

impl WebState {
    fn set_flash(&self, session_hash: &str, flash: Flash) {
        let mut f = lock(&self.flashes);
        if f.len() >= MAX_FLASHES {
            f.clear();
        }
        f.insert(session_hash.to_string(), flash);
    }

    fn take_flash(&self, session_hash: &str) -> Option<Flash> {
        lock(&self.flashes).remove(session_hash)
    }

    /// Counts a sign-in attempt; `false` when over a limit.
    fn allow_login(&self, peer: &SocketAddr) -> bool {
        self.login_per_client.check(&peer.ip().to_string()).is_ok()
            && self.login_in_all.check("all").is_ok()
    }
}

/// Handles every request under `/ui/`. Never panics on input.
pub async fn handle(app: &Arc<App>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let limit = (app.config.limits.max_content_bytes * 3 + 16 * 1024).max(64 * 1024);
    let mut resp = match read_body(req, limit, app.config.limits.body_timeout()).await {
        Ok((parts, body)) => route(app, Request::from_parts(parts, body), peer).await,
        Err(e) => error_page(e.status, "The request is too large or unreadable."),
    };
    security_headers(&mut resp);
    resp
}

/// A sender's photo, fetched by the server at handshake time (see [`crate::photos`]).
fn photo(app: &App, key: &str) -> Response<Body> {
    match crate::photos::load(&app.config.server.data_dir, key) {
        Some((bytes, mime)) => {
            let mut r = Response::new(Full::new(Bytes::from(bytes)));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
            r.headers_mut().insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("private, max-age=86400"),
            );
            r
        }
        None => not_found(),
    }
}

/// A request with its body read.
pub(crate) type Req = Request<Bytes>;

/// Routes one request (body already read). Public to the tests.
pub(crate) async fn route(app: &Arc<App>, req: Req, peer: SocketAddr) -> Response<Body> {
    let path = req.uri().path().to_string();
    let get = matches!(*req.method(), Method::GET | Method::HEAD);
    let post = *req.method() == Method::POST;
    match path.as_str() {
        "/ui" if get => return redirect("/ui/"),
        "/ui/style.css" if get => return layout::stylesheet(),
        p if get && p.starts_with("/ui/photo/") => return photo(app, &p["/ui/photo/".len()..]),
        "/ui/signin" if get => return auth::signin_page(app, &req),
        "/ui/signin" if post => return auth::signin_post(app, &req, peer).await,
        "/ui/indieauth" if post => return auth::indieauth_start(app, &req, peer).await,
        "/ui/indieauth/go" if get => return auth::indieauth_go(app, &req),
        "/ui/indieauth/callback" if get => return auth::indieauth_callback(app, &req).await,
        _ => {}
    }
    let Some(session) = auth::current(app, &req) else {
        return auth::unauthenticated(&req);
    };
    let ctx = Ctx { app, session };
    if post {
        let Some(form) = parse_form(&req) else {
            return error_page(StatusCode::BAD_REQUEST, "The form could not be read.");
        };
        if !ctx.session.csrf_ok(&form) {
            return error_page(
                StatusCode::FORBIDDEN,
                "This form has expired or was not sent from this site. Go back, reload the page and try again.",
            );
        }
        return match path.as_str() {
            "/ui/compose" => compose::post(&ctx, &form).await,
            "/ui/block" => compose::block(&ctx, &form, true).await,
            "/ui/unblock" => compose::block(&ctx, &form, false).await,
            "/ui/signout" => auth::signout(&ctx).await,
            _ => not_found(),
        };
    }
    if !get {
        let mut r = error_page(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed.");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD, POST"));
        return r;
    }
    let query = parse_query(&req);
    match path.as_str() {
        "/ui/" => inbox::list(&ctx, &query).await,
        "/ui/outbox" => outbox::list(&ctx, &query).await,
        "/ui/compose" => compose::page(&ctx, &query).await,
        "/ui/blocked" => compose::blocked_page(&ctx, &query),
        p => {
            if let Some(name) = p.strip_prefix("/ui/inbox/") {
                inbox::message(&ctx, name, &query).await
            } else if let Some(id) = p.strip_prefix("/ui/outbox/") {
                outbox::message(&ctx, id, &query).await
            } else {
                not_found()
            }
        }
    }
}

/// What a signed-in request handler has: the app and the session.
pub(crate) struct Ctx<'a> {
    pub app: &'a Arc<App>,
    pub session: auth::Session,
}

impl Ctx<'_> {
    /// The signed-in site's identity (canonical).
    pub fn me(&self) -> &str {
        &self.session.data.me
    }

    pub fn site(&self) -> Option<&crate::config::SiteConfig> {
        self.app.site(self.me())
    }

    /// The navigation bar for this session.
    pub fn nav(&self, active: &'static str) -> layout::Nav<'_> {
        layout::Nav {
            me: self.me(),
            csrf: &self.session.data.csrf,
            active,
        }
    }
}

// ---------------------------------------------------------------------------
// Small helpers shared by the pages.

pub(crate) type Form = HashMap<String, String>;

/// The form fields of a form-encoded POST (first value of each name wins).
fn parse_form(req: &Req) -> Option<Form> {
    if !crate::server::is_form(req.headers()) {
        return None;
    }
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(req.body()).ok()?;
    let mut form = Form::new();
    for (k, v) in pairs {
        form.entry(k).or_insert(v);
    }
    Some(form)
}

/// The query parameters (first value of each name wins; garbage is none).
fn parse_query(req: &Req) -> Form {
    let pairs: Vec<(String, String)> = req
        .uri()
        .query()
        .and_then(|q| serde_urlencoded::from_str(q).ok())
        .unwrap_or_default();
    let mut form = Form::new();
    for (k, v) in pairs {
        form.entry(k).or_insert(v);
    }
    form
}

/// The value of cookie `name`, from any `Cookie` header.
fn cookie(req: &Req, name: &str) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"').to_string())
}

/// Percent-encodes a query value.
fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A local path to go back to after a form: `/ui/…` only, so that no form
/// can send the browser elsewhere (no open redirect).
fn safe_next(next: Option<&String>) -> String {
    match next {
        Some(n)
            if n.starts_with("/ui/")
                && n.len() <= 2048
                && !n.contains("//")
                && !n.contains('\\')
                && n.chars().all(|c| c.is_ascii_graphic()) =>
        {
            n.clone()
        }
        _ => "/ui/".into(),
    }
}

/// `303 See Other` to a local path.
fn redirect(location: &str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// An HTML page.
fn html(status: StatusCode, markup: Markup) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(markup.into_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

fn error_page(status: StatusCode, text: &str) -> Response<Body> {
    html(status, layout::error(status, text))
}

fn not_found() -> Response<Body> {
    error_page(StatusCode::NOT_FOUND, "There is nothing here.")
}

fn add_cookie(resp: &mut Response<Body>, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
}

/// The headers every UI response carries.
fn security_headers(resp: &mut Response<Body>) {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
}

/// Milliseconds as `2026-01-02 15:04 UTC`.
fn fmt_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_default()
}

fn fmt_time(t: &chrono::DateTime<chrono::FixedOffset>) -> String {
    t.with_timezone(&chrono::Utc)
        .format("%Y-%m-%d %H:%M UTC")
        .to_string()
}

/// An identity as people read it: host, plus the path when there is one.
fn short_identity(me: &str) -> String {
    match url::Url::parse(me) {
        Ok(u) => {
            let host = u.host_str().unwrap_or("");
            let port = u.port().map(|p| format!(":{p}")).unwrap_or_default();
            let path = u.path().trim_end_matches('/');
            format!("{host}{port}{path}")
        }
        Err(_) => me.to_string(),
    }
}
