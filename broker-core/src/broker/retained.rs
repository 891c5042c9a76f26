//! Retained messages: kept per topic in the store, queued to a new
//! subscription after its SUBACK like any routed message.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{Core, Routed};
use crate::message::{now_ms, Message};
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

    /// Queue the retained messages matching `filter` for `session` (after
    /// SUBACK), with the subscription's QoS and identifier.
    pub(crate) async fn deliver_retained(
        &self,
        session: &Arc<Session>,
        filter: &str,
        options: &SubscriptionOptions,
    ) -> StorageResult<()> {
        if !self.config.retain_available {
            return Ok(());
        }
        let mut retained = self.storage.retained.lookup_retained(filter).await?;
        retained.sort_by(|a, b| a.topic.cmp(&b.topic));
        let now = now_ms();
        // Queued like any routed message: a persistent session's QoS 1/2
        // copies go to the packet store, so one in flight when the broker
        // stops is sent again after the restart, as MQTT requires.
        let mut batch = Routed::empty();
        for m in retained {
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
            batch.absorb(self.enqueue(m, vec![(session.clone(), delivery)]));
        }
        self.commit(batch).await
    }
}
