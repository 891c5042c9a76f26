//! Broker settings. Deserializable from TOML (the `broker` binary's `--config`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

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
    /// Largest packet accepted from a client, in bytes; checked from the fixed
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
    /// Queue QoS 0 messages for offline persistent sessions (off by default, as in MQTT 3.1.1 practice).
    pub queue_qos0_offline: bool,
    /// Seconds a persistent session of an MQTT 3.1.1 client outlives its
    /// connection, counted from disconnect; `None` keeps it until the client cleans it.
    pub session_expiry_secs: Option<u64>,
    /// Largest number of QoS 1/2 publishes of one client awaiting storage before
    /// the broker stops reading from it (back-pressure).
    pub max_pending_publishes: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            max_packet_size: 1024 * 1024,
            connect_timeout_secs: 10,
            max_inflight: 32,
            max_queued_messages: 100_000,
            overflow_policy: OverflowPolicy::DropNew,
            queue_qos0_offline: false,
            session_expiry_secs: None,
            max_pending_publishes: 1024,
        }
    }
}

impl BrokerConfig {
    /// Check settings that would make the broker misbehave.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_inflight == 0 || self.max_inflight > u16::MAX as usize {
            return Err("max_inflight must be between 1 and 65535".into());
        }
        if self.max_queued_messages == 0 {
            return Err("max_queued_messages must be at least 1".into());
        }
        if self.max_packet_size < 16 {
            return Err("max_packet_size must be at least 16 bytes".into());
        }
        if self.connect_timeout_secs == 0 {
            return Err("connect_timeout_secs must be at least 1".into());
        }
        if self.max_pending_publishes == 0 {
            return Err("max_pending_publishes must be at least 1".into());
        }
        Ok(())
    }

    /// The connect timeout as a duration.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs)
    }
}
