//! `broker-core`: everything an MQTT broker is, independent of any database.
//!
//! Modules, from the wire inwards:
//! - [`codec`]: framing and packet types (the `rmqtt-codec` crate, wrapped);
//! - [`topic`] and [`trie`]: topic validation, filter matching, the subscription trie;
//! - [`session`]: a client's session: ordered queue, in-flight window, packet ids;
//! - [`broker`]: the shared state: sessions, routing, retained messages, wills;
//! - [`group_commit`]: the one queue in front of the packet store, batching writes;
//! - [`connection`]: one client connection on tokio, from CONNECT to close;
//! - [`server`]: listeners and graceful shutdown;
//! - [`storage`]: the traits a storage adapter implements, and nothing of MQTT;
//! - [`hooks`]: extension points for the embedding application (MQTT 5 enhanced authentication);
//! - [`config`]: the settings.
//!
//! What this crate must not know about: SQL, Redis, MongoDB, or any other
//! concrete database. Adapters live in their own crates (`storage-memory`,
//! `storage-sqlite`, ...) and implement [`storage`]'s traits.

mod admission;
pub mod message;
pub mod storage;
pub mod subscription;
pub mod topic;

pub mod broker;
pub mod codec;
pub mod config;
pub mod connection;
pub mod group_commit;
pub mod hooks;
pub mod server;
pub mod session;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod trie;
