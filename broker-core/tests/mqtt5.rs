//! MQTT 5 with raw packets: CONNACK properties, reason codes, properties
//! passed through, and mixed MQTT 3.1.1 / MQTT 5 clients.

mod common;

use std::num::NonZeroU32;

use broker_core::config::BrokerConfig;
use broker_core::internals::codec::v5;
use bytes::Bytes;
use bytestring::ByteString;
use common::v5::{connect, opts, payload, pid, publish, Packet, RawV5};
use common::{start, RawClient};

#[tokio::test]
async fn connack_reflects_the_configuration() {
    let config = BrokerConfig {
        receive_maximum: 77,
        topic_alias_maximum: 5,
        maximum_qos: 1,
        retain_available: false,
        wildcard_subscriptions: false,
        shared_subscriptions: false,
        subscription_identifiers: false,
        max_keep_alive: Some(30),
        max_session_expiry_secs: Some(100),
        response_topic_prefix: Some("replies/".into()),
        max_packet_size: 4096,
        ..BrokerConfig::default()
    };
    let b = start(config).await;
    let mut c = connect("");
    c.keep_alive = 0;
    c.session_expiry_interval_secs = 1000;
    c.request_response_info = true;
    let (_client, ack) = RawV5::connect(b.addr, c).await;
    let id = ack.assigned_client_id.clone().expect("assigned client id");
    assert!(!id.is_empty());
    assert_eq!(ack.receive_max.get(), 77);
    assert_eq!(ack.topic_alias_max, 5);
    assert_eq!(ack.max_qos, v5::QoS::AtLeastOnce);
    assert!(!ack.retain_available);
    assert!(!ack.wildcard_subscription_available);
    assert!(!ack.shared_subscription_available);
    assert!(!ack.subscription_identifiers_available);
    assert_eq!(ack.server_keepalive_sec, Some(30));
    assert_eq!(ack.session_expiry_interval_secs, Some(100));
    assert_eq!(ack.max_packet_size, Some(4096));
    assert_eq!(
        ack.response_info.as_deref(),
        Some(format!("replies/{id}").as_str())
    );

    // Defaults: everything available, no server keep alive, nothing lowered.
    let b = start(BrokerConfig::default()).await;
    let mut c = connect("plain");
    c.keep_alive = 60;
    c.request_response_info = true;
    let (_client, ack) = RawV5::connect(b.addr, c).await;
    assert_eq!(ack.assigned_client_id, None);
    assert!(ack.retain_available && ack.wildcard_subscription_available);
    assert!(ack.shared_subscription_available && ack.subscription_identifiers_available);
    assert_eq!(ack.max_qos, v5::QoS::ExactlyOnce);
    assert_eq!(ack.server_keepalive_sec, None);
    assert_eq!(ack.session_expiry_interval_secs, None);
    assert_eq!(ack.response_info, None);
}

#[tokio::test]
async fn properties_pass_through_to_v5_and_are_dropped_for_v3() {
    let b = start(BrokerConfig::default()).await;
    let (mut v5sub, _) = RawV5::connect(b.addr, connect("v5-sub")).await;
    assert_eq!(
        v5sub.subscribe(&[("req/#", opts(1))], Some(9)).await,
        vec![v5::SubscribeAckReason::GrantedQos1]
    );
    let (mut v3sub, _) = RawClient::connect(b.addr, "v3-sub", true).await;
    v3sub.subscribe("req/#", 1).await;

    let (mut publisher, _) = RawV5::connect(b.addr, connect("pub")).await;
    let mut p = publish("req/1", "{\"q\":1}", 1, 5);
    p.properties = Some(v5::PublishProperties {
        correlation_data: Some(Bytes::from_static(b"\x00corr")),
        message_expiry_interval: NonZeroU32::new(600),
        content_type: Some(ByteString::from("application/json")),
        user_properties: vec![("k".into(), "v1".into()), ("k".into(), "v2".into())],
        is_utf8_payload: true,
        response_topic: Some(ByteString::from("resp/pub")),
        ..v5::PublishProperties::default()
    });
    assert_eq!(
        publisher.publish(p).await,
        Some(v5::PublishAckReason::Success)
    );

    let got = v5sub.recv_and_ack().await;
    assert_eq!(payload(&got), "{\"q\":1}");
    let props = got.properties.expect("properties");
    assert_eq!(props.correlation_data.as_deref(), Some(&b"\x00corr"[..]));
    assert_eq!(props.content_type.as_deref(), Some("application/json"));
    assert_eq!(props.response_topic.as_deref(), Some("resp/pub"));
    assert!(props.is_utf8_payload);
    assert_eq!(
        props.user_properties,
        vec![("k".into(), "v1".into()), ("k".into(), "v2".into())]
    );
    let left = props.message_expiry_interval.expect("expiry").get();
    assert!((599..=600).contains(&left), "remaining expiry {left}");
    assert_eq!(props.subscription_ids, vec![NonZeroU32::new(9).unwrap()]);

    let got = v3sub.recv_and_ack().await;
    assert_eq!(common::payload_str(&got), "{\"q\":1}");
    assert!(got.properties.is_none());
}

#[tokio::test]
async fn puback_says_when_no_one_subscribed() {
    let b = start(BrokerConfig::default()).await;
    let (mut c, _) = RawV5::connect(b.addr, connect("lonely")).await;
    assert_eq!(
        c.publish(publish("nobody/here", "x", 1, 1)).await,
        Some(v5::PublishAckReason::NoMatchingSubscribers)
    );
    assert_eq!(
        c.publish(publish("nobody/here", "x", 2, 2)).await,
        Some(v5::PublishAckReason::NoMatchingSubscribers)
    );
    c.subscribe(&[("nobody/here", opts(0))], None).await;
    assert_eq!(
        c.publish(publish("nobody/here", "x", 1, 3)).await,
        Some(v5::PublishAckReason::Success)
    );
    assert!(matches!(c.recv().await, Packet::Publish(_)));
    let _ = pid(1);
}
