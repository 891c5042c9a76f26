//! Multi-document transactions with the retries MongoDB recommends, and
//! the bookkeeping of whether the server is reachable.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use broker_core::storage::{StorageError, StorageResult};
use mongodb::error::{Error, TRANSIENT_TRANSACTION_ERROR, UNKNOWN_TRANSACTION_COMMIT_RESULT};
use mongodb::options::{Acknowledgment, ReadConcern, TransactionOptions, WriteConcern};
use mongodb::{Client, ClientSession};

use crate::error::{is_server_selection, storage_error};
use crate::Collections;

/// Attempts of one transaction (the first included) before giving up. High
/// on purpose: under contention conflicts can repeat, and the operation
/// timeout of the caller is what bounds the whole (at ~0.5 s a retry).
const MAX_ATTEMPTS: u32 = 1000;
/// Retries of a commit whose outcome is unknown.
const MAX_COMMIT_RETRIES: u32 = 3;

/// Why a transaction body stopped.
#[derive(Debug)]
pub(crate) enum Abort {
    /// A driver error; the transaction is retried when it is transient.
    Mongo(Error),
    /// The body asks to be run again at once (it changed its own plan).
    Again,
    /// Give up with this error.
    Fail(StorageError),
}

impl From<Error> for Abort {
    fn from(e: Error) -> Self {
        Abort::Mongo(e)
    }
}

impl From<StorageError> for Abort {
    fn from(e: StorageError) -> Self {
        Abort::Fail(e)
    }
}

/// The work of one transaction. It may run several times (retries), each
/// time in a new transaction; `&mut self` carries what it learnt.
#[async_trait]
pub(crate) trait TxnBody: Send {
    type Output: Send;
    async fn run(
        &mut self,
        colls: &Collections,
        session: &mut ClientSession,
    ) -> Result<Self::Output, Abort>;
}

/// The write concern of every write: acknowledged by a majority and
/// journaled, so that what a call reports written survives a crash of the
/// server (on a single node: survives `kill -9` of mongod).
pub(crate) fn durable_write_concern() -> WriteConcern {
    WriteConcern::builder()
        .w(Acknowledgment::Majority)
        .journal(true)
        .build()
}

/// Transactions read from a snapshot and commit with `write_concern`.
pub(crate) fn transaction_options(write_concern: WriteConcern) -> TransactionOptions {
    TransactionOptions::builder()
        .read_concern(ReadConcern::snapshot())
        .write_concern(write_concern)
        .build()
}

/// A transient error worth another attempt now. Server selection errors
/// are not: the driver already waited its whole timeout for a server. A
/// write conflict is retried even without the `TransientTransactionError`
/// label (MongoDB adds it; not every compatible server does).
fn worth_retrying(e: &Error) -> bool {
    (e.contains_label(TRANSIENT_TRANSACTION_ERROR) || is_write_conflict(e))
        && !is_server_selection(e)
}

/// Code of a write conflict between transactions.
const WRITE_CONFLICT: i32 = 112;

pub(crate) fn is_write_conflict(e: &Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    match &*e.kind {
        ErrorKind::Command(c) => c.code == WRITE_CONFLICT,
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == WRITE_CONFLICT,
        ErrorKind::InsertMany(i) => i
            .write_errors
            .iter()
            .flatten()
            .any(|w| w.code == WRITE_CONFLICT),
        _ => false,
    }
}

/// Run `body` in a transaction: retried from the start on
/// `TransientTransactionError` (write conflicts, a lost connection), its
/// commit retried on `UnknownTransactionCommitResult`, both a bounded
/// number of times with jittered exponential backoff. The caller bounds the
/// whole in time.
pub(crate) async fn run<B: TxnBody>(
    client: &Client,
    options: &TransactionOptions,
    colls: &Collections,
    body: &mut B,
) -> StorageResult<B::Output> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let last = attempt >= MAX_ATTEMPTS;
        // A fresh session per attempt: dropping one with its transaction
        // open aborts it in the background, without waiting for a server
        // that may be gone.
        let mut session = client.start_session().await.map_err(storage_error)?;
        session
            .start_transaction()
            .with_options(options.clone())
            .await
            .map_err(storage_error)?;
        match body.run(colls, &mut session).await {
            Ok(out) => match commit(&mut session).await {
                Ok(()) => return Ok(out),
                Err(e) if worth_retrying(&e) && !last => {
                    tracing::debug!(attempt, error = %e, "MongoDB transaction commit failed; retrying");
                }
                Err(e) => return Err(storage_error(e)),
            },
            Err(Abort::Again) if !last => {
                drop(session);
                continue;
            }
            Err(Abort::Again) => {
                return Err(StorageError::backend(format!(
                    "MongoDB transaction still conflicting after {attempt} attempts"
                )))
            }
            Err(Abort::Fail(e)) => return Err(e),
            Err(Abort::Mongo(e)) if worth_retrying(&e) && !last => {
                tracing::debug!(attempt, error = %e, "MongoDB transaction failed; retrying");
            }
            Err(Abort::Mongo(e)) => return Err(storage_error(e)),
        }
        drop(session);
        tokio::time::sleep(backoff(attempt)).await;
    }
}

async fn commit(session: &mut ClientSession) -> Result<(), Error> {
    let mut retries = 0;
    loop {
        match session.commit_transaction().await {
            Err(e)
                if e.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT)
                    && !is_server_selection(&e)
                    && retries < MAX_COMMIT_RETRIES =>
            {
                retries += 1;
                tracing::debug!(retries, error = %e, "MongoDB commit result unknown; committing again");
            }
            result => return result,
        }
    }
}

/// Run a single write again while it meets a write conflict (a transaction
/// holds what it touches); the caller's operation timeout bounds the whole.
pub(crate) async fn retry_conflicts<T, F, Fut>(mut op: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Err(e) if is_write_conflict(&e) => {
                attempt += 1;
                tracing::debug!(attempt, error = %e, "MongoDB write conflict; retrying");
                tokio::time::sleep(backoff(attempt)).await;
            }
            result => return result,
        }
    }
}

/// Between 1 and 2 times 2 ms * 2^attempt, at most about half a second.
fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(2) * 2u32.pow(attempt.min(8));
    let jitter = RandomState::new().build_hasher().finish() % 1000;
    base + base.mul_f64(jitter as f64 / 1000.0)
}

/// Whether the server answers, to log each loss and recovery once rather
/// than once per failed operation.
pub(crate) struct Health {
    uri: String,
    down: AtomicBool,
    down_since: Mutex<Option<Instant>>,
}

impl Health {
    pub(crate) fn new(uri: String) -> Self {
        Health {
            uri,
            down: AtomicBool::new(false),
            down_since: Mutex::new(None),
        }
    }

    /// Note the outcome of an operation.
    pub(crate) fn observe<T>(&self, result: &StorageResult<T>) {
        match result {
            Err(e) if e.is_unavailable() => self.lost(e.message()),
            // Any answer, even an error, means the server is there.
            _ => self.answered(),
        }
    }

    fn lost(&self, reason: &str) {
        let mut since = self.down_since.lock().unwrap_or_else(|p| p.into_inner());
        if since.is_none() {
            *since = Some(Instant::now());
            self.down.store(true, Ordering::Release);
            tracing::warn!(
                uri = %self.uri,
                "MongoDB store unavailable; storage operations fail until it answers again: {reason}"
            );
        }
    }

    fn answered(&self) {
        if !self.down.load(Ordering::Acquire) {
            return;
        }
        let mut since = self.down_since.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = since.take() {
            self.down.store(false, Ordering::Release);
            tracing::info!(
                uri = %self.uri,
                "MongoDB store available again after {:.1} s",
                t.elapsed().as_secs_f64()
            );
        }
    }

    /// True while the last operation found the server unavailable.
    #[cfg(test)]
    pub(crate) fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_bounded() {
        assert!(backoff(1) >= Duration::from_millis(4) && backoff(1) <= Duration::from_millis(8));
        assert!(backoff(100) <= Duration::from_millis(1024));
    }

    #[test]
    fn health_flips_once_each_way() {
        let h = Health::new("mongodb://h/".into());
        h.observe::<()>(&Ok(()));
        assert!(!h.is_down());
        h.observe::<()>(&Err(StorageError::unavailable("gone")));
        h.observe::<()>(&Err(StorageError::unavailable("still gone")));
        assert!(h.is_down());
        h.observe::<()>(&Err(StorageError::backend("an answer")));
        assert!(!h.is_down());
    }
}
