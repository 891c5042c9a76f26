//! The remote side's wire: one MQTT client connection over the workspace's
//! codec (`rmqtt-codec`), TCP or TLS.
//!
//! The bridge speaks MQTT 5 packets only; for an MQTT 3.1.1 remote they are
//! turned into their 3.1.1 forms on the way out and back on the way in, as
//! the broker's own connections do. The CONNECT is the exception: a 3.1.1
//! one carries protocol level 0x84 (4 | 0x80, the bridge bit of Mosquitto's
//! `try_private`), which the codec writes as given.

use std::net::SocketAddr;
use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use futures::StreamExt;
use rmqtt_codec::error::{DecodeError, EncodeError};
use rmqtt_codec::types::Protocol;
use rmqtt_codec::{v3, v5};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::{Decoder, Encoder, FramedRead};

use crate::config::{split_address, BridgeConfig, MqttVersion};

/// Protocol level of an MQTT 3.1.1 bridge CONNECT.
pub(crate) const BRIDGE_LEVEL_311: u8 =
    rmqtt_codec::types::MQTT_LEVEL_311 | rmqtt_codec::types::BRIDGE_LEVEL_BIT;

/// Why a remote connection failed or ended.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The address did not resolve.
    #[error("cannot resolve {0}")]
    Resolve(String),
    /// TCP or TLS I/O failed.
    #[error("network: {0}")]
    Io(#[from] std::io::Error),
    /// The TLS settings could not be loaded.
    #[error("TLS: {0}")]
    Tls(String),
    /// The remote sent bytes that are not MQTT (or too large a packet).
    #[error("bad packet from the remote: {0}")]
    Decode(#[from] DecodeError),
    /// A packet could not be encoded.
    #[error("cannot encode a packet: {0}")]
    Encode(#[from] EncodeError),
    /// CONNACK refused the connection.
    #[error("connection refused: {0}")]
    Refused(String),
    /// The remote broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The remote sent DISCONNECT (MQTT 5).
    #[error("disconnected by the remote: {0}")]
    Disconnected(String),
    /// The remote closed the connection.
    #[error("the remote closed the connection")]
    Closed,
    /// Something did not come in time.
    #[error("timed out: {0}")]
    Timeout(&'static str),
}

/// The codec of one version, MQTT 5 packets on our side.
pub(crate) enum Wire {
    V3(v3::Codec),
    V5(v5::Codec),
}

impl Wire {
    fn new(version: MqttVersion, max_packet_size: u32) -> Wire {
        match version {
            MqttVersion::V311 => Wire::V3(v3::Codec::new(max_packet_size)),
            MqttVersion::V5 => Wire::V5(v5::Codec::new(max_packet_size, max_packet_size)),
        }
    }
}

impl Decoder for Wire {
    type Item = v5::Packet;
    type Error = RemoteError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<v5::Packet>, RemoteError> {
        match self {
            Wire::V5(c) => Ok(c.decode(src)?.map(|(p, _)| p)),
            Wire::V3(c) => match c.decode(src)? {
                None => Ok(None),
                Some((p, _)) => upgrade(p).map(Some),
            },
        }
    }
}

impl Encoder<v5::Packet> for Wire {
    type Error = RemoteError;

    fn encode(&mut self, p: v5::Packet, dst: &mut BytesMut) -> Result<(), RemoteError> {
        match self {
            Wire::V5(c) => Ok(c.encode(p, dst)?),
            Wire::V3(c) => match downgrade(p) {
                Some(p) => Ok(c.encode(p, dst)?),
                None => Ok(()),
            },
        }
    }
}

/// A 3.1.1 packet from the remote in MQTT 5 terms.
fn upgrade(p: v3::Packet) -> Result<v5::Packet, RemoteError> {
    use v5::Packet as P5;
    Ok(match p {
        v3::Packet::ConnectAck(a) => P5::ConnectAck(Box::new(v5::ConnectAck {
            session_present: a.session_present,
            reason_code: match a.return_code {
                v3::ConnectAckReason::ConnectionAccepted => v5::ConnectAckReason::Success,
                v3::ConnectAckReason::UnacceptableProtocolVersion => {
                    v5::ConnectAckReason::UnsupportedProtocolVersion
                }
                v3::ConnectAckReason::IdentifierRejected => {
                    v5::ConnectAckReason::ClientIdentifierNotValid
                }
                v3::ConnectAckReason::BadUserNameOrPassword => {
                    v5::ConnectAckReason::BadUserNameOrPassword
                }
                v3::ConnectAckReason::NotAuthorized => v5::ConnectAckReason::NotAuthorized,
                _ => v5::ConnectAckReason::ServerUnavailable,
            },
            ..v5::ConnectAck::default()
        })),
        v3::Packet::Publish(p) => P5::Publish(p),
        v3::Packet::PublishAck { packet_id } => P5::PublishAck(ack(packet_id)),
        v3::Packet::PublishReceived { packet_id } => P5::PublishReceived(ack(packet_id)),
        v3::Packet::PublishRelease { packet_id } => P5::PublishRelease(ack2(packet_id)),
        v3::Packet::PublishComplete { packet_id } => P5::PublishComplete(ack2(packet_id)),
        v3::Packet::SubscribeAck { packet_id, status } => P5::SubscribeAck(v5::SubscribeAck {
            packet_id,
            properties: Vec::new(),
            reason_string: None,
            status: status
                .into_iter()
                .map(|s| match s {
                    v3::SubscribeReturnCode::Success(v3::QoS::AtMostOnce) => {
                        v5::SubscribeAckReason::GrantedQos0
                    }
                    v3::SubscribeReturnCode::Success(v3::QoS::AtLeastOnce) => {
                        v5::SubscribeAckReason::GrantedQos1
                    }
                    v3::SubscribeReturnCode::Success(v3::QoS::ExactlyOnce) => {
                        v5::SubscribeAckReason::GrantedQos2
                    }
                    v3::SubscribeReturnCode::Failure => v5::SubscribeAckReason::UnspecifiedError,
                })
                .collect(),
        }),
        v3::Packet::UnsubscribeAck { packet_id } => P5::UnsubscribeAck(v5::UnsubscribeAck {
            packet_id,
            properties: Vec::new(),
            reason_string: None,
            status: Vec::new(),
        }),
        v3::Packet::PingResponse => P5::PingResponse,
        other => {
            return Err(RemoteError::Protocol(format!(
                "a server does not send packet type {:#x}",
                other.packet_type()
            )))
        }
    })
}

/// The 3.1.1 form of a packet the bridge sends; `None` for what 3.1.1 lacks.
fn downgrade(p: v5::Packet) -> Option<v3::Packet> {
    use v5::Packet as P5;
    Some(match p {
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
        P5::Subscribe(s) => v3::Packet::Subscribe {
            packet_id: s.packet_id,
            topic_filters: s
                .topic_filters
                .into_iter()
                .map(|(f, o)| (f, o.qos))
                .collect(),
        },
        P5::PingRequest => v3::Packet::PingRequest,
        P5::Disconnect(_) => v3::Packet::Disconnect,
        _ => return None,
    })
}

/// A PUBACK or PUBREC, success.
pub(crate) fn ack(packet_id: NonZeroU16) -> v5::PublishAck {
    v5::PublishAck {
        packet_id,
        reason_code: v5::PublishAckReason::Success,
        properties: Vec::new(),
        reason_string: None,
    }
}

/// A PUBREL or PUBCOMP, success.
pub(crate) fn ack2(packet_id: NonZeroU16) -> v5::PublishAck2 {
    v5::PublishAck2 {
        packet_id,
        reason_code: v5::PublishAck2Reason::Success,
        properties: Vec::new(),
        reason_string: None,
    }
}

type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

/// What CONNACK said.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Accepted {
    pub(crate) session_present: bool,
    /// The remote's Receive Maximum (MQTT 5; 65535 for 3.1.1).
    pub(crate) receive_max: u16,
    /// The remote's Maximum Packet Size (MQTT 5), if it said.
    pub(crate) max_packet_size: Option<u32>,
    /// The keep alive to use (the remote's Server Keep Alive wins).
    pub(crate) keep_alive: u16,
}

/// One connection to the remote broker.
pub(crate) struct Conn {
    reader: FramedRead<ReadHalf, Wire>,
    writer: WriteHalf,
    encoder: Wire,
    buf: BytesMut,
}

/// Bytes of outgoing packets buffered before a write.
const WRITE_BUFFER: usize = 64 * 1024;

impl Conn {
    /// TCP (and TLS), CONNECT, and CONNACK, within `timeout`.
    pub(crate) async fn open(
        config: &BridgeConfig,
        tls: Option<&Arc<rustls::ClientConfig>>,
        timeout: Duration,
    ) -> Result<(Conn, Accepted), RemoteError> {
        tokio::time::timeout(timeout, Self::open_inner(config, tls))
            .await
            .map_err(|_| RemoteError::Timeout("no CONNACK"))?
    }

    async fn open_inner(
        config: &BridgeConfig,
        tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> Result<(Conn, Accepted), RemoteError> {
        let (host, port) = split_address(&config.address).map_err(RemoteError::Resolve)?;
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| RemoteError::Resolve(format!("{}: {e}", config.address)))?
            .collect();
        let mut last = None;
        let mut tcp = None;
        for a in addrs {
            match TcpStream::connect(a).await {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let tcp = match (tcp, last) {
            (Some(t), _) => t,
            (None, Some(e)) => return Err(e.into()),
            (None, None) => return Err(RemoteError::Resolve(config.address.clone())),
        };
        tcp.set_nodelay(true)?;
        let (r, w): (ReadHalf, WriteHalf) = match tls {
            None => {
                let (r, w) = tcp.into_split();
                (Box::new(r), Box::new(w))
            }
            Some(c) => {
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| RemoteError::Tls(format!("server name `{host}`: {e}")))?;
                let s = tokio_rustls::TlsConnector::from(c.clone())
                    .connect(name, tcp)
                    .await?;
                let (r, w) = tokio::io::split(s);
                (Box::new(r), Box::new(w))
            }
        };
        let max = config.max_packet_size;
        let mut conn = Conn {
            reader: FramedRead::with_capacity(r, Wire::new(config.protocol, max), 16 * 1024),
            writer: w,
            encoder: Wire::new(config.protocol, max),
            buf: BytesMut::with_capacity(WRITE_BUFFER),
        };
        conn.send_connect(config)?;
        conn.flush().await?;
        let accepted = match conn.next().await? {
            v5::Packet::ConnectAck(a) => {
                if a.reason_code != v5::ConnectAckReason::Success {
                    let mut why = format!("{:?}", a.reason_code);
                    if let Some(r) = &a.reason_string {
                        why.push_str(&format!(" ({r})"));
                    }
                    return Err(RemoteError::Refused(why));
                }
                Accepted {
                    session_present: a.session_present,
                    receive_max: a.receive_max.get(),
                    max_packet_size: a.max_packet_size,
                    keep_alive: a.server_keepalive_sec.unwrap_or(config.keep_alive_secs),
                }
            }
            other => {
                return Err(RemoteError::Protocol(format!(
                    "expected CONNACK, got packet type {:#x}",
                    other.packet_type()
                )))
            }
        };
        if let (Wire::V5(c), Some(max)) = (&mut conn.encoder, accepted.max_packet_size) {
            c.set_max_outbound_size(max);
        }
        Ok((conn, accepted))
    }

    fn send_connect(&mut self, config: &BridgeConfig) -> Result<(), RemoteError> {
        let client_id = ByteString::from(config.client_id.as_str());
        let username = config.username.as_deref().map(ByteString::from);
        let password = config
            .password
            .as_ref()
            .map(|p| Bytes::copy_from_slice(p.as_bytes()));
        match &mut self.encoder {
            Wire::V3(c) => c.encode(
                v3::Packet::Connect(Box::new(v3::Connect {
                    protocol: Protocol(BRIDGE_LEVEL_311),
                    clean_session: config.clean_start,
                    keep_alive: config.keep_alive_secs,
                    last_will: None,
                    client_id,
                    username,
                    password,
                    cert: None,
                })),
                &mut self.buf,
            )?,
            Wire::V5(c) => c.encode(
                v5::Packet::Connect(Box::new(v5::Connect {
                    clean_start: config.clean_start,
                    keep_alive: config.keep_alive_secs,
                    session_expiry_interval_secs: if config.clean_start { 0 } else { u32::MAX },
                    receive_max: NonZeroU16::new(config.max_inflight),
                    max_packet_size: NonZeroU32::new(config.max_packet_size),
                    topic_alias_max: 0,
                    client_id,
                    username,
                    password,
                    ..v5::Connect::default()
                })),
                &mut self.buf,
            )?,
        }
        Ok(())
    }

    /// Encode `p` into the write buffer.
    pub(crate) fn queue(&mut self, p: v5::Packet) -> Result<(), RemoteError> {
        self.encoder.encode(p, &mut self.buf)
    }

    /// Bytes waiting to be written.
    pub(crate) fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Write the buffer out.
    pub(crate) async fn flush(&mut self) -> Result<(), RemoteError> {
        if !self.buf.is_empty() {
            self.writer.write_all(&self.buf).await?;
            self.writer.flush().await?;
            self.buf.clear();
            if self.buf.capacity() > 4 * WRITE_BUFFER {
                self.buf = BytesMut::with_capacity(WRITE_BUFFER);
            }
        }
        Ok(())
    }

    /// The next packet (cancel-safe); `Err(Closed)` at the end of the stream.
    pub(crate) async fn next(&mut self) -> Result<v5::Packet, RemoteError> {
        match self.reader.next().await {
            Some(p) => p,
            None => Err(RemoteError::Closed),
        }
    }

    /// DISCONNECT, flushed, and the socket closed; errors are of no interest then.
    pub(crate) async fn close(mut self) {
        if self
            .queue(v5::Packet::Disconnect(v5::Disconnect::default()))
            .is_ok()
        {
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                let _ = self.flush().await;
                let _ = self.writer.shutdown().await;
            })
            .await;
        }
    }
}

/// The rustls client settings for `config`: its CA file, or the system's roots.
pub(crate) fn tls_config(config: &BridgeConfig) -> Result<Arc<rustls::ClientConfig>, RemoteError> {
    let mut roots = rustls::RootCertStore::empty();
    match &config.cafile {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| RemoteError::Tls(format!("cannot read {}: {e}", path.display())))?;
            let mut n = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| {
                    RemoteError::Tls(format!("{}: not PEM certificates: {e}", path.display()))
                })?;
                roots.add(cert).map_err(|e| {
                    RemoteError::Tls(format!("{}: unusable certificate: {e}", path.display()))
                })?;
                n += 1;
            }
            if n == 0 {
                return Err(RemoteError::Tls(format!(
                    "{} holds no PEM certificate",
                    path.display()
                )));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(RemoteError::Tls(
                    "no CA certificates found on this system: set `cafile`".into(),
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let c = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| RemoteError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_311_connect_carries_the_bridge_bit() {
        let config = BridgeConfig::new("b", "127.0.0.1:1");
        let mut buf = BytesMut::new();
        let mut c = v3::Codec::new(0);
        c.encode(
            v3::Packet::Connect(Box::new(v3::Connect {
                protocol: Protocol(BRIDGE_LEVEL_311),
                clean_session: config.clean_start,
                keep_alive: 60,
                last_will: None,
                client_id: ByteString::from("b-bridge"),
                username: None,
                password: None,
                cert: None,
            })),
            &mut buf,
        )
        .unwrap();
        // Fixed header (2), "MQTT" with its length (6), then the level.
        assert_eq!(&buf[2..8], b"\x00\x04MQTT");
        assert_eq!(buf[8], 0x84);
        assert_eq!(buf[9] & 0x02, 0, "a persistent session by default");
    }

    #[test]
    fn v3_acks_come_back_as_v5() {
        let id = NonZeroU16::new(7).unwrap();
        match upgrade(v3::Packet::PublishAck { packet_id: id }).unwrap() {
            v5::Packet::PublishAck(a) => assert_eq!(a.packet_id, id),
            other => panic!("{other:?}"),
        }
        assert!(upgrade(v3::Packet::PingRequest).is_err());
        assert!(downgrade(v5::Packet::Auth(v5::Auth::default())).is_none());
    }
}
