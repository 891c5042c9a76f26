//! Opening a store: clear errors, within the timeout, for unreachable
//! hosts, wrong URLs and foreign key layouts.

mod common;

use std::time::{Duration, Instant};

use common::{connect, free_port, options, redis_url, unique_prefix, Cleanup};
use storage_redis::{OpenError, RedisOptions, RedisStore};

async fn open_err(url: &str, options: RedisOptions) -> (OpenError, Duration) {
    let start = Instant::now();
    match RedisStore::open(url, options).await {
        Ok(store) => panic!("{url} opened: {store:?}"),
        Err(e) => (e, start.elapsed()),
    }
}

#[tokio::test]
async fn nothing_listening_is_a_clear_error_at_once() {
    let port = free_port();
    let url = format!("redis://user:secret@127.0.0.1:{port}/0");
    let (e, took) = open_err(&url, options("x:", Duration::from_secs(2))).await;
    let msg = e.to_string();
    assert!(matches!(e, OpenError::Connect { .. }), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
    assert!(msg.contains("cannot connect to Redis"), "{msg}");
    assert!(!msg.contains("secret"), "the password shows: {msg}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

#[tokio::test]
async fn unreachable_or_unknown_hosts_fail_within_the_timeout() {
    let timeout = Duration::from_millis(500);
    // 10.255.255.1 drops packets on most networks (or is unreachable at
    // once); .invalid never resolves.
    for url in [
        "redis://10.255.255.1:6379/",
        "redis://no-such-host.invalid:6379/",
    ] {
        let (e, took) = open_err(url, options("x:", timeout)).await;
        let msg = e.to_string();
        let host = url.trim_start_matches("redis://").trim_end_matches('/');
        assert!(msg.contains(host), "{msg}");
        assert!(
            matches!(e, OpenError::Connect { .. } | OpenError::Timeout { .. }),
            "{msg}"
        );
        // Connection and response timeouts bound open, with some slack.
        assert!(
            took < 2 * timeout + Duration::from_secs(1),
            "{url}: took {took:?}"
        );
    }
}

#[tokio::test]
async fn bad_urls_and_foreign_layouts_are_refused() {
    let (e, _) = open_err("redis://127.0.0.1:6379/?cache=big", RedisOptions::default()).await;
    assert!(e.to_string().contains("unknown parameter `cache`"), "{e}");
    let (e, _) = open_err("http://127.0.0.1:6379/", RedisOptions::default()).await;
    assert!(matches!(e, OpenError::InvalidUrl { .. }), "{e}");

    // A prefix written by a later layout is not read.
    let url = redis_url();
    let mut conn = connect(&url);
    let prefix = unique_prefix("layout");
    let _cleanup = Cleanup {
        url: url.clone(),
        prefix: prefix.clone(),
    };
    redis::cmd("SET")
        .arg(format!("{prefix}layout"))
        .arg("99")
        .query::<()>(&mut conn)
        .expect("SET");
    let (e, _) = open_err(&url, options(&prefix, Duration::from_secs(5))).await;
    let msg = e.to_string();
    assert!(matches!(e, OpenError::Layout { .. }), "{msg}");
    assert!(
        msg.contains("layout version 99") && msg.contains(&prefix),
        "{msg}"
    );

    // The prefix comes from the URL too, and a fresh prefix gets the layout.
    let prefix = unique_prefix("url");
    let _cleanup = Cleanup {
        url: url.clone(),
        prefix: prefix.clone(),
    };
    let store = RedisStore::open(&format!("{url}?prefix={prefix}"), RedisOptions::default())
        .await
        .expect("open with a prefix in the URL");
    assert_eq!(store.prefix(), prefix);
    let layout: String = redis::cmd("GET")
        .arg(format!("{prefix}layout"))
        .query(&mut conn)
        .expect("GET");
    assert_eq!(layout, "2");
    // `clear` keeps the lease, which the store still holds; `close` releases it.
    store.clear().await.expect("clear");
    let keys = |conn: &mut redis::Connection| {
        let mut left: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query(conn)
            .expect("KEYS");
        left.sort();
        left
    };
    assert_eq!(
        keys(&mut conn),
        [format!("{prefix}lease"), format!("{prefix}owner")],
        "clear left more than the lease"
    );
    store.close().await;
    assert!(keys(&mut conn).is_empty(), "close left keys behind");
}

/// One body however many sessions it is queued for, seen in the bytes Redis
/// reports; it goes with its last reference, leaving no key behind; `clear`
/// removes everything under the prefix.
#[tokio::test]
async fn fan_out_stores_the_body_once_and_clear_empties_the_prefix() {
    use std::sync::Arc;

    use broker_core::message::{Message, QoS};
    use broker_core::storage::{Delivery, PacketOp, PacketStore, QueueTarget};

    const SESSIONS: u64 = 100;
    const PAYLOAD: usize = 16 * 1024;
    let cleanup = Cleanup {
        url: redis_url(),
        prefix: unique_prefix("bytes"),
    };
    let store = RedisStore::open(
        &cleanup.url,
        options(&cleanup.prefix, Duration::from_secs(5)),
    )
    .await
    .expect("open");
    let empty = store.used_bytes().await.expect("used_bytes");
    let mut m = Message::new("t/fan", vec![7u8; PAYLOAD], QoS::AtLeastOnce, false);
    m.id = 1;
    let targets = (0..SESSIONS)
        .map(|i| QueueTarget {
            client: Arc::from(format!("fan-{i}")),
            seq: 1,
            delivery: Delivery::new(QoS::AtLeastOnce),
        })
        .collect();
    store
        .write(vec![PacketOp::Enqueue {
            message: Arc::new(m),
            targets,
        }])
        .await
        .expect("write");
    let used = store.used_bytes().await.expect("used_bytes") - empty;
    eprintln!(
        "{PAYLOAD}-byte message queued for {SESSIONS} sessions: {used} bytes, {} per session",
        (used - PAYLOAD as u64) / SESSIONS
    );
    assert!(
        used > PAYLOAD as u64 && used < 2 * PAYLOAD as u64 + SESSIONS * 1024,
        "{used} bytes for one {PAYLOAD}-byte body queued {SESSIONS} times"
    );

    // The body stays while one entry references it, and goes with the last.
    let mut conn = connect(&redis_url());
    let body_key = format!("{}msg:1", store.prefix());
    let remove = |i: u64| PacketOp::Remove {
        client: Arc::from(format!("fan-{i}")),
        seq: 1,
    };
    store
        .write((0..SESSIONS - 1).map(remove).collect())
        .await
        .expect("remove all but one");
    // The body's first ten bytes are its reference count.
    let refs: String = redis::cmd("GETRANGE")
        .arg(&body_key)
        .arg(0)
        .arg(9)
        .query(&mut conn)
        .expect("GETRANGE");
    assert_eq!(refs, "0000000001", "references left on the body");
    store
        .write(vec![remove(SESSIONS - 1)])
        .await
        .expect("remove the last");
    let exists: bool = redis::cmd("EXISTS")
        .arg(&body_key)
        .query(&mut conn)
        .expect("EXISTS");
    assert!(!exists, "the body outlived its last reference");
    let mut left: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", store.prefix()))
        .query(&mut conn)
        .expect("KEYS");
    left.sort();
    let want: Vec<String> = ["last_message_id", "layout", "lease", "owner"]
        .iter()
        .map(|k| format!("{}{k}", store.prefix()))
        .collect();
    assert_eq!(left, want, "keys left after every entry went");

    store.close().await;
    RedisStore::destroy(
        &cleanup.url,
        options(&cleanup.prefix, Duration::from_secs(5)),
    )
    .await
    .expect("destroy");
    assert_eq!(store.used_bytes().await.expect("used_bytes"), 0);
}

/// What a queued message costs in Redis beside its payload, in the two
/// shapes that matter: a topic per device (one message queued for each of
/// many sessions, so every session's queue is small) and one deep queue
/// (past Redis's compact encodings). Printed for BENCHMARKS.md; the bound
/// lies between layout 2's figures (about 205 bytes each) and layout 1's
/// (about 460 and 400), so a layout back at the old cost fails here.
#[tokio::test]
async fn a_queued_message_costs_half_what_it_did_in_layout_1() {
    use broker_core::message::{Message, QoS};
    use broker_core::storage::PacketStore;

    const DEVICES: u64 = 200;
    const DEEP: u64 = 2000;
    const PAYLOAD: usize = 64;
    // A prefix as short as a real one (`mqtt:`): key names count too.
    let cleanup = Cleanup {
        url: redis_url(),
        prefix: format!("e{}:", std::process::id()),
    };
    let store = RedisStore::open(
        &cleanup.url,
        options(&cleanup.prefix, Duration::from_secs(5)),
    )
    .await
    .expect("open");
    let enqueue = |id: u64, client: String, seq: u64| {
        let topic = format!("devices/{client}");
        let m = Message::new(topic, vec![7u8; PAYLOAD], QoS::AtLeastOnce, false);
        common::enqueue_one(m, id, &client, seq)
    };
    let empty = store.used_bytes().await.expect("used_bytes");
    store
        .write(
            (1..=DEVICES)
                .map(|i| enqueue(i, format!("device-{i:05}"), 1))
                .collect(),
        )
        .await
        .expect("one message per device");
    let devices = store.used_bytes().await.expect("used_bytes");
    store
        .write(
            (1..=DEEP)
                .map(|i| enqueue(DEVICES + i, "deep".to_owned(), i))
                .collect(),
        )
        .await
        .expect("a deep queue");
    let deep = store.used_bytes().await.expect("used_bytes");
    let per_device = (devices - empty) / DEVICES - PAYLOAD as u64;
    let per_deep = (deep - devices) / DEEP - PAYLOAD as u64;
    eprintln!(
        "a {PAYLOAD}-byte message queued costs, beside its payload: {per_device} bytes with a \
         queue per device ({DEVICES} sessions), {per_deep} in one queue of {DEEP}"
    );
    assert!(per_device < 300, "{per_device} bytes per device message");
    assert!(
        per_deep < 300,
        "{per_deep} bytes per message of a deep queue"
    );
    store.close().await;
}
