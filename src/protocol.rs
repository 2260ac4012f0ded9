//! Wire types of PROTOCOL.md: parameters, validation, and the JSON error answers.
//!
//! Every protocol request is a form-encoded POST whose `action` selects the
//! operation. [`Request::parse`] turns the form into one of the typed actions
//! below or into the `400 invalid_request` the spec asks for; handlers then
//! answer with [`ProtoError`] values, whose status and `error` code are the
//! table of PROTOCOL.md.

use std::collections::HashMap;

use chrono::{DateTime, FixedOffset};
use hyper::StatusCode;
use serde_json::json;

/// Largest request body (PROTOCOL.md, "Requests").
pub const MAX_BODY: usize = 256 * 1024;
/// Longest subject (`name`) in step 6, in characters.
pub const MAX_NAME_CHARS: usize = 256;
/// Lifetime of a single-use message token and of an authorization code.
pub const HANDSHAKE_SECS: i64 = 600;
/// Bounds of `expires_in` for channel tokens.
pub const CHANNEL_SECS: std::ops::RangeInclusive<u64> = 60..=604_800;

/// The parameters PROTOCOL.md defines; any other is ignored.
const PARAMS: &[&str] = &[
    "action",
    "sender",
    "recipient",
    "message",
    "code",
    "endpoint",
    "token",
    "expires_in",
    "published",
    "content",
    "name",
    "in-reply-to",
];

/// An error answer: status, `error` code and a description for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtoError {
    pub status: StatusCode,
    pub code: &'static str,
    pub description: String,
    /// Seconds for the `Retry-After` header of a 429.
    pub retry_after: Option<u64>,
}

impl ProtoError {
    fn new(status: StatusCode, code: &'static str, description: impl Into<String>) -> Self {
        ProtoError {
            status,
            code,
            description: description.into(),
            retry_after: None,
        }
    }
    pub fn invalid_request(d: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", d)
    }
    pub fn invalid_token(d: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_token", d)
    }
    pub fn endpoint_mismatch(d: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "endpoint_mismatch", d)
    }
    pub fn not_found(d: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", d)
    }
    pub fn too_large(d: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", d)
    }
    pub fn unsupported_media_type(d: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            d,
        )
    }
    pub fn rate_limited(retry_after: u64) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("too many requests; retry in {retry_after} s"),
        );
        e.retry_after = Some(retry_after);
        e
    }
    /// Our own storage failed: logged here, answered `500` (not in the
    /// protocol table), and nothing was acknowledged.
    pub fn storage(e: crate::store::StoreError) -> Self {
        tracing::error!(error = %e, "storage failure");
        Self::server_error("storage failure; nothing was acknowledged, retry later")
    }
    /// Not in the protocol table: our own storage failed, so nothing was acknowledged.
    pub fn server_error(d: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", d)
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": self.code, "error_description": self.description})
    }
}

impl std::fmt::Display for ProtoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.description
        )
    }
}

/// `A-Z a-z 0-9 - _`, the alphabet of IDs, codes and tokens.
fn in_alphabet(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A message ID or an authorization code: 22 to 128 characters of the alphabet.
pub fn is_valid_id(s: &str) -> bool {
    (22..=128).contains(&s.len()) && in_alphabet(s)
}

/// A bearer token: 22 to 512 characters of the alphabet.
pub fn is_valid_token(s: &str) -> bool {
    (22..=512).contains(&s.len()) && in_alphabet(s)
}

/// What a notify, verify or deliver is about: one message, or a channel code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    Message(String),
    Code(String),
}

impl Subject {
    pub fn as_str(&self) -> &str {
        match self {
            Subject::Message(s) | Subject::Code(s) => s,
        }
    }
    /// The form parameter name that carries it.
    pub fn param(&self) -> &'static str {
        match self {
            Subject::Message(_) => "message",
            Subject::Code(_) => "code",
        }
    }
}

/// Step 6's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    pub sender: String,
    pub recipient: String,
    pub message: String,
    pub published: DateTime<FixedOffset>,
    pub content: String,
    pub name: Option<String>,
    pub in_reply_to: Option<String>,
}

/// A parsed protocol request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Step 2: sender tells recipient there is something to fetch.
    Notify {
        sender: String,
        recipient: String,
        subject: Subject,
    },
    /// Step 3: recipient asks the sender's server to confirm.
    Verify {
        sender: String,
        recipient: String,
        subject: Subject,
    },
    /// Step 4: recipient hands the sender a token for its endpoint.
    Deliver {
        sender: String,
        recipient: String,
        subject: Subject,
        endpoint: String,
        token: String,
        /// Channel flow only: the token's lifetime in seconds.
        expires_in: Option<u64>,
    },
    /// Step 6: the message itself, with `Authorization: Bearer T`.
    Message(Push),
}

impl Request {
    pub fn action(&self) -> &'static str {
        match self {
            Request::Notify { .. } => "notify",
            Request::Verify { .. } => "verify",
            Request::Deliver { .. } => "deliver",
            Request::Message(_) => "message",
        }
    }

    /// Parses form parameters; unknown parameters are ignored (PROTOCOL.md).
    pub fn parse(body: &[u8]) -> Result<Request, ProtoError> {
        let mut params: HashMap<String, String> = HashMap::with_capacity(PARAMS.len());
        for (k, v) in form_urlencoded_pairs(body)? {
            // Unknown parameters are ignored, repeated or not; a protocol
            // parameter given twice is malformed (which value counts would be a guess).
            if !PARAMS.contains(&k.as_str()) {
                continue;
            }
            if params.insert(k.clone(), v).is_some() {
                return Err(ProtoError::invalid_request(format!("`{k}` is given twice")));
            }
        }
        let p = Params(params);
        let action = p.required("action")?;
        match action {
            "notify" | "verify" => {
                let sender = p.identity("sender")?;
                let recipient = p.identity("recipient")?;
                let subject = p.subject()?;
                Ok(if action == "notify" {
                    Request::Notify {
                        sender,
                        recipient,
                        subject,
                    }
                } else {
                    Request::Verify {
                        sender,
                        recipient,
                        subject,
                    }
                })
            }
            "deliver" => {
                let sender = p.identity("sender")?;
                let recipient = p.identity("recipient")?;
                let subject = p.subject()?;
                let endpoint = p.required("endpoint")?;
                crate::identity::parse_http_url(endpoint)
                    .map_err(|e| ProtoError::invalid_request(format!("endpoint: {e}")))?;
                let token = p.required("token")?;
                if !is_valid_token(token) {
                    return Err(ProtoError::invalid_request(
                        "token must be 22 to 512 characters of A-Z a-z 0-9 - _",
                    ));
                }
                let expires_in = match (&subject, p.get("expires_in")) {
                    (Subject::Code(_), Some(n)) => Some(
                        // Plain decimal digits only: no sign, no leading zero.
                        Some(n)
                            .filter(|n| {
                                n.bytes().all(|b| b.is_ascii_digit()) && !n.starts_with('0')
                            })
                            .and_then(|n| n.parse::<u64>().ok())
                            .filter(|n| CHANNEL_SECS.contains(n))
                            .ok_or_else(|| {
                                ProtoError::invalid_request(
                                    "expires_in must be an integer from 60 to 604800",
                                )
                            })?,
                    ),
                    (Subject::Code(_), None) => {
                        return Err(ProtoError::invalid_request(
                            "expires_in is required with code",
                        ));
                    }
                    (Subject::Message(_), _) => None,
                };
                Ok(Request::Deliver {
                    sender,
                    recipient,
                    subject,
                    endpoint: endpoint.to_string(),
                    token: token.to_string(),
                    expires_in,
                })
            }
            "message" => {
                let sender = p.identity("sender")?;
                let recipient = p.identity("recipient")?;
                let message = p.id("message")?;
                let published =
                    DateTime::parse_from_rfc3339(p.required("published")?).map_err(|_| {
                        ProtoError::invalid_request("published must be an RFC 3339 date-time")
                    })?;
                let content = p.required_allow_empty("content")?.to_string();
                let name = p.get("name").map(str::to_string);
                let in_reply_to = match p.get("in-reply-to") {
                    Some(v) if !v.is_empty() => Some(p.id("in-reply-to")?),
                    _ => None,
                };
                Ok(Request::Message(Push {
                    sender,
                    recipient,
                    message,
                    published,
                    content,
                    name,
                    in_reply_to,
                }))
            }
            other => Err(ProtoError::invalid_request(format!(
                "unknown action `{other}`"
            ))),
        }
    }
}

fn form_urlencoded_pairs(body: &[u8]) -> Result<Vec<(String, String)>, ProtoError> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
        .map_err(|e| ProtoError::invalid_request(format!("body is not valid form encoding: {e}")))
}

struct Params(HashMap<String, String>);

impl Params {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }
    fn required(&self, name: &str) -> Result<&str, ProtoError> {
        match self.get(name) {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(ProtoError::invalid_request(format!("`{name}` is required"))),
        }
    }
    fn required_allow_empty(&self, name: &str) -> Result<&str, ProtoError> {
        self.get(name)
            .ok_or_else(|| ProtoError::invalid_request(format!("`{name}` is required")))
    }
    /// An identity URL, returned in canonical form.
    fn identity(&self, name: &str) -> Result<String, ProtoError> {
        crate::identity::Identity::parse(self.required(name)?)
            .map(|i| i.as_str().to_string())
            .map_err(|e| ProtoError::invalid_request(format!("{name}: {e}")))
    }
    fn id(&self, name: &str) -> Result<String, ProtoError> {
        let v = self.required(name)?;
        if is_valid_id(v) {
            Ok(v.to_string())
        } else {
            Err(ProtoError::invalid_request(format!(
                "`{name}` must be 22 to 128 characters of A-Z a-z 0-9 - _"
            )))
        }
    }
    /// Exactly one of `message` and `code`.
    fn subject(&self) -> Result<Subject, ProtoError> {
        match (self.get("message"), self.get("code")) {
            (Some(_), None) => Ok(Subject::Message(self.id("message")?)),
            (None, Some(_)) => Ok(Subject::Code(self.id("code")?)),
            _ => Err(ProtoError::invalid_request(
                "exactly one of `message` and `code` is required",
            )),
        }
    }
}

/// A stranger's text made safe for a log line or a stored error: control
/// characters escaped (no forged log lines), at most `max` characters.
pub fn excerpt(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .take(max)
        .flat_map(char::escape_debug)
        .collect();
    if text.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

/// How long a sender keeps retrying at least ("Delivery duties": 3 days).
pub const RETRY_DAYS_SECS: f64 = 3.0 * 86_400.0;

/// A fresh secret of the protocol alphabet: 32 bytes from the thread-local
/// CSPRNG (ChaCha, seeded from the OS), base64url without padding: 43 characters,
/// 256 bits. Used for codes and tokens.
pub fn new_secret() -> String {
    use base64::Engine;
    use rand::Rng;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A fresh message ID: the creation time in milliseconds (12 hex digits)
/// then 128 bits from the CSPRNG (22 base64url characters), 34 characters.
///
/// An ID needs to be unique and unguessable, which the random part makes
/// it; the time in front only says what `published` already says. It is
/// there for the store: messages in flight are recent, so their records
/// sit side by side in the database's B-trees (here and at the receiver,
/// which keys what it receives by it), and a group commit rewrites a few
/// pages instead of one per message.
pub fn new_message_id() -> String {
    time_ordered::<16>()
}

/// A fresh bearer token (step 4): the issue time in milliseconds (12 hex
/// digits), then 256 bits from the CSPRNG (43 base64url characters), 55
/// characters. The time is there for the same reason as in message IDs:
/// see [`token_key`].
pub fn new_token() -> String {
    time_ordered::<32>()
}

/// `N` random bytes (base64url) after the current time in ms (12 hex digits).
fn time_ordered<const N: usize>() -> String {
    use base64::Engine;
    use rand::Rng;
    let mut bytes = [0u8; N];
    rand::rng().fill_bytes(&mut bytes);
    let ms = chrono::Utc::now()
        .timestamp_millis()
        .clamp(0, 0xffff_ffff_ffff);
    format!(
        "{ms:012x}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// The key a token is stored under: its issue time as it leads the token,
/// then the SHA-256 of the whole token (hex). Only the hash is secret-derived;
/// the time is what the token's own first characters say. Keyed by the hash
/// alone, each token issued and each one used up landed on a random page of
/// a table holding a week of tokens, and every group commit rewrote one page
/// per message; in time order they share the last pages. A token of another
/// shape (issued before tokens carried their time) keeps its old key, the
/// bare hash, so it stays valid.
pub fn token_key(token: &str) -> String {
    let is_time = |p: &str| p.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    match token.get(..12) {
        Some(time) if token.len() == 55 && is_time(time) => {
            format!("{time}{}", hash_secret(token))
        }
        _ => hash_secret(token),
    }
}

/// The stored form of a token or code: its SHA-256, hex.
pub fn hash_secret(secret: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))
}

/// Constant-time equality of two stored hashes.
pub fn hashes_equal(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: &str = "AAAAAAAAAAAAAAAAAAAAAAAA";

    #[test]
    fn tokens_lead_with_their_time_and_are_keyed_by_it_then_their_hash() {
        let a = new_token();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = new_token();
        assert_eq!(a.len(), 55);
        assert!(is_valid_token(&a));
        assert_ne!(a[12..], b[12..], "the random part differs");
        let (ka, kb) = (token_key(&a), token_key(&b));
        assert_eq!(ka, format!("{}{}", &a[..12], hash_secret(&a)));
        assert!(ka < kb, "later tokens sort after earlier ones");
        assert!(
            !ka.contains(&a[12..]),
            "the secret part is stored only hashed"
        );
        // A token without a time in front (as issued before) keeps its old key.
        let old = new_secret();
        assert_eq!(token_key(&old), hash_secret(&old));
        let no_time = format!("0000000000Zz{}", &a[12..]);
        assert_eq!(token_key(&no_time), hash_secret(&no_time));
    }

    #[test]
    fn parses_notify_and_canonicalises_identities() {
        let body = format!(
            "action=notify&sender=https%3A%2F%2FA.example&recipient=https://b.example/&message={M}&x=ignored"
        );
        let r = Request::parse(body.as_bytes()).unwrap();
        assert_eq!(
            r,
            Request::Notify {
                sender: "https://a.example/".into(),
                recipient: "https://b.example/".into(),
                subject: Subject::Message(M.into())
            }
        );
    }

    #[test]
    fn rejects_both_or_neither_subject_and_bad_ids() {
        for body in [
            format!("action=notify&sender=https://a/&recipient=https://b/&message={M}&code={M}"),
            "action=notify&sender=https://a/&recipient=https://b/".to_string(),
            "action=notify&sender=https://a/&recipient=https://b/&message=short".to_string(),
            format!("action=notify&sender=https://a/&recipient=https://b/&message={M}%2F.."),
            format!("action=notify&sender=ftp://a/&recipient=https://b/&message={M}"),
            format!("action=frobnicate&sender=https://a/&recipient=https://b/&message={M}"),
            format!(
                "action=deliver&sender=https://a/&recipient=https://b/&code={M}&endpoint=https://b/pm&token={M}&expires_in=59"
            ),
            format!(
                "action=deliver&sender=https://a/&recipient=https://b/&code={M}&endpoint=https://b/pm&token={M}"
            ),
        ] {
            let e = Request::parse(body.as_bytes()).unwrap_err();
            assert_eq!(e.code, "invalid_request", "{body}");
        }
    }

    #[test]
    fn message_ids_are_valid_unique_and_start_with_their_time() {
        let a = new_message_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = new_message_id();
        assert!(is_valid_id(&a) && is_valid_id(&b), "{a} {b}");
        assert_eq!(a.len(), 34);
        assert_ne!(a[12..], b[12..], "the random part differs");
        assert!(
            a[..12] < b[..12],
            "later IDs sort after earlier ones: {a} {b}"
        );
        let ms = i64::from_str_radix(&a[..12], 16).unwrap();
        assert!((chrono::Utc::now().timestamp_millis() - ms).abs() < 60_000);
    }

    #[test]
    fn excerpts_cannot_forge_log_lines() {
        assert_eq!(excerpt("ok\nINFO forged", 100), "ok\\nINFO forged");
        assert_eq!(excerpt(&"x".repeat(10), 4), "xxxx…");
    }

    #[test]
    fn unknown_parameters_are_ignored_even_repeated() {
        let body =
            format!("action=notify&x=1&x=2&sender=https://a/&recipient=https://b/&message={M}");
        assert!(Request::parse(body.as_bytes()).is_ok());
    }

    #[test]
    fn secrets_are_valid_ids_and_tokens() {
        let s = new_secret();
        assert_eq!(s.len(), 43);
        assert!(is_valid_id(&s) && is_valid_token(&s));
        assert_ne!(s, new_secret());
        assert!(hashes_equal(&hash_secret(&s), &hash_secret(&s)));
        assert!(!hashes_equal(&hash_secret(&s), &hash_secret("x")));
    }
}
