//! The owner's Micropub endpoint at `/micropub` (CONTRACT.md, "Micropub"):
//! creating outgoing messages (step 0), `q=config` and `q=source`.
//!
//! Bearer tokens come in the `Authorization` header or as `access_token`.
//! They are checked against the SHA-256 hashes in the config (in constant
//! time, against every entry), then, when `[auth] token_endpoint` is set,
//! against that IndieAuth token endpoint (its `me` must be one of our sites
//! and its scope must hold `create`), with a short cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};

use crate::app::{App, lock};
use crate::identity::Identity;
use crate::protocol::{self, hash_secret};
use crate::server::{Body, json, read_body};

/// How long an IndieAuth token endpoint's answer is reused.
const TOKEN_CACHE: Duration = Duration::from_secs(120);
/// Largest Micropub request body.
const MAX_BODY: usize = 512 * 1024;

/// A Micropub error: status, `error` and description (Micropub spec §3.7).
#[derive(Debug)]
pub struct MpError(StatusCode, &'static str, String);

impl MpError {
    fn unauthorized(d: &str) -> Self {
        MpError(StatusCode::UNAUTHORIZED, "unauthorized", d.into())
    }
    fn forbidden(d: &str) -> Self {
        MpError(StatusCode::FORBIDDEN, "forbidden", d.into())
    }
    fn insufficient_scope(d: &str) -> Self {
        MpError(StatusCode::FORBIDDEN, "insufficient_scope", d.into())
    }
    fn invalid(d: impl Into<String>) -> Self {
        MpError(StatusCode::BAD_REQUEST, "invalid_request", d.into())
    }
    fn response(&self) -> Response<Body> {
        let mut r = json(
            self.0,
            &json!({"error": self.1, "error_description": self.2}),
        );
        if self.0 == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// Cached answers of the IndieAuth token endpoint, by token hash.
#[derive(Default)]
pub struct TokenCache(Mutex<HashMap<String, (Instant, Option<Grant>)>>);

/// Who a token acts for, and whether it may create.
#[derive(Debug, Clone)]
pub struct Grant {
    pub me: Identity,
    pub can_create: bool,
}

pub async fn handle(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    match route(app, req).await {
        Ok(r) => r,
        Err(e) => e.response(),
    }
}

async fn route(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, MpError> {
    let header_token = crate::server::bearer_token(req.headers());
    match *req.method() {
        Method::GET => {
            let query: HashMap<String, String> = req
                .uri()
                .query()
                .map(|q| serde_urlencoded::from_str(q).unwrap_or_default())
                .unwrap_or_default();
            let token = header_token.or_else(|| query.get("access_token").cloned());
            let grant = authorize(app, token).await?;
            match query.get("q").map(String::as_str) {
                Some("config") => Ok(json(
                    StatusCode::OK,
                    &json!({
                        "q": ["config", "source"],
                        "post-types": [{"type": "pm", "name": "Private message"}],
                        "me": grant.me.as_str(),
                    }),
                )),
                Some("source") => source(app, &grant, &query),
                _ => Err(MpError::invalid("supported queries: q=config, q=source")),
            }
        }
        Method::POST => {
            // A token in the header is checked before the body is read, so a
            // stranger cannot make us buffer large bodies; without one, the
            // body (which may carry `access_token`) is read with a smaller cap.
            let early = match header_token {
                Some(t) => Some(authorize(app, Some(t)).await?),
                None => None,
            };
            let limit = if early.is_some() {
                MAX_BODY
            } else {
                (app.config.limits.max_content_bytes * 3 + 16 * 1024).min(MAX_BODY)
            };
            // Without a token in the header, the body was the only place
            // left for one: a body we cannot read or parse holds no token,
            // and no token is 401 (CONTRACT.md) whatever else is wrong.
            let no_token = || MpError::unauthorized("a bearer token is required");
            let (parts, body) = match read_body(req, limit, app.config.limits.body_timeout()).await
            {
                Ok(read) => read,
                Err(_) if early.is_none() => return Err(no_token()),
                Err(e) => return Err(MpError::invalid(e.description)),
            };
            let post = match Post::parse(&parts.headers, &body) {
                Ok(post) => post,
                Err(_) if early.is_none() => return Err(no_token()),
                Err(e) => return Err(e),
            };
            let grant = match early {
                Some(g) => g,
                None => authorize(app, post.access_token.clone()).await?,
            };
            if !grant.can_create {
                return Err(MpError::insufficient_scope(
                    "the token's scope lacks `create`",
                ));
            }
            create(app, &grant, post).await
        }
        _ => Err(MpError::invalid("Micropub takes GET and POST")),
    }
}

/// A create request, from either syntax.
#[derive(Debug, Default)]
struct Post {
    content: Option<String>,
    audience: Vec<String>,
    name: Option<String>,
    in_reply_to: Option<String>,
    access_token: Option<String>,
    /// `pm-flow`: this project's extension to pick the flow of one message.
    flow: Option<String>,
    /// Why the post is not an h-entry, if it is not: judged after the
    /// token, so that a request without one is 401 whatever it holds.
    not_entry: Option<&'static str>,
}

impl Post {
    fn parse(headers: &http::HeaderMap, body: &[u8]) -> Result<Post, MpError> {
        let ct = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        if ct.starts_with("application/json") {
            let v: Value = serde_json::from_slice(body)
                .map_err(|e| MpError::invalid(format!("body is not JSON: {e}")))?;
            let types = v["type"].as_array().cloned().unwrap_or_default();
            let props = &v["properties"];
            let first = |k: &str| props[k].as_array().and_then(|a| a.first()).cloned();
            let text = |v: Value| match v {
                Value::String(s) => Some(s),
                Value::Object(o) => o
                    .get("text")
                    .or_else(|| o.get("value"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                _ => None,
            };
            Ok(Post {
                content: first("content").and_then(text),
                audience: props["audience"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
                name: first("name").and_then(text),
                in_reply_to: first("in-reply-to").and_then(text),
                access_token: v["access_token"].as_str().map(str::to_string),
                flow: first("pm-flow").and_then(text),
                not_entry: (!types.iter().any(|t| t == "h-entry"))
                    .then_some("type must be [\"h-entry\"]"),
            })
        } else if ct.starts_with("application/x-www-form-urlencoded") {
            let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body)
                .map_err(|e| MpError::invalid(format!("body is not form-encoded: {e}")))?;
            let mut post = Post::default();
            let mut h = None;
            for (k, v) in pairs {
                match k.as_str() {
                    "h" => h = Some(v),
                    "content" => post.content = Some(v),
                    "audience" | "audience[]" => post.audience.push(v),
                    "name" => post.name = Some(v),
                    "in-reply-to" => post.in_reply_to = Some(v),
                    "access_token" => post.access_token = Some(v),
                    "pm-flow" => post.flow = Some(v),
                    _ => {}
                }
            }
            if h.as_deref().is_some_and(|h| h != "entry") {
                post.not_entry = Some("only h=entry is supported");
            }
            Ok(post)
        } else {
            Err(MpError::invalid(
                "send application/x-www-form-urlencoded or application/json",
            ))
        }
    }
}

/// Checks the bearer token: config hashes first, then the token endpoint.
async fn authorize(app: &Arc<App>, token: Option<String>) -> Result<Grant, MpError> {
    let token = token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| MpError::unauthorized("a bearer token is required"))?;
    let digest = format!("sha256:{}", hash_secret(&token));
    // Every configured hash is compared, in constant time, whatever matches first.
    let mut found: Option<&crate::config::SiteConfig> = None;
    for site in &app.config.sites {
        for t in &site.tokens {
            if protocol::hashes_equal(t, &digest) {
                found = found.or(Some(site));
            }
        }
    }
    for t in &app.config.auth.tokens {
        if protocol::hashes_equal(t, &digest) {
            found = found.or(app.config.sites.first());
        }
    }
    if let Some(site) = found {
        return Ok(Grant {
            me: site.identity(),
            can_create: true,
        });
    }
    if let Some(endpoint) = &app.config.auth.token_endpoint {
        return match verify_remote(app, endpoint, &token, &digest).await {
            Some(g) => Ok(g),
            None => Err(MpError::forbidden(
                "the token endpoint does not vouch for this token",
            )),
        };
    }
    Err(MpError::forbidden("unknown token"))
}

/// IndieAuth token verification: GET the token endpoint with the token.
async fn verify_remote(app: &Arc<App>, endpoint: &str, token: &str, key: &str) -> Option<Grant> {
    if let Some((at, grant)) = lock(&app.token_cache.0).get(key).cloned()
        && at.elapsed() < TOKEN_CACHE
    {
        return grant;
    }
    let url = url::Url::parse(endpoint).ok()?;
    let grant = match app.fetcher.get_with_bearer(&url, token).await {
        Ok(r) if r.status.is_success() => {
            let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            let me = v["me"].as_str().and_then(|m| Identity::parse(m).ok());
            let scope = v["scope"].as_str().unwrap_or("");
            me.filter(|me| app.config.site(me).is_some())
                .map(|me| Grant {
                    me,
                    can_create: scope.split_whitespace().any(|s| s == "create"),
                })
        }
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(error = %e, "token endpoint unreachable");
            return None;
        }
    };
    let mut cache = lock(&app.token_cache.0);
    cache.retain(|_, (at, _)| at.elapsed() < TOKEN_CACHE);
    cache.insert(key.to_string(), (Instant::now(), grant.clone()));
    grant
}

/// Step 0 for each recipient of the audience.
async fn create(app: &Arc<App>, grant: &Grant, post: Post) -> Result<Response<Body>, MpError> {
    if let Some(why) = post.not_entry {
        return Err(MpError::invalid(why));
    }
    let content = post
        .content
        .filter(|c| !c.trim().is_empty())
        .ok_or_else(|| MpError::invalid("`content` is required"))?;
    if content.len() > app.config.limits.max_content_bytes {
        return Err(MpError::invalid(format!(
            "content is over {} bytes",
            app.config.limits.max_content_bytes
        )));
    }
    if post.audience.is_empty() {
        return Err(MpError::invalid(
            "`audience` must name at least one recipient URL",
        ));
    }
    let recipients = post
        .audience
        .iter()
        .map(|a| Identity::parse(a).map_err(|e| MpError::invalid(format!("audience: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(n) = &post.name
        && n.chars().count() > protocol::MAX_NAME_CHARS
    {
        return Err(MpError::invalid("`name` is over 256 characters"));
    }
    let in_reply_to = post.in_reply_to.filter(|r| !r.is_empty());
    if let Some(r) = &in_reply_to
        && !protocol::is_valid_id(r)
    {
        return Err(MpError::invalid("`in-reply-to` must be a message ID"));
    }
    let flow = match post.flow.as_deref() {
        None | Some("") => app.config.delivery.flow,
        Some("channel") => crate::config::Flow::Channel,
        Some("message") => crate::config::Flow::Message,
        Some(other) => {
            return Err(MpError::invalid(format!(
                "pm-flow must be `channel` or `message`, not `{other}`"
            )));
        }
    };
    let mut created = Vec::new();
    for r in recipients {
        let msg = crate::sender::create_message_in(
            app,
            &grant.me,
            &r,
            content.clone(),
            post.name.clone(),
            in_reply_to.clone(),
            flow,
        )
        .await
        .map_err(|e| MpError(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e))?;
        created.push(msg);
    }
    let location = format!("/micropub?q=source&id={}", created[0].id);
    let mut resp = json(
        StatusCode::ACCEPTED,
        &json!({
            "messages": created.iter().map(|m| json!({
                "id": m.id, "recipient": m.recipient, "state": m.state.as_str(),
                "url": format!("/micropub?q=source&id={}", m.id),
            })).collect::<Vec<_>>()
        }),
    );
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

/// `q=source`: an outgoing message as Micropub JSON, with its delivery state.
fn source(
    app: &Arc<App>,
    grant: &Grant,
    query: &HashMap<String, String>,
) -> Result<Response<Body>, MpError> {
    let id = query
        .get("id")
        .cloned()
        .or_else(|| {
            query.get("url").and_then(|u| {
                let u = url::Url::parse(u)
                    .or_else(|_| url::Url::parse("http://x/").and_then(|b| b.join(u)))
                    .ok()?;
                u.query_pairs()
                    .find(|(k, _)| k == "id")
                    .map(|(_, v)| v.into_owned())
            })
        })
        .ok_or_else(|| MpError::invalid("q=source needs `url` or `id`"))?;
    let msg = app
        .store
        .message(&id)
        .map_err(|e| {
            MpError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                e.to_string(),
            )
        })?
        .filter(|m| m.sender == grant.me.as_str())
        .ok_or_else(|| MpError::invalid("no such message"))?;
    let mut props = json!({
        "content": [msg.content],
        "audience": [msg.recipient],
        "published": [msg.published],
        "pm-state": [msg.state.as_str()],
        "pm-attempts": [msg.attempts],
    });
    if let Some(n) = msg.name {
        props["name"] = json!([n]);
    }
    if let Some(r) = msg.in_reply_to {
        props["in-reply-to"] = json!([r]);
    }
    if let Some(e) = msg.last_error {
        props["pm-last-error"] = json!([e]);
    }
    Ok(json(
        StatusCode::OK,
        &json!({"type": ["h-entry"], "properties": props}),
    ))
}
