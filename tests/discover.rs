//! Discovery (PROTOCOL.md, "Discovery") and the safe fetcher's limits,
//! against real HTTP servers on loopback.
//!
//! The discovery cases follow the Webmention discovery suite (its tests 1
//! to 23) with the rel value `pm`, each named after what it checks. Then the
//! fetch limits (1 MiB, 10 s in all, 5 redirects, http/https only), the
//! private-address guard on every hop, POSTs that never follow a redirect,
//! the discovery cache, and the `indiepm discover` binary.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{FakeHost, Route, next_addr};
use indiepm::discover::{DiscoverError, DiscoveryCache, discover};
use indiepm::fetch::{FetchError, Fetcher, MAX_BODY, MAX_REDIRECTS};
use url::Url;

// ---------------------------------------------------------------------------
// helpers

/// A fetcher with the address guard lifted: every fake host is on loopback.
fn open() -> Fetcher {
    Fetcher::new(true)
}

/// A fetcher with the guard on, as a server runs by default.
fn guarded() -> Fetcher {
    Fetcher::new(false)
}

/// Discovers the endpoint of `path` on `host`, with the guard lifted.
async fn endpoint(host: &FakeHost, path: &str) -> Option<String> {
    discover(&open(), &host.url(path))
        .await
        .unwrap_or_else(|e| panic!("discovery of {path} failed: {e}"))
        .map(String::from)
}

/// A page whose `<body>` holds `body` and whose `<head>` is ordinary.
fn page(head: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>A page</title>\n<link rel=\"stylesheet\" href=\"/style.css\">\n{head}\n\
         </head>\n<body>\n<h1>Hello</h1>\n{body}\n</body>\n</html>\n"
    )
}

fn assert_forbidden<T: std::fmt::Debug>(result: Result<T, FetchError>) {
    match result {
        Err(FetchError::Forbidden(..)) => {}
        other => panic!("expected a refusal by the address guard, got {other:?}"),
    }
}

fn assert_discovery_forbidden(result: Result<Option<Url>, DiscoverError>) {
    match result {
        Err(DiscoverError::Fetch(FetchError::Forbidden(..))) => {}
        other => panic!("expected a refusal by the address guard, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Link header (Webmention discovery tests 1, 2, 7, 8, 10, 18, 19)

#[tokio::test]
async fn link_header_unquoted_rel_relative_url() {
    let host = FakeHost::start();
    host.route(
        "/",
        Route::html(page("", "")).header("link", "</pm/endpoint>; rel=pm"),
    );
    assert_eq!(
        endpoint(&host, "/").await,
        Some(host.url("/pm/endpoint").to_string())
    );
}

#[tokio::test]
async fn link_header_unquoted_rel_absolute_url() {
    let host = FakeHost::start();
    let pm = FakeHost::start();
    let target = pm.url("/endpoint");
    host.route(
        "/",
        Route::html(page("", "")).header("link", &format!("<{target}>; rel=pm")),
    );
    assert_eq!(endpoint(&host, "/").await, Some(target.to_string()));
}

#[tokio::test]
async fn link_header_quoted_rel() {
    let host = FakeHost::start();
    host.route(
        "/",
        Route::html(page("", "")).header("link", "</quoted>; rel=\"pm\""),
    );
    assert_eq!(
        endpoint(&host, "/").await,
        Some(host.url("/quoted").to_string())
    );
}

#[tokio::test]
async fn link_header_strange_casing() {
    let host = FakeHost::start();
    host.route(
        "/",
        Route::html(page("", "")).header("LinK", "</cased>; ReL=\"Pm\""),
    );
    assert_eq!(
        endpoint(&host, "/").await,
        Some(host.url("/cased").to_string())
    );
}

#[tokio::test]
async fn link_header_several_rel_values() {
    let host = FakeHost::start();
    host.route(
        "/a",
        Route::html(page("", "")).header("link", "</pm-a>; rel=\"pm somethingelse\""),
    );
    host.route(
        "/b",
        Route::html(page("", "")).header("link", "</pm-b>; rel=\"somethingelse  PM\tother\""),
    );
    assert_eq!(
        endpoint(&host, "/a").await,
        Some(host.url("/pm-a").to_string())
    );
    assert_eq!(
        endpoint(&host, "/b").await,
        Some(host.url("/pm-b").to_string())
    );
}

#[tokio::test]
async fn several_link_headers_first_pm_entry_wins() {
    let host = FakeHost::start();
    host.route(
        "/",
        Route::html(page("", ""))
            .header("link", "</style.css>; rel=preload; as=style")
            .header("link", "</wm>; rel=webmention")
            .header("link", "</first>; rel=pm")
            .header("link", "</second>; rel=pm"),
    );
    assert_eq!(
        endpoint(&host, "/").await,
        Some(host.url("/first").to_string())
    );
}

#[tokio::test]
async fn one_link_header_with_several_entries() {
    let host = FakeHost::start();
    host.route(
        "/",
        Route::html(page("", "")).header(
            "link",
            "<https://other.example/x,y>; rel=\"other\"; title=\"a, b; c\", \
             </one-header>; rel=\"pm\", </later>; rel=pm",
        ),
    );
    assert_eq!(
        endpoint(&host, "/").await,
        Some(host.url("/one-header").to_string())
    );
}

#[tokio::test]
async fn link_header_with_non_ascii_text_beside_the_entry() {
    // A UTF-8 title in the same header value must not hide the pm entry.
    let host = FakeHost::start();
    host.route(
        "/",
        Route::html(page(r#"<link rel="pm" href="/from-html">"#, "")).header(
            "link",
            "</about>; rel=author; title=\"Zoë Café\", </utf8-pm>; rel=pm",
        ),
    );
    assert_eq!(
        endpoint(&host, "/").await,
        Some(host.url("/utf8-pm").to_string())
    );
}

#[tokio::test]
async fn link_header_rel_pm_other_does_not_match() {
    let host = FakeHost::start();
    host.route(
        "/",
        Route::html(page(r#"<link rel="pm" href="/from-html">"#, ""))
            .header("link", "</wrong>; rel=\"pm-other\"")
            .header("link", "</wrong2>; rel=notpm"),
    );
    assert_eq!(
        endpoint(&host, "/").await,
        Some(host.url("/from-html").to_string())
    );
}

#[tokio::test]
async fn link_header_wins_over_html() {
    let host = FakeHost::start();
    host.route(
        "/",
        Route::html(page(
            r#"<link rel="pm" href="/from-link-element">"#,
            r#"<a rel="pm" href="/from-a-element">x</a>"#,
        ))
        .header("link", "</from-header>; rel=pm"),
    );
    assert_eq!(
        endpoint(&host, "/").await,
        Some(host.url("/from-header").to_string())
    );
}

#[tokio::test]
async fn link_header_is_read_even_when_the_body_is_not_html() {
    let host = FakeHost::start();
    host.route(
        "/",
        Route::ok()
            .header("content-type", "application/json")
            .header("link", "</json-pm>; rel=pm")
            .body("{}"),
    );
    assert_eq!(
        endpoint(&host, "/").await,
        Some(host.url("/json-pm").to_string())
    );
}

#[tokio::test]
async fn link_header_on_a_redirect_response_is_ignored() {
    // Only the final response counts: its headers and its body.
    let host = FakeHost::start();
    host.route(
        "/old",
        Route::redirect(301, "/new").header("link", "</from-redirect>; rel=pm"),
    );
    host.route(
        "/new",
        Route::html(page(r#"<link rel="pm" href="/from-final">"#, "")),
    );
    assert_eq!(
        endpoint(&host, "/old").await,
        Some(host.url("/from-final").to_string())
    );
}

// ---------------------------------------------------------------------------
// HTML elements (Webmention discovery tests 3 to 6, 9, 12 to 17, 20 to 22)

#[tokio::test]
async fn html_link_element_relative_url() {
    let host = FakeHost::start();
    host.route(
        "/",
        Route::html(page(r#"<link rel="pm" href="/pm-rel">"#, "")),
    );
    assert_eq!(
        endpoint(&host, "/").await,
        Some(host.url("/pm-rel").to_string())
    );
}

#[tokio::test]
async fn html_link_element_absolute_url() {
    let host = FakeHost::start();
    let target = "https://pm.example.net/endpoint";
    host.route(
        "/",
        Route::html(page(&format!(r#"<link rel="pm" href="{target}">"#), "")),
    );
    assert_eq!(endpoint(&host, "/").await, Some(target.to_string()));
}

#[tokio::test]
async fn html_a_element_relative_url() {
    let host = FakeHost::start();
    host.route(
        "/",
        Route::html(page(
            "",
            r#"<p>Write to me <a rel="pm" href="/a-rel">here</a>.</p>"#,
        )),
    );
    assert_eq!(
        endpoint(&host, "/").await,
        Some(host.url("/a-rel").to_string())
    );
}

#[tokio::test]
async fn html_a_element_absolute_url() {
    let host = FakeHost::start();
    let target = "https://pm.example.net/a?who=me";
    host.route(
        "/",
        Route::html(page("", &format!(r#"<a rel="pm" href="{target}">pm</a>"#))),
    );
    assert_eq!(endpoint(&host, "/").await, Some(target.to_string()));
}

#[tokio::test]
async fn html_unquoted_and_mixed_case_rel() {
    let host = FakeHost::start();
    host.route("/a", Route::html(page("<link rel=pm href=/unquoted>", "")));
    host.route(
        "/b",
        Route::html(page(r#"<LINK REL="Pm" HREF="/upper">"#, "")),
    );
    assert_eq!(
        endpoint(&host, "/a").await,
        Some(host.url("/unquoted").to_string())
    );
    assert_eq!(
        endpoint(&host, "/b").await,
        Some(host.url("/upper").to_string())
    );
}

#[tokio::test]
async fn html_several_rel_values() {
    let host = FakeHost::start();
    host.route(
        "/",
        Route::html(page(
            "<link rel=\"me pm\n somethingelse\" href=\"/several\">",
            "",
        )),
    );
    assert_eq!(
        endpoint(&host, "/").await,
        Some(host.url("/several").to_string())
    );
}

#[tokio::test]
async fn html_rel_pm_other_does_not_match() {
    let host = FakeHost::start();
    host.route(
        "/",
        Route::html(page(
            r#"<link rel="pm-other" href="/wrong1"><link rel="notpm" href="/wrong2">
               <link rel="pm.x" href="/wrong3"><a rel="x-pm" href="/wrong4">x</a>"#,
            r#"<a rel="pm" href="/right">right</a>"#,
        )),
    );
    assert_eq!(
        endpoint(&host, "/").await,
        Some(host.url("/right").to_string())
    );
}

#[tokio::test]
async fn html_only_pm_other_means_no_endpoint() {
    let host = FakeHost::start();
    host.route(
        "/",
        Route::html(page(r#"<link rel="pm-other" href="/wrong">"#, "")),
    );
    assert_eq!(endpoint(&host, "/").await, None);
}

#[tokio::test]
async fn html_comment_is_ignored() {
    let host = FakeHost::start();
    host.route(
        "/",
        Route::html(page(
            r#"<!-- <link rel="pm" href="/commented-out"> -->"#,
            r#"<!--
                 <a rel="pm" href="/also-commented">x</a>
               -->
               <a rel="pm" href="/real">real</a>"#,
        )),
    );
    assert_eq!(
        endpoint(&host, "/").await,
        Some(host.url("/real").to_string())
    );
}

#[tokio::test]
async fn html_comment_only_means_no_endpoint() {
    let host = FakeHost::start();
    host.route(
        "/",
        Route::html(page(
            r#"<!-- <link rel="pm" href="/commented-out"> -->"#,
            "",
        )),
    );
    assert_eq!(endpoint(&host, "/").await, None);
}

#[tokio::test]
async fn a_link_inside_noscript_or_template_counts_in_document_order() {
    // "Anywhere in the document": a server parses as a browser without
    // scripts, for which <noscript> holds markup, not text.
    let host = FakeHost::start();
    host.route(
        "/noscript",
        Route::html(page(
            r#"<noscript><link rel="pm" href="/in-noscript"></noscript>"#,
            r#"<a rel="pm" href="/later">later</a>"#,
        )),
    );
    host.route(
        "/template",
        Route::html(page(
            "",
            r#"<template><a rel="pm" href="/in-template">x</a></template>
               <a rel="pm" href="/later">later</a>"#,
        )),
    );
    assert_eq!(
        endpoint(&host, "/noscript").await,
        Some(host.url("/in-noscript").to_string())
    );
    assert_eq!(
        endpoint(&host, "/template").await,
        Some(host.url("/in-template").to_string())
    );
}

#[tokio::test]
async fn escaped_html_is_text_not_an_element() {
    let host = FakeHost::start();
    host.route(
        "/",
        Route::html(page(
            "",
            r#"<p>Code: <code>&lt;a rel="pm" href="/escaped"&gt;</code></p>
               <a rel="pm" href="/real">real</a>"#,
        )),
    );
    assert_eq!(
        endpoint(&host, "/").await,
        Some(host.url("/real").to_string())
    );
}

#[tokio::test]
async fn empty_href_is_the_page_itself() {
    let host = FakeHost::start();
    host.route("/me", Route::html(page(r#"<link rel="pm" href="">"#, "")));
    assert_eq!(
        endpoint(&host, "/me").await,
        Some(host.url("/me").to_string())
    );
    // The page's own query string is part of the page's URL.
    assert_eq!(
        endpoint(&host, "/me?lang=en").await,
        Some(host.url("/me?lang=en").to_string())
    );
}

#[tokio::test]
async fn a_element_before_link_element_wins() {
    let host = FakeHost::start();
    // The <a> comes first in document order although <link> is in <head>
    // in a well-formed page: here the <a> is in a <head>-less document.
    host.route(
        "/",
        Route::html(
            r#"<!doctype html><title>t</title><a rel="pm" href="/a-first">a</a>
               <link rel="pm" href="/link-second">"#,
        ),
    );
    assert_eq!(
        endpoint(&host, "/").await,
        Some(host.url("/a-first").to_string())
    );
}

#[tokio::test]
async fn link_element_before_a_element_wins() {
    let host = FakeHost::start();
    host.route(
        "/",
        Route::html(page(
            r#"<link rel="pm" href="/link-first">"#,
            r#"<a rel="pm" href="/a-second">a</a>"#,
        )),
    );
    assert_eq!(
        endpoint(&host, "/").await,
        Some(host.url("/link-first").to_string())
    );
}

#[tokio::test]
async fn endpoint_in_body_is_found() {
    let host = FakeHost::start();
    host.route(
        "/",
        Route::html(page(
            "",
            r#"<main><article><footer><nav>
               <link rel="pm" href="/in-body">
               </nav></footer></article></main>"#,
        )),
    );
    assert_eq!(
        endpoint(&host, "/").await,
        Some(host.url("/in-body").to_string())
    );
}

#[tokio::test]
async fn element_without_href_is_skipped() {
    let host = FakeHost::start();
    host.route(
        "/",
        Route::html(page(
            r#"<link rel="pm">"#,
            r#"<a rel="pm">no href</a><a rel="pm" href="/with-href">x</a>"#,
        )),
    );
    assert_eq!(
        endpoint(&host, "/").await,
        Some(host.url("/with-href").to_string())
    );
}

#[tokio::test]
async fn query_string_is_kept() {
    let host = FakeHost::start();
    host.route(
        "/",
        Route::html(page(
            r#"<link rel="pm" href="/pm?version=1&amp;site=alice">"#,
            "",
        )),
    );
    host.route(
        "/h",
        Route::html(page("", "")).header("link", "</pm?from=header&x=%2F>; rel=pm"),
    );
    assert_eq!(
        endpoint(&host, "/").await,
        Some(host.url("/pm?version=1&site=alice").to_string())
    );
    assert_eq!(
        endpoint(&host, "/h").await,
        Some(host.url("/pm?from=header&x=%2F").to_string())
    );
}

#[tokio::test]
async fn relative_to_the_page_path() {
    let host = FakeHost::start();
    host.route(
        "/people/alice/",
        Route::html(page(r#"<link rel="pm" href="pm/inbox">"#, "")),
    );
    host.route(
        "/people/bob",
        Route::html(page("", "")).header("link", "<../pm>; rel=pm"),
    );
    assert_eq!(
        endpoint(&host, "/people/alice/").await,
        Some(host.url("/people/alice/pm/inbox").to_string())
    );
    assert_eq!(
        endpoint(&host, "/people/bob").await,
        Some(host.url("/pm").to_string())
    );
}

#[tokio::test]
async fn relative_urls_after_redirects_resolve_against_the_final_url() {
    let host = FakeHost::start();
    host.route(
        "/final/page",
        Route::html(page(r#"<link rel="pm" href="endpoint">"#, "")),
    );
    host.route(
        "/final/header",
        Route::html(page("", "")).header("link", "<endpoint-h?x=1>; rel=pm"),
    );
    for status in [301, 302, 303, 307, 308] {
        let from = format!("/moved/{status}/page");
        host.route(&from, Route::redirect(status, "/final/page"));
        assert_eq!(
            endpoint(&host, &from).await,
            Some(host.url("/final/endpoint").to_string()),
            "after a {status}"
        );
        let from = format!("/moved/{status}/header");
        host.route(&from, Route::redirect(status, "../../final/header"));
        assert_eq!(
            endpoint(&host, &from).await,
            Some(host.url("/final/endpoint-h?x=1").to_string()),
            "Link header after a {status}"
        );
    }
}

#[tokio::test]
async fn redirect_with_a_raw_utf8_location_is_followed() {
    let host = FakeHost::start();
    host.route("/old", Route::redirect(301, "/café/"));
    host.route(
        "/caf%C3%A9/",
        Route::html(page(r#"<link rel="pm" href="pm">"#, "")),
    );
    assert_eq!(
        endpoint(&host, "/old").await,
        Some(host.url("/caf%C3%A9/pm").to_string())
    );
}

#[tokio::test]
async fn redirect_to_another_host_resolves_against_that_host() {
    let first = FakeHost::start();
    let second = FakeHost::start();
    second.route(
        "/home",
        Route::html(page(r#"<link rel="pm" href="/pm">"#, "")),
    );
    first.route("/", Route::redirect(302, second.url("/home").as_str()));
    assert_eq!(
        endpoint(&first, "/").await,
        Some(second.url("/pm").to_string())
    );
    // The empty href means the final page too.
    second.route("/self", Route::html(page(r#"<link rel="pm" href="">"#, "")));
    first.route("/self", Route::redirect(307, second.url("/self").as_str()));
    assert_eq!(
        endpoint(&first, "/self").await,
        Some(second.url("/self").to_string())
    );
}

#[tokio::test]
async fn non_http_schemes_are_no_endpoint() {
    let host = FakeHost::start();
    for (i, href) in [
        "mailto:alice@example.org",
        "javascript:alert(1)",
        "ftp://example.org/pm",
        "file:///etc/passwd",
        "data:text/plain,pm",
    ]
    .iter()
    .enumerate()
    {
        let path = format!("/html-{i}");
        host.route(
            &path,
            Route::html(page(&format!(r#"<link rel="pm" href="{href}">"#), "")),
        );
        assert_eq!(endpoint(&host, &path).await, None, "{href} in HTML");
        // The first Link entry with pm wins even when its scheme is wrong:
        // the identity then has no endpoint, and HTML is not consulted.
        let path = format!("/header-{i}");
        host.route(
            &path,
            Route::html(page(r#"<link rel="pm" href="/html">"#, ""))
                .header("link", &format!("<{href}>; rel=pm")),
        );
        assert_eq!(
            endpoint(&host, &path).await,
            None,
            "{href} in a Link header"
        );
    }
}

#[tokio::test]
async fn page_without_endpoint_is_none() {
    let host = FakeHost::start();
    host.route(
        "/",
        Route::html(page(
            r#"<link rel="webmention" href="/wm"><link rel="me" href="https://x.example/">"#,
            r#"<a href="/pm">pm without rel</a>"#,
        ))
        .header("link", "</wm>; rel=webmention"),
    );
    assert_eq!(endpoint(&host, "/").await, None);
}

#[tokio::test]
async fn html_in_a_non_html_response_is_not_parsed() {
    let host = FakeHost::start();
    host.route(
        "/",
        Route::ok()
            .header("content-type", "text/plain")
            .body(page(r#"<link rel="pm" href="/pm">"#, "")),
    );
    assert_eq!(endpoint(&host, "/").await, None);
}

#[tokio::test]
async fn error_status_is_an_error() {
    let host = FakeHost::start();
    host.route("/gone", Route::status(410));
    match discover(&open(), &host.url("/gone")).await {
        Err(DiscoverError::Status(_, 410)) => {}
        other => panic!("expected a status error, got {other:?}"),
    }
    match discover(&open(), &host.url("/nothing-here")).await {
        Err(DiscoverError::Status(_, 404)) => {}
        other => panic!("expected a status error, got {other:?}"),
    }
}

#[tokio::test]
async fn discovery_request_is_a_plain_get_asking_for_html() {
    let host = FakeHost::start();
    host.route("/", Route::html(page(r#"<link rel="pm" href="/pm">"#, "")));
    endpoint(&host, "/").await;
    let requests = host.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].method, "GET");
    assert!(requests[0].header("accept").unwrap().contains("text/html"));
    assert!(
        requests[0]
            .header("user-agent")
            .unwrap()
            .starts_with("indiepm/")
    );
    assert!(requests[0].header("authorization").is_none());
}

// ---------------------------------------------------------------------------
// limits: 1 MiB, 10 s, 5 redirects, schemes

/// HTML padding of exactly `len` bytes that holds no element of interest.
fn padding(len: usize) -> String {
    let mut s = String::with_capacity(len);
    while s.len() + 12 <= len {
        s.push_str("<p>lorem</p>");
    }
    while s.len() < len {
        s.push(' ');
    }
    s
}

#[tokio::test]
async fn endpoint_past_one_mib_is_not_found() {
    let host = FakeHost::start();
    let head = "<!doctype html><html><head><title>big</title></head><body>";
    let tag = r#"<a rel="pm" href="/edge">"#;

    // The tag's last byte is the last byte within the cap: found.
    let before = MAX_BODY - head.len() - tag.len();
    let body = format!("{head}{}{tag}{}", padding(before), padding(4096));
    assert_eq!(body.find(tag).unwrap() + tag.len(), MAX_BODY);
    host.route("/within", Route::html(body));
    assert_eq!(
        endpoint(&host, "/within").await,
        Some(host.url("/edge").to_string())
    );

    // One byte later the tag is cut by the cap: not found.
    let body = format!("{head}{}{tag}{}", padding(before + 1), padding(4096));
    host.route("/cut", Route::html(body));
    assert_eq!(endpoint(&host, "/cut").await, None);

    // Far past the cap: not found, and only 1 MiB was read.
    let body = format!(
        "{head}{}<link rel=\"pm\" href=\"/late\">",
        padding(2 * MAX_BODY)
    );
    host.route("/late", Route::html(body));
    assert_eq!(endpoint(&host, "/late").await, None);
    let got = open().get(&host.url("/late"), "*/*").await.unwrap();
    assert_eq!(got.body.len(), MAX_BODY);
    assert!(got.truncated);
}

#[tokio::test]
async fn endpoint_before_one_mib_in_a_huge_page_is_found() {
    let host = FakeHost::start();
    let body = page(r#"<link rel="pm" href="/early">"#, &padding(3 * MAX_BODY));
    host.route("/", Route::html(body));
    assert_eq!(
        endpoint(&host, "/").await,
        Some(host.url("/early").to_string())
    );
}

#[tokio::test]
async fn endless_body_is_cut_at_one_mib() {
    let host = FakeHost::start();
    host.route(
        "/",
        Route::html("<!doctype html><head><link rel=pm href=/pm></head><body>")
            .endless(padding(8192)),
    );
    let started = Instant::now();
    assert_eq!(
        endpoint(&host, "/").await,
        Some(host.url("/pm").to_string())
    );
    let got = open().get(&host.url("/"), "*/*").await.unwrap();
    assert_eq!(got.body.len(), MAX_BODY);
    assert!(got.truncated);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the cap, not the timeout, ended the reads"
    );
}

#[tokio::test]
async fn body_of_exactly_one_mib_is_not_truncated() {
    let host = FakeHost::start();
    host.route("/", Route::html(padding(MAX_BODY)));
    let got = open().get(&host.url("/"), "*/*").await.unwrap();
    assert_eq!(got.body.len(), MAX_BODY);
    assert!(!got.truncated);
}

/// The only slow test: 10 s in all, redirects included. Two hops answer
/// after 4 s each, the third never answers; a per-request timeout would
/// take 18 s, the protocol's total takes 10.
#[tokio::test]
async fn ten_seconds_in_all() {
    let host = FakeHost::start();
    host.route(
        "/",
        Route::redirect(302, "/two").delay(Duration::from_secs(4)),
    );
    host.route(
        "/two",
        Route::redirect(302, "/never").delay(Duration::from_secs(4)),
    );
    host.route("/never", Route::never());
    let started = Instant::now();
    let result = discover(&open(), &host.url("/")).await;
    let took = started.elapsed();
    match result {
        Err(DiscoverError::Fetch(FetchError::Timeout(_))) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(
        took >= Duration::from_millis(9500) && took < Duration::from_secs(13),
        "took {took:?}"
    );
    assert_eq!(host.hits("/never"), 1, "the third hop was asked");
}

#[tokio::test]
async fn five_redirects_succeed_six_fail() {
    let host = FakeHost::start();
    // /r0 → /r1 → … → /r5 → /page: six redirects from /r0, five from /r1.
    for i in 0..=MAX_REDIRECTS {
        let next = if i == MAX_REDIRECTS {
            "/page".to_string()
        } else {
            format!("/r{}", i + 1)
        };
        let status = [301, 302, 303, 307, 308][i % 5];
        host.route(&format!("/r{i}"), Route::redirect(status, &next));
    }
    host.route(
        "/page",
        Route::html(page(r#"<link rel="pm" href="/pm">"#, "")),
    );

    assert_eq!(
        endpoint(&host, "/r1").await,
        Some(host.url("/pm").to_string())
    );
    match discover(&open(), &host.url("/r0")).await {
        Err(DiscoverError::Fetch(FetchError::TooManyRedirects(_))) => {}
        other => panic!("expected too many redirects, got {other:?}"),
    }
    assert_eq!(host.hits("/page"), 1, "the sixth redirect is not followed");
}

#[tokio::test]
async fn redirect_loop_fails() {
    let host = FakeHost::start();
    host.route("/a", Route::redirect(302, "/b"));
    host.route("/b", Route::redirect(302, "/a"));
    match discover(&open(), &host.url("/a")).await {
        Err(DiscoverError::Fetch(FetchError::TooManyRedirects(_))) => {}
        other => panic!("expected too many redirects, got {other:?}"),
    }
}

#[tokio::test]
async fn redirect_to_another_scheme_is_refused() {
    let host = FakeHost::start();
    for (i, location) in ["file:///etc/passwd", "ftp://example.org/", "gopher://x/"]
        .iter()
        .enumerate()
    {
        let path = format!("/r{i}");
        host.route(&path, Route::redirect(302, location));
        match discover(&open(), &host.url(&path)).await {
            Err(DiscoverError::Fetch(FetchError::Scheme(_))) => {}
            other => panic!("expected a scheme refusal for {location}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn redirect_without_location_is_an_error() {
    let host = FakeHost::start();
    host.route("/", Route::status(302));
    match discover(&open(), &host.url("/")).await {
        Err(DiscoverError::Fetch(FetchError::BadRedirect(_))) => {}
        other => panic!("expected a bad redirect, got {other:?}"),
    }
}

#[tokio::test]
async fn non_http_identity_is_refused_without_a_request() {
    for url in ["ftp://127.0.0.1/", "file:///etc/passwd", "data:text/html,x"] {
        let url = Url::parse(url).unwrap();
        match open().get(&url, "*/*").await {
            Err(FetchError::Scheme(_)) => {}
            other => panic!("expected a scheme refusal for {url}, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// the private-address guard

#[tokio::test]
async fn guard_refuses_a_loopback_ip_literal() {
    let host = FakeHost::start();
    host.route("/", Route::html(page(r#"<link rel="pm" href="/pm">"#, "")));
    assert_discovery_forbidden(discover(&guarded(), &host.url("/")).await);
    assert_forbidden(guarded().get(&host.url("/"), "*/*").await);
    assert!(host.requests().is_empty(), "nothing reached the host");
    // The same host with the guard lifted.
    assert_eq!(
        endpoint(&host, "/").await,
        Some(host.url("/pm").to_string())
    );
}

#[tokio::test]
async fn guard_refuses_other_spellings_of_loopback() {
    // All of these are 127.0.0.1 (or the local host) to the URL parser or
    // the kernel; a host on 127.0.0.1 must never see a request.
    let host = FakeHost::start_on("127.0.0.1:0".parse().unwrap());
    host.route("/", Route::html(page(r#"<link rel="pm" href="/pm">"#, "")));
    let port = host.addr().port();
    let fetcher = guarded();
    for spelling in [
        "127.1",
        "2130706433",
        "0x7f000001",
        "0x7f.0.0.1",
        "0177.0.0.1",
        "127.000.000.001",
        "0.0.0.0",
        "0",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "[::127.0.0.1]",
        "[0:0:0:0:0:ffff:127.0.0.1]",
    ] {
        let url = Url::parse(&format!("http://{spelling}:{port}/")).unwrap();
        assert_forbidden(fetcher.get(&url, "*/*").await);
    }
    assert!(host.requests().is_empty(), "nothing reached the host");
}

#[tokio::test]
async fn guard_refuses_private_and_special_ranges_without_connecting() {
    let fetcher = guarded();
    let started = Instant::now();
    for host in [
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "224.0.0.1",
        "255.255.255.255",
        "[::]",
        "[fe80::1]",
        "[fc00::1]",
        "[fd12:3456::1]",
        "[ff02::1]",
        "[::ffff:10.0.0.1]",
        "[::ffff:169.254.169.254]",
        "[64:ff9b::a9fe:a9fe]",
    ] {
        let url = Url::parse(&format!("http://{host}/")).unwrap();
        assert_forbidden(fetcher.get(&url, "*/*").await);
        assert_forbidden(fetcher.post_form(&url, &[("a", "b")], None).await);
    }
    // A connection attempt to most of these would hang until the timeout.
    assert!(started.elapsed() < Duration::from_secs(8));
}

#[tokio::test]
async fn guard_refuses_a_name_that_resolves_to_loopback() {
    let host = FakeHost::start_on("127.0.0.1:0".parse().unwrap());
    host.route("/", Route::html(page(r#"<link rel="pm" href="/pm">"#, "")));
    let url = Url::parse(&format!("http://localhost:{}/", host.addr().port())).unwrap();
    assert_discovery_forbidden(discover(&guarded(), &url).await);
    assert_forbidden(guarded().post_form(&url, &[("a", "b")], None).await);
    assert!(host.requests().is_empty(), "nothing reached the host");
    // Lifted, the same name works and the endpoint is on that name.
    let found = discover(&open(), &url).await.unwrap().unwrap();
    assert_eq!(
        found.as_str(),
        format!("http://localhost:{}/pm", host.addr().port())
    );
}

#[tokio::test]
async fn guard_refuses_ipv6_loopback() {
    let host = FakeHost::start_on("[::1]:0".parse().unwrap());
    host.route("/", Route::html(page(r#"<link rel="pm" href="/pm">"#, "")));
    let url = host.url("/");
    assert_eq!(url.host_str(), Some("[::1]"));
    assert_discovery_forbidden(discover(&guarded(), &url).await);
    assert!(host.requests().is_empty(), "nothing reached the host");
    assert_eq!(
        endpoint(&host, "/").await,
        Some(host.url("/pm").to_string())
    );
}

#[tokio::test]
async fn guard_refuses_ipv4_mapped_loopback() {
    let host = FakeHost::start();
    host.route("/", Route::html(page(r#"<link rel="pm" href="/pm">"#, "")));
    let IpAddr::V4(v4) = host.addr().ip() else {
        unreachable!("fake hosts are on IPv4 loopback")
    };
    let mapped = format!("http://[::ffff:{v4}]:{}/", host.addr().port());
    let url = Url::parse(&mapped).unwrap();
    assert_discovery_forbidden(discover(&guarded(), &url).await);
    assert!(host.requests().is_empty(), "nothing reached the host");
    // Lifted, the mapped form reaches the same IPv4 host.
    let found = discover(&open(), &url).await.unwrap().unwrap();
    assert_eq!(found.path(), "/pm");
    assert_eq!(host.hits("/"), 1);
}

/// The guard holds on every hop: a first host the guard lets through (made
/// exempt, standing in for a public site) redirects to loopback in several
/// spellings, and each hop is refused before anything is sent to it.
#[tokio::test]
async fn guard_refuses_a_redirect_hop_to_loopback() {
    let public = FakeHost::start();
    let inner = FakeHost::start();
    let inner_localhost = FakeHost::start_on("127.0.0.1:0".parse().unwrap());
    let inner_v6 = FakeHost::start_on("[::1]:0".parse().unwrap());
    for h in [&inner, &inner_localhost, &inner_v6] {
        h.route("/", Route::html(page(r#"<link rel="pm" href="/pm">"#, "")));
    }
    let fetcher = Fetcher::with_exempt_addresses([public.addr().ip()]);
    assert!(!fetcher.allows_private());

    // Sanity: the first hop alone passes the guard.
    public.route(
        "/ok",
        Route::html(page(r#"<link rel="pm" href="/pm">"#, "")),
    );
    let found = discover(&fetcher, &public.url("/ok")).await.unwrap();
    assert_eq!(found, Some(public.url("/pm")));
    // And a redirect that stays on the allowed host is followed.
    public.route("/stay", Route::redirect(301, "/ok"));
    let found = discover(&fetcher, &public.url("/stay")).await.unwrap();
    assert_eq!(found, Some(public.url("/pm")));

    let IpAddr::V4(inner_v4) = inner.addr().ip() else {
        unreachable!("fake hosts are on IPv4 loopback")
    };
    let hops = [
        inner.url("/").to_string(),
        format!("http://localhost:{}/", inner_localhost.addr().port()),
        format!("http://[::1]:{}/", inner_v6.addr().port()),
        format!("http://[::ffff:{inner_v4}]:{}/", inner.addr().port()),
    ];
    for (i, hop) in hops.iter().enumerate() {
        for status in [301, 302, 307, 308] {
            let path = format!("/to-{i}-{status}");
            public.route(&path, Route::redirect(status, hop));
            assert_discovery_forbidden(discover(&fetcher, &public.url(&path)).await);
        }
    }
    // Also after several allowed hops.
    public.route("/chain1", Route::redirect(302, "/chain2"));
    public.route("/chain2", Route::redirect(302, &hops[0]));
    assert_discovery_forbidden(discover(&fetcher, &public.url("/chain1")).await);

    for h in [&inner, &inner_localhost, &inner_v6] {
        assert!(h.requests().is_empty(), "a forbidden hop got a request");
    }
    assert_eq!(public.hits("/chain2"), 1);
}

#[tokio::test]
async fn exemption_is_exact() {
    // Exempting one loopback address exempts neither its neighbours nor
    // `localhost`.
    let exempt = FakeHost::start();
    let neighbour = FakeHost::start();
    let fetcher = Fetcher::with_exempt_addresses([exempt.addr().ip()]);
    exempt.route("/", Route::html(page("", "")));
    assert!(fetcher.get(&exempt.url("/"), "*/*").await.is_ok());
    assert_forbidden(fetcher.get(&neighbour.url("/"), "*/*").await);
    assert!(neighbour.requests().is_empty());
}

#[tokio::test]
async fn guard_applies_to_posts_too() {
    let host = FakeHost::start();
    host.route(
        "/pm",
        Route::json(&serde_json::json!({"status": "accepted"})),
    );
    let url = host.url("/pm");
    let g = guarded();
    assert_forbidden(g.post_form(&url, &[("action", "notify")], None).await);
    assert_forbidden(g.post_json(&url, &serde_json::json!({})).await);
    assert_forbidden(g.get_with_bearer(&url, "token").await);
    assert!(host.requests().is_empty(), "nothing reached the host");
}

// ---------------------------------------------------------------------------
// POSTs never follow a redirect (PROTOCOL.md, "Requests")

#[tokio::test]
async fn post_form_never_follows_a_redirect() {
    let endpoint_host = FakeHost::start();
    let elsewhere = FakeHost::start();
    elsewhere.route(
        "/steal",
        Route::json(&serde_json::json!({"status": "created"})),
    );
    let fetcher = open();
    for status in [301, 302, 303, 307, 308] {
        let path = format!("/pm/{status}");
        endpoint_host.route(
            &path,
            Route::redirect(status, elsewhere.url("/steal").as_str()),
        );
        let got = fetcher
            .post_form(
                &endpoint_host.url(&path),
                &[("action", "message"), ("content", "secret & private = yes")],
                Some("tok_abcdefghijklmnopqrstuv"),
            )
            .await
            .unwrap();
        assert_eq!(got.status.as_u16(), status, "the redirect is the answer");
        assert_eq!(got.url, endpoint_host.url(&path));
    }
    assert!(
        elsewhere.requests().is_empty(),
        "the redirect target got a request"
    );
    let sent = endpoint_host.requests();
    assert_eq!(sent.len(), 5);
    for r in &sent {
        assert_eq!(r.method, "POST");
        assert_eq!(
            r.header("content-type"),
            Some("application/x-www-form-urlencoded")
        );
        assert_eq!(
            r.header("authorization"),
            Some("Bearer tok_abcdefghijklmnopqrstuv")
        );
        assert_eq!(
            r.form(),
            vec![
                ("action".to_string(), "message".to_string()),
                ("content".to_string(), "secret & private = yes".to_string()),
            ]
        );
    }
}

#[tokio::test]
async fn post_form_keeps_the_query_and_reads_the_answer() {
    let host = FakeHost::start();
    host.route(
        "/pm",
        Route::status(202)
            .header("content-type", "application/json")
            .body(r#"{"status":"accepted"}"#),
    );
    let url = host.url("/pm?site=alice");
    let got = open()
        .post_form(&url, &[("action", "notify")], None)
        .await
        .unwrap();
    assert_eq!(got.status.as_u16(), 202);
    assert_eq!(&got.body[..], br#"{"status":"accepted"}"#);
    let sent = host.requests();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].query.as_deref(), Some("site=alice"));
    assert!(sent[0].header("authorization").is_none());
    assert_eq!(sent[0].form_field("action").as_deref(), Some("notify"));
}

#[tokio::test]
async fn post_json_and_bearer_get_never_follow_a_redirect() {
    let host = FakeHost::start();
    let elsewhere = FakeHost::start();
    host.route("/hook", Route::redirect(307, elsewhere.url("/x").as_str()));
    host.route("/token", Route::redirect(302, elsewhere.url("/x").as_str()));
    let fetcher = open();
    let got = fetcher
        .post_json(&host.url("/hook"), &serde_json::json!({"a": 1}))
        .await
        .unwrap();
    assert_eq!(got.status.as_u16(), 307);
    let got = fetcher
        .get_with_bearer(&host.url("/token"), "bearer-token")
        .await
        .unwrap();
    assert_eq!(got.status.as_u16(), 302);
    assert!(elsewhere.requests().is_empty());
    let hook = &host.requests_to("/hook")[0];
    assert_eq!(hook.method, "POST");
    assert_eq!(hook.header("content-type"), Some("application/json"));
    assert_eq!(&hook.body[..], br#"{"a":1}"#);
    let token = &host.requests_to("/token")[0];
    assert_eq!(token.header("authorization"), Some("Bearer bearer-token"));
}

// ---------------------------------------------------------------------------
// the discovery cache

#[tokio::test]
async fn cache_reuses_a_result_until_forgotten() {
    let host = FakeHost::start();
    host.route("/", Route::html(page(r#"<link rel="pm" href="/pm">"#, "")));
    let cache = DiscoveryCache::default();
    let fetcher = open();
    let url = host.url("/");
    for _ in 0..3 {
        let found = cache.discover(&fetcher, &url).await.unwrap();
        assert_eq!(found, Some(host.url("/pm")));
    }
    assert_eq!(host.hits("/"), 1, "cached");
    cache.forget(&url);
    host.route(
        "/",
        Route::html(page(r#"<link rel="pm" href="/new-pm">"#, "")),
    );
    let found = cache.discover(&fetcher, &url).await.unwrap();
    assert_eq!(found, Some(host.url("/new-pm")));
    assert_eq!(host.hits("/"), 2);
    // Uncached discovery always fetches afresh.
    discover(&fetcher, &url).await.unwrap();
    assert_eq!(host.hits("/"), 3);
}

#[tokio::test]
async fn cache_does_not_keep_errors() {
    let host = FakeHost::start();
    host.route("/", Route::status(503));
    let cache = DiscoveryCache::default();
    let fetcher = open();
    assert!(cache.discover(&fetcher, &host.url("/")).await.is_err());
    host.route("/", Route::html(page(r#"<link rel="pm" href="/pm">"#, "")));
    let found = cache.discover(&fetcher, &host.url("/")).await.unwrap();
    assert_eq!(found, Some(host.url("/pm")));
}

// ---------------------------------------------------------------------------
// the binary: `indiepm discover URL [--allow-private]`

fn indiepm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_indiepm"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run indiepm")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Exit 2 with exactly one line on stderr; returns that line.
fn assert_one_error_line(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(2), "stderr: {}", text(&out.stderr));
    assert!(out.stdout.is_empty(), "stdout: {}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line on stderr: {stderr:?}");
    assert!(stderr.ends_with('\n'));
    stderr.trim_end().to_string()
}

#[test]
fn cli_prints_the_endpoint_and_exits_0() {
    let host = FakeHost::start();
    host.route(
        "/",
        Route::html(page(r#"<link rel="pm" href="/pm?site=me">"#, "")),
    );
    let out = indiepm(&["discover", host.url("/").as_str(), "--allow-private"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{}\n", host.url("/pm?site=me")));
    // The identity URL is taken as given; the flag may come first.
    let out = indiepm(&["discover", "--allow-private", &host.origin()]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{}\n", host.url("/pm?site=me")));
}

#[test]
fn cli_exits_1_without_an_endpoint() {
    let host = FakeHost::start();
    host.route(
        "/",
        Route::html(page(r#"<link rel="pm-other" href="/x">"#, "")),
    );
    let out = indiepm(&["discover", host.url("/").as_str(), "--allow-private"]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", text(&out.stderr));
    assert!(out.stdout.is_empty(), "stdout: {}", text(&out.stdout));
}

#[test]
fn cli_exits_2_on_an_unreachable_host() {
    // A port that was just free and nobody listens on.
    let listener = std::net::TcpListener::bind(next_addr()).unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    drop(listener);
    let url = format!("http://{addr}/");
    let line = assert_one_error_line(&indiepm(&["discover", &url, "--allow-private"]));
    assert!(line.contains(&addr.to_string()), "names the URL: {line}");
    assert!(line.contains("cannot connect"), "says what failed: {line}");
}

#[test]
fn cli_exits_2_on_a_malformed_url() {
    for bad in [
        "not a url",
        "http://",
        "ftp://example.org/",
        "mailto:a@b.example",
        "",
    ] {
        let line = assert_one_error_line(&indiepm(&["discover", bad]));
        assert!(line.starts_with("indiepm: "), "{bad:?}: {line}");
    }
}

#[test]
fn cli_refuses_loopback_without_allow_private() {
    let host = FakeHost::start();
    host.route("/", Route::html(page(r#"<link rel="pm" href="/pm">"#, "")));
    let line = assert_one_error_line(&indiepm(&["discover", host.url("/").as_str()]));
    assert!(line.contains("private"), "mentions private: {line}");
    let localhost = FakeHost::start_on("127.0.0.1:0".parse().unwrap());
    let url = format!("http://localhost:{}/", localhost.addr().port());
    let line = assert_one_error_line(&indiepm(&["discover", &url]));
    assert!(line.contains("private"), "mentions private: {line}");
    assert!(host.requests().is_empty());
    assert!(localhost.requests().is_empty());
}

#[test]
fn cli_exits_2_on_an_error_status() {
    let host = FakeHost::start();
    host.route("/", Route::status(500));
    let line = assert_one_error_line(&indiepm(&[
        "discover",
        host.url("/").as_str(),
        "--allow-private",
    ]));
    assert!(line.contains("500"), "{line}");
}

// ---------------------------------------------------------------------------
// a static site, as a web host serves it

#[tokio::test]
async fn static_site_served_from_a_folder() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("index.html"),
        page(r#"<link rel="pm" href="/pm/">"#, ""),
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("about")).unwrap();
    std::fs::write(
        dir.path().join("about/index.html"),
        page(r#"<link rel="pm" href="contact">"#, ""),
    )
    .unwrap();
    let site = common::serve_dir(next_addr(), dir.path());
    assert_eq!(
        endpoint(&site, "/").await,
        Some(site.url("/pm/").to_string())
    );
    // `/about` is redirected to `/about/`, and the relative href follows.
    assert_eq!(
        endpoint(&site, "/about").await,
        Some(site.url("/about/contact").to_string())
    );
    // Routes override the folder: a host that adds a Link header.
    site.route(
        "/",
        Route::html(page("", "")).header("link", "<https://pm.example/x>; rel=pm"),
    );
    assert_eq!(
        endpoint(&site, "/").await,
        Some("https://pm.example/x".to_string())
    );
    match discover(&open(), &site.url("/missing/")).await {
        Err(DiscoverError::Status(_, 404)) => {}
        other => panic!("expected a 404, got {other:?}"),
    }
}
