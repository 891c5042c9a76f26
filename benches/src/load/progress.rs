//! Once a second, a line on stderr: elapsed time, phase, publishes sent and
//! acknowledged, deliveries, and the delivery (or connect) rate over the last
//! second. stdout is left to the result.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::roles::Live;

/// Print progress until `done` fires (nothing when `quiet`).
pub fn spawn(live: Arc<Live>, done: CancellationToken, quiet: bool) -> JoinHandle<()> {
    tokio::spawn(async move {
        if quiet {
            return;
        }
        let start = Instant::now();
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_secs(1),
            Duration::from_secs(1),
        );
        let (mut last_sent, mut last_delivered, mut last_connected) = (0, 0, 0);
        let mut last_at = Instant::now();
        loop {
            tokio::select! {
                _ = done.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            let dt = now.duration_since(last_at).as_secs_f64().max(1e-3);
            last_at = now;
            let sent = live.sent.load(Relaxed);
            let delivered = live.delivered.load(Relaxed);
            let connected = live.connected.load(Relaxed);
            let elapsed = start.elapsed().as_secs_f64();
            let line = if connected > 0 || live.phase() == "connect" {
                format!(
                    "[{elapsed:6.1}s] {:<8} connected {connected} ({:.0}/s)",
                    live.phase(),
                    (connected.saturating_sub(last_connected)) as f64 / dt
                )
            } else {
                format!(
                    "[{elapsed:6.1}s] {:<8} sent {sent} ({:.0}/s) acked {} delivered {delivered} ({:.0}/s)",
                    live.phase(),
                    (sent - last_sent.min(sent)) as f64 / dt,
                    live.acked.load(Relaxed),
                    (delivered - last_delivered.min(delivered)) as f64 / dt
                )
            };
            eprintln!("{line}");
            (last_sent, last_delivered, last_connected) = (sent, delivered, connected);
        }
    })
}
