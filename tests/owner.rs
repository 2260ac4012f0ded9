//! The owner's side of the server: Micropub (static and IndieAuth tokens,
//! both syntaxes, q=config, q=source), `indiepm token`, and the
//! notifications of a new message (on_message command, webhook). Real
//! servers on loopback: the PM servers in-process, every other host a
//! FakeHost on its own 127.0.0.x.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{FakeHost, Route, next_addr, serve_dir};
use indiepm::config::Config;
use indiepm::fetch::Fetcher;
use indiepm::protocol::{hash_secret, new_secret};
use indiepm::server::Running;
use serde_json::{Value, json};

/// A site (homepage on its own address) and its PM server.
struct Owner {
    _site: FakeHost,
    site_url: String,
    server: Running,
    token: String,
    content: std::path::PathBuf,
}

impl Owner {
    fn micropub(&self) -> url::Url {
        url::Url::parse(&format!("http://{}/micropub", self.server.addr)).unwrap()
    }
}

async fn owner(dir: &Path, extra_site: &str, extra: &str) -> Owner {
    std::fs::create_dir_all(dir.join("www")).unwrap();
    let listener = tokio::net::TcpListener::bind(next_addr()).await.unwrap();
    let pm = listener.local_addr().unwrap();
    std::fs::write(
        dir.join("www/index.html"),
        format!(r#"<html><head><link rel="pm" href="http://{pm}/pm"></head><body></body></html>"#),
    )
    .unwrap();
    let site = serve_dir(next_addr(), dir.join("www"));
    let site_url = format!("{}/", site.origin());
    let token = new_secret();
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
{extra_site}
[delivery]
retry_initial_secs = 0.2
[auth]
tokens = ["sha256:{}"]
{extra}
"#,
        hash_secret(&token)
    );
    std::fs::write(dir.join("pm.toml"), config).unwrap();
    let config = Config::load(&dir.join("pm.toml")).unwrap();
    let server = indiepm::server::start_on(listener, config).await.unwrap();
    Owner {
        _site: site,
        site_url,
        server,
        token,
        content: dir.join("content"),
    }
}

async fn post(url: &url::Url, form: &[(&str, &str)], token: Option<&str>) -> (u16, Value) {
    let r = Fetcher::new(true)
        .post_form(url, form, token)
        .await
        .unwrap();
    (
        r.status.as_u16(),
        serde_json::from_slice(&r.body).unwrap_or(Value::Null),
    )
}

async fn wait_for<F: Fn() -> bool>(what: &str, f: F) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indieauth_token_endpoint_vouches_with_me_and_scope_and_is_cached() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = FakeHost::start();
    let endpoint = tokens.url("/token");
    let alice = owner(tmp.path(), "", &format!("token_endpoint = \"{endpoint}\"")).await;
    let bob_url = "https://bob.example/";
    let form = [("h", "entry"), ("content", "hi"), ("audience[]", bob_url)];

    // The token endpoint vouches: our site, scope with create.
    tokens.route(
        "/token",
        Route::json(&json!({"me": alice.site_url, "scope": "create update", "client_id": "x"})),
    );
    let good = new_secret();
    let (status, body) = post(&alice.micropub(), &form, Some(&good)).await;
    assert_eq!(status, 202, "{body}");
    let (status, _) = post(&alice.micropub(), &form, Some(&good)).await;
    assert_eq!(status, 202);
    let asked = tokens.requests_to("/token");
    assert_eq!(asked.len(), 1, "the answer is cached");
    assert_eq!(
        asked[0].header("authorization"),
        Some(format!("Bearer {good}").as_str())
    );

    // Someone else's `me`: forbidden.
    tokens.route(
        "/token",
        Route::json(&json!({"me": "https://mallory.example/", "scope": "create"})),
    );
    let (status, body) = post(&alice.micropub(), &form, Some(&new_secret())).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")));

    // Our `me` without `create`: insufficient_scope.
    tokens.route(
        "/token",
        Route::json(&json!({"me": alice.site_url, "scope": "read"})),
    );
    let (status, body) = post(&alice.micropub(), &form, Some(&new_secret())).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("insufficient_scope"))
    );

    // The endpoint refuses the token: forbidden.
    tokens.route("/token", Route::status(401));
    let (status, body) = post(&alice.micropub(), &form, Some(&new_secret())).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")));

    // The static token still works without asking the endpoint.
    let before = tokens.hits("/token");
    let (status, _) = post(&alice.micropub(), &form, Some(&alice.token)).await;
    assert_eq!(status, 202);
    assert_eq!(tokens.hits("/token"), before);
    alice.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn micropub_json_syntax_location_config_and_source() {
    let tmp = tempfile::tempdir().unwrap();
    let alice = owner(tmp.path(), "", "").await;
    let client = Fetcher::new(true);
    let body = json!({
        "type": ["h-entry"],
        "properties": {
            "content": ["JSON syntax"],
            "audience": ["https://bob.example/", "https://carol.example/"],
            "name": ["Subject"],
        }
    });
    // post_json carries no bearer header: use access_token in the document.
    let mut with_token = body.clone();
    with_token["access_token"] = json!(alice.token);
    let r = client
        .post_json(&alice.micropub(), &with_token)
        .await
        .unwrap();
    assert_eq!(r.status.as_u16(), 202);
    let location = r
        .headers
        .get("location")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        v["messages"].as_array().unwrap().len(),
        2,
        "one message per recipient"
    );
    let id = v["messages"][0]["id"].as_str().unwrap();
    assert!(location.ends_with(id), "{location}");

    let source = alice.micropub().join(&location).unwrap();
    let r = client.get_with_bearer(&source, &alice.token).await.unwrap();
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["properties"]["content"][0], "JSON syntax");
    assert_eq!(v["properties"]["name"][0], "Subject");
    assert_eq!(v["properties"]["audience"][0], "https://bob.example/");
    assert!(v["properties"]["pm-state"][0].is_string());

    let config = alice.micropub().join("/micropub?q=config").unwrap();
    let r = client.get_with_bearer(&config, &alice.token).await.unwrap();
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(r.status.as_u16(), 200);
    assert!(v["q"].as_array().unwrap().contains(&json!("source")));
    let r = client.get(&config, "application/json").await.unwrap();
    assert_eq!(r.status.as_u16(), 401, "q=config needs a token");

    // The token may come as a form parameter too; a bad pm-flow is refused.
    let form = [
        ("h", "entry"),
        ("content", "x"),
        ("audience", "https://bob.example/"),
        ("access_token", alice.token.as_str()),
        ("pm-flow", "carrier-pigeon"),
    ];
    let (status, v) = post(&alice.micropub(), &form, None).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("invalid_request"))
    );
    // A sent copy is kept beside the inbox.
    wait_for("the sent copies", || {
        std::fs::read_dir(alice.content.join("sent"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".md"))
                    .count()
                    >= 2
            })
            .unwrap_or(false)
    })
    .await;
    alice.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_message_runs_on_message_and_calls_the_webhook() {
    let tmp = tempfile::tempdir().unwrap();
    let hook = FakeHost::start();
    hook.route("/hook", Route::ok());
    let log = tmp.path().join("on_message.log");
    let alice = owner(&tmp.path().join("alice"), "", "").await;
    let bob_site = format!(
        "on_message = \"printf '%s\\\\n' >> '{}'\"\nwebhook = \"{}\"",
        log.display(),
        hook.url("/hook")
    );
    let bob = owner(&tmp.path().join("bob"), &bob_site, "").await;
    let form = [
        ("h", "entry"),
        ("content", "ring the bell"),
        ("audience[]", bob.site_url.as_str()),
    ];
    let (status, v) = post(&alice.micropub(), &form, Some(&alice.token)).await;
    assert_eq!(status, 202, "{v}");
    let id = v["messages"][0]["id"].as_str().unwrap().to_string();

    wait_for("the on_message command", || log.exists()).await;
    let logged = std::fs::read_to_string(&log).unwrap();
    let path = logged.trim();
    assert!(Path::new(path).starts_with(&bob.content), "{path}");
    assert!(std::fs::read_to_string(path).unwrap().contains(&id));

    wait_for("the webhook", || hook.hits("/hook") == 1).await;
    let call = &hook.requests_to("/hook")[0];
    assert_eq!(call.method, "POST");
    let v: Value = serde_json::from_slice(&call.body).unwrap();
    assert_eq!(v["message"], id.as_str());
    assert_eq!(v["sender"], alice.site_url.as_str());
    assert_eq!(v["path"], path);
    alice.server.shutdown().await;
    bob.server.shutdown().await;
}

#[test]
fn token_command_prints_a_token_and_its_config_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_indiepm"))
        .args(["token", "--quiet"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let line = String::from_utf8(out.stderr).unwrap();
    assert!(indiepm::protocol::is_valid_token(&token));
    assert_eq!(
        line.trim(),
        format!("tokens = [\"sha256:{}\"]", hash_secret(&token))
    );
    // The line is valid config.
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[[site]]\nme = \"https://a.example/\"\nendpoint = \"https://a.example/pm\"\ncontent_dir = \"c\"\n[auth]\n{}",
        line.trim()
    );
    std::fs::write(dir.path().join("c.toml"), config).unwrap();
    Config::load(&dir.path().join("c.toml")).unwrap();
}
