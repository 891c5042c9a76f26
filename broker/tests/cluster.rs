//! Cluster mode (`[cluster]` on one Redis): three broker processes and a
//! redis-server of the test's own (`appendfsync always`), real MQTT
//! clients through any node, `kill -9` and SIGSTOP of the leader.
//!
//! A checker records every publish acknowledged to its publisher and every
//! receipt, and reports for each failure test: acknowledged, received,
//! duplicates, reorderings (a message received after a later one of the
//! same publisher, duplicates aside).

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{BrokerProcess, DbKind, DbServer};
use rumqttc::{Event, Incoming, QoS};

/// The lease TTL of the test nodes: failover within about this.
const LEASE_MS: u64 = 3000;

struct Cluster {
    redis: DbServer,
    dir: tempfile::TempDir,
    prefix: String,
}

impl Cluster {
    fn new(name: &str) -> Cluster {
        let redis = DbServer::start_with(DbKind::Redis, &["--appendfsync", "always"]);
        Cluster {
            redis,
            dir: tempfile::tempdir().expect("tempdir"),
            prefix: common::unique(name),
        }
    }

    fn url(&self) -> String {
        format!(
            "redis://127.0.0.1:{}/?prefix={}:&lease_ms={LEASE_MS}",
            self.redis.port, self.prefix
        )
    }

    /// Start node `n{i}` and wait for it to listen (as leader or gateway).
    fn node(&self, i: usize) -> BrokerProcess {
        let path = self.dir.path().join(format!("n{i}.toml"));
        std::fs::write(
            &path,
            format!(
                "storage = \"{}\"\n[cluster]\nnode_id = \"n{i}\"\n",
                self.url()
            ),
        )
        .expect("config written");
        BrokerProcess::start(
            self.dir.path(),
            &["--config", path.to_str().expect("utf-8")],
        )
    }

    /// Start node `n{i}` and wait until it is the leader.
    fn leader(&self, i: usize) -> BrokerProcess {
        let mut p = self.node(i);
        p.wait_for_line(
            "advertised as the cluster's leader",
            Duration::from_secs(30),
        )
        .unwrap_or_else(|seen| panic!("n{i} did not lead: {seen:?}"));
        p
    }
}

fn signal(p: &BrokerProcess, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &p.pid().to_string()])
        .status()
        .expect("kill runs")
        .success();
    assert!(ok, "kill {sig}");
}

/// What a subscriber got, and what the checker makes of it.
#[derive(Debug, Default)]
struct Receipts {
    got: Vec<u32>,
}

impl Receipts {
    /// (received distinct, duplicates, reorderings).
    fn figures(&self) -> (usize, usize, usize) {
        let mut seen = HashSet::new();
        let (mut dups, mut reordered, mut max) = (0, 0, None::<u32>);
        for &n in &self.got {
            if !seen.insert(n) {
                dups += 1;
                continue;
            }
            if max.is_some_and(|m| n < m) {
                reordered += 1;
            }
            max = max.max(Some(n));
        }
        (seen.len(), dups, reordered)
    }

    fn has_all(&self, acked: &[u32]) -> Vec<u32> {
        let seen: HashSet<u32> = self.got.iter().copied().collect();
        acked
            .iter()
            .copied()
            .filter(|n| !seen.contains(n))
            .collect()
    }
}

/// A persistent MQTT 3.1.1 client that reconnects through `ports` in turn.
struct Client {
    id: String,
    mqtt: Option<common::Mqtt>,
}

impl Client {
    async fn connect(id: &str, ports: &[u16]) -> Client {
        let mut c = Client {
            id: id.to_owned(),
            mqtt: None,
        };
        c.reconnect(ports).await;
        c
    }

    /// Connect (clean = false) through the first node that answers within 30 s.
    async fn reconnect(&mut self, ports: &[u16]) {
        self.mqtt = None;
        let deadline = Instant::now() + Duration::from_secs(30);
        for port in ports.iter().cycle() {
            assert!(Instant::now() < deadline, "{}: no node accepted", self.id);
            if let Some(m) = try_connect(*port, &self.id).await {
                self.mqtt = Some(m);
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn try_connect(port: u16, id: &str) -> Option<common::Mqtt> {
    let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    o.set_clean_session(false)
        .set_keep_alive(Duration::from_secs(30))
        .set_inflight(32);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(o, 1000);
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if tx.send(event).is_err() {
                break;
            }
        }
    });
    loop {
        match tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
            Ok(Some(Event::Incoming(Incoming::ConnAck(a)))) => {
                return (a.code == rumqttc::ConnectReturnCode::Success)
                    .then_some(common::Mqtt { client, events });
            }
            Ok(Some(_)) => {}
            _ => return None,
        }
    }
}

/// Publish `0..count` at QoS 1 on `topic` one at a time as `id`, through
/// `ports`, resending the unacknowledged one after a reconnect; calls
/// `at(n)` before publishing n. Returns the acknowledged numbers.
async fn publish_all(
    id: &str,
    ports: &[u16],
    topic: &str,
    count: u32,
    mut at: impl FnMut(u32),
) -> Vec<u32> {
    let mut c = Client::connect(id, ports).await;
    let mut acked = Vec::new();
    let mut n = 0;
    while n < count {
        at(n);
        let m = c.mqtt.as_mut().expect("connected");
        if m.client
            .publish(topic, QoS::AtLeastOnce, false, n.to_string())
            .await
            .is_err()
        {
            c.reconnect(ports).await;
            continue;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let ok = loop {
            match tokio::time::timeout_at(deadline, m.events.recv()).await {
                Ok(Some(Event::Incoming(Incoming::PubAck(_)))) => break true,
                Ok(Some(_)) => {}
                _ => break false,
            }
        };
        if ok {
            acked.push(n);
            n += 1;
        } else {
            c.reconnect(ports).await;
        }
    }
    if let Some(m) = c.mqtt.take() {
        m.disconnect().await;
    }
    acked
}

/// Receive through `ports` as persistent `id` until every number in
/// `want` came or `within` passed, reconnecting when a node goes.
async fn receive(c: &mut Client, ports: &[u16], want: &[u32], within: Duration) -> Receipts {
    let mut r = Receipts::default();
    let deadline = tokio::time::Instant::now() + within;
    while !r.has_all(want).is_empty() && tokio::time::Instant::now() < deadline {
        let m = c.mqtt.as_mut().expect("connected");
        match tokio::time::timeout_at(deadline, m.events.recv()).await {
            Ok(Some(Event::Incoming(Incoming::Publish(p)))) => {
                if let Some(n) = std::str::from_utf8(&p.payload)
                    .ok()
                    .and_then(|s| s.parse().ok())
                {
                    r.got.push(n);
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => c.reconnect(ports).await,
            Err(_) => break,
        }
    }
    r
}

fn report(name: &str, acked: &[u32], r: &Receipts) {
    let (received, dups, reordered) = r.figures();
    eprintln!(
        "{name}: acknowledged {}, received {received}, duplicates {dups}, reorderings {reordered}",
        acked.len()
    );
    let missing = r.has_all(acked);
    assert!(
        missing.is_empty(),
        "{name}: {} acknowledged messages never arrived, first {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert_eq!(reordered, 0, "{name}: messages out of order");
}

/// kill -9 of the leader mid-stream, with the subscriber online through a
/// gateway and the publisher on another: the subscriber moves to another
/// node and receives everything acknowledged, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_mid_stream_loses_nothing_acknowledged() {
    let cluster = Cluster::new("cluster-kill");
    let n1 = cluster.leader(1);
    let n2 = cluster.node(2);
    let n3 = cluster.node(3);
    let (p1, p2, p3) = (n1.port, n2.port, n3.port);
    let mut sub = Client::connect("device-1", &[p3, p2]).await;
    sub.mqtt
        .as_mut()
        .expect("connected")
        .subscribe("devices/1", QoS::AtLeastOnce)
        .await;

    let count = 1500;
    let mut leader = Some(n1);
    let _ = p1;
    let publisher = tokio::spawn(async move {
        publish_all("pub-1", &[p2, p3], "devices/1", count, move |n| {
            if n == count / 3 {
                if let Some(l) = leader.take() {
                    l.kill9();
                }
            }
        })
        .await
    });
    let all: Vec<u32> = (0..count).collect();
    let mut r = receive(&mut sub, &[p2, p3], &all, Duration::from_secs(120)).await;
    let acked = publisher.await.expect("publisher");
    if !r.has_all(&acked).is_empty() {
        let more = receive(&mut sub, &[p2, p3], &acked, Duration::from_secs(20)).await;
        r.got.extend(more.got);
    }
    report("leader killed mid-stream", &acked, &r);
    assert_eq!(
        acked.len(),
        count as usize,
        "the publisher got every message acknowledged in the end"
    );
    drop((n2, n3));
}

/// A SUBACK through one node is honoured by a publish through another
/// from then on, and retained messages reach subscribers on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suback_on_one_node_publish_on_another() {
    let cluster = Cluster::new("cluster-route");
    let n1 = cluster.leader(1);
    let n2 = cluster.node(2);
    let n3 = cluster.node(3);
    for round in 0..20 {
        let topic = format!("route/{round}");
        let (mut s, _) = common::Mqtt::connect(n2.port, &format!("s-{round}"), true).await;
        s.subscribe(&topic, QoS::AtLeastOnce).await;
        let (p, _) = common::Mqtt::connect(n3.port, &format!("p-{round}"), true).await;
        p.client
            .publish(&topic, QoS::AtLeastOnce, true, "hello")
            .await
            .expect("publish");
        let got = s.next_publish(Duration::from_secs(10)).await;
        assert!(
            got.is_some_and(|m| &m.payload[..] == b"hello"),
            "round {round}"
        );
        // Retained, read back through the third node.
        let (mut late, _) = common::Mqtt::connect(n1.port, &format!("l-{round}"), true).await;
        late.subscribe(&topic, QoS::AtLeastOnce).await;
        let got = late.next_publish(Duration::from_secs(10)).await;
        assert!(
            got.is_some_and(|m| m.retain && &m.payload[..] == b"hello"),
            "round {round}"
        );
        for c in [s, p, late] {
            c.disconnect().await;
        }
    }
}

/// A leader frozen (SIGSTOP) past its lease: another node takes the lead
/// and the client, moved there, keeps its session; resumed (SIGCONT), the
/// former leader exits without writing, and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_is_fenced_and_exits_when_resumed() {
    let cluster = Cluster::new("cluster-freeze");
    let mut n1 = cluster.leader(1);
    let n2 = cluster.node(2);
    let (p1, p2) = (n1.port, n2.port);
    let mut sub = Client::connect("frozen-sub", &[p1]).await;
    sub.mqtt
        .as_mut()
        .expect("connected")
        .subscribe("frozen/t", QoS::AtLeastOnce)
        .await;
    sub.mqtt.take().expect("connected").disconnect().await;
    let before = publish_all("frozen-pub", &[p2], "frozen/t", 100, |_| {}).await;

    signal(&n1, "-STOP");
    // Past the lease: n2 takes the lead and serves the session.
    let after = publish_all("frozen-pub", &[p2], "frozen/t", 100, |_| {}).await;
    signal(&n1, "-CONT");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = n1.exited() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the resumed former leader kept running"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        status.code(),
        Some(3),
        "exit status of a leader that lost its lease"
    );

    let mut sub = Client::connect("frozen-sub", &[p2]).await;
    // Both streams carried 0..100: 200 messages, the second 100 after the first.
    let mut r = Receipts::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while r.got.len() < before.len() + after.len() && tokio::time::Instant::now() < deadline {
        let m = sub.mqtt.as_mut().expect("connected");
        match tokio::time::timeout_at(deadline, m.events.recv()).await {
            Ok(Some(Event::Incoming(Incoming::Publish(p)))) => r.got.push(
                std::str::from_utf8(&p.payload)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(u32::MAX),
            ),
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    eprintln!(
        "frozen leader: acknowledged {}, received {}",
        before.len() + after.len(),
        r.got.len()
    );
    let expected: Vec<u32> = before.iter().chain(after.iter()).copied().collect();
    assert_eq!(r.got, expected, "every acknowledged message once, in order");
    drop(n2);
}

/// A node refuses a Redis that does not fsync every write.
#[test]
fn a_node_refuses_redis_without_appendfsync_always() {
    let redis = DbServer::start(DbKind::Redis);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("n.toml");
    std::fs::write(
        &path,
        format!(
            "storage = \"redis://127.0.0.1:{}/?prefix=x:\"\n[cluster]\nnode_id = \"n1\"\n",
            redis.port
        ),
    )
    .expect("config");
    let err = common::run_failing(
        Path::new(dir.path()),
        &["--config", path.to_str().expect("utf-8")],
    );
    assert!(err.contains("appendfsync always"), "{err}");
}
