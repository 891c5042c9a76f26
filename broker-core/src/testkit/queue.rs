//! Cases for [`PacketStore`](crate::storage::PacketStore): session queues,
//! batches and incoming QoS 2 state.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::support::{
    client, enqueue, enqueue_one, msg, ok, payload_for, read_all, remove, rich_delivery,
    rich_messages, seqs, set_state, sorted, target, write, Rng,
};
use super::StoreFactory;
use crate::message::{MessageId, QoS, Seq};
use crate::storage::{ClientId, Delivery, PacketOp, PacketState, QueueBounds, QueueTarget};

/// Ordering under concurrency: 10,000 messages across 100 sessions, written
/// by 8 tasks at once in batches of 1 to 16 operations, one message in ten
/// fanned out to three sessions.
///
/// Each task takes sequence numbers from a per-session counter, as the core
/// does, but holds them in a batch before writing, so the store receives
/// entries out of sequence order. Every queue must read back, in pages,
/// complete, with seqs 1..=n strictly increasing, no duplicates, each with
/// the right body and QoS (Mosca lesson 1: the order key is the seq, never
/// insertion order).
pub async fn queue_order_concurrent<F: StoreFactory + ?Sized>(factory: &F) {
    const SESSIONS: usize = 100;
    const MESSAGES: u64 = 10_000;
    const TASKS: u64 = 8;

    let storage = factory.open().await;
    let clients: Arc<Vec<ClientId>> = Arc::new(
        (0..SESSIONS)
            .map(|i| client(&format!("order-{i:03}")))
            .collect(),
    );
    let counters: Arc<Vec<AtomicU64>> =
        Arc::new((0..SESSIONS).map(|_| AtomicU64::new(0)).collect());
    let next_id = Arc::new(AtomicU64::new(0));

    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let storage = storage.clone();
        let clients = clients.clone();
        let counters = counters.clone();
        let next_id = next_id.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(t + 1);
            // (session index, seq, message id) of every entry this task wrote.
            let mut written: Vec<(usize, Seq, MessageId)> = Vec::new();
            let mut batch: Vec<PacketOp> = Vec::new();
            let mut batch_size = 1 + rng.below(16) as usize;
            for _ in 0..MESSAGES / TASKS {
                let id = next_id.fetch_add(1, Ordering::SeqCst) + 1;
                let first = rng.below(SESSIONS as u64) as usize;
                let fan_out = if rng.below(10) == 0 { 3 } else { 1 };
                let mut targets = Vec::with_capacity(fan_out);
                for k in 0..fan_out {
                    // 37 is coprime with 100: three distinct sessions.
                    let s = (first + k * 37) % SESSIONS;
                    let seq = counters[s].fetch_add(1, Ordering::SeqCst) + 1;
                    written.push((s, seq, id));
                    targets.push(QueueTarget {
                        client: clients[s].clone(),
                        seq,
                        delivery: Delivery::new(qos_for(id)),
                    });
                }
                batch.push(enqueue(
                    msg(id, &format!("order/{first}"), format!("m{id}")),
                    targets,
                ));
                if batch.len() >= batch_size {
                    write(&storage, std::mem::take(&mut batch), "concurrent enqueue").await;
                    batch_size = 1 + rng.below(16) as usize;
                }
                if rng.below(4) == 0 {
                    tokio::task::yield_now().await;
                }
            }
            if !batch.is_empty() {
                write(&storage, batch, "concurrent enqueue").await;
            }
            written
        }));
    }

    let mut expected: Vec<BTreeMap<Seq, MessageId>> = vec![BTreeMap::new(); SESSIONS];
    for task in tasks {
        let written = task.await.expect("an enqueuer task panicked");
        for (s, seq, id) in written {
            expected[s].insert(seq, id);
        }
    }

    let mut total = 0;
    for (s, c) in clients.iter().enumerate() {
        let got = read_all(&storage, c).await;
        let n = counters[s].load(Ordering::SeqCst);
        assert_eq!(
            got.len() as u64,
            n,
            "session {c}: {n} entries were queued, {} read back",
            got.len()
        );
        for (i, p) in got.iter().enumerate() {
            let want = i as u64 + 1;
            assert_eq!(
                p.seq, want,
                "session {c}: entry {i} has seq {}, expected {want} (an entry is missing, duplicated or out of order)",
                p.seq
            );
            let id = expected[s][&p.seq];
            assert_eq!(
                p.message.id, id,
                "session {c} seq {}: wrong message body",
                p.seq
            );
            assert_eq!(
                &p.message.payload[..],
                format!("m{id}").as_bytes(),
                "session {c} seq {}: wrong payload",
                p.seq
            );
            assert_eq!(
                p.delivery.qos,
                qos_for(id),
                "session {c} seq {}: wrong QoS",
                p.seq
            );
            assert_eq!(
                p.state,
                PacketState::Queued,
                "session {c} seq {}: wrong state",
                p.seq
            );
        }
        total += got.len() as u64;
    }
    assert!(
        total >= MESSAGES,
        "{total} entries read back in all, fewer than the {MESSAGES} messages"
    );
    let last = ok(storage.packets.last_message_id().await, "last_message_id");
    assert_eq!(last, MESSAGES, "last_message_id after {MESSAGES} messages");
    factory.close(storage).await;
}

fn qos_for(id: MessageId) -> QoS {
    if id.is_multiple_of(2) {
        QoS::ExactlyOnce
    } else {
        QoS::AtLeastOnce
    }
}

/// Sequence numbers order numerically, not as text or little-endian bytes
/// (Mosca lesson 7: unpadded keys sorted 1, 10, 2), whatever order they are
/// written in, and `after` works across byte boundaries.
///
/// Values stay below 2^53, so stores that keep seqs as JSON numbers or Redis
/// scores qualify; the core never gets near that.
pub async fn seq_numeric_order<F: StoreFactory + ?Sized>(factory: &F) {
    const SEQS: [Seq; 21] = [
        1,
        2,
        9,
        10,
        11,
        99,
        100,
        101,
        255,
        256,
        257,
        1000,
        65_535,
        65_536,
        65_537,
        1 << 24,
        (1 << 32) - 1,
        1 << 32,
        (1 << 32) + 1,
        1 << 40,
        (1 << 53) - 1,
    ];
    let storage = factory.open().await;
    let c = client("numeric");
    // Written interleaved from both ends, one per batch.
    let mut order: Vec<Seq> = Vec::new();
    let (mut lo, mut hi) = (0, SEQS.len() - 1);
    while lo <= hi {
        order.push(SEQS[hi]);
        if lo != hi {
            order.push(SEQS[lo]);
        }
        lo += 1;
        hi -= 1;
    }
    for (i, seq) in order.iter().enumerate() {
        write(
            &storage,
            vec![enqueue_one(&c, *seq, i as u64 + 1)],
            "enqueue",
        )
        .await;
    }
    let got = read_all(&storage, &c).await;
    assert_eq!(seqs(&got), SEQS.to_vec(), "queue not in numeric seq order");
    for p in &got {
        assert_eq!(
            &p.message.payload[..],
            payload_for(&c, p.seq).as_bytes(),
            "seq {} carries another entry's message",
            p.seq
        );
    }
    for (after, limit, want) in [
        (10, 3, vec![11, 99, 100]),
        (255, 2, vec![256, 257]),
        (65_535, 2, vec![65_536, 65_537]),
        (1 << 32, 1, vec![(1 << 32) + 1]),
        ((1 << 53) - 1, 5, vec![]),
    ] {
        let page = ok(
            storage.packets.read_queue(&c, Some(after), limit).await,
            "read_queue",
        );
        assert_eq!(
            seqs(&page),
            want,
            "read_queue(after {after}, limit {limit})"
        );
    }
    factory.close(storage).await;
}

/// Queues of different sessions never mix, even when client ids share
/// prefixes or contain separators and pattern characters (`:`, `/`, `%`, `_`)
/// that key-value or SQL `LIKE` schemes might trip on.
pub async fn queue_isolation<F: StoreFactory + ?Sized>(factory: &F) {
    const NAMES: [&str; 10] = [
        "a", "a:1", "a:10", "ab", "a/b", "A", "ä", "a b", "a%", "a_b",
    ];
    let storage = factory.open().await;
    let clients: Vec<ClientId> = NAMES.iter().map(|n| client(n)).collect();
    let mut id = 0;
    let mut ops = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        for seq in 1..=(i as u64 + 1) {
            id += 1;
            ops.push(enqueue_one(c, seq, id));
        }
        ops.push(PacketOp::IncomingQos2Received {
            client: c.clone(),
            packet_id: i as u16 + 1,
        });
    }
    write(&storage, ops, "enqueue for similar client ids").await;

    let check = |c: &ClientId, n: u64, got: &[crate::storage::QueuedPacket]| {
        assert_eq!(
            seqs(got),
            (1..=n).collect::<Vec<_>>(),
            "queue of client {c:?} mixed with another client's"
        );
        for p in got {
            assert_eq!(
                &p.message.payload[..],
                payload_for(c, p.seq).as_bytes(),
                "client {c:?} seq {} holds another client's message",
                p.seq
            );
        }
    };
    for (i, c) in clients.iter().enumerate() {
        check(c, i as u64 + 1, &read_all(&storage, c).await);
        let q2 = ok(storage.packets.incoming_qos2(c).await, "incoming_qos2");
        assert_eq!(q2, vec![i as u16 + 1], "incoming QoS 2 ids of client {c:?}");
    }

    // Acking and purging one client leaves the look-alikes alone.
    write(
        &storage,
        vec![
            remove(&clients[0], 1),
            PacketOp::Purge {
                client: clients[3].clone(),
            },
        ],
        "remove and purge",
    )
    .await;
    assert!(
        read_all(&storage, &clients[0]).await.is_empty(),
        "client \"a\" after its ack"
    );
    assert!(
        read_all(&storage, &clients[3]).await.is_empty(),
        "client \"ab\" after purge"
    );
    for (i, c) in clients
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 0 && *i != 3)
    {
        check(c, i as u64 + 1, &read_all(&storage, c).await);
    }
    factory.close(storage).await;
}

/// Fan-out: one message queued for 50 sessions, each at its own seq behind
/// a different backlog. Every session reads the same body with its own QoS
/// and retain flag; acking it in all sessions but one leaves the body intact
/// for the last one (the body is shared, never freed early).
pub async fn fan_out_enqueue<F: StoreFactory + ?Sized>(factory: &F) {
    const SESSIONS: u64 = 50;
    let storage = factory.open().await;
    let clients: Vec<ClientId> = (0..SESSIONS).map(|i| client(&format!("fan-{i}"))).collect();

    // Session i already holds i entries.
    let mut ops = Vec::new();
    let mut id = 1000;
    for (i, c) in clients.iter().enumerate() {
        for seq in 1..=i as u64 {
            id += 1;
            ops.push(enqueue_one(c, seq, id));
        }
    }
    write(&storage, ops, "backlog").await;

    let shared = rich_messages(1).swap_remove(0);
    let targets: Vec<QueueTarget> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| QueueTarget {
            client: c.clone(),
            seq: i as u64 + 1,
            delivery: Delivery {
                qos: if i % 2 == 0 {
                    QoS::AtLeastOnce
                } else {
                    QoS::ExactlyOnce
                },
                retain: i % 3 == 0,
                ..Delivery::new(QoS::AtMostOnce)
            },
        })
        .collect();
    write(
        &storage,
        vec![enqueue(shared.clone(), targets.clone())],
        "fan-out",
    )
    .await;

    for (t, c) in targets.iter().zip(&clients) {
        let got = read_all(&storage, c).await;
        assert_eq!(
            seqs(&got),
            (1..=t.seq).collect::<Vec<_>>(),
            "queue of {c} after fan-out"
        );
        let last = &got[got.len() - 1];
        assert_eq!(*last.message, *shared, "{c} reads a different body");
        assert_eq!(last.delivery, t.delivery, "{c}: per-session delivery lost");
    }

    // Ack the shared message everywhere but in the last session.
    let ops = targets[..targets.len() - 1]
        .iter()
        .map(|t| remove(&t.client, t.seq))
        .collect();
    write(&storage, ops, "ack in all but one").await;
    let last_target = &targets[targets.len() - 1];
    let got = read_all(&storage, &last_target.client).await;
    let entry = got
        .iter()
        .find(|p| p.seq == last_target.seq)
        .expect("the shared message disappeared from the last session when others acked it");
    assert_eq!(
        *entry.message, *shared,
        "shared body changed when others acked it"
    );
    for t in &targets[..targets.len() - 1] {
        let got = read_all(&storage, &t.client).await;
        assert_eq!(
            seqs(&got),
            (1..t.seq).collect::<Vec<_>>(),
            "{}: ack removed the wrong entries",
            t.client
        );
    }

    write(
        &storage,
        vec![remove(&last_target.client, last_target.seq)],
        "last ack",
    )
    .await;
    let got = read_all(&storage, &last_target.client).await;
    assert_eq!(
        seqs(&got),
        (1..last_target.seq).collect::<Vec<_>>(),
        "last session after its ack"
    );
    factory.close(storage).await;
}

/// Acks remove exactly the entry named, wherever it sits (Mosca lesson 5:
/// removing by a reused packet id removed several entries), and other
/// sessions with the same seqs are untouched.
pub async fn remove_in_middle<F: StoreFactory + ?Sized>(factory: &F) {
    let storage = factory.open().await;
    let a = client("ack");
    let b = client("ack-other");
    let mut ops = Vec::new();
    for seq in 1..=10 {
        ops.push(enqueue_one(&a, seq, seq));
        ops.push(enqueue_one(&b, seq, 100 + seq));
    }
    write(&storage, ops, "enqueue").await;

    write(&storage, vec![remove(&a, 5)], "remove 5").await;
    assert_eq!(
        seqs(&read_all(&storage, &a).await),
        vec![1, 2, 3, 4, 6, 7, 8, 9, 10],
        "after removing seq 5"
    );

    write(&storage, vec![remove(&a, 1), remove(&a, 10)], "remove ends").await;
    let got = read_all(&storage, &a).await;
    assert_eq!(
        seqs(&got),
        vec![2, 3, 4, 6, 7, 8, 9],
        "after removing first and last"
    );
    for p in &got {
        assert_eq!(
            &p.message.payload[..],
            payload_for(&a, p.seq).as_bytes(),
            "seq {} carries another entry's message after removals",
            p.seq
        );
    }

    let rest = [9, 2, 7, 4, 3, 8, 6];
    write(
        &storage,
        rest.iter().map(|s| remove(&a, *s)).collect(),
        "remove rest",
    )
    .await;
    assert!(
        read_all(&storage, &a).await.is_empty(),
        "queue should be empty after acking everything"
    );

    write(
        &storage,
        vec![enqueue_one(&a, 11, 11)],
        "enqueue after emptying",
    )
    .await;
    assert_eq!(
        seqs(&read_all(&storage, &a).await),
        vec![11],
        "enqueue after the queue emptied"
    );

    assert_eq!(
        seqs(&read_all(&storage, &b).await),
        (1..=10).collect::<Vec<_>>(),
        "another session with the same seqs was affected"
    );
    factory.close(storage).await;
}

/// `queue_bounds` gives a queue's length and its greatest seq, compared as
/// numbers (10 after 9, 2^40 after both), through removals at either end,
/// a state change and a purge; an unknown or emptied queue has none, and
/// another session's queue does not count.
pub async fn queue_bounds<F: StoreFactory + ?Sized>(factory: &F) {
    let storage = factory.open().await;
    let a = client("bounds");
    let other = client("bounds-other");
    let bounds = |len: u64, last: Option<Seq>| QueueBounds { len, last };
    let read = |c: ClientId| {
        let storage = storage.clone();
        async move { ok(storage.packets.queue_bounds(&c).await, "queue_bounds") }
    };
    assert_eq!(read(a.clone()).await, bounds(0, None), "an unknown queue");

    let big: Seq = 1 << 40;
    let mut ops: Vec<PacketOp> = [2, 9, 10, big]
        .iter()
        .map(|s| enqueue_one(&a, *s, *s))
        .collect();
    ops.push(enqueue_one(&other, big + 5, big + 5));
    write(&storage, ops, "enqueue").await;
    assert_eq!(read(a.clone()).await, bounds(4, Some(big)), "four entries");
    assert_eq!(read(other.clone()).await, bounds(1, Some(big + 5)));

    write(&storage, vec![remove(&a, big)], "remove the last").await;
    assert_eq!(
        read(a.clone()).await,
        bounds(3, Some(10)),
        "10 is after 9 as a number"
    );
    write(
        &storage,
        vec![
            remove(&a, 2),
            set_state(&a, 9, PacketState::Released { packet_id: 9 }),
        ],
        "remove the first, release one",
    )
    .await;
    assert_eq!(read(a.clone()).await, bounds(2, Some(10)));

    write(
        &storage,
        vec![PacketOp::Purge { client: a.clone() }],
        "purge",
    )
    .await;
    assert_eq!(read(a.clone()).await, bounds(0, None), "after a purge");
    assert_eq!(
        read(other.clone()).await,
        bounds(1, Some(big + 5)),
        "another session's queue after a purge"
    );
    factory.close(storage).await;
}

/// Removing what is not there is not an error (a PUBACK may be repeated, an
/// ack may follow a purge): unknown seq, unknown client, purge of an unknown
/// client, PUBREL for an unknown packet id. Existing data stays.
pub async fn remove_unknown_is_noop<F: StoreFactory + ?Sized>(factory: &F) {
    let storage = factory.open().await;
    let c = client("noop");
    let ghost = client("ghost");
    write(
        &storage,
        (1..=3).map(|s| enqueue_one(&c, s, s)).collect(),
        "enqueue",
    )
    .await;
    write(&storage, vec![remove(&c, 2)], "remove 2").await;
    write(
        &storage,
        vec![
            remove(&c, 2),
            remove(&c, 99),
            remove(&ghost, 1),
            PacketOp::Purge {
                client: ghost.clone(),
            },
            PacketOp::IncomingQos2Released {
                client: c.clone(),
                packet_id: 7,
            },
            PacketOp::IncomingQos2Released {
                client: ghost.clone(),
                packet_id: 7,
            },
        ],
        "removals of unknown entries",
    )
    .await;
    assert_eq!(
        seqs(&read_all(&storage, &c).await),
        vec![1, 3],
        "existing entries after no-op removals"
    );
    assert!(
        read_all(&storage, &ghost).await.is_empty(),
        "an unknown client got a queue"
    );
    assert!(
        ok(storage.packets.incoming_qos2(&ghost).await, "incoming_qos2").is_empty(),
        "an unknown client got incoming QoS 2 state"
    );
    factory.close(storage).await;
}

/// Paged replay over 1,000 entries with gaps (seqs 3, 6, ..., 3000, as after
/// acks): for several page sizes the pages are contiguous, ordered, full
/// except the last, and together give every entry exactly once (Mosca lesson
/// 8: replay is paged, never truncated). Also `after` between entries,
/// before the first, at the last, and limits 0 and larger than the queue.
pub async fn paging<F: StoreFactory + ?Sized>(factory: &F) {
    const N: u64 = 1000;
    let storage = factory.open().await;
    let c = client("pager");
    let all: Vec<Seq> = (1..=N).map(|i| i * 3).collect();
    for chunk in all.chunks(100) {
        write(
            &storage,
            chunk.iter().map(|s| enqueue_one(&c, *s, *s)).collect(),
            "enqueue",
        )
        .await;
    }

    for page_size in [1, 64, 999, 1000, 1001] {
        let mut read: Vec<Seq> = Vec::new();
        loop {
            let after = read.last().copied();
            let page = ok(
                storage.packets.read_queue(&c, after, page_size).await,
                "read_queue",
            );
            let remaining = all.len() - read.len();
            assert_eq!(
                page.len(),
                page_size.min(remaining),
                "page after {after:?} with limit {page_size}: wrong length ({remaining} entries remain)"
            );
            if page.is_empty() {
                break;
            }
            let start = read.len();
            assert_eq!(
                seqs(&page),
                all[start..start + page.len()].to_vec(),
                "page after {after:?} with limit {page_size} is not the next contiguous run"
            );
            read.extend(seqs(&page));
        }
        assert_eq!(
            read, all,
            "paging with limit {page_size} did not give every entry once"
        );
    }

    for (after, limit, want) in [
        (None, 5, vec![3, 6, 9, 12, 15]),
        (Some(0), 2, vec![3, 6]),
        (Some(4), 3, vec![6, 9, 12]),
        (Some(2999), 10, vec![3000]),
        (Some(3000), 10, vec![]),
        (Some(u64::MAX), 10, vec![]),
        (None, 0, vec![]),
        (Some(300), 0, vec![]),
    ] {
        let page = ok(
            storage.packets.read_queue(&c, after, limit).await,
            "read_queue",
        );
        assert_eq!(
            seqs(&page),
            want,
            "read_queue(after {after:?}, limit {limit})"
        );
    }
    let everything = ok(
        storage.packets.read_queue(&c, None, 5000).await,
        "read_queue",
    );
    assert_eq!(
        seqs(&everything),
        all,
        "read_queue with a limit above the queue length"
    );
    factory.close(storage).await;
}

/// `SetState` to `Released` round trips and changes the entry in place: the
/// entry keeps its seq and position among older and newer entries and its
/// body (Mosca lesson 2: never move an entry to update it). The same packet
/// id released in another session is independent; PUBCOMP then removes
/// the entry.
pub async fn set_state_released<F: StoreFactory + ?Sized>(factory: &F) {
    let storage = factory.open().await;
    let c = client("rel");
    let other = client("rel-other");
    let q2 = |c: &ClientId, seq: Seq, id: MessageId| {
        enqueue(
            msg(id, "t/rel", payload_for(c, seq)),
            vec![QueueTarget {
                delivery: Delivery::new(QoS::ExactlyOnce),
                ..target(c, seq)
            }],
        )
    };
    let mut ops: Vec<PacketOp> = (1..=5).map(|s| q2(&c, s, s)).collect();
    ops.push(q2(&other, 1, 10));
    write(&storage, ops, "enqueue").await;

    let released = PacketState::Released { packet_id: 42 };
    write(
        &storage,
        vec![set_state(&c, 3, released), set_state(&other, 1, released)],
        "set Released",
    )
    .await;
    write(&storage, vec![q2(&c, 6, 6)], "enqueue after release").await;

    let got = read_all(&storage, &c).await;
    assert_eq!(
        seqs(&got),
        vec![1, 2, 3, 4, 5, 6],
        "the released entry moved or the queue changed"
    );
    for p in &got {
        let want = if p.seq == 3 {
            released
        } else {
            PacketState::Queued
        };
        assert_eq!(p.state, want, "state of seq {}", p.seq);
        assert_eq!(
            &p.message.payload[..],
            payload_for(&c, p.seq).as_bytes(),
            "seq {} lost its body on a state change",
            p.seq
        );
        assert_eq!(
            p.delivery.qos,
            QoS::ExactlyOnce,
            "seq {}: QoS changed",
            p.seq
        );
    }
    let page = ok(
        storage.packets.read_queue(&c, Some(2), 1).await,
        "read_queue",
    );
    assert_eq!(seqs(&page), vec![3], "paging past seq 2");
    assert_eq!(page[0].state, released, "state read through a page");

    // PUBCOMP for the released entry of `c` only.
    write(&storage, vec![remove(&c, 3)], "remove released").await;
    assert_eq!(
        seqs(&read_all(&storage, &c).await),
        vec![1, 2, 4, 5, 6],
        "after PUBCOMP"
    );
    let got = read_all(&storage, &other).await;
    assert_eq!(
        seqs(&got),
        vec![1],
        "other session after PUBCOMP in the first"
    );
    assert_eq!(got[0].state, released, "other session's released state");
    factory.close(storage).await;
}

/// Purge empties one session's queue and incoming QoS 2 state, and nothing
/// else: another session sharing a message body keeps it. The purged
/// session can start again from seq 1.
pub async fn purge_only_that_session<F: StoreFactory + ?Sized>(factory: &F) {
    let storage = factory.open().await;
    let a = client("purge-a");
    let b = client("purge-b");
    let shared = msg(1, "t/shared", "shared");
    let mut ops = vec![enqueue(shared.clone(), vec![target(&a, 1), target(&b, 1)])];
    for seq in 2..=5 {
        ops.push(enqueue_one(&a, seq, seq));
        ops.push(enqueue_one(&b, seq, 10 + seq));
    }
    for (c, packet_id) in [(&a, 1), (&a, 2), (&b, 1)] {
        ops.push(PacketOp::IncomingQos2Received {
            client: c.clone(),
            packet_id,
        });
    }
    write(&storage, ops, "enqueue").await;

    write(
        &storage,
        vec![PacketOp::Purge { client: a.clone() }],
        "purge",
    )
    .await;
    assert!(
        read_all(&storage, &a).await.is_empty(),
        "purged queue not empty"
    );
    assert!(
        ok(storage.packets.incoming_qos2(&a).await, "incoming_qos2").is_empty(),
        "purged session kept incoming QoS 2 state"
    );
    let got = read_all(&storage, &b).await;
    assert_eq!(
        seqs(&got),
        vec![1, 2, 3, 4, 5],
        "purge touched another session's queue"
    );
    assert_eq!(
        *got[0].message, *shared,
        "purge dropped a body another session still references"
    );
    assert_eq!(
        ok(storage.packets.incoming_qos2(&b).await, "incoming_qos2"),
        vec![1],
        "purge touched another session's incoming QoS 2 state"
    );

    write(
        &storage,
        vec![enqueue_one(&a, 1, 20)],
        "enqueue after purge",
    )
    .await;
    let got = read_all(&storage, &a).await;
    assert_eq!(seqs(&got), vec![1], "queue restarted after purge");
    assert_eq!(got[0].message.id, 20, "stale body after purge");
    factory.close(storage).await;
}

/// Incoming QoS 2 state: received ids are kept per session as a set
/// (a resent PUBLISH does not add a duplicate), released ids go, and
/// sessions are independent. Order of the returned ids is not specified.
pub async fn incoming_qos2<F: StoreFactory + ?Sized>(factory: &F) {
    let storage = factory.open().await;
    let a = client("q2-a");
    let b = client("q2-b");
    let received = |c: &ClientId, packet_id: u16| PacketOp::IncomingQos2Received {
        client: c.clone(),
        packet_id,
    };
    let released = |c: &ClientId, packet_id: u16| PacketOp::IncomingQos2Released {
        client: c.clone(),
        packet_id,
    };
    write(
        &storage,
        vec![received(&a, 1), received(&a, 65535), received(&b, 2)],
        "received",
    )
    .await;
    write(&storage, vec![received(&a, 2)], "received").await;
    write(
        &storage,
        vec![received(&a, 2)],
        "received again (resent PUBLISH)",
    )
    .await;

    let ids = |c: ClientId| {
        let storage = storage.clone();
        async move { sorted(ok(storage.packets.incoming_qos2(&c).await, "incoming_qos2")) }
    };
    assert_eq!(
        ids(a.clone()).await,
        vec![1, 2, 65535],
        "after receiving 1, 65535, 2, 2"
    );
    assert_eq!(ids(b.clone()).await, vec![2], "other session");

    write(&storage, vec![released(&a, 2)], "released").await;
    assert_eq!(ids(a.clone()).await, vec![1, 65535], "after releasing 2");
    assert_eq!(
        ids(b.clone()).await,
        vec![2],
        "releasing in one session touched another"
    );

    write(
        &storage,
        vec![released(&a, 1), released(&a, 65535)],
        "release all",
    )
    .await;
    assert!(
        ids(a.clone()).await.is_empty(),
        "after releasing everything"
    );
    assert!(
        read_all(&storage, &a).await.is_empty(),
        "incoming QoS 2 state leaked into the queue"
    );
    factory.close(storage).await;
}

/// `last_message_id` is 0 on an empty store, then the greatest id ever
/// stored: it follows the maximum, ignores lower ids written later, and does
/// not go back when bodies are removed.
pub async fn last_message_id_monotonic<F: StoreFactory + ?Sized>(factory: &F) {
    let storage = factory.open().await;
    let last = || {
        let storage = storage.clone();
        async move { ok(storage.packets.last_message_id().await, "last_message_id") }
    };
    let a = client("ids-a");
    let b = client("ids-b");
    assert_eq!(last().await, 0, "empty store");

    write(&storage, vec![enqueue_one(&a, 1, 5)], "enqueue id 5").await;
    assert_eq!(last().await, 5, "after storing id 5");

    write(&storage, vec![enqueue_one(&a, 2, 3)], "enqueue id 3").await;
    assert_eq!(last().await, 5, "a lower id lowered last_message_id");

    write(
        &storage,
        vec![enqueue(
            msg(9, "t/ids", "nine"),
            vec![target(&a, 3), target(&b, 1)],
        )],
        "enqueue id 9",
    )
    .await;
    assert_eq!(last().await, 9, "after storing id 9 for two sessions");

    write(
        &storage,
        vec![remove(&a, 1), remove(&a, 2), remove(&a, 3), remove(&b, 1)],
        "remove everything",
    )
    .await;
    assert_eq!(
        last().await,
        9,
        "last_message_id went back when bodies were removed"
    );

    write(&storage, vec![enqueue_one(&b, 2, 10)], "enqueue id 10").await;
    assert_eq!(last().await, 10, "after storing id 10");
    factory.close(storage).await;
}

/// A batch applies in order: an entry enqueued and removed in one batch
/// leaves nothing; enqueue then set state leaves the new state; purge then
/// enqueue keeps the new entry, enqueue then purge does not; received then
/// released leaves no QoS 2 state, released then received leaves it; entries
/// written out of seq order in one batch read back in seq order. An empty
/// batch is fine.
pub async fn batch_order<F: StoreFactory + ?Sized>(factory: &F) {
    let storage = factory.open().await;
    let c = client("batch");

    write(&storage, vec![], "empty batch").await;

    write(
        &storage,
        vec![enqueue_one(&c, 1, 1), remove(&c, 1)],
        "enqueue+remove",
    )
    .await;
    assert!(
        read_all(&storage, &c).await.is_empty(),
        "Enqueue then Remove of seq 1 in one batch left an entry"
    );

    let released = PacketState::Released { packet_id: 5 };
    write(
        &storage,
        vec![enqueue_one(&c, 1, 2), set_state(&c, 1, released)],
        "enqueue+set state",
    )
    .await;
    let got = read_all(&storage, &c).await;
    assert_eq!(seqs(&got), vec![1], "Enqueue then SetState");
    assert_eq!(
        got[0].state, released,
        "SetState in the same batch as Enqueue was lost"
    );

    write(
        &storage,
        vec![PacketOp::Purge { client: c.clone() }, enqueue_one(&c, 1, 3)],
        "purge+enqueue",
    )
    .await;
    let got = read_all(&storage, &c).await;
    assert_eq!(seqs(&got), vec![1], "Purge then Enqueue");
    assert_eq!(got[0].message.id, 3, "Purge then Enqueue kept the old body");
    assert_eq!(
        got[0].state,
        PacketState::Queued,
        "Purge then Enqueue kept the old state"
    );

    write(
        &storage,
        vec![enqueue_one(&c, 2, 4), PacketOp::Purge { client: c.clone() }],
        "enqueue+purge",
    )
    .await;
    assert!(
        read_all(&storage, &c).await.is_empty(),
        "Enqueue then Purge left entries"
    );

    write(
        &storage,
        vec![
            enqueue_one(&c, 1, 5),
            enqueue_one(&c, 2, 6),
            remove(&c, 1),
            enqueue_one(&c, 3, 7),
        ],
        "mixed",
    )
    .await;
    assert_eq!(
        seqs(&read_all(&storage, &c).await),
        vec![2, 3],
        "Enqueue 1, 2, Remove 1, Enqueue 3"
    );

    write(
        &storage,
        vec![
            enqueue_one(&c, 10, 10),
            enqueue_one(&c, 8, 8),
            enqueue_one(&c, 9, 9),
        ],
        "out of order",
    )
    .await;
    assert_eq!(
        seqs(&read_all(&storage, &c).await),
        vec![2, 3, 8, 9, 10],
        "entries written out of seq order in one batch"
    );

    write(
        &storage,
        vec![
            PacketOp::IncomingQos2Received {
                client: c.clone(),
                packet_id: 5,
            },
            PacketOp::IncomingQos2Released {
                client: c.clone(),
                packet_id: 5,
            },
            PacketOp::IncomingQos2Released {
                client: c.clone(),
                packet_id: 6,
            },
            PacketOp::IncomingQos2Received {
                client: c.clone(),
                packet_id: 6,
            },
        ],
        "qos2 in order",
    )
    .await;
    assert_eq!(
        ok(storage.packets.incoming_qos2(&c).await, "incoming_qos2"),
        vec![6],
        "Received+Released 5 should leave nothing, Released+Received 6 should leave 6"
    );
    factory.close(storage).await;
}

/// Batches are atomic for readers: a writer replaces the only entry of a
/// queue 200 times with `[Enqueue n+1, Remove n]` while a reader keeps
/// reading; the reader must always see exactly one entry, never both and
/// never none.
pub async fn batch_atomic_visibility<F: StoreFactory + ?Sized>(factory: &F) {
    const ROUNDS: u64 = 200;
    let storage = factory.open().await;
    let c = client("atomic");
    write(&storage, vec![enqueue_one(&c, 1, 1)], "first entry").await;

    let done = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let storage = storage.clone();
        let c = c.clone();
        let done = done.clone();
        let reads = reads.clone();
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                let got = ok(storage.packets.read_queue(&c, None, 10).await, "read_queue");
                assert_eq!(
                    got.len(),
                    1,
                    "a reader saw a half-applied batch: seqs {:?}",
                    seqs(&got)
                );
                reads.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
            }
        })
    };
    // Writes and reads must overlap: let the reader in before the first write
    // and again every few rounds, or a fast store finishes before it starts.
    let mut seen = 0;
    for n in 1..=ROUNDS {
        if n % 10 == 1 {
            while reads.load(Ordering::SeqCst) == seen && !reader.is_finished() {
                tokio::task::yield_now().await;
            }
            seen = reads.load(Ordering::SeqCst);
        }
        write(
            &storage,
            vec![enqueue_one(&c, n + 1, n + 1), remove(&c, n)],
            "replace entry",
        )
        .await;
        tokio::task::yield_now().await;
    }
    done.store(true, Ordering::SeqCst);
    reader.await.expect("the reader panicked");
    assert_eq!(
        seqs(&read_all(&storage, &c).await),
        vec![ROUNDS + 1],
        "final queue"
    );
    factory.close(storage).await;
}

/// Every field of a message survives enqueue and read back: topic, payload
/// (binary, empty, 256 KiB), QoS, retain, reception time, and every MQTT 5
/// property (payload format, expiry, content type, response topic,
/// correlation data, user properties in order with duplicates), telling
/// `Some("")` from `None`. The per-session QoS and retain flag are kept too.
pub async fn message_properties_round_trip<F: StoreFactory + ?Sized>(factory: &F) {
    let storage = factory.open().await;
    let c = client("props");
    let messages = rich_messages(1);
    let ops = messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            enqueue(
                m.clone(),
                vec![QueueTarget {
                    client: c.clone(),
                    seq: i as u64 + 1,
                    delivery: rich_delivery(i),
                }],
            )
        })
        .collect();
    write(&storage, ops, "enqueue rich messages").await;

    let got = read_all(&storage, &c).await;
    assert_eq!(got.len(), messages.len(), "entries read back");
    for (i, (p, m)) in got.iter().zip(&messages).enumerate() {
        assert_eq!(
            p.message.properties, m.properties,
            "properties of message {}",
            m.id
        );
        assert_eq!(
            *p.message, **m,
            "message {} changed through the store",
            m.id
        );
        assert_eq!(
            p.delivery,
            rich_delivery(i),
            "delivery (QoS, retain, subscription ids, shared group) of message {}",
            m.id
        );
    }
    factory.close(storage).await;
}

/// A stored body queued again for another session (a shared subscription
/// handing a message from a member that left to one that stays): the second
/// `Enqueue` names a message id that is already stored, in the same batch as
/// the removal of the first entry. The body must be reused, not duplicated
/// or lost: the new entry reads back whole, and once every entry is removed
/// the body goes, as for any other message.
pub async fn body_handed_over<F: StoreFactory + ?Sized>(factory: &F) {
    let storage = factory.open().await;
    let (leaving, staying, other) = (
        client("ho-leaving"),
        client("ho-staying"),
        client("ho-other"),
    );
    let shared = rich_messages(1).swap_remove(0);
    let delivery = rich_delivery(0);
    let at = |c: &ClientId, seq: Seq| QueueTarget {
        client: c.clone(),
        seq,
        delivery: delivery.clone(),
    };
    write(
        &storage,
        vec![
            enqueue(shared.clone(), vec![at(&leaving, 1), at(&other, 1)]),
            enqueue_one(&staying, 1, 2),
        ],
        "first enqueue",
    )
    .await;
    write(
        &storage,
        vec![
            enqueue(shared.clone(), vec![at(&staying, 2)]),
            remove(&leaving, 1),
        ],
        "hand-over batch",
    )
    .await;
    assert!(
        read_all(&storage, &leaving).await.is_empty(),
        "the entry handed over is still queued for the session that left"
    );
    let got = read_all(&storage, &staying).await;
    assert_eq!(seqs(&got), vec![1, 2], "queue of the session that stays");
    assert_eq!(*got[1].message, *shared, "the handed-over body changed");
    assert_eq!(
        got[1].delivery, delivery,
        "the handed-over delivery changed"
    );

    // The body is still referenced by `other` and `staying`; dropping one
    // reference must leave it readable through the other.
    write(
        &storage,
        vec![remove(&other, 1)],
        "ack by the other session",
    )
    .await;
    let got = read_all(&storage, &staying).await;
    assert_eq!(
        *got[1].message, *shared,
        "the body was dropped while still referenced"
    );
    write(
        &storage,
        vec![remove(&staying, 2)],
        "ack of the handed-over entry",
    )
    .await;
    assert_eq!(
        seqs(&read_all(&storage, &staying).await),
        vec![1],
        "queue after the last reference went"
    );
    factory.close(storage).await;
}
