//! The subscription trie: which sessions' filters match a topic name.
//!
//! One node per topic level; `+` is an ordinary child named `+`, and `#`
//! subscribers hang on the node of the level before it, because `a/#` also
//! matches `a`. Matching walks at most two children per level (the literal one
//! and `+`), so lookups cost O(levels x matching branches), not O(subscriptions).

use std::collections::HashMap;
use std::hash::Hash;

use crate::small_map::SmallMap;

/// Topic filters of many subscribers, each filter held at most once per key.
///
/// No operation recurses on the number of levels: insert, remove, match and
/// drop walk with loops and explicit stacks, so a filter of any depth a client
/// can send costs heap, never stack (a deep filter once overflowed the stack
/// of a worker thread and aborted the process).
///
/// ```
/// use broker_core::internals::trie::SubscriptionTree;
/// let mut t = SubscriptionTree::new();
/// t.insert("a/+/c", "alice", 1);
/// t.insert("a/#", "bob", 2);
/// t.insert("#", "carol", 0);
/// let mut hits = vec![];
/// t.matches("a/b/c", |k, v| hits.push((*k, *v)));
/// hits.sort();
/// assert_eq!(hits, vec![("alice", 1), ("bob", 2), ("carol", 0)]);
/// ```
pub struct SubscriptionTree<K, V> {
    root: Node<K, V>,
    len: usize,
}

impl<K, V> std::fmt::Debug for SubscriptionTree<K, V> {
    // Not derived: a derived `Debug` would recurse on depth.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriptionTree")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// One level. 32 bytes: a device's own topic is a leaf holding one
/// subscriber, and every leaf sits in its parent's hash table, so what a
/// leaf does not need (children, `#` subscribers) is in a box it does not
/// have. (Children and `multi` inline made a node 96 bytes, and a bucket of
/// the parent's table 112: about 150 bytes per device with 100,000 of them.)
struct Node<K, V> {
    /// Filters ending exactly at this level (most hold one key: a small map).
    here: SmallMap<K, V>,
    /// `None` while the node has no child and no `#` subscriber.
    branch: Option<Box<Branch<K, V>>>,
}

/// What an inner node holds beside its own filters.
struct Branch<K, V> {
    children: HashMap<Box<str>, Node<K, V>>,
    /// Filters ending with `#` after this level.
    multi: SmallMap<K, V>,
}

impl<K, V> Default for Node<K, V> {
    fn default() -> Self {
        Node {
            here: SmallMap::default(),
            branch: None,
        }
    }
}

impl<K, V> Drop for Node<K, V> {
    /// Drops the subtree with a loop: the compiler's drop glue would recurse
    /// once per level. Each node popped here has no children left when it is
    /// dropped, so this `drop` never re-enters itself deeper than one level.
    fn drop(&mut self) {
        let Some(branch) = self.branch.as_mut() else {
            return;
        };
        let mut stack: Vec<Node<K, V>> = branch.children.drain().map(|(_, n)| n).collect();
        while let Some(mut node) = stack.pop() {
            if let Some(b) = node.branch.as_mut() {
                stack.extend(b.children.drain().map(|(_, n)| n));
            }
        }
    }
}

impl<K: Hash + Eq, V> Node<K, V> {
    fn child(&self, level: &str) -> Option<&Node<K, V>> {
        self.branch.as_ref()?.children.get(level)
    }

    fn child_mut(&mut self, level: &str) -> Option<&mut Node<K, V>> {
        self.branch.as_mut()?.children.get_mut(level)
    }

    fn child_or_new(&mut self, level: &str) -> &mut Node<K, V> {
        self.branch_or_new()
            .children
            .entry(level.into())
            .or_default()
    }

    fn branch_or_new(&mut self) -> &mut Branch<K, V> {
        self.branch.get_or_insert_with(|| {
            Box::new(Branch {
                children: HashMap::new(),
                multi: SmallMap::default(),
            })
        })
    }

    fn children_len(&self) -> usize {
        self.branch.as_ref().map_or(0, |b| b.children.len())
    }

    fn multi(&self) -> Option<&SmallMap<K, V>> {
        self.branch.as_ref().map(|b| &b.multi)
    }

    /// Remove `key` from `multi`; the branch goes once it holds nothing.
    fn remove_multi(&mut self, key: &K) -> Option<V> {
        let removed = self.branch.as_mut()?.multi.remove(key);
        self.drop_empty_branch();
        removed
    }

    /// Remove the child `level`; the branch goes once it holds nothing.
    fn remove_child(&mut self, level: &str) {
        if let Some(b) = self.branch.as_mut() {
            b.children.remove(level);
        }
        self.drop_empty_branch();
    }

    fn drop_empty_branch(&mut self) {
        if self
            .branch
            .as_ref()
            .is_some_and(|b| b.children.is_empty() && b.multi.is_empty())
        {
            self.branch = None;
        }
    }

    fn is_empty(&self) -> bool {
        self.here.is_empty() && self.branch.is_none()
    }

    /// Whether the node must stay when its child `via` goes: it holds a
    /// filter or another child.
    fn holds_more_than(&self, via: usize) -> bool {
        !self.here.is_empty()
            || self.multi().is_some_and(|m| !m.is_empty())
            || self.children_len() > via
    }
}

/// The levels a filter's subscribers hang under, and whether it ends in `#`
/// (then they hang on the node before it, in `multi`).
fn split_filter(filter: &str) -> (Vec<&str>, bool) {
    let mut levels: Vec<&str> = filter.split('/').collect();
    let multi = levels.last() == Some(&"#");
    if multi {
        levels.pop();
    }
    (levels, multi)
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
    #[cfg_attr(not(feature = "testkit"), allow(dead_code))]
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no filter is held.
    #[cfg_attr(not(feature = "testkit"), allow(dead_code))]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Add or replace `key`'s subscription to a valid `filter`; returns the previous value.
    pub fn insert(&mut self, filter: &str, key: K, value: V) -> Option<V> {
        let (levels, multi) = split_filter(filter);
        let mut node = &mut self.root;
        for level in levels {
            node = node.child_or_new(level);
        }
        let old = if multi {
            node.branch_or_new().multi.insert(key, value)
        } else {
            node.here.insert(key, value)
        };
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Remove `key`'s subscription to `filter`; returns its value. Nodes left
    /// empty are pruned, so the tree's size follows the filters it holds.
    pub fn remove(&mut self, filter: &str, key: &K) -> Option<V> {
        let (levels, multi) = split_filter(filter);
        // Walk down, remembering the deepest node that must stay whatever
        // happens below it: if the target ends up empty, the chain of nodes
        // under that one (along the path) holds nothing else and goes.
        let mut cut = 0;
        let mut node = &mut self.root;
        for (depth, level) in levels.iter().enumerate() {
            if depth == 0 || node.holds_more_than(1) {
                cut = depth;
            }
            node = node.child_mut(level)?;
        }
        let removed = if multi {
            node.remove_multi(key)
        } else {
            node.here.remove(key)
        }?;
        self.len -= 1;
        if node.is_empty() && !levels.is_empty() {
            let mut parent = &mut self.root;
            for level in &levels[..cut] {
                match parent.child_mut(level) {
                    Some(child) => parent = child,
                    None => return Some(removed),
                }
            }
            parent.remove_child(levels[cut]);
        }
        Some(removed)
    }

    /// Call `f` for every (key, value) subscribed with exactly `filter`.
    pub fn subscribers(&self, filter: &str, mut f: impl FnMut(&K, &V)) {
        let (levels, multi) = split_filter(filter);
        let mut node = &self.root;
        for level in levels {
            match node.child(level) {
                Some(child) => node = child,
                None => return,
            }
        }
        let held = if multi {
            node.multi()
        } else {
            Some(&node.here)
        };
        if let Some(held) = held {
            held.iter().for_each(|(k, v)| f(k, v));
        }
    }

    /// Call `f` for every (key, value) whose filter matches the topic name.
    /// A key subscribed with several matching filters is reported once per filter.
    pub fn matches(&self, name: &str, mut f: impl FnMut(&K, &V)) {
        let levels: Vec<&str> = name.split('/').collect();
        // Wildcards at the first level never match `$` topics.
        let dollar = name.starts_with('$');
        // (node, levels consumed, wildcards allowed here). At most two
        // branches per level (the literal child and `+`), kept on the heap.
        let mut stack = vec![(&self.root, 0usize, !dollar)];
        while let Some((node, depth, wildcards)) = stack.pop() {
            if wildcards {
                if let Some(multi) = node.multi() {
                    multi.iter().for_each(|(k, v)| f(k, v));
                }
            }
            let Some(level) = levels.get(depth) else {
                node.here.iter().for_each(|(k, v)| f(k, v));
                continue;
            };
            if wildcards {
                if let Some(child) = node.child("+") {
                    stack.push((child, depth + 1, true));
                }
            }
            if let Some(child) = node.child(level) {
                stack.push((child, depth + 1, true));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::matches;
    use proptest::prelude::*;

    fn hits<V>(t: &SubscriptionTree<u32, V>, name: &str) -> Vec<u32> {
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

    /// Far deeper than any limit, on a test thread's small stack: nothing
    /// here may recurse on depth.
    #[test]
    fn deep_filters_cost_no_stack() {
        let deep = |n: usize, last: &str| {
            let mut s = "a/".repeat(n);
            s.push_str(last);
            s
        };
        let mut t = SubscriptionTree::new();
        t.insert(&deep(200_000, "#"), 1, ());
        t.insert(&deep(200_000, "b"), 2, ());
        t.insert(&deep(100_000, "+"), 3, ());
        assert_eq!(hits(&t, &deep(200_000, "b")), vec![1, 2]);
        assert_eq!(hits(&t, &deep(100_000, "z")), vec![3]);
        assert_eq!(hits(&t, &deep(200_001, "z")), vec![1]);
        let mut exact = vec![];
        t.subscribers(&deep(200_000, "b"), |k, _| exact.push(*k));
        assert_eq!(exact, vec![2]);
        assert!(t.remove(&deep(200_000, "b"), &2).is_some());
        assert_eq!(hits(&t, &deep(200_000, "b")), vec![1]);
        drop(t);
    }

    #[test]
    fn remove_prunes_only_the_empty_chain() {
        let mut t = SubscriptionTree::new();
        t.insert("a/b/c/d", 1, ());
        t.insert("a/b", 2, ());
        t.insert("a/x/#", 3, ());
        assert!(t.remove("a/b/c/d", &1).is_some());
        let b = t.root.child("a").and_then(|a| a.child("b")).unwrap();
        assert!(
            b.branch.is_none(),
            "the empty chain under a/b is gone, and its branch with it"
        );
        assert_eq!(hits(&t, "a/b"), vec![2]);
        assert!(t.remove("a/x/#", &3).is_some());
        assert_eq!(t.root.child("a").unwrap().children_len(), 1);
        assert!(t.remove("a/b", &2).is_some());
        assert!(t.root.is_empty());
    }

    #[test]
    fn a_leaf_is_small_and_a_hash_wildcard_gets_a_branch() {
        assert_eq!(std::mem::size_of::<Node<String, u64>>(), 32);
        let mut t = SubscriptionTree::new();
        t.insert("d/1", 1u32, ());
        t.insert("d/#", 2, ());
        let d = t.root.child("d").unwrap();
        assert!(
            d.child("1").unwrap().branch.is_none(),
            "a leaf has no branch"
        );
        assert_eq!(hits(&t, "d/1"), vec![1, 2]);
        assert!(t.remove("d/#", &2).is_some());
        assert_eq!(t.root.child("d").unwrap().children_len(), 1);
        assert!(t.remove("d/1", &1).is_some());
        assert!(
            t.root.is_empty(),
            "every branch pruned with its last filter"
        );
    }

    #[test]
    fn many_keys_on_one_filter_move_to_a_map_and_stay_right() {
        let mut t = SubscriptionTree::new();
        for k in 0..20u32 {
            assert!(t.insert("a/b", k, k).is_none());
        }
        assert_eq!(t.insert("a/b", 3, 300), Some(3), "a key replaces its value");
        assert!(matches!(
            t.root.child("a").and_then(|a| a.child("b")).unwrap().here,
            SmallMap::Many(_)
        ));
        for k in (0..20u32).step_by(2) {
            assert_eq!(t.remove("a/b", &k), Some(k));
        }
        assert_eq!(hits(&t, "a/b"), (1..20).step_by(2).collect::<Vec<u32>>());
        let mut three = None;
        t.subscribers("a/b", |k, v| {
            if *k == 3 {
                three = Some(*v);
            }
        });
        assert_eq!(three, Some(300));
        for k in (1..20u32).step_by(2) {
            assert!(t.remove("a/b", &k).is_some());
        }
        assert!(t.is_empty() && t.root.is_empty());

        // Few: a key is found, replaced and removed among others.
        let mut t = SubscriptionTree::new();
        for k in 0..5u32 {
            t.insert("x", k, k);
        }
        assert_eq!(t.insert("x", 2, 20), Some(2));
        assert_eq!(t.remove("x", &0), Some(0));
        assert_eq!(t.remove("x", &0), None);
        assert_eq!(hits(&t, "x"), vec![1, 2, 3, 4]);
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
            for (i, f) in filters.iter().enumerate() {
                t.remove(f, &(i as u32));
            }
            prop_assert!(t.is_empty() && t.root.is_empty(), "removing every filter leaves an empty tree");
        }
    }
}
