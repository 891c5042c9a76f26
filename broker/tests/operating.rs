//! Operating the broker, through the real binary: `/metrics` scraped with a
//! real HTTP client while traffic runs (the counters move by exactly what
//! was sent), the admin API's round trips (clients, sessions, kick, delete,
//! retained, publish, the token), and the `[log]` options.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{BrokerProcess, Mqtt};
use rumqttc::QoS;
use serde_json::{json, Value};

/// A free loopback port for the HTTP listener.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Start a broker with its HTTP listener and wait until `/ready` says 200
/// ("listening on" comes once the MQTT listeners are bound; readiness once
/// the whole broker serves); returns it and the HTTP base URL.
async fn start(dir: &std::path::Path, extra: &[&str]) -> (BrokerProcess, String) {
    let http = format!("127.0.0.1:{}", free_port());
    let mut args = vec!["--http-listen", http.as_str()];
    args.extend_from_slice(extra);
    let broker = BrokerProcess::start(dir, &args);
    let base = format!("http://{http}");
    // No pooled connection left behind: a test may count the listener's connections.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("HTTP client");
    for _ in 0..200 {
        if let Ok(r) = client.get(format!("{base}/ready")).send().await {
            if r.status() == 200 {
                return (broker, base);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("/ready did not say 200 within 10 s");
}

/// `name{labels}` -> value, from the OpenMetrics text.
fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

async fn scrape(http: &reqwest::Client, base: &str) -> HashMap<String, f64> {
    let r = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(r.status(), 200);
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    parse(&r.text().await.expect("body"))
}

fn delta(before: &HashMap<String, f64>, after: &HashMap<String, f64>, key: &str) -> f64 {
    let get = |m: &HashMap<String, f64>| m.get(key).copied().unwrap_or(0.0);
    assert!(after.contains_key(key), "{key} missing from /metrics");
    get(after) - get(before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_by_exactly_what_was_sent_while_traffic_runs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (broker, base) = start(dir.path(), &["--storage", "sqlite://m.db"]).await;
    let http = reqwest::Client::new();
    let before = scrape(&http, &base).await;

    let (mut sub, _) = Mqtt::connect(broker.port, "metrics-sub", false).await;
    sub.subscribe("m/#", QoS::ExactlyOnce).await;
    let (publisher, _) = Mqtt::connect(broker.port, "metrics-pub", true).await;
    let counts = [
        (QoS::AtMostOnce, 50),
        (QoS::AtLeastOnce, 40),
        (QoS::ExactlyOnce, 30),
    ];
    let total: usize = counts.iter().map(|(_, n)| n).sum();

    // A scraper runs beside the traffic: counters never go back.
    let scraping = {
        let (http, base) = (http.clone(), base.clone());
        tokio::spawn(async move {
            let mut last = 0.0;
            let mut scrapes = 0;
            for _ in 0..40 {
                let m = scrape(&http, &base).await;
                let now: f64 = (0..3)
                    .map(|q| m[&format!("broker_messages_received_total{{qos=\"{q}\"}}")])
                    .sum();
                assert!(now >= last, "a counter went back: {last} -> {now}");
                last = now;
                scrapes += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            scrapes
        })
    };
    for (qos, n) in counts {
        for i in 0..n {
            publisher
                .client
                .publish(format!("m/{}", qos as u8), qos, false, format!("{i}"))
                .await
                .expect("publish");
        }
    }
    let mut got = 0;
    while got < total {
        sub.next_publish(Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("only {got} of {total} delivered"));
        got += 1;
    }
    assert_eq!(scraping.await.expect("scraper"), 40);
    // One garbage connection: a protocol error at CONNECT.
    let mut raw = TcpStream::connect(("127.0.0.1", broker.port)).expect("connect");
    raw.write_all(&[0x10, 0x02, 0xff, 0xff]).expect("write");
    let mut sink = Vec::new();
    let _ = raw.read_to_end(&mut sink);
    publisher.disconnect().await;
    sub.disconnect().await;
    // The disconnects are counted once the broker has handled them.
    let mut after = scrape(&http, &base).await;
    for _ in 0..100 {
        if delta(
            &before,
            &after,
            "broker_disconnects_total{reason=\"normal\"}",
        ) >= 2.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        after = scrape(&http, &base).await;
    }

    for (qos, n) in counts {
        let q = qos as u8;
        let received = format!("broker_messages_received_total{{qos=\"{q}\"}}");
        let sent = format!("broker_messages_sent_total{{qos=\"{q}\"}}");
        assert_eq!(delta(&before, &after, &received), n as f64, "{received}");
        assert_eq!(delta(&before, &after, &sent), n as f64, "{sent}");
    }
    assert_eq!(
        delta(
            &before,
            &after,
            "broker_connects_total{outcome=\"accepted\"}"
        ),
        2.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "broker_connects_total{outcome=\"protocol_error\"}"
        ),
        1.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "broker_disconnects_total{reason=\"normal\"}"
        ),
        2.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "broker_messages_dropped_total{reason=\"queue_full\"}"
        ),
        0.0
    );
    assert!(delta(&before, &after, "broker_bytes_received_total") > 0.0);
    assert!(delta(&before, &after, "broker_bytes_sent_total") > 0.0);
    // The persistent subscriber's QoS 1 and 2 messages went through the store.
    assert!(delta(&before, &after, "broker_store_batch_operations_count") > 0.0);
    assert!(after.contains_key("broker_store_commit_seconds_bucket{le=\"+Inf\"}"));
    assert_eq!(
        after["broker_sessions{state=\"offline\"}"], 1.0,
        "the persistent subscriber"
    );
    assert_eq!(after["broker_sessions{state=\"online\"}"], 0.0);
    assert_eq!(after["broker_queued_messages"], 0.0);
    drop(broker);
}

async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut r = http.request(method, url);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.expect("request");
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// An MQTT 5 CONNECT on a raw socket, CONNACK read.
fn mqtt5(port: u16, id: &str) -> TcpStream {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 0];
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut p = vec![0x10, body.len() as u8];
    p.extend(body);
    s.write_all(&p).expect("CONNECT");
    let mut head = [0u8; 2];
    s.read_exact(&mut head).expect("CONNACK");
    assert_eq!(head[0], 0x20);
    let mut rest = vec![0u8; usize::from(head[1])];
    s.read_exact(&mut rest).expect("CONNACK body");
    assert_eq!(rest[1], 0, "CONNACK success");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_round_trips_with_kick_and_delete() {
    const TOKEN: &str = "test-token-0123456789";
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("broker.toml"),
        format!("[http]\ntoken = \"{TOKEN}\"\n"),
    )
    .expect("config");
    let (broker, base) = start(
        dir.path(),
        &["--config", "broker.toml", "--storage", "sqlite://a.db"],
    )
    .await;
    let http = reqwest::Client::new();
    let api = |path: &str| format!("{base}/api/v1{path}");
    use reqwest::Method as M;
    let t = Some(TOKEN);

    // Probes need no token; everything else does.
    assert_eq!(
        call(&http, M::GET, format!("{base}/health"), None, None)
            .await
            .0,
        200
    );
    assert_eq!(
        call(&http, M::GET, format!("{base}/ready"), None, None)
            .await
            .0,
        200
    );
    assert_eq!(
        call(&http, M::GET, format!("{base}/metrics"), None, None)
            .await
            .0,
        401
    );
    assert_eq!(
        call(
            &http,
            M::GET,
            api("/clients"),
            Some("wrong-token-0123456789"),
            None
        )
        .await
        .0,
        401
    );
    assert_eq!(
        call(&http, M::GET, format!("{base}/nothing"), t, None)
            .await
            .0,
        404
    );

    // dev-1 connected and subscribed; dev-2 offline with a backlog.
    let (mut dev1, _) = Mqtt::connect(broker.port, "dev-1", false).await;
    dev1.subscribe("d/1", QoS::AtLeastOnce).await;
    let (mut dev2, _) = Mqtt::connect(broker.port, "dev-2", false).await;
    dev2.subscribe("d/2", QoS::AtLeastOnce).await;
    dev2.disconnect().await;
    for i in 0..3 {
        let (s, v) = call(
            &http,
            M::POST,
            api("/publish"),
            t,
            Some(json!({"topic": "d/2", "payload": format!("m{i}"), "qos": 1})),
        )
        .await;
        assert_eq!((s, v), (200, json!({"published": true})));
    }
    let (s, v) = call(&http, M::GET, api("/sessions/dev-2"), t, None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["queued"], 3, "{v}");
    assert_eq!(v["connected"], false);
    assert_eq!(v["persistent"], true);
    assert_eq!(v["subscriptions"], json!([{"filter": "d/2", "qos": 1}]));
    assert!(v["disconnected_at_ms"].as_u64().is_some(), "{v}");

    let (s, v) = call(&http, M::GET, api("/clients"), t, None).await;
    assert_eq!(s, 200);
    let ids: Vec<&str> = v["clients"]
        .as_array()
        .expect("clients")
        .iter()
        .filter_map(|c| c["client_id"].as_str())
        .collect();
    assert_eq!(ids, ["dev-1", "dev-2"], "{v}");
    assert_eq!(v["clients"][0]["connected"], true);
    assert_eq!(v["clients"][0]["protocol"], "3.1.1");
    let (_, v) = call(&http, M::GET, api("/clients?connected=true"), t, None).await;
    assert_eq!(v["clients"].as_array().map(Vec::len), Some(1), "{v}");
    let (_, v) = call(&http, M::GET, api("/clients?limit=1"), t, None).await;
    assert_eq!(v["next"], "dev-1", "{v}");
    let (_, v) = call(&http, M::GET, api("/clients?after=dev-1"), t, None).await;
    assert_eq!(v["clients"][0]["client_id"], "dev-2", "{v}");

    // Kick dev-1: its connection ends, its session stays.
    let (s, _) = call(&http, M::POST, api("/clients/dev-1/kick"), t, None).await;
    assert_eq!(s, 200);
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while dev1.events.recv().await.is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "dev-1's connection did not end");
    let mut offline = false;
    for _ in 0..100 {
        let (_, v) = call(&http, M::GET, api("/sessions/dev-1"), t, None).await;
        if v["connected"] == false {
            offline = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(offline, "dev-1 still connected after the kick");
    assert_eq!(
        call(&http, M::POST, api("/clients/dev-1/kick"), t, None)
            .await
            .0,
        404
    );
    assert_eq!(
        call(&http, M::POST, api("/clients/nobody/kick"), t, None)
            .await
            .0,
        404
    );

    // An MQTT 5 client kicked hears why: DISCONNECT 0x98 (administrative action).
    let mut v5 = mqtt5(broker.port, "dev-5");
    assert_eq!(
        call(&http, M::POST, api("/clients/dev-5/kick"), t, None)
            .await
            .0,
        200
    );
    let mut head = [0u8; 3];
    v5.read_exact(&mut head).expect("DISCONNECT");
    assert_eq!(
        (head[0], head[2]),
        (0xE0, 0x98),
        "DISCONNECT with reason 0x98"
    );

    // Delete dev-2: gone with its backlog; it comes back to no session.
    let (s, _) = call(&http, M::DELETE, api("/sessions/dev-2"), t, None).await;
    assert_eq!(s, 200);
    assert_eq!(
        call(&http, M::GET, api("/sessions/dev-2"), t, None).await.0,
        404
    );
    assert_eq!(
        call(&http, M::DELETE, api("/sessions/dev-2"), t, None)
            .await
            .0,
        404
    );
    let (mut dev2, present) = Mqtt::connect(broker.port, "dev-2", false).await;
    assert!(!present, "the deleted session came back");
    assert!(
        dev2.next_publish(Duration::from_millis(500))
            .await
            .is_none(),
        "its backlog came back"
    );
    // Deleting a connected session kicks it too.
    let (s, _) = call(&http, M::DELETE, api("/sessions/dev-2"), t, None).await;
    assert_eq!(s, 200);
    assert!(
        tokio::time::timeout(Duration::from_secs(10), async {
            while dev2.events.recv().await.is_some() {}
        })
        .await
        .is_ok(),
        "dev-2's connection did not end"
    );

    // Retained: publish, list, read, delete.
    for (topic, payload) in [("r/1", "one"), ("r/2", "two")] {
        let (s, _) = call(
            &http,
            M::POST,
            api("/publish"),
            t,
            Some(json!({"topic": topic, "payload": payload, "qos": 1, "retain": true})),
        )
        .await;
        assert_eq!(s, 200);
    }
    let (s, v) = call(&http, M::GET, api("/retained?filter=r/%23"), t, None).await;
    assert_eq!(s, 200);
    let topics: Vec<&str> = v["retained"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|m| m["topic"].as_str())
        .collect();
    assert_eq!(topics, ["r/1", "r/2"], "{v}");
    assert_eq!(v["retained"][0]["payload"], "one");
    assert_eq!(v["next"], Value::Null, "{v}");
    let (_, v) = call(
        &http,
        M::GET,
        api("/retained?filter=r/%23&limit=1"),
        t,
        None,
    )
    .await;
    assert_eq!(v["retained"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["next"], "r/1", "{v}");
    let (_, v) = call(
        &http,
        M::GET,
        api("/retained?filter=r/%23&after=r/1"),
        t,
        None,
    )
    .await;
    assert_eq!(v["retained"][0]["topic"], "r/2", "{v}");
    let (_, v) = call(&http, M::DELETE, api("/retained?filter=r/1"), t, None).await;
    assert_eq!(v, json!({"deleted": 1}));
    let (_, v) = call(&http, M::GET, api("/retained?filter=r/%23"), t, None).await;
    assert_eq!(v["retained"].as_array().map(Vec::len), Some(1), "{v}");
    let (mut late, _) = Mqtt::connect(broker.port, "late", true).await;
    late.subscribe("r/#", QoS::AtLeastOnce).await;
    let p = late
        .next_publish(Duration::from_secs(5))
        .await
        .expect("retained r/2");
    assert_eq!((p.topic.as_str(), &p.payload[..]), ("r/2", &b"two"[..]));
    assert!(
        late.next_publish(Duration::from_millis(300))
            .await
            .is_none(),
        "r/1 was deleted"
    );

    // Bad requests say what is wrong.
    assert_eq!(
        call(&http, M::DELETE, api("/retained"), t, None).await.0,
        400
    );
    assert_eq!(
        call(&http, M::GET, api("/retained?filter=a/%23/b"), t, None)
            .await
            .0,
        400
    );
    let bad = [
        json!({"topic": "a/+", "payload": "x"}),
        json!({"topic": "a", "payload": "x", "qos": 3}),
        json!({"topic": "a", "payload": "x", "payload_base64": "eA=="}),
        json!({"topic": "a", "bogus": 1}),
    ];
    for body in bad {
        let (s, v) = call(&http, M::POST, api("/publish"), t, Some(body.clone())).await;
        assert_eq!(s, 400, "{body} -> {v}");
        assert!(v["error"].is_string(), "{v}");
    }

    let m = parse(
        &http
            .get(format!("{base}/metrics"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("body"),
    );
    assert_eq!(
        m["broker_disconnects_total{reason=\"kicked\"}"], 3.0,
        "dev-1, dev-5, dev-2"
    );
    drop(broker);
}

#[test]
fn an_http_listener_off_loopback_needs_a_token() {
    let dir = tempfile::tempdir().expect("temp dir");
    let err = common::run_failing(
        dir.path(),
        &["--http-listen", "0.0.0.0:0", "--storage", "memory://"],
    );
    assert!(err.contains("[http]") && err.contains("token"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_without_the_per_connection_lines() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("broker.toml"),
        "listen = [\"127.0.0.1:0\"]\nstorage = \"memory://\"\n[log]\nformat = \"json\"\nconnections = false\n",
    )
    .expect("config");
    let mut child = std::process::Command::new(common::BIN)
        .args(["--config", "broker.toml"])
        .current_dir(dir.path())
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("broker starts");
    let rx = common::stderr_lines(&mut child);
    let mut port = None;
    let mut lines = Vec::new();
    while port.is_none() {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("a log line");
        let v: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if let Some(addr) = v["fields"]["message"]
            .as_str()
            .and_then(|m| m.strip_prefix("listening on "))
        {
            port = addr.rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
        }
        lines.push(line);
    }
    let port = port.expect("port");
    let (c, _) = Mqtt::connect(port, "quiet", true).await;
    c.disconnect().await;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    // Until stderr closes: every line the broker wrote.
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(10)) {
        lines.push(line);
    }
    for line in &lines {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let message = v["fields"]["message"].as_str().unwrap_or("");
        assert!(
            !matches!(message, "client connected" | "connection closed"),
            "a per-connection line with connections = false: {line}"
        );
    }
    assert!(lines.iter().any(|l| l.contains("\"stopped\"")), "{lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_webhook_events() {
    // A webhook receiver that acknowledges every POST.
    let receiver = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/events", receiver.local_addr().expect("addr"));
    let app = axum::Router::new().route("/events", axum::routing::post(|| async { "ok" }));
    tokio::spawn(async move { axum::serve(receiver, app).await });
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("broker.toml"),
        format!("[webhook]\nurl = \"{url}\"\nevents = [\"client_connected\"]\n"),
    )
    .expect("config");
    let (broker, base) = start(
        dir.path(),
        &["--config", "broker.toml", "--storage", "memory://"],
    )
    .await;
    let http = reqwest::Client::new();
    for i in 0..3 {
        let (c, _) = Mqtt::connect(broker.port, &format!("hooked-{i}"), true).await;
        c.disconnect().await;
    }
    let key = "broker_webhook_events_total{outcome=\"sent\"}";
    let mut sent = 0.0;
    for _ in 0..200 {
        sent = scrape(&http, &base).await.get(key).copied().unwrap_or(0.0);
        if sent >= 3.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(sent, 3.0, "three client_connected events acknowledged");
    let m = scrape(&http, &base).await;
    assert_eq!(m["broker_webhook_events_total{outcome=\"dropped\"}"], 0.0);
    assert_eq!(m["broker_webhook_failed_posts_total"], 0.0);
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http_connections_are_bounded_and_timed_out() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("broker.toml"),
        "[http]\nmax_connections = 4\n",
    )
    .expect("config");
    let (broker, base) = start(
        dir.path(),
        &["--config", "broker.toml", "--storage", "memory://"],
    )
    .await;
    let addr = base.trim_start_matches("http://").to_string();
    // Four idle connections fill the listener; a fifth is closed at once.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(
            tokio::net::TcpStream::connect(&addr)
                .await
                .expect("connect"),
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut fifth = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), fifth.read(&mut buf))
        .await
        .expect("the fifth connection is closed at once");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    // The idle ones are closed once the header timeout passes (10 s) ...
    for c in &mut idle {
        let n = tokio::time::timeout(Duration::from_secs(15), c.read(&mut buf))
            .await
            .expect("an idle connection is closed within the header timeout");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    }
    drop(idle);
    // ... and the listener serves again.
    let mut served = false;
    for _ in 0..50 {
        if let Ok(r) = reqwest::get(format!("{base}/health")).await {
            served = r.status() == 200;
            if served {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "/health after the idle connections went");
    let log = broker.log().join("\n");
    assert!(log.contains("HTTP connection refused"), "{log}");
}
