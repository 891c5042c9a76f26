//! What the MongoDB tests share: where the server is, fresh databases, and
//! private servers that a test may kill and restart.

#![allow(dead_code)]

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use storage_mongo::{MongoOptions, MongoStore, OpenError};
use tempfile::TempDir;

/// The server the conformance suite runs against.
pub const DEFAULT_URI: &str = "mongodb://127.0.0.1:27017/?directConnection=true";

/// How to get a server, for failure messages.
pub const HOW_TO_START: &str = "\
These tests need a MongoDB server that is a replica set member (the store uses transactions). \
Either run scripts/test, which starts one, or start the MongoDB-compatible test server yourself:
    python3 -m venv .venv-mongo && .venv-mongo/bin/pip install 'SecantusDB==0.7.0b3'
    .venv-mongo/bin/secantusd-py --host 127.0.0.1 --port 27017 --storage-path \"$(mktemp -d)\" &
or point MONGODB_URI at one (a real mongod needs --replSet and rs.initiate()).";

/// `MONGODB_URI`, or the default local server.
pub fn mongodb_uri() -> String {
    std::env::var("MONGODB_URI")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| DEFAULT_URI.to_owned())
}

/// A database name no other test uses.
pub fn fresh_database(tag: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "test_{tag}_{}_{nanos:x}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Open a store on `database` at `uri`, or fail the test saying how to
/// get a server.
pub async fn open_or_fail(uri: &str, options: MongoOptions) -> MongoStore {
    match MongoStore::open(uri, options).await {
        Ok(store) => store,
        Err(e) => panic!("{e}\n{HOW_TO_START}"),
    }
}

/// Drop `database` at `uri`, from a thread of its own (callable from Drop,
/// inside or outside a runtime). Failures are ignored: this is cleanup.
pub fn drop_database(uri: &str, database: &str) {
    let (uri, database) = (uri.to_owned(), database.to_owned());
    let dropper = std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async {
            let Ok(mut options) = mongodb::options::ClientOptions::parse(&uri).await else {
                return;
            };
            options.server_selection_timeout = Some(Duration::from_secs(2));
            if let Ok(client) = mongodb::Client::with_options(options) {
                // Bounded: a server that stopped answering must not hang the
                // test run in a destructor.
                let db = client.database(&database);
                let _ = tokio::time::timeout(Duration::from_secs(10), db.drop()).await;
            }
        });
    });
    let _ = dropper.join();
}

/// The command that starts a MongoDB-compatible server: `MONGO_SERVER_BIN`,
/// or `secantusd-py` on the PATH.
pub fn server_bin() -> String {
    std::env::var("MONGO_SERVER_BIN")
        .ok()
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| "secantusd-py".to_owned())
}

/// Extra arguments of the private servers: `MONGO_SERVER_ARGS`
/// (whitespace-separated), by default `--sync-on-commit`.
///
/// The store commits with write concern `{w: majority, j: true}`, which
/// mongod honours on `commitTransaction`. SecantusDB honours `j: true` on
/// single writes but not on transaction commits (its journal is flushed in
/// the background), so a SIGKILL right after a commit can lose it unless
/// the server syncs every commit, which `--sync-on-commit` makes it do.
/// For a server command that does not know that flag, set
/// `MONGO_SERVER_ARGS` (to an empty string for none).
pub fn server_args() -> Vec<String> {
    match std::env::var("MONGO_SERVER_ARGS") {
        Ok(args) => args.split_whitespace().map(str::to_owned).collect(),
        Err(_) => vec!["--sync-on-commit".to_owned()],
    }
}

/// A port nothing listens on (just now).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

/// A server of this test's own on a free port, with its data in a fresh
/// directory that outlives restarts; killed when dropped.
pub struct PrivateServer {
    bin: String,
    port: u16,
    dir: TempDir,
    child: Option<Child>,
    starts: u32,
}

impl PrivateServer {
    /// Start a new server, or fail the test saying why.
    pub fn start() -> PrivateServer {
        let mut server = PrivateServer {
            bin: server_bin(),
            port: free_port(),
            dir: tempfile::tempdir().expect("temporary directory"),
            child: None,
            starts: 0,
        };
        server.restart();
        server
    }

    /// The URI of this server.
    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self, start: u32) -> PathBuf {
        self.dir.path().join(format!("server-{start}.log"))
    }

    /// (Re)start the server on the same port and data directory, and wait
    /// until it accepts connections.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the server is still running");
        self.starts += 1;
        let log_path = self.log_path(self.starts);
        let log = File::create(&log_path).expect("server log file");
        let err_log = log.try_clone().expect("server log file");
        let child = Command::new(&self.bin)
            .arg("--host")
            .arg("127.0.0.1")
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--storage-path")
            .arg(self.data_dir())
            .args(server_args())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log)
            .spawn();
        let mut child = match child {
            Ok(child) => child,
            Err(e) => panic!(
                "cannot start the MongoDB-compatible server `{}`: {e}. Set MONGO_SERVER_BIN to \
                 the command (scripts/test does), or install it:\n    python3 -m venv \
                 .venv-mongo && .venv-mongo/bin/pip install 'SecantusDB==0.7.0b3'\n    \
                 export MONGO_SERVER_BIN=$PWD/.venv-mongo/bin/secantusd-py",
                self.bin
            ),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                break;
            }
            let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "the MongoDB-compatible server `{}` exited ({status}) before accepting \
                     connections on port {}; its log:\n{}",
                    self.bin,
                    self.port,
                    log()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the MongoDB-compatible server `{}` did not accept connections on port {} \
                     within 30 s; its log:\n{}",
                    self.bin,
                    self.port,
                    log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child = Some(child);
    }

    /// Kill the server with SIGKILL, as a crash would, and reap it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// True when `e` says the server could not be reached.
pub fn is_unreachable(e: &OpenError) -> bool {
    matches!(e, OpenError::Unreachable { .. } | OpenError::Timeout { .. })
}

/// A TCP proxy in front of a server that can stop forwarding without
/// closing anything, as a network partition or a hung server would.
pub struct Proxy {
    port: u16,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Forward a free local port to `127.0.0.1:target`.
    pub async fn start(target: u16) -> Proxy {
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let frozen = Arc::new(AtomicBool::new(false));
        let flag = frozen.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let flag = flag.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    let (in_read, in_write) = inbound.into_split();
                    let (out_read, out_write) = outbound.into_split();
                    tokio::join!(
                        pipe(in_read, out_write, flag.clone()),
                        pipe(out_read, in_write, flag)
                    );
                });
            }
        });
        Proxy { port, frozen, task }
    }

    /// The URI of the server through this proxy.
    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
    }

    /// Stop (`true`) or resume (`false`) forwarding.
    pub fn freeze(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Data read just before a freeze is held back too.
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
