//! MongoDB implementation of the broker's storage traits
//! (`mongodb://HOST:PORT/DB`), on the official `mongodb` driver.
//!
//! [`MongoStore`] implements [`PacketStore`], [`SubscriptionStore`] and
//! [`RetainedStore`] in one database, in collections named after Mosca's.
//! Like every adapter it knows nothing of MQTT (no packets, no protocol
//! levels, no session logic such as expiry): it stores what the core gives
//! it and reads queues back in the core's sequence order. It passes the
//! conformance suite of `broker_core::testkit`.
//!
//! # Collections and indexes
//! All created at [`MongoStore::open`], idempotently.
//!
//! | collection | key (index) | holds |
//! |---|---|---|
//! | `packets` | `{client: 1, seq: 1}` unique | one queue entry: `client`, `seq`, `message_id` (the body), the delivery (`qos`, `retain`, `subscription_ids` and `share` when present) and `state` (0 queued, 1 released with the PUBREL `packet_id`). Read in `seq` order only. |
//! | `messages` | `_id` = message id | a body stored once however many entries point at it: `topic`, `payload`, `qos`, `retain`, `received_at`, the MQTT 5 properties present (`expires_at` as an absolute time, `payload_utf8`, `content_type`, `response_topic`, `correlation_data`, `user_properties` as `[key, value]` pairs), and `refs`, the number of `packets` documents pointing at it. The document goes when `refs` reaches 0. |
//! | `incoming_qos2` | `{client: 1, packet_id: 1}` unique | packet ids of incoming QoS 2 messages awaiting PUBREL. |
//! | `sessions` | `_id` = client id | persistent sessions: `expiry_secs` (absent: never expires), `disconnected_at` (absent: connected). A collection of its own rather than Mosca's mix of records and subscriptions in one, so that each document has one shape and loading sessions is two plain scans. |
//! | `subscriptions` | `{client: 1, topic: 1}` unique | one per session and filter (Mosca's name for the filter: `topic`) with its options. |
//! | `retained` | `{topic: 1}` unique | one retained message per topic: the body's fields as in `messages`, its id in `id`. |
//! | `meta` | `_id` | `last_message_id`: a high-water mark of message ids (see below). |
//! | `wills` | `_id` = the will's id | a connected client's will, from CONNECT until published or deleted: the message's fields as in `messages`, `client`, `expiry_secs` (absent: none), `delay_secs`. |
//!
//! Numbers are 64-bit integers: sequence numbers and message ids stay below
//! 2^53 by contract. There are no TTL indexes: session expiry counts from
//! the disconnect and must purge the session's queue (and release the
//! bodies it references) with it, which the core does through
//! [`SubscriptionStore::delete_session`] and [`PacketOp::Purge`]; a TTL
//! sweep would drop records behind its back and leave their queues and
//! bodies behind (Mosca's TTL on subscriptions is how it lost sessions).
//!
//! # Transactions: a replica set is required
//! Each [`PacketStore::write`] batch is one multi-document transaction, so
//! it is applied atomically, and MongoDB allows those only on a replica set
//! or a sharded cluster. A single node is enough: start `mongod --replSet
//! rs0` and run `rs.initiate()` once, and connect with
//! `?directConnection=true` (or the replica set name). A standalone server
//! is refused at open with [`OpenError::NotReplicaSet`]. MongoDB 4.2 or
//! newer is needed (state changes use an update pipeline). Transient
//! transaction errors (write conflicts, a lost connection) are retried as
//! the MongoDB documentation recommends, a bounded number of times; a
//! commit whose outcome is unknown is committed again.
//!
//! Writes and commits use write concern `majority` with journaling, so a
//! write that returned survives a crash of the server (`kill -9` of a
//! single-node `mongod` included). A URI that sets `w`, `journal` or
//! `wtimeoutMS` itself decides instead.
//!
//! # Few round trips per batch
//! A batch is not sent one operation at a time: it is played in memory
//! over what it touches of the stored state, and its net effect is written
//! with one bulk command per kind: a `delete_many` of the removed and
//! purged entries, an `insert_many` (ordered) of new bodies and one of new
//! entries, one `update_many` with `$inc` per distinct reference count
//! change, a `delete_many` of the bodies whose count reached 0, and one
//! pipeline `update_many` (`$switch` per entry) for all state changes.
//! Measured in requests to the server, commit included: 100 new messages
//! in one batch take 3; 100 acknowledgements take 6 (one read of the
//! entries they name, the deletions, the count changes, the high-water
//! mark). See the `batch` module for how the rare cases (an enqueue over an
//! existing entry, a body handed over to another session) are caught by
//! the unique indexes and planned again. A queue page is one request.
//!
//! # Order
//! Nothing relies on insertion order (Mosca read queues with
//! `find({client})` and no sort, and replayed them out of order). A queue
//! page is one aggregation: `$match` on the client and `seq > after`,
//! `$sort: {seq: 1}` and `$limit`, which the `{client, seq}` index serves
//! in order, then a `$lookup` of the bodies by `_id`. An entry's state
//! changes in place, never by moving it.
//!
//! # Retained lookups
//! A filter without wildcards is one exact query. Otherwise the filter's
//! literal prefix (`a/b/` for `a/b/+/c`) becomes an anchored regular
//! expression (`^a/b/`, metacharacters escaped) on `topic`, which MongoDB
//! answers from the index range, and every candidate is matched exactly in
//! Rust with [`broker_core::topic::matches`]. The prefix of `a/#` is `a/`,
//! so `a` itself (which `a/#` also matches) is asked for in the same query.
//!
//! # The message id high-water mark
//! [`PacketStore::last_message_id`] is the greater of the largest stored
//! body id and `meta.last_message_id`. A batch raises the latter (`$max`)
//! only when it deletes a body or never stores one (enqueued and removed in
//! the same batch), so batches of new messages do not all write one hot
//! document.
//!
//! # When the server goes away
//! Every operation is bounded by [`MongoOptions::operation_timeout`] and
//! fails with [`StorageError::Unavailable`] when the server cannot be
//! reached (the driver waits at most its server selection timeout for one).
//! A server that stops answering without closing its connections (a
//! network partition, a hung process) is cut off by that timeout too. The
//! driver's pool reconnects by itself, so operations succeed again once
//! the server is back. The loss and the recovery are logged once each, at
//! `warn` and `info`. A write cut off by the timeout may still have been
//! committed.
//!
//! # Configuration
//! [`MongoStore::open`] takes the storage URL and [`MongoOptions`]. The
//! database is the URL's path (`mongodb://host:27017/broker`), else
//! [`DEFAULT_DATABASE`]. The driver's own URI options work as usual and
//! win over the options' defaults (`serverSelectionTimeoutMS`,
//! `connectTimeoutMS`, `maxPoolSize`, `replicaSet`, `directConnection`,
//! `w`, TLS and authentication options); so does `timeoutMS`, the bound of
//! each operation. Errors name the URI with its password hidden.
//!
//! # Tests
//! `cargo test -p storage-mongo` runs the conformance suite against the
//! server at `MONGODB_URI` (default
//! `mongodb://127.0.0.1:27017/?directConnection=true`), one fresh database
//! per case, and fails (never skips) when there is none; `scripts/test`
//! starts one. The outage tests start private servers with
//! `MONGO_SERVER_BIN` (default `secantusd-py`), which they kill and restart.
//! SecantusDB, the MongoDB-compatible server the tests use, honours
//! `j: true` on single writes but not on `commitTransaction`, so those
//! servers get `--sync-on-commit` (`MONGO_SERVER_ARGS` overrides it); a
//! real `mongod` needs nothing of the kind.
//!
//! # Example
//! ```no_run
//! use std::sync::Arc;
//!
//! use broker_core::storage::Storage;
//! use storage_mongo::{MongoOptions, MongoStore};
//!
//! # async fn run() -> Result<(), storage_mongo::OpenError> {
//! let store = MongoStore::open(
//!     "mongodb://127.0.0.1:27017/broker?directConnection=true",
//!     MongoOptions::default(),
//! )
//! .await?;
//! let storage: Storage = Arc::new(store).storage();
//! # drop(storage);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod batch;
mod documents;
mod error;
mod lease;
mod txn;
mod write;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use broker_core::message::{Message, MessageId, Seq};
use broker_core::storage::{
    BodyCache, PacketOp, PacketStore, QueueBounds, QueuedPacket, RetainedStore, SessionRecord,
    Storage, StorageError, StorageResult, StoredSession, StoredWill, SubscriptionRecord,
    SubscriptionStore,
};
use broker_core::topic;
use futures::TryStreamExt;
use mongodb::bson::{doc, Document};
use mongodb::options::{ClientOptions, IndexOptions, TransactionOptions};
use mongodb::{Client, ClientSession, Collection, Database, IndexModel};

pub use error::OpenError;
pub use lease::Holder;

use documents::{field, Fields};
use error::{redact_uri, scrub, storage_error};
use lease::{Fenced, Lease};
use txn::{Abort, Health, TxnBody};

/// Database used when neither [`MongoOptions::database`] nor the URI's
/// path names one.
pub const DEFAULT_DATABASE: &str = "broker";

/// Settings of a [`MongoStore`]. Options given in the URI itself (such as
/// `serverSelectionTimeoutMS`, `connectTimeoutMS`, `maxPoolSize`, `w`, and
/// `timeoutMS` for the operation timeout) take precedence over these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MongoOptions {
    /// The database, overriding the one named in the URI's path. When
    /// neither names one: [`DEFAULT_DATABASE`].
    pub database: Option<String>,
    /// How long opening a connection may take.
    pub connect_timeout: Duration,
    /// How long an operation waits for a server to send it to; past it,
    /// operations fail with [`StorageError::Unavailable`].
    pub server_selection_timeout: Duration,
    /// Upper bound of any one store operation, retries included (and of
    /// [`MongoStore::open`]). Keep it above the server selection timeout so
    /// that errors name their cause. The URI option `timeoutMS` sets it too.
    pub operation_timeout: Duration,
    /// Connections the driver's pool may hold.
    pub max_pool_size: u32,
    /// TTL of the lease that keeps a second broker off the database
    /// (default 10 s, at least 100 ms; URI parameter `lease_ms`), renewed
    /// every third of it. After a broker died without closing, the next one
    /// waits that long from its start before taking over.
    pub lease_ttl: Duration,
}

/// Shortest lease TTL accepted.
pub const MIN_LEASE_TTL: Duration = Duration::from_millis(100);

impl Default for MongoOptions {
    fn default() -> Self {
        MongoOptions {
            database: None,
            connect_timeout: Duration::from_secs(5),
            server_selection_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(10),
            max_pool_size: 16,
            lease_ttl: Duration::from_secs(10),
        }
    }
}

/// The collections of one store.
pub(crate) struct Collections {
    pub packets: Collection<Document>,
    pub messages: Collection<Document>,
    pub incoming_qos2: Collection<Document>,
    pub sessions: Collection<Document>,
    pub subscriptions: Collection<Document>,
    pub retained: Collection<Document>,
    pub meta: Collection<Document>,
    pub wills: Collection<Document>,
}

impl Collections {
    const NAMES: [&'static str; 8] = [
        "packets",
        "messages",
        "incoming_qos2",
        "sessions",
        "subscriptions",
        "retained",
        "meta",
        "wills",
    ];

    fn new(db: &Database) -> Self {
        Collections {
            packets: db.collection("packets"),
            messages: db.collection("messages"),
            incoming_qos2: db.collection("incoming_qos2"),
            sessions: db.collection("sessions"),
            subscriptions: db.collection("subscriptions"),
            retained: db.collection("retained"),
            meta: db.collection("meta"),
            wills: db.collection("wills"),
        }
    }
}

/// A broker store in one MongoDB database; see the [crate documentation](crate).
pub struct MongoStore {
    client: Client,
    colls: Collections,
    database: String,
    uri: String,
    operation_timeout: Duration,
    txn_options: TransactionOptions,
    health: Health,
    cache: Mutex<BodyCache>,
    lease: Arc<Lease>,
    /// The driver's options, to release the lease from `drop`.
    client_options: ClientOptions,
}

impl Drop for MongoStore {
    /// Releases the lease if [`MongoStore::close`] did not: an orderly exit
    /// lets the next broker start at once. Blocks for at most the
    /// operation timeout.
    fn drop(&mut self) {
        self.lease
            .release_on_drop(&self.client_options, &self.database, self.operation_timeout);
    }
}

impl std::fmt::Debug for MongoStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MongoStore")
            .field("uri", &self.uri)
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

/// Every document of `collection`, in `_id` order (read whole at start).
async fn all_by_id(collection: &Collection<Document>) -> StorageResult<Vec<Document>> {
    collection
        .find(doc! {})
        .sort(doc! { field::ID: 1 })
        .await
        .map_err(storage_error)?
        .try_collect()
        .await
        .map_err(storage_error)
}

/// Why a database name is refused, if it is.
fn invalid_database_name(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("it is empty")
    } else if name.len() > 63 {
        Some("it is longer than 63 bytes")
    } else if name.contains(['/', '\\', '.', ' ', '"', '$', '\0']) {
        Some("it contains one of / \\ . \" $, a space or a NUL")
    } else {
        None
    }
}

impl MongoStore {
    /// Connect to the server at `uri` (`mongodb://HOST:PORT/DB?OPTIONS` or
    /// `mongodb+srv://...`), check that it can run transactions, and create
    /// the collections and indexes that are missing. Fails within
    /// [`MongoOptions::operation_timeout`].
    pub async fn open(uri: &str, mut options: MongoOptions) -> Result<MongoStore, OpenError> {
        let shown = redact_uri(uri);
        let invalid = |reason| OpenError::InvalidUri {
            uri: shown.clone(),
            reason,
        };
        let (uri, timeout) = take_param_ms(uri, "timeoutMS").map_err(invalid)?;
        if let Some(timeout) = timeout {
            options.operation_timeout = timeout;
        }
        let (uri, lease_ttl) = take_param_ms(&uri, "lease_ms").map_err(invalid)?;
        if let Some(ttl) = lease_ttl {
            options.lease_ttl = ttl;
        }
        if options.lease_ttl < MIN_LEASE_TTL {
            return Err(invalid(format!(
                "lease_ms must be at least {} ms",
                MIN_LEASE_TTL.as_millis()
            )));
        }
        let timeout = options.operation_timeout;
        let lease_ttl = options.lease_ttl;
        let mut store =
            match tokio::time::timeout(timeout, Self::connect(&uri, &shown, options)).await {
                Ok(result) => result?,
                Err(_) => {
                    return Err(OpenError::Timeout {
                        uri: shown,
                        after: timeout,
                    })
                }
            };
        // Not within the operation timeout: a dead holder's lease is
        // waited for, up to its TTL.
        let where_ = format!("database {:?} at {}", store.database, store.uri);
        let lease = lease::acquire(
            store.colls.meta.clone(),
            &where_,
            &store.uri,
            &store.database,
            lease_ttl,
            timeout,
        )
        .await?;
        lease.start_heartbeat(timeout);
        store.lease = lease;
        Ok(store)
    }

    async fn connect(
        uri: &str,
        shown: &str,
        options: MongoOptions,
    ) -> Result<MongoStore, OpenError> {
        let invalid = |e: mongodb::error::Error| OpenError::InvalidUri {
            uri: shown.to_owned(),
            reason: scrub(&e.to_string(), uri),
        };
        let mut co = ClientOptions::parse(uri).await.map_err(invalid)?;
        co.connect_timeout.get_or_insert(options.connect_timeout);
        co.server_selection_timeout
            .get_or_insert(options.server_selection_timeout);
        co.max_pool_size.get_or_insert(options.max_pool_size);
        let write_concern = co
            .write_concern
            .get_or_insert_with(txn::durable_write_concern)
            .clone();
        let database = options
            .database
            .clone()
            .or_else(|| co.default_database.clone())
            .unwrap_or_else(|| DEFAULT_DATABASE.to_owned());
        if let Some(reason) = invalid_database_name(&database) {
            return Err(OpenError::InvalidDatabase {
                uri: shown.to_owned(),
                name: database,
                reason,
            });
        }
        let client_options = co.clone();
        let client = Client::with_options(co).map_err(invalid)?;

        let hello = client
            .database("admin")
            .run_command(doc! { "hello": 1 })
            .await
            .map_err(|source| OpenError::Unreachable {
                uri: shown.to_owned(),
                source,
            })?;
        let replicated =
            hello.get_str("setName").is_ok() || hello.get_str("msg").is_ok_and(|m| m == "isdbgrid");
        if !replicated {
            return Err(OpenError::NotReplicaSet {
                uri: shown.to_owned(),
            });
        }

        let db = client.database(&database);
        Self::setup(&db).await.map_err(|source| OpenError::Setup {
            uri: shown.to_owned(),
            database: database.clone(),
            source,
        })?;
        tracing::info!(uri = %shown, database = %database, "MongoDB store open");
        Ok(MongoStore {
            colls: Collections::new(&db),
            client,
            database,
            uri: shown.to_owned(),
            operation_timeout: options.operation_timeout,
            txn_options: txn::transaction_options(write_concern),
            health: Health::new(shown.to_owned()),
            cache: Mutex::new(BodyCache::default()),
            lease: Lease::not_taken(db.collection("meta")),
            client_options,
        })
    }

    /// Stop renewing the lease without releasing it, as a broker killed
    /// with `kill -9` would: the next open waits one TTL before taking
    /// over. For tests of that takeover.
    pub fn abandon(&self) {
        self.lease.abandon();
    }

    /// Release the database's lease, so that the next broker can open it at
    /// once, and stop renewing it. Every write fails afterwards; call it
    /// once the broker has stopped writing (after its shutdown). Dropping
    /// the store does the same, from a thread of its own; after a process
    /// died (`kill -9`) the next open waits one TTL
    /// ([`MongoOptions::lease_ttl`]) before taking over.
    pub async fn close(&self) {
        self.lease.release().await;
    }

    /// Create the missing collections (outside any transaction, which older
    /// servers require) and the indexes (a no-op when they exist).
    async fn setup(db: &Database) -> mongodb::error::Result<()> {
        let existing = db.list_collection_names().await?;
        for name in Collections::NAMES {
            if !existing.iter().any(|e| e == name) {
                match db.create_collection(name).await {
                    Ok(()) => {}
                    // Created meanwhile by another broker: NamespaceExists.
                    Err(e) if matches!(&*e.kind, mongodb::error::ErrorKind::Command(c) if c.code == 48) =>
                        {}
                    Err(e) => return Err(e),
                }
            }
        }
        let unique = |keys: Document| {
            IndexModel::builder()
                .keys(keys)
                .options(IndexOptions::builder().unique(true).build())
                .build()
        };
        let colls = Collections::new(db);
        colls
            .packets
            .create_index(unique(doc! { field::CLIENT: 1, field::SEQ: 1 }))
            .await?;
        colls
            .incoming_qos2
            .create_index(unique(doc! { field::CLIENT: 1, field::PACKET_ID: 1 }))
            .await?;
        colls
            .subscriptions
            .create_index(unique(doc! { field::CLIENT: 1, field::TOPIC: 1 }))
            .await?;
        colls
            .retained
            .create_index(unique(doc! { field::TOPIC: 1 }))
            .await?;
        // For the largest retained id (`last_message_id`).
        colls
            .retained
            .create_index(
                IndexModel::builder()
                    .keys(doc! { field::RETAINED_ID: -1 })
                    .build(),
            )
            .await?;
        Ok(())
    }

    /// The broker's view of this store: all three traits backed by it.
    pub fn storage(self: &Arc<Self>) -> Storage {
        Storage::from_backend(self.clone())
    }

    /// The database in use.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// The server's URI, password hidden.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Run one store operation: bounded by the operation timeout, its
    /// outcome noted for the availability log.
    async fn guard<T>(
        &self,
        what: &str,
        operation: impl Future<Output = StorageResult<T>>,
    ) -> StorageResult<T> {
        let result = match tokio::time::timeout(self.operation_timeout, operation).await {
            Ok(result) => result,
            Err(elapsed) => Err(StorageError::unavailable(format!(
                "MongoDB at {} did not complete {what} within {:?}",
                self.uri, self.operation_timeout
            ))
            .with_source(elapsed)),
        };
        self.health.observe(&result);
        result
    }

    /// Insert or replace the one document of `coll` matching `filter`,
    /// retrying write conflicts, within the operation timeout.
    async fn upsert(
        &self,
        what: &str,
        coll: &mongodb::Collection<Document>,
        filter: Document,
        doc: Document,
    ) -> StorageResult<()> {
        let body = Single {
            coll: coll.clone(),
            filter,
            replacement: Some(doc),
        };
        self.guard(what, self.fenced(false, body)).await
    }

    async fn transaction<B: TxnBody>(&self, body: &mut B) -> StorageResult<B::Output> {
        txn::run(&self.client, &self.txn_options, &self.colls, body).await
    }

    /// [`Self::transaction`] for a write: only while the lease is held,
    /// checked inside the transaction (`touch`: by updating the lock
    /// document, which serializes it with a takeover).
    async fn fenced<B: TxnBody>(&self, touch: bool, body: B) -> StorageResult<B::Output> {
        self.lease.check()?;
        let mut fenced = Fenced {
            lease: &self.lease,
            touch,
            body,
        };
        self.transaction(&mut fenced).await
    }

    /// One page of a queue; `Ok(None)` when an entry's body was missing,
    /// which a concurrent acknowledgement can cause between the two reads
    /// of an aggregation outside a transaction.
    fn decode_page(&self, docs: Vec<Document>) -> StorageResult<Option<Vec<QueuedPacket>>> {
        let mut out = Vec::with_capacity(docs.len());
        for mut doc in docs {
            let mut f = Fields::new(&mut doc, "packets");
            let seq = f.u64(field::SEQ)?;
            let id = f.u64(field::MESSAGE_ID)?;
            let (delivery, state) = documents::entry_from_doc(&mut f)?;
            let cached = self.lock_cache().get(id);
            let message = match cached {
                Some(m) => m,
                None => {
                    let Some(body) = f.take_first_doc(field::BODY)? else {
                        return Ok(None);
                    };
                    let m = documents::message_from_doc(body, "messages", field::ID)?;
                    if m.id != id {
                        return Err(StorageError::corrupt(format!(
                            "queue entry {seq} points at message {id} but got body {}",
                            m.id
                        )));
                    }
                    self.lock_cache().share(m)
                }
            };
            out.push(QueuedPacket {
                seq,
                message,
                delivery,
                state,
            });
        }
        Ok(Some(out))
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, BodyCache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `uri` without its parameter `name` (a number of milliseconds), and that
/// parameter's value.
///
/// `timeoutMS` is the MongoDB URI option for a client-side bound of every
/// operation, which is what [`MongoOptions::operation_timeout`] is, and
/// `lease_ms` is ours ([`MongoOptions::lease_ttl`]); this driver knows
/// neither (and refuses unknown options), so they are taken out here.
fn take_param_ms(uri: &str, name: &str) -> Result<(String, Option<Duration>), String> {
    let Some((base, query)) = uri.split_once('?') else {
        return Ok((uri.to_owned(), None));
    };
    let mut timeout = None;
    let mut rest = Vec::new();
    for param in query.split('&') {
        match param.split_once('=') {
            Some((key, value)) if key.eq_ignore_ascii_case(name) => {
                let ms: u64 = value.parse().ok().filter(|ms| *ms > 0).ok_or_else(|| {
                    format!("{name} must be a positive number of milliseconds, not {value:?}")
                })?;
                timeout = Some(Duration::from_millis(ms));
            }
            _ => rest.push(param),
        }
    }
    let uri = if rest.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    Ok((uri, timeout))
}

/// The aggregation reading one queue page with its bodies.
fn queue_page_pipeline(client: &str, after: Option<i64>, limit: i64) -> Vec<Document> {
    let mut filter = doc! { field::CLIENT: client };
    if let Some(after) = after {
        filter.insert(field::SEQ, doc! { "$gt": after });
    }
    vec![
        doc! { "$match": filter },
        doc! { "$sort": { field::SEQ: 1 } },
        doc! { "$limit": limit },
        doc! { "$lookup": {
            "from": "messages",
            "localField": field::MESSAGE_ID,
            "foreignField": field::ID,
            "as": field::BODY,
        } },
    ]
}

/// Cursor batch size for a queue page: the whole page in the first reply.
fn page_batch_size(limit: usize) -> u32 {
    u32::try_from(limit.min(10_000)).unwrap_or(10_000)
}

/// One single-document write (upsert with `replacement`, else a
/// `delete_many`), as a transaction body so that the lease is checked with it.
struct Single {
    coll: Collection<Document>,
    filter: Document,
    replacement: Option<Document>,
}

#[async_trait]
impl TxnBody for Single {
    type Output = ();

    async fn run(&mut self, _: &Collections, s: &mut ClientSession) -> Result<(), Abort> {
        match &self.replacement {
            Some(doc) => {
                self.coll
                    .replace_one(self.filter.clone(), doc.clone())
                    .upsert(true)
                    .session(&mut *s)
                    .await?;
            }
            None => {
                self.coll
                    .delete_many(self.filter.clone())
                    .session(&mut *s)
                    .await?;
            }
        }
        Ok(())
    }
}

/// A queue page read again inside a snapshot transaction.
struct ConsistentPage {
    pipeline: Vec<Document>,
    batch_size: u32,
}

#[async_trait]
impl TxnBody for ConsistentPage {
    type Output = Vec<Document>;

    async fn run(
        &mut self,
        colls: &Collections,
        s: &mut ClientSession,
    ) -> Result<Vec<Document>, Abort> {
        let mut cursor = colls
            .packets
            .aggregate(self.pipeline.clone())
            .batch_size(self.batch_size)
            .session(&mut *s)
            .await?;
        let mut docs = Vec::new();
        while let Some(doc) = cursor.next(&mut *s).await {
            docs.push(doc?);
        }
        Ok(docs)
    }
}

/// Deletes a session's subscriptions and record together.
struct DeleteSession<'a> {
    client: &'a str,
}

#[async_trait]
impl TxnBody for DeleteSession<'_> {
    type Output = ();

    async fn run(&mut self, colls: &Collections, s: &mut ClientSession) -> Result<(), Abort> {
        colls
            .subscriptions
            .delete_many(doc! { field::CLIENT: self.client })
            .session(&mut *s)
            .await?;
        colls
            .sessions
            .delete_one(doc! { field::ID: self.client })
            .session(&mut *s)
            .await?;
        Ok(())
    }
}

/// Inserts or replaces subscriptions of a session, all or none.
struct AddSubscriptions<'a> {
    client: &'a str,
    filters: Vec<&'a str>,
    docs: Vec<Document>,
}

#[async_trait]
impl TxnBody for AddSubscriptions<'_> {
    type Output = ();

    async fn run(&mut self, colls: &Collections, s: &mut ClientSession) -> Result<(), Abort> {
        colls
            .subscriptions
            .delete_many(doc! {
                field::CLIENT: self.client,
                field::TOPIC: { "$in": &self.filters },
            })
            .session(&mut *s)
            .await?;
        colls
            .subscriptions
            .insert_many(&self.docs)
            .session(&mut *s)
            .await?;
        Ok(())
    }
}

#[async_trait]
impl PacketStore for MongoStore {
    async fn write(&self, ops: Vec<PacketOp>) -> StorageResult<()> {
        if ops.is_empty() {
            return Ok(());
        }
        // Long queues lose their front in transactions of their own first
        // (see `PurgeFront` for why, and what a crash between them leaves).
        let mut purged = BTreeSet::new();
        for op in &ops {
            if let PacketOp::Purge { client } = op {
                if !purged.insert(client) {
                    continue;
                }
                // Each chunk within the operation timeout, so that a long
                // purge makes progress however long it takes as a whole.
                loop {
                    let front = write::PurgeFront { client };
                    if self.guard("a purge", self.fenced(true, front)).await? == 0 {
                        break;
                    }
                }
            }
        }
        let body = write::WriteBatch {
            ops: &ops,
            careful: false,
        };
        self.guard("a write", self.fenced(true, body)).await
    }

    async fn read_queue(
        &self,
        client: &str,
        after: Option<Seq>,
        limit: usize,
    ) -> StorageResult<Vec<QueuedPacket>> {
        // Sequence numbers stay below 2^53: nothing comes after a larger one.
        let after = match after.map(i64::try_from) {
            None => None,
            Some(Ok(a)) => Some(a),
            Some(Err(_)) => return Ok(Vec::new()),
        };
        if limit == 0 {
            return Ok(Vec::new());
        }
        let pipeline = queue_page_pipeline(client, after, i64::try_from(limit).unwrap_or(i64::MAX));
        let batch_size = page_batch_size(limit);
        self.guard("a queue read", async {
            let docs: Vec<Document> = self
                .colls
                .packets
                .aggregate(pipeline.clone())
                .batch_size(batch_size)
                .await
                .map_err(storage_error)?
                .try_collect()
                .await
                .map_err(storage_error)?;
            if let Some(page) = self.decode_page(docs)? {
                return Ok(page);
            }
            // A body went missing: read again from one snapshot.
            let mut body = ConsistentPage {
                pipeline,
                batch_size,
            };
            let docs = self.transaction(&mut body).await?;
            self.decode_page(docs)?.ok_or_else(|| {
                StorageError::corrupt(format!(
                    "a queue entry of client {client:?} points at a message body that is not stored"
                ))
            })
        })
        .await
    }

    async fn queue_bounds(&self, client: &str) -> StorageResult<QueueBounds> {
        self.guard("a read of a queue's length", async {
            let pipeline = vec![
                doc! { "$match": { field::CLIENT: client } },
                doc! { "$group": {
                    "_id": null,
                    "len": { "$sum": 1 },
                    "last": { "$max": format!("${}", field::SEQ) },
                } },
            ];
            let docs: Vec<Document> = self
                .colls
                .packets
                .aggregate(pipeline)
                .await
                .map_err(storage_error)?
                .try_collect()
                .await
                .map_err(storage_error)?;
            let Some(mut d) = docs.into_iter().next() else {
                return Ok(QueueBounds::default());
            };
            let f = Fields::new(&mut d, "packets");
            Ok(QueueBounds {
                len: f.u64("len")?,
                last: f.opt_u64("last")?,
            })
        })
        .await
    }

    async fn incoming_qos2(&self, client: &str) -> StorageResult<Vec<u16>> {
        self.guard("a read of incoming QoS 2 state", async {
            let docs: Vec<Document> = self
                .colls
                .incoming_qos2
                .find(doc! { field::CLIENT: client })
                .sort(doc! { field::PACKET_ID: 1 })
                .projection(doc! { field::ID: 0, field::PACKET_ID: 1 })
                .await
                .map_err(storage_error)?
                .try_collect()
                .await
                .map_err(storage_error)?;
            docs.into_iter()
                .map(|mut d| Fields::new(&mut d, "incoming_qos2").int(field::PACKET_ID))
                .collect()
        })
        .await
    }

    async fn last_message_id(&self) -> StorageResult<MessageId> {
        self.guard("a read of the last message id", async {
            // Bodies first, then the mark: a batch that deletes the largest
            // body raises the mark in the same transaction, so whichever
            // read misses it, the other sees it.
            let largest = self
                .colls
                .messages
                .find_one(doc! {})
                .sort(doc! { field::ID: -1 })
                .projection(doc! { field::ID: 1 })
                .await
                .map_err(storage_error)?;
            let mark = self
                .colls
                .meta
                .find_one(doc! { field::ID: write::LAST_MESSAGE_ID })
                .await
                .map_err(storage_error)?;
            // Retained messages take ids from the same counter and live
            // nowhere else.
            let retained = self
                .colls
                .retained
                .find_one(doc! {})
                .sort(doc! { field::RETAINED_ID: -1 })
                .projection(doc! { field::ID: 0, field::RETAINED_ID: 1 })
                .await
                .map_err(storage_error)?;
            let largest = match largest {
                Some(mut d) => Fields::new(&mut d, "messages").u64(field::ID)?,
                None => 0,
            };
            let mark = match mark {
                Some(mut d) => Fields::new(&mut d, "meta").u64(field::VALUE)?,
                None => 0,
            };
            let retained = match retained {
                Some(mut d) => Fields::new(&mut d, "retained").u64(field::RETAINED_ID)?,
                None => 0,
            };
            Ok(largest.max(mark).max(retained))
        })
        .await
    }

    async fn wills(&self) -> StorageResult<Vec<StoredWill>> {
        self.guard("a read of the stored wills", async {
            let docs = all_by_id(&self.colls.wills).await?;
            docs.into_iter().map(documents::will_from_doc).collect()
        })
        .await
    }
}

#[async_trait]
impl SubscriptionStore for MongoStore {
    async fn save_session(&self, record: &SessionRecord) -> StorageResult<()> {
        let doc = documents::session_doc(record)?;
        let filter = doc! { field::ID: &record.client_id };
        self.upsert("a session write", &self.colls.sessions, filter, doc)
            .await
    }

    async fn delete_session(&self, client: &str) -> StorageResult<()> {
        self.guard(
            "a session deletion",
            self.fenced(false, DeleteSession { client }),
        )
        .await
    }

    async fn add_subscriptions(
        &self,
        client: &str,
        subscriptions: &[SubscriptionRecord],
    ) -> StorageResult<()> {
        // The last of several with one filter wins, as if added one by one.
        let mut latest: HashMap<&str, &SubscriptionRecord> = HashMap::new();
        for s in subscriptions {
            latest.insert(&s.filter, s);
        }
        if latest.is_empty() {
            return Ok(());
        }
        let body = AddSubscriptions {
            client,
            filters: latest.keys().copied().collect(),
            docs: latest
                .values()
                .map(|s| documents::subscription_doc(client, &s.filter, &s.options))
                .collect(),
        };
        self.guard("a subscription write", self.fenced(false, body))
            .await
    }

    async fn remove_subscriptions(&self, client: &str, filters: &[String]) -> StorageResult<()> {
        if filters.is_empty() {
            return Ok(());
        }
        let body = Single {
            coll: self.colls.subscriptions.clone(),
            filter: doc! { field::CLIENT: client, field::TOPIC: { "$in": filters } },
            replacement: None,
        };
        self.guard("a subscription deletion", self.fenced(false, body))
            .await
    }

    async fn load_sessions(&self) -> StorageResult<Vec<StoredSession>> {
        self.guard("a read of the sessions", async {
            let records = all_by_id(&self.colls.sessions).await?;
            let mut sessions = Vec::with_capacity(records.len());
            let mut index: HashMap<String, usize> = HashMap::with_capacity(records.len());
            for d in records {
                let record = documents::session_from_doc(d)?;
                index.insert(record.client_id.clone(), sessions.len());
                sessions.push(StoredSession {
                    record,
                    subscriptions: Vec::new(),
                });
            }
            let mut cursor = self
                .colls
                .subscriptions
                .find(doc! {})
                .await
                .map_err(storage_error)?;
            while let Some(d) = cursor.try_next().await.map_err(storage_error)? {
                let (client, filter, options) = documents::subscription_from_doc(d)?;
                // Subscriptions of a session without a record are not restored.
                if let Some(&i) = index.get(&client) {
                    sessions[i]
                        .subscriptions
                        .push(SubscriptionRecord { filter, options });
                }
            }
            Ok(sessions)
        })
        .await
    }
}

/// `s` as a regular expression matching itself literally.
fn escape_regex(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if matches!(
            c,
            '\\' | '^' | '$' | '.' | '|' | '?' | '*' | '+' | '(' | ')' | '[' | ']' | '{' | '}'
        ) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The query of a retained lookup by `filter` (see the crate docs).
fn retained_query(filter: &str) -> Document {
    if !topic::has_wildcard(filter) {
        return doc! { field::TOPIC: filter };
    }
    let prefix = topic::literal_prefix(filter);
    let mut alternatives = Vec::new();
    if !prefix.is_empty() {
        alternatives.push(doc! { field::TOPIC: {
            "$regex": format!("^{}", escape_regex(prefix)),
        } });
    }
    // `a/#` also matches `a` itself, outside the `a/` prefix.
    if let Some(parent) = prefix.strip_suffix('/') {
        if topic::matches(filter, parent) {
            alternatives.push(doc! { field::TOPIC: parent });
        }
    }
    match alternatives.len() {
        0 => doc! {},
        1 => alternatives.pop().unwrap_or_default(),
        _ => doc! { "$or": alternatives },
    }
}

#[async_trait]
impl RetainedStore for MongoStore {
    async fn set_retained(&self, message: Arc<Message>) -> StorageResult<()> {
        let doc = documents::retained_doc(&message)?;
        let filter = doc! { field::TOPIC: &message.topic };
        self.upsert(
            "a retained message write",
            &self.colls.retained,
            filter,
            doc,
        )
        .await
    }

    async fn delete_retained(&self, topic: &str) -> StorageResult<()> {
        let body = Single {
            coll: self.colls.retained.clone(),
            filter: doc! { field::TOPIC: topic },
            replacement: None,
        };
        self.guard("a retained message deletion", self.fenced(false, body))
            .await
    }

    async fn lookup_retained(&self, filter: &str) -> StorageResult<Vec<Arc<Message>>> {
        self.guard("a retained message lookup", async {
            let mut cursor = self
                .colls
                .retained
                .find(retained_query(filter))
                .projection(doc! { field::ID: 0 })
                .await
                .map_err(storage_error)?;
            let mut out = Vec::new();
            while let Some(d) = cursor.try_next().await.map_err(storage_error)? {
                let m = documents::message_from_doc(d, "retained", field::RETAINED_ID)?;
                if topic::matches(filter, &m.topic) {
                    out.push(Arc::new(m));
                }
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regex_escapes_metacharacters_only() {
        assert_eq!(escape_regex("a/b c/ä"), "a/b c/ä");
        assert_eq!(escape_regex("$SYS/a.b"), "\\$SYS/a\\.b");
        assert_eq!(
            escape_regex("(x)[y]{z}|^*?\\"),
            "\\(x\\)\\[y\\]\\{z\\}\\|\\^\\*\\?\\\\"
        );
    }

    #[test]
    fn retained_queries() {
        assert_eq!(retained_query("a/b"), doc! { "topic": "a/b" });
        assert_eq!(retained_query("#"), doc! {});
        assert_eq!(retained_query("+/x"), doc! {});
        assert_eq!(
            retained_query("$SYS/+"),
            doc! { "topic": { "$regex": "^\\$SYS/" } }
        );
        assert_eq!(
            retained_query("a/#"),
            doc! { "$or": [{ "topic": { "$regex": "^a/" } }, { "topic": "a" }] }
        );
        assert_eq!(retained_query("a/+"), doc! { "topic": { "$regex": "^a/" } });
    }

    #[test]
    fn lease_ms_is_taken_out_of_the_uri() {
        assert_eq!(
            take_param_ms("mongodb://h/db?lease_ms=1500&w=1", "lease_ms"),
            Ok((
                "mongodb://h/db?w=1".to_owned(),
                Some(Duration::from_millis(1500))
            ))
        );
    }

    #[test]
    fn timeout_ms_is_taken_out_of_the_uri() {
        assert_eq!(
            take_param_ms(
                "mongodb://h/db?directConnection=true&timeoutMS=2500&w=1",
                "timeoutMS"
            ),
            Ok((
                "mongodb://h/db?directConnection=true&w=1".to_owned(),
                Some(Duration::from_millis(2500))
            ))
        );
        assert_eq!(
            take_param_ms("mongodb://h/?timeoutms=10", "timeoutMS"),
            Ok(("mongodb://h/".to_owned(), Some(Duration::from_millis(10))))
        );
        assert_eq!(
            take_param_ms("mongodb://h/db", "timeoutMS"),
            Ok(("mongodb://h/db".to_owned(), None))
        );
        assert!(take_param_ms("mongodb://h/?timeoutMS=0", "timeoutMS").is_err());
        assert!(take_param_ms("mongodb://h/?timeoutMS=soon", "timeoutMS").is_err());
    }

    #[test]
    fn database_names() {
        assert!(invalid_database_name("broker").is_none());
        assert!(invalid_database_name("").is_some());
        assert!(invalid_database_name("a.b").is_some());
        assert!(invalid_database_name(&"x".repeat(64)).is_some());
    }
}
