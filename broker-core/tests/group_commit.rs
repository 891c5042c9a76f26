//! Group commit: writes reach the store in submission order, and what is
//! submitted while a write is in progress is merged into the next one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use broker_core::internals::group_commit::GroupCommit;
use broker_core::message::{Message, MessageId, QoS, Seq};
use broker_core::storage::{
    Delivery, PacketOp, PacketStore, QueueTarget, QueuedPacket, StorageResult, StoredWill,
};
use storage_memory::MemoryStore;

/// The memory store behind a slow disk: every write takes 20 ms, and the
/// number of writes is counted.
struct SlowDisk {
    inner: Arc<MemoryStore>,
    writes: AtomicUsize,
}

#[async_trait]
impl PacketStore for SlowDisk {
    async fn write(&self, ops: Vec<PacketOp>) -> StorageResult<()> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.inner.write(ops).await
    }
    async fn read_queue(
        &self,
        client: &str,
        after: Option<Seq>,
        limit: usize,
    ) -> StorageResult<Vec<QueuedPacket>> {
        self.inner.read_queue(client, after, limit).await
    }
    async fn incoming_qos2(&self, client: &str) -> StorageResult<Vec<u16>> {
        self.inner.incoming_qos2(client).await
    }
    async fn last_message_id(&self) -> StorageResult<MessageId> {
        self.inner.last_message_id().await
    }
    async fn wills(&self) -> StorageResult<Vec<StoredWill>> {
        self.inner.wills().await
    }
}

fn enqueue(n: u64) -> PacketOp {
    let mut m = Message::new("t", n.to_string(), QoS::AtLeastOnce, false);
    m.id = n;
    PacketOp::Enqueue {
        message: Arc::new(m),
        targets: vec![QueueTarget {
            client: Arc::from("c"),
            seq: n,
            delivery: Delivery::new(QoS::AtLeastOnce),
        }],
    }
}

/// Submit 100 single-message writes at once, then a removal of each odd one.
async fn run(max_batch: usize) -> (usize, Vec<Seq>) {
    let disk = Arc::new(SlowDisk {
        inner: Arc::new(MemoryStore::new()),
        writes: AtomicUsize::new(0),
    });
    let writer = GroupCommit::start(disk.clone(), max_batch);
    let mut pending: Vec<_> = (1..=100).map(|n| writer.submit(vec![enqueue(n)])).collect();
    pending.extend((1..=100).step_by(2).map(|n| {
        writer.submit(vec![PacketOp::Remove {
            client: Arc::from("c"),
            seq: n,
        }])
    }));
    for p in pending {
        p.await.expect("write succeeds");
    }
    let queue = disk.inner.read_queue("c", None, 1000).await.expect("read");
    (
        disk.writes.load(Ordering::SeqCst),
        queue.iter().map(|p| p.seq).collect(),
    )
}

#[tokio::test]
async fn submissions_are_merged_and_applied_in_order() {
    let (writes, queue) = run(1024).await;
    // The first write goes alone; everything queued behind it in one or two more.
    assert!(writes <= 3, "150 submissions took {writes} writes");
    // Removals submitted after their enqueues found them: only even seqs remain.
    assert_eq!(queue, (2..=100).step_by(2).collect::<Vec<_>>());
}

#[tokio::test]
async fn batch_of_one_writes_each_submission_alone() {
    let (writes, queue) = run(1).await;
    assert_eq!(writes, 150);
    assert_eq!(queue, (2..=100).step_by(2).collect::<Vec<_>>());
}
