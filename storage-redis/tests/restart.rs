//! Losing Redis under an open store: a private `redis-server` (binary from
//! `REDIS_SERVER_BIN`, default `redis-server`) on a free port, in a
//! temporary directory with `--appendonly yes`, killed and restarted.
//!
//! Alone in its test binary: it checks what the store logs, with a
//! subscriber of its own.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use broker_core::message::{Message, QoS};
use broker_core::storage::{
    Delivery, PacketOp, PacketStore, QueueTarget, RetainedStore, SessionRecord, StorageError,
    SubscriptionRecord, SubscriptionStore,
};
use broker_core::subscription::SubscriptionOptions;
use common::{free_port, options};
use storage_redis::{Durability, RedisStore};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// A `redis-server` of our own, killed when dropped.
struct Server {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl Server {
    fn start(port: u16, dir: &Path) -> Server {
        Self::start_with(port, dir, &[])
    }

    /// [`Server::start`] with more `redis-server` arguments.
    fn start_with(port: u16, dir: &Path, extra: &[&str]) -> Server {
        let bin = std::env::var("REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".to_owned());
        let log = dir.join("redis.log");
        let child = Command::new(&bin)
            .arg("--port")
            .arg(port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--daemonize", "no"])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(extra)
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start `{bin}` ({e}): install Redis (redis-server), or set \
                     REDIS_SERVER_BIN to the path of its server binary"
                )
            });
        let mut server = Server {
            child: Some(child),
            port,
            dir: dir.to_owned(),
        };
        server.wait_ready(&log);
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Until it answers PING with its data loaded.
    fn wait_ready(&mut self, log: &Path) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "redis-server exited ({status}) on port {}: {}",
                    self.port,
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            let ping = redis::Client::open(self.url())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if ping.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} not ready after 10 s: {}",
                self.port,
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Send a signal (`STOP`, `CONT`) with kill(1).
    fn signal(&self, name: &str) {
        let pid = self.child.as_ref().map(Child::id).expect("server running");
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {pid}: {status}");
    }

    /// SIGKILL, as a crash would.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The store's warnings and infos, to check that an outage is logged once.
#[derive(Clone, Default)]
struct Logged(Arc<Mutex<Vec<(Level, String)>>>);

impl Logged {
    fn count(&self, level: Level, text: &str) -> usize {
        let events = self.0.lock().unwrap_or_else(|e| e.into_inner());
        events
            .iter()
            .filter(|(l, m)| *l == level && m.contains(text))
            .count()
    }
}

impl<S: Subscriber> Layer<S> for Logged {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        struct Message(String);
        impl Visit for Message {
            fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        if event.metadata().target().starts_with("storage_redis") {
            let mut m = Message(String::new());
            event.record(&mut m);
            eprintln!("{} {}", event.metadata().level(), m.0);
            let mut events = self.0.lock().unwrap_or_else(|e| e.into_inner());
            events.push((*event.metadata().level(), m.0));
        }
    }
}

/// The tests of this file one at a time: `redis_killed_and_restarted`
/// counts the store's log lines through a subscriber of its own thread,
/// and tracing decides whether a call site logs process-wide, so a store
/// opened at the same moment on another thread, with no subscriber, can
/// switch those lines off for it.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn message(id: u64) -> Arc<Message> {
    let mut m = Message::new("t/restart", format!("m{id}"), QoS::AtLeastOnce, false);
    m.id = id;
    m.received_at_ms = 1_700_000_000_000 + id;
    Arc::new(m)
}

fn enqueue(id: u64) -> PacketOp {
    PacketOp::Enqueue {
        message: message(id),
        targets: vec![QueueTarget {
            client: Arc::from("c"),
            seq: id,
            delivery: Delivery::new(QoS::AtLeastOnce),
        }],
    }
}

fn assert_unavailable<T: std::fmt::Debug>(
    what: &str,
    result: Result<T, StorageError>,
    took: Duration,
    timeout: Duration,
) {
    match result {
        Err(StorageError::Unavailable { message, .. }) => {
            assert!(message.contains("127.0.0.1"), "{what}: {message}")
        }
        other => panic!("{what} while Redis is down: {other:?}"),
    }
    assert!(
        took < timeout + Duration::from_millis(500),
        "{what} took {took:?} with a {timeout:?} timeout"
    );
}

/// Kill Redis under an open store: operations fail with `Unavailable`
/// within the timeout (logged once), then work again once Redis is back on
/// the same port and directory, with everything written before still there.
#[tokio::test(flavor = "current_thread")]
async fn redis_killed_and_restarted() {
    let _serial = SERIAL.lock().await;
    let logged = Logged::default();
    let _log =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(logged.clone()));
    let dir = tempfile::tempdir().expect("temporary directory");
    let port = free_port();
    let mut server = Server::start(port, dir.path());
    let timeout = Duration::from_secs(1);
    let store = RedisStore::open(&server.url(), options("restart:", timeout))
        .await
        .expect("open the private server");
    assert_eq!(store.durability(), Durability::EveryWrite);
    assert_eq!(logged.count(Level::INFO, "appendfsync always"), 1);

    store
        .write((1..=3).map(enqueue).collect())
        .await
        .expect("write before the kill");
    let session = SessionRecord {
        client_id: "c".into(),
        expiry_secs: None,
        disconnected_at_ms: None,
    };
    store.save_session(&session).await.expect("save_session");
    let sub = SubscriptionRecord {
        filter: "t/#".into(),
        options: SubscriptionOptions::new(QoS::AtLeastOnce),
    };
    store
        .add_subscriptions("c", std::slice::from_ref(&sub))
        .await
        .expect("add_subscriptions");
    store
        .set_retained(message(100))
        .await
        .expect("set_retained");

    // A server that stops answering (stopped, not dead): operations give up
    // at the timeout, and work again once it answers.
    server.signal("STOP");
    let start = Instant::now();
    let r = store.read_queue("c", None, 10).await;
    assert_unavailable(
        "read_queue on a stopped server",
        r,
        start.elapsed(),
        timeout,
    );
    let start = Instant::now();
    let r = store.last_message_id().await;
    assert_unavailable(
        "last_message_id on a stopped server",
        r,
        start.elapsed(),
        timeout,
    );
    server.signal("CONT");
    let q = store
        .read_queue("c", None, 10)
        .await
        .expect("read_queue once the server answers again");
    assert_eq!(q.len(), 3);
    assert_eq!(logged.count(Level::WARN, "unavailable"), 1);
    assert_eq!(logged.count(Level::INFO, "available again"), 1);

    server.kill();
    let outage = Instant::now();
    for round in 0..3 {
        let start = Instant::now();
        let r = store.write(vec![enqueue(4)]).await;
        assert_unavailable(
            &format!("write, round {round}"),
            r,
            start.elapsed(),
            timeout,
        );
        let start = Instant::now();
        let r = store.read_queue("c", None, 10).await;
        assert_unavailable("read_queue", r, start.elapsed(), timeout);
        let start = Instant::now();
        let r = store.load_sessions().await;
        assert_unavailable("load_sessions", r, start.elapsed(), timeout);
        let start = Instant::now();
        let r = store.lookup_retained("t/#").await;
        assert_unavailable("lookup_retained", r, start.elapsed(), timeout);
    }
    eprintln!("12 operations failed in {:?}", outage.elapsed());
    assert_eq!(
        logged.count(Level::WARN, "unavailable"),
        2,
        "each outage should be logged once"
    );

    let dir_path = server.dir.clone();
    let _server = Server::start(port, &dir_path);
    let back = Instant::now();
    let deadline = back + Duration::from_secs(15);
    let queue = loop {
        match store.read_queue("c", None, 10).await {
            Ok(q) => break q,
            Err(StorageError::Unavailable { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("read_queue after Redis came back: {e}"),
        }
    };
    eprintln!(
        "read_queue worked {:?} after Redis answered PING again",
        back.elapsed()
    );
    assert_eq!(logged.count(Level::INFO, "available again"), 2);
    assert_eq!(
        queue.iter().map(|p| p.seq).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "queue after the restart"
    );
    for p in &queue {
        assert_eq!(*p.message, *message(p.seq), "body of seq {}", p.seq);
    }
    // The retained message's id counts too: it is stored nowhere else.
    assert_eq!(store.last_message_id().await.expect("last_message_id"), 100);
    let sessions = store.load_sessions().await.expect("load_sessions");
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].record, session);
    assert_eq!(sessions[0].subscriptions, vec![sub]);
    let retained = store.lookup_retained("t/#").await.expect("lookup_retained");
    assert_eq!(retained, vec![message(100)]);

    // The write that failed during the outage goes through now.
    store
        .write(vec![enqueue(4)])
        .await
        .expect("write after the restart");
    let queue = store
        .read_queue("c", Some(2), 10)
        .await
        .expect("read_queue");
    assert_eq!(queue.iter().map(|p| p.seq).collect::<Vec<_>>(), vec![3, 4]);
    assert_eq!(logged.count(Level::WARN, "unavailable"), 2);
}

#[tokio::test(flavor = "current_thread")]
async fn a_redis_that_evicts_keys_is_refused() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start_with(
        free_port(),
        dir.path(),
        &["--maxmemory", "100mb", "--maxmemory-policy", "allkeys-lru"],
    );
    let err = RedisStore::open(&server.url(), options("evicting", Duration::from_secs(5)))
        .await
        .expect_err("an evicting Redis is refused");
    let text = err.to_string();
    assert!(
        matches!(err, storage_redis::OpenError::Evicting { .. })
            && text.contains("allkeys-lru")
            && text.contains("noeviction"),
        "{text}"
    );
    // noeviction with the same limit is fine: a full Redis then refuses
    // writes with an error, and nothing stored vanishes.
    let mut c = redis::Client::open(server.url())
        .and_then(|c| c.get_connection())
        .expect("connect");
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query::<()>(&mut c)
        .expect("CONFIG SET");
    let store = RedisStore::open(&server.url(), options("evicting", Duration::from_secs(5)))
        .await
        .expect("noeviction opens");
    store.close().await;
}
