//! Redis implementation of the broker's storage traits: a store shared over
//! the network, for brokers that already run Redis.
//!
//! [`RedisStore`] implements [`PacketStore`], [`SubscriptionStore`] and
//! [`RetainedStore`] with the `redis` crate on tokio, through one
//! multiplexed connection that reconnects by itself
//! ([`redis::aio::ConnectionManager`]). Like every adapter it knows nothing
//! of MQTT: it stores what the core gives it and reads queues back in the
//! core's sequence order; the only topic logic it uses is the core's
//! [`topic::matches`] for retained lookups. It passes the conformance suite
//! of `broker_core::testkit`.
//!
//! # Key layout (version 2)
//! Every key starts with the configured prefix `P` (default `mqtt:`, see
//! [`RedisOptions::prefix`]). The keys mirror Mosca's collections, plus one
//! string per message so that a body is stored once however many sessions it
//! is queued for:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P layout` | string | `2`, the layout version; a prefix in version 1 is upgraded at open (see below), one holding another version is refused. |
//! | `P last_message_id` | string | the high-water mark of message ids (decimal), raised by every enqueue, never lowered. |
//! | `P msg:{id}` | string | one message body: the number of queue entries pointing at it in 10 zero-padded decimal digits, rewritten in place, then the body (binary, payload as raw bytes, see below). The key goes with its last reference. |
//! | `P queue:{client}` | sorted set | the session's queue: score the seq, member the entry `"{seq}:{message id}:{state}:{delivery}"`: the body it references, the state (empty for queued, the PUBREL packet id when released) and the delivery (QoS, retain, subscription ids, shared group) in binary. |
//! | `P qos2in:{client}` | set | incoming QoS 2 packet ids awaiting PUBREL. |
//! | `P sessions` | hash | client id → session record (JSON: `expiry_secs`, `disconnected_at_ms`). |
//! | `P sub:{client}` | hash | topic filter → subscription options (JSON). |
//! | `P retained` | hash | topic → retained message (same binary body as `msg:`). |
//! | `P retained_index` | sorted set | every retained topic at score 0, for `ZRANGEBYLEX`. |
//! | `P wills` | hash | will id → a connected client's will (binary: delay, expiry, client id, then the will message as a body), from CONNECT until published or deleted. |
//!
//! A key's type tag comes before the client id and every tag ends in `:`,
//! so client ids containing `:` (or anything else) never collide.
//!
//! # Value formats
//! Message bodies and queue entries, written and read on every publish,
//! are compact binary with the payload as raw bytes (never base64 or JSON);
//! decoding a body shares the payload with the reply buffer instead of
//! copying it. Session records and subscription options, read once at
//! start, are JSON for readability in `redis-cli`.
//!
//! A message body (in `msg:{id}` and `retained`), format version 1:
//! ```text
//! u8      format version (1)
//! u8      QoS
//! u8      flags: 1 retain, 2 payload format present, 4 payload format is UTF-8,
//!         8 expiry present, 16 content type present, 32 response topic present,
//!         64 correlation data present
//! varint  message id
//! varint  reception time (ms since the epoch)
//! varint  expiry time (ms since the epoch)          if flag 8
//! bytes   topic
//! bytes   content type                              if flag 16
//! bytes   response topic                            if flag 32
//! bytes   correlation data                          if flag 64
//! varint  number of user properties, then each as bytes key, bytes value
//! ...     the payload: every remaining byte
//! ```
//! `varint` is unsigned LEB128; `bytes` is a varint length and the bytes.
//!
//! A queue entry (a member of `queue:{client}`) is
//! `{seq}:{message id}:{state}:{delivery}`: the seq in decimal, which makes
//! the member unique and is also its score; the id in decimal, which the
//! Lua scripts read to count references; the state, empty when queued or
//! the PUBREL packet id in decimal when released, rewritten by `SetState`
//! (the member at that score replaced); and the delivery:
//! ```text
//! u8      QoS
//! u8      flags: 1 retain, 2 shared
//! varint  number of subscription identifiers, then each as a varint
//! ...     the shared subscription (`$share/...`): every remaining byte, if flag 2
//! ```
//!
//! Layout 1 (before 2026-12) kept bodies in hashes and each queue's
//! entries in a hash beside its sorted set of seqs: about twice the memory
//! per queued message. A broker opening a prefix in layout 1 upgrades it in
//! place before serving, resumably (the `upgrade` module).
//!
//! # How order is kept
//! A queue's order is its sorted set's score, the sequence number the core
//! assigned, read with `ZRANGEBYSCORE (after +inf LIMIT 0 n`. An entry
//! keeps its score when it is updated: `SetState` replaces the member at
//! that score by one with the new state, and nothing is ever popped and
//! pushed at the back (the `LREM` + `RPUSH` of Mosca's Redis backend,
//! which sent unacknowledged messages after newer ones). Seqs and ids stay
//! below 2^53, so scores are exact.
//!
//! # Atomicity and round trips
//! [`PacketStore::write`] sends the whole batch to one Lua script (one
//! `EVALSHA`), which applies it in order: reference counts, replaced entries
//! and the id high-water mark depend on earlier steps, so a `MULTI` would
//! not do. The script checks the batch's shape before its first write; Redis
//! runs a script alone, so no reader ever sees half a batch.
//! [`PacketStore::read_queue`] is one script call too, returning each entry
//! with its body. Subscription and retained writes that touch two keys are
//! `MULTI`/`EXEC` pipelines. A retained lookup with wildcards takes two
//! round trips: `ZRANGEBYLEX` over the filter's literal prefix on
//! `retained_index` (never `KEYS` or `SCAN`), matching with
//! [`topic::matches`] here (including `a/#`
//! matching `a`), then `HMGET` of the matches.
//!
//! The scripts build key names from the prefix, so the store needs a
//! standalone Redis (or one shard), not Redis Cluster.
//!
//! # Durability
//! `write` returns once Redis has applied the batch and answered; what that
//! survives is the Redis server's persistence configuration, read (with
//! `CONFIG GET`, where allowed) and logged at open, see [`Durability`]:
//! - `appendonly no`: everything since the last RDB snapshot is lost if
//!   Redis stops or crashes. Not suitable for QoS 1/2 promises; logged as a
//!   warning.
//! - `appendonly yes`, `appendfsync everysec` (Redis's default once AOF is
//!   on): a broker crash loses nothing. A Redis process crash normally loses
//!   nothing either (the AOF is written before the reply), though up to about
//!   2 s may be lost when the disk falls behind; an OS crash or power loss
//!   loses up to about 1 s of acknowledged writes.
//! - `appendonly yes`, `appendfsync always`: every acknowledged write
//!   survives a Redis crash, an OS crash and a power loss; each write waits
//!   for an fsync.
//! - `appendonly yes`, `appendfsync no`: the OS flushes when it likes
//!   (typically within 30 s); an OS crash loses that much. Logged as a warning.
//!
//! Start Redis with e.g. `redis-server --appendonly yes` (or set
//! `appendonly yes` in `redis.conf`).
//!
//! A Redis that may evict keys (`maxmemory` set and a `maxmemory-policy`
//! other than `noeviction`) is refused at open ([`OpenError::Evicting`]):
//! eviction would drop queued messages, and the lease, without an error.
//! With `noeviction` a full Redis refuses writes, which the broker reports
//! to the publishers (their messages are not acknowledged).
//!
//! # When Redis is down
//! Every operation fails with [`StorageError::Unavailable`] within
//! [`RedisOptions::response_timeout`] (a reconnection included), never
//! hangs. A lost connection is replaced on demand: while Redis is down each
//! operation makes one connection attempt (shared by concurrent operations)
//! and fails as soon as it does, at once when the connection is refused, so
//! operations work again as soon as Redis is back, without waiting out a
//! backoff. The loss and the recovery are logged once each (`warn`, then
//! `info`), not once per operation. As with any networked database, a
//! `write` that failed on a lost connection or a timeout may or may not have
//! been applied: the reply was lost, not necessarily the script.
//!
//! # Example
//! ```no_run
//! use std::sync::Arc;
//!
//! use broker_core::storage::Storage;
//! use storage_redis::{RedisOptions, RedisStore};
//!
//! # async fn example() -> Result<(), storage_redis::OpenError> {
//! let store = RedisStore::open(
//!     "redis://127.0.0.1:6379/0?prefix=site1:&timeout_ms=2000",
//!     RedisOptions::default(),
//! )
//! .await?;
//! let storage: Storage = Arc::new(store).storage();
//! let last = storage.packets.last_message_id().await;
//! # drop(last);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod codec;
mod error;
mod lease;
mod options;
mod scripts;
mod upgrade;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use broker_core::message::{Message, MessageId, Seq};
use broker_core::storage::{
    BodyCache, PacketOp, PacketStore, QueueBounds, QueuedPacket, RetainedStore, SessionRecord,
    Storage, StorageError, StorageResult, StoredSession, StoredWill, SubscriptionRecord,
    SubscriptionStore,
};
use broker_core::topic;
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, RedisResult, Value};

pub use error::OpenError;
pub use lease::{Holder, LeaseHealth};

/// Reads what the live owner of a prefix advertised ([`RedisStore::advertise`])
/// without opening the store or taking its lease: how a cluster's other
/// nodes find the leader.
pub struct LeaderLookup {
    conn: ConnectionManager,
    prefix: String,
    url: String,
}

/// The connection URL, the options with the URL's parameters applied, the
/// URL as shown (password hidden) and a client, from storage URL `url`.
fn client_for(
    url: &str,
    options: RedisOptions,
) -> Result<(String, RedisOptions, String, redis::Client), OpenError> {
    let (connect_url, options) = options::split_url(url, options)?;
    let shown = redact(url);
    let client = redis::Client::open(connect_url.as_str()).map_err(|e| OpenError::InvalidUrl {
        url: shown.clone(),
        reason: e.to_string(),
    })?;
    Ok((connect_url, options, shown, client))
}

/// How the reconnecting connections connect: one attempt per reconnection,
/// no retries. While Redis is down each operation fails as soon as its
/// attempt does (at once when refused) instead of waiting out a backoff,
/// and the first operation after Redis is back reconnects. Concurrent
/// operations share one attempt.
fn manager_config(options: &RedisOptions) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(options.connection_timeout)
        .set_response_timeout(options.response_timeout)
        .set_number_of_retries(0)
}

impl LeaderLookup {
    /// Connect to the Redis server of storage URL `url` (its parameters
    /// override `options`, as for [`RedisStore::open`]).
    pub async fn connect(url: &str, options: RedisOptions) -> Result<LeaderLookup, OpenError> {
        let (_, options, shown, client) = client_for(url, options)?;
        let config = manager_config(&options);
        let limit = options.connection_timeout + options.response_timeout;
        let conn = tokio::time::timeout(limit, ConnectionManager::new_with_config(client, config))
            .await
            .map_err(|_| OpenError::Timeout {
                url: shown.clone(),
                timeout: limit,
            })?
            .map_err(|source| OpenError::Connect {
                url: shown.clone(),
                source,
            })?;
        Ok(LeaderLookup {
            conn,
            prefix: options.prefix,
            url: shown,
        })
    }

    /// What the server's persistence settings promise (`CONFIG GET`);
    /// [`Durability::Unknown`] where `CONFIG` is not allowed.
    pub async fn durability(&self) -> StorageResult<Durability> {
        let mut conn = self.conn.clone();
        let config: RedisResult<HashMap<String, String>> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("append*")
            .query_async(&mut conn)
            .await;
        match config {
            Ok(config) => Ok(Durability::from_config(&config)),
            Err(e) if e.kind() == redis::ErrorKind::ResponseError => Ok(Durability::Unknown),
            Err(e) => Err(StorageError::unavailable(format!(
                "cannot read the persistence settings of Redis at {}",
                self.url
            ))
            .with_source(e)),
        }
    }

    /// What the live owner advertised: `None` while nobody holds the
    /// lease or its holder has not advertised yet. One round trip.
    pub async fn leader(&self) -> StorageResult<Option<String>> {
        let mut conn = self.conn.clone();
        lease::leader(&mut conn, &self.prefix).await.map_err(|e| {
            StorageError::unavailable(format!(
                "cannot read the leader of prefix `{}` at {}",
                self.prefix, self.url
            ))
            .with_source(e)
        })
    }
}
pub use options::{redact, RedisOptions, DEFAULT_PREFIX, MIN_LEASE_TTL};

use codec::corrupt;
use lease::Lease;
use scripts::Scripts;

/// Version of the key layout this crate reads and writes (`P layout`).
pub const LAYOUT_VERSION: u32 = 2;

/// Sequence numbers and message ids stay below this (the contract), so
/// Redis scores and Lua numbers hold them exactly.
const MAX_EXACT: u64 = 1 << 53;

/// Keys per `HMGET` or per pipeline when reading many at once.
const CHUNK: usize = 512;

/// What the Redis server's persistence settings make of an acknowledged
/// write, as read at open; see the [crate documentation](crate#durability).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `appendonly yes`, `appendfsync always`: survives a Redis crash, an OS
    /// crash and a power loss.
    EveryWrite,
    /// `appendonly yes`, `appendfsync everysec`: up to about 1 s may be lost
    /// on an OS crash or power loss (rarely on a Redis crash).
    EverySecond,
    /// `appendonly yes`, `appendfsync no`: the OS decides when to flush.
    OsFlush,
    /// `appendonly no`: only what the last RDB snapshot holds survives a
    /// Redis restart.
    SnapshotsOnly,
    /// The settings could not be read (`CONFIG` disabled or renamed, as on
    /// many managed services).
    Unknown,
}

impl Durability {
    fn from_config(config: &HashMap<String, String>) -> Durability {
        let get = |k: &str| config.get(k).map(|v| v.to_ascii_lowercase());
        match (get("appendonly").as_deref(), get("appendfsync").as_deref()) {
            (Some("no"), _) => Durability::SnapshotsOnly,
            (Some("yes"), Some("always")) => Durability::EveryWrite,
            (Some("yes"), Some("everysec")) => Durability::EverySecond,
            (Some("yes"), Some("no")) => Durability::OsFlush,
            _ => Durability::Unknown,
        }
    }

    /// What an acknowledged write survives under these settings, in a sentence.
    pub fn describe(self) -> &'static str {
        match self {
            Durability::EveryWrite => {
                "appendonly yes, appendfsync always: every acknowledged write survives a Redis or OS crash"
            }
            Durability::EverySecond => {
                "appendonly yes, appendfsync everysec: up to about 1 s of acknowledged writes may be lost on an OS crash or power loss"
            }
            Durability::OsFlush => {
                "appendonly yes, appendfsync no: acknowledged writes not yet flushed by the OS (often 30 s) are lost on an OS crash; consider appendfsync everysec"
            }
            Durability::SnapshotsOnly => {
                "appendonly no: everything written since the last RDB snapshot is lost when Redis stops; start Redis with --appendonly yes to keep QoS 1/2 messages"
            }
            Durability::Unknown => {
                "persistence settings unknown (CONFIG GET not allowed); make sure the server runs with appendonly yes"
            }
        }
    }
}

/// Key names under the prefix; see the [crate documentation](crate#key-layout-version-2).
struct Keys {
    prefix: String,
}

impl Keys {
    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
    fn tagged(&self, tag: &str, id: &str) -> String {
        format!("{}{tag}:{id}", self.prefix)
    }
    fn queue(&self, client: &str) -> String {
        self.tagged("queue", client)
    }
    fn qos2in(&self, client: &str) -> String {
        self.tagged("qos2in", client)
    }
    fn subs(&self, client: &str) -> String {
        self.tagged("sub", client)
    }
    fn msg_prefix(&self) -> String {
        self.key("msg:")
    }
    /// The `SCAN` pattern of every key under the prefix.
    fn all(&self) -> String {
        format!("{}*", glob_escape(&self.prefix))
    }
}

/// Whether Redis answers, so that losing and regaining it is logged once
/// each instead of once per operation.
struct Health {
    up: AtomicBool,
    down_since: Mutex<Option<Instant>>,
}

impl Health {
    fn observe<T>(&self, url: &str, result: &StorageResult<T>) {
        match result {
            Err(e) if e.is_unavailable() => {
                if self.up.swap(false, Ordering::SeqCst) {
                    *lock(&self.down_since) = Some(Instant::now());
                    tracing::warn!(
                        error = e as &dyn std::error::Error,
                        "Redis storage at {url} unavailable; storage operations fail until it \
                         answers again"
                    );
                }
            }
            // Any answer, even an error, means Redis is there.
            _ => {
                if !self.up.load(Ordering::Relaxed) && !self.up.swap(true, Ordering::SeqCst) {
                    let since = lock(&self.down_since).take();
                    let secs = since.map_or(0.0, |t| t.elapsed().as_secs_f64());
                    tracing::info!("Redis storage at {url} available again after {secs:.1} s");
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A broker store in a Redis database; see the [crate documentation](crate).
pub struct RedisStore {
    conn: ConnectionManager,
    keys: Keys,
    scripts: Scripts,
    options: RedisOptions,
    /// The URL with its password hidden.
    url: String,
    durability: Durability,
    health: Health,
    cache: Mutex<BodyCache>,
    lease: Arc<Lease>,
    /// The URL the client connects to (password included), to release the
    /// lease from `drop`.
    connect_url: String,
}

impl Drop for RedisStore {
    /// Releases the lease if [`RedisStore::close`] did not: an orderly exit
    /// lets the next broker start at once. Blocks for at most the
    /// connection plus response timeouts.
    fn drop(&mut self) {
        let timeout = self.options.connection_timeout + self.options.response_timeout;
        self.lease.release_on_drop(&self.connect_url, timeout);
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.url)
            .field("prefix", &self.keys.prefix)
            .field("durability", &self.durability)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connect to the Redis server at `url` (a storage URL, see
    /// [`RedisOptions::from_url`]; its parameters override `options`),
    /// check or write the key layout version under the prefix, read the
    /// server's persistence settings, and load the scripts.
    ///
    /// Fails within [`RedisOptions::connection_timeout`] plus
    /// [`RedisOptions::response_timeout`] with an error naming the URL
    /// (password hidden) when Redis cannot be reached: open does not wait
    /// for Redis to come up.
    pub async fn open(url: &str, options: RedisOptions) -> Result<RedisStore, OpenError> {
        let (connect_url, options, shown, client) = client_for(url, options)?;
        let keys = Keys {
            prefix: options.prefix.clone(),
        };
        let scripts = Scripts::new();

        let limit = options.connection_timeout + options.response_timeout;
        let setup = async {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(options.connection_timeout)
                .set_response_timeout(options.response_timeout);
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map_err(|source| OpenError::Connect {
                    url: shown.clone(),
                    source,
                })?;
            let found = setup(&mut conn, &keys, &scripts, &shown).await?;
            Ok::<_, OpenError>((found, conn))
        };
        let ((durability, upgrade), mut plain) = tokio::time::timeout(limit, setup)
            .await
            .map_err(|_| OpenError::Timeout {
                url: shown.clone(),
                timeout: limit,
            })??;
        // Not within `limit`: a dead holder's lease is waited for, up to its TTL.
        let lease = lease::acquire(
            &mut plain,
            &keys.prefix,
            &shown,
            options.lease_ttl,
            options.response_timeout,
        )
        .await?;
        drop(plain);

        let config = manager_config(&options);
        let connected =
            tokio::time::timeout(limit, ConnectionManager::new_with_config(client, config)).await;
        let conn = match connected {
            Ok(Ok(conn)) => conn,
            failed => {
                let error = match failed {
                    Ok(Err(source)) => OpenError::Connect {
                        url: shown.clone(),
                        source,
                    },
                    _ => OpenError::Timeout {
                        url: shown.clone(),
                        timeout: limit,
                    },
                };
                // Give the prefix back; if Redis is gone the lease expires.
                if let Ok(c) = redis::Client::open(connect_url.as_str()) {
                    if let Ok(Ok(mut c)) =
                        tokio::time::timeout(limit, c.get_multiplexed_async_connection()).await
                    {
                        lease.release(&mut c).await;
                    }
                }
                return Err(error);
            }
        };
        lease.start_heartbeat(conn.clone(), options.response_timeout);

        match durability {
            Durability::SnapshotsOnly | Durability::OsFlush | Durability::Unknown => {
                tracing::warn!(
                    "Redis storage at {shown} (prefix `{}`): {}",
                    keys.prefix,
                    durability.describe()
                )
            }
            Durability::EveryWrite | Durability::EverySecond => tracing::info!(
                "Redis storage at {shown} (prefix `{}`): {}",
                keys.prefix,
                durability.describe()
            ),
        }
        let store = RedisStore {
            conn,
            keys,
            scripts,
            options,
            url: shown,
            durability,
            health: Health {
                up: AtomicBool::new(true),
                down_since: Mutex::new(None),
            },
            cache: Mutex::new(BodyCache::default()),
            lease,
            connect_url,
        };
        if upgrade {
            // Dropping the store on failure gives the lease back.
            store
                .upgrade_from_1()
                .await
                .map_err(|source| OpenError::Upgrade {
                    url: store.url.clone(),
                    prefix: store.keys.prefix.clone(),
                    source,
                })?;
        }
        Ok(store)
    }

    /// How this store's lease stands: a node that must not serve once
    /// another broker may own the prefix (a cluster's leader) watches it.
    pub fn lease_health(&self) -> LeaseHealth {
        self.lease.health()
    }

    /// The lease's time to live ([`RedisOptions::lease_ttl`]).
    pub fn lease_ttl(&self) -> Duration {
        self.lease.ttl()
    }

    /// Publish `value` (for a cluster: where this broker serves) for
    /// [`LeaderLookup::leader`] to read, fenced by the lease: it fails once
    /// another broker owns the prefix. Replaced by the next owner's.
    pub async fn advertise(&self, value: &str) -> StorageResult<()> {
        let mut conn = self.conn.clone();
        self.lease.advertise(&mut conn, value).await
    }

    /// Stop renewing the lease without releasing it, as a broker killed
    /// with `kill -9` would: the next open waits for it to expire. For
    /// tests of that takeover.
    pub fn abandon(&self) {
        self.lease.abandon();
    }

    /// Release the prefix's lease, so that the next broker can open it at
    /// once, and stop renewing it. Every write fails afterwards; call it
    /// once the broker has stopped writing (after its shutdown). Dropping
    /// the store does the same, on a blocking connection of its own; a
    /// process that dies (`kill -9`) leaves the lease to expire within its
    /// TTL ([`RedisOptions::lease_ttl`]).
    pub async fn close(&self) {
        let mut conn = self.conn.clone();
        self.lease.release(&mut conn).await;
    }

    /// Delete every key under the prefix of `url`, the lease included,
    /// without taking the lease: for decommissioning a prefix and for
    /// cleaning up after tests. A broker still running on it loses its lease
    /// and stops writing.
    pub async fn destroy(url: &str, options: RedisOptions) -> Result<(), OpenError> {
        let (_, options, shown, client) = client_for(url, options)?;
        let limit = options.connection_timeout + options.response_timeout;
        let work = async {
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .map_err(|source| OpenError::Connect {
                    url: shown.clone(),
                    source,
                })?;
            let pattern = format!("{}*", glob_escape(&options.prefix));
            let mut cursor = 0u64;
            loop {
                let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await
                    .map_err(|source| OpenError::Setup {
                        url: shown.clone(),
                        source,
                    })?;
                if !keys.is_empty() {
                    redis::cmd("UNLINK")
                        .arg(keys)
                        .query_async::<()>(&mut conn)
                        .await
                        .map_err(|source| OpenError::Setup {
                            url: shown.clone(),
                            source,
                        })?;
                }
                if next == 0 {
                    return Ok(());
                }
                cursor = next;
            }
        };
        tokio::time::timeout(limit * 4, work)
            .await
            .map_err(|_| OpenError::Timeout {
                url: shown.clone(),
                timeout: limit * 4,
            })?
    }

    /// The broker's view of this store: all three traits backed by it.
    pub fn storage(self: &Arc<Self>) -> Storage {
        Storage::from_backend(self.clone())
    }

    /// The URL connected to, password hidden.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.keys.prefix
    }

    /// What an acknowledged write survives, from the server's settings at open.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// Bytes Redis reports for the keys under the prefix (`MEMORY USAGE`
    /// of each), for operators and benchmarks. Walks the prefix with
    /// `SCAN`: slow on a large store, never used by the broker itself.
    pub async fn used_bytes(&self) -> StorageResult<u64> {
        let mut total = 0;
        let all = self.keys.all();
        let mut cursor = 0u64;
        loop {
            let (next, keys) = self.scan(cursor, &all).await?;
            if !keys.is_empty() {
                let mut pipe = redis::pipe();
                for k in &keys {
                    pipe.cmd("MEMORY").arg("USAGE").arg(k).arg("SAMPLES").arg(0);
                }
                let mut conn = self.conn.clone();
                let sizes: Vec<Option<u64>> = self.call(pipe.query_async(&mut conn)).await?;
                total += sizes.into_iter().flatten().sum::<u64>();
            }
            if next == 0 {
                return Ok(total);
            }
            cursor = next;
        }
    }

    /// Delete every key under the prefix but the lease, which this store
    /// keeps holding (tests, benchmarks). Walks the prefix with `SCAN`; not
    /// atomic. [`RedisStore::destroy`] deletes the lease too.
    pub async fn clear(&self) -> StorageResult<()> {
        self.lease.check()?;
        let keep = [self.keys.key("owner"), self.keys.key("lease")];
        let all = self.keys.all();
        let mut cursor = 0u64;
        loop {
            let (next, mut keys) = self.scan(cursor, &all).await?;
            keys.retain(|k| !keep.iter().any(|keep| keep.as_bytes() == k.as_slice()));
            if !keys.is_empty() {
                let mut conn = self.conn.clone();
                let mut cmd = redis::cmd("UNLINK");
                cmd.arg(&keys);
                self.call(cmd.query_async::<()>(&mut conn)).await?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// One `SCAN` step over the keys matching `pattern` (a glob under the
    /// prefix, e.g. [`Keys::all`]).
    async fn scan(&self, cursor: u64, pattern: &str) -> StorageResult<(u64, Vec<Vec<u8>>)> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000);
        self.call(cmd.query_async(&mut conn)).await
    }

    /// Run one exchange with Redis, bounded by the response timeout, with
    /// errors mapped to [`StorageError`] and availability tracked.
    async fn call<T>(&self, exchange: impl Future<Output = RedisResult<T>>) -> StorageResult<T> {
        let timeout = self.options.response_timeout;
        let result = match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if e.code() == Some(error::LEASE_LOST) => Err(self
                .lease
                .lost(e.detail().unwrap_or("taken by another broker"))),
            Ok(Err(e)) => Err(error::storage_error(e)),
            Err(elapsed) => Err(StorageError::unavailable(format!(
                "no answer from Redis within {} ms",
                timeout.as_millis()
            ))
            .with_source(elapsed)),
        };
        self.health.observe(&self.url, &result);
        result.map_err(|e| {
            if e.is_unavailable() && !e.message().contains(&self.url) {
                e.map_message(|m| format!("{m} (at {})", self.url))
            } else {
                e
            }
        })
    }

    /// Run `commands` (full key names) in one script call that first checks
    /// the lease, raising `last_message_id` to `raise_id` if given.
    async fn guarded(
        &self,
        raise_id: Option<MessageId>,
        commands: &[redis::Cmd],
    ) -> StorageResult<()> {
        self.lease.check()?;
        let mut script = self.scripts.guarded.prepare_invoke();
        script
            .arg(&self.keys.prefix)
            .arg(self.lease.token())
            .arg(raise_id.map(|id| id.to_string()).unwrap_or_default());
        for cmd in commands {
            let args: Vec<&[u8]> = cmd
                .args_iter()
                .filter_map(|a| match a {
                    redis::Arg::Simple(b) => Some(b),
                    redis::Arg::Cursor => None,
                })
                .collect();
            script.arg(args.len());
            for a in args {
                script.arg(a);
            }
        }
        let mut conn = self.conn.clone();
        self.call(script.invoke_async::<i64>(&mut conn)).await?;
        Ok(())
    }

    /// A message body, from the cache when another entry already holds it.
    fn body(
        &self,
        id: MessageId,
        blob: Option<Vec<u8>>,
        what: &str,
    ) -> StorageResult<Arc<Message>> {
        if let Some(m) = lock(&self.cache).get(id) {
            return Ok(m);
        }
        let blob = blob.ok_or_else(|| corrupt(what, format!("body of message {id} is missing")))?;
        let m = codec::queued_body(Bytes::from(blob))
            .and_then(codec::decode_message)
            .map_err(|e| corrupt(&format!("{what}, body of message {id}"), e))?;
        if m.id != id {
            return Err(corrupt(
                what,
                format!("body under id {id} holds message {}", m.id),
            ));
        }
        Ok(lock(&self.cache).insert(m))
    }

    /// Retained bodies of `topics` (those still there), in one round trip.
    async fn retained_bodies(&self, topics: &[String]) -> StorageResult<Vec<Arc<Message>>> {
        if topics.is_empty() {
            return Ok(Vec::new());
        }
        let retained = self.keys.key("retained");
        let mut pipe = redis::pipe();
        for chunk in topics.chunks(CHUNK) {
            pipe.cmd("HMGET").arg(&retained).arg(chunk);
        }
        let mut conn = self.conn.clone();
        let replies: Vec<Value> = self.call(pipe.query_async(&mut conn)).await?;
        let mut out = Vec::with_capacity(topics.len());
        for (reply, chunk) in replies.into_iter().zip(topics.chunks(CHUNK)) {
            for (v, topic) in array(reply, "retained bodies")?.into_iter().zip(chunk) {
                if let Some(blob) = bulk(v, "retained body")? {
                    let m = codec::decode_message(Bytes::from(blob))
                        .map_err(|e| corrupt(&format!("retained message of {topic:?}"), e))?;
                    out.push(Arc::new(m));
                }
            }
        }
        Ok(out)
    }
}

/// Checks and loads at open, on a plain connection: layout version,
/// persistence settings, scripts. Also says whether the prefix is in
/// layout 1, to be upgraded once the lease is taken.
async fn setup(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
    scripts: &Scripts,
    url: &str,
) -> Result<(Durability, bool), OpenError> {
    let failed = |source| OpenError::Setup {
        url: url.to_owned(),
        source,
    };
    let layout = keys.key("layout");
    let (found,): (Option<String>,) = redis::pipe()
        .cmd("SETNX")
        .arg(&layout)
        .arg(LAYOUT_VERSION)
        .ignore()
        .cmd("GET")
        .arg(&layout)
        .query_async(conn)
        .await
        .map_err(failed)?;
    let found = found.unwrap_or_default();
    let upgrade = if found == LAYOUT_VERSION.to_string() {
        false
    } else if found == "1" || found == upgrade::UPGRADING {
        true
    } else {
        return Err(OpenError::Layout {
            url: url.to_owned(),
            prefix: keys.prefix.clone(),
            found,
        });
    };
    // CONFIG may be disabled (managed Redis): then the durability is unknown.
    let config: RedisResult<HashMap<String, String>> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("append*")
        .query_async(conn)
        .await;
    let durability = match config {
        Ok(config) => Durability::from_config(&config),
        Err(e) => {
            tracing::debug!("cannot read the persistence settings of Redis at {url}: {e}");
            Durability::Unknown
        }
    };
    if let Some((maxmemory, policy)) = eviction(conn).await {
        return Err(OpenError::Evicting {
            url: url.to_owned(),
            maxmemory,
            policy,
        });
    }
    for script in scripts.all() {
        script.load_async(conn).await.map_err(failed)?;
    }
    Ok((durability, upgrade))
}

/// `(maxmemory, maxmemory-policy)` when Redis may evict keys: a limit is
/// set and the policy is not `noeviction`. `None` when it never evicts, or
/// when `CONFIG` is not allowed (then the settings are unknown; the
/// durability line says so).
async fn eviction(conn: &mut MultiplexedConnection) -> Option<(String, String)> {
    let mut setting = HashMap::new();
    for name in ["maxmemory", "maxmemory-policy"] {
        let found: HashMap<String, String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg(name)
            .query_async(conn)
            .await
            .ok()?;
        setting.insert(name, found.get(name)?.clone());
    }
    let (maxmemory, policy) = (
        setting.remove("maxmemory")?,
        setting.remove("maxmemory-policy")?,
    );
    evicts(&maxmemory, &policy).then_some((maxmemory, policy))
}

/// Whether these settings let Redis evict keys.
fn evicts(maxmemory: &str, policy: &str) -> bool {
    maxmemory.trim() != "0" && !policy.eq_ignore_ascii_case("noeviction")
}

/// Escape the glob characters of `SCAN MATCH`.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The elements of an array reply (nil reads as empty).
fn array(v: Value, what: &str) -> StorageResult<Vec<Value>> {
    match v {
        Value::Array(items) | Value::Set(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => Err(corrupt(what, format!("expected an array, got {other:?}"))),
    }
}

/// A bulk string reply, moved out without copying (nil is `None`).
fn bulk(v: Value, what: &str) -> StorageResult<Option<Vec<u8>>> {
    match v {
        Value::BulkString(b) => Ok(Some(b)),
        Value::Nil => Ok(None),
        Value::SimpleString(s) => Ok(Some(s.into_bytes())),
        other => Err(corrupt(what, format!("expected a string, got {other:?}"))),
    }
}

/// Field-value pairs of a hash reply (`HGETALL`: a flat array, or a map in RESP3).
fn pairs(v: Value, what: &str) -> StorageResult<Vec<(Vec<u8>, Vec<u8>)>> {
    let raw: Vec<(Value, Value)> = match v {
        Value::Map(m) => m,
        other => {
            let items = array(other, what)?;
            if items.len() % 2 != 0 {
                return Err(corrupt(what, "odd number of hash elements"));
            }
            let mut it = items.into_iter();
            let mut out = Vec::new();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                out.push((k, v));
            }
            out
        }
    };
    raw.into_iter()
        .map(|(k, v)| match (bulk(k, what)?, bulk(v, what)?) {
            (Some(k), Some(v)) => Ok((k, v)),
            _ => Err(corrupt(what, "nil in a hash reply")),
        })
        .collect()
}

fn utf8(b: Vec<u8>, what: &str) -> StorageResult<String> {
    String::from_utf8(b).map_err(|e| corrupt(what, "not UTF-8").with_source(e))
}

/// The smallest byte string greater than every string starting with
/// `prefix`, or `None` when there is none (empty prefix, or all 0xFF).
fn upper_bound(prefix: &str) -> Option<Vec<u8>> {
    let mut bytes = prefix.as_bytes().to_vec();
    while let Some(last) = bytes.pop() {
        if last < 0xFF {
            bytes.push(last + 1);
            return Some(bytes);
        }
    }
    None
}

#[async_trait]
impl PacketStore for RedisStore {
    async fn write(&self, ops: Vec<PacketOp>) -> StorageResult<()> {
        if ops.is_empty() {
            return Ok(());
        }
        self.lease.check()?;
        let mut script = self.scripts.write.prepare_invoke();
        script.arg(&self.keys.prefix).arg(self.lease.token());
        for op in &ops {
            match op {
                PacketOp::Enqueue { message, targets } => {
                    script
                        .arg("E")
                        .arg(message.id)
                        .arg(codec::encode_message(message))
                        .arg(targets.len());
                    for t in targets {
                        script.arg(&*t.client).arg(t.seq).arg(codec::encode_member(
                            t.seq,
                            message.id,
                            &t.delivery,
                        ));
                    }
                }
                PacketOp::Remove { client, seq } => {
                    script.arg("R").arg(&**client).arg(*seq);
                }
                PacketOp::SetState { client, seq, state } => {
                    script
                        .arg("S")
                        .arg(&**client)
                        .arg(*seq)
                        .arg(codec::encode_state(*state));
                }
                PacketOp::Purge { client } => {
                    script.arg("P").arg(&**client);
                }
                PacketOp::IncomingQos2Received { client, packet_id } => {
                    script.arg("Q").arg(&**client).arg(*packet_id);
                }
                PacketOp::IncomingQos2Released { client, packet_id } => {
                    script.arg("L").arg(&**client).arg(*packet_id);
                }
                PacketOp::StoreWill { will } => {
                    script.arg("W").arg(will.id()).arg(codec::encode_will(will));
                }
                PacketOp::DeleteWill { id, .. } => {
                    script.arg("D").arg(*id);
                }
            }
        }
        let mut conn = self.conn.clone();
        self.call(script.invoke_async::<i64>(&mut conn)).await?;
        Ok(())
    }

    async fn read_queue(
        &self,
        client: &str,
        after: Option<Seq>,
        limit: usize,
    ) -> StorageResult<Vec<QueuedPacket>> {
        let min = match after {
            // Sequence numbers stay below 2^53: nothing comes after a larger one.
            Some(a) if a >= MAX_EXACT - 1 => return Ok(Vec::new()),
            Some(a) => format!("({a}"),
            None => "-inf".to_owned(),
        };
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut script = self.scripts.read_queue.prepare_invoke();
        script
            .key(self.keys.queue(client))
            .arg(min)
            .arg(limit)
            .arg(self.keys.msg_prefix());
        let mut conn = self.conn.clone();
        let reply: Value = self.call(script.invoke_async(&mut conn)).await?;

        let what = format!("queue of {client:?}");
        let items = array(reply, &what)?;
        if items.len() % 2 != 0 {
            return Err(corrupt(&what, "reply is not entry, body pairs"));
        }
        let mut out = Vec::with_capacity(items.len() / 2);
        let mut it = items.into_iter();
        while let (Some(member), Some(body)) = (it.next(), it.next()) {
            let member = bulk(member, &what)?.unwrap_or_default();
            let (seq, entry) = codec::decode_member(&member).map_err(|e| {
                corrupt(
                    &format!("{what}, entry {:?}", String::from_utf8_lossy(&member)),
                    e,
                )
            })?;
            let message = self.body(
                entry.message_id,
                bulk(body, &what)?,
                &format!("{what}, entry {seq}"),
            )?;
            out.push(QueuedPacket {
                seq,
                message,
                delivery: entry.delivery,
                state: entry.state,
            });
        }
        Ok(out)
    }

    async fn queue_bounds(&self, client: &str) -> StorageResult<QueueBounds> {
        let mut conn = self.conn.clone();
        let queue = self.keys.queue(client);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("ZCARD")
            .arg(&queue)
            .cmd("ZRANGE")
            .arg(&queue)
            .arg(-1)
            .arg(-1);
        let (len, last): (u64, Vec<Vec<u8>>) = self.call(pipe.query_async(&mut conn)).await?;
        let last = match last.first() {
            None => None,
            Some(member) => Some(
                codec::member_seq(member)
                    .map_err(|e| corrupt(&format!("queue of {client:?}"), e))?,
            ),
        };
        Ok(QueueBounds { len, last })
    }

    async fn incoming_qos2(&self, client: &str) -> StorageResult<Vec<u16>> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("SMEMBERS");
        cmd.arg(self.keys.qos2in(client));
        let ids: Vec<String> = self.call(cmd.query_async(&mut conn)).await?;
        ids.into_iter()
            .map(|id| {
                id.parse()
                    .map_err(|_| corrupt(&format!("incoming QoS 2 ids of {client:?}"), &id))
            })
            .collect()
    }

    async fn last_message_id(&self) -> StorageResult<MessageId> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.keys.key("last_message_id"));
        let v: Option<String> = self.call(cmd.query_async(&mut conn)).await?;
        match v {
            None => Ok(0),
            Some(v) => v.parse().map_err(|_| corrupt("last_message_id", v)),
        }
    }

    async fn wills(&self) -> StorageResult<Vec<StoredWill>> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(self.keys.key("wills"));
        let reply: Value = self.call(cmd.query_async(&mut conn)).await?;
        let mut wills = Vec::new();
        for (id, value) in pairs(reply, "wills")? {
            let what = format!("will {:?}", String::from_utf8_lossy(&id));
            let will = codec::decode_will(Bytes::from(value)).map_err(|e| corrupt(&what, e))?;
            wills.push(will);
        }
        wills.sort_by_key(StoredWill::id);
        Ok(wills)
    }
}

#[async_trait]
impl SubscriptionStore for RedisStore {
    async fn save_session(&self, record: &SessionRecord) -> StorageResult<()> {
        let mut cmd = redis::cmd("HSET");
        cmd.arg(self.keys.key("sessions"))
            .arg(&record.client_id)
            .arg(codec::encode_session(record));
        self.guarded(None, &[cmd]).await
    }

    async fn delete_session(&self, client: &str) -> StorageResult<()> {
        let mut hdel = redis::cmd("HDEL");
        hdel.arg(self.keys.key("sessions")).arg(client);
        let mut del = redis::cmd("DEL");
        del.arg(self.keys.subs(client));
        self.guarded(None, &[hdel, del]).await
    }

    async fn add_subscriptions(
        &self,
        client: &str,
        subscriptions: &[SubscriptionRecord],
    ) -> StorageResult<()> {
        if subscriptions.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("HSET");
        cmd.arg(self.keys.subs(client));
        for s in subscriptions {
            cmd.arg(&s.filter).arg(codec::encode_options(&s.options));
        }
        self.guarded(None, &[cmd]).await
    }

    async fn remove_subscriptions(&self, client: &str, filters: &[String]) -> StorageResult<()> {
        if filters.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("HDEL");
        cmd.arg(self.keys.subs(client)).arg(filters);
        self.guarded(None, &[cmd]).await
    }

    async fn load_sessions(&self) -> StorageResult<Vec<StoredSession>> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(self.keys.key("sessions"));
        let reply: Value = self.call(cmd.query_async(&mut conn)).await?;
        let mut sessions = Vec::new();
        for (client, record) in pairs(reply, "sessions")? {
            let client = utf8(client, "session client id")?;
            let record = codec::decode_session(client.clone(), &record)
                .map_err(|e| corrupt(&format!("session {client:?}"), e))?;
            sessions.push(StoredSession {
                record,
                subscriptions: Vec::new(),
            });
        }
        // Subscriptions, a pipeline of HGETALLs per chunk of sessions.
        for chunk in sessions.chunks_mut(CHUNK) {
            let mut pipe = redis::pipe();
            for s in chunk.iter() {
                pipe.cmd("HGETALL").arg(self.keys.subs(&s.record.client_id));
            }
            let replies: Vec<Value> = self.call(pipe.query_async(&mut conn)).await?;
            if replies.len() != chunk.len() {
                return Err(corrupt("subscriptions", "one reply per session expected"));
            }
            for (s, reply) in chunk.iter_mut().zip(replies) {
                let what = format!("subscriptions of {:?}", s.record.client_id);
                for (filter, options) in pairs(reply, &what)? {
                    let filter = utf8(filter, &what)?;
                    let options = codec::decode_options(&options)
                        .map_err(|e| corrupt(&format!("{what}, filter {filter:?}"), e))?;
                    s.subscriptions.push(SubscriptionRecord { filter, options });
                }
            }
        }
        Ok(sessions)
    }
}

#[async_trait]
impl RetainedStore for RedisStore {
    async fn set_retained(&self, message: Arc<Message>) -> StorageResult<()> {
        let mut hset = redis::cmd("HSET");
        hset.arg(self.keys.key("retained"))
            .arg(&message.topic)
            .arg(codec::encode_message(&message));
        let mut zadd = redis::cmd("ZADD");
        zadd.arg(self.keys.key("retained_index"))
            .arg(0)
            .arg(&message.topic);
        // Its id is stored nowhere else: the high-water mark must cover it.
        self.guarded(Some(message.id), &[hset, zadd]).await
    }

    async fn delete_retained(&self, topic: &str) -> StorageResult<()> {
        let mut hdel = redis::cmd("HDEL");
        hdel.arg(self.keys.key("retained")).arg(topic);
        let mut zrem = redis::cmd("ZREM");
        zrem.arg(self.keys.key("retained_index")).arg(topic);
        self.guarded(None, &[hdel, zrem]).await
    }

    async fn lookup_retained(&self, filter: &str) -> StorageResult<Vec<Arc<Message>>> {
        if !topic::has_wildcard(filter) {
            return self.retained_bodies(&[filter.to_owned()]).await;
        }
        // The index range of the literal prefix, then exact matching here.
        let prefix = topic::literal_prefix(filter);
        let min: Vec<u8> = if prefix.is_empty() {
            b"-".to_vec()
        } else {
            [b"[", prefix.as_bytes()].concat()
        };
        let max: Vec<u8> = match upper_bound(prefix) {
            Some(upper) => [&b"("[..], &upper].concat(),
            None => b"+".to_vec(),
        };
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("ZRANGEBYLEX");
        cmd.arg(self.keys.key("retained_index")).arg(min).arg(max);
        let reply: Value = self.call(cmd.query_async(&mut conn)).await?;
        let mut topics = Vec::new();
        for t in array(reply, "retained index")? {
            let t = utf8(
                bulk(t, "retained index")?.unwrap_or_default(),
                "retained topic",
            )?;
            if topic::matches(filter, &t) {
                topics.push(t);
            }
        }
        // `a/#` also matches `a` itself, which sorts outside the `a/` range.
        if let Some(parent) = prefix.strip_suffix('/') {
            if topic::matches(filter, parent) {
                topics.push(parent.to_owned());
            }
        }
        self.retained_bodies(&topics).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upper_bounds() {
        assert_eq!(upper_bound("a/"), Some(b"a0".to_vec()));
        assert_eq!(upper_bound(""), None);
        assert_eq!(upper_bound("a\u{7f}"), Some(b"a\x80".to_vec()));
    }

    #[test]
    fn glob_escaping() {
        assert_eq!(glob_escape("mqtt:"), "mqtt:");
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }

    #[test]
    fn eviction_settings() {
        assert!(!evicts("0", "allkeys-lru"), "no limit: nothing evicted");
        assert!(!evicts("1073741824", "noeviction"));
        assert!(!evicts("1073741824", "NoEviction"));
        assert!(evicts("1073741824", "allkeys-lru"));
        assert!(evicts("100mb", "volatile-ttl"), "the lease key has a TTL");
    }

    #[test]
    fn durability_from_config() {
        let config = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>()
        };
        for (pairs, want) in [
            (
                &[("appendonly", "no"), ("appendfsync", "always")][..],
                Durability::SnapshotsOnly,
            ),
            (
                &[("appendonly", "yes"), ("appendfsync", "always")],
                Durability::EveryWrite,
            ),
            (
                &[("appendonly", "yes"), ("appendfsync", "everysec")],
                Durability::EverySecond,
            ),
            (
                &[("appendonly", "yes"), ("appendfsync", "no")],
                Durability::OsFlush,
            ),
            (&[], Durability::Unknown),
        ] {
            assert_eq!(Durability::from_config(&config(pairs)), want, "{pairs:?}");
        }
    }
}
