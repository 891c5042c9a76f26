//! Key layout upgrades, run at open by the broker that took the prefix's
//! lease, before it serves anything.
//!
//! Layout 1 kept a queued body in a hash (`msg:{id}`: `body`, `refs`) and
//! a queue in two keys: `queue:{client}`, a sorted set of seqs, and
//! `entries:{client}`, a hash from seq to entry. Layout 2 keeps the body as
//! a string that starts with its reference count, and the entry inside
//! the sorted set's member (`<seq>:<entry>`), which halves what a queued
//! message costs in Redis (BENCHMARKS.md, "Redis").
//!
//! The upgrade is resumable and needs no downtime beyond the open:
//! 1. `P layout` is set to [`UPGRADING`], so that a broker of an earlier
//!    version refuses the prefix from then on (it reads only `1`);
//! 2. every body still a hash becomes a string (one script per `SCAN`
//!    step, each body converted whole or not at all);
//! 3. every `entries:{client}` hash is moved into its queue's members, a
//!    chunk at a time (each entry moved whole or not at all), and goes
//!    when empty;
//! 4. `P layout` is set to `2`.
//!
//! Bodies go first because moving an entry that is not in its queue drops
//! its reference, which needs the body in layout 2. A crash or a lost
//! connection at any point leaves each key either in layout 1 or in
//! layout 2, and the next open (seeing `1` or [`UPGRADING`]) does the
//! rest; nothing is read from the prefix before step 4 ends. Every script
//! checks the lease first, as every write of the store does, and checks
//! each key's type itself (no `SCAN ... TYPE`, which needs Redis 6), so
//! the upgrade runs on any Redis the store runs on.

use std::time::{Duration, Instant};

use broker_core::storage::StorageResult;

use crate::{glob_escape, RedisStore};

/// `P layout` while an upgrade from layout 1 is under way.
pub(crate) const UPGRADING: &str = "1-to-2";

/// Keys per `SCAN` step and entries per script call.
const STEP: usize = 1000;

/// How often a long upgrade says how far it got.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// What an upgrade converted, for its log lines.
#[derive(Debug)]
struct Upgraded {
    bodies: u64,
    queues: u64,
    entries: u64,
    logged: Instant,
}

impl Upgraded {
    /// A line every [`PROGRESS_EVERY`]: about 43,000 messages a second
    /// are converted on this project's benchmark machine, so a store of
    /// millions takes minutes, and the operator should see it move.
    fn progress(&mut self, store: &RedisStore) {
        if self.logged.elapsed() >= PROGRESS_EVERY {
            self.logged = Instant::now();
            tracing::info!(
                "Redis storage at {} (prefix `{}`): upgrade under way, {} bodies and {} entries \
                 of {} queues converted so far",
                store.url,
                store.keys.prefix,
                self.bodies,
                self.entries,
                self.queues
            );
        }
    }
}

impl RedisStore {
    /// Upgrade the prefix from layout 1 (or finish an upgrade cut off).
    pub(crate) async fn upgrade_from_1(&self) -> StorageResult<()> {
        let started = Instant::now();
        tracing::info!(
            "Redis storage at {} (prefix `{}`): upgrading the key layout from version 1 to 2",
            self.url,
            self.keys.prefix
        );
        let layout = self.keys.key("layout");
        let mut mark = redis::cmd("SET");
        mark.arg(&layout).arg(UPGRADING);
        self.guarded(None, &[mark]).await?;

        let mut done = Upgraded {
            bodies: 0,
            queues: 0,
            entries: 0,
            logged: Instant::now(),
        };
        self.upgrade_bodies(&mut done).await?;
        self.upgrade_queues(&mut done).await?;

        let mut finish = redis::cmd("SET");
        finish.arg(&layout).arg(crate::LAYOUT_VERSION);
        self.guarded(None, &[finish]).await?;
        tracing::info!(
            "Redis storage at {} (prefix `{}`): key layout upgraded to version 2 in {} ms \
             ({} bodies, {} entries of {} queues)",
            self.url,
            self.keys.prefix,
            started.elapsed().as_millis(),
            done.bodies,
            done.entries,
            done.queues
        );
        Ok(())
    }

    /// Step 2: every `msg:{id}` still a hash becomes a string (the script
    /// leaves those already converted).
    async fn upgrade_bodies(&self, done: &mut Upgraded) -> StorageResult<()> {
        let pattern = format!("{}msg:*", glob_escape(&self.keys.prefix));
        let mut cursor = 0u64;
        loop {
            let (next, keys) = self.scan(cursor, &pattern).await?;
            if !keys.is_empty() {
                let mut script = self.scripts.upgrade_bodies.prepare_invoke();
                script.arg(&self.keys.prefix).arg(self.lease.token());
                for k in &keys {
                    script.arg(k.as_slice());
                }
                let mut conn = self.conn.clone();
                let n: u64 = self.call(script.invoke_async(&mut conn)).await?;
                done.bodies += n;
                done.progress(self);
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// Step 3: every `entries:{client}` hash moved into its queue.
    async fn upgrade_queues(&self, done: &mut Upgraded) -> StorageResult<()> {
        let tag = format!("{}entries:", self.keys.prefix);
        let pattern = format!("{}*", glob_escape(&tag));
        let mut cursor = 0u64;
        loop {
            let (next, keys) = self.scan(cursor, &pattern).await?;
            for key in keys {
                let Some(client) = key.strip_prefix(tag.as_bytes()) else {
                    continue;
                };
                done.entries += self.upgrade_queue(&key, client).await?;
                done.queues += 1;
                done.progress(self);
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// One session's entries, a chunk of seqs per script call. `HSCAN`
    /// passes are repeated until the hash is gone: a pass returns every
    /// field present throughout it, and each call deletes what it was given.
    async fn upgrade_queue(&self, key: &[u8], client: &[u8]) -> StorageResult<u64> {
        let mut moved = 0;
        loop {
            let mut cursor = 0u64;
            loop {
                let mut conn = self.conn.clone();
                let mut cmd = redis::cmd("HSCAN");
                cmd.arg(key).arg(cursor).arg("COUNT").arg(STEP);
                let (next, fields): (u64, Vec<Vec<u8>>) =
                    self.call(cmd.query_async(&mut conn)).await?;
                // HSCAN returns field, value, field, value...: the seqs are the fields.
                for chunk in fields.chunks(2 * STEP) {
                    let mut script = self.scripts.upgrade_queue.prepare_invoke();
                    script
                        .arg(&self.keys.prefix)
                        .arg(self.lease.token())
                        .arg(client);
                    for seq in chunk.iter().step_by(2) {
                        script.arg(seq.as_slice());
                    }
                    let mut conn = self.conn.clone();
                    let n: u64 = self.call(script.invoke_async(&mut conn)).await?;
                    moved += n;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
            let mut conn = self.conn.clone();
            let mut exists = redis::cmd("EXISTS");
            exists.arg(key);
            let left: u64 = self.call(exists.query_async(&mut conn)).await?;
            if left == 0 {
                return Ok(moved);
            }
        }
    }
}
