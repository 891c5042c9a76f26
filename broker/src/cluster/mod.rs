//! Cluster mode: several broker processes on one Redis serve one MQTT
//! service.
//!
//! # Contract
//! - One node at a time is the **leader**: the one holding the Redis
//!   prefix's lease (`storage_redis`'s lease module: one owner, every write
//!   script fenced by its token). It runs the broker (sessions, routing,
//!   retained messages, wills, bridges) on the Redis store and serves its
//!   listeners itself.
//! - Every other node is a **gateway**: its listeners accept connections
//!   and relay their bytes, untouched (TLS and WebSocket included), to the
//!   leader's listener of the same position in the config. Every node of a
//!   cluster has the same listeners in the same order.
//! - A gateway tries to take the lease every third of its TTL; when the
//!   leader dies its lease expires (Redis's clock), one gateway takes it,
//!   restores every session from Redis, and becomes the leader. Clients
//!   reconnect (to any node) and find their sessions.
//! - A leader stops serving as soon as its lease may no longer be its own:
//!   lost (another took it, or Redis was flushed) or not renewed for half
//!   its TTL (Redis unreachable, or the process was stopped). It exits at
//!   once with status [`LOST_LEAD_EXIT`], so that its supervisor restarts it
//!   as a gateway; what it had not committed was never acknowledged, and
//!   its late writes are refused by the fence.
//! - The leader advertises `{node_id, listeners}` under the prefix only
//!   after its listeners are bound; gateways never relay to an owner that
//!   has not advertised, nor to a former owner's addresses.

mod gateway;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use broker_core::Broker;
use serde::{Deserialize, Serialize};
use storage_redis::{Durability, LeaderLookup, LeaseHealth, OpenError, RedisStore};
use tracing::{error, info, warn};

use crate::hooks::Configured;
use crate::http::Http;
use crate::settings::{ClusterSettings, Settings};

pub use gateway::{Relayed, DEFAULT_MAX_RELAYS, WAIT_FOR_LEADER};

/// Exit status of a leader that lost its lease.
pub const LOST_LEAD_EXIT: i32 = 3;

/// What a leader publishes for the gateways.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advert {
    /// The leader's `[cluster] node_id`.
    pub node_id: String,
    /// Its listeners' addresses, in config order.
    pub listeners: Vec<String>,
}

/// Run this node until `stop`: a gateway until it takes the lead, then the
/// leader (see the module's contract).
pub async fn run(
    mut settings: Settings,
    hooks: Configured,
    http: Option<Http>,
    stop: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let cluster = settings
        .cluster
        .clone()
        .context("run_cluster_node without [cluster]")?;
    let url = settings.storage.clone();
    let shown = crate::storage_url::redact(&url);
    let lookup = LeaderLookup::connect(&url, Default::default())
        .await
        .with_context(|| format!("cannot reach the cluster's Redis at {shown}"))?;
    refuse_unsafe_redis(&lookup, &shown).await?;
    let lookup = Arc::new(lookup);
    let gateway = gateway::Gateway::start(&settings.listeners, lookup.clone())
        .await
        .context("cannot bind the gateway listeners")?;
    info!(node = %cluster.node_id, "cluster node {} started as a gateway; trying to take the lead", cluster.node_id);
    tokio::pin!(stop);
    let store = tokio::select! {
        store = take_lead(&url, &cluster) => match store {
            Ok(store) => store,
            Err(e) => {
                gateway.stop().await;
                return Err(e.context(format!("cannot take the cluster's lead on {shown}")));
            }
        },
        stopped = &mut stop => {
            gateway.stop().await;
            info!("stopped");
            return stopped;
        }
    };
    let store = Arc::new(store);
    // Clients keep the addresses they knew: the leader serves on the ones
    // the gateway had (a port 0 is resolved once, at start).
    for (listener, addr) in settings.listeners.iter_mut().zip(gateway.local_addrs()) {
        listener.bind = addr.to_string();
    }
    // The gateway's relays lead to the former leader, which is gone.
    gateway.stop().await;
    info!(node = %cluster.node_id, "cluster node {} is the leader: restoring sessions from Redis", cluster.node_id);
    watch_lease(store.clone());
    let advertise = {
        let store = store.clone();
        let cluster = cluster.clone();
        move |_broker: Broker, addrs: Vec<std::net::SocketAddr>| async move {
            let advert = Advert {
                node_id: cluster.node_id.clone(),
                listeners: addrs
                    .iter()
                    .map(|a| match &cluster.advertise {
                        Some(host) => join_host_port(host, a.port()),
                        None => a.to_string(),
                    })
                    .collect(),
            };
            let value = serde_json::to_string(&advert).context("cannot encode the advert")?;
            store
                .advertise(&value)
                .await
                .map_err(|e| anyhow::anyhow!("cannot advertise the leader: {}", e.report()))?;
            info!(node = %advert.node_id, listeners = ?advert.listeners, "advertised as the cluster's leader");
            Ok(())
        }
    };
    crate::serve::serve(
        &settings,
        store.storage(),
        hooks,
        http.as_ref(),
        stop,
        advertise,
    )
    .await
}

/// `host:port`, with brackets for an IPv6 host.
fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A cluster keeps its promises only on a Redis that fsyncs every write
/// and never evicts: refuse any other.
async fn refuse_unsafe_redis(lookup: &LeaderLookup, shown: &str) -> anyhow::Result<()> {
    let durability = lookup
        .durability()
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.report()))?;
    if durability != Durability::EveryWrite {
        anyhow::bail!(
            "the cluster's Redis at {shown} does not fsync every write ({}): a cluster node needs \
             `appendonly yes` and `appendfsync always` (and `maxmemory-policy noeviction`), so \
             that an acknowledged message survives a Redis crash",
            durability.describe()
        );
    }
    Ok(())
}

/// Open the store, waiting while another node holds its lease.
async fn take_lead(url: &str, cluster: &ClusterSettings) -> anyhow::Result<RedisStore> {
    let ttl = storage_redis::RedisOptions::from_url(url)?.lease_ttl;
    let pause = ttl / 3;
    let mut following: Option<String> = None;
    let mut unreachable_logged = false;
    loop {
        match RedisStore::open(url, Default::default()).await {
            Ok(store) => return Ok(store),
            Err(OpenError::Locked { holder, .. }) => {
                let holder = holder.to_string();
                if following.as_deref() != Some(holder.as_str()) {
                    info!(node = %cluster.node_id, "following the cluster's leader ({holder})");
                    following = Some(holder);
                }
                unreachable_logged = false;
                tokio::time::sleep(pause).await;
            }
            // What waiting does not fix.
            Err(
                e @ (OpenError::InvalidUrl { .. }
                | OpenError::Layout { .. }
                | OpenError::Evicting { .. }),
            ) => return Err(e.into()),
            Err(e) => {
                if !unreachable_logged {
                    warn!(
                        "cannot take the cluster's lead yet (retrying): {:#}",
                        anyhow::Error::new(e)
                    );
                    unreachable_logged = true;
                }
                tokio::time::sleep(pause.max(Duration::from_millis(200))).await;
            }
        }
    }
}

/// Exit the process once the lease may be another node's; see the
/// module's contract.
fn watch_lease(store: Arc<RedisStore>) {
    let every =
        (store.lease_ttl() / 20).clamp(Duration::from_millis(10), Duration::from_millis(200));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let why = match store.lease_health() {
                LeaseHealth::Held => continue,
                LeaseHealth::Silent(d) => format!("not renewed for {} ms", d.as_millis()),
                LeaseHealth::Lost(why) => why,
            };
            error!(
                "this node lost the cluster's lead ({why}): exiting with status {LOST_LEAD_EXIT} \
                 so that its supervisor restarts it as a gateway; nothing it acknowledged is lost"
            );
            eprintln!("error: lost the cluster's lead ({why})");
            std::process::exit(LOST_LEAD_EXIT);
        }
    });
}
