//! Retained messages: kept per topic in the store, queued to a new
//! subscription after its SUBACK like any routed message, ahead of every
//! message routed through the subscription (a gate, see
//! `SessionState::open_gate`).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::warn;

use super::{Core, Routed};
use crate::message::{now_ms, Message, Seq};
use crate::session::Session;
use crate::storage::{Delivery, StorageResult};
use crate::subscription::SubscriptionOptions;

impl Core {
    /// Store or delete (empty payload) the retained message of a topic.
    pub(super) async fn update_retained(&self, message: &Message) -> StorageResult<()> {
        if message.payload.is_empty() {
            self.storage.retained.delete_retained(&message.topic).await
        } else {
            let mut m = message.clone();
            m.id = self.next_message_id.fetch_add(1, Ordering::Relaxed);
            self.storage.retained.set_retained(Arc::new(m)).await
        }
    }

    /// Sequence numbers a subscription's gate reserves for its retained
    /// messages: as many as a session queue holds, so the reservation never
    /// cuts off what the queue limit would keep.
    pub(super) fn retained_slots(&self) -> usize {
        self.config.max_queued_messages
    }

    /// Queue the retained messages matching `filter` for `session` (after
    /// SUBACK), with the subscription's QoS and identifier, into the
    /// sequence numbers reserved behind `gate` by [`Core::subscribe`]; the
    /// gate closes when this returns or is dropped, whatever happened.
    pub(crate) async fn deliver_retained(
        &self,
        session: &Arc<Session>,
        filter: &str,
        options: &SubscriptionOptions,
        gate: Seq,
    ) -> StorageResult<()> {
        let _open = GateGuard { session, gate };
        let mut retained = self.storage.retained.lookup_retained(filter).await?;
        retained.sort_by(|a, b| a.topic.cmp(&b.topic));
        let now = now_ms();
        let slots = self.retained_slots();
        if retained.len() > slots {
            warn!(client = %session.client_id, filter, matched = retained.len(), max_queued_messages = slots,
                "more retained messages match than a session queue holds: the first ones by topic are queued");
            retained.truncate(slots);
        }
        // Queued like any routed message: a persistent session's QoS 1/2
        // copies go to the packet store, so one in flight when the broker
        // stops is sent again after the restart, as MQTT requires.
        let mut batch = Routed::empty();
        for (m, seq) in retained.into_iter().zip(gate..) {
            if m.is_expired(now) {
                continue;
            }
            // Queued under a fresh id from the packet store's sequence, never
            // the retained copy's own: the packet store's high-water mark
            // (where the ids start after a restart) does not cover retained
            // ids, so a later message could be given the same one and the two
            // queue entries would read back one body.
            let mut queued = (*m).clone();
            queued.id = self.next_message_id.fetch_add(1, Ordering::Relaxed);
            let m = Arc::new(queued);
            let delivery = Delivery {
                qos: options.qos.min(m.qos),
                retain: true,
                subscription_ids: options.subscription_id.into_iter().collect(),
                share: None,
            };
            let at = Some((gate, seq));
            batch.absorb(self.enqueue_at(m, vec![(session.clone(), delivery)], at));
        }
        self.commit(batch).await
    }
}

/// Closes a retained gate when dropped: the subscriber's queue never stays
/// held, even when the store read fails or the reading task is dropped.
struct GateGuard<'a> {
    session: &'a Arc<Session>,
    gate: Seq,
}

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        self.session.lock().close_gate(self.gate);
        self.session.wake.notify_one();
    }
}
