//! The scenario Mosca's users depended on, with a real MQTT client (rumqttc):
//! per-user topics, persistent sessions at QoS 1 on two devices per user,
//! a backlog built while offline, and live traffic during the reconnect.
//! Every device must get every message exactly once, in publish order.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use broker_core::config::BrokerConfig;
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, MqttOptions, QoS};
use tokio::sync::mpsc;

const USERS: usize = 5;
const BACKLOG: usize = 1000;
const LIVE: usize = 200;

fn options(id: &str, port: u16, clean: bool) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_clean_session(clean);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(100);
    o
}

/// Drive an event loop, forwarding (topic, payload) of received publishes,
/// until the connection ends.
fn drive(
    mut ev: EventLoop,
    tx: mpsc::UnboundedSender<(String, String)>,
) -> tokio::task::JoinHandle<bool> {
    tokio::spawn(async move {
        let mut session_present = false;
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Incoming::ConnAck(a))) => session_present = a.session_present,
                Ok(Event::Incoming(Incoming::Publish(p))) => {
                    let _ = tx.send((
                        p.topic.clone(),
                        String::from_utf8_lossy(&p.payload).into_owned(),
                    ));
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return session_present,
                Ok(_) => {}
                Err(_) => return session_present,
            }
        }
    })
}

async fn connect(
    id: &str,
    port: u16,
    clean: bool,
) -> (
    AsyncClient,
    mpsc::UnboundedReceiver<(String, String)>,
    tokio::task::JoinHandle<bool>,
) {
    let (client, ev) = AsyncClient::new(options(id, port, clean), 1000);
    let (tx, rx) = mpsc::unbounded_channel();
    let task = drive(ev, tx);
    (client, rx, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_device_gets_every_message_once_and_in_order() {
    let b = common::start(BrokerConfig::default()).await;
    let port = b.addr.port();
    let devices: Vec<(usize, String)> = (0..USERS)
        .flat_map(|u| {
            [
                (u, format!("user{u}-phone")),
                (u, format!("user{u}-laptop")),
            ]
        })
        .collect();

    // Each device subscribes to its user's topic, then goes offline.
    for (u, id) in &devices {
        let (c, mut rx, task) = connect(id, port, false).await;
        c.subscribe(format!("user/{u}"), QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        // Wait for the SUBACK round trip by publishing to a private probe topic.
        c.subscribe(format!("probe/{id}"), QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        c.publish(format!("probe/{id}"), QoS::AtLeastOnce, false, "p")
            .await
            .expect("probe");
        tokio::time::timeout(common::WAIT, rx.recv())
            .await
            .expect("probe arrives");
        c.disconnect().await.expect("disconnect");
        let _ = task.await;
    }

    // The backlog, published while every device is offline.
    let (publisher, _prx, _ptask) = connect("chat-server", port, true).await;
    for n in 0..BACKLOG {
        for u in 0..USERS {
            publisher
                .publish(format!("user/{u}"), QoS::AtLeastOnce, false, n.to_string())
                .await
                .expect("publish");
        }
    }
    // Let the backlog land before the reconnects start, so that it is a real backlog.
    wait_until_queued(&b, &devices, BACKLOG).await;

    // Reconnect every device while live messages keep arriving.
    let live = tokio::spawn(async move {
        for n in BACKLOG..BACKLOG + LIVE {
            for u in 0..USERS {
                publisher
                    .publish(format!("user/{u}"), QoS::AtLeastOnce, false, n.to_string())
                    .await
                    .expect("publish");
            }
            if n % 20 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        publisher
    });
    let mut receivers = Vec::new();
    for (u, id) in &devices {
        let (c, rx, task) = connect(id, port, false).await;
        receivers.push((*u, id.clone(), c, rx, task));
    }
    let _publisher = live.await.expect("live publisher");

    for (u, id, _c, mut rx, _task) in receivers {
        let mut got = Vec::with_capacity(BACKLOG + LIVE);
        while got.len() < BACKLOG + LIVE {
            match tokio::time::timeout(Duration::from_secs(20), rx.recv()).await {
                Ok(Some((topic, payload))) => {
                    assert_eq!(
                        topic,
                        format!("user/{u}"),
                        "{id} got another user's message"
                    );
                    got.push(payload.parse::<usize>().expect("numeric payload"));
                }
                _ => panic!(
                    "{id}: only {} of {} messages arrived",
                    got.len(),
                    BACKLOG + LIVE
                ),
            }
        }
        let expected: Vec<usize> = (0..BACKLOG + LIVE).collect();
        if got != expected {
            let first_bad = got.iter().zip(&expected).position(|(a, b)| a != b);
            panic!("{id}: out of order or duplicated, first difference at index {first_bad:?}");
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(300), rx.recv())
                .await
                .is_err(),
            "{id}: a message arrived twice"
        );
    }
}

async fn wait_until_queued(b: &common::TestBroker, devices: &[(usize, String)], n: usize) {
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        let lens: HashMap<&str, usize> = devices
            .iter()
            .map(|(_, id)| {
                (
                    id.as_str(),
                    b.broker.session(id).map(|s| s.queued).unwrap_or(0),
                )
            })
            .collect();
        if lens.values().all(|l| *l >= n) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "backlog not queued: {lens:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_publisher_stream_stays_in_order_through_one_subscriber() {
    let b = common::start(BrokerConfig::default()).await;
    let port = b.addr.port();
    let (sub, mut rx, _t) = connect("sink", port, false).await;
    sub.subscribe("feed/#", QoS::ExactlyOnce)
        .await
        .expect("subscribe");
    sub.subscribe("ready", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    sub.publish("ready", QoS::AtLeastOnce, false, "x")
        .await
        .expect("probe");
    tokio::time::timeout(common::WAIT, rx.recv())
        .await
        .expect("probe arrives");

    const N: usize = 2000;
    let mut pubs = Vec::new();
    for p in 0..2 {
        let (c, _rx, t) = connect(&format!("pub{p}"), port, true).await;
        pubs.push(tokio::spawn(async move {
            for n in 0..N {
                let qos = if n % 2 == 0 {
                    QoS::AtLeastOnce
                } else {
                    QoS::ExactlyOnce
                };
                c.publish(format!("feed/{p}"), qos, false, n.to_string())
                    .await
                    .expect("publish");
            }
            (c, t)
        }));
    }
    let mut next = [0usize; 2];
    while next.iter().sum::<usize>() < 2 * N {
        let (topic, payload) = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("messages keep arriving")
            .expect("event loop alive");
        let p: usize = topic
            .trim_start_matches("feed/")
            .parse()
            .expect("publisher index");
        let n: usize = payload.parse().expect("numeric payload");
        assert_eq!(n, next[p], "publisher {p}'s stream out of order");
        next[p] += 1;
    }
    for p in pubs {
        let _ = p.await;
    }
}
