//! Fixed-window rate limits for notifies, per sender host and per client
//! address (PROTOCOL.md, "Delivery duties").

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);
/// Keys tracked at once; past this, new keys are refused until windows expire.
const MAX_KEYS: usize = 100_000;

/// Counts events per key in one-minute windows.
pub struct RateLimiter {
    per_window: u32,
    windows: Mutex<HashMap<String, (Instant, u32)>>,
    last_sweep: Mutex<Instant>,
}

impl RateLimiter {
    pub fn new(per_minute: u32) -> Self {
        RateLimiter {
            per_window: per_minute,
            windows: Mutex::new(HashMap::new()),
            last_sweep: Mutex::new(Instant::now()),
        }
    }

    /// Counts one event for `key`; `Err(seconds)` to wait when over the limit.
    pub fn check(&self, key: &str) -> Result<(), u64> {
        let now = Instant::now();
        // The map holds plain counters, consistent even after a panic elsewhere.
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if windows.len() >= MAX_KEYS && !windows.contains_key(key) {
            // Bound memory under a flood of distinct keys: drop expired
            // windows at most once a window; if the map is still full, a new
            // key waits rather than growing it.
            if now.duration_since(*self.last_sweep.lock().unwrap_or_else(|e| e.into_inner()))
                >= WINDOW
            {
                windows.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
                *self.last_sweep.lock().unwrap_or_else(|e| e.into_inner()) = now;
            }
            if windows.len() >= MAX_KEYS {
                return Err(WINDOW.as_secs());
            }
        }
        let entry = windows.entry(key.to_string()).or_insert((now, 0));
        if now.duration_since(entry.0) >= WINDOW {
            *entry = (now, 0);
        }
        if entry.1 >= self.per_window {
            let wait = WINDOW.saturating_sub(now.duration_since(entry.0));
            return Err(wait.as_secs().max(1));
        }
        entry.1 += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_past_the_limit_per_key() {
        let r = RateLimiter::new(2);
        assert!(r.check("a").is_ok());
        assert!(r.check("a").is_ok());
        let wait = r.check("a").unwrap_err();
        assert!((1..=60).contains(&wait));
        assert!(r.check("b").is_ok());
    }
}
