//! The page shell, the navigation bar and the stylesheet.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use maud::{DOCTYPE, Markup, html};

use crate::server::Body;

/// The signed-in navigation bar.
pub struct Nav<'a> {
    pub me: &'a str,
    pub csrf: &'a str,
    /// `inbox`, `compose`, `outbox` or `blocked`.
    pub active: &'static str,
}

/// A whole page: head, navigation (when signed in), content.
pub fn page(title: &str, nav: Option<Nav>, content: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="referrer" content="no-referrer";
                title { (title) " · indiepm" }
                link rel="stylesheet" href="/ui/style.css";
                link rel="redirect_uri" href="/ui/indieauth/callback";
            }
            body {
                header.top {
                    div.bar {
                        a.brand href="/ui/" { span.logo { "✉" } " indiepm" }
                        @if let Some(nav) = &nav {
                            nav {
                                @for (key, href, label) in [
                                    ("inbox", "/ui/", "Inbox"),
                                    ("compose", "/ui/compose", "Compose"),
                                    ("outbox", "/ui/outbox", "Outbox"),
                                    ("blocked", "/ui/blocked", "Blocked"),
                                ] {
                                    a href=(href) class=[(nav.active == key).then_some("active")] { (label) }
                                }
                            }
                            div.who {
                                span.me title=(nav.me) { (super::short_identity(nav.me)) }
                                form.inline method="post" action="/ui/signout" {
                                    input type="hidden" name="csrf" value=(nav.csrf);
                                    button.link type="submit" { "Sign out" }
                                }
                            }
                        }
                    }
                }
                main { (content) }
            }
        }
    }
}

/// A page that moves on to `target` by itself (a meta refresh, no script)
/// and offers a link in case it does not.
pub fn bounce(target: &str, title: &str) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="referrer" content="no-referrer";
                meta http-equiv="refresh" content=(format!("0;url={target}"));
                title { (title) " · indiepm" }
                link rel="stylesheet" href="/ui/style.css";
            }
            body {
                main {
                    div.signin {
                        h1 { (title) }
                        p { a href=(target) { "Continue" } }
                    }
                }
            }
        }
    }
}

pub fn error(status: StatusCode, text: &str) -> Markup {
    let title = status.canonical_reason().unwrap_or("Error");
    page(
        title,
        None,
        html! {
            div.signin {
                h1 { (title) }
                p { (text) }
                p { a href="/ui/" { "Back to the inbox" } }
            }
        },
    )
}

/// `GET /ui/style.css`.
pub fn stylesheet() -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(STYLE.as_bytes())));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/css; charset=utf-8"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    r
}

const STYLE: &str = r#":root {
  --fg: #1d2330; --muted: #6b7280; --line: #e3e6eb; --bg: #f6f7f9; --card: #fff;
  --accent: #2f5bd3; --accent-soft: #e8eefc; --ok: #17803d; --warn: #a15c00; --bad: #b42318;
  color-scheme: light;
}
* { box-sizing: border-box; }
html { font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", sans-serif; color: var(--fg); background: var(--bg); }
body { margin: 0; }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
header.top { background: var(--card); border-bottom: 1px solid var(--line); }
.bar { max-width: 56rem; margin: 0 auto; padding: .6rem 1rem; display: flex; align-items: center; gap: 1.5rem; flex-wrap: wrap; }
.brand { font-weight: 700; color: var(--fg); font-size: 1.1rem; }
.logo { color: var(--accent); }
nav { display: flex; gap: .25rem; flex: 1; }
nav a { padding: .3rem .7rem; border-radius: .4rem; color: var(--fg); }
nav a.active, nav a:hover { background: var(--accent-soft); color: var(--accent); text-decoration: none; }
.who { display: flex; align-items: center; gap: .75rem; color: var(--muted); font-size: .9rem; }
main { max-width: 56rem; margin: 1.5rem auto; padding: 0 1rem; }
h1 { font-size: 1.5rem; margin: 0 0 1rem; }
h2 { font-size: 1.15rem; margin: 1.5rem 0 .75rem; }
.muted { color: var(--muted); }
.hidden { display: none; }
.notice, .error { padding: .6rem .9rem; border-radius: .4rem; margin: 0 0 1rem; }
.notice { background: #e7f6ec; color: var(--ok); }
.error { background: #fdecea; color: var(--bad); }
.card { background: var(--card); border: 1px solid var(--line); border-radius: .6rem; padding: 1rem 1.25rem; margin-bottom: 1rem; }
form.inline { display: inline; margin: 0; }
.card > p { margin-top: 0; }
.card > label:first-of-type { margin-top: 0; }
label { display: block; font-weight: 600; font-size: .9rem; margin: .75rem 0 .3rem; }
input[type=text], input[type=url], input[type=password], select, textarea {
  width: 100%; font: inherit; padding: .5rem .6rem; border: 1px solid #c9ced6; border-radius: .4rem; background: #fff; color: var(--fg);
}
textarea { min-height: 10rem; resize: vertical; }
input:focus, textarea:focus, select:focus { outline: 2px solid var(--accent-soft); border-color: var(--accent); }
button { font: inherit; margin-top: .9rem; padding: .5rem 1.1rem; border-radius: .4rem; border: 1px solid var(--accent); background: var(--accent); color: #fff; cursor: pointer; }
button:hover { filter: brightness(1.08); }
button.secondary { background: #fff; color: var(--accent); }
button.danger { background: #fff; color: var(--bad); border-color: #e8b4ae; }
button.link { margin: 0; padding: 0; border: 0; background: none; color: var(--accent); }
.signin { max-width: 26rem; margin: 3rem auto; }
.toolbar { display: flex; justify-content: space-between; align-items: baseline; }
ul.messages { list-style: none; margin: 0; padding: 0; background: var(--card); border: 1px solid var(--line); border-radius: .6rem; overflow: hidden; }
ul.messages li + li { border-top: 1px solid var(--line); }
ul.messages a.row { display: grid; grid-template-columns: 2.5rem 11rem 1fr auto; gap: .9rem; align-items: center; padding: .7rem 1rem; color: var(--fg); }
ul.messages a.row:hover { background: #fafbfc; text-decoration: none; }
.row .who { color: var(--fg); display: block; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.row .gist { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.row .preview { color: var(--muted); }
.row time { color: var(--muted); font-size: .85rem; white-space: nowrap; }
li.unread .who, li.unread .subject { font-weight: 700; }
.dot { display: inline-block; width: .55rem; height: .55rem; border-radius: 50%; background: var(--accent); margin-right: .35rem; vertical-align: middle; }
.avatar { width: 2.5rem; height: 2.5rem; border-radius: 50%; object-fit: cover; display: inline-flex; align-items: center; justify-content: center; background: var(--accent-soft); color: var(--accent); font-weight: 700; overflow: hidden; }
.empty { padding: 2rem; text-align: center; color: var(--muted); }
.pager { display: flex; justify-content: space-between; margin-top: .75rem; }
.thread { display: flex; flex-direction: column; gap: .75rem; }
article.msg { background: var(--card); border: 1px solid var(--line); border-radius: .6rem; padding: 1rem 1.25rem; }
article.msg.mine { background: #fbfcff; border-left: 3px solid var(--accent); }
article.msg.current { box-shadow: 0 0 0 2px var(--accent-soft); }
article.msg header { display: flex; gap: .75rem; align-items: center; margin-bottom: .5rem; }
article.msg header .meta { flex: 1; line-height: 1.3; }
article.msg header .meta small { color: var(--muted); }
article.msg h3 { margin: .25rem 0 .5rem; font-size: 1.05rem; }
.body { overflow-wrap: anywhere; }
.body > :first-child { margin-top: 0; }
.body > :last-child { margin-bottom: 0; }
.nowrap { white-space: nowrap; }
.body h1, .body h2, .body h3, .body h4 { font-size: 1.05rem; margin: 1rem 0 .5rem; }
.body pre, .body code { background: #f1f3f6; border-radius: .3rem; font-size: .9em; }
.body pre { padding: .6rem .8rem; overflow-x: auto; white-space: pre-wrap; }
.body blockquote { margin: .5rem 0; padding-left: .9rem; border-left: 3px solid var(--line); color: var(--muted); }
.body img { max-width: 100%; }
.badge { display: inline-block; font-size: .75rem; font-weight: 600; padding: .1rem .5rem; border-radius: 1rem; background: #eef0f3; color: var(--muted); text-transform: uppercase; letter-spacing: .03em; }
.badge.delivered { background: #e7f6ec; color: var(--ok); }
.badge.notified { background: var(--accent-soft); color: var(--accent); }
.badge.queued { background: #fff4e0; color: var(--warn); }
.badge.failed { background: #fdecea; color: var(--bad); }
table { width: 100%; border-collapse: separate; border-spacing: 0; background: var(--card); border: 1px solid var(--line); border-radius: .6rem; overflow: hidden; }
th, td { text-align: left; padding: .6rem .8rem; border-top: 1px solid var(--line); vertical-align: top; font-size: .92rem; }
th { background: #fafbfc; border-top: 0; font-size: .8rem; text-transform: uppercase; color: var(--muted); letter-spacing: .03em; }
td.err { color: var(--bad); max-width: 16rem; overflow-wrap: anywhere; }
.actions { display: flex; gap: .75rem; align-items: center; }
.actions button { margin-top: 0; }
dl.delivery { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; margin: .5rem 0 0; font-size: .9rem; }
dl.delivery dt { color: var(--muted); }
dl.delivery dd { margin: 0; overflow-wrap: anywhere; }
@media (max-width: 40rem) {
  ul.messages a.row { grid-template-columns: 2.5rem 1fr; }
  .row .gist, .row time { grid-column: 2; }
}
"#;
