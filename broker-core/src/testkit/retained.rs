//! Cases for [`RetainedStore`](crate::storage::RetainedStore).

use std::sync::Arc;

use super::support::{msg, ok, rich_messages};
use super::StoreFactory;
use crate::message::Message;
use crate::storage::Storage;
use crate::topic::matches;

/// Topics of [`retained_wildcards`]: prefixes of each other, empty levels,
/// `$` topics, and characters a prefix scan or `LIKE` pattern may mistreat.
const TOPICS: [&str; 16] = [
    "a",
    "a/",
    "a/b",
    "a/b/c",
    "a/b/c/d",
    "a/bc",
    "ab",
    "a%b",
    "a_b",
    "/a",
    "a//b",
    "b/b",
    "$SYS/uptime",
    "$SYS/broker/clients",
    "$other",
    "sensors/ä/temp",
];

async fn lookup(storage: &Storage, filter: &str) -> Vec<Arc<Message>> {
    let mut found = ok(
        storage.retained.lookup_retained(filter).await,
        "lookup_retained",
    );
    found.sort_by(|x, y| x.topic.cmp(&y.topic));
    found
}

fn topics(found: &[Arc<Message>]) -> Vec<&str> {
    found.iter().map(|m| m.topic.as_str()).collect()
}

fn sorted_strs(mut v: Vec<&str>) -> Vec<&str> {
    v.sort_unstable();
    v
}

/// Retained messages are one per topic: set, replace (only the new one is
/// found), delete (gone; deleting again or deleting an unknown topic is not
/// an error), and deleting a topic leaves topics it is a prefix of.
pub async fn retained_set_replace_delete<F: StoreFactory + ?Sized>(factory: &F) {
    let storage = factory.open().await;
    let first = msg(1, "r/a", "first");
    let second = msg(2, "r/a", "second");
    let child = msg(3, "r/a/b", "child");
    let sibling = msg(4, "r/ab", "sibling");

    ok(
        storage.retained.set_retained(first.clone()).await,
        "set_retained",
    );
    assert_eq!(lookup(&storage, "r/a").await, vec![first], "after set");

    ok(
        storage.retained.set_retained(second.clone()).await,
        "set_retained",
    );
    assert_eq!(
        lookup(&storage, "r/a").await,
        vec![second.clone()],
        "after replace"
    );
    assert_eq!(
        lookup(&storage, "#").await.len(),
        1,
        "replace kept the old message"
    );

    for m in [&child, &sibling] {
        ok(
            storage.retained.set_retained(m.clone()).await,
            "set_retained",
        );
    }
    ok(
        storage.retained.delete_retained("r/a").await,
        "delete_retained",
    );
    assert!(lookup(&storage, "r/a").await.is_empty(), "after delete");
    assert_eq!(
        lookup(&storage, "#").await,
        vec![child.clone(), sibling.clone()],
        "deleting r/a touched r/a/b or r/ab"
    );

    ok(
        storage.retained.delete_retained("r/a").await,
        "delete_retained twice",
    );
    ok(
        storage.retained.delete_retained("r/zzz").await,
        "delete_retained unknown",
    );
    ok(
        storage.retained.delete_retained("r/+").await,
        "delete_retained with a filter-like topic",
    );
    assert_eq!(
        lookup(&storage, "#").await,
        vec![child, sibling],
        "deleting unknown topics changed something"
    );

    ok(
        storage.retained.set_retained(second.clone()).await,
        "set_retained after delete",
    );
    assert_eq!(
        lookup(&storage, "r/a").await,
        vec![second],
        "set after delete"
    );
    factory.close(storage).await;
}

/// Wildcard and exact lookups over look-alike topics: `+` and `#` at any
/// level, `a/#` matching `a` itself, `#` and `+/...` never matching `$`
/// topics while `$SYS/#` does, empty levels, no prefix leaks (`a/b/#` does
/// not find `a/bc`), each match returned once with its full body.
pub async fn retained_wildcards<F: StoreFactory + ?Sized>(factory: &F) {
    let storage = factory.open().await;
    let messages: Vec<Arc<Message>> = TOPICS
        .iter()
        .enumerate()
        .map(|(i, t)| msg(i as u64 + 1, t, format!("retained {t}")))
        .collect();
    for m in &messages {
        ok(
            storage.retained.set_retained(m.clone()).await,
            "set_retained",
        );
    }

    // Hand-written expectations for the cases that matter most.
    let non_dollar: Vec<&str> = TOPICS
        .iter()
        .copied()
        .filter(|t| !t.starts_with('$'))
        .collect();
    let cases: [(&str, Vec<&str>); 14] = [
        ("#", non_dollar.clone()),
        ("+/#", non_dollar),
        ("$SYS/#", vec!["$SYS/broker/clients", "$SYS/uptime"]),
        ("$SYS/+", vec!["$SYS/uptime"]),
        ("+/uptime", vec![]),
        ("+", vec!["a", "a%b", "a_b", "ab"]),
        (
            "a/#",
            vec!["a", "a/", "a//b", "a/b", "a/b/c", "a/b/c/d", "a/bc"],
        ),
        ("a/+", vec!["a/", "a/b", "a/bc"]),
        ("a/b/#", vec!["a/b", "a/b/c", "a/b/c/d"]),
        ("a/b", vec!["a/b"]),
        ("a/+/b", vec!["a//b"]),
        ("+/+", vec!["/a", "a/", "a/b", "a/bc", "b/b"]),
        ("$other", vec!["$other"]),
        ("nothing/#", vec![]),
    ];
    for (filter, want) in cases {
        let found = lookup(&storage, filter).await;
        assert_eq!(
            topics(&found),
            sorted_strs(want),
            "lookup_retained({filter:?})"
        );
    }

    // Every filter agrees with `topic::matches`, bodies included.
    for filter in [
        "#",
        "+",
        "a",
        "a/",
        "a/#",
        "a/+",
        "+/b",
        "+/+/+",
        "a/+/c/#",
        "/#",
        "/+",
        "+/",
        "a%b",
        "a_b",
        "a/b/c/d",
        "a/b/c/d/#",
        "sensors/+/temp",
        "sensors/#",
        "$SYS/broker/#",
        "$SYS",
    ] {
        let found = lookup(&storage, filter).await;
        let want: Vec<&Arc<Message>> = messages
            .iter()
            .filter(|m| matches(filter, &m.topic))
            .collect();
        assert_eq!(
            topics(&found),
            sorted_strs(want.iter().map(|m| m.topic.as_str()).collect()),
            "lookup_retained({filter:?}) disagrees with topic::matches (or returned a topic twice)"
        );
        for m in &found {
            let original = messages
                .iter()
                .find(|o| o.topic == m.topic)
                .expect("a found topic was stored");
            assert_eq!(**m, **original, "body of retained {:?}", m.topic);
        }
    }
    factory.close(storage).await;
}

/// Every field of a message, MQTT 5 properties included, survives the
/// retained store (exact and wildcard lookup).
pub async fn retained_properties_round_trip<F: StoreFactory + ?Sized>(factory: &F) {
    let storage = factory.open().await;
    let messages = rich_messages(1);
    for m in &messages {
        ok(
            storage.retained.set_retained(m.clone()).await,
            "set_retained",
        );
    }
    for m in &messages {
        let found = lookup(&storage, &m.topic).await;
        assert_eq!(found.len(), 1, "exact lookup of {:?}", m.topic);
        assert_eq!(
            found[0].properties, m.properties,
            "properties of retained {:?}",
            m.topic
        );
        assert_eq!(
            *found[0], **m,
            "retained {:?} changed through the store",
            m.topic
        );
    }
    let mut want = messages.clone();
    want.sort_by(|x, y| x.topic.cmp(&y.topic));
    assert_eq!(
        lookup(&storage, "props/#").await,
        want,
        "wildcard lookup of rich messages"
    );
    factory.close(storage).await;
}
