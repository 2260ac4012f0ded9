//! `indiepm inject` against the real binary, on real Hugo output
//! (`site-example` built with the `hugo` on PATH) and on hand-made pages
//! for the edge cases: golden byte comparisons, idempotence down to the
//! mtime, stale links, pages without a head, --check, --dry-run, --rel,
//! --headers, --config, bad pages, symlinks, permissions, temp files.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::SystemTime;

use indiepm::inject::{Link, LinkChange, rewrite_html, rewrite_stream};
use scraper::{Html, Selector};

const URL: &str = "https://pm.example.org/pm?site=alice&x=1";
const TAG: &str = r#"<link rel="pm" href="https://pm.example.org/pm?site=alice&amp;x=1">"#;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn inject(args: &[&str]) -> Run {
    inject_env(args, &[])
}

fn inject_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let out: Output = Command::new(env!("CARGO_BIN_EXE_indiepm"))
        .arg("inject")
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run indiepm");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

/// Every regular file under `dir` (symlinks and FIFOs excluded): bytes,
/// mtime and mode, by relative path.
type Snapshot = BTreeMap<PathBuf, (Vec<u8>, SystemTime, u32)>;

fn snapshot(dir: &Path) -> Snapshot {
    walk(dir)
        .filter(|e| e.file_type().is_file())
        .map(|e| (e.path().to_path_buf(), e.metadata().unwrap()))
        .filter(|(_, meta)| meta.permissions().mode() & 0o400 != 0)
        .map(|(path, meta)| {
            let rel = path.strip_prefix(dir).unwrap().to_path_buf();
            let bytes = fs::read(&path).unwrap();
            (
                rel,
                (bytes, meta.modified().unwrap(), meta.permissions().mode()),
            )
        })
        .collect()
}

/// Every entry under `dir`, symlinks not followed.
fn walk(dir: &Path) -> impl Iterator<Item = walkdir::DirEntry> {
    walkdir::WalkDir::new(dir)
        .min_depth(1)
        .into_iter()
        .map(|e| e.unwrap())
}

fn pages(snap: &Snapshot) -> Vec<&PathBuf> {
    snap.keys()
        .filter(|p| p.extension().is_some_and(|e| e == "html" || e == "htm"))
        .collect()
}

/// Temporary files of ours left anywhere under `dir`.
fn leftovers(dir: &Path) -> Vec<PathBuf> {
    walk(dir)
        .filter(|e| e.file_name().to_string_lossy().starts_with(".indiepm-"))
        .map(|e| e.path().to_path_buf())
        .collect()
}

/// The `href` discovery would pick for `rel`: the first `<link>` or `<a>`
/// in document order with that rel value and an href.
fn discovered(html: &[u8], rel: &str) -> Option<String> {
    let doc = Html::parse_document(&String::from_utf8_lossy(html));
    let sel = Selector::parse("link[rel][href], a[rel][href]").unwrap();
    doc.select(&sel)
        .find(|el| {
            el.value()
                .attr("rel")
                .unwrap()
                .split_ascii_whitespace()
                .any(|t| t.eq_ignore_ascii_case(rel))
        })
        .map(|el| el.value().attr("href").unwrap().to_string())
}

/// `bytes` with the first `needle` cut out; panics when it is not there.
fn without(bytes: &[u8], needle: &str) -> Vec<u8> {
    let n = needle.as_bytes();
    let at = bytes
        .windows(n.len())
        .position(|w| w == n)
        .unwrap_or_else(|| panic!("{needle} not in {}", String::from_utf8_lossy(bytes)));
    [&bytes[..at], &bytes[at + n.len()..]].concat()
}

fn count(bytes: &[u8], needle: &str) -> usize {
    bytes
        .windows(needle.len())
        .filter(|w| *w == needle.as_bytes())
        .count()
}

/// The `hugo` binary, or `None` (with a loud note) outside CI when missing.
fn hugo() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("hugo"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "hugo is not installed, and CI must run the Hugo tests (apt-get install hugo)"
        );
        eprintln!(
            "\n!!! SKIPPED: hugo is not on PATH; `apt-get install hugo` to run this test !!!\n"
        );
    }
    found
}

/// Builds `site-example` with Hugo into `dest`.
fn build_site(hugo: &Path, dest: &Path, extra: &[&str], env: &[(&str, &str)]) {
    let out = Command::new(hugo)
        .args(["--quiet", "--source"])
        .arg(repo().join("site-example"))
        .arg("--destination")
        .arg(dest)
        .args(extra)
        .envs(env.iter().copied())
        .output()
        .expect("run hugo");
    assert!(
        out.status.success(),
        "hugo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write(path: &Path, bytes: impl AsRef<[u8]>) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(path, bytes).unwrap();
}

#[test]
fn hugo_site_every_page_gets_the_link_and_nothing_else_changes() {
    let Some(hugo) = hugo() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let site = tmp.path().join("public");
    build_site(&hugo, &site, &[], &[]);
    let before = snapshot(&site);
    assert!(pages(&before).len() >= 6, "{:?}", before.keys());

    let run = inject(&[s(&site), "--endpoint", URL]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let n = pages(&before).len();
    assert!(
        run.stderr.contains(&format!(
            "{n} pages scanned, {n} changed, 0 already fine, 0 skipped, 0 failed"
        )),
        "{}",
        run.stderr
    );
    let after = snapshot(&site);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    for (path, (old, mtime, mode)) in &before {
        let (new, new_mtime, new_mode) = &after[path];
        assert_eq!(mode, new_mode, "{path:?} permissions");
        if pages(&before).contains(&path) {
            // Golden: the inserted tag is the only change.
            assert_eq!(count(new, TAG), 1, "{path:?}");
            assert_eq!(&without(new, TAG), old, "{path:?}");
            assert_eq!(
                count(new, &format!("{TAG}</head>")),
                1,
                "{path:?}: not at the end of the head"
            );
            assert_eq!(discovered(new, "pm").as_deref(), Some(URL), "{path:?}");
        } else {
            assert_eq!((old, mtime), (new, new_mtime), "{path:?} is not a page");
        }
    }
    assert!(leftovers(&site).is_empty());

    // Second run: nothing rewritten, not even an mtime.
    let run = inject(&[s(&site), "--endpoint", URL]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr
            .contains(&format!("{n} pages scanned, 0 changed, {n} already fine")),
        "{}",
        run.stderr
    );
    assert_eq!(snapshot(&site), after);
    assert!(leftovers(&site).is_empty());
}

#[test]
fn hugo_partial_emits_the_link_inject_expects() {
    let partial = fs::read(repo().join("templates/hugo/pm-link.html")).unwrap();
    let copy = fs::read(repo().join("site-example/layouts/partials/pm-link.html")).unwrap();
    assert_eq!(
        partial, copy,
        "site-example's partial must be templates/hugo/pm-link.html"
    );
    let Some(hugo) = hugo() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let site = tmp.path().join("public");
    build_site(&hugo, &site, &[], &[("HUGOxPARAMSxPM_ENDPOINT", URL)]);
    let before = snapshot(&site);
    for page in pages(&before) {
        let html = &before[page].0;
        assert_eq!(
            count(html, TAG),
            1,
            "{page:?}: the partial writes inject's tag"
        );
        assert_eq!(discovered(html, "pm").as_deref(), Some(URL));
    }
    let run = inject(&[s(&site), "--endpoint", URL, "--check"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    let run = inject(&[s(&site), "--endpoint", URL]);
    assert!(run.stderr.contains(" 0 changed"), "{}", run.stderr);
    assert_eq!(snapshot(&site), before);
}

#[test]
fn committed_public_matches_a_fresh_build() {
    let Some(hugo) = hugo() else { return };
    let tmp = tempfile::tempdir().unwrap();
    build_site(&hugo, tmp.path(), &[], &[]);
    let fresh: BTreeMap<_, _> = snapshot(tmp.path())
        .into_iter()
        .map(|(p, (b, _, _))| (p, b))
        .collect();
    let committed: BTreeMap<_, _> = snapshot(&repo().join("site-example/public"))
        .into_iter()
        .map(|(p, (b, _, _))| (p, b))
        .collect();
    assert!(
        fresh == committed,
        "site-example/public is out of date: run `hugo --source site-example --destination public`"
    );
}

#[test]
fn minified_hugo_output_without_head_and_body_tags() {
    let Some(hugo) = hugo() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let extra = tmp.path().join("minify.toml");
    write(
        &extra,
        "[minify.tdewolff.html]\nkeepDocumentTags = false\nkeepEndTags = false\n",
    );
    let site = tmp.path().join("public");
    let config = format!("hugo.toml,{}", s(&extra));
    build_site(&hugo, &site, &["--minify", "--config", &config], &[]);
    let before = snapshot(&site);
    let home = &before[Path::new("index.html")].0;
    assert!(count(home, "</head>") == 0 && count(home, "<body") == 0);

    let run = inject(&[s(&site), "--endpoint", URL]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let after = snapshot(&site);
    for page in pages(&before) {
        let new = &after[page].0;
        assert_eq!(&without(new, TAG), &before[page].0, "{page:?}");
        // Where the parser ends the implied head: before the first body element.
        assert_eq!(count(new, &format!("{TAG}<header>")), 1, "{page:?}");
        assert_eq!(discovered(new, "pm").as_deref(), Some(URL));
    }
    let run = inject(&[s(&site), "--endpoint", URL]);
    assert!(run.stderr.contains(" 0 changed"), "{}", run.stderr);
    assert_eq!(snapshot(&site), after);
}

#[test]
fn stale_link_is_replaced_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let page = tmp.path().join("index.html");
    let old_tag = r#"<link rel="pm" href="https://old.example/pm">"#;
    let original = format!(
        "<!DOCTYPE html>\n<html><head>\n<title>t</title>\n{old_tag}\n<link rel=stylesheet href=s.css>\n</head><body><a rel=pm href=/x>x</a></body></html>\n"
    );
    write(&page, &original);
    let run = inject(&[s(tmp.path()), "--endpoint", URL]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("index.html: replaced stale rel=\"pm\" link to https://old.example/pm"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("1 changed (1 stale link replaced)"),
        "{}",
        run.stderr
    );
    let new = fs::read_to_string(&page).unwrap();
    assert_eq!(new, original.replace(old_tag, TAG));
    assert_eq!(discovered(new.as_bytes(), "pm").as_deref(), Some(URL));
    let run = inject(&[s(tmp.path()), "--endpoint", URL]);
    assert!(run.stderr.contains(" 0 changed"), "{}", run.stderr);
}

#[test]
fn pages_without_a_head_still_get_a_discoverable_link() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("fragment.html", "<p>Just a paragraph.</p>\n"),
        (
            "headless.html",
            "<!doctype html>\n<title>No head</title>\n<p>text</p>\n",
        ),
        (
            "title-only.html",
            "<!doctype html><html><title>Only a title</title></html>",
        ),
        (
            "minified.html",
            "<!doctype html><html lang=en><head><meta charset=utf-8><title>m</title><body><p>no head end tag",
        ),
        ("text.htm", "plain text, no markup at all\n"),
        ("empty.html", ""),
        (
            "comment-first.html",
            "<!-- generated --><!DOCTYPE html><html><head></head><body></body></html>",
        ),
    ];
    for (name, html) in cases {
        write(&tmp.path().join(name), html);
    }
    let run = inject(&[s(tmp.path()), "--endpoint", URL]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    for (name, html) in cases {
        let new = fs::read(tmp.path().join(name)).unwrap();
        assert_eq!(without(&new, TAG), html.as_bytes(), "{name}");
        assert_eq!(discovered(&new, "pm").as_deref(), Some(URL), "{name}");
    }
    let minified = fs::read_to_string(tmp.path().join("minified.html")).unwrap();
    assert!(
        minified.contains(&format!("<title>m</title>{TAG}<body>")),
        "{minified}"
    );
    let run = inject(&[s(tmp.path()), "--endpoint", URL]);
    assert!(run.stderr.contains(" 0 changed"), "{}", run.stderr);
}

#[test]
fn rel_option_adds_more_links() {
    let tmp = tempfile::tempdir().unwrap();
    let page = tmp.path().join("a/index.html");
    let original = "<html><head><title>x</title></head><body></body></html>";
    write(&page, original);
    let micropub = "https://pm.example.org/micropub";
    let args = [
        s(tmp.path()),
        "--endpoint",
        URL,
        "--rel",
        "micropub=https://pm.example.org/micropub",
    ];
    let run = inject(&args);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let new = fs::read(&page).unwrap();
    let mp_tag = format!(r#"<link rel="micropub" href="{micropub}">"#);
    assert_eq!(
        String::from_utf8(new.clone()).unwrap(),
        original.replace("</head>", &format!("{TAG}{mp_tag}</head>"))
    );
    assert_eq!(discovered(&new, "micropub").as_deref(), Some(micropub));
    assert_eq!(discovered(&new, "pm").as_deref(), Some(URL));
    let run = inject(&args);
    assert!(run.stderr.contains(" 0 changed"), "{}", run.stderr);
    for bad in [
        "micropub",
        "micro pub=https://x.example/",
        "micropub=ftp://x.example/",
        "pm=https://x.example/",
    ] {
        let run = inject(&[s(tmp.path()), "--endpoint", URL, "--rel", bad]);
        assert_eq!(run.code, 2, "{bad}");
        assert_eq!(run.stderr.lines().count(), 1, "{bad}: {}", run.stderr);
    }
    assert_eq!(fs::read(&page).unwrap(), new);
}

#[test]
fn check_and_dry_run_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    write(
        &root.join("index.html"),
        "<html><head></head><body></body></html>",
    );
    write(
        &root.join("b/index.html"),
        format!("<html><head>{TAG}</head></html>"),
    );
    write(
        &root.join("c/page.htm"),
        "<html><head><link rel=pm href=https://old.example/></head></html>",
    );
    let before = snapshot(root);

    let run = inject(&[s(root), "--endpoint", URL, "--check"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let mut listed: Vec<&str> = run.stdout.lines().collect();
    listed.sort();
    let want = [root.join("c/page.htm"), root.join("index.html")];
    assert_eq!(listed, want.iter().map(|p| s(p)).collect::<Vec<_>>());
    assert!(
        run.stderr.contains("3 pages scanned, 2 missing the link"),
        "{}",
        run.stderr
    );
    assert_eq!(snapshot(root), before);

    let run = inject(&[s(root), "--endpoint", URL, "--dry-run"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stdout.lines().count(), 2, "{}", run.stdout);
    assert!(run.stderr.contains("2 would change"), "{}", run.stderr);
    assert!(run.stderr.contains("would replace stale"), "{}", run.stderr);
    assert_eq!(snapshot(root), before);
    assert!(leftovers(root).is_empty());

    assert_eq!(inject(&[s(root), "--endpoint", URL]).code, 0);
    let run = inject(&[s(root), "--endpoint", URL, "--check"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.is_empty());
}

#[test]
fn headers_file_is_written_and_kept_up_to_date() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    write(&root.join("index.html"), "<html><head></head></html>");
    let headers = root.join("_headers");
    let run = inject(&[s(root), "--endpoint", URL, "--headers", s(&headers)]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let want = format!("/*\n  Link: <{URL}>; rel=\"pm\"\n");
    assert_eq!(fs::read_to_string(&headers).unwrap(), want);
    let mtime = fs::metadata(&headers).unwrap().modified().unwrap();
    let run = inject(&[
        s(root),
        "--endpoint",
        URL,
        "--headers",
        s(&headers),
        "--check",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        inject(&[s(root), "--endpoint", URL, "--headers", s(&headers)]).code,
        0
    );
    assert_eq!(fs::metadata(&headers).unwrap().modified().unwrap(), mtime);

    // Other content is kept, a stale entry is updated in place.
    let other = "# site headers\n/admin/*\n  X-Robots-Tag: noindex\n\n/*\n  X-Frame-Options: DENY\n  Link: <https://old.example/pm>; rel=\"pm\"\n";
    write(&headers, other);
    fs::set_permissions(&headers, fs::Permissions::from_mode(0o640)).unwrap();
    let run = inject(&[
        s(root),
        "--endpoint",
        URL,
        "--headers",
        s(&headers),
        "--check",
    ]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(fs::read_to_string(&headers).unwrap(), other);
    let run = inject(&[s(root), "--endpoint", URL, "--headers", s(&headers)]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        fs::read_to_string(&headers).unwrap(),
        other.replace("https://old.example/pm", URL)
    );
    assert_eq!(
        fs::metadata(&headers).unwrap().permissions().mode() & 0o777,
        0o640
    );
    assert!(leftovers(root).is_empty());
}

#[test]
fn bad_pages_are_reported_and_left_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let bad: [(&str, &[u8]); 4] = [
        (
            "latin1.html",
            b"<html><head><title>caf\xe9</title></head></html>",
        ),
        (
            "cut-in-tag.html",
            b"<html><head><title>t</title></head><body><p>text</p><div cla",
        ),
        (
            "cut-in-char.html",
            b"<html><head><title>t</title></head><body>caf\xc3",
        ),
        ("utf16.html", b"\xff\xfe<\x00h\x00t\x00m\x00l\x00>\x00"),
    ];
    for (name, bytes) in bad {
        write(&root.join(name), bytes);
    }
    write(&root.join("good.html"), "<html><head></head></html>");
    let before = snapshot(root);
    let run = inject(&[s(root), "--endpoint", URL]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    for (name, _) in bad {
        let line = run
            .stderr
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("{name} not reported: {}", run.stderr));
        assert!(line.ends_with("left unchanged"), "{line}");
        assert_eq!(
            before[Path::new(name)],
            snapshot(root)[Path::new(name)],
            "{name}"
        );
    }
    assert!(
        run.stderr
            .contains("5 pages scanned, 1 changed, 0 already fine, 0 skipped, 4 failed"),
        "{}",
        run.stderr
    );
    assert_eq!(
        discovered(&fs::read(root.join("good.html")).unwrap(), "pm").as_deref(),
        Some(URL)
    );
    assert!(leftovers(root).is_empty());
    // --check reports them as errors too.
    assert_eq!(inject(&[s(root), "--endpoint", URL, "--check"]).code, 2);
}

#[test]
fn unreadable_and_odd_entries() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    write(&root.join("ok.html"), "<html><head></head></html>");
    // A FIFO named like a page: opening it would block forever.
    let fifo = root.join("pipe.html");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    symlink(root.join("missing.html"), root.join("dangling.html")).unwrap();
    // A folder named like a page is walked into, not opened.
    write(
        &root.join("folder.html/index.html"),
        "<html><head></head></html>",
    );
    let locked = root.join("locked.html");
    write(&locked, "<html><head></head></html>");
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).unwrap();
    // root reads anything, so only an unprivileged user sees a failure here.
    let readable = fs::read(&locked).is_ok();

    let run = inject(&[s(root), "--endpoint", URL]);
    assert!(
        run.stderr
            .contains("pipe.html: skipped: not a regular file"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("dangling.html: skipped: a symbolic link"),
        "{}",
        run.stderr
    );
    if readable {
        assert_eq!(run.code, 0, "{}", run.stderr);
        assert!(
            run.stderr
                .contains("5 pages scanned, 3 changed, 0 already fine, 2 skipped, 0 failed"),
            "{}",
            run.stderr
        );
        // The page kept its (empty) permissions.
        assert_eq!(
            fs::metadata(&locked).unwrap().permissions().mode() & 0o777,
            0
        );
    } else {
        assert_eq!(run.code, 2, "{}", run.stderr);
        assert!(
            run.stderr.contains("locked.html: cannot be read"),
            "{}",
            run.stderr
        );
        assert!(run.stderr.contains("2 skipped, 1 failed"), "{}", run.stderr);
    }
    assert!(
        fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo_like()
    );
    assert_eq!(
        discovered(
            &fs::read(root.join("folder.html/index.html")).unwrap(),
            "pm"
        )
        .as_deref(),
        Some(URL)
    );
    assert!(leftovers(root).is_empty());
}

trait FifoLike {
    fn is_fifo_like(&self) -> bool;
}

impl FifoLike for fs::FileType {
    fn is_fifo_like(&self) -> bool {
        std::os::unix::fs::FileTypeExt::is_fifo(self)
    }
}

#[test]
fn symlinks_are_never_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    let site = tmp.path().join("site");
    let page = "<html><head></head></html>";
    write(&outside.join("secret.html"), page);
    write(&outside.join("dir/index.html"), page);
    write(&site.join("index.html"), page);
    symlink(outside.join("secret.html"), site.join("linked.html")).unwrap();
    symlink(outside.join("dir"), site.join("linked-dir")).unwrap();
    symlink(site.join("index.html"), site.join("inside-link.html")).unwrap();
    let before = snapshot(&outside);
    let run = inject(&[s(&site), "--endpoint", URL]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("3 pages scanned, 1 changed, 0 already fine, 2 skipped"),
        "{}",
        run.stderr
    );
    assert_eq!(snapshot(&outside), before);
    for link in ["linked.html", "linked-dir", "inside-link.html"] {
        assert!(
            fs::symlink_metadata(site.join(link))
                .unwrap()
                .file_type()
                .is_symlink(),
            "{link}"
        );
    }
}

#[test]
fn permissions_are_kept() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, mode) in [
        ("a.html", 0o640),
        ("b.html", 0o755),
        ("c.html", 0o600),
        ("d.html", 0o444),
    ] {
        let path = tmp.path().join(name);
        write(&path, "<html><head></head></html>");
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    }
    let run = inject(&[s(tmp.path()), "--endpoint", URL]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    for (name, mode) in [
        ("a.html", 0o640),
        ("b.html", 0o755),
        ("c.html", 0o600),
        ("d.html", 0o444),
    ] {
        let meta = fs::metadata(tmp.path().join(name)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "{name}");
        assert_eq!(count(&fs::read(tmp.path().join(name)).unwrap(), TAG), 1);
    }
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    write(&root.join("index.html"), "<html><head></head></html>");
    let file = root.join("index.html");
    let missing = root.join("missing");
    let before = snapshot(root);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![s(root), "--endpoint", "pm.example.org/pm"],
            "not a URL",
        ),
        (
            vec![s(root), "--endpoint", "ftp://pm.example.org/"],
            "http or https",
        ),
        (vec![s(root), "--endpoint", "https://"], "not a URL"),
        (vec![s(&missing), "--endpoint", URL], "does not exist"),
        (vec![s(&file), "--endpoint", URL], "is not a folder"),
        (vec![s(root), "--config", s(&missing)], "cannot read config"),
        // clap's usage errors, made one line too.
        (vec![s(root)], "--endpoint"),
        (vec![s(root), "--endpoint", URL, "--bogus"], "--bogus"),
    ];
    for (args, says) in cases {
        let run = inject(&args);
        assert_eq!(run.code, 2, "{args:?}: {}", run.stderr);
        assert_eq!(
            run.stderr.trim_end().lines().count(),
            1,
            "{args:?}: {}",
            run.stderr
        );
        assert!(run.stderr.contains(says), "{args:?}: {}", run.stderr);
    }
    assert_eq!(snapshot(root), before);
}

#[test]
fn endpoint_from_config() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("public");
    write(&root.join("index.html"), "<html><head></head></html>");
    let config = tmp.path().join("indiepm.toml");
    write(
        &config,
        format!(
            "[[site]]\nme = \"https://alice.example.org/\"\nendpoint = \"{URL}\"\ncontent_dir = \"content\"\n\n\
             [[site]]\nme = \"https://bob.example.com/\"\nendpoint = \"https://pm.example.org/bob\"\ncontent_dir = \"bob\"\n"
        ),
    );
    let run = inject(&[s(&root), "--config", s(&config), "--check"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(inject(&[s(&root), "--config", s(&config)]).code, 0);
    assert_eq!(
        discovered(&fs::read(root.join("index.html")).unwrap(), "pm").as_deref(),
        Some(URL)
    );

    let run = inject(&[
        s(&root),
        "--config",
        s(&config),
        "--site",
        "https://BOB.example.com",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains("1 stale link replaced"),
        "{}",
        run.stderr
    );
    assert_eq!(
        discovered(&fs::read(root.join("index.html")).unwrap(), "pm").as_deref(),
        Some("https://pm.example.org/bob")
    );
    let run = inject(&[
        s(&root),
        "--config",
        s(&config),
        "--site",
        "https://carol.example/",
    ]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("no [[site]] with me"), "{}", run.stderr);
    let run = inject(&[s(&root), "--config", s(&config), "--endpoint", URL]);
    assert_eq!(run.code, 2, "--config and --endpoint together");
}

#[test]
fn big_pages_are_streamed() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // Over the 1 MiB in-memory limit, with multi-byte text across chunk edges.
    let body = "<p>Grüße aus 東京 🙂</p>\n".repeat(120_000);
    let big =
        format!("<!DOCTYPE html><html><head><title>big</title></head><body>{body}</body></html>\n");
    assert!(big.len() > 3 << 20);
    write(&root.join("big.html"), &big);
    // A big page whose link sits at the very end (no head at all).
    let headless = format!("{body}<p>end</p>");
    write(&root.join("headless.html"), &headless);
    let mut latin1 = big.clone().into_bytes();
    let at = latin1.len() - 100;
    latin1[at] = 0xe9;
    write(&root.join("latin1.html"), &latin1);

    let run = inject(&[s(root), "--endpoint", URL]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("latin1.html: is not UTF-8"),
        "{}",
        run.stderr
    );
    assert_eq!(fs::read(root.join("latin1.html")).unwrap(), latin1);
    assert_eq!(
        fs::read_to_string(root.join("big.html")).unwrap(),
        big.replace("</head>", &format!("{TAG}</head>"))
    );
    let new = fs::read(root.join("headless.html")).unwrap();
    assert_eq!(without(&new, TAG), headless.as_bytes());
    assert_eq!(discovered(&new, "pm").as_deref(), Some(URL));
    let before = snapshot(root);
    let run = inject(&[s(root), "--endpoint", URL]);
    assert!(
        run.stderr.contains(" 0 changed, 2 already fine"),
        "{}",
        run.stderr
    );
    assert_eq!(snapshot(root), before);
    assert!(leftovers(root).is_empty());
}

#[test]
fn library_rewrites_one_document() {
    let links = [
        Link::pm(URL).unwrap(),
        Link::new("micropub", "https://pm.example.org/micropub").unwrap(),
    ];
    let page = b"<html><head><link rel=\"pm\" href=\"https://pm.example.org/pm?site=alice&amp;x=1\"></head></html>";
    let r = rewrite_html(page, &links).unwrap();
    assert_eq!(
        r.outcome.links,
        vec![LinkChange::Present, LinkChange::Added]
    );
    assert_eq!(
        r.html.as_ref(),
        [
            &page[..page.len() - 14],
            links[1].tag().as_bytes(),
            b"</head></html>"
        ]
        .concat()
    );
    let again = rewrite_html(&r.html, &links).unwrap();
    assert!(!again.outcome.changed());
    assert!(matches!(again.html, std::borrow::Cow::Borrowed(_)));

    let mut out = Vec::new();
    let outcome = rewrite_stream(&page[..], &mut out, &links).unwrap();
    assert!(outcome.changed());
    assert_eq!(out, r.html.as_ref());
    assert!(rewrite_html(b"<p>\xff</p>", &links).is_err());
}

#[test]
fn every_page_of_wide_and_deep_trees_is_handled_once() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let page = "<html><head></head><body></body></html>";
    // A flat folder of many pages, many folders of one page, and a deep chain:
    // more work than the shared queue holds, so workers also walk inline.
    for i in 0..700 {
        write(&root.join(format!("flat/p{i}.html")), page);
    }
    for i in 0..300 {
        write(&root.join(format!("posts/post-{i}/index.html")), page);
    }
    let mut deep = root.join("deep");
    for i in 0..40 {
        deep = deep.join(format!("d{i}"));
        write(&deep.join("index.htm"), page);
    }
    let total = 700 + 300 + 40;
    for jobs in ["1", "3", "16"] {
        let run = inject(&[s(root), "--endpoint", URL, "--check", "--jobs", jobs]);
        assert_eq!(run.code, 1);
        let mut listed: Vec<&str> = run.stdout.lines().collect();
        listed.sort();
        listed.dedup();
        assert_eq!(listed.len(), total, "--jobs {jobs}");
    }
    let run = inject(&[s(root), "--endpoint", URL]);
    assert!(
        run.stderr
            .contains(&format!("{total} pages scanned, {total} changed")),
        "{}",
        run.stderr
    );
    let after = snapshot(root);
    assert!(after.values().all(|(b, _, _)| count(b, TAG) == 1));
    let run = inject(&[s(root), "--endpoint", URL, "-j", "2"]);
    assert!(
        run.stderr
            .contains(&format!("0 changed, {total} already fine")),
        "{}",
        run.stderr
    );
    assert_eq!(snapshot(root), after);
}

/// A generator at `INDIEPM_<NAME>` or its default path (as .ci/run
/// installs it), or `None` with a loud note outside CI.
fn generator(env: &str, default: &str, what: &str) -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var(env).unwrap_or_else(|_| default.into()));
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{what} is missing at {} (set {env}); .ci/run installs it",
        path.display()
    );
    eprintln!(
        "\n!!! SKIPPED: {what} is missing at {} (set {env}) !!!\n",
        path.display()
    );
    None
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().expect("run generator");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every page of `out` carries inject's exact tag, and inject agrees.
fn assert_generator_link(out: &Path, what: &str) {
    let snap = snapshot(out);
    assert!(!pages(&snap).is_empty(), "{what}: no pages in {out:?}");
    for page in pages(&snap) {
        let html = &snap[page].0;
        assert_eq!(
            count(html, TAG),
            1,
            "{what} {page:?}: {}",
            String::from_utf8_lossy(html)
        );
        assert_eq!(discovered(html, "pm").as_deref(), Some(URL));
    }
    let run = inject(&[s(out), "--endpoint", URL, "--check"]);
    assert_eq!(run.code, 0, "{what}: {}", run.stderr);
}

#[test]
fn jekyll_include_emits_the_link_inject_expects() {
    let Some(jekyll) = generator(
        "INDIEPM_JEKYLL",
        "/usr/bin/jekyll",
        "Jekyll (apt-get install jekyll)",
    ) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write(
        &src.join("_includes/pm-link.html"),
        fs::read(repo().join("templates/jekyll/pm-link.html")).unwrap(),
    );
    write(
        &src.join("_layouts/default.html"),
        "<!DOCTYPE html>\n<html>\n<head>\n<title>{{ page.title }}</title>\n{% include pm-link.html %}\n</head>\n<body>{{ content }}</body>\n</html>\n",
    );
    write(
        &src.join("index.md"),
        "---\nlayout: default\ntitle: Home\n---\nHello.\n",
    );
    write(
        &src.join("about.md"),
        "---\nlayout: default\ntitle: About\n---\nAbout.\n",
    );
    for (config, has_link) in [
        (format!("pm_endpoint: \"{URL}\"\n"), true),
        (String::new(), false),
    ] {
        write(&src.join("_config.yml"), format!("title: t\n{config}"));
        let out = tmp.path().join("out");
        let _ = fs::remove_dir_all(&out);
        run_ok(
            Command::new(&jekyll)
                .args(["build", "--quiet", "--disable-disk-cache", "--source"])
                .arg(&src)
                .arg("--destination")
                .arg(&out)
                .current_dir(tmp.path())
                .env("JEKYLL_NO_BUNDLER_REQUIRE", "true"),
        );
        if has_link {
            assert_generator_link(&out, "jekyll");
        } else {
            let home = fs::read(out.join("index.html")).unwrap();
            assert_eq!(discovered(&home, "pm"), None, "no pm_endpoint, no link");
        }
    }
}

#[test]
fn eleventy_plugin_emits_the_link_inject_expects() {
    let Some(eleventy) = generator(
        "INDIEPM_ELEVENTY",
        "/opt/indiepm-test-tools/eleventy/node_modules/.bin/eleventy",
        "Eleventy (npm install @11ty/eleventy in /opt/indiepm-test-tools/eleventy, see .ci/run)",
    ) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    write(
        &root.join("pm-link.js"),
        fs::read(repo().join("templates/eleventy/pm-link.js")).unwrap(),
    );
    let head = "<!DOCTYPE html>\n<html>\n<head>\n<title>{{ title }}</title>\n";
    write(
        &root.join("src/_includes/shortcode.njk"),
        format!("{head}{{% pmLink %}}\n</head>\n<body>{{{{ content | safe }}}}</body>\n</html>\n"),
    );
    write(
        &root.join("src/_includes/plain.njk"),
        format!("{head}</head>\n<body>{{{{ content | safe }}}}</body>\n</html>\n"),
    );
    let url_js = URL.replace('"', "\\\"");
    for (layout, options) in [
        ("shortcode.njk", format!("{{ endpoint: \"{url_js}\" }}")),
        (
            "plain.njk",
            format!("{{ endpoint: \"{url_js}\", transform: true }}"),
        ),
    ] {
        write(
            &root.join("eleventy.config.js"),
            format!(
                "const pmLink = require(\"./pm-link.js\");\n\
                 module.exports = function (eleventyConfig) {{\n  eleventyConfig.addPlugin(pmLink, {options});\n}};\n"
            ),
        );
        write(
            &root.join("src/index.md"),
            format!("---\nlayout: {layout}\ntitle: Home\n---\nHello.\n"),
        );
        write(
            &root.join("src/about.md"),
            format!("---\nlayout: {layout}\ntitle: About\n---\nAbout.\n"),
        );
        let out = root.join("_site");
        let _ = fs::remove_dir_all(&out);
        run_ok(
            Command::new(&eleventy)
                .args(["--input=src", "--output=_site", "--quiet"])
                .current_dir(root),
        );
        assert_generator_link(&out, &format!("eleventy {layout}"));
    }
}

#[test]
fn zola_and_hugo_snippets_read_the_documented_keys() {
    // Zola is in no registry the CI machine reaches, so its snippets are
    // checked as text: the key, the escaping, and the exact tag shape.
    for (file, key) in [
        ("templates/zola/pm-link.html", "config.extra.pm_endpoint"),
        ("templates/zola/pm-macros.html", "endpoint"),
        ("templates/hugo/pm-link.html", "site.Params.pm_endpoint"),
        ("templates/jekyll/pm-link.html", "site.pm_endpoint"),
    ] {
        let text = fs::read_to_string(repo().join(file)).unwrap();
        assert!(text.contains(key), "{file} reads {key}");
        assert!(
            text.contains(r#"<link rel="pm" href=""#),
            "{file} emits the tag"
        );
        if file.contains("zola") || file.contains("jekyll") {
            assert!(text.contains("| escape"), "{file} escapes the URL");
        }
    }
}
