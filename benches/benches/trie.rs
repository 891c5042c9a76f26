//! Subscription matching in the core's trie
//! ([`broker_core::internals::trie::SubscriptionTree`]), keyed as the broker keys it
//! ([`SubscriberKey`]: the client id, no shared group), with the granted
//! [`SubscriptionOptions`] as value.
//!
//! The tree holds 1,000,000 subscriptions, mostly exact topics as a chat
//! or IoT deployment has them (one inbox per device), plus wildcards:
//!
//! | filters | count | subscribers each |
//! |---|---:|---:|
//! | `device/{n}/inbox` | 900,000 | 1 |
//! | `site/{k}/#` | 50,000 | 1 |
//! | `site/{k}/+/temp` | 49,000 | 1 |
//! | `device/+/status` | 1 filter, 1,000 subscribers | 1,000 |
//!
//! # Benchmarks
//! - `trie/match/{case}`: [`SubscriptionTree::matches`] per topic name,
//!   throughput in lookups, each case cycling through 4,096 different
//!   topics: `one` (`device/{n}/inbox`: 1 subscriber), `many`
//!   (`device/{n}/status`: the 1,000 subscribers of `device/+/status`),
//!   `wildcards` (`site/{k}/{d}/temp`: `site/{k}/#` and `site/{k}/+/temp`,
//!   2 subscribers), `none_deep` (`device/{n}/config`: the walk follows
//!   both the literal and the `+` branch and finds nothing) and
//!   `none_shallow` (`nothing/{n}/here`: no first level matches). The
//!   number of matches of every topic is checked once before timing.
//! - `trie/insert/1M`: building the whole tree from nothing, throughput
//!   in subscriptions inserted (one iteration is the whole build; the
//!   filters and keys are prepared beforehand and dropping the tree is not
//!   timed).
//!
//! Run: `cargo bench -p benches --bench trie`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_core::internals::trie::SubscriptionTree;
use broker_core::internals::SubscriberKey;
use broker_core::message::QoS;
use broker_core::subscription::SubscriptionOptions;
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};

const DEVICES: usize = 900_000;
const SITE_HASH: usize = 50_000;
const SITE_PLUS: usize = 49_000;
const MONITORS: usize = 1_000;
/// Different topics each match case cycles through.
const TOPICS: usize = 4096;

type Tree = SubscriptionTree<SubscriberKey, SubscriptionOptions>;

fn key(client: String) -> SubscriberKey {
    SubscriberKey {
        client: Arc::from(client),
        share: None,
    }
}

/// Every (filter, subscriber) of the tree, in a shuffled-looking but fixed
/// order (exact, `#`, `+` and `device/+/status` interleaved as they would
/// arrive from many clients).
fn subscriptions() -> Vec<(String, SubscriberKey)> {
    let mut subs = Vec::with_capacity(DEVICES + SITE_HASH + SITE_PLUS + MONITORS);
    for n in 0..DEVICES {
        subs.push((format!("device/{n}/inbox"), key(format!("device-{n}"))));
    }
    for k in 0..SITE_HASH {
        subs.push((format!("site/{k}/#"), key(format!("site-admin-{k}"))));
    }
    for k in 0..SITE_PLUS {
        subs.push((format!("site/{k}/+/temp"), key(format!("site-temp-{k}"))));
    }
    for m in 0..MONITORS {
        subs.push(("device/+/status".to_owned(), key(format!("monitor-{m}"))));
    }
    // A fixed permutation (multiplication by the prime 7,919, coprime with
    // the length), so that inserts do not all land on the same node in a row.
    let len = subs.len();
    assert_ne!(len % 7_919, 0, "7,919 must be coprime with {len}");
    let order = (0..len).map(|i| (i * 7_919) % len);
    let mut slots: Vec<Option<(String, SubscriberKey)>> = subs.into_iter().map(Some).collect();
    order
        .map(|i| slots[i].take().expect("a permutation"))
        .collect()
}

fn build(subs: &[(String, SubscriberKey)]) -> Tree {
    let mut tree = Tree::new();
    let options = SubscriptionOptions::new(QoS::AtLeastOnce);
    for (filter, key) in subs {
        tree.insert(filter, key.clone(), options.clone());
    }
    tree
}

/// Subscribers matching `topic`.
fn count(tree: &Tree, topic: &str) -> usize {
    let mut n = 0;
    tree.matches(topic, |_, _| n += 1);
    n
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();

    let subs = subscriptions();
    let tree = build(&subs);
    assert_eq!(tree.len(), subs.len());

    // (case, topic for the i-th of TOPICS, subscribers it must match); the
    // prime 104,729 spreads consecutive lookups over the tree.
    type Topic = fn(usize) -> String;
    let cases: [(&str, Topic, usize); 5] = [
        (
            "one",
            |i| format!("device/{}/inbox", (i * 104_729) % DEVICES),
            1,
        ),
        (
            "many",
            |i| format!("device/{}/status", (i * 104_729) % DEVICES),
            MONITORS,
        ),
        (
            "wildcards",
            |i| format!("site/{}/dev{}/temp", (i * 104_729) % SITE_PLUS, i % 7),
            2,
        ),
        (
            "none_deep",
            |i| format!("device/{}/config", (i * 104_729) % DEVICES),
            0,
        ),
        ("none_shallow", |i| format!("nothing/{i}/here"), 0),
    ];

    let mut group = c.benchmark_group("trie/match");
    group.throughput(Throughput::Elements(1));
    for (name, topic, expected) in cases {
        let topics: Vec<String> = (0..TOPICS).map(topic).collect();
        for t in &topics {
            assert_eq!(
                count(&tree, t),
                expected,
                "`{t}` matched a wrong number of subscribers"
            );
        }
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % TOPICS;
                let mut n = 0usize;
                tree.matches(black_box(&topics[i]), |k, v| {
                    black_box((k, v));
                    n += 1;
                });
                n
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("trie/insert");
    group
        .sampling_mode(SamplingMode::Flat)
        .throughput(Throughput::Elements(subs.len() as u64));
    group.bench_function(BenchmarkId::from_parameter("1M"), |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let built = build(black_box(&subs));
                elapsed += start.elapsed();
                drop(black_box(built));
            }
            elapsed
        })
    });
    group.finish();

    c.final_summary();
}
