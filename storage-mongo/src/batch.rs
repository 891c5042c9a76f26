//! Turning a batch of [`PacketOp`]s into a few bulk operations.
//!
//! A batch is applied in order, but sending it to MongoDB one operation at a
//! time would cost a round trip per operation. Instead the batch is first
//! played in memory over what it touches of the stored state (the entries it
//! removes or changes, and the whole queue of a purged session, read in one
//! query inside the transaction), which gives its net effect: entries to
//! delete, entries to insert, states to set, and one reference count change
//! per body. That net effect is then written with one bulk command per kind
//! (see [`Plan`]), all in the same transaction, so the result is exactly
//! that of applying the operations one by one.
//!
//! Enqueue targets are not read beforehand: the core gives each queue entry
//! a new sequence number, and a body id that is not seen among the stored
//! entries read is normally new. When either guess is wrong (an `Enqueue`
//! over an existing entry, or of a body stored earlier and handed over to
//! another session without its old entry in the batch), an insert fails on
//! its unique index, the transaction is dropped, and the batch is planned
//! again in careful mode, which reads those too.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use broker_core::message::{Message, MessageId, Seq};
use broker_core::storage::{ClientId, Delivery, PacketOp, PacketState, StoredWill};

/// A queue entry: session and sequence number.
pub(crate) type Key = (ClientId, Seq);

/// What must be read before a batch can be planned.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Reads {
    /// Entries whose stored message id matters, by session.
    pub entries: BTreeMap<ClientId, BTreeSet<Seq>>,
    /// Sessions whose whole queue is purged.
    pub queues: BTreeSet<ClientId>,
    /// Body ids to look up (careful mode only).
    pub bodies: BTreeSet<MessageId>,
}

impl Reads {
    /// What `ops` needs read; in `careful` mode also every enqueue target
    /// and body.
    pub(crate) fn of(ops: &[PacketOp], careful: bool) -> Reads {
        let mut reads = Reads::default();
        for op in ops {
            match op {
                PacketOp::Enqueue { message, targets } => {
                    if careful {
                        reads.bodies.insert(message.id);
                        for t in targets {
                            reads
                                .entries
                                .entry(t.client.clone())
                                .or_default()
                                .insert(t.seq);
                        }
                    }
                }
                PacketOp::Remove { client, seq } | PacketOp::SetState { client, seq, .. } => {
                    reads
                        .entries
                        .entry(client.clone())
                        .or_default()
                        .insert(*seq);
                }
                PacketOp::Purge { client } => {
                    reads.queues.insert(client.clone());
                }
                PacketOp::IncomingQos2Received { .. }
                | PacketOp::IncomingQos2Released { .. }
                | PacketOp::StoreWill { .. }
                | PacketOp::DeleteWill { .. } => {}
            }
        }
        // A purged queue is read whole.
        reads.entries.retain(|c, _| !reads.queues.contains(c));
        reads
    }

    /// True when no entry needs reading.
    pub(crate) fn no_entries(&self) -> bool {
        self.entries.is_empty() && self.queues.is_empty()
    }
}

/// What was stored before the batch, as far as it was read.
#[derive(Debug, Default)]
pub(crate) struct Stored {
    /// Each stored entry read.
    pub entries: HashMap<Key, StoredEntry>,
    /// Body ids known to be stored.
    pub bodies: HashSet<MessageId>,
}

/// One stored entry as read before a batch.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredEntry {
    /// The body it references.
    pub message: MessageId,
    /// Its document's `_id`: what deletes and updates select by (`None`
    /// only for a document without one, which the server never returns).
    pub doc_id: Option<mongodb::bson::Bson>,
}

/// A queue entry the batch writes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct NewEntry<'a> {
    pub client: ClientId,
    pub seq: Seq,
    pub message: MessageId,
    pub delivery: &'a Delivery,
    pub state: PacketState,
}

/// The net effect of a batch, in the order it is written: deletions first
/// (so that an entry deleted and written again, or a purged queue started
/// again, ends up with the new entry), then inserts and updates.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan<'a> {
    /// Sessions whose whole queue goes (purged).
    pub delete_queues: Vec<ClientId>,
    /// Stored entries that go (removed, or replaced by a new entry).
    pub delete_entries: BTreeMap<ClientId, Vec<Seq>>,
    /// Reference count changes of stored bodies, grouped by change.
    pub ref_changes: BTreeMap<i64, Vec<MessageId>>,
    /// Stored bodies whose count went down: deleted if it reached 0.
    pub release_bodies: Vec<MessageId>,
    /// New bodies, each with its reference count.
    pub insert_bodies: Vec<(&'a Message, i64)>,
    /// New entries.
    pub insert_entries: Vec<NewEntry<'a>>,
    /// New states of stored entries.
    pub set_states: Vec<(ClientId, Seq, PacketState)>,
    /// Greatest id of a body that this batch deletes or never stores: the
    /// high-water mark of message ids must reach it.
    pub high_water: Option<MessageId>,
    /// Sessions whose incoming QoS 2 ids all go (purged).
    pub qos2_delete_clients: Vec<ClientId>,
    /// Incoming QoS 2 ids deleted (released, or about to be written again).
    pub qos2_delete: BTreeMap<ClientId, Vec<u16>>,
    /// Incoming QoS 2 ids written.
    pub qos2_insert: Vec<(ClientId, u16)>,
    /// Wills deleted (deleted, or about to be written again).
    pub wills_delete: Vec<MessageId>,
    /// Wills written.
    pub wills_insert: Vec<&'a StoredWill>,
}

#[cfg(test)]
impl Plan<'_> {
    /// True when the batch needs no write at all.
    pub(crate) fn is_empty(&self) -> bool {
        *self == Plan::default()
    }
}

/// The state of one queue entry while the batch is played.
#[derive(Debug, Clone, Copy)]
enum Slot<'a> {
    Absent,
    /// The stored entry, with its state changed when `state` is set.
    Stored {
        message: MessageId,
        state: Option<PacketState>,
    },
    /// An entry the batch writes.
    New {
        message: MessageId,
        delivery: &'a Delivery,
        state: PacketState,
    },
}

impl Slot<'_> {
    fn message(&self) -> Option<MessageId> {
        match self {
            Slot::Absent => None,
            Slot::Stored { message, .. } | Slot::New { message, .. } => Some(*message),
        }
    }
}

struct Player<'s, 'a> {
    stored: &'s Stored,
    /// Bodies known to be stored: those looked up, and those of stored entries.
    stored_bodies: HashSet<MessageId>,
    /// Stored entries read, by session (for purges).
    stored_by_client: HashMap<ClientId, Vec<Seq>>,
    purged: BTreeSet<ClientId>,
    slots: HashMap<Key, Slot<'a>>,
    /// Keys in the order they were first touched.
    order: Vec<Key>,
    refs: HashMap<MessageId, i64>,
    bodies: HashMap<MessageId, &'a Message>,
    /// Body ids in the order they were first enqueued.
    enqueued: Vec<MessageId>,
    qos2: HashMap<(ClientId, u16), bool>,
    qos2_order: Vec<(ClientId, u16)>,
    qos2_purged: BTreeSet<ClientId>,
    /// The last word on each will the batch touches: stored, or deleted.
    wills: BTreeMap<MessageId, Option<&'a StoredWill>>,
}

impl<'s, 'a> Player<'s, 'a> {
    fn new(stored: &'s Stored) -> Self {
        let mut stored_by_client: HashMap<ClientId, Vec<Seq>> = HashMap::new();
        let mut stored_bodies = stored.bodies.clone();
        for ((client, seq), entry) in &stored.entries {
            stored_by_client
                .entry(client.clone())
                .or_default()
                .push(*seq);
            stored_bodies.insert(entry.message);
        }
        Player {
            stored,
            stored_bodies,
            stored_by_client,
            purged: BTreeSet::new(),
            slots: HashMap::new(),
            order: Vec::new(),
            refs: HashMap::new(),
            bodies: HashMap::new(),
            enqueued: Vec::new(),
            qos2: HashMap::new(),
            qos2_order: Vec::new(),
            qos2_purged: BTreeSet::new(),
            wills: BTreeMap::new(),
        }
    }

    fn slot(&mut self, key: &Key) -> &mut Slot<'a> {
        if !self.slots.contains_key(key) {
            let initial = match self.stored.entries.get(key) {
                Some(entry) if !self.purged.contains(&key.0) => Slot::Stored {
                    message: entry.message,
                    state: None,
                },
                _ => Slot::Absent,
            };
            self.slots.insert(key.clone(), initial);
            self.order.push(key.clone());
        }
        self.slots.get_mut(key).expect("inserted above")
    }

    fn replace(&mut self, key: &Key, new: Slot<'a>) {
        let old = std::mem::replace(self.slot(key), new);
        if let Some(m) = old.message() {
            *self.refs.entry(m).or_default() -= 1;
        }
        if let Some(m) = new.message() {
            *self.refs.entry(m).or_default() += 1;
        }
    }

    fn set_qos2(&mut self, client: &ClientId, packet_id: u16, present: bool) {
        let key = (client.clone(), packet_id);
        if self.qos2.insert(key.clone(), present).is_none() {
            self.qos2_order.push(key);
        }
    }

    fn play(&mut self, op: &'a PacketOp) {
        match op {
            PacketOp::Enqueue { message, targets } => {
                if let std::collections::hash_map::Entry::Vacant(e) = self.bodies.entry(message.id)
                {
                    e.insert(message);
                    self.enqueued.push(message.id);
                }
                for t in targets {
                    let new = Slot::New {
                        message: message.id,
                        delivery: &t.delivery,
                        state: PacketState::Queued,
                    };
                    self.replace(&(t.client.clone(), t.seq), new);
                }
            }
            PacketOp::Remove { client, seq } => {
                self.replace(&(client.clone(), *seq), Slot::Absent);
            }
            PacketOp::SetState { client, seq, state } => match self.slot(&(client.clone(), *seq)) {
                Slot::Absent => {}
                Slot::Stored { state: s, .. } => *s = Some(*state),
                Slot::New { state: s, .. } => *s = *state,
            },
            PacketOp::Purge { client } => {
                let mut keys: Vec<Key> = self
                    .order
                    .iter()
                    .filter(|(c, _)| c == client)
                    .cloned()
                    .collect();
                if let Some(seqs) = self.stored_by_client.get(client) {
                    keys.extend(seqs.iter().map(|s| (client.clone(), *s)));
                }
                for key in keys {
                    self.replace(&key, Slot::Absent);
                }
                self.purged.insert(client.clone());
                self.qos2_purged.insert(client.clone());
                self.qos2.retain(|(c, _), _| c != client);
                self.qos2_order.retain(|(c, _)| c != client);
            }
            PacketOp::IncomingQos2Received { client, packet_id } => {
                self.set_qos2(client, *packet_id, true);
            }
            PacketOp::IncomingQos2Released { client, packet_id } => {
                self.set_qos2(client, *packet_id, false);
            }
            PacketOp::StoreWill { will } => {
                self.wills.insert(will.id(), Some(will));
            }
            PacketOp::DeleteWill { id, .. } => {
                self.wills.insert(*id, None);
            }
        }
    }

    fn into_plan(self) -> Plan<'a> {
        let mut plan = Plan {
            delete_queues: self.purged.iter().cloned().collect(),
            qos2_delete_clients: self.qos2_purged.iter().cloned().collect(),
            ..Plan::default()
        };
        for key in &self.order {
            let was_stored = !self.purged.contains(&key.0) && self.stored.entries.contains_key(key);
            match self.slots[key] {
                Slot::Absent => {
                    if was_stored {
                        plan.delete_entries
                            .entry(key.0.clone())
                            .or_default()
                            .push(key.1);
                    }
                }
                Slot::Stored { state, .. } => {
                    if let Some(state) = state {
                        plan.set_states.push((key.0.clone(), key.1, state));
                    }
                }
                Slot::New {
                    message,
                    delivery,
                    state,
                } => {
                    if was_stored {
                        plan.delete_entries
                            .entry(key.0.clone())
                            .or_default()
                            .push(key.1);
                    }
                    plan.insert_entries.push(NewEntry {
                        client: key.0.clone(),
                        seq: key.1,
                        message,
                        delivery,
                        state,
                    });
                }
            }
        }

        let raise = |plan: &mut Plan<'a>, id: MessageId| {
            plan.high_water = Some(plan.high_water.map_or(id, |h| h.max(id)));
        };
        // Bodies the batch enqueued, then those it only released.
        let mut ids: Vec<MessageId> = self.enqueued.clone();
        let mut others: Vec<MessageId> = self
            .refs
            .keys()
            .filter(|id| !self.bodies.contains_key(id))
            .copied()
            .collect();
        others.sort_unstable();
        ids.extend(others);
        for id in ids {
            let delta = self.refs.get(&id).copied().unwrap_or(0);
            let body = self.bodies.get(&id).copied();
            let stored = self.stored_bodies.contains(&id);
            match (stored, body) {
                (false, Some(body)) if delta > 0 => plan.insert_bodies.push((body, delta)),
                (false, Some(_)) if delta == 0 => raise(&mut plan, id),
                // A count that goes down belongs to a stored entry, so its
                // body is stored.
                _ => {
                    if delta != 0 {
                        plan.ref_changes.entry(delta).or_default().push(id);
                    }
                    if delta < 0 {
                        plan.release_bodies.push(id);
                        raise(&mut plan, id);
                    }
                }
            }
        }

        for key in &self.qos2_order {
            plan.qos2_delete
                .entry(key.0.clone())
                .or_default()
                .push(key.1);
            if self.qos2[key] {
                plan.qos2_insert.push(key.clone());
            }
        }
        for (id, will) in self.wills {
            plan.wills_delete.push(id);
            plan.wills_insert.extend(will);
        }
        plan
    }
}

/// The net effect of `ops` over `stored` (which must hold what
/// [`Reads::of`] asked for).
pub(crate) fn plan<'a>(ops: &'a [PacketOp], stored: &Stored) -> Plan<'a> {
    let mut player = Player::new(stored);
    for op in ops {
        player.play(op);
    }
    player.into_plan()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use broker_core::message::QoS;
    use broker_core::storage::QueueTarget;

    use super::*;

    fn c(name: &str) -> ClientId {
        Arc::from(name)
    }

    fn msg(id: MessageId) -> Arc<Message> {
        let mut m = Message::new("t", "p", QoS::AtLeastOnce, false);
        m.id = id;
        Arc::new(m)
    }

    fn enqueue(id: MessageId, targets: &[(&str, Seq)]) -> PacketOp {
        PacketOp::Enqueue {
            message: msg(id),
            targets: targets
                .iter()
                .map(|(client, seq)| QueueTarget {
                    client: c(client),
                    seq: *seq,
                    delivery: Delivery::new(QoS::AtLeastOnce),
                })
                .collect(),
        }
    }

    fn remove(client: &str, seq: Seq) -> PacketOp {
        PacketOp::Remove {
            client: c(client),
            seq,
        }
    }

    fn stored(entries: &[(&str, Seq, MessageId)]) -> Stored {
        Stored {
            entries: entries
                .iter()
                .map(|(client, seq, m)| {
                    let entry = StoredEntry {
                        message: *m,
                        doc_id: None,
                    };
                    ((c(client), *seq), entry)
                })
                .collect(),
            bodies: HashSet::new(),
        }
    }

    fn inserted(plan: &Plan<'_>) -> Vec<(String, Seq, MessageId)> {
        plan.insert_entries
            .iter()
            .map(|e| (e.client.to_string(), e.seq, e.message))
            .collect()
    }

    fn bodies(plan: &Plan<'_>) -> Vec<(MessageId, i64)> {
        plan.insert_bodies.iter().map(|(m, n)| (m.id, *n)).collect()
    }

    #[test]
    fn reads_only_what_matters() {
        let ops = vec![
            enqueue(1, &[("a", 1)]),
            remove("a", 1),
            remove("b", 3),
            PacketOp::Purge { client: c("b") },
        ];
        let reads = Reads::of(&ops, false);
        assert_eq!(reads.entries.keys().collect::<Vec<_>>(), vec![&c("a")]);
        assert_eq!(reads.queues, BTreeSet::from([c("b")]));
        assert!(reads.bodies.is_empty());
        let careful = Reads::of(&ops, true);
        assert_eq!(careful.bodies, BTreeSet::from([1]));
        assert!(Reads::of(&[enqueue(1, &[("a", 1)])], false).no_entries());
    }

    #[test]
    fn fan_out_stores_one_body() {
        let ops = vec![enqueue(1, &[("a", 1), ("b", 1), ("c", 4)])];
        let plan = plan(&ops, &Stored::default());
        assert_eq!(bodies(&plan), vec![(1, 3)]);
        assert_eq!(inserted(&plan).len(), 3);
        assert!(plan.ref_changes.is_empty() && plan.high_water.is_none());
    }

    #[test]
    fn enqueue_then_remove_in_one_batch_writes_nothing_but_the_mark() {
        let ops = vec![enqueue(5, &[("a", 1)]), remove("a", 1)];
        let plan = plan(&ops, &Stored::default());
        assert!(plan.insert_entries.is_empty() && plan.insert_bodies.is_empty());
        assert!(plan.delete_entries.is_empty());
        assert_eq!(plan.high_water, Some(5));
    }

    #[test]
    fn acks_release_stored_bodies() {
        let ops = vec![
            remove("a", 1),
            remove("b", 1),
            remove("a", 2),
            remove("a", 9),
        ];
        let plan = plan(&ops, &stored(&[("a", 1, 7), ("b", 1, 7), ("a", 2, 8)]));
        assert_eq!(plan.delete_entries[&c("a")], vec![1, 2]);
        assert_eq!(plan.delete_entries[&c("b")], vec![1]);
        assert_eq!(
            plan.ref_changes,
            BTreeMap::from([(-2, vec![7]), (-1, vec![8])])
        );
        assert_eq!(plan.release_bodies, vec![7, 8]);
        assert_eq!(plan.high_water, Some(8));
    }

    #[test]
    fn hand_over_references_the_stored_body_again() {
        // The entry of the leaving member goes, the body moves to another.
        let ops = vec![remove("a", 3), enqueue(7, &[("b", 1)])];
        let plan = plan(&ops, &stored(&[("a", 3, 7)]));
        assert!(plan.insert_bodies.is_empty());
        assert!(plan.ref_changes.is_empty(), "net change 0");
        assert!(plan.release_bodies.is_empty());
        assert_eq!(inserted(&plan), vec![("b".into(), 1, 7)]);
        // Handed over without the old entry in the batch: careful mode knows.
        let ops = vec![enqueue(7, &[("b", 2)])];
        let mut known = Stored::default();
        known.bodies.insert(7);
        let plan = super::plan(&ops, &known);
        assert!(plan.insert_bodies.is_empty());
        assert_eq!(plan.ref_changes, BTreeMap::from([(1, vec![7])]));
    }

    #[test]
    fn purge_then_start_again() {
        let ops = vec![
            PacketOp::IncomingQos2Received {
                client: c("a"),
                packet_id: 1,
            },
            enqueue(9, &[("a", 3)]),
            PacketOp::Purge { client: c("a") },
            remove("a", 1),
            enqueue(10, &[("a", 1)]),
            PacketOp::IncomingQos2Received {
                client: c("a"),
                packet_id: 2,
            },
        ];
        let plan = plan(&ops, &stored(&[("a", 1, 4), ("a", 2, 4), ("a", 5, 6)]));
        assert_eq!(plan.delete_queues, vec![c("a")]);
        assert!(plan.delete_entries.is_empty(), "the purge deletes them");
        assert_eq!(inserted(&plan), vec![("a".into(), 1, 10)]);
        assert_eq!(bodies(&plan), vec![(10, 1)]);
        assert_eq!(
            plan.ref_changes,
            BTreeMap::from([(-2, vec![4]), (-1, vec![6])])
        );
        assert_eq!(plan.high_water, Some(9));
        assert_eq!(plan.qos2_delete_clients, vec![c("a")]);
        assert_eq!(plan.qos2_insert, vec![(c("a"), 2)]);
    }

    #[test]
    fn states_change_in_place() {
        let released = PacketState::Released { packet_id: 3 };
        let ops = vec![
            enqueue(2, &[("a", 2)]),
            PacketOp::SetState {
                client: c("a"),
                seq: 1,
                state: released,
            },
            PacketOp::SetState {
                client: c("a"),
                seq: 2,
                state: released,
            },
            PacketOp::SetState {
                client: c("a"),
                seq: 99,
                state: released,
            },
        ];
        let plan = plan(&ops, &stored(&[("a", 1, 1)]));
        assert_eq!(plan.set_states, vec![(c("a"), 1, released)]);
        assert_eq!(plan.insert_entries[0].state, released);
        assert!(plan.delete_entries.is_empty());
    }

    #[test]
    fn enqueue_over_a_stored_entry_replaces_it() {
        let ops = vec![enqueue(2, &[("a", 1)])];
        let plan = plan(&ops, &stored(&[("a", 1, 1)]));
        assert_eq!(plan.delete_entries[&c("a")], vec![1]);
        assert_eq!(inserted(&plan), vec![("a".into(), 1, 2)]);
        assert_eq!(plan.ref_changes, BTreeMap::from([(-1, vec![1])]));
        assert_eq!(plan.release_bodies, vec![1]);
    }

    #[test]
    fn incoming_qos2_last_word_wins() {
        let ops = vec![
            PacketOp::IncomingQos2Received {
                client: c("a"),
                packet_id: 1,
            },
            PacketOp::IncomingQos2Released {
                client: c("a"),
                packet_id: 1,
            },
            PacketOp::IncomingQos2Released {
                client: c("a"),
                packet_id: 2,
            },
            PacketOp::IncomingQos2Received {
                client: c("a"),
                packet_id: 2,
            },
        ];
        let plan = plan(&ops, &Stored::default());
        assert_eq!(plan.qos2_delete[&c("a")], vec![1, 2]);
        assert_eq!(plan.qos2_insert, vec![(c("a"), 2)]);
        assert!(super::plan(&[], &Stored::default()).is_empty());
    }
}
