//! Mapping between the broker's values and table rows.
//!
//! A message is the same twelve columns in `messages` and `retained`
//! ([`MESSAGE_COLUMNS`]); MQTT 5 user properties and subscription
//! identifiers, which are lists, are stored as JSON text (NULL when empty, so
//! MQTT 3.1.1 traffic pays nothing for them).

use std::error::Error;

use broker_core::message::{Message, MessageProperties, QoS};
use broker_core::storage::{Delivery, PacketState};
use broker_core::subscription::SubscriptionOptions;
use bytes::Bytes;
use rusqlite::types::Type;
use rusqlite::{Row, Statement};

/// The columns of a message, in the order [`bind_message`] binds them and
/// [`message_from_row`] reads them.
pub(crate) const MESSAGE_COLUMNS: &str = "id, topic, payload, qos, retain, received_at_ms, \
     expires_at_ms, payload_format_utf8, content_type, response_topic, correlation_data, \
     user_properties";

/// Number of columns in [`MESSAGE_COLUMNS`].
pub(crate) const MESSAGE_COLUMN_COUNT: usize = 12;

fn bad(index: usize, ty: Type, e: impl Into<Box<dyn Error + Send + Sync>>) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(index, ty, e.into())
}

fn qos(row: &Row, index: usize) -> rusqlite::Result<QoS> {
    let v: u8 = row.get(index)?;
    QoS::from_u8(v).ok_or_else(|| bad(index, Type::Integer, format!("QoS {v}")))
}

fn json_list<T: serde::de::DeserializeOwned>(row: &Row, index: usize) -> rusqlite::Result<Vec<T>> {
    match row.get::<_, Option<String>>(index)? {
        None => Ok(Vec::new()),
        Some(s) => serde_json::from_str(&s).map_err(|e| bad(index, Type::Text, e)),
    }
}

fn to_json_list<T: serde::Serialize>(v: &[T]) -> Option<String> {
    // Serializing plain strings and numbers cannot fail.
    (!v.is_empty()).then(|| serde_json::to_string(v).unwrap_or_default())
}

/// Execute `stmt` with a message's columns as parameters 1 to 12.
pub(crate) fn bind_message(stmt: &mut Statement<'_>, m: &Message) -> rusqlite::Result<usize> {
    bind_message_at(stmt, 1, m)?;
    stmt.raw_execute()
}

/// Bind a message's columns as parameters `at` to `at + 11` of `stmt`.
pub(crate) fn bind_message_at(
    stmt: &mut Statement<'_>,
    at: usize,
    m: &Message,
) -> rusqlite::Result<()> {
    let p = &m.properties;
    stmt.raw_bind_parameter(at, m.id as i64)?;
    stmt.raw_bind_parameter(at + 1, &m.topic)?;
    stmt.raw_bind_parameter(at + 2, &m.payload[..])?;
    stmt.raw_bind_parameter(at + 3, m.qos.as_u8())?;
    stmt.raw_bind_parameter(at + 4, m.retain)?;
    stmt.raw_bind_parameter(at + 5, m.received_at_ms as i64)?;
    stmt.raw_bind_parameter(at + 6, p.expires_at_ms.map(|t| t as i64))?;
    stmt.raw_bind_parameter(at + 7, p.payload_format_utf8)?;
    stmt.raw_bind_parameter(at + 8, &p.content_type)?;
    stmt.raw_bind_parameter(at + 9, &p.response_topic)?;
    stmt.raw_bind_parameter(at + 10, p.correlation_data.as_deref())?;
    stmt.raw_bind_parameter(at + 11, to_json_list(&p.user_properties))?;
    Ok(())
}

/// A message from [`MESSAGE_COLUMNS`] starting at column `at`.
pub(crate) fn message_from_row(row: &Row, at: usize) -> rusqlite::Result<Message> {
    Ok(Message {
        id: row.get::<_, i64>(at)? as u64,
        topic: row.get(at + 1)?,
        payload: Bytes::from(row.get::<_, Vec<u8>>(at + 2)?),
        qos: qos(row, at + 3)?,
        retain: row.get(at + 4)?,
        received_at_ms: row.get::<_, i64>(at + 5)? as u64,
        properties: MessageProperties {
            expires_at_ms: row.get::<_, Option<i64>>(at + 6)?.map(|t| t as u64),
            payload_format_utf8: row.get(at + 7)?,
            content_type: row.get(at + 8)?,
            response_topic: row.get(at + 9)?,
            correlation_data: row.get::<_, Option<Vec<u8>>>(at + 10)?.map(Bytes::from),
            user_properties: json_list(row, at + 11)?,
        },
    })
}

/// The delivery columns of `packets`: qos, retain, subscription_ids, share.
pub(crate) fn delivery_params(d: &Delivery) -> (u8, bool, Option<String>, Option<&str>) {
    (
        d.qos.as_u8(),
        d.retain,
        to_json_list(&d.subscription_ids),
        d.share.as_deref(),
    )
}

/// A delivery from qos, retain, subscription_ids, share starting at column `at`.
pub(crate) fn delivery_from_row(row: &Row, at: usize) -> rusqlite::Result<Delivery> {
    Ok(Delivery {
        qos: qos(row, at)?,
        retain: row.get(at + 1)?,
        subscription_ids: json_list(row, at + 2)?,
        share: row.get(at + 3)?,
    })
}

/// `packets.state` and `packets.packet_id` for a state.
pub(crate) fn state_params(s: PacketState) -> (u8, Option<u16>) {
    match s {
        PacketState::Queued => (0, None),
        PacketState::Released { packet_id } => (1, Some(packet_id)),
    }
}

/// A state from `state`, `packet_id` at column `at`.
pub(crate) fn state_from_row(row: &Row, at: usize) -> rusqlite::Result<PacketState> {
    match (row.get::<_, u8>(at)?, row.get::<_, Option<u16>>(at + 1)?) {
        (0, _) => Ok(PacketState::Queued),
        (1, Some(packet_id)) => Ok(PacketState::Released { packet_id }),
        (s, _) => Err(bad(at, Type::Integer, format!("packet state {s}"))),
    }
}

/// Subscription options from qos, no_local, retain_as_published,
/// retain_handling, subscription_id starting at column `at`.
pub(crate) fn options_from_row(row: &Row, at: usize) -> rusqlite::Result<SubscriptionOptions> {
    Ok(SubscriptionOptions {
        qos: qos(row, at)?,
        no_local: row.get(at + 1)?,
        retain_as_published: row.get(at + 2)?,
        retain_handling: row.get(at + 3)?,
        subscription_id: row.get(at + 4)?,
    })
}
