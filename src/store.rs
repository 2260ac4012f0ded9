//! Durable state in redb: the outgoing queue, issued tokens and codes,
//! channel tokens, and the record of received messages.
//!
//! Records are JSON values under string keys: readable in a debugger and
//! free to grow a field without a migration. Writes go through one writer
//! thread that commits whatever is queued in a single transaction (group
//! commit): every caller still waits for its own data to be durable, but a
//! burst of a thousand messages costs a handful of fsyncs instead of a
//! thousand. Writes are closures that only read and write tables. They fail
//! only when storage fails (a record that does not decode is logged and
//! treated as absent, never an error), so a failed batch is a storage
//! failure and every caller in it gets the error.
//!
//! A few records are bookkeeping that the protocol redoes safely if a crash
//! loses it (a state that only says "notified", a delivery mark whose loss
//! means one more push answered `200`, a token whose loss means one more
//! handshake). Those are written [`Commit::Lazy`]: visible at once, and on
//! disk with the next durable commit or within [`LAZY_WINDOW`]. Their
//! callers wait for the commit, not for the disk, and pay no fsync of
//! their own.

use std::path::Path;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::sync::oneshot;

/// Outgoing messages by ID, delivered or not (the outbox).
const OUTBOX: TableDefinition<&str, &[u8]> = TableDefinition::new("outbox");
/// IDs of outgoing messages still to deliver: the queue the sender resumes.
const PENDING: TableDefinition<&str, u8> = TableDefinition::new("pending");
/// Received messages by `sender \n message-id`.
const RECEIVED: TableDefinition<&str, &[u8]> = TableDefinition::new("received");
/// Tokens this server issued as a receiver, by SHA-256 (never the token itself).
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
/// Receiver handshakes by `sender \n message-or-code`: hash of the last token issued.
const HANDSHAKES: TableDefinition<&str, &str> = TableDefinition::new("handshakes");
/// Authorization codes this server issued as a sender, by SHA-256.
const CODES: TableDefinition<&str, &[u8]> = TableDefinition::new("codes");
/// Channel tokens this server holds as a sender, by `sender \n recipient`.
const CHANNELS: TableDefinition<&str, &[u8]> = TableDefinition::new("channels");
/// Web UI sessions by SHA-256 of the session secret (never the secret itself).
const UI_SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("ui_sessions");
/// Received messages the owner has opened, by `recipient \n sender \n message-id`: when.
const UI_READ: TableDefinition<&str, i64> = TableDefinition::new("ui_read");
/// Senders the owner blocked in the web UI, by `recipient \n identity-or-domain`: when.
const UI_BLOCKS: TableDefinition<&str, i64> = TableDefinition::new("ui_blocks");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(String),
    #[error("database writer has stopped")]
    Closed,
}

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        StoreError::Db(e.to_string())
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Db(e.to_string()) }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

pub type Result<T> = std::result::Result<T, StoreError>;

/// Where an outgoing message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Queued,
    Notified,
    Delivered,
    Failed,
}

impl State {
    /// Still to deliver: in the queue's index.
    pub fn is_pending(self) -> bool {
        matches!(self, State::Queued | State::Notified)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Notified => "notified",
            State::Delivered => "delivered",
            State::Failed => "failed",
        }
    }
}

/// An outgoing message and its delivery state (step 0 stores it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutMessage {
    pub id: String,
    pub sender: String,
    pub recipient: String,
    pub content: String,
    pub name: Option<String>,
    pub in_reply_to: Option<String>,
    /// RFC 3339 creation time, sent as `published`.
    pub published: String,
    /// "channel" or "message": the flow chosen when it was created.
    pub flow: String,
    pub state: State,
    pub attempts: u32,
    pub last_error: Option<String>,
    /// Unix milliseconds of the next attempt.
    pub next_attempt_ms: i64,
    pub created_ms: i64,
    pub notified_ms: Option<i64>,
    pub delivered_ms: Option<i64>,
    /// Message flow: the token and endpoint handed over in step 4. Kept
    /// durably, so that a push interrupted by a restart is retried with the
    /// same token, which the receiver answers `200` if it already stored
    /// the message (a re-notify would be ignored as already received).
    #[serde(default)]
    pub grant: Option<Grant>,
}

/// A single-use token handed over in step 4 of the message flow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grant {
    pub token: String,
    pub endpoint: String,
    pub expires_ms: i64,
}

/// A token this server issued as a receiver (steps 4 and 6).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IssuedToken {
    /// `message` (single use) or `channel`.
    pub kind: String,
    pub sender: String,
    pub recipient: String,
    /// The message it was issued for (message flow).
    pub message: Option<String>,
    pub issued_ms: i64,
    pub expires_ms: i64,
    pub used: bool,
    /// From the sender's h-card when the handshake ran.
    pub sender_name: Option<String>,
    pub sender_photo: Option<String>,
}

/// A received message: where its file is and which token brought it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Received {
    pub recipient: String,
    pub path: String,
    /// The [`crate::protocol::token_key`] of the token that brought it (its
    /// hash, after the issue time for tokens that carry one; field name kept
    /// for the records already stored).
    pub token_hash: String,
    pub received_ms: i64,
}

/// An authorization code this server issued as a sender (channel flow, step 2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Code {
    pub sender: String,
    pub recipient: String,
    pub issued_ms: i64,
    pub used: bool,
}

/// A channel token held as a sender (channel flow, step 5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Channel {
    pub token: String,
    pub endpoint: String,
    pub expires_ms: i64,
}

/// The part of an [`OutMessage`] that says whether it is pending between
/// two identities.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MessageHead {
    pub sender: String,
    pub recipient: String,
    pub state: State,
}

/// A signed-in web UI session: for one site (identity).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UiSession {
    /// The site identity (canonical) the session acts for.
    pub me: String,
    /// The per-session CSRF token every form carries.
    pub csrf: String,
    pub created_ms: i64,
    pub expires_ms: i64,
    /// How the owner signed in: `password` or `indieauth`.
    pub method: String,
}

/// Outcome of recording a received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordOutcome {
    Created,
    AlreadyReceived,
}

/// When a write must be on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// Before the call returns: whatever an answer or a promise rests on.
    Durable,
    /// Visible to reads at once, on disk with the next durable commit or
    /// within [`LAZY_WINDOW`]. Only for records whose loss in a crash makes
    /// the protocol redo a step without losing or duplicating a message.
    Lazy,
}

/// The longest a lazy commit stays in memory only.
pub const LAZY_WINDOW: Duration = Duration::from_millis(500);

/// A write: runs in the batch's transaction, answers once it is committed.
type Run = Box<dyn FnOnce(&WriteTransaction) -> Result<Reply> + Send>;

struct Job {
    commit: Commit,
    run: Run,
}
type Reply = Box<dyn FnOnce(Result<()>) + Send>;

/// The database handle. Clone freely.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    writer: mpsc::Sender<Job>,
}

/// Most writes committed together in one transaction.
const MAX_BATCH: usize = 512;

fn key2(a: &str, b: &str) -> String {
    format!("{a}\n{b}")
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serialising these plain structs to JSON cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

/// Decodes a record inside a write job: a record that does not decode is
/// logged and treated as absent, so that it cannot fail the other writes
/// committed in the same batch.
fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    match serde_json::from_slice(bytes) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::error!(error = %e, "a stored record does not decode; ignoring it");
            None
        }
    }
}

fn from_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Db(format!("corrupt record: {e}")))
}

impl Store {
    /// Opens (or creates) `dir/indiepm.redb` and starts the writer thread.
    pub fn open(dir: &Path) -> Result<Store> {
        Store::open_with_lazy_window(dir, LAZY_WINDOW)
    }

    /// [`Store::open`] with another bound on how long a lazy commit may stay
    /// in memory only (tests).
    pub fn open_with_lazy_window(dir: &Path, lazy_window: Duration) -> Result<Store> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Db(format!("cannot create {}: {e}", dir.display())))?;
        let db = Database::create(dir.join("indiepm.redb"))?;
        let txn = db.begin_write()?;
        txn.open_table(OUTBOX)?;
        txn.open_table(PENDING)?;
        txn.open_table(RECEIVED)?;
        txn.open_table(TOKENS)?;
        txn.open_table(HANDSHAKES)?;
        txn.open_table(CODES)?;
        txn.open_table(CHANNELS)?;
        txn.open_table(UI_SESSIONS)?;
        txn.open_table(UI_READ)?;
        txn.open_table(UI_BLOCKS)?;
        txn.commit()?;
        let db = Arc::new(db);
        let (writer, jobs) = mpsc::channel::<Job>();
        let thread_db = db.clone();
        std::thread::Builder::new()
            .name("indiepm-store".into())
            .spawn(move || write_loop(&thread_db, jobs, lazy_window))
            .map_err(|e| StoreError::Db(format!("cannot start the writer thread: {e}")))?;
        Ok(Store { db, writer })
    }

    /// Runs `f` in the next group-committed write transaction and returns its
    /// value once the transaction is durable.
    pub async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<T> + Send + 'static,
    {
        self.write_with(Commit::Durable, f).await
    }

    /// [`Store::write`], durable now or lazily.
    pub async fn write_with<T, F>(&self, commit: Commit, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job = Job {
            commit,
            run: Box::new(move |txn| {
                let value = f(txn)?;
                Ok(Box::new(move |committed: Result<()>| {
                    let _ = tx.send(committed.map(|()| value));
                }) as Reply)
            }),
        };
        self.writer.send(job).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Makes every lazy commit so far durable (at shutdown).
    pub async fn sync(&self) -> Result<()> {
        self.write(|_| Ok(())).await
    }

    fn read_json<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<T>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(table)?;
        match t.get(key)? {
            Some(v) => Ok(Some(from_json(v.value())?)),
            None => Ok(None),
        }
    }

    // ----- sender side --------------------------------------------------

    /// Step 0: stores a new outgoing message and queues it.
    pub async fn create_message(&self, msg: OutMessage) -> Result<()> {
        self.write(move |txn| {
            txn.open_table(OUTBOX)?
                .insert(msg.id.as_str(), to_json(&msg).as_slice())?;
            txn.open_table(PENDING)?.insert(msg.id.as_str(), 0)?;
            Ok(())
        })
        .await
    }

    pub fn message(&self, id: &str) -> Result<Option<OutMessage>> {
        self.read_json(OUTBOX, id)
    }

    /// Who a message is from and to, and its state, without decoding the
    /// rest (verify and deliver ask this of every message).
    pub fn message_head(&self, id: &str) -> Result<Option<MessageHead>> {
        self.read_json(OUTBOX, id)
    }

    /// Every message not yet delivered or failed, for the queue to resume.
    pub fn pending_messages(&self) -> Result<Vec<OutMessage>> {
        let txn = self.db.begin_read()?;
        let pending = txn.open_table(PENDING)?;
        let outbox = txn.open_table(OUTBOX)?;
        let mut out = Vec::new();
        for entry in pending.iter()? {
            let (id, _) = entry?;
            if let Some(v) = outbox.get(id.value())? {
                out.push(from_json(v.value())?);
            }
        }
        Ok(out)
    }

    /// All outgoing messages of a sender identity, newest first (for the outbox page).
    pub fn outbox(&self, sender: &str) -> Result<Vec<OutMessage>> {
        let txn = self.db.begin_read()?;
        let outbox = txn.open_table(OUTBOX)?;
        let mut out: Vec<OutMessage> = Vec::new();
        for entry in outbox.iter()? {
            let (_, v) = entry?;
            let m: OutMessage = from_json(v.value())?;
            if m.sender == sender {
                out.push(m);
            }
        }
        out.sort_by_key(|m| std::cmp::Reverse(m.created_ms));
        Ok(out)
    }

    /// Applies `change` to a stored message and keeps the queue index in step.
    /// Returns the message after the change, or `None` if it does not exist.
    pub async fn update_message<F>(
        &self,
        id: &str,
        commit: Commit,
        change: F,
    ) -> Result<Option<OutMessage>>
    where
        F: FnOnce(&mut OutMessage) + Send + 'static,
    {
        let id = id.to_string();
        self.write_with(commit, move |txn| {
            let mut outbox = txn.open_table(OUTBOX)?;
            let Some(mut msg) = outbox
                .get(id.as_str())?
                .and_then(|v| decode::<OutMessage>(v.value()))
            else {
                return Ok(None);
            };
            let was_pending = msg.state.is_pending();
            change(&mut msg);
            outbox.insert(id.as_str(), to_json(&msg).as_slice())?;
            // The index changes only when the state crosses the line: a
            // page of it rewritten on every update is a page written for nothing.
            match (was_pending, msg.state.is_pending()) {
                (true, false) => {
                    txn.open_table(PENDING)?.remove(id.as_str())?;
                }
                (false, true) => {
                    txn.open_table(PENDING)?.insert(id.as_str(), 0)?;
                }
                _ => {}
            }
            Ok(Some(msg))
        })
        .await
    }

    pub async fn put_code(&self, hash: String, code: Code) -> Result<()> {
        self.write(move |txn| {
            txn.open_table(CODES)?
                .insert(hash.as_str(), to_json(&code).as_slice())?;
            Ok(())
        })
        .await
    }

    pub fn code(&self, hash: &str) -> Result<Option<Code>> {
        self.read_json(CODES, hash)
    }

    /// Step 5 of the channel flow: uses up the code and stores the channel
    /// token in one transaction. `false` if the code was used meanwhile.
    pub async fn accept_channel(
        &self,
        code_hash: String,
        sender: String,
        recipient: String,
        channel: Channel,
    ) -> Result<bool> {
        self.write(move |txn| {
            let mut codes = txn.open_table(CODES)?;
            let Some(mut code) = codes
                .get(code_hash.as_str())?
                .and_then(|v| decode::<Code>(v.value()))
            else {
                return Ok(false);
            };
            if code.used {
                return Ok(false);
            }
            code.used = true;
            codes.insert(code_hash.as_str(), to_json(&code).as_slice())?;
            txn.open_table(CHANNELS)?.insert(
                key2(&sender, &recipient).as_str(),
                to_json(&channel).as_slice(),
            )?;
            Ok(true)
        })
        .await
    }

    pub fn channel(&self, sender: &str, recipient: &str) -> Result<Option<Channel>> {
        self.read_json(CHANNELS, &key2(sender, recipient))
    }

    /// Forgets a channel token the receiver refused (401), unless it was replaced meanwhile.
    pub async fn drop_channel(&self, sender: &str, recipient: &str, token: &str) -> Result<()> {
        let key = key2(sender, recipient);
        let token = token.to_string();
        self.write(move |txn| {
            let mut t = txn.open_table(CHANNELS)?;
            let current = t
                .get(key.as_str())?
                .and_then(|v| decode::<Channel>(v.value()));
            if current.is_some_and(|c| c.token == token) {
                t.remove(key.as_str())?;
            }
            Ok(())
        })
        .await
    }

    // ----- receiver side --------------------------------------------------

    pub fn received(&self, sender: &str, message: &str) -> Result<Option<Received>> {
        self.read_json(RECEIVED, &key2(sender, message))
    }

    /// The token stored under `key` ([`crate::protocol::token_key`]).
    pub fn token(&self, key: &str) -> Result<Option<IssuedToken>> {
        self.read_json(TOKENS, key)
    }

    /// The last token issued for the handshake about `(sender, subject)`.
    pub fn handshake(&self, sender: &str, subject: &str) -> Result<Option<IssuedToken>> {
        let txn = self.db.begin_read()?;
        let handshakes = txn.open_table(HANDSHAKES)?;
        let Some(hash) = handshakes.get(key2(sender, subject).as_str())? else {
            return Ok(None);
        };
        let tokens = txn.open_table(TOKENS)?;
        match tokens.get(hash.value())? {
            Some(v) => Ok(Some(from_json(v.value())?)),
            None => Ok(None),
        }
    }

    /// Step 4: records a token under its key ([`crate::protocol::token_key`]),
    /// and the handshake it belongs to.
    pub async fn issue_token(
        &self,
        key: String,
        subject: String,
        token: IssuedToken,
        commit: Commit,
    ) -> Result<()> {
        self.write_with(commit, move |txn| {
            txn.open_table(TOKENS)?
                .insert(key.as_str(), to_json(&token).as_slice())?;
            txn.open_table(HANDSHAKES)?
                .insert(key2(&token.sender, &subject).as_str(), key.as_str())?;
            Ok(())
        })
        .await
    }

    /// Step 6: records a received message whose file is already durable, and
    /// uses up a single-use token, in one transaction.
    pub async fn record_received(
        &self,
        sender: String,
        message: String,
        received: Received,
        single_use: bool,
    ) -> Result<RecordOutcome> {
        self.write(move |txn| {
            let key = key2(&sender, &message);
            let mut t = txn.open_table(RECEIVED)?;
            if t.get(key.as_str())?.is_some() {
                return Ok(RecordOutcome::AlreadyReceived);
            }
            t.insert(key.as_str(), to_json(&received).as_slice())?;
            if single_use {
                let mut tokens = txn.open_table(TOKENS)?;
                let tok = tokens
                    .get(received.token_hash.as_str())?
                    .and_then(|v| decode::<IssuedToken>(v.value()));
                if let Some(mut tok) = tok {
                    tok.used = true;
                    tokens.insert(received.token_hash.as_str(), to_json(&tok).as_slice())?;
                }
            }
            Ok(RecordOutcome::Created)
        })
        .await
    }

    // ----- web UI (src/web) ---------------------------------------------

    /// Stores a new session by the hash of its secret, and forgets expired ones.
    pub async fn put_session(&self, hash: String, session: UiSession) -> Result<()> {
        let now = session.created_ms;
        self.write(move |txn| {
            let mut t = txn.open_table(UI_SESSIONS)?;
            let mut expired = Vec::new();
            for entry in t.iter()? {
                let (k, v) = entry?;
                let old: Option<UiSession> = serde_json::from_slice(v.value()).ok();
                if old.is_none_or(|o| o.expires_ms <= now) {
                    expired.push(k.value().to_string());
                }
            }
            for k in expired {
                t.remove(k.as_str())?;
            }
            t.insert(hash.as_str(), to_json(&session).as_slice())?;
            Ok(())
        })
        .await
    }

    pub fn session(&self, hash: &str) -> Result<Option<UiSession>> {
        self.read_json(UI_SESSIONS, hash)
    }

    pub async fn remove_session(&self, hash: String) -> Result<()> {
        self.write(move |txn| {
            txn.open_table(UI_SESSIONS)?.remove(hash.as_str())?;
            Ok(())
        })
        .await
    }

    /// Marks the received message `(sender, id)` of `recipient` as read.
    pub async fn mark_read(
        &self,
        recipient: &str,
        sender: &str,
        id: &str,
        at_ms: i64,
    ) -> Result<()> {
        let key = format!("{recipient}\n{sender}\n{id}");
        self.write(move |txn| {
            let mut t = txn.open_table(UI_READ)?;
            if t.get(key.as_str())?.is_none() {
                t.insert(key.as_str(), at_ms)?;
            }
            Ok(())
        })
        .await
    }

    /// The `(sender, id)` pairs of `recipient`'s messages that were opened.
    pub fn read_marks(
        &self,
        recipient: &str,
    ) -> Result<std::collections::HashSet<(String, String)>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(UI_READ)?;
        let prefix = format!("{recipient}\n");
        let mut out = std::collections::HashSet::new();
        for entry in t.range(prefix.as_str()..)? {
            let (k, _) = entry?;
            let Some(rest) = k.value().strip_prefix(prefix.as_str()) else {
                break;
            };
            if let Some((sender, id)) = rest.split_once('\n') {
                out.insert((sender.to_string(), id.to_string()));
            }
        }
        Ok(out)
    }

    /// Adds (`true`) or removes (`false`) a blocklist entry of `recipient`.
    pub async fn set_blocked(
        &self,
        recipient: &str,
        entry: &str,
        blocked: bool,
        at_ms: i64,
    ) -> Result<()> {
        let key = key2(recipient, entry);
        self.write(move |txn| {
            let mut t = txn.open_table(UI_BLOCKS)?;
            if blocked {
                t.insert(key.as_str(), at_ms)?;
            } else {
                t.remove(key.as_str())?;
            }
            Ok(())
        })
        .await
    }

    /// The blocklist entries (identity URLs or domains) `recipient` added in the web UI.
    pub fn blocks(&self, recipient: &str) -> Result<Vec<String>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(UI_BLOCKS)?;
        let prefix = format!("{recipient}\n");
        let mut out = Vec::new();
        for entry in t.range(prefix.as_str()..)? {
            let (k, _) = entry?;
            let Some(rest) = k.value().strip_prefix(prefix.as_str()) else {
                break;
            };
            out.push(rest.to_string());
        }
        Ok(out)
    }
}

/// How long an expired token is kept: a sender retrying a push it lost the
/// answer to still gets its `200` (PROTOCOL.md step 6) for this long.
pub const TOKEN_RETENTION_MS: i64 = 7 * 86_400_000;
/// How long a code is kept after it was issued (it is valid 10 minutes).
pub const CODE_RETENTION_MS: i64 = 86_400_000;

impl Store {
    /// Removes tokens expired more than [`TOKEN_RETENTION_MS`] ago, codes
    /// issued more than [`CODE_RETENTION_MS`] ago, and handshakes whose
    /// token is gone, so that strangers' handshakes do not grow the
    /// database forever. Returns how many rows went. (Received messages are
    /// kept: they are what makes a late retry a no-op.)
    pub async fn sweep(&self, now_ms: i64) -> Result<usize> {
        self.write(move |txn| {
            let mut removed = 0;
            let mut tokens = txn.open_table(TOKENS)?;
            let old: Vec<String> = tokens
                .iter()?
                .filter_map(|e| e.ok())
                .filter(|(_, v)| {
                    decode::<IssuedToken>(v.value())
                        .is_none_or(|t| t.expires_ms + TOKEN_RETENTION_MS < now_ms)
                })
                .map(|(k, _)| k.value().to_string())
                .collect();
            for k in &old {
                tokens.remove(k.as_str())?;
            }
            removed += old.len();
            let mut handshakes = txn.open_table(HANDSHAKES)?;
            let orphans: Vec<String> = handshakes
                .iter()?
                .filter_map(|e| e.ok())
                .filter(|(_, hash)| tokens.get(hash.value()).ok().flatten().is_none())
                .map(|(k, _)| k.value().to_string())
                .collect();
            for k in &orphans {
                handshakes.remove(k.as_str())?;
            }
            removed += orphans.len();
            let mut codes = txn.open_table(CODES)?;
            let old: Vec<String> = codes
                .iter()?
                .filter_map(|e| e.ok())
                .filter(|(_, v)| {
                    decode::<Code>(v.value())
                        .is_none_or(|c| c.issued_ms + CODE_RETENTION_MS < now_ms)
                })
                .map(|(k, _)| k.value().to_string())
                .collect();
            for k in &old {
                codes.remove(k.as_str())?;
            }
            removed += old.len();
            Ok(removed)
        })
        .await
    }
}

fn write_loop(db: &Database, jobs: mpsc::Receiver<Job>, window: Duration) {
    // Since when a lazy commit has been in memory only.
    let mut unsynced: Option<Instant> = None;
    loop {
        let first = match unsynced {
            None => match jobs.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
            Some(since) => {
                let left = window.saturating_sub(since.elapsed());
                match jobs.recv_timeout(left) {
                    Ok(job) => job,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if run_batch(db, Vec::new(), Commit::Durable) {
                            unsynced = None;
                        }
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        run_batch(db, Vec::new(), Commit::Durable);
                        return;
                    }
                }
            }
        };
        let batch = crate::app::fill_batch(first, &jobs, MAX_BATCH);
        // One durable job makes the whole batch durable; so does a lazy
        // commit that has waited its window out.
        let commit = if batch.iter().any(|j| j.commit == Commit::Durable)
            || unsynced.is_some_and(|t| t.elapsed() >= window)
        {
            Commit::Durable
        } else {
            Commit::Lazy
        };
        let committed = run_batch(db, batch, commit);
        match (commit, committed) {
            (Commit::Durable, true) => unsynced = None,
            (Commit::Lazy, true) => {
                unsynced.get_or_insert_with(Instant::now);
            }
            (_, false) => {}
        }
    }
}

/// Runs a batch in one transaction; `true` if it committed.
fn run_batch(db: &Database, batch: Vec<Job>, commit: Commit) -> bool {
    let mut txn = match db.begin_write() {
        Ok(t) => t,
        Err(e) => {
            // The jobs are dropped unrun: their callers see `Closed`-like errors.
            tracing::error!(error = %e, "cannot begin a write transaction");
            return false;
        }
    };
    if commit == Commit::Lazy
        && let Err(e) = txn.set_durability(redb::Durability::None)
    {
        // Durable instead: slower, never wrong.
        tracing::warn!(error = %e, "cannot make a lazy commit; committing durably");
    }
    let mut replies = Vec::with_capacity(batch.len());
    let mut failure = None;
    for job in batch {
        match (job.run)(&txn) {
            Ok(reply) => replies.push(reply),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let outcome = match failure {
        Some(e) => {
            let _ = txn.abort();
            Err(e)
        }
        None => txn.commit().map_err(StoreError::from),
    };
    if let Err(e) = &outcome {
        tracing::error!(error = %e, "write transaction failed; nothing in it was stored");
    }
    let committed = outcome.is_ok();
    for reply in replies {
        reply(match &outcome {
            Ok(()) => Ok(()),
            Err(e) => Err(StoreError::Db(e.to_string())),
        });
    }
    committed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: &str) -> OutMessage {
        OutMessage {
            id: id.into(),
            sender: "https://a.example/".into(),
            recipient: "https://b.example/".into(),
            content: "hi".into(),
            name: None,
            in_reply_to: None,
            published: "2026-01-01T00:00:00Z".into(),
            flow: "channel".into(),
            state: State::Queued,
            attempts: 0,
            last_error: None,
            next_attempt_ms: 0,
            created_ms: 0,
            notified_ms: None,
            delivered_ms: None,
            grant: None,
        }
    }

    /// The state a crash would leave right now: a copy of the database
    /// file as written so far, opened (and repaired) as after a restart.
    fn after_crash(dir: &Path, id: &str) -> Option<State> {
        let copy = tempfile::tempdir().unwrap();
        std::fs::copy(dir.join("indiepm.redb"), copy.path().join("indiepm.redb")).unwrap();
        let store = Store::open(copy.path()).unwrap();
        store.message(id).unwrap().map(|m| m.state)
    }

    #[tokio::test]
    async fn a_lazy_write_is_seen_at_once_and_made_durable_by_the_next_durable_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with_lazy_window(dir.path(), Duration::from_secs(600)).unwrap();
        store.create_message(msg("m1")).await.unwrap();
        store
            .update_message("m1", Commit::Lazy, |m| m.state = State::Notified)
            .await
            .unwrap();
        assert_eq!(store.message("m1").unwrap().unwrap().state, State::Notified);
        assert_eq!(
            after_crash(dir.path(), "m1"),
            Some(State::Queued),
            "a lazy commit is in memory only"
        );
        store.create_message(msg("m2")).await.unwrap();
        assert_eq!(after_crash(dir.path(), "m1"), Some(State::Notified));
        store
            .update_message("m2", Commit::Lazy, |m| m.state = State::Delivered)
            .await
            .unwrap();
        store.sync().await.unwrap();
        assert_eq!(after_crash(dir.path(), "m2"), Some(State::Delivered));
    }

    #[tokio::test]
    async fn a_lazy_write_reaches_the_disk_within_its_window_by_itself() {
        let dir = tempfile::tempdir().unwrap();
        let window = Duration::from_millis(200);
        let store = Store::open_with_lazy_window(dir.path(), window).unwrap();
        store.create_message(msg("m1")).await.unwrap();
        let written = std::time::Instant::now();
        store
            .update_message("m1", Commit::Lazy, |m| m.state = State::Delivered)
            .await
            .unwrap();
        // Nothing else is written: the writer syncs on its own.
        while after_crash(dir.path(), "m1") != Some(State::Delivered) {
            assert!(
                written.elapsed() < Duration::from_secs(10),
                "the lazy write never reached the disk"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(written.elapsed() >= window, "synced before its window");
    }

    #[tokio::test]
    async fn queue_survives_reopen_and_tracks_pending() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let mut writes = Vec::new();
            for i in 0..50 {
                let s = store.clone();
                writes.push(tokio::spawn(async move {
                    s.create_message(msg(&format!("m{i:03}"))).await
                }));
            }
            for w in writes {
                w.await.unwrap().unwrap();
            }
            store
                .update_message("m007", Commit::Durable, |m| m.state = State::Delivered)
                .await
                .unwrap()
                .unwrap();
        }
        // The writer thread of the first handle ends when its channel closes;
        // give it a moment to release the file.
        let mut store = None;
        for _ in 0..50 {
            match Store::open(dir.path()) {
                Ok(s) => {
                    store = Some(s);
                    break;
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
        let store = store.unwrap();
        let pending = store.pending_messages().unwrap();
        assert_eq!(pending.len(), 49);
        assert!(pending.iter().all(|m| m.id != "m007"));
        assert_eq!(
            store.message("m007").unwrap().unwrap().state,
            State::Delivered
        );
    }

    #[tokio::test]
    async fn sweep_drops_old_tokens_codes_and_orphan_handshakes_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let tok = |expires_ms| IssuedToken {
            kind: "message".into(),
            sender: "https://a.example/".into(),
            recipient: "https://b.example/".into(),
            message: Some("M".into()),
            issued_ms: 0,
            expires_ms,
            used: false,
            sender_name: None,
            sender_photo: None,
        };
        let now = 100 * 86_400_000;
        store
            .issue_token(
                "old".into(),
                "M1".into(),
                tok(now - TOKEN_RETENTION_MS - 1),
                Commit::Durable,
            )
            .await
            .unwrap();
        store
            .issue_token(
                "recent".into(),
                "M2".into(),
                tok(now - 1000),
                Commit::Durable,
            )
            .await
            .unwrap();
        let code = |issued_ms| Code {
            sender: "https://a.example/".into(),
            recipient: "https://b.example/".into(),
            issued_ms,
            used: false,
        };
        store
            .put_code("c-old".into(), code(now - CODE_RETENTION_MS - 1))
            .await
            .unwrap();
        store
            .put_code("c-new".into(), code(now - 1000))
            .await
            .unwrap();
        assert_eq!(
            store.sweep(now).await.unwrap(),
            3,
            "old token, its handshake, old code"
        );
        assert!(store.token("old").unwrap().is_none());
        assert!(
            store
                .handshake("https://a.example/", "M1")
                .unwrap()
                .is_none()
        );
        assert!(store.token("recent").unwrap().is_some());
        assert!(
            store
                .handshake("https://a.example/", "M2")
                .unwrap()
                .is_some()
        );
        assert!(store.code("c-old").unwrap().is_none());
        assert!(store.code("c-new").unwrap().is_some());
        assert_eq!(store.sweep(now).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn received_is_recorded_once_and_uses_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let tok = IssuedToken {
            kind: "message".into(),
            sender: "https://a.example/".into(),
            recipient: "https://b.example/".into(),
            message: Some("M".into()),
            issued_ms: 0,
            expires_ms: i64::MAX,
            used: false,
            sender_name: None,
            sender_photo: None,
        };
        store
            .issue_token("h1".into(), "M".into(), tok, Commit::Durable)
            .await
            .unwrap();
        assert!(
            !store
                .handshake("https://a.example/", "M")
                .unwrap()
                .unwrap()
                .used
        );
        let rec = Received {
            recipient: "https://b.example/".into(),
            path: "x.md".into(),
            token_hash: "h1".into(),
            received_ms: 1,
        };
        let a = store
            .record_received("https://a.example/".into(), "M".into(), rec.clone(), true)
            .await
            .unwrap();
        let b = store
            .record_received("https://a.example/".into(), "M".into(), rec, true)
            .await
            .unwrap();
        assert_eq!(
            (a, b),
            (RecordOutcome::Created, RecordOutcome::AlreadyReceived)
        );
        assert!(store.token("h1").unwrap().unwrap().used);
    }
}
