//! Settings: command-line flags win over the TOML file, which wins over defaults.

use std::path::PathBuf;

use anyhow::{bail, Context};
use broker_core::config::{BrokerConfig, OverflowPolicy, SysConfig};
use broker_net::{is_loopback, ListenerConfig, Protocol};
use clap::{Parser, Subcommand};
use serde::Deserialize;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:1883";
/// Default storage URL: the embedded SQLite file when built in.
#[cfg(feature = "sqlite")]
pub const DEFAULT_STORAGE: &str = "sqlite://data/broker.db";
/// Default storage URL: the embedded SQLite file when built in.
#[cfg(not(feature = "sqlite"))]
pub const DEFAULT_STORAGE: &str = "memory://";

/// `broker --version`: the crate's version and the git revision built.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("BROKER_GIT_REVISION"),
    ")"
);

/// An MQTT broker with pluggable storage.
#[derive(Debug, Parser)]
#[command(version = VERSION, about)]
pub struct Cli {
    /// Something else than serving.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// TOML configuration file (same settings as the flags; flags win).
    #[arg(long, short = 'c', global = true)]
    pub config: Option<PathBuf>,
    /// Address to listen on for MQTT over TCP; repeat for several.
    #[arg(long)]
    pub listen: Vec<String>,
    /// Storage URL: sqlite://PATH (default sqlite://data/broker.db), memory://.
    #[arg(long)]
    pub storage: Option<String>,
    /// Unacknowledged QoS 1/2 deliveries per session.
    #[arg(long)]
    pub max_inflight: Option<usize>,
    /// Messages a session may hold queued.
    #[arg(long)]
    pub max_queued_messages: Option<usize>,
    /// What to do when a session queue is full: drop-new or drop-oldest.
    #[arg(long)]
    pub overflow_policy: Option<OverflowPolicy>,
    /// Queue QoS 0 messages for offline persistent sessions.
    #[arg(long)]
    pub queue_qos0_offline: Option<bool>,
    /// Seconds a persistent session outlives its connection (default: forever).
    #[arg(long)]
    pub session_expiry_secs: Option<u64>,
    /// Largest packet accepted, in bytes.
    #[arg(long)]
    pub max_packet_size: Option<u32>,
    /// Seconds a new connection has to send CONNECT.
    #[arg(long)]
    pub connect_timeout_secs: Option<u64>,
    /// Address of the HTTP listener for /metrics, /health, /ready and the
    /// admin API (`[http] bind`); none by default.
    #[arg(long, value_name = "ADDR")]
    pub http_listen: Option<String>,
    /// Threads that serve connections (`worker_threads`; default: one per
    /// CPU core).
    #[arg(long)]
    pub worker_threads: Option<usize>,
}

/// The subcommands; without one the broker serves.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check the configuration (`--config F` and the flags), the files it
    /// names and that the storage opens; say what the broker would listen on.
    Check,
    /// Create, update or delete a user of a password file (Mosquitto's format).
    Passwd {
        /// The password file (created if missing).
        file: PathBuf,
        /// The user name.
        user: String,
        /// Read the password from the first line of standard input instead of prompting.
        #[arg(long)]
        password_stdin: bool,
        /// Delete the user.
        #[arg(long, short = 'D')]
        delete: bool,
        /// Store an argon2id hash instead of Mosquitto's PBKDF2-SHA512 (`$7$`).
        #[arg(long)]
        argon2: bool,
    },
    /// List the persistent sessions of a storage, one line each: expiry,
    /// time of disconnect, subscriptions, queued messages, incoming QoS 2
    /// ids. Offline: a storage a running broker holds is refused.
    Sessions {
        /// The storage URL (default: the top-level `--storage`, the config
        /// file's `storage`, or the built-in default).
        #[arg(long)]
        storage: Option<String>,
        /// Only the session of this client id.
        #[arg(long)]
        client: Option<String>,
        /// Print a JSON array instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// List the retained messages of a storage: topic, QoS, payload size and
    /// a short preview. Offline, like `sessions`.
    Retained {
        /// The storage URL (default as for `sessions`).
        #[arg(long)]
        storage: Option<String>,
        /// Topic filter; repeat for several. `#` does not match topics that
        /// start with `$`, hence the second default.
        #[arg(long, default_values_t = default_retained_filters())]
        filter: Vec<String>,
        /// Print a JSON array instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Copy sessions, subscriptions, queued messages and retained messages
    /// from one storage to another (any two backends), then verify the
    /// copy. Both must be offline. An interrupted run is resumed by running
    /// the same command again.
    Migrate {
        /// The storage to copy from (left unchanged but for its lease).
        #[arg(long)]
        from: String,
        /// The storage to copy to: empty, or holding what an interrupted
        /// run of the same migration wrote.
        #[arg(long)]
        to: String,
        /// Filter of the retained messages to copy; repeat for several.
        /// Clients' retained messages on `$` topics other than `$SYS` need
        /// their own (e.g. `--retained-filter '#' --retained-filter '$app/#'`).
        #[arg(long = "retained-filter", default_values_t = default_retained_filters())]
        retained_filters: Vec<String>,
    },
}

/// Every retained message a filter can reach: `#` matches no topic that
/// starts with `$` (MQTT's rule, kept by every store's lookup), and the
/// broker's own such topics are under `$SYS`.
pub fn default_retained_filters() -> Vec<String> {
    vec!["#".to_owned(), "$SYS/#".to_owned()]
}

/// The `[auth]` table.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// A password file in Mosquitto's format (or made by `broker passwd`).
    pub password_file: Option<PathBuf>,
    /// An ACL file in Mosquitto's syntax.
    pub acl_file: Option<PathBuf>,
    /// URL deciding CONNECTs (see broker-http-hooks for the JSON).
    pub http_authenticate: Option<String>,
    /// URL deciding PUBLISHes.
    pub http_authorize_publish: Option<String>,
    /// URL deciding SUBSCRIBEs.
    pub http_authorize_subscribe: Option<String>,
    /// Milliseconds one HTTP call may take (default 2000); below `hook_timeout_ms`.
    pub http_timeout_ms: Option<u64>,
    /// Seconds an HTTP decision is remembered (default 60; 0 asks every time).
    pub http_cache_ttl_secs: Option<u64>,
    /// Bytes each HTTP decision cache may hold (default 16 MiB).
    pub http_cache_max_bytes: Option<usize>,
    /// HTTP calls outstanding at once (default 64).
    pub http_max_in_flight: Option<usize>,
    /// Headers sent with every HTTP call, e.g. `Authorization`.
    pub http_headers: std::collections::BTreeMap<String, String>,
}

impl AuthSettings {
    /// Whether anything verifies who a client is.
    pub fn authenticates(&self) -> bool {
        self.password_file.is_some() || self.http_authenticate.is_some()
    }

    /// The HTTP hooks' settings, if any URL is set.
    pub fn http(&self) -> Option<broker_http_hooks::HttpAuthConfig> {
        if self.http_authenticate.is_none()
            && self.http_authorize_publish.is_none()
            && self.http_authorize_subscribe.is_none()
        {
            return None;
        }
        let d = broker_http_hooks::HttpAuthConfig::default();
        Some(broker_http_hooks::HttpAuthConfig {
            authenticate: self.http_authenticate.clone(),
            authorize_publish: self.http_authorize_publish.clone(),
            authorize_subscribe: self.http_authorize_subscribe.clone(),
            timeout: self
                .http_timeout_ms
                .map_or(d.timeout, std::time::Duration::from_millis),
            cache_ttl: self
                .http_cache_ttl_secs
                .map_or(d.cache_ttl, std::time::Duration::from_secs),
            cache_max_bytes: self.http_cache_max_bytes.unwrap_or(d.cache_max_bytes),
            max_in_flight: self.http_max_in_flight.unwrap_or(d.max_in_flight),
            headers: self.http_headers.clone().into_iter().collect(),
        })
    }

    fn validate(&self, broker: &BrokerConfig) -> anyhow::Result<()> {
        if self.password_file.is_some() && self.http_authenticate.is_some() {
            bail!(
                "[auth] has both `password_file` and `http_authenticate`: one of them decides \
                 who connects; remove the other"
            );
        }
        if let Some(ms) = self.http_timeout_ms {
            if ms == 0 || ms >= broker.hook_timeout_ms {
                bail!(
                    "[auth] http_timeout_ms = {ms} must be at least 1 and below [broker] \
                     hook_timeout_ms ({}), so that a slow service is reported as such",
                    broker.hook_timeout_ms
                );
            }
        }
        Ok(())
    }
}

/// The `[webhook]` table: the broker's events, POSTed in batches.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// Where batches go.
    pub url: String,
    /// Which events (default: all but `message_delivered` and `message_acknowledged`).
    pub events: Option<Vec<String>>,
    /// Events per POST at most (default 100).
    pub batch_max: Option<usize>,
    /// Events waiting at most; more are dropped and counted (default 10,000).
    pub queue: Option<usize>,
    /// Tries after the first for one batch (default 5).
    pub max_retries: Option<u32>,
    /// Milliseconds one POST may take (default 5000).
    pub timeout_ms: Option<u64>,
    /// Headers sent with every POST, e.g. `Authorization`.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
}

impl WebhookSettings {
    /// As the library takes them.
    pub fn config(&self) -> broker_http_hooks::WebhookConfig {
        let mut c = broker_http_hooks::WebhookConfig::new(self.url.clone());
        if let Some(e) = &self.events {
            c.events = e.clone();
        }
        c.batch_max = self.batch_max.unwrap_or(c.batch_max);
        c.queue = self.queue.unwrap_or(c.queue);
        c.max_retries = self.max_retries.unwrap_or(c.max_retries);
        c.timeout = self
            .timeout_ms
            .map_or(c.timeout, std::time::Duration::from_millis);
        c.headers = self.headers.clone().into_iter().collect();
        c
    }
}

/// The TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    /// Listen addresses.
    pub listen: Option<Vec<String>>,
    /// Threads that serve connections (default: one per CPU core).
    pub worker_threads: Option<usize>,
    /// Storage URL.
    pub storage: Option<String>,
    /// Core settings (`[broker]` table).
    pub broker: BrokerConfig,
    /// `$SYS` topics (`[sys]` table).
    pub sys: SysConfig,
    /// Listeners (`[[listener]]` tables), beside the plain `listen` addresses.
    pub listener: Vec<ListenerConfig>,
    /// Authentication and authorization (`[auth]` table).
    pub auth: AuthSettings,
    /// Events posted to a URL (`[webhook]` table).
    pub webhook: Option<WebhookSettings>,
    /// Log format and the per-connection lines (`[log]` table).
    pub log: LogSettings,
    /// Metrics, probes and the admin API (`[http]` table).
    pub http: HttpSettings,
    /// Bridges to other brokers (`[[bridge]]` tables).
    pub bridge: Vec<BridgeSettings>,
    /// `[cluster]`: this node is one of several on one Redis.
    pub cluster: Option<ClusterSettings>,
}

/// The `[cluster]` table: several broker processes on one `redis://`
/// storage URL serve one MQTT service (see the README's "Cluster").
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    /// This node's name, unique in the cluster (letters, digits, `-`, `_`, `.`).
    pub node_id: String,
    /// The host (name or IP) the other nodes reach this node's listeners
    /// on. Default: each listener's own bind address, which must then not
    /// be a wildcard (`0.0.0.0`, `::`).
    pub advertise: Option<String>,
}

impl ClusterSettings {
    fn validate(&self, storage: &str, listeners: &[ListenerConfig]) -> anyhow::Result<()> {
        let id = &self.node_id;
        if id.is_empty()
            || id.len() > 64
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            bail!("[cluster] node_id `{id}` must be 1 to 64 letters, digits, `-`, `_` or `.`");
        }
        if !(storage.starts_with("redis://") || storage.starts_with("rediss://")) {
            bail!(
                "[cluster] needs a redis:// storage URL, the same on every node (storage is `{}`)",
                crate::storage_url::redact(storage)
            );
        }
        if self.advertise.as_deref() == Some("") {
            bail!("[cluster] advertise must name a host or an IP address");
        }
        if self.advertise.is_none() {
            for l in listeners {
                let wildcard = l
                    .bind
                    .parse::<std::net::SocketAddr>()
                    .is_ok_and(|a| a.ip().is_unspecified());
                if wildcard {
                    bail!(
                        "listener {} binds every address: set [cluster] advertise to the host \
                         the other nodes reach this one on",
                        l.bind
                    );
                }
            }
        }
        Ok(())
    }
}

/// A `[[bridge]]` table: a connection to another MQTT broker and the topics
/// relayed (Mosquitto's `connection` block).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeSettings {
    /// Unique among the bridges.
    pub name: String,
    /// `host:port` of the remote broker.
    #[serde(default)]
    pub address: String,
    /// `"3.1.1"` (default) or `"5"`.
    #[serde(default)]
    pub protocol_version: Option<String>,
    /// Client id on the remote (default `<name>-bridge`).
    #[serde(default)]
    pub client_id: Option<String>,
    /// User name on the remote.
    #[serde(default)]
    pub username: Option<String>,
    /// Password on the remote.
    #[serde(default)]
    pub password: Option<String>,
    /// TLS to the remote.
    #[serde(default)]
    pub tls: bool,
    /// CA certificates (PEM) for the remote's certificate (default: the system's).
    #[serde(default)]
    pub cafile: Option<PathBuf>,
    /// A new remote session on each connection (default false: persistent).
    #[serde(default)]
    pub clean_start: bool,
    /// Seconds between keep-alive pings (default 60).
    #[serde(default)]
    pub keep_alive_secs: Option<u16>,
    /// Messages sent to the remote and not yet acknowledged, at most (default 32).
    #[serde(default)]
    pub max_inflight: Option<u16>,
    /// Largest packet to or from the remote, bytes (default 1 MiB).
    #[serde(default)]
    pub max_packet_size: Option<u32>,
    /// The topics (`[[bridge.topic]]` tables).
    #[serde(default)]
    pub topic: Vec<BridgeTopicSettings>,
}

/// A `[[bridge.topic]]` table: Mosquitto's `topic pattern direction qos
/// local_prefix remote_prefix`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeTopicSettings {
    /// Topic filter, without the prefixes.
    pub pattern: String,
    /// `in`, `out` or `both` (default `out`, as Mosquitto).
    #[serde(default = "default_direction")]
    pub direction: BridgeDirection,
    /// 0, 1 or 2 (default 0, as Mosquitto).
    #[serde(default)]
    pub qos: u8,
    /// Prefix of the topic on this broker.
    #[serde(default)]
    pub local_prefix: String,
    /// Prefix of the topic on the remote broker.
    #[serde(default)]
    pub remote_prefix: String,
}

/// Which way a bridge topic goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BridgeDirection {
    /// Remote to local.
    In,
    /// Local to remote.
    Out,
    /// Both ways.
    Both,
}

fn default_direction() -> BridgeDirection {
    BridgeDirection::Out
}

impl BridgeSettings {
    /// As the bridge crate takes it, checked.
    pub fn config(&self) -> anyhow::Result<broker_bridge::BridgeConfig> {
        use broker_bridge::{BridgeConfig, Direction, MqttVersion, TopicConfig};
        let name = &self.name;
        let protocol = match self.protocol_version.as_deref() {
            None | Some("3.1.1") | Some("4") => MqttVersion::V311,
            Some("5") | Some("5.0") => MqttVersion::V5,
            Some(other) => bail!(
                "[[bridge]] `{name}`: protocol_version `{other}` is not supported: use \"3.1.1\" or \"5\""
            ),
        };
        let mut topics = Vec::with_capacity(self.topic.len());
        for (i, t) in self.topic.iter().enumerate() {
            let Some(qos) = broker_core::message::QoS::from_u8(t.qos) else {
                bail!(
                    "[[bridge]] `{name}`, topic {} (`{}`): qos = {} must be 0, 1 or 2",
                    i + 1,
                    t.pattern,
                    t.qos
                );
            };
            topics.push(TopicConfig {
                pattern: t.pattern.clone(),
                direction: match t.direction {
                    BridgeDirection::In => Direction::In,
                    BridgeDirection::Out => Direction::Out,
                    BridgeDirection::Both => Direction::Both,
                },
                qos,
                local_prefix: t.local_prefix.clone(),
                remote_prefix: t.remote_prefix.clone(),
            });
        }
        let mut c = BridgeConfig::new(name.clone(), self.address.clone());
        c.protocol = protocol;
        if let Some(id) = &self.client_id {
            c.client_id = id.clone();
        }
        c.username = self.username.clone();
        c.password = self.password.clone();
        c.tls = self.tls;
        c.cafile = self.cafile.clone();
        c.clean_start = self.clean_start;
        if let Some(v) = self.keep_alive_secs {
            c.keep_alive_secs = v;
        }
        if let Some(v) = self.max_inflight {
            c.max_inflight = v;
        }
        if let Some(v) = self.max_packet_size {
            c.max_packet_size = v;
        }
        c.topics = topics;
        if let Err(e) = c.validate() {
            bail!("[[bridge]] {e}");
        }
        Ok(c)
    }
}

/// Every `[[bridge]]` checked, names unique.
fn bridges(tables: &[BridgeSettings]) -> anyhow::Result<Vec<broker_bridge::BridgeConfig>> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::with_capacity(tables.len());
    for b in tables {
        if !seen.insert(b.name.as_str()) {
            bail!(
                "[[bridge]] name `{}` is used twice: each bridge needs its own name (it names its session)",
                b.name
            );
        }
        out.push(b.config()?);
    }
    Ok(out)
}

/// The `[http]` table: one HTTP listener for `/metrics`, `/health`,
/// `/ready` and the admin API under `/api/v1/`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// Address to listen on, e.g. `127.0.0.1:8080`; no listener when unset.
    pub bind: Option<String>,
    /// Bearer token every request but `/health` and `/ready` must carry
    /// (`Authorization: Bearer ...`); required when `bind` is not loopback.
    pub token: Option<String>,
    /// Requests served at once; more get 503 (default 64).
    pub max_requests: Option<usize>,
    /// Connections open at once; more are closed at accept (default 256).
    pub max_connections: Option<usize>,
}

/// Connections the HTTP listener holds at once unless `[http] max_connections` says.
pub const DEFAULT_HTTP_MAX_CONNECTIONS: usize = 256;

/// Requests the HTTP listener serves at once unless `[http] max_requests` says.
pub const DEFAULT_HTTP_MAX_REQUESTS: usize = 64;

impl HttpSettings {
    fn validate(&self) -> anyhow::Result<()> {
        let Some(bind) = &self.bind else {
            return Ok(());
        };
        if bind.parse::<std::net::SocketAddr>().is_err() {
            bail!("[http] bind `{bind}` is not an address with a port (e.g. `127.0.0.1:8080`)");
        }
        match &self.token {
            Some(t) if t.len() < 16 => {
                bail!("[http] token is too short: use at least 16 characters (e.g. `openssl rand -hex 32`)")
            }
            Some(_) => {}
            None if is_loopback(bind) => {}
            None => bail!(
                "[http] bind `{bind}` is not a loopback address: set `token` in [http] so that \
                 only those who know it reach the admin API and /metrics"
            ),
        }
        if self.max_requests == Some(0) {
            bail!("[http] max_requests must be at least 1");
        }
        if self.max_connections == Some(0) {
            bail!("[http] max_connections must be at least 1");
        }
        Ok(())
    }
}

/// The `[log]` table. `RUST_LOG` still chooses the levels.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// `text` (one human-readable line per event) or `json` (one JSON object per line).
    pub format: LogFormat,
    /// The INFO lines of every connection ("client connected", "connection
    /// closed", "connection refused"). `false` leaves them out (warnings
    /// stay): they cost in connection storms.
    pub connections: bool,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::Text,
            connections: true,
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl FileConfig {
    /// The settings of a TOML file's text.
    pub fn parse(text: &str) -> anyhow::Result<FileConfig> {
        Ok(toml::from_str(text)?)
    }
}

/// Everything the binary runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Every listener: the `--listen` (or `listen`) addresses as plain
    /// `mqtt` ones first, then the `[[listener]]` tables; `allow_anonymous`
    /// is always set (the safe default resolved).
    pub listeners: Vec<ListenerConfig>,
    /// Storage URL.
    pub storage: String,
    /// Core settings.
    pub broker: BrokerConfig,
    /// `$SYS` topics.
    pub sys: SysConfig,
    /// Authentication and authorization.
    pub auth: AuthSettings,
    /// The webhook, if any.
    pub webhook: Option<WebhookSettings>,
    /// Logging.
    pub log: LogSettings,
    /// The HTTP listener (`bind` is `None` when there is none).
    pub http: HttpSettings,
    /// The bridges, checked.
    pub bridges: Vec<broker_bridge::BridgeConfig>,
    /// `[cluster]`, checked against the storage URL and the listeners.
    pub cluster: Option<ClusterSettings>,
    /// Threads that serve connections, when set (`None`: one per core).
    pub worker_threads: Option<usize>,
}

/// Most threads `worker_threads` may ask for.
pub const MAX_WORKER_THREADS: usize = 1024;

/// The runtime's thread count as the flags and the file ask for it, read
/// before anything else (the runtime is built before [`Settings::load`]).
/// `None` for the default, and for a value out of range, which
/// [`Settings::load`] then reports.
pub fn worker_threads(cli: &Cli, file: Option<&FileConfig>) -> Option<usize> {
    asked_worker_threads(cli, file).filter(|n| (1..=MAX_WORKER_THREADS).contains(n))
}

/// `worker_threads` from the flag, else the file (unchecked).
fn asked_worker_threads(cli: &Cli, file: Option<&FileConfig>) -> Option<usize> {
    cli.worker_threads.or(file.and_then(|f| f.worker_threads))
}

impl Settings {
    /// Merge defaults, the file named by `--config`, and the flags.
    pub fn load(cli: Cli) -> anyhow::Result<Settings> {
        let file = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                FileConfig::parse(&text)
                    .with_context(|| format!("invalid config file {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        Settings::resolve(cli, file)
    }

    /// Merge `file` (already read) and the flags over the defaults, and check the result.
    pub fn resolve(cli: Cli, file: FileConfig) -> anyhow::Result<Settings> {
        let worker_threads = asked_worker_threads(&cli, Some(&file));
        let mut broker = file.broker;
        if let Some(v) = cli.max_inflight {
            broker.max_inflight = v;
        }
        if let Some(v) = cli.max_queued_messages {
            broker.max_queued_messages = v;
        }
        if let Some(v) = cli.overflow_policy {
            broker.overflow_policy = v;
        }
        if let Some(v) = cli.queue_qos0_offline {
            broker.queue_qos0_offline = v;
        }
        if let Some(v) = cli.session_expiry_secs {
            broker.session_expiry_secs = Some(v);
        }
        if let Some(v) = cli.max_packet_size {
            broker.max_packet_size = v;
        }
        if let Some(v) = cli.connect_timeout_secs {
            broker.connect_timeout_secs = v;
        }
        if let Err(e) = broker.validate() {
            bail!("{e}");
        }
        if let Some(n) = worker_threads {
            if !(1..=MAX_WORKER_THREADS).contains(&n) {
                bail!(
                    "worker_threads = {n}: must be 1 to {MAX_WORKER_THREADS} \
                     (leave it out for one per CPU core)"
                );
            }
        }
        file.auth.validate(&broker)?;
        let mut http = file.http;
        if let Some(bind) = cli.http_listen {
            http.bind = Some(bind);
        }
        http.validate()?;
        let bridges = bridges(&file.bridge)?;
        let listen = if !cli.listen.is_empty() {
            cli.listen
        } else {
            file.listen.unwrap_or_else(|| {
                if file.listener.is_empty() {
                    vec![DEFAULT_LISTEN.to_string()]
                } else {
                    Vec::new()
                }
            })
        };
        let mut listeners: Vec<ListenerConfig> = listen
            .into_iter()
            .map(|bind| ListenerConfig::new(bind, Protocol::Mqtt))
            .chain(file.listener)
            .collect();
        if listeners.is_empty() {
            bail!("no listen address configured");
        }
        for l in &mut listeners {
            if let Err(e) = l.validate() {
                bail!("{e}");
            }
            l.allow_anonymous = Some(allow_anonymous(l, &file.auth)?);
        }
        let storage = cli
            .storage
            .or(file.storage)
            .unwrap_or_else(|| DEFAULT_STORAGE.to_string());
        if let Some(cluster) = &file.cluster {
            cluster.validate(&storage, &listeners)?;
        }
        Ok(Settings {
            listeners,
            storage,
            broker,
            sys: file.sys,
            auth: file.auth,
            webhook: file.webhook,
            log: file.log,
            http,
            bridges,
            cluster: file.cluster,
            worker_threads,
        })
    }
}

/// The safe default, as Mosquitto 2.0 has it: without authentication,
/// anonymous clients only on loopback; a listener reachable from elsewhere
/// with nothing to authenticate its clients does not start unless
/// `allow_anonymous = true` says that is meant. With a password file,
/// anonymous clients are refused unless `allow_anonymous = true`.
fn allow_anonymous(l: &ListenerConfig, auth: &AuthSettings) -> anyhow::Result<bool> {
    let by_certificate = l.require_certificate && l.use_identity_as_username;
    let loopback = is_loopback(&l.bind);
    match l.allow_anonymous {
        Some(v) => Ok(v),
        None if auth.authenticates() || by_certificate => Ok(false),
        None if loopback => Ok(true),
        None => bail!(
            "listener {} ({}) is not on a loopback address and no authentication is configured: \
             set `password_file` (see `broker passwd`) or `http_authenticate` in [auth], or client certificates \
             (`require_certificate` and `use_identity_as_username`), or `allow_anonymous = true` \
             in its [[listener]] table to let anyone in",
            l.bind,
            l.protocol
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_file() {
        let dir = std::env::temp_dir().join(format!("broker-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("b.toml");
        std::fs::write(
            &path,
            "listen = [\"127.0.0.1:1999\"]\nstorage = \"memory://\"\n[broker]\nmax_inflight = 7\nmax_queued_messages = 9\n",
        )
        .unwrap();
        let cli = Cli::parse_from([
            "broker",
            "--config",
            path.to_str().unwrap(),
            "--max-inflight",
            "3",
        ]);
        let s = Settings::load(cli).unwrap();
        assert_eq!(s.listeners.len(), 1);
        assert_eq!(s.listeners[0].bind, "127.0.0.1:1999");
        assert_eq!(s.broker.max_inflight, 3);
        assert_eq!(s.broker.max_queued_messages, 9);
        assert!(s.sys.enabled, "[sys] is on by default");
    }

    #[test]
    fn sys_table() {
        let f = FileConfig::parse("[sys]\nbroker_id = \"b1\"\ninterval_secs = 0\n").unwrap();
        assert_eq!(f.sys.broker_id.as_deref(), Some("b1"));
        assert_eq!(f.sys.interval_secs, 0);
        assert!(FileConfig::parse("[sys]\nintervl = 1\n").is_err());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let dir = std::env::temp_dir().join(format!("broker-settings-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("b.toml");
        std::fs::write(&path, "[broker]\nmax_infligt = 7\n").unwrap();
        let cli = Cli::parse_from(["broker", "--config", path.to_str().unwrap()]);
        let err = format!("{:#}", Settings::load(cli).unwrap_err());
        assert!(err.contains("max_infligt"), "{err}");
        let cli = Cli::parse_from(["broker", "--max-inflight", "0"]);
        let err = format!("{:#}", Settings::load(cli).unwrap_err());
        assert!(err.contains("max_inflight"), "{err}");
        std::fs::write(&path, "[broker]\nqueue_page = 0\n").unwrap();
        let cli = Cli::parse_from(["broker", "--config", path.to_str().unwrap()]);
        let err = format!("{:#}", Settings::load(cli).unwrap_err());
        assert!(err.contains("queue_page"), "{err}");
    }

    fn resolve(text: &str, args: &[&str]) -> anyhow::Result<Settings> {
        let cli = Cli::parse_from(std::iter::once("broker").chain(args.iter().copied()));
        Settings::resolve(cli, FileConfig::parse(text)?)
    }

    #[test]
    fn worker_threads_from_the_file_or_the_flag_within_bounds() {
        let s = resolve("worker_threads = 3\n", &[]).unwrap();
        assert_eq!(s.worker_threads, Some(3));
        let s = resolve("worker_threads = 3\n", &["--worker-threads", "1"]).unwrap();
        assert_eq!(s.worker_threads, Some(1));
        assert_eq!(resolve("", &[]).unwrap().worker_threads, None);
        for bad in ["worker_threads = 0\n", "worker_threads = 1025\n"] {
            let err = format!("{:#}", resolve(bad, &[]).unwrap_err());
            assert!(err.contains("worker_threads"), "{err}");
        }
        // What the runtime is built with, before the settings are checked:
        // a value out of range gives the default, and the check says why.
        let file = FileConfig::parse("worker_threads = 0\n").unwrap();
        let cli = Cli::parse_from(["broker"]);
        assert_eq!(worker_threads(&cli, Some(&file)), None);
        let cli = Cli::parse_from(["broker", "--worker-threads", "2"]);
        assert_eq!(worker_threads(&cli, Some(&file)), Some(2));
    }

    #[test]
    fn listener_tables_beside_listen_flags() {
        let text = "[[listener]]\nbind = \"127.0.0.1:8080\"\nprotocol = \"ws\"\n\
                    [[listener]]\nbind = \"127.0.0.1:8883\"\nprotocol = \"mqtts\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
        let s = resolve(text, &["--listen", "127.0.0.1:1883"]).unwrap();
        let got: Vec<_> = s
            .listeners
            .iter()
            .map(|l| (l.bind.as_str(), l.protocol))
            .collect();
        assert_eq!(
            got,
            [
                ("127.0.0.1:1883", Protocol::Mqtt),
                ("127.0.0.1:8080", Protocol::Ws),
                ("127.0.0.1:8883", Protocol::Mqtts)
            ]
        );
        // Tables alone: no default listener added.
        assert_eq!(resolve(text, &[]).unwrap().listeners.len(), 2);
        assert!(resolve(
            "[[listener]]\nbind = \"127.0.0.1:1\"\nprotocol = \"mqtts\"\n",
            &[]
        )
        .unwrap_err()
        .to_string()
        .contains("`cert` and `key`"));
        assert!(resolve(
            "[[listener]]\nbind = \"127.0.0.1:1\"\nprotcol = \"ws\"\n",
            &[]
        )
        .is_err());
    }

    #[test]
    fn anonymous_only_on_loopback_unless_said() {
        let public = "[[listener]]\nbind = \"0.0.0.0:1883\"\n";
        let err = resolve(public, &[]).unwrap_err().to_string();
        assert!(err.contains("allow_anonymous = true"), "{err}");
        assert!(resolve("", &["--listen", "0.0.0.0:1883"]).is_err());
        let said = "[[listener]]\nbind = \"0.0.0.0:1883\"\nallow_anonymous = true\n";
        assert_eq!(
            resolve(said, &[]).unwrap().listeners[0].allow_anonymous,
            Some(true)
        );
        let with_passwords = format!("{public}[auth]\npassword_file = \"p\"\n");
        assert_eq!(
            resolve(&with_passwords, &[]).unwrap().listeners[0].allow_anonymous,
            Some(false)
        );
        let loopback = resolve("", &[]).unwrap();
        assert_eq!(loopback.listeners[0].allow_anonymous, Some(true));
        let loopback_with_passwords = resolve("[auth]\npassword_file = \"p\"\n", &[]).unwrap();
        assert_eq!(
            loopback_with_passwords.listeners[0].allow_anonymous,
            Some(false)
        );
    }

    #[test]
    fn http_hooks_and_webhook_tables() {
        let text = "[[listener]]\nbind = \"0.0.0.0:1883\"\n\
                    [auth]\nhttp_authenticate = \"http://127.0.0.1:3000/auth\"\n\
                    http_timeout_ms = 800\nhttp_cache_ttl_secs = 0\n\
                    http_headers = { Authorization = \"Bearer t\" }\n\
                    [webhook]\nurl = \"http://127.0.0.1:3000/events\"\nevents = [\"client_connected\"]\nqueue = 5\n";
        let s = resolve(text, &[]).unwrap();
        assert_eq!(
            s.listeners[0].allow_anonymous,
            Some(false),
            "HTTP authenticates"
        );
        let http = s.auth.http().expect("HTTP hooks");
        assert_eq!(http.timeout, std::time::Duration::from_millis(800));
        assert_eq!(http.cache_ttl, std::time::Duration::ZERO);
        assert_eq!(
            http.headers,
            [("Authorization".to_string(), "Bearer t".to_string())]
        );
        let w = s.webhook.expect("webhook").config();
        assert_eq!((w.events.len(), w.queue, w.batch_max), (1, 5, 100));
        let log = resolve("[log]\nformat = \"json\"\nconnections = false\n", &[]).unwrap();
        assert_eq!(
            (log.log.format, log.log.connections),
            (LogFormat::Json, false)
        );
        assert!(resolve("[log]\nformat = \"xml\"\n", &[]).is_err());
        assert!(resolve("", &[]).unwrap().auth.http().is_none());

        let both = "[auth]\npassword_file = \"p\"\nhttp_authenticate = \"http://127.0.0.1:1/a\"\n";
        let err = resolve(both, &[]).unwrap_err().to_string();
        assert!(
            err.contains("password_file") && err.contains("http_authenticate"),
            "{err}"
        );
        let slow = "[auth]\nhttp_authenticate = \"http://127.0.0.1:1/a\"\nhttp_timeout_ms = 5000\n";
        let err = resolve(slow, &[]).unwrap_err().to_string();
        assert!(err.contains("hook_timeout_ms"), "{err}");
        assert!(resolve("[webhook]\nurl = \"http://x/\"\nbatch = 3\n", &[]).is_err());
        assert!(resolve("[auth]\nhttp_authentcate = \"http://x/\"\n", &[]).is_err());
    }

    #[test]
    fn http_table_and_its_token_rule() {
        assert_eq!(resolve("", &[]).unwrap().http.bind, None);
        let local = resolve("[http]\nbind = \"127.0.0.1:8080\"\n", &[]).unwrap();
        assert_eq!(local.http.bind.as_deref(), Some("127.0.0.1:8080"));
        let flag = resolve("", &["--http-listen", "[::1]:9090"]).unwrap();
        assert_eq!(flag.http.bind.as_deref(), Some("[::1]:9090"));
        let err = resolve("[http]\nbind = \"0.0.0.0:8080\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("token"), "{err}");
        let err = resolve("", &["--http-listen", "0.0.0.0:8080"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("token"),
            "a flag is held to the same rule: {err}"
        );
        let remote = "[http]\nbind = \"0.0.0.0:8080\"\ntoken = \"0123456789abcdef\"\n";
        assert!(resolve(remote, &[]).is_ok());
        let short = "[http]\nbind = \"0.0.0.0:8080\"\ntoken = \"abc\"\n";
        assert!(resolve(short, &[])
            .unwrap_err()
            .to_string()
            .contains("short"));
        assert!(resolve("[http]\nbind = \"localhost\"\n", &[]).is_err());
        assert!(resolve("[http]\nbind = \"127.0.0.1:1\"\nmax_requests = 0\n", &[]).is_err());
        assert!(resolve("[http]\nbind = \"127.0.0.1:1\"\nmax_connections = 0\n", &[]).is_err());
        assert!(resolve("[http]\nport = 1\n", &[]).is_err());
    }

    #[test]
    fn bridge_tables() {
        let text = "[[bridge]]\nname = \"cloud\"\naddress = \"127.0.0.1:1884\"\nprotocol_version = \"5\"\n\
                    username = \"u\"\npassword = \"p\"\n\
                    [[bridge.topic]]\npattern = \"sensors/#\"\ndirection = \"out\"\nqos = 1\n\
                    local_prefix = \"edge/\"\nremote_prefix = \"site1/\"\n\
                    [[bridge.topic]]\npattern = \"cmd/#\"\ndirection = \"in\"\nqos = 2\n\
                    [[bridge]]\nname = \"backup\"\naddress = \"backup.example:8883\"\ntls = true\n\
                    [[bridge.topic]]\npattern = \"#\"\ndirection = \"both\"\n";
        let s = resolve(text, &[]).unwrap();
        assert_eq!(s.bridges.len(), 2);
        let b = &s.bridges[0];
        assert_eq!(b.protocol, broker_bridge::MqttVersion::V5);
        assert_eq!(b.client_id, "cloud-bridge");
        assert!(!b.clean_start, "a persistent remote session by default");
        assert_eq!(b.topics.len(), 2);
        assert_eq!(b.topics[0].local_filter(), "edge/sensors/#");
        assert_eq!(b.topics[0].remote_filter(), "site1/sensors/#");
        assert_eq!(
            b.remote_topic("edge/sensors/1").map(|t| t.0).as_deref(),
            Some("site1/sensors/1")
        );
        assert_eq!(s.bridges[1].protocol, broker_bridge::MqttVersion::V311);
        assert!(s.bridges[1].tls);

        let err = |text: &str| format!("{:#}", resolve(text, &[]).unwrap_err());
        let one = |extra: &str, topic: &str| {
            format!("[[bridge]]\nname = \"a\"\naddress = \"h:1\"\n{extra}[[bridge.topic]]\n{topic}")
        };
        let twice = format!(
            "{}{}",
            one("", "pattern = \"x\"\n"),
            one("", "pattern = \"y\"\n")
        );
        assert!(err(&twice).contains("used twice"), "{}", err(&twice));
        let e = err(&one("", "pattern = \"x\"\ndirection = \"sideways\"\n"));
        assert!(e.contains("sideways") && e.contains("`both`"), "{e}");
        let e = err(&one("", "pattern = \"x\"\nqos = 3\n"));
        assert!(e.contains("qos = 3 must be 0, 1 or 2"), "{e}");
        let e = err("[[bridge]]\nname = \"a\"\n[[bridge.topic]]\npattern = \"x\"\n");
        assert!(e.contains("`address` is missing"), "{e}");
        let e = err(&one("", "pattern = \"a/#/b\"\n"));
        assert!(e.contains("not a valid"), "{e}");
        let e = err(&one("protocol_version = \"3\"\n", "pattern = \"x\"\n"));
        assert!(e.contains("protocol_version"), "{e}");
        let e = err(&one("adress = \"x\"\n", "pattern = \"x\"\n"));
        assert!(e.contains("adress"), "{e}");
        let e = err(&one("", "pattern = \"x\"\nlocal_prefx = \"y\"\n"));
        assert!(e.contains("local_prefx"), "{e}");
        let e = err("[[bridge]]\nname = \"a\"\naddress = \"h:1\"\n");
        assert!(e.contains("[[bridge.topic]]"), "{e}");
    }

    #[test]
    fn the_example_config_documents_the_true_defaults() {
        let text = include_str!("../../packaging/broker.toml");
        let f = FileConfig::parse(text).expect("packaging/broker.toml parses");
        assert_eq!(
            f.broker,
            BrokerConfig::default(),
            "[broker] in packaging/broker.toml"
        );
        assert_eq!(
            f.sys,
            SysConfig::default(),
            "[sys] in packaging/broker.toml"
        );
        assert_eq!(
            f.log,
            LogSettings::default(),
            "[log] in packaging/broker.toml"
        );
        assert_eq!(
            f.http,
            HttpSettings::default(),
            "[http] in packaging/broker.toml"
        );
        assert_eq!(f.listen, Some(vec![DEFAULT_LISTEN.to_string()]));
        assert_eq!(f.storage.as_deref(), Some("sqlite://data/broker.db"));
        assert!(f.listener.is_empty() && f.webhook.is_none() && f.auth.http().is_none());
        assert!(f.bridge.is_empty(), "no bridge unless configured");
        // The commented-out bridge is a valid one.
        let bridge: String = text
            .lines()
            .skip_while(|l| !l.starts_with("# [[bridge]]"))
            .take_while(|l| l.starts_with('#'))
            .map(|l| {
                format!(
                    "{}\n",
                    l.trim_start_matches('#').split(" # ").next().unwrap_or("")
                )
            })
            .collect();
        let s = resolve(&bridge, &[]).expect("the [[bridge]] example in packaging/broker.toml");
        assert_eq!(s.bridges.len(), 1, "{bridge}");
        assert!(f.auth.password_file.is_none() && f.auth.acl_file.is_none());
        // The commented-out webhook events are the default ones.
        let events: String = text
            .lines()
            .skip_while(|l| !l.starts_with("# events = "))
            .take_while(|l| !l.contains("also:"))
            .chain(text.lines().filter(|l| l.contains("also:")))
            .collect();
        for e in broker_http_hooks::DEFAULT_EVENTS {
            assert!(events.contains(&format!("\"{e}\"")), "{e} not listed");
        }
        // The container's configuration starts (a public listener, said open).
        let docker =
            resolve(include_str!("../../packaging/docker.toml"), &[]).expect("docker.toml");
        assert_eq!(docker.listeners.len(), 1);
        assert_eq!(docker.listeners[0].allow_anonymous, Some(true));
    }
}
