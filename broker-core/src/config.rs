//! Broker settings. Deserializable from TOML (the `broker` binary's `--config`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::message::QoS;

/// What to do when a session's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OverflowPolicy {
    /// Refuse the new message for that session (Mosquitto's behaviour).
    DropNew,
    /// Make room by dropping the oldest message not yet in flight.
    DropOldest,
}

impl std::str::FromStr for OverflowPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "drop-new" => Ok(OverflowPolicy::DropNew),
            "drop-oldest" => Ok(OverflowPolicy::DropOldest),
            other => Err(format!(
                "unknown overflow policy `{other}` (expected `drop-new` or `drop-oldest`)"
            )),
        }
    }
}

/// Settings of the broker core.
///
/// ```
/// use broker_core::config::BrokerConfig;
/// let c = BrokerConfig { max_inflight: 64, ..BrokerConfig::default() };
/// assert!(c.validate().is_ok());
/// assert_eq!(BrokerConfig::default().max_inflight, 32);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// Largest packet accepted from a client, in bytes, fixed header included
    /// (MQTT 5 Maximum Packet Size, sent in CONNACK); checked from the fixed
    /// header before any buffer is allocated for the body.
    pub max_packet_size: u32,
    /// Seconds a new connection has to send CONNECT.
    pub connect_timeout_secs: u64,
    /// Unacknowledged QoS 1/2 deliveries per session (the in-flight window).
    pub max_inflight: usize,
    /// Messages a session may hold queued (in flight included).
    pub max_queued_messages: usize,
    /// What to do when that limit is reached.
    pub overflow_policy: OverflowPolicy,
    /// Entries read from the store at a time for a session restored at
    /// start, as its client drains it (the next page is read when fewer
    /// than the client's window and half a page are left).
    pub queue_page: usize,
    /// Queue QoS 0 messages for offline persistent sessions (off by default, as in MQTT 3.1.1 practice).
    pub queue_qos0_offline: bool,
    /// Seconds a persistent session of an MQTT 3.1.1 client outlives its
    /// connection, counted from disconnect; `None` keeps it until the client cleans it.
    pub session_expiry_secs: Option<u64>,
    /// Upper bound on the session expiry interval an MQTT 5 client may ask
    /// for; a larger request is lowered and the value sent back in CONNACK.
    pub max_session_expiry_secs: Option<u32>,
    /// QoS 1/2 publishes of one client that may await their acknowledgement
    /// (MQTT 5 Receive Maximum, sent in CONNACK); an MQTT 5 client exceeding
    /// it is disconnected (0x93). For every client it is also the number of
    /// acknowledgements that may wait for their storage write before the
    /// broker stops reading from the client (back-pressure).
    pub receive_maximum: u16,
    /// Topic aliases an MQTT 5 client may use towards the broker (0 disables them).
    pub topic_alias_maximum: u16,
    /// Highest QoS the broker accepts and grants (MQTT 5 Maximum QoS).
    pub maximum_qos: u8,
    /// Whether retained messages are supported (MQTT 5 Retain Available).
    pub retain_available: bool,
    /// Whether filters may contain wildcards.
    pub wildcard_subscriptions: bool,
    /// Whether `$share/{group}/{filter}` subscriptions are supported.
    pub shared_subscriptions: bool,
    /// Whether MQTT 5 subscription identifiers are supported.
    pub subscription_identifiers: bool,
    /// Largest keep alive allowed: an MQTT 5 client asking for 0 or more is
    /// told this value in CONNACK (Server Keep Alive) and held to it.
    pub max_keep_alive: Option<u16>,
    /// When set, an MQTT 5 client that asks for response information gets
    /// this prefix followed by its client id, a topic it may use for replies.
    pub response_topic_prefix: Option<String>,
    /// Requests merged into one packet-store write by group commit; 1 writes
    /// each publish and acknowledgement on its own.
    pub max_commit_batch: usize,
    /// Levels a topic name or filter may have (`a/b/c` has three; a shared
    /// subscription's `$share/{group}/` does not count). PUBLISH topics,
    /// SUBSCRIBE/UNSUBSCRIBE filters and will topics beyond it are refused.
    /// At most [`MAX_TOPIC_LEVELS`].
    pub max_topic_levels: usize,
    /// Bytes a session may hold queued, online or offline (in flight
    /// included): each entry counts its payload, its topic and a fixed
    /// overhead (288 bytes on 64-bit targets). Past it QoS 0 messages
    /// are dropped and QoS 1/2 follow `overflow_policy`. At least `max_packet_size`.
    pub max_queued_bytes: usize,
    /// Subscriptions one session may hold; more are refused (SUBACK 0x97
    /// Quota exceeded, 0x80 for MQTT 3.1.1).
    pub max_subscriptions_per_client: usize,
    /// Client connections open at once, across listeners; more are closed
    /// at accept. Lowered at start to what the process's open-file limit allows.
    pub max_connections: usize,
    /// New connections accepted per second (a token bucket that holds one
    /// second's worth); the excess is closed at accept, never queued. 0: no limit.
    pub max_connection_rate: u32,
    /// Milliseconds an authentication or authorization hook may take before
    /// the broker gives up on it and refuses (fails closed).
    pub hook_timeout_ms: u64,
    /// Failed authentications one peer address may have within
    /// `auth_failure_window_secs`; then its connections are refused
    /// (CONNACK 0x9F / 0x03) until the window ends. 0: no limit.
    pub auth_failure_limit: u32,
    /// The window of `auth_failure_limit`, in seconds.
    pub auth_failure_window_secs: u64,
}

/// The `$SYS` topics (the `[sys]` table of the binary's config).
///
/// ```
/// use broker_core::config::SysConfig;
/// let c = SysConfig::default();
/// assert!(c.enabled && c.interval_secs == 10 && c.broker_id.is_none());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SysConfig {
    /// Publish `$SYS` topics at all.
    pub enabled: bool,
    /// The `<broker-id>` of `$SYS/<broker-id>/new/clients` and the like;
    /// by default an id generated once and kept in the store.
    pub broker_id: Option<String>,
    /// Seconds between two publications of the `$SYS/broker/` statistics (0: never).
    pub interval_secs: u64,
}

impl Default for SysConfig {
    fn default() -> Self {
        SysConfig {
            enabled: true,
            broker_id: None,
            interval_secs: 10,
        }
    }
}

/// A setting that would make the broker misbehave.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid setting `{key}`: {reason}")]
pub struct ConfigError {
    /// The setting's name, as in the `[broker]` table.
    pub key: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        key,
        reason: reason.into(),
    }
}

/// The largest `max_topic_levels` allowed.
pub const MAX_TOPIC_LEVELS: usize = 4096;

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            max_packet_size: 1024 * 1024,
            connect_timeout_secs: 10,
            max_inflight: 32,
            max_queued_messages: 100_000,
            overflow_policy: OverflowPolicy::DropNew,
            queue_page: 1000,
            queue_qos0_offline: false,
            session_expiry_secs: None,
            max_session_expiry_secs: None,
            receive_maximum: 1024,
            topic_alias_maximum: 10,
            maximum_qos: 2,
            retain_available: true,
            wildcard_subscriptions: true,
            shared_subscriptions: true,
            subscription_identifiers: true,
            max_keep_alive: None,
            response_topic_prefix: None,
            max_commit_batch: 1024,
            max_topic_levels: 128,
            max_queued_bytes: 16 * 1024 * 1024,
            max_subscriptions_per_client: 1000,
            max_connections: 100_000,
            max_connection_rate: 1000,
            hook_timeout_ms: 5000,
            auth_failure_limit: 10,
            auth_failure_window_secs: 60,
        }
    }
}

impl BrokerConfig {
    /// Check settings that would make the broker misbehave.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_inflight == 0 || self.max_inflight > u16::MAX as usize {
            return Err(invalid("max_inflight", "must be between 1 and 65535"));
        }
        if self.queue_page == 0 || self.queue_page > u16::MAX as usize {
            return Err(invalid("queue_page", "must be between 1 and 65535"));
        }
        if self.max_queued_messages == 0 {
            return Err(invalid("max_queued_messages", "must be at least 1"));
        }
        if self.max_packet_size < 16 {
            return Err(invalid("max_packet_size", "must be at least 16 bytes"));
        }
        if self.connect_timeout_secs == 0 {
            return Err(invalid("connect_timeout_secs", "must be at least 1"));
        }
        if self.receive_maximum == 0 {
            return Err(invalid("receive_maximum", "must be between 1 and 65535"));
        }
        if self.maximum_qos > 2 {
            return Err(invalid("maximum_qos", "must be 0, 1 or 2"));
        }
        if self.max_commit_batch == 0 {
            return Err(invalid("max_commit_batch", "must be at least 1"));
        }
        if self.max_topic_levels == 0 || self.max_topic_levels > MAX_TOPIC_LEVELS {
            return Err(invalid(
                "max_topic_levels",
                format!("must be between 1 and {MAX_TOPIC_LEVELS}"),
            ));
        }
        if self.max_queued_bytes < self.max_packet_size as usize {
            return Err(invalid(
                "max_queued_bytes",
                format!(
                "{} must be at least max_packet_size ({}), or a session could not hold one message",
                self.max_queued_bytes, self.max_packet_size
            ),
            ));
        }
        if self.max_subscriptions_per_client == 0 {
            return Err(invalid(
                "max_subscriptions_per_client",
                "must be at least 1",
            ));
        }
        if self.max_connections == 0 {
            return Err(invalid("max_connections", "must be at least 1"));
        }
        if self.max_keep_alive == Some(0) {
            return Err(invalid("max_keep_alive", "must be at least 1 second"));
        }
        if self.auth_failure_limit > 0 && self.auth_failure_window_secs == 0 {
            return Err(invalid("auth_failure_window_secs", "must be at least 1"));
        }
        if self.hook_timeout_ms == 0 {
            return Err(invalid("hook_timeout_ms", "must be at least 1"));
        }
        Ok(())
    }

    /// The highest QoS granted.
    pub fn max_qos(&self) -> QoS {
        QoS::from_u8(self.maximum_qos).unwrap_or(QoS::ExactlyOnce)
    }

    /// How long a hook may take.
    pub fn hook_timeout(&self) -> Duration {
        Duration::from_millis(self.hook_timeout_ms)
    }

    /// The connect timeout as a duration.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs)
    }
}
