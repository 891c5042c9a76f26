//! What one `/metrics` scrape costs the broker: [`Broker::metrics`], whose
//! gauges (sessions online and offline, queued messages and bytes, in
//! flight, connections by listener) are read by walking every session, one
//! lock each (docs/decisions.md, "Metrics and the admin API").
//!
//! # Benchmarks
//! - `metrics/snapshot/{n}`: one `Broker::metrics()` call with `n` offline
//!   persistent sessions (10,000 and 100,000), each subscribed and holding
//!   one queued message, on the memory store.
//!
//! Run: `cargo bench -p benches --bench metrics`.

use std::hint::black_box;
use std::sync::Arc;

use broker_core::client::ClientOptions;
use broker_core::message::{Message, QoS};
use broker_core::storage::Storage;
use broker_core::Broker;
use criterion::{BenchmarkId, Criterion};
use storage_memory::MemoryStore;

async fn broker_with(sessions: usize) -> Broker {
    let storage = Storage::from_backend(Arc::new(MemoryStore::new()));
    let broker = Broker::builder()
        .storage(storage)
        .start()
        .await
        .expect("broker starts");
    for i in 0..sessions {
        let mut c = broker
            .connect(ClientOptions::persistent(format!("device-{i}")))
            .await
            .expect("connect");
        c.subscribe("devices/all", QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        drop(c);
    }
    broker
        .publish(Message::new("devices/all", "x", QoS::AtLeastOnce, false))
        .await
        .expect("publish");
    let m = broker.metrics();
    assert_eq!(m.sessions_offline, sessions as u64);
    assert_eq!(m.queued_messages, sessions as u64);
    broker
}

fn main() {
    let mut c = Criterion::default().sample_size(20).configure_from_args();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut group = c.benchmark_group("metrics/snapshot");
    for n in [10_000, 100_000] {
        let broker = runtime.block_on(broker_with(n));
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| black_box(broker.metrics()))
        });
        runtime.block_on(broker.shutdown());
    }
    group.finish();
    c.final_summary();
}
