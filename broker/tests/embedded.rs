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
