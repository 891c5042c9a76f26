//! Authentication, authorization and webhooks against a real HTTP server
//! started by each test (axum on loopback), with real MQTT 5 clients
//! (rumqttc) over TCP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use broker_core::storage::Storage;
use broker_core::Broker;
use broker_http_hooks::{HttpAuth, HttpAuthConfig, Webhook, WebhookConfig};
use broker_net::{ListenerConfig, Protocol};
use parking_lot::Mutex;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet, PubAckReason, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};
use serde_json::{json, Value};

const WITHIN: Duration = Duration::from_secs(10);

/// What the web service was asked, and how it behaves.
#[derive(Default)]
struct Service {
    /// (path, body) of every request, in arrival order.
    requests: Vec<(String, Value)>,
    /// Answer `/events` with 503 this many more times.
    events_unavailable: u32,
    /// Answer `/auth` with 500 (a broken service).
    auth_broken: bool,
}

type Shared = Arc<Mutex<Service>>;

async fn handle(
    State(s): State<Shared>,
    Path(path): Path<String>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let (broken, unavailable) = {
        let mut s = s.lock();
        s.requests.push((path.clone(), body.clone()));
        let unavailable = path == "events" && s.events_unavailable > 0;
        if unavailable {
            s.events_unavailable -= 1;
        }
        (s.auth_broken, unavailable)
    };
    let allow = |yes: bool| Json(json!({ "result": if yes { "allow" } else { "deny" } }));
    match path.as_str() {
        "auth" if broken => (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({}))),
        "auth" => {
            let ok = body["username"] == "alice" && body["password"] == "wonderland";
            if ok {
                (
                    StatusCode::OK,
                    Json(json!({"result": "allow", "identity": "user-1"})),
                )
            } else {
                (StatusCode::OK, allow(false))
            }
        }
        "publish" => {
            let topic = body["topic"].as_str().unwrap_or_default();
            (StatusCode::OK, allow(!topic.starts_with("forbidden/")))
        }
        "subscribe" => match body["filter"].as_str().unwrap_or_default() {
            "#" => (StatusCode::FORBIDDEN, Json(json!({}))),
            "low/#" => (StatusCode::OK, Json(json!({"result": "allow", "qos": 0}))),
            _ => (StatusCode::OK, allow(true)),
        },
        "slow" => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            (StatusCode::OK, allow(true))
        }
        "events" if unavailable => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({}))),
        "events" => (StatusCode::NO_CONTENT, Json(json!({}))),
        _ => (StatusCode::NOT_FOUND, Json(json!({}))),
    }
}

/// The web service on a free loopback port.
async fn service() -> (String, Shared) {
    let shared: Shared = Arc::default();
    let app = Router::new()
        .route("/{path}", post(handle))
        .with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the web service");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), shared)
}

fn requests(s: &Shared, path: &str) -> Vec<Value> {
    s.lock()
        .requests
        .iter()
        .filter(|(p, _)| p == path)
        .map(|(_, b)| b.clone())
        .collect()
}

async fn broker_with(auth: Option<Arc<HttpAuth>>) -> (Broker, SocketAddr) {
    let storage = Storage::from_backend(Arc::new(storage_memory::MemoryStore::new()));
    let mut b = Broker::builder().storage(storage);
    if let Some(a) = auth {
        b = b.authenticate(a.clone()).authorize(a);
    }
    let broker = b.start().await.expect("broker starts");
    let listener = broker_net::bind(&broker, &ListenerConfig::new("127.0.0.1:0", Protocol::Mqtt))
        .await
        .expect("bind");
    let addr = listener.local_addr();
    tokio::spawn(listener.run());
    (broker, addr)
}

fn options(addr: SocketAddr, id: &str, login: Option<(&str, &str)>) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    if let Some((u, p)) = login {
        o.set_credentials(u, p);
    }
    o
}

/// Connect; the CONNACK's code, and the client if it was accepted.
async fn connect(
    addr: SocketAddr,
    id: &str,
    login: Option<(&str, &str)>,
) -> (ConnectReturnCode, Option<(AsyncClient, EventLoop)>) {
    let (client, mut events) = AsyncClient::new(options(addr, id, login), 64);
    let first = tokio::time::timeout(WITHIN, events.poll())
        .await
        .expect("a CONNACK in time");
    match first {
        Ok(Event::Incoming(Packet::ConnAck(ack))) => (ack.code, Some((client, events))),
        Err(ConnectionError::ConnectionRefused(code)) => (code, None),
        other => panic!("expected a CONNACK, got {other:?}"),
    }
}

/// The next packet the broker sends.
async fn next_incoming(events: &mut EventLoop) -> Packet {
    loop {
        match tokio::time::timeout(WITHIN, events.poll()).await {
            Ok(Ok(Event::Incoming(p))) => return p,
            Ok(Ok(Event::Outgoing(_))) => {}
            other => panic!("connection failed: {other:?}"),
        }
    }
}

fn config(base: &str) -> HttpAuthConfig {
    HttpAuthConfig {
        authenticate: Some(format!("{base}/auth")),
        authorize_publish: Some(format!("{base}/publish")),
        authorize_subscribe: Some(format!("{base}/subscribe")),
        timeout: Duration::from_millis(500),
        ..HttpAuthConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_service_decides_who_connects_and_decisions_are_cached() {
    let (base, svc) = service().await;
    let auth = Arc::new(HttpAuth::new(&config(&base)).expect("settings"));
    let (broker, addr) = broker_with(Some(auth.clone())).await;

    let (code, c) = connect(addr, "dev-1", Some(("alice", "wonderland"))).await;
    assert_eq!(code, ConnectReturnCode::Success);
    let asked = requests(&svc, "auth");
    assert_eq!(asked.len(), 1);
    let r = &asked[0];
    assert_eq!(r["client_id"], "dev-1");
    assert_eq!(r["username"], "alice");
    assert_eq!(r["password"], "wonderland");
    assert_eq!(r["protocol"], "mqtt5");
    assert_eq!(r["certificate"], false);
    assert!(
        r["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{r}"
    );
    assert!(
        r["listener"]
            .as_str()
            .is_some_and(|l| l.starts_with("mqtt:")),
        "{r}"
    );
    drop(c);

    let (code, _) = connect(addr, "dev-1", Some(("alice", "guess"))).await;
    assert_eq!(code, ConnectReturnCode::BadUserNamePassword);
    let (code, _) = connect(addr, "dev-2", None).await;
    assert_eq!(code, ConnectReturnCode::BadUserNamePassword);
    assert_eq!(requests(&svc, "auth").len(), 3);

    // Asked again within the TTL: answered from the cache, allow and deny alike.
    let (code, _) = connect(addr, "dev-1", Some(("alice", "wonderland"))).await;
    assert_eq!(code, ConnectReturnCode::Success);
    let (code, _) = connect(addr, "dev-1", Some(("alice", "guess"))).await;
    assert_eq!(code, ConnectReturnCode::BadUserNamePassword);
    assert_eq!(requests(&svc, "auth").len(), 3, "the cache answered");
    let stats = auth.stats();
    assert_eq!(
        (stats.requests, stats.failures, stats.cache_hits),
        (3, 0, 2)
    );
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_slow_or_absent_service_fails_closed_and_is_not_cached() {
    let (base, svc) = service().await;
    svc.lock().auth_broken = true;
    let auth = Arc::new(HttpAuth::new(&config(&base)).expect("settings"));
    let (broker, addr) = broker_with(Some(auth.clone())).await;
    let (code, _) = connect(addr, "dev-1", Some(("alice", "wonderland"))).await;
    assert_eq!(code, ConnectReturnCode::ServerUnavailable, "HTTP 500");
    // The failure was not remembered: the mended service lets it in.
    svc.lock().auth_broken = false;
    let (code, _) = connect(addr, "dev-1", Some(("alice", "wonderland"))).await;
    assert_eq!(code, ConnectReturnCode::Success);
    assert_eq!(auth.stats().failures, 1);
    broker.shutdown().await;

    // No answer within the timeout.
    let slow = Arc::new(
        HttpAuth::new(&HttpAuthConfig {
            authenticate: Some(format!("{base}/slow")),
            timeout: Duration::from_millis(300),
            ..HttpAuthConfig::default()
        })
        .expect("settings"),
    );
    let (broker, addr) = broker_with(Some(slow.clone())).await;
    let (code, _) = connect(addr, "dev-1", Some(("alice", "wonderland"))).await;
    assert_eq!(code, ConnectReturnCode::ServerUnavailable, "timeout");
    assert_eq!(slow.stats().failures, 1);
    broker.shutdown().await;

    // Nobody listening.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let gone = closed.local_addr().expect("addr");
    drop(closed);
    let absent = Arc::new(
        HttpAuth::new(&HttpAuthConfig {
            authenticate: Some(format!("http://{gone}/auth")),
            ..HttpAuthConfig::default()
        })
        .expect("settings"),
    );
    let (broker, addr) = broker_with(Some(absent.clone())).await;
    let (code, _) = connect(addr, "dev-1", Some(("alice", "wonderland"))).await;
    assert_eq!(
        code,
        ConnectReturnCode::ServerUnavailable,
        "connection refused"
    );
    assert_eq!(absent.stats().failures, 1);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_service_decides_publishes_and_subscriptions() {
    let (base, svc) = service().await;
    let auth = Arc::new(HttpAuth::new(&config(&base)).expect("settings"));
    let (broker, addr) = broker_with(Some(auth)).await;
    let (code, c) = connect(addr, "dev-1", Some(("alice", "wonderland"))).await;
    assert_eq!(code, ConnectReturnCode::Success);
    let (client, mut events) = c.expect("connected");

    client
        .subscribe("#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    match next_incoming(&mut events).await {
        Packet::SubAck(ack) => assert_eq!(ack.return_codes, [SubscribeReasonCode::NotAuthorized]),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    client
        .subscribe("low/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    match next_incoming(&mut events).await {
        Packet::SubAck(ack) => assert_eq!(
            ack.return_codes,
            [SubscribeReasonCode::Success(QoS::AtMostOnce)],
            "the service granted a lower QoS"
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }

    client
        .publish("forbidden/x", QoS::AtLeastOnce, false, "no")
        .await
        .expect("publish");
    match next_incoming(&mut events).await {
        Packet::PubAck(ack) => assert_eq!(ack.reason, PubAckReason::NotAuthorized),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    client
        .publish("low/x", QoS::AtLeastOnce, false, "yes")
        .await
        .expect("publish");
    let mut acked = false;
    let mut delivered = false;
    while !(acked && delivered) {
        match next_incoming(&mut events).await {
            Packet::PubAck(ack) => {
                assert_eq!(ack.reason, PubAckReason::Success);
                acked = true;
            }
            Packet::Publish(p) => {
                assert_eq!(&p.payload[..], b"yes");
                assert_eq!(p.qos, QoS::AtMostOnce);
                delivered = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let asked = requests(&svc, "publish");
    assert_eq!(asked.len(), 2);
    assert_eq!(asked[0]["topic"], "forbidden/x");
    assert_eq!(asked[0]["qos"], 1);
    assert_eq!(
        asked[0]["identity"], "user-1",
        "the identity the service gave at CONNECT"
    );
    let asked = requests(&svc, "subscribe");
    assert_eq!(asked.len(), 2);
    assert_eq!(asked[1]["filter"], "low/#");
    broker.shutdown().await;
}

/// Wait until the service got webhook events satisfying `done`.
async fn events_until(svc: &Shared, done: impl Fn(&[Value]) -> bool) -> (Vec<Value>, usize) {
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        let batches = requests(svc, "events");
        let events: Vec<Value> = batches
            .iter()
            .flat_map(|b| b.as_array().cloned().unwrap_or_default())
            .collect();
        if done(&events) {
            let largest = batches
                .iter()
                .map(|b| b.as_array().map_or(0, Vec::len))
                .max()
                .unwrap_or(0);
            return (events, largest);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "webhook events so far: {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_batches_in_order_and_retries_an_unavailable_service() {
    let (base, svc) = service().await;
    svc.lock().events_unavailable = 2;
    let (broker, addr) = broker_with(None).await;
    let webhook =
        Webhook::start(&broker, &WebhookConfig::new(format!("{base}/events"))).expect("webhook");

    let (code, c) = connect(addr, "dev-1", None).await;
    assert_eq!(code, ConnectReturnCode::Success);
    let (client, mut events) = c.expect("connected");
    tokio::spawn(async move { while events.poll().await.is_ok() {} });
    for i in 0..50 {
        client
            .publish("t/a", QoS::AtMostOnce, false, i.to_string())
            .await
            .expect("publish");
    }
    client.disconnect().await.expect("disconnect");

    let (events, largest) = events_until(&svc, |e| {
        e.iter().any(|v| v["event"] == "client_disconnected")
    })
    .await;
    let names: Vec<&str> = events.iter().filter_map(|v| v["event"].as_str()).collect();
    let connected = names
        .iter()
        .position(|n| *n == "client_connected")
        .expect("client_connected");
    let disconnected = names
        .iter()
        .position(|n| *n == "client_disconnected")
        .expect("client_disconnected");
    let payloads: Vec<String> = events
        .iter()
        // Not the broker's own `$SYS` publishes.
        .filter(|v| v["event"] == "message_published" && v["topic"] == "t/a")
        .map(|v| v["payload"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        payloads,
        (0..50).map(|i| i.to_string()).collect::<Vec<_>>(),
        "in order, each once"
    );
    let first_published = events
        .iter()
        .position(|v| v["event"] == "message_published" && v["topic"] == "t/a")
        .expect("published");
    assert!(
        connected < first_published && first_published < disconnected,
        "{names:?}"
    );
    assert_eq!(events[connected]["client_id"], "dev-1");
    assert!(
        largest > 1,
        "events waiting during the retries went in one batch"
    );
    let stats = webhook.stats();
    assert!(stats.failed_posts >= 2, "{stats:?}");
    assert_eq!(stats.dropped, 0, "{stats:?}");

    broker.shutdown().await;
    let stats = webhook.finish(Duration::from_secs(5)).await;
    assert!(stats.sent >= 53, "{stats:?}");
    let (events, _) = events_until(&svc, |e| e.iter().any(|v| v["event"] == "shutting_down")).await;
    assert!(
        events.iter().all(|v| v["event"] != "message_delivered"),
        "not posted by default"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_queue_is_bounded_and_its_drops_counted() {
    let (base, svc) = service().await;
    let (broker, addr) = broker_with(None).await;
    let mut config = WebhookConfig::new(format!("{base}/slow"));
    config.queue = 10;
    config.max_retries = 0;
    config.timeout = Duration::from_secs(20);
    let webhook = Webhook::start(&broker, &config).expect("webhook");

    let (_, c) = connect(addr, "dev-1", None).await;
    let (client, mut events) = c.expect("connected");
    tokio::spawn(async move { while events.poll().await.is_ok() {} });
    // Wait for the first batch to be stuck at the service, then flood.
    let deadline = tokio::time::Instant::now() + WITHIN;
    while requests(&svc, "slow").is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no POST reached the service"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..200 {
        client
            .publish("t/a", QoS::AtMostOnce, false, i.to_string())
            .await
            .expect("publish");
    }
    let deadline = tokio::time::Instant::now() + WITHIN;
    while webhook.stats().dropped < 150 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "drops not counted: {:?}",
            webhook.stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The broker kept serving meanwhile.
    let (code, _) = connect(addr, "dev-2", None).await;
    assert_eq!(code, ConnectReturnCode::Success);
    broker.shutdown().await;
    // Shutdown does not wait for a stuck service beyond the bound.
    let stats = tokio::time::timeout(
        Duration::from_secs(5),
        webhook.finish(Duration::from_secs(1)),
    )
    .await
    .expect("finish is bounded");
    assert_eq!(stats.sent, 0, "{stats:?}");
}
