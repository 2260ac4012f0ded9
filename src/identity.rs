//! Canonical identity URLs and endpoint URL comparison (PROTOCOL.md, "Roles and names").
//!
//! An identity is the owner's homepage. Before any comparison it is
//! canonicalised: `http`/`https` only, host lower-cased, default port
//! dropped, empty path becomes `/`, no fragment, no user-info. The `url`
//! crate's WHATWG parser already lower-cases hosts, drops default ports and
//! turns an empty path into `/` for these schemes; we add the rest.

use std::fmt;
use url::Url;

/// Why a string is not a usable identity or endpoint URL.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("`{0}` is not a URL: {1}")]
    Parse(String, String),
    #[error("`{0}` must be an http or https URL")]
    Scheme(String),
    #[error("`{0}` has no host")]
    NoHost(String),
}

/// An identity URL in canonical form. Equality is equality of the canonical strings.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity(Url);

impl Identity {
    /// Parses and canonicalises an identity URL.
    pub fn parse(input: &str) -> Result<Self, UrlError> {
        let mut url = parse_http_url(input)?;
        url.set_fragment(None);
        // `set_username`/`set_password` only fail for URLs that cannot carry
        // credentials, which an http(s) URL with a host always can.
        let _ = url.set_username("");
        let _ = url.set_password(None);
        Ok(Identity(url))
    }

    pub fn url(&self) -> &Url {
        &self.0
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The host name, for rate limits, blocklists and inbox file names.
    pub fn host(&self) -> &str {
        self.0.host_str().unwrap_or("")
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

/// Parses an http(s) URL with a host; endpoint URLs are compared as these
/// parsed-and-serialised URLs, query included.
pub fn parse_http_url(input: &str) -> Result<Url, UrlError> {
    let url =
        Url::parse(input.trim()).map_err(|e| UrlError::Parse(input.to_string(), e.to_string()))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(UrlError::Scheme(input.to_string()));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(UrlError::NoHost(input.to_string()));
    }
    Ok(url)
}

/// Exact comparison of two endpoint URLs after parsing and serialising both.
pub fn same_endpoint(a: &str, b: &str) -> bool {
    match (parse_http_url(a), parse_http_url(b)) {
        (Ok(a), Ok(b)) => a.as_str() == b.as_str(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_forms_compare_equal() {
        let forms = [
            "https://Alice.Example.org",
            "https://alice.example.org/",
            "https://alice.example.org:443/",
            "https://alice.example.org/#me",
            "https://user:pw@alice.example.org/",
        ];
        for f in forms {
            assert_eq!(
                Identity::parse(f).unwrap().as_str(),
                "https://alice.example.org/",
                "{f}"
            );
        }
        assert_ne!(
            Identity::parse("http://alice.example.org/").unwrap(),
            Identity::parse("https://alice.example.org/").unwrap()
        );
        assert_ne!(
            Identity::parse("https://alice.example.org/?a=1").unwrap(),
            Identity::parse("https://alice.example.org/").unwrap()
        );
    }

    #[test]
    fn rejects_other_schemes_and_garbage() {
        assert!(matches!(
            Identity::parse("ftp://a.example/"),
            Err(UrlError::Scheme(_))
        ));
        assert!(matches!(
            Identity::parse("mailto:a@b.example"),
            Err(UrlError::Scheme(_))
        ));
        assert!(matches!(
            Identity::parse("not a url"),
            Err(UrlError::Parse(..))
        ));
    }

    #[test]
    fn endpoints_compare_exactly_with_query() {
        assert!(same_endpoint(
            "https://PM.example/pm?x=1",
            "https://pm.example:443/pm?x=1"
        ));
        assert!(!same_endpoint(
            "https://pm.example/pm?x=1",
            "https://pm.example/pm?x=2"
        ));
        assert!(!same_endpoint(
            "https://pm.example/pm",
            "https://pm.example/pm/"
        ));
    }
}
