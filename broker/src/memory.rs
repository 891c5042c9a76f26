//! Handing freed memory back to the system when a worker thread goes idle.
//!
//! mimalloc (the binary's allocator) keeps freed pages for reuse and
//! purges them only as the thread that owns them keeps allocating, so the
//! memory of connections that closed stayed in the broker's RSS until
//! traffic came back. [`on_worker_park`], the runtime's park hook, does two
//! things, each at most so often per thread:
//! - once a second, a light collection (`mi_collect(false)`): what a slow
//!   consumer's buffers left (+24 MiB in `scripts/hostile` before);
//! - when the broker holds 256 connections (`SHRINK`) fewer than when this
//!   thread last looked, a full one (`mi_collect(true)`), at most every
//!   100 ms (`FORCE_EVERY`): after 19,000 idle connections closed, RSS went back
//!   to 18-42 MB from 165 MB instead of staying at 62-74 MB (BENCHMARKS.md,
//!   "Idle connections"). A full collection walks the thread's whole heap,
//!   which is why it waits for a drop in connections rather than running
//!   every second on a busy broker.
//!
//! The connection count comes from the broker that [`Watched`] names while
//! it serves; without one only the light collection runs.

use std::cell::Cell;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use broker_core::Broker;

/// Connections fewer than at a thread's last look that make its next park
/// run a full collection.
const SHRINK: usize = 256;

/// Least time between two full collections on one thread.
const FORCE_EVERY: Duration = Duration::from_millis(100);

/// Least time between two light collections on one thread.
const LIGHT_EVERY: Duration = Duration::from_secs(1);

/// Least time between two looks at the connection count on one thread: a
/// busy worker parks thousands of times a second.
const LOOK_EVERY: Duration = Duration::from_millis(10);

static BROKER: Mutex<Option<Broker>> = Mutex::new(None);

fn broker() -> MutexGuard<'static, Option<Broker>> {
    BROKER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// While alive, [`on_worker_park`] reads this broker's connection count.
/// Dropped when the broker stops serving, so that nothing keeps the
/// stopped broker (and its storage) alive.
#[must_use = "the broker is watched only while this value lives"]
pub struct Watched(());

impl Watched {
    /// Watch `broker`'s connections from the park hook.
    pub fn new(broker: &Broker) -> Watched {
        *self::broker() = Some(broker.clone());
        Watched(())
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        *broker() = None;
    }
}

#[derive(Clone, Copy)]
struct Seen {
    looked: Option<Instant>,
    light: Option<Instant>,
    full: Option<Instant>,
    /// Most connections open at this thread's parks since its last full
    /// collection.
    high: usize,
}

/// The runtime's `on_thread_park` hook; see the module documentation.
pub fn on_worker_park() {
    thread_local! {
        static SEEN: Cell<Seen> = const {
            Cell::new(Seen { looked: None, light: None, full: None, high: 0 })
        };
    }
    let now = Instant::now();
    let due = |last: Option<Instant>, every| last.is_none_or(|t| now.duration_since(t) >= every);
    SEEN.with(|cell| {
        let mut seen = cell.get();
        if !due(seen.looked, LOOK_EVERY) || !due(seen.full, FORCE_EVERY) {
            return;
        }
        seen.looked = Some(now);
        let open = broker().as_ref().map(Broker::connections_open);
        if let Some(open) = open {
            if open + SHRINK <= seen.high {
                seen.high = open;
                seen.full = Some(now);
                seen.light = Some(now);
                cell.set(seen);
                // SAFETY: mi_collect only walks this thread's own heap.
                unsafe { libmimalloc_sys::mi_collect(true) };
                return;
            }
            seen.high = seen.high.max(open);
        }
        if due(seen.light, LIGHT_EVERY) {
            seen.light = Some(now);
            // SAFETY: as above.
            unsafe { libmimalloc_sys::mi_collect(false) };
        }
        cell.set(seen);
    });
}
