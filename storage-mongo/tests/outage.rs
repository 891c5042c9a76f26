//! The store when the server is not there: clear errors within the
//! configured timeouts, and recovery without a restart of the broker.
//!
//! The crash tests start a private server (`MONGO_SERVER_BIN`, default
//! `secantusd-py` on the PATH, with `MONGO_SERVER_ARGS`, default
//! `--sync-on-commit`) on a free port, kill it with SIGKILL and start it
//! again on the same data directory.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_core::message::{Message, QoS};
use broker_core::storage::{
    Delivery, PacketOp, QueueTarget, SessionRecord, Storage, StorageError, SubscriptionRecord,
};
use broker_core::subscription::SubscriptionOptions;
use storage_mongo::{MongoOptions, MongoStore, OpenError};
use support::PrivateServer;

/// Short timeouts, so that the tests are quick.
fn short_timeouts() -> MongoOptions {
    MongoOptions {
        server_selection_timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(1),
        operation_timeout: Duration::from_secs(3),
        // A store dropped by a simulated crash blocks the next open this long.
        lease_ttl: Duration::from_secs(1),
        ..MongoOptions::default()
    }
}

/// Margin for a busy test machine on top of a timeout.
const SLACK: Duration = Duration::from_secs(2);

#[tokio::test]
async fn unreachable_server_is_named_within_the_timeout() {
    let port = support::free_port();
    let uri = format!("mongodb://broker:pa55word@127.0.0.1:{port}/db?directConnection=true");
    let options = short_timeouts();
    let started = Instant::now();
    let result = MongoStore::open(&uri, options.clone()).await;
    let elapsed = started.elapsed();
    let e = match result {
        Ok(_) => panic!("opened a store on port {port}, where nothing listens"),
        Err(e) => e,
    };
    eprintln!("{e}");
    assert!(support::is_unreachable(&e), "unexpected error: {e:?}");
    let message = e.to_string();
    assert!(
        message.contains(&format!("127.0.0.1:{port}")),
        "the error does not name the server: {message}"
    );
    assert!(
        !message.contains("pa55word") && !format!("{e:?}").contains("pa55word"),
        "the error shows the password: {message}"
    );
    assert!(
        elapsed < options.operation_timeout + SLACK,
        "open took {elapsed:?}, longer than the timeout"
    );
}

#[tokio::test]
async fn timeout_ms_in_the_uri_bounds_open() {
    let port = support::free_port();
    // The driver would wait 30 s for a server; `timeoutMS` cuts it short.
    let uri = format!(
        "mongodb://127.0.0.1:{port}/?directConnection=true&serverSelectionTimeoutMS=30000&timeoutMS=700"
    );
    let started = Instant::now();
    match MongoStore::open(&uri, MongoOptions::default()).await {
        Err(OpenError::Timeout { after, .. }) => assert_eq!(after, Duration::from_millis(700)),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_millis(700) + SLACK);
}

#[tokio::test]
async fn a_server_that_never_answers_times_out() {
    // Accepts connections and never says a word.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    let _silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    let options = MongoOptions {
        connect_timeout: Duration::from_secs(30),
        server_selection_timeout: Duration::from_secs(30),
        operation_timeout: Duration::from_secs(2),
        ..MongoOptions::default()
    };
    let started = Instant::now();
    let result = MongoStore::open(
        &format!("mongodb://127.0.0.1:{port}/?directConnection=true"),
        options,
    )
    .await;
    assert!(result.is_err(), "opened a store on a silent server");
    assert!(
        started.elapsed() < Duration::from_secs(2) + SLACK,
        "open on a silent server took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn invalid_uris_are_refused_without_showing_secrets() {
    for uri in [
        "redis://127.0.0.1:6379/",
        "mongodb://user:topsecret@127.0.0.1:notaport/db",
        "mongodb://user:topsecret@127.0.0.1:27017/db?noSuchOption=1&w=nonsense&wtimeoutMS=x",
    ] {
        match MongoStore::open(uri, short_timeouts()).await {
            Err(e @ OpenError::InvalidUri { .. }) => {
                let message = e.to_string();
                assert!(!message.contains("topsecret"), "{message}");
                assert!(
                    message.contains("127.0.0.1") || uri.starts_with("redis"),
                    "{message}"
                );
            }
            Err(e) => panic!("{uri}: expected an invalid URI error, got {e:?}"),
            Ok(_) => panic!("{uri}: opened"),
        }
    }
    let uri = format!(
        "mongodb://127.0.0.1:{}/bad.name?directConnection=true",
        support::free_port()
    );
    match MongoStore::open(&uri, short_timeouts()).await {
        Err(OpenError::InvalidDatabase { name, .. }) => assert_eq!(name, "bad.name"),
        other => panic!("expected an invalid database name error, got {other:?}"),
    }
}

fn message(id: u64, topic: &str) -> Arc<Message> {
    let mut m = Message::new(topic, format!("payload {id}"), QoS::AtLeastOnce, false);
    m.id = id;
    m.received_at_ms = 1_700_000_000_000 + id;
    Arc::new(m)
}

fn enqueue(id: u64, client: &str, seq: u64) -> PacketOp {
    PacketOp::Enqueue {
        message: message(id, "t/outage"),
        targets: vec![QueueTarget {
            client: Arc::from(client),
            seq,
            delivery: Delivery::new(QoS::AtLeastOnce),
        }],
    }
}

async fn seqs(storage: &Storage, client: &str) -> Vec<u64> {
    let page = storage
        .packets
        .read_queue(client, None, 100)
        .await
        .expect("read_queue");
    page.iter().map(|p| p.seq).collect()
}

/// Assert that `result` is `Unavailable` and came within the timeout.
fn assert_unavailable<T: std::fmt::Debug>(
    what: &str,
    result: Result<T, StorageError>,
    elapsed: Duration,
    options: &MongoOptions,
) {
    match result {
        Err(StorageError::Unavailable {
            message: reason, ..
        }) => {
            eprintln!("{what}: {reason} (after {elapsed:?})");
            assert!(!reason.is_empty(), "{what}: empty reason")
        }
        other => panic!("{what} with the server down: expected Unavailable, got {other:?}"),
    }
    assert!(
        elapsed < options.operation_timeout + SLACK,
        "{what} with the server down took {elapsed:?}, longer than the timeout"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn server_crash_fails_operations_then_they_work_again_with_the_data() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("storage_mongo=debug")
        .try_init();
    let mut server = PrivateServer::start();
    let options = short_timeouts();
    let store = Arc::new(support::open_or_fail(&server.uri(), options.clone()).await);
    let storage = store.storage();

    // Written before the crash.
    storage
        .packets
        .write((1..=3).map(|i| enqueue(i, "c", i)).collect())
        .await
        .expect("enqueue");
    storage
        .packets
        .write(vec![PacketOp::IncomingQos2Received {
            client: Arc::from("c"),
            packet_id: 9,
        }])
        .await
        .expect("incoming QoS 2");
    let record = SessionRecord {
        client_id: "c".into(),
        expiry_secs: Some(3600),
        disconnected_at_ms: None,
    };
    storage
        .subscriptions
        .save_session(&record)
        .await
        .expect("save_session");
    let sub = SubscriptionRecord {
        filter: "t/#".into(),
        options: SubscriptionOptions::new(QoS::AtLeastOnce),
    };
    storage
        .subscriptions
        .add_subscriptions("c", std::slice::from_ref(&sub))
        .await
        .expect("add_subscriptions");
    storage
        .retained
        .set_retained(message(100, "r/kept"))
        .await
        .expect("set_retained");

    server.kill();

    let started = Instant::now();
    let result = storage.packets.write(vec![enqueue(4, "c", 4)]).await;
    assert_unavailable("write", result, started.elapsed(), &options);
    let started = Instant::now();
    let result = storage.packets.read_queue("c", None, 10).await;
    assert_unavailable("read_queue", result, started.elapsed(), &options);
    let started = Instant::now();
    let result = storage.subscriptions.load_sessions().await;
    assert_unavailable("load_sessions", result, started.elapsed(), &options);
    let started = Instant::now();
    let result = storage.retained.lookup_retained("r/#").await;
    assert_unavailable("lookup_retained", result, started.elapsed(), &options);

    server.restart();

    // The same store (and driver pool) recovers by itself.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match storage.packets.read_queue("c", None, 10).await {
            Ok(_) => break,
            Err(StorageError::Unavailable {
                message: reason, ..
            }) if Instant::now() < deadline => {
                eprintln!("not back yet: {reason}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the store did not recover after the restart: {e}"),
        }
    }
    assert_eq!(
        seqs(&storage, "c").await,
        vec![1, 2, 3],
        "queue after the crash"
    );
    assert_eq!(
        storage
            .packets
            .incoming_qos2("c")
            .await
            .expect("incoming_qos2"),
        vec![9]
    );
    let sessions = storage
        .subscriptions
        .load_sessions()
        .await
        .expect("load_sessions");
    assert_eq!(sessions.len(), 1, "sessions after the crash: {sessions:?}");
    assert_eq!(sessions[0].record, record);
    assert_eq!(sessions[0].subscriptions, vec![sub]);
    let retained = storage
        .retained
        .lookup_retained("r/#")
        .await
        .expect("lookup_retained");
    assert_eq!(retained, vec![message(100, "r/kept")]);

    // And it writes again.
    storage
        .packets
        .write(vec![
            enqueue(4, "c", 4),
            PacketOp::Remove {
                client: Arc::from("c"),
                seq: 1,
            },
        ])
        .await
        .expect("write after the restart");
    assert_eq!(seqs(&storage, "c").await, vec![2, 3, 4]);
    // The retained message's id (100) counts: it is stored nowhere else.
    assert_eq!(
        storage
            .packets
            .last_message_id()
            .await
            .expect("last_message_id"),
        100
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_reopened_after_a_crash_finds_its_data() {
    let mut server = PrivateServer::start();
    let options = short_timeouts();
    {
        let store = Arc::new(support::open_or_fail(&server.uri(), options.clone()).await);
        let storage = store.storage();
        storage
            .packets
            .write((1..=5).map(|i| enqueue(i, "d", i * 10)).collect())
            .await
            .expect("enqueue");
    }
    server.kill();
    server.restart();
    let store = Arc::new(support::open_or_fail(&server.uri(), options).await);
    let storage = store.storage();
    assert_eq!(seqs(&storage, "d").await, vec![10, 20, 30, 40, 50]);
    assert_eq!(
        storage
            .packets
            .last_message_id()
            .await
            .expect("last_message_id"),
        5
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partitioned_server_fails_operations_within_the_timeout() {
    let server = PrivateServer::start();
    let proxy = support::Proxy::start(server.port()).await;
    let options = short_timeouts();
    let store = Arc::new(support::open_or_fail(&proxy.uri(), options.clone()).await);
    let storage = store.storage();
    storage
        .packets
        .write(vec![enqueue(1, "p", 1)])
        .await
        .expect("enqueue");

    // Packets stop flowing; no connection is closed.
    proxy.freeze(true);
    let started = Instant::now();
    let result = storage.packets.write(vec![enqueue(2, "p", 2)]).await;
    assert_unavailable("write", result, started.elapsed(), &options);
    let started = Instant::now();
    let result = storage.packets.read_queue("p", None, 10).await;
    assert_unavailable("read_queue", result, started.elapsed(), &options);

    proxy.freeze(false);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match storage.packets.write(vec![enqueue(3, "p", 3)]).await {
            Ok(()) => break,
            Err(StorageError::Unavailable {
                message: reason, ..
            }) if Instant::now() < deadline => {
                eprintln!("not back yet: {reason}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the store did not recover after the partition: {e}"),
        }
    }
    // The write cut off by the timeout may or may not have committed.
    let got = seqs(&storage, "p").await;
    assert!(
        got == vec![1, 2, 3] || got == vec![1, 3],
        "queue after the partition: {got:?}"
    );
}
