//! Where the published codec deviated from MQTT 5 / 3.1.1 and the patched
//! one (`vendor/rmqtt-codec/FORK.md`) does not: each case sends the exact
//! bytes over TCP and checks the reason code the client reads, next to a
//! well-formed twin that the broker accepts (so the check can fail).

mod common;

use broker_core::config::BrokerConfig;
use broker_core::internals::codec::{v3, v5};
use common::v5::{connect, opts, publish, Packet, RawV5};
use common::{start, RawClient};

use v5::ConnectAckReason as C;
use v5::DisconnectReasonCode as D;

/// A packet of `first` byte and `body` (remaining length < 128).
fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    assert!(body.len() < 128);
    let mut p = vec![first, body.len() as u8];
    p.extend_from_slice(body);
    p
}

/// An MQTT 5 CONNECT with Clean Start `clean`, these `props` and client `id`.
fn connect_v5(clean: bool, props: &[u8], id: &str) -> Vec<u8> {
    let mut body = b"\0\x04MQTT\x05".to_vec();
    // Connect flags, then Keep Alive 0.
    body.extend([if clean { 0x02 } else { 0 }, 0, 0]);
    body.push(props.len() as u8);
    body.extend_from_slice(props);
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    packet(0x10, &body)
}

/// The CONNACK a raw CONNECT gets.
async fn connack_for(addr: std::net::SocketAddr, bytes: &[u8]) -> (RawV5, v5::ConnectAck) {
    let mut c = RawV5::open(addr).await;
    c.send_bytes(bytes).await;
    match c.recv().await {
        Packet::ConnectAck(a) => (c, *a),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// An MQTT 5 SUBSCRIBE (packet id 7) of filter `a/b` with options byte `options`.
fn subscribe_v5(options: u8) -> Vec<u8> {
    packet(0x82, &[0, 7, 0, 0, 3, b'a', b'/', b'b', options])
}

#[tokio::test]
async fn v5_subscribe_options_reserved_bits_are_malformed_and_3s_a_protocol_error() {
    let b = start(BrokerConfig::default()).await;
    // Twin: QoS 1, Retain Handling 2, No Local, Retain As Published.
    let (mut ok, _) = RawV5::connect(b.addr, connect("opts-ok")).await;
    ok.send_bytes(&subscribe_v5(0b0010_1101)).await;
    match ok.recv().await {
        Packet::SubscribeAck(a) => assert_eq!(a.status, vec![v5::SubscribeAckReason::GrantedQos1]),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    let cases = [
        ("bit 6 (MQTT-3.8.3-5)", 0b0100_0001, D::MalformedPacket),
        ("bit 7 (MQTT-3.8.3-5)", 0b1000_0001, D::MalformedPacket),
        ("maximum QoS 3", 0b0000_0011, D::ProtocolError),
        ("retain handling 3", 0b0011_0001, D::ProtocolError),
    ];
    for (name, options, code) in cases {
        let (mut c, _) = RawV5::connect(b.addr, connect(&format!("opts-{options}"))).await;
        c.send_bytes(&subscribe_v5(options)).await;
        assert_eq!(c.expect_disconnect().await.reason_code, code, "{name}");
    }
}

#[tokio::test]
async fn v311_requested_qos_upper_bits_close_the_connection() {
    let b = start(BrokerConfig::default()).await;
    // SUBSCRIBE packet id 7, filter `a/b`, requested QoS byte `q`.
    let subscribe = |q: u8| packet(0x82, &[0, 7, 0, 3, b'a', b'/', b'b', q]);
    let (mut ok, _) = RawClient::connect(b.addr, "qos-ok", true).await;
    ok.send_bytes(&subscribe(0x01)).await;
    match ok.recv().await {
        v3::Packet::SubscribeAck { status, .. } => {
            assert_eq!(
                status,
                vec![v3::SubscribeReturnCode::Success(v3::QoS::AtLeastOnce)]
            )
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
    // Was granted at QoS 1 with the upper bits masked off (MQTT-3-8.3-4).
    for q in [0x41, 0x81, 0x05, 0xfd] {
        let (mut c, _) = RawClient::connect(b.addr, &format!("qos-{q}"), true).await;
        c.send_bytes(&subscribe(q)).await;
        c.expect_closed().await;
    }
}

#[tokio::test]
async fn v5_empty_client_id_with_clean_start_0_is_assigned_one() {
    let b = start(BrokerConfig::default()).await;
    // Session Expiry Interval 60: a session that outlives the connection.
    let expiry = [0x11, 0, 0, 0, 60];
    let (c, ack) = connack_for(b.addr, &connect_v5(false, &expiry, "")).await;
    assert_eq!(ack.reason_code, C::Success, "{ack:?}");
    assert!(!ack.session_present);
    let id = ack.assigned_client_id.clone().expect("assigned client id");
    assert!(!id.is_empty());
    c.disconnect().await;
    // The assigned id names a real session: reconnecting to it finds it.
    let mut again = connect(&id);
    again.clean_start = false;
    again.session_expiry_interval_secs = 60;
    let (_c, ack) = RawV5::connect(b.addr, again).await;
    assert!(ack.session_present, "{ack:?}");
    assert!(ack.assigned_client_id.is_none());
}

#[tokio::test]
async fn v311_empty_client_id_with_clean_session_0_is_still_rejected() {
    let b = start(BrokerConfig::default()).await;
    let (_c, code, _) = RawClient::connect_full(b.addr, "", true, 0, None).await;
    assert_eq!(code, v3::ConnectAckReason::ConnectionAccepted);
    let (mut c, code, _) = RawClient::connect_full(b.addr, "", false, 0, None).await;
    assert_eq!(code, v3::ConnectAckReason::IdentifierRejected);
    c.expect_closed().await;
}

#[tokio::test]
async fn v5_topic_alias_0_is_topic_alias_invalid() {
    let b = start(BrokerConfig {
        topic_alias_maximum: 10,
        ..BrokerConfig::default()
    })
    .await;
    // PUBLISH QoS 0, topic `a`, properties [Topic Alias (0x23) = n], payload `x`.
    let with_alias = |n: u8| packet(0x30, &[0, 1, b'a', 3, 0x23, 0, n, b'x']);
    let (mut sub, _) = RawV5::connect(b.addr, connect("alias-sub")).await;
    sub.subscribe(&[("a", opts(0))], None).await;
    let (mut c, _) = RawV5::connect(b.addr, connect("alias-pub")).await;
    c.send_bytes(&with_alias(1)).await;
    assert_eq!(common::v5::payload(&sub.recv_publish().await), "x");
    c.send_bytes(&with_alias(0)).await;
    let d = c.expect_disconnect().await;
    assert_eq!(d.reason_code, D::TopicAliasInvalid, "{d:?}");
}

#[tokio::test]
async fn v5_connect_receive_maximum_0_and_other_protocol_errors_get_connack_0x82() {
    let b = start(BrokerConfig::default()).await;
    // Twin: Receive Maximum 1.
    let (_c, ack) = connack_for(b.addr, &connect_v5(true, &[0x21, 0, 1], "rm-ok")).await;
    assert_eq!(ack.reason_code, C::Success, "{ack:?}");
    let cases: [(&str, &[u8]); 3] = [
        ("receive maximum 0", &[0x21, 0, 0]),
        ("maximum packet size 0", &[0x27, 0, 0, 0, 0]),
        (
            "session expiry twice",
            &[0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 1],
        ),
    ];
    for (name, props) in cases {
        let (mut c, ack) = connack_for(b.addr, &connect_v5(true, props, "rm")).await;
        assert_eq!(ack.reason_code, C::ProtocolError, "{name}: {ack:?}");
        c.expect_closed().await;
    }
}

#[tokio::test]
async fn v5_subscription_identifier_0_is_a_protocol_error() {
    let b = start(BrokerConfig::default()).await;
    // SUBSCRIBE packet id 7, properties [Subscription Identifier (0x0B) = n], `a` QoS 0.
    let with_id = |n: u8| packet(0x82, &[0, 7, 2, 0x0b, n, 0, 1, b'a', 0]);
    let (mut ok, _) = RawV5::connect(b.addr, connect("subid-ok")).await;
    ok.send_bytes(&with_id(5)).await;
    assert!(matches!(ok.recv().await, Packet::SubscribeAck(_)));
    assert_eq!(
        ok.publish(publish("a", "p", 0, 0)).await,
        None,
        "QoS 0 publish has no acknowledgement"
    );
    let got = ok.recv_publish().await;
    let ids = got
        .properties
        .map(|p| p.subscription_ids)
        .unwrap_or_default();
    assert_eq!(ids.iter().map(|i| i.get()).collect::<Vec<_>>(), vec![5]);
    let (mut c, _) = RawV5::connect(b.addr, connect("subid-0")).await;
    c.send_bytes(&with_id(0)).await;
    assert_eq!(c.expect_disconnect().await.reason_code, D::ProtocolError);
}
