//! The broker's listeners: MQTT over plain TCP (`mqtt`), TLS (`mqtts`),
//! WebSocket (`ws`) and WebSocket over TLS (`wss`).
//!
//! A listener accepts, admits through the broker (its `max_connections` and
//! rate, then the listener's own `max_connections`), does the transport's
//! handshakes on the connection's own task within the broker's
//! `connect_timeout_secs`, and hands the resulting byte stream to
//! [`Broker::serve`](broker_core::Broker::serve): one connection code path
//! for all four protocols.
//!
//! TLS certificates, keys and client CAs are read again by
//! [`TlsReload::reload`] (the binary calls it on SIGHUP): new connections
//! get the new ones, open connections keep theirs.
//!
//! It knows the broker only through its public facade: nothing of
//! sessions, storage or authentication beyond what a listener passes on
//! ([`Peer`](broker_core::server::Peer)).
//!
//! ```no_run
//! # async fn run(broker: broker_core::Broker) -> Result<(), broker_net::ListenError> {
//! use broker_net::{ListenerConfig, Protocol};
//! let mut config = ListenerConfig::new("127.0.0.1:8080", Protocol::Ws);
//! config.path = Some("/mqtt".into());
//! let listener = broker_net::bind(&broker, &config).await?;
//! println!("listening on {}", listener.local_addr());
//! tokio::spawn(listener.run());
//! # Ok(()) }
//! ```

mod config;
mod listener;
mod tls;
mod ws;

pub use config::{is_loopback, ListenerConfig, Protocol};
pub use listener::{bind, ListenError, Listener};
pub use tls::{TlsError, TlsReload};
pub use ws::{connect as ws_connect, WsStream};
