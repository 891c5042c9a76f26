//! The storage conformance suite, run against [`MemoryStore`].

use std::sync::Arc;

use async_trait::async_trait;
use broker_core::storage::Storage;
use broker_core::testkit::StoreFactory;
use storage_memory::MemoryStore;

/// One fresh store per factory; `open` hands out that same store each time,
/// so a reopen sees the data within the process. Not durable: nothing
/// survives the process, so `reopen_after_close` is skipped.
struct MemoryFactory {
    store: Arc<MemoryStore>,
}

impl MemoryFactory {
    fn new() -> Self {
        MemoryFactory {
            store: Arc::new(MemoryStore::new()),
        }
    }
}

#[async_trait]
impl StoreFactory for MemoryFactory {
    async fn open(&self) -> Storage {
        self.store.storage()
    }

    fn durable(&self) -> bool {
        false
    }
}

broker_core::conformance_tests!(MemoryFactory::new());

/// The reopen case against the reference store: within one process a
/// `MemoryStore` keeps its data while the `Arc` lives, so a factory that
/// reopens the same `Arc` may claim durability. This keeps the case itself
/// checked, since the suite proper skips it for the memory store.
struct InProcessReopen(MemoryFactory);

#[async_trait]
impl StoreFactory for InProcessReopen {
    async fn open(&self) -> Storage {
        self.0.open().await
    }

    fn durable(&self) -> bool {
        true
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reopen_after_close_in_process() {
    broker_core::testkit::reopen_after_close(&InProcessReopen(MemoryFactory::new())).await;
}
