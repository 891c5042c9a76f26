//! Group commit: every write to the packet store goes through one queue.
//!
//! Callers [`submit`](GroupCommit::submit) their operations synchronously, so
//! the store receives them in the order the broker decided them (a
//! publisher's messages, then the acknowledgements that remove them). One
//! task takes everything queued while the previous write was in progress
//! and hands it to the store as a single batch: a backend with transactions
//! commits it in one, so the cost of a durable commit is shared by every
//! publish and acknowledgement that arrived meanwhile. This works the same
//! for every backend, and a crash loses at most a suffix of what was
//! submitted, never a message in the middle of a publisher's stream.
//!
//! A failed batch fails every request in it: the usual causes (disk full,
//! database unreachable) would fail each of them alone too.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::metrics::Histograms;
use crate::storage::{PacketOp, PacketStore, StorageError, StorageResult};

struct Request {
    ops: Vec<PacketOp>,
    done: oneshot::Sender<StorageResult<()>>,
}

/// The queue in front of the packet store.
#[derive(Debug, Clone)]
pub struct GroupCommit {
    tx: mpsc::UnboundedSender<Request>,
}

impl GroupCommit {
    /// Start the writer task on the current runtime. `max_batch` bounds the
    /// requests merged into one store write (1 disables group commit).
    #[cfg_attr(not(feature = "testkit"), allow(dead_code))] // the core starts it measured
    pub fn start(packets: Arc<dyn PacketStore>, max_batch: usize) -> Self {
        Self::start_measured(packets, max_batch, Arc::default())
    }

    /// [`GroupCommit::start`], recording each batch's size and write time
    /// in `histograms` (two relaxed atomic additions per batch).
    pub(crate) fn start_measured(
        packets: Arc<dyn PacketStore>,
        max_batch: usize,
        histograms: Arc<Histograms>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(packets, rx, max_batch.max(1), histograms));
        GroupCommit { tx }
    }

    /// Queue `ops` now; the future resolves once they are as durable as the
    /// store promises. Dropping the future does not cancel the write.
    pub fn submit(
        &self,
        ops: Vec<PacketOp>,
    ) -> impl Future<Output = StorageResult<()>> + Send + 'static {
        let (done, result) = oneshot::channel();
        let queued = self.tx.send(Request { ops, done }).is_ok();
        async move {
            if !queued {
                return Err(StorageError::unavailable("the broker is stopping"));
            }
            result
                .await
                .unwrap_or_else(|_| Err(StorageError::backend("the storage writer stopped")))
        }
    }
}

async fn run(
    packets: Arc<dyn PacketStore>,
    mut rx: mpsc::UnboundedReceiver<Request>,
    max_batch: usize,
    histograms: Arc<Histograms>,
) {
    let mut batch = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let ops: Vec<PacketOp> = batch
            .iter_mut()
            .flat_map(|r| std::mem::take(&mut r.ops))
            .collect();
        let (count, started) = (ops.len(), std::time::Instant::now());
        let result = if ops.is_empty() {
            Ok(())
        } else {
            packets.write(ops).await
        };
        let elapsed_us = started.elapsed().as_micros() as u64;
        if count > 0 {
            histograms.commit_ops.observe(count as u64);
            histograms.commit_us.observe(elapsed_us);
        }
        debug!(
            requests = batch.len(),
            ops = count,
            elapsed_us,
            "group commit"
        );
        if let Err(e) = &result {
            warn!(error = %e.report(), requests = batch.len(), "storage write failed");
        }
        // Every request of the batch fails alike, each with its copy of the error.
        let shared = result.err().map(Arc::new);
        for r in batch.drain(..) {
            let _ = r.done.send(match &shared {
                None => Ok(()),
                Some(e) => Err(StorageError::copy_of(e)),
            });
        }
    }
}
