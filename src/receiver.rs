//! The receiver role (`PR`): steps 2, 3, 4 and 6 seen from the recipient's side.
//!
//! - Step 2: [`notify`] answers `202` at once and starts [`handshake`] in the
//!   background, which discovers the sender's endpoint from `S` — the only
//!   proof of the sender there is.
//! - Step 3: [`handshake`] asks that endpoint to `verify`.
//! - Step 4: it issues a token (stored only as a hash) and sends `deliver`.
//! - Step 6: [`message`] checks the bearer token, writes the inbox file
//!   durably, records `(S, M)`, and only then answers `201`.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::{Response, StatusCode};
use serde_json::json;
use url::Url;

use crate::app::{App, lock, now_ms};
use crate::config::SiteConfig;
use crate::identity::Identity;
use crate::inbox::{self, Folder, MessageFile};
use crate::protocol::{self, ProtoError, Push, Subject, hashes_equal};
use crate::server::{Body, json};
use crate::store::{Commit, IssuedToken, Received, RecordOutcome};

fn accepted() -> Response<Body> {
    json(StatusCode::ACCEPTED, &json!({"status": "accepted"}))
}

/// Is `sender` on the site's blocklist? Entries are identity URLs, or
/// domains that also cover their subdomains.
pub fn is_blocked(block: &[String], sender: &Identity) -> bool {
    let host = sender.host();
    block.iter().any(|entry| match Identity::parse(entry) {
        Ok(id) if entry.contains("://") => &id == sender,
        _ => {
            let domain = entry.trim().trim_end_matches('.').to_ascii_lowercase();
            !domain.is_empty() && (host == domain || host.ends_with(&format!(".{domain}")))
        }
    })
}

/// Is `sender` blocked by `site`: by the config's `block` list, or by the
/// owner in the web UI (kept in the store)?
fn blocked(app: &App, site: &SiteConfig, sender: &Identity) -> Result<bool, ProtoError> {
    if is_blocked(&site.block, sender) {
        return Ok(true);
    }
    let owner_blocks = app
        .store
        .blocks(site.identity().as_str())
        .map_err(ProtoError::storage)?;
    Ok(is_blocked(&owner_blocks, sender))
}

/// The rate-limit key of a client: its IPv4 address, or its IPv6 /64 (one
/// host usually holds a whole /64, so per-address keys would be free to mint).
pub fn client_key(peer: SocketAddr) -> String {
    match peer.ip().to_canonical() {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

/// Step 2, receiving side: `notify`.
pub async fn notify(
    app: &Arc<App>,
    peer: SocketAddr,
    path: &str,
    sender: String,
    recipient: String,
    subject: Subject,
) -> Result<Response<Body>, ProtoError> {
    let Some(site) = app.site_on_path(&recipient, path) else {
        return Err(ProtoError::not_found(format!(
            "no identity {recipient} here"
        )));
    };
    let sender_id =
        Identity::parse(&sender).map_err(|e| ProtoError::invalid_request(e.to_string()))?;
    // The client's own budget first: a stranger who names someone else as
    // the sender spends its own allowance before it can spend theirs.
    if let Err(wait) = app.per_client.check(&client_key(peer)) {
        return Err(ProtoError::rate_limited(wait));
    }
    if let Err(wait) = app.per_host.check(sender_id.host()) {
        return Err(ProtoError::rate_limited(wait));
    }
    if blocked(app, site, &sender_id)? {
        tracing::info!(step = 2, %sender, %recipient, "notify from a blocked sender dropped");
        return Ok(accepted());
    }
    let id = subject.as_str().to_string();
    // A repeat for a message already received, or whose handshake is still
    // in flight, does nothing new; any other repeat starts over.
    if let Subject::Message(m) = &subject
        && app
            .store
            .received(&sender, m)
            .map_err(ProtoError::storage)?
            .is_some()
    {
        tracing::info!(step = 2, %sender, id = %m, "notify for a message already received");
        return Ok(accepted());
    }
    if let Some(tok) = app
        .store
        .handshake(&sender, &id)
        .map_err(ProtoError::storage)?
        && !tok.used
        && now_ms() - tok.issued_ms < protocol::HANDSHAKE_SECS * 1000
        && tok.expires_ms > now_ms()
    {
        tracing::info!(step = 2, %sender, subject = %id, "notify while its handshake is in flight");
        return Ok(accepted());
    }
    // Handshakes waiting or running are bounded: past the bound the
    // sender is asked to come back later, and it will.
    let Ok(slot) = app.handshake_slots.clone().try_acquire_owned() else {
        return Err(ProtoError::rate_limited(5));
    };
    if !lock(&app.handshakes_in_flight).insert((sender.clone(), id.clone())) {
        return Ok(accepted());
    }
    tracing::info!(step = 2, %sender, %recipient, kind = %subject.param(), "notify received; handshake starts");
    let endpoint = site.endpoint.clone();
    let task_app = app.clone();
    app.tracker.spawn(async move {
        let _slot = slot;
        let key = (sender.clone(), id);
        if let Err(why) = handshake(&task_app, &endpoint, &sender, &recipient, &subject).await {
            tracing::info!(%sender, %recipient, "handshake dropped: {why}");
        }
        lock(&task_app.handshakes_in_flight).remove(&key);
    });
    Ok(accepted())
}

/// Steps 2 (discovery of `PS`), 3 (verify) and 4 (deliver) in the background.
async fn handshake(
    app: &Arc<App>,
    own_endpoint: &str,
    sender: &str,
    recipient: &str,
    subject: &Subject,
) -> Result<(), String> {
    let sender_url = Url::parse(sender).map_err(|e| e.to_string())?;
    let (profile, fresh) = {
        let _slot = app
            .discovery_slots
            .acquire()
            .await
            .map_err(|_| "shutting down".to_string())?;
        app.profiles
            .get(&app.fetcher, &sender_url)
            .await
            .map_err(|e| format!("step 2: cannot discover the sender's endpoint: {e}"))?
    };
    let ps = profile
        .endpoint
        .ok_or_else(|| format!("step 2: {sender} advertises no rel=pm endpoint"))?;
    // The photo is fetched when the profile is (not on every message).
    if let Some(photo) = profile.photo.as_ref().filter(|_| fresh)
        && let Err(e) = crate::photos::fetch(&app.fetcher, &app.config.server.data_dir, photo).await
    {
        tracing::info!(%sender, "sender's photo not kept: {e}");
    }
    tracing::info!(step = 2, %sender, endpoint = %ps, "discovered the sender's endpoint");

    // Step 3: the endpoint discovered from S must confirm.
    let verify = app
        .fetcher
        .post_form(
            &ps,
            &[
                ("action", "verify"),
                ("sender", sender),
                ("recipient", recipient),
                (subject.param(), subject.as_str()),
            ],
            None,
        )
        .await
        .map_err(|e| format!("step 3: verify failed: {e}"))?;
    let valid = verify.status == StatusCode::OK
        && serde_json::from_slice::<serde_json::Value>(&verify.body)
            .is_ok_and(|v| v["valid"] == json!(true));
    if !valid {
        return Err(format!(
            "step 3: {ps} did not confirm (HTTP {})",
            verify.status.as_u16()
        ));
    }
    tracing::info!(step = 3, %sender, "sender's server confirmed");

    // Step 4: a fresh token, stored only as its hash (under its time: `token_key`).
    let token = protocol::new_token();
    let key = protocol::token_key(&token);
    let now = now_ms();
    let (kind, message, lifetime_s) = match subject {
        Subject::Message(m) => ("message", Some(m.clone()), protocol::HANDSHAKE_SECS),
        Subject::Code(_) => (
            "channel",
            None,
            app.config.delivery.channel_token_secs as i64,
        ),
    };
    app.store
        .issue_token(
            key.clone(),
            subject.as_str().to_string(),
            IssuedToken {
                kind: kind.into(),
                sender: sender.into(),
                recipient: recipient.into(),
                message,
                issued_ms: now,
                expires_ms: now + lifetime_s * 1000,
                used: false,
                sender_name: profile.name,
                sender_photo: profile.photo,
            },
            // Lazy: a token lost in a crash is refused (401) and the sender
            // shakes hands again; nothing was received under it yet.
            Commit::Lazy,
        )
        .await
        .map_err(|e| format!("step 4: cannot store the token: {e}"))?;
    let expires_in = lifetime_s.to_string();
    let mut form = vec![
        ("action", "deliver"),
        ("sender", sender),
        ("recipient", recipient),
        (subject.param(), subject.as_str()),
        ("endpoint", own_endpoint),
        ("token", token.as_str()),
    ];
    if kind == "channel" {
        form.push(("expires_in", expires_in.as_str()));
    }
    let failure = match app.fetcher.post_form(&ps, &form, None).await {
        Err(e) => Some(format!("step 4: deliver failed: {e}")),
        Ok(resp) if resp.status != StatusCode::ACCEPTED => Some(format!(
            "step 4: {ps} answered deliver with HTTP {}: {}",
            resp.status.as_u16(),
            protocol::excerpt(&String::from_utf8_lossy(&resp.body), 200)
        )),
        Ok(_) => None,
    };
    if let Some(why) = failure {
        revoke(app, key, subject).await;
        return Err(why);
    }
    tracing::info!(step = 4, %sender, kind, "token handed over; waiting for the push");
    Ok(())
}

/// Ends a handshake whose deliver did not get through: the token expires
/// now, so the sender's repeated notify starts a new handshake instead of
/// waiting out the old token's 10 minutes (a sender that took the token
/// after all gets `401` on its push and shakes hands again).
async fn revoke(app: &App, key: String, subject: &Subject) {
    let Ok(Some(mut tok)) = app.store.token(&key) else {
        return;
    };
    tok.expires_ms = tok.expires_ms.min(now_ms());
    if let Err(e) = app
        .store
        .issue_token(key, subject.as_str().to_string(), tok, Commit::Durable)
        .await
    {
        tracing::warn!(error = %e, "cannot revoke the token of a failed handshake");
    }
}

/// Step 6, receiving side: the message under a bearer token.
pub async fn message(
    app: &Arc<App>,
    path: &str,
    bearer: Option<String>,
    push: Push,
) -> Result<Response<Body>, ProtoError> {
    let token = bearer.ok_or_else(|| ProtoError::invalid_token("a bearer token is required"))?;
    if !protocol::is_valid_token(&token) {
        return Err(ProtoError::invalid_token("malformed token"));
    }
    let key = protocol::token_key(&token);
    let issued = app.store.token(&key).map_err(ProtoError::storage)?;
    let bound = |t: &IssuedToken| {
        t.sender == push.sender
            && t.recipient == push.recipient
            && (t.kind == "channel" || t.message.as_deref() == Some(push.message.as_str()))
    };
    // A retry of a message already stored: 200, nothing new, nothing revealed
    // to anyone who does not hold a token issued for it.
    if let Some(prev) = app
        .store
        .received(&push.sender, &push.message)
        .map_err(ProtoError::storage)?
    {
        // The token it was stored under counts even once swept from the
        // token table (a week after it expired).
        return if hashes_equal(&prev.token_hash, &key) || issued.as_ref().is_some_and(bound) {
            tracing::info!(step = 6, sender = %push.sender, id = %push.message, "message already received");
            Ok(json(StatusCode::OK, &json!({"status": "received"})))
        } else {
            Err(ProtoError::invalid_token(
                "token not valid for this message",
            ))
        };
    }
    let tok = match issued {
        None => return Err(ProtoError::invalid_token("unknown token")),
        Some(t) if !bound(&t) => {
            return Err(ProtoError::invalid_token(
                "token issued for another sender or message",
            ));
        }
        Some(t) if t.expires_ms <= now_ms() => {
            return Err(ProtoError::invalid_token("token expired"));
        }
        Some(t) if t.kind == "message" && t.used => {
            return Err(ProtoError::invalid_token("token already used"));
        }
        Some(t) => t,
    };
    let Some(site) = app.site_on_path(&push.recipient, path) else {
        return Err(ProtoError::not_found(format!(
            "no identity {} here",
            push.recipient
        )));
    };
    // Blocking revokes what the sender holds: a channel token issued before
    // the block carries no more messages.
    let sender_id =
        Identity::parse(&push.sender).map_err(|e| ProtoError::invalid_request(e.to_string()))?;
    if blocked(app, site, &sender_id)? {
        tracing::info!(step = 6, sender = %push.sender, "message from a blocked sender refused");
        return Err(ProtoError::invalid_token(
            "token not valid for this message",
        ));
    }
    if push.content.len() > app.config.limits.max_content_bytes {
        return Err(ProtoError::too_large(format!(
            "content is over {} bytes",
            app.config.limits.max_content_bytes
        )));
    }
    if push
        .name
        .as_ref()
        .is_some_and(|n| n.chars().count() > protocol::MAX_NAME_CHARS)
    {
        return Err(ProtoError::too_large("name is over 256 characters"));
    }
    // Last of the checks: when several errors apply, PROTOCOL.md's table
    // puts 429 after all the others.
    if let Err(wait) = app.per_sender_messages.check(&push.sender) {
        return Err(ProtoError::rate_limited(wait));
    }
    // Durable file first, then the record: a crash in between leaves a file
    // that the sender's retry rewrites in place (same name), never a duplicate.
    let site = site.clone();
    // The site matched the recipient: its identity is the recipient's.
    let (sender, recipient) = (sender_id, site.identity());
    let push2 = push.clone();
    let tok2 = tok.clone();
    let path = app
        .files
        .write(move || {
            inbox::render_file(
                &site,
                Folder::Inbox,
                &MessageFile {
                    sender: &sender,
                    recipient: &recipient,
                    id: &push2.message,
                    published: push2.published,
                    received: chrono::Utc::now(),
                    name: push2.name.as_deref(),
                    in_reply_to: push2.in_reply_to.as_deref(),
                    content: &push2.content,
                    sender_name: tok2.sender_name.as_deref(),
                    sender_photo: tok2.sender_photo.as_deref(),
                },
            )
        })
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "cannot write the inbox file");
            ProtoError::server_error("cannot write the message to the inbox; retry later")
        })?;
    let outcome = app
        .store
        .record_received(
            push.sender.clone(),
            push.message.clone(),
            Received {
                recipient: push.recipient.clone(),
                path: path.display().to_string(),
                token_hash: key,
                received_ms: now_ms(),
            },
            tok.kind == "message",
        )
        .await
        .map_err(ProtoError::storage)?;
    match outcome {
        RecordOutcome::Created => {
            tracing::info!(step = 6, sender = %push.sender, id = %push.message, file = %path.display(), "message received");
            crate::hooks::message_received(
                app,
                &push.recipient,
                &push.sender,
                &push.message,
                &path,
            );
            Ok(json(StatusCode::CREATED, &json!({"status": "created"})))
        }
        RecordOutcome::AlreadyReceived => Ok(json(StatusCode::OK, &json!({"status": "received"}))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocklist_matches_identities_and_domains() {
        let s = Identity::parse("https://spam.evil.example/").unwrap();
        assert!(is_blocked(&["evil.example".into()], &s));
        assert!(is_blocked(&["https://spam.evil.example".into()], &s));
        assert!(!is_blocked(&["https://evil.example/".into()], &s));
        assert!(!is_blocked(&["vil.example".into()], &s));
        assert!(!is_blocked(&[], &s));
    }
}
