//! What a bridge is configured with, and how its topics map between the
//! two brokers (Mosquitto's `topic pattern direction qos local_prefix
//! remote_prefix`).

use std::path::PathBuf;
use std::time::Duration;

use broker_core::message::QoS;
use broker_core::topic;

/// The MQTT version spoken to the remote broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MqttVersion {
    /// MQTT 3.1.1, with the bridge bit in the protocol level (0x84, as
    /// Mosquitto's `try_private`).
    #[default]
    V311,
    /// MQTT 5, remote subscriptions with No Local.
    V5,
}

/// Which way a topic is relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Remote to local.
    In,
    /// Local to remote.
    Out,
    /// Both ways.
    Both,
}

impl Direction {
    /// Relayed from the remote broker to the local one.
    pub fn inbound(self) -> bool {
        matches!(self, Direction::In | Direction::Both)
    }

    /// Relayed from the local broker to the remote one.
    pub fn outbound(self) -> bool {
        matches!(self, Direction::Out | Direction::Both)
    }
}

/// One `topic` line: `pattern` is subscribed to as `local_prefix + pattern`
/// locally (out) and `remote_prefix + pattern` remotely (in); a message's
/// topic has the one prefix replaced by the other on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicConfig {
    /// The topic filter, without prefixes (may be empty when a prefix names the whole topic).
    pub pattern: String,
    /// Which way.
    pub direction: Direction,
    /// The QoS of the subscriptions, so the highest QoS relayed.
    pub qos: QoS,
    /// Prefix of the topics on the local broker.
    pub local_prefix: String,
    /// Prefix of the topics on the remote broker.
    pub remote_prefix: String,
}

impl TopicConfig {
    /// `pattern` both ways at `qos`, no prefixes.
    pub fn new(pattern: impl Into<String>, direction: Direction, qos: QoS) -> TopicConfig {
        TopicConfig {
            pattern: pattern.into(),
            direction,
            qos,
            local_prefix: String::new(),
            remote_prefix: String::new(),
        }
    }

    /// The filter subscribed to on the local broker.
    pub fn local_filter(&self) -> String {
        format!("{}{}", self.local_prefix, self.pattern)
    }

    /// The filter subscribed to on the remote broker.
    pub fn remote_filter(&self) -> String {
        format!("{}{}", self.remote_prefix, self.pattern)
    }
}

/// One bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeConfig {
    /// Unique among the bridges; names the local session `$bridge/<name>`.
    pub name: String,
    /// `host:port` of the remote broker.
    pub address: String,
    /// MQTT version toward the remote.
    pub protocol: MqttVersion,
    /// Client id on the remote broker.
    pub client_id: String,
    /// User name on the remote broker.
    pub username: Option<String>,
    /// Password on the remote broker.
    pub password: Option<String>,
    /// TLS to the remote broker.
    pub tls: bool,
    /// CA certificates (PEM) the remote's certificate must chain to;
    /// without it, the system's roots.
    pub cafile: Option<PathBuf>,
    /// Start a new remote session on every connection (false: a persistent
    /// one, so the remote keeps what it has for us while we are away).
    pub clean_start: bool,
    /// Seconds between PINGREQs when nothing else is sent (at least 1).
    pub keep_alive_secs: u16,
    /// Local messages sent to the remote and not yet acknowledged by it, at most.
    pub max_inflight: u16,
    /// Largest packet read from or written to the remote, in bytes; a local
    /// message that does not fit is logged and skipped.
    pub max_packet_size: u32,
    /// First delay before reconnecting; it doubles up to `backoff_max`.
    pub backoff_min: Duration,
    /// Longest delay before reconnecting.
    pub backoff_max: Duration,
    /// The topics.
    pub topics: Vec<TopicConfig>,
}

/// Default keep alive toward the remote, seconds.
pub const DEFAULT_KEEP_ALIVE_SECS: u16 = 60;
/// Default in-flight window toward the remote.
pub const DEFAULT_MAX_INFLIGHT: u16 = 32;
/// Default largest packet, bytes.
pub const DEFAULT_MAX_PACKET_SIZE: u32 = 1024 * 1024;
/// The largest in-flight window accepted.
pub const MAX_INFLIGHT_LIMIT: u16 = 1024;

impl BridgeConfig {
    /// A bridge named `name` to `address` with the defaults: MQTT 3.1.1, no
    /// TLS, a persistent remote session, client id `<name>-bridge`, no topics.
    pub fn new(name: impl Into<String>, address: impl Into<String>) -> BridgeConfig {
        let name = name.into();
        BridgeConfig {
            client_id: default_client_id(&name),
            name,
            address: address.into(),
            protocol: MqttVersion::V311,
            username: None,
            password: None,
            tls: false,
            cafile: None,
            clean_start: false,
            keep_alive_secs: DEFAULT_KEEP_ALIVE_SECS,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            max_packet_size: DEFAULT_MAX_PACKET_SIZE,
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            topics: Vec::new(),
        }
    }

    /// The client id of the bridge's session on the local broker.
    pub fn local_client_id(&self) -> String {
        format!("$bridge/{}", self.name)
    }

    /// Check everything that can be checked without connecting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let name = &self.name;
        let bad = |why: String| ConfigError {
            bridge: name.clone(),
            why,
        };
        if name.is_empty() || name.contains(['/', '+', '#']) || name.chars().any(char::is_control) {
            return Err(bad(
                "`name` must be non-empty, without `/`, `+`, `#` or control characters".into(),
            ));
        }
        if self.address.is_empty() {
            return Err(bad(
                "`address` is missing (host:port of the remote broker)".into()
            ));
        }
        split_address(&self.address).map_err(bad)?;
        if self.client_id.is_empty() || self.client_id.len() > 65535 {
            return Err(bad("`client_id` must be 1 to 65535 bytes".into()));
        }
        if self.password.is_some() && self.username.is_none() && self.protocol == MqttVersion::V311
        {
            return Err(bad(
                "`password` without `username`: MQTT 3.1.1 cannot send that".into(),
            ));
        }
        if self.cafile.is_some() && !self.tls {
            return Err(bad("`cafile` is set but `tls` is false".into()));
        }
        if self.keep_alive_secs == 0 {
            return Err(bad("`keep_alive_secs` must be at least 1".into()));
        }
        if self.max_inflight == 0 || self.max_inflight > MAX_INFLIGHT_LIMIT {
            return Err(bad(format!(
                "`max_inflight` must be 1 to {MAX_INFLIGHT_LIMIT}"
            )));
        }
        if self.max_packet_size < 64 {
            return Err(bad("`max_packet_size` must be at least 64".into()));
        }
        if self.topics.is_empty() {
            return Err(bad("no [[bridge.topic]]: it would relay nothing".into()));
        }
        for (i, t) in self.topics.iter().enumerate() {
            let n = i + 1;
            for (what, prefix) in [
                ("local_prefix", &t.local_prefix),
                ("remote_prefix", &t.remote_prefix),
            ] {
                if topic::has_wildcard(prefix) {
                    return Err(bad(format!(
                        "topic {n}: `{what}` `{prefix}` contains a wildcard"
                    )));
                }
            }
            if t.pattern.is_empty() && (t.local_prefix.is_empty() || t.remote_prefix.is_empty()) {
                return Err(bad(format!(
                    "topic {n}: an empty `pattern` needs both prefixes (they are then the topics)"
                )));
            }
            for (side, filter) in [("local", t.local_filter()), ("remote", t.remote_filter())] {
                topic::validate_filter(&filter).map_err(|e| {
                    bad(format!(
                        "topic {n}: pattern `{}` is not a valid {side} topic filter as `{filter}`: {e}",
                        t.pattern
                    ))
                })?;
                if topic::parse_shared(&filter).ok().flatten().is_some() {
                    return Err(bad(format!(
                        "topic {n}: `{filter}` is a shared subscription; bridges relay plain filters only"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The remote topic for a local message's `topic`, with the QoS of the
    /// first outbound entry that matches it.
    pub fn remote_topic(&self, topic: &str) -> Option<(String, QoS)> {
        self.topics
            .iter()
            .filter(|t| t.direction.outbound())
            .find(|t| topic::matches(&t.local_filter(), topic))
            .and_then(|t| {
                let rest = topic.strip_prefix(t.local_prefix.as_str())?;
                Some((format!("{}{rest}", t.remote_prefix), t.qos))
            })
    }

    /// The local topic for a remote message's `topic`, with the QoS of the
    /// first inbound entry that matches it.
    pub fn local_topic(&self, topic: &str) -> Option<(String, QoS)> {
        self.topics
            .iter()
            .filter(|t| t.direction.inbound())
            .find(|t| topic::matches(&t.remote_filter(), topic))
            .and_then(|t| {
                let rest = topic.strip_prefix(t.remote_prefix.as_str())?;
                Some((format!("{}{rest}", t.local_prefix), t.qos))
            })
    }
}

/// The client id on the remote broker when none is configured.
pub fn default_client_id(name: &str) -> String {
    format!("{name}-bridge")
}

/// `host:port` split, the port checked.
pub(crate) fn split_address(address: &str) -> Result<(String, u16), String> {
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| format!("`address` `{address}` has no port (host:port)"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("`address` `{address}`: `{port}` is not a port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("`address` `{address}` has no host"));
    }
    Ok((host.to_string(), port))
}

/// A bridge's settings are invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bridge `{bridge}`: {why}")]
pub struct ConfigError {
    /// The bridge's name.
    pub bridge: String,
    /// What is wrong.
    pub why: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bridge(topics: Vec<TopicConfig>) -> BridgeConfig {
        BridgeConfig {
            topics,
            ..BridgeConfig::new("cloud", "127.0.0.1:1884")
        }
    }

    #[test]
    fn prefixes_are_swapped_as_mosquitto_does() {
        let b = bridge(vec![
            TopicConfig {
                local_prefix: "edge/".into(),
                remote_prefix: "site1/".into(),
                ..TopicConfig::new("sensors/#", Direction::Out, QoS::AtLeastOnce)
            },
            TopicConfig {
                local_prefix: "cmd/".into(),
                remote_prefix: "site1/cmd/".into(),
                ..TopicConfig::new("+", Direction::In, QoS::ExactlyOnce)
            },
            TopicConfig::new("chat/#", Direction::Both, QoS::AtMostOnce),
        ]);
        b.validate().unwrap();
        assert_eq!(
            b.remote_topic("edge/sensors/1/t"),
            Some(("site1/sensors/1/t".into(), QoS::AtLeastOnce))
        );
        assert_eq!(b.remote_topic("sensors/1"), None);
        assert_eq!(b.remote_topic("cmd/x"), None, "an in topic is not sent out");
        assert_eq!(
            b.local_topic("site1/cmd/reboot"),
            Some(("cmd/reboot".into(), QoS::ExactlyOnce))
        );
        assert_eq!(b.local_topic("site1/sensors/1"), None);
        assert_eq!(
            b.local_topic("chat/a"),
            Some(("chat/a".into(), QoS::AtMostOnce))
        );
        assert_eq!(
            b.remote_topic("chat/a"),
            Some(("chat/a".into(), QoS::AtMostOnce))
        );
        let one = bridge(vec![TopicConfig {
            local_prefix: "a/b".into(),
            remote_prefix: "x/y".into(),
            ..TopicConfig::new("", Direction::Out, QoS::AtLeastOnce)
        }]);
        one.validate().unwrap();
        assert_eq!(
            one.remote_topic("a/b"),
            Some(("x/y".into(), QoS::AtLeastOnce))
        );
    }

    #[test]
    fn invalid_settings_say_what_is_wrong() {
        let err = |b: BridgeConfig| b.validate().unwrap_err().to_string();
        let t = || TopicConfig::new("a/#", Direction::Out, QoS::AtLeastOnce);
        assert!(err(bridge(vec![])).contains("[[bridge.topic]]"));
        assert!(err(bridge(vec![TopicConfig::new(
            "a/#/b",
            Direction::In,
            QoS::AtMostOnce
        )]))
        .contains("not a valid"));
        let wild = TopicConfig {
            local_prefix: "x/+/".into(),
            ..t()
        };
        assert!(err(bridge(vec![wild])).contains("wildcard"));
        let no_port = BridgeConfig {
            address: "localhost".into(),
            ..bridge(vec![t()])
        };
        assert!(err(no_port).contains("no port"));
        let missing = BridgeConfig {
            address: String::new(),
            ..bridge(vec![t()])
        };
        assert!(err(missing).contains("`address` is missing"));
        let empty = TopicConfig::new("", Direction::Out, QoS::AtLeastOnce);
        assert!(err(bridge(vec![empty])).contains("empty `pattern`"));
        let shared = TopicConfig::new("$share/g/a", Direction::In, QoS::AtLeastOnce);
        assert!(err(bridge(vec![shared])).contains("shared"));
        assert_eq!(split_address("[::1]:1883"), Ok(("::1".into(), 1883)));
    }
}
