//! A client's session: its ordered queue, in-flight window and packet ids.
//!
//! # Ordering
//! Every message accepted for a session gets the next [`Seq`] under the
//! session's lock, and the queue is kept in `Seq` order. The outbound path sends
//! strictly from the front of that queue: it stops at the first entry whose
//! storage write has not committed yet ([`EntryState::Pending`]), so a message
//! is never sent before an older one, whether the older one came from the
//! store after a restart, from a backlog built while offline, or from a slower
//! commit. That single rule gives drain-before-live and in-order delivery with
//! an in-flight window larger than one, including retransmissions.
//!
//! Packet ids are per-connection in-flight state mapped to sequence numbers;
//! they are never used to find a stored message.
//!
//! # Queues left in the store
//! A session restored at start holds none of its stored entries, only how
//! many there are and the last one's seq ([`Unread`]). Its queue in memory
//! is then the entries read so far (seqs up to the cursor) and those queued
//! since the start (after the stored ones); the store's part lies between,
//! so the rule above covers it: nothing is sent past the cursor until the
//! pages behind it are read, which [`SessionState::page_wanted`] asks for
//! as the client's window drains. Memory holds the online sessions'
//! windows, not the backlog.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{BrokerConfig, OverflowPolicy};
use crate::hooks::ClientInfo;
use crate::message::{now_ms, Message, MessageId, QoS, Seq};
use crate::small_map::SmallMap;
use crate::storage::{ClientId, Delivery, PacketOp, PacketState, QueueBounds, QueuedPacket};
use crate::subscription::SubscriptionOptions;

/// Delivery state of one queue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryState {
    /// Accepted, but its storage write has not committed: not sendable yet,
    /// and nothing behind it is sent either.
    Pending,
    /// Ready to send.
    Ready,
    /// Sent with `packet_id`, awaiting PUBACK (QoS 1) or PUBREC (QoS 2).
    /// `sent == false` means it must be (re)sent, with DUP=1, on this connection.
    InFlight {
        /// Packet id on the wire.
        packet_id: u16,
        /// Sent on the current connection.
        sent: bool,
    },
    /// QoS 2: PUBREC received, PUBREL owed (or sent), awaiting PUBCOMP.
    Released {
        /// Packet id on the wire.
        packet_id: u16,
        /// PUBREL sent on the current connection.
        sent: bool,
    },
}

/// One message queued for a session.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Position in the session's order.
    pub seq: Seq,
    /// The message body (shared).
    pub message: Arc<Message>,
    /// How it is delivered to this session.
    pub delivery: Delivery,
    /// Whether the entry is in the packet store (so acknowledging it removes it there).
    pub stored: bool,
    /// Whether it was ever put on the wire (for the DUP flag).
    pub ever_sent: bool,
    /// Delivery state.
    pub state: EntryState,
}

/// Something the outbound path must write, in this order.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// A PUBLISH.
    Publish {
        /// Packet id (QoS 1/2).
        packet_id: Option<u16>,
        /// DUP flag.
        dup: bool,
        /// Delivery QoS.
        qos: QoS,
        /// Retain flag.
        retain: bool,
        /// Identifiers of the matching subscriptions (MQTT 5).
        subscription_ids: Vec<u32>,
        /// The message.
        message: Arc<Message>,
    },
    /// A PUBREL for an outgoing QoS 2 delivery.
    PubRel {
        /// Packet id.
        packet_id: u16,
    },
}

impl Outgoing {
    fn publish(e: &Entry, packet_id: Option<u16>, dup: bool) -> Outgoing {
        Outgoing::Publish {
            packet_id,
            dup,
            qos: e.delivery.qos,
            retain: e.delivery.retain,
            subscription_ids: e.delivery.subscription_ids.clone(),
            message: e.message.clone(),
        }
    }
}

/// The connection currently attached to a session.
#[derive(Debug, Clone)]
pub struct Attachment {
    /// Unique per connection.
    pub connection_id: u64,
    /// Cancelled to make that connection close (session takeover, shutdown).
    pub kick: CancellationToken,
    /// Cancelled by that connection once it has fully detached.
    pub detached: CancellationToken,
    /// Who is connected (listener, protocol, peer), for the admin API and metrics.
    pub client: Arc<ClientInfo>,
    /// When it connected (ms since the Unix epoch).
    pub connected_at_ms: u64,
}

/// A message offered to a session.
#[derive(Debug, Clone)]
pub struct NewEntry {
    /// The body.
    pub message: Arc<Message>,
    /// How it is delivered to this session.
    pub delivery: Delivery,
    /// Whether it will be written to the packet store.
    pub store: bool,
}

/// What a session charges against `max_queued_bytes` for one entry, on top
/// of its payload and topic: the entry and the message it points to. The
/// body may be shared with other sessions; each is charged in full, so the
/// bound holds whoever else lets go of the message.
pub const ENTRY_OVERHEAD: usize = std::mem::size_of::<Entry>() + std::mem::size_of::<Message>();

/// The bytes an entry for `message` is charged.
fn cost(message: &Message) -> usize {
    message.payload.len() + message.topic.len() + ENTRY_OVERHEAD
}

/// Which limit refused or evicted a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// `max_queued_messages`.
    Messages,
    /// `max_queued_bytes`.
    Bytes,
}

/// Outcome of offering a message to a session.
#[derive(Debug, PartialEq, Eq)]
pub enum Enqueued {
    /// Queued at this sequence number.
    Queued(Seq),
    /// Refused by a queue limit (policy `drop-new`, or QoS 0 past the byte limit).
    Dropped(DropReason),
    /// Not queued: QoS 0 for an offline session.
    Skipped,
}

/// The stored entries of a restored session that are not read yet: every
/// entry with a seq in `(cursor, until]` is in the store and none is in the
/// queue, which holds those up to `cursor` and those after `until`.
#[derive(Debug)]
struct Unread {
    /// The last seq read (0 before the first page; seqs start at 1).
    cursor: Seq,
    /// The last seq in the store at start.
    until: Seq,
    /// Entries still in the store (counted against `max_queued_messages`;
    /// their bytes are charged as they are read).
    len: usize,
    /// How many of those the `drop-oldest` policy evicted: the first this
    /// many not in flight are dropped as they are read.
    evicted: usize,
    /// A page read is under way (at most one at a time).
    reading: bool,
}

/// A page of a session's stored queue to read: up to `limit` entries after `after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PageRequest {
    /// Read entries with a greater seq (`None`: from the first).
    pub(crate) after: Option<Seq>,
    /// At most this many.
    pub(crate) limit: usize,
}

/// Where the `drop-oldest` policy takes its victim from.
enum Victim {
    /// The queue entry at this index.
    At(usize),
    /// The oldest of the entries still in the store.
    Unread,
}

/// Mutable state of a session, behind its lock. Its fields are private:
/// the methods below keep the invariants (queue order, byte accounting,
/// in-flight count and packet ids agree), so no caller has to.
#[derive(Debug)]
pub(crate) struct SessionState {
    /// The session this state belongs to (store operations name it).
    client: ClientId,
    /// Survives disconnect (clean_session = 0).
    persistent: bool,
    /// Session expiry after disconnect, in seconds (`None`: never).
    expiry_secs: Option<u64>,
    /// When the last connection ended (ms since epoch), `None` while connected.
    disconnected_at_ms: Option<u64>,
    /// Subscriptions by filter.
    subscriptions: SmallMap<String, SubscriptionOptions>,
    /// Incoming QoS 2 packet ids awaiting PUBREL.
    incoming_qos2: HashSet<u16>,
    /// The connection, the kick flag and the retained gates: what only an
    /// online session has, boxed so that an offline one does not carry it.
    online: Option<Box<Online>>,
    /// A will waiting for its delay (MQTT 5), with its id in the store;
    /// cancelled if the client comes back first.
    pending_will: Option<(CancellationToken, MessageId)>,
    /// Messages refused or evicted by the queue limit since the session began.
    dropped: u64,
    /// The limit behind the latest of those.
    last_drop: Option<DropReason>,
    next_seq: Seq,
    /// Ordered by `seq`, sent strictly from the front. Changed only through
    /// `push`, `remove_at` and `clear`, which keep `queued_bytes` equal to
    /// the sum of the entries' [`cost`].
    queue: VecDeque<Entry>,
    queued_bytes: usize,
    in_flight: usize,
    packet_ids: HashMap<u16, Seq>,
    /// Stored entries not read yet (a session restored at start).
    unread: Option<Unread>,
}

/// The part of a session's state that is set only while a connection is
/// attached (or being taken over). The box is allocated when one field is
/// set and freed when all are empty again (see [`SessionState::tidy_online`]):
/// 72 bytes fewer for each offline session (the session's allocation goes
/// from the allocator's 448-byte class to the 384-byte one).
#[derive(Debug, Default)]
struct Online {
    /// The connection attached, if any.
    connection: Option<Attachment>,
    /// The connection an operator kicked (so it closes with "administrative
    /// action", not "taken over"), until it detaches.
    kicked: Option<u64>,
    /// Gates of subscriptions whose retained messages are being read (see
    /// [`SessionState::open_gate`]), each with the end of its reserved
    /// range: no entry at or after the first gate is sent.
    gates: BTreeMap<Seq, Seq>,
}

/// A client's session. Shared by the router (which queues into it) and the
/// link attached to it (which drains it).
#[derive(Debug)]
pub(crate) struct Session {
    /// The client identifier.
    pub(crate) client_id: ClientId,
    state: Mutex<SessionState>,
    /// Wakes the attached link's outbox when there is something to send.
    pub(crate) wake: Notify,
}

impl Session {
    /// A new, empty session.
    pub(crate) fn new(client_id: ClientId, persistent: bool, expiry_secs: Option<u64>) -> Self {
        Session {
            state: Mutex::new(SessionState {
                client: client_id.clone(),
                persistent,
                expiry_secs,
                disconnected_at_ms: None,
                subscriptions: SmallMap::default(),
                incoming_qos2: HashSet::new(),
                online: None,
                pending_will: None,
                dropped: 0,
                last_drop: None,
                next_seq: 1,
                queue: VecDeque::new(),
                queued_bytes: 0,
                in_flight: 0,
                packet_ids: HashMap::new(),
                unread: None,
            }),
            client_id,
            wake: Notify::new(),
        }
    }

    /// Lock the state. Lock order: the trie before a session, never after.
    pub(crate) fn lock(&self) -> parking_lot::MutexGuard<'_, SessionState> {
        self.state.lock()
    }
}

impl SessionState {
    /// Number of queued entries (in flight included), those still in the store too.
    pub fn queue_len(&self) -> usize {
        self.queue.len() + self.unread.as_ref().map_or(0, |u| u.len)
    }

    /// Of [`queue_len`](Self::queue_len), the entries still in the store
    /// only (a restored session whose client has not read them yet).
    pub fn unread_len(&self) -> usize {
        self.unread.as_ref().map_or(0, |u| u.len)
    }

    /// Bytes charged for the queued entries in memory (see [`ENTRY_OVERHEAD`];
    /// entries still in the store are charged once read).
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// The limit behind the latest message refused or evicted, if any.
    pub fn last_drop(&self) -> Option<DropReason> {
        self.last_drop
    }

    /// Messages refused or evicted by the queue limits since the session began.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Whether the session survives its connection.
    pub fn persistent(&self) -> bool {
        self.persistent
    }

    /// Seconds the session outlives its connection (`None`: never expires).
    pub fn expiry_secs(&self) -> Option<u64> {
        self.expiry_secs
    }

    /// Change how long the session outlives its connection.
    pub fn set_expiry_secs(&mut self, secs: Option<u64>) {
        self.expiry_secs = secs;
    }

    /// The session was restored at start, offline since `at_ms`.
    pub fn set_offline_since(&mut self, at_ms: u64) {
        self.disconnected_at_ms = Some(at_ms);
    }

    /// When the last connection ended (ms since the Unix epoch), `None` while connected.
    pub fn disconnected_at_ms(&self) -> Option<u64> {
        self.disconnected_at_ms
    }

    /// Close the attached connection on an operator's request; false when
    /// none is attached.
    pub fn kick(&mut self) -> bool {
        let Some(online) = self.online.as_mut() else {
            return false;
        };
        let Some(c) = &online.connection else {
            return false;
        };
        online.kicked = Some(c.connection_id);
        c.kick.cancel();
        true
    }

    /// Whether connection `connection_id` was closed by [`SessionState::kick`].
    pub fn was_kicked(&self, connection_id: u64) -> bool {
        self.online
            .as_ref()
            .is_some_and(|o| o.kicked == Some(connection_id))
    }

    /// The attached connection, if any.
    pub fn connection(&self) -> Option<&Attachment> {
        self.online.as_ref()?.connection.as_ref()
    }

    /// The online part, allocated if need be.
    fn online_mut(&mut self) -> &mut Online {
        self.online.get_or_insert_with(Box::default)
    }

    /// Free the online part once it holds nothing.
    fn tidy_online(&mut self) {
        if self
            .online
            .as_ref()
            .is_some_and(|o| o.connection.is_none() && o.kicked.is_none() && o.gates.is_empty())
        {
            self.online = None;
        }
    }

    /// Attach a connection: the session is online, and what was in flight
    /// is owed again on it.
    pub fn attach(&mut self, attachment: Attachment) {
        self.online_mut().connection = Some(attachment);
        self.disconnected_at_ms = None;
        self.reset_in_flight();
    }

    /// Detach connection `connection_id` at `now_ms`; false (nothing done)
    /// when another connection is attached.
    pub fn detach(&mut self, connection_id: u64, now_ms: u64) -> bool {
        if self
            .connection()
            .is_none_or(|c| c.connection_id != connection_id)
        {
            return false;
        }
        // The connection, its kick flag and its gates go: retained messages
        // still being read for the ended connection are not queued (see
        // `enqueue_reserved`), nothing waits for them.
        self.online = None;
        self.reset_in_flight();
        self.disconnected_at_ms = Some(now_ms);
        true
    }

    /// Detach whatever connection is attached, without waiting for it (it
    /// did not close in time after a takeover).
    pub fn force_detach(&mut self) {
        self.online = None;
        self.reset_in_flight();
    }

    /// The session's subscriptions, by filter.
    pub(crate) fn subscriptions(&self) -> &SmallMap<String, SubscriptionOptions> {
        &self.subscriptions
    }

    /// Record a subscription; true if it replaced one with the same filter.
    pub fn add_subscription(&mut self, filter: String, options: SubscriptionOptions) -> bool {
        self.subscriptions.insert(filter, options).is_some()
    }

    /// Forget a subscription; true if there was one.
    pub fn remove_subscription(&mut self, filter: &str) -> bool {
        self.subscriptions.remove(filter).is_some()
    }

    /// Incoming QoS 2 packet ids received and not yet released.
    pub fn incoming_qos2(&self) -> &HashSet<u16> {
        &self.incoming_qos2
    }

    /// An incoming QoS 2 message with `packet_id` was accepted (PUBREC owed).
    pub fn receive_qos2(&mut self, packet_id: u16) {
        self.incoming_qos2.insert(packet_id);
    }

    /// PUBREL (or a failed write) frees an incoming QoS 2 packet id; true if it was held.
    pub fn release_qos2(&mut self, packet_id: u16) -> bool {
        self.incoming_qos2.remove(&packet_id)
    }

    /// Set the pending will's cancel token and store id, returning the ones it replaces.
    pub fn set_pending_will(
        &mut self,
        cancel: CancellationToken,
        id: MessageId,
    ) -> Option<(CancellationToken, MessageId)> {
        self.pending_will.replace((cancel, id))
    }

    /// Take the pending will's cancel token and store id (the client came back).
    pub fn take_pending_will(&mut self) -> Option<(CancellationToken, MessageId)> {
        self.pending_will.take()
    }

    fn push(&mut self, e: Entry) {
        self.queued_bytes += cost(&e.message);
        self.queue.push_back(e);
    }

    /// Insert `e` at its place by `seq` (a reserved one, below entries queued since).
    fn insert_ordered(&mut self, e: Entry) {
        self.queued_bytes += cost(&e.message);
        let at = self.queue.partition_point(|q| q.seq < e.seq);
        self.queue.insert(at, e);
    }

    /// Reserve `slots` sequence numbers, from the returned gate on, for the
    /// retained messages of a subscription being made, and hold every entry
    /// from the gate on until [`close_gate`](Self::close_gate).
    ///
    /// Called in the same critical section that puts the subscription in the
    /// trie, so every message routed through it comes after the gate, while
    /// the retained messages, read from the store afterwards, are queued
    /// into the reserved range ([`enqueue_reserved`](Self::enqueue_reserved)):
    /// the subscriber gets the retained messages first and then what was
    /// published since, never a retained message older than a live one it
    /// already has.
    pub fn open_gate(&mut self, slots: usize) -> Seq {
        let gate = self.next_seq;
        self.next_seq += slots as u64;
        let end = self.next_seq;
        self.online_mut().gates.insert(gate, end);
        gate
    }

    /// The retained messages behind `gate` are queued: let the queue go on.
    pub fn close_gate(&mut self, gate: Seq) {
        if let Some(o) = self.online.as_mut() {
            o.gates.remove(&gate);
        }
        self.tidy_online();
    }

    fn remove_at(&mut self, i: usize) -> Option<Entry> {
        let e = self.queue.remove(i)?;
        self.queued_bytes -= cost(&e.message);
        Some(e)
    }

    /// Entries currently in flight (sent or owed, unacknowledged).
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether the session, offline, has outlived its expiry interval at `now_ms`.
    pub fn has_expired(&self, now_ms: u64) -> bool {
        match (
            self.connection().is_none(),
            self.expiry_secs,
            self.disconnected_at_ms,
        ) {
            (true, Some(exp), Some(at)) => at.saturating_add(exp.saturating_mul(1000)) <= now_ms,
            _ => false,
        }
    }

    /// Whether a connection is attached.
    pub fn is_online(&self) -> bool {
        self.connection().is_some()
    }

    /// Restore an entry read from the packet store at the end of the queue.
    /// Entries must come in `Seq` order.
    #[cfg(test)]
    pub fn restore_entry(&mut self, p: QueuedPacket) {
        let e = self.restored(p);
        self.push(e);
    }

    /// A session restored at start: its stored queue is `bounds` long and
    /// stays in the store until read page by page ([`Self::page_wanted`]).
    pub fn restore_unread(&mut self, bounds: QueueBounds) {
        let Some(until) = bounds.last.filter(|_| bounds.len > 0) else {
            return;
        };
        self.next_seq = self.next_seq.max(until + 1);
        self.unread = Some(Unread {
            cursor: 0,
            until,
            len: usize::try_from(bounds.len).unwrap_or(usize::MAX),
            evicted: 0,
            reading: false,
        });
    }

    /// Whether some of the stored queue is not read yet.
    pub(crate) fn has_unread(&self) -> bool {
        self.unread.is_some()
    }

    /// The next page to read from the store whether the session is online
    /// or not (`None` while another read is under way, or nothing is left).
    pub(crate) fn page_wanted_offline(&mut self, limit: usize) -> Option<PageRequest> {
        let u = self.unread.as_mut().filter(|u| !u.reading)?;
        u.reading = true;
        Some(PageRequest {
            after: (u.cursor > 0).then_some(u.cursor),
            limit,
        })
    }

    /// The next page to read from the store, if the session is online and
    /// fewer than `ahead` entries read are left in its queue (in flight
    /// included); the read is then under way until [`Self::load_page`] or
    /// [`Self::page_failed`].
    pub(crate) fn page_wanted(&mut self, ahead: usize, limit: usize) -> Option<PageRequest> {
        let u = self.unread.as_ref()?;
        let read = self.queue.partition_point(|e| e.seq <= u.cursor);
        if self.connection().is_none() || read >= ahead {
            return None;
        }
        self.page_wanted_offline(limit)
    }

    /// A page asked for by `request` was read: its entries go into the
    /// queue in front of those queued since the start (the ones the
    /// `drop-oldest` policy evicted meanwhile are dropped, their removal
    /// pushed to `ops`). A page for another request (the session was
    /// cleared since) is ignored. The store's part ends with a short page
    /// or an entry queued since the start.
    pub(crate) fn load_page(
        &mut self,
        request: PageRequest,
        page: Vec<QueuedPacket>,
        ops: &mut Vec<PacketOp>,
    ) {
        let Some(u) = self.unread.as_mut() else {
            return;
        };
        if !u.reading || request.after.unwrap_or(0) != u.cursor {
            return;
        }
        u.reading = false;
        let (until, mut done) = (u.until, page.len() < request.limit);
        let mut read = Vec::with_capacity(page.len());
        for p in page {
            let Some(u) = self.unread.as_mut() else { break };
            if p.seq > until {
                done = true;
                break;
            }
            u.cursor = p.seq;
            if u.evicted > 0 && p.state == PacketState::Queued {
                u.evicted -= 1;
                ops.push(PacketOp::Remove {
                    client: self.client.clone(),
                    seq: p.seq,
                });
                continue;
            }
            u.len = u.len.saturating_sub(1);
            read.push(self.restored(p));
        }
        // Between the entries read before and those queued since the start.
        let at = self.queue.partition_point(|e| e.seq <= until);
        let after = self.queue.split_off(at);
        for e in read {
            self.push(e);
        }
        self.queue.extend(after);
        if done {
            self.unread = None;
        }
    }

    /// The read of `request` failed: a later [`Self::page_wanted`] asks again.
    pub(crate) fn page_failed(&mut self, request: PageRequest) {
        if let Some(u) = self.unread.as_mut() {
            if u.reading && request.after.unwrap_or(0) == u.cursor {
                u.reading = false;
            }
        }
    }

    /// An entry read from the store, with its in-flight state taken up.
    fn restored(&mut self, p: QueuedPacket) -> Entry {
        let state = match p.state {
            PacketState::Queued => EntryState::Ready,
            PacketState::Released { packet_id } => {
                self.in_flight += 1;
                self.packet_ids.insert(packet_id, p.seq);
                EntryState::Released {
                    packet_id,
                    sent: false,
                }
            }
        };
        self.next_seq = self.next_seq.max(p.seq + 1);
        Entry {
            seq: p.seq,
            message: p.message,
            delivery: p.delivery,
            stored: true,
            // It may have been sent before the restart: retransmit with DUP=1.
            ever_sent: true,
            state,
        }
    }

    /// Offer a message to this session. `store` says whether the entry will be
    /// written to the packet store (it then starts [`EntryState::Pending`]).
    /// Evictions by the `drop-oldest` policy are pushed to `ops`.
    pub fn enqueue(
        &mut self,
        entry: NewEntry,
        config: &BrokerConfig,
        ops: &mut Vec<PacketOp>,
    ) -> Enqueued {
        self.admit(entry, None, config, ops)
    }

    /// [`enqueue`](Self::enqueue) at `seq`, a number [`open_gate`](Self::open_gate)
    /// reserved, while that gate is open; [`Enqueued::Skipped`] once it is
    /// closed (the connection that subscribed ended: entries behind the gate
    /// may have been sent since, and this one would come after them).
    pub fn enqueue_reserved(
        &mut self,
        entry: NewEntry,
        gate: Seq,
        seq: Seq,
        config: &BrokerConfig,
        ops: &mut Vec<PacketOp>,
    ) -> Enqueued {
        if !self
            .online
            .as_ref()
            .and_then(|o| o.gates.get(&gate))
            .is_some_and(|&end| (gate..end).contains(&seq))
        {
            return Enqueued::Skipped;
        }
        self.admit(entry, Some(seq), config, ops)
    }

    fn admit(
        &mut self,
        NewEntry {
            message,
            delivery,
            store,
        }: NewEntry,
        at: Option<Seq>,
        config: &BrokerConfig,
        ops: &mut Vec<PacketOp>,
    ) -> Enqueued {
        if delivery.qos == QoS::AtMostOnce && !self.is_online() && !config.queue_qos0_offline {
            return Enqueued::Skipped;
        }
        let needed = cost(&message);
        loop {
            let over = if self.queue_len() >= config.max_queued_messages {
                DropReason::Messages
            } else if self.queued_bytes + needed > config.max_queued_bytes {
                DropReason::Bytes
            } else {
                break;
            };
            // QoS 0 never evicts: it is the first to go past the byte limit.
            let evict = config.overflow_policy == OverflowPolicy::DropOldest
                && !(over == DropReason::Bytes && delivery.qos == QoS::AtMostOnce);
            let victim = evict.then(|| self.oldest_evictable()).flatten();
            self.dropped += 1;
            self.last_drop = Some(over);
            match victim {
                Some(Victim::At(i)) => match self.remove_at(i) {
                    Some(e) if e.stored => ops.push(PacketOp::Remove {
                        client: self.client.clone(),
                        seq: e.seq,
                    }),
                    Some(_) => {}
                    None => return Enqueued::Dropped(over),
                },
                Some(Victim::Unread) => {
                    if let Some(u) = self.unread.as_mut() {
                        u.len -= 1;
                        u.evicted += 1;
                    }
                }
                None => return Enqueued::Dropped(over),
            }
        }
        let seq = at.unwrap_or(self.next_seq);
        let entry = Entry {
            seq,
            message,
            delivery,
            stored: store,
            ever_sent: false,
            state: if store {
                EntryState::Pending
            } else {
                EntryState::Ready
            },
        };
        if at.is_some() {
            self.insert_ordered(entry);
        } else {
            self.next_seq += 1;
            self.push(entry);
        }
        Enqueued::Queued(seq)
    }

    /// The entry `drop-oldest` evicts: the oldest one not in flight (the
    /// client may be acting on those) and not being written, looking at
    /// the entries read, then those still in the store, then those queued
    /// since the start.
    fn oldest_evictable(&self) -> Option<Victim> {
        let evictable = |e: &Entry| {
            matches!(e.state, EntryState::Ready | EntryState::Pending)
                && !(e.state == EntryState::Pending && e.stored)
        };
        let Some(u) = &self.unread else {
            return self.queue.iter().position(evictable).map(Victim::At);
        };
        let read = self.queue.partition_point(|e| e.seq <= u.cursor);
        if let Some(i) = self.queue.range(..read).position(evictable) {
            return Some(Victim::At(i));
        }
        if u.len > 0 {
            return Some(Victim::Unread);
        }
        self.queue
            .range(read..)
            .position(evictable)
            .map(|i| Victim::At(read + i))
    }

    fn index_of(&self, seq: Seq) -> Option<usize> {
        self.queue.binary_search_by_key(&seq, |e| e.seq).ok()
    }

    /// The storage write of `seq` committed: it may be sent.
    pub fn mark_ready(&mut self, seq: Seq) {
        if let Some(i) = self.index_of(seq) {
            if self.queue[i].state == EntryState::Pending {
                self.queue[i].state = EntryState::Ready;
            }
        }
    }

    /// The storage write of `seq` failed: the publish is not acknowledged, so
    /// the entry is withdrawn (it was never sent).
    pub fn withdraw(&mut self, seq: Seq) {
        if let Some(i) = self.index_of(seq) {
            if self.queue[i].state == EntryState::Pending {
                self.remove_at(i);
            }
        }
    }

    /// Collect what may be written now, in order, respecting the in-flight
    /// window, until about `budget` bytes of payload and topic are taken
    /// (at least one message). Expired messages are removed (their removal
    /// pushed to `ops`). Returns true when it stopped at the budget with
    /// more to send: the caller writes what it has and comes back, so a
    /// slow reader's backlog stays in the queue, charged to its limits,
    /// instead of piling up in a write buffer.
    pub fn next_outgoing(
        &mut self,
        max_inflight: usize,
        budget: usize,
        out: &mut Vec<Outgoing>,
        ops: &mut Vec<PacketOp>,
    ) -> bool {
        let now = now_ms();
        let mut taken = 0usize;
        let gate = self
            .online
            .as_ref()
            .and_then(|o| o.gates.first_key_value())
            .map(|(g, _)| *g);
        // Nothing past what was read of the store's part (see `Unread`).
        let unread_from = self.unread.as_ref().map(|u| u.cursor + 1);
        let mut i = 0;
        while i < self.queue.len() {
            if taken >= budget {
                return true;
            }
            let e = &mut self.queue[i];
            if gate.is_some_and(|g| e.seq >= g) || unread_from.is_some_and(|u| e.seq >= u) {
                break;
            }
            match e.state {
                EntryState::Pending => break,
                EntryState::InFlight {
                    packet_id,
                    sent: false,
                } => {
                    e.state = EntryState::InFlight {
                        packet_id,
                        sent: true,
                    };
                    taken += e.message.payload.len() + e.message.topic.len();
                    out.push(Outgoing::publish(e, Some(packet_id), true));
                }
                EntryState::Released {
                    packet_id,
                    sent: false,
                } => {
                    e.state = EntryState::Released {
                        packet_id,
                        sent: true,
                    };
                    out.push(Outgoing::PubRel { packet_id });
                }
                EntryState::InFlight { .. } | EntryState::Released { .. } => {}
                EntryState::Ready => {
                    if e.message.is_expired(now) {
                        if e.stored {
                            ops.push(PacketOp::Remove {
                                client: self.client.clone(),
                                seq: e.seq,
                            });
                        }
                        self.remove_at(i);
                        continue;
                    }
                    if e.delivery.qos == QoS::AtMostOnce {
                        taken += e.message.payload.len() + e.message.topic.len();
                        out.push(Outgoing::publish(e, None, false));
                        self.remove_at(i);
                        continue;
                    }
                    if self.in_flight >= max_inflight {
                        break;
                    }
                    let (dup, seq) = (e.ever_sent, e.seq);
                    let packet_id = self.allocate_packet_id(seq);
                    let e = &mut self.queue[i];
                    e.state = EntryState::InFlight {
                        packet_id,
                        sent: true,
                    };
                    e.ever_sent = true;
                    self.in_flight += 1;
                    taken += e.message.payload.len() + e.message.topic.len();
                    out.push(Outgoing::publish(e, Some(packet_id), dup));
                }
            }
            i += 1;
        }
        false
    }

    /// The packet id for the entry `seq`: derived from the sequence number,
    /// so the entry gets the same id again after a restart without the
    /// store keeping it (MQTT-4.4.0-1: unacknowledged messages are resent
    /// with their original packet ids; a QoS 2 receiver that still holds an
    /// id would otherwise take the next message sent with it for a
    /// duplicate). Only if another entry in flight holds that id, 65,535
    /// sequence numbers older, is the next free one taken.
    fn allocate_packet_id(&mut self, seq: Seq) -> u16 {
        let mut id = (seq.saturating_sub(1) % u64::from(u16::MAX)) as u16 + 1;
        // The window is at most 65,535, so a free id always exists.
        loop {
            if let std::collections::hash_map::Entry::Vacant(v) = self.packet_ids.entry(id) {
                v.insert(seq);
                return id;
            }
            id = id.checked_add(1).unwrap_or(1);
        }
    }

    /// PUBACK (QoS 1) or PUBCOMP (QoS 2 after PUBREL): the delivery is done.
    /// Returns the store removal if the entry was stored. Unknown ids are ignored
    /// (a late duplicate acknowledgement is harmless).
    pub fn complete(&mut self, packet_id: u16, qos2: bool) -> Option<PacketOp> {
        let seq = *self.packet_ids.get(&packet_id)?;
        let i = self.index_of(seq)?;
        let expected = match self.queue[i].state {
            EntryState::InFlight { .. } => !qos2 && self.queue[i].delivery.qos == QoS::AtLeastOnce,
            EntryState::Released { .. } => qos2,
            _ => false,
        };
        if !expected {
            return None;
        }
        self.packet_ids.remove(&packet_id);
        self.in_flight -= 1;
        let e = self.remove_at(i)?;
        e.stored.then(|| PacketOp::Remove {
            client: self.client.clone(),
            seq: e.seq,
        })
    }

    /// Drop an in-flight delivery without acknowledgement: the client refused
    /// it (PUBREC with an error code) or it cannot be sent (larger than the
    /// client's maximum packet size). Returns the store removal if stored.
    pub fn abandon(&mut self, packet_id: u16) -> Option<PacketOp> {
        let seq = self.packet_ids.remove(&packet_id)?;
        self.in_flight -= 1;
        let i = self.index_of(seq)?;
        let e = self.remove_at(i)?;
        e.stored.then(|| PacketOp::Remove {
            client: self.client.clone(),
            seq: e.seq,
        })
    }

    /// The shared subscriptions that routed entries to this queue.
    pub fn shared_groups(&self) -> Vec<String> {
        let groups: std::collections::BTreeSet<&String> = self
            .queue
            .iter()
            .filter_map(|e| e.delivery.share.as_ref())
            .collect();
        groups.into_iter().cloned().collect()
    }

    /// Take out the entries that a shared subscription routed here and that
    /// another member should get instead: those of `share` (every group when
    /// `None`) not yet sent, and with `in_flight` also those sent but not
    /// acknowledged. Their store removals are pushed to `ops`.
    pub fn take_shared(
        &mut self,
        share: Option<&str>,
        in_flight: bool,
        ops: &mut Vec<PacketOp>,
    ) -> Vec<Entry> {
        let mut taken = Vec::new();
        let mut i = 0;
        while i < self.queue.len() {
            let e = &self.queue[i];
            let group_matches = match (&e.delivery.share, share) {
                (Some(g), Some(want)) => g == want,
                (Some(_), None) => true,
                (None, _) => false,
            };
            let movable = match e.state {
                EntryState::Ready => true,
                EntryState::InFlight { .. } => in_flight,
                _ => false,
            };
            if group_matches && movable {
                if let EntryState::InFlight { packet_id, .. } = e.state {
                    self.packet_ids.remove(&packet_id);
                    self.in_flight -= 1;
                }
                if let Some(e) = self.remove_at(i) {
                    if e.stored {
                        ops.push(PacketOp::Remove {
                            client: self.client.clone(),
                            seq: e.seq,
                        });
                    }
                    taken.push(e);
                }
                continue;
            }
            i += 1;
        }
        taken
    }

    /// PUBREC for an outgoing QoS 2 delivery: PUBREL is now owed. Returns the
    /// state change to store if the entry is stored.
    pub fn received(&mut self, packet_id: u16) -> Option<PacketOp> {
        let seq = *self.packet_ids.get(&packet_id)?;
        let i = self.index_of(seq)?;
        let e = &mut self.queue[i];
        match e.state {
            EntryState::InFlight { .. } if e.delivery.qos == QoS::ExactlyOnce => {
                e.state = EntryState::Released {
                    packet_id,
                    sent: false,
                };
                e.stored.then(|| PacketOp::SetState {
                    client: self.client.clone(),
                    seq,
                    state: PacketState::Released { packet_id },
                })
            }
            // PUBREC for a PUBREL already owed: resend the PUBREL.
            EntryState::Released { .. } => {
                e.state = EntryState::Released {
                    packet_id,
                    sent: false,
                };
                None
            }
            _ => None,
        }
    }

    /// The connection went away: whatever was in flight must be resent on the
    /// next one, with the same packet ids and in the same order.
    fn reset_in_flight(&mut self) {
        for e in self.queue.iter_mut() {
            match e.state {
                EntryState::InFlight { packet_id, .. } => {
                    e.state = EntryState::InFlight {
                        packet_id,
                        sent: false,
                    }
                }
                EntryState::Released { packet_id, .. } => {
                    e.state = EntryState::Released {
                        packet_id,
                        sent: false,
                    }
                }
                _ => {}
            }
        }
    }

    /// Whether some entry still waits for its storage write.
    pub fn has_pending(&self) -> bool {
        self.queue.iter().any(|e| e.state == EntryState::Pending)
    }

    /// Drop every entry and subscription (the session is being discarded).
    pub fn clear(&mut self) {
        self.subscriptions.clear();
        if let Some(o) = self.online.as_mut() {
            o.gates.clear();
        }
        self.tidy_online();
        self.queue.clear();
        self.queued_bytes = 0;
        self.packet_ids.clear();
        self.in_flight = 0;
        self.unread = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(n: u32) -> Arc<Message> {
        Arc::new(Message::new("t", n.to_string(), QoS::AtLeastOnce, false))
    }

    fn entry(n: u32, store: bool) -> NewEntry {
        NewEntry {
            message: msg(n),
            delivery: Delivery::new(QoS::AtLeastOnce),
            store,
        }
    }

    fn payloads(out: &[Outgoing]) -> Vec<String> {
        out.iter()
            .filter_map(|o| match o {
                Outgoing::Publish { message, .. } => {
                    Some(String::from_utf8_lossy(&message.payload).into_owned())
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn pending_entry_blocks_newer_ones() {
        let cfg = BrokerConfig::default();
        let id: ClientId = "c".into();
        let s = Session::new(id.clone(), true, None);
        let mut st = s.lock();
        let mut ops = vec![];
        let Enqueued::Queued(a) = st.enqueue(entry(1, true), &cfg, &mut ops) else {
            panic!("not queued")
        };
        st.enqueue(entry(2, false), &cfg, &mut ops);
        let mut out = vec![];
        st.next_outgoing(32, usize::MAX, &mut out, &mut ops);
        assert!(out.is_empty(), "nothing may overtake a pending entry");
        st.mark_ready(a);
        st.next_outgoing(32, usize::MAX, &mut out, &mut ops);
        assert_eq!(payloads(&out), vec!["1", "2"]);
    }

    #[test]
    fn a_retained_gate_holds_what_comes_after_until_its_messages_are_in() {
        let cfg = BrokerConfig::default();
        let s = Session::new("c".into(), true, None);
        let mut st = s.lock();
        let mut ops = vec![];
        st.enqueue(entry(1, false), &cfg, &mut ops);
        let gate = st.open_gate(10);
        // Routed after the subscription: behind the gate.
        st.enqueue(entry(20, false), &cfg, &mut ops);
        let mut out = vec![];
        st.next_outgoing(32, usize::MAX, &mut out, &mut ops);
        assert_eq!(
            payloads(&out),
            vec!["1"],
            "only what was queued before the gate"
        );
        // The retained messages, read late, go into the reserved range.
        for (i, n) in [10, 11].into_iter().enumerate() {
            let r = st.enqueue_reserved(entry(n, false), gate, gate + i as u64, &cfg, &mut ops);
            assert!(matches!(r, Enqueued::Queued(_)), "{r:?}");
        }
        assert_eq!(
            st.enqueue_reserved(entry(99, false), gate, gate + 10, &cfg, &mut ops),
            Enqueued::Skipped,
            "outside the reserved range"
        );
        out.clear();
        st.next_outgoing(32, usize::MAX, &mut out, &mut ops);
        assert!(out.is_empty(), "held while the gate is open");
        st.close_gate(gate);
        st.next_outgoing(32, usize::MAX, &mut out, &mut ops);
        assert_eq!(payloads(&out), vec!["10", "11", "20"]);
        assert_eq!(st.queue_len(), 4);

        // A gate of a connection that ended takes nothing more.
        let gate = st.open_gate(10);
        st.force_detach();
        assert_eq!(
            st.enqueue_reserved(entry(30, false), gate, gate, &cfg, &mut ops),
            Enqueued::Skipped
        );
    }

    #[test]
    fn window_and_resend_keep_order_and_ids() {
        let cfg = BrokerConfig::default();
        let id: ClientId = "c".into();
        let s = Session::new(id.clone(), true, None);
        let mut st = s.lock();
        let mut ops = vec![];
        for n in 0..5 {
            st.enqueue(entry(n, false), &cfg, &mut ops);
        }
        let mut out = vec![];
        st.next_outgoing(2, usize::MAX, &mut out, &mut ops);
        assert_eq!(payloads(&out), vec!["0", "1"]);
        st.reset_in_flight();
        out.clear();
        st.next_outgoing(3, usize::MAX, &mut out, &mut ops);
        assert_eq!(payloads(&out), vec!["0", "1", "2"]);
        match &out[0] {
            Outgoing::Publish { dup, packet_id, .. } => {
                assert!(*dup);
                assert_eq!(*packet_id, Some(1));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(st.complete(1, false).is_none());
        assert_eq!(st.in_flight(), 2);
    }

    fn sized(bytes: usize, qos: QoS) -> NewEntry {
        NewEntry {
            message: Arc::new(Message::new("t", vec![0u8; bytes], qos, false)),
            delivery: Delivery::new(qos),
            store: false,
        }
    }

    #[test]
    fn an_offline_session_carries_no_online_part() {
        // The allocator's class for the session's `Arc`: 384 bytes, not 448.
        assert!(std::mem::size_of::<Session>() + 16 <= 384);
        let s = Session::new("c".into(), true, None);
        online(&s);
        let gate = s.lock().open_gate(2);
        assert!(s.lock().kick());
        assert!(s.lock().was_kicked(1));
        assert!(s.lock().detach(1, 5));
        assert!(s.lock().online.is_none(), "detach frees the online part");
        assert!(!s.lock().was_kicked(1));
        // A gate closed after the detach finds nothing and allocates nothing.
        s.lock().close_gate(gate);
        assert!(s.lock().online.is_none());
    }

    fn online(s: &Session) {
        s.lock().online_mut().connection = Some(Attachment {
            connection_id: 1,
            kick: CancellationToken::new(),
            detached: CancellationToken::new(),
            client: Arc::new(ClientInfo {
                client_id: "c".into(),
                username: None,
                identity: None,
                peer: None,
                listener: "test".into(),
                protocol: crate::hooks::ProtocolVersion::V5,
            }),
            connected_at_ms: 0,
        });
    }

    #[test]
    fn byte_limit_drops_qos0_and_applies_the_policy_to_qos1() {
        let id: ClientId = "c".into();
        let per = 1000 + 1 + ENTRY_OVERHEAD;
        let mut cfg = BrokerConfig {
            max_queued_bytes: 3 * per,
            max_packet_size: 16,
            ..BrokerConfig::default()
        };
        let s = Session::new(id.clone(), true, None);
        online(&s);
        let mut st = s.lock();
        let mut ops = vec![];
        for _ in 0..3 {
            assert!(matches!(
                st.enqueue(sized(1000, QoS::AtLeastOnce), &cfg, &mut ops),
                Enqueued::Queued(_)
            ));
        }
        assert_eq!(st.queued_bytes(), 3 * per);
        assert_eq!(
            st.enqueue(sized(1000, QoS::AtMostOnce), &cfg, &mut ops),
            Enqueued::Dropped(DropReason::Bytes)
        );
        assert_eq!(
            st.enqueue(sized(1000, QoS::AtLeastOnce), &cfg, &mut ops),
            Enqueued::Dropped(DropReason::Bytes)
        );
        cfg.overflow_policy = OverflowPolicy::DropOldest;
        assert_eq!(
            st.enqueue(sized(1000, QoS::AtMostOnce), &cfg, &mut ops),
            Enqueued::Dropped(DropReason::Bytes),
            "QoS 0 never evicts"
        );
        assert!(matches!(
            st.enqueue(sized(1000, QoS::AtLeastOnce), &cfg, &mut ops),
            Enqueued::Queued(_)
        ));
        assert_eq!((st.queue_len(), st.queued_bytes()), (3, 3 * per));
        assert_eq!(st.dropped, 4);
        assert_eq!(st.last_drop(), Some(DropReason::Bytes));
        let mut out = vec![];
        st.next_outgoing(32, usize::MAX, &mut out, &mut ops);
        for o in &out {
            let Outgoing::Publish {
                packet_id: Some(p), ..
            } = o
            else {
                panic!("unexpected {o:?}")
            };
            assert!(st.complete(*p, false).is_none());
        }
        assert_eq!((st.queue_len(), st.queued_bytes()), (0, 0));
    }

    #[test]
    fn budget_leaves_the_rest_in_the_queue() {
        let id: ClientId = "c".into();
        let cfg = BrokerConfig::default();
        let s = Session::new(id.clone(), false, None);
        online(&s);
        let mut st = s.lock();
        let mut ops = vec![];
        for _ in 0..10 {
            st.enqueue(sized(1000, QoS::AtMostOnce), &cfg, &mut ops);
        }
        let mut out = vec![];
        assert!(st.next_outgoing(32, 2500, &mut out, &mut ops));
        assert_eq!(out.len(), 3, "stops once the budget is spent");
        assert_eq!(st.queue_len(), 7);
        assert_eq!(st.queued_bytes(), 7 * (1001 + ENTRY_OVERHEAD));
        out.clear();
        assert!(!st.next_outgoing(32, usize::MAX, &mut out, &mut ops));
        assert_eq!((out.len(), st.queued_bytes()), (7, 0));
    }

    #[test]
    fn packet_ids_follow_sequence_numbers_across_a_restore() {
        let cfg = BrokerConfig::default();
        let id: ClientId = "c".into();
        let s = Session::new(id.clone(), true, None);
        let mut st = s.lock();
        let mut ops = vec![];
        for n in 0..3 {
            st.enqueue(entry(n, false), &cfg, &mut ops);
        }
        let mut out = vec![];
        st.next_outgoing(32, usize::MAX, &mut out, &mut ops);
        let ids = |out: &[Outgoing]| -> Vec<Option<u16>> {
            out.iter()
                .map(|o| match o {
                    Outgoing::Publish { packet_id, .. } => *packet_id,
                    _ => None,
                })
                .collect()
        };
        assert_eq!(ids(&out), vec![Some(1), Some(2), Some(3)]);
        // The same entries restored from the store after a restart (seq 2 and 3
        // still unacknowledged) get the same ids again.
        let restored = Session::new(id.clone(), true, None);
        let mut st2 = restored.lock();
        for seq in [2, 3] {
            st2.restore_entry(QueuedPacket {
                seq,
                message: msg(seq as u32),
                delivery: Delivery::new(QoS::AtLeastOnce),
                state: PacketState::Queued,
            });
        }
        out.clear();
        st2.next_outgoing(32, usize::MAX, &mut out, &mut ops);
        assert_eq!(ids(&out), vec![Some(2), Some(3)]);
    }

    fn stored(seq: Seq) -> QueuedPacket {
        QueuedPacket {
            seq,
            message: msg(seq as u32),
            delivery: Delivery::new(QoS::AtLeastOnce),
            state: PacketState::Queued,
        }
    }

    fn bounds(len: u64, last: Seq) -> QueueBounds {
        QueueBounds {
            len,
            last: Some(last),
        }
    }

    #[test]
    fn a_queue_left_in_the_store_is_sent_only_as_far_as_it_is_read() {
        let cfg = BrokerConfig::default();
        let s = Session::new("c".into(), true, None);
        let mut st = s.lock();
        st.restore_unread(bounds(3, 3));
        assert_eq!(st.page_wanted(10, 2), None, "offline: nothing is read");
        drop(st);
        online(&s);
        let mut st = s.lock();
        let mut ops = vec![];
        // Published after the start: seq 4, behind the stored three.
        assert_eq!(
            st.enqueue(entry(4, false), &cfg, &mut ops),
            Enqueued::Queued(4)
        );
        assert_eq!((st.queue_len(), st.unread_len()), (4, 3));
        let mut out = vec![];
        st.next_outgoing(32, usize::MAX, &mut out, &mut ops);
        assert!(
            out.is_empty(),
            "nothing overtakes what is still in the store"
        );

        let first = st.page_wanted(10, 2).expect("a page");
        assert_eq!(first.after, None);
        assert_eq!(st.page_wanted(10, 2), None, "one read at a time");
        st.load_page(first, vec![stored(1), stored(2)], &mut ops);
        st.next_outgoing(32, usize::MAX, &mut out, &mut ops);
        assert_eq!(payloads(&out), vec!["1", "2"], "seq 4 waits for seq 3");
        assert_eq!(st.unread_len(), 1);

        let second = st.page_wanted(10, 2).expect("the next page");
        assert_eq!(second.after, Some(2));
        // The store also has seq 4 by now: it is not read twice.
        st.load_page(second, vec![stored(3), stored(4)], &mut ops);
        assert!(
            !st.has_unread(),
            "an entry queued since the start ends the store's part"
        );
        out.clear();
        st.next_outgoing(32, usize::MAX, &mut out, &mut ops);
        assert_eq!(payloads(&out), vec!["3", "4"]);
        assert_eq!(st.queue_len(), 4);
        assert!(ops.is_empty());
    }

    #[test]
    fn drop_oldest_takes_from_the_store_part_before_newer_entries() {
        let cfg = BrokerConfig {
            max_queued_messages: 3,
            overflow_policy: OverflowPolicy::DropOldest,
            ..BrokerConfig::default()
        };
        let s = Session::new("c".into(), true, None);
        online(&s);
        let mut st = s.lock();
        let mut ops = vec![];
        st.restore_unread(bounds(2, 2));
        st.enqueue(entry(3, false), &cfg, &mut ops);
        assert_eq!(
            st.enqueue(entry(4, false), &cfg, &mut ops),
            Enqueued::Queued(4)
        );
        assert_eq!((st.queue_len(), st.unread_len(), st.dropped()), (3, 1, 1));
        assert!(ops.is_empty(), "removed from the store once read");
        let page = st.page_wanted(10, 10).expect("a page");
        st.load_page(page, vec![stored(1), stored(2)], &mut ops);
        assert!(
            matches!(ops.as_slice(), [PacketOp::Remove { seq: 1, .. }]),
            "the oldest stored entry goes: {ops:?}"
        );
        let mut out = vec![];
        st.next_outgoing(32, usize::MAX, &mut out, &mut ops);
        assert_eq!(payloads(&out), vec!["2", "3", "4"]);
    }

    #[test]
    fn a_page_for_a_cleared_session_is_dropped() {
        let s = Session::new("c".into(), true, None);
        online(&s);
        let mut st = s.lock();
        st.restore_unread(bounds(5, 5));
        let page = st.page_wanted(10, 10).expect("a page");
        st.clear();
        let mut ops = vec![];
        st.load_page(page, vec![stored(1), stored(2)], &mut ops);
        assert_eq!((st.queue_len(), st.queued_bytes()), (0, 0));
        // A failed read is asked again.
        st.restore_unread(bounds(5, 5));
        let page = st.page_wanted(10, 10).expect("a page");
        st.page_failed(page);
        assert_eq!(st.page_wanted(10, 10), Some(page));
    }
}
