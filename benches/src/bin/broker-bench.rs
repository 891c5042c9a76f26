//! `broker-bench`: end-to-end load for any MQTT 3.1.1 broker over TCP.
//!
//! How each scenario measures what it measures: the docs of `benches::load`.
//!
//! ```sh
//! cargo build --release -p benches --bin broker-bench
//! target/release/broker-bench --port 1883 --label broker fan-in --qos 1
//! target/release/broker-bench --label broker --json results.jsonl fan-out --qos 1 --rate 2000
//! target/release/broker-bench --pid $(pgrep -n mosquitto) conn --connections 10000
//! ```
//!
//! Prints a table and, as the last line of stdout, the result as one JSON
//! object (also appended to `--json FILE`). Exits non-zero when a check
//! failed (QoS ≥ 1 losses, order violations, QoS 2 duplicates, errors).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use benches::load::{
    self, payload::HEADER_LEN, ConnOptions, FlowOptions, PersistentOptions, Scenario, Shape, Target,
};
use clap::{Args, Parser, Subcommand};

/// Longest measured window, hold or drain, in seconds.
const MAX_SECS: u64 = 600;

/// End-to-end MQTT 3.1.1 load: the same client against any broker.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    scenario: Command,
}

#[derive(Debug, Args)]
struct Global {
    /// Broker host.
    #[arg(long, global = true, default_value = "127.0.0.1")]
    host: String,
    /// Broker port.
    #[arg(long, global = true, default_value_t = 1883)]
    port: u16,
    /// Port subscribers connect to, on the same host (default: --port):
    /// publishers on one node of a cluster, subscribers on another.
    #[arg(long, global = true)]
    subscriber_port: Option<u16>,
    /// Free text copied to the result (e.g. mosquitto, broker-memory).
    #[arg(long, global = true, default_value = "")]
    label: String,
    /// Append the result to FILE as one JSON object per line.
    #[arg(long, global = true, value_name = "FILE")]
    json: Option<PathBuf>,
    /// The broker's process id, to report its memory (VmRSS).
    #[arg(long, global = true)]
    pid: Option<u32>,
    /// Tokio worker threads for the tool (1: the tool takes one core, the broker the other).
    #[arg(long, global = true, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// No progress lines on stderr.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// How to reach the broker: tcp, tls, ws or wss.
    #[arg(long, global = true, value_enum, default_value_t = TransportArg::Tcp)]
    transport: TransportArg,
    /// PEM CA certificate to trust for tls and wss (the server certificate must name the host's IP).
    #[arg(long, global = true, value_name = "FILE")]
    cafile: Option<PathBuf>,
    /// WebSocket path for ws and wss.
    #[arg(long, global = true, default_value = "/mqtt")]
    ws_path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TransportArg {
    Tcp,
    Tls,
    Ws,
    Wss,
}

/// The transport of the flags; TLS trusts `--cafile` only.
fn transport(g: &Global) -> Result<load::client::Transport> {
    use load::client::Transport;
    let tls = || -> Result<std::sync::Arc<rustls::ClientConfig>> {
        let path = g
            .cafile
            .as_ref()
            .context("--cafile is needed for tls and wss")?;
        let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots
                .add(cert.with_context(|| format!("a certificate in {}", path.display()))?)
                .context("adding the CA")?;
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // Every connection a full handshake: what a fleet of devices
        // coming back after an outage costs.
        config.resumption = rustls::client::Resumption::disabled();
        Ok(std::sync::Arc::new(config))
    };
    Ok(match g.transport {
        TransportArg::Tcp => Transport::Tcp,
        TransportArg::Tls => Transport::Tls(tls()?),
        TransportArg::Ws => Transport::Ws(g.ws_path.clone()),
        TransportArg::Wss => Transport::Wss(tls()?, g.ws_path.clone()),
    })
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Connection storm, idle hold, then a PINGREQ on each connection.
    Conn {
        /// Connections to open.
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        connections: u64,
        /// Connection attempts in flight at once.
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        concurrency: u32,
        /// Seconds to hold the connections idle.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=MAX_SECS))]
        hold: u64,
        /// Connect each with a QoS 1 will (on `lt/will/{client id}`).
        #[arg(long)]
        will: bool,
    },
    /// Publishers -> one topic -> subscribers (default 4 -> 1).
    FanIn {
        /// Publisher connections.
        #[arg(long, default_value_t = 4)]
        publishers: usize,
        /// Subscriber connections.
        #[arg(long, default_value_t = 1)]
        subscribers: usize,
        #[command(flatten)]
        flow: FlowArgs,
    },
    /// Publishers -> one topic -> subscribers (default 1 -> 50).
    FanOut {
        /// Publisher connections.
        #[arg(long, default_value_t = 1)]
        publishers: usize,
        /// Subscriber connections.
        #[arg(long, default_value_t = 50)]
        subscribers: usize,
        #[command(flatten)]
        flow: FlowArgs,
    },
    /// N publisher/subscriber pairs, each pair on its own topic.
    Pairs {
        /// Number of pairs.
        #[arg(long, alias = "pairs", default_value_t = 10)]
        publishers: usize,
        #[command(flatten)]
        flow: FlowArgs,
    },
    /// Offline persistent sessions: subscribe, go away, publish, come back and drain.
    Persistent {
        /// Persistent subscribers (clean session = 0).
        #[arg(long, default_value_t = 10)]
        subscribers: usize,
        /// Publishers.
        #[arg(long, default_value_t = 1)]
        publishers: usize,
        /// Messages in total over all publishers.
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
        messages: u64,
        /// QoS of subscriptions and publishes.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
        qos: u8,
        /// Payload bytes (at least 24: the header).
        #[arg(long, default_value_t = 64)]
        payload: usize,
        /// Unacknowledged publishes per publisher.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
        inflight: u16,
        /// A topic per subscriber, published round-robin (default: one topic for all).
        #[arg(long)]
        topic_per_subscriber: bool,
        /// Seconds the drain may take.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=MAX_SECS))]
        drain_timeout: u64,
        /// Seconds without an acknowledgement before giving up on the rest.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=MAX_SECS))]
        grace: u64,
    },
}

/// Options of the publish/subscribe scenarios.
#[derive(Debug, Args)]
struct FlowArgs {
    /// QoS of publishes and subscriptions.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// Payload bytes (at least 24: the header).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Total publishes per second over all publishers; 0 = flat out.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Seconds measured, after the warm-up.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=MAX_SECS))]
    duration: u64,
    /// Seconds of warm-up, excluded from the figures.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=60))]
    warmup: u64,
    /// Unacknowledged QoS 1/2 publishes each publisher may have outstanding.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    inflight: u16,
    /// Messages a publisher may be ahead of its slowest subscriber (end-to-end window); 0 = no limit.
    #[arg(long, default_value_t = 1000)]
    backlog: u64,
    /// Seconds without progress before giving up on outstanding deliveries (QoS >= 1).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=MAX_SECS))]
    grace: u64,
}

fn check_payload(payload: usize) -> Result<()> {
    if payload < HEADER_LEN {
        bail!(
            "--payload must be at least {HEADER_LEN} bytes (run tag, stream, sequence, timestamp)"
        );
    }
    if payload > 64 * 1024 * 1024 {
        bail!("--payload above 64 MiB is not supported");
    }
    Ok(())
}

fn flow(shape: Shape, publishers: usize, subscribers: usize, a: FlowArgs) -> Result<Scenario> {
    check_payload(a.payload)?;
    if publishers == 0 || subscribers == 0 || publishers > 100_000 || subscribers > 100_000 {
        bail!("publishers and subscribers must be between 1 and 100000");
    }
    Ok(Scenario::Flow(FlowOptions {
        shape,
        publishers,
        subscribers,
        qos: a.qos,
        payload: a.payload,
        rate: a.rate,
        duration: Duration::from_secs(a.duration),
        warmup: Duration::from_secs(a.warmup),
        inflight: usize::from(a.inflight),
        backlog: a.backlog,
        grace: Duration::from_secs(a.grace),
    }))
}

fn scenario(c: Command) -> Result<Scenario> {
    Ok(match c {
        Command::Conn {
            connections,
            concurrency,
            hold,
            will,
        } => Scenario::Conn(ConnOptions {
            connections,
            concurrency: concurrency as usize,
            hold: Duration::from_secs(hold),
            will,
        }),
        Command::FanIn {
            publishers,
            subscribers,
            flow: a,
        } => flow(Shape::FanIn, publishers, subscribers, a)?,
        Command::FanOut {
            publishers,
            subscribers,
            flow: a,
        } => flow(Shape::FanOut, publishers, subscribers, a)?,
        Command::Pairs {
            publishers,
            flow: a,
        } => flow(Shape::Pairs, publishers, publishers, a)?,
        Command::Persistent {
            subscribers,
            publishers,
            messages,
            qos,
            payload,
            inflight,
            topic_per_subscriber,
            drain_timeout,
            grace,
        } => {
            check_payload(payload)?;
            if publishers == 0 || subscribers == 0 || publishers > 100_000 || subscribers > 100_000
            {
                bail!("publishers and subscribers must be between 1 and 100000");
            }
            Scenario::Persistent(PersistentOptions {
                subscribers,
                publishers,
                messages,
                qos,
                payload,
                inflight: usize::from(inflight),
                topic_per_subscriber,
                drain_timeout: Duration::from_secs(drain_timeout),
                grace: Duration::from_secs(grace),
            })
        }
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("broker-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Run and report; `Ok(false)` when a check failed.
fn run(cli: Cli) -> Result<bool> {
    let g = cli.global;
    let scenario = scenario(cli.scenario)?;
    let threads = usize::from(g.threads);
    let rt = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
    .context("starting the runtime")?;
    let outcome = rt.block_on(async {
        let addr = tokio::net::lookup_host((g.host.as_str(), g.port))
            .await
            .with_context(|| format!("resolving {}", g.host))?
            .next()
            .with_context(|| format!("{} has no address", g.host))?;
        let subscriber_endpoint = match g.subscriber_port {
            Some(port) => Some(load::client::Endpoint {
                addr: std::net::SocketAddr::new(addr.ip(), port),
                transport: transport(&g)?,
            }),
            None => None,
        };
        let target = Target {
            endpoint: load::client::Endpoint {
                addr,
                transport: transport(&g)?,
            },
            subscriber_endpoint,
            label: g.label.clone(),
            pid: g.pid,
            threads,
            quiet: g.quiet,
        };
        load::run(&target, &scenario).await
    })?;
    let r = &outcome.result;
    print!("{}", r.table());
    println!("{}", r.json_line());
    if let Some(path) = &g.json {
        r.append_json(path)?;
    }
    for f in &outcome.failures {
        eprintln!("FAILED: {f}");
    }
    Ok(outcome.failures.is_empty())
}
