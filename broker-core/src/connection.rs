//! One client connection, from CONNECT to close.
//!
//! Two tasks per connection:
//! - the **reader** (this module's [`handle`]) decodes packets and acts on
//!   them: publishes are routed at once (in packet order) and acknowledged when
//!   their storage write commits, in the order they arrived;
//! - the **writer** (`write_loop`) owns the socket's write half. It sends
//!   control packets (CONNACK aside, which is written before it starts) and
//!   drains the session's queue in sequence order within the in-flight window.
//!
//! Every way a connection ends is logged with the peer address and the reason.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, WriteHalf};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::codec::{Encoder, FramedRead};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::broker::Broker;
use crate::codec::{
    from_wire_qos, packet_id as wire_id, to_wire_qos, v3, v3_packet, DecodeError, MqttCodec,
    MqttPacket, ProtocolVersion, VersionCodec,
};
use crate::message::{Message, QoS};
use crate::session::{Attachment, Session};
use crate::storage::{ClientId, PacketOp, StorageError};
use crate::subscription::SubscriptionOptions;
use crate::topic;

/// Capacity of the reader-to-writer channel of control packets.
const CONTROL_CAPACITY: usize = 256;

/// Why a connection ended.
#[derive(Debug)]
enum Close {
    /// The client sent DISCONNECT: no will.
    Graceful,
    /// The socket closed without DISCONNECT.
    Eof,
    /// No packet within 1.5 x keep alive.
    KeepAliveTimeout,
    /// Another connection took over the session.
    TakenOver,
    /// The broker is shutting down.
    Shutdown,
    /// Writing to the socket failed.
    WriteFailed,
    /// The client broke the protocol.
    Protocol(String),
    /// Storage refused a write the client's request depends on.
    Storage(StorageError),
}

impl fmt::Display for Close {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Close::Graceful => write!(f, "client disconnected"),
            Close::Eof => write!(f, "connection closed by peer without DISCONNECT"),
            Close::KeepAliveTimeout => write!(f, "keep alive timeout"),
            Close::TakenOver => write!(f, "session taken over by a new connection"),
            Close::Shutdown => write!(f, "broker shutting down"),
            Close::WriteFailed => write!(f, "write to socket failed"),
            Close::Protocol(r) => write!(f, "protocol violation: {r}"),
            Close::Storage(e) => write!(f, "{e}"),
        }
    }
}

impl Close {
    /// Whether the will message is published (MQTT 3.1.1 section 3.1.2.5).
    fn publishes_will(&self) -> bool {
        !matches!(self, Close::Graceful | Close::Shutdown)
    }
}

/// An acknowledgement waiting for its storage write, in arrival order.
type PendingAck = BoxFuture<'static, Result<Option<v3::Packet>, StorageError>>;

/// Serve one client on `stream` until it ends. `peer` names it in logs.
pub async fn handle<S>(broker: Arc<Broker>, stream: S, peer: String)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (read, mut write) = tokio::io::split(stream);
    let mut framed = FramedRead::new(read, MqttCodec::Version(VersionCodec));
    let deadline = Instant::now() + broker.config().connect_timeout();

    let connect = match read_connect(&broker, &mut framed, &mut write, deadline).await {
        Ok(c) => c,
        Err(reason) => {
            info!(%peer, %reason, "connection refused");
            let _ = write.shutdown().await;
            return;
        }
    };

    let client_id: ClientId = if connect.client_id.is_empty() {
        format!("auto-{:016x}", rand_id(&broker)).into()
    } else {
        ClientId::from(&*connect.client_id)
    };
    let will = match connect.last_will.as_ref().map(will_message).transpose() {
        Ok(w) => w,
        Err(reason) => {
            info!(%peer, client = %client_id, %reason, "connection refused");
            return;
        }
    };

    let connection_id = broker.next_connection_id();
    let kick = CancellationToken::new();
    let detached = CancellationToken::new();
    let attachment = Attachment {
        connection_id,
        kick: kick.clone(),
        detached: detached.clone(),
    };
    let connected = match broker
        .connect(client_id.clone(), connect.clean_session, attachment)
        .await
    {
        Ok(c) => c,
        Err(e) => {
            warn!(%peer, client = %client_id, error = %e, "cannot open session: storage failed");
            let _ = send_connack(&mut write, v3::ConnectAckReason::ServiceUnavailable, false).await;
            return;
        }
    };
    let session = connected.session;
    if send_connack(
        &mut write,
        v3::ConnectAckReason::ConnectionAccepted,
        connected.session_present,
    )
    .await
    .is_err()
    {
        broker.disconnect(&session, connection_id).await;
        detached.cancel();
        return;
    }
    info!(
        %peer,
        client = %client_id,
        clean = connect.clean_session,
        keep_alive = connect.keep_alive,
        session_present = connected.session_present,
        "client connected"
    );

    let (control_tx, control_rx) = mpsc::channel(CONTROL_CAPACITY);
    let stop_writer = CancellationToken::new();
    let writer = tokio::spawn(write_loop(
        write,
        session.clone(),
        control_rx,
        broker.clone(),
        stop_writer.clone(),
    ));

    let mut reader = Reader {
        broker: broker.clone(),
        session: session.clone(),
        control: control_tx,
        pending: FuturesOrdered::new(),
        persistent: !connect.clean_session,
    };
    let keep_alive = Duration::from_millis(u64::from(connect.keep_alive) * 1500);
    let reason = reader
        .run(&mut framed, keep_alive, &kick, stop_writer.clone())
        .await;

    stop_writer.cancel();
    let _ = writer.await;
    drop(reader);
    broker.disconnect(&session, connection_id).await;
    detached.cancel();
    match &reason {
        Close::Protocol(_) | Close::Storage(_) => {
            warn!(%peer, client = %client_id, %reason, "connection closed")
        }
        _ => info!(%peer, client = %client_id, %reason, "connection closed"),
    }
    if reason.publishes_will() {
        if let Some(will) = will {
            if let Err(e) = broker.publish(will).await {
                warn!(client = %client_id, error = %e, "will message not published");
            }
        }
    }
}

fn rand_id(broker: &Broker) -> u64 {
    // Unique enough for a generated id: process-wide counter mixed with the clock.
    let n = broker.next_connection_id();
    crate::message::now_ms().rotate_left(20) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn will_message(w: &v3::LastWill) -> Result<Message, String> {
    topic::validate_name(&w.topic).map_err(|e| format!("invalid will topic: {e}"))?;
    Ok(Message::new(
        w.topic.as_ref() as &str,
        w.message.clone(),
        from_wire_qos(w.qos),
        w.retain,
    ))
}

async fn send_connack<W: AsyncWrite + Unpin>(
    w: &mut W,
    code: v3::ConnectAckReason,
    session_present: bool,
) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    let packet = v3::Packet::ConnectAck(v3::ConnectAck {
        return_code: code,
        session_present,
    });
    v3::Codec::new(0)
        .encode(packet, &mut buf)
        .map_err(std::io::Error::other)?;
    w.write_all(&buf).await?;
    w.flush().await
}

/// Answer a refused CONNECT with `code` (the connection closes next); returns `reason`.
async fn refuse<W: AsyncWrite + Unpin>(
    write: &mut W,
    code: v3::ConnectAckReason,
    reason: &str,
) -> String {
    let _ = send_connack(write, code, false).await;
    reason.to_string()
}

/// Read the protocol version and the CONNECT packet, answering refusals.
async fn read_connect<R, W>(
    broker: &Broker,
    framed: &mut FramedRead<R, MqttCodec>,
    write: &mut W,
    deadline: Instant,
) -> Result<Box<v3::Connect>, String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    match next_before(framed, deadline).await? {
        Ok((MqttPacket::Version(ProtocolVersion::MQTT3), _)) => {}
        Ok((MqttPacket::Version(ProtocolVersion::MQTT5), _)) => {
            return Err(refuse(
                write,
                v3::ConnectAckReason::UnacceptableProtocolVersion,
                "MQTT 5 is not supported yet",
            )
            .await);
        }
        Ok(_) => return Err("unexpected first frame".into()),
        Err(DecodeError::UnsupportedPacketType) => {
            return Err("first packet was not CONNECT".into())
        }
        Err(DecodeError::InvalidProtocol) => {
            return Err(refuse(
                write,
                v3::ConnectAckReason::UnacceptableProtocolVersion,
                "unknown protocol name or level",
            )
            .await);
        }
        Err(e) => return Err(format!("malformed CONNECT: {e}")),
    }
    *framed.decoder_mut() = MqttCodec::V3(v3::Codec::new(broker.config().max_packet_size));
    match next_before(framed, deadline).await? {
        Ok((MqttPacket::V3(v3::Packet::Connect(c)), _)) => Ok(c),
        Ok(_) => Err("first packet was not CONNECT".into()),
        Err(DecodeError::UnsupportedProtocolLevel) => Err(refuse(
            write,
            v3::ConnectAckReason::UnacceptableProtocolVersion,
            "unsupported protocol level",
        )
        .await),
        Err(DecodeError::InvalidClientId) => Err(refuse(
            write,
            v3::ConnectAckReason::IdentifierRejected,
            "empty client id with clean session 0",
        )
        .await),
        Err(e) => Err(format!("malformed CONNECT: {e}")),
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

struct Reader {
    broker: Arc<Broker>,
    session: Arc<Session>,
    control: mpsc::Sender<v3::Packet>,
    pending: FuturesOrdered<PendingAck>,
    persistent: bool,
}

impl Reader {
    async fn run<R: AsyncRead + Unpin>(
        &mut self,
        framed: &mut FramedRead<R, MqttCodec>,
        keep_alive: Duration,
        kick: &CancellationToken,
        writer_stopped: CancellationToken,
    ) -> Close {
        let shutdown = self.broker.shutdown_token();
        let max_pending = self.broker.config().max_pending_publishes;
        let mut deadline = Instant::now() + keep_alive;
        loop {
            tokio::select! {
                biased;
                _ = kick.cancelled() => return Close::TakenOver,
                _ = shutdown.cancelled() => return Close::Shutdown,
                _ = writer_stopped.cancelled() => return Close::WriteFailed,
                Some(ack) = self.pending.next(), if !self.pending.is_empty() => {
                    match ack {
                        Ok(Some(p)) => {
                            if self.control.send(p).await.is_err() {
                                return Close::WriteFailed;
                            }
                        }
                        Ok(None) => {}
                        Err(e) => return Close::Storage(e),
                    }
                }
                _ = sleep_until(deadline), if !keep_alive.is_zero() => return Close::KeepAliveTimeout,
                frame = framed.next(), if self.pending.len() < max_pending => {
                    let packet = match frame {
                        None => return Close::Eof,
                        Some(Err(e)) => return Close::Protocol(format!("malformed packet: {e}")),
                        Some(Ok((MqttPacket::V3(p), _))) => p,
                        Some(Ok(_)) => return Close::Protocol("unexpected frame".into()),
                    };
                    deadline = Instant::now() + keep_alive;
                    if let Err(reason) = self.on_packet(packet).await {
                        return reason;
                    }
                }
            }
        }
    }

    async fn send(&mut self, p: v3::Packet) -> Result<(), Close> {
        self.control.send(p).await.map_err(|_| Close::WriteFailed)
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

    /// Write store operations caused by acknowledgements; they need no reply,
    /// and run to completion even if the connection closes.
    fn write_ops(&self, op: Option<PacketOp>) {
        if let Some(op) = op {
            let storage = self.broker.storage().clone();
            let client = self.session.client_id.clone();
            tokio::spawn(async move {
                if let Err(e) = storage.packets.write(vec![op]).await {
                    warn!(%client, error = %e, "could not record an acknowledgement");
                }
            });
        }
        self.session.wake.notify_one();
    }

    async fn on_packet(&mut self, packet: v3::Packet) -> Result<(), Close> {
        let client = self.session.client_id.clone();
        match packet {
            v3::Packet::Publish(p) => self.on_publish(*p).await?,
            v3::Packet::PublishAck { packet_id } => {
                let op = self
                    .session
                    .lock()
                    .complete(packet_id.get(), false, &client);
                self.write_ops(op);
            }
            v3::Packet::PublishReceived { packet_id } => {
                let op = self.session.lock().received(packet_id.get(), &client);
                self.write_ops(op);
            }
            v3::Packet::PublishComplete { packet_id } => {
                let op = self.session.lock().complete(packet_id.get(), true, &client);
                self.write_ops(op);
            }
            v3::Packet::PublishRelease { packet_id } => {
                let known = self.session.lock().incoming_qos2.remove(&packet_id.get());
                let ack = v3::Packet::PublishComplete { packet_id };
                if known && self.persistent {
                    // PUBCOMP only once the id is free in the store too: otherwise a
                    // restart would treat the client's next message with this id as a duplicate.
                    let storage = self.broker.storage().clone();
                    let op = PacketOp::IncomingQos2Released {
                        client,
                        packet_id: packet_id.get(),
                    };
                    self.pending.push_back(
                        async move { storage.packets.write(vec![op]).await.map(|_| Some(ack)) }
                            .boxed(),
                    );
                } else {
                    self.pending
                        .push_back(futures::future::ready(Ok(Some(ack))).boxed());
                }
            }
            v3::Packet::Subscribe {
                packet_id,
                topic_filters,
            } => {
                if topic_filters.is_empty() {
                    return Err(Close::Protocol("SUBSCRIBE without topic filters".into()));
                }
                let requests: Vec<(String, SubscriptionOptions)> = topic_filters
                    .into_iter()
                    .map(|(f, q)| (f.to_string(), SubscriptionOptions::new(from_wire_qos(q))))
                    .collect();
                let filters: Vec<String> = requests.iter().map(|(f, _)| f.clone()).collect();
                let granted = self
                    .broker
                    .subscribe(&self.session, requests)
                    .await
                    .map_err(Close::Storage)?;
                let status = granted
                    .iter()
                    .map(|g| match g {
                        Some(q) => v3::SubscribeReturnCode::Success(to_wire_qos(*q)),
                        None => v3::SubscribeReturnCode::Failure,
                    })
                    .collect();
                self.send(v3::Packet::SubscribeAck { packet_id, status })
                    .await?;
                for (filter, g) in filters.iter().zip(granted) {
                    if let Some(qos) = g {
                        self.broker
                            .deliver_retained(&self.session, filter, qos)
                            .await
                            .map_err(Close::Storage)?;
                    }
                }
            }
            v3::Packet::Unsubscribe {
                packet_id,
                topic_filters,
            } => {
                if topic_filters.is_empty() {
                    return Err(Close::Protocol("UNSUBSCRIBE without topic filters".into()));
                }
                let filters = topic_filters.into_iter().map(|f| f.to_string()).collect();
                self.broker
                    .unsubscribe(&self.session, filters)
                    .await
                    .map_err(Close::Storage)?;
                self.send(v3::Packet::UnsubscribeAck { packet_id }).await?;
            }
            v3::Packet::PingRequest => self.send(v3::Packet::PingResponse).await?,
            v3::Packet::Disconnect => {
                self.drain_pending().await?;
                return Err(Close::Graceful);
            }
            v3::Packet::Connect(_) => return Err(Close::Protocol("second CONNECT".into())),
            other => {
                return Err(Close::Protocol(format!(
                    "packet type 0x{:02x} is not sent by clients",
                    other.packet_type()
                )))
            }
        }
        Ok(())
    }

    async fn on_publish(&mut self, p: rmqtt_codec::types::Publish) -> Result<(), Close> {
        topic::validate_name(&p.topic)
            .map_err(|e| Close::Protocol(format!("invalid PUBLISH topic `{}`: {e}", p.topic)))?;
        let qos = from_wire_qos(p.qos);
        if qos == QoS::AtMostOnce && p.dup {
            return Err(Close::Protocol("DUP set on a QoS 0 PUBLISH".into()));
        }
        let packet_id = p.packet_id;
        let message = Message::new(p.topic.as_ref() as &str, p.payload, qos, p.retain);

        if qos == QoS::ExactlyOnce {
            let id = packet_id.map(|i| i.get()).unwrap_or(0);
            if self.session.lock().incoming_qos2.contains(&id) {
                // A resend of a message already accepted: acknowledge, do not route again.
                let ack = v3::Packet::PublishReceived {
                    packet_id: wire_id(id),
                };
                self.pending
                    .push_back(futures::future::ready(Ok(Some(ack))).boxed());
                return Ok(());
            }
        }
        if message.retain {
            // Retained updates of one publisher are applied in its order.
            self.drain_pending().await?;
            self.broker
                .update_retained(&message)
                .await
                .map_err(Close::Storage)?;
        }
        let mut routed = self.broker.route(message);
        let ack = match (qos, packet_id) {
            (QoS::AtMostOnce, _) => None,
            (QoS::AtLeastOnce, Some(packet_id)) => Some(v3::Packet::PublishAck { packet_id }),
            (QoS::ExactlyOnce, Some(packet_id)) => {
                self.session.lock().incoming_qos2.insert(packet_id.get());
                if self.persistent {
                    routed.push_op(PacketOp::IncomingQos2Received {
                        client: self.session.client_id.clone(),
                        packet_id: packet_id.get(),
                    });
                }
                Some(v3::Packet::PublishReceived { packet_id })
            }
            _ => return Err(Close::Protocol("QoS > 0 PUBLISH without packet id".into())),
        };
        let broker = self.broker.clone();
        match ack {
            None => {
                let _ = broker.commit(routed).await;
            }
            Some(ack) => {
                let session = self.session.clone();
                let id = packet_id.map(|i| i.get()).unwrap_or(0);
                self.pending.push_back(
                    async move {
                        match broker.commit(routed).await {
                            Ok(()) => Ok(Some(ack)),
                            Err(e) => {
                                if qos == QoS::ExactlyOnce {
                                    session.lock().incoming_qos2.remove(&id);
                                }
                                Err(e)
                            }
                        }
                    }
                    .boxed(),
                );
            }
        }
        Ok(())
    }
}

/// The writer: control packets first, then the session's queue in order.
async fn write_loop<S>(
    mut write: WriteHalf<S>,
    session: Arc<Session>,
    mut control: mpsc::Receiver<v3::Packet>,
    broker: Arc<Broker>,
    stop: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mut codec = v3::Codec::new(0);
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut out = Vec::new();
    let mut ops = Vec::new();
    let max_inflight = broker.config().max_inflight;
    let client = session.client_id.clone();
    let mut closed = false;
    loop {
        while let Ok(p) = control.try_recv() {
            if codec.encode(p, &mut buf).is_err() {
                debug!(%client, "could not encode a control packet");
            }
        }
        session
            .lock()
            .next_outgoing(max_inflight, &mut out, &mut ops, &client);
        for o in out.drain(..) {
            if let Err(e) = codec.encode(v3_packet(&o), &mut buf) {
                warn!(%client, error = %e, "could not encode an outgoing packet");
            }
        }
        if !ops.is_empty() {
            let batch = std::mem::take(&mut ops);
            let storage = broker.storage().clone();
            tokio::spawn(async move {
                if let Err(e) = storage.packets.write(batch).await {
                    warn!(error = %e, "could not remove expired messages");
                }
            });
        }
        if !buf.is_empty() {
            tokio::select! {
                r = write.write_all_buf(&mut buf) => {
                    if r.is_err() {
                        stop.cancel();
                        return;
                    }
                }
                _ = stop.cancelled() => return,
            }
            buf.clear();
        }
        if closed {
            let _ = write.shutdown().await;
            return;
        }
        tokio::select! {
            biased;
            _ = stop.cancelled() => {
                let _ = write.flush().await;
                return;
            }
            p = control.recv() => match p {
                Some(p) => {
                    if codec.encode(p, &mut buf).is_err() {
                        debug!(%client, "could not encode a control packet");
                    }
                }
                None => closed = true,
            },
            _ = session.wake.notified() => {}
        }
    }
}
