//! The broker's hooks over HTTP, for applications in any language:
//!
//! - [`HttpAuth`]: who may connect, publish and subscribe, decided by a web
//!   service that answers a POST of JSON;
//! - [`Webhook`]: the broker's events, POSTed in batches to a URL.
//!
//! It knows the broker only through `broker-core`'s hooks and event
//! stream; it knows nothing of listeners, files or storage.
//!
//! # The calls
//! Every call is `POST` with `Content-Type: application/json`.
//!
//! | URL | body |
//! |---|---|
//! | authenticate | `client_id`, `username`, `password` (UTF-8, else `null` and `password_base64`), `peer`, `listener`, `protocol` (`mqtt3`/`mqtt5`), `certificate` (the username is a verified certificate's CN), `allow_anonymous` (the listener's setting) |
//! | authorize publish | `client_id`, `username`, `identity`, `peer`, `listener`, `protocol`, `topic`, `qos`, `retain` |
//! | authorize subscribe | the same client fields, `filter`, `qos` |
//!
//! The answer decides: `200` with `{"result": "allow"}` or
//! `{"result": "deny"}` (authenticate may add `"identity"`, the name
//! authorization then sees; subscribe may add `"qos"`, a lower QoS to
//! grant); `204` allows; `401` and `403` deny. Any other status, a body
//! that is not such JSON, or no answer within the timeout fails closed: the
//! client is refused (CONNACK 0x03/0x88 "server unavailable", PUBACK 0x87,
//! SUBACK 0x80/0x87) and the failure is logged and counted.
//!
//! A webhook receives JSON arrays of events, each an object with `event`
//! (one of [`EVENT_NAMES`]), `time_ms`, and the event's fields
//! (`client_id`, `username`, `topic`, `payload` or `payload_base64`, ...).
//!
//! # Example
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use broker_http_hooks::{HttpAuth, HttpAuthConfig, Webhook, WebhookConfig};
//!
//! let auth = Arc::new(HttpAuth::new(&HttpAuthConfig {
//!     authenticate: Some("http://127.0.0.1:3000/mqtt/auth".into()),
//!     authorize_publish: Some("http://127.0.0.1:3000/mqtt/publish".into()),
//!     ..HttpAuthConfig::default()
//! })?);
//! let storage = broker_core::storage::Storage::from_backend(Arc::new(storage_memory::MemoryStore::new()));
//! let broker = broker_core::Broker::builder()
//!     .storage(storage)
//!     .authenticate(auth.clone())
//!     .authorize(auth)
//!     .start()
//!     .await?;
//! let webhook = Webhook::start(&broker, &WebhookConfig::new("http://127.0.0.1:3000/mqtt/events"))?;
//! // ... serve, then:
//! broker.shutdown().await;
//! let stats = webhook.finish(std::time::Duration::from_secs(5)).await;
//! println!("{} events posted, {} dropped", stats.sent, stats.dropped);
//! # Ok(()) }
//! ```

mod auth;
mod cache;
mod client;
mod webhook;

pub use auth::{HttpAuth, HttpAuthConfig, HttpAuthStats};
pub use client::{CallError, ConfigError};
pub use webhook::{
    Webhook, WebhookConfig, WebhookStats, WebhookWatch, DEFAULT_EVENTS, EVENT_NAMES,
};
