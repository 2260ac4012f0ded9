//! The inbox (received message files, newest first, unread marked), a
//! message page with its conversation, and the pieces the outbox shares:
//! conversation items, threading by `in-reply-to`, and their rendering.

use std::collections::HashSet;

use chrono::{DateTime, FixedOffset};
use hyper::{Response, StatusCode};
use maud::{Markup, PreEscaped, html};

use super::{Ctx, Form, compose, error_page, fmt_ms, fmt_time, html as page, layout, not_found};
use crate::app::{App, now_ms};
use crate::config::SiteConfig;
use crate::inbox::{StoredMessage, list_messages, read_message};
use crate::server::Body;
use crate::store::{OutMessage, Store};

/// Inbox rows per page.
const PAGE: usize = 50;
/// Most messages shown in one conversation (the latest ones).
const MAX_THREAD: usize = 200;

/// One message of a conversation, received or sent.
#[derive(Debug, Clone)]
pub struct Item {
    pub id: String,
    pub in_reply_to: Option<String>,
    pub sender: String,
    pub recipient: String,
    pub published: DateTime<FixedOffset>,
    pub name: Option<String>,
    pub body: String,
    pub sender_name: Option<String>,
    pub sender_photo: Option<String>,
    pub kind: Kind,
}

#[derive(Debug, Clone)]
pub enum Kind {
    /// In the inbox folder, by file name.
    Received { file: String },
    /// Sent: in the outbox (with its delivery state) or only in the sent folder.
    Sent { out: Option<Box<OutMessage>> },
}

impl Item {
    fn received(m: StoredMessage) -> Item {
        let file = m
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Item {
            id: m.id,
            in_reply_to: m.in_reply_to,
            sender: m.sender,
            recipient: m.recipient,
            published: m.published,
            name: m.name,
            body: m.body,
            sender_name: m.sender_name,
            sender_photo: m.sender_photo,
            kind: Kind::Received { file },
        }
    }

    fn sent_copy(m: StoredMessage) -> Item {
        Item {
            kind: Kind::Sent { out: None },
            ..Item::received(m)
        }
    }

    fn outgoing(m: OutMessage) -> Item {
        Item {
            id: m.id.clone(),
            in_reply_to: m.in_reply_to.clone(),
            sender: m.sender.clone(),
            recipient: m.recipient.clone(),
            published: DateTime::parse_from_rfc3339(&m.published)
                .ok()
                .or_else(|| DateTime::from_timestamp_millis(m.created_ms).map(|t| t.fixed_offset()))
                .unwrap_or_default(),
            name: m.name.clone(),
            body: m.content.clone(),
            sender_name: None,
            sender_photo: None,
            kind: Kind::Sent {
                out: Some(Box::new(m)),
            },
        }
    }

    pub fn is_mine(&self) -> bool {
        matches!(self.kind, Kind::Sent { .. })
    }

    /// Where this message's page is.
    pub fn href(&self) -> Option<String> {
        match &self.kind {
            Kind::Received { file } => Some(format!("/ui/inbox/{file}")),
            Kind::Sent { out: Some(m) } => Some(format!("/ui/outbox/{}", m.id)),
            Kind::Sent { out: None } => None,
        }
    }
}

/// A file name as the inbox writes them: no path, no dot file, `.md`.
pub fn valid_file_name(name: &str) -> bool {
    name.len() <= 255
        && name.ends_with(".md")
        && !name.starts_with(['.', '_'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Every message of `me`'s conversations: received files, the outbox, and
/// sent-folder copies the outbox does not hold. Reads files: call it off
/// the async threads.
pub fn all_items(store: &Store, site: &SiteConfig, me: &str) -> Vec<Item> {
    let mut items = Vec::new();
    for path in list_messages(&site.inbox_dir()).unwrap_or_default() {
        if let Ok(m) = read_message(&path)
            && m.recipient == me
        {
            items.push(Item::received(m));
        }
    }
    let outbox = store.outbox(me).unwrap_or_default();
    let known: HashSet<String> = outbox.iter().map(|m| m.id.clone()).collect();
    items.extend(outbox.into_iter().map(Item::outgoing));
    for path in list_messages(&site.sent_dir()).unwrap_or_default() {
        if let Ok(m) = read_message(&path)
            && m.sender == me
            && !known.contains(&m.id)
        {
            items.push(Item::sent_copy(m));
        }
    }
    items
}

/// The conversation of `items[start]`: every message linked to it through
/// `in-reply-to`, either way, oldest first (the latest [`MAX_THREAD`]).
pub fn thread(items: &[Item], start: usize) -> Vec<usize> {
    let Some(first) = items.get(start) else {
        return Vec::new();
    };
    let mut ids: HashSet<&str> = HashSet::from([first.id.as_str()]);
    if let Some(r) = &first.in_reply_to {
        ids.insert(r);
    }
    loop {
        let before = ids.len();
        for it in items {
            let linked = ids.contains(it.id.as_str())
                || it.in_reply_to.as_deref().is_some_and(|r| ids.contains(r));
            if linked {
                ids.insert(&it.id);
                if let Some(r) = &it.in_reply_to {
                    ids.insert(r);
                }
            }
        }
        if ids.len() == before {
            break;
        }
    }
    let mut member: Vec<usize> = (0..items.len())
        .filter(|&i| ids.contains(items[i].id.as_str()))
        .collect();
    member.sort_by_key(|&i| (items[i].published, i));
    let skip = member.len().saturating_sub(MAX_THREAD);
    member.split_off(skip)
}

/// A round picture of the sender (the copy the server fetched, never the
/// sender's URL), or their initial.
pub fn avatar(app: &App, name: Option<&str>, photo: Option<&str>, identity: &str) -> Markup {
    let data_dir = &app.config.server.data_dir;
    let stored = photo
        .filter(|p| crate::photos::is_stored(data_dir, p))
        .map(|p| format!("/ui/photo/{}", crate::photos::key(p)));
    let label = name
        .map(str::to_string)
        .unwrap_or_else(|| super::short_identity(identity));
    let initial: String = label
        .chars()
        .find(|c| c.is_alphanumeric())
        .map(|c| c.to_uppercase().collect())
        .unwrap_or_else(|| "?".into());
    html! {
        @match stored {
            Some(src) => img.avatar src=(src) alt="";
            None => span.avatar aria-hidden="true" { (initial) }
        }
    }
}

/// A link to an identity's homepage; plain text unless it is an http(s)
/// identity (a file edited by hand could hold anything).
fn identity_link(identity: &str) -> Markup {
    let short = super::short_identity(identity);
    html! {
        @match crate::identity::Identity::parse(identity) {
            Ok(id) => a href=(id.as_str()) rel="noreferrer" { (short) },
            Err(_) => span { (short) },
        }
    }
}

/// The state badge of an outgoing message.
pub fn badge(m: &OutMessage) -> Markup {
    html! { span class=(format!("badge {}", m.state.as_str())) { (m.state.as_str()) } }
}

/// The delivery details of an outgoing message.
pub fn delivery(m: &OutMessage) -> Markup {
    use crate::store::State;
    html! {
        dl.delivery {
            dt { "State" } dd { (badge(m)) }
            dt { "Failed attempts" } dd { (m.attempts) }
            @if let Some(e) = &m.last_error { dt { "Last error" } dd.err { (e) } }
            @if matches!(m.state, State::Queued | State::Notified) {
                dt { "Next attempt" } dd { (fmt_ms(m.next_attempt_ms)) }
            }
            @if let Some(t) = m.notified_ms { dt { "Notified" } dd { (fmt_ms(t)) } }
            @if let Some(t) = m.delivered_ms { dt { "Delivered" } dd { (fmt_ms(t)) } }
            dt { "Flow" } dd { (m.flow) }
        }
    }
}

/// A conversation, with `current` highlighted.
/// A message's subject is shown unless it is the page's title already.
pub fn render_thread(
    app: &App,
    items: &[Item],
    members: &[usize],
    current: usize,
    title: &str,
) -> Markup {
    html! {
        div.thread {
            @for &i in members {
                @let it = &items[i];
                @let mine = it.is_mine();
                @let cls = format!("msg{}{}", if mine { " mine" } else { "" }, if i == current { " current" } else { "" });
                article class=(cls) {
                    header {
                        @if mine {
                            span.avatar aria-hidden="true" { "↗" }
                        } @else {
                            (avatar(app, it.sender_name.as_deref(), it.sender_photo.as_deref(), &it.sender))
                        }
                        div.meta {
                            @if mine {
                                strong { "You" } " → " (identity_link(&it.recipient))
                            } @else {
                                strong { (it.sender_name.clone().unwrap_or_else(|| super::short_identity(&it.sender))) }
                                " " small { (identity_link(&it.sender)) }
                            }
                            br;
                            small { time { (fmt_time(&it.published)) } }
                        }
                        @if let Kind::Sent { out: Some(m) } = &it.kind { (badge(m)) }
                        @if i != current { @if let Some(h) = it.href() { a href=(h) { small { "open" } } } }
                    }
                    @if let Some(n) = it.name.as_ref().filter(|n| n.as_str() != title) { h3 { (n) } }
                    div.body { (PreEscaped(super::markdown::render(&it.body))) }
                }
            }
        }
    }
}

pub async fn list(ctx: &Ctx<'_>, query: &Form) -> Response<Body> {
    let Some(site) = ctx.site().cloned() else {
        return not_found();
    };
    let me = ctx.me().to_string();
    let page_no: usize = query
        .get("page")
        .and_then(|p| p.parse().ok())
        .filter(|p| *p >= 1 && *p < 1_000_000)
        .unwrap_or(1);
    let store = ctx.app.store.clone();
    let me2 = me.clone();
    let loaded = tokio::task::spawn_blocking(move || {
        let paths = list_messages(&site.inbox_dir())?;
        let total = paths.len();
        let rows: Vec<StoredMessage> = paths
            .iter()
            .skip((page_no - 1) * PAGE)
            .take(PAGE)
            .filter_map(|p| read_message(p).ok())
            .filter(|m| m.recipient == me2)
            .collect();
        let read = store.read_marks(&me2).unwrap_or_default();
        Ok::<_, std::io::Error>((rows, total, read))
    })
    .await;
    let (rows, total, read) = match loaded {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot read the inbox folder");
            return error_page(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The inbox folder cannot be read.",
            );
        }
        Err(_) => {
            return error_page(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The inbox could not be read.",
            );
        }
    };
    let notice = match query.get("done").map(String::as_str) {
        Some("blocked") => Some("Sender blocked: their notifications are dropped from now on."),
        Some("unblocked") => Some("Sender unblocked."),
        _ => None,
    };
    let unread = rows
        .iter()
        .filter(|m| !read.contains(&(m.sender.clone(), m.id.clone())))
        .count();
    let body = html! {
        div.toolbar {
            h1 { "Inbox" }
            span.muted { (total) " message" @if total != 1 { "s" } @if unread > 0 { " · " (unread) " unread on this page" } }
        }
        @if let Some(n) = notice { p.notice role="status" { (n) } }
        @if rows.is_empty() {
            div.card.empty { "No messages here yet." }
        } @else {
            ul.messages {
                @for m in &rows {
                    @let is_unread = !read.contains(&(m.sender.clone(), m.id.clone()));
                    @let file = m.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    li class=[is_unread.then_some("unread")] {
                        a.row href=(format!("/ui/inbox/{file}")) {
                            (avatar(ctx.app, m.sender_name.as_deref(), m.sender_photo.as_deref(), &m.sender))
                            span.who {
                                @if is_unread { span.dot {} span.hidden { "unread: " } }
                                (m.sender_name.clone().unwrap_or_else(|| super::short_identity(&m.sender)))
                            }
                            span.gist {
                                span.subject { (m.name.clone().unwrap_or_else(|| "(no subject)".into())) }
                                span.preview { " — " (super::markdown::plain_text(&m.body, 140)) }
                            }
                            time datetime=(m.published.to_rfc3339()) { (fmt_time(&m.published)) }
                        }
                    }
                }
            }
            div.pager {
                span { @if page_no > 1 { a href=(format!("/ui/?page={}", page_no - 1)) { "← Newer" } } }
                span { @if page_no * PAGE < total { a href=(format!("/ui/?page={}", page_no + 1)) { "Older →" } } }
            }
        }
    };
    page(
        StatusCode::OK,
        layout::page("Inbox", Some(ctx.nav("inbox")), body),
    )
}

pub async fn message(ctx: &Ctx<'_>, name: &str, query: &Form) -> Response<Body> {
    if !valid_file_name(name) {
        return not_found();
    }
    let Some(site) = ctx.site().cloned() else {
        return not_found();
    };
    let me = ctx.me().to_string();
    let path = site.inbox_dir().join(name);
    let store = ctx.app.store.clone();
    let me2 = me.clone();
    let loaded = tokio::task::spawn_blocking(move || {
        let m = read_message(&path).ok().filter(|m| m.recipient == me2)?;
        let items = all_items(&store, &site, &me2);
        let blocks = store.blocks(&me2).unwrap_or_default();
        Some((m, items, blocks, site))
    })
    .await;
    let Ok(Some((msg, items, blocks, site))) = loaded else {
        return not_found();
    };
    let current = items
        .iter()
        .position(|it| matches!(&it.kind, Kind::Received { file } if file == name))
        .unwrap_or(0);
    let members = thread(&items, current);
    let _ = ctx
        .app
        .store
        .mark_read(&me, &msg.sender, &msg.id, now_ms())
        .await;
    let sender = crate::identity::Identity::parse(&msg.sender).ok();
    let blocked_here = sender.as_ref().is_some_and(|s| {
        crate::receiver::is_blocked(&blocks, s) || crate::receiver::is_blocked(&site.block, s)
    });
    let own_block = blocks.iter().any(|b| b == &msg.sender);
    let back = format!("/ui/inbox/{name}");
    let title = msg.name.clone().unwrap_or_else(|| "(no subject)".into());
    let draft = compose::Draft::reply_to(&msg.sender, msg.name.as_deref(), &msg.id);
    let body = html! {
        p { a href="/ui/" { "← Inbox" } }
        h1 { (title) }
        @if query.get("done").is_some_and(|d| d == "unblocked") { p.notice role="status" { "Sender unblocked." } }
        (render_thread(ctx.app, &items, &members, current, &title))
        h2 { "Reply" }
        (compose::form(&ctx.session.data.csrf, &draft, true))
        div.actions {
            @if own_block {
                form.inline method="post" action="/ui/unblock" {
                    input type="hidden" name="csrf" value=(ctx.session.data.csrf);
                    input type="hidden" name="entry" value=(msg.sender);
                    input type="hidden" name="back" value=(back);
                    button.secondary type="submit" { "Unblock this sender" }
                }
            } @else if blocked_here {
                span.muted { "This sender is blocked by the config's block list." }
            } @else {
                form.inline method="post" action="/ui/block" {
                    input type="hidden" name="csrf" value=(ctx.session.data.csrf);
                    input type="hidden" name="entry" value=(msg.sender);
                    input type="hidden" name="back" value="/ui/";
                    button.danger type="submit" { "Block this sender" }
                }
                span.muted { "Their notifications will be dropped and their channel closed." }
            }
        }
    };
    page(
        StatusCode::OK,
        layout::page(&title, Some(ctx.nav("inbox")), body),
    )
}
