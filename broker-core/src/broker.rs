//! The broker's shared state: sessions, the subscription trie, routing
//! (shared subscriptions included), retained messages, wills and session expiry.
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

use futures::future::BoxFuture;
use futures::FutureExt;
use parking_lot::{Mutex, RwLock};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::admission::{Admission, Permit, Refused};
use crate::config::BrokerConfig;
use crate::group_commit::GroupCommit;
use crate::hooks::Hooks;
use crate::message::{now_ms, Message, QoS, Seq};
use crate::session::{Attachment, DropReason, Enqueued, Entry, NewEntry, Session, SessionState};
use crate::storage::{
    ClientId, Delivery, PacketOp, QueueTarget, SessionRecord, Storage, StorageError, StorageResult,
    SubscriptionRecord,
};
use crate::subscription::SubscriptionOptions;
use crate::topic::{self, SharedFilter};
use crate::trie::SubscriptionTree;

/// Entries read per page when restoring a queue from the store.
const RESTORE_PAGE: usize = 1000;
/// Stripes of the per-client lifecycle lock (connect, disconnect, expiry).
const LIFECYCLE_STRIPES: usize = 64;
/// How long a new connection waits for the one it takes over to close.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

/// Who holds a subscription in the trie: a session, once per filter on its
/// own and once per shared group it joined with that filter.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SubscriberKey {
    /// The session's client id.
    pub client: ClientId,
    /// The full `$share/{group}/{filter}` for a shared subscription.
    pub share: Option<Arc<str>>,
}

/// A subscriber as the trie holds it.
#[derive(Debug, Clone)]
pub struct Subscriber {
    /// The session.
    pub session: Arc<Session>,
    /// What it was granted.
    pub options: SubscriptionOptions,
    /// The full `$share/{group}/{filter}` for a shared subscription.
    pub share: Option<Arc<str>>,
}

/// A client's will, held from CONNECT until its connection ends.
#[derive(Debug, Clone)]
pub struct Will {
    /// The message (its expiry is set when it is published).
    pub message: Message,
    /// Message Expiry Interval, counted from publication.
    pub expiry_secs: Option<u32>,
    /// Will Delay Interval (MQTT 5); 0 publishes at once.
    pub delay_secs: u32,
}

/// How long a session outlives its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionExpiry {
    /// It ends with the connection (MQTT 3.1.1 clean session, MQTT 5 interval 0).
    OnDisconnect,
    /// It ends this many seconds after the connection.
    After(u64),
    /// It never expires (MQTT 5 interval 0xFFFFFFFF).
    Never,
}

impl SessionExpiry {
    /// The expiry an MQTT 5 Session Expiry Interval asks for.
    pub fn from_interval(secs: u32) -> Self {
        match secs {
            0 => SessionExpiry::OnDisconnect,
            u32::MAX => SessionExpiry::Never,
            s => SessionExpiry::After(u64::from(s)),
        }
    }

    /// The seconds the session state keeps (`None`: never expires).
    pub fn secs(self) -> Option<u64> {
        match self {
            SessionExpiry::OnDisconnect => Some(0),
            SessionExpiry::After(s) => Some(s),
            SessionExpiry::Never => None,
        }
    }
}

/// Why a subscription was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeRefusal {
    /// Not a valid filter (or a malformed `$share/` one).
    InvalidFilter,
    /// Shared subscriptions are disabled.
    SharedNotSupported,
    /// Wildcards are disabled.
    WildcardsNotSupported,
    /// More levels than `max_topic_levels`.
    TooManyLevels,
    /// The session holds `max_subscriptions_per_client` already.
    QuotaExceeded,
}

/// A subscription granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    /// QoS granted (the request, capped by the broker's maximum).
    pub qos: QoS,
    /// The session already had a subscription with this filter (replaced).
    pub existed: bool,
    /// A `$share/` subscription (no retained messages on subscribe).
    pub shared: bool,
}

/// Outcome of unsubscribing one filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsubscribed {
    /// The subscription was removed.
    Removed,
    /// The session had no subscription with this filter.
    NotSubscribed,
    /// Not a valid filter.
    InvalidFilter,
}

/// Counters for operators (later exported as `$SYS` topics and metrics).
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages accepted from publishers (and the server).
    pub published: AtomicU64,
    /// Messages refused or evicted by a session queue limit (either).
    pub dropped: AtomicU64,
    /// Of those, the ones refused or evicted by `max_queued_bytes`.
    pub dropped_bytes_limit: AtomicU64,
    /// Subscriptions refused by `max_subscriptions_per_client`.
    pub subscriptions_refused: AtomicU64,
    /// Topic names and filters refused by `max_topic_levels`.
    pub topics_too_deep: AtomicU64,
    /// Connections closed at accept by `max_connections`.
    pub connections_over_limit: AtomicU64,
    /// Connections closed at accept by `max_connection_rate`.
    pub connections_over_rate: AtomicU64,
    /// Storage writes that failed.
    pub storage_errors: AtomicU64,
}

/// The broker: shared by every connection.
pub struct Broker {
    config: BrokerConfig,
    storage: Storage,
    hooks: Hooks,
    sessions: Mutex<HashMap<ClientId, Arc<Session>>>,
    trie: RwLock<SubscriptionTree<SubscriberKey, Subscriber>>,
    /// Round-robin position per shared subscription.
    share_cursors: Mutex<HashMap<Arc<str>, usize>>,
    lifecycle: Vec<tokio::sync::Mutex<()>>,
    next_message_id: AtomicU64,
    next_connection_id: AtomicU64,
    /// Work that must finish before shutdown completes: commits, wills.
    commits: TaskTracker,
    /// The queue in front of the packet store.
    writer: GroupCommit,
    /// Client connections, so that shutdown can wait for them to close.
    connections: TaskTracker,
    /// The gate every accepted connection passes first.
    admission: Arc<Admission>,
    shutdown: CancellationToken,
    /// Counters.
    pub stats: Arc<Stats>,
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
    /// Some subscription matched (MQTT 5 PUBACK 0x10 otherwise).
    matched: bool,
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

    /// Whether any subscription matched the message.
    pub fn matched(&self) -> bool {
        self.matched
    }

    /// Append another routed batch, to be committed atomically with this one.
    fn absorb(&mut self, other: Routed) {
        self.ops.extend(other.ops);
        self.pending.extend(other.pending);
        self.matched |= other.matched;
    }
}

/// The store write of routed entries ended: on success release them for
/// delivery, on failure withdraw them (the publish is then not acknowledged).
fn release(pending: &[(Arc<Session>, Seq)], committed: bool) {
    for (session, seq) in pending {
        {
            let mut st = session.lock();
            if committed {
                st.mark_ready(*seq);
            } else {
                st.withdraw(*seq);
            }
        }
        session.wake.notify_one();
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
        Self::start_with(config, storage, Hooks::default()).await
    }

    /// [`Broker::start`] with the application's [`Hooks`].
    pub async fn start_with(
        config: BrokerConfig,
        storage: Storage,
        hooks: Hooks,
    ) -> StorageResult<Arc<Broker>> {
        let last_id = storage.packets.last_message_id().await?;
        let stats: Arc<Stats> = Arc::default();
        let admission = Admission::new(
            config.max_connections,
            config.max_connection_rate,
            stats.clone(),
        );
        let broker = Arc::new(Broker {
            writer: GroupCommit::start(storage.packets.clone(), config.max_commit_batch),
            config,
            storage,
            hooks,
            sessions: Mutex::new(HashMap::new()),
            trie: RwLock::new(SubscriptionTree::new()),
            share_cursors: Mutex::new(HashMap::new()),
            lifecycle: (0..LIFECYCLE_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            next_message_id: AtomicU64::new(last_id + 1),
            next_connection_id: AtomicU64::new(1),
            commits: TaskTracker::new(),
            connections: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            admission,
            stats,
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

    /// The application's hooks.
    pub fn hooks(&self) -> &Hooks {
        &self.hooks
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
    /// another connection if needed. `clean_start` discards any previous
    /// session; `expiry` says how long the session outlives this connection.
    pub async fn connect(
        &self,
        client_id: ClientId,
        clean_start: bool,
        expiry: SessionExpiry,
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
        if let Some(s) = &existing {
            // A new connection before the will delay passed: the will is dropped.
            if let Some(will) = s.lock().pending_will.take() {
                will.cancel();
            }
        }
        // An expired session the sweeper has not reached yet is gone all the same.
        let now = now_ms();
        let resumable = existing
            .as_ref()
            .filter(|s| {
                let st = s.lock();
                st.persistent && !st.has_expired(now)
            })
            .cloned();
        let (session, present) = match (clean_start, resumable) {
            (false, Some(s)) => {
                // Connected again: a crash from now on must not count the
                // offline time from the previous disconnect. The new
                // connection's expiry replaces the old one.
                s.lock().expiry_secs = expiry.secs();
                self.storage
                    .subscriptions
                    .save_session(&session_record(&client_id, expiry.secs(), None))
                    .await?;
                (s, true)
            }
            _ => {
                if let Some(old) = existing {
                    self.discard(&old).await?;
                }
                let persistent = expiry != SessionExpiry::OnDisconnect;
                let s = Arc::new(Session::new(client_id.clone(), persistent, expiry.secs()));
                if persistent {
                    self.storage
                        .subscriptions
                        .save_session(&session_record(&client_id, expiry.secs(), None))
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

    /// Change how long a session outlives its connection (MQTT 5 DISCONNECT
    /// with a Session Expiry Interval); it applies when the connection ends.
    pub fn set_session_expiry(&self, session: &Session, expiry: SessionExpiry) {
        session.lock().expiry_secs = expiry.secs();
    }

    /// The connection `connection_id` ended. Persistent sessions stay (their
    /// expiry starts now); others are discarded.
    pub async fn disconnect(&self, session: &Arc<Session>, connection_id: u64) {
        let _guard = self.lifecycle_lock(&session.client_id).lock().await;
        let (persistent, ends_now) = {
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
            (st.persistent, st.expiry_secs == Some(0))
        };
        if persistent && !ends_now {
            let record = {
                let st = session.lock();
                session_record(&session.client_id, st.expiry_secs, st.disconnected_at_ms)
            };
            if let Err(e) = self.storage.subscriptions.save_session(&record).await {
                warn!(client = %session.client_id, error = %e, "could not record the disconnect time");
            }
            // Messages a shared subscription chose this session for go to a
            // member that is online, if the group has one.
            let online_elsewhere = |share: &str| self.group_has_online_member(share, session);
            if let Err(e) = self.redistribute(session, online_elsewhere, false).await {
                warn!(client = %session.client_id, error = %e, "could not hand shared messages to another member");
            }
        } else if let Err(e) = self.discard(session).await {
            warn!(client = %session.client_id, error = %e, "could not discard the session");
        }
    }

    /// Remove a session: its subscriptions from the trie, its queue and record
    /// from the store. What shared subscriptions queued for it goes to other members.
    async fn discard(&self, session: &Arc<Session>) -> StorageResult<()> {
        let filters: Vec<String> = session.lock().subscriptions.keys().cloned().collect();
        {
            let mut trie = self.trie.write();
            for f in &filters {
                remove_subscription(&mut trie, f, &session.client_id);
            }
        }
        // No new message can reach the session now. Let enqueues already being
        // written land first, so that the purge below cannot be overtaken by
        // one of them and leave orphan entries in the store.
        let deadline = tokio::time::Instant::now() + TAKEOVER_WAIT;
        while session.lock().has_pending() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        self.redistribute(session, |_| true, true).await?;
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
            self.submit(vec![PacketOp::Purge {
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
            .filter(|s| s.lock().has_expired(now))
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

    /// Publish a will when its delay has passed or the session ends, whichever
    /// comes first, unless the client connects again before (MQTT 5 section 3.1.3.2.2).
    ///
    /// A broker shutting down publishes pending wills at once: the delay
    /// cannot run on across a restart, and a will published early is better
    /// than one never published.
    pub fn schedule_will(self: &Arc<Self>, session: &Arc<Session>, will: Will) {
        // A session that ends with its connection has expiry 0: no wait.
        let delay = u64::from(will.delay_secs);
        let wait = match session.lock().expiry_secs {
            _ if self.shutdown.is_cancelled() => 0,
            Some(e) => delay.min(e),
            None => delay,
        };
        let origin = session.client_id.clone();
        if wait == 0 {
            let broker = self.clone();
            self.commits
                .spawn(async move { broker.publish_will(will, &origin).await });
            return;
        }
        let cancel = CancellationToken::new();
        if let Some(old) = session.lock().pending_will.replace(cancel.clone()) {
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

    async fn publish_will(&self, will: Will, client: &ClientId) {
        let mut message = will.message;
        message.received_at_ms = now_ms();
        message.properties.expires_at_ms = will
            .expiry_secs
            .map(|s| message.received_at_ms + u64::from(s) * 1000);
        if let Err(e) = self.publish_from(message, Some(client)).await {
            warn!(%client, error = %e, "will message not published");
        }
    }

    /// Route `message` to every matching session (synchronously, so sequence
    /// numbers follow the caller's order). `origin` is the publishing
    /// session, for the No Local option.
    pub fn route(&self, mut message: Message, origin: Option<&str>) -> Routed {
        message.id = self.next_message_id.fetch_add(1, Ordering::Relaxed);
        self.stats.published.fetch_add(1, Ordering::Relaxed);
        let message = Arc::new(message);
        // One copy per session for its own subscriptions, at the highest
        // granted QoS, with every matching subscription id; one copy per
        // shared group, to one member.
        let mut direct: HashMap<ClientId, (Arc<Session>, Delivery)> = HashMap::new();
        let mut groups: HashMap<Arc<str>, Vec<Subscriber>> = HashMap::new();
        self.trie.read().matches(&message.topic, |key, sub| {
            if let Some(share) = &sub.share {
                groups.entry(share.clone()).or_default().push(sub.clone());
                return;
            }
            if sub.options.no_local && origin == Some(&*key.client) {
                return;
            }
            let d = delivery_for(sub, &message);
            direct
                .entry(key.client.clone())
                .and_modify(|(_, have)| {
                    have.qos = have.qos.max(d.qos);
                    have.retain |= d.retain;
                    have.subscription_ids.extend(&d.subscription_ids);
                })
                .or_insert_with(|| (sub.session.clone(), d));
        });
        let mut targets: Vec<(Arc<Session>, Delivery)> = direct.into_values().collect();
        for (share, members) in groups {
            if let Some(sub) = self.pick_member(&share, members) {
                targets.push((sub.session.clone(), delivery_for(&sub, &message)));
            }
        }
        self.enqueue(message, targets)
    }

    /// Queue `message` for `targets`, as one batch for the store.
    fn enqueue(&self, message: Arc<Message>, targets: Vec<(Arc<Session>, Delivery)>) -> Routed {
        let mut routed = Routed {
            ops: Vec::new(),
            pending: Vec::new(),
            matched: !targets.is_empty(),
        };
        let mut stored_targets = Vec::new();
        for (session, delivery) in targets {
            let client = &session.client_id;
            let mut st = session.lock();
            let store = st.persistent && delivery.qos != QoS::AtMostOnce;
            let dropped_before = st.dropped;
            let outcome = st.enqueue(
                NewEntry {
                    message: message.clone(),
                    delivery: delivery.clone(),
                    store,
                },
                &self.config,
                &mut routed.ops,
                client,
            );
            if st.dropped > dropped_before {
                self.note_drop(client, &st);
            }
            if let Enqueued::Queued(seq) = outcome {
                if store {
                    stored_targets.push(QueueTarget {
                        client: client.clone(),
                        seq,
                        delivery,
                    });
                    routed.pending.push((session.clone(), seq));
                }
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

    /// Choose the member of a shared subscription that gets the next message:
    /// round-robin over the members that are online (ordered by client id),
    /// or over all of them (persistent, offline) when none is.
    fn pick_member(&self, share: &Arc<str>, mut members: Vec<Subscriber>) -> Option<Subscriber> {
        if members.iter().any(|m| m.session.lock().is_online()) {
            members.retain(|m| m.session.lock().is_online());
        }
        if members.is_empty() {
            return None;
        }
        members.sort_by(|a, b| a.session.client_id.cmp(&b.session.client_id));
        let turn = {
            let mut cursors = self.share_cursors.lock();
            let c = cursors.entry(share.clone()).or_insert(0);
            *c = c.wrapping_add(1);
            *c
        };
        let i = turn % members.len();
        Some(members.swap_remove(i))
    }

    /// Whether a member of `share` other than `session` is online.
    fn group_has_online_member(&self, share: &str, session: &Session) -> bool {
        let Ok(Some(parts)) = topic::parse_shared(share) else {
            return false;
        };
        let mut found = false;
        self.trie.read().subscribers(parts.filter, |key, sub| {
            found |= key.share.as_deref() == Some(share)
                && key.client != session.client_id
                && sub.session.lock().is_online();
        });
        found
    }

    /// Hand the shared-subscription entries of `from` whose group `select`
    /// accepts to other members of their groups, in one store batch that also
    /// removes them from `from` (so a crash leaves them in one place or the
    /// other). `in_flight` moves entries already sent too (the session is
    /// ending). An entry whose group has no other member left is dropped.
    async fn redistribute(
        &self,
        from: &Arc<Session>,
        select: impl Fn(&str) -> bool,
        in_flight: bool,
    ) -> StorageResult<()> {
        let mut removals = Vec::new();
        // `select` may look at the trie: never call it with the session locked
        // (the trie is always locked before a session, never after).
        let groups = from.lock().shared_groups();
        let groups: Vec<String> = groups.into_iter().filter(|g| select(g)).collect();
        let taken: Vec<Entry> = {
            let mut st = from.lock();
            let mut taken = Vec::new();
            for g in groups {
                taken.extend(st.take_shared(Some(&g), in_flight, &mut removals, &from.client_id));
            }
            taken
        };
        if taken.is_empty() {
            return Ok(());
        }
        let mut batch = Routed {
            ops: Vec::new(),
            pending: Vec::new(),
            matched: false,
        };
        let (mut moved, mut lost) = (0usize, 0usize);
        for e in taken {
            let Some(share) = e.delivery.share.as_deref() else {
                continue;
            };
            let share: Arc<str> = Arc::from(share);
            let Ok(Some(SharedFilter { filter, .. })) = topic::parse_shared(&share) else {
                continue;
            };
            let mut members = Vec::new();
            self.trie.read().subscribers(filter, |key, sub| {
                if key.share.as_deref() == Some(&*share) && key.client != from.client_id {
                    members.push(sub.clone());
                }
            });
            match self.pick_member(&share, members) {
                Some(sub) => {
                    let delivery = delivery_for(&sub, &e.message);
                    batch.absorb(self.enqueue(e.message, vec![(sub.session.clone(), delivery)]));
                    moved += 1;
                }
                None => lost += 1,
            }
        }
        batch.ops.extend(removals);
        if moved > 0 || lost > 0 {
            info!(client = %from.client_id, moved, dropped = lost, "shared subscription messages handed to other members");
        }
        self.commit(batch).await
    }

    /// Count and log a message a session's queue limits refused or evicted.
    fn note_drop(&self, client: &ClientId, st: &SessionState) {
        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        let reason = st.last_drop();
        if reason == Some(DropReason::Bytes) {
            self.stats
                .dropped_bytes_limit
                .fetch_add(1, Ordering::Relaxed);
        }
        let dropped = st.dropped;
        // First drop and then every 1000th, so a full queue cannot flood the log.
        if dropped == 1 || dropped.is_multiple_of(1000) {
            warn!(
                client = %client,
                dropped,
                queued = st.queue_len(),
                queued_bytes = st.queued_bytes(),
                max_queued_messages = self.config.max_queued_messages,
                max_queued_bytes = self.config.max_queued_bytes,
                policy = ?self.config.overflow_policy,
                limit = ?reason,
                "session queue full: message dropped"
            );
        }
    }

    /// Publish from the server: update retained state, route, commit.
    pub async fn publish(&self, message: Message) -> StorageResult<()> {
        self.publish_from(message, None).await
    }

    /// Publish on behalf of `origin` (a will): as [`Broker::publish`], with
    /// the No Local option applied to `origin`.
    pub async fn publish_from(&self, message: Message, origin: Option<&str>) -> StorageResult<()> {
        if message.retain && self.config.retain_available {
            self.update_retained(&message).await?;
        }
        let routed = self.route(message, origin);
        self.commit(routed).await
    }

    /// Queue packet-store operations for the next group commit, now, so that
    /// they reach the store in call order; the future resolves once they are
    /// durable. Dropping it does not cancel the write.
    pub fn submit(
        &self,
        ops: Vec<PacketOp>,
    ) -> impl std::future::Future<Output = StorageResult<()>> + Send + 'static {
        self.writer.submit(ops)
    }

    /// Submit a routed message's store write now (see [`Broker::submit`]);
    /// the future resolves when its entries are released for delivery, or
    /// withdrawn if the write failed. The write and release run on a task
    /// of their own, so they complete even if the publisher goes away.
    pub fn commit(&self, routed: Routed) -> BoxFuture<'static, StorageResult<()>> {
        let Routed { ops, pending, .. } = routed;
        if ops.is_empty() {
            release(&pending, true);
            return futures::future::ready(Ok(())).boxed();
        }
        let write = self.writer.submit(ops);
        let stats = self.stats.clone();
        let handle = self.commits.spawn(async move {
            let result = write.await;
            release(&pending, result.is_ok());
            if result.is_err() {
                stats.storage_errors.fetch_add(1, Ordering::Relaxed);
            }
            result
        });
        async move {
            handle
                .await
                .unwrap_or_else(|e| Err(StorageError::Backend(format!("commit task failed: {e}"))))
        }
        .boxed()
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

    /// Subscribe a session. Returns, in request order, what was granted or why
    /// it was refused.
    pub async fn subscribe(
        &self,
        session: &Arc<Session>,
        requests: Vec<(String, SubscriptionOptions)>,
    ) -> StorageResult<Vec<Result<Granted, SubscribeRefusal>>> {
        let mut outcomes = Vec::with_capacity(requests.len());
        let mut records = Vec::new();
        {
            let mut trie = self.trie.write();
            let mut st = session.lock();
            for (filter, mut options) in requests {
                let existed = st.subscriptions.contains_key(&filter);
                let checked = self.check_filter(&filter).and_then(|shared| {
                    if !existed
                        && st.subscriptions.len() >= self.config.max_subscriptions_per_client
                    {
                        Err(SubscribeRefusal::QuotaExceeded)
                    } else {
                        Ok(shared)
                    }
                });
                let shared = match checked {
                    Ok(shared) => shared,
                    Err(refusal) => {
                        self.note_refusal(&session.client_id, &filter, refusal);
                        outcomes.push(Err(refusal));
                        continue;
                    }
                };
                options.qos = options.qos.min(self.config.max_qos());
                insert_subscription(&mut trie, &filter, shared, session, &options);
                outcomes.push(Ok(Granted {
                    qos: options.qos,
                    existed,
                    shared: shared.is_some(),
                }));
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
        Ok(outcomes)
    }

    /// Whether the broker accepts `filter`; its shared parts if it is `$share/`.
    fn check_filter<'a>(
        &self,
        filter: &'a str,
    ) -> Result<Option<SharedFilter<'a>>, SubscribeRefusal> {
        let shared = topic::parse_shared(filter).map_err(|_| SubscribeRefusal::InvalidFilter)?;
        let inner = shared.map_or(filter, |s| s.filter);
        topic::validate_filter(inner).map_err(|_| SubscribeRefusal::InvalidFilter)?;
        topic::check_levels(inner, self.config.max_topic_levels)
            .map_err(|_| SubscribeRefusal::TooManyLevels)?;
        if shared.is_some() && !self.config.shared_subscriptions {
            return Err(SubscribeRefusal::SharedNotSupported);
        }
        if topic::has_wildcard(inner) && !self.config.wildcard_subscriptions {
            return Err(SubscribeRefusal::WildcardsNotSupported);
        }
        Ok(shared)
    }

    /// Count and log a refused subscription. The log is rate-limited per
    /// kind by the counters: a subscription bomb does not flood it.
    fn note_refusal(&self, client: &ClientId, filter: &str, refusal: SubscribeRefusal) {
        let counter = match refusal {
            SubscribeRefusal::QuotaExceeded => &self.stats.subscriptions_refused,
            SubscribeRefusal::TooManyLevels => &self.stats.topics_too_deep,
            _ => {
                debug!(%client, %filter, ?refusal, "subscription refused");
                return;
            }
        };
        let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
        if n == 1 || n.is_multiple_of(1000) {
            // A filter can be 64 KB: log its start only.
            let start: String = filter.chars().take(64).collect();
            warn!(
                %client,
                filter = %start,
                ?refusal,
                max_subscriptions_per_client = self.config.max_subscriptions_per_client,
                max_topic_levels = self.config.max_topic_levels,
                refused_so_far = n,
                "subscription refused by a limit"
            );
        }
    }

    /// Count and log a topic name refused by `max_topic_levels`.
    pub(crate) fn note_deep_topic(&self, client: &ClientId, what: &str) {
        let n = self.stats.topics_too_deep.fetch_add(1, Ordering::Relaxed) + 1;
        if n == 1 || n.is_multiple_of(1000) {
            warn!(%client, what, max_topic_levels = self.config.max_topic_levels, refused_so_far = n, "topic with too many levels refused");
        }
    }

    /// Queue the retained messages matching `filter` for `session` (after
    /// SUBACK), with the subscription's QoS and identifier.
    pub async fn deliver_retained(
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
        let mut batch = Routed {
            ops: Vec::new(),
            pending: Vec::new(),
            matched: false,
        };
        for mut m in retained {
            if m.is_expired(now) {
                continue;
            }
            if m.id == 0 {
                // Stored by an older broker without an id: the packet store needs one.
                let mut fresh = (*m).clone();
                fresh.id = self.next_message_id.fetch_add(1, Ordering::Relaxed);
                m = Arc::new(fresh);
            }
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

    /// Unsubscribe a session from `filters`. Messages a shared subscription
    /// queued for it and not yet sent go to the group's other members.
    pub async fn unsubscribe(
        &self,
        session: &Arc<Session>,
        filters: Vec<String>,
    ) -> StorageResult<Vec<Unsubscribed>> {
        let mut outcomes = Vec::with_capacity(filters.len());
        let mut removed = Vec::new();
        let persistent = {
            let mut trie = self.trie.write();
            let mut st = session.lock();
            for f in filters {
                let max_levels = self.config.max_topic_levels;
                if topic::parse_shared(&f)
                    .ok()
                    .and_then(|s| {
                        let inner = s.map_or(f.as_str(), |s| s.filter);
                        topic::validate_filter(inner)
                            .and_then(|_| topic::check_levels(inner, max_levels))
                            .ok()
                    })
                    .is_none()
                {
                    outcomes.push(Unsubscribed::InvalidFilter);
                    continue;
                }
                remove_subscription(&mut trie, &f, &session.client_id);
                if st.subscriptions.remove(&f).is_some() {
                    outcomes.push(Unsubscribed::Removed);
                    removed.push(f);
                } else {
                    outcomes.push(Unsubscribed::NotSubscribed);
                }
            }
            st.persistent
        };
        if persistent && !removed.is_empty() {
            self.storage
                .subscriptions
                .remove_subscriptions(&session.client_id, &removed)
                .await?;
        }
        let left: Vec<&String> = removed
            .iter()
            .filter(|f| f.starts_with("$share/"))
            .collect();
        if !left.is_empty() {
            self.redistribute(session, |g| left.iter().any(|f| f.as_str() == g), false)
                .await?;
        }
        Ok(outcomes)
    }

    /// Admit a newly accepted connection (`max_connections`,
    /// `max_connection_rate`); the permit is held for the connection's life.
    pub(crate) fn admit(&self) -> Result<Permit, Refused> {
        self.admission.try_admit()
    }

    /// Client connections open now (admitted and not yet closed).
    pub fn connections_open(&self) -> usize {
        self.admission.open()
    }

    /// Serve a client connection on a task that [`Broker::shutdown`] waits for.
    pub fn spawn_connection<F>(&self, connection: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.connections.spawn(connection);
    }

    /// Stop: close every connection (they publish their wills), then wait
    /// for storage writes in progress.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.connections.close();
        self.connections.wait().await;
        self.commits.close();
        self.commits.wait().await;
        // Acknowledgements' removals are submitted without waiting for them;
        // the queue is first in, first out, so once this empty request is
        // answered every write before it is in the store.
        let _ = self.writer.submit(Vec::new()).await;
    }
}

/// Put a session's subscription to `filter` in the trie: under the filter
/// itself, or under the inner filter of a shared subscription.
fn insert_subscription(
    trie: &mut SubscriptionTree<SubscriberKey, Subscriber>,
    filter: &str,
    shared: Option<SharedFilter<'_>>,
    session: &Arc<Session>,
    options: &SubscriptionOptions,
) {
    let share: Option<Arc<str>> = shared.map(|_| Arc::from(filter));
    let key = SubscriberKey {
        client: session.client_id.clone(),
        share: share.clone(),
    };
    let subscriber = Subscriber {
        session: session.clone(),
        options: options.clone(),
        share,
    };
    trie.insert(shared.map_or(filter, |s| s.filter), key, subscriber);
}

/// Take a session's subscription to `filter` out of the trie.
fn remove_subscription(
    trie: &mut SubscriptionTree<SubscriberKey, Subscriber>,
    filter: &str,
    client: &ClientId,
) {
    let shared = topic::parse_shared(filter).ok().flatten();
    let key = SubscriberKey {
        client: client.clone(),
        share: shared.map(|_| Arc::from(filter)),
    };
    trie.remove(shared.map_or(filter, |s| s.filter), &key);
}

/// How `message` goes to a subscriber: QoS capped by the grant, the retain
/// flag kept only with Retain As Published, the subscription's identifier.
fn delivery_for(sub: &Subscriber, message: &Message) -> Delivery {
    Delivery {
        qos: sub.options.qos.min(message.qos),
        retain: message.retain && sub.options.retain_as_published,
        subscription_ids: sub.options.subscription_id.into_iter().collect(),
        share: sub.share.as_deref().map(str::to_owned),
    }
}
