//! The database going away while the broker runs, on the real binary: the
//! server is stopped and started again. Publishes that need the store are
//! not acknowledged while it is down, clients that do not need it keep being
//! served, the broker resumes by itself once it is back, and nothing that
//! was acknowledged is lost.

mod common;

use std::time::{Duration, Instant};

use common::{BrokerProcess, DbKind, DbServer, Mqtt};
use rumqttc::{Event, Incoming, QoS};

/// Publish one QoS 1 message on a fresh connection; true if PUBACK came.
async fn publish_acked(port: u16, id: &str, payload: String) -> bool {
    // A clean session needs no store: connecting works during the outage too.
    let (mut c, _) = Mqtt::connect(port, id, true).await;
    if c.client
        .publish("outage/data", QoS::AtLeastOnce, false, payload)
        .await
        .is_err()
    {
        return false;
    }
    let acked = tokio::time::timeout(Duration::from_secs(8), async {
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
    c.disconnect().await;
    acked
}

async fn outage(kind: DbKind, url: impl Fn(u16) -> String) {
    let mut db = DbServer::start(kind);
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = url(db.port);
    let mut broker = BrokerProcess::start(dir.path(), &["--storage", &storage]);
    let port = broker.port;

    let (mut keeper, _) = Mqtt::connect(port, "keeper", false).await;
    keeper.subscribe("outage/#", QoS::AtLeastOnce).await;
    keeper.disconnect().await;
    let mut acked = Vec::new();
    for n in 0..5 {
        assert!(
            publish_acked(port, "pub", format!("{n}")).await,
            "before the outage"
        );
        acked.push(n);
    }

    db.stop();
    // A publish the store must keep is not acknowledged while it is down.
    assert!(
        !publish_acked(port, "pub", "lost-1".into()).await,
        "a publish was acknowledged while the store was down"
    );
    broker
        .wait_for_line("storage write failed", Duration::from_secs(15))
        .expect("the failure is logged");
    // Clients that need no store are still served: QoS 0 and 1 between clean sessions.
    let (mut sub, _) = Mqtt::connect(port, "bystander-sub", true).await;
    sub.subscribe("chat/#", QoS::AtLeastOnce).await;
    let (pub_, _) = Mqtt::connect(port, "bystander-pub", true).await;
    pub_.client
        .publish("chat/1", QoS::AtLeastOnce, false, "still served")
        .await
        .expect("publish");
    let p = sub
        .next_publish(Duration::from_secs(10))
        .await
        .expect("clean sessions are served while the store is down");
    assert_eq!(&p.payload[..], b"still served");

    db.restart();
    // The broker resumes by itself: publishes are acknowledged again.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 5;
    while !publish_acked(port, "pub", format!("{n}")).await {
        assert!(
            Instant::now() < deadline,
            "publishes not acknowledged 30 s after the store came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    acked.push(n);
    n += 1;
    assert!(publish_acked(port, "pub", format!("{n}")).await);
    acked.push(n);

    // Everything acknowledged reaches the persistent subscriber, in order.
    let (mut keeper, present) = Mqtt::connect(port, "keeper", false).await;
    assert!(present, "the session survived the outage");
    let mut got = Vec::new();
    while let Some(p) = keeper.next_publish(Duration::from_secs(2)).await {
        got.push(String::from_utf8_lossy(&p.payload).into_owned());
    }
    let want: Vec<String> = acked.iter().map(|n| n.to_string()).collect();
    assert_eq!(got, want, "acknowledged messages lost or reordered");
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_going_away_loses_nothing_acknowledged() {
    outage(DbKind::Redis, |port| {
        format!("redis://127.0.0.1:{port}/0?timeout_ms=2000&connect_timeout_ms=1000")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_going_away_loses_nothing_acknowledged() {
    outage(DbKind::Mongo, |port| {
        format!(
            "mongodb://127.0.0.1:{port}/outage?directConnection=true\
             &serverSelectionTimeoutMS=2000&connectTimeoutMS=1000"
        )
    })
    .await;
}
