//! The storage backends by name, opened fresh for a benchmark and cleaned up
//! afterwards.
//!
//! | name | what is opened | cleaned up on drop |
//! |---|---|---|
//! | `memory` | [`MemoryStore`] | nothing to do |
//! | `sqlite` | [`SqliteStore`] on a new file in a temporary directory, `synchronous = normal` (durable through `kill -9`; `BENCH_SQLITE_SYNCHRONOUS=full` for power loss too) | the directory is deleted |
//! | `redis` | [`RedisStore`] at `REDIS_URL` (default [`DEFAULT_REDIS_URL`]) under a key prefix of its own | every key under the prefix ([`RedisStore::clear`]) |
//! | `mongo` | [`MongoStore`] at `MONGODB_URI` (default [`DEFAULT_MONGODB_URI`]) in a database of its own | the database is dropped |
//!
//! Which backends a benchmark runs is [`selected`]: the comma-separated
//! names in `BENCH_BACKENDS`, all four by default. A server backend that
//! cannot be reached is an error that says how to start the server or how
//! to leave the backend out ([`BackendError`]); benchmarks never skip a
//! backend silently, so a figure that is missing from a run is never
//! mistaken for one that was measured.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use broker_core::storage::{PacketStore, RetainedStore, Storage};
use storage_memory::MemoryStore;
use storage_mongo::{MongoOptions, MongoStore};
use storage_redis::{RedisOptions, RedisStore};
use storage_sqlite::{SqliteOptions, SqliteStore, Synchronous};
use tempfile::TempDir;

/// Redis server used when `REDIS_URL` is not set.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/";

/// MongoDB server used when `MONGODB_URI` is not set.
pub const DEFAULT_MONGODB_URI: &str = "mongodb://127.0.0.1:27017/?directConnection=true";

/// How to start a Redis server the benchmarks can use.
const REDIS_HOW_TO: &str = "start one with\n    \
    redis-server --port 6379 --bind 127.0.0.1 --appendonly yes --daemonize yes\n\
    or set REDIS_URL to a reachable one (e.g. REDIS_URL=redis://127.0.0.1:6380/)";

/// How to start a MongoDB-compatible server the benchmarks can use (from
/// the project's notes on the test server; any replica-set `mongod` works too).
const MONGO_HOW_TO: &str = "start one (a replica set member: the store uses transactions), \
    e.g. the compiled MongoDB-compatible server:\n    \
    apt-get install -y cmake\n    \
    cargo install secantus-mdb --version 0.5.3-beta.196 --ignore-rust-version --locked --root ~/.cache/secantus\n    \
    ~/.cache/secantus/bin/secantusd-rs --host 127.0.0.1 --port 27017 --storage-path \"$(mktemp -d)\" --cache-size 256M --log-file-max 16MB &\n\
    or the slower one from PyPI:\n    \
    python3 -m venv .venv-mongo && .venv-mongo/bin/pip install 'SecantusDB==0.7.0b3'\n    \
    .venv-mongo/bin/secantusd-py --host 127.0.0.1 --port 27017 --storage-path \"$(mktemp -d)\" &\n\
    or set MONGODB_URI to a reachable one (a real mongod needs --replSet and rs.initiate())";

/// Bounds given to the server stores: benchmarks send much larger batches
/// and pages than a broker usually does (fan-out to 1,000 sessions, 100,000
/// queued messages), and a slow test server must not turn a measurement
/// into a timeout. Parameters in the URL itself still win.
const SERVER_OPERATION_TIMEOUT: Duration = Duration::from_secs(300);

/// One storage backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// In process memory.
    Memory,
    /// An SQLite file.
    Sqlite,
    /// A Redis server.
    Redis,
    /// A MongoDB server.
    Mongo,
}

impl Backend {
    /// Every backend, in the order benchmarks list them.
    pub const ALL: [Backend; 4] = [
        Backend::Memory,
        Backend::Sqlite,
        Backend::Redis,
        Backend::Mongo,
    ];

    /// The name used in `BENCH_BACKENDS` and as benchmark id.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::Sqlite => "sqlite",
            Backend::Redis => "redis",
            Backend::Mongo => "mongo",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Backend::ALL
            .into_iter()
            .find(|b| b.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| format!("unknown backend `{s}` (known: {})", names(&Backend::ALL)))
    }
}

/// `a,b,c` from the backends' names.
fn names(backends: &[Backend]) -> String {
    backends
        .iter()
        .map(|b| b.name())
        .collect::<Vec<_>>()
        .join(",")
}

/// The backends chosen by `BENCH_BACKENDS` (comma-separated names, in the
/// order given, duplicates ignored); all four when it is unset or empty.
pub fn selected() -> Result<Vec<Backend>, String> {
    match std::env::var("BENCH_BACKENDS") {
        Ok(list) if !list.trim().is_empty() => parse_list(&list),
        _ => Ok(Backend::ALL.to_vec()),
    }
}

/// Parse a comma-separated list of backend names, as `BENCH_BACKENDS` holds.
///
/// ```
/// use benches::backends::{parse_list, Backend};
/// assert_eq!(parse_list("sqlite, memory").unwrap(), vec![Backend::Sqlite, Backend::Memory]);
/// assert!(parse_list("sqlite,postgres").is_err());
/// ```
pub fn parse_list(list: &str) -> Result<Vec<Backend>, String> {
    let mut chosen = Vec::new();
    for name in list.split(',').filter(|n| !n.trim().is_empty()) {
        let backend = name
            .parse::<Backend>()
            .map_err(|e| format!("BENCH_BACKENDS: {e}"))?;
        if !chosen.contains(&backend) {
            chosen.push(backend);
        }
    }
    if chosen.is_empty() {
        return Err(format!(
            "BENCH_BACKENDS names no backend (known: {})",
            names(&Backend::ALL)
        ));
    }
    Ok(chosen)
}

/// Why a backend could not be opened, with what to do about it.
#[derive(Debug)]
pub struct BackendError {
    backend: Backend,
    message: String,
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot open the {} backend: {}\n\
             To benchmark without it, list the others in BENCH_BACKENDS (e.g. BENCH_BACKENDS={}).",
            self.backend,
            self.message,
            names(
                &Backend::ALL
                    .into_iter()
                    .filter(|b| *b != self.backend)
                    .collect::<Vec<_>>()
            )
        )
    }
}

impl std::error::Error for BackendError {}

/// A store opened for a benchmark. Dropping it removes what the benchmark
/// stored (see the [module documentation](self)).
pub struct BenchStore {
    backend: Backend,
    storage: Storage,
    /// Declared after `storage` so that the store is dropped (and its file
    /// closed) before the cleanup runs.
    cleanup: Cleanup,
}

/// What to remove when a [`BenchStore`] goes.
enum Cleanup {
    Nothing,
    /// The SQLite file's directory: held only to be deleted when dropped.
    Directory {
        _dir: TempDir,
    },
    /// Keys under a prefix: the URL (prefix included) to clear them through.
    RedisPrefix {
        url: String,
    },
    /// A database of its own on the server at `uri`.
    MongoDatabase {
        uri: String,
        database: String,
    },
}

impl fmt::Debug for BenchStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BenchStore")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl BenchStore {
    /// Open a fresh, empty store of `backend`.
    pub async fn open(backend: Backend) -> Result<BenchStore, BackendError> {
        let fail = |message: String| BackendError { backend, message };
        let (storage, cleanup) = match backend {
            Backend::Memory => (Arc::new(MemoryStore::new()).storage(), Cleanup::Nothing),
            Backend::Sqlite => {
                let synchronous = match std::env::var("BENCH_SQLITE_SYNCHRONOUS") {
                    Ok(s) if !s.is_empty() => s
                        .parse::<Synchronous>()
                        .map_err(|e| fail(format!("BENCH_SQLITE_SYNCHRONOUS: {e}")))?,
                    _ => Synchronous::Normal,
                };
                let dir = tempfile::Builder::new()
                    .prefix("broker-bench-sqlite-")
                    .tempdir()
                    .map_err(|e| fail(format!("no temporary directory: {e}")))?;
                let options = SqliteOptions {
                    synchronous,
                    ..SqliteOptions::default()
                };
                let store = SqliteStore::open(dir.path().join("bench.db"), options)
                    .map_err(|e| fail(e.to_string()))?;
                (Arc::new(store).storage(), Cleanup::Directory { _dir: dir })
            }
            Backend::Redis => {
                let base = env_or("REDIS_URL", DEFAULT_REDIS_URL);
                let url = with_query_param(&base, "prefix", &unique_name("bench:", ":"));
                let options = RedisOptions {
                    response_timeout: SERVER_OPERATION_TIMEOUT,
                    ..RedisOptions::default()
                };
                let store = RedisStore::open(&url, options)
                    .await
                    .map_err(|e| fail(format!("{e}\nRedis: {REDIS_HOW_TO}")))?;
                (Arc::new(store).storage(), Cleanup::RedisPrefix { url })
            }
            Backend::Mongo => {
                let uri = env_or("MONGODB_URI", DEFAULT_MONGODB_URI);
                let database = unique_name("bench_", "");
                let options = MongoOptions {
                    database: Some(database.clone()),
                    operation_timeout: SERVER_OPERATION_TIMEOUT,
                    ..MongoOptions::default()
                };
                let store = MongoStore::open(&uri, options)
                    .await
                    .map_err(|e| fail(format!("{e}\nMongoDB: {MONGO_HOW_TO}")))?;
                (
                    Arc::new(store).storage(),
                    Cleanup::MongoDatabase { uri, database },
                )
            }
        };
        Ok(BenchStore {
            backend,
            storage,
            cleanup,
        })
    }

    /// Which backend this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// All three stores.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The packet store (session queues).
    pub fn packets(&self) -> &Arc<dyn PacketStore> {
        &self.storage.packets
    }

    /// The retained store.
    pub fn retained(&self) -> &Arc<dyn RetainedStore> {
        &self.storage.retained
    }
}

impl Drop for BenchStore {
    fn drop(&mut self) {
        // The SQLite directory is left to its field's own drop, which comes
        // after the store's: the file is closed before it is deleted.
        match &self.cleanup {
            Cleanup::Nothing | Cleanup::Directory { .. } => {}
            Cleanup::RedisPrefix { url } => {
                let url = url.clone();
                on_own_runtime(async move {
                    // A connection of its own (the store's belongs to the
                    // runtime that opened it, which may be gone or blocked on
                    // this very drop), without the store's lease: `destroy`
                    // deletes the lease with the rest.
                    if let Err(e) = RedisStore::destroy(&url, RedisOptions::default()).await {
                        eprintln!("benchmark keys under {url} not removed: {e}");
                    }
                })
            }
            Cleanup::MongoDatabase { uri, database } => {
                let (uri, database) = (uri.clone(), database.clone());
                on_own_runtime(async move {
                    let dropped = async {
                        let mut options = mongodb::options::ClientOptions::parse(&uri).await?;
                        options.server_selection_timeout = Some(Duration::from_secs(5));
                        mongodb::Client::with_options(options)?
                            .database(&database)
                            .drop()
                            .await
                    };
                    // Bounded: a server that stopped answering must not hang
                    // the run in a destructor.
                    match tokio::time::timeout(Duration::from_secs(120), dropped).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => eprintln!("benchmark database {database} not dropped: {e}"),
                        Err(_) => eprintln!("benchmark database {database} not dropped: timed out"),
                    }
                })
            }
        }
    }
}

/// Run `cleanup` to completion on a runtime of its own, on a thread of its
/// own, so that it can be called from `Drop` inside or outside a runtime.
fn on_own_runtime(cleanup: impl std::future::Future<Output = ()> + Send + 'static) {
    let worker = std::thread::spawn(move || {
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime.block_on(cleanup),
            Err(e) => eprintln!("benchmark data not removed: no runtime: {e}"),
        }
    });
    if worker.join().is_err() {
        eprintln!("benchmark data not removed: the cleanup panicked");
    }
}

/// Open and drop each of `backends` once, so that a benchmark run fails at
/// its start, not after minutes of other measurements, when a server is
/// missing.
pub async fn check_reachable(backends: &[Backend]) -> Result<(), BackendError> {
    for &backend in backends {
        drop(BenchStore::open(backend).await?);
    }
    Ok(())
}

/// The environment variable `name`, or `default` when unset or empty.
fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// A name no other store of this or another benchmark run uses:
/// `{head}{pid}_{time}_{counter}{tail}`.
fn unique_name(head: &str, tail: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or_default();
    format!(
        "{head}{}_{micros:x}_{}{tail}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// `url` with `key=value` appended to its query. Appended last, so that it
/// wins over the same parameter in the URL (the Redis store reads the
/// parameters in order).
fn with_query_param(url: &str, key: &str, value: &str) -> String {
    let (base, fragment) = match url.split_once('#') {
        Some((base, fragment)) => (base, Some(fragment)),
        None => (url, None),
    };
    let separator = match base.find('?') {
        None => "?",
        Some(i) if i + 1 == base.len() || base.ends_with('&') => "",
        Some(_) => "&",
    };
    let mut out = format!("{base}{separator}{key}={value}");
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(fragment);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameter_appended() {
        assert_eq!(
            with_query_param("redis://h:1/", "prefix", "p:"),
            "redis://h:1/?prefix=p:"
        );
        assert_eq!(
            with_query_param("redis://h:1/0?timeout_ms=9", "prefix", "p:"),
            "redis://h:1/0?timeout_ms=9&prefix=p:"
        );
        assert_eq!(
            with_query_param("redis://h:1/?", "prefix", "p:"),
            "redis://h:1/?prefix=p:"
        );
    }

    #[test]
    fn lists_parsed() {
        assert_eq!(
            parse_list("mongo,memory,mongo").unwrap(),
            vec![Backend::Mongo, Backend::Memory]
        );
        assert!(parse_list(" , ").is_err());
        assert!(parse_list("memory,sqlight").is_err());
    }

    #[test]
    fn names_are_unique() {
        assert_ne!(unique_name("a", ""), unique_name("a", ""));
    }
}
