//! SQLite implementation of the broker's storage traits: the embedded,
//! durable default (`sqlite://data/broker.db`), with nothing to install.
//!
//! [`SqliteStore`] implements [`PacketStore`], [`SubscriptionStore`] and
//! [`RetainedStore`] on one SQLite file, through `rusqlite` with SQLite
//! compiled in. Like every adapter it knows nothing of MQTT: it stores what
//! the core gives it and reads queues back in the core's sequence order. It
//! passes the conformance suite of `broker_core::testkit`.
//!
//! # Schema (version 2)
//! Tables mirror Mosca's collections, plus `messages` so that a body is
//! stored once however many sessions it is queued for:
//!
//! | table | key | holds |
//! |---|---|---|
//! | `messages` | `id` | a message body: topic, payload, QoS, retain, reception time, MQTT 5 properties (expiry as an absolute time; user properties as JSON), and `refs`, the number of `packets` rows pointing at it. The row goes when `refs` reaches 0. |
//! | `packets` | `(client, seq)` | one queue entry: the body's `message_id`, the delivery (QoS, retain, subscription ids as JSON, shared group) and state (0 queued, 1 released with the PUBREL `packet_id`). Read in `seq` order only. |
//! | `incoming_qos2` | `(client, packet_id)` | incoming QoS 2 packet ids awaiting PUBREL. |
//! | `sessions` | `client` | persistent sessions: expiry, time of disconnect. |
//! | `subscriptions` | `(client, filter)` | their subscriptions and options. |
//! | `retained` | `topic` | one retained message per topic, same columns as `messages`. A wildcard lookup scans the index range of the filter's literal prefix. |
//! | `meta` | `key` | `last_message_id`, the high-water mark of message ids. |
//! | `wills` | `id` | a connected client's will (the message's columns, `client`, `expiry_secs`, `delay_secs`), from CONNECT until published or deleted. Added by version 2. |
//!
//! The version is `PRAGMA user_version`; newer versions add migrations,
//! which run at open, so a database written by an older broker opens in a
//! newer one. A database from a newer broker is refused.
//!
//! # Durability
//! The database is in WAL mode. Each [`PacketStore::write`] batch is one
//! transaction (the broker's group commit makes that batch everything that
//! arrived while the previous one was being written), and `write` returns
//! only after it has committed. [`Synchronous`] decides what "committed"
//! survives:
//! - [`Synchronous::Normal`] (default): a process crash, `kill -9`
//!   included. The WAL is synced to disk at checkpoints, not at every
//!   commit, so a power loss or OS crash may roll back the last transactions
//!   (the database stays consistent).
//! - [`Synchronous::Full`]: power loss too; every commit waits for an fsync.
//!
//! # Threads and locking
//! SQLite calls block, so the connection lives on a thread of its own fed by
//! a channel; no tokio worker ever waits on the disk. The database is opened
//! in exclusive locking mode: a second broker on the same file is refused at
//! start with an error naming it.
//!
//! # Example
//! ```
//! use std::sync::Arc;
//!
//! use broker_core::storage::Storage;
//! use storage_sqlite::{SqliteOptions, SqliteStore};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let store = Arc::new(SqliteStore::open(dir.path().join("broker.db"), SqliteOptions::default())?);
//! let storage: Storage = store.storage();
//! # drop(storage);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod error;
mod rows;
mod schema;
mod sql;
mod worker;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use broker_core::message::{Message, MessageId, Seq};
use broker_core::storage::{
    PacketOp, PacketStore, QueueBounds, QueuedPacket, RetainedStore, SessionRecord, Storage,
    StorageResult, StoredSession, StoredWill, SubscriptionRecord, SubscriptionStore,
};
use rusqlite::{Connection, OpenFlags, TransactionBehavior};

pub use error::OpenError;
pub use schema::SchemaError;

use worker::Worker;

/// How far a commit is synced to disk (`PRAGMA synchronous`); see the
/// [crate documentation](crate#durability) for what each survives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Synchronous {
    /// Survives a process crash; a power loss may roll back recent commits.
    #[default]
    Normal,
    /// Survives a power loss; an fsync per commit.
    Full,
}

impl FromStr for Synchronous {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "normal" => Ok(Synchronous::Normal),
            "full" => Ok(Synchronous::Full),
            other => Err(format!(
                "unknown synchronous mode `{other}` (expected `normal` or `full`)"
            )),
        }
    }
}

/// Settings of a [`SqliteStore`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SqliteOptions {
    /// Durability of a commit.
    pub synchronous: Synchronous,
    /// Largest size the database may grow to, in bytes (`None`: as large as
    /// the disk allows). Past it, writes fail as on a full disk: publishes
    /// are not acknowledged, and the broker keeps serving.
    pub max_size_bytes: Option<u64>,
}

/// A broker store in one SQLite file; see the [crate documentation](crate).
pub struct SqliteStore {
    worker: Worker,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Open (or create) the database at `path`, creating its directory if
    /// needed, bring its schema up to date, and take the file's lock.
    pub fn open(path: impl AsRef<Path>, options: SqliteOptions) -> Result<SqliteStore, OpenError> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| OpenError::CreateDir {
                dir: dir.to_path_buf(),
                source,
            })?;
        }
        let sqlite = |e| OpenError::from_sqlite(&path, e);
        let mut conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sqlite)?;
        // Fail at once on a database another process holds.
        conn.busy_timeout(Duration::ZERO).map_err(sqlite)?;
        conn.set_prepared_statement_cache_capacity(64);
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")
            .map_err(sqlite)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(sqlite)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(OpenError::Open {
                path,
                source: rusqlite::Error::InvalidQuery,
            });
        }
        // Take and keep the exclusive lock now, not at the first publish.
        conn.execute_batch("BEGIN IMMEDIATE; COMMIT;")
            .map_err(sqlite)?;
        let synchronous = match options.synchronous {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        };
        conn.pragma_update(None, "synchronous", synchronous)
            .map_err(sqlite)?;
        schema::migrate(&mut conn, schema::MIGRATIONS).map_err(|source| match source {
            SchemaError::Version(e) | SchemaError::Migration { source: e, .. }
                if e.sqlite_error_code() == Some(rusqlite::ErrorCode::NotADatabase) =>
            {
                OpenError::NotADatabase { path: path.clone() }
            }
            source => OpenError::Schema {
                path: path.clone(),
                source,
            },
        })?;
        if let Some(max) = options.max_size_bytes {
            let page: u64 = conn
                .query_row("PRAGMA page_size", [], |r| r.get(0))
                .map_err(sqlite)?;
            conn.pragma_update(None, "max_page_count", (max / page.max(1)).max(1))
                .map_err(sqlite)?;
        }
        let worker =
            Worker::spawn(conn, "sqlite-store".into()).map_err(|source| OpenError::Thread {
                path: path.clone(),
                source,
            })?;
        Ok(SqliteStore { worker, path })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The broker's view of this store: all three traits backed by it. The
    /// file is closed (and unlocked) when the last handle goes.
    pub fn storage(self: &Arc<Self>) -> Storage {
        Storage::from_backend(self.clone())
    }

    /// Bytes the database's live pages take (free pages left out), for
    /// operators and benchmarks.
    pub async fn used_bytes(&self) -> StorageResult<u64> {
        self.worker
            .call(|db| {
                let pragma = |name: &str| -> rusqlite::Result<u64> {
                    db.conn
                        .query_row(&format!("PRAGMA {name}"), [], |r| r.get(0))
                };
                Ok((pragma("page_count")? - pragma("freelist_count")?) * pragma("page_size")?)
            })
            .await
    }
}

#[async_trait]
impl PacketStore for SqliteStore {
    async fn write(&self, ops: Vec<PacketOp>) -> StorageResult<()> {
        self.worker
            .call(move |db| {
                let tx = db
                    .conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)?;
                sql::apply(&tx, &ops)?;
                tx.commit()
            })
            .await
    }

    async fn read_queue(
        &self,
        client: &str,
        after: Option<Seq>,
        limit: usize,
    ) -> StorageResult<Vec<QueuedPacket>> {
        let client = client.to_owned();
        self.worker
            .call(move |db| sql::read_queue(&db.conn, &mut db.cache, &client, after, limit))
            .await
    }

    async fn queue_bounds(&self, client: &str) -> StorageResult<QueueBounds> {
        let client = client.to_owned();
        self.worker
            .call(move |db| sql::queue_bounds(&db.conn, &client))
            .await
    }

    async fn incoming_qos2(&self, client: &str) -> StorageResult<Vec<u16>> {
        let client = client.to_owned();
        self.worker
            .call(move |db| sql::incoming_qos2(&db.conn, &client))
            .await
    }

    async fn last_message_id(&self) -> StorageResult<MessageId> {
        self.worker.call(|db| sql::last_message_id(&db.conn)).await
    }

    async fn wills(&self) -> StorageResult<Vec<StoredWill>> {
        self.worker.call(|db| sql::wills(&db.conn)).await
    }
}

#[async_trait]
impl SubscriptionStore for SqliteStore {
    async fn save_session(&self, record: &SessionRecord) -> StorageResult<()> {
        let record = record.clone();
        self.worker
            .call(move |db| sql::save_session(&db.conn, &record))
            .await
    }

    async fn delete_session(&self, client: &str) -> StorageResult<()> {
        let client = client.to_owned();
        self.worker
            .call(move |db| {
                let tx = db.conn.transaction()?;
                sql::delete_session(&tx, &client)?;
                tx.commit()
            })
            .await
    }

    async fn add_subscriptions(
        &self,
        client: &str,
        subscriptions: &[SubscriptionRecord],
    ) -> StorageResult<()> {
        let (client, subs) = (client.to_owned(), subscriptions.to_vec());
        self.worker
            .call(move |db| {
                let tx = db.conn.transaction()?;
                sql::add_subscriptions(&tx, &client, &subs)?;
                tx.commit()
            })
            .await
    }

    async fn remove_subscriptions(&self, client: &str, filters: &[String]) -> StorageResult<()> {
        let (client, filters) = (client.to_owned(), filters.to_vec());
        self.worker
            .call(move |db| {
                let tx = db.conn.transaction()?;
                sql::remove_subscriptions(&tx, &client, &filters)?;
                tx.commit()
            })
            .await
    }

    async fn load_sessions(&self) -> StorageResult<Vec<StoredSession>> {
        self.worker.call(|db| sql::load_sessions(&db.conn)).await
    }
}

#[async_trait]
impl RetainedStore for SqliteStore {
    async fn set_retained(&self, message: Arc<Message>) -> StorageResult<()> {
        self.worker
            .call(move |db| sql::set_retained(&db.conn, &message))
            .await
    }

    async fn delete_retained(&self, topic: &str) -> StorageResult<()> {
        let topic = topic.to_owned();
        self.worker
            .call(move |db| sql::delete_retained(&db.conn, &topic))
            .await
    }

    async fn lookup_retained(&self, filter: &str) -> StorageResult<Vec<Arc<Message>>> {
        let filter = filter.to_owned();
        self.worker
            .call(move |db| sql::lookup_retained(&db.conn, &filter))
            .await
    }
}
