//! The statements behind each storage operation. Everything here runs on
//! the worker thread, inside the transaction the caller opened.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use broker_core::message::{Message, MessageId, Seq};
use broker_core::storage::{
    BodyCache, PacketOp, QueueBounds, QueueTarget, QueuedPacket, SessionRecord, StoredSession,
    StoredWill, SubscriptionRecord,
};
use broker_core::topic;
use rusqlite::{params, Connection, OptionalExtension};

use crate::rows::{
    bind_message, bind_message_at, delivery_from_row, delivery_params, message_from_row,
    options_from_row, state_from_row, state_params, MESSAGE_COLUMNS, MESSAGE_COLUMN_COUNT,
};

/// Apply a batch of packet-store operations, in order.
///
/// References released by the batch's removals are counted per body and
/// applied once at its end (`Released`): the acknowledgements of a message
/// fanned out to ten sessions, in one batch, update and check its body
/// once instead of ten times. Only the batch's own transaction sees the
/// counts in between, and a body re-referenced later in the batch (a
/// shared subscription's hand-over) is kept since only the final count
/// decides.
pub(crate) fn apply(conn: &Connection, ops: &[PacketOp]) -> rusqlite::Result<()> {
    let mut last_id = None;
    let mut released = Released::default();
    for op in ops {
        match op {
            PacketOp::Enqueue { message, targets } => {
                enqueue(conn, message, targets, &mut released)?;
                last_id = last_id.max(Some(message.id as i64));
            }
            PacketOp::Remove { client, seq } => remove(conn, client, *seq, &mut released)?,
            PacketOp::SetState { client, seq, state } => {
                let (state, packet_id) = state_params(*state);
                conn.prepare_cached(
                    "UPDATE packets SET state = ?3, packet_id = ?4 WHERE client = ?1 AND seq = ?2",
                )?
                .execute(params![&**client, *seq as i64, state, packet_id])?;
            }
            PacketOp::Purge { client } => purge(conn, client, &mut released)?,
            PacketOp::IncomingQos2Received { client, packet_id } => {
                conn.prepare_cached(
                    "INSERT OR IGNORE INTO incoming_qos2 (client, packet_id) VALUES (?1, ?2)",
                )?
                .execute(params![&**client, packet_id])?;
            }
            PacketOp::IncomingQos2Released { client, packet_id } => {
                conn.prepare_cached(
                    "DELETE FROM incoming_qos2 WHERE client = ?1 AND packet_id = ?2",
                )?
                .execute(params![&**client, packet_id])?;
            }
            PacketOp::StoreWill { will } => store_will(conn, will)?,
            PacketOp::DeleteWill { client, id } => {
                conn.prepare_cached("DELETE FROM wills WHERE id = ?1 AND client = ?2")?
                    .execute(params![*id as i64, &**client])?;
            }
        }
    }
    released.apply(conn)?;
    // Once per batch, not per message.
    if let Some(id) = last_id {
        conn.prepare_cached(
            "UPDATE meta SET value = max(value, ?1) WHERE key = 'last_message_id'",
        )?
        .execute([id])?;
    }
    Ok(())
}

/// References to bodies released during a batch, applied at its end.
#[derive(Default)]
struct Released(HashMap<i64, i64>);

impl Released {
    fn add(&mut self, id: i64, n: i64) {
        *self.0.entry(id).or_default() += n;
    }

    /// Lower each body's count; drop those no entry references any more.
    fn apply(self, conn: &Connection) -> rusqlite::Result<()> {
        for (id, n) in self.0 {
            conn.prepare_cached("UPDATE messages SET refs = refs - ?2 WHERE id = ?1")?
                .execute([id, n])?;
            conn.prepare_cached("DELETE FROM messages WHERE id = ?1 AND refs <= 0")?
                .execute([id])?;
        }
        Ok(())
    }
}

fn enqueue(
    conn: &Connection,
    message: &Message,
    targets: &[QueueTarget],
    released: &mut Released,
) -> rusqlite::Result<()> {
    // The body once, with its references, however many targets; an id
    // already stored (a shared subscription handing the message over)
    // keeps its row and gains the references.
    let mut stmt = conn.prepare_cached(&format!(
        "INSERT INTO messages ({MESSAGE_COLUMNS}, refs) VALUES \
             (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) \
             ON CONFLICT (id) DO UPDATE SET refs = refs + excluded.refs"
    ))?;
    bind_message_at(&mut stmt, 1, message)?;
    stmt.raw_bind_parameter(MESSAGE_COLUMN_COUNT + 1, targets.len() as i64)?;
    stmt.raw_execute()?;
    let id = message.id as i64;
    let mut replaced = Vec::new();
    let mut chunks = targets.chunks_exact(ROWS_PER_INSERT);
    for chunk in &mut chunks {
        if !insert_entries(conn, id, chunk)? {
            for t in chunk {
                insert_entry(conn, id, t, &mut replaced)?;
            }
        }
    }
    for t in chunks.remainder() {
        insert_entry(conn, id, t, &mut replaced)?;
    }
    for old in replaced {
        released.add(old, 1);
    }
    Ok(())
}

/// Queue entries written by one multi-row INSERT when a message fans out:
/// one statement instead of one per session is most of the cost saved.
const ROWS_PER_INSERT: usize = 8;

/// The columns of a queue entry and the values of a new one, in the order
/// the INSERTs bind them.
const ENTRY_COLUMNS: &str =
    "packets (client, seq, message_id, qos, retain, subscription_ids, share, state, packet_id)";
const ENTRY_VALUES: &str = "(?, ?, ?, ?, ?, ?, ?, 0, NULL)";

/// The statements' text, built once rather than on every enqueue: it is
/// the key of the prepared-statement cache.
static INSERT_ENTRIES: LazyLock<String> = LazyLock::new(|| {
    let values = [ENTRY_VALUES; ROWS_PER_INSERT].join(", ");
    format!("INSERT INTO {ENTRY_COLUMNS} VALUES {values}")
});
static INSERT_ENTRY: LazyLock<String> =
    LazyLock::new(|| format!("INSERT INTO {ENTRY_COLUMNS} VALUES {ENTRY_VALUES}"));
static REPLACE_ENTRY: LazyLock<String> =
    LazyLock::new(|| format!("INSERT OR REPLACE INTO {ENTRY_COLUMNS} VALUES {ENTRY_VALUES}"));

/// Insert the entries of `targets` (exactly [`ROWS_PER_INSERT`]) in one
/// statement. `Ok(false)`, with nothing inserted, when one of them exists
/// already: the caller then goes entry by entry.
fn insert_entries(conn: &Connection, id: i64, targets: &[QueueTarget]) -> rusqlite::Result<bool> {
    debug_assert_eq!(targets.len(), ROWS_PER_INSERT);
    let mut stmt = conn.prepare_cached(&INSERT_ENTRIES)?;
    let mut at = 1;
    for t in targets {
        let (qos, retain, ids, share) = delivery_params(&t.delivery);
        stmt.raw_bind_parameter(at, &*t.client)?;
        stmt.raw_bind_parameter(at + 1, t.seq as i64)?;
        stmt.raw_bind_parameter(at + 2, id)?;
        stmt.raw_bind_parameter(at + 3, qos)?;
        stmt.raw_bind_parameter(at + 4, retain)?;
        stmt.raw_bind_parameter(at + 5, ids)?;
        stmt.raw_bind_parameter(at + 6, share)?;
        at += 7;
    }
    match stmt.raw_execute() {
        Ok(_) => Ok(true),
        Err(e) if is_constraint(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Insert one entry. An entry already at that (client, seq) is replaced,
/// and its body's id pushed to `replaced` so its reference is released.
fn insert_entry(
    conn: &Connection,
    id: i64,
    t: &QueueTarget,
    replaced: &mut Vec<i64>,
) -> rusqlite::Result<()> {
    let client: &str = &t.client;
    let (qos, retain, ids, share) = delivery_params(&t.delivery);
    let inserted = conn.prepare_cached(&INSERT_ENTRY)?.execute(params![
        client,
        t.seq as i64,
        id,
        qos,
        retain,
        ids,
        share
    ]);
    match inserted {
        Ok(_) => return Ok(()),
        Err(e) if is_constraint(&e) => {}
        Err(e) => return Err(e),
    }
    // Rare: the entry exists (a sequence number reused after a crash).
    if let Some(old) = conn
        .prepare_cached("SELECT message_id FROM packets WHERE client = ?1 AND seq = ?2")?
        .query_row(params![client, t.seq as i64], |r| r.get::<_, i64>(0))
        .optional()?
    {
        replaced.push(old);
    }
    conn.prepare_cached(&REPLACE_ENTRY)?.execute(params![
        client,
        t.seq as i64,
        id,
        qos,
        retain,
        ids,
        share
    ])?;
    Ok(())
}

/// A UNIQUE / PRIMARY KEY violation: the statement was undone, the
/// transaction goes on.
fn is_constraint(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation)
}

fn remove(
    conn: &Connection,
    client: &str,
    seq: Seq,
    released: &mut Released,
) -> rusqlite::Result<()> {
    let removed = conn
        .prepare_cached("DELETE FROM packets WHERE client = ?1 AND seq = ?2 RETURNING message_id")?
        .query_row(params![client, seq as i64], |r| r.get::<_, i64>(0))
        .optional()?;
    if let Some(id) = removed {
        released.add(id, 1);
    }
    Ok(())
}

fn purge(conn: &Connection, client: &str, released: &mut Released) -> rusqlite::Result<()> {
    let counts: Vec<(i64, i64)> = conn
        .prepare_cached(
            "SELECT message_id, count(*) FROM packets WHERE client = ?1 GROUP BY message_id",
        )?
        .query_map([client], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    conn.prepare_cached("DELETE FROM packets WHERE client = ?1")?
        .execute([client])?;
    for (id, n) in counts {
        released.add(id, n);
    }
    conn.prepare_cached("DELETE FROM incoming_qos2 WHERE client = ?1")?
        .execute([client])?;
    Ok(())
}

/// Up to `limit` entries of a queue after `after`, in sequence order.
/// Length and last seq of a queue: a range of the primary key, no body read.
pub(crate) fn queue_bounds(conn: &Connection, client: &str) -> rusqlite::Result<QueueBounds> {
    let mut stmt =
        conn.prepare_cached("SELECT count(*), max(seq) FROM packets WHERE client = ?1")?;
    stmt.query_row(params![client], |r| {
        Ok(QueueBounds {
            len: r.get::<_, i64>(0)? as u64,
            last: r.get::<_, Option<i64>>(1)?.map(|s| s as u64),
        })
    })
}

pub(crate) fn read_queue(
    conn: &Connection,
    cache: &mut BodyCache,
    client: &str,
    after: Option<Seq>,
    limit: usize,
) -> rusqlite::Result<Vec<QueuedPacket>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT p.seq, p.qos, p.retain, p.subscription_ids, p.share, p.state, p.packet_id, \
         {cols} FROM packets p JOIN messages m ON m.id = p.message_id \
         WHERE p.client = ?1 AND p.seq > ?2 ORDER BY p.seq LIMIT ?3",
        cols = prefixed("m.", MESSAGE_COLUMNS)
    ))?;
    // Sequence numbers stay below 2^53: nothing comes after a larger one.
    let after = match after.map(i64::try_from) {
        None => -1,
        Some(Ok(a)) => a,
        Some(Err(_)) => return Ok(Vec::new()),
    };
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = stmt.query_map(params![client, after, limit], |r| {
        Ok((
            r.get::<_, i64>(0)? as u64,
            delivery_from_row(r, 1)?,
            state_from_row(r, 5)?,
            message_from_row(r, 7)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (seq, delivery, state, message) = row?;
        out.push(QueuedPacket {
            seq,
            message: cache.share(message),
            delivery,
            state,
        });
    }
    Ok(out)
}

fn prefixed(prefix: &str, columns: &str) -> String {
    columns
        .split(", ")
        .map(|c| format!("{prefix}{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn incoming_qos2(conn: &Connection, client: &str) -> rusqlite::Result<Vec<u16>> {
    conn.prepare_cached("SELECT packet_id FROM incoming_qos2 WHERE client = ?1 ORDER BY packet_id")?
        .query_map([client], |r| r.get(0))?
        .collect()
}

fn store_will(conn: &Connection, will: &StoredWill) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(&format!(
        "INSERT OR REPLACE INTO wills ({MESSAGE_COLUMNS}, client, expiry_secs, delay_secs) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
    ))?;
    bind_message_at(&mut stmt, 1, &will.message)?;
    stmt.raw_bind_parameter(13, &*will.client)?;
    stmt.raw_bind_parameter(14, will.expiry_secs)?;
    stmt.raw_bind_parameter(15, will.delay_secs)?;
    stmt.raw_execute()?;
    Ok(())
}

pub(crate) fn wills(conn: &Connection) -> rusqlite::Result<Vec<StoredWill>> {
    conn.prepare_cached(&format!(
        "SELECT {MESSAGE_COLUMNS}, client, expiry_secs, delay_secs FROM wills ORDER BY id"
    ))?
    .query_map([], |r| {
        Ok(StoredWill {
            message: Arc::new(message_from_row(r, 0)?),
            client: Arc::from(r.get::<_, String>(MESSAGE_COLUMN_COUNT)?),
            expiry_secs: r.get(MESSAGE_COLUMN_COUNT + 1)?,
            delay_secs: r.get(MESSAGE_COLUMN_COUNT + 2)?,
        })
    })?
    .collect()
}

pub(crate) fn last_message_id(conn: &Connection) -> rusqlite::Result<MessageId> {
    let v: i64 = conn.query_row(
        "SELECT value FROM meta WHERE key = 'last_message_id'",
        [],
        |r| r.get(0),
    )?;
    Ok(v as u64)
}

pub(crate) fn save_session(conn: &Connection, r: &SessionRecord) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO sessions (client, expiry_secs, disconnected_at_ms) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![
        r.client_id,
        r.expiry_secs,
        r.disconnected_at_ms.map(|t| t as i64)
    ])?;
    Ok(())
}

pub(crate) fn delete_session(conn: &Connection, client: &str) -> rusqlite::Result<()> {
    conn.prepare_cached("DELETE FROM subscriptions WHERE client = ?1")?
        .execute([client])?;
    conn.prepare_cached("DELETE FROM sessions WHERE client = ?1")?
        .execute([client])?;
    Ok(())
}

pub(crate) fn add_subscriptions(
    conn: &Connection,
    client: &str,
    subs: &[SubscriptionRecord],
) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(
        "INSERT OR REPLACE INTO subscriptions \
         (client, filter, qos, no_local, retain_as_published, retain_handling, subscription_id) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    for s in subs {
        let o = &s.options;
        stmt.execute(params![
            client,
            s.filter,
            o.qos.as_u8(),
            o.no_local,
            o.retain_as_published,
            o.retain_handling,
            o.subscription_id
        ])?;
    }
    Ok(())
}

pub(crate) fn remove_subscriptions(
    conn: &Connection,
    client: &str,
    filters: &[String],
) -> rusqlite::Result<()> {
    let mut stmt =
        conn.prepare_cached("DELETE FROM subscriptions WHERE client = ?1 AND filter = ?2")?;
    for f in filters {
        stmt.execute(params![client, f])?;
    }
    Ok(())
}

pub(crate) fn load_sessions(conn: &Connection) -> rusqlite::Result<Vec<StoredSession>> {
    let mut sessions: Vec<StoredSession> = conn
        .prepare("SELECT client, expiry_secs, disconnected_at_ms FROM sessions ORDER BY client")?
        .query_map([], |r| {
            Ok(StoredSession {
                record: SessionRecord {
                    client_id: r.get(0)?,
                    expiry_secs: r.get(1)?,
                    disconnected_at_ms: r.get::<_, Option<i64>>(2)?.map(|t| t as u64),
                },
                subscriptions: Vec::new(),
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    let index: HashMap<String, usize> = sessions
        .iter()
        .enumerate()
        .map(|(i, s)| (s.record.client_id.clone(), i))
        .collect();
    let mut stmt = conn.prepare(
        "SELECT client, filter, qos, no_local, retain_as_published, retain_handling, \
         subscription_id FROM subscriptions",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            SubscriptionRecord {
                filter: r.get(1)?,
                options: options_from_row(r, 2)?,
            },
        ))
    })?;
    for row in rows {
        let (client, sub) = row?;
        // Subscriptions of a session without a record are not restored.
        if let Some(&i) = index.get(&client) {
            sessions[i].subscriptions.push(sub);
        }
    }
    Ok(sessions)
}

pub(crate) fn set_retained(conn: &Connection, m: &Message) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(&format!(
        "INSERT OR REPLACE INTO retained ({MESSAGE_COLUMNS}) VALUES \
             (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
    ))?;
    bind_message(&mut stmt, m)?;
    Ok(())
}

pub(crate) fn delete_retained(conn: &Connection, topic: &str) -> rusqlite::Result<()> {
    conn.prepare_cached("DELETE FROM retained WHERE topic = ?1")?
        .execute([topic])?;
    Ok(())
}

/// Retained messages matching `filter`: an index range over the filter's
/// literal prefix, then exact matching here.
pub(crate) fn lookup_retained(
    conn: &Connection,
    filter: &str,
) -> rusqlite::Result<Vec<Arc<Message>>> {
    let read = |r: &rusqlite::Row| message_from_row(r, 0);
    if !topic::has_wildcard(filter) {
        let found = conn
            .prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM retained WHERE topic = ?1"
            ))?
            .query_row([filter], read)
            .optional()?;
        return Ok(found.map(Arc::new).into_iter().collect());
    }
    let prefix = topic::literal_prefix(filter);
    let mut stmt;
    let rows = match upper_bound(prefix) {
        Some(upper) => {
            stmt = conn.prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM retained \
                 WHERE topic >= ?1 AND topic < CAST(?2 AS TEXT)"
            ))?;
            stmt.query_map(params![prefix, upper], read)?
        }
        None => {
            stmt = conn.prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM retained WHERE topic >= ?1"
            ))?;
            stmt.query_map([prefix], read)?
        }
    };
    let mut out = Vec::new();
    for m in rows {
        let m = m?;
        if topic::matches(filter, &m.topic) {
            out.push(Arc::new(m));
        }
    }
    // `a/#` also matches `a` itself, which sorts outside the `a/` range.
    if let Some(parent) = prefix.strip_suffix('/') {
        if topic::matches(filter, parent) {
            out.extend(lookup_retained(conn, parent)?);
        }
    }
    debug_assert_eq!(MESSAGE_COLUMNS.split(", ").count(), MESSAGE_COLUMN_COUNT);
    Ok(out)
}

/// The smallest byte string greater than every string starting with
/// `prefix`, or `None` when there is none (empty prefix, or all 0xFF).
fn upper_bound(prefix: &str) -> Option<Vec<u8>> {
    let mut bytes = prefix.as_bytes().to_vec();
    while let Some(last) = bytes.pop() {
        if last < 0xFF {
            bytes.push(last + 1);
            return Some(bytes);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use broker_core::message::QoS;
    use broker_core::storage::Delivery;

    fn message(id: u64) -> Arc<Message> {
        let mut m = Message::new("t", &b"x"[..], QoS::AtLeastOnce, false);
        m.id = id;
        Arc::new(m)
    }

    fn fan_out(id: u64, sessions: usize) -> PacketOp {
        PacketOp::Enqueue {
            message: message(id),
            targets: (0..sessions)
                .map(|i| QueueTarget {
                    client: format!("c{i}").into(),
                    seq: 1,
                    delivery: Delivery::new(QoS::AtLeastOnce),
                })
                .collect(),
        }
    }

    fn count(conn: &Connection, sql: &str) -> i64 {
        conn.query_row(sql, [], |r| r.get(0)).expect("count")
    }

    /// Entries already at the same (client, seq) are replaced, through the
    /// multi-row INSERT's fallback as well as the single-row one, and the
    /// replaced body loses its references and goes.
    #[test]
    fn enqueue_replaces_existing_entries_in_and_out_of_chunks() {
        let mut conn = Connection::open_in_memory().expect("open");
        crate::schema::migrate(&mut conn, crate::schema::MIGRATIONS).expect("schema");
        let sessions = ROWS_PER_INSERT + 3;
        apply(&conn, &[fan_out(1, sessions)]).expect("first");
        apply(&conn, &[fan_out(2, sessions)]).expect("second");
        assert_eq!(
            count(&conn, "SELECT count(*) FROM packets WHERE message_id = 2"),
            sessions as i64
        );
        assert_eq!(
            count(&conn, "SELECT count(*) FROM packets"),
            sessions as i64
        );
        assert_eq!(count(&conn, "SELECT count(*) FROM messages"), 1);
        assert_eq!(
            count(&conn, "SELECT refs FROM messages WHERE id = 2"),
            sessions as i64
        );
        assert_eq!(last_message_id(&conn).expect("last id"), 2);
    }
}
