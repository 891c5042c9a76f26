//! The storage conformance suite, run against `MongoStore` on the server
//! at `MONGODB_URI` (default `mongodb://127.0.0.1:27017/?directConnection=true`).
//!
//! Each factory uses a database of its own, dropped when the factory goes.
//! Without a reachable server every case fails, saying how to start one.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use broker_core::storage::Storage;
use broker_core::testkit::StoreFactory;
use storage_mongo::MongoOptions;

/// A fresh database per factory; `open` opens that same database again, so
/// the reopen case reads back what an earlier handle committed.
struct MongoFactory {
    uri: String,
    database: String,
    opened: AtomicBool,
}

impl MongoFactory {
    fn new() -> Self {
        MongoFactory {
            uri: support::mongodb_uri(),
            database: support::fresh_database("conformance"),
            opened: AtomicBool::new(false),
        }
    }
}

#[async_trait]
impl StoreFactory for MongoFactory {
    async fn open(&self) -> Storage {
        let options = MongoOptions {
            database: Some(self.database.clone()),
            ..MongoOptions::default()
        };
        let store = support::open_or_fail(&self.uri, options).await;
        self.opened.store(true, Ordering::Relaxed);
        Arc::new(store).storage()
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
