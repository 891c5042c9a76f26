//! The lease that keeps a second broker off a database, on the server at
//! `MONGODB_URI` (default `mongodb://127.0.0.1:27017/?directConnection=true`).
//! The tests fail, never skip, when it cannot be reached. They take turns,
//! as the conformance cases do, on a server that answers one request at a time.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_core::message::{Message, QoS};
use broker_core::storage::{
    Delivery, PacketOp, PacketStore, QueueTarget, RetainedStore, SessionRecord, StorageError,
    SubscriptionStore,
};
use mongodb::bson::doc;
use storage_mongo::{MongoOptions, MongoStore, OpenError};
use tokio::sync::Semaphore;

static TURN: Semaphore = Semaphore::const_new(1);

/// A fresh database, dropped when the test ends.
struct Db {
    uri: String,
    name: String,
}

impl Db {
    fn new(tag: &str) -> Db {
        Db {
            uri: support::mongodb_uri(),
            name: support::fresh_database(tag),
        }
    }

    fn options(&self, lease: Duration) -> MongoOptions {
        MongoOptions {
            database: Some(self.name.clone()),
            lease_ttl: lease,
            operation_timeout: Duration::from_secs(30),
            ..MongoOptions::default()
        }
    }

    async fn open(&self, lease: Duration) -> MongoStore {
        support::open_or_fail(&self.uri, self.options(lease)).await
    }

    async fn meta(&self) -> mongodb::Collection<mongodb::bson::Document> {
        mongodb::Client::with_uri_str(&self.uri)
            .await
            .expect("a client")
            .database(&self.name)
            .collection("meta")
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        support::drop_database(&self.uri, &self.name);
    }
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn enqueue(id: u64, client: &str, seq: u64) -> PacketOp {
    let mut m = Message::new("lease/t", format!("body {id}"), QoS::AtLeastOnce, false);
    m.id = id;
    PacketOp::Enqueue {
        message: Arc::new(m),
        targets: vec![QueueTarget {
            client: Arc::from(client),
            seq,
            delivery: Delivery::new(QoS::AtLeastOnce),
        }],
    }
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

/// A second open of a live database is refused naming the holder; after
/// close the database opens at once.
#[tokio::test(flavor = "multi_thread")]
async fn second_open_is_refused_and_close_releases() {
    let _turn = TURN.acquire().await.expect("open semaphore");
    let db = Db::new("lease_second");
    let lease = Duration::from_millis(900);
    let first = db.open(lease).await;
    first.write(vec![enqueue(5, "c", 1)]).await.expect("write");

    let e = MongoStore::open(&db.uri, db.options(lease))
        .await
        .expect_err("a second store on a live database is refused");
    let text = e.to_string();
    match &e {
        OpenError::Locked { holder, .. } => {
            assert_eq!(holder.pid, std::process::id().to_string(), "{text}");
            assert_eq!(holder.host, host(), "{text}");
            assert!(holder.since.ends_with("UTC"), "{text}");
        }
        other => panic!("expected Locked, got {other}"),
    }
    assert!(text.contains("in use by another broker"), "{text}");
    first.write(vec![enqueue(6, "c", 2)]).await.expect("write");

    // A one-minute lease would block the next open that long: opening
    // within 20 s shows it was released.
    first.close().await;
    let reopened = tokio::time::timeout(
        Duration::from_secs(20),
        MongoStore::open(&db.uri, db.options(Duration::from_secs(60))),
    )
    .await
    .expect("open after close waited for the lease")
    .expect("open after close");
    assert_eq!(reopened.last_message_id().await.expect("read"), 6);
    assert!(first.write(vec![enqueue(7, "c", 3)]).await.is_err());
    reopened.close().await;
}

/// A store dropped without closing (its process died): the next open takes
/// over after the TTL, and ids continue above the retained ones too.
#[tokio::test(flavor = "multi_thread")]
async fn crashed_holder_is_waited_for_and_ids_continue() {
    let _turn = TURN.acquire().await.expect("open semaphore");
    let db = Db::new("lease_crash");
    let lease = Duration::from_millis(1500);
    let first = db.open(lease).await;
    first.write(vec![enqueue(3, "c", 1)]).await.expect("write");
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
    let second = db.open(lease).await;
    let waited = started.elapsed();
    assert!(
        waited < lease + Duration::from_secs(15),
        "took {waited:?} with a {lease:?} lease"
    );
    assert!(
        second.last_message_id().await.expect("read") >= 9,
        "an id stored in the retained store would be given again"
    );
    second.close().await;
}

/// A holder killed while the server was slow leaves one renewal behind,
/// which lands after the next broker began watching the lease: that single
/// move is not taken for a live holder, and the lease is taken over.
#[tokio::test(flavor = "multi_thread")]
async fn one_late_renewal_of_a_dead_holder_is_not_a_live_holder() {
    let _turn = TURN.acquire().await.expect("open semaphore");
    let db = Db::new("lease_late");
    let lease = Duration::from_millis(1500);
    let first = db.open(lease).await;
    first.abandon();
    drop(first);

    let meta = db.meta().await;
    let late = tokio::spawn(async move {
        // Well after the opener's first look, well before its TTL is up.
        tokio::time::sleep(Duration::from_millis(700)).await;
        meta.update_one(doc! { "_id": "lease" }, doc! { "$inc": { "beat": 1_i64 } })
            .await
            .expect("the late renewal lands")
            .matched_count
    });
    let second = MongoStore::open(&db.uri, db.options(lease))
        .await
        .expect("one late renewal does not make a dead holder live");
    assert_eq!(
        late.await.expect("late renewal task"),
        1,
        "it moved the lease"
    );
    second.close().await;
}

/// Taken by another broker, or deleted: every write fails with the lease error.
#[tokio::test(flavor = "multi_thread")]
async fn lost_lease_stops_every_write() {
    let _turn = TURN.acquire().await.expect("open semaphore");
    let db = Db::new("lease_lost");
    let lease = Duration::from_millis(900);
    let first = db.open(lease).await;
    first.write(vec![enqueue(1, "c", 1)]).await.expect("write");
    let meta = db.meta().await;

    // Another broker took the lease (as it may once it was not renewed).
    meta.update_one(
        doc! { "_id": "lease" },
        doc! { "$set": { "token": "other", "host": "otherhost", "pid": 4242_i64 } },
    )
    .await
    .expect("update");
    let taken = "now held by host otherhost, pid 4242";
    assert_lease_error(first.write(vec![enqueue(2, "c", 2)]).await, taken, "batch");
    let record = SessionRecord {
        client_id: "c".into(),
        expiry_secs: None,
        disconnected_at_ms: None,
    };
    assert_lease_error(first.save_session(&record).await, "lease", "session");
    assert_lease_error(first.delete_retained("t").await, "lease", "retained");
    assert_lease_error(
        first.remove_subscriptions("c", &["t".into()]).await,
        "lease",
        "subscriptions",
    );
    first.close().await;

    // Deleted under a running store: it stops too, and does not take it back.
    meta.delete_one(doc! { "_id": "lease" })
        .await
        .expect("delete");
    let second = db.open(lease).await;
    meta.delete_one(doc! { "_id": "lease" })
        .await
        .expect("delete");
    assert_lease_error(
        second.write(vec![enqueue(2, "c", 2)]).await,
        "gone",
        "after deletion",
    );
    tokio::time::sleep(lease).await;
    assert_lease_error(
        second.write(vec![enqueue(2, "c", 2)]).await,
        "gone",
        "later",
    );
    let stored = meta.find_one(doc! { "_id": "lease" }).await.expect("read");
    assert!(stored.is_none(), "the lease was taken back: {stored:?}");
}
