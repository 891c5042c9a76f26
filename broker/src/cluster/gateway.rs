//! A gateway node's listeners: each accepted connection is relayed, byte
//! for byte, to the leader's listener of the same position.
//!
//! # Contract
//! - Listener `i` of this node relays to listener `i` of the advert the
//!   live leader published; nothing is parsed, so TLS, WebSocket and every
//!   MQTT version pass through, and the leader applies its own listener
//!   settings (certificates, anonymous access, limits).
//! - While no leader is advertised (an election), a new connection waits
//!   up to [`WAIT_FOR_LEADER`] for one, then is closed; the client's
//!   reconnection finds the new leader.
//! - Each listener holds at most its `max_connections` (default
//!   [`DEFAULT_MAX_RELAYS`]) relays; one more is closed at accept, counted
//!   and logged (once per second at most).
//! - [`Gateway::stop`] closes the listeners and every relay: a node that
//!   takes the lead stops relaying to the former leader.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use broker_net::ListenerConfig;
use storage_redis::LeaderLookup;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Advert;

/// How long a new connection waits for a leader to be advertised.
pub const WAIT_FOR_LEADER: Duration = Duration::from_secs(10);

/// Relays a listener holds at once unless its `max_connections` says.
pub const DEFAULT_MAX_RELAYS: usize = 10_000;

/// How long an advert read from Redis is used before it is read again.
const ADVERT_FRESH: Duration = Duration::from_millis(500);

/// Connecting to the leader's listener gives up after this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Counters of a gateway, over its life.
#[derive(Debug, Default)]
pub struct Relayed {
    /// Connections relayed to a leader.
    pub relayed: AtomicU64,
    /// Relays open now.
    pub open: AtomicU64,
    /// Connections closed at accept: the listener's limit was reached.
    pub refused_limit: AtomicU64,
    /// Connections closed because no leader was advertised in time, or
    /// its listener could not be reached.
    pub no_leader: AtomicU64,
}

/// The leader's advert, read through a short cache.
struct Leader {
    lookup: Arc<LeaderLookup>,
    cached: Mutex<Option<(Advert, Instant)>>,
}

impl Leader {
    /// The advert, from the cache while fresh, else from Redis.
    async fn get(&self) -> Option<Advert> {
        if let Some((advert, at)) = &*lock(&self.cached) {
            if at.elapsed() < ADVERT_FRESH {
                return Some(advert.clone());
            }
        }
        let value = match self.lookup.leader().await {
            Ok(v) => v?,
            Err(e) => {
                debug!("cannot read the leader's advert: {}", e.report());
                return None;
            }
        };
        match serde_json::from_str::<Advert>(&value) {
            Ok(advert) => {
                *lock(&self.cached) = Some((advert.clone(), Instant::now()));
                Some(advert)
            }
            Err(e) => {
                warn!("the leader's advert is not understood ({e}): {value:?}");
                None
            }
        }
    }

    /// Forget the cached advert (its address did not answer).
    fn forget(&self) {
        *lock(&self.cached) = None;
    }
}

/// The relaying listeners of a gateway node.
pub(crate) struct Gateway {
    cancel: CancellationToken,
    tasks: JoinSet<()>,
    stats: Arc<Relayed>,
    bound: Vec<SocketAddr>,
}

impl Gateway {
    /// Bind every listener of `listeners` and start relaying.
    pub(crate) async fn start(
        listeners: &[ListenerConfig],
        lookup: Arc<LeaderLookup>,
    ) -> std::io::Result<Gateway> {
        let leader = Arc::new(Leader {
            lookup,
            cached: Mutex::new(None),
        });
        let cancel = CancellationToken::new();
        let stats = Arc::new(Relayed::default());
        let mut tasks = JoinSet::new();
        let mut bound = Vec::with_capacity(listeners.len());
        for (index, config) in listeners.iter().enumerate() {
            let socket = TcpListener::bind(&config.bind).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot bind {}: {e}", config.bind))
            })?;
            let local = socket.local_addr()?;
            bound.push(local);
            info!(
                "listening on {local} (gateway to the leader's listener {})",
                index + 1
            );
            let limit = config.max_connections.unwrap_or(DEFAULT_MAX_RELAYS);
            tasks.spawn(accept_loop(
                socket,
                index,
                Arc::new(Semaphore::new(limit)),
                leader.clone(),
                stats.clone(),
                cancel.clone(),
            ));
        }
        Ok(Gateway {
            cancel,
            tasks,
            stats,
            bound,
        })
    }

    /// The addresses bound, in config order (a port 0 resolved): the
    /// leader this node may become binds the same ones.
    pub(crate) fn local_addrs(&self) -> &[SocketAddr] {
        &self.bound
    }

    /// Close the listeners and every relay, and wait until they are.
    pub(crate) async fn stop(mut self) {
        self.cancel.cancel();
        while self.tasks.join_next().await.is_some() {}
        let s = &self.stats;
        info!(
            relayed = s.relayed.load(Ordering::Relaxed),
            refused_at_limit = s.refused_limit.load(Ordering::Relaxed),
            no_leader = s.no_leader.load(Ordering::Relaxed),
            "gateway stopped"
        );
    }
}

async fn accept_loop(
    socket: TcpListener,
    index: usize,
    slots: Arc<Semaphore>,
    leader: Arc<Leader>,
    stats: Arc<Relayed>,
    cancel: CancellationToken,
) {
    let mut relays = JoinSet::new();
    let mut last_refusal_log: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            a = socket.accept() => a,
            _ = cancel.cancelled() => break,
            // Reap finished relays so the set stays as large as the open ones.
            Some(_) = relays.join_next(), if !relays.is_empty() => continue,
        };
        let (client, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: pause, do not spin.
                warn!("gateway accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            stats.refused_limit.fetch_add(1, Ordering::Relaxed);
            if last_refusal_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                last_refusal_log = Some(Instant::now());
                warn!(
                    "gateway listener {}: connection limit reached, closing {peer} ({} refused so far)",
                    index + 1,
                    stats.refused_limit.load(Ordering::Relaxed)
                );
            }
            continue;
        };
        let (leader, stats, cancel) = (leader.clone(), stats.clone(), cancel.clone());
        relays.spawn(async move {
            let _slot = slot;
            tokio::select! {
                _ = relay(client, peer, index, &leader, &stats) => {}
                _ = cancel.cancelled() => {}
            }
        });
    }
    drop(socket);
    relays.shutdown().await;
}

/// Relay one client connection to the leader until either side closes.
async fn relay(
    mut client: TcpStream,
    peer: SocketAddr,
    index: usize,
    leader: &Leader,
    stats: &Relayed,
) {
    let Some(mut upstream) = connect_to_leader(index, leader).await else {
        stats.no_leader.fetch_add(1, Ordering::Relaxed);
        warn!(
            "gateway: no leader reachable within {} s, closing {peer}",
            WAIT_FOR_LEADER.as_secs()
        );
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    stats.relayed.fetch_add(1, Ordering::Relaxed);
    stats.open.fetch_add(1, Ordering::Relaxed);
    let copied = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    stats.open.fetch_sub(1, Ordering::Relaxed);
    debug!(%peer, ?copied, "gateway relay closed");
}

/// A connection to listener `index` of the advertised leader, waiting up
/// to [`WAIT_FOR_LEADER`] for one to be advertised and to answer.
async fn connect_to_leader(index: usize, leader: &Leader) -> Option<TcpStream> {
    let deadline = Instant::now() + WAIT_FOR_LEADER;
    loop {
        if let Some(advert) = leader.get().await {
            match advert.listeners.get(index) {
                Some(addr) => {
                    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr.as_str()))
                        .await
                    {
                        Ok(Ok(s)) => return Some(s),
                        Ok(Err(e)) => {
                            debug!("leader {} at {addr}: {e}", advert.node_id);
                            leader.forget();
                        }
                        Err(_) => leader.forget(),
                    }
                }
                None => {
                    warn!(
                        "the leader ({}) has {} listeners, this gateway's listener {} has none to \
                         relay to: every node of a cluster needs the same listeners",
                        advert.node_id,
                        advert.listeners.len(),
                        index + 1
                    );
                    return None;
                }
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
