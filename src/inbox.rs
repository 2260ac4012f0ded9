//! The file inbox (CONTRACT.md, "The inbox file"): one markdown file per
//! message, under the site's content folder, that the site generator never
//! publishes.
//!
//! Each file is front matter in the site's flavor and the message's
//! CommonMark text with raw HTML and template delimiters neutralised. The
//! front matter is written by encoders (`toml_writer` for TOML, `serde_json`
//! for YAML, whose strings are valid YAML double-quoted scalars) from fixed
//! keys, and every string value is a single-line quoted scalar, so no input
//! can close the front matter or add a key.
//!
//! What keeps each generator from publishing a message, measured with the
//! real generators (see `tests/inbox.rs`):
//!
//! | flavor | default folder | message front matter | folder files |
//! | --- | --- | --- | --- |
//! | hugo | `inbox`, `sent` | `[build]` `render`/`list` = `"never"` (Hugo ≥ 0.145), plus `draft`, a past `expiryDate` and a far `publishDate` (older Hugo, which ignores `build` and rejects nothing; Hugo ≥ 0.145 rejects `_build`) | `_index.md` with `[build]` and `[cascade.build]` |
//! | zola | `inbox`, `sent` | `draft`, `render = false`, `in_search_index = false`, no `date` (no feed); fields under `[extra]` | `_index.md` with `render = false` |
//! | jekyll | `_inbox`, `_sent` (Jekyll skips `_` folders) | `published: false`, `render_with_liquid: false`, `sitemap: false` | |
//! | eleventy | `inbox`, `sent` | `permalink: false`, `eleventyExcludeFromCollections: true`, `templateEngineOverride: md` | `<folder>.11tydata.json` with the same keys |
//!
//! Every folder also gets a `.gitignore` holding `*`. Temporary files start
//! with a dot and end in `.tmp`, which no generator renders.

use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::ops::Range;
use std::path::{Path, PathBuf};

use chrono::{DateTime, FixedOffset, SecondsFormat, Utc};
use pulldown_cmark::{Event, Options, Parser, Tag, TagEnd};
use toml_writer::{TomlStringBuilder, TomlWrite};

use crate::config::{Flavor, SiteConfig};
use crate::identity::Identity;

mod durable;
pub mod writer;

use durable::{start_writeback, sync_dir};

/// Which folder a message file goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Folder {
    /// Received messages (`SiteConfig::inbox_dir`).
    Inbox,
    /// Copies of sent messages (`SiteConfig::sent_dir`).
    Sent,
}

/// A message to write. Everything but the identities and IDs is untrusted.
pub struct MessageFile<'a> {
    pub sender: &'a Identity,
    pub recipient: &'a Identity,
    /// Message ID, already validated: 22-128 chars of `A-Za-z0-9-_`.
    pub id: &'a str,
    pub published: DateTime<FixedOffset>,
    pub received: DateTime<Utc>,
    /// Subject, at most 256 characters, untrusted.
    pub name: Option<&'a str>,
    /// ID of the message this one answers, validated.
    pub in_reply_to: Option<&'a str>,
    /// CommonMark from a stranger, untrusted.
    pub content: &'a str,
    /// From the sender's h-card, untrusted.
    pub sender_name: Option<&'a str>,
    /// URL from the sender's h-card, untrusted.
    pub sender_photo: Option<&'a str>,
}

/// A message file read back: its front matter fields and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub path: PathBuf,
    pub sender: String,
    pub recipient: String,
    pub id: String,
    pub published: DateTime<FixedOffset>,
    pub received: Option<DateTime<Utc>>,
    /// The subject.
    pub name: Option<String>,
    pub in_reply_to: Option<String>,
    pub sender_name: Option<String>,
    pub sender_photo: Option<String>,
    /// The (neutralised) CommonMark body.
    pub body: String,
}

/// Front matter keys of the message fields, the same in every flavor.
pub mod keys {
    pub const SENDER: &str = "sender";
    pub const RECIPIENT: &str = "recipient";
    pub const ID: &str = "message_id";
    /// Not `published`: Jekyll reserves it for visibility, Hugo reads it as publishDate.
    pub const PUBLISHED: &str = "published_at";
    pub const RECEIVED: &str = "received_at";
    pub const SUBJECT: &str = "subject";
    pub const IN_REPLY_TO: &str = "in_reply_to";
    pub const SENDER_NAME: &str = "sender_name";
    pub const SENDER_PHOTO: &str = "sender_photo";
}

/// How many of the ID's last characters name a file, before any collision.
/// The last ones: IDs may start with their time (ours do, see
/// [`crate::protocol::new_message_id`]), so their first characters are shared
/// by every message of the same moment; the end is the random part.
pub const ID_PART_LEN: usize = 12;

/// The folder of `folder` for `site`.
pub fn folder_dir(site: &SiteConfig, folder: Folder) -> PathBuf {
    match folder {
        Folder::Inbox => site.inbox_dir(),
        Folder::Sent => site.sent_dir(),
    }
}

/// Writes durably: temp file whose name starts with '.', write, fsync, rename,
/// fsync dir. Returns the final path.
///
/// The name is `YYYY-MM-DD-HOST-IDPART.md` from the published date (UTC), the
/// peer's host (the sender's in the inbox, the recipient's in the sent folder)
/// reduced to `[a-z0-9.-]`, and the last 12 characters of the ID. A file of
/// that name holding the same message ID is replaced (a retry stores no
/// duplicate); one holding another ID takes more of the ID.
///
/// The server writes through [`writer::Writer`], which does the same for a
/// batch of messages with shared syncs.
pub fn write_message(site: &SiteConfig, folder: Folder, msg: &MessageFile) -> io::Result<PathBuf> {
    write_batch(vec![render_file(site, folder, msg)])
        .pop()
        .unwrap_or_else(|| Err(io::Error::other("nothing written")))
}

/// A message file ready to be written: where, what, and its name's parts.
pub struct Rendered {
    dir: PathBuf,
    flavor: Flavor,
    text: String,
    /// `DATE-HOST-`, the start of the file name.
    stem: String,
    id: String,
}

/// Checks the IDs and renders the whole file (no I/O).
pub fn render_file(site: &SiteConfig, folder: Folder, msg: &MessageFile) -> io::Result<Rendered> {
    if !crate::protocol::is_valid_id(msg.id) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "message ID must be 22-128 characters of A-Za-z0-9-_",
        ));
    }
    if msg
        .in_reply_to
        .is_some_and(|r| !crate::protocol::is_valid_id(r))
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "in-reply-to must be a message ID",
        ));
    }
    let peer = match folder {
        Folder::Inbox => msg.sender,
        Folder::Sent => msg.recipient,
    };
    Ok(Rendered {
        dir: folder_dir(site, folder),
        flavor: site.flavor,
        text: render_message(site.flavor, msg)?,
        stem: format!(
            "{}-{}-",
            date_part(&msg.published.min(msg.received.fixed_offset())),
            sanitize_host(peer.host())
        ),
        id: msg.id.to_string(),
    })
}

/// An error for every member of a group that one failure sank.
type Shared = Option<(io::ErrorKind, String)>;

fn shared(e: &io::Error) -> Shared {
    Some((e.kind(), e.to_string()))
}

fn unshare(e: &Shared, what: &str, dir: &Path) -> io::Result<()> {
    match e {
        None => Ok(()),
        Some((kind, why)) => Err(io::Error::new(
            *kind,
            format!("cannot {what} {}: {why}", dir.display()),
        )),
    }
}

/// Runs `f` once per distinct folder, remembering its outcome.
fn once_per_dir(
    done: &mut Vec<(PathBuf, Shared)>,
    dir: &Path,
    f: impl FnOnce() -> io::Result<()>,
) -> Shared {
    if let Some((_, outcome)) = done.iter().find(|(d, _)| d == dir) {
        return outcome.clone();
    }
    let outcome = f().err().as_ref().and_then(shared);
    done.push((dir.to_path_buf(), outcome.clone()));
    outcome
}

/// Makes rendered messages durable under their names, sharing the work:
/// each folder is prepared once, every temp file is written and synced
/// (together: [`durable::sync_files`]), then renamed, then each folder is
/// synced once. A result is `Ok` only when its file and its name are both
/// on disk.
pub fn write_batch(files: Vec<io::Result<Rendered>>) -> Vec<io::Result<PathBuf>> {
    let mut prepared = Vec::new();
    let staged: Vec<io::Result<(tempfile::NamedTempFile, Rendered)>> = files
        .into_iter()
        .map(|r| {
            let r = r?;
            let ready = once_per_dir(&mut prepared, &r.dir, || prepare_folder(&r.dir, r.flavor));
            unshare(&ready, "prepare", &r.dir)?;
            let mut tmp = tempfile::Builder::new()
                .prefix(".indiepm-")
                .suffix(".tmp")
                .tempfile_in(&r.dir)?;
            tmp.write_all(r.text.as_bytes())?;
            Ok((tmp, r))
        })
        .collect();
    let written: Vec<(&std::fs::File, &Path)> = staged
        .iter()
        .flatten()
        .map(|(tmp, r)| (tmp.as_file(), r.dir.as_path()))
        .collect();
    for (file, _) in &written {
        start_writeback(file);
    }
    let mut synced_files = durable::sync_files(&written).into_iter();
    // On any failure the temp file is dropped, which deletes it.
    let placed: Vec<io::Result<(PathBuf, PathBuf)>> = staged
        .into_iter()
        .map(|s| {
            let (tmp, r) = s?;
            synced_files
                .next()
                .unwrap_or_else(|| Err(io::Error::other("file not synced")))?;
            let path = place(tmp, &r.dir, &r.stem, &r.id)?;
            Ok((r.dir, path))
        })
        .collect();
    let mut synced = Vec::new();
    placed
        .into_iter()
        .map(|p| {
            let (dir, path) = p?;
            // Named but maybe not durably if this fails: the caller answers
            // with an error, and the retry finds the file by its ID and
            // rewrites it.
            unshare(
                &once_per_dir(&mut synced, &dir, || sync_dir(&dir)),
                "sync",
                &dir,
            )?;
            Ok(path)
        })
        .collect()
}

/// Renames the synced temp file to the first free name, or over the file
/// that already holds message `id` (a retry). The no-replace rename makes
/// taking a free name atomic: two writers never get the same one.
fn place(
    mut tmp: tempfile::NamedTempFile,
    dir: &Path,
    stem: &str,
    id: &str,
) -> io::Result<PathBuf> {
    let safe_id: String = id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect();
    let mut lens: Vec<usize> = [ID_PART_LEN, 16, 22, 32, 64, safe_id.len()]
        .into_iter()
        .map(|n| n.min(safe_id.len()))
        .collect();
    lens.dedup();
    let candidates = lens
        .into_iter()
        .map(|n| format!("{stem}{}.md", &safe_id[safe_id.len() - n..]))
        .chain((2..1000).map(|n| format!("{stem}{safe_id}-{n}.md")));
    for name in candidates {
        let path = dir.join(name);
        match tmp.persist_noclobber(&path) {
            Ok(_) => return Ok(path),
            Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => {
                tmp = e.file;
                let same = std::fs::symlink_metadata(&path)?.is_file()
                    && read_message(&path).is_ok_and(|m| m.id == id);
                if same {
                    tmp.persist(&path).map_err(|e| e.error)?;
                    return Ok(path);
                }
            }
            Err(e) => return Err(e.error),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("no free file name for message {id} in {}", dir.display()),
    ))
}

/// `YYYY-MM-DD` in UTC, digits and dashes only, of the published time, or
/// of the received time when the sender claims a later one (a message dated
/// 9999 must not sit on top of the inbox forever). The published time is
/// stable across retries, so a retried delivery lands on the same name.
fn date_part(published: &DateTime<FixedOffset>) -> String {
    published
        .with_timezone(&Utc)
        .format("%Y-%m-%d")
        .to_string()
        .chars()
        .filter(|c| c.is_ascii_digit() || *c == '-')
        .collect()
}

/// A host reduced to `[a-z0-9.-]`: other characters become `-`, runs of
/// them collapse, and no dot or dash starts or ends it. At most 63 bytes.
pub fn sanitize_host(host: &str) -> String {
    let mut out = String::new();
    for c in host.chars().flat_map(char::to_lowercase) {
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' {
            c
        } else {
            '-'
        };
        if c == '-' && out.ends_with('-') || c == '.' && out.ends_with('.') {
            continue;
        }
        out.push(c);
        if out.len() >= 63 {
            break;
        }
    }
    let trimmed = out.trim_matches(|c| c == '.' || c == '-');
    if trimmed.is_empty() {
        "unknown".into()
    } else {
        trimmed.to_string()
    }
}

/// Creates the folder and its privacy files if they are missing.
fn prepare_folder(dir: &Path, flavor: Flavor) -> io::Result<()> {
    if !dir.is_dir() {
        std::fs::create_dir_all(dir)?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
    }
    ensure_file(&dir.join(".gitignore"), || {
        Ok("# Private messages written by indiepm: never commit them.\n*\n".into())
    })?;
    match flavor {
        Flavor::Hugo => ensure_file(&dir.join("_index.md"), hugo_section),
        Flavor::Zola => ensure_file(&dir.join("_index.md"), zola_section),
        Flavor::Eleventy => {
            let folder = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            ensure_file(&dir.join(format!("{folder}.11tydata.json")), || {
                let data = serde_json::json!({
                    "permalink": false,
                    "eleventyExcludeFromCollections": true,
                    "templateEngineOverride": "md",
                });
                Ok(serde_json::to_string_pretty(&data).map_err(io::Error::other)? + "\n")
            })
        }
        Flavor::Jekyll => Ok(()),
    }
}

/// Writes `text` to `path` durably unless something is already there.
/// The text is made only when the file is missing (it is there on every
/// message but the first).
fn ensure_file(path: &Path, text: impl FnOnce() -> io::Result<String>) -> io::Result<()> {
    if std::fs::symlink_metadata(path).is_ok() {
        return Ok(());
    }
    let text = text()?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".indiepm-")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(text.as_bytes())?;
    tmp.as_file().sync_all()?;
    match tmp.persist_noclobber(path) {
        Ok(_) => {}
        Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e.error),
    }
    sync_dir(dir)
}

// ---------------------------------------------------------------------------
// Front matter

/// A front matter value: a string or a boolean.
enum Val<'a> {
    Str(&'a str),
    Bool(bool),
}

/// A front matter key and its value.
type KeyVal<'a> = (&'a str, Val<'a>);

/// A TOML table: its dotted header path and its keys.
type TomlTable<'a> = (&'a [&'a str], &'a [KeyVal<'a>]);

/// The message fields in their order in the file.
fn message_fields(msg: &MessageFile) -> Vec<(&'static str, String)> {
    let mut f = vec![
        (keys::SENDER, msg.sender.as_str().to_string()),
        (keys::RECIPIENT, msg.recipient.as_str().to_string()),
        (keys::ID, msg.id.to_string()),
        (
            keys::PUBLISHED,
            msg.published.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        ),
        (
            keys::RECEIVED,
            msg.received.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        ),
    ];
    let optional = [
        (keys::SUBJECT, msg.name),
        (keys::IN_REPLY_TO, msg.in_reply_to),
        (keys::SENDER_NAME, msg.sender_name),
        (keys::SENDER_PHOTO, msg.sender_photo),
    ];
    f.extend(
        optional
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v.to_string()))),
    );
    f
}

/// Hugo dates that hide a page from Hugo versions that ignore `[build]`
/// (before 0.145): expired unless `-E`, future unless `-F`, draft unless `-D`.
const HUGO_OLD_GUARDS: [(&str, Val<'static>); 3] = [
    ("draft", Val::Bool(true)),
    ("expiryDate", Val::Str("1970-01-01T00:00:00Z")),
    ("publishDate", Val::Str("9999-12-31T00:00:00Z")),
];

const HUGO_BUILD: [(&str, Val<'static>); 3] = [
    ("list", Val::Str("never")),
    ("publishResources", Val::Bool(false)),
    ("render", Val::Str("never")),
];

/// The whole text of a message file.
fn render_message(flavor: Flavor, msg: &MessageFile) -> io::Result<String> {
    let fields = message_fields(msg);
    let field_vals: Vec<(&str, Val)> = fields
        .iter()
        .map(|(k, v)| (*k, Val::Str(v.as_str())))
        .collect();
    let front = match flavor {
        Flavor::Hugo => {
            let mut top: Vec<(&str, Val)> = HUGO_OLD_GUARDS.into_iter().collect();
            top.extend(field_vals);
            toml_front(&top, &[(&["build"], &HUGO_BUILD)])?
        }
        Flavor::Zola => {
            let top = [
                ("draft", Val::Bool(true)),
                ("in_search_index", Val::Bool(false)),
                ("render", Val::Bool(false)),
            ];
            toml_front(&top, &[(&["extra"], &field_vals)])?
        }
        Flavor::Jekyll => {
            let mut top = vec![
                ("published", Val::Bool(false)),
                ("render_with_liquid", Val::Bool(false)),
                ("sitemap", Val::Bool(false)),
            ];
            top.extend(field_vals);
            yaml_front(&top)
        }
        Flavor::Eleventy => {
            let mut top = vec![
                ("permalink", Val::Bool(false)),
                ("eleventyExcludeFromCollections", Val::Bool(true)),
                ("templateEngineOverride", Val::Str("md")),
            ];
            top.extend(field_vals);
            yaml_front(&top)
        }
    };
    let body = sanitize_body(msg.content);
    let text = format!("{front}\n{body}");
    // Belt and braces: the file must read back with exactly these fields.
    let back = parse_message(Path::new(""), &text)?;
    let ok = back.id == msg.id
        && back.sender == msg.sender.as_str()
        && back.recipient == msg.recipient.as_str()
        && back.name.as_deref() == msg.name
        && back.in_reply_to.as_deref() == msg.in_reply_to
        && back.sender_name.as_deref() == msg.sender_name
        && back.sender_photo.as_deref() == msg.sender_photo
        && back.body == body;
    if !ok {
        return Err(io::Error::other("message front matter does not read back"));
    }
    Ok(text)
}

/// The `_index.md` of a Hugo inbox: hides the section page and, through
/// `cascade`, every page under it.
fn hugo_section() -> io::Result<String> {
    toml_front(
        &HUGO_OLD_GUARDS,
        &[
            (&["build"], &HUGO_BUILD),
            (&["cascade", "build"], &HUGO_BUILD),
        ],
    )
    .map(|f| f + "\n")
}

/// The `_index.md` of a Zola inbox (section front matter rejects unknown keys).
fn zola_section() -> io::Result<String> {
    toml_front(
        &[
            ("in_search_index", Val::Bool(false)),
            ("render", Val::Bool(false)),
        ],
        &[],
    )
    .map(|f| f + "\n")
}

/// TOML front matter between `+++` lines: top-level keys, then tables.
/// Strings are always single-line basic strings (the `toml` crate would
/// write a string holding a newline as a multi-line string, whose lines
/// could close the front matter).
fn toml_front(top: &[KeyVal], tables: &[TomlTable]) -> io::Result<String> {
    let mut out = String::from("+++\n");
    let write = |out: &mut String| -> std::fmt::Result {
        for (k, v) in top {
            toml_kv(out, k, v)?;
        }
        for (path, kvs) in tables {
            out.open_table_header()?;
            for (i, part) in path.iter().enumerate() {
                if i > 0 {
                    out.key_sep()?;
                }
                out.key(*part)?;
            }
            out.close_table_header()?;
            out.newline()?;
            for (k, v) in *kvs {
                toml_kv(out, k, v)?;
            }
        }
        Ok(())
    };
    write(&mut out).map_err(io::Error::other)?;
    out.push_str("+++\n");
    Ok(out)
}

fn toml_kv(out: &mut String, key: &str, val: &Val) -> std::fmt::Result {
    out.key(key)?;
    out.space()?;
    out.keyval_sep()?;
    out.space()?;
    match val {
        Val::Str(s) => out.value(TomlStringBuilder::new(s).as_basic())?,
        Val::Bool(b) => out.value(*b)?,
    }
    out.newline()
}

/// YAML front matter between `---` lines: one `key: value` line per field,
/// each value a JSON scalar (JSON is YAML 1.2 flow syntax) with the
/// characters YAML 1.1 readers treat as line breaks or refuse escaped too.
fn yaml_front(fields: &[(&str, Val)]) -> String {
    let mut out = String::from("---\n");
    for (k, v) in fields {
        let value = match v {
            Val::Str(s) => yaml_string(s),
            Val::Bool(b) => b.to_string(),
        };
        // Keys are compile-time constants made of [A-Za-z_].
        let _ = writeln!(out, "{k}: {value}");
    }
    out.push_str("---\n");
    out
}

/// A YAML double-quoted scalar for any string.
pub fn yaml_string(s: &str) -> String {
    // serde_json cannot fail on a &str.
    let json = serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        let printable = matches!(c, '\u{20}'..='\u{7e}' | '\u{a0}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}')
            && !matches!(c, '\u{2028}' | '\u{2029}' | '\u{feff}')
            || c >= '\u{10000}';
        if printable {
            out.push(c);
        } else {
            let _ = write!(out, "\\u{:04X}", c as u32);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Reading

/// Reads back a message file (for the web UI): front matter fields + body.
pub fn read_message(path: &Path) -> io::Result<StoredMessage> {
    let text = std::fs::read_to_string(path)?;
    parse_message(path, &text)
}

fn invalid(path: &Path, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {what}", path.display()),
    )
}

/// Splits `text` at the closing `fence` line: (front matter, body).
fn split_front<'t>(text: &'t str, fence: &str) -> Option<(&'t str, &'t str)> {
    let rest = text
        .strip_prefix(fence)
        .and_then(|r| r.strip_prefix('\n').or_else(|| r.strip_prefix("\r\n")))?;
    let mut pos = 0;
    for line in rest.split_inclusive('\n') {
        if line.trim_end() == fence || fence == "---" && line.trim_end() == "..." {
            let body = &rest[pos + line.len()..];
            return Some((&rest[..pos], body));
        }
        pos += line.len();
    }
    None
}

/// The string fields of the front matter.
type FieldMap = std::collections::BTreeMap<String, String>;

fn toml_fields(front: &str) -> Option<FieldMap> {
    let table: toml::Table = toml::from_str(front).ok()?;
    let src = match table.get("extra") {
        Some(toml::Value::Table(extra)) if !table.contains_key(keys::ID) => extra,
        _ => &table,
    };
    Some(
        src.iter()
            .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
            .collect(),
    )
}

/// Reads the YAML that [`yaml_front`] writes: top-level `key: scalar` lines
/// whose scalars are double-quoted (JSON), single-quoted or plain.
fn yaml_fields(front: &str) -> FieldMap {
    let mut map = FieldMap::new();
    for line in front.lines() {
        if line.starts_with([' ', '\t', '#', '-']) {
            continue;
        }
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        let value = if v.starts_with('"') {
            match serde_json::from_str::<String>(v) {
                Ok(s) => s,
                Err(_) => continue,
            }
        } else if let Some(inner) = v.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')) {
            inner.replace("''", "'")
        } else {
            v.to_string()
        };
        map.insert(k.trim().to_string(), value);
    }
    map
}

fn parse_message(path: &Path, text: &str) -> io::Result<StoredMessage> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let (fields, body) = if let Some((front, body)) = split_front(text, "+++") {
        let fields = toml_fields(front).ok_or_else(|| invalid(path, "bad TOML front matter"))?;
        (fields, body)
    } else if let Some((front, body)) = split_front(text, "---") {
        (yaml_fields(front), body)
    } else {
        return Err(invalid(path, "no front matter"));
    };
    let get = |k: &str| fields.get(k).cloned();
    let need = |k: &str| get(k).ok_or_else(|| invalid(path, &format!("no `{k}`")));
    let published = DateTime::parse_from_rfc3339(&need(keys::PUBLISHED)?)
        .map_err(|_| invalid(path, "bad published_at"))?;
    let received = match get(keys::RECEIVED) {
        Some(r) => Some(
            DateTime::parse_from_rfc3339(&r)
                .map_err(|_| invalid(path, "bad received_at"))?
                .with_timezone(&Utc),
        ),
        None => None,
    };
    let body = body
        .strip_prefix('\n')
        .or_else(|| body.strip_prefix("\r\n"))
        .unwrap_or(body);
    Ok(StoredMessage {
        path: path.to_path_buf(),
        sender: need(keys::SENDER)?,
        recipient: need(keys::RECIPIENT)?,
        id: need(keys::ID)?,
        published,
        received,
        name: get(keys::SUBJECT),
        in_reply_to: get(keys::IN_REPLY_TO),
        sender_name: get(keys::SENDER_NAME),
        sender_photo: get(keys::SENDER_PHOTO),
        body: body.to_string(),
    })
}

/// Lists message files of a folder, newest first (by the date in the name,
/// then by modification time). A missing folder has none.
pub fn list_messages(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".md") || name.starts_with(['.', '_']) {
            continue;
        }
        let meta = entry.metadata()?;
        if !meta.is_file() {
            continue;
        }
        let mtime = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
        let date: String = name.chars().take(10).collect();
        found.push((date, mtime, name, entry.path()));
    }
    found.sort_by(|a, b| (&b.0, b.1, &b.2).cmp(&(&a.0, a.1, &a.2)));
    Ok(found.into_iter().map(|f| f.3).collect())
}

// ---------------------------------------------------------------------------
// The body

/// The body as stored: raw HTML and template delimiters neutralised, ending
/// in a newline.
pub fn sanitize_body(content: &str) -> String {
    let mut body = neutralize_html(&neutralize_templates(&neutralize_html(content)));
    if !body.ends_with('\n') {
        body.push('\n');
    }
    body
}

/// Extensions a renderer of the message may turn on; metadata blocks stay
/// off (the body comes after the front matter).
fn gfm_options() -> Options {
    Options::ENABLE_TABLES
        | Options::ENABLE_FOOTNOTES
        | Options::ENABLE_STRIKETHROUGH
        | Options::ENABLE_TASKLISTS
        | Options::ENABLE_SMART_PUNCTUATION
        | Options::ENABLE_HEADING_ATTRIBUTES
        | Options::ENABLE_GFM
        | Options::ENABLE_DEFINITION_LIST
}

/// Source ranges of raw HTML, under plain CommonMark and with extensions.
fn html_ranges(md: &str) -> Vec<Range<usize>> {
    let mut ranges = Vec::new();
    for opts in [Options::empty(), gfm_options()] {
        for (event, range) in Parser::new_ext(md, opts).into_offset_iter() {
            if matches!(event, Event::Html(_) | Event::InlineHtml(_)) {
                ranges.push(range);
            }
        }
    }
    ranges
}

/// CommonMark with every raw HTML block/inline neutralised: each `<` of raw
/// HTML becomes `&lt;`, so the HTML shows as text. Everything else stays as
/// written. Repeats until a parse finds no raw HTML (escaping can change
/// what a later `<` is); after a few rounds it escapes every `<`.
pub fn neutralize_html(markdown: &str) -> String {
    // Raw HTML, block or inline, always starts with `<` (CommonMark 4.6,
    // 6.6): text without one has nothing to neutralise and skips the parses.
    if !markdown.contains('<') {
        return markdown.to_string();
    }
    let mut text = markdown.to_string();
    for _ in 0..8 {
        let ranges = html_ranges(&text);
        if ranges.is_empty() {
            return text;
        }
        let mut mark = vec![false; text.len()];
        for r in ranges {
            for i in r.clone() {
                if text.as_bytes().get(i) == Some(&b'<') {
                    mark[i] = true;
                }
            }
        }
        if !mark.contains(&true) {
            break;
        }
        let mut out = String::with_capacity(text.len() + 16);
        for (i, c) in text.char_indices() {
            if c == '<' && mark[i] {
                out.push_str("&lt;");
            } else {
                out.push(c);
            }
        }
        text = out;
    }
    if html_ranges(&text).is_empty() {
        text
    } else {
        text.replace('<', "&lt;")
    }
}

/// Breaks the delimiters that site generators expand inside content: Hugo
/// shortcodes `{{<` `{{%`, Zola shortcodes `{{ f() }}` `{% f() %}`, Liquid
/// and Nunjucks `{{` `{%` `{#`. In text a backslash goes between the two
/// characters (`{\{`, which renders the same); in code, where a backslash
/// would show, a zero-width space does.
pub fn neutralize_templates(markdown: &str) -> String {
    let bytes = markdown.as_bytes();
    let hits: Vec<usize> = (0..bytes.len().saturating_sub(1))
        .filter(|&i| bytes[i] == b'{' && matches!(bytes[i + 1], b'{' | b'%' | b'#'))
        .map(|i| i + 1)
        .collect();
    if hits.is_empty() {
        return markdown.to_string();
    }
    let mut text_ranges = Vec::new();
    let mut in_code = 0usize;
    for (event, range) in Parser::new_ext(markdown, gfm_options()).into_offset_iter() {
        match event {
            Event::Start(Tag::CodeBlock(_)) => in_code += 1,
            Event::End(TagEnd::CodeBlock) => in_code = in_code.saturating_sub(1),
            Event::Text(_) if in_code == 0 => text_ranges.push(range),
            _ => {}
        }
    }
    let in_text = |i: usize| {
        text_ranges
            .iter()
            .any(|r| r.contains(&i) && r.contains(&(i - 1)))
    };
    let mut out = String::with_capacity(markdown.len() + hits.len() * 3);
    let mut last = 0;
    for i in hits {
        out.push_str(&markdown[last..i]);
        out.push_str(if in_text(i) { "\\" } else { "\u{200b}" });
        last = i;
    }
    out.push_str(&markdown[last..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_reduced_to_a_safe_alphabet() {
        assert_eq!(sanitize_host("alice.example.org"), "alice.example.org");
        assert_eq!(sanitize_host("[::1]"), "1");
        assert_eq!(sanitize_host("..evil/../x"), "evil-.-x");
        assert_eq!(sanitize_host("ÄBC.example"), "bc.example");
        assert_eq!(sanitize_host(""), "unknown");
        assert_eq!(sanitize_host("..."), "unknown");
        assert!(sanitize_host(&"a".repeat(500)).len() <= 63);
    }

    #[test]
    fn html_of_every_kind_is_neutralised() {
        let md = "<script>alert(1)</script>\n\nhi <img src=x onerror=alert(1)> *b*\n\n<div>\nraw *x*\n</div>\n\n<!-- c -->\n\n`<code>` stays\n";
        let out = neutralize_html(md);
        assert!(html_ranges(&out).is_empty(), "{out}");
        assert!(out.contains("`<code>` stays"), "{out}");
        assert!(out.contains("*b*"));
        let html = {
            let mut s = String::new();
            pulldown_cmark::html::push_html(&mut s, Parser::new(&out));
            s
        };
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("<img"), "{html}");
        assert!(html.contains("&lt;script&gt;"), "{html}");
    }

    #[test]
    fn markdown_without_html_is_unchanged() {
        let md = "# Title\n\n* a\n* b\n\n```\n<not html>\n```\n\n> quote 1 < 2\n";
        assert_eq!(neutralize_html(md), md);
    }

    #[test]
    fn template_delimiters_are_broken() {
        let md = "a {{< x >}} b {{% y %}} {% raw %} {# c #}\n\n`{{ code }}`\n";
        let out = neutralize_templates(md);
        for bad in ["{{", "{%", "{#"] {
            assert!(!out.contains(bad), "{out}");
        }
        assert!(out.starts_with("a {\\{< x >}} b {\\{\\% y %}}"), "{out}");
        assert!(out.contains("`{\u{200b}{ code }}`"), "{out}");
        assert_eq!(neutralize_templates("{{{"), "{\\{\\{");
    }

    #[test]
    fn yaml_strings_escape_line_breaks_and_controls() {
        let s = yaml_string("a\nb\u{2028}c\u{85}d\u{7f}e\"f");
        assert_eq!(s, "\"a\\nb\\u2028c\\u0085d\\u007Fe\\\"f\"");
        assert_eq!(
            serde_json::from_str::<String>(&s).unwrap(),
            "a\nb\u{2028}c\u{85}d\u{7f}e\"f"
        );
    }
}
