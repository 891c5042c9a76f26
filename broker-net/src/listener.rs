//! One bound listener: accept, admit, handshake on the connection's task,
//! serve.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use broker_core::server::Peer;
use broker_core::Broker;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use crate::config::{ListenerConfig, Protocol};
use crate::tls::{self, TlsError, TlsReload};
use crate::ws;

/// Bytes a WebSocket message may carry beyond the largest MQTT packet
/// (a packet's fixed header is not counted in `max_packet_size`).
const WS_MESSAGE_SLACK: usize = 16;

/// Why a listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Its settings do not fit together.
    #[error("{0}")]
    Config(String),
    /// Its TLS files could not be used.
    #[error("listener {bind} ({protocol}): TLS")]
    Tls {
        /// The bind address.
        bind: String,
        /// Its protocol.
        protocol: Protocol,
        /// What was wrong.
        #[source]
        source: TlsError,
    },
    /// The address could not be bound.
    #[error("cannot listen on {bind} ({protocol})")]
    Bind {
        /// The bind address.
        bind: String,
        /// Its protocol.
        protocol: Protocol,
        /// The bind error.
        #[source]
        source: io::Error,
    },
}

/// A bound listener; [`Listener::run`] serves it until the broker shuts down.
pub struct Listener {
    broker: Broker,
    tcp: TcpListener,
    local: SocketAddr,
    protocol: Protocol,
    name: Arc<str>,
    path: Arc<str>,
    allow_anonymous: bool,
    use_identity_as_username: bool,
    tls: Option<TlsReload>,
    places: Option<Arc<Semaphore>>,
    over_limit: AtomicU64,
}

/// Bind the listener `config` describes, for `broker`. The TLS files are
/// read now, so that a bad certificate stops the start with its reason.
/// `allow_anonymous` unset means false unless the bind is a loopback address.
pub async fn bind(broker: &Broker, config: &ListenerConfig) -> Result<Listener, ListenError> {
    config.validate().map_err(ListenError::Config)?;
    let tls = if config.protocol.is_tls() {
        Some(TlsReload::load(config).map_err(|source| ListenError::Tls {
            bind: config.bind.clone(),
            protocol: config.protocol,
            source,
        })?)
    } else {
        None
    };
    let bind_error = |source| ListenError::Bind {
        bind: config.bind.clone(),
        protocol: config.protocol,
        source,
    };
    let tcp = TcpListener::bind(config.bind.as_str())
        .await
        .map_err(bind_error)?;
    let local = tcp.local_addr().map_err(bind_error)?;
    Ok(Listener {
        broker: broker.clone(),
        tcp,
        local,
        protocol: config.protocol,
        name: Arc::from(format!("{}:{local}", config.protocol)),
        path: Arc::from(config.path()),
        allow_anonymous: config
            .allow_anonymous
            .unwrap_or_else(|| crate::is_loopback(&config.bind)),
        use_identity_as_username: config.use_identity_as_username,
        tls,
        places: config.max_connections.map(|n| Arc::new(Semaphore::new(n))),
        over_limit: AtomicU64::new(0),
    })
}

impl Listener {
    /// The address bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// What it speaks.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Its name in logs, events and hooks: `PROTOCOL:ADDRESS`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The handle that reloads its TLS files (`mqtts`, `wss`).
    pub fn tls_reload(&self) -> Option<TlsReload> {
        self.tls.clone()
    }

    /// Accept and serve until the broker shuts down.
    pub async fn run(self) {
        let this = Arc::new(self);
        let stop = this.broker.shutting_down();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                accepted = this.tcp.accept() => match accepted {
                    Ok((stream, peer)) => this.admit(stream, peer),
                    Err(e) => {
                        // Typically out of file descriptors: back off instead of spinning.
                        warn!(listener = %this.name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    }

    /// Admit (broker, then listener) or close at once.
    fn admit(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let Some(admitted) = self.broker.admit() else {
            return;
        };
        let place = match &self.places {
            None => None,
            Some(places) => match places.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    let n = self.over_limit.fetch_add(1, Ordering::Relaxed) + 1;
                    if n == 1 || n.is_multiple_of(1000) {
                        warn!(listener = %self.name, %peer, refused = n,
                            "connection refused: the listener's max_connections are open");
                    }
                    return;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        debug!(listener = %self.name, %peer, "accepted");
        let this = self.clone();
        admitted.spawn(async move {
            this.handshake_and_serve(stream, peer, place).await;
        });
    }

    /// Each transport's handshake and session run boxed, so that a
    /// connection's task holds only what its transport needs: an idle TCP
    /// client does not pay for the TLS and WebSocket states it never has.
    async fn handshake_and_serve(
        &self,
        stream: TcpStream,
        addr: SocketAddr,
        _place: Option<OwnedSemaphorePermit>,
    ) {
        let mut peer = Peer::new(addr, self.name.clone());
        peer.allow_anonymous = self.allow_anonymous;
        match (&self.tls, self.protocol.is_websocket()) {
            (None, false) => Box::pin(self.broker.serve(stream, peer)).await,
            (None, true) => Box::pin(self.serve_websocket(stream, peer)).await,
            (Some(tls), websocket) => Box::pin(self.serve_tls(tls, stream, peer, websocket)).await,
        }
    }

    /// The WebSocket upgrade on `stream` (TCP or TLS), then MQTT in it.
    async fn serve_websocket<S>(&self, stream: S, peer: Peer)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let within = self.broker.config().connect_timeout();
        let max_message = self.broker.config().max_packet_size as usize + WS_MESSAGE_SLACK;
        let upgrade = Box::pin(ws::accept(stream, &self.path, max_message));
        match tokio::time::timeout(within, upgrade).await {
            Ok(Ok(ws)) => Box::pin(self.broker.serve(ws, peer)).await,
            Ok(Err(e)) => self.refused(peer.addr, format!("WebSocket upgrade failed: {e}")),
            Err(_) => self.refused(peer.addr, "WebSocket upgrade timed out".into()),
        }
    }

    /// The TLS handshake, then MQTT (or a WebSocket upgrade) over it.
    async fn serve_tls(&self, tls: &TlsReload, stream: TcpStream, mut peer: Peer, websocket: bool) {
        let addr = peer.addr;
        let within = self.broker.config().connect_timeout();
        let handshake = Box::pin(tls.acceptor().accept(stream));
        let tls_stream = match tokio::time::timeout(within, handshake).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return self.refused(addr, format!("TLS handshake failed: {e}")),
            Err(_) => return self.refused(addr, "TLS handshake timed out".into()),
        };
        if self.use_identity_as_username {
            let name = tls_stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(tls::common_name);
            match name {
                Some(n) => peer.certificate_identity = Some(n),
                None => {
                    return self.refused(
                        addr,
                        "the client certificate has no Common Name to use as username".into(),
                    )
                }
            }
        }
        if websocket {
            Box::pin(self.serve_websocket(tls_stream, peer)).await
        } else {
            Box::pin(self.broker.serve(tls_stream, peer)).await
        }
    }

    fn refused(&self, peer: SocketAddr, reason: String) {
        info!(listener = %self.name, %peer, %reason, "connection refused");
    }
}
