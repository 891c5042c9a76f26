//! `GET /metrics`: [`Broker::metrics`] in the OpenMetrics text format
//! (which Prometheus scrapes), through `prometheus-client`. The broker's
//! counters are its own relaxed atomics; this module only reads a snapshot
//! per scrape, so nothing of Prometheus sits on the hot path.
//!
//! Names: `broker_` then what is counted; counters end in `_total`
//! (added by the encoder), durations are in seconds.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use broker_core::{Broker, HistogramSnapshot, Metrics};
use broker_http_hooks::{HttpAuthStats, WebhookStats};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::{error, starting, Shared};

/// How long a count of the retained messages is reused: counting reads
/// every retained message from the store.
const RETAINED_FRESH: Duration = Duration::from_secs(15);

/// The retained-message count, read from the store at most every
/// [`RETAINED_FRESH`].
#[derive(Default)]
pub(crate) struct RetainedCount(Mutex<Option<(Instant, u64)>>);

impl RetainedCount {
    async fn get(&self, broker: &Broker) -> Option<u64> {
        if let Ok(guard) = self.0.lock() {
            if let Some((at, n)) = *guard {
                if at.elapsed() < RETAINED_FRESH {
                    return Some(n);
                }
            }
        }
        // `#` leaves out `$` topics; the broker's own `$SYS` ones are not retained in the store.
        let n = broker.retained("#").await.ok()?.len() as u64;
        if let Ok(mut guard) = self.0.lock() {
            *guard = Some((Instant::now(), n));
        }
        Some(n)
    }
}

pub(super) async fn scrape(State(shared): State<Arc<Shared>>) -> Response {
    let Some(broker) = shared.broker.get() else {
        return starting();
    };
    let extras = shared.extras.get();
    let snapshot = Snapshot {
        metrics: broker.metrics(),
        retained: shared.retained.get(broker).await,
        webhook: extras.and_then(|e| e.webhook.as_ref()).map(|w| w.stats()),
        http_auth: extras.and_then(|e| e.http_auth.as_ref()).map(|h| h.stats()),
    };
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot));
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the metrics",
        ),
    }
}

/// One scrape's values.
#[derive(Debug)]
struct Snapshot {
    metrics: Metrics,
    retained: Option<u64>,
    webhook: Option<WebhookStats>,
    http_auth: Option<HttpAuthStats>,
}

type Out<'a> = DescriptorEncoder<'a>;

fn counter(out: &mut Out<'_>, name: &str, help: &str, v: u64) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    c.encode(out.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(out: &mut Out<'_>, name: &str, help: &str, v: u64) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
    g.encode(out.encode_descriptor(name, help, None, g.metric_type())?)
}

/// A counter family with one label.
fn counters(
    out: &mut Out<'_>,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, u64)],
) -> Result<(), std::fmt::Error> {
    let mut family = out.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (l, v) in values {
        ConstCounter::new(*v).encode(family.encode_family(&[(label, *l)])?)?;
    }
    Ok(())
}

fn histogram(
    out: &mut Out<'_>,
    name: &str,
    help: &str,
    series: &[(Option<(&str, &str)>, &HistogramSnapshot)],
) -> Result<(), std::fmt::Error> {
    let mut family = out.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (label, h) in series {
        let buckets: Vec<(f64, u64)> = h
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(h.counts.iter().copied())
            .collect();
        let none: Option<&std::collections::HashMap<usize, _>> = None;
        match label {
            Some(l) => family
                .encode_family(&[*l])?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    h.sum, h.count, &buckets, none,
                )?,
            None => family.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                h.sum, h.count, &buckets, none,
            )?,
        }
    }
    Ok(())
}

impl Collector for Snapshot {
    fn encode(&self, mut out: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.metrics;
        let s = &m.stats;
        let out = &mut out;

        let mut family = out.encode_descriptor(
            "broker_connections",
            "Clients connected now, by listener and protocol version",
            None,
            MetricType::Gauge,
        )?;
        for (listener, protocol, n) in &m.connections {
            ConstGauge::new(i64::try_from(*n).unwrap_or(i64::MAX)).encode(
                family.encode_family(&[("listener", listener.as_str()), ("protocol", protocol)])?,
            )?;
        }
        counters(
            out,
            "broker_connects",
            "CONNECTs by outcome",
            "outcome",
            &m.connects,
        )?;
        counters(
            out,
            "broker_disconnects",
            "Ended connections by reason",
            "reason",
            &m.disconnects,
        )?;
        counters(
            out,
            "broker_connections_refused",
            "Connections closed at accept by a limit",
            "limit",
            &[
                ("max_connections", s.connections_over_limit),
                ("max_connection_rate", s.connections_over_rate),
            ],
        )?;
        let qos = |v: &[u64; 3]| [("0", v[0]), ("1", v[1]), ("2", v[2])];
        counters(
            out,
            "broker_messages_received",
            "PUBLISH packets received from clients, by QoS",
            "qos",
            &qos(&m.messages_in),
        )?;
        counters(
            out,
            "broker_messages_sent",
            "PUBLISH packets sent to clients, by QoS",
            "qos",
            &qos(&m.messages_out),
        )?;
        counter(
            out,
            "broker_messages_published",
            "Messages routed: from clients, wills, the application and $SYS",
            s.published,
        )?;
        counter(
            out,
            "broker_bytes_received",
            "Bytes read from clients",
            s.bytes_received,
        )?;
        counter(
            out,
            "broker_bytes_sent",
            "Bytes written to clients",
            s.bytes_sent,
        )?;
        counters(
            out,
            "broker_messages_dropped",
            "Messages not delivered to a subscriber, by reason",
            "reason",
            &m.drops,
        )?;
        if let Some(n) = self.retained {
            gauge(
                out,
                "broker_retained_messages",
                "Retained messages in the store (counted at most every 15 s)",
                n,
            )?;
        }
        let mut family = out.encode_descriptor(
            "broker_sessions",
            "Sessions held, by state",
            None,
            MetricType::Gauge,
        )?;
        for (state, n) in [
            ("online", m.sessions_online),
            ("offline", m.sessions_offline),
        ] {
            ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX))
                .encode(family.encode_family(&[("state", state)])?)?;
        }
        gauge(
            out,
            "broker_queued_messages",
            "Messages queued in all sessions, in flight included",
            m.queued_messages,
        )?;
        gauge(
            out,
            "broker_queued_in_store_messages",
            "Of the queued messages, those still in the store only (not read since the start)",
            m.queued_in_store,
        )?;
        gauge(
            out,
            "broker_queued_bytes",
            "Bytes charged for the queued messages in memory",
            m.queued_bytes,
        )?;
        gauge(
            out,
            "broker_inflight_messages",
            "Deliveries sent and not yet acknowledged",
            m.in_flight,
        )?;
        histogram(
            out,
            "broker_store_batch_operations",
            "Operations per packet-store batch (group commit)",
            &[(None, &m.commit_batch_ops)],
        )?;
        histogram(
            out,
            "broker_store_commit_seconds",
            "Time of one packet-store batch write",
            &[(None, &m.commit_seconds)],
        )?;
        let hooks: Vec<(Option<(&str, &str)>, &HistogramSnapshot)> = m
            .hook_seconds
            .iter()
            .filter(|(_, h)| h.count > 0)
            .map(|(name, h)| (Some(("hook", *name)), h))
            .collect();
        histogram(
            out,
            "broker_hook_duration_seconds",
            "Time of hook calls (authentication, authorization), by hook",
            &hooks,
        )?;
        counter(
            out,
            "broker_authentication_failures",
            "Connections the authentication refused",
            s.authentication_failures,
        )?;
        counter(
            out,
            "broker_authentication_throttled",
            "Connections refused because their address failed too many authentications",
            s.authentication_throttled,
        )?;
        counter(
            out,
            "broker_authorization_denials",
            "Publishes, subscriptions and deliveries the authorization denied",
            s.authorization_denials,
        )?;
        counter(
            out,
            "broker_hook_failures",
            "Hook calls that timed out, failed or panicked",
            s.hook_failures,
        )?;
        counter(
            out,
            "broker_storage_errors",
            "Store writes that failed",
            s.storage_errors,
        )?;
        counter(
            out,
            "broker_page_read_errors",
            "Reads of a page of a stored queue that failed (each is retried)",
            s.page_read_errors,
        )?;
        counter(
            out,
            "broker_subscriptions_refused",
            "Subscriptions refused by max_subscriptions_per_client",
            s.subscriptions_refused,
        )?;
        counter(
            out,
            "broker_events_dropped",
            "Events a slow listener lost",
            s.events_dropped,
        )?;
        gauge(
            out,
            "broker_clients_maximum",
            "The most clients connected at once",
            s.clients_maximum,
        )?;
        if let Some(w) = &self.webhook {
            counters(
                out,
                "broker_webhook_events",
                "Events of the [webhook]: acknowledged by the service, or dropped",
                "outcome",
                &[("sent", w.sent), ("dropped", w.dropped)],
            )?;
            counter(
                out,
                "broker_webhook_failed_posts",
                "POSTs of the [webhook] that failed (each retry counts)",
                w.failed_posts,
            )?;
        }
        if let Some(h) = &self.http_auth {
            counter(
                out,
                "broker_http_auth_requests",
                "Calls made to the [auth] HTTP service",
                h.requests,
            )?;
            counter(
                out,
                "broker_http_auth_failures",
                "Calls to the [auth] HTTP service that gave no decision (refused)",
                h.failures,
            )?;
            counters(
                out,
                "broker_http_auth_cache",
                "Decisions of the [auth] HTTP caches",
                "result",
                &[
                    ("hit", h.cache_hits),
                    ("miss", h.cache_misses),
                    ("eviction", h.cache_evictions),
                ],
            )?;
        }
        let info = out.encode_descriptor(
            "broker_build",
            "The broker's version",
            None,
            MetricType::Info,
        )?;
        prometheus_client::metrics::info::Info::new([("version", crate::settings::VERSION)])
            .encode(info)?;
        Ok(())
    }
}
