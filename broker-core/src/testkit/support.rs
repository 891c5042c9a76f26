//! Small helpers shared by the cases: fixtures, checked calls, paged reads.

use std::sync::Arc;

use bytes::Bytes;

use crate::message::{Message, MessageId, QoS, Seq};
use crate::storage::{
    ClientId, Delivery, PacketOp, PacketState, QueueTarget, QueuedPacket, Storage, StorageResult,
};

/// A fixed reception time, so that round trips compare exactly.
const RECEIVED_AT_MS: u64 = 1_700_000_000_000;

/// Page size for [`read_all`]: odd on purpose, so pages rarely align with
/// anything the cases write.
const READ_PAGE: usize = 37;

pub(crate) fn client(name: &str) -> ClientId {
    Arc::from(name)
}

/// A QoS 1 message with id `id` and no properties.
pub(crate) fn msg(id: MessageId, topic: &str, payload: impl Into<Bytes>) -> Arc<Message> {
    let mut m = Message::new(topic, payload, QoS::AtLeastOnce, false);
    m.id = id;
    m.received_at_ms = RECEIVED_AT_MS + id;
    Arc::new(m)
}

pub(crate) fn target(client: &ClientId, seq: Seq) -> QueueTarget {
    QueueTarget {
        client: client.clone(),
        seq,
        delivery: Delivery::new(QoS::AtLeastOnce),
    }
}

/// Deliveries using every field, with edge values: QoS 2 retained with
/// several subscription ids (the largest allowed among them) and a shared
/// group; QoS 1 with one id; QoS 0 plain.
pub(crate) fn rich_delivery(i: usize) -> Delivery {
    match i % 3 {
        0 => Delivery {
            qos: QoS::ExactlyOnce,
            retain: true,
            subscription_ids: vec![7, 1, 268_435_455],
            share: Some("$share/grüppe/a/+/#".to_owned()),
        },
        1 => Delivery {
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: vec![42],
            share: None,
        },
        _ => Delivery::new(QoS::AtMostOnce),
    }
}

pub(crate) fn enqueue(message: Arc<Message>, targets: Vec<QueueTarget>) -> PacketOp {
    PacketOp::Enqueue { message, targets }
}

/// Enqueue message `id` for `client` at `seq`, with payload `"<client>#<seq>"`.
pub(crate) fn enqueue_one(client: &ClientId, seq: Seq, id: MessageId) -> PacketOp {
    enqueue(
        msg(id, "t/queue", payload_for(client, seq)),
        vec![target(client, seq)],
    )
}

pub(crate) fn payload_for(client: &str, seq: Seq) -> String {
    format!("{client}#{seq}")
}

pub(crate) fn remove(client: &ClientId, seq: Seq) -> PacketOp {
    PacketOp::Remove {
        client: client.clone(),
        seq,
    }
}

pub(crate) fn set_state(client: &ClientId, seq: Seq, state: PacketState) -> PacketOp {
    PacketOp::SetState {
        client: client.clone(),
        seq,
        state,
    }
}

/// Unwrap a storage result, naming the operation that failed.
pub(crate) fn ok<T>(result: StorageResult<T>, what: &str) -> T {
    match result {
        Ok(v) => v,
        Err(e) => panic!("storage call failed ({what}): {e}"),
    }
}

pub(crate) async fn write(storage: &Storage, ops: Vec<PacketOp>, what: &str) {
    ok(storage.packets.write(ops).await, what);
}

/// The whole queue of `client`, read in pages, checking on the way that pages
/// respect their limit and that sequence numbers strictly increase.
pub(crate) async fn read_all(storage: &Storage, client: &str) -> Vec<QueuedPacket> {
    let mut all: Vec<QueuedPacket> = Vec::new();
    loop {
        let after = all.last().map(|p| p.seq);
        let page = ok(
            storage.packets.read_queue(client, after, READ_PAGE).await,
            "read_queue",
        );
        assert!(
            page.len() <= READ_PAGE,
            "read_queue({client}, {after:?}, {READ_PAGE}) returned {} entries, more than the limit",
            page.len()
        );
        for p in &page {
            if let Some(prev) = all.last().map(|p| p.seq).or(after) {
                assert!(
                    p.seq > prev,
                    "queue of {client} not in strictly increasing seq order: {} after {prev}",
                    p.seq
                );
            }
            all.push(p.clone());
        }
        if page.is_empty() {
            return all;
        }
    }
}

pub(crate) fn seqs(entries: &[QueuedPacket]) -> Vec<Seq> {
    entries.iter().map(|p| p.seq).collect()
}

/// Sorted copy, for results the contract returns in no particular order.
pub(crate) fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v
}

/// A tiny deterministic generator (xorshift64*), so that failures reproduce
/// and broker-core needs no `rand` dependency for its testkit.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n > 0`).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Messages exercising every field of [`Message`] and [`MessageProperties`],
/// including the edge cases a serialisation may lose: binary and empty
/// payloads, present-but-empty strings and correlation data, duplicate and
/// empty user property keys, non-ASCII text.
///
/// [`MessageProperties`]: crate::message::MessageProperties
pub(crate) fn rich_messages(first_id: MessageId) -> Vec<Arc<Message>> {
    use crate::message::MessageProperties;

    let full = Message {
        id: first_id,
        topic: "props/ä/x y".to_owned(),
        payload: Bytes::from_static(&[0, 159, 146, 150, 255, b'\n', 0]),
        qos: QoS::ExactlyOnce,
        retain: true,
        properties: MessageProperties {
            payload_format_utf8: Some(true),
            expires_at_ms: Some(1_900_000_000_123),
            content_type: Some("application/json; charset=utf-8".to_owned()),
            response_topic: Some("reply/to/ü".to_owned()),
            correlation_data: Some(Bytes::from_static(&[0, 1, 2, 254, 255])),
            user_properties: vec![
                ("k".to_owned(), "v".to_owned()),
                ("k".to_owned(), "v2".to_owned()),
                (String::new(), String::new()),
                ("ключ".to_owned(), "значение".to_owned()),
            ],
        },
        received_at_ms: RECEIVED_AT_MS + 1,
    };
    let empty_but_present = Message {
        id: first_id + 1,
        topic: "props/empty".to_owned(),
        payload: Bytes::new(),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: MessageProperties {
            payload_format_utf8: Some(false),
            expires_at_ms: Some(0),
            content_type: Some(String::new()),
            response_topic: Some(String::new()),
            correlation_data: Some(Bytes::new()),
            user_properties: vec![],
        },
        received_at_ms: 0,
    };
    let large = Message {
        id: first_id + 2,
        topic: "props/large".to_owned(),
        payload: Bytes::from(
            (0..256 * 1024)
                .map(|i| (i % 251) as u8)
                .collect::<Vec<u8>>(),
        ),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: MessageProperties::default(),
        received_at_ms: u64::from(u32::MAX) * 1000,
    };
    vec![Arc::new(full), Arc::new(empty_but_present), Arc::new(large)]
}
