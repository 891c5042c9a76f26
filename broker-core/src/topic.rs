//! Topic names and topic filters: validation and matching.
//!
//! Rules (MQTT 3.1.1 section 4.7, MQTT 5 section 4.7): names and filters are
//! non-empty UTF-8 without U+0000; names contain no wildcard; in a filter `+`
//! fills a whole level and `#` is a whole last level; filters starting with a
//! wildcard do not match names starting with `$`.

/// Why a topic name or filter was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Zero-length name or filter.
    #[error("topic is empty")]
    Empty,
    /// Longer than 65,535 bytes.
    #[error("topic is longer than 65535 bytes")]
    TooLong,
    /// Contains U+0000.
    #[error("topic contains a null character")]
    NullCharacter,
    /// A topic name containing `+` or `#`.
    #[error("topic name contains a wildcard")]
    WildcardInName,
    /// A filter with `+` or `#` not filling a whole level, or `#` not last.
    #[error("topic filter has a misplaced wildcard")]
    BadWildcard,
    /// More levels than the broker allows (`max_topic_levels`).
    #[error("topic has more than {max} levels")]
    TooManyLevels {
        /// The limit.
        max: usize,
    },
    /// A `$share/` filter without a valid share name and filter after it.
    #[error("shared subscription must be `$share/{{name}}/{{filter}}` with a name free of `/`, `+` and `#`")]
    BadShare,
}

/// The parts of a shared subscription filter, `$share/{group}/{filter}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedFilter<'a> {
    /// The share name.
    pub group: &'a str,
    /// The topic filter messages are matched against.
    pub filter: &'a str,
}

/// Split a subscription filter into its shared parts: `Ok(None)` for an
/// ordinary filter, an error for a malformed `$share/` one (MQTT 5 section 4.8.2).
/// The inner filter is not validated here.
///
/// ```
/// use broker_core::topic::{parse_shared, SharedFilter};
/// assert_eq!(
///     parse_shared("$share/workers/jobs/+").unwrap(),
///     Some(SharedFilter { group: "workers", filter: "jobs/+" })
/// );
/// assert_eq!(parse_shared("jobs/+").unwrap(), None);
/// assert!(parse_shared("$share/workers").is_err());
/// assert!(parse_shared("$share/a+b/jobs").is_err());
/// ```
pub fn parse_shared(filter: &str) -> Result<Option<SharedFilter<'_>>, TopicError> {
    let Some(rest) = filter.strip_prefix("$share/") else {
        return if filter == "$share" {
            Err(TopicError::BadShare)
        } else {
            Ok(None)
        };
    };
    match rest.split_once('/') {
        Some((group, inner))
            if !group.is_empty() && !group.contains(['+', '#']) && !inner.is_empty() =>
        {
            Ok(Some(SharedFilter {
                group,
                filter: inner,
            }))
        }
        _ => Err(TopicError::BadShare),
    }
}

fn check_common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > u16::MAX as usize {
        return Err(TopicError::TooLong);
    }
    if s.contains('\0') {
        return Err(TopicError::NullCharacter);
    }
    Ok(())
}

/// Check that a topic name or (inner) filter has at most `max` levels,
/// without splitting it.
///
/// ```
/// use broker_core::topic::{check_levels, TopicError};
/// assert!(check_levels("a/b/c", 3).is_ok());
/// assert_eq!(check_levels("a/b/c/d", 3), Err(TopicError::TooManyLevels { max: 3 }));
/// ```
pub fn check_levels(topic: &str, max: usize) -> Result<(), TopicError> {
    // Levels are separators + 1; counting stops at the first one too many.
    match topic
        .bytes()
        .filter(|b| *b == b'/')
        .nth(max.saturating_sub(1))
    {
        Some(_) => Err(TopicError::TooManyLevels { max }),
        None => Ok(()),
    }
}

/// Check a topic name, as used in PUBLISH.
///
/// ```
/// use broker_core::topic::{validate_name, TopicError};
/// assert!(validate_name("a/b").is_ok());
/// assert_eq!(validate_name("a/+"), Err(TopicError::WildcardInName));
/// ```
pub fn validate_name(name: &str) -> Result<(), TopicError> {
    check_common(name)?;
    if name.contains(['+', '#']) {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// Check a topic filter, as used in SUBSCRIBE and UNSUBSCRIBE.
///
/// ```
/// use broker_core::topic::validate_filter;
/// assert!(validate_filter("a/+/c/#").is_ok());
/// assert!(validate_filter("a/b#").is_err());
/// assert!(validate_filter("a/#/c").is_err());
/// ```
pub fn validate_filter(filter: &str) -> Result<(), TopicError> {
    check_common(filter)?;
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let is_last = levels.peek().is_none();
        match level {
            "#" if !is_last => return Err(TopicError::BadWildcard),
            "#" | "+" => {}
            l if l.contains(['+', '#']) => return Err(TopicError::BadWildcard),
            _ => {}
        }
    }
    Ok(())
}

/// True when the topic filter `filter` matches the topic name `name`.
///
/// Both are assumed valid. Wildcards at the first level never match a name
/// starting with `$` (e.g. `$SYS/...`).
///
/// ```
/// use broker_core::topic::matches;
/// assert!(matches("a/+/c", "a/b/c"));
/// assert!(matches("a/#", "a"));
/// assert!(matches("#", "a/b"));
/// assert!(!matches("#", "$SYS/uptime"));
/// assert!(matches("$SYS/#", "$SYS/uptime"));
/// assert!(!matches("a/+", "a/b/c"));
/// ```
pub fn matches(filter: &str, name: &str) -> bool {
    matches_by(filter, name, |f, n| f == n)
}

/// [`matches()`], with the comparison of a literal filter level and a name
/// level given: what an ACL rule needs to substitute `%c` and `%u`.
///
/// ```
/// use broker_core::topic::matches_by;
/// let dev = |f: &str, n: &str| f == n || (f == "%c" && n == "dev-1");
/// assert!(matches_by("devices/%c/#", "devices/dev-1/temp", dev));
/// assert!(!matches_by("devices/%c/#", "devices/dev-2/temp", dev));
/// ```
pub fn matches_by(filter: &str, name: &str, level_eq: impl Fn(&str, &str) -> bool) -> bool {
    if name.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut n = name.split('/');
    loop {
        match (f.next(), n.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(nl)) if level_eq(fl, nl) => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The literal part of a filter before its first wildcard level, e.g. `a/b/`
/// for `a/b/+/c`, or the whole filter when it has no wildcard. Backends use it
/// to narrow a retained-message lookup to an indexed prefix scan.
///
/// ```
/// use broker_core::topic::literal_prefix;
/// assert_eq!(literal_prefix("a/b/+/c"), "a/b/");
/// assert_eq!(literal_prefix("a/b"), "a/b");
/// assert_eq!(literal_prefix("#"), "");
/// ```
pub fn literal_prefix(filter: &str) -> &str {
    let mut end = 0;
    for level in filter.split_inclusive('/') {
        let bare = level.trim_end_matches('/');
        if bare == "+" || bare == "#" {
            return &filter[..end];
        }
        end += level.len();
    }
    filter
}

/// True when a filter contains a wildcard level.
pub fn has_wildcard(filter: &str) -> bool {
    filter.split('/').any(|l| l == "+" || l == "#")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names() {
        assert_eq!(validate_name(""), Err(TopicError::Empty));
        assert_eq!(validate_name("a\0b"), Err(TopicError::NullCharacter));
        assert_eq!(validate_name("a/#"), Err(TopicError::WildcardInName));
        assert!(validate_name("/").is_ok());
        assert!(validate_name("$SYS/x").is_ok());
    }

    #[test]
    fn filters() {
        for ok in ["#", "+", "+/+", "/+", "a/#", "+/b/#", "$SYS/#", "a//b"] {
            assert!(validate_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a#", "a/b+", "#/a", "a/#/b", "++", "a/+b"] {
            assert!(validate_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn matching() {
        assert!(matches("a/b", "a/b"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(matches("a/+", "a/"));
        assert!(matches("+/+", "/x"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("a/b/#", "a/b"));
        assert!(!matches("+/x", "$a/x"));
        assert!(matches("$a/+", "$a/x"));
        assert!(!matches("a/+/c", "a/b/d"));
    }

    proptest! {
        #[test]
        fn exact_filter_matches_itself(name in "[a-z/]{1,20}") {
            prop_assert!(matches(&name, &name));
        }

        #[test]
        fn hash_matches_every_non_dollar_name(name in "[a-z][a-z/]{0,20}") {
            prop_assert!(matches("#", &name));
        }

        #[test]
        fn prefix_is_a_prefix(filter in "[a-z+#/]{1,20}") {
            prop_assert!(filter.starts_with(literal_prefix(&filter)));
        }
    }
}
