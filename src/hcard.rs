//! The sender's profile: PM endpoint and h-card, from one fetch of the
//! sender's homepage (steps 2 of the receiver), so the inbox can show a name
//! and a photo without a second request to a stranger's site.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use scraper::{ElementRef, Selector};
use url::Url;

use crate::discover::{CACHE_TTL, DiscoverError, find_endpoint};
use crate::fetch::Fetcher;

/// Profiles for step 2, kept at most [`CACHE_TTL`] (PROTOCOL.md allows
/// caching discovery for 10 minutes; step 5 never uses a cache).
#[derive(Default)]
pub struct ProfileCache {
    entries: Mutex<HashMap<String, (Instant, Profile)>>,
}

/// Most profiles kept; a full cache is emptied of expired entries first,
/// then simply not added to.
const MAX_PROFILES: usize = 10_000;

impl ProfileCache {
    /// The cached profile of `identity`, or a fresh fetch (then `true`).
    /// Only profiles with an endpoint are kept: a site that just added its
    /// link is seen on its next notify.
    pub async fn get(
        &self,
        fetcher: &Fetcher,
        identity: &Url,
    ) -> Result<(Profile, bool), DiscoverError> {
        if let Some((at, p)) = self.lock().get(identity.as_str())
            && at.elapsed() < CACHE_TTL
        {
            return Ok((p.clone(), false));
        }
        let profile = fetch_profile(fetcher, identity).await?;
        if profile.endpoint.is_some() {
            let mut entries = self.lock();
            if entries.len() >= MAX_PROFILES {
                entries.retain(|_, (at, _)| at.elapsed() < CACHE_TTL);
            }
            if entries.len() < MAX_PROFILES {
                entries.insert(
                    identity.as_str().to_string(),
                    (Instant::now(), profile.clone()),
                );
            }
        }
        Ok((profile, true))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Profile)>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the homepage says about its owner.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Profile {
    pub endpoint: Option<Url>,
    pub name: Option<String>,
    pub photo: Option<String>,
}

/// Fetches `identity` once: its rel=pm endpoint, and its representative h-card.
pub async fn fetch_profile(fetcher: &Fetcher, identity: &Url) -> Result<Profile, DiscoverError> {
    let page = fetcher
        .get(identity, "text/html,application/xhtml+xml;q=0.9,*/*;q=0.1")
        .await?;
    if !page.status.is_success() {
        return Err(DiscoverError::Status(page.url, page.status.as_u16()));
    }
    let is_html = page
        .headers
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|ct| ct.to_ascii_lowercase().contains("html"));
    let endpoint = find_endpoint(&page.url, &page.headers, &page.body, is_html);
    let (name, photo) = if is_html {
        hcard(&page.url, &String::from_utf8_lossy(&page.body))
    } else {
        (None, None)
    };
    Ok(Profile {
        endpoint,
        name,
        photo,
    })
}

/// Name and photo of the page's representative h-card: the first `h-card`
/// whose `u-url` is the page itself, else the first `h-card`.
pub fn hcard(base: &Url, html: &str) -> (Option<String>, Option<String>) {
    let doc = crate::discover::parse_page(html);
    // Only called with the constant selectors below, which parse.
    let sel = |s: &str| Selector::parse(s).expect("constant selector");
    let cards: Vec<ElementRef> = doc.select(&sel(".h-card")).collect();
    let url_sel = sel(".u-url[href]");
    let is_self = |card: &ElementRef| {
        let own = card.value().attr("href").into_iter();
        let inner = card.select(&url_sel).filter_map(|e| e.value().attr("href"));
        own.chain(inner)
            .filter_map(|h| base.join(h).ok())
            .any(|u| u.as_str() == base.as_str())
    };
    let Some(card) = cards.iter().find(|c| is_self(c)).or(cards.first()) else {
        return (None, None);
    };
    let name = card
        .select(&sel(".p-name"))
        .next()
        .map(|e| e.text().collect::<String>())
        .or_else(|| {
            // An h-card with no p-name: its own text is the name (implied name).
            Some(card.text().collect::<String>())
        })
        .map(|n| n.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|n| !n.is_empty() && n.chars().count() <= 100);
    let photo = card
        .select(&sel("img.u-photo[src], .u-photo[href]"))
        .next()
        .and_then(|e| e.value().attr("src").or(e.value().attr("href")))
        .or_else(|| {
            (card.value().name() == "img")
                .then(|| card.value().attr("src"))
                .flatten()
        })
        .and_then(|src| base.join(src).ok())
        .filter(|u| matches!(u.scheme(), "http" | "https"))
        .map(|u| u.to_string());
    (name, photo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn representative_card_name_and_photo() {
        let base = Url::parse("https://alice.example/").unwrap();
        let html = r#"<div class="h-card"><span class="p-name">Someone Else</span></div>
            <div class="h-card"><a class="u-url p-name" href="/">Alice  Liddell</a>
            <img class="u-photo" src="/me.jpg"></div>"#;
        let (name, photo) = hcard(&base, html);
        assert_eq!(name.as_deref(), Some("Alice Liddell"));
        assert_eq!(photo.as_deref(), Some("https://alice.example/me.jpg"));
        assert_eq!(hcard(&base, "<p>no card</p>"), (None, None));
        let implied = r#"<a class="h-card" href="/">Alice</a>"#;
        assert_eq!(hcard(&base, implied).0.as_deref(), Some("Alice"));
    }
}
