//! `broker-bridge`: MQTT bridges from this broker to other MQTT brokers,
//! as Mosquitto's `connection` blocks.
//!
//! A bridge is two clients joined: an in-process client of the local broker
//! ([`broker_core::client`], a persistent session named `$bridge/<name>`)
//! and a small MQTT 3.1.1 / 5 client of the remote broker, written over the
//! workspace's codec (`rmqtt-codec`). Topics are relayed as Mosquitto's
//! `topic pattern direction qos local_prefix remote_prefix` lines say
//! ([`TopicConfig`]).
//!
//! What it promises:
//! - out (local to remote): a local message is taken from the bridge's own
//!   session queue, in order, sent to the remote within a bounded in-flight
//!   window, and acknowledged locally (removed from the durable queue) only
//!   once the remote acknowledged it (PUBACK for QoS 1, PUBCOMP for QoS 2).
//!   While the remote is away messages wait in that queue, in the broker's
//!   store; after any restart the unacknowledged tail is sent again (QoS 1:
//!   duplicates of that tail only). The remote packet id is the local
//!   session's, which is stable across restarts, so a QoS 2 resend is
//!   recognised by a remote that kept our session.
//! - in (remote to local): a remote PUBLISH is published locally, and only
//!   once that call returned (durable for QoS 1/2) is the remote
//!   acknowledged. QoS 2 ids are held in the local session, stored with the
//!   message, until PUBREL: a resend after a crash is not published twice.
//! - no loops: the local subscriptions have No Local, so what the bridge
//!   publishes locally is never sent back; toward the remote, MQTT 3.1.1
//!   connects with the bridge bit (protocol level 0x84) and MQTT 5
//!   subscribes with No Local.
//! - every resource bounded: the in-flight window, the write buffer, the
//!   largest packet; reconnection with exponential backoff and jitter.
//!
//! What it must not know about, and what must not know about it: the core
//! does not know bridges exist (a bridge is a client of its public facade,
//! through the same boundary, hooks and limits as any client), and the
//! bridge knows nothing of storage backends, listeners or the binary's
//! settings file (the `broker` binary turns `[[bridge]]` tables into
//! [`BridgeConfig`]s).
//!
//! ```no_run
//! # async fn run(broker: broker_core::Broker) -> Result<(), broker_bridge::BridgeError> {
//! use broker_bridge::{Bridge, BridgeConfig, Direction, TopicConfig};
//! use broker_core::message::QoS;
//! let config = BridgeConfig {
//!     topics: vec![TopicConfig {
//!         local_prefix: "edge/".into(),
//!         remote_prefix: "site1/".into(),
//!         ..TopicConfig::new("sensors/#", Direction::Out, QoS::AtLeastOnce)
//!     }],
//!     ..BridgeConfig::new("cloud", "127.0.0.1:1884")
//! };
//! let bridge = Bridge::start(&broker, config)?;
//! // ... until shutdown:
//! bridge.stop().await;
//! # Ok(()) }
//! ```

mod config;
mod run;
mod wire;

use std::sync::Arc;
use std::time::Duration;

use broker_core::Broker;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::{
    default_client_id, BridgeConfig, ConfigError, Direction, MqttVersion, TopicConfig,
    DEFAULT_KEEP_ALIVE_SECS, DEFAULT_MAX_INFLIGHT, DEFAULT_MAX_PACKET_SIZE, MAX_INFLIGHT_LIMIT,
};
pub use wire::RemoteError;

/// Why a bridge did not start.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// Its settings are invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Its TLS settings could not be loaded (the CA file, say).
    #[error("bridge `{bridge}`: {source}")]
    Tls {
        /// The bridge's name.
        bridge: String,
        /// What failed.
        #[source]
        source: RemoteError,
    },
}

/// A running bridge: one task that keeps its two connections up.
#[derive(Debug)]
pub struct Bridge {
    name: String,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// How long [`Bridge::stop`] waits for the task to close its connections.
const STOP_WITHIN: Duration = Duration::from_secs(5);

impl Bridge {
    /// Check `config`, load its TLS settings, and start relaying on
    /// `broker` (within a tokio runtime). Connection failures are not
    /// errors: the bridge logs them and retries with backoff.
    pub fn start(broker: &Broker, config: BridgeConfig) -> Result<Bridge, BridgeError> {
        config.validate()?;
        let tls = if config.tls {
            Some(
                wire::tls_config(&config).map_err(|source| BridgeError::Tls {
                    bridge: config.name.clone(),
                    source,
                })?,
            )
        } else {
            None
        };
        let stop = CancellationToken::new();
        let name = config.name.clone();
        let task = tokio::spawn(run::run(
            broker.clone(),
            Arc::new(config),
            tls,
            stop.clone(),
        ));
        Ok(Bridge { name, stop, task })
    }

    /// The bridge's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stop: DISCONNECT from the remote, detach the local session (what is
    /// not yet acknowledged stays queued for the next start), and wait for
    /// the task (at most a few seconds).
    pub async fn stop(self) {
        self.stop.cancel();
        let abort = self.task.abort_handle();
        if tokio::time::timeout(STOP_WITHIN, self.task).await.is_err() {
            abort.abort();
        }
    }
}

/// Check a configuration as [`Bridge::start`] would, without starting:
/// the settings and the TLS files.
pub fn check(config: &BridgeConfig) -> Result<(), BridgeError> {
    config.validate()?;
    if config.tls {
        wire::tls_config(config).map_err(|source| BridgeError::Tls {
            bridge: config.name.clone(),
            source,
        })?;
    }
    Ok(())
}
