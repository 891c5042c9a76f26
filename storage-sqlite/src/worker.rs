//! The thread that owns the SQLite connection.
//!
//! SQLite calls block, so none of them runs on a tokio worker: the store
//! sends each operation as a closure over a channel to this thread, which
//! runs them one at a time and answers on a oneshot channel. One writer is
//! all SQLite allows anyway; the broker's group commit makes each packet
//! write a whole batch.

use std::sync::mpsc;
use std::thread::JoinHandle;

use broker_core::storage::{BodyCache, StorageError, StorageResult};
use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::error::storage_error;

/// What the worker thread owns.
pub(crate) struct Db {
    pub conn: Connection,
    pub cache: BodyCache,
}

type Job = Box<dyn FnOnce(&mut Db) + Send>;

/// Handle to the worker thread; dropping it closes the database and waits
/// for the thread, so a reopen finds the file unlocked.
pub(crate) struct Worker {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    pub(crate) fn spawn(conn: Connection, name: String) -> std::io::Result<Worker> {
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            let mut db = Db {
                conn,
                cache: BodyCache::default(),
            };
            while let Ok(job) = rx.recv() {
                job(&mut db);
            }
        })?;
        Ok(Worker {
            jobs: Some(tx),
            thread: Some(thread),
        })
    }

    /// Run `f` on the worker thread and wait (asynchronously) for its result.
    pub(crate) async fn call<T, F>(&self, f: F) -> StorageResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Db) -> rusqlite::Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |db| {
            let _ = tx.send(f(db).map_err(storage_error));
        });
        let sent = self.jobs.as_ref().map(|j| j.send(job).is_ok());
        if sent != Some(true) {
            return Err(StorageError::unavailable("the SQLite worker has stopped"));
        }
        rx.await.map_err(|e| {
            StorageError::backend("the SQLite worker stopped mid-operation").with_source(e)
        })?
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
