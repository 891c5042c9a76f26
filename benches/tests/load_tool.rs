//! `broker-bench` against an in-process broker on the memory store: every
//! scenario runs briefly and its JSON result is checked for correctness
//! (deliveries, losses, order). Speed is never asserted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use broker_core::config::BrokerConfig;
use broker_core::server::Server;
use broker_core::storage::Storage;
use broker_core::Broker;
use serde_json::Value;
use storage_memory::MemoryStore;

struct TestBroker {
    addr: SocketAddr,
    broker: Broker,
    task: tokio::task::JoinHandle<()>,
}

async fn start_broker() -> TestBroker {
    let storage = Storage::from_backend(Arc::new(MemoryStore::new()));
    let broker = Broker::start(BrokerConfig::default(), storage)
        .await
        .expect("broker starts");
    let server = Server::bind(broker.clone(), "127.0.0.1:0")
        .await
        .expect("bind");
    let addr = server.local_addr().expect("addr");
    let task = tokio::spawn(server.run());
    TestBroker { addr, broker, task }
}

impl TestBroker {
    async fn stop(self) {
        self.broker.shutdown().await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

/// Run the tool against `b` and return its exit success and JSON result.
async fn bench(b: &TestBroker, args: &[&str]) -> (bool, Value) {
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("result.jsonl");
    let port = b.addr.port().to_string();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_broker-bench"));
    cmd.args([
        "--quiet",
        "--host",
        "127.0.0.1",
        "--port",
        &port,
        "--label",
        "test",
        "--json",
    ])
    .arg(&json)
    .args(args)
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("broker-bench stops by itself")
        .expect("broker-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let written = std::fs::read_to_string(&json)
        .unwrap_or_else(|e| panic!("no JSON file ({e}); stdout:\n{stdout}\nstderr:\n{stderr}"));
    let lines: Vec<&str> = written.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON line per run");
    let v: Value = serde_json::from_str(lines[0]).expect("JSON result");
    // The same object is the last line of stdout.
    let last = stdout.lines().last().expect("stdout");
    assert_eq!(
        serde_json::from_str::<Value>(last).expect("JSON on stdout"),
        v
    );
    if !out.status.success() {
        eprintln!("stdout:\n{stdout}\nstderr:\n{stderr}");
    }
    (out.status.success(), v)
}

fn n(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} is not a count in {v}"))
}

fn assert_clean(v: &Value) {
    assert_eq!(n(v, "losses"), 0, "{v}");
    assert_eq!(n(v, "order_violations"), 0, "{v}");
    assert_eq!(n(v, "errors"), 0, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_in_qos1_flat_out_delivers_every_acknowledged_publish() {
    let b = start_broker().await;
    let (ok, v) = bench(
        &b,
        &[
            "fan-in",
            "--qos",
            "1",
            "--publishers",
            "3",
            "--duration",
            "2",
            "--warmup",
            "1",
        ],
    )
    .await;
    assert!(ok, "{v}");
    assert_eq!(v["scenario"], "fan-in");
    assert_eq!(v["label"], "test");
    assert_eq!((n(&v, "publishers"), n(&v, "subscribers")), (3, 1));
    assert!(n(&v, "sent") > 0);
    assert_eq!(n(&v, "acked"), n(&v, "sent"), "{v}");
    assert_eq!(n(&v, "delivered"), n(&v, "acked"), "{v}");
    assert_eq!(n(&v, "expected"), n(&v, "acked"));
    assert_eq!(n(&v, "duplicates"), 0);
    assert_clean(&v);
    assert!(v["latency_ms"]["p50"].as_f64().is_some(), "{v}");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_qos2_at_a_fixed_rate_delivers_each_message_to_every_subscriber_once() {
    let b = start_broker().await;
    let (ok, v) = bench(
        &b,
        &[
            "fan-out",
            "--qos",
            "2",
            "--subscribers",
            "8",
            "--rate",
            "500",
            "--duration",
            "2",
            "--warmup",
            "0",
        ],
    )
    .await;
    assert!(ok, "{v}");
    let sent = n(&v, "sent");
    // 500 msg/s for 2 s, give or take scheduling.
    assert!((700..=1100).contains(&sent), "{v}");
    assert_eq!(n(&v, "acked"), sent);
    assert_eq!(n(&v, "delivered"), sent * 8, "{v}");
    assert_eq!(n(&v, "duplicates"), 0);
    assert_clean(&v);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairs_qos0_arrive_in_order() {
    let b = start_broker().await;
    let (ok, v) = bench(
        &b,
        &[
            "pairs",
            "--publishers",
            "4",
            "--rate",
            "2000",
            "--duration",
            "2",
            "--warmup",
            "0",
        ],
    )
    .await;
    assert!(ok, "{v}");
    assert_eq!((n(&v, "publishers"), n(&v, "subscribers")), (4, 4));
    let sent = n(&v, "sent");
    assert!(sent > 0);
    assert_eq!(n(&v, "acked"), 0, "QoS 0 has no acknowledgement");
    assert_eq!(n(&v, "expected"), sent);
    // QoS 0 may drop; what arrives must be distinct, in order, and accounted for.
    assert!(n(&v, "delivered") > 0);
    assert_eq!(n(&v, "delivered") + n(&v, "dropped"), sent, "{v}");
    assert_eq!(n(&v, "duplicates"), 0);
    assert_clean(&v);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_sessions_get_every_message_in_order() {
    let b = start_broker().await;
    let (ok, v) = bench(
        &b,
        &[
            "persistent",
            "--subscribers",
            "3",
            "--publishers",
            "2",
            "--messages",
            "500",
        ],
    )
    .await;
    assert!(ok, "{v}");
    assert_eq!(n(&v, "sent"), 500);
    assert_eq!(n(&v, "acked"), 500);
    assert_eq!(n(&v, "expected"), 1500);
    assert_eq!(n(&v, "delivered"), 1500, "{v}");
    assert_eq!(n(&v, "duplicates"), 0);
    assert_clean(&v);
    assert!(v["drain_per_s"].as_f64().is_some_and(|d| d > 0.0), "{v}");
    // The sessions were deleted at the end.
    assert_eq!(b.broker.session_count(), 0);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_qos2_with_a_topic_per_subscriber() {
    let b = start_broker().await;
    let (ok, v) = bench(
        &b,
        &[
            "persistent",
            "--qos",
            "2",
            "--subscribers",
            "3",
            "--publishers",
            "2",
            "--messages",
            "300",
            "--topic-per-subscriber",
        ],
    )
    .await;
    assert!(ok, "{v}");
    assert_eq!(n(&v, "acked"), 300);
    // Each message goes to one subscriber's topic.
    assert_eq!(n(&v, "expected"), 300);
    assert_eq!(n(&v, "delivered"), 300, "{v}");
    assert_eq!(n(&v, "duplicates"), 0);
    assert_clean(&v);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conn_holds_every_connection() {
    let b = start_broker().await;
    let pid = std::process::id().to_string();
    let (ok, v) = bench(
        &b,
        &[
            "--pid",
            &pid,
            "conn",
            "--connections",
            "200",
            "--concurrency",
            "50",
            "--hold",
            "1",
        ],
    )
    .await;
    assert!(ok, "{v}");
    assert_eq!(v["scenario"], "conn");
    assert_eq!(n(&v, "connections"), 200);
    assert_eq!(n(&v, "connected"), 200);
    assert_eq!(n(&v, "held"), 200, "{v}");
    assert!(v["connects_per_s"].as_f64().is_some_and(|c| c > 0.0));
    assert!(n(&v, "rss_before_kb") > 0 && n(&v, "rss_after_kb") > 0);
    assert_eq!(n(&v, "errors"), 0);
    b.stop().await;
}

#[tokio::test]
async fn a_payload_below_the_header_is_refused() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_broker-bench"))
        .args(["--port", "1", "fan-in", "--payload", "10"])
        .output()
        .await
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 24"));
}
