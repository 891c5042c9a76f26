//! The writer: control packets first, then the link's outbox in order. It
//! runs as a second future of the connection's task, beside the reader.

use std::num::NonZeroU32;

use bytes::BytesMut;
use bytestring::ByteString;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, WriteHalf};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::aliases::{AliasUse, OutboundAliases};
use super::Control;
use crate::codec::{packet_id, pubcomp, to_wire_qos, v5, EncodeError, Encoder, Publish};
use crate::link::Outbox;
use crate::message::{now_ms, Message, QoS};
use crate::session::Outgoing;
use crate::storage::ClientId;

/// Payload and topic bytes taken from the queue per write: a client that
/// reads slowly leaves its backlog in the session queue, where
/// `max_queued_bytes` bounds it, not in this task's buffer.
const WRITE_BUDGET: usize = 64 * 1024;

/// What the writer needs to know about the client's limits (its in-flight
/// window is the outbox's).
pub(super) struct Outbound {
    /// Encodes in the client's protocol, within its Maximum Packet Size.
    pub encoder: Encoder,
    /// The client's Topic Alias Maximum.
    pub topic_alias_max: u16,
}

/// Run until the reader asks to close, the socket fails, or `stop` is cancelled.
pub(super) async fn run<S>(
    mut write: WriteHalf<S>,
    Outbound {
        mut encoder,
        topic_alias_max,
    }: Outbound,
    mut outbox: Outbox,
    client: ClientId,
    mut control: mpsc::Receiver<Control>,
    stop: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    // Grows with the traffic; an idle connection keeps next to nothing.
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut aliases = OutboundAliases::new(topic_alias_max);
    // One cancellation future for the whole run, not one per turn (each
    // registers a waiter under the token's lock).
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let mut last = None;
        while let Ok(c) = control.try_recv() {
            match c {
                Control::Packet(p) => encode_control(&mut encoder, *p, &mut buf, &client),
                Control::Close(p) => {
                    last = Some(p);
                    break;
                }
            }
        }
        if let Some(last) = last {
            if let Some(p) = last {
                encode_control(&mut encoder, *p, &mut buf, &client);
            }
            let _ = write.write_all_buf(&mut buf).await;
            let _ = write.shutdown().await;
            return;
        }
        let more = outbox.take(WRITE_BUDGET, &mut out);
        for o in out.drain(..) {
            encode_outgoing(
                &mut encoder,
                &mut aliases,
                o,
                &mut buf,
                &client,
                &mut outbox,
            );
        }
        if !buf.is_empty() {
            outbox.wrote(buf.len());
            tokio::select! {
                r = write.write_all_buf(&mut buf) => {
                    if r.is_err() {
                        stop.cancel();
                        return;
                    }
                }
                _ = &mut stopped => return,
            }
            buf.clear();
            if buf.capacity() > 4 * WRITE_BUDGET {
                // A large message passed: give its buffer back.
                buf = BytesMut::new();
            }
        }
        if more {
            // The budget stopped the drain: write more before waiting.
            continue;
        }
        // Before waiting, push out what the stream still holds: a TLS
        // stream accepts a write into its own buffer when the socket is
        // full (or the task's I/O budget is spent) and sends it only on a
        // later write or a flush. A no-op on plain TCP.
        tokio::select! {
            r = write.flush() => {
                if r.is_err() {
                    stop.cancel();
                    return;
                }
            }
            _ = &mut stopped => return,
        }
        tokio::select! {
            biased;
            _ = &mut stopped => {
                let _ = write.flush().await;
                return;
            }
            c = control.recv() => match c {
                Some(Control::Packet(p)) => encode_control(&mut encoder, *p, &mut buf, &client),
                Some(Control::Close(p)) => {
                    if let Some(p) = p {
                        encode_control(&mut encoder, *p, &mut buf, &client);
                    }
                    let _ = write.write_all_buf(&mut buf).await;
                    let _ = write.shutdown().await;
                    return;
                }
                None => {
                    let _ = write.shutdown().await;
                    return;
                }
            },
            _ = outbox.changed() => {}
        }
    }
}

fn encode_control(encoder: &mut Encoder, p: v5::Packet, buf: &mut BytesMut, client: &ClientId) {
    if let Err(e) = encoder.encode(p, buf) {
        debug!(%client, error = %e, "control packet not sent");
    }
}

/// Encode one delivery. A PUBLISH larger than the client accepts is dropped
/// as if delivered (MQTT 5 section 3.1.2.11.4); its store entry goes with it.
fn encode_outgoing(
    encoder: &mut Encoder,
    aliases: &mut OutboundAliases,
    o: Outgoing,
    buf: &mut BytesMut,
    client: &ClientId,
    outbox: &mut Outbox,
) {
    match o {
        Outgoing::PubRel { packet_id: id } => {
            let p =
                v5::Packet::PublishRelease(pubcomp(packet_id(id), v5::PublishAck2Reason::Success));
            encode_control(encoder, p, buf, client);
        }
        Outgoing::Publish {
            packet_id: id,
            dup,
            qos,
            retain,
            subscription_ids,
            message,
        } => {
            let alias = aliases.lookup(&message.topic);
            let publish = wire_publish(&message, id, dup, qos, retain, subscription_ids, alias);
            match encoder.encode(v5::Packet::Publish(Box::new(publish)), buf) {
                Ok(()) => aliases.sent(&message.topic, alias),
                Err(EncodeError::OverMaxPacketSize { size, max }) => {
                    debug!(%client, topic = %message.topic, size, max, "message larger than the client accepts: dropped");
                    if let Some(id) = id {
                        outbox.abandon(id);
                    }
                }
                Err(e) => warn!(%client, error = %e, "could not encode an outgoing message"),
            }
        }
    }
}

/// The PUBLISH for a delivery, with the message's MQTT 5 properties (the
/// codec drops them for 3.1.1 clients) and the expiry interval that remains.
fn wire_publish(
    message: &Message,
    id: Option<u16>,
    dup: bool,
    qos: QoS,
    retain: bool,
    subscription_ids: Vec<u32>,
    alias: AliasUse,
) -> Publish {
    let p = &message.properties;
    let (topic, topic_alias) = match alias {
        AliasUse::None => (ByteString::from(message.topic.as_str()), None),
        AliasUse::Set(a) => (ByteString::from(message.topic.as_str()), Some(a)),
        AliasUse::Known(a) => (ByteString::new(), Some(a)),
    };
    let remaining = p.expires_at_ms.map(|at| {
        let ms = at.saturating_sub(now_ms());
        // Rounded up: a message is never reported as already expired.
        NonZeroU32::new(ms.div_ceil(1000).clamp(1, u64::from(u32::MAX)) as u32)
            .unwrap_or(NonZeroU32::MIN)
    });
    Publish {
        dup,
        retain,
        qos: to_wire_qos(qos),
        topic,
        packet_id: id.filter(|_| qos != QoS::AtMostOnce).map(packet_id),
        payload: message.payload.clone(),
        properties: Some(v5::PublishProperties {
            topic_alias: topic_alias.and_then(std::num::NonZeroU16::new),
            correlation_data: p.correlation_data.clone(),
            message_expiry_interval: remaining,
            content_type: p.content_type.as_deref().map(ByteString::from),
            user_properties: p
                .user_properties
                .iter()
                .map(|(k, v)| (ByteString::from(k.as_str()), ByteString::from(v.as_str())))
                .collect(),
            is_utf8_payload: p.payload_format_utf8 == Some(true),
            response_topic: p.response_topic.as_deref().map(ByteString::from),
            subscription_ids: subscription_ids
                .into_iter()
                .filter_map(NonZeroU32::new)
                .collect(),
        }),
    }
}
