//! Counters by label and histograms for [`Broker::metrics`](crate::Broker::metrics).
//!
//! Contract: recording is one or two relaxed atomic additions, never a lock
//! and never an allocation, so it can sit on the hot path (every message,
//! every store batch, every hook call). Reading ([`Histogram::snapshot`])
//! is not atomic as a whole: a scrape may see a bucket incremented and the
//! count not yet, off by the observations in progress at that instant.
//! Rendering (Prometheus text or anything else) is the embedder's job: this
//! crate knows no exposition format.

use std::sync::atomic::{AtomicU64, Ordering};

/// A histogram over fixed upper bounds, in integer units (microseconds,
/// operations), each bucket its own atomic.
#[derive(Debug)]
pub(crate) struct Histogram {
    /// Upper bounds (inclusive), ascending; a last bucket counts the rest.
    bounds: &'static [u64],
    /// One more than `bounds`: the last is +Inf.
    buckets: Box<[AtomicU64]>,
    sum: AtomicU64,
}

/// Bounds for durations, in microseconds: 50 µs to 10 s.
pub(crate) const LATENCY_US: &[u64] = &[
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 10_000_000,
];

/// Bounds for store batch sizes, in operations.
pub(crate) const BATCH_OPS: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096];

impl Histogram {
    pub(crate) fn new(bounds: &'static [u64]) -> Histogram {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]));
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    /// Record one observation of `value` units.
    pub(crate) fn observe(&self, value: u64) {
        let i = self.bounds.partition_point(|&b| b < value);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
    }

    /// The counts now; `scale` converts units to the snapshot's (1e6 for
    /// microseconds to seconds, 1 for operations).
    pub(crate) fn snapshot(&self, scale: f64) -> HistogramSnapshot {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        HistogramSnapshot {
            bounds: self.bounds.iter().map(|&b| b as f64 / scale).collect(),
            count: counts.iter().sum(),
            counts,
            sum: self.sum.load(Ordering::Relaxed) as f64 / scale,
        }
    }
}

/// A histogram as read at one instant.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct HistogramSnapshot {
    /// Upper bounds of the buckets (inclusive), ascending.
    pub bounds: Vec<f64>,
    /// Observations per bucket (not cumulative), one more than `bounds`:
    /// the last counts those above every bound.
    pub counts: Vec<u64>,
    /// Sum of the observations.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

/// A counter per variant of a small label set, indexed by the variant.
#[derive(Debug)]
pub(crate) struct LabeledCounter<const N: usize>([AtomicU64; N]);

impl<const N: usize> Default for LabeledCounter<N> {
    fn default() -> Self {
        LabeledCounter(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl<const N: usize> LabeledCounter<N> {
    pub(crate) fn add(&self, label: usize, n: u64) {
        if let Some(c) = self.0.get(label) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub(crate) fn bump(&self, label: usize) {
        self.add(label, 1);
    }

    /// `(name, count)` for each label, in `names`' order.
    pub(crate) fn read(&self, names: &[&'static str; N]) -> Vec<(&'static str, u64)> {
        names
            .iter()
            .zip(&self.0)
            .map(|(n, c)| (*n, c.load(Ordering::Relaxed)))
            .collect()
    }
}

/// Why a connection ended, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DisconnectLabel {
    Normal = 0,
    WithWill,
    ConnectionLost,
    KeepAliveTimeout,
    TakenOver,
    Kicked,
    Shutdown,
    WriteFailed,
    ProtocolError,
    StorageError,
}

pub(crate) const DISCONNECT_LABELS: [&str; 10] = [
    "normal",
    "with_will",
    "connection_lost",
    "keep_alive_timeout",
    "taken_over",
    "kicked",
    "shutdown",
    "write_failed",
    "protocol_error",
    "storage_error",
];

/// How a CONNECT ended, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnectLabel {
    Accepted = 0,
    /// No valid CONNECT in time (malformed, wrong protocol, timeout).
    Protocol,
    BadCredentials,
    NotAuthorized,
    Throttled,
    ServerUnavailable,
}

pub(crate) const CONNECT_LABELS: [&str; 6] = [
    "accepted",
    "protocol_error",
    "bad_credentials",
    "not_authorized",
    "throttled",
    "server_unavailable",
];

/// Why a message did not reach a subscriber, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DropLabel {
    QueueFull = 0,
    QueueBytes,
    PacketTooLarge,
}

pub(crate) const DROP_LABELS: [&str; 3] = ["queue_full", "queue_bytes", "packet_too_large"];

/// The hooks whose latency is measured, by the name `call_hook` gets.
pub(crate) const HOOK_LABELS: [&str; 5] = [
    "authenticate",
    "authorize_publish",
    "authorize_subscribe",
    "authorize_delivery",
    "other",
];

pub(crate) fn hook_label(hook: &str) -> usize {
    HOOK_LABELS
        .iter()
        .position(|h| *h == hook)
        .unwrap_or(HOOK_LABELS.len() - 1)
}

/// The histograms of the broker.
#[derive(Debug)]
pub(crate) struct Histograms {
    /// Operations per packet-store batch.
    pub(crate) commit_ops: Histogram,
    /// Time of one packet-store batch write.
    pub(crate) commit_us: Histogram,
    /// Time of hook calls, per hook (`HOOK_LABELS`).
    pub(crate) hook_us: [Histogram; HOOK_LABELS.len()],
}

impl Default for Histograms {
    fn default() -> Self {
        Histograms {
            commit_ops: Histogram::new(BATCH_OPS),
            commit_us: Histogram::new(LATENCY_US),
            hook_us: std::array::from_fn(|_| Histogram::new(LATENCY_US)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_whose_bound_holds_them() {
        let h = Histogram::new(&[1, 10, 100]);
        for v in [0, 1, 2, 10, 11, 100, 101, 5000] {
            h.observe(v);
        }
        let s = h.snapshot(1.0);
        assert_eq!(s.counts, vec![2, 2, 2, 2]);
        assert_eq!(s.count, 8);
        assert_eq!(s.sum, 5225.0);
        assert_eq!(s.bounds, vec![1.0, 10.0, 100.0]);
    }

    #[test]
    fn scale_converts_units() {
        let h = Histogram::new(LATENCY_US);
        h.observe(1_500);
        let s = h.snapshot(1e6);
        assert_eq!(s.sum, 0.0015);
        assert_eq!(s.bounds[0], 0.00005);
        assert_eq!(s.counts[5], 1, "1.5 ms is in the 2.5 ms bucket");
    }

    #[test]
    fn labeled_counters_read_in_label_order() {
        let c: LabeledCounter<3> = LabeledCounter::default();
        c.bump(DropLabel::QueueBytes as usize);
        c.add(DropLabel::PacketTooLarge as usize, 4);
        c.bump(99); // out of range: ignored, never a panic
        assert_eq!(
            c.read(&DROP_LABELS),
            vec![
                ("queue_full", 0),
                ("queue_bytes", 1),
                ("packet_too_large", 4)
            ]
        );
        assert_eq!(hook_label("authorize_publish"), 1);
        assert_eq!(hook_label("enhanced_auth"), HOOK_LABELS.len() - 1);
    }
}
