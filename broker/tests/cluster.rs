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
const LEASE_MS: u64 = 5000;

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
    // Acknowledged only once recorded (`record`): a message the checker
    // never saw is never acknowledged, so it is not lost to the check.
    o.set_clean_session(false)
        .set_keep_alive(Duration::from_secs(30))
        .set_manual_acks(true)
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

/// Note `p` in `r`, then acknowledge it.
async fn record(m: &common::Mqtt, p: rumqttc::Publish, r: &mut Receipts) {
    r.got.push(
        std::str::from_utf8(&p.payload)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(u32::MAX),
    );
    let _ = m.client.ack(&p).await;
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
            Ok(Some(Event::Incoming(Incoming::Publish(p)))) => record(m, p, &mut r).await,
            Ok(Some(_)) => {}
            Ok(None) => c.reconnect(ports).await,
            Err(_) => break,
        }
    }
    r
}

/// What `c` receives (on its connection, within 30 s) is exactly the
/// acknowledged `streams`, one after the other, each once and in order.
async fn exactly_in_order(name: &str, c: &mut Client, streams: &[&[u32]]) {
    let expected: Vec<u32> = streams.iter().flat_map(|s| s.iter().copied()).collect();
    let mut r = Receipts::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let m = c.mqtt.as_mut().expect("connected");
    while r.got.len() < expected.len() {
        match tokio::time::timeout_at(deadline, m.events.recv()).await {
            Ok(Some(Event::Incoming(Incoming::Publish(p)))) => record(m, p, &mut r).await,
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    eprintln!(
        "{name}: acknowledged {}, received {}",
        expected.len(),
        r.got.len()
    );
    assert_eq!(
        r.got, expected,
        "{name}: every acknowledged message once, in order"
    );
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

/// Connect `id` (clean session, never reconnecting) through `port` with a
/// QoS 1 will on `topic`, and keep it connected until its connection ends.
async fn hold_with_will(id: &str, port: u16, topic: &str) {
    let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(60))
        .set_last_will(rumqttc::LastWill::new(
            topic,
            "gone",
            QoS::AtLeastOnce,
            false,
        ));
    let (_client, mut eventloop) = rumqttc::AsyncClient::new(o, 10);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut tx = Some(tx);
    tokio::spawn(async move {
        let _client = _client;
        while let Ok(e) = eventloop.poll().await {
            if let Event::Incoming(Incoming::ConnAck(_)) = e {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(());
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .expect("CONNACK for the will holder")
        .expect("the will holder connected");
}

/// Subscribe persistent `id` to `topic` through `ports`, then leave.
async fn watch_wills(id: &str, ports: &[u16], topic: &str) {
    let mut watch = Client::connect(id, ports).await;
    let m = watch.mqtt.as_mut().expect("connected");
    m.subscribe(topic, QoS::AtLeastOnce).await;
    watch.mqtt.take().expect("connected").disconnect().await;
}

/// How many messages persistent `id` receives through `ports` until 3 s
/// pass without one.
async fn wills_received(id: &str, ports: &[u16]) -> usize {
    let mut watch = Client::connect(id, ports).await;
    let m = watch.mqtt.as_mut().expect("connected");
    let mut wills = 0;
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_secs(3), m.events.recv()).await {
        if let Event::Incoming(Incoming::Publish(p)) = e {
            wills += 1;
            let _ = m.client.ack(&p).await;
        }
    }
    wills
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
    // A client with a will, through a gateway: its session lives in the
    // leader that dies; the next leader publishes the will, once.
    watch_wills("kill-will-watch", &[p2], "kill/will").await;
    hold_with_will("kill-will-holder", p3, "kill/will").await;
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
    let wills = wills_received("kill-will-watch", &[p2, p3]).await;
    eprintln!("leader killed: the will of a client it held published {wills} times");
    assert_eq!(
        wills, 1,
        "the will of a client of the killed leader, exactly once"
    );
    drop((n2, n3));
}

/// A SUBACK through one node is honoured by a publish through another
/// from then on, retained messages reach subscribers on every node, and
/// retained messages published through two nodes at once leave one winner
/// that every node gives out.
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
    // Retained messages published through two nodes at once: every node
    // then gives a new subscriber the same one, the last committed.
    for round in 0..20 {
        let topic = format!("race/{round}");
        let (a, _) = common::Mqtt::connect(n2.port, &format!("ra-{round}"), true).await;
        let (b, _) = common::Mqtt::connect(n3.port, &format!("rb-{round}"), true).await;
        let (x, y) = tokio::join!(
            a.client.publish(&topic, QoS::AtLeastOnce, true, "from-n2"),
            b.client.publish(&topic, QoS::AtLeastOnce, true, "from-n3"),
        );
        x.and(y).expect("publish");
        let (mut a, mut b) = (a, b);
        for m in [&mut a, &mut b] {
            while !matches!(
                tokio::time::timeout(Duration::from_secs(10), m.events.recv()).await,
                Ok(Some(Event::Incoming(Incoming::PubAck(_)))) | Ok(None) | Err(_)
            ) {}
        }
        let mut seen = Vec::new();
        for (i, port) in [n1.port, n2.port, n3.port].into_iter().enumerate() {
            let (mut s, _) = common::Mqtt::connect(port, &format!("rs-{round}-{i}"), true).await;
            s.subscribe(&topic, QoS::AtLeastOnce).await;
            let got = s
                .next_publish(Duration::from_secs(10))
                .await
                .expect("retained");
            seen.push(got.payload.to_vec());
            s.disconnect().await;
        }
        assert!(
            seen.windows(2).all(|w| w[0] == w[1]),
            "round {round}: nodes disagree on the retained message: {seen:?}"
        );
        a.disconnect().await;
        b.disconnect().await;
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
    watch_wills("will-watch", &[p1], "frozen/will").await;
    // A client with a will, connected to the leader that will freeze.
    hold_with_will("will-holder", p1, "frozen/will").await;
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
    exactly_in_order("frozen leader", &mut sub, &[&before, &after]).await;
    // The will of the client whose leader froze: published by the next
    // leader, never by the frozen one (fenced): exactly once.
    let wills = wills_received("will-watch", &[p2]).await;
    eprintln!("frozen leader: the will of its client published {wills} times");
    assert_eq!(wills, 1, "the will was published {wills} times");
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

/// A TCP relay the test controls: it forwards to a port that can change,
/// and can cut every connection (and refuse new ones) until healed.
struct Proxy {
    port: u16,
    target: std::sync::Arc<std::sync::atomic::AtomicU16>,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    generation: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
}

impl Proxy {
    async fn start(target: u16) -> Proxy {
        use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy binds");
        let port = listener.local_addr().expect("addr").port();
        let target = std::sync::Arc::new(AtomicU16::new(target));
        let cut = std::sync::Arc::new(AtomicBool::new(false));
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let generation = std::sync::Arc::new(generation);
        let (t, c, g) = (target.clone(), cut.clone(), generation.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if c.load(Ordering::SeqCst) {
                    continue;
                }
                let to = t.load(Ordering::SeqCst);
                let mut cancelled = g.subscribe();
                tokio::spawn(async move {
                    let Ok(mut upstream) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                        _ = cancelled.changed() => {}
                    }
                });
            }
        });
        Proxy {
            port,
            target,
            cut,
            generation,
        }
    }

    /// New connections go to `port`; open ones are closed.
    fn retarget(&self, port: u16) {
        self.target.store(port, std::sync::atomic::Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Close every connection and refuse new ones.
    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }
}

/// kill -9 of the node a QoS 2 publisher is connected through, mid-stream:
/// the publisher's client resends its unfinished exchanges through another
/// node, and the subscriber gets every message exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publishers_node_killed_mid_stream_qos2_exactly_once() {
    let cluster = Cluster::new("cluster-pubnode");
    let _n1 = cluster.leader(1);
    let n2 = cluster.node(2);
    let n3 = cluster.node(3);
    let mut sub = Client::connect("qos2-sub", &[n3.port]).await;
    sub.mqtt
        .as_mut()
        .expect("connected")
        .subscribe("exactly/once", QoS::ExactlyOnce)
        .await;

    // One client session whose connection moves from n2 to n3, resending
    // its unfinished exchange as MQTT says (`Qos2Publisher`).
    let proxy = Proxy::start(n2.port).await;
    let count: u32 = 600;
    let mut publisher = Qos2Publisher::connect("qos2-pub", proxy.port).await;
    // The kill comes from another task, at whatever point of an exchange
    // the publisher is then.
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let killer = {
        let progress = progress.clone();
        let n3_port = n3.port;
        tokio::spawn(async move {
            while progress.load(std::sync::atomic::Ordering::SeqCst) < count / 3 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            n2.kill9();
            proxy.retarget(n3_port);
            proxy
        })
    };
    let mut completed = 0u32;
    for n in 0..count {
        publisher.publish("exactly/once", n).await;
        completed += 1;
        progress.store(completed, std::sync::atomic::Ordering::SeqCst);
    }
    let _proxy = killer.await.expect("killer");
    let acked: Vec<u32> = (0..completed).collect();
    let all: Vec<u32> = (0..count).collect();
    let mut r = receive(&mut sub, &[n3.port], &all, Duration::from_secs(60)).await;
    // Whatever else is on its way.
    let more = receive(&mut sub, &[n3.port], &[u32::MAX], Duration::from_secs(1)).await;
    r.got.extend(more.got);
    report("publisher's node killed, QoS 2", &acked, &r);
    assert_eq!(
        acked.len(),
        count as usize,
        "every publish completed (PUBCOMP)"
    );
    let (_, dups, _) = r.figures();
    assert_eq!(dups, 0, "QoS 2 delivered more than once");
}

/// A QoS 2 publisher written to the letter of MQTT 3.1.1 (4.3.3, 4.4):
/// one exchange at a time; after a lost connection it reconnects (clean
/// session 0) and resends the unfinished exchange: the PUBLISH with DUP and
/// the same packet id if PUBREC had not come, else the PUBREL.
struct Qos2Publisher {
    id: String,
    port: u16,
    stream: Option<tokio::net::TcpStream>,
}

impl Qos2Publisher {
    async fn connect(id: &str, port: u16) -> Qos2Publisher {
        let mut p = Qos2Publisher {
            id: id.to_owned(),
            port,
            stream: None,
        };
        p.reconnect().await;
        p
    }

    async fn reconnect(&mut self) {
        use tokio::io::AsyncWriteExt;
        self.stream = None;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(Instant::now() < deadline, "{}: cannot reconnect", self.id);
            if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await {
                let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x00, 0, 60];
                body.extend_from_slice(&(self.id.len() as u16).to_be_bytes());
                body.extend_from_slice(self.id.as_bytes());
                let mut connect = vec![0x10, body.len() as u8];
                connect.extend(body);
                if s.write_all(&connect).await.is_ok() {
                    if let Some((0x20, ack)) = read_packet(&mut s).await {
                        if ack.get(1) == Some(&0) {
                            self.stream = Some(s);
                            return;
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Publish `n` on `topic` at QoS 2 and return once PUBCOMP came.
    async fn publish(&mut self, topic: &str, n: u32) {
        use tokio::io::AsyncWriteExt;
        let packet_id = (n % 65_535 + 1) as u16;
        let payload = n.to_string();
        let publish = |dup: bool| {
            let mut body = (topic.len() as u16).to_be_bytes().to_vec();
            body.extend_from_slice(topic.as_bytes());
            body.extend_from_slice(&packet_id.to_be_bytes());
            body.extend_from_slice(payload.as_bytes());
            let mut p = vec![0x34 | if dup { 0x08 } else { 0 }, body.len() as u8];
            p.extend(body);
            p
        };
        let pubrel = {
            let [a, b] = packet_id.to_be_bytes();
            vec![0x62, 2, a, b]
        };
        let mut released = false;
        let mut dup = false;
        loop {
            let s = self.stream.as_mut().expect("connected");
            let out = if released {
                pubrel.clone()
            } else {
                publish(dup)
            };
            let answer = match s.write_all(&out).await {
                Ok(()) => read_packet(s).await,
                Err(_) => None,
            };
            match answer {
                Some((0x50, _)) if !released => released = true,
                Some((0x70, _)) if released => return,
                Some((kind, _)) => panic!("{}: unexpected packet {kind:#x} for {n}", self.id),
                None => {
                    dup = true;
                    self.reconnect().await;
                }
            }
        }
    }
}

/// One packet (first byte, body), for the small answers of `Qos2Publisher`;
/// `None` when the connection ends or stays silent for 10 s.
async fn read_packet(s: &mut tokio::net::TcpStream) -> Option<(u8, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let read = async {
        let mut head = [0u8; 2];
        s.read_exact(&mut head).await.ok()?;
        if head[1] & 0x80 != 0 {
            return None;
        }
        let mut body = vec![0u8; head[1] as usize];
        s.read_exact(&mut body).await.ok()?;
        Some((head[0] & 0xF0, body))
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .ok()?
}

/// The leader cut off from Redis (through a relay the test controls): it
/// exits within its lease; another node leads; nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_redis_steps_down() {
    let cluster = Cluster::new("cluster-cut");
    let redis_relay = Proxy::start(cluster.redis.port).await;
    // n1 reaches Redis only through the relay.
    let path = cluster.dir.path().join("n1-cut.toml");
    std::fs::write(
        &path,
        format!(
            "storage = \"redis://127.0.0.1:{}/?prefix={}:&lease_ms={LEASE_MS}\"\n[cluster]\nnode_id = \"n1\"\n",
            redis_relay.port, cluster.prefix
        ),
    )
    .expect("config");
    let mut n1 = BrokerProcess::start(
        cluster.dir.path(),
        &["--config", path.to_str().expect("utf-8")],
    );
    n1.wait_for_line(
        "advertised as the cluster's leader",
        Duration::from_secs(30),
    )
    .expect("n1 leads");
    let n2 = cluster.node(2);
    let mut sub = Client::connect("cut-sub", &[n2.port]).await;
    sub.mqtt
        .as_mut()
        .expect("connected")
        .subscribe("cut/t", QoS::AtLeastOnce)
        .await;
    sub.mqtt.take().expect("connected").disconnect().await;
    let before = publish_all("cut-pub", &[n2.port], "cut/t", 100, |_| {}).await;
    redis_relay.cut();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = n1.exited() {
            break s;
        }
        assert!(Instant::now() < deadline, "the cut-off leader kept running");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(3));
    let after = publish_all("cut-pub", &[n2.port], "cut/t", 100, |_| {}).await;
    let mut sub = Client::connect("cut-sub", &[n2.port]).await;
    exactly_in_order("leader cut off from Redis", &mut sub, &[&before, &after]).await;
}

/// kill -9 of Redis, and a restart on its disk: the leader steps down
/// while Redis is gone, a node leads again once it is back, and every
/// acknowledged message is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_keeps_every_acknowledged_message() {
    let mut cluster = Cluster::new("cluster-redis");
    let _n1 = cluster.leader(1);
    let n2 = cluster.node(2);
    let n3 = cluster.node(3);
    let mut sub = Client::connect("r-sub", &[n2.port]).await;
    sub.mqtt
        .as_mut()
        .expect("connected")
        .subscribe("r/t", QoS::AtLeastOnce)
        .await;
    sub.mqtt.take().expect("connected").disconnect().await;
    let acked = publish_all("r-pub", &[n3.port], "r/t", 300, |_| {}).await;
    cluster.redis.kill9();
    tokio::time::sleep(Duration::from_millis(LEASE_MS)).await;
    cluster.redis.restart();
    let mut sub = Client::connect("r-sub", &[n2.port, n3.port]).await;
    let r = receive(
        &mut sub,
        &[n2.port, n3.port],
        &acked,
        Duration::from_secs(60),
    )
    .await;
    report("Redis killed and restarted", &acked, &r);
    drop((n2, n3));
}

/// The same client id connecting through two nodes at the same moment,
/// 1,000 times: each time exactly one connection survives (takeover).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_owner_per_client_id_across_nodes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cluster = Cluster::new("cluster-twin");
    let _n1 = cluster.leader(1);
    let n2 = cluster.node(2);
    let n3 = cluster.node(3);
    // CONNECT, MQTT 3.1.1, clean session, keep alive 60, client id "twin".
    let connect: Vec<u8> = {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 4];
        body.extend_from_slice(b"twin");
        let mut p = vec![0x10, body.len() as u8];
        p.extend(body);
        p
    };
    async fn open(port: u16, connect: &[u8]) -> Option<tokio::net::TcpStream> {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(connect).await.ok()?;
        let mut ack = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut ack))
            .await
            .ok()?
            .ok()?;
        (ack[0] == 0x20 && ack[3] == 0).then_some(s)
    }
    /// Whether the connection answers a PINGREQ (false: closed).
    async fn alive(s: &mut tokio::net::TcpStream) -> bool {
        if s.write_all(&[0xC0, 0]).await.is_err() {
            return false;
        }
        let mut resp = [0u8; 2];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut resp)).await,
            Ok(Ok(_)) if resp == [0xD0, 0]
        )
    }
    /// Whether the peer closed `s` (EOF or error) within `within`.
    async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(within, s.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
    let rounds = 1000;
    for round in 0..rounds {
        let (a, b) = tokio::join!(open(n2.port, &connect), open(n3.port, &connect));
        let mut open_ones: Vec<_> = [a, b].into_iter().flatten().collect();
        assert!(
            !open_ones.is_empty(),
            "round {round}: neither connection was accepted"
        );
        // The one taken over is closed by the leader: wait until one is left.
        let deadline = Instant::now() + Duration::from_secs(10);
        while open_ones.len() > 1 {
            assert!(
                Instant::now() < deadline,
                "round {round}: two live connections for one client id"
            );
            let mut still = Vec::new();
            for mut s in open_ones {
                if !closed_within(&mut s, Duration::from_millis(20)).await {
                    still.push(s);
                }
            }
            open_ones = still;
        }
        assert_eq!(open_ones.len(), 1, "round {round}: no connection survived");
        assert!(
            alive(&mut open_ones[0]).await,
            "round {round}: the survivor does not answer"
        );
    }
    eprintln!("one owner per client id: {rounds} rounds of two simultaneous connections, one owner each time");
}

/// A shared subscription's member on a node that is killed: the messages
/// it held go to the other member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_member_lost_with_its_node_hands_its_messages_on() {
    let cluster = Cluster::new("cluster-share");
    let _n1 = cluster.leader(1);
    let n2 = cluster.node(2);
    let n3 = cluster.node(3);
    // A never acknowledges what it gets.
    let (mut a, _) = common::Mqtt::connect_with(n2.port, "member-a", true, true).await;
    a.subscribe("$share/g/jobs", QoS::AtLeastOnce).await;
    let (mut b, _) = common::Mqtt::connect(n3.port, "member-b", true).await;
    b.subscribe("$share/g/jobs", QoS::AtLeastOnce).await;
    let acked = publish_all("jobs-pub", &[n3.port], "jobs", 40, |_| {}).await;
    // A got some of them: wait for one, then lose A's node.
    assert!(
        a.next_publish(Duration::from_secs(10)).await.is_some(),
        "A got nothing"
    );
    n2.kill9();
    let mut r = Receipts::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !r.has_all(&acked).is_empty() {
        match b.next_publish(deadline - tokio::time::Instant::now()).await {
            Some(p) => r.got.push(
                std::str::from_utf8(&p.payload)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(u32::MAX),
            ),
            None => break,
        }
    }
    let (received, dups, _) = r.figures();
    eprintln!(
        "shared member lost: acknowledged {}, received by the other member {received}, duplicates {dups}",
        acked.len()
    );
    let missing = r.has_all(&acked);
    assert!(missing.is_empty(), "never reached member B: {missing:?}");
    drop(n3);
}

/// A subscriber hopping to another node every 50 ms while 10,000 messages
/// are published: all of them, in order (resends of the unacknowledged
/// tail aside).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hopping_between_nodes_every_50_ms() {
    let cluster = Cluster::new("cluster-hop");
    let n1 = cluster.leader(1);
    let n2 = cluster.node(2);
    let n3 = cluster.node(3);
    let ports = [n1.port, n2.port, n3.port];
    let mut sub = Client::connect("hopper", &ports).await;
    sub.mqtt
        .as_mut()
        .expect("connected")
        .subscribe("hop/t", QoS::AtLeastOnce)
        .await;
    let count = 10_000;
    let publisher =
        tokio::spawn(
            async move { publish_all("hop-pub", &[ports[1]], "hop/t", count, |_| {}).await },
        );
    let mut r = Receipts::default();
    let mut hops = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    let want: Vec<u32> = (0..count).collect();
    while !r.has_all(&want).is_empty() && tokio::time::Instant::now() < deadline {
        let hop_at = tokio::time::Instant::now() + Duration::from_millis(50);
        let m = sub.mqtt.as_mut().expect("connected");
        loop {
            match tokio::time::timeout_at(hop_at, m.events.recv()).await {
                Ok(Some(Event::Incoming(Incoming::Publish(p)))) => record(m, p, &mut r).await,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        hops += 1;
        // Abruptly: the next node takes the session over.
        let next = ports[hops % 3];
        sub.reconnect(&[next]).await;
    }
    let acked = publisher.await.expect("publisher");
    let (received, dups, reordered) = r.figures();
    eprintln!(
        "hopping every 50 ms ({hops} hops): acknowledged {}, received {received}, duplicates {dups}, reorderings {reordered}",
        acked.len()
    );
    report("hopping client", &acked, &r);
}
