//! The wire format: packet framing and types from the `rmqtt-codec` crate, and
//! the conversions between its types and the broker's.
//!
//! Why a crate rather than our own codec: see `docs/decisions.md`. In short,
//! `rmqtt-codec` covers MQTT 3.1, 3.1.1 and 5.0 behind one `tokio_util` codec,
//! hands out payloads as `bytes::Bytes` split from the read buffer (no copy),
//! checks the maximum packet size from the fixed header before buffering the
//! body, and is maintained as part of the RMQTT broker. The few checks it
//! leaves to the caller (wildcards in PUBLISH topics, DUP on QoS 0, empty
//! SUBSCRIBE) are done in [`crate::connection`].

use std::num::NonZeroU16;

use bytestring::ByteString;

pub use rmqtt_codec::error::{DecodeError, EncodeError};
pub use rmqtt_codec::v3;
pub use rmqtt_codec::version::{ProtocolVersion, VersionCodec};
pub use rmqtt_codec::{MqttCodec, MqttPacket};

use crate::message::QoS;
use crate::session::Outgoing;

/// The codec's QoS for ours.
pub fn to_wire_qos(q: QoS) -> v3::QoS {
    match q {
        QoS::AtMostOnce => v3::QoS::AtMostOnce,
        QoS::AtLeastOnce => v3::QoS::AtLeastOnce,
        QoS::ExactlyOnce => v3::QoS::ExactlyOnce,
    }
}

/// Our QoS for the codec's.
pub fn from_wire_qos(q: v3::QoS) -> QoS {
    match q {
        v3::QoS::AtMostOnce => QoS::AtMostOnce,
        v3::QoS::AtLeastOnce => QoS::AtLeastOnce,
        v3::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

/// A packet id for the wire; the broker never allocates 0.
pub fn packet_id(id: u16) -> NonZeroU16 {
    NonZeroU16::new(id).unwrap_or(NonZeroU16::MIN)
}

/// The MQTT 3.1.1 packet for something the session wants sent.
pub fn v3_packet(out: &Outgoing) -> v3::Packet {
    match out {
        Outgoing::Publish {
            packet_id: id,
            dup,
            qos,
            retain,
            message,
        } => v3::Packet::Publish(Box::new(v3_publish(
            &message.topic,
            message.payload.clone(),
            qos.as_u8(),
            id.unwrap_or(0),
            *retain,
            *dup,
        ))),
        Outgoing::PubRel { packet_id: id } => v3::Packet::PublishRelease {
            packet_id: packet_id(*id),
        },
    }
}

/// A PUBLISH body; `qos` is the wire value, `packet_id` ignored for QoS 0.
pub fn v3_publish(
    topic: &str,
    payload: bytes::Bytes,
    qos: u8,
    packet_id: u16,
    retain: bool,
    dup: bool,
) -> rmqtt_codec::types::Publish {
    let qos = QoS::from_u8(qos).unwrap_or(QoS::AtMostOnce);
    rmqtt_codec::types::Publish {
        dup,
        retain,
        qos: to_wire_qos(qos),
        topic: ByteString::from(topic),
        packet_id: (qos != QoS::AtMostOnce).then(|| self::packet_id(packet_id)),
        payload,
        properties: None,
    }
}
