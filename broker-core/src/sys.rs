//! `$SYS` topics, published through the boundary like any internal
//! publisher (so the delivery authorization decides who reads them):
//!
//! - Mosca's event topics, as they happen: `$SYS/<broker-id>/new/clients`
//!   and `$SYS/<broker-id>/disconnect/clients` (payload: the client id),
//!   `$SYS/<broker-id>/new/subscribes` and `.../new/unsubscribes` (payload:
//!   `{"clientId": ..., "topic": ...}`), QoS 0, not retained;
//! - Mosquitto's statistics under `$SYS/broker/`, retained, every
//!   `interval_secs` seconds.
//!
//! The broker id is `[sys] broker_id`, or else an id generated once and
//! kept in the store (as the retained message `$SYS/broker/id`), so it
//! stays the same across restarts. The publisher listens to client events
//! only, never to per-message ones, so it costs nothing per message.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::broker::{Core, Origin};
use crate::events::Event;
use crate::message::{now_ms, Message, QoS};

/// Room for client events between two runs of the publisher; beyond it,
/// `$SYS` event messages are dropped (and counted), never the broker slowed.
const EVENT_CAPACITY: usize = 4096;
/// Where the generated broker id is kept.
const ID_TOPIC: &str = "$SYS/broker/id";

/// Start the `$SYS` publisher if `[sys] enabled`.
pub(crate) async fn start(core: &Arc<Core>) {
    let config = core.sys_config().clone();
    if !config.enabled {
        return;
    }
    let id = match config.broker_id {
        Some(id) => id,
        None => stored_id(core).await,
    };
    info!(broker_id = %id, interval_secs = config.interval_secs, "$SYS topics on");
    let mut events = core.events().subscribe(EVENT_CAPACITY, false, None);
    let weak = Arc::downgrade(core);
    let shutdown = core.shutdown_token();
    let interval = config.interval_secs;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(interval.max(1)));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                event = events.recv() => {
                    let Some(event) = event else { return };
                    let Some(core) = weak.upgrade() else { return };
                    if let Some((topic, payload)) = event_message(&id, &event) {
                        publish(&core, topic, payload, false).await;
                    }
                }
                _ = tick.tick(), if interval > 0 => {
                    let Some(core) = weak.upgrade() else { return };
                    let mut stats = statistics(&core);
                    // The store has no count: the retained messages are read
                    // (bodies included) once per interval.
                    match core.storage().retained.lookup_retained("#").await {
                        Ok(r) => stats.push(("$SYS/broker/retained messages/count".into(), r.len().to_string())),
                        Err(e) => warn!(error = %e.report(), "cannot count retained messages for $SYS"),
                    }
                    for (topic, value) in stats {
                        publish(&core, topic, value, true).await;
                    }
                }
            }
        }
    });
}

/// The id kept in the store, or a new one stored now.
async fn stored_id(core: &Core) -> String {
    let retained = &core.storage().retained;
    match retained.lookup_retained(ID_TOPIC).await {
        Ok(found) => {
            if let Some(id) = found
                .first()
                .and_then(|m| std::str::from_utf8(&m.payload).ok())
                .filter(|id| !id.is_empty())
            {
                return id.to_string();
            }
        }
        Err(e) => {
            warn!(error = %e.report(), "cannot read the stored $SYS broker id: a new one is used")
        }
    }
    let id = format!(
        "{:012x}",
        (now_ms() ^ (u64::from(std::process::id()) << 40)) & 0xffff_ffff_ffff
    );
    let mut m = Message::new(ID_TOPIC, id.clone(), QoS::AtMostOnce, true);
    m.id = 0;
    if let Err(e) = retained.set_retained(Arc::new(m)).await {
        warn!(error = %e.report(), "cannot store the $SYS broker id");
    }
    id
}

/// Mosca's `$SYS/<id>/...` message for an event, if it has one.
fn event_message(id: &str, event: &Event) -> Option<(String, String)> {
    Some(match event {
        Event::ClientConnected { client, .. } => (
            format!("$SYS/{id}/new/clients"),
            client.client_id.to_string(),
        ),
        Event::ClientDisconnected { client, .. } => (
            format!("$SYS/{id}/disconnect/clients"),
            client.client_id.to_string(),
        ),
        Event::Subscribed { client, filter, .. } => (
            format!("$SYS/{id}/new/subscribes"),
            client_topic(&client.client_id, filter),
        ),
        Event::Unsubscribed { client, filter } => (
            format!("$SYS/{id}/new/unsubscribes"),
            client_topic(&client.client_id, filter),
        ),
        _ => return None,
    })
}

fn client_topic(client: &str, topic: &str) -> String {
    format!(
        "{{\"clientId\":{},\"topic\":{}}}",
        json_string(client),
        json_string(topic)
    )
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Mosquitto's `$SYS/broker/` statistics, now.
fn statistics(core: &Core) -> Vec<(String, String)> {
    use std::sync::atomic::Ordering::Relaxed;
    let s = core.stats();
    let (mut connected, mut offline, mut queued, mut subscriptions) = (0u64, 0u64, 0u64, 0u64);
    for session in core.all_sessions() {
        let st = session.lock();
        if st.is_online() {
            connected += 1;
        } else {
            offline += 1;
        }
        queued += st.queue_len() as u64;
        subscriptions += st.subscriptions().len() as u64;
    }
    let stats = [
        ("version", format!("broker {}", env!("CARGO_PKG_VERSION"))),
        (
            "uptime",
            format!("{} seconds", core.started().elapsed().as_secs()),
        ),
        ("clients/connected", connected.to_string()),
        ("clients/disconnected", offline.to_string()),
        ("clients/total", (connected + offline).to_string()),
        (
            "clients/maximum",
            s.clients_maximum.load(Relaxed).to_string(),
        ),
        ("messages/received", s.received.load(Relaxed).to_string()),
        ("messages/sent", s.sent.load(Relaxed).to_string()),
        ("bytes/received", s.bytes_received.load(Relaxed).to_string()),
        ("bytes/sent", s.bytes_sent.load(Relaxed).to_string()),
        (
            "publish/messages/dropped",
            s.dropped.load(Relaxed).to_string(),
        ),
        ("subscriptions/count", subscriptions.to_string()),
        ("store/messages/count", queued.to_string()),
    ];
    stats
        .into_iter()
        .map(|(k, v)| (format!("$SYS/broker/{k}"), v))
        .collect()
}

async fn publish(core: &Core, topic: String, payload: String, retain: bool) {
    let message = Message::new(topic, payload, QoS::AtMostOnce, retain);
    match core.publish(message, &Origin::Internal, None).await {
        Ok(accepted) => drop(accepted.committed),
        Err(e) => warn!(error = %e.report(), "$SYS message not published"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_topic_payload_is_json() {
        assert_eq!(
            client_topic("a\"b", "x/\\y"),
            r#"{"clientId":"a\"b","topic":"x/\\y"}"#
        );
    }
}
