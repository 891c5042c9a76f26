//! The broker's shared state: sessions, the subscription trie, routing,
//! retained messages, wills and session expiry.
//!
//! The publish path is split in two so that ordering never depends on storage
//! latency: [`Broker::route`] runs synchronously, in the publisher's packet
//! order, and assigns each matching session its next sequence number;
//! [`Routed::commit`] then writes the batch to the packet store and, once it
//! has committed, releases the entries for delivery. The publisher's
//! acknowledgement waits for the commit.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::BrokerConfig;
use crate::message::{now_ms, Message, QoS, Seq};
use crate::session::{Attachment, Enqueued, NewEntry, Session};
use crate::storage::{
    ClientId, PacketOp, QueueTarget, SessionRecord, Storage, StorageError, StorageResult,
    SubscriptionRecord,
};
use crate::subscription::SubscriptionOptions;
use crate::topic;
use crate::trie::SubscriptionTree;

/// Entries read per page when restoring a queue from the store.
const RESTORE_PAGE: usize = 1000;
/// Stripes of the per-client lifecycle lock (connect, disconnect, expiry).
const LIFECYCLE_STRIPES: usize = 64;
/// How long a new connection waits for the one it takes over to close.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

/// A subscriber as the trie holds it.
#[derive(Debug, Clone)]
pub struct Subscriber {
    /// The session.
    pub session: Arc<Session>,
    /// What it was granted.
    pub options: SubscriptionOptions,
}

/// Counters for operators (later exported as `$SYS` topics and metrics).
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages accepted from publishers (and the server).
    pub published: AtomicU64,
    /// Messages refused or evicted by a session queue limit.
    pub dropped: AtomicU64,
    /// Storage writes that failed.
    pub storage_errors: AtomicU64,
}

/// The broker: shared by every connection.
pub struct Broker {
    config: BrokerConfig,
    storage: Storage,
    sessions: Mutex<HashMap<ClientId, Arc<Session>>>,
    trie: RwLock<SubscriptionTree<ClientId, Subscriber>>,
    lifecycle: Vec<tokio::sync::Mutex<()>>,
    next_message_id: AtomicU64,
    next_connection_id: AtomicU64,
    commits: TaskTracker,
    shutdown: CancellationToken,
    /// Counters.
    pub stats: Stats,
}

/// Result of a successful connect.
pub struct Connected {
    /// The session now attached to the connection.
    pub session: Arc<Session>,
    /// Whether a stored session was resumed (CONNACK session-present).
    pub session_present: bool,
}

/// A published message routed to its sessions, waiting for its store write.
#[must_use = "a routed message is only delivered once committed"]
pub struct Routed {
    ops: Vec<PacketOp>,
    /// Sessions with an entry waiting for this commit.
    pending: Vec<(Arc<Session>, Seq)>,
    storage: Storage,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Routed {
    /// Add an operation to the same atomic batch (e.g. incoming QoS 2 state).
    pub fn push_op(&mut self, op: PacketOp) {
        self.ops.push(op);
    }

    /// Whether committing will touch the store.
    pub fn needs_store(&self) -> bool {
        !self.ops.is_empty()
    }

    /// Write the batch; on success release the entries for delivery, on
    /// failure withdraw them (the publish is then not acknowledged).
    pub async fn commit(self) -> StorageResult<()> {
        let result = if self.ops.is_empty() {
            Ok(())
        } else {
            self.storage.packets.write(self.ops).await
        };
        for (session, seq) in &self.pending {
            {
                let mut st = session.lock();
                if result.is_ok() {
                    st.mark_ready(*seq);
                } else {
                    st.withdraw(*seq);
                }
            }
            session.wake.notify_one();
        }
        result
    }
}

/// The stored form of a session's metadata.
fn session_record(
    client_id: &str,
    expiry_secs: Option<u64>,
    disconnected_at_ms: Option<u64>,
) -> SessionRecord {
    SessionRecord {
        client_id: client_id.to_string(),
        expiry_secs: expiry_secs.map(|e| e.min(u32::MAX as u64) as u32),
        disconnected_at_ms,
    }
}

impl Broker {
    /// Start a broker on `storage`, restoring every stored session, its
    /// subscriptions and its queue.
    pub async fn start(config: BrokerConfig, storage: Storage) -> StorageResult<Arc<Broker>> {
        let last_id = storage.packets.last_message_id().await?;
        let broker = Arc::new(Broker {
            config,
            storage,
            sessions: Mutex::new(HashMap::new()),
            trie: RwLock::new(SubscriptionTree::new()),
            lifecycle: (0..LIFECYCLE_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            next_message_id: AtomicU64::new(last_id + 1),
            next_connection_id: AtomicU64::new(1),
            commits: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            stats: Stats::default(),
        });
        broker.restore().await?;
        let sweeper = Arc::downgrade(&broker);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(b) = sweeper.upgrade() else { return };
                if b.shutdown.is_cancelled() {
                    return;
                }
                b.expire_sessions().await;
            }
        });
        Ok(broker)
    }

    async fn restore(&self) -> StorageResult<()> {
        let stored = self.storage.subscriptions.load_sessions().await?;
        let (mut sessions, mut messages) = (0usize, 0usize);
        for s in stored {
            let id: ClientId = s.record.client_id.as_str().into();
            let session = Arc::new(Session::new(
                id.clone(),
                true,
                s.record.expiry_secs.map(u64::from),
            ));
            let qos2 = self.storage.packets.incoming_qos2(&id).await?;
            {
                let mut st = session.lock();
                // A session that was online when the broker stopped counts as
                // disconnected from now.
                st.disconnected_at_ms = Some(s.record.disconnected_at_ms.unwrap_or_else(now_ms));
                st.incoming_qos2.extend(qos2);
            }
            let mut after = None;
            loop {
                let page = self
                    .storage
                    .packets
                    .read_queue(&id, after, RESTORE_PAGE)
                    .await?;
                let Some(last) = page.last() else { break };
                after = Some(last.seq);
                let full = page.len() == RESTORE_PAGE;
                let mut st = session.lock();
                for p in page {
                    st.restore_entry(p);
                    messages += 1;
                }
                drop(st);
                if !full {
                    break;
                }
            }
            {
                let mut trie = self.trie.write();
                let mut st = session.lock();
                for sub in s.subscriptions {
                    trie.insert(
                        &sub.filter,
                        id.clone(),
                        Subscriber {
                            session: session.clone(),
                            options: sub.options.clone(),
                        },
                    );
                    st.subscriptions.insert(sub.filter, sub.options);
                }
            }
            self.sessions.lock().insert(id, session);
            sessions += 1;
        }
        if sessions > 0 {
            info!(
                sessions,
                messages, "restored persistent sessions from storage"
            );
        }
        Ok(())
    }

    /// The settings.
    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// The storage.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Cancelled when the broker shuts down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// A fresh connection id.
    pub fn next_connection_id(&self) -> u64 {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The session of `client_id`, if any.
    pub fn session(&self, client_id: &str) -> Option<Arc<Session>> {
        self.sessions.lock().get(client_id).cloned()
    }

    /// Number of sessions (online and offline).
    pub fn session_count(&self) -> usize {
        self.sessions.lock().len()
    }

    fn lifecycle_lock(&self, client_id: &str) -> &tokio::sync::Mutex<()> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        client_id.hash(&mut h);
        &self.lifecycle[(h.finish() as usize) % LIFECYCLE_STRIPES]
    }

    /// Attach a connection to the session of `client_id`, taking it over from
    /// another connection if needed; `clean` discards any previous session.
    pub async fn connect(
        &self,
        client_id: ClientId,
        clean: bool,
        attachment: Attachment,
    ) -> StorageResult<Connected> {
        let lock = self.lifecycle_lock(&client_id);
        let mut guard = lock.lock().await;
        // Session takeover: close the other connection and wait until it has detached.
        loop {
            let current = self
                .session(&client_id)
                .and_then(|s| s.lock().connection.clone());
            let Some(old) = current else { break };
            info!(client = %client_id, "session taken over by a new connection");
            old.kick.cancel();
            drop(guard);
            if tokio::time::timeout(TAKEOVER_WAIT, old.detached.cancelled())
                .await
                .is_err()
            {
                warn!(client = %client_id, "previous connection did not close in time");
            }
            guard = lock.lock().await;
            if let Some(s) = self.session(&client_id) {
                let mut st = s.lock();
                if st
                    .connection
                    .as_ref()
                    .is_some_and(|c| c.connection_id == old.connection_id)
                {
                    // It never detached: force it.
                    st.connection = None;
                    st.reset_in_flight();
                }
            }
        }
        let existing = self.session(&client_id);
        let resumable = existing.as_ref().filter(|s| s.lock().persistent).cloned();
        let (session, present) = match (clean, resumable) {
            (false, Some(s)) => {
                // Connected again: a crash from now on must not count the
                // offline time from the previous disconnect.
                let expiry = s.lock().expiry_secs;
                self.storage
                    .subscriptions
                    .save_session(&session_record(&client_id, expiry, None))
                    .await?;
                (s, true)
            }
            _ => {
                if let Some(old) = existing {
                    self.discard(&old).await?;
                }
                let expiry = self.config.session_expiry_secs;
                let s = Arc::new(Session::new(client_id.clone(), !clean, expiry));
                if !clean {
                    self.storage
                        .subscriptions
                        .save_session(&session_record(&client_id, expiry, None))
                        .await?;
                }
                self.sessions.lock().insert(client_id.clone(), s.clone());
                (s, false)
            }
        };
        {
            let mut st = session.lock();
            st.connection = Some(attachment);
            st.disconnected_at_ms = None;
            st.reset_in_flight();
        }
        drop(guard);
        session.wake.notify_one();
        Ok(Connected {
            session,
            session_present: present,
        })
    }

    /// The connection `connection_id` ended. Persistent sessions stay (their
    /// expiry starts now); clean sessions are discarded.
    pub async fn disconnect(&self, session: &Arc<Session>, connection_id: u64) {
        let _guard = self.lifecycle_lock(&session.client_id).lock().await;
        let persistent = {
            let mut st = session.lock();
            if st
                .connection
                .as_ref()
                .is_none_or(|c| c.connection_id != connection_id)
            {
                return;
            }
            st.connection = None;
            st.reset_in_flight();
            st.disconnected_at_ms = Some(now_ms());
            st.persistent
        };
        if persistent {
            let record = {
                let st = session.lock();
                session_record(&session.client_id, st.expiry_secs, st.disconnected_at_ms)
            };
            if let Err(e) = self.storage.subscriptions.save_session(&record).await {
                warn!(client = %session.client_id, error = %e, "could not record the disconnect time");
            }
        } else if let Err(e) = self.discard(session).await {
            warn!(client = %session.client_id, error = %e, "could not discard the session");
        }
    }

    /// Remove a session: its subscriptions from the trie, its queue and record from the store.
    async fn discard(&self, session: &Arc<Session>) -> StorageResult<()> {
        let filters: Vec<String> = session.lock().subscriptions.keys().cloned().collect();
        {
            let mut trie = self.trie.write();
            for f in &filters {
                trie.remove(f, &session.client_id);
            }
        }
        // No new message can reach the session now. Let enqueues already being
        // written land first, so that the purge below cannot be overtaken by
        // one of them and leave orphan entries in the store.
        let deadline = tokio::time::Instant::now() + TAKEOVER_WAIT;
        while session.lock().has_pending() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let persistent = {
            let mut st = session.lock();
            st.subscriptions.clear();
            st.clear();
            st.persistent
        };
        {
            let mut sessions = self.sessions.lock();
            if sessions
                .get(&session.client_id)
                .is_some_and(|s| Arc::ptr_eq(s, session))
            {
                sessions.remove(&session.client_id);
            }
        }
        if persistent {
            self.storage
                .packets
                .write(vec![PacketOp::Purge {
                    client: session.client_id.clone(),
                }])
                .await?;
            self.storage
                .subscriptions
                .delete_session(&session.client_id)
                .await?;
        }
        Ok(())
    }

    /// Discard offline persistent sessions whose expiry has passed since their disconnect.
    pub async fn expire_sessions(&self) {
        let now = now_ms();
        let expired: Vec<Arc<Session>> = self
            .sessions
            .lock()
            .values()
            .filter(|s| {
                let st = s.lock();
                match (
                    st.connection.is_none(),
                    st.expiry_secs,
                    st.disconnected_at_ms,
                ) {
                    (true, Some(exp), Some(at)) => at.saturating_add(exp * 1000) <= now,
                    _ => false,
                }
            })
            .cloned()
            .collect();
        for s in expired {
            let _guard = self.lifecycle_lock(&s.client_id).lock().await;
            if s.lock().is_online() {
                continue;
            }
            let queued = s.lock().queue_len();
            info!(client = %s.client_id, queued, "session expired");
            if let Err(e) = self.discard(&s).await {
                warn!(client = %s.client_id, error = %e, "could not discard the expired session");
            }
        }
    }

    /// Route `message` to every matching session (synchronously, so sequence
    /// numbers follow the caller's order). `origin` is the publishing session.
    pub fn route(&self, mut message: Message) -> Routed {
        message.id = self.next_message_id.fetch_add(1, Ordering::Relaxed);
        self.stats.published.fetch_add(1, Ordering::Relaxed);
        let message = Arc::new(message);
        // One copy per session at the highest granted QoS among its matching filters.
        let mut targets: HashMap<ClientId, (Arc<Session>, QoS)> = HashMap::new();
        self.trie.read().matches(&message.topic, |client, sub| {
            let qos = sub.options.qos.min(message.qos);
            targets
                .entry(client.clone())
                .and_modify(|(_, q)| *q = (*q).max(qos))
                .or_insert_with(|| (sub.session.clone(), qos));
        });
        let mut routed = Routed {
            ops: Vec::new(),
            pending: Vec::new(),
            storage: self.storage.clone(),
        };
        let mut stored_targets = Vec::new();
        for (client, (session, qos)) in targets {
            let mut st = session.lock();
            let store = st.persistent && qos != QoS::AtMostOnce;
            let dropped_before = st.dropped;
            let outcome = st.enqueue(
                NewEntry {
                    message: message.clone(),
                    qos,
                    retain: false,
                    store,
                },
                &self.config,
                &mut routed.ops,
                &client,
            );
            if st.dropped > dropped_before {
                self.note_drop(&client, st.dropped);
            }
            match outcome {
                Enqueued::Queued(seq) => {
                    if store {
                        stored_targets.push(QueueTarget {
                            client: client.clone(),
                            seq,
                            qos,
                            retain: false,
                        });
                        routed.pending.push((session.clone(), seq));
                    }
                }
                Enqueued::Dropped | Enqueued::Skipped => {}
            }
            drop(st);
            session.wake.notify_one();
        }
        if !stored_targets.is_empty() {
            routed.ops.push(PacketOp::Enqueue {
                message,
                targets: stored_targets,
            });
        }
        routed
    }

    fn note_drop(&self, client: &ClientId, dropped: u64) {
        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        // First drop and then every 1000th, so a full queue cannot flood the log.
        if dropped == 1 || dropped.is_multiple_of(1000) {
            warn!(
                client = %client,
                dropped,
                limit = self.config.max_queued_messages,
                policy = ?self.config.overflow_policy,
                "session queue full: message dropped"
            );
        }
    }

    /// Publish from the server or a will: update retained state, route, commit.
    pub async fn publish(&self, message: Message) -> StorageResult<()> {
        if message.retain {
            self.update_retained(&message).await?;
        }
        let routed = self.route(message);
        self.commit(routed).await
    }

    /// Commit a routed message on a task of its own, so that it completes (and
    /// releases its entries) even if the publisher's connection goes away.
    pub async fn commit(&self, routed: Routed) -> StorageResult<()> {
        if !routed.needs_store() {
            return routed.commit().await;
        }
        let handle = self.commits.spawn(routed.commit());
        let result = handle
            .await
            .unwrap_or_else(|e| Err(StorageError::Backend(format!("commit task failed: {e}"))));
        if let Err(e) = &result {
            self.stats.storage_errors.fetch_add(1, Ordering::Relaxed);
            warn!(error = %e, "storage write failed: publish not acknowledged");
        }
        result
    }

    /// Store or delete (empty payload) the retained message of a topic.
    pub async fn update_retained(&self, message: &Message) -> StorageResult<()> {
        if message.payload.is_empty() {
            self.storage.retained.delete_retained(&message.topic).await
        } else {
            let mut m = message.clone();
            m.id = self.next_message_id.fetch_add(1, Ordering::Relaxed);
            self.storage.retained.set_retained(Arc::new(m)).await
        }
    }

    /// Subscribe a session. Returns the granted QoS per filter, `None` for a
    /// refused (invalid) filter, in request order.
    pub async fn subscribe(
        &self,
        session: &Arc<Session>,
        requests: Vec<(String, SubscriptionOptions)>,
    ) -> StorageResult<Vec<Option<QoS>>> {
        let mut granted = Vec::with_capacity(requests.len());
        let mut records = Vec::new();
        {
            let mut trie = self.trie.write();
            let mut st = session.lock();
            for (filter, options) in requests {
                if let Err(e) = topic::validate_filter(&filter) {
                    debug!(client = %session.client_id, %filter, error = %e, "subscription refused");
                    granted.push(None);
                    continue;
                }
                granted.push(Some(options.qos));
                trie.insert(
                    &filter,
                    session.client_id.clone(),
                    Subscriber {
                        session: session.clone(),
                        options: options.clone(),
                    },
                );
                st.subscriptions.insert(filter.clone(), options.clone());
                records.push(SubscriptionRecord { filter, options });
            }
        }
        let persistent = session.lock().persistent;
        if persistent && !records.is_empty() {
            self.storage
                .subscriptions
                .add_subscriptions(&session.client_id, &records)
                .await?;
        }
        Ok(granted)
    }

    /// Queue the retained messages matching `filter` for `session` (after SUBACK).
    pub async fn deliver_retained(
        &self,
        session: &Arc<Session>,
        filter: &str,
        qos: QoS,
    ) -> StorageResult<()> {
        let mut retained = self.storage.retained.lookup_retained(filter).await?;
        retained.sort_by(|a, b| a.topic.cmp(&b.topic));
        let now = now_ms();
        let mut ops = Vec::new();
        {
            let mut st = session.lock();
            for m in retained {
                if m.is_expired(now) {
                    continue;
                }
                let m_qos = m.qos;
                // Retained deliveries are kept in memory only: a new SUBSCRIBE
                // fetches them again from the retained store.
                let dropped_before = st.dropped;
                let entry = NewEntry {
                    message: m,
                    qos: qos.min(m_qos),
                    retain: true,
                    store: false,
                };
                st.enqueue(entry, &self.config, &mut ops, &session.client_id);
                if st.dropped > dropped_before {
                    self.note_drop(&session.client_id, st.dropped);
                }
            }
        }
        if !ops.is_empty() {
            self.storage.packets.write(ops).await?;
        }
        session.wake.notify_one();
        Ok(())
    }

    /// Unsubscribe a session from `filters`.
    pub async fn unsubscribe(
        &self,
        session: &Arc<Session>,
        filters: Vec<String>,
    ) -> StorageResult<()> {
        let persistent = {
            let mut trie = self.trie.write();
            let mut st = session.lock();
            for f in &filters {
                trie.remove(f, &session.client_id);
                st.subscriptions.remove(f);
            }
            st.persistent
        };
        if persistent {
            self.storage
                .subscriptions
                .remove_subscriptions(&session.client_id, &filters)
                .await?;
        }
        Ok(())
    }

    /// Stop: close every connection, then wait for storage writes in progress.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.commits.close();
        self.commits.wait().await;
    }
}
