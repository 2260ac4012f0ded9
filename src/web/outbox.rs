//! The outbox: every outgoing message with its delivery state, last error
//! and next attempt, and the page of one with its conversation.

use hyper::{Response, StatusCode};
use maud::html;

use super::inbox::{Item, Kind, all_items, badge, delivery, render_thread, thread};
use super::{Ctx, Form, compose, error_page, fmt_ms, html as page, layout, not_found};
use crate::protocol::is_valid_id;
use crate::server::Body;
use crate::store::State;

/// Outbox rows shown (the newest).
const MAX_ROWS: usize = 500;

pub async fn list(ctx: &Ctx<'_>, _query: &Form) -> Response<Body> {
    let store = ctx.app.store.clone();
    let me = ctx.me().to_string();
    let loaded = tokio::task::spawn_blocking(move || store.outbox(&me)).await;
    let messages = match loaded {
        Ok(Ok(m)) => m,
        _ => {
            return error_page(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The outbox cannot be read.",
            );
        }
    };
    let total = messages.len();
    let body = html! {
        div.toolbar {
            h1 { "Outbox" }
            span.muted { (total) " sent" }
        }
        @if messages.is_empty() {
            div.card.empty { "Nothing sent yet. " a href="/ui/compose" { "Write a message" } "." }
        } @else {
            table {
                thead { tr { th { "To" } th { "Message" } th { "State" } th { "Failed tries" } th { "Last error" } th { "Next attempt / delivered" } } }
                tbody {
                    @for m in messages.iter().take(MAX_ROWS) {
                        tr {
                            td { (super::short_identity(&m.recipient)) }
                            td {
                                a href=(format!("/ui/outbox/{}", m.id)) {
                                    (m.name.clone().unwrap_or_else(|| super::markdown::plain_text(&m.content, 60)))
                                }
                                br;
                                small.muted.nowrap { (fmt_ms(m.created_ms)) }
                            }
                            td { (badge(m)) }
                            td { (m.attempts) }
                            td.err { (m.last_error.clone().unwrap_or_default()) }
                            td {
                                @match m.state {
                                    State::Delivered => { (m.delivered_ms.map(fmt_ms).unwrap_or_default()) }
                                    State::Failed => { span.muted { "gave up" } }
                                    State::Queued | State::Notified => { (fmt_ms(m.next_attempt_ms)) }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    page(
        StatusCode::OK,
        layout::page("Outbox", Some(ctx.nav("outbox")), body),
    )
}

pub async fn message(ctx: &Ctx<'_>, id: &str, query: &Form) -> Response<Body> {
    if !is_valid_id(id) {
        return not_found();
    }
    let Some(site) = ctx.site().cloned() else {
        return not_found();
    };
    let store = ctx.app.store.clone();
    let me = ctx.me().to_string();
    let wanted = id.to_string();
    let loaded = tokio::task::spawn_blocking(move || {
        let m = store
            .message(&wanted)
            .ok()
            .flatten()
            .filter(|m| m.sender == me)?;
        Some((m, all_items(&store, &site, &me)))
    })
    .await;
    let Ok(Some((msg, items))) = loaded else {
        return not_found();
    };
    let current = items
        .iter()
        .position(|it: &Item| matches!(&it.kind, Kind::Sent { out: Some(m) } if m.id == msg.id))
        .unwrap_or(0);
    let members = thread(&items, current);
    let title = msg.name.clone().unwrap_or_else(|| "(no subject)".into());
    let draft = compose::Draft::reply_to(&msg.recipient, msg.name.as_deref(), &msg.id);
    let body = html! {
        p { a href="/ui/outbox" { "← Outbox" } }
        h1 { (title) }
        @if query.get("done").is_some_and(|d| d == "queued") {
            p.notice role="status" { "Message stored; delivery to " (super::short_identity(&msg.recipient)) " is under way." }
        }
        div.card { (delivery(&msg)) }
        (render_thread(ctx.app, &items, &members, current, &title))
        h2 { "Write again" }
        (compose::form(&ctx.session.data.csrf, &draft, true))
    };
    page(
        StatusCode::OK,
        layout::page(&title, Some(ctx.nav("outbox")), body),
    )
}
