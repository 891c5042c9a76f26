//! Storage URLs: which backend, where. Each backend is a Cargo feature of this crate.
//!
//! - `memory://`: nothing survives the process.
//! - `sqlite://PATH[?synchronous=normal|full&max_size_mb=N]`: a SQLite file;
//!   `sqlite://data/broker.db` is relative to the working directory,
//!   `sqlite:///var/lib/broker.db` absolute. Directories are created.
//! - `redis://HOST:PORT/DB[?prefix=..&timeout_ms=..&connect_timeout_ms=..]`:
//!   Redis (feature `redis`); parameters in `storage_redis::RedisOptions::from_url`.
//! - `mongodb://HOST:PORT/DB[?OPTIONS]`: MongoDB (feature `mongo`), the
//!   driver's URI options included.

use std::sync::Arc;

use anyhow::bail;
use broker_core::storage::Storage;
use storage_memory::MemoryStore;

/// Backends known by scheme, with the Cargo feature that provides each.
const SCHEMES: &[(&str, &str)] = &[
    ("memory", "(always built in)"),
    ("sqlite", "sqlite"),
    ("redis", "redis"),
    ("rediss", "redis"),
    ("mongodb", "mongo"),
    ("mongodb+srv", "mongo"),
];

/// The backend a storage URL names, checked as far as can be without
/// opening anything (the server backends' parameters are their drivers').
#[derive(Debug, PartialEq, Eq)]
pub enum Target<'a> {
    /// `memory://`.
    Memory,
    /// `sqlite://PATH?...`.
    #[cfg(feature = "sqlite")]
    Sqlite(&'a str, storage_sqlite::SqliteOptions),
    /// `redis://` or `rediss://`.
    #[cfg(feature = "redis")]
    Redis,
    /// `mongodb://` or `mongodb+srv://`.
    #[cfg(feature = "mongo")]
    Mongo,
}

/// Which backend `url` names, or why it names none this build has.
pub fn parse(url: &str) -> anyhow::Result<Target<'_>> {
    let Some((scheme, rest)) = url.split_once("://") else {
        bail!("storage URL `{url}` has no scheme (expected e.g. `sqlite://data/broker.db`)");
    };
    #[cfg(not(feature = "sqlite"))]
    let _ = rest;
    match scheme {
        "memory" => Ok(Target::Memory),
        #[cfg(feature = "sqlite")]
        "sqlite" => sqlite::parse(rest).map(|(path, options)| Target::Sqlite(path, options)),
        #[cfg(feature = "redis")]
        "redis" | "rediss" => Ok(Target::Redis),
        #[cfg(feature = "mongo")]
        "mongodb" | "mongodb+srv" => Ok(Target::Mongo),
        other => Err(not_built_in(other)),
    }
}

/// The file of a `sqlite://` URL, `None` for the other backends.
pub fn sqlite_path(url: &str) -> anyhow::Result<Option<&str>> {
    match parse(url)? {
        #[cfg(feature = "sqlite")]
        Target::Sqlite(path, _) => Ok(Some(path)),
        _ => Ok(None),
    }
}

/// Whether `a` and `b` name the same storage: the same URL, or the same
/// SQLite file however spelled.
pub fn same_storage(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    match (sqlite_path(a), sqlite_path(b)) {
        (Ok(Some(pa)), Ok(Some(pb))) => {
            let canonical = |p: &str| {
                let path = std::path::Path::new(p);
                // A file not created yet: its directory, canonical, and its name.
                match (path.parent(), path.file_name()) {
                    (Some(dir), Some(name)) => {
                        let dir = if dir.as_os_str().is_empty() {
                            std::path::Path::new(".")
                        } else {
                            dir
                        };
                        std::fs::canonicalize(dir)
                            .map(|d| d.join(name))
                            .unwrap_or_else(|_| path.to_path_buf())
                    }
                    _ => path.to_path_buf(),
                }
            };
            canonical(pa) == canonical(pb)
        }
        _ => false,
    }
}

/// `url` with the password of its user info, if any, hidden: for messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{hosts}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// Open the storage named by `url`.
pub async fn open(url: &str) -> anyhow::Result<Storage> {
    Ok(open_closable(url).await?.storage)
}

/// A storage opened by [`open_closable`], with what releases it.
pub struct Opened {
    /// The three stores.
    pub storage: Storage,
    backend: Backend,
}

/// The concrete store behind an [`Opened`], for what the traits do not
/// offer: releasing a lease at once.
enum Backend {
    /// Memory and SQLite: released when the last reference goes (SQLite's
    /// exclusive lock with its worker thread).
    Dropped,
    #[cfg(feature = "redis")]
    Redis(Arc<storage_redis::RedisStore>),
    #[cfg(feature = "mongo")]
    Mongo(Arc<storage_mongo::MongoStore>),
}

impl Opened {
    /// Release the store: the lease of a server backend is given back at
    /// once (the next broker need not wait), a SQLite file is unlocked.
    /// Dropping does the same, but on a blocking connection of its own.
    pub async fn close(self) {
        let Opened { storage, backend } = self;
        drop(storage);
        match backend {
            Backend::Dropped => {}
            #[cfg(feature = "redis")]
            Backend::Redis(store) => store.close().await,
            #[cfg(feature = "mongo")]
            Backend::Mongo(store) => store.close().await,
        }
    }
}

/// Open the storage named by `url`, keeping what closes it.
pub async fn open_closable(url: &str) -> anyhow::Result<Opened> {
    let (storage, backend) = match parse(url)? {
        Target::Memory => (
            Storage::from_backend(Arc::new(MemoryStore::new())),
            Backend::Dropped,
        ),
        #[cfg(feature = "sqlite")]
        Target::Sqlite(path, options) => (sqlite::open(path, options).await?, Backend::Dropped),
        #[cfg(feature = "redis")]
        Target::Redis => {
            let store = Arc::new(storage_redis::RedisStore::open(url, Default::default()).await?);
            (store.storage(), Backend::Redis(store))
        }
        #[cfg(feature = "mongo")]
        Target::Mongo => {
            let store = Arc::new(storage_mongo::MongoStore::open(url, Default::default()).await?);
            (store.storage(), Backend::Mongo(store))
        }
    };
    Ok(Opened { storage, backend })
}

/// Whether `e` (an error of [`open`]) says that another process, most
/// likely a running broker, holds the storage: SQLite's exclusive lock, or
/// the lease of a Redis prefix or MongoDB database.
pub fn held_by_another(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        #[cfg(feature = "sqlite")]
        if matches!(
            cause.downcast_ref::<storage_sqlite::OpenError>(),
            Some(storage_sqlite::OpenError::Locked { .. })
        ) {
            return true;
        }
        #[cfg(feature = "redis")]
        if matches!(
            cause.downcast_ref::<storage_redis::OpenError>(),
            Some(storage_redis::OpenError::Locked { .. })
        ) {
            return true;
        }
        #[cfg(feature = "mongo")]
        if matches!(
            cause.downcast_ref::<storage_mongo::OpenError>(),
            Some(storage_mongo::OpenError::Locked { .. })
        ) {
            return true;
        }
        let _ = cause;
        false
    })
}

/// Why a scheme cannot be opened by this build: the Cargo feature it
/// needs, or that no backend has it.
fn not_built_in(scheme: &str) -> anyhow::Error {
    match SCHEMES.iter().find(|(s, _)| *s == scheme) {
        Some((_, feature)) => anyhow::anyhow!(
            "storage scheme `{scheme}://` needs the `{feature}` Cargo feature of the `broker` crate, \
             which this binary was built without (cargo build -p broker --features {feature})"
        ),
        None => {
            let known: Vec<String> = SCHEMES.iter().map(|(s, _)| format!("{s}://")).collect();
            anyhow::anyhow!(
                "unknown storage URL scheme `{scheme}://` (known: {})",
                known.join(", ")
            )
        }
    }
}

/// Split `path?k=v&k2=v2` into the path and its parameters.
#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
fn path_and_params(rest: &str) -> anyhow::Result<(&str, Vec<(&str, &str)>)> {
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let params = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.split_once('=')
                .ok_or_else(|| anyhow::anyhow!("storage URL parameter `{p}` has no value"))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok((path, params))
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use anyhow::{bail, Context};
    use broker_core::storage::Storage;
    use storage_sqlite::{SqliteOptions, SqliteStore};

    pub(super) fn parse(rest: &str) -> anyhow::Result<(&str, SqliteOptions)> {
        let (path, params) = super::path_and_params(rest)?;
        if path.is_empty() {
            bail!("sqlite:// needs a file path, e.g. sqlite://data/broker.db");
        }
        let mut options = SqliteOptions::default();
        for (key, value) in params {
            match key {
                "synchronous" => options.synchronous = value.parse().map_err(anyhow::Error::msg)?,
                "max_size_mb" => {
                    let mb: u64 = value
                        .parse()
                        .with_context(|| format!("max_size_mb `{value}` is not a number"))?;
                    let bytes = mb.checked_mul(1024 * 1024).with_context(|| {
                        format!("max_size_mb `{value}` is more bytes than 64 bits count")
                    })?;
                    options.max_size_bytes = Some(bytes);
                }
                other => {
                    bail!("unknown sqlite:// parameter `{other}` (known: synchronous, max_size_mb)")
                }
            }
        }
        Ok((path, options))
    }

    pub(super) async fn open(path: &str, options: SqliteOptions) -> anyhow::Result<Storage> {
        let path = path.to_owned();
        // Opening reads the file and may migrate it: off the async workers.
        let store = tokio::task::spawn_blocking(move || SqliteStore::open(path, options))
            .await
            .context("the task opening the database failed")??;
        Ok(std::sync::Arc::new(store).storage())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_and_knows_the_same_file() {
        assert_eq!(
            redact("redis://u:secret@h:6379/0?prefix=a"),
            "redis://u:***@h:6379/0?prefix=a"
        );
        assert_eq!(redact("mongodb://h/db"), "mongodb://h/db");
        assert_eq!(redact("mongodb://user@h/db"), "mongodb://user@h/db");
        assert!(same_storage("memory://", "memory://"));
        assert!(!same_storage(
            "redis://h/0?prefix=a",
            "redis://h/0?prefix=b"
        ));
        #[cfg(feature = "sqlite")]
        {
            let dir = tempfile::tempdir().expect("tempdir");
            let d = dir.path().display();
            assert!(same_storage(
                &format!("sqlite://{d}/x.db"),
                &format!("sqlite://{d}/./x.db?synchronous=full")
            ));
            assert!(!same_storage(
                &format!("sqlite://{d}/x.db"),
                &format!("sqlite://{d}/y.db")
            ));
        }
    }

    #[tokio::test]
    async fn errors_name_the_feature_or_the_known_schemes() {
        // Whatever this build has, the message for a missing backend names its feature.
        let e = not_built_in("mongodb").to_string();
        assert!(e.contains("`mongo` Cargo feature"), "{e}");
        assert!(e.contains("--features mongo"), "{e}");
        let e = open("foo://x")
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("unknown storage URL scheme `foo://`"), "{e}");
        assert!(e.contains("memory://"), "{e}");
        let e = open("nothing")
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("no scheme"), "{e}");
        assert!(open("memory://").await.is_ok());
    }

    #[cfg(feature = "sqlite")]
    #[tokio::test]
    async fn sqlite_urls_relative_absolute_and_parameters() {
        let dir = tempfile::tempdir().expect("tempdir");
        let abs = dir.path().join("a/b/abs.db");
        let url = format!("sqlite://{}?synchronous=full&max_size_mb=10", abs.display());
        assert!(url.starts_with("sqlite:///"));
        drop(open(&url).await.expect("absolute path with parameters"));
        assert!(abs.exists());

        let e = open("sqlite://x.db?synchronous=sometimes").await.err();
        let e = e.map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("unknown synchronous mode"), "{e}");
        let e = open("sqlite://x.db?cache=big").await.err();
        let e = e.map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("unknown sqlite:// parameter `cache`"), "{e}");
        let e = open("sqlite://").await.err();
        let e = e.map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("needs a file path"), "{e}");
    }
}
