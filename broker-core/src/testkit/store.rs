//! Cases about the store as a whole: a fresh store, and a reopened one.

use super::sessions::{load, record, rich_subscriptions};
use super::support::{
    client, enqueue, enqueue_one, msg, ok, read_all, remove, rich_delivery, rich_messages, seqs,
    set_state, sorted, target, write,
};
use super::StoreFactory;
use crate::message::Message;
use crate::storage::{PacketOp, PacketState, QueueTarget, QueuedPacket, Storage, StoredSession};
use std::sync::Arc;

/// A fresh store is empty: no queue, no incoming QoS 2 state, no session, no
/// retained message, `last_message_id` 0. Fails when a factory hands out a
/// store that is shared with other tests or left over from an earlier run.
pub async fn empty_store<F: StoreFactory + ?Sized>(factory: &F) {
    let storage = factory.open().await;
    assert!(
        ok(
            storage.packets.read_queue("nobody", None, 10).await,
            "read_queue"
        )
        .is_empty(),
        "fresh store has a queue for an unknown client"
    );
    assert!(
        ok(
            storage.packets.incoming_qos2("nobody").await,
            "incoming_qos2"
        )
        .is_empty(),
        "fresh store has incoming QoS 2 state"
    );
    assert_eq!(
        ok(storage.packets.last_message_id().await, "last_message_id"),
        0,
        "fresh store's last_message_id"
    );
    assert!(
        ok(storage.subscriptions.load_sessions().await, "load_sessions").is_empty(),
        "fresh store has sessions (is the factory giving a fresh store per evaluation?)"
    );
    for filter in ["#", "$SYS/#", "+/+"] {
        assert!(
            ok(
                storage.retained.lookup_retained(filter).await,
                "lookup_retained"
            )
            .is_empty(),
            "fresh store has retained messages for {filter:?}"
        );
    }
    factory.close(storage).await;
}

/// Everything readable through the traits, for comparing before and after a
/// reopen.
#[derive(Debug, PartialEq)]
struct Snapshot {
    queues: Vec<Vec<QueuedPacket>>,
    incoming_qos2: Vec<Vec<u16>>,
    sessions: Vec<StoredSession>,
    retained: Vec<Arc<Message>>,
    last_message_id: u64,
}

const CLIENTS: [&str; 3] = ["durable-a", "durable-b", "durable-c"];

async fn snapshot(storage: &Storage) -> Snapshot {
    let mut queues = Vec::new();
    let mut incoming_qos2 = Vec::new();
    for c in CLIENTS {
        queues.push(read_all(storage, c).await);
        incoming_qos2.push(sorted(ok(
            storage.packets.incoming_qos2(c).await,
            "incoming_qos2",
        )));
    }
    let mut retained = Vec::new();
    for filter in ["#", "$SYS/#"] {
        retained.extend(ok(
            storage.retained.lookup_retained(filter).await,
            "lookup_retained",
        ));
    }
    retained.sort_by(|x, y| x.topic.cmp(&y.topic));
    Snapshot {
        queues,
        incoming_qos2,
        sessions: load(storage).await,
        retained,
        last_message_id: ok(storage.packets.last_message_id().await, "last_message_id"),
    }
}

/// Reopen after close (durable stores only): everything written before a
/// close reads back identical after opening again: queues with gaps, a
/// released entry and per-session QoS, a body shared by two sessions,
/// incoming QoS 2 state, sessions with subscriptions, retained messages
/// (`$SYS` too), and `last_message_id`. Writes after the reopen persist
/// across a second reopen, and the shared body survives until its last
/// reference is acked.
///
/// **Skipped by design for non-durable stores** (when
/// [`StoreFactory::durable`] is false): they promise nothing across a
/// close, so the case asserts nothing and returns.
pub async fn reopen_after_close<F: StoreFactory + ?Sized>(factory: &F) {
    if !factory.durable() {
        eprintln!("reopen_after_close: skipped, the store is not durable");
        return;
    }
    let [a, b, c] = CLIENTS.map(client);
    let storage = factory.open().await;

    // Queues: a has 1..=20 minus acked 5 and 6, 7 released, then a far seq.
    let mut ops: Vec<PacketOp> = (1..=20).map(|s| enqueue_one(&a, s, s)).collect();
    ops.push(enqueue_one(&a, 1 << 40, 21));
    let shared = rich_messages(100).swap_remove(0);
    ops.push(enqueue(
        shared.clone(),
        vec![
            target(&a, (1 << 40) + 1),
            QueueTarget {
                client: b.clone(),
                seq: 1,
                delivery: rich_delivery(0),
            },
        ],
    ));
    ops.push(enqueue_one(&b, 2, 50));
    ops.extend([remove(&a, 5), remove(&a, 6)]);
    ops.push(set_state(&a, 7, PacketState::Released { packet_id: 77 }));
    for packet_id in [3, 9] {
        ops.push(PacketOp::IncomingQos2Received {
            client: a.clone(),
            packet_id,
        });
    }
    ops.push(PacketOp::IncomingQos2Received {
        client: c.clone(),
        packet_id: 65535,
    });
    write(&storage, ops, "enqueue before close").await;

    ok(
        storage
            .subscriptions
            .save_session(&record("durable-a", Some(86_400), Some(1_700_000_000_000)))
            .await,
        "save_session",
    );
    ok(
        storage
            .subscriptions
            .add_subscriptions("durable-a", &rich_subscriptions())
            .await,
        "add_subscriptions",
    );
    ok(
        storage
            .subscriptions
            .save_session(&record("durable-b", None, None))
            .await,
        "save_session",
    );
    // Retained ids stay below the queued ones: whether retained bodies count
    // for `last_message_id` is not part of the contract.
    let mut retained = rich_messages(60);
    retained.push(msg(70, "$SYS/broker/version", "1.0"));
    for m in &retained {
        ok(
            storage.retained.set_retained(m.clone()).await,
            "set_retained",
        );
    }

    let before = snapshot(&storage).await;
    assert_eq!(before.last_message_id, 100, "last_message_id before close");
    factory.close(storage).await;

    let storage = factory.open().await;
    let after = snapshot(&storage).await;
    assert_eq!(
        after.queues, before.queues,
        "queues changed across close and reopen"
    );
    assert_eq!(
        after.incoming_qos2, before.incoming_qos2,
        "incoming QoS 2 state changed across close and reopen"
    );
    assert_eq!(
        after.sessions, before.sessions,
        "sessions changed across close and reopen"
    );
    assert_eq!(
        after.retained, before.retained,
        "retained messages changed across close and reopen"
    );
    assert_eq!(
        after.last_message_id, before.last_message_id,
        "last_message_id changed across close and reopen"
    );

    // Keep working after the reopen: new entry, PUBCOMP of the released one,
    // ack of the shared body in one of its two sessions, a PUBREL.
    write(
        &storage,
        vec![
            enqueue_one(&a, (1 << 40) + 2, 101),
            remove(&a, 7),
            remove(&a, (1 << 40) + 1),
            PacketOp::IncomingQos2Released {
                client: a.clone(),
                packet_id: 3,
            },
        ],
        "write after reopen",
    )
    .await;
    ok(
        storage
            .retained
            .delete_retained("$SYS/broker/version")
            .await,
        "delete_retained",
    );
    ok(
        storage.subscriptions.delete_session("durable-b").await,
        "delete_session",
    );
    let before = snapshot(&storage).await;
    factory.close(storage).await;

    let storage = factory.open().await;
    let after = snapshot(&storage).await;
    assert_eq!(
        after, before,
        "writes made after a reopen did not survive the next reopen"
    );
    let mut want_a: Vec<u64> = (1..=20).filter(|s| ![5, 6, 7].contains(s)).collect();
    want_a.extend([1 << 40, (1 << 40) + 2]);
    assert_eq!(
        seqs(&after.queues[0]),
        want_a,
        "queue of durable-a after the second reopen"
    );
    assert_eq!(
        after.last_message_id, 101,
        "last_message_id after the second reopen"
    );
    let b_queue = &after.queues[1];
    assert_eq!(
        seqs(b_queue),
        vec![1, 2],
        "queue of durable-b after the second reopen"
    );
    assert_eq!(
        *b_queue[0].message, *shared,
        "the body shared with an acked session did not survive the reopen"
    );
    assert_eq!(
        b_queue[0].delivery,
        rich_delivery(0),
        "per-session delivery (QoS, retain, subscription ids, shared group) after reopen"
    );

    write(&storage, vec![remove(&b, 1)], "ack the last reference").await;
    assert_eq!(
        seqs(&read_all(&storage, &b).await),
        vec![2],
        "after acking the last reference"
    );
    factory.close(storage).await;
}
