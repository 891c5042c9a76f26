//! `broker migrate --from URL --to URL`: copy a storage to another backend
//! (any of memory, SQLite, Redis, MongoDB, either way) through the storage
//! traits alone, then read both back and compare.
//!
//! # What is copied, and how
//! 1. Sessions and their subscriptions: upserts, so a second run rewrites
//!    the same records.
//! 2. Queues, in groups of sessions read side by side one page each
//!    ([`Limits`]): every entry keeps its sequence number, delivery and
//!    state (a QoS 2 entry released by PUBREC stays released), and the
//!    entries of a group that share a body become one `Enqueue` with one
//!    target each, so the body is written once. A body met again in a later
//!    batch (the sessions sharing it were in different groups, or far apart
//!    in their queues) is enqueued again under the same id, which every
//!    backend takes as one more reference to the stored body (the storage
//!    contract's hand-over, checked by the conformance suite's
//!    `body_handed_over`): never a second copy. Incoming QoS 2 ids go with
//!    the last batch of their session. Memory stays bounded by one batch.
//! 3. Retained messages: upserts by topic, ids kept; then the wills a
//!    killed broker left (connections it held when it died), under their
//!    ids, in one batch, so that the broker started on the destination
//!    publishes them as the source's would have.
//! 4. The message id high-water mark: raised at the destination to the
//!    source's (and above every id copied), so ids a broker assigns later
//!    never name a stored body.
//! 5. Verification: sessions, subscriptions, every queue entry (body,
//!    delivery, state), incoming QoS 2 ids, retained messages and wills read back
//!    from both sides and compared; a difference fails the run, naming it.
//!
//! # Resuming
//! Each batch is atomic and a session's entries are written in sequence
//! order, so an interrupted run leaves each destination queue holding a
//! prefix of the source queue. A new run checks that the destination holds
//! nothing else (see [`Resume`]), then copies each queue from the entry
//! after its last one there. A destination holding anything the source
//! does not is refused before anything is written.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use broker_core::message::{Message, MessageId, QoS, Seq};
use broker_core::storage::{
    ClientId, Delivery, PacketOp, PacketState, QueueTarget, QueuedPacket, Storage, StoredSession,
};
use indicatif::{HumanBytes, HumanCount};

use crate::inspect::{lookup_all, open_offline};
use crate::storage_url;

mod progress;
mod verify;

pub use progress::Progress;
use verify::{difference, verify, Differences};

/// How much is read and written at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Entries of one queue read per `read_queue` call.
    pub page: usize,
    /// Sessions whose queues are copied side by side: the entries of a
    /// body queued for several of them at about the same place in their
    /// queues (a fan-out) meet in one batch and one `Enqueue`.
    pub sessions_per_group: usize,
    /// Payload bytes of new bodies after which a batch is written before
    /// the group's round of pages is over.
    pub batch_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            page: 256,
            sessions_per_group: 16,
            batch_bytes: 8 << 20,
        }
    }
}

/// What to migrate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Filters of the retained messages copied (and compared).
    pub retained_filters: Vec<String>,
    /// Batch sizes.
    pub limits: Limits,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            retained_filters: crate::settings::default_retained_filters(),
            limits: Limits::default(),
        }
    }
}

/// What a migration copied and verified.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Sessions at the source (and now at the destination).
    pub sessions: u64,
    /// Their subscriptions.
    pub subscriptions: u64,
    /// Queue entries written by this run.
    pub entries_copied: u64,
    /// Queue entries found at the destination already (an interrupted run's).
    pub entries_present: u64,
    /// Payload bytes of the bodies written by this run (each counted once per batch).
    pub payload_bytes: u64,
    /// Retained messages.
    pub retained: u64,
    /// Stored wills.
    pub wills: u64,
    /// Whether the destination held part of this migration already.
    pub resumed: bool,
}

/// The client and sequence number of the entry that raises the
/// destination's message id high-water mark: enqueued and removed in one
/// batch, so it is never seen. A sequence number the core never reaches
/// (it counts from 1, and stores keep them below 2^53).
const HIGH_WATER_CLIENT: &str = "$broker/migrate/high-water-mark";
const HIGH_WATER_SEQ: Seq = (1 << 53) - 1;

/// A request to stop (SIGINT, SIGTERM): the run stops between two batches,
/// so that the destination holds whole batches and the stores are closed
/// (leases released): the next run resumes at once.
#[derive(Debug, Default, Clone)]
pub struct Stop(Arc<AtomicBool>);

impl Stop {
    /// Never requested unless [`Stop::request`] is called.
    pub fn new() -> Stop {
        Stop::default()
    }

    /// Requested by the first SIGINT or SIGTERM.
    pub fn on_signals() -> anyhow::Result<Stop> {
        let stop = Stop::new();
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
            let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
            let flag = stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                flag.request();
            });
        }
        Ok(stop)
    }

    /// Stop at the next check.
    pub fn request(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub(crate) fn check(&self) -> anyhow::Result<()> {
        if self.0.load(Ordering::SeqCst) {
            bail!(
                "interrupted: the destination holds part of the migration; run the same \
                 command again to resume"
            );
        }
        Ok(())
    }
}

/// `broker migrate`: open both storages (refusing one a broker runs on),
/// copy, verify, and close them so that their leases are released.
pub async fn run(from: &str, to: &str, options: &Options) -> anyhow::Result<Summary> {
    if storage_url::same_storage(from, to) {
        bail!(
            "--from and --to name the same storage ({}): there is nothing to migrate",
            storage_url::redact(from)
        );
    }
    let started = Instant::now();
    let source = open_offline(from, "the source storage", "migrate", false).await?;
    let dest = match open_offline(to, "the destination storage", "migrate", true).await {
        Ok(dest) => dest,
        Err(e) => {
            source.close().await;
            return Err(e);
        }
    };
    let progress = Progress::stderr();
    let result = match Stop::on_signals() {
        Ok(stop) => migrate(&source.storage, &dest.storage, options, &progress, &stop).await,
        Err(e) => Err(e),
    };
    source.close().await;
    dest.close().await;
    let summary = result?;
    progress.line(&format!(
        "migrated {} to {} in {:.1} s",
        storage_url::redact(from),
        storage_url::redact(to),
        started.elapsed().as_secs_f64()
    ));
    Ok(summary)
}

/// Copy `from` to `to` and verify the copy; see the [module documentation](self).
pub async fn migrate(
    from: &Storage,
    to: &Storage,
    options: &Options,
    progress: &Progress,
    stop: &Stop,
) -> anyhow::Result<Summary> {
    let limits = &options.limits;
    anyhow::ensure!(
        limits.page > 0 && limits.sessions_per_group > 0,
        "page and group sizes must be at least 1"
    );
    let mut sessions = from
        .subscriptions
        .load_sessions()
        .await
        .context("cannot load the sessions of the source")?;
    sessions.sort_by(|a, b| a.record.client_id.cmp(&b.record.client_id));
    let retained = lookup_all(from, &options.retained_filters)
        .await
        .context("at the source")?;

    let resume = Resume::find(from, to, &sessions, &retained, options).await?;
    if !resume.fresh {
        progress.line(&format!(
            "the destination holds part of this migration ({} queued messages of {} sessions): \
             resuming",
            HumanCount(resume.present),
            resume.after.len()
        ));
    }
    let mut summary = Summary {
        sessions: sessions.len() as u64,
        subscriptions: sessions.iter().map(|s| s.subscriptions.len() as u64).sum(),
        entries_present: resume.present,
        retained: retained.len() as u64,
        resumed: !resume.fresh,
        ..Summary::default()
    };

    // Sessions and subscriptions: upserts.
    let mut phase = progress.phase("sessions", sessions.len() as u64, "sessions");
    for s in &sessions {
        stop.check()?;
        let id = &s.record.client_id;
        to.subscriptions
            .save_session(&s.record)
            .await
            .with_context(|| format!("cannot write session `{id}` to the destination"))?;
        if !s.subscriptions.is_empty() {
            to.subscriptions
                .add_subscriptions(id, &s.subscriptions)
                .await
                .with_context(|| {
                    format!("cannot write the subscriptions of `{id}` to the destination")
                })?;
        }
        phase.advance(1, String::new);
    }
    phase.finish(&format!(
        "{} sessions, {} subscriptions",
        HumanCount(summary.sessions),
        HumanCount(summary.subscriptions)
    ));

    // Queues.
    let mut phase = progress.phase("queued messages", sessions.len() as u64, "sessions");
    let mut copied = Copied::default();
    for group in sessions.chunks(limits.sessions_per_group) {
        copy_group(from, to, group, &resume, limits, &mut copied, stop).await?;
        phase.advance(group.len() as u64, || {
            format!(
                "{} entries, {}",
                HumanCount(copied.entries),
                HumanBytes(copied.bytes)
            )
        });
    }
    summary.entries_copied = copied.entries;
    summary.payload_bytes = copied.bytes;
    let secs = phase.started.elapsed().as_secs_f64().max(1e-3);
    let mut line = format!(
        "{} entries copied ({} of payload, {} entries/s)",
        HumanCount(copied.entries),
        HumanBytes(copied.bytes),
        HumanCount((copied.entries as f64 / secs) as u64)
    );
    if resume.present > 0 {
        line.push_str(&format!(", {} already there", HumanCount(resume.present)));
    }
    phase.finish(&line);

    // Retained messages: upserts by topic.
    let mut phase = progress.phase("retained", retained.len() as u64, "messages");
    for m in &retained {
        stop.check()?;
        to.retained.set_retained(m.clone()).await.with_context(|| {
            format!(
                "cannot write the retained message of `{}` to the destination",
                m.topic
            )
        })?;
        phase.advance(1, String::new);
    }
    phase.finish(&format!("{} messages", HumanCount(summary.retained)));

    // Wills: upserts by id, one batch (there is one per connection the
    // source's broker held when it stopped, at most).
    stop.check()?;
    let wills = from
        .packets
        .wills()
        .await
        .context("cannot read the wills of the source")?;
    summary.wills = wills.len() as u64;
    let will_high = wills.iter().map(|w| w.id()).max().unwrap_or(0);
    if !wills.is_empty() {
        let ops = wills
            .into_iter()
            .map(|will| PacketOp::StoreWill { will })
            .collect();
        to.packets
            .write(ops)
            .await
            .context("cannot write the wills to the destination")?;
        progress.line(&format!("wills: {}", HumanCount(summary.wills)));
    }

    let high = from
        .packets
        .last_message_id()
        .await
        .context("cannot read the last message id of the source")?
        .max(copied.max_id)
        .max(retained.iter().map(|m| m.id).max().unwrap_or(0))
        .max(will_high);
    raise_message_ids(to, high).await?;

    let phase = progress.phase("verify", sessions.len() as u64, "sessions");
    verify(from, to, &sessions, options, phase, stop).await?;
    Ok(summary)
}

/// Where an interrupted run stopped, found by reading the destination.
#[derive(Debug, Default)]
pub struct Resume {
    /// The destination was empty: nothing to compare.
    fresh: bool,
    /// Per session, the sequence number of the last entry already copied.
    after: HashMap<String, Seq>,
    /// Entries already copied.
    present: u64,
}

impl Resume {
    /// Accept the destination if it is empty, or if everything it holds is
    /// also at the source (what an interrupted run of this migration
    /// leaves: some sessions and subscriptions, queues holding a prefix of
    /// the source's, some retained messages); refuse it otherwise, before
    /// anything is written, listing what differs.
    async fn find(
        from: &Storage,
        to: &Storage,
        sessions: &[StoredSession],
        retained: &[Arc<Message>],
        options: &Options,
    ) -> anyhow::Result<Resume> {
        let dest_sessions = to
            .subscriptions
            .load_sessions()
            .await
            .context("cannot load the sessions of the destination")?;
        let dest_retained = lookup_all(to, &options.retained_filters)
            .await
            .context("at the destination")?;
        let dest_last = to
            .packets
            .last_message_id()
            .await
            .context("cannot read the last message id of the destination")?;
        // Every stored entry raised the high-water mark: none at 0.
        if dest_sessions.is_empty() && dest_retained.is_empty() && dest_last == 0 {
            return Ok(Resume {
                fresh: true,
                ..Resume::default()
            });
        }
        let mut foreign = Differences::default();
        let by_id: HashMap<&str, &StoredSession> = sessions
            .iter()
            .map(|s| (s.record.client_id.as_str(), s))
            .collect();
        for d in &dest_sessions {
            let id = &d.record.client_id;
            match by_id.get(id.as_str()) {
                None => foreign.push(format!("session `{id}` is not at the source")),
                Some(s) if s.record != d.record => foreign.push(format!(
                    "session `{id}` has another expiry or time of disconnect than at the source"
                )),
                Some(s) => {
                    for sub in &d.subscriptions {
                        if !s.subscriptions.contains(sub) {
                            foreign.push(format!(
                                "subscription `{}` of `{id}` is not the source's",
                                sub.filter
                            ));
                        }
                    }
                }
            }
        }
        let source_retained: HashMap<&str, &Message> =
            retained.iter().map(|m| (m.topic.as_str(), &**m)).collect();
        for m in &dest_retained {
            if source_retained.get(m.topic.as_str()) != Some(&&**m) {
                foreign.push(format!(
                    "the retained message of `{}` is not the source's",
                    m.topic
                ));
            }
        }
        let mut resume = Resume::default();
        for s in sessions {
            if foreign.full() {
                break;
            }
            let id = &s.record.client_id;
            match queue_prefix(from, to, id, options.limits.page).await? {
                Ok((Some(last), n)) => {
                    resume.after.insert(id.clone(), last);
                    resume.present += n;
                }
                Ok((None, _)) => {}
                Err(why) => foreign.push(why),
            }
            let at_source = from
                .packets
                .incoming_qos2(id)
                .await
                .with_context(|| format!("cannot read the incoming QoS 2 ids of `{id}`"))?;
            let at_dest = to.packets.incoming_qos2(id).await.with_context(|| {
                format!("cannot read the incoming QoS 2 ids of `{id}` at the destination")
            })?;
            for p in at_dest {
                if !at_source.contains(&p) {
                    foreign.push(format!(
                        "incoming QoS 2 id {p} of `{id}` is not the source's"
                    ));
                }
            }
        }
        if !foreign.is_empty() {
            bail!(
                "the destination is not empty and holds what this migration did not write \
                 (it may only hold what an interrupted run of the same migration left):{}\n\
                 migrate to an empty storage (a new SQLite file, another Redis prefix, another \
                 MongoDB database), or empty this one first",
                foreign.list()
            );
        }
        Ok(resume)
    }
}

/// The last sequence number and length of `client`'s queue at the
/// destination, if it is the beginning of the source's queue; else what
/// differs.
async fn queue_prefix(
    from: &Storage,
    to: &Storage,
    client: &str,
    page: usize,
) -> anyhow::Result<Result<(Option<Seq>, u64), String>> {
    let (mut after, mut count) = (None, 0u64);
    loop {
        let there = to
            .packets
            .read_queue(client, after, page)
            .await
            .with_context(|| format!("cannot read the queue of `{client}` at the destination"))?;
        let Some(last) = there.last().map(|p| p.seq) else {
            break;
        };
        let here = from
            .packets
            .read_queue(client, after, there.len())
            .await
            .with_context(|| format!("cannot read the queue of `{client}` at the source"))?;
        for (i, d) in there.iter().enumerate() {
            match here.get(i) {
                Some(s) if s == d => {}
                Some(s) => {
                    return Ok(Err(format!(
                        "queue of `{client}`: entry {} at the destination is not the source's ({})",
                        d.seq,
                        difference(s, d)
                    )))
                }
                None => {
                    return Ok(Err(format!(
                    "queue of `{client}` holds more entries at the destination than at the source"
                )))
                }
            }
        }
        count += there.len() as u64;
        after = Some(last);
        if there.len() < page {
            break;
        }
    }
    Ok(Ok((after, count)))
}

/// Totals of the queue phase.
#[derive(Debug, Default)]
struct Copied {
    entries: u64,
    bytes: u64,
    max_id: MessageId,
}

/// Copy the queues (and incoming QoS 2 ids) of `group`, one page of each
/// session per round, each round one batch (or more, past the byte limit).
async fn copy_group(
    from: &Storage,
    to: &Storage,
    group: &[StoredSession],
    resume: &Resume,
    limits: &Limits,
    copied: &mut Copied,
    stop: &Stop,
) -> anyhow::Result<()> {
    struct Cursor {
        client: ClientId,
        after: Option<Seq>,
        done: bool,
    }
    let mut cursors: Vec<Cursor> = group
        .iter()
        .map(|s| Cursor {
            client: s.record.client_id.as_str().into(),
            after: resume.after.get(&s.record.client_id).copied(),
            done: false,
        })
        .collect();
    let mut batch = Batch::default();
    while cursors.iter().any(|c| !c.done) {
        for c in cursors.iter_mut().filter(|c| !c.done) {
            let page = from
                .packets
                .read_queue(&c.client, c.after, limits.page)
                .await
                .with_context(|| {
                    format!("cannot read the queue of `{}` at the source", c.client)
                })?;
            c.done = page.len() < limits.page;
            if let Some(last) = page.last() {
                c.after = Some(last.seq);
            }
            for p in page {
                batch.add(&c.client, p)?;
            }
            if c.done {
                let ids = from
                    .packets
                    .incoming_qos2(&c.client)
                    .await
                    .with_context(|| {
                        format!("cannot read the incoming QoS 2 ids of `{}`", c.client)
                    })?;
                batch.incoming_qos2(&c.client, ids);
            }
            if batch.bytes >= limits.batch_bytes {
                stop.check()?;
                batch.write(to, copied).await?;
            }
        }
        stop.check()?;
        batch.write(to, copied).await?;
    }
    Ok(())
}

/// One write to the destination: an `Enqueue` per body with its targets,
/// then the states and incoming QoS 2 ids.
#[derive(Default)]
struct Batch {
    enqueues: Vec<(Arc<Message>, Vec<QueueTarget>)>,
    by_id: HashMap<MessageId, usize>,
    after: Vec<PacketOp>,
    entries: u64,
    bytes: u64,
}

impl Batch {
    fn add(&mut self, client: &ClientId, p: QueuedPacket) -> anyhow::Result<()> {
        if p.message.id == 0 {
            bail!(
                "queue of `{client}`: entry {} references message id 0, which no store accepts",
                p.seq
            );
        }
        let target = QueueTarget {
            client: client.clone(),
            seq: p.seq,
            delivery: p.delivery,
        };
        match self.by_id.get(&p.message.id) {
            Some(&i) => self.enqueues[i].1.push(target),
            None => {
                self.by_id.insert(p.message.id, self.enqueues.len());
                self.bytes += p.message.payload.len() as u64;
                self.enqueues.push((p.message, vec![target]));
            }
        }
        // Enqueue writes entries as queued; a later state is set after it.
        if p.state != PacketState::Queued {
            self.after.push(PacketOp::SetState {
                client: client.clone(),
                seq: p.seq,
                state: p.state,
            });
        }
        self.entries += 1;
        Ok(())
    }

    fn incoming_qos2(&mut self, client: &ClientId, ids: Vec<u16>) {
        self.after.extend(
            ids.into_iter()
                .map(|packet_id| PacketOp::IncomingQos2Received {
                    client: client.clone(),
                    packet_id,
                }),
        );
    }

    async fn write(&mut self, to: &Storage, copied: &mut Copied) -> anyhow::Result<()> {
        if self.enqueues.is_empty() && self.after.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(self);
        let mut ops = Vec::with_capacity(batch.enqueues.len() + batch.after.len());
        for (message, targets) in batch.enqueues {
            copied.max_id = copied.max_id.max(message.id);
            ops.push(PacketOp::Enqueue { message, targets });
        }
        ops.extend(batch.after);
        to.packets.write(ops).await.with_context(|| {
            format!(
                "cannot write a batch of {} queue entries to the destination",
                batch.entries
            )
        })?;
        copied.entries += batch.entries;
        copied.bytes += batch.bytes;
        Ok(())
    }
}

/// Raise the destination's message id high-water mark to `high` if it is
/// below. The storage traits have no operation for that alone, so an
/// entry of id `high` is enqueued and removed in one batch: every backend
/// counts the id (the conformance suite's `batch_order` and
/// `last_message_id_monotonic`) and keeps nothing of the entry.
async fn raise_message_ids(to: &Storage, high: MessageId) -> anyhow::Result<()> {
    let read = || async {
        to.packets
            .last_message_id()
            .await
            .context("cannot read the last message id of the destination")
    };
    if read().await? >= high {
        return Ok(());
    }
    let client: ClientId = HIGH_WATER_CLIENT.into();
    let mut placeholder = Message::new(HIGH_WATER_CLIENT, "", QoS::AtLeastOnce, false);
    placeholder.id = high;
    to.packets
        .write(vec![
            PacketOp::Enqueue {
                message: Arc::new(placeholder),
                targets: vec![QueueTarget {
                    client: client.clone(),
                    seq: HIGH_WATER_SEQ,
                    delivery: Delivery::new(QoS::AtLeastOnce),
                }],
            },
            PacketOp::Remove {
                client,
                seq: HIGH_WATER_SEQ,
            },
        ])
        .await
        .context("cannot raise the message id high-water mark of the destination")?;
    let now = read().await?;
    if now < high {
        bail!("the destination's last message id stays at {now}, below the source's {high}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use broker_core::storage::{SessionRecord, SubscriptionRecord};
    use broker_core::subscription::SubscriptionOptions;
    use storage_memory::MemoryStore;

    fn message(id: MessageId, topic: &str) -> Arc<Message> {
        let mut m = Message::new(topic, format!("payload {id}"), QoS::ExactlyOnce, false);
        m.id = id;
        Arc::new(m)
    }

    fn target(client: &str, seq: Seq) -> QueueTarget {
        QueueTarget {
            client: client.into(),
            seq,
            delivery: Delivery::new(QoS::AtLeastOnce),
        }
    }

    /// Sessions a, b, c; a body shared by all three at different places of
    /// their queues, one shared by a and c only, an entry released after
    /// PUBREC, incoming QoS 2 ids, retained messages on `#` and `$SYS`
    /// topics, and a last message id above every stored body (its message
    /// was acknowledged).
    async fn source() -> (Arc<MemoryStore>, Storage) {
        let store = Arc::new(MemoryStore::new());
        let s = store.storage();
        for (id, filter) in [("a", "t/a"), ("b", "t/b"), ("c", "t/#")] {
            s.subscriptions
                .save_session(&SessionRecord {
                    client_id: id.into(),
                    expiry_secs: Some(3600),
                    disconnected_at_ms: Some(1_700_000_000_000),
                })
                .await
                .expect("session");
            s.subscriptions
                .add_subscriptions(
                    id,
                    &[SubscriptionRecord {
                        filter: filter.into(),
                        options: SubscriptionOptions::new(QoS::ExactlyOnce),
                    }],
                )
                .await
                .expect("subscriptions");
        }
        let mut ops = Vec::new();
        let mut next = 1;
        for seq in 1..=20u64 {
            for client in ["a", "b", "c"] {
                ops.push(PacketOp::Enqueue {
                    message: message(next, &format!("t/{client}")),
                    targets: vec![target(client, seq)],
                });
                next += 1;
            }
        }
        // Shared by all three, at a's 21st, b's 25th and c's 30th place.
        ops.push(PacketOp::Enqueue {
            message: message(100, "t/all"),
            targets: vec![target("a", 21), target("b", 25), target("c", 30)],
        });
        ops.push(PacketOp::Enqueue {
            message: message(101, "t/ac"),
            targets: vec![target("a", 22), target("c", 31)],
        });
        ops.push(PacketOp::Enqueue {
            message: message(102, "t/gone"),
            targets: vec![target("b", 26)],
        });
        ops.push(PacketOp::Remove {
            client: "b".into(),
            seq: 26,
        });
        ops.push(PacketOp::SetState {
            client: "a".into(),
            seq: 2,
            state: PacketState::Released { packet_id: 7 },
        });
        ops.push(PacketOp::IncomingQos2Received {
            client: "b".into(),
            packet_id: 42,
        });
        // A will of a connection the source's broker held when it stopped,
        // its id above every body's.
        ops.push(PacketOp::StoreWill {
            will: broker_core::storage::StoredWill {
                client: "a".into(),
                message: message(500, "wills/a"),
                expiry_secs: Some(60),
                delay_secs: 5,
            },
        });
        s.packets.write(ops).await.expect("queues");
        s.retained
            .set_retained(message(103, "r/1"))
            .await
            .expect("retained");
        s.retained
            .set_retained(message(0, "$SYS/broker/id"))
            .await
            .expect("retained");
        (store, s)
    }

    fn small() -> Options {
        Options {
            limits: Limits {
                page: 4,
                sessions_per_group: 2,
                batch_bytes: 64,
            },
            ..Options::default()
        }
    }

    #[tokio::test]
    async fn copies_everything_with_each_body_once() {
        let (src_store, from) = source().await;
        let dest_store = Arc::new(MemoryStore::new());
        let to = dest_store.storage();
        let s = migrate(&from, &to, &small(), &Progress::quiet(), &Stop::new())
            .await
            .expect("migrate");
        assert_eq!((s.sessions, s.subscriptions, s.retained), (3, 3, 2));
        assert_eq!(s.entries_copied, 60 + 3 + 2);
        assert!(!s.resumed);
        assert_eq!(s.wills, 1);
        assert_eq!(
            to.packets.wills().await.expect("wills"),
            from.packets.wills().await.expect("wills")
        );
        assert!(to.packets.last_message_id().await.expect("last id") >= 500);
        assert_eq!(dest_store.stored_bodies(), src_store.stored_bodies());
        assert_eq!(dest_store.queued_packets(), src_store.queued_packets());
        assert!(to.packets.last_message_id().await.expect("last id") >= 103);
        let a = to.packets.read_queue("a", Some(1), 1).await.expect("a");
        assert_eq!(a[0].state, PacketState::Released { packet_id: 7 });
        assert_eq!(to.packets.incoming_qos2("b").await.expect("qos2"), [42]);

        // Every reference counted: the shared body stays until its last entry goes.
        for (client, seq) in [("a", 21), ("b", 25)] {
            to.packets
                .write(vec![PacketOp::Remove {
                    client: client.into(),
                    seq,
                }])
                .await
                .expect("ack");
        }
        let c = to.packets.read_queue("c", Some(29), 1).await.expect("c");
        assert_eq!(c[0].message.id, 100);
        let before = dest_store.stored_bodies();
        to.packets
            .write(vec![PacketOp::Remove {
                client: "c".into(),
                seq: 30,
            }])
            .await
            .expect("ack");
        assert_eq!(dest_store.stored_bodies(), before - 1);

        // Run again over the finished copy: resumed, nothing to write.
        let fresh = Arc::new(MemoryStore::new()).storage();
        migrate(&from, &fresh, &small(), &Progress::quiet(), &Stop::new())
            .await
            .expect("first");
        let again = migrate(&from, &fresh, &small(), &Progress::quiet(), &Stop::new())
            .await
            .expect("second");
        assert!(again.resumed);
        assert_eq!(again.entries_copied, 0);
        assert_eq!(again.entries_present, 65);
    }

    #[tokio::test]
    async fn resumes_after_a_prefix_and_refuses_anything_else() {
        let (src_store, from) = source().await;
        let dest_store = Arc::new(MemoryStore::new());
        let to = dest_store.storage();
        // What an interrupted run leaves: all sessions, a's first 10 entries.
        for s in from.subscriptions.load_sessions().await.expect("sessions") {
            to.subscriptions
                .save_session(&s.record)
                .await
                .expect("session");
        }
        let first = from.packets.read_queue("a", None, 10).await.expect("a");
        let mut batch = Batch::default();
        for p in first {
            batch.add(&"a".into(), p).expect("add");
        }
        batch
            .write(&to, &mut Copied::default())
            .await
            .expect("write");
        let s = migrate(&from, &to, &small(), &Progress::quiet(), &Stop::new())
            .await
            .expect("resume");
        assert!(s.resumed);
        assert_eq!((s.entries_present, s.entries_copied), (10, 55));
        assert_eq!(dest_store.stored_bodies(), src_store.stored_bodies());

        // A stop requested: nothing more is written, and the next run completes.
        let to = Arc::new(MemoryStore::new()).storage();
        let stop = Stop::new();
        stop.request();
        let e = migrate(&from, &to, &small(), &Progress::quiet(), &stop)
            .await
            .expect_err("stopped");
        assert!(
            format!("{e:#}").contains("run the same command again"),
            "{e:#}"
        );
        let s = migrate(&from, &to, &small(), &Progress::quiet(), &Stop::new())
            .await
            .expect("after the stop");
        assert_eq!(s.entries_copied, 65);

        // A destination with a session of its own is refused, unchanged.
        let other = Arc::new(MemoryStore::new());
        let to = other.storage();
        to.subscriptions
            .save_session(&SessionRecord {
                client_id: "stranger".into(),
                expiry_secs: None,
                disconnected_at_ms: None,
            })
            .await
            .expect("session");
        let e = migrate(&from, &to, &small(), &Progress::quiet(), &Stop::new())
            .await
            .expect_err("refused");
        let e = format!("{e:#}");
        assert!(e.contains("session `stranger` is not at the source"), "{e}");
        assert_eq!(other.queued_packets(), 0);
        assert_eq!(to.subscriptions.load_sessions().await.expect("s").len(), 1);
    }
}
