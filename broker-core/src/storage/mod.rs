//! The storage traits: what the broker needs from a database, and nothing of MQTT.
//!
//! They mirror Mosca's three MongoDB collections:
//! - [`PacketStore`] (`packets`): per-session ordered queues of QoS 1/2 messages,
//!   including those in flight, plus incoming QoS 2 state;
//! - [`SubscriptionStore`] (`subscriptions`): persistent sessions and their subscriptions;
//! - [`RetainedStore`] (`retained`): one retained message per topic.
//!
//! # The contract every backend keeps
//! - A queue is read in [`Seq`] order and only in that order; the core assigns
//!   sequence numbers, backends never reorder (see `LESSONS` in the design docs).
//! - [`PacketStore::write`] applies a batch of [`PacketOp`]s atomically and in
//!   order, and returns only once they are as durable as the backend promises.
//!   The broker acknowledges a QoS 1/2 publish only after that.
//! - A message body is stored once however many sessions it is queued for,
//!   and dropped when the last reference to it is removed.
//! - Batches exist so that a backend can commit many operations per round trip
//!   (group commit): concurrent callers may be merged into one transaction.
//! - Removing what is not there (`Remove`, `SetState`, `Purge`,
//!   `IncomingQos2Released` on an unknown entry) succeeds and changes nothing:
//!   acknowledgements can be repeated, and they may reach the store after a purge.
//! - A message id is never 0 in a batch. It usually appears in one `Enqueue`
//!   (the core routes each message once), but a later `Enqueue` may name a
//!   message that is already stored: a shared subscription handing a queued
//!   message to another member. The stored body is then referenced again,
//!   never stored twice. Retained messages get ids from the same counter but
//!   live only in the retained store.
//! - Each queue entry carries its [`Delivery`] (QoS, retain flag, MQTT 5
//!   subscription identifiers, shared group), and each body its MQTT 5
//!   properties; both come back unchanged, also after a restart.
//! - Sequence numbers and message ids stay below 2^53, so stores keyed by
//!   JSON numbers or Redis scores can hold them exactly.
//! - [`SubscriptionStore::delete_session`] removes the session's record and
//!   subscriptions only; the core purges its queue with [`PacketOp::Purge`].
//! - Wills ([`StoredWill`]) are kept apart from queues and sessions:
//!   [`PacketOp::Purge`] and `delete_session` leave them alone, only
//!   [`PacketOp::DeleteWill`] removes one. A will's id is unique in the
//!   store; one client may have several (a will being published while its
//!   client's next connection stores a new one).
//!
//! Adapters implement these traits and run the conformance suite
//! (`broker_core::testkit`, feature `testkit`) in their own tests.

use std::sync::Arc;

use async_trait::async_trait;

mod body_cache;
pub use body_cache::BodyCache;
pub mod lease;
use serde::{Deserialize, Serialize};

use crate::message::{Message, MessageId, QoS, Seq};
use crate::subscription::SubscriptionOptions;

/// A client identifier, shared cheaply.
pub type ClientId = Arc<str>;

/// The error behind a [`StorageError`], kept for [`std::error::Error::source`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors a storage backend reports, classified by what the caller can do.
///
/// The message says what failed in the adapter's words; the driver's own
/// error, when there is one, is the [`source`](std::error::Error::source),
/// so that a report of the whole chain names both without repeating either.
///
/// ```
/// use std::error::Error;
/// use broker_core::storage::StorageError;
///
/// let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
/// let e = StorageError::unavailable("cannot reach the database").with_source(io);
/// assert!(e.is_unavailable());
/// assert_eq!(e.to_string(), "storage unavailable: cannot reach the database");
/// assert_eq!(e.source().map(|s| s.to_string()).as_deref(), Some("refused"));
/// ```
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The database cannot be reached or refused the operation; retrying later may work.
    #[error("storage unavailable: {message}")]
    Unavailable {
        /// What failed.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// Stored data could not be understood.
    #[error("stored data is invalid: {message}")]
    Corrupt {
        /// What is wrong with the data.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// Any other backend failure.
    #[error("storage error: {message}")]
    Backend {
        /// What failed.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
}

/// The three kinds of [`StorageError`], to compare or copy a kind without
/// the error's source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageErrorKind {
    /// [`StorageError::Unavailable`].
    Unavailable,
    /// [`StorageError::Corrupt`].
    Corrupt,
    /// [`StorageError::Backend`].
    Backend,
}

/// A [`StorageError`] with its whole chain of sources, for log lines:
/// `storage unavailable: no connection to Redis: Connection refused (os error 111)`.
///
/// ```
/// use broker_core::storage::StorageError;
/// let io = std::io::Error::other("disk on fire");
/// let e = StorageError::unavailable("cannot write").with_source(io);
/// assert_eq!(e.report().to_string(), "storage unavailable: cannot write: disk on fire");
/// ```
pub struct Report<'a>(&'a StorageError);

impl std::fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = std::error::Error::source(self.0);
        while let Some(e) = next {
            write!(f, ": {e}")?;
            next = e.source();
        }
        Ok(())
    }
}

impl StorageError {
    /// The error and its sources on one line, for logs.
    pub fn report(&self) -> Report<'_> {
        Report(self)
    }

    /// Retrying later may work: the database cannot be reached or refused the operation.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StorageErrorKind::Unavailable, message)
    }

    /// Stored data could not be understood.
    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::new(StorageErrorKind::Corrupt, message)
    }

    /// Any other backend failure.
    pub fn backend(message: impl Into<String>) -> Self {
        Self::new(StorageErrorKind::Backend, message)
    }

    /// An error of `kind` without a source.
    pub fn new(kind: StorageErrorKind, message: impl Into<String>) -> Self {
        let (message, source) = (message.into(), None);
        match kind {
            StorageErrorKind::Unavailable => StorageError::Unavailable { message, source },
            StorageErrorKind::Corrupt => StorageError::Corrupt { message, source },
            StorageErrorKind::Backend => StorageError::Backend { message, source },
        }
    }

    /// The same error, caused by `source` (replacing any source it had).
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        *self.source_mut() = Some(Box::new(source));
        self
    }

    /// Which of the three kinds this is.
    pub fn kind(&self) -> StorageErrorKind {
        match self {
            StorageError::Unavailable { .. } => StorageErrorKind::Unavailable,
            StorageError::Corrupt { .. } => StorageErrorKind::Corrupt,
            StorageError::Backend { .. } => StorageErrorKind::Backend,
        }
    }

    /// What failed, without the kind's prefix that `Display` adds and without the source.
    pub fn message(&self) -> &str {
        match self {
            StorageError::Unavailable { message, .. }
            | StorageError::Corrupt { message, .. }
            | StorageError::Backend { message, .. } => message,
        }
    }

    /// True for [`StorageError::Unavailable`]: retrying later may work.
    pub fn is_unavailable(&self) -> bool {
        self.kind() == StorageErrorKind::Unavailable
    }

    /// True for [`StorageError::Corrupt`]: stored data could not be understood.
    pub fn is_corrupt(&self) -> bool {
        self.kind() == StorageErrorKind::Corrupt
    }

    /// The same error with `f` applied to its message; kind and source stay.
    pub fn map_message(mut self, f: impl FnOnce(String) -> String) -> Self {
        let message = match &mut self {
            StorageError::Unavailable { message, .. }
            | StorageError::Corrupt { message, .. }
            | StorageError::Backend { message, .. } => message,
        };
        *message = f(std::mem::take(message));
        self
    }

    /// A copy of `shared` for one of several callers failed by it (a group
    /// commit fails every request of a batch alike): the same kind and
    /// message, and a source that reads as `shared`'s source and continues
    /// into that source's own chain. Only a downcast of the first source to
    /// the driver's type is lost; the original error itself is not copied.
    pub fn copy_of(shared: &std::sync::Arc<StorageError>) -> StorageError {
        let copy = StorageError::new(shared.kind(), shared.message());
        match shared.source_ref() {
            Some(_) => copy.with_source(SharedSource(shared.clone())),
            None => copy,
        }
    }

    fn source_ref(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        match self {
            StorageError::Unavailable { source, .. }
            | StorageError::Corrupt { source, .. }
            | StorageError::Backend { source, .. } => source.as_deref(),
        }
    }

    fn source_mut(&mut self) -> &mut Option<BoxError> {
        match self {
            StorageError::Unavailable { source, .. }
            | StorageError::Corrupt { source, .. }
            | StorageError::Backend { source, .. } => source,
        }
    }
}

/// The source of a [`StorageError::copy_of`]: stands for the shared error's
/// source (its text, its `Debug`, its chain).
struct SharedSource(std::sync::Arc<StorageError>);

impl SharedSource {
    fn inner(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.0.source_ref()
    }
}

impl std::fmt::Display for SharedSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.inner() {
            Some(e) => std::fmt::Display::fmt(e, f),
            None => Ok(()),
        }
    }
}

impl std::fmt::Debug for SharedSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.inner() {
            Some(e) => std::fmt::Debug::fmt(e, f),
            None => f.write_str("None"),
        }
    }
}

impl std::error::Error for SharedSource {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner().and_then(|e| e.source())
    }
}

/// Result of a storage operation.
pub type StorageResult<T> = Result<T, StorageError>;

/// How one message is delivered to one session: everything about a queue
/// entry that is not the shared message body.
///
/// Adapters store it as they like (columns, or serialized with serde) and
/// must give it back unchanged.
///
/// ```
/// use broker_core::message::QoS;
/// use broker_core::storage::Delivery;
/// let d = Delivery::new(QoS::AtLeastOnce);
/// assert!(!d.retain && d.subscription_ids.is_empty() && d.share.is_none());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// QoS of the delivery to this session: min(publish QoS, granted QoS).
    pub qos: QoS,
    /// Retain flag to deliver with.
    pub retain: bool,
    /// Identifiers of the session's subscriptions that matched (MQTT 5),
    /// sent with the message.
    pub subscription_ids: Vec<u32>,
    /// The shared subscription (`$share/{group}/{filter}`) that chose this
    /// session, so that the message can go to another member if this one leaves.
    pub share: Option<String>,
}

impl Delivery {
    /// A plain delivery at `qos`: no retain flag, no subscription ids, not shared.
    pub fn new(qos: QoS) -> Self {
        Delivery {
            qos,
            retain: false,
            subscription_ids: Vec::new(),
            share: None,
        }
    }
}

/// One session a message is queued for, at the session's own sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueTarget {
    /// The session.
    pub client: ClientId,
    /// The session's sequence number for this message.
    pub seq: Seq,
    /// How it is delivered to that session.
    pub delivery: Delivery,
}

/// Delivery state of a queued packet that survives a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketState {
    /// Not yet acknowledged by the subscriber (maybe sent, maybe not).
    Queued,
    /// QoS 2: the subscriber sent PUBREC; PUBREL (with this packet id) is owed.
    Released {
        /// The packet id PUBREL must carry.
        packet_id: u16,
    },
}

/// One operation on the packet store. A batch is applied atomically and in order.
#[derive(Debug, Clone)]
pub enum PacketOp {
    /// Store `message` once and queue it for each target.
    Enqueue {
        /// The body, stored once.
        message: Arc<Message>,
        /// The sessions it is queued for.
        targets: Vec<QueueTarget>,
    },
    /// Remove one queue entry (acknowledged, expired or dropped by the queue limit).
    Remove {
        /// The session.
        client: ClientId,
        /// The entry.
        seq: Seq,
    },
    /// Change the delivery state of one entry in place (never by moving it).
    SetState {
        /// The session.
        client: ClientId,
        /// The entry.
        seq: Seq,
        /// The new state.
        state: PacketState,
    },
    /// Remove every queue entry and incoming QoS 2 state of a session.
    Purge {
        /// The session.
        client: ClientId,
    },
    /// Incoming QoS 2: the session published with this packet id and got PUBREC;
    /// a resent PUBLISH with the same id must not be routed again.
    IncomingQos2Received {
        /// The publishing session.
        client: ClientId,
        /// The publisher's packet id.
        packet_id: u16,
    },
    /// Incoming QoS 2: PUBREL arrived; the packet id is free again.
    IncomingQos2Released {
        /// The publishing session.
        client: ClientId,
        /// The publisher's packet id.
        packet_id: u16,
    },
    /// Keep a client's will (replacing a stored will with the same id).
    StoreWill {
        /// The will.
        will: StoredWill,
    },
    /// Forget the will `id` of `client`: published, or deleted by the client.
    /// Other wills of the client stay.
    DeleteWill {
        /// The client.
        client: ClientId,
        /// The will's id ([`StoredWill::id`]).
        id: MessageId,
    },
}

/// A client's will, kept in the store from its CONNECT until it is published
/// or deleted (normal DISCONNECT, or the client back before the Will Delay
/// Interval ended). A broker that dies while the client is connected finds
/// it at the next start and publishes it; the batch that queues the
/// published will also deletes it, so it is published exactly once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredWill {
    /// The client whose will this is.
    pub client: ClientId,
    /// The will message. Its `id` names this will in the store (it comes from
    /// the message id counter, so no two wills share it) and is not the id of
    /// a stored body; its expiry is set when it is published.
    pub message: Arc<Message>,
    /// Message Expiry Interval, counted from publication.
    pub expiry_secs: Option<u32>,
    /// Will Delay Interval (MQTT 5); 0 publishes at once.
    pub delay_secs: u32,
}

impl StoredWill {
    /// The will's id in the store (its message's id).
    pub fn id(&self) -> MessageId {
        self.message.id
    }
}

/// A queue entry as read back from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedPacket {
    /// Position in the session's queue.
    pub seq: Seq,
    /// The body (shared with other sessions' entries).
    pub message: Arc<Message>,
    /// How it is delivered to this session.
    pub delivery: Delivery,
    /// Delivery state.
    pub state: PacketState,
}

/// How long a stored queue is and where it ends: what the broker reads of
/// a queue at start, so that the entries themselves stay in the store until
/// the session's client comes back (see [`PacketStore::queue_bounds`]).
///
/// ```
/// use broker_core::storage::QueueBounds;
/// let empty = QueueBounds::default();
/// assert_eq!((empty.len, empty.last), (0, None));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueBounds {
    /// Entries in the queue, in flight included.
    pub len: u64,
    /// The greatest sequence number in it; `None` when it is empty.
    pub last: Option<Seq>,
}

/// Entries the default [`PacketStore::queue_bounds`] reads per page.
const BOUNDS_PAGE: usize = 1000;

/// Per-session queues of QoS 1/2 messages (Mosca's `packets` collection).
#[async_trait]
pub trait PacketStore: Send + Sync + 'static {
    /// Apply `ops` atomically and in order; return once durable.
    async fn write(&self, ops: Vec<PacketOp>) -> StorageResult<()>;

    /// Up to `limit` entries of `client`'s queue with a sequence number greater
    /// than `after` (all when `None`), in ascending sequence order.
    async fn read_queue(
        &self,
        client: &str,
        after: Option<Seq>,
        limit: usize,
    ) -> StorageResult<Vec<QueuedPacket>>;

    /// The length and last sequence number of `client`'s queue, without
    /// its entries: the broker reads this of every queue at start and the
    /// entries only when their session's client is back. The default reads
    /// the queue page by page; adapters answer it with one query.
    async fn queue_bounds(&self, client: &str) -> StorageResult<QueueBounds> {
        let mut bounds = QueueBounds::default();
        loop {
            let page = self.read_queue(client, bounds.last, BOUNDS_PAGE).await?;
            let Some(last) = page.last() else {
                return Ok(bounds);
            };
            bounds.last = Some(last.seq);
            bounds.len += page.len() as u64;
            if page.len() < BOUNDS_PAGE {
                return Ok(bounds);
            }
        }
    }

    /// Packet ids of incoming QoS 2 messages of `client` awaiting PUBREL.
    async fn incoming_qos2(&self, client: &str) -> StorageResult<Vec<u16>>;

    /// The greatest message id ever stored (0 for an empty store), so that ids
    /// assigned after a restart never collide with stored bodies. (Stored
    /// wills' ids need not count: the core reads them with [`Self::wills`].)
    async fn last_message_id(&self) -> StorageResult<MessageId>;

    /// Every stored will, in ascending id order.
    async fn wills(&self) -> StorageResult<Vec<StoredWill>>;
}

/// A persistent session's metadata (Mosca's `subscriptions` collection holds
/// it together with the subscriptions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// The client identifier.
    pub client_id: String,
    /// Seconds the session outlives its connection; `None` means never expires.
    pub expiry_secs: Option<u32>,
    /// When the last connection ended (ms since the Unix epoch); `None` while
    /// connected. Expiry counts from here, never from the last SUBSCRIBE.
    pub disconnected_at_ms: Option<u64>,
}

/// One stored subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionRecord {
    /// The topic filter.
    pub filter: String,
    /// Options granted.
    pub options: SubscriptionOptions,
}

/// A session and its subscriptions, as loaded at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    /// Metadata.
    pub record: SessionRecord,
    /// Subscriptions, in no particular order.
    pub subscriptions: Vec<SubscriptionRecord>,
}

/// Persistent sessions and their subscriptions (Mosca's `subscriptions` collection).
#[async_trait]
pub trait SubscriptionStore: Send + Sync + 'static {
    /// Insert or replace a session's metadata.
    async fn save_session(&self, record: &SessionRecord) -> StorageResult<()>;

    /// Delete a session and all its subscriptions. Deleting an unknown session is not an error.
    async fn delete_session(&self, client: &str) -> StorageResult<()>;

    /// Insert or replace subscriptions of a session (keyed by filter).
    async fn add_subscriptions(
        &self,
        client: &str,
        subscriptions: &[SubscriptionRecord],
    ) -> StorageResult<()>;

    /// Remove subscriptions of a session by filter; unknown filters are ignored.
    async fn remove_subscriptions(&self, client: &str, filters: &[String]) -> StorageResult<()>;

    /// Every stored session with its subscriptions.
    async fn load_sessions(&self) -> StorageResult<Vec<StoredSession>>;
}

/// Retained messages, one per topic (Mosca's `retained` collection).
#[async_trait]
pub trait RetainedStore: Send + Sync + 'static {
    /// Store `message` as the retained message of its topic, replacing any other.
    async fn set_retained(&self, message: Arc<Message>) -> StorageResult<()>;

    /// Delete the retained message of `topic`, if any.
    async fn delete_retained(&self, topic: &str) -> StorageResult<()>;

    /// Retained messages whose topic matches `filter` (wildcards allowed, with
    /// MQTT's rule that `+`/`#` at the first level do not match `$` topics).
    async fn lookup_retained(&self, filter: &str) -> StorageResult<Vec<Arc<Message>>>;
}

/// The three stores a broker runs on.
#[derive(Clone)]
pub struct Storage {
    /// Session queues.
    pub packets: Arc<dyn PacketStore>,
    /// Sessions and subscriptions.
    pub subscriptions: Arc<dyn SubscriptionStore>,
    /// Retained messages.
    pub retained: Arc<dyn RetainedStore>,
}

impl Storage {
    /// One backend object implementing all three traits.
    pub fn from_backend<B>(backend: Arc<B>) -> Self
    where
        B: PacketStore + SubscriptionStore + RetainedStore,
    {
        Storage {
            packets: backend.clone(),
            subscriptions: backend.clone(),
            retained: backend,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;
    use std::sync::Arc;

    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("driver: {0}")]
    struct Driver(&'static str, #[source] std::io::Error);

    fn driver() -> Driver {
        Driver("disk full", std::io::Error::other("ENOSPC"))
    }

    /// The text of each error in `e`'s source chain.
    fn chain(e: &StorageError) -> Vec<String> {
        let mut out = Vec::new();
        let mut next = e.source();
        while let Some(s) = next {
            out.push(s.to_string());
            next = s.source();
        }
        out
    }

    #[test]
    fn the_source_is_kept() {
        let e = StorageError::unavailable("cannot write the batch").with_source(driver());
        assert_eq!(e.to_string(), "storage unavailable: cannot write the batch");
        assert_eq!(e.message(), "cannot write the batch");
        assert!(e.is_unavailable() && !e.is_corrupt());
        let source = e.source().expect("a source");
        let inner = source.downcast_ref::<Driver>().expect("the driver's error");
        assert_eq!(inner.0, "disk full");
        assert_eq!(chain(&e), ["driver: disk full", "ENOSPC"]);
    }

    #[test]
    fn kinds_messages_and_no_source() {
        let e = StorageError::corrupt("field `qos` holds 3");
        assert_eq!(e.to_string(), "stored data is invalid: field `qos` holds 3");
        assert!(e.is_corrupt() && e.source().is_none());
        let e = StorageError::backend("no such table");
        assert_eq!(e.kind(), StorageErrorKind::Backend);
        assert_eq!(e.to_string(), "storage error: no such table");
        let e = StorageError::new(StorageErrorKind::Unavailable, "down")
            .with_source(driver())
            .map_message(|m| format!("{m} (at db)"));
        assert_eq!(e.message(), "down (at db)");
        assert!(e.is_unavailable() && e.source().is_some());
    }

    #[test]
    fn a_copy_for_another_caller_keeps_kind_message_and_chain() {
        let shared = Arc::new(StorageError::corrupt("bad body").with_source(driver()));
        let copy = StorageError::copy_of(&shared);
        assert_eq!(copy.kind(), StorageErrorKind::Corrupt);
        assert_eq!(copy.to_string(), shared.to_string());
        assert_eq!(chain(&copy), chain(&shared));
        let plain = StorageError::copy_of(&Arc::new(StorageError::unavailable("stopping")));
        assert!(plain.is_unavailable() && plain.source().is_none());
    }
}
