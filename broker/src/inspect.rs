//! `broker sessions` and `broker retained`: what a storage holds, read
//! offline through the same storage traits the broker uses, so that what
//! they show is what a broker started on the storage would restore.
//!
//! Offline because every backend admits one process at a time (SQLite's
//! exclusive lock, the lease of a Redis prefix or MongoDB database): a
//! storage a broker runs on is refused with a message saying so, rather
//! than read behind the broker's back.

use std::io::Write;

use anyhow::{bail, Context};
use broker_core::message::Message;
use broker_core::storage::lease::format_utc_ms;
use broker_core::storage::{PacketStore, Storage, StoredSession};
use serde_json::json;

use crate::settings::{Cli, FileConfig, DEFAULT_STORAGE};
use crate::storage_url::{self, Opened};

/// Entries read per `read_queue` call when counting a queue: a queue is
/// never loaded whole.
const PAGE: usize = 1000;

/// Characters of a payload shown in a preview.
const PREVIEW_CHARS: usize = 40;

/// The storage a subcommand works on: its own `--storage`, else the
/// top-level one, else the config file's, else the default.
pub fn storage_of(cli: &Cli, given: Option<&str>) -> anyhow::Result<String> {
    if let Some(url) = given.or(cli.storage.as_deref()) {
        return Ok(url.to_owned());
    }
    if let Some(path) = &cli.config {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let file = FileConfig::parse(&text)
            .with_context(|| format!("invalid config file {}", path.display()))?;
        if let Some(url) = file.storage {
            return Ok(url);
        }
    }
    Ok(DEFAULT_STORAGE.to_owned())
}

/// Open `url` for a tool that runs beside no broker. `what` names it in
/// errors ("the source storage"), `command` is the subcommand to run again.
///
/// An existing store is required unless `create` is set: opening a SQLite
/// path creates the file, and a mistyped path must not leave an empty
/// database behind or be listed as an empty storage.
pub async fn open_offline(
    url: &str,
    what: &str,
    command: &str,
    create: bool,
) -> anyhow::Result<Opened> {
    let shown = storage_url::redact(url);
    if let Some(path) = storage_url::sqlite_path(url)? {
        if !create && !std::path::Path::new(path).exists() {
            bail!("{what} {shown}: there is no database at {path}");
        }
    }
    match storage_url::open_closable(url).await {
        Ok(opened) => Ok(opened),
        Err(e) if storage_url::held_by_another(&e) => Err(e.context(format!(
            "{what} {shown} is in use: a broker is running on it. Stop that broker first, \
             then run `broker {command}` again"
        ))),
        Err(e) => Err(e.context(format!("cannot open {what} {shown}"))),
    }
}

/// `broker sessions`: print the sessions of `url` (or the one of `client`).
pub async fn sessions(
    url: &str,
    client: Option<&str>,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let opened = open_offline(url, "storage", "sessions", false).await?;
    let result = print_sessions(&opened.storage, client, json, out).await;
    opened.close().await;
    result
}

/// What `broker sessions` shows of one session.
struct SessionInfo {
    session: StoredSession,
    queued: u64,
    queued_bytes: u64,
    incoming_qos2: Vec<u16>,
}

async fn print_sessions(
    storage: &Storage,
    client: Option<&str>,
    as_json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let mut sessions = storage
        .subscriptions
        .load_sessions()
        .await
        .context("cannot load the sessions")?;
    if let Some(id) = client {
        sessions.retain(|s| s.record.client_id == id);
        if sessions.is_empty() {
            bail!("no stored session of client `{id}`");
        }
    }
    sessions.sort_by(|a, b| a.record.client_id.cmp(&b.record.client_id));
    let mut any = false;
    if as_json {
        write!(out, "[")?;
    }
    for (i, mut session) in sessions.into_iter().enumerate() {
        session
            .subscriptions
            .sort_by(|a, b| a.filter.cmp(&b.filter));
        let id = session.record.client_id.clone();
        let (queued, queued_bytes) = queue_size(&*storage.packets, &id)
            .await
            .with_context(|| format!("cannot read the queue of `{id}`"))?;
        let incoming_qos2 = storage
            .packets
            .incoming_qos2(&id)
            .await
            .with_context(|| format!("cannot read the incoming QoS 2 ids of `{id}`"))?;
        let info = SessionInfo {
            session,
            queued,
            queued_bytes,
            incoming_qos2,
        };
        // One session at a time: a storage of many sessions is printed as
        // it is read, not held.
        if as_json {
            let sep = if i == 0 { "\n  " } else { ",\n  " };
            write!(out, "{sep}{}", session_json(&info))?;
        } else {
            writeln!(out, "{}", session_line(&info))?;
        }
        any = true;
    }
    if as_json {
        writeln!(out, "{}]", if any { "\n" } else { "" })?;
    }
    Ok(())
}

/// Entries queued for `client` and their payload bytes, page by page.
pub async fn queue_size(packets: &dyn PacketStore, client: &str) -> anyhow::Result<(u64, u64)> {
    let (mut count, mut bytes, mut after) = (0u64, 0u64, None);
    loop {
        let page = packets.read_queue(client, after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.seq);
        count += page.len() as u64;
        bytes += page
            .iter()
            .map(|p| p.message.payload.len() as u64)
            .sum::<u64>();
        if page.len() < PAGE {
            break;
        }
    }
    Ok((count, bytes))
}

fn session_line(info: &SessionInfo) -> String {
    let r = &info.session.record;
    let expiry = r
        .expiry_secs
        .map_or_else(|| "never".to_owned(), |s| format!("{s}s"));
    let disconnected = r
        .disconnected_at_ms
        .map_or_else(|| "connected".to_owned(), format_utc_ms);
    let subs: Vec<String> = info
        .session
        .subscriptions
        .iter()
        .map(|s| format!("{} qos{}", s.filter, s.options.qos.as_u8()))
        .collect();
    let qos2: Vec<String> = info.incoming_qos2.iter().map(u16::to_string).collect();
    format!(
        "{} expiry={expiry} disconnected_at=\"{disconnected}\" subscriptions={} [{}] queued={} queued_bytes={} incoming_qos2=[{}]",
        r.client_id,
        subs.len(),
        subs.join(", "),
        info.queued,
        info.queued_bytes,
        qos2.join(",")
    )
}

fn session_json(info: &SessionInfo) -> serde_json::Value {
    let r = &info.session.record;
    let subs: Vec<serde_json::Value> = info
        .session
        .subscriptions
        .iter()
        .map(|s| {
            json!({
                "filter": s.filter,
                "qos": s.options.qos.as_u8(),
                "no_local": s.options.no_local,
                "retain_as_published": s.options.retain_as_published,
                "retain_handling": s.options.retain_handling,
                "subscription_id": s.options.subscription_id,
            })
        })
        .collect();
    json!({
        "client_id": r.client_id,
        "expiry_secs": r.expiry_secs,
        "disconnected_at_ms": r.disconnected_at_ms,
        "subscriptions": subs,
        "queued": info.queued,
        "queued_bytes": info.queued_bytes,
        "incoming_qos2": info.incoming_qos2,
    })
}

/// `broker retained`: print the retained messages of `url` that match
/// any of `filters`.
pub async fn retained(
    url: &str,
    filters: &[String],
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let opened = open_offline(url, "storage", "retained", false).await?;
    let result = lookup_all(&opened.storage, filters).await;
    opened.close().await;
    let messages = result?;
    if json {
        let all: Vec<serde_json::Value> = messages
            .iter()
            .map(|m| {
                json!({
                    "topic": m.topic,
                    "qos": m.qos.as_u8(),
                    "id": m.id,
                    "bytes": m.payload.len(),
                    "received_at_ms": m.received_at_ms,
                    "preview": preview(&m.payload),
                })
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&all)?)?;
    } else {
        for m in &messages {
            writeln!(
                out,
                "{} qos={} bytes={} preview={}",
                m.topic,
                m.qos.as_u8(),
                m.payload.len(),
                preview(&m.payload)
            )?;
        }
    }
    Ok(())
}

/// The retained messages matching any of `filters`, each once, by topic.
pub async fn lookup_all(
    storage: &Storage,
    filters: &[String],
) -> anyhow::Result<Vec<std::sync::Arc<Message>>> {
    let mut all = std::collections::BTreeMap::new();
    for filter in filters {
        if let Err(e) = broker_core::topic::validate_filter(filter) {
            bail!("invalid topic filter `{filter}`: {e}");
        }
        let found = storage
            .retained
            .lookup_retained(filter)
            .await
            .with_context(|| format!("cannot look up the retained messages of `{filter}`"))?;
        for m in found {
            all.insert(m.topic.clone(), m);
        }
    }
    Ok(all.into_values().collect())
}

/// A short printable form of a payload: quoted text with control
/// characters escaped, or the first bytes in hex when it is not UTF-8.
pub fn preview(payload: &[u8]) -> String {
    match std::str::from_utf8(payload) {
        Ok(text) => {
            let mut shown: String = text.chars().take(PREVIEW_CHARS).collect();
            if text.chars().count() > PREVIEW_CHARS {
                shown.push('…');
            }
            format!("{shown:?}")
        }
        Err(_) => {
            let hex: String = payload
                .iter()
                .take(PREVIEW_CHARS / 2)
                .map(|b| format!("{b:02x}"))
                .collect();
            let more = if payload.len() > PREVIEW_CHARS / 2 {
                "…"
            } else {
                ""
            };
            format!("0x{hex}{more}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_text_and_binary() {
        assert_eq!(preview(b"hello"), "\"hello\"");
        assert_eq!(preview(b"a\nb"), "\"a\\nb\"");
        assert_eq!(preview(&[0xff, 0x00]), "0xff00");
        let long = "x".repeat(100);
        assert_eq!(preview(long.as_bytes()), format!("\"{}…\"", "x".repeat(40)));
    }
}
