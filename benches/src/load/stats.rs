//! Counting: latency histograms, and the delivery accounting that turns
//! "messages arrived" into losses, duplicates and order violations.
//!
//! Each subscriber keeps, for every stream (see [`super::payload`]) it
//! receives, a [`StreamTrack`]: a bit per sequence number seen, the highest
//! sequence so far, and counters. A delivery with sequence `s` is
//!
//! - a **duplicate** when `s` was seen before (QoS 1 allows them, e.g. a
//!   resend after reconnect; QoS 2 does not, but either way they are counted
//!   apart from order problems);
//! - an **order violation** when `s` is new but lower than the highest seen:
//!   it was overtaken by a later message of the same stream;
//! - otherwise in order (a jump forward is not an order violation: the
//!   messages in between are either late, which shows up as an order violation
//!   when they come, or missing, which shows up as a loss).
//!
//! Each publisher keeps, per stream, a bit per sequence number the broker
//! acknowledged (PUBACK for QoS 1, PUBREC for QoS 2: from then on the broker
//! owns the message). At the end, for QoS ≥ 1,
//! **losses** = acknowledged sequences a subscriber never received, summed over
//! (stream, subscriber) pairs: exactly "expected − distinct received", without
//! counting publishes that were sent but never acknowledged (the run ended or
//! the connection dropped before the broker answered) as expected. For QoS 0
//! there is no acknowledgement; the expected set is every sequence sent and
//! what is missing is reported as **dropped**, which QoS 0 permits.

use hdrhistogram::Histogram;

/// Largest sequence number accepted from a payload; anything above is
/// treated as corrupt rather than allocating a huge bit set.
pub const MAX_SEQ: u64 = 1 << 34;

/// A growable set of sequence numbers, one bit each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BitSet {
    words: Vec<u64>,
    len: u64,
}

impl BitSet {
    /// Insert `i`; true if it was not there.
    pub fn insert(&mut self, i: u64) -> bool {
        let w = usize::try_from(i / 64).expect("sequence numbers are bounded by MAX_SEQ");
        if w >= self.words.len() {
            self.words.resize((w + 1).max(self.words.len() * 2), 0);
        }
        let bit = 1u64 << (i % 64);
        let fresh = self.words[w] & bit == 0;
        self.words[w] |= bit;
        self.len += u64::from(fresh);
        fresh
    }

    /// Whether `i` is in the set.
    pub fn contains(&self, i: u64) -> bool {
        usize::try_from(i / 64)
            .ok()
            .and_then(|w| self.words.get(w))
            .is_some_and(|w| w & (1u64 << (i % 64)) != 0)
    }

    /// Number of members.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Members of `self` that are not in `other`.
    pub fn count_missing_from(&self, other: &BitSet) -> u64 {
        self.words
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let o = other.words.get(i).copied().unwrap_or(0);
                u64::from((w & !o).count_ones())
            })
            .sum()
    }
}

/// Members of `acked` missing from `seen`: how many, the first and the last.
pub fn missing_range(acked: &BitSet, seen: &BitSet) -> Option<(u64, u64, u64)> {
    let mut count = 0;
    let mut first = None;
    let mut last = 0;
    for (i, w) in acked.words.iter().enumerate() {
        let m = w & !seen.words.get(i).copied().unwrap_or(0);
        if m != 0 {
            let base = i as u64 * 64;
            first.get_or_insert(base + u64::from(m.trailing_zeros()));
            last = base + 63 - u64::from(m.leading_zeros());
            count += u64::from(m.count_ones());
        }
    }
    first.map(|f| (count, f, last))
}

/// What one subscriber saw of one stream.
#[derive(Debug, Clone, Default)]
pub struct StreamTrack {
    /// Sequences received at least once.
    pub seen: BitSet,
    /// Highest sequence received.
    pub max_seq: Option<u64>,
    /// Deliveries of a sequence already seen.
    pub duplicates: u64,
    /// New sequences lower than one already seen.
    pub order_violations: u64,
}

/// How a delivery was classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// New and higher than anything before.
    InOrder,
    /// New but lower than something before.
    OutOfOrder,
    /// Seen before.
    Duplicate,
}

impl StreamTrack {
    /// Record sequence `seq`.
    pub fn record(&mut self, seq: u64) -> Arrival {
        if !self.seen.insert(seq) {
            self.duplicates += 1;
            return Arrival::Duplicate;
        }
        match self.max_seq {
            Some(m) if seq < m => {
                self.order_violations += 1;
                Arrival::OutOfOrder
            }
            _ => {
                self.max_seq = Some(seq);
                Arrival::InOrder
            }
        }
    }

    /// Distinct sequences received.
    pub fn distinct(&self) -> u64 {
        self.seen.len()
    }
}

/// A latency histogram in microseconds, 1 µs to 10 minutes, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Everything one subscriber measured.
#[derive(Debug, Clone)]
pub struct SubscriberStats {
    /// Per stream id, for the streams that delivered anything: sparse, as
    /// a run with a topic per session has streams = publishers x sessions,
    /// and a dense table per subscriber would be quadratic (24 GB at
    /// 10,000 sessions).
    pub streams: std::collections::HashMap<u32, StreamTrack>,
    /// Stream ids run from 0 to this (exclusive).
    pub nstreams: usize,
    /// Latency of deliveries whose payload was sent in the measured window, µs.
    pub latency_us: Histogram<u64>,
    /// Every PUBLISH of this run received (duplicates included).
    pub delivered: u64,
    /// Deliveries received within the measured window.
    pub delivered_in_window: u64,
    /// PUBLISHes that were not ours or not parseable.
    pub foreign: u64,
    /// Deliveries on streams this subscriber should not get.
    pub unexpected: u64,
    /// Receive time of the first and last delivery, ns since the payload epoch.
    pub first_ns: Option<u64>,
    /// See `first_ns`.
    pub last_ns: Option<u64>,
    /// Protocol or connection problems, described.
    pub errors: Vec<String>,
}

impl SubscriberStats {
    /// Empty stats for a run with `streams` streams.
    pub fn new(streams: usize) -> SubscriberStats {
        SubscriberStats {
            streams: std::collections::HashMap::new(),
            nstreams: streams,
            latency_us: latency_histogram(),
            delivered: 0,
            delivered_in_window: 0,
            foreign: 0,
            unexpected: 0,
            first_ns: None,
            last_ns: None,
            errors: Vec::new(),
        }
    }

    /// Record a delivery of (`stream`, `seq`) received at `now_ns`. Returns the
    /// classification, or `None` when the stream id is out of range.
    pub fn record(&mut self, stream: u32, seq: u64, now_ns: u64) -> Option<Arrival> {
        if seq > MAX_SEQ {
            self.foreign += 1;
            return None;
        }
        if stream as usize >= self.nstreams {
            self.unexpected += 1;
            return None;
        }
        self.delivered += 1;
        self.first_ns.get_or_insert(now_ns);
        self.last_ns = Some(now_ns);
        Some(self.streams.entry(stream).or_default().record(seq))
    }

    /// The track of `stream`, if anything arrived on it.
    pub fn track(&self, stream: u32) -> Option<&StreamTrack> {
        self.streams.get(&stream)
    }

    /// Distinct deliveries over all streams.
    pub fn distinct(&self) -> u64 {
        self.streams.values().map(StreamTrack::distinct).sum()
    }
}

/// What one publisher stream sent and had acknowledged.
#[derive(Debug, Clone, Default)]
pub struct StreamSent {
    /// Publishes written (sequences 0..sent).
    pub sent: u64,
    /// Sequences the broker acknowledged (QoS ≥ 1).
    pub acked: BitSet,
}

/// Totals over a run's (stream, subscriber) pairs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accounting {
    /// Deliveries the subscribers should have received.
    pub expected: u64,
    /// Distinct deliveries received of those.
    pub distinct: u64,
    /// QoS ≥ 1: acknowledged publishes a subscriber never got.
    pub losses: u64,
    /// QoS 0: sent publishes a subscriber never got.
    pub dropped: u64,
    /// Deliveries of a sequence already received.
    pub duplicates: u64,
    /// Deliveries that arrived after a later sequence of their stream.
    pub order_violations: u64,
}

/// Compare what was sent with what arrived. `streams[i]` is stream `i`;
/// `routes[s]` lists the streams subscriber `s` should receive.
pub fn account(
    qos: u8,
    streams: &[StreamSent],
    subscribers: &[SubscriberStats],
    routes: &[Vec<u32>],
) -> Accounting {
    let mut a = Accounting::default();
    for (sub, wanted) in subscribers.iter().zip(routes) {
        for track in sub.streams.values() {
            a.duplicates += track.duplicates;
            a.order_violations += track.order_violations;
        }
        for &stream in wanted {
            let Some(sent) = streams.get(stream as usize) else {
                continue;
            };
            let empty = StreamTrack::default();
            let track = sub.track(stream).unwrap_or(&empty);
            if qos == 0 {
                let got = track.distinct().min(sent.sent);
                a.expected += sent.sent;
                a.distinct += got;
                a.dropped += sent.sent - got;
            } else {
                let missing = sent.acked.count_missing_from(&track.seen);
                a.expected += sent.acked.len();
                a.distinct += sent.acked.len() - missing;
                a.losses += missing;
            }
        }
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitset_basics() {
        let mut b = BitSet::default();
        assert!(b.insert(0));
        assert!(b.insert(1000));
        assert!(!b.insert(1000));
        assert!(b.contains(1000) && !b.contains(999) && !b.contains(1 << 40));
        assert_eq!(b.len(), 2);
        let mut c = BitSet::default();
        c.insert(1000);
        assert_eq!(b.count_missing_from(&c), 1);
        assert_eq!(c.count_missing_from(&b), 0);
    }

    #[test]
    fn missing_ranges() {
        let mut acked = BitSet::default();
        let mut seen = BitSet::default();
        for i in 0..300 {
            acked.insert(i);
            if !(70..=130).contains(&i) && i != 200 {
                seen.insert(i);
            }
        }
        assert_eq!(missing_range(&acked, &seen), Some((62, 70, 200)));
        assert_eq!(missing_range(&seen, &acked), None);
    }

    #[test]
    fn duplicates_and_order_violations_are_counted_apart() {
        let mut t = StreamTrack::default();
        let arrivals: Vec<Arrival> = [0, 1, 3, 2, 3, 4, 0, 6]
            .iter()
            .map(|s| t.record(*s))
            .collect();
        use Arrival::*;
        assert_eq!(
            arrivals,
            [InOrder, InOrder, InOrder, OutOfOrder, Duplicate, InOrder, Duplicate, InOrder]
        );
        assert_eq!(t.duplicates, 2);
        assert_eq!(t.order_violations, 1);
        assert_eq!(t.distinct(), 6); // 0 1 2 3 4 6; 5 missing
        assert_eq!(t.max_seq, Some(6));
    }

    fn sent(n: u64, acked: impl IntoIterator<Item = u64>) -> StreamSent {
        let mut s = StreamSent {
            sent: n,
            ..Default::default()
        };
        for i in acked {
            s.acked.insert(i);
        }
        s
    }

    #[test]
    fn losses_count_only_acknowledged_publishes() {
        // Stream 0: 10 sent, 0..8 acknowledged (8 and 9 were in flight at the end).
        // Stream 1: 5 sent, all acknowledged.
        let streams = vec![sent(10, 0..8), sent(5, 0..5)];
        let mut a = SubscriberStats::new(2);
        for s in [0, 1, 2, 4, 5, 6, 7, 9] {
            a.record(0, s, 1); // 3 lost; 9 unacknowledged but delivered: no loss, no credit
        }
        for s in [0, 1, 2, 3, 4, 4] {
            a.record(1, s, 1);
        }
        let mut b = SubscriberStats::new(2);
        for s in 0..8 {
            b.record(0, s, 1);
        }
        // b is routed stream 0 only; a gets both.
        let acc = account(1, &streams, &[a, b], &[vec![0, 1], vec![0]]);
        assert_eq!(
            acc,
            Accounting {
                expected: 8 + 5 + 8,
                distinct: 7 + 5 + 8,
                losses: 1,
                dropped: 0,
                duplicates: 1,
                order_violations: 0,
            }
        );
    }

    #[test]
    fn qos0_reports_dropped_not_losses() {
        let streams = vec![sent(10, [])];
        let mut a = SubscriberStats::new(1);
        for s in [0, 1, 2, 5, 3] {
            a.record(0, s, 1);
        }
        let acc = account(0, &streams, &[a], &[vec![0]]);
        assert_eq!(acc.losses, 0);
        assert_eq!(acc.dropped, 5);
        assert_eq!(acc.expected, 10);
        assert_eq!(acc.order_violations, 1);
    }

    #[test]
    fn out_of_range_streams_and_sequences_are_not_counted_as_deliveries() {
        let mut a = SubscriberStats::new(1);
        assert_eq!(a.record(3, 0, 1), None);
        assert_eq!(a.record(0, MAX_SEQ + 1, 1), None);
        assert_eq!(a.delivered, 0);
        assert_eq!((a.unexpected, a.foreign), (1, 1));
    }
}
