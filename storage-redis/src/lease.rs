//! The lease: one broker per key prefix.
//!
//! # Contract
//! - [`acquire`] at open takes the prefix for this process or fails with
//!   [`OpenError::Locked`] naming the holder (host, pid, since). A lease
//!   that is still being renewed is refused within one renewal interval; one
//!   whose holder died (`kill -9`) is waited for until it expires, at most
//!   its TTL, and then taken, with a log line saying so.
//! - While held, a heartbeat task renews it every third of the TTL.
//! - Every write (the batch script and [`scripts::GUARDED`]) compares the
//!   holder's token with ours inside the same Lua script, so a broker whose
//!   lease was taken, deleted or flushed never writes again: its writes fail
//!   with [`StorageError::Unavailable`] and the loss is logged once, at
//!   `error`. It is never taken back silently.
//! - [`Lease::release`] (graceful close) deletes it, so a restart is immediate.
//!
//! # Keys
//! - `P owner`, hash `token`, `host`, `pid`, `since` (ms since the epoch),
//!   `ttl_ms`: who owns the prefix. No expiry: it is the fence the write
//!   scripts check, and it outlives a Redis outage longer than the TTL, so
//!   the holder just renews once Redis is back.
//! - `P lease`, string token with a TTL (`PX`): whether the owner is alive.
//!   A new opener may take the prefix only once this key is gone.
//!
//! [`scripts::GUARDED`]: crate::scripts

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use broker_core::storage::{StorageError, StorageResult};
use redis::aio::ConnectionLike;
use redis::{Script, Value};

use crate::error::OpenError;

/// Take the prefix if nobody is alive on it. `ARGV`: prefix, token, host,
/// pid, since, ttl ms. Returns `{1}` when taken, else `{0, pttl, token,
/// host, pid, since}` of the live holder.
const ACQUIRE: &str = r#"
local P = ARGV[1]
local lk, ok = P .. 'lease', P .. 'owner'
if redis.call('EXISTS', lk) == 1 then
  local o = redis.call('HMGET', ok, 'token', 'host', 'pid', 'since')
  return {0, redis.call('PTTL', lk), redis.call('GET', lk) or '', o[2] or '', o[3] or '', o[4] or ''}
end
redis.call('DEL', ok, P .. 'leader')
redis.call('HSET', ok, 'token', ARGV[2], 'host', ARGV[3], 'pid', ARGV[4], 'since', ARGV[5], 'ttl_ms', ARGV[6])
redis.call('SET', lk, ARGV[2], 'PX', ARGV[6])
return {1}
"#;

/// Renew if we still own the prefix. `ARGV`: prefix, token, ttl ms.
/// Returns `{1}`, or `{0, host, pid, since}` of whoever owns it now
/// (empty strings: nobody, the record is gone).
const RENEW: &str = r#"
local P = ARGV[1]
local o = redis.call('HMGET', P .. 'owner', 'token', 'host', 'pid', 'since')
if o[1] ~= ARGV[2] then
  return {0, o[2] or '', o[3] or '', o[4] or ''}
end
redis.call('SET', P .. 'lease', ARGV[2], 'PX', ARGV[3])
return {1}
"#;

/// Delete both keys if we own them. `ARGV`: prefix, token.
const RELEASE: &str = r#"
local P = ARGV[1]
if redis.call('HGET', P .. 'owner', 'token') == ARGV[2] then
  redis.call('DEL', P .. 'owner', P .. 'lease', P .. 'leader')
  return 1
end
return 0
"#;

/// Publish where the owner serves, if we still own the prefix. `ARGV`:
/// prefix, token, value. Returns 1, or 0 when another owns it.
const ADVERTISE: &str = r#"
local P = ARGV[1]
if redis.call('HGET', P .. 'owner', 'token') ~= ARGV[2] then
  return 0
end
redis.call('HSET', P .. 'leader', 'token', ARGV[2], 'value', ARGV[3])
return 1
"#;

/// What the live owner advertised: `ARGV`: prefix. Returns the value, or
/// nil when nobody is alive on the prefix or the live owner has not
/// advertised yet (an older owner's value is never returned).
const LEADER: &str = r#"
local P = ARGV[1]
local live = redis.call('GET', P .. 'lease')
if not live then
  return false
end
local a = redis.call('HMGET', P .. 'leader', 'token', 'value')
if a[1] ~= live then
  return false
end
return a[2]
"#;

pub use broker_core::storage::lease::Holder;
use broker_core::storage::lease::{host_name, new_token};

/// A holder from the strings the scripts return (`since` in ms).
fn holder_from_strings(host: String, pid: String, since: String) -> Holder {
    Holder::new(host, pid, since.parse::<u64>().ok())
}

/// How the lease stands, for a node that must stop serving once another
/// may have taken it (a cluster's leader).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseHealth {
    /// Renewed within its TTL.
    Held,
    /// Not renewed for this long, more than half the TTL (Redis unreachable
    /// or slow, or this process was stopped): still ours unless this
    /// exceeds the TTL, after which another opener may have taken it.
    Silent(Duration),
    /// Taken, deleted or flushed (why), or released.
    Lost(String),
}

/// State of the lease as this process sees it.
#[derive(Debug, Clone)]
enum State {
    Held,
    /// Lost (taken, deleted, flushed): why.
    Lost(String),
    Released,
}

/// The lease of one open store.
pub(crate) struct Lease {
    prefix: String,
    token: String,
    ttl: Duration,
    url: String,
    state: Mutex<State>,
    renew: Script,
    release: Script,
    heartbeat: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// When the lease was last taken or renewed.
    renewed_at: Mutex<Instant>,
}

impl Lease {
    /// The token every write script compares with the owner's.
    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    /// The TTL the lease is renewed with.
    pub(crate) fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How the lease stands now; see [`LeaseHealth`].
    pub(crate) fn health(&self) -> LeaseHealth {
        match &*lock(&self.state) {
            State::Held => {
                // Renewals run every third of the TTL: past half of it, at
                // least one was missed (Redis silent, or this process stopped).
                let since = lock(&self.renewed_at).elapsed();
                if since > self.ttl / 2 {
                    LeaseHealth::Silent(since)
                } else {
                    LeaseHealth::Held
                }
            }
            State::Lost(why) => LeaseHealth::Lost(why.clone()),
            State::Released => LeaseHealth::Lost("released".to_owned()),
        }
    }

    /// Publish `value` (where this owner serves) under the prefix, for
    /// [`leader`] to read; fails when the lease is no longer ours.
    pub(crate) async fn advertise<C: ConnectionLike + Send>(
        &self,
        conn: &mut C,
        value: &str,
    ) -> StorageResult<()> {
        self.check()?;
        let script = Script::new(ADVERTISE);
        let mut call = script.prepare_invoke();
        call.arg(&self.prefix).arg(&self.token).arg(value);
        match call.invoke_async::<i64>(conn).await {
            Ok(1) => Ok(()),
            Ok(_) => Err(self.lost("another broker owns the prefix")),
            Err(e) => Err(StorageError::unavailable(format!(
                "cannot advertise on Redis prefix `{}` at {}",
                self.prefix, self.url
            ))
            .with_source(e)),
        }
    }

    /// `Ok` while held; the error writes fail with otherwise.
    pub(crate) fn check(&self) -> StorageResult<()> {
        match &*lock(&self.state) {
            State::Held => Ok(()),
            State::Lost(why) => Err(self.lost_error(why)),
            State::Released => Err(StorageError::unavailable(format!(
                "the Redis store at {} (prefix `{}`) is closed",
                self.url, self.prefix
            ))),
        }
    }

    fn lost_error(&self, why: &str) -> StorageError {
        StorageError::unavailable(format!(
            "this broker lost its lease on prefix `{}` at {} ({why}); it no longer writes there, \
             restart it",
            self.prefix, self.url
        ))
    }

    /// Note that the lease is gone (a write script or a renewal found
    /// another owner or none); logged once. Returns the error for writes.
    pub(crate) fn lost(&self, why: &str) -> StorageError {
        let mut state = lock(&self.state);
        if matches!(*state, State::Held) {
            tracing::error!(
                "lost the lease on Redis prefix `{}` at {} ({why}): another broker may own it \
                 now; every write fails from now on, restart this broker",
                self.prefix,
                self.url
            );
            *state = State::Lost(why.to_owned());
        }
        match &*state {
            State::Lost(w) => self.lost_error(w),
            _ => self.lost_error(why),
        }
    }

    /// Stop renewing and delete the lease, if still ours. Later writes fail.
    pub(crate) async fn release<C: ConnectionLike + Send>(&self, conn: &mut C) {
        if let Some(h) = lock(&self.heartbeat).take() {
            h.abort();
        }
        let was_held = matches!(
            std::mem::replace(&mut *lock(&self.state), State::Released),
            State::Held
        );
        if !was_held {
            return;
        }
        let mut call = self.release.prepare_invoke();
        call.arg(&self.prefix).arg(&self.token);
        match tokio::time::timeout(self.ttl, call.invoke_async::<i64>(conn)).await {
            Ok(Ok(1)) => tracing::info!(
                "released the lease on Redis prefix `{}` at {}",
                self.prefix,
                self.url
            ),
            Ok(Ok(_)) => tracing::warn!(
                "the lease on Redis prefix `{}` at {} was no longer ours at close",
                self.prefix,
                self.url
            ),
            Ok(Err(e)) => tracing::warn!(
                "could not release the lease on Redis prefix `{}` at {} ({e}); it expires \
                 within {} ms",
                self.prefix,
                self.url,
                self.ttl.as_millis()
            ),
            Err(_) => tracing::warn!(
                "no answer releasing the lease on Redis prefix `{}` at {}; it expires within {} ms",
                self.prefix,
                self.url,
                self.ttl.as_millis()
            ),
        }
    }

    /// Release from a store being dropped, on a blocking connection of its
    /// own (the async one may belong to a runtime that is shutting down),
    /// within `timeout`. What a broker exiting without `close` relies on.
    pub(crate) fn release_on_drop(&self, connect_url: &str, timeout: Duration) {
        if let Some(h) = lock(&self.heartbeat).take() {
            h.abort();
        }
        let was_held = matches!(
            std::mem::replace(&mut *lock(&self.state), State::Released),
            State::Held
        );
        if !was_held {
            return;
        }
        let released = redis::Client::open(connect_url).and_then(|client| {
            let mut conn = client.get_connection_with_timeout(timeout)?;
            conn.set_read_timeout(Some(timeout))?;
            conn.set_write_timeout(Some(timeout))?;
            self.release
                .prepare_invoke()
                .arg(&self.prefix)
                .arg(&self.token)
                .invoke::<i64>(&mut conn)
        });
        match released {
            Ok(1) => tracing::info!(
                "released the lease on Redis prefix `{}` at {}",
                self.prefix,
                self.url
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(
                "could not release the lease on Redis prefix `{}` at {} ({e}); it expires \
                 within {} ms",
                self.prefix,
                self.url,
                self.ttl.as_millis()
            ),
        }
    }

    /// Stop renewing without releasing, as a process that died would.
    pub(crate) fn abandon(&self) {
        if let Some(h) = lock(&self.heartbeat).take() {
            h.abort();
        }
        *lock(&self.state) = State::Released;
    }

    /// Start the heartbeat on `conn` (a reconnecting connection).
    pub(crate) fn start_heartbeat<C>(self: &Arc<Self>, conn: C, response_timeout: Duration)
    where
        C: ConnectionLike + Clone + Send + Sync + 'static,
    {
        let weak = Arc::downgrade(self);
        let every = self.ttl / 3;
        // A renewal slower than its interval is as good as failed.
        let timeout = response_timeout.min(every);
        let handle = tokio::spawn(async move {
            let mut failing_since: Option<Instant> = None;
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(lease) = weak.upgrade() else { return };
                if !matches!(*lock(&lease.state), State::Held) {
                    return;
                }
                let mut call = lease.renew.prepare_invoke();
                call.arg(&lease.prefix)
                    .arg(&lease.token)
                    .arg(lease.ttl.as_millis() as u64);
                let mut c = conn.clone();
                // The TTL counts from when Redis ran the renewal: no earlier
                // than this.
                let sent = Instant::now();
                match tokio::time::timeout(timeout, call.invoke_async::<Value>(&mut c)).await {
                    Ok(Ok(reply)) => match renewed(reply) {
                        Ok(()) => {
                            *lock(&lease.renewed_at) = sent;
                            if let Some(t) = failing_since.take() {
                                tracing::info!(
                                    "renewed the lease on Redis prefix `{}` again after {:.1} s",
                                    lease.prefix,
                                    t.elapsed().as_secs_f64()
                                );
                            }
                        }
                        Err(why) => {
                            lease.lost(&why);
                            return;
                        }
                    },
                    Ok(Err(e)) => failing(&lease, &mut failing_since, &e.to_string()),
                    Err(_) => failing(&lease, &mut failing_since, "no answer"),
                }
            }
        });
        *lock(&self.heartbeat) = Some(handle);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(h) = lock(&self.heartbeat).take() {
            h.abort();
        }
    }
}

fn failing(lease: &Lease, since: &mut Option<Instant>, why: &str) {
    if since.is_none() {
        *since = Some(Instant::now());
        tracing::warn!(
            "cannot renew the lease on Redis prefix `{}` at {} ({why}); still the owner, \
             retrying every {} ms",
            lease.prefix,
            lease.url,
            (lease.ttl / 3).as_millis()
        );
    }
}

/// `Ok` for `{1}`; else who owns the prefix now.
fn renewed(reply: Value) -> Result<(), String> {
    let items = strings(reply);
    match items.first().map(String::as_str) {
        Some("1") => Ok(()),
        _ => {
            let get = |i: usize| items.get(i).cloned().unwrap_or_default();
            if get(1).is_empty() && get(2).is_empty() {
                Err("its record is gone: deleted, or Redis was flushed".to_owned())
            } else {
                Err(format!(
                    "now held by {}",
                    holder_from_strings(get(1), get(2), get(3))
                ))
            }
        }
    }
}

/// Every element of an array reply as a string (integers in decimal).
fn strings(reply: Value) -> Vec<String> {
    let items = match reply {
        Value::Array(items) => items,
        other => vec![other],
    };
    items
        .into_iter()
        .map(|v| match v {
            Value::Int(i) => i.to_string(),
            Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
            Value::SimpleString(s) => s,
            _ => String::new(),
        })
        .collect()
}

/// Take the lease on `prefix`, waiting for a dead holder's to expire; see
/// the [module documentation](self).
pub(crate) async fn acquire<C: ConnectionLike + Send>(
    conn: &mut C,
    prefix: &str,
    url: &str,
    ttl: Duration,
    response_timeout: Duration,
) -> Result<Arc<Lease>, OpenError> {
    let token = new_token();
    let acquire = Script::new(ACQUIRE);
    let since = now_ms();
    let poll = (ttl / 10).clamp(Duration::from_millis(20), Duration::from_millis(500));
    let started = Instant::now();
    // The live holder's lease token, its remaining TTL at the first look
    // and at the last one.
    let mut seen: Option<(String, i64, i64)> = None;
    let mut waiting_logged = false;
    loop {
        let mut call = acquire.prepare_invoke();
        call.arg(prefix)
            .arg(&token)
            .arg(host_name())
            .arg(std::process::id())
            .arg(since)
            .arg(ttl.as_millis() as u64);
        let reply = tokio::time::timeout(response_timeout, call.invoke_async::<Value>(conn))
            .await
            .map_err(|_| OpenError::Timeout {
                url: url.to_owned(),
                timeout: response_timeout,
            })?
            .map_err(|source| OpenError::Setup {
                url: url.to_owned(),
                source,
            })?;
        let items = strings(reply);
        let get = |i: usize| items.get(i).cloned().unwrap_or_default();
        if get(0) == "1" {
            if waiting_logged {
                tracing::info!(
                    "took over the lease on Redis prefix `{prefix}` at {url} after waiting \
                     {:.1} s for the previous holder's to expire",
                    started.elapsed().as_secs_f64()
                );
            }
            return Ok(Arc::new(Lease {
                prefix: prefix.to_owned(),
                token,
                ttl,
                url: url.to_owned(),
                state: Mutex::new(State::Held),
                renew: Script::new(RENEW),
                release: Script::new(RELEASE),
                heartbeat: Mutex::new(None),
                renewed_at: Mutex::new(Instant::now()),
            }));
        }
        let pttl: i64 = get(1).parse().unwrap_or(-1);
        let holder = holder_from_strings(get(3), get(4), get(5));
        let locked = |expires_in: Option<Duration>| OpenError::Locked {
            url: url.to_owned(),
            prefix: prefix.to_owned(),
            holder: Box::new(holder.clone()),
            expires_in,
        };
        let lease_token = get(2);
        // No expiry at all (set by hand), or renewed while we watched: alive.
        if pttl < 0 {
            return Err(locked(None));
        }
        let left = Duration::from_millis(pttl as u64);
        if let Some((t, _, last)) = &seen {
            if *t != lease_token || pttl > *last {
                return Err(locked(Some(left)));
            }
        }
        // Give up past the longest wait the first look promised.
        let promised = seen.as_ref().map_or(pttl, |(_, first, _)| *first);
        if started.elapsed() > Duration::from_millis(promised as u64) + 4 * poll {
            return Err(locked(Some(left)));
        }
        if !waiting_logged {
            waiting_logged = true;
            tracing::warn!(
                "Redis prefix `{prefix}` at {url} is leased by {holder}, expiring in {} ms; \
                 waiting to see whether it is renewed (a broker that died lets it expire)",
                left.as_millis()
            );
        }
        match seen.as_mut() {
            Some(s) => s.2 = pttl,
            None => seen = Some((lease_token, pttl, pttl)),
        }
        tokio::time::sleep(poll.min(left + Duration::from_millis(5))).await;
    }
}

/// What the live owner of `prefix` advertised with [`Lease::advertise`],
/// if anyone is alive there and has advertised.
pub(crate) async fn leader<C: ConnectionLike + Send>(
    conn: &mut C,
    prefix: &str,
) -> redis::RedisResult<Option<String>> {
    let script = Script::new(LEADER);
    let mut call = script.prepare_invoke();
    call.arg(prefix);
    call.invoke_async::<Option<String>>(conn).await
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_replies() {
        assert_eq!(renewed(Value::Array(vec![Value::Int(1)])), Ok(()));
        let gone = renewed(Value::Array(vec![
            Value::Int(0),
            Value::BulkString(vec![]),
            Value::BulkString(vec![]),
            Value::BulkString(vec![]),
        ]));
        assert!(gone.is_err_and(|e| e.contains("gone")));
        let taken = renewed(Value::Array(vec![
            Value::Int(0),
            Value::BulkString(b"h2".to_vec()),
            Value::BulkString(b"42".to_vec()),
            Value::BulkString(b"0".to_vec()),
        ]));
        assert!(taken.is_err_and(|e| e.contains("host h2, pid 42")));
    }
}
