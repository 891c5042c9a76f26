//! The two roles every scenario is made of: a publisher and a subscriber,
//! each one task (plus an acknowledgement reader for publishers) on its own
//! connection, and the shared counters the progress line and the scenarios'
//! stop conditions read.
//!
//! **Publisher.** Sends its streams' messages round-robin, numbering each
//! stream 0, 1, 2, ... and stamping the send time into the payload when the
//! PUBLISH is encoded. Up to 64 publishes are encoded into one buffer and
//! written with one socket write. How many it may send is bounded by
//!
//! - the in-flight window (QoS 1/2): at most `--inflight` publishes awaiting
//!   PUBACK / PUBCOMP. Without a window a QoS 1 publisher either waits for
//!   each PUBACK (and measures one network round trip per message, not the
//!   broker) or sends without bound (and measures how fast the broker's
//!   queues grow). A window is also what real clients do (MQTT 5 Receive
//!   Maximum, Mosquitto's `max_inflight_messages`), and with a few publishers
//!   it keeps the broker busy while bounding what is queued in it;
//! - the rate (fixed-rate runs): a 1 ms ticker, and on each tick the publisher
//!   sends what its share of `--rate` says should have been sent since it
//!   started; so the total rate is right even when one tick carries a fraction
//!   of a message, and a publisher held back by its window catches up;
//! - the stop signal or, for `persistent`, a message count.
//!
//! A flat-out QoS 0 publisher has no window; it yields to the other tasks after
//! each batch and is held back only by TCP.
//!
//! After the stop it keeps answering PUBRECs with PUBREL and waits until
//! nothing is in flight (or the scenario gives up), then disconnects.
//!
//! **Subscriber.** Reads deliveries, records each in its
//! [`SubscriberStats`], and acknowledges them (PUBACK; or PUBREC and PUBCOMP
//! once PUBREL comes). Acknowledgements are buffered while more packets are
//! already in the read buffer and written when the burst is done.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use bytestring::ByteString;
use rmqtt_codec::v3;
use tokio::sync::{mpsc, Notify};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::client::{self, ack_for, wire_qos, Connection, Window};
use super::payload::{self, PayloadWriter};
use super::stats::{Arrival, BitSet, StreamSent, SubscriberStats};

/// Counters shared by all tasks of a run, for progress and stop conditions.
#[derive(Debug, Default)]
pub struct Live {
    /// What the run is doing, for the progress line.
    pub phase: Mutex<&'static str>,
    /// Publishes written.
    pub sent: AtomicU64,
    /// Publishes acknowledged by the broker.
    pub acked: AtomicU64,
    /// Deliveries received, duplicates included.
    pub delivered: AtomicU64,
    /// Deliveries of a sequence the subscriber had not seen yet.
    pub distinct: AtomicU64,
    /// Deliveries the publishes written so far should cause.
    pub expected: AtomicU64,
    /// Publishers that have stopped and have nothing in flight.
    pub publishers_done: AtomicU64,
    /// Open connections (`conn`).
    pub connected: AtomicU64,
}

impl Live {
    /// Set the phase shown by the progress line.
    pub fn set_phase(&self, p: &'static str) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = p;
    }

    /// The current phase.
    pub fn phase(&self) -> &'static str {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// When to stop and which deliveries count.
#[derive(Debug)]
pub struct Control {
    /// Publishers stop sending.
    pub stop: CancellationToken,
    /// Everybody stops waiting: publishers for acknowledgements, subscribers
    /// for deliveries.
    pub finish: CancellationToken,
    /// Start of the measured window, ns since the payload epoch.
    pub window_start_ns: u64,
    /// End of the measured window; lowered when a run is stopped early.
    pub window_end_ns: AtomicU64,
}

impl Control {
    /// A control whose measured window is `[start, end)`.
    pub fn new(start: Instant, end: Instant) -> Control {
        Control {
            stop: CancellationToken::new(),
            finish: CancellationToken::new(),
            window_start_ns: payload::ns_since_epoch(start),
            window_end_ns: AtomicU64::new(payload::ns_since_epoch(end)),
        }
    }

    fn in_window(&self, ns: u64) -> bool {
        ns >= self.window_start_ns && ns < self.window_end_ns.load(Relaxed)
    }
}

/// End-to-end flow control for one stream: how far each of its subscribers
/// has got, so that its publisher can stay at most `--backlog` messages ahead
/// of the slowest one.
#[derive(Debug)]
pub struct Gate {
    /// Per receiving subscriber: highest sequence received + 1.
    receivers: Vec<AtomicU64>,
    waiting: AtomicBool,
    notify: Notify,
}

impl Gate {
    /// A gate for a stream with `receivers` subscribers.
    pub fn new(receivers: usize) -> Gate {
        Gate {
            receivers: (0..receivers).map(|_| AtomicU64::new(0)).collect(),
            waiting: AtomicBool::new(false),
            notify: Notify::new(),
        }
    }

    /// How far the slowest receiver has got (`u64::MAX` without receivers).
    pub fn slowest(&self) -> u64 {
        self.receivers
            .iter()
            .map(|r| r.load(Relaxed))
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Receiver `slot` has received sequence `seq`.
    pub fn advance(&self, slot: usize, seq: u64) {
        if let Some(r) = self.receivers.get(slot) {
            r.fetch_max(seq + 1, Relaxed);
            if self.waiting.load(Relaxed) {
                self.notify.notify_one();
            }
        }
    }
}

/// A subscriber's place in a stream's [`Gate`]: the gate and its slot.
pub type GateSlot = Option<(Arc<Gate>, usize)>;

/// One stream of a publisher.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    /// Stream id (index into the run's streams).
    pub id: u32,
    /// Topic it publishes to.
    pub topic: ByteString,
    /// Subscribers that receive it.
    pub fanout: u64,
    /// End-to-end flow control, when the run has it.
    pub gate: Option<Arc<Gate>>,
}

/// What a publisher does.
#[derive(Debug, Clone)]
pub struct PublisherSpec {
    /// Its streams, published round-robin.
    pub streams: Vec<StreamSpec>,
    /// QoS of its publishes.
    pub qos: u8,
    /// Payload size.
    pub payload: usize,
    /// Run tag for the payloads.
    pub run: u32,
    /// Messages per second for this publisher; 0 = flat out.
    pub rate: f64,
    /// Stop after this many messages.
    pub limit: Option<u64>,
    /// In-flight window (QoS 1/2).
    pub inflight: usize,
    /// How many messages a stream may be ahead of its slowest subscriber
    /// (with a [`Gate`]); 0 = no limit.
    pub backlog: u64,
}

/// What a publisher did.
#[derive(Debug, Clone, Default)]
pub struct PublisherReport {
    /// Per stream, in the order of [`PublisherSpec::streams`]: sent and acknowledged.
    pub streams: Vec<(u32, StreamSent)>,
    /// Publishes written within the measured window.
    pub sent_in_window: u64,
    /// First and last acknowledgement, ns since the payload epoch.
    pub first_ack_ns: Option<u64>,
    /// See `first_ack_ns`.
    pub last_ack_ns: Option<u64>,
    /// Protocol or connection problems, described.
    pub errors: Vec<String>,
}

const BATCH: u64 = 64;
const TICK: Duration = Duration::from_millis(1);

struct Acks {
    acked: Vec<BitSet>,
    first_ns: Option<u64>,
    last_ns: Option<u64>,
    errors: Vec<String>,
}

/// Run a publisher on `conn` until it has sent its messages or is stopped,
/// and everything it sent is acknowledged or `ctl.finish` fires.
pub async fn publisher(
    conn: Connection,
    spec: PublisherSpec,
    ctl: Arc<Control>,
    live: Arc<Live>,
) -> PublisherReport {
    let (mut reader, mut writer) = conn.split();
    let window = Arc::new(Window::new(spec.inflight.clamp(1, 65535)));
    let closed = CancellationToken::new();
    let (rel_tx, mut rel_rx) = mpsc::unbounded_channel::<std::num::NonZeroU16>();
    let nstreams = spec.streams.len();

    // The acknowledgement reader.
    let ack_task = {
        let window = window.clone();
        let closed = closed.clone();
        let live = live.clone();
        tokio::spawn(async move {
            let mut acks = Acks {
                acked: vec![BitSet::default(); nstreams],
                first_ns: None,
                last_ns: None,
                errors: Vec::new(),
            };
            let record = |acks: &mut Acks, (stream, seq): (u32, u64)| {
                if let Some(b) = acks.acked.get_mut(stream as usize) {
                    b.insert(seq);
                }
                let now = payload::now_ns();
                acks.first_ns.get_or_insert(now);
                acks.last_ns = Some(now);
                live.acked.fetch_add(1, Relaxed);
            };
            loop {
                let r = match reader.next().await {
                    Ok(Some(v3::Packet::PublishAck { packet_id })) => {
                        window.on_puback(packet_id).map(|t| record(&mut acks, t))
                    }
                    Ok(Some(v3::Packet::PublishReceived { packet_id })) => {
                        window.on_pubrec(packet_id).map(|t| {
                            record(&mut acks, t);
                            let _ = rel_tx.send(packet_id);
                        })
                    }
                    Ok(Some(v3::Packet::PublishComplete { packet_id })) => {
                        window.on_pubcomp(packet_id)
                    }
                    Ok(Some(v3::Packet::PingResponse)) => Ok(()),
                    Ok(Some(other)) => Err(anyhow::anyhow!("unexpected packet {other:?}")),
                    Ok(None) => break,
                    Err(e) => {
                        acks.errors.push(format!("{e:#}"));
                        break;
                    }
                };
                if let Err(e) = r {
                    acks.errors.push(format!("{e:#}"));
                }
            }
            closed.cancel();
            acks
        })
    };

    let mut report = PublisherReport {
        streams: spec
            .streams
            .iter()
            .map(|s| (s.id, StreamSent::default()))
            .collect(),
        ..Default::default()
    };
    let mut payloads = PayloadWriter::new(spec.run, spec.payload);
    let qos = wire_qos(spec.qos).unwrap_or(v3::QoS::AtMostOnce);
    let limit = spec.limit.unwrap_or(u64::MAX);
    let mut sent = 0u64;
    let mut next_stream = 0usize;
    let started = Instant::now();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);

    let result: Result<()> = async {
        while !ctl.stop.is_cancelled() && !closed.is_cancelled() && sent < limit {
            while let Ok(id) = rel_rx.try_recv() {
                writer.queue(v3::Packet::PublishRelease { packet_id: id })?;
            }
            let mut budget = BATCH.min(limit - sent);
            let paced = spec.rate > 0.0;
            if paced {
                // +1: the first message goes at once.
                let due = (started.elapsed().as_secs_f64() * spec.rate) as u64 + 1;
                budget = budget.min(due.saturating_sub(sent));
            }
            // End-to-end: no stream more than `backlog` ahead of its slowest subscriber.
            let mut held_back: Option<Arc<Gate>> = None;
            if spec.backlog > 0 {
                for (i, st) in spec.streams.iter().enumerate() {
                    let Some(gate) = &st.gate else { continue };
                    let sent_i = report.streams[i].1.sent;
                    let ahead = sent_i - gate.slowest().min(sent_i);
                    let allowed = spec.backlog.saturating_sub(ahead);
                    if allowed == 0 {
                        gate.waiting.store(true, Relaxed);
                        // Re-check: a subscriber may have moved on meanwhile.
                        if sent_i - gate.slowest().min(sent_i) >= spec.backlog {
                            held_back = Some(gate.clone());
                            budget = 0;
                            break;
                        }
                        gate.waiting.store(false, Relaxed);
                    }
                    budget = budget.min(allowed.saturating_mul(nstreams as u64).max(1));
                }
            }
            let mut n = 0;
            let mut window_full = false;
            while n < budget {
                if spec.qos > 0 && !window.try_acquire() {
                    window_full = true;
                    break;
                }
                let idx = next_stream;
                next_stream = (next_stream + 1) % nstreams;
                let stream = &spec.streams[idx];
                let sent_stream = &mut report.streams[idx].1;
                let seq = sent_stream.sent;
                let now = payload::now_ns();
                let body = payloads.make_at(stream.id, seq, now);
                let packet_id = (spec.qos > 0).then(|| window.register(spec.qos, idx as u32, seq));
                writer.queue(v3::Packet::Publish(Box::new(rmqtt_codec::types::Publish {
                    dup: false,
                    retain: false,
                    qos,
                    topic: stream.topic.clone(),
                    packet_id,
                    payload: body,
                    properties: None,
                })))?;
                if ctl.in_window(now) {
                    report.sent_in_window += 1;
                }
                sent_stream.sent += 1;
                live.sent.fetch_add(1, Relaxed);
                live.expected.fetch_add(stream.fanout, Relaxed);
                n += 1;
            }
            sent += n;
            writer.flush().await?;
            if n > 0 {
                if !paced && spec.qos == 0 {
                    tokio::task::yield_now().await;
                }
                continue;
            }
            if !window_full && !paced && held_back.is_none() {
                tokio::task::yield_now().await;
                continue;
            }
            let subscribers_moved = async {
                match &held_back {
                    Some(g) => g.notify.notified().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = ctl.stop.cancelled() => {}
                _ = closed.cancelled() => {}
                Some(id) = rel_rx.recv() => writer.queue(v3::Packet::PublishRelease { packet_id: id })?,
                _ = window.wait_for_space(), if window_full => {}
                _ = subscribers_moved => {}
                _ = ticker.tick(), if paced && !window_full && held_back.is_none() => {}
            }
            if let Some(g) = held_back {
                g.waiting.store(false, Relaxed);
            }
        }
        // Stopped: let what is in flight complete.
        if spec.qos > 0 {
            loop {
                while let Ok(id) = rel_rx.try_recv() {
                    writer.queue(v3::Packet::PublishRelease { packet_id: id })?;
                }
                writer.flush().await?;
                tokio::select! {
                    _ = window.wait_empty() => break,
                    _ = ctl.finish.cancelled() => break,
                    _ = closed.cancelled() => break,
                    Some(id) = rel_rx.recv() => writer.queue(v3::Packet::PublishRelease { packet_id: id })?,
                }
            }
        }
        Ok(())
    }
    .await;
    live.publishers_done.fetch_add(1, Relaxed);
    if let Err(e) = result {
        report.errors.push(format!("{e:#}"));
    } else if closed.is_cancelled() {
        report.errors.push("connection closed by the broker".into());
    }
    if !closed.is_cancelled() {
        let _ = writer.disconnect().await;
    }
    match tokio::time::timeout(Duration::from_secs(2), ack_task).await {
        Ok(Ok(acks)) => {
            for ((_, s), acked) in report.streams.iter_mut().zip(acks.acked) {
                s.acked = acked;
            }
            report.first_ack_ns = acks.first_ns;
            report.last_ack_ns = acks.last_ns;
            report.errors.extend(acks.errors);
        }
        Ok(Err(e)) => report
            .errors
            .push(format!("acknowledgement reader failed: {e}")),
        Err(_) => report
            .errors
            .push("the broker did not close the connection after DISCONNECT".into()),
    }
    report
}

/// What a subscriber does.
#[derive(Debug, Clone)]
pub struct SubscriberSpec {
    /// Run tag expected in payloads.
    pub run: u32,
    /// Number of streams in the run.
    pub streams: usize,
    /// Stop once this many distinct deliveries arrived (persistent drain).
    pub target: Option<u64>,
    /// Per stream id: its gate and this subscriber's slot in it.
    pub gates: Vec<GateSlot>,
}

/// Run a subscriber on `conn` until `ctl.finish` fires, the broker closes the
/// connection, or the target is reached.
pub async fn subscriber(
    conn: Connection,
    spec: SubscriberSpec,
    ctl: Arc<Control>,
    live: Arc<Live>,
) -> SubscriberStats {
    let (mut reader, mut writer) = conn.split();
    let mut stats = SubscriberStats::new(spec.streams);
    let mut awaiting_rel = std::collections::HashSet::new();
    let target = spec.target.unwrap_or(u64::MAX);
    let mut distinct = 0u64;
    let mut closed = false;
    let result: Result<()> = async {
        loop {
            if (distinct >= target && awaiting_rel.is_empty()) || ctl.finish.is_cancelled() {
                break;
            }
            if writer.pending() > 32 * 1024 {
                writer.flush().await?;
            }
            let next = match reader.next_now() {
                Some(r) => r,
                None => {
                    writer.flush().await?;
                    tokio::select! {
                        biased;
                        _ = ctl.finish.cancelled() => break,
                        r = reader.next() => r,
                    }
                }
            };
            match next? {
                Some(v3::Packet::Publish(p)) => {
                    let now = payload::now_ns();
                    if let Some(ack) = ack_for(&p)? {
                        if let (v3::QoS::ExactlyOnce, Some(id)) = (p.qos, p.packet_id) {
                            awaiting_rel.insert(id);
                        }
                        writer.queue(ack)?;
                    }
                    match payload::parse(&p.payload, spec.run) {
                        Ok(h) => {
                            if let Some(arrival) = stats.record(h.stream, h.seq, now) {
                                if arrival == Arrival::InOrder {
                                    if let Some(Some((gate, slot))) =
                                        spec.gates.get(h.stream as usize)
                                    {
                                        gate.advance(*slot, h.seq);
                                    }
                                }
                                live.delivered.fetch_add(1, Relaxed);
                                if arrival != Arrival::Duplicate {
                                    distinct += 1;
                                    live.distinct.fetch_add(1, Relaxed);
                                }
                                if ctl.in_window(now) {
                                    stats.delivered_in_window += 1;
                                }
                                if ctl.in_window(h.sent_ns) {
                                    let us = now.saturating_sub(h.sent_ns) / 1000;
                                    stats.latency_us.saturating_record(us.max(1));
                                }
                            }
                        }
                        Err(_) => stats.foreign += 1,
                    }
                }
                Some(v3::Packet::PublishRelease { packet_id }) => {
                    awaiting_rel.remove(&packet_id);
                    writer.queue(v3::Packet::PublishComplete { packet_id })?;
                }
                Some(v3::Packet::PingResponse) => {}
                Some(other) => anyhow::bail!("unexpected packet {other:?}"),
                None => {
                    closed = true;
                    break;
                }
            }
        }
        writer.flush().await
    }
    .await;
    if let Err(e) = result {
        stats.errors.push(format!("{e:#}"));
    } else if closed {
        stats.errors.push(format!(
            "connection closed by the broker after {} deliveries",
            stats.delivered
        ));
    }
    if !closed {
        let _ = client::close(&mut reader, &mut writer).await;
    }
    stats
}
