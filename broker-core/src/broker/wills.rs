//! Wills: published when the connection ends without a normal DISCONNECT,
//! after the Will Delay Interval, unless the client comes back first.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{Core, Origin};
use crate::events::Event;
use crate::hooks::ClientInfo;
use crate::message::{now_ms, Message};
use crate::session::Session;

/// A client's will, held from CONNECT until its connection ends.
#[derive(Debug, Clone)]
pub(crate) struct Will {
    /// The message (its expiry is set when it is published).
    pub(crate) message: Message,
    /// Message Expiry Interval, counted from publication.
    pub(crate) expiry_secs: Option<u32>,
    /// Will Delay Interval (MQTT 5); 0 publishes at once.
    pub(crate) delay_secs: u32,
}

impl Core {
    /// Publish a will when its delay has passed or the session ends, whichever
    /// comes first, unless the client connects again before (MQTT 5 section 3.1.3.2.2).
    ///
    /// A broker shutting down publishes pending wills at once: the delay
    /// cannot run on across a restart, and a will published early is better
    /// than one never published.
    pub(crate) fn schedule_will(
        self: &Arc<Self>,
        session: &Arc<Session>,
        will: Will,
        client: Arc<ClientInfo>,
    ) {
        // A session that ends with its connection has expiry 0: no wait.
        let delay = u64::from(will.delay_secs);
        let wait = match session.lock().expiry_secs() {
            _ if self.shutdown.is_cancelled() => 0,
            Some(e) => delay.min(e),
            None => delay,
        };
        let origin = client;
        if wait == 0 {
            let broker = self.clone();
            self.commits
                .spawn(async move { broker.publish_will(will, &origin).await });
            return;
        }
        let cancel = CancellationToken::new();
        if let Some(old) = session.lock().set_pending_will(cancel.clone()) {
            old.cancel();
        }
        let broker = Arc::downgrade(self);
        let shutdown = self.shutdown.clone();
        self.commits.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(wait)) => {}
                _ = shutdown.cancelled() => {}
            }
            if let Some(b) = broker.upgrade() {
                b.publish_will(will, &origin).await;
            }
        });
    }

    async fn publish_will(&self, will: Will, client: &Arc<ClientInfo>) {
        let mut message = will.message;
        message.received_at_ms = now_ms();
        message.properties.expires_at_ms = will
            .expiry_secs
            .map(|s| message.received_at_ms + u64::from(s) * 1000);
        let topic = message.topic.clone();
        let id = &client.client_id;
        let origin = Origin::Will(client.clone());
        let outcome = async { self.publish(message, &origin, None).await?.committed.await };
        match outcome.await {
            Ok(()) => self.events.emit(|| Event::WillPublished {
                client_id: id.clone(),
                topic,
            }),
            Err(e) => warn!(client = %id, error = %e.report(), "will message not published"),
        }
    }
}
