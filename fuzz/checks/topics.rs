//! Topic validation and the subscription trie against the reference matcher
//! (`topic::matches` over a plain list). Checked: no panic (deep topics
//! included: thousands of levels), and every `insert`, `remove`, `matches`,
//! `subscribers` and `len` agrees with the list.
//!
//! Input: a sequence of operations, each an opcode byte then a topic: a
//! length byte and that many token bytes, each token one level from a small
//! alphabet (so that filters and names collide), repeated up to 2^14 times
//! when the opcode's high bit is set.

use std::collections::BTreeMap;

use broker_core::internals::trie::SubscriptionTree;
use broker_core::topic::{matches, validate_filter, validate_name};

const TOKENS: [&str; 12] = [
    "a", "b", "+", "#", "", "$s", "c", "a+", "#b", "\u{0}", "é", "$share",
];

/// The next topic of the input, or `None` at its end.
fn topic(input: &mut &[u8], deep: bool) -> Option<String> {
    let (&len, rest) = input.split_first()?;
    let n = usize::from(len % 16).min(rest.len());
    let (tokens, rest) = rest.split_at(n);
    *input = rest;
    let mut levels: Vec<&str> = tokens
        .iter()
        .map(|t| TOKENS[usize::from(*t) % TOKENS.len()])
        .collect();
    if deep {
        // The repeat count comes from the next two bytes; a topic stays
        // within the 65,535 bytes MQTT allows.
        let times = match input {
            [hi, lo, rest @ ..] => {
                *input = rest;
                usize::from(u16::from_be_bytes([*hi, *lo]) & 0x3fff)
            }
            _ => 1,
        };
        let pattern = levels.clone();
        for _ in 1..times {
            if levels.len() + pattern.len() > 20_000 {
                break;
            }
            levels.extend(&pattern);
        }
    }
    let t = levels.join("/");
    (t.len() <= 65_535).then_some(t)
}

pub fn check(data: &[u8]) {
    let mut input = data;
    let mut tree: SubscriptionTree<u8, u32> = SubscriptionTree::new();
    // The reference: every (filter, key) with its value.
    let mut model: BTreeMap<(String, u8), u32> = BTreeMap::new();
    let mut serial = 0u32;
    // Deep topics cost the reference matcher a pass each over every filter:
    // a few per input keep one run well under a second.
    let mut deep_left = 3;
    while let Some((&op, rest)) = input.split_first() {
        input = rest;
        let deep = op & 0x80 != 0 && deep_left > 0;
        deep_left -= usize::from(deep);
        let Some(t) = topic(&mut input, deep) else {
            break;
        };
        let key = (op >> 3) & 0x3;
        serial += 1;
        check_rules(&t);
        match op & 0x7 {
            0..=2 => {
                if validate_filter(&t).is_ok() {
                    let old = tree.insert(&t, key, serial);
                    assert_eq!(old, model.insert((t.clone(), key), serial), "insert {t:?}");
                }
            }
            3 | 4 => {
                let removed = tree.remove(&t, &key);
                assert_eq!(removed, model.remove(&(t.clone(), key)), "remove {t:?}");
            }
            5 | 6 => {
                if validate_name(&t).is_ok() {
                    let mut got = Vec::new();
                    tree.matches(&t, |k, v| got.push((*k, *v)));
                    got.sort_unstable();
                    let mut want: Vec<(u8, u32)> = model
                        .iter()
                        .filter(|((f, _), _)| matches(f, &t))
                        .map(|((_, k), v)| (*k, *v))
                        .collect();
                    want.sort_unstable();
                    assert_eq!(got, want, "matches {t:?}");
                }
            }
            _ => {
                let mut got = Vec::new();
                tree.subscribers(&t, |k, v| got.push((*k, *v)));
                got.sort_unstable();
                let want: Vec<(u8, u32)> = model
                    .iter()
                    .filter(|((f, _), _)| *f == t)
                    .map(|((_, k), v)| (*k, *v))
                    .collect();
                assert_eq!(got, want, "subscribers {t:?}");
            }
        }
        assert_eq!(tree.len(), model.len());
        assert_eq!(tree.is_empty(), model.is_empty());
    }
    // Dropping a tree with deep filters must not recurse either.
    drop(tree);
}

/// Rules that tie names, filters and matching together.
fn check_rules(t: &str) {
    if validate_name(t).is_ok() {
        assert!(
            validate_filter(t).is_ok(),
            "a valid name is a valid filter: {t:?}"
        );
        assert!(matches(t, t), "a name matches itself as a filter: {t:?}");
        assert_eq!(matches("#", t), !t.starts_with('$'), "`#` and {t:?}");
    }
    if t.is_empty() || t.contains('\0') {
        assert!(validate_name(t).is_err() && validate_filter(t).is_err());
    }
}
