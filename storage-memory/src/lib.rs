//! In-memory implementation of the broker's storage traits.
//!
//! [`MemoryStore`] implements [`PacketStore`], [`SubscriptionStore`] and
//! [`RetainedStore`] with plain maps behind `parking_lot` mutexes. It is for
//! brokers that need no persistence across restarts, for tests, and as the
//! reference the other adapters are compared with: it passes the conformance
//! suite (`broker_core::testkit`). Nothing survives the process; a write is
//! "durable" as soon as it is applied.
//!
//! Like every adapter it must not know the MQTT protocol: no packets, no QoS
//! rules, no session expiry, no decision about what to deliver. It stores and
//! returns what the core gives it, in the order the core's sequence numbers
//! say. The only topic logic is filter matching for retained lookups, which
//! it takes from [`broker_core::topic`].
//!
//! # Example
//! ```
//! use std::sync::Arc;
//!
//! use broker_core::message::{Message, QoS};
//! use broker_core::storage::{Delivery, PacketOp, QueueTarget, Storage};
//! use storage_memory::MemoryStore;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), broker_core::storage::StorageError> {
//! let storage: Storage = Storage::from_backend(Arc::new(MemoryStore::new()));
//!
//! let mut message = Message::new("sensors/1/temp", "21.5", QoS::AtLeastOnce, false);
//! message.id = 1;
//! storage
//!     .packets
//!     .write(vec![PacketOp::Enqueue {
//!         message: Arc::new(message),
//!         targets: vec![QueueTarget {
//!             client: Arc::from("sensor-dashboard"),
//!             seq: 1,
//!             delivery: Delivery::new(QoS::AtLeastOnce),
//!         }],
//!     }])
//!     .await?;
//!
//! let queue = storage.packets.read_queue("sensor-dashboard", None, 100).await?;
//! assert_eq!(queue.len(), 1);
//! assert_eq!(&queue[0].message.payload[..], b"21.5");
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::Arc;

use async_trait::async_trait;
use broker_core::message::{Message, MessageId, Seq};
use broker_core::storage::{
    ClientId, Delivery, PacketOp, PacketState, PacketStore, QueueBounds, QueuedPacket,
    RetainedStore, SessionRecord, Storage, StorageError, StorageResult, StoredSession, StoredWill,
    SubscriptionRecord, SubscriptionStore,
};
use broker_core::subscription::SubscriptionOptions;
use broker_core::topic::{has_wildcard, literal_prefix, matches};
use parking_lot::Mutex;

/// Storage held in process memory; see the [crate documentation](crate).
///
/// The three stores have separate locks (they are independent); each
/// operation holds its lock for its whole duration and never across an
/// `.await`, so a [`PacketStore::write`] batch is atomic for every reader.
#[derive(Default)]
pub struct MemoryStore {
    packets: Mutex<Packets>,
    sessions: Mutex<BTreeMap<String, SessionEntry>>,
    retained: Mutex<BTreeMap<String, Arc<Message>>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The broker's view of this store: all three traits backed by it.
    pub fn storage(self: &Arc<Self>) -> Storage {
        Storage::from_backend(self.clone())
    }

    /// Number of distinct message bodies held (each stored once however many
    /// queue entries reference it). For tests and metrics.
    pub fn stored_bodies(&self) -> usize {
        self.packets.lock().bodies.len()
    }

    /// Number of queue entries across all sessions. For tests and metrics.
    pub fn queued_packets(&self) -> usize {
        self.packets
            .lock()
            .queues
            .values()
            .map(|q| q.entries.len())
            .sum()
    }
}

/// The packet store's state, all under one lock so batches are atomic.
#[derive(Default)]
struct Packets {
    queues: HashMap<ClientId, SessionQueues>,
    /// Bodies by id, each with the number of queue entries referencing it.
    bodies: HashMap<MessageId, Body>,
    /// High-water mark: kept when bodies go, as the trait promises.
    last_message_id: MessageId,
    /// Stored wills by id.
    wills: BTreeMap<MessageId, StoredWill>,
}

/// One session's state. Dropped as soon as it holds nothing, so purged or
/// drained sessions cost no memory.
#[derive(Default)]
struct SessionQueues {
    /// Keyed by seq: reads are in seq order whatever order writes came in,
    /// and an ack is O(log n).
    entries: BTreeMap<Seq, QueueEntry>,
    /// Incoming QoS 2 packet ids awaiting PUBREL.
    incoming_qos2: BTreeSet<u16>,
}

impl SessionQueues {
    fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.incoming_qos2.is_empty()
    }
}

struct QueueEntry {
    message_id: MessageId,
    delivery: Delivery,
    state: PacketState,
}

struct Body {
    message: Arc<Message>,
    refs: usize,
}

impl Packets {
    /// Refuse a batch that cannot be applied, before touching anything, so
    /// that a refused batch changes nothing.
    fn validate(ops: &[PacketOp]) -> StorageResult<()> {
        for op in ops {
            if let PacketOp::Enqueue { message, targets } = op {
                // Id 0 means "not assigned yet"; two such bodies would collide.
                if message.id == 0 && !targets.is_empty() {
                    return Err(StorageError::backend(format!(
                        "message on topic {:?} has no id (0) and cannot be stored",
                        message.topic
                    )));
                }
            }
            if let PacketOp::StoreWill { will } = op {
                if will.id() == 0 {
                    return Err(StorageError::backend(format!(
                        "will of {:?} has no id (0) and cannot be stored",
                        will.client
                    )));
                }
            }
        }
        Ok(())
    }

    fn apply(&mut self, op: PacketOp) {
        match op {
            PacketOp::Enqueue { message, targets } => {
                self.last_message_id = self.last_message_id.max(message.id);
                for t in targets {
                    // Take the new reference before dropping a replaced entry's,
                    // so a body re-enqueued at the same seq is never freed.
                    retain_body(&mut self.bodies, &message);
                    let entry = QueueEntry {
                        message_id: message.id,
                        delivery: t.delivery,
                        state: PacketState::Queued,
                    };
                    let replaced = self
                        .queues
                        .entry(t.client)
                        .or_default()
                        .entries
                        .insert(t.seq, entry);
                    if let Some(old) = replaced {
                        release_body(&mut self.bodies, old.message_id);
                    }
                }
            }
            PacketOp::Remove { client, seq } => {
                if let Some(q) = self.queues.get_mut(&client) {
                    if let Some(old) = q.entries.remove(&seq) {
                        release_body(&mut self.bodies, old.message_id);
                    }
                    if q.is_empty() {
                        self.queues.remove(&client);
                    }
                }
            }
            PacketOp::SetState { client, seq, state } => {
                // Unknown entry: nothing to update (it was acked or purged).
                if let Some(e) = self
                    .queues
                    .get_mut(&client)
                    .and_then(|q| q.entries.get_mut(&seq))
                {
                    e.state = state;
                }
            }
            PacketOp::Purge { client } => {
                if let Some(q) = self.queues.remove(&client) {
                    for old in q.entries.into_values() {
                        release_body(&mut self.bodies, old.message_id);
                    }
                }
            }
            PacketOp::IncomingQos2Received { client, packet_id } => {
                self.queues
                    .entry(client)
                    .or_default()
                    .incoming_qos2
                    .insert(packet_id);
            }
            PacketOp::IncomingQos2Released { client, packet_id } => {
                if let Some(q) = self.queues.get_mut(&client) {
                    q.incoming_qos2.remove(&packet_id);
                    if q.is_empty() {
                        self.queues.remove(&client);
                    }
                }
            }
            PacketOp::StoreWill { will } => {
                self.wills.insert(will.id(), will);
            }
            PacketOp::DeleteWill { client, id } => {
                if self.wills.get(&id).is_some_and(|w| w.client == client) {
                    self.wills.remove(&id);
                }
            }
        }
    }
}

fn retain_body(bodies: &mut HashMap<MessageId, Body>, message: &Arc<Message>) {
    bodies
        .entry(message.id)
        .or_insert_with(|| Body {
            message: message.clone(),
            refs: 0,
        })
        .refs += 1;
}

fn release_body(bodies: &mut HashMap<MessageId, Body>, id: MessageId) {
    if let Entry::Occupied(mut body) = bodies.entry(id) {
        body.get_mut().refs -= 1;
        if body.get().refs == 0 {
            body.remove();
        }
    }
}

#[async_trait]
impl PacketStore for MemoryStore {
    async fn write(&self, ops: Vec<PacketOp>) -> StorageResult<()> {
        Packets::validate(&ops)?;
        let mut packets = self.packets.lock();
        for op in ops {
            packets.apply(op);
        }
        Ok(())
    }

    async fn read_queue(
        &self,
        client: &str,
        after: Option<Seq>,
        limit: usize,
    ) -> StorageResult<Vec<QueuedPacket>> {
        let packets = self.packets.lock();
        let Some(q) = packets.queues.get(client) else {
            return Ok(Vec::new());
        };
        let range = match after {
            Some(after) => q.entries.range((Bound::Excluded(after), Bound::Unbounded)),
            None => q.entries.range(..),
        };
        let mut out = Vec::with_capacity(limit.min(q.entries.len()));
        for (&seq, e) in range.take(limit) {
            let body = packets.bodies.get(&e.message_id).ok_or_else(|| {
                StorageError::corrupt(format!(
                    "queue entry {seq} of {client:?} references missing message {}",
                    e.message_id
                ))
            })?;
            out.push(QueuedPacket {
                seq,
                message: body.message.clone(),
                delivery: e.delivery.clone(),
                state: e.state,
            });
        }
        Ok(out)
    }

    async fn queue_bounds(&self, client: &str) -> StorageResult<QueueBounds> {
        let packets = self.packets.lock();
        Ok(packets
            .queues
            .get(client)
            .map(|q| QueueBounds {
                len: q.entries.len() as u64,
                last: q.entries.keys().next_back().copied(),
            })
            .unwrap_or_default())
    }

    async fn incoming_qos2(&self, client: &str) -> StorageResult<Vec<u16>> {
        Ok(self
            .packets
            .lock()
            .queues
            .get(client)
            .map(|q| q.incoming_qos2.iter().copied().collect())
            .unwrap_or_default())
    }

    async fn last_message_id(&self) -> StorageResult<MessageId> {
        Ok(self.packets.lock().last_message_id)
    }

    async fn wills(&self) -> StorageResult<Vec<StoredWill>> {
        Ok(self.packets.lock().wills.values().cloned().collect())
    }
}

/// A session's record and subscriptions. The record is optional so that
/// subscriptions added before `save_session` are kept rather than refused;
/// such an entry is not a session yet and `load_sessions` skips it.
#[derive(Default)]
struct SessionEntry {
    record: Option<SessionRecord>,
    subscriptions: BTreeMap<String, SubscriptionOptions>,
}

#[async_trait]
impl SubscriptionStore for MemoryStore {
    async fn save_session(&self, record: &SessionRecord) -> StorageResult<()> {
        self.sessions
            .lock()
            .entry(record.client_id.clone())
            .or_default()
            .record = Some(record.clone());
        Ok(())
    }

    async fn delete_session(&self, client: &str) -> StorageResult<()> {
        self.sessions.lock().remove(client);
        Ok(())
    }

    async fn add_subscriptions(
        &self,
        client: &str,
        subscriptions: &[SubscriptionRecord],
    ) -> StorageResult<()> {
        let mut sessions = self.sessions.lock();
        let entry = sessions.entry(client.to_owned()).or_default();
        for s in subscriptions {
            entry
                .subscriptions
                .insert(s.filter.clone(), s.options.clone());
        }
        Ok(())
    }

    async fn remove_subscriptions(&self, client: &str, filters: &[String]) -> StorageResult<()> {
        let mut sessions = self.sessions.lock();
        if let Some(entry) = sessions.get_mut(client) {
            for f in filters {
                entry.subscriptions.remove(f);
            }
            if entry.record.is_none() && entry.subscriptions.is_empty() {
                sessions.remove(client);
            }
        }
        Ok(())
    }

    async fn load_sessions(&self) -> StorageResult<Vec<StoredSession>> {
        let sessions = self.sessions.lock();
        Ok(sessions
            .values()
            .filter_map(|entry| {
                let record = entry.record.clone()?;
                let subscriptions = entry
                    .subscriptions
                    .iter()
                    .map(|(filter, options)| SubscriptionRecord {
                        filter: filter.clone(),
                        options: options.clone(),
                    })
                    .collect();
                Some(StoredSession {
                    record,
                    subscriptions,
                })
            })
            .collect())
    }
}

#[async_trait]
impl RetainedStore for MemoryStore {
    async fn set_retained(&self, message: Arc<Message>) -> StorageResult<()> {
        self.retained.lock().insert(message.topic.clone(), message);
        Ok(())
    }

    async fn delete_retained(&self, topic: &str) -> StorageResult<()> {
        self.retained.lock().remove(topic);
        Ok(())
    }

    async fn lookup_retained(&self, filter: &str) -> StorageResult<Vec<Arc<Message>>> {
        let retained = self.retained.lock();
        if !has_wildcard(filter) {
            return Ok(retained.get(filter).cloned().into_iter().collect());
        }
        // Only topics starting with the filter's literal prefix can match,
        // and the map is sorted: scan that range alone.
        let prefix = literal_prefix(filter);
        let mut found: Vec<Arc<Message>> = retained
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(topic, _)| topic.starts_with(prefix))
            .filter(|(topic, _)| matches(filter, topic))
            .map(|(_, m)| m.clone())
            .collect();
        // `a/#` also matches `a` itself, which sorts outside the `a/` range.
        if let Some(parent) = prefix.strip_suffix('/') {
            if let Some(m) = retained.get(parent) {
                if matches(filter, parent) {
                    found.push(m.clone());
                }
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use broker_core::message::QoS;
    use broker_core::storage::{Delivery, QueueTarget};

    fn message(id: MessageId, topic: &str) -> Arc<Message> {
        let mut m = Message::new(topic, "x", QoS::AtLeastOnce, false);
        m.id = id;
        Arc::new(m)
    }

    fn target(client: &str, seq: Seq) -> QueueTarget {
        QueueTarget {
            client: Arc::from(client),
            seq,
            delivery: Delivery::new(QoS::AtLeastOnce),
        }
    }

    #[tokio::test]
    async fn bodies_are_stored_once_and_freed_with_their_last_reference() {
        let store = MemoryStore::new();
        let targets = vec![target("a", 1), target("b", 1), target("c", 1)];
        store
            .write(vec![PacketOp::Enqueue {
                message: message(1, "t"),
                targets,
            }])
            .await
            .unwrap();
        assert_eq!(store.stored_bodies(), 1);
        assert_eq!(store.queued_packets(), 3);

        let remove = |c: &str| PacketOp::Remove {
            client: Arc::from(c),
            seq: 1,
        };
        store.write(vec![remove("a")]).await.unwrap();
        store
            .write(vec![PacketOp::Purge {
                client: Arc::from("b"),
            }])
            .await
            .unwrap();
        assert_eq!(store.stored_bodies(), 1, "c still references the body");
        store.write(vec![remove("c")]).await.unwrap();
        assert_eq!(store.stored_bodies(), 0);
        assert_eq!(store.queued_packets(), 0);
        assert!(
            store.packets.lock().queues.is_empty(),
            "empty sessions are dropped"
        );
    }

    #[tokio::test]
    async fn replacing_an_entry_releases_the_old_body() {
        let store = MemoryStore::new();
        for id in [1, 2, 2] {
            store
                .write(vec![PacketOp::Enqueue {
                    message: message(id, "t"),
                    targets: vec![target("a", 1)],
                }])
                .await
                .unwrap();
        }
        assert_eq!(store.stored_bodies(), 1);
        let q = store.read_queue("a", None, 10).await.unwrap();
        assert_eq!(q[0].message.id, 2);
        store
            .write(vec![PacketOp::Remove {
                client: Arc::from("a"),
                seq: 1,
            }])
            .await
            .unwrap();
        assert_eq!(store.stored_bodies(), 0);
    }

    #[tokio::test]
    async fn a_refused_batch_changes_nothing() {
        let store = MemoryStore::new();
        let result = store
            .write(vec![
                PacketOp::Enqueue {
                    message: message(1, "t"),
                    targets: vec![target("a", 1)],
                },
                PacketOp::Enqueue {
                    message: message(0, "t"),
                    targets: vec![target("a", 2)],
                },
            ])
            .await;
        assert!(matches!(result, Err(StorageError::Backend { .. })));
        assert!(store.read_queue("a", None, 10).await.unwrap().is_empty());
        assert_eq!(store.last_message_id().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn hash_filter_finds_its_parent_but_not_siblings() {
        let store = MemoryStore::new();
        for (id, topic) in [(1, "a"), (2, "a/b"), (3, "ab"), (4, "a0"), (5, "$a")] {
            store.set_retained(message(id, topic)).await.unwrap();
        }
        let topics = |found: Vec<Arc<Message>>| {
            let mut t: Vec<String> = found.iter().map(|m| m.topic.clone()).collect();
            t.sort();
            t
        };
        assert_eq!(
            topics(store.lookup_retained("a/#").await.unwrap()),
            ["a", "a/b"]
        );
        assert_eq!(topics(store.lookup_retained("a/+").await.unwrap()), ["a/b"]);
        assert_eq!(
            topics(store.lookup_retained("+").await.unwrap()),
            ["a", "a0", "ab"]
        );
        assert_eq!(topics(store.lookup_retained("$a/#").await.unwrap()), ["$a"]);
    }
}
