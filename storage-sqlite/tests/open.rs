//! Bad files and full disks get clear errors, and lose nothing.

use std::sync::Arc;

use broker_core::message::{Message, QoS};
use broker_core::storage::{Delivery, PacketOp, QueueTarget, StorageError};
use storage_sqlite::{OpenError, SchemaError, SqliteOptions, SqliteStore};

fn open(path: &std::path::Path) -> Result<SqliteStore, OpenError> {
    SqliteStore::open(path, SqliteOptions::default())
}

#[test]
fn a_file_that_is_not_a_database_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notes.txt");
    let text = "these are someone's notes, not a database\n".repeat(200);
    std::fs::write(&path, &text).expect("write");
    let err = open(&path).expect_err("must refuse");
    assert!(matches!(err, OpenError::NotADatabase { .. }), "{err:?}");
    assert!(err.to_string().contains("notes.txt"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).expect("read"), text);
}

#[test]
fn a_database_from_a_newer_broker_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("future.db");
    drop(open(&path).expect("create"));
    {
        let conn = rusqlite::Connection::open(&path).expect("raw open");
        conn.pragma_update(None, "user_version", 1000)
            .expect("bump");
    }
    let err = open(&path).expect_err("must refuse");
    assert!(
        matches!(
            err,
            OpenError::Schema {
                source: SchemaError::Newer { found: 1000, .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("future.db"), "{err}");
    assert!(err.to_string().contains("newer"), "{err}");
}

#[test]
fn a_directory_that_cannot_be_written_is_a_clear_error() {
    // Permissions do not stop root, so use directories no one may write:
    // one that cannot be created, and an existing read-only one.
    let err = open(std::path::Path::new("/proc/no-such-dir/broker.db")).expect_err("refused");
    assert!(matches!(err, OpenError::CreateDir { .. }), "{err:?}");
    assert!(err.to_string().contains("/proc/no-such-dir"), "{err}");

    let err = open(std::path::Path::new("/proc/broker.db")).expect_err("refused");
    assert!(matches!(err, OpenError::Open { .. }), "{err:?}");
    assert!(err.to_string().contains("/proc/broker.db"), "{err}");
}

#[test]
fn a_database_held_by_another_store_is_refused_until_released() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("held.db");
    let first = open(&path).expect("first open");
    let err = open(&path).expect_err("second open must fail");
    assert!(matches!(err, OpenError::Locked { .. }), "{err:?}");
    assert!(err.to_string().contains("held.db"), "{err}");
    drop(first);
    drop(open(&path).expect("free again once the first store is closed"));
}

fn enqueue(n: u64) -> PacketOp {
    let mut m = Message::new("t", vec![0u8; 4096], QoS::AtLeastOnce, false);
    m.id = n;
    PacketOp::Enqueue {
        message: Arc::new(m),
        targets: vec![QueueTarget {
            client: Arc::from("c"),
            seq: n,
            delivery: Delivery::new(QoS::AtLeastOnce),
        }],
    }
}

#[tokio::test]
async fn a_full_database_refuses_writes_and_keeps_what_it_has() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("small.db");
    let options = SqliteOptions {
        max_size_bytes: Some(256 * 1024),
        ..SqliteOptions::default()
    };
    let storage = Arc::new(SqliteStore::open(&path, options.clone()).expect("open")).storage();
    let mut written = 0;
    let error = loop {
        match storage.packets.write(vec![enqueue(written + 1)]).await {
            Ok(()) => written += 1,
            Err(e) => break e,
        }
        assert!(written < 1000, "the size limit was never reached");
    };
    assert!(written > 10, "only {written} writes fit");
    assert!(
        matches!(&error, StorageError::Unavailable { message, .. } if message.contains("full")),
        "{error:?}"
    );
    let cause = std::error::Error::source(&error).and_then(|s| s.downcast_ref::<rusqlite::Error>());
    assert!(
        cause.is_some(),
        "SQLite's error is not the source: {error:?}"
    );
    // What was committed before is intact, in order, also after a reopen;
    // the failed write left nothing behind.
    let read = |s: broker_core::storage::Storage| async move {
        let q = s.packets.read_queue("c", None, 10_000).await.expect("read");
        q.iter().map(|p| p.seq).collect::<Vec<_>>()
    };
    assert_eq!(
        read(storage.clone()).await,
        (1..=written).collect::<Vec<_>>()
    );
    drop(storage);
    let storage = Arc::new(SqliteStore::open(&path, options).expect("reopen")).storage();
    assert_eq!(
        read(storage.clone()).await,
        (1..=written).collect::<Vec<_>>()
    );
    // Room made by acknowledgements is usable again.
    let acks = (1..=written)
        .map(|seq| PacketOp::Remove {
            client: Arc::from("c"),
            seq,
        })
        .collect();
    storage.packets.write(acks).await.expect("acks fit");
    storage
        .packets
        .write(vec![enqueue(written + 1)])
        .await
        .expect("writes succeed again");
}
