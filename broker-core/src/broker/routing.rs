//! Routing: a message matched against the subscription trie, one copy per
//! session (at the highest QoS its subscriptions grant) and one per shared
//! group (to one member, round-robin over the online ones), queued for each
//! session in one store batch.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures::future::BoxFuture;
use tracing::{info, warn};

use super::{Core, Stats};
use crate::events::{DropCause, Event};
use crate::hooks::ClientInfo;
use crate::message::{Message, QoS, Seq};
use crate::metrics::DropLabel;
use crate::session::{DropReason, Enqueued, Entry, NewEntry, Session, SessionState};
use crate::storage::{ClientId, Delivery, PacketOp, QueueTarget, StorageResult};
use crate::subscription::SubscriptionOptions;
use crate::topic::{self, SharedFilter};
use crate::trie::SubscriptionTree;

/// Who holds a subscription in the trie: a session, once per filter on its
/// own and once per shared group it joined with that filter.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SubscriberKey {
    /// The session's client id.
    pub client: ClientId,
    /// The full `$share/{group}/{filter}` for a shared subscription.
    pub share: Option<Arc<str>>,
}

/// A subscriber as the trie holds it.
#[derive(Debug, Clone)]
pub(crate) struct Subscriber {
    /// The session.
    pub session: Arc<Session>,
    /// What it was granted.
    pub options: SubscriptionOptions,
    /// The full `$share/{group}/{filter}` for a shared subscription.
    pub share: Option<Arc<str>>,
}

/// A published message routed to its sessions, waiting for its store write.
#[must_use = "a routed message is only delivered once committed"]
pub(crate) struct Routed {
    ops: Vec<PacketOp>,
    /// Sessions with an entry waiting for this commit.
    pending: Vec<(Arc<Session>, Seq)>,
    /// Some subscription matched (MQTT 5 PUBACK 0x10 otherwise).
    matched: bool,
}

/// A message accepted for routing: whether any subscription matched
/// (MQTT 5 PUBACK 0x10 otherwise), and its store write.
pub(crate) struct Accepted {
    pub(crate) matched: bool,
    /// Resolves once the batch is durable (or failed); the write goes on
    /// if this is dropped.
    pub(crate) committed: BoxFuture<'static, StorageResult<()>>,
}

/// Who published a message.
#[derive(Debug, Clone)]
pub(crate) enum Origin {
    /// A client, through its link: No Local applies to it, events name it.
    Client(Arc<ClientInfo>),
    /// A client's will, published after its connection ended.
    Will(Arc<ClientInfo>),
    /// The application or the broker itself.
    Internal,
}

impl Routed {
    /// Nothing routed yet.
    pub(super) fn empty() -> Routed {
        Routed {
            ops: Vec::new(),
            pending: Vec::new(),
            matched: false,
        }
    }
    /// Split into the store operations and the entries they release.
    pub(super) fn into_parts(self) -> (Vec<PacketOp>, Vec<(Arc<Session>, Seq)>) {
        (self.ops, self.pending)
    }

    /// Append another routed batch, to be committed atomically with this one.
    pub(super) fn absorb(&mut self, other: Routed) {
        self.ops.extend(other.ops);
        self.pending.extend(other.pending);
        self.matched |= other.matched;
    }
}

impl Core {
    /// Route `message` to every matching session (synchronously, so sequence
    /// numbers follow the caller's order). `origin` is the publishing
    /// session, for the No Local option.
    pub(crate) fn route(
        &self,
        mut message: Message,
        origin: Option<&str>,
    ) -> (Routed, Arc<Message>) {
        message.id = self.next_message_id.fetch_add(1, Ordering::Relaxed);
        self.stats.published.fetch_add(1, Ordering::Relaxed);
        let message = Arc::new(message);
        // One copy per session for its own subscriptions, at the highest
        // granted QoS, with every matching subscription id; one copy per
        // shared group, to one member.
        let mut direct: HashMap<ClientId, (Arc<Session>, Delivery)> = HashMap::new();
        let mut groups: HashMap<Arc<str>, Vec<Subscriber>> = HashMap::new();
        self.trie.read().matches(&message.topic, |key, sub| {
            if let Some(share) = &sub.share {
                groups.entry(share.clone()).or_default().push(sub.clone());
                return;
            }
            if sub.options.no_local && origin == Some(&*key.client) {
                return;
            }
            let d = delivery_for(sub, &message);
            direct
                .entry(key.client.clone())
                .and_modify(|(_, have)| {
                    have.qos = have.qos.max(d.qos);
                    have.retain |= d.retain;
                    have.subscription_ids.extend(&d.subscription_ids);
                })
                .or_insert_with(|| (sub.session.clone(), d));
        });
        let mut targets: Vec<(Arc<Session>, Delivery)> = direct.into_values().collect();
        for (share, members) in groups {
            if let Some(sub) = self.pick_member(&share, members) {
                targets.push((sub.session.clone(), delivery_for(&sub, &message)));
            }
        }
        (self.enqueue(message.clone(), targets), message)
    }

    /// Queue `message` for `targets`, as one batch for the store.
    pub(super) fn enqueue(
        &self,
        message: Arc<Message>,
        targets: Vec<(Arc<Session>, Delivery)>,
    ) -> Routed {
        self.enqueue_at(message, targets, None)
    }

    /// [`Core::enqueue`]; with `at = (gate, seq)`, at the sequence number
    /// `seq` that `gate` reserved (a retained message after SUBACK).
    pub(super) fn enqueue_at(
        &self,
        message: Arc<Message>,
        targets: Vec<(Arc<Session>, Delivery)>,
        at: Option<(Seq, Seq)>,
    ) -> Routed {
        let mut routed = Routed {
            ops: Vec::new(),
            pending: Vec::new(),
            matched: !targets.is_empty(),
        };
        let mut stored_targets = Vec::new();
        for (session, delivery) in targets {
            let client = &session.client_id;
            let mut st = session.lock();
            let store = st.persistent() && delivery.qos != QoS::AtMostOnce;
            let dropped_before = st.dropped();
            let entry = NewEntry {
                message: message.clone(),
                delivery: delivery.clone(),
                store,
            };
            let outcome = match at {
                None => st.enqueue(entry, &self.config, &mut routed.ops),
                Some((gate, seq)) => {
                    st.enqueue_reserved(entry, gate, seq, &self.config, &mut routed.ops)
                }
            };
            if st.dropped() > dropped_before {
                self.note_drop(client, &st, &message.topic);
            }
            if let Enqueued::Queued(seq) = outcome {
                if store {
                    stored_targets.push(QueueTarget {
                        client: client.clone(),
                        seq,
                        delivery,
                    });
                    routed.pending.push((session.clone(), seq));
                }
            }
            drop(st);
            session.wake.notify_one();
        }
        if !stored_targets.is_empty() {
            routed.ops.push(PacketOp::Enqueue {
                message,
                targets: stored_targets,
            });
        }
        routed
    }

    /// Choose the member of a shared subscription that gets the next message:
    /// round-robin over the members that are online (ordered by client id),
    /// or over all of them (persistent, offline) when none is.
    fn pick_member(&self, share: &Arc<str>, mut members: Vec<Subscriber>) -> Option<Subscriber> {
        if members.iter().any(|m| m.session.lock().is_online()) {
            members.retain(|m| m.session.lock().is_online());
        }
        if members.is_empty() {
            return None;
        }
        members.sort_by(|a, b| a.session.client_id.cmp(&b.session.client_id));
        let turn = {
            let mut cursors = self.share_cursors.lock();
            let c = cursors.entry(share.clone()).or_insert(0);
            *c = c.wrapping_add(1);
            *c
        };
        let i = turn % members.len();
        Some(members.swap_remove(i))
    }

    /// Whether a member of `share` other than `session` is online.
    pub(super) fn group_has_online_member(&self, share: &str, session: &Session) -> bool {
        let Ok(Some(parts)) = topic::parse_shared(share) else {
            return false;
        };
        let mut found = false;
        self.trie.read().subscribers(parts.filter, |key, sub| {
            found |= key.share.as_deref() == Some(share)
                && key.client != session.client_id
                && sub.session.lock().is_online();
        });
        found
    }

    /// Hand the shared-subscription entries of `from` whose group `select`
    /// accepts to other members of their groups, in one store batch that also
    /// removes them from `from` (so a crash leaves them in one place or the
    /// other). `in_flight` moves entries already sent too (the session is
    /// ending). An entry whose group has no other member left is dropped.
    pub(super) async fn redistribute(
        &self,
        from: &Arc<Session>,
        select: impl Fn(&str) -> bool,
        in_flight: bool,
    ) -> StorageResult<()> {
        let mut removals = Vec::new();
        // `select` may look at the trie: never call it with the session locked
        // (the trie is always locked before a session, never after).
        let groups = from.lock().shared_groups();
        let groups: Vec<String> = groups.into_iter().filter(|g| select(g)).collect();
        let taken: Vec<Entry> = {
            let mut st = from.lock();
            let mut taken = Vec::new();
            for g in groups {
                taken.extend(st.take_shared(Some(&g), in_flight, &mut removals));
            }
            taken
        };
        if taken.is_empty() {
            return Ok(());
        }
        let mut batch = Routed {
            ops: Vec::new(),
            pending: Vec::new(),
            matched: false,
        };
        let (mut moved, mut lost) = (0usize, 0usize);
        for e in taken {
            let Some(share) = e.delivery.share.as_deref() else {
                continue;
            };
            let share: Arc<str> = Arc::from(share);
            let Ok(Some(SharedFilter { filter, .. })) = topic::parse_shared(&share) else {
                continue;
            };
            let mut members = Vec::new();
            self.trie.read().subscribers(filter, |key, sub| {
                if key.share.as_deref() == Some(&*share) && key.client != from.client_id {
                    members.push(sub.clone());
                }
            });
            match self.pick_member(&share, members) {
                Some(sub) => {
                    let delivery = delivery_for(&sub, &e.message);
                    batch.absorb(self.enqueue(e.message, vec![(sub.session.clone(), delivery)]));
                    moved += 1;
                }
                None => lost += 1,
            }
        }
        batch.ops.extend(removals);
        if moved > 0 || lost > 0 {
            info!(client = %from.client_id, moved, dropped = lost, "shared subscription messages handed to other members");
        }
        self.commit(batch).await
    }

    /// Count and log a message a session's queue limits refused or evicted.
    fn note_drop(&self, client: &ClientId, st: &SessionState, topic: &str) {
        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        let reason = st.last_drop();
        self.stats.drops.bump(match reason {
            Some(DropReason::Bytes) => DropLabel::QueueBytes,
            _ => DropLabel::QueueFull,
        } as usize);
        self.events.emit_message(|| Event::MessageDropped {
            client_id: client.clone(),
            topic: topic.to_string(),
            reason: match reason {
                Some(DropReason::Bytes) => DropCause::QueueBytes,
                _ => DropCause::QueueFull,
            },
        });
        if reason == Some(DropReason::Bytes) {
            self.stats
                .dropped_bytes_limit
                .fetch_add(1, Ordering::Relaxed);
        }
        let dropped = st.dropped();
        // First drop and then every 1000th, so a full queue cannot flood the log.
        if dropped == 1 || dropped.is_multiple_of(1000) {
            warn!(
                client = %client,
                dropped,
                queued = st.queue_len(),
                queued_bytes = st.queued_bytes(),
                max_queued_messages = self.config.max_queued_messages,
                max_queued_bytes = self.config.max_queued_bytes,
                policy = ?self.config.overflow_policy,
                limit = ?reason,
                "session queue full: message dropped"
            );
        }
    }

    /// Accept `message` for routing: the one publish path of the broker,
    /// for clients (through their link), wills and the application alike.
    /// Updates the retained message, routes (so sequence numbers follow the
    /// caller's order), adds `extra` to the same store batch (a publisher's
    /// QoS 2 state), tells the event listeners, and submits the batch. The
    /// returned future resolves once the batch is durable.
    pub(crate) async fn publish(
        &self,
        message: Message,
        origin: &Origin,
        extra: Option<PacketOp>,
    ) -> StorageResult<Accepted> {
        if message.retain && self.config.retain_available {
            self.update_retained(&message).await?;
        }
        let publisher = match origin {
            Origin::Client(c) => {
                Stats::bump(&self.stats.received);
                self.stats.messages_in.bump(message.qos as usize);
                Some(c)
            }
            Origin::Will(c) => Some(c),
            Origin::Internal => None,
        };
        let (mut routed, message) = self.route(message, publisher.map(|c| &*c.client_id));
        routed.ops.extend(extra);
        self.events.emit_message(|| Event::Published {
            client: publisher.cloned(),
            message,
        });
        let matched = routed.matched;
        Ok(Accepted {
            matched,
            committed: self.commit(routed),
        })
    }
}

/// Put a session's subscription to `filter` in the trie: under the filter
/// itself, or under the inner filter of a shared subscription.
pub(super) fn insert_subscription(
    trie: &mut SubscriptionTree<SubscriberKey, Subscriber>,
    filter: &str,
    shared: Option<SharedFilter<'_>>,
    session: &Arc<Session>,
    options: &SubscriptionOptions,
) {
    let share: Option<Arc<str>> = shared.map(|_| Arc::from(filter));
    let key = SubscriberKey {
        client: session.client_id.clone(),
        share: share.clone(),
    };
    let subscriber = Subscriber {
        session: session.clone(),
        options: options.clone(),
        share,
    };
    trie.insert(shared.map_or(filter, |s| s.filter), key, subscriber);
}

/// Take a session's subscription to `filter` out of the trie.
pub(super) fn remove_subscription(
    trie: &mut SubscriptionTree<SubscriberKey, Subscriber>,
    filter: &str,
    client: &ClientId,
) {
    let shared = topic::parse_shared(filter).ok().flatten();
    let key = SubscriberKey {
        client: client.clone(),
        share: shared.map(|_| Arc::from(filter)),
    };
    trie.remove(shared.map_or(filter, |s| s.filter), &key);
}

/// How `message` goes to a subscriber: QoS capped by the grant, the retain
/// flag kept only with Retain As Published, the subscription's identifier.
pub(super) fn delivery_for(sub: &Subscriber, message: &Message) -> Delivery {
    Delivery {
        qos: sub.options.qos.min(message.qos),
        retain: message.retain && sub.options.retain_as_published,
        subscription_ids: sub.options.subscription_id.into_iter().collect(),
        share: sub.share.as_deref().map(str::to_owned),
    }
}

/// The store write of routed entries ended: on success release them for
/// delivery, on failure withdraw them (the publish is then not acknowledged).
pub(super) fn release(pending: &[(Arc<Session>, Seq)], committed: bool) {
    for (session, seq) in pending {
        {
            let mut st = session.lock();
            if committed {
                st.mark_ready(*seq);
            } else {
                st.withdraw(*seq);
            }
        }
        session.wake.notify_one();
    }
}
