//! `restore-bench`: how long the broker takes to start, and how much memory
//! it holds, when its SQLite store carries a big backlog of offline
//! persistent sessions; then how fast some of them drain when they come back.
//!
//! ```sh
//! cargo build --release -p benches --bin restore-bench
//! # 100,000 sessions x 100 queued QoS 1 messages of 64 bytes (10 M messages)
//! target/release/restore-bench fill --db /tmp/rb/big.db --sessions 100000 --per-session 100
//! cp /tmp/rb/big.db /tmp/rb/run.db   # a broker run deletes what it delivers
//! target/release/restore-bench start --broker target/release/broker \
//!     --db /tmp/rb/run.db --port 18831 --drain 100
//! ```
//!
//! `fill` writes through the storage API (`storage-sqlite`, the broker's own
//! adapter), as the broker would have: for each session `dev-{i}` a session
//! record (never expires, disconnected now), one QoS 1 subscription to
//! `dev/{i}`, and `--per-session` messages on `dev/{i}` queued for that
//! session alone, sequence numbers 1..=M. Message ids are unique over the
//! store, from 1, increasing in the order written. Each payload starts with
//! its sequence number and its session's index (8 bytes each, big-endian), so
//! a drain can check that every message reached the right session, in order,
//! none missing.
//!
//! `start` runs the broker binary on the store (`--listen 127.0.0.1:P
//! --storage sqlite://ABS --config F`, F setting `max_connection_rate = 0`)
//! and measures:
//! - start time: from spawn until the port accepts a TCP connection (polled
//!   every 10 ms; the broker binds its listeners only once its store is
//!   restored);
//! - the broker's VmRSS and VmHWM (`/proc/PID/status`) right then and 2 s later;
//! - with `--drain K`: K clients `dev-0`..`dev-{K-1}` connect at once with
//!   clean session 0 (MQTT 3.1.1), each receives and PUBACKs its queue; drain
//!   time is from the first CONNECT to the last message, and VmRSS/VmHWM are
//!   read right after;
//! - the time SIGTERM takes to stop it.
//!
//! The broker's output goes to stderr with its time since spawn, and to
//! `--log FILE` if given. The last line of stdout is the result as one JSON
//! object. The broker is killed when its RSS passes `--max-rss-gb`, when a
//! phase runs past its timeout, or on any error. The OS page cache is left as
//! it is: a store just filled or copied is read from memory, not from disk.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use benches::load::client::{ConnectOptions, Connection, Endpoint};
use broker_core::message::{Message, QoS};
use broker_core::storage::{
    ClientId, Delivery, PacketOp, PacketStore, QueueTarget, SessionRecord, SubscriptionRecord,
    SubscriptionStore,
};
use broker_core::subscription::SubscriptionOptions;
use bytes::{BufMut, Bytes, BytesMut};
use clap::{Args, Parser, Subcommand, ValueEnum};
use rmqtt_codec::v3;
use storage_sqlite::{SqliteOptions, SqliteStore};

/// Bytes of the payload header: sequence number, session index.
const HEADER: u64 = 16;

/// The broker's start time and memory on a big SQLite backlog, and the drain.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a SQLite store holding offline sessions with queued messages.
    Fill(FillArgs),
    /// Start the broker on a store, measure start time and RSS, drain some sessions.
    Start(StartArgs),
}

#[derive(Debug, Args)]
struct FillArgs {
    /// The SQLite file to create (must not exist).
    #[arg(long)]
    db: PathBuf,
    /// Persistent sessions `dev-0`..`dev-{N-1}`.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    sessions: u64,
    /// Messages queued for each session.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    per_session: u64,
    /// Payload bytes (at least 16: sequence number and session index).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(HEADER..=1_048_576))]
    payload: u64,
    /// Queue entries per `PacketStore::write` call (one transaction).
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    batch: u64,
    /// Order of the messages: all of a session's together (`grouped`), or
    /// round-robin over the sessions as a fleet publishing over time would
    /// (`interleaved`: each batch touches pages all over the queue table,
    /// much slower to fill).
    #[arg(long, value_enum, default_value_t = Order::Grouped)]
    order: Order,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Order {
    Grouped,
    Interleaved,
}

#[derive(Debug, Args)]
struct StartArgs {
    /// The broker binary.
    #[arg(long)]
    broker: PathBuf,
    /// The SQLite store (filled by `fill`; a run deletes what it drains, so use a copy).
    #[arg(long)]
    db: PathBuf,
    /// Loopback port for the broker to listen on.
    #[arg(long, default_value_t = 18830)]
    port: u16,
    /// Sessions `dev-0`..`dev-{K-1}` to reconnect and drain; 0: none.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=15_000))]
    drain: u64,
    /// Messages queued per session (as filled); each drained session must receive exactly these.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    per_session: u64,
    /// Passed to the broker: unacknowledged QoS 1/2 deliveries per session.
    #[arg(long)]
    max_inflight: Option<u16>,
    /// Seconds the broker may take to accept connections.
    #[arg(long, default_value_t = 1800, value_parser = clap::value_parser!(u64).range(1..=7200))]
    start_timeout: u64,
    /// Seconds the drain may take.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=7200))]
    drain_timeout: u64,
    /// Seconds the broker may take to stop after SIGTERM (then SIGKILL).
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=3600))]
    stop_timeout: u64,
    /// Kill the broker when its RSS passes this many GiB.
    #[arg(long, default_value_t = 18.0)]
    max_rss_gb: f64,
    /// Also write the broker's output to FILE.
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Fill(a) => fill(a),
        Command::Start(a) => start(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("restore-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

// ---------------------------------------------------------------- fill

/// The payload of message `seq` of session `session`.
fn payload(session: u64, seq: u64, len: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(len);
    b.put_u64(seq);
    b.put_u64(session);
    b.resize(len, b'x');
    b.freeze()
}

/// `(seq, session)` from a payload of [`payload`].
fn parse_payload(p: &[u8]) -> Option<(u64, u64)> {
    let seq = u64::from_be_bytes(p.get(0..8)?.try_into().ok()?);
    let session = u64::from_be_bytes(p.get(8..16)?.try_into().ok()?);
    Some((seq, session))
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn fill(a: FillArgs) -> Result<()> {
    for p in [
        a.db.clone(),
        with_suffix(&a.db, "-wal"),
        with_suffix(&a.db, "-shm"),
    ] {
        if p.exists() {
            bail!("{} exists; fill creates a new store", p.display());
        }
    }
    let total = a
        .sessions
        .checked_mul(a.per_session)
        .filter(|t| *t < 1 << 53)
        .context("--sessions x --per-session is too large")?;
    let len = usize::try_from(a.payload).context("--payload")?;
    let batch = usize::try_from(a.batch).context("--batch")?;
    let started = Instant::now();
    let store = Arc::new(
        SqliteStore::open(&a.db, SqliteOptions::default())
            .with_context(|| format!("opening {}", a.db.display()))?,
    );
    let rt = runtime()?;
    rt.block_on(async {
        let now = broker_core::message::now_ms();
        let clients: Vec<ClientId> = (0..a.sessions)
            .map(|i| ClientId::from(format!("dev-{i}")))
            .collect();
        let topics: Vec<String> = (0..a.sessions).map(|i| format!("dev/{i}")).collect();
        for (i, client) in clients.iter().enumerate() {
            store
                .save_session(&SessionRecord {
                    client_id: client.to_string(),
                    expiry_secs: None,
                    disconnected_at_ms: Some(now),
                })
                .await
                .with_context(|| format!("saving session {client}"))?;
            store
                .add_subscriptions(
                    client,
                    &[SubscriptionRecord {
                        filter: topics[i].clone(),
                        options: SubscriptionOptions::new(QoS::AtLeastOnce),
                    }],
                )
                .await
                .with_context(|| format!("adding the subscription of {client}"))?;
        }
        eprintln!(
            "{} sessions and subscriptions in {:.1} s",
            a.sessions,
            started.elapsed().as_secs_f64()
        );
        let queued = Instant::now();
        let mut ops = Vec::with_capacity(batch);
        let mut id = 0u64;
        let mut next_report = 1_000_000u64;
        // (session, seq) of message number `n` (0-based) in the chosen order.
        let at = |n: u64| match a.order {
            Order::Grouped => (n / a.per_session, n % a.per_session + 1),
            Order::Interleaved => (n % a.sessions, n / a.sessions + 1),
        };
        for n in 0..total {
            let (s, seq) = at(n);
            let si = usize::try_from(s).context("session index")?;
            id += 1;
            let mut m = Message::new(
                topics[si].clone(),
                payload(s, seq, len),
                QoS::AtLeastOnce,
                false,
            );
            m.id = id;
            ops.push(PacketOp::Enqueue {
                message: Arc::new(m),
                targets: vec![QueueTarget {
                    client: clients[si].clone(),
                    seq,
                    delivery: Delivery::new(QoS::AtLeastOnce),
                }],
            });
            if ops.len() == batch || n + 1 == total {
                let b = std::mem::replace(&mut ops, Vec::with_capacity(batch));
                store
                    .write(b)
                    .await
                    .with_context(|| format!("writing the batch ending at message {id}"))?;
            }
            if id >= next_report || id == total {
                next_report += 1_000_000;
                let secs = queued.elapsed().as_secs_f64();
                eprintln!(
                    "{id} / {total} messages, {secs:.1} s, {:.0} msg/s, db {:.1} MiB + wal {:.1} MiB",
                    id as f64 / secs.max(1e-9),
                    mib(file_size(&a.db)),
                    mib(file_size(&with_suffix(&a.db, "-wal"))),
                );
            }
        }
        let used = store.used_bytes().await.context("reading the used size")?;
        eprintln!("live pages: {:.1} MiB", mib(used));
        anyhow::Ok(())
    })?;
    drop(rt);
    // The last handle: the worker thread closes the database, which
    // checkpoints the WAL into the file and deletes it.
    let closing = Instant::now();
    drop(store);
    let wal = file_size(&with_suffix(&a.db, "-wal"));
    let size = file_size(&a.db);
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "filled {} sessions x {} messages ({} B payload, {:?}) in {secs:.1} s (close/checkpoint {:.1} s): {} is {size} bytes ({:.1} MiB), wal {wal} bytes",
        a.sessions,
        a.per_session,
        a.payload,
        a.order,
        closing.elapsed().as_secs_f64(),
        a.db.display(),
        mib(size),
    );
    println!(
        "{}",
        serde_json::json!({
            "tool": "restore-bench fill",
            "db": a.db.display().to_string(),
            "sessions": a.sessions,
            "per_session": a.per_session,
            "messages": total,
            "payload": a.payload,
            "order": format!("{:?}", a.order).to_lowercase(),
            "fill_s": (secs * 10.0).round() / 10.0,
            "db_bytes": size,
            "wal_bytes": wal,
        })
    );
    Ok(())
}

/// `line` without ANSI escape sequences (colours).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, ended by a letter.
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

// ---------------------------------------------------------------- start

/// VmRSS and VmHWM of `pid` in kB.
fn memory_kb(pid: u32) -> Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .with_context(|| format!("no {name} line in {path}"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// The broker process: killed and reaped when dropped, so that no error
/// path leaves it running.
struct Broker {
    child: Arc<Mutex<Child>>,
    pid: u32,
    spawned: Instant,
    /// Set by the watchdog when the RSS limit was passed and it killed the broker.
    over_limit: Arc<AtomicBool>,
    peak_rss_kb: Arc<AtomicU64>,
    stop_watchdog: Arc<AtomicBool>,
    watchdog: Option<JoinHandle<()>>,
    output: Vec<JoinHandle<()>>,
    lines: Arc<Mutex<Vec<String>>>,
    reaped: Option<ExitStatus>,
}

impl Broker {
    fn spawn(mut cmd: Process, max_rss_kb: u64, log: Option<File>) -> Result<Broker> {
        cmd.env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawned = Instant::now();
        let mut child = cmd.spawn().context("starting the broker")?;
        let pid = child.id();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let log = log.map(|f| Arc::new(Mutex::new(f)));
        let mut output = Vec::new();
        let streams: [(Option<Box<dyn Read + Send>>, &str); 2] = [
            (
                child
                    .stdout
                    .take()
                    .map(|s| Box::new(s) as Box<dyn Read + Send>),
                "out",
            ),
            (
                child
                    .stderr
                    .take()
                    .map(|s| Box::new(s) as Box<dyn Read + Send>),
                "err",
            ),
        ];
        let child = Arc::new(Mutex::new(child));
        for (stream, name) in streams {
            let Some(stream) = stream else { continue };
            let (lines, log) = (lines.clone(), log.clone());
            let h = std::thread::Builder::new()
                .name(format!("broker-{name}"))
                .spawn(move || {
                    for line in BufReader::new(stream).lines() {
                        let Ok(line) = line else { break };
                        let t = spawned.elapsed().as_secs_f64();
                        let line = format!("[broker {name} +{t:.3}s] {}", strip_ansi(&line));
                        // One line per connection: to the log file only.
                        if !line.contains("broker_core::connection") {
                            eprintln!("{line}");
                        }
                        if let Some(f) = &log {
                            let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
                            let _ = writeln!(f, "{line}");
                        }
                        let mut l = lines.lock().unwrap_or_else(|e| e.into_inner());
                        if l.len() < 10_000 {
                            l.push(line);
                        }
                    }
                })
                .context("starting an output thread")?;
            output.push(h);
        }
        let over_limit = Arc::new(AtomicBool::new(false));
        let peak_rss_kb = Arc::new(AtomicU64::new(0));
        let stop_watchdog = Arc::new(AtomicBool::new(false));
        let watchdog = {
            let (child, over, peak, stop) = (
                child.clone(),
                over_limit.clone(),
                peak_rss_kb.clone(),
                stop_watchdog.clone(),
            );
            std::thread::Builder::new()
                .name("rss-watchdog".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((rss, _)) = memory_kb(pid) {
                            peak.fetch_max(rss, Ordering::Relaxed);
                            if rss > max_rss_kb {
                                eprintln!(
                                    "restore-bench: broker RSS {rss} kB is above the limit {max_rss_kb} kB: killing it"
                                );
                                over.store(true, Ordering::SeqCst);
                                let mut c = child.lock().unwrap_or_else(|e| e.into_inner());
                                let _ = c.kill();
                                return;
                            }
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                })
                .context("starting the watchdog")?
        };
        Ok(Broker {
            child,
            pid,
            spawned,
            over_limit,
            peak_rss_kb,
            stop_watchdog,
            watchdog: Some(watchdog),
            output,
            lines,
            reaped: None,
        })
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fail if the broker has exited or was killed for its memory.
    fn check_alive(&mut self) -> Result<()> {
        if self.over_limit.load(Ordering::SeqCst) {
            bail!(
                "the broker's RSS passed the limit (peak seen {} kB); killed",
                self.peak_rss_kb.load(Ordering::Relaxed)
            );
        }
        let status = self.child().try_wait().context("checking the broker")?;
        if let Some(status) = status {
            self.reaped = Some(status);
            bail!("the broker exited: {status}");
        }
        Ok(())
    }

    fn memory(&mut self) -> Result<(u64, u64)> {
        self.check_alive()?;
        memory_kb(self.pid)
    }

    /// Sleep `d`, failing early if the broker dies.
    fn sleep(&mut self, d: Duration) -> Result<()> {
        let until = Instant::now() + d;
        while Instant::now() < until {
            self.check_alive()?;
            std::thread::sleep(Duration::from_millis(50).min(until - Instant::now()));
        }
        Ok(())
    }

    /// SIGTERM, then wait up to `timeout` (SIGKILL after it). Returns the
    /// time it took and the exit status.
    fn stop(&mut self, timeout: Duration) -> Result<(Duration, ExitStatus)> {
        self.check_alive()?;
        let asked = Instant::now();
        let term = Process::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .context("running kill -TERM")?;
        if !term.success() {
            bail!("kill -TERM {} failed: {term}", self.pid);
        }
        loop {
            let exited = self.child().try_wait().context("waiting for the broker")?;
            if let Some(status) = exited {
                self.reaped = Some(status);
                return Ok((asked.elapsed(), status));
            }
            if asked.elapsed() > timeout {
                bail!("the broker did not stop within {timeout:?} of SIGTERM; killing it");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The broker's output lines so far that look like warnings or errors.
    fn notable_lines(&self) -> Vec<String> {
        let l = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        l.iter()
            .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("error"))
            .cloned()
            .collect()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if self.reaped.is_none() {
            let mut c = self.child();
            let _ = c.kill();
            let _ = c.wait();
        }
        self.stop_watchdog.store(true, Ordering::Relaxed);
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
        // The pipes close with the process; the readers then end.
        for h in self.output.drain(..) {
            let _ = h.join();
        }
    }
}

fn start(a: StartArgs) -> Result<()> {
    if !a.broker.is_file() {
        bail!("no broker binary at {}", a.broker.display());
    }
    let db = std::fs::canonicalize(&a.db)
        .with_context(|| format!("{} (run `fill` first)", a.db.display()))?;
    let db_str = db
        .to_str()
        .with_context(|| format!("{} is not UTF-8", db.display()))?;
    let wal = file_size(&with_suffix(&db, "-wal"));
    if wal > 0 {
        eprintln!("note: {} has a WAL of {wal} bytes", db.display());
    }
    if !(a.max_rss_gb > 0.0 && a.max_rss_gb < 1024.0) {
        bail!("--max-rss-gb must be between 0 and 1024");
    }
    let max_rss_kb = (a.max_rss_gb * 1024.0 * 1024.0) as u64;
    let addr = SocketAddr::from(([127, 0, 0, 1], a.port));
    // Something else on the port would answer the start-time probe.
    drop(TcpListener::bind(addr).with_context(|| format!("port {} is not free", a.port))?);
    let config = tempfile::Builder::new()
        .prefix("restore-bench-")
        .suffix(".toml")
        .tempfile()
        .context("creating the broker's config file")?;
    std::fs::write(config.path(), "[broker]\nmax_connection_rate = 0\n")
        .context("writing the broker's config file")?;
    let log = match &a.log {
        Some(p) => Some(File::create(p).with_context(|| format!("creating {}", p.display()))?),
        None => None,
    };
    let mut cmd = Process::new(&a.broker);
    cmd.arg("--config")
        .arg(config.path())
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--storage")
        .arg(format!("sqlite://{db_str}"));
    if let Some(n) = a.max_inflight {
        cmd.arg("--max-inflight").arg(n.to_string());
    }
    eprintln!("starting {cmd:?}");
    let db_bytes = file_size(&db);
    let mut broker = Broker::spawn(cmd, max_rss_kb, log)?;
    let pid = broker.pid;

    // Start time: until the port accepts.
    let deadline = broker.spawned + Duration::from_secs(a.start_timeout);
    let start_time = loop {
        broker.check_alive()?;
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            break broker.spawned.elapsed();
        }
        if Instant::now() > deadline {
            bail!(
                "the broker did not accept connections within {} s",
                a.start_timeout
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let (rss_start, hwm_start) = broker.memory()?;
    eprintln!(
        "accepting after {:.3} s: VmRSS {rss_start} kB, VmHWM {hwm_start} kB",
        start_time.as_secs_f64()
    );
    broker.sleep(Duration::from_secs(2))?;
    let (rss_2s, hwm_2s) = broker.memory()?;
    eprintln!("2 s later: VmRSS {rss_2s} kB, VmHWM {hwm_2s} kB");

    let mut drain = None;
    if a.drain > 0 {
        let result = {
            let rt = runtime()?;
            let timeout = Duration::from_secs(a.drain_timeout);
            let alive = broker.over_limit.clone();
            rt.block_on(drain_sessions(addr, a.drain, a.per_session, timeout, alive))
        };
        let d = match result {
            Ok(d) => d,
            Err(e) => {
                broker.check_alive()?;
                return Err(e);
            }
        };
        let (rss, hwm) = broker.memory()?;
        eprintln!(
            "drained {} sessions, {} messages in {:.3} s ({:.0} msg/s; CONNACKs after {:.3} s): VmRSS {rss} kB, VmHWM {hwm} kB",
            a.drain,
            d.messages,
            d.elapsed.as_secs_f64(),
            d.messages as f64 / d.elapsed.as_secs_f64().max(1e-9),
            d.connacks.as_secs_f64(),
        );
        drain = Some((d, rss, hwm));
    }
    let peak = broker.peak_rss_kb.load(Ordering::Relaxed);
    let (stop_time, status) = broker.stop(Duration::from_secs(a.stop_timeout))?;
    eprintln!(
        "stopped {:.3} s after SIGTERM: {status}",
        stop_time.as_secs_f64()
    );
    let notable = broker.notable_lines();
    drop(broker);
    if !notable.is_empty() {
        eprintln!("broker warnings/errors:");
        for l in &notable {
            eprintln!("  {l}");
        }
    }
    let ms = |d: Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
    let mut json = serde_json::json!({
        "tool": "restore-bench start",
        "broker": a.broker.display().to_string(),
        "db": db_str,
        "db_bytes": db_bytes,
        "pid": pid,
        "start_ms": ms(start_time),
        "rss_kb_at_start": rss_start,
        "hwm_kb_at_start": hwm_start,
        "rss_kb_after_2s": rss_2s,
        "hwm_kb_after_2s": hwm_2s,
        "drain_sessions": a.drain,
        "drain_msgs": 0,
        "drain_ms": serde_json::Value::Null,
        "drain_per_s": serde_json::Value::Null,
        "rss_kb_after_drain": serde_json::Value::Null,
        "hwm_kb_after_drain": serde_json::Value::Null,
        "peak_rss_kb_sampled": peak,
        "stop_ms": ms(stop_time),
        "exit": status.code(),
        "warnings": notable.len(),
    });
    if let Some((d, rss, hwm)) = drain {
        json["drain_msgs"] = d.messages.into();
        json["drain_ms"] = ms(d.elapsed).into();
        json["connack_ms"] = ms(d.connacks).into();
        json["drain_per_s"] =
            ((d.messages as f64 / d.elapsed.as_secs_f64().max(1e-9)).round() as u64).into();
        json["rss_kb_after_drain"] = rss.into();
        json["hwm_kb_after_drain"] = hwm.into();
    }
    println!("{json}");
    if !status.success() {
        bail!("the broker exited with {status} after SIGTERM");
    }
    Ok(())
}

struct Drained {
    messages: u64,
    /// From the first CONNECT to the last message.
    elapsed: Duration,
    /// From the first CONNECT to the last CONNACK.
    connacks: Duration,
}

/// Connect `dev-0`..`dev-{k-1}` at once, each receiving and acknowledging
/// its `m` messages; every session's must come in sequence order, none
/// missing, none extra (checked for 300 ms after the last).
async fn drain_sessions(
    addr: SocketAddr,
    k: u64,
    m: u64,
    timeout: Duration,
    killed: Arc<AtomicBool>,
) -> Result<Drained> {
    let begun = Instant::now();
    let deadline = tokio::time::Instant::from_std(begun + timeout);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..k {
        tasks.spawn(async move {
            let r = tokio::time::timeout_at(deadline, drain_one(addr, i, m, begun)).await;
            (i, r)
        });
    }
    let (mut last, mut connacks, mut messages) = (Duration::ZERO, Duration::ZERO, 0u64);
    let mut failures = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (i, r) = joined.context("a drain task panicked")?;
        match r {
            Ok(Ok(one)) => {
                last = last.max(one.done);
                connacks = connacks.max(one.connack);
                messages += m;
            }
            Ok(Err(e)) => failures.push(format!("dev-{i}: {e:#}")),
            Err(_) => failures.push(format!("dev-{i}: not drained within {timeout:?}")),
        }
        if killed.load(Ordering::SeqCst) {
            bail!("the broker was killed for its memory during the drain");
        }
    }
    if !failures.is_empty() {
        let shown: Vec<_> = failures.iter().take(10).cloned().collect();
        bail!(
            "{} of {k} sessions failed the drain: {}",
            failures.len(),
            shown.join("; ")
        );
    }
    Ok(Drained {
        messages,
        elapsed: last,
        connacks,
    })
}

struct OneDrained {
    connack: Duration,
    done: Duration,
}

async fn drain_one(addr: SocketAddr, i: u64, m: u64, begun: Instant) -> Result<OneDrained> {
    let mut opts = ConnectOptions::new(format!("dev-{i}"), false);
    opts.timeout = Duration::from_secs(120);
    let (conn, present) = Connection::connect(&Endpoint::tcp(addr), &opts).await?;
    let connack = begun.elapsed();
    if !present {
        bail!("CONNACK without session present: the stored session was not restored");
    }
    let (mut reader, mut writer) = conn.split();
    let topic = format!("dev/{i}");
    let mut next = 1u64;
    let mut check = |p: &rmqtt_codec::types::Publish| -> Result<Option<v3::Packet>> {
        if p.topic != topic.as_str() {
            bail!("message on {}, expected {topic}", p.topic);
        }
        let (seq, session) = parse_payload(&p.payload)
            .with_context(|| format!("a payload of {} bytes", p.payload.len()))?;
        if session != i {
            bail!("message of session {session}");
        }
        if seq != next {
            bail!("message {seq} where {next} was due (dup flag {})", p.dup);
        }
        if p.qos != v3::QoS::AtLeastOnce {
            bail!("message {seq} at {:?}", p.qos);
        }
        next += 1;
        benches::load::client::ack_for(p)
    };
    let mut handle =
        |packet: Option<v3::Packet>, writer: &mut benches::load::client::Writer| -> Result<()> {
            match packet {
                Some(v3::Packet::Publish(p)) => {
                    if let Some(ack) = check(&p)? {
                        writer.queue(ack)?;
                    }
                    Ok(())
                }
                Some(other) => bail!("unexpected {other:?}"),
                None => bail!("the broker closed the connection"),
            }
        };
    let mut received = 0u64;
    while received < m {
        let p = reader.next().await?;
        handle(p, &mut writer)?;
        received += 1;
        while received < m {
            match reader.next_now() {
                Some(p) => {
                    handle(p?, &mut writer)?;
                    received += 1;
                }
                None => break,
            }
        }
        writer.flush().await?;
    }
    let done = begun.elapsed();
    // Nothing more may come.
    if let Ok(p) = tokio::time::timeout(Duration::from_millis(300), reader.next()).await {
        match p? {
            Some(v3::Packet::Publish(p)) => bail!(
                "an extra message after the {m} expected: {:?}",
                parse_payload(&p.payload)
            ),
            Some(other) => bail!("unexpected {other:?} after the queue"),
            None => bail!("the broker closed the connection after the queue"),
        }
    }
    benches::load::client::close(&mut reader, &mut writer).await?;
    Ok(OneDrained { connack, done })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trip() {
        let p = payload(42, 7, 64);
        assert_eq!(p.len(), 64);
        assert_eq!(parse_payload(&p), Some((7, 42)));
        assert_eq!(parse_payload(&p[..10]), None);
    }

    #[test]
    fn colours_are_stripped() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m x"),
            "2026  INFO x"
        );
    }
}
