//! The web UI without a browser: requests straight into [`super::route`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use super::route;
use crate::app::App;
use crate::config::Config;
use crate::identity::Identity;
use crate::server::Body;
use crate::store::Store;

const PASSWORD: &str = "correct horse battery staple";

/// An argon2id hash with small parameters, so that debug-build tests stay fast.
fn cheap_hash(password: &str) -> String {
    use argon2::{Algorithm, Argon2, Params, PasswordHasher, Version};
    let params = Params::new(1024, 1, 1, None).unwrap();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(password.as_bytes())
        .unwrap()
        .to_string()
}

struct T {
    app: Arc<App>,
    _dir: tempfile::TempDir,
    me: String,
}

fn setup_with(me: &str, endpoint: &str) -> T {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
data_dir = "data"
[network]
allow_private = true
[[site]]
me = "{me}"
endpoint = "{endpoint}"
content_dir = "content"
[auth]
password = "{hash}"
"#,
        hash = cheap_hash(PASSWORD)
    );
    let path = dir.path().join("indiepm.toml");
    std::fs::write(&path, &text).unwrap();
    let config = Config::load(&path).unwrap();
    let store = Store::open(&config.server.data_dir).unwrap();
    let me = Identity::parse(me).unwrap().as_str().to_string();
    T {
        app: App::new(
            config,
            store,
            crate::inbox::writer::Writer::start().unwrap(),
        ),
        _dir: dir,
        me,
    }
}

fn setup() -> T {
    setup_with("https://alice.example/", "https://pm.alice.example/pm")
}

fn peer() -> SocketAddr {
    "192.0.2.7:5555".parse().unwrap()
}

/// A request: cookies as `name=value` pairs, an optional form body.
fn request(
    method: Method,
    uri: &str,
    cookies: &[String],
    form: Option<&[(&str, &str)]>,
) -> Request<Bytes> {
    let mut b = Request::builder().method(method).uri(uri);
    if !cookies.is_empty() {
        b = b.header(header::COOKIE, cookies.join("; "));
    }
    let body = match form {
        Some(f) => {
            b = b.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
            Bytes::from(serde_urlencoded::to_string(f).unwrap())
        }
        None => Bytes::new(),
    };
    b.body(body).unwrap()
}

/// Routes like [`super::handle`] does, headers included.
async fn send(app: &Arc<App>, req: Request<Bytes>) -> Response<Body> {
    let mut r = route(app, req, peer()).await;
    super::security_headers(&mut r);
    r
}

async fn get(t: &T, uri: &str, cookies: &[String]) -> Response<Body> {
    send(&t.app, request(Method::GET, uri, cookies, None)).await
}

async fn post(t: &T, uri: &str, cookies: &[String], form: &[(&str, &str)]) -> Response<Body> {
    send(&t.app, request(Method::POST, uri, cookies, Some(form))).await
}

async fn text(r: Response<Body>) -> String {
    let bytes = r.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

fn location(r: &Response<Body>) -> String {
    r.headers()
        .get(header::LOCATION)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// The `Set-Cookie` headers by cookie name: (`name=value`, the whole header).
fn set_cookies(r: &Response<Body>) -> HashMap<String, (String, String)> {
    r.headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|v| {
            let full = v.to_str().unwrap().to_string();
            let pair = full.split(';').next().unwrap().to_string();
            let name = pair.split('=').next().unwrap().to_string();
            (name, (pair, full))
        })
        .collect()
}

/// The value of the first `name="csrf"` hidden field of a page.
fn csrf_of(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("a csrf field") + 19;
    html[at..].split('"').next().unwrap().to_string()
}

/// The sign-in page's cookie and form token.
async fn login_form(t: &T) -> (String, String) {
    let r = get(t, "/ui/signin", &[]).await;
    let cookie = set_cookies(&r)["pm_login"].0.clone();
    let csrf = csrf_of(&text(r).await);
    (cookie, csrf)
}

/// Signs in with the password: the session cookie and the session's CSRF token.
async fn sign_in(t: &T) -> (String, String) {
    let (login, csrf) = login_form(t).await;
    let r = post(
        t,
        "/ui/signin",
        std::slice::from_ref(&login),
        &[
            ("csrf", &csrf),
            ("password", PASSWORD),
            ("next", "/ui/compose"),
        ],
    )
    .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&r), "/ui/compose");
    let session = set_cookies(&r)["pm_session"].0.clone();
    let page = text(get(t, "/ui/compose", std::slice::from_ref(&session)).await).await;
    (session, csrf_of(&page))
}

#[tokio::test]
async fn unauthenticated_requests_go_to_sign_in() {
    let t = setup();
    for path in [
        "/ui/",
        "/ui/outbox",
        "/ui/compose",
        "/ui/inbox/x.md",
        "/ui/blocked",
    ] {
        let r = get(&t, path, &[]).await;
        assert_eq!(r.status(), StatusCode::SEE_OTHER, "{path}");
        assert!(
            location(&r).starts_with("/ui/signin?next=%2Fui%2F"),
            "{path}"
        );
    }
    let r = post(&t, "/ui/compose", &[], &[("to", "https://bob.example/")]).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&r), "/ui/signin");
    // A forged or stale session cookie is no session.
    let r = get(
        &t,
        "/ui/",
        &["pm_session=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into()],
    )
    .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    // A link followed from another site reloads itself from here first.
    let mut req = request(Method::GET, "/ui/inbox/a.md", &[], None);
    req.headers_mut()
        .insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
    let r = send(&t.app, req).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(text(r).await.contains("content=\"0;url=/ui/inbox/a.md\""));
}

#[tokio::test]
async fn every_response_has_the_security_headers() {
    let t = setup();
    let (session, _) = sign_in(&t).await;
    let s = std::slice::from_ref(&session);
    for r in [
        get(&t, "/ui/signin", &[]).await,
        get(&t, "/ui/style.css", &[]).await,
        get(&t, "/ui/", &[]).await,
        get(&t, "/ui/", s).await,
        get(&t, "/ui/outbox", s).await,
        get(&t, "/ui/nothing", s).await,
        post(&t, "/ui/compose", s, &[]).await,
    ] {
        let h = r.headers();
        let csp = h[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        for part in [
            "default-src 'none'",
            "style-src 'self'",
            "img-src 'self';",
            "form-action 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(part), "{csp}");
        }
        // No remote images at all: they would be read receipts.
        assert!(!csp.contains("https:"), "{csp}");
        assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(h[header::REFERRER_POLICY], "no-referrer");
    }
    let css = get(&t, "/ui/style.css", &[]).await;
    assert_eq!(
        css.headers()[header::CONTENT_TYPE],
        "text/css; charset=utf-8"
    );
}

#[tokio::test]
async fn wrong_password_is_refused_and_the_right_one_signs_in() {
    let t = setup();
    let (login, csrf) = login_form(&t).await;
    let c = std::slice::from_ref(&login);
    let r = post(
        &t,
        "/ui/signin",
        c,
        &[("csrf", &csrf), ("password", "wrong")],
    )
    .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert!(location(&r).starts_with("/ui/signin?error=wrong"));
    assert!(!set_cookies(&r).contains_key("pm_session"));
    let page = text(get(&t, &location(&r), c).await).await;
    assert!(page.contains("Wrong password."), "{page}");

    let r = post(
        &t,
        "/ui/signin",
        c,
        &[("csrf", &csrf), ("password", PASSWORD)],
    )
    .await;
    assert_eq!(location(&r), "/ui/");
    let cookies = set_cookies(&r);
    let (pair, full) = &cookies["pm_session"];
    for attr in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/ui"] {
        assert!(full.contains(attr), "{full}");
    }
    assert!(cookies["pm_login"].1.contains("Max-Age=0"));
    let inbox = get(&t, "/ui/", std::slice::from_ref(pair)).await;
    assert_eq!(inbox.status(), StatusCode::OK);
    assert!(text(inbox).await.contains("No messages here yet."));
}

#[tokio::test]
async fn sign_in_needs_the_form_cookie_and_its_token() {
    let t = setup();
    let (login, csrf) = login_form(&t).await;
    for (cookies, token) in [
        (vec![], csrf.clone()),
        (vec![login.clone()], "0".repeat(64)),
        (vec![login.clone()], String::new()),
    ] {
        let r = post(
            &t,
            "/ui/signin",
            &cookies,
            &[("csrf", &token), ("password", PASSWORD)],
        )
        .await;
        assert!(location(&r).starts_with("/ui/signin?error=expired"));
        assert!(!set_cookies(&r).contains_key("pm_session"));
    }
}

#[tokio::test]
async fn sign_in_attempts_are_rate_limited() {
    let t = setup();
    let (login, csrf) = login_form(&t).await;
    let c = std::slice::from_ref(&login);
    for _ in 0..super::LOGINS_PER_CLIENT {
        let r = post(
            &t,
            "/ui/signin",
            c,
            &[("csrf", &csrf), ("password", "guess")],
        )
        .await;
        assert!(location(&r).starts_with("/ui/signin?error=wrong"));
    }
    let r = post(
        &t,
        "/ui/signin",
        c,
        &[("csrf", &csrf), ("password", PASSWORD)],
    )
    .await;
    assert!(location(&r).starts_with("/ui/signin?error=rate"));
    assert!(!set_cookies(&r).contains_key("pm_session"));
}

#[tokio::test]
async fn forms_without_the_session_csrf_token_are_refused() {
    let t = setup();
    let (session, csrf) = sign_in(&t).await;
    let s = std::slice::from_ref(&session);
    let msg = [("to", "https://bob.example/"), ("content", "hello")];
    for token in [None, Some(""), Some("nope"), Some(&csrf[1..])] {
        let mut form = msg.to_vec();
        if let Some(tok) = token {
            form.push(("csrf", tok));
        }
        let r = post(&t, "/ui/compose", s, &form).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
    }
    let r = post(&t, "/ui/signout", s, &[("csrf", "nope")]).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(t.app.store.outbox(&t.me).unwrap().is_empty());

    let mut form = msg.to_vec();
    form.push(("csrf", &csrf));
    let r = post(&t, "/ui/compose", s, &form).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let sent = t.app.store.outbox(&t.me).unwrap();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        location(&r),
        format!("/ui/outbox/{}?done=queued", sent[0].id)
    );
    let page = text(get(&t, &location(&r), s).await).await;
    assert!(page.contains("badge queued"), "{page}");

    // Signing out ends the session.
    let r = post(&t, "/ui/signout", s, &[("csrf", &csrf)]).await;
    assert_eq!(location(&r), "/ui/signin?done=signed-out");
    assert_eq!(get(&t, "/ui/", s).await.status(), StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn a_refused_draft_comes_back_with_the_reason() {
    let t = setup();
    let (session, csrf) = sign_in(&t).await;
    let s = std::slice::from_ref(&session);
    let r = post(
        &t,
        "/ui/compose",
        s,
        &[
            ("csrf", &csrf),
            ("to", "ftp://bob/"),
            ("content", "keep <me>"),
        ],
    )
    .await;
    assert_eq!(location(&r), "/ui/compose");
    let page = text(get(&t, "/ui/compose", s).await).await;
    assert!(page.contains("address of their homepage"), "{page}");
    assert!(page.contains("keep &lt;me&gt;"), "{page}");
    // Shown once.
    let page = text(get(&t, "/ui/compose", s).await).await;
    assert!(!page.contains("address of their homepage"));
}

/// Writes a received message file as the receiver does.
fn receive(t: &T, sender: &str, id: &str, reply_to: Option<&str>, content: &str) -> String {
    receive_at(t, sender, id, reply_to, content, 0)
}

/// [`receive`], published `offset_s` seconds from now.
fn receive_at(
    t: &T,
    sender: &str,
    id: &str,
    reply_to: Option<&str>,
    content: &str,
    offset_s: i64,
) -> String {
    let site = &t.app.config.sites[0];
    let s = Identity::parse(sender).unwrap();
    let path = crate::inbox::write_message(
        site,
        crate::inbox::Folder::Inbox,
        &crate::inbox::MessageFile {
            sender: &s,
            recipient: &site.identity(),
            id,
            published: (chrono::Utc::now() + chrono::Duration::seconds(offset_s)).fixed_offset(),
            received: chrono::Utc::now(),
            name: Some("Hello <b>there</b>"),
            in_reply_to: reply_to,
            content,
            sender_name: Some("Bob <Builder>"),
            sender_photo: Some("https://bob.example/me.jpg"),
        },
    )
    .unwrap();
    path.file_name().unwrap().to_string_lossy().into_owned()
}

#[tokio::test]
async fn raw_html_is_neutralised_on_the_message_page() {
    let t = setup();
    let (session, _) = sign_in(&t).await;
    let s = std::slice::from_ref(&session);
    // A file written by something else, with raw HTML left in.
    let file = receive(
        &t,
        "https://bob.example/",
        "BBBBBBBBBBBBBBBBBBBBBBBB",
        None,
        "x",
    );
    let path = t.app.config.sites[0].inbox_dir().join(&file);
    let text0 = std::fs::read_to_string(&path).unwrap();
    let raw = "<script>alert(1)</script>\n\n<img src=x onerror=alert(2)> [x](javascript:alert(3))\n\n<iframe src=https://evil.example/></iframe>\n";
    std::fs::write(&path, text0.replace("x\n", raw)).unwrap();
    let r = get(&t, &format!("/ui/inbox/{file}"), s).await;
    assert_eq!(r.status(), StatusCode::OK);
    let page = text(r).await;
    for bad in [
        "<script",
        "<img src=x",
        "<iframe",
        "javascript:",
        "<b>there",
        "<Builder>",
    ] {
        assert!(!page.contains(bad), "{bad} in {page}");
    }
    assert!(
        page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{page}"
    );
    assert!(page.contains("Bob &lt;Builder&gt;"));
    // The sender's photo URL is never put in the page (a read receipt);
    // only the copy the server fetched is, once it exists.
    assert!(!page.contains("https://bob.example/me.jpg"), "{page}");
    let data_dir = t.app.config.server.data_dir.clone();
    let key = crate::photos::key("https://bob.example/me.jpg");
    std::fs::create_dir_all(data_dir.join("photos")).unwrap();
    std::fs::write(
        data_dir.join("photos").join(&key),
        b"\x89PNG\r\n\x1a\nimage",
    )
    .unwrap();
    let again = text(get(&t, &format!("/ui/inbox/{file}"), s).await).await;
    assert!(
        again.contains(&format!("src=\"/ui/photo/{key}\"")),
        "{again}"
    );
    let img = get(&t, &format!("/ui/photo/{key}"), s).await;
    assert_eq!(img.status(), StatusCode::OK);
    assert_eq!(img.headers()[header::CONTENT_TYPE], "image/png");
    // Names that are not inbox files are not found.
    for bad in [
        "../../indiepm.toml",
        "..%2F..%2Findiepm.toml",
        ".gitignore",
        "_index.md",
        "x",
    ] {
        let r = get(&t, &format!("/ui/inbox/{bad}"), s).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{bad}");
    }
}

#[tokio::test]
async fn the_thread_spans_inbox_and_outbox_and_reading_clears_unread() {
    let t = setup();
    let (session, csrf) = sign_in(&t).await;
    let s = std::slice::from_ref(&session);
    let first = "FIRSTFIRSTFIRSTFIRSTFIRST";
    let f1 = receive_at(
        &t,
        "https://bob.example/",
        first,
        None,
        "first from bob",
        -60,
    );
    let inbox = text(get(&t, "/ui/", s).await).await;
    assert!(inbox.contains("class=\"unread\""), "{inbox}");
    assert!(inbox.contains("first from bob"));
    // Reply through the UI.
    let r = post(
        &t,
        "/ui/compose",
        s,
        &[
            ("csrf", &csrf),
            ("to", "https://bob.example/"),
            ("content", "my reply"),
            ("in_reply_to", first),
        ],
    )
    .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let mine = t.app.store.outbox(&t.me).unwrap()[0].id.clone();
    receive_at(
        &t,
        "https://bob.example/",
        "THIRDTHIRDTHIRDTHIRDTHIRD",
        Some(&mine),
        "bob again",
        60,
    );
    receive(
        &t,
        "https://carol.example/",
        "OTHEROTHEROTHEROTHEROTHER",
        None,
        "unrelated",
    );
    let page = text(get(&t, &format!("/ui/inbox/{f1}"), s).await).await;
    let (a, b, c) = (
        page.find("first from bob").unwrap(),
        page.find("my reply").unwrap(),
        page.find("bob again").unwrap(),
    );
    assert!(a < b && b < c, "oldest first");
    assert!(!page.contains("unrelated"));
    assert!(page.contains(&format!("name=\"in_reply_to\" value=\"{first}\"")));
    // The outbox page of the reply shows the same conversation.
    let out = text(get(&t, &format!("/ui/outbox/{mine}"), s).await).await;
    assert!(out.contains("first from bob") && out.contains("bob again"));
    // Opened: no longer unread; the others still are.
    let inbox = text(get(&t, "/ui/", s).await).await;
    assert_eq!(inbox.matches("class=\"unread\"").count(), 2, "{inbox}");
    // The outbox lists the reply with its state.
    let outbox = text(get(&t, "/ui/outbox", s).await).await;
    assert!(outbox.contains("my reply") && outbox.contains("badge queued"));
}

#[tokio::test]
async fn blocking_a_sender_stops_their_messages() {
    let t = setup();
    let (session, csrf) = sign_in(&t).await;
    let s = std::slice::from_ref(&session);
    let bob = "https://bob.example/";
    // Bob holds a channel token issued before the block.
    let token = crate::protocol::new_secret();
    t.app
        .store
        .issue_token(
            crate::protocol::hash_secret(&token),
            "CODECODECODECODECODECODE".into(),
            crate::store::IssuedToken {
                kind: "channel".into(),
                sender: bob.into(),
                recipient: t.me.clone(),
                message: None,
                issued_ms: 0,
                expires_ms: i64::MAX,
                used: false,
                sender_name: None,
                sender_photo: None,
            },
            crate::store::Commit::Durable,
        )
        .await
        .unwrap();
    let push = |id: &str| crate::protocol::Push {
        sender: bob.into(),
        recipient: t.me.clone(),
        message: id.into(),
        published: chrono::Utc::now().fixed_offset(),
        content: "hi".into(),
        name: None,
        in_reply_to: None,
    };
    let ok = crate::receiver::message(
        &t.app,
        "/pm",
        Some(token.clone()),
        push("MSG1MSG1MSG1MSG1MSG1MSG1"),
    )
    .await
    .unwrap();
    assert_eq!(ok.status(), StatusCode::CREATED);

    let r = post(
        &t,
        "/ui/block",
        s,
        &[("csrf", &csrf), ("entry", bob), ("back", "/ui/")],
    )
    .await;
    assert_eq!(location(&r), "/ui/?done=blocked");
    assert_eq!(t.app.store.blocks(&t.me).unwrap(), vec![bob.to_string()]);
    let refused = crate::receiver::message(
        &t.app,
        "/pm",
        Some(token.clone()),
        push("MSG2MSG2MSG2MSG2MSG2MSG2"),
    )
    .await
    .unwrap_err();
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    let page = text(get(&t, "/ui/blocked", s).await).await;
    assert!(page.contains(bob));

    let r = post(&t, "/ui/unblock", s, &[("csrf", &csrf), ("entry", bob)]).await;
    assert_eq!(location(&r), "/ui/blocked?done=unblocked");
    assert!(t.app.store.blocks(&t.me).unwrap().is_empty());
    let again =
        crate::receiver::message(&t.app, "/pm", Some(token), push("MSG3MSG3MSG3MSG3MSG3MSG3"))
            .await
            .unwrap();
    assert_eq!(again.status(), StatusCode::CREATED);
    // Garbage is not an entry.
    let r = post(
        &t,
        "/ui/block",
        s,
        &[("csrf", &csrf), ("entry", "no spaces/here")],
    )
    .await;
    assert_eq!(location(&r), "/ui/blocked?error=entry");
}

#[test]
fn next_never_leaves_the_ui() {
    for bad in [
        "https://evil.example/",
        "//evil.example/",
        "/ui//evil",
        "/ui/\\evil",
        "/other",
        "/ui/a\nb",
    ] {
        assert_eq!(super::safe_next(Some(&bad.to_string())), "/ui/", "{bad}");
    }
    assert_eq!(
        super::safe_next(Some(&"/ui/outbox?x=1".to_string())),
        "/ui/outbox?x=1"
    );
    assert_eq!(super::safe_next(None), "/ui/");
}

#[test]
fn passwords_hash_and_verify() {
    let h = cheap_hash("pw");
    assert!(super::verify_password(&h, "pw"));
    assert!(!super::verify_password(&h, "pW"));
    assert!(!super::verify_password("not a hash", "pw"));
}

// ---------------------------------------------------------------------------
// IndieAuth against a fake homepage and authorization server

type Handler = Arc<dyn Fn(&Method, &str, &str) -> (u16, String) + Send + Sync>;

async fn fake_server(handler: Handler) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let handler = handler.clone();
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let handler = handler.clone();
                async move {
                    let method = req.method().clone();
                    let path = req.uri().path().to_string();
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let (status, text) = handler(&method, &path, &String::from_utf8_lossy(&body));
                    let mut r = Response::new(Full::new(Bytes::from(text)));
                    *r.status_mut() = StatusCode::from_u16(status).unwrap();
                    let ct = if path == "/" {
                        "text/html"
                    } else {
                        "application/json"
                    };
                    r.headers_mut()
                        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
                    Ok::<_, Infallible>(r)
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    addr
}

#[tokio::test]
async fn indieauth_sign_in_checks_pkce_state_and_me() {
    // What the fake authorization server expects and answers.
    let challenge: Arc<Mutex<String>> = Arc::default();
    let answer_me: Arc<Mutex<String>> = Arc::default();
    let (c2, m2) = (challenge.clone(), answer_me.clone());
    let handler: Handler = Arc::new(move |method, path, body| match (method.as_str(), path) {
        ("GET", "/") => (
            200,
            r#"<html><head><link rel="authorization_endpoint" href="/auth"></head></html>"#.into(),
        ),
        ("POST", "/auth") => {
            let form: HashMap<String, String> =
                serde_urlencoded::from_str(body).unwrap_or_default();
            let verifier = form.get("code_verifier").cloned().unwrap_or_default();
            let ok = form.get("grant_type").map(String::as_str) == Some("authorization_code")
                && form.get("code").map(String::as_str) == Some("good-code")
                && super::auth::challenge(&verifier) == *c2.lock().unwrap();
            if ok {
                (200, format!(r#"{{"me": "{}"}}"#, m2.lock().unwrap()))
            } else {
                (400, r#"{"error": "invalid_grant"}"#.into())
            }
        }
        _ => (404, String::new()),
    });
    let addr = fake_server(handler).await;
    let me = format!("http://{addr}/");
    let t = setup_with(&me, "http://127.0.0.1:9/pm");

    // Starts a sign-in; returns the login cookie and the authorization URL.
    let start = || async {
        let (login, csrf) = login_form(&t).await;
        let c = vec![login.clone()];
        let r = post(
            &t,
            "/ui/indieauth",
            &c,
            &[("csrf", &csrf), ("next", "/ui/outbox")],
        )
        .await;
        assert!(
            location(&r).starts_with("/ui/indieauth/go?state="),
            "{}",
            location(&r)
        );
        let go = text(get(&t, &location(&r), &c).await).await;
        let at = go.find("content=\"0;url=").unwrap() + 15;
        let target = go[at..].split('"').next().unwrap().replace("&amp;", "&");
        (login, url::Url::parse(&target).unwrap())
    };
    let params =
        |u: &url::Url| -> HashMap<String, String> { u.query_pairs().into_owned().collect() };

    // The right identity signs in.
    let (login, auth) = start().await;
    let p = params(&auth);
    assert_eq!(auth.path(), "/auth");
    assert_eq!(p["response_type"], "code");
    assert_eq!(p["code_challenge_method"], "S256");
    assert_eq!(p["client_id"], "http://127.0.0.1:9/ui/");
    assert_eq!(
        p["redirect_uri"],
        "http://127.0.0.1:9/ui/indieauth/callback"
    );
    assert_eq!(p["me"], me);
    *challenge.lock().unwrap() = p["code_challenge"].clone();
    *answer_me.lock().unwrap() = me.clone();
    // Another browser (no login cookie) cannot finish it.
    let cb = format!("/ui/indieauth/callback?code=good-code&state={}", p["state"]);
    let r = get(&t, &cb, &[]).await;
    assert!(location(&r).contains("error=indieauth-expired"));
    // The state was used up by that attempt: start again.
    let (login2, auth) = start().await;
    let p = params(&auth);
    *challenge.lock().unwrap() = p["code_challenge"].clone();
    let cb = format!("/ui/indieauth/callback?code=good-code&state={}", p["state"]);
    let r = get(&t, &cb, std::slice::from_ref(&login2)).await;
    assert_eq!(r.status(), StatusCode::OK);
    let session = set_cookies(&r)["pm_session"].0.clone();
    assert!(text(r).await.contains("content=\"0;url=/ui/outbox\""));
    assert_eq!(
        get(&t, "/ui/outbox", &[session]).await.status(),
        StatusCode::OK
    );
    // Replaying the callback does nothing.
    let r = get(&t, &cb, std::slice::from_ref(&login2)).await;
    assert!(location(&r).contains("error=indieauth-expired"));
    drop(login);

    // Another identity in the answer is refused.
    let (login3, auth) = start().await;
    let p = params(&auth);
    *challenge.lock().unwrap() = p["code_challenge"].clone();
    *answer_me.lock().unwrap() = "https://mallory.example/".into();
    let cb = format!("/ui/indieauth/callback?code=good-code&state={}", p["state"]);
    let r = get(&t, &cb, std::slice::from_ref(&login3)).await;
    assert!(
        location(&r).contains("error=indieauth-failed"),
        "{}",
        location(&r)
    );
    assert!(!set_cookies(&r).contains_key("pm_session"));

    // A wrong code (or verifier) is refused by the server, and so here.
    let (login4, auth) = start().await;
    let p = params(&auth);
    *answer_me.lock().unwrap() = me.clone();
    let cb = format!("/ui/indieauth/callback?code=bad-code&state={}", p["state"]);
    let r = get(&t, &cb, std::slice::from_ref(&login4)).await;
    assert!(location(&r).contains("error=indieauth-failed"));
}
