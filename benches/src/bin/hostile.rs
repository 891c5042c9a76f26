//! `hostile`: the hostile-client cases of `broker/tests/hostile.rs` (the same
//! code, `broker/tests/hostile/cases.rs`) against this broker and Mosquitto,
//! each case on a fresh process of each, and a table of what happened: the
//! broker's peak RSS growth during the case, whether a bystander's QoS 1
//! round trip succeeded right after it, and what the hostile client saw.
//!
//! ```sh
//! scripts/hostile                      # builds, installs Mosquitto if missing, runs
//! target/debug/hostile --broker target/release/broker --only slow
//! ```

#[path = "../../../broker/tests/hostile/cases.rs"]
mod cases;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cases::*;
use clap::Parser;
use futures::future::BoxFuture;
use futures::FutureExt;

/// Hostile MQTT clients against this broker and Mosquitto, side by side.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// This broker's binary (a release build).
    #[arg(long, default_value = "target/release/broker")]
    broker: PathBuf,
    /// Mosquitto's binary.
    #[arg(long, default_value = "mosquitto")]
    mosquitto: String,
    /// Run only the cases whose name contains this.
    #[arg(long)]
    only: Option<String>,
    /// Also write the table to FILE (Markdown).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Which {
    Broker,
    Mosquitto,
}

/// What a case needs configured; what Mosquitto has no setting for is left out there.
#[derive(Clone, Copy, Default)]
struct Needs {
    connect_timeout_secs: Option<u64>,
    max_connections: Option<u32>,
    max_connection_rate: Option<u32>,
    /// SQLite for this broker, persistence on for Mosquitto.
    persistent_store: bool,
}

type Run = fn(SocketAddr, u32) -> BoxFuture<'static, String>;

struct Case {
    name: &'static str,
    needs: Needs,
    run: Run,
}

fn cases() -> Vec<Case> {
    let d = Needs::default();
    vec![
        Case {
            name: "deep topics (5)",
            needs: d,
            run: |a, _| async move { deep_topics(a, Version::V5).await.summary() }.boxed(),
        },
        Case {
            name: "deep topics (3.1.1)",
            needs: d,
            run: |a, _| async move { deep_topics(a, Version::V3).await.summary() }.boxed(),
        },
        Case {
            name: "slow consumer QoS 0, 1 KiB, 200 MB",
            needs: d,
            run: |a, pid| {
                async move {
                    let spec = SlowSpec {
                        qos: 0,
                        payload: 1024,
                        total_bytes: 200 << 20,
                        persistent: false,
                        max_time: Duration::from_secs(60),
                    };
                    slow_consumer(a, pid, spec).await.summary()
                }
                .boxed()
            },
        },
        Case {
            name: "slow consumer QoS 0, 64 KiB, 200 MB",
            needs: d,
            run: |a, pid| {
                async move {
                    let spec = SlowSpec {
                        qos: 0,
                        payload: 64 << 10,
                        total_bytes: 200 << 20,
                        persistent: false,
                        max_time: Duration::from_secs(60),
                    };
                    slow_consumer(a, pid, spec).await.summary()
                }
                .boxed()
            },
        },
        Case {
            name: "slow consumer QoS 1 persistent, 1 KiB, 100 MB",
            needs: Needs {
                persistent_store: true,
                ..d
            },
            run: |a, pid| {
                async move {
                    let spec = SlowSpec {
                        qos: 1,
                        payload: 1024,
                        total_bytes: 100 << 20,
                        persistent: true,
                        max_time: Duration::from_secs(60),
                    };
                    slow_consumer(a, pid, spec).await.summary()
                }
                .boxed()
            },
        },
        Case {
            name: "slow consumer QoS 1 persistent, 64 KiB, 200 MB",
            needs: Needs {
                persistent_store: true,
                ..d
            },
            run: |a, pid| {
                async move {
                    let spec = SlowSpec {
                        qos: 1,
                        payload: 64 << 10,
                        total_bytes: 200 << 20,
                        persistent: true,
                        max_time: Duration::from_secs(60),
                    };
                    slow_consumer(a, pid, spec).await.summary()
                }
                .boxed()
            },
        },
        Case {
            name: "subscription bomb (5)",
            needs: d,
            run: |a, _| {
                async move { subscription_bomb(a, Version::V5, 5000).await.summary() }.boxed()
            },
        },
        Case {
            name: "subscription bomb (3.1.1)",
            needs: d,
            run: |a, _| {
                async move { subscription_bomb(a, Version::V3, 5000).await.summary() }.boxed()
            },
        },
        Case {
            name: "3,000 connections without CONNECT (timeout 2 s)",
            needs: Needs {
                connect_timeout_secs: Some(2),
                ..d
            },
            run: |a, _| {
                async move {
                    connection_flood(a, 3000, Duration::from_secs(12))
                        .await
                        .summary()
                }
                .boxed()
            },
        },
        Case {
            name: "PUBLISH announcing 256 MB, trickled",
            needs: d,
            run: |a, _| {
                async move {
                    let (s5, t5) = huge_announce(a, Version::V5).await;
                    let (s3, t3) = huge_announce(a, Version::V3).await;
                    format!(
                        "5: {s5} after {:.1} s; 3.1.1: {s3} after {:.1} s",
                        t5.as_secs_f64(),
                        t3.as_secs_f64()
                    )
                }
                .boxed()
            },
        },
        Case {
            name: "CONNECT one byte per second (timeout 3 s)",
            needs: Needs {
                connect_timeout_secs: Some(3),
                ..d
            },
            run: |a, _| {
                async move {
                    let (s, t) = trickled_connect(a, Duration::from_secs(15)).await;
                    format!("{s} after {:.1} s", t.as_secs_f64())
                }
                .boxed()
            },
        },
        Case {
            name: "half-open connections (50 + 50)",
            needs: d,
            run: |a, _| {
                async move {
                    let (v3, v5) = tokio::join!(
                        half_open(a, Version::V3, 1, 50),
                        half_open(a, Version::V5, 2, 50)
                    );
                    format!("{}; {}", v3.summary(), v5.summary())
                }
                .boxed()
            },
        },
        Case {
            name: "takeover storm (300 connects, one id)",
            needs: d,
            run: |a, _| async move { takeover_storm(a, 200, 100).await.summary() }.boxed(),
        },
        Case {
            name: "random bytes (200 connections)",
            needs: Needs {
                connect_timeout_secs: Some(3),
                ..d
            },
            run: |a, _| {
                async move {
                    random_bytes(a, 0x5EED, 200, Duration::from_secs(15))
                        .await
                        .summary()
                }
                .boxed()
            },
        },
        Case {
            name: "300 wills at once",
            needs: d,
            run: |a, _| async move { wills(a, 300).await.summary() }.boxed(),
        },
        Case {
            name: "300 wills at once, persistent store",
            needs: Needs {
                persistent_store: true,
                ..d
            },
            run: |a, _| async move { wills(a, 300).await.summary() }.boxed(),
        },
        Case {
            name: "max_connections 50",
            needs: Needs {
                max_connections: Some(50),
                ..d
            },
            run: |a, _| async move { connection_limit(a, 50, 10).await.summary() }.boxed(),
        },
        Case {
            name: "max_connection_rate 20/s",
            needs: Needs {
                max_connection_rate: Some(20),
                ..d
            },
            run: |a, _| async move { connection_rate(a, 100).await.summary() }.boxed(),
        },
        Case {
            name: "Receive Maximum exceeded while pipelining (5)",
            needs: d,
            run: |a, _| async move { linger_receive_maximum(a, 3000).await.to_string() }.boxed(),
        },
        Case {
            name: "refused CONNECT, then pipelined bytes (3.1.1)",
            needs: d,
            run: |a, _| {
                async move {
                    let v = linger_refused_connect(a, BadConnect::ProtocolVersion).await;
                    let e = linger_refused_connect(a, BadConnect::EmptyIdPersistent).await;
                    format!("bad version: {v}; empty id, clean session 0: {e}")
                }
                .boxed()
            },
        },
    ]
}

struct Server {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start(cli: &Cli, which: Which, needs: Needs) -> Result<Server> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let log = std::fs::File::create(dir.path().join("log"))?;
    let child = match which {
        Which::Broker => {
            let mut toml = String::from("[broker]\n");
            if let Some(v) = needs.connect_timeout_secs {
                toml += &format!("connect_timeout_secs = {v}\n");
            }
            if let Some(v) = needs.max_connections {
                toml += &format!("max_connections = {v}\n");
            }
            if let Some(v) = needs.max_connection_rate {
                toml += &format!("max_connection_rate = {v}\n");
            }
            let config = dir.path().join("broker.toml");
            std::fs::write(&config, toml)?;
            let storage = if needs.persistent_store {
                format!("sqlite://{}", dir.path().join("broker.db").display())
            } else {
                "memory://".into()
            };
            Command::new(&cli.broker)
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--storage")
                .arg(storage)
                .arg("--config")
                .arg(&config)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .with_context(|| format!("cannot run {}", cli.broker.display()))?
        }
        Which::Mosquitto => {
            // Its defaults otherwise (max_queued_messages 1000, no byte limit).
            let mut conf = format!("listener {port} 127.0.0.1\nallow_anonymous true\n");
            if let Some(v) = needs.max_connections {
                conf += &format!("max_connections {v}\n");
            }
            conf += &format!(
                "persistence {}\npersistence_location {}/\nuser root\n",
                needs.persistent_store,
                dir.path().display()
            );
            let config = dir.path().join("mosquitto.conf");
            std::fs::write(&config, conf)?;
            Command::new(&cli.mosquitto)
                .arg("-c")
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .with_context(|| format!("cannot run {}", cli.mosquitto))?
        }
    };
    let mut server = Server {
        child,
        addr: ([127, 0, 0, 1], port).into(),
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(server.addr).is_err() {
        if let Some(status) = server.child.try_wait()? {
            let log = std::fs::read_to_string(server._dir.path().join("log")).unwrap_or_default();
            bail!("{which:?} exited at start ({status}): {log}");
        }
        if Instant::now() > deadline {
            bail!("{which:?} did not listen on {}", server.addr);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(server)
}

struct Row {
    case: &'static str,
    which: Which,
    growth: String,
    bystander: String,
    saw: String,
}

async fn run_case(cli: &Cli, case: &Case, which: Which) -> Row {
    let mut row = Row {
        case: case.name,
        which,
        growth: "-".into(),
        bystander: "-".into(),
        saw: String::new(),
    };
    let mut server = match start(cli, which, case.needs) {
        Ok(s) => s,
        Err(e) => {
            row.saw = format!("did not start: {e:#}");
            return row;
        }
    };
    let pid = server.child.id();
    let addr = server.addr;
    let _ = bystander(addr, Duration::from_secs(5)).await;
    let mut peak = PeakRss::start(pid);
    let outcome = tokio::spawn((case.run)(addr, pid));
    row.saw = match tokio::time::timeout(Duration::from_secs(180), outcome).await {
        Ok(Ok(saw)) => saw,
        Ok(Err(e)) if e.is_panic() => {
            let p = e.into_panic();
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            format!("case failed: {msg}")
        }
        Ok(Err(e)) => format!("case failed: {e}"),
        Err(_) => "case did not finish in 180 s".into(),
    };
    row.bystander = match bystander(addr, Duration::from_secs(5)).await {
        Ok(d) => format!("ok ({} ms)", d.as_millis()),
        Err(e) => match server.child.try_wait() {
            Ok(Some(status)) => format!("failed: broker exited ({status})"),
            _ => format!("failed: {e}"),
        },
    };
    row.growth = mib(peak.growth_kib());
    row
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Hostile cases open thousands of sockets.
    let _ = rlimit::increase_nofile_limit(20_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    for case in cases() {
        if cli.only.as_deref().is_some_and(|o| !case.name.contains(o)) {
            continue;
        }
        for which in [Which::Broker, Which::Mosquitto] {
            eprintln!("{} on {which:?}...", case.name);
            let row = rt.block_on(run_case(&cli, &case, which));
            eprintln!("  {}, bystander {}: {}", row.growth, row.bystander, row.saw);
            rows.push(row);
        }
    }
    let mut table = String::from(
        "| case | broker | peak RSS growth | bystander | what the hostile client saw |\n|---|---|---|---|---|\n",
    );
    for r in &rows {
        let who = match r.which {
            Which::Broker => "this broker",
            Which::Mosquitto => "Mosquitto",
        };
        table += &format!(
            "| {} | {who} | {} | {} | {} |\n",
            r.case,
            r.growth,
            r.bystander,
            r.saw.replace('|', "/")
        );
    }
    print!("{table}");
    if let Some(path) = &cli.out {
        std::fs::write(path, &table).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
