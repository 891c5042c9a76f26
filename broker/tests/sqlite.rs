//! The binary on its default SQLite store: what `cargo run` gives, and clear
//! errors for files and directories it cannot use.

mod common;

use std::time::Duration;

use common::{run_failing, BrokerProcess, Mqtt};
use rumqttc::{Event, Incoming, QoS};

#[tokio::test]
async fn default_storage_is_a_durable_sqlite_file_in_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let (mut c, _) = Mqtt::connect(broker.port, "first-run", true).await;
    c.client
        .publish("config/mode", QoS::AtLeastOnce, true, "eco")
        .await
        .expect("publish");
    while !matches!(
        c.events.recv().await,
        Some(Event::Incoming(Incoming::PubAck(_))) | None
    ) {}
    c.disconnect().await;
    assert!(broker.terminate().success(), "clean exit on SIGTERM");
    assert!(
        dir.path().join("data/broker.db").is_file(),
        "the default store is data/broker.db under the working directory"
    );

    // A second run in the same directory finds the retained message.
    let broker = BrokerProcess::start(dir.path(), &[]);
    let (mut c, _) = Mqtt::connect(broker.port, "second-run", true).await;
    c.subscribe("config/#", QoS::AtLeastOnce).await;
    let p = c
        .next_publish(Duration::from_secs(10))
        .await
        .expect("retained message kept across runs");
    assert_eq!(&p.payload[..], b"eco");
}

#[test]
fn a_second_broker_on_the_same_database_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = BrokerProcess::start(dir.path(), &["--storage", "sqlite://shared.db"]);
    let err = run_failing(dir.path(), &["--storage", "sqlite://shared.db"]);
    assert!(
        err.contains("shared.db") && err.contains("locked by another process"),
        "{err}"
    );
    drop(first);
}

#[test]
fn files_and_directories_it_cannot_use_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("photo.jpg"),
        [0xFFu8, 0xD8, 0xFF, 0xE0].repeat(500),
    )
    .expect("write");
    let err = run_failing(dir.path(), &["--storage", "sqlite://photo.jpg"]);
    assert!(err.contains("photo.jpg is not a SQLite database"), "{err}");

    // Permissions do not stop root: use a directory no one may write.
    let err = run_failing(dir.path(), &["--storage", "sqlite:///proc/broker.db"]);
    assert!(
        err.contains("cannot open database /proc/broker.db"),
        "{err}"
    );
    let err = run_failing(dir.path(), &["--storage", "sqlite:///proc/none/broker.db"]);
    assert!(err.contains("cannot create directory /proc/none"), "{err}");
}

/// Publish 64 KiB QoS 1 messages one at a time until the broker stops
/// acknowledging (it closes the connection); returns how many were acknowledged.
async fn fill(port: u16, id: &str, limit: usize) -> usize {
    let (mut c, _) = Mqtt::connect(port, id, true).await;
    let payload = vec![b'x'; 64 * 1024];
    for acked in 0..limit {
        c.client
            .publish("big/data", QoS::AtLeastOnce, false, payload.clone())
            .await
            .expect("queued");
        loop {
            match tokio::time::timeout(Duration::from_secs(10), c.events.recv()).await {
                Ok(Some(Event::Incoming(Incoming::PubAck(_)))) => break,
                Ok(Some(_)) => {}
                Ok(None) => return acked,
                Err(_) => panic!("neither PUBACK nor close within 10 s"),
            }
        }
    }
    limit
}

#[tokio::test]
async fn a_full_disk_refuses_publishes_and_the_broker_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut broker = BrokerProcess::start(
        dir.path(),
        &["--storage", "sqlite://small.db?max_size_mb=1"],
    );
    let port = broker.port;
    let (mut keeper, _) = Mqtt::connect(port, "keeper", false).await;
    keeper.subscribe("big/#", QoS::AtLeastOnce).await;
    keeper.disconnect().await;

    let acked = fill(port, "filler", 200).await;
    assert!(
        (1..200).contains(&acked),
        "expected the 1 MiB database to fill up, {acked} messages acknowledged"
    );
    broker
        .wait_for_line("storage write failed", Duration::from_secs(10))
        .expect("the failure is logged");

    // Everyone else is still served.
    let (mut other, _) = Mqtt::connect(port, "bystander", true).await;
    other.subscribe("chat/#", QoS::AtMostOnce).await;
    other
        .client
        .publish("chat/1", QoS::AtMostOnce, false, "still here")
        .await
        .expect("publish");
    let p = other
        .next_publish(Duration::from_secs(10))
        .await
        .expect("QoS 0 round trip while the store is full");
    assert_eq!(&p.payload[..], b"still here");

    // Nothing acknowledged was lost, and draining makes room again.
    let (mut keeper, present) = Mqtt::connect(port, "keeper", false).await;
    assert!(present);
    let mut got = 0;
    while keeper.next_publish(Duration::from_secs(2)).await.is_some() {
        got += 1;
    }
    assert!(got >= acked, "acknowledged {acked}, delivered {got}");
    keeper.disconnect().await;
    assert!(
        fill(port, "filler-again", 3).await == 3,
        "publishes are acknowledged again once there is room"
    );
}
