//! A raw MQTT 3.1.1 / 5 client over TCP that sends exactly what the harness
//! tells it and acknowledges nothing by itself: the model decides when
//! PUBACK, PUBREC and PUBCOMP go out, and the DUP flags and packet ids the
//! broker sends stay visible.

use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::time::Duration;

use broker_core::internals::codec::{v3, v5, MqttCodec, MqttPacket, Publish};
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_util::codec::{Encoder, FramedRead};

use super::ops::Proto;

/// A packet from the broker, in the terms the model compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rx {
    ConnAck {
        ok: bool,
        present: bool,
    },
    Publish {
        pid: Option<u16>,
        qos: u8,
        dup: bool,
        retain: bool,
        topic: String,
        payload: String,
    },
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    /// Granted QoS per filter, `None` for a refusal.
    SubAck(Vec<Option<u8>>),
    /// MQTT 5: whether the subscription existed (3.1.1 does not say).
    UnsubAck(Option<bool>),
    PingResp,
    /// MQTT 5 DISCONNECT from the broker, with its reason code.
    Disconnect(u8),
    Other(String),
}

/// A packet to the broker.
#[derive(Debug, Clone)]
pub enum Tx<'a> {
    Connect {
        id: &'a str,
        proto: Proto,
    },
    Publish {
        topic: &'a str,
        payload: String,
        qos: u8,
        pid: u16,
        retain: bool,
    },
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        pid: u16,
        filter: &'a str,
        qos: u8,
    },
    Unsubscribe {
        pid: u16,
        filter: &'a str,
    },
    PingReq,
    /// MQTT 5 may set a new session expiry interval.
    Disconnect {
        expiry: Option<u32>,
    },
}

pub struct Raw {
    read: FramedRead<OwnedReadHalf, MqttCodec>,
    write: OwnedWriteHalf,
    pub v5: bool,
}

fn pid(n: u16) -> NonZeroU16 {
    NonZeroU16::new(n).expect("non-zero packet id")
}

fn qos(q: u8) -> v3::QoS {
    v3::QoS::try_from(q).expect("QoS 0, 1 or 2")
}

fn ack5(n: u16) -> v5::PublishAck {
    v5::PublishAck {
        packet_id: pid(n),
        reason_code: v5::PublishAckReason::Success,
        properties: Vec::new(),
        reason_string: None,
    }
}

fn ack5b(n: u16) -> v5::PublishAck2 {
    v5::PublishAck2 {
        packet_id: pid(n),
        reason_code: v5::PublishAck2Reason::Success,
        properties: Vec::new(),
        reason_string: None,
    }
}

fn rx_publish(p: &Publish) -> Rx {
    Rx::Publish {
        pid: p.packet_id.map(|p| p.get()),
        qos: p.qos as u8,
        dup: p.dup,
        retain: p.retain,
        topic: p.topic.to_string(),
        payload: String::from_utf8_lossy(&p.payload).into_owned(),
    }
}

fn from_v3(p: v3::Packet) -> Rx {
    match p {
        v3::Packet::ConnectAck(a) => Rx::ConnAck {
            ok: a.return_code == v3::ConnectAckReason::ConnectionAccepted,
            present: a.session_present,
        },
        v3::Packet::Publish(p) => rx_publish(&p),
        v3::Packet::PublishAck { packet_id } => Rx::PubAck(packet_id.get()),
        v3::Packet::PublishReceived { packet_id } => Rx::PubRec(packet_id.get()),
        v3::Packet::PublishRelease { packet_id } => Rx::PubRel(packet_id.get()),
        v3::Packet::PublishComplete { packet_id } => Rx::PubComp(packet_id.get()),
        v3::Packet::SubscribeAck { status, .. } => Rx::SubAck(
            status
                .into_iter()
                .map(|s| match s {
                    v3::SubscribeReturnCode::Success(q) => Some(q as u8),
                    v3::SubscribeReturnCode::Failure => None,
                })
                .collect(),
        ),
        v3::Packet::UnsubscribeAck { .. } => Rx::UnsubAck(None),
        v3::Packet::PingResponse => Rx::PingResp,
        other => Rx::Other(format!("{other:?}")),
    }
}

fn from_v5(p: v5::Packet) -> Rx {
    use v5::SubscribeAckReason as S;
    match p {
        v5::Packet::ConnectAck(a) => Rx::ConnAck {
            ok: a.reason_code == v5::ConnectAckReason::Success,
            present: a.session_present,
        },
        v5::Packet::Publish(p) => rx_publish(&p),
        v5::Packet::PublishAck(a) => Rx::PubAck(a.packet_id.get()),
        v5::Packet::PublishReceived(a) => Rx::PubRec(a.packet_id.get()),
        v5::Packet::PublishRelease(a) => Rx::PubRel(a.packet_id.get()),
        v5::Packet::PublishComplete(a) => Rx::PubComp(a.packet_id.get()),
        v5::Packet::SubscribeAck(a) => Rx::SubAck(
            a.status
                .into_iter()
                .map(|s| match s {
                    S::GrantedQos0 => Some(0),
                    S::GrantedQos1 => Some(1),
                    S::GrantedQos2 => Some(2),
                    _ => None,
                })
                .collect(),
        ),
        v5::Packet::UnsubscribeAck(a) => Rx::UnsubAck(Some(
            a.status.first() == Some(&v5::UnsubscribeAckReason::Success),
        )),
        v5::Packet::PingResponse => Rx::PingResp,
        v5::Packet::Disconnect(d) => Rx::Disconnect(d.reason_code as u8),
        other => Rx::Other(format!("{other:?}")),
    }
}

fn v3_packet(p: Tx<'_>) -> v3::Packet {
    match p {
        Tx::Connect { id, proto } => {
            let clean = match proto {
                Proto::V3 { clean } => clean,
                Proto::V5 { .. } => unreachable!("an MQTT 5 CONNECT on a 3.1.1 client"),
            };
            v3::Packet::Connect(Box::new(v3::Connect {
                protocol: Default::default(),
                clean_session: clean,
                keep_alive: 0,
                last_will: None,
                client_id: ByteString::from(id),
                username: None,
                password: None,
                cert: None,
            }))
        }
        Tx::Publish {
            topic,
            payload,
            qos: q,
            pid: n,
            retain,
        } => v3::Packet::Publish(Box::new(Publish {
            dup: false,
            retain,
            qos: qos(q),
            topic: ByteString::from(topic),
            packet_id: (q > 0).then(|| pid(n)),
            payload: Bytes::from(payload),
            properties: None,
        })),
        Tx::PubAck(n) => v3::Packet::PublishAck { packet_id: pid(n) },
        Tx::PubRec(n) => v3::Packet::PublishReceived { packet_id: pid(n) },
        Tx::PubRel(n) => v3::Packet::PublishRelease { packet_id: pid(n) },
        Tx::PubComp(n) => v3::Packet::PublishComplete { packet_id: pid(n) },
        Tx::Subscribe {
            pid: n,
            filter,
            qos: q,
        } => v3::Packet::Subscribe {
            packet_id: pid(n),
            topic_filters: vec![(ByteString::from(filter), qos(q))],
        },
        Tx::Unsubscribe { pid: n, filter } => v3::Packet::Unsubscribe {
            packet_id: pid(n),
            topic_filters: vec![ByteString::from(filter)],
        },
        Tx::PingReq => v3::Packet::PingRequest,
        Tx::Disconnect { .. } => v3::Packet::Disconnect,
    }
}

fn v5_packet(p: Tx<'_>) -> v5::Packet {
    match p {
        Tx::Connect { id, proto } => {
            let (clean_start, expiry) = match proto {
                Proto::V5 {
                    clean_start,
                    expiry,
                } => (clean_start, expiry),
                Proto::V3 { .. } => unreachable!("a 3.1.1 CONNECT on an MQTT 5 client"),
            };
            v5::Packet::Connect(Box::new(v5::Connect {
                clean_start,
                keep_alive: 0,
                session_expiry_interval_secs: expiry,
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
            }))
        }
        Tx::Publish {
            topic,
            payload,
            qos: q,
            pid: n,
            retain,
        } => v5::Packet::Publish(Box::new(Publish {
            dup: false,
            retain,
            qos: qos(q),
            topic: ByteString::from(topic),
            packet_id: (q > 0).then(|| pid(n)),
            payload: Bytes::from(payload),
            properties: Some(v5::PublishProperties::default()),
        })),
        Tx::PubAck(n) => v5::Packet::PublishAck(ack5(n)),
        Tx::PubRec(n) => v5::Packet::PublishReceived(ack5(n)),
        Tx::PubRel(n) => v5::Packet::PublishRelease(ack5b(n)),
        Tx::PubComp(n) => v5::Packet::PublishComplete(ack5b(n)),
        Tx::Subscribe {
            pid: n,
            filter,
            qos: q,
        } => v5::Packet::Subscribe(v5::Subscribe {
            packet_id: pid(n),
            id: None,
            user_properties: Vec::new(),
            topic_filters: vec![(
                ByteString::from(filter),
                v5::SubscriptionOptions {
                    qos: qos(q),
                    ..v5::SubscriptionOptions::default()
                },
            )],
        }),
        Tx::Unsubscribe { pid: n, filter } => v5::Packet::Unsubscribe(v5::Unsubscribe {
            packet_id: pid(n),
            user_properties: Vec::new(),
            topic_filters: vec![ByteString::from(filter)],
        }),
        Tx::PingReq => v5::Packet::PingRequest,
        Tx::Disconnect { expiry } => v5::Packet::Disconnect(v5::Disconnect {
            reason_code: v5::DisconnectReasonCode::NormalDisconnection,
            session_expiry_interval_secs: expiry,
            ..v5::Disconnect::default()
        }),
    }
}

impl Raw {
    /// Open a TCP connection, send CONNECT and return CONNACK's session present.
    pub async fn connect(
        addr: SocketAddr,
        id: &str,
        proto: Proto,
        wait: Duration,
    ) -> Result<(Raw, bool), String> {
        let v5 = matches!(proto, Proto::V5 { .. });
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("{id}: TCP connect to {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        let codec = if v5 {
            MqttCodec::V5(v5::Codec::new(0, 0))
        } else {
            MqttCodec::V3(v3::Codec::new(0))
        };
        let mut raw = Raw {
            read: FramedRead::new(r, codec),
            write: w,
            v5,
        };
        raw.send(Tx::Connect { id, proto }).await?;
        match raw.recv(wait).await? {
            Rx::ConnAck { ok: true, present } => Ok((raw, present)),
            other => Err(format!(
                "{id}: expected a successful CONNACK, got {other:?}"
            )),
        }
    }

    pub async fn send(&mut self, p: Tx<'_>) -> Result<(), String> {
        let mut buf = BytesMut::new();
        let what = format!("{p:?}");
        let encoded = if self.v5 {
            v5::Codec::new(0, 0).encode(v5_packet(p), &mut buf)
        } else {
            v3::Codec::new(0).encode(v3_packet(p), &mut buf)
        };
        encoded.map_err(|e| format!("cannot encode {what}: {e}"))?;
        self.write
            .write_all(&buf)
            .await
            .map_err(|e| format!("write of {what} failed: {e}"))
    }

    /// The next packet, or `None` if nothing came within `d`; an error if
    /// the connection ended.
    pub async fn try_recv(&mut self, d: Duration) -> Result<Option<Rx>, String> {
        match tokio::time::timeout(d, self.read.next()).await {
            Ok(Some(Ok((MqttPacket::V3(p), _)))) => Ok(Some(from_v3(p))),
            Ok(Some(Ok((MqttPacket::V5(p), _)))) => Ok(Some(from_v5(p))),
            Ok(Some(Ok(other))) => Err(format!("unexpected frame {other:?}")),
            Ok(Some(Err(e))) => Err(format!("bad frame from the broker: {e:?}")),
            Ok(None) => Err("the broker closed the connection".into()),
            Err(_) => Ok(None),
        }
    }

    /// The next packet; an error after `wait` or on close.
    pub async fn recv(&mut self, wait: Duration) -> Result<Rx, String> {
        self.try_recv(wait)
            .await?
            .ok_or_else(|| format!("no packet within {wait:?}"))
    }

    /// Read until the broker closes the connection; an MQTT 5 client may
    /// get a DISCONNECT first. Anything else is returned as an error.
    pub async fn expect_closed(&mut self, wait: Duration) -> Result<(), String> {
        loop {
            match tokio::time::timeout(wait, self.read.next()).await {
                Ok(None) | Ok(Some(Err(_))) => return Ok(()),
                Ok(Some(Ok((MqttPacket::V5(v5::Packet::Disconnect(_)), _)))) if self.v5 => {}
                Ok(Some(Ok((p, _)))) => {
                    return Err(format!("expected the connection to close, got {p:?}"))
                }
                Err(_) => return Err(format!("connection not closed within {wait:?}")),
            }
        }
    }

    /// Close the write side (after DISCONNECT).
    pub async fn shutdown(&mut self) {
        let _ = self.write.shutdown().await;
    }
}
