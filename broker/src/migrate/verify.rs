//! The last phase of `broker migrate`: both stores read back and compared.

use std::collections::{HashMap, HashSet, VecDeque};

use anyhow::{bail, Context};
use broker_core::message::Seq;
use broker_core::storage::{QueuedPacket, Storage, StoredSession};
use indicatif::HumanCount;

use super::progress::Phase;
use super::{Options, Stop};
use crate::inspect::lookup_all;

/// Differences listed in an error before the rest are only counted.
const MAX_LISTED: usize = 10;

/// Read both stores back and compare them: any difference is an error
/// naming it (the first ones, and how many).
pub(super) async fn verify(
    from: &Storage,
    to: &Storage,
    sessions: &[StoredSession],
    options: &Options,
    mut phase: Phase<'_>,
    stop: &Stop,
) -> anyhow::Result<()> {
    let mut diffs = Differences::default();
    let dest_sessions = to
        .subscriptions
        .load_sessions()
        .await
        .context("cannot load the sessions of the destination")?;
    if dest_sessions.len() != sessions.len() {
        diffs.push(format!(
            "{} sessions at the source, {} at the destination",
            sessions.len(),
            dest_sessions.len()
        ));
    }
    let dest_by_id: HashMap<&str, &StoredSession> = dest_sessions
        .iter()
        .map(|s| (s.record.client_id.as_str(), s))
        .collect();
    let source_ids: HashSet<&str> = sessions
        .iter()
        .map(|s| s.record.client_id.as_str())
        .collect();
    for d in &dest_sessions {
        if !source_ids.contains(d.record.client_id.as_str()) {
            diffs.push(format!(
                "session `{}` is at the destination only",
                d.record.client_id
            ));
        }
    }
    let (mut subscriptions, mut entries) = (0u64, 0u64);
    for s in sessions {
        stop.check()?;
        let id = &s.record.client_id;
        subscriptions += s.subscriptions.len() as u64;
        match dest_by_id.get(id.as_str()) {
            None => diffs.push(format!("session `{id}` is missing at the destination")),
            Some(d) => {
                if d.record != s.record {
                    diffs.push(format!(
                        "session `{id}`: {:?} at the source, {:?} at the destination",
                        s.record, d.record
                    ));
                }
                let sorted = |subs: &[broker_core::storage::SubscriptionRecord]| {
                    let mut v: Vec<_> = subs
                        .iter()
                        .map(|x| (x.filter.clone(), x.options.clone()))
                        .collect();
                    v.sort_by(|a, b| a.0.cmp(&b.0));
                    v
                };
                let (a, b) = (sorted(&s.subscriptions), sorted(&d.subscriptions));
                if a != b {
                    diffs.push(format!(
                        "session `{id}`: {} subscriptions at the source, {} at the destination{}",
                        a.len(),
                        b.len(),
                        if a.len() == b.len() {
                            " (with other filters or options)"
                        } else {
                            ""
                        }
                    ));
                }
            }
        }
        let q = compare_queues(from, to, id, options.limits.page).await?;
        entries += q.source;
        if q.source != q.dest {
            diffs.push(format!(
                "queue of `{id}`: {} entries at the source, {} at the destination",
                q.source, q.dest
            ));
        } else if let Some(first) = q.first_difference {
            diffs.push(format!("queue of `{id}`: {first}"));
        }
        let mut a = from
            .packets
            .incoming_qos2(id)
            .await
            .with_context(|| format!("cannot read the incoming QoS 2 ids of `{id}`"))?;
        let mut b = to.packets.incoming_qos2(id).await.with_context(|| {
            format!("cannot read the incoming QoS 2 ids of `{id}` at the destination")
        })?;
        a.sort_unstable();
        b.sort_unstable();
        if a != b {
            diffs.push(format!(
                "incoming QoS 2 ids of `{id}`: {a:?} at the source, {b:?} at the destination"
            ));
        }
        phase.advance(1, || format!("{} entries", HumanCount(entries)));
    }
    let a = lookup_all(from, &options.retained_filters)
        .await
        .context("at the source")?;
    let b = lookup_all(to, &options.retained_filters)
        .await
        .context("at the destination")?;
    if a.len() != b.len() {
        diffs.push(format!(
            "{} retained messages at the source, {} at the destination",
            a.len(),
            b.len()
        ));
    } else if let Some((x, _)) = a.iter().zip(&b).find(|(x, y)| x != y) {
        diffs.push(format!(
            "the retained message of `{}` differs at the destination",
            x.topic
        ));
    }
    let wills = from
        .packets
        .wills()
        .await
        .context("cannot read the wills of the source")?;
    let dest_wills = to
        .packets
        .wills()
        .await
        .context("cannot read the wills of the destination")?;
    if wills != dest_wills {
        diffs.push(format!(
            "{} wills at the source, {} at the destination, not the same",
            wills.len(),
            dest_wills.len()
        ));
    }
    let (src_last, dest_last) = (
        from.packets
            .last_message_id()
            .await
            .context("cannot read the last message id of the source")?,
        to.packets
            .last_message_id()
            .await
            .context("cannot read the last message id of the destination")?,
    );
    if dest_last < src_last {
        diffs.push(format!(
            "last message id {dest_last} at the destination, below the source's {src_last}"
        ));
    }
    if !diffs.is_empty() {
        phase.bar.abandon();
        bail!(
            "verification failed: the destination differs from the source:{}",
            diffs.list()
        );
    }
    phase.finish(&format!(
        "{} sessions, {} subscriptions, {} queued messages, {} retained messages, {} wills, \
         last message id {dest_last}: the destination matches the source",
        HumanCount(sessions.len() as u64),
        HumanCount(subscriptions),
        HumanCount(entries),
        HumanCount(a.len() as u64),
        HumanCount(wills.len() as u64)
    ));
    Ok(())
}

/// Both sides of one queue, compared entry by entry.
pub(super) struct QueueComparison {
    source: u64,
    dest: u64,
    first_difference: Option<String>,
}

pub(super) async fn compare_queues(
    from: &Storage,
    to: &Storage,
    client: &str,
    page: usize,
) -> anyhow::Result<QueueComparison> {
    /// One side, read a page at a time.
    struct Side<'a> {
        storage: &'a Storage,
        name: &'static str,
        after: Option<Seq>,
        buffer: VecDeque<QueuedPacket>,
        done: bool,
    }
    impl Side<'_> {
        async fn next(
            &mut self,
            client: &str,
            page: usize,
        ) -> anyhow::Result<Option<QueuedPacket>> {
            if self.buffer.is_empty() && !self.done {
                let got = self
                    .storage
                    .packets
                    .read_queue(client, self.after, page)
                    .await
                    .with_context(|| {
                        format!("cannot read the queue of `{client}` at the {}", self.name)
                    })?;
                self.done = got.len() < page;
                self.after = got.last().map(|p| p.seq).or(self.after);
                self.buffer.extend(got);
            }
            Ok(self.buffer.pop_front())
        }
    }
    let side = |storage, name| Side {
        storage,
        name,
        after: None,
        buffer: VecDeque::new(),
        done: false,
    };
    let (mut a, mut b) = (side(from, "source"), side(to, "destination"));
    let mut out = QueueComparison {
        source: 0,
        dest: 0,
        first_difference: None,
    };
    loop {
        match (a.next(client, page).await?, b.next(client, page).await?) {
            (None, None) => return Ok(out),
            (Some(x), Some(y)) => {
                out.source += 1;
                out.dest += 1;
                if out.first_difference.is_none() && x != y {
                    out.first_difference = Some(format!(
                        "entry {} at the source: {}",
                        x.seq,
                        difference(&x, &y)
                    ));
                }
            }
            (Some(_), None) => out.source += 1,
            (None, Some(_)) => out.dest += 1,
        }
    }
}

/// What differs between two queue entries, in words.
pub(super) fn difference(a: &QueuedPacket, b: &QueuedPacket) -> String {
    let mut what = Vec::new();
    if a.seq != b.seq {
        what.push(format!("sequence number {} against {}", a.seq, b.seq));
    }
    if a.message.id != b.message.id {
        what.push(format!(
            "message id {} against {}",
            a.message.id, b.message.id
        ));
    } else if a.message != b.message {
        what.push(format!("the body of message {} differs", a.message.id));
    }
    if a.delivery != b.delivery {
        what.push("the delivery (QoS, retain flag, subscription ids, share) differs".to_owned());
    }
    if a.state != b.state {
        what.push(format!("state {:?} against {:?}", a.state, b.state));
    }
    what.join(", ")
}

/// Differences found, the first [`MAX_LISTED`] in words.
#[derive(Default)]
pub(super) struct Differences {
    listed: Vec<String>,
    more: usize,
}

impl Differences {
    pub(super) fn push(&mut self, what: String) {
        if self.listed.len() < MAX_LISTED {
            self.listed.push(what);
        } else {
            self.more += 1;
        }
    }
    pub(super) fn is_empty(&self) -> bool {
        self.listed.is_empty()
    }
    pub(super) fn full(&self) -> bool {
        self.listed.len() >= MAX_LISTED
    }
    pub(super) fn list(&self) -> String {
        let mut s: String = self.listed.iter().map(|d| format!("\n  - {d}")).collect();
        if self.more > 0 {
            s.push_str(&format!("\n  - and {} more", self.more));
        }
        s
    }
}
