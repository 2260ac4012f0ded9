//! Telling the owner a message arrived: the site's `on_message` command
//! (given the file's path) and its `webhook` (a JSON POST), both run in the
//! background after the message is durable, so a slow hook never delays or
//! fails a delivery.

use std::path::Path;
use std::sync::Arc;

use serde_json::json;

use crate::app::App;

pub fn message_received(app: &Arc<App>, recipient: &str, sender: &str, id: &str, path: &Path) {
    let Some(site) = app.site(recipient) else {
        return;
    };
    if let Some(cmd) = site.on_message.clone() {
        let path = path.to_path_buf();
        app.tracker.spawn(async move {
            // The path is passed as an argument ("$1"), never pasted into the script.
            let status = tokio::process::Command::new("sh")
                .arg("-c")
                .arg(format!("{cmd} \"$1\""))
                .arg("indiepm-on-message")
                .arg(&path)
                .kill_on_drop(true)
                .status()
                .await;
            match status {
                Ok(s) if s.success() => tracing::info!(command = %cmd, "on_message ran"),
                Ok(s) => tracing::warn!(command = %cmd, status = %s, "on_message failed"),
                Err(e) => tracing::warn!(command = %cmd, error = %e, "on_message could not start"),
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
