//! Shared test helpers: an in-process broker on an ephemeral port, and a raw
//! MQTT 3.1.1 client that does exactly what a test tells it (no automatic acks),
//! for the cases a well-behaved client library cannot produce.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub mod v5;

use broker_core::config::BrokerConfig;
use broker_core::internals::codec::{v3, MqttCodec};
use broker_core::server::Server;
use broker_core::storage::Storage;
use broker_core::Broker;
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use futures::StreamExt;
use storage_memory::MemoryStore;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::codec::{Encoder, FramedRead};

/// How long a test waits for something that should happen promptly.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestBroker {
    pub addr: SocketAddr,
    pub broker: Broker,
    pub storage: Storage,
    task: JoinHandle<()>,
}

pub async fn start(config: BrokerConfig) -> TestBroker {
    start_with(config, MemoryStore::new().into_storage()).await
}

pub async fn start_with(config: BrokerConfig, storage: Storage) -> TestBroker {
    start_hooks(config, storage, broker_core::hooks::Hooks::default()).await
}

pub async fn start_hooks(
    config: BrokerConfig,
    storage: Storage,
    hooks: broker_core::hooks::Hooks,
) -> TestBroker {
    let broker = Broker::start_with(config, storage.clone(), hooks)
        .await
        .expect("broker starts");
    let server = Server::bind(broker.clone(), "127.0.0.1:0")
        .await
        .expect("bind");
    let addr = server.local_addr().expect("addr");
    let task = tokio::spawn(server.run());
    TestBroker {
        addr,
        broker,
        storage,
        task,
    }
}

impl TestBroker {
    /// Graceful stop; the storage stays usable for a restart.
    pub async fn stop(self) -> Storage {
        self.broker.shutdown().await;
        let _ = tokio::time::timeout(WAIT, self.task).await;
        self.storage
    }
}

pub trait IntoStorage {
    fn into_storage(self) -> Storage;
}

impl IntoStorage for MemoryStore {
    fn into_storage(self) -> Storage {
        Storage::from_backend(Arc::new(self))
    }
}

pub struct RawClient {
    read: FramedRead<OwnedReadHalf, MqttCodec>,
    write: OwnedWriteHalf,
    /// Packets read ahead while waiting for a specific one.
    backlog: std::collections::VecDeque<v3::Packet>,
}

pub fn connect_packet(
    id: &str,
    clean: bool,
    keep_alive: u16,
    will: Option<v3::LastWill>,
) -> v3::Packet {
    v3::Packet::Connect(Box::new(v3::Connect {
        protocol: Default::default(),
        clean_session: clean,
        keep_alive,
        last_will: will,
        client_id: ByteString::from(id),
        username: None,
        password: None,
        cert: None,
    }))
}

pub fn publish_packet(
    topic: &str,
    payload: &[u8],
    qos: u8,
    packet_id: u16,
    retain: bool,
) -> v3::Packet {
    let qos = broker_core::message::QoS::from_u8(qos).expect("QoS 0, 1 or 2");
    v3::Packet::Publish(Box::new(broker_core::internals::codec::Publish {
        dup: false,
        retain,
        qos: broker_core::internals::codec::to_wire_qos(qos),
        topic: ByteString::from(topic),
        packet_id: (qos != broker_core::message::QoS::AtMostOnce).then(|| id(packet_id)),
        payload: Bytes::copy_from_slice(payload),
        properties: None,
    }))
}

pub fn id(n: u16) -> std::num::NonZeroU16 {
    std::num::NonZeroU16::new(n).expect("non-zero packet id")
}

pub fn encode(p: v3::Packet) -> BytesMut {
    let mut buf = BytesMut::new();
    v3::Codec::new(0).encode(p, &mut buf).expect("encodes");
    buf
}

impl RawClient {
    pub async fn open(addr: SocketAddr) -> RawClient {
        let stream = TcpStream::connect(addr).await.expect("tcp connect");
        let (r, w) = stream.into_split();
        RawClient {
            read: FramedRead::new(r, MqttCodec::V3(v3::Codec::new(0))),
            write: w,
            backlog: Default::default(),
        }
    }

    /// Connect and return the client with CONNACK's (return code, session present).
    pub async fn connect_full(
        addr: SocketAddr,
        id: &str,
        clean: bool,
        keep_alive: u16,
        will: Option<v3::LastWill>,
    ) -> (RawClient, v3::ConnectAckReason, bool) {
        let mut c = RawClient::open(addr).await;
        c.send(connect_packet(id, clean, keep_alive, will)).await;
        match c.recv().await {
            v3::Packet::ConnectAck(a) => (c, a.return_code, a.session_present),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub async fn connect(addr: SocketAddr, id: &str, clean: bool) -> (RawClient, bool) {
        let (c, code, present) = RawClient::connect_full(addr, id, clean, 0, None).await;
        assert_eq!(code, v3::ConnectAckReason::ConnectionAccepted);
        (c, present)
    }

    pub async fn send(&mut self, p: v3::Packet) {
        let buf = encode(p);
        self.write.write_all(&buf).await.expect("write");
    }

    pub async fn send_bytes(&mut self, b: &[u8]) {
        let _ = self.write.write_all(b).await;
    }

    /// The next packet; panics after [`WAIT`] or on close.
    pub async fn recv(&mut self) -> v3::Packet {
        if let Some(p) = self.backlog.pop_front() {
            return p;
        }
        match tokio::time::timeout(WAIT, self.read.next()).await {
            Ok(Some(Ok((broker_core::internals::codec::MqttPacket::V3(p), _)))) => p,
            Ok(other) => panic!("connection ended or bad frame: {other:?}"),
            Err(_) => panic!("no packet within {WAIT:?}"),
        }
    }

    /// The next packet if one arrives within `d`.
    pub async fn try_recv(&mut self, d: Duration) -> Option<v3::Packet> {
        if let Some(p) = self.backlog.pop_front() {
            return Some(p);
        }
        match tokio::time::timeout(d, self.read.next()).await {
            Ok(Some(Ok((broker_core::internals::codec::MqttPacket::V3(p), _)))) => Some(p),
            Ok(other) => panic!("connection ended or bad frame: {other:?}"),
            Err(_) => None,
        }
    }

    /// Asserts the broker closes the connection within [`WAIT`].
    pub async fn expect_closed(&mut self) {
        match tokio::time::timeout(WAIT, self.read.next()).await {
            Ok(None) | Ok(Some(Err(_))) => {}
            Ok(Some(Ok(p))) => panic!("expected the connection to close, got {p:?}"),
            Err(_) => panic!("connection not closed within {WAIT:?}"),
        }
    }

    pub async fn subscribe(&mut self, filter: &str, qos: u8) -> Vec<v3::SubscribeReturnCode> {
        self.subscribe_many(&[(filter, qos)]).await
    }

    pub async fn subscribe_many(&mut self, filters: &[(&str, u8)]) -> Vec<v3::SubscribeReturnCode> {
        let topic_filters = filters
            .iter()
            .map(|(f, q)| (ByteString::from(*f), v3::QoS::try_from(*q).expect("qos")))
            .collect();
        self.send(v3::Packet::Subscribe {
            packet_id: id(1000),
            topic_filters,
        })
        .await;
        match self.recv().await {
            v3::Packet::SubscribeAck { packet_id, status } => {
                assert_eq!(packet_id, id(1000));
                status
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// Publish and complete the acknowledgement flow for its QoS.
    pub async fn publish(&mut self, topic: &str, payload: &[u8], qos: u8, retain: bool) {
        let pid = 77;
        self.send(publish_packet(topic, payload, qos, pid, retain))
            .await;
        match qos {
            0 => {}
            1 => assert_eq!(
                self.recv().await,
                v3::Packet::PublishAck { packet_id: id(pid) }
            ),
            _ => {
                assert_eq!(
                    self.recv().await,
                    v3::Packet::PublishReceived { packet_id: id(pid) }
                );
                self.send(v3::Packet::PublishRelease { packet_id: id(pid) })
                    .await;
                assert_eq!(
                    self.recv().await,
                    v3::Packet::PublishComplete { packet_id: id(pid) }
                );
            }
        }
    }

    /// The next PUBLISH (skipping nothing: any other packet fails the test).
    pub async fn recv_publish(&mut self) -> rmqtt_codec::types::Publish {
        match self.recv().await {
            v3::Packet::Publish(p) => *p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Receive a PUBLISH and acknowledge it fully.
    pub async fn recv_and_ack(&mut self) -> rmqtt_codec::types::Publish {
        let p = self.recv_publish().await;
        if let Some(pid) = p.packet_id {
            match p.qos {
                v3::QoS::AtLeastOnce => self.send(v3::Packet::PublishAck { packet_id: pid }).await,
                v3::QoS::ExactlyOnce => {
                    self.send(v3::Packet::PublishReceived { packet_id: pid })
                        .await;
                    self.wait_for(v3::Packet::PublishRelease { packet_id: pid })
                        .await;
                    self.send(v3::Packet::PublishComplete { packet_id: pid })
                        .await;
                }
                _ => {}
            }
        }
        p
    }

    /// Read until `expected` arrives, keeping other packets for later `recv`s.
    pub async fn wait_for(&mut self, expected: v3::Packet) {
        let mut skipped = std::collections::VecDeque::new();
        loop {
            let p = match self.backlog.pop_front() {
                Some(p) => p,
                None => {
                    let saved = std::mem::take(&mut self.backlog);
                    let p = self.recv().await;
                    self.backlog = saved;
                    p
                }
            };
            if p == expected {
                skipped.extend(self.backlog.drain(..));
                self.backlog = skipped;
                return;
            }
            skipped.push_back(p);
        }
    }

    pub async fn disconnect(mut self) {
        self.send(v3::Packet::Disconnect).await;
        let _ = self.write.shutdown().await;
    }

    /// Drop the socket without DISCONNECT.
    pub fn drop_socket(self) {}
}

pub fn payload_str(p: &rmqtt_codec::types::Publish) -> String {
    String::from_utf8_lossy(&p.payload).into_owned()
}
