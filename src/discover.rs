//! rel=pm endpoint discovery (PROTOCOL.md, "Discovery"), the Webmention
//! algorithm with the rel value `pm`:
//!
//! 1. GET the identity URL through the safe [`Fetcher`] (5 redirects at most);
//!    the URL after the last redirect is the base.
//! 2. The first `Link` header entry whose rel list contains `pm` wins.
//! 3. Otherwise the first `<link>` or `<a>` in document order with `pm` in its
//!    rel and an `href` wins; comments are not elements, so they never match.
//! 4. The winner is resolved against the base and must be http(s).

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use reqwest::header::{CONTENT_TYPE, HeaderMap, LINK};
use scraper::{Html, Selector};
use url::Url;

use crate::fetch::{FetchError, Fetcher};

/// How long a discovery result may be reused (PROTOCOL.md allows at most 10 minutes).
pub const CACHE_TTL: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("{0} answered HTTP {1}")]
    Status(Url, u16),
}

/// Finds the PM endpoint of `identity`; `Ok(None)` when it advertises none.
pub async fn discover(fetcher: &Fetcher, identity: &Url) -> Result<Option<Url>, DiscoverError> {
    let page = fetcher
        .get(identity, "text/html,application/xhtml+xml;q=0.9,*/*;q=0.1")
        .await?;
    if !page.status.is_success() {
        return Err(DiscoverError::Status(page.url, page.status.as_u16()));
    }
    let is_html = page
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|ct| {
            let ct = ct.to_ascii_lowercase();
            ct.contains("html")
        });
    Ok(find_endpoint(&page.url, &page.headers, &page.body, is_html))
}

/// Steps 2 to 4 on a fetched page: `base` is the URL after the last redirect.
pub fn find_endpoint(base: &Url, headers: &HeaderMap, body: &[u8], is_html: bool) -> Option<Url> {
    find_rel(base, headers, body, is_html, "pm")
}

/// The first link whose rel list holds `rel` (`pm` here, IndieAuth's
/// `authorization_endpoint` in the web UI): `Link` header first, then the
/// first `<link>` or `<a>` of an HTML body; resolved against `base`, http(s) only.
pub fn find_rel(
    base: &Url,
    headers: &HeaderMap,
    body: &[u8],
    is_html: bool,
    rel: &str,
) -> Option<Url> {
    let from_header = headers
        .get_all(LINK)
        .iter()
        // Not `to_str`: that refuses the whole value for one non-ASCII byte
        // (a UTF-8 `title`, say) and would hide a valid entry beside it.
        .map(|v| String::from_utf8_lossy(v.as_bytes()))
        .flat_map(|v| parse_link_header(&v))
        .find(|link| rel_has(&link.rel, rel))
        .map(|link| link.target);
    let href = match from_header {
        Some(target) => Some(target),
        None if is_html => first_html_link(&String::from_utf8_lossy(body), rel),
        None => None,
    }?;
    let url = base.join(href.trim()).ok()?;
    matches!(url.scheme(), "http" | "https").then_some(url)
}

/// `<link>` and `<a>` elements with a rel and an href. Parsed once: the
/// sender runs this on every step-5 discovery, and parsing the selector
/// each time cost about two fifths as much as parsing the page (perf).
static REL_LINKS: LazyLock<Selector> = LazyLock::new(|| {
    // A constant selector: parsing it cannot fail.
    Selector::parse("link[rel][href], a[rel][href]").expect("valid selector")
});

/// Parses a page as a browser with scripting off does: what a
/// `<noscript>` holds is then markup, not text, and a link in it counts
/// (PROTOCOL.md: the first element "anywhere in the document").
/// `Html::parse_document` parses with scripting on.
pub fn parse_page(html: &str) -> Html {
    use html5ever::tendril::TendrilSink;
    let opts = html5ever::ParseOpts {
        tree_builder: html5ever::tree_builder::TreeBuilderOpts {
            scripting_enabled: false,
            ..Default::default()
        },
        ..Default::default()
    };
    html5ever::driver::parse_document(scraper::HtmlTreeSink::new(Html::new_document()), opts)
        .one(html)
}

fn first_html_link(html: &str, rel: &str) -> Option<String> {
    let doc = parse_page(html);
    doc.select(&REL_LINKS)
        .find(|el| el.value().attr("rel").is_some_and(|r| rel_has(r, rel)))
        .and_then(|el| el.value().attr("href").map(str::to_string))
}

/// A rel attribute is a space-separated, case-insensitive list of values.
fn rel_has(list: &str, rel: &str) -> bool {
    list.split_ascii_whitespace()
        .any(|v| v.eq_ignore_ascii_case(rel))
}

/// One entry of an HTTP `Link` header (RFC 8288): its target and rel list.
#[derive(Debug, PartialEq, Eq)]
pub struct LinkEntry {
    pub target: String,
    pub rel: String,
}

/// Parses a `Link` header value into its entries, in order. Malformed
/// entries are skipped; commas inside `<…>` or quoted strings do not split.
pub fn parse_link_header(value: &str) -> Vec<LinkEntry> {
    let mut entries = Vec::new();
    let mut rest = value;
    loop {
        rest = rest.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
        let Some(after_lt) = rest.strip_prefix('<') else {
            // Not at an entry: skip to the next comma outside quotes.
            match skip_past_comma(rest) {
                Some(r) => {
                    rest = r;
                    continue;
                }
                None => break,
            }
        };
        let Some(end) = after_lt.find('>') else { break };
        let target = after_lt[..end].to_string();
        rest = &after_lt[end + 1..];
        let mut rel = None;
        // Parameters: `; name=value` or `; name="quoted"` until a comma.
        loop {
            rest = rest.trim_start();
            let Some(p) = rest.strip_prefix(';') else {
                break;
            };
            let p = p.trim_start();
            let name_end = p
                .find(|c: char| c == '=' || c == ';' || c == ',' || c.is_whitespace())
                .unwrap_or(p.len());
            let name = &p[..name_end];
            let mut after = p[name_end..].trim_start();
            let mut val = String::new();
            if let Some(v) = after.strip_prefix('=') {
                let v = v.trim_start();
                if let Some(q) = v.strip_prefix('"') {
                    let mut chars = q.char_indices();
                    let mut consumed = q.len();
                    while let Some((i, c)) = chars.next() {
                        match c {
                            '\\' => {
                                if let Some((_, esc)) = chars.next() {
                                    val.push(esc);
                                }
                            }
                            '"' => {
                                consumed = i + 1;
                                break;
                            }
                            c => val.push(c),
                        }
                    }
                    after = &q[consumed..];
                } else {
                    let end = v.find([';', ',']).unwrap_or(v.len());
                    val = v[..end].trim().to_string();
                    after = &v[end..];
                }
            }
            if name.eq_ignore_ascii_case("rel") && rel.is_none() {
                rel = Some(val);
            }
            rest = after;
        }
        if let Some(rel) = rel {
            entries.push(LinkEntry { target, rel });
        }
        match skip_past_comma(rest) {
            Some(r) => rest = r,
            None => break,
        }
    }
    entries
}

/// The text after the next comma that is not inside a quoted string.
fn skip_past_comma(s: &str) -> Option<&str> {
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            ',' if !in_quotes => return Some(&s[i + 1..]),
            _ => {}
        }
    }
    None
}

/// Discovery results for steps 1 and 2, kept at most [`CACHE_TTL`]. Step 5
/// never uses it: the check that protects the content is always fresh.
#[derive(Default)]
pub struct DiscoveryCache {
    entries: Mutex<HashMap<String, (Instant, Option<Url>)>>,
}

impl DiscoveryCache {
    pub async fn discover(
        &self,
        fetcher: &Fetcher,
        identity: &Url,
    ) -> Result<Option<Url>, DiscoverError> {
        let key = identity.as_str().to_string();
        if let Some((at, found)) = self.lock().get(&key)
            && at.elapsed() < CACHE_TTL
        {
            return Ok(found.clone());
        }
        let found = discover(fetcher, identity).await?;
        let mut entries = self.lock();
        entries.retain(|_, (at, _)| at.elapsed() < CACHE_TTL);
        entries.insert(key, (Instant::now(), found.clone()));
        Ok(found)
    }

    /// Whether a fresh result for `identity` is cached (the next
    /// [`DiscoveryCache::discover`] will not fetch).
    pub fn contains(&self, identity: &Url) -> bool {
        self.lock()
            .get(identity.as_str())
            .is_some_and(|(at, _)| at.elapsed() < CACHE_TTL)
    }

    /// Forgets `identity`, e.g. after its endpoint refused us.
    pub fn forget(&self, identity: &Url) {
        self.lock().remove(identity.as_str());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Option<Url>)>> {
        // A panic while holding the lock cannot leave the map inconsistent.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_header_variants() {
        let e = parse_link_header(r#"<https://a.example/pm>; rel="pm""#);
        assert_eq!(e[0].target, "https://a.example/pm");
        assert_eq!(e[0].rel, "pm");
        let e = parse_link_header(r#"</x,y>; rel=other, </pm>; rel="webmention pm"; title="a, b""#);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].target, "/x,y");
        assert_eq!(e[1].rel, "webmention pm");
        let e = parse_link_header(r#"garbage, </pm>; rel=pm"#);
        assert_eq!(
            e,
            vec![LinkEntry {
                target: "/pm".into(),
                rel: "pm".into()
            }]
        );
    }

    #[test]
    fn any_rel_is_found_in_a_header_with_a_non_ascii_byte_then_in_the_html() {
        let base = Url::parse("https://alice.example/").unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            LINK,
            reqwest::header::HeaderValue::from_bytes(
                "</auth>; rel=\"authorization_endpoint\"; title=\"Zoë\"".as_bytes(),
            )
            .unwrap(),
        );
        let found = find_rel(&base, &headers, b"", true, "authorization_endpoint");
        assert_eq!(found.unwrap().as_str(), "https://alice.example/auth");
        assert_eq!(find_rel(&base, &headers, b"", true, "pm"), None);
        let html = br#"<a rel="me" href="/me"></a><link rel="PM other" href="/pm">"#;
        let found = find_rel(&base, &HeaderMap::new(), html, true, "pm");
        assert_eq!(found.unwrap().as_str(), "https://alice.example/pm");
        assert_eq!(find_rel(&base, &HeaderMap::new(), html, false, "pm"), None);
    }

    #[test]
    fn rel_matching_is_whole_word_and_case_insensitive() {
        assert!(rel_has("PM", "pm"));
        assert!(rel_has("me  pm", "pm"));
        assert!(!rel_has("pm-other", "pm"));
        assert!(!rel_has("notpm", "pm"));
    }

    #[test]
    fn html_document_order_and_comments() {
        let base = Url::parse("https://a.example/dir/page").unwrap();
        let html = br#"<html><head><!-- <link rel="pm" href="/commented"> --></head>
            <body><a rel="pm-other" href="/no"></a><a rel="pm" href="first?x=1"></a>
            <link rel="pm" href="/second"></body></html>"#;
        let got = find_endpoint(&base, &HeaderMap::new(), html, true).unwrap();
        assert_eq!(got.as_str(), "https://a.example/dir/first?x=1");
        let empty = br#"<link rel="pm" href="">"#;
        let got = find_endpoint(&base, &HeaderMap::new(), empty, true).unwrap();
        assert_eq!(got.as_str(), "https://a.example/dir/page");
    }
}
