//! Signing in and out: sessions, CSRF tokens, the password (argon2), and
//! IndieAuth with the site's own domain.
//!
//! Sessions: a random secret ([`new_secret`], 256 bits) in the
//! `pm_session` cookie; the store keeps only its SHA-256 with the site it
//! is for, its CSRF token and its expiry. A session acts for one site.
//!
//! Before sign-in there is no session, so the sign-in forms are bound to a
//! `pm_login` cookie instead (double submit, keyed by a per-process secret):
//! a page on another site cannot make a browser sign in. That cookie is
//! `SameSite=Lax` because it must come back on the top-level redirect from
//! the IndieAuth server, which a `Strict` cookie would not; it grants nothing.
//!
//! IndieAuth (the 2022 spec, authentication only): the endpoints come from
//! the site's homepage (`rel=indieauth-metadata`, else
//! `rel=authorization_endpoint`, in a `Link` header or the HTML) through the
//! project's one outbound client; PKCE S256 and `state`; the code is redeemed
//! at the authorization endpoint, and the `me` it answers must canonically
//! equal the site identity.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::{Response, StatusCode};
use maud::html;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use url::Url;

use super::{
    Ctx, Form, Req, add_cookie, cookie, enc, error_page, html as page, layout, parse_form,
    parse_query, redirect, safe_next,
};
use crate::app::{App, lock, now_ms};
use crate::config::SiteConfig;
use crate::identity::{Identity, parse_http_url};
use crate::protocol::{hash_secret, is_valid_token, new_secret};
use crate::server::Body;
use crate::store::UiSession;

pub const SESSION_COOKIE: &str = "pm_session";
pub const LOGIN_COOKIE: &str = "pm_login";
/// A session lasts a week from sign-in.
pub const SESSION_SECS: i64 = 7 * 86400;
/// An IndieAuth sign-in must come back within ten minutes.
const PENDING_SECS: i64 = 600;
/// Most IndieAuth sign-ins under way at once.
const MAX_PENDING: usize = 1000;
/// Longest password read from a form.
const MAX_PASSWORD: usize = 1024;

// ---------------------------------------------------------------------------
// Passwords

/// An argon2id PHC string for `password` (the `[auth] password` value).
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::{Argon2, PasswordHasher};
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| format!("cannot hash the password: {e}"))
}

/// Whether `password` matches the PHC string `hash` (false if `hash` is malformed).
pub fn verify_password(hash: &str, password: &str) -> bool {
    use argon2::{Argon2, PasswordVerifier};
    Argon2::default()
        .verify_password(password.as_bytes(), hash)
        .is_ok()
}

/// The password hash that signs in to `site`: its own, or for the first
/// site the `[auth]` one (as with Micropub tokens).
fn password_for<'a>(app: &'a App, site: &'a SiteConfig) -> Option<&'a str> {
    if let Some(p) = &site.password {
        return Some(p);
    }
    let first = app.config.sites.first()?;
    (first.identity() == site.identity())
        .then_some(app.config.auth.password.as_deref())
        .flatten()
}

// ---------------------------------------------------------------------------
// Sessions

/// The signed-in session of a request.
pub struct Session {
    /// SHA-256 of the cookie's secret: the session's key in the store.
    pub hash: String,
    pub data: UiSession,
}

impl Session {
    /// Does the form carry this session's CSRF token? (Constant time.)
    pub fn csrf_ok(&self, form: &Form) -> bool {
        form.get("csrf")
            .is_some_and(|t| ct_eq(t.as_bytes(), self.data.csrf.as_bytes()))
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// The valid, unexpired session the request's cookie names, if any.
pub fn current(app: &App, req: &Req) -> Option<Session> {
    let secret = cookie(req, SESSION_COOKIE)?;
    if !is_valid_token(&secret) {
        return None;
    }
    let hash = hash_secret(&secret);
    let data = app.store.session(&hash).ok()??;
    if data.expires_ms <= now_ms() || app.site(&data.me).is_none() {
        return None;
    }
    Some(Session { hash, data })
}

/// Starts a session for `site`: stores it and returns the cookie to set.
async fn start_session(app: &App, site: &SiteConfig, method: &str) -> Result<String, String> {
    let secret = new_secret();
    let now = now_ms();
    let data = UiSession {
        me: site.identity().as_str().to_string(),
        csrf: new_secret(),
        created_ms: now,
        expires_ms: now + SESSION_SECS * 1000,
        method: method.into(),
    };
    app.store
        .put_session(hash_secret(&secret), data)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(me = %site.me, method, "web UI sign-in");
    Ok(format!(
        "{SESSION_COOKIE}={secret}; Path=/ui; Max-Age={SESSION_SECS}; Secure; HttpOnly; SameSite=Strict"
    ))
}

fn clear_cookie(name: &str) -> String {
    format!("{name}=; Path=/ui; Max-Age=0; Secure; HttpOnly; SameSite=Strict")
}

/// A request without a valid session: GETs go to the sign-in page and
/// come back afterwards; other methods just go to the sign-in page.
///
/// A top-level navigation from another site (a link in a notification
/// mail, the IndieAuth server's redirect) does not carry the `Strict`
/// session cookie, so such a GET first gets a page that reloads the same
/// address from this site, which does carry it.
pub fn unauthenticated(req: &Req) -> Response<Body> {
    let here = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/ui/".into());
    let here = safe_next(Some(&here));
    if *req.method() != hyper::Method::GET && *req.method() != hyper::Method::HEAD {
        return redirect("/ui/signin");
    }
    let cross_site = req
        .headers()
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == "cross-site");
    if cross_site {
        return page(StatusCode::OK, layout::bounce(&here, "Opening…"));
    }
    redirect(&format!("/ui/signin?next={}", enc(&here)))
}

pub async fn signout(ctx: &Ctx<'_>) -> Response<Body> {
    let _ = ctx.app.store.remove_session(ctx.session.hash.clone()).await;
    let mut r = redirect("/ui/signin?done=signed-out");
    add_cookie(&mut r, &clear_cookie(SESSION_COOKIE));
    r
}

// ---------------------------------------------------------------------------
// The sign-in page and its CSRF binding

/// The CSRF token of the sign-in forms, bound to the `pm_login` cookie.
fn login_token(app: &App, login_cookie: &str) -> String {
    let mut h = Sha256::new();
    h.update(app.web.key);
    h.update(b"indiepm sign-in form\n");
    h.update(login_cookie.as_bytes());
    hex::encode(h.finalize())
}

/// The request's `pm_login` cookie, if it is well formed.
fn login_cookie(req: &Req) -> Option<String> {
    cookie(req, LOGIN_COOKIE).filter(|c| is_valid_token(c))
}

/// Does the sign-in form carry the token bound to its cookie?
fn login_form_ok(app: &App, req: &Req, form: &Form) -> bool {
    match (login_cookie(req), form.get("csrf")) {
        (Some(c), Some(t)) => ct_eq(login_token(app, &c).as_bytes(), t.as_bytes()),
        _ => false,
    }
}

/// Messages of the sign-in page, by the code in its query (never free text
/// from the address bar).
fn signin_message(code: &str) -> Option<(&'static str, &'static str)> {
    Some(match code {
        "wrong" => ("error", "Wrong password."),
        "rate" => (
            "error",
            "Too many sign-in attempts. Wait a minute and try again.",
        ),
        "expired" => (
            "error",
            "The sign-in form expired or your browser did not send its cookie back. \
             The web UI needs cookies, and they are Secure cookies: open it over HTTPS \
             (or on this machine's loopback address). Then try again.",
        ),
        "no-password" => (
            "error",
            "No password is set for this site: run `indiepm password` and add the line \
             it prints to the config, or sign in with your domain.",
        ),
        "site" => ("error", "Choose one of the sites of this server."),
        "no-indieauth" => (
            "error",
            "Your homepage does not advertise an IndieAuth authorization endpoint \
             (rel=\"authorization_endpoint\" or rel=\"indieauth-metadata\"), or it could not be fetched.",
        ),
        "indieauth-expired" => (
            "error",
            "That sign-in took too long or was started in another browser. Try again.",
        ),
        "indieauth-denied" => ("error", "The authorization server did not sign you in."),
        "indieauth-failed" => (
            "error",
            "The authorization server's answer could not be confirmed for this site.",
        ),
        "signed-out" => ("notice", "You are signed out."),
        _ => return None,
    })
}

pub fn signin_page(app: &App, req: &Req) -> Response<Body> {
    let query = parse_query(req);
    let next = safe_next(query.get("next"));
    if current(app, req).is_some() {
        return redirect(&next);
    }
    let (login, new_cookie) = match login_cookie(req) {
        Some(c) => (c, false),
        None => (new_secret(), true),
    };
    let csrf = login_token(app, &login);
    let message = query
        .get("error")
        .or(query.get("done"))
        .and_then(|c| signin_message(c));
    let chosen = query.get("site").and_then(|s| Identity::parse(s).ok());
    let sites: Vec<(String, bool)> = app
        .config
        .sites
        .iter()
        .map(|s| {
            let id = s.identity();
            let selected = chosen.as_ref() == Some(&id);
            (id.as_str().to_string(), selected)
        })
        .collect();
    let any_password = app
        .config
        .sites
        .iter()
        .any(|s| password_for(app, s).is_some());
    let site_field = |id_suffix: &str| {
        html! {
            @if sites.len() == 1 {
                input type="hidden" name="site" value=(sites[0].0);
            } @else {
                label for=(format!("site-{id_suffix}")) { "Site" }
                select id=(format!("site-{id_suffix}")) name="site" {
                    @for (s, selected) in &sites {
                        option value=(s) selected[*selected] { (super::short_identity(s)) }
                    }
                }
            }
        }
    };
    let body = html! {
        div.signin {
            h1 { "Sign in" }
            @if sites.len() == 1 {
                p.muted { "to the private messages of " strong { (super::short_identity(&sites[0].0)) } }
            }
            @if let Some((kind, text)) = message {
                p class=(kind) role="alert" { (text) }
            }
            @if any_password {
                form.card method="post" action="/ui/signin" {
                    input type="hidden" name="csrf" value=(csrf);
                    input type="hidden" name="next" value=(next);
                    (site_field("pw"))
                    label for="password" { "Password" }
                    input #password type="password" name="password" autocomplete="current-password" required autofocus;
                    button type="submit" { "Sign in" }
                }
            }
            form.card method="post" action="/ui/indieauth" {
                input type="hidden" name="csrf" value=(csrf);
                input type="hidden" name="next" value=(next);
                (site_field("ia"))
                p.muted { "Or sign in with your own domain, through the IndieAuth server your homepage names." }
                button.secondary type="submit" { "Sign in with your domain" }
            }
            div.h-app.hidden { a.u-url.p-name href="/ui/" { "indiepm" } }
        }
    };
    let mut r = page(StatusCode::OK, layout::page("Sign in", None, body));
    if new_cookie {
        add_cookie(
            &mut r,
            &format!(
                "{LOGIN_COOKIE}={login}; Path=/ui; Max-Age=3600; Secure; HttpOnly; SameSite=Lax"
            ),
        );
    }
    r
}

/// Where the sign-in page sends a refused attempt back to.
fn back_to_signin(code: &str, form: &Form) -> Response<Body> {
    let next = safe_next(form.get("next"));
    let site = form.get("site").map(|s| enc(s)).unwrap_or_default();
    redirect(&format!(
        "/ui/signin?error={code}&site={site}&next={}",
        enc(&next)
    ))
}

/// The configured site a sign-in form names (the only one if there is one).
fn form_site<'a>(app: &'a App, form: &Form) -> Option<&'a SiteConfig> {
    match form.get("site") {
        Some(s) => app.site(s),
        None if app.config.sites.len() == 1 => app.config.sites.first(),
        None => None,
    }
}

pub async fn signin_post(app: &Arc<App>, req: &Req, peer: SocketAddr) -> Response<Body> {
    let Some(form) = parse_form(req) else {
        return error_page(StatusCode::BAD_REQUEST, "The form could not be read.");
    };
    if !login_form_ok(app, req, &form) {
        return back_to_signin("expired", &form);
    }
    if !app.web.allow_login(&peer) {
        tracing::warn!(client = %peer.ip(), "web UI sign-in rate limited");
        return back_to_signin("rate", &form);
    }
    let Some(site) = form_site(app, &form) else {
        return back_to_signin("site", &form);
    };
    let Some(hash) = password_for(app, site).map(str::to_string) else {
        return back_to_signin("no-password", &form);
    };
    let password = form.get("password").cloned().unwrap_or_default();
    let ok = password.len() <= MAX_PASSWORD
        && tokio::task::spawn_blocking(move || verify_password(&hash, &password))
            .await
            .unwrap_or(false);
    if !ok {
        tracing::warn!(client = %peer.ip(), me = %site.me, "web UI sign-in: wrong password");
        return back_to_signin("wrong", &form);
    }
    match start_session(app, site, "password").await {
        Ok(set) => {
            let mut r = redirect(&safe_next(form.get("next")));
            add_cookie(&mut r, &set);
            add_cookie(&mut r, &clear_cookie(LOGIN_COOKIE));
            r
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot store a web UI session");
            error_page(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The session could not be stored. Try again later.",
            )
        }
    }
}

// ---------------------------------------------------------------------------
// IndieAuth

/// An IndieAuth sign-in under way.
pub struct Pending {
    me: String,
    authorization_endpoint: Url,
    /// From the metadata document, when the site has one: `iss` must match.
    issuer: Option<String>,
    verifier: String,
    /// SHA-256 of the `pm_login` cookie that started it.
    login_hash: String,
    next: String,
    created_ms: i64,
}

/// `client_id`: the UI on the origin of the site's PM endpoint.
fn client_id(site: &SiteConfig) -> String {
    let origin = Url::parse(&site.endpoint)
        .map(|u| u.origin().ascii_serialization())
        .unwrap_or_default();
    format!("{origin}/ui/")
}

fn redirect_uri(site: &SiteConfig) -> String {
    format!("{}indieauth/callback", client_id(site))
}

/// The first link with `rel` value `want`: `Link` header first, then the HTML.
fn rel_link(page: &crate::fetch::Fetched, want: &str) -> Option<Url> {
    let url = crate::discover::find_rel(&page.url, &page.headers, &page.body, true, want)?;
    parse_http_url(url.as_str()).ok()
}

/// The authorization endpoint (and issuer, from metadata) of `me`'s homepage.
async fn discover_authorization(app: &App, me: &Identity) -> Result<(Url, Option<String>), String> {
    let home = app
        .fetcher
        .get(me.url(), "text/html,application/xhtml+xml;q=0.9,*/*;q=0.1")
        .await
        .map_err(|e| e.to_string())?;
    if !home.status.is_success() {
        return Err(format!("{} answered HTTP {}", me, home.status.as_u16()));
    }
    if let Some(meta_url) = rel_link(&home, "indieauth-metadata") {
        let meta = app
            .fetcher
            .get(&meta_url, "application/json")
            .await
            .map_err(|e| e.to_string())?;
        let doc: serde_json::Value =
            serde_json::from_slice(&meta.body).map_err(|e| format!("metadata {meta_url}: {e}"))?;
        let endpoint = doc["authorization_endpoint"]
            .as_str()
            .and_then(|s| parse_http_url(s).ok())
            .ok_or_else(|| format!("metadata {meta_url} has no authorization_endpoint"))?;
        let issuer = doc["issuer"].as_str().map(str::to_string);
        return Ok((endpoint, issuer));
    }
    rel_link(&home, "authorization_endpoint")
        .map(|e| (e, None))
        .ok_or_else(|| format!("{me} advertises no authorization endpoint"))
}

/// PKCE S256: base64url(SHA-256(verifier)).
pub(crate) fn challenge(verifier: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

pub async fn indieauth_start(app: &Arc<App>, req: &Req, peer: SocketAddr) -> Response<Body> {
    let Some(form) = parse_form(req) else {
        return error_page(StatusCode::BAD_REQUEST, "The form could not be read.");
    };
    if !login_form_ok(app, req, &form) {
        return back_to_signin("expired", &form);
    }
    let Some(login) = login_cookie(req) else {
        return back_to_signin("expired", &form);
    };
    if !app.web.allow_login(&peer) {
        return back_to_signin("rate", &form);
    }
    let Some(site) = form_site(app, &form) else {
        return back_to_signin("site", &form);
    };
    let me = site.identity();
    let (endpoint, issuer) = match discover_authorization(app, &me).await {
        Ok(x) => x,
        Err(e) => {
            tracing::info!(me = %me, "IndieAuth sign-in: {e}");
            return back_to_signin("no-indieauth", &form);
        }
    };
    let state = new_secret();
    let now = now_ms();
    {
        let mut pending = lock(&app.web.pending);
        pending.retain(|_, p| now - p.created_ms < PENDING_SECS * 1000);
        if pending.len() >= MAX_PENDING {
            return back_to_signin("rate", &form);
        }
        pending.insert(
            state.clone(),
            Pending {
                me: me.as_str().to_string(),
                authorization_endpoint: endpoint,
                issuer,
                verifier: new_secret(),
                login_hash: hash_secret(&login),
                next: safe_next(form.get("next")),
                created_ms: now,
            },
        );
    }
    // A page of this site leads on to the authorization server: the
    // policy's `form-action 'self'` covers redirects after a form, so the
    // form itself may only redirect here.
    redirect(&format!("/ui/indieauth/go?state={}", enc(&state)))
}

/// Whether the request's `pm_login` cookie is the one that started `p`.
fn same_browser(req: &Req, p: &Pending) -> bool {
    login_cookie(req).is_some_and(|c| ct_eq(hash_secret(&c).as_bytes(), p.login_hash.as_bytes()))
}

pub fn indieauth_go(app: &App, req: &Req) -> Response<Body> {
    let query = parse_query(req);
    let state = query.get("state").cloned().unwrap_or_default();
    let target = {
        let pending = lock(&app.web.pending);
        match pending.get(&state) {
            Some(p) if same_browser(req, p) && now_ms() - p.created_ms < PENDING_SECS * 1000 => {
                app.site(&p.me).map(|site| {
                    let mut url = p.authorization_endpoint.clone();
                    url.query_pairs_mut()
                        .append_pair("response_type", "code")
                        .append_pair("client_id", &client_id(site))
                        .append_pair("redirect_uri", &redirect_uri(site))
                        .append_pair("state", &state)
                        .append_pair("code_challenge", &challenge(&p.verifier))
                        .append_pair("code_challenge_method", "S256")
                        .append_pair("me", &p.me);
                    url
                })
            }
            _ => None,
        }
    };
    match target {
        Some(url) => page(
            StatusCode::OK,
            layout::bounce(url.as_str(), "Continue to your authorization server"),
        ),
        None => redirect("/ui/signin?error=indieauth-expired"),
    }
}

pub async fn indieauth_callback(app: &Arc<App>, req: &Req) -> Response<Body> {
    let query = parse_query(req);
    let state = query.get("state").cloned().unwrap_or_default();
    let Some(p) = lock(&app.web.pending).remove(&state) else {
        return redirect("/ui/signin?error=indieauth-expired");
    };
    if !same_browser(req, &p) || now_ms() - p.created_ms >= PENDING_SECS * 1000 {
        return redirect("/ui/signin?error=indieauth-expired");
    }
    let fail = |code: &str| redirect(&format!("/ui/signin?error={code}&next={}", enc(&p.next)));
    if query.contains_key("error") {
        return fail("indieauth-denied");
    }
    if let Some(issuer) = &p.issuer
        && query.get("iss") != Some(issuer)
    {
        tracing::info!(me = %p.me, "IndieAuth sign-in: iss does not match the issuer");
        return fail("indieauth-failed");
    }
    let Some(site) = app.site(&p.me) else {
        return fail("site");
    };
    let code = match query.get("code") {
        Some(c) if !c.is_empty() && c.len() <= 4096 => c.clone(),
        _ => return fail("indieauth-failed"),
    };
    let (cid, ruri) = (client_id(site), redirect_uri(site));
    let answer = app
        .fetcher
        .post_form(
            &p.authorization_endpoint,
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("client_id", &cid),
                ("redirect_uri", &ruri),
                ("code_verifier", &p.verifier),
            ],
            None,
        )
        .await;
    let me = match answer {
        Ok(r) if r.status.is_success() => returned_me(&r.body),
        Ok(r) => {
            tracing::info!(me = %p.me, status = r.status.as_u16(), "IndieAuth code refused");
            None
        }
        Err(e) => {
            tracing::info!(me = %p.me, "IndieAuth code redemption failed: {e}");
            None
        }
    };
    if me.as_ref() != Some(&site.identity()) {
        tracing::warn!(me = %p.me, returned = ?me.map(|m| m.to_string()), "IndieAuth sign-in for another identity refused");
        return fail("indieauth-failed");
    }
    match start_session(app, site, "indieauth").await {
        Ok(set) => {
            // A page, not a redirect: this request came from the
            // authorization server (cross-site), and a redirect chain that
            // started there would not carry the new Strict cookie.
            let mut r = page(StatusCode::OK, layout::bounce(&p.next, "Signed in"));
            add_cookie(&mut r, &set);
            add_cookie(&mut r, &clear_cookie(LOGIN_COOKIE));
            r
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot store a web UI session");
            error_page(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The session could not be stored. Try again later.",
            )
        }
    }
}

/// The `me` of the authorization endpoint's answer (JSON, or form-encoded
/// from older servers), canonicalised.
fn returned_me(body: &[u8]) -> Option<Identity> {
    let me = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => v["me"].as_str().map(str::to_string),
        Err(_) => serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
            .ok()?
            .into_iter()
            .find(|(k, _)| k == "me")
            .map(|(_, v)| v),
    }?;
    Identity::parse(&me).ok()
}
