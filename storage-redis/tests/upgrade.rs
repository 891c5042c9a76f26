//! A prefix written in key layout 1 (by brokers before layout 2) is
//! upgraded in place at open, and an upgrade cut off part way is finished
//! by the next open: every queue reads back whole, in order, with its
//! states, and every body keeps exactly its references.
//!
//! The layout 1 keys are written here byte by byte, as those brokers wrote
//! them, so that this test pins what the upgrade must read.

mod common;

use std::sync::Arc;
use std::time::Duration;

use broker_core::message::QoS;
use broker_core::storage::{PacketOp, PacketState, PacketStore};
use common::{connect, options, redis_url, unique_prefix, Cleanup};
use storage_redis::RedisStore;

/// A body in format version 1: version, QoS, flags, id, reception time
/// (1000 ms), topic, no user properties, then the payload.
fn body_v1(id: u8, qos: u8, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![1, qos, 0, id, 0xE8, 0x07, topic.len() as u8];
    b.extend_from_slice(topic.as_bytes());
    b.push(0);
    b.extend_from_slice(payload);
    b
}

/// A layout 1 entry: `{id}:{state}:{delivery}`, the delivery QoS, no flags,
/// no subscription identifiers.
fn entry_v1(id: u64, state: &str, qos: u8) -> Vec<u8> {
    let mut e = format!("{id}:{state}:").into_bytes();
    e.extend_from_slice(&[qos, 0, 0]);
    e
}

fn cmd(conn: &mut redis::Connection, args: &[&[u8]]) {
    let mut c = redis::cmd(std::str::from_utf8(args[0]).expect("command name"));
    for a in &args[1..] {
        c.arg(*a);
    }
    c.query::<()>(conn).expect("layout 1 fixture");
}

/// Layout 1 under `p`: session `a` queues messages 1 (seq 1) and 2 (seq 2,
/// released as packet 7); `b` queues 1 (seq 1) and 3 (seq 3), plus an
/// entry at seq 9 for 3 that is not in its queue (layout 1 never read it).
fn write_layout_1(conn: &mut redis::Connection, p: &str) {
    let k = |name: &str| format!("{p}{name}").into_bytes();
    cmd(conn, &[b"SET", &k("layout"), b"1"]);
    cmd(conn, &[b"SET", &k("last_message_id"), b"4"]);
    for (id, refs) in [(1u8, "2"), (2, "1"), (3, "2")] {
        let body = body_v1(
            id,
            1,
            &format!("t/{id}"),
            format!("payload {id}").as_bytes(),
        );
        cmd(
            conn,
            &[
                b"HSET",
                &k(&format!("msg:{id}")),
                b"body",
                &body,
                b"refs",
                refs.as_bytes(),
            ],
        );
    }
    for (client, seq, entry, queued) in [
        ("a", "1", entry_v1(1, "", 1), true),
        ("a", "2", entry_v1(2, "7", 2), true),
        ("b", "1", entry_v1(1, "", 1), true),
        ("b", "3", entry_v1(3, "", 1), true),
        ("b", "9", entry_v1(3, "", 1), false),
    ] {
        cmd(
            conn,
            &[
                b"HSET",
                &k(&format!("entries:{client}")),
                seq.as_bytes(),
                &entry,
            ],
        );
        if queued {
            cmd(
                conn,
                &[
                    b"ZADD",
                    &k(&format!("queue:{client}")),
                    seq.as_bytes(),
                    seq.as_bytes(),
                ],
            );
        }
    }
}

async fn check_upgraded(store: &RedisStore, conn: &mut redis::Connection, p: &str) {
    let read = |client: &'static str| async move {
        store
            .read_queue(client, None, 100)
            .await
            .unwrap_or_else(|e| panic!("queue of {client}: {e}"))
    };
    let a = read("a").await;
    let got: Vec<_> = a
        .iter()
        .map(|q| (q.seq, q.message.id, q.delivery.qos, q.state))
        .collect();
    assert_eq!(
        got,
        [
            (1, 1, QoS::AtLeastOnce, PacketState::Queued),
            (
                2,
                2,
                QoS::ExactlyOnce,
                PacketState::Released { packet_id: 7 }
            ),
        ]
    );
    assert_eq!(&a[1].message.payload[..], b"payload 2");
    assert_eq!(a[1].message.topic, "t/2");
    let b = read("b").await;
    let got: Vec<_> = b.iter().map(|q| (q.seq, q.message.id)).collect();
    assert_eq!(got, [(1, 1), (3, 3)]);
    assert_eq!(&b[1].message.payload[..], b"payload 3");
    let bounds = store.queue_bounds("b").await.expect("bounds");
    assert_eq!((bounds.len, bounds.last), (2, Some(3)));

    let get = |conn: &mut redis::Connection, name: &str| -> Option<Vec<u8>> {
        redis::cmd("GET")
            .arg(format!("{p}{name}"))
            .query(conn)
            .expect("GET")
    };
    assert_eq!(get(conn, "layout").as_deref(), Some(&b"2"[..]));
    let left: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{p}entries:*"))
        .query(conn)
        .expect("KEYS");
    assert!(left.is_empty(), "layout 1 entries left: {left:?}");
    // Message 3 lost the reference of the entry that was not queued.
    for (id, refs) in [(1, "0000000002"), (2, "0000000001"), (3, "0000000001")] {
        let body = get(conn, &format!("msg:{id}")).expect("body");
        assert_eq!(&body[..10], refs.as_bytes(), "references of message {id}");
    }

    // The upgraded store works on: the last references take the bodies.
    let remove = |client: &str, seq| PacketOp::Remove {
        client: Arc::from(client),
        seq,
    };
    store
        .write(vec![remove("a", 1), remove("b", 1), remove("b", 3)])
        .await
        .expect("remove");
    assert_eq!(get(conn, "msg:1"), None);
    assert_eq!(get(conn, "msg:3"), None);
    assert!(get(conn, "msg:2").is_some());
}

#[tokio::test]
async fn a_layout_1_prefix_is_upgraded_at_open() {
    let cleanup = Cleanup {
        url: redis_url(),
        prefix: unique_prefix("upgrade"),
    };
    let mut conn = connect(&cleanup.url);
    write_layout_1(&mut conn, &cleanup.prefix);
    let store = RedisStore::open(
        &cleanup.url,
        options(&cleanup.prefix, Duration::from_secs(5)),
    )
    .await
    .expect("open a layout 1 prefix");
    check_upgraded(&store, &mut conn, &cleanup.prefix).await;
    store.close().await;
}

/// What a broker killed during its upgrade leaves: the marker that keeps
/// earlier brokers out, a body and a queue already in layout 2, the rest
/// in layout 1.
#[tokio::test]
async fn an_upgrade_cut_off_is_finished_by_the_next_open() {
    let cleanup = Cleanup {
        url: redis_url(),
        prefix: unique_prefix("upgrade-cut"),
    };
    let p = cleanup.prefix.clone();
    let mut conn = connect(&cleanup.url);
    write_layout_1(&mut conn, &p);
    let k = |name: &str| format!("{p}{name}").into_bytes();
    cmd(&mut conn, &[b"SET", &k("layout"), b"1-to-2"]);
    // Message 2 and session a's seq 2 already moved.
    let mut body = b"0000000001".to_vec();
    body.extend_from_slice(&body_v1(2, 1, "t/2", b"payload 2"));
    cmd(&mut conn, &[b"DEL", &k("msg:2")]);
    cmd(&mut conn, &[b"SET", &k("msg:2"), &body]);
    cmd(&mut conn, &[b"HDEL", &k("entries:a"), b"2"]);
    cmd(&mut conn, &[b"ZREM", &k("queue:a"), b"2"]);
    let mut member = b"2:".to_vec();
    member.extend_from_slice(&entry_v1(2, "7", 2));
    cmd(&mut conn, &[b"ZADD", &k("queue:a"), b"2", &member]);

    let store = RedisStore::open(&cleanup.url, options(&p, Duration::from_secs(5)))
        .await
        .expect("open a prefix whose upgrade was cut off");
    check_upgraded(&store, &mut conn, &p).await;
    store.close().await;
}
