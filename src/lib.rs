//! indiepm: private messages for static sites, following the IndieWeb rel=pm design.
//!
//! The library holds everything; `src/main.rs` only parses the command line.
//! Map of the crate:
//!
//! - [`config`]: the TOML config file of CONTRACT.md.
//! - [`identity`]: canonical identity URLs and endpoint comparison.
//! - [`fetch`]: the one safe outbound HTTP client (limits, private-address guard).
//! - [`discover`]: rel=pm endpoint discovery.
//! - [`inject`]: the build-time plugin that adds `<link rel="pm">` to a built site.
//! - [`protocol`]: wire types, validation and the JSON errors of PROTOCOL.md.
//! - [`store`]: durable state in redb (queue, tokens, codes, received messages).
//! - [`inbox`]: the message files under the site's content folder, never published by its generator.
//! - [`cmd`]: one module per subcommand of the binary.

pub mod app;
pub mod cmd;
pub mod config;
pub mod demo_site;
pub mod discover;
pub mod fetch;
pub mod hcard;
pub mod hooks;
pub mod identity;
pub mod inbox;
pub mod inject;
pub mod micropub;
pub mod photos;
pub mod protocol;
pub mod ratelimit;
pub mod receiver;
pub mod sender;
pub mod server;
pub mod static_site;
pub mod store;
pub mod web;
