//! Stored queues read on demand. A session restored at start leaves its
//! entries in the store (see `crate::session`, "Queues left in the store");
//! its outbox asks for the next page as the client's window drains, and a
//! task of its own reads that page in, retrying a failing store with
//! backoff until it answers, the client leaves or the broker stops. A
//! session being discarded is read whole first when it has shared
//! subscriptions, so that what they chose it for goes to another member.
//!
//! Memory: at most the client's in-flight window plus a page and a half
//! (`queue_page`, 1,000 by default) of read entries per online session,
//! none for an offline one that has not come back since the start.

use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use super::{Core, Stats};
use crate::session::{PageRequest, Session};
use crate::storage::StorageResult;

/// How many read entries, in flight included, a session with `max_inflight`
/// may have left in its queue before the next page is read.
pub(crate) fn read_ahead(page: usize, max_inflight: usize) -> usize {
    max_inflight + page.div_ceil(2)
}

/// Backoff between retries of a page read that failed.
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// How long a discard waits for a page read already under way.
const DISCARD_WAIT: Duration = Duration::from_secs(10);

impl Core {
    /// Read the page `request` of `session`'s stored queue on a task of its
    /// own; the session's outbox is woken when it is in.
    pub(crate) fn read_page(self: &Arc<Self>, session: Arc<Session>, request: PageRequest) {
        let core = self.clone();
        tokio::spawn(async move { core.page_in(&session, request).await });
    }

    async fn page_in(&self, session: &Session, request: PageRequest) {
        let mut backoff = RETRY_FIRST;
        let mut failures = 0u64;
        loop {
            let read = tokio::select! {
                r = self.storage.packets.read_queue(&session.client_id, request.after, request.limit) => r,
                _ = self.shutdown.cancelled() => break,
            };
            match read {
                Ok(page) => {
                    let mut ops = Vec::new();
                    session.lock().load_page(request, page, &mut ops);
                    if !ops.is_empty() {
                        // Entries the queue limit evicted while in the store;
                        // a failure is logged by the group commit.
                        drop(self.submit(ops));
                    }
                    session.wake.notify_one();
                    return;
                }
                Err(e) => {
                    failures += 1;
                    let n = Stats::bump(&self.stats.page_read_errors);
                    if failures == 1 || n.is_multiple_of(100) {
                        warn!(client = %session.client_id, error = %e.report(), failures = n, "could not read queued messages from the store: retrying");
                    }
                }
            }
            if !session.lock().is_online() {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.shutdown.cancelled() => break,
            }
            backoff = (backoff * 2).min(RETRY_MAX);
        }
        // Asked again when the client is back.
        session.lock().page_failed(request);
    }

    /// Read what is left of `session`'s stored queue into it, whether its
    /// client is online or not (a discard hands shared messages on).
    pub(super) async fn read_whole(&self, session: &Session) -> StorageResult<()> {
        let deadline = tokio::time::Instant::now() + DISCARD_WAIT;
        loop {
            let request = {
                let mut st = session.lock();
                if !st.has_unread() {
                    return Ok(());
                }
                st.page_wanted_offline(self.config.queue_page)
            };
            let Some(request) = request else {
                // A page read for the last connection is under way.
                if tokio::time::Instant::now() >= deadline {
                    warn!(client = %session.client_id, left = session.lock().unread_len(), "the store did not answer in time: queued messages of a discarded session not handed to other members of its shared subscriptions");
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            };
            let page = match self
                .storage
                .packets
                .read_queue(&session.client_id, request.after, request.limit)
                .await
            {
                Ok(page) => page,
                Err(e) => {
                    session.lock().page_failed(request);
                    return Err(e);
                }
            };
            let mut ops = Vec::new();
            session.lock().load_page(request, page, &mut ops);
            if !ops.is_empty() {
                self.submit(ops).await?;
            }
        }
    }
}
