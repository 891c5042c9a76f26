//! The embedding API: [`Broker::builder`] takes the settings, the storage,
//! the hooks and the listeners, and [`Broker`] is the handle the
//! application keeps: server-side publish, in-process clients, events,
//! statistics, shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::broker::{Core, Origin};
use crate::client::{Client, ClientOptions};
use crate::config::{BrokerConfig, ConfigError, SysConfig};
use crate::events::{Event, EventStream};
use crate::hooks::{Authenticate, Authorize, ClientInfo, EnhancedAuth, Hooks, ProtocolVersion};
use crate::link::AttachError;
use crate::message::{Message, QoS};
use crate::metrics::{self, HistogramSnapshot};
use crate::server::Server;
use crate::session::Session;
use crate::storage::{Storage, StorageError};
use crate::topic::{self, TopicError};

/// Why the broker did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A setting is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// No storage was given to the builder.
    #[error("no storage given (BrokerBuilder::storage)")]
    NoStorage,
    /// The store could not be read at start.
    #[error("cannot restore sessions from storage")]
    Storage(#[from] StorageError),
    /// A listener could not bind.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// The error of the bind.
        #[source]
        source: std::io::Error,
    },
}

/// Why a server-side publish failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Not a valid topic name.
    #[error("invalid topic: {0}")]
    InvalidTopic(#[from] TopicError),
    /// The store failed; the message was not accepted.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Builds and starts a [`Broker`].
///
/// ```
/// # async fn run() -> Result<(), broker_core::StartError> {
/// use broker_core::{config::BrokerConfig, storage::Storage, Broker};
/// let storage = Storage::from_backend(std::sync::Arc::new(storage_memory::MemoryStore::new()));
/// let broker = Broker::builder()
///     .config(BrokerConfig { max_inflight: 64, ..BrokerConfig::default() })
///     .storage(storage)
///     .listen("127.0.0.1:0")
///     .start()
///     .await?;
/// println!("MQTT on {:?}", broker.local_addrs());
/// broker.shutdown().await;
/// # Ok(()) }
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(run()).unwrap();
/// ```
#[derive(Default)]
#[must_use = "a builder does nothing until started"]
pub struct BrokerBuilder {
    config: BrokerConfig,
    sys: SysConfig,
    storage: Option<Storage>,
    hooks: Hooks,
    listen: Vec<String>,
}

impl std::fmt::Debug for BrokerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerBuilder")
            .field("config", &self.config)
            .field("sys", &self.sys)
            .field("hooks", &self.hooks)
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

impl BrokerBuilder {
    /// The broker's settings (default: [`BrokerConfig::default`]).
    pub fn config(mut self, config: BrokerConfig) -> Self {
        self.config = config;
        self
    }

    /// The `$SYS` settings (default: on, every 10 s).
    pub fn sys(mut self, sys: SysConfig) -> Self {
        self.sys = sys;
        self
    }

    /// Where sessions, queues and retained messages live (required).
    pub fn storage(mut self, storage: Storage) -> Self {
        self.storage = Some(storage);
        self
    }

    /// Every hook at once.
    pub fn hooks(mut self, hooks: Hooks) -> Self {
        self.hooks = hooks;
        self
    }

    /// Who may connect.
    pub fn authenticate(mut self, hook: impl Authenticate) -> Self {
        self.hooks.authenticate = Some(Arc::new(hook));
        self
    }

    /// What clients may publish, subscribe to and receive.
    pub fn authorize(mut self, hook: impl Authorize) -> Self {
        self.hooks.authorize = Some(Arc::new(hook));
        self
    }

    /// MQTT 5 enhanced authentication.
    pub fn enhanced_auth(mut self, hook: impl EnhancedAuth) -> Self {
        self.hooks.enhanced_auth = Some(Arc::new(hook));
        self
    }

    /// Serve MQTT over TCP on `addr` (may be given several times; port 0
    /// picks a free port, see [`Broker::local_addrs`]).
    pub fn listen(mut self, addr: impl Into<String>) -> Self {
        self.listen.push(addr.into());
        self
    }

    /// Restore the stored sessions, start the listeners, and serve.
    pub async fn start(self) -> Result<Broker, StartError> {
        self.config.validate()?;
        let storage = self.storage.ok_or(StartError::NoStorage)?;
        let core = Core::start(self.config, self.sys, storage, self.hooks).await?;
        let mut broker = Broker {
            core: core.clone(),
            addrs: Arc::new(Vec::new()),
        };
        let mut addrs = Vec::new();
        for addr in self.listen {
            let server = match Server::bind(broker.clone(), addr.as_str()).await {
                Ok(s) => s,
                Err(source) => {
                    core.shutdown().await;
                    return Err(StartError::Bind { addr, source });
                }
            };
            if let Ok(a) = server.local_addr() {
                addrs.push(a);
            }
            tokio::spawn(server.run());
        }
        broker.addrs = Arc::new(addrs);
        crate::sys::start(&core).await;
        core.events().emit(|| Event::Ready);
        Ok(broker)
    }
}

/// A snapshot of the broker's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatsSnapshot {
    /// Messages accepted for routing (clients, wills, the application, `$SYS`).
    pub published: u64,
    /// Of those, the ones published by clients.
    pub received: u64,
    /// Deliveries handed to clients.
    pub sent: u64,
    /// Bytes read from clients' sockets.
    pub bytes_received: u64,
    /// Bytes written to clients' sockets.
    pub bytes_sent: u64,
    /// Messages a session's queue limits refused or evicted.
    pub dropped: u64,
    /// Of those, by `max_queued_bytes`.
    pub dropped_bytes_limit: u64,
    /// Subscriptions refused by `max_subscriptions_per_client`.
    pub subscriptions_refused: u64,
    /// Topics and filters refused by `max_topic_levels`.
    pub topics_too_deep: u64,
    /// Connections refused at accept by `max_connections`.
    pub connections_over_limit: u64,
    /// Connections refused at accept by `max_connection_rate`.
    pub connections_over_rate: u64,
    /// Store writes that failed.
    pub storage_errors: u64,
    /// Reads of a page of a stored queue that failed (each is retried).
    pub page_read_errors: u64,
    /// Clients attached now.
    pub clients_connected: u64,
    /// The most clients attached at once.
    pub clients_maximum: u64,
    /// Clients the authentication hook refused.
    pub authentication_failures: u64,
    /// Connections refused because their address failed too many authentications.
    pub authentication_throttled: u64,
    /// Requests the authorization hook denied.
    pub authorization_denials: u64,
    /// Hook calls that timed out, failed or panicked.
    pub hook_failures: u64,
    /// Events dropped because a listener was full.
    pub events_dropped: u64,
}

/// What the broker knows of one session.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionInfo {
    /// The client id.
    pub client_id: String,
    /// A connection is attached.
    pub online: bool,
    /// It survives its connection.
    pub persistent: bool,
    /// Seconds it outlives its connection (`None`: never).
    pub expiry_secs: Option<u64>,
    /// Messages queued, in flight included.
    pub queued: usize,
    /// Of those, the ones still in the store only (restored at start and
    /// not read yet: read page by page once the client is back).
    pub queued_in_store: usize,
    /// Bytes charged for the queued messages in memory.
    pub queued_bytes: usize,
    /// Deliveries sent and not yet acknowledged.
    pub in_flight: usize,
    /// Its subscriptions' filters, sorted.
    pub subscriptions: Vec<String>,
    /// Its subscriptions with the QoS granted, sorted by filter.
    pub subscription_qos: Vec<(String, QoS)>,
    /// Who is connected, while online.
    pub client: Option<Arc<ClientInfo>>,
    /// When the connection attached (ms since the Unix epoch), while online.
    pub connected_at_ms: Option<u64>,
    /// When the last connection ended (ms since the Unix epoch), while offline.
    pub disconnected_at_ms: Option<u64>,
}

/// Everything [`Broker::metrics`] reports: the counters of [`StatsSnapshot`],
/// counters by label, gauges read from the sessions, and histograms.
/// Labels are stable names (`snake_case`) for an exporter to use as is.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Metrics {
    /// The plain counters.
    pub stats: StatsSnapshot,
    /// Messages published by clients, by QoS (index 0, 1, 2).
    pub messages_in: [u64; 3],
    /// PUBLISH packets sent to clients, by QoS.
    pub messages_out: [u64; 3],
    /// Network CONNECTs by outcome: `accepted`, `protocol_error`,
    /// `bad_credentials`, `not_authorized`, `throttled`, `server_unavailable`.
    pub connects: Vec<(&'static str, u64)>,
    /// Ended network connections by reason: `normal`, `with_will`,
    /// `connection_lost`, `keep_alive_timeout`, `taken_over`, `kicked`,
    /// `shutdown`, `write_failed`, `protocol_error`, `storage_error`.
    pub disconnects: Vec<(&'static str, u64)>,
    /// Messages not delivered to a subscriber, by reason: `queue_full`,
    /// `queue_bytes`, `packet_too_large`.
    pub drops: Vec<(&'static str, u64)>,
    /// Clients connected now, by listener and protocol (`3`, `5`, `internal`).
    pub connections: Vec<(String, &'static str, u64)>,
    /// Sessions with a connection attached.
    pub sessions_online: u64,
    /// Sessions held without one.
    pub sessions_offline: u64,
    /// Messages queued in every session (in flight included).
    pub queued_messages: u64,
    /// Of those, the ones still in the store only (not read since the start).
    pub queued_in_store: u64,
    /// Bytes charged for the queued messages in memory.
    pub queued_bytes: u64,
    /// Deliveries sent and not yet acknowledged.
    pub in_flight: u64,
    /// Operations per packet-store batch.
    pub commit_batch_ops: HistogramSnapshot,
    /// Seconds per packet-store batch write.
    pub commit_seconds: HistogramSnapshot,
    /// Seconds per hook call, by hook (`authenticate`, `authorize_publish`,
    /// `authorize_subscribe`, `authorize_delivery`, `other`).
    pub hook_seconds: Vec<(&'static str, HistogramSnapshot)>,
}

/// A protocol's label in [`Metrics::connections`].
fn protocol_label(p: ProtocolVersion) -> &'static str {
    match p {
        ProtocolVersion::V3 => "3",
        ProtocolVersion::V5 => "5",
        ProtocolVersion::Internal => "internal",
    }
}

/// Why an operator's request ([`Broker::retained`], [`Broker::delete_retained`]) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The topic filter is not valid: the caller's mistake.
    #[error(transparent)]
    Filter(#[from] TopicError),
    /// The store failed: try again later.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

fn by_qos(counts: Vec<(&'static str, u64)>) -> [u64; 3] {
    let mut out = [0; 3];
    for (slot, (_, n)) in out.iter_mut().zip(counts) {
        *slot = n;
    }
    out
}

fn session_info(s: &Session) -> SessionInfo {
    let st = s.lock();
    let mut subscription_qos: Vec<(String, QoS)> = st
        .subscriptions()
        .iter()
        .map(|(f, o)| (f.clone(), o.qos))
        .collect();
    subscription_qos.sort();
    SessionInfo {
        client_id: s.client_id.to_string(),
        online: st.is_online(),
        persistent: st.persistent(),
        expiry_secs: st.expiry_secs(),
        queued: st.queue_len(),
        queued_in_store: st.unread_len(),
        queued_bytes: st.queued_bytes(),
        in_flight: st.in_flight(),
        subscriptions: subscription_qos.iter().map(|(f, _)| f.clone()).collect(),
        subscription_qos,
        client: st.connection().map(|c| c.client.clone()),
        connected_at_ms: st.connection().map(|c| c.connected_at_ms),
        disconnected_at_ms: st.disconnected_at_ms(),
    }
}

/// A running broker: cheap to clone, every clone the same broker.
#[derive(Clone, Debug)]
pub struct Broker {
    core: Arc<Core>,
    addrs: Arc<Vec<SocketAddr>>,
}

impl Broker {
    /// A builder.
    pub fn builder() -> BrokerBuilder {
        BrokerBuilder::default()
    }

    /// Start with `config` on `storage`, no hooks, no listener (see [`Server`]).
    pub async fn start(config: BrokerConfig, storage: Storage) -> Result<Broker, StartError> {
        Self::start_with(config, storage, Hooks::default()).await
    }

    /// [`Broker::start`] with the application's [`Hooks`].
    pub async fn start_with(
        config: BrokerConfig,
        storage: Storage,
        hooks: Hooks,
    ) -> Result<Broker, StartError> {
        Broker::builder()
            .config(config)
            .storage(storage)
            .hooks(hooks)
            .start()
            .await
    }

    pub(crate) fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// The settings.
    pub fn config(&self) -> &BrokerConfig {
        self.core.config()
    }

    /// The addresses the builder's listeners bound.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Publish from the server (Mosca's `server.publish`): routed like a
    /// client's message, retained if asked, any QoS and MQTT 5 properties.
    /// Returns once a QoS 1/2 message is durable for every persistent
    /// session it was queued for. Not subject to publish authorization.
    ///
    /// ```
    /// # async fn run(broker: broker_core::Broker) -> Result<(), broker_core::PublishError> {
    /// use broker_core::message::{Message, QoS};
    /// let mut m = Message::new("chat/alice", "hello", QoS::AtLeastOnce, false);
    /// m.properties.content_type = Some("text/plain".into());
    /// broker.publish(m).await?;
    /// # Ok(()) }
    /// ```
    pub async fn publish(&self, message: Message) -> Result<(), PublishError> {
        topic::validate_name(&message.topic)?;
        let accepted = self.core.publish(message, &Origin::Internal, None).await?;
        accepted.committed.await?;
        Ok(())
    }

    /// Attach an in-process client (authentication applies as to any client).
    pub async fn connect(&self, options: ClientOptions) -> Result<Client, AttachError> {
        Client::attach(&self.core, options).await
    }

    /// A stream of events with room for `capacity` of them: a listener that
    /// falls behind loses events (counted), never slows the broker. It
    /// starts with [`Event::Ready`].
    pub fn events(&self, capacity: usize) -> EventStream {
        let first = (!self.core.shutdown_token().is_cancelled()).then_some(Event::Ready);
        self.core.events().subscribe(capacity, true, first)
    }

    /// The counters now.
    pub fn stats(&self) -> StatsSnapshot {
        let s = self.core.stats();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            published: get(&s.published),
            received: get(&s.received),
            sent: get(&s.sent),
            bytes_received: get(&s.bytes_received),
            bytes_sent: get(&s.bytes_sent),
            dropped: get(&s.dropped),
            dropped_bytes_limit: get(&s.dropped_bytes_limit),
            subscriptions_refused: get(&s.subscriptions_refused),
            topics_too_deep: get(&s.topics_too_deep),
            connections_over_limit: get(&s.connections_over_limit),
            connections_over_rate: get(&s.connections_over_rate),
            storage_errors: get(&s.storage_errors),
            page_read_errors: get(&s.page_read_errors),
            clients_connected: get(&s.clients_connected),
            clients_maximum: get(&s.clients_maximum),
            authentication_failures: get(&s.authentication_failures),
            authentication_throttled: get(&s.authentication_throttled),
            authorization_denials: get(&s.authorization_denials),
            hook_failures: get(&s.hook_failures),
            events_dropped: self.core.events().dropped(),
        }
    }

    /// Counters by label, gauges and histograms, for an exporter
    /// (the `broker` binary renders them for Prometheus). The gauges walk
    /// every session, one lock at a time: call it per scrape, not per message.
    pub fn metrics(&self) -> Metrics {
        let s = self.core.stats();
        let mut m = Metrics {
            stats: self.stats(),
            messages_in: by_qos(s.messages_in.read(&["0", "1", "2"])),
            messages_out: by_qos(s.messages_out.read(&["0", "1", "2"])),
            connects: s.connects.read(&metrics::CONNECT_LABELS),
            disconnects: s.disconnects.read(&metrics::DISCONNECT_LABELS),
            drops: s.drops.read(&metrics::DROP_LABELS),
            connections: Vec::new(),
            sessions_online: 0,
            sessions_offline: 0,
            queued_messages: 0,
            queued_in_store: 0,
            queued_bytes: 0,
            in_flight: 0,
            commit_batch_ops: s.histograms.commit_ops.snapshot(1.0),
            commit_seconds: s.histograms.commit_us.snapshot(1e6),
            hook_seconds: metrics::HOOK_LABELS
                .iter()
                .zip(&s.histograms.hook_us)
                .map(|(name, h)| (*name, h.snapshot(1e6)))
                .collect(),
        };
        let mut connections: std::collections::BTreeMap<(Arc<str>, &'static str), u64> =
            Default::default();
        for session in self.core.all_sessions() {
            let st = session.lock();
            match st.connection() {
                Some(c) => {
                    m.sessions_online += 1;
                    let key = (c.client.listener.clone(), protocol_label(c.client.protocol));
                    *connections.entry(key).or_default() += 1;
                }
                None => m.sessions_offline += 1,
            }
            m.queued_messages += st.queue_len() as u64;
            m.queued_in_store += st.unread_len() as u64;
            m.queued_bytes += st.queued_bytes() as u64;
            m.in_flight += st.in_flight() as u64;
        }
        m.connections = connections
            .into_iter()
            .map(|((listener, protocol), n)| (listener.to_string(), protocol, n))
            .collect();
        m
    }

    /// What the broker knows of `client_id`'s session, if it has one.
    pub fn session(&self, client_id: &str) -> Option<SessionInfo> {
        let s = self.core.session(client_id)?;
        Some(session_info(&s))
    }

    /// Every session held, online and offline, sorted by client id. With
    /// many sessions prefer [`Broker::sessions_page`].
    pub fn sessions(&self) -> Vec<SessionInfo> {
        self.sessions_page(None, usize::MAX, None).0
    }

    /// Up to `limit` sessions with a client id after `after`, in client-id
    /// order, only the connected (or only the offline) ones if `connected`
    /// says; and the client id to continue after when there are more.
    /// Costs a sort of the client ids, and the details of the page only.
    ///
    /// ```
    /// # fn run(broker: broker_core::Broker) {
    /// let mut after = None;
    /// loop {
    ///     let (page, next) = broker.sessions_page(after.as_deref(), 1000, Some(false));
    ///     for s in &page {
    ///         println!("{} offline, {} queued", s.client_id, s.queued);
    ///     }
    ///     match next {
    ///         Some(id) => after = Some(id),
    ///         None => break,
    ///     }
    /// }
    /// # }
    /// ```
    pub fn sessions_page(
        &self,
        after: Option<&str>,
        limit: usize,
        connected: Option<bool>,
    ) -> (Vec<SessionInfo>, Option<String>) {
        let mut all = self.core.all_sessions();
        all.sort_unstable_by(|a, b| a.client_id.cmp(&b.client_id));
        let start = after.map_or(0, |a| all.partition_point(|s| &*s.client_id <= a));
        let mut page = Vec::new();
        for s in &all[start..] {
            if connected.is_some_and(|c| s.lock().is_online() != c) {
                continue;
            }
            if page.len() == limit {
                let next = page.last().map(|p: &SessionInfo| p.client_id.clone());
                return (page, next);
            }
            page.push(session_info(s));
        }
        (page, None)
    }

    /// Close `client_id`'s network connection as an operator would: an
    /// MQTT 5 client gets DISCONNECT 0x98 (administrative action), its will
    /// is published, a persistent session stays. False when it is not
    /// connected. An in-process client's `recv` returns `None` and it
    /// detaches when the application drops it.
    pub fn kick(&self, client_id: &str) -> bool {
        self.core
            .session(client_id)
            .is_some_and(|s| s.lock().kick())
    }

    /// Delete `client_id`'s session: kick its connection if any (as
    /// [`Broker::kick`]), then remove its subscriptions and queue, in memory
    /// and in the store. False when there was no session.
    pub async fn delete_session(&self, client_id: &str) -> Result<bool, StorageError> {
        self.core.delete_session(client_id).await
    }

    /// Retained messages whose topic matches `filter`, sorted by topic.
    /// `#` does not match `$` topics (MQTT's rule): ask `$SYS/#` for those.
    pub async fn retained(&self, filter: &str) -> Result<Vec<Arc<Message>>, AdminError> {
        topic::validate_filter(filter)?;
        let mut found = self.core.storage().retained.lookup_retained(filter).await?;
        found.sort_by(|a, b| a.topic.cmp(&b.topic));
        Ok(found)
    }

    /// Delete the retained messages whose topic matches `filter`; returns
    /// how many there were.
    pub async fn delete_retained(&self, filter: &str) -> Result<usize, AdminError> {
        let found = self.retained(filter).await?;
        for m in &found {
            self.core
                .storage()
                .retained
                .delete_retained(&m.topic)
                .await?;
        }
        Ok(found.len())
    }

    /// Whether the storage answers now (a cheap read), for readiness probes.
    pub async fn check_storage(&self) -> Result<(), StorageError> {
        self.core
            .storage()
            .retained
            .lookup_retained("$broker/readiness-probe")
            .await
            .map(drop)
    }

    /// Sessions held, online and offline.
    pub fn session_count(&self) -> usize {
        self.core.session_count()
    }

    /// Client connections open now (admitted and not yet closed).
    pub fn connections_open(&self) -> usize {
        self.core.connections_open()
    }

    /// Stop: close every connection (their wills are published), finish
    /// the storage writes in progress, end the event streams.
    pub async fn shutdown(&self) {
        self.core.shutdown().await;
    }
}
