//! Writing a batch of packet-store operations: the reads it needs, then its
//! [`Plan`] as one bulk command per kind, all in the caller's transaction.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use broker_core::message::{MessageId, Seq};
use broker_core::storage::{ClientId, PacketOp, PacketState};
use mongodb::bson::{doc, Bson, Document};
use mongodb::ClientSession;

use crate::batch::{self, Plan, Reads, Stored, StoredEntry};
use crate::documents::{
    body_doc, entry_doc, field, to_i64, will_doc, Fields, STATE_QUEUED, STATE_RELEASED,
};
use crate::error::is_duplicate_key;
use crate::txn::{Abort, TxnBody};
use crate::Collections;

/// `_id` of the `meta` document holding the high-water mark of message ids.
pub(crate) const LAST_MESSAGE_ID: &str = "last_message_id";

/// Cursor batch size for reads inside a batch: a purged queue comes in as
/// few round trips as the server's 16 MiB replies allow.
const READ_BATCH: u32 = 10_000;

/// State changes per pipeline update.
const SET_STATE_CHUNK: usize = 128;

/// One `PacketStore::write` call, as a transaction body.
pub(crate) struct WriteBatch<'o> {
    pub ops: &'o [PacketOp],
    /// Read enqueue targets and bodies too (after a unique index said a
    /// guess was wrong).
    pub careful: bool,
}

#[async_trait]
impl TxnBody for WriteBatch<'_> {
    type Output = ();

    async fn run(&mut self, colls: &Collections, s: &mut ClientSession) -> Result<(), Abort> {
        let reads = Reads::of(self.ops, self.careful);
        let stored = read_stored(colls, s, &reads).await?;
        let plan = batch::plan(self.ops, &stored);
        match execute(colls, s, &plan, &stored).await {
            Err(Abort::Mongo(e)) if !self.careful && is_duplicate_key(&e) => {
                tracing::debug!(
                    "batch enqueues over a stored entry or a stored body; planning it again with reads"
                );
                self.careful = true;
                Err(Abort::Again)
            }
            other => other,
        }
    }
}

/// `{client: c, <key>: {$in: [...]}}` for each session, or'ed.
fn by_client<'k, I, V>(key: &str, groups: I) -> Vec<Document>
where
    I: IntoIterator<Item = (&'k str, V)>,
    V: Into<Bson>,
{
    groups
        .into_iter()
        .map(|(client, values)| doc! { field::CLIENT: client, key: { "$in": values.into() } })
        .collect()
}

/// One filter from alternatives: the only one, or `$or`.
fn any_of(mut alternatives: Vec<Document>) -> Document {
    if alternatives.len() == 1 {
        alternatives.pop().unwrap_or_default()
    } else {
        doc! { "$or": alternatives }
    }
}

/// Sequence numbers that can be stored (those above `i64::MAX` cannot
/// exist, so reading or deleting them is pointless).
fn seq_values<'a>(seqs: impl IntoIterator<Item = &'a u64>) -> Vec<i64> {
    seqs.into_iter()
        .filter_map(|s| i64::try_from(*s).ok())
        .collect()
}

fn id_values<'a>(ids: impl IntoIterator<Item = &'a MessageId>) -> Vec<i64> {
    ids.into_iter()
        .filter_map(|s| i64::try_from(*s).ok())
        .collect()
}

async fn read_stored(
    colls: &Collections,
    s: &mut ClientSession,
    reads: &Reads,
) -> Result<Stored, Abort> {
    let mut stored = Stored::default();
    if !reads.no_entries() {
        let mut alternatives = Vec::new();
        if !reads.queues.is_empty() {
            let clients: Vec<&str> = reads.queues.iter().map(|c| &**c).collect();
            alternatives.push(doc! { field::CLIENT: { "$in": clients } });
        }
        alternatives.extend(by_client(
            field::SEQ,
            reads
                .entries
                .iter()
                .map(|(c, seqs)| (&**c, seq_values(seqs))),
        ));
        let mut cursor = colls
            .packets
            .find(any_of(alternatives))
            .projection(
                doc! { field::ID: 1, field::CLIENT: 1, field::SEQ: 1, field::MESSAGE_ID: 1 },
            )
            .batch_size(READ_BATCH)
            .session(&mut *s)
            .await?;
        // Client ids as the batch names them, so that keys compare.
        let clients: BTreeSet<_> = reads
            .queues
            .iter()
            .chain(reads.entries.keys())
            .cloned()
            .collect();
        while let Some(doc) = cursor.next(&mut *s).await {
            let mut doc = doc?;
            let doc_id = doc.remove(field::ID);
            let mut f = Fields::new(&mut doc, "packets");
            let seq = f.u64(field::SEQ)?;
            let message = f.u64(field::MESSAGE_ID)?;
            let client = f.string(field::CLIENT)?;
            let Some(client) = clients.get(client.as_str()).cloned() else {
                continue;
            };
            stored
                .entries
                .insert((client, seq), StoredEntry { message, doc_id });
        }
    }
    if !reads.bodies.is_empty() {
        let mut cursor = colls
            .messages
            .find(doc! { field::ID: { "$in": id_values(&reads.bodies) } })
            .projection(doc! { field::ID: 1 })
            .batch_size(READ_BATCH)
            .session(&mut *s)
            .await?;
        while let Some(doc) = cursor.next(&mut *s).await {
            let mut doc = doc?;
            stored
                .bodies
                .insert(Fields::new(&mut doc, "messages").u64(field::ID)?);
        }
    }
    Ok(stored)
}

/// `{$and: [{$eq: ["$client", c]}, {$eq: ["$seq", s]}]}`, values quoted
/// with `$literal` (a client id may start with `$`).
fn is_entry(client: &str, seq: i64) -> Document {
    doc! { "$and": [
        { "$eq": [format!("${}", field::CLIENT), { "$literal": client }] },
        { "$eq": [format!("${}", field::SEQ), { "$literal": seq }] },
    ] }
}

/// Filter alternatives selecting stored entries: one `_id: {$in}` for
/// those whose `_id` was read (all of them, as plans are made), and a
/// clause per session for any other, so the filter's size does not grow
/// with the number of sessions a batch touches.
fn stored_entries<'k>(
    stored: &Stored,
    keys: impl IntoIterator<Item = (&'k ClientId, &'k Seq)>,
) -> Vec<Document> {
    let mut ids = Vec::new();
    let mut unknown: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for (client, seq) in keys {
        match stored
            .entries
            .get(&(client.clone(), *seq))
            .and_then(|e| e.doc_id.as_ref())
        {
            Some(id) => ids.push(id.clone()),
            None => unknown
                .entry(&**client)
                .or_default()
                .extend(seq_values([seq])),
        }
    }
    let mut alternatives = Vec::new();
    if !ids.is_empty() {
        alternatives.push(doc! { field::ID: { "$in": ids } });
    }
    alternatives.extend(by_client(field::SEQ, unknown));
    alternatives
}

/// Write `plan`: deletions first, then inserts and updates.
async fn execute(
    colls: &Collections,
    s: &mut ClientSession,
    plan: &Plan<'_>,
    stored: &Stored,
) -> Result<(), Abort> {
    if !plan.delete_queues.is_empty() || !plan.delete_entries.is_empty() {
        let mut alternatives = Vec::new();
        if !plan.delete_queues.is_empty() {
            let clients: Vec<&str> = plan.delete_queues.iter().map(|c| &**c).collect();
            alternatives.push(doc! { field::CLIENT: { "$in": clients } });
        }
        alternatives.extend(stored_entries(
            stored,
            plan.delete_entries
                .iter()
                .flat_map(|(c, seqs)| seqs.iter().map(move |s| (c, s))),
        ));
        colls
            .packets
            .delete_many(any_of(alternatives))
            .session(&mut *s)
            .await?;
    }
    for (delta, ids) in &plan.ref_changes {
        colls
            .messages
            .update_many(
                doc! { field::ID: { "$in": id_values(ids) } },
                doc! { "$inc": { field::REFS: *delta } },
            )
            .session(&mut *s)
            .await?;
    }
    if !plan.release_bodies.is_empty() {
        colls
            .messages
            .delete_many(doc! {
                field::ID: { "$in": id_values(&plan.release_bodies) },
                field::REFS: { "$lte": 0 },
            })
            .session(&mut *s)
            .await?;
    }
    if !plan.insert_bodies.is_empty() {
        let docs = plan
            .insert_bodies
            .iter()
            .map(|(m, refs)| body_doc(m, *refs))
            .collect::<Result<Vec<_>, _>>()?;
        colls.messages.insert_many(docs).session(&mut *s).await?;
    }
    if !plan.insert_entries.is_empty() {
        let docs = plan
            .insert_entries
            .iter()
            .map(|e| entry_doc(&e.client, e.seq, e.message, e.delivery, e.state))
            .collect::<Result<Vec<_>, _>>()?;
        colls.packets.insert_many(docs).session(&mut *s).await?;
    }
    // A `$switch` is evaluated branch by branch for each entry it updates:
    // chunks keep that linear in the batch size.
    for chunk in plan.set_states.chunks(SET_STATE_CHUNK) {
        set_states(colls, s, chunk, stored).await?;
    }
    if !plan.qos2_delete_clients.is_empty() || !plan.qos2_delete.is_empty() {
        let mut alternatives = Vec::new();
        if !plan.qos2_delete_clients.is_empty() {
            let clients: Vec<&str> = plan.qos2_delete_clients.iter().map(|c| &**c).collect();
            alternatives.push(doc! { field::CLIENT: { "$in": clients } });
        }
        alternatives.extend(by_client(
            field::PACKET_ID,
            plan.qos2_delete.iter().map(|(c, ids)| {
                let ids: Vec<i32> = ids.iter().map(|i| i32::from(*i)).collect();
                (&**c, ids)
            }),
        ));
        colls
            .incoming_qos2
            .delete_many(any_of(alternatives))
            .session(&mut *s)
            .await?;
    }
    if !plan.qos2_insert.is_empty() {
        let docs = plan.qos2_insert.iter().map(|(c, id)| {
            doc! { field::CLIENT: &**c, field::PACKET_ID: i32::from(*id) }
        });
        colls
            .incoming_qos2
            .insert_many(docs)
            .session(&mut *s)
            .await?;
    }
    if !plan.wills_delete.is_empty() {
        colls
            .wills
            .delete_many(doc! { field::ID: { "$in": id_values(&plan.wills_delete) } })
            .session(&mut *s)
            .await?;
    }
    if !plan.wills_insert.is_empty() {
        let docs = plan
            .wills_insert
            .iter()
            .map(|w| will_doc(w))
            .collect::<Result<Vec<_>, _>>()?;
        colls.wills.insert_many(docs).session(&mut *s).await?;
    }
    if let Some(id) = plan.high_water {
        colls
            .meta
            .update_one(
                doc! { field::ID: LAST_MESSAGE_ID },
                doc! { "$max": { field::VALUE: to_i64(id, "message id")? } },
            )
            .upsert(true)
            .session(&mut *s)
            .await?;
    }
    Ok(())
}

/// New states of stored entries, all in one update: a pipeline picks each
/// entry's state (and PUBREL packet id) with `$switch`.
async fn set_states(
    colls: &Collections,
    s: &mut ClientSession,
    states: &[(ClientId, u64, PacketState)],
    stored: &Stored,
) -> Result<(), Abort> {
    let mut state_branches = Vec::with_capacity(states.len());
    let mut packet_id_branches = Vec::with_capacity(states.len());
    for (client, seq, state) in states {
        let seq = to_i64(*seq, "sequence number")?;
        let (state, packet_id) = match state {
            PacketState::Queued => (STATE_QUEUED, Bson::String("$$REMOVE".into())),
            PacketState::Released { packet_id } => {
                (STATE_RELEASED, Bson::Int32(i32::from(*packet_id)))
            }
        };
        state_branches.push(doc! { "case": is_entry(client, seq), "then": state });
        packet_id_branches.push(doc! { "case": is_entry(client, seq), "then": packet_id });
    }
    let pipeline = vec![doc! { "$set": {
        field::STATE: { "$switch": {
            "branches": state_branches,
            "default": format!("${}", field::STATE),
        } },
        field::PACKET_ID: { "$switch": {
            "branches": packet_id_branches,
            "default": format!("${}", field::PACKET_ID),
        } },
    } }];
    colls
        .packets
        .update_many(
            any_of(stored_entries(
                stored,
                states.iter().map(|(c, s, _)| (c, s)),
            )),
            pipeline,
        )
        .session(&mut *s)
        .await?;
    Ok(())
}

/// Entries one transaction removes when a long queue is purged.
pub(crate) const PURGE_CHUNK: usize = 1_000;

/// The front of a purged queue longer than [`PURGE_CHUNK`]: its oldest
/// `PURGE_CHUNK` entries removed (bodies released as by `Remove`) in a
/// transaction of their own, before the batch that purges it. A queue of
/// 100,000 entries purged inside the batch would make one transaction
/// delete 100,000 documents and update as many bodies, past what a server
/// lets one transaction hold ("transaction too large"), and fail every
/// other client's operation merged into that batch, on every retry.
///
/// A queue of at most `PURGE_CHUNK` entries is left alone (`Ok(0)`): the
/// batch purges it atomically with the rest. Returns the entries removed.
pub(crate) struct PurgeFront<'c> {
    pub client: &'c ClientId,
}

#[async_trait]
impl TxnBody for PurgeFront<'_> {
    type Output = usize;

    async fn run(&mut self, colls: &Collections, s: &mut ClientSession) -> Result<usize, Abort> {
        let limit = PURGE_CHUNK + 1;
        let mut cursor = colls
            .packets
            .find(doc! { field::CLIENT: &**self.client })
            .sort(doc! { field::SEQ: 1 })
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .projection(doc! { field::ID: 0, field::SEQ: 1 })
            .batch_size(u32::try_from(limit).unwrap_or(READ_BATCH))
            .session(&mut *s)
            .await?;
        let mut ops = Vec::with_capacity(limit);
        while let Some(doc) = cursor.next(&mut *s).await {
            let mut doc = doc?;
            ops.push(PacketOp::Remove {
                client: self.client.clone(),
                seq: Fields::new(&mut doc, "packets").u64(field::SEQ)?,
            });
        }
        if ops.len() <= PURGE_CHUNK {
            return Ok(0);
        }
        ops.truncate(PURGE_CHUNK);
        WriteBatch {
            ops: &ops,
            careful: false,
        }
        .run(colls, s)
        .await?;
        Ok(ops.len())
    }
}
