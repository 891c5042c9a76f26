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
use clap::Parser;
use tracing::error;

use broker::settings::{self, Cli, Command, FileConfig, LogFormat, LogSettings, Settings};
use broker::storage_url;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The offline tools print their own report; the storage drivers' INFO
    // lines would only be in its way.
    let quiet = matches!(
        cli.command,
        Some(Command::Sessions { .. } | Command::Retained { .. } | Command::Migrate { .. })
    );
    let file = config_file(&cli);
    init_logs(
        &file.as_ref().map(|f| f.log.clone()).unwrap_or_default(),
        if quiet { "warn" } else { "info" },
    );
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = settings::worker_threads(&cli, file.as_ref()) {
        builder.worker_threads(n);
    }
    let runtime = match builder
        .enable_all()
        .on_thread_park(broker::memory::on_worker_park)
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

/// The config file, read before anything else so that every log line is
/// in the chosen format and the runtime has the chosen threads. A file
/// that cannot be read or parsed gives `None` here; `Settings::load`
/// reports why afterwards.
fn config_file(cli: &Cli) -> Option<FileConfig> {
    cli.config
        .as_ref()
        .and_then(|path| std::fs::read_to_string(path).ok())
        .and_then(|text| FileConfig::parse(&text).ok())
}

/// Logs to stderr, levels from `RUST_LOG` (default `default_level`).
/// Without `[log] connections`, the connection module's INFO lines are
/// filtered out at their call sites, which then cost nothing.
fn init_logs(log: &LogSettings, default_level: &str) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    if !log.connections {
        if let Ok(directive) = "broker_core::connection=warn".parse() {
            filter = filter.add_directive(directive);
        }
    }
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log.format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(Command::Passwd {
        file,
        user,
        password_stdin,
        delete,
        argon2,
    }) = &cli.command
    {
        let scheme = if *argon2 {
            broker_auth::password::Scheme::Argon2id
        } else {
            broker_auth::password::Scheme::Pbkdf2Sha512
        };
        return broker::passwd::run(file, user, *delete, *password_stdin, scheme);
    }
    if let Some(Command::Check) = &cli.command {
        return broker::check::run(cli, &mut std::io::stdout()).await;
    }
    if let Some(Command::Sessions {
        storage,
        client,
        json,
    }) = &cli.command
    {
        let url = broker::inspect::storage_of(&cli, storage.as_deref())?;
        let mut out = std::io::stdout().lock();
        return broker::inspect::sessions(&url, client.as_deref(), *json, &mut out).await;
    }
    if let Some(Command::Retained {
        storage,
        filter,
        json,
    }) = &cli.command
    {
        let url = broker::inspect::storage_of(&cli, storage.as_deref())?;
        let mut out = std::io::stdout().lock();
        return broker::inspect::retained(&url, filter, *json, &mut out).await;
    }
    if let Some(Command::Migrate {
        from,
        to,
        retained_filters,
    }) = &cli.command
    {
        let options = broker::migrate::Options {
            retained_filters: retained_filters.clone(),
            ..Default::default()
        };
        return broker::migrate::run(from, to, &options).await.map(drop);
    }
    // Handlers first: a signal that comes once "listening on" is printed
    // must stop the broker gracefully, not kill it.
    let stop = wait_for_signal()?;
    let settings = Settings::load(cli)?;
    let hooks = broker::hooks::Configured::from_settings(&settings.auth)?;
    // Before the storage: /health answers while a large store is restored.
    let http = broker::http::Http::start(&settings.http).await?;
    if settings.cluster.is_some() {
        return run_cluster_node(settings, hooks, http, stop).await;
    }
    let storage = storage_url::open(&settings.storage)
        .await
        .with_context(|| format!("cannot open storage `{}`", settings.storage))?;
    broker::serve::serve(
        &settings,
        storage,
        hooks,
        http.as_ref(),
        stop,
        |_, _| async { Ok(()) },
    )
    .await
}

#[cfg(feature = "redis")]
async fn run_cluster_node(
    settings: Settings,
    hooks: broker::hooks::Configured,
    http: Option<broker::http::Http>,
    stop: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    broker::cluster::run(settings, hooks, http, stop).await
}

#[cfg(not(feature = "redis"))]
async fn run_cluster_node(
    _: Settings,
    _: broker::hooks::Configured,
    _: Option<broker::http::Http>,
    _: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    anyhow::bail!(
        "[cluster] needs the Redis backend: this broker was built without the `redis` feature"
    )
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
