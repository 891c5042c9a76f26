//! Persistent QoS 1 traffic to offline subscribers on SQLite, through the
//! broker core (routing, group commit, the store), without the network.
//!
//! - `fan_in_qos1_offline`: 16 publishers, each keeping 32 publishes in
//!   flight as a client does within its receive maximum, to one offline
//!   persistent subscriber. Group commit (batches of up to 1024 requests)
//!   against one transaction per message (`max_commit_batch = 1`), with
//!   `synchronous` normal (survives kill -9) and full (survives power loss).
//! - Bytes stored per message fanned out to 100 offline sessions, printed
//!   before the timings: the body is stored once, plus one small row per
//!   session.
//!
//! Run: `cargo bench -p storage-sqlite --bench persistence`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_core::client::ClientOptions;
use broker_core::config::BrokerConfig;
use broker_core::message::{Message, QoS};
use broker_core::Broker;
use bytes::Bytes;
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use storage_sqlite::{SqliteOptions, SqliteStore, Synchronous};

const PUBLISHERS: usize = 16;
const IN_FLIGHT: usize = 32;
const PAYLOAD: usize = 64;

/// A broker on a fresh SQLite file, with `subscribers` offline persistent
/// sessions subscribed to `sensors/#` at QoS 1.
async fn broker(
    dir: &tempfile::TempDir,
    synchronous: Synchronous,
    max_commit_batch: usize,
    subscribers: usize,
) -> (Broker, Arc<SqliteStore>) {
    let options = SqliteOptions {
        synchronous,
        ..SqliteOptions::default()
    };
    let store = Arc::new(SqliteStore::open(dir.path().join("bench.db"), options).expect("open"));
    let config = BrokerConfig {
        max_commit_batch,
        max_queued_messages: 100_000_000,
        ..BrokerConfig::default()
    };
    let broker = Broker::start(config, store.storage())
        .await
        .expect("broker starts");
    for i in 0..subscribers {
        let mut c = broker
            .connect(ClientOptions::persistent(format!("offline-{i}")))
            .await
            .expect("connect");
        c.subscribe("sensors/#", QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        c.disconnect().await;
    }
    (broker, store)
}

/// Publish `total` QoS 1 messages from [`PUBLISHERS`] publishers, each with
/// up to [`IN_FLIGHT`] awaiting their commit; returns when all committed.
async fn publish(broker: &Broker, total: usize, payload: &Bytes) {
    let per = total.div_ceil(PUBLISHERS);
    let publishers = (0..PUBLISHERS).map(|p| {
        let broker = broker.clone();
        let payload = payload.clone();
        async move {
            let mut in_flight = FuturesOrdered::new();
            for _ in 0..per {
                let m = Message::new(
                    format!("sensors/{p}"),
                    payload.clone(),
                    QoS::AtLeastOnce,
                    false,
                );
                let b = broker.clone();
                in_flight.push_back(async move { b.publish(m).await });
                if in_flight.len() >= IN_FLIGHT {
                    if let Some(r) = in_flight.next().await {
                        r.expect("commit");
                    }
                }
            }
            while let Some(r) = in_flight.next().await {
                r.expect("commit");
            }
        }
    });
    futures::future::join_all(publishers).await;
}

fn fan_in(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let payload = Bytes::from(vec![b'x'; PAYLOAD]);
    let mut group = c.benchmark_group("fan_in_qos1_offline");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(8));
    let per_sample = PUBLISHERS * 64;
    group.throughput(Throughput::Elements(per_sample as u64));
    for (sync_name, synchronous) in [("normal", Synchronous::Normal), ("full", Synchronous::Full)] {
        for (commit_name, batch) in [("group_commit", 1024), ("one_transaction_per_message", 1)] {
            let id = BenchmarkId::new(commit_name, format!("synchronous={sync_name}"));
            group.bench_function(id, |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let payload = payload.clone();
                    async move {
                        let dir = tempfile::tempdir().expect("tempdir");
                        let (broker, _store) = broker(&dir, synchronous, batch, 1).await;
                        let start = Instant::now();
                        publish(&broker, per_sample * iters as usize, &payload).await;
                        let elapsed = start.elapsed();
                        broker.shutdown().await;
                        elapsed
                    }
                })
            });
        }
    }
    group.finish();
}

/// Bytes the store grows by per message fanned out to 100 offline sessions.
fn bytes_per_message() {
    const MESSAGES: usize = 2_000;
    const SESSIONS: usize = 100;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        for size in [64usize, 1024] {
            let dir = tempfile::tempdir().expect("tempdir");
            let (broker, store) = broker(&dir, Synchronous::Normal, 1024, SESSIONS).await;
            let before = store.used_bytes().await.expect("size");
            publish(&broker, MESSAGES, &Bytes::from(vec![b'x'; size])).await;
            let after = store.used_bytes().await.expect("size");
            let per = (after - before) as f64 / MESSAGES as f64;
            println!(
                "bytes stored per {size} B message fanned out to {SESSIONS} offline sessions: \
                 {per:.0} ({:.1} per session entry; a copy per session would be at least {})",
                (per - size as f64) / SESSIONS as f64,
                size * SESSIONS
            );
            broker.shutdown().await;
        }
    });
}

criterion_group!(benches, fan_in);

fn main() {
    bytes_per_message();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
