//! `broker-bench`: an end-to-end load tool for any MQTT 3.1.1 broker.
//!
//! It connects over TCP to a broker at host:port and plays both sides, the
//! publishers and the subscribers, in one process. So the same run, with the
//! same client, measures this broker and a peer such as Mosquitto.
//!
//! # How it measures
//!
//! **Timestamps travel in the payload.** Each PUBLISH carries the publisher's
//! stream id, a sequence number and the time it was encoded, in nanoseconds
//! since an `Instant` shared by the whole process ([`payload`]). When a
//! subscriber receives it, `now - sent` is that message's latency, through
//! the tool's own socket writes, the broker and back. Publishers and
//! subscribers share one clock, so no clock sync is needed. The sequence
//! number is also what detects losses, duplicates and order violations
//! ([`stats`]).
//!
//! **Flat out vs fixed rate.** Without `--rate` (or with `--rate 0`) publishers
//! send as fast as their in-flight windows and TCP allow. That measures
//! *capacity*: publishes and deliveries per second. Latency in such a run is
//! mostly time spent in queues and says little. With `--rate R` the
//! publishers together send R msgs/s, paced by a 1 ms ticker. Each tick sends
//! the small burst that keeps each publisher on schedule. That measures
//! *latency* at a load the broker can sustain. The payload timestamp is
//! taken when the message is actually written, not when the schedule wanted
//! it, so if the broker falls behind (the window fills), look at the rate
//! achieved (`publish_per_s`) as well as the latency.
//!
//! **In-flight windows.** A QoS 1/2 publisher keeps up to `--inflight`
//! (default 64) publishes awaiting acknowledgement. With a window of 1 it
//! would measure one network round trip per message. With no window it would
//! flood the broker and measure queue growth. A window is what real clients
//! have (MQTT 5 Receive Maximum, Mosquitto's `max_inflight_messages`), and it
//! lets a handful of publishers keep the broker busy. Deliveries are
//! acknowledged by the subscribers as soon as they are read, so the
//! broker's own per-subscriber window decides the delivery side.
//!
//! **End-to-end window (`--backlog`).** MQTT has no backpressure from a
//! subscriber to a publisher: a broker acknowledges a publish once it is
//! queued, however long the subscriber's queue already is. So a truly open
//! flat-out publisher only measures how fast queues grow until the broker
//! drops (at QoS 1 too, once a session queue hits its limit). It also steals
//! the tool's CPU from its own subscribers. Instead, each publisher may be at
//! most `--backlog` messages (default 1,000) ahead of the slowest subscriber
//! of its topic: the subscribers publish how far they have got, and a
//! publisher that is too far ahead waits for them. A flat-out run then
//! measures the rate the whole path sustains, and its latency is the backlog
//! divided by that rate (Little's law). `--backlog 0` removes the limit, to
//! see how a broker behaves when overloaded. The window is a flow-control
//! bound only; losses are still counted against every acknowledged publish.
//!
//! **Warm-up and the measured window.** Publishers run for `--warmup` +
//! `--duration`. Rates count only what was sent or received within the
//! `--duration` window; latency counts the messages *sent* within it, even
//! those that arrive after it. After the window publishers stop, and the tool
//! waits for outstanding acknowledgements and deliveries. At QoS ≥ 1 it waits
//! until everything acknowledged has arrived, or nothing has moved for
//! `--grace` seconds (default 5). At QoS 0 it waits until everything arrived
//! or nothing has come for 1 s. Only then are losses counted.
//!
//! **One thread by default.** The tool runs on a tokio runtime with
//! `--threads` worker threads (default 1, a current-thread runtime). On the
//! 2-core machines the figures are taken on, that gives the tool one core
//! and the broker the other, the same for every broker measured. More
//! threads help only when the tool itself is the bottleneck and the machine
//! has cores to spare. Check the tool's CPU use (`top`) in a flat-out run.
//! If it is at 100 % of its core, the figure is the tool's limit, not the
//! broker's.
//!
//! # Scenarios
//!
//! - **`conn`**: opens `--connections` clean-session connections,
//!   `--concurrency` attempts at a time, and reports connects per second
//!   (accepting CONNACKs over the time to the last one). It then holds them
//!   idle for `--hold` seconds and sends a PINGREQ on each. `held` counts
//!   the PINGRESPs. With `--pid`, the broker's RSS (`/proc/PID/status` VmRSS)
//!   before connecting and at the end of the hold gives its memory per
//!   connection. The tool raises its own open-files limit to the hard limit
//!   first, and refuses to start when that is too low.
//! - **`fan-in`** (4 publishers → 1 subscriber), **`fan-out`** (1 → 50), both on
//!   one topic, and **`pairs`** (N publisher/subscriber pairs, topic each):
//!   subscribers subscribe at the run's QoS, then publishers publish at it.
//!   The figures are publishes and deliveries per second, latency
//!   percentiles, losses, duplicates and order violations.
//! - **`persistent`**: the offline-session case the broker exists for.
//!   `--subscribers` persistent sessions (clean session = 0) subscribe and go
//!   offline. `--publishers` then publish `--messages` in total, flat out
//!   within their windows. `publish_per_s` counts acknowledgements, which is
//!   when a durable broker has stored the message. The subscribers come back
//!   and drain their queues; `drain_per_s` is deliveries over the time to the
//!   last one. Every acknowledged message must reach every subscriber, in
//!   order per publisher. At the end a clean-session connect under each id
//!   deletes the sessions.
//!
//! Every run is bounded in time and count and stops by itself. A first
//! Ctrl-C stops it early and still reports. A second also cuts short the
//! wait for outstanding deliveries. The process exits non-zero when a check
//! failed: QoS ≥ 1 losses, any order violation, QoS 2 duplicates, or
//! connection and protocol errors.
//!
//! # Modules
//!
//! [`client`] (the MQTT client), [`payload`], [`stats`], [`roles`] (publisher and
//! subscriber tasks), [`scenarios`], [`report`] (table and JSON line),
//! [`progress`], [`system`] (open-files limit, RSS).

pub mod client;
pub mod payload;
pub mod progress;
pub mod report;
pub mod roles;
pub mod scenarios;
pub mod stats;
pub mod system;

pub use report::RunResult;
pub use scenarios::{
    ConnOptions, FlowOptions, Interrupt, Outcome, PersistentOptions, Shape, Target,
};

/// One run of one scenario.
#[derive(Debug, Clone)]
pub enum Scenario {
    /// `conn`.
    Conn(ConnOptions),
    /// `fan-in`, `fan-out`, `pairs`.
    Flow(FlowOptions),
    /// `persistent`.
    Persistent(PersistentOptions),
}

/// Run `scenario` against `target`, with Ctrl-C handling (first: stop
/// early; second: stop waiting; third: exit at once).
pub async fn run(target: &Target, scenario: &Scenario) -> anyhow::Result<Outcome> {
    payload::epoch();
    let intr = Interrupt::default();
    let signals = {
        let intr = intr.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_err() {
                return;
            }
            eprintln!("interrupted: stopping; Ctrl-C again to stop waiting for deliveries");
            intr.first.cancel();
            if tokio::signal::ctrl_c().await.is_err() {
                return;
            }
            intr.second.cancel();
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        })
    };
    let out = match scenario {
        Scenario::Conn(o) => scenarios::conn(target, o, &intr).await,
        Scenario::Flow(o) => scenarios::flow(target, o, &intr).await,
        Scenario::Persistent(o) => scenarios::persistent(target, o, &intr).await,
    };
    signals.abort();
    out
}
