//! The storage conformance suite, run against [`RedisStore`] on a real
//! Redis: `REDIS_URL` (default `redis://127.0.0.1:6379/`). The tests fail,
//! never skip, when it cannot be reached.

mod common;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use broker_core::storage::Storage;
use broker_core::testkit::StoreFactory;
use common::{connect, redis_url, unique_prefix, Cleanup, HOW_TO_START};
use storage_redis::{RedisOptions, RedisStore};

/// A fresh key prefix per factory; `open` connects again to the same
/// prefix, so the reopen case reads back what an earlier handle wrote (and
/// `close` releases the lease, as the broker does, so that it can). The
/// prefix's keys are deleted when the factory goes.
struct RedisFactory {
    url: String,
    prefix: String,
    /// Stores opened and not closed yet.
    open: Mutex<Vec<Arc<RedisStore>>>,
    _cleanup: Cleanup,
}

impl RedisFactory {
    fn new() -> Self {
        let url = redis_url();
        // Fail here, with instructions, rather than in the middle of a case.
        drop(connect(&url));
        let prefix = unique_prefix("conformance");
        RedisFactory {
            _cleanup: Cleanup {
                url: url.clone(),
                prefix: prefix.clone(),
            },
            url,
            prefix,
            open: Mutex::new(Vec::new()),
        }
    }
}

#[async_trait]
impl StoreFactory for RedisFactory {
    async fn open(&self) -> Storage {
        let options = RedisOptions {
            prefix: self.prefix.clone(),
            ..RedisOptions::default()
        };
        match RedisStore::open(&self.url, options).await {
            Ok(store) => {
                let store = Arc::new(store);
                self.open.lock().expect("not poisoned").push(store.clone());
                store.storage()
            }
            Err(e) => panic!("{e}; {HOW_TO_START}"),
        }
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

broker_core::conformance_tests!(RedisFactory::new());
