//! Answers of the web service, remembered for a while.
//!
//! # Contract
//! - An entry is returned until its TTL is up, never after.
//! - The cache holds at most `max_bytes` of keys (each entry costs its key's
//!   length plus [`ENTRY_OVERHEAD`]); when full, the oldest entries go first.
//!   Clients choose the keys (topics, client ids), so the bound is in bytes,
//!   not entries. The first eviction is logged, every eviction counted.
//! - A TTL of zero disables it: nothing is stored.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// What one entry costs beyond its key, roughly (map slot, order slot, value).
pub(crate) const ENTRY_OVERHEAD: usize = 96;

/// A key's size in bytes, for the bound.
pub(crate) trait Weigh {
    fn weight(&self) -> usize;
}

struct Inner<K, V> {
    map: HashMap<K, (V, Instant)>,
    /// Insertion order, oldest first, for eviction and expiry.
    order: VecDeque<(K, Instant)>,
    bytes: usize,
}

pub(crate) struct TtlCache<K, V> {
    name: &'static str,
    ttl: Duration,
    max_bytes: usize,
    inner: Mutex<Inner<K, V>>,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
}

impl<K: Hash + Eq + Clone + Weigh, V: Clone> TtlCache<K, V> {
    pub(crate) fn new(name: &'static str, ttl: Duration, max_bytes: usize) -> Self {
        TtlCache {
            name,
            ttl,
            max_bytes,
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                order: VecDeque::new(),
                bytes: 0,
            }),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    pub(crate) fn get(&self, key: &K) -> Option<V> {
        if self.ttl.is_zero() {
            return None;
        }
        let now = Instant::now();
        let found = {
            let inner = self.inner.lock();
            inner
                .map
                .get(key)
                .filter(|(_, expires)| *expires > now)
                .map(|(v, _)| v.clone())
        };
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    pub(crate) fn insert(&self, key: K, value: V) {
        let cost = key.weight() + ENTRY_OVERHEAD;
        if self.ttl.is_zero() || cost > self.max_bytes {
            return;
        }
        let now = Instant::now();
        let expires = now + self.ttl;
        let mut evicted = 0_u64;
        let mut inner = self.inner.lock();
        // Expired entries at the front go first; then the oldest, for room.
        while let Some((k, at)) = inner.order.front() {
            let expired = *at <= now;
            if !expired && inner.bytes + cost <= self.max_bytes {
                break;
            }
            let k = k.clone();
            let at = *at;
            inner.order.pop_front();
            // The map may hold a newer entry of the same key: keep it.
            if inner.map.get(&k).is_some_and(|(_, e)| *e == at) {
                inner.map.remove(&k);
            }
            inner.bytes -= k.weight() + ENTRY_OVERHEAD;
            if !expired {
                evicted += 1;
            }
        }
        inner.map.insert(key.clone(), (value, expires));
        inner.order.push_back((key, expires));
        inner.bytes += cost;
        drop(inner);
        if evicted > 0 && self.evictions.fetch_add(evicted, Ordering::Relaxed) == 0 {
            tracing::warn!(
                "the HTTP {} cache is full ({} bytes); the oldest answers are forgotten first \
                 (counted as evictions)",
                self.name,
                self.max_bytes
            );
        }
    }

    pub(crate) fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    pub(crate) fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    pub(crate) fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.inner.lock().bytes
    }
}

impl Weigh for String {
    fn weight(&self) -> usize {
        self.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_until_the_ttl_is_up() {
        let c = TtlCache::new("test", Duration::from_millis(50), 1 << 20);
        c.insert("a".to_string(), 1);
        assert_eq!(c.get(&"a".to_string()), Some(1));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(c.get(&"a".to_string()), None);
        assert_eq!((c.hits(), c.misses()), (1, 1));
    }

    #[test]
    fn zero_ttl_stores_nothing() {
        let c = TtlCache::new("test", Duration::ZERO, 1 << 20);
        c.insert("a".to_string(), 1);
        assert_eq!(c.get(&"a".to_string()), None);
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn bounded_in_bytes_oldest_evicted_first() {
        let max = 10 * (ENTRY_OVERHEAD + 4);
        let c = TtlCache::new("test", Duration::from_secs(60), max);
        for i in 0..100 {
            c.insert(format!("k{i:03}"), i);
            assert!(c.bytes() <= max, "{} > {max}", c.bytes());
        }
        assert_eq!(c.evictions(), 90);
        assert_eq!(c.get(&"k089".to_string()), None);
        assert_eq!(c.get(&"k090".to_string()), Some(90));
        assert_eq!(c.get(&"k099".to_string()), Some(99));
        // A key larger than the whole cache is not stored.
        c.insert("x".repeat(max), 0);
        assert_eq!(c.get(&"x".repeat(max)), None);
    }

    #[test]
    fn a_renewed_key_outlives_its_old_order_slot() {
        let max = 2 * (ENTRY_OVERHEAD + 1);
        let c = TtlCache::new("test", Duration::from_secs(60), max);
        c.insert("a".to_string(), 1);
        c.insert("a".to_string(), 2);
        // Room for "b" evicts the first "a" slot only, not the renewed entry.
        c.insert("b".to_string(), 3);
        assert_eq!(c.get(&"a".to_string()), Some(2));
        assert_eq!(c.get(&"b".to_string()), Some(3));
    }
}
