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
use crate::hooks::{Authenticate, Authorize, EnhancedAuth, Hooks};
use crate::link::AttachError;
use crate::message::Message;
use crate::server::Server;
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
    /// Bytes charged for them.
    pub queued_bytes: usize,
    /// Deliveries sent and not yet acknowledged.
    pub in_flight: usize,
    /// Its subscriptions' filters, sorted.
    pub subscriptions: Vec<String>,
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
            clients_connected: get(&s.clients_connected),
            clients_maximum: get(&s.clients_maximum),
            authentication_failures: get(&s.authentication_failures),
            authentication_throttled: get(&s.authentication_throttled),
            authorization_denials: get(&s.authorization_denials),
            hook_failures: get(&s.hook_failures),
            events_dropped: self.core.events().dropped(),
        }
    }

    /// What the broker knows of `client_id`'s session, if it has one.
    pub fn session(&self, client_id: &str) -> Option<SessionInfo> {
        let s = self.core.session(client_id)?;
        let st = s.lock();
        let mut subscriptions: Vec<String> = st.subscriptions().keys().cloned().collect();
        subscriptions.sort();
        Some(SessionInfo {
            client_id: client_id.to_string(),
            online: st.is_online(),
            persistent: st.persistent(),
            expiry_secs: st.expiry_secs(),
            queued: st.queue_len(),
            queued_bytes: st.queued_bytes(),
            in_flight: st.in_flight(),
            subscriptions,
        })
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
