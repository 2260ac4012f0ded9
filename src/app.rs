//! The state one running server shares between its connections and its
//! background work.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, SiteConfig};
use crate::discover::DiscoveryCache;
use crate::fetch::Fetcher;
use crate::identity::Identity;
use crate::inbox::writer::Writer;
use crate::ratelimit::RateLimiter;
use crate::sender::Queue;
use crate::store::Store;

/// Shared server state. One per `indiepm serve`.
pub struct App {
    pub config: Config,
    pub store: Store,
    /// Writes the inbox and sent files (batched, durable).
    pub files: Writer,
    pub fetcher: Fetcher,
    /// Discovery results for step 1 (never step 5).
    pub discovery: DiscoveryCache,
    /// Sender profiles (endpoint, h-card) for step 2.
    pub profiles: crate::hcard::ProfileCache,
    /// Background work (handshakes, pushes) that shutdown drains.
    pub tracker: TaskTracker,
    pub shutdown: CancellationToken,
    /// Bounds discovery fetches in flight for incoming notifies.
    pub discovery_slots: Semaphore,
    pub per_host: RateLimiter,
    pub per_client: RateLimiter,
    /// Step 6 pushes accepted per sender identity.
    pub per_sender_messages: RateLimiter,
    /// Bounds receiver handshakes waiting or running (a multiple of the
    /// discovery bound: they queue for a discovery slot).
    pub handshake_slots: Arc<Semaphore>,
    /// Receiver handshakes under way, by (sender, message-or-code).
    pub handshakes_in_flight: Mutex<HashSet<(String, String)>>,
    /// Sender side: the outgoing queue.
    pub queue: Queue,
    /// Sender side, channel flow: when the last code was sent per (sender, recipient).
    pub codes_in_flight: Mutex<HashMap<(String, String), i64>>,
    /// Micropub: answers of the IndieAuth token endpoint.
    pub token_cache: crate::micropub::TokenCache,
    /// Web UI: sign-in rate limits, pending IndieAuth sign-ins, form flashes.
    pub web: crate::web::WebState,
}

impl App {
    pub fn new(config: Config, store: Store, files: Writer) -> Arc<App> {
        let fetcher = Fetcher::new(config.network.allow_private);
        let limits = config.limits.clone();
        Arc::new(App {
            store,
            files,
            fetcher,
            discovery: DiscoveryCache::default(),
            profiles: Default::default(),
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            discovery_slots: Semaphore::new(limits.discovery_in_flight),
            per_host: RateLimiter::new(limits.notify_per_minute_per_host),
            per_client: RateLimiter::new(limits.notify_per_minute_per_client),
            per_sender_messages: RateLimiter::new(limits.messages_per_minute_per_sender),
            handshake_slots: Arc::new(Semaphore::new(limits.discovery_in_flight * 32)),
            handshakes_in_flight: Mutex::new(HashSet::new()),
            queue: Queue::default(),
            codes_in_flight: Mutex::new(HashMap::new()),
            token_cache: Default::default(),
            web: Default::default(),
            config,
        })
    }

    /// The site with identity `me`. A canonical string (what the protocol
    /// parser hands on) is found without parsing it again.
    pub fn site(&self, me: &str) -> Option<&SiteConfig> {
        if let Some(site) = self.config.sites.iter().find(|s| s.is_str(me)) {
            return Some(site);
        }
        let me = Identity::parse(me).ok()?;
        self.config.site(&me)
    }

    /// The site with identity `me` whose endpoint is served on `path`.
    pub fn site_on_path(&self, me: &str, path: &str) -> Option<&SiteConfig> {
        self.site(me).filter(|s| s.endpoint_path() == path)
    }
}

/// Locks a mutex whose data stays consistent even if a holder panicked.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Group commit: waits for one job, then takes whatever else is already
/// queued, up to `max`. `None` once every sender is gone.
pub fn next_batch<T>(jobs: &std::sync::mpsc::Receiver<T>, max: usize) -> Option<Vec<T>> {
    let first = jobs.recv().ok()?;
    Some(fill_batch(first, jobs, max))
}

/// `first` and whatever else is queued, up to `max` in all, without waiting.
pub fn fill_batch<T>(first: T, jobs: &std::sync::mpsc::Receiver<T>, max: usize) -> Vec<T> {
    let mut batch = vec![first];
    batch.extend(jobs.try_iter().take(max.saturating_sub(1)));
    batch
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_takes_what_is_queued_up_to_the_bound() {
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..5 {
            tx.send(i).unwrap();
        }
        assert_eq!(next_batch(&rx, 3), Some(vec![0, 1, 2]));
        assert_eq!(next_batch(&rx, 3), Some(vec![3, 4]));
        drop(tx);
        assert_eq!(next_batch(&rx, 3), None);
    }
}
