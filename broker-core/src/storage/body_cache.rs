//! One copy in memory of a body read for many sessions.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use crate::message::{Message, MessageId};

/// Bodies an adapter has handed out, by id, held weakly: a restore that
/// reads the same message from many sessions' queues gives them one shared
/// copy, as the broker itself does when it routes. Entries whose bodies are
/// gone are swept as the map grows.
///
/// ```
/// use broker_core::message::{Message, QoS};
/// use broker_core::storage::BodyCache;
///
/// let mut cache = BodyCache::default();
/// let mut m = Message::new("t", "body", QoS::AtLeastOnce, false);
/// m.id = 7;
/// let a = cache.share(m.clone());
/// let b = cache.share(m);
/// assert!(std::sync::Arc::ptr_eq(&a, &b));
/// ```
#[derive(Debug, Default)]
pub struct BodyCache {
    bodies: HashMap<MessageId, Weak<Message>>,
    high_water: usize,
}

impl BodyCache {
    /// The copy already handed out for `id`, if it is still alive.
    pub fn get(&self, id: MessageId) -> Option<Arc<Message>> {
        self.bodies.get(&id).and_then(Weak::upgrade)
    }

    /// The live copy of `m`'s id if there is one, else `m`, now shared.
    pub fn share(&mut self, m: Message) -> Arc<Message> {
        match self.get(m.id) {
            Some(known) => known,
            None => self.insert(m),
        }
    }

    /// Hand out `m`, replacing any copy known for its id.
    pub fn insert(&mut self, m: Message) -> Arc<Message> {
        let m = Arc::new(m);
        self.bodies.insert(m.id, Arc::downgrade(&m));
        if self.bodies.len() > self.high_water.max(1024) * 2 {
            self.bodies.retain(|_, w| w.strong_count() > 0);
            self.high_water = self.bodies.len();
        }
        m
    }
}
