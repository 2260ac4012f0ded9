//! The owner's web UI under `/ui/` (maud, server-rendered). Being written.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use crate::app::App;
use crate::server::{Body, text};

/// Handles every request under `/ui/`.
pub async fn handle(_app: &Arc<App>, _req: Request<Incoming>) -> Response<Body> {
    text(StatusCode::NOT_FOUND, "the web UI is not built yet\n")
}
