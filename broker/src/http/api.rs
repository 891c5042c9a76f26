//! The admin API under `/api/v1/`, JSON in and out; errors are
//! `{"error": "..."}` with a status that says what the caller can do
//! (400 fix the request, 404 no such thing, 503 try again later).
//!
//! - `GET /api/v1/clients[?connected=true|false&after=ID&limit=N]`: sessions
//!   (connected or not) in client-id order, a page at a time;
//! - `GET|DELETE /api/v1/sessions/{client_id}`: one session; delete kicks
//!   its connection and removes its subscriptions and queue;
//! - `POST /api/v1/clients/{client_id}/kick`: close its connection
//!   (DISCONNECT 0x98 to MQTT 5 clients, will published, session kept);
//! - `GET|DELETE /api/v1/retained?filter=F`: retained messages matching F
//!   (listed in topic order a page at a time: `after=TOPIC`, `limit=N`);
//! - `POST /api/v1/publish`: publish as the server does, answered once a
//!   QoS 1/2 message is durable.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use broker_core::hooks::ProtocolVersion;
use broker_core::message::{Message, QoS};
use broker_core::{AdminError, PublishError, SessionInfo};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{error, starting, Shared};

/// Sessions per page of `GET /api/v1/clients` unless `limit` says.
const PAGE: usize = 1000;
/// The largest page.
const PAGE_MAX: usize = 10_000;

pub(super) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/clients", get(clients))
        .route("/clients/{client_id}/kick", post(kick))
        .route("/sessions/{client_id}", get(session).delete(delete_session))
        .route("/retained", get(retained).delete(delete_retained))
        .route("/publish", post(publish))
}

fn protocol(p: ProtocolVersion) -> &'static str {
    match p {
        ProtocolVersion::V3 => "3.1.1",
        ProtocolVersion::V5 => "5",
        ProtocolVersion::Internal => "internal",
    }
}

fn session_json(s: &SessionInfo) -> Value {
    let client = s.client.as_deref();
    json!({
        "client_id": s.client_id,
        "connected": s.online,
        "persistent": s.persistent,
        "expiry_secs": s.expiry_secs,
        "queued": s.queued,
        "queued_in_store": s.queued_in_store,
        "queued_bytes": s.queued_bytes,
        "in_flight": s.in_flight,
        "subscriptions": s.subscription_qos.iter()
            .map(|(filter, qos)| json!({ "filter": filter, "qos": *qos as u8 }))
            .collect::<Vec<_>>(),
        "protocol": client.map(|c| protocol(c.protocol)),
        "listener": client.map(|c| c.listener.to_string()),
        "peer": client.and_then(|c| c.peer).map(|p| p.to_string()),
        "username": client.and_then(|c| c.username.clone()),
        "connected_at_ms": s.connected_at_ms,
        "disconnected_at_ms": s.disconnected_at_ms,
    })
}

#[derive(Deserialize)]
struct ClientsQuery {
    connected: Option<bool>,
    after: Option<String>,
    limit: Option<usize>,
}

async fn clients(State(shared): State<Arc<Shared>>, Query(q): Query<ClientsQuery>) -> Response {
    let Some(broker) = shared.broker.get() else {
        return starting();
    };
    let limit = q.limit.unwrap_or(PAGE).clamp(1, PAGE_MAX);
    let (sessions, next) = broker.sessions_page(q.after.as_deref(), limit, q.connected);
    let page: Vec<Value> = sessions.iter().map(session_json).collect();
    Json(json!({ "clients": page, "next": next })).into_response()
}

async fn session(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let Some(broker) = shared.broker.get() else {
        return starting();
    };
    match broker.session(&id) {
        Some(s) => Json(session_json(&s)).into_response(),
        None => error(StatusCode::NOT_FOUND, "no session with this client id"),
    }
}

async fn delete_session(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let Some(broker) = shared.broker.get() else {
        return starting();
    };
    match broker.delete_session(&id).await {
        Ok(true) => Json(json!({ "deleted": id })).into_response(),
        Ok(false) => error(StatusCode::NOT_FOUND, "no session with this client id"),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("storage failed: {}", e.report()),
        ),
    }
}

async fn kick(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let Some(broker) = shared.broker.get() else {
        return starting();
    };
    if broker.kick(&id) {
        Json(json!({ "kicked": id })).into_response()
    } else {
        error(
            StatusCode::NOT_FOUND,
            "no client connected with this client id",
        )
    }
}

#[derive(Deserialize)]
struct FilterQuery {
    filter: Option<String>,
    /// Topics after this one only (the listing's `next`).
    after: Option<String>,
    limit: Option<usize>,
}

fn admin_error(e: AdminError) -> Response {
    match e {
        AdminError::Filter(e) => error(StatusCode::BAD_REQUEST, &format!("invalid filter: {e}")),
        other => error(StatusCode::SERVICE_UNAVAILABLE, &other.to_string()),
    }
}

fn message_json(m: &Message) -> Value {
    let text = std::str::from_utf8(&m.payload).ok();
    json!({
        "topic": m.topic,
        "qos": m.qos as u8,
        "payload": text,
        "payload_base64": if text.is_none() {
            Some(base64::engine::general_purpose::STANDARD.encode(&m.payload))
        } else {
            None
        },
        "size": m.payload.len(),
        "content_type": m.properties.content_type,
        "received_at_ms": m.received_at_ms,
    })
}

async fn retained(State(shared): State<Arc<Shared>>, Query(q): Query<FilterQuery>) -> Response {
    let Some(broker) = shared.broker.get() else {
        return starting();
    };
    let filter = q.filter.as_deref().unwrap_or("#");
    let limit = q.limit.unwrap_or(PAGE).clamp(1, PAGE_MAX);
    match broker.retained(filter).await {
        Ok(found) => {
            let mut page: Vec<&Message> = found
                .iter()
                .map(|m| &**m)
                .filter(|m| q.after.as_ref().is_none_or(|a| m.topic > *a))
                .take(limit + 1)
                .collect();
            let next = (page.len() > limit).then(|| {
                page.truncate(limit);
                page.last().map(|m| m.topic.clone())
            });
            Json(json!({
                "retained": page.iter().map(|m| message_json(m)).collect::<Vec<_>>(),
                "next": next.flatten(),
            }))
            .into_response()
        }
        Err(e) => admin_error(e),
    }
}

async fn delete_retained(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<FilterQuery>,
) -> Response {
    let Some(broker) = shared.broker.get() else {
        return starting();
    };
    // No default here: deleting everything takes an explicit `filter=%23`.
    let Some(filter) = q.filter.as_deref() else {
        return error(StatusCode::BAD_REQUEST, "say which: ?filter=TOPIC_FILTER");
    };
    match broker.delete_retained(filter).await {
        Ok(n) => Json(json!({ "deleted": n })).into_response(),
        Err(e) => admin_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishRequest {
    topic: String,
    /// UTF-8 payload.
    payload: Option<String>,
    /// Binary payload, base64 (instead of `payload`).
    payload_base64: Option<String>,
    #[serde(default)]
    qos: u8,
    #[serde(default)]
    retain: bool,
    content_type: Option<String>,
    /// Seconds after which the message is no longer delivered.
    message_expiry_secs: Option<u64>,
    response_topic: Option<String>,
    #[serde(default)]
    user_properties: Vec<(String, String)>,
}

async fn publish(
    State(shared): State<Arc<Shared>>,
    body: Result<Json<PublishRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Some(broker) = shared.broker.get() else {
        return starting();
    };
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.body_text()),
    };
    let payload = match (req.payload, req.payload_base64) {
        (Some(text), None) => text.into_bytes(),
        (None, Some(b64)) => match base64::engine::general_purpose::STANDARD.decode(b64) {
            Ok(b) => b,
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("payload_base64: {e}")),
        },
        (None, None) => Vec::new(),
        (Some(_), Some(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "give `payload` or `payload_base64`, not both",
            )
        }
    };
    let Some(qos) = QoS::from_u8(req.qos) else {
        return error(StatusCode::BAD_REQUEST, "qos must be 0, 1 or 2");
    };
    if payload.len() as u64 > u64::from(broker.config().max_packet_size) {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload larger than max_packet_size: no client could receive it",
        );
    }
    let mut m = Message::new(req.topic, payload, qos, req.retain);
    m.properties.content_type = req.content_type;
    m.properties.response_topic = req.response_topic;
    m.properties.user_properties = req.user_properties;
    m.properties.expires_at_ms = req
        .message_expiry_secs
        .map(|s| m.received_at_ms.saturating_add(s.saturating_mul(1000)));
    match broker.publish(m).await {
        Ok(()) => Json(json!({ "published": true })).into_response(),
        Err(PublishError::InvalidTopic(e)) => {
            error(StatusCode::BAD_REQUEST, &format!("invalid topic: {e}"))
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}
