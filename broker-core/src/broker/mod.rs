//! The broker's state, behind the boundary ([`crate::link`]): nothing
//! outside this crate reaches it, and inside the crate only the link and
//! the broker's own tasks (wills, expiry, `$SYS`) do.
//!
//! One file per concern, all on [`Core`]:
//! - [`registry`]: the sessions by client id; attach with takeover, detach, discard;
//! - [`expiry`]: offline sessions discarded when their deadline passes (a deadline queue);
//! - [`wills`]: wills published after their delay, unless the client comes back;
//! - [`routing`]: matching a message against the subscription trie (shared
//!   subscriptions included) and queueing it for each session in one store batch;
//! - [`subscriptions`]: subscribe and unsubscribe, with the broker's limits;
//! - [`retained`]: retained messages, and their delivery on subscribe;
//! - [`restore`]: sessions and subscriptions read back at start, queues' bounds only;
//! - [`paging`]: stored queues read in page by page as their clients drain them.
//!
//! The publish path is split in two so that ordering never depends on storage
//! latency: [`Core::route`] runs synchronously, in the publisher's packet
//! order, and assigns each matching session its next sequence number;
//! [`Core::commit`] then writes the batch to the packet store and, once it
//! has committed, releases the entries for delivery. The publisher's
//! acknowledgement waits for the commit.

mod expiry;
pub(crate) mod paging;
mod registry;
mod restore;
mod retained;
mod routing;
pub(crate) mod subscriptions;
mod wills;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;
use futures::FutureExt;
use parking_lot::{Mutex, RwLock};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{Admission, Permit, Refused};
use crate::auth_throttle::AuthThrottle;
use crate::config::{BrokerConfig, SysConfig};
use crate::events::{Event, EventBus};
use crate::group_commit::GroupCommit;
use crate::hooks::Hooks;
use crate::message::MessageId;
use crate::metrics::{self, Histograms, LabeledCounter};
use crate::session::Session;
use crate::storage::{ClientId, PacketOp, Storage, StorageError, StorageResult};
use crate::trie::SubscriptionTree;

pub(crate) use expiry::ExpiryQueue;
pub use routing::SubscriberKey;
pub(crate) use routing::{Origin, Routed, Subscriber};
pub use subscriptions::SubscribeRefusal;
pub(crate) use subscriptions::{Granted, Unsubscribed};
pub(crate) use wills::Will;

/// Stripes of the per-client lifecycle lock (connect, disconnect, expiry).
const LIFECYCLE_STRIPES: usize = 64;
/// How long a new connection waits for the one it takes over to close.
const TAKEOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

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

/// Counters, bumped with relaxed atomics where things happen; read as a
/// [`StatsSnapshot`](crate::StatsSnapshot).
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Messages accepted for routing, from clients and from the server.
    pub(crate) published: AtomicU64,
    /// Of those, the ones published by clients (`$SYS/broker/messages/received`).
    pub(crate) received: AtomicU64,
    /// PUBLISH packets handed to clients (`$SYS/broker/messages/sent`).
    pub(crate) sent: AtomicU64,
    /// Bytes read from clients' sockets.
    pub(crate) bytes_received: AtomicU64,
    /// Bytes written to clients' sockets.
    pub(crate) bytes_sent: AtomicU64,
    /// Messages refused or evicted by a session queue limit (either).
    pub(crate) dropped: AtomicU64,
    /// Of those, the ones refused or evicted by `max_queued_bytes`.
    pub(crate) dropped_bytes_limit: AtomicU64,
    /// Subscriptions refused by `max_subscriptions_per_client`.
    pub(crate) subscriptions_refused: AtomicU64,
    /// Topic names and filters refused by `max_topic_levels`.
    pub(crate) topics_too_deep: AtomicU64,
    /// Connections closed at accept by `max_connections`.
    pub(crate) connections_over_limit: AtomicU64,
    /// Connections closed at accept by `max_connection_rate`.
    pub(crate) connections_over_rate: AtomicU64,
    /// Storage writes that failed.
    pub(crate) storage_errors: AtomicU64,
    /// Reads of a stored queue's page that failed (each is retried).
    pub(crate) page_read_errors: AtomicU64,
    /// Clients attached now.
    pub(crate) clients_connected: AtomicU64,
    /// The most clients attached at once.
    pub(crate) clients_maximum: AtomicU64,
    /// Connections refused by the authentication hook.
    pub(crate) authentication_failures: AtomicU64,
    /// Connections refused because their address failed too many authentications.
    pub(crate) authentication_throttled: AtomicU64,
    /// Publishes, subscriptions and deliveries the authorization hook denied.
    pub(crate) authorization_denials: AtomicU64,
    /// Hook calls that timed out, failed or panicked (and so refused).
    pub(crate) hook_failures: AtomicU64,
    /// Messages published by clients, by QoS (0, 1, 2).
    pub(crate) messages_in: LabeledCounter<3>,
    /// PUBLISH packets handed to clients, by QoS.
    pub(crate) messages_out: LabeledCounter<3>,
    /// CONNECTs by outcome (`metrics::CONNECT_LABELS`).
    pub(crate) connects: LabeledCounter<{ metrics::CONNECT_LABELS.len() }>,
    /// Ended connections by reason (`metrics::DISCONNECT_LABELS`).
    pub(crate) disconnects: LabeledCounter<{ metrics::DISCONNECT_LABELS.len() }>,
    /// Messages not delivered to a subscriber, by reason (`metrics::DROP_LABELS`).
    pub(crate) drops: LabeledCounter<{ metrics::DROP_LABELS.len() }>,
    /// Store batch sizes and write times, hook latencies.
    pub(crate) histograms: Arc<Histograms>,
}

impl Stats {
    pub(crate) fn bump(counter: &AtomicU64) -> u64 {
        counter.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// The broker's state: shared by every link.
pub(crate) struct Core {
    config: BrokerConfig,
    sys: SysConfig,
    storage: Storage,
    hooks: Hooks,
    sessions: Mutex<HashMap<ClientId, Arc<Session>>>,
    trie: RwLock<SubscriptionTree<SubscriberKey, Subscriber>>,
    /// Round-robin position per shared subscription.
    share_cursors: Mutex<HashMap<Arc<str>, usize>>,
    lifecycle: Vec<tokio::sync::Mutex<()>>,
    expiry: Arc<ExpiryQueue>,
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
    /// Failed authentications per peer address.
    auth_throttle: AuthThrottle,
    shutdown: CancellationToken,
    events: EventBus,
    started: Instant,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Core {
    /// Start on `storage`, restoring every stored session, its
    /// subscriptions and its queue; session expiry runs from now on.
    pub(crate) async fn start(
        config: BrokerConfig,
        sys: SysConfig,
        storage: Storage,
        hooks: Hooks,
    ) -> StorageResult<Arc<Core>> {
        let last_id = storage.packets.last_message_id().await?;
        let stats: Arc<Stats> = Arc::default();
        let admission = Admission::new(
            config.max_connections,
            config.max_connection_rate,
            stats.clone(),
        );
        let config_throttle = (config.auth_failure_limit, config.auth_failure_window_secs);
        let core = Arc::new(Core {
            writer: GroupCommit::start_measured(
                storage.packets.clone(),
                config.max_commit_batch,
                stats.histograms.clone(),
            ),
            config,
            sys,
            storage,
            hooks,
            sessions: Mutex::new(HashMap::new()),
            trie: RwLock::new(SubscriptionTree::new()),
            share_cursors: Mutex::new(HashMap::new()),
            lifecycle: (0..LIFECYCLE_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            expiry: Arc::default(),
            next_message_id: AtomicU64::new(last_id + 1),
            next_connection_id: AtomicU64::new(1),
            commits: TaskTracker::new(),
            connections: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            events: EventBus::default(),
            started: Instant::now(),
            admission,
            auth_throttle: AuthThrottle::new(
                config_throttle.0,
                std::time::Duration::from_secs(config_throttle.1),
                stats.clone(),
            ),
            stats,
        });
        core.restore().await?;
        core.restore_wills().await?;
        expiry::spawn(&core);
        Ok(core)
    }

    /// The settings.
    pub(crate) fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// The `$SYS` settings.
    pub(crate) fn sys_config(&self) -> &SysConfig {
        &self.sys
    }

    /// The storage.
    pub(crate) fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The application's hooks.
    pub(crate) fn hooks(&self) -> &Hooks {
        &self.hooks
    }

    /// The counters.
    pub(crate) fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Where events go.
    pub(crate) fn events(&self) -> &EventBus {
        &self.events
    }

    /// When the broker started.
    pub(crate) fn started(&self) -> Instant {
        self.started
    }

    /// Cancelled when the broker shuts down.
    pub(crate) fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// A fresh message id (wills take theirs at CONNECT, to name them in the store).
    pub(crate) fn next_message_id(&self) -> MessageId {
        self.next_message_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A fresh connection id.
    pub(crate) fn next_connection_id(&self) -> u64 {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The session of `client_id`, if any.
    pub(crate) fn session(&self, client_id: &str) -> Option<Arc<Session>> {
        self.sessions.lock().get(client_id).cloned()
    }

    /// Every session (a snapshot of the registry).
    pub(crate) fn all_sessions(&self) -> Vec<Arc<Session>> {
        self.sessions.lock().values().cloned().collect()
    }

    /// Number of sessions (online and offline).
    pub(crate) fn session_count(&self) -> usize {
        self.sessions.lock().len()
    }

    /// Queue packet-store operations for the next group commit, now, so that
    /// they reach the store in call order; the future resolves once they are
    /// durable. Dropping it does not cancel the write.
    pub(crate) fn submit(
        &self,
        ops: Vec<PacketOp>,
    ) -> impl std::future::Future<Output = StorageResult<()>> + Send + 'static {
        self.writer.submit(ops)
    }

    /// Submit a routed message's store write now (see [`Core::submit`]);
    /// the future resolves when its entries are released for delivery, or
    /// withdrawn if the write failed. The write and release run on a task
    /// of their own, so they complete even if the publisher goes away.
    pub(crate) fn commit(&self, routed: Routed) -> BoxFuture<'static, StorageResult<()>> {
        let (ops, pending) = routed.into_parts();
        if ops.is_empty() {
            routing::release(&pending, true);
            return futures::future::ready(Ok(())).boxed();
        }
        let write = self.writer.submit(ops);
        let stats = self.stats.clone();
        let handle = self.commits.spawn(async move {
            let result = write.await;
            routing::release(&pending, result.is_ok());
            if result.is_err() {
                stats.storage_errors.fetch_add(1, Ordering::Relaxed);
            }
            result
        });
        async move {
            handle.await.unwrap_or_else(|e| {
                Err(StorageError::backend("the commit task failed").with_source(e))
            })
        }
        .boxed()
    }

    /// Admit a newly accepted connection (`max_connections`,
    /// `max_connection_rate`); the permit is held for the connection's life.
    pub(crate) fn admit(&self) -> Result<Permit, Refused> {
        self.admission.try_admit()
    }

    /// The failed-authentication throttle.
    pub(crate) fn auth_throttle(&self) -> &AuthThrottle {
        &self.auth_throttle
    }

    /// Client connections open now (admitted and not yet closed).
    pub(crate) fn connections_open(&self) -> usize {
        self.admission.open()
    }

    /// Serve a client connection on a task that [`Core::shutdown`] waits for.
    pub(crate) fn spawn_connection<F>(&self, connection: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.connections.spawn(connection);
    }

    /// Run `work` on a task that shutdown waits for (wills, detaches).
    pub(crate) fn spawn_tracked<F>(&self, work: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.commits.spawn(work);
    }

    /// Stop: close every connection (they publish their wills), then wait
    /// for storage writes in progress.
    pub(crate) async fn shutdown(&self) {
        if !self.shutdown.is_cancelled() {
            self.events.emit(|| Event::ShuttingDown);
        }
        self.shutdown.cancel();
        self.connections.close();
        self.connections.wait().await;
        self.commits.close();
        self.commits.wait().await;
        // Acknowledgements' removals are submitted without waiting for them;
        // the queue is first in, first out, so once this empty request is
        // answered every write before it is in the store.
        let _ = self.writer.submit(Vec::new()).await;
        self.events.close();
    }
}
