//! `broker check [--config F]`: everything the broker would do at start but
//! serve. Validates the settings, loads the files they name (TLS
//! certificates, password and ACL files), checks the HTTP hooks' and the
//! webhook's settings and the bridges (with their CA files), opens the storage and closes it again, and prints
//! what it would listen on. Exits non-zero with the reason at the first
//! problem.
//!
//! A storage held by a running broker is reported as such and is not a
//! failure: checking a configuration before restarting the broker that
//! uses it is what the command is for.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;

use crate::hooks::Configured;
use crate::settings::{Cli, Settings};
use crate::storage_url;

/// How long opening the storage may take (a server backend waits up to its
/// lease TTL to see whether a holder is alive).
const STORAGE_WITHIN: Duration = Duration::from_secs(60);

/// Run the check, printing the report to `out`.
pub async fn run(cli: Cli, out: &mut impl Write) -> anyhow::Result<()> {
    let source = cli.config.clone();
    let settings = Settings::load(cli)?;
    match &source {
        Some(path) => writeln!(out, "config {}: valid", path.display())?,
        None => writeln!(out, "no config file: defaults and flags are valid")?,
    }
    match settings.worker_threads {
        Some(n) => writeln!(out, "worker threads: {n}")?,
        None => writeln!(out, "worker threads: one per CPU core")?,
    }
    for l in &settings.listeners {
        if l.protocol.is_tls() {
            broker_net::TlsReload::load(l)
                .with_context(|| format!("listener {} ({})", l.bind, l.protocol))?;
        }
        let mut notes = Vec::new();
        if l.protocol.is_websocket() {
            notes.push(format!("path {}", l.path()));
        }
        if l.protocol.is_tls() {
            notes.push("certificate and key load".to_owned());
            if l.require_certificate {
                notes.push("client certificate required".to_owned());
            }
        }
        notes.push(
            if l.allow_anonymous == Some(true) {
                "anonymous clients allowed"
            } else {
                "anonymous clients refused"
            }
            .to_owned(),
        );
        writeln!(
            out,
            "would listen on {} ({}): {}",
            l.bind,
            l.protocol,
            notes.join(", ")
        )?;
    }
    if let Some(bind) = &settings.http.bind {
        writeln!(
            out,
            "would serve HTTP on {bind} (/metrics, /health, /ready, /api/v1/): {}",
            if settings.http.token.is_some() {
                "token required"
            } else {
                "no token (loopback only)"
            }
        )?;
    }
    let hooks = Configured::from_settings(&settings.auth)?;
    let auth = &settings.auth;
    for (what, set) in [
        (
            "password file",
            auth.password_file.as_ref().map(|p| p.display().to_string()),
        ),
        (
            "ACL file",
            auth.acl_file.as_ref().map(|p| p.display().to_string()),
        ),
        ("HTTP authentication", auth.http_authenticate.clone()),
        (
            "HTTP publish authorization",
            auth.http_authorize_publish.clone(),
        ),
        (
            "HTTP subscribe authorization",
            auth.http_authorize_subscribe.clone(),
        ),
    ] {
        if let Some(v) = set {
            writeln!(out, "{what}: {v}")?;
        }
    }
    drop(hooks);
    for b in &settings.bridges {
        broker_bridge::check(b)?;
        writeln!(
            out,
            "would bridge {} to {}: {} topics (MQTT {}{}, remote client id {})",
            b.name,
            b.address,
            b.topics.len(),
            match b.protocol {
                broker_bridge::MqttVersion::V311 => "3.1.1",
                broker_bridge::MqttVersion::V5 => "5",
            },
            if b.tls { ", TLS" } else { "" },
            b.client_id
        )?;
    }
    if let Some(w) = &settings.webhook {
        w.config()
            .validate()
            .context("invalid [webhook] settings")?;
        writeln!(out, "webhook: {}", w.url)?;
    }
    let url = &settings.storage;
    // A check leaves no trace: a SQLite file that does not exist yet is not
    // created (opening would), its directory is checked instead.
    if let Some(path) = storage_url::sqlite_path(url)? {
        let path = std::path::Path::new(path);
        if !path.exists() {
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => std::path::Path::new("."),
            };
            // The nearest directory that exists (a relative path ends in "").
            let existing = dir
                .ancestors()
                .map(|d| {
                    if d.as_os_str().is_empty() {
                        std::path::Path::new(".")
                    } else {
                        d
                    }
                })
                .find(|d| d.exists())
                .unwrap_or(dir);
            let writable = std::fs::metadata(existing)
                .map(|m| m.is_dir() && !m.permissions().readonly())
                .unwrap_or(false);
            if !writable {
                anyhow::bail!(
                    "storage {url}: {} does not exist and {} is not a writable directory",
                    path.display(),
                    existing.display()
                );
            }
            writeln!(
                out,
                "storage {url}: {} does not exist yet; the broker creates it at start",
                path.display()
            )?;
            writeln!(out, "check passed")?;
            return Ok(());
        }
    }
    match tokio::time::timeout(STORAGE_WITHIN, storage_url::open(url)).await {
        Ok(Ok(storage)) => {
            // Dropping the stores closes them and releases their lease.
            drop(storage);
            writeln!(out, "storage {url}: opens")?;
        }
        Ok(Err(e)) if storage_url::held_by_another(&e) => {
            writeln!(out, "storage {url}: in use by a running broker ({e:#})")?;
        }
        Ok(Err(e)) => return Err(e.context(format!("storage {url} does not open"))),
        Err(_) => anyhow::bail!(
            "storage {url} does not open: no answer within {} s",
            STORAGE_WITHIN.as_secs()
        ),
    }
    writeln!(out, "check passed")?;
    Ok(())
}
