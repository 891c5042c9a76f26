//! MQTT 5 session lifetime over raw packets: session expiry (at CONNECT and
//! changed at DISCONNECT), clean start, message expiry (across a restart
//! too), will delay and will properties, server keep alive, session takeover
//! and shutdown, each with the DISCONNECT reason code the client is told.

mod common;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use broker_core::config::BrokerConfig;
use broker_core::internals::codec::{v5, Publish};
use bytes::Bytes;
use bytestring::ByteString;
use common::v5::{connect, opts, payload, publish, will, Packet, RawV5};
use common::{start, start_with, TestBroker, WAIT};
use storage_memory::MemoryStore;
use tokio::time::Instant;

use v5::DisconnectReasonCode as D;

/// A CONNECT for `id` with this clean start flag and session expiry interval.
fn session(id: &str, clean_start: bool, expiry: u32) -> v5::Connect {
    v5::Connect {
        clean_start,
        session_expiry_interval_secs: expiry,
        ..connect(id)
    }
}

/// A QoS 1 PUBLISH with an optional Message Expiry Interval.
fn expiring(topic: &str, body: &str, packet_id: u16, expiry: Option<u32>) -> Publish {
    let mut p = publish(topic, body, 1, packet_id);
    p.properties
        .as_mut()
        .expect("publish() sets properties")
        .message_expiry_interval = expiry.and_then(NonZeroU32::new);
    p
}

/// The Message Expiry Interval a delivery carries.
fn expiry_of(p: &Publish) -> Option<u32> {
    p.properties
        .as_ref()
        .and_then(|props| props.message_expiry_interval)
        .map(NonZeroU32::get)
}

/// A broker on a memory store the test can inspect.
async fn start_inspectable(config: BrokerConfig) -> (TestBroker, Arc<MemoryStore>) {
    let store = Arc::new(MemoryStore::new());
    let b = start_with(config, store.storage()).await;
    (b, store)
}

/// Poll `cond` every 20 ms until it holds; false if `within` passes first.
async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait until the broker has detached the connection of `id` (its session
/// may stay or go): later steps must not race the broker's disconnect.
async fn until_offline(b: &TestBroker, id: &str) {
    let offline = eventually(WAIT, || b.broker.session(id).is_none_or(|s| !s.online)).await;
    assert!(offline, "the broker still sees {id} connected");
}

/// Publish with QoS 1 from a short-lived client and return the PUBACK reason.
async fn publish_once(b: &TestBroker, p: Publish) -> v5::PublishAckReason {
    let (mut publisher, _) = RawV5::connect(b.addr, connect("publisher")).await;
    let reason = publisher.publish(p).await.expect("QoS 1 has a PUBACK");
    publisher.disconnect().await;
    reason
}

/// A v5 client subscribed to `filter` at QoS 1, to watch for wills.
async fn watcher(b: &TestBroker, id: &str, filter: &str) -> RawV5 {
    let (mut w, _) = RawV5::connect(b.addr, connect(id)).await;
    assert_eq!(
        w.subscribe(&[(filter, opts(1))], None).await,
        vec![v5::SubscribeAckReason::GrantedQos1]
    );
    w
}

#[tokio::test]
async fn session_with_expiry_zero_ends_with_the_connection() {
    let (b, store) = start_inspectable(BrokerConfig::default()).await;
    let (mut c, ack) = RawV5::connect(b.addr, session("zero", false, 0)).await;
    assert!(!ack.session_present);
    c.subscribe(&[("zero/#", opts(1))], None).await;
    c.disconnect().await;
    until_offline(&b, "zero").await;
    assert!(b.broker.session("zero").is_none(), "expiry 0 keeps nothing");

    // Nobody holds the subscription any more, so nothing is queued.
    assert_eq!(
        publish_once(&b, publish("zero/1", "lost", 1, 1)).await,
        v5::PublishAckReason::NoMatchingSubscribers
    );
    assert_eq!(store.queued_packets(), 0);

    let (mut c, ack) = RawV5::connect(b.addr, session("zero", false, 0)).await;
    assert!(!ack.session_present, "no session to resume");
    assert!(c.try_recv(Duration::from_millis(300)).await.is_none());
}

#[tokio::test]
async fn session_with_expiry_survives_disconnect_then_expires() {
    let (b, store) = start_inspectable(BrokerConfig::default()).await;
    let (mut c, ack) = RawV5::connect(b.addr, session("lasting", true, 2)).await;
    assert!(!ack.session_present);
    c.subscribe(&[("lasting/#", opts(1))], None).await;
    c.disconnect().await;
    until_offline(&b, "lasting").await;

    // Offline within the interval: QoS 1 messages are kept, in order.
    for (i, body) in ["one", "two", "three"].iter().enumerate() {
        let p = publish("lasting/x", body, 1, i as u16 + 1);
        assert_eq!(publish_once(&b, p).await, v5::PublishAckReason::Success);
    }
    let (mut c, ack) = RawV5::connect(b.addr, session("lasting", false, 2)).await;
    assert!(ack.session_present);
    for body in ["one", "two", "three"] {
        assert_eq!(payload(&c.recv_and_ack().await), body);
    }
    assert!(c.try_recv(Duration::from_millis(200)).await.is_none());

    // Offline past the interval: the session and what it queued are dropped.
    c.disconnect().await;
    until_offline(&b, "lasting").await;
    let gone_from = Instant::now();
    let p = publish("lasting/x", "too late", 1, 9);
    assert_eq!(publish_once(&b, p).await, v5::PublishAckReason::Success);
    // The acknowledged ones leave the store; this one waits in it.
    assert!(eventually(WAIT, || store.queued_packets() == 1).await);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        b.broker.session("lasting").is_some(),
        "expired before its 2 s interval"
    );
    let expired = eventually(Duration::from_secs(4), || {
        b.broker.session("lasting").is_none()
    })
    .await;
    assert!(expired, "session still there 5 s after a 2 s expiry");
    let after = gone_from.elapsed();
    assert!(
        after >= Duration::from_millis(1800),
        "expired after {after:?}"
    );
    assert!(eventually(WAIT, || store.queued_packets() == 0).await);

    let (mut c, ack) = RawV5::connect(b.addr, session("lasting", false, 2)).await;
    assert!(!ack.session_present, "the expired session was resumed");
    assert!(c.try_recv(Duration::from_millis(300)).await.is_none());
}

#[tokio::test]
async fn reconnecting_after_the_expiry_interval_finds_no_session() {
    // A session lasts as long as its connection plus the interval (MQTT 5
    // section 4.1): coming back 1.25 s after a 1 s expiry must start afresh.
    // The five sessions are staggered by 200 ms so that, whatever the phase
    // of a periodic cleanup, it cannot have run in every one of the 0.25 s
    // gaps: the test cannot pass by luck.
    let b = start(BrokerConfig::default()).await;
    let ids: Vec<String> = (0..5).map(|i| format!("late-{i}")).collect();
    let mut clients = Vec::new();
    for id in &ids {
        let (mut c, _) = RawV5::connect(b.addr, session(id, true, 1)).await;
        c.subscribe(&[("late/#", opts(1))], None).await;
        clients.push(c);
    }
    let mut offline_at = Vec::new();
    for (i, (id, c)) in ids.iter().zip(clients).enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        c.disconnect().await;
        until_offline(&b, id).await;
        offline_at.push(Instant::now());
    }
    let mut resumed = Vec::new();
    for (id, at) in ids.iter().zip(offline_at) {
        tokio::time::sleep_until(at + Duration::from_millis(1250)).await;
        let (_c, ack) = RawV5::connect(b.addr, session(id, false, 1)).await;
        if ack.session_present {
            resumed.push((id.clone(), at.elapsed()));
        }
    }
    assert!(
        resumed.is_empty(),
        "sessions resumed after their 1 s expiry (id, time offline): {resumed:?}"
    );
}

#[tokio::test]
async fn disconnect_cannot_extend_the_session_past_the_broker_maximum() {
    // The broker lowered the client's 60 s to its maximum and said so in
    // CONNACK; a larger interval at DISCONNECT is a request like any other.
    let config = BrokerConfig {
        max_session_expiry_secs: Some(1),
        ..BrokerConfig::default()
    };
    let b = start(config).await;
    let (c, ack) = RawV5::connect(b.addr, session("capped", true, 60)).await;
    assert_eq!(ack.session_expiry_interval_secs, Some(1));
    c.disconnect_with(D::NormalDisconnection, Some(3600)).await;
    until_offline(&b, "capped").await;
    let gone = eventually(Duration::from_secs(4), || {
        b.broker.session("capped").is_none()
    })
    .await;
    assert!(gone, "session kept past the broker's 1 s maximum");
    let (_c, ack) = RawV5::connect(b.addr, session("capped", false, 60)).await;
    assert!(!ack.session_present);
}

#[tokio::test]
async fn disconnect_can_lower_the_session_expiry_to_zero() {
    let b = start(BrokerConfig::default()).await;
    let (mut c, _) = RawV5::connect(b.addr, session("lower", true, 60)).await;
    c.subscribe(&[("lower/#", opts(1))], None).await;
    c.disconnect_with(D::NormalDisconnection, Some(0)).await;
    until_offline(&b, "lower").await;
    // Discarded at the disconnect, not 60 s later.
    assert!(b.broker.session("lower").is_none());
    assert_eq!(
        publish_once(&b, publish("lower/1", "x", 1, 1)).await,
        v5::PublishAckReason::NoMatchingSubscribers
    );
    let (_c, ack) = RawV5::connect(b.addr, session("lower", false, 60)).await;
    assert!(!ack.session_present);
}

#[tokio::test]
async fn disconnect_cannot_raise_a_zero_session_expiry() {
    let b = start(BrokerConfig::default()).await;
    let (mut c, _) = RawV5::connect(b.addr, session("raise", true, 0)).await;
    c.subscribe(&[("raise/#", opts(1))], None).await;
    // MQTT 5 section 3.14.2.2.2: a protocol error when CONNECT said 0.
    c.send(Packet::Disconnect(v5::Disconnect {
        reason_code: D::NormalDisconnection,
        session_expiry_interval_secs: Some(60),
        ..v5::Disconnect::default()
    }))
    .await;
    let d = c.expect_disconnect().await;
    assert_eq!(d.reason_code, D::ProtocolError);
    until_offline(&b, "raise").await;
    assert!(b.broker.session("raise").is_none(), "expiry 60 was applied");
    let (_c, ack) = RawV5::connect(b.addr, session("raise", false, 60)).await;
    assert!(!ack.session_present);
}

#[tokio::test]
async fn clean_start_discards_the_old_session_but_keeps_the_new_one() {
    let (b, store) = start_inspectable(BrokerConfig::default()).await;
    let (mut c, _) = RawV5::connect(b.addr, session("fresh", true, 60)).await;
    c.subscribe(&[("old/#", opts(1))], None).await;
    c.disconnect().await;
    until_offline(&b, "fresh").await;
    let p = publish("old/1", "stale", 1, 1);
    assert_eq!(publish_once(&b, p).await, v5::PublishAckReason::Success);

    let (mut c, ack) = RawV5::connect(b.addr, session("fresh", true, 60)).await;
    assert!(!ack.session_present, "clean start resumed the old session");
    assert!(c.try_recv(Duration::from_millis(300)).await.is_none());
    assert!(eventually(WAIT, || store.queued_packets() == 0).await);
    // The old subscription went with the old session.
    assert_eq!(
        publish_once(&b, publish("old/2", "x", 1, 2)).await,
        v5::PublishAckReason::NoMatchingSubscribers
    );

    // The new session has expiry 60 of its own and outlives this connection.
    c.subscribe(&[("new/#", opts(1))], None).await;
    c.disconnect().await;
    until_offline(&b, "fresh").await;
    let p = publish("new/1", "kept", 1, 3);
    assert_eq!(publish_once(&b, p).await, v5::PublishAckReason::Success);
    let (mut c, ack) = RawV5::connect(b.addr, session("fresh", false, 60)).await;
    assert!(ack.session_present);
    assert_eq!(payload(&c.recv_and_ack().await), "kept");
    assert!(c.try_recv(Duration::from_millis(200)).await.is_none());
}

#[tokio::test]
async fn expired_messages_are_not_delivered_and_the_rest_carry_what_remains() {
    let (b, store) = start_inspectable(BrokerConfig::default()).await;
    let (mut sub, _) = RawV5::connect(b.addr, session("exp-sub", true, 60)).await;
    sub.subscribe(&[("exp/#", opts(1))], None).await;
    sub.disconnect().await;
    until_offline(&b, "exp-sub").await;

    let (mut publisher, _) = RawV5::connect(b.addr, connect("exp-pub")).await;
    for (i, (body, expiry)) in [("short", Some(1)), ("forever", None), ("long", Some(100))]
        .into_iter()
        .enumerate()
    {
        let p = expiring("exp/t", body, i as u16 + 1, expiry);
        assert_eq!(
            publisher.publish(p).await,
            Some(v5::PublishAckReason::Success)
        );
    }
    let published = Instant::now();
    assert_eq!(store.queued_packets(), 3);
    // Back after the 1 s message expired.
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let (mut sub, ack) = RawV5::connect(b.addr, session("exp-sub", false, 60)).await;
    assert!(ack.session_present);
    let first = sub.recv_and_ack().await;
    assert_eq!(payload(&first), "forever", "the expired message arrived");
    assert_eq!(expiry_of(&first), None);
    let second = sub.recv_and_ack().await;
    assert_eq!(payload(&second), "long");
    let left = expiry_of(&second).expect("expiry interval kept");
    // MQTT 5 section 3.3.2.3.3: the interval minus the time spent waiting,
    // here more than 2 s (rounded up, the broker's choice).
    assert!(
        (90..=98).contains(&left),
        "remaining {left} after {:?}",
        published.elapsed()
    );
    assert!(sub.try_recv(Duration::from_millis(300)).await.is_none());
    // The expired entry left the store too.
    assert!(eventually(WAIT, || store.queued_packets() == 0).await);
}

#[tokio::test]
async fn message_expiry_counts_across_a_restart() {
    let config = BrokerConfig::default();
    let (b, store) = start_inspectable(config.clone()).await;
    let (mut sub, _) = RawV5::connect(b.addr, session("r-sub", true, 300)).await;
    sub.subscribe(&[("r/#", opts(1))], None).await;
    sub.disconnect().await;
    until_offline(&b, "r-sub").await;

    let (mut publisher, _) = RawV5::connect(b.addr, connect("r-pub")).await;
    for (i, (body, expiry)) in [("short", Some(1)), ("long", Some(100)), ("forever", None)]
        .into_iter()
        .enumerate()
    {
        let p = expiring("r/t", body, i as u16 + 1, expiry);
        assert_eq!(
            publisher.publish(p).await,
            Some(v5::PublishAckReason::Success)
        );
    }
    let published = Instant::now();
    assert_eq!(store.queued_packets(), 3);
    drop(publisher);
    let storage = b.stop().await;
    // Down long enough for the 1 s message to expire.
    tokio::time::sleep(Duration::from_millis(1300)).await;

    let b = start_with(config, storage).await;
    let (mut sub, ack) = RawV5::connect(b.addr, session("r-sub", false, 300)).await;
    assert!(
        ack.session_present,
        "the session did not survive the restart"
    );
    let first = sub.recv_and_ack().await;
    assert_eq!(payload(&first), "long", "the expired message arrived");
    // More than 1.3 s have passed since it was published, down time included.
    let left = expiry_of(&first).expect("expiry interval kept");
    assert!(
        (90..=99).contains(&left),
        "remaining {left} after {:?}",
        published.elapsed()
    );
    let second = sub.recv_and_ack().await;
    assert_eq!(payload(&second), "forever");
    assert_eq!(expiry_of(&second), None);
    assert!(sub.try_recv(Duration::from_millis(300)).await.is_none());
    assert!(eventually(WAIT, || store.queued_packets() == 0).await);
}

#[tokio::test]
async fn will_delay_is_cancelled_by_a_reconnect_in_time() {
    let b = start(BrokerConfig::default()).await;
    let mut watch = watcher(&b, "watch", "will/#").await;
    let mut c = session("flaky", true, 60);
    c.last_will = Some(v5::LastWill {
        will_delay_interval_sec: Some(2),
        ..will("will/flaky", "gone")
    });
    let (client, _) = RawV5::connect(b.addr, c).await;
    client.drop_socket();
    until_offline(&b, "flaky").await;

    // Back within the 2 s delay: the will must never be published.
    let (client, ack) = RawV5::connect(b.addr, session("flaky", false, 60)).await;
    assert!(ack.session_present);
    // This connection has no will, so a normal DISCONNECT publishes nothing.
    client.disconnect().await;
    let got = watch.try_recv(Duration::from_millis(2800)).await;
    assert!(
        got.is_none(),
        "will published despite the reconnect: {got:?}"
    );
}

#[tokio::test]
async fn will_is_published_after_its_delay() {
    let b = start(BrokerConfig::default()).await;
    let mut watch = watcher(&b, "watch", "will/#").await;
    let mut c = session("lost", true, 60);
    c.last_will = Some(v5::LastWill {
        will_delay_interval_sec: Some(2),
        ..will("will/lost", "gone")
    });
    let (client, _) = RawV5::connect(b.addr, c).await;
    client.drop_socket();
    let dropped = Instant::now();

    let early = watch.try_recv(Duration::from_millis(1200)).await;
    assert!(
        early.is_none(),
        "will published before its delay: {early:?}"
    );
    let w = watch.recv_and_ack().await;
    let after = dropped.elapsed();
    assert_eq!(w.topic, "will/lost");
    assert_eq!(payload(&w), "gone");
    assert!(
        after >= Duration::from_millis(1800) && after <= Duration::from_secs(4),
        "will published {after:?} after the connection dropped"
    );
}

#[tokio::test]
async fn will_is_published_when_the_session_ends_before_the_delay() {
    let b = start(BrokerConfig::default()).await;
    let mut watch = watcher(&b, "watch", "will/#").await;
    let mut c = session("short-lived", true, 1);
    c.last_will = Some(v5::LastWill {
        will_delay_interval_sec: Some(60),
        ..will("will/short", "session over")
    });
    let (client, _) = RawV5::connect(b.addr, c).await;
    client.drop_socket();
    let dropped = Instant::now();

    // The 1 s session ends long before the 60 s delay, and the will with it.
    let w = watch.recv_and_ack().await;
    let after = dropped.elapsed();
    assert_eq!(payload(&w), "session over");
    assert!(
        after >= Duration::from_millis(800) && after <= Duration::from_secs(4),
        "will published {after:?} after the connection dropped"
    );
    let gone = eventually(Duration::from_secs(3), || {
        b.broker.session("short-lived").is_none()
    })
    .await;
    assert!(gone, "session still there after its 1 s expiry");
}

#[tokio::test]
async fn will_is_published_at_once_when_the_session_ends_with_the_connection() {
    let b = start(BrokerConfig::default()).await;
    let mut watch = watcher(&b, "watch", "will/#").await;
    let mut c = session("brief", true, 0);
    c.last_will = Some(v5::LastWill {
        will_delay_interval_sec: Some(60),
        ..will("will/brief", "bye")
    });
    let (client, _) = RawV5::connect(b.addr, c).await;
    client.drop_socket();
    match watch.try_recv(Duration::from_millis(1000)).await {
        Some(Packet::Publish(p)) => assert_eq!(payload(&p), "bye"),
        other => panic!("expected the will within 1 s, got {other:?}"),
    }
}

#[tokio::test]
async fn only_disconnect_with_will_message_publishes_the_will() {
    let b = start(BrokerConfig::default()).await;
    let mut watch = watcher(&b, "watch", "will/#").await;

    let mut c = session("polite", true, 0);
    c.last_will = Some(will("will/polite", "normal"));
    let (client, _) = RawV5::connect(b.addr, c).await;
    client.disconnect_with(D::NormalDisconnection, None).await;
    until_offline(&b, "polite").await;

    let mut c = session("asking", true, 0);
    c.last_will = Some(will("will/asking", "with will"));
    let (client, _) = RawV5::connect(b.addr, c).await;
    client
        .disconnect_with(D::DisconnectWithWillMessage, None)
        .await;

    // Had the normal DISCONNECT published its will, it would come first.
    let w = watch.recv_and_ack().await;
    assert_eq!(w.topic, "will/asking");
    assert_eq!(payload(&w), "with will");
    let more = watch.try_recv(Duration::from_millis(700)).await;
    assert!(more.is_none(), "unexpected: {more:?}");
}

#[tokio::test]
async fn will_properties_reach_a_v5_subscriber() {
    let b = start(BrokerConfig::default()).await;
    let mut watch = watcher(&b, "watch", "will/#").await;
    let user_properties = vec![
        (ByteString::from("k"), ByteString::from("v1")),
        (ByteString::from("k"), ByteString::from("v2")),
        (ByteString::from("other"), ByteString::from("x")),
    ];
    let mut c = session("propertied", true, 0);
    c.last_will = Some(v5::LastWill {
        content_type: Some(ByteString::from("text/plain")),
        response_topic: Some(ByteString::from("will/replies")),
        correlation_data: Some(Bytes::from_static(b"\x00\x01corr")),
        user_properties: user_properties.clone(),
        is_utf8_payload: Some(true),
        message_expiry_interval: NonZeroU32::new(600),
        ..will("will/props", "déconnecté")
    });
    let (client, _) = RawV5::connect(b.addr, c).await;
    client.drop_socket();

    let w = watch.recv_and_ack().await;
    assert_eq!(w.topic, "will/props");
    assert_eq!(w.qos, v5::QoS::AtLeastOnce);
    assert_eq!(payload(&w), "déconnecté");
    let props = w.properties.expect("will properties");
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    assert_eq!(props.response_topic.as_deref(), Some("will/replies"));
    assert_eq!(
        props.correlation_data.as_deref(),
        Some(&b"\x00\x01corr"[..])
    );
    assert_eq!(props.user_properties, user_properties);
    assert!(props.is_utf8_payload, "payload format indicator lost");
    let left = props
        .message_expiry_interval
        .expect("message expiry lost")
        .get();
    assert!((598..=600).contains(&left), "remaining expiry {left}");
}

#[tokio::test]
async fn server_keep_alive_is_announced_and_enforced() {
    let config = BrokerConfig {
        max_keep_alive: Some(1),
        ..BrokerConfig::default()
    };
    let b = start(config).await;
    let (mut silent, ack) = RawV5::connect(b.addr, connect("silent")).await;
    let connected = Instant::now();
    assert_eq!(ack.server_keepalive_sec, Some(1));
    // Asking for more than the maximum is lowered the same way.
    let mut c = connect("pinging");
    c.keep_alive = 30;
    let (mut pinging, ack) = RawV5::connect(b.addr, c).await;
    assert_eq!(ack.server_keepalive_sec, Some(1));

    // 1.5 x the server's keep alive without a packet ends the connection;
    // a client pinging every 0.5 s meanwhile stays.
    let keep_pinging = async {
        for _ in 0..5 {
            pinging.send(Packet::PingRequest).await;
            match pinging.recv().await {
                Packet::PingResponse => {}
                other => panic!("expected PINGRESP, got {other:?}"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let timed_out = async {
        let d = silent.expect_disconnect().await;
        (d, connected.elapsed())
    };
    let ((d, after), ()) = tokio::join!(timed_out, keep_pinging);
    assert_eq!(d.reason_code, D::KeepAliveTimeout);
    assert!(
        after >= Duration::from_millis(1300) && after <= Duration::from_secs(3),
        "disconnected after {after:?}"
    );
    assert!(b.broker.session("pinging").is_some_and(|s| s.online));
}

#[tokio::test]
async fn session_takeover_tells_the_old_connection() {
    let b = start(BrokerConfig::default()).await;
    let (mut old, _) = RawV5::connect(b.addr, session("twin", true, 60)).await;
    old.subscribe(&[("twin/#", opts(1))], None).await;
    let (mut new, ack) = RawV5::connect(b.addr, session("twin", false, 60)).await;
    assert!(ack.session_present);
    let d = old.expect_disconnect().await;
    assert_eq!(d.reason_code, D::SessionTakenOver);
    // The session, subscription included, now belongs to the new connection.
    let p = publish("twin/1", "to the new one", 1, 1);
    assert_eq!(publish_once(&b, p).await, v5::PublishAckReason::Success);
    assert_eq!(payload(&new.recv_and_ack().await), "to the new one");
}

#[tokio::test]
async fn shutdown_tells_v5_clients() {
    let b = start(BrokerConfig::default()).await;
    let (mut c, _) = RawV5::connect(b.addr, connect("bystander")).await;
    b.broker.shutdown().await;
    let d = c.expect_disconnect().await;
    assert_eq!(d.reason_code, D::ServerShuttingDown);
}

#[tokio::test]
async fn shutdown_publishes_pending_wills_before_it_completes() {
    let config = BrokerConfig::default();
    let (b, _store) = start_inspectable(config.clone()).await;
    // A persistent subscriber, offline during the shutdown: it can only get
    // the wills if they were stored before the broker stopped.
    let (mut sub, _) = RawV5::connect(b.addr, session("heir", true, 300)).await;
    sub.subscribe(&[("gone/#", opts(1))], None).await;
    sub.disconnect().await;
    until_offline(&b, "heir").await;

    // One connected client with an immediate will, one with a long delay
    // whose connection already dropped (its timer is running).
    let mut now = session("online", true, 0);
    now.last_will = Some(will("gone/online", "online-will"));
    let (online, _) = RawV5::connect(b.addr, now).await;
    let mut later = session("delayed", true, 120);
    later.last_will = Some(v5::LastWill {
        will_delay_interval_sec: Some(60),
        ..will("gone/delayed", "delayed-will")
    });
    let (delayed, _) = RawV5::connect(b.addr, later).await;
    delayed.drop_socket();
    until_offline(&b, "delayed").await;

    let storage = b.stop().await;
    drop(online);
    let b = start_with(config, storage).await;
    let (mut sub, ack) = RawV5::connect(b.addr, session("heir", false, 300)).await;
    assert!(ack.session_present);
    let mut got = vec![
        payload(&sub.recv_and_ack().await),
        payload(&sub.recv_and_ack().await),
    ];
    got.sort();
    assert_eq!(got, vec!["delayed-will", "online-will"]);
    assert!(sub.try_recv(Duration::from_millis(300)).await.is_none());
}
