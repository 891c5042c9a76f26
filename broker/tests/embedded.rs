//! The embedding API on the real default store: an in-process persistent
//! subscriber on a SQLite file receives its offline backlog in order across
//! a broker restart, and what it did not acknowledge comes back.

use broker::storage_url;
use broker_core::client::ClientOptions;
use broker_core::message::{Message, QoS};
use broker_core::Broker;

/// Shut down and wait until the broker's tasks have let go of the SQLite
/// file (its lock), so that the next broker can open it.
async fn stop(broker: Broker) {
    broker.shutdown().await;
    let state = broker_core::internals::weak_state(&broker);
    drop(broker);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while state.strong_count() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stopped broker still holds its store"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

async fn start(url: &str) -> Broker {
    // The stopped broker's group-commit task lets go of the file a moment
    // after the broker itself.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let storage = loop {
        match storage_url::open(url).await {
            Ok(s) => break s,
            Err(e)
                if tokio::time::Instant::now() < deadline
                    && format!("{e:#}").contains("locked") =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => panic!("SQLite opens: {e:#}"),
        }
    };
    Broker::builder()
        .storage(storage)
        .start()
        .await
        .expect("broker starts")
}

#[tokio::test]
async fn in_process_persistent_subscriber_gets_its_backlog_in_order_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("broker.db").display());

    let broker = start(&url).await;
    let mut device = broker
        .connect(ClientOptions::persistent("device-7").max_inflight(4))
        .await
        .expect("attach");
    assert!(!device.session_present());
    device
        .subscribe("devices/7/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    device.disconnect().await;
    for i in 0..200 {
        let qos = if i % 2 == 0 {
            QoS::AtLeastOnce
        } else {
            QoS::ExactlyOnce
        };
        broker
            .publish(Message::new("devices/7/cmd", i.to_string(), qos, false))
            .await
            .expect("durable publish");
    }
    // The first 50 are received and acknowledged before the restart; the
    // next is received and not acknowledged.
    let mut device = broker
        .connect(ClientOptions::persistent("device-7").max_inflight(4))
        .await
        .expect("resume");
    assert!(device.session_present());
    for i in 0..50 {
        let m = device.recv().await.expect("delivery");
        assert_eq!(String::from_utf8_lossy(&m.message().payload), i.to_string());
        device.ack(&m);
    }
    let unacked = device.recv().await.expect("delivery");
    assert_eq!(&unacked.message().payload[..], b"50");
    drop(device);
    stop(broker).await;

    let broker = start(&url).await;
    let mut device = broker
        .connect(ClientOptions::persistent("device-7"))
        .await
        .expect("resume after restart");
    assert!(device.session_present());
    for i in 50..200 {
        let m = tokio::time::timeout(std::time::Duration::from_secs(10), device.recv())
            .await
            .expect("bounded")
            .expect("delivery");
        assert_eq!(
            String::from_utf8_lossy(&m.message().payload),
            i.to_string(),
            "in order, nothing lost, nothing twice"
        );
        if i == 50 {
            assert!(m.dup(), "sent before the restart: DUP");
        }
        device.ack(&m);
    }
    assert_eq!(broker.session("device-7").expect("session").queued, 0);
    broker.shutdown().await;
}

#[tokio::test]
async fn relayed_qos2_ids_and_delivery_packet_ids_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("broker.db").display());

    let broker = start(&url).await;
    let mut relay = broker
        .connect(ClientOptions::persistent("relay"))
        .await
        .expect("attach");
    relay
        .subscribe("out/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let mut sink = broker
        .connect(ClientOptions::persistent("sink"))
        .await
        .expect("attach");
    sink.subscribe("in/#", QoS::ExactlyOnce)
        .await
        .expect("subscribe");
    let m = || Message::new("in/1", "once", QoS::ExactlyOnce, false);
    assert!(relay.publish_exactly_once(7, m()).await.expect("new"));
    assert!(
        !relay.publish_exactly_once(7, m()).await.expect("resend"),
        "an id still held is a resend"
    );
    assert_eq!(relay.held_packet_ids(), [7]);
    broker
        .publish(Message::new("out/1", "x", QoS::AtLeastOnce, false))
        .await
        .expect("durable");
    let first = relay.recv().await.expect("delivery");
    let id = first.packet_id().expect("a QoS 1 delivery has a packet id");
    drop(relay);
    drop(sink);
    stop(broker).await;

    let broker = start(&url).await;
    let mut relay = broker
        .connect(ClientOptions::persistent("relay"))
        .await
        .expect("resume");
    assert_eq!(relay.held_packet_ids(), [7], "held ids are stored");
    assert!(
        !relay.publish_exactly_once(7, m()).await.expect("resend"),
        "a resend after the restart is not routed again"
    );
    let again = relay.recv().await.expect("redelivery");
    assert!(again.dup());
    assert_eq!(
        again.packet_id(),
        Some(id),
        "the same packet id after a restart"
    );
    relay.ack(&again);
    assert!(relay.release(7).await.expect("release"));
    assert!(!relay.release(7).await.expect("release"), "released once");
    assert!(relay.held_packet_ids().is_empty());
    let mut sink = broker
        .connect(ClientOptions::persistent("sink"))
        .await
        .expect("resume");
    let got = sink.recv().await.expect("delivery");
    assert_eq!(&got.message().payload[..], b"once");
    sink.ack(&got);
    let more = tokio::time::timeout(std::time::Duration::from_millis(300), sink.recv()).await;
    assert!(more.is_err(), "delivered once");
    broker.shutdown().await;
}

/// Publish `n` QoS 1 messages `0..n` on `topic`, each durable before the next.
async fn publish_numbered(broker: &Broker, topic: &str, range: std::ops::Range<usize>) {
    for i in range {
        broker
            .publish(Message::new(topic, i.to_string(), QoS::AtLeastOnce, false))
            .await
            .expect("durable publish");
    }
}

#[tokio::test]
async fn a_restart_leaves_queues_in_the_store_until_their_clients_return() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("broker.db").display());
    let broker = start(&url).await;
    for (id, filter) in [("dev-a", "dev/a/#"), ("dev-b", "dev/b/#")] {
        let mut c = broker
            .connect(ClientOptions::persistent(id))
            .await
            .expect("attach");
        c.subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        c.disconnect().await;
    }
    publish_numbered(&broker, "dev/a/cmd", 0..2500).await;
    publish_numbered(&broker, "dev/b/cmd", 0..10).await;
    stop(broker).await;

    let broker = start(&url).await;
    let a = broker.session("dev-a").expect("restored");
    assert_eq!(
        (a.queued, a.queued_in_store, a.queued_bytes),
        (2500, 2500, 0),
        "restored with its queue's length only: nothing read, nothing held"
    );
    assert_eq!(broker.metrics().queued_in_store, 2510);
    // Published after the start: queued behind what is in the store.
    publish_numbered(&broker, "dev/a/cmd", 2500..2505).await;
    assert_eq!(broker.session("dev-a").expect("session").queued, 2505);

    let mut device = broker
        .connect(ClientOptions::persistent("dev-a").max_inflight(10))
        .await
        .expect("resume");
    assert!(device.session_present());
    for i in 0..2505 {
        let m = tokio::time::timeout(std::time::Duration::from_secs(10), device.recv())
            .await
            .expect("bounded")
            .expect("delivery");
        assert_eq!(
            String::from_utf8_lossy(&m.message().payload),
            i.to_string(),
            "in order across pages and into what came after the start"
        );
        device.ack(&m);
        if i == 100 {
            let s = broker.session("dev-a").expect("session");
            assert!(
                s.queued_in_store >= 500 && s.queued - s.queued_in_store <= 1600,
                "read page by page as the client drains, not whole: {} queued, {} in the store",
                s.queued,
                s.queued_in_store
            );
        }
    }
    let a = broker.session("dev-a").expect("session");
    assert_eq!((a.queued, a.queued_in_store), (0, 0));
    let b = broker.session("dev-b").expect("session");
    assert_eq!(
        (b.queued, b.queued_in_store),
        (10, 10),
        "an offline session's queue stays in the store"
    );
    let more = tokio::time::timeout(std::time::Duration::from_millis(200), device.recv()).await;
    assert!(more.is_err(), "nothing twice");
    drop(device);
    stop(broker).await;

    // What was acknowledged is gone from the store; the rest is still there.
    let broker = start(&url).await;
    assert_eq!(broker.session("dev-a").expect("session").queued, 0);
    assert_eq!(broker.session("dev-b").expect("session").queued, 10);
    broker.shutdown().await;
}

#[tokio::test]
async fn a_discarded_shared_member_hands_on_what_is_still_in_the_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("broker.db").display());
    let broker = start(&url).await;
    for id in ["worker-1", "worker-2"] {
        let mut c = broker
            .connect(ClientOptions::persistent(id))
            .await
            .expect("attach");
        c.subscribe("$share/g/jobs", QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        c.disconnect().await;
    }
    publish_numbered(&broker, "jobs", 0..20).await;
    stop(broker).await;

    let broker = start(&url).await;
    let queued = |id: &str| broker.session(id).map(|s| (s.queued, s.queued_in_store));
    assert_eq!(queued("worker-1"), Some((10, 10)), "one job in two each");
    assert_eq!(queued("worker-2"), Some((10, 10)));
    // A clean start discards worker-1's session: its jobs, still in the
    // store, go to the other member.
    let fresh = broker
        .connect(ClientOptions::persistent("worker-1").clean_start(true))
        .await
        .expect("attach");
    assert!(!fresh.session_present());
    assert_eq!(queued("worker-2").map(|(q, _)| q), Some(20));

    let mut worker = broker
        .connect(ClientOptions::persistent("worker-2"))
        .await
        .expect("resume");
    let mut got = Vec::new();
    for _ in 0..20 {
        let m = tokio::time::timeout(std::time::Duration::from_secs(10), worker.recv())
            .await
            .expect("bounded")
            .expect("delivery");
        got.push(
            String::from_utf8_lossy(&m.message().payload)
                .parse::<usize>()
                .expect("number"),
        );
        worker.ack(&m);
    }
    got.sort_unstable();
    assert_eq!(got, (0..20).collect::<Vec<_>>(), "every job once");
    broker.shutdown().await;
}
