//! MQTT 5 enhanced authentication (AUTH packet) through the `EnhancedAuth`
//! hook, with a challenge/response method implemented here.

mod common;

use std::sync::Arc;

use async_trait::async_trait;
use broker_core::config::BrokerConfig;
use broker_core::hooks::{AuthExchange, AuthStep, EnhancedAuth, Hooks};
use broker_core::internals::codec::v5;
use bytes::Bytes;
use bytestring::ByteString;
use common::v5::{connect, opts, Packet, RawV5};
use common::{start, start_hooks, IntoStorage};
use storage_memory::MemoryStore;

const METHOD: &str = "X-CHALLENGE";
const SECRET: &[u8] = b"open sesame";

/// A challenge/response method: the client names itself in its first data,
/// the broker sends a nonce, and the client proves it knows the shared
/// secret by answering `nonce || secret` reversed. The broker then welcomes
/// it with data of its own.
struct Challenge;

struct ChallengeExchange {
    client_id: String,
    nonce: Option<Bytes>,
}

impl EnhancedAuth for Challenge {
    fn begin(&self, client_id: &str, method: &str) -> Option<Box<dyn AuthExchange>> {
        (method == METHOD).then(|| {
            Box::new(ChallengeExchange {
                client_id: client_id.to_owned(),
                nonce: None,
            }) as Box<dyn AuthExchange>
        })
    }
}

fn expected_answer(nonce: &[u8]) -> Vec<u8> {
    let mut v: Vec<u8> = nonce.iter().chain(SECRET).copied().collect();
    v.reverse();
    v
}

#[async_trait]
impl AuthExchange for ChallengeExchange {
    async fn step(&mut self, data: Option<Bytes>) -> AuthStep {
        match self.nonce.take() {
            None => {
                if data.as_deref() != Some(self.client_id.as_bytes()) {
                    return AuthStep::Failure;
                }
                let nonce = Bytes::from(format!("nonce-for-{}", self.client_id));
                self.nonce = Some(nonce.clone());
                AuthStep::Continue(nonce)
            }
            Some(nonce) => match data {
                Some(d) if d[..] == expected_answer(&nonce)[..] => {
                    AuthStep::Success(Some(Bytes::from_static(b"welcome")))
                }
                _ => AuthStep::Failure,
            },
        }
    }
}

async fn broker_with_auth() -> common::TestBroker {
    let hooks = Hooks {
        enhanced_auth: Some(Arc::new(Challenge)),
        ..Hooks::default()
    };
    start_hooks(
        BrokerConfig::default(),
        MemoryStore::new().into_storage(),
        hooks,
    )
    .await
}

fn auth_connect(id: &str) -> v5::Connect {
    let mut c = connect(id);
    c.auth_method = Some(ByteString::from(METHOD));
    c.auth_data = Some(Bytes::copy_from_slice(id.as_bytes()));
    c
}

fn auth(code: v5::AuthReasonCode, data: Vec<u8>) -> Packet {
    Packet::Auth(v5::Auth {
        reason_code: code,
        auth_method: Some(ByteString::from(METHOD)),
        auth_data: Some(Bytes::from(data)),
        reason_string: None,
        user_properties: Vec::new(),
    })
}

/// The broker's challenge in an AUTH 0x18.
async fn challenge(c: &mut RawV5) -> Bytes {
    match c.recv().await {
        Packet::Auth(a) => {
            assert_eq!(a.reason_code, v5::AuthReasonCode::ContinueAuth);
            assert_eq!(a.auth_method.as_deref(), Some(METHOD));
            a.auth_data.expect("challenge data")
        }
        other => panic!("expected AUTH, got {other:?}"),
    }
}

async fn connack(c: &mut RawV5) -> v5::ConnectAck {
    match c.recv().await {
        Packet::ConnectAck(a) => *a,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// Open a connection, send an authenticating CONNECT for `id`, and return
/// the client with the broker's challenge.
async fn begin(b: &common::TestBroker, id: &str) -> (RawV5, Bytes) {
    let mut c = RawV5::open(b.addr).await;
    c.send(Packet::Connect(Box::new(auth_connect(id)))).await;
    let nonce = challenge(&mut c).await;
    (c, nonce)
}

#[tokio::test]
async fn challenge_response_then_connack_with_the_method() {
    let b = broker_with_auth().await;
    let (mut c, nonce) = begin(&b, "alice").await;
    assert_eq!(&nonce[..], b"nonce-for-alice");
    c.send(auth(
        v5::AuthReasonCode::ContinueAuth,
        expected_answer(&nonce),
    ))
    .await;
    let ack = connack(&mut c).await;
    assert_eq!(ack.reason_code, v5::ConnectAckReason::Success);
    assert_eq!(ack.auth_method.as_deref(), Some(METHOD));
    assert_eq!(ack.auth_data.as_deref(), Some(&b"welcome"[..]));
    // Authenticated: the connection works.
    assert_eq!(
        c.subscribe(&[("t", opts(1))], None).await,
        vec![v5::SubscribeAckReason::GrantedQos1]
    );
}

#[tokio::test]
async fn wrong_answer_is_not_authorized() {
    let b = broker_with_auth().await;
    let (mut c, _) = begin(&b, "mallory").await;
    c.send(auth(v5::AuthReasonCode::ContinueAuth, b"guess".to_vec()))
        .await;
    assert_eq!(
        connack(&mut c).await.reason_code,
        v5::ConnectAckReason::NotAuthorized
    );
    c.expect_closed().await;
    assert!(
        b.broker.session("mallory").is_none(),
        "a refused client must not get a session"
    );
}

#[tokio::test]
async fn unknown_method_or_no_hook_is_a_bad_authentication_method() {
    let b = broker_with_auth().await;
    let mut c = auth_connect("bob");
    c.auth_method = Some(ByteString::from("SCRAM-SHA-512"));
    let (mut client, ack) = RawV5::connect_with(b.addr, c).await;
    assert_eq!(
        ack.reason_code,
        v5::ConnectAckReason::BadAuthenticationMethod
    );
    client.expect_closed().await;

    let plain = start(BrokerConfig::default()).await;
    let (mut client, ack) = RawV5::connect_with(plain.addr, auth_connect("bob")).await;
    assert_eq!(
        ack.reason_code,
        v5::ConnectAckReason::BadAuthenticationMethod
    );
    client.expect_closed().await;
}

#[tokio::test]
async fn anything_but_auth_during_the_exchange_is_a_protocol_error() {
    let b = broker_with_auth().await;
    let (mut c, _) = begin(&b, "carol").await;
    c.send(Packet::PingRequest).await;
    assert_eq!(
        connack(&mut c).await.reason_code,
        v5::ConnectAckReason::ProtocolError
    );
    c.expect_closed().await;
}

#[tokio::test]
async fn re_authentication_succeeds_or_disconnects() {
    let b = broker_with_auth().await;
    let (mut c, nonce) = begin(&b, "dave").await;
    c.send(auth(
        v5::AuthReasonCode::ContinueAuth,
        expected_answer(&nonce),
    ))
    .await;
    assert_eq!(
        connack(&mut c).await.reason_code,
        v5::ConnectAckReason::Success
    );

    // Re-authenticate: same method, a fresh exchange, AUTH 0x00 at the end.
    c.send(auth(v5::AuthReasonCode::ReAuth, b"dave".to_vec()))
        .await;
    let nonce = challenge(&mut c).await;
    c.send(auth(
        v5::AuthReasonCode::ContinueAuth,
        expected_answer(&nonce),
    ))
    .await;
    match c.recv().await {
        Packet::Auth(a) => {
            assert_eq!(a.reason_code, v5::AuthReasonCode::Success);
            assert_eq!(a.auth_data.as_deref(), Some(&b"welcome"[..]));
        }
        other => panic!("expected AUTH success, got {other:?}"),
    }

    // A failed re-authentication ends the connection with 0x87.
    c.send(auth(v5::AuthReasonCode::ReAuth, b"not-dave".to_vec()))
        .await;
    let d = c.expect_disconnect().await;
    assert_eq!(d.reason_code, v5::DisconnectReasonCode::NotAuthorized);
}

#[tokio::test]
async fn auth_without_a_method_at_connect_is_a_protocol_error() {
    let b = broker_with_auth().await;
    let (mut c, _) = RawV5::connect(b.addr, connect("erin")).await;
    c.send(auth(v5::AuthReasonCode::ReAuth, b"erin".to_vec()))
        .await;
    let d = c.expect_disconnect().await;
    assert_eq!(d.reason_code, v5::DisconnectReasonCode::ProtocolError);
}
