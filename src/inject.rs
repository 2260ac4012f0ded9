//! Build-time injection of `<link rel="pm">` (and other rel links) into the
//! HTML pages of a built static site.
//!
//! A static site can receive messages only once its pages advertise their PM
//! endpoint. This module adds the tag to pages a generator has already built,
//! so it works with every generator, and it is exposed as a library for Rust
//! site tools ([`rewrite_html`], [`rewrite_stream`]) besides
//! `indiepm inject` ([`inject_dir`]).
//!
//! # How a page is rewritten
//!
//! lol_html parses the page as a stream, and its handlers only *record byte
//! offsets*: where an existing `rel` link sits and where the new tag belongs.
//! The output is then spliced together from the original bytes and the new
//! tags, so every byte other than the inserted tag stays exactly as it was,
//! by construction rather than by trusting a serialiser. Parsing stops at the
//! insertion point (the end of the head, usually in the first kilobyte), so a
//! page that already carries the link is read no further than its head and
//! never opened for writing: same bytes, same mtime.
//!
//! Where the tag goes, in order of preference:
//!
//! 1. just before `</head>`;
//! 2. just before `<body` when the head's end tag is omitted (minified HTML);
//! 3. just before the first start tag that cannot be in a head (`<header>`,
//!    `<p>`, ...), which is where an HTML parser ends the implied head when
//!    a minifier dropped the `<head>` and `<body>` tags too;
//! 4. otherwise (a page of head elements and text only) right after the
//!    `<head>` start tag, else after `<html>`, else after the doctype, else at
//!    the very start (after a byte order mark).
//!
//! Every one of these places is outside comments, raw text (`<script>`,
//! `<noscript>`...) and `<template>`, so rel=pm discovery, which takes the
//! first matching `<link>` or `<a>` in document order, finds the new tag.
//!
//! A link that is already there is judged the way discovery would: the first
//! `<link>` or `<a>` before the insertion point whose `rel` list holds the
//! rel value and which has an `href`. Its `href` (entity-decoded, since
//! lol_html hands out raw attribute text) equal to the URL means the page is
//! fine; a different one is stale, and the `<link>` is replaced in place (or,
//! when it also carries other rel values, the new tag goes just before it, so
//! that it wins and the other values keep working).
//!
//! # Files
//!
//! A changed page is written to a temporary file in its own folder, given
//! the original's permissions (and owner, when allowed), and renamed over
//! the original, so a reader (a web server, rsync) sees the old page or the
//! new one, never half of one. No fsync: this is build output, which a crash
//! makes you rebuild anyway, and an fsync per page would make a site-wide run
//! many times slower. Pages up to 1 MiB are handled in memory; bigger ones
//! are streamed, so memory stays bounded whatever the size of a page or of
//! the site. Symbolic links are never followed (neither to pages nor to
//! folders) and non-HTML files are never opened.
//!
//! A page is rewritten only when it is UTF-8 throughout and does not end
//! inside a tag (a sign of a truncated file); otherwise it is reported and
//! left as it was, and the other pages carry on. A page that already carries
//! every link is not examined beyond its head.
//!
//! The pages are shared out to one worker per CPU, which also list the
//! folders, through a queue of bounded length.

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lol_html::errors::RewritingError;
use lol_html::html_content::{Doctype, Element, EndTag};
use lol_html::{
    ElementContentHandlers, HtmlRewriter, MemorySettings, OutputSink, Selector, Settings, doctype,
};

use crate::identity::{UrlError, parse_http_url};

/// Pages up to this size are read whole and rewritten from memory; bigger
/// ones are streamed in [`CHUNK`]-sized pieces.
const IN_MEMORY: usize = 1 << 20;
/// The first read of every page: enough for the head of nearly any page.
const FIRST_READ: usize = 64 * 1024;
/// Read size when streaming a big page.
const CHUNK: usize = 64 * 1024;
/// Most memory lol_html may use for one page (it buffers only a tag that is
/// split across chunks); a page needing more is reported, not rewritten.
const PARSER_MEMORY: usize = 8 << 20;
/// [`rewrite_stream`] holds the page up to its insertion point; beyond this
/// the page is refused rather than held.
const STREAM_PREFIX_LIMIT: usize = 16 << 20;
/// Pages handed to a worker at a time.
const BATCH: usize = 64;
/// How far from the end of a page [`ends_inside_tag`] looks.
const TAIL: usize = 1024;

/// Why a page, a folder or a link could not be handled.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error(transparent)]
    Url(#[from] UrlError),
    #[error("`{0}` is not a usable rel value (use letters, digits and - . _ : / +)")]
    BadRel(String),
    #[error("cannot be read: {0}")]
    Read(#[source] io::Error),
    #[error("cannot be rewritten: {0}")]
    Write(#[source] io::Error),
    #[error("is not UTF-8 (bad byte at offset {0}); only UTF-8 pages are rewritten")]
    NotUtf8(u64),
    #[error("ends inside a tag or comment; is it truncated?")]
    Truncated,
    #[error("cannot be parsed as HTML: {0}")]
    Parse(String),
    #[error("has more than {0} bytes before the place for the link")]
    HeadTooLarge(usize),
    #[error("{} does not exist", .0.display())]
    NoDir(PathBuf),
    #[error("{} is not a folder", .0.display())]
    NotDir(PathBuf),
    #[error("cannot list {}: {source}", path.display())]
    Walk { path: PathBuf, source: io::Error },
    #[error("cannot update headers file {}: {source}", path.display())]
    Headers { path: PathBuf, source: io::Error },
    #[error("headers file {} is not UTF-8", .0.display())]
    HeadersNotUtf8(PathBuf),
    #[error("{0} page(s) could not be rewritten")]
    PagesFailed(usize),
}

/// One link to advertise: `<link rel="REL" href="URL">`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    rel: String,
    /// The URL parsed and serialised: what links already in a page are
    /// compared with (PROTOCOL.md compares endpoints this way).
    href: String,
    /// The URL as written into pages and headers.
    written: String,
    tag: String,
}

impl Link {
    /// A link with rel value `rel` (case-insensitive, stored lower-case) to
    /// the http(s) URL `url`. The URL is written as given (CONTRACT.md:
    /// `href="URL"`) unless it holds characters that do not belong in a
    /// header or that a parser would rewrite (spaces, quotes, angle brackets,
    /// non-ASCII): then in its serialised form, which means the same.
    pub fn new(rel: &str, url: &str) -> Result<Link, InjectError> {
        let ok = |c: char| c.is_ascii_alphanumeric() || "-._:/+".contains(c);
        if rel.is_empty() || rel.len() > 128 || !rel.chars().all(ok) {
            return Err(InjectError::BadRel(rel.to_string()));
        }
        let rel = rel.to_ascii_lowercase();
        let href = parse_http_url(url)?.to_string();
        let given = url.trim();
        let plain = given
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"\"<>\\`{}|^".contains(&b));
        let written = if plain {
            given.to_string()
        } else {
            href.clone()
        };
        let tag = format!(r#"<link rel="{rel}" href="{}">"#, escape_attr(&written));
        Ok(Link {
            rel,
            href,
            written,
            tag,
        })
    }

    /// The rel=pm link to a PM endpoint.
    pub fn pm(endpoint: &str) -> Result<Link, InjectError> {
        Link::new("pm", endpoint)
    }

    pub fn rel(&self) -> &str {
        &self.rel
    }

    /// The serialised URL.
    pub fn href(&self) -> &str {
        &self.href
    }

    /// The exact tag inserted into pages.
    pub fn tag(&self) -> &str {
        &self.tag
    }
}

/// Escapes a value for a double-quoted attribute.
fn escape_attr(value: &str) -> Cow<'_, str> {
    if !value.contains(['&', '"', '<', '>']) {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 16);
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Decodes the character references that can appear in a URL attribute
/// (`&amp;` in query strings above all); others are left as written, which
/// at worst makes a link look stale and get rewritten in canonical form.
fn decode_attr(raw: &str) -> Cow<'_, str> {
    if !raw.contains('&') {
        return Cow::Borrowed(raw);
    }
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let end = rest
            .char_indices()
            .take(12)
            .find(|&(_, c)| c == ';')
            .map(|(j, _)| j);
        let decoded = end.and_then(|j| {
            let name = &rest[1..j];
            let c = match name {
                "amp" => Some('&'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "lt" => Some('<'),
                "gt" => Some('>'),
                _ => {
                    let num = name.strip_prefix('#')?;
                    let code = match num.strip_prefix(['x', 'X']) {
                        Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                        None => num.parse().ok()?,
                    };
                    char::from_u32(code)
                }
            }?;
            Some((c, j + 1))
        });
        match decoded {
            Some((c, len)) => {
                out.push(c);
                rest = &rest[len..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// Whether an existing `href` already points at `wanted` (a serialised URL).
fn same_href(raw: &str, wanted: &str) -> bool {
    let decoded = decode_attr(raw);
    let decoded = decoded.trim();
    decoded == wanted || parse_http_url(decoded).is_ok_and(|u| u.as_str() == wanted)
}

/// What happened to one [`Link`] on one page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkChange {
    /// The page already carried it.
    Present,
    /// It was added.
    Added,
    /// A stale link with this rel (its raw `href` is kept here) was replaced.
    Replaced { old_href: String },
}

/// What a rewrite did to a page: one [`LinkChange`] per link, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub links: Vec<LinkChange>,
}

impl Outcome {
    /// True when the page was (or, without writing, would be) changed.
    pub fn changed(&self) -> bool {
        self.links.iter().any(|c| *c != LinkChange::Present)
    }

    /// The stale `href`s that were replaced.
    pub fn replaced(&self) -> impl Iterator<Item = &str> {
        self.links.iter().filter_map(|c| match c {
            LinkChange::Replaced { old_href } => Some(old_href.as_str()),
            _ => None,
        })
    }
}

/// The result of [`rewrite_html`]: the new document (borrowed from the
/// input when nothing changed) and what changed.
#[derive(Debug)]
pub struct Rewrite<'a> {
    pub html: Cow<'a, [u8]>,
    pub outcome: Outcome,
}

/// Rewrites one HTML document held in memory.
///
/// A document that needs a change must be UTF-8 and must not end inside a
/// tag ([`InjectError::NotUtf8`], [`InjectError::Truncated`]); one that
/// already carries every link is returned as it is, unexamined beyond its
/// head.
///
/// ```
/// use indiepm::inject::{Link, rewrite_html};
/// let links = [Link::pm("https://pm.example.org/pm").unwrap()];
/// let page = b"<html><head><title>Hi</title></head><body></body></html>";
/// let out = rewrite_html(page, &links).unwrap();
/// assert_eq!(
///     out.html.as_ref(),
///     &b"<html><head><title>Hi</title><link rel=\"pm\" href=\"https://pm.example.org/pm\"></head><body></body></html>"[..]
/// );
/// ```
pub fn rewrite_html<'a>(input: &'a [u8], links: &[Link]) -> Result<Rewrite<'a>, InjectError> {
    let mut scanner = Scanner::new(links);
    scanner.feed(input)?;
    let plan = scanner.finish()?;
    if plan.edits.is_empty() {
        return Ok(Rewrite {
            html: Cow::Borrowed(input),
            outcome: plan.outcome,
        });
    }
    check_whole_page(input)?;
    let extra: usize = links.iter().map(|l| l.tag.len()).sum();
    let mut html = Vec::with_capacity(input.len() + extra);
    write_spliced(input, &plan.edits, links, &mut html).map_err(InjectError::Write)?;
    Ok(Rewrite {
        html: Cow::Owned(html),
        outcome: plan.outcome,
    })
}

/// Rewrites one HTML document from `input` to `output` as a stream.
///
/// Only the part of the page up to the insertion point (the head, normally)
/// is held in memory; the rest is copied through. The output equals the
/// input when the returned outcome says nothing changed. On an error the
/// output may hold part of the document, so write to a temporary file when
/// that matters.
pub fn rewrite_stream<R: Read, W: Write>(
    mut input: R,
    mut output: W,
    links: &[Link],
) -> Result<Outcome, InjectError> {
    let mut scanner = Scanner::new(links);
    let mut prefix = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    let mut eof = false;
    loop {
        let n = read_some(&mut input, &mut buf).map_err(InjectError::Read)?;
        if n == 0 {
            eof = true;
            break;
        }
        prefix.extend_from_slice(&buf[..n]);
        if scanner.feed(&buf[..n])? {
            break;
        }
        if prefix.len() > STREAM_PREFIX_LIMIT {
            return Err(InjectError::HeadTooLarge(STREAM_PREFIX_LIMIT));
        }
    }
    let plan = scanner.finish()?;
    // As in `rewrite_html`, only a document that changes is checked.
    let changed = plan.outcome.changed();
    let mut utf8 = Utf8Check::default();
    if changed {
        utf8.push(&prefix)?;
    }
    write_spliced(&prefix, &plan.edits, links, &mut output).map_err(InjectError::Write)?;
    let mut tail = Tail::default();
    tail.push(&prefix);
    drop(prefix);
    if !eof {
        loop {
            let n = read_some(&mut input, &mut buf).map_err(InjectError::Read)?;
            if n == 0 {
                break;
            }
            if changed {
                utf8.push(&buf[..n])?;
                tail.push(&buf[..n]);
            }
            output.write_all(&buf[..n]).map_err(InjectError::Write)?;
        }
    }
    if changed {
        utf8.finish()?;
        if ends_inside_tag(tail.bytes()) {
            return Err(InjectError::Truncated);
        }
    }
    output.flush().map_err(InjectError::Write)?;
    Ok(plan.outcome)
}

/// The checks a page passes before it is rewritten: UTF-8 throughout, and
/// not cut off inside a tag. (A page that needs no change is not checked:
/// it is left as it is anyway, and its head is all that is read of it.)
fn check_whole_page(page: &[u8]) -> Result<(), InjectError> {
    // The SIMD check is several times faster on the usual success; the
    // standard one then says where the bad byte is.
    if simdutf8::basic::from_utf8(page).is_err() {
        let bad = std::str::from_utf8(page).map_or_else(|e| e.valid_up_to(), |_| 0);
        return Err(InjectError::NotUtf8(bad as u64));
    }
    if ends_inside_tag(page) {
        return Err(InjectError::Truncated);
    }
    Ok(())
}

/// `read` that retries on EINTR.
fn read_some<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

// ---------------------------------------------------------------------------
// Finding the places: lol_html as a streaming scanner.

/// One splice: at input offset `at`, drop `remove` bytes and write the tag of
/// link number `link`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Edit {
    at: usize,
    remove: usize,
    link: usize,
}

#[derive(Debug)]
struct Plan {
    edits: Vec<Edit>,
    outcome: Outcome,
}

/// What the scanner saw for one link before the insertion point.
#[derive(Debug, Clone)]
enum Found {
    Unseen,
    Present,
    /// A stale `<link>` carrying only this rel: replace its start tag.
    Replace {
        span: Range<usize>,
        old: String,
    },
    /// A stale element that also carries other rel values (or is an `<a>`):
    /// put the new tag just before it.
    Before {
        at: usize,
        old: String,
    },
}

struct ScanState {
    /// `(rel, href)` of each wanted link.
    wanted: Vec<(String, String)>,
    found: Vec<Found>,
    /// Depth of `<template>` elements: their content is not part of the
    /// document, so nothing inside them counts.
    template_depth: usize,
    /// The fallback place (rule 4): its rank (3 head, 2 html, 1 doctype) and offset.
    early: (u8, usize),
    /// The insertion point, once found.
    insert_at: Option<usize>,
}

/// The error a handler returns to stop lol_html once the insertion point is
/// known: nothing after it can change the plan.
#[derive(Debug)]
struct Stop;

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("stop")
    }
}

impl std::error::Error for Stop {}

type HandlerResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Output of the scanning rewriter: thrown away, the output is spliced.
struct Discard;

impl OutputSink for Discard {
    fn handle_chunk(&mut self, _: &[u8]) {}
}

/// Tags that may stand in a head; any other start tag begins the body.
fn head_content(tag: &str) -> bool {
    matches!(
        tag,
        "html"
            | "head"
            | "title"
            | "meta"
            | "link"
            | "style"
            | "script"
            | "noscript"
            | "base"
            | "template"
            | "basefont"
            | "bgsound"
    )
}

fn on_element(state: &Rc<RefCell<ScanState>>, el: &mut Element<'_, '_>) -> HandlerResult {
    let tag = el.tag_name();
    let loc = el.source_location().bytes();
    let mut s = state.borrow_mut();
    if tag == "template" {
        if let Some(handlers) = el.end_tag_handlers() {
            s.template_depth += 1;
            let state = Rc::clone(state);
            handlers.push(Box::new(move |_: &mut EndTag<'_>| {
                let mut s = state.borrow_mut();
                s.template_depth = s.template_depth.saturating_sub(1);
                Ok(())
            }));
        }
        return Ok(());
    }
    if s.template_depth > 0 {
        return Ok(());
    }
    if tag == "link" || tag == "a" {
        note_rel_element(&mut s, el, &tag, loc.clone());
    }
    match tag.as_str() {
        "head" => {
            if s.early.0 < 3 {
                s.early = (3, loc.end);
            }
            if let Some(handlers) = el.end_tag_handlers() {
                let state = Rc::clone(state);
                handlers.push(Box::new(move |end: &mut EndTag<'_>| {
                    let mut s = state.borrow_mut();
                    if s.insert_at.is_none() {
                        s.insert_at = Some(end.source_location().bytes().start);
                    }
                    Err(Box::new(Stop))
                }));
            }
            Ok(())
        }
        "html" => {
            if s.early.0 < 2 {
                s.early = (2, loc.end);
            }
            Ok(())
        }
        t if head_content(t) => Ok(()),
        _ => {
            // `<body`, or the first element of the body proper.
            s.insert_at = Some(loc.start);
            Err(Box::new(Stop))
        }
    }
}

/// Judges a `<link>` or `<a>` with a rel and an href, the way discovery would.
fn note_rel_element(s: &mut ScanState, el: &Element<'_, '_>, tag: &str, loc: Range<usize>) {
    let Some(rel) = el.get_attribute("rel") else {
        return;
    };
    let Some(href) = el.get_attribute("href") else {
        return;
    };
    let tokens: Vec<String> = rel
        .split_ascii_whitespace()
        .map(str::to_ascii_lowercase)
        .collect();
    for i in 0..s.wanted.len() {
        if !matches!(s.found[i], Found::Unseen) || !tokens.contains(&s.wanted[i].0) {
            continue;
        }
        s.found[i] = if same_href(&href, &s.wanted[i].1) {
            Found::Present
        } else if tag == "link" && tokens.len() == 1 {
            Found::Replace {
                span: loc.clone(),
                old: href.clone(),
            }
        } else {
            Found::Before {
                at: loc.start,
                old: href.clone(),
            }
        };
    }
}

/// The `*` selector, parsed once rather than for every page.
fn every_element() -> &'static Selector {
    static SELECTOR: std::sync::OnceLock<Selector> = std::sync::OnceLock::new();
    SELECTOR.get_or_init(|| {
        // A constant that lol_html always accepts.
        "*".parse()
            .unwrap_or_else(|e| panic!("the selector `*`: {e}"))
    })
}

/// Feeds a page to lol_html chunk by chunk until the insertion point is known.
struct Scanner {
    state: Rc<RefCell<ScanState>>,
    rewriter: Option<HtmlRewriter<'static, Discard>>,
    decided: bool,
    /// The first bytes of the page, to step over a byte order mark.
    start: Vec<u8>,
}

impl Scanner {
    fn new(links: &[Link]) -> Scanner {
        let state = Rc::new(RefCell::new(ScanState {
            wanted: links
                .iter()
                .map(|l| (l.rel.clone(), l.href.clone()))
                .collect(),
            found: vec![Found::Unseen; links.len()],
            template_depth: 0,
            early: (0, 0),
            insert_at: None,
        }));
        let on_el = Rc::clone(&state);
        let on_doctype = Rc::clone(&state);
        let settings = Settings::new()
            .with_memory_settings(
                MemorySettings::new().with_max_allowed_memory_usage(PARSER_MEMORY),
            )
            .append_element_content_handler((
                Cow::Borrowed(every_element()),
                ElementContentHandlers::default()
                    .element(move |el: &mut Element<'_, '_>| on_element(&on_el, el)),
            ))
            .append_document_content_handler(doctype!(move |d: &mut Doctype<'_>| {
                let mut s = on_doctype.borrow_mut();
                if s.early.0 < 1 {
                    s.early = (1, d.source_location().bytes().end);
                }
                Ok(())
            }));
        Scanner {
            state,
            rewriter: Some(HtmlRewriter::new(settings, Discard)),
            decided: false,
            start: Vec::with_capacity(3),
        }
    }

    /// Parses the next chunk; true once the insertion point is known (more
    /// input is then not needed).
    fn feed(&mut self, chunk: &[u8]) -> Result<bool, InjectError> {
        if self.start.len() < 3 {
            let take = (3 - self.start.len()).min(chunk.len());
            self.start.extend_from_slice(&chunk[..take]);
        }
        let Some(rewriter) = self.rewriter.as_mut() else {
            return Ok(self.decided);
        };
        let result = rewriter.write(chunk);
        self.settle(result)
    }

    fn settle(&mut self, result: Result<(), RewritingError>) -> Result<bool, InjectError> {
        match result {
            Ok(()) => Ok(false),
            Err(RewritingError::ContentHandlerError(e)) if e.is::<Stop>() => {
                self.rewriter = None;
                self.decided = true;
                Ok(true)
            }
            Err(e) => {
                self.rewriter = None;
                Err(InjectError::Parse(e.to_string()))
            }
        }
    }

    /// The plan, after the last chunk (or once `feed` said so).
    fn finish(mut self) -> Result<Plan, InjectError> {
        if let Some(rewriter) = self.rewriter.take() {
            let result = rewriter.end();
            self.settle(result)?;
        }
        let s = self.state.borrow();
        let fallback = if s.early.0 > 0 {
            s.early.1
        } else if self.start.starts_with(b"\xEF\xBB\xBF") {
            3
        } else {
            0
        };
        let insert_at = s.insert_at.unwrap_or(fallback);
        let mut edits = Vec::new();
        let mut links = Vec::with_capacity(s.found.len());
        for (i, found) in s.found.iter().enumerate() {
            let (edit, change) = match found {
                Found::Present => (None, LinkChange::Present),
                Found::Unseen => (Some((insert_at, 0)), LinkChange::Added),
                Found::Replace { span, old } => (
                    Some((span.start, span.len())),
                    LinkChange::Replaced {
                        old_href: old.clone(),
                    },
                ),
                Found::Before { at, old } => (
                    Some((*at, 0)),
                    LinkChange::Replaced {
                        old_href: old.clone(),
                    },
                ),
            };
            if let Some((at, remove)) = edit {
                edits.push(Edit {
                    at,
                    remove,
                    link: i,
                });
            }
            links.push(change);
        }
        // Pure insertions before a replacement at the same offset; links in
        // the order given otherwise (the sort is stable).
        edits.sort_by_key(|e| (e.at, e.remove));
        Ok(Plan {
            edits,
            outcome: Outcome { links },
        })
    }
}

// ---------------------------------------------------------------------------
// Writing: splicing the tags into the original bytes.

fn out_of_range() -> io::Error {
    io::Error::other("edit offset beyond the end of the page")
}

/// Writes `data` with the edits applied.
fn write_spliced<W: Write>(
    data: &[u8],
    edits: &[Edit],
    links: &[Link],
    out: &mut W,
) -> io::Result<()> {
    let mut pos = 0;
    for e in edits {
        let piece = data.get(pos..e.at).ok_or_else(out_of_range)?;
        out.write_all(piece)?;
        out.write_all(links[e.link].tag.as_bytes())?;
        pos = e.at + e.remove;
    }
    out.write_all(data.get(pos..).ok_or_else(out_of_range)?)
}

/// Copies `input` to `out` with the edits applied, checking UTF-8 and
/// keeping the tail for the truncation check. For pages too big for memory.
fn copy_spliced<R: Read, W: Write>(
    input: &mut R,
    edits: &[Edit],
    links: &[Link],
    out: &mut W,
    buf: &mut [u8],
) -> Result<(), InjectError> {
    let mut utf8 = Utf8Check::default();
    let mut tail = Tail::default();
    let mut pos = 0; // next input byte to copy
    let mut off = 0; // input offset of buf[0]
    let mut next = 0; // next edit
    loop {
        let n = read_some(input, buf).map_err(InjectError::Read)?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        utf8.push(chunk)?;
        tail.push(chunk);
        let end = off + n;
        while let Some(e) = edits.get(next).filter(|e| e.at < end) {
            let from = pos.max(off);
            if from < e.at {
                out.write_all(&chunk[from - off..e.at - off])
                    .map_err(InjectError::Write)?;
            }
            out.write_all(links[e.link].tag.as_bytes())
                .map_err(InjectError::Write)?;
            pos = pos.max(e.at + e.remove);
            next += 1;
        }
        let from = pos.max(off);
        if from < end {
            out.write_all(&chunk[from - off..])
                .map_err(InjectError::Write)?;
            pos = end;
        }
        off = end;
    }
    for e in &edits[next.min(edits.len())..] {
        if e.at + e.remove > off {
            return Err(InjectError::Write(out_of_range()));
        }
        out.write_all(links[e.link].tag.as_bytes())
            .map_err(InjectError::Write)?;
    }
    utf8.finish()?;
    if ends_inside_tag(tail.bytes()) {
        return Err(InjectError::Truncated);
    }
    Ok(())
}

/// UTF-8 validation across chunk boundaries.
#[derive(Default)]
struct Utf8Check {
    /// An incomplete character at the end of the last chunk.
    carry: Vec<u8>,
    /// Input offset of the first byte not yet validated.
    offset: u64,
}

impl Utf8Check {
    fn push(&mut self, mut chunk: &[u8]) -> Result<(), InjectError> {
        while !self.carry.is_empty() && !chunk.is_empty() {
            self.carry.push(chunk[0]);
            chunk = &chunk[1..];
            match std::str::from_utf8(&self.carry) {
                Ok(_) => {
                    self.offset += self.carry.len() as u64;
                    self.carry.clear();
                }
                Err(e) if e.error_len().is_some() => {
                    return Err(InjectError::NotUtf8(self.offset));
                }
                Err(_) => {}
            }
        }
        match std::str::from_utf8(chunk) {
            Ok(_) => self.offset += chunk.len() as u64,
            Err(e) => {
                let good = e.valid_up_to();
                if e.error_len().is_some() {
                    return Err(InjectError::NotUtf8(self.offset + good as u64));
                }
                self.offset += good as u64;
                self.carry.extend_from_slice(&chunk[good..]);
            }
        }
        Ok(())
    }

    fn finish(&self) -> Result<(), InjectError> {
        if self.carry.is_empty() {
            Ok(())
        } else {
            Err(InjectError::NotUtf8(self.offset))
        }
    }
}

/// The last [`TAIL`] bytes of a stream.
#[derive(Default)]
struct Tail(Vec<u8>);

impl Tail {
    fn push(&mut self, chunk: &[u8]) {
        if chunk.len() >= TAIL {
            self.0.clear();
            self.0.extend_from_slice(&chunk[chunk.len() - TAIL..]);
        } else {
            self.0.extend_from_slice(chunk);
            if self.0.len() > TAIL {
                let cut = self.0.len() - TAIL;
                self.0.drain(..cut);
            }
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// True when the page ends in the middle of markup: its last `<` that opens
/// a tag, comment or doctype has no `>` after it. A generator never writes
/// that, so the file is most likely cut short, and adding a link to it would
/// only hide the damage.
fn ends_inside_tag(page: &[u8]) -> bool {
    let tail = &page[page.len().saturating_sub(TAIL)..];
    let opens = |w: &[u8]| {
        w[0] == b'<' && (w[1].is_ascii_alphabetic() || matches!(w[1], b'/' | b'!' | b'?'))
    };
    // A `<` as the very last byte opens nothing yet, but is cut all the same.
    if tail.last() == Some(&b'<') {
        return true;
    }
    match tail.windows(2).rposition(opens) {
        Some(i) => !tail[i..].contains(&b'>'),
        None => false,
    }
}

// ---------------------------------------------------------------------------
// Files and folders.

/// Whether pages are rewritten, or only examined (`--check`, `--dry-run`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Write,
    ReadOnly,
}

/// Why a page-named entry was not looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// A symbolic link: never followed, whatever it points to.
    Symlink,
    /// A FIFO, socket or device named like a page.
    NotAFile,
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Skip::Symlink => "a symbolic link (not followed)",
            Skip::NotAFile => "not a regular file",
        })
    }
}

/// What happened to one page.
#[derive(Debug)]
pub enum PageStatus {
    /// It already carried every link; it was not opened for writing.
    Fine,
    /// It was rewritten (or, in [`Mode::ReadOnly`], would be).
    Changed(Outcome),
    Skipped(Skip),
    /// It could not be read, parsed or rewritten; it was left as it was.
    Failed(InjectError),
}

/// Totals of an [`inject_dir`] run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Page-named entries found (`.html`, `.htm`).
    pub scanned: usize,
    pub changed: usize,
    /// Stale links replaced, counted in `changed` pages.
    pub replaced: usize,
    pub fine: usize,
    pub skipped: usize,
    pub failed: usize,
    pub elapsed: Duration,
}

#[derive(Default)]
struct Counters {
    scanned: AtomicUsize,
    changed: AtomicUsize,
    replaced: AtomicUsize,
    fine: AtomicUsize,
    skipped: AtomicUsize,
    failed: AtomicUsize,
}

fn is_page(name: &std::ffi::OsStr) -> bool {
    let name = name.as_encoded_bytes();
    let ext =
        |e: &[u8]| name.len() > e.len() && name[name.len() - e.len()..].eq_ignore_ascii_case(e);
    ext(b".html") || ext(b".htm")
}

/// How [`inject_dir`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    pub mode: Mode,
    /// Pages worked on at once; 0 means one per CPU.
    pub jobs: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mode: Mode::Write,
            jobs: 0,
        }
    }
}

/// Adds `links` to every HTML page under `dir`, in parallel.
///
/// `report` is called once per page-named entry, from worker threads, as
/// soon as it is done. Pages that fail are reported and left intact, and the
/// others carry on; only a problem with `dir` itself is an `Err`.
pub fn inject_dir(
    dir: &Path,
    links: &[Link],
    options: Options,
    report: &(dyn Fn(&Path, &PageStatus) + Sync),
) -> Result<Summary, InjectError> {
    let started = Instant::now();
    let mode = options.mode;
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(InjectError::NotDir(dir.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(InjectError::NoDir(dir.to_path_buf()));
        }
        Err(e) => {
            return Err(InjectError::Walk {
                path: dir.to_path_buf(),
                source: e,
            });
        }
    }
    let counters = Counters::default();
    let handle = |path: &Path, kind: fs::FileType, bufs: &mut Buffers| {
        counters.scanned.fetch_add(1, Ordering::Relaxed);
        let status = if kind.is_symlink() {
            PageStatus::Skipped(Skip::Symlink)
        } else if !kind.is_file() {
            PageStatus::Skipped(Skip::NotAFile)
        } else {
            match inject_file(path, links, mode, bufs) {
                Ok(status) => status,
                Err(e) => PageStatus::Failed(e),
            }
        };
        let counter = match &status {
            PageStatus::Fine => &counters.fine,
            PageStatus::Changed(outcome) => {
                counters
                    .replaced
                    .fetch_add(outcome.replaced().count(), Ordering::Relaxed);
                &counters.changed
            }
            PageStatus::Skipped(_) => &counters.skipped,
            PageStatus::Failed(_) => &counters.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        report(path, &status);
    };
    let failed = |path: &Path, e: io::Error| {
        counters.scanned.fetch_add(1, Ordering::Relaxed);
        counters.failed.fetch_add(1, Ordering::Relaxed);
        report(path, &PageStatus::Failed(InjectError::Read(e)));
    };
    let workers = match options.jobs {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    // The workers walk the tree together: listing a folder is work like
    // rewriting a page, taken from one shared queue, so neither the walk nor
    // one big folder is done by a single thread while the others wait.
    let queue = WorkQueue::new(workers * 8, PathBuf::from(dir));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                let mut bufs = Buffers::default();
                let handle_batch = |batch: Vec<(PathBuf, fs::FileType)>, bufs: &mut Buffers| {
                    for (path, kind) in batch {
                        handle(&path, kind, bufs);
                    }
                };
                while let Some(work) = queue.next() {
                    match work {
                        Work::Pages(batch) => handle_batch(batch, &mut bufs),
                        Work::Dir(path) => walk_dir(&path, &queue, &failed, &mut |batch| {
                            handle_batch(batch, &mut bufs)
                        }),
                    }
                    queue.done();
                }
            });
        }
    });
    Ok(Summary {
        scanned: counters.scanned.into_inner(),
        changed: counters.changed.into_inner(),
        replaced: counters.replaced.into_inner(),
        fine: counters.fine.into_inner(),
        skipped: counters.skipped.into_inner(),
        failed: counters.failed.into_inner(),
        elapsed: started.elapsed(),
    })
}

/// A unit of work for the [`inject_dir`] workers.
enum Work {
    /// A folder to list (never a symlink: those are not followed).
    Dir(PathBuf),
    /// Page-named entries to handle.
    Pages(Vec<(PathBuf, fs::FileType)>),
}

/// The shared work of an [`inject_dir`] run. It holds at most `limit`
/// items: a worker that would add more does the work itself, so memory is
/// bounded by the depth of the tree, not by the number of pages or folders.
struct WorkQueue {
    state: std::sync::Mutex<QueueState>,
    wake: std::sync::Condvar,
    limit: usize,
}

struct QueueState {
    work: Vec<Work>,
    /// Workers holding an item; when none is and the queue is empty, all is done.
    busy: usize,
}

impl WorkQueue {
    fn new(limit: usize, root: PathBuf) -> WorkQueue {
        WorkQueue {
            state: std::sync::Mutex::new(QueueState {
                work: vec![Work::Dir(root)],
                busy: 0,
            }),
            wake: std::sync::Condvar::new(),
            limit,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        // A poisoned lock only means another worker panicked; the state is whole.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next item, or `None` when everything is done.
    fn next(&self) -> Option<Work> {
        let mut state = self.lock();
        loop {
            if let Some(work) = state.work.pop() {
                state.busy += 1;
                return Some(work);
            }
            if state.busy == 0 {
                self.wake.notify_all();
                return None;
            }
            state = self.wake.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Offers an item to the other workers; gives it back when the queue is full.
    fn offer(&self, work: Work) -> Option<Work> {
        let mut state = self.lock();
        if state.work.len() >= self.limit {
            return Some(work);
        }
        state.work.push(work);
        self.wake.notify_one();
        None
    }

    /// The item taken with `next` is finished.
    fn done(&self) {
        let mut state = self.lock();
        state.busy -= 1;
        if state.busy == 0 && state.work.is_empty() {
            self.wake.notify_all();
        }
    }
}

/// Lists `dir`: page-named entries go out in batches and subfolders to the
/// queue, or are handled right here (depth first) when the queue is full.
fn walk_dir(
    dir: &Path,
    queue: &WorkQueue,
    failed: &(dyn Fn(&Path, io::Error) + Sync),
    handle_batch: &mut dyn FnMut(Vec<(PathBuf, fs::FileType)>),
) {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => return failed(dir, e),
    };
    let mut batch = Vec::new();
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                failed(dir, e);
                continue;
            }
        };
        // The entry's own type (from the listing, else lstat): symlinks stay symlinks.
        let kind = match entry.file_type() {
            Ok(kind) => kind,
            Err(e) => {
                failed(&entry.path(), e);
                continue;
            }
        };
        if kind.is_dir() {
            if let Some(Work::Dir(sub)) = queue.offer(Work::Dir(entry.path())) {
                walk_dir(&sub, queue, failed, handle_batch);
            }
        } else if is_page(&entry.file_name()) {
            batch.push((entry.path(), kind));
            if batch.len() == BATCH {
                let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                if let Some(Work::Pages(full)) = queue.offer(Work::Pages(full)) {
                    handle_batch(full);
                }
            }
        }
    }
    if !batch.is_empty() {
        handle_batch(batch);
    }
}

/// Per-worker buffers, reused from page to page.
#[derive(Default)]
struct Buffers {
    page: Vec<u8>,
    chunk: Vec<u8>,
}

/// Adds `links` to one page file; see the module documentation.
///
/// The first read (up to [`FIRST_READ`]) holds the head of nearly every
/// page; when that settles it and the page is fine, that one read is all
/// the work. Otherwise the page is read whole (below [`IN_MEMORY`]) or
/// streamed.
fn inject_file(
    path: &Path,
    links: &[Link],
    mode: Mode,
    bufs: &mut Buffers,
) -> Result<PageStatus, InjectError> {
    let mut file = File::open(path).map_err(InjectError::Read)?;
    if bufs.page.len() < FIRST_READ {
        bufs.page.resize(FIRST_READ, 0);
    }
    let mut scanner = Scanner::new(links);
    let first = read_some(&mut file, &mut bufs.page[..FIRST_READ]).map_err(InjectError::Read)?;
    let scan = if scanner.feed(&bufs.page[..first])? {
        let plan = scanner.finish()?;
        if plan.edits.is_empty() {
            return Ok(PageStatus::Fine);
        }
        Ok(plan)
    } else {
        Err(scanner) // still looking: it needs more of the page
    };
    let meta = file.metadata().map_err(InjectError::Read)?;
    if !meta.is_file() {
        return Ok(PageStatus::Skipped(Skip::NotAFile));
    }
    let size = usize::try_from(meta.len()).unwrap_or(usize::MAX);
    if size < IN_MEMORY && first <= size {
        // One byte more than the size, to notice a file that grew since.
        if bufs.page.len() <= size {
            bufs.page.resize(size + 1, 0);
        }
        let got = if first < FIRST_READ && first == size {
            first // a short read that ended where fstat says the file ends
        } else {
            first + read_up_to(&mut file, &mut bufs.page[first..=size], size - first)?
        };
        if got <= size {
            let page = &bufs.page[..got];
            let plan = match scan {
                Ok(plan) => plan,
                Err(mut scanner) => {
                    scanner.feed(&page[first..])?;
                    scanner.finish()?
                }
            };
            return rewrite_in_memory(path, &meta, page, plan, links, mode);
        }
    }
    file.seek(SeekFrom::Start(0)).map_err(InjectError::Read)?;
    inject_streaming(path, &mut file, &meta, links, mode, bufs)
}

/// Reads into `buf` until it is full or the file ends. A short read that
/// stops exactly at `size` (what fstat said) is taken as the end, which
/// saves the extra `read` that would return 0 on every page.
fn read_up_to(file: &mut File, buf: &mut [u8], size: usize) -> Result<usize, InjectError> {
    let mut got = 0;
    while got < buf.len() {
        let want = buf.len() - got;
        let n = read_some(file, &mut buf[got..]).map_err(InjectError::Read)?;
        if n == 0 {
            break;
        }
        got += n;
        if n < want && got == size {
            break;
        }
    }
    Ok(got)
}

/// A page held whole in memory (below [`IN_MEMORY`]), with its plan.
fn rewrite_in_memory(
    path: &Path,
    meta: &fs::Metadata,
    page: &[u8],
    plan: Plan,
    links: &[Link],
    mode: Mode,
) -> Result<PageStatus, InjectError> {
    if plan.edits.is_empty() {
        return Ok(PageStatus::Fine);
    }
    check_whole_page(page)?;
    if mode == Mode::Write {
        replace_file(path, meta, |out| {
            write_pieces(out, &spliced_pieces(page, &plan.edits, links)?)
                .map_err(InjectError::Write)
        })?;
    }
    Ok(PageStatus::Changed(plan.outcome))
}

/// A page too big for memory: scanned chunk by chunk up to its insertion
/// point, then (when it needs the link) copied through with the tags
/// spliced in.
fn inject_streaming(
    path: &Path,
    file: &mut File,
    meta: &fs::Metadata,
    links: &[Link],
    mode: Mode,
    bufs: &mut Buffers,
) -> Result<PageStatus, InjectError> {
    if bufs.chunk.len() < CHUNK {
        bufs.chunk.resize(CHUNK, 0);
    }
    let mut scanner = Scanner::new(links);
    loop {
        let n = read_some(file, &mut bufs.chunk).map_err(InjectError::Read)?;
        if n == 0 || scanner.feed(&bufs.chunk[..n])? {
            break;
        }
    }
    let plan = scanner.finish()?;
    if plan.edits.is_empty() {
        return Ok(PageStatus::Fine);
    }
    file.seek(SeekFrom::Start(0)).map_err(InjectError::Read)?;
    let chunk = &mut bufs.chunk;
    match mode {
        // Read it all, so that a page a real run would refuse is reported now.
        Mode::ReadOnly => copy_spliced(file, &[], links, &mut io::sink(), chunk)?,
        Mode::Write => replace_file(path, meta, |out| {
            copy_spliced(file, &plan.edits, links, out, chunk)
        })?,
    }
    Ok(PageStatus::Changed(plan.outcome))
}

/// The pieces of the rewritten page: original bytes and tags, in order.
fn spliced_pieces<'a>(
    data: &'a [u8],
    edits: &[Edit],
    links: &'a [Link],
) -> Result<Vec<&'a [u8]>, InjectError> {
    let mut pieces = Vec::with_capacity(edits.len() * 2 + 1);
    let mut pos = 0;
    for e in edits {
        pieces.push(
            data.get(pos..e.at)
                .ok_or_else(|| InjectError::Write(out_of_range()))?,
        );
        pieces.push(links[e.link].tag.as_bytes());
        pos = e.at + e.remove;
    }
    pieces.push(
        data.get(pos..)
            .ok_or_else(|| InjectError::Write(out_of_range()))?,
    );
    Ok(pieces)
}

/// Writes all pieces, with one `writev` in the usual case.
fn write_pieces(out: &mut File, pieces: &[&[u8]]) -> io::Result<()> {
    let slices: Vec<io::IoSlice<'_>> = pieces.iter().map(|p| io::IoSlice::new(p)).collect();
    let mut written = loop {
        match out.write_vectored(&slices) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => break other?,
        }
    };
    // A partial write: finish piece by piece.
    for piece in pieces {
        if written >= piece.len() {
            written -= piece.len();
            continue;
        }
        out.write_all(&piece[written..])?;
        written = 0;
    }
    Ok(())
}

/// Counter for temporary file names, unique within this process.
static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// This process's id, asked of the kernel once.
fn pid() -> u32 {
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *PID.get_or_init(std::process::id)
}

/// A temporary file that is removed unless it was renamed into place.
struct TempFile {
    path: PathBuf,
    file: File,
    keep: bool,
}

impl TempFile {
    /// Creates `.indiepm-PID-N.tmp` beside `target`, with permissions `mode`.
    fn beside(target: &Path, mode: u32) -> io::Result<TempFile> {
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        loop {
            let n = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!(".indiepm-{}-{n}.tmp", pid()));
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode & 0o777)
                .open(&path)
            {
                Ok(file) => {
                    return Ok(TempFile {
                        path,
                        file,
                        keep: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            // Best effort: the error that got us here is the one to report.
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Replaces `path` atomically with what `write` produces: a temporary file
/// in the same folder with the original's permissions and owner, renamed
/// over it. On any error the original is untouched and the temporary file
/// is gone.
fn replace_file(
    path: &Path,
    meta: &fs::Metadata,
    write: impl FnOnce(&mut File) -> Result<(), InjectError>,
) -> Result<(), InjectError> {
    let mode = meta.mode() & 0o7777;
    let mut tmp = TempFile::beside(path, mode).map_err(InjectError::Write)?;
    write(&mut tmp.file)?;
    let process = process_ids();
    // The umask may have narrowed the mode given at creation, which also
    // cannot carry setuid/setgid/sticky bits.
    if process.is_none_or(|p| mode & !p.umask != mode || mode & !0o777 != 0) {
        tmp.file
            .set_permissions(fs::Permissions::from_mode(mode))
            .map_err(InjectError::Write)?;
    }
    // Keeps the owner when we may (root, or our own file); when we may not,
    // the page becomes ours, as with any editor that saves by renaming.
    // (Skipped when the ids are ours, which a new file has, except in a
    // setgid folder whose group is not ours: there the page takes the
    // folder's group, as every file created in it does.)
    if process.is_none_or(|p| p.uid != meta.uid() || p.gid != meta.gid()) {
        let _ = std::os::unix::fs::fchown(&tmp.file, Some(meta.uid()), Some(meta.gid()));
    }
    fs::rename(&tmp.path, path).map_err(InjectError::Write)?;
    tmp.keep = true;
    Ok(())
}

/// This process's umask and effective user and group, read once from
/// `/proc/self/status` (Linux), to skip the `fchmod` and `fchown` that
/// would change nothing on a new file. `None` elsewhere: then both always run.
#[derive(Debug, Clone, Copy)]
struct ProcessIds {
    umask: u32,
    uid: u32,
    gid: u32,
}

fn process_ids() -> Option<ProcessIds> {
    static IDS: std::sync::OnceLock<Option<ProcessIds>> = std::sync::OnceLock::new();
    *IDS.get_or_init(|| {
        let status = fs::read_to_string("/proc/self/status").ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|rest| rest.split_ascii_whitespace().collect::<Vec<_>>())
        };
        let umask = u32::from_str_radix(field("Umask:")?.first()?, 8).ok()?;
        // Real, effective, saved, filesystem: new files get the filesystem ids.
        let uid = field("Uid:")?.get(3)?.parse().ok()?;
        let gid = field("Gid:")?.get(3)?.parse().ok()?;
        Some(ProcessIds { umask, uid, gid })
    })
}

/// Adds `pm` and `micropub` links to the demo's copy of the site.
pub fn inject_for_demo(dir: &Path, pm: &str, micropub: &str) -> Result<Summary, InjectError> {
    let links = [Link::pm(pm)?, Link::new("micropub", micropub)?];
    let summary = inject_dir(dir, &links, Options::default(), &|_, _| {})?;
    if summary.failed > 0 {
        return Err(InjectError::PagesFailed(summary.failed));
    }
    Ok(summary)
}

// ---------------------------------------------------------------------------
// The `_headers` file of Netlify and Cloudflare Pages.

/// What [`update_headers`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadersChange {
    Unchanged,
    Created,
    Updated,
}

/// The `Link` header value for one link.
fn header_value(link: &Link) -> String {
    format!("<{}>; rel=\"{}\"", link.written, link.rel)
}

/// Splits a `Link` header value into its comma-separated entries (commas
/// inside `<...>` or quotes do not split).
fn link_entries(value: &str) -> Vec<&str> {
    let mut entries = Vec::new();
    let (mut start, mut angle, mut quote) = (0, false, false);
    for (i, c) in value.char_indices() {
        match c {
            '<' if !quote => angle = true,
            '>' if !quote => angle = false,
            '"' if !angle => quote = !quote,
            ',' if !angle && !quote => {
                entries.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    entries.push(&value[start..]);
    entries
}

/// The target and rel values of one `Link` entry, e.g. `<u>; rel="pm x"`.
fn parse_link_entry(entry: &str) -> Option<(&str, Vec<String>)> {
    let entry = entry.trim();
    let rest = entry.strip_prefix('<')?;
    let close = rest.find('>')?;
    let target = &rest[..close];
    let mut rels = Vec::new();
    for param in rest[close + 1..].split(';') {
        let Some((name, value)) = param.split_once('=') else {
            continue;
        };
        if name.trim().eq_ignore_ascii_case("rel") {
            let value = value.trim().trim_matches('"');
            rels.extend(value.split_ascii_whitespace().map(str::to_ascii_lowercase));
        }
    }
    Some((target, rels))
}

/// The `_headers` text with the links in the `/*` block; `None` when it
/// already holds them all.
pub fn headers_text(old: &str, links: &[Link]) -> Option<String> {
    let mut lines: Vec<String> = old.split_inclusive('\n').map(str::to_string).collect();
    if let Some(last) = lines.last_mut().filter(|l| !l.ends_with('\n')) {
        last.push('\n');
    }
    // The `/*` block: from its path line to the next unindented line.
    let block_start = lines.iter().position(|l| l.trim_end() == "/*");
    let (start, mut end) = match block_start {
        Some(s) => {
            let len = lines[s + 1..]
                .iter()
                .take_while(|l| {
                    let t = l.trim();
                    t.is_empty() || t.starts_with('#') || l.starts_with([' ', '\t'])
                })
                .count();
            (s, s + 1 + len)
        }
        None => {
            if !lines.is_empty() && lines.last().is_some_and(|l| !l.trim().is_empty()) {
                lines.push("\n".to_string());
            }
            lines.push("/*\n".to_string());
            (lines.len() - 1, lines.len())
        }
    };
    // Insert after the block's last header line, not after trailing blanks.
    while end > start + 1 && lines[end - 1].trim().is_empty() {
        end -= 1;
    }
    let mut changed = block_start.is_none();
    for link in links {
        let mut found = false;
        for line in &mut lines[start + 1..end] {
            let trimmed = line.trim_start();
            let Some((name, value)) = trimmed.split_once(':') else {
                continue;
            };
            if !name.trim().eq_ignore_ascii_case("link") {
                continue;
            }
            let entries = link_entries(value);
            let hit = entries.iter().position(|e| {
                parse_link_entry(e).is_some_and(|(_, rels)| rels.contains(&link.rel))
            });
            let Some(hit) = hit else {
                continue;
            };
            found = true;
            let target = parse_link_entry(entries[hit]).map(|(t, _)| t);
            if target.is_some_and(|t| same_href(t, &link.href)) {
                break;
            }
            let mut rebuilt: Vec<String> = entries.iter().map(|e| e.trim().to_string()).collect();
            rebuilt[hit] = header_value(link);
            let indent = &line[..line.len() - trimmed.len()];
            *line = format!("{indent}{}: {}\n", name.trim(), rebuilt.join(", "));
            changed = true;
            break;
        }
        if !found {
            lines.insert(end, format!("  Link: {}\n", header_value(link)));
            end += 1;
            changed = true;
        }
    }
    changed.then(|| lines.concat())
}

/// Writes or updates a Netlify / Cloudflare Pages `_headers` file so that
/// every path (`/*`) answers with a `Link` header for each link. Other
/// content is kept; an up-to-date file is not rewritten.
pub fn update_headers(
    path: &Path,
    links: &[Link],
    mode: Mode,
) -> Result<HeadersChange, InjectError> {
    let err = |source| InjectError::Headers {
        path: path.to_path_buf(),
        source,
    };
    let (old, existing) = match fs::read(path) {
        Ok(bytes) => (
            String::from_utf8(bytes)
                .map_err(|_| InjectError::HeadersNotUtf8(path.to_path_buf()))?,
            true,
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => (String::new(), false),
        Err(e) => return Err(err(e)),
    };
    let Some(new) = headers_text(&old, links) else {
        return Ok(HeadersChange::Unchanged);
    };
    let change = if existing {
        HeadersChange::Updated
    } else {
        HeadersChange::Created
    };
    if mode == Mode::ReadOnly {
        return Ok(change);
    }
    if existing {
        let meta = fs::metadata(path).map_err(err)?;
        replace_file(path, &meta, |out| {
            out.write_all(new.as_bytes()).map_err(InjectError::Write)
        })
        .map_err(|e| match e {
            InjectError::Read(s) | InjectError::Write(s) => err(s),
            other => other,
        })?;
    } else {
        let mut tmp = TempFile::beside(path, 0o644).map_err(err)?;
        tmp.file.write_all(new.as_bytes()).map_err(err)?;
        fs::rename(&tmp.path, path).map_err(err)?;
        tmp.keep = true;
    }
    Ok(change)
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "https://pm.example.org/pm?a=1&b=2";

    fn pm() -> Vec<Link> {
        vec![Link::pm(URL).unwrap()]
    }

    fn tag() -> String {
        pm()[0].tag().to_string()
    }

    fn rewrite(page: &str) -> (String, Outcome) {
        let r = rewrite_html(page.as_bytes(), &pm()).unwrap();
        (String::from_utf8(r.html.into_owned()).unwrap(), r.outcome)
    }

    #[test]
    fn tag_is_escaped() {
        assert_eq!(
            tag(),
            r#"<link rel="pm" href="https://pm.example.org/pm?a=1&amp;b=2">"#
        );
        assert!(Link::new("pm x", URL).is_err());
        assert!(Link::new("", URL).is_err());
        assert!(Link::new("pm", "ftp://x.example/").is_err());
        assert!(Link::new("pm", "not a url").is_err());
        assert_eq!(Link::new("MicroPub", URL).unwrap().rel(), "micropub");
    }

    #[test]
    fn the_url_is_written_as_given_and_matched_in_any_equivalent_form() {
        let given = "https://PM.example.org";
        let links = [Link::pm(given).unwrap()];
        assert_eq!(
            links[0].tag(),
            r#"<link rel="pm" href="https://PM.example.org">"#
        );
        assert_eq!(
            header_value(&links[0]),
            r#"<https://PM.example.org>; rel="pm""#
        );
        for present in [
            given,
            "https://pm.example.org/",
            "https://pm.example.org:443",
        ] {
            let page = format!("<html><head><link rel=pm href=\"{present}\"></head></html>");
            let r = rewrite_html(page.as_bytes(), &links).unwrap();
            assert!(matches!(r.html, Cow::Borrowed(_)), "{present}");
        }
        // What a parser would rewrite is written serialised.
        let odd = Link::pm("https://pm.example.org/a b/\u{e9}").unwrap();
        assert_eq!(
            odd.tag(),
            r#"<link rel="pm" href="https://pm.example.org/a%20b/%C3%A9">"#
        );
    }

    #[test]
    fn inserts_before_head_end() {
        let page = "<!DOCTYPE html>\n<html>\n<head>\n<title>x</title>\n</head>\n<body><p>hi</p></body>\n</html>\n";
        let (out, outcome) = rewrite(page);
        assert_eq!(out, page.replace("</head>", &format!("{}</head>", tag())));
        assert_eq!(outcome.links, vec![LinkChange::Added]);
    }

    #[test]
    fn same_link_means_unchanged_even_with_entities() {
        for href in [
            "https://pm.example.org/pm?a=1&amp;b=2",
            "https://pm.example.org/pm?a=1&b=2",
            "https://PM.example.org:443/pm?a=1&#38;b=2",
        ] {
            let page = format!(
                "<html><head><link rel='Other PM' href='{href}'></head><body></body></html>"
            );
            let r = rewrite_html(page.as_bytes(), &pm()).unwrap();
            assert!(matches!(r.html, Cow::Borrowed(_)), "{href}");
            assert_eq!(r.outcome.links, vec![LinkChange::Present]);
        }
    }

    #[test]
    fn stale_link_is_replaced_in_place() {
        let page = "<html><head><link rel=pm href=\"https://old.example/pm\"><title>x</title></head></html>";
        let (out, outcome) = rewrite(page);
        assert_eq!(
            out,
            format!("<html><head>{}<title>x</title></head></html>", tag())
        );
        assert_eq!(
            outcome.links,
            vec![LinkChange::Replaced {
                old_href: "https://old.example/pm".into()
            }]
        );
        // With other rel values, the new tag goes before it and the old one stays.
        let page = "<html><head><link rel=\"me pm\" href=\"https://old.example/\"></head></html>";
        let (out, _) = rewrite(page);
        assert_eq!(
            out,
            format!(
                "<html><head>{}<link rel=\"me pm\" href=\"https://old.example/\"></head></html>",
                tag()
            )
        );
    }

    #[test]
    fn link_without_href_or_with_other_rel_does_not_count() {
        let page = "<head><link rel=pm><link rel=pm-other href=\"https://x.example/\"></head>";
        let (out, outcome) = rewrite(page);
        assert_eq!(out, page.replace("</head>", &format!("{}</head>", tag())));
        assert_eq!(outcome.links, vec![LinkChange::Added]);
    }

    #[test]
    fn places_without_head_end() {
        let t = tag();
        let cases = [
            // minified: no </head>
            (
                "<!doctype html><html lang=en><head><meta charset=utf-8><title>x</title><body><p>hi",
                format!(
                    "<!doctype html><html lang=en><head><meta charset=utf-8><title>x</title>{t}<body><p>hi"
                ),
            ),
            // no head or body tags at all
            (
                "<!doctype html><html lang=en><meta charset=utf-8><title>x</title><header>h</header>",
                format!(
                    "<!doctype html><html lang=en><meta charset=utf-8><title>x</title>{t}<header>h</header>"
                ),
            ),
            // a fragment
            ("<p>Hello</p>", format!("{t}<p>Hello</p>")),
            // head elements only: after the head start tag
            (
                "<!doctype html><head><title>x</title>",
                format!("<!doctype html><head>{t}<title>x</title>"),
            ),
            (
                "<!doctype html><title>x</title>",
                format!("<!doctype html>{t}<title>x</title>"),
            ),
            ("\u{feff}text only", format!("\u{feff}{t}text only")),
            ("", t.clone()),
            // template and noscript content is not the document
            (
                "<html><head><template><div>a</div></template><noscript><p>n</p></noscript></head>",
                format!(
                    "<html><head><template><div>a</div></template><noscript><p>n</p></noscript>{t}</head>"
                ),
            ),
            // upper-case tags
            (
                "<HTML><HEAD><TITLE>x</TITLE></HEAD><BODY></BODY></HTML>",
                format!("<HTML><HEAD><TITLE>x</TITLE>{t}</HEAD><BODY></BODY></HTML>"),
            ),
            // a </head> inside a comment or script does not count
            (
                "<html><head><!-- </head> --><script>\"</head>\"</script></head>",
                format!("<html><head><!-- </head> --><script>\"</head>\"</script>{t}</head>"),
            ),
        ];
        for (page, want) in cases {
            assert_eq!(rewrite(page).0, want, "{page}");
        }
    }

    #[test]
    fn links_inside_template_or_after_head_do_not_count() {
        let page = format!(
            "<head><template>{}</template></head><body>{}</body>",
            tag(),
            tag()
        );
        let (out, outcome) = rewrite(&page);
        assert_eq!(outcome.links, vec![LinkChange::Added]);
        assert!(out.starts_with(&format!(
            "<head><template>{}</template>{}</head>",
            tag(),
            tag()
        )));
    }

    #[test]
    fn several_links() {
        let links = [
            Link::pm(URL).unwrap(),
            Link::new("micropub", "https://pm.example.org/micropub").unwrap(),
        ];
        let page = "<head><link rel=micropub href=\"https://old.example/mp\"></head>";
        let r = rewrite_html(page.as_bytes(), &links).unwrap();
        assert_eq!(
            String::from_utf8(r.html.into_owned()).unwrap(),
            format!("<head>{}{}</head>", links[1].tag(), links[0].tag())
        );
        // Inserting at the offset where a replacement also starts.
        let page = "<head><link rel=micropub href=\"https://old.example/mp\">";
        let r = rewrite_html(page.as_bytes(), &links).unwrap();
        assert_eq!(
            String::from_utf8(r.html.into_owned()).unwrap(),
            format!("<head>{}{}", links[0].tag(), links[1].tag())
        );
    }

    #[test]
    fn offsets_survive_any_chunking() {
        let page = "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Ünïcödé</title>\
                    <link rel=\"pm\" href=\"https://old.example/\"><link rel=stylesheet href=/s.css></head><body>ü</body></html>";
        let whole = rewrite(page).0;
        for size in [1, 2, 3, 7, 64] {
            let mut out = Vec::new();
            let reader = Chunked(page.as_bytes(), size);
            let outcome = rewrite_stream(reader, &mut out, &pm()).unwrap();
            assert!(outcome.changed());
            assert_eq!(String::from_utf8(out).unwrap(), whole, "chunk {size}");
        }
    }

    /// A reader that hands out at most `.1` bytes at a time.
    struct Chunked<'a>(&'a [u8], usize);

    impl Read for Chunked<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.1.min(buf.len()).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn copy_spliced_matches_write_spliced() {
        let page = "<html><head><link rel=pm href=\"https://old.example/\"></head><body>"
            .to_string()
            + &"<p>ü</p>".repeat(2000)
            + "</body></html>";
        let mut scanner = Scanner::new(&pm());
        scanner.feed(page.as_bytes()).unwrap();
        let plan = scanner.finish().unwrap();
        let mut a = Vec::new();
        write_spliced(page.as_bytes(), &plan.edits, &pm(), &mut a).unwrap();
        for size in [1, 5, 100, 4096] {
            let mut b = Vec::new();
            let mut buf = vec![0; size];
            copy_spliced(&mut page.as_bytes(), &plan.edits, &pm(), &mut b, &mut buf).unwrap();
            assert_eq!(a, b, "buffer {size}");
        }
    }

    #[test]
    fn bad_pages_are_refused() {
        assert!(matches!(
            rewrite_html(b"<html><head>\xff</head>", &pm()),
            Err(InjectError::NotUtf8(12))
        ));
        assert!(matches!(
            rewrite_html(
                "<html><head></head>\u{e9}"
                    .as_bytes()
                    .split_last()
                    .unwrap()
                    .1,
                &pm()
            ),
            Err(InjectError::NotUtf8(19))
        ));
        for cut in [
            "<html><head></head><body><div cla",
            "<html><head></head><!-- x",
            "<html><head></head><p>a<",
        ] {
            assert!(
                matches!(
                    rewrite_html(cut.as_bytes(), &pm()),
                    Err(InjectError::Truncated)
                ),
                "{cut}"
            );
        }
        // A page that already carries the link is left as it is, unexamined.
        let fine = [
            format!("<head>{}</head>", tag()).as_bytes(),
            b"<p>\xff<div cla",
        ]
        .concat();
        assert!(!rewrite_html(&fine, &pm()).unwrap().outcome.changed());
        // Text with a `<` that opens nothing is not markup.
        assert!(rewrite_html(b"<head></head><p>1 < 2", &pm()).is_ok());
        let mut check = Utf8Check::default();
        let bytes = "aé€😀".as_bytes();
        for b in bytes {
            check.push(std::slice::from_ref(b)).unwrap();
        }
        check.finish().unwrap();
    }

    #[test]
    fn headers_file() {
        let links = [
            Link::pm("https://pm.example.org/pm").unwrap(),
            Link::new("micropub", "https://pm.example.org/micropub").unwrap(),
        ];
        let fresh = headers_text("", &links).unwrap();
        assert_eq!(
            fresh,
            "/*\n  Link: <https://pm.example.org/pm>; rel=\"pm\"\n  Link: <https://pm.example.org/micropub>; rel=\"micropub\"\n"
        );
        assert_eq!(headers_text(&fresh, &links), None);
        let old = "/blog/*\n  X-Frame-Options: DENY\n\n/*\n  X-Robots-Tag: noindex\n  Link: </style.css>; rel=\"preload\", <https://old.example/>; rel=pm\n\n/x\n  A: b";
        let new = headers_text(old, &links[..1]).unwrap();
        assert_eq!(
            new,
            "/blog/*\n  X-Frame-Options: DENY\n\n/*\n  X-Robots-Tag: noindex\n  Link: </style.css>; rel=\"preload\", <https://pm.example.org/pm>; rel=\"pm\"\n\n/x\n  A: b\n"
        );
        assert_eq!(headers_text(&new, &links[..1]), None);
        assert_eq!(
            headers_text("/x\n  A: b\n", &links[..1]).unwrap(),
            "/x\n  A: b\n\n/*\n  Link: <https://pm.example.org/pm>; rel=\"pm\"\n"
        );
    }
}
