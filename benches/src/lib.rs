//! Benchmarks of the broker.
//!
//! - `benches/storage.rs` and `benches/trie.rs` (criterion): the four storage
//!   backends side by side on the same workloads, and the core's
//!   subscription trie. Run with `cargo bench -p benches`.
//! - [`backends`]: the storage backends by name (`memory`, `sqlite`,
//!   `redis`, `mongo`), each opened fresh for a benchmark and cleaned up
//!   after it; chosen with `BENCH_BACKENDS`.
//! - `broker-bench` ([`load`]): an end-to-end load tool that speaks MQTT 3.1.1
//!   over TCP to any broker, so that this broker and its peers are measured
//!   by the same client in the same run.
//! - `bench-chart`: draws the charts of `BENCHMARKS.md` from the load tool's
//!   JSON results.
//!
//! Nothing here is part of the broker; the broker must not depend on it.

// The modules' documentation is their own (`//!`): an outer comment here
// would be joined to it, and rustdoc would then resolve its links here.
pub mod backends;
pub mod load;
