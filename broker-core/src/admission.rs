//! Admission of new connections: how many may be open at once
//! (`max_connections`) and how fast new ones may come (`max_connection_rate`).
//!
//! # Contract
//! - Checked at accept, before any state exists for the connection, so a
//!   refusal costs one accept and one close: a flood of connections is never
//!   queued and never reaches the handshake.
//! - An admitted connection holds a [`Permit`] until its task ends (lingering
//!   close included); dropping the permit frees its place.
//! - The rate is a token bucket holding one second's worth of tokens: bursts
//!   up to the rate pass, a sustained excess is refused.
//! - Every refusal is counted in [`Stats`](crate::broker::Stats) and logged,
//!   the first and then every 1000th of each kind.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use tracing::{info, warn};

use crate::broker::Stats;

/// File descriptors kept for everything but client connections: listeners,
/// the store's files, the runtime's own.
const RESERVED_FDS: u64 = 256;

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// `max_connections` are open.
    Limit,
    /// Faster than `max_connection_rate`.
    Rate,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// The connection gate shared by every listener of a broker.
pub(crate) struct Admission {
    max: usize,
    rate: u32,
    open: AtomicUsize,
    bucket: Mutex<Bucket>,
    stats: Arc<Stats>,
}

/// A place among the open connections, freed on drop.
pub(crate) struct Permit(Arc<Admission>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    /// A gate for at most `max` connections (lowered to what the process's
    /// open-file limit allows) and `rate` new ones per second (0: unlimited).
    pub(crate) fn new(max: usize, rate: u32, stats: Arc<Stats>) -> Arc<Admission> {
        let max = match open_file_limit() {
            Some(fds) if (max as u64).saturating_add(RESERVED_FDS) > fds => {
                let lowered = fds.saturating_sub(RESERVED_FDS).max(1) as usize;
                info!(
                    max_connections = max,
                    open_file_limit = fds,
                    lowered_to = lowered,
                    "max_connections lowered to fit the open-file limit"
                );
                lowered
            }
            _ => max,
        };
        Arc::new(Admission {
            max,
            rate,
            open: AtomicUsize::new(0),
            bucket: Mutex::new(Bucket {
                tokens: f64::from(rate),
                last: Instant::now(),
            }),
            stats,
        })
    }

    /// Connections open now.
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Admit one new connection, or say why not (counted and logged).
    pub(crate) fn try_admit(self: &Arc<Self>) -> Result<Permit, Refused> {
        let result = self.check();
        match result {
            Ok(()) => Ok(Permit(self.clone())),
            Err(refused) => {
                let (counter, limit): (&AtomicU64, u64) = match refused {
                    Refused::Limit => (&self.stats.connections_over_limit, self.max as u64),
                    Refused::Rate => (&self.stats.connections_over_rate, u64::from(self.rate)),
                };
                let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
                if n == 1 || n.is_multiple_of(1000) {
                    warn!(
                        ?refused,
                        limit,
                        refused_so_far = n,
                        "connection refused at accept"
                    );
                }
                Err(refused)
            }
        }
    }

    fn check(&self) -> Result<(), Refused> {
        // The place first: a refused connection must not spend a token.
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::Limit);
        }
        if self.rate > 0 {
            let mut b = self.bucket.lock();
            let now = Instant::now();
            let rate = f64::from(self.rate);
            let refill = now.duration_since(b.last).as_secs_f64() * rate;
            b.tokens = (b.tokens + refill).min(rate);
            b.last = now;
            if b.tokens < 1.0 {
                drop(b);
                self.open.fetch_sub(1, Ordering::AcqRel);
                return Err(Refused::Rate);
            }
            b.tokens -= 1.0;
        }
        Ok(())
    }
}

/// The process's soft limit on open files, if it has one.
fn open_file_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit only writes the struct it is given.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
        if rc == 0 && lim.rlim_cur != libc::RLIM_INFINITY {
            // `rlim_t` is u64 here but not on every platform.
            #[allow(clippy::unnecessary_cast)]
            return Some(lim.rlim_cur as u64);
        }
        None
    }
    #[cfg(not(unix))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_counts_open_permits() {
        let stats = Arc::new(Stats::default());
        let gate = Admission::new(2, 0, stats.clone());
        let a = gate.try_admit().expect("first");
        let _b = gate.try_admit().expect("second");
        assert_eq!(gate.try_admit().err(), Some(Refused::Limit));
        drop(a);
        assert!(gate.try_admit().is_ok(), "a dropped permit frees its place");
        assert_eq!(stats.connections_over_limit.load(Ordering::Relaxed), 1);
        assert_eq!(gate.open(), 1);
    }

    #[test]
    fn rate_is_a_bucket_of_one_second() {
        let stats = Arc::new(Stats::default());
        let gate = Admission::new(1000, 5, stats.clone());
        let permits: Vec<_> = (0..5).map(|_| gate.try_admit().expect("burst")).collect();
        assert_eq!(gate.try_admit().err(), Some(Refused::Rate));
        assert_eq!(stats.connections_over_rate.load(Ordering::Relaxed), 1);
        assert_eq!(gate.open(), 5, "a refusal by rate holds no place");
        drop(permits);
        std::thread::sleep(std::time::Duration::from_millis(450));
        assert!(gate.try_admit().is_ok(), "tokens come back with time");
    }
}
