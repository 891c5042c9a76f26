//! The application seam from real MQTT clients over TCP: authentication and
//! authorization hooks with their reason codes in 3.1.1 and 5, hooks that
//! are slow, fail or panic, events in order, `$SYS` topics.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use broker_core::client::ClientOptions;
use broker_core::config::{BrokerConfig, SysConfig};
use broker_core::events::Event;
use broker_core::hooks::{
    Authenticate, Authorize, ClientInfo, ConnectInfo, Decision, HookError, Login, SubscribeDecision,
};
use broker_core::internals::codec::{v3, v5};
use broker_core::message::{Message, QoS};
use broker_core::Broker;
use bytes::Bytes;
use bytestring::ByteString;
use common::v5::{connect, opts, publish, RawV5};
use common::{IntoStorage, RawClient, WAIT};
use storage_memory::MemoryStore;

/// alice/wonderland and bob/builder; `slow` sleeps 30 s; `boom` panics;
/// `broken` fails. Everyone may publish under `chat/<user>/` only, and
/// subscribe to anything but `secret/#` (`capped/#` at QoS 0); `private/#`
/// reaches alice only.
struct Rules {
    /// While set, authentication of `slow` hangs.
    hang: AtomicBool,
}

#[async_trait]
impl Authenticate for Rules {
    async fn authenticate(&self, c: &ConnectInfo) -> Result<Login, HookError> {
        match (c.username.as_deref(), c.password.as_deref()) {
            (Some("alice"), Some(b"wonderland")) | (Some("bob"), Some(b"builder")) => {
                Ok(Login::allow())
            }
            (Some("slow"), _) if self.hang.load(Ordering::Relaxed) => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok(Login::allow())
            }
            (Some("boom"), _) => panic!("the hook panicked"),
            (Some("broken"), _) => Err(HookError::new("user database down")),
            (Some(_), _) => Ok(Login::BadCredentials),
            (None, _) if c.client_id.starts_with("anon-ok") => Ok(Login::allow()),
            (None, _) => Ok(Login::NotAuthorized),
        }
    }
}

#[async_trait]
impl Authorize for Rules {
    async fn authorize_publish(
        &self,
        client: &ClientInfo,
        message: &Message,
    ) -> Result<Decision, HookError> {
        let own = format!("chat/{}/", client.username.as_deref().unwrap_or("-"));
        Ok(if message.topic.starts_with(&own) || client.is_internal() {
            Decision::Allow
        } else {
            Decision::Deny
        })
    }

    async fn authorize_subscribe(
        &self,
        _client: &ClientInfo,
        filter: &str,
        qos: QoS,
    ) -> Result<SubscribeDecision, HookError> {
        Ok(if filter.starts_with("secret/") {
            SubscribeDecision::Deny
        } else if filter.starts_with("capped/") {
            SubscribeDecision::Allow(QoS::AtMostOnce)
        } else {
            SubscribeDecision::Allow(qos)
        })
    }

    fn authorize_delivery(&self, recipient: &ClientInfo, message: &Message) -> Decision {
        if message.topic.starts_with("private/") && recipient.username.as_deref() != Some("alice") {
            Decision::Deny
        } else {
            Decision::Allow
        }
    }
}

async fn start(config: BrokerConfig, sys: SysConfig) -> (Broker, std::net::SocketAddr) {
    let rules = Arc::new(Rules {
        hang: AtomicBool::new(true),
    });
    let broker = Broker::builder()
        .config(config)
        .sys(sys)
        .storage(MemoryStore::new().into_storage())
        .hooks(broker_core::hooks::Hooks {
            authenticate: Some(rules.clone()),
            authorize: Some(rules),
            enhanced_auth: None,
        })
        .listen("127.0.0.1:0")
        .start()
        .await
        .expect("broker starts");
    let addr = broker.local_addrs()[0];
    (broker, addr)
}

fn no_sys() -> SysConfig {
    SysConfig {
        enabled: false,
        ..SysConfig::default()
    }
}

fn v5_login(id: &str, user: &str, pass: &str) -> v5::Connect {
    let mut c = connect(id);
    c.username = Some(ByteString::from(user));
    c.password = Some(Bytes::copy_from_slice(pass.as_bytes()));
    c
}

async fn v3_login(
    addr: std::net::SocketAddr,
    id: &str,
    user: Option<&str>,
    pass: &str,
) -> (RawClient, v3::ConnectAckReason) {
    let mut c = RawClient::open(addr).await;
    c.send(v3::Packet::Connect(Box::new(v3::Connect {
        protocol: Default::default(),
        clean_session: true,
        keep_alive: 0,
        last_will: None,
        client_id: ByteString::from(id),
        username: user.map(ByteString::from),
        password: user.map(|_| Bytes::copy_from_slice(pass.as_bytes())),
        cert: None,
    })))
    .await;
    match c.recv().await {
        v3::Packet::ConnectAck(a) => (c, a.return_code),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

#[tokio::test]
async fn authentication_allows_and_denies_with_the_right_codes() {
    let (broker, addr) = start(BrokerConfig::default(), no_sys()).await;
    use v3::ConnectAckReason as C3;
    use v5::ConnectAckReason as C5;
    // MQTT 3.1.1
    assert_eq!(
        v3_login(addr, "a", Some("alice"), "wonderland").await.1,
        C3::ConnectionAccepted
    );
    assert_eq!(
        v3_login(addr, "b", Some("alice"), "wrong").await.1,
        C3::BadUserNameOrPassword
    );
    assert_eq!(v3_login(addr, "c", None, "").await.1, C3::NotAuthorized);
    assert_eq!(
        v3_login(addr, "d", Some("broken"), "").await.1,
        C3::ServiceUnavailable
    );
    assert_eq!(
        v3_login(addr, "e", Some("boom"), "").await.1,
        C3::ServiceUnavailable
    );
    // MQTT 5
    let code = |c: v5::Connect| async move { RawV5::connect_with(addr, c).await.1.reason_code };
    assert_eq!(code(v5_login("f", "bob", "builder")).await, C5::Success);
    assert_eq!(
        code(v5_login("g", "bob", "x")).await,
        C5::BadUserNameOrPassword
    );
    assert_eq!(code(connect("h")).await, C5::NotAuthorized);
    assert_eq!(
        code(v5_login("i", "broken", "")).await,
        C5::ServerUnavailable
    );
    assert_eq!(code(v5_login("j", "boom", "")).await, C5::ServerUnavailable);
    let s = broker.stats();
    assert_eq!(s.authentication_failures, 4, "{s:?}");
    assert_eq!(s.hook_failures, 4, "{s:?}");
    assert!(
        broker.session("g").is_none(),
        "a refused client leaves no session"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn a_hook_that_hangs_times_out_and_stalls_nobody_else() {
    let config = BrokerConfig {
        hook_timeout_ms: 1500,
        ..BrokerConfig::default()
    };
    let (broker, addr) = start(config, no_sys()).await;
    let slow = tokio::spawn(async move {
        RawV5::connect_with(addr, v5_login("slow-1", "slow", ""))
            .await
            .1
            .reason_code
    });
    // While that hook hangs, others connect, publish and receive at once.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (mut sub, _) = RawV5::connect(addr, v5_login("fast-sub", "alice", "wonderland")).await;
    sub.subscribe(&[("chat/bob/#", opts(1))], None).await;
    let (mut publ, _) = RawV5::connect(addr, v5_login("fast-pub", "bob", "builder")).await;
    assert_eq!(
        publ.publish(publish("chat/bob/x", "hi", 1, 1)).await,
        Some(v5::PublishAckReason::Success)
    );
    assert_eq!(common::v5::payload(&sub.recv_and_ack().await), "hi");
    assert!(
        !slow.is_finished(),
        "other clients were served while the hook still hung"
    );
    let code = tokio::time::timeout(WAIT, slow)
        .await
        .expect("bounded")
        .expect("task");
    assert_eq!(
        code,
        v5::ConnectAckReason::ServerUnavailable,
        "fails closed"
    );
    assert_eq!(broker.stats().hook_failures, 1);
    broker.shutdown().await;
}

#[tokio::test]
async fn publish_authorization_v5_refuses_with_0x87() {
    let (broker, addr) = start(BrokerConfig::default(), no_sys()).await;
    let (mut sub, _) = RawV5::connect(addr, v5_login("s", "alice", "wonderland")).await;
    sub.subscribe(&[("chat/#", opts(2))], None).await;
    let (mut bob, _) = RawV5::connect(addr, v5_login("b", "bob", "builder")).await;
    for qos in [1, 2] {
        assert_eq!(
            bob.publish(publish("chat/alice/forged", "x", qos, 10 + u16::from(qos)))
                .await,
            Some(v5::PublishAckReason::NotAuthorized),
            "QoS {qos}"
        );
    }
    // Clients may not publish under $SYS/.
    assert_eq!(
        bob.publish(publish("$SYS/broker/uptime", "0", 1, 20)).await,
        Some(v5::PublishAckReason::NotAuthorized)
    );
    assert_eq!(
        bob.publish(publish("chat/bob/ok", "fine", 1, 21)).await,
        Some(v5::PublishAckReason::Success)
    );
    // The subscriber got only the allowed one.
    assert_eq!(common::v5::payload(&sub.recv_and_ack().await), "fine");
    assert!(sub.try_recv(Duration::from_millis(200)).await.is_none());
    broker.shutdown().await;
}

#[tokio::test]
async fn publish_authorization_v3_acknowledges_and_drops() {
    let (broker, addr) = start(BrokerConfig::default(), no_sys()).await;
    let (mut sub, _) = v3_login(addr, "s3", Some("alice"), "wonderland").await;
    sub.subscribe("chat/#", 1).await;
    let (mut bob, code) = v3_login(addr, "b3", Some("bob"), "builder").await;
    assert_eq!(code, v3::ConnectAckReason::ConnectionAccepted);
    // Acknowledged (QoS 1 and the whole QoS 2 flow), the connection stays, nothing routed.
    bob.publish("chat/alice/forged", b"x", 1, false).await;
    bob.publish("chat/alice/forged", b"y", 2, false).await;
    bob.publish("chat/bob/ok", b"fine", 1, false).await;
    assert_eq!(common::payload_str(&sub.recv_and_ack().await), "fine");
    assert!(sub.try_recv(Duration::from_millis(200)).await.is_none());
    assert_eq!(broker.stats().authorization_denials, 2);
    broker.shutdown().await;
}

#[tokio::test]
async fn subscribe_authorization_refuses_or_lowers_qos() {
    let (broker, addr) = start(BrokerConfig::default(), no_sys()).await;
    let (mut c5, _) = RawV5::connect(addr, v5_login("s5", "alice", "wonderland")).await;
    let codes = c5
        .subscribe(
            &[
                ("secret/x", opts(1)),
                ("capped/x", opts(2)),
                ("open/x", opts(2)),
            ],
            None,
        )
        .await;
    use v5::SubscribeAckReason as S;
    assert_eq!(
        codes,
        vec![S::NotAuthorized, S::GrantedQos0, S::GrantedQos2]
    );
    let (mut c3, _) = v3_login(addr, "s3", Some("alice"), "wonderland").await;
    let codes = c3
        .subscribe_many(&[("secret/x", 1), ("capped/x", 2), ("open/x", 1)])
        .await;
    use v3::SubscribeReturnCode as R;
    assert_eq!(
        codes,
        vec![
            R::Failure,
            R::Success(v3::QoS::AtMostOnce),
            R::Success(v3::QoS::AtLeastOnce)
        ]
    );
    let info = broker.session("s5").expect("session");
    assert_eq!(info.subscriptions, vec!["capped/x", "open/x"]);
    broker.shutdown().await;
}

#[tokio::test]
async fn delivery_authorization_filters_per_recipient() {
    let (broker, addr) = start(BrokerConfig::default(), no_sys()).await;
    let (mut alice, _) = RawV5::connect(addr, v5_login("al", "alice", "wonderland")).await;
    alice.subscribe(&[("private/#", opts(1))], None).await;
    let (mut bob, _) = RawV5::connect(addr, v5_login("bo", "bob", "builder")).await;
    bob.subscribe(&[("private/#", opts(1))], None).await;
    broker
        .publish(Message::new(
            "private/memo",
            "for alice",
            QoS::AtLeastOnce,
            false,
        ))
        .await
        .expect("server publish");
    assert_eq!(
        common::v5::payload(&alice.recv_and_ack().await),
        "for alice"
    );
    assert!(bob.try_recv(Duration::from_millis(300)).await.is_none());
    assert_eq!(
        broker.session("bo").expect("bob").queued,
        0,
        "the denied copy is gone"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn a_will_the_client_may_not_publish_refuses_the_connect() {
    let (broker, addr) = start(BrokerConfig::default(), no_sys()).await;
    let mut c = v5_login("w", "bob", "builder");
    c.last_will = Some(common::v5::will("chat/alice/gone", "bye"));
    let (_, ack) = RawV5::connect_with(addr, c).await;
    assert_eq!(ack.reason_code, v5::ConnectAckReason::NotAuthorized);
    broker.shutdown().await;
}

#[tokio::test]
async fn events_arrive_in_order_per_client() {
    let (broker, addr) = start(BrokerConfig::default(), no_sys()).await;
    let mut events = broker.events(1024);
    assert!(matches!(events.recv().await, Some(Event::Ready)));
    let (mut c, _) = RawV5::connect(addr, v5_login("ev", "bob", "builder")).await;
    c.subscribe(&[("chat/bob/#", opts(1))], None).await;
    c.publish(publish("chat/bob/1", "one", 1, 1)).await;
    let p = c.recv_publish().await;
    c.send(v5::Packet::PublishAck(common::v5::ack(
        p.packet_id.expect("id"),
        v5::PublishAckReason::Success,
    )))
    .await;
    c.unsubscribe(&["chat/bob/#"]).await;
    c.disconnect().await;
    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("disconnected") {
        let e = tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("events come")
            .expect("stream open");
        seen.push(
            match e {
                Event::SessionCreated { .. } => "session created",
                Event::ClientConnected { .. } => "connected",
                Event::Subscribed { .. } => "subscribed",
                Event::Published { .. } => "published",
                Event::Delivered { .. } => "delivered",
                Event::Acknowledged { .. } => "acknowledged",
                Event::Unsubscribed { .. } => "unsubscribed",
                Event::ClientDisconnected { .. } => "disconnected",
                _ => continue,
            }
            .to_string(),
        );
    }
    assert_eq!(
        seen,
        [
            "session created",
            "connected",
            "subscribed",
            "published",
            "delivered",
            "acknowledged",
            "unsubscribed",
            "disconnected"
        ]
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn a_listener_that_never_reads_loses_events_not_messages() {
    let (broker, addr) = start(BrokerConfig::default(), no_sys()).await;
    let events = broker.events(4);
    let (mut sub, _) = RawV5::connect(addr, v5_login("q", "alice", "wonderland")).await;
    sub.subscribe(&[("chat/bob/#", opts(0))], None).await;
    let (mut publ, _) = RawV5::connect(addr, v5_login("p", "bob", "builder")).await;
    for i in 0..50u16 {
        publ.publish(publish("chat/bob/x", &i.to_string(), 1, i + 1))
            .await;
    }
    for i in 0..50 {
        assert_eq!(
            common::v5::payload(&sub.recv_publish().await),
            i.to_string()
        );
    }
    assert!(events.dropped() > 0);
    assert_eq!(broker.stats().events_dropped, events.dropped());
    broker.shutdown().await;
}

#[tokio::test]
async fn sys_topics_are_published_and_hidden_from_hash() {
    let sys = SysConfig {
        enabled: true,
        broker_id: Some("b1".into()),
        interval_secs: 1,
    };
    let (broker, addr) = start(BrokerConfig::default(), sys).await;
    // `#` must not match $SYS topics (MQTT-4.7.2-1).
    let (mut all, _) = RawV5::connect(addr, v5_login("all", "alice", "wonderland")).await;
    all.subscribe(&[("#", opts(0))], None).await;
    let (mut watcher, _) = RawV5::connect(addr, v5_login("watch", "alice", "wonderland")).await;
    watcher
        .subscribe(
            &[
                ("$SYS/b1/#", opts(0)),
                ("$SYS/broker/clients/connected", opts(0)),
            ],
            None,
        )
        .await;
    let (newcomer, _) = RawV5::connect(addr, v5_login("newcomer", "bob", "builder")).await;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline
        && !(got
            .iter()
            .any(|(t, p): &(String, String)| t == "$SYS/b1/new/clients" && p == "newcomer")
            && got
                .iter()
                .any(|(t, _)| t == "$SYS/broker/clients/connected"))
    {
        if let Some(v5::Packet::Publish(p)) = watcher.try_recv(Duration::from_millis(200)).await {
            got.push((p.topic.to_string(), common::v5::payload(&p)));
        }
    }
    assert!(
        got.iter()
            .any(|(t, p)| t == "$SYS/b1/new/clients" && p == "newcomer"),
        "{got:?}"
    );
    assert!(
        got.iter()
            .any(|(t, _)| t == "$SYS/broker/clients/connected"),
        "{got:?}"
    );
    newcomer.disconnect().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut gone = false;
    while !gone && tokio::time::Instant::now() < deadline {
        if let Some(v5::Packet::Publish(p)) = watcher.try_recv(Duration::from_millis(200)).await {
            gone = p.topic == "$SYS/b1/disconnect/clients" && common::v5::payload(&p) == "newcomer";
        }
    }
    assert!(gone, "disconnect/clients published");
    // Subscriptions show as JSON.
    let (mut s, _) = RawV5::connect(addr, v5_login("subber", "bob", "builder")).await;
    s.subscribe(&[("chat/bob/z", opts(0))], None).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut json = None;
    while json.is_none() && tokio::time::Instant::now() < deadline {
        if let Some(v5::Packet::Publish(p)) = watcher.try_recv(Duration::from_millis(200)).await {
            if p.topic == "$SYS/b1/new/subscribes" {
                json = Some(common::v5::payload(&p));
            }
        }
    }
    assert_eq!(
        json.as_deref(),
        Some(r#"{"clientId":"subber","topic":"chat/bob/z"}"#)
    );
    assert!(
        all.try_recv(Duration::from_millis(300)).await.is_none(),
        "`#` received a $SYS message"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn sys_broker_id_is_kept_in_the_store() {
    let storage = MemoryStore::new().into_storage();
    let start = |storage| async move {
        Broker::builder()
            .storage(storage)
            .start()
            .await
            .expect("starts")
    };
    let b = start(storage.clone()).await;
    let mut c = b
        .connect(ClientOptions::new("probe"))
        .await
        .expect("attach");
    c.subscribe("$SYS/broker/id", QoS::AtMostOnce)
        .await
        .expect("subscribe");
    let first = c.recv().await.expect("retained id");
    let id = String::from_utf8_lossy(&first.message().payload).to_string();
    assert!(!id.is_empty());
    c.disconnect().await;
    b.shutdown().await;
    let b = start(storage).await;
    let mut c = b
        .connect(ClientOptions::new("probe"))
        .await
        .expect("attach");
    c.subscribe("$SYS/broker/id", QoS::AtMostOnce)
        .await
        .expect("subscribe");
    let again = c.recv().await.expect("retained id");
    assert_eq!(
        String::from_utf8_lossy(&again.message().payload),
        id,
        "same id after restart"
    );
    b.shutdown().await;
}
