//! One client connection, from CONNECT to close, for MQTT 3.1, 3.1.1 and 5.0:
//! it translates packets into calls on its [`Link`](crate::link::Link) and
//! the link's deliveries back into packets, and keeps nothing of the
//! broker's state itself.
//!
//! - [`handshake`]: protocol detection, CONNECT, enhanced authentication, refusals;
//! - [`reader`]: decodes packets and acts on them: publishes are routed at
//!   once (in packet order) and acknowledged when their storage write
//!   commits, in the order they arrived;
//! - [`writer`]: owns the socket's write half; sends control packets and
//!   drains the session's queue in sequence order within the in-flight window;
//! - [`aliases`]: topic aliases in both directions.
//!
//! The reader and the writer are two futures of the connection's one task.
//!
//! Everything past the handshake is written in MQTT 5 terms; the codec
//! converts for 3.1.1 clients (see [`crate::codec`]). Every way a connection
//! ends is logged with the peer address and the reason, and an MQTT 5 client
//! is told why with a DISCONNECT reason code.

mod aliases;
mod duo;
mod handshake;
mod reader;
mod writer;

use std::fmt;
use std::num::NonZeroU16;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use bytestring::ByteString;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::broker::{Core, SessionExpiry, Will};
use crate::codec::{from_wire_qos, reason, v5, Encoder, MqttCodec, Protocol, VersionCodec};
use crate::config::BrokerConfig;
use crate::events::Event;
use crate::hooks::ProtocolVersion;
use crate::link::{AttachError, AttachRequest};
use crate::message::{now_ms, Message, MessageProperties};
use crate::metrics::{ConnectLabel, DisconnectLabel};
use crate::server::Peer;
use crate::storage::StorageError;
use crate::topic;

use handshake::{authenticate, read_connect, refuse, send_now, Hello};

/// Capacity of the reader-to-writer channel of control packets.
const CONTROL_CAPACITY: usize = 256;
/// Initial capacity of a connection's read buffer, in bytes.
const READ_BUFFER_START: usize = 512;
/// How long a connection the broker closes keeps reading after its last packet.
const LINGER: Duration = Duration::from_secs(2);
/// The same while the broker shuts down, so that shutdown stays prompt.
const LINGER_AT_SHUTDOWN: Duration = Duration::from_millis(500);
/// A read buffer grown past this by a large packet is released once empty.
const READ_BUFFER_SHRINK: usize = 64 * 1024;
/// How long the writer gets to send a final DISCONNECT before the socket is dropped.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the reader asks the writer to do.
///
/// Packets are boxed: the channel allocates its slots up front, 32 at a
/// time, and an unboxed packet would make that 4 KB per idle connection.
#[derive(Debug)]
enum Control {
    /// Send this packet before anything else queued.
    Packet(Box<v5::Packet>),
    /// Send this last packet (if any), close the socket, and stop.
    Close(Option<Box<v5::Packet>>),
}

/// Why a connection ended.
#[derive(Debug)]
enum Close {
    /// The client sent DISCONNECT; `will` unless its reason code was 0x00.
    Graceful { will: bool },
    /// The socket closed without DISCONNECT.
    Eof,
    /// No packet within 1.5 x keep alive.
    KeepAliveTimeout,
    /// Another connection took over the session.
    TakenOver,
    /// An operator closed it (admin API).
    Kicked,
    /// The broker is shutting down.
    Shutdown,
    /// Writing to the socket failed.
    WriteFailed,
    /// The client broke the protocol; the code goes in DISCONNECT.
    Violation(v5::DisconnectReasonCode, String),
    /// Storage refused a write the client's request depends on.
    Storage(StorageError),
}

impl fmt::Display for Close {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Close::Graceful { will: false } => write!(f, "client disconnected"),
            Close::Graceful { will: true } => {
                write!(
                    f,
                    "client disconnected with a reason code that keeps its will"
                )
            }
            Close::Eof => write!(f, "connection closed by peer without DISCONNECT"),
            Close::KeepAliveTimeout => write!(f, "keep alive timeout"),
            Close::TakenOver => write!(f, "session taken over by a new connection"),
            Close::Kicked => write!(f, "closed by an operator"),
            Close::Shutdown => write!(f, "broker shutting down"),
            Close::WriteFailed => write!(f, "write to socket failed"),
            Close::Violation(code, r) => write!(f, "protocol violation ({code:?}): {r}"),
            Close::Storage(e) => write!(f, "{e}"),
        }
    }
}

impl Close {
    /// Its label in the disconnect metrics.
    fn label(&self) -> DisconnectLabel {
        match self {
            Close::Graceful { will: false } => DisconnectLabel::Normal,
            Close::Graceful { will: true } => DisconnectLabel::WithWill,
            Close::Eof => DisconnectLabel::ConnectionLost,
            Close::KeepAliveTimeout => DisconnectLabel::KeepAliveTimeout,
            Close::TakenOver => DisconnectLabel::TakenOver,
            Close::Kicked => DisconnectLabel::Kicked,
            Close::Shutdown => DisconnectLabel::Shutdown,
            Close::WriteFailed => DisconnectLabel::WriteFailed,
            Close::Violation(..) => DisconnectLabel::ProtocolError,
            Close::Storage(_) => DisconnectLabel::StorageError,
        }
    }

    /// A protocol error (DISCONNECT 0x82).
    fn protocol(why: impl Into<String>) -> Close {
        Close::Violation(v5::DisconnectReasonCode::ProtocolError, why.into())
    }

    /// Whether the broker ended the connection while the client may still be
    /// sending: the socket then lingers (see [`linger`]).
    fn lingers(&self) -> bool {
        !matches!(
            self,
            Close::Graceful { .. } | Close::Eof | Close::WriteFailed
        )
    }

    /// Whether the will message is published: always, unless the client
    /// disconnected normally (MQTT 5 section 3.1.2.5); also when the broker
    /// itself closes the connection to shut down.
    fn publishes_will(&self) -> bool {
        !matches!(self, Close::Graceful { will: false })
    }

    /// The DISCONNECT an MQTT 5 client is sent, if any.
    fn disconnect_packet(&self) -> Option<v5::Packet> {
        use v5::DisconnectReasonCode as D;
        let code = match self {
            Close::Graceful { .. } | Close::Eof | Close::WriteFailed => return None,
            Close::KeepAliveTimeout => D::KeepAliveTimeout,
            Close::TakenOver => D::SessionTakenOver,
            Close::Kicked => D::AdministrativeAction,
            Close::Shutdown => D::ServerShuttingDown,
            Close::Violation(code, _) => *code,
            Close::Storage(_) => D::ImplementationSpecificError,
        };
        Some(v5::Packet::Disconnect(v5::Disconnect {
            reason_code: code,
            reason_string: reason(self.to_string()),
            ..v5::Disconnect::default()
        }))
    }
}

/// The connect-metrics label of a refusing CONNACK's code.
fn connect_label(code: v5::ConnectAckReason) -> ConnectLabel {
    use v5::ConnectAckReason as R;
    match code {
        R::BadUserNameOrPassword => ConnectLabel::BadCredentials,
        R::NotAuthorized | R::Banned => ConnectLabel::NotAuthorized,
        R::ConnectionRateExceeded => ConnectLabel::Throttled,
        R::ServerUnavailable | R::ServerBusy | R::QuotaExceeded => ConnectLabel::ServerUnavailable,
        _ => ConnectLabel::Protocol,
    }
}

/// Serve one client on `stream` until it ends. `transport` names it in
/// logs, events and hooks.
///
/// Every step that is not the idle wait is awaited boxed: a future is as
/// large as the largest step it contains, and this one lives as long as
/// the connection, so inline steps (the handshake, attach, detach) would
/// cost every idle connection their size for its whole life. A box per
/// step is an allocation per connection, not per packet.
///
/// A plain function around an `async` block: an `async fn` would keep its
/// arguments (the stream and the peer, 112 bytes) in its state for the
/// connection's life after moving them into the handshake.
pub(crate) fn handle<S>(
    core: Arc<Core>,
    stream: S,
    transport: Peer,
) -> impl std::future::Future<Output = ()> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    // The handshake's state (CONNECT, authentication, attach, CONNACK) is
    // freed once it is done; only `serve`'s stays for the connection's life.
    let opening = Box::pin(open(core.clone(), stream, transport));
    async move {
        // Bound by `let`, so that the boxed handshake future is dropped
        // here rather than at the end of an `if let` around `serve`.
        let opened = opening.await;
        if let Some(opened) = opened {
            serve(core, opened).await;
        }
    }
}

/// A connection past its CONNACK: what [`serve`] needs of the handshake.
struct Opened<S> {
    peer: std::net::SocketAddr,
    framed: FramedRead<tokio::io::ReadHalf<S>, MqttCodec>,
    write: tokio::io::WriteHalf<S>,
    link: crate::link::Link,
    encoder: Encoder,
    protocol: Protocol,
    expiry: SessionExpiry,
    keep_alive: u16,
    max_inflight: usize,
    topic_alias_max: u16,
    auth_method: Option<ByteString>,
    bridge: bool,
}

/// From the first byte to a sent CONNACK; `None` when the connection was
/// refused or failed (logged, counted, and closed here).
async fn open<S>(core: Arc<Core>, stream: S, transport: Peer) -> Option<Box<Opened<S>>>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let peer = transport.addr;
    let (read, mut write) = tokio::io::split(stream);
    // Buffers start small and grow with the traffic: most connections of a
    // large deployment are idle, and each byte here counts ten thousand times.
    let mut framed =
        FramedRead::with_capacity(read, MqttCodec::Version(VersionCodec), READ_BUFFER_START);
    let deadline = Instant::now() + core.config().connect_timeout();
    let config = core.config().clone();
    let refused = |client_id: Option<&str>, label: ConnectLabel, reason: String| {
        core.stats().connects.bump(label as usize);
        info!(%peer, client = client_id.unwrap_or(""), %reason, "connection refused");
        core.events().emit(|| Event::ConnectionError {
            client_id: client_id.map(str::to_owned),
            peer: Some(peer),
            reason,
        });
    };

    let Hello {
        protocol,
        mut connect,
        bridge,
    } = match Box::pin(read_connect(&core, &mut framed, &mut write, deadline)).await {
        Ok(h) => h,
        Err(reason) => {
            refused(None, ConnectLabel::Protocol, reason);
            Box::pin(linger(&core, &mut framed, Some(&mut write))).await;
            return None;
        }
    };
    let named = connect.client_id.to_string();
    let will = match connect
        .last_will
        .as_ref()
        .map(|w| will_from(w, &config))
        .transpose()
    {
        Ok(w) => w,
        Err((code, why)) => {
            let reason = Box::pin(refuse(&mut write, protocol, code, &why)).await;
            refused(Some(&named), connect_label(code), reason);
            Box::pin(linger(&core, &mut framed, Some(&mut write))).await;
            return None;
        }
    };
    let auth = match Box::pin(authenticate(
        &core,
        &mut framed,
        &mut write,
        &named,
        &mut connect,
        deadline,
    ))
    .await
    {
        Ok(a) => a,
        Err(reason) => {
            // Enhanced authentication's refusals, whatever their code.
            refused(Some(&named), ConnectLabel::NotAuthorized, reason);
            Box::pin(linger(&core, &mut framed, Some(&mut write))).await;
            return None;
        }
    };
    let (expiry, expiry_granted) = session_expiry(protocol, &connect, &config);
    let (keep_alive, server_keep_alive) = match (protocol, config.max_keep_alive) {
        (Protocol::V5, Some(max)) if connect.keep_alive == 0 || connect.keep_alive > max => {
            (max, Some(max))
        }
        _ => (connect.keep_alive, None),
    };

    // A certificate identity replaces the User Name (use_identity_as_username).
    let username = match &transport.certificate_identity {
        Some(name) => Some(name.clone()),
        None => connect.username.as_ref().map(|u| u.to_string()),
    };
    let request = AttachRequest {
        client_id: named.clone(),
        username,
        password: connect.password.clone(),
        clean_start: connect.clean_start,
        expiry,
        will,
        peer: Some(peer),
        listener: transport.listener,
        allow_anonymous: transport.allow_anonymous,
        certificate_identity: transport.certificate_identity.is_some(),
        protocol: match protocol {
            Protocol::V3 => ProtocolVersion::V3,
            Protocol::V5 => ProtocolVersion::V5,
        },
        authenticated: auth.is_some(),
        bridge,
    };
    let attached = match Box::pin(core.attach(request)).await {
        Ok(a) => a,
        Err(e) => {
            use v5::ConnectAckReason as R;
            let code = match &e {
                AttachError::BadCredentials => R::BadUserNameOrPassword,
                AttachError::NotAuthorized | AttachError::WillNotAuthorized => R::NotAuthorized,
                AttachError::Throttled => R::ConnectionRateExceeded,
                AttachError::HookFailed(_) | AttachError::Storage(_) => R::ServerUnavailable,
            };
            if let AttachError::Storage(e) = &e {
                warn!(%peer, client = %named, error = %e.report(), "cannot open session: storage failed");
            }
            let reason = Box::pin(refuse(&mut write, protocol, code, &e.to_string())).await;
            refused(Some(&named), connect_label(code), reason);
            Box::pin(linger(&core, &mut framed, Some(&mut write))).await;
            return None;
        }
    };
    let link = attached.link;
    let client_id = link.client_id().clone();

    let mut encoder = Encoder::new(protocol);
    if let Some(max) = connect.max_packet_size {
        encoder.set_max_packet_size(max.get());
    }
    encoder.set_problem_info(connect.request_problem_info);
    let (auth_method, auth_data) = match auth {
        Some((m, d)) => (Some(m), d),
        None => (None, None),
    };
    let connack = v5::ConnectAck {
        session_present: attached.session_present,
        reason_code: v5::ConnectAckReason::Success,
        session_expiry_interval_secs: expiry_granted,
        receive_max: NonZeroU16::new(config.receive_maximum).unwrap_or(NonZeroU16::MAX),
        max_qos: crate::codec::to_wire_qos(config.max_qos()),
        max_packet_size: Some(config.max_packet_size),
        assigned_client_id: attached.assigned_id.map(|id| ByteString::from(&*id)),
        topic_alias_max: config.topic_alias_maximum,
        retain_available: config.retain_available,
        wildcard_subscription_available: config.wildcard_subscriptions,
        subscription_identifiers_available: config.subscription_identifiers,
        shared_subscription_available: config.shared_subscriptions,
        server_keepalive_sec: server_keep_alive,
        response_info: match (&config.response_topic_prefix, connect.request_response_info) {
            (Some(prefix), true) => Some(ByteString::from(format!("{prefix}{client_id}"))),
            _ => None,
        },
        auth_method: auth_method.clone(),
        auth_data,
        ..v5::ConnectAck::default()
    };
    match send_now(
        &mut write,
        &mut encoder,
        v5::Packet::ConnectAck(Box::new(connack)),
    )
    .await
    {
        Ok(n) => {
            core.stats()
                .bytes_sent
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        Err(_) => {
            Box::pin(link.detach(false, "write of CONNACK failed")).await;
            return None;
        }
    }
    core.stats().connects.bump(ConnectLabel::Accepted as usize);
    info!(
        %peer,
        client = %client_id,
        protocol = ?protocol,
        clean_start = connect.clean_start,
        expiry = ?expiry,
        keep_alive,
        session_present = attached.session_present,
        bridge,
        "client connected"
    );

    let max_inflight = connect.receive_max.map_or(config.max_inflight, |r| {
        config.max_inflight.min(usize::from(r.get()))
    });
    // Boxed: moved as a pointer into `serve`'s state instead of as a copy
    // beside it.
    Some(Box::new(Opened {
        peer,
        framed,
        write,
        link,
        encoder,
        protocol,
        expiry,
        keep_alive,
        max_inflight,
        topic_alias_max: connect.topic_alias_max,
        auth_method,
        bridge,
    }))
}

/// What [`serve`] runs: the reader, the writer and what the goodbye needs.
struct Running<S> {
    peer: std::net::SocketAddr,
    framed: FramedRead<tokio::io::ReadHalf<S>, MqttCodec>,
    writer: Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    reader: reader::Reader,
    kick: CancellationToken,
    stop_writer: CancellationToken,
    client_id: crate::storage::ClientId,
    protocol: Protocol,
    keep_alive: Duration,
}

/// Build the reader and the writer from the handshake's result. Not part of
/// `serve`'s `async` body: a local of that body whose address was taken (the
/// link, borrowed here before it moves into the reader) keeps its slot in
/// the connection's state for the connection's life, 320 bytes.
fn start<S>(opened: Box<Opened<S>>) -> Running<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let Opened {
        peer,
        framed,
        write,
        link,
        encoder,
        protocol,
        expiry,
        keep_alive,
        max_inflight,
        topic_alias_max,
        auth_method,
        bridge,
    } = *opened;
    let client_id = link.client_id().clone();
    let (control_tx, control_rx) = mpsc::channel(CONTROL_CAPACITY);
    let stop_writer = CancellationToken::new();
    // The writer is a second future of this task, not a task of its own:
    // an acknowledgement the reader queues is written by the task that is
    // already running, instead of waking another one (on this 2-core VM a
    // wake-up across tasks cost a context switch and tens of microseconds
    // per message; BENCHMARKS.md, "Latency at 2,000 msg/s"), and without
    // waking this one either (see [`duo`]). Every wake-up of the task polls
    // both; each is cheap when it has nothing to do.
    let writer = Box::pin(writer::run(
        write,
        writer::Outbound {
            encoder,
            topic_alias_max,
        },
        link.outbox(max_inflight),
        client_id.clone(),
        control_rx,
        stop_writer.clone(),
    ));
    let kick = link.kicked().clone();
    let reader = reader::Reader::new(
        link,
        control_tx,
        protocol,
        expiry == SessionExpiry::OnDisconnect,
        auth_method,
        bridge,
    );
    Running {
        peer,
        framed,
        writer,
        reader,
        kick,
        stop_writer,
        client_id,
        protocol,
        keep_alive: Duration::from_millis(u64::from(keep_alive) * 1500),
    }
}

/// The connection's life after CONNACK: the reader and the writer until
/// one of them ends it, then the goodbye, the detach and the linger.
async fn serve<S>(core: Arc<Core>, opened: Box<Opened<S>>)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let Running {
        peer,
        mut framed,
        mut writer,
        mut reader,
        kick,
        stop_writer,
        client_id,
        protocol,
        keep_alive,
    } = start(opened);
    let mut writer_done = false;
    let close = {
        // A failed write cancels `stop_writer`, which ends the reader.
        let mut reading = Box::pin(reader.run(&mut framed, keep_alive, &kick, stop_writer.clone()));
        duo::run(reading.as_mut(), writer.as_mut(), &mut writer_done).await
    };

    // Say why (MQTT 5), then close the socket; a client that does not read
    // does not hold the connection open. The writer runs meanwhile: the
    // reader's last packet may wait for room in the channel.
    let goodbye = match protocol {
        Protocol::V5 => close.disconnect_packet(),
        Protocol::V3 => None,
    };
    let saying = async {
        let _ = tokio::time::timeout(GOODBYE_TIMEOUT, Box::pin(reader.close(goodbye))).await;
    };
    let finishing = async {
        if !writer_done
            && tokio::time::timeout(GOODBYE_TIMEOUT, &mut writer)
                .await
                .is_err()
        {
            stop_writer.cancel();
            (&mut writer).await;
        }
    };
    // Boxed: inline, the two futures would be 432 bytes of every
    // connection's state for its whole life.
    Box::pin(async { tokio::join!(saying, finishing) }).await;
    drop(writer);
    let link = reader.into_link();
    Box::pin(link.detach(close.publishes_will(), &close.to_string())).await;
    core.stats().disconnects.bump(close.label() as usize);
    match &close {
        Close::Violation(..) | Close::Storage(_) => {
            warn!(%peer, client = %client_id, reason = %close, "connection closed")
        }
        _ => info!(%peer, client = %client_id, reason = %close, "connection closed"),
    }
    if close.lingers() {
        // The writer has shut the write side after its last packet.
        Box::pin(linger::<_, tokio::io::WriteHalf<S>>(
            &core,
            &mut framed,
            None,
        ))
        .await;
    }
}

/// Close so that the client can read the broker's last packet (a DISCONNECT
/// or a refusing CONNACK): shut the write side (`write`, unless the writer
/// already did), then read and discard until the client closes or [`LINGER`]
/// passes. Closing a socket with unread data makes the kernel send a reset,
/// which discards what the client had not read yet, reason code included.
async fn linger<R, W>(core: &Core, framed: &mut FramedRead<R, MqttCodec>, write: Option<&mut W>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use tokio::io::AsyncReadExt;
    let within = if core.shutdown_token().is_cancelled() {
        LINGER_AT_SHUTDOWN
    } else {
        LINGER
    };
    let deadline = Instant::now() + within;
    if let Some(write) = write {
        if tokio::time::timeout_at(deadline, write.shutdown())
            .await
            .is_err()
        {
            return;
        }
    }
    // On the heap and only now: an idle connection's task does not carry it.
    let mut sink = bytes::BytesMut::with_capacity(4096);
    let read = framed.get_mut();
    loop {
        sink.clear();
        match tokio::time::timeout_at(deadline, read.read_buf(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => continue,
            _ => return,
        }
    }
}

/// How long the session outlives this connection, and the interval to send
/// back in CONNACK when the broker lowered the client's.
fn session_expiry(
    protocol: Protocol,
    connect: &v5::Connect,
    config: &BrokerConfig,
) -> (SessionExpiry, Option<u32>) {
    match protocol {
        Protocol::V3 if connect.clean_start => (SessionExpiry::OnDisconnect, None),
        Protocol::V3 => (
            config
                .session_expiry_secs
                .map_or(SessionExpiry::Never, SessionExpiry::After),
            None,
        ),
        Protocol::V5 => {
            let asked = connect.session_expiry_interval_secs;
            match config.max_session_expiry_secs {
                Some(max) if asked > max => (SessionExpiry::from_interval(max), Some(max)),
                _ => (SessionExpiry::from_interval(asked), None),
            }
        }
    }
}

/// Why a message's properties were refused.
#[derive(Debug)]
enum PropertyError {
    /// The payload format indicator says UTF-8 and the payload is not (0x99).
    PayloadFormat(String),
    /// Anything else (0x82).
    Protocol(String),
}

/// The properties of a message from their wire form, checked.
fn message_properties(
    payload: &Bytes,
    p: &v5::PublishProperties,
) -> Result<MessageProperties, PropertyError> {
    if p.is_utf8_payload && std::str::from_utf8(payload).is_err() {
        return Err(PropertyError::PayloadFormat(
            "payload format indicator says UTF-8 but the payload is not".into(),
        ));
    }
    if let Some(t) = &p.response_topic {
        topic::validate_name(t)
            .map_err(|e| PropertyError::Protocol(format!("invalid response topic: {e}")))?;
    }
    Ok(MessageProperties {
        payload_format_utf8: p.is_utf8_payload.then_some(true),
        expires_at_ms: p
            .message_expiry_interval
            .map(|s| now_ms() + u64::from(s.get()) * 1000),
        content_type: p.content_type.as_ref().map(|c| c.to_string()),
        response_topic: p.response_topic.as_ref().map(|t| t.to_string()),
        correlation_data: p.correlation_data.clone(),
        user_properties: p
            .user_properties
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    })
}

/// The will of a CONNECT, checked against the broker's limits.
fn will_from(
    w: &v5::LastWill,
    config: &BrokerConfig,
) -> Result<Will, (v5::ConnectAckReason, String)> {
    use v5::ConnectAckReason as R;
    topic::validate_name(&w.topic)
        .and_then(|_| topic::check_levels(&w.topic, config.max_topic_levels))
        .map_err(|e| (R::TopicNameInvalid, format!("invalid will topic: {e}")))?;
    let qos = from_wire_qos(w.qos);
    if qos > config.max_qos() {
        return Err((R::QosNotSupported, "will QoS above the maximum".into()));
    }
    if w.retain && !config.retain_available {
        return Err((
            R::RetainNotSupported,
            "retained wills are not supported".into(),
        ));
    }
    // The will's expiry counts from its publication, not from now.
    let wire = v5::PublishProperties {
        correlation_data: w.correlation_data.clone(),
        content_type: w.content_type.clone(),
        user_properties: w.user_properties.clone(),
        is_utf8_payload: w.is_utf8_payload.unwrap_or(false),
        response_topic: w.response_topic.clone(),
        ..v5::PublishProperties::default()
    };
    let properties = message_properties(&w.message, &wire).map_err(|e| match e {
        PropertyError::PayloadFormat(why) => (R::PayloadFormatInvalid, format!("will: {why}")),
        PropertyError::Protocol(why) => (R::ProtocolError, format!("will: {why}")),
    })?;
    let mut message = Message::new(w.topic.to_string(), w.message.clone(), qos, w.retain);
    message.properties = properties;
    Ok(Will {
        message,
        expiry_secs: w.message_expiry_interval.map(|e| e.get()),
        delay_secs: w.will_delay_interval_sec.unwrap_or(0),
    })
}
