//! TCP listeners: accept, admit (`max_connections`, `max_connection_rate`),
//! and hand each connection to its own task until the broker shuts down.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use broker_core::{server::Server, storage::Storage, Broker};
//! use storage_memory::MemoryStore;
//!
//! let storage = Storage::from_backend(std::sync::Arc::new(MemoryStore::new()));
//! let broker = Broker::builder().storage(storage).start().await?;
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

use crate::broker::Core;
use crate::connection;
use crate::Broker;

/// A bound listener serving MQTT over TCP.
pub struct Server {
    core: Arc<Core>,
    listener: TcpListener,
    name: Arc<str>,
}

impl Server {
    /// Bind a listener. Fails if the address is in use.
    pub async fn bind(broker: Broker, addr: impl ToSocketAddrs) -> io::Result<Server> {
        let listener = TcpListener::bind(addr).await?;
        let name: Arc<str> = Arc::from(format!("mqtt:{}", listener.local_addr()?));
        Ok(Server {
            core: broker.core().clone(),
            listener,
            name,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accept and serve clients until the broker shuts down.
    pub async fn run(self) {
        let shutdown = self.core.shutdown_token();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        // Refused before anything is allocated for it; the
                        // socket closes as `stream` drops.
                        let Ok(permit) = self.core.admit() else { continue };
                        let _ = stream.set_nodelay(true);
                        debug!(%peer, "accepted");
                        let serve = connection::handle(self.core.clone(), stream, peer, self.name.clone());
                        self.core.spawn_connection(async move {
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
