//! The storage conformance suite, run against [`SqliteStore`] on real files.

use std::path::PathBuf;

use async_trait::async_trait;
use broker_core::storage::Storage;
use broker_core::testkit::StoreFactory;
use storage_sqlite::{SqliteOptions, SqliteStore, Synchronous};
use tempfile::TempDir;

/// A fresh database file per factory; `open` opens that same file again, so
/// the reopen case reads back what an earlier handle committed.
struct SqliteFactory {
    _dir: TempDir,
    path: PathBuf,
    options: SqliteOptions,
}

impl SqliteFactory {
    fn new(synchronous: Synchronous) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("nested/dir/broker.db");
        SqliteFactory {
            _dir: dir,
            path,
            options: SqliteOptions {
                synchronous,
                ..SqliteOptions::default()
            },
        }
    }
}

#[async_trait]
impl StoreFactory for SqliteFactory {
    async fn open(&self) -> Storage {
        match SqliteStore::open(&self.path, self.options.clone()) {
            Ok(store) => std::sync::Arc::new(store).storage(),
            Err(e) => panic!("cannot open {}: {e}", self.path.display()),
        }
    }

    fn durable(&self) -> bool {
        true
    }
}

broker_core::conformance_tests!(SqliteFactory::new(Synchronous::Normal));
broker_core::conformance_tests!(mod synchronous_full, SqliteFactory::new(Synchronous::Full));
