//! Serving MQTT on an open storage: the broker, its listeners, webhook and
//! bridges, until a stop signal; then a graceful shutdown.
//!
//! One path for a single broker and for a cluster's leader: the leader
//! differs only in what it does once its listeners are bound (it tells the
//! other nodes where they are), see `cluster`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use broker_auth::FileAuth;
use broker_core::storage::Storage;
use broker_core::Broker;
use tracing::{info, warn};

use crate::hooks::Configured;
use crate::http::Http;
use crate::settings::Settings;

/// Serve `settings` on `storage` until `stop` resolves. `listening` is
/// called once every listener is bound, with their addresses in the
/// order of `settings.listeners`; an error from it stops the broker.
pub async fn serve<L, F>(
    settings: &Settings,
    storage: Storage,
    hooks: Configured,
    http: Option<&Http>,
    stop: impl Future<Output = anyhow::Result<()>>,
    listening: L,
) -> anyhow::Result<()>
where
    L: FnOnce(Broker, Vec<SocketAddr>) -> F,
    F: Future<Output = anyhow::Result<()>>,
{
    let mut builder = Broker::builder()
        .config(settings.broker.clone())
        .sys(settings.sys.clone())
        .storage(storage);
    if let Some(hook) = hooks.authenticate {
        builder = builder.authenticate(hook);
    }
    if let Some(hook) = hooks.authorize {
        builder = builder.authorize(hook);
    }
    let broker = builder.start().await?;
    let _watched = crate::memory::Watched::new(&broker);
    let webhook = match &settings.webhook {
        Some(w) => match broker_http_hooks::Webhook::start(&broker, &w.config()) {
            Ok(hook) => Some(hook),
            Err(e) => {
                broker.shutdown().await;
                return Err(anyhow::Error::new(e).context("invalid [webhook] settings"));
            }
        },
        None => None,
    };
    let mut reloads = Vec::new();
    let mut addrs = Vec::new();
    for config in &settings.listeners {
        let listener = match broker_net::bind(&broker, config).await {
            Ok(l) => l,
            Err(e) => {
                broker.shutdown().await;
                return Err(e.into());
            }
        };
        // Plain MQTT as it always was (scripts read this line); others name their protocol.
        match listener.protocol() {
            broker_net::Protocol::Mqtt => info!("listening on {}", listener.local_addr()),
            other => info!("listening on {} ({other})", listener.local_addr()),
        }
        addrs.push(listener.local_addr());
        if let Some(tls) = listener.tls_reload() {
            reloads.push((listener.name().to_string(), tls));
        }
        tokio::spawn(listener.run());
    }
    reload_on_hangup(hooks.files, reloads)?;
    let mut bridges = Vec::new();
    for config in &settings.bridges {
        match broker_bridge::Bridge::start(&broker, config.clone()) {
            Ok(b) => {
                info!(bridge = %config.name, "bridge {} to {}: {} topics", config.name, config.address, config.topics.len());
                bridges.push(b);
            }
            Err(e) => {
                for b in bridges {
                    b.stop().await;
                }
                broker.shutdown().await;
                return Err(e.into());
            }
        }
    }
    if let Err(e) = listening(broker.clone(), addrs).await {
        for b in bridges {
            b.stop().await;
        }
        broker.shutdown().await;
        return Err(e);
    }
    if let Some(http) = http {
        http.started(
            &broker,
            crate::http::Extras {
                webhook: webhook.as_ref().map(|w| w.watch()),
                http_auth: hooks.http.clone(),
            },
        );
    }

    stop.await?;
    if let Some(http) = http {
        http.stopping();
    }
    info!("shutting down: closing connections and flushing storage");
    // Bridges first: each says DISCONNECT to its remote and detaches its
    // local session, whose unacknowledged messages stay queued.
    for b in bridges {
        b.stop().await;
    }
    broker.shutdown().await;
    if let Some(webhook) = webhook {
        let s = webhook.finish(std::time::Duration::from_secs(5)).await;
        info!(
            sent = s.sent,
            dropped = s.dropped,
            failed_posts = s.failed_posts,
            "webhook finished"
        );
    }
    info!("stopped");
    Ok(())
}

/// On SIGHUP, read the password, ACL and TLS files again. A file that does
/// not load keeps what was loaded before, with a log line saying why.
fn reload_on_hangup(
    auth: Option<Arc<FileAuth>>,
    tls: Vec<(String, broker_net::TlsReload)>,
) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                if let Some(auth) = &auth {
                    match auth.reload() {
                        Ok(()) => info!("reloaded the [auth] files"),
                        Err(e) => warn!(
                            "reload of the [auth] files failed, keeping the previous ones: {}",
                            report(&e)
                        ),
                    }
                }
                for (name, reload) in &tls {
                    match reload.reload() {
                        Ok(()) => {
                            info!(listener = %name, cert = %reload.cert_path().display(), "reloaded TLS certificate and key")
                        }
                        Err(e) => {
                            warn!(listener = %name, "TLS reload failed, keeping the previous certificate: {}", report(&e))
                        }
                    }
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = (auth, tls);
    Ok(())
}

/// An error with its sources, on one line.
fn report(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}
