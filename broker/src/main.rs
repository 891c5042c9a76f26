//! The `broker` binary: reads settings (flags over a TOML file over defaults),
//! opens the storage named by a URL, serves MQTT, and shuts down gracefully on
//! SIGINT/SIGTERM.
//!
//! It knows the concrete storage crates (one Cargo feature each) so that the
//! core does not have to.

/// mimalloc rather than the system allocator: routing allocates and frees
/// small objects on every worker thread for every message, where glibc's
/// malloc spent about an eighth of the broker's time and held on to memory
/// freed by closed connections.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use anyhow::Context;
use broker_core::Broker;
use clap::Parser;
use tracing::{error, info};

use broker::settings::{Cli, Settings};
use broker::storage_url;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(return_memory_when_idle)
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Hand freed memory back to the kernel when a worker thread goes idle, at
/// most once a second per thread. mimalloc keeps freed pages for reuse and
/// purges them only as the thread that owns them keeps allocating, so the
/// memory of a slow consumer that left stayed in the broker's RSS (+24 MiB
/// in `scripts/hostile`) until traffic came back.
fn return_memory_when_idle() {
    use std::cell::Cell;
    use std::time::{Duration, Instant};
    thread_local! {
        static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    LAST.with(|last| {
        let now = Instant::now();
        if last
            .get()
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            last.set(Some(now));
            // SAFETY: mi_collect only walks this thread's own heap.
            unsafe { libmimalloc_sys::mi_collect(false) };
        }
    });
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // Handlers first: a signal that comes once "listening on" is printed
    // must stop the broker gracefully, not kill it.
    let stop = wait_for_signal()?;
    let settings = Settings::load(cli)?;
    let storage = storage_url::open(&settings.storage)
        .await
        .with_context(|| format!("cannot open storage `{}`", settings.storage))?;
    let mut builder = Broker::builder()
        .config(settings.broker.clone())
        .sys(settings.sys.clone())
        .storage(storage);
    for addr in &settings.listen {
        builder = builder.listen(addr.as_str());
    }
    let broker = builder.start().await?;
    for addr in broker.local_addrs() {
        info!("listening on {addr}");
    }

    stop.await?;
    info!("shutting down: closing connections and flushing storage");
    broker.shutdown().await;
    info!("stopped");
    Ok(())
}

/// Install the SIGINT/SIGTERM handlers now; the future resolves at the first signal.
fn wait_for_signal() -> anyhow::Result<impl std::future::Future<Output = anyhow::Result<()>>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        Ok(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            Ok(())
        })
    }
    #[cfg(not(unix))]
    Ok(async {
        tokio::signal::ctrl_c()
            .await
            .context("cannot handle Ctrl-C")
    })
}
