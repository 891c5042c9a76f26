//! At start: every stored session and its subscriptions (into the trie),
//! and of its queue only the length and last seq: the entries stay in the
//! store until the session's client is back (see `paging`), so start time
//! and memory do not grow with the backlog.

use std::sync::Arc;

use futures::StreamExt;

use tracing::{info, warn};

use super::routing::insert_subscription;
use super::Core;
use crate::message::now_ms;
use crate::session::Session;
use crate::storage::{ClientId, StorageResult};
use crate::topic;

/// Sessions whose queue bounds and QoS 2 state are read at once: a store
/// answers one while the next request is on its way (a round trip each
/// otherwise, 100,000 of them at a large start).
const READS_AHEAD: usize = 64;

impl Core {
    pub(super) async fn restore(&self) -> StorageResult<()> {
        let stored = self.storage.subscriptions.load_sessions().await?;
        let (mut sessions, mut messages) = (0usize, 0usize);
        let packets = &self.storage.packets;
        // In the stored order, READS_AHEAD sessions' reads in flight.
        let mut reads = futures::stream::iter(stored)
            .map(|s| async move {
                let id: ClientId = s.record.client_id.as_str().into();
                let qos2 = packets.incoming_qos2(&id).await?;
                let bounds = packets.queue_bounds(&id).await?;
                StorageResult::Ok((s, id, qos2, bounds))
            })
            .buffered(READS_AHEAD);
        while let Some(read) = reads.next().await {
            let (s, id, qos2, bounds) = read?;
            let session = Arc::new(Session::new(
                id.clone(),
                true,
                s.record.expiry_secs.map(u64::from),
            ));
            {
                let mut st = session.lock();
                // A session that was online when the broker stopped counts as
                // disconnected from now.
                let since = s.record.disconnected_at_ms.unwrap_or_else(now_ms);
                st.set_offline_since(since);
                for id in qos2 {
                    st.receive_qos2(id);
                }
                if let Some(secs) = st.expiry_secs() {
                    self.expiry
                        .schedule(&id, since.saturating_add(secs.saturating_mul(1000)));
                }
            }
            messages += bounds.len as usize;
            session.lock().restore_unread(bounds);
            {
                let mut trie = self.trie.write();
                let mut st = session.lock();
                for sub in s.subscriptions {
                    match topic::parse_shared(&sub.filter) {
                        Ok(shared) => insert_subscription(
                            &mut trie,
                            &sub.filter,
                            shared,
                            &session,
                            &sub.options,
                        ),
                        Err(e) => {
                            warn!(client = %id, filter = %sub.filter, error = %e, "stored subscription ignored");
                            continue;
                        }
                    }
                    st.add_subscription(sub.filter, sub.options);
                }
            }
            self.sessions.lock().insert(id, session);
            sessions += 1;
        }
        if sessions > 0 {
            info!(
                sessions,
                messages, "restored persistent sessions from storage (queues are read as their clients come back)"
            );
        }
        Ok(())
    }
}
