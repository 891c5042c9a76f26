//! MQTT 3.1 / 3.1.1 protocol behaviour, driven with raw packets.

mod common;

use std::time::Duration;

use broker_core::config::BrokerConfig;
use broker_core::internals::codec::v3;
use common::*;

fn quick() -> BrokerConfig {
    BrokerConfig {
        connect_timeout_secs: 1,
        ..BrokerConfig::default()
    }
}

/// A healthy client can still subscribe and receive: used after each bad input.
async fn still_serving(addr: std::net::SocketAddr) {
    let (mut sub, _) = RawClient::connect(addr, "healthy-sub", true).await;
    sub.subscribe("health", 1).await;
    let (mut publ, _) = RawClient::connect(addr, "healthy-pub", true).await;
    publ.publish("health", b"ok", 1, false).await;
    assert_eq!(payload_str(&sub.recv_and_ack().await), "ok");
}

#[tokio::test]
async fn connect_timeout_and_packet_before_connect_close_the_connection() {
    let b = start(quick()).await;
    let mut idle = RawClient::open(b.addr).await;
    idle.expect_closed().await;
    let mut early = RawClient::open(b.addr).await;
    early.send(v3::Packet::PingRequest).await;
    early.expect_closed().await;
    still_serving(b.addr).await;
}

#[tokio::test]
async fn second_connect_is_a_protocol_violation() {
    let b = start(quick()).await;
    let (mut c, _) = RawClient::connect(b.addr, "twice", true).await;
    c.send(connect_packet("twice", true, 0, None)).await;
    c.expect_closed().await;
}

#[tokio::test]
async fn empty_client_id_is_assigned_or_refused() {
    let b = start(quick()).await;
    let (_c, code, _) = RawClient::connect_full(b.addr, "", true, 0, None).await;
    assert_eq!(code, v3::ConnectAckReason::ConnectionAccepted);
    let (mut c, code, _) = RawClient::connect_full(b.addr, "", false, 0, None).await;
    assert_eq!(code, v3::ConnectAckReason::IdentifierRejected);
    c.expect_closed().await;
}

#[tokio::test]
async fn mqtt_3_1_is_accepted_and_unknown_levels_refused() {
    let b = start(quick()).await;
    // MQTT 3.1: protocol name MQIsdp, level 3.
    let mut c = RawClient::open(b.addr).await;
    let mut body = vec![0, 6];
    body.extend_from_slice(b"MQIsdp");
    body.extend_from_slice(&[3, 0x02, 0, 60, 0, 3]);
    body.extend_from_slice(b"old");
    let mut pkt = vec![0x10, body.len() as u8];
    pkt.extend(body);
    c.send_bytes(&pkt).await;
    match c.recv().await {
        v3::Packet::ConnectAck(a) => {
            assert_eq!(a.return_code, v3::ConnectAckReason::ConnectionAccepted)
        }
        other => panic!("{other:?}"),
    }
    // Level 6 does not exist: CONNACK 1 then close.
    let mut c = RawClient::open(b.addr).await;
    c.send_bytes(&[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 6, 0x02, 0, 60, 0, 0])
        .await;
    match c.recv().await {
        v3::Packet::ConnectAck(a) => {
            assert_eq!(
                a.return_code,
                v3::ConnectAckReason::UnacceptableProtocolVersion
            )
        }
        other => panic!("{other:?}"),
    }
    c.expect_closed().await;
}

#[tokio::test]
async fn malformed_input_closes_only_that_connection() {
    let b = start(BrokerConfig {
        max_packet_size: 1024,
        ..quick()
    })
    .await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // Remaining length with a fifth continuation byte.
        (
            "bad remaining length",
            vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x01],
        ),
        // SUBSCRIBE must have flags 0010.
        ("reserved flags", vec![0x80, 6, 0, 1, 0, 1, b'a', 0]),
        // Topic with invalid UTF-8.
        ("invalid utf-8", vec![0x30, 5, 0, 2, 0xc3, 0x28, b'x']),
        // Wildcard in a PUBLISH topic.
        ("wildcard topic", vec![0x30, 5, 0, 3, b'a', b'/', b'#']),
        // QoS 3.
        ("qos 3", vec![0x36, 5, 0, 1, b'a', 0, 1]),
        // Larger than max_packet_size, announced in the fixed header.
        ("oversized", vec![0x30, 0x80, 0x80, 0x04]),
        // SUBSCRIBE with no filter.
        ("empty subscribe", vec![0x82, 2, 0, 1]),
        // DUP on QoS 0.
        ("dup on qos 0", vec![0x38, 3, 0, 1, b'a']),
        // A packet only servers send.
        ("suback from client", vec![0x90, 3, 0, 1, 0]),
    ];
    for (name, bytes) in cases {
        let (mut c, _) = RawClient::connect(b.addr, &format!("bad-{name}"), true).await;
        c.send_bytes(&bytes).await;
        c.expect_closed().await;
        still_serving(b.addr).await;
    }
}

#[tokio::test]
async fn suback_refuses_invalid_filters_with_0x80() {
    let b = start(quick()).await;
    let (mut c, _) = RawClient::connect(b.addr, "s", true).await;
    let codes = c
        .subscribe_many(&[("a/#/b", 1), ("ok/+", 2), ("x+", 0)])
        .await;
    assert_eq!(
        codes,
        vec![
            v3::SubscribeReturnCode::Failure,
            v3::SubscribeReturnCode::Success(v3::QoS::ExactlyOnce),
            v3::SubscribeReturnCode::Failure
        ]
    );
}

#[tokio::test]
async fn wildcards_overlap_and_qos_downgrade() {
    let b = start(quick()).await;
    let (mut sub, _) = RawClient::connect(b.addr, "sub", true).await;
    sub.subscribe_many(&[("a/+", 0), ("a/#", 1), ("a/b", 2)])
        .await;
    let (mut publ, _) = RawClient::connect(b.addr, "pub", true).await;
    // One copy at the highest granted QoS, capped by the publish QoS.
    publ.publish("a/b", b"x", 1, false).await;
    let p = sub.recv_and_ack().await;
    assert_eq!(p.qos, v3::QoS::AtLeastOnce);
    publ.publish("a/b", b"y", 2, false).await;
    let p = sub.recv_and_ack().await;
    assert_eq!((payload_str(&p), p.qos), ("y".into(), v3::QoS::ExactlyOnce));
    publ.publish("a/c/d", b"z", 2, false).await;
    let p = sub.recv_and_ack().await;
    assert_eq!((payload_str(&p), p.qos), ("z".into(), v3::QoS::AtLeastOnce));
    assert!(
        sub.try_recv(Duration::from_millis(200)).await.is_none(),
        "exactly one copy each"
    );
    // `#` does not match `$` topics.
    publ.publish("$SYS/x", b"sys", 0, false).await;
    let (mut all, _) = RawClient::connect(b.addr, "all", true).await;
    all.subscribe("#", 0).await;
    publ.publish("$SYS/y", b"sys", 0, false).await;
    publ.publish("plain", b"p", 0, false).await;
    assert_eq!(payload_str(&all.recv_publish().await), "p");
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let b = start(quick()).await;
    let (mut sub, _) = RawClient::connect(b.addr, "sub", true).await;
    sub.subscribe("t", 1).await;
    sub.send(v3::Packet::Unsubscribe {
        packet_id: id(5),
        topic_filters: vec!["t".into()],
    })
    .await;
    assert_eq!(
        sub.recv().await,
        v3::Packet::UnsubscribeAck { packet_id: id(5) }
    );
    let (mut publ, _) = RawClient::connect(b.addr, "pub", true).await;
    publ.publish("t", b"x", 1, false).await;
    assert!(sub.try_recv(Duration::from_millis(300)).await.is_none());
}

#[tokio::test]
async fn qos2_both_directions_with_duplicate_suppression() {
    let b = start(quick()).await;
    let (mut sub, _) = RawClient::connect(b.addr, "sub", true).await;
    sub.subscribe("q2", 2).await;
    let (mut publ, _) = RawClient::connect(b.addr, "pub", false).await;
    publ.send(publish_packet("q2", b"once", 2, 9, false)).await;
    assert_eq!(
        publ.recv().await,
        v3::Packet::PublishReceived { packet_id: id(9) }
    );
    // The publisher resends before PUBREL: acknowledged again, not routed again.
    let mut dup = publish_packet("q2", b"once", 2, 9, false);
    if let v3::Packet::Publish(p) = &mut dup {
        p.dup = true;
    }
    publ.send(dup).await;
    assert_eq!(
        publ.recv().await,
        v3::Packet::PublishReceived { packet_id: id(9) }
    );
    publ.send(v3::Packet::PublishRelease { packet_id: id(9) })
        .await;
    assert_eq!(
        publ.recv().await,
        v3::Packet::PublishComplete { packet_id: id(9) }
    );

    let p = sub.recv_publish().await;
    assert_eq!(
        (payload_str(&p), p.qos),
        ("once".into(), v3::QoS::ExactlyOnce)
    );
    let pid = p.packet_id.expect("packet id");
    sub.send(v3::Packet::PublishReceived { packet_id: pid })
        .await;
    assert_eq!(
        sub.recv().await,
        v3::Packet::PublishRelease { packet_id: pid }
    );
    sub.send(v3::Packet::PublishComplete { packet_id: pid })
        .await;
    assert!(
        sub.try_recv(Duration::from_millis(300)).await.is_none(),
        "delivered once"
    );
    // After PUBREL the id is free: a new message with it is routed.
    publ.publish("q2", b"again", 2, false).await;
    assert_eq!(payload_str(&sub.recv_and_ack().await), "again");
}

#[tokio::test]
async fn retained_messages() {
    let b = start(quick()).await;
    let (mut publ, _) = RawClient::connect(b.addr, "pub", true).await;
    publ.publish("r/1", b"first", 1, true).await;
    publ.publish("r/1", b"second", 1, true).await; // replaces
    publ.publish("r/2", b"two", 0, true).await;
    publ.publish("r/3", b"three", 1, true).await;
    publ.publish("r/3", b"", 1, true).await; // deletes

    let (mut sub, _) = RawClient::connect(b.addr, "sub", true).await;
    sub.subscribe("r/+", 1).await;
    let mut got = vec![];
    for _ in 0..2 {
        let p = sub.recv_and_ack().await;
        assert!(p.retain, "retained delivery on subscribe has retain=1");
        got.push((p.topic.to_string(), payload_str(&p)));
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            ("r/1".into(), "second".into()),
            ("r/2".into(), "two".into())
        ]
    );
    assert!(sub.try_recv(Duration::from_millis(200)).await.is_none());
    // Live delivery to an existing subscriber has retain=0.
    publ.publish("r/1", b"live", 1, true).await;
    let p = sub.recv_and_ack().await;
    assert_eq!((payload_str(&p), p.retain), ("live".into(), false));
}

/// The memory store behind a slow retained lookup: the window in which a
/// message published after SUBACK used to overtake the retained ones.
struct SlowRetained(std::sync::Arc<storage_memory::MemoryStore>);

#[async_trait::async_trait]
impl broker_core::storage::RetainedStore for SlowRetained {
    async fn set_retained(
        &self,
        message: std::sync::Arc<broker_core::message::Message>,
    ) -> broker_core::storage::StorageResult<()> {
        self.0.set_retained(message).await
    }
    async fn delete_retained(&self, topic: &str) -> broker_core::storage::StorageResult<()> {
        self.0.delete_retained(topic).await
    }
    async fn lookup_retained(
        &self,
        filter: &str,
    ) -> broker_core::storage::StorageResult<Vec<std::sync::Arc<broker_core::message::Message>>>
    {
        let found = self.0.lookup_retained(filter).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        found
    }
}

/// A subscriber gets the retained message first and what is published
/// after its SUBACK next, never the other way round: a device that reads
/// its state topic must end on the newest value, not on the stale
/// retained one that arrived late.
#[tokio::test]
async fn retained_messages_come_before_messages_published_after_suback() {
    use broker_core::storage::{PacketStore, Storage, SubscriptionStore};
    let mem = std::sync::Arc::new(storage_memory::MemoryStore::new());
    let storage = Storage {
        packets: mem.clone() as std::sync::Arc<dyn PacketStore>,
        subscriptions: mem.clone() as std::sync::Arc<dyn SubscriptionStore>,
        retained: std::sync::Arc::new(SlowRetained(mem.clone())),
    };
    let b = start_with(quick(), storage).await;
    let (mut publ, _) = RawClient::connect(b.addr, "state-pub", true).await;
    publ.publish("state", b"old", 1, true).await;
    for (id, clean) in [("state-clean", true), ("state-persistent", false)] {
        let (mut sub, _) = RawClient::connect(b.addr, id, clean).await;
        sub.subscribe("state", 1).await;
        // During the retained lookup: the new state, and a plain message.
        publ.publish("state", b"new", 1, true).await;
        publ.publish("state", b"live", 1, false).await;
        let mut got = Vec::new();
        for _ in 0..3 {
            let p = sub.recv_and_ack().await;
            got.push((payload_str(&p), p.retain));
        }
        assert_eq!(
            got,
            [
                ("old".to_string(), true),
                ("new".to_string(), false),
                ("live".to_string(), false)
            ],
            "{id}: the retained message, then what was published after SUBACK, in order"
        );
        sub.disconnect().await;
        publ.publish("state", b"old", 1, true).await;
    }
}

fn will(topic: &str, msg: &str) -> Option<v3::LastWill> {
    Some(v3::LastWill {
        qos: v3::QoS::AtLeastOnce,
        retain: false,
        topic: topic.into(),
        message: bytes::Bytes::copy_from_slice(msg.as_bytes()),
    })
}

#[tokio::test]
async fn last_will_on_loss_keepalive_and_protocol_error_but_not_on_disconnect() {
    let b = start(quick()).await;
    let (mut watcher, _) = RawClient::connect(b.addr, "watcher", true).await;
    watcher.subscribe("will/#", 1).await;

    let (c, _, _) =
        RawClient::connect_full(b.addr, "graceful", true, 0, will("will/graceful", "x")).await;
    c.disconnect().await;
    let (c, _, _) =
        RawClient::connect_full(b.addr, "lost", true, 0, will("will/lost", "gone")).await;
    c.drop_socket();
    let p = watcher.recv_and_ack().await;
    assert_eq!(p.topic, "will/lost");

    // Keep alive 1 s: silent for 1.5 s means gone.
    let (_silent, _, _) =
        RawClient::connect_full(b.addr, "silent", true, 1, will("will/silent", "ka")).await;
    let p = watcher.recv_and_ack().await;
    assert_eq!(p.topic, "will/silent");

    let (mut bad, _, _) =
        RawClient::connect_full(b.addr, "bad", true, 0, will("will/bad", "pe")).await;
    bad.send_bytes(&[0x30, 5, 0, 3, b'a', b'/', b'+']).await;
    let p = watcher.recv_and_ack().await;
    assert_eq!(p.topic, "will/bad");
    assert!(
        watcher.try_recv(Duration::from_millis(300)).await.is_none(),
        "no will after DISCONNECT"
    );
}

#[tokio::test]
async fn session_takeover_closes_the_first_connection() {
    let b = start(quick()).await;
    let (mut first, _) = RawClient::connect(b.addr, "same", false).await;
    first.subscribe("t", 1).await;
    let (mut second, present) = RawClient::connect(b.addr, "same", false).await;
    assert!(present);
    first.expect_closed().await;
    let (mut publ, _) = RawClient::connect(b.addr, "pub", true).await;
    publ.publish("t", b"to-second", 1, false).await;
    assert_eq!(payload_str(&second.recv_and_ack().await), "to-second");
}

#[tokio::test]
async fn in_flight_messages_are_resent_first_with_dup_and_same_ids() {
    let b = start(quick()).await;
    let (mut sub, present) = RawClient::connect(b.addr, "dev", false).await;
    assert!(!present);
    sub.subscribe("inbox", 1).await;
    let (mut publ, _) = RawClient::connect(b.addr, "pub", true).await;
    for i in 0..5 {
        publ.publish("inbox", format!("m{i}").as_bytes(), 1, false)
            .await;
    }
    // Receive all five without acknowledging any, then vanish.
    let mut first_ids = vec![];
    for i in 0..5 {
        let p = sub.recv_publish().await;
        assert_eq!(payload_str(&p), format!("m{i}"));
        assert!(!p.dup);
        first_ids.push(p.packet_id);
    }
    sub.drop_socket();
    for i in 5..8 {
        publ.publish("inbox", format!("m{i}").as_bytes(), 1, false)
            .await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (mut sub, present) = RawClient::connect(b.addr, "dev", false).await;
    assert!(present, "session present after reconnect");
    for i in 0..8 {
        let p = sub.recv_and_ack().await;
        assert_eq!(payload_str(&p), format!("m{i}"), "original order");
        if i < 5 {
            assert!(p.dup, "retransmission has DUP=1");
            assert_eq!(
                p.packet_id,
                first_ids.get(i).copied().flatten(),
                "same packet id"
            );
        } else {
            assert!(!p.dup);
        }
    }
}

#[tokio::test]
async fn clean_session_discards_and_qos0_is_not_queued_offline_by_default() {
    let b = start(quick()).await;
    let (mut sub, _) = RawClient::connect(b.addr, "dev", false).await;
    sub.subscribe("t", 1).await;
    sub.disconnect().await;
    let (mut publ, _) = RawClient::connect(b.addr, "pub", true).await;
    publ.publish("t", b"q0", 0, false).await;
    publ.publish("t", b"q1", 1, false).await;
    let (mut sub, present) = RawClient::connect(b.addr, "dev", false).await;
    assert!(present);
    assert_eq!(payload_str(&sub.recv_and_ack().await), "q1");
    assert!(sub.try_recv(Duration::from_millis(200)).await.is_none());
    sub.disconnect().await;
    // clean_session=1 discards the stored session.
    let (c, present) = RawClient::connect(b.addr, "dev", true).await;
    assert!(!present);
    c.disconnect().await;
    publ.publish("t", b"after-clean", 1, false).await;
    let (mut sub, present) = RawClient::connect(b.addr, "dev", false).await;
    assert!(!present);
    assert!(
        sub.try_recv(Duration::from_millis(200)).await.is_none(),
        "subscription was discarded"
    );
}

#[tokio::test]
async fn qos0_offline_queueing_can_be_enabled() {
    let b = start(BrokerConfig {
        queue_qos0_offline: true,
        ..quick()
    })
    .await;
    let (mut sub, _) = RawClient::connect(b.addr, "dev", false).await;
    sub.subscribe("t", 0).await;
    sub.disconnect().await;
    let (mut publ, _) = RawClient::connect(b.addr, "pub", true).await;
    publ.publish("t", b"q0", 0, false).await;
    let (mut sub, _) = RawClient::connect(b.addr, "dev", false).await;
    assert_eq!(payload_str(&sub.recv_publish().await), "q0");
}

async fn fill_offline_queue(policy: broker_core::config::OverflowPolicy) -> Vec<String> {
    let b = start(BrokerConfig {
        max_queued_messages: 3,
        overflow_policy: policy,
        ..quick()
    })
    .await;
    let (mut sub, _) = RawClient::connect(b.addr, "dev", false).await;
    sub.subscribe("t", 1).await;
    sub.disconnect().await;
    let (mut publ, _) = RawClient::connect(b.addr, "pub", true).await;
    for i in 0..5 {
        publ.publish("t", format!("m{i}").as_bytes(), 1, false)
            .await;
    }
    assert_eq!(b.broker.stats().dropped, 2, "drops are counted");
    let (mut sub, _) = RawClient::connect(b.addr, "dev", false).await;
    let mut got = vec![];
    for _ in 0..3 {
        got.push(payload_str(&sub.recv_and_ack().await));
    }
    assert!(sub.try_recv(Duration::from_millis(200)).await.is_none());
    got
}

#[tokio::test]
async fn queue_limit_policies() {
    use broker_core::config::OverflowPolicy;
    assert_eq!(
        fill_offline_queue(OverflowPolicy::DropNew).await,
        ["m0", "m1", "m2"]
    );
    assert_eq!(
        fill_offline_queue(OverflowPolicy::DropOldest).await,
        ["m2", "m3", "m4"]
    );
}

#[tokio::test]
async fn session_expiry_counts_from_disconnect() {
    let b = start(BrokerConfig {
        session_expiry_secs: Some(1),
        ..quick()
    })
    .await;
    let (mut sub, _) = RawClient::connect(b.addr, "dev", false).await;
    sub.subscribe("t", 1).await;
    // Connected for longer than the expiry: the session must survive.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    sub.disconnect().await;
    let (sub, present) = RawClient::connect(b.addr, "dev", false).await;
    assert!(present, "expiry counts from disconnect, not from SUBSCRIBE");
    sub.disconnect().await;
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let (_sub, present) = RawClient::connect(b.addr, "dev", false).await;
    assert!(!present, "expired after 1 s offline");
}

#[tokio::test]
async fn sessions_and_queues_are_restored_from_storage_on_restart() {
    let b = start(quick()).await;
    let (mut sub, _) = RawClient::connect(b.addr, "dev", false).await;
    sub.subscribe("inbox/#", 2).await;
    sub.disconnect().await;
    let (mut publ, _) = RawClient::connect(b.addr, "pub", true).await;
    for i in 0..50 {
        publ.publish(
            "inbox/a",
            format!("m{i}").as_bytes(),
            1 + (i % 2) as u8,
            i == 49,
        )
        .await;
    }
    publ.disconnect().await;
    let storage = b.stop().await;

    let b = start_with(quick(), storage).await;
    let (mut sub, present) = RawClient::connect(b.addr, "dev", false).await;
    assert!(present);
    for i in 0..50 {
        assert_eq!(payload_str(&sub.recv_and_ack().await), format!("m{i}"));
    }
    // Subscription survived too.
    let (mut publ, _) = RawClient::connect(b.addr, "pub", true).await;
    publ.publish("inbox/b", b"new", 1, false).await;
    assert_eq!(payload_str(&sub.recv_and_ack().await), "new");
    // And the retained message.
    let (mut other, _) = RawClient::connect(b.addr, "other", true).await;
    other.subscribe("inbox/a", 1).await;
    assert_eq!(payload_str(&other.recv_and_ack().await), "m49");
}
