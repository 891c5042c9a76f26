//! MQTT 5 subscription features over TCP: No Local, Retain As Published,
//! Retain Handling, subscription identifiers, shared subscriptions (including
//! what happens to a member's messages when it goes away), mixed MQTT 3.1.1 /
//! MQTT 5 traffic, and a real MQTT 5 client library (rumqttc's `v5` module).

mod common;

use std::num::{NonZeroU16, NonZeroU32};
use std::time::Duration;

use broker_core::config::BrokerConfig;
use broker_core::internals::codec::{v3, v5, Publish};
use bytes::Bytes;
use bytestring::ByteString;
use common::v5::{ack, connect, opts, payload, publish, Packet, RawV5};
use common::{start, RawClient, TestBroker, WAIT};
use rumqttc::v5::mqttbytes::v5::{
    Packet as RPacket, Publish as RPublish, PublishProperties as RProps, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS as RQoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use v5::PublishAckReason::{NoMatchingSubscribers, Success};
use v5::RetainHandling::{AtSubscribe, AtSubscribeNew, NoAtSubscribe};
use v5::SubscribeAckReason::{GrantedQos0, GrantedQos1, GrantedQos2, TopicFilterInvalid};

/// How long to listen when checking that nothing (more) arrives.
const QUIET: Duration = Duration::from_millis(300);
/// Payload of the marker message, see [`drain_to_marker`].
const MARKER: &str = "--marker--";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn sub_opts(
    qos: u8,
    no_local: bool,
    retain_as_published: bool,
    retain_handling: v5::RetainHandling,
) -> v5::SubscriptionOptions {
    v5::SubscriptionOptions {
        no_local,
        retain_as_published,
        retain_handling,
        ..opts(qos)
    }
}

/// The SUBACK reason granting `qos`.
fn granted(qos: u8) -> v5::SubscribeAckReason {
    match qos {
        0 => GrantedQos0,
        1 => GrantedQos1,
        _ => GrantedQos2,
    }
}

/// A retained PUBLISH.
fn retained(topic: &str, body: &str, qos: u8, packet_id: u16) -> Publish {
    Publish {
        retain: true,
        ..publish(topic, body, qos, packet_id)
    }
}

/// Publish and insist the broker accepted it (with or without subscribers).
async fn publish_ok(c: &mut RawV5, p: Publish) {
    let reason = c.publish(p).await;
    assert!(
        matches!(reason, None | Some(Success) | Some(NoMatchingSubscribers)),
        "publish refused: {reason:?}"
    );
}

/// Acknowledge a QoS 0/1 PUBLISH received with `try_recv`.
async fn ack_v5(c: &mut RawV5, p: &Publish) {
    match (p.qos, p.packet_id) {
        (v5::QoS::AtMostOnce, _) => {}
        (v5::QoS::AtLeastOnce, Some(id)) => c.send(Packet::PublishAck(ack(id, Success))).await,
        other => panic!("unexpected QoS/packet id {other:?} in {p:?}"),
    }
}

/// An MQTT 5 client (clean session) subscribed to its own marker topic `mk/{id}`.
async fn marked(addr: std::net::SocketAddr, id: &str) -> RawV5 {
    let (mut c, _) = RawV5::connect(addr, connect(id)).await;
    assert_eq!(
        c.subscribe(&[(&format!("mk/{id}"), opts(0))], None).await,
        vec![GrantedQos0]
    );
    c
}

/// Everything the broker sends `c` before a marker that `c` itself publishes
/// (QoS 0) to its marker topic `mk/{id}`. The broker handles one client's
/// packets in order, so whatever an earlier SUBSCRIBE queued for `c` (retained
/// messages) is queued before the marker: this shows deterministically what a
/// SUBSCRIBE delivered, including "nothing".
async fn drain_to_marker(c: &mut RawV5, id: &str) -> Vec<Publish> {
    let topic = format!("mk/{id}");
    c.send(Packet::Publish(Box::new(publish(&topic, MARKER, 0, 0))))
        .await;
    let mut before = Vec::new();
    loop {
        let p = c.recv_and_ack().await;
        if p.topic == topic.as_str() && payload(&p) == MARKER {
            return before;
        }
        before.push(p);
    }
}

/// (payload, retain flag) of each message.
fn summary(ps: &[Publish]) -> Vec<(String, bool)> {
    ps.iter().map(|p| (payload(p), p.retain)).collect()
}

fn ids(p: &Publish) -> Vec<u32> {
    let mut ids: Vec<u32> = p
        .properties
        .as_ref()
        .map(|pr| pr.subscription_ids.iter().map(|i| i.get()).collect())
        .unwrap_or_default();
    // The order of subscription identifiers is not significant (MQTT-3.3.4-4).
    ids.sort_unstable();
    ids
}

async fn assert_quiet(c: &mut RawV5, who: &str) {
    if let Some(p) = c.try_recv(QUIET).await {
        panic!("{who}: expected nothing more, got {p:?}");
    }
}

async fn assert_quiet_v3(c: &mut RawClient, who: &str) {
    if let Some(p) = c.try_recv(QUIET).await {
        panic!("{who}: expected nothing more, got {p:?}");
    }
}

/// Wait until the broker has seen `id`'s connection end.
async fn wait_offline(b: &TestBroker, id: &str) {
    let deadline = Instant::now() + WAIT;
    while b.broker.session(id).is_some_and(|s| s.online) {
        assert!(
            Instant::now() < deadline,
            "{id} still online after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A CONNECT for a session that outlives its connection by 60 s.
fn persistent(id: &str) -> v5::Connect {
    v5::Connect {
        clean_start: false,
        session_expiry_interval_secs: 60,
        ..connect(id)
    }
}

/// A subscriber of either protocol, acknowledging QoS 1 as it reads.
enum Member {
    V5(RawV5),
    V3(RawClient),
}

impl Member {
    async fn v5(addr: std::net::SocketAddr, id: &str, filter: &str) -> Member {
        let (mut c, _) = RawV5::connect(addr, connect(id)).await;
        assert_eq!(
            c.subscribe(&[(filter, opts(1))], None).await,
            vec![GrantedQos1]
        );
        Member::V5(c)
    }

    async fn v3(addr: std::net::SocketAddr, id: &str, filter: &str, clean: bool) -> Member {
        let (mut c, _) = RawClient::connect(addr, id, clean).await;
        assert_eq!(
            c.subscribe(filter, 1).await,
            vec![v3::SubscribeReturnCode::Success(v3::QoS::AtLeastOnce)]
        );
        Member::V3(c)
    }

    /// The payload of the next PUBLISH, if one arrives within `d`.
    async fn try_next(&mut self, d: Duration) -> Option<String> {
        match self {
            Member::V5(c) => match c.try_recv(d).await? {
                Packet::Publish(p) => {
                    ack_v5(c, &p).await;
                    Some(payload(&p))
                }
                other => panic!("expected PUBLISH, got {other:?}"),
            },
            Member::V3(c) => match c.try_recv(d).await? {
                v3::Packet::Publish(p) => {
                    match (p.qos, p.packet_id) {
                        (v3::QoS::AtMostOnce, _) => {}
                        (v3::QoS::AtLeastOnce, Some(id)) => {
                            c.send(v3::Packet::PublishAck { packet_id: id }).await
                        }
                        other => panic!("unexpected QoS/packet id {other:?}"),
                    }
                    Some(common::payload_str(&p))
                }
                other => panic!("expected PUBLISH, got {other:?}"),
            },
        }
    }
}

/// Read from all `members` until `total` messages arrived altogether (within
/// [`WAIT`]), then check that none of them gets one more. Returns each
/// member's payloads in arrival order.
async fn collect(members: &mut [Member], total: usize) -> Vec<Vec<String>> {
    let mut got = vec![Vec::new(); members.len()];
    let deadline = Instant::now() + WAIT;
    while got.iter().map(Vec::len).sum::<usize>() < total {
        assert!(
            Instant::now() < deadline,
            "expected {total} messages within {WAIT:?}, got {got:?}"
        );
        for (m, g) in members.iter_mut().zip(got.iter_mut()) {
            if let Some(p) = m.try_next(Duration::from_millis(20)).await {
                g.push(p);
            }
        }
    }
    let extra = futures::future::join_all(members.iter_mut().map(|m| m.try_next(QUIET))).await;
    for (i, e) in extra.into_iter().enumerate() {
        assert!(
            e.is_none(),
            "member {i} got {e:?} beyond the {total} expected ({got:?})"
        );
    }
    got
}

/// Every message of `sent` exactly once across `got`.
fn assert_each_once<'a>(got: impl IntoIterator<Item = &'a String>, sent: &[String]) {
    let mut all: Vec<&String> = got.into_iter().collect();
    all.sort();
    let mut want: Vec<&String> = sent.iter().collect();
    want.sort();
    assert_eq!(all, want, "each message exactly once across the members");
}

fn numbered(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

// ---------------------------------------------------------------------------
// No Local
// ---------------------------------------------------------------------------

#[tokio::test]
async fn no_local_suppresses_only_the_subscribers_own_messages() {
    let b = start(BrokerConfig::default()).await;
    let (mut quiet, _) = RawV5::connect(b.addr, connect("nl-quiet")).await;
    assert_eq!(
        quiet
            .subscribe(&[("nl/t", sub_opts(1, true, false, AtSubscribe))], None)
            .await,
        vec![GrantedQos1]
    );
    let (mut echo, _) = RawV5::connect(b.addr, connect("nl-echo")).await;
    assert_eq!(
        echo.subscribe(&[("nl/t", opts(1))], None).await,
        vec![GrantedQos1]
    );

    // quiet's own message: its PUBACK must be the next packet (no PUBLISH of
    // its own message), and echo matched it.
    quiet
        .send(Packet::Publish(Box::new(publish(
            "nl/t",
            "from-quiet",
            1,
            1,
        ))))
        .await;
    match quiet.recv().await {
        Packet::PublishAck(a) => assert_eq!(a.reason_code, Success),
        other => panic!("expected PUBACK, got {other:?}"),
    }

    // echo (without No Local) gets quiet's message, then its own.
    let got = echo.recv_and_ack().await;
    assert_eq!(payload(&got), "from-quiet");
    echo.send(Packet::Publish(Box::new(publish(
        "nl/t",
        "from-echo",
        1,
        1,
    ))))
    .await;
    let mut own = None;
    while own.is_none() {
        match echo.recv().await {
            Packet::PublishAck(a) => assert_eq!(a.reason_code, Success),
            Packet::Publish(p) => {
                ack_v5(&mut echo, &p).await;
                own = Some(payload(&p));
            }
            other => panic!("expected PUBACK or PUBLISH, got {other:?}"),
        }
    }
    assert_eq!(own.as_deref(), Some("from-echo"));

    // quiet gets echo's message. Its own was routed before this one, so had it
    // been queued it would have come first.
    let got = quiet.recv_and_ack().await;
    assert_eq!(payload(&got), "from-echo");
    assert_quiet(&mut quiet, "nl-quiet").await;
    // echo's PUBACK may still be in flight if the PUBLISH came first.
    match echo.try_recv(QUIET).await {
        None | Some(Packet::PublishAck(_)) => {}
        Some(other) => panic!("nl-echo: expected nothing more, got {other:?}"),
    }
    assert_quiet(&mut echo, "nl-echo").await;
}

// ---------------------------------------------------------------------------
// Retain As Published
// ---------------------------------------------------------------------------

#[tokio::test]
async fn retain_as_published_keeps_the_flag_live_and_subscribe_time_copies_always_have_it() {
    let b = start(BrokerConfig::default()).await;
    let mut rap = marked(b.addr, "rap-keep").await;
    assert_eq!(
        rap.subscribe(&[("rap/t", sub_opts(1, false, true, AtSubscribe))], None)
            .await,
        vec![GrantedQos1]
    );
    let mut plain = marked(b.addr, "rap-plain").await;
    assert_eq!(
        plain
            .subscribe(&[("rap/t", sub_opts(1, false, false, AtSubscribe))], None)
            .await,
        vec![GrantedQos1]
    );
    let (mut v3sub, _) = RawClient::connect(b.addr, "rap-v3", true).await;
    v3sub.subscribe("rap/t", 1).await;

    let (mut publisher, _) = RawV5::connect(b.addr, connect("rap-pub")).await;
    assert_eq!(
        publisher.publish(retained("rap/t", "live", 1, 1)).await,
        Some(Success)
    );
    // Live delivery: the flag is kept only with Retain As Published
    // (MQTT-3.3.1-12, MQTT-3.3.1-13); a 3.1.1 client always sees 0 (MQTT-3.3.1-9).
    let got = rap.recv_and_ack().await;
    assert_eq!((payload(&got).as_str(), got.retain), ("live", true));
    let got = plain.recv_and_ack().await;
    assert_eq!((payload(&got).as_str(), got.retain), ("live", false));
    let got = v3sub.recv_and_ack().await;
    assert_eq!(
        (common::payload_str(&got).as_str(), got.retain),
        ("live", false)
    );

    // A message published without retain stays without it, even with RAP.
    assert_eq!(
        publisher.publish(publish("rap/t", "not-kept", 1, 2)).await,
        Some(Success)
    );
    let got = rap.recv_and_ack().await;
    assert_eq!((payload(&got).as_str(), got.retain), ("not-kept", false));
    let got = plain.recv_and_ack().await;
    assert_eq!((payload(&got).as_str(), got.retain), ("not-kept", false));
    let got = v3sub.recv_and_ack().await;
    assert_eq!(common::payload_str(&got), "not-kept");

    // Retained messages sent because of a SUBSCRIBE always carry retain=1
    // (MQTT 5 section 3.3.1.3; MQTT-3.3.1-8 in 3.1.1), whatever Retain As
    // Published says.
    for (c, id, rap_flag) in [
        (&mut rap, "rap-keep", true),
        (&mut plain, "rap-plain", false),
    ] {
        assert_eq!(
            c.subscribe(
                &[("rap/t", sub_opts(1, false, rap_flag, AtSubscribe))],
                None
            )
            .await,
            vec![GrantedQos1]
        );
        assert_eq!(
            summary(&drain_to_marker(c, id).await),
            vec![("live".to_string(), true)],
            "{id} re-subscribing"
        );
    }
    let mut late = marked(b.addr, "rap-late").await;
    assert_eq!(
        late.subscribe(&[("rap/#", sub_opts(1, false, false, AtSubscribe))], None)
            .await,
        vec![GrantedQos1]
    );
    assert_eq!(
        summary(&drain_to_marker(&mut late, "rap-late").await),
        vec![("live".to_string(), true)]
    );
    let (mut late3, _) = RawClient::connect(b.addr, "rap-late-v3", true).await;
    late3.subscribe("rap/+", 1).await;
    let got = late3.recv_and_ack().await;
    assert_eq!(
        (common::payload_str(&got).as_str(), got.retain),
        ("live", true)
    );

    assert_quiet(&mut rap, "rap-keep").await;
    assert_quiet(&mut plain, "rap-plain").await;
    assert_quiet_v3(&mut v3sub, "rap-v3").await;
    assert_quiet_v3(&mut late3, "rap-late-v3").await;
}

// ---------------------------------------------------------------------------
// Retain Handling
// ---------------------------------------------------------------------------

#[tokio::test]
async fn retain_handling_0_always_1_for_new_subscriptions_only_2_never() {
    let b = start(BrokerConfig::default()).await;
    let (mut publisher, _) = RawV5::connect(b.addr, connect("rh-pub")).await;
    publish_ok(&mut publisher, retained("rh/t", "kept", 1, 1)).await;
    let kept = vec![("kept".to_string(), true)];
    let nothing: Vec<(String, bool)> = Vec::new();

    // 0: on every SUBSCRIBE, the repeated one included.
    let mut c0 = marked(b.addr, "rh-0").await;
    for round in 0..2 {
        assert_eq!(
            c0.subscribe(&[("rh/t", sub_opts(1, false, false, AtSubscribe))], None)
                .await,
            vec![GrantedQos1]
        );
        assert_eq!(
            summary(&drain_to_marker(&mut c0, "rh-0").await),
            kept,
            "retain handling 0, SUBSCRIBE #{round}"
        );
    }

    // 1: only when the subscription did not exist.
    let mut c1 = marked(b.addr, "rh-1").await;
    let rh1 = [("rh/t", sub_opts(1, false, false, AtSubscribeNew))];
    assert_eq!(c1.subscribe(&rh1, None).await, vec![GrantedQos1]);
    assert_eq!(summary(&drain_to_marker(&mut c1, "rh-1").await), kept);
    assert_eq!(c1.subscribe(&rh1, None).await, vec![GrantedQos1]);
    assert_eq!(
        summary(&drain_to_marker(&mut c1, "rh-1").await),
        nothing,
        "retain handling 1 on an existing subscription"
    );
    assert_eq!(
        c1.unsubscribe(&["rh/t"]).await,
        vec![v5::UnsubscribeAckReason::Success]
    );
    assert_eq!(c1.subscribe(&rh1, None).await, vec![GrantedQos1]);
    assert_eq!(
        summary(&drain_to_marker(&mut c1, "rh-1").await),
        kept,
        "retain handling 1 after UNSUBSCRIBE: the subscription is new again"
    );

    // 2: never.
    let mut c2 = marked(b.addr, "rh-2").await;
    for round in 0..2 {
        assert_eq!(
            c2.subscribe(&[("rh/+", sub_opts(1, false, false, NoAtSubscribe))], None)
                .await,
            vec![GrantedQos1]
        );
        assert_eq!(
            summary(&drain_to_marker(&mut c2, "rh-2").await),
            nothing,
            "retain handling 2, SUBSCRIBE #{round}"
        );
    }

    // Retain Handling only concerns SUBSCRIBE time: live messages reach all.
    assert_eq!(
        publisher.publish(publish("rh/t", "fresh", 1, 2)).await,
        Some(Success)
    );
    for (c, id) in [(&mut c0, "rh-0"), (&mut c1, "rh-1"), (&mut c2, "rh-2")] {
        let got = c.recv_and_ack().await;
        assert_eq!(
            (payload(&got).as_str(), got.retain),
            ("fresh", false),
            "{id}"
        );
        assert_quiet(c, id).await;
    }
}

#[tokio::test]
async fn retain_handling_1_counts_subscriptions_kept_by_a_resumed_session() {
    let b = start(BrokerConfig::default()).await;
    let (mut publisher, _) = RawV5::connect(b.addr, connect("rhs-pub")).await;
    publish_ok(&mut publisher, retained("rhs/t", "kept", 1, 1)).await;
    let rh1 = [("rhs/t", sub_opts(1, false, false, AtSubscribeNew))];

    let (mut c, _) = RawV5::connect(b.addr, persistent("rhs")).await;
    assert_eq!(
        c.subscribe(&[("mk/rhs", opts(0))], None).await,
        vec![GrantedQos0]
    );
    assert_eq!(c.subscribe(&rh1, None).await, vec![GrantedQos1]);
    assert_eq!(
        summary(&drain_to_marker(&mut c, "rhs").await),
        vec![("kept".to_string(), true)]
    );
    c.disconnect().await;
    wait_offline(&b, "rhs").await;

    // The resumed session still has the subscription: it is not new.
    let (mut c, ack) = RawV5::connect(b.addr, persistent("rhs")).await;
    assert!(ack.session_present);
    assert_eq!(c.subscribe(&rh1, None).await, vec![GrantedQos1]);
    assert_eq!(summary(&drain_to_marker(&mut c, "rhs").await), vec![]);
    assert_quiet(&mut c, "rhs").await;
}

// ---------------------------------------------------------------------------
// Subscription identifiers
// ---------------------------------------------------------------------------

#[tokio::test]
async fn subscription_identifiers_are_delivered_with_matching_messages() {
    let b = start(BrokerConfig::default()).await;
    let (mut publisher, _) = RawV5::connect(b.addr, connect("sid-pub")).await;
    publish_ok(&mut publisher, retained("sid/r", "kept", 1, 1)).await;

    let (mut with_id, _) = RawV5::connect(b.addr, connect("sid-five")).await;
    assert_eq!(
        with_id.subscribe(&[("sid/x", opts(1))], Some(5)).await,
        vec![GrantedQos1]
    );
    let (mut without, _) = RawV5::connect(b.addr, connect("sid-none")).await;
    assert_eq!(
        without.subscribe(&[("sid/x", opts(1))], None).await,
        vec![GrantedQos1]
    );
    // The largest identifier (a four-byte variable byte integer).
    let (mut max_id, _) = RawV5::connect(b.addr, connect("sid-max")).await;
    assert_eq!(
        max_id
            .subscribe(&[("sid/+", opts(1))], Some(268_435_455))
            .await,
        vec![GrantedQos1]
    );
    // SUBSCRIBE to "sid/+" also brought the retained "sid/r", with the id.
    let got = max_id.recv_and_ack().await;
    assert_eq!((payload(&got).as_str(), got.retain), ("kept", true));
    assert_eq!(ids(&got), vec![268_435_455]);

    assert_eq!(
        publisher.publish(publish("sid/x", "x1", 1, 2)).await,
        Some(Success)
    );
    let got = with_id.recv_and_ack().await;
    assert_eq!((payload(&got).as_str(), ids(&got)), ("x1", vec![5]));
    let got = without.recv_and_ack().await;
    assert_eq!(
        (payload(&got).as_str(), ids(&got)),
        ("x1", vec![]),
        "a subscription without identifier delivers none"
    );
    let got = max_id.recv_and_ack().await;
    assert_eq!(
        (payload(&got).as_str(), ids(&got)),
        ("x1", vec![268_435_455])
    );

    // Retained messages sent on SUBSCRIBE carry that subscription's id.
    let (mut late, _) = RawV5::connect(b.addr, connect("sid-late")).await;
    assert_eq!(
        late.subscribe(&[("sid/r", opts(1))], Some(7)).await,
        vec![GrantedQos1]
    );
    let got = late.recv_and_ack().await;
    assert_eq!((payload(&got).as_str(), got.retain), ("kept", true));
    assert_eq!(ids(&got), vec![7]);

    // Re-subscribing replaces the subscription, its identifier included
    // (MQTT 5 section 3.8.2.1.2): a new id, then no id.
    assert_eq!(
        with_id.subscribe(&[("sid/x", opts(1))], Some(9)).await,
        vec![GrantedQos1]
    );
    assert_eq!(
        publisher.publish(publish("sid/x", "x2", 1, 3)).await,
        Some(Success)
    );
    let got = with_id.recv_and_ack().await;
    assert_eq!((payload(&got).as_str(), ids(&got)), ("x2", vec![9]));
    assert_eq!(
        with_id.subscribe(&[("sid/x", opts(1))], None).await,
        vec![GrantedQos1]
    );
    assert_eq!(
        publisher.publish(publish("sid/x", "x3", 1, 4)).await,
        Some(Success)
    );
    let got = with_id.recv_and_ack().await;
    assert_eq!((payload(&got).as_str(), ids(&got)), ("x3", vec![]));

    for (c, id) in [(&mut with_id, "sid-five"), (&mut late, "sid-late")] {
        assert_quiet(c, id).await;
    }
}

#[tokio::test]
async fn overlapping_subscriptions_give_one_message_with_every_identifier() {
    let b = start(BrokerConfig::default()).await;
    // Two clients with the same two overlapping filters, the QoS swapped, so
    // that the higher QoS wins whichever subscription the broker matches
    // first. Two SUBSCRIBE packets each, so two distinct identifiers.
    let mut clients = Vec::new();
    for (id, wide_qos, narrow_qos, wide_id, narrow_id) in
        [("sid-overlap-1", 0, 1, 1, 2), ("sid-overlap-2", 1, 0, 3, 4)]
    {
        let (mut c, _) = RawV5::connect(b.addr, connect(id)).await;
        assert_eq!(
            c.subscribe(&[("a/+", opts(wide_qos))], Some(wide_id)).await,
            vec![granted(wide_qos)]
        );
        assert_eq!(
            c.subscribe(&[("a/b", opts(narrow_qos))], Some(narrow_id))
                .await,
            vec![granted(narrow_qos)]
        );
        clients.push((id, c, wide_qos, wide_id, narrow_id));
    }
    let (mut publisher, _) = RawV5::connect(b.addr, connect("sid-overlap-pub")).await;
    assert_eq!(
        publisher.publish(publish("a/b", "both", 1, 1)).await,
        Some(Success)
    );
    assert_eq!(
        publisher.publish(publish("a/c", "one", 1, 2)).await,
        Some(Success)
    );

    for (id, mut c, wide_qos, wide_id, narrow_id) in clients {
        let mut got = [c.recv_and_ack().await, c.recv_and_ack().await];
        got.sort_by_key(payload);
        // The broker sends one copy per session; that single copy must carry
        // the ids of all matching subscriptions (MQTT-3.3.4-4) and respect the
        // highest QoS they were granted (MQTT-3.3.4-2).
        assert_eq!(payload(&got[0]), "both", "{id}");
        assert_eq!(ids(&got[0]), vec![wide_id, narrow_id], "{id}");
        assert_eq!(got[0].qos, v5::QoS::AtLeastOnce, "{id}");
        assert_eq!(payload(&got[1]), "one", "{id}");
        assert_eq!(ids(&got[1]), vec![wide_id], "{id}");
        assert_eq!(
            got[1].qos,
            v5::QoS::try_from(wide_qos).expect("qos"),
            "{id}"
        );
        assert_quiet(&mut c, id).await;
    }
}

// ---------------------------------------------------------------------------
// Shared subscriptions
// ---------------------------------------------------------------------------

#[tokio::test]
async fn shared_subscription_gives_each_message_to_one_member_per_group() {
    let b = start(BrokerConfig::default()).await;
    // Group g mixes MQTT 5 and MQTT 3.1.1 members.
    let mut g = vec![
        Member::v5(b.addr, "g-1", "$share/g/jobs/+").await,
        Member::v3(b.addr, "g-2", "$share/g/jobs/+", true).await,
        Member::v5(b.addr, "g-3", "$share/g/jobs/+").await,
    ];
    let mut h = vec![
        Member::v3(b.addr, "h-1", "$share/h/jobs/+", true).await,
        Member::v5(b.addr, "h-2", "$share/h/jobs/+").await,
    ];
    let mut plain = vec![Member::v5(b.addr, "jobs-plain", "jobs/+").await];

    let (mut publisher, _) = RawV5::connect(b.addr, connect("jobs-pub")).await;
    let sent = numbered("job-", 30);
    for (i, m) in sent.iter().enumerate() {
        assert_eq!(
            publisher
                .publish(publish("jobs/run", m, 1, i as u16 + 1))
                .await,
            Some(Success)
        );
    }

    // The broker serves online members round-robin in client id order, so
    // each member gets an equal share.
    let got = collect(&mut g, 30).await;
    assert_each_once(got.iter().flatten(), &sent);
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m.len(), 10, "member {i} of g got {m:?}");
    }
    let got = collect(&mut h, 30).await;
    assert_each_once(got.iter().flatten(), &sent);
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m.len(), 15, "member {i} of h got {m:?}");
    }
    // A non-shared subscriber gets everything, in order.
    let got = collect(&mut plain, 30).await;
    assert_eq!(got[0], sent);
}

#[tokio::test]
async fn shared_subscribe_sends_no_retained_messages() {
    let b = start(BrokerConfig::default()).await;
    let (mut publisher, _) = RawV5::connect(b.addr, connect("sr-pub")).await;
    publish_ok(&mut publisher, retained("sr/cfg", "stale", 1, 1)).await;

    // Retained messages go only to a new Non-shared Subscription (MQTT 5
    // section 3.3.1.3), whatever the Retain Handling option says.
    let mut m5 = marked(b.addr, "sr-5").await;
    assert_eq!(
        m5.subscribe(
            &[("$share/g/sr/#", sub_opts(1, false, false, AtSubscribe))],
            Some(3)
        )
        .await,
        vec![GrantedQos1]
    );
    assert_eq!(summary(&drain_to_marker(&mut m5, "sr-5").await), vec![]);

    let (mut m3, _) = RawClient::connect(b.addr, "sr-3", true).await;
    m3.subscribe_many(&[("$share/g/sr/+", 1), ("mk/sr-3", 0)])
        .await;
    m3.send(common::publish_packet(
        "mk/sr-3",
        MARKER.as_bytes(),
        0,
        0,
        false,
    ))
    .await;
    let got = m3.recv_publish().await;
    assert_eq!(
        common::payload_str(&got),
        MARKER,
        "no retained message first"
    );

    // The retained message is there: a plain subscriber gets it.
    let mut plain = marked(b.addr, "sr-plain").await;
    assert_eq!(
        plain.subscribe(&[("sr/#", opts(1))], None).await,
        vec![GrantedQos1]
    );
    assert_eq!(
        summary(&drain_to_marker(&mut plain, "sr-plain").await),
        vec![("stale".to_string(), true)]
    );
    assert_quiet(&mut m5, "sr-5").await;
    assert_quiet_v3(&mut m3, "sr-3").await;
}

#[tokio::test]
async fn no_local_on_a_shared_subscription_is_a_protocol_error() {
    let b = start(BrokerConfig::default()).await;
    // MQTT-3.8.3-4: No Local on a shared subscription is a Protocol Error.
    let (mut c, _) = RawV5::connect(b.addr, connect("share-nl")).await;
    c.send(Packet::Subscribe(v5::Subscribe {
        packet_id: NonZeroU16::new(1).expect("non-zero"),
        id: None,
        user_properties: Vec::new(),
        topic_filters: vec![(
            ByteString::from("$share/g/t"),
            sub_opts(1, true, false, AtSubscribe),
        )],
    }))
    .await;
    let d = c.expect_disconnect().await;
    assert_eq!(d.reason_code, v5::DisconnectReasonCode::ProtocolError);

    // The same subscription without No Local is fine.
    let (mut ok, _) = RawV5::connect(b.addr, connect("share-ok")).await;
    assert_eq!(
        ok.subscribe(&[("$share/g/t", opts(1))], None).await,
        vec![GrantedQos1]
    );
}

#[tokio::test]
async fn malformed_shared_filters_are_refused_per_filter() {
    let b = start(BrokerConfig::default()).await;
    let bad = [
        "$share/g",
        "$share//t",
        "$share/a+b/t",
        "$share/a#/t",
        "$share/g/",
    ];

    let (mut c5, _) = RawV5::connect(b.addr, connect("bad-share-5")).await;
    let mut filters: Vec<(&str, v5::SubscriptionOptions)> =
        bad.iter().map(|f| (*f, opts(1))).collect();
    filters.push(("$share/ok/t", opts(2)));
    let mut want = vec![TopicFilterInvalid; bad.len()];
    want.push(GrantedQos2);
    assert_eq!(c5.subscribe(&filters, None).await, want);
    assert_eq!(
        c5.unsubscribe(&bad).await,
        vec![v5::UnsubscribeAckReason::TopicFilterInvalid; bad.len()]
    );

    let (mut c3, _) = RawClient::connect(b.addr, "bad-share-3", true).await;
    let mut filters: Vec<(&str, u8)> = bad.iter().map(|f| (*f, 1)).collect();
    filters.push(("$share/ok/t", 1));
    let mut want = vec![v3::SubscribeReturnCode::Failure; bad.len()];
    want.push(v3::SubscribeReturnCode::Success(v3::QoS::AtLeastOnce));
    assert_eq!(c3.subscribe_many(&filters).await, want);

    // The refusals leave both connections working: the valid shared
    // subscription is served.
    let (mut publisher, _) = RawV5::connect(b.addr, connect("bad-share-pub")).await;
    for i in 1..=2u16 {
        assert_eq!(
            publisher.publish(publish("t", "ok", 1, i)).await,
            Some(Success)
        );
    }
    let mut members = [Member::V5(c5), Member::V3(c3)];
    let got = collect(&mut members, 2).await;
    assert_eq!(got, vec![vec!["ok".to_string()], vec!["ok".to_string()]]);
}

// ---------------------------------------------------------------------------
// Shared subscriptions: a member going away
// ---------------------------------------------------------------------------

#[tokio::test]
async fn shared_messages_of_a_member_that_goes_offline_go_to_an_online_member() {
    let b = start(BrokerConfig::default()).await;
    // Member a: persistent, in-flight window of 1 (Receive Maximum), so most
    // of what it is given waits in its queue.
    let a_connect = v5::Connect {
        receive_max: NonZeroU16::new(1),
        ..persistent("off-a")
    };
    let (mut a, _) = RawV5::connect(b.addr, a_connect.clone()).await;
    assert_eq!(
        a.subscribe(&[("$share/g/work", opts(1))], None).await,
        vec![GrantedQos1]
    );
    let (mut bm, _) = RawV5::connect(b.addr, persistent("off-b")).await;
    assert_eq!(
        bm.subscribe(&[("$share/g/work", opts(1))], None).await,
        vec![GrantedQos1]
    );
    let (mut publisher, _) = RawV5::connect(b.addr, connect("off-pub")).await;
    let first = numbered("first-", 10);
    for (i, m) in first.iter().enumerate() {
        assert_eq!(
            publisher.publish(publish("work", m, 1, i as u16 + 1)).await,
            Some(Success)
        );
    }
    // a holds one message in flight, unacknowledged, and goes away.
    let held = a.recv_publish().await;
    a.drop_socket();

    // What a had queued but not sent goes to b, which is online.
    let mut b_members = [Member::V5(bm)];
    let mut at_b = collect(&mut b_members, 9).await.remove(0);
    wait_offline(&b, "off-a").await;

    // With a offline, every new message goes to b.
    let second = numbered("second-", 10);
    for (i, m) in second.iter().enumerate() {
        assert_eq!(
            publisher
                .publish(publish("work", m, 1, i as u16 + 11))
                .await,
            Some(Success)
        );
    }
    let at_b2 = collect(&mut b_members, 10).await.remove(0);
    assert_eq!(at_b2, second, "all of them, in order, to the online member");
    at_b.extend(at_b2);

    // a gets back the message it had in flight (MQTT 5 section 4.8.2), and
    // nothing else.
    let (mut a, ack) = RawV5::connect(b.addr, a_connect).await;
    assert!(ack.session_present);
    let again = a.recv_and_ack().await;
    assert_eq!(payload(&again), payload(&held));
    assert!(again.dup, "a retransmission has DUP set");
    assert_quiet(&mut a, "off-a").await;

    let all: Vec<String> = first.iter().chain(&second).cloned().collect();
    let held = payload(&held);
    assert_each_once(at_b.iter().chain([&held]), &all);
}

#[tokio::test]
async fn shared_messages_queued_for_an_ended_session_go_to_the_remaining_member() {
    let b = start(BrokerConfig::default()).await;
    // Both members persistent: a speaks MQTT 3.1.1 (clean session 0), b MQTT 5.
    let (mut a, _) = RawClient::connect(b.addr, "end-a", false).await;
    a.subscribe("$share/g/end", 1).await;
    let (mut bm, _) = RawV5::connect(b.addr, persistent("end-b")).await;
    assert_eq!(
        bm.subscribe(&[("$share/g/end", opts(1))], None).await,
        vec![GrantedQos1]
    );
    a.disconnect().await;
    bm.disconnect().await;
    wait_offline(&b, "end-a").await;
    wait_offline(&b, "end-b").await;

    // With no member online, the messages queue on both members.
    let (mut publisher, _) = RawV5::connect(b.addr, connect("end-pub")).await;
    let sent = numbered("end-", 10);
    for (i, m) in sent.iter().enumerate() {
        assert_eq!(
            publisher.publish(publish("end", m, 1, i as u16 + 1)).await,
            Some(Success)
        );
    }

    // b comes back: it gets what was queued for it. a's session still exists,
    // so (by the broker's design) a's share waits for a.
    let (bm, ack) = RawV5::connect(b.addr, persistent("end-b")).await;
    assert!(ack.session_present);
    let mut b_members = [Member::V5(bm)];
    let mut at_b = collect(&mut b_members, 5).await.remove(0);

    // a starts a clean session: its old session ends, and the messages it
    // had queued go to b.
    let (mut a, present) = RawClient::connect(b.addr, "end-a", true).await;
    assert!(!present);
    at_b.extend(collect(&mut b_members, 5).await.remove(0));
    assert_each_once(&at_b, &sent);
    assert_quiet_v3(&mut a, "end-a").await;
}

#[tokio::test]
async fn shared_messages_queued_for_a_member_that_unsubscribes_go_to_another() {
    let b = start(BrokerConfig::default()).await;
    // a takes one message at a time (Receive Maximum 1), so the rest of its
    // share waits in its queue.
    let (mut a, _) = RawV5::connect(
        b.addr,
        v5::Connect {
            receive_max: NonZeroU16::new(1),
            ..connect("unsub-a")
        },
    )
    .await;
    assert_eq!(
        a.subscribe(&[("$share/g/u", opts(1))], None).await,
        vec![GrantedQos1]
    );
    let mut others = [Member::v3(b.addr, "unsub-b", "$share/g/u", true).await];

    let (mut publisher, _) = RawV5::connect(b.addr, connect("unsub-pub")).await;
    let sent = numbered("u-", 10);
    for (i, m) in sent.iter().enumerate() {
        assert_eq!(
            publisher.publish(publish("u", m, 1, i as u16 + 1)).await,
            Some(Success)
        );
    }
    let held = a.recv_publish().await;
    assert_eq!(
        a.unsubscribe(&["$share/g/u"]).await,
        vec![v5::UnsubscribeAckReason::Success]
    );
    ack_v5(&mut a, &held).await;

    // b gets its own share and what a had not been sent.
    let at_b = collect(&mut others, 9).await.remove(0);
    let held = payload(&held);
    assert_each_once(at_b.iter().chain([&held]), &sent);
    assert_quiet(&mut a, "unsub-a").await;
}

#[tokio::test]
async fn shared_message_in_flight_to_an_expired_session_goes_to_another_member() {
    let b = start(BrokerConfig::default()).await;
    // a: session expiry 1 s, one message in flight at a time, subscription id 7.
    let (mut a, _) = RawV5::connect(
        b.addr,
        v5::Connect {
            session_expiry_interval_secs: 1,
            receive_max: NonZeroU16::new(1),
            ..persistent("exp-a")
        },
    )
    .await;
    assert_eq!(
        a.subscribe(&[("$share/g/exp", opts(1))], Some(7)).await,
        vec![GrantedQos1]
    );
    // bm: online throughout, subscription id 42.
    let (mut bm, _) = RawV5::connect(b.addr, connect("exp-b")).await;
    assert_eq!(
        bm.subscribe(&[("$share/g/exp", opts(1))], Some(42)).await,
        vec![GrantedQos1]
    );
    let (mut publisher, _) = RawV5::connect(b.addr, connect("exp-pub")).await;
    let sent = numbered("exp-", 10);
    for (i, m) in sent.iter().enumerate() {
        assert_eq!(
            publisher.publish(publish("exp", m, 1, i as u16 + 1)).await,
            Some(Success)
        );
    }
    let held = a.recv_publish().await;
    assert_eq!(ids(&held), vec![7]);
    a.drop_socket();

    // At once: bm's share and what a had queued. Later, when a's session
    // expires: the message a never acknowledged. Each carries bm's own
    // subscription id, not a's.
    let mut at_b = Vec::new();
    for _ in 0..sent.len() {
        let p = bm.recv_and_ack().await;
        assert_eq!(ids(&p), vec![42], "{p:?}");
        at_b.push(payload(&p));
    }
    assert!(
        at_b.contains(&payload(&held)),
        "the unacknowledged message goes to bm once a's session ends"
    );
    assert_each_once(&at_b, &sent);
    assert_quiet(&mut bm, "exp-b").await;
}

// ---------------------------------------------------------------------------
// MQTT 3.1.1 and MQTT 5 together
// ---------------------------------------------------------------------------

/// A binary payload: every byte value, repeated to 64 KiB, after a tag.
fn binary(tag: &str) -> Vec<u8> {
    let mut b = tag.as_bytes().to_vec();
    b.extend((0..=255u8).cycle().take(64 * 1024));
    b
}

#[tokio::test]
async fn mqtt311_and_mqtt5_clients_exchange_messages_at_every_qos() {
    let b = start(BrokerConfig::default()).await;
    let (mut v5sub, _) = RawV5::connect(b.addr, connect("mix-v5-sub")).await;
    assert_eq!(
        v5sub.subscribe(&[("mix/#", opts(2))], None).await,
        vec![GrantedQos2]
    );
    let (mut v3sub, _) = RawClient::connect(b.addr, "mix-v3-sub", true).await;
    assert_eq!(
        v3sub.subscribe("mix/#", 2).await,
        vec![v3::SubscribeReturnCode::Success(v3::QoS::ExactlyOnce)]
    );
    let (mut v3pub, _) = RawClient::connect(b.addr, "mix-v3-pub", true).await;
    let (mut v5pub, _) = RawV5::connect(b.addr, connect("mix-v5-pub")).await;

    for qos in 0..=2u8 {
        let wire_qos = v5::QoS::try_from(qos).expect("qos");

        // MQTT 3.1.1 -> both.
        let body = binary(&format!("v3-q{qos}"));
        v3pub.publish("mix/from-v3", &body, qos, false).await;
        let got = v5sub.recv_and_ack().await;
        assert_eq!(got.topic, "mix/from-v3");
        assert_eq!(&got.payload[..], &body[..], "v3 -> v5 payload at QoS {qos}");
        assert_eq!((got.qos, got.retain), (wire_qos, false));
        let props = got.properties.expect("MQTT 5 PUBLISH properties");
        assert!(props.user_properties.is_empty() && props.correlation_data.is_none());
        let got = v3sub.recv_and_ack().await;
        assert_eq!(&got.payload[..], &body[..], "v3 -> v3 payload at QoS {qos}");
        assert_eq!(got.qos, wire_qos);

        // MQTT 5 with properties and a topic alias -> both. The first
        // message sets alias 3, the others use it with an empty topic.
        let body = binary(&format!("v5-q{qos}"));
        let mut p = publish(
            if qos == 0 { "mix/from-v5" } else { "" },
            "",
            qos,
            u16::from(qos) * 10,
        );
        p.payload = Bytes::from(body.clone());
        p.properties = Some(v5::PublishProperties {
            topic_alias: NonZeroU16::new(3),
            user_properties: vec![("origin".into(), "v5".into())],
            content_type: Some("application/octet-stream".into()),
            response_topic: Some("mix/reply".into()),
            correlation_data: Some(Bytes::from_static(b"\x00\x01")),
            message_expiry_interval: NonZeroU32::new(300),
            ..v5::PublishProperties::default()
        });
        let reason = v5pub.publish(p).await;
        assert_eq!(reason, (qos > 0).then_some(Success));

        let got = v5sub.recv_and_ack().await;
        assert_eq!(got.topic, "mix/from-v5");
        assert_eq!(&got.payload[..], &body[..], "v5 -> v5 payload at QoS {qos}");
        assert_eq!(got.qos, wire_qos);
        let props = got.properties.expect("MQTT 5 PUBLISH properties");
        assert_eq!(props.user_properties, vec![("origin".into(), "v5".into())]);
        assert_eq!(
            props.content_type.as_deref(),
            Some("application/octet-stream")
        );
        assert_eq!(props.response_topic.as_deref(), Some("mix/reply"));
        assert_eq!(props.correlation_data.as_deref(), Some(&b"\x00\x01"[..]));
        assert!(props.message_expiry_interval.is_some());

        // The 3.1.1 subscriber gets the full topic name and the intact
        // payload, without any MQTT 5 property.
        let got = v3sub.recv_and_ack().await;
        assert_eq!(got.topic, "mix/from-v5", "topic alias resolved for v3");
        assert_eq!(&got.payload[..], &body[..], "v5 -> v3 payload at QoS {qos}");
        assert_eq!((got.qos, got.retain), (wire_qos, false));
        assert!(got.properties.is_none());
    }
    assert_quiet(&mut v5sub, "mix-v5-sub").await;
    assert_quiet_v3(&mut v3sub, "mix-v3-sub").await;
}

// ---------------------------------------------------------------------------
// rumqttc v5
// ---------------------------------------------------------------------------

fn r5_options(id: &str, port: u16, clean: bool) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_start(clean);
    o
}

/// A rumqttc v5 client whose event loop runs on a task forwarding every
/// incoming packet.
struct R5 {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<RPacket>,
    task: JoinHandle<()>,
}

impl R5 {
    fn start(options: MqttOptions) -> R5 {
        let (client, mut ev) = AsyncClient::new(options, 100);
        let (tx, rx) = mpsc::unbounded_channel();
        // Stop at the first error: polling again would reconnect.
        let task = tokio::spawn(async move {
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(p)) => {
                        if tx.send(p).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        });
        R5 { client, rx, task }
    }

    /// The next incoming packet `pick` accepts, skipping acknowledgements
    /// and pings, within `d`; `None` if there is none.
    async fn next_within<T>(
        &mut self,
        d: Duration,
        mut pick: impl FnMut(&RPacket) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + d;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) => return None,
                Ok(None) => panic!("the rumqttc connection ended"),
                Ok(Some(p)) => {
                    if let Some(t) = pick(&p) {
                        return Some(t);
                    }
                    match p {
                        RPacket::PubAck(_)
                        | RPacket::PubRec(_)
                        | RPacket::PubComp(_)
                        | RPacket::PingResp(_) => {}
                        other => panic!("unexpected packet {other:?}"),
                    }
                }
            }
        }
    }

    /// CONNACK's session present flag.
    async fn connack(&mut self) -> bool {
        let ack = self
            .next_within(WAIT, |p| match p {
                RPacket::ConnAck(a) => Some(a.clone()),
                _ => None,
            })
            .await
            .expect("CONNACK");
        assert_eq!(
            ack.code,
            rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success
        );
        ack.session_present
    }

    async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, RQoS::AtLeastOnce)
            .await
            .expect("subscribe request");
        let codes = self
            .next_within(WAIT, |p| match p {
                RPacket::SubAck(a) => Some(a.return_codes.clone()),
                _ => None,
            })
            .await
            .expect("SUBACK");
        assert_eq!(codes, vec![SubscribeReasonCode::Success(RQoS::AtLeastOnce)]);
    }

    async fn try_publish(&mut self, d: Duration) -> Option<RPublish> {
        self.next_within(d, |p| match p {
            RPacket::Publish(p) => Some(p.clone()),
            _ => None,
        })
        .await
    }

    async fn publish(&mut self) -> RPublish {
        self.try_publish(WAIT).await.expect("a PUBLISH")
    }

    async fn stop(self) {
        self.client.disconnect().await.expect("disconnect request");
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("event loop ends after DISCONNECT")
            .expect("event loop task");
    }
}

fn text(b: &Bytes) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn rumqttc_v5_request_response_round_trip() {
    let b = start(BrokerConfig::default()).await;
    let port = b.addr.port();
    let mut responder = R5::start(r5_options("r5-responder", port, true));
    assert!(!responder.connack().await);
    responder.subscribe("svc/echo").await;
    let mut requester = R5::start(r5_options("r5-requester", port, true));
    assert!(!requester.connack().await);
    requester.subscribe("reply/r5-requester").await;

    let user_properties = vec![
        ("trace".to_string(), "abc".to_string()),
        ("trace".to_string(), "def".to_string()),
        ("tenant".to_string(), "t1".to_string()),
    ];
    let request = RProps {
        response_topic: Some("reply/r5-requester".into()),
        correlation_data: Some(Bytes::from_static(b"\x00req-42")),
        user_properties: user_properties.clone(),
        content_type: Some("text/plain".into()),
        ..RProps::default()
    };
    requester
        .client
        .publish_with_properties("svc/echo", RQoS::AtLeastOnce, false, "ping", request)
        .await
        .expect("publish request");

    let req = responder.publish().await;
    assert_eq!(
        (text(&req.topic), text(&req.payload)),
        ("svc/echo".into(), "ping".into())
    );
    let props = req.properties.expect("request properties");
    assert_eq!(props.response_topic.as_deref(), Some("reply/r5-requester"));
    assert_eq!(props.correlation_data.as_deref(), Some(&b"\x00req-42"[..]));
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    // User properties keep their order (MQTT-3.3.2-18).
    assert_eq!(props.user_properties, user_properties);

    let reply = RProps {
        correlation_data: props.correlation_data.clone(),
        ..RProps::default()
    };
    let response_topic = props.response_topic.expect("response topic");
    responder
        .client
        .publish_with_properties(response_topic, RQoS::AtLeastOnce, false, "pong", reply)
        .await
        .expect("publish reply");

    let got = requester.publish().await;
    assert_eq!(
        (text(&got.topic), text(&got.payload)),
        ("reply/r5-requester".into(), "pong".into())
    );
    let props = got.properties.expect("reply properties");
    assert_eq!(props.correlation_data.as_deref(), Some(&b"\x00req-42"[..]));
    assert!(requester.try_publish(QUIET).await.is_none());
    assert!(responder.try_publish(QUIET).await.is_none());
    requester.stop().await;
    responder.stop().await;
}

#[tokio::test]
async fn rumqttc_v5_persistent_session_receives_its_offline_backlog_in_order() {
    let b = start(BrokerConfig::default()).await;
    let mut options = r5_options("r5-persist", b.addr.port(), false);
    options.set_session_expiry_interval(Some(60));

    let mut c = R5::start(options.clone());
    assert!(!c.connack().await, "no session yet");
    c.subscribe("backlog/t").await;
    c.stop().await;
    wait_offline(&b, "r5-persist").await;

    let (mut publisher, _) = RawV5::connect(b.addr, connect("r5-backlog-pub")).await;
    let sent = numbered("b", 50);
    for (i, m) in sent.iter().enumerate() {
        assert_eq!(
            publisher
                .publish(publish("backlog/t", m, 1, i as u16 + 1))
                .await,
            Some(Success),
            "the offline session's subscription matches"
        );
    }

    let mut c = R5::start(options);
    assert!(c.connack().await, "the session was kept");
    let mut got = Vec::new();
    for _ in 0..sent.len() {
        let p = c.publish().await;
        assert_eq!(text(&p.topic), "backlog/t");
        assert_eq!(p.qos, RQoS::AtLeastOnce);
        got.push(text(&p.payload));
    }
    assert_eq!(got, sent);
    assert!(c.try_publish(QUIET).await.is_none());
    c.stop().await;
}

#[tokio::test]
async fn online_members_share_equally_while_another_is_offline() {
    let b = start(BrokerConfig::default()).await;
    // f-a joins with a persistent session, then goes offline: it must not
    // skew the split between the two members that stay.
    let (mut away, _) = RawV5::connect(b.addr, persistent("f-a")).await;
    away.subscribe(&[("$share/f/fair", opts(1))], None).await;
    away.drop_socket();
    wait_offline(&b, "f-a").await;
    let mut members = vec![
        Member::v5(b.addr, "f-b", "$share/f/fair").await,
        Member::v3(b.addr, "f-c", "$share/f/fair", true).await,
    ];
    let sent = numbered("fair-", 30);
    let (mut publisher, _) = RawV5::connect(b.addr, connect("fair-pub")).await;
    for (i, m) in sent.iter().enumerate() {
        publish_ok(&mut publisher, publish("fair", m, 1, i as u16 + 1)).await;
    }
    let got = collect(&mut members, sent.len()).await;
    assert_each_once(got.iter().flatten(), &sent);
    assert_eq!(
        got.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![15, 15],
        "round-robin over the online members only"
    );
}
