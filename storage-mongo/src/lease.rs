//! The lease: one broker per database.
//!
//! # Contract
//! - [`acquire`] at open takes the database for this process or fails with
//!   [`OpenError::Locked`] naming the holder (host, pid, since). A lease
//!   that is renewed twice while the opener watches is refused, within two
//!   renewal intervals (one move alone may be a late write of a holder that
//!   died); one that is not renewed for the holder's whole TTL (its holder
//!   died) is then taken, with a log line saying so.
//! - While held, a heartbeat task renews it every third of the TTL.
//! - Every write runs in a transaction that checks the token ([`Fenced`]):
//!   a packet batch updates the lock document, so a takeover (which updates
//!   it too) and the batch are serialized by MongoDB's write conflicts, and
//!   a broker that lost the lease can never commit a batch. The other
//!   writes (sessions, subscriptions, retained) read it in their snapshot,
//!   which refuses every write once the loss is committed; a takeover
//!   committing during one such transaction is not caught by it.
//!   A lost lease (taken, deleted, database dropped) is logged once at
//!   `error`, every write fails with [`StorageError::Unavailable`] from
//!   then on, and it is never taken back.
//! - [`Lease::release`] (graceful close) deletes it: a restart is immediate.
//!
//! # The lock document
//! `meta` `{_id: "lease", token, host, pid, since, ttl_ms, beat, renewed_at,
//! writes}`. Liveness is `beat`, a counter the heartbeat increments; it is
//! judged by the opener's own monotonic clock, never by comparing clocks of
//! two machines, so a restart after `kill -9` waits one TTL (plus a poll)
//! from the open. It survives a server outage: the holder renews when the
//! server is back, unless another broker took the lease meanwhile.

use std::future::IntoFuture;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use broker_core::storage::{StorageError, StorageResult};
use mongodb::bson::{doc, Bson, DateTime, Document};
use mongodb::{ClientSession, Collection};

use crate::error::{is_duplicate_key, OpenError};
use crate::txn::{self, Abort, TxnBody};
use crate::Collections;

/// `_id` of the lock document in `meta`.
pub(crate) const LEASE_ID: &str = "lease";

pub use broker_core::storage::lease::Holder;
use broker_core::storage::lease::{host_name, new_token};

/// The holder a lease document names.
fn holder_of(doc: &Document) -> Holder {
    let text = |k: &str| match doc.get(k) {
        Some(Bson::String(s)) => s.clone(),
        Some(Bson::Int32(i)) => i.to_string(),
        Some(Bson::Int64(i)) => i.to_string(),
        _ => String::new(),
    };
    let since = doc
        .get_datetime("since")
        .ok()
        .and_then(|d| u64::try_from(d.timestamp_millis()).ok());
    Holder::new(text("host"), text("pid"), since)
}

#[derive(Debug, Clone)]
enum State {
    Held,
    Lost(String),
    Released,
}

/// The lease of one open store.
pub(crate) struct Lease {
    meta: Collection<Document>,
    token: String,
    ttl: Duration,
    where_: String,
    state: Mutex<State>,
    heartbeat: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Lease {
    /// A lease not taken yet: every write fails until [`acquire`] replaces it.
    pub(crate) fn not_taken(meta: Collection<Document>) -> Arc<Lease> {
        Arc::new(Lease {
            meta,
            token: String::new(),
            ttl: Duration::ZERO,
            where_: String::new(),
            state: Mutex::new(State::Released),
            heartbeat: Mutex::new(None),
        })
    }

    /// `Ok` while held; the error writes fail with otherwise.
    pub(crate) fn check(&self) -> StorageResult<()> {
        match &*lock(&self.state) {
            State::Held => Ok(()),
            State::Lost(why) => Err(self.lost_error(why)),
            State::Released => Err(StorageError::unavailable(format!(
                "the MongoDB store {} is closed",
                self.where_
            ))),
        }
    }

    fn lost_error(&self, why: &str) -> StorageError {
        StorageError::unavailable(format!(
            "this broker lost its lease on {} ({why}); it no longer writes there, restart it",
            self.where_
        ))
    }

    /// Note that the lease is gone; logged once. Returns the error for writes.
    pub(crate) fn lost(&self, why: &str) -> StorageError {
        let mut state = lock(&self.state);
        if matches!(*state, State::Held) {
            tracing::error!(
                "lost the lease on {} ({why}): another broker may own it now; every write \
                 fails from now on, restart this broker",
                self.where_
            );
            *state = State::Lost(why.to_owned());
        }
        match &*state {
            State::Lost(w) => self.lost_error(w),
            _ => self.lost_error(why),
        }
    }

    /// Who owns the lease now, for the loss message (read outside any transaction).
    async fn describe_owner(&self) -> String {
        match self.meta.find_one(doc! { "_id": LEASE_ID }).await {
            Ok(Some(d)) => format!("now held by {}", holder_of(&d)),
            Ok(None) => "its lock document is gone: deleted, or the database dropped".to_owned(),
            Err(_) => "its token no longer matches".to_owned(),
        }
    }

    /// Stop renewing and delete the lock document, if still ours.
    pub(crate) async fn release(&self) {
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
        let delete = txn::retry_conflicts(|| {
            self.meta
                .delete_one(doc! { "_id": LEASE_ID, "token": &self.token })
                .into_future()
        });
        match tokio::time::timeout(self.ttl, delete).await {
            Ok(Ok(r)) if r.deleted_count == 1 => {
                tracing::info!("released the lease on {}", self.where_)
            }
            Ok(Ok(_)) => tracing::warn!("the lease on {} was no longer ours at close", self.where_),
            Ok(Err(e)) => tracing::warn!(
                "could not release the lease on {} ({e}); the next broker waits {} ms for it",
                self.where_,
                self.ttl.as_millis()
            ),
            Err(_) => tracing::warn!(
                "no answer releasing the lease on {}; the next broker waits {} ms for it",
                self.where_,
                self.ttl.as_millis()
            ),
        }
    }

    /// Release from a store being dropped: on a thread with a runtime and a
    /// client of its own (the store's may belong to a runtime that is
    /// shutting down), waiting at most `timeout`. What a broker exiting
    /// without `close` relies on.
    pub(crate) fn release_on_drop(
        &self,
        options: &mongodb::options::ClientOptions,
        database: &str,
        timeout: Duration,
    ) {
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
        let (options, database, token) = (options.clone(), database.to_owned(), self.token.clone());
        let (done, outcome) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("mongo-lease-release".into())
            .spawn(move || {
                let released = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())
                    .and_then(|rt| {
                        rt.block_on(async {
                            let client = mongodb::Client::with_options(options)
                                .map_err(|e| e.to_string())?;
                            let meta = client.database(&database).collection::<Document>("meta");
                            let delete = meta
                                .delete_one(doc! { "_id": LEASE_ID, "token": &token })
                                .into_future();
                            match tokio::time::timeout(timeout, delete).await {
                                Ok(r) => r.map(|r| r.deleted_count == 1).map_err(|e| e.to_string()),
                                Err(_) => Err("no answer".to_owned()),
                            }
                        })
                    });
                let _ = done.send(released);
            });
        let released = match spawned {
            Ok(_) => outcome
                .recv_timeout(timeout + Duration::from_secs(1))
                .unwrap_or_else(|_| Err("no answer".to_owned())),
            Err(e) => Err(e.to_string()),
        };
        match released {
            Ok(true) => tracing::info!("released the lease on {}", self.where_),
            Ok(false) => {}
            Err(e) => tracing::warn!(
                "could not release the lease on {} ({e}); the next broker waits {} ms for it",
                self.where_,
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

    /// Start renewing every third of the TTL.
    ///
    /// At most one renewal is ever outstanding: one that gets no answer is
    /// waited for, not abandoned for a new one, so a holder killed while the
    /// server is slow leaves at most one late renewal behind it, which
    /// [`acquire`] tells from a live holder's steady renewals.
    pub(crate) fn start_heartbeat(self: &Arc<Self>, operation_timeout: Duration) {
        let weak = Arc::downgrade(self);
        let every = self.ttl / 3;
        let slow = operation_timeout.min(every);
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
                let renew = txn::retry_conflicts(|| {
                    lease
                        .meta
                        .update_one(
                            doc! { "_id": LEASE_ID, "token": &lease.token },
                            doc! {
                                "$inc": { "beat": 1_i64 },
                                "$set": { "renewed_at": DateTime::now() },
                            },
                        )
                        .into_future()
                });
                tokio::pin!(renew);
                let answer = loop {
                    match tokio::time::timeout(slow, &mut renew).await {
                        Ok(answer) => break answer,
                        Err(_) if failing_since.is_none() => {
                            failing_since = Some(Instant::now());
                            tracing::warn!(
                                "cannot renew the lease on {} (no answer within {} ms); still \
                                 the owner, waiting for the answer",
                                lease.where_,
                                slow.as_millis()
                            );
                        }
                        Err(_) => {}
                    }
                };
                match answer {
                    Ok(r) if r.matched_count == 1 => {
                        if let Some(t) = failing_since.take() {
                            tracing::info!(
                                "renewed the lease on {} again after {:.1} s",
                                lease.where_,
                                t.elapsed().as_secs_f64()
                            );
                        }
                    }
                    Ok(_) => {
                        let why = lease.describe_owner().await;
                        lease.lost(&why);
                        return;
                    }
                    Err(e) if failing_since.is_none() => {
                        failing_since = Some(Instant::now());
                        tracing::warn!(
                            "cannot renew the lease on {} ({e}); still the owner, retrying \
                             every {} ms",
                            lease.where_,
                            every.as_millis()
                        );
                    }
                    Err(_) => {}
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

/// A transaction body run only while this process holds the lease, checked
/// inside the same transaction: with `touch`, by updating the lock
/// document (a concurrent takeover then conflicts), else by reading it.
pub(crate) struct Fenced<'l, B> {
    pub lease: &'l Lease,
    pub touch: bool,
    pub body: B,
}

#[async_trait]
impl<B: TxnBody> TxnBody for Fenced<'_, B> {
    type Output = B::Output;

    async fn run(
        &mut self,
        colls: &Collections,
        s: &mut ClientSession,
    ) -> Result<B::Output, Abort> {
        self.lease.check()?;
        let mine = doc! { "_id": LEASE_ID, "token": &self.lease.token };
        let held = if self.touch {
            colls
                .meta
                .update_one(mine, doc! { "$inc": { "writes": 1_i64 } })
                .session(&mut *s)
                .await?
                .matched_count
                == 1
        } else {
            colls
                .meta
                .find_one(mine)
                .projection(doc! { "_id": 1 })
                .session(&mut *s)
                .await?
                .is_some()
        };
        if !held {
            let why = self.lease.describe_owner().await;
            return Err(Abort::Fail(self.lease.lost(&why)));
        }
        self.body.run(colls, s).await
    }
}

/// Take the lease on the database of `meta`; see the [module documentation](self).
pub(crate) async fn acquire(
    meta: Collection<Document>,
    where_: &str,
    uri: &str,
    database: &str,
    ttl: Duration,
    operation_timeout: Duration,
) -> Result<Arc<Lease>, OpenError> {
    let token = new_token();
    let poll = (ttl / 10).clamp(Duration::from_millis(20), Duration::from_millis(500));
    let started = Instant::now();
    let failed = |source: mongodb::error::Error| OpenError::Setup {
        uri: uri.to_owned(),
        database: database.to_owned(),
        source,
    };
    let bounded = |what| OpenError::Timeout {
        uri: uri.to_owned(),
        after: what,
    };
    let mine = doc! {
        "token": &token,
        "host": host_name(),
        "pid": i64::from(std::process::id()),
        "since": DateTime::now(),
        "ttl_ms": ttl.as_millis() as i64,
        "beat": 0_i64,
        "renewed_at": DateTime::now(),
        "writes": 0_i64,
    };
    // The holder's token and beat at the first look, and when that was.
    let mut seen: Option<(Bson, Bson, Instant)> = None;
    // When the takeover first met a transaction the dead holder left open.
    let mut conflicted: Option<Instant> = None;
    // Whether the document moved once since the first look.
    let mut moved = false;
    loop {
        let current = tokio::time::timeout(
            operation_timeout,
            meta.find_one(doc! { "_id": LEASE_ID }).into_future(),
        )
        .await
        .map_err(|_| bounded(operation_timeout))?
        .map_err(failed)?;
        let taken = match current {
            None => {
                let mut doc = mine.clone();
                doc.insert("_id", LEASE_ID);
                let insert =
                    tokio::time::timeout(operation_timeout, meta.insert_one(doc).into_future())
                        .await
                        .map_err(|_| bounded(operation_timeout))?;
                match insert {
                    Ok(_) => true,
                    // Another opener was faster: look again.
                    Err(e) if is_duplicate_key(&e) => false,
                    Err(e) => return Err(failed(e)),
                }
            }
            Some(current) => {
                let holder = holder_of(&current);
                let token_now = current.get("token").cloned().unwrap_or(Bson::Null);
                let beat_now = current.get("beat").cloned().unwrap_or(Bson::Null);
                let holder_ttl = current
                    .get_i64("ttl_ms")
                    .ok()
                    .and_then(|ms| u64::try_from(ms).ok())
                    .map_or(ttl, Duration::from_millis);
                match &seen {
                    None => {
                        tracing::warn!(
                            "{where_} is leased by {holder}; waiting up to {} ms to see whether \
                             it is renewed (a broker that died stops renewing it)",
                            holder_ttl.as_millis()
                        );
                        seen = Some((token_now, beat_now, Instant::now()));
                        false
                    }
                    // The document moved while the dead holder's transaction
                    // was being aborted (its rollback, not a renewal): watch
                    // it afresh for a whole TTL.
                    Some((t, b, _))
                        if (*t != token_now || *b != beat_now) && conflicted.take().is_some() =>
                    {
                        seen = Some((token_now, beat_now, Instant::now()));
                        false
                    }
                    // One move is not yet a renewal: the one renewal a dead
                    // holder may have left outstanding can land late (the
                    // server was slow, or retried it behind the holder's
                    // open transaction). A live holder renews every third
                    // of its TTL, so it is seen moving again within one TTL.
                    Some((t, b, _)) if (*t != token_now || *b != beat_now) && !moved => {
                        moved = true;
                        seen = Some((token_now, beat_now, Instant::now()));
                        false
                    }
                    Some((t, b, _)) if *t != token_now || *b != beat_now => {
                        return Err(OpenError::Locked {
                            uri: uri.to_owned(),
                            database: database.to_owned(),
                            holder: Box::new(holder),
                            ttl: holder_ttl,
                        });
                    }
                    Some((_, _, at)) if at.elapsed() < holder_ttl + poll => false,
                    Some(_) => {
                        // Not renewed for a whole TTL: take it, unless it
                        // changed since the last look.
                        let take = take_over(
                            &meta,
                            doc! { "_id": LEASE_ID, "token": &token_now, "beat": &beat_now },
                            doc! { "$set": mine.clone() },
                        );
                        let r = tokio::time::timeout(operation_timeout, take)
                            .await
                            .map_err(|_| bounded(operation_timeout))?;
                        match r {
                            Ok(true) => {
                                tracing::info!(
                                    "took over the lease on {where_} from {holder}, not renewed \
                                     for {:.1} s",
                                    started.elapsed().as_secs_f64()
                                );
                                true
                            }
                            Ok(false) => false,
                            // The dead broker's last batch transaction still
                            // holds the lease document: the server aborts it
                            // at its transaction lifetime (60 s by default).
                            Err(e)
                                if txn::is_write_conflict(&e)
                                    || e.contains_label("TransientTransactionError") =>
                            {
                                let waited = conflicted.get_or_insert_with(Instant::now);
                                if waited.elapsed() > operation_timeout {
                                    return Err(bounded(operation_timeout));
                                }
                                if waited.elapsed() < poll {
                                    tracing::warn!(
                                        "{where_}: a transaction of the previous holder is still \
                                         open on the lease; waiting for the server to abort it"
                                    );
                                }
                                false
                            }
                            Err(e) => return Err(failed(e)),
                        }
                    }
                }
            }
        };
        if taken {
            return Ok(Arc::new(Lease {
                meta,
                token,
                ttl,
                where_: where_.to_owned(),
                state: Mutex::new(State::Held),
                heartbeat: Mutex::new(None),
            }));
        }
        tokio::time::sleep(poll).await;
    }
}

/// Take the lease document in a transaction of its own: it then conflicts
/// with (instead of waiting behind) a batch transaction the dead holder left
/// open, and the server's reaping of expired transactions, which some
/// compatible servers run only when transactions are used, gets its chance.
async fn take_over(
    meta: &Collection<Document>,
    filter: Document,
    update: Document,
) -> mongodb::error::Result<bool> {
    let mut s = meta.client().start_session().await?;
    s.start_transaction().await?;
    let r = meta.update_one(filter, update).session(&mut s).await?;
    s.commit_transaction().await?;
    Ok(r.matched_count == 1)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_from_documents() {
        let h = holder_of(&doc! { "host": "h", "pid": 42_i64, "since": DateTime::from_millis(0) });
        assert_eq!(
            h.to_string(),
            "host h, pid 42, since 1970-01-01 00:00:00 UTC"
        );
        assert_eq!(holder_of(&doc! {}).to_string(), "host ?, pid ?, since ?");
    }
}
