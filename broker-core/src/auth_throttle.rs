//! Failed authentications per peer address: a client guessing passwords
//! gets `auth_failure_limit` tries per `auth_failure_window_secs`, then its
//! address is refused before any hook runs until the window ends.
//!
//! # Contract
//! - Only failures count ([`AuthThrottle::failed`]); a success does not
//!   reset the count, so interleaving good logins does not buy more guesses.
//! - The table holds at most [`MAX_TRACKED`] addresses: when full, expired
//!   entries go first, and if none has expired a new address is not
//!   tracked (counted, logged once) rather than evicting one being throttled.
//! - Every refusal is counted in [`Stats`] (`authentication_throttled`) and
//!   logged, the first and then every 1000th.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tracing::warn;

use crate::broker::Stats;

/// Addresses tracked at once (about 40 bytes each).
pub(crate) const MAX_TRACKED: usize = 65_536;

struct Window {
    since: Instant,
    failures: u32,
}

pub(crate) struct AuthThrottle {
    limit: u32,
    window: Duration,
    table: Mutex<HashMap<IpAddr, Window>>,
    full_logged: AtomicBool,
    stats: Arc<Stats>,
}

impl AuthThrottle {
    /// `limit` 0 turns the throttle off.
    pub(crate) fn new(limit: u32, window: Duration, stats: Arc<Stats>) -> AuthThrottle {
        AuthThrottle {
            limit,
            window,
            table: Mutex::new(HashMap::new()),
            full_logged: AtomicBool::new(false),
            stats,
        }
    }

    /// Whether `ip` has used up its failures for now; counts the refusal.
    pub(crate) fn blocked(&self, ip: IpAddr) -> bool {
        if self.limit == 0 {
            return false;
        }
        let now = Instant::now();
        let blocked =
            self.table.lock().get(&ip).is_some_and(|w| {
                now.duration_since(w.since) < self.window && w.failures >= self.limit
            });
        if blocked {
            let n = Stats::bump(&self.stats.authentication_throttled);
            if n == 1 || n.is_multiple_of(1000) {
                warn!(peer = %ip, refused = n, "connection refused: too many failed authentications from this address");
            }
        }
        blocked
    }

    /// Record a failed authentication from `ip`.
    pub(crate) fn failed(&self, ip: IpAddr) {
        if self.limit == 0 {
            return;
        }
        let now = Instant::now();
        let mut table = self.table.lock();
        if table.len() >= MAX_TRACKED && !table.contains_key(&ip) {
            table.retain(|_, w| now.duration_since(w.since) < self.window);
            if table.len() >= MAX_TRACKED {
                if !self.full_logged.swap(true, Ordering::Relaxed) {
                    warn!(
                        tracked = MAX_TRACKED,
                        "failed-authentication table full: new addresses are not throttled"
                    );
                }
                return;
            }
        }
        let w = table.entry(ip).or_insert(Window {
            since: now,
            failures: 0,
        });
        if now.duration_since(w.since) >= self.window {
            *w = Window {
                since: now,
                failures: 0,
            };
        }
        w.failures = w.failures.saturating_add(1);
        if w.failures == self.limit {
            warn!(peer = %ip, failures = w.failures, window_secs = self.window.as_secs(),
                "too many failed authentications: refusing this address until the window ends");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_the_limit_and_forgets_after_the_window() {
        let stats = Arc::new(Stats::default());
        let t = AuthThrottle::new(3, Duration::from_millis(200), stats.clone());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..2 {
            t.failed(ip);
        }
        assert!(!t.blocked(ip));
        t.failed(ip);
        assert!(t.blocked(ip));
        assert!(!t.blocked(other), "per address");
        assert_eq!(stats.authentication_throttled.load(Ordering::Relaxed), 1);
        std::thread::sleep(Duration::from_millis(250));
        assert!(!t.blocked(ip));
    }

    #[test]
    fn zero_turns_it_off() {
        let t = AuthThrottle::new(0, Duration::from_secs(60), Arc::new(Stats::default()));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..100 {
            t.failed(ip);
        }
        assert!(!t.blocked(ip));
        assert!(t.table.lock().is_empty());
    }
}
