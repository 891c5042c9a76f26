//! Mapping between the broker's values and BSON documents.
//!
//! A message body is the same fields in `messages` and `retained`
//! ([`message_fields`]); optional MQTT 5 properties are left out when
//! absent, so MQTT 3.1.1 traffic pays nothing for them. Numbers are stored
//! as 64-bit integers (32-bit for small enumerations); reading accepts
//! either width, and anything else is [`StorageError::Corrupt`].

use broker_core::message::{Message, MessageId, MessageProperties, QoS, Seq};
use broker_core::storage::{
    Delivery, PacketState, SessionRecord, StorageError, StorageResult, StoredWill,
};
use broker_core::subscription::SubscriptionOptions;
use bytes::Bytes;
use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{doc, Binary, Bson, Document};

/// Field names, shared by the queries and the mapping.
pub(crate) mod field {
    pub const ID: &str = "_id";
    pub const CLIENT: &str = "client";
    pub const SEQ: &str = "seq";
    pub const MESSAGE_ID: &str = "message_id";
    pub const QOS: &str = "qos";
    pub const RETAIN: &str = "retain";
    pub const SUBSCRIPTION_IDS: &str = "subscription_ids";
    pub const SHARE: &str = "share";
    pub const STATE: &str = "state";
    pub const PACKET_ID: &str = "packet_id";
    pub const TOPIC: &str = "topic";
    pub const PAYLOAD: &str = "payload";
    pub const RECEIVED_AT: &str = "received_at";
    pub const EXPIRES_AT: &str = "expires_at";
    pub const PAYLOAD_UTF8: &str = "payload_utf8";
    pub const CONTENT_TYPE: &str = "content_type";
    pub const RESPONSE_TOPIC: &str = "response_topic";
    pub const CORRELATION_DATA: &str = "correlation_data";
    pub const USER_PROPERTIES: &str = "user_properties";
    pub const REFS: &str = "refs";
    /// In `retained`: the message id (`_id` is the server's).
    pub const RETAINED_ID: &str = "id";
    /// In `packets`, after the `$lookup` of a queue page: the body.
    pub const BODY: &str = "body";
    pub const EXPIRY_SECS: &str = "expiry_secs";
    pub const DISCONNECTED_AT: &str = "disconnected_at";
    pub const NO_LOCAL: &str = "no_local";
    pub const RETAIN_AS_PUBLISHED: &str = "retain_as_published";
    pub const RETAIN_HANDLING: &str = "retain_handling";
    pub const SUBSCRIPTION_ID: &str = "subscription_id";
    pub const VALUE: &str = "value";
    /// In `wills`: the Will Delay Interval.
    pub const DELAY_SECS: &str = "delay_secs";
}

/// `packets.state` of an entry not yet acknowledged.
pub(crate) const STATE_QUEUED: i32 = 0;
/// `packets.state` of a QoS 2 entry whose PUBREC arrived (with `packet_id`).
pub(crate) const STATE_RELEASED: i32 = 1;

/// A value the broker gave that BSON's signed 64-bit integers cannot hold.
pub(crate) fn to_i64(v: u64, what: &str) -> StorageResult<i64> {
    i64::try_from(v).map_err(|e| {
        StorageError::backend(format!("{what} {v} is too large to store")).with_source(e)
    })
}

fn binary(bytes: &[u8]) -> Bson {
    Bson::Binary(Binary {
        subtype: BinarySubtype::Generic,
        bytes: bytes.to_vec(),
    })
}

/// The fields of a message body, without its id.
pub(crate) fn message_fields(m: &Message) -> StorageResult<Document> {
    let p = &m.properties;
    let mut d = doc! {
        field::TOPIC: &m.topic,
        field::PAYLOAD: binary(&m.payload),
        field::QOS: i32::from(m.qos.as_u8()),
        field::RETAIN: m.retain,
        field::RECEIVED_AT: to_i64(m.received_at_ms, "reception time")?,
    };
    if let Some(t) = p.expires_at_ms {
        d.insert(field::EXPIRES_AT, to_i64(t, "expiry time")?);
    }
    if let Some(v) = p.payload_format_utf8 {
        d.insert(field::PAYLOAD_UTF8, v);
    }
    if let Some(v) = &p.content_type {
        d.insert(field::CONTENT_TYPE, v);
    }
    if let Some(v) = &p.response_topic {
        d.insert(field::RESPONSE_TOPIC, v);
    }
    if let Some(v) = &p.correlation_data {
        d.insert(field::CORRELATION_DATA, binary(v));
    }
    if !p.user_properties.is_empty() {
        let pairs: Vec<Bson> = p
            .user_properties
            .iter()
            .map(|(k, v)| Bson::Array(vec![Bson::String(k.clone()), Bson::String(v.clone())]))
            .collect();
        d.insert(field::USER_PROPERTIES, pairs);
    }
    Ok(d)
}

/// A `messages` document: the body under `_id` = its id, referenced `refs` times.
pub(crate) fn body_doc(m: &Message, refs: i64) -> StorageResult<Document> {
    let mut d = doc! { field::ID: to_i64(m.id, "message id")? };
    d.extend(message_fields(m)?);
    d.insert(field::REFS, refs);
    Ok(d)
}

/// A `retained` document: the body with its id under `id`.
pub(crate) fn retained_doc(m: &Message) -> StorageResult<Document> {
    let mut d = message_fields(m)?;
    d.insert(field::RETAINED_ID, to_i64(m.id, "message id")?);
    Ok(d)
}

/// A `wills` document: the will's message under `_id` = its id, its client,
/// expiry and delay.
pub(crate) fn will_doc(w: &StoredWill) -> StorageResult<Document> {
    let mut d = doc! { field::ID: to_i64(w.id(), "will id")? };
    d.extend(message_fields(&w.message)?);
    d.insert(field::CLIENT, &*w.client);
    if let Some(e) = w.expiry_secs {
        d.insert(field::EXPIRY_SECS, i64::from(e));
    }
    d.insert(field::DELAY_SECS, i64::from(w.delay_secs));
    Ok(d)
}

/// A will from a [`will_doc`] document.
pub(crate) fn will_from_doc(mut doc: Document) -> StorageResult<StoredWill> {
    let mut f = Fields::new(&mut doc, "wills");
    let client = f.string(field::CLIENT)?;
    let expiry_secs = f.opt_int(field::EXPIRY_SECS)?;
    let delay_secs = f.int(field::DELAY_SECS)?;
    Ok(StoredWill {
        client: client.into(),
        message: std::sync::Arc::new(message_from_doc(doc, "wills", field::ID)?),
        expiry_secs,
        delay_secs,
    })
}

/// Typed access to the fields of one stored document; every mismatch is
/// [`StorageError::Corrupt`], naming the collection and field.
pub(crate) struct Fields<'a> {
    doc: &'a mut Document,
    collection: &'static str,
}

impl<'a> Fields<'a> {
    pub(crate) fn new(doc: &'a mut Document, collection: &'static str) -> Self {
        Fields { doc, collection }
    }

    fn corrupt(&self, key: &str, problem: impl std::fmt::Display) -> StorageError {
        StorageError::corrupt(format!(
            "field `{key}` of a `{}` document {problem}",
            self.collection
        ))
    }

    fn found(v: &Bson) -> String {
        format!("holds {:?}", v.element_type())
    }

    pub(crate) fn opt_i64(&self, key: &str) -> StorageResult<Option<i64>> {
        match self.doc.get(key) {
            None | Some(Bson::Null) => Ok(None),
            Some(Bson::Int64(v)) => Ok(Some(*v)),
            Some(Bson::Int32(v)) => Ok(Some(i64::from(*v))),
            Some(v) => Err(self.corrupt(key, Self::found(v))),
        }
    }

    pub(crate) fn opt_u64(&self, key: &str) -> StorageResult<Option<u64>> {
        match self.opt_i64(key)? {
            None => Ok(None),
            Some(v) => u64::try_from(v)
                .map(Some)
                .map_err(|_| self.corrupt(key, format!("is negative ({v})"))),
        }
    }

    pub(crate) fn u64(&self, key: &str) -> StorageResult<u64> {
        self.opt_u64(key)?
            .ok_or_else(|| self.corrupt(key, "is missing"))
    }

    /// An integer that must fit `T` (a packet id, a subscription id, ...).
    pub(crate) fn opt_int<T: TryFrom<i64>>(&self, key: &str) -> StorageResult<Option<T>> {
        match self.opt_i64(key)? {
            None => Ok(None),
            Some(v) => T::try_from(v)
                .map(Some)
                .map_err(|_| self.corrupt(key, format!("is out of range ({v})"))),
        }
    }

    pub(crate) fn int<T: TryFrom<i64>>(&self, key: &str) -> StorageResult<T> {
        self.opt_int(key)?
            .ok_or_else(|| self.corrupt(key, "is missing"))
    }

    pub(crate) fn qos(&self, key: &str) -> StorageResult<QoS> {
        let v: u8 = self.int(key)?;
        QoS::from_u8(v).ok_or_else(|| self.corrupt(key, format!("is not a QoS ({v})")))
    }

    pub(crate) fn opt_bool(&self, key: &str) -> StorageResult<Option<bool>> {
        match self.doc.get(key) {
            None | Some(Bson::Null) => Ok(None),
            Some(Bson::Boolean(v)) => Ok(Some(*v)),
            Some(v) => Err(self.corrupt(key, Self::found(v))),
        }
    }

    pub(crate) fn bool(&self, key: &str) -> StorageResult<bool> {
        self.opt_bool(key)?
            .ok_or_else(|| self.corrupt(key, "is missing"))
    }

    pub(crate) fn opt_string(&mut self, key: &str) -> StorageResult<Option<String>> {
        match self.doc.remove(key) {
            None | Some(Bson::Null) => Ok(None),
            Some(Bson::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.corrupt(key, Self::found(&v))),
        }
    }

    pub(crate) fn string(&mut self, key: &str) -> StorageResult<String> {
        self.opt_string(key)?
            .ok_or_else(|| self.corrupt(key, "is missing"))
    }

    pub(crate) fn opt_bytes(&mut self, key: &str) -> StorageResult<Option<Bytes>> {
        match self.doc.remove(key) {
            None | Some(Bson::Null) => Ok(None),
            Some(Bson::Binary(b)) => Ok(Some(Bytes::from(b.bytes))),
            Some(v) => Err(self.corrupt(key, Self::found(&v))),
        }
    }

    pub(crate) fn bytes(&mut self, key: &str) -> StorageResult<Bytes> {
        self.opt_bytes(key)?
            .ok_or_else(|| self.corrupt(key, "is missing"))
    }

    /// An optional array; absent reads as empty.
    fn array(&mut self, key: &str) -> StorageResult<Vec<Bson>> {
        match self.doc.remove(key) {
            None | Some(Bson::Null) => Ok(Vec::new()),
            Some(Bson::Array(a)) => Ok(a),
            Some(v) => Err(self.corrupt(key, Self::found(&v))),
        }
    }

    pub(crate) fn string_pairs(&mut self, key: &str) -> StorageResult<Vec<(String, String)>> {
        let items = self.array(key)?;
        items
            .into_iter()
            .map(|item| match item {
                Bson::Array(pair) => match <[Bson; 2]>::try_from(pair) {
                    Ok([Bson::String(k), Bson::String(v)]) => Ok((k, v)),
                    _ => Err(self.corrupt(key, "holds a pair that is not two strings")),
                },
                other => {
                    Err(self.corrupt(key, format!("holds an item that {}", Self::found(&other))))
                }
            })
            .collect()
    }

    pub(crate) fn u32_list(&mut self, key: &str) -> StorageResult<Vec<u32>> {
        let items = self.array(key)?;
        items
            .into_iter()
            .map(|item| {
                let v = match item {
                    Bson::Int64(v) => v,
                    Bson::Int32(v) => i64::from(v),
                    other => {
                        return Err(self
                            .corrupt(key, format!("holds an item that {}", Self::found(&other))))
                    }
                };
                u32::try_from(v).map_err(|_| self.corrupt(key, format!("holds {v}")))
            })
            .collect()
    }

    /// The first document of an array field (the result of a `$lookup`).
    pub(crate) fn take_first_doc(&mut self, key: &str) -> StorageResult<Option<Document>> {
        match self.array(key)?.into_iter().next() {
            None => Ok(None),
            Some(Bson::Document(d)) => Ok(Some(d)),
            Some(v) => Err(self.corrupt(key, format!("holds an item that {}", Self::found(&v)))),
        }
    }
}

/// A message from [`message_fields`] plus its id (under `id_key`).
pub(crate) fn message_from_doc(
    mut doc: Document,
    collection: &'static str,
    id_key: &str,
) -> StorageResult<Message> {
    let mut f = Fields::new(&mut doc, collection);
    let id: MessageId = f.u64(id_key)?;
    Ok(Message {
        id,
        topic: f.string(field::TOPIC)?,
        payload: f.bytes(field::PAYLOAD)?,
        qos: f.qos(field::QOS)?,
        retain: f.bool(field::RETAIN)?,
        received_at_ms: f.u64(field::RECEIVED_AT)?,
        properties: MessageProperties {
            expires_at_ms: f.opt_u64(field::EXPIRES_AT)?,
            payload_format_utf8: f.opt_bool(field::PAYLOAD_UTF8)?,
            content_type: f.opt_string(field::CONTENT_TYPE)?,
            response_topic: f.opt_string(field::RESPONSE_TOPIC)?,
            correlation_data: f.opt_bytes(field::CORRELATION_DATA)?,
            user_properties: f.string_pairs(field::USER_PROPERTIES)?,
        },
    })
}

/// A `packets` document: one queue entry, in state Queued.
pub(crate) fn entry_doc(
    client: &str,
    seq: Seq,
    message: MessageId,
    delivery: &Delivery,
    state: PacketState,
) -> StorageResult<Document> {
    let mut d = doc! {
        field::CLIENT: client,
        field::SEQ: to_i64(seq, "sequence number")?,
        field::MESSAGE_ID: to_i64(message, "message id")?,
        field::QOS: i32::from(delivery.qos.as_u8()),
        field::RETAIN: delivery.retain,
    };
    if !delivery.subscription_ids.is_empty() {
        let ids: Vec<i64> = delivery
            .subscription_ids
            .iter()
            .map(|i| i64::from(*i))
            .collect();
        d.insert(field::SUBSCRIPTION_IDS, ids);
    }
    if let Some(share) = &delivery.share {
        d.insert(field::SHARE, share);
    }
    d.extend(state_fields(state));
    Ok(d)
}

/// `state` and, when released, `packet_id`.
pub(crate) fn state_fields(state: PacketState) -> Document {
    match state {
        PacketState::Queued => doc! { field::STATE: STATE_QUEUED },
        PacketState::Released { packet_id } => doc! {
            field::STATE: STATE_RELEASED,
            field::PACKET_ID: i32::from(packet_id),
        },
    }
}

/// The delivery and state of a `packets` document.
pub(crate) fn entry_from_doc(f: &mut Fields<'_>) -> StorageResult<(Delivery, PacketState)> {
    let delivery = Delivery {
        qos: f.qos(field::QOS)?,
        retain: f.bool(field::RETAIN)?,
        subscription_ids: f.u32_list(field::SUBSCRIPTION_IDS)?,
        share: f.opt_string(field::SHARE)?,
    };
    let state = match f.int::<i32>(field::STATE)? {
        STATE_QUEUED => PacketState::Queued,
        STATE_RELEASED => PacketState::Released {
            packet_id: f.int(field::PACKET_ID)?,
        },
        other => {
            return Err(StorageError::corrupt(format!(
                "field `state` of a `packets` document holds {other}, which is no state"
            )))
        }
    };
    Ok((delivery, state))
}

/// A `sessions` document.
pub(crate) fn session_doc(r: &SessionRecord) -> StorageResult<Document> {
    let mut d = doc! { field::ID: &r.client_id };
    if let Some(e) = r.expiry_secs {
        d.insert(field::EXPIRY_SECS, i64::from(e));
    }
    if let Some(t) = r.disconnected_at_ms {
        d.insert(field::DISCONNECTED_AT, to_i64(t, "disconnection time")?);
    }
    Ok(d)
}

pub(crate) fn session_from_doc(mut doc: Document) -> StorageResult<SessionRecord> {
    let mut f = Fields::new(&mut doc, "sessions");
    Ok(SessionRecord {
        client_id: f.string(field::ID)?,
        expiry_secs: f.opt_int(field::EXPIRY_SECS)?,
        disconnected_at_ms: f.opt_u64(field::DISCONNECTED_AT)?,
    })
}

/// A `subscriptions` document (Mosca's: the filter is `topic`).
pub(crate) fn subscription_doc(client: &str, filter: &str, o: &SubscriptionOptions) -> Document {
    let mut d = doc! {
        field::CLIENT: client,
        field::TOPIC: filter,
        field::QOS: i32::from(o.qos.as_u8()),
        field::NO_LOCAL: o.no_local,
        field::RETAIN_AS_PUBLISHED: o.retain_as_published,
        field::RETAIN_HANDLING: i32::from(o.retain_handling),
    };
    if let Some(id) = o.subscription_id {
        d.insert(field::SUBSCRIPTION_ID, i64::from(id));
    }
    d
}

/// Client, filter and options of a `subscriptions` document.
pub(crate) fn subscription_from_doc(
    mut doc: Document,
) -> StorageResult<(String, String, SubscriptionOptions)> {
    let mut f = Fields::new(&mut doc, "subscriptions");
    let options = SubscriptionOptions {
        qos: f.qos(field::QOS)?,
        no_local: f.bool(field::NO_LOCAL)?,
        retain_as_published: f.bool(field::RETAIN_AS_PUBLISHED)?,
        retain_handling: f.int(field::RETAIN_HANDLING)?,
        subscription_id: f.opt_int(field::SUBSCRIPTION_ID)?,
    };
    Ok((f.string(field::CLIENT)?, f.string(field::TOPIC)?, options))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rich() -> Message {
        Message {
            id: (1 << 53) - 1,
            topic: "a/ü".into(),
            payload: Bytes::from_static(&[0, 255, 1]),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties: MessageProperties {
                payload_format_utf8: Some(false),
                expires_at_ms: Some(5),
                content_type: Some(String::new()),
                response_topic: Some("r".into()),
                correlation_data: Some(Bytes::new()),
                user_properties: vec![("k".into(), "v".into()), ("k".into(), String::new())],
            },
            received_at_ms: 17,
        }
    }

    #[test]
    fn bodies_round_trip() {
        for m in [rich(), Message::new("t", "", QoS::AtMostOnce, false)] {
            let d = body_doc(&m, 3).expect("encodes");
            assert_eq!(
                message_from_doc(d, "messages", field::ID).expect("decodes"),
                m
            );
            let d = retained_doc(&m).expect("encodes");
            assert_eq!(
                message_from_doc(d, "retained", field::RETAINED_ID).expect("decodes"),
                m
            );
        }
    }

    #[test]
    fn bad_documents_are_corrupt() {
        let mut d = body_doc(&rich(), 1).expect("encodes");
        d.insert(field::QOS, 3);
        assert!(matches!(
            message_from_doc(d, "messages", field::ID),
            Err(StorageError::Corrupt { .. })
        ));
        let mut d = body_doc(&rich(), 1).expect("encodes");
        d.insert(field::ID, -1_i64);
        assert!(matches!(
            message_from_doc(d, "messages", field::ID),
            Err(StorageError::Corrupt { .. })
        ));
        let mut d = body_doc(&rich(), 1).expect("encodes");
        d.remove(field::PAYLOAD);
        let e = message_from_doc(d, "messages", field::ID).expect_err("no payload");
        assert!(e.to_string().contains("payload"), "{e}");
    }

    #[test]
    fn entries_round_trip() {
        let delivery = Delivery {
            qos: QoS::ExactlyOnce,
            retain: true,
            subscription_ids: vec![1, 268_435_455],
            share: Some("$share/g/a".into()),
        };
        for state in [
            PacketState::Queued,
            PacketState::Released { packet_id: 65535 },
        ] {
            let mut d = entry_doc("c", 7, 9, &delivery, state).expect("encodes");
            let mut f = Fields::new(&mut d, "packets");
            assert_eq!(f.u64(field::SEQ).expect("seq"), 7);
            assert_eq!(
                entry_from_doc(&mut f).expect("decodes"),
                (delivery.clone(), state)
            );
        }
    }
}
