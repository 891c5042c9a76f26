//! The reader: decodes the client's packets and acts on them.
//!
//! Publishes are routed as they arrive (so sequence numbers follow packet
//! order) and acknowledged once their storage write has committed, in arrival
//! order, while later writes overlap. Everything is handled in MQTT 5 terms.

use std::collections::HashSet;
use std::num::NonZeroU16;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytestring::ByteString;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use tokio::io::AsyncRead;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::aliases::{AliasError, InboundAliases};
use super::{message_properties, Close, Control, PropertyError};
use crate::broker::{Granted, SessionExpiry, SubscribeRefusal, Unsubscribed};
use crate::codec::{
    from_wire_qos, inbound, puback, pubcomp, reason, v5, DecodeError, MqttCodec, MqttPacket,
    Protocol, Publish,
};
use crate::hooks::{AuthExchange, AuthStep};
use crate::link::{Ack, Link, PublishRefused};
use crate::message::{Message, QoS};
use crate::storage::StorageError;
use crate::subscription::SubscriptionOptions;
use crate::topic;

use v5::DisconnectReasonCode as D;

/// An acknowledgement waiting for its storage write, in arrival order.
type PendingAck = BoxFuture<'static, Result<Option<v5::Packet>, StorageError>>;

pub(super) struct Reader {
    link: Link,
    control: mpsc::Sender<Control>,
    pending: FuturesOrdered<PendingAck>,
    protocol: Protocol,
    /// Packet ids of QoS 1/2 publishes not yet fully acknowledged: the
    /// client's use of the broker's Receive Maximum.
    quota: HashSet<u16>,
    aliases: InboundAliases,
    /// The session was opened with expiry 0, which DISCONNECT may not raise.
    expiry_zero_at_connect: bool,
    /// The enhanced-authentication method of CONNECT, for re-authentication.
    auth_method: Option<ByteString>,
    reauth: Option<Box<dyn AuthExchange>>,
    /// The packet being handled came from a fresh socket read (see
    /// [`Reader::yield_to_earlier_readers`]).
    fresh_read: bool,
    /// The client is another broker's bridge (see `Hello::bridge`).
    bridge: bool,
}

impl Reader {
    pub(super) fn new(
        link: Link,
        control: mpsc::Sender<Control>,
        protocol: Protocol,
        expiry_zero_at_connect: bool,
        auth_method: Option<ByteString>,
        bridge: bool,
    ) -> Self {
        let aliases = InboundAliases::new(link.core().config().topic_alias_maximum);
        Reader {
            link,
            control,
            pending: FuturesOrdered::new(),
            protocol,
            quota: HashSet::new(),
            aliases,
            expiry_zero_at_connect,
            auth_method,
            reauth: None,
            fresh_read: false,
            bridge,
        }
    }

    pub(super) async fn run<R: AsyncRead + Unpin>(
        &mut self,
        framed: &mut FramedRead<R, MqttCodec>,
        keep_alive: Duration,
        kick: &CancellationToken,
        writer_stopped: CancellationToken,
    ) -> Close {
        let shutdown = self.link.core().shutdown_token();
        // Back-pressure: stop reading while this many acknowledgements wait.
        let max_pending = usize::from(self.link.core().config().receive_maximum);
        // Made once and polled again on every turn of the loop: a fresh
        // cancellation future or timer per packet registers and
        // unregisters a waiter (a timer entry) under a lock each time
        // (the `Notified` drops alone were 1.6 % of the broker's samples
        // in a QoS 0 fan-in).
        let kicked = kick.cancelled();
        let shutting_down = shutdown.cancelled();
        let stopped = writer_stopped.cancelled();
        let mut last_packet = Instant::now();
        let keep_alive_timer = sleep_until(last_packet + keep_alive);
        tokio::pin!(kicked, shutting_down, stopped, keep_alive_timer);
        loop {
            tokio::select! {
                biased;
                _ = &mut kicked => {
                    return if self.link.kicked_by_operator() { Close::Kicked } else { Close::TakenOver };
                }
                _ = &mut shutting_down => return Close::Shutdown,
                _ = &mut stopped => return Close::WriteFailed,
                Some(ack) = self.pending.next(), if !self.pending.is_empty() => {
                    match ack {
                        Ok(Some(p)) => {
                            if let Err(c) = self.send(p).await {
                                return c;
                            }
                        }
                        Ok(None) => {}
                        Err(e) => return Close::Storage(e),
                    }
                }
                _ = &mut keep_alive_timer, if !keep_alive.is_zero() => {
                    // The timer is moved on only when it fires: packets just
                    // note when they came.
                    let due = last_packet + keep_alive;
                    if due <= Instant::now() {
                        return Close::KeepAliveTimeout;
                    }
                    keep_alive_timer.as_mut().reset(due);
                }
                frame = next_frame(framed, &mut self.fresh_read), if self.pending.len() < max_pending => {
                    if let Some(Ok((_, size))) = &frame {
                        self.link.core().stats().bytes_received.fetch_add(super::handshake::wire_len(*size), Ordering::Relaxed);
                    }
                    let packet = match frame.map(inbound) {
                        None => return Close::Eof,
                        Some(Ok(p)) => p,
                        Some(Err(r)) => return Close::Violation(r.code, r.why),
                    };
                    last_packet = Instant::now();
                    if let Err(reason) = self.on_packet(packet).await {
                        return reason;
                    }
                    if framed.read_buffer().is_empty()
                        && framed.read_buffer().capacity() > super::READ_BUFFER_SHRINK
                    {
                        // A large packet passed: give its buffer back.
                        *framed.read_buffer_mut() = bytes::BytesMut::new();
                    }
                }
            }
        }
    }

    /// The link, to detach it once the connection is over.
    pub(super) fn into_link(self) -> Link {
        self.link
    }

    /// Ask the writer to send `last` (if any) and close the socket.
    pub(super) async fn close(&mut self, last: Option<v5::Packet>) {
        let _ = self.control.send(Control::Close(last.map(Box::new))).await;
    }

    /// Hand a packet to the writer; a sent acknowledgement frees its quota.
    async fn send(&mut self, p: v5::Packet) -> Result<(), Close> {
        match &p {
            v5::Packet::PublishAck(a) => {
                self.quota.remove(&a.packet_id.get());
            }
            v5::Packet::PublishReceived(a) if a.reason_code as u8 >= 0x80 => {
                self.quota.remove(&a.packet_id.get());
            }
            v5::Packet::PublishComplete(a) => {
                self.quota.remove(&a.packet_id.get());
            }
            _ => {}
        }
        self.control
            .send(Control::Packet(Box::new(p)))
            .await
            .map_err(|_| Close::WriteFailed)
    }

    /// Queue an acknowledgement that needs no storage write, behind the others.
    fn ack_now(&mut self, p: v5::Packet) {
        self.pending
            .push_back(futures::future::ready(Ok(Some(p))).boxed());
    }

    /// Send every acknowledgement still waiting, in order.
    async fn drain_pending(&mut self) -> Result<(), Close> {
        while let Some(ack) = self.pending.next().await {
            if let Some(p) = ack.map_err(Close::Storage)? {
                self.send(p).await?;
            }
        }
        Ok(())
    }

    /// One packet from the client. Every branch that awaits more than a
    /// send is boxed: this future is part of the reader loop's, which an
    /// idle connection holds for its whole life, and inline it would be as
    /// large as the largest branch (2.5 KB, the publish path). The price is
    /// one allocation per PUBLISH received, for 1.8 KB less held by every
    /// idle connection.
    async fn on_packet(&mut self, packet: v5::Packet) -> Result<(), Close> {
        match packet {
            v5::Packet::Publish(p) => Box::pin(self.on_publish(*p)).await?,
            // Any reason code ends a QoS 1 delivery.
            v5::Packet::PublishAck(a) => self.link.acknowledge(Ack::Qos1Done(a.packet_id.get())),
            v5::Packet::PublishReceived(a) => {
                let id = a.packet_id.get();
                // An error code refuses the message: no PUBREL, the delivery ends.
                self.link.acknowledge(if (a.reason_code as u8) >= 0x80 {
                    Ack::Refused(id)
                } else {
                    Ack::Received(id)
                });
            }
            v5::Packet::PublishComplete(a) => {
                self.link.acknowledge(Ack::Qos2Done(a.packet_id.get()))
            }
            v5::Packet::PublishRelease(a) => self.on_release(a.packet_id),
            v5::Packet::Subscribe(s) => Box::pin(self.on_subscribe(s)).await?,
            v5::Packet::Unsubscribe(u) => Box::pin(self.on_unsubscribe(u)).await?,
            v5::Packet::PingRequest => self.send(v5::Packet::PingResponse).await?,
            v5::Packet::Disconnect(d) => return Err(Box::pin(self.on_disconnect(d)).await),
            v5::Packet::Auth(a) => Box::pin(self.on_auth(a)).await?,
            v5::Packet::Connect(_) => return Err(Close::protocol("second CONNECT")),
            other => {
                return Err(Close::protocol(format!(
                    "packet type 0x{:02x} is not sent by clients",
                    other.packet_type()
                )))
            }
        }
        Ok(())
    }

    async fn on_unsubscribe(&mut self, u: v5::Unsubscribe) -> Result<(), Close> {
        if u.topic_filters.is_empty() {
            return Err(Close::protocol("UNSUBSCRIBE without topic filters"));
        }
        let filters = u.topic_filters.iter().map(|f| f.to_string()).collect();
        let outcomes = self
            .link
            .unsubscribe(filters)
            .await
            .map_err(Close::Storage)?;
        let status = outcomes
            .into_iter()
            .map(|o| match o {
                Unsubscribed::Removed => v5::UnsubscribeAckReason::Success,
                Unsubscribed::NotSubscribed => v5::UnsubscribeAckReason::NoSubscriptionExisted,
                Unsubscribed::InvalidFilter => v5::UnsubscribeAckReason::TopicFilterInvalid,
            })
            .collect();
        self.send(v5::Packet::UnsubscribeAck(v5::UnsubscribeAck {
            packet_id: u.packet_id,
            properties: Vec::new(),
            reason_string: None,
            status,
        }))
        .await?;
        Ok(())
    }

    /// DISCONNECT: always ends the connection, with this reason.
    async fn on_disconnect(&mut self, d: v5::Disconnect) -> Close {
        if let Some(secs) = d.session_expiry_interval_secs {
            if self.expiry_zero_at_connect && secs != 0 {
                return Close::protocol(
                    "session expiry interval set at DISCONNECT after 0 at CONNECT",
                );
            }
            // The broker's cap applies here as at CONNECT.
            let secs = self
                .link
                .core()
                .config()
                .max_session_expiry_secs
                .map_or(secs, |max| secs.min(max));
            let expiry = SessionExpiry::from_interval(secs);
            self.link.set_expiry(expiry);
        }
        if let Err(close) = self.drain_pending().await {
            return close;
        }
        // Only a normal disconnection (0x00) deletes the will (MQTT 5
        // section 3.1.2.5); 0x04 and the error codes publish it.
        let will = d.reason_code != D::NormalDisconnection;
        if !will {
            // Deleted in the store before the socket closes: a client that
            // saw its connection end cleanly never has its will published
            // by a broker that dies right after.
            self.link.delete_will().await;
        }
        Close::Graceful { will }
    }

    /// PUBREL for an incoming QoS 2 message: PUBCOMP once the link has
    /// freed the packet id in the store too.
    fn on_release(&mut self, packet_id: NonZeroU16) {
        let Some(write) = self.link.release(packet_id.get()) else {
            let ack = pubcomp(packet_id, v5::PublishAck2Reason::PacketIdNotFound);
            self.ack_now(v5::Packet::PublishComplete(ack));
            return;
        };
        let ack = v5::Packet::PublishComplete(pubcomp(packet_id, v5::PublishAck2Reason::Success));
        self.pending
            .push_back(async move { write.await.map(|_| Some(ack)) }.boxed());
    }

    async fn on_subscribe(&mut self, s: v5::Subscribe) -> Result<(), Close> {
        if s.topic_filters.is_empty() {
            return Err(Close::protocol("SUBSCRIBE without topic filters"));
        }
        if s.id.is_some() && !self.link.core().config().subscription_identifiers {
            return Err(Close::Violation(
                D::SubscriptionIdentifiersNotSupported,
                "subscription identifiers are not supported".into(),
            ));
        }
        let mut requests = Vec::with_capacity(s.topic_filters.len());
        for (filter, mut o) in s.topic_filters {
            // Another broker's bridge (3.1.1 with the bridge bit) gets what
            // Mosquitto gives one: its own messages are not sent back, and
            // retain flags travel as published. Shared filters cannot be No Local.
            if self.bridge && !filter.starts_with("$share/") {
                o.no_local = true;
                o.retain_as_published = true;
            }
            if o.no_local && filter.starts_with("$share/") {
                return Err(Close::protocol("No Local on a shared subscription"));
            }
            requests.push((
                filter.to_string(),
                SubscriptionOptions {
                    qos: from_wire_qos(o.qos),
                    no_local: o.no_local,
                    retain_as_published: o.retain_as_published,
                    retain_handling: o.retain_handling.into(),
                    subscription_id: s.id.map(|i| i.get()),
                },
            ));
        }
        let outcomes = self
            .link
            .subscribe(requests.clone())
            .await
            .map_err(Close::Storage)?;
        let status = outcomes
            .iter()
            .map(|o| match o {
                Ok(g) => match g.qos {
                    QoS::AtMostOnce => v5::SubscribeAckReason::GrantedQos0,
                    QoS::AtLeastOnce => v5::SubscribeAckReason::GrantedQos1,
                    QoS::ExactlyOnce => v5::SubscribeAckReason::GrantedQos2,
                },
                Err(SubscribeRefusal::InvalidFilter) => v5::SubscribeAckReason::TopicFilterInvalid,
                Err(SubscribeRefusal::SharedNotSupported) => {
                    v5::SubscribeAckReason::SharedSubscriptionNotSupported
                }
                Err(SubscribeRefusal::WildcardsNotSupported) => {
                    v5::SubscribeAckReason::WildcardSubscriptionsNotSupported
                }
                Err(SubscribeRefusal::TooManyLevels) => v5::SubscribeAckReason::TopicFilterInvalid,
                Err(SubscribeRefusal::QuotaExceeded) => v5::SubscribeAckReason::QuotaExceeded,
                Err(SubscribeRefusal::NotAuthorized) => v5::SubscribeAckReason::NotAuthorized,
            })
            .collect();
        self.send(v5::Packet::SubscribeAck(v5::SubscribeAck {
            packet_id: s.packet_id,
            properties: Vec::new(),
            reason_string: None,
            status,
        }))
        .await?;
        // Retained messages after SUBACK, where the core says they are due.
        for ((filter, mut options), outcome) in requests.into_iter().zip(outcomes) {
            let Ok(Granted {
                qos,
                retained: Some(gate),
                ..
            }) = outcome
            else {
                continue;
            };
            options.qos = qos;
            // The subscription stands either way: a store that cannot be
            // read costs the retained messages, not the connection.
            if let Err(e) = self.link.deliver_retained(&filter, &options, gate).await {
                warn!(client = %self.link.client_id(), %filter, error = %e.report(), "retained messages not delivered");
            }
        }
        Ok(())
    }

    /// AUTH after CONNECT: re-authentication with the method of CONNECT.
    async fn on_auth(&mut self, a: v5::Auth) -> Result<(), Close> {
        let Some(method) = self.auth_method.clone() else {
            return Err(Close::protocol(
                "AUTH without enhanced authentication at CONNECT",
            ));
        };
        if a.auth_method.as_ref() != Some(&method) {
            return Err(Close::protocol("AUTH with a method other than CONNECT's"));
        }
        match a.reason_code {
            v5::AuthReasonCode::ReAuth => {
                let hook = self.link.core().hooks().enhanced_auth.clone();
                self.reauth = hook.and_then(|h| h.begin(self.link.client_id(), &method));
            }
            v5::AuthReasonCode::ContinueAuth if self.reauth.is_some() => {}
            _ => return Err(Close::protocol("unexpected AUTH reason code")),
        }
        let Some(exchange) = self.reauth.as_mut() else {
            return Err(Close::Violation(
                D::NotAuthorized,
                "re-authentication refused".into(),
            ));
        };
        let (reason_code, data) = match exchange.step(a.auth_data).await {
            AuthStep::Success(d) => {
                self.reauth = None;
                (v5::AuthReasonCode::Success, d)
            }
            AuthStep::Continue(d) => (v5::AuthReasonCode::ContinueAuth, Some(d)),
            AuthStep::Failure => {
                return Err(Close::Violation(
                    D::NotAuthorized,
                    "re-authentication failed".into(),
                ))
            }
        };
        self.send(v5::Packet::Auth(v5::Auth {
            reason_code,
            auth_method: Some(method),
            auth_data: data,
            reason_string: None,
            user_properties: Vec::new(),
        }))
        .await
    }

    /// Before the first publish of a fresh socket read is routed, let the
    /// other readers that the same turn of the runtime woke run first.
    ///
    /// Why: a runtime worker that finds two sockets readable at once runs
    /// the task it woke last first (tokio's LIFO slot), so a PUBLISH that
    /// arrived just after another client's SUBSCRIBE would be routed before
    /// that SUBSCRIBE is read, and miss it. Yielding sends this task behind
    /// the ones already woken, so readers act in the order their data
    /// arrived. One yield per socket read, not per packet: pipelined
    /// publishes pay it once per read.
    async fn yield_to_earlier_readers(&mut self) {
        if std::mem::take(&mut self.fresh_read) {
            tokio::task::yield_now().await;
        }
    }

    async fn on_publish(&mut self, mut p: Publish) -> Result<(), Close> {
        self.yield_to_earlier_readers().await;
        let config = self.link.core().config().clone();
        let props = p.properties.take().unwrap_or_default();
        let topic = self
            .aliases
            .resolve(p.topic, props.topic_alias.map(|a| a.get()))
            .map_err(|e| match e {
                AliasError::OutOfRange(a) => Close::Violation(
                    D::TopicAliasInvalid,
                    format!("topic alias {a} out of range"),
                ),
                AliasError::Unknown(a) => Close::protocol(format!("topic alias {a} was never set")),
            })?;
        topic::validate_name(&topic).map_err(|e| {
            Close::Violation(
                D::TopicNameInvalid,
                format!("invalid PUBLISH topic `{topic}`: {e}"),
            )
        })?;
        if !props.subscription_ids.is_empty() {
            return Err(Close::protocol(
                "subscription identifier in a client PUBLISH",
            ));
        }
        let qos = from_wire_qos(p.qos);
        if qos == QoS::AtMostOnce && p.dup {
            return Err(Close::protocol("DUP set on a QoS 0 PUBLISH"));
        }
        if qos > config.max_qos() {
            return Err(Close::Violation(
                D::QosNotSupported,
                format!("QoS {} above the maximum", qos.as_u8()),
            ));
        }
        if p.retain && !config.retain_available {
            return Err(Close::Violation(
                D::RetainNotSupported,
                "retain is not supported".into(),
            ));
        }
        let packet_id = match (qos, p.packet_id) {
            (QoS::AtMostOnce, _) => None,
            (_, Some(id)) => Some(id),
            (_, None) => return Err(Close::protocol("QoS > 0 PUBLISH without packet id")),
        };
        if let (QoS::ExactlyOnce, Some(id)) = (qos, packet_id) {
            if self.link.holds_qos2(id.get()) {
                // A resend of a message already accepted: acknowledge, do not route again.
                let ack = puback(id, v5::PublishAckReason::Success);
                self.ack_now(v5::Packet::PublishReceived(ack));
                return Ok(());
            }
        }
        if let Some(id) = packet_id {
            if self.quota.len() >= usize::from(config.receive_maximum)
                && self.protocol == Protocol::V5
            {
                return Err(Close::Violation(
                    D::ReceiveMaximumExceeded,
                    format!(
                        "more than {} QoS 1/2 publishes unacknowledged",
                        config.receive_maximum
                    ),
                ));
            }
            self.quota.insert(id.get());
        }
        let properties = match message_properties(&p.payload, &props) {
            Ok(props) => props,
            Err(PropertyError::PayloadFormat(why)) => {
                let Some(id) = packet_id else {
                    return Err(Close::Violation(D::PayloadFormatInvalid, why));
                };
                // Refused, not routed; the client learns why from the reason code.
                self.refuse_publish(id, qos, v5::PublishAckReason::PayloadFormatInvalid, why);
                return Ok(());
            }
            Err(PropertyError::Protocol(why)) => return Err(Close::protocol(why)),
        };
        let mut message = Message::new(topic.to_string(), p.payload, qos, p.retain);
        message.properties = properties;

        if message.retain {
            // Retained updates of one publisher are applied in its order.
            self.drain_pending().await?;
        }
        let qos2_id = packet_id
            .filter(|_| qos == QoS::ExactlyOnce)
            .map(|i| i.get());
        let published = match self.link.publish(message, qos2_id).await {
            Ok(p) => p,
            Err(PublishRefused::Storage(e)) => return Err(Close::Storage(e)),
            Err(PublishRefused::TooDeep(max)) => {
                let why = format!("PUBLISH topic has more than {max} levels");
                // MQTT 5 refuses the message and keeps the connection; MQTT
                // 3.1.1 has no way to say so but closing.
                return match (self.protocol, packet_id) {
                    (Protocol::V5, Some(id)) => {
                        self.refuse_publish(id, qos, v5::PublishAckReason::TopicNameInvalid, why);
                        Ok(())
                    }
                    _ => Err(Close::Violation(D::TopicNameInvalid, why)),
                };
            }
            Err(PublishRefused::NotAuthorized) => {
                match (self.protocol, packet_id) {
                    (Protocol::V5, Some(id)) => self.refuse_publish(
                        id,
                        qos,
                        v5::PublishAckReason::NotAuthorized,
                        "not authorized to publish on this topic".into(),
                    ),
                    // MQTT 3.1.1 cannot say no: acknowledged and dropped, as
                    // Mosquitto does (closing would make the client resend it
                    // forever). PUBREL then gets PUBCOMP as for any unknown id.
                    (Protocol::V3, Some(id)) => self.ack_now(match qos {
                        QoS::AtLeastOnce => {
                            v5::Packet::PublishAck(puback(id, v5::PublishAckReason::Success))
                        }
                        _ => v5::Packet::PublishReceived(puback(id, v5::PublishAckReason::Success)),
                    }),
                    (_, None) => {}
                }
                return Ok(());
            }
        };
        let ack_reason = if published.matched {
            v5::PublishAckReason::Success
        } else {
            v5::PublishAckReason::NoMatchingSubscribers
        };
        let ack = match (qos, packet_id) {
            (QoS::AtLeastOnce, Some(id)) => Some(v5::Packet::PublishAck(puback(id, ack_reason))),
            (QoS::ExactlyOnce, Some(id)) => {
                Some(v5::Packet::PublishReceived(puback(id, ack_reason)))
            }
            _ => None,
        };
        // Submitted in this publisher's order; acknowledged when durable.
        let commit = published.committed;
        match ack {
            None => {
                let _ = commit.await;
            }
            Some(ack) => self
                .pending
                .push_back(async move { commit.await.map(|()| Some(ack)) }.boxed()),
        }
        Ok(())
    }

    /// Refuse a QoS 1/2 publish with `code`, saying why; it is not routed.
    fn refuse_publish(
        &mut self,
        id: NonZeroU16,
        qos: QoS,
        code: v5::PublishAckReason,
        why: String,
    ) {
        let mut ack = puback(id, code);
        ack.reason_string = reason(why);
        self.ack_now(match qos {
            QoS::AtLeastOnce => v5::Packet::PublishAck(ack),
            _ => v5::Packet::PublishReceived(ack),
        });
    }
}

/// The next frame; `fresh` is set when it needed a read from the socket
/// (no whole packet was buffered), cleared otherwise.
async fn next_frame<R: AsyncRead + Unpin>(
    framed: &mut FramedRead<R, MqttCodec>,
    fresh: &mut bool,
) -> Option<Result<(MqttPacket, u32), DecodeError>> {
    *fresh = !whole_packet_buffered(framed.read_buffer());
    framed.next().await
}

/// Whether `buf` starts with a whole MQTT packet (fixed header and body).
fn whole_packet_buffered(buf: &[u8]) -> bool {
    let mut len = 0usize;
    for (i, b) in buf.iter().skip(1).take(4).enumerate() {
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return buf.len() >= 2 + i + len;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::whole_packet_buffered;

    #[test]
    fn whole_packet_detection() {
        assert!(!whole_packet_buffered(&[]));
        assert!(!whole_packet_buffered(&[0x30]));
        assert!(whole_packet_buffered(&[0xc0, 0x00]), "PINGREQ");
        assert!(!whole_packet_buffered(&[0x30, 0x03, 0, 1]));
        assert!(whole_packet_buffered(&[0x30, 0x03, 0, 1, b'a', 0x30]));
        // 200 = 0xc8 0x01: two length bytes.
        let mut p = vec![0x30, 0xc8, 0x01];
        p.resize(3 + 199, 0);
        assert!(!whole_packet_buffered(&p));
        p.push(0);
        assert!(whole_packet_buffered(&p));
        assert!(
            !whole_packet_buffered(&[0x30, 0xff, 0xff, 0xff, 0xff]),
            "malformed length"
        );
    }
}
