//! The subscription trie: which sessions' filters match a topic name.
//!
//! One node per topic level; `+` is an ordinary child named `+`, and `#`
//! subscribers hang on the node of the level before it, because `a/#` also
//! matches `a`. Matching walks at most two children per level (the literal one
//! and `+`), so lookups cost O(levels x matching branches), not O(subscriptions).

use std::collections::HashMap;
use std::hash::Hash;

/// Topic filters of many subscribers, each filter held at most once per key.
///
/// ```
/// use broker_core::trie::SubscriptionTree;
/// let mut t = SubscriptionTree::new();
/// t.insert("a/+/c", "alice", 1);
/// t.insert("a/#", "bob", 2);
/// t.insert("#", "carol", 0);
/// let mut hits = vec![];
/// t.matches("a/b/c", |k, v| hits.push((*k, *v)));
/// hits.sort();
/// assert_eq!(hits, vec![("alice", 1), ("bob", 2), ("carol", 0)]);
/// ```
#[derive(Debug)]
pub struct SubscriptionTree<K, V> {
    root: Node<K, V>,
    len: usize,
}

#[derive(Debug)]
struct Node<K, V> {
    children: HashMap<Box<str>, Node<K, V>>,
    /// Filters ending exactly at this level.
    here: HashMap<K, V>,
    /// Filters ending with `#` after this level.
    multi: HashMap<K, V>,
}

impl<K, V> Default for Node<K, V> {
    fn default() -> Self {
        Node {
            children: HashMap::new(),
            here: HashMap::new(),
            multi: HashMap::new(),
        }
    }
}

impl<K, V> Node<K, V> {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.here.is_empty() && self.multi.is_empty()
    }
}

impl<K: Hash + Eq + Clone, V> Default for SubscriptionTree<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Hash + Eq + Clone, V> SubscriptionTree<K, V> {
    /// An empty tree.
    pub fn new() -> Self {
        SubscriptionTree {
            root: Node::default(),
            len: 0,
        }
    }

    /// Number of (filter, key) pairs.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no filter is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Add or replace `key`'s subscription to a valid `filter`; returns the previous value.
    pub fn insert(&mut self, filter: &str, key: K, value: V) -> Option<V> {
        let mut node = &mut self.root;
        let mut levels = filter.split('/').peekable();
        let mut multi = false;
        while let Some(level) = levels.next() {
            if level == "#" && levels.peek().is_none() {
                multi = true;
                break;
            }
            node = node.children.entry(level.into()).or_default();
        }
        let old = if multi {
            node.multi.insert(key, value)
        } else {
            node.here.insert(key, value)
        };
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Remove `key`'s subscription to `filter`; returns its value.
    pub fn remove(&mut self, filter: &str, key: &K) -> Option<V> {
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = Self::remove_at(&mut self.root, &levels, key);
        if removed.is_some() {
            self.len -= 1;
        }
        removed
    }

    fn remove_at(node: &mut Node<K, V>, levels: &[&str], key: &K) -> Option<V> {
        match levels {
            [] => node.here.remove(key),
            ["#"] => node.multi.remove(key),
            [first, rest @ ..] => {
                let child = node.children.get_mut(*first)?;
                let removed = Self::remove_at(child, rest, key);
                if child.is_empty() {
                    node.children.remove(*first);
                }
                removed
            }
        }
    }

    /// Call `f` for every (key, value) subscribed with exactly `filter`.
    pub fn subscribers(&self, filter: &str, mut f: impl FnMut(&K, &V)) {
        let mut node = &self.root;
        let mut levels = filter.split('/').peekable();
        while let Some(level) = levels.next() {
            if level == "#" && levels.peek().is_none() {
                node.multi.iter().for_each(|(k, v)| f(k, v));
                return;
            }
            match node.children.get(level) {
                Some(child) => node = child,
                None => return,
            }
        }
        node.here.iter().for_each(|(k, v)| f(k, v));
    }

    /// Call `f` for every (key, value) whose filter matches the topic name.
    /// A key subscribed with several matching filters is reported once per filter.
    pub fn matches(&self, name: &str, mut f: impl FnMut(&K, &V)) {
        let levels: Vec<&str> = name.split('/').collect();
        // Wildcards at the first level never match `$` topics.
        let dollar = name.starts_with('$');
        Self::walk(&self.root, &levels, !dollar, &mut f);
    }

    fn walk(node: &Node<K, V>, levels: &[&str], wildcards: bool, f: &mut impl FnMut(&K, &V)) {
        if wildcards {
            node.multi.iter().for_each(|(k, v)| f(k, v));
        }
        match levels {
            [] => node.here.iter().for_each(|(k, v)| f(k, v)),
            [first, rest @ ..] => {
                if let Some(child) = node.children.get(*first) {
                    Self::walk(child, rest, true, f);
                }
                if wildcards {
                    if let Some(child) = node.children.get("+") {
                        Self::walk(child, rest, true, f);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::matches;
    use proptest::prelude::*;

    fn hits(t: &SubscriptionTree<u32, ()>, name: &str) -> Vec<u32> {
        let mut v = vec![];
        t.matches(name, |k, _| v.push(*k));
        v.sort();
        v
    }

    #[test]
    fn dollar_topics_and_parent_of_hash() {
        let mut t = SubscriptionTree::new();
        t.insert("#", 1, ());
        t.insert("+/x", 2, ());
        t.insert("$SYS/#", 3, ());
        t.insert("a/#", 4, ());
        assert_eq!(hits(&t, "$SYS/x"), vec![3]);
        assert_eq!(hits(&t, "a"), vec![1, 4]);
        assert_eq!(hits(&t, "a/x"), vec![1, 2, 4]);
    }

    #[test]
    fn remove_prunes_and_counts() {
        let mut t = SubscriptionTree::new();
        assert!(t.insert("a/b", 1, ()).is_none());
        assert!(t.insert("a/b", 1, ()).is_some());
        assert_eq!(t.len(), 1);
        assert!(t.remove("a/b", &1).is_some());
        assert!(t.remove("a/b", &1).is_none());
        assert!(t.is_empty());
        assert!(t.root.is_empty());
    }

    proptest! {
        /// The trie agrees with the reference matcher on random filters and names.
        #[test]
        fn agrees_with_matches(
            filters in proptest::collection::vec("(\\$?[ab+]|#)(/([ab+]|#))*", 1..20),
            name in "\\$?[ab](/[ab]){0,4}",
        ) {
            let filters: Vec<String> = filters
                .into_iter()
                .filter(|f| crate::topic::validate_filter(f).is_ok())
                .collect();
            let mut t = SubscriptionTree::new();
            for (i, f) in filters.iter().enumerate() {
                t.insert(f, i as u32, ());
            }
            let expected: Vec<u32> = filters
                .iter()
                .enumerate()
                .filter(|(_, f)| matches(f, &name))
                .map(|(i, _)| i as u32)
                .collect();
            prop_assert_eq!(hits(&t, &name), expected);
        }
    }
}
