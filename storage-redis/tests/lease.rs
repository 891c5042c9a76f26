//! The lease that keeps a second broker off a key prefix, on a real Redis
//! (`REDIS_URL`, default `redis://127.0.0.1:6379/`; a private
//! `redis-server` from `REDIS_SERVER_BIN` for the outage case). The tests
//! fail, never skip, when Redis cannot be reached.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_core::message::{Message, QoS};
use broker_core::storage::{
    PacketOp, PacketStore, RetainedStore, SessionRecord, StorageError, SubscriptionStore,
};
use common::{connect, free_port, redis_url, unique_prefix, Cleanup, HOW_TO_START};
use storage_redis::{OpenError, RedisOptions, RedisStore};

fn lease_options(prefix: &str, lease: Duration) -> RedisOptions {
    RedisOptions {
        prefix: prefix.to_owned(),
        lease_ttl: lease,
        ..RedisOptions::default()
    }
}

async fn open(url: &str, prefix: &str, lease: Duration) -> RedisStore {
    RedisStore::open(url, lease_options(prefix, lease))
        .await
        .unwrap_or_else(|e| panic!("{e}; {HOW_TO_START}"))
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn enqueue(id: u64, client: &str, seq: u64) -> PacketOp {
    let m = Message::new("lease/t", format!("body {id}"), QoS::AtLeastOnce, false);
    common::enqueue_one(m, id, client, seq)
}

fn assert_lease_error<T: std::fmt::Debug>(r: Result<T, StorageError>, want: &str, what: &str) {
    match r {
        Err(StorageError::Unavailable { message: why, .. }) => {
            assert!(why.contains("lost its lease"), "{what}: {why}");
            assert!(why.contains(want), "{what}: {why} (wanted {want:?})");
        }
        other => panic!("{what}: expected the lease error, got {other:?}"),
    }
}

/// A second open of a live prefix is refused, naming the holder; once the
/// first closes, the prefix opens at once, with what it wrote.
#[tokio::test]
async fn second_open_is_refused_and_close_releases() {
    let url = redis_url();
    drop(connect(&url));
    let cleanup = Cleanup {
        url: url.clone(),
        prefix: unique_prefix("lease-second"),
    };
    let lease = Duration::from_millis(600);
    let first = open(&url, &cleanup.prefix, lease).await;
    first.write(vec![enqueue(5, "c", 1)]).await.expect("write");

    let second = RedisStore::open(&url, lease_options(&cleanup.prefix, lease)).await;
    let e = second.expect_err("a second store on a live prefix is refused");
    let text = e.to_string();
    match &e {
        OpenError::Locked { holder, prefix, .. } => {
            assert_eq!(prefix, &cleanup.prefix);
            assert_eq!(holder.pid, std::process::id().to_string(), "{text}");
            assert_eq!(holder.host, host(), "{text}");
            assert!(holder.since.ends_with("UTC"), "{text}");
        }
        other => panic!("expected Locked, got {other}"),
    }
    assert!(text.contains("in use by another broker"), "{text}");
    assert!(
        text.contains(&format!("pid {}", std::process::id())),
        "{text}"
    );
    // The refused open wrote nothing: the first still writes.
    first.write(vec![enqueue(6, "c", 2)]).await.expect("write");

    // Released on close: a long lease would block the next open for a
    // minute, so opening within 10 s shows it was released, not expired.
    first.close().await;
    let long = Duration::from_secs(60);
    let reopened = tokio::time::timeout(
        Duration::from_secs(10),
        RedisStore::open(&url, lease_options(&cleanup.prefix, long)),
    )
    .await
    .expect("open after close waited for the lease to expire")
    .expect("open after close");
    assert_eq!(reopened.last_message_id().await.expect("read"), 6);
    assert_eq!(
        reopened
            .read_queue("c", None, 10)
            .await
            .expect("read")
            .len(),
        2
    );
    // The closed store cannot write any more.
    assert!(first.write(vec![enqueue(7, "c", 3)]).await.is_err());
    // Dropping a store releases too (an orderly exit without `close`).
    drop(reopened);
    let again = tokio::time::timeout(
        Duration::from_secs(10),
        RedisStore::open(&url, lease_options(&cleanup.prefix, lease)),
    )
    .await
    .expect("open after drop waited for the lease to expire")
    .expect("open after drop");
    again.close().await;
}

/// A store dropped without closing (its process died) leaves its lease to
/// expire: the next open waits for it, then takes the prefix, and its
/// message ids continue above every stored one, retained messages included.
#[tokio::test]
async fn crashed_holder_is_waited_for_and_ids_continue() {
    let url = redis_url();
    drop(connect(&url));
    let cleanup = Cleanup {
        url: url.clone(),
        prefix: unique_prefix("lease-crash"),
    };
    let lease = Duration::from_millis(1500);
    let first = open(&url, &cleanup.prefix, lease).await;
    first.write(vec![enqueue(3, "c", 1)]).await.expect("write");
    // A retained message's id lives only in the retained store.
    let mut retained = Message::new("lease/r", "kept", QoS::AtLeastOnce, true);
    retained.id = 9;
    first
        .set_retained(Arc::new(retained))
        .await
        .expect("retain");
    // As if its process died: no more renewals, no release.
    first.abandon();
    drop(first);

    let started = Instant::now();
    let second = open(&url, &cleanup.prefix, lease).await;
    let waited = started.elapsed();
    assert!(
        waited < lease + Duration::from_secs(5),
        "took {waited:?} with a {lease:?} lease"
    );
    assert!(
        second.last_message_id().await.expect("read") >= 9,
        "an id stored in the retained store would be given again"
    );
    second.close().await;
}

/// A holder whose lease was taken (after its key went), or whose records
/// were deleted, stops writing: every kind of write fails with the lease
/// error, and it never takes the prefix back.
#[tokio::test]
async fn lost_lease_stops_every_write() {
    let url = redis_url();
    let mut conn = connect(&url);
    let cleanup = Cleanup {
        url: url.clone(),
        prefix: unique_prefix("lease-lost"),
    };
    let lease = Duration::from_millis(900);
    let first = open(&url, &cleanup.prefix, lease).await;
    first.write(vec![enqueue(1, "c", 1)]).await.expect("write");

    // Another broker takes the prefix (as it may once the lease expired):
    // the owner record names it.
    redis::cmd("HSET")
        .arg(format!("{}owner", cleanup.prefix))
        .arg(&["token", "other", "host", "otherhost", "pid", "4242"][..])
        .query::<()>(&mut conn)
        .expect("HSET");
    let taken = "now held by host otherhost, pid 4242";
    assert_lease_error(first.write(vec![enqueue(2, "c", 2)]).await, taken, "batch");
    let record = SessionRecord {
        client_id: "c".into(),
        expiry_secs: None,
        disconnected_at_ms: None,
    };
    assert_lease_error(first.save_session(&record).await, "lease", "session");
    assert_lease_error(first.delete_retained("t").await, "lease", "retained");
    // The old holder stopped renewing: a real broker takes over within the TTL.
    let second = open(&url, &cleanup.prefix, lease).await;
    // The new holder's state is untouched by the old one.
    second.write(vec![enqueue(2, "c", 2)]).await.expect("write");
    let queue = second.read_queue("c", None, 10).await.expect("read");
    assert_eq!(queue.len(), 2);
    assert_lease_error(
        first.write(vec![enqueue(3, "c", 3)]).await,
        "lease",
        "later",
    );
    // The old holder neither renews over it nor releases it.
    tokio::time::sleep(lease).await;
    first.close().await;
    second
        .write(vec![enqueue(3, "c", 3)])
        .await
        .expect("still owned");

    // Records deleted under a running store (a flush): it stops too.
    redis::cmd("DEL")
        .arg(format!("{}owner", cleanup.prefix))
        .arg(format!("{}lease", cleanup.prefix))
        .query::<()>(&mut conn)
        .expect("DEL");
    assert_lease_error(
        second.write(vec![enqueue(4, "c", 4)]).await,
        "gone",
        "after deletion",
    );
    // Found by the heartbeat too, without a write: still refused later.
    tokio::time::sleep(lease).await;
    assert_lease_error(
        second.write(vec![enqueue(4, "c", 4)]).await,
        "gone",
        "later",
    );
}

/// A Redis outage longer than the TTL does not cost the lease when nobody
/// took it meanwhile: the holder renews once Redis is back and writes on.
#[tokio::test]
async fn outage_longer_than_the_lease_keeps_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let start = || -> Child {
        let bin = std::env::var("REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".into());
        Command::new(&bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{bin}` ({e}); {HOW_TO_START}"))
    };
    let url = format!("redis://127.0.0.1:{port}/");
    let wait_up = || {
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis::Client::open(url.as_str())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            .is_err()
        {
            assert!(Instant::now() < deadline, "private redis-server not up");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let mut server = start();
    wait_up();
    let lease = Duration::from_millis(500);
    let options = RedisOptions {
        prefix: "outage:".into(),
        lease_ttl: lease,
        response_timeout: Duration::from_millis(500),
        connection_timeout: Duration::from_millis(500),
    };
    let store = RedisStore::open(&url, options).await.expect("open");
    store.write(vec![enqueue(1, "c", 1)]).await.expect("write");
    let _ = server.kill();
    let _ = server.wait();
    tokio::time::sleep(lease * 3).await;
    let mut server = start();
    wait_up();
    // The first operation after the restart may meet the dead connection.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match store.write(vec![enqueue(2, "c", 2)]).await {
            Ok(()) => break,
            Err(StorageError::Unavailable { message: why, .. }) if !why.contains("lease") => {
                assert!(
                    Instant::now() < deadline,
                    "no write after the outage: {why}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the outage cost the lease: {e}"),
        }
    }
    // Renewed again: still ours a few TTLs later.
    tokio::time::sleep(lease * 3).await;
    store.write(vec![enqueue(3, "c", 3)]).await.expect("write");
    store.close().await;
    let _ = server.kill();
    let _ = server.wait();
}
