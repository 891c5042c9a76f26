//! What happened in the broker, told to the application off the hot path.
//!
//! [`Broker::events`](crate::Broker::events) gives a bounded stream of
//! [`Event`]s. The broker never waits for a listener: when a listener's
//! queue is full, the event is dropped for that listener and counted
//! ([`EventStream::dropped`], and `Stats::events_dropped`). Events of one
//! client arrive in the order things happened to it; events of different
//! clients interleave as they happened.
//!
//! ```
//! # async fn run(broker: broker_core::Broker) {
//! use broker_core::events::Event;
//! let mut events = broker.events(1024);
//! while let Some(event) = events.recv().await {
//!     if let Event::Published { client: Some(c), message } = &event {
//!         println!("{} published on {}", c.client_id, message.topic);
//!     }
//! }
//! # }
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use tokio::sync::mpsc;

use crate::hooks::ClientInfo;
use crate::message::{Message, QoS};

/// Something that happened.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// The broker restored its sessions and is serving.
    Ready,
    /// The broker began to shut down.
    ShuttingDown,
    /// A client was accepted (CONNACK 0x00 sent, or an in-process client attached).
    ClientConnected {
        /// The client.
        client: Arc<ClientInfo>,
        /// A stored session was resumed.
        session_present: bool,
    },
    /// A client's connection ended.
    ClientDisconnected {
        /// The client.
        client: Arc<ClientInfo>,
        /// Why, as the broker logs it.
        reason: String,
    },
    /// A connection failed before it became a client (refused, malformed CONNECT, ...).
    ConnectionError {
        /// The client id, if CONNECT got that far.
        client_id: Option<String>,
        /// The peer address, if any.
        peer: Option<std::net::SocketAddr>,
        /// Why.
        reason: String,
    },
    /// A message was accepted for routing.
    Published {
        /// Who published it: `None` for the application and the broker itself
        /// (`Broker::publish`, `$SYS`).
        client: Option<Arc<ClientInfo>>,
        /// The message.
        message: Arc<Message>,
    },
    /// A subscription was granted.
    Subscribed {
        /// The client.
        client: Arc<ClientInfo>,
        /// The filter.
        filter: String,
        /// The QoS granted.
        qos: QoS,
    },
    /// A subscription was removed.
    Unsubscribed {
        /// The client.
        client: Arc<ClientInfo>,
        /// The filter.
        filter: String,
    },
    /// A message was handed to a client's connection (written, or given to an in-process client).
    Delivered {
        /// The client id.
        client_id: Arc<str>,
        /// The message.
        message: Arc<Message>,
        /// The QoS of this delivery.
        qos: QoS,
        /// The packet id (QoS 1/2).
        packet_id: Option<u16>,
    },
    /// A client acknowledged a QoS 1/2 delivery (PUBACK, or PUBCOMP for QoS 2).
    Acknowledged {
        /// The client id.
        client_id: Arc<str>,
        /// The packet id.
        packet_id: u16,
    },
    /// A message was not queued for a session, or evicted from it.
    MessageDropped {
        /// The client id.
        client_id: Arc<str>,
        /// The message's topic.
        topic: String,
        /// Why.
        reason: DropCause,
    },
    /// A new session was created.
    SessionCreated {
        /// The client id.
        client_id: Arc<str>,
    },
    /// A stored session was resumed by a new connection.
    SessionResumed {
        /// The client id.
        client_id: Arc<str>,
    },
    /// An offline session outlived its expiry interval and was discarded.
    SessionExpired {
        /// The client id.
        client_id: Arc<str>,
    },
    /// A client's will was published.
    WillPublished {
        /// The client id.
        client_id: Arc<str>,
        /// The will's topic.
        topic: String,
    },
}

/// Why a message was dropped for one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropCause {
    /// `max_queued_messages`.
    QueueFull,
    /// `max_queued_bytes`.
    QueueBytes,
}

/// A listener's end: a bounded queue of events.
#[derive(Debug)]
pub struct EventStream {
    rx: mpsc::Receiver<Event>,
    dropped: Arc<AtomicU64>,
}

impl EventStream {
    /// The next event; `None` once the broker has stopped.
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next event if one is waiting.
    pub fn try_recv(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }

    /// Events dropped for this listener because its queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl futures::Stream for EventStream {
    type Item = Event;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Event>> {
        self.rx.poll_recv(cx)
    }
}

struct Listener {
    tx: mpsc::Sender<Event>,
    dropped: Arc<AtomicU64>,
    /// Wants the per-message events too (published, delivered, acknowledged, dropped).
    messages: bool,
}

/// The broker's side: fans events out to listeners without ever waiting.
#[derive(Default)]
pub(crate) struct EventBus {
    /// Whether anyone listens: one load is all an event costs when nobody does.
    active: AtomicBool,
    /// Whether anyone listens to per-message events (the `$SYS` publisher
    /// listens to client events only, so that it costs nothing per message).
    messages: AtomicBool,
    listeners: RwLock<Vec<Listener>>,
    dropped: AtomicU64,
}

impl EventBus {
    /// A new listener with room for `capacity` events.
    /// A new listener with room for `capacity` events; `messages`: the
    /// per-message events too. `first` is queued before anything else.
    pub(crate) fn subscribe(
        &self,
        capacity: usize,
        messages: bool,
        first: Option<Event>,
    ) -> EventStream {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        if let Some(e) = first {
            let _ = tx.try_send(e);
        }
        let dropped = Arc::new(AtomicU64::new(0));
        let mut listeners = self.listeners.write();
        listeners.push(Listener {
            tx,
            dropped: dropped.clone(),
            messages,
        });
        self.refresh(&listeners);
        EventStream { rx, dropped }
    }

    fn refresh(&self, listeners: &[Listener]) {
        self.active.store(!listeners.is_empty(), Ordering::Release);
        self.messages
            .store(listeners.iter().any(|l| l.messages), Ordering::Release);
    }

    /// Whether an event would reach anyone (build it only then).
    #[inline]
    pub(crate) fn active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Send `make()` to every listener, if there are any.
    #[inline]
    pub(crate) fn emit(&self, make: impl FnOnce() -> Event) {
        if self.active() {
            self.send(make(), false);
        }
    }

    /// Send a per-message event `make()` to the listeners that want those.
    #[inline]
    pub(crate) fn emit_message(&self, make: impl FnOnce() -> Event) {
        if self.messages.load(Ordering::Acquire) {
            self.send(make(), true);
        }
    }

    fn send(&self, event: Event, per_message: bool) {
        let mut closed = false;
        {
            let listeners = self.listeners.read();
            for l in listeners.iter().filter(|l| l.messages || !per_message) {
                match l.tx.try_send(event.clone()) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        l.dropped.fetch_add(1, Ordering::Relaxed);
                        self.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => closed = true,
                }
            }
        }
        if closed {
            let mut listeners = self.listeners.write();
            listeners.retain(|l| !l.tx.is_closed());
            self.refresh(&listeners);
        }
    }

    /// Events dropped across listeners.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Close every listener's stream (the broker stopped).
    pub(crate) fn close(&self) {
        let mut listeners = self.listeners.write();
        listeners.clear();
        self.refresh(&listeners);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_listener_loses_events_and_counts_them() {
        let bus = EventBus::default();
        assert!(!bus.active());
        let mut slow = bus.subscribe(2, true, None);
        let mut fast = bus.subscribe(16, true, None);
        for _ in 0..5 {
            bus.emit(|| Event::Ready);
        }
        assert_eq!(slow.dropped(), 3);
        assert_eq!(fast.dropped(), 0);
        assert_eq!(bus.dropped(), 3);
        assert!(slow.recv().await.is_some());
        let mut n = 0;
        while fast.try_recv().is_some() {
            n += 1;
        }
        assert_eq!(n, 5);
    }

    #[tokio::test]
    async fn per_message_events_reach_only_who_asked() {
        let bus = EventBus::default();
        let mut clients_only = bus.subscribe(8, false, None);
        bus.emit_message(|| panic!("built for nobody"));
        bus.emit(|| Event::Ready);
        assert!(matches!(clients_only.try_recv(), Some(Event::Ready)));
        let mut all = bus.subscribe(8, true, None);
        bus.emit_message(|| Event::ShuttingDown);
        assert!(clients_only.try_recv().is_none());
        assert!(all.try_recv().is_some());
    }

    #[tokio::test]
    async fn closed_listeners_are_forgotten() {
        let bus = EventBus::default();
        drop(bus.subscribe(1, true, None));
        bus.emit(|| Event::Ready);
        assert!(!bus.active(), "no listener left");
    }
}
