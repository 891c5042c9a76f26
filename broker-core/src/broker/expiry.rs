//! Session expiry by deadline: each offline persistent session with a
//! finite expiry has one deadline in a queue ordered by time, and one task
//! sleeps until the earliest. The cost is per expiring session, not a scan
//! of every session each second.
//!
//! The queue holds at most one deadline per client id (scheduling again
//! replaces it), so a client that reconnects in a loop cannot grow it. A
//! deadline is only a hint: when it comes, the session is discarded only
//! if it is still offline and past its expiry (it may have come back).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tracing::{info, warn};

use super::Core;
use crate::events::Event;
use crate::message::now_ms;
use crate::storage::ClientId;

/// Deadlines of offline sessions, earliest first.
#[derive(Default)]
pub(crate) struct ExpiryQueue {
    inner: Mutex<Deadlines>,
    /// Woken when a deadline earlier than the one slept on may exist.
    changed: Notify,
}

#[derive(Default)]
struct Deadlines {
    by_time: BTreeSet<(u64, ClientId)>,
    by_client: HashMap<ClientId, u64>,
}

impl ExpiryQueue {
    /// Expire `client` at `at_ms` (ms since the epoch), replacing its previous deadline.
    pub(crate) fn schedule(&self, client: &ClientId, at_ms: u64) {
        let mut d = self.inner.lock();
        if let Some(old) = d.by_client.insert(client.clone(), at_ms) {
            d.by_time.remove(&(old, client.clone()));
        }
        let earliest = d.by_time.first().is_none_or(|(t, _)| at_ms < *t);
        d.by_time.insert((at_ms, client.clone()));
        drop(d);
        if earliest {
            self.changed.notify_one();
        }
    }

    /// Forget `client`'s deadline (it connected again, or its session is gone).
    pub(crate) fn cancel(&self, client: &ClientId) {
        let mut d = self.inner.lock();
        if let Some(at) = d.by_client.remove(client) {
            d.by_time.remove(&(at, client.clone()));
        }
    }

    /// The earliest deadline.
    pub(crate) fn next(&self) -> Option<u64> {
        self.inner.lock().by_time.first().map(|(t, _)| *t)
    }

    /// Take out every client whose deadline is at or before `now_ms`.
    pub(crate) fn due(&self, now_ms: u64) -> Vec<ClientId> {
        let mut d = self.inner.lock();
        let mut due = Vec::new();
        while let Some((t, _)) = d.by_time.first() {
            if *t > now_ms {
                break;
            }
            if let Some((_, c)) = d.by_time.pop_first() {
                d.by_client.remove(&c);
                due.push(c);
            }
        }
        due
    }

    /// Deadlines held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().by_time.len()
    }
}

/// The expiry task: sleeps until the earliest deadline (or a change), then
/// discards the sessions that are due. Ends with the broker.
pub(super) fn spawn(core: &Arc<Core>) {
    let weak = Arc::downgrade(core);
    let queue = core.expiry.clone();
    let shutdown = core.shutdown_token();
    tokio::spawn(async move {
        loop {
            // Only the queue is held while sleeping, not the broker.
            let wait = queue
                .next()
                .map(|at| Duration::from_millis(at.saturating_sub(now_ms())));
            let changed = async {
                match wait {
                    Some(w) => {
                        tokio::select! {
                            _ = tokio::time::sleep(w) => {}
                            _ = queue.changed.notified() => {}
                        }
                    }
                    None => queue.changed.notified().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = changed => {}
            }
            let Some(core) = weak.upgrade() else { return };
            for client in queue.due(now_ms()) {
                core.expire(&client).await;
            }
        }
    });
}

impl Core {
    /// Discard `client`'s session if it is offline and past its expiry.
    async fn expire(&self, client: &ClientId) {
        let _guard = self.lifecycle_lock(client).lock().await;
        let Some(s) = self.session(client) else {
            return;
        };
        let queued = {
            let st = s.lock();
            if !st.has_expired(now_ms()) {
                return;
            }
            st.queue_len()
        };
        info!(%client, queued, "session expired");
        self.events.emit(|| Event::SessionExpired {
            client_id: client.clone(),
        });
        if let Err(e) = self.discard(&s).await {
            warn!(%client, error = %e.report(), "could not discard the expired session");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_come_out_in_time_order_once_each() {
        let q = ExpiryQueue::default();
        let (a, b, c): (ClientId, ClientId, ClientId) = ("a".into(), "b".into(), "c".into());
        q.schedule(&a, 300);
        q.schedule(&b, 100);
        q.schedule(&c, 200);
        assert_eq!(q.next(), Some(100));
        assert_eq!(q.due(250), vec![b.clone(), c.clone()]);
        assert_eq!(q.due(250), Vec::<ClientId>::new());
        assert_eq!(q.due(300), vec![a]);
        assert_eq!(q.next(), None);
    }

    #[test]
    fn rescheduling_replaces_and_cancel_forgets() {
        let q = ExpiryQueue::default();
        let a: ClientId = "a".into();
        for t in 0..1000 {
            q.schedule(&a, 10_000 + t);
        }
        assert_eq!(
            q.len(),
            1,
            "one deadline per client, however often it reconnects"
        );
        assert_eq!(q.next(), Some(10_999));
        q.cancel(&a);
        assert_eq!(q.len(), 0);
        assert!(q.due(u64::MAX).is_empty());
    }
}
