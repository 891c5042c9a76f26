//! The HTTP listener of `[http] bind` (or `--http-listen`): `/metrics`
//! (Prometheus), `/health` and `/ready` (probes), and the admin API under
//! `/api/v1/` (`api`).
//!
//! Contract:
//! - it starts before the broker, so that `/health` answers while a large
//!   store is restored; until [`Http::started`] is called `/ready` says 503
//!   and every other path 503 too;
//! - with `[http] token`, every path but `/health` and `/ready` needs
//!   `Authorization: Bearer TOKEN` (compared in constant time); without one
//!   the listener is loopback only (settings refuse anything else);
//! - at most `max_requests` requests are served at once, the rest get 503
//!   at once (an operator's script in a loop cannot pile up work); bodies
//!   are limited to [`MAX_BODY`]; at most `max_connections` connections
//!   are open, each with [`HEADER_TIMEOUT`] to send its request's headers.

mod api;
mod metrics;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use broker_core::Broker;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::settings::{HttpSettings, DEFAULT_HTTP_MAX_CONNECTIONS, DEFAULT_HTTP_MAX_REQUESTS};

/// The largest request body accepted (a publish's payload and its JSON).
pub const MAX_BODY: usize = 1024 * 1024;

/// Statistics of the binary's own parts beside the broker's, for `/metrics`.
#[derive(Default)]
pub struct Extras {
    /// The `[webhook]`, if configured.
    pub webhook: Option<broker_http_hooks::WebhookWatch>,
    /// The HTTP authentication and authorization hooks, if configured.
    pub http_auth: Option<Arc<broker_http_hooks::HttpAuth>>,
}

/// What the handlers share.
pub(crate) struct Shared {
    broker: OnceLock<Broker>,
    extras: OnceLock<Extras>,
    stopping: AtomicBool,
    token: Option<String>,
    requests: Semaphore,
    retained: metrics::RetainedCount,
}

/// The running HTTP listener.
pub struct Http {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl Http {
    /// Bind `settings.bind` and serve; `None` when there is no `bind`.
    pub async fn start(settings: &HttpSettings) -> anyhow::Result<Option<Http>> {
        let Some(bind) = &settings.bind else {
            return Ok(None);
        };
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .with_context(|| format!("cannot listen on [http] bind `{bind}`"))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            broker: OnceLock::new(),
            extras: OnceLock::new(),
            stopping: AtomicBool::new(false),
            token: settings.token.clone(),
            requests: Semaphore::new(settings.max_requests.unwrap_or(DEFAULT_HTTP_MAX_REQUESTS)),
            retained: metrics::RetainedCount::default(),
        });
        let app = router(shared.clone());
        let max_connections = settings
            .max_connections
            .unwrap_or(DEFAULT_HTTP_MAX_CONNECTIONS);
        tokio::spawn(serve(listener, app, max_connections));
        // Not "listening on": scripts read that line for the MQTT port.
        info!("HTTP API on {addr} (/metrics, /health, /ready, /api/v1/)");
        Ok(Some(Http { shared, addr }))
    }

    /// The address bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The broker is serving: `/ready` may say so, the API answers;
    /// `/metrics` adds the statistics of `extras`.
    pub fn started(&self, broker: &Broker, extras: Extras) {
        let _ = self.shared.extras.set(extras);
        let _ = self.shared.broker.set(broker.clone());
    }

    /// The broker is stopping: `/ready` says 503 from now on.
    pub fn stopping(&self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
    }
}

/// Accept connections, at most `max` open at once (more are closed at
/// once, counted and logged), each with [`HEADER_TIMEOUT`] to send a
/// request's headers, idle keep-alive time included: a client that opens
/// connections and sends nothing holds none for long.
async fn serve(listener: tokio::net::TcpListener, app: Router, max: usize) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let open = Arc::new(Semaphore::new(max));
    let mut refused = 0u64;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors, most likely: wait rather than spin.
                warn!("HTTP listener cannot accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            refused += 1;
            if refused == 1 || refused.is_multiple_of(1000) {
                warn!(%peer, refused, max, "HTTP connection refused: [http] max_connections open");
            }
            drop(stream);
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                tracing::debug!(%peer, "HTTP connection ended: {e}");
            }
            drop(permit);
        });
    }
}

/// How long a connection may take to send a request's headers, idle
/// keep-alive time before them included.
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn router(shared: Arc<Shared>) -> Router {
    let guarded = Router::new()
        .route("/metrics", get(metrics::scrape))
        .nest("/api/v1", api::routes())
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            authorize,
        ));
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .merge(guarded)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such path") })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(shared.clone(), limit))
        .with_state(shared)
}

/// Serve at most `max_requests` at once; the rest are told to retry.
async fn limit(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    match shared.requests.try_acquire() {
        Ok(_permit) => next.run(request).await,
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many requests at once ([http] max_requests)",
        ),
    }
}

/// The bearer token, when one is configured.
async fn authorize(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    if let Some(token) = &shared.token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong token: send `Authorization: Bearer TOKEN` ([http] token)",
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return r;
        }
    }
    next.run(request).await
}

/// Equal without an early exit, so the time taken says nothing of how much matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, &y) in b.iter().enumerate() {
        let x = a.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

/// The process runs and its HTTP listener answers.
async fn health() -> Response {
    Json(serde_json::json!({ "status": "ok" })).into_response()
}

/// The broker serves: started, not stopping, and its storage answers.
async fn ready(State(shared): State<Arc<Shared>>) -> Response {
    let Some(broker) = shared.broker.get() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "starting");
    };
    if shared.stopping.load(Ordering::Relaxed) {
        return error(StatusCode::SERVICE_UNAVAILABLE, "stopping");
    }
    match broker.check_storage().await {
        Ok(()) => Json(serde_json::json!({ "status": "ready" })).into_response(),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("storage does not answer: {}", e.report()),
        ),
    }
}

/// The answer while the broker is starting (restoring its store).
pub(crate) fn starting() -> Response {
    error(StatusCode::SERVICE_UNAVAILABLE, "the broker is starting")
}

/// A JSON error body: `{"error": "..."}`.
pub(crate) fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"0123456789abcdeX", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"0123456789abcdef0", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"0123", b"0123456789abcdef"));
    }
}
