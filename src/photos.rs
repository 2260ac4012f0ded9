//! Sender photos from h-cards, fetched once by the server and served from
//! `/ui/photo/KEY`, so that the owner's browser never loads a URL a sender
//! chose: a remote image in the inbox would tell the sender when the owner
//! reads it, and from where.
//!
//! Only PNG, JPEG, GIF and WebP are kept, recognised by their first bytes
//! (never by the sender's Content-Type), at most 1 MiB (the fetch limit).

use std::path::{Path, PathBuf};

use crate::fetch::Fetcher;
use crate::protocol::hash_secret;

/// The image types kept, by magic bytes, with their MIME type.
fn sniff(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        Some("image/jpeg")
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Some("image/gif")
    } else if bytes.len() > 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some("image/webp")
    } else {
        None
    }
}

/// The file name a photo URL is stored under: its SHA-256, never the URL.
pub fn key(url: &str) -> String {
    hash_secret(url)
}

fn path(data_dir: &Path, key: &str) -> PathBuf {
    data_dir.join("photos").join(key)
}

/// Whether the photo at `url` has been fetched and kept.
pub fn is_stored(data_dir: &Path, url: &str) -> bool {
    path(data_dir, &key(url)).is_file()
}

/// Fetches `url` through the safe client and keeps it if it is an image.
pub async fn fetch(fetcher: &Fetcher, data_dir: &Path, url: &str) -> Result<(), String> {
    if is_stored(data_dir, url) {
        return Ok(());
    }
    let parsed = url::Url::parse(url).map_err(|e| e.to_string())?;
    let resp = fetcher
        .get(&parsed, "image/png,image/jpeg,image/gif,image/webp")
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status.is_success() || resp.truncated || sniff(&resp.body).is_none() {
        return Err(format!(
            "{url} is not a PNG, JPEG, GIF or WebP image under 1 MiB"
        ));
    }
    let dir = data_dir.join("photos");
    let body = resp.body;
    let dest = path(data_dir, &key(url));
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        std::fs::create_dir_all(&dir)?;
        let tmp = tempfile::NamedTempFile::new_in(&dir)?;
        std::fs::write(tmp.path(), &body)?;
        tmp.persist(&dest).map_err(|e| e.error)?;
        Ok(())
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

/// The stored photo under `key` and its MIME type, if any. `key` comes from
/// a request path, so anything but 64 hex digits is refused.
pub fn load(data_dir: &Path, key: &str) -> Option<(Vec<u8>, &'static str)> {
    if key.len() != 64 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let bytes = std::fs::read(path(data_dir, key)).ok()?;
    let mime = sniff(&bytes)?;
    Some((bytes, mime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_images_by_their_bytes() {
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\nrest"), Some("image/png"));
        assert_eq!(sniff(b"GIF89a..."), Some("image/gif"));
        assert_eq!(sniff(b"RIFF\0\0\0\0WEBPVP8 "), Some("image/webp"));
        assert_eq!(sniff(b"<svg onload=alert(1)>"), None);
        assert_eq!(sniff(b"<html>"), None);
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path(), "../../etc/passwd").is_none());
        assert!(load(dir.path(), &"g".repeat(64)).is_none());
    }
}
