//! A run's result: a human table on stdout, and one JSON object per run
//! (one line) for charts and comparisons.
//!
//! The JSON line is printed as the last line of stdout and, with
//! `--json FILE`, appended to `FILE`. Fields are snake_case; those that only
//! make sense for one scenario are left out of the others (`connections` ...
//! `bytes_per_connection` for `conn`, `drain_per_s` for `persistent`; the
//! `rss_*` and `bytes_per_connection` fields also need `--pid`), and
//! `latency_ms` is all zeros with `samples: 0` where no latency is measured
//! (`conn`, and `persistent`, whose messages wait offline on purpose).

use std::io::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
    /// Deliveries the percentiles are over (0: not measured).
    #[serde(default)]
    pub samples: u64,
}

impl Latency {
    /// Percentiles of a histogram in µs; zeros when it is empty.
    pub fn from_us(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            samples: h.len(),
        }
    }
}

/// One run's result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// Free text from `--label`.
    pub label: String,
    /// `conn`, `fan-in`, `fan-out`, `pairs` or `persistent`.
    pub scenario: String,
    /// Broker address.
    pub target: String,
    /// `tcp`, `tls`, `ws` or `wss`.
    #[serde(default = "tcp")]
    pub transport: String,
    /// QoS of publishes and subscriptions.
    pub qos: u8,
    /// Payload bytes.
    pub payload: usize,
    /// Publisher connections.
    pub publishers: usize,
    /// Subscriber connections.
    pub subscribers: usize,
    /// Total publish rate asked for, msgs/s; 0 = flat out.
    pub rate: u64,
    /// In-flight window per publisher.
    pub inflight: usize,
    /// End-to-end window per publisher (0: none).
    #[serde(default)]
    pub backlog: u64,
    /// Tool worker threads.
    pub threads: usize,
    /// Warm-up excluded from the figures, s.
    pub warmup_s: f64,
    /// Measured window (conn: hold; persistent: publish phase), s.
    pub duration_s: f64,
    /// Publishes written.
    pub sent: u64,
    /// Publishes acknowledged (QoS ≥ 1).
    pub acked: u64,
    /// Deliveries received (duplicates included).
    pub delivered: u64,
    /// Deliveries expected: acknowledged (QoS 0: sent) × matching subscribers.
    pub expected: u64,
    /// Publishes per second in the measured window (persistent: acknowledged).
    pub publish_per_s: f64,
    /// Deliveries per second in the measured window.
    pub delivered_per_s: f64,
    /// Send-to-receive latency of messages sent in the measured window.
    pub latency_ms: Latency,
    /// QoS ≥ 1: acknowledged publishes some subscriber never received.
    pub losses: u64,
    /// QoS 0: publishes some subscriber never received (allowed).
    pub dropped: u64,
    /// Deliveries of a message already received.
    pub duplicates: u64,
    /// Deliveries that came after a later message of the same stream.
    pub order_violations: u64,
    /// Connection and protocol errors.
    pub errors: u64,
    /// Stopped early by Ctrl-C.
    pub interrupted: bool,
    /// Unix time the run ended, s.
    pub unix_time: u64,
    /// `conn`: connections asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<u64>,
    /// `conn`: connections that got an accepting CONNACK.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected: Option<u64>,
    /// `conn`: CONNACKs per second over the connection storm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connects_per_s: Option<f64>,
    /// `conn`: connections that answered PINGREQ at the end of the hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<u64>,
    /// `conn` with `--pid`: broker RSS before connecting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_before_kb: Option<u64>,
    /// `conn` with `--pid`: broker RSS at the end of the hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_after_kb: Option<u64>,
    /// `conn` with `--pid`: (after − before) / held, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_per_connection: Option<f64>,
    /// `persistent`: deliveries per second while draining the offline queues.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_per_s: Option<f64>,
}

impl RunResult {
    /// The JSON object, on one line.
    pub fn json_line(&self) -> String {
        serde_json::to_string(self).expect("a result always serialises")
    }

    /// Append the JSON line to `path`.
    pub fn append_json(&self, path: &Path) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(f, "{}", self.json_line()).with_context(|| format!("writing {}", path.display()))
    }

    /// The human table.
    pub fn table(&self) -> String {
        let mut rows: Vec<(&str, String)> = Vec::new();
        let label = if self.label.is_empty() {
            "-"
        } else {
            &self.label
        };
        rows.push((
            "run",
            format!(
                "{} against {} ({label}){}",
                self.scenario,
                self.target,
                if self.interrupted {
                    ", interrupted"
                } else {
                    ""
                }
            ),
        ));
        if let (Some(asked), Some(connected), Some(held)) =
            (self.connections, self.connected, self.held)
        {
            rows.push((
                "connections",
                format!(
                    "{asked} asked, {connected} connected, {held} held after {:.1} s",
                    self.duration_s
                ),
            ));
            rows.push((
                "connects/s",
                format!("{:.0}", self.connects_per_s.unwrap_or(0.0)),
            ));
            let kb = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{v} kB"));
            rows.push((
                "broker RSS",
                format!(
                    "{} before, {} after",
                    kb(self.rss_before_kb),
                    kb(self.rss_after_kb)
                ),
            ));
            rows.push((
                "per connection",
                self.bytes_per_connection
                    .map_or("- (give --pid)".to_string(), |b| format!("{b:.0} bytes")),
            ));
        } else {
            let rate = if self.rate == 0 {
                "flat out".to_string()
            } else {
                format!("{} msg/s", self.rate)
            };
            rows.push((
                "load",
                format!(
                    "QoS {}, {} B payload, {} publishers -> {} subscribers, {rate}, in-flight {}, backlog {}",
                    self.qos, self.payload, self.publishers, self.subscribers, self.inflight,
                    if self.backlog == 0 { "-".to_string() } else { self.backlog.to_string() }
                ),
            ));
            rows.push((
                "window",
                format!(
                    "{:.1} s after {:.1} s warm-up",
                    self.duration_s, self.warmup_s
                ),
            ));
            rows.push(("sent / acked", format!("{} / {}", self.sent, self.acked)));
            rows.push((
                "delivered",
                format!("{} of {} expected", self.delivered, self.expected),
            ));
            rows.push(("publish/s", format!("{:.0}", self.publish_per_s)));
            rows.push(("delivered/s", format!("{:.0}", self.delivered_per_s)));
            if let Some(d) = self.drain_per_s {
                rows.push(("drain/s", format!("{d:.0}")));
            }
            let l = &self.latency_ms;
            rows.push((
                "latency ms",
                if l.samples == 0 {
                    "-".to_string()
                } else {
                    format!(
                        "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  ({} samples)",
                        l.p50, l.p90, l.p99, l.p999, l.max, l.samples
                    )
                },
            ));
            let missing = if self.qos == 0 {
                format!("dropped {} (QoS 0)", self.dropped)
            } else {
                format!("losses {}", self.losses)
            };
            rows.push((
                "checks",
                format!(
                    "{missing}, duplicates {}, order violations {}",
                    self.duplicates, self.order_violations
                ),
            ));
        }
        rows.push(("errors", self.errors.to_string()));
        let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        rows.iter()
            .map(|(k, v)| format!("{k:<w$}  {v}\n"))
            .collect()
    }
}

/// Results written before transports were recorded were over TCP.
fn tcp() -> String {
    "tcp".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_fields_only_where_they_belong() {
        let mut r = RunResult {
            scenario: "fan-in".into(),
            ..Default::default()
        };
        let v: serde_json::Value = serde_json::from_str(&r.json_line()).expect("json");
        assert!(v.get("connects_per_s").is_none());
        assert!(v.get("drain_per_s").is_none());
        assert_eq!(v["latency_ms"]["samples"], 0);
        r.connections = Some(5);
        r.drain_per_s = Some(1.0);
        let v: serde_json::Value = serde_json::from_str(&r.json_line()).expect("json");
        assert_eq!(v["connections"], 5);
        assert!(v.get("rss_before_kb").is_none());
        assert_eq!(v["drain_per_s"], 1.0);
        let back: RunResult = serde_json::from_str(&r.json_line()).expect("parses back");
        assert_eq!(back, r);
    }
}
