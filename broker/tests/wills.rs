//! Wills through `kill -9`: a will is stored at CONNECT, so a broker killed
//! while its client is connected publishes it at the next start, exactly
//! once; a will the client deleted (normal DISCONNECT) never comes back.
//! On every durable backend.

mod common;

use std::time::Duration;

use common::{BrokerProcess, Mqtt};
use rumqttc::{Event, Incoming, QoS};

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
    let (client, mut eventloop) = rumqttc::AsyncClient::new(o, 100);
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if tx.send(event).is_err() {
                break;
            }
        }
    });
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
            Ok(Some(Event::Incoming(Incoming::ConnAck(a)))) => {
                assert_eq!(a.code, rumqttc::ConnectReturnCode::Success, "{id}");
                return Mqtt { client, events };
            }
            Ok(Some(_)) => {}
            other => panic!("{id}: no CONNACK ({other:?})"),
        }
    }
}

/// Every will `watcher` receives until 3 s pass without one (payloads, sorted).
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
