//! One broker per Redis prefix or MongoDB database, on the real binary: a
//! second broker is refused naming the first; a graceful stop releases the
//! store at once; after `kill -9` the next broker takes over within the
//! lease's TTL and continues the message ids; a broker frozen past its TTL
//! while another took over stops writing.
//!
//! Needs the Redis at `REDIS_URL` and the MongoDB-compatible server at
//! `MONGODB_URI` (scripts/test starts both); fails, saying so, without them.
//! Run: `cargo test -p broker --features redis,mongo --test lease`.

#![cfg(all(feature = "redis", feature = "mongo"))]

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{run_failing, Mqtt, BIN};
use rumqttc::{Event, Incoming, QoS};

/// A broker process whose pid the test knows (to freeze it).
struct Broker {
    child: Child,
    port: u16,
    lines: mpsc::Receiver<String>,
}

impl Broker {
    fn start(cwd: &std::path::Path, storage: &str) -> Broker {
        let mut child = Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--storage", storage])
            .current_dir(cwd)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("broker binary starts");
        let lines = common::stderr_lines(&mut child);
        let mut b = Broker {
            child,
            port: 0,
            lines,
        };
        let addr = b
            .wait_for("listening on ", Duration::from_secs(60))
            .unwrap_or_else(|seen| panic!("broker did not start; its log: {seen:?}"));
        b.port = addr
            .rsplit(':')
            .next()
            .and_then(|p| p.trim().parse().ok())
            .expect("port in the `listening on` line");
        b
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_for(&mut self, needle: &str, within: Duration) -> Result<String, Vec<String>> {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => match line.split_once(needle) {
                    Some((_, rest)) => return Ok(rest.to_owned()),
                    None => seen.push(line),
                },
                Err(_) => return Err(seen),
            }
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{name}");
    }

    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn terminate(mut self) {
        self.signal("TERM");
        let status = self.child.wait().expect("broker exits");
        assert!(status.success(), "broker exit status {status}");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Publish QoS 1 messages on a persistent session; true if all were acknowledged.
async fn publish(port: u16, payloads: &[String]) -> bool {
    let (mut c, _) = Mqtt::connect(port, "lease-pub", true).await;
    for p in payloads {
        if c.client
            .publish("lease/data", QoS::AtLeastOnce, false, p.clone())
            .await
            .is_err()
        {
            return false;
        }
        let acked = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match c.events.recv().await {
                    Some(Event::Incoming(Incoming::PubAck(_))) => return true,
                    Some(_) => {}
                    None => return false,
                }
            }
        })
        .await
        .unwrap_or(false);
        if !acked {
            return false;
        }
    }
    c.disconnect().await;
    true
}

/// Everything queued for the persistent subscriber `lease-sub`.
async fn drain(port: u16) -> Vec<String> {
    let (mut sub, present) = Mqtt::connect(port, "lease-sub", false).await;
    assert!(present, "the subscriber's session was kept");
    let mut got = Vec::new();
    while let Some(p) = sub.next_publish(Duration::from_secs(3)).await {
        got.push(String::from_utf8_lossy(&p.payload).into_owned());
    }
    sub.disconnect().await;
    got
}

async fn one_broker_per_store(base: &str) {
    let dir = tempfile::tempdir().expect("tempdir");

    // A graceful stop releases the store: with a one-minute lease, a start
    // within the helper's 60 s shows it did not wait for the lease.
    let long = common::with_param(base, "lease_ms=60000");
    let a = Broker::start(dir.path(), &long);
    let (mut sub, _) = Mqtt::connect(a.port, "lease-sub", false).await;
    sub.subscribe("lease/#", QoS::AtLeastOnce).await;
    sub.disconnect().await;
    a.terminate();
    let started = Instant::now();
    let b = Broker::start(dir.path(), &long);
    eprintln!("restart after a graceful stop: {:?}", started.elapsed());
    // Served, and its signal handlers installed (they come right after the
    // `listening on` line) before it is stopped.
    let (probe, _) = Mqtt::connect(b.port, "lease-probe", true).await;
    probe.disconnect().await;
    b.terminate();

    // A second broker is refused, naming the first.
    let ttl = Duration::from_millis(2000);
    let short = common::with_param(base, "lease_ms=2000");
    let c = Broker::start(dir.path(), &short);
    let before: Vec<String> = (0..5).map(|n| format!("before-{n}")).collect();
    assert!(publish(c.port, &before).await, "publishes before the kill");
    let err = run_failing(dir.path(), &["--storage", &short]);
    assert!(err.contains("in use by another broker"), "{err}");
    assert!(
        err.contains(&format!("host {}, pid {}, since ", host(), c.pid())),
        "the refusal names the holder: {err}"
    );

    // kill -9: the next broker takes over within the TTL and a margin.
    c.kill9();
    let started = Instant::now();
    let mut d = Broker::start(dir.path(), &short);
    let took = started.elapsed();
    eprintln!("restart after kill -9 with a {ttl:?} lease: {took:?}");
    assert!(
        took < ttl + Duration::from_secs(20),
        "restart took {took:?}"
    );
    let after: Vec<String> = (0..5).map(|n| format!("after-{n}")).collect();
    assert!(publish(d.port, &after).await, "publishes after the restart");
    // Every body is its own: ids given after the crash reused none.
    let got = drain(d.port).await;
    let want: Vec<String> = before.iter().chain(&after).cloned().collect();
    assert_eq!(got, want, "messages across the kill -9");

    // Frozen past its TTL while another broker took over: once thawed it
    // finds the lease gone and never writes again.
    d.signal("STOP");
    let e = Broker::start(dir.path(), &short);
    d.signal("CONT");
    d.wait_for("lost the lease", ttl * 3)
        .unwrap_or_else(|seen| panic!("the lost lease is not logged: {seen:?}"));
    assert!(
        !publish(d.port, &["stale".to_owned()]).await,
        "a broker without the lease acknowledged a publish"
    );
    let fresh = vec!["fresh".to_owned()];
    assert!(publish(e.port, &fresh).await, "the new holder works");
    assert_eq!(drain(e.port).await, fresh, "what the new holder delivers");
    drop(d);
    e.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_broker_per_redis_prefix() {
    let url = common::redis_url(&common::unique("lease"));
    one_broker_per_store(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_broker_per_mongodb_database() {
    let db = common::unique("lease").replace('-', "_");
    let url = common::with_param(&common::mongodb_url(&db), "timeoutMS=60000");
    one_broker_per_store(&url).await;
}
