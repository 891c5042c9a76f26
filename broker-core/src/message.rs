//! Application messages as the broker routes and stores them.
//!
//! A [`Message`] is what a publisher sent, stripped of everything that belongs
//! to one connection (packet id, DUP flag). It is shared by `Arc` between every
//! session it is queued for, and stored once however many sessions reference it.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Quality of service of a message or subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum QoS {
    /// At most once.
    AtMostOnce = 0,
    /// At least once.
    AtLeastOnce = 1,
    /// Exactly once.
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS for a wire value, `None` for the reserved value 3 and above.
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }

    /// The wire value.
    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

/// Identifies one stored message body; unique within one store.
pub type MessageId = u64;

/// Per-session sequence number: the order in which a session accepted messages.
///
/// Assigned by the core, strictly increasing per session, and the only order
/// any backend may use to read a queue (16-bit packet ids are in-flight state only).
pub type Seq = u64;

/// Properties carried with a message (MQTT 5 publish properties).
///
/// MQTT 3.1.1 messages leave them empty. They are part of the stored body so
/// that every backend keeps them from the start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageProperties {
    /// Payload format indicator (0 = bytes, 1 = UTF-8).
    pub payload_format_utf8: Option<bool>,
    /// Absolute expiry time in milliseconds since the Unix epoch: never
    /// delivered after it; delivered with the remaining interval before it.
    pub expires_at_ms: Option<u64>,
    /// Content type.
    pub content_type: Option<String>,
    /// Response topic (request/response).
    pub response_topic: Option<String>,
    /// Correlation data (request/response).
    pub correlation_data: Option<Bytes>,
    /// User properties, in order.
    pub user_properties: Vec<(String, String)>,
}

/// An application message.
///
/// # Example
/// ```
/// use broker_core::message::{Message, QoS};
/// let m = Message::new("sensors/1/temp", "21.5", QoS::AtLeastOnce, false);
/// assert_eq!(m.topic, "sensors/1/temp");
/// assert_eq!(&m.payload[..], b"21.5");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Store-wide identity of the body; 0 until the broker assigns one.
    pub id: MessageId,
    /// Topic name (never contains wildcards).
    pub topic: String,
    /// Payload, shared without copying.
    pub payload: Bytes,
    /// QoS the publisher sent it with.
    pub qos: QoS,
    /// Retain flag as published.
    pub retain: bool,
    /// MQTT 5 properties.
    pub properties: MessageProperties,
    /// When the broker accepted it, milliseconds since the Unix epoch.
    pub received_at_ms: u64,
}

impl Message {
    /// A message with no properties, received now.
    pub fn new(
        topic: impl Into<String>,
        payload: impl Into<Bytes>,
        qos: QoS,
        retain: bool,
    ) -> Self {
        Message {
            id: 0,
            topic: topic.into(),
            payload: payload.into(),
            qos,
            retain,
            properties: MessageProperties::default(),
            received_at_ms: now_ms(),
        }
    }

    /// True when the message's expiry time has passed at `now_ms`.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        matches!(self.properties.expires_at_ms, Some(t) if t <= now_ms)
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
