//! A raw MQTT 5 client for tests: sends exactly the packets a test builds and
//! acknowledges nothing by itself, for the edge cases client libraries hide.

use std::net::SocketAddr;
use std::num::{NonZeroU16, NonZeroU32};
use std::time::Duration;

use broker_core::internals::codec::{v5, MqttCodec, MqttPacket, Publish};
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_util::codec::{Encoder, FramedRead};

use super::WAIT;

pub use v5::Packet;

pub struct RawV5 {
    read: FramedRead<OwnedReadHalf, MqttCodec>,
    write: OwnedWriteHalf,
}

/// A CONNECT with MQTT 5 defaults: clean start, no expiry, no will.
pub fn connect(id: &str) -> v5::Connect {
    v5::Connect {
        clean_start: true,
        keep_alive: 0,
        session_expiry_interval_secs: 0,
        auth_method: None,
        auth_data: None,
        request_problem_info: true,
        request_response_info: false,
        receive_max: None,
        topic_alias_max: 0,
        user_properties: Vec::new(),
        max_packet_size: None,
        last_will: None,
        client_id: ByteString::from(id),
        username: None,
        password: None,
        cert: None,
    }
}

/// A will on `topic` with no properties.
pub fn will(topic: &str, payload: &str) -> v5::LastWill {
    v5::LastWill {
        qos: v5::QoS::AtLeastOnce,
        retain: false,
        topic: ByteString::from(topic),
        message: Bytes::copy_from_slice(payload.as_bytes()),
        will_delay_interval_sec: None,
        correlation_data: None,
        message_expiry_interval: None,
        content_type: None,
        user_properties: Vec::new(),
        is_utf8_payload: None,
        response_topic: None,
    }
}

pub fn pid(n: u16) -> NonZeroU16 {
    NonZeroU16::new(n).expect("non-zero packet id")
}

/// A PUBLISH with empty properties; QoS 0 when `packet_id` is 0.
pub fn publish(topic: &str, payload: &str, qos: u8, packet_id: u16) -> Publish {
    Publish {
        dup: false,
        retain: false,
        qos: v5::QoS::try_from(qos).expect("qos"),
        topic: ByteString::from(topic),
        packet_id: NonZeroU16::new(packet_id),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        properties: Some(v5::PublishProperties::default()),
    }
}

/// Subscription options at `qos`, everything else default.
pub fn opts(qos: u8) -> v5::SubscriptionOptions {
    v5::SubscriptionOptions {
        qos: v5::QoS::try_from(qos).expect("qos"),
        ..v5::SubscriptionOptions::default()
    }
}

pub fn ack(packet_id: NonZeroU16, reason_code: v5::PublishAckReason) -> v5::PublishAck {
    v5::PublishAck {
        packet_id,
        reason_code,
        properties: Vec::new(),
        reason_string: None,
    }
}

pub fn ack2(packet_id: NonZeroU16) -> v5::PublishAck2 {
    v5::PublishAck2 {
        packet_id,
        reason_code: v5::PublishAck2Reason::Success,
        properties: Vec::new(),
        reason_string: None,
    }
}

pub fn payload(p: &Publish) -> String {
    String::from_utf8_lossy(&p.payload).into_owned()
}

impl RawV5 {
    pub async fn open(addr: SocketAddr) -> RawV5 {
        let stream = TcpStream::connect(addr).await.expect("tcp connect");
        let (r, w) = stream.into_split();
        RawV5 {
            read: FramedRead::new(r, MqttCodec::V5(v5::Codec::new(0, 0))),
            write: w,
        }
    }

    /// Open, send `c`, and return the CONNACK (whatever its reason code).
    pub async fn connect_with(addr: SocketAddr, c: v5::Connect) -> (RawV5, v5::ConnectAck) {
        let mut client = RawV5::open(addr).await;
        client.send(Packet::Connect(Box::new(c))).await;
        match client.recv().await {
            Packet::ConnectAck(a) => (client, *a),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Connect with `c` and insist on success.
    pub async fn connect(addr: SocketAddr, c: v5::Connect) -> (RawV5, v5::ConnectAck) {
        let (client, ack) = RawV5::connect_with(addr, c).await;
        assert_eq!(ack.reason_code, v5::ConnectAckReason::Success, "{ack:?}");
        (client, ack)
    }

    pub async fn send(&mut self, p: Packet) {
        let mut buf = BytesMut::new();
        v5::Codec::new(0, 0).encode(p, &mut buf).expect("encodes");
        self.write.write_all(&buf).await.expect("write");
    }

    pub async fn send_bytes(&mut self, b: &[u8]) {
        let _ = self.write.write_all(b).await;
    }

    /// The next packet; panics after [`WAIT`] or on close.
    pub async fn recv(&mut self) -> Packet {
        match tokio::time::timeout(WAIT, self.read.next()).await {
            Ok(Some(Ok((MqttPacket::V5(p), _)))) => p,
            Ok(other) => panic!("connection ended or bad frame: {other:?}"),
            Err(_) => panic!("no packet within {WAIT:?}"),
        }
    }

    /// The next packet if one arrives within `d`.
    pub async fn try_recv(&mut self, d: Duration) -> Option<Packet> {
        match tokio::time::timeout(d, self.read.next()).await {
            Ok(Some(Ok((MqttPacket::V5(p), _)))) => Some(p),
            Ok(other) => panic!("connection ended or bad frame: {other:?}"),
            Err(_) => None,
        }
    }

    /// The broker's DISCONNECT, then the close of the connection.
    pub async fn expect_disconnect(&mut self) -> v5::Disconnect {
        let d = match self.recv().await {
            Packet::Disconnect(d) => d,
            other => panic!("expected DISCONNECT, got {other:?}"),
        };
        self.expect_closed().await;
        d
    }

    /// Asserts the broker closes the connection within [`WAIT`].
    pub async fn expect_closed(&mut self) {
        match tokio::time::timeout(WAIT, self.read.next()).await {
            Ok(None) | Ok(Some(Err(_))) => {}
            Ok(Some(Ok(p))) => panic!("expected the connection to close, got {p:?}"),
            Err(_) => panic!("connection not closed within {WAIT:?}"),
        }
    }

    /// SUBSCRIBE (packet id 1000) and return the SUBACK's reason codes.
    pub async fn subscribe(
        &mut self,
        filters: &[(&str, v5::SubscriptionOptions)],
        id: Option<u32>,
    ) -> Vec<v5::SubscribeAckReason> {
        self.send(Packet::Subscribe(v5::Subscribe {
            packet_id: pid(1000),
            id: id.and_then(NonZeroU32::new),
            user_properties: Vec::new(),
            topic_filters: filters
                .iter()
                .map(|(f, o)| (ByteString::from(*f), *o))
                .collect(),
        }))
        .await;
        match self.recv().await {
            Packet::SubscribeAck(a) => {
                assert_eq!(a.packet_id, pid(1000));
                a.status
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    pub async fn unsubscribe(&mut self, filters: &[&str]) -> Vec<v5::UnsubscribeAckReason> {
        self.send(Packet::Unsubscribe(v5::Unsubscribe {
            packet_id: pid(1001),
            user_properties: Vec::new(),
            topic_filters: filters.iter().map(|f| ByteString::from(*f)).collect(),
        }))
        .await;
        match self.recv().await {
            Packet::UnsubscribeAck(a) => {
                assert_eq!(a.packet_id, pid(1001));
                a.status
            }
            other => panic!("expected UNSUBACK, got {other:?}"),
        }
    }

    /// Publish `p` and complete its QoS flow; returns the PUBACK/PUBREC reason.
    pub async fn publish(&mut self, p: Publish) -> Option<v5::PublishAckReason> {
        let id = p.packet_id;
        let qos = p.qos;
        self.send(Packet::Publish(Box::new(p))).await;
        match (qos, id) {
            (v5::QoS::AtLeastOnce, Some(id)) => match self.recv().await {
                Packet::PublishAck(a) => {
                    assert_eq!(a.packet_id, id);
                    Some(a.reason_code)
                }
                other => panic!("expected PUBACK, got {other:?}"),
            },
            (v5::QoS::ExactlyOnce, Some(id)) => {
                let code = match self.recv().await {
                    Packet::PublishReceived(a) => {
                        assert_eq!(a.packet_id, id);
                        a.reason_code
                    }
                    other => panic!("expected PUBREC, got {other:?}"),
                };
                if (code as u8) < 0x80 {
                    self.send(Packet::PublishRelease(ack2(id))).await;
                    match self.recv().await {
                        Packet::PublishComplete(c) => assert_eq!(c.packet_id, id),
                        other => panic!("expected PUBCOMP, got {other:?}"),
                    }
                }
                Some(code)
            }
            _ => None,
        }
    }

    /// The next PUBLISH; any other packet fails the test.
    pub async fn recv_publish(&mut self) -> Publish {
        match self.recv().await {
            Packet::Publish(p) => *p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Receive a PUBLISH and acknowledge it fully.
    pub async fn recv_and_ack(&mut self) -> Publish {
        let p = self.recv_publish().await;
        if let Some(id) = p.packet_id {
            match p.qos {
                v5::QoS::AtLeastOnce => {
                    self.send(Packet::PublishAck(ack(id, v5::PublishAckReason::Success)))
                        .await
                }
                v5::QoS::ExactlyOnce => {
                    self.send(Packet::PublishReceived(ack(
                        id,
                        v5::PublishAckReason::Success,
                    )))
                    .await;
                    match self.recv().await {
                        Packet::PublishRelease(r) => assert_eq!(r.packet_id, id),
                        other => panic!("expected PUBREL, got {other:?}"),
                    }
                    self.send(Packet::PublishComplete(ack2(id))).await;
                }
                _ => {}
            }
        }
        p
    }

    /// DISCONNECT with `reason` and an optional new session expiry, then close.
    pub async fn disconnect_with(mut self, reason: v5::DisconnectReasonCode, expiry: Option<u32>) {
        self.send(Packet::Disconnect(v5::Disconnect {
            reason_code: reason,
            session_expiry_interval_secs: expiry,
            ..v5::Disconnect::default()
        }))
        .await;
        let _ = self.write.shutdown().await;
    }

    pub async fn disconnect(self) {
        self.disconnect_with(v5::DisconnectReasonCode::NormalDisconnection, None)
            .await
    }

    /// Drop the socket without DISCONNECT.
    pub fn drop_socket(self) {}
}
