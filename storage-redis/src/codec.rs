//! How values are written into Redis strings and hash fields.
//!
//! Hot-path values (message bodies, queue entries) use a small binary format
//! with the payload as raw bytes at the end, so that a body is one `GET`
//! and decoding it copies nothing of the payload. Session records and
//! subscription options, read once at start, are JSON for readability.
//!
//! The formats are described in the crate documentation (`Value formats`).

use broker_core::message::{Message, MessageId, MessageProperties, QoS};
use broker_core::storage::{Delivery, PacketState, SessionRecord, StorageError, StoredWill};
use broker_core::subscription::SubscriptionOptions;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

const BODY_VERSION: u8 = 1;

const RETAIN: u8 = 1;
const FORMAT_PRESENT: u8 = 2;
const FORMAT_UTF8: u8 = 4;
const EXPIRY: u8 = 8;
const CONTENT_TYPE: u8 = 16;
const RESPONSE_TOPIC: u8 = 32;
const CORRELATION: u8 = 64;

const DELIVERY_RETAIN: u8 = 1;
const DELIVERY_SHARED: u8 = 2;

/// A stored value that could not be decoded.
pub(crate) fn corrupt(what: &str, detail: impl std::fmt::Display) -> StorageError {
    StorageError::corrupt(format!("{what}: {detail}"))
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// Reads the binary formats, failing with a description instead of panicking.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn u8(&mut self) -> Result<u8, String> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or_else(|| format!("truncated at byte {}", self.pos))?;
        self.pos += 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7F) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(format!("varint too long at byte {}", self.pos))
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let len = usize::try_from(self.varint()?).map_err(|e| e.to_string())?;
        let end = self
            .pos
            .checked_add(len)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| format!("length {len} at byte {} runs past the end", self.pos))?;
        let b = &self.buf[self.pos..end];
        self.pos = end;
        Ok(b)
    }

    fn string(&mut self) -> Result<String, String> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|e| format!("invalid UTF-8: {e}"))
    }

    fn qos(&mut self) -> Result<QoS, String> {
        let v = self.u8()?;
        QoS::from_u8(v).ok_or_else(|| format!("QoS {v}"))
    }
}

/// A message body as stored in `msg:{id}` and `retained`.
pub(crate) fn encode_message(m: &Message) -> Vec<u8> {
    let p = &m.properties;
    let mut flags = 0;
    if m.retain {
        flags |= RETAIN;
    }
    if let Some(utf8) = p.payload_format_utf8 {
        flags |= FORMAT_PRESENT;
        if utf8 {
            flags |= FORMAT_UTF8;
        }
    }
    if p.expires_at_ms.is_some() {
        flags |= EXPIRY;
    }
    if p.content_type.is_some() {
        flags |= CONTENT_TYPE;
    }
    if p.response_topic.is_some() {
        flags |= RESPONSE_TOPIC;
    }
    if p.correlation_data.is_some() {
        flags |= CORRELATION;
    }
    let mut out = Vec::with_capacity(32 + m.topic.len() + m.payload.len());
    out.extend_from_slice(&[BODY_VERSION, m.qos.as_u8(), flags]);
    put_varint(&mut out, m.id);
    put_varint(&mut out, m.received_at_ms);
    if let Some(t) = p.expires_at_ms {
        put_varint(&mut out, t);
    }
    put_bytes(&mut out, m.topic.as_bytes());
    for s in [&p.content_type, &p.response_topic].into_iter().flatten() {
        put_bytes(&mut out, s.as_bytes());
    }
    if let Some(c) = &p.correlation_data {
        put_bytes(&mut out, c);
    }
    put_varint(&mut out, p.user_properties.len() as u64);
    for (k, v) in &p.user_properties {
        put_bytes(&mut out, k.as_bytes());
        put_bytes(&mut out, v.as_bytes());
    }
    out.extend_from_slice(&m.payload);
    out
}

/// Decode a body written by [`encode_message`]. The payload and correlation
/// data share `blob`'s buffer instead of being copied.
pub(crate) fn decode_message(blob: Bytes) -> Result<Message, String> {
    let mut r = Reader::new(&blob);
    let version = r.u8()?;
    if version != BODY_VERSION {
        return Err(format!("unknown body format version {version}"));
    }
    let qos = r.qos()?;
    let flags = r.u8()?;
    let id = r.varint()?;
    let received_at_ms = r.varint()?;
    let expires_at_ms = if flags & EXPIRY != 0 {
        Some(r.varint()?)
    } else {
        None
    };
    let topic = r.string()?;
    let content_type = if flags & CONTENT_TYPE != 0 {
        Some(r.string()?)
    } else {
        None
    };
    let response_topic = if flags & RESPONSE_TOPIC != 0 {
        Some(r.string()?)
    } else {
        None
    };
    let correlation = if flags & CORRELATION != 0 {
        let len = r.bytes()?.len();
        Some(r.pos - len..r.pos)
    } else {
        None
    };
    let n = r.varint()?;
    let mut user_properties = Vec::with_capacity(n.min(64) as usize);
    for _ in 0..n {
        user_properties.push((r.string()?, r.string()?));
    }
    let payload_start = r.pos;
    Ok(Message {
        id,
        topic,
        payload: blob.slice(payload_start..),
        qos,
        retain: flags & RETAIN != 0,
        properties: MessageProperties {
            payload_format_utf8: (flags & FORMAT_PRESENT != 0).then_some(flags & FORMAT_UTF8 != 0),
            expires_at_ms,
            content_type,
            response_topic,
            correlation_data: correlation.map(|range| blob.slice(range)),
            user_properties,
        },
        received_at_ms,
    })
}

/// Format version of a stored will (in `wills`).
const WILL_VERSION: u8 = 1;

/// A will as stored in `wills`: version, flags (1: expiry present), the
/// delay, the expiry if present, the client id, then the message body as
/// [`encode_message`] writes it.
pub(crate) fn encode_will(w: &StoredWill) -> Vec<u8> {
    let body = encode_message(&w.message);
    let mut out = Vec::with_capacity(16 + w.client.len() + body.len());
    out.extend_from_slice(&[WILL_VERSION, u8::from(w.expiry_secs.is_some())]);
    put_varint(&mut out, u64::from(w.delay_secs));
    if let Some(e) = w.expiry_secs {
        put_varint(&mut out, u64::from(e));
    }
    put_bytes(&mut out, w.client.as_bytes());
    out.extend_from_slice(&body);
    out
}

/// Decode a will written by [`encode_will`].
pub(crate) fn decode_will(blob: Bytes) -> Result<StoredWill, String> {
    let mut r = Reader::new(&blob);
    let version = r.u8()?;
    if version != WILL_VERSION {
        return Err(format!("unknown will format version {version}"));
    }
    let flags = r.u8()?;
    let secs = |v: u64| u32::try_from(v).map_err(|_| format!("{v} seconds is out of range"));
    let delay_secs = secs(r.varint()?)?;
    let expiry_secs = if flags & 1 != 0 {
        Some(secs(r.varint()?)?)
    } else {
        None
    };
    let client = r.string()?;
    let message = decode_message(blob.slice(r.pos..))?;
    Ok(StoredWill {
        client: client.into(),
        message: std::sync::Arc::new(message),
        expiry_secs,
        delay_secs,
    })
}

/// Width of the reference count that starts a queued message's body (in
/// `msg:{id}`): that many decimal digits, zero-padded, rewritten in place.
pub(crate) const REFS_WIDTH: usize = 10;

/// The body of a queued message as stored in `msg:{id}`: its reference
/// count is read and rewritten by the write script; this strips it.
pub(crate) fn queued_body(blob: Bytes) -> Result<Bytes, String> {
    match blob.get(..REFS_WIDTH) {
        Some(refs) if refs.iter().all(u8::is_ascii_digit) => Ok(blob.slice(REFS_WIDTH..)),
        _ => Err(format!(
            "does not start with a {REFS_WIDTH}-digit reference count"
        )),
    }
}

/// A queue entry, the member of the queue's sorted set: sequence number
/// `seq`, message `id`, the queued state and the delivery.
pub(crate) fn encode_member(seq: u64, id: MessageId, d: &Delivery) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + d.share.as_ref().map_or(0, String::len));
    out.extend_from_slice(seq.to_string().as_bytes());
    out.push(b':');
    out.extend_from_slice(id.to_string().as_bytes());
    out.extend_from_slice(b"::");
    let mut flags = 0;
    if d.retain {
        flags |= DELIVERY_RETAIN;
    }
    if d.share.is_some() {
        flags |= DELIVERY_SHARED;
    }
    out.extend_from_slice(&[d.qos.as_u8(), flags]);
    put_varint(&mut out, d.subscription_ids.len() as u64);
    for &s in &d.subscription_ids {
        put_varint(&mut out, u64::from(s));
    }
    if let Some(share) = &d.share {
        out.extend_from_slice(share.as_bytes());
    }
    out
}

/// The `<state>` part of an entry for `SetState`.
pub(crate) fn encode_state(state: PacketState) -> String {
    match state {
        PacketState::Queued => String::new(),
        PacketState::Released { packet_id } => packet_id.to_string(),
    }
}

/// A decoded queue entry: the body it references, its delivery and state.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) message_id: MessageId,
    pub(crate) delivery: Delivery,
    pub(crate) state: PacketState,
}

/// Split off the decimal number before the next `:`.
fn decimal_field<'a>(b: &'a [u8], what: &str) -> Result<(&'a [u8], &'a [u8]), String> {
    let colon = b
        .iter()
        .position(|&c| c == b':')
        .ok_or_else(|| format!("no `:` after the {what}"))?;
    Ok((&b[..colon], &b[colon + 1..]))
}

fn parse_decimal<T: std::str::FromStr>(b: &[u8], what: &str) -> Result<T, String> {
    std::str::from_utf8(b)
        .ok()
        .filter(|s| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad {what} {:?}", String::from_utf8_lossy(b)))
}

/// The sequence number of a queue member, before its first `:`.
pub(crate) fn member_seq(b: &[u8]) -> Result<u64, String> {
    let (seq, _) = decimal_field(b, "seq")?;
    parse_decimal(seq, "seq")
}

/// Decode a member written by [`encode_member`] (and maybe `SetState`).
pub(crate) fn decode_member(b: &[u8]) -> Result<(u64, Entry), String> {
    let (seq, rest) = decimal_field(b, "seq")?;
    Ok((parse_decimal(seq, "seq")?, decode_entry(rest)?))
}

/// Decode the part of a member after its seq.
fn decode_entry(b: &[u8]) -> Result<Entry, String> {
    let (id, rest) = decimal_field(b, "message id")?;
    let message_id = parse_decimal(id, "message id")?;
    let (state, delivery) = decimal_field(rest, "state")?;
    let state = if state.is_empty() {
        PacketState::Queued
    } else {
        PacketState::Released {
            packet_id: parse_decimal(state, "packet id")?,
        }
    };
    let mut r = Reader::new(delivery);
    let qos = r.qos()?;
    let flags = r.u8()?;
    let n = r.varint()?;
    let mut subscription_ids = Vec::with_capacity(n.min(16) as usize);
    for _ in 0..n {
        let id = r.varint()?;
        subscription_ids.push(u32::try_from(id).map_err(|_| format!("subscription id {id}"))?);
    }
    let share = if flags & DELIVERY_SHARED != 0 {
        Some(
            String::from_utf8(delivery[r.pos..].to_vec())
                .map_err(|e| format!("shared group: invalid UTF-8: {e}"))?,
        )
    } else {
        None
    };
    Ok(Entry {
        message_id,
        delivery: Delivery {
            qos,
            retain: flags & DELIVERY_RETAIN != 0,
            subscription_ids,
            share,
        },
        state,
    })
}

/// A session record in the `sessions` hash (the client id is the field).
#[derive(Serialize, Deserialize)]
struct StoredRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expiry_secs: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    disconnected_at_ms: Option<u64>,
}

pub(crate) fn encode_session(r: &SessionRecord) -> String {
    // A struct of plain numbers always serializes.
    serde_json::to_string(&StoredRecord {
        expiry_secs: r.expiry_secs,
        disconnected_at_ms: r.disconnected_at_ms,
    })
    .unwrap_or_default()
}

pub(crate) fn decode_session(client_id: String, b: &[u8]) -> Result<SessionRecord, String> {
    let r: StoredRecord = serde_json::from_slice(b).map_err(|e| e.to_string())?;
    Ok(SessionRecord {
        client_id,
        expiry_secs: r.expiry_secs,
        disconnected_at_ms: r.disconnected_at_ms,
    })
}

/// Subscription options in a `sub:{client}` hash (the filter is the field).
#[derive(Serialize, Deserialize)]
struct StoredOptions {
    qos: u8,
    #[serde(default, skip_serializing_if = "is_false")]
    no_local: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    retain_as_published: bool,
    #[serde(default, skip_serializing_if = "is_zero")]
    retain_handling: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    subscription_id: Option<u32>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(v: &u8) -> bool {
    *v == 0
}

pub(crate) fn encode_options(o: &SubscriptionOptions) -> String {
    serde_json::to_string(&StoredOptions {
        qos: o.qos.as_u8(),
        no_local: o.no_local,
        retain_as_published: o.retain_as_published,
        retain_handling: o.retain_handling,
        subscription_id: o.subscription_id,
    })
    .unwrap_or_default()
}

pub(crate) fn decode_options(b: &[u8]) -> Result<SubscriptionOptions, String> {
    let o: StoredOptions = serde_json::from_slice(b).map_err(|e| e.to_string())?;
    Ok(SubscriptionOptions {
        qos: QoS::from_u8(o.qos).ok_or_else(|| format!("QoS {}", o.qos))?,
        no_local: o.no_local,
        retain_as_published: o.retain_as_published,
        retain_handling: o.retain_handling,
        subscription_id: o.subscription_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rich() -> Message {
        Message {
            id: (1 << 53) - 1,
            topic: "a/ä/x y".into(),
            payload: Bytes::from_static(&[0, 255, b':', 0]),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties: MessageProperties {
                payload_format_utf8: Some(false),
                expires_at_ms: Some(0),
                content_type: Some(String::new()),
                response_topic: Some("r/ü".into()),
                correlation_data: Some(Bytes::new()),
                user_properties: vec![("k".into(), "v".into()), (String::new(), String::new())],
            },
            received_at_ms: u64::MAX,
        }
    }

    #[test]
    fn message_round_trip() {
        for m in [
            rich(),
            Message::new("t", "", QoS::AtMostOnce, false),
            Message::new("", vec![7u8; 100_000], QoS::AtLeastOnce, false),
        ] {
            let blob = Bytes::from(encode_message(&m));
            assert_eq!(decode_message(blob).as_ref(), Ok(&m));
        }
    }

    #[test]
    fn truncated_or_foreign_bodies_are_errors() {
        let blob = encode_message(&rich());
        // Every prefix that cuts before the payload fails instead of panicking.
        let payload_len = rich().payload.len();
        for end in 0..blob.len() - payload_len {
            assert!(
                decode_message(Bytes::copy_from_slice(&blob[..end])).is_err(),
                "prefix of {end} bytes decoded"
            );
        }
        assert!(decode_message(Bytes::from_static(b"\x02\x01\x00")).is_err());
        assert!(decode_message(Bytes::from_static(b"\x01\x03\x00")).is_err());
        assert!(decode_message(Bytes::from_static(&[
            1, 1, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01
        ]))
        .is_err());
    }

    #[test]
    fn member_round_trip_and_state() {
        let rich = Delivery {
            qos: QoS::ExactlyOnce,
            retain: true,
            subscription_ids: vec![7, 1, 268_435_455],
            share: Some("$share/grüppe/a:b/+/#".into()),
        };
        for d in [rich, Delivery::new(QoS::AtMostOnce)] {
            let e = encode_member(9, 42, &d);
            let want = Entry {
                message_id: 42,
                delivery: d.clone(),
                state: PacketState::Queued,
            };
            assert_eq!(decode_member(&e), Ok((9, want)));
            assert_eq!(member_seq(&e), Ok(9));
            // What the write script does for SetState.
            let released = [&b"9:42:"[..], b"65535", &e[5..]].concat();
            assert_eq!(
                decode_member(&released).map(|(_, e)| e.state),
                Ok(PacketState::Released { packet_id: 65535 })
            );
        }
        for bad in [
            &b""[..],
            b"1:x::\x01\x00\x00",
            b"x:1::\x01\x00\x00",
            b"1:1:\x01",
            b"1:1:70000:\x01\x00\x00",
            b"1:1::\x07\x00\x00",
            b"1::\x01\x00\x00",
        ] {
            assert!(decode_member(bad).is_err(), "{bad:?} decoded");
        }
    }

    #[test]
    fn queued_bodies_start_with_their_reference_count() {
        let body = Bytes::from_static(b"0000000003\x01rest");
        assert_eq!(queued_body(body).as_deref(), Ok(&b"\x01rest"[..]));
        for bad in [&b""[..], b"000000003", b"00000000x3\x01"] {
            assert!(queued_body(Bytes::from_static(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sessions_and_options_round_trip() {
        let r = SessionRecord {
            client_id: "c".into(),
            expiry_secs: Some(0),
            disconnected_at_ms: None,
        };
        assert_eq!(
            decode_session("c".into(), encode_session(&r).as_bytes()),
            Ok(r)
        );
        let o = SubscriptionOptions {
            qos: QoS::ExactlyOnce,
            no_local: true,
            retain_as_published: false,
            retain_handling: 2,
            subscription_id: Some(268_435_455),
        };
        assert_eq!(decode_options(encode_options(&o).as_bytes()), Ok(o));
        let plain = SubscriptionOptions::new(QoS::AtMostOnce);
        assert_eq!(encode_options(&plain), r#"{"qos":0}"#);
        assert!(decode_options(br#"{"qos":3}"#).is_err());
    }
}
