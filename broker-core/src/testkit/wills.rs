//! Stored wills: kept apart from queues and sessions, each under its own id.

use std::sync::Arc;

use super::support::{client, enqueue_one, ok, read_all, rich_messages, write};
use super::StoreFactory;
use crate::message::{Message, MessageId};
use crate::storage::{ClientId, PacketOp, Storage, StoredWill};

fn will(
    client: &ClientId,
    message: Arc<Message>,
    expiry_secs: Option<u32>,
    delay: u32,
) -> StoredWill {
    StoredWill {
        client: client.clone(),
        message,
        expiry_secs,
        delay_secs: delay,
    }
}

fn store(will: &StoredWill) -> PacketOp {
    PacketOp::StoreWill { will: will.clone() }
}

fn delete(client: &ClientId, id: MessageId) -> PacketOp {
    PacketOp::DeleteWill {
        client: client.clone(),
        id,
    }
}

async fn stored(storage: &Storage) -> Vec<StoredWill> {
    ok(storage.packets.wills().await, "read the stored wills")
}

/// Wills round trip with every message property, come back in id order,
/// go only with a `DeleteWill` of their own id (not with a purge or a
/// session's deletion), take the batch's last word when one batch stores
/// and deletes the same will, and survive a reopen of a durable store.
pub async fn wills_round_trip<F: StoreFactory + ?Sized>(factory: &F) {
    let storage = factory.open().await;
    let (a, b) = (client("will-a"), client("will-b"));
    assert!(
        stored(&storage).await.is_empty(),
        "an empty store has no will"
    );

    // Ids from the message counter, apart from bodies; several per client.
    let messages = rich_messages(200);
    let w1 = will(&a, messages[0].clone(), Some(3600), 0);
    let w2 = will(&b, messages[1].clone(), None, 30);
    let w3 = will(&a, messages[2].clone(), Some(0), u32::MAX);
    write(
        &storage,
        vec![store(&w3), enqueue_one(&a, 1, 9), store(&w1), store(&w2)],
        "store three wills with an enqueue",
    )
    .await;
    assert_eq!(
        stored(&storage).await,
        vec![w1.clone(), w2.clone(), w3.clone()],
        "wills read back whole, in id order"
    );

    // Purging a's queue and deleting its session leave its wills.
    write(
        &storage,
        vec![PacketOp::Purge { client: a.clone() }],
        "purge a",
    )
    .await;
    ok(
        storage.subscriptions.delete_session(&a).await,
        "delete a's session",
    );
    assert!(read_all(&storage, &a).await.is_empty(), "a's queue purged");
    assert_eq!(stored(&storage).await.len(), 3, "a purge keeps the wills");

    // Deleting one will: that one only; unknown ids change nothing.
    write(
        &storage,
        vec![
            delete(&a, w1.id()),
            delete(&a, 999_999),
            delete(&b, 999_998),
        ],
        "delete one will and two unknown ones",
    )
    .await;
    assert_eq!(
        stored(&storage).await,
        vec![w2.clone(), w3.clone()],
        "only the deleted will went"
    );

    // One batch: the last word on each id wins.
    let replaced = will(&b, messages[1].clone(), Some(5), 1);
    let fresh = will(&b, rich_messages(300)[0].clone(), None, 0);
    write(
        &storage,
        vec![
            store(&replaced),
            delete(&a, w3.id()),
            store(&w3),
            store(&fresh),
            delete(&b, fresh.id()),
        ],
        "store and delete in one batch",
    )
    .await;
    let now = stored(&storage).await;
    assert_eq!(
        now,
        vec![replaced.clone(), w3.clone()],
        "a will stored again under its id replaces it; stored after deleted stays; deleted after stored goes"
    );

    if factory.durable() {
        factory.close(storage).await;
        let storage = factory.open().await;
        assert_eq!(
            stored(&storage).await,
            now,
            "stored wills survive closing and reopening the store"
        );
        factory.close(storage).await;
    } else {
        factory.close(storage).await;
    }
}
