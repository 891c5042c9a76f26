//! The wire format: packet framing and types from the `rmqtt-codec` crate, and
//! the one place where MQTT 3.1.1 and MQTT 5 differ on the wire.
//!
//! Why a crate rather than our own codec: see `docs/decisions.md`. In short,
//! `rmqtt-codec` covers MQTT 3.1, 3.1.1 and 5.0 behind one `tokio_util` codec,
//! hands out payloads as `bytes::Bytes` split from the read buffer (no copy),
//! checks the maximum packet size from the fixed header before buffering the
//! body, and is maintained as part of the RMQTT broker. The workspace builds
//! a patched copy (`vendor/rmqtt-codec/FORK.md`) that refuses what the
//! release masked or misclassified. The few checks it leaves to the caller
//! (wildcards in PUBLISH topics, DUP on QoS 0) are done in [`crate::connection`].
//!
//! Every byte a client sends goes through [`start`] (protocol detection, then
//! the version's codec) and [`inbound`] (one decoded frame in MQTT 5 terms, or
//! the reason code to refuse it with); [`decode_stream`] runs the same two on
//! a whole byte stream, for the fuzz targets and the regression tests.
//!
//! The connection code speaks MQTT 5 only. A 3.1.1 client's packets are
//! [`upgrade`]d to their MQTT 5 equivalents when read (default properties,
//! reason code "success"), and [`Encoder`] turns the broker's MQTT 5 packets
//! back into 3.1.1 ones for such a client, dropping what 3.1.1 cannot carry.

use std::num::NonZeroU16;

use bytes::BytesMut;
use bytestring::ByteString;
use tokio_util::codec::{Decoder as _, Encoder as _};

pub use rmqtt_codec::error::{DecodeError, EncodeError};
pub use rmqtt_codec::types::Publish;
pub use rmqtt_codec::version::{ProtocolVersion, VersionCodec};
pub use rmqtt_codec::{v3, v5};
pub use rmqtt_codec::{MqttCodec, MqttPacket};

use crate::message::QoS;

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

/// A PUBACK or PUBREC with `reason` and no properties.
pub fn puback(id: NonZeroU16, reason: v5::PublishAckReason) -> v5::PublishAck {
    v5::PublishAck {
        packet_id: id,
        reason_code: reason,
        properties: Vec::new(),
        reason_string: None,
    }
}

/// A PUBREL or PUBCOMP with `reason` and no properties.
pub fn pubcomp(id: NonZeroU16, reason: v5::PublishAck2Reason) -> v5::PublishAck2 {
    v5::PublishAck2 {
        packet_id: id,
        reason_code: reason,
        properties: Vec::new(),
        reason_string: None,
    }
}

/// The MQTT 5 form of a packet an MQTT 3.1.1 client sent; `Err` with the
/// packet type for packets only a server sends.
///
/// A 3.1.1 CONNECT becomes an MQTT 5 one with Session Expiry Interval 0 for
/// clean sessions and 0xFFFFFFFF otherwise; the broker's own 3.1.1 expiry
/// setting is applied by the caller.
pub fn upgrade(p: v3::Packet) -> Result<v5::Packet, u8> {
    use v5::Packet as P5;
    Ok(match p {
        v3::Packet::Connect(c) => P5::Connect(Box::new(v5::Connect {
            clean_start: c.clean_session,
            keep_alive: c.keep_alive,
            session_expiry_interval_secs: if c.clean_session { 0 } else { u32::MAX },
            auth_method: None,
            auth_data: None,
            request_problem_info: true,
            request_response_info: false,
            receive_max: None,
            topic_alias_max: 0,
            user_properties: Vec::new(),
            max_packet_size: None,
            last_will: c.last_will.map(|w| v5::LastWill {
                qos: w.qos,
                retain: w.retain,
                topic: w.topic,
                message: w.message,
                will_delay_interval_sec: None,
                correlation_data: None,
                message_expiry_interval: None,
                content_type: None,
                user_properties: Vec::new(),
                is_utf8_payload: None,
                response_topic: None,
            }),
            client_id: c.client_id,
            username: c.username,
            password: c.password,
            cert: c.cert,
        })),
        v3::Packet::Publish(p) => P5::Publish(p),
        v3::Packet::PublishAck { packet_id } => {
            P5::PublishAck(puback(packet_id, v5::PublishAckReason::Success))
        }
        v3::Packet::PublishReceived { packet_id } => {
            P5::PublishReceived(puback(packet_id, v5::PublishAckReason::Success))
        }
        v3::Packet::PublishRelease { packet_id } => {
            P5::PublishRelease(pubcomp(packet_id, v5::PublishAck2Reason::Success))
        }
        v3::Packet::PublishComplete { packet_id } => {
            P5::PublishComplete(pubcomp(packet_id, v5::PublishAck2Reason::Success))
        }
        v3::Packet::Subscribe {
            packet_id,
            topic_filters,
        } => P5::Subscribe(v5::Subscribe {
            packet_id,
            id: None,
            user_properties: Vec::new(),
            topic_filters: topic_filters
                .into_iter()
                .map(|(f, qos)| {
                    (
                        f,
                        v5::SubscriptionOptions {
                            qos,
                            ..v5::SubscriptionOptions::default()
                        },
                    )
                })
                .collect(),
        }),
        v3::Packet::Unsubscribe {
            packet_id,
            topic_filters,
        } => P5::Unsubscribe(v5::Unsubscribe {
            packet_id,
            user_properties: Vec::new(),
            topic_filters,
        }),
        v3::Packet::PingRequest => P5::PingRequest,
        v3::Packet::Disconnect => P5::Disconnect(v5::Disconnect::default()),
        other => return Err(other.packet_type()),
    })
}

/// The MQTT 3.1.1 form of a packet the broker sends, `None` for packets 3.1.1
/// does not have (server DISCONNECT, AUTH).
pub fn downgrade(p: v5::Packet) -> Option<v3::Packet> {
    use v5::Packet as P5;
    Some(match p {
        P5::ConnectAck(c) => v3::Packet::ConnectAck(v3::ConnectAck {
            return_code: v3_return_code(c.reason_code),
            session_present: c.session_present,
        }),
        P5::Publish(mut p) => {
            p.properties = None;
            v3::Packet::Publish(p)
        }
        P5::PublishAck(a) => v3::Packet::PublishAck {
            packet_id: a.packet_id,
        },
        P5::PublishReceived(a) => v3::Packet::PublishReceived {
            packet_id: a.packet_id,
        },
        P5::PublishRelease(a) => v3::Packet::PublishRelease {
            packet_id: a.packet_id,
        },
        P5::PublishComplete(a) => v3::Packet::PublishComplete {
            packet_id: a.packet_id,
        },
        P5::SubscribeAck(s) => v3::Packet::SubscribeAck {
            packet_id: s.packet_id,
            status: s
                .status
                .into_iter()
                .map(|r| match r {
                    v5::SubscribeAckReason::GrantedQos0 => {
                        v3::SubscribeReturnCode::Success(v3::QoS::AtMostOnce)
                    }
                    v5::SubscribeAckReason::GrantedQos1 => {
                        v3::SubscribeReturnCode::Success(v3::QoS::AtLeastOnce)
                    }
                    v5::SubscribeAckReason::GrantedQos2 => {
                        v3::SubscribeReturnCode::Success(v3::QoS::ExactlyOnce)
                    }
                    _ => v3::SubscribeReturnCode::Failure,
                })
                .collect(),
        },
        P5::UnsubscribeAck(u) => v3::Packet::UnsubscribeAck {
            packet_id: u.packet_id,
        },
        P5::PingResponse => v3::Packet::PingResponse,
        _ => return None,
    })
}

/// The closest MQTT 3.1.1 CONNACK return code for an MQTT 5 reason code.
fn v3_return_code(r: v5::ConnectAckReason) -> v3::ConnectAckReason {
    use v5::ConnectAckReason as R;
    match r {
        R::Success => v3::ConnectAckReason::ConnectionAccepted,
        R::UnsupportedProtocolVersion => v3::ConnectAckReason::UnacceptableProtocolVersion,
        R::ClientIdentifierNotValid => v3::ConnectAckReason::IdentifierRejected,
        R::BadUserNameOrPassword => v3::ConnectAckReason::BadUserNameOrPassword,
        R::NotAuthorized | R::BadAuthenticationMethod | R::Banned => {
            v3::ConnectAckReason::NotAuthorized
        }
        _ => v3::ConnectAckReason::ServiceUnavailable,
    }
}

/// Switch a connection's decoder from protocol detection to the codec of
/// the version its CONNECT announced, limited to `max_packet_size` bytes.
pub fn start(codec: &mut MqttCodec, version: ProtocolVersion, max_packet_size: u32) -> Protocol {
    let max_in = max_remaining_length(max_packet_size);
    match version {
        ProtocolVersion::MQTT3 => {
            *codec = MqttCodec::V3(v3::Codec::new(max_in));
            Protocol::V3
        }
        ProtocolVersion::MQTT5 => {
            *codec = MqttCodec::V5(v5::Codec::new(max_in, 0));
            Protocol::V5
        }
    }
}

/// Bytes from a client refused: the MQTT 5 reason code to close with, and
/// why (for the log and the reason string).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The DISCONNECT reason code (MQTT 5 clients are told; 3.1.1 ones are closed).
    pub code: v5::DisconnectReasonCode,
    /// What was wrong.
    pub why: String,
}

/// One frame as the connection acts on it: a client's packet in MQTT 5 form
/// (3.1.1 packets [`upgrade`]d), or why the connection must close.
pub fn inbound(frame: Result<(MqttPacket, u32), DecodeError>) -> Result<v5::Packet, Refused> {
    use v5::DisconnectReasonCode as D;
    let refuse = |code, why: String| Err(Refused { code, why });
    match frame {
        Ok((MqttPacket::V5(p), _)) => Ok(p),
        Ok((MqttPacket::V3(p), _)) => upgrade(p).or_else(|t| {
            refuse(
                D::ProtocolError,
                format!("packet type 0x{t:02x} is not sent by clients"),
            )
        }),
        Ok((MqttPacket::Version(_), _)) => refuse(D::ProtocolError, "unexpected frame".into()),
        Err(DecodeError::MaxSizeExceeded { size, max }) => refuse(
            D::PacketTooLarge,
            format!("packet of {size} bytes, maximum {max}"),
        ),
        Err(DecodeError::ProtocolError(why)) => refuse(D::ProtocolError, why.to_string()),
        Err(DecodeError::TopicAliasInvalid) => refuse(D::TopicAliasInvalid, "topic alias 0".into()),
        // The codec's only use of it in MQTT 5: SUBSCRIBE or UNSUBSCRIBE
        // without filters, a Protocol Error (MQTT-3.8.3-2, MQTT-3.10.3-2).
        Err(DecodeError::InvalidTopicFilter) => {
            refuse(D::ProtocolError, "no (or an empty) topic filter".into())
        }
        Err(e) => refuse(D::MalformedPacket, format!("malformed packet: {e}")),
    }
}

/// What [`decode_stream`] made of a byte stream.
#[derive(Debug, Default)]
#[cfg_attr(not(feature = "testkit"), allow(dead_code))]
pub struct Decoded {
    /// The protocol the first CONNECT announced, once detected.
    pub protocol: Option<Protocol>,
    /// Each packet in MQTT 5 form, with its 3.1.1 form for a 3.1.1 stream.
    pub packets: Vec<(v5::Packet, Option<v3::Packet>)>,
    /// Why decoding stopped before the end of the stream, if it did.
    pub refused: Option<Refused>,
}

/// Decode a client's byte stream, arriving in `chunks`, the way a connection
/// reads it (`tokio_util`'s `FramedRead` calls the decoder after every read):
/// protocol detection, [`start`], then [`inbound`] for every frame. Stops at
/// the first refusal; a frame left incomplete at the end is not an error.
#[cfg_attr(not(feature = "testkit"), allow(dead_code))]
pub fn decode_stream<'a>(
    chunks: impl IntoIterator<Item = &'a [u8]>,
    max_packet_size: u32,
) -> Decoded {
    let mut codec = MqttCodec::Version(VersionCodec);
    let mut buf = BytesMut::new();
    let mut out = Decoded::default();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            let frame = match codec.decode(&mut buf) {
                Ok(None) => break,
                Ok(Some((MqttPacket::Version(v), _))) if out.protocol.is_none() => {
                    // Detection only peeks: the CONNECT is decoded next, by the version's codec.
                    out.protocol = Some(start(&mut codec, v, max_packet_size));
                    continue;
                }
                // The connection answers CONNACK 0x01 (3.1.1) to this one.
                Err(DecodeError::InvalidProtocol) if out.protocol.is_none() => {
                    out.refused = Some(Refused {
                        code: v5::DisconnectReasonCode::ProtocolError,
                        why: "unknown protocol name or level".into(),
                    });
                    return out;
                }
                Ok(Some(frame)) => Ok(frame),
                Err(e) => Err(e),
            };
            let v3 = match &frame {
                Ok((MqttPacket::V3(p), _)) => Some(p.clone()),
                _ => None,
            };
            match inbound(frame) {
                Ok(p) => out.packets.push((p, v3)),
                Err(r) => {
                    out.refused = Some(r);
                    return out;
                }
            }
        }
    }
    out
}

/// The largest remaining length of a packet whose total size (fixed header
/// byte, remaining-length field, body) is at most `max_packet_size`: the
/// codec limits the remaining length, MQTT 5 limits the whole packet.
///
/// ```
/// use broker_core::internals::codec::max_remaining_length;
/// assert_eq!(max_remaining_length(1024), 1021); // 1 + 2 + 1021
/// assert_eq!(max_remaining_length(129), 127); // 1 + 1 + 127
/// assert_eq!(max_remaining_length(130), 127); // 128 would need a 2-byte length
/// ```
pub fn max_remaining_length(max_packet_size: u32) -> u32 {
    // The largest value a remaining-length field of 1, 2, 3 and 4 bytes holds.
    const FIELD_MAX: [u32; 4] = [127, 16_383, 2_097_151, 268_435_455];
    (1..=4u32)
        .zip(FIELD_MAX)
        .filter_map(|(len, field_max)| {
            let r = max_packet_size.checked_sub(1 + len)?;
            Some(r.min(field_max))
        })
        .max()
        .unwrap_or(0)
}

/// The protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// MQTT 3.1 or 3.1.1.
    V3,
    /// MQTT 5.0.
    V5,
}

/// Encodes the broker's (MQTT 5) packets for one connection, in its protocol
/// and within the limits its client set.
#[derive(Debug)]
pub struct Encoder {
    protocol: Protocol,
    v3: v3::Codec,
    v5: v5::Codec,
    problem_info: bool,
}

impl Encoder {
    /// An encoder for `protocol` with no size limit beyond the protocol's.
    pub fn new(protocol: Protocol) -> Self {
        Encoder {
            protocol,
            v3: v3::Codec::new(0),
            v5: v5::Codec::new(0, 0),
            problem_info: true,
        }
    }

    /// The protocol encoded.
    #[cfg_attr(not(feature = "testkit"), allow(dead_code))]
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The client's Maximum Packet Size: a larger packet is refused with
    /// [`EncodeError::OverMaxPacketSize`] before anything is written (reason
    /// strings and user properties of acknowledgements are dropped first).
    pub fn set_max_packet_size(&mut self, max: u32) {
        // The codec takes 5 bytes off for the fixed header; give it the exact
        // largest remaining length back.
        self.v5
            .set_max_outbound_size(max_remaining_length(max).saturating_add(5));
    }

    /// The client's Request Problem Information: when false, reason strings
    /// and user properties go only on PUBLISH, CONNACK and DISCONNECT
    /// (MQTT 5 section 3.1.2.11.7).
    pub fn set_problem_info(&mut self, on: bool) {
        self.problem_info = on;
    }

    /// Append `packet` to `buf`. Packets the protocol does not have are skipped.
    pub fn encode(
        &mut self,
        mut packet: v5::Packet,
        buf: &mut BytesMut,
    ) -> Result<(), EncodeError> {
        match self.protocol {
            Protocol::V3 => match downgrade(packet) {
                Some(p) => self.v3.encode(p, buf),
                None => Ok(()),
            },
            Protocol::V5 => {
                if !self.problem_info {
                    strip_diagnostics(&mut packet);
                }
                self.v5.encode(packet, buf)
            }
        }
    }
}

fn strip_diagnostics(p: &mut v5::Packet) {
    use v5::Packet as P5;
    match p {
        P5::PublishAck(a) | P5::PublishReceived(a) => {
            a.properties.clear();
            a.reason_string = None;
        }
        P5::PublishRelease(a) | P5::PublishComplete(a) => {
            a.properties.clear();
            a.reason_string = None;
        }
        P5::SubscribeAck(a) => {
            a.properties.clear();
            a.reason_string = None;
        }
        P5::UnsubscribeAck(a) => {
            a.properties.clear();
            a.reason_string = None;
        }
        P5::Auth(a) => {
            a.user_properties.clear();
            a.reason_string = None;
        }
        _ => {}
    }
}

/// A reason string for the wire.
pub fn reason(s: impl Into<String>) -> Option<ByteString> {
    Some(ByteString::from(s.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total(r: u32) -> u32 {
        let field = match r {
            0..=127 => 1,
            128..=16_383 => 2,
            16_384..=2_097_151 => 3,
            _ => 4,
        };
        1 + field + r
    }

    #[test]
    fn max_remaining_length_is_the_largest_that_fits() {
        for max in (3..40_000).chain([2_097_150, 2_097_155, 268_435_460, u32::MAX]) {
            let r = max_remaining_length(max);
            assert!(total(r) <= max, "{max}: {r} does not fit");
            if r < 268_435_455 {
                assert!(total(r + 1) > max, "{max}: {} would fit too", r + 1);
            }
        }
    }

    /// A header announcing a packet of nearly 1 MiB, and nothing after it,
    /// must not make the decoder allocate that much: a few bytes per
    /// connection would otherwise hold the maximum packet size each.
    #[test]
    fn an_announced_length_is_not_reserved_up_front() {
        use tokio_util::codec::Decoder;
        let header = [0x30u8, 0xff, 0xff, 0x3f]; // PUBLISH, 1,048,575 bytes to come
        let mut v5 = v5::Codec::new(2 * 1024 * 1024, 0);
        let mut src = bytes::BytesMut::from(&header[..]);
        assert!(matches!(v5.decode(&mut src), Ok(None)));
        assert!(src.capacity() <= 16 * 1024, "reserved {}", src.capacity());
        let mut v3 = v3::Codec::new(2 * 1024 * 1024);
        let mut src = bytes::BytesMut::from(&header[..]);
        assert!(matches!(v3.decode(&mut src), Ok(None)));
        assert!(src.capacity() <= 16 * 1024, "reserved {}", src.capacity());
    }

    /// A decoded payload does not share the read buffer's allocation: a
    /// message waiting in a queue must not keep the buffer it came in alive.
    #[test]
    fn payloads_are_copied_out_of_the_read_buffer() {
        use tokio_util::codec::Decoder;
        let mut src = bytes::BytesMut::with_capacity(64 * 1024);
        // PUBLISH QoS 0, topic "t", no properties, payload "hello".
        src.extend_from_slice(&[0x30, 9, 0, 1, b't', 0, b'h', b'e', b'l', b'l', b'o']);
        let start = src.as_ptr() as usize;
        let range = start..start + src.capacity();
        let mut codec = v5::Codec::new(1024 * 1024, 0);
        let Ok(Some((v5::Packet::Publish(p), _))) = codec.decode(&mut src) else {
            panic!("one PUBLISH expected")
        };
        assert_eq!(&p.payload[..], b"hello");
        assert!(!range.contains(&(p.payload.as_ptr() as usize)));
    }
}
