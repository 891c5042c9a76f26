//! `broker-core`: everything an MQTT broker is, independent of any database.
//!
//! # The public API
//! A small facade for the application that embeds the broker, and the
//! traits a storage adapter implements:
//! - [`Broker`] and [`BrokerBuilder`]: start, publish from the server,
//!   in-process clients ([`client`]), events ([`events`]), statistics, shutdown;
//! - [`hooks`]: authentication, authorization, MQTT 5 enhanced authentication,
//!   each with its contract (hot path or not, timeout, failure);
//! - [`config`], [`message`], [`subscription`], [`topic`]: the settings and the values passed around;
//! - [`server`]: a TCP listener for a broker started without one;
//! - [`storage`]: what an adapter implements (`storage-memory`, `storage-sqlite`, ...), nothing of MQTT.
//!
//! # Inside (private to the crate), from the wire inwards
//! - `codec`: framing and packet types (the `rmqtt-codec` crate, wrapped;
//!   MQTT 3.1.1 converted to MQTT 5 at the edge);
//! - `connection`: one client connection on tokio; translates packets to
//!   calls on its link and deliveries back to packets;
//! - `link`: the boundary every client goes through (connections,
//!   in-process clients, `$SYS`); the hooks run there and only there;
//! - `broker`: the state behind the boundary: registry and takeover,
//!   expiry, wills, routing, subscriptions, retained messages, restore;
//! - `session`: one session's ordered queue, in-flight window and packet ids;
//! - `trie`: the subscription trie; `group_commit`: the one queue in front
//!   of the packet store; `admission`: connection limits; `sys`: `$SYS` topics.
//!
//! # Example
//! ```
//! use broker_core::{client::ClientOptions, message::{Message, QoS}, storage::Storage, Broker};
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let storage = Storage::from_backend(std::sync::Arc::new(storage_memory::MemoryStore::new()));
//! let broker = Broker::builder().storage(storage).start().await.unwrap();
//! let mut device = broker.connect(ClientOptions::persistent("device-42")).await.unwrap();
//! device.subscribe("devices/42/#", QoS::AtLeastOnce).await.unwrap();
//! broker.publish(Message::new("devices/42/cmd", "reboot", QoS::AtLeastOnce, false)).await.unwrap();
//! let got = device.recv().await.unwrap();
//! assert_eq!(&got.message().payload[..], b"reboot");
//! device.ack(&got);
//! broker.shutdown().await;
//! # });
//! ```
//!
//! What this crate must not know about: SQL, Redis, MongoDB, or any other
//! concrete database. Adapters live in their own crates and implement
//! [`storage`]'s traits.

mod admission;
mod auth_throttle;
mod broker;
mod codec;
mod connection;
mod embed;
mod group_commit;
mod link;
mod metrics;
mod session;
mod small_map;
mod sys;
mod trie;

pub mod client;
pub mod config;
pub mod events;
pub mod hooks;
pub mod message;
pub mod server;
pub mod storage;
pub mod subscription;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod topic;

pub use broker::{SessionExpiry, SubscribeRefusal};
pub use embed::{
    AdminError, Broker, BrokerBuilder, Metrics, PublishError, SessionInfo, StartError,
    StatsSnapshot,
};
pub use link::AttachError;
pub use metrics::HistogramSnapshot;

/// Pieces the test suites, fuzzers and benchmarks reach into. Not part of
/// the API: only with the `testkit` feature, and free to change.
#[cfg(feature = "testkit")]
#[doc(hidden)]
pub mod internals {
    /// The wire codec.
    pub mod codec {
        pub use crate::codec::*;
    }
    /// The subscription trie.
    pub mod trie {
        pub use crate::trie::*;
    }
    /// The packet store's group commit.
    pub mod group_commit {
        pub use crate::group_commit::*;
    }
    pub use crate::broker::SubscriberKey;

    /// A weak reference to the broker's state: its strong count falls to
    /// zero once every task of a stopped broker has let go of it.
    pub fn weak_state(broker: &crate::Broker) -> std::sync::Weak<dyn std::any::Any + Send + Sync> {
        let state: std::sync::Arc<dyn std::any::Any + Send + Sync> = broker.core().clone();
        std::sync::Arc::downgrade(&state)
    }
}
