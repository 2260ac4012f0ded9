//! The project's one outbound HTTP client.
//!
//! Every URL this server fetches is named by a stranger, so every fetch goes
//! through [`Fetcher`], which enforces the limits of PROTOCOL.md
//! ("Limits for every fetch"): at most 1 MiB of body read, 10 s in all,
//! 5 redirects, `http`/`https` only, and no connection to a loopback,
//! private, link-local, unique-local, multicast or unspecified address unless
//! the operator allows private networks.
//!
//! The address guard is checked on the address actually connected to: host
//! names go through [`GuardedResolver`], which drops forbidden addresses
//! after resolution, so the connector can only ever dial an allowed one (no
//! second lookup, no DNS-rebinding window). IP-literal hosts never reach a
//! resolver, so they are checked before each hop. Redirects are followed by
//! hand, so every hop passes both checks. Proxies are disabled: a proxy would
//! make the connected address someone else's.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use reqwest::header::{HeaderMap, LOCATION};
use reqwest::{StatusCode, dns};
use url::Url;

/// Most body bytes read from any response.
pub const MAX_BODY: usize = 1024 * 1024;
/// Time allowed for one fetch, redirects included.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// Redirects followed by a GET.
pub const MAX_REDIRECTS: usize = 5;

const USER_AGENT: &str = concat!("indiepm/", env!("CARGO_PKG_VERSION"), " (rel=pm)");

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}: only http and https URLs are fetched")]
    Scheme(Url),
    #[error("{0}: refusing to connect to a private or special address ({1})")]
    Forbidden(Url, String),
    #[error("{0}: more than {MAX_REDIRECTS} redirects")]
    TooManyRedirects(Url),
    #[error("{0}: redirect without a valid Location header")]
    BadRedirect(Url),
    #[error("{0}: no answer within 10 s")]
    Timeout(Url),
    #[error("{0}: {1}")]
    Http(Url, String),
}

/// A response with its body read (at most [`MAX_BODY`] bytes).
#[derive(Debug)]
pub struct Fetched {
    /// The URL after the last redirect: the base for relative references.
    pub url: Url,
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The body was longer than [`MAX_BODY`] and was cut there.
    pub truncated: bool,
}

/// Idle connections kept open to one host.
pub const MAX_IDLE_PER_HOST: usize = 256;

/// The safe outbound client. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    policy: Arc<AddressPolicy>,
}

/// Which addresses may be connected to.
#[derive(Debug)]
struct AddressPolicy {
    /// Lifts the guard entirely.
    allow_private: bool,
    /// Exact addresses that pass the guard although they are special
    /// (compared in canonical form, so `::ffff:a.b.c.d` is `a.b.c.d`).
    exempt: Vec<IpAddr>,
}

impl AddressPolicy {
    /// Why `ip` may not be connected to under this policy, or `None`.
    fn refusal(&self, ip: IpAddr) -> Option<&'static str> {
        if self.allow_private {
            return None;
        }
        let ip = ip.to_canonical();
        if self.exempt.iter().any(|e| e.to_canonical() == ip) {
            return None;
        }
        forbidden_reason(ip)
    }
}

impl Fetcher {
    /// Builds the client. `allow_private` lifts the address guard (tests, LANs).
    pub fn new(allow_private: bool) -> Fetcher {
        Fetcher::build(AddressPolicy {
            allow_private,
            exempt: Vec::new(),
        })
    }

    /// A client with the address guard on, except for exactly the addresses
    /// in `exempt` (say, the one LAN host an operator trusts). Every other
    /// special address stays refused, on every hop, after name resolution.
    /// The test suite uses it to check the guard on a redirect chain whose
    /// first hop is allowed.
    pub fn with_exempt_addresses(exempt: impl IntoIterator<Item = IpAddr>) -> Fetcher {
        Fetcher::build(AddressPolicy {
            allow_private: false,
            exempt: exempt.into_iter().collect(),
        })
    }

    fn build(policy: AddressPolicy) -> Fetcher {
        let policy = Arc::new(policy);
        // reqwest is built without a default TLS crypto provider; ring is
        // installed once per process. A second install fails harmlessly.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            // No `.timeout()`: every request already runs inside one
            // `tokio::time::timeout` of `TIMEOUT` (`get`, `send_once`) that
            // also covers reading the body; a second timer per request
            // would only cost.
            .connect_timeout(TIMEOUT)
            .dns_resolver(GuardedResolver {
                policy: policy.clone(),
            })
            .pool_idle_timeout(Duration::from_secs(30))
            // A burst opens as many connections as it needs, but only this
            // many stay open idle afterwards: a peer server counts every
            // open connection against its cap, and hundreds of our idle
            // ones there would keep its other clients waiting (measured:
            // verify requests timing out at a peer full of idle connections).
            .pool_max_idle_per_host(MAX_IDLE_PER_HOST)
            .build()
            // Only fails when the TLS backend cannot start, which is a broken
            // build rather than a runtime condition.
            .expect("the HTTP client builds");
        Fetcher { client, policy }
    }

    /// Whether the address guard is lifted entirely.
    pub fn allows_private(&self) -> bool {
        self.policy.allow_private
    }

    /// GET `url`, following at most [`MAX_REDIRECTS`] redirects, all within [`TIMEOUT`].
    pub async fn get(&self, url: &Url, accept: &str) -> Result<Fetched, FetchError> {
        let start = url.clone();
        tokio::time::timeout(TIMEOUT, self.get_inner(url.clone(), accept))
            .await
            .map_err(|_| FetchError::Timeout(start))?
    }

    async fn get_inner(&self, mut url: Url, accept: &str) -> Result<Fetched, FetchError> {
        let mut redirects = 0;
        loop {
            self.check_url(&url)?;
            let resp = self
                .client
                .get(url.clone())
                .header(reqwest::header::ACCEPT, accept)
                .send()
                .await
                .map_err(|e| http_error(&url, e))?;
            self.check_peer(&url, resp.remote_addr())?;
            if resp.status().is_redirection() && resp.status() != StatusCode::NOT_MODIFIED {
                let next = resp
                    .headers()
                    .get(LOCATION)
                    // Some servers send raw UTF-8 here; `join` percent-encodes it.
                    .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
                    .and_then(|loc| url.join(loc).ok())
                    .ok_or_else(|| FetchError::BadRedirect(url.clone()))?;
                redirects += 1;
                if redirects > MAX_REDIRECTS {
                    return Err(FetchError::TooManyRedirects(url));
                }
                url = next;
                continue;
            }
            return read_limited(url, resp).await;
        }
    }

    /// POST a form to `url` without following redirects (PROTOCOL.md,
    /// "Requests": the token and the content go to the discovered URL or nowhere).
    pub async fn post_form(
        &self,
        url: &Url,
        form: &[(&str, &str)],
        bearer: Option<&str>,
    ) -> Result<Fetched, FetchError> {
        let mut req = self
            .client
            .post(url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .form(form);
        if let Some(token) = bearer {
            req = req.bearer_auth(token);
        }
        self.send_once(url, req).await
    }

    /// POST a JSON document (webhooks, token verification) without following redirects.
    pub async fn post_json(
        &self,
        url: &Url,
        body: &serde_json::Value,
    ) -> Result<Fetched, FetchError> {
        let req = self
            .client
            .post(url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string());
        self.send_once(url, req).await
    }

    /// GET with a bearer token and no redirects (IndieAuth token verification).
    pub async fn get_with_bearer(&self, url: &Url, bearer: &str) -> Result<Fetched, FetchError> {
        let req = self
            .client
            .get(url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .bearer_auth(bearer);
        self.send_once(url, req).await
    }

    /// Sends one request to `url` (built by the caller for that URL) with the
    /// guard, the body limit and the time limit, and no redirect.
    async fn send_once(
        &self,
        url: &Url,
        req: reqwest::RequestBuilder,
    ) -> Result<Fetched, FetchError> {
        let work = async {
            self.check_url(url)?;
            let resp = req.send().await.map_err(|e| http_error(url, e))?;
            self.check_peer(url, resp.remote_addr())?;
            read_limited(url.clone(), resp).await
        };
        tokio::time::timeout(TIMEOUT, work)
            .await
            .map_err(|_| FetchError::Timeout(url.clone()))?
    }

    /// Scheme check, and the address guard for IP-literal hosts (which never
    /// reach the resolver).
    fn check_url(&self, url: &Url) -> Result<(), FetchError> {
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(FetchError::Scheme(url.clone()));
        }
        if self.policy.allow_private {
            return Ok(());
        }
        let ip = match url.host() {
            Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
            Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
            Some(url::Host::Domain(_)) => return Ok(()),
            None => return Err(FetchError::Scheme(url.clone())),
        };
        match self.policy.refusal(ip) {
            Some(why) => Err(FetchError::Forbidden(url.clone(), format!("{ip} is {why}"))),
            None => Ok(()),
        }
    }

    /// Defence in depth: the peer reqwest reports must pass the guard too.
    fn check_peer(&self, url: &Url, peer: Option<SocketAddr>) -> Result<(), FetchError> {
        if let Some(addr) = peer
            && let Some(why) = self.policy.refusal(addr.ip())
        {
            return Err(FetchError::Forbidden(
                url.clone(),
                format!("{} is {why}", addr.ip()),
            ));
        }
        Ok(())
    }
}

async fn read_limited(url: Url, mut resp: reqwest::Response) -> Result<Fetched, FetchError> {
    let status = resp.status();
    let headers = std::mem::take(resp.headers_mut());
    let mut body = BytesMut::new();
    let mut truncated = false;
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| http_error(&url, e))?;
        let room = MAX_BODY - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            truncated = true;
            break;
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Fetched {
        url,
        status,
        headers,
        body: body.freeze(),
        truncated,
    })
}

fn http_error(url: &Url, e: reqwest::Error) -> FetchError {
    // The resolver's refusal arrives wrapped in connect errors; surface it.
    let mut source: Option<&dyn std::error::Error> = Some(&e);
    while let Some(err) = source {
        if let Some(blocked) = err.downcast_ref::<BlockedAddress>() {
            return FetchError::Forbidden(url.clone(), blocked.0.clone());
        }
        source = err.source();
    }
    if e.is_timeout() {
        return FetchError::Timeout(url.clone());
    }
    // reqwest's own text repeats the URL; the innermost cause is the one
    // that says what happened ("Connection refused (os error 111)").
    let mut causes = Vec::new();
    let mut source = std::error::Error::source(&e);
    while let Some(err) = source {
        causes.push(err.to_string());
        source = err.source();
    }
    let what = if e.is_connect() {
        if causes.iter().any(|c| c.starts_with("dns error")) {
            "cannot resolve the host name"
        } else {
            "cannot connect"
        }
    } else if e.is_body() || e.is_decode() {
        "the answer broke off"
    } else {
        "the request failed"
    };
    let detail = causes.pop().unwrap_or_else(|| e.to_string());
    FetchError::Http(url.clone(), format!("{what}: {detail}"))
}

/// Why `ip` may not be connected to, or `None` when it is a public address.
pub fn forbidden_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => {
            // IPv4-mapped and IPv4-compatible forms reach the IPv4 address.
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden_v4(v4);
            }
            forbidden_v6(v6)
        }
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_private() {
        Some("a private address")
    } else if ip.is_link_local() {
        Some("a link-local address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if ip.is_unspecified() || o[0] == 0 {
        Some("an unspecified address")
    } else if ip.is_broadcast() {
        Some("the broadcast address")
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some("a shared (carrier-grade NAT) address")
    } else {
        None
    }
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let seg0 = ip.segments()[0];
    if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_unspecified() {
        Some("an unspecified address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if (seg0 & 0xffc0) == 0xfe80 {
        Some("a link-local address")
    } else if (seg0 & 0xfe00) == 0xfc00 {
        Some("a unique-local address")
    } else if ip.segments()[..6] == [0, 0, 0, 0, 0, 0]
        // Deprecated IPv4-compatible addresses (::a.b.c.d), and the NAT64
        // well-known prefix (RFC 6052), whose gateway connects on to the
        // embedded IPv4 address: both are judged by that address.
        || ip.segments()[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
    {
        forbidden_v4(Ipv4Addr::from_bits(ip.to_bits() as u32))
    } else {
        None
    }
}

#[derive(Debug)]
struct BlockedAddress(String);

impl std::fmt::Display for BlockedAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for BlockedAddress {}

/// Resolves with the system resolver, then keeps only the addresses the
/// guard allows: the connector dials only what this returns.
struct GuardedResolver {
    policy: Arc<AddressPolicy>,
}

impl dns::Resolve for GuardedResolver {
    fn resolve(&self, name: dns::Name) -> dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| match policy.refusal(a.ip()) {
                    Some(why) => {
                        refused.get_or_insert_with(|| {
                            format!("{host} resolves to {} ({why})", a.ip())
                        });
                        false
                    }
                    None => true,
                })
                .collect();
            match refused {
                // Every address it has is refused: say why, not "no address".
                Some(why) if allowed.is_empty() => {
                    Err(Box::new(BlockedAddress(why)) as Box<dyn std::error::Error + Send + Sync>)
                }
                _ => Ok(Box::new(allowed.into_iter()) as dns::Addrs),
            }
        })
    }
}

/// A shared handle, for the server's state.
pub type SharedFetcher = Arc<Fetcher>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_classifies_addresses() {
        for bad in [
            "127.0.0.1",
            "127.0.0.2",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "100.64.0.1",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "fd12::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::127.0.0.1",
            "64:ff9b::192.168.0.1",
        ] {
            let ip: IpAddr = bad.parse().unwrap();
            assert!(forbidden_reason(ip).is_some(), "{bad} should be refused");
        }
        for good in [
            "93.184.216.34",
            "1.1.1.1",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
            "64:ff9b::1.1.1.1",
        ] {
            let ip: IpAddr = good.parse().unwrap();
            assert!(forbidden_reason(ip).is_none(), "{good} should be allowed");
        }
    }
}
