//! The sender role (`PS`): step 0 (store), 1 (discover `PR`), 2 (notify),
//! 3 and 5 answered (verify, deliver), 6 (push), and the durable queue that
//! retries all of it.
//!
//! Every outgoing message lives in redb with its state (queued, notified,
//! delivered, failed), attempt count, last error and next attempt time. The
//! queue worker ([`run_queue`]) wakes when an attempt is due and runs it:
//!
//! - message flow: push if the recipient handed us a token for it (step 4),
//!   else notify (step 2) and wait; re-notify after `renotify_after_secs`.
//! - channel flow: push under the channel token for (sender, recipient) if
//!   we hold one, else send a code (step 2) and wait for `deliver`.
//!
//! Transient failures (connection errors, timeouts, 5xx, 429) back off
//! exponentially with jitter, honour `Retry-After`, and stop only after
//! `give_up_after_secs` (4 days by default); a refusal that retrying cannot
//! change (another 4xx from a freshly discovered endpoint) fails at once.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::{Response, StatusCode};
use rand::RngExt;
use serde_json::json;
use tokio::sync::{Notify, Semaphore};
use url::Url;

use crate::app::{App, lock, now_ms};
use crate::config::Flow;
use crate::fetch::FetchError;
use crate::identity::{Identity, same_endpoint};
use crate::protocol::{self, ProtoError, Subject, hash_secret};
use crate::server::{Body, json};
use crate::store::{Channel, Code, Commit, Grant, OutMessage, State, StoreError};

/// Pushes and notifies in flight at once. A push waits for the receiver's
/// syncs (its file, its record); with 64 slots, pushes waiting on a disk
/// with slow flushes held back the notifies and left CPU idle. 128 against
/// 64, alternating runs of `cargo bench --bench server`: per-message flow
/// +1 to +8 % msg/s, p50 latency 0.4-0.55 s instead of 0.55-0.75 s; channel
/// flow the same msg/s, p50 80-100 ms instead of 140-170 ms.
const CONCURRENCY: usize = 128;
/// The longest `Retry-After` honoured, in seconds.
const MAX_RETRY_AFTER_SECS: u64 = 86_400;

/// The in-memory schedule over the durable queue: (due time, message ID),
/// with an index by ID so that rescheduling is cheap.
#[derive(Default)]
pub struct Queue {
    due: Mutex<Schedule>,
    /// Attempts running now; `Some(t)` when the message fell due again
    /// meanwhile (at `t`): it is scheduled again the moment this attempt
    /// ends, never run twice at once.
    running: Mutex<HashMap<String, Option<i64>>>,
    wake: Notify,
}

#[derive(Default)]
struct Schedule {
    by_time: BTreeSet<(i64, String)>,
    by_id: HashMap<String, i64>,
}

impl Queue {
    /// Schedules an attempt of `id` at `at_ms`; an earlier time already set wins.
    pub fn schedule(&self, id: &str, at_ms: i64) {
        let mut s = lock(&self.due);
        if let Some(&existing) = s.by_id.get(id) {
            if existing <= at_ms {
                return;
            }
            s.by_time.remove(&(existing, id.to_string()));
        }
        s.by_time.insert((at_ms, id.to_string()));
        s.by_id.insert(id.to_string(), at_ms);
        drop(s);
        self.wake.notify_one();
    }

    /// Schedules `id` before everything else that is due: for the push of
    /// a message whose handshake just completed. Work already started
    /// finishes first, so a backlog of new notifies never holds back the
    /// pushes of granted messages until their 10-minute tokens expire.
    pub fn schedule_first(&self, id: &str) {
        self.schedule(id, FIRST);
    }

    /// The most urgent due attempt (its due time and ID), if any, else when
    /// the next one falls due.
    fn take_due(&self, now: i64) -> Result<(i64, String), Option<i64>> {
        let mut s = lock(&self.due);
        if s.by_time.first().is_some_and(|(t, _)| *t <= now)
            && let Some((t, id)) = s.by_time.pop_first()
        {
            s.by_id.remove(&id);
            return Ok((t, id));
        }
        Err(s.by_time.first().map(|(t, _)| *t))
    }

    /// Marks `id`, due at `due`, as running; `false` if an attempt of it is
    /// running already, which then runs it again as soon as it ends.
    fn start(&self, id: &str, due: i64) -> bool {
        let mut running = lock(&self.running);
        if let Some(again) = running.get_mut(id) {
            *again = Some(again.map_or(due, |t| t.min(due)));
            return false;
        }
        running.insert(id.to_string(), None);
        true
    }

    /// The attempt of `id` ended: schedules it again if it fell due meanwhile.
    fn end(&self, id: &str) {
        let again = lock(&self.running).remove(id).flatten();
        if let Some(due) = again {
            self.schedule(id, due);
        }
    }
}

/// Calls [`Queue::end`] when dropped.
struct AttemptEnd<'a>(&'a Queue, &'a str);

impl Drop for AttemptEnd<'_> {
    fn drop(&mut self) {
        self.0.end(self.1);
    }
}

/// The due time of [`Queue::schedule_first`]: before any real time.
const FIRST: i64 = i64::MIN;

/// Step 0: stores a new outgoing message durably, writes its copy to the
/// site's sent folder, and queues it in the configured flow.
pub async fn create_message(
    app: &Arc<App>,
    sender: &Identity,
    recipient: &Identity,
    content: String,
    name: Option<String>,
    in_reply_to: Option<String>,
) -> Result<OutMessage, String> {
    let flow = app.config.delivery.flow;
    create_message_in(app, sender, recipient, content, name, in_reply_to, flow).await
}

/// [`create_message`] in a chosen flow (Micropub's `pm-flow` extension).
pub async fn create_message_in(
    app: &Arc<App>,
    sender: &Identity,
    recipient: &Identity,
    content: String,
    name: Option<String>,
    in_reply_to: Option<String>,
    flow: Flow,
) -> Result<OutMessage, String> {
    let site = app
        .config
        .site(sender)
        .ok_or_else(|| format!("{sender} is not a site of this server"))?
        .clone();
    let now = chrono::Utc::now();
    let msg = OutMessage {
        id: protocol::new_message_id(),
        sender: sender.as_str().into(),
        recipient: recipient.as_str().into(),
        content,
        name,
        in_reply_to,
        published: now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        flow: match flow {
            Flow::Channel => "channel".into(),
            Flow::Message => "message".into(),
        },
        state: State::Queued,
        attempts: 0,
        last_error: None,
        next_attempt_ms: now.timestamp_millis(),
        created_ms: now.timestamp_millis(),
        notified_ms: None,
        delivered_ms: None,
        grant: None,
    };
    let copy = msg.clone();
    let (s, r) = (sender.clone(), recipient.clone());
    let written = app.files.write(move || {
        crate::inbox::render_file(
            &site,
            crate::inbox::Folder::Sent,
            &crate::inbox::MessageFile {
                sender: &s,
                recipient: &r,
                id: &copy.id,
                published: chrono::DateTime::parse_from_rfc3339(&copy.published)
                    .unwrap_or_else(|_| now.fixed_offset()),
                received: now,
                name: copy.name.as_deref(),
                in_reply_to: copy.in_reply_to.as_deref(),
                content: &copy.content,
                sender_name: None,
                sender_photo: None,
            },
        )
    });
    // The record and the copy are synced side by side: on a disk with slow
    // syncs, one wait instead of two before the creation is acknowledged.
    let (stored, written) = tokio::join!(app.store.create_message(msg.clone()), written);
    if let Err(e) = stored {
        // Not stored, not acknowledged: no copy of it either.
        if let Ok(path) = written {
            let _ = std::fs::remove_file(path);
        }
        return Err(e.to_string());
    }
    if let Err(e) = written {
        // The message is stored and will be delivered; only the copy is missing.
        tracing::warn!(error = %e, "cannot write the copy to the sent folder");
    }
    tracing::info!(step = 0, id = %msg.id, sender = %msg.sender, recipient = %msg.recipient, flow = %msg.flow, "message stored");
    app.queue.schedule(&msg.id, msg.next_attempt_ms);
    Ok(msg)
}

/// Loads every undelivered message after a (re)start.
pub fn resume(app: &Arc<App>) -> Result<(), StoreError> {
    let pending = app.store.pending_messages()?;
    if !pending.is_empty() {
        tracing::info!(count = pending.len(), "resuming the outgoing queue");
    }
    for m in pending {
        app.queue.schedule(&m.id, m.next_attempt_ms);
    }
    Ok(())
}

/// The queue worker: runs attempts as they fall due, until shutdown, at
/// most `CONCURRENCY` at once. A slot comes first, then the most urgent
/// due attempt: nothing leaves the schedule before it can run, so what is
/// scheduled meanwhile (a push, a retry) takes its place in line.
pub async fn run_queue(app: Arc<App>) {
    let slots = Arc::new(Semaphore::new(CONCURRENCY));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = app.shutdown.cancelled() => return,
        };
        let next = match app.queue.take_due(now_ms()) {
            Ok((due, id)) => {
                if !app.queue.start(&id, due) {
                    continue;
                }
                let app2 = app.clone();
                app.tracker.spawn(async move {
                    let _permit = permit;
                    // Ended even if the attempt panics: a message left
                    // "running" would never be attempted again.
                    let _end = AttemptEnd(&app2.queue, &id);
                    attempt(&app2, &id).await;
                });
                continue;
            }
            Err(next) => next,
        };
        drop(permit);
        let sleep = next.map_or(Duration::from_secs(3600), |t| {
            Duration::from_millis((t - now_ms()).clamp(0, 3_600_000) as u64)
        });
        tokio::select! {
            _ = app.queue.wake.notified() => {}
            _ = tokio::time::sleep(sleep) => {}
            _ = app.shutdown.cancelled() => return,
        }
    }
}

/// What became of one request to the recipient's server.
enum Outcome {
    Done,
    /// The token was refused (401): start a new handshake.
    TokenRefused,
    /// Worth retrying later; maybe with the server's Retry-After.
    Retry(String, Option<u64>),
    /// Retrying cannot help.
    Fatal(String),
}

fn classify(
    what: &str,
    r: Result<crate::fetch::Fetched, FetchError>,
    ok: &[StatusCode],
) -> Outcome {
    match r {
        Ok(resp) if ok.contains(&resp.status) => Outcome::Done,
        Ok(resp) => {
            let detail = serde_json::from_slice::<serde_json::Value>(&resp.body)
                .ok()
                .and_then(|v| {
                    v["error"].as_str().map(|e| {
                        let d = v["error_description"].as_str().unwrap_or("");
                        protocol::excerpt(&format!("{e}: {d}"), 300)
                    })
                })
                .unwrap_or_default();
            let msg = format!("{what} answered HTTP {} {detail}", resp.status.as_u16());
            let retry_after = resp
                .headers
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| retry_after_secs(v, chrono::Utc::now()));
            match resp.status.as_u16() {
                401 => Outcome::TokenRefused,
                429 | 408 => Outcome::Retry(msg, retry_after),
                s if s >= 500 => Outcome::Retry(msg, retry_after),
                _ => Outcome::Fatal(msg),
            }
        }
        Err(e @ (FetchError::Forbidden(..) | FetchError::Scheme(_))) => {
            Outcome::Fatal(format!("{what}: {e}"))
        }
        Err(e) => Outcome::Retry(format!("{what}: {e}"), None),
    }
}

/// A `Retry-After` value in seconds from `now`: delay-seconds (what
/// PROTOCOL.md's 429 sends) or an HTTP-date (RFC 9110, what proxies in
/// front of a peer often send with a 503; a date already past is 0). A
/// stranger's number: at most a day, so the schedule cannot overflow.
fn retry_after_secs(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<u64> {
    let value = value.trim();
    let secs = match value.parse::<u64>() {
        Ok(secs) => secs,
        // IMF-fixdate ("Sun, 06 Nov 1994 08:49:37 GMT") is RFC 2822's form.
        Err(_) => {
            let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
            u64::try_from((at.with_timezone(&chrono::Utc) - now).num_seconds()).unwrap_or(0)
        }
    };
    Some(secs.min(MAX_RETRY_AFTER_SECS))
}

/// One attempt at moving message `id` forward.
async fn attempt(app: &Arc<App>, id: &str) {
    let msg = match app.store.message(id) {
        Ok(Some(m)) if m.state.is_pending() => m,
        Ok(_) => return,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the queue");
            app.queue.schedule(id, now_ms() + 5_000);
            return;
        }
    };
    let give_up_ms = (app.config.delivery.give_up_after_secs * 1000.0) as i64;
    if now_ms() - msg.created_ms > give_up_ms {
        let why = format!(
            "gave up after {} attempts: {}",
            msg.attempts,
            msg.last_error.clone().unwrap_or_default()
        );
        finish(app, &msg, State::Failed, Some(why)).await;
        return;
    }
    let outcome = if msg.flow == "message" {
        match &msg.grant {
            // Even an expired grant is worth one push: if the receiver
            // already stored the message, it answers 200 to its token.
            Some(g) => {
                let out = push(app, &msg, &g.endpoint, &g.token).await;
                if let Outcome::TokenRefused = out {
                    // Only this grant: a newer one may have arrived meanwhile.
                    let refused = g.token.clone();
                    let _ = app
                        .store
                        .update_message(&msg.id, Commit::Lazy, move |m| {
                            if m.grant.as_ref().is_some_and(|g| g.token == refused) {
                                m.grant = None;
                            }
                        })
                        .await;
                }
                out
            }
            None => notify(app, &msg, Subject::Message(msg.id.clone())).await,
        }
    } else {
        match app.store.channel(&msg.sender, &msg.recipient) {
            Ok(Some(ch)) if ch.expires_ms > now_ms() + 5_000 => {
                let out = push(app, &msg, &ch.endpoint, &ch.token).await;
                if let Outcome::TokenRefused = out {
                    tracing::info!(step = 6, recipient = %msg.recipient, "channel token refused; new handshake");
                    let _ = app
                        .store
                        .drop_channel(&msg.sender, &msg.recipient, &ch.token)
                        .await;
                }
                out
            }
            Ok(_) => channel_handshake(app, &msg).await,
            Err(e) => Outcome::Retry(e.to_string(), Some(5)),
        }
    };
    match outcome {
        Outcome::Done => {}
        Outcome::TokenRefused => {
            // Start over with a fresh handshake right away.
            app.queue.schedule(&msg.id, now_ms());
        }
        Outcome::Retry(why, retry_after) => {
            let delay = backoff(app, msg.attempts + 1, retry_after);
            tracing::info!(id = %msg.id, attempt = msg.attempts + 1, retry_in_s = delay / 1000, "delivery attempt failed: {why}");
            let next = now_ms().saturating_add(delay);
            // Lazy: lost in a crash, the attempt is only made sooner.
            let _ = app
                .store
                .update_message(&msg.id, Commit::Lazy, move |m| {
                    m.attempts += 1;
                    m.last_error = Some(why);
                    m.next_attempt_ms = next;
                })
                .await;
            app.queue.schedule(&msg.id, next);
        }
        Outcome::Fatal(why) => {
            tracing::warn!(id = %msg.id, "delivery failed for good: {why}");
            finish(app, &msg, State::Failed, Some(why)).await;
        }
    }
}

/// Exponential back-off with ±50% jitter, at least the server's Retry-After.
fn backoff(app: &App, attempt: u32, retry_after: Option<u64>) -> i64 {
    let d = &app.config.delivery;
    let base = d.retry_initial_secs * 2f64.powi(attempt.saturating_sub(1).min(30) as i32);
    let jitter = rand::rng().random_range(0.5..1.5);
    let secs = (base * jitter).min(d.retry_max_secs);
    let secs = secs.max(retry_after.unwrap_or(0) as f64);
    (secs * 1000.0) as i64
}

/// Records that a message is done with. Lazily: if a crash loses the mark,
/// the message is pushed once more after the restart and the receiver
/// answers `200` to its token (PROTOCOL.md step 6), storing nothing new; a
/// failure is judged again the same way.
async fn finish(app: &Arc<App>, msg: &OutMessage, state: State, error: Option<String>) {
    let r = app
        .store
        .update_message(&msg.id, Commit::Lazy, move |m| {
            m.state = state;
            if error.is_some() {
                m.last_error = error;
            }
            if state == State::Delivered {
                m.delivered_ms = Some(now_ms());
            }
        })
        .await;
    if let Err(e) = r {
        tracing::error!(error = %e, "cannot record the delivery state; will retry");
        app.queue.schedule(&msg.id, now_ms() + 1000);
    }
}

/// Step 1 and 2: discover the recipient's endpoint and notify it.
async fn notify(app: &Arc<App>, msg: &OutMessage, subject: Subject) -> Outcome {
    let recipient = match Url::parse(&msg.recipient) {
        Ok(u) => u,
        Err(e) => return Outcome::Fatal(format!("bad recipient: {e}")),
    };
    let from_cache = app.discovery.contains(&recipient);
    let endpoint = match app.discovery.discover(&app.fetcher, &recipient).await {
        Ok(Some(e)) => e,
        Ok(None) => {
            app.discovery.forget(&recipient);
            return Outcome::Retry(
                format!("step 1: {recipient} advertises no rel=pm endpoint"),
                None,
            );
        }
        Err(crate::discover::DiscoverError::Fetch(
            e @ (FetchError::Forbidden(..) | FetchError::Scheme(_)),
        )) => {
            return Outcome::Fatal(format!("step 1: {e}"));
        }
        Err(e) => return Outcome::Retry(format!("step 1: {e}"), None),
    };
    tracing::info!(step = 1, recipient = %recipient, endpoint = %endpoint, "discovered the recipient's endpoint");
    let r = app
        .fetcher
        .post_form(
            &endpoint,
            &[
                ("action", "notify"),
                ("sender", &msg.sender),
                ("recipient", &msg.recipient),
                (subject.param(), subject.as_str()),
            ],
            None,
        )
        .await;
    match classify("step 2 notify", r, &[StatusCode::ACCEPTED]) {
        Outcome::Done => {
            tracing::info!(step = 2, id = %msg.id, recipient = %msg.recipient, kind = %subject.param(), "notify sent and accepted");
            let renotify = now_ms() + (app.config.delivery.renotify_after_secs * 1000.0) as i64;
            // Lazy: lost in a crash, the message is notified again after the
            // restart, which the receiver takes as a repeat (step 2).
            let _ = app
                .store
                .update_message(&msg.id, Commit::Lazy, move |m| {
                    if m.state == State::Queued {
                        m.state = State::Notified;
                    }
                    m.notified_ms = Some(now_ms());
                    m.next_attempt_ms = renotify;
                })
                .await;
            app.queue.schedule(&msg.id, renotify);
            Outcome::Done
        }
        Outcome::TokenRefused => {
            app.discovery.forget(&recipient);
            Outcome::Retry("step 2 notify answered 401".into(), None)
        }
        // The endpoint may have moved since we cached it: judge only a
        // refusal from a freshly discovered endpoint as final.
        Outcome::Fatal(why) if from_cache => {
            app.discovery.forget(&recipient);
            Outcome::Retry(why, Some(0))
        }
        other => {
            app.discovery.forget(&recipient);
            other
        }
    }
}

/// Channel flow, step 2: send a code for (sender, recipient) unless one is
/// already out and fresh.
async fn channel_handshake(app: &Arc<App>, msg: &OutMessage) -> Outcome {
    let pair = (msg.sender.clone(), msg.recipient.clone());
    let renotify_ms = (app.config.delivery.renotify_after_secs * 1000.0) as i64;
    let window = renotify_ms.min(protocol::HANDSHAKE_SECS * 1000);
    {
        // Check and claim under one lock: a burst of messages to one
        // recipient starts one handshake, not one each. The others wait for
        // its deliver, which wakes every queued message of the pair.
        let mut in_flight = lock(&app.codes_in_flight);
        if let Some(&sent) = in_flight.get(&pair)
            && now_ms() - sent < window
        {
            app.queue.schedule(&msg.id, sent + window);
            return Outcome::Done;
        }
        in_flight.insert(pair.clone(), now_ms());
    }
    let code = protocol::new_secret();
    let put = app
        .store
        .put_code(
            hash_secret(&code),
            Code {
                sender: msg.sender.clone(),
                recipient: msg.recipient.clone(),
                issued_ms: now_ms(),
                used: false,
            },
        )
        .await;
    if let Err(e) = put {
        lock(&app.codes_in_flight).remove(&pair);
        return Outcome::Retry(e.to_string(), Some(5));
    }
    let out = notify(app, msg, Subject::Code(code)).await;
    if !matches!(out, Outcome::Done) {
        lock(&app.codes_in_flight).remove(&pair);
    }
    out
}

/// Step 6: the push, with the bearer token, to the endpoint checked in step 5.
async fn push(app: &Arc<App>, msg: &OutMessage, endpoint: &str, token: &str) -> Outcome {
    let url = match Url::parse(endpoint) {
        Ok(u) => u,
        Err(e) => return Outcome::Fatal(format!("bad endpoint: {e}")),
    };
    let mut form = vec![
        ("action", "message"),
        ("sender", msg.sender.as_str()),
        ("recipient", msg.recipient.as_str()),
        ("message", msg.id.as_str()),
        ("published", msg.published.as_str()),
        ("content", msg.content.as_str()),
    ];
    if let Some(n) = &msg.name {
        form.push(("name", n));
    }
    if let Some(r) = &msg.in_reply_to {
        form.push(("in-reply-to", r));
    }
    let r = app.fetcher.post_form(&url, &form, Some(token)).await;
    let out = classify("step 6 push", r, &[StatusCode::CREATED, StatusCode::OK]);
    if let Outcome::Done = out {
        tracing::info!(step = 6, id = %msg.id, recipient = %msg.recipient, "message delivered");
        finish(app, msg, State::Delivered, None).await;
    }
    out
}

/// Step 3, sending side: `verify`. Confirms without revealing content.
pub async fn verify(
    app: &Arc<App>,
    path: &str,
    sender: String,
    recipient: String,
    subject: Subject,
) -> Result<Response<Body>, ProtoError> {
    if app.site_on_path(&sender, path).is_none() {
        return Err(ProtoError::not_found(format!("no identity {sender} here")));
    }
    let valid = pending(app, &subject, &sender, &recipient)?;
    tracing::info!(step = 3, %sender, %recipient, kind = %subject.param(), valid, "verify answered");
    if valid {
        Ok(json(StatusCode::OK, &json!({"valid": true})))
    } else {
        Err(ProtoError::not_found(format!(
            "no pending {} from {sender} to {recipient}",
            subject.param()
        )))
    }
}

/// Whether we hold what `subject` names, pending from `sender` to
/// `recipient`: an undelivered message, or a fresh unused code.
fn pending(
    app: &App,
    subject: &Subject,
    sender: &str,
    recipient: &str,
) -> Result<bool, ProtoError> {
    match subject {
        Subject::Message(m) => Ok(app
            .store
            .message_head(m)
            .map_err(ProtoError::storage)?
            .is_some_and(|msg| {
                msg.sender == sender && msg.recipient == recipient && msg.state.is_pending()
            })),
        Subject::Code(k) => code_valid(app, k, sender, recipient),
    }
}

fn code_valid(app: &App, code: &str, sender: &str, recipient: &str) -> Result<bool, ProtoError> {
    let stored = app
        .store
        .code(&hash_secret(code))
        .map_err(ProtoError::storage)?;
    Ok(stored.is_some_and(|c| {
        c.sender == sender
            && c.recipient == recipient
            && !c.used
            && now_ms() - c.issued_ms < protocol::HANDSHAKE_SECS * 1000
    }))
}

/// Steps 4 and 5, sending side: `deliver`. The recipient's endpoint is
/// discovered afresh (no cache) and must equal `E`; only then is anything
/// sent, and only to `E`.
#[allow(clippy::too_many_arguments)]
pub async fn deliver(
    app: &Arc<App>,
    path: &str,
    sender: String,
    recipient: String,
    subject: Subject,
    endpoint: String,
    token: String,
    expires_in: Option<u64>,
) -> Result<Response<Body>, ProtoError> {
    if app.site_on_path(&sender, path).is_none() {
        return Err(ProtoError::not_found(format!("no identity {sender} here")));
    }
    let known = pending(app, &subject, &sender, &recipient)?;
    if !known {
        return Err(ProtoError::not_found(format!(
            "no pending {} from {sender} to {recipient}",
            subject.param()
        )));
    }
    // Step 5: fresh discovery, exact comparison.
    let recipient_url =
        Url::parse(&recipient).map_err(|e| ProtoError::invalid_request(e.to_string()))?;
    let discovered = crate::discover::discover(&app.fetcher, &recipient_url).await;
    let matches = match &discovered {
        Ok(Some(found)) => same_endpoint(found.as_str(), &endpoint),
        _ => false,
    };
    if !matches {
        let found = match discovered {
            Ok(Some(u)) => u.to_string(),
            Ok(None) => "no endpoint".into(),
            Err(e) => format!("discovery failed: {e}"),
        };
        tracing::warn!(step = 5, %recipient, given = %endpoint, %found, "endpoint mismatch; nothing sent");
        return Err(ProtoError::endpoint_mismatch(format!(
            "{recipient} advertises {found}, not {endpoint}"
        )));
    }
    let endpoint = Url::parse(&endpoint)
        .map(|u| u.to_string())
        .map_err(|e| ProtoError::invalid_request(e.to_string()))?;
    match subject {
        Subject::Message(m) => {
            let grant = Grant {
                token,
                endpoint,
                expires_ms: now_ms() + protocol::HANDSHAKE_SECS * 1000,
            };
            app.store
                .update_message(&m, Commit::Durable, move |msg| msg.grant = Some(grant))
                .await
                .map_err(ProtoError::storage)?;
            tracing::info!(step = 5, %recipient, id = %m, "endpoint confirmed; pushing");
            app.queue.schedule_first(&m);
        }
        Subject::Code(k) => {
            let secs = expires_in.unwrap_or(*protocol::CHANNEL_SECS.start()) as i64;
            let accepted = app
                .store
                .accept_channel(
                    hash_secret(&k),
                    sender.clone(),
                    recipient.clone(),
                    Channel {
                        token,
                        endpoint,
                        expires_ms: now_ms() + secs * 1000,
                    },
                )
                .await
                .map_err(ProtoError::storage)?;
            if !accepted {
                return Err(ProtoError::not_found("code already used"));
            }
            lock(&app.codes_in_flight).remove(&(sender.clone(), recipient.clone()));
            tracing::info!(step = 5, %recipient, expires_in = secs, "channel token stored; pushing queued messages");
            let pending = app.store.pending_messages().map_err(ProtoError::storage)?;
            for m in pending
                .iter()
                .filter(|m| m.sender == sender && m.recipient == recipient)
            {
                app.queue.schedule(&m.id, now_ms());
            }
        }
    }
    Ok(json(StatusCode::ACCEPTED, &json!({"status": "accepted"})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_gives_one_due_attempt_at_a_time_pushes_first() {
        let q = Queue::default();
        q.schedule("old-notify", 100);
        q.schedule("new-notify", 200);
        q.schedule("later", 5_000);
        assert_eq!(q.take_due(1_000), Ok((100, "old-notify".into())));
        // A push granted meanwhile goes before the notify still waiting.
        q.schedule_first("push");
        assert_eq!(q.take_due(1_000), Ok((FIRST, "push".into())));
        assert_eq!(q.take_due(1_000), Ok((200, "new-notify".into())));
        assert_eq!(q.take_due(1_000), Err(Some(5_000)));
        // An earlier time wins over a later one, not the other way round.
        q.schedule("later", 9_000);
        q.schedule("later", 300);
        assert_eq!(q.take_due(1_000), Ok((300, "later".into())));
        assert_eq!(q.take_due(1_000), Err(None));
    }

    #[test]
    fn a_message_due_while_its_attempt_runs_runs_again_right_after() {
        let q = Queue::default();
        assert!(q.start("m", 100));
        // Due again (its push) while the notify attempt still runs: not twice at once.
        assert!(!q.start("m", FIRST));
        assert!(!q.start("m", 500));
        assert_eq!(q.take_due(1_000), Err(None));
        q.end("m");
        assert_eq!(q.take_due(1_000), Ok((FIRST, "m".into())));
        assert!(q.start("m", FIRST));
        q.end("m");
        assert_eq!(q.take_due(i64::MAX), Err(None), "nothing more to run");
        // An attempt that panics still ends.
        assert!(q.start("m", 1));
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _end = AttemptEnd(&q, "m");
            assert!(!q.start("m", 2));
            panic!("a bug in an attempt");
        }));
        assert!(panicked.is_err());
        assert_eq!(q.take_due(1_000), Ok((2, "m".into())));
        assert!(q.start("m", 2), "no longer marked running");
    }

    #[test]
    fn retry_after_is_seconds_or_an_http_date_and_at_most_a_day() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-29T12:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(retry_after_secs("120", now), Some(120));
        assert_eq!(retry_after_secs(" 7 ", now), Some(7));
        assert_eq!(
            retry_after_secs("Sun, 29 Nov 2026 12:01:30 GMT", now),
            Some(90)
        );
        assert_eq!(
            retry_after_secs("Sun, 29 Nov 2026 11:00:00 GMT", now),
            Some(0)
        );
        assert_eq!(
            retry_after_secs("999999999", now),
            Some(MAX_RETRY_AFTER_SECS)
        );
        assert_eq!(
            retry_after_secs("Fri, 01 Jan 2100 00:00:00 GMT", now),
            Some(MAX_RETRY_AFTER_SECS)
        );
        assert_eq!(retry_after_secs("-5", now), None);
        assert_eq!(retry_after_secs("soon", now), None);
    }
}
