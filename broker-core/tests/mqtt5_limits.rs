//! MQTT 5 limits and reason codes, checked with raw packets over TCP: Receive
//! Maximum both ways, Maximum Packet Size both ways, topic aliases both ways,
//! SUBACK/UNSUBACK/PUBCOMP reason codes, unsupported features, payload format,
//! Request Problem Information, malformed packets and refused deliveries.

mod common;

use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;
use std::time::Duration;

use broker_core::config::BrokerConfig;
use broker_core::internals::codec::{v3, v5, Publish};
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use common::v5::{ack, ack2, connect, opts, payload, pid, publish, will, Packet, RawV5};
use common::{start, start_with, RawClient, WAIT};
use storage_memory::MemoryStore;
use tokio_util::codec::Encoder;

use v5::DisconnectReasonCode as D;
use v5::PublishAckReason as A;
use v5::SubscribeAckReason as S;

/// How long to watch for a packet that must not arrive.
const QUIET: Duration = Duration::from_millis(400);

/// Bytes `p` takes on the wire, fixed header included.
fn wire_len(p: Packet) -> usize {
    let mut buf = BytesMut::new();
    v5::Codec::new(0, 0).encode(p, &mut buf).expect("encodes");
    buf.len()
}

/// A QoS > 0 PUBLISH on `topic` whose whole packet is exactly `total` bytes.
fn publish_of_size(topic: &str, qos: u8, packet_id: u16, total: usize) -> Publish {
    for n in 0..total {
        let p = publish(topic, &"s".repeat(n), qos, packet_id);
        let len = wire_len(Packet::Publish(Box::new(p.clone())));
        if len == total {
            return p;
        }
        assert!(len < total, "no PUBLISH of exactly {total} bytes");
    }
    panic!("no PUBLISH of exactly {total} bytes");
}

/// A PUBLISH with a binary payload and the UTF-8 payload format indicator.
fn utf8_flagged(topic: &str, body: &[u8], qos: u8, packet_id: u16) -> Publish {
    let mut p = publish(topic, "", qos, packet_id);
    p.payload = Bytes::copy_from_slice(body);
    p.properties = Some(v5::PublishProperties {
        is_utf8_payload: true,
        ..v5::PublishProperties::default()
    });
    p
}

/// A PUBLISH carrying topic alias `alias` (and `topic`, possibly empty).
fn aliased(topic: &str, body: &str, qos: u8, packet_id: u16, alias: u16) -> Publish {
    let mut p = publish(topic, body, qos, packet_id);
    p.properties = Some(v5::PublishProperties {
        topic_alias: NonZeroU16::new(alias),
        ..v5::PublishProperties::default()
    });
    p
}

async fn send_publish(c: &mut RawV5, p: Publish) {
    c.send(Packet::Publish(Box::new(p))).await;
}

/// The PUBACK or PUBREC answering `id`, whole (reason string included).
async fn recv_ack(c: &mut RawV5, id: u16) -> v5::PublishAck {
    match c.recv().await {
        Packet::PublishAck(a) | Packet::PublishReceived(a) => {
            assert_eq!(a.packet_id, pid(id));
            a
        }
        other => panic!("expected PUBACK or PUBREC for {id}, got {other:?}"),
    }
}

/// Poll the store until it holds `n` queue entries, failing after [`WAIT`].
async fn wait_for_queued(store: &MemoryStore, n: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = store.queued_packets();
        if now == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "store holds {now} queued packets, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn receive_maximum_disconnects_v5_and_throttles_v3_publishers() {
    let b = start(BrokerConfig {
        receive_maximum: 3,
        ..BrokerConfig::default()
    })
    .await;

    // QoS 2 publishes stay counted until PUBCOMP: three unreleased ones use
    // the whole quota, so a fourth breaks the limit announced in CONNACK.
    let (mut greedy, connack) = RawV5::connect(b.addr, connect("greedy")).await;
    assert_eq!(connack.receive_max.get(), 3);
    for id in 1..=3 {
        send_publish(&mut greedy, publish("rm/in", "x", 2, id)).await;
        let a = recv_ack(&mut greedy, id).await;
        assert!(u8::from(a.reason_code) < 0x80, "PUBREC {a:?}");
    }
    send_publish(&mut greedy, publish("rm/in", "x", 2, 4)).await;
    let d = greedy.expect_disconnect().await;
    assert_eq!(d.reason_code, D::ReceiveMaximumExceeded);

    // Completed flows give the quota back: pipelined windows of 3, many times.
    let (mut polite, _) = RawV5::connect(b.addr, connect("polite")).await;
    let mut next = 1u16;
    for _ in 0..4 {
        let ids: Vec<u16> = (next..next + 3).collect();
        next += 3;
        for &id in &ids {
            send_publish(&mut polite, publish("rm/in", "x", 1, id)).await;
        }
        for &id in &ids {
            assert_eq!(
                recv_ack(&mut polite, id).await.reason_code,
                A::NoMatchingSubscribers
            );
        }
    }
    for _ in 0..4 {
        let ids: Vec<u16> = (next..next + 3).collect();
        next += 3;
        for &id in &ids {
            send_publish(&mut polite, publish("rm/in", "x", 2, id)).await;
        }
        for &id in &ids {
            assert_eq!(
                recv_ack(&mut polite, id).await.reason_code,
                A::NoMatchingSubscribers
            );
        }
        for &id in &ids {
            polite.send(Packet::PublishRelease(ack2(pid(id)))).await;
        }
        for &id in &ids {
            match polite.recv().await {
                Packet::PublishComplete(c) => assert_eq!(c.packet_id, pid(id)),
                other => panic!("expected PUBCOMP {id}, got {other:?}"),
            }
        }
    }
    polite.send(Packet::PingRequest).await;
    assert_eq!(polite.recv().await, Packet::PingResponse);

    // MQTT 3.1.1 has no Receive Maximum: the same pattern is not a violation.
    let (mut v3c, _) = RawClient::connect(b.addr, "v3-greedy", true).await;
    for id in 1..=4 {
        v3c.send(common::publish_packet("rm/in", b"x", 2, id, false))
            .await;
    }
    for id in 1..=4 {
        assert_eq!(
            v3c.recv().await,
            v3::Packet::PublishReceived {
                packet_id: common::id(id)
            }
        );
    }
    v3c.send(v3::Packet::PingRequest).await;
    assert_eq!(v3c.recv().await, v3::Packet::PingResponse);
    for id in 1..=4 {
        v3c.send(v3::Packet::PublishRelease {
            packet_id: common::id(id),
        })
        .await;
        assert_eq!(
            v3c.recv().await,
            v3::Packet::PublishComplete {
                packet_id: common::id(id)
            }
        );
    }
}

#[tokio::test]
async fn receive_maximum_of_a_subscriber_limits_unacknowledged_deliveries() {
    let b = start(BrokerConfig::default()).await;
    let mut c = connect("slow-sub");
    c.receive_max = NonZeroU16::new(2);
    let (mut sub, _) = RawV5::connect(b.addr, c).await;
    assert_eq!(
        sub.subscribe(&[("rx/t", opts(1))], None).await,
        vec![S::GrantedQos1]
    );
    let (mut publisher, _) = RawV5::connect(b.addr, connect("rx-pub")).await;
    for i in 1..=5u16 {
        let p = publish("rx/t", &format!("m{i}"), 1, i);
        assert_eq!(publisher.publish(p).await, Some(A::Success));
    }

    let m1 = sub.recv_publish().await;
    let m2 = sub.recv_publish().await;
    assert_eq!((payload(&m1).as_str(), payload(&m2).as_str()), ("m1", "m2"));
    assert_ne!(m1.packet_id, m2.packet_id);
    // The window of 2 is full: nothing more until an acknowledgement.
    assert_eq!(sub.try_recv(QUIET).await, None);

    let puback = |p: &Publish| Packet::PublishAck(ack(p.packet_id.expect("QoS 1 id"), A::Success));
    sub.send(puback(&m1)).await;
    let m3 = sub.recv_publish().await;
    assert_eq!(payload(&m3), "m3");
    assert_eq!(sub.try_recv(QUIET).await, None);

    sub.send(puback(&m2)).await;
    sub.send(puback(&m3)).await;
    let m4 = sub.recv_publish().await;
    let m5 = sub.recv_publish().await;
    assert_eq!((payload(&m4).as_str(), payload(&m5).as_str()), ("m4", "m5"));
    sub.send(puback(&m4)).await;
    sub.send(puback(&m5)).await;
    assert_eq!(sub.try_recv(QUIET).await, None);
}

#[tokio::test]
async fn maximum_packet_size_inbound_is_advertised_and_enforced() {
    let b = start(BrokerConfig {
        max_packet_size: 1024,
        ..BrokerConfig::default()
    })
    .await;
    let (mut sub, _) = RawV5::connect(b.addr, connect("mps-in-sub")).await;
    sub.subscribe(&[("mps/in", opts(1))], None).await;
    let (mut c, connack) = RawV5::connect(b.addr, connect("big-pub")).await;
    assert_eq!(connack.max_packet_size, Some(1024));

    assert_eq!(
        c.publish(publish("mps/in", "small", 1, 1)).await,
        Some(A::Success)
    );
    assert_eq!(payload(&sub.recv_and_ack().await), "small");

    send_publish(&mut c, publish("mps/in", &"x".repeat(2000), 1, 2)).await;
    assert_eq!(c.expect_disconnect().await.reason_code, D::PacketTooLarge);
    // The oversized message was never routed.
    assert_eq!(sub.try_recv(QUIET).await, None);
}

/// Maximum Packet Size is the size of the whole packet, fixed header included
/// (MQTT 5 sections 2.1.4 and 3.2.2.3.6).
#[tokio::test]
async fn maximum_packet_size_inbound_counts_the_whole_packet() {
    let b = start(BrokerConfig {
        max_packet_size: 1024,
        ..BrokerConfig::default()
    })
    .await;
    let (mut c, _) = RawV5::connect(b.addr, connect("edge-pub")).await;
    assert_eq!(
        c.publish(publish_of_size("mps/edge", 1, 1, 1024)).await,
        Some(A::NoMatchingSubscribers),
        "a packet of exactly the maximum is allowed"
    );
    send_publish(&mut c, publish_of_size("mps/edge", 1, 2, 1025)).await;
    // 1025 bytes exceed the maximum of 1024.
    match c.try_recv(Duration::from_secs(2)).await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason_code, D::PacketTooLarge),
        other => panic!("expected DISCONNECT 0x95 for 1025 bytes, got {other:?}"),
    }
    c.expect_closed().await;
}

#[tokio::test]
async fn maximum_packet_size_outbound_drops_what_the_client_cannot_take() {
    let store = Arc::new(MemoryStore::new());
    let b = start_with(BrokerConfig::default(), store.storage()).await;
    // A persistent session, so deliveries are in the store and a dropped one
    // would be left behind there if the broker forgot it.
    let mut c = connect("small-sub");
    c.session_expiry_interval_secs = 60;
    c.max_packet_size = NonZeroU32::new(200);
    let (mut sub, _) = RawV5::connect(b.addr, c).await;
    sub.subscribe(&[("mps/out", opts(1))], None).await;
    let (mut publisher, _) = RawV5::connect(b.addr, connect("mps-out-pub")).await;

    let big = publish("mps/out", &"x".repeat(500), 1, 1);
    assert_eq!(publisher.publish(big).await, Some(A::Success));
    let small = publish("mps/out", "small", 1, 2);
    assert_eq!(publisher.publish(small).await, Some(A::Success));

    let got = sub.recv_publish().await;
    assert_eq!(
        payload(&got),
        "small",
        "the 500-byte message must not be sent"
    );
    // Only the unacknowledged small message is left in the store.
    wait_for_queued(&store, 1).await;
    let id = got.packet_id.expect("QoS 1 id");
    sub.send(Packet::PublishAck(ack(id, A::Success))).await;
    wait_for_queued(&store, 0).await;
    assert_eq!(sub.try_recv(QUIET).await, None);
}

/// A packet of exactly the client's Maximum Packet Size fits and must be sent
/// (MQTT 5 section 3.1.2.11.4 only allows discarding packets that exceed it).
#[tokio::test]
async fn maximum_packet_size_outbound_counts_the_whole_packet() {
    let b = start(BrokerConfig::default()).await;
    let mut c = connect("edge-sub");
    c.max_packet_size = NonZeroU32::new(200);
    let (mut sub, _) = RawV5::connect(b.addr, c).await;
    sub.subscribe(&[("e", opts(1))], None).await;
    let (mut publisher, _) = RawV5::connect(b.addr, connect("edge-out-pub")).await;

    // The broker's PUBLISH has the same topic, packet id size and (empty)
    // properties as these, hence the same size.
    let fits = publish_of_size("e", 1, 1, 200);
    let fits_len = fits.payload.len();
    assert_eq!(publisher.publish(fits).await, Some(A::Success));
    let over = publish_of_size("e", 1, 2, 201);
    assert_eq!(publisher.publish(over).await, Some(A::Success));
    assert_eq!(
        publisher.publish(publish("e", "small", 1, 3)).await,
        Some(A::Success)
    );

    let got = sub.recv_and_ack().await;
    assert_eq!(
        got.payload.len(),
        fits_len,
        "the 200-byte PUBLISH fits a maximum of 200 and must be delivered first (got `{}`)",
        payload(&got)
    );
    assert_eq!(wire_len(Packet::Publish(Box::new(got))), 200);
    assert_eq!(payload(&sub.recv_and_ack().await), "small");
    assert_eq!(sub.try_recv(QUIET).await, None);
}

#[tokio::test]
async fn topic_aliases_inbound() {
    let b = start(BrokerConfig::default()).await;
    let (mut sub, _) = RawV5::connect(b.addr, connect("alias-sub")).await;
    sub.subscribe(&[("a/b", opts(1))], None).await;

    let (mut c, connack) = RawV5::connect(b.addr, connect("alias-pub")).await;
    assert_eq!(connack.topic_alias_max, 10);
    assert_eq!(
        c.publish(aliased("a/b", "one", 1, 1, 1)).await,
        Some(A::Success)
    );
    assert_eq!(
        c.publish(aliased("", "two", 1, 2, 1)).await,
        Some(A::Success)
    );
    for want in ["one", "two"] {
        let got = sub.recv_and_ack().await;
        assert_eq!((&*got.topic, payload(&got).as_str()), ("a/b", want));
    }

    // Above the maximum announced in CONNACK.
    let (mut c, _) = RawV5::connect(b.addr, connect("alias-11")).await;
    send_publish(&mut c, aliased("a/b", "x", 0, 0, 11)).await;
    assert_eq!(
        c.expect_disconnect().await.reason_code,
        D::TopicAliasInvalid
    );

    // Alias 1 was set on another connection only: unknown on this one.
    let (mut c, _) = RawV5::connect(b.addr, connect("alias-unset")).await;
    send_publish(&mut c, aliased("", "x", 0, 0, 1)).await;
    assert_eq!(c.expect_disconnect().await.reason_code, D::ProtocolError);
    assert_eq!(sub.try_recv(QUIET).await, None);

    // With aliases disabled, any alias is out of range.
    let b = start(BrokerConfig {
        topic_alias_maximum: 0,
        ..BrokerConfig::default()
    })
    .await;
    let (mut c, connack) = RawV5::connect(b.addr, connect("no-alias")).await;
    assert_eq!(connack.topic_alias_max, 0);
    send_publish(&mut c, aliased("a/b", "x", 1, 1, 1)).await;
    assert_eq!(
        c.expect_disconnect().await.reason_code,
        D::TopicAliasInvalid
    );
}

#[tokio::test]
async fn topic_aliases_outbound() {
    let b = start(BrokerConfig::default()).await;
    let mut c = connect("alias-2");
    c.topic_alias_max = 2;
    let (mut with, _) = RawV5::connect(b.addr, c).await;
    with.subscribe(&[("al/#", opts(1))], None).await;
    let (mut without, _) = RawV5::connect(b.addr, connect("alias-0")).await;
    without.subscribe(&[("al/#", opts(1))], None).await;

    let (mut publisher, _) = RawV5::connect(b.addr, connect("al-pub")).await;
    for (i, topic) in ["al/t", "al/t", "al/u"].into_iter().enumerate() {
        let p = publish(topic, &format!("m{i}"), 1, i as u16 + 1);
        assert_eq!(publisher.publish(p).await, Some(A::Success));
    }

    let alias = |p: &Publish| p.properties.as_ref().and_then(|p| p.topic_alias);
    let first = with.recv_and_ack().await;
    assert_eq!(&*first.topic, "al/t");
    let a = alias(&first).expect("first message on a topic sets an alias");
    assert!((1..=2).contains(&a.get()), "alias {a} above the client's 2");
    let second = with.recv_and_ack().await;
    assert_eq!(payload(&second), "m1");
    assert_eq!(&*second.topic, "", "known alias: topic left out");
    assert_eq!(alias(&second), Some(a));
    let third = with.recv_and_ack().await;
    assert_eq!(&*third.topic, "al/u");
    let u = alias(&third).expect("a second topic gets its own alias");
    assert!(u != a && (1..=2).contains(&u.get()), "alias {u}");

    for want in ["m0", "m1", "m2"] {
        let got = without.recv_and_ack().await;
        assert_eq!(payload(&got), want);
        assert!(!got.topic.is_empty());
        assert_eq!(alias(&got), None, "client allowed no aliases");
    }
}

#[tokio::test]
async fn suback_reason_codes() {
    let b = start(BrokerConfig::default()).await;
    let (mut c, _) = RawV5::connect(b.addr, connect("suback-1")).await;
    assert_eq!(
        c.subscribe(
            &[("ok/1", opts(0)), ("a/#/b", opts(1)), ("ok/2", opts(2))],
            None
        )
        .await,
        vec![S::GrantedQos0, S::TopicFilterInvalid, S::GrantedQos2]
    );

    let b = start(BrokerConfig {
        shared_subscriptions: false,
        wildcard_subscriptions: false,
        maximum_qos: 1,
        ..BrokerConfig::default()
    })
    .await;
    let (mut c, _) = RawV5::connect(b.addr, connect("suback-2")).await;
    let filters = [
        ("$share/g/t", opts(1)),
        ("a/+", opts(1)),
        ("x/y", opts(2)),
        ("a/#/b", opts(0)),
        ("x/z", opts(0)),
    ];
    assert_eq!(
        c.subscribe(&filters, None).await,
        vec![
            S::SharedSubscriptionNotSupported,
            S::WildcardSubscriptionsNotSupported,
            S::GrantedQos1,
            S::TopicFilterInvalid,
            S::GrantedQos0,
        ]
    );
    // Refused subscriptions were not made.
    let (mut p, _) = RawV5::connect(b.addr, connect("suback-pub")).await;
    assert_eq!(
        p.publish(publish("a/c", "x", 1, 1)).await,
        Some(A::NoMatchingSubscribers)
    );
    assert_eq!(
        p.publish(publish("t", "x", 1, 2)).await,
        Some(A::NoMatchingSubscribers)
    );

    let b = start(BrokerConfig {
        subscription_identifiers: false,
        ..BrokerConfig::default()
    })
    .await;
    let (mut c, _) = RawV5::connect(b.addr, connect("suback-3")).await;
    c.send(Packet::Subscribe(v5::Subscribe {
        packet_id: pid(7),
        id: NonZeroU32::new(5),
        user_properties: Vec::new(),
        topic_filters: vec![(ByteString::from("t"), opts(0))],
    }))
    .await;
    assert_eq!(
        c.expect_disconnect().await.reason_code,
        D::SubscriptionIdentifiersNotSupported
    );
}

#[tokio::test]
async fn unsuback_reason_codes() {
    use v5::UnsubscribeAckReason as U;
    let b = start(BrokerConfig::default()).await;
    let (mut c, _) = RawV5::connect(b.addr, connect("unsuback")).await;
    c.subscribe(&[("u/1", opts(1))], None).await;
    assert_eq!(
        c.unsubscribe(&["u/1", "u/2", "a/#/b"]).await,
        vec![U::Success, U::NoSubscriptionExisted, U::TopicFilterInvalid]
    );
    // It really was removed.
    assert_eq!(
        c.unsubscribe(&["u/1"]).await,
        vec![U::NoSubscriptionExisted]
    );
}

#[tokio::test]
async fn pubrel_for_unknown_packet_id_gets_packet_id_not_found() {
    let b = start(BrokerConfig::default()).await;
    let (mut c, _) = RawV5::connect(b.addr, connect("pubrel")).await;
    c.send(Packet::PublishRelease(ack2(pid(42)))).await;
    match c.recv().await {
        Packet::PublishComplete(p) => {
            assert_eq!(p.packet_id, pid(42));
            assert_eq!(p.reason_code, v5::PublishAck2Reason::PacketIdNotFound);
        }
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
    // A released id is unknown too; a live one is still completed normally.
    assert!(c.publish(publish("pr/t", "x", 2, 5)).await.is_some());
    c.send(Packet::PublishRelease(ack2(pid(5)))).await;
    match c.recv().await {
        Packet::PublishComplete(p) => {
            assert_eq!(p.packet_id, pid(5));
            assert_eq!(p.reason_code, v5::PublishAck2Reason::PacketIdNotFound);
        }
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
}

#[tokio::test]
async fn unsupported_retain_and_qos_are_refused() {
    let b = start(BrokerConfig {
        retain_available: false,
        ..BrokerConfig::default()
    })
    .await;
    let (mut c, connack) = RawV5::connect(b.addr, connect("no-retain")).await;
    assert!(!connack.retain_available);
    let mut p = publish("r/t", "x", 0, 0);
    p.retain = true;
    send_publish(&mut c, p).await;
    assert_eq!(
        c.expect_disconnect().await.reason_code,
        D::RetainNotSupported
    );
    let mut w = connect("no-retain-will");
    w.last_will = Some(v5::LastWill {
        retain: true,
        ..will("r/will", "bye")
    });
    let (mut c, connack) = RawV5::connect_with(b.addr, w).await;
    assert_eq!(
        connack.reason_code,
        v5::ConnectAckReason::RetainNotSupported
    );
    c.expect_closed().await;

    let b = start(BrokerConfig {
        maximum_qos: 1,
        ..BrokerConfig::default()
    })
    .await;
    let (mut c, connack) = RawV5::connect(b.addr, connect("qos1-only")).await;
    assert_eq!(connack.max_qos, v5::QoS::AtLeastOnce);
    assert_eq!(
        c.publish(publish("q/t", "x", 1, 1)).await,
        Some(A::NoMatchingSubscribers)
    );
    send_publish(&mut c, publish("q/t", "x", 2, 2)).await;
    assert_eq!(c.expect_disconnect().await.reason_code, D::QosNotSupported);

    let mut w = connect("qos2-will");
    w.last_will = Some(v5::LastWill {
        qos: v5::QoS::ExactlyOnce,
        ..will("q/will", "bye")
    });
    let (mut c, connack) = RawV5::connect_with(b.addr, w).await;
    assert_eq!(connack.reason_code, v5::ConnectAckReason::QosNotSupported);
    c.expect_closed().await;
}

#[tokio::test]
async fn payload_format_indicator_is_checked() {
    let b = start(BrokerConfig::default()).await;
    let (mut sub, _) = RawV5::connect(b.addr, connect("pf-sub")).await;
    sub.subscribe(&[("pf/t", opts(2))], None).await;
    let (mut c, _) = RawV5::connect(b.addr, connect("pf-pub")).await;
    let bad = [0xff, 0xfe, b'x'];

    assert_eq!(
        c.publish(utf8_flagged("pf/t", &bad, 1, 1)).await,
        Some(A::PayloadFormatInvalid)
    );
    assert_eq!(
        c.publish(utf8_flagged("pf/t", &bad, 2, 2)).await,
        Some(A::PayloadFormatInvalid)
    );
    // Refused messages are not routed: the valid one is the first to arrive.
    assert_eq!(
        c.publish(utf8_flagged("pf/t", "ok ✓".as_bytes(), 1, 3))
            .await,
        Some(A::Success)
    );
    assert_eq!(payload(&sub.recv_and_ack().await), "ok ✓");
    assert_eq!(sub.try_recv(QUIET).await, None);

    // QoS 0 has no acknowledgement to carry the refusal.
    send_publish(&mut c, utf8_flagged("pf/t", &bad, 0, 0)).await;
    assert_eq!(
        c.expect_disconnect().await.reason_code,
        D::PayloadFormatInvalid
    );
    assert_eq!(sub.try_recv(QUIET).await, None);
}

#[tokio::test]
async fn client_publish_with_subscription_identifier_is_a_protocol_error() {
    let b = start(BrokerConfig::default()).await;
    let (mut sub, _) = RawV5::connect(b.addr, connect("sid-sub")).await;
    sub.subscribe(&[("sid/t", opts(1))], None).await;
    let (mut c, _) = RawV5::connect(b.addr, connect("sid-pub")).await;
    let mut p = publish("sid/t", "x", 1, 1);
    p.properties = Some(v5::PublishProperties {
        subscription_ids: vec![NonZeroU32::new(3).expect("non-zero")],
        ..v5::PublishProperties::default()
    });
    send_publish(&mut c, p).await;
    assert_eq!(c.expect_disconnect().await.reason_code, D::ProtocolError);
    assert_eq!(sub.try_recv(QUIET).await, None);
}

#[tokio::test]
async fn request_problem_information_controls_reason_strings() {
    let b = start(BrokerConfig::default()).await;
    let bad = [0xff, 0xfe];

    // Asked for: the broker explains a refused PUBLISH, so the absence of a
    // reason string below comes from the client's choice.
    let (mut verbose, _) = RawV5::connect(b.addr, connect("problems-on")).await;
    send_publish(&mut verbose, utf8_flagged("rp/t", &bad, 1, 1)).await;
    let a = recv_ack(&mut verbose, 1).await;
    assert_eq!(a.reason_code, A::PayloadFormatInvalid);
    assert!(a.reason_string.is_some(), "precondition: {a:?}");

    let mut c = connect("problems-off");
    c.request_problem_info = false;
    let (mut quiet, _) = RawV5::connect(b.addr, c).await;
    send_publish(&mut quiet, utf8_flagged("rp/t", &bad, 1, 1)).await;
    let a = recv_ack(&mut quiet, 1).await;
    assert_eq!(a.reason_code, A::PayloadFormatInvalid);
    assert_eq!(a.reason_string, None);
    assert!(a.properties.is_empty());
    quiet
        .send(Packet::Subscribe(v5::Subscribe {
            packet_id: pid(2),
            id: None,
            user_properties: Vec::new(),
            topic_filters: vec![
                (ByteString::from("rp/ok"), opts(1)),
                (ByteString::from("a/#/b"), opts(1)),
            ],
        }))
        .await;
    match quiet.recv().await {
        Packet::SubscribeAck(s) => {
            assert_eq!(s.status, vec![S::GrantedQos1, S::TopicFilterInvalid]);
            assert_eq!(s.reason_string, None);
            assert!(s.properties.is_empty());
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }

    // A protocol error is explained in DISCONNECT when asked for.
    verbose
        .send(Packet::Connect(Box::new(connect("problems-on"))))
        .await;
    let d = verbose.expect_disconnect().await;
    assert_eq!(d.reason_code, D::ProtocolError);
    assert!(d.reason_string.is_some(), "{d:?}");
}

#[tokio::test]
async fn malformed_packet_gets_disconnect_0x81() {
    let b = start(BrokerConfig::default()).await;
    let (mut c, _) = RawV5::connect(b.addr, connect("malformed")).await;
    assert!(c.publish(publish("m/t", "ok", 1, 1)).await.is_some());
    // PUBLISH QoS 0, topic "t", properties [0x7F (no such property), 0x00], payload "x".
    c.send_bytes(&[0x30, 0x07, 0x00, 0x01, b't', 0x02, 0x7f, 0x00, b'x'])
        .await;
    assert_eq!(c.expect_disconnect().await.reason_code, D::MalformedPacket);
}

#[tokio::test]
async fn pubrec_with_error_ends_the_qos2_delivery() {
    let b = start(BrokerConfig::default()).await;
    // Receive Maximum 1: the second message can only come once the first is done.
    let mut c = connect("refuser");
    c.receive_max = NonZeroU16::new(1);
    let (mut sub, _) = RawV5::connect(b.addr, c).await;
    sub.subscribe(&[("rec/t", opts(2))], None).await;
    let (mut publisher, _) = RawV5::connect(b.addr, connect("rec-pub")).await;
    for (i, body) in ["refused", "accepted"].into_iter().enumerate() {
        let p = publish("rec/t", body, 2, i as u16 + 1);
        assert_eq!(publisher.publish(p).await, Some(A::Success));
    }

    let first = sub.recv_publish().await;
    assert_eq!(payload(&first), "refused");
    assert_eq!(first.qos, v5::QoS::ExactlyOnce);
    assert_eq!(sub.try_recv(QUIET).await, None, "window of 1 is full");
    let id = first.packet_id.expect("QoS 2 id");
    sub.send(Packet::PublishReceived(ack(id, A::UnspecifiedError)))
        .await;

    // No PUBREL for the refused one: the next packet is the next message.
    let second = sub.recv_and_ack().await;
    assert_eq!(payload(&second), "accepted");
    assert_eq!(sub.try_recv(QUIET).await, None);
}
