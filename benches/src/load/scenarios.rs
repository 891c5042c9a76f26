//! The scenarios: how each one sets up its publishers and subscribers, when it
//! stops, and how its figures are computed. Module [`super`] explains what
//! they measure; this is the how.
//!
//! Every run picks a random 32-bit run tag. Topics are `lt/<tag>/...` and
//! client ids `lt<tag>-...`, so runs never see each other's messages or
//! sessions, and payloads carry the tag so a stray message is recognised.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytestring::ByteString;
use futures::{stream, StreamExt};
use hdrhistogram::Histogram;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::client::{ConnectOptions, Connection, Endpoint};
use super::progress;
use super::report::{Latency, RunResult};
use super::roles::{
    self, Control, Gate, GateSlot, Live, PublisherReport, PublisherSpec, StreamSpec, SubscriberSpec,
};
use super::stats::{self, latency_histogram, StreamSent, SubscriberStats};
use super::system;

/// Where and how to run, common to every scenario.
#[derive(Debug, Clone)]
pub struct Target {
    /// Broker address and transport.
    pub endpoint: Endpoint,
    /// Where subscribers connect, when not to `endpoint` (another node of
    /// a cluster).
    pub subscriber_endpoint: Option<Endpoint>,
    /// `--label`.
    pub label: String,
    /// The broker's pid, for its memory.
    pub pid: Option<u32>,
    /// Tool worker threads (reported only).
    pub threads: usize,
    /// No progress lines.
    pub quiet: bool,
}

impl Target {
    /// Where subscribers connect.
    fn subscribers(&self) -> &Endpoint {
        self.subscriber_endpoint.as_ref().unwrap_or(&self.endpoint)
    }
}

/// Ctrl-C: the first stops the run early (the result is still reported); the
/// second also cuts short the waiting for outstanding deliveries.
#[derive(Debug, Clone, Default)]
pub struct Interrupt {
    /// First Ctrl-C.
    pub first: CancellationToken,
    /// Second Ctrl-C.
    pub second: CancellationToken,
}

/// A finished run: its result, and why it failed its checks, if it did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The figures.
    pub result: RunResult,
    /// Failed checks (losses, order violations, errors); empty when all passed.
    pub failures: Vec<String>,
}

/// The shape of a publish/subscribe run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Every publisher and every subscriber on one topic (`fan-in`).
    FanIn,
    /// The same, named `fan-out` (one publisher, many subscribers by default).
    FanOut,
    /// Publisher `i` and subscriber `i` on topic `i`.
    Pairs,
}

impl Shape {
    /// Scenario name.
    pub fn name(self) -> &'static str {
        match self {
            Shape::FanIn => "fan-in",
            Shape::FanOut => "fan-out",
            Shape::Pairs => "pairs",
        }
    }
}

/// Options of `fan-in`, `fan-out` and `pairs`.
#[derive(Debug, Clone)]
pub struct FlowOptions {
    /// Topology.
    pub shape: Shape,
    /// Publishers (pairs: number of pairs).
    pub publishers: usize,
    /// Subscribers (ignored for pairs).
    pub subscribers: usize,
    /// QoS of publishes and subscriptions.
    pub qos: u8,
    /// Payload bytes.
    pub payload: usize,
    /// Total msgs/s over all publishers; 0 = flat out.
    pub rate: u64,
    /// Measured window.
    pub duration: Duration,
    /// Warm-up before the window.
    pub warmup: Duration,
    /// In-flight window per publisher.
    pub inflight: usize,
    /// How far a publisher may get ahead of its slowest subscriber; 0 = no limit.
    pub backlog: u64,
    /// QoS ≥ 1: stop waiting for outstanding deliveries after this long without progress.
    pub grace: Duration,
}

/// Options of `persistent`.
#[derive(Debug, Clone)]
pub struct PersistentOptions {
    /// Persistent subscribers.
    pub subscribers: usize,
    /// Publishers.
    pub publishers: usize,
    /// Messages in total over all publishers.
    pub messages: u64,
    /// QoS of subscriptions and publishes (1 or 2).
    pub qos: u8,
    /// Payload bytes.
    pub payload: usize,
    /// In-flight window per publisher.
    pub inflight: usize,
    /// One topic per subscriber instead of one common topic.
    pub topic_per_subscriber: bool,
    /// Longest time the drain may take.
    pub drain_timeout: Duration,
    /// Stop waiting for acknowledgements after this long without one.
    pub grace: Duration,
}

/// Options of `conn`.
#[derive(Debug, Clone)]
pub struct ConnOptions {
    /// Connections to open.
    pub connections: u64,
    /// Connection attempts in flight at once.
    pub concurrency: usize,
    /// How long to hold them idle.
    pub hold: Duration,
    /// Each connection with a will (`lt/will/{client id}`).
    pub will: bool,
}

const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
const SETUP_CONCURRENCY: usize = 64;
/// How long QoS 0 runs wait once deliveries stop coming.
const QOS0_QUIET: Duration = Duration::from_secs(1);

fn run_tag() -> u32 {
    rand::random()
}

/// Open one connection per options entry, `SETUP_CONCURRENCY` at a time, in order.
async fn connect_all(to: &Endpoint, opts: Vec<ConnectOptions>) -> Result<Vec<(Connection, bool)>> {
    stream::iter(opts)
        .map(|o| async move {
            Connection::connect(to, &o)
                .await
                .with_context(|| format!("client {}", o.client_id))
        })
        .buffered(SETUP_CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn per_s(n: u64, window_s: f64) -> f64 {
    if window_s > 0.0 {
        n as f64 / window_s
    } else {
        0.0
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Sleep until `t` unless `cancel` fires first; true if it fired.
async fn sleep_until_or(t: Instant, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep_until(t.into()) => false,
        _ = cancel.cancelled() => true,
    }
}

/// Everything the publish/subscribe scenarios share after the run: join the
/// tasks and do the accounting.
struct Collected {
    streams: Vec<StreamSent>,
    publishers: Vec<PublisherReport>,
    subscribers: Vec<SubscriberStats>,
}

async fn collect(
    nstreams: usize,
    pub_tasks: Vec<JoinHandle<PublisherReport>>,
    sub_tasks: Vec<JoinHandle<SubscriberStats>>,
) -> Collected {
    let mut c = Collected {
        streams: vec![StreamSent::default(); nstreams],
        publishers: Vec::new(),
        subscribers: Vec::new(),
    };
    for t in pub_tasks {
        let r = t.await.unwrap_or_else(|e| PublisherReport {
            errors: vec![format!("publisher task failed: {e}")],
            ..Default::default()
        });
        for (id, s) in &r.streams {
            if let Some(slot) = c.streams.get_mut(*id as usize) {
                *slot = s.clone();
            }
        }
        c.publishers.push(r);
    }
    for t in sub_tasks {
        c.subscribers.push(t.await.unwrap_or_else(|e| {
            let mut s = SubscriberStats::new(nstreams);
            s.errors.push(format!("subscriber task failed: {e}"));
            s
        }));
    }
    c
}

/// Fill in the delivery figures and the failed checks.
fn finish_result(
    r: &mut RunResult,
    c: &Collected,
    routes: &[Vec<u32>],
    failures: &mut Vec<String>,
) {
    let acc = stats::account(r.qos, &c.streams, &c.subscribers, routes);
    r.sent = c.streams.iter().map(|s| s.sent).sum();
    r.acked = c.streams.iter().map(|s| s.acked.len()).sum();
    r.delivered = c.subscribers.iter().map(|s| s.delivered).sum();
    r.expected = acc.expected;
    r.losses = acc.losses;
    r.dropped = acc.dropped;
    r.duplicates = acc.duplicates;
    r.order_violations = acc.order_violations;
    let mut messages: Vec<String> = Vec::new();
    for (i, p) in c.publishers.iter().enumerate() {
        messages.extend(p.errors.iter().map(|e| format!("publisher {i}: {e}")));
    }
    for (i, s) in c.subscribers.iter().enumerate() {
        messages.extend(s.errors.iter().map(|e| format!("subscriber {i}: {e}")));
        if s.foreign > 0 {
            messages.push(format!(
                "subscriber {i}: {} deliveries with a payload not from this run",
                s.foreign
            ));
        }
        if s.unexpected > 0 {
            messages.push(format!(
                "subscriber {i}: {} deliveries of an unknown stream",
                s.unexpected
            ));
        }
    }
    r.errors = messages.len() as u64;
    if r.qos > 0 && r.losses > 0 {
        // Where they are missing, for the first few (stream, subscriber) pairs.
        let mut gaps = Vec::new();
        'pairs: for (i, (sub, wanted)) in c.subscribers.iter().zip(routes).enumerate() {
            for &stream in wanted {
                let Some(sent) = c.streams.get(stream as usize) else {
                    continue;
                };
                let empty = stats::BitSet::default();
                let seen = sub.track(stream).map_or(&empty, |t| &t.seen);
                if let Some((n, first, last)) = stats::missing_range(&sent.acked, seen) {
                    if gaps.len() == 5 {
                        gaps.push("...".to_string());
                        break 'pairs;
                    }
                    gaps.push(format!(
                        "stream {stream} to subscriber {i}: {n} missing between sequences {first} and {last} of {}",
                        sent.sent
                    ));
                }
            }
        }
        failures.push(format!(
            "{} acknowledged publishes were not delivered ({} of {} expected deliveries arrived): {}",
            r.losses,
            acc.distinct,
            r.expected,
            gaps.join("; ")
        ));
    }
    if r.order_violations > 0 {
        failures.push(format!(
            "{} deliveries arrived out of order",
            r.order_violations
        ));
    }
    if r.qos == 2 && r.duplicates > 0 {
        failures.push(format!(
            "{} duplicate deliveries at QoS 2 (exactly once)",
            r.duplicates
        ));
    }
    if !messages.is_empty() {
        let shown: Vec<&str> = messages.iter().take(10).map(String::as_str).collect();
        let more = messages.len().saturating_sub(shown.len());
        failures.push(format!(
            "{} errors: {}{}",
            messages.len(),
            shown.join("; "),
            if more > 0 {
                format!("; and {more} more")
            } else {
                String::new()
            }
        ));
    }
}

fn merged_latency(subs: &[SubscriberStats]) -> Histogram<u64> {
    let mut h = latency_histogram();
    for s in subs {
        let _ = h.add(&s.latency_us);
    }
    h
}

/// `fan-in`, `fan-out` and `pairs`.
pub async fn flow(t: &Target, o: &FlowOptions, intr: &Interrupt) -> Result<Outcome> {
    let run = run_tag();
    let live = Arc::new(Live::default());
    let done = CancellationToken::new();
    let progress = progress::spawn(live.clone(), done.clone(), t.quiet);
    let out = flow_inner(t, o, intr, run, &live).await;
    done.cancel();
    let _ = progress.await;
    out
}

async fn flow_inner(
    t: &Target,
    o: &FlowOptions,
    intr: &Interrupt,
    run: u32,
    live: &Arc<Live>,
) -> Result<Outcome> {
    live.set_phase("setup");
    let base = format!("lt/{run:08x}/{}", o.shape.name());
    let (npub, nsub) = match o.shape {
        Shape::Pairs => (o.publishers, o.publishers),
        _ => (o.publishers, o.subscribers),
    };
    if npub == 0 || nsub == 0 {
        bail!("a run needs at least one publisher and one subscriber");
    }
    // Streams = publishers; stream i's topic, and what each subscriber gets.
    let (topics, routes, filters): (Vec<ByteString>, Vec<Vec<u32>>, Vec<ByteString>) = match o.shape
    {
        Shape::Pairs => {
            let topics: Vec<ByteString> = (0..npub)
                .map(|i| ByteString::from(format!("{base}/{i}")))
                .collect();
            let routes = (0..nsub as u32).map(|i| vec![i]).collect();
            (topics.clone(), routes, topics)
        }
        _ => {
            let topic = ByteString::from(base.clone());
            let all: Vec<u32> = (0..npub as u32).collect();
            (
                vec![topic.clone(); npub],
                vec![all; nsub],
                vec![topic; nsub],
            )
        }
    };
    let fanout = if o.shape == Shape::Pairs {
        1
    } else {
        nsub as u64
    };
    // End-to-end flow control: a gate per stream, a slot in it per receiving subscriber.
    let gates: Vec<Arc<Gate>> = (0..npub)
        .map(|_| Arc::new(Gate::new(fanout as usize)))
        .collect();
    let mut next_slot = vec![0usize; npub];
    let sub_gates: Vec<Vec<GateSlot>> = routes
        .iter()
        .map(|wanted| {
            let mut g = vec![None; npub];
            for &stream in wanted {
                let i = stream as usize;
                g[i] = Some((gates[i].clone(), next_slot[i]));
                next_slot[i] += 1;
            }
            g
        })
        .collect();

    // Subscribers first, so that nothing published is missed.
    let sub_opts = (0..nsub)
        .map(|i| ConnectOptions::new(format!("lt{run:08x}-s{i}"), true))
        .collect();
    let mut subs = connect_all(t.subscribers(), sub_opts)
        .await
        .context("connecting subscribers")?;
    let subscribed = stream::iter(subs.iter_mut().zip(&filters))
        .map(|((c, _), f)| c.subscribe(std::slice::from_ref(f), o.qos, SETUP_TIMEOUT))
        .buffered(SETUP_CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    for r in subscribed {
        r.context("subscribing")?;
    }
    let pub_opts = (0..npub)
        .map(|i| ConnectOptions::new(format!("lt{run:08x}-p{i}"), true))
        .collect();
    let pubs = connect_all(&t.endpoint, pub_opts)
        .await
        .context("connecting publishers")?;

    let t0 = Instant::now();
    let window_start = t0 + o.warmup;
    let window_end = window_start + o.duration;
    let ctl = Arc::new(Control::new(window_start, window_end));
    let sub_tasks: Vec<_> = subs
        .into_iter()
        .zip(sub_gates)
        .map(|((c, _), gates)| {
            let spec = SubscriberSpec {
                run,
                streams: npub,
                target: None,
                gates,
            };
            tokio::spawn(roles::subscriber(c, spec, ctl.clone(), live.clone()))
        })
        .collect();
    let rate_each = o.rate as f64 / npub as f64;
    let pub_tasks: Vec<_> = pubs
        .into_iter()
        .enumerate()
        .map(|(i, (c, _))| {
            let spec = PublisherSpec {
                streams: vec![StreamSpec {
                    id: i as u32,
                    topic: topics[i].clone(),
                    fanout,
                    gate: Some(gates[i].clone()),
                }],
                qos: o.qos,
                payload: o.payload,
                run,
                rate: rate_each,
                limit: None,
                inflight: o.inflight,
                backlog: o.backlog,
            };
            tokio::spawn(roles::publisher(c, spec, ctl.clone(), live.clone()))
        })
        .collect();

    live.set_phase("warm-up");
    let mut interrupted = sleep_until_or(window_start, &intr.first).await;
    if !interrupted {
        live.set_phase("measure");
        interrupted = sleep_until_or(window_end, &intr.first).await;
    }
    ctl.stop.cancel();
    let stopped = Instant::now();
    if stopped < window_end {
        ctl.window_end_ns
            .store(super::payload::ns_since_epoch(stopped), Relaxed);
    }
    let window_s = secs(
        stopped
            .min(window_end)
            .saturating_duration_since(window_start),
    );

    // Wait for what is still in flight.
    live.set_phase("grace");
    let quiet_limit = if o.qos == 0 { QOS0_QUIET } else { o.grace };
    wait_for_deliveries(live, npub as u64, quiet_limit, &intr.second).await;
    ctl.finish.cancel();
    let c = collect(npub, pub_tasks, sub_tasks).await;

    let mut r = RunResult {
        label: t.label.clone(),
        scenario: o.shape.name().into(),
        target: t.endpoint.addr.to_string(),
        transport: t.endpoint.transport.name().into(),
        qos: o.qos,
        payload: o.payload,
        publishers: npub,
        subscribers: nsub,
        rate: o.rate,
        inflight: o.inflight,
        backlog: o.backlog,
        threads: t.threads,
        warmup_s: secs(o.warmup),
        duration_s: window_s,
        interrupted,
        unix_time: unix_now(),
        ..Default::default()
    };
    r.publish_per_s = per_s(
        c.publishers.iter().map(|p| p.sent_in_window).sum(),
        window_s,
    );
    r.delivered_per_s = per_s(
        c.subscribers.iter().map(|s| s.delivered_in_window).sum(),
        window_s,
    );
    r.latency_ms = Latency::from_us(&merged_latency(&c.subscribers));
    let mut failures = Vec::new();
    finish_result(&mut r, &c, &routes, &mut failures);
    Ok(Outcome {
        result: r,
        failures,
    })
}

/// After publishing stopped: wait until every publisher has nothing in flight
/// and every expected delivery arrived, or nothing moved for `quiet_limit`,
/// or `cancel` fires. Hard limit: 12 × `quiet_limit`, at least a minute.
async fn wait_for_deliveries(
    live: &Live,
    publishers: u64,
    quiet_limit: Duration,
    cancel: &CancellationToken,
) {
    let cap = Instant::now() + (quiet_limit * 12).max(Duration::from_secs(60));
    let mut last = (u64::MAX, u64::MAX);
    let mut last_change = Instant::now();
    loop {
        let now = Instant::now();
        let done = live.publishers_done.load(Relaxed) >= publishers;
        if done && live.distinct.load(Relaxed) >= live.expected.load(Relaxed) {
            return;
        }
        let seen = (live.acked.load(Relaxed), live.delivered.load(Relaxed));
        if seen != last {
            last = seen;
            last_change = now;
        }
        if now.duration_since(last_change) >= quiet_limit || now >= cap {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

/// `persistent`: queue for offline persistent sessions, then drain.
pub async fn persistent(t: &Target, o: &PersistentOptions, intr: &Interrupt) -> Result<Outcome> {
    let run = run_tag();
    let live = Arc::new(Live::default());
    let done = CancellationToken::new();
    let progress = progress::spawn(live.clone(), done.clone(), t.quiet);
    let out = persistent_inner(t, o, intr, run, &live).await;
    // Whatever happened, delete the sessions: a clean-session connect discards them.
    live.set_phase("cleanup");
    let cleanup = (0..o.subscribers)
        .map(|i| ConnectOptions::new(format!("lt{run:08x}-ps{i}"), true))
        .collect::<Vec<_>>();
    let cleaned = stream::iter(cleanup)
        .map(|opts| async move {
            let (c, _) = Connection::connect(t.subscribers(), &opts).await?;
            c.close().await
        })
        .buffer_unordered(SETUP_CONCURRENCY)
        .collect::<Vec<Result<()>>>()
        .await;
    done.cancel();
    let _ = progress.await;
    let mut out = out?;
    let failed_cleanup = cleaned.iter().filter(|r| r.is_err()).count();
    if failed_cleanup > 0 {
        out.failures.push(format!(
            "{failed_cleanup} sessions could not be deleted at the end"
        ));
    }
    Ok(out)
}

async fn persistent_inner(
    t: &Target,
    o: &PersistentOptions,
    intr: &Interrupt,
    run: u32,
    live: &Arc<Live>,
) -> Result<Outcome> {
    let (nsub, npub) = (o.subscribers, o.publishers);
    if nsub == 0 || npub == 0 {
        bail!("a run needs at least one publisher and one subscriber");
    }
    let base = format!("lt/{run:08x}/persistent");
    let sub_topic = |s: usize| {
        if o.topic_per_subscriber {
            ByteString::from(format!("{base}/{s}"))
        } else {
            ByteString::from(base.clone())
        }
    };
    // Streams: one per publisher on the common topic, or one per
    // (publisher, subscriber topic) with a topic per subscriber.
    let (streams_of_pub, routes, nstreams): (Vec<Vec<StreamSpec>>, Vec<Vec<u32>>, usize) =
        if o.topic_per_subscriber {
            let streams = (0..npub)
                .map(|p| {
                    (0..nsub)
                        .map(|s| StreamSpec {
                            id: (p * nsub + s) as u32,
                            topic: sub_topic(s),
                            fanout: 1,
                            gate: None,
                        })
                        .collect()
                })
                .collect();
            let routes = (0..nsub)
                .map(|s| (0..npub).map(|p| (p * nsub + s) as u32).collect())
                .collect();
            (streams, routes, npub * nsub)
        } else {
            let streams = (0..npub)
                .map(|p| {
                    vec![StreamSpec {
                        id: p as u32,
                        topic: sub_topic(0),
                        fanout: nsub as u64,
                        gate: None,
                    }]
                })
                .collect();
            (streams, vec![(0..npub as u32).collect(); nsub], npub)
        };

    // 1. Persistent sessions with their subscription, then offline.
    live.set_phase("setup");
    let sub_opts: Vec<ConnectOptions> = (0..nsub)
        .map(|i| ConnectOptions::new(format!("lt{run:08x}-ps{i}"), false))
        .collect();
    let subs = connect_all(t.subscribers(), sub_opts.clone())
        .await
        .context("connecting subscribers")?;
    let setup = stream::iter(subs.into_iter().enumerate())
        .map(|(i, (mut c, _))| {
            let filter = sub_topic(i);
            async move {
                c.subscribe(std::slice::from_ref(&filter), o.qos, SETUP_TIMEOUT)
                    .await?;
                c.close().await
            }
        })
        .buffered(SETUP_CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    for r in setup {
        r.context("subscribing")?;
    }

    // 2. Publish while they are away.
    live.set_phase("publish");
    let pub_opts = (0..npub)
        .map(|i| ConnectOptions::new(format!("lt{run:08x}-pp{i}"), true))
        .collect();
    let pubs = connect_all(&t.endpoint, pub_opts)
        .await
        .context("connecting publishers")?;
    let pub_start = Instant::now();
    let ctl = Arc::new(Control::new(
        pub_start,
        pub_start + Duration::from_secs(86_400),
    ));
    let per_pub = o.messages / npub as u64;
    let extra = o.messages % npub as u64;
    let pub_tasks: Vec<_> = pubs
        .into_iter()
        .zip(streams_of_pub)
        .enumerate()
        .map(|(i, ((c, _), streams))| {
            let spec = PublisherSpec {
                streams,
                qos: o.qos,
                payload: o.payload,
                run,
                rate: 0.0,
                limit: Some(per_pub + u64::from((i as u64) < extra)),
                inflight: o.inflight,
                backlog: 0,
            };
            tokio::spawn(roles::publisher(c, spec, ctl.clone(), live.clone()))
        })
        .collect();
    // Until every publisher is done, or acknowledgements stall for the grace period.
    let mut interrupted = false;
    let mut last = u64::MAX;
    let mut last_change = Instant::now();
    while live.publishers_done.load(Relaxed) < npub as u64 {
        if intr.first.is_cancelled() && !ctl.stop.is_cancelled() {
            interrupted = true;
            ctl.stop.cancel();
        }
        let acked = live.acked.load(Relaxed);
        if acked != last {
            last = acked;
            last_change = Instant::now();
        }
        if last_change.elapsed() >= o.grace || intr.second.is_cancelled() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ctl.stop.cancel();
    ctl.finish.cancel();
    let mut c = collect(nstreams, pub_tasks, Vec::new()).await;
    let pub_start_ns = super::payload::ns_since_epoch(pub_start);
    let last_ack = c.publishers.iter().filter_map(|p| p.last_ack_ns).max();
    let publish_s = last_ack.map_or(0.0, |l| l.saturating_sub(pub_start_ns) as f64 / 1e9);
    let acked: u64 = c.streams.iter().map(|s| s.acked.len()).sum();

    // 3. Come back and drain.
    live.set_phase("drain");
    let drain_start = Instant::now();
    let drain_ctl = Arc::new(Control::new(
        drain_start,
        drain_start + Duration::from_secs(86_400),
    ));
    let back = connect_all(t.subscribers(), sub_opts)
        .await
        .context("reconnecting subscribers")?;
    let mut session_errors = Vec::new();
    let sub_tasks: Vec<_> = back
        .into_iter()
        .enumerate()
        .map(|(i, (conn, present))| {
            if !present {
                session_errors.push(format!(
                    "subscriber {i}: the broker did not keep the session (session present = 0)"
                ));
            }
            let target: u64 = routes[i]
                .iter()
                .map(|s| c.streams[*s as usize].acked.len())
                .sum();
            let spec = SubscriberSpec {
                run,
                streams: nstreams,
                target: Some(target),
                gates: Vec::new(),
            };
            tokio::spawn(roles::subscriber(
                conn,
                spec,
                drain_ctl.clone(),
                live.clone(),
            ))
        })
        .collect();
    let deadline = drain_start + o.drain_timeout;
    let all_done = async {
        while !sub_tasks.iter().all(|t| t.is_finished()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    // Ctrl-C during the drain ends it; after one during publishing, a second does.
    let cut = if intr.first.is_cancelled() {
        &intr.second
    } else {
        &intr.first
    };
    tokio::select! {
        _ = all_done => {}
        _ = tokio::time::sleep_until(deadline.into()) => {}
        _ = cut.cancelled() => {}
    }
    interrupted |= intr.first.is_cancelled();
    drain_ctl.finish.cancel();
    c.subscribers = collect(nstreams, Vec::new(), sub_tasks).await.subscribers;
    let drain_start_ns = super::payload::ns_since_epoch(drain_start);
    let last_delivery = c.subscribers.iter().filter_map(|s| s.last_ns).max();
    let drain_s = last_delivery.map_or(0.0, |l| l.saturating_sub(drain_start_ns) as f64 / 1e9);

    let mut r = RunResult {
        label: t.label.clone(),
        scenario: "persistent".into(),
        target: t.endpoint.addr.to_string(),
        transport: t.endpoint.transport.name().into(),
        qos: o.qos,
        payload: o.payload,
        publishers: npub,
        subscribers: nsub,
        rate: 0,
        inflight: o.inflight,
        threads: t.threads,
        warmup_s: 0.0,
        duration_s: publish_s,
        interrupted,
        unix_time: unix_now(),
        ..Default::default()
    };
    r.publish_per_s = per_s(acked, publish_s);
    let mut failures = Vec::new();
    finish_result(&mut r, &c, &routes, &mut failures);
    let drain_rate = per_s(r.delivered, drain_s);
    r.delivered_per_s = drain_rate;
    r.drain_per_s = Some(drain_rate);
    if !session_errors.is_empty() {
        r.errors += session_errors.len() as u64;
        failures.push(session_errors.join("; "));
    }
    Ok(Outcome {
        result: r,
        failures,
    })
}

/// `conn`: a connection storm, then an idle hold, then a liveness check.
pub async fn conn(t: &Target, o: &ConnOptions, intr: &Interrupt) -> Result<Outcome> {
    let run = run_tag();
    // Every connection is a socket; keep some for everything else.
    system::raise_open_files(o.connections + 64)?;
    let live = Arc::new(Live::default());
    let done = CancellationToken::new();
    let progress = progress::spawn(live.clone(), done.clone(), t.quiet);
    let rss = |pid: Option<u32>| pid.and_then(|p| system::rss_kb(p).ok());
    let rss_before_kb = rss(t.pid);

    live.set_phase("connect");
    let start = Instant::now();
    let mut last_connack = start;
    let mut conns = Vec::with_capacity(usize::try_from(o.connections).unwrap_or(0));
    let mut errors: Vec<String> = Vec::new();
    let mut error_count = 0u64;
    {
        let mut attempts = stream::iter(0..o.connections)
            .map(|i| {
                let id = format!("lt{run:08x}-c{i}");
                let mut opts = ConnectOptions::new(id.clone(), true);
                opts.read_buffer = 256;
                opts.will = o.will.then(|| format!("lt/will/{id}"));
                async move { Connection::connect(&t.endpoint, &opts).await }
            })
            .buffer_unordered(o.concurrency.max(1));
        loop {
            let next = tokio::select! {
                n = attempts.next() => n,
                _ = intr.first.cancelled() => None,
            };
            let Some(r) = next else { break };
            match r {
                Ok((c, _)) => {
                    conns.push(c);
                    last_connack = Instant::now();
                    live.connected.fetch_add(1, Relaxed);
                }
                Err(e) => {
                    error_count += 1;
                    if errors.len() < 10 {
                        errors.push(format!("{e:#}"));
                    }
                }
            }
        }
    }
    let connected = conns.len() as u64;
    let connect_s = secs(last_connack.duration_since(start));

    live.set_phase("hold");
    let interrupted_hold = sleep_until_or(Instant::now() + o.hold, &intr.first).await;
    let rss_after_kb = rss(t.pid);

    // Are they all still there? One PINGREQ each.
    live.set_phase("ping");
    let pinged = stream::iter(conns)
        .map(|mut c| async move {
            let r = c.ping(Duration::from_secs(10)).await;
            (c, r)
        })
        .buffer_unordered(1024)
        .collect::<Vec<_>>()
        .await;
    let mut held = 0;
    let mut alive = Vec::with_capacity(pinged.len());
    for (c, r) in pinged {
        match r {
            Ok(()) => {
                held += 1;
                alive.push(c);
            }
            Err(e) => {
                if errors.len() < 10 {
                    errors.push(format!("lost during the hold: {e:#}"));
                }
            }
        }
    }
    live.set_phase("close");
    stream::iter(alive)
        .map(|c| async move {
            let _ = c.close().await;
        })
        .buffer_unordered(o.concurrency.max(1))
        .collect::<Vec<()>>()
        .await;
    done.cancel();
    let _ = progress.await;

    let bytes_per_connection = match (rss_before_kb, rss_after_kb) {
        (Some(b), Some(a)) if held > 0 => Some((a as f64 - b as f64) * 1024.0 / held as f64),
        _ => None,
    };
    let r = RunResult {
        label: t.label.clone(),
        scenario: "conn".into(),
        target: t.endpoint.addr.to_string(),
        transport: t.endpoint.transport.name().into(),
        threads: t.threads,
        duration_s: secs(o.hold),
        errors: error_count + (connected - held),
        interrupted: intr.first.is_cancelled() || interrupted_hold,
        unix_time: unix_now(),
        connections: Some(o.connections),
        connected: Some(connected),
        connects_per_s: Some(per_s(connected, connect_s)),
        held: Some(held),
        rss_before_kb,
        rss_after_kb,
        bytes_per_connection,
        ..Default::default()
    };
    let mut failures = Vec::new();
    if error_count > 0 {
        failures.push(format!(
            "{error_count} of {} connections failed: {}",
            o.connections,
            errors.join("; ")
        ));
    } else if held < connected {
        failures.push(format!(
            "{} of {connected} connections were lost during the hold: {}",
            connected - held,
            errors.join("; ")
        ));
    }
    Ok(Outcome {
        result: r,
        failures,
    })
}
