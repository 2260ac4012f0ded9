//! The TOML config file (CONTRACT.md, "The config file").
//!
//! Every table rejects unknown keys so that a typo is an error naming the key
//! instead of a silently ignored setting. Relative paths are resolved against
//! the folder that holds the config file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::identity::{Identity, parse_http_url};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The whole config, validated, with absolute paths.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub network: NetworkConfig,
    #[serde(default, rename = "site")]
    pub sites: Vec<SiteConfig>,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    /// The config file itself, set by [`Config::load`].
    #[serde(skip)]
    pub path: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address and port to bind; port 0 picks any free port.
    pub listen: String,
    /// Folder of the redb database.
    pub data_dir: PathBuf,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:7373".into(),
            data_dir: "data".into(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Lets outbound fetches reach loopback and private addresses.
    pub allow_private: bool,
}

/// Which flow this server starts as a sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Flow {
    /// One handshake, then many messages under a channel token.
    #[default]
    Channel,
    /// The six-step handshake for every message.
    Message,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    pub flow: Flow,
    /// First retry delay in seconds; doubles each attempt, with jitter.
    pub retry_initial_secs: f64,
    /// Longest delay between two attempts, in seconds.
    pub retry_max_secs: f64,
    /// How long a message is retried before it is marked failed (at least 3 days by default).
    pub give_up_after_secs: f64,
    /// Re-send the notify when no push has come this long after it.
    pub renotify_after_secs: f64,
    /// Lifetime of the channel tokens this server issues as a receiver (60..=604800).
    pub channel_token_secs: u64,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            flow: Flow::Channel,
            retry_initial_secs: 30.0,
            retry_max_secs: 3600.0,
            give_up_after_secs: 4.0 * 86400.0,
            renotify_after_secs: 900.0,
            channel_token_secs: 86400,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest message text accepted in step 6, in bytes.
    pub max_content_bytes: usize,
    /// Notifies accepted per sender host per minute.
    pub notify_per_minute_per_host: u32,
    /// Notifies accepted per client address (IPv6: per /64) per minute.
    pub notify_per_minute_per_client: u32,
    /// Messages (step 6) accepted per sender identity per minute.
    pub messages_per_minute_per_sender: u32,
    /// Discovery fetches in flight at once, for all notifies together.
    pub discovery_in_flight: usize,
    /// Connections kept open at once. As many more are served one request
    /// each and closed; past that they wait in the kernel's backlog.
    pub max_connections: usize,
    /// Seconds a client has to send its request headers.
    pub header_timeout_secs: u64,
    /// Seconds a client has to send a whole request body.
    pub body_timeout_secs: u64,
}

impl LimitsConfig {
    pub fn body_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.body_timeout_secs)
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_content_bytes: 64 * 1024,
            // Ten a second: one busy sending server in the per-message flow
            // (one notify per message) or a test suite on one address stays
            // under it, and a stranger still costs at most ten verify POSTs
            // a second (discoveries are cached and bounded in flight).
            notify_per_minute_per_host: 600,
            notify_per_minute_per_client: 600,
            messages_per_minute_per_sender: 6000,
            discovery_in_flight: 32,
            max_connections: 1024,
            header_timeout_secs: 10,
            body_timeout_secs: 20,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Micropub bearer tokens as `sha256:<hex>`; they act for the first site.
    pub tokens: Vec<String>,
    /// Optional IndieAuth token endpoint to verify other bearer tokens.
    pub token_endpoint: Option<String>,
    /// Web UI password as an argon2 PHC string (`indiepm password` makes one).
    pub password: Option<String>,
}

/// Front matter flavor: what keeps the generator from publishing a message file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    #[default]
    Hugo,
    Zola,
    Jekyll,
    Eleventy,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// The owner's identity (homepage) URL.
    pub me: String,
    /// This server's PM endpoint for the site, as published in rel=pm.
    pub endpoint: String,
    /// The static site's content folder.
    pub content_dir: PathBuf,
    /// Folder under `content_dir` for received messages.
    #[serde(default)]
    pub inbox: Option<PathBuf>,
    /// Folder under `content_dir` for copies of sent messages.
    #[serde(default)]
    pub sent: Option<PathBuf>,
    #[serde(default)]
    pub flavor: Flavor,
    /// Micropub tokens that act for this site alone.
    #[serde(default)]
    pub tokens: Vec<String>,
    /// Senders refused by this site: identity URLs or domains (a domain covers its subdomains).
    #[serde(default)]
    pub block: Vec<String>,
    /// A command run with the new message file's path as its argument.
    #[serde(default)]
    pub on_message: Option<String>,
    /// A URL that gets a JSON POST for every new message.
    #[serde(default)]
    pub webhook: Option<String>,
    /// Web UI password for this site alone, as an argon2 PHC string
    /// (`indiepm password` makes one); `[auth] password` acts for the first site.
    #[serde(default)]
    pub password: Option<String>,
    /// The canonical identity and the endpoint's path, parsed once by
    /// [`Config::parse`] so that routing a request parses no URL.
    #[serde(skip)]
    parsed: Option<(Identity, String)>,
}

impl SiteConfig {
    pub fn identity(&self) -> Identity {
        match &self.parsed {
            Some((id, _)) => id.clone(),
            // Validated in `Config::validate`, so this parse cannot fail afterwards.
            None => Identity::parse(&self.me).unwrap_or_else(|_| unreachable!("validated at load")),
        }
    }

    /// Whether this site's canonical identity is exactly the string `me`.
    pub fn is_str(&self, me: &str) -> bool {
        matches!(&self.parsed, Some((id, _)) if id.as_str() == me)
    }

    /// Whether this site's identity is `me`.
    pub fn is(&self, me: &Identity) -> bool {
        match &self.parsed {
            Some((id, _)) => id == me,
            None => &self.identity() == me,
        }
    }

    /// The path of the endpoint URL, on which the server answers for this site.
    pub fn endpoint_path(&self) -> &str {
        match &self.parsed {
            Some((_, path)) => path,
            None => "/",
        }
    }

    /// The inbox folder: `content_dir/inbox` unless the config names another
    /// (`_inbox` for Jekyll, which never publishes `_` folders).
    pub fn inbox_dir(&self) -> PathBuf {
        self.content_dir.join(
            self.inbox
                .clone()
                .unwrap_or_else(|| self.default_folder("inbox")),
        )
    }

    /// The sent folder, beside the inbox (`_sent` for Jekyll).
    pub fn sent_dir(&self) -> PathBuf {
        self.content_dir.join(
            self.sent
                .clone()
                .unwrap_or_else(|| self.default_folder("sent")),
        )
    }

    /// The folder name that the flavor's generator is safest with.
    fn default_folder(&self, name: &str) -> PathBuf {
        match self.flavor {
            Flavor::Jekyll => format!("_{name}").into(),
            Flavor::Hugo | Flavor::Zola | Flavor::Eleventy => name.into(),
        }
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses config text as if it were read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let mut config: Config = toml::from_str(text).map_err(|e| invalid(one_line(&e)))?;
        config.path = path.to_path_buf();
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        config.server.data_dir = base.join(&config.server.data_dir);
        for site in &mut config.sites {
            site.content_dir = base.join(&site.content_dir);
        }
        config.validate().map_err(invalid)?;
        // Hex digits in either case name the same digest; ours are lower-case.
        config
            .auth
            .tokens
            .iter_mut()
            .for_each(|t| t.make_ascii_lowercase());
        for site in &mut config.sites {
            site.tokens
                .iter_mut()
                .for_each(|t| t.make_ascii_lowercase());
            let identity = site.identity();
            let path = parse_http_url(&site.endpoint)
                .map(|u| u.path().to_string())
                .unwrap_or_else(|_| "/".into());
            site.parsed = Some((identity, path));
        }
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        self.listen_addr()?;
        if self.sites.is_empty() {
            return Err(
                "no [[site]]: add at least one with `me`, `endpoint` and `content_dir`".into(),
            );
        }
        for site in &self.sites {
            Identity::parse(&site.me).map_err(|e| format!("[[site]] me: {e}"))?;
            parse_http_url(&site.endpoint).map_err(|e| format!("[[site]] endpoint: {e}"))?;
            for dir in [&site.inbox, &site.sent].into_iter().flatten() {
                if dir.is_absolute()
                    || dir
                        .components()
                        .any(|c| !matches!(c, std::path::Component::Normal(_)))
                {
                    return Err(format!(
                        "[[site]] inbox/sent `{}` must be a plain folder name under content_dir",
                        dir.display()
                    ));
                }
            }
            if let Some(hook) = &site.webhook {
                parse_http_url(hook).map_err(|e| format!("[[site]] webhook: {e}"))?;
            }
            for t in &site.tokens {
                check_token_hash(t)?;
            }
            if let Some(p) = &site.password {
                check_password_hash(p).map_err(|e| format!("[[site]] password: {e}"))?;
            }
        }
        let mut seen = std::collections::HashSet::new();
        for site in &self.sites {
            if !seen.insert(site.identity()) {
                return Err(format!("two [[site]]s have the same `me` {}", site.me));
            }
        }
        for t in &self.auth.tokens {
            check_token_hash(t)?;
        }
        if let Some(p) = &self.auth.password {
            check_password_hash(p).map_err(|e| format!("[auth] password: {e}"))?;
        }
        if let Some(ep) = &self.auth.token_endpoint {
            parse_http_url(ep).map_err(|e| format!("[auth] token_endpoint: {e}"))?;
        }
        let d = &self.delivery;
        if !(60..=604_800).contains(&d.channel_token_secs) {
            return Err("[delivery] channel_token_secs must be from 60 to 604800".into());
        }
        for (name, v) in [
            ("retry_initial_secs", d.retry_initial_secs),
            ("retry_max_secs", d.retry_max_secs),
            ("give_up_after_secs", d.give_up_after_secs),
            ("renotify_after_secs", d.renotify_after_secs),
        ] {
            // At most ten years: the schedule adds these to the clock in ms.
            if !(v.is_finite() && v > 0.0 && v <= 315_360_000.0) {
                return Err(format!(
                    "[delivery] {name} must be a positive number of seconds, at most ten years"
                ));
            }
        }
        if self.limits.max_connections == 0 || self.limits.discovery_in_flight == 0 {
            return Err(
                "[limits] max_connections and discovery_in_flight must be at least 1".into(),
            );
        }
        Ok(())
    }

    /// The `[server] listen` address.
    pub fn listen_addr(&self) -> Result<SocketAddr, String> {
        self.server.listen.parse().map_err(|_| {
            format!(
                "[server] listen `{}` is not an address:port such as 127.0.0.1:7373",
                self.server.listen
            )
        })
    }

    /// The site whose identity is `me`.
    pub fn site(&self, me: &Identity) -> Option<&SiteConfig> {
        self.sites.iter().find(|s| s.is(me))
    }
}

/// `sha256:` followed by 64 hex digits.
fn check_token_hash(t: &str) -> Result<(), String> {
    match t.strip_prefix("sha256:") {
        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => Ok(()),
        _ => Err(format!(
            "token `{t}` must be `sha256:` and 64 hex digits (run `indiepm token` to make one)"
        )),
    }
}

/// An argon2 PHC string (`$argon2id$v=19$m=...,t=...,p=...$salt$hash`).
fn check_password_hash(p: &str) -> Result<(), String> {
    match argon2::PasswordHash::new(p) {
        Ok(h) if h.algorithm.as_str().starts_with("argon2") && h.hash.is_some() => Ok(()),
        _ => Err(
            "must be an argon2 hash such as \"$argon2id$v=19$...\" (run `indiepm password` to make one)"
                .into(),
        ),
    }
}

fn one_line(e: &toml::de::Error) -> String {
    let mut msg = e.message().to_string();
    if let Some(span) = e.span() {
        msg = format!("{msg} (at byte {})", span.start);
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[server]
listen = "127.0.0.1:0"
data_dir = "state"

[[site]]
me = "https://Alice.example.org"
endpoint = "https://pm.alice.example.uk/"
content_dir = "site/content"
"#;

    #[test]
    fn relative_paths_follow_the_config_file() {
        let c = Config::parse(MIN, Path::new("/etc/indiepm/pm.toml")).unwrap();
        assert_eq!(c.server.data_dir, Path::new("/etc/indiepm/state"));
        assert_eq!(
            c.sites[0].inbox_dir(),
            Path::new("/etc/indiepm/site/content/inbox")
        );
        assert_eq!(c.sites[0].identity().as_str(), "https://alice.example.org/");
        assert_eq!(c.sites[0].endpoint_path(), "/");
        assert_eq!(c.delivery.flow, Flow::Channel);
    }

    #[test]
    fn unknown_keys_are_named() {
        let text = format!("{MIN}\nflavour = \"hugo\"\n");
        let err = Config::parse(&text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("flavour"), "{err}");
    }

    #[test]
    fn inbox_cannot_escape_content_dir() {
        let text = format!("{MIN}inbox = \"../etc\"\n");
        let err = Config::parse(&text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("plain folder"), "{err}");
    }

    #[test]
    fn delivery_times_are_bounded() {
        for bad in [
            "retry_max_secs = 0",
            "give_up_after_secs = 1e300",
            "renotify_after_secs = -1",
        ] {
            let text = format!("{MIN}[delivery]\n{bad}\n");
            let err = Config::parse(&text, Path::new("x.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("positive number of seconds"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_token_hash_in_upper_case_is_the_same_digest() {
        let token = crate::protocol::new_secret();
        let digest = crate::protocol::hash_secret(&token);
        let text = MIN.replace(
            "[server]",
            &format!(
                "[auth]\ntokens = [\"sha256:{}\"]\n[server]",
                digest.to_uppercase()
            ),
        );
        let config = Config::parse(&text, Path::new("x.toml")).unwrap();
        assert_eq!(config.auth.tokens, [format!("sha256:{digest}")]);
    }

    #[test]
    fn bad_token_hash_is_refused() {
        let text = MIN.replace("[server]", "[auth]\ntokens = [\"abc\"]\n[server]");
        let err = Config::parse(&text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("indiepm token"), "{err}");
    }
}
