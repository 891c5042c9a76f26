//! Topic aliases (MQTT 5 section 3.3.2.3.4), one table per direction and
//! per connection: they never outlive it.

use std::collections::HashMap;

use bytestring::ByteString;

/// Aliases the client set for its PUBLISHes to the broker.
#[derive(Debug, Default)]
pub struct InboundAliases {
    max: u16,
    topics: HashMap<u16, ByteString>,
}

/// Why an inbound alias was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum AliasError {
    /// 0 or above the maximum the broker announced (DISCONNECT 0x94).
    OutOfRange(u16),
    /// An empty topic with an alias never set on this connection (0x82).
    Unknown(u16),
}

impl InboundAliases {
    /// A table for at most `max` aliases (the broker's Topic Alias Maximum).
    pub fn new(max: u16) -> Self {
        InboundAliases {
            max,
            topics: HashMap::new(),
        }
    }

    /// The topic a PUBLISH is for: `topic` itself (recorded under `alias`
    /// when both are given), or the topic `alias` stands for.
    pub fn resolve(
        &mut self,
        topic: ByteString,
        alias: Option<u16>,
    ) -> Result<ByteString, AliasError> {
        let Some(alias) = alias else { return Ok(topic) };
        if alias == 0 || alias > self.max {
            return Err(AliasError::OutOfRange(alias));
        }
        if topic.is_empty() {
            return self
                .topics
                .get(&alias)
                .cloned()
                .ok_or(AliasError::Unknown(alias));
        }
        self.topics.insert(alias, topic.clone());
        Ok(topic)
    }
}

/// Aliases the broker uses for its PUBLISHes to the client.
///
/// Topics get aliases first come, first served up to the client's Topic Alias
/// Maximum; once all are taken, the least recently used one is reassigned.
/// A topic sent with its alias once is then sent as the alias alone.
#[derive(Debug, Default)]
pub struct OutboundAliases {
    max: u16,
    by_topic: HashMap<String, (u16, u64)>,
    by_alias: HashMap<u16, String>,
    clock: u64,
}

/// How a PUBLISH names its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AliasUse {
    /// No alias: the topic in full.
    None,
    /// The topic in full, and this alias for it from now on.
    Set(u16),
    /// The alias alone (empty topic).
    Known(u16),
}

impl OutboundAliases {
    /// A table for the client's Topic Alias Maximum (0: no aliases).
    pub fn new(max: u16) -> Self {
        OutboundAliases {
            max,
            ..OutboundAliases::default()
        }
    }

    /// How to name `topic` in the next PUBLISH. Call [`OutboundAliases::sent`]
    /// once it is written, so an alias the client never saw is never used.
    pub fn lookup(&self, topic: &str) -> AliasUse {
        if self.max == 0 {
            return AliasUse::None;
        }
        if let Some((alias, _)) = self.by_topic.get(topic) {
            return AliasUse::Known(*alias);
        }
        if (self.by_alias.len() as u16) < self.max {
            return AliasUse::Set(self.by_alias.len() as u16 + 1);
        }
        let lru = self
            .by_topic
            .values()
            .min_by_key(|(_, used)| *used)
            .map(|(alias, _)| *alias);
        lru.map_or(AliasUse::None, AliasUse::Set)
    }

    /// The PUBLISH naming `topic` as `used` was written.
    pub fn sent(&mut self, topic: &str, used: AliasUse) {
        self.clock += 1;
        match used {
            AliasUse::None => {}
            AliasUse::Known(alias) => {
                if let Some(e) = self.by_topic.get_mut(topic) {
                    debug_assert_eq!(e.0, alias);
                    e.1 = self.clock;
                }
            }
            AliasUse::Set(alias) => {
                if let Some(old) = self.by_alias.insert(alias, topic.to_owned()) {
                    self.by_topic.remove(&old);
                }
                self.by_topic.insert(topic.to_owned(), (alias, self.clock));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_alias_set_then_used() {
        let mut a = InboundAliases::new(2);
        assert_eq!(a.resolve("x/y".into(), Some(1)).as_deref(), Ok("x/y"));
        assert_eq!(a.resolve("".into(), Some(1)).as_deref(), Ok("x/y"));
        assert_eq!(a.resolve("".into(), Some(2)), Err(AliasError::Unknown(2)));
        assert_eq!(
            a.resolve("t".into(), Some(3)),
            Err(AliasError::OutOfRange(3))
        );
        assert_eq!(
            a.resolve("t".into(), Some(0)),
            Err(AliasError::OutOfRange(0))
        );
    }

    #[test]
    fn outbound_aliases_reuse_and_evict_least_recent() {
        let mut a = OutboundAliases::new(2);
        let first = a.lookup("a");
        assert_eq!(first, AliasUse::Set(1));
        a.sent("a", first);
        assert_eq!(a.lookup("a"), AliasUse::Known(1));
        let b = a.lookup("b");
        assert_eq!(b, AliasUse::Set(2));
        a.sent("b", b);
        a.sent("a", AliasUse::Known(1));
        // "b" is now least recently used: "c" takes its alias.
        let c = a.lookup("c");
        assert_eq!(c, AliasUse::Set(2));
        a.sent("c", c);
        assert_eq!(a.lookup("b"), AliasUse::Set(1));
        assert_eq!(OutboundAliases::new(0).lookup("a"), AliasUse::None);
    }
}
