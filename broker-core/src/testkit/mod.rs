//! Storage conformance suite: the behaviour every storage adapter must show.
//!
//! Modelled on aedes-persistence's `abstract.js`, with the cases that Mosca
//! and Aedes got wrong (see `LESSONS.md`): queues read strictly in [`Seq`]
//! order whatever order concurrent writers land in, no reordering when an
//! entry changes state, acks that touch one entry only, paged replay with no
//! cap, message bodies shared between sessions, and batches applied
//! atomically and in order.
//!
//! # Running it in an adapter crate
//! Enable the `testkit` feature of `broker-core` in the adapter's
//! `[dev-dependencies]`, implement [`StoreFactory`] (with `async-trait`), and
//! invoke [`conformance_tests!`](crate::conformance_tests) in a test file:
//!
//! ```
//! use std::sync::Arc;
//!
//! use async_trait::async_trait;
//! use broker_core::storage::Storage;
//! use broker_core::testkit::StoreFactory;
//! # use storage_memory::MemoryStore as MyStore;
//!
//! struct MyFactory(Arc<MyStore>);
//!
//! impl MyFactory {
//!     // A new, empty store each time this is called.
//!     fn new() -> Self {
//!         MyFactory(Arc::new(MyStore::new()))
//!     }
//! }
//!
//! #[async_trait]
//! impl StoreFactory for MyFactory {
//!     async fn open(&self) -> Storage {
//!         Storage::from_backend(self.0.clone())
//!     }
//!     fn durable(&self) -> bool {
//!         false
//!     }
//! }
//!
//! broker_core::conformance_tests!(MyFactory::new());
//! # fn main() {}
//! ```
//!
//! The macro expands into a module `storage_conformance` holding one
//! `#[tokio::test(flavor = "multi_thread")]` per case (the adapter needs no
//! tokio dependency of its own for it). Each generated test evaluates the
//! factory expression anew, and tests run in parallel, so **every evaluation
//! must give a fresh, empty store** (a new temporary file or database, a new
//! key prefix, ...), while [`StoreFactory::open`] on one factory must keep
//! opening the same data. To invoke it twice in one file, name the module:
//! `conformance_tests!(mod other_config, MyFactory::with_option());`.
//!
//! The cases are also public `async fn`s taking `&F: StoreFactory`, for
//! adapters that need their own runtime or setup around them.
//!
//! [`Seq`]: crate::message::Seq

#![warn(missing_docs)]

mod queue;
mod retained;
mod sessions;
mod store;
mod support;
mod wills;

use async_trait::async_trait;

use crate::storage::Storage;

pub use queue::{
    batch_atomic_visibility, batch_order, body_handed_over, fan_out_enqueue, incoming_qos2,
    last_message_id_monotonic, message_properties_round_trip, paging, purge_only_that_session,
    queue_bounds, queue_isolation, queue_order_concurrent, remove_in_middle,
    remove_unknown_is_noop, seq_numeric_order, set_state_released,
};
pub use retained::{
    retained_properties_round_trip, retained_set_replace_delete, retained_wildcards,
};
pub use sessions::{session_lifecycle, subscriptions_round_trip};
pub use store::{empty_store, reopen_after_close};
pub use wills::wills_round_trip;

/// Opens the store under test.
///
/// One factory value stands for one set of data: every [`open`](Self::open)
/// opens that same data again, so that a store closed with
/// [`close`](Self::close) and opened again shows what was written before
/// (for a durable store). Different factory values must not share data.
#[async_trait]
pub trait StoreFactory: Send + Sync {
    /// Open (or reopen) the store. Panics if it cannot: this is test code.
    async fn open(&self) -> Storage;

    /// True when the store keeps its data across [`close`](Self::close) and
    /// [`open`](Self::open), i.e. it would survive a broker restart.
    /// [`reopen_after_close`] checks that only for durable stores.
    fn durable(&self) -> bool;

    /// Close a store opened by [`open`](Self::open), as the broker does on
    /// shutdown. The default drops it; override to flush or release file
    /// locks before the next `open`.
    async fn close(&self, storage: Storage) {
        drop(storage);
    }
}

/// Expands into one `#[tokio::test(flavor = "multi_thread")]` per conformance
/// case, each calling the case with a freshly evaluated factory.
///
/// `conformance_tests!(factory_expr)` puts the tests in a module named
/// `storage_conformance`; `conformance_tests!(mod name, factory_expr)` names
/// it. Items of the invoking module are visible to the factory expression.
/// Each evaluation of the expression must give a fresh, empty store.
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr $(,)?) => {
        $crate::conformance_tests!(mod storage_conformance, $factory);
    };
    (mod $module:ident, $factory:expr $(,)?) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            // The adapter need not depend on tokio for `#[tokio::test]`.
            use $crate::testkit::__private::tokio;

            $crate::conformance_tests!(@cases $factory;
                empty_store,
                queue_order_concurrent,
                seq_numeric_order,
                queue_isolation,
                fan_out_enqueue,
                remove_in_middle,
                remove_unknown_is_noop,
                paging,
                queue_bounds,
                set_state_released,
                purge_only_that_session,
                incoming_qos2,
                last_message_id_monotonic,
                batch_order,
                batch_atomic_visibility,
                message_properties_round_trip,
                body_handed_over,
                retained_set_replace_delete,
                retained_wildcards,
                retained_properties_round_trip,
                subscriptions_round_trip,
                session_lifecycle,
                reopen_after_close,
                wills_round_trip,
            );
        }
    };
    (@cases $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread")]
            async fn $case() {
                let factory = $factory;
                $crate::testkit::bounded(stringify!($case), $crate::testkit::$case(&factory)).await;
            }
        )*
    };
}

/// How long one conformance case may take, however slow the store: a store
/// or server that stops answering fails its case instead of hanging the run.
pub const CASE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(180);

/// Run the conformance case `name`, failing it after [`CASE_TIMEOUT`].
pub async fn bounded(name: &str, case: impl std::future::Future<Output = ()>) {
    if tokio::time::timeout(CASE_TIMEOUT, case).await.is_err() {
        panic!(
            "conformance case {name} did not finish within {} s: the store (or its server) \
             stopped answering",
            CASE_TIMEOUT.as_secs()
        );
    }
}

/// Re-exports used by [`conformance_tests!`]; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use tokio;
}
