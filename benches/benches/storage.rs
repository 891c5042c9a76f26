//! The storage backends side by side on the same workloads, straight on the
//! storage traits (no broker, no network between broker and client; the
//! server backends talk to their server over loopback).
//!
//! Each criterion group is one workload with its parameters; its benchmark
//! ids are the backends, so `memory`, `sqlite`, `redis` and `mongo` sit
//! next to each other in the report. Every backend starts each workload on
//! a fresh, empty store (see `benches::backends`). Only the store calls
//! are timed; building batches, checking results and setting up backlogs
//! are not (`iter_custom`).
//!
//! # Workloads
//! - `enqueue/{payload}/fan_out={n}/batch={b}`: [`PacketStore::write`] of
//!   `b` `Enqueue` operations (QoS 1 messages of 64 B or 4 KiB), each
//!   queued for `n` sessions, one `write` per iteration: what the group
//!   commit hands the store when `b` publishes arrived together.
//!   Throughput in messages (published messages; queue entries are
//!   messages x fan-out). The grid is not the full cross product, which
//!   would take hours on the MongoDB test server: batch sizes 1, 16 and 256
//!   at fan-out 1, and fan-out 10, 100 and 1,000 at batch size
//!   [`FAN_OUT_BATCH`], both payloads for each. A batch at fan-out 1,000 is
//!   then at most [`FAN_OUT_BATCH`] x 1,000 entries, which bounds one
//!   iteration on the slowest server. The queues are emptied after each
//!   sample (untimed), so stores do not grow from sample to sample.
//! - `drain/page={p}`: a session's backlog of 100,000 messages is read and
//!   acknowledged from the front, one page per iteration: `read_queue`
//!   after the last seq read, limit `p`, then one `write` removing the
//!   page (`PacketOp::Remove`), as a reconnecting subscriber's queue is
//!   delivered. Throughput in messages. The backlog is built once per
//!   backend (untimed) and refilled with the next 100,000 seqs (untimed)
//!   when a drain reaches its end, so pages come from queues between
//!   100,000 and 0 entries long. Every page is checked: exactly the next
//!   seqs in ascending order, each with its own body; the benchmark panics
//!   at the first entry out of place, and at the end of each backlog that
//!   all of it was read and the queue is empty.
//! - `ordering/writers={w}/batch={b}`: one session, `w` concurrent writer
//!   tasks and one reader, the way the broker's group commit and a
//!   session's drain meet in the store. Each writer takes the session's
//!   next `b` seqs under a lock that it holds until its `write` has
//!   returned, so seq order is commit order, as the broker's single commit
//!   queue guarantees. Concurrently the reader reads the queue after the
//!   last seq it read and removes each page. Because seq order is commit
//!   order, whenever the reader sees seq `s` every seq below `s` was
//!   committed before it, so the reader must see every seq exactly once and
//!   exactly in order, 1, 2, 3, ..., whatever the interleaving of the
//!   writes and its own reads and removals. A violation is an entry read
//!   that is not the one after the previous (out of order, repeated, or
//!   after a gap, i.e. a committed entry that was not visible when a later
//!   one was), an entry whose body is not its own, a committed message
//!   never read, or an entry left in the queue at the end. One iteration is
//!   one message, from the first write to the reader having removed the
//!   last. After the group a line `ordering/{backend}: N messages, V
//!   violations, X msgs/s` per backend gives the totals over all runs
//!   (warm-up included); the benchmark panics if any V is not 0.
//! - `retained/{filter}`: [`RetainedStore::lookup_retained`] among 100,000
//!   retained topics `site/{0..99}/dev/{0..999}/temp` (stored once per
//!   backend, untimed): an exact topic (a different one each time), `+` in
//!   the middle (`site/42/dev/+/temp`, 1,000 matches) and `#`
//!   (`site/42/#`, 1,000 matches). Throughput in lookups; every answer's
//!   size is checked.
//!
//! # Running
//! ```sh
//! cargo bench -p benches --bench storage                        # all four backends
//! BENCH_BACKENDS=memory,sqlite cargo bench -p benches --bench storage
//! cargo bench -p benches --bench storage -- drain               # one workload
//! BENCH_BACKENDS=memory cargo bench -p benches --bench storage -- --quick
//! ```
//! `BENCH_BACKENDS` (comma-separated) chooses the backends, all four by
//! default; `BENCH_SQLITE_SYNCHRONOUS=full` measures SQLite with an fsync
//! per commit (default `normal`, durable through `kill -9`).
//!
//! `redis` and `mongo` need servers, and the run stops at its start, saying
//! how to start them, when a chosen one cannot be reached (it never skips a
//! backend):
//! - Redis at `REDIS_URL` (default `redis://127.0.0.1:6379/`):
//!   `redis-server --port 6379 --bind 127.0.0.1 --appendonly yes --daemonize yes`.
//!   Each store uses a key prefix of its own, deleted afterwards.
//! - MongoDB at `MONGODB_URI` (default
//!   `mongodb://127.0.0.1:27017/?directConnection=true`), a replica set
//!   member (transactions). The MongoDB-compatible test server, compiled
//!   (see `shared/MONGODB.md` for installing it):
//!   `~/.cache/secantus/bin/secantusd-rs --host 127.0.0.1 --port 27017
//!   --storage-path "$(mktemp -d)" --cache-size 256M --log-file-max 16MB &`,
//!   or the slower Python build `.venv-mongo/bin/secantusd-py --host
//!   127.0.0.1 --port 27017 --storage-path "$(mktemp -d)" &`. Each store uses
//!   a database of its own, dropped afterwards.
//!
//! Samples are few and short (10 samples, about 3 s of measurement each,
//! flat sampling) so that all four backends finish in minutes; the figures
//! are for comparing backends and spotting regressions, not for tight
//! confidence intervals.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use benches::backends::{self, Backend, BenchStore};
use broker_core::message::{Message, MessageId, QoS, Seq};
use broker_core::storage::{
    ClientId, Delivery, PacketOp, PacketStore, QueueTarget, QueuedPacket, RetainedStore,
};
use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use futures::StreamExt;
use tokio::runtime::Runtime;
use tokio::sync::{Mutex, Notify, OnceCell};

/// Payload sizes of the enqueue workload.
const PAYLOADS: [(&str, usize); 2] = [("64B", 64), ("4KiB", 4096)];
/// Enqueues per `write`, at fan-out 1.
const BATCHES: [usize; 3] = [1, 16, 256];
/// Sessions each message is queued for, at [`FAN_OUT_BATCH`].
const FAN_OUTS: [usize; 3] = [10, 100, 1000];
/// Enqueues per `write` in the fan-out cases.
const FAN_OUT_BATCH: usize = 16;

/// Messages in a drain backlog.
const BACKLOG: u64 = 100_000;
/// Enqueues per `write` while building a backlog (untimed).
const FILL_BATCH: u64 = 1000;
/// `read_queue` limits of the drain workload.
const PAGES: [usize; 2] = [100, 1000];
/// Payload of the drain and ordering workloads; its first 8 bytes are the
/// entry's seq, so that a reader can tell an entry has its own body.
const SMALL_PAYLOAD: usize = 64;

/// Concurrent writers of the ordering workload.
const WRITERS: usize = 4;
/// Seqs each writer takes and writes at a time.
const WRITER_BATCH: u64 = 8;
/// `read_queue` limit of the ordering workload's reader.
const READER_PAGE: usize = 256;

/// Retained topics: `site/{0..SITES}/dev/{0..DEVICES}/temp`.
const SITES: usize = 100;
const DEVICES: usize = 1000;
/// `set_retained` calls in flight while storing them (untimed).
const RETAINED_IN_FLIGHT: usize = 32;

/// A store of one backend and the message ids handed out on it.
struct Bench {
    store: BenchStore,
    next_id: AtomicU64,
}

impl Bench {
    /// A fresh store of `backend`, or a panic saying how to get one.
    async fn open(backend: Backend) -> Bench {
        match BenchStore::open(backend).await {
            Ok(store) => Bench {
                store,
                next_id: AtomicU64::new(1),
            },
            Err(e) => panic!("{e}"),
        }
    }

    fn packets(&self) -> &Arc<dyn PacketStore> {
        self.store.packets()
    }

    fn retained(&self) -> &Arc<dyn RetainedStore> {
        self.store.retained()
    }

    /// `n` consecutive unused message ids; the first is returned.
    fn ids(&self, n: u64) -> MessageId {
        self.next_id.fetch_add(n, Ordering::Relaxed)
    }
}

/// One lazily opened store per backend: a store is opened (and a backlog
/// built, ...) only for a backend whose benchmarks were not filtered out.
type PerBackend<T> = Vec<(Backend, OnceCell<T>)>;

fn per_backend<T>(backends: &[Backend]) -> PerBackend<T> {
    backends.iter().map(|&b| (b, OnceCell::new())).collect()
}

/// A QoS 1 message with id `id`.
fn message(id: MessageId, topic: &str, payload: Bytes) -> Arc<Message> {
    let mut m = Message::new(topic, payload, QoS::AtLeastOnce, false);
    m.id = id;
    Arc::new(m)
}

/// A [`SMALL_PAYLOAD`]-byte payload starting with `seq`.
fn seq_payload(seq: Seq) -> Bytes {
    let mut p = vec![b'x'; SMALL_PAYLOAD];
    p[..8].copy_from_slice(&seq.to_be_bytes());
    Bytes::from(p)
}

/// The seq a [`seq_payload`] carries.
fn payload_seq(entry: &QueuedPacket) -> Option<Seq> {
    let head = entry.message.payload.get(..8)?;
    Some(Seq::from_be_bytes(head.try_into().ok()?))
}

/// Enqueue `seq` for `client` with a [`seq_payload`] body.
fn enqueue_one(client: &ClientId, seq: Seq, id: MessageId) -> PacketOp {
    PacketOp::Enqueue {
        message: message(id, "bench/queue", seq_payload(seq)),
        targets: vec![QueueTarget {
            client: client.clone(),
            seq,
            delivery: Delivery::new(QoS::AtLeastOnce),
        }],
    }
}

/// Queue entries removed per `write` when emptying queues between samples.
/// Bounded because one MongoDB transaction must fit in the server's cache:
/// a single `Purge` of a queue of thousands of 4 KiB messages does not.
const CLEANUP_CHUNK: u64 = 1024;

/// Empty the queues of `clients`, which hold seqs `1..=last_seq` (untimed
/// cleanup between samples, so that stores do not grow from sample to
/// sample), at most about [`CLEANUP_CHUNK`] entries per `write`: short
/// queues are purged several sessions at a time, long ones removed in
/// slices of seqs.
async fn empty_queues(bench: &Bench, clients: &[ClientId], last_seq: Seq) {
    if last_seq == 0 {
        return;
    }
    if last_seq <= CLEANUP_CHUNK {
        let per_write = (CLEANUP_CHUNK / last_seq) as usize;
        for chunk in clients.chunks(per_write) {
            let ops = chunk
                .iter()
                .map(|client| PacketOp::Purge {
                    client: client.clone(),
                })
                .collect();
            bench.packets().write(ops).await.expect("empty the queues");
        }
        return;
    }
    for client in clients {
        let mut first = 1;
        while first <= last_seq {
            let end = last_seq.min(first + CLEANUP_CHUNK - 1);
            let ops = (first..=end)
                .map(|seq| PacketOp::Remove {
                    client: client.clone(),
                    seq,
                })
                .collect();
            bench.packets().write(ops).await.expect("empty the queues");
            first = end + 1;
        }
    }
}

fn enqueue(c: &mut Criterion, rt: &Runtime, backends: &[Backend]) {
    let benches: PerBackend<Bench> = per_backend(backends);
    let mut cases = Vec::new();
    for (payload_name, payload_size) in PAYLOADS {
        for batch in BATCHES {
            cases.push((payload_name, payload_size, 1, batch));
        }
        for fan_out in FAN_OUTS {
            cases.push((payload_name, payload_size, fan_out, FAN_OUT_BATCH));
        }
    }
    for (payload_name, payload_size, fan_out, batch) in cases {
        let mut group = c.benchmark_group(format!(
            "enqueue/{payload_name}/fan_out={fan_out}/batch={batch}"
        ));
        group
            .sampling_mode(SamplingMode::Flat)
            .throughput(Throughput::Elements(batch as u64));
        let payload = Bytes::from(vec![b'p'; payload_size]);
        let clients: Vec<ClientId> = (0..fan_out)
            .map(|i| ClientId::from(format!("enqueue-{i}")))
            .collect();
        for (backend, cell) in &benches {
            group.bench_function(BenchmarkId::from_parameter(backend), |b| {
                let bench = rt.block_on(cell.get_or_init(|| Bench::open(*backend)));
                let (payload, clients) = (&payload, &clients);
                b.to_async(rt).iter_custom(|iters| async move {
                    let mut elapsed = Duration::ZERO;
                    let mut seq = 0;
                    for _ in 0..iters {
                        let first_id = bench.ids(batch as u64);
                        let ops = (0..batch as u64)
                            .map(|i| {
                                seq += 1;
                                PacketOp::Enqueue {
                                    message: message(
                                        first_id + i,
                                        "bench/enqueue",
                                        payload.clone(),
                                    ),
                                    targets: clients
                                        .iter()
                                        .map(|client| QueueTarget {
                                            client: client.clone(),
                                            seq,
                                            delivery: Delivery::new(QoS::AtLeastOnce),
                                        })
                                        .collect(),
                                }
                            })
                            .collect();
                        let start = Instant::now();
                        bench.packets().write(ops).await.expect("enqueue");
                        elapsed += start.elapsed();
                    }
                    empty_queues(bench, clients, seq).await;
                    elapsed
                })
            });
        }
        group.finish();
    }
}

/// A backlog being drained.
struct Drain {
    bench: Bench,
    client: ClientId,
    /// Seqs up to here have been read and removed.
    read: Mutex<Seq>,
    /// Seqs up to here have been enqueued.
    filled: Mutex<Seq>,
}

impl Drain {
    /// A fresh store of `backend` with a backlog of [`BACKLOG`] messages.
    async fn open(backend: Backend) -> Drain {
        let drain = Drain {
            bench: Bench::open(backend).await,
            client: "drain".into(),
            read: Mutex::new(0),
            filled: Mutex::new(0),
        };
        drain.refill().await;
        drain
    }

    /// Enqueue the next [`BACKLOG`] seqs.
    async fn refill(&self) {
        let mut filled = self.filled.lock().await;
        let end = *filled + BACKLOG;
        let mut seq = *filled + 1;
        while seq <= end {
            let n = FILL_BATCH.min(end - seq + 1);
            let first_id = self.bench.ids(n);
            let ops = (0..n)
                .map(|i| enqueue_one(&self.client, seq + i, first_id + i))
                .collect();
            self.bench
                .packets()
                .write(ops)
                .await
                .expect("build the backlog");
            seq += n;
        }
        *filled = end;
    }

    /// Read and remove `pages` pages of `limit` entries; returns the time
    /// the reads and removals took. Panics on any entry out of place.
    async fn pages(&self, pages: u64, limit: usize) -> Duration {
        let backend = self.bench.store.backend();
        let packets = self.bench.packets();
        let mut read = self.read.lock().await;
        let mut elapsed = Duration::ZERO;
        for _ in 0..pages {
            let start = Instant::now();
            let page = packets
                .read_queue(&self.client, Some(*read).filter(|&s| s > 0), limit)
                .await
                .expect("read a page");
            let removals = page
                .iter()
                .map(|e| PacketOp::Remove {
                    client: self.client.clone(),
                    seq: e.seq,
                })
                .collect();
            packets.write(removals).await.expect("remove a page");
            elapsed += start.elapsed();

            let filled = *self.filled.lock().await;
            let expected = limit.min((filled - *read) as usize);
            assert_eq!(
                page.len(),
                expected,
                "drain/{backend}: a page after seq {} has {} entries, {expected} expected",
                *read,
                page.len()
            );
            for entry in &page {
                assert_eq!(
                    entry.seq,
                    *read + 1,
                    "drain/{backend}: seq {} read after {}: the queue is out of order or lost \
                     entries",
                    entry.seq,
                    *read
                );
                assert_eq!(
                    payload_seq(entry),
                    Some(entry.seq),
                    "drain/{backend}: the entry at seq {} has another entry's body",
                    entry.seq
                );
                *read = entry.seq;
            }
            if *read == filled {
                // The backlog is drained: nothing may be left, then the
                // next one is built (untimed).
                let rest = packets
                    .read_queue(&self.client, None, 1)
                    .await
                    .expect("read the drained queue");
                assert!(
                    rest.is_empty(),
                    "drain/{backend}: seq {} left in the queue after all {filled} were removed",
                    rest[0].seq
                );
                self.refill().await;
            }
        }
        elapsed
    }
}

fn drain(c: &mut Criterion, rt: &Runtime, backends: &[Backend]) {
    let drains: PerBackend<Drain> = per_backend(backends);
    for limit in PAGES {
        let mut group = c.benchmark_group(format!("drain/page={limit}"));
        group
            .sampling_mode(SamplingMode::Flat)
            .throughput(Throughput::Elements(limit as u64));
        for (backend, cell) in &drains {
            group.bench_function(BenchmarkId::from_parameter(backend), |b| {
                let drain = rt.block_on(cell.get_or_init(|| Drain::open(*backend)));
                b.to_async(rt)
                    .iter_custom(|iters| drain.pages(iters, limit));
            });
        }
        group.finish();
    }
}

/// Totals of the ordering workload for one backend.
#[derive(Default)]
struct Tally {
    messages: AtomicU64,
    violations: AtomicU64,
    nanos: AtomicU64,
}

/// One ordering run of `messages` messages on a fresh session; returns the
/// time it took and the number of violations.
async fn ordering_run(bench: &Bench, client: ClientId, messages: u64) -> (Duration, u64) {
    let packets = bench.packets().clone();
    // The next seq to assign, locked until its batch is committed.
    let next: Arc<Mutex<Seq>> = Arc::new(Mutex::new(1));
    let committed = Arc::new(Notify::new());
    let writers_done = AtomicBool::new(false);
    let first_id = bench.ids(messages);
    let start = Instant::now();

    let writers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let (packets, next, committed, client) = (
                packets.clone(),
                next.clone(),
                committed.clone(),
                client.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let mut next = next.lock().await;
                    let first = *next;
                    if first > messages {
                        return;
                    }
                    let n = WRITER_BATCH.min(messages - first + 1);
                    let ops = (first..first + n)
                        .map(|seq| enqueue_one(&client, seq, first_id + seq - 1))
                        .collect();
                    packets.write(ops).await.expect("enqueue");
                    *next = first + n;
                    drop(next);
                    committed.notify_one();
                }
            })
        })
        .collect();
    let writing = async {
        for writer in writers {
            writer.await.expect("a writer failed");
        }
        writers_done.store(true, Ordering::SeqCst);
        committed.notify_one();
    };

    let reading = async {
        let (mut last, mut read, mut violations): (Seq, u64, u64) = (0, 0, 0);
        loop {
            // Read the flag before the queue: once the writers are done, an
            // empty page means everything committed has been read.
            let done = writers_done.load(Ordering::SeqCst);
            let page = packets
                .read_queue(&client, Some(last).filter(|&s| s > 0), READER_PAGE)
                .await
                .expect("read the queue");
            if page.is_empty() {
                if done {
                    break;
                }
                committed.notified().await;
                continue;
            }
            for entry in &page {
                if entry.seq != last + 1 || payload_seq(entry) != Some(entry.seq) {
                    violations += 1;
                }
                last = last.max(entry.seq);
                read += 1;
            }
            let removals = page
                .iter()
                .map(|e| PacketOp::Remove {
                    client: client.clone(),
                    seq: e.seq,
                })
                .collect();
            packets.write(removals).await.expect("remove");
        }
        (read, violations)
    };

    let ((), (read, mut violations)) = tokio::join!(writing, reading);
    let elapsed = start.elapsed();
    violations += messages.saturating_sub(read);
    let left = packets
        .read_queue(&client, None, READER_PAGE)
        .await
        .expect("read the queue at the end");
    violations += left.len() as u64;
    (elapsed, violations)
}

fn ordering(c: &mut Criterion, rt: &Runtime, backends: &[Backend]) {
    let benches: PerBackend<Bench> = per_backend(backends);
    let tallies: Vec<Tally> = backends.iter().map(|_| Tally::default()).collect();
    let runs = AtomicU64::new(0);
    let mut group = c.benchmark_group(format!("ordering/writers={WRITERS}/batch={WRITER_BATCH}"));
    group
        .sampling_mode(SamplingMode::Flat)
        .throughput(Throughput::Elements(1));
    for ((backend, cell), tally) in benches.iter().zip(&tallies) {
        group.bench_function(BenchmarkId::from_parameter(backend), |b| {
            let bench = rt.block_on(cell.get_or_init(|| Bench::open(*backend)));
            let runs = &runs;
            b.to_async(rt).iter_custom(|iters| async move {
                let client =
                    ClientId::from(format!("ordering-{}", runs.fetch_add(1, Ordering::Relaxed)));
                let (elapsed, violations) = ordering_run(bench, client, iters).await;
                tally.messages.fetch_add(iters, Ordering::Relaxed);
                tally.violations.fetch_add(violations, Ordering::Relaxed);
                tally
                    .nanos
                    .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
                elapsed
            })
        });
    }
    group.finish();

    let mut failed = Vec::new();
    for (backend, tally) in backends.iter().zip(&tallies) {
        let messages = tally.messages.load(Ordering::Relaxed);
        if messages == 0 {
            continue; // filtered out
        }
        let violations = tally.violations.load(Ordering::Relaxed);
        let secs = tally.nanos.load(Ordering::Relaxed) as f64 / 1e9;
        println!(
            "ordering/{backend}: {messages} messages, {violations} violations, {:.0} msgs/s",
            messages as f64 / secs.max(1e-9)
        );
        if violations > 0 {
            failed.push(format!("{backend}: {violations}"));
        }
    }
    assert!(
        failed.is_empty(),
        "ordering violations (must be 0): {}",
        failed.join(", ")
    );
}

/// `site/{s}/dev/{d}/temp`.
fn retained_topic(site: usize, device: usize) -> String {
    format!("site/{site}/dev/{device}/temp")
}

/// A fresh store of `backend` holding the retained topics.
async fn retained_store(backend: Backend) -> Bench {
    let bench = Bench::open(backend).await;
    let first_id = bench.ids((SITES * DEVICES) as u64);
    let payload = Bytes::from_static(b"21.5");
    futures::stream::iter(0..SITES * DEVICES)
        .for_each_concurrent(RETAINED_IN_FLIGHT, |n| {
            let mut m = Message::new(
                retained_topic(n / DEVICES, n % DEVICES),
                payload.clone(),
                QoS::AtLeastOnce,
                true,
            );
            m.id = first_id + n as u64;
            let retained = bench.retained().clone();
            async move {
                retained
                    .set_retained(Arc::new(m))
                    .await
                    .expect("store a retained message");
            }
        })
        .await;
    bench
}

fn retained(c: &mut Criterion, rt: &Runtime, backends: &[Backend]) {
    let benches: PerBackend<Bench> = per_backend(backends);
    // (group name, filter for the n-th lookup, matches expected)
    type Filter = fn(usize) -> String;
    let cases: [(&str, Filter, usize); 3] = [
        (
            "retained/exact",
            // Spread over the sites and devices: no two lookups in a row alike.
            |n| retained_topic(n % SITES, (n * 7919) % DEVICES),
            1,
        ),
        (
            "retained/site/42/dev/+/temp",
            |_| "site/42/dev/+/temp".into(),
            DEVICES,
        ),
        ("retained/site/42/#", |_| "site/42/#".into(), DEVICES),
    ];
    for (name, filter, expected) in cases {
        let mut group = c.benchmark_group(name);
        group
            .sampling_mode(SamplingMode::Flat)
            .throughput(Throughput::Elements(1));
        for (backend, cell) in &benches {
            group.bench_function(BenchmarkId::from_parameter(backend), |b| {
                let bench = rt.block_on(cell.get_or_init(|| retained_store(*backend)));
                b.to_async(rt).iter_custom(|iters| async move {
                    let mut elapsed = Duration::ZERO;
                    for n in 0..iters as usize {
                        let filter = filter(n);
                        let start = Instant::now();
                        let found = bench
                            .retained()
                            .lookup_retained(&filter)
                            .await
                            .expect("retained lookup");
                        elapsed += start.elapsed();
                        assert_eq!(
                            found.len(),
                            expected,
                            "retained/{backend}: `{filter}` matched {} topics, {expected} expected",
                            found.len()
                        );
                    }
                    elapsed
                })
            });
        }
        group.finish();
    }
}

fn main() {
    let backends = backends::selected().unwrap_or_else(|e| panic!("{e}"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    // Fail now, not after minutes of measurements, when a server is missing.
    if let Err(e) = rt.block_on(backends::check_reachable(&backends)) {
        panic!("{e}");
    }
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    enqueue(&mut c, &rt, &backends);
    drain(&mut c, &rt, &backends);
    ordering(&mut c, &rt, &backends);
    retained(&mut c, &rt, &backends);
    c.final_summary();
}
