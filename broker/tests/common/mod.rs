//! The compiled broker as a child process, for tests that need the real
//! binary: startup, signals, `kill -9`, restart on the same files.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_broker");

/// A running broker process. Killed (SIGKILL) when dropped.
pub struct BrokerProcess {
    child: Child,
    pub port: u16,
    lines: mpsc::Receiver<String>,
}

impl BrokerProcess {
    /// Start the binary in `cwd` with `args` (a `--listen 127.0.0.1:0` is
    /// added) and wait for its `listening on` line.
    pub fn start(cwd: &Path, args: &[&str]) -> BrokerProcess {
        Self::start_within(cwd, args, Duration::from_secs(30))
    }

    /// [`BrokerProcess::start`], waiting up to `within` for it to listen.
    pub fn start_within(cwd: &Path, args: &[&str], within: Duration) -> BrokerProcess {
        let mut child = Command::new(BIN)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .current_dir(cwd)
            .env(
                "RUST_LOG",
                std::env::var("BROKER_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("broker binary starts");
        let lines = stderr_lines(&mut child);
        let mut process = BrokerProcess {
            child,
            port: 0,
            lines,
        };
        let addr = process
            .wait_for_line("listening on ", within)
            .unwrap_or_else(|seen| panic!("broker did not start; its log: {seen:?}"));
        process.port = addr
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .rsplit(':')
            .next()
            .and_then(|p| p.trim().parse().ok())
            .expect("port in the `listening on` line");
        process
    }

    /// Wait for a log line containing `needle`; returns what follows it, or
    /// every line seen if it never came.
    pub fn wait_for_line(&mut self, needle: &str, within: Duration) -> Result<String, Vec<String>> {
        let deadline = std::time::Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some((_, rest)) = line.split_once(needle) {
                        return Ok(rest.to_string());
                    }
                    seen.push(line);
                }
                Err(_) => return Err(seen),
            }
        }
    }

    /// The log lines printed so far and not yet read.
    pub fn log(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    /// `kill -9`: no shutdown, no flush.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        self.child.wait().expect("broker exits")
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The lines `child` writes to its (piped) stderr, as they come, read by a
/// thread of their own; the channel closes when the child closes stderr.
pub fn stderr_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stderr = child.stderr.take().expect("stderr piped");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    lines
}

/// Run the binary in `cwd` expecting it to fail at startup (within 30 s);
/// returns its stderr.
pub fn run_failing(cwd: &Path, args: &[&str]) -> String {
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("broker binary runs");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the broker kept running with {args:?}; expected it to refuse to start");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    assert!(!status.success(), "expected failure for {args:?}");
    err
}

/// An MQTT 3.1.1 client (rumqttc) whose events arrive on a channel; the
/// channel closes when the connection ends (it never reconnects).
pub struct Mqtt {
    pub client: rumqttc::AsyncClient,
    pub events: tokio::sync::mpsc::UnboundedReceiver<rumqttc::Event>,
}

impl Mqtt {
    /// Connect and wait for CONNACK; returns the client and session-present.
    pub async fn connect(port: u16, id: &str, clean: bool) -> (Mqtt, bool) {
        Self::connect_with(port, id, clean, false).await
    }

    /// [`Mqtt::connect`]; with `manual_acks`, received messages are never
    /// acknowledged unless the test does it.
    pub async fn connect_with(port: u16, id: &str, clean: bool, manual_acks: bool) -> (Mqtt, bool) {
        let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        o.set_manual_acks(manual_acks);
        o.set_clean_session(clean)
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(1 << 20, 1 << 20)
            .set_inflight(32);
        Self::connect_options(o).await
    }

    /// Connect with options of the test's own (a will, ...) and wait for
    /// CONNACK; returns the client and session-present.
    pub async fn connect_options(o: rumqttc::MqttOptions) -> (Mqtt, bool) {
        let id = o.client_id();
        let (client, mut eventloop) = rumqttc::AsyncClient::new(o, 1000);
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(event) = eventloop.poll().await {
                if tx.send(event).is_err() {
                    break;
                }
            }
        });
        let mut mqtt = Mqtt { client, events };
        let present = loop {
            match tokio::time::timeout(Duration::from_secs(10), mqtt.events.recv()).await {
                Ok(Some(rumqttc::Event::Incoming(rumqttc::Incoming::ConnAck(a)))) => {
                    assert_eq!(a.code, rumqttc::ConnectReturnCode::Success, "{id}");
                    break a.session_present;
                }
                Ok(Some(_)) => {}
                other => panic!("{id}: no CONNACK ({other:?})"),
            }
        };
        (mqtt, present)
    }

    /// Subscribe and wait for SUBACK.
    pub async fn subscribe(&mut self, filter: &str, qos: rumqttc::QoS) {
        self.client.subscribe(filter, qos).await.expect("subscribe");
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.events.recv()).await {
                Ok(Some(rumqttc::Event::Incoming(rumqttc::Incoming::SubAck(_)))) => return,
                Ok(Some(_)) => {}
                other => panic!("no SUBACK for {filter} ({other:?})"),
            }
        }
    }

    /// The next PUBLISH received within `within`, acknowledged.
    pub async fn next_publish(&mut self, within: Duration) -> Option<rumqttc::Publish> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(rumqttc::Event::Incoming(rumqttc::Incoming::Publish(p)))) => {
                    return Some(p)
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// DISCONNECT, and wait for the connection to end.
    pub async fn disconnect(mut self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while self.events.recv().await.is_some() {}
        })
        .await;
    }
}

/// A database server private to one test (Redis or the MongoDB-compatible
/// server), on its own port and data directory, so the test can stop and
/// restart it. The commands come from `REDIS_SERVER_BIN` / `MONGO_SERVER_BIN`
/// (set by scripts/test).
pub struct DbServer {
    kind: DbKind,
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    extra: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DbKind {
    Redis,
    Mongo,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl DbServer {
    pub fn start(kind: DbKind) -> DbServer {
        Self::start_with(kind, &[])
    }

    /// [`DbServer::start`] with more command-line arguments (for Redis:
    /// `--appendfsync always`, say).
    pub fn start_with(kind: DbKind, extra: &[&str]) -> DbServer {
        let mut server = DbServer {
            kind,
            port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.restart();
        server
    }

    fn command(&self) -> Command {
        let (var, default) = match self.kind {
            DbKind::Redis => ("REDIS_SERVER_BIN", "redis-server"),
            DbKind::Mongo => ("MONGO_SERVER_BIN", "secantusd-py"),
        };
        let bin = std::env::var(var).unwrap_or_else(|_| default.into());
        let mut c = Command::new(&bin);
        let port = self.port.to_string();
        let dir = self.dir.path().to_str().expect("utf-8 path").to_owned();
        match self.kind {
            DbKind::Redis => c.args([
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--dir",
                &dir,
                "--appendonly",
                "yes",
                "--save",
                "",
            ]),
            DbKind::Mongo => c.args([
                "--host",
                "127.0.0.1",
                "--port",
                &port,
                "--storage-path",
                &dir,
            ]),
        };
        c.args(&self.extra);
        c.stdout(Stdio::null()).stderr(Stdio::null());
        c
    }

    /// `kill -9`: the server dies without a shutdown; [`DbServer::restart`]
    /// starts it again on the same data.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start (again) on the same port and data.
    pub fn restart(&mut self) {
        let child = self.command().spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start the {:?} server ({e}); run the tests with scripts/test, which \
                 installs it, or set REDIS_SERVER_BIN / MONGO_SERVER_BIN",
                self.kind
            )
        });
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?} server did not listen on {}",
                self.kind,
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stop it as an operator would (SIGTERM), and wait.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while child.try_wait().ok().flatten().is_none() {
                if std::time::Instant::now() > deadline {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for DbServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The Redis the tests use (`REDIS_URL`, default `redis://127.0.0.1:6379/`),
/// with a key prefix of its own. Fails, saying how to start one, when it is
/// not reachable.
pub fn redis_url(prefix: &str) -> String {
    let base = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    require_reachable(&base, 6379, "redis-server --port 6379 --appendonly yes");
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}prefix={prefix}:")
}

/// The MongoDB server the tests use (`MONGODB_URI`, default
/// `mongodb://127.0.0.1:27017/?directConnection=true`), naming database
/// `db`. Fails, saying how to start one, when it is not reachable.
pub fn mongodb_url(db: &str) -> String {
    let base = std::env::var("MONGODB_URI")
        .unwrap_or_else(|_| "mongodb://127.0.0.1:27017/?directConnection=true".into());
    require_reachable(
        &base,
        27017,
        "the MongoDB-compatible server of shared/MONGODB.md, or a mongod replica set",
    );
    let (scheme, rest) = base.split_once("://").expect("a URI with a scheme");
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (hosts, tail) = rest.split_at(end);
    let query = tail.split_once('?').map(|(_, q)| q).unwrap_or("");
    let sep = if query.is_empty() { "" } else { "?" };
    format!("{scheme}://{hosts}/{db}{sep}{query}")
}

fn require_reachable(url: &str, default_port: u16, how: &str) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let hostport = &rest[..rest.find(['/', '?', ',']).unwrap_or(rest.len())];
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().unwrap_or(default_port)),
        None => (hostport, default_port),
    };
    let reachable = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok());
    assert!(
        reachable,
        "no server at {url}: run the tests with scripts/test, which starts one, \
         or start {how} and point the URL variable at it"
    );
}

/// A name unique to this test run.
pub fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{name}-{}-{nanos}", std::process::id())
}

/// `url` with one more query parameter.
pub fn with_param(url: &str, param: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{param}")
}

impl BrokerProcess {
    /// The broker's process id (for /proc/PID/status).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the broker has stopped (crashed, say).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

/// A process's memory from /proc/PID/status, in KiB: (VmRSS, VmHWM).
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}
