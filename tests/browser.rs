//! The web UI in a real browser: headless Chromium driven over WebDriver
//! (chromedriver, through fantoccini), against two real PM servers.
//!
//! Alice and Bob each have a static homepage advertising rel=pm and an
//! h-card, and a PM server, both on their own loopback address. The test
//! signs in on Alice's server with the password, composes a message to Bob,
//! watches it become `delivered` in Alice's outbox, signs in on Bob's
//! server, finds it unread in Bob's inbox, opens it (Markdown rendered, raw
//! HTML shown as text), replies, and finds the reply in Alice's inbox in
//! the same conversation. Then Alice signs out and back in with her domain
//! (IndieAuth), through a fake authorization server on another address:
//! the round trip through another site must still end in a session,
//! although the session cookie is SameSite=Strict.
//!
//! Cookies: the session cookie is `Secure`, and these servers speak plain
//! HTTP on 127.0.0.x. Chromium treats loopback addresses as secure
//! contexts and keeps Secure cookies set by them, so the UI works here
//! exactly as it does behind TLS; the test checks the cookie's flags.
//!
//! Needs `chromium` and `chromedriver` (Debian's `chromium` and
//! `chromium-driver`, which `.ci/run` installs). Screenshots of the pages
//! land in `target/tmp/browser/`.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{FakeHost, next_ip, serve_dir};
use fantoccini::{Client, ClientBuilder, Locator};
use indiepm::config::Config;
use indiepm::server::Running;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// One person: a homepage and a PM server on one loopback address.
struct Person {
    _site: FakeHost,
    site_url: String,
    ui: String,
    password: String,
    server: Running,
}

/// An argon2id hash with small parameters (debug builds hash slowly).
fn cheap_hash(password: &str) -> String {
    use argon2::{Algorithm, Argon2, Params, PasswordHasher, Version};
    let params = Params::new(1024, 1, 1, None).expect("argon2 parameters");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(password.as_bytes())
        .expect("argon2 hash")
        .to_string()
}

/// `head` is extra HTML for the homepage's `<head>`.
async fn person(root: &Path, name: &str, full_name: &str, head: &str) -> Person {
    let ip: IpAddr = next_ip();
    let dir = root.join(name);
    std::fs::create_dir_all(dir.join("www")).unwrap();
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .await
        .unwrap();
    let pm = listener.local_addr().unwrap();
    std::fs::write(
        dir.join("www/index.html"),
        format!(
            r#"<!doctype html><html><head><title>{full_name}</title>
<link rel="pm" href="http://{pm}/pm">{head}</head>
<body><a class="h-card" href="/">{full_name}</a></body></html>"#
        ),
    )
    .unwrap();
    let site = serve_dir(SocketAddr::new(ip, 0), dir.join("www"));
    let site_url = format!("{}/", site.origin());
    let password = format!("{name}'s long password");
    let config = format!(
        r#"[server]
listen = "{pm}"
data_dir = "data"
[network]
allow_private = true
[[site]]
me = "{site_url}"
endpoint = "http://{pm}/pm"
content_dir = "content"
[delivery]
retry_initial_secs = 0.2
[auth]
password = "{hash}"
"#,
        hash = cheap_hash(&password)
    );
    std::fs::write(dir.join("pm.toml"), config).unwrap();
    let config = Config::load(&dir.join("pm.toml")).unwrap();
    let server = indiepm::server::start_on(listener, config).await.unwrap();
    Person {
        _site: site,
        site_url,
        ui: format!("http://{pm}/ui/"),
        password,
        server,
    }
}

/// chromedriver on a free loopback port; killed when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
}

async fn start_driver() -> Result<Driver> {
    let chromedriver = find_program(&["chromedriver"]).ok_or(
        "chromedriver is not installed: `apt-get install chromium chromium-driver` (.ci/run does)",
    )?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new(chromedriver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let driver = Driver { child, port };
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            return Err("chromedriver did not start within 20 s".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(driver)
}

async fn browser(driver: &Driver, profile: &Path) -> Result<Client> {
    let chromium = find_program(&["chromium", "chromium-browser", "google-chrome"])
        .ok_or("chromium is not installed: `apt-get install chromium` (.ci/run does)")?;
    let args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1200,900",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("--user-data-dir={}", profile.display())])
    .collect::<Vec<_>>();
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({ "binary": chromium, "args": args }),
    );
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await?;
    Ok(client)
}

async fn sign_in(c: &Client, p: &Person) -> Result<()> {
    c.goto(&p.ui).await?;
    // Not signed in: the inbox sends us to the sign-in page.
    assert_eq!(c.current_url().await?.path(), "/ui/signin");
    screenshot(c, "signin").await?;
    c.find(Locator::Css("#password"))
        .await?
        .send_keys(&p.password)
        .await?;
    // The inbox, unless the browser refused the cookies (the sign-in page
    // would then say so).
    submit(c, "form[action='/ui/signin']", "/ui/").await?;
    assert_eq!(c.current_url().await?.path(), "/ui/");
    // Chromium kept the Secure, HttpOnly, SameSite=Strict session cookie on
    // http://127.0.0.x (loopback is a secure context).
    let cookie = c.get_named_cookie("pm_session").await?;
    assert_eq!(cookie.secure(), Some(true));
    assert_eq!(cookie.http_only(), Some(true));
    assert_eq!(cookie.path(), Some("/ui"));
    Ok(())
}

/// Reloads `url` until its page contains `needle` (at most 30 s).
async fn wait_for_text(c: &Client, url: &str, needle: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        c.goto(url).await?;
        let page = c.source().await?;
        if page.contains(needle) {
            return Ok(page);
        }
        if Instant::now() > deadline {
            return Err(format!("{url} never showed {needle:?}:\n{page}").into());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn screenshot(c: &Client, name: &str) -> Result<PathBuf> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.png"));
    std::fs::write(&path, c.screenshot().await?)?;
    eprintln!("screenshot: {}", path.display());
    Ok(path)
}

/// Clicks the submit button of `form` and waits for the page at `expect`:
/// that path, or a path under it when it ends in `/*`.
async fn submit(c: &Client, form: &str, expect: &str) -> Result<()> {
    click_and_wait(c, &format!("{form} button[type=submit]"), expect).await
}

/// Clicks the first element matching `css` and waits until the browser is
/// on the page `expect` (see [`submit`]).
async fn click_and_wait(c: &Client, css: &str, expect: &str) -> Result<()> {
    c.find(Locator::Css(css)).await?.click().await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let url = c.current_url().await?;
        let arrived = match expect.strip_suffix('*') {
            Some(prefix) => url.path().starts_with(prefix),
            None => url.path() == expect,
        };
        if arrived && c.find(Locator::Css("main")).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "clicking {css} led to {url}, not {expect}:\n{}",
                c.source().await?
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The whole exchange, in the browser.
async fn exchange(c: &Client, alice: &Person, bob: &Person) -> Result<()> {
    // Alice signs in and writes to Bob.
    sign_in(c, alice).await?;
    c.goto(&format!("{}compose", alice.ui)).await?;
    c.find(Locator::Css("#to"))
        .await?
        .send_keys(&bob.site_url)
        .await?;
    c.find(Locator::Css("#subject"))
        .await?
        .send_keys("Lunch on Friday?")
        .await?;
    c.find(Locator::Css("#content"))
        .await?
        .send_keys(
            "Hi **Bob**,\n\nare you free for lunch on *Friday*?\n\n\
             - the usual place\n- at noon\n\n<script>alert('raw HTML')</script>\n",
        )
        .await?;
    submit(c, "form[action='/ui/compose']", "/ui/outbox/*").await?;
    let url = c.current_url().await?;
    assert!(
        url.path().starts_with("/ui/outbox/"),
        "{url}\n{}",
        c.source().await?
    );
    let id = url.path().trim_start_matches("/ui/outbox/").to_string();

    // Alice's outbox shows it delivered.
    let outbox = wait_for_text(c, &format!("{}outbox", alice.ui), "badge delivered").await?;
    assert!(outbox.contains("Lunch on Friday?"));
    screenshot(c, "alice-outbox").await?;

    // Bob signs in on his own server (another host: its own cookie).
    sign_in(c, bob).await?;
    let inbox = wait_for_text(c, &bob.ui, "Lunch on Friday?").await?;
    assert!(inbox.contains("Alice Example"), "{inbox}");
    assert_eq!(
        c.find_all(Locator::Css("li.unread")).await?.len(),
        1,
        "the new message is unread"
    );
    screenshot(c, "bob-inbox").await?;

    // The message page: Markdown rendered, raw HTML as text, no script.
    click_and_wait(c, "ul.messages a.row", "/ui/inbox/*").await?;
    assert!(c.current_url().await?.path().starts_with("/ui/inbox/"));
    let body = c.find(Locator::Css("article.current div.body")).await?;
    assert_eq!(
        body.find(Locator::Css("strong")).await?.text().await?,
        "Bob"
    );
    assert_eq!(body.find_all(Locator::Css("li")).await?.len(), 2);
    // (Smart punctuation curls the quotes.)
    let text = body.text().await?;
    assert!(
        text.contains("<script>alert(‘raw HTML’)</script>"),
        "{text}"
    );
    assert!(c.find_all(Locator::Css("script")).await?.is_empty());
    screenshot(c, "bob-message").await?;

    // Bob replies from the message page.
    c.find(Locator::Css("#content"))
        .await?
        .send_keys("Friday works. See you at noon!")
        .await?;
    submit(c, "form[action='/ui/compose']", "/ui/outbox/*").await?;
    assert!(c.current_url().await?.path().starts_with("/ui/outbox/"));
    wait_for_text(c, &format!("{}outbox", bob.ui), "badge delivered").await?;
    // Opened: no longer unread.
    c.goto(&bob.ui).await?;
    assert!(c.find_all(Locator::Css("li.unread")).await?.is_empty());

    // Alice (still signed in on her server) finds the reply, in the same
    // conversation as her message.
    let inbox = wait_for_text(c, &alice.ui, "Re: Lunch on Friday?").await?;
    assert!(inbox.contains("Friday works."));
    click_and_wait(c, "ul.messages a.row", "/ui/inbox/*").await?;
    let thread = c.find_all(Locator::Css("div.thread article")).await?;
    assert_eq!(thread.len(), 2, "her message and the reply");
    assert!(thread[0].text().await?.contains("lunch on Friday"));
    assert!(thread[1].text().await?.contains("See you at noon!"));
    assert_eq!(
        c.find(Locator::Css("input[name=in_reply_to]"))
            .await?
            .attr("value")
            .await?
            .as_deref()
            .map(|v| v.len() >= 22),
        Some(true)
    );
    screenshot(c, "alice-thread").await?;

    // Her original is reachable from the outbox with its state.
    c.goto(&format!("{}outbox/{id}", alice.ui)).await?;
    assert!(c.source().await?.contains("badge delivered"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_send_and_read_in_a_real_browser() {
    let root = tempfile::tempdir().unwrap();
    let auth = FakeAuthServer::start().await;
    let alice_head = format!(
        r#"<link rel="authorization_endpoint" href="{}">"#,
        auth.endpoint
    );
    let alice = person(root.path(), "alice", "Alice Example", &alice_head).await;
    let bob = person(root.path(), "bob", "Bob Builder", "").await;
    let driver = start_driver().await.expect("chromedriver");
    let profile = tempfile::tempdir().unwrap();
    let client = browser(&driver, profile.path())
        .await
        .expect("a Chromium session");
    let mut outcome = exchange(&client, &alice, &bob).await;
    if outcome.is_ok() {
        outcome = indieauth(&client, &alice, &auth).await;
    }
    // Close the browser whatever happened, then report.
    let _ = client.close().await;
    drop(driver);
    alice.server.shutdown().await;
    bob.server.shutdown().await;
    if let Err(e) = outcome {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------
// IndieAuth sign-in, with a fake authorization server that approves at once

/// An IndieAuth authorization endpoint that approves every request for the
/// `me` it was asked about, and checks PKCE, client_id and redirect_uri
/// when the code is redeemed.
struct FakeAuthServer {
    endpoint: String,
    /// Codes handed out: code → (challenge, me, client_id, redirect_uri).
    codes: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, [String; 4]>>>,
    /// How many codes were redeemed successfully.
    redeemed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl FakeAuthServer {
    async fn start() -> FakeAuthServer {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(next_ip(), 0))
            .await
            .unwrap();
        let endpoint = format!("http://{}/auth", listener.local_addr().unwrap());
        let codes: std::sync::Arc<
            std::sync::Mutex<std::collections::HashMap<String, [String; 4]>>,
        > = Default::default();
        let redeemed: std::sync::Arc<std::sync::atomic::AtomicUsize> = Default::default();
        let (codes2, redeemed2) = (codes.clone(), redeemed.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (codes, redeemed) = (codes2.clone(), redeemed2.clone());
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (codes, redeemed) = (codes.clone(), redeemed.clone());
                        async move {
                            use http_body_util::BodyExt;
                            let method = req.method().clone();
                            let query: std::collections::HashMap<String, String> =
                                serde_urlencoded::from_str(req.uri().query().unwrap_or(""))
                                    .unwrap_or_default();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let mut resp = hyper::Response::new(http_body_util::Full::new(
                                bytes::Bytes::new(),
                            ));
                            if method == hyper::Method::GET {
                                // The authorization request: approve it.
                                let code = indiepm::protocol::new_secret();
                                let get = |k: &str| query.get(k).cloned().unwrap_or_default();
                                assert_eq!(get("response_type"), "code");
                                assert_eq!(get("code_challenge_method"), "S256");
                                codes.lock().unwrap().insert(
                                    code.clone(),
                                    [
                                        get("code_challenge"),
                                        get("me"),
                                        get("client_id"),
                                        get("redirect_uri"),
                                    ],
                                );
                                let mut back = url::Url::parse(&get("redirect_uri")).unwrap();
                                back.query_pairs_mut()
                                    .append_pair("code", &code)
                                    .append_pair("state", &get("state"));
                                *resp.status_mut() = hyper::StatusCode::FOUND;
                                resp.headers_mut().insert(
                                    hyper::header::LOCATION,
                                    back.as_str().parse().unwrap(),
                                );
                            } else {
                                // The code redemption.
                                let form: std::collections::HashMap<String, String> =
                                    serde_urlencoded::from_bytes(&body).unwrap_or_default();
                                let get = |k: &str| form.get(k).cloned().unwrap_or_default();
                                let entry = codes.lock().unwrap().remove(&get("code"));
                                let answer = entry.filter(|[challenge, _, client_id, redirect]| {
                                    use base64::Engine;
                                    use sha2::Digest;
                                    let computed = base64::engine::general_purpose::URL_SAFE_NO_PAD
                                        .encode(sha2::Sha256::digest(get("code_verifier")));
                                    get("grant_type") == "authorization_code"
                                        && computed == *challenge
                                        && get("client_id") == *client_id
                                        && get("redirect_uri") == *redirect
                                });
                                match answer {
                                    Some([_, me, _, _]) => {
                                        redeemed.fetch_add(1, Ordering::SeqCst);
                                        *resp.body_mut() = http_body_util::Full::new(
                                            serde_json::json!({ "me": me }).to_string().into(),
                                        );
                                    }
                                    None => *resp.status_mut() = hyper::StatusCode::BAD_REQUEST,
                                }
                                resp.headers_mut().insert(
                                    hyper::header::CONTENT_TYPE,
                                    "application/json".parse().unwrap(),
                                );
                            }
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    },
                );
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        FakeAuthServer {
            endpoint,
            codes,
            redeemed,
        }
    }
}

/// Alice signs out, then signs in again with her domain: the browser goes
/// to the authorization server (another site) and back, and lands in her
/// inbox with a session, although the session cookie is SameSite=Strict.
async fn indieauth(c: &Client, alice: &Person, auth: &FakeAuthServer) -> Result<()> {
    c.goto(&alice.ui).await?;
    submit(c, "form[action='/ui/signout']", "/ui/signin").await?;
    assert!(c.source().await?.contains("You are signed out."));
    c.goto(&format!("{}outbox", alice.ui)).await?;
    assert_eq!(c.current_url().await?.path(), "/ui/signin");
    // Through /ui/indieauth/go, the authorization server, the callback and
    // its page, back to where she was going.
    submit(c, "form[action='/ui/indieauth']", "/ui/outbox").await?;
    assert_eq!(
        auth.redeemed.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the code was redeemed with its verifier"
    );
    assert!(auth.codes.lock().unwrap().is_empty());
    let page = c.source().await?;
    assert!(page.contains("Lunch on Friday?"), "{page}");
    let cookie = c.get_named_cookie("pm_session").await?;
    assert_eq!(format!("{:?}", cookie.same_site()), "Some(Strict)");
    Ok(())
}
