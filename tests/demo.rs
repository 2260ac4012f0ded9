//! `indiepm demo`, the README's first command, run as a user would: the
//! real binary, no set-up, and what it prints.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn demo_delivers_both_ways_in_both_flows_and_shows_the_inbox_files() {
    let out = Command::new(env!("CARGO_BIN_EXE_indiepm"))
        .arg("demo")
        .output()
        .expect("run indiepm demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "alice → bob (channel flow)",
        "bob → alice (channel flow)",
        "alice → bob (message flow)",
        "bob → alice (message flow)",
        "done: 4 messages delivered",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in\n{stdout}");
    }
    // The trace names every step of the six-step flow.
    for step in 0..=6 {
        assert!(
            stdout.contains(&format!("step {step}")),
            "no step {step} in\n{stdout}"
        );
    }
    // Two inbox files each, with the message and raw HTML neutralised.
    assert_eq!(stdout.matches("alice's inbox: ").count(), 2, "{stdout}");
    assert_eq!(stdout.matches("bob's inbox: ").count(), 2, "{stdout}");
    assert!(stdout.contains("&lt;script>"), "{stdout}");
    assert!(!stdout.contains("<script>"), "{stdout}");
    // The temporary working folder is gone afterwards.
    let folder = stdout
        .lines()
        .find_map(|l| l.strip_prefix("working folder: "))
        .expect("the working folder is printed");
    assert!(
        !std::path::Path::new(folder).exists(),
        "{folder} left behind"
    );
}

#[test]
fn demo_keep_prints_the_web_ui_and_stops_cleanly_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_indiepm"))
        .args(["demo", "--keep", "--dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run indiepm demo --keep");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut ui = Vec::new();
    while ui.len() < 2 {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("demo --keep prints the web UI of both servers");
        if line.contains("web UI http://") {
            ui.push(line);
        }
    }
    // The UI answers while the demo keeps running.
    let url = ui[0]
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let page = rt
        .block_on(
            indiepm::fetch::Fetcher::new(true).get(&url::Url::parse(&url).unwrap(), "text/html"),
        )
        .unwrap();
    assert!(page.status.is_success(), "{url}: {}", page.status);
    assert!(
        String::from_utf8_lossy(&page.body).contains("Sign in"),
        "{url}"
    );
    assert!(ui[0].contains("password "), "{}", ui[0]);
    // The files stay in --dir.
    assert!(dir.path().join("alice").join("indiepm.toml").is_file());
    // Ctrl-C stops it cleanly.
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "demo --keep did not stop on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(
        rest.iter()
            .any(|l| l.contains("done: 4 messages delivered")),
        "{rest:?}"
    );
}
