//! A minimal MQTT 3.1.1 client on `rmqtt-codec`, the codec the broker itself
//! uses.
//!
//! Not a client library on purpose: the load tool needs to decide exactly how
//! many publishes are in flight, when acknowledgements go out and when
//! packets are timestamped, and to batch many packets into one socket write.
//! So a [`Connection`] is just a framed reader and a buffered writer:
//!
//! - [`Writer::queue`] encodes a packet into the write buffer; [`Writer::flush`]
//!   writes the buffer in one go. Callers queue a batch, then flush.
//! - [`Reader::next`] waits for the next packet; [`Reader::next_now`] returns
//!   one only if it is already there, which lets a subscriber answer a whole
//!   burst of deliveries with one write of acknowledgements.
//! - [`Window`] is a publisher's in-flight window: packet ids for QoS 1/2
//!   publishes and a semaphore that holds the publisher back once `N` of them
//!   await their PUBACK (QoS 1) or PUBCOMP (QoS 2).
//! - [`ack_for`] / [`Connection::close`]: the acknowledgement a received
//!   PUBLISH needs (PUBACK, or PUBREC then PUBCOMP once PUBREL comes), and a
//!   polite close (DISCONNECT, then wait for the broker to close its side so
//!   the broker, not the tool, keeps the TIME_WAIT socket and a run of 10,000
//!   connections does not use up the tool's ephemeral ports).
//!
//! Every connection asks for keep-alive 0 (none): a QoS 0 subscriber sends
//! nothing for the whole run and must not be disconnected for it.

use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use futures::{FutureExt, StreamExt};
use rmqtt_codec::v3;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::codec::{Encoder, FramedRead};

/// How bytes reach the broker.
#[derive(Debug, Clone, Default)]
pub enum Transport {
    /// MQTT over TCP.
    #[default]
    Tcp,
    /// MQTT over TLS; the server certificate must name the address's IP.
    Tls(Arc<rustls::ClientConfig>),
    /// MQTT over WebSocket at this path.
    Ws(String),
    /// MQTT over WebSocket over TLS at this path.
    Wss(Arc<rustls::ClientConfig>, String),
}

impl Transport {
    /// `tcp`, `tls`, `ws` or `wss`.
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls(_) => "tls",
            Transport::Ws(_) => "ws",
            Transport::Wss(..) => "wss",
        }
    }
}

/// Where the broker is and how to reach it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Its address.
    pub addr: SocketAddr,
    /// The transport.
    pub transport: Transport,
}

impl Endpoint {
    /// Plain TCP to `addr`.
    pub fn tcp(addr: SocketAddr) -> Endpoint {
        Endpoint {
            addr,
            transport: Transport::Tcp,
        }
    }
}

type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

fn split<S: AsyncRead + AsyncWrite + Send + 'static>(s: S) -> (ReadHalf, WriteHalf) {
    let (r, w) = tokio::io::split(s);
    (Box::new(r), Box::new(w))
}

async fn tls(
    config: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    tcp: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .context("TLS handshake")
}

/// Open the transport's byte stream to `e`.
async fn open(e: &Endpoint) -> Result<(ReadHalf, WriteHalf)> {
    let tcp = TcpStream::connect(e.addr)
        .await
        .with_context(|| format!("connecting to {}", e.addr))?;
    tcp.set_nodelay(true).context("setting TCP_NODELAY")?;
    let addr = e.addr;
    Ok(match &e.transport {
        Transport::Tcp => {
            let (r, w) = tcp.into_split();
            (Box::new(r), Box::new(w))
        }
        Transport::Tls(c) => split(tls(c, addr, tcp).await?),
        Transport::Ws(path) => split(
            broker_net::ws_connect(tcp, &format!("ws://{addr}{path}"))
                .await
                .context("WebSocket upgrade")?,
        ),
        Transport::Wss(c, path) => split(
            broker_net::ws_connect(tls(c, addr, tcp).await?, &format!("wss://{addr}{path}"))
                .await
                .context("WebSocket upgrade")?,
        ),
    })
}

/// How a connection introduces itself.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Client identifier.
    pub client_id: String,
    /// MQTT 3.1.1 clean session flag.
    pub clean_session: bool,
    /// Initial read buffer; small for the idle connections of `conn`.
    pub read_buffer: usize,
    /// Time allowed for TCP connect plus CONNACK.
    pub timeout: Duration,
    /// A QoS 1 will on this topic (the client id as payload).
    pub will: Option<String>,
}

impl ConnectOptions {
    /// Options for `client_id` with a 64 KiB read buffer and a 10 s timeout.
    pub fn new(client_id: impl Into<String>, clean_session: bool) -> ConnectOptions {
        ConnectOptions {
            client_id: client_id.into(),
            clean_session,
            read_buffer: 64 * 1024,
            timeout: Duration::from_secs(10),
            will: None,
        }
    }
}

/// The reading half of a connection.
pub struct Reader {
    inner: FramedRead<ReadHalf, v3::Codec>,
}

impl Reader {
    /// The next packet; `Ok(None)` when the broker closed the connection.
    pub async fn next(&mut self) -> Result<Option<v3::Packet>> {
        match self.inner.next().await {
            None => Ok(None),
            Some(Ok((p, _))) => Ok(Some(p)),
            Some(Err(e)) => Err(anyhow!("bad packet from broker: {e}")),
        }
    }

    /// The next packet if it can be had without waiting; `None` otherwise.
    pub fn next_now(&mut self) -> Option<Result<Option<v3::Packet>>> {
        self.next().now_or_never()
    }

    /// Read and discard until the broker closes, at most `d`.
    pub async fn drain_until_closed(&mut self, d: Duration) {
        let _ =
            tokio::time::timeout(d, async { while let Ok(Some(_)) = self.next().await {} }).await;
    }
}

/// The writing half of a connection, with its write buffer.
pub struct Writer {
    half: WriteHalf,
    buf: BytesMut,
    codec: v3::Codec,
}

impl Writer {
    /// Encode `p` into the write buffer.
    pub fn queue(&mut self, p: v3::Packet) -> Result<()> {
        self.codec
            .encode(p, &mut self.buf)
            .map_err(|e| anyhow!("encoding a packet: {e}"))
    }

    /// Bytes waiting in the write buffer.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Write out the buffer.
    pub async fn flush(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            self.half
                .write_all(&self.buf)
                .await
                .context("writing to the broker")?;
            // TLS keeps what the socket (or the task's I/O budget) did not
            // take until a flush.
            self.half.flush().await.context("writing to the broker")?;
            self.buf.clear();
        }
        Ok(())
    }

    /// Queue and flush one packet.
    pub async fn send(&mut self, p: v3::Packet) -> Result<()> {
        self.queue(p)?;
        self.flush().await
    }

    /// Flush, send DISCONNECT and close the writing side.
    pub async fn disconnect(&mut self) -> Result<()> {
        self.queue(v3::Packet::Disconnect)?;
        self.flush().await?;
        self.half.shutdown().await.context("closing the socket")
    }
}

/// One MQTT connection.
pub struct Connection {
    /// Reading half.
    pub reader: Reader,
    /// Writing half.
    pub writer: Writer,
}

impl Connection {
    /// Connect (TCP, and TLS or WebSocket handshakes), CONNECT, and wait for an accepting CONNACK. Returns the
    /// connection and CONNACK's session-present flag.
    pub async fn connect(to: &Endpoint, opts: &ConnectOptions) -> Result<(Connection, bool)> {
        tokio::time::timeout(opts.timeout, Self::connect_inner(to, opts))
            .await
            .map_err(|_| anyhow!("no CONNACK within {:?}", opts.timeout))?
    }

    async fn connect_inner(to: &Endpoint, opts: &ConnectOptions) -> Result<(Connection, bool)> {
        let (r, w) = open(to).await?;
        let mut c = Connection {
            reader: Reader {
                inner: FramedRead::with_capacity(r, v3::Codec::new(0), opts.read_buffer),
            },
            writer: Writer {
                half: w,
                buf: BytesMut::with_capacity(opts.read_buffer.min(64 * 1024)),
                codec: v3::Codec::new(0),
            },
        };
        c.writer
            .send(v3::Packet::Connect(Box::new(v3::Connect {
                protocol: Default::default(),
                clean_session: opts.clean_session,
                keep_alive: 0,
                last_will: opts.will.as_deref().map(|topic| v3::LastWill {
                    qos: v3::QoS::AtLeastOnce,
                    retain: false,
                    topic: ByteString::from(topic),
                    message: Bytes::copy_from_slice(opts.client_id.as_bytes()),
                }),
                client_id: ByteString::from(opts.client_id.as_str()),
                username: None,
                password: None,
                cert: None,
            })))
            .await?;
        match c.reader.next().await? {
            Some(v3::Packet::ConnectAck(ack)) => {
                if ack.return_code != v3::ConnectAckReason::ConnectionAccepted {
                    bail!("connection refused: {}", ack.return_code.reason());
                }
                Ok((c, ack.session_present))
            }
            Some(other) => bail!("expected CONNACK, got {other:?}"),
            None => bail!("connection closed before CONNACK"),
        }
    }

    /// SUBSCRIBE to `filters` at `qos` and wait for a SUBACK granting every
    /// filter that QoS (a broker granting less would change what is measured).
    pub async fn subscribe(
        &mut self,
        filters: &[ByteString],
        qos: u8,
        timeout: Duration,
    ) -> Result<()> {
        let wire_qos = wire_qos(qos)?;
        let packet_id = NonZeroU16::new(1).expect("1 is not zero");
        self.writer
            .send(v3::Packet::Subscribe {
                packet_id,
                topic_filters: filters.iter().map(|f| (f.clone(), wire_qos)).collect(),
            })
            .await?;
        let ack = tokio::time::timeout(timeout, async {
            match self.reader.next().await? {
                Some(v3::Packet::SubscribeAck {
                    packet_id: id,
                    status,
                }) if id == packet_id => Ok(status),
                Some(v3::Packet::SubscribeAck { packet_id: id, .. }) => {
                    bail!("SUBACK for packet id {id}, expected {packet_id}")
                }
                // Subscriptions are made on fresh sessions, before anything is published.
                Some(v3::Packet::Publish(_)) => bail!("PUBLISH before SUBACK"),
                Some(other) => bail!("expected SUBACK, got {other:?}"),
                None => bail!("connection closed before SUBACK"),
            }
        })
        .await
        .map_err(|_| anyhow!("no SUBACK within {timeout:?}"))??;
        if ack.len() != filters.len() {
            bail!(
                "SUBACK has {} return codes for {} filters",
                ack.len(),
                filters.len()
            );
        }
        for (f, code) in filters.iter().zip(ack) {
            match code {
                v3::SubscribeReturnCode::Success(q) if q == wire_qos => {}
                other => bail!("subscription to {f} at QoS {qos} answered {other:?}"),
            }
        }
        Ok(())
    }

    /// PINGREQ and wait for PINGRESP (other packets are skipped).
    pub async fn ping(&mut self, timeout: Duration) -> Result<()> {
        self.writer.send(v3::Packet::PingRequest).await?;
        tokio::time::timeout(timeout, async {
            loop {
                match self.reader.next().await? {
                    Some(v3::Packet::PingResponse) => return Ok(()),
                    Some(_) => {}
                    None => bail!("connection closed"),
                }
            }
        })
        .await
        .map_err(|_| anyhow!("no PINGRESP within {timeout:?}"))?
    }

    /// DISCONNECT, then wait up to 2 s for the broker to close.
    pub async fn close(self) -> Result<()> {
        let Connection {
            mut reader,
            mut writer,
        } = self;
        close(&mut reader, &mut writer).await
    }

    /// The two halves, for tasks that read and write independently.
    pub fn split(self) -> (Reader, Writer) {
        (self.reader, self.writer)
    }
}

/// DISCONNECT on `writer`, then wait up to 2 s for the broker to close `reader`.
pub async fn close(reader: &mut Reader, writer: &mut Writer) -> Result<()> {
    let r = writer.disconnect().await;
    reader.drain_until_closed(Duration::from_secs(2)).await;
    r
}

/// The codec's QoS for 0, 1 or 2.
pub fn wire_qos(qos: u8) -> Result<v3::QoS> {
    match qos {
        0 => Ok(v3::QoS::AtMostOnce),
        1 => Ok(v3::QoS::AtLeastOnce),
        2 => Ok(v3::QoS::ExactlyOnce),
        q => bail!("QoS must be 0, 1 or 2, not {q}"),
    }
}

/// The acknowledgement a received PUBLISH needs: PUBACK for QoS 1, PUBREC for
/// QoS 2 (answer the PUBREL that follows with PUBCOMP), nothing for QoS 0.
/// `Err` for a QoS 1/2 PUBLISH without packet id (the codec normally rejects it).
pub fn ack_for(p: &rmqtt_codec::types::Publish) -> Result<Option<v3::Packet>> {
    Ok(match (p.qos, p.packet_id) {
        (v3::QoS::AtMostOnce, _) => None,
        (v3::QoS::AtLeastOnce, Some(packet_id)) => Some(v3::Packet::PublishAck { packet_id }),
        (v3::QoS::ExactlyOnce, Some(packet_id)) => Some(v3::Packet::PublishReceived { packet_id }),
        (_, None) => bail!("QoS {:?} PUBLISH without packet id", p.qos),
    })
}

/// A publisher's in-flight window for QoS 1/2.
///
/// `size` publishes may await their final acknowledgement at once. The
/// publisher takes a permit per publish ([`Window::try_acquire`] or waits in
/// [`Window::wait_for_space`]) and [`Window::register`]s it to get a packet
/// id; the reading side hands PUBACK / PUBREC / PUBCOMP to the `on_*` methods,
/// which check the packet id really is outstanding in that state and give the
/// permit back on the final acknowledgement. Each publish carries a tag
/// (stream, sequence) that the acknowledgement returns.
pub struct Window {
    size: usize,
    permits: Semaphore,
    table: Mutex<Table>,
}

#[derive(Clone, Copy)]
enum Slot {
    Free,
    AwaitAck(u32, u64),
    AwaitRec(u32, u64),
    AwaitComp,
}

struct Table {
    slots: Vec<Slot>,
    next: u16,
}

impl Window {
    /// A window of `size` (1..=65535) publishes.
    pub fn new(size: usize) -> Window {
        assert!((1..=65535).contains(&size), "window size out of range");
        Window {
            size,
            permits: Semaphore::new(size),
            table: Mutex::new(Table {
                slots: vec![Slot::Free; 65536],
                next: 0,
            }),
        }
    }

    /// Take a permit if one is free.
    pub fn try_acquire(&self) -> bool {
        match self.permits.try_acquire() {
            Ok(p) => {
                p.forget();
                true
            }
            Err(_) => false,
        }
    }

    /// Wait until a permit is free (without taking it).
    pub async fn wait_for_space(&self) {
        let _ = self.permits.acquire().await;
    }

    /// Wait until nothing is outstanding.
    pub async fn wait_empty(&self) {
        let n = u32::try_from(self.size).expect("window fits u32");
        let _ = self.permits.acquire_many(n).await;
    }

    /// Publishes awaiting their final acknowledgement.
    pub fn outstanding(&self) -> usize {
        self.size - self.permits.available_permits()
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A packet id for a publish at `qos` (1 or 2) tagged (`stream`, `seq`),
    /// after a permit was taken.
    pub fn register(&self, qos: u8, stream: u32, seq: u64) -> NonZeroU16 {
        let mut t = self.table();
        loop {
            t.next = t.next.checked_add(1).unwrap_or(1);
            let id = t.next;
            let slot = &mut t.slots[usize::from(id)];
            if matches!(slot, Slot::Free) {
                *slot = if qos == 1 {
                    Slot::AwaitAck(stream, seq)
                } else {
                    Slot::AwaitRec(stream, seq)
                };
                return NonZeroU16::new(id).expect("ids start at 1");
            }
        }
    }

    /// PUBACK `id`: the tag, and the permit is returned. `Err` if `id` does
    /// not await a PUBACK.
    pub fn on_puback(&self, id: NonZeroU16) -> Result<(u32, u64)> {
        let mut t = self.table();
        let slot = &mut t.slots[usize::from(id.get())];
        match *slot {
            Slot::AwaitAck(stream, seq) => {
                *slot = Slot::Free;
                self.permits.add_permits(1);
                Ok((stream, seq))
            }
            _ => bail!("PUBACK for packet id {id}, which awaits no PUBACK"),
        }
    }

    /// PUBREC `id`: the tag (the broker now owns the message); answer with
    /// PUBREL. `Err` if `id` does not await a PUBREC.
    pub fn on_pubrec(&self, id: NonZeroU16) -> Result<(u32, u64)> {
        let mut t = self.table();
        let slot = &mut t.slots[usize::from(id.get())];
        match *slot {
            Slot::AwaitRec(stream, seq) => {
                *slot = Slot::AwaitComp;
                Ok((stream, seq))
            }
            _ => bail!("PUBREC for packet id {id}, which awaits no PUBREC"),
        }
    }

    /// PUBCOMP `id`: the permit is returned. `Err` if `id` does not await one.
    pub fn on_pubcomp(&self, id: NonZeroU16) -> Result<()> {
        let mut t = self.table();
        let slot = &mut t.slots[usize::from(id.get())];
        match *slot {
            Slot::AwaitComp => {
                *slot = Slot::Free;
                self.permits.add_permits(1);
                Ok(())
            }
            _ => bail!("PUBCOMP for packet id {id}, which awaits no PUBCOMP"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_tracks_ids_and_permits() {
        let w = Window::new(2);
        assert!(w.try_acquire());
        let a = w.register(1, 0, 10);
        assert!(w.try_acquire());
        let b = w.register(2, 0, 11);
        assert!(!w.try_acquire());
        assert_eq!(w.outstanding(), 2);
        assert_ne!(a, b);
        assert!(w.on_pubrec(a).is_err());
        assert_eq!(w.on_puback(a).ok(), Some((0, 10)));
        assert!(w.on_puback(a).is_err(), "second PUBACK for the same id");
        assert_eq!(w.outstanding(), 1);
        assert!(w.on_pubcomp(b).is_err(), "PUBCOMP before PUBREC");
        assert_eq!(w.on_pubrec(b).ok(), Some((0, 11)));
        assert_eq!(w.outstanding(), 1, "QoS 2 holds its permit until PUBCOMP");
        assert!(w.on_pubcomp(b).is_ok());
        assert_eq!(w.outstanding(), 0);
    }

    #[test]
    fn ids_skip_those_still_in_flight() {
        let w = Window::new(3);
        assert!(w.try_acquire());
        let first = w.register(1, 0, 0);
        for i in 1..70_000u64 {
            assert!(w.try_acquire());
            let id = w.register(1, 0, i);
            assert_ne!(id, first);
            assert!(w.on_puback(id).is_ok());
        }
        assert_eq!(w.on_puback(first).ok(), Some((0, 0)));
    }
}
