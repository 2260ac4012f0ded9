//! A minimal static file server for a built site, used by `indiepm demo`
//! (and handy for trying a site locally): the stand-in for the web host
//! that serves a static site in real life.
//!
//! It serves files under one root folder only: the request path is
//! percent-decoded, and any segment that is empty, `.`, `..` or holds a
//! separator is refused, so no request can leave the root. Folders serve
//! their `index.html`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Serves `root` on `addr` until `stop` is cancelled; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    root: PathBuf,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
                _ = stop.cancelled() => return,
            };
            let root = root.clone();
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let root = root.clone();
                async move { Ok::<_, Infallible>(respond(&root, req.uri().path()).await) }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(bound)
}

/// The file a request path names under `root`, if it may be served.
pub fn resolve(root: &Path, path: &str) -> Option<PathBuf> {
    let decoded = percent_decode(path)?;
    let mut file = root.to_path_buf();
    for seg in decoded.split('/').filter(|s| !s.is_empty()) {
        if seg == "." || seg == ".." || seg.contains('\\') || seg.contains('\0') {
            return None;
        }
        file.push(seg);
    }
    if file.is_dir() {
        file.push("index.html");
    }
    Some(file)
}

async fn respond(root: &Path, path: &str) -> Response<Full<Bytes>> {
    let found = match resolve(root, path) {
        Some(f) => tokio::fs::read(&f).await.ok().map(|b| (f, b)),
        None => None,
    };
    let Some((file, body)) = found else {
        let mut r = Response::new(Full::new(Bytes::from_static(b"not found\n")));
        *r.status_mut() = StatusCode::NOT_FOUND;
        return r;
    };
    let mime = match file.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css",
        "js" => "text/javascript",
        "xml" => "application/xml",
        "json" => "application/json",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "svg" => "image/svg+xml",
        "txt" | "md" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
    r
}

fn percent_decode(s: &str) -> Option<String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_request_leaves_the_root() {
        let root = Path::new("/srv/site");
        assert_eq!(
            resolve(root, "/a/b.html"),
            Some(PathBuf::from("/srv/site/a/b.html"))
        );
        for bad in [
            "/../etc/passwd",
            "/a/%2e%2e/%2e%2e/x",
            "/a/..%2f..%2fx",
            "/%ZZ",
            "/a%5c..%5cb",
        ] {
            let r = resolve(root, bad);
            assert!(
                r.is_none()
                    || r.as_ref().is_some_and(|p| p.starts_with(root)
                        && !p.components().any(|c| c == std::path::Component::ParentDir)),
                "{bad} -> {r:?}"
            );
        }
    }
}
