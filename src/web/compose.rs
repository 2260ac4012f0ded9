//! Writing: the compose and reply form (through
//! [`crate::sender::create_message`], like Micropub), and the blocklist.

use hyper::{Response, StatusCode};
use maud::{Markup, html};

use super::{Ctx, Flash, Form, layout, redirect, safe_next};
use crate::app::now_ms;
use crate::identity::Identity;
use crate::protocol::{MAX_NAME_CHARS, is_valid_id};
use crate::server::Body;

/// What the compose form holds.
#[derive(Debug, Clone, Default)]
pub struct Draft {
    pub to: String,
    pub subject: String,
    pub content: String,
    pub in_reply_to: String,
}

impl Draft {
    /// A reply to message `id` from `to`, its subject prefixed with `Re:` once.
    pub fn reply_to(to: &str, subject: Option<&str>, id: &str) -> Draft {
        let subject = match subject.map(str::trim) {
            Some(s) if s.to_ascii_lowercase().starts_with("re:") => s.to_string(),
            Some(s) if !s.is_empty() => format!("Re: {s}"),
            _ => String::new(),
        };
        Draft {
            to: to.into(),
            subject,
            content: String::new(),
            in_reply_to: id.into(),
        }
    }

    fn from_form(form: &Form) -> Draft {
        let get = |k: &str| form.get(k).cloned().unwrap_or_default();
        Draft {
            to: get("to").trim().to_string(),
            subject: get("subject"),
            content: get("content").replace("\r\n", "\n"),
            in_reply_to: get("in_reply_to").trim().to_string(),
        }
    }
}

/// The compose form; `reply` hides the recipient (a reply goes to the
/// other party of the conversation).
pub fn form(csrf: &str, d: &Draft, reply: bool) -> Markup {
    html! {
        form.card method="post" action="/ui/compose" {
            input type="hidden" name="csrf" value=(csrf);
            input type="hidden" name="in_reply_to" value=(d.in_reply_to);
            @if reply {
                input type="hidden" name="to" value=(d.to);
                p.muted { "To " (super::short_identity(&d.to)) }
            } @else {
                label for="to" { "To" }
                input #to type="url" name="to" value=(d.to) placeholder="https://their.site/" required;
            }
            label for="subject" { "Subject" }
            input #subject type="text" name="subject" value=(d.subject) maxlength=(MAX_NAME_CHARS);
            label for="content" { "Message " span.muted { "(Markdown)" } }
            textarea #content name="content" required { (d.content) }
            button type="submit" { @if reply { "Send reply" } @else { "Send" } }
        }
    }
}

pub async fn page(ctx: &Ctx<'_>, query: &Form) -> Response<Body> {
    let flash = ctx.app.web.take_flash(&ctx.session.hash);
    let draft = match &flash {
        Some(f) => f.draft.clone(),
        None => Draft {
            to: query.get("to").cloned().unwrap_or_default(),
            in_reply_to: query
                .get("reply")
                .filter(|r| is_valid_id(r))
                .cloned()
                .unwrap_or_default(),
            subject: query.get("subject").cloned().unwrap_or_default(),
            content: String::new(),
        },
    };
    let body = html! {
        h1 { @if draft.in_reply_to.is_empty() { "New message" } @else { "Reply" } }
        @if let Some(f) = &flash { p.error role="alert" { (f.error) } }
        (form(&ctx.session.data.csrf, &draft, false))
        p.muted { "The message is stored here first, then delivered to the recipient's server "
                  "(found from the rel=pm link on their homepage). Its state is on the Outbox page." }
    };
    super::html(
        StatusCode::OK,
        layout::page("Compose", Some(ctx.nav("compose")), body),
    )
}

/// Why the draft cannot be sent, if it cannot.
fn check(ctx: &Ctx<'_>, d: &Draft) -> Result<Identity, String> {
    let to = Identity::parse(&d.to).map_err(|_| {
        "The recipient must be the address of their homepage, such as https://bob.example.com/."
            .to_string()
    })?;
    if d.content.trim().is_empty() {
        return Err("The message is empty.".into());
    }
    let max = ctx.app.config.limits.max_content_bytes;
    if d.content.len() > max {
        return Err(format!(
            "The message is {} bytes long; at most {max} can be sent.",
            d.content.len()
        ));
    }
    if d.subject.chars().count() > MAX_NAME_CHARS {
        return Err(format!(
            "The subject is longer than {MAX_NAME_CHARS} characters."
        ));
    }
    if !d.in_reply_to.is_empty() && !is_valid_id(&d.in_reply_to) {
        return Err("The message this replies to is not a valid message ID.".into());
    }
    Ok(to)
}

pub async fn post(ctx: &Ctx<'_>, form: &Form) -> Response<Body> {
    let draft = Draft::from_form(form);
    let refuse = |error: String, draft: Draft| {
        ctx.app
            .web
            .set_flash(&ctx.session.hash, Flash { error, draft });
        redirect("/ui/compose")
    };
    let to = match check(ctx, &draft) {
        Ok(to) => to,
        Err(e) => return refuse(e, draft),
    };
    let Ok(me) = Identity::parse(ctx.me()) else {
        return redirect("/ui/signin");
    };
    // One line of subject: line breaks would not survive the front matter anyway.
    let subject = draft
        .subject
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let created = crate::sender::create_message(
        ctx.app,
        &me,
        &to,
        draft.content.clone(),
        (!subject.is_empty()).then_some(subject),
        (!draft.in_reply_to.is_empty()).then(|| draft.in_reply_to.clone()),
    )
    .await;
    match created {
        Ok(m) => redirect(&format!("/ui/outbox/{}?done=queued", m.id)),
        Err(e) => {
            tracing::error!(error = %e, "web UI: cannot store an outgoing message");
            refuse(
                "The message could not be stored. Try again later.".into(),
                draft,
            )
        }
    }
}

// ---------------------------------------------------------------------------
// The blocklist

/// A blocklist entry from a form: an identity URL (canonicalised) or a domain.
fn block_entry(input: &str) -> Option<String> {
    let input = input.trim();
    if input.contains("://") {
        return Identity::parse(input).ok().map(|i| i.as_str().to_string());
    }
    let domain = input.trim_end_matches('.').to_ascii_lowercase();
    let ok = !domain.is_empty()
        && domain.len() <= 253
        && !domain.starts_with(['.', '-'])
        && domain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'));
    ok.then_some(domain)
}

pub async fn block(ctx: &Ctx<'_>, form: &Form, blocked: bool) -> Response<Body> {
    let back = safe_next(form.get("back").or(Some(&"/ui/blocked".to_string())));
    let Some(entry) = form.get("entry").and_then(|e| block_entry(e)) else {
        return redirect("/ui/blocked?error=entry");
    };
    if let Err(e) = ctx
        .app
        .store
        .set_blocked(ctx.me(), &entry, blocked, now_ms())
        .await
    {
        tracing::error!(error = %e, "web UI: cannot store the blocklist");
        return redirect("/ui/blocked?error=storage");
    }
    tracing::info!(me = %ctx.me(), %entry, blocked, "web UI blocklist changed");
    let done = if blocked { "blocked" } else { "unblocked" };
    let sep = if back.contains('?') { '&' } else { '?' };
    redirect(&format!("{back}{sep}done={done}"))
}

pub fn blocked_page(ctx: &Ctx<'_>, query: &Form) -> Response<Body> {
    let own = ctx.app.store.blocks(ctx.me()).unwrap_or_default();
    let config = ctx.site().map(|s| s.block.clone()).unwrap_or_default();
    let csrf = &ctx.session.data.csrf;
    let message = match (
        query.get("error").map(String::as_str),
        query.get("done").map(String::as_str),
    ) {
        (Some("entry"), _) => Some((
            "error",
            "Give a homepage address (https://…) or a domain name.",
        )),
        (Some(_), _) => Some(("error", "The blocklist could not be saved.")),
        (_, Some("blocked")) => Some(("notice", "Blocked.")),
        (_, Some("unblocked")) => Some(("notice", "Unblocked.")),
        _ => None,
    };
    let body = html! {
        h1 { "Blocked senders" }
        @if let Some((kind, text)) = message { p class=(kind) role="status" { (text) } }
        p.muted { "Notifications from these senders are dropped (with a plain 202, so they learn nothing), "
                  "and tokens they already hold carry no more messages. A domain also covers its subdomains." }
        @if own.is_empty() && config.is_empty() {
            div.card.empty { "Nobody is blocked." }
        } @else {
            table {
                thead { tr { th { "Sender" } th { "Where" } th {} } }
                tbody {
                    @for e in &own {
                        tr {
                            td { (e) }
                            td.muted { "here" }
                            td {
                                form.inline method="post" action="/ui/unblock" {
                                    input type="hidden" name="csrf" value=(csrf);
                                    input type="hidden" name="entry" value=(e);
                                    button.link type="submit" { "Unblock" }
                                }
                            }
                        }
                    }
                    @for e in &config {
                        tr { td { (e) } td.muted { "config file" } td {} }
                    }
                }
            }
        }
        h2 { "Block someone" }
        form.card method="post" action="/ui/block" {
            input type="hidden" name="csrf" value=(csrf);
            label for="entry" { "Homepage or domain" }
            input #entry type="text" name="entry" placeholder="https://spam.example/ or spam.example" required;
            button.danger type="submit" { "Block" }
        }
    };
    super::html(
        StatusCode::OK,
        layout::page("Blocked", Some(ctx.nav("blocked")), body),
    )
}
