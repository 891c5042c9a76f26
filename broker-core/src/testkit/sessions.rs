//! Cases for [`SubscriptionStore`](crate::storage::SubscriptionStore).

use super::support::ok;
use super::StoreFactory;
use crate::message::QoS;
use crate::storage::{SessionRecord, Storage, StoredSession, SubscriptionRecord};
use crate::subscription::SubscriptionOptions;

pub(crate) fn record(
    client_id: &str,
    expiry_secs: Option<u32>,
    disconnected_at_ms: Option<u64>,
) -> SessionRecord {
    SessionRecord {
        client_id: client_id.to_owned(),
        expiry_secs,
        disconnected_at_ms,
    }
}

pub(crate) fn sub(filter: &str, options: SubscriptionOptions) -> SubscriptionRecord {
    SubscriptionRecord {
        filter: filter.to_owned(),
        options,
    }
}

/// Subscriptions using every option, each field away from its default.
pub(crate) fn rich_subscriptions() -> Vec<SubscriptionRecord> {
    vec![
        sub(
            "sensors/+/temp",
            SubscriptionOptions {
                qos: QoS::ExactlyOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: 2,
                subscription_id: Some(268_435_455),
            },
        ),
        sub(
            "$SYS/#",
            SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                no_local: false,
                retain_as_published: true,
                retain_handling: 1,
                subscription_id: Some(1),
            },
        ),
        sub("#", SubscriptionOptions::new(QoS::AtMostOnce)),
        sub("a//ü/+", SubscriptionOptions::new(QoS::AtLeastOnce)),
    ]
}

/// All sessions, each with its subscriptions, sorted so that results given
/// "in no particular order" compare.
pub(crate) async fn load(storage: &Storage) -> Vec<StoredSession> {
    let mut sessions = ok(storage.subscriptions.load_sessions().await, "load_sessions");
    sessions.sort_by(|x, y| x.record.client_id.cmp(&y.record.client_id));
    for s in &mut sessions {
        s.subscriptions.sort_by(|x, y| x.filter.cmp(&y.filter));
    }
    sessions
}

pub(crate) fn stored(
    record: SessionRecord,
    mut subscriptions: Vec<SubscriptionRecord>,
) -> StoredSession {
    subscriptions.sort_by(|x, y| x.filter.cmp(&y.filter));
    StoredSession {
        record,
        subscriptions,
    }
}

/// Sessions and subscriptions round trip with every field: subscriptions
/// added in several calls accumulate, adding an existing filter replaces its
/// options, removing ignores unknown filters, a session without
/// subscriptions loads with none, and sessions do not share subscriptions.
pub async fn subscriptions_round_trip<F: StoreFactory + ?Sized>(factory: &F) {
    let storage = factory.open().await;
    let s1 = record("sub-1", Some(3600), None);
    let s2 = record("sub-2", None, Some(1_700_000_123_456));
    let s3 = record("sub-1/x", Some(0), Some(0));
    for r in [&s1, &s2, &s3] {
        ok(storage.subscriptions.save_session(r).await, "save_session");
    }

    let mut subs = rich_subscriptions();
    ok(
        storage
            .subscriptions
            .add_subscriptions("sub-1", &subs[..2])
            .await,
        "add_subscriptions",
    );
    ok(
        storage
            .subscriptions
            .add_subscriptions("sub-1", &subs[2..])
            .await,
        "add_subscriptions",
    );
    let only = sub("x/y", SubscriptionOptions::new(QoS::AtLeastOnce));
    ok(
        storage
            .subscriptions
            .add_subscriptions("sub-1/x", std::slice::from_ref(&only))
            .await,
        "add_subscriptions",
    );
    assert_eq!(
        load(&storage).await,
        vec![
            stored(s1.clone(), subs.clone()),
            stored(s3.clone(), vec![only.clone()]),
            stored(s2.clone(), vec![]),
        ],
        "sessions and subscriptions after adding"
    );

    // Re-subscribing to a filter replaces its options.
    let replaced = sub(
        "sensors/+/temp",
        SubscriptionOptions {
            qos: QoS::AtMostOnce,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
            subscription_id: Some(7),
        },
    );
    ok(
        storage
            .subscriptions
            .add_subscriptions("sub-1", std::slice::from_ref(&replaced))
            .await,
        "add_subscriptions (replace)",
    );
    subs[0] = replaced;
    let loaded = load(&storage).await;
    assert_eq!(
        loaded[0],
        stored(s1.clone(), subs.clone()),
        "subscription options after re-subscribing"
    );

    ok(
        storage
            .subscriptions
            .remove_subscriptions("sub-1", &["$SYS/#".to_owned(), "not/subscribed".to_owned()])
            .await,
        "remove_subscriptions",
    );
    subs.remove(1);
    assert_eq!(
        load(&storage).await,
        vec![stored(s1, subs), stored(s3, vec![only]), stored(s2, vec![]),],
        "after removing one subscription and an unknown filter"
    );
    factory.close(storage).await;
}

/// Session records are replaced by `save_session` (e.g. on disconnect, when
/// `disconnected_at_ms` is set); `delete_session` removes the session and its
/// subscriptions, so re-creating it starts with none; deleting an unknown
/// session is not an error; look-alike client ids are independent.
pub async fn session_lifecycle<F: StoreFactory + ?Sized>(factory: &F) {
    let storage = factory.open().await;
    let connected = record("life", Some(60), None);
    let other = record("life2", Some(60), None);
    for r in [&connected, &other] {
        ok(storage.subscriptions.save_session(r).await, "save_session");
    }
    let subs = rich_subscriptions();
    for c in ["life", "life2"] {
        ok(
            storage.subscriptions.add_subscriptions(c, &subs).await,
            "add_subscriptions",
        );
    }

    let disconnected = record("life", Some(120), Some(1_700_000_000_000));
    ok(
        storage.subscriptions.save_session(&disconnected).await,
        "save_session (replace)",
    );
    assert_eq!(
        load(&storage).await,
        vec![
            stored(disconnected.clone(), subs.clone()),
            stored(other.clone(), subs.clone()),
        ],
        "replacing a session record must keep its subscriptions and not duplicate it"
    );

    ok(
        storage.subscriptions.delete_session("life").await,
        "delete_session",
    );
    assert_eq!(
        load(&storage).await,
        vec![stored(other.clone(), subs.clone())],
        "after deleting one session"
    );
    ok(
        storage.subscriptions.delete_session("life").await,
        "delete_session twice",
    );
    ok(
        storage.subscriptions.delete_session("never-existed").await,
        "delete_session unknown",
    );

    ok(
        storage.subscriptions.save_session(&connected).await,
        "save_session again",
    );
    assert_eq!(
        load(&storage).await,
        vec![stored(connected, vec![]), stored(other, subs)],
        "a re-created session got back the subscriptions of the deleted one"
    );
    factory.close(storage).await;
}
