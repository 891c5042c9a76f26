//! Shared by the integration tests: where Redis is, fresh key prefixes,
//! and cleaning them up.

#![allow(dead_code)]

use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use storage_redis::RedisOptions;

/// How to get a Redis for these tests, for failure messages.
pub const HOW_TO_START: &str = "these tests need a Redis server: start one with \
    `redis-server --port 6379 --appendonly yes`, or set REDIS_URL to a reachable one \
    (e.g. REDIS_URL=redis://127.0.0.1:6380/)";

/// The Redis the tests use: `REDIS_URL`, default `redis://127.0.0.1:6379/`.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned())
}

/// A synchronous connection to `url`, or a panic saying how to start Redis.
pub fn connect(url: &str) -> redis::Connection {
    let client = redis::Client::open(url)
        .unwrap_or_else(|e| panic!("REDIS_URL {url} is not a Redis URL ({e}); {HOW_TO_START}"));
    let mut conn = client
        .get_connection_with_timeout(Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("cannot reach Redis at {url} ({e}); {HOW_TO_START}"));
    redis::cmd("PING")
        .query::<String>(&mut conn)
        .unwrap_or_else(|e| panic!("Redis at {url} does not answer PING ({e}); {HOW_TO_START}"));
    conn
}

/// A key prefix no other test (or test run) uses.
pub fn unique_prefix(tag: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "mqtt-test:{tag}:{}-{nanos}-{}:",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Delete every key under `prefix` (which holds no glob characters).
pub fn delete_prefix(conn: &mut redis::Connection, prefix: &str) -> redis::RedisResult<()> {
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query(conn)?;
        if !keys.is_empty() {
            redis::cmd("UNLINK").arg(keys).query::<()>(conn)?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// A local port nothing listens on (at the time of asking).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

/// Options with `prefix` and both timeouts at `timeout`.
pub fn options(prefix: &str, timeout: Duration) -> RedisOptions {
    RedisOptions {
        prefix: prefix.to_owned(),
        connection_timeout: timeout,
        response_timeout: timeout,
        ..RedisOptions::default()
    }
}

/// Deletes every key under `prefix` when dropped, also when a test panics.
pub struct Cleanup {
    pub url: String,
    pub prefix: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Err(e) = delete_prefix(&mut connect(&self.url), &self.prefix) {
            eprintln!("could not delete the test keys under {}: {e}", self.prefix);
        }
    }
}

/// `message` (its id set to `id`) queued for `client` at `seq`, QoS 1.
pub fn enqueue_one(
    mut message: broker_core::message::Message,
    id: u64,
    client: &str,
    seq: u64,
) -> broker_core::storage::PacketOp {
    use broker_core::message::QoS;
    use broker_core::storage::{Delivery, PacketOp, QueueTarget};
    message.id = id;
    PacketOp::Enqueue {
        message: std::sync::Arc::new(message),
        targets: vec![QueueTarget {
            client: std::sync::Arc::from(client),
            seq,
            delivery: Delivery::new(QoS::AtLeastOnce),
        }],
    }
}
