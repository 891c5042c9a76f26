//! TCP listeners and graceful shutdown.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use broker_core::{broker::Broker, config::BrokerConfig, server::Server, storage::Storage};
//! use storage_memory::MemoryStore;
//!
//! let storage = Storage::from_backend(Arc::new(MemoryStore::new()));
//! let broker = Broker::start(BrokerConfig::default(), storage).await?;
//! let server = Server::bind(broker.clone(), "127.0.0.1:1883").await?;
//! println!("listening on {}", server.local_addr()?);
//! server.run().await; // until broker.shutdown() is called
//! # Ok(()) }
//! ```

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, ToSocketAddrs};
use tracing::{debug, warn};

use crate::broker::Broker;
use crate::connection;

/// A bound listener serving MQTT over TCP.
pub struct Server {
    broker: Arc<Broker>,
    listener: TcpListener,
}

impl Server {
    /// Bind a listener. Fails if the address is in use.
    pub async fn bind(broker: Arc<Broker>, addr: impl ToSocketAddrs) -> io::Result<Server> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Server { broker, listener })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accept and serve clients until the broker shuts down.
    pub async fn run(self) {
        let shutdown = self.broker.shutdown_token();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        // Refused before anything is allocated for it; the
                        // socket closes as `stream` drops.
                        let Ok(permit) = self.broker.admit() else { continue };
                        let _ = stream.set_nodelay(true);
                        debug!(%peer, "accepted");
                        let serve = connection::handle(self.broker.clone(), stream, peer.to_string());
                        self.broker.spawn_connection(async move {
                            serve.await;
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        // Typically out of file descriptors: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
        drop(self.listener);
    }
}
