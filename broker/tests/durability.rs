//! The durability promise, proven on the real binary with SQLite: `kill -9`
//! while publishers are publishing, restart, and every message whose PUBACK
//! or PUBCOMP a publisher received reaches every persistent subscriber
//! (offline ones, and one online that had messages in flight), in publish
//! order, with no gap; subscriptions and retained messages too. And wills:
//! stored at CONNECT, a broker killed while its client is connected
//! publishes the will at the next start, exactly once; a will the client
//! deleted (normal DISCONNECT) never comes back. On every durable backend.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{BrokerProcess, Mqtt};
use rand::Rng;
use rumqttc::{Event, Incoming, QoS};

const SUBSCRIBERS: usize = 20;
/// Publishers 0 and 1 publish at QoS 1, 2 and 3 at QoS 2.
const PUBLISHERS: usize = 4;

fn publisher_qos(j: usize) -> QoS {
    if j < 2 {
        QoS::AtLeastOnce
    } else {
        QoS::ExactlyOnce
    }
}

/// A publisher's counts: messages handed to the client, and acknowledged
/// (PUBACK for QoS 1, PUBCOMP for QoS 2). The broker acknowledges in
/// publish order, so the acknowledged ones are exactly 0..acked.
#[derive(Default)]
struct Counts {
    published: AtomicU64,
    acked: AtomicU64,
}

/// Publish `j:0`, `j:1`, ... (at most `limit`) on `load/j` until the
/// connection dies.
async fn publish_until_killed(port: u16, j: usize, counts: Arc<Counts>, limit: u64) {
    let (mut mqtt, _) = Mqtt::connect(port, &format!("pub-{j}"), false).await;
    let client = mqtt.client.clone();
    let publishing = tokio::spawn({
        let counts = counts.clone();
        async move {
            for n in 0..limit {
                let payload = format!("{j}:{n}");
                if client
                    .publish(format!("load/{j}"), publisher_qos(j), false, payload)
                    .await
                    .is_err()
                {
                    break;
                }
                counts.published.store(n + 1, Ordering::SeqCst);
            }
        }
    });
    while let Some(event) = mqtt.events.recv().await {
        match event {
            Event::Incoming(Incoming::PubAck(_)) | Event::Incoming(Incoming::PubComp(_)) => {
                counts.acked.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        }
    }
    // The connection is gone: stop handing messages to the client.
    drop(mqtt);
    publishing.abort();
}

/// Everything a persistent subscriber gets after the restart, per publisher.
async fn drain(port: u16, i: usize) -> Vec<Vec<u64>> {
    let id = format!("sub-{i}");
    let (mut mqtt, present) = Mqtt::connect(port, &id, false).await;
    assert!(present, "{id}: session lost in the crash");
    let mut got = vec![Vec::new(); PUBLISHERS];
    // Quiet for 1 s means the backlog is drained.
    while let Some(p) = mqtt.next_publish(Duration::from_secs(1)).await {
        if p.topic == "after/restart" {
            continue;
        }
        let text = String::from_utf8_lossy(&p.payload).into_owned();
        let (j, n) = text
            .split_once(':')
            .and_then(|(j, n)| Some((j.parse::<usize>().ok()?, n.parse::<u64>().ok()?)))
            .unwrap_or_else(|| panic!("{id}: unexpected payload {text:?}"));
        got[j].push(n);
    }
    mqtt.disconnect().await;
    got
}

/// One round on the store at `url`: set up, publish, kill at `kill_after`,
/// restart on the same store, check.
/// Start the broker on `url` in `dir`: alone, or as the one node of a
/// cluster (`[cluster]`), which serves once it leads.
fn start(dir: &std::path::Path, url: &str, cluster: bool, within: Duration) -> BrokerProcess {
    if !cluster {
        return BrokerProcess::start_within(dir, &["--storage", url], within);
    }
    let config = dir.join("node.toml");
    std::fs::write(
        &config,
        format!("storage = \"{url}\"\n[cluster]\nnode_id = \"only\"\n"),
    )
    .expect("config written");
    let mut p =
        BrokerProcess::start_within(dir, &["--config", config.to_str().expect("utf-8")], within);
    p.wait_for_line("advertised as the cluster's leader", within)
        .unwrap_or_else(|seen| panic!("the node did not lead: {seen:?}"));
    p
}

async fn round(url: &str, kill_after: Duration, pace: &Pace) {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = start(dir.path(), url, pace.cluster, Duration::from_secs(30));
    let port = broker.port;

    for i in 0..SUBSCRIBERS {
        let (mut s, _) = Mqtt::connect(port, &format!("sub-{i}"), false).await;
        s.subscribe("load/#", QoS::ExactlyOnce).await;
        s.disconnect().await;
    }
    let (setter, _) = Mqtt::connect(port, "setter", true).await;
    setter
        .client
        .publish("state/device", QoS::AtLeastOnce, true, "on")
        .await
        .expect("retained publish");
    let mut setter = setter;
    while !matches!(
        setter.events.recv().await,
        Some(Event::Incoming(Incoming::PubAck(_))) | None
    ) {}
    setter.disconnect().await;

    // One more persistent subscriber stays online and never acknowledges:
    // what is in flight to it when the broker dies must come back too.
    let (mut online, _) =
        Mqtt::connect_with(port, &format!("sub-{SUBSCRIBERS}"), false, true).await;
    online.subscribe("load/#", QoS::ExactlyOnce).await;

    let counts: Vec<Arc<Counts>> = (0..PUBLISHERS).map(|_| Arc::default()).collect();
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|j| {
            let counts = counts[j].clone();
            tokio::spawn(publish_until_killed(port, j, counts, pace.limit))
        })
        .collect();
    tokio::time::sleep(kill_after).await;
    let acked_before_kill: Vec<u64> = counts
        .iter()
        .map(|c| c.acked.load(Ordering::SeqCst))
        .collect();
    broker.kill9();
    drop(online);
    for p in publishers {
        tokio::time::timeout(Duration::from_secs(20), p)
            .await
            .expect("publishers notice the crash")
            .expect("publisher task");
    }
    let acked: Vec<u64> = counts
        .iter()
        .map(|c| c.acked.load(Ordering::SeqCst))
        .collect();
    let published: Vec<u64> = counts
        .iter()
        .map(|c| c.published.load(Ordering::SeqCst))
        .collect();
    assert!(
        acked_before_kill.iter().sum::<u64>() > 0,
        "killed before any acknowledgement: the round would prove nothing"
    );

    // The restart takes the dead broker's store lease. On MongoDB a batch
    // transaction the kill left open holds the lease document until the
    // server aborts it (transactionLifetimeLimitSeconds, 60 s).
    let broker = start(dir.path(), url, pace.cluster, pace.restart_within);
    let port = broker.port;
    let mut drains = Vec::new();
    for i in 0..=SUBSCRIBERS {
        let task = tokio::spawn(drain(port, i));
        if !pace.concurrent_drains {
            let got = task.await.expect("drain task");
            drains.push(tokio::spawn(async move { got }));
        } else {
            drains.push(task);
        }
    }
    for (i, d) in drains.into_iter().enumerate() {
        let got = d.await.expect("drain task");
        for j in 0..PUBLISHERS {
            let n = got[j].len() as u64;
            assert_eq!(
                got[j],
                (0..n).collect::<Vec<_>>(),
                "sub-{i} from pub-{j}: out of order, duplicated or with a gap \
                 (acked {}, published {})",
                acked[j],
                published[j]
            );
            assert!(
                n >= acked[j],
                "sub-{i} lost acknowledged messages of pub-{j}: got {n}, acked {}",
                acked[j]
            );
            assert!(n <= published[j], "sub-{i} got more than pub-{j} published");
        }
    }

    // Subscriptions survived: a new message reaches every subscriber.
    let (live, _) = Mqtt::connect(port, "live", true).await;
    let mut subs = Vec::new();
    for i in 0..SUBSCRIBERS {
        subs.push(Mqtt::connect(port, &format!("sub-{i}"), false).await.0);
    }
    live.client
        .publish("load/after", QoS::AtLeastOnce, false, "0:999999")
        .await
        .expect("publish after restart");
    for (i, s) in subs.iter_mut().enumerate() {
        let Some(p) = s.next_publish(pace.patience).await else {
            let log = broker.log();
            panic!("sub-{i} lost its subscription in the crash; broker log: {log:#?}");
        };
        assert_eq!(&p.payload[..], b"0:999999", "sub-{i}");
    }
    // The retained message survived.
    let (mut fresh, _) = Mqtt::connect(port, "fresh", true).await;
    fresh.subscribe("state/#", QoS::AtLeastOnce).await;
    let r = fresh
        .next_publish(pace.patience)
        .await
        .expect("retained message lost in the crash");
    assert!(r.retain);
    assert_eq!(&r.payload[..], b"on");
    drop(broker);
    eprintln!(
        "killed after {kill_after:?}: acked {acked:?} of published {published:?}, all delivered in order"
    );
}

/// How a store is exercised: kill windows (ms after publishing starts), and
/// how long a delivery may take after the restart, while the store is still
/// working through the acknowledgements of the drained backlog.
struct Pace {
    windows: &'static [(u64, u64)],
    patience: Duration,
    /// Messages per publisher at most, so that a slow store's backlog stays
    /// drainable within the patience.
    limit: u64,
    /// Subscribers reconnect and drain all at once, or one after another
    /// (for a store that cannot take 21 session writes at once).
    concurrent_drains: bool,
    /// How long the restarted broker may take to listen.
    restart_within: Duration,
    /// The broker is the one node of a cluster (`[cluster]`).
    cluster: bool,
}

/// For stores that commit thousands of messages a second.
const FAST: Pace = Pace {
    windows: &[(150, 400), (400, 900), (900, 1500)],
    patience: Duration::from_secs(10),
    limit: u64::MAX,
    concurrent_drains: true,
    restart_within: Duration::from_secs(30),
    cluster: false,
};

/// One round per window, each on a fresh store from `store`, killed at a
/// random point in its window (early, in the middle, late in the publishing).
async fn rounds(pace: Pace, store: impl Fn(usize) -> String) {
    let mut rng = rand::rng();
    for (i, &(from, to)) in pace.windows.iter().enumerate() {
        let kill_after = Duration::from_millis(rng.random_range(from..to));
        round(&store(i), kill_after, &pace).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_on_sqlite_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    rounds(FAST, |i| {
        format!(
            "sqlite://{}",
            dir.path().join(format!("round-{i}.db")).display()
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_on_redis_loses_no_acknowledged_message() {
    // The Redis of scripts/test runs with appendonly yes; the broker is what dies here.
    let run = common::unique("kill9");
    // A short lease: the restart after kill -9 waits for the dead broker's to expire.
    rounds(FAST, |i| {
        common::with_param(&common::redis_url(&format!("{run}-{i}")), "lease_ms=2000")
    })
    .await;
}

/// The same promise from a one-node cluster (`[cluster]`) on a Redis that
/// fsyncs every write, as a cluster requires: after `kill -9` the node
/// comes back as a gateway, takes the lead once its lease expires, and
/// serves every session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_on_a_one_node_cluster_loses_no_acknowledged_message() {
    let redis = common::DbServer::start_with(common::DbKind::Redis, &["--appendfsync", "always"]);
    let run = common::unique("kill9-cluster");
    let pace = Pace {
        cluster: true,
        ..FAST
    };
    rounds(pace, |i| {
        format!(
            "redis://127.0.0.1:{}/?prefix={run}-{i}:&lease_ms=2000",
            redis.port
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_on_mongodb_loses_no_acknowledged_message() {
    // The test server commits far fewer transactions a second than SQLite or
    // Redis: later windows, so that every publisher has acknowledgements.
    let run = common::unique("kill9").replace('-', "_");
    // Each round's restart waits out the killed broker's open transaction
    // (the test server's 60 s lifetime): the suite kills in the middle
    // window only; `DURABILITY_MONGO_ROUNDS=3` (scripts/soak) runs all three.
    let all = std::env::var("DURABILITY_MONGO_ROUNDS").is_ok_and(|v| v == "3");
    let pace = Pace {
        windows: if all {
            &[(800, 1500), (1500, 2500), (2500, 3500)]
        } else {
            &[(1500, 2500)]
        },
        patience: Duration::from_secs(60),
        limit: 300,
        concurrent_drains: false,
        restart_within: Duration::from_secs(150),
        cluster: false,
    };
    rounds(pace, |i| {
        // Batches of a thousand acknowledgements take the test server seconds.
        let url = common::with_param(
            &common::mongodb_url(&format!("{run}_{i}")),
            // Past the server's 60 s transaction lifetime: the restart's lease
            // takeover waits for the killed broker's open transaction to end.
            "timeoutMS=90000",
        );
        common::with_param(&url, "lease_ms=2000")
    })
    .await;
}

// Wills through kill -9.

/// Connect `id` (3.1.1) with a QoS 1 will on `wills/{id}`, payload `id`.
async fn connect_with_will(port: u16, id: &str, clean: bool) -> Mqtt {
    let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    o.set_clean_session(clean)
        .set_keep_alive(Duration::from_secs(60))
        .set_last_will(rumqttc::LastWill::new(
            format!("wills/{id}"),
            id.to_owned(),
            QoS::AtLeastOnce,
            false,
        ));
    Mqtt::connect_options(o).await.0
}

/// Every will the watcher receives until 3 s pass without one (payloads, sorted).
async fn wills_received(port: u16) -> Vec<String> {
    let (mut m, present) = Mqtt::connect(port, "will-watcher", false).await;
    assert!(present, "the watcher's session survived");
    let mut got = Vec::new();
    while let Some(p) = m.next_publish(Duration::from_secs(3)).await {
        got.push(String::from_utf8_lossy(&p.payload).into_owned());
    }
    m.disconnect().await;
    got.sort();
    got
}

/// The scenario on the store at `url`: `lost-clean` and `lost-persistent`
/// are connected when the broker is killed; `left` disconnected normally
/// before. After the restart the watcher gets each lost client's will
/// once; after a second (orderly) restart, nothing more.
async fn wills_through_kill_9(url: &str, restart_within: Duration) {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = ["--storage", url];
    let broker = BrokerProcess::start(dir.path(), &args);
    let port = broker.port;
    let (mut watcher, _) = Mqtt::connect(port, "will-watcher", false).await;
    watcher.subscribe("wills/#", QoS::AtLeastOnce).await;
    watcher.disconnect().await;

    let left = connect_with_will(port, "left", true).await;
    left.disconnect().await;
    let _clean = connect_with_will(port, "lost-clean", true).await;
    let _persistent = connect_with_will(port, "lost-persistent", false).await;
    broker.kill9();

    let broker = BrokerProcess::start_within(dir.path(), &args, restart_within);
    let got = wills_received(broker.port).await;
    eprintln!("{url}: wills after kill -9: {got:?}");
    assert_eq!(
        got,
        ["lost-clean", "lost-persistent"],
        "each will of a connection lost with the broker, once; never the deleted one"
    );
    let status = broker.terminate();
    assert!(status.success(), "orderly stop: {status:?}");

    let broker = BrokerProcess::start_within(dir.path(), &args, restart_within);
    let again = wills_received(broker.port).await;
    assert!(again.is_empty(), "wills published a second time: {again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wills_survive_kill_9_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("wills.db").display());
    wills_through_kill_9(&url, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wills_survive_kill_9_on_redis() {
    let url = common::with_param(
        &common::redis_url(&common::unique("wills")),
        "lease_ms=2000",
    );
    wills_through_kill_9(&url, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wills_survive_kill_9_on_mongodb() {
    let db = common::unique("wills").replace('-', "_");
    let url = common::with_param(&common::mongodb_url(&db), "lease_ms=2000");
    // The killed broker's transaction, if one was open, ends with the test
    // server's 60 s lifetime before the restart can take the lease.
    wills_through_kill_9(&url, Duration::from_secs(150)).await;
}
