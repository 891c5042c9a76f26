//! The storage conformance suite, run against `MongoStore` on the server
//! at `MONGODB_URI` (default `mongodb://127.0.0.1:27017/?directConnection=true`).
//!
//! Each factory uses a database of its own, dropped when the factory goes.
//! Without a reachable server every case fails, saying how to start one.
//!
//! The cases take turns: the MongoDB-compatible test server answers one
//! request at a time, and cases running side by side on it (with whatever
//! else the machine runs) made each other's operations exceed their
//! timeout. What a case checks about concurrency it does within itself.
//! For the same reason operations get a generous timeout here: this suite
//! checks correctness, not speed, and a server that stops answering still
//! fails its case (`broker_core::testkit::CASE_TIMEOUT`).

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use broker_core::storage::Storage;
use broker_core::testkit::StoreFactory;
use storage_mongo::{MongoOptions, MongoStore};
use tokio::sync::{Semaphore, SemaphorePermit};

/// One case at a time on the server (see the module docs).
static TURN: Semaphore = Semaphore::const_new(1);

/// A fresh database per factory; `open` opens that same database again, so
/// the reopen case reads back what an earlier handle committed.
struct MongoFactory {
    uri: String,
    database: String,
    opened: AtomicBool,
    /// Stores opened and not closed yet: `close` gives their lease back.
    open: Mutex<Vec<Arc<MongoStore>>>,
    /// Held from creation to drop, so that the database is dropped within
    /// the case's turn too.
    _turn: SemaphorePermit<'static>,
}

impl MongoFactory {
    /// Waits for this case's turn. The wait blocks the case's own thread
    /// (each test has a runtime of its own), before its time limit starts.
    fn new() -> Self {
        let turn =
            futures::executor::block_on(TURN.acquire()).expect("the semaphore is never closed");
        MongoFactory {
            uri: support::mongodb_uri(),
            database: support::fresh_database("conformance"),
            opened: AtomicBool::new(false),
            open: Mutex::new(Vec::new()),
            _turn: turn,
        }
    }
}

#[async_trait]
impl StoreFactory for MongoFactory {
    async fn open(&self) -> Storage {
        let options = MongoOptions {
            database: Some(self.database.clone()),
            operation_timeout: Duration::from_secs(60),
            ..MongoOptions::default()
        };
        let store = Arc::new(support::open_or_fail(&self.uri, options).await);
        self.opened.store(true, Ordering::Relaxed);
        self.open.lock().expect("not poisoned").push(store.clone());
        store.storage()
    }

    async fn close(&self, storage: Storage) {
        drop(storage);
        let stores = std::mem::take(&mut *self.open.lock().expect("not poisoned"));
        for store in stores {
            store.close().await;
        }
    }

    fn durable(&self) -> bool {
        true
    }
}

impl Drop for MongoFactory {
    fn drop(&mut self) {
        if self.opened.load(Ordering::Relaxed) {
            support::drop_database(&self.uri, &self.database);
        }
    }
}

broker_core::conformance_tests!(MongoFactory::new());
