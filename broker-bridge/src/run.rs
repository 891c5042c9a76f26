//! One bridge's task: the local in-process client, the remote connection,
//! and the relay between them.
//!
//! One task owns both ends, so there is no queue between them: a local
//! message is read from the session only when the in-flight window toward
//! the remote has room, and stays in the session (in the store) otherwise.

use std::collections::VecDeque;
use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_core::client::{Client, ClientError, ClientOptions, Received};
use broker_core::message::{Message, MessageProperties, QoS};
use broker_core::subscription::SubscriptionOptions;
use broker_core::{Broker, SessionExpiry};
use bytestring::ByteString;
use rand::Rng;
use rmqtt_codec::types::Publish;
use rmqtt_codec::v5;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{BridgeConfig, MqttVersion};
use crate::wire::{ack, ack2, Accepted, Conn, RemoteError};

/// Time allowed for TCP, TLS and CONNACK.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Exponential backoff with jitter: `min` doubling to `max`, each delay
/// drawn from 75 % to 125 % of the step.
struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            step: min,
        }
    }

    fn next(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        let jitter = rand::rng().random_range(0.75..1.25);
        step.mul_f64(jitter).min(self.max)
    }

    fn reset(&mut self) {
        self.step = self.min;
    }
}

/// Why a remote session ended.
enum End {
    /// The bridge is stopping.
    Stopped,
    /// The local client was detached (taken over, or the broker stopped).
    LocalGone,
    /// The remote connection failed; reconnect.
    Lost(String),
}

impl From<RemoteError> for End {
    fn from(e: RemoteError) -> End {
        End::Lost(e.to_string())
    }
}

/// Where an outgoing QoS 1/2 message is in its exchange with the remote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// QoS 1, awaiting PUBACK.
    Ack,
    /// QoS 2, awaiting PUBREC.
    Rec,
    /// QoS 2, PUBREL sent, awaiting PUBCOMP.
    Comp,
}

/// A local delivery sent (or to be sent again) to the remote.
struct Pending {
    received: Received,
    publish: Publish,
    state: State,
}

/// The messages in flight toward the remote, in the order first sent.
#[derive(Default)]
struct InFlight {
    entries: VecDeque<Pending>,
}

impl InFlight {
    fn position(&self, id: NonZeroU16, state: State) -> Option<usize> {
        self.entries
            .iter()
            .position(|p| p.publish.packet_id == Some(id) && p.state == state)
    }

    fn holds(&self, id: u16) -> bool {
        self.entries
            .iter()
            .any(|p| p.publish.packet_id.map(NonZeroU16::get) == Some(id))
    }
}

/// Sleep `d` unless stopped first; true when stopped.
async fn sleep_or_stop(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

/// The bridge's task: until stopped, keep a local client attached and a
/// remote connection up, relaying between them.
pub(crate) async fn run(
    broker: Broker,
    config: Arc<BridgeConfig>,
    tls: Option<Arc<rustls::ClientConfig>>,
    stop: CancellationToken,
) {
    let name = config.name.as_str();
    let mut backoff = Backoff::new(config.backoff_min, config.backoff_max);
    'local: loop {
        let mut local = match attach(&broker, &config).await {
            Ok(c) => c,
            Err(e) => {
                let d = backoff.next();
                warn!(
                    bridge = name,
                    "cannot attach the local session: {e}; retry in {} s",
                    secs(d)
                );
                if sleep_or_stop(d, &stop).await {
                    return;
                }
                continue;
            }
        };
        let mut inflight = InFlight::default();
        loop {
            if stop.is_cancelled() {
                local.disconnect().await;
                return;
            }
            let opened = tokio::select! {
                _ = stop.cancelled() => {
                    local.disconnect().await;
                    return;
                }
                r = Conn::open(&config, tls.as_ref(), CONNECT_TIMEOUT) => r,
            };
            let end = match opened {
                Ok((conn, accepted)) => {
                    backoff.reset();
                    info!(
                        bridge = name,
                        address = %config.address,
                        session_present = accepted.session_present,
                        in_flight = inflight.entries.len(),
                        "bridge {name}: connected to {}",
                        config.address
                    );
                    session(&mut local, conn, accepted, &mut inflight, &config, &stop).await
                }
                Err(e) => End::Lost(format!("cannot connect: {e}")),
            };
            match end {
                End::Stopped => {
                    local.disconnect().await;
                    info!(bridge = name, "bridge {name}: stopped");
                    return;
                }
                End::LocalGone => {
                    if stop.is_cancelled() {
                        return;
                    }
                    let d = backoff.next();
                    warn!(
                        bridge = name,
                        "bridge {name}: the local session was detached; attaching again in {} s",
                        secs(d)
                    );
                    if sleep_or_stop(d, &stop).await {
                        return;
                    }
                    continue 'local;
                }
                End::Lost(why) => {
                    let d = backoff.next();
                    warn!(
                        bridge = name,
                        address = %config.address,
                        "bridge {name}: connection to {} lost: {why}; retry in {} s",
                        config.address,
                        secs(d)
                    );
                    if sleep_or_stop(d, &stop).await {
                        local.disconnect().await;
                        return;
                    }
                }
            }
        }
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64())
}

/// Attach the bridge's persistent local session and subscribe to the
/// outbound filters with No Local.
async fn attach(broker: &Broker, config: &BridgeConfig) -> Result<Client, ClientError> {
    let options = ClientOptions::persistent(config.local_client_id())
        .session_expiry(SessionExpiry::Never)
        .max_inflight(usize::from(config.max_inflight));
    let mut local = broker.connect(options).await?;
    for t in config.topics.iter().filter(|t| t.direction.outbound()) {
        let filter = t.local_filter();
        let options = SubscriptionOptions {
            no_local: true,
            retain_as_published: true,
            // Retained messages once, when the subscription is new, not at
            // every restart of a persistent session.
            retain_handling: 1,
            ..SubscriptionOptions::new(t.qos)
        };
        local.subscribe_with(&filter, options).await?;
    }
    Ok(local)
}

/// One remote connection, from CONNACK to its end.
async fn session(
    local: &mut Client,
    mut conn: Conn,
    accepted: Accepted,
    inflight: &mut InFlight,
    config: &BridgeConfig,
    stop: &CancellationToken,
) -> End {
    let name = config.name.as_str();
    let window = usize::from(config.max_inflight.min(accepted.receive_max).max(1));
    let max_out = accepted
        .max_packet_size
        .map_or(config.max_packet_size, |m| m.min(config.max_packet_size));
    if !accepted.session_present {
        // A new remote session: its packet ids start afresh, and the ones
        // of its QoS 2 messages we still hold would take new messages for
        // resends.
        for id in local.held_packet_ids() {
            match local.release(id).await {
                Ok(_) => {}
                Err(ClientError::Detached) => return End::LocalGone,
                Err(e) => return End::Lost(format!("local store: {e}")),
            }
        }
    }
    // Subscribe to the inbound filters (every time: the settings may have
    // changed since the remote session began); local messages wait until
    // the SUBACK, so its packet id is not one of theirs.
    let mut suback: Option<NonZeroU16> = None;
    let filters: Vec<(ByteString, v5::SubscriptionOptions)> = config
        .topics
        .iter()
        .filter(|t| t.direction.inbound())
        .map(|t| {
            (
                ByteString::from(t.remote_filter()),
                v5::SubscriptionOptions {
                    qos: wire_qos(t.qos),
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: v5::RetainHandling::AtSubscribeNew,
                },
            )
        })
        .collect();
    if !filters.is_empty() {
        let id = (1..=u16::MAX)
            .find(|id| !inflight.holds(*id))
            .and_then(NonZeroU16::new)
            .unwrap_or(NonZeroU16::MIN);
        if let Err(e) = conn.queue(v5::Packet::Subscribe(v5::Subscribe {
            packet_id: id,
            id: None,
            user_properties: Vec::new(),
            topic_filters: filters,
        })) {
            return e.into();
        }
        suback = Some(id);
    }
    // What was in flight goes again first, in its order.
    for p in inflight.entries.iter_mut() {
        let packet = match (p.state, accepted.session_present) {
            (State::Comp, true) => {
                v5::Packet::PublishRelease(ack2(p.publish.packet_id.unwrap_or(NonZeroU16::MIN)))
            }
            (State::Comp, false) => {
                p.state = State::Rec;
                resend(&p.publish)
            }
            _ => resend(&p.publish),
        };
        if let Err(e) = conn.queue(packet) {
            return e.into();
        }
    }
    if let Err(e) = conn.flush().await {
        return e.into();
    }

    let keep_alive = Duration::from_secs(u64::from(accepted.keep_alive.max(1)));
    let period = keep_alive.mul_f64(0.75);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut awaiting_pong: Option<Instant> = None;
    let relay = Relay {
        config,
        max_out,
        version: config.protocol,
    };
    loop {
        let room = suback.is_none() && inflight.entries.len() < window;
        let step = tokio::select! {
            biased;
            _ = stop.cancelled() => {
                conn.close().await;
                return End::Stopped;
            }
            p = conn.next() => match p {
                Ok(p) => relay.remote_packet(p, local, &mut conn, inflight, &mut suback, &mut awaiting_pong).await,
                Err(e) => Err(e.into()),
            },
            r = local.recv(), if room => match r {
                Some(r) => relay.local_delivery(r, local, &mut conn, inflight),
                None => Err(End::LocalGone),
            },
            _ = ping.tick() => {
                if let Some(since) = awaiting_pong {
                    Err(End::Lost(format!(
                        "no PINGRESP within {:.0} s",
                        since.elapsed().as_secs_f64()
                    )))
                } else {
                    awaiting_pong = Some(Instant::now());
                    conn.queue(v5::Packet::PingRequest).map_err(End::from)
                }
            }
        };
        if let Err(end) = step {
            if matches!(end, End::LocalGone) {
                conn.close().await;
                inflight.entries.clear();
            }
            return end;
        }
        if conn.pending() > 0 {
            if let Err(e) = conn.flush().await {
                return e.into();
            }
        }
        debug!(bridge = name, in_flight = inflight.entries.len(), "relayed");
    }
}

/// A PUBLISH sent again: DUP set.
fn resend(p: &Publish) -> v5::Packet {
    let mut p = p.clone();
    p.dup = true;
    v5::Packet::Publish(Box::new(p))
}

fn wire_qos(q: QoS) -> v5::QoS {
    match q {
        QoS::AtMostOnce => v5::QoS::AtMostOnce,
        QoS::AtLeastOnce => v5::QoS::AtLeastOnce,
        QoS::ExactlyOnce => v5::QoS::ExactlyOnce,
    }
}

fn our_qos(q: v5::QoS) -> QoS {
    match q {
        v5::QoS::AtMostOnce => QoS::AtMostOnce,
        v5::QoS::AtLeastOnce => QoS::AtLeastOnce,
        v5::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

/// The relay's fixed settings for one connection.
struct Relay<'a> {
    config: &'a BridgeConfig,
    max_out: u32,
    version: MqttVersion,
}

impl Relay<'_> {
    /// A local delivery: mapped and sent, kept in flight until the remote
    /// acknowledges it (QoS 1/2), acknowledged locally at once (QoS 0).
    fn local_delivery(
        &self,
        r: Received,
        local: &mut Client,
        conn: &mut Conn,
        inflight: &mut InFlight,
    ) -> Result<(), End> {
        let name = self.config.name.as_str();
        let m = r.message();
        let Some((topic, _)) = self.config.remote_topic(&m.topic) else {
            debug!(bridge = name, topic = %m.topic, "no outbound topic matches; dropped");
            local.ack(&r);
            return Ok(());
        };
        let qos = r.qos();
        let packet_id = match qos {
            QoS::AtMostOnce => None,
            _ => match r.packet_id().and_then(NonZeroU16::new) {
                Some(id) => Some(id),
                None => {
                    return Err(End::Lost(
                        "a local QoS 1/2 delivery without packet id".into(),
                    ))
                }
            },
        };
        let size = publish_size(&topic, m, qos, self.version);
        if size > u64::from(self.max_out) {
            warn!(
                bridge = name,
                topic = %m.topic,
                bytes = size,
                max = self.max_out,
                "message larger than the remote's maximum packet size; not relayed"
            );
            local.ack(&r);
            return Ok(());
        }
        let publish = Publish {
            dup: r.dup(),
            retain: r.retain(),
            qos: wire_qos(qos),
            topic: ByteString::from(topic),
            packet_id,
            payload: m.payload.clone(),
            properties: match self.version {
                MqttVersion::V311 => None,
                MqttVersion::V5 => Some(wire_properties(&m.properties)),
            },
        };
        conn.queue(v5::Packet::Publish(Box::new(publish.clone())))?;
        match qos {
            QoS::AtMostOnce => local.ack(&r),
            QoS::AtLeastOnce | QoS::ExactlyOnce => inflight.entries.push_back(Pending {
                received: r,
                publish,
                state: if qos == QoS::AtLeastOnce {
                    State::Ack
                } else {
                    State::Rec
                },
            }),
        }
        Ok(())
    }

    /// A packet from the remote.
    async fn remote_packet(
        &self,
        p: v5::Packet,
        local: &mut Client,
        conn: &mut Conn,
        inflight: &mut InFlight,
        suback: &mut Option<NonZeroU16>,
        awaiting_pong: &mut Option<Instant>,
    ) -> Result<(), End> {
        let name = self.config.name.as_str();
        match p {
            v5::Packet::Publish(p) => self.inbound(*p, local, conn).await,
            v5::Packet::PublishAck(a) => {
                if let Some(i) = inflight.position(a.packet_id, State::Ack) {
                    if let Some(done) = inflight.entries.remove(i) {
                        refused(name, "PUBACK", a.reason_code as u8, &done);
                        local.ack(&done.received);
                    }
                }
                Ok(())
            }
            v5::Packet::PublishReceived(a) => {
                if let Some(i) = inflight.position(a.packet_id, State::Rec) {
                    if (a.reason_code as u8) >= 0x80 {
                        // Refused by the remote: the exchange ends here.
                        if let Some(done) = inflight.entries.remove(i) {
                            refused(name, "PUBREC", a.reason_code as u8, &done);
                            local.ack(&done.received);
                        }
                        return Ok(());
                    }
                    if let Some(e) = inflight.entries.get_mut(i) {
                        e.state = State::Comp;
                    }
                }
                // A PUBREC for an id we no longer hold still needs its PUBREL.
                conn.queue(v5::Packet::PublishRelease(ack2(a.packet_id)))?;
                Ok(())
            }
            v5::Packet::PublishComplete(a) => {
                if let Some(i) = inflight.position(a.packet_id, State::Comp) {
                    if let Some(done) = inflight.entries.remove(i) {
                        local.ack(&done.received);
                    }
                }
                Ok(())
            }
            v5::Packet::PublishRelease(a) => {
                match local.release(a.packet_id.get()).await {
                    Ok(_) => {}
                    Err(ClientError::Detached) => return Err(End::LocalGone),
                    Err(e) => return Err(End::Lost(format!("local store: {e}"))),
                }
                conn.queue(v5::Packet::PublishComplete(ack2(a.packet_id)))?;
                Ok(())
            }
            v5::Packet::SubscribeAck(s) => {
                if *suback == Some(s.packet_id) {
                    *suback = None;
                    let inbound = self.config.topics.iter().filter(|t| t.direction.inbound());
                    for (t, status) in inbound.zip(&s.status) {
                        if (*status as u8) >= 0x80 {
                            warn!(
                                bridge = name,
                                filter = %t.remote_filter(),
                                "bridge {name}: the remote refused the subscription ({status:?})"
                            );
                        }
                    }
                }
                Ok(())
            }
            v5::Packet::UnsubscribeAck(_) => Ok(()),
            v5::Packet::PingResponse => {
                *awaiting_pong = None;
                Ok(())
            }
            v5::Packet::Disconnect(d) => Err(End::Lost(format!(
                "DISCONNECT from the remote: {:?}{}",
                d.reason_code,
                d.reason_string
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            ))),
            other => Err(End::Lost(format!(
                "unexpected packet type {:#x} from the remote",
                other.packet_type()
            ))),
        }
    }

    /// A remote PUBLISH: published locally, and acknowledged to the remote
    /// only once the local publish returned (durable for QoS 1/2).
    async fn inbound(&self, p: Publish, local: &mut Client, conn: &mut Conn) -> Result<(), End> {
        let name = self.config.name.as_str();
        let qos = our_qos(p.qos);
        let id = p.packet_id;
        let answer = |conn: &mut Conn| -> Result<(), End> {
            match (qos, id) {
                (QoS::AtLeastOnce, Some(id)) => {
                    conn.queue(v5::Packet::PublishAck(ack(id)))?;
                }
                (QoS::ExactlyOnce, Some(id)) => {
                    conn.queue(v5::Packet::PublishReceived(ack(id)))?;
                }
                _ => {}
            }
            Ok(())
        };
        let Some((topic, _)) = self.config.local_topic(&p.topic) else {
            debug!(bridge = name, topic = %p.topic, "no inbound topic matches; dropped");
            return answer(conn);
        };
        let mut message = Message::new(topic, p.payload, qos, p.retain);
        if let Some(props) = p.properties {
            message.properties = our_properties(props);
        }
        let published = match (qos, id) {
            (QoS::ExactlyOnce, Some(id)) => local
                .publish_exactly_once(id.get(), message)
                .await
                .map(|new| {
                    if !new {
                        debug!(
                            bridge = name,
                            packet_id = id.get(),
                            "QoS 2 resend, not published again"
                        );
                    }
                }),
            _ => local.publish(message).await,
        };
        match published {
            Ok(()) => answer(conn),
            Err(ClientError::Detached) => Err(End::LocalGone),
            Err(ClientError::Storage(e)) => Err(End::Lost(format!(
                "the local store refused a message ({e}); the remote will send it again"
            ))),
            Err(e) => {
                // Refused for good (authorization, topic depth): resending
                // would not help.
                warn!(bridge = name, topic = %p.topic, "inbound message refused locally: {e}");
                answer(conn)
            }
        }
    }
}

/// Log a remote's refusal (an MQTT 5 reason code of 0x80 or more).
fn refused(name: &str, what: &str, code: u8, p: &Pending) {
    if code >= 0x80 {
        warn!(
            bridge = name,
            topic = %p.publish.topic,
            "the remote refused a message ({what} reason {code:#x}); not sent again"
        );
    }
}

/// The size of a PUBLISH on the wire, properties roughly included.
fn publish_size(topic: &str, m: &Message, qos: QoS, version: MqttVersion) -> u64 {
    let mut n = 2 + topic.len() + m.payload.len();
    if qos != QoS::AtMostOnce {
        n += 2;
    }
    if version == MqttVersion::V5 {
        let p = &m.properties;
        n += 4
            + 2
            + 5
            + p.content_type.as_ref().map_or(0, |s| 3 + s.len())
            + p.response_topic.as_ref().map_or(0, |s| 3 + s.len())
            + p.correlation_data.as_ref().map_or(0, |s| 3 + s.len())
            + p.user_properties
                .iter()
                .map(|(k, v)| 5 + k.len() + v.len())
                .sum::<usize>();
    }
    (n + 5) as u64
}

fn wire_properties(p: &MessageProperties) -> v5::PublishProperties {
    let now = broker_core::message::now_ms();
    v5::PublishProperties {
        topic_alias: None,
        correlation_data: p.correlation_data.clone(),
        message_expiry_interval: p.expires_at_ms.and_then(|at| {
            let secs = at.saturating_sub(now).div_ceil(1000).max(1);
            NonZeroU32::new(u32::try_from(secs).unwrap_or(u32::MAX))
        }),
        content_type: p.content_type.as_deref().map(ByteString::from),
        user_properties: p
            .user_properties
            .iter()
            .map(|(k, v)| (ByteString::from(k.as_str()), ByteString::from(v.as_str())))
            .collect(),
        is_utf8_payload: p.payload_format_utf8.unwrap_or(false),
        response_topic: p.response_topic.as_deref().map(ByteString::from),
        subscription_ids: Vec::new(),
    }
}

fn our_properties(p: v5::PublishProperties) -> MessageProperties {
    MessageProperties {
        payload_format_utf8: p.is_utf8_payload.then_some(true),
        expires_at_ms: p
            .message_expiry_interval
            .map(|s| broker_core::message::now_ms() + u64::from(s.get()) * 1000),
        content_type: p.content_type.map(|s| s.to_string()),
        response_topic: p.response_topic.map(|s| s.to_string()),
        correlation_data: p.correlation_data,
        user_properties: p
            .user_properties
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let d: Vec<f64> = (0..9).map(|_| b.next().as_secs_f64()).collect();
        assert!((0.75..=1.25).contains(&d[0]), "{d:?}");
        assert!((1.5..=2.5).contains(&d[1]), "{d:?}");
        assert!((3.0..=5.0).contains(&d[2]), "{d:?}");
        assert!(d[8] <= 60.0 && d[8] >= 45.0, "{d:?}");
        b.reset();
        assert!(b.next() <= Duration::from_millis(1250));
    }
}
