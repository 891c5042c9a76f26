//! In-process clients: the embedding application subscribes and publishes
//! like any MQTT client, through the same boundary (hooks, limits, events,
//! persistent sessions and their order), without a socket.
//!
//! ```
//! # async fn run(broker: broker_core::Broker) -> Result<(), Box<dyn std::error::Error>> {
//! use broker_core::client::ClientOptions;
//! use broker_core::message::{Message, QoS};
//!
//! // Mosca's pattern: a persistent session on its own topic, QoS 1.
//! let mut inbox = broker.connect(ClientOptions::persistent("worker-1")).await?;
//! inbox.subscribe("jobs/worker-1", QoS::AtLeastOnce).await?;
//! broker.publish(Message::new("jobs/worker-1", "resize 42.png", QoS::AtLeastOnce, false)).await?;
//! if let Some(job) = inbox.recv().await {
//!     println!("{}: {:?}", job.message().topic, job.message().payload);
//!     inbox.ack(&job); // without it, the job comes back after a restart
//! }
//! inbox.disconnect().await;
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::broker::{Core, SessionExpiry, SubscribeRefusal, Unsubscribed};
use crate::hooks::ProtocolVersion;
use crate::link::{Ack, AttachError, AttachRequest, Link, Outbox, PublishRefused};
use crate::message::{Message, QoS};
use crate::session::Outgoing;
use crate::storage::StorageError;
use crate::subscription::SubscriptionOptions;
use crate::topic::{self, TopicError};

/// Bytes of payload taken from the session per refill of the client's buffer.
const TAKE_BUDGET: usize = 64 * 1024;

/// How an in-process client attaches.
///
/// ```
/// use broker_core::client::ClientOptions;
/// use broker_core::SessionExpiry;
/// let o = ClientOptions::new("app").session_expiry(SessionExpiry::After(3600)).max_inflight(8);
/// assert_eq!(o.client_id(), "app");
/// ```
#[derive(Debug, Clone)]
pub struct ClientOptions {
    client_id: String,
    clean_start: bool,
    expiry: SessionExpiry,
    username: Option<String>,
    password: Option<bytes::Bytes>,
    max_inflight: usize,
}

impl ClientOptions {
    /// A clean session that ends when the client disconnects.
    pub fn new(client_id: impl Into<String>) -> Self {
        ClientOptions {
            client_id: client_id.into(),
            clean_start: true,
            expiry: SessionExpiry::OnDisconnect,
            username: None,
            password: None,
            max_inflight: 32,
        }
    }

    /// A persistent session (`clean=false`, never expires): resumed if it
    /// exists, messages kept while the client is away.
    pub fn persistent(client_id: impl Into<String>) -> Self {
        ClientOptions {
            clean_start: false,
            expiry: SessionExpiry::Never,
            ..ClientOptions::new(client_id)
        }
    }

    /// Discard any previous session (true) or resume it (false).
    pub fn clean_start(mut self, clean: bool) -> Self {
        self.clean_start = clean;
        self
    }

    /// How long the session outlives the client.
    pub fn session_expiry(mut self, expiry: SessionExpiry) -> Self {
        self.expiry = expiry;
        self
    }

    /// Credentials for the authentication hook.
    pub fn credentials(
        mut self,
        username: impl Into<String>,
        password: impl Into<bytes::Bytes>,
    ) -> Self {
        self.username = Some(username.into());
        self.password = Some(password.into());
        self
    }

    /// Unacknowledged QoS 1/2 deliveries at once (at least 1).
    pub fn max_inflight(mut self, n: usize) -> Self {
        self.max_inflight = n.clamp(1, usize::from(u16::MAX));
        self
    }

    /// The client id.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }
}

/// What an in-process client can fail at.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// It could not attach.
    #[error("cannot attach: {0}")]
    Attach(#[from] AttachError),
    /// Not a valid topic name for a publish.
    #[error("invalid topic: {0}")]
    InvalidTopic(#[from] TopicError),
    /// The authorization hook denied the publish (or it targets `$SYS/`).
    #[error("not authorized")]
    NotAuthorized,
    /// The topic has more levels than `max_topic_levels`.
    #[error("topic has more than {0} levels")]
    TooDeep(usize),
    /// The subscription was refused.
    #[error("subscription refused: {0}")]
    Refused(#[from] SubscribeRefusal),
    /// The store failed; the message was not accepted.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The client was detached (taken over, or the broker stopped).
    #[error("the client is detached")]
    Detached,
}

impl From<PublishRefused> for ClientError {
    fn from(r: PublishRefused) -> Self {
        match r {
            PublishRefused::NotAuthorized => ClientError::NotAuthorized,
            PublishRefused::TooDeep(n) => ClientError::TooDeep(n),
            PublishRefused::Storage(e) => ClientError::Storage(e),
        }
    }
}

/// A message delivered to an in-process client.
#[derive(Debug, Clone)]
pub struct Received {
    message: Arc<Message>,
    qos: QoS,
    retain: bool,
    dup: bool,
    packet_id: Option<u16>,
}

impl Received {
    /// The message.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// The QoS of this delivery (the lower of the publish's and the subscription's).
    pub fn qos(&self) -> QoS {
        self.qos
    }

    /// Delivered as a retained message (on subscribe, or Retain As Published).
    pub fn retain(&self) -> bool {
        self.retain
    }

    /// Possibly delivered before (an unacknowledged message sent again after a restart).
    pub fn dup(&self) -> bool {
        self.dup
    }

    /// The packet id of a QoS 1/2 delivery in its session. It follows the
    /// session's sequence numbers, so a delivery sent again after a restart
    /// has the id it had (a client relaying it elsewhere can reuse it).
    pub fn packet_id(&self) -> Option<u16> {
        self.packet_id
    }
}

/// An in-process client. Its deliveries come in session order from
/// [`recv`](Client::recv); QoS 1/2 ones must be [`ack`](Client::ack)ed, or
/// they are delivered again (with `dup`) when the session resumes.
/// Dropping it detaches it as a lost connection would.
pub struct Client {
    link: Link,
    outbox: Outbox,
    ready: VecDeque<Outgoing>,
    kicked: CancellationToken,
    shutdown: CancellationToken,
    session_present: bool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("client_id", &self.link.client_id())
            .finish_non_exhaustive()
    }
}

impl Client {
    pub(crate) async fn attach(core: &Arc<Core>, o: ClientOptions) -> Result<Client, AttachError> {
        let attached = core
            .attach(AttachRequest {
                client_id: o.client_id,
                username: o.username,
                password: o.password,
                clean_start: o.clean_start,
                expiry: o.expiry,
                will: None,
                peer: None,
                listener: Arc::from("internal"),
                allow_anonymous: true,
                certificate_identity: false,
                protocol: ProtocolVersion::Internal,
                authenticated: false,
                bridge: false,
            })
            .await?;
        let link = attached.link;
        Ok(Client {
            outbox: link.outbox(o.max_inflight),
            kicked: link.kicked().clone(),
            shutdown: core.shutdown_token(),
            link,
            ready: VecDeque::new(),
            session_present: attached.session_present,
        })
    }

    /// The client id.
    pub fn client_id(&self) -> &str {
        self.link.client_id()
    }

    /// Whether a stored session was resumed.
    pub fn session_present(&self) -> bool {
        self.session_present
    }

    /// Subscribe to `filter` at `qos`; returns the QoS granted. Retained
    /// messages matching it are delivered next.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> Result<QoS, ClientError> {
        self.subscribe_with(filter, SubscriptionOptions::new(qos))
            .await
    }

    /// Subscribe with every MQTT 5 option.
    pub async fn subscribe_with(
        &mut self,
        filter: &str,
        options: SubscriptionOptions,
    ) -> Result<QoS, ClientError> {
        let outcome = self
            .link
            .subscribe(vec![(filter.to_string(), options.clone())])
            .await?
            .pop()
            .ok_or(ClientError::Detached)?;
        let granted = outcome?;
        if let Some(gate) = granted.retained {
            let options = SubscriptionOptions {
                qos: granted.qos,
                ..options
            };
            self.link.deliver_retained(filter, &options, gate).await?;
        }
        Ok(granted.qos)
    }

    /// Unsubscribe; false if there was no such subscription.
    pub async fn unsubscribe(&mut self, filter: &str) -> Result<bool, ClientError> {
        let outcome = self.link.unsubscribe(vec![filter.to_string()]).await?;
        match outcome.first() {
            Some(Unsubscribed::Removed) => Ok(true),
            Some(Unsubscribed::InvalidFilter) => {
                Err(ClientError::Refused(SubscribeRefusal::InvalidFilter))
            }
            _ => Ok(false),
        }
    }

    /// Publish as this client (authorization applies, No Local too); for
    /// QoS 1/2 it returns once the message is durable.
    pub async fn publish(&mut self, message: Message) -> Result<(), ClientError> {
        topic::validate_name(&message.topic)?;
        let published = self.link.publish(message, None).await?;
        published.committed.await?;
        Ok(())
    }

    /// Publish a QoS 2 message received elsewhere with `packet_id` (a
    /// client relaying another MQTT connection): the id is held in the
    /// session, durably with the message, until [`release`](Client::release),
    /// and a publish with an id still held is not routed again. Returns
    /// false for such a duplicate, true once a new message is durable.
    pub async fn publish_exactly_once(
        &mut self,
        packet_id: u16,
        mut message: Message,
    ) -> Result<bool, ClientError> {
        topic::validate_name(&message.topic)?;
        if self.link.holds_qos2(packet_id) {
            return Ok(false);
        }
        message.qos = QoS::ExactlyOnce;
        let published = self.link.publish(message, Some(packet_id)).await?;
        published.committed.await?;
        Ok(true)
    }

    /// Free a packet id held by [`publish_exactly_once`](Client::publish_exactly_once)
    /// (the PUBREL of the relayed connection); returns once the store has
    /// forgotten it too. False if the id was not held.
    pub async fn release(&mut self, packet_id: u16) -> Result<bool, ClientError> {
        match self.link.release(packet_id) {
            Some(done) => {
                done.await?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The packet ids held by [`publish_exactly_once`](Client::publish_exactly_once)
    /// and not yet released (restored with a persistent session), sorted.
    pub fn held_packet_ids(&self) -> Vec<u16> {
        self.link.held_qos2()
    }

    /// The next delivery, in session order; `None` once the client is
    /// detached (taken over by another connection, or the broker stopped).
    pub async fn recv(&mut self) -> Option<Received> {
        loop {
            while let Some(o) = self.ready.pop_front() {
                match o {
                    // After a restart, a QoS 2 delivery the client had
                    // received before: completing it is all that is left.
                    Outgoing::PubRel { packet_id } => {
                        self.link.acknowledge(Ack::Qos2Done(packet_id))
                    }
                    Outgoing::Publish {
                        packet_id,
                        dup,
                        qos,
                        retain,
                        message,
                        ..
                    } => {
                        return Some(Received {
                            message,
                            qos,
                            retain,
                            dup,
                            packet_id: packet_id.filter(|_| qos != QoS::AtMostOnce),
                        })
                    }
                }
            }
            if self.kicked.is_cancelled() || self.shutdown.is_cancelled() {
                return None;
            }
            let mut out = Vec::new();
            self.outbox.take(TAKE_BUDGET, &mut out);
            if !out.is_empty() {
                self.ready.extend(out);
                continue;
            }
            tokio::select! {
                _ = self.outbox.changed() => {}
                _ = self.kicked.cancelled() => return None,
                _ = self.shutdown.cancelled() => return None,
            }
        }
    }

    /// Acknowledge a QoS 1/2 delivery (QoS 2: received and completed at
    /// once). The in-flight window moves on, and the stored copy goes.
    pub fn ack(&mut self, received: &Received) {
        let Some(id) = received.packet_id else { return };
        match received.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.link.acknowledge(Ack::Qos1Done(id)),
            QoS::ExactlyOnce => {
                self.link.acknowledge(Ack::Received(id));
                self.link.acknowledge(Ack::Qos2Done(id));
            }
        }
    }

    /// Detach normally: a persistent session stays, with what is not yet acknowledged.
    pub async fn disconnect(self) {
        self.link.detach(false, "client disconnected").await;
    }
}
