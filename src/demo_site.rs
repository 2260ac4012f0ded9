//! The built `site-example` (its `public/` folder), embedded by `build.rs`
//! for `indiepm demo`.

/// The name of the site's owner in the built pages; the demo replaces it
/// with Alice's and Bob's.
pub const OWNER: &str = "Sam Example";

include!(concat!(env!("OUT_DIR"), "/demo_site.rs"));
