//! Listeners: accept, admit (`max_connections`, `max_connection_rate`),
//! and hand each connection to its own task until the broker shuts down.
//!
//! [`Server`] is the plain TCP listener. Other transports (TLS, WebSocket:
//! the `broker-net` crate) go through the same three steps with
//! [`Broker::admit`], [`Admitted::spawn`] and [`Broker::serve`], so that
//! every connection, whatever carries it, is served by one code path.
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

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, ToSocketAddrs};
use tracing::{debug, warn};

use crate::broker::Core;
use crate::connection;
use crate::Broker;

/// Who is at the other end of an accepted connection, as its listener knows
/// it; the hooks see this in [`ConnectInfo`](crate::hooks::ConnectInfo).
#[derive(Debug, Clone)]
pub struct Peer {
    /// The peer's address.
    pub addr: SocketAddr,
    /// The listener's name (`PROTOCOL:ADDRESS`), in logs, events and hooks.
    pub listener: Arc<str>,
    /// Whether the listener admits clients that no authentication vouches
    /// for. Without an authentication hook, a listener that does not
    /// refuses every client but those with a [`Peer::certificate_identity`].
    pub allow_anonymous: bool,
    /// The name in the client's verified TLS certificate, when the listener
    /// uses it as the username (Mosquitto's `use_identity_as_username`):
    /// it replaces the User Name of CONNECT, and the certificate stands for
    /// the password.
    pub certificate_identity: Option<String>,
}

impl Peer {
    /// A peer of listener `listener` that admits anonymous clients.
    pub fn new(addr: SocketAddr, listener: Arc<str>) -> Peer {
        Peer {
            addr,
            listener,
            allow_anonymous: true,
            certificate_identity: None,
        }
    }
}

/// A connection the broker admitted: it holds its place among the open
/// connections until the task given to [`Admitted::spawn`] ends.
pub struct Admitted {
    core: Arc<Core>,
    permit: crate::admission::Permit,
}

impl Admitted {
    /// Run `connection` (typically a transport handshake, then
    /// [`Broker::serve`]) on its own task, which shutdown waits for.
    pub fn spawn<F>(self, connection: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        use futures::FutureExt;
        let Admitted { core, permit } = self;
        // `map` rather than an `async` block awaiting `connection`: such a
        // block holds the future twice (captured, then awaited), which
        // doubled every connection's task (26 KB instead of 13 KB).
        core.spawn_connection(connection.map(move |()| drop(permit)));
    }
}

impl Broker {
    /// Admit a new connection, or refuse it (counted and logged) when
    /// `max_connections` are open or they come faster than
    /// `max_connection_rate`; the caller then just closes the socket.
    pub fn admit(&self) -> Option<Admitted> {
        let permit = self.core().admit().ok()?;
        Some(Admitted {
            core: self.core().clone(),
            permit,
        })
    }

    /// Serve one MQTT client on `stream` (any byte stream: TCP, TLS,
    /// WebSocket) until it ends.
    ///
    /// A plain function returning the connection's future rather than an
    /// `async fn` wrapping it, which would carry `stream` and `peer` a
    /// second time for the connection's whole life.
    pub fn serve<S>(
        &self,
        stream: S,
        peer: Peer,
    ) -> impl std::future::Future<Output = ()> + Send + 'static
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        connection::handle(self.core().clone(), stream, peer)
    }

    /// Resolves once the broker begins to shut down: listeners stop accepting.
    pub fn shutting_down(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.core().shutdown_token().cancelled_owned()
    }
}

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
                        let serve = connection::handle(self.core.clone(), stream, Peer::new(peer, self.name.clone()));
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
