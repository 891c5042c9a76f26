//! Wills: published when the connection ends without a normal DISCONNECT,
//! after the Will Delay Interval, unless the client comes back first.
//!
//! A will is in the store from CONNECT (before CONNACK) until it is published
//! or deleted, so that a broker killed while its client is connected still
//! publishes it at the next start (a cluster's next leader, too). The one
//! rule that makes this exactly once: **the batch that queues a published
//! will also deletes it** ([`PacketOp::DeleteWill`] as the publish's extra
//! op), so a crash leaves either the stored will or its queued copies,
//! never both and never neither. A retained will is set in the retained
//! store before that batch: a crash between the two sets it again, which
//! changes nothing.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Core, Origin};
use crate::events::Event;
use crate::hooks::{ClientInfo, ProtocolVersion};
use crate::message::{now_ms, Message, MessageId};
use crate::session::Session;
use crate::storage::{ClientId, PacketOp, StorageResult, StoredWill};

/// A client's will, held from CONNECT until its connection ends.
#[derive(Debug, Clone)]
pub(crate) struct Will {
    /// The message (its expiry is set when it is published). Its id names
    /// the will in the store; [`Core::attach`] assigns it.
    pub(crate) message: Message,
    /// Message Expiry Interval, counted from publication.
    pub(crate) expiry_secs: Option<u32>,
    /// Will Delay Interval (MQTT 5); 0 publishes at once.
    pub(crate) delay_secs: u32,
}

impl Will {
    /// Its id in the store.
    pub(crate) fn id(&self) -> MessageId {
        self.message.id
    }

    /// The stored form, for `client`.
    pub(crate) fn stored(&self, client: &ClientId) -> StoredWill {
        StoredWill {
            client: client.clone(),
            message: Arc::new(self.message.clone()),
            expiry_secs: self.expiry_secs,
            delay_secs: self.delay_secs,
        }
    }
}

/// The operation that forgets `client`'s will `id`.
pub(crate) fn delete_will(client: &ClientId, id: MessageId) -> PacketOp {
    PacketOp::DeleteWill {
        client: client.clone(),
        id,
    }
}

impl Core {
    /// Publish a will when its delay has passed or the session ends, whichever
    /// comes first, unless the client connects again before (MQTT 5 section 3.1.3.2.2).
    /// `session` is `None` for a will found in the store at start whose
    /// session did not outlive its connection: that session has ended.
    ///
    /// A broker shutting down publishes pending wills at once: the delay
    /// cannot run on across a restart, and a will published early is better
    /// than one never published.
    pub(crate) fn schedule_will(
        self: &Arc<Self>,
        session: Option<&Arc<Session>>,
        will: Will,
        client: Arc<ClientInfo>,
    ) {
        // A session that ends with its connection has expiry 0: no wait.
        let delay = u64::from(will.delay_secs);
        let wait = match session.map(|s| s.lock().expiry_secs()) {
            _ if self.shutdown.is_cancelled() => 0,
            None => 0,
            Some(Some(e)) => delay.min(e),
            Some(None) => delay,
        };
        let origin = client;
        let (Some(session), true) = (session, wait > 0) else {
            let broker = self.clone();
            self.commits
                .spawn(async move { broker.publish_will(will, &origin).await });
            return;
        };
        let cancel = CancellationToken::new();
        if let Some((old, id)) = session.lock().set_pending_will(cancel.clone(), will.id()) {
            old.cancel();
            // Submitted now, so it lands in order; nothing waits for it.
            drop(self.submit(vec![delete_will(&session.client_id, id)]));
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

    /// The client deleted its will (normal DISCONNECT): delete it from the
    /// store, returning once that is durable.
    pub(crate) async fn forget_will(&self, client: &ClientId, will: &Will) {
        if let Err(e) = self.submit(vec![delete_will(client, will.id())]).await {
            // Still stored: published after the next restart.
            warn!(client = %client, error = %e.report(), "could not delete the will");
        }
    }

    async fn publish_will(&self, will: Will, client: &Arc<ClientInfo>) {
        let delete = delete_will(&client.client_id, will.id());
        let mut message = will.message;
        message.received_at_ms = now_ms();
        message.properties.expires_at_ms = will
            .expiry_secs
            .map(|s| message.received_at_ms + u64::from(s) * 1000);
        let topic = message.topic.clone();
        let id = &client.client_id;
        let origin = Origin::Will(client.clone());
        let outcome = async {
            self.publish(message, &origin, Some(delete))
                .await?
                .committed
                .await
        };
        match outcome.await {
            Ok(()) => self.events.emit(|| Event::WillPublished {
                client_id: id.clone(),
                topic,
            }),
            // Still stored: published at the next start.
            Err(e) => warn!(client = %id, error = %e.report(), "will message not published"),
        }
    }

    /// At start: the wills the store still holds belong to connections that
    /// ended with the previous broker process (killed, or a cluster leader
    /// that died). Each is published as for a lost connection: after its
    /// delay if its session lives on, at once otherwise. Message ids
    /// assigned from now on stay above theirs.
    pub(super) async fn restore_wills(self: &Arc<Self>) -> StorageResult<()> {
        let wills = self.storage.packets.wills().await?;
        if wills.is_empty() {
            return Ok(());
        }
        let count = wills.len();
        for stored in wills {
            self.next_message_id
                .fetch_max(stored.id() + 1, std::sync::atomic::Ordering::Relaxed);
            let session = self.session(&stored.client);
            // What the store does not keep of the client: it is gone.
            let client = Arc::new(ClientInfo {
                client_id: stored.client.clone(),
                username: None,
                identity: None,
                peer: None,
                listener: Arc::from(""),
                protocol: ProtocolVersion::V5,
            });
            let will = Will {
                message: Message::clone(&stored.message),
                expiry_secs: stored.expiry_secs,
                delay_secs: stored.delay_secs,
            };
            self.schedule_will(session.as_ref(), will, client);
        }
        info!(
            wills = count,
            "wills of connections lost with the previous process: published after their delay"
        );
        Ok(())
    }
}
