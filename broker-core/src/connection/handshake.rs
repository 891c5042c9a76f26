//! From the first byte to CONNACK: protocol detection, the CONNECT packet,
//! MQTT 5 enhanced authentication, and refusals with the right reason code.

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout, Instant};
use tokio_util::codec::FramedRead;

use crate::broker::Core;
use crate::codec::{
    reason, start, upgrade, v3, v5, DecodeError, Encoder, MqttCodec, MqttPacket, Protocol,
};
use crate::hooks::AuthStep;

/// A CONNECT the broker accepted to read, in MQTT 5 form.
pub(super) struct Hello {
    pub protocol: Protocol,
    pub connect: Box<v5::Connect>,
    /// A 3.1 / 3.1.1 CONNECT with the bridge bit (Mosquitto's `try_private`):
    /// the client is another broker's bridge.
    pub bridge: bool,
}

/// Write one packet and flush it; CONNACK and AUTH go out before the
/// writer task exists. Returns the bytes written.
pub(super) async fn send_now<W: AsyncWrite + Unpin>(
    write: &mut W,
    encoder: &mut Encoder,
    packet: v5::Packet,
) -> std::io::Result<usize> {
    let mut buf = BytesMut::new();
    encoder
        .encode(packet, &mut buf)
        .map_err(std::io::Error::other)?;
    write.write_all(&buf).await?;
    write.flush().await?;
    Ok(buf.len())
}

/// The bytes of a whole packet on the wire whose remaining length is
/// `remaining` (what the codec reports): fixed header byte, the length's
/// own bytes, the rest.
pub(super) fn wire_len(remaining: u32) -> u64 {
    let length_bytes = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + length_bytes + u64::from(remaining)
}

/// Answer a refused CONNECT with `code` (the connection closes next); returns `why`.
pub(super) async fn refuse<W: AsyncWrite + Unpin>(
    write: &mut W,
    protocol: Protocol,
    code: v5::ConnectAckReason,
    why: &str,
) -> String {
    let connack = v5::ConnectAck {
        reason_code: code,
        reason_string: reason(why),
        ..v5::ConnectAck::default()
    };
    let _ = send_now(
        write,
        &mut Encoder::new(protocol),
        v5::Packet::ConnectAck(Box::new(connack)),
    )
    .await;
    why.to_string()
}

/// Read the protocol version and the CONNECT packet, answering refusals.
pub(super) async fn read_connect<R, W>(
    broker: &Core,
    framed: &mut FramedRead<R, MqttCodec>,
    write: &mut W,
    deadline: Instant,
) -> Result<Hello, String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use v5::ConnectAckReason as R;
    let protocol = match next_before(framed, deadline).await? {
        Ok((MqttPacket::Version(version), _)) => start(
            framed.decoder_mut(),
            version,
            broker.config().max_packet_size,
        ),
        Ok(_) => return Err("unexpected first frame".into()),
        Err(DecodeError::UnsupportedPacketType) => {
            return Err("first packet was not CONNECT".into())
        }
        Err(DecodeError::InvalidProtocol) => {
            let why = "unknown protocol name or level";
            return Err(refuse(write, Protocol::V3, R::UnsupportedProtocolVersion, why).await);
        }
        Err(e) => return Err(format!("malformed CONNECT: {e}")),
    };
    let mut bridge = false;
    let frame = next_before(framed, deadline).await?;
    if let Ok((_, size)) = &frame {
        broker
            .stats()
            .bytes_received
            .fetch_add(wire_len(*size), std::sync::atomic::Ordering::Relaxed);
    }
    let packet = match frame {
        Ok((MqttPacket::V3(p), _)) => {
            bridge = matches!(&p, v3::Packet::Connect(c)
                if c.protocol.level() & rmqtt_codec::types::BRIDGE_LEVEL_BIT != 0);
            upgrade(p).ok()
        }
        Ok((MqttPacket::V5(p), _)) => Some(p),
        Ok(_) => None,
        Err(e) => {
            let (code, why) = match e {
                DecodeError::UnsupportedProtocolLevel => {
                    (R::UnsupportedProtocolVersion, "unsupported protocol level")
                }
                // Only from 3.1.1 (0x02): an MQTT 5 client gets an assigned id.
                DecodeError::InvalidClientId => (
                    R::ClientIdentifierNotValid,
                    "empty client id with clean session 0",
                ),
                DecodeError::MaxSizeExceeded { .. } => (R::PacketTooLarge, "CONNECT too large"),
                // MQTT 5 only: e.g. Receive Maximum 0, a property twice.
                DecodeError::ProtocolError(_) => (R::ProtocolError, "protocol error in CONNECT"),
                _ => (R::MalformedPacket, "malformed CONNECT"),
            };
            // MQTT 3.1.1 has no code for a malformed CONNECT: just close.
            if protocol == Protocol::V5 || code != R::MalformedPacket {
                refuse(write, protocol, code, why).await;
            }
            return Err(format!("{why}: {e}"));
        }
    };
    match packet {
        Some(v5::Packet::Connect(connect)) => Ok(Hello {
            protocol,
            connect,
            bridge,
        }),
        _ => Err("first packet was not CONNECT".into()),
    }
}

type Frame = Result<(MqttPacket, u32), DecodeError>;

/// The next frame, or why none came before `deadline`.
async fn next_before<R: AsyncRead + Unpin>(
    framed: &mut FramedRead<R, MqttCodec>,
    deadline: Instant,
) -> Result<Frame, String> {
    match timeout(
        deadline.saturating_duration_since(Instant::now()),
        framed.next(),
    )
    .await
    {
        Err(_) => Err("no CONNECT within the connect timeout".to_string()),
        Ok(None) => Err("closed before CONNECT".to_string()),
        Ok(Some(r)) => Ok(r),
    }
}

/// Run the enhanced-authentication exchange a CONNECT asked for, within the
/// connect timeout. Returns the method and the data for CONNACK, `None` when
/// the CONNECT named no method.
pub(super) async fn authenticate<R, W>(
    broker: &Core,
    framed: &mut FramedRead<R, MqttCodec>,
    write: &mut W,
    client_id: &str,
    connect: &mut v5::Connect,
    deadline: Instant,
) -> Result<Option<(ByteString, Option<Bytes>)>, String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use v5::ConnectAckReason as R;
    let Some(method) = connect.auth_method.clone() else {
        return Ok(None);
    };
    let exchange = broker
        .hooks()
        .enhanced_auth
        .as_ref()
        .and_then(|a| a.begin(client_id, &method));
    let Some(mut exchange) = exchange else {
        let why = format!("authentication method `{method}` not supported");
        return Err(refuse(write, Protocol::V5, R::BadAuthenticationMethod, &why).await);
    };
    let mut data = connect.auth_data.take();
    loop {
        match exchange.step(data).await {
            AuthStep::Success(d) => return Ok(Some((method, d))),
            AuthStep::Failure => {
                return Err(refuse(
                    write,
                    Protocol::V5,
                    R::NotAuthorized,
                    "authentication failed",
                )
                .await)
            }
            AuthStep::Continue(challenge) => {
                let auth = v5::Auth {
                    reason_code: v5::AuthReasonCode::ContinueAuth,
                    auth_method: Some(method.clone()),
                    auth_data: Some(challenge),
                    reason_string: None,
                    user_properties: Vec::new(),
                };
                send_now(
                    write,
                    &mut Encoder::new(Protocol::V5),
                    v5::Packet::Auth(auth),
                )
                .await
                .map_err(|e| format!("write failed during authentication: {e}"))?;
                match next_before(framed, deadline).await? {
                    Ok((MqttPacket::V5(v5::Packet::Auth(a)), _))
                        if a.reason_code == v5::AuthReasonCode::ContinueAuth
                            && a.auth_method.as_ref() == Some(&method) =>
                    {
                        data = a.auth_data;
                    }
                    _ => {
                        let why = "expected AUTH (continue) with the same method";
                        return Err(refuse(write, Protocol::V5, R::ProtocolError, why).await);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod wire_tests {
    use super::wire_len;

    #[test]
    fn whole_packet_lengths() {
        // PINGREQ: C0 00.
        assert_eq!(wire_len(0), 2);
        assert_eq!(wire_len(127), 129);
        // 128 needs two length bytes: 80 01.
        assert_eq!(wire_len(128), 131);
        assert_eq!(wire_len(16_384), 16_388);
        assert_eq!(wire_len(268_435_455), 268_435_460);
    }
}
