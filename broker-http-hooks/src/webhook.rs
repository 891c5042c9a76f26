//! The broker's events, POSTed to a URL in batches.
//!
//! # Contract
//! - One task reads the broker's [event stream](broker_core::events) and
//!   POSTs JSON arrays of at most `batch_max` events, one batch at a time,
//!   so events reach the service in the order the broker told them.
//! - The broker never waits for the service: events wait in a queue of
//!   `queue` events; when it is full they are dropped and counted (the
//!   event stream's own counter), as are batches given up after retries.
//! - A batch that fails for a reason that may pass (no answer, connection
//!   refused, `429`, `5xx`) is sent again after 100 ms, 200 ms, ... up to
//!   10 s between tries, `max_retries` times; other answers (`4xx`) drop it
//!   at once. Each drop is counted and logged.
//! - When the broker stops, the stream ends; [`Webhook::finish`] posts what
//!   is left within a bound.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use broker_core::events::{DropCause, Event, EventStream};
use broker_core::hooks::ClientInfo;
use broker_core::message::Message;
use serde_json::{json, Map, Value};
use tokio::task::JoinHandle;

use crate::client::{check_url, CallError, ConfigError, Poster};

/// The names of the events, as `events` lists them and as `event` says in each JSON object.
pub const EVENT_NAMES: &[&str] = &[
    "ready",
    "shutting_down",
    "client_connected",
    "client_disconnected",
    "connection_error",
    "message_published",
    "subscribed",
    "unsubscribed",
    "message_delivered",
    "message_acknowledged",
    "message_dropped",
    "session_created",
    "session_resumed",
    "session_expired",
    "will_published",
];

/// The events posted when `events` is not set: all but the two per
/// delivery (`message_delivered`, `message_acknowledged`), which multiply
/// by the number of subscribers.
pub const DEFAULT_EVENTS: &[&str] = &[
    "ready",
    "shutting_down",
    "client_connected",
    "client_disconnected",
    "connection_error",
    "message_published",
    "subscribed",
    "unsubscribed",
    "message_dropped",
    "session_created",
    "session_resumed",
    "session_expired",
    "will_published",
];

/// Settings of a [`Webhook`]: the binary's `[webhook]` table.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Where batches go (`url`).
    pub url: String,
    /// Which events (`events`, default [`DEFAULT_EVENTS`]).
    pub events: Vec<String>,
    /// Events per POST at most (`batch_max`, default 100).
    pub batch_max: usize,
    /// Events waiting to be posted at most (`queue`, default 10,000).
    pub queue: usize,
    /// Tries after the first for one batch (`max_retries`, default 5).
    pub max_retries: u32,
    /// How long one POST may take (`timeout_ms`, default 5 s).
    pub timeout: Duration,
    /// Headers sent with every POST, e.g. `Authorization` (`headers`).
    pub headers: Vec<(String, String)>,
}

impl WebhookConfig {
    /// The defaults, posting to `url`.
    pub fn new(url: impl Into<String>) -> WebhookConfig {
        WebhookConfig {
            url: url.into(),
            events: DEFAULT_EVENTS.iter().map(|s| s.to_string()).collect(),
            batch_max: 100,
            queue: 10_000,
            max_retries: 5,
            timeout: Duration::from_secs(5),
            headers: Vec::new(),
        }
    }
}

impl WebhookConfig {
    /// Whether [`Webhook::start`] would accept these settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.checked().map(|_| ())
    }

    fn checked(&self) -> Result<(reqwest::Url, Selection, Poster), ConfigError> {
        let url = check_url("url", &self.url)?;
        let selection = Selection::parse(&self.events)?;
        for (value, key) in [(self.batch_max, "batch_max"), (self.queue, "queue")] {
            if value == 0 {
                return Err(ConfigError::Zero(key));
            }
        }
        let poster = Poster::new(self.timeout, 1, &self.headers)?;
        Ok((url, selection, poster))
    }
}

/// Counters of a [`Webhook`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WebhookStats {
    /// Events the service acknowledged (2xx).
    pub sent: u64,
    /// Batches the service acknowledged.
    pub batches: u64,
    /// POSTs that failed (each retry counts).
    pub failed_posts: u64,
    /// Events dropped: the queue was full, or their batch was given up.
    pub dropped: u64,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    batches: AtomicU64,
    failed_posts: AtomicU64,
    given_up: AtomicU64,
    queue_dropped: AtomicU64,
}

impl Counters {
    fn read(&self) -> WebhookStats {
        WebhookStats {
            sent: self.sent.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            failed_posts: self.failed_posts.load(Ordering::Relaxed),
            dropped: self.given_up.load(Ordering::Relaxed)
                + self.queue_dropped.load(Ordering::Relaxed),
        }
    }
}

/// Reads a [`Webhook`]'s counters ([`Webhook::watch`]); cheap to clone.
#[derive(Clone)]
pub struct WebhookWatch(Arc<Counters>);

impl WebhookWatch {
    /// The counters now.
    pub fn stats(&self) -> WebhookStats {
        self.0.read()
    }
}

impl std::fmt::Debug for WebhookWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("WebhookWatch").field(&self.stats()).finish()
    }
}

/// Which events to post, as a bit per [`EVENT_NAMES`] entry.
#[derive(Clone, Copy)]
struct Selection(u32);

impl Selection {
    fn parse(names: &[String]) -> Result<Selection, ConfigError> {
        let mut bits = 0;
        for n in names {
            let i = EVENT_NAMES
                .iter()
                .position(|k| k == n)
                .ok_or_else(|| ConfigError::Event(n.clone()))?;
            bits |= 1 << i;
        }
        Ok(Selection(bits))
    }

    fn wants(self, name: &str) -> bool {
        EVENT_NAMES
            .iter()
            .position(|k| *k == name)
            .is_some_and(|i| self.0 & (1 << i) != 0)
    }
}

/// A running webhook: one task POSTing the broker's events in batches, in
/// order, never slowing the broker (events past its queue are dropped and
/// counted).
pub struct Webhook {
    task: JoinHandle<()>,
    counters: Arc<Counters>,
    url: String,
}

impl Webhook {
    /// Check `config` and start posting the events of `broker`.
    pub fn start(
        broker: &broker_core::Broker,
        config: &WebhookConfig,
    ) -> Result<Webhook, ConfigError> {
        let (url, selection, poster) = config.checked()?;
        let counters = Arc::new(Counters::default());
        let stream = broker.events(config.queue);
        let task = tokio::spawn(run(
            stream,
            poster,
            url,
            selection,
            config.batch_max,
            config.max_retries,
            counters.clone(),
        ));
        Ok(Webhook {
            task,
            counters,
            url: config.url.clone(),
        })
    }

    /// The counters so far.
    pub fn stats(&self) -> WebhookStats {
        self.counters.read()
    }

    /// A handle that reads the counters while the webhook runs and after
    /// it finished (for a metrics exporter).
    pub fn watch(&self) -> WebhookWatch {
        WebhookWatch(self.counters.clone())
    }

    /// After the broker has shut down: post what is left, for at most
    /// `within`; what is still unsent then is dropped, with a log line.
    pub async fn finish(self, within: Duration) -> WebhookStats {
        let mut task = self.task;
        if tokio::time::timeout(within, &mut task).await.is_err() {
            task.abort();
            tracing::warn!(
                "webhook {}: events still unsent {} ms after shutdown were dropped",
                self.url,
                within.as_millis()
            );
        }
        let c = &self.counters;
        WebhookStats {
            sent: c.sent.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            failed_posts: c.failed_posts.load(Ordering::Relaxed),
            dropped: c.given_up.load(Ordering::Relaxed) + c.queue_dropped.load(Ordering::Relaxed),
        }
    }
}

async fn run(
    mut stream: EventStream,
    poster: Poster,
    url: reqwest::Url,
    selection: Selection,
    batch_max: usize,
    max_retries: u32,
    counters: Arc<Counters>,
) {
    let mut batch: Vec<Value> = Vec::with_capacity(batch_max);
    let mut reported_drops = 0;
    loop {
        // Wait for one event, then take what is already waiting.
        let Some(first) = stream.recv().await else {
            break;
        };
        let mut next = Some(first);
        while let Some(event) = next {
            if let Some(v) = to_json(&event).filter(|v| selection.wants(name_of(v))) {
                batch.push(v);
            }
            next = if batch.len() < batch_max {
                stream.try_recv()
            } else {
                None
            };
        }
        let dropped = stream.dropped();
        counters.queue_dropped.store(dropped, Ordering::Relaxed);
        if dropped > reported_drops {
            tracing::warn!(
                "webhook {url}: its queue was full, {} events dropped so far",
                dropped
            );
            reported_drops = dropped;
        }
        if !batch.is_empty() {
            // The queue keeps filling while a batch is retried: its drops
            // are counted as they happen, not only once the batch is done.
            let post = post_batch(&poster, &url, &mut batch, max_retries, &counters);
            tokio::pin!(post);
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tokio::select! {
                    () = &mut post => break,
                    _ = tick.tick() => counters
                        .queue_dropped
                        .store(stream.dropped(), Ordering::Relaxed),
                }
            }
        }
    }
    counters
        .queue_dropped
        .store(stream.dropped(), Ordering::Relaxed);
}

async fn post_batch(
    poster: &Poster,
    url: &reqwest::Url,
    batch: &mut Vec<Value>,
    max_retries: u32,
    counters: &Counters,
) {
    let n = batch.len() as u64;
    let body = match serde_json::to_vec(&*batch) {
        Ok(b) => b,
        Err(e) => {
            counters.given_up.fetch_add(n, Ordering::Relaxed);
            tracing::error!("webhook {url}: cannot encode {n} events: {e}");
            batch.clear();
            return;
        }
    };
    batch.clear();
    let mut backoff = Duration::from_millis(100);
    let mut attempt = 0;
    loop {
        let outcome = match poster.post(url, body.clone()).await {
            Ok(r) if (200..300).contains(&r.status) => Ok(()),
            Ok(r) => Err(CallError::Status(r.status)),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => {
                counters.sent.fetch_add(n, Ordering::Relaxed);
                counters.batches.fetch_add(1, Ordering::Relaxed);
                if attempt > 0 {
                    tracing::info!("webhook {url}: delivered after {attempt} retries");
                }
                return;
            }
            Err(e) => {
                counters.failed_posts.fetch_add(1, Ordering::Relaxed);
                if !e.is_transient() || attempt >= max_retries {
                    counters.given_up.fetch_add(n, Ordering::Relaxed);
                    tracing::warn!(
                        "webhook {url}: dropped a batch of {n} events after {} tries: {e}",
                        attempt + 1
                    );
                    return;
                }
                if attempt == 0 {
                    tracing::warn!("webhook {url}: {e}; retrying with backoff");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                attempt += 1;
            }
        }
    }
}

fn name_of(v: &Value) -> &str {
    v.get("event").and_then(Value::as_str).unwrap_or_default()
}

fn client_fields(m: &mut Map<String, Value>, c: &ClientInfo) {
    m.insert("client_id".into(), json!(&*c.client_id));
    m.insert("username".into(), json!(c.username));
    m.insert("peer".into(), json!(c.peer.map(|p| p.to_string())));
    m.insert("listener".into(), json!(&*c.listener));
    m.insert(
        "protocol".into(),
        json!(match c.protocol {
            broker_core::hooks::ProtocolVersion::V3 => "mqtt3",
            broker_core::hooks::ProtocolVersion::V5 => "mqtt5",
            broker_core::hooks::ProtocolVersion::Internal => "internal",
        }),
    );
}

fn message_fields(m: &mut Map<String, Value>, msg: &Message) {
    m.insert("topic".into(), json!(msg.topic));
    m.insert("qos".into(), json!(msg.qos as u8));
    m.insert("retain".into(), json!(msg.retain));
    match std::str::from_utf8(&msg.payload) {
        Ok(s) => m.insert("payload".into(), json!(s)),
        Err(_) => m.insert(
            "payload_base64".into(),
            json!(base64::engine::general_purpose::STANDARD.encode(&msg.payload)),
        ),
    };
    m.insert("received_at_ms".into(), json!(msg.received_at_ms));
}

/// One event as a JSON object `{"event": NAME, ...}`; `None` for events
/// this version does not know.
fn to_json(e: &Event) -> Option<Value> {
    let mut m = Map::new();
    let name = match e {
        Event::Ready => "ready",
        Event::ShuttingDown => "shutting_down",
        Event::ClientConnected {
            client,
            session_present,
        } => {
            client_fields(&mut m, client);
            m.insert("session_present".into(), json!(session_present));
            "client_connected"
        }
        Event::ClientDisconnected { client, reason } => {
            client_fields(&mut m, client);
            m.insert("reason".into(), json!(reason));
            "client_disconnected"
        }
        Event::ConnectionError {
            client_id,
            peer,
            reason,
        } => {
            m.insert("client_id".into(), json!(client_id));
            m.insert("peer".into(), json!(peer.map(|p| p.to_string())));
            m.insert("reason".into(), json!(reason));
            "connection_error"
        }
        Event::Published { client, message } => {
            match client {
                Some(c) => client_fields(&mut m, c),
                None => {
                    m.insert("client_id".into(), Value::Null);
                }
            }
            message_fields(&mut m, message);
            "message_published"
        }
        Event::Subscribed {
            client,
            filter,
            qos,
        } => {
            client_fields(&mut m, client);
            m.insert("filter".into(), json!(filter));
            m.insert("qos".into(), json!(*qos as u8));
            "subscribed"
        }
        Event::Unsubscribed { client, filter } => {
            client_fields(&mut m, client);
            m.insert("filter".into(), json!(filter));
            "unsubscribed"
        }
        Event::Delivered {
            client_id,
            message,
            qos,
            packet_id,
        } => {
            m.insert("client_id".into(), json!(&**client_id));
            message_fields(&mut m, message);
            m.insert("qos".into(), json!(*qos as u8));
            m.insert("packet_id".into(), json!(packet_id));
            "message_delivered"
        }
        Event::Acknowledged {
            client_id,
            packet_id,
        } => {
            m.insert("client_id".into(), json!(&**client_id));
            m.insert("packet_id".into(), json!(packet_id));
            "message_acknowledged"
        }
        Event::MessageDropped {
            client_id,
            topic,
            reason,
        } => {
            m.insert("client_id".into(), json!(&**client_id));
            m.insert("topic".into(), json!(topic));
            m.insert(
                "reason".into(),
                json!(match reason {
                    DropCause::QueueFull => "queue_full",
                    DropCause::QueueBytes => "queue_bytes",
                }),
            );
            "message_dropped"
        }
        Event::SessionCreated { client_id } => {
            m.insert("client_id".into(), json!(&**client_id));
            "session_created"
        }
        Event::SessionResumed { client_id } => {
            m.insert("client_id".into(), json!(&**client_id));
            "session_resumed"
        }
        Event::SessionExpired { client_id } => {
            m.insert("client_id".into(), json!(&**client_id));
            "session_expired"
        }
        Event::WillPublished { client_id, topic } => {
            m.insert("client_id".into(), json!(&**client_id));
            m.insert("topic".into(), json!(topic));
            "will_published"
        }
        _ => return None,
    };
    m.insert("event".into(), json!(name));
    m.insert("time_ms".into(), json!(now_ms()));
    Some(Value::Object(m))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_known_and_selected_by_bit() {
        let all: Vec<String> = EVENT_NAMES.iter().map(|s| s.to_string()).collect();
        let s = Selection::parse(&all).unwrap();
        assert!(EVENT_NAMES.iter().all(|n| s.wants(n)));
        let d = Selection::parse(
            &DEFAULT_EVENTS
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        )
        .unwrap();
        assert!(!d.wants("message_delivered") && d.wants("client_connected"));
        assert!(matches!(
            Selection::parse(&["client_connect".to_string()]),
            Err(ConfigError::Event(_))
        ));
        assert!(EVENT_NAMES.len() <= 32);
    }

    #[test]
    fn events_as_json() {
        let m = Arc::new(Message::new(
            "a/b",
            vec![0xff_u8, 0],
            broker_core::message::QoS::AtLeastOnce,
            true,
        ));
        let v = to_json(&Event::Published {
            client: None,
            message: m,
        })
        .unwrap();
        assert_eq!(v["event"], "message_published");
        assert_eq!(v["client_id"], Value::Null);
        assert_eq!(v["qos"], 1);
        assert_eq!(v["retain"], true);
        assert_eq!(v["payload_base64"], "/wA=");
        let v = to_json(&Event::SessionExpired {
            client_id: Arc::from("d1"),
        })
        .unwrap();
        assert_eq!(v["event"], "session_expired");
        assert_eq!(v["client_id"], "d1");
    }
}
