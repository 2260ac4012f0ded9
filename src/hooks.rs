//! Telling the owner a message arrived: the site's `on_message` command
//! (given the file's path) and its `webhook` (a JSON POST), both run in the
//! background after the message is durable, so a slow hook never delays or
//! fails a delivery.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::Semaphore;

use crate::app::App;

/// Hook commands running at once; more wait their turn (a flood of
/// messages must not become a flood of processes).
static HOOK_SLOTS: Semaphore = Semaphore::const_new(4);
/// A hook command still running after this is killed.
const HOOK_TIMEOUT: Duration = Duration::from_secs(30);

pub fn message_received(app: &Arc<App>, recipient: &str, sender: &str, id: &str, path: &Path) {
    let Some(site) = app.site(recipient) else {
        return;
    };
    if let Some(cmd) = site.on_message.clone() {
        let path = path.to_path_buf();
        app.tracker.spawn(async move {
            let Ok(_slot) = HOOK_SLOTS.acquire().await else {
                return;
            };
            // The path is passed as an argument ("$1"), never pasted into the script.
            let child = tokio::process::Command::new("sh")
                .arg("-c")
                .arg(format!("{cmd} \"$1\""))
                .arg("indiepm-on-message")
                .arg(&path)
                .kill_on_drop(true)
                .status();
            match tokio::time::timeout(HOOK_TIMEOUT, child).await {
                Ok(Ok(s)) if s.success() => tracing::info!(command = %cmd, "on_message ran"),
                Ok(Ok(s)) => tracing::warn!(command = %cmd, status = %s, "on_message failed"),
                Ok(Err(e)) => {
                    tracing::warn!(command = %cmd, error = %e, "on_message could not start")
                }
                Err(_) => tracing::warn!(command = %cmd, "on_message killed after 30 s"),
            }
        });
    }
    if let Some(hook) = site.webhook.clone() {
        let app2 = app.clone();
        let body = json!({
            "event": "message",
            "sender": sender,
            "recipient": recipient,
            "message": id,
            "path": path.display().to_string(),
        });
        app.tracker.spawn(async move {
            let Ok(url) = url::Url::parse(&hook) else {
                return;
            };
            match app2.fetcher.post_json(&url, &body).await {
                Ok(r) if r.status.is_success() => tracing::info!(webhook = %hook, "webhook called"),
                Ok(r) => {
                    tracing::warn!(webhook = %hook, status = r.status.as_u16(), "webhook refused")
                }
                Err(e) => tracing::warn!(webhook = %hook, error = %e, "webhook failed"),
            }
        });
    }
}
