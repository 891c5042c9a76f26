//! A map for the broker's many small sets: the subscribers of one filter in
//! the trie, the subscriptions of one session. Most hold one entry (a
//! device and its own topic), and a hash map takes 48 bytes inline and a
//! four-bucket table, about 200 to 300 bytes, for its first entry. This one
//! is a vector of exactly its entries while it holds at most [`FEW`], and a
//! boxed hash map past that, so a big set still changes in O(1).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;

/// Entries past which the map is a hash map.
pub(crate) const FEW: usize = 8;

/// See the module's documentation.
#[derive(Debug, Clone)]
pub(crate) enum SmallMap<K, V> {
    /// At most [`FEW`] entries, searched in order.
    Few(Vec<(K, V)>),
    /// More. Boxed so that the map is 24 bytes inline, not 48: the extra
    /// allocation is paid only by maps past [`FEW`].
    #[allow(clippy::box_collection)]
    Many(Box<HashMap<K, V>>),
}

impl<K, V> Default for SmallMap<K, V> {
    fn default() -> Self {
        SmallMap::Few(Vec::new())
    }
}

impl<K: Hash + Eq, V> SmallMap<K, V> {
    /// Number of entries.
    pub(crate) fn len(&self) -> usize {
        match self {
            SmallMap::Few(v) => v.len(),
            SmallMap::Many(m) => m.len(),
        }
    }

    /// True without entries.
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The value of `key`.
    pub(crate) fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self {
            SmallMap::Few(v) => v.iter().find(|(k, _)| k.borrow() == key).map(|(_, v)| v),
            SmallMap::Many(m) => m.get(key),
        }
    }

    /// Whether `key` is in the map.
    pub(crate) fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get(key).is_some()
    }

    /// Insert or replace; returns the value replaced.
    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        let few = match self {
            SmallMap::Many(m) => return m.insert(key, value),
            SmallMap::Few(v) => v,
        };
        if let Some((_, old)) = few.iter_mut().find(|(k, _)| *k == key) {
            return Some(std::mem::replace(old, value));
        }
        if few.len() < FEW {
            // One slot at a time: `push` would allocate four at first.
            few.reserve_exact(1);
            few.push((key, value));
            return None;
        }
        let mut many: HashMap<K, V> = std::mem::take(few).into_iter().collect();
        many.insert(key, value);
        *self = SmallMap::Many(Box::new(many));
        None
    }

    /// Remove `key`; returns its value.
    pub(crate) fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self {
            SmallMap::Many(m) => m.remove(key),
            SmallMap::Few(v) => {
                let i = v.iter().position(|(k, _)| k.borrow() == key)?;
                let (_, value) = v.swap_remove(i);
                if v.is_empty() {
                    // Give the allocation back with the last entry.
                    *v = Vec::new();
                }
                Some(value)
            }
        }
    }

    /// Every entry, in no particular order.
    pub(crate) fn iter(&self) -> Iter<'_, K, V> {
        match self {
            SmallMap::Few(v) => Iter::Few(v.iter()),
            SmallMap::Many(m) => Iter::Many(m.iter()),
        }
    }

    /// Every key, in no particular order.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &K> {
        self.iter().map(|(k, _)| k)
    }

    /// Remove everything, and the allocation with it.
    pub(crate) fn clear(&mut self) {
        *self = SmallMap::default();
    }
}

/// The entries of a [`SmallMap`].
pub(crate) enum Iter<'a, K, V> {
    Few(std::slice::Iter<'a, (K, V)>),
    Many(std::collections::hash_map::Iter<'a, K, V>),
}

impl<'a, K, V> Iterator for Iter<'a, K, V> {
    type Item = (&'a K, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Iter::Few(i) => i.next().map(|(k, v)| (k, v)),
            Iter::Many(i) => i.next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(m: &SmallMap<String, u32>) -> Vec<String> {
        let mut k: Vec<String> = m.keys().cloned().collect();
        k.sort();
        k
    }

    #[test]
    fn few_then_many_with_the_same_answers() {
        let mut m = SmallMap::default();
        for i in 0..20u32 {
            assert_eq!(m.insert(format!("k{i:02}"), i), None);
            assert_eq!(m.len(), i as usize + 1);
            assert!(
                matches!(m, SmallMap::Many(_)) == (i as usize >= FEW),
                "a vector up to FEW entries, a map past"
            );
        }
        assert_eq!(
            m.insert("k03".into(), 300),
            Some(3),
            "a key replaces its value"
        );
        assert_eq!(m.get("k03"), Some(&300));
        assert!(m.contains_key("k19") && !m.contains_key("k20"));
        for i in (0..20u32).step_by(2) {
            assert_eq!(m.remove(format!("k{i:02}").as_str()), Some(i));
        }
        assert_eq!(m.remove("k00"), None);
        assert_eq!(m.len(), 10);
        assert_eq!(keys(&m).first().map(String::as_str), Some("k01"));
        m.clear();
        assert!(m.is_empty() && matches!(m, SmallMap::Few(ref v) if v.capacity() == 0));
    }

    #[test]
    fn a_vector_holds_exactly_its_entries() {
        let mut m = SmallMap::default();
        m.insert("a".to_string(), 1u32);
        assert!(matches!(m, SmallMap::Few(ref v) if v.capacity() == 1));
        m.insert("b".to_string(), 2);
        assert_eq!(m.remove("a"), Some(1));
        assert_eq!(
            m.iter().map(|(k, v)| (k.as_str(), *v)).collect::<Vec<_>>(),
            [("b", 2)]
        );
        assert_eq!(m.remove("b"), Some(2));
        assert!(
            matches!(m, SmallMap::Few(ref v) if v.capacity() == 0),
            "the last entry gives the memory back"
        );
    }
}
